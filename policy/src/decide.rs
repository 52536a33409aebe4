//! The decision: which clusters a new connection tries, in which order, and why every other
//! cluster is not tried.
//!
//! 1. **Exclusions.** A cluster is out if a drill fails, drains or pins traffic away from it,
//!    if it does not allow our cluster (never tried: that would cost a round trip), if the
//!    policy does not name it (or is local-only), if it is below the healthy minimum, if it
//!    has no usable gateway or its peer connection is down, if its circuit is open, or if
//!    outlier detection ejected it. Ejected clusters come back as a last resort when nothing
//!    else is left: the last candidate is never ejected.
//! 2. **Levels.** The policy's priority levels, or the default locality order: this cluster,
//!    then the clusters of its zone, of its region, then every other one by measured RTT, each
//!    its own level. A pin drill makes its cluster the only level.
//! 3. **Spill-over.** A level's health is the weighted mean healthy fraction of its members
//!    that can take traffic at all; members that are out entirely leave the level, so the
//!    others share its traffic by their weights ("80/20 between west and north": west dead,
//!    north takes it all). The level keeps `min(100 %, overprovisioning × health)` of the
//!    traffic and the rest spills to the next level (as Envoy's priority levels do), so a
//!    cluster that lost half its endpoints keeps 70 % of its traffic, not all or nothing. If all levels together have less than 100 %, the
//!    shares are scaled up so the traffic still goes somewhere.
//! 4. **The draw.** The random draw picks a level by its share, then a member by its weight
//!    times its healthy fraction. The chosen cluster is first; the rest follow as retries in
//!    level order, best-weighted first, then clusters in failback hold-down, then (only when
//!    nothing else is left) ejected ones.

use std::fmt;
use std::time::{Duration, Instant};

use meshup_core::names::{ClusterName, ServiceKey};

use crate::health::{Health, PeerSignal, TargetView};
use crate::record::{DrillKind, DrillRecord, PolicyRecord};

/// Shares are in parts per million.
const MILLION: u64 = 1_000_000;

/// Where this gateway is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    pub cluster: ClusterName,
    pub region: String,
    pub zone: String,
}

/// What the catalog says of one cluster that exports the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    pub cluster: ClusterName,
    pub region: String,
    pub zone: String,
    pub endpoints_total: u32,
    pub endpoints_healthy: u32,
    /// Whether its export allows our cluster as a caller.
    pub allows_us: bool,
    /// Its gateways that are not draining and have an address (ignored for our own cluster).
    pub gateways: usize,
}

/// Everything the decision depends on. Built per connection from shared snapshots.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub service: &'a ServiceKey,
    pub local: &'a Locality,
    pub policy: &'a PolicyRecord,
    /// Every cluster that exports the service (our own included, if it does).
    pub clusters: &'a [ClusterState],
    pub health: &'a Health,
    pub drills: &'a [DrillRecord],
    /// Monotonic now, for health.
    pub now: Instant,
    /// Unix seconds, for drills.
    pub unix_now: i64,
    /// A uniformly random number.
    pub draw: u64,
}

/// Why a cluster is not a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Excluded {
    /// A `pin` drill sends the service's traffic to another cluster.
    PinnedElsewhere {
        to: ClusterName,
        who: String,
    },
    /// A `fail` drill treats the cluster as dead.
    FailedByDrill {
        who: String,
        why: String,
        expires: i64,
    },
    /// A `drain` drill: no new connections.
    DrainedByDrill {
        who: String,
        why: String,
        expires: i64,
    },
    /// Its export does not allow our cluster.
    ForbidsUs,
    /// The policy is local-only.
    LocalOnly,
    /// The policy's levels do not name it.
    NotInPolicy,
    NoHealthyEndpoints,
    BelowHealthyMinimum {
        healthy: u32,
        total: u32,
    },
    /// No gateway of it that is not draining.
    NoGateway,
    /// This gateway's connection to it is down.
    PeerDown {
        since: Instant,
    },
    /// Too many connections or opens in flight to it.
    CircuitOpen {
        active: u32,
        pending: u32,
    },
    /// Outlier detection took it out.
    Ejected {
        until: Instant,
    },
}

/// A candidate's place, or why a cluster is not one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Candidate {
        /// Position in the order (0: tried first).
        rank: usize,
        /// Priority level (0: best).
        level: usize,
        /// Its share of new connections, in parts per million (what the draw gives it).
        share_ppm: u64,
        /// Its configured weight in its level.
        weight: u32,
        note: Option<Note>,
    },
    Excluded(Excluded),
}

/// Something to know about a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note {
    /// Recovered, but holding down until then: tried only after every other candidate.
    HoldDown { until: Instant },
    /// Ejected, but nothing else is left.
    LastResort { ejected_until: Instant },
}

/// The decision for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub cluster: ClusterName,
    pub verdict: Verdict,
}

/// Clusters to try, best first, and why for every cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub order: Vec<ClusterName>,
    /// One entry per cluster of the inputs, in the order of the inputs.
    pub explanations: Vec<Explanation>,
    /// Attempts (first plus retries) the policy allows for one connection.
    pub max_attempts: u32,
}

impl Decision {
    /// The cluster that gets the largest share of new connections (the first in order among
    /// equals): what a status page shows as "where this service goes now".
    pub fn main_target(&self) -> Option<&ClusterName> {
        self.explanations
            .iter()
            .filter_map(|e| match e.verdict {
                Verdict::Candidate {
                    rank, share_ppm, ..
                } => Some((share_ppm, std::cmp::Reverse(rank), &e.cluster)),
                Verdict::Excluded(_) => None,
            })
            .max()
            .map(|(_, _, c)| c)
    }
}

/// A cluster still in the running, with what the levels need.
#[derive(Debug, Clone)]
struct Member<'a> {
    state: &'a ClusterState,
    index: usize,
    weight: u32,
    /// Healthy fraction in ppm, 0 when it counts as lost capacity.
    health_ppm: u64,
    eligible: bool,
    hold_down: Option<Instant>,
    ejected: Option<Instant>,
}

impl Member<'_> {
    /// Weight times healthy fraction: what the member gets within its level.
    fn effective(&self) -> u64 {
        if self.eligible && self.hold_down.is_none() {
            u64::from(self.weight) * self.health_ppm
        } else {
            0
        }
    }
}

/// One priority level's sums: its members' effective weights, their configured weights
/// (members with any effective weight only), and its share of new connections in ppm.
#[derive(Debug, Clone, Copy, Default)]
struct LevelSums {
    effective: u64,
    weights: u64,
    share: u64,
}

/// Decides where a new connection goes. Pure: same inputs, same decision.
pub fn decide(inputs: &Inputs<'_>) -> Decision {
    let Inputs {
        service,
        local,
        policy,
        clusters,
        health,
        drills,
        now,
        unix_now,
        draw,
    } = *inputs;
    let active: Vec<&DrillRecord> = drills
        .iter()
        .filter(|d| d.active(unix_now) && d.covers(service))
        .collect();
    let pin = active.iter().find(|d| d.kind == DrillKind::Pin);

    let mut verdicts: Vec<Option<Verdict>> = vec![None; clusters.len()];
    // Members of each level: (level, member).
    let mut members: Vec<(usize, Member<'_>)> = Vec::with_capacity(clusters.len());
    let default_levels = if pin.is_none() && !policy.local_only && policy.levels.is_empty() {
        default_levels(local, clusters, health)
    } else {
        Vec::new()
    };
    // The policy's clusters by name, for one binary search per cluster.
    let mut named: Vec<(&ClusterName, usize, u32)> = policy
        .levels
        .iter()
        .enumerate()
        .flat_map(|(i, l)| l.clusters.iter().map(move |m| (&m.cluster, i, m.weight)))
        .collect();
    named.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let level_of = |c: &ClusterName| {
        named
            .binary_search_by(|(n, _, _)| (*n).cmp(c))
            .ok()
            .map(|i| (named[i].1, named[i].2))
    };

    for (index, state) in clusters.iter().enumerate() {
        let cluster = &state.cluster;
        let is_local = cluster == &local.cluster;
        // Where it would sit, if anywhere.
        let placement = if let Some(pin) = pin {
            if &pin.cluster == cluster {
                Ok((0, 1))
            } else {
                Err(Excluded::PinnedElsewhere {
                    to: pin.cluster.clone(),
                    who: pin.who.clone(),
                })
            }
        } else if policy.local_only {
            if is_local {
                Ok((0, 1))
            } else {
                Err(Excluded::LocalOnly)
            }
        } else if policy.levels.is_empty() {
            Ok((default_levels[index], 1))
        } else {
            level_of(cluster).ok_or(Excluded::NotInPolicy)
        };
        let (level, weight) = match placement {
            Ok(p) => p,
            Err(e) => {
                verdicts[index] = Some(Verdict::Excluded(e));
                continue;
            }
        };
        if !state.allows_us {
            // Not part of the level at all: it can never serve us.
            verdicts[index] = Some(Verdict::Excluded(Excluded::ForbidsUs));
            continue;
        }
        let view = health.view(service, cluster, policy.failback_hold_down, now);
        let exclusion = exclusion(state, is_local, policy, health, &view, &active);
        let excluded = exclusion.is_some();
        let ejected = view.ejected_until;
        let hold_down = view.held_down_until;
        let health_ppm = if state.endpoints_total == 0 {
            0
        } else {
            u64::from(state.endpoints_healthy) * MILLION / u64::from(state.endpoints_total)
        };
        let eligible = !excluded && ejected.is_none();
        if let Some(e) = exclusion {
            verdicts[index] = Some(Verdict::Excluded(e));
        } else if let Some(until) = ejected {
            verdicts[index] = Some(Verdict::Excluded(Excluded::Ejected { until }));
        }
        members.push((
            level,
            Member {
                state,
                index,
                weight,
                health_ppm: if eligible && hold_down.is_none() {
                    health_ppm
                } else {
                    0
                },
                eligible,
                hold_down: if eligible { hold_down } else { None },
                ejected: if excluded { None } else { ejected },
            },
        ));
    }

    let level_count = members.iter().map(|(l, _)| l + 1).max().unwrap_or(0);
    // Per level: the sum of effective weights, and of the weights of members with any.
    // Members that are out entirely (dead, ejected, drained, holding down) leave the level:
    // the others share its traffic by their weights. Members that lost part of their
    // endpoints stay, and the level spills what they lost.
    let mut levels = vec![LevelSums::default(); level_count];
    for (l, m) in &members {
        let e = m.effective();
        if e > 0 {
            levels[*l].effective += e;
            levels[*l].weights += u64::from(m.weight);
        }
    }
    // Each level's share of the traffic, in ppm.
    let factor = u64::from(policy.overprovisioning_percent);
    let mut remaining = MILLION;
    for level in &mut levels {
        let health = level.effective.checked_div(level.weights).unwrap_or(0);
        level.share = (health * factor / 100).min(MILLION).min(remaining);
        remaining -= level.share;
    }
    let total: u64 = levels.iter().map(|l| l.share).sum();
    if total > 0 && total < MILLION {
        // Every level together is short of capacity: scale up so the traffic still lands.
        for l in &mut levels {
            l.share = l.share * MILLION / total;
        }
    }

    // The draw: a level by share, then a member by effective weight.
    let level_draw = ((draw & 0xffff_ffff) * MILLION) >> 32;
    let member_draw = draw >> 32;
    let mut chosen: Option<usize> = None;
    let mut acc = 0;
    for (level, sums) in levels.iter().enumerate() {
        acc += sums.share;
        if sums.share > 0 && level_draw < acc {
            let sum = sums.effective;
            if sum > 0 {
                let pick = ((u128::from(member_draw) * u128::from(sum)) >> 32) as u64;
                let mut acc = 0;
                for (_, m) in members.iter().filter(|(l, _)| *l == level) {
                    acc += m.effective();
                    if pick < acc {
                        chosen = Some(m.index);
                        break;
                    }
                }
            }
            break;
        }
    }

    // The order: chosen, then the eligible by level and effective weight, then hold-down,
    // then (only if nothing else) ejected ones.
    let mut ranked: Vec<(usize, &Member<'_>)> = members
        .iter()
        .filter(|(_, m)| m.eligible && m.hold_down.is_none())
        .map(|(l, m)| (*l, m))
        .collect();
    ranked.sort_by(|(la, a), (lb, b)| {
        (a.index != chosen.unwrap_or(usize::MAX))
            .cmp(&(b.index != chosen.unwrap_or(usize::MAX)))
            .then(la.cmp(lb))
            .then(b.effective().cmp(&a.effective()))
            // Input order breaks ties (the gateway lists clusters by name): no string compare.
            .then(a.index.cmp(&b.index))
    });
    let mut held: Vec<(usize, &Member<'_>)> = members
        .iter()
        .filter(|(_, m)| m.eligible && m.hold_down.is_some())
        .map(|(l, m)| (*l, m))
        .collect();
    held.sort_by(|(la, a), (lb, b)| la.cmp(lb).then(a.index.cmp(&b.index)));
    let mut last_resort: Vec<(usize, &Member<'_>)> = Vec::new();
    if ranked.is_empty() && held.is_empty() {
        last_resort = members
            .iter()
            .filter(|(_, m)| m.ejected.is_some())
            .map(|(l, m)| (*l, m))
            .collect();
        // The one ejected soonest is closest to being trusted again.
        last_resort.sort_by(|(la, a), (lb, b)| a.ejected.cmp(&b.ejected).then(la.cmp(lb)));
    }

    let mut order = Vec::with_capacity(ranked.len() + held.len() + last_resort.len());
    for (rank, (level, m)) in ranked.iter().chain(&held).chain(&last_resort).enumerate() {
        let share_ppm = if m.effective() == 0 {
            0
        } else {
            levels[*level].share * m.effective() / levels[*level].effective.max(1)
        };
        let note = match (m.hold_down, m.ejected) {
            (Some(until), _) => Some(Note::HoldDown { until }),
            (None, Some(until)) => Some(Note::LastResort {
                ejected_until: until,
            }),
            _ => None,
        };
        verdicts[m.index] = Some(Verdict::Candidate {
            rank,
            level: *level,
            share_ppm,
            weight: m.weight,
            note,
        });
        order.push(m.state.cluster.clone());
    }

    let explanations = clusters
        .iter()
        .zip(verdicts)
        .map(|(state, verdict)| Explanation {
            cluster: state.cluster.clone(),
            verdict: verdict.expect(
                "every cluster got a verdict: excluded, ranked, or ejected (excluded unless a last resort)",
            ),
        })
        .collect();
    Decision {
        order,
        explanations,
        max_attempts: policy.retry.max_attempts,
    }
}

/// Why an otherwise placed cluster cannot take a new connection now, ejection aside.
fn exclusion(
    state: &ClusterState,
    is_local: bool,
    policy: &PolicyRecord,
    health: &Health,
    view: &TargetView,
    drills: &[&DrillRecord],
) -> Option<Excluded> {
    let cluster = &state.cluster;
    for d in drills.iter().filter(|d| &d.cluster == cluster) {
        match d.kind {
            DrillKind::Fail => {
                return Some(Excluded::FailedByDrill {
                    who: d.who.clone(),
                    why: d.why.clone(),
                    expires: d.expires,
                });
            }
            DrillKind::Drain => {
                return Some(Excluded::DrainedByDrill {
                    who: d.who.clone(),
                    why: d.why.clone(),
                    expires: d.expires,
                });
            }
            DrillKind::Pin => {}
        }
    }
    if state.endpoints_healthy == 0 {
        return Some(Excluded::NoHealthyEndpoints);
    }
    let min = &policy.min_healthy;
    if state.endpoints_healthy < min.endpoints
        || u64::from(state.endpoints_healthy) * 100
            < u64::from(min.percent) * u64::from(state.endpoints_total)
    {
        return Some(Excluded::BelowHealthyMinimum {
            healthy: state.endpoints_healthy,
            total: state.endpoints_total,
        });
    }
    if !is_local {
        if state.gateways == 0 {
            return Some(Excluded::NoGateway);
        }
        if let Some(PeerSignal::Down { since }) = health.peer(cluster) {
            return Some(Excluded::PeerDown { since });
        }
    }
    let (active, pending) = (view.active, view.pending);
    if active >= policy.circuit.max_connections || pending >= policy.circuit.max_pending {
        return Some(Excluded::CircuitOpen { active, pending });
    }
    None
}

/// The default level of each cluster: 0 for ours, 1 for our zone, 2 for our region, then one
/// level each for the rest, nearest (by RTT) first; clusters never measured go last, in input order (the gateway lists them by name).
fn default_levels(local: &Locality, clusters: &[ClusterState], health: &Health) -> Vec<usize> {
    let rtt = |c: &ClusterName| match health.peer(c) {
        Some(PeerSignal::Up { rtt }) => rtt,
        _ => Duration::MAX,
    };
    let near = |s: &ClusterState| -> Option<usize> {
        if s.cluster == local.cluster {
            Some(0)
        } else if !local.zone.is_empty() && s.zone == local.zone && s.region == local.region {
            Some(1)
        } else if !local.region.is_empty() && s.region == local.region {
            Some(2)
        } else {
            None
        }
    };
    let mut levels: Vec<usize> = clusters.iter().map(|s| near(s).unwrap_or(0)).collect();
    // The far ones: sorted by RTT, then input order (by name), numbered from level 3.
    let mut rest: Vec<(Duration, usize)> = clusters
        .iter()
        .enumerate()
        .filter(|(_, s)| near(s).is_none())
        .map(|(i, s)| (rtt(&s.cluster), i))
        .collect();
    rest.sort_unstable();
    for (position, (_, i)) in rest.into_iter().enumerate() {
        levels[i] = 3 + position;
    }
    levels
}

impl fmt::Display for Excluded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Excluded::PinnedElsewhere { to, who } => {
                write!(f, "pinned to {to} by a drill of {who}")
            }
            Excluded::FailedByDrill { who, why, expires } => {
                write!(f, "failed by a drill of {who} ({why}) until {expires}")
            }
            Excluded::DrainedByDrill { who, why, expires } => {
                write!(f, "drained by a drill of {who} ({why}) until {expires}")
            }
            Excluded::ForbidsUs => f.write_str("its export does not allow our cluster"),
            Excluded::LocalOnly => f.write_str("the policy is local-only"),
            Excluded::NotInPolicy => f.write_str("not named by the policy's levels"),
            Excluded::NoHealthyEndpoints => f.write_str("no healthy endpoints"),
            Excluded::BelowHealthyMinimum { healthy, total } => {
                write!(
                    f,
                    "{healthy} of {total} endpoints healthy, below the policy's minimum"
                )
            }
            Excluded::NoGateway => f.write_str("no gateway that is not draining"),
            Excluded::PeerDown { .. } => f.write_str("the connection to its gateways is down"),
            Excluded::CircuitOpen { active, pending } => {
                write!(f, "circuit open ({active} active, {pending} opening)")
            }
            Excluded::Ejected { .. } => f.write_str("ejected by outlier detection"),
        }
    }
}

//! Failovers and ejections as events: what changed in the steering of each service between
//! two looks at the decision.
//!
//! Detection is pure: [`Steered::of`] reduces one explained decision to what an operator
//! follows (the level and cluster new connections mainly go to, the clusters outlier
//! detection ejected), and [`changes`] compares two maps of them. The task in [`run`] only
//! asks the decision again on every catalog or export change, on an ejection and once a
//! second (health moves without the catalog), publishes the changes on a broadcast channel
//! (`WatchEvents` subscribes) and counts the failovers. One detector per gateway, however
//! many watchers: the counter counts each change once.
//!
//! A look decides every followed service, except after catalog churn alone (exports,
//! VIPs): then only the services whose view changed ([`scope`]); the look once a second
//! still decides them all.
//!
//! Limits: an ejection, a drill or a policy change is looked at as soon as it happens; a
//! failover that follows catalog churn (exports, gateways, VIPs) is seen at most
//! [`MIN_LOOK_INTERVAL`] after the look before, and one that flips back between two looks is
//! not seen; at most [`MAX_SERVICES`] services are followed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_policy::{Decision, Verdict};
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::Proxy;
use super::route::Route;
use crate::tunnel::metrics::Label;

/// Most services the detector follows (each costs one decision per look).
pub const MAX_SERVICES: usize = 1000;
/// How often the detector looks without a catalog change or an ejection.
pub const POLL: Duration = Duration::from_secs(1);
/// The shortest time between two looks: changes that arrive sooner are seen together by the
/// next look. Under a catalog churn of 100 changes a second, a look per change (up to
/// [`MAX_SERVICES`] decisions each) took a third of a gateway's CPU (docs/scale.md).
pub const MIN_LOOK_INTERVAL: Duration = Duration::from_millis(250);
/// Changes kept for a slow watcher before it is told it lagged.
pub const CHANNEL_CAPACITY: usize = 1024;

/// What an operator follows of one service's steering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Steered {
    /// The priority level of the cluster tried first (`None`: no cluster can serve).
    pub level: Option<usize>,
    /// The cluster that gets the largest share of new connections.
    pub target: Option<ClusterName>,
    /// Clusters ejected by outlier detection (left out, or kept only as a last resort), and
    /// until when.
    pub ejected: BTreeMap<ClusterName, Instant>,
}

impl Steered {
    /// Reduces one decision; `ejected_until` says until when outlier detection ejected a
    /// cluster (asked of the health state, because a cluster that is also out for another
    /// reason, such as no healthy endpoint, does not show its ejection in the verdict).
    pub fn of(
        decision: &Decision,
        ejected_until: impl Fn(&ClusterName) -> Option<Instant>,
    ) -> Self {
        let level = decision.explanations.iter().find_map(|e| match e.verdict {
            Verdict::Candidate { rank: 0, level, .. } => Some(level),
            _ => None,
        });
        let ejected = decision
            .explanations
            .iter()
            .filter_map(|e| ejected_until(&e.cluster).map(|until| (e.cluster.clone(), until)))
            .collect();
        Self {
            level,
            target: decision.main_target().cloned(),
            ejected,
        }
    }
}

/// A change in a service's steering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SteeringChange {
    /// The cluster (or the level) new connections mainly go to changed: a failover, or a
    /// failback.
    Failover {
        service: ServiceKey,
        from: Option<ClusterName>,
        from_level: Option<usize>,
        to: Option<ClusterName>,
        to_level: Option<usize>,
    },
    /// Outlier detection ejected `cluster` for `service`, for `duration`.
    Ejected {
        service: ServiceKey,
        cluster: ClusterName,
        duration: Duration,
    },
    /// `cluster`'s ejection for `service` ended.
    Returned {
        service: ServiceKey,
        cluster: ClusterName,
    },
}

/// Every change from `old` to `new`, by service, failovers before ejections. A service that
/// is new or gone has no changes (the catalog events say it). An ejection whose end moved is
/// a new ejection.
pub fn changes(
    old: &BTreeMap<ServiceKey, Steered>,
    new: &BTreeMap<ServiceKey, Steered>,
    now: Instant,
) -> Vec<SteeringChange> {
    let mut out = Vec::new();
    for (service, now_state) in new {
        let Some(was) = old.get(service) else {
            continue;
        };
        if (&was.target, was.level) != (&now_state.target, now_state.level) {
            out.push(SteeringChange::Failover {
                service: service.clone(),
                from: was.target.clone(),
                from_level: was.level,
                to: now_state.target.clone(),
                to_level: now_state.level,
            });
        }
        for (cluster, until) in &now_state.ejected {
            if was.ejected.get(cluster) != Some(until) {
                out.push(SteeringChange::Ejected {
                    service: service.clone(),
                    cluster: cluster.clone(),
                    duration: until.saturating_duration_since(now),
                });
            }
        }
        for cluster in was.ejected.keys() {
            if !now_state.ejected.contains_key(cluster) {
                out.push(SteeringChange::Returned {
                    service: service.clone(),
                    cluster: cluster.clone(),
                });
            }
        }
    }
    out
}

/// Which services a look decides again.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    /// Every followed service.
    Every,
    /// Only these (their views changed); the others' decisions cannot have moved.
    Only(Vec<ServiceKey>),
}

/// What the next look must decide: every service when `every` (this cluster's exports
/// changed, an ejection, the periodic look that follows health and time) or when something
/// every decision reads changed between `looked_at` and `now` (an operator's record, a
/// gateway); else only the services whose view changed, found by a diff of the persistent
/// maps. Under churn of one service, a look decides one service, not a thousand.
fn scope(looked_at: &Snapshot, now: &Snapshot, every: bool) -> Scope {
    if every {
        return Scope::Every;
    }
    match now.steering_changed_since(looked_at) {
        None => Scope::Every,
        Some(services) => Scope::Only(services),
    }
}

/// One service's steering now, as a new connection would get it; `None` when the service
/// is gone or has no port.
fn look_at(proxy: &Proxy, snapshot: &Snapshot, service: &ServiceKey) -> Option<Steered> {
    let port = snapshot.service(service)?.ports.first()?.port;
    let route = Route {
        service: service.clone(),
        port,
        target: None,
    };
    let decision = proxy.explain_now(&route);
    let now = Instant::now();
    let st = proxy.steering().lock();
    Some(Steered::of(&decision, |c| {
        st.health.ejected_until(service, c, now)
    }))
}

/// Every followed service's steering now, as a new connection would get it.
fn look(proxy: &Proxy) -> BTreeMap<ServiceKey, Steered> {
    let snapshot = proxy.inner.snapshots.borrow().clone();
    snapshot
        .services()
        .take(MAX_SERVICES)
        .filter_map(|svc| Some((svc.key.clone(), look_at(proxy, &snapshot, &svc.key)?)))
        .collect()
}

/// The steering of `services` now, and `last` brought up to date: a service gone (or
/// without a port) leaves it; a new one joins while fewer than [`MAX_SERVICES`] are
/// followed (the next whole look restores the first [`MAX_SERVICES`] in name order).
fn look_only(
    proxy: &Proxy,
    services: &[ServiceKey],
    last: &mut BTreeMap<ServiceKey, Steered>,
) -> BTreeMap<ServiceKey, Steered> {
    let snapshot = proxy.inner.snapshots.borrow().clone();
    let mut now_states = BTreeMap::new();
    for service in services {
        match look_at(proxy, &snapshot, service) {
            Some(st) if last.contains_key(service) || last.len() < MAX_SERVICES => {
                now_states.insert(service.clone(), st);
            }
            Some(_) => {}
            None => {
                last.remove(service);
            }
        }
    }
    now_states
}

/// Looks until `stop`, publishing and counting every change.
pub(super) async fn run(
    proxy: Proxy,
    tx: broadcast::Sender<SteeringChange>,
    stop: CancellationToken,
) {
    let mut snapshots = proxy.inner.snapshots.clone();
    let mut exports = proxy.inner.exports.clone();
    let steering = proxy.inner.steering.clone();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut looked_at = snapshots.borrow_and_update().clone();
    let mut last = look(&proxy);
    let mut looked = tokio::time::Instant::now();
    loop {
        // An operator's action (a drill, a policy) and an ejection are looked at at once, so
        // that even a drill stopped a moment after it started shows its failover; catalog
        // churn (exports, gateways, VIPs) waits for MIN_LOOK_INTERVAL since the last look.
        let mut every = false;
        let at_once = tokio::select! {
            _ = stop.cancelled() => return,
            r = snapshots.changed() => {
                if r.is_err() {
                    return;
                }
                snapshots.borrow_and_update().operator_records_differ(&looked_at)
            }
            r = exports.changed() => {
                if r.is_err() {
                    return;
                }
                exports.borrow_and_update();
                every = true;
                false
            }
            _ = steering.changed.notified() => {
                every = true;
                true
            }
            _ = tick.tick() => {
                every = true;
                false
            }
        };
        if !at_once {
            let due = looked + MIN_LOOK_INTERVAL;
            let wait = wait_to_look(due, &mut snapshots, &looked_at, &steering.changed, &stop);
            match wait.await {
                None => return,
                Some(early) => every |= early,
            }
        }
        // What changed while waiting is seen by this look, not by another one right after.
        let snapshot = snapshots.borrow_and_update().clone();
        let scope = scope(&looked_at, &snapshot, every);
        looked_at = snapshot;
        exports.borrow_and_update();
        looked = tokio::time::Instant::now();
        let now_states = match &scope {
            Scope::Every => look(&proxy),
            Scope::Only(services) => look_only(&proxy, services, &mut last),
        };
        for change in changes(&last, &now_states, Instant::now()) {
            if let SteeringChange::Failover { service, to, .. } = &change {
                tracing::info!(%service, to = ?to, "main target changed");
                steering
                    .metrics
                    .failovers
                    .get_or_create(
                        &super::steer::ServiceLabels::new(service, &steering.local.cluster)
                            .to(Label::cluster_or_none(to.as_ref())),
                    )
                    .inc();
            }
            // No receiver (no watcher) is fine: the counter still counted.
            let _ = tx.send(change);
        }
        match scope {
            Scope::Every => last = now_states,
            Scope::Only(_) => last.extend(now_states),
        }
    }
}

/// Waits until `due`, or less if an operator's record (a drill, a policy, a routing rule)
/// differs from `looked_at`'s or an ejection notifies `changed` first: `Some(true)` then,
/// `Some(false)` at `due`. `None`: stopped, or the catalog is gone.
async fn wait_to_look(
    due: tokio::time::Instant,
    snapshots: &mut watch::Receiver<Arc<Snapshot>>,
    looked_at: &Snapshot,
    changed: &Notify,
    stop: &CancellationToken,
) -> Option<bool> {
    loop {
        let at_once = tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep_until(due) => return Some(false),
            r = snapshots.changed() => {
                r.ok()?;
                snapshots.borrow_and_update().operator_records_differ(looked_at)
            }
            _ = changed.notified() => true,
        };
        if at_once {
            return Some(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).expect("cluster")
    }

    fn svc() -> ServiceKey {
        "pay.prod".parse().expect("key")
    }

    fn state(level: Option<usize>, target: Option<&str>, ejected: &[(&str, Instant)]) -> Steered {
        Steered {
            level,
            target: target.map(c),
            ejected: ejected.iter().map(|(n, t)| (c(n), *t)).collect(),
        }
    }

    /// `(what arrives, after how many ms) → ms waited` (the wait is due at 250 ms).
    #[tokio::test(start_paused = true)]
    async fn catalog_churn_waits_for_the_interval_and_an_operators_action_does_not() {
        use meshup_core::catalog::Change;
        use meshup_core::fixture;
        use meshup_core::names::DrillId;
        use meshup_core::policy::DrillKind;
        enum Arrives {
            Nothing,
            ExportChange,
            Drill,
            Ejection,
        }
        let cases = [
            (Arrives::Nothing, 0, 250),
            (Arrives::ExportChange, 10, 250),
            (Arrives::Drill, 10, 10),
            (Arrives::Ejection, 40, 40),
        ];
        for (arrives, after, want) in cases {
            let base = fixture::snapshot(vec![fixture::put_export(
                "west",
                "w1",
                "pay.prod",
                fixture::export(8080, 1),
            )]);
            let (tx, mut rx) = watch::channel(Arc::new(base.clone()));
            let looked_at = rx.borrow_and_update().clone();
            let changed = Arc::new(Notify::new());
            let stop = CancellationToken::new();
            let start = tokio::time::Instant::now();
            let send = {
                let changed = changed.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(after)).await;
                    let mut next = base;
                    match arrives {
                        Arrives::Nothing => {}
                        Arrives::ExportChange => {
                            next.apply(fixture::put_export(
                                "south",
                                "s1",
                                "pay.prod",
                                fixture::export(8080, 1),
                            ));
                        }
                        Arrives::Drill => {
                            next.apply(Change::PutDrill(
                                DrillId::new("fail-west").expect("id"),
                                Arc::new(fixture::drill(DrillKind::Fail, "west")),
                            ));
                        }
                        Arrives::Ejection => changed.notify_waiters(),
                    }
                    if !matches!(arrives, Arrives::Nothing | Arrives::Ejection) {
                        tx.send_replace(Arc::new(next));
                    }
                    // Keep the channel open for the rest of the wait.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            let due = start + MIN_LOOK_INTERVAL;
            let ((early, waited), ()) = tokio::join!(
                async {
                    let early = wait_to_look(due, &mut rx, &looked_at, &changed, &stop)
                        .await
                        .expect("not stopped");
                    (early, start.elapsed())
                },
                send
            );
            assert_eq!(waited, Duration::from_millis(want));
            assert_eq!(
                early,
                want < 250,
                "ended early for an operator or an ejection"
            );
        }
    }

    /// What a look decides again after each kind of change, and always everything when
    /// the look was asked for everything (the periodic look, an ejection, this cluster's
    /// exports).
    #[test]
    fn a_look_after_churn_decides_only_the_services_that_changed() {
        use meshup_core::fixture;
        let base = fixture::steering_base();
        for case in fixture::steering_cases() {
            let next = case.applied_to(&base);
            let want = match case.changed {
                Some(keys) => Scope::Only(keys.into_iter().map(fixture::service).collect()),
                None => Scope::Every,
            };
            assert_eq!(scope(&base, &next, false), want, "{}", case.what);
            assert_eq!(scope(&base, &next, true), Scope::Every, "{}", case.what);
        }
    }

    #[test]
    fn two_looks_become_failovers_ejections_and_returns() {
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let much_later = now + Duration::from_secs(60);
        let failover = |from: Option<&str>, fl, to: Option<&str>, tl| SteeringChange::Failover {
            service: svc(),
            from: from.map(c),
            from_level: fl,
            to: to.map(c),
            to_level: tl,
        };
        let ejected = |n: &str, secs| SteeringChange::Ejected {
            service: svc(),
            cluster: c(n),
            duration: Duration::from_secs(secs),
        };
        let returned = |n: &str| SteeringChange::Returned {
            service: svc(),
            cluster: c(n),
        };
        // (before, after, changes)
        let table: Vec<(Steered, Steered, Vec<SteeringChange>)> = vec![
            // Nothing moved.
            (
                state(Some(0), Some("west"), &[]),
                state(Some(0), Some("west"), &[]),
                vec![],
            ),
            // West ejected: traffic fails over to north on level 1.
            (
                state(Some(0), Some("west"), &[]),
                state(Some(1), Some("north"), &[("west", later)]),
                vec![
                    failover(Some("west"), Some(0), Some("north"), Some(1)),
                    ejected("west", 30),
                ],
            ),
            // Still ejected, same end: nothing new.
            (
                state(Some(1), Some("north"), &[("west", later)]),
                state(Some(1), Some("north"), &[("west", later)]),
                vec![],
            ),
            // Ejected again (the end moved) without a look in between.
            (
                state(Some(1), Some("north"), &[("west", later)]),
                state(Some(1), Some("north"), &[("west", much_later)]),
                vec![ejected("west", 60)],
            ),
            // Back: failback and the return.
            (
                state(Some(1), Some("north"), &[("west", later)]),
                state(Some(0), Some("west"), &[]),
                vec![
                    failover(Some("north"), Some(1), Some("west"), Some(0)),
                    returned("west"),
                ],
            ),
            // Nowhere to go.
            (
                state(Some(0), Some("west"), &[]),
                state(None, None, &[]),
                vec![failover(Some("west"), Some(0), None, None)],
            ),
            // Same cluster, another level (a policy moved it): still a change of steering.
            (
                state(Some(0), Some("west"), &[]),
                state(Some(1), Some("west"), &[]),
                vec![failover(Some("west"), Some(0), Some("west"), Some(1))],
            ),
        ];
        for (i, (before, after, want)) in table.into_iter().enumerate() {
            let old = BTreeMap::from([(svc(), before)]);
            let new = BTreeMap::from([(svc(), after)]);
            assert_eq!(changes(&old, &new, now), want, "case {i}");
        }
    }

    #[test]
    fn a_decision_reduces_to_its_first_level_main_target_and_ejections() {
        use meshup_policy::{Excluded, Explanation};
        let now = Instant::now();
        let until = now + Duration::from_secs(10);
        let candidate = |rank, level, share_ppm| Verdict::Candidate {
            rank,
            level,
            share_ppm,
            weight: 1,
            note: None,
        };
        let decision = Decision {
            order: vec![c("north"), c("south")],
            explanations: vec![
                Explanation {
                    cluster: c("west"),
                    verdict: Verdict::Excluded(Excluded::Ejected { until }),
                },
                // Out for another reason and ejected too: still an ejection.
                Explanation {
                    cluster: c("east"),
                    verdict: Verdict::Excluded(Excluded::NoHealthyEndpoints),
                },
                Explanation {
                    cluster: c("south"),
                    verdict: candidate(1, 1, 300_000),
                },
                Explanation {
                    cluster: c("north"),
                    verdict: candidate(0, 1, 700_000),
                },
            ],
            max_attempts: 2,
        };
        let ejected = |cl: &ClusterName| (cl == &c("west") || cl == &c("east")).then_some(until);
        assert_eq!(
            Steered::of(&decision, ejected),
            state(Some(1), Some("north"), &[("east", until), ("west", until)])
        );
        let nothing = Decision {
            order: vec![],
            explanations: vec![],
            max_attempts: 1,
        };
        assert_eq!(Steered::of(&nothing, |_| None), Steered::default());
    }

    #[test]
    fn services_that_come_or_go_have_no_steering_changes() {
        let now = Instant::now();
        let some = BTreeMap::from([(svc(), state(Some(0), Some("west"), &[]))]);
        assert!(changes(&BTreeMap::new(), &some, now).is_empty());
        assert!(changes(&some, &BTreeMap::new(), now).is_empty());
    }
}

//! Live health, as this gateway observed it: outcomes of its own attempts per (service,
//! cluster), the state of its QUIC connections per peer cluster, and the counters behind
//! circuit breaking and the retry budget.
//!
//! The catalog's endpoint counts say what a cluster's own gateways believe; these signals say
//! whether this gateway can actually reach it. A cluster's records in the catalog never prove
//! it alive (docs/reliability.md, promise 3), and a peer never seen is unknown, not failed
//! (promise 6).
//!
//! Every method takes `now`; nothing here reads a clock or sleeps.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshup_core::names::{ClusterName, ServiceKey};

use crate::record::{CircuitBreaker, OutlierDetection, RetryPolicy};

/// Length of the window the retry budget counts connections and retries in.
pub const RETRY_WINDOW: Duration = Duration::from_secs(10);
const RETRY_BUCKETS: usize = 10;

/// How one attempt at a cluster ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The peer (or the local endpoint) accepted the connection.
    Success,
    /// It could not be reached, refused for a reason that says it cannot serve (no endpoints,
    /// connect failed, draining), or did not answer in time.
    Failure,
}

/// The state of this gateway's connection to a peer cluster, from the QUIC layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerSignal {
    /// A live connection, with its smoothed RTT.
    Up { rtt: Duration },
    /// The connection was lost or has gone silent, or dialling failed, since `since`.
    Down { since: Instant },
}

/// Outlier and circuit state of one (service, cluster).
#[derive(Debug, Clone, Default)]
struct Target {
    consecutive_failures: u32,
    /// Ejections so far; the next one lasts `base × (ejections + 1)`, up to the maximum.
    ejections: u32,
    ejected_until: Option<Instant>,
    /// Since the last ejection ended, until the next success: one failure ejects again.
    probation: bool,
    /// When the target last became available again (hold-down runs from here).
    recovered_at: Option<Instant>,
    /// Whether the last availability observation said available.
    available: bool,
    pending: u32,
    active: u32,
}

/// Counts of connections and retries in a sliding window of one-second buckets.
#[derive(Debug, Clone, Default)]
struct RetryWindow {
    /// (second since the epoch instant, connections, retries)
    buckets: [(u64, u32, u32); RETRY_BUCKETS],
}

/// Live health of everything this gateway routes to. One task owns it; the decision reads it.
#[derive(Debug, Clone)]
pub struct Health {
    epoch: Instant,
    /// Per service, per cluster: looked up by reference, never by a cloned key.
    targets: BTreeMap<ServiceKey, BTreeMap<ClusterName, Target>>,
    peers: BTreeMap<ClusterName, PeerSignal>,
    /// Per service: each service's retries are budgeted against its own connections.
    retries: BTreeMap<ServiceKey, RetryWindow>,
}

/// What the decision reads of one (service, cluster) at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetView {
    pub ejected_until: Option<Instant>,
    pub held_down_until: Option<Instant>,
    pub active: u32,
    pub pending: u32,
}

/// An ejection that an outcome caused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    pub until: Instant,
    /// The how-many-th ejection of this target (1 for the first).
    pub count: u32,
}

// === impl Health ===

impl Health {
    /// Empty health; `epoch` anchors the retry window's buckets (any instant before `now`).
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            targets: BTreeMap::new(),
            peers: BTreeMap::new(),
            retries: BTreeMap::new(),
        }
    }

    fn target(&self, service: &ServiceKey, cluster: &ClusterName) -> Option<&Target> {
        self.targets.get(service)?.get(cluster)
    }

    fn target_mut(&mut self, service: &ServiceKey, cluster: &ClusterName) -> &mut Target {
        // Keys are cloned only when a target is first seen.
        if !self.targets.contains_key(service) {
            self.targets.insert(service.clone(), BTreeMap::new());
        }
        let of_service = self
            .targets
            .get_mut(service)
            .expect("inserted above if it was missing");
        if !of_service.contains_key(cluster) {
            of_service.insert(
                cluster.clone(),
                Target {
                    available: true,
                    ..Target::default()
                },
            );
        }
        of_service
            .get_mut(cluster)
            .expect("inserted above if it was missing")
    }

    /// Everything the decision reads of one target, in one lookup.
    pub fn view(
        &self,
        service: &ServiceKey,
        cluster: &ClusterName,
        hold_down: Duration,
        now: Instant,
    ) -> TargetView {
        match self.target(service, cluster) {
            None => TargetView::default(),
            Some(t) => TargetView {
                ejected_until: t.ejected_until.filter(|u| *u > now),
                held_down_until: t
                    .recovered_at
                    .map(|at| at + hold_down)
                    .filter(|until| *until > now),
                active: t.active,
                pending: t.pending,
            },
        }
    }

    /// Records the outcome of an attempt. `clusters` is how many clusters currently serve the
    /// service (candidates before ejection): ejection never takes more than
    /// `max_ejected_percent` of them, and never the last one. Returns the ejection this
    /// outcome caused, if any.
    pub fn record(
        &mut self,
        service: &ServiceKey,
        cluster: &ClusterName,
        outcome: Outcome,
        clusters: usize,
        cfg: &OutlierDetection,
        now: Instant,
    ) -> Option<Ejection> {
        let ejected_now = self.targets.get(service).map_or(0, |of_service| {
            of_service
                .iter()
                .filter(|(c, t)| *c != cluster && t.ejected_until.is_some_and(|u| u > now))
                .count()
        });
        let t = self.target_mut(service, cluster);
        if t.ejected_until.is_some_and(|u| u <= now) {
            // The ejection is over: the target is back, on probation.
            t.ejected_until = None;
            t.probation = true;
        }
        match outcome {
            Outcome::Success => {
                t.consecutive_failures = 0;
                t.probation = false;
                None
            }
            Outcome::Failure => {
                if t.ejected_until.is_some() {
                    return None; // already out; late outcomes of old attempts change nothing
                }
                t.consecutive_failures = t.consecutive_failures.saturating_add(1);
                let due = t.probation || t.consecutive_failures >= cfg.consecutive_failures;
                let allowed_share = clusters * cfg.max_ejected_percent as usize / 100;
                let allowed = ejected_now < allowed_share && ejected_now + 1 < clusters;
                if !due || !allowed {
                    return None;
                }
                t.ejections = t.ejections.saturating_add(1);
                let length = cfg
                    .base_ejection
                    .saturating_mul(t.ejections)
                    .min(cfg.max_ejection);
                let until = now + length;
                t.ejected_until = Some(until);
                t.consecutive_failures = 0;
                t.probation = false;
                // Back at `until`; the hold-down runs from then.
                t.recovered_at = Some(until);
                Some(Ejection {
                    until,
                    count: t.ejections,
                })
            }
        }
    }

    /// Until when the target is ejected, if it is at `now`.
    pub fn ejected_until(
        &self,
        service: &ServiceKey,
        cluster: &ClusterName,
        now: Instant,
    ) -> Option<Instant> {
        self.target(service, cluster)
            .and_then(|t| t.ejected_until)
            .filter(|u| *u > now)
    }

    /// Ejections of the target so far.
    pub fn ejections(&self, service: &ServiceKey, cluster: &ClusterName) -> u32 {
        self.target(service, cluster).map_or(0, |t| t.ejections)
    }

    /// Feeds whether the target is available by every other signal (catalog endpoints, peer
    /// connection, drills). A transition back to available starts its hold-down; returns
    /// whether this observation was one, so a decision taken before it can be taken again.
    pub fn observe_available(
        &mut self,
        service: &ServiceKey,
        cluster: &ClusterName,
        available: bool,
        now: Instant,
    ) -> bool {
        let t = self.target_mut(service, cluster);
        let recovered = available && !t.available;
        if recovered {
            // Never earlier than an ejection's end: a cluster seen alive again while still
            // ejected holds down from the end of its ejection, not from now.
            t.recovered_at = Some(t.recovered_at.map_or(now, |at| at.max(now)));
        }
        t.available = available;
        recovered
    }

    /// Until when the target is held down after recovering, if it is at `now`.
    pub fn held_down_until(
        &self,
        service: &ServiceKey,
        cluster: &ClusterName,
        hold_down: Duration,
        now: Instant,
    ) -> Option<Instant> {
        self.target(service, cluster)
            .and_then(|t| t.recovered_at)
            .map(|at| at + hold_down)
            .filter(|until| *until > now)
    }

    /// The latest QUIC-level signal of a peer cluster.
    pub fn observe_peer(&mut self, cluster: &ClusterName, signal: PeerSignal) {
        self.peers.insert(cluster.clone(), signal);
    }

    /// What is known of a peer cluster's connection; `None` until first seen.
    pub fn peer(&self, cluster: &ClusterName) -> Option<PeerSignal> {
        self.peers.get(cluster).copied()
    }

    /// Forgets what is known of a peer cluster's connection (its gateways changed and none
    /// was seen yet): unknown again, not failed. Outlier state is kept.
    pub fn clear_peer(&mut self, cluster: &ClusterName) {
        self.peers.remove(cluster);
    }

    /// Forgets a peer cluster that left the catalog.
    pub fn forget_peer(&mut self, cluster: &ClusterName) {
        self.peers.remove(cluster);
        for of_service in self.targets.values_mut() {
            of_service.remove(cluster);
        }
    }

    /// An attempt at the target started (it is pending until `attempt_finished`).
    pub fn attempt_started(&mut self, service: &ServiceKey, cluster: &ClusterName) {
        let t = self.target_mut(service, cluster);
        t.pending = t.pending.saturating_add(1);
    }

    /// Starts an attempt at the target if its circuit is closed: fewer than `max_connections`
    /// active and fewer than `max_pending` opening. Over the limit nothing is counted and the
    /// load is returned as (active, pending), for the refusal's metric and log line.
    pub fn try_start(
        &mut self,
        service: &ServiceKey,
        cluster: &ClusterName,
        circuit: &CircuitBreaker,
    ) -> Result<(), (u32, u32)> {
        let t = self.target_mut(service, cluster);
        if t.active >= circuit.max_connections || t.pending >= circuit.max_pending {
            return Err((t.active, t.pending));
        }
        t.pending = t.pending.saturating_add(1);
        Ok(())
    }

    /// An attempt ended; `connected` means a connection is now active at the target.
    pub fn attempt_finished(
        &mut self,
        service: &ServiceKey,
        cluster: &ClusterName,
        connected: bool,
    ) {
        let t = self.target_mut(service, cluster);
        t.pending = t.pending.saturating_sub(1);
        if connected {
            t.active = t.active.saturating_add(1);
        }
    }

    /// An active connection at the target ended.
    pub fn connection_ended(&mut self, service: &ServiceKey, cluster: &ClusterName) {
        let t = self.target_mut(service, cluster);
        t.active = t.active.saturating_sub(1);
    }

    /// (active, pending) at the target.
    pub fn load(&self, service: &ServiceKey, cluster: &ClusterName) -> (u32, u32) {
        self.target(service, cluster)
            .map_or((0, 0), |t| (t.active, t.pending))
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn bucket(&mut self, service: &ServiceKey, now: Instant) -> &mut (u64, u32, u32) {
        let second = self.second(now);
        if !self.retries.contains_key(service) {
            self.retries.insert(service.clone(), RetryWindow::default());
        }
        let window = self
            .retries
            .get_mut(service)
            .expect("inserted above if it was missing");
        let slot = &mut window.buckets[(second % RETRY_BUCKETS as u64) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    fn window(&self, service: &ServiceKey, now: Instant) -> (u32, u32) {
        let second = self.second(now);
        self.retries.get(service).map_or((0, 0), |w| {
            w.buckets
                .iter()
                .filter(|(s, _, _)| *s + (RETRY_BUCKETS as u64) > second && *s <= second)
                .fold((0, 0), |(c, r), (_, bc, br)| (c + bc, r + br))
        })
    }

    /// A new client connection for `service` arrived (the base of its retry budget).
    pub fn connection_arrived(&mut self, service: &ServiceKey, now: Instant) {
        let b = self.bucket(service, now);
        b.1 = b.1.saturating_add(1);
    }

    /// Whether a retry for `service` may be made now; if so it is counted. Retries in the
    /// window stay below `budget_percent` of the service's connections in it, but
    /// `min_retries` per second of the window are always allowed, so a quiet service can
    /// still fail over. Each service has its own budget: a busy one lends none to a failing
    /// quiet one.
    pub fn take_retry(&mut self, service: &ServiceKey, policy: &RetryPolicy, now: Instant) -> bool {
        let (connections, retries) = self.window(service, now);
        let budget = (connections as u64 * u64::from(policy.budget_percent) / 100)
            .max(u64::from(policy.min_retries) * RETRY_WINDOW.as_secs());
        if u64::from(retries) >= budget {
            return false;
        }
        let b = self.bucket(service, now);
        b.2 = b.2.saturating_add(1);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc() -> ServiceKey {
        "pay.prod".parse().expect("key")
    }
    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).expect("name")
    }
    fn cfg() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times_and_probation_re_ejects() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let (s, west) = (svc(), c("west"));
        let fail = |h: &mut Health, at: Duration| {
            h.record(&s, &west, Outcome::Failure, 2, &cfg(), t0 + at)
        };
        // Two failures, a success, two failures: never three in a row.
        assert_eq!(fail(&mut h, Duration::ZERO), None);
        assert_eq!(fail(&mut h, Duration::from_millis(1)), None);
        assert_eq!(h.record(&s, &west, Outcome::Success, 2, &cfg(), t0), None);
        assert_eq!(fail(&mut h, Duration::from_millis(2)), None);
        assert_eq!(fail(&mut h, Duration::from_millis(3)), None);
        // The third in a row ejects for the base time.
        let first = fail(&mut h, Duration::from_secs(1)).expect("ejected");
        assert_eq!(
            first,
            Ejection {
                until: t0 + Duration::from_secs(11),
                count: 1
            }
        );
        assert_eq!(
            h.ejected_until(&s, &west, t0 + Duration::from_secs(5)),
            Some(first.until)
        );
        // Failures while ejected (late outcomes) change nothing.
        assert_eq!(fail(&mut h, Duration::from_secs(2)), None);
        // Back at 11 s, on probation: one failure ejects again, for twice as long.
        assert_eq!(
            h.ejected_until(&s, &west, t0 + Duration::from_secs(11)),
            None
        );
        let second = fail(&mut h, Duration::from_secs(12)).expect("re-ejected");
        assert_eq!(
            second,
            Ejection {
                until: t0 + Duration::from_secs(32),
                count: 2
            }
        );
        // The third is capped at the maximum (25 s, not 30 s).
        let third = fail(&mut h, Duration::from_secs(33)).expect("re-ejected");
        assert_eq!(third.until, t0 + Duration::from_secs(58));
        // A success after the ejection ends probation: one failure no longer ejects.
        assert_eq!(
            h.record(
                &s,
                &west,
                Outcome::Success,
                2,
                &cfg(),
                t0 + Duration::from_secs(60)
            ),
            None
        );
        assert_eq!(fail(&mut h, Duration::from_secs(61)), None);
        assert_eq!(h.ejections(&s, &west), 3);
    }

    #[test]
    fn ejection_never_takes_the_last_cluster_nor_more_than_the_share() {
        let t0 = Instant::now();
        let s = svc();
        // (clusters serving the service, max ejected %, how many of them fail) → ejected
        let table = [
            (1, 100, 1, 0),
            (2, 100, 2, 1),
            (2, 50, 2, 1),
            (4, 50, 4, 2),
            (4, 10, 4, 0),
            (3, 100, 3, 2),
        ];
        for (clusters, pct, failing, want) in table {
            let mut h = Health::new(t0);
            let mut cfg = cfg();
            cfg.max_ejected_percent = pct;
            let mut ejected = 0;
            for i in 0..failing {
                let cl = c(&format!("c{i}"));
                for _ in 0..3 {
                    if h.record(&s, &cl, Outcome::Failure, clusters, &cfg, t0)
                        .is_some()
                    {
                        ejected += 1;
                    }
                }
            }
            assert_eq!(
                ejected, want,
                "{clusters} clusters, {pct} %, {failing} failing"
            );
        }
    }

    #[test]
    fn recovery_starts_a_hold_down() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let (s, west) = (svc(), c("west"));
        let hold = Duration::from_secs(30);
        assert_eq!(
            h.held_down_until(&s, &west, hold, t0),
            None,
            "never down: no hold-down"
        );
        assert!(!h.observe_available(&s, &west, false, t0));
        assert!(!h.observe_available(&s, &west, false, t0 + Duration::from_secs(5)));
        assert_eq!(
            h.held_down_until(&s, &west, hold, t0 + Duration::from_secs(5)),
            None
        );
        assert!(
            h.observe_available(&s, &west, true, t0 + Duration::from_secs(10)),
            "back: the hold-down starts"
        );
        let until = t0 + Duration::from_secs(40);
        assert_eq!(
            h.held_down_until(&s, &west, hold, t0 + Duration::from_secs(39)),
            Some(until)
        );
        assert_eq!(h.held_down_until(&s, &west, hold, until), None);
        // Staying available does not restart it.
        assert!(!h.observe_available(&s, &west, true, t0 + Duration::from_secs(20)));
        assert_eq!(
            h.held_down_until(&s, &west, hold, t0 + Duration::from_secs(39)),
            Some(until)
        );
    }

    #[test]
    fn a_cluster_back_while_ejected_holds_down_from_the_end_of_its_ejection() {
        // A partition: attempts fail (ejected for the base time) and the peer goes down; the
        // link heals while the ejection lasts. The hold-down runs from the ejection's end,
        // not from the heal (tests/tests/link_faults.rs found it cut short before).
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let (s, west) = (svc(), c("west"));
        let hold = Duration::from_secs(10);
        let cfg = cfg();
        let mut ejected = None;
        for _ in 0..cfg.consecutive_failures {
            ejected = h.record(&s, &west, Outcome::Failure, 2, &cfg, t0);
        }
        let until = ejected.expect("ejected after consecutive failures").until;
        assert!(!h.observe_available(&s, &west, false, t0));
        let healed = t0 + Duration::from_secs(5);
        assert!(healed < until, "the heal comes while ejected");
        assert!(h.observe_available(&s, &west, true, healed));
        assert_eq!(
            h.held_down_until(&s, &west, hold, until),
            Some(until + hold),
            "held down for the whole hold-down after the ejection"
        );
        // A heal after the ejection's end holds down from the heal.
        let mut h = Health::new(t0);
        for _ in 0..cfg.consecutive_failures {
            h.record(&s, &west, Outcome::Failure, 2, &cfg, t0);
        }
        assert!(!h.observe_available(&s, &west, false, t0));
        let late = until + Duration::from_secs(5);
        assert!(h.observe_available(&s, &west, true, late));
        assert_eq!(h.held_down_until(&s, &west, hold, late), Some(late + hold));
    }

    #[test]
    fn retries_stay_within_the_budget_of_the_window() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let policy = RetryPolicy {
            max_attempts: 3,
            budget_percent: 20,
            min_retries: 3,
        };
        let (s, other) = (svc(), "ledger.prod".parse().expect("key"));
        // A quiet service still gets its minimum: 3 per second of the 10 s window.
        let taken = (0..100).filter(|_| h.take_retry(&s, &policy, t0)).count();
        assert_eq!(taken, 30);
        // 1000 connections in the window: 20 % of them.
        for _ in 0..1000 {
            h.connection_arrived(&s, t0 + Duration::from_millis(500));
        }
        let taken = (0..500)
            .filter(|_| h.take_retry(&s, &policy, t0 + Duration::from_millis(600)))
            .count();
        assert_eq!(taken, 170, "200 retries in the window, 30 already taken");
        // Another service's budget is its own: the busy one lends it nothing.
        let taken = (0..100)
            .filter(|_| h.take_retry(&other, &policy, t0 + Duration::from_millis(600)))
            .count();
        assert_eq!(taken, 30);
        // Once the window has passed, the old connections and retries no longer count.
        let later = t0 + RETRY_WINDOW + Duration::from_secs(1);
        let taken = (0..100)
            .filter(|_| h.take_retry(&s, &policy, later))
            .count();
        assert_eq!(taken, 30);
    }

    #[test]
    fn circuit_counts_follow_attempts_and_connections() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let (s, west) = (svc(), c("west"));
        h.attempt_started(&s, &west);
        h.attempt_started(&s, &west);
        assert_eq!(h.load(&s, &west), (0, 2));
        h.attempt_finished(&s, &west, true);
        h.attempt_finished(&s, &west, false);
        assert_eq!(h.load(&s, &west), (1, 0));
        h.connection_ended(&s, &west);
        h.connection_ended(&s, &west);
        assert_eq!(h.load(&s, &west), (0, 0), "never below zero");
    }

    #[test]
    fn the_circuit_refuses_over_either_limit_and_counts_nothing_then() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let (s, west) = (svc(), c("west"));
        let circuit = CircuitBreaker {
            max_connections: 2,
            max_pending: 1,
        };
        // (step, expected) in order: one pending at a time, two active at most.
        assert_eq!(h.try_start(&s, &west, &circuit), Ok(()));
        assert_eq!(
            h.try_start(&s, &west, &circuit),
            Err((0, 1)),
            "pending limit"
        );
        h.attempt_finished(&s, &west, true);
        assert_eq!(h.try_start(&s, &west, &circuit), Ok(()));
        h.attempt_finished(&s, &west, true);
        assert_eq!(
            h.try_start(&s, &west, &circuit),
            Err((2, 0)),
            "active limit"
        );
        assert_eq!(h.load(&s, &west), (2, 0), "a refusal counts nothing");
        h.connection_ended(&s, &west);
        assert_eq!(h.try_start(&s, &west, &circuit), Ok(()));
    }

    #[test]
    fn peers_are_unknown_until_seen_and_forgotten_when_gone() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let west = c("west");
        assert_eq!(h.peer(&west), None);
        h.observe_peer(&west, PeerSignal::Down { since: t0 });
        assert_eq!(h.peer(&west), Some(PeerSignal::Down { since: t0 }));
        h.forget_peer(&west);
        assert_eq!(h.peer(&west), None);
    }
}

//! The withdrawal grace: which records a gateway keeps acting on after the catalog lost them.
//!
//! etcd deletes every record of a lease at once when the lease ends, and it ends leases of
//! gateways that are alive too: a member frozen for longer than the TTL (or a leader stopped
//! with a follower) revokes them all when it resumes. Until each gateway notices and
//! publishes again (its next keep-alive or retry, about a second), a peer acting on the raw
//! catalog would drop every service: new connections to the VIPs refused, DNS names gone.
//!
//! So the catalog a gateway *acts on* (DNS answers, VIP listeners, candidates) is the raw
//! catalog plus the gateway and export records that disappeared from it less than
//! [`DEFAULT_WITHDRAWAL_GRACE`] ago, held **only while this gateway has a live, usable QUIC
//! connection to the gateway that published them**. The link is the proof the raw catalog
//! cannot give: the peer is up and answering now. A held record ends
//!
//! - as soon as the record is back in the catalog (the new value takes over; nothing flaps,
//!   the VIP is the same one, it was never released);
//! - when the grace expires;
//! - when the link to its gateway is gone (closed, timed out, never dialled);
//! - at once, and is never held at all, when its gateway's last record said `draining`: a
//!   gateway that stops or hands over marks itself draining before it revokes its lease, and
//!   must get no new connections.
//!
//! The grace runs only while the store answers this gateway. etcd can revoke the leases and
//! then have no leader for seconds (a leader and a follower stopped together: they resume,
//! commit the revocations in their old term, then the third member forces an election). No
//! gateway can publish again until a leader is back, and this one cannot see them do it, so
//! the time the store was silent (from its last answer until it answers again) is added to
//! every hold, the way the rest of the catalog stays as it was while etcd is away
//! (docs/reliability.md, "stale while down"). The link still ends a hold at once.
//!
//! An explicit withdrawal (an unexport, a gateway removed by hand) looks the same as a lost
//! lease from here: while the link is alive it takes effect at most the grace later.
//!
//! [`Grace`] is the pure decision: snapshots, link states and `now` in, the snapshot to act on
//! and the next deadline out. The async driver (the gateway's) only feeds it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use imbl::ordmap::DiffItem;
use meshup_core::catalog::{Change, ExportKey, Snapshot};
use meshup_core::model::{ExportRecord, GatewayRecord};
use meshup_core::names::{ClusterName, GatewayId};

/// Default grace. A gateway whose lease was revoked under it notices at its next keep-alive
/// (every TTL/3, 3.3 s with the default 10 s TTL) or at its next retry while etcd was away
/// (at most 1 s apart), then grants a new lease and writes its records: about 4.5 s at worst
/// with the default TTL, about 1 s with the shortest. 5 s covers both, and bounds how late an
/// explicit unexport takes effect on a peer that still has a link to the exporter.
pub const DEFAULT_WITHDRAWAL_GRACE: Duration = Duration::from_secs(5);
/// Longest grace accepted: a withdrawal must not linger for minutes.
pub const MAX_WITHDRAWAL_GRACE: Duration = Duration::from_secs(60);

/// The peer gateways this gateway has a live, usable QUIC connection to, by (cluster, the
/// address dialled). Connections that are closed or closing (a peer that drained closes its
/// connections) are not in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Links(BTreeSet<(ClusterName, SocketAddr)>);

impl Links {
    /// The links from (cluster, address) pairs.
    pub fn new(links: impl IntoIterator<Item = (ClusterName, SocketAddr)>) -> Self {
        Self(links.into_iter().collect())
    }

    /// Whether the gateway of `record` may keep its withdrawn records: a link to one of its
    /// addresses is alive and it is not draining.
    pub fn carries(&self, record: &GatewayRecord) -> bool {
        !record.draining
            && record
                .quic_addrs
                .iter()
                .any(|addr| self.0.contains(&(record.cluster.clone(), *addr)))
    }
}

/// Which kind of record a withdrawal was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Gateway,
    Export,
}

impl Kind {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Export => "export",
        }
    }
}

/// How one withdrawal ended (or that it was not held at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not held: no live link to its gateway, or its gateway was draining.
    Dropped,
    /// The record came back within the grace.
    Returned,
    /// The grace ran out.
    Expired,
    /// The link to its gateway went (or its gateway record was dropped).
    LinkGone,
}

impl Outcome {
    /// Every outcome, for pre-registering metric series.
    pub const ALL: [Outcome; 4] = [
        Outcome::Dropped,
        Outcome::Returned,
        Outcome::Expired,
        Outcome::LinkGone,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Dropped => "dropped",
            Outcome::Returned => "returned",
            Outcome::Expired => "expired",
            Outcome::LinkGone => "link_gone",
        }
    }
}

/// What [`Grace::update`] decided.
#[derive(Debug, Clone)]
pub struct Update {
    /// The catalog to act on: the raw one, plus the records held.
    pub snapshot: Arc<Snapshot>,
    /// Whether `snapshot` differs from the previous update's (same `Arc` otherwise).
    pub changed: bool,
    /// When the next hold expires: call [`Grace::update`] again then at the latest.
    pub next_deadline: Option<Instant>,
    /// Withdrawals that ended (or were not held) in this update.
    pub ended: Vec<(Kind, Outcome)>,
}

#[derive(Debug, Clone)]
struct Held<R> {
    record: Arc<R>,
    /// When the catalog lost it.
    since: Instant,
    until: Instant,
}

impl<R> Held<R> {
    /// Adds the part of a silence from `silent` to `now` that fell within this hold.
    fn credit(&mut self, silent: Instant, now: Instant) {
        self.until += now.saturating_duration_since(silent.max(self.since));
    }
}

/// The withdrawal grace's state: the last raw catalog and the records held. Pure: time comes
/// in as `now`, links as [`Links`].
#[derive(Debug, Clone)]
pub struct Grace {
    period: Duration,
    raw: Arc<Snapshot>,
    output: Arc<Snapshot>,
    gateways: BTreeMap<(ClusterName, GatewayId), Held<GatewayRecord>>,
    exports: BTreeMap<ExportKey, Held<ExportRecord>>,
    /// The store's last answer, while it is silent.
    silent_since: Option<Instant>,
}

impl Grace {
    /// A grace of `period` (zero: nothing is ever held) starting from the raw catalog `raw`.
    pub fn new(period: Duration, raw: Arc<Snapshot>) -> Self {
        Self {
            period,
            output: raw.clone(),
            raw,
            gateways: BTreeMap::new(),
            exports: BTreeMap::new(),
            silent_since: None,
        }
    }

    /// Records held now (gateways and exports).
    pub fn held(&self) -> usize {
        self.gateways.len() + self.exports.len()
    }

    /// The catalog to act on, as of the last update.
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.output
    }

    /// Takes the raw catalog `raw` (the same `Arc` as before when only links or time moved),
    /// the live `links`, since when the store has been silent (its last answer; `None` while
    /// it answers) and `now`; returns the catalog to act on. No hold expires while the store
    /// is silent, and when it answers again every hold gets the silence added.
    pub fn update(
        &mut self,
        raw: Arc<Snapshot>,
        links: &Links,
        silent_since: Option<Instant>,
        now: Instant,
    ) -> Update {
        match (silent_since, self.silent_since) {
            (Some(since), None) => self.silent_since = Some(since),
            (None, Some(since)) => {
                self.silent_since = None;
                for held in self.gateways.values_mut() {
                    held.credit(since, now);
                }
                for held in self.exports.values_mut() {
                    held.credit(since, now);
                }
            }
            // Still silent: counted from the first answer missed.
            _ => {}
        }
        let silent = self.silent_since.is_some();
        let expired = |until: Instant| !silent && now >= until;
        let mut ended = Vec::new();
        let mut touched = false;
        if !Arc::ptr_eq(&raw, &self.raw) {
            touched = true;
            let previous = std::mem::replace(&mut self.raw, raw.clone());
            if !self.period.is_zero() {
                self.hold_withdrawn(&previous, links, now, &mut ended);
            }
        }

        // Gateways first: an export is held only while its gateway's link carries it.
        let gateways = std::mem::take(&mut self.gateways);
        for (key, held) in gateways {
            let outcome = if raw.gateway(&key.0, &key.1).is_some() {
                Some(Outcome::Returned)
            } else if expired(held.until) {
                Some(Outcome::Expired)
            } else if !links.carries(&held.record) {
                Some(Outcome::LinkGone)
            } else {
                None
            };
            match outcome {
                Some(o) => ended.push((Kind::Gateway, o)),
                None => {
                    self.gateways.insert(key, held);
                }
            }
        }
        let exports = std::mem::take(&mut self.exports);
        for (key, held) in exports {
            let outcome = if raw.export(&key).is_some() {
                Some(Outcome::Returned)
            } else if expired(held.until) {
                Some(Outcome::Expired)
            } else if !self
                .gateway_record(&raw, &key.cluster, &key.gateway)
                .is_some_and(|g| links.carries(g))
            {
                Some(Outcome::LinkGone)
            } else {
                None
            };
            match outcome {
                Some(o) => ended.push((Kind::Export, o)),
                None => {
                    self.exports.insert(key, held);
                }
            }
        }

        let changed = touched || ended.iter().any(|(_, o)| *o != Outcome::Dropped);
        if changed {
            self.output = self.build(&raw);
        }
        Update {
            snapshot: self.output.clone(),
            changed,
            next_deadline: self
                .gateways
                .values()
                .map(|h| h.until)
                .chain(self.exports.values().map(|h| h.until))
                .min()
                .filter(|_| self.silent_since.is_none()),
            ended,
        }
    }

    /// Starts holding what disappeared between `previous` and the current raw catalog.
    fn hold_withdrawn(
        &mut self,
        previous: &Snapshot,
        links: &Links,
        now: Instant,
        ended: &mut Vec<(Kind, Outcome)>,
    ) {
        let until = now + self.period;
        // The persistent maps share what did not change: an unchanged gateway map is one
        // pointer comparison, and only the services the diff yields are walked.
        let gateways = if previous.gateway_map().ptr_eq(self.raw.gateway_map()) {
            None
        } else {
            Some(previous.gateways())
        };
        for gone in gateways
            .into_iter()
            .flatten()
            .filter(|g| self.raw.gateway(&g.cluster, &g.gateway_id).is_none())
        {
            if links.carries(gone) {
                self.gateways.insert(
                    (gone.cluster.clone(), gone.gateway_id.clone()),
                    Held {
                        record: gone.clone(),
                        since: now,
                        until,
                    },
                );
            } else {
                ended.push((Kind::Gateway, Outcome::Dropped));
            }
        }
        // A service whose view is the same `Arc` has the same exports (the snapshot makes a
        // new view whenever one of its exports changes): only changed services are walked.
        let raw = self.raw.clone();
        for item in previous.service_map().diff(raw.service_map()) {
            let service = match item {
                DiffItem::Add(..) => continue,
                DiffItem::Remove(service, _)
                | DiffItem::Update {
                    old: (service, _), ..
                } => service,
            };
            for ((cluster, gateway), record) in previous.exports_of(service) {
                let key = ExportKey {
                    cluster: cluster.clone(),
                    gateway: gateway.clone(),
                    service: service.clone(),
                };
                if raw.export(&key).is_some() {
                    continue;
                }
                let carried = self
                    .gateway_record(&raw, cluster, gateway)
                    .is_some_and(|g| links.carries(g));
                if carried {
                    self.exports.insert(
                        key,
                        Held {
                            record: record.clone(),
                            since: now,
                            until,
                        },
                    );
                } else {
                    ended.push((Kind::Export, Outcome::Dropped));
                }
            }
        }
    }

    /// A gateway's record: the catalog's, or the one held.
    fn gateway_record<'a>(
        &'a self,
        raw: &'a Snapshot,
        cluster: &ClusterName,
        gateway: &GatewayId,
    ) -> Option<&'a Arc<GatewayRecord>> {
        raw.gateway(cluster, gateway).or_else(|| {
            self.gateways
                .get(&(cluster.clone(), gateway.clone()))
                .map(|h| &h.record)
        })
    }

    /// The raw catalog with the held records put back (the raw one itself when none is held).
    fn build(&self, raw: &Arc<Snapshot>) -> Arc<Snapshot> {
        if self.held() == 0 {
            return raw.clone();
        }
        let mut snapshot = Snapshot::clone(raw);
        for held in self.gateways.values() {
            snapshot.apply(Change::PutGateway(held.record.clone()));
        }
        for (key, held) in &self.exports {
            snapshot.apply(Change::PutExport(key.clone(), held.record.clone()));
        }
        Arc::new(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshup_core::fixture::{self, cluster, service};

    const GRACE: Duration = Duration::from_secs(5);

    fn west(draining: bool) -> GatewayRecord {
        GatewayRecord {
            draining,
            ..fixture::gateway("west", "w1")
        }
    }

    /// West's gateway (draining or not) and, with `export`, its export of `echo.prod`.
    fn catalog(gateway: Option<bool>, export: bool) -> Arc<Snapshot> {
        let mut changes = vec![fixture::put_gateway(fixture::gateway("east", "e1"))];
        if let Some(draining) = gateway {
            changes.push(fixture::put_gateway(west(draining)));
        }
        if export {
            changes.push(fixture::put_export(
                "west",
                "w1",
                "echo.prod",
                fixture::export(80, 1),
            ));
        }
        Arc::new(fixture::snapshot(changes))
    }

    fn link(alive: bool) -> Links {
        if alive {
            Links::new([(cluster("west"), west(false).quic_addrs[0])])
        } else {
            Links::default()
        }
    }

    fn answered(s: &Snapshot) -> (bool, bool) {
        let gateway = s
            .gateway(&cluster("west"), &fixture::gateway_id("w1"))
            .is_some();
        (gateway, s.service(&service("echo.prod")).is_some())
    }

    /// One step: the raw catalog (`None`: unchanged), the link, since when the store has been
    /// silent and now (seconds since the start).
    type Step = (Option<Arc<Snapshot>>, bool, Option<u64>, u64);

    #[test]
    fn withdrawn_records_are_held_only_while_the_link_carries_them() {
        let full = || Some(catalog(Some(false), true));
        let lease_lost = || Some(catalog(None, false));
        let unexported = || Some(catalog(Some(false), false));
        let drained = || Some(catalog(Some(true), true));
        use Kind::{Export as E, Gateway as G};
        use Outcome::*;
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<Step>, Vec<((bool, bool), Vec<(Kind, Outcome)>)>)> = vec![
            (
                "lease lost, link alive: held through the grace, then gone",
                vec![
                    (lease_lost(), true, None, 1),
                    (None, true, None, 5),
                    (None, true, None, 6),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((false, false), vec![(G, Expired), (E, Expired)]),
                ],
            ),
            (
                "lease lost, no link: gone at once",
                vec![(lease_lost(), false, None, 1)],
                vec![((false, false), vec![(G, Dropped), (E, Dropped)])],
            ),
            (
                "lease lost, link goes during the grace: gone then",
                vec![(lease_lost(), true, None, 1), (None, false, None, 2)],
                vec![
                    ((true, true), vec![]),
                    ((false, false), vec![(G, LinkGone), (E, LinkGone)]),
                ],
            ),
            (
                "records back within the grace: the new ones take over",
                vec![
                    (lease_lost(), true, None, 1),
                    (full(), true, None, 2),
                    (None, true, None, 9),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![(G, Returned), (E, Returned)]),
                    ((true, true), vec![]),
                ],
            ),
            (
                "gateway back before its export: the export stays held",
                vec![
                    (lease_lost(), true, None, 1),
                    (unexported(), true, None, 2),
                    (full(), true, None, 3),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![(G, Returned)]),
                    ((true, true), vec![(E, Returned)]),
                ],
            ),
            (
                "a draining gateway's records are never held",
                vec![(drained(), true, None, 1), (lease_lost(), true, None, 2)],
                vec![
                    ((true, true), vec![]),
                    ((false, false), vec![(G, Dropped), (E, Dropped)]),
                ],
            ),
            (
                "gateway back draining while its export is held: the export goes",
                vec![
                    (lease_lost(), true, None, 1),
                    (Some(catalog(Some(true), false)), true, None, 2),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, false), vec![(G, Returned), (E, LinkGone)]),
                ],
            ),
            (
                "explicit unexport, link alive: takes effect the grace later",
                vec![
                    (unexported(), true, None, 1),
                    (None, true, None, 5),
                    (None, true, None, 6),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((true, false), vec![(E, Expired)]),
                ],
            ),
            (
                "store silent before the grace ran out: held until it answers, then the rest",
                // Lost at 1 (until 6); the store's last answer was at 2, seen silent at 4;
                // it answers at 10: 8 s of silence added, so the hold lasts until 14.
                vec![
                    (lease_lost(), true, None, 1),
                    (None, true, Some(2), 4),
                    (None, true, Some(2), 9),
                    (None, true, None, 10),
                    (None, true, None, 13),
                    (None, true, None, 14),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((false, false), vec![(G, Expired), (E, Expired)]),
                ],
            ),
            (
                "store silent, then the records come back with it",
                vec![
                    (lease_lost(), true, None, 1),
                    (None, true, Some(1), 6),
                    (full(), true, None, 8),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((true, true), vec![(G, Returned), (E, Returned)]),
                ],
            ),
            (
                "store silent: the link still ends a hold at once",
                vec![(lease_lost(), true, None, 1), (None, false, Some(1), 3)],
                vec![
                    ((true, true), vec![]),
                    ((false, false), vec![(G, LinkGone), (E, LinkGone)]),
                ],
            ),
            (
                "a silence that ended before the loss adds nothing",
                vec![
                    (None, true, Some(0), 1),
                    (lease_lost(), true, None, 2),
                    (None, true, None, 7),
                ],
                vec![
                    ((true, true), vec![]),
                    ((true, true), vec![]),
                    ((false, false), vec![(G, Expired), (E, Expired)]),
                ],
            ),
            (
                "explicit unexport, no link: at once",
                vec![(unexported(), false, None, 1)],
                vec![((true, false), vec![(E, Dropped)])],
            ),
        ];
        for (name, steps, expected) in cases {
            let start = Instant::now();
            let mut grace = Grace::new(GRACE, catalog(Some(false), true));
            let mut raw = grace.snapshot().clone();
            let secs = |s: u64| start + Duration::from_secs(s);
            for (i, ((next, alive, silent, at), (want, want_ended))) in
                steps.into_iter().zip(expected).enumerate()
            {
                if let Some(next) = next {
                    raw = next;
                }
                let update = grace.update(raw.clone(), &link(alive), silent.map(secs), secs(at));
                assert_eq!(
                    answered(&update.snapshot),
                    want,
                    "{name}, step {i}: (gateway, service)"
                );
                let mut ended = update.ended.clone();
                ended.sort();
                assert_eq!(ended, want_ended, "{name}, step {i}: ended");
                if grace.held() == 0 {
                    assert!(
                        Arc::ptr_eq(&update.snapshot, &raw),
                        "{name}, step {i}: raw as is"
                    );
                    assert_eq!(update.next_deadline, None, "{name}, step {i}");
                }
            }
        }
    }

    #[test]
    fn the_deadline_is_the_first_hold_to_expire() {
        let start = Instant::now();
        let mut grace = Grace::new(GRACE, catalog(Some(false), true));
        let update = grace.update(catalog(None, false), &link(true), None, start);
        assert_eq!(update.next_deadline, Some(start + GRACE));
        assert_eq!(grace.held(), 2);
        // The held records are the last ones seen: the view is the one before the loss.
        let before = catalog(Some(false), true);
        assert_eq!(
            update.snapshot.service(&service("echo.prod")),
            before.service(&service("echo.prod"))
        );
    }

    #[test]
    fn no_deadline_while_the_store_is_silent() {
        let start = Instant::now();
        let mut grace = Grace::new(GRACE, catalog(Some(false), true));
        let lost = catalog(None, false);
        let update = grace.update(lost.clone(), &link(true), None, start);
        assert_eq!(update.next_deadline, Some(start + GRACE));
        let later = start + Duration::from_secs(3);
        let silent = grace.update(lost.clone(), &link(true), Some(start), later);
        assert_eq!(silent.next_deadline, None);
        let back = grace.update(lost, &link(true), None, later);
        assert_eq!(back.next_deadline, Some(later + GRACE));
    }

    #[test]
    fn nothing_moved_means_the_same_snapshot() {
        let start = Instant::now();
        let mut grace = Grace::new(GRACE, catalog(Some(false), true));
        let raw = catalog(None, false);
        let first = grace.update(raw.clone(), &link(true), None, start);
        assert!(first.changed);
        let again = grace.update(raw, &link(true), None, start + Duration::from_secs(1));
        assert!(!again.changed);
        assert!(Arc::ptr_eq(&first.snapshot, &again.snapshot));
    }

    #[test]
    fn a_zero_grace_holds_nothing() {
        let mut grace = Grace::new(Duration::ZERO, catalog(Some(false), true));
        let raw = catalog(None, false);
        let update = grace.update(raw.clone(), &link(true), None, Instant::now());
        assert!(Arc::ptr_eq(&update.snapshot, &raw));
        assert_eq!(grace.held(), 0);
    }
}

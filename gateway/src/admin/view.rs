//! What `/status` says and the status page draws: this gateway, the catalog, every cluster
//! with this gateway's links to it, every service with where its new connections go now
//! (level, shares, the clusters left out and why), and the drills in force.
//!
//! [`build`] is pure: it takes the snapshots and the decisions, and `now` as an argument, so
//! the view is table-tested. [`LiveStatus`] only gathers those inputs from the gateway's
//! live channels when a request comes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_federation::watcher::WatcherStatus;
use meshup_policy::{Decision, PeerSignal};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::inbound::LocalExports;
use crate::outbound::{self, PeerLink, route::Route, steer::unix_now};
use crate::readiness::Readiness;

/// What the status page and `/status` show.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusView {
    pub cluster: String,
    pub gateway_id: String,
    pub region: String,
    pub version: String,
    pub ready: bool,
    pub pending: Vec<String>,
    pub draining: bool,
    /// Client connections this gateway is proxying now.
    pub connections_in_flight: usize,
    /// When the view was made (Unix seconds): the page shows how old its picture is.
    pub generated_unix: i64,
    pub catalog: CatalogStatus,
    pub clusters: Vec<ClusterStatus>,
    pub services: Vec<ServiceStatus>,
    /// Drills in force now, soonest expiry first.
    pub drills: Vec<DrillStatus>,
    /// (service, cluster) pairs a new connection would not go to for a reason of health
    /// (ejected, peer down, no healthy endpoints, circuit open, holding down, last resort).
    /// Drills and policy choices are not here: they are decisions, not trouble.
    pub ejections: Vec<EjectionStatus>,
}

/// The catalog as this gateway last saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogStatus {
    pub backend: String,
    pub revision: i64,
    pub synced: bool,
    pub connected: bool,
    /// Seconds since the store last answered; grows while the store is down.
    pub stale_seconds: f64,
    pub services: usize,
    pub exports: usize,
    pub policies: usize,
}

/// One cluster of the federation and this gateway's link to it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub local: bool,
    pub region: String,
    /// The link as the failover decision sees it: `local`, `up`, `down`, or `unknown` (not
    /// dialled yet: peers are not failed before they are tried).
    pub link: &'static str,
    /// Smoothed RTT of the link (the decision's measure, else the best open connection's).
    pub rtt_ms: Option<f64>,
    /// Whether every gateway of the cluster is draining.
    pub draining: bool,
    pub gateways: Vec<GatewayStatus>,
}

/// One gateway of a cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStatus {
    pub id: String,
    pub addrs: Vec<String>,
    pub draining: bool,
    /// Whether this gateway holds a live QUIC connection to it.
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    /// Path MTU of the live connection (UDP payload bytes).
    pub mtu: Option<u16>,
    /// Packets lost on the live connection so far.
    pub lost_packets: Option<u64>,
    /// Packets sent on the live connection so far.
    pub sent_packets: Option<u64>,
    /// `lost_packets / sent_packets` (0 before anything was sent).
    pub loss_ratio: Option<f64>,
    /// MTU black holes detected on the live connection (each drops the MTU to 1200).
    pub black_holes: Option<u64>,
    /// Tunnel streams this gateway has open to it now (client connections it carries).
    pub open_streams: Option<usize>,
    /// Seconds since the live connection's handshake (connections are replaced before half
    /// the peer certificate's lifetime).
    pub connection_age_s: Option<f64>,
}

/// One clusterset service and where its traffic from this cluster goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: Option<String>,
    pub ports: Vec<String>,
    /// (cluster, healthy endpoints, total endpoints)
    pub clusters: Vec<(String, u32, u32)>,
    /// The cluster that gets the largest share of new connections now (`<name> (local)` for
    /// this cluster), if any.
    pub target: Option<String>,
    /// The failover level of that cluster in the policy (0: first choice).
    pub level: Option<u32>,
    /// Every cluster that gets new connections, largest share first.
    pub shares: Vec<ShareStatus>,
    /// Whether a stored policy applies (else the default: nearest first).
    pub policy: bool,
    /// Ids of the drills in force that touch this service.
    pub drills: Vec<String>,
    /// The clusters exporting the service that get no new connections, with the reason.
    pub excluded: Vec<EjectionStatus>,
}

/// One cluster's share of a service's new connections.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ShareStatus {
    pub cluster: String,
    pub level: u32,
    /// Share in percent (0–100).
    pub percent: f64,
}

/// A (service, cluster) pair left out of new connections or tried last, and why.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EjectionStatus {
    pub service: String,
    pub cluster: String,
    /// The decision's fixed code (`ejected`, `peer_down`, `failed_by_drill`, …), the same
    /// the gRPC `Resolve` answers.
    pub code: String,
    pub reason: String,
    /// Until when (Unix seconds), when the reason ends by itself.
    pub until_unix: Option<i64>,
}

/// A drill in force.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct DrillStatus {
    pub id: String,
    pub kind: String,
    pub cluster: String,
    /// The one service it applies to; `None`: every service.
    pub service: Option<String>,
    pub who: String,
    pub why: String,
    pub created_unix: i64,
    pub expires_unix: i64,
}

/// Builds the current status on demand.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> StatusView;
}

/// Codes of verdicts that say a cluster is unwell (as opposed to left out by a drill or the
/// policy): what the page lists under "ejected and unhealthy".
const TROUBLE: &[&str] = &[
    "ejected",
    "last_resort",
    "hold_down",
    "peer_down",
    "no_healthy_endpoints",
    "below_healthy_minimum",
    "no_gateway",
    "circuit_open",
];

/// Everything [`build`] reads: the gateway's own facts and its snapshots at one instant.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub cluster: &'a ClusterName,
    pub gateway_id: &'a str,
    pub region: &'a str,
    pub backend: &'a str,
    pub pending: Vec<String>,
    pub draining: bool,
    pub connections_in_flight: usize,
    pub snapshot: &'a Snapshot,
    pub watcher: &'a WatcherStatus,
    pub links: &'a [PeerLink],
    /// The failover decision's view of each remote cluster's link.
    pub peers: &'a BTreeMap<ClusterName, PeerSignal>,
    /// Each service's decision for a new connection on its first port.
    pub decisions: &'a BTreeMap<ServiceKey, Decision>,
    pub now: Instant,
    pub unix_now: i64,
}

/// The status view of `inputs`. Pure.
pub fn build(inputs: &Inputs<'_>) -> StatusView {
    let snapshot = inputs.snapshot;
    let mut clusters: Vec<ClusterStatus> = snapshot
        .clusters()
        .map(|c| cluster_status(inputs, c))
        .collect();
    if !clusters.iter().any(|c| c.local) {
        clusters.push(ClusterStatus {
            name: inputs.cluster.to_string(),
            local: true,
            region: inputs.region.to_owned(),
            link: "local",
            ..Default::default()
        });
        clusters.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut drills: Vec<DrillStatus> = snapshot
        .drills()
        .filter(|(_, d)| d.active(inputs.unix_now))
        .map(|(id, d)| DrillStatus {
            id: id.to_string(),
            kind: d.kind.as_str().to_owned(),
            cluster: d.cluster.to_string(),
            service: d.service.as_ref().map(ToString::to_string),
            who: d.who.clone(),
            why: d.why.clone(),
            created_unix: d.created,
            expires_unix: d.expires,
        })
        .collect();
    drills.sort_by(|a, b| a.expires_unix.cmp(&b.expires_unix).then(a.id.cmp(&b.id)));
    let services: Vec<ServiceStatus> = snapshot
        .services()
        .map(|svc| {
            let decision = inputs.decisions.get(&svc.key);
            service_status(inputs, svc, decision)
        })
        .collect();
    let ejections = services
        .iter()
        .flat_map(|s| s.excluded.iter())
        .filter(|e| TROUBLE.contains(&e.code.as_str()))
        .cloned()
        .collect();
    let watcher = inputs.watcher;
    StatusView {
        cluster: inputs.cluster.to_string(),
        gateway_id: inputs.gateway_id.to_owned(),
        region: inputs.region.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ready: inputs.pending.is_empty(),
        pending: inputs.pending.clone(),
        draining: inputs.draining,
        connections_in_flight: inputs.connections_in_flight,
        generated_unix: inputs.unix_now,
        catalog: CatalogStatus {
            backend: inputs.backend.to_owned(),
            revision: snapshot.revision,
            synced: watcher.synced,
            connected: watcher.connected,
            stale_seconds: watcher.last_contact.map_or(0.0, |t| {
                inputs.now.saturating_duration_since(t).as_secs_f64()
            }),
            services: snapshot.service_count(),
            exports: snapshot.export_count(),
            policies: snapshot.policies().count(),
        },
        clusters,
        services,
        drills,
        ejections,
    }
}

/// Milliseconds, exact for whole microseconds.
fn ms(d: Duration) -> f64 {
    d.as_nanos() as f64 / 1e6
}

fn cluster_status(inputs: &Inputs<'_>, c: &ClusterName) -> ClusterStatus {
    let snapshot = inputs.snapshot;
    let local = c == inputs.cluster;
    let gateways: Vec<GatewayStatus> = snapshot
        .gateways_of(c)
        .map(|g| {
            let link = inputs
                .links
                .iter()
                .find(|l| l.peer.cluster == g.cluster && g.quic_addrs.contains(&l.peer.addr));
            GatewayStatus {
                id: g.gateway_id.to_string(),
                addrs: g.quic_addrs.iter().map(ToString::to_string).collect(),
                draining: g.draining,
                connected: link.is_some(),
                rtt_ms: link.map(|l| ms(l.rtt)),
                mtu: link.map(|l| l.mtu),
                lost_packets: link.map(|l| l.lost_packets),
                sent_packets: link.map(|l| l.sent_packets),
                loss_ratio: link.map(|l| {
                    if l.sent_packets == 0 {
                        0.0
                    } else {
                        l.lost_packets as f64 / l.sent_packets as f64
                    }
                }),
                black_holes: link.map(|l| l.black_holes),
                open_streams: link.map(|l| l.open_streams),
                connection_age_s: link.map(|l| l.age.as_secs_f64()),
            }
        })
        .collect();
    let (link, rtt_ms) = if local {
        ("local", None)
    } else {
        match inputs.peers.get(c) {
            Some(PeerSignal::Up { rtt }) => ("up", Some(ms(*rtt))),
            Some(PeerSignal::Down { .. }) => ("down", None),
            None => ("unknown", None),
        }
    };
    // A cluster never measured through the decision but with an open connection.
    let rtt_ms = rtt_ms.or_else(|| gateways.iter().filter_map(|g| g.rtt_ms).reduce(f64::min));
    ClusterStatus {
        name: c.to_string(),
        local,
        region: snapshot
            .gateways_of(c)
            .next()
            .map(|g| g.region.clone())
            .unwrap_or_default(),
        link,
        rtt_ms,
        draining: !gateways.is_empty() && gateways.iter().all(|g| g.draining),
        gateways,
    }
}

fn service_status(
    inputs: &Inputs<'_>,
    svc: &meshup_core::catalog::ServiceView,
    decision: Option<&Decision>,
) -> ServiceStatus {
    let snapshot = inputs.snapshot;
    let verdicts = decision.map_or_else(Vec::new, |d| {
        crate::grpc::service::verdicts(d, inputs.now, inputs.unix_now)
    });
    let main = decision.and_then(|d| d.main_target());
    let mut shares: Vec<ShareStatus> = verdicts
        .iter()
        .filter(|v| v.candidate && v.share_ppm > 0)
        .map(|v| ShareStatus {
            cluster: v.cluster.clone(),
            level: u32::try_from(v.level).unwrap_or(0),
            percent: v.share_ppm as f64 / 10_000.0,
        })
        .collect();
    shares.sort_by(|a, b| {
        b.percent
            .total_cmp(&a.percent)
            .then(a.cluster.cmp(&b.cluster))
    });
    let excluded = verdicts
        .iter()
        .filter(|v| v.code != "candidate")
        .map(|v| EjectionStatus {
            service: svc.key.to_string(),
            cluster: v.cluster.clone(),
            code: v.code.clone(),
            reason: v.reason.clone(),
            until_unix: (v.until != 0).then_some(v.until),
        })
        .collect();
    let level = main.and_then(|m| {
        verdicts
            .iter()
            .find(|v| v.candidate && v.cluster == m.as_str())
            .and_then(|v| u32::try_from(v.level).ok())
    });
    ServiceStatus {
        name: svc.key.to_string(),
        vip: snapshot
            .vip(inputs.cluster, &svc.key, None)
            .map(|v| v.to_string()),
        ports: svc
            .ports
            .iter()
            .map(|p| format!("{}/{} {}", p.port, p.protocol.as_str(), p.name))
            .collect(),
        clusters: svc
            .clusters
            .iter()
            .map(|(c, e)| (c.to_string(), e.endpoints_healthy, e.endpoints_total))
            .collect(),
        target: main.map(|c| {
            if c == inputs.cluster {
                format!("{c} (local)")
            } else {
                c.to_string()
            }
        }),
        level,
        shares,
        policy: snapshot.policy(&svc.key).is_some(),
        drills: snapshot
            .drills()
            .filter(|(_, d)| {
                d.active(inputs.unix_now)
                    && d.covers(&svc.key)
                    && svc.clusters.contains_key(&d.cluster)
            })
            .map(|(id, _)| id.to_string())
            .collect(),
        excluded,
    }
}

// === impl LiveStatus ===

/// Gathers the inputs of [`build`] from the gateway's live channels when asked.
#[derive(Debug)]
pub struct LiveStatus {
    pub cluster: ClusterName,
    pub gateway_id: String,
    pub region: String,
    pub backend: String,
    pub readiness: Readiness,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub watcher: watch::Receiver<WatcherStatus>,
    pub exports: watch::Receiver<Arc<LocalExports>>,
    pub draining: watch::Receiver<bool>,
    pub links: watch::Receiver<Arc<Vec<PeerLink>>>,
    pub outbound: outbound::Proxy,
}

impl StatusSource for LiveStatus {
    fn status(&self) -> StatusView {
        let snapshot = self.snapshots.borrow().clone();
        let watcher = self.watcher.borrow().clone();
        let exports = self.exports.borrow().clone();
        let links = self.links.borrow().clone();
        let peers: BTreeMap<ClusterName, PeerSignal> = {
            let st = self.outbound.steering().lock();
            snapshot
                .clusters()
                .filter_map(|c| st.health.peer(c).map(|p| (c.clone(), p)))
                .collect()
        };
        let decisions: BTreeMap<ServiceKey, Decision> = snapshot
            .services()
            .filter_map(|svc| {
                let port = svc.ports.first()?;
                let route = Route {
                    service: svc.key.clone(),
                    port: port.port,
                    target: None,
                };
                Some((
                    svc.key.clone(),
                    self.outbound.explain(&snapshot, &exports, &route),
                ))
            })
            .collect();
        build(&Inputs {
            cluster: &self.cluster,
            gateway_id: &self.gateway_id,
            region: &self.region,
            backend: &self.backend,
            pending: self
                .readiness
                .pending()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            draining: *self.draining.borrow(),
            connections_in_flight: self.outbound.in_flight(),
            snapshot: &snapshot,
            watcher: &watcher,
            links: &links,
            peers: &peers,
            decisions: &decisions,
            now: Instant::now(),
            unix_now: unix_now(),
        })
    }
}

/// How often the view of peer links is refreshed.
pub const LINK_REFRESH: Duration = Duration::from_secs(1);

/// Keeps a snapshot of the live peer links for the status views (the pool answers
/// asynchronously; the admin handlers read this without waiting).
pub fn spawn_link_refresh(
    outbound: outbound::Proxy,
    stop: CancellationToken,
) -> (watch::Receiver<Arc<Vec<PeerLink>>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(LINK_REFRESH);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            tx.send_replace(Arc::new(outbound.links().await));
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use meshup_core::catalog::Change;
    use meshup_core::fixture;
    use meshup_core::model::{ExportRecord, GatewayRecord, SCHEMA_VERSION};
    use meshup_core::policy::{DrillKind, DrillRecord};
    use meshup_policy::{Excluded, Verdict, decide::Explanation};

    use super::*;
    use crate::outbound::PeerKey;

    const NOW_UNIX: i64 = 1_800_000_000;

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).expect("name")
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn svc() -> ServiceKey {
        "pay.prod".parse().expect("key")
    }

    fn gateway(cluster: &str, port: u16, draining: bool) -> Change {
        fixture::put_gateway(GatewayRecord {
            region: format!("r-{cluster}"),
            quic_addrs: vec![addr(port)],
            draining,
            ..fixture::gateway(cluster, &format!("{cluster}-0"))
        })
    }

    fn export(cluster: &str, healthy: u32) -> Change {
        let record = ExportRecord {
            endpoints_total: 2,
            ..fixture::export(8080, healthy)
        };
        fixture::put_export(cluster, &format!("{cluster}-0"), "pay.prod", record)
    }

    fn drill(kind: DrillKind, cluster: &str, created: i64, expires: i64) -> Arc<DrillRecord> {
        Arc::new(DrillRecord {
            schema: SCHEMA_VERSION,
            schema_minor: 0,
            kind,
            cluster: c(cluster),
            service: None,
            who: "<b>ana</b>".into(),
            why: "game day".into(),
            created,
            expires,
        })
    }

    /// east (here), west (up, one connection), north (down, a fail drill), south (draining,
    /// never dialled); pay.prod exported by west and north.
    fn snapshot() -> Snapshot {
        let mut s = Snapshot::new();
        for change in [
            gateway("east", 1000, false),
            gateway("west", 2000, false),
            gateway("north", 3000, false),
            gateway("south", 4000, true),
            export("west", 2),
            export("north", 1),
            Change::PutDrill(
                "fail-north-1".parse().expect("id"),
                drill(DrillKind::Fail, "north", NOW_UNIX - 10, NOW_UNIX + 600),
            ),
            // Ended already: not shown.
            Change::PutDrill(
                "drain-west-1".parse().expect("id"),
                drill(DrillKind::Drain, "west", NOW_UNIX - 900, NOW_UNIX - 300),
            ),
        ] {
            s.apply(change);
        }
        s
    }

    fn decision(now: Instant) -> Decision {
        Decision {
            order: vec![c("west")],
            explanations: vec![
                Explanation {
                    cluster: c("west"),
                    verdict: Verdict::Candidate {
                        rank: 0,
                        level: 1,
                        share_ppm: 1_000_000,
                        weight: 100,
                        note: None,
                    },
                },
                Explanation {
                    cluster: c("north"),
                    verdict: Verdict::Excluded(Excluded::FailedByDrill {
                        who: "ana".into(),
                        why: "game day".into(),
                        expires: NOW_UNIX + 600,
                    }),
                },
                Explanation {
                    cluster: c("south"),
                    verdict: Verdict::Excluded(Excluded::Ejected {
                        until: now + Duration::from_secs(30),
                    }),
                },
            ],
            max_attempts: 3,
        }
    }

    fn view(now: Instant) -> StatusView {
        let snapshot = snapshot();
        let watcher = WatcherStatus {
            synced: true,
            connected: true,
            relists: 0,
            watch_restarts: 0,
            revision: 7,
            last_contact: Some(now - Duration::from_millis(1500)),
            last_error: None,
        };
        let links = [PeerLink {
            peer: PeerKey {
                cluster: c("west"),
                addr: addr(2000),
            },
            rtt: Duration::from_micros(2500),
            mtu: 1452,
            lost_packets: 2,
            sent_packets: 200,
            black_holes: 0,
            open_streams: 3,
            age: Duration::from_secs(42),
        }];
        let peers = BTreeMap::from([
            (
                c("west"),
                PeerSignal::Up {
                    rtt: Duration::from_millis(2),
                },
            ),
            (c("north"), PeerSignal::Down { since: now }),
        ]);
        let decisions = BTreeMap::from([(svc(), decision(now))]);
        build(&Inputs {
            cluster: &c("east"),
            gateway_id: "east-0",
            region: "r-east",
            backend: "etcd",
            pending: vec![],
            draining: false,
            connections_in_flight: 4,
            snapshot: &snapshot,
            watcher: &watcher,
            links: &links,
            peers: &peers,
            decisions: &decisions,
            now,
            unix_now: NOW_UNIX,
        })
    }

    #[test]
    fn clusters_show_the_link_as_the_decision_sees_it_and_each_connection() {
        let v = view(Instant::now());
        let row = |name: &str| {
            v.clusters
                .iter()
                .find(|c| c.name == name)
                .unwrap_or_else(|| panic!("no cluster {name}"))
        };
        let table: Vec<(&str, &str, Option<f64>, bool)> = v
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.link, c.rtt_ms, c.draining))
            .collect();
        assert_eq!(
            table,
            [
                ("east", "local", None, false),
                ("north", "down", None, false),
                ("south", "unknown", None, true),
                ("west", "up", Some(2.0), false),
            ]
        );
        let west = &row("west").gateways[0];
        assert!(west.connected);
        assert_eq!(west.open_streams, Some(3));
        assert_eq!(west.connection_age_s, Some(42.0));
        assert_eq!(west.loss_ratio, Some(0.01));
        assert_eq!(west.rtt_ms, Some(2.5));
        assert_eq!(row("west").region, "r-west");
        let north = &row("north").gateways[0];
        assert!(!north.connected);
        assert_eq!((north.open_streams, north.rtt_ms), (None, None));
        assert!(row("east").local);
        assert_eq!(v.catalog.stale_seconds, 1.5);
        assert_eq!(v.connections_in_flight, 4);
        assert!(v.ready);
    }

    #[test]
    fn services_show_target_level_shares_and_why_others_are_left_out() {
        let now = Instant::now();
        let v = view(now);
        assert_eq!(v.services.len(), 1);
        let s = &v.services[0];
        assert_eq!(s.name, "pay.prod");
        assert_eq!(s.target.as_deref(), Some("west"));
        assert_eq!(s.level, Some(1));
        assert_eq!(
            s.shares,
            [ShareStatus {
                cluster: "west".into(),
                level: 1,
                percent: 100.0
            }]
        );
        assert_eq!(
            s.clusters,
            [("north".to_string(), 1, 2), ("west".to_string(), 2, 2)]
        );
        assert_eq!(s.drills, ["fail-north-1"]);
        let codes: Vec<(&str, &str, Option<i64>)> = s
            .excluded
            .iter()
            .map(|e| (e.cluster.as_str(), e.code.as_str(), e.until_unix))
            .collect();
        assert_eq!(
            codes,
            [
                ("north", "failed_by_drill", Some(NOW_UNIX + 600)),
                ("south", "ejected", Some(NOW_UNIX + 31)),
            ]
        );
        // Only trouble of health is an ejection; a drill is a decision, listed with drills.
        let ejections: Vec<(&str, &str)> = v
            .ejections
            .iter()
            .map(|e| (e.service.as_str(), e.cluster.as_str()))
            .collect();
        assert_eq!(ejections, [("pay.prod", "south")]);
    }

    #[test]
    fn only_drills_in_force_are_listed_with_their_audit_fields_as_given() {
        let v = view(Instant::now());
        assert_eq!(
            v.drills,
            [DrillStatus {
                id: "fail-north-1".into(),
                kind: "fail".into(),
                cluster: "north".into(),
                service: None,
                // Raw text: the page writes it as a text node.
                who: "<b>ana</b>".into(),
                why: "game day".into(),
                created_unix: NOW_UNIX - 10,
                expires_unix: NOW_UNIX + 600,
            }]
        );
    }

    #[test]
    fn a_gateway_not_yet_in_the_catalog_still_shows_its_own_cluster() {
        let now = Instant::now();
        let snapshot = Snapshot::new();
        let watcher = WatcherStatus {
            synced: false,
            connected: false,
            relists: 0,
            watch_restarts: 0,
            revision: 0,
            last_contact: None,
            last_error: None,
        };
        let v = build(&Inputs {
            cluster: &c("east"),
            gateway_id: "east-0",
            region: "",
            backend: "etcd",
            pending: vec!["catalog sync".into()],
            draining: false,
            connections_in_flight: 0,
            snapshot: &snapshot,
            watcher: &watcher,
            links: &[],
            peers: &BTreeMap::new(),
            decisions: &BTreeMap::new(),
            now,
            unix_now: NOW_UNIX,
        });
        assert!(!v.ready);
        assert_eq!(v.pending, ["catalog sync"]);
        assert_eq!(v.clusters.len(), 1);
        assert_eq!(
            (v.clusters[0].name.as_str(), v.clusters[0].link),
            ("east", "local")
        );
        assert!(v.services.is_empty() && v.drills.is_empty() && v.ejections.is_empty());
    }
}

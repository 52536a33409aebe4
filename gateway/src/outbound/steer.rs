//! Steering: the state the failover decision reads (live health and peer liveness) and the
//! per-service metrics, behind one lock that is only ever held for pure calls (never across
//! an await). The decision itself is [`meshup_policy::decide`]; this module asks it, keeps the
//! counters it depends on, and counts what happened.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_core::policy::{DrillRecord, PolicyRecord};
use meshup_policy::{Decision, Excluded, Health, Inputs, Locality, Outcome, Verdict, decide};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::liveness::{Liveness, Transition};
use super::pool::PeerKey;
use super::route::{Serving, Target};
use crate::tunnel::metrics::Label;

/// The state behind the lock.
#[derive(Debug)]
pub struct State {
    pub health: Health,
    pub liveness: Liveness,
}

/// What the decision for one route needs from the catalog: the same for every connection
/// until the catalog snapshot or the local exports change, so it is prepared once per change
/// and shared.
#[derive(Debug)]
pub struct Prepared {
    pub serving: Serving,
    pub policy: Arc<PolicyRecord>,
    /// Drills naming a cluster that serves the route (in force or not: times decide).
    pub drills: Vec<DrillRecord>,
    /// The route's `service` and `source_cluster` labels, made once here so that counting a
    /// connection allocates nothing.
    labels: ServiceLabels,
    /// The series counted for every connection or request, looked up once.
    series: Series,
}

impl Prepared {
    /// The route's `service` and `source_cluster` labels.
    pub fn labels(&self) -> &ServiceLabels {
        &self.labels
    }

    /// Counts a request of the route that `cluster` answered with `code`, `seconds` after
    /// it came (`meshup_http_requests_total`, `meshup_http_request_duration_seconds`).
    pub fn count_request(
        &self,
        metrics: &ServiceMetrics,
        cluster: &ClusterName,
        (route, method, code): (&Label, &'static str, u16),
        seconds: f64,
    ) {
        let key = (cluster, route, method, code);
        self.series.requests.with(
            |(c, r, m, k)| (c, r, *m, *k) == key,
            || {
                let labels = RequestLabels {
                    service: self.labels.service.clone(),
                    source_cluster: self.labels.source_cluster.clone(),
                    destination_cluster: Label::from(cluster),
                    route: route.clone(),
                    method,
                    code,
                };
                let key = (cluster.clone(), route.clone(), method, code);
                (key, metrics.http.requests.get_or_create(&labels).clone())
            },
            |c| {
                c.inc();
            },
        );
        self.series.durations.with(
            |c| c == cluster,
            || {
                let h = metrics
                    .http
                    .duration
                    .get_or_create(&self.labels.to(Label::from(cluster)))
                    .clone();
                (cluster.clone(), h)
            },
            |h| h.observe(seconds),
        );
    }

    /// Counts a connection of the route that ended `result` at `cluster` (`None`: none
    /// took it) (`meshup_service_connections_total`).
    pub fn count_connection(
        &self,
        metrics: &ServiceMetrics,
        cluster: Option<&ClusterName>,
        result: &'static str,
    ) {
        self.series.connections.with(
            |(c, r)| (c.as_ref(), *r) == (cluster, result),
            || {
                let labels = self.labels.result(Label::cluster_or_none(cluster), result);
                let counter = metrics.connections.get_or_create(&labels).clone();
                ((cluster.cloned(), result), counter)
            },
            |c| {
                c.inc();
            },
        );
    }
}

/// Most series of one kind a route keeps looked up; counts past them go through the family.
const MAX_SERIES: usize = 64;

/// A route's metric series, each looked up in its family once: a family lookup hashes every
/// label (SipHash over the text) under a lock, which showed as a tenth of the gateways'
/// per-request instructions (docs/benchmarks.md, "The per-request decision and its counts").
#[derive(Debug, Default)]
struct Series {
    failover_level: OnceLock<Gauge>,
    /// By destination cluster, route rule, method class and status code.
    requests: SeriesList<(ClusterName, Label, &'static str, u16), Counter>,
    /// By destination cluster.
    durations: SeriesList<ClusterName, Histogram>,
    /// By destination cluster (`None`: none) and result.
    connections: SeriesList<(Option<ClusterName>, &'static str), Counter>,
}

/// Series found by a short scan: a route has few clusters, rules and codes.
#[derive(Debug)]
struct SeriesList<K, M>(Mutex<Vec<(K, M)>>);

impl<K, M> Default for SeriesList<K, M> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<K, M> SeriesList<K, M> {
    /// Applies `count` to the series whose key `is` names, found here, or else made by
    /// `make` (from its family) and kept while there is room.
    fn with(&self, is: impl Fn(&K) -> bool, make: impl FnOnce() -> (K, M), count: impl Fn(&M)) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = list.iter().find(|(k, _)| is(k)) {
            count(m);
            return;
        }
        let (k, m) = make();
        count(&m);
        if list.len() < MAX_SERIES {
            list.push((k, m));
        }
    }
}

/// Everything one connection's attempts need from the decision.
#[derive(Debug)]
pub struct Plan {
    pub decision: Decision,
    pub prepared: Arc<Prepared>,
    /// Clusters serving the service before ejection (outlier detection's base).
    pub serving: usize,
}

impl Plan {
    /// The clusters to try, in order, with where each is reached.
    pub fn targets(&self) -> impl Iterator<Item = (&ClusterName, &Target)> {
        self.decision
            .order
            .iter()
            .filter_map(|c| self.prepared.serving.targets.get(c).map(|t| (c, t)))
    }

    pub fn policy(&self) -> &PolicyRecord {
        &self.prepared.policy
    }

    /// The clusters the decision left out because their circuit breaker was open.
    pub fn circuit_open(&self) -> impl Iterator<Item = &ClusterName> {
        self.decision
            .explanations
            .iter()
            .filter_map(|e| match e.verdict {
                Verdict::Excluded(Excluded::CircuitOpen { .. }) => Some(&e.cluster),
                _ => None,
            })
    }
}

/// The decision's state and the per-service metrics of one gateway.
#[derive(Debug)]
pub struct Steering {
    pub local: Locality,
    state: Mutex<State>,
    default_policy: Arc<PolicyRecord>,
    draws: AtomicU64,
    pub metrics: ServiceMetrics,
    /// Woken when something the decision reads changed outside the catalog (an ejection), so
    /// the change detector (`outbound::changes`) looks at once instead of at its next tick.
    pub changed: tokio::sync::Notify,
}

impl Steering {
    pub fn new(local: Locality, metrics: ServiceMetrics) -> Self {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        Self {
            local,
            state: Mutex::new(State {
                health: Health::new(Instant::now()),
                liveness: Liveness::new(),
            }),
            default_policy: Arc::new(PolicyRecord::default()),
            draws: AtomicU64::new(seed),
            metrics,
            changed: tokio::sync::Notify::new(),
        }
    }

    /// The state, for pure calls only. A panic while it was held cannot leave it
    /// inconsistent in a way worse than stale counters, so a poisoned lock is taken over.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A uniformly distributed draw (SplitMix64 over a counter).
    /// A pseudo-random draw for weighted choices (a SplitMix64 sequence).
    pub fn draw(&self) -> u64 {
        let mut z = self
            .draws
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Reads what the decision for `service` needs from the catalog (see [`Prepared`]).
    pub fn prepare(&self, snapshot: &Snapshot, service: &ServiceKey, serving: Serving) -> Prepared {
        let policy = snapshot
            .policy(service)
            .cloned()
            .unwrap_or_else(|| self.default_policy.clone());
        let drills = snapshot
            .drills()
            // Only drills naming a cluster that can serve the route can change its decision.
            .filter(|(_, d)| serving.targets.contains_key(&d.cluster))
            .map(|(_, d)| DrillRecord::clone(d))
            .collect();
        Prepared {
            serving,
            policy,
            drills,
            labels: ServiceLabels::new(service, &self.local.cluster),
            series: Series::default(),
        }
    }

    /// Decides where a new connection for `service` goes, counts it for the retry budget,
    /// and notes each cluster's availability (a cluster that comes back starts its hold-down).
    pub fn plan(&self, service: &ServiceKey, prepared: Arc<Prepared>) -> Plan {
        let now = Instant::now();
        let unix_now = unix_now();
        let draw = self.draw();
        let decision = {
            let mut st = self.lock();
            st.health.connection_arrived(service, now);
            let decide_now = |health: &Health| {
                decide(&Inputs {
                    service,
                    local: &self.local,
                    policy: &prepared.policy,
                    clusters: &prepared.serving.states,
                    health,
                    drills: &prepared.drills,
                    now,
                    unix_now,
                    draw,
                })
            };
            let decision = decide_now(&st.health);
            let mut recovered = false;
            for e in &decision.explanations {
                recovered |=
                    st.health
                        .observe_available(service, &e.cluster, available(&e.verdict), now);
            }
            if recovered {
                // A cluster is back by every signal as of this connection: its hold-down
                // starts now, so this connection's choice must already honour it.
                decide_now(&st.health)
            } else {
                decision
            }
        };
        let level = decision
            .explanations
            .iter()
            .find_map(|e| match e.verdict {
                Verdict::Candidate { rank: 0, level, .. } => Some(level as i64),
                _ => None,
            })
            .unwrap_or(-1);
        prepared
            .series
            .failover_level
            .get_or_init(|| {
                self.metrics
                    .failover_level
                    .get_or_create(&prepared.labels)
                    .clone()
            })
            .set(level);
        let serving = decision
            .explanations
            .iter()
            .filter(|e| {
                matches!(
                    e.verdict,
                    Verdict::Candidate { .. } | Verdict::Excluded(Excluded::Ejected { .. })
                )
            })
            .count();
        let plan = Plan {
            decision,
            prepared,
            serving,
        };
        // Skipped for their circuit by the decision itself; a circuit found open only when
        // the attempt starts is counted there.
        for cluster in plan.circuit_open() {
            self.metrics
                .circuit_open
                .get_or_create(&plan.prepared.labels.to(Label::from(cluster)))
                .inc();
        }
        plan
    }

    /// The decision a connection would get now, without counting it or observing anything.
    pub fn explain(&self, service: &ServiceKey, prepared: &Prepared) -> Decision {
        let st = self.lock();
        decide(&Inputs {
            service,
            local: &self.local,
            policy: &prepared.policy,
            clusters: &prepared.serving.states,
            health: &st.health,
            drills: &prepared.drills,
            now: Instant::now(),
            unix_now: unix_now(),
            draw: 0,
        })
    }

    /// Records how an attempt at `cluster` ended, for outlier detection; counts and logs an
    /// ejection it causes.
    pub fn record(&self, service: &ServiceKey, cluster: &ClusterName, plan: &Plan, ok: bool) {
        let outcome = if ok {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        let ejection = self.lock().health.record(
            service,
            cluster,
            outcome,
            plan.serving,
            &plan.prepared.policy.outlier,
            Instant::now(),
        );
        if let Some(e) = ejection {
            tracing::warn!(%service, %cluster, ejections = e.count, until = ?e.until.saturating_duration_since(Instant::now()), "cluster ejected by outlier detection");
            self.metrics
                .ejections
                .get_or_create(&plan.prepared.labels.to(Label::from(cluster)))
                .inc();
            self.changed.notify_one();
        }
    }

    /// A liveness transition of a peer gateway, logged and counted.
    pub fn peer_transition(&self, peer: &PeerKey, t: Transition) {
        match t {
            Transition::None => {}
            Transition::Suspected => {
                tracing::warn!(%peer, "peer gateway silent: new connections skip it");
                self.metrics
                    .peers_suspected
                    .get_or_create(&ClusterLabels {
                        source_cluster: Label::from(&self.local.cluster),
                        destination_cluster: Label::from(&peer.cluster),
                    })
                    .inc();
            }
            Transition::Recovered => {
                tracing::info!(%peer, "peer gateway alive again");
            }
        }
    }

    /// Re-derives each cluster's peer signal for the decision from its gateways' liveness,
    /// and forgets peers that left the catalog.
    pub fn refresh_peers(&self, snapshot: &Snapshot, catalog_peers: &HashSet<PeerKey>) {
        let mut st = self.lock();
        st.liveness.retain(catalog_peers);
        for cluster in snapshot.clusters() {
            if cluster == &self.local.cluster {
                continue;
            }
            let gateways: Vec<PeerKey> = snapshot
                .gateways_of(cluster)
                .filter(|g| !g.draining)
                .flat_map(|g| {
                    g.quic_addrs.iter().map(|addr| PeerKey {
                        cluster: cluster.clone(),
                        addr: *addr,
                    })
                })
                .collect();
            match st.liveness.cluster_signal(&gateways) {
                Some(signal) => st.health.observe_peer(cluster, signal),
                None => st.health.clear_peer(cluster),
            }
        }
    }
}

/// Whether a verdict says the cluster is up by every signal but outlier detection (which
/// has its own return path), so that a transition to up starts the failback hold-down.
fn available(verdict: &Verdict) -> bool {
    !matches!(
        verdict,
        Verdict::Excluded(
            Excluded::FailedByDrill { .. }
                | Excluded::NoHealthyEndpoints
                | Excluded::BelowHealthyMinimum { .. }
                | Excluded::NoGateway
                | Excluded::PeerDown { .. }
        )
    )
}

/// Unix seconds now (drills carry wall-clock times).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// === metrics ===

/// `service`, `source_cluster`. Made once per route preparation (a catalog change), so
/// the per-connection label sets below only clone its shared text.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: Label,
    pub source_cluster: Label,
}

impl ServiceLabels {
    pub fn new(service: &ServiceKey, source: &ClusterName) -> Self {
        Self {
            service: Label::Text(service.to_string().into()),
            source_cluster: Label::from(source),
        }
    }

    /// The pair from this service's source to `destination`.
    pub fn to(&self, destination: Label) -> PairLabels {
        PairLabels {
            service: self.service.clone(),
            source_cluster: self.source_cluster.clone(),
            destination_cluster: destination,
        }
    }

    /// The pair to `destination` with a result or reason.
    pub fn result(&self, destination: Label, result: &'static str) -> PairResultLabels {
        PairResultLabels {
            service: self.service.clone(),
            source_cluster: self.source_cluster.clone(),
            destination_cluster: destination,
            result,
        }
    }
}

/// `service`, `source_cluster`, `destination_cluster`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabels {
    pub service: Label,
    pub source_cluster: Label,
    pub destination_cluster: Label,
}

impl PairLabels {
    pub fn new(service: &ServiceKey, source: &ClusterName, destination: &ClusterName) -> Self {
        ServiceLabels::new(service, source).to(Label::from(destination))
    }
}

/// [`PairLabels`] and a `result` or `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairResultLabels {
    pub service: Label,
    pub source_cluster: Label,
    /// `none` when no cluster took the connection.
    pub destination_cluster: Label,
    pub result: &'static str,
}

/// `source_cluster`, `destination_cluster`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub source_cluster: Label,
    pub destination_cluster: Label,
}

/// Per-service routing metrics, `meshup_service_*`.
#[derive(Clone, Debug, Default)]
pub struct ServiceMetrics {
    /// New client connections by where they went and how they ended up: `connected`, or the
    /// reason none of the attempts connected.
    pub connections: Family<PairResultLabels, Counter>,
    /// Failed attempts by cluster and reason (a connection may fail several and still connect).
    pub attempt_failures: Family<PairResultLabels, Counter>,
    /// Attempts after the first, by the cluster they went to.
    pub retries: Family<PairLabels, Counter>,
    /// Retries not made because the retry budget was spent.
    pub retry_budget_exhausted: Family<ServiceLabels, Counter>,
    /// Clusters skipped because their circuit was open, once per new connection: left out by
    /// the decision, or found open when the attempt was to start.
    pub circuit_open: Family<PairLabels, Counter>,
    /// Ejections by outlier detection.
    pub ejections: Family<PairLabels, Counter>,
    /// Changes of where a service's new connections mainly go (failover and failback), by the
    /// cluster they go to now (`none`: nowhere). Counted by `outbound::changes`.
    pub failovers: Family<PairLabels, Counter>,
    /// The priority level of the cluster new connections go to first (0: the best; -1: none).
    pub failover_level: Family<ServiceLabels, Gauge>,
    /// Peer gateways found silent (new connections skip them until they show life).
    pub peers_suspected: Family<ClusterLabels, Counter>,
    /// Requests of `http` and `grpc` ports, `meshup_http_*` (outbound/http.rs).
    pub http: HttpMetrics,
}

/// [`PairLabels`], the route rule, the method class and the status code of one request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: Label,
    pub source_cluster: Label,
    /// `none` when no cluster answered.
    pub destination_cluster: Label,
    /// The rule that matched (`none`: the failover policy decided).
    pub route: Label,
    /// `read` (GET, HEAD, OPTIONS), `write` (the other methods), `upgrade`.
    pub method: &'static str,
    /// The status the client got.
    pub code: u16,
}

/// Per-request metrics of the HTTP path.
#[derive(Clone, Debug)]
pub struct HttpMetrics {
    pub requests: Family<RequestLabels, Counter>,
    /// Time until the response headers, by source and destination cluster.
    pub duration: Family<PairLabels, Histogram, fn() -> Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(|| {
                // 0.25 ms .. 8 s.
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
            }),
        }
    }
}

impl ServiceMetrics {
    /// Creates the metrics and registers them under `meshup_service_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("service");
        r.register(
            "connections",
            "New client connections, by destination cluster and result",
            m.connections.clone(),
        );
        r.register(
            "attempt_failures",
            "Failed attempts at a cluster, by reason",
            m.attempt_failures.clone(),
        );
        r.register(
            "retries",
            "Attempts after the first one of a connection",
            m.retries.clone(),
        );
        r.register(
            "retry_budget_exhausted",
            "Retries not made because the retry budget was spent",
            m.retry_budget_exhausted.clone(),
        );
        r.register(
            "circuit_open",
            "Clusters skipped because their circuit breaker was open",
            m.circuit_open.clone(),
        );
        r.register(
            "ejections",
            "Clusters ejected by outlier detection",
            m.ejections.clone(),
        );
        r.register(
            "failovers",
            "Changes of the cluster a service's new connections mainly go to (failover and failback), by the cluster they go to now",
            m.failovers.clone(),
        );
        r.register(
            "failover_level",
            "Priority level of the cluster new connections go to first (-1: none)",
            m.failover_level.clone(),
        );
        r.register(
            "peers_suspected",
            "Peer gateways found silent by the answer wait or a failed dial",
            m.peers_suspected.clone(),
        );
        let r = registry.sub_registry_with_prefix("http");
        r.register(
            "requests",
            "Requests of http and grpc ports, by destination cluster, route rule, method class and status code",
            m.http.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers, by destination cluster",
            m.http.duration.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use meshup_core::catalog::Change;
    use meshup_core::policy::{Level, Member};
    use meshup_policy::ClusterState;
    use meshup_policy::decide::Note;

    use super::*;

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).expect("name")
    }

    fn steering() -> Steering {
        Steering::new(
            Locality {
                cluster: c("east"),
                region: String::new(),
                zone: String::new(),
            },
            ServiceMetrics::default(),
        )
    }

    /// West (level 0) and north (level 1), each with one endpoint, west's healthy or not.
    fn serving(west_healthy: u32) -> Serving {
        let mut out = Serving::default();
        for (i, (name, healthy)) in [("west", west_healthy), ("north", 1)]
            .into_iter()
            .enumerate()
        {
            out.states.push(ClusterState {
                cluster: c(name),
                region: String::new(),
                zone: String::new(),
                endpoints_total: 1,
                endpoints_healthy: healthy,
                allows_us: true,
                gateways: 1,
            });
            let addr = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
            out.targets.insert(
                c(name),
                Target::Remote {
                    gateways: vec![vec![addr]],
                },
            );
        }
        out
    }

    fn snapshot(policy: PolicyRecord) -> Snapshot {
        let mut s = Snapshot::new();
        s.apply(Change::PutPolicy(svc(), Arc::new(policy)));
        s
    }

    fn svc() -> ServiceKey {
        "pay.prod".parse().expect("key")
    }

    /// Counting through a route's looked-up series lands in the families as counting into
    /// them directly would, past the most series a route keeps too.
    #[test]
    fn counts_through_the_routes_series_land_in_their_families() {
        let st = steering();
        let p = st.prepare(&snapshot(PolicyRecord::default()), &svc(), serving(1));
        let m = &st.metrics;
        let rule = Label::Text("canary".into());
        // (cluster, route, code, times): more distinct codes than the series kept.
        let mut cases = vec![("west", &rule, 200, 3), ("north", &rule, 200, 2)];
        cases.extend((300..300 + MAX_SERIES as u16 + 6).map(|code| ("west", &rule, code, 2)));
        for &(cluster, route, code, times) in &cases {
            for _ in 0..times {
                p.count_request(m, &c(cluster), (route, "read", code), 0.001);
            }
        }
        for &(cluster, route, code, times) in &cases {
            let labels = RequestLabels {
                service: p.labels().service.clone(),
                source_cluster: p.labels().source_cluster.clone(),
                destination_cluster: Label::from(&c(cluster)),
                route: route.clone(),
                method: "read",
                code,
            };
            let got = m.http.requests.get_or_create(&labels).get();
            assert_eq!(got, times, "{cluster} {code}");
        }
        let mut text = String::new();
        let mut registry = Registry::default();
        registry.register("d", "", m.http.duration.clone());
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        let west = 3 + 2 * (MAX_SERIES + 6);
        for (cluster, n) in [("west", west), ("north", 2)] {
            let line = format!(
                "d_count{{service=\"pay.prod\",source_cluster=\"east\",destination_cluster=\"{cluster}\"}} {n}"
            );
            assert!(text.contains(&line), "{line} in\n{text}");
        }
        for (cluster, result, times) in [(Some("west"), "connected", 2), (None, "no_route", 1)] {
            for _ in 0..times {
                p.count_connection(m, cluster.map(c).as_ref(), result);
            }
            let labels = p
                .labels()
                .result(Label::cluster_or_none(cluster.map(c).as_ref()), result);
            assert_eq!(m.connections.get_or_create(&labels).get(), times);
        }
    }

    #[test]
    fn clusters_left_out_for_an_open_circuit_are_counted_per_connection() {
        let st = steering();
        let s = snapshot(PolicyRecord {
            levels: vec![Level {
                clusters: ["west", "north"]
                    .into_iter()
                    .map(|name| Member {
                        cluster: c(name),
                        weight: 1,
                    })
                    .collect(),
            }],
            circuit: meshup_core::policy::CircuitBreaker {
                max_connections: 1,
                max_pending: 10,
            },
            ..PolicyRecord::default()
        });
        let circuit_open = |cluster: &str| {
            st.metrics
                .circuit_open
                .get_or_create(&PairLabels::new(&svc(), &c("east"), &c(cluster)))
                .get()
        };
        let connect = |cluster: &str| {
            let mut state = st.lock();
            let policy = s.policy(&svc()).expect("policy");
            assert_eq!(
                state.health.try_start(&svc(), &c(cluster), &policy.circuit),
                Ok(())
            );
            state.health.attempt_finished(&svc(), &c(cluster), true);
        };
        // (cluster whose only connection slot gets taken, order next, circuit skips so far)
        connect("west");
        let plan = st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(1))));
        assert_eq!(plan.decision.order, [c("north")]);
        assert_eq!((circuit_open("west"), circuit_open("north")), (1, 0));
        connect("north");
        let plan = st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(1))));
        assert!(plan.decision.order.is_empty());
        let skipped: Vec<&ClusterName> = plan.circuit_open().collect();
        assert_eq!(skipped, [&c("west"), &c("north")]);
        assert_eq!((circuit_open("west"), circuit_open("north")), (2, 1));
        // `explain` (the status page) counts nothing.
        st.explain(&svc(), &st.prepare(&s, &svc(), serving(1)));
        assert_eq!((circuit_open("west"), circuit_open("north")), (2, 1));
    }

    #[test]
    fn the_connection_that_first_sees_a_cluster_back_already_holds_it_down() {
        let st = steering();
        let s = snapshot(PolicyRecord {
            levels: ["west", "north"]
                .into_iter()
                .map(|name| Level {
                    clusters: vec![Member {
                        cluster: c(name),
                        weight: 1,
                    }],
                })
                .collect(),
            failback_hold_down: std::time::Duration::from_secs(30),
            ..PolicyRecord::default()
        });
        // West is down: north serves, and west is noted unavailable.
        let plan = st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(0))));
        assert_eq!(plan.decision.order, [c("north")]);
        // West is back. Every connection from this one on, for the hold-down, goes to north
        // first; west is only a retry behind it.
        for i in 0..3 {
            let plan = st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(1))));
            assert_eq!(
                plan.decision.order,
                [c("north"), c("west")],
                "connection {i}"
            );
            let west = &plan.decision.explanations[0];
            assert!(
                matches!(
                    west.verdict,
                    Verdict::Candidate {
                        note: Some(Note::HoldDown { .. }),
                        ..
                    }
                ),
                "connection {i}: {west:?}"
            );
        }
        // Without a hold-down, a cluster that comes back is first again at once.
        let st = steering();
        let s = snapshot(PolicyRecord {
            failback_hold_down: std::time::Duration::ZERO,
            ..PolicyRecord::clone(s.policy(&svc()).expect("policy"))
        });
        st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(0))));
        let plan = st.plan(&svc(), Arc::new(st.prepare(&s, &svc(), serving(1))));
        assert_eq!(plan.decision.order, [c("west"), c("north")]);
    }
}

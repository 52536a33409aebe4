//! What an operator watches, against a running federation (three whole gateways on one
//! embedded store, real QUIC, real TCP clients, real DNS over UDP):
//!
//! - a failover (the serving cluster's backend stops, outlier detection ejects it) is an
//!   event on the gRPC `WatchEvents` stream and moves `meshup_service_failovers_total` and
//!   `meshup_service_ejections_total`; the ejection's end is an event too;
//! - every metric the Grafana dashboard (`deploy/grafana/meshup-federation.json`) queries is a
//!   series of a gateway's `/metrics` once traffic, DNS and a failover happened;
//! - the metrics reference (`docs/metrics.md`) lists every metric family a gateway exposes,
//!   and nothing else.
//!
//! The failover follows the outlier test of `failover.rs`: the backend stops right after a
//! health probe reached it, so the catalog still calls it healthy while connections fail.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::admin::get;
use common::federation::{Federation, plan, tally};
use common::{assert_eventually, within};
use meshup_admin_api::pb::admin_service_client::AdminServiceClient;
use meshup_admin_api::pb::{self, EventKind};
use meshup_tests::dashboard::{
    documented_metrics, families, family_of, metric_names, panel_queries, sample_names,
};
use tokio::net::UdpSocket;
use tonic::Streaming;

const LIMIT: Duration = Duration::from_secs(60);

const FAILOVERS: &str = "meshup_service_failovers_total";
const EJECTIONS: &str = "meshup_service_ejections_total";

/// Documented families whose labels are known only when they first count (an open circuit, a
/// spent retry budget, a silent peer, a failed publish or VIP allocation).
const COUNTED_FROM_THE_FIRST_EVENT: [&str; 7] = [
    "meshup_service_circuit_open_total",
    // Requests of http and grpc ports: this scenario's ports are tcp (tests/tests/http_routing.rs
    // counts them).
    "meshup_http_requests_total",
    "meshup_http_request_duration_seconds",
    "meshup_service_retry_budget_exhausted_total",
    "meshup_service_peers_suspected_total",
    "meshup_catalog_publish_errors_total",
    "meshup_catalog_vip_errors_total",
];

/// North first, west second; three consecutive failures eject for 2 s.
const POLICY: &str = r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]},{"clusters":[{"cluster":"west"}]}],
    "outlier":{"consecutive_failures":3,"base_ejection":"2s","max_ejection":"2s"}}"#;

fn to(destination: &str) -> [(&'static str, &str); 3] {
    [
        ("service", "pay.prod"),
        ("source_cluster", "east"),
        ("destination_cluster", destination),
    ]
}

async fn start() -> Federation {
    let fed = Federation::start(&[
        plan("east", "us-east", "us-east-1a", &[]),
        plan("north", "eu-north", "eu-north-1a", &[true]),
        plan("west", "us-west", "us-west-1a", &[true]),
    ])
    .await;
    fed.put_policy(POLICY).await;
    fed
}

async fn watch(fed: &Federation, observer: &str) -> Streaming<pb::Event> {
    let addr = fed
        .gateway(observer)
        .addrs()
        .grpc
        .expect("the gRPC admin API is bound");
    let mut api = AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the admin API");
    let mut events = api
        .watch_events(pb::WatchEventsRequest {
            include_existing: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = events.message().await.expect("stream").expect("sync event");
    assert_eq!(first.kind, EventKind::Sync as i32, "{first:?}");
    events
}

/// North serves east's connections, then its backend stops: three connections fail there
/// and are retried at west, north is ejected, and the rest go to west. Returns how long
/// north's catalog entry still had to say healthy (for messages).
async fn fail_over(fed: &Federation, vip: SocketAddr) -> String {
    let t = tally(vip, 20, 4).await;
    assert!(
        t.all("north"),
        "before: every connection to north, got {t:?}"
    );
    let probe_due = fed.backend("north", 0).refuse_after_probe().await;
    let t = tally(vip, 30, 1).await;
    let window = format!(
        "(north's next health probe due in {:?})",
        probe_due.saturating_duration_since(Instant::now())
    );
    assert!(
        t.all("west"),
        "north refusing: every connection to west, got {t:?} {window}"
    );
    window
}

/// Events until `done` says the ones seen are enough (at most `limit`).
async fn events_until(
    events: &mut Streaming<pb::Event>,
    limit: Duration,
    done: impl Fn(&[pb::Event]) -> bool,
) -> Vec<pb::Event> {
    let mut seen = Vec::new();
    let got = tokio::time::timeout(limit, async {
        while !done(&seen) {
            let e = events.message().await.expect("stream").expect("an event");
            seen.push(e);
        }
    })
    .await;
    if got.is_err() {
        let kinds: Vec<(String, &str)> = seen
            .iter()
            .map(|e| (kind_name(e.kind), e.text.as_str()))
            .collect();
        panic!("events missing after {limit:?}; got {kinds:#?}");
    }
    seen
}

fn kind_name(kind: i32) -> String {
    EventKind::try_from(kind).map_or(kind.to_string(), |k| k.as_str_name().to_owned())
}

fn has(seen: &[pb::Event], kind: EventKind, cluster: &str) -> bool {
    seen.iter()
        .any(|e| e.kind == kind as i32 && e.cluster == cluster && e.service == "pay.prod")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_and_an_ejection_are_events_on_the_stream_and_move_the_counters() {
    within(LIMIT, async {
        let fed = start().await;
        let vip = fed.vip("east").await;
        let mut events = watch(&fed, "east").await;
        let window = fail_over(&fed, vip).await;

        let seen = events_until(&mut events, Duration::from_secs(10), |seen| {
            has(seen, EventKind::TargetChanged, "west") && has(seen, EventKind::Ejected, "north")
        })
        .await;
        let failover = seen
            .iter()
            .find(|e| e.kind == EventKind::TargetChanged as i32)
            .expect("seen");
        assert_eq!(
            failover.text,
            "pay.prod: new connections now go mainly to west (was north), failover level 1 (was 0)",
            "{window}"
        );
        let ejected = seen
            .iter()
            .find(|e| e.kind == EventKind::Ejected as i32)
            .expect("seen");
        assert!(
            ejected
                .text
                .starts_with("north ejected from pay.prod by outlier detection for "),
            "{ejected:?}"
        );
        assert!(
            ejected.at_unix_ms > 0 && ejected.revision > 0,
            "{ejected:?}"
        );

        // The counters count the same, once however many watch.
        let m = fed.metrics("east").await;
        assert_eq!(m.sum(EJECTIONS, &to("north")), 1.0, "{window}");
        assert!(m.sum(FAILOVERS, &to("west")) >= 1.0, "{window}");

        // The ejection ends after its 2 s (north may be out by then for its failed probe too:
        // the ejection still ends).
        let ended = Instant::now();
        events_until(&mut events, Duration::from_secs(5), |seen| {
            has(seen, EventKind::EjectionEnded, "north")
        })
        .await;
        assert!(ended.elapsed() < Duration::from_secs(4));
    })
    .await;
}

/// A DNS query for `name` (type A) over UDP; returns the response code and answer count.
async fn dns_query(server: SocketAddr, name: &str) -> (u8, u16) {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    socket.send_to(&q, server).await.expect("send");
    let mut buf = [0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
        .await
        .expect("a DNS answer within 5 s")
        .expect("recv");
    assert!(n >= 12 && buf[..2] == [0x12, 0x34], "{:?}", &buf[..n]);
    (buf[3] & 0x0f, u16::from_be_bytes([buf[6], buf[7]]))
}

fn repo_file(path: &str) -> String {
    let full = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exposed_and_every_exposed_one_documented() {
    within(LIMIT, async {
        let fed = start().await;
        let vip = fed.vip("east").await;
        // DNS: an answer and a refusal.
        let dns = fed.gateway("east").addrs().dns;
        assert_eq!(dns_query(dns, "pay.prod.svc.clusterset.local").await, (0, 1));
        assert_eq!(dns_query(dns, "example.com").await.0, 5, "REFUSED");
        // Traffic, then a failover.
        let window = fail_over(&fed, vip).await;
        assert_eq!(fed.counter("east", EJECTIONS, &to("north")).await, 1.0, "{window}");
        let f = &fed;
        assert_eventually("east's failover counted", LIMIT, || async move {
            f.counter("east", FAILOVERS, &to("west")).await >= 1.0
        })
        .await;
        // Link series appear with the next refresh of the links (every second).
        assert_eventually("east's link RTT exposed", LIMIT, || async move {
            get(f.gateway("east").addrs().admin, "/metrics")
                .await
                .body
                .contains("meshup_tunnel_rtt_seconds{")
        })
        .await;

        let mut exposed: BTreeMap<&str, String> = BTreeMap::new();
        for name in ["east", "north", "west"] {
            let r = get(fed.gateway(name).addrs().admin, "/metrics").await;
            assert_eq!(r.status, 200);
            exposed.insert(name, r.body);
        }

        // The dashboard: every name in every panel's expression is a series east exposes.
        let dashboard: serde_json::Value =
            serde_json::from_str(&repo_file("deploy/grafana/meshup-federation.json"))
                .expect("the dashboard is JSON");
        let queries = panel_queries(&dashboard).expect("panels");
        assert!(queries.len() >= 20, "{} queries", queries.len());
        let east = &exposed["east"];
        let (east_families, east_samples) = (families(east), sample_names(east));
        let mut missing = Vec::new();
        let mut used = BTreeSet::new();
        for (panel, expr) in &queries {
            let names = metric_names(expr).unwrap_or_else(|e| panic!("panel {panel:?}: {e:#}"));
            assert!(!names.is_empty(), "panel {panel:?} queries no metric: {expr}");
            for name in names {
                match family_of(&name, &east_families) {
                    Some(f) if east_samples.contains(&name) => {
                        used.insert(f.to_owned());
                    }
                    Some(_) => missing.push(format!(
                        "panel {panel:?}: {name} is declared but has no series on east after traffic, DNS and a failover"
                    )),
                    None => missing.push(format!("panel {panel:?}: {name} is not exposed by east's /metrics")),
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
        // The panels the dashboard must have, by what they query.
        for f in [
            "meshup_service_connections",
            "meshup_tunnel_bytes",
            "meshup_service_attempt_failures",
            "meshup_service_failovers",
            "meshup_service_failover_level",
            "meshup_service_ejections",
            "meshup_dns_queries",
            "meshup_dns_response_seconds",
            "meshup_catalog_staleness_seconds",
            "meshup_catalog_revision",
            "meshup_tunnel_rtt_seconds",
            "meshup_tunnel_lost_packets",
        ] {
            assert!(used.contains(f), "no panel queries {f}");
        }

        // The reference: the families of every gateway, exactly.
        let documented = documented_metrics(&repo_file("docs/metrics.md"));
        let mut all_families = BTreeMap::new();
        for text in exposed.values() {
            all_families.extend(families(text));
        }
        let resolve = |name: &str| {
            family_of(name, &all_families).map(str::to_owned).or_else(|| {
                (all_families.get(name).map(String::as_str) == Some("histogram"))
                    .then(|| name.to_owned())
            })
        };
        let mut problems = Vec::new();
        let mut covered = BTreeSet::new();
        for name in &documented {
            match resolve(name) {
                Some(f) => {
                    covered.insert(f);
                }
                // prometheus-client writes a family only once it has a series, and these get
                // theirs with their first event (a fault this scenario does not cause).
                None if COUNTED_FROM_THE_FIRST_EVENT.contains(&name.as_str()) => {}
                None => problems.push(format!(
                    "docs/metrics.md lists {name}, which no gateway exposes"
                )),
            }
        }
        for (f, kind) in &all_families {
            if !covered.contains(f) {
                problems.push(format!("docs/metrics.md does not list {f} ({kind})"));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // Conventions: a prefix and help text on every family.
        for text in exposed.values() {
            for f in families(text).keys() {
                assert!(f.starts_with("meshup_"), "{f}");
                assert!(text.contains(&format!("# HELP {f} ")), "no help for {f}");
            }
        }
    })
    .await;
}

//! The admin HTTP server of a whole gateway (`app::Gateway`), asked over real HTTP:
//! `/live` is 200 whatever the catalog does; `/ready` is 503 naming what it waits for until
//! the first catalog sync, 200 after; `/metrics` is Prometheus/OpenMetrics text that parses,
//! with the tunnel, catalog and DNS series carrying the values of what just happened.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{eventually, within};
use meshup_core::model::{PortSpec, Protocol};
use meshup_core::names::{ClusterName, Namespace, ServiceKey, ServiceName};
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_gateway::app::Gateway;
use meshup_gateway::config::{AdminConfig, Config, ExportConfig};
use meshup_gateway::identity::IdentityFiles;
use meshup_gateway::tunnel::TunnelConfig;
use meshup_tests::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "admin.test";
const PORT: u16 = 7000;

/// One HTTP/1.1 response.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// `GET path` over a fresh TCP connection, as a probe or a scraper would.
async fn get(addr: SocketAddr, path: &str) -> Response {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response within 5 s"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    let mut lines = head.lines();
    let status_line = lines.next().expect("status line");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<BTreeMap<_, _>>();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

/// Decodes a chunked body (what a large `/metrics` answer may come as).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

fn status_json(r: &Response) -> serde_json::Value {
    serde_json::from_str(&r.body).expect("/status is JSON")
}

/// A federation CA and gateway certificates in a temp dir.
fn certs(clusters: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca");
    meshup_gateway::certs::init_ca(TD, &ca).expect("CA");
    for c in clusters {
        meshup_gateway::certs::issue(&ca, c, &dir.path().join(c), Duration::from_secs(3600))
            .expect("certificate");
    }
    dir
}

/// A gateway of `cluster` on loopback ports chosen by the kernel.
fn config(
    certs: &tempfile::TempDir,
    cluster: &str,
    catalog: CatalogConfig,
    vip_cidr: &str,
    exports: Vec<ExportConfig>,
) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut config = Config {
        cluster: ClusterName::new(cluster).expect("cluster"),
        gateway_id: None,
        region: String::new(),
        zone: String::new(),
        trust_domain: TD.into(),
        catalog,
        vip_cidr: vip_cidr.parse().expect("cidr"),
        tunnel: TunnelConfig {
            listen: any,
            ..TunnelConfig::with_files(IdentityFiles::in_dir(&certs.path().join(cluster)))
        },
        dns: Default::default(),
        admin: AdminConfig {
            http: any,
            allow_non_loopback: false,
            grpc: None,
            allow_non_loopback_grpc: false,
        },
        exports,
        worker_threads: None,
    };
    config.dns.listen = any;
    config.validate().expect("valid config");
    config
}

/// A TCP front for an etcd that is not up yet: until [`StoreFront::bring_up`] it closes every
/// connection at once (and counts them); afterwards it relays each to the real etcd.
struct StoreFront {
    addr: SocketAddr,
    turned_away: Arc<AtomicUsize>,
    target: Arc<std::sync::Mutex<Option<SocketAddr>>>,
}

impl StoreFront {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let turned_away = Arc::new(AtomicUsize::new(0));
        let target: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        let (count, to) = (turned_away.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let Some(etcd) = *to.lock().expect("lock") else {
                    count.fetch_add(1, Ordering::SeqCst);
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(etcd).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self {
            addr,
            turned_away,
            target,
        }
    }

    fn bring_up(&self, etcd: SocketAddr) {
        *self.target.lock().expect("lock") = Some(etcd);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_until_the_first_catalog_sync_then_200() {
    within(Duration::from_secs(90), async {
        let front = StoreFront::start().await;
        let certs = certs(&["east"]);
        let catalog = CatalogConfig {
            backend: Backend::Etcd,
            endpoints: vec![format!("http://{}", front.addr)],
            prefix: "/admin-ready".into(),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        };
        // Starting does not wait for the store: an unreachable etcd is waited for, not fatal.
        let gateway = Gateway::start(
            config(&certs, "east", catalog, "127.81.1.0/24", vec![]),
            None,
        )
        .await
        .expect("starts while the store is down");
        let admin = gateway.addrs().admin;

        // Not ready while the watcher keeps failing to list (seen trying twice).
        let turned_away = front.turned_away.clone();
        eventually(
            Duration::from_secs(20),
            "the watcher tried the store twice",
            || {
                let n = turned_away.load(Ordering::SeqCst);
                async move { n >= 2 }
            },
        )
        .await;
        let ready = get(admin, "/ready").await;
        assert_eq!(ready.status, 503, "{ready:?}");
        assert_eq!(ready.body, "not ready: waiting for catalog sync\n");
        let status = status_json(&get(admin, "/status").await);
        assert_eq!(status["ready"], false);
        assert_eq!(status["pending"], serde_json::json!(["catalog sync"]));
        assert_eq!(status["catalog"]["synced"], false);
        assert_eq!(status["catalog"]["connected"], false);
        // Alive all the same: a probe must not restart a gateway because etcd is away.
        let live = get(admin, "/live").await;
        assert_eq!((live.status, live.body.as_str()), (200, "live\n"));

        // The store comes up: the first sync makes the gateway ready.
        let etcd = tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .expect("etcd");
        front.bring_up(etcd.client_addr());
        eventually(Duration::from_secs(30), "/ready turns 200", || async move {
            get(admin, "/ready").await.status == 200
        })
        .await;
        let ready = get(admin, "/ready").await;
        assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
        let status = status_json(&get(admin, "/status").await);
        assert_eq!(status["ready"], true);
        assert_eq!(status["pending"], serde_json::json!([]));
        assert_eq!(status["catalog"]["synced"], true);
        assert!(gateway.readiness().is_ready());
        gateway.drain().await;
    })
    .await;
}

/// One parsed OpenMetrics exposition: sample (`name{labels}`, labels sorted) → value, and
/// family → type.
#[derive(Debug, Default)]
struct Exposition {
    samples: BTreeMap<String, f64>,
    types: BTreeMap<String, String>,
}

impl Exposition {
    /// Parses the text strictly: every line is a `# HELP`/`# TYPE`/`# UNIT` comment or a
    /// sample of a family declared before it, names and labels are well formed, values are
    /// numbers, no sample repeats, and the text ends with `# EOF`. Panics on anything else.
    fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let body = text
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("exposition does not end with '# EOF':\n{text}"));
        for line in body.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let (kind, name) = (parts.next(), parts.next().expect("family name"));
                assert!(valid_name(name), "bad family name in {line:?}");
                match kind {
                    Some("TYPE") => {
                        let ty = parts.next().expect("type").to_owned();
                        assert!(
                            [
                                "counter",
                                "gauge",
                                "histogram",
                                "gaugehistogram",
                                "stateset",
                                "info",
                                "summary",
                                "unknown"
                            ]
                            .contains(&ty.as_str()),
                            "unknown type in {line:?}"
                        );
                        let again = out.types.insert(name.to_owned(), ty);
                        assert!(again.is_none(), "family {name} declared twice");
                    }
                    Some("HELP" | "UNIT") => {}
                    _ => panic!("unknown comment {line:?}"),
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').expect("closing brace"), line),
                ),
                None => (series, Vec::new()),
            };
            assert!(valid_name(name), "bad metric name in {line:?}");
            let family = out
                .types
                .iter()
                .filter(|(f, ty)| {
                    let suffixes: &[&str] = match ty.as_str() {
                        "counter" => &["_total", "_created"],
                        "histogram" => &["_bucket", "_count", "_sum", "_created"],
                        "info" => &["_info"],
                        _ => &[""],
                    };
                    suffixes.iter().any(|s| name == format!("{f}{s}"))
                })
                .map(|(f, _)| f.clone())
                .next();
            assert!(family.is_some(), "sample of no declared family: {line:?}");
            let key = if labels.is_empty() {
                name.to_owned()
            } else {
                let mut labels = labels;
                labels.sort();
                let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                format!("{name}{{{}}}", text.join(","))
            };
            let again = out.samples.insert(key, value);
            assert!(again.is_none(), "sample repeated: {line:?}");
        }
        out
    }

    /// The value of one sample; `labels` as `k="v"` pairs in name order.
    fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series}; have {:#?}", self.samples.keys()))
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `k="v",k2="v2"` (escapes `\\`, `\"`, `\n` in values).
fn parse_labels(mut rest: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        assert!(
            valid_name(key) && !key.contains(':'),
            "bad label name in {line:?}"
        );
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => panic!("bad escape in {line:?}"),
                },
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        out.push((key.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out
}

fn echo_export(backend: SocketAddr) -> ExportConfig {
    ExportConfig {
        name: ServiceName::new("echo").expect("name"),
        namespace: Namespace::new("test").expect("namespace"),
        ports: vec![PortSpec {
            name: "tcp".into(),
            port: PORT,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![backend],
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_metrics_answer_with_the_tunnel_and_catalog_series() {
    within(Duration::from_secs(60), async {
        let echo = common::Backend::echo().await;
        let certs = certs(&["east", "west"]);
        let store = EmbeddedStore::new();
        let catalog = CatalogConfig {
            backend: Backend::Embedded,
            prefix: "/admin-metrics".into(),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        };
        let west = Gateway::start(
            config(
                &certs,
                "west",
                catalog.clone(),
                "127.81.12.0/24",
                vec![echo_export(echo.addr)],
            ),
            Some(&store),
        )
        .await
        .expect("west starts");
        let east = Gateway::start(
            config(&certs, "east", catalog, "127.81.11.0/24", vec![]),
            Some(&store),
        )
        .await
        .expect("east starts");
        let (east_admin, west_admin) = (east.addrs().admin, west.addrs().admin);
        let live = get(west_admin, "/live").await;
        assert_eq!((live.status, live.body.as_str()), (200, "live\n"));

        // One connection from a client of east to west's backend, finished.
        let key: ServiceKey = "echo.test".parse().expect("key");
        let mut vip = None;
        eventually(Duration::from_secs(20), "east routes echo.test", || {
            let snapshot = east.snapshots().borrow().clone();
            vip = snapshot
                .vip(east.cluster(), &key, None)
                .map(|v| SocketAddr::new(v, PORT))
                .filter(|v| east.listeners().contains_key(v));
            let routed =
                vip.is_some() && east.readiness().is_ready() && west.readiness().is_ready();
            async move { routed }
        })
        .await;
        let mut client = TcpStream::connect(vip.expect("vip"))
            .await
            .expect("connect");
        client.write_all(b"ping").await.expect("send");
        client.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.expect("echo");
        assert_eq!(back, b"ping");

        let scrape = |admin| async move {
            let r = get(admin, "/metrics").await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(
                r.headers.get("content-type").map(String::as_str),
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
            );
            Exposition::parse(&r.body)
        };
        let done = "meshup_tunnel_streams_closed_total{direction=\"inbound\",result=\"done\"}";
        eventually(
            Duration::from_secs(5),
            "west counted the stream",
            || async move { scrape(west_admin).await.samples.get(done) == Some(&1.0) },
        )
        .await;
        let w = scrape(west_admin).await;
        let e = scrape(east_admin).await;
        for (family, ty) in [
            ("meshup_tunnel_streams_opened", "counter"),
            ("meshup_tunnel_streams_closed", "counter"),
            ("meshup_tunnel_streams_in_flight", "gauge"),
            ("meshup_tunnel_bytes", "counter"),
            ("meshup_tunnel_active_connections", "gauge"),
            ("meshup_tunnel_listeners", "gauge"),
            ("meshup_catalog_revision", "gauge"),
            ("meshup_catalog_exports", "gauge"),
            ("meshup_catalog_skipped_records", "counter"),
            ("meshup_catalog_staleness_seconds", "gauge"),
            ("meshup_catalog_lease_grants", "counter"),
            ("meshup_dns_queries", "counter"),
            ("meshup_dns_table_rebuilds", "counter"),
        ] {
            for (who, x) in [("west", &w), ("east", &e)] {
                assert_eq!(
                    x.types.get(family).map(String::as_str),
                    Some(ty),
                    "{who}: family {family}"
                );
            }
        }
        // The tunnel series tell what happened: one stream, 4 bytes each way, on each side.
        assert_eq!(
            w.value("meshup_tunnel_streams_opened_total{direction=\"inbound\"}"),
            1.0
        );
        assert_eq!(w.value(done), 1.0);
        assert_eq!(
            w.value("meshup_tunnel_streams_in_flight{direction=\"inbound\"}"),
            0.0
        );
        assert_eq!(
            w.value("meshup_tunnel_bytes_total{direction=\"inbound\",flow=\"to_upstream\"}"),
            4.0
        );
        assert_eq!(
            w.value("meshup_tunnel_bytes_total{direction=\"inbound\",flow=\"to_client\"}"),
            4.0
        );
        assert_eq!(
            e.value("meshup_tunnel_streams_opened_total{direction=\"outbound\"}"),
            1.0
        );
        assert_eq!(
            e.value("meshup_tunnel_bytes_total{direction=\"outbound\",flow=\"to_upstream\"}"),
            4.0
        );
        // One pooled QUIC connection, counted on both ends.
        assert_eq!(e.value("meshup_tunnel_active_connections"), 1.0);
        assert_eq!(w.value("meshup_tunnel_active_connections"), 1.0);
        assert_eq!(
            e.value("meshup_tunnel_listeners"),
            east.listeners().len() as f64
        );
        // The catalog series: west's one export, no record skipped, one lease each.
        for (who, x) in [("west", &w), ("east", &e)] {
            assert_eq!(x.value("meshup_catalog_exports"), 1.0, "{who}");
            assert_eq!(x.value("meshup_catalog_lease_grants_total"), 1.0, "{who}");
            assert!(x.value("meshup_catalog_revision") > 1.0, "{who}");
            let skipped: f64 = x
                .samples
                .iter()
                .filter(|(k, _)| k.starts_with("meshup_catalog_skipped_records_total{"))
                .map(|(_, v)| v)
                .sum();
            assert_eq!(skipped, 0.0, "{who}: records skipped");
        }
        west.drain().await;
        east.drain().await;
    })
    .await;
}

//! The admin HTTP server of a whole gateway (`app::Gateway`), asked over real HTTP:
//! `/live` is 200 whatever the catalog does; `/ready` is 503 naming what it waits for until
//! the first catalog sync, 200 after; `/metrics` is Prometheus/OpenMetrics text that parses,
//! with the tunnel, catalog and DNS series carrying the values of what just happened.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::admin::{Exposition, Response, get};
use common::federation::{export_config, gateway_config};
use common::{Pki, assert_eventually, within};
use meshup_core::names::ServiceKey;
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_gateway::app::Gateway;
use meshup_gateway::config::{Config, ExportConfig};
use meshup_tests::EtcdServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PORT: u16 = 7000;

fn status_json(r: &Response) -> serde_json::Value {
    serde_json::from_str(&r.body).expect("/status is JSON")
}

/// A gateway of `cluster` with a certificate from `pki`, on loopback ports chosen by the
/// kernel.
fn config(
    pki: &Pki,
    cluster: &str,
    catalog: CatalogConfig,
    vip_cidr: &str,
    exports: Vec<ExportConfig>,
) -> Config {
    gateway_config(
        &pki.issue(cluster, cluster),
        cluster,
        catalog,
        vip_cidr,
        exports,
    )
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
        let pki = Pki::new();
        let catalog = CatalogConfig {
            backend: Backend::Etcd,
            endpoints: vec![format!("http://{}", front.addr)],
            prefix: "/admin-ready".into(),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        };
        // Starting does not wait for the store: an unreachable etcd is waited for, not fatal.
        let gateway = Gateway::start(config(&pki, "east", catalog, "127.81.1.0/24", vec![]), None)
            .await
            .expect("starts while the store is down");
        let admin = gateway.addrs().admin;

        // Not ready while the watcher keeps failing to list (seen trying twice).
        let turned_away = front.turned_away.clone();
        assert_eventually(
            "the watcher tried the store twice",
            Duration::from_secs(20),
            || {
                let n = turned_away.load(Ordering::SeqCst);
                async move { n >= 2 }
            },
        )
        .await;
        let ready = get(admin, "/ready").await;
        assert_eq!(ready.status, 503, "{ready:?}");
        assert_eq!(
            ready.body,
            "not ready: waiting for VIP listeners, catalog sync\n"
        );
        let status = status_json(&get(admin, "/status").await);
        assert_eq!(status["ready"], false);
        assert_eq!(
            status["pending"],
            serde_json::json!(["VIP listeners", "catalog sync"])
        );
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
        assert_eventually("/ready turns 200", Duration::from_secs(30), || async move {
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

/// A VIP listener that cannot be bound keeps the gateway not ready, naming it, and the
/// reconciler's retries make it ready once the address is free: a ready gateway serves
/// every VIP of its first catalog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_until_every_vip_listener_is_bound() {
    within(Duration::from_secs(90), async {
        let echo = common::Backend::echo().await;
        let pki = Pki::new();
        let store = EmbeddedStore::new();
        let catalog = embedded("/admin-binds");
        let west = west_exporting_echo(&pki, &store, &catalog, "127.81.22.0/24", &echo).await;
        let key: ServiceKey = "echo.test".parse().expect("key");
        assert_eventually("west is ready", Duration::from_secs(20), || {
            let ready = west.readiness().is_ready();
            async move { ready }
        })
        .await;
        // Every address of east's VIP range is held on the service's port by another socket.
        // The smallest range a config accepts.
        let range = "127.81.21.0/28";
        let blockers: Vec<std::net::TcpListener> = (0..16)
            .map(|i| {
                std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 81, 21, i), PORT))
                    .expect("hold the address")
            })
            .collect();
        let east = Gateway::start(config(&pki, "east", catalog, range, vec![]), Some(&store))
            .await
            .expect("east starts");
        let admin = east.addrs().admin;
        let scrape = || async move { Exposition::parse(&get(admin, "/metrics").await.body) };
        // The VIPs are allocated and their binds failed, then failed again at a retry.
        assert_eventually(
            "east retried the bind",
            Duration::from_secs(20),
            || async move {
                let m = scrape().await;
                let get = |s: &str| m.samples.get(s).copied().unwrap_or(0.0);
                // Its clusterset VIP, and the one pinned to west if the range holds it.
                let unbound = get("meshup_tunnel_listeners_unbound");
                unbound >= 1.0 && get("meshup_tunnel_listener_bind_failures_total") > unbound
            },
        )
        .await;
        let vip = east
            .snapshots()
            .borrow()
            .vip(east.cluster(), &key, None)
            .expect("east allocated a VIP");
        let ready = get(admin, "/ready").await;
        assert_eq!(
            (ready.status, ready.body.as_str()),
            (503, "not ready: waiting for VIP listeners\n")
        );
        assert_eq!(
            status_json(&get(admin, "/status").await)["pending"],
            serde_json::json!(["VIP listeners"])
        );

        // The addresses are freed: the next reconcile binds the VIP and east is ready.
        drop(blockers);
        assert_eventually("/ready turns 200", Duration::from_secs(20), || async move {
            get(admin, "/ready").await.status == 200
        })
        .await;
        assert_eq!(scrape().await.value("meshup_tunnel_listeners_unbound"), 0.0);
        ping(SocketAddr::new(vip, PORT)).await;
        east.drain().await;
        west.drain().await;
    })
    .await;
}

fn echo_export(backend: SocketAddr) -> ExportConfig {
    export_config("echo.test", PORT, vec![backend])
}

/// The embedded catalog under `prefix`, loopback addresses allowed.
fn embedded(prefix: &str) -> CatalogConfig {
    CatalogConfig {
        backend: Backend::Embedded,
        prefix: prefix.into(),
        allow_loopback_addresses: true,
        ..CatalogConfig::default()
    }
}

/// Cluster west exporting `echo.test` (served by `echo`) on `store`.
async fn west_exporting_echo(
    pki: &Pki,
    store: &EmbeddedStore,
    catalog: &CatalogConfig,
    vip_cidr: &str,
    echo: &common::Backend,
) -> Gateway {
    Gateway::start(
        config(
            pki,
            "west",
            catalog.clone(),
            vip_cidr,
            vec![echo_export(echo.addr)],
        ),
        Some(store),
    )
    .await
    .expect("west starts")
}

/// One connection to `addr` whose "ping" comes back.
async fn ping(addr: SocketAddr) {
    let mut client = TcpStream::connect(addr).await.expect("connect");
    client.write_all(b"ping").await.expect("send");
    client.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.expect("echo");
    assert_eq!(back, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_metrics_answer_with_the_tunnel_and_catalog_series() {
    within(Duration::from_secs(60), async {
        let echo = common::Backend::echo().await;
        let pki = Pki::new();
        let store = EmbeddedStore::new();
        let catalog = embedded("/admin-metrics");
        let west = west_exporting_echo(&pki, &store, &catalog, "127.81.12.0/24", &echo).await;
        let east = Gateway::start(
            config(&pki, "east", catalog, "127.81.11.0/24", vec![]),
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
        assert_eventually("east routes echo.test", Duration::from_secs(20), || {
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
        ping(vip.expect("vip")).await;

        let scrape = |admin| async move {
            let r = get(admin, "/metrics").await;
            assert_eq!(r.status, 200, "{r:?}");
            assert_eq!(
                r.headers.get("content-type").map(String::as_str),
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
            );
            Exposition::parse(&r.body)
        };
        let done = "meshup_tunnel_streams_closed_total{destination_cluster=\"west\",direction=\"inbound\",result=\"done\",source_cluster=\"east\"}";
        assert_eventually(
            "west counted the stream",
            Duration::from_secs(5),
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
            w.value("meshup_tunnel_streams_opened_total{destination_cluster=\"west\",direction=\"inbound\",source_cluster=\"east\"}"),
            1.0
        );
        assert_eq!(w.value(done), 1.0);
        assert_eq!(
            w.value("meshup_tunnel_streams_in_flight{destination_cluster=\"west\",direction=\"inbound\",source_cluster=\"east\"}"),
            0.0
        );
        assert_eq!(
            w.value("meshup_tunnel_bytes_total{destination_cluster=\"west\",direction=\"inbound\",flow=\"to_upstream\",source_cluster=\"east\"}"),
            4.0
        );
        assert_eq!(
            w.value("meshup_tunnel_bytes_total{destination_cluster=\"west\",direction=\"inbound\",flow=\"to_client\",source_cluster=\"east\"}"),
            4.0
        );
        assert_eq!(
            e.value("meshup_tunnel_streams_opened_total{destination_cluster=\"west\",direction=\"outbound\",source_cluster=\"east\"}"),
            1.0
        );
        assert_eq!(
            e.value("meshup_tunnel_bytes_total{destination_cluster=\"west\",direction=\"outbound\",flow=\"to_upstream\",source_cluster=\"east\"}"),
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

//! Catalog benchmark: real etcd and the embedded store side by side, in one run.
//!
//! For 1k / 10k / 100k export records across 10 clusters it measures the watcher's initial
//! sync (time, and RSS growth of the process running the watcher), then the time from a
//! publisher's update to the change being visible in another watcher's snapshot (p50/p99).
//! The catalog publishes endpoint *counts*, so the export record (one per gateway per
//! service) is what scales it, not the number of endpoints.
//!
//! Each sync measurement runs in a fresh child process (this binary, `sync` subcommand), so
//! the RSS delta is the watcher's own and not memory left over from loading the data.
//!
//! Usage: `cargo run --release -p meshup-bench-catalog [-- --sizes 1000,10000,100000 --samples 200]`

use meshup_test_support::etcd as etcd_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use meshup_core::catalog::ExportKey;
use meshup_core::model::{
    AddressRules, ExportRecord, GatewayRecord, PortSpec, Protocol, SCHEMA_VERSION, encode,
};
use meshup_core::names::{ClusterName, GatewayId, ServiceKey};
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::keys::KeyLayout;
use meshup_federation::publisher::{Publisher, PublisherConfig};
use meshup_federation::store::{Store, Txn, TxnOp};
use meshup_federation::watcher::{self, Watcher, WatcherConfig};
use tokio_util::sync::CancellationToken;

const CLUSTERS: usize = 10;
const LEASE_TTL: Duration = Duration::from_secs(600);
/// Bound on any single wait in the benchmark.
const WAIT: Duration = Duration::from_secs(120);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.get(1).map(String::as_str) == Some("sync") {
        return runtime.block_on(child_sync(&args[2..]));
    }
    let mut sizes = vec![1_000usize, 10_000, 100_000];
    let mut samples = 200usize;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--sizes" => {
                sizes = args
                    .get(i + 1)
                    .context("--sizes needs a value")?
                    .split(',')
                    .map(|s| s.parse().context("size"))
                    .collect::<anyhow::Result<_>>()?;
                i += 2;
            }
            "--samples" => {
                samples = args
                    .get(i + 1)
                    .context("--samples needs a value")?
                    .parse()?;
                i += 2;
            }
            other => bail!("unknown argument {other:?} (use --sizes N,N,.. --samples N)"),
        }
    }
    let server = etcd_server::EtcdServer::start();
    runtime.block_on(run(&server, &sizes, samples.clamp(10, 10_000)))
}

fn layout(n: usize) -> KeyLayout {
    KeyLayout::new(&format!("/bench{n}")).expect("valid prefix")
}

fn cluster(i: usize) -> ClusterName {
    ClusterName::new(&format!("c{i}")).expect("valid cluster")
}

fn gateway_record(c: usize) -> GatewayRecord {
    GatewayRecord {
        schema: SCHEMA_VERSION,
        cluster: cluster(c),
        gateway_id: GatewayId::new("gw-0").expect("valid"),
        region: "r".into(),
        zone: "z".into(),
        quic_addrs: vec![format!("10.0.{c}.1:15443").parse().expect("addr")],
        spiffe_id: format!("spiffe://bench/cluster/c{c}/gateway"),
        draining: false,
    }
}

fn export_record(healthy: u32) -> ExportRecord {
    ExportRecord {
        schema: SCHEMA_VERSION,
        ports: vec![PortSpec {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }]
        .into(),
        endpoints_total: 1000,
        endpoints_healthy: healthy,
        allowed_callers: vec![],
        labels: [("team".to_owned(), "bench".to_owned())].into(),
    }
}

/// Writes `n` exports: `n / 10` services, each exported by one gateway in each of the 10
/// clusters, every record under its cluster's lease (as a publisher would).
async fn load(store: &dyn Store, layout: &KeyLayout, n: usize) -> anyhow::Result<()> {
    let per_cluster = n / CLUSTERS;
    for c in 0..CLUSTERS {
        let lease = store.grant_lease(LEASE_TTL).await?;
        let gw = gateway_record(c);
        let mut ops = vec![TxnOp::Put {
            key: Bytes::from(layout.gateway(&gw.cluster, &gw.gateway_id)),
            value: Bytes::from(encode(&gw)),
            lease,
        }];
        let value = Bytes::from(encode(&export_record(900)));
        for s in 0..per_cluster {
            let key = ExportKey {
                cluster: gw.cluster.clone(),
                gateway: gw.gateway_id.clone(),
                service: ServiceKey::parse("bench", &format!("svc{s}")).expect("valid"),
            };
            ops.push(TxnOp::Put {
                key: Bytes::from(layout.export(&key)),
                value: value.clone(),
                lease,
            });
        }
        for batch in ops.chunks(100) {
            store
                .txn(Txn {
                    compares: vec![],
                    success: batch.to_vec(),
                    failure: vec![],
                })
                .await?;
        }
    }
    Ok(())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

async fn etcd_store(endpoint: &str) -> anyhow::Result<EtcdStore> {
    Ok(EtcdStore::connect(EtcdOptions {
        endpoints: vec![endpoint.to_owned()],
        request_timeout: Duration::from_secs(30),
        ..Default::default()
    })
    .await?)
}

fn spawn_watcher(store: Arc<dyn Store>, layout: KeyLayout, cancel: &CancellationToken) -> Watcher {
    Watcher::spawn(
        store,
        layout,
        AddressRules::default(),
        WatcherConfig::default(),
        watcher::Metrics::default(),
        cancel.child_token(),
    )
}

/// Child process: `sync <etcd|embedded> <endpoint|-> <n>`; prints `sync_ms rss_delta_kib`.
async fn child_sync(args: &[String]) -> anyhow::Result<()> {
    let [backend, endpoint, n] = args else {
        bail!("usage: sync <etcd|embedded> <endpoint> <n>")
    };
    let n: usize = n.parse()?;
    let l = layout(n);
    let store: Arc<dyn Store> = match backend.as_str() {
        "etcd" => Arc::new(etcd_store(endpoint).await?),
        _ => {
            let store = EmbeddedStore::new();
            load(&store, &l, n).await?;
            Arc::new(store)
        }
    };
    // Warm the connection (etcd) so the measurement is the list, not the TCP handshake.
    store.revision().await?;
    let cancel = CancellationToken::new();
    let rss_before = rss_kib();
    let start = Instant::now();
    let w = spawn_watcher(store, l, &cancel);
    let mut snaps = w.snapshots();
    tokio::time::timeout(
        WAIT,
        snaps.wait_for(|s| s.revision > 0 && s.export_count() == n),
    )
    .await
    .context("initial sync timed out")??;
    let took = start.elapsed();
    let rss_after = rss_kib();
    println!(
        "{} {}",
        took.as_secs_f64() * 1000.0,
        rss_after.saturating_sub(rss_before)
    );
    cancel.cancel();
    Ok(())
}

fn run_child(backend: &str, endpoint: &str, n: usize) -> anyhow::Result<(f64, u64)> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["sync", backend, endpoint, &n.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "sync child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let ms = parts.next().context("no time")?.parse()?;
    let kib = parts.next().context("no rss")?.parse()?;
    Ok((ms, kib))
}

/// p50 and p99 of publisher update → visible in another watcher, in ms.
async fn latency(
    publisher_store: Arc<dyn Store>,
    watcher_store: Arc<dyn Store>,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    let l = KeyLayout::new("/latency").expect("valid prefix");
    let cancel = CancellationToken::new();
    let gw = gateway_record(0);
    let svc = |i: usize| ServiceKey::parse("bench", &format!("lat{i}")).expect("valid");
    let exports = |healthy: u32| {
        (0..10).map(move |i| (svc(i), export_record(if i == 0 { healthy } else { 1 })))
    };
    let publisher = Publisher::new(publisher_store, l.clone(), gw.clone())
        .with_exports(exports(0))
        .with_config(PublisherConfig {
            lease_ttl: Duration::from_secs(30),
            ..Default::default()
        })
        .spawn(cancel.child_token());
    let w = spawn_watcher(watcher_store, l, &cancel);
    let mut snaps = w.snapshots();
    let key = ExportKey {
        cluster: gw.cluster.clone(),
        gateway: gw.gateway_id.clone(),
        service: svc(0),
    };
    tokio::time::timeout(WAIT, snaps.wait_for(|s| s.export(&key).is_some()))
        .await
        .context("publisher never visible")??;
    let mut times = Vec::with_capacity(samples);
    for i in 1..=samples {
        let healthy = u32::try_from(i).unwrap_or(u32::MAX);
        let start = Instant::now();
        publisher.set_exports(exports(healthy));
        tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| {
                s.export(&key)
                    .is_some_and(|e| e.endpoints_healthy == healthy)
            }),
        )
        .await
        .context("update never visible")??;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        // Space the updates out a little, like real changes, rather than a tight loop.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    publisher.shutdown().await;
    cancel.cancel();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];
    Ok((pct(0.50), pct(0.99)))
}

async fn run(
    server: &etcd_server::EtcdServer,
    sizes: &[usize],
    samples: usize,
) -> anyhow::Result<()> {
    let endpoint = server.endpoint();
    let etcd = etcd_store(&endpoint).await?;
    println!(
        "meshup catalog benchmark — real etcd 3.4 (loopback, own temp data dir) vs the embedded store, one run"
    );
    println!(
        "unit: export records (the catalog carries endpoint counts, so one record per gateway per service is what scales it)"
    );
    println!(
        "layout: {CLUSTERS} clusters x 1 gateway; services = exports / {CLUSTERS}, each exported by every cluster"
    );
    println!();
    println!(
        "{:>9} | {:>13} {:>13} {:>7} | {:>12} {:>12} {:>9} {:>9}",
        "exports", "etcd sync", "embedded", "ratio", "etcd RSS", "embedded", "B/export", "B/export"
    );
    println!(
        "{:>9} | {:>13} {:>13} {:>7} | {:>12} {:>12} {:>9} {:>9}",
        "", "(ms)", "sync (ms)", "e/emb", "delta (MiB)", "RSS (MiB)", "etcd", "embedded"
    );
    for &n in sizes {
        load(&etcd, &layout(n), n).await?;
        let (etcd_ms, etcd_kib) = run_child("etcd", &endpoint, n)?;
        let (emb_ms, emb_kib) = run_child("embedded", "-", n)?;
        println!(
            "{:>9} | {:>13.1} {:>13.1} {:>7.2} | {:>12.1} {:>12.1} {:>9.0} {:>9.0}",
            n,
            etcd_ms,
            emb_ms,
            etcd_ms / emb_ms.max(0.001),
            etcd_kib as f64 / 1024.0,
            emb_kib as f64 / 1024.0,
            etcd_kib as f64 * 1024.0 / n as f64,
            emb_kib as f64 * 1024.0 / n as f64,
        );
    }
    println!();
    // Publisher and watcher on separate etcd connections, like two gateways.
    let (e50, e99) = latency(
        Arc::new(etcd_store(&endpoint).await?),
        Arc::new(etcd_store(&endpoint).await?),
        samples,
    )
    .await?;
    let embedded = EmbeddedStore::new();
    let (m50, m99) = latency(Arc::new(embedded.clone()), Arc::new(embedded), samples).await?;
    println!(
        "publisher update -> visible in another watcher's snapshot ({samples} samples, target p99 <= 50 ms on loopback etcd)"
    );
    println!("{:>10} | {:>10} {:>10}", "", "p50 (ms)", "p99 (ms)");
    println!("{:>10} | {:>10.2} {:>10.2}", "etcd", e50, e99);
    println!("{:>10} | {:>10.2} {:>10.2}", "embedded", m50, m99);
    println!(
        "{:>10} | {:>10.1} {:>10.1}",
        "ratio",
        e50 / m50.max(0.001),
        e99 / m99.max(0.001)
    );
    Ok(())
}

//! Scale benchmark: a fresh gateway joins a federation of 100 clusters on a 3-member etcd.
//!
//! For each size (export records: clusters × services, every service exported by every
//! cluster, as the federation is laid out) it
//! 1. starts a 3-member etcd on loopback (test-support's `EtcdCluster`, quota raised);
//! 2. plays 100 clusters' publishers into it (`meshup_tests::scale`): the project's own
//!    publisher, one per cluster, each with its own lease and keep-alives, writing its
//!    records in batched transactions as a gateway does; the time until every publisher is
//!    in sync is printed;
//! 3. starts a real `meshup gateway` process of a new cluster (the shared harness's config)
//!    and times, from the spawn, its `/ready` and its first DNS answer (a real UDP query) for
//!    the lexically last service, which its VIP allocator reaches last; then its RSS
//!    (VmRSS);
//! 4. under a background churn (export updates of one cluster at `--churn` per second), adds
//!    a new service to the catalog `--samples` times and times each until the joined
//!    gateway's DNS answers it: p50 / p99;
//! 5. unless `--outage 0`: kills the etcd leader under that churn (`faults`);
//! 6. unless `--join-leave off`: one more cluster exporting every service joins and leaves by
//!    lease expiry (`membership`): until the joiner holds and drops its records;
//! 7. unless `--outage 0`: every member down for `--outage` seconds (`faults`): DNS answers
//!    and listeners through the outage, the catch-up and relists after it.
//!
//! Size 0 is the idle row: no publishers, the gateway joins an empty catalog, and its RSS is
//! read `IDLE_SETTLE` after `/ready` (the idle target: ≤ 16 MiB, a release build).
//!
//! Everything (etcd members, publishers, gateway, this load generator) shares the machine's
//! cores, so figures are from one run on a noisy machine, printed as a table.
//!
//! Usage (the `meshup` binary is taken from beside this one, so build both in one profile):
//! `cargo build -p meshup-gateway --bin meshup && cargo build -p meshup-bench-scale &&
//!  target/debug/meshup-bench-scale --sizes 1000,10000,100000`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use meshup_core::catalog::ExportKey;
use meshup_core::model::encode;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::keys::KeyLayout;
use meshup_federation::store::{Store, Txn, TxnOp};
use meshup_tests::dns::query_a;
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec};
use meshup_tests::scale::{
    self, NAMESPACE, cluster, clusterset_name, export_record, gateway_id, gateway_record, service,
};
use meshup_tests::{EtcdCluster, poll_every};
use tokio_util::sync::CancellationToken;

mod faults;
mod membership;

/// The catalog's key prefix.
const PREFIX: &str = "/scale";
/// The joining gateway's cluster.
const JOINER: &str = "joiner";
/// The cluster whose exports the latency probes add.
const PROBE_CLUSTER: &str = "probe";
/// The publishers' lease TTL: the product default.
const LEASE_TTL: Duration = Duration::from_secs(10);
/// Longest wait for the joiner's `/ready` and its first answer, at least.
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// Longest wait for the joiner's `/ready` and its first answer at `records`: `JOIN_WAIT`,
/// or 300 µs per record if longer (300 s at 1M), so that a slow sync is measured, not cut.
fn join_wait(records: usize) -> Duration {
    JOIN_WAIT.max(Duration::from_micros(300) * u32::try_from(records).unwrap_or(u32::MAX))
}
/// Longest wait for one probe's answer.
const PROBE_WAIT: Duration = Duration::from_secs(10);
/// Probes that time out before the latency measurement is given up.
const PROBE_TIMEOUTS: usize = 3;
/// How long the idle row's gateway runs after `/ready` before its RSS is read: an idle
/// gateway, not one still starting.
const IDLE_SETTLE: Duration = Duration::from_secs(5);
/// The target for an idle gateway with an empty catalog.
const IDLE_TARGET_MIB: f64 = 16.0;
/// etcd's backend quota: 8 GiB, enough for 1M records and their history.
const QUOTA_BYTES: &str = "--quota-backend-bytes=8589934592";

#[derive(Debug, Clone)]
struct Options {
    sizes: Vec<usize>,
    clusters: usize,
    samples: usize,
    churn_per_s: u32,
    vip_cidr: String,
    /// The joiner's `pinned_names:`; `None`: left out (all).
    pinned_names: Option<String>,
    lease_ttl: Duration,
    /// Publishers started together; the next wave starts once these are in sync.
    wave: usize,
    /// How long every etcd member is down in the outage phase; zero: no fault phases.
    outage: Duration,
    /// Whether one more cluster joins and leaves after the probes.
    join_leave: bool,
}

/// One size's figures.
#[derive(Debug, Default)]
struct Row {
    records: usize,
    clusters: usize,
    services: usize,
    load: Duration,
    ready: Option<Duration>,
    last_answer: Option<Duration>,
    rss_kib: u64,
    /// RSS again once the churn probes are done (tens of seconds later): what the
    /// allocator kept of the join's transient memory.
    settled_rss_kib: Option<u64>,
    probes: Vec<Duration>,
    probe_timeouts: usize,
    churned: u64,
    churn_errors: u64,
    leader_kill: Option<faults::LeaderKill>,
    membership: Option<membership::Membership>,
    outage: Option<faults::Outage>,
}

fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let meshup = meshup_beside_me()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let certs = Certs::with_binary(&meshup, &[JOINER]);
    let mut rows = Vec::new();
    for &n in &options.sizes {
        eprintln!("== {n} records: starting a 3-member etcd");
        let mut etcd = EtcdCluster::start_with_args(&[
            QUOTA_BYTES,
            "--heartbeat-interval=50",
            "--election-timeout=500",
        ]);
        let row = runtime.block_on(run_size(&mut etcd, &certs, &options, n))?;
        if row.records > 0 {
            print_row(&row);
        }
        rows.push(row);
        drop(etcd);
    }
    println!();
    print_table(&options, &rows);
    Ok(())
}

const USAGE: &str = "usage: meshup-bench-scale [--sizes N,N,..] [--clusters N] [--samples N] [--churn PER_S] [--vip-cidr CIDR] [--pinned-names all|none] [--lease-ttl SECS] [--outage SECS] [--join-leave on|off]
  --sizes         records per run (clusters × services; 0: the idle row), default 1000,10000,100000
  --clusters      clusters publishing, default 100
  --samples       change → DNS probes per size, default 100
  --churn         background export changes per second during the probes, default 100
  --vip-cidr      the joining gateway's vip_cidr, default 127.80.0.0/16
  --pinned-names  the joining gateway's pinned_names (all or none), default all
  --lease-ttl     lease TTL of the played publishers and the joiner, seconds, default 10
  --wave          publishers started at a time (the next wave once these are in sync), default 10
  --outage        seconds every etcd member is down after the leader kill; 0: neither fault, default 30
  --join-leave    one more cluster joins and leaves by lease expiry after the probes (on|off), default on
The meshup binary of the same build (target/<profile>/meshup) is used; see bench/scale/README.md.";

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        sizes: vec![1_000, 10_000, 100_000],
        clusters: 100,
        samples: 100,
        churn_per_s: 100,
        vip_cidr: "127.80.0.0/16".into(),
        pinned_names: None,
        lease_ttl: LEASE_TTL,
        wave: 10,
        outage: Duration::from_secs(30),
        join_leave: true,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        std::process::exit(0);
    }
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .with_context(|| format!("{} needs a value", args[i]))?;
        match args[i].as_str() {
            "--sizes" => {
                options.sizes = value
                    .split(',')
                    .map(|s| s.parse().with_context(|| format!("size {s:?}")))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--clusters" => options.clusters = value.parse()?,
            "--samples" => options.samples = value.parse()?,
            "--churn" => options.churn_per_s = value.parse()?,
            "--vip-cidr" => options.vip_cidr = value.clone(),
            "--pinned-names" => options.pinned_names = Some(value.clone()),
            "--lease-ttl" => options.lease_ttl = Duration::from_secs(value.parse()?),
            "--wave" => options.wave = value.parse()?,
            "--outage" => options.outage = Duration::from_secs(value.parse()?),
            "--join-leave" => {
                options.join_leave = match value.as_str() {
                    "on" => true,
                    "off" => false,
                    other => bail!("--join-leave takes on or off, not {other:?}"),
                }
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
        i += 2;
    }
    anyhow::ensure!(options.clusters > 0, "--clusters must be at least 1");
    anyhow::ensure!(options.wave > 0, "--wave must be at least 1");
    Ok(options)
}

/// The `meshup` binary of the same build as this benchmark (`target/<profile>/meshup`).
fn meshup_beside_me() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("meshup");
    anyhow::ensure!(
        bin.exists(),
        "no meshup binary at {}: build it in the same profile (cargo build -p meshup-gateway --bin meshup)",
        bin.display()
    );
    Ok(bin)
}

async fn run_size(
    etcd: &mut EtcdCluster,
    certs: &Certs,
    options: &Options,
    n: usize,
) -> anyhow::Result<Row> {
    if n == 0 {
        return run_idle(etcd, certs, options).await;
    }
    let services = (n / options.clusters).max(1);
    let mut row = Row {
        records: services * options.clusters,
        clusters: options.clusters,
        services,
        ..Row::default()
    };
    let store: Arc<dyn Store> = Arc::new(
        EtcdStore::connect(EtcdOptions {
            endpoints: etcd.endpoints(),
            request_timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .await?,
    );
    let layout = KeyLayout::new(PREFIX)?;
    let cancel = CancellationToken::new();

    // 100 clusters' publishers, each with its lease and keep-alives.
    let started = Instant::now();
    let publishers = scale::publish(
        store.clone(),
        &layout,
        options.clusters,
        services,
        options.wave,
        options.lease_ttl,
        Duration::from_secs(1800),
        &cancel,
    )
    .await?;
    row.load = started.elapsed();
    eprintln!(
        "   {} records of {} clusters published in {:.1} s",
        row.records,
        options.clusters,
        row.load.as_secs_f64()
    );

    // The joining gateway.
    let (gateway, spawned) = start_joiner(etcd, certs, options);
    let dns = gateway.dns_addr().await;
    let last = clusterset_name(&service(services - 1));
    let wait = join_wait(row.records);
    let ready = wait_ready(&gateway, spawned, wait);
    let answered = tokio::task::spawn_blocking(move || {
        poll_every(wait, Duration::from_millis(2), || {
            query_a(dns, &last, Duration::from_millis(500)).is_ok_and(|a| !a.addresses().is_empty())
        })
        .map(|at| at - spawned)
    });
    row.ready = ready.await?;
    row.last_answer = answered.await?;
    row.rss_kib = meshup_tests::procs::rss_kib(gateway.pid())?;
    eprintln!(
        "   /ready {:?}, last service answered {:?}, RSS {} MiB",
        row.ready,
        row.last_answer,
        row.rss_kib / 1024
    );

    if row.last_answer.is_some() && options.samples > 0 {
        let churn_stop = cancel.child_token();
        let churned = Arc::new(AtomicU64::new(0));
        let churn_errors = Arc::new(AtomicU64::new(0));
        let lease = publishers[0]
            .status()
            .borrow()
            .lease
            .context("cluster 0's publisher holds no lease")?;
        let churn = tokio::spawn(churn(
            store.clone(),
            layout.clone(),
            lease,
            services,
            options.churn_per_s,
            churned.clone(),
            churn_errors.clone(),
            churn_stop.clone(),
        ));
        let probe_lease = probe_gateway(store.as_ref(), &layout).await?;
        probe(
            store.clone(),
            &layout,
            dns,
            options.samples,
            probe_lease,
            &mut row,
        )
        .await?;
        if !options.outage.is_zero() {
            row.leader_kill = Some(
                faults::leader_kill(
                    etcd,
                    store.as_ref(),
                    &layout,
                    &gateway,
                    dns,
                    probe_lease,
                    &churn_errors,
                )
                .await?,
            );
        }
        churn_stop.cancel();
        churn.await?;
        row.churned = churned.load(Ordering::Relaxed);
        row.churn_errors = churn_errors.load(Ordering::Relaxed);
        row.settled_rss_kib = Some(meshup_tests::procs::rss_kib(gateway.pid())?);
        eprintln!(
            "   RSS after the probes {} MiB",
            row.settled_rss_kib.unwrap_or_default() / 1024
        );
        if options.join_leave {
            row.membership = Some(
                membership::join_and_leave(
                    store.clone(),
                    &layout,
                    &gateway,
                    options.clusters,
                    services,
                    options.lease_ttl,
                    &cancel,
                )
                .await?,
            );
        }
        if !options.outage.is_zero() {
            row.outage = Some(
                faults::outage(
                    etcd,
                    store.as_ref(),
                    &layout,
                    &gateway,
                    dns,
                    services,
                    options.outage,
                )
                .await?,
            );
        }
        store.revoke_lease(probe_lease).await?;
    }
    drop(gateway);
    cancel.cancel();
    for p in publishers {
        p.abort();
    }
    Ok(row)
}

/// Starts the joining gateway (a real process); returns it and when it was spawned.
fn start_joiner(etcd: &EtcdCluster, certs: &Certs, options: &Options) -> (GatewayProcess, Instant) {
    let spec = GatewaySpec {
        lease_ttl: options.lease_ttl,
        log_filter: Some("info"),
        pinned_names: options.pinned_names.as_deref(),
        ..GatewaySpec::new(JOINER, &options.vip_cidr, etcd, certs, PREFIX)
    };
    let spawned = Instant::now();
    (GatewayProcess::start(spec), spawned)
}

/// Polls the gateway's `/ready` every 5 ms until it answers 200: the time since `spawned`,
/// or `None` after `limit`.
fn wait_ready(
    gateway: &GatewayProcess,
    spawned: Instant,
    limit: Duration,
) -> tokio::task::JoinHandle<Option<Duration>> {
    let admin = gateway.admin_addr();
    tokio::task::spawn_blocking(move || {
        poll_every(limit, Duration::from_millis(5), || {
            matches!(meshup_tests::http::get(admin, "/ready"), Ok((200, _)))
        })
        .map(|at| at - spawned)
    })
}

/// Polls the gateway's `/metrics` every 5 ms until `metric` satisfies `done`; when it did,
/// or `None` after `limit`.
pub(crate) async fn metric_until(
    admin: SocketAddr,
    metric: &'static str,
    limit: Duration,
    done: impl Fn(f64) -> bool + Send + 'static,
) -> Option<Instant> {
    tokio::task::spawn_blocking(move || {
        poll_every(limit, Duration::from_millis(5), || {
            let Ok((200, body)) = meshup_tests::http::get(admin, "/metrics") else {
                return false;
            };
            meshup_tests::gateways::metric_in(&body, metric).is_ok_and(&done)
        })
    })
    .await
    .ok()
    .flatten()
}

/// The idle row: a gateway joins an empty catalog; RSS `IDLE_SETTLE` after `/ready`.
async fn run_idle(etcd: &EtcdCluster, certs: &Certs, options: &Options) -> anyhow::Result<Row> {
    let (gateway, spawned) = start_joiner(etcd, certs, options);
    let ready = wait_ready(&gateway, spawned, JOIN_WAIT).await?;
    anyhow::ensure!(
        ready.is_some(),
        "the idle gateway was not ready within {JOIN_WAIT:?}"
    );
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss_kib = meshup_tests::procs::rss_kib(gateway.pid())?;
    // Of it, the process's own memory (heap, stacks) against the binary's and libraries'
    // pages, which other processes of the same binary share.
    let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", gateway.pid()))
        .context("read smaps_rollup")?;
    let anon_kib = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no Anonymous: line in smaps_rollup")?;
    eprintln!(
        "   idle: /ready {ready:?}, RSS {:.1} MiB {IDLE_SETTLE:?} later, of it anonymous {:.1} MiB, file-backed {:.1} MiB",
        rss_kib as f64 / 1024.0,
        anon_kib as f64 / 1024.0,
        rss_kib.saturating_sub(anon_kib) as f64 / 1024.0
    );
    Ok(Row {
        ready,
        rss_kib,
        ..Row::default()
    })
}

/// Background churn: rewrites cluster 0's export records (healthy endpoints 3 ↔ 2) at
/// `per_s` changes per second, under its publisher's lease, as endpoint health changes do.
#[allow(clippy::too_many_arguments)]
async fn churn(
    store: Arc<dyn Store>,
    layout: KeyLayout,
    lease: i64,
    services: usize,
    per_s: u32,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    if per_s == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_s);
    let mut i = 0usize;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let key = ExportKey {
            cluster: cluster(0),
            gateway: gateway_id(),
            service: service(i % services),
        };
        let healthy = if (i / services).is_multiple_of(2) {
            2
        } else {
            3
        };
        i += 1;
        let put = TxnOp::Put {
            key: Bytes::from(layout.export(&key)),
            value: Bytes::from(encode(&export_record(healthy))),
            lease,
        };
        match store
            .txn(Txn {
                compares: vec![],
                success: vec![put],
                failure: vec![],
            })
            .await
        {
            Ok(_) => done.fetch_add(1, Ordering::Relaxed),
            Err(_) => errors.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Publishes the probe cluster's gateway record under a lease of its own (10 minutes, no
/// keep-alive); the lease, for the probes' exports.
async fn probe_gateway(store: &dyn Store, layout: &KeyLayout) -> anyhow::Result<i64> {
    let lease = store.grant_lease(Duration::from_secs(600)).await?;
    let gw = gateway_record(ClusterName::new(PROBE_CLUSTER)?, 0);
    put(
        store,
        layout.gateway(&gw.cluster, &gw.gateway_id),
        encode(&gw),
        lease,
    )
    .await?;
    Ok(lease)
}

/// Adds a new service (exported by the probe cluster) `samples` times and times each until
/// the joiner's DNS answers it with an address; the key is deleted after each sample.
async fn probe(
    store: Arc<dyn Store>,
    layout: &KeyLayout,
    dns: SocketAddr,
    samples: usize,
    lease: i64,
    row: &mut Row,
) -> anyhow::Result<()> {
    let probe_cluster = ClusterName::new(PROBE_CLUSTER)?;
    for k in 0..samples {
        let key = ExportKey {
            cluster: probe_cluster.clone(),
            gateway: gateway_id(),
            service: ServiceKey::parse(NAMESPACE, &format!("probe-{k:04}"))?,
        };
        let name = clusterset_name(&key.service);
        let at = Instant::now();
        put(
            store.as_ref(),
            layout.export(&key),
            encode(&export_record(3)),
            lease,
        )
        .await?;
        let seen = tokio::task::spawn_blocking(move || {
            poll_every(PROBE_WAIT, Duration::from_millis(1), || {
                query_a(dns, &name, Duration::from_millis(200))
                    .is_ok_and(|a| !a.addresses().is_empty())
            })
        })
        .await?;
        match seen {
            Some(seen) => row.probes.push(seen - at),
            None => {
                // Which side lagged: the allocator (no VIP in the catalog) or the DNS answer.
                let vips = layout.vip(&meshup_core::catalog::VipKey {
                    cluster: ClusterName::new(JOINER)?,
                    service: key.service.clone(),
                    target: None,
                });
                let allocated = meshup_federation::store::get(store.as_ref(), vips)
                    .await?
                    .is_some();
                eprintln!(
                    "   probe {k} unanswered after {PROBE_WAIT:?}; its VIP is {} the catalog",
                    if allocated { "in" } else { "not in" }
                );
                row.probe_timeouts += 1;
                if row.probe_timeouts >= PROBE_TIMEOUTS {
                    eprintln!("   {PROBE_TIMEOUTS} probes unanswered: latency not measured");
                    break;
                }
            }
        }
        store
            .txn(Txn {
                compares: vec![],
                success: vec![TxnOp::Delete {
                    key: Bytes::from(layout.export(&key)),
                }],
                failure: vec![],
            })
            .await?;
    }
    Ok(())
}

async fn put(store: &dyn Store, key: String, value: Vec<u8>, lease: i64) -> anyhow::Result<()> {
    store
        .txn(Txn {
            compares: vec![],
            success: vec![TxnOp::Put {
                key: Bytes::from(key),
                value: Bytes::from(value),
                lease,
            }],
            failure: vec![],
        })
        .await?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "none".into(), |d| format!("{:.2} s", d.as_secs_f64()))
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1}", d.as_secs_f64() * 1000.0),
    )
}

fn print_row(row: &Row) {
    eprintln!(
        "   probes: {} answered, {} timed out; churn {} writes ({} failed)",
        row.probes.len(),
        row.probe_timeouts,
        row.churned,
        row.churn_errors
    );
}

fn print_table(options: &Options, rows: &[Row]) {
    println!(
        "3-member etcd on loopback; {} clusters, every service exported by every cluster; \
         joiner vip_cidr {}, pinned_names {}; churn {}/s; {} probes",
        options.clusters,
        options.vip_cidr,
        options.pinned_names.as_deref().unwrap_or("all (default)"),
        options.churn_per_s,
        options.samples
    );
    println!(
        "| records | clusters × services | publish | `/ready` | first answer, last service | RSS | B/record | RSS after the probes | change → DNS p50 / p99 ms |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows.iter().filter(|r| r.records == 0) {
        let mib = row.rss_kib as f64 / 1024.0;
        println!(
            "| 0 (idle) | – | – | {} | – | {mib:.1} MiB | – | – | – |",
            secs(row.ready)
        );
    }
    for row in rows.iter().filter(|r| r.records > 0) {
        let mut sorted = row.probes.clone();
        sorted.sort();
        let latency = if sorted.is_empty() {
            "not measured".to_owned()
        } else {
            format!(
                "{} / {} ({} of {})",
                ms(percentile(&sorted, 50.0)),
                ms(percentile(&sorted, 99.0)),
                sorted.len(),
                sorted.len() + row.probe_timeouts
            )
        };
        let settled = row.settled_rss_kib.map_or("–".to_owned(), |kib| {
            format!(
                "{:.0} MiB ({} B/record)",
                kib as f64 / 1024.0,
                (kib * 1024) / row.records.max(1) as u64
            )
        });
        println!(
            "| {} | {} × {} | {:.1} s | {} | {} | {:.0} MiB | {} | {settled} | {} |",
            row.records,
            row.clusters,
            row.services,
            row.load.as_secs_f64(),
            secs(row.ready),
            secs(row.last_answer),
            row.rss_kib as f64 / 1024.0,
            (row.rss_kib * 1024) / row.records.max(1) as u64,
            latency
        );
    }
    print_membership(rows);
    print_faults(rows);
    for row in rows.iter().filter(|r| r.records == 0) {
        let mib = row.rss_kib as f64 / 1024.0;
        println!(
            "idle gateway, empty catalog: {mib:.1} MiB RSS {IDLE_SETTLE:?} after /ready (target ≤ {IDLE_TARGET_MIB} MiB, release build) {}",
            if mib <= IDLE_TARGET_MIB {
                "MET"
            } else {
                "MISSED"
            }
        );
    }
}

fn print_membership(rows: &[Row]) {
    if rows.iter().all(|r| r.membership.is_none()) {
        return;
    }
    println!();
    println!(
        "One more cluster joins (every service) and leaves by lease expiry (target: every gateway converged ≤ 5 s)"
    );
    println!(
        "| records | services of the cluster | start → published | start → joiner holds them | publisher stopped → lease expired in etcd | expired → joiner dropped them |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for row in rows.iter().filter(|r| r.records > 0) {
        if let Some(m) = &row.membership {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                row.records,
                m.services,
                secs(m.published),
                secs(m.joined),
                secs(m.expired),
                secs(m.left)
            );
        }
    }
}

fn print_faults(rows: &[Row]) {
    if rows
        .iter()
        .all(|r| r.leader_kill.is_none() && r.outage.is_none())
    {
        return;
    }
    println!();
    println!(
        "Leader killed under the churn (target: converged ≤ 3 s, no relist); then every member down (stale while down: answers unchanged, at most one relist)"
    );
    println!(
        "| records | kill → a write committed | kill → joiner at its revision | kill → DNS answers it | relists | churn writes failed | all members down | DNS answers differed (sweeps × names) | VIP listeners before / end of outage / after | exports before / after | healthy → caught up | relists |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for row in rows.iter().filter(|r| r.records > 0) {
        let kill = row.leader_kill.as_ref().map_or_else(
            || "| – | – | – | – | –".to_owned(),
            |k| {
                format!(
                    "| {} | {} | {} | {} | {}",
                    secs(k.committed),
                    secs(k.converged),
                    secs(k.answered),
                    k.relists,
                    k.churn_errors
                )
            },
        );
        let outage = row.outage.as_ref().map_or_else(
            || "| – | – | – | – | – | –".to_owned(),
            |o| {
                format!(
                    "| {:.0} s | {} ({} × {}) | {:.0} / {:.0} / {:.0} | {:.0} / {:.0} | {} | {}",
                    o.length.as_secs_f64(),
                    o.wrong,
                    o.sweeps,
                    o.names,
                    o.listeners[0],
                    o.listeners[1],
                    o.listeners[2],
                    o.exports[0],
                    o.exports[1],
                    secs(o.caught_up),
                    o.relists
                )
            },
        );
        println!("| {} {kill} {outage} |", row.records);
    }
}

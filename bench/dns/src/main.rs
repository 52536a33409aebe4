//! meshup DNS benchmark helper.
//!
//! - `meshup-bench-dns gen DIR [SERVICES]` writes `DIR/queries.txt` (dnsperf input) and
//!   `DIR/clusterset.local.zone` (an NSD zone with the same names and answers) for the
//!   synthetic catalog.
//! - `meshup-bench-dns serve PORT [SERVICES] [WORKERS]` serves that catalog on
//!   127.0.0.1:PORT with `DnsServer` until stdin closes or SIGTERM/SIGINT.
//!
//! The catalog: SERVICES services (default 1000) `svc-<i>.ns-<i % 10>`, each exported by
//! clusters east, west and south with ports `http`/tcp 8080 and `dns`/udp 53; the local
//! cluster is east.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use meshup_core::catalog::Snapshot;
use meshup_core::names::ClusterName;
use meshup_dns::{DnsConfig, DnsServer, Metrics};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LOCAL: &str = "east";
const CLUSTERS: [&str; 3] = ["east", "west", "south"];
const DEFAULT_SERVICES: usize = 1000;
const ZONE: &str = "clusterset.local";
/// TTL in the NSD zone; meshup's default answer TTL is the same.
const TTL: u32 = 5;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str);
    let services = |i: usize| -> anyhow::Result<usize> {
        arg(i).map_or(Ok(DEFAULT_SERVICES), |s| {
            s.parse().context("SERVICES must be a number")
        })
    };
    match arg(0) {
        Some("gen") => {
            let dir = arg(1).context("usage: gen DIR [SERVICES]")?;
            let snap = meshup_dns::fixture::synthetic(LOCAL, &CLUSTERS, services(2)?)?;
            generate(Path::new(dir), &snap)
        }
        Some("serve") => {
            let port: u16 = arg(1)
                .context("usage: serve PORT [SERVICES] [WORKERS]")?
                .parse()?;
            let snap = meshup_dns::fixture::synthetic(LOCAL, &CLUSTERS, services(2)?)?;
            let workers = arg(3)
                .map_or(Ok(1), str::parse)
                .context("WORKERS must be a number")?;
            serve(port, snap, workers)
        }
        _ => bail!("usage: meshup-bench-dns gen DIR [SERVICES] | serve PORT [SERVICES] [WORKERS]"),
    }
}

/// Writes the dnsperf query file and the equivalent NSD zone.
fn generate(dir: &Path, snap: &Snapshot) -> anyhow::Result<()> {
    let local = ClusterName::new(LOCAL)?;
    let mut zone = String::new();
    let mut queries = String::new();
    writeln!(zone, "$ORIGIN {ZONE}.\n$TTL {TTL}")?;
    writeln!(
        zone,
        "@ IN SOA ns.dns.{ZONE}. hostmaster.{ZONE}. 1 60 10 3600 5\n@ IN NS ns.dns.{ZONE}.\nns.dns IN A 127.0.0.1\ndns-version IN TXT \"1.0.0\""
    )?;
    writeln!(queries, "dns-version.{ZONE} TXT")?;
    for (i, view) in snap.services().enumerate() {
        let base = format!("{}.{}.svc", view.key.name, view.key.namespace);
        let vip = snap.vip(&local, &view.key, None).context("synthetic VIP")?;
        writeln!(zone, "{base} IN {} {vip}", rtype(vip))?;
        for port in &view.ports {
            writeln!(
                zone,
                "_{}._{}.{base} IN SRV 10 100 {} {base}.{ZONE}.",
                port.name,
                port.protocol.as_str(),
                port.port
            )?;
        }
        for cluster in view.clusters.keys() {
            let pinned = snap
                .vip(&local, &view.key, Some(cluster))
                .context("synthetic pinned VIP")?;
            writeln!(zone, "{base}.{cluster} IN {} {pinned}", rtype(pinned))?;
        }
        // The query mix: mostly A on service names, some SRV and cluster-pinned names.
        writeln!(queries, "{base}.{ZONE} A")?;
        writeln!(queries, "{base}.{ZONE} A")?;
        writeln!(queries, "_http._tcp.{base}.{ZONE} SRV")?;
        writeln!(queries, "{base}.{}.{ZONE} A", CLUSTERS[i % CLUSTERS.len()])?;
    }
    std::fs::write(dir.join("clusterset.local.zone"), zone).context("writing zone")?;
    std::fs::write(dir.join("queries.txt"), queries).context("writing queries")?;
    Ok(())
}

fn rtype(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "A" } else { "AAAA" }
}

/// Serves the catalog until stdin reaches EOF or the process is signalled.
fn serve(port: u16, snap: Snapshot, workers: usize) -> anyhow::Result<()> {
    // One runtime thread: the UDP workers are their own threads; the runtime only runs the
    // TCP listener and table rebuilds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let cfg = DnsConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            udp_workers: workers,
            ..DnsConfig::default()
        };
        let (_tx, rx) = watch::channel(Arc::new(snap));
        let mut registry = prometheus_client::registry::Registry::default();
        let server = DnsServer::bind(
            &cfg,
            ClusterName::new(LOCAL)?,
            rx,
            Metrics::register(&mut registry),
        )?;
        println!("listening {}", server.local_addr());
        let shutdown = CancellationToken::new();
        let task = server.spawn(shutdown.clone());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminated() => {}
        }
        shutdown.cancel();
        task.await??;
        anyhow::Ok(())
    })
}

async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

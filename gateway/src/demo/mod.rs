//! `meshup demo`: a live federation of three clusters in one process.
//!
//! Everything is real except the catalog store, which is the embedded one: fresh
//! certificates from a new federation CA, one gateway per cluster with its QUIC endpoint,
//! DNS server, VIP listeners and admin page, and sample backends that say which cluster
//! answered. It prints what to try and runs until Ctrl-C, then drains every gateway.

mod backend;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use meshup_core::model::{PortSpec, Protocol};
use meshup_core::names::{ClusterName, Namespace, ServiceKey, ServiceName};
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use tokio_util::sync::CancellationToken;

use crate::app::Gateway;
use crate::config::{AdminConfig, Config, ExportConfig};
use crate::identity::IdentityFiles;
use crate::tunnel::TunnelConfig;

/// Options of `meshup demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoOptions {
    /// Start, print the federation, check it end to end, and exit instead of running until
    /// Ctrl-C (for scripts and CI).
    #[arg(long)]
    pub check: bool,
}

const TRUST_DOMAIN: &str = "demo.meshup";
const SERVICE_PORT: u16 = 8080;

/// One demo cluster: name, region, VIP range, and the services it exports (service,
/// namespace, callers allowed — empty for everyone).
struct ClusterPlan {
    name: &'static str,
    region: &'static str,
    vip_cidr: &'static str,
    exports: &'static [(&'static str, &'static str, &'static [&'static str])],
}

const PLAN: &[ClusterPlan] = &[
    ClusterPlan {
        name: "east",
        region: "us-east-1",
        vip_cidr: "127.77.1.0/24",
        exports: &[("hello", "demo", &[])],
    },
    ClusterPlan {
        name: "west",
        region: "us-west-2",
        vip_cidr: "127.77.2.0/24",
        exports: &[("hello", "demo", &[]), ("pay", "prod", &[])],
    },
    ClusterPlan {
        name: "north",
        region: "eu-north-1",
        vip_cidr: "127.77.3.0/24",
        exports: &[
            ("hello", "demo", &[]),
            ("pay", "prod", &[]),
            ("ledger", "prod", &["west"]),
        ],
    },
];

/// Runs the demo.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("meshup-demo-")
        .tempdir()
        .context("creating the demo's certificate directory")?;
    let ca = dir.path().join("ca");
    crate::certs::init_ca(TRUST_DOMAIN, &ca)?;
    let store = EmbeddedStore::new();
    let stop_backends = CancellationToken::new();
    let mut gateways = Vec::new();
    for plan in PLAN {
        let certs = dir.path().join(plan.name);
        crate::certs::issue(&ca, plan.name, &certs, Duration::from_secs(24 * 3600))?;
        let config = cluster_config(plan, &certs, &stop_backends).await?;
        let gateway = Gateway::start(config, Some(&store))
            .await
            .with_context(|| format!("starting the gateway of {}", plan.name))?;
        gateways.push(gateway);
    }
    wait_converged(&gateways).await?;
    print_federation(&gateways);

    if opts.check {
        let result = check_end_to_end(&gateways).await;
        stop(gateways, stop_backends).await;
        return result;
    }
    println!("\nRunning. Press Ctrl-C to drain and stop.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    println!("\nDraining…");
    stop(gateways, stop_backends).await;
    Ok(())
}

async fn stop(gateways: Vec<Gateway>, backends: CancellationToken) {
    futures::future::join_all(gateways.into_iter().map(Gateway::drain)).await;
    backends.cancel();
}

async fn cluster_config(
    plan: &ClusterPlan,
    certs: &Path,
    stop: &CancellationToken,
) -> anyhow::Result<Config> {
    let cluster = ClusterName::new(plan.name)?;
    let mut exports = Vec::new();
    for (name, ns, callers) in plan.exports {
        let endpoint = backend::spawn(format!("{name}.{ns}"), plan.name.to_string(), stop.clone())
            .await
            .context("starting a sample backend")?;
        exports.push(ExportConfig {
            name: ServiceName::new(name)?,
            namespace: Namespace::new(ns)?,
            ports: vec![PortSpec {
                name: "http".into(),
                port: SERVICE_PORT,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![endpoint],
            allowed_callers: callers
                .iter()
                .map(|c| ClusterName::new(c))
                .collect::<Result<_, _>>()?,
            labels: Default::default(),
        });
    }
    let loopback0: SocketAddr = "127.0.0.1:0".parse()?;
    let config = Config {
        cluster,
        gateway_id: None,
        region: plan.region.into(),
        zone: format!("{}a", plan.region),
        trust_domain: TRUST_DOMAIN.into(),
        catalog: CatalogConfig {
            backend: Backend::Embedded,
            prefix: "/meshup-demo".into(),
            lease_ttl: Duration::from_secs(5),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        },
        vip_cidr: plan.vip_cidr.parse()?,
        tunnel: TunnelConfig {
            listen: loopback0,
            drain_deadline: Duration::from_secs(5),
            ..TunnelConfig::with_files(IdentityFiles::in_dir(certs))
        },
        dns: meshup_dns::DnsConfig {
            listen: loopback0,
            ..Default::default()
        },
        admin: AdminConfig {
            http: loopback0,
            allow_non_loopback: false,
        },
        exports,
        worker_threads: None,
    };
    config.validate()?;
    Ok(config)
}

/// Every service every cluster should route, with a VIP and a listener.
fn expected_routes() -> Vec<ServiceKey> {
    let mut keys: Vec<ServiceKey> = PLAN
        .iter()
        .flat_map(|p| p.exports.iter())
        .filter_map(|(name, ns, _)| ServiceKey::parse(ns, name).ok())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Waits until every gateway is ready and listens on a VIP for every service.
async fn wait_converged(gateways: &[Gateway]) -> anyhow::Result<()> {
    let services = expected_routes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = gateways.iter().all(|g| {
            let snapshot = g.snapshots().borrow().clone();
            let listeners = g.listeners();
            g.readiness().is_ready()
                && services.iter().all(|s| {
                    snapshot.vip(g.cluster(), s, None).is_some_and(|vip| {
                        listeners.contains_key(&SocketAddr::new(vip, SERVICE_PORT))
                    })
                })
        });
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "the demo federation did not converge within 20 s: some VIP listeners in 127.77.0.0/16 could not bind (is another `meshup demo` running?)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn print_federation(gateways: &[Gateway]) {
    println!(
        "meshup demo: {} clusters federated on this machine (embedded catalog)\n",
        gateways.len()
    );
    println!(
        "{:<7} {:<22} {:<22} {:<22}",
        "cluster", "status page", "DNS (udp+tcp)", "QUIC"
    );
    for g in gateways {
        let a = g.addrs();
        println!(
            "{:<7} {:<22} {:<22} {:<22}",
            g.cluster().as_str(),
            format!("http://{}/", a.admin),
            a.dns.to_string(),
            a.quic.to_string()
        );
    }
    println!(
        "\nservices (exported by): hello.demo (east, west, north) · pay.prod (west, north) · ledger.prod (north, callers: west only)"
    );
    println!("\nVIPs, by the cluster a client is in:");
    for g in gateways {
        let snapshot = g.snapshots().borrow().clone();
        let vips: Vec<String> = expected_routes()
            .iter()
            .filter_map(|s| {
                snapshot
                    .vip(g.cluster(), s, None)
                    .map(|v| format!("{s}={v}"))
            })
            .collect();
        println!("  {:<6} {}", g.cluster().as_str(), vips.join("  "));
    }
    if let Some(east) = gateways.first() {
        let snapshot = east.snapshots().borrow().clone();
        let vip = |svc: &str, target: Option<&str>| {
            let key: ServiceKey = svc.parse().ok()?;
            let target = target.and_then(|t| ClusterName::new(t).ok());
            snapshot.vip(east.cluster(), &key, target.as_ref())
        };
        let dns = east.addrs().dns;
        println!("\nTry, as a client in cluster east:");
        if let Some(v) = vip("hello.demo", None) {
            try_line(
                &format!("curl http://{v}:{SERVICE_PORT}/"),
                "hello.demo: east serves it itself",
            );
        }
        if let Some(v) = vip("pay.prod", None) {
            try_line(
                &format!("curl http://{v}:{SERVICE_PORT}/"),
                "pay.prod: tunnelled over QUIC to west or north",
            );
        }
        if let Some(v) = vip("pay.prod", Some("north")) {
            try_line(
                &format!("curl http://{v}:{SERVICE_PORT}/"),
                "pay.prod pinned to north",
            );
        }
        if let Some(v) = vip("ledger.prod", None) {
            try_line(
                &format!("curl http://{v}:{SERVICE_PORT}/"),
                "ledger.prod: north allows only west, so east is refused",
            );
        }
        println!(
            "  dig @{} -p {} pay.prod.svc.clusterset.local",
            dns.ip(),
            dns.port()
        );
        println!(
            "  dig @{} -p {} _http._tcp.pay.prod.svc.clusterset.local SRV",
            dns.ip(),
            dns.port()
        );
        println!(
            "  dig @{} -p {} pay.prod.svc.north.clusterset.local",
            dns.ip(),
            dns.port()
        );
        println!("  curl http://{}/metrics", east.addrs().admin);
    }
}

/// Prints one suggested command with its explanation aligned.
fn try_line(command: &str, why: &str) {
    println!("  {command:<34} # {why}");
}

/// `--check`: one request per service from east, through the real listeners and tunnel.
/// Each answer must come from the cluster the federation says should serve it, and the
/// refused call must be refused by north's authorization (its `forbidden` counter rises and
/// east resets the client), not by a timeout or any other error.
async fn check_end_to_end(gateways: &[Gateway]) -> anyhow::Result<()> {
    let east = gateways.first().context("no gateways")?;
    let north = gateways
        .iter()
        .find(|g| g.cluster().as_str() == "north")
        .context("no north gateway")?;
    let snapshot = east.snapshots().borrow().clone();
    let vip = |svc: &str| -> anyhow::Result<SocketAddr> {
        let key: ServiceKey = svc.parse()?;
        let ip = snapshot
            .vip(east.cluster(), &key, None)
            .with_context(|| format!("no VIP for {svc}"))?;
        Ok(SocketAddr::new(ip, SERVICE_PORT))
    };

    // Served locally by east; tunnelled to one of pay.prod's two exporters.
    for (svc, served_by) in [
        ("hello.demo", &["east"][..]),
        ("pay.prod", &["west", "north"]),
    ] {
        let body = http_get(vip(svc)?)
            .await
            .with_context(|| format!("check {svc}: no answer"))?;
        let by = served_by
            .iter()
            .find(|c| body.contains(&format!("hello from {svc} in cluster {c} ")))
            .with_context(|| {
                format!("check {svc}: wanted an answer from {served_by:?}, got {body:?}")
            })?;
        println!("check {svc}: served by {by}");
        println!("{}", body.trim());
    }

    // ledger.prod: only west may call it, so north refuses east before any byte is passed on.
    let forbidden_before = forbidden_streams(north).await?;
    match http_get(vip("ledger.prod")?).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("check ledger.prod: wanted a reset (forbidden), got {other:?}"),
    }
    // North counts the stream when its handler ends, which may be just after east's reset.
    let mut counted = 0;
    for _ in 0..100 {
        counted = forbidden_streams(north).await? - forbidden_before;
        if counted > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(
        counted == 1,
        "check ledger.prod: north counted {counted} forbidden streams, wanted 1"
    );
    println!("check ledger.prod: refused as configured (north: forbidden; east reset the client)");
    Ok(())
}

/// North's count of inbound streams refused as `forbidden`, read from its `/metrics`.
async fn forbidden_streams(gateway: &Gateway) -> anyhow::Result<u64> {
    let addr = gateway.addrs().admin;
    let page = http_request(addr, "/metrics")
        .await
        .context("reading /metrics")?;
    let series = "meshup_tunnel_streams_closed_total{direction=\"inbound\",result=\"forbidden\"}";
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse::<u64>())
        .transpose()
        .context("parsing the forbidden counter")?
        .unwrap_or(0))
}

async fn http_get(addr: SocketAddr) -> std::io::Result<String> {
    http_request(addr, "/").await
}

async fn http_request(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut body))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    Ok(body)
}

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

/// The failover policy the demo gives pay.prod: 80 % of new connections to west, 20 % to
/// north, one level (if west fails, north takes everything). A cluster back from a failure
/// (or a drill) gets traffic again after a 10 s hold-down, short enough for the tour.
pub const PAY_POLICY: &str = r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":80},{"cluster":"north","weight":20}]}],"failback_hold_down":"10s"}"#;

/// The failback hold-down of [`PAY_POLICY`].
const PAY_HOLD_DOWN: Duration = Duration::from_secs(10);

/// Writes [`PAY_POLICY`] into the catalog, as an operator would.
async fn set_pay_policy(store: &EmbeddedStore) -> anyhow::Result<()> {
    let layout = meshup_federation::keys::KeyLayout::new(DEMO_PREFIX)?;
    let key = layout.policy(&"pay.prod".parse()?);
    meshup_federation::store::put(store, key, PAY_POLICY.as_bytes().to_vec(), 0)
        .await
        .context("writing pay.prod's policy")?;
    Ok(())
}

/// The demo's catalog prefix.
const DEMO_PREFIX: &str = "/meshup-demo";

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
    set_pay_policy(&store).await?;
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
                app_protocol: Default::default(),
                endpoint_protocol: Default::default(),
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
            prefix: DEMO_PREFIX.into(),
            lease_ttl: Duration::from_secs(5),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        },
        vip_cidr: plan.vip_cidr.parse()?,
        pinned_names: Default::default(),
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
            grpc: Some(loopback0),
            ..AdminConfig::default()
        },
        exports,
        worker_threads: None,
        http: Default::default(),
        handover: None,
        datapath: None,
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
    let pay: ServiceKey = "pay.prod".parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let done = gateways.iter().all(|g| {
            let snapshot = g.snapshots().borrow().clone();
            let listeners = g.listeners();
            g.readiness().is_ready()
                && snapshot.policy(&pay).is_some()
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
                "pay.prod: over QUIC, 80 % to west, 20 % to north (its policy)",
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
                "ledger.prod: north allows only west, so east refuses at once",
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
        print_tour(east, vip("pay.prod", None));
    }
}

/// The id the tour gives its drill, so the stop command can name it.
const TOUR_DRILL: &str = "tour-west";

/// The guided tour: a failover of pay.prod rehearsed with the `meshup` commands against east's
/// admin API while a client keeps calling. Every command line starts with `  $ ` so a test
/// can run them as printed (tests/tests/demo_tour.rs).
fn print_tour(east: &Gateway, pay_vip: Option<std::net::IpAddr>) {
    let (Some(grpc), Some(pay)) = (east.addrs().grpc, pay_vip) else {
        return;
    };
    let hold = PAY_HOLD_DOWN.as_secs();
    println!(
        "\nTour: rehearse a failover of pay.prod as an operator would. The meshup commands talk to\neast's admin API (gRPC, loopback only):\n"
    );
    println!("  $ export MESHUP_ADMIN={grpc}");
    println!("\n1. In another terminal, a client in east that calls pay.prod twice a second:");
    println!("  $ while sleep 0.5; do curl -sS http://{pay}:{SERVICE_PORT}/; done");
    println!("\n2. Where a new connection goes now, and why for every cluster:");
    println!("  $ meshup resolve pay.prod.svc.clusterset.local");
    println!("  $ meshup clusters");
    println!(
        "\n3. Fail west for pay.prod, as in an outage, for 10 minutes (it ends by itself then).\n   The client keeps working: every new connection goes to north."
    );
    println!(
        "  $ meshup drill start --kind fail --cluster west --service pay.prod --for 10m --why 'demo tour' --who \"$USER\" --id {TOUR_DRILL}"
    );
    println!("  $ meshup resolve pay.prod.svc.clusterset.local");
    println!("  $ meshup services");
    println!(
        "\n4. End the drill. West gets new connections again after the policy's {hold} s failback\n   hold-down, not at once:"
    );
    println!("  $ meshup drill stop {TOUR_DRILL} --who \"$USER\"");
    println!("  $ meshup drill list");
    println!(
        "\n5. The same as a live picture: http://{}/ ; as a stream: meshup events ; for scripts: -o json",
        east.addrs().admin
    );
}

/// Prints one suggested command with its explanation aligned.
fn try_line(command: &str, why: &str) {
    println!("  {command:<34} # {why}");
}

/// `--check`: requests from east through the real listeners and tunnel. Each answer must come
/// from the cluster the federation says should serve it (pay.prod's split must follow its
/// 80/20 policy), and the refused call must be refused by east itself, from the catalog's
/// export rules (east resets the client, north sees no stream), not by a timeout or any other
/// error.
async fn check_end_to_end(gateways: &[Gateway]) -> anyhow::Result<()> {
    let east = gateways.first().context("no gateways")?;
    let north_gw = gateways
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

    // Served locally by east.
    let body = http_get(vip("hello.demo")?)
        .await
        .context("check hello.demo: no answer")?;
    anyhow::ensure!(
        served_by(&body) == Some("east"),
        "check hello.demo: wanted an answer from east, got {body:?}"
    );
    println!("check hello.demo: served by east");
    println!("{}", body.trim());

    // Tunnelled to pay.prod's two exporters by its policy, 80/20.
    let (mut west, mut north) = (0, 0);
    for _ in 0..PAY_CONNECTIONS {
        let body = http_get(vip("pay.prod")?)
            .await
            .context("check pay.prod: no answer")?;
        match served_by(&body) {
            Some("west") => west += 1,
            Some("north") => north += 1,
            _ => anyhow::bail!("check pay.prod: wanted an answer from west or north, got {body:?}"),
        }
    }
    // With 50 draws at 20 %, north gets none with probability 0.8^50 ≈ 1e-5.
    anyhow::ensure!(
        west > north && north > 0,
        "check pay.prod: policy 80/20, got west {west}, north {north} of {PAY_CONNECTIONS}"
    );
    println!(
        "check pay.prod: {PAY_CONNECTIONS} new connections, policy west 80 / north 20: west {west}, north {north}"
    );

    // ledger.prod: only west may call it. East knows from the catalog and never tries north:
    // it resets the client at once, and north sees no stream.
    let forbidden_before = forbidden_streams(north_gw).await?;
    let refused_before = refused_here(east).await?;
    match http_get(vip("ledger.prod")?).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => anyhow::bail!("check ledger.prod: wanted a reset (forbidden), got {other:?}"),
    }
    let refused = refused_here(east).await? - refused_before;
    let forbidden = forbidden_streams(north_gw).await? - forbidden_before;
    anyhow::ensure!(
        refused == 1 && forbidden == 0,
        "check ledger.prod: east counted {refused} connections with no route (wanted 1), north {forbidden} forbidden streams (wanted 0)"
    );
    println!(
        "check ledger.prod: refused as configured (north allows only west: east never tried it and reset the client)"
    );
    Ok(())
}

/// New connections to pay.prod in `--check`.
const PAY_CONNECTIONS: u32 = 50;

/// The `x-served-by` header of a demo backend's answer.
fn served_by(answer: &str) -> Option<&str> {
    answer
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .map(str::trim)
}

/// East's count of ledger.prod connections no cluster could take, from its `/metrics`.
async fn refused_here(gateway: &Gateway) -> anyhow::Result<u64> {
    metric(
        gateway,
        "meshup_service_connections_total{service=\"ledger.prod\",source_cluster=\"east\",destination_cluster=\"none\",result=\"no_route\"}",
    )
    .await
}

/// North's count of inbound streams from east refused as `forbidden`, read from its `/metrics`.
async fn forbidden_streams(gateway: &Gateway) -> anyhow::Result<u64> {
    metric(
        gateway,
        "meshup_tunnel_streams_closed_total{direction=\"inbound\",source_cluster=\"east\",destination_cluster=\"north\",result=\"forbidden\"}",
    )
    .await
}

/// One counter series of a gateway's `/metrics` (0 when absent).
async fn metric(gateway: &Gateway, series: &str) -> anyhow::Result<u64> {
    let addr = gateway.addrs().admin;
    let page = http_request(addr, "/metrics")
        .await
        .context("reading /metrics")?;
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse::<u64>())
        .transpose()
        .with_context(|| format!("parsing {series}"))?
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

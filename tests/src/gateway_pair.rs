//! The meshup gateway pair of the side-by-side benchmarks (bench/tunnel, bench/http): two
//! real `meshup gateway` processes sharing one etcd, started from a (release) binary.
//!
//! Cluster `west` exports the backend as one service per [`Export`] (namespace `bench`);
//! cluster `east` has no local endpoint, so a connection to east's virtual IP for a service
//! goes east → QUIC mTLS → west → backend. The virtual IPs are found the way a client would
//! find them: a DNS query to east's resolver.
//!
//! Everything that depends on the daemon's command line and config format lives in this
//! module, so following changes to the daemon means editing only this file.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::dns::query_a;
use crate::free_port;
use crate::procs::{ChildGuard, find_program};

const TRUST_DOMAIN: &str = "bench.local";
const SERVICE_NAMESPACE: &str = "bench";
/// How long the pair gets to start, meet in the catalog and route a first request.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// Gateway log filter: warnings, plus the few lifecycle lines (VIP allocated, listener
/// bound or closed) that explain a refused connection. Nothing per connection: that would
/// cost time the peers (stunnel `debug = 3`, nginx `warn`) do not pay.
const GATEWAY_LOG: &str = "warn,meshup_gateway::outbound=info,meshup_federation::vips=info";

/// One gateway's ports.
#[derive(Debug, Clone, Copy)]
struct GatewayPorts {
    tunnel: u16,
    dns: u16,
    admin: u16,
}

/// One service west exports, all with the same backend endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Export<'a> {
    /// Service name (namespace `bench`).
    pub name: &'a str,
    /// The service port clients use on the virtual IP.
    pub port: u16,
    /// The port's `app_protocol`: `None` for a plain `tcp` port (spliced), `Some("http")`
    /// for per-request routing.
    pub app_protocol: Option<&'a str>,
    /// The port's `endpoint_protocol`: `Some("http1")` for endpoints that get every
    /// request as HTTP/1.1; `None`: as the client spoke.
    pub endpoint_protocol: Option<&'a str>,
}

/// The running pair: both gateways, their etcd, and the client-facing address of each
/// export (east's virtual IP and the service port), in the order of the exports.
#[derive(Debug)]
pub struct GatewayPair {
    /// West (serving side) first, then east (client side).
    pub gateways: Vec<ChildGuard>,
    /// Not a tunnel process: its CPU is not the pair's.
    pub etcd: ChildGuard,
    pub addrs: Vec<SocketAddr>,
}

/// Starts etcd and both gateways under `dir`; returns once east's DNS names a virtual IP
/// for every export (whether a first request gets through is the caller's probe).
pub async fn start(
    dir: &Path,
    binary: &Path,
    backend: SocketAddr,
    threads: Option<usize>,
    exports: &[Export<'_>],
) -> Result<GatewayPair> {
    anyhow::ensure!(
        !exports.is_empty(),
        "a gateway pair needs at least one export"
    );
    if !binary.is_file() {
        bail!(
            "no meshup binary at {} (build it: cargo build --release -p meshup-gateway, or pass --meshup PATH)",
            binary.display()
        );
    }
    let dir = dir.join("meshup");
    std::fs::create_dir_all(&dir).context("create meshup work dir")?;

    let (etcd, etcd_url) = start_etcd(&dir)?;

    // Certificates as an operator makes them: one CA for the trust domain, one
    // certificate per cluster.
    let ca_dir = dir.join("ca");
    run_meshup(
        binary,
        &[
            "certs",
            "init",
            "--trust-domain",
            TRUST_DOMAIN,
            "--out",
            path_str(&ca_dir)?,
        ],
    )
    .await?;

    let mut gateways = Vec::new();
    let mut east_ports = None;
    for (cluster, exports_backend) in [("west", true), ("east", false)] {
        let cert_dir = dir.join(format!("certs-{cluster}"));
        run_meshup(
            binary,
            &[
                "certs",
                "issue",
                "--ca",
                path_str(&ca_dir)?,
                "--cluster",
                cluster,
                "--out",
                path_str(&cert_dir)?,
            ],
        )
        .await?;
        let ports = GatewayPorts {
            tunnel: free_udp_port()?,
            dns: free_udp_port()?,
            admin: free_port()?,
        };
        let config = gateway_config(
            cluster,
            &etcd_url,
            &cert_dir,
            ports,
            exports_backend.then_some((backend, exports)),
            threads,
        );
        let config_path = dir.join(format!("{cluster}.yaml"));
        std::fs::write(&config_path, config).context("write gateway config")?;
        check_config(binary, &config_path).await?;

        let mut cmd = Command::new(binary);
        cmd.args(["gateway", "--config"])
            .arg(&config_path)
            // See GATEWAY_LOG.
            .env(
                "MESHUP_LOG",
                // An operator's own MESHUP_LOG wins, for debugging the pair.
                std::env::var("MESHUP_LOG").unwrap_or_else(|_| GATEWAY_LOG.to_owned()),
            );
        let mut gateway = ChildGuard::spawn(
            &format!("meshup gateway ({cluster})"),
            cmd,
            &dir.join(format!("{cluster}.log")),
        )?;
        let admin = SocketAddr::from(([127, 0, 0, 1], ports.admin));
        gateway.wait_for_port(admin, Duration::from_secs(15))?;
        wait_ready(&mut gateway, admin).await?;
        if cluster == "east" {
            east_ports = Some(ports);
        }
        gateways.push(gateway);
    }
    let east_ports = east_ports.context("east gateway was not started")?;
    let mut addrs = Vec::with_capacity(exports.len());
    for export in exports {
        match find_vip(&mut gateways, east_ports, export.name).await {
            Ok(vip) => addrs.push(SocketAddr::from((vip, export.port))),
            Err(e) => {
                // East's own view of the service is the quickest clue to what is missing.
                let admin = SocketAddr::from(([127, 0, 0, 1], east_ports.admin));
                let status = admin_get(admin, "/status")
                    .await
                    .map_or_else(|e| format!("(GET /status failed: {e:#})"), |(_, body)| body);
                return Err(e).context(format!("east's admin /status: {status}"));
            }
        }
    }
    Ok(GatewayPair {
        gateways,
        etcd,
        addrs,
    })
}

/// How long the pair gets, after [`start`], to route a first request (the catalog may need
/// a moment more to carry west's endpoints to east).
pub const FIRST_REQUEST_LIMIT: Duration = READY_LIMIT;

/// The gateway config, following the daemon's YAML format.
fn gateway_config(
    cluster: &str,
    etcd_url: &str,
    cert_dir: &Path,
    ports: GatewayPorts,
    exports: Option<(SocketAddr, &[Export<'_>])>,
    threads: Option<usize>,
) -> String {
    let exports = match exports {
        Some((backend, exports)) => {
            let mut text = "exports:\n".to_owned();
            for e in exports {
                let app = e
                    .app_protocol
                    .map_or(String::new(), |a| format!(", app_protocol: {a}"))
                    + &e.endpoint_protocol
                        .map_or(String::new(), |p| format!(", endpoint_protocol: {p}"));
                text.push_str(&format!(
                    "  - name: {name}\n    namespace: {SERVICE_NAMESPACE}\n    ports: [{{ name: p{port}, port: {port}, protocol: tcp{app} }}]\n    endpoints: [\"{backend}\"]\n",
                    name = e.name,
                    port = e.port,
                ));
            }
            text
        }
        None => "exports: []\n".to_owned(),
    };
    let cert_dir = cert_dir.display();
    let threads = threads.map_or(String::new(), |n| format!("worker_threads: {n}\n"));
    format!(
        "cluster: {cluster}\n\
         gateway_id: {cluster}-0\n\
         trust_domain: {TRUST_DOMAIN}\n\
         catalog:\n  backend: etcd\n  endpoints: [\"{etcd_url}\"]\n  prefix: /bench\n  lease_ttl: 5s\n  allow_loopback_addresses: true\n\
         vip_cidr: 127.77.0.0/16\n\
         tunnel:\n  listen: 127.0.0.1:{tunnel}\n  cert: {cert_dir}/cert.pem\n  key: {cert_dir}/key.pem\n  bundle: {cert_dir}/bundle.pem\n\
         dns:\n  listen: 127.0.0.1:{dns}\n\
         admin:\n  http: 127.0.0.1:{admin}\n\
         {threads}{exports}",
        tunnel = ports.tunnel,
        dns = ports.dns,
        admin = ports.admin,
    )
}

/// Asks east's DNS for the service's virtual IP until it answers (the catalog carries
/// west's export to east asynchronously).
async fn find_vip(
    gateways: &mut [ChildGuard],
    east: GatewayPorts,
    service: &str,
) -> Result<Ipv4Addr> {
    let name = format!("{service}.{SERVICE_NAMESPACE}.svc.clusterset.local");
    let server = SocketAddr::from(([127, 0, 0, 1], east.dns));
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        for gateway in gateways.iter_mut() {
            gateway.ensure_running()?;
        }
        let query = name.clone();
        let answer =
            tokio::task::spawn_blocking(move || query_a(server, &query, Duration::from_secs(1)))
                .await
                .context("DNS query task")?;
        let error = match answer {
            Ok(answer) => match answer.addresses().iter().find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            }) {
                Some(v4) => return Ok(v4),
                None => anyhow::anyhow!("answer without A records: {answer:?}"),
            },
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(error).with_context(|| {
                format!("east's DNS at {server} gave no address for {name} within {READY_LIMIT:?}")
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the gateway's admin `/ready` answers 200 (bound, catalog reachable).
async fn wait_ready(gateway: &mut ChildGuard, admin: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        gateway.ensure_running()?;
        let last = match admin_get(admin, "/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("{code} {body}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "gateway not ready within {READY_LIMIT:?} (last /ready: {last}); end of its log:\n{}",
                gateway.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A bounded HTTP/1.1 GET on the admin server: (status code, body).
async fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .with_context(|| format!("connect admin {admin}"))?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .context("write admin request")?;
        let mut text = Vec::new();
        stream
            .read_to_end(&mut text)
            .await
            .context("read admin response")?;
        anyhow::Ok(String::from_utf8_lossy(&text).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .with_context(|| format!("GET {path} on {admin}: no answer within 2 s"))??;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("GET {path} on {admin}: no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    Ok((code, body))
}

/// Starts a single-member etcd on free loopback ports with its data in `dir`.
fn start_etcd(dir: &Path) -> Result<(ChildGuard, String)> {
    let program = find_program(&["etcd"], "etcd-server")?;
    let client_port = free_port()?;
    let peer_port = free_port()?;
    let client_url = format!("http://127.0.0.1:{client_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(program);
    cmd.arg("--name")
        .arg("bench")
        .arg("--data-dir")
        .arg(dir.join("etcd-data"))
        .arg("--listen-client-urls")
        .arg(&client_url)
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer_url)
        .arg("--initial-cluster")
        .arg(format!("bench={peer_url}"))
        .arg("--log-level")
        .arg("warn");
    let mut etcd = ChildGuard::spawn("etcd", cmd, &dir.join("etcd.log"))?;
    etcd.wait_for_port(
        SocketAddr::from(([127, 0, 0, 1], client_port)),
        Duration::from_secs(15),
    )?;
    Ok((etcd, client_url))
}

/// Validates a config with `meshup config check` so a format change fails with the
/// daemon's own message instead of a gateway that exits at start.
async fn check_config(binary: &Path, config: &Path) -> Result<()> {
    run_meshup(binary, &["config", "check", path_str(config)?])
        .await
        .with_context(|| {
            format!(
                "config {}:\n{}",
                config.display(),
                std::fs::read_to_string(config).unwrap_or_default()
            )
        })
}

/// Runs a one-shot `meshup` subcommand, bounded in time, failing with its output.
async fn run_meshup(binary: &Path, args: &[&str]) -> Result<()> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(binary)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("meshup {} took longer than 30 s", args.join(" ")))?
    .with_context(|| format!("run meshup {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "meshup {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A loopback UDP port that is free right now (the QUIC tunnel and DNS listen on UDP).
fn free_udp_port() -> Result<u16> {
    // Take one that is free for TCP as well: the DNS listener may also bind TCP.
    for _ in 0..20 {
        let port = free_port()?;
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port free for both TCP and UDP after 20 tries")
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

/// Default binary: `target/release/meshup` in the workspace (CARGO_TARGET_DIR is not
/// known here: run.sh passes `--meshup`).
pub fn default_binary() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Canonical only for readable messages; a missing directory keeps the joined path.
    let workspace = workspace.canonicalize().unwrap_or(workspace);
    workspace.join("target/release/meshup")
}

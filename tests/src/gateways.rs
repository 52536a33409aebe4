//! Real `meshup gateway` processes on a real etcd (or each on its own embedded catalog), set
//! up as an operator would: certificates
//! made with the `meshup certs` CLI, one YAML config file per gateway, the process started
//! from the binary, readiness and routes read from its admin server.
//!
//! What depends on a process dying (kill -9), being paused (SIGSTOP) or told to stop
//! (SIGTERM) can only be shown with real processes. The binary is the one under test
//! ([`meshup_bin`], checked not to be stale) unless a benchmark names another (a release
//! build) with [`Certs::with_binary`]: the gateways run the binary that made their
//! certificates.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::{EtcdEndpoints, eventually_ok, meshup_bin};

/// The federation's SPIFFE trust domain.
pub const TRUST_DOMAIN: &str = "proc.test";
/// Lease TTL of the gateways: etcd 3.4's minimum.
pub const LEASE_TTL: Duration = Duration::from_secs(2);

/// A free loopback port for a gateway's listener.
pub fn port() -> u16 {
    crate::free_port().expect("a free loopback port")
}

/// A federation's certificates, made with the real CLI, and the binary that made them.
#[derive(Debug)]
pub struct Certs {
    dir: tempfile::TempDir,
    binary: PathBuf,
}

impl Certs {
    /// A CA and one certificate per cluster, made by the binary under test.
    pub fn new(clusters: &[&str]) -> Self {
        Self::with_binary(&meshup_bin(), clusters)
    }

    /// The same, made by `binary`, which also runs the gateways started with these.
    pub fn with_binary(binary: &Path, clusters: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca");
        run_meshup(
            binary,
            &[
                "certs",
                "init",
                "--trust-domain",
                TRUST_DOMAIN,
                "--out",
                path_str(&ca),
            ],
        );
        for c in clusters {
            let out = dir.path().join(c);
            run_meshup(
                binary,
                &[
                    "certs",
                    "issue",
                    "--ca",
                    path_str(&ca),
                    "--cluster",
                    c,
                    "--out",
                    path_str(&out),
                ],
            );
        }
        Self {
            dir,
            binary: binary.to_owned(),
        }
    }

    /// The directory of `cluster`'s certificate, key and bundle.
    pub fn of(&self, cluster: &str) -> PathBuf {
        self.dir.path().join(cluster)
    }

    /// Issues an operator certificate (`meshup certs issue --operator NAME`) from the same CA;
    /// returns its directory (cert.pem, key.pem, bundle.pem).
    pub fn operator(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("operator-{name}"));
        let ca = self.dir.path().join("ca");
        run_meshup(
            &self.binary,
            &[
                "certs",
                "issue",
                "--ca",
                path_str(&ca),
                "--operator",
                name,
                "--out",
                path_str(&out),
            ],
        );
        out
    }

    /// Issues `cluster` a new certificate valid for `lifetime` into its directory, as an
    /// operator's rotation does (`meshup certs issue --lifetime`; key, then certificate, each
    /// renamed into place). Running gateways reload it from disk.
    pub fn rotate(&self, cluster: &str, lifetime: Duration) {
        let out = self.of(cluster);
        let ca = self.dir.path().join("ca");
        let lifetime = format!("{}s", lifetime.as_secs());
        run_meshup(
            &self.binary,
            &[
                "certs",
                "issue",
                "--ca",
                path_str(&ca),
                "--cluster",
                cluster,
                "--out",
                path_str(&out),
                "--lifetime",
                &lifetime,
            ],
        );
    }

    /// The `meshup` binary these were made with.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// A temp path as the `&str` a command line or config file takes.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn run_meshup(binary: &Path, args: &[&str]) {
    let out = Command::new(binary)
        .args(args)
        .output()
        .expect("run meshup");
    assert!(
        out.status.success(),
        "meshup {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What one gateway process is: its cluster, catalog and exports.
#[derive(Debug)]
pub struct GatewaySpec<'a> {
    pub cluster: &'a str,
    pub vip_cidr: &'a str,
    /// The catalog: one etcd or every member of a cluster (all go in `catalog.endpoints`);
    /// `None`: the embedded store, the process's own ([`GatewaySpec::embedded`]), so it sees
    /// no other gateway.
    pub etcd: Option<&'a dyn EtcdEndpoints>,
    pub certs: &'a Certs,
    /// The etcd key prefix (unused with the embedded store).
    pub prefix: &'a str,
    /// (service name, namespace, port, backend address)
    pub exports: Vec<(&'a str, &'a str, u16, SocketAddr)>,
    /// The exports' ports' `app_protocol` (`http`, `grpc`); `None`: left out (tcp).
    pub app_protocol: Option<&'a str>,
    /// The exports' ports' `endpoint_protocol` (`http1`); `None`: left out (as the client
    /// spoke).
    pub endpoint_protocol: Option<&'a str>,
    pub drain_deadline: Duration,
    /// The catalog lease TTL ([`LEASE_TTL`] unless set: short, so tests see expiry fast).
    pub lease_ttl: Duration,
    /// `catalog.withdrawal_grace`; `None`: the gateway's default (docs/records.md).
    pub withdrawal_grace: Option<Duration>,
    /// Set through `MESHUP_GATEWAY_ID`, as each replica of a cluster is deployed; `None`
    /// keeps the config file's `<cluster>-0`.
    pub replica_id: Option<&'a str>,
    /// `MESHUP_LOG`; `None`: `info,meshup=debug`.
    pub log_filter: Option<&'a str>,
    /// `worker_threads`; `None`: the gateway's default (one per core).
    pub worker_threads: Option<usize>,
    /// `http.serving_cluster_header`; `None`: left out (no such header).
    pub serving_cluster_header: Option<&'a str>,
    /// `http.body_idle_timeout`; `None`: the default.
    pub body_idle_timeout: Option<Duration>,
    /// `http.max_requests_per_client`; `None`: the default.
    pub max_requests_per_client: Option<u32>,
    /// Serve the gRPC admin API on a free loopback port ([`GatewayProcess::grpc_addr`]).
    pub grpc: bool,
    /// Serve the remote (mutual TLS) admin API on a free loopback port
    /// ([`GatewayProcess::grpc_remote_addr`]).
    pub grpc_remote: bool,
    /// Listen for a successor process on a hand-over socket, QUIC on a fixed port with a
    /// hand-over port beside it ([`GatewayProcess::start_successor`]).
    pub handover: bool,
    /// More environment for the process (as a service manager sets `NOTIFY_SOCKET`).
    pub env: Vec<(&'a str, String)>,
    /// Run in this network namespace (`ip netns exec`, [`crate::netns`]) instead of the
    /// test's: the admin server is then on the namespace's loopback, reached from there.
    pub netns: Option<&'a str>,
    /// The QUIC listen address's IP (port 0); `None`: 127.0.0.1. In a namespace, the
    /// address other nodes reach it at.
    pub tunnel_ip: Option<IpAddr>,
    /// The QUIC listen port; `None`: 0 (any), which is what most tests want. A relay in front
    /// of the gateway ([`meshup_test_support::relay`]) needs to know it before it starts.
    pub tunnel_port: Option<u16>,
    /// `tunnel.advertise`: the address peers dial instead of the bound one (a relay's).
    pub advertise: Option<SocketAddr>,
    /// `dns.listen`; `None`: 127.0.0.1:0.
    pub dns_listen: Option<SocketAddr>,
    /// The `datapath:` section: (interface, node-local addresses); `None`: none.
    pub datapath: Option<(&'a str, Vec<&'a str>)>,
    /// `pinned_names:` as written in YAML (`none`, `[pay.prod]`); `None`: left out (all).
    pub pinned_names: Option<&'a str>,
}

impl<'a> GatewaySpec<'a> {
    /// A gateway of `cluster` without exports, 2 s drain deadline, default id, log and
    /// threads; set the other fields with struct update syntax.
    pub fn new(
        cluster: &'a str,
        vip_cidr: &'a str,
        etcd: &'a dyn EtcdEndpoints,
        certs: &'a Certs,
        prefix: &'a str,
    ) -> Self {
        Self {
            etcd: Some(etcd),
            prefix,
            ..Self::embedded(cluster, vip_cidr, certs)
        }
    }

    /// [`GatewaySpec::new`] with the embedded catalog instead of etcd: the gateway alone,
    /// for what needs no federation (start-up, drain, exit status).
    pub fn embedded(cluster: &'a str, vip_cidr: &'a str, certs: &'a Certs) -> Self {
        Self {
            cluster,
            vip_cidr,
            etcd: None,
            certs,
            prefix: "",
            exports: Vec::new(),
            app_protocol: None,
            endpoint_protocol: None,
            drain_deadline: Duration::from_secs(2),
            lease_ttl: LEASE_TTL,
            withdrawal_grace: None,
            replica_id: None,
            log_filter: None,
            worker_threads: None,
            serving_cluster_header: None,
            body_idle_timeout: None,
            max_requests_per_client: None,
            grpc: false,
            grpc_remote: false,
            handover: false,
            env: Vec::new(),
            netns: None,
            tunnel_ip: None,
            tunnel_port: None,
            advertise: None,
            dns_listen: None,
            datapath: None,
            pinned_names: None,
        }
    }

    /// The gateway's config file.
    fn config(
        &self,
        admin: SocketAddr,
        grpc: Option<SocketAddr>,
        remote: Option<SocketAddr>,
        dir: &Path,
    ) -> String {
        let certs = self.certs.of(self.cluster);
        let mut exports = String::new();
        for (name, ns, port, backend) in &self.exports {
            let entry = export_entry(name, ns, *port, *backend);
            let endpoint = self
                .endpoint_protocol
                .map_or(String::new(), |e| format!(", endpoint_protocol: {e}"));
            exports.push_str(&match self.app_protocol {
                Some(app) => entry.replace(
                    "protocol: tcp}",
                    &format!("protocol: tcp, app_protocol: {app}{endpoint}}}"),
                ),
                None => entry,
            });
        }
        // QUIC and DNS on port 0: the gateway publishes the QUIC address it bound, and a
        // UDP port probed free over TCP may already be taken by another test's socket. A
        // hand-over needs two fixed QUIC ports (the successor binds the other one).
        let (quic_port, handover) = if self.handover {
            let (a, b) = (free_udp_port(), free_udp_port());
            let socket = dir.join("handover.sock");
            (
                a,
                format!(
                    "  handover_port: {b}\nhandover:\n  socket: {}\n",
                    socket.display()
                ),
            )
        } else {
            (self.tunnel_port.unwrap_or(0), String::new())
        };
        let catalog = match self.etcd {
            Some(etcd) => format!(
                "  backend: etcd\n  endpoints: [{}]\n  prefix: {}\n  lease_ttl: {}s\n{}",
                etcd.endpoints()
                    .iter()
                    .map(|e| format!("\"{e}\""))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.prefix,
                self.lease_ttl.as_secs(),
                self.withdrawal_grace.map_or(String::new(), |g| format!(
                    "  withdrawal_grace: {}ms\n",
                    g.as_millis()
                ))
            ),
            None => "  backend: embedded\n".to_owned(),
        };
        format!(
            r#"cluster: {cluster}
gateway_id: {cluster}-0
trust_domain: {TRUST_DOMAIN}
catalog:
{catalog}  allow_loopback_addresses: true
vip_cidr: {vip_cidr}
{pinned}tunnel:
  listen: {tunnel}
  cert: {certs}/cert.pem
  key: {certs}/key.pem
  bundle: {certs}/bundle.pem
  drain_deadline: {drain}ms
{advertise}{handover}dns:
  listen: {dns}
admin:
  http: {admin}
{grpc}{remote}{threads}{http}{datapath}exports:
{exports}"#,
            cluster = self.cluster,
            vip_cidr = self.vip_cidr,
            pinned = self
                .pinned_names
                .map_or(String::new(), |p| format!("pinned_names: {p}\n")),
            tunnel = SocketAddr::new(self.tunnel_ip.unwrap_or([127, 0, 0, 1].into()), quic_port),
            dns = self
                .dns_listen
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            datapath =
                self.datapath
                    .as_ref()
                    .map_or(String::new(), |(interface, addresses)| format!(
                        "datapath:\n  interface: {interface}\n  addresses: [{}]\n",
                        addresses.join(", ")
                    )),
            certs = certs.display(),
            drain = self.drain_deadline.as_millis(),
            advertise = self
                .advertise
                .map_or(String::new(), |a| format!("  advertise: [\"{a}\"]\n")),
            grpc = grpc.map_or(String::new(), |a| format!("  grpc: {a}\n")),
            remote = remote.map_or(String::new(), |a| format!("  grpc_remote: {a}\n")),
            threads = self
                .worker_threads
                .map_or(String::new(), |n| format!("worker_threads: {n}\n")),
            http = {
                let mut http = String::new();
                if let Some(h) = self.serving_cluster_header {
                    http += &format!("  serving_cluster_header: {h}\n");
                }
                if let Some(t) = self.body_idle_timeout {
                    http += &format!("  body_idle_timeout: {}ms\n", t.as_millis());
                }
                if let Some(n) = self.max_requests_per_client {
                    http += &format!("  max_requests_per_client: {n}\n");
                }
                if http.is_empty() {
                    http
                } else {
                    format!("http:\n{http}")
                }
            },
            exports = if exports.is_empty() {
                "  []\n".to_string()
            } else {
                exports
            },
        )
    }
}

/// Replaces `path` as editors do: a temporary file in the same directory, renamed over it
/// (one atomic change; a reader never sees half a file).
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the new file");
    std::fs::rename(&tmp, path).expect("rename it over the old one");
}

/// The value of the sample `name` (no labels) in a Prometheus text exposition.
pub fn metric_in(exposition: &str, name: &str) -> anyhow::Result<f64> {
    crate::http::series_in(exposition, name)?
        .into_iter()
        .find_map(|(labels, value)| labels.is_empty().then_some(value))
        .with_context(|| format!("no {name} in /metrics"))
}

/// A UDP port free on 127.0.0.1 now (bound and released).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free UDP port")
        .port()
}

/// One line of a config file's `exports:` list: service `name.ns` on one TCP port, served
/// by one backend.
pub fn export_entry(name: &str, ns: &str, port: u16, backend: SocketAddr) -> String {
    format!(
        "  - {{name: {name}, namespace: {ns}, ports: [{{name: tcp, port: {port}, protocol: tcp}}], endpoints: [\"{backend}\"]}}\n"
    )
}

/// The A records `dig` gets from a DNS server for `name` (empty for NXDOMAIN or NODATA).
pub fn dig(server: SocketAddr, name: &str) -> anyhow::Result<Vec<std::net::IpAddr>> {
    dig_in(None, server, name)
}

/// [`dig`], run inside the network namespace `netns` (`ip netns exec`) when given: a client
/// in a pod asking its node-local DNS.
pub fn dig_in(
    netns: Option<&str>,
    server: SocketAddr,
    name: &str,
) -> anyhow::Result<Vec<std::net::IpAddr>> {
    dig_with(netns, server, name, &[])
}

/// [`dig`] over TCP (`+tcp`): one query on one new connection.
pub fn dig_tcp(server: SocketAddr, name: &str) -> anyhow::Result<Vec<std::net::IpAddr>> {
    dig_with(None, server, name, &["+tcp"])
}

/// [`dig_in`] with more dig options after the defaults (`+short +tries=1 +time=2`), which
/// they override: `+tcp`, or a stub resolver's timeout and retries. Any note dig prints
/// (`;; Warning: query response not set`, a failed try) is an error.
pub fn dig_with(
    netns: Option<&str>,
    server: SocketAddr,
    name: &str,
    options: &[&str],
) -> anyhow::Result<Vec<std::net::IpAddr>> {
    let (addresses, notes) = dig_noting(netns, server, name, options)?;
    if !notes.is_empty() {
        bail!("dig {name}: {}", notes.join("; "));
    }
    Ok(addresses)
}

/// [`dig_with`], but dig's `;;` notes are returned instead of failing: the tries that
/// failed before the answer (`;; communications error to …: timed out`, `…: connection
/// reset`), which it prints when it tries again (`+tries` above 1).
pub fn dig_noting(
    netns: Option<&str>,
    server: SocketAddr,
    name: &str,
    options: &[&str],
) -> anyhow::Result<(Vec<std::net::IpAddr>, Vec<String>)> {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "dig"]);
            c
        }
        None => Command::new("dig"),
    };
    let out = command
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+short", "+tries=1", "+time=2"])
        .args(options)
        .args([name, "A"])
        .output()
        .context("run dig")?;
    if !out.status.success() {
        bail!(
            "dig {name} failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (notes, answers): (Vec<&str>, Vec<&str>) = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .partition(|l| l.starts_with(";;"));
    let addresses = answers
        .into_iter()
        .map(|l| {
            l.parse()
                .with_context(|| format!("dig {name}: not an address: {l:?}"))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((addresses, notes.into_iter().map(str::to_owned).collect()))
}

/// One `meshup gateway` process. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct GatewayProcess {
    child: Option<Child>,
    cluster: String,
    admin: SocketAddr,
    grpc: Option<SocketAddr>,
    grpc_remote: Option<SocketAddr>,
    config: PathBuf,
    log: PathBuf,
    /// The binary and environment it was started with (a successor gets the same).
    binary: PathBuf,
    env: Vec<(String, String)>,
    dir: std::sync::Arc<tempfile::TempDir>,
    netns: Option<String>,
}

impl GatewayProcess {
    /// Writes the config and starts the process (not yet ready: see [`Self::wait_ready`]).
    pub fn start(spec: GatewaySpec<'_>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let admin: SocketAddr = format!("127.0.0.1:{}", port()).parse().expect("addr");
        let grpc = spec
            .grpc
            .then(|| SocketAddr::from(([127, 0, 0, 1], port())));
        let config_path = dir.path().join("gateway.yaml");
        let grpc_remote = spec
            .grpc_remote
            .then(|| SocketAddr::from(([127, 0, 0, 1], port())));
        std::fs::write(
            &config_path,
            spec.config(admin, grpc, grpc_remote, dir.path()),
        )
        .expect("write config");
        let mut env = vec![
            (
                "MESHUP_LOG".to_owned(),
                spec.log_filter.unwrap_or("info,meshup=debug").to_owned(),
            ),
            // Plain log lines: the tests read the bound DNS address from the log.
            ("NO_COLOR".to_owned(), "1".to_owned()),
        ];
        if let Some(id) = spec.replica_id {
            env.push(("MESHUP_GATEWAY_ID".to_owned(), id.to_owned()));
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let mut gateway = Self {
            child: None,
            cluster: spec.cluster.to_owned(),
            admin,
            grpc,
            grpc_remote,
            config: config_path,
            log: dir.path().join("gateway.log"),
            binary: spec.certs.binary().to_owned(),
            env,
            netns: spec.netns.map(str::to_owned),
            dir: std::sync::Arc::new(dir),
        };
        gateway.spawn();
        gateway
    }

    fn spawn(&mut self) {
        // `ip netns exec` execs the binary in place: the child is the gateway itself.
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        let child = command
            .args(["gateway", "--config", path_str(&self.config)])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).expect("log file"))
            .spawn()
            .expect("spawn meshup gateway");
        self.child = Some(child);
    }

    /// Starts a second process of this gateway (same binary, config file and environment),
    /// as an upgrade on a node does; with [`GatewaySpec::handover`] it takes this one's
    /// listening sockets. Its log is its own.
    pub fn start_successor(&self) -> Self {
        self.successor_with(None)
    }

    /// [`Self::start_successor`] under another gateway id (`MESHUP_GATEWAY_ID`), as a
    /// Kubernetes DaemonSet's new pod has its own name: for a moment the catalog lists both.
    pub fn start_successor_as(&self, gateway_id: &str) -> Self {
        self.successor_with(Some(gateway_id))
    }

    fn successor_with(&self, gateway_id: Option<&str>) -> Self {
        let mut env = self.env.clone();
        if let Some(id) = gateway_id {
            env.retain(|(k, _)| k != "MESHUP_GATEWAY_ID");
            env.push(("MESHUP_GATEWAY_ID".to_owned(), id.to_owned()));
        }
        let n = std::fs::read_dir(self.dir.path())
            .map(|d| d.count())
            .unwrap_or_default();
        let mut next = Self {
            child: None,
            cluster: self.cluster.clone(),
            admin: self.admin,
            grpc: self.grpc,
            grpc_remote: self.grpc_remote,
            config: self.config.clone(),
            log: self.dir.path().join(format!("gateway-{n}.log")),
            binary: self.binary.clone(),
            env,
            netns: self.netns.clone(),
            dir: self.dir.clone(),
        };
        next.spawn();
        next
    }

    /// The gRPC admin address, when the spec asked for one.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc
    }

    /// The remote (mutual TLS) admin address, when the spec asked for one.
    pub fn grpc_remote_addr(&self) -> Option<SocketAddr> {
        self.grpc_remote
    }

    /// The config file the gateway was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The config file's text now.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read the config file")
    }

    /// Replaces the config file as editors do: a temporary file in the same directory,
    /// renamed over it (one atomic change; the gateway never reads half a file).
    pub fn write_config(&self, text: &str) {
        replace_file(&self.config, text);
    }

    /// The cluster this gateway belongs to.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// Whether the process is still running (it has not exited or been killed).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("process running")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The admin HTTP address (`/ready`, `/status`, the status page at `/`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// GET a path on the admin server: (status code, body).
    pub fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        match &self.netns {
            Some(ns) => crate::netns::run_in(ns, || crate::http::get(self.admin, path)),
            None => crate::http::get(self.admin, path),
        }
    }

    /// The gateways of `cluster` this gateway's catalog lists (its `/status`): each id, and
    /// whether it is marked draining, sorted by id.
    pub fn catalog_gateways(&self, cluster: &str) -> anyhow::Result<Vec<(String, bool)>> {
        let (_, body) = self.admin_get("/status")?;
        let status: serde_json::Value = serde_json::from_str(&body)?;
        let mut gateways = Vec::new();
        let clusters = status["clusters"].as_array().cloned().unwrap_or_default();
        for g in clusters
            .iter()
            .filter(|c| c["name"] == cluster)
            .flat_map(|c| c["gateways"].as_array().cloned().unwrap_or_default())
        {
            let id = g["id"].as_str().ok_or_else(|| anyhow!("no id in {g}"))?;
            let draining = g["draining"]
                .as_bool()
                .ok_or_else(|| anyhow!("no draining flag in {g}"))?;
            gateways.push((id.to_owned(), draining));
        }
        gateways.sort();
        Ok(gateways)
    }

    /// Waits until the process's log contains `what` (30 s at most).
    pub async fn wait_log(&self, what: &str) {
        eventually_ok(
            &format!("log line {what:?}"),
            Duration::from_secs(30),
            || async {
                let log = self.log_text();
                anyhow::ensure!(log.contains(what), "not yet; log:\n{log}");
                Ok(())
            },
        )
        .await;
    }

    /// Waits until a successor ([`Self::start_successor`]) has taken over the sockets of
    /// the process before it, then until it is ready. (Until it has taken over, `/ready`
    /// on the shared admin port is the old process's.)
    pub async fn wait_taken_over(&mut self) {
        self.wait_log("took over from the previous gateway process")
            .await;
        self.wait_ready().await;
    }

    /// Waits until `/ready` answers 200; panics with the log if the process exits first.
    pub async fn wait_ready(&mut self) {
        self.wait_start_up("ready", |g| matches!(g.admin_get("/ready"), Ok((200, _))))
            .await
    }

    /// Waits until nothing but its VIP listeners keeps the gateway from being ready: its
    /// catalog is synced and it answers every service. For replicas of one cluster started
    /// in one network namespace, where each VIP and port can be held by one of them only (in
    /// a deployment each replica is on its own node).
    pub async fn wait_ready_but_listeners(&mut self) {
        self.wait_start_up("ready but for its VIP listeners", |g| {
            let Ok((200, body)) = g.admin_get("/status") else {
                return false;
            };
            let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            status["pending"]
                .as_array()
                .is_some_and(|p| p.iter().all(|item| item == "VIP listeners"))
        })
        .await
    }

    /// Polls `done` until it holds; panics with the log when the gateway exits first or
    /// 30 s pass.
    async fn wait_start_up(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "gateway exited during start-up ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway not {what} within 30s; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The status page's entry for `<name>.<ns>` (JSON), if the gateway knows the service.
    pub fn service_status(&self, service: &str) -> anyhow::Result<serde_json::Value> {
        let (_, body) = self.admin_get("/status")?;
        let status: serde_json::Value = serde_json::from_str(&body)?;
        status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == service))
            .cloned()
            .context("service not in status")
    }

    /// The VIP (and port) this gateway's cluster uses for `<name>.<ns>`, once it has one and
    /// a healthy target for it.
    pub async fn wait_routable(&self, service: &str, port: u16) -> SocketAddr {
        eventually_ok(
            &format!("{service} routable from this gateway"),
            Duration::from_secs(20),
            || async {
                let svc = self.service_status(service)?;
                if svc["target"].is_null() {
                    bail!("no target yet: {svc}");
                }
                let vip = svc["vip"].as_str().context("no VIP yet")?;
                Ok::<_, anyhow::Error>(SocketAddr::new(vip.parse()?, port))
            },
        )
        .await
    }

    /// The DNS address the gateway bound (its config says port 0), from its start-up log line
    /// `gateway bound ... dns=<addr> ...`.
    pub async fn dns_addr(&self) -> SocketAddr {
        self.bound_addr("dns").await
    }

    /// The QUIC address the gateway bound (its config says port 0 unless it hands over), from
    /// the same log line: where a peer dials it.
    pub async fn quic_addr(&self) -> SocketAddr {
        self.bound_addr("quic").await
    }

    /// The address in field `field` of the start-up log line `gateway bound ...`.
    async fn bound_addr(&self, field: &str) -> SocketAddr {
        let prefix = format!("{field}=");
        eventually_ok(
            &format!("the gateway logs its {field} address"),
            Duration::from_secs(20),
            || async {
                let log = self.log_text();
                let line = log
                    .lines()
                    .find(|l| l.contains("gateway bound"))
                    .context("no `gateway bound` line yet")?;
                let addr = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(prefix.as_str()))
                    .with_context(|| format!("no {prefix} field in {line:?}"))?;
                Ok::<_, anyhow::Error>(addr.parse::<SocketAddr>()?)
            },
        )
        .await
    }

    /// The sum of every series of `/metrics` named `name` whose labels contain each of
    /// `labels` (e.g. `direction="inbound"`); 0 when none matches.
    pub fn metric_sum(&self, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
        let (code, body) = self.admin_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        Ok(crate::http::series_in(&body, name)?
            .into_iter()
            .filter(|(series, _)| labels.iter().all(|l| series.contains(l)))
            .map(|(_, value)| value)
            .sum())
    }

    /// One counter of the gateway's `/metrics`.
    pub fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (code, body) = self.admin_get("/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        metric_in(&body, name)
    }

    /// SIGKILL, sent straight from this process (no `kill` child to wait for), and the
    /// instant just before it: the moment the gateway stopped keeping its lease alive is no
    /// later than this.
    pub fn kill9(&mut self) -> Instant {
        let child = self.child.as_mut().expect("process running");
        let at = Instant::now();
        child.kill().expect("SIGKILL the gateway");
        at
    }

    /// Sends `sig` (`-TERM`, `-STOP`, `-CONT`) through kill(1); returns the instant just
    /// before it was sent.
    pub fn signal(&self, sig: &str) -> Instant {
        let at = Instant::now();
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
        at
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("process");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not exit within {timeout:?}; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A stopped (SIGSTOP) process dies from SIGKILL as well.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `grpcurl ARGS` (a required tool: `.ci/packages`): (success, stdout, stderr).
pub fn grpcurl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("grpcurl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("grpcurl is required (`bash .ci/setup test` installs it): {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `dig` for `name` against `server` (from inside the network namespace `netns`, if given) in
/// a loop until [`DigLoop::finish`]; every answer must be exactly `want`.
#[derive(Debug)]
pub struct DigLoop {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: std::thread::JoinHandle<()>,
}

impl DigLoop {
    pub fn start(netns: Option<String>, server: SocketAddr, name: &str, want: IpAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, answers, failures) = (stop.clone(), answers.clone(), failures.clone());
            let name = name.to_owned();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    match dig_in(netns.as_deref(), server, &name) {
                        Ok(ips) if ips == vec![want] => {
                            answers.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(ips) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("answered {ips:?}")),
                        Err(e) => failures.lock().expect("lock").push(format!("{e:#}")),
                    }
                }
            }
        });
        Self {
            stop,
            answers,
            failures,
            thread,
        }
    }

    /// Right answers so far.
    pub fn answers(&self) -> usize {
        self.answers.load(Ordering::Relaxed)
    }

    /// Stops the loop: (right answers, every failure with what was wrong).
    pub fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("dig loop");
        (
            self.answers.load(Ordering::Relaxed),
            self.failures.lock().expect("lock").clone(),
        )
    }
}

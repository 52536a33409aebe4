//! A real `etcd` server for tests: free loopback ports, a temp data dir, health polling.
//!
//! `EtcdServer::start()` launches the `etcd` binary from `PATH` on two free loopback ports
//! (client and peer) and waits until `/health` answers `true`. The server can be killed with
//! SIGKILL, paused with SIGSTOP, stopped and restarted on the same ports and data directory,
//! so tests exercise real outages: leases restart, watches break, compaction is real.
//!
//! The methods block the calling thread while they wait for etcd (at most
//! [`START_TIMEOUT`]); call them from `#[tokio::test(flavor = "multi_thread")]` tests or from
//! `spawn_blocking` so the tasks under test keep running meanwhile.
//!
//! A missing `etcd` binary is a loud panic, not a skip: CI installs it, so a skip would
//! hide a broken pipeline.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::tls::Pki;

/// Longest time `start()`/`restart()` wait for etcd to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Times `start()` retries with fresh ports when another process took one in between.
pub(crate) const START_ATTEMPTS: usize = 3;

/// What a catalog client is given: the client URLs of every member (one for an
/// [`EtcdServer`], three for an [`crate::EtcdCluster`]).
pub trait EtcdEndpoints: std::fmt::Debug + Sync {
    fn endpoints(&self) -> Vec<String>;
}

impl EtcdEndpoints for EtcdServer {
    fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint()]
    }
}

/// One single-member etcd cluster on 127.0.0.1. Killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    /// The address it listens on: 127.0.0.1, or a namespace's ([`EtcdServer::start_on`]).
    host: IpAddr,
    client_port: u16,
    peer_port: u16,
    // Kept for its Drop: the data directory lives as long as the server.
    data_dir: tempfile::TempDir,
    log_path: PathBuf,
    /// Extra etcd flags, applied again on every restart.
    extra_args: Vec<String>,
    /// With TLS: the PKI (client URLs are `https://`, client certificates required) and
    /// the plain-HTTP metrics port `/health` is polled on.
    tls: Option<(Pki, u16)>,
    /// The member name and `--initial-cluster` list: `meshup-test` alone, or one member of
    /// an [`EtcdCluster`].
    pub(crate) name: String,
    pub(crate) initial_cluster: String,
}

impl EtcdServer {
    /// Starts a fresh etcd on free loopback ports and waits until it is healthy.
    ///
    /// Panics (loudly) if `etcd` is not installed or does not become healthy.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Like [`EtcdServer::start`], with extra etcd flags (kept across restarts), e.g.
    /// `--experimental-watch-progress-notify-interval=500ms`.
    pub fn start_with_args(extra_args: &[&str]) -> Self {
        Self::start_inner(extra_args, false, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    /// An etcd listening on `host` instead of 127.0.0.1: an address of the network namespace
    /// the caller runs in, so other namespaces reach it (call it inside
    /// `meshup_tests::netns::Netns::run`; a [`EtcdServer::restart`] must run there too).
    pub fn start_on(host: IpAddr) -> Self {
        Self::start_inner(&[], false, host)
    }

    /// An etcd that serves clients only over TLS and requires a client certificate signed
    /// by its CA (`--client-cert-auth`). [`EtcdServer::tls`] has the CA and a client
    /// certificate; [`EtcdServer::endpoint`] is `https://`.
    pub fn start_tls() -> Self {
        Self::start_inner(&[], true, IpAddr::V4(Ipv4Addr::LOCALHOST))
    }

    fn start_inner(extra_args: &[&str], tls: bool, host: IpAddr) -> Self {
        require_binary("etcd");
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(extra_args, tls, host) {
                Ok(server) => return server,
                Err(e) => last_error = Some(e),
            }
        }
        panic!("etcd did not start after {START_ATTEMPTS} attempts: {last_error:?}");
    }

    fn try_start(extra_args: &[&str], tls: bool, host: IpAddr) -> anyhow::Result<Self> {
        let mut server = Self::prepare(extra_args, tls, host)?;
        server.spawn()?;
        if let Err(e) = server.wait_healthy() {
            server.kill_child();
            return Err(e);
        }
        Ok(server)
    }

    /// A single-member server with its ports and data dir chosen, not yet started.
    pub(crate) fn prepare(extra_args: &[&str], tls: bool, host: IpAddr) -> anyhow::Result<Self> {
        let data_dir = tempfile::Builder::new()
            .prefix("meshup-etcd-")
            .tempdir()
            .context("creating etcd data dir")?;
        let log_path = data_dir.path().join("etcd.log");
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let tls = if tls {
            let dir = data_dir.path().join("pki");
            std::fs::create_dir_all(&dir).context("creating the etcd PKI dir")?;
            Some((Pki::generate(&dir)?, free_port()?))
        } else {
            None
        };
        let name = "meshup-test".to_owned();
        let initial_cluster = format!("{name}=http://{}", SocketAddr::new(host, peer_port));
        Ok(Self {
            child: None,
            host,
            client_port,
            peer_port,
            data_dir,
            log_path,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            tls,
            name,
            initial_cluster,
        })
    }

    /// The peer URL other members reach this one at.
    pub(crate) fn peer_url(&self) -> String {
        format!("http://{}", SocketAddr::new(self.host, self.peer_port))
    }

    /// The client URL, `http://127.0.0.1:<port>` (`https://` with TLS; the host of
    /// [`EtcdServer::start_on`]).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!(
            "{scheme}://{}",
            SocketAddr::new(self.host, self.client_port)
        )
    }

    /// The CA and client certificate of a TLS etcd ([`EtcdServer::start_tls`]).
    pub fn tls(&self) -> Option<&Pki> {
        self.tls.as_ref().map(|(pki, _)| pki)
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.client_port)
    }

    /// Where etcd's own log goes (stdout and stderr), for failure messages.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The process id of the running etcd, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether an etcd process was started and not yet killed or stopped.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL: the process dies at once, without a clean shutdown.
    pub fn kill9(&mut self) {
        self.kill_child();
    }

    /// SIGTERM and wait for the process to exit (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP: the process stays alive but answers nothing (a hung server: connections
    /// stay open, no response comes). Undo with [`EtcdServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`EtcdServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Starts etcd again on the same ports and data dir (after `kill9` or `stop`) and waits
    /// until it is healthy. Kills a still-running process first.
    pub fn restart(&mut self) {
        self.kill_child();
        // The old process just died; the kernel may need a moment before the ports can be
        // bound again, so a failed start is retried until the deadline.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let result = self.spawn().and_then(|()| self.wait_healthy());
            match result {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("etcd did not restart: {e:#}; log: {}", self.log_tail())
                }
                Err(_) => {
                    self.kill_child();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Runs `etcdctl --endpoints=<this server> <args>` and returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.etcdctl_with_stdin(args, None)
    }

    /// Like [`EtcdServer::etcdctl`], feeding `stdin` to the process (`etcdctl put <key>`
    /// reads the value from stdin when none is given: handy for large or binary values).
    pub fn etcdctl_with_stdin(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> anyhow::Result<String> {
        etcdctl_at(&[self.endpoint()], args, stdin)
    }

    /// The current store revision (via `etcdctl endpoint status`).
    pub fn revision(&self) -> anyhow::Result<i64> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"])?;
        let key = "\"revision\":";
        let at = out.find(key).context("no revision in endpoint status")?;
        let digits: String = out[at + key.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        digits.parse().context("parsing revision")
    }

    /// The last lines of etcd's log, for panic messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log_path) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub(crate) fn spawn(&mut self) -> anyhow::Result<()> {
        let client = self.endpoint();
        let peer = self.peer_url();
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening etcd log")?;
        let log_err = log.try_clone().context("cloning etcd log handle")?;
        let child = Command::new("etcd")
            .arg(format!("--name={}", self.name))
            .arg(format!(
                "--data-dir={}",
                self.data_dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .args(self.tls_args())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .context("spawning etcd")?;
        self.child = Some(child);
        Ok(())
    }

    fn tls_args(&self) -> Vec<String> {
        let Some((pki, metrics_port)) = &self.tls else {
            return Vec::new();
        };
        vec![
            format!("--cert-file={}", pki.server_cert.display()),
            format!("--key-file={}", pki.server_key.display()),
            format!("--trusted-ca-file={}", pki.ca.display()),
            "--client-cert-auth".to_owned(),
            format!("--listen-metrics-urls=http://127.0.0.1:{metrics_port}"),
        ]
    }

    /// Where plain-HTTP `/health` answers: the client port, or the metrics port with TLS.
    fn health_addr(&self) -> SocketAddr {
        match &self.tls {
            Some((_, port)) => SocketAddr::from(([127, 0, 0, 1], *port)),
            None => self.client_addr(),
        }
    }

    /// Polls `GET /health` until it says `true`. No sleeping on guesses.
    pub(crate) fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                bail!(
                    "etcd exited during start-up ({status}); log: {}",
                    self.log_tail()
                );
            }
            if health(self.health_addr()).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy after {START_TIMEOUT:?}; log: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill").args([sig, &pid.to_string()]).status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "kill {sig} {pid} failed: {status:?}"
            );
        }
    }

    pub(crate) fn kill_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused process dies from SIGKILL as well.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill_child();
    }
}

/// Runs `etcdctl --endpoints=<endpoints> --command-timeout=10s <args>` (a later
/// `--command-timeout` in `args` wins), feeding `stdin` when given, and returns its stdout.
pub fn etcdctl_at(
    endpoints: &[String],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> anyhow::Result<String> {
    require_binary("etcdctl");
    let mut child = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running etcdctl")?;
    {
        let mut pipe = child.stdin.take().context("etcdctl stdin")?;
        if let Some(bytes) = stdin {
            pipe.write_all(bytes).context("writing etcdctl stdin")?;
        }
        // Dropping the pipe closes stdin so etcdctl sees end of input.
    }
    let out = child.wait_with_output().context("waiting for etcdctl")?;
    if !out.status.success() {
        bail!(
            "etcdctl {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `GET /health` over plain HTTP/1.0 with short timeouts.
fn health(addr: SocketAddr) -> std::io::Result<bool> {
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.contains("\"health\":\"true\""))
}

/// Where [`free_port`] draws from: below the kernel's ephemeral range (32768–60999 by
/// default), which outgoing connections take their source ports from.
const TEST_PORTS: std::ops::Range<u16> = 10_000..32_768;

/// A port free on 127.0.0.1 for TCP and UDP, for a server to bind. It is drawn at random
/// below the kernel's ephemeral range: a port the kernel hands out for port 0 comes from
/// that range, and any outgoing connection of a concurrent test could take it as its
/// source port before the server binds it (CI saw a gateway fail to start with
/// "Address already in use" on such a port). Falls back to a port the kernel hands out.
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    let first_ephemeral = first_ephemeral_port();
    let end = TEST_PORTS.end.min(first_ephemeral);
    let mut rng = rand::rng();
    if TEST_PORTS.start < end {
        for _ in 0..256 {
            let port = rng.random_range(TEST_PORTS.start..end);
            if TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), or
/// Linux's default.
fn first_ephemeral_port() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

pub(crate) fn require_binary(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "\n\n*** `{name}` is not installed (not on PATH). These tests need a real etcd 3.4+: \
         install etcd-server/etcd-client (Debian: `apt-get install etcd-server etcd-client`). \
         This is a failure, not a skip. ***\n"
    );
}

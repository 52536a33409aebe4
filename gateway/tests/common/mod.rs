//! In-process federation pieces for data-plane tests: a PKI in a temp dir, gateways (QUIC
//! endpoint + inbound server + outbound proxy) on loopback, catalog snapshots built from
//! `Change`s, and small TCP backends that count what reaches them and can stop listening.
//! [`admin`] asks a gateway's admin HTTP surface and parses `/metrics`; [`federation`] runs
//! whole gateways (`app::Gateway`) on one embedded store.
#![allow(dead_code)]

pub mod admin;
pub mod federation;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use meshup_core::catalog::{Change, Snapshot};
pub use meshup_core::fixture::{self, cluster};
use meshup_core::model::GatewayRecord;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_gateway::certs;
use meshup_gateway::identity::{Identity, IdentityFiles};
use meshup_gateway::inbound::{self, LocalExport, LocalExports};
use meshup_gateway::outbound::{Proxy, ServiceMetrics};
use meshup_gateway::tunnel::{Endpoint, Metrics, TunnelConfig};
pub use meshup_test_support::assert_eventually;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The federation's trust domain: the one of the catalog records' SPIFFE IDs.
pub const TD: &str = fixture::TRUST_DOMAIN;
pub const SERVICE_PORT: u16 = 8080;

/// Runs a test body under a hard timeout: a hung test fails instead of blocking CI.
pub async fn within<T>(limit: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(v) => v,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// The service every data-plane test exports and calls.
pub const SERVICE: &str = "pay.prod";

pub fn service() -> ServiceKey {
    fixture::service(SERVICE)
}

/// A VIP unique to this test (process id + counter), in 127.0.0.0/8 so no set-up is needed.
pub fn next_vip() -> IpAddr {
    static N: AtomicU8 = AtomicU8::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    IpAddr::V4(Ipv4Addr::new(
        127,
        90 + (pid % 100) as u8,
        (pid / 100 % 250) as u8,
        n,
    ))
}

// === PKI ===

/// A federation CA and the gateways' identity directories in a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        certs::init_ca(TD, &ca).expect("init ca");
        Self { dir, ca }
    }

    /// Issues a valid SVID for `cluster` into `<dir>/<name>` and returns that directory.
    pub fn issue(&self, name: &str, cluster_name: &str) -> PathBuf {
        let out = self.dir.path().join(name);
        certs::issue(&self.ca, cluster_name, &out, Duration::from_secs(3600)).expect("issue");
        out
    }

    /// Issues an operator certificate for `name` into `<dir>/operator-<name>` and returns
    /// that directory.
    pub fn operator(&self, name: &str) -> PathBuf {
        let out = self.dir.path().join(format!("operator-{name}"));
        certs::issue_operator(&self.ca, name, &out, Duration::from_secs(3600))
            .expect("issue operator");
        out
    }

    /// Writes a leaf per `spec` into `<dir>/<name>`.
    pub fn leaf(&self, name: &str, spec: &certs::LeafSpec) -> PathBuf {
        let out = self.dir.path().join(name);
        certs::write_leaf(&self.ca, spec, &out).expect("write leaf");
        out
    }
}

// === gateways ===

/// One gateway's data plane, in process.
pub struct Gateway {
    pub cluster: ClusterName,
    pub identity: Arc<Identity>,
    pub endpoint: Arc<Endpoint>,
    pub server: inbound::Server,
    pub proxy: Proxy,
    pub metrics: Metrics,
    /// Where `metrics` are registered, as `meshup_*` (see [`Gateway::sum`]).
    registry: prometheus_client::registry::Registry,
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub exports: watch::Sender<Arc<LocalExports>>,
    pub shutdown: CancellationToken,
}

impl Gateway {
    /// Starts a gateway of `cluster_name` with identity files in `id_dir`.
    pub fn start(cluster_name: &str, id_dir: &Path, tweak: impl FnOnce(&mut TunnelConfig)) -> Self {
        let files = IdentityFiles::in_dir(id_dir);
        let mut cfg = TunnelConfig::with_files(files.clone());
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        tweak(&mut cfg);
        let cluster = cluster(cluster_name);
        let identity = Identity::load(files, TD, cluster.clone()).expect("identity");
        let mut registry = prometheus_client::registry::Registry::with_prefix("meshup");
        let metrics = Metrics::register(&mut registry);
        let endpoint = Endpoint::bind(&cfg, identity.clone(), metrics.clone()).expect("bind");
        let shutdown = CancellationToken::new();
        identity.spawn_reloader(
            meshup_gateway::identity::DEFAULT_RELOAD_INTERVAL,
            shutdown.clone(),
        );
        let (exports, exports_rx) = watch::channel(Arc::new(LocalExports::new()));
        let (snapshots, snapshots_rx) = watch::channel(Arc::new(Snapshot::new()));
        let server = inbound::Server::spawn(endpoint.clone(), exports_rx.clone(), shutdown.clone());
        let proxy = Proxy::spawn(
            endpoint.clone(),
            meshup_policy::Locality {
                cluster: cluster.clone(),
                region: String::new(),
                zone: String::new(),
            },
            exports_rx,
            snapshots_rx,
            meshup_gateway::outbound::VipListeners {
                range: "127.0.0.0/8".parse().expect("cidr"),
                sockets: Default::default(),
                http: Default::default(),
            },
            ServiceMetrics::register(&mut registry),
            shutdown.clone(),
        );
        Self {
            cluster,
            identity,
            endpoint,
            server,
            proxy,
            metrics,
            registry,
            snapshots,
            exports,
            shutdown,
        }
    }

    /// The sum of the samples of `name` (`meshup_tunnel_bytes_total`) whose labels include
    /// `labels`, over every other label (such as the cluster pair), as a scraper would see it.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        admin::Exposition::parse(&text).sum(name, labels)
    }

    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Serves `pay.prod:8080` to the federation from `backend`.
    pub fn export(&self, backend: SocketAddr, allowed: &[&str]) {
        self.exports
            .send_replace(Arc::new(inbound::local_exports([LocalExport {
                service: service(),
                ports: vec![SERVICE_PORT],
                endpoints: vec![backend],
                allowed_callers: allowed.iter().map(|c| cluster(c)).collect(),
                http_ports: vec![],
                http1_ports: vec![],
            }])));
    }

    /// Waits until the outbound proxy listens on `vip:8080`.
    pub async fn wait_listening(&self, vip: IpAddr) {
        let addr = SocketAddr::new(vip, SERVICE_PORT);
        let proxy = self.proxy.clone();
        assert_eventually("VIP listener bound", Duration::from_secs(5), move || {
            let bound = proxy.listeners().contains_key(&addr);
            async move { bound }
        })
        .await;
    }
}

/// A QUIC connection from `peer` to `server`, dialed as the pool dials (so with `peer`'s valid
/// certificate) but outside the pool: the test owns every stream on it and writes whatever
/// bytes it likes, as a buggy or hostile peer of the federation could.
pub async fn raw_connection(peer: &Gateway, server: &Gateway) -> quinn::Connection {
    peer.endpoint
        .connect(server.addr(), &server.cluster)
        .await
        .expect("a peer with a valid certificate completes the handshake")
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.endpoint
            .close(meshup_gateway::tunnel::CLOSE_SHUTDOWN, b"test over");
    }
}

/// A gateway record for `cluster` at `addr`.
pub fn gateway_record(cluster_name: &str, id: &str, addr: SocketAddr, draining: bool) -> Change {
    gateway_record_at(cluster_name, id, &[addr], draining)
}

/// A gateway record advertising `addrs`, in order.
pub fn gateway_record_at(
    cluster_name: &str,
    id: &str,
    addrs: &[SocketAddr],
    draining: bool,
) -> Change {
    fixture::put_gateway(GatewayRecord {
        quic_addrs: addrs.to_vec(),
        draining,
        ..fixture::gateway(cluster_name, id)
    })
}

/// An export of `pay.prod:8080` by one gateway of `cluster`.
pub fn export_record(cluster_name: &str, id: &str, healthy: u32) -> Change {
    fixture::put_export(
        cluster_name,
        id,
        SERVICE,
        fixture::export(SERVICE_PORT, healthy),
    )
}

/// The VIP `local` uses for `pay.prod` (or its pinned form for `target`).
pub fn vip_record(local: &str, target: Option<&str>, vip: IpAddr) -> Change {
    fixture::put_vip(local, SERVICE, target, vip)
}

pub fn snapshot(changes: impl IntoIterator<Item = Change>) -> Arc<Snapshot> {
    Arc::new(fixture::snapshot(changes))
}

/// The usual two-cluster set-up: east calls `pay.prod` at `vip`, west serves it from
/// `backend` at `west_addr` (which may be a relay or an impostor).
pub fn east_to_west(vip: IpAddr, west_addr: SocketAddr) -> Arc<Snapshot> {
    snapshot([
        gateway_record("west", "w1", west_addr, false),
        export_record("west", "w1", 1),
        vip_record("east", None, vip),
    ])
}

// === backends ===

/// What a backend runs on each connection it accepts.
type Serve = Arc<dyn Fn(TcpStream) -> BoxFuture<'static, ()> + Send + Sync>;

/// A TCP backend that counts accepted connections and runs `serve` on each. It can stop
/// listening ([`Backend::refuse`]: connects are refused, accepted connections run on) and
/// listen again on the same address ([`Backend::resume`]).
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    serve: Serve,
    accepting: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Backend {
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let serve: Serve = Arc::new(move |s| Box::pin(serve(s)));
        let accepted = Arc::new(AtomicUsize::new(0));
        let task = accept_loop(listener, serve.clone(), accepted.clone());
        Self {
            addr,
            accepted,
            serve,
            accepting: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Stops listening: from when this returns, connects to [`Backend::addr`] are refused.
    /// Connections already accepted run on.
    pub async fn refuse(&self) {
        let task = self.accepting.lock().expect("backend lock").take();
        if let Some(task) = task {
            task.abort();
            // Resolves once the task, and with it the listener, is dropped.
            let _ = task.await;
        }
    }

    /// Listens again on the same address (after [`Backend::refuse`]).
    pub async fn resume(&self) {
        let start = Instant::now();
        let listener = loop {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            match socket.bind(self.addr).and_then(|()| socket.listen(1024)) {
                Ok(l) => break l,
                // Something may hold the port for a moment (a connect that picked it as its
                // ephemeral port): try again briefly.
                Err(e) if start.elapsed() < Duration::from_secs(5) => {
                    tracing::debug!(addr = %self.addr, error = %e, "rebinding backend");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        let task = accept_loop(listener, self.serve.clone(), self.accepted.clone());
        let old = self.accepting.lock().expect("backend lock").replace(task);
        assert!(old.is_none(), "resume of a backend that was listening");
    }

    /// Echoes everything; on EOF from the client, finishes its own side.
    pub async fn echo() -> Self {
        Self::start(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// A backend for half-close and reset checks, by the first 5 bytes of a connection:
    /// `count` reads to EOF and answers `got <n>`; `reset` closes with an RST; anything else
    /// is echoed, then how the next read ended (a FIN is `UnexpectedEof`, data
    /// `InvalidData`, else the error kind) goes to the receiver.
    pub async fn reset_probe() -> (
        Self,
        tokio::sync::mpsc::UnboundedReceiver<std::io::ErrorKind>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let backend = Self::start(move |mut s| {
            let tx = tx.clone();
            async move {
                let mut cmd = [0u8; 5];
                if s.read_exact(&mut cmd).await.is_err() {
                    return;
                }
                match &cmd {
                    b"count" => {
                        let mut got = Vec::new();
                        if s.read_to_end(&mut got).await.is_ok() {
                            let _ = s.write_all(format!("got {}", got.len()).as_bytes()).await;
                        }
                    }
                    b"reset" => {
                        // Zero linger: dropping the socket sends an RST.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                    _ => {
                        let _ = s.write_all(&cmd).await;
                        let mut rest = [0u8; 16];
                        let kind = match s.read(&mut rest).await {
                            Ok(0) => std::io::ErrorKind::UnexpectedEof,
                            Ok(_) => std::io::ErrorKind::InvalidData,
                            Err(e) => e.kind(),
                        };
                        let _ = tx.send(kind);
                    }
                }
            }
        })
        .await;
        (backend, rx)
    }

    /// Hashes everything until EOF, then answers the 32-byte SHA-256 and closes.
    pub async fn sha256_sink() -> Self {
        Self::start(|mut s| async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => h.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&h.finalize()).await;
            let _ = s.shutdown().await;
        })
        .await
    }
}

fn accept_loop(
    listener: TcpListener,
    serve: Serve,
    count: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s));
        }
    })
}

/// Connects a client to `vip:8080`.
pub async fn dial(vip: IpAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(SocketAddr::new(vip, SERVICE_PORT)).await?;
    // May fail if the proxy already reset the connection; the test's next read shows that.
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// Dials `vip:8080` and pings once: for connections expected to fail, wherever they fail
/// (a fast reset can even surface from `connect` itself).
pub async fn try_ping(vip: IpAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = dial(vip).await?;
    ping(&mut s, msg).await
}

/// Sends `msg` and reads the same number of bytes back.
pub async fn ping(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).await?;
    Ok(back)
}

// === UDP relay ===

/// A user-space UDP relay between one client and `target`: can blackhole traffic (a peer
/// that dies silently), drop datagrams above a size (a path-MTU black hole), and counts the
/// datagrams it passes and QUIC Retry packets from the server.
pub struct Relay {
    pub addr: SocketAddr,
    /// Datagrams passed on, both ways.
    pub passed: Arc<AtomicUsize>,
    pub blackhole: Arc<std::sync::atomic::AtomicBool>,
    pub retries_seen: Arc<AtomicUsize>,
    /// Datagrams longer than this (UDP payload bytes) are dropped, both ways.
    pub max_datagram: Arc<AtomicUsize>,
    /// Datagrams dropped for their size.
    pub dropped_large: Arc<AtomicUsize>,
    /// When the last datagram from the server was passed to the client.
    last_to_client: Arc<std::sync::Mutex<Option<Instant>>>,
    /// When the last datagram was passed on, either way.
    last_any: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::AtomicBool;
        use tokio::net::UdpSocket;
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind relay"));
        back.connect(target).await.expect("connect relay");
        let addr = front.local_addr().expect("addr");
        let blackhole = Arc::new(AtomicBool::new(false));
        let retries_seen = Arc::new(AtomicUsize::new(0));
        let max_datagram = Arc::new(AtomicUsize::new(usize::MAX));
        let dropped_large = Arc::new(AtomicUsize::new(0));
        let passed = Arc::new(AtomicUsize::new(0));
        let last_to_client: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let last_any: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let client: Arc<std::sync::Mutex<Option<SocketAddr>>> = Arc::default();
        // Whether a datagram of `n` bytes may pass, counting the ones dropped for size.
        let fits = {
            let (max, dropped) = (max_datagram.clone(), dropped_large.clone());
            move |n: usize| {
                let fits = n <= max.load(Ordering::SeqCst);
                if !fits {
                    dropped.fetch_add(1, Ordering::SeqCst);
                }
                fits
            }
        };
        {
            let (front, back, blackhole, client, fits) = (
                front.clone(),
                back.clone(),
                blackhole.clone(),
                client.clone(),
                fits.clone(),
            );
            let (any, passed) = (last_any.clone(), passed.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().expect("relay lock") = Some(from);
                    if !blackhole.load(Ordering::SeqCst) && fits(n) {
                        *any.lock().expect("relay lock") = Some(Instant::now());
                        passed.fetch_add(1, Ordering::SeqCst);
                        let _ = back.send(&buf[..n]).await;
                    }
                }
            });
        }
        {
            let (blackhole, retries, last, any) = (
                blackhole.clone(),
                retries_seen.clone(),
                last_to_client.clone(),
                last_any.clone(),
            );
            let passed = passed.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = back.recv(&mut buf).await {
                    // QUIC v1 long header, type Retry: 1 1 11 xxxx.
                    if n > 0 && buf[0] & 0xF0 == 0xF0 {
                        retries.fetch_add(1, Ordering::SeqCst);
                    }
                    let to = *client.lock().expect("relay lock");
                    if let (false, Some(to)) = (blackhole.load(Ordering::SeqCst), to)
                        && fits(n)
                    {
                        // Taken before the send, so the client cannot have heard from the
                        // server any later than this.
                        let at = Instant::now();
                        passed.fetch_add(1, Ordering::SeqCst);
                        let _ = front.send_to(&buf[..n], to).await;
                        *last.lock().expect("relay lock") = Some(at);
                        *any.lock().expect("relay lock") = Some(at);
                    }
                }
            });
        }
        Self {
            addr,
            passed,
            blackhole,
            retries_seen,
            max_datagram,
            dropped_large,
            last_to_client,
            last_any,
        }
    }

    /// Drops everything, both ways, once the server has sent the client a datagram and
    /// then nothing passed either way for `quiet`: every exchange is complete, and between
    /// idle QUIC peers the next datagram is a keep-alive a whole interval later, the worst
    /// moment for the client to notice that its peer died.
    pub fn blackhole_when_quiet(&self, quiet: Duration) {
        let armed = Instant::now();
        let (blackhole, last, any) = (
            self.blackhole.clone(),
            self.last_to_client.clone(),
            self.last_any.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                // Held across the check and the store, so no datagram passes in between.
                let last_any = any.lock().expect("relay lock");
                let spoke = last.lock().expect("relay lock").is_some_and(|t| t > armed);
                if spoke && last_any.is_some_and(|t| t.elapsed() >= quiet) {
                    blackhole.store(true, Ordering::SeqCst);
                    return;
                }
            }
        });
    }

    /// When the last datagram from the server was passed to the client.
    pub fn last_to_client(&self) -> Option<Instant> {
        *self.last_to_client.lock().expect("relay lock")
    }
}

// === a peer that records who called ===

/// A stand-in for a peer gateway of `cluster` that answers every tunnel stream `connected`
/// and echoes it, and records for each stream the serial of the certificate its caller's
/// QUIC connection presented (which a real gateway only logs). Its endpoint verifies callers
/// exactly like a gateway's does.
pub struct EchoPeer {
    pub addr: SocketAddr,
    endpoint: Arc<Endpoint>,
    connections: Arc<AtomicUsize>,
    streams: Arc<std::sync::Mutex<Vec<String>>>,
}

impl EchoPeer {
    pub fn start(id_dir: &Path, cluster_name: &str) -> Self {
        use meshup_core::tunnel::{Status, decode_header, encode_status};
        let files = IdentityFiles::in_dir(id_dir);
        let mut cfg = TunnelConfig::with_files(files.clone());
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        let identity = Identity::load(files, TD, cluster(cluster_name)).expect("identity");
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let endpoint = Endpoint::bind(&cfg, identity, metrics).expect("bind");
        let connections = Arc::new(AtomicUsize::new(0));
        let streams: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (ep, conns, log) = (endpoint.clone(), connections.clone(), streams.clone());
        tokio::spawn(async move {
            while let Some(incoming) = ep.quinn().accept().await {
                let Ok(conn) = incoming.await else { continue };
                let serial = meshup_gateway::tunnel::peer_identity(&conn, TD)
                    .expect("the verifier accepted an SVID")
                    .serial;
                conns.fetch_add(1, Ordering::SeqCst);
                let log = log.clone();
                tokio::spawn(async move {
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let (serial, log) = (serial.clone(), log.clone());
                        tokio::spawn(async move {
                            let mut buf = Vec::new();
                            let mut chunk = [0u8; 4096];
                            let used = loop {
                                match decode_header(&buf) {
                                    Ok((_, used)) => break used,
                                    Err(e) if e.is_incomplete() => {}
                                    Err(_) => return,
                                }
                                match recv.read(&mut chunk).await {
                                    Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                                    _ => return,
                                }
                            };
                            log.lock().expect("peer lock").push(serial);
                            let answer = encode_status(Status::Connected);
                            if send.write_all(&answer).await.is_err()
                                || send.write_all(&buf[used..]).await.is_err()
                            {
                                return;
                            }
                            let _ = tokio::io::copy(&mut recv, &mut send).await;
                            let _ = send.finish();
                        });
                    }
                });
            }
        });
        Self {
            addr: endpoint.local_addr(),
            endpoint,
            connections,
            streams,
        }
    }

    /// QUIC connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// For each stream so far, in the order they arrived: the serial of the certificate
    /// its caller presented.
    pub fn stream_serials(&self) -> Vec<String> {
        self.streams.lock().expect("peer lock").clone()
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.endpoint
            .close(meshup_gateway::tunnel::CLOSE_SHUTDOWN, b"test over");
    }
}

//! Tools of the hostile-input suite (tests/tests/hostile.rs): a UDP blaster, a process's
//! memory watched from `/proc`, a real client Initial captured for replay, an authenticated
//! tunnel peer (a quinn endpoint with a valid SVID of the test PKI), a slow-loris of TCP
//! connections that hold a server's slots, and sinks to aim them at for a control phase (a
//! drained socket and listener, [`Sink`]; a tunnel endpoint that takes streams and never
//! answers, [`QuicSink`]).
//!
//! Every loop here is bounded in time: the attacks stop by themselves at their deadline.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use meshup_core::names::ClusterName;
use meshup_gateway::identity::{Identity, IdentityFiles};
use meshup_gateway::tunnel::{Endpoint, Metrics, TunnelConfig};

use crate::gateways::{Certs, TRUST_DOMAIN};
use crate::procs::rss_kib;

// === memory ===

/// Samples a process's RSS every 50 ms on a thread of its own and keeps the peak.
#[derive(Debug)]
pub struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RssWatch {
    pub fn start(pid: u32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok(kib) = rss_kib(pid) {
                    p.fetch_max(kib, Ordering::Relaxed);
                }
                // A sampling period, not a wait for a condition.
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    /// The highest RSS seen so far, KiB.
    pub fn peak_kib(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// === the UDP blaster ===

/// What one blast did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlastReport {
    /// Datagrams the kernel accepted.
    pub sent: u64,
    /// Datagrams refused by the kernel (a full socket buffer, ICMP errors surfacing).
    pub send_errors: u64,
    pub elapsed: Duration,
}

impl BlastReport {
    /// Datagrams per second achieved.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Writes datagram number `n` of a thread into the buffer (cleared before each call).
pub type Payloads = Arc<dyn Fn(u64, &mut Vec<u8>) + Send + Sync>;

/// Sends datagrams to one address as fast as `threads` threads can, each rotating over
/// `sockets` sockets of its own (so the target sees many source ports), until `duration`
/// passes. `fresh_ports_every`: replace one socket by a newly bound one (a new source port)
/// after this many datagrams of a thread (0: never).
#[derive(Debug)]
pub struct UdpBlaster {
    started: Instant,
    threads: Vec<JoinHandle<(u64, u64)>>,
    stop: Arc<AtomicBool>,
}

impl UdpBlaster {
    pub fn start(
        target: SocketAddr,
        threads: usize,
        sockets: usize,
        fresh_ports_every: u64,
        duration: Duration,
        payloads: Payloads,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let deadline = started + duration;
        let mut handles = Vec::new();
        for t in 0..threads {
            let mut socks = (0..sockets.max(1))
                .map(|_| blaster_socket(target))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (stop, payloads) = (stop.clone(), payloads.clone());
            handles.push(std::thread::spawn(move || {
                let (mut sent, mut errors) = (0u64, 0u64);
                let mut buf = Vec::with_capacity(2048);
                let mut n = (t as u64) << 48;
                while !stop.load(Ordering::Relaxed) {
                    // The clock is read once per 256 datagrams: the loop stays send-bound.
                    if n.is_multiple_of(256) && Instant::now() >= deadline {
                        break;
                    }
                    buf.clear();
                    payloads(n, &mut buf);
                    let i = (n % socks.len() as u64) as usize;
                    match socks[i].send(&buf) {
                        Ok(_) => sent += 1,
                        Err(_) => errors += 1,
                    }
                    n += 1;
                    if fresh_ports_every > 0
                        && n.is_multiple_of(fresh_ports_every)
                        && let Ok(s) = blaster_socket(target)
                    {
                        socks[i] = s;
                    }
                }
                (sent, errors)
            }));
        }
        Ok(Self {
            started,
            threads: handles,
            stop,
        })
    }

    /// Waits for the threads (they stop at the deadline) and reports.
    pub fn finish(mut self) -> BlastReport {
        let (mut sent, mut send_errors) = (0, 0);
        for t in std::mem::take(&mut self.threads) {
            if let Ok((s, e)) = t.join() {
                sent += s;
                send_errors += e;
            }
        }
        BlastReport {
            sent,
            send_errors,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for UdpBlaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

fn blaster_socket(target: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::new(target.ip(), 0)).context("bind a blaster socket")?;
    s.connect(target).context("connect a blaster socket")?;
    // Errors surfacing from ICMP must not block the loop.
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A small xorshift generator: junk that differs per datagram without a dependency.
pub fn junk(seed: u64, len: usize, out: &mut Vec<u8>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
}

// === the control: the same attack aimed at nobody ===

/// A place to aim an attack that is not the gateway, for a control phase: a UDP socket that
/// a thread only drains, and a TCP listener that accepts each connection and closes it at
/// once. The machine then carries the attacker's load and the kernel's share of it, but no
/// gateway's; what the workload suffers then is the machine's, not the gateway's.
#[derive(Debug)]
pub struct Sink {
    udp: SocketAddr,
    tcp: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Sink {
    pub fn start() -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let udp_socket = UdpSocket::bind("127.0.0.1:0").context("bind the sink's UDP socket")?;
        // Wakes the drain to look at `stop` when nothing arrives.
        udp_socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let udp = udp_socket.local_addr()?;
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("bind the sink's listener")?;
        let tcp = listener.local_addr()?;
        let drain = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let _ = udp_socket.recv(&mut buf);
                }
            })
        };
        let accept = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    drop(conn);
                }
            })
        };
        Ok(Self {
            udp,
            tcp,
            stop,
            threads: vec![drain, accept],
        })
    }

    /// The drained UDP socket.
    pub fn udp(&self) -> SocketAddr {
        self.udp
    }

    /// The listener that closes every connection.
    pub fn tcp(&self) -> SocketAddr {
        self.tcp
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // The accept loop sees `stop` at its next connection: this one.
        let _ = std::net::TcpStream::connect(self.tcp);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
    }
}

/// A tunnel endpoint that is not a gateway, for the control phase of an attack by an
/// authenticated peer: it holds `cluster`'s certificate (so the attacker's dial succeeds as
/// it does against a gateway of that cluster) and plays a gateway's limits on streams
/// without a header, and nothing else: it takes at most `held_per_connection` streams of a
/// connection at a time (the rest wait inside QUIC), reads and drops what they send, resets
/// each one `header_timeout` after taking it (it never reads a header), and closes a
/// connection once `held_per_connection` of its streams were reset. So the attacker goes
/// through the same churn as at a gateway (streams reset, connections closed, reconnects and
/// handshakes), on a thread and runtime of its own, as a gateway is a process of its own;
/// what a control phase against it leaves out is the gateway's own work.
#[derive(Debug)]
pub struct QuicSink {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl QuicSink {
    /// Starts the sink with `cluster`'s certificate and a gateway's limits (above).
    pub fn start(
        certs: &Certs,
        cluster: &str,
        held_per_connection: usize,
        header_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let dir = certs.of(cluster);
        let cluster = cluster.to_owned();
        let thread = std::thread::Builder::new()
            .name("quic-sink".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("sink runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let endpoint = match endpoint_in(&dir, &cluster, |_| {}) {
                        Ok(e) => e,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(endpoint.local_addr()));
                    let accept = async {
                        while let Some(incoming) = endpoint.quinn().accept().await {
                            tokio::spawn(async move {
                                if let Ok(conn) = incoming.await {
                                    hold_streams(conn, held_per_connection, header_timeout).await;
                                }
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                    endpoint.close(0u32.into(), b"sink stopped");
                });
            })
            .context("start the QUIC sink's thread")?;
        let addr = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the QUIC sink did not start")??;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The sink's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// One connection of the [`QuicSink`]: streams taken `held` at a time, each reset after
/// `timeout`, the connection closed after `held` resets.
async fn hold_streams(conn: quinn::Connection, held: usize, timeout: Duration) {
    let slots = Arc::new(tokio::sync::Semaphore::new(held));
    let resets = Arc::new(AtomicU64::new(0));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            _ = conn.closed() => return,
        };
        let Ok(slot) = slot else { return };
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        let (conn, resets) = (conn.clone(), resets.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let drained = tokio::time::timeout(timeout, async {
                let mut buf = [0u8; 4096];
                while let Ok(Some(_)) = recv.read(&mut buf).await {}
            })
            .await;
            if drained.is_err() {
                let _ = send.reset(0u32.into());
                let _ = recv.stop(0u32.into());
                if resets.fetch_add(1, Ordering::Relaxed) + 1 >= held as u64 {
                    conn.close(0u32.into(), b"stalling");
                }
            }
        });
    }
}

impl Drop for QuicSink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// === the tunnel peer ===

/// A tunnel endpoint on a free loopback port holding `cluster`'s certificate from `certs`:
/// a peer the gateways authenticate as a member of the federation.
pub fn peer_endpoint(
    certs: &Certs,
    cluster: &str,
    tune: impl FnOnce(&mut TunnelConfig),
) -> anyhow::Result<Arc<Endpoint>> {
    endpoint_in(&certs.of(cluster), cluster, tune)
}

/// [`peer_endpoint`] with the certificate files in `dir`.
fn endpoint_in(
    dir: &std::path::Path,
    cluster: &str,
    tune: impl FnOnce(&mut TunnelConfig),
) -> anyhow::Result<Arc<Endpoint>> {
    let files = IdentityFiles::in_dir(dir);
    let identity = Identity::load(files.clone(), TRUST_DOMAIN, ClusterName::new(cluster)?)
        .context("load the peer's identity")?;
    let mut config = TunnelConfig::with_files(files);
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    tune(&mut config);
    Ok(Endpoint::bind(&config, identity, Metrics::default())?)
}

/// The first datagram a real client handshake sends: a QUIC Initial of `cluster`'s endpoint
/// dialing a gateway of `server_cluster`, captured on a socket that never answers.
pub async fn capture_initial(
    certs: &Certs,
    cluster: &str,
    server_cluster: &str,
) -> anyhow::Result<Vec<u8>> {
    let endpoint = peer_endpoint(certs, cluster, |_| {})?;
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let addr = trap.local_addr()?;
    let server = ClusterName::new(server_cluster)?;
    let dial = {
        let endpoint = endpoint.clone();
        tokio::spawn(async move { endpoint.connect(addr, &server).await })
    };
    let mut buf = vec![0u8; 65536];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), trap.recv_from(&mut buf))
        .await
        .context("no Initial within 5 s")??;
    dial.abort();
    buf.truncate(n);
    // Long header (0x80), fixed bit (0x40), packet type Initial (0b00 in bits 4-5).
    anyhow::ensure!(
        buf[0] & 0xf0 == 0xc0,
        "not a QUIC Initial: first byte {:#x}",
        buf[0]
    );
    Ok(buf)
}

// === the TCP slow-loris ===

/// How a slow-loris connection behaves once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slowness {
    /// Sends nothing.
    Silent,
    /// Sends `prefix` at once, then one byte of `dribble` per second.
    Dribble,
}

/// Counts of a slow-loris attack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LorisReport {
    /// Connections made.
    pub opened: u64,
    /// Connections refused or failed at connect.
    pub connect_failed: u64,
    /// Connections the server closed (EOF or reset) while they stalled.
    pub closed_by_server: u64,
    /// Of those, closed within one second of being accepted (at the limit: no room).
    pub closed_at_once: u64,
    /// Connections still open at the end.
    pub still_open: u64,
}

/// Keeps `connections` slow TCP connections open to `target` until `duration` passes: each
/// one the server closes is counted and replaced by a new one (a slow-loris keeps up the
/// pressure). Half are [`Slowness::Silent`], half [`Slowness::Dribble`] of `prefix` then
/// `dribble`.
pub async fn slow_loris(
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    prefix: Vec<u8>,
    dribble: Vec<u8>,
) -> LorisReport {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + duration;
    let report = Arc::new(std::sync::Mutex::new(LorisReport::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..connections {
        let how = if i % 2 == 0 {
            Slowness::Silent
        } else {
            Slowness::Dribble
        };
        let (report, prefix, dribble) = (report.clone(), prefix.clone(), dribble.clone());
        tasks.spawn(async move {
            let count = |f: &dyn Fn(&mut LorisReport)| {
                f(&mut report.lock().expect("loris report lock"));
            };
            while tokio::time::Instant::now() < deadline {
                let conn =
                    tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(target)).await;
                let mut conn = match conn {
                    Err(_) => break,
                    Ok(Err(_)) => {
                        count(&|r| r.connect_failed += 1);
                        // Refused: the listener is gone or its backlog full; try again soon.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Ok(Ok(c)) => c,
                };
                count(&|r| r.opened += 1);
                let opened = Instant::now();
                let (mut r, mut w) = conn.split();
                let stall = async {
                    if how == Slowness::Dribble {
                        w.write_all(&prefix).await?;
                        for b in &dribble {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            w.write_all(std::slice::from_ref(b)).await?;
                        }
                    }
                    std::future::pending::<std::io::Result<()>>().await
                };
                let mut byte = [0u8; 1];
                let closed = async {
                    // The server never answers a query it never got: any read result is a close.
                    let _ = r.read(&mut byte).await;
                };
                let ended = tokio::select! {
                    () = closed => true,
                    _ = stall => true,
                    () = tokio::time::sleep_until(deadline) => false,
                };
                if !ended {
                    count(&|r| r.still_open += 1);
                    break;
                }
                let at_once = opened.elapsed() < Duration::from_secs(1);
                count(&|r| {
                    r.closed_by_server += 1;
                    if at_once {
                        r.closed_at_once += 1;
                    }
                });
                if at_once {
                    // Turned away at once: pace the reconnects, a slow-loris is not a SYN flood.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    *report.lock().expect("loris report lock")
}

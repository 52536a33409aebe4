//! The DNS server: bind (UDP workers + TCP listener), run until cancelled, drain.
//!
//! Threads and tasks:
//! - `udp_workers` OS threads sharing one UDP socket (a duplicate descriptor each), each
//!   with a blocking recvmmsg/sendmmsg loop. They answer from the precomputed
//!   [`FastTable`] and fall back to the hickory catalog inline (`Handle::block_on`; the
//!   catalog never waits on I/O). FORMERR
//!   answers the fast path makes for junk are sent within an error budget per worker
//!   ([`crate::budget`]); beyond it the junk is dropped.
//! - one task rebuilds the table when the catalog snapshot changes and publishes it on a
//!   `watch` channel. Workers check `has_changed()` (one atomic load) per packet and only
//!   take the channel's lock when there is something new. Until the table for the newest
//!   snapshot is published, workers answer through the catalog, which reads the newest
//!   snapshot directly: a catalog change is visible to the very next query.
//! - one task accepts TCP connections (capped; each with an idle/read deadline) and answers
//!   them through the catalog.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_server::net::xfer::Protocol;
use meshup_core::catalog::Snapshot;
use meshup_core::names::ClusterName;
use nix::errno::Errno;
use nix::sys::socket::{
    ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg, sendmmsg, sockopt,
};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::answer::{ZoneSettings, ZoneView};
use crate::budget::{ERRORS_PER_SECOND, ErrorBudget};
use crate::config::{ConfigError, DnsConfig};
use crate::handler::{ClustersetZone, Guarded, ViewSource};
use crate::metrics::{FAST_LATENCY_SAMPLE, Metrics, Path, classify_response};
use crate::wire::{Fast, FastTable, TableError};

/// Datagrams moved per recvmmsg/sendmmsg call.
const UDP_BATCH: usize = 32;
/// Largest UDP query accepted (bigger datagrams are dropped): a question is at most 259
/// bytes, so this leaves ample room for EDNS options.
const MAX_UDP_QUERY: usize = 4096;
/// No control messages on send.
const NO_CMSGS: [ControlMessage<'static>; 0] = [];
/// How often a UDP worker wakes up without traffic to notice shutdown.
const WORKER_POLL: Duration = Duration::from_millis(100);
/// Socket receive buffer asked for each UDP socket, to absorb bursts.
const UDP_RECV_BUFFER_BYTES: usize = 4 << 20;
/// How long `run` waits for TCP connections and workers to finish after shutdown.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// Attempts to find a port free for both UDP and TCP when the config asks for port 0.
const EPHEMERAL_BIND_ATTEMPTS: usize = 16;

/// Why the DNS server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid dns config: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "cannot bind DNS {proto} on {addr}: {source} (is another DNS server running on that port? change dns.listen)"
    )]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot configure DNS socket on {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
    #[error("cannot start DNS UDP worker thread: {0}")]
    Thread(io::Error),
    #[error("cannot build the DNS answer table: {0}")]
    Table(#[from] TableError),
    #[error("DNS table builder task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A bound, not yet running DNS server. See the module docs.
#[derive(Debug)]
pub struct DnsServer {
    local_addr: SocketAddr,
    udp: Vec<UdpSocket>,
    tcp: std::net::TcpListener,
    config: DnsConfig,
    settings: Arc<ZoneSettings>,
    local: ClusterName,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
}

/// One published table and the view it was built from.
#[derive(Debug)]
struct Published {
    view: Arc<ZoneView>,
    table: FastTable,
}

impl DnsServer {
    /// Validates the config and binds UDP (one socket the workers share) and TCP on one port.
    /// A port already in use fails here, at start-up.
    pub fn bind(
        config: &DnsConfig,
        local: ClusterName,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        metrics: Metrics,
    ) -> Result<Self, DnsError> {
        let settings = Arc::new(ZoneSettings::from_config(config)?);
        let attempts = if config.listen.port() == 0 {
            EPHEMERAL_BIND_ATTEMPTS
        } else {
            1
        };
        let mut last_err = None;
        for _ in 0..attempts {
            match bind_all(config) {
                Ok((local_addr, udp, tcp)) => {
                    return Ok(Self {
                        local_addr,
                        udp,
                        tcp,
                        config: config.clone(),
                        settings,
                        local,
                        snapshots,
                        metrics,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or(DnsError::Bind {
            proto: "udp",
            addr: config.listen,
            source: io::Error::other("no bind attempt made"),
        }))
    }

    /// A server on sockets bound elsewhere: the UDP socket (several are all read) and the TCP
    /// listener a previous gateway process on this node handed over, so queries queued in
    /// them are answered and none is refused while the processes change.
    pub fn inherit(
        config: &DnsConfig,
        local: ClusterName,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        metrics: Metrics,
        udp: Vec<UdpSocket>,
        tcp: std::net::TcpListener,
    ) -> Result<Self, DnsError> {
        let settings = Arc::new(ZoneSettings::from_config(config)?);
        let local_addr = tcp.local_addr().map_err(|source| DnsError::Socket {
            addr: config.listen,
            source,
        })?;
        if udp.is_empty() {
            return Err(DnsError::Socket {
                addr: local_addr,
                source: io::Error::other("no UDP socket handed over"),
            });
        }
        Ok(Self {
            local_addr,
            udp,
            tcp,
            config: config.clone(),
            settings,
            local,
            snapshots,
            metrics,
        })
    }

    /// The listening sockets (UDP and TCP), to hand over to a successor.
    pub fn sockets(
        &self,
    ) -> (
        Vec<std::os::fd::BorrowedFd<'_>>,
        std::os::fd::BorrowedFd<'_>,
    ) {
        use std::os::fd::AsFd;
        (
            self.udp.iter().map(|u| u.as_fd()).collect(),
            self.tcp.as_fd(),
        )
    }

    /// The bound address (UDP and TCP share the port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then stops the workers, closes TCP
    /// connections (waiting at most a few seconds) and returns. Must be called inside a
    /// tokio runtime.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DnsError> {
        let Self {
            local_addr,
            udp,
            tcp,
            config,
            settings,
            local,
            snapshots,
            metrics,
        } = self;
        let guarded = Arc::new(Guarded::new(ClustersetZone::new(ViewSource::new(
            settings.clone(),
            local.clone(),
            snapshots.clone(),
        ))));

        let mut snap_rx = snapshots.clone();
        let first = snap_rx.borrow_and_update().clone();
        let published = build_table(&settings, &local, first, None).await?;
        metrics.table_rebuilt();
        let (table_tx, table_rx) = watch::channel(Arc::new(published));

        // Everything that can fail comes before the worker threads start.
        let listener = tcp
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(tcp))
            .map_err(|source| DnsError::Socket {
                addr: local_addr,
                source,
            })?;
        let stop = Arc::new(AtomicBool::new(false));
        let handle = tokio::runtime::Handle::current();
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let sockets = worker_sockets(&udp, config.udp_workers, local_addr)?;
        drop(udp);
        for (i, socket) in sockets.into_iter().enumerate() {
            let worker = UdpWorker {
                socket,
                tables: table_rx.clone(),
                snapshots: snapshots.clone(),
                guarded: guarded.clone(),
                metrics: metrics.clone(),
                stop: stop.clone(),
                runtime: handle.clone(),
            };
            let spawned = std::thread::Builder::new()
                .name(format!("meshup-dns-udp-{i}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    return Err(DnsError::Thread(e));
                }
            }
        }
        info!(%local_addr, zone = %settings.origin, workers = workers.len(), "DNS server running");

        let tracker = TaskTracker::new();
        // Table rebuilds, off the hot path.
        {
            let (settings, local, metrics, shutdown) = (
                settings.clone(),
                local.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            tracker.spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        changed = snap_rx.changed() => {
                            if changed.is_err() {
                                // The catalog owner is gone; keep serving the last table.
                                return;
                            }
                        }
                    }
                    let snapshot = snap_rx.borrow_and_update().clone();
                    let started = Instant::now();
                    let previous = table_tx.borrow().clone();
                    match build_table(&settings, &local, snapshot, Some(previous)).await {
                        Ok(published) => {
                            let names = published.table.len();
                            table_tx.send_replace(Arc::new(published));
                            metrics.table_rebuilt();
                            debug!(names, elapsed = ?started.elapsed(), "DNS table updated");
                        }
                        Err(error) => {
                            warn!(%error, "DNS table rebuild failed; queries use the catalog path")
                        }
                    }
                }
            });
        }

        let slots = Arc::new(std::sync::Mutex::new(TcpSlots::new(
            config.max_tcp_connections,
        )));
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(error) => {
                        // Out of file descriptors and the like: back off briefly, keep going.
                        warn!(%error, "DNS TCP accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = TcpSlots::take(&slots, &metrics) else {
                metrics.tcp_rejected();
                drop(stream);
                continue;
            };
            let conn = TcpConnection {
                guarded: guarded.clone(),
                metrics: metrics.clone(),
                idle: config.tcp_idle_timeout,
                shutdown: shutdown.clone(),
                slot,
            };
            tracker.spawn(conn.serve(stream, peer));
        }

        // Close the listening socket now, not when `run` returns: while it stays open the
        // kernel keeps completing handshakes into its backlog, and those clients would send
        // queries nobody reads until the drain below ends. Closed, they are refused at once
        // and retry another server.
        drop(listener);
        stop.store(true, Ordering::Relaxed);
        tracker.close();
        if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
            .await
            .is_err()
        {
            warn!("DNS TCP connections still open after the drain deadline; dropping them");
        }
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                if w.join().is_err() {
                    warn!("a DNS UDP worker panicked");
                }
            }
        });
        if tokio::time::timeout(DRAIN_DEADLINE, joined).await.is_err() {
            warn!("DNS UDP workers did not stop within the drain deadline");
        }
        info!(%local_addr, "DNS server stopped");
        Ok(())
    }

    /// Spawns [`run`](Self::run) on the current runtime; cancel the token and await the
    /// handle to stop.
    pub fn spawn(
        self,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), DnsError>> {
        tokio::spawn(self.run(shutdown))
    }
}

/// Builds the table for `snapshot` on a blocking thread: incrementally from `previous`
/// when there is one, from scratch otherwise.
async fn build_table(
    settings: &Arc<ZoneSettings>,
    local: &ClusterName,
    snapshot: Arc<Snapshot>,
    previous: Option<Arc<Published>>,
) -> Result<Published, DnsError> {
    let view = Arc::new(ZoneView::new(settings.clone(), local.clone(), snapshot));
    let published = tokio::task::spawn_blocking(move || {
        let table = match &previous {
            Some(prev) => prev.table.update(&prev.view, &view),
            None => FastTable::build(&view),
        };
        table.map(|table| Published { view, table })
    })
    .await??;
    Ok(published)
}

type Bound = (SocketAddr, Vec<UdpSocket>, std::net::TcpListener);

fn bind_all(config: &DnsConfig) -> Result<Bound, DnsError> {
    let socket = udp_socket(config.listen)?;
    let local_addr = socket.local_addr().map_err(|source| DnsError::Socket {
        addr: config.listen,
        source,
    })?;
    let tcp = tcp_listener(local_addr)?;
    Ok((local_addr, vec![socket], tcp))
}

/// The UDP socket, bound without SO_REUSEPORT: with it, any process of the same user that
/// sets SO_REUSEPORT could join the port. `dig` does, and binds port 0: run as the
/// gateway's user it was handed the server's port now and then, connected to the server
/// and read its own query back as the "answer". The workers share this one socket (each
/// reads a duplicate of its descriptor), which needs no port sharing at all.
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    let sock_err = |source| DnsError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None).map_err(sock_err)?;
    // Best effort, to absorb bursts: above net.core.rmem_max only with CAP_NET_ADMIN
    // (SO_RCVBUFFORCE), else the kernel caps it at rmem_max.
    if nix::sys::socket::setsockopt(&socket, sockopt::RcvBufForce, &UDP_RECV_BUFFER_BYTES).is_err()
    {
        let _ = socket.set_recv_buffer_size(UDP_RECV_BUFFER_BYTES);
    }
    socket.bind(&addr.into()).map_err(|source| DnsError::Bind {
        proto: "udp",
        addr,
        source,
    })?;
    Ok(socket.into())
}

/// One descriptor per worker: worker `i` reads a duplicate of `sockets[i % len]`, so every
/// socket is read (a predecessor may hand over several) and there are at least `workers`
/// readers. Each gets the poll timeout the workers rely on to notice shutdown.
fn worker_sockets(
    sockets: &[UdpSocket],
    workers: usize,
    addr: SocketAddr,
) -> Result<Vec<UdpSocket>, DnsError> {
    let sock_err = |source| DnsError::Socket { addr, source };
    (0..workers.max(sockets.len()))
        .map(|i| {
            let socket = sockets[i % sockets.len()].try_clone().map_err(sock_err)?;
            socket
                .set_read_timeout(Some(WORKER_POLL))
                .map_err(sock_err)?;
            Ok(socket)
        })
        .collect()
}

fn tcp_listener(addr: SocketAddr) -> Result<std::net::TcpListener, DnsError> {
    let sock_err = |source| DnsError::Socket { addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(sock_err)?;
    socket.set_reuse_address(true).map_err(sock_err)?;
    let bind_err = |source| DnsError::Bind {
        proto: "tcp",
        addr,
        source,
    };
    socket.bind(&addr.into()).map_err(bind_err)?;
    socket.listen(1024).map_err(bind_err)?;
    Ok(socket.into())
}

/// One UDP socket's receive loop.
struct UdpWorker {
    socket: UdpSocket,
    tables: watch::Receiver<Arc<Published>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    guarded: Arc<Guarded>,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
}

/// What a worker holds between packets: the current table and whether it was built from
/// the newest snapshot (if not, the catalog path answers from the newest one).
struct WorkerState {
    table: Arc<Published>,
    fresh: bool,
}

impl UdpWorker {
    fn run(mut self) {
        let fd = self.socket.as_raw_fd();
        // Receive buffers and their replies, one pair per datagram a batch can hold. They
        // start at one and double each time a batch fills them all, up to `UDP_BATCH`: an
        // idle worker holds 4 KiB instead of 128 KiB of buffers, which are memory as soon
        // as they are allocated (docs/scale.md, "An idle gateway").
        let mut bufs: Vec<Vec<u8>> = vec![vec![0u8; MAX_UDP_QUERY]];
        let mut outs: Vec<Vec<u8>> = vec![Vec::with_capacity(1024)];
        let mut recv_headers = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
        let mut send_headers = MultiHeaders::<SockaddrStorage>::preallocate(UDP_BATCH, None);
        // Per received datagram: (length, truncated) and its source address, kept apart so
        // the 128-byte addresses are copied as little as possible.
        let mut received: Vec<(usize, bool)> = Vec::with_capacity(UDP_BATCH);
        let mut sources: Vec<Option<SockaddrStorage>> = Vec::with_capacity(UDP_BATCH);
        let mut replies: Vec<usize> = Vec::with_capacity(UDP_BATCH);
        let mut state = self.refresh();
        let mut budget = ErrorBudget::new(ERRORS_PER_SECOND, Instant::now());
        let mut packets: u64 = 0;
        while !self.stop.load(Ordering::Relaxed) {
            // One syscall for every datagram already queued (at least one; SO_RCVTIMEO wakes
            // us to check `stop`).
            received.clear();
            sources.clear();
            {
                let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
                    bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
                match recvmmsg(
                    fd,
                    &mut recv_headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_WAITFORONE,
                    None,
                ) {
                    Ok(msgs) => {
                        for m in msgs {
                            let truncated = m.flags.contains(MsgFlags::MSG_TRUNC);
                            received.push((m.bytes, truncated));
                            sources.push(m.address);
                        }
                    }
                    Err(Errno::EAGAIN | Errno::EINTR) => continue,
                    Err(error) => {
                        // ICMP errors from earlier sends surface here; not fatal.
                        debug!(%error, "DNS UDP receive error");
                        continue;
                    }
                }
            }
            // One atomic load each per batch; the locks are only taken when something changed.
            if self.tables.has_changed().unwrap_or(false)
                || self.snapshots.has_changed().unwrap_or(false)
            {
                state = self.refresh();
            }
            replies.clear();
            // One clock read per batch, for the error budget.
            let now = Instant::now();
            for (i, &(n, truncated)) in received.iter().enumerate() {
                let Some(addr) = &sources[i] else {
                    continue;
                };
                if truncated {
                    // Larger than any query we answer: not a DNS query worth parsing.
                    self.metrics.dropped();
                    continue;
                }
                packets = packets.wrapping_add(1);
                let sample = packets.is_multiple_of(FAST_LATENCY_SAMPLE);
                if self.answer(
                    &state,
                    &mut budget,
                    now,
                    &bufs[i][..n],
                    addr,
                    &mut outs[i],
                    sample,
                ) {
                    replies.push(i);
                }
            }
            self.send_batch(fd, &mut send_headers, &outs, &sources, &replies);
            if received.len() == bufs.len() && bufs.len() < UDP_BATCH {
                let more = bufs.len().min(UDP_BATCH - bufs.len());
                bufs.extend((0..more).map(|_| vec![0u8; MAX_UDP_QUERY]));
                outs.extend((0..more).map(|_| Vec::with_capacity(1024)));
            }
        }
    }

    /// Answers one datagram into `out`; returns whether there is something to send.
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &self,
        state: &WorkerState,
        budget: &mut ErrorBudget,
        now: Instant,
        packet: &[u8],
        addr: &SockaddrStorage,
        out: &mut Vec<u8>,
        sample: bool,
    ) -> bool {
        let started = sample.then(Instant::now);
        let fast = if state.fresh {
            state.table.table.answer(packet, out)
        } else {
            Fast::Slow
        };
        match fast {
            Fast::Answered {
                rcode: ResponseCode::FormErr,
                ..
            } if !budget.allow(now) => {
                // Junk beyond the error budget: not worth a send (see `budget`).
                self.metrics.dropped();
                false
            }
            Fast::Answered { qtype, rcode } => {
                self.metrics.query(Path::Fast, qtype, u16::from(rcode));
                if let Some(t) = started {
                    self.metrics.latency(Path::Fast, t.elapsed().as_secs_f64());
                }
                true
            }
            Fast::Drop => {
                self.metrics.dropped();
                false
            }
            Fast::Slow => {
                let Some(src) = to_socket_addr(addr) else {
                    return false;
                };
                let t = Instant::now();
                let resp =
                    self.runtime
                        .block_on(self.guarded.answer_bytes(packet, src, Protocol::Udp));
                let Some(resp) = resp else {
                    self.metrics.dropped();
                    return false;
                };
                let (qtype, rcode, truncated) = classify_response(&resp);
                self.metrics.query(Path::Slow, qtype, rcode);
                if truncated {
                    self.metrics.truncated();
                }
                self.metrics.latency(Path::Slow, t.elapsed().as_secs_f64());
                *out = resp;
                true
            }
        }
    }

    /// Sends the answers with one `sendmmsg` call. If the kernel refuses one datagram, the
    /// call reports only those before it; the rest of that batch is dropped like any lost
    /// UDP packet (the clients retry). The results are not iterated: nix would read the
    /// unused source-address slots of the send headers.
    fn send_batch(
        &self,
        fd: RawFd,
        headers: &mut MultiHeaders<SockaddrStorage>,
        outs: &[Vec<u8>],
        sources: &[Option<SockaddrStorage>],
        replies: &[usize],
    ) {
        if replies.is_empty() {
            return;
        }
        let slices: Vec<[IoSlice<'_>; 1]> =
            replies.iter().map(|&i| [IoSlice::new(&outs[i])]).collect();
        let addrs: Vec<Option<SockaddrStorage>> = replies.iter().map(|&i| sources[i]).collect();
        loop {
            match sendmmsg(fd, headers, &slices, &addrs, NO_CMSGS, MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                Err(error) => debug!(%error, "DNS UDP send failed; answers dropped"),
                Ok(_) => {}
            }
            return;
        }
    }

    fn refresh(&mut self) -> WorkerState {
        let newest = self.snapshots.borrow_and_update().clone();
        let table = self.tables.borrow_and_update().clone();
        let fresh = Arc::ptr_eq(&table.view.snapshot, &newest);
        WorkerState { table, fresh }
    }
}

// === TCP connection slots ===

/// What to do with a TCP connection just accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// Below the cap: serve it.
    Open,
    /// At the cap: close connection `id` (the one that has waited longest for a query) and
    /// serve the new one in its place.
    Evict(u64),
    /// At the cap and every connection is busy answering: close the new one.
    Reject,
}

/// The decision for a new connection, given the open ones (id and, while it waits for a
/// query, since when) and the cap. Pure.
///
/// Waiting for a query is the only state a client can hold a slot in for free: a
/// slow-loris opens connections and sends nothing, or a length prefix and then a byte now
/// and then. Refusing new connections at the cap would let it keep every real client out
/// for as long as the read deadline; closing the one that has waited longest instead means
/// a stalled connection keeps its slot only until `max` newer ones have arrived, while a
/// real client, whose query arrives with its connection, is served at once (RFC 7766 §6.2.3
/// lets a server close idle connections when it needs the resources).
fn admit(open: impl IntoIterator<Item = (u64, Option<Instant>)>, max: usize) -> Admit {
    let mut count = 0;
    let mut oldest: Option<(Instant, u64)> = None;
    for (id, waiting_since) in open {
        count += 1;
        if let Some(since) = waiting_since
            && oldest.is_none_or(|(o, _)| since < o)
        {
            oldest = Some((since, id));
        }
    }
    if count < max {
        Admit::Open
    } else if let Some((_, id)) = oldest {
        Admit::Evict(id)
    } else {
        Admit::Reject
    }
}

/// The open TCP connections: one entry per connection, removed when it ends.
#[derive(Debug)]
struct TcpSlots {
    max: usize,
    next_id: u64,
    open: std::collections::BTreeMap<u64, SlotState>,
}

#[derive(Debug)]
struct SlotState {
    waiting_since: Option<Instant>,
    close: CancellationToken,
}

impl TcpSlots {
    fn new(max: usize) -> Self {
        Self {
            max,
            next_id: 0,
            open: std::collections::BTreeMap::new(),
        }
    }

    /// A slot for a connection accepted now (closing the connection that waited longest
    /// when at the cap), or `None` when every slot is busy answering.
    fn take(slots: &Arc<std::sync::Mutex<Self>>, metrics: &Metrics) -> Option<TcpSlot> {
        let mut s = slots.lock().unwrap_or_else(|e| e.into_inner());
        let decision = admit(s.open.iter().map(|(id, st)| (*id, st.waiting_since)), s.max);
        match decision {
            Admit::Reject => return None,
            Admit::Evict(id) => {
                if let Some(evicted) = s.open.remove(&id) {
                    evicted.close.cancel();
                    metrics.tcp_evicted();
                }
            }
            Admit::Open => {}
        }
        let id = s.next_id;
        s.next_id += 1;
        let close = CancellationToken::new();
        s.open.insert(
            id,
            SlotState {
                waiting_since: Some(Instant::now()),
                close: close.clone(),
            },
        );
        Some(TcpSlot {
            slots: slots.clone(),
            id,
            close,
        })
    }
}

/// One connection's slot; frees it on drop.
#[derive(Debug)]
struct TcpSlot {
    slots: Arc<std::sync::Mutex<TcpSlots>>,
    id: u64,
    /// Cancelled when a newer connection took this slot.
    close: CancellationToken,
}

impl TcpSlot {
    /// Marks the connection waiting for a query since now (`true`) or busy with one.
    fn waiting(&self, waiting: bool) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = s.open.get_mut(&self.id) {
            st.waiting_since = waiting.then(Instant::now);
        }
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.open.remove(&self.id);
    }
}

/// One TCP client connection: length-prefixed queries until idle, EOF, shutdown, or a newer
/// connection needing its slot.
struct TcpConnection {
    guarded: Arc<Guarded>,
    metrics: Metrics,
    idle: Duration,
    shutdown: CancellationToken,
    slot: TcpSlot,
}

impl TcpConnection {
    async fn serve(self, mut stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // Set when a newer connection took the slot: a query already received whole is
        // still answered, then the connection closes.
        let mut evicted = false;
        while !evicted {
            self.slot.waiting(true);
            // Idle until the first byte of the next query: shutdown closes the connection
            // then, as does the idle deadline. A newer connection needing the slot closes it
            // too, unless a whole query is already here: a real client sends its query with
            // the connection, and when the server is slow to read it (a CPU-starved host
            // under a slow-loris) it must not lose its slot for the server's slowness.
            let first = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.slot.close.cancelled() => {
                    evicted = true;
                    match already_here(stream.read_u8()).await {
                        Some(Ok(byte)) => byte,
                        _ => return,
                    }
                }
                read = tokio::time::timeout(self.idle, stream.read_u8()) => match read {
                    Ok(Ok(byte)) => byte,
                    // Idle deadline, EOF or a reset: close.
                    _ => return,
                },
            };
            // A query in flight: one deadline from its first byte for the rest of it, length
            // and body, so a client that dribbles a byte at a time gets no more time than one
            // that stalls. Shutdown lets it finish (and answers it); a newer connection may
            // still take the slot, since the query is not complete: it is answered only if
            // the rest of it is already here.
            let read = {
                let mut rest = std::pin::pin!(rest_of_query(&mut stream, first));
                if evicted {
                    already_here(rest.as_mut()).await
                } else {
                    tokio::select! {
                        _ = self.slot.close.cancelled() => {
                            evicted = true;
                            already_here(rest.as_mut()).await
                        }
                        read = tokio::time::timeout(self.idle, rest.as_mut()) => match read {
                            Ok(read) => Some(read),
                            Err(_) => {
                                self.metrics.tcp_timed_out();
                                return;
                            }
                        },
                    }
                }
            };
            let query = match read {
                Some(Ok(query)) => query,
                // Not here whole (evicted), EOF or a reset: close.
                _ => return,
            };
            self.slot.waiting(false);
            let started = Instant::now();
            let Some(resp) = self.guarded.answer_bytes(&query, peer, Protocol::Tcp).await else {
                self.metrics.dropped();
                continue;
            };
            let (qtype, rcode, _) = classify_response(&resp);
            self.metrics.query(Path::Tcp, qtype, rcode);
            self.metrics
                .latency(Path::Tcp, started.elapsed().as_secs_f64());
            let Ok(len) = u16::try_from(resp.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(resp.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&resp);
            match tokio::time::timeout(self.idle, stream.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    }
}

/// The rest of a TCP query whose length prefix began with `first`: the prefix's second
/// byte, then the body.
async fn rest_of_query(stream: &mut TcpStream, first: u8) -> io::Result<Vec<u8>> {
    let second = stream.read_u8().await?;
    let mut query = vec![0u8; usize::from(u16::from_be_bytes([first, second]))];
    stream.read_exact(&mut query).await?;
    Ok(query)
}

/// `read`'s result if it completes with what the socket already holds, without waiting.
async fn already_here<T>(read: impl Future<Output = T>) -> Option<T> {
    // A timeout of zero polls the read once before it expires.
    tokio::time::timeout(Duration::ZERO, read).await.ok()
}

/// The sender's address as a std address (for the catalog path).
fn to_socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[tokio::test]
    async fn an_evicted_connection_reads_only_a_query_already_here_whole() {
        // (what the client sent before the eviction, the query read without waiting)
        type Case = (&'static str, &'static [u8], Option<&'static [u8]>);
        let cases: [Case; 4] = [
            ("a whole query", &[0, 3, 7, 8, 9], Some(&[7, 8, 9])),
            ("a slow-loris's length prefix", &[0, 3], None),
            ("a length prefix and part of the body", &[0, 3, 7], None),
            ("nothing (a silent slow-loris)", &[], None),
        ];
        for (name, sent, want) in cases {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let mut client = TcpStream::connect(listener.local_addr().expect("address"))
                .await
                .expect("connect");
            let (mut server, _) = listener.accept().await.expect("accept");
            client.write_all(sent).await.expect("send");
            if !sent.is_empty() {
                // What the serving task sees once the client's bytes arrived.
                server.readable().await.expect("readable");
            }
            let got = match already_here(server.read_u8()).await {
                Some(Ok(first)) => already_here(rest_of_query(&mut server, first)).await,
                _ => None,
            };
            assert_eq!(got.and_then(Result::ok).as_deref(), want, "{name}");
        }
    }

    #[test]
    fn a_new_connection_takes_a_free_slot_or_the_longest_waiting_one() {
        let t0 = Instant::now();
        let at = |ms: u64| Some(t0 + Duration::from_millis(ms));
        // (open connections, cap, decision)
        type Open = Vec<(u64, Option<Instant>)>;
        let cases: Vec<(Open, usize, Admit)> = vec![
            (vec![], 1, Admit::Open),
            (vec![(1, at(0)), (2, None)], 3, Admit::Open),
            // At the cap: the one waiting longest goes, busy ones are never chosen.
            (vec![(1, at(5)), (2, at(1)), (3, None)], 3, Admit::Evict(2)),
            (vec![(1, None), (2, at(9))], 2, Admit::Evict(2)),
            // Every one busy answering: the new one is refused.
            (vec![(1, None), (2, None)], 2, Admit::Reject),
            // Above the cap (the cap was lowered by a reload): still one out, one in.
            (vec![(1, at(3)), (2, at(2)), (3, at(4))], 2, Admit::Evict(2)),
        ];
        for (open, max, want) in cases {
            assert_eq!(admit(open.clone(), max), want, "{open:?} max {max}");
        }
    }
}

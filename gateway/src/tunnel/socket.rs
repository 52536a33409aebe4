//! The tunnel's UDP socket: quinn's own socket, with two fixes for large packets and one
//! syscall less per datagram received.
//!
//! - **GSO batches that fit.** quinn hands the socket up to 10 equal-size packets at once
//!   (UDP generic segmentation offload). With a path MTU above ~6.5 KB (jumbo frames, or
//!   loopback once discovery has raised it), ten packets exceed the 65,507 bytes one UDP send
//!   may carry: the kernel answers `EMSGSIZE`, quinn-udp counts that as sent, and every packet
//!   of the batch is lost. Those losses of large packets then trip quinn's MTU black-hole
//!   detector, which drops the path MTU back to 1200 bytes for good on a busy connection.
//!   [`gso_batches`] splits such a batch into sends that fit instead.
//! - **Socket buffers sized for bursts** (`tunnel.socket_buffer_bytes`): a flight of packets
//!   arrives faster than one thread drains it, and the kernel's default receive buffer
//!   (~208 KiB) drops the tail of the burst, which QUIC must then detect and resend.
//! - **No read that finds the queue empty** ([`QueueSocket`]). quinn reads until the socket
//!   says `WouldBlock`, so every wake-up for one datagram cost a second `recvmmsg` answering
//!   `EAGAIN` (docs/benchmarks.md, "Small messages"). A batch shorter than the buffers
//!   offered means the queue was empty at that moment: readiness is cleared then, as tokio's
//!   `TcpStream` does after a short read. A datagram that arrives meanwhile is not missed:
//!   clearing only takes back the readiness seen before the read, and the datagram's own
//!   edge sets it again.
//! - **No wake-up per send** ([`QueueSocket`], [`Writable`]). A UDP socket signals write space
//!   (`EPOLLOUT`) every time the kernel frees a sent datagram, which on loopback is during
//!   the send itself. Registered for writability for its whole life, as quinn's tokio socket
//!   is, every send therefore made the worker's next `epoll_wait` return at once for nothing:
//!   one wasted reactor turn per datagram sent. The socket is registered for reading only.
//!   A send that finds the buffer full marks the socket full; only then does the sender's
//!   poller register a second descriptor of the socket for writability, wait for room, and
//!   drop it again. Registering reports a socket that is already writable at once, so room
//!   that came back in between is not missed.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::queues::refilter;
use super::replays::{Cid, ReplayGuard, initial_dcid};

/// The largest UDP payload one send can carry over IPv4 (65,535 − 20 IP − 8 UDP bytes); the
/// IPv6 limit is higher, so this one is safe for both.
pub const MAX_UDP_SEND: usize = 65_507;

/// Splits a GSO transmit of `len` bytes in `segment`-byte packets into byte ranges that each
/// fit in one UDP send of at most `limit` bytes and hold whole packets (the last one may be
/// short, as in any GSO batch). A batch that fits comes back as one range.
pub fn gso_batches(len: usize, segment: usize, limit: usize) -> impl Iterator<Item = Range<usize>> {
    // A segment larger than the limit cannot be sent at all; one packet per send lets the
    // kernel refuse it on its own (an MTU probe that is too large, which quinn expects).
    let step = if segment == 0 || len <= limit {
        len.max(1)
    } else {
        (limit / segment).max(1) * segment
    };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// The tunnel's socket as quinn sees it: [`gso_batches`] applied to every send; with the
/// port split in two queues ([`super::queues`]), the known connections' socket (which also
/// sends) and the new connections' one, read only when the first has nothing to read.
#[derive(Debug)]
pub struct TunnelSocket {
    known: QueueSocket,
    new: Option<NewQueue>,
}

impl TunnelSocket {
    pub fn new(known: QueueSocket, new: Option<NewQueue>) -> Arc<Self> {
        Arc::new(Self { known, new })
    }
}

/// Datagrams per second read from the new connections' queue at most. Each is a client's
/// first Initial, and quinn derives that connection ID's Initial keys to open it (several
/// µs); a flood of Initials each with an ID of its own (never blocked as a replay) would
/// otherwise take a whole core, and the established connections on this machine would pay
/// for it (docs/reliability.md, "Initials each with a fresh connection ID"). Real peers open
/// a connection each per peer gateway and certificate rotation: far below this.
pub const NEW_QUEUE_RATE: u32 = 5_000;
/// Datagrams the new connections' queue may be read at once after a quiet spell (every peer
/// of a large federation dialling a restarted gateway at once).
pub const NEW_QUEUE_BURST: u32 = 2_000;

/// A token bucket over the datagrams read from the new connections' queue ([`NEW_QUEUE_RATE`]).
/// Pure: the clock is passed in. What it does not let through waits in the kernel's queue,
/// and what overflows that queue the kernel drops, at no cost to this process.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<tokio::time::Instant>,
}

impl ReadBudget {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: None,
        }
    }

    /// How many datagrams may be read at `now`, at most `want`; or the instant the next one
    /// may be.
    pub fn allowed(
        &mut self,
        now: tokio::time::Instant,
        want: usize,
    ) -> Result<usize, tokio::time::Instant> {
        if let Some(at) = self.at {
            let earned = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            // `tokens` is at most `burst`, a u32.
            Ok((self.tokens as usize).min(want))
        } else {
            let wait = (1.0 - self.tokens) / self.rate;
            Err(now + std::time::Duration::from_secs_f64(wait))
        }
    }

    /// `n` datagrams were read.
    pub fn spend(&mut self, n: usize) {
        self.tokens -= n as f64;
    }
}

/// The new connections' queue, and the replay decision fed by what it reads
/// ([`super::replays`]): when the list of blocked connection IDs changes, the queue's socket
/// filter is attached again with it, and the kernel drops those Initials from then on. It is
/// read within [`NEW_QUEUE_RATE`].
#[derive(Debug)]
pub struct NewQueue {
    socket: QueueSocket,
    guard: Mutex<ReplayGuard>,
    /// `meshup_tunnel_replayed_initials_blocked_total`.
    blocked: Counter,
    budget: Mutex<Budget>,
}

/// The read budget and the timer that wakes the reader when it allows a read again.
#[derive(Debug)]
struct Budget {
    bucket: ReadBudget,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl NewQueue {
    pub fn new(socket: QueueSocket, blocked: Counter) -> Self {
        Self {
            socket,
            guard: Mutex::new(ReplayGuard::default()),
            blocked,
            budget: Mutex::new(Budget {
                bucket: ReadBudget::new(NEW_QUEUE_RATE, NEW_QUEUE_BURST),
                timer: None,
            }),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        let mut budget = self.budget.lock().unwrap_or_else(|e| e.into_inner());
        let allowed = loop {
            match budget.bucket.allowed(tokio::time::Instant::now(), slots) {
                Ok(n) => break n,
                Err(at) => {
                    // Woken when the budget allows a read again; the known queue wakes the
                    // reader meanwhile as it always does.
                    let timer = budget
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                    timer.as_mut().reset(at);
                    std::task::ready!(timer.as_mut().poll(cx));
                }
            }
        };
        let read = std::task::ready!(self.socket.poll_recv(
            cx,
            &mut bufs[..allowed],
            &mut meta[..allowed]
        ))?;
        budget.bucket.spend(read);
        drop(budget);
        self.observe(&bufs[..read], &meta[..read]);
        Poll::Ready(Ok(read))
    }

    /// Feeds every Initial of a batch just read to the replay decision, and attaches the
    /// filter again if the blocked list changed.
    fn observe(&self, bufs: &[IoSliceMut<'_>], meta: &[RecvMeta]) {
        let mut now = None;
        let mut guard = self.guard.lock().unwrap_or_else(|e| e.into_inner());
        let before = guard.blocked().count();
        let mut changed = false;
        for (buf, meta) in bufs.iter().zip(meta) {
            let data = &buf[..meta.len.min(buf.len())];
            for datagram in data.chunks(meta.stride.max(1)) {
                if let Some(cid) = initial_dcid(datagram) {
                    let now = *now.get_or_insert_with(Instant::now);
                    changed |= guard.observe(cid, meta.addr, now);
                }
            }
        }
        if !changed {
            return;
        }
        let blocked: Vec<Cid> = guard.blocked().copied().collect();
        let added = blocked.len().saturating_sub(before);
        drop(guard);
        if added > 0 {
            self.blocked.inc_by(added as u64);
            tracing::warn!(
                blocked = blocked.len(),
                "a client Initial is being replayed from many source addresses; the kernel drops its copies from now on"
            );
        }
        if let Err(e) = refilter(self.socket.io.get_ref(), &blocked) {
            tracing::warn!(error = %e, "cannot attach the new connections' filter again");
        }
    }
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiter: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.known.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_UDP_SEND {
            // The common case, without building a new transmit.
            return self.known.try_send(transmit);
        }
        // If a later part would block, quinn retries the whole transmit: the parts already
        // sent arrive twice, and the peer discards the duplicate packet numbers. That is
        // cheaper than losing them.
        for range in gso_batches(transmit.contents.len(), segment, MAX_UDP_SEND) {
            let contents = &transmit.contents[range];
            self.known.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(read) = self.known.poll_recv(cx, bufs, meta) {
            return Poll::Ready(read);
        }
        match &self.new {
            Some(new) => new.poll_recv(cx, bufs, meta),
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.known.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.known.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.known.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.known.state.may_fragment()
    }
}

/// Whether the tunnel's socket can take another send (sends go out on the known queue's).
/// quinn asks before every send: the answer is yes at once unless a send found the socket
/// full, and only then is writability waited for (see the module docs).
#[derive(Debug)]
struct Writable {
    socket: Arc<TunnelSocket>,
    /// While the socket is full: a second descriptor of it, registered for writability.
    waiter: Option<AsyncFd<std::net::UdpSocket>>,
}

impl UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let known = &this.socket.known;
        if !known.full.load(Ordering::Acquire) {
            this.waiter = None;
            return Poll::Ready(Ok(()));
        }
        let waiter = match &mut this.waiter {
            Some(waiter) => waiter,
            None => this.waiter.insert(known.write_waiter()?),
        };
        // The guard's readiness need not be cleared: the waiter is dropped just below.
        let _ = std::task::ready!(waiter.poll_write_ready(cx))?;
        // Room again: the next send tries, and marks the socket full again if it was not
        // enough. Dropping the waiter deregisters its descriptor before closing it.
        known.full.store(false, Ordering::Release);
        this.waiter = None;
        Poll::Ready(Ok(()))
    }
}

/// One of the port's UDP sockets, registered with tokio for reading only: quinn's tokio
/// socket, except that a receive batch shorter than the buffers offered clears readiness and
/// that writability is waited for only after a send found the socket full (see the module
/// docs).
#[derive(Debug)]
pub struct QueueSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send found the send buffer full (`WouldBlock`) and no poller has seen room since.
    full: AtomicBool,
}

impl QueueSocket {
    /// Must be called inside a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Self {
            io,
            state,
            full: AtomicBool::new(false),
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if let Err(e) = &sent
            && e.kind() == io::ErrorKind::WouldBlock
        {
            self.full.store(true, Ordering::Release);
        }
        sent
    }

    /// A second descriptor of the socket, registered for writability only. Registering a
    /// socket that is already writable reports it at once (epoll checks on insertion).
    fn write_waiter(&self) -> io::Result<AsyncFd<std::net::UdpSocket>> {
        register(self.io.get_ref().try_clone()?, Interest::WRITABLE)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        loop {
            let mut ready = std::task::ready!(self.io.poll_read_ready(cx))?;
            match ready.try_io(|fd| self.state.recv(fd.get_ref().into(), bufs, meta)) {
                Ok(Ok(received)) => {
                    if received < slots {
                        ready.clear_ready();
                    }
                    return Poll::Ready(Ok(received));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Readiness was stale: cleared by `try_io`; wait for the next edge.
                Err(_would_block) => {}
            }
        }
    }
}

/// Registers `socket` with tokio's reactor for `interest`. Must be called inside a tokio
/// runtime.
#[allow(unsafe_code)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the `UdpSocket` owns its descriptor: open, and the same one, for as long as the
    // `AsyncFd` holds it (it is closed only when the `AsyncFd` drops it, after deregistering).
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(|e| e.into_parts().1)
}

/// Asks the kernel for `bytes` of send and receive buffer on `socket` and returns what it
/// granted (Linux reports twice the usable size; the value is capped by `net.core.rmem_max`
/// and `net.core.wmem_max`).
pub fn size_buffers(socket: &std::net::UdpSocket, bytes: usize) -> io::Result<(usize, usize)> {
    let sock = socket2::SockRef::from(socket);
    sock.set_recv_buffer_size(bytes)?;
    sock.set_send_buffer_size(bytes)?;
    Ok((sock.recv_buffer_size()?, sock.send_buffer_size()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_read_budget_lets_a_burst_through_then_the_rate() {
        use tokio::time::Instant;
        let ms = std::time::Duration::from_millis;
        let t0 = Instant::now();
        let mut b = ReadBudget::new(1_000, 100);
        // Nothing asked, nothing given.
        assert_eq!(b.allowed(t0, 0), Ok(0));
        // A quiet start: the whole burst, in batches as large as asked.
        assert_eq!(b.allowed(t0, 32), Ok(32));
        b.spend(32);
        assert_eq!(b.allowed(t0, 1_000), Ok(68));
        b.spend(68);
        // Empty: the next datagram in 1 ms (1,000 a second).
        assert_eq!(b.allowed(t0, 32), Err(t0 + ms(1)));
        assert_eq!(b.allowed(t0 + ms(1), 32), Ok(1));
        b.spend(1);
        // 10 ms later, 10 more; a batch shorter than allowed spends only what it read.
        assert_eq!(b.allowed(t0 + ms(11), 32), Ok(10));
        b.spend(3);
        assert_eq!(b.allowed(t0 + ms(11), 32), Ok(7));
        b.spend(7);
        // A long quiet spell earns no more than the burst.
        assert_eq!(b.allowed(t0 + ms(60_000), 1_000), Ok(100));
        // Over a whole second of asking for everything, the rate and the burst.
        let mut b = ReadBudget::new(1_000, 100);
        let mut read = 0;
        for step in 0..=1_000u64 {
            if let Ok(n) = b.allowed(t0 + ms(step), usize::MAX) {
                b.spend(n);
                read += n;
            }
        }
        assert!((1_095..=1_101).contains(&read), "{read}");
    }

    /// The race a short batch's cleared readiness could lose: datagrams that arrive while the
    /// queue is being read. 20,000 of them from another thread, sent in bursts of 1 to 3 as
    /// fast as the reader keeps up (at most 64 ahead, so none is dropped for buffer space):
    /// every one must be received, none may wait for a wake-up that never comes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn datagrams_arriving_while_the_queue_is_read_are_all_received() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        const TOTAL: usize = 20_000;
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = bound.local_addr().expect("addr");
        let queue = QueueSocket::new(bound).expect("register");
        let received = Arc::new(AtomicUsize::new(0));
        let sender = std::thread::spawn({
            let received = received.clone();
            move || {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind sender");
                let mut sent = 0;
                while sent < TOTAL {
                    while sent >= received.load(Ordering::SeqCst) + 64 {
                        std::thread::yield_now();
                    }
                    for _ in 0..(1 + sent % 3).min(TOTAL - sent) {
                        s.send_to(&(sent as u64).to_be_bytes(), addr).expect("send");
                        sent += 1;
                    }
                }
            }
        });
        // Four buffers, so that most batches are short ones and clear readiness.
        let mut bufs = vec![vec![0u8; 16 * 1024]; 4];
        let mut short_batches = 0;
        let read_all = async {
            while received.load(Ordering::SeqCst) < TOTAL {
                let mut meta = [RecvMeta::default(); 4];
                let mut slices: Vec<IoSliceMut<'_>> =
                    bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let n = std::future::poll_fn(|cx| queue.poll_recv(cx, &mut slices, &mut meta))
                    .await
                    .expect("receive");
                short_batches += usize::from(n < meta.len());
                // Datagrams of one sender may come coalesced (GRO): `stride` bytes each.
                let datagrams: usize = meta[..n]
                    .iter()
                    .map(|m| m.len.div_ceil(m.stride.max(1)))
                    .sum();
                received.fetch_add(datagrams, Ordering::SeqCst);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), read_all)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "stuck after {} of {TOTAL} datagrams: a wake-up was lost",
                    received.load(Ordering::SeqCst)
                )
            });
        sender.join().expect("sender");
        assert_eq!(received.load(Ordering::SeqCst), TOTAL);
        assert!(
            short_batches > 0,
            "no batch was short: the clearing was not exercised"
        );
    }

    /// Every registration in this process's epoll instances, from `/proc/self/fdinfo`:
    /// `(epoll descriptor, registered descriptor, event mask)`.
    fn epoll_entries() -> Vec<(String, i32, u32)> {
        let mut entries = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fd").expect("list /proc/self/fd") {
            let fd = fd.expect("fd entry");
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if target.to_string_lossy() != "anon_inode:[eventpoll]" {
                continue;
            }
            let epoll = fd.file_name().to_string_lossy().into_owned();
            let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{epoll}")) else {
                continue;
            };
            for line in info.lines() {
                let words: Vec<&str> = line.split_whitespace().collect();
                if let ["tfd:", tfd, "events:", events, ..] = words[..] {
                    let tfd = tfd.parse().expect("tfd");
                    let events = u32::from_str_radix(events, 16).expect("events");
                    entries.push((epoll.clone(), tfd, events));
                }
            }
        }
        entries
    }

    const EPOLLIN: u32 = 0x1;
    const EPOLLOUT: u32 = 0x4;

    /// The entries of the epoll instance that holds `fd` (this test's runtime's).
    fn entries_beside(fd: i32) -> Vec<(i32, u32)> {
        let all = epoll_entries();
        let epoll = all
            .iter()
            .find(|(_, tfd, _)| *tfd == fd)
            .map(|(epoll, _, _)| epoll.clone())
            .expect("the socket is registered with an epoll instance");
        all.into_iter()
            .filter(|(e, _, _)| *e == epoll)
            .map(|(_, tfd, events)| (tfd, events))
            .collect()
    }

    /// What saves a wake-up per datagram sent: the socket is registered for reading only, so
    /// the write space every send frees does not wake the reactor. Registered for writing too
    /// (as `AsyncFd::register` does), this fails.
    #[tokio::test(flavor = "current_thread")]
    async fn the_socket_is_registered_for_reading_only() {
        use std::os::fd::AsRawFd;
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let queue = QueueSocket::new(bound).expect("register");
        let fd = queue.io.get_ref().as_raw_fd();
        let mine: Vec<u32> = entries_beside(fd)
            .into_iter()
            .filter(|(tfd, _)| *tfd == fd)
            .map(|(_, events)| events)
            .collect();
        assert_eq!(mine.len(), 1, "one registration: {mine:x?}");
        assert_ne!(
            mine[0] & EPOLLIN,
            0,
            "registered for reading: {:#x}",
            mine[0]
        );
        assert_eq!(mine[0] & EPOLLOUT, 0, "not for writing: {:#x}", mine[0]);
    }

    /// A send that found the socket full: the poller registers a second descriptor for
    /// writability, reports room once epoll sees it, and lets the descriptor go. Before that
    /// and after it, asking costs nothing and registers nothing.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_socket_waits_for_room_on_a_second_descriptor_then_lets_it_go() {
        use std::os::fd::AsRawFd;
        let bound = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let socket = TunnelSocket::new(QueueSocket::new(bound).expect("register"), None);
        let fd = socket.known.io.get_ref().as_raw_fd();
        let writers = || {
            entries_beside(fd)
                .into_iter()
                .filter(|(_, events)| events & EPOLLOUT != 0)
                .count()
        };
        let mut poller = socket.clone().create_io_poller();
        let mut noop = Context::from_waker(std::task::Waker::noop());

        assert!(poller.as_mut().poll_writable(&mut noop).is_ready());
        assert_eq!(writers(), 0);

        // What `try_send` records when the kernel answers `WouldBlock` (loopback frees each
        // datagram during its send, so a test cannot fill the buffer for real).
        socket.known.full.store(true, Ordering::Release);
        assert!(
            poller.as_mut().poll_writable(&mut noop).is_pending(),
            "room is reported by the reactor, not assumed"
        );
        assert_eq!(writers(), 1, "a second descriptor waits for writability");
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
        )
        .await
        .expect("an empty socket has room: the registration must report it")
        .expect("writable");
        assert!(!socket.known.full.load(Ordering::Acquire));
        assert_eq!(writers(), 0, "the waiting descriptor was let go");
        assert!(poller.as_mut().poll_writable(&mut noop).is_ready());
    }

    fn batches(len: usize, segment: usize) -> Vec<Range<usize>> {
        gso_batches(len, segment, MAX_UDP_SEND).collect()
    }

    #[test]
    fn a_batch_that_fits_is_one_send() {
        assert_eq!(batches(12_000, 1200), vec![0..12_000]);
        assert_eq!(batches(65_507, 1200), vec![0..65_507]);
        assert_eq!(batches(5000, 1200), vec![0..5000]);
    }

    #[test]
    fn ten_jumbo_packets_are_split_into_whole_packets_that_fit() {
        // quinn's batch of 10 packets at the default 8952-byte MTU: 7 + 3.
        let got = batches(89_520, 8952);
        assert_eq!(got, vec![0..62_664, 62_664..89_520]);
        assert!(got.iter().all(|r| r.len() <= MAX_UDP_SEND));
        assert!(got.iter().all(|r| r.start % 8952 == 0));
    }

    #[test]
    fn a_short_last_packet_stays_at_the_end() {
        let got = batches(8952 * 9 + 100, 8952);
        assert_eq!(got, vec![0..62_664, 62_664..80_668]);
    }

    #[test]
    fn every_byte_is_covered_once_for_any_size() {
        for segment in [1200, 1452, 6000, 6551, 8952, 9000, 16_000, 65_507] {
            for count in 1..=10 {
                for tail in [0, 1, segment / 2] {
                    let len = segment * count + tail;
                    let got = batches(len, segment);
                    assert_eq!(got.first().map(|r| r.start), Some(0));
                    assert_eq!(got.last().map(|r| r.end), Some(len));
                    for pair in got.windows(2) {
                        assert_eq!(pair[0].end, pair[1].start);
                    }
                    assert!(got.iter().all(|r| r.len() <= MAX_UDP_SEND.max(segment)));
                    assert!(got.iter().all(|r| r.start % segment == 0));
                }
            }
        }
    }

    #[test]
    fn a_segment_larger_than_the_limit_goes_alone() {
        assert_eq!(batches(140_000, 70_000), vec![0..70_000, 70_000..140_000]);
    }
}

//! Two receive queues on the QUIC port, so that packets of established connections never wait
//! behind a flood of junk or of connection attempts (docs/reliability.md, "Junk at the QUIC
//! port").
//!
//! With one socket, every datagram shares one kernel queue and one reader: at a few hundred
//! thousand junk datagrams a second, a real packet waits behind thousands of junk ones, and
//! the gateway spends a core reading junk (measured: p99 of real traffic 4.5–6× the
//! attack-free control). Here the port has two sockets in one `SO_REUSEPORT` group:
//!
//! - **known**: datagrams whose destination connection ID carries this endpoint's [`Tag`].
//!   Every connection ID quinn issues for this endpoint ([`TaggedCids`]) starts with it, so
//!   every packet of an established connection (short header), and the handshake packets
//!   after the first flight (long header), land here. Read first, always, in full.
//! - **new**: everything else (clients' first Initials with a connection ID they chose,
//!   junk). Read only when the known queue is empty and within a [`Budget`] per window; the
//!   rest of a flood stays in the kernel, which drops it when the small queue is full.
//!
//! A classic BPF program attached to the group ([`steering_program`]) picks the socket per
//! datagram. Where the kernel refuses any of this, the port falls back to one socket.
//!
//! The tag is random per process and the same in all of the process's connection IDs, so an
//! observer can tell two connection IDs of one gateway process apart from others, as with
//! QUIC-LB's plaintext server IDs. Between gateways that tells nothing the addresses do not:
//! the tunnel does not migrate, and each side's address is in the catalog.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::RecvMeta;
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator};
use rand::RngCore;
use tokio::time::{Instant, Sleep};

/// Length of every connection ID this endpoint issues.
pub const CID_LEN: usize = 8;

/// The first four bytes of every connection ID of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub [u8; 4]);

impl Tag {
    pub fn random() -> Self {
        let mut tag = [0u8; 4];
        rand::rng().fill_bytes(&mut tag);
        Self(tag)
    }

    /// Whether `cid` is one of this tag's.
    #[cfg(test)]
    fn carried_by(&self, cid: &[u8]) -> bool {
        cid.len() == CID_LEN && cid[..4] == self.0
    }
}

/// Connection IDs of [`CID_LEN`] bytes: the endpoint's [`Tag`], then four random bytes.
#[derive(Debug, Clone, Copy)]
pub struct TaggedCids(pub Tag);

impl ConnectionIdGenerator for TaggedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut cid = [0u8; CID_LEN];
        cid[..4].copy_from_slice(&self.0.0);
        rand::rng().fill_bytes(&mut cid[4..]);
        ConnectionId::new(&cid)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The classic BPF program that picks a socket of the group for each datagram: 1 (known)
/// when the destination connection ID starts with `tag`, else 0 (new). The program sees the
/// UDP payload from its first byte. A read past a short datagram's end ends the program
/// with 0, so runt datagrams go to the new queue too.
///
/// - short header (first bit 0): the ID follows the first byte;
/// - long header (first bit 1): first byte, 4-byte version, the ID's length (must be
///   [`CID_LEN`]), then the ID.
pub fn steering_program(tag: Tag) -> [libc::sock_filter; 10] {
    const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let tag = u32::from_be_bytes(tag.0);
    // Jumps are relative: the target is the next instruction's index plus jt or jf.
    [
        /* 0 */ op(LD_B_ABS, 0, 0, 0), // the first byte
        /* 1 */ op(JSET, 2, 0, 0x80), // long header → 4
        /* 2 */ op(LD_W_ABS, 0, 0, 1), // short: ID bytes 0..4
        /* 3 */ op(JEQ, 5, 4, tag), // → 9 (known) or 8 (new)
        /* 4 */ op(LD_B_ABS, 0, 0, 5), // long: the ID's length
        /* 5 */ op(JEQ, 0, 2, CID_LEN as u32), // → 6, or 8 (new)
        /* 6 */ op(LD_W_ABS, 0, 0, 6), // ID bytes 0..4
        /* 7 */ op(JEQ, 1, 0, tag), // → 9 (known) or 8 (new)
        /* 8 */ op(RET, 0, 0, NEW as u32),
        /* 9 */ op(RET, 0, 0, KNOWN as u32),
    ]
}

/// Index of the new-connections socket in the group (bound first).
const NEW: usize = 0;
/// Index of the known-connections socket in the group (bound second).
const KNOWN: usize = 1;

/// How many datagrams the new queue hands quinn per window: a budget far above any real
/// rate of connection attempts (peers are gateways), far below a flood.
pub const NEW_PER_WINDOW: u32 = 256;
pub const NEW_WINDOW: Duration = Duration::from_millis(10);
/// The new queue's kernel buffer: a flood beyond the budget is dropped there, and a real
/// Initial waits at most this much junk.
pub const NEW_BUFFER_BYTES: usize = 1 << 20;

/// A count of datagrams per fixed window. Pure: the clock is passed in.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    per_window: u32,
    window: Duration,
    start: Instant,
    used: u32,
}

impl Budget {
    pub fn new(per_window: u32, window: Duration, now: Instant) -> Self {
        Self {
            per_window,
            window,
            start: now,
            used: 0,
        }
    }

    /// `Ok` if the queue may be read at `now`, else the instant it may be again.
    pub fn allows(&mut self, now: Instant) -> Result<(), Instant> {
        if now >= self.start + self.window {
            self.start = now;
            self.used = 0;
        }
        if self.used < self.per_window {
            Ok(())
        } else {
            Err(self.start + self.window)
        }
    }

    /// Counts `n` datagrams read (one read may take a batch, so the window's count may pass
    /// the budget by one batch).
    pub fn spend(&mut self, n: usize) {
        self.used = self.used.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }
}

/// The new connections' queue as the endpoint's socket reads it: only within its [`Budget`],
/// woken by a timer when the budget is spent (the kernel keeps or drops what waits).
pub struct NewQueue {
    socket: Arc<dyn AsyncUdpSocket>,
    state: Mutex<(Budget, Pin<Box<Sleep>>)>,
}

impl std::fmt::Debug for NewQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewQueue")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl NewQueue {
    /// Must be called inside a tokio runtime (the budget's timer).
    pub fn new(socket: Arc<dyn AsyncUdpSocket>) -> Self {
        let now = Instant::now();
        Self {
            socket,
            state: Mutex::new((
                Budget::new(NEW_PER_WINDOW, NEW_WINDOW, now),
                Box::pin(tokio::time::sleep_until(now)),
            )),
        }
    }

    pub fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (budget, wake) = &mut *state;
        if let Err(until) = budget.allows(Instant::now()) {
            wake.as_mut().reset(until);
            if wake.as_mut().poll(cx).is_ready() {
                cx.waker().wake_by_ref();
            }
            return Poll::Pending;
        }
        let read = self.socket.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &read {
            budget.spend(*n);
        }
        read
    }
}

/// The QUIC port's sockets: the known and new queues, or one socket where the kernel
/// refused the split.
#[derive(Debug)]
pub enum PortSockets {
    Split {
        known: std::net::UdpSocket,
        new: std::net::UdpSocket,
        tag: Tag,
    },
    Single(std::net::UdpSocket),
}

/// Binds `listen`. It is first bound alone, without `SO_REUSEPORT`, and released: an address
/// in use is an error, as for one socket, and a group another process holds is never
/// joined. The group then binds the same port.
pub fn bind(listen: SocketAddr) -> io::Result<PortSockets> {
    bind_tagged(listen, Tag::random())
}

fn bind_tagged(listen: SocketAddr, tag: Tag) -> io::Result<PortSockets> {
    let addr = std::net::UdpSocket::bind(listen)?.local_addr()?;
    match group(addr, tag) {
        Ok((new, known)) => Ok(PortSockets::Split { known, new, tag }),
        Err(e) => {
            tracing::warn!(%addr, error = %e, "cannot give the QUIC port a separate queue for new connections; one queue for all");
            Ok(PortSockets::Single(std::net::UdpSocket::bind(addr)?))
        }
    }
}

/// The group on `addr`: `new` bound first (index [`NEW`]), `known` second ([`KNOWN`]), and
/// the steering program attached.
fn group(addr: SocketAddr, tag: Tag) -> io::Result<(std::net::UdpSocket, std::net::UdpSocket)> {
    let member = || -> io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        rustix::net::sockopt::set_socket_reuseport(&socket, true)?;
        socket.bind(&addr.into())?;
        Ok(socket)
    };
    let new = member()?;
    let known = member()?;
    attach_reuseport_program(&known, &steering_program(tag))?;
    Ok((new.into(), known.into()))
}

#[allow(unsafe_code)]
fn attach_reuseport_program(socket: &socket2::Socket, program: &[libc::sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| io::Error::other("BPF program too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sock_fprog>())
        .map_err(|_| io::Error::other("sock_fprog size"))?;
    // SAFETY: `prog` and the program it points at live across the call; the kernel copies
    // the program during `setsockopt` and keeps no pointer into our memory. The descriptor
    // is open for the call: it is borrowed from `socket`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&raw const prog).cast(),
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    #[test]
    fn the_budget_counts_datagrams_per_window() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut budget = Budget::new(3, Duration::from_millis(10), t0);
        // (now, datagrams read if allowed, want)
        let steps: [(Instant, usize, Result<(), Instant>); 7] = [
            (ms(0), 2, Ok(())),
            (ms(1), 1, Ok(())),
            // 3 spent: closed until the window ends.
            (ms(2), 0, Err(ms(10))),
            (ms(9), 0, Err(ms(10))),
            // A new window starts at the first look after the old one ended.
            (ms(12), 5, Ok(())),
            // One batch may pass the budget; then it is closed.
            (ms(13), 0, Err(ms(22))),
            (ms(22), 0, Ok(())),
        ];
        for (i, (now, read, want)) in steps.into_iter().enumerate() {
            assert_eq!(budget.allows(now), want, "step {i}");
            if want.is_ok() {
                budget.spend(read);
            }
        }
    }

    #[test]
    fn issued_connection_ids_carry_the_tag_and_differ() {
        let tag = Tag([1, 2, 3, 4]);
        let mut cids = TaggedCids(tag);
        let a = cids.generate_cid();
        let b = cids.generate_cid();
        assert_eq!(cids.cid_len(), CID_LEN);
        assert!(tag.carried_by(&a) && tag.carried_by(&b));
        assert_ne!(a, b, "the random half differs");
        assert!(!tag.carried_by(&[1, 2, 3, 4]), "too short");
        assert!(!Tag([9, 2, 3, 4]).carried_by(&a));
    }

    /// Sends `datagram` to the group and returns which socket the kernel gave it to.
    fn landed_on(sender: &UdpSocket, port: &PortSockets, datagram: &[u8]) -> &'static str {
        let PortSockets::Split { known, new, .. } = port else {
            panic!("the kernel refused the split: {port:?}");
        };
        let to = known.local_addr().expect("addr");
        sender.send_to(datagram, to).expect("send");
        let mut buf = [0u8; 2048];
        for s in [known, new] {
            s.set_nonblocking(false).expect("blocking");
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
        }
        // A datagram is on exactly one queue: whichever has it, the other cannot.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            for (name, s) in [("known", known), ("new", new)] {
                if let Ok(n) = s.recv(&mut buf) {
                    assert_eq!(&buf[..n], datagram, "the datagram arrived whole");
                    return name;
                }
            }
        }
        panic!("the datagram arrived on neither queue");
    }

    #[test]
    fn the_kernel_steers_datagrams_by_the_destination_connection_id() {
        let tag = Tag([0xA1, 0xB2, 0xC3, 0xD4]);
        let port = bind_tagged("127.0.0.1:0".parse().expect("addr"), tag).expect("bind");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
        let mut short = vec![0x41];
        short.extend_from_slice(&[0xA1, 0xB2, 0xC3, 0xD4, 9, 9, 9, 9]);
        short.extend_from_slice(&[0u8; 40]);
        let long = |cid_len: u8, cid: &[u8]| {
            let mut d = vec![0xC3, 0, 0, 0, 1, cid_len];
            d.extend_from_slice(cid);
            d.extend_from_slice(&[0u8; 40]);
            d
        };
        let tagged_cid = [0xA1, 0xB2, 0xC3, 0xD4, 5, 6, 7, 8];
        let mut untagged_short = short.clone();
        untagged_short[1] = 0xA0;
        let cases: [(&str, Vec<u8>, &str); 8] = [
            ("short header, tagged", short, "known"),
            ("short header, another tag", untagged_short, "new"),
            ("long header, tagged", long(8, &tagged_cid), "known"),
            ("long header, a client's own ID", long(8, &[7; 8]), "new"),
            ("long header, tag but another length", long(5, &tagged_cid[..5]), "new"),
            ("one byte", vec![0x41], "new"),
            ("the tag cut short", vec![0x41, 0xA1, 0xB2], "new"),
            ("empty", vec![], "new"),
        ];
        for (what, datagram, want) in cases {
            assert_eq!(landed_on(&sender, &port, &datagram), want, "{what}");
        }
    }

    #[test]
    fn a_port_in_use_is_an_error_and_a_group_is_never_joined() {
        let held = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = held.local_addr().expect("addr");
        assert!(bind(addr).is_err(), "a port held by a plain socket");
        let group = bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let PortSockets::Split { known, .. } = &group else {
            panic!("the kernel refused the split: {group:?}");
        };
        let addr = known.local_addr().expect("addr");
        assert!(bind(addr).is_err(), "a port held by another group");
    }
}

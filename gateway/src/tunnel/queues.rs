//! Two receive queues on the QUIC port, so that packets of established connections never wait
//! behind a flood of junk or of connection attempts (docs/reliability.md, "Junk at the QUIC
//! port").
//!
//! With one socket, every datagram shares one kernel queue and one reader: at a few hundred
//! thousand junk datagrams a second, a real packet waits behind thousands of junk ones
//! (measured: p99 of real traffic 4.3–6.1× the attack-free control). Here the port has two
//! sockets in one `SO_REUSEPORT` group:
//!
//! - **known**: datagrams whose destination connection ID carries this endpoint's [`Tag`].
//!   Every connection ID quinn issues for this endpoint ([`TaggedCids`]) starts with it, so
//!   every packet of an established connection (short header), and the handshake packets
//!   after the client's first flight (long header), land here. The endpoint reads it first,
//!   every time it reads ([`super::socket::TunnelSocket`]).
//! - **new**: everything else. Its socket filter ([`new_connections_filter`]) keeps only
//!   what could open a connection (a version 1 Initial in a full-size datagram) and drops
//!   the rest in the kernel; the endpoint reads it only when the known queue is empty.
//!
//! A classic BPF program attached to the group ([`steering_program`]) picks the socket per
//! datagram. Where the kernel refuses any of this, the port falls back to one socket.
//!
//! The tag is random per process and the same in all of the process's connection IDs, so an
//! observer can tell two connection IDs of one gateway process apart from others, as with
//! QUIC-LB's plaintext server IDs. Between gateways that tells nothing the addresses do not:
//! the tunnel does not migrate, and each side's address is in the catalog.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use quinn::{ConnectionId, ConnectionIdGenerator};
use rand::RngCore;

use super::replays::Cid;

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

// Classic BPF instructions (linux/filter.h), for the two programs below.
const LD_B_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const LD_LEN: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_LEN) as u16;
const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JSET: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
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

/// The new connections' queue's kernel buffer: what arrives beyond it while the gateway is
/// busy is dropped there.
pub const NEW_BUFFER_BYTES: usize = 1 << 20;

/// The smallest datagram that may carry a client's first Initial (RFC 9000 §14.1).
const MIN_INITIAL_DATAGRAM: u32 = 1200;

/// The socket filter of the new connections' queue: it keeps only what could open a
/// connection, a datagram of at least [`MIN_INITIAL_DATAGRAM`] bytes whose first packet is a
/// QUIC version 1 Initial, and drops the rest in the kernel (quinn would drop it too, or
/// answer with a stateless reset or version negotiation, which no peer gateway needs: they
/// all speak version 1, and a reset without a key that outlives the process is never
/// recognised). Initials to a `blocked` destination connection ID (replays,
/// [`super::replays`]) are dropped too. A socket filter sees the UDP header first (8 bytes),
/// and the length it loads includes it.
pub fn new_connections_filter(blocked: &[Cid]) -> Vec<libc::sock_filter> {
    const UDP_HEADER: u32 = 8;
    let mut program = vec![
        /* 0 */ op(LD_B_ABS, 0, 0, UDP_HEADER), // the first byte
        /* 1 */ op(AND, 0, 0, 0xF0), // form, fixed bit, packet type
        /* 2 */ op(JEQ, 0, 4, 0xC0), // long header, Initial; else → 7
        /* 3 */ op(LD_W_ABS, 0, 0, UDP_HEADER + 1), // the version
        /* 4 */ op(JEQ, 0, 2, 1), // version 1; else → 7
        /* 5 */ op(LD_LEN, 0, 0, 0),
        /* 6 */ op(JGE, 1, 0, UDP_HEADER + MIN_INITIAL_DATAGRAM), // → 8, else → 7
        /* 7 */ op(RET, 0, 0, 0), // dropped
    ];
    // From 8 on, one block per blocked ID: its length, then its bytes four, two or one at a
    // time; any difference jumps to the next block, and a block that runs to its end drops
    // the datagram. Jumps stay within a block (at most 13 instructions).
    for cid in blocked {
        let id = cid.as_bytes();
        let mut checks = vec![(LD_B_ABS, UDP_HEADER + 5, id.len() as u32)];
        let mut at = 0;
        while at < id.len() {
            let offset = UDP_HEADER + 6 + at as u32;
            let (code, width) = match id.len() - at {
                4.. => (LD_W_ABS, 4),
                2 | 3 => (LD_H_ABS, 2),
                _ => (LD_B_ABS, 1),
            };
            let value = id[at..at + width]
                .iter()
                .fold(0u32, |v, &b| (v << 8) | u32::from(b));
            checks.push((code, offset, value));
            at += width;
        }
        // Two instructions per check, then the drop; a mismatch skips the rest of the block.
        let len = checks.len() * 2 + 1;
        for (i, (code, offset, value)) in checks.into_iter().enumerate() {
            let after_jump = i * 2 + 2;
            program.push(op(code, 0, 0, offset));
            program.push(op(JEQ, 0, (len - after_jump) as u8, value));
        }
        program.push(op(RET, 0, 0, 0)); // a blocked ID: dropped
    }
    program.push(op(RET, 0, 0, u32::MAX)); // kept whole
    program
}

/// Attaches the new connections' filter with `blocked` to `socket`, replacing the one it had
/// (the kernel swaps the two atomically).
pub fn refilter(socket: &std::net::UdpSocket, blocked: &[Cid]) -> io::Result<()> {
    attach(
        socket.as_fd(),
        libc::SO_ATTACH_FILTER,
        &new_connections_filter(blocked),
    )
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
    attach(
        new.as_fd(),
        libc::SO_ATTACH_FILTER,
        &new_connections_filter(&[]),
    )?;
    let known = member()?;
    attach(
        known.as_fd(),
        libc::SO_ATTACH_REUSEPORT_CBPF,
        &steering_program(tag),
    )?;
    Ok((new.into(), known.into()))
}

/// Attaches a classic BPF `program` with the socket option `option` (`SO_ATTACH_FILTER` or
/// `SO_ATTACH_REUSEPORT_CBPF`).
#[allow(unsafe_code)]
fn attach(
    socket: BorrowedFd<'_>,
    option: libc::c_int,
    program: &[libc::sock_filter],
) -> io::Result<()> {
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
            option,
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

    /// Sends `datagram` to the group and returns which socket the kernel gave it to, or
    /// "dropped". On loopback the kernel queues (or drops) a datagram within the send
    /// itself, so a datagram on neither queue 200 ms later was dropped.
    fn landed_on(sender: &UdpSocket, port: &PortSockets, datagram: &[u8]) -> &'static str {
        let PortSockets::Split { known, new, .. } = port else {
            panic!("the kernel refused the split: {port:?}");
        };
        sender
            .send_to(datagram, known.local_addr().expect("addr"))
            .expect("send");
        let mut buf = [0u8; 2048];
        let mut landed = "dropped";
        for (name, s) in [("known", known), ("new", new)] {
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            if let Ok(n) = s.recv(&mut buf) {
                assert_eq!(&buf[..n], datagram, "the datagram arrived whole");
                assert_eq!(landed, "dropped", "a datagram on both queues");
                landed = name;
            }
        }
        landed
    }

    #[test]
    fn the_kernel_steers_by_connection_id_and_keeps_only_initials_for_new_connections() {
        let tag = Tag([0xA1, 0xB2, 0xC3, 0xD4]);
        let port = bind_tagged("127.0.0.1:0".parse().expect("addr"), tag).expect("bind");
        let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
        let padded = |mut d: Vec<u8>, len: usize| {
            d.resize(len, 0);
            d
        };
        let short = |cid: &[u8]| padded([&[0x41], cid].concat(), 60);
        // first byte (0xC3: long header, Initial; 0xE3: Handshake), version, ID length, ID.
        let long = |first: u8, version: u32, cid: &[u8], len: usize| {
            let mut d = vec![first];
            d.extend_from_slice(&version.to_be_bytes());
            d.push(cid.len() as u8);
            d.extend_from_slice(cid);
            padded(d, len)
        };
        let tagged = [0xA1, 0xB2, 0xC3, 0xD4, 5, 6, 7, 8];
        let other = [0xA0, 0xB2, 0xC3, 0xD4, 5, 6, 7, 8];
        let cases: [(&str, Vec<u8>, &str); 12] = [
            ("short header, tagged", short(&tagged), "known"),
            ("short header, another tag", short(&other), "dropped"),
            (
                "Initial to a tagged ID (after a Retry)",
                long(0xC3, 1, &tagged, 1200),
                "known",
            ),
            (
                "Handshake to a tagged ID",
                long(0xE3, 1, &tagged, 80),
                "known",
            ),
            (
                "a client's first Initial",
                long(0xC3, 1, &[7; 8], 1200),
                "new",
            ),
            (
                "a client's first Initial, 20-byte ID",
                long(0xC3, 1, &[7; 20], 1300),
                "new",
            ),
            (
                "an Initial in a short datagram",
                long(0xC3, 1, &[7; 8], 1199),
                "dropped",
            ),
            (
                "an Initial of another version",
                long(0xC3, 0x6b33_43cf, &[7; 8], 1200),
                "dropped",
            ),
            (
                "Handshake to an unknown ID",
                long(0xE3, 1, &[7; 8], 1200),
                "dropped",
            ),
            ("one byte", vec![0x41], "dropped"),
            ("the tag cut short", vec![0x41, 0xA1, 0xB2], "dropped"),
            ("empty", vec![], "dropped"),
        ];
        for (what, datagram, want) in cases {
            assert_eq!(landed_on(&sender, &port, &datagram), want, "{what}");
        }
    }

    #[test]
    fn initials_to_a_blocked_id_are_dropped_in_the_kernel_and_all_others_kept() {
        let port = bind_tagged(
            "127.0.0.1:0".parse().expect("addr"),
            Tag([0xF1, 0xF2, 0xF3, 0xF4]),
        )
        .expect("bind");
        let PortSockets::Split { new, .. } = &port else {
            panic!("the kernel refused the split: {port:?}");
        };
        let sender = UdpSocket::bind("127.0.0.1:0").expect("sender");
        let initial = |id: &[u8]| {
            let mut d = vec![0xC3, 0, 0, 0, 1, id.len() as u8];
            d.extend_from_slice(id);
            d.resize(1200, 0);
            d
        };
        // IDs of every length a word, a half-word and a byte at a time cover.
        let blocked: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x11],
            vec![0x21, 0x22, 0x23],
            (1..=8).collect(),
            (1..=19).collect(),
            (100..=119).collect(),
        ];
        let cids: Vec<Cid> = blocked
            .iter()
            .map(|id| Cid::new(id).expect("cid"))
            .collect();
        refilter(new, &cids).expect("attach the filter with the blocked IDs");
        for id in &blocked {
            assert_eq!(
                landed_on(&sender, &port, &initial(id)),
                "dropped",
                "blocked {id:?}"
            );
            // The same length, one byte different (first and last), and one byte longer.
            let mut cases = vec![[&id[..], &[0x99]].concat()];
            if let Some(last) = id.len().checked_sub(1) {
                let (mut first, mut end) = (id.clone(), id.clone());
                first[0] ^= 0xFF;
                end[last] ^= 0xFF;
                cases.extend([first, end]);
            }
            for other in cases {
                assert_eq!(
                    landed_on(&sender, &port, &initial(&other)),
                    "new",
                    "not blocked: {other:?}"
                );
            }
        }
        // The blocks end when the filter is attached again without them.
        refilter(new, &[]).expect("attach the filter without blocks");
        for id in &blocked {
            assert_eq!(
                landed_on(&sender, &port, &initial(id)),
                "new",
                "unblocked {id:?}"
            );
        }
        // The largest list the guard keeps fits the kernel's limits.
        let many: Vec<Cid> = (0..crate::tunnel::replays::MAX_BLOCKED as u8)
            .map(|n| Cid::new(&[n; crate::tunnel::replays::MAX_CID]).expect("cid"))
            .collect();
        refilter(new, &many).expect("the longest blocked list attaches");
        assert_eq!(landed_on(&sender, &port, &initial(&[7; 20])), "dropped");
        assert_eq!(landed_on(&sender, &port, &initial(&[7; 8])), "new");
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

//! Replayed Initials: a client's first Initial seen again from other source addresses, and
//! the connection IDs whose Initials the kernel then drops (docs/reliability.md, "Replayed
//! Initials").
//!
//! A client sends its first Initial from one address and repeats it (a retransmission) only
//! from that address; quinn discards an Initial for a handshake in progress that comes from
//! another address. The same Initial arriving from many source addresses is therefore a
//! replay, an attacker's copy of one real Initial, and every copy still costs the gateway a
//! read: at a few hundred thousand a second, that read is most of the gateway's CPU and the
//! established connections' latency pays for it. [`ReplayGuard`] counts, per destination
//! connection ID, the Initials from addresses other than the first; past
//! [`REPLAY_SOURCES`] the ID is blocked for [`BLOCK_FOR`], and the new connections' socket
//! filter ([`super::queues::new_connections_filter`]) drops its Initials before any copy to
//! user space. A new client picks a fresh random ID, so it is never blocked; the client whose
//! Initial was copied keeps its handshake, whose later packets go to the ID the gateway
//! chose.
//!
//! This is pure code on an explicit clock; [`super::socket`] feeds it what the new
//! connections' queue reads and re-attaches the filter when the list changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Initials of one connection ID from addresses other than its first, past which the ID is
/// blocked. A real client sends from one address; a few are tolerated for a NAT that
/// rebinds during the handshake.
pub const REPLAY_SOURCES: u32 = 4;
/// How long a blocked ID stays blocked. A replay still running after that is blocked again
/// after [`REPLAY_SOURCES`] more copies.
pub const BLOCK_FOR: Duration = Duration::from_secs(60);
/// Blocked IDs at most (each costs the filter nine instructions; the kernel's limit is
/// 4,096). Past it, the ID whose block ends first makes room.
pub const MAX_BLOCKED: usize = 64;
/// Connection IDs tracked at most, each for [`SEEN_FOR`]: a flood of distinct IDs costs a
/// bounded table, and forgetting one only delays its block.
pub const MAX_SEEN: usize = 4096;
/// How long the first address of an ID is remembered.
pub const SEEN_FOR: Duration = Duration::from_secs(10);
/// The longest connection ID QUIC version 1 allows (RFC 9000 §17.2).
pub const MAX_CID: usize = 20;

/// A destination connection ID, up to [`MAX_CID`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cid {
    len: u8,
    bytes: [u8; MAX_CID],
}

impl Cid {
    pub fn new(id: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_CID];
        bytes.get_mut(..id.len())?.copy_from_slice(id);
        Some(Self {
            len: id.len() as u8,
            bytes,
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The destination connection ID of a datagram whose first packet is a version 1 Initial
/// (long header, `0b1100` in the first four bits, version 1), or `None`.
pub fn initial_dcid(datagram: &[u8]) -> Option<Cid> {
    let (&first, rest) = datagram.split_first()?;
    if first & 0xF0 != 0xC0 || rest.get(..4)? != [0, 0, 0, 1] {
        return None;
    }
    let len = usize::from(*rest.get(4)?);
    Cid::new(rest.get(5..5 + len)?)
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    first: SocketAddr,
    at: Instant,
    others: u32,
}

/// The replay decision: which connection IDs' Initials are dropped in the kernel.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: HashMap<Cid, Seen>,
    /// Blocked IDs and when each block ends.
    blocked: Vec<(Cid, Instant)>,
}

impl ReplayGuard {
    /// Notes an Initial for `cid` from `from` at `now`. Returns whether the blocked list
    /// changed (an ID blocked, or blocks ended), so the filter must be attached again.
    pub fn observe(&mut self, cid: Cid, from: SocketAddr, now: Instant) -> bool {
        let mut changed = self.expire(now);
        if self.blocked.iter().any(|(b, _)| *b == cid) {
            // Read before the filter was attached again.
            return changed;
        }
        if self.seen.len() >= MAX_SEEN && !self.seen.contains_key(&cid) {
            self.seen.retain(|_, s| now.duration_since(s.at) < SEEN_FOR);
            if self.seen.len() >= MAX_SEEN {
                self.seen.clear();
            }
        }
        let seen = self.seen.entry(cid).or_insert(Seen {
            first: from,
            at: now,
            others: 0,
        });
        if now.duration_since(seen.at) >= SEEN_FOR {
            *seen = Seen {
                first: from,
                at: now,
                others: 0,
            };
        }
        if seen.first != from {
            seen.others += 1;
        }
        if seen.others >= REPLAY_SOURCES {
            self.seen.remove(&cid);
            if self.blocked.len() >= MAX_BLOCKED
                && let Some(soonest) = (0..self.blocked.len()).min_by_key(|&i| self.blocked[i].1)
            {
                self.blocked.swap_remove(soonest);
            }
            self.blocked.push((cid, now + BLOCK_FOR));
            changed = true;
        }
        changed
    }

    /// Ends the blocks due by `now`; returns whether any ended.
    pub fn expire(&mut self, now: Instant) -> bool {
        let before = self.blocked.len();
        self.blocked.retain(|(_, until)| *until > now);
        self.blocked.len() != before
    }

    /// The IDs blocked now.
    pub fn blocked(&self) -> impl Iterator<Item = &Cid> {
        self.blocked.iter().map(|(cid, _)| cid)
    }

    /// How many IDs are tracked (at most [`MAX_SEEN`]).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn cid(n: u8) -> Cid {
        Cid::new(&[n; 8]).expect("cid")
    }

    #[test]
    fn the_destination_id_is_read_from_version_1_initials_only() {
        let initial = |first: u8, version: [u8; 4], id: &[u8]| {
            let mut d = vec![first];
            d.extend_from_slice(&version);
            d.push(id.len() as u8);
            d.extend_from_slice(id);
            d.resize(1200, 0);
            d
        };
        let v1 = [0, 0, 0, 1];
        type Case = (&'static str, Vec<u8>, Option<&'static [u8]>);
        let cases: [Case; 9] = [
            ("an Initial", initial(0xC3, v1, &[7; 8]), Some(&[7; 8])),
            ("a 20-byte ID", initial(0xC0, v1, &[9; 20]), Some(&[9; 20])),
            ("an empty ID", initial(0xC0, v1, &[]), Some(&[])),
            ("a 21-byte ID", initial(0xC0, v1, &[9; 21]), None),
            ("a Handshake packet", initial(0xE3, v1, &[7; 8]), None),
            ("a short header", initial(0x43, v1, &[7; 8]), None),
            (
                "another version",
                initial(0xC3, [0, 0, 0, 2], &[7; 8]),
                None,
            ),
            ("cut inside the ID", vec![0xC3, 0, 0, 0, 1, 8, 7, 7], None),
            ("empty", vec![], None),
        ];
        for (what, datagram, want) in cases {
            assert_eq!(
                initial_dcid(&datagram).as_ref().map(Cid::as_bytes),
                want,
                "{what}"
            );
        }
    }

    /// `(seconds, id, source port) → blocked list changed, IDs blocked after`.
    #[test]
    fn an_id_is_blocked_once_its_initial_comes_from_enough_other_addresses() {
        type Step = (u64, u8, u16, bool, &'static [u8]);
        let cases: [(&str, &[Step]); 5] = [
            (
                "a client retransmitting from its one address is never blocked",
                &[
                    (0, 1, 1000, false, &[]),
                    (1, 1, 1000, false, &[]),
                    (2, 1, 1000, false, &[]),
                    (3, 1, 1000, false, &[]),
                    (4, 1, 1000, false, &[]),
                    (5, 1, 1000, false, &[]),
                ],
            ),
            (
                "copies from four other addresses block the ID",
                &[
                    (0, 1, 1000, false, &[]),
                    (0, 1, 1001, false, &[]),
                    (0, 1, 1002, false, &[]),
                    (0, 1, 1003, false, &[]),
                    (0, 1, 1004, true, &[1]),
                    (0, 2, 1005, false, &[1]),
                ],
            ),
            (
                "copies spread wider than the memory of the first address start over",
                &[
                    (0, 1, 1000, false, &[]),
                    (1, 1, 1001, false, &[]),
                    (2, 1, 1002, false, &[]),
                    (3, 1, 1003, false, &[]),
                    (13, 1, 1004, false, &[]),
                    (14, 1, 1005, false, &[]),
                ],
            ),
            (
                "a block ends after BLOCK_FOR, and a replay still running is blocked again",
                &[
                    (0, 1, 1000, false, &[]),
                    (0, 1, 1001, false, &[]),
                    (0, 1, 1002, false, &[]),
                    (0, 1, 1003, false, &[]),
                    (0, 1, 1004, true, &[1]),
                    (59, 2, 1000, false, &[1]),
                    (60, 2, 1000, true, &[]),
                    (61, 1, 1005, false, &[]),
                    (61, 1, 1006, false, &[]),
                    (61, 1, 1007, false, &[]),
                    (61, 1, 1008, false, &[]),
                    (61, 1, 1009, true, &[1]),
                ],
            ),
            (
                "two replayed IDs are blocked side by side",
                &[
                    (0, 1, 1000, false, &[]),
                    (0, 2, 1000, false, &[]),
                    (0, 1, 1001, false, &[]),
                    (0, 2, 1001, false, &[]),
                    (0, 1, 1002, false, &[]),
                    (0, 2, 1002, false, &[]),
                    (0, 1, 1003, false, &[]),
                    (0, 2, 1003, false, &[]),
                    (0, 1, 1004, true, &[1]),
                    (0, 2, 1004, true, &[1, 2]),
                ],
            ),
        ];
        for (what, steps) in cases {
            let start = Instant::now();
            let mut guard = ReplayGuard::default();
            for (i, &(secs, id, port, changed, blocked)) in steps.iter().enumerate() {
                let now = start + Duration::from_secs(secs);
                assert_eq!(
                    guard.observe(cid(id), addr(port), now),
                    changed,
                    "{what}: step {i} changed"
                );
                let mut got: Vec<u8> = guard.blocked().map(|c| c.as_bytes()[0]).collect();
                got.sort_unstable();
                assert_eq!(got, blocked, "{what}: step {i} blocked");
            }
        }
    }

    #[test]
    fn the_tables_stay_bounded_under_a_flood_of_distinct_ids() {
        let now = Instant::now();
        let mut guard = ReplayGuard::default();
        // Distinct IDs, each seen once: tracked up to MAX_SEEN, never blocked.
        for n in 0..(3 * MAX_SEEN as u32) {
            let id = Cid::new(&n.to_be_bytes()).expect("cid");
            guard.observe(id, addr(1000), now);
            assert!(guard.tracked() <= MAX_SEEN);
        }
        assert_eq!(guard.blocked().count(), 0);
        // Many replayed IDs: at most MAX_BLOCKED blocked, the newest kept.
        for n in 0..(2 * MAX_BLOCKED as u32) {
            let id = Cid::new(&[&n.to_be_bytes()[..], &[0xEE; 4]].concat()).expect("cid");
            let at = now + Duration::from_millis(u64::from(n));
            for port in 0..=REPLAY_SOURCES as u16 {
                guard.observe(id, addr(2000 + port), at);
            }
        }
        assert_eq!(guard.blocked().count(), MAX_BLOCKED);
        let newest =
            Cid::new(&[&(2 * MAX_BLOCKED as u32 - 1).to_be_bytes()[..], &[0xEE; 4]].concat())
                .expect("cid");
        assert!(guard.blocked().any(|c| *c == newest));
    }
}

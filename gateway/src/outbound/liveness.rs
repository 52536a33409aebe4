//! Peer liveness: which peer gateways have shown recent proof of life, how long a new
//! connection waits for a peer's answer, and whether client bytes may go out before it.
//! Pure: every method takes `now`; the outbound proxy feeds observations in.
//!
//! Why (docs/policy.md, "Fast failover"): a peer gateway killed with `kill -9` or blackholed
//! sends nothing more, but its QUIC connection looks open until the idle timeout (seconds).
//! New connections must not wait that long, and must not lose client bytes to it:
//!
//! - **Proof of life** is anything received from the peer: a datagram on its connection (the
//!   proxy samples quinn's receive counter), an answer on a stream, a completed handshake.
//! - **The answer wait is bounded by the RTT**: `3 × smoothed RTT + ANSWER_FLOOR` (the floor
//!   covers the peer's delayed ACK and scheduling). When it passes without any proof of life
//!   since the stream was opened, the peer is *suspect*: the attempt is abandoned and the next
//!   candidate tried, and new connections skip the peer until it shows life again. If the
//!   peer did show life (it is alive, its backend is just slow to accept), the wait goes on up
//!   to the configured answer timeout.
//! - **Early bytes only to a fresh peer.** Client bytes go out right behind the header (saving
//!   a round trip) only when the peer answered a stream, or completed a handshake, within
//!   `max(2 × RTT, EARLY_FRESH_FLOOR)` (a sampled receive counter says only that something
//!   arrived since the last sample, not when, so it does not count here).
//!   A peer that dies within that window may have passed them on, so such a connection is
//!   reset rather than replayed elsewhere (docs/reliability.md, promise 10); to any other peer
//!   the header goes alone, bytes follow the answer, and a silent peer costs one bounded wait
//!   and a retry elsewhere, never the connection.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use meshup_policy::PeerSignal;

use super::pool::PeerKey;

/// Least time to wait for a peer's answer before suspecting it: quinn's default maximum ACK
/// delay (25 ms) plus scheduling on a busy machine.
pub const ANSWER_FLOOR: Duration = Duration::from_millis(50);
/// Least freshness of a proof of life that lets client bytes go out before the answer.
/// Small, because a peer that dies within the window costs the connections that sent early
/// bytes into it: at 200 new connections/s, 2 ms is under one connection on average.
pub const EARLY_FRESH_FLOOR: Duration = Duration::from_millis(2);

/// What is known of one peer gateway.
#[derive(Debug, Clone, Default)]
struct Peer {
    last_proof: Option<Instant>,
    /// The last answer on a stream or completed handshake: a precise time of life.
    last_answer: Option<Instant>,
    suspect_since: Option<Instant>,
    /// The pooled connection last sampled (quinn's stable id) and its receive counter.
    sampled: Option<(usize, u64)>,
    rtt: Option<Duration>,
}

/// What an observation changed, for the log and the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// The peer was suspect and showed life again.
    Recovered,
    /// The peer became suspect.
    Suspected,
}

/// Liveness of every peer gateway this gateway dials.
#[derive(Debug, Clone, Default)]
pub struct Liveness {
    peers: BTreeMap<PeerKey, Peer>,
}

impl Liveness {
    pub fn new() -> Self {
        Self::default()
    }

    fn proof(&mut self, peer: &PeerKey, now: Instant) -> Transition {
        let p = self.peers.entry(peer.clone()).or_default();
        p.last_proof = Some(p.last_proof.map_or(now, |t| t.max(now)));
        if p.suspect_since.take().is_some() {
            Transition::Recovered
        } else {
            Transition::None
        }
    }

    /// A sample of the pooled connection to `peer`: quinn's `stable_id`, its count of
    /// datagrams received so far, and its smoothed RTT. A count that moved (or a connection
    /// not seen before: its handshake completed) is proof of life.
    pub fn sample(
        &mut self,
        peer: &PeerKey,
        conn: usize,
        received: u64,
        rtt: Duration,
        now: Instant,
    ) -> Transition {
        let p = self.peers.entry(peer.clone()).or_default();
        p.rtt = Some(rtt);
        let moved = p.sampled != Some((conn, received));
        let new_conn = p.sampled.is_none_or(|(c, _)| c != conn);
        p.sampled = Some((conn, received));
        if moved || new_conn {
            self.proof(peer, now)
        } else {
            Transition::None
        }
    }

    /// The peer answered a stream (accepted or refused), or a handshake with it completed,
    /// just now: it is alive.
    pub fn answered(&mut self, peer: &PeerKey, now: Instant) -> Transition {
        let p = self.peers.entry(peer.clone()).or_default();
        p.last_answer = Some(p.last_answer.map_or(now, |t| t.max(now)));
        self.proof(peer, now)
    }

    /// The peer could not be reached (a dial failed, or no proof of life came within the
    /// answer wait). A peer already suspect keeps its first `since`.
    pub fn suspect(&mut self, peer: &PeerKey, now: Instant) -> Transition {
        let p = self.peers.entry(peer.clone()).or_default();
        if p.suspect_since.is_some() {
            return Transition::None;
        }
        p.suspect_since = Some(now);
        Transition::Suspected
    }

    /// Whether new connections should skip the peer.
    pub fn is_suspect(&self, peer: &PeerKey) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|p| p.suspect_since.is_some())
    }

    /// Every suspect peer, for the prober.
    pub fn suspects(&self) -> impl Iterator<Item = &PeerKey> {
        self.peers
            .iter()
            .filter(|(_, p)| p.suspect_since.is_some())
            .map(|(k, _)| k)
    }

    /// The peer's smoothed RTT, if a connection to it was sampled.
    pub fn rtt(&self, peer: &PeerKey) -> Option<Duration> {
        self.peers.get(peer).and_then(|p| p.rtt)
    }

    /// Whether client bytes may go out with the header to `peer` now (see the module docs).
    pub fn early_allowed(&self, peer: &PeerKey, now: Instant) -> bool {
        let Some(p) = self.peers.get(peer) else {
            return false;
        };
        let fresh = p
            .rtt
            .map_or(EARLY_FRESH_FLOOR, |rtt| (rtt * 2).max(EARLY_FRESH_FLOOR));
        p.suspect_since.is_none()
            && p.last_answer
                .is_some_and(|t| now.saturating_duration_since(t) <= fresh)
    }

    /// How long to wait for `peer`'s answer before suspecting it, at most `cap` (the
    /// configured answer timeout).
    pub fn answer_wait(&self, peer: &PeerKey, cap: Duration) -> Duration {
        let rtt = self.rtt(peer).unwrap_or(Duration::ZERO);
        (rtt * 3 + ANSWER_FLOOR).min(cap)
    }

    /// A cluster's signal for the decision, from its usable gateways: down when every one of
    /// them is suspect (since the latest of their suspicions), up with the best RTT of the
    /// others, unknown when none was ever sampled.
    pub fn cluster_signal(&self, gateways: &[PeerKey]) -> Option<PeerSignal> {
        if gateways.is_empty() {
            return None;
        }
        let states: Vec<Option<&Peer>> = gateways.iter().map(|g| self.peers.get(g)).collect();
        let suspect_since: Vec<Instant> = states
            .iter()
            .filter_map(|p| p.and_then(|p| p.suspect_since))
            .collect();
        if suspect_since.len() == gateways.len() {
            return suspect_since
                .into_iter()
                .max()
                .map(|since| PeerSignal::Down { since });
        }
        states
            .iter()
            .flatten()
            .filter(|p| p.suspect_since.is_none())
            .filter_map(|p| p.rtt)
            .min()
            .map(|rtt| PeerSignal::Up { rtt })
    }

    /// Forgets peers that left the catalog.
    pub fn retain(&mut self, peers: &HashSet<PeerKey>) {
        self.peers.retain(|k, _| peers.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshup_core::names::ClusterName;

    fn peer(cluster: &str, port: u16) -> PeerKey {
        PeerKey {
            cluster: ClusterName::new(cluster).expect("name"),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn samples_prove_life_only_when_something_arrived() {
        let t0 = Instant::now();
        let mut l = Liveness::new();
        let p = peer("west", 1);
        // (at ms, connection id, datagrams received) → transition, suspect afterwards
        assert_eq!(l.sample(&p, 7, 10, MS, t0), Transition::None);
        assert!(
            !l.early_allowed(&p, t0),
            "a sample proves life, but not when: no early bytes"
        );
        assert_eq!(l.suspect(&p, t0 + 100 * MS), Transition::Suspected);
        assert_eq!(
            l.suspect(&p, t0 + 200 * MS),
            Transition::None,
            "first suspicion kept"
        );
        // The same count on the same connection: still silent.
        assert_eq!(l.sample(&p, 7, 10, MS, t0 + 300 * MS), Transition::None);
        assert!(l.is_suspect(&p));
        // It moved: alive again.
        assert_eq!(
            l.sample(&p, 7, 11, MS, t0 + 400 * MS),
            Transition::Recovered
        );
        assert!(!l.is_suspect(&p));
        // A new connection (the old one closed, a redial succeeded) with a lower count.
        l.suspect(&p, t0 + 500 * MS);
        assert_eq!(l.sample(&p, 8, 3, MS, t0 + 600 * MS), Transition::Recovered);
        // An answer on a stream is proof too.
        l.suspect(&p, t0 + 700 * MS);
        assert_eq!(l.answered(&p, t0 + 800 * MS), Transition::Recovered);
    }

    #[test]
    fn early_bytes_go_only_to_a_peer_that_showed_life_within_twice_its_rtt() {
        let t0 = Instant::now();
        let p = peer("west", 1);
        // (rtt, time since the last proof, suspect) → early bytes allowed
        let table = [
            (MS, 0, false, true),
            (MS, 2, false, true),  // the 2 ms floor
            (MS, 3, false, false), // past the floor
            (40 * MS, 80, false, true),
            (40 * MS, 81, false, false),
            (MS, 0, true, false), // suspect: never
        ];
        for (rtt, since, suspect, want) in table {
            let mut l = Liveness::new();
            l.sample(&p, 1, 1, rtt, t0);
            l.answered(&p, t0);
            if suspect {
                l.suspect(&p, t0);
            }
            let at = t0 + since * MS;
            assert_eq!(
                l.early_allowed(&p, at),
                want,
                "rtt {rtt:?}, {since} ms, suspect {suspect}"
            );
        }
        assert!(
            !Liveness::new().early_allowed(&p, t0),
            "never seen: header alone"
        );
    }

    #[test]
    fn the_answer_wait_follows_the_rtt_between_floor_and_cap() {
        let p = peer("west", 1);
        let cap = Duration::from_secs(4);
        let t0 = Instant::now();
        // (rtt sampled, expected wait)
        let table = [
            (None, ANSWER_FLOOR),
            (Some(MS), ANSWER_FLOOR + 3 * MS),
            (Some(80 * MS), ANSWER_FLOOR + 240 * MS),
            (Some(Duration::from_secs(5)), cap),
        ];
        for (rtt, want) in table {
            let mut l = Liveness::new();
            if let Some(rtt) = rtt {
                l.sample(&p, 1, 1, rtt, t0);
            }
            assert_eq!(l.answer_wait(&p, cap), want, "{rtt:?}");
        }
    }

    #[test]
    fn a_cluster_is_down_only_when_every_gateway_is_suspect() {
        let t0 = Instant::now();
        let (a, b) = (peer("west", 1), peer("west", 2));
        let mut l = Liveness::new();
        assert_eq!(
            l.cluster_signal(&[a.clone(), b.clone()]),
            None,
            "never seen"
        );
        assert_eq!(l.cluster_signal(&[]), None);
        l.sample(&a, 1, 1, 5 * MS, t0);
        l.sample(&b, 2, 1, 3 * MS, t0);
        assert_eq!(
            l.cluster_signal(&[a.clone(), b.clone()]),
            Some(PeerSignal::Up { rtt: 3 * MS }),
            "the best RTT"
        );
        l.suspect(&b, t0 + MS);
        assert_eq!(
            l.cluster_signal(&[a.clone(), b.clone()]),
            Some(PeerSignal::Up { rtt: 5 * MS }),
            "one gateway left"
        );
        l.suspect(&a, t0 + 2 * MS);
        assert_eq!(
            l.cluster_signal(&[a.clone(), b.clone()]),
            Some(PeerSignal::Down { since: t0 + 2 * MS })
        );
        l.retain(&HashSet::from([a.clone()]));
        assert_eq!(
            l.cluster_signal(&[b]),
            None,
            "a forgotten peer is unknown again"
        );
    }
}

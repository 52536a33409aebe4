//! One QUIC connection per peer gateway, shared by every proxied TCP connection to it.
//!
//! Invariants (each is tested below by counting dials):
//!
//! 1. At most one dial per peer is in flight. Callers that ask while it runs wait for its
//!    result; 1000 simultaneous callers cause exactly one handshake.
//! 2. A connection that is closed (`Dialer::is_usable` false) is never handed out; the next
//!    caller redials at once (a dead connection is not a failed dial).
//! 3. A connection older than `max_age` (or than the dialer's `lifetime` for it, e.g. half
//!    the certificate lifetime) is never handed out; the next caller gets a new one.
//!    At that age it leaves the pool even if no caller asks (an idle connection does not
//!    outlive it) and goes to `Dialer::retire`: no new streams, the open ones get a grace.
//! 4. After a failed dial the peer is in backoff (exponential, capped): callers fail fast
//!    with `PoolError::Backoff` and no dial happens until it expires, so a dead peer costs
//!    one handshake timeout per backoff period, not one per client connection.
//! 5. A connection dialled with credentials that are no longer ours (the certificate was
//!    rotated, see [`Credentials`]) is never handed out; the next caller dials with the new
//!    ones, so new proxied connections present the new certificate within one reload. The old
//!    connection keeps its open streams and goes to `Dialer::retire_when_idle`: it closes
//!    once they are done, and is retired at the age it would have been retired at anyway at
//!    the latest, so a rotation never cuts a stream earlier than ageing would, and rotations
//!    do not pile up open connections.
//! 6. When the peer closes a pooled connection saying it is going away (`Dialer::going_away`:
//!    it drains or shut down), the pool notices at once (`Dialer::closed`), and for
//!    [`GOING_AWAY_HOLD`] after the close no caller dials that address: each gets
//!    `PoolError::GoingAway` at once and tries another gateway. A draining gateway revokes
//!    its lease before it closes, and peers' catalogs drop it within moments, but a caller
//!    that picked it from a catalog a moment old would otherwise spend a whole handshake
//!    timeout on an address nobody serves any more. After the hold the address is dialled
//!    as any other: a process restarted there (which takes longer than the hold to start
//!    and publish itself) is reached as soon as it is there.
//! 7. When the peer refuses a stream on a pooled connection saying it is draining
//!    ([`Pool::refused_draining`]), the connection stays pooled (its open streams go on) but
//!    for [`GOING_AWAY_HOLD`] no caller gets it: each gets `PoolError::Draining` at once and
//!    tries another gateway. A draining gateway refuses every new stream until it closes, and
//!    peers' catalogs mark it within moments, but while one is hung (or slow) each new stream
//!    would otherwise pay a round trip to be refused. After the hold callers get the
//!    connection again until the next refusal comes back: one round trip's worth of streams
//!    is refused per hold while the gateway drains. The peer is alive (it answered), so
//!    unlike a close this is no reason to suspect it.
//!
//! The state is owned by one task; callers talk to it over a channel and never lock.
//! Dials run in their own tasks and report back, so a slow handshake blocks nobody else.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use meshup_core::names::ClusterName;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::tunnel::ConnectError;

/// First backoff after a failed dial.
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest backoff between dials to a failing peer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long after a peer closed a connection going away its address is not dialled
/// (invariant 6), and after it refused a stream draining its connection is not handed out
/// (invariant 7).
pub const GOING_AWAY_HOLD: Duration = Duration::from_secs(1);

/// A peer gateway: the cluster it must prove it belongs to and where to dial it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    pub cluster: ClusterName,
    pub addr: SocketAddr,
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.cluster, self.addr)
    }
}

/// Why the pool has no connection for a caller.
#[derive(Debug, Clone, Error)]
pub enum PoolError {
    #[error("dial to {peer} failed: {source}")]
    Dial { peer: String, source: ConnectError },
    #[error("{peer} is in backoff after failed dials; next attempt in {remaining:?}")]
    Backoff { peer: String, remaining: Duration },
    #[error("{peer} closed its connection: it is going away (draining or shut down)")]
    GoingAway { peer: String },
    #[error("{peer} refused a stream: it is draining")]
    Draining { peer: String },
    #[error("connection pool is shut down")]
    Closed,
}

impl PoolError {
    /// Whether asking again later may succeed (the outbound proxy tries the next candidate
    /// now either way).
    pub fn is_retryable(&self) -> bool {
        match self {
            PoolError::Dial { source, .. } => source.is_retryable(),
            PoolError::Backoff { .. }
            | PoolError::GoingAway { .. }
            | PoolError::Draining { .. } => true,
            PoolError::Closed => false,
        }
    }
}

/// How the pool makes and checks connections; the real one dials QUIC, tests count.
pub trait Dialer: Send + Sync + 'static {
    type Conn: Clone + Send + Sync + 'static;
    /// Dials `peer` (bounded by the dialer's own timeout).
    fn dial(&self, peer: &PeerKey) -> BoxFuture<'static, Result<Self::Conn, ConnectError>>;
    /// Whether a pooled connection may still carry new streams.
    fn is_usable(conn: &Self::Conn) -> bool;
    /// Whether the peer closed `conn` saying it is going away (invariant 6).
    fn going_away(_conn: &Self::Conn) -> bool {
        false
    }
    /// Resolves once `conn` is closed, by either end.
    fn closed(conn: &Self::Conn) -> BoxFuture<'static, ()>;
    /// Whether `a` and `b` are the same connection.
    fn same(a: &Self::Conn, b: &Self::Conn) -> bool;
    /// A per-connection cap on how long it is handed out, below the pool's `max_age`.
    fn lifetime(&self, _conn: &Self::Conn) -> Option<Duration> {
        None
    }
    /// Called once when a still-usable connection is retired for age: it gets no new
    /// streams, and the dialer closes it after giving the open ones time to finish.
    fn retire(&self, _conn: Self::Conn) {}
    /// Called once when a still-usable connection is superseded (our certificate changed):
    /// it gets no new streams; the dialer closes it once no stream uses it, and retires it
    /// at `at` (the age it was dialled for) at the latest.
    fn retire_when_idle(self: Arc<Self>, conn: Self::Conn, at: Instant)
    where
        Self: Sized,
    {
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            if Self::is_usable(&conn) {
                self.retire(conn);
            }
        });
    }
}

/// What a dialer presents to peers in its handshakes, so the pool notices a rotation.
pub trait Credentials {
    /// Names the credentials a dial started now would present (our certificate's serial).
    /// Connections dialled under another name are replaced for new streams (invariant 5).
    fn credentials(&self) -> String;
}

/// The QUIC dialer presents the identity's current certificate in every new handshake (the
/// client-certificate resolver asks for it each time), so that certificate's serial names it.
impl Credentials for super::QuicDialer {
    fn credentials(&self) -> String {
        self.0.identity().current().serial.clone()
    }
}

/// Backoff after `failures` consecutive failed dials (≥ 1). Pure.
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << shift).min(BACKOFF_MAX)
}

/// Handle to the pool task. Cheap to clone.
#[derive(Debug)]
pub struct Pool<C> {
    tx: mpsc::UnboundedSender<Msg<C>>,
    dials: Arc<AtomicU64>,
}

impl<C> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            dials: self.dials.clone(),
        }
    }
}

type Reply<C> = oneshot::Sender<Result<C, PoolError>>;

enum Msg<C> {
    Get {
        peer: PeerKey,
        reply: Reply<C>,
    },
    Dialed {
        peer: PeerKey,
        result: Result<C, ConnectError>,
    },
    /// Every pooled connection that is still usable, for the admin status page.
    List {
        reply: oneshot::Sender<Vec<Live<C>>>,
    },
    /// A pooled connection reached the age it is retired at (`retire_at`).
    Expire {
        peer: PeerKey,
        retire_at: Instant,
    },
    /// Forget every peer not in the set (it left the catalog).
    Retain {
        peers: HashSet<PeerKey>,
    },
    /// The pooled connection `serial` closed.
    Closed {
        peer: PeerKey,
        serial: u64,
    },
    /// The peer refused a stream on `conn` because it is draining (invariant 7).
    RefusedDraining {
        peer: PeerKey,
        conn: C,
    },
}

/// A pooled connection that may still carry new streams, as [`Pool::connections`] lists it.
#[derive(Debug, Clone)]
pub struct Live<C> {
    pub peer: PeerKey,
    pub conn: C,
    /// Time since its handshake completed.
    pub age: Duration,
}

/// A pooled connection.
struct Pooled<C> {
    conn: C,
    /// Tells it from the slot's earlier and later connections.
    serial: u64,
    /// Ends the task that waits for it to close once the pool lets it go, so that task
    /// never keeps a connection open the pool forgot.
    _closed_watch: tokio_util::sync::DropGuard,
    /// When its handshake completed.
    dialed_at: Instant,
    /// After this instant the connection is no longer handed out.
    retire_at: Instant,
    /// The credentials it was dialled with.
    credentials: String,
}

struct Slot<C> {
    conn: Option<Pooled<C>>,
    dialing: bool,
    /// The credentials the dial in progress presents (read when it started: a rotation during
    /// the handshake costs one extra dial later, never a connection with the old certificate).
    dialing_with: String,
    waiters: Vec<Reply<C>>,
    failures: u32,
    retry_at: Option<Instant>,
    /// The peer closed a connection going away, or refused a stream draining: no caller
    /// gets a connection to it before this instant (invariants 6 and 7).
    gone_until: Option<Instant>,
    /// The hold above is for a refusal (invariant 7), not a close.
    refused_draining: bool,
}

impl<C> Default for Slot<C> {
    fn default() -> Self {
        Self {
            conn: None,
            dialing: false,
            dialing_with: String::new(),
            waiters: Vec::new(),
            failures: 0,
            retry_at: None,
            gone_until: None,
            refused_draining: false,
        }
    }
}

impl<C: Clone + Send + Sync + 'static> Pool<C> {
    /// Starts the pool task. It ends when every handle is dropped.
    pub fn spawn<D>(dialer: D, max_age: Duration) -> Self
    where
        D: Dialer<Conn = C> + Credentials,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let dials = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(dialer, max_age, rx, tx.downgrade(), dials.clone()));
        Self { tx, dials }
    }

    /// A connection to `peer`: the pooled one, or a new one (see the invariants above).
    pub async fn get(&self, peer: &PeerKey) -> Result<C, PoolError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Get {
                peer: peer.clone(),
                reply,
            })
            .map_err(|_| PoolError::Closed)?;
        rx.await.map_err(|_| PoolError::Closed)?
    }

    /// The pooled connections that may still carry streams, by peer, with their ages.
    pub async fn connections(&self) -> Vec<Live<C>> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::List { reply }).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The peer refused a stream on `conn` saying it is draining: new streams go elsewhere
    /// for a while (invariant 7).
    pub fn refused_draining(&self, peer: &PeerKey, conn: C) {
        let _ = self.tx.send(Msg::RefusedDraining {
            peer: peer.clone(),
            conn,
        });
    }

    /// Forgets every peer outside `peers` (the gateways the catalog still lists), so slots
    /// do not pile up as gateways come and go. A forgotten connection is not closed here:
    /// it ends when its last stream does.
    pub fn retain(&self, peers: HashSet<PeerKey>) {
        let _ = self.tx.send(Msg::Retain { peers });
    }

    /// Dials started since the pool began.
    pub fn dials(&self) -> u64 {
        self.dials.load(Ordering::Relaxed)
    }
}

async fn run<D: Dialer + Credentials>(
    dialer: D,
    max_age: Duration,
    mut rx: mpsc::UnboundedReceiver<Msg<D::Conn>>,
    tx: mpsc::WeakUnboundedSender<Msg<D::Conn>>,
    dials: Arc<AtomicU64>,
) {
    let dialer = Arc::new(dialer);
    let mut slots: HashMap<PeerKey, Slot<D::Conn>> = HashMap::new();
    let mut serials: u64 = 0;
    while let Some(msg) = rx.recv().await {
        let now = Instant::now();
        match msg {
            Msg::Get { peer, reply } => {
                let slot = slots.entry(peer.clone()).or_default();
                if slot.gone_until.is_some_and(|until| now < until) {
                    let _ = reply.send(Err(slot.held(&peer)));
                    continue;
                }
                let credentials = dialer.credentials();
                if let Some(pooled) = slot.conn.take() {
                    let usable = D::is_usable(&pooled.conn);
                    let young = now < pooled.retire_at;
                    let current = pooled.credentials == credentials;
                    if usable && young && current {
                        let _ = reply.send(Ok(pooled.conn.clone()));
                        slot.conn = Some(pooled);
                        continue;
                    }
                    if !usable && D::going_away(&pooled.conn) {
                        // Closed just now: the task that reports it has not yet.
                        gone(slot, &peer, now);
                    } else if !usable {
                        tracing::debug!(%peer, "pooled connection closed; replacing it");
                    } else if !young {
                        tracing::debug!(%peer, "pooled connection too old; replacing it");
                        dialer.retire(pooled.conn);
                    } else {
                        tracing::info!(%peer, "our certificate changed; new streams go to a new connection");
                        // Open streams stay on the old connection; it closes when they are
                        // done, or at the age it would have been retired at anyway.
                        dialer
                            .clone()
                            .retire_when_idle(pooled.conn, pooled.retire_at);
                    }
                }
                if slot.dialing {
                    slot.waiters.push(reply);
                    continue;
                }
                if slot.gone_until.is_some_and(|until| now < until) {
                    // Found closed going away just now, above.
                    let _ = reply.send(Err(PoolError::GoingAway {
                        peer: peer.to_string(),
                    }));
                    continue;
                }
                if let Some(at) = slot.retry_at
                    && now < at
                {
                    let _ = reply.send(Err(PoolError::Backoff {
                        peer: peer.to_string(),
                        remaining: at - now,
                    }));
                    continue;
                }
                slot.dialing = true;
                slot.dialing_with = credentials;
                slot.waiters.push(reply);
                dials.fetch_add(1, Ordering::Relaxed);
                let Some(tx) = tx.upgrade() else { return };
                let dial = dialer.dial(&peer);
                tokio::spawn(async move {
                    let result = dial.await;
                    let _ = tx.send(Msg::Dialed { peer, result });
                });
            }
            Msg::List { reply } => {
                let live = slots
                    .iter()
                    .filter_map(|(peer, slot)| {
                        let pooled = slot.conn.as_ref()?;
                        D::is_usable(&pooled.conn).then(|| Live {
                            peer: peer.clone(),
                            conn: pooled.conn.clone(),
                            age: now - pooled.dialed_at,
                        })
                    })
                    .collect();
                let _ = reply.send(live);
            }
            Msg::Expire { peer, retire_at } => {
                // Only the connection this timer was set for: it may have been replaced.
                let Some(slot) = slots.get_mut(&peer) else {
                    continue;
                };
                if slot.conn.as_ref().is_some_and(|p| p.retire_at == retire_at)
                    && let Some(pooled) = slot.conn.take()
                    && D::is_usable(&pooled.conn)
                {
                    tracing::debug!(%peer, "pooled connection reached its age; retiring it");
                    dialer.retire(pooled.conn);
                }
            }
            Msg::Closed { peer, serial } => {
                if let Some(slot) = slots.get_mut(&peer)
                    && slot.conn.as_ref().is_some_and(|p| p.serial == serial)
                    && let Some(pooled) = slot.conn.take()
                    && D::going_away(&pooled.conn)
                {
                    gone(slot, &peer, now);
                }
            }
            Msg::RefusedDraining { peer, conn } => {
                if let Some(slot) = slots.get_mut(&peer)
                    && slot.conn.as_ref().is_some_and(|p| D::same(&p.conn, &conn))
                    && slot.gone_until.is_none_or(|until| now >= until)
                {
                    tracing::info!(%peer, hold = ?GOING_AWAY_HOLD, "peer gateway refused a stream: it is draining; new streams go elsewhere");
                    slot.gone_until = Some(now + GOING_AWAY_HOLD);
                    slot.refused_draining = true;
                }
            }
            Msg::Retain { peers } => {
                // A dial in progress keeps its slot so its waiters get their answer.
                slots.retain(|peer, slot| slot.dialing || peers.contains(peer));
            }
            Msg::Dialed { peer, result } => {
                let slot = slots.entry(peer.clone()).or_default();
                slot.dialing = false;
                let waiters = std::mem::take(&mut slot.waiters);
                match result {
                    Ok(conn) => {
                        slot.failures = 0;
                        slot.retry_at = None;
                        let age = dialer.lifetime(&conn).map_or(max_age, |l| l.min(max_age));
                        let retire_at = now + age;
                        serials += 1;
                        let serial = serials;
                        let closed = D::closed(&conn);
                        let released = tokio_util::sync::CancellationToken::new();
                        let closed_tx = tx.clone();
                        let closed_peer = peer.clone();
                        let watch = released.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                () = closed => {
                                    if let Some(tx) = closed_tx.upgrade() {
                                        let _ = tx.send(Msg::Closed {
                                            peer: closed_peer,
                                            serial,
                                        });
                                    }
                                }
                                () = watch.cancelled() => {}
                            }
                        });
                        slot.conn = Some(Pooled {
                            conn: conn.clone(),
                            serial,
                            _closed_watch: released.drop_guard(),
                            dialed_at: now,
                            retire_at,
                            credentials: std::mem::take(&mut slot.dialing_with),
                        });
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep_until(retire_at).await;
                            if let Some(tx) = tx.upgrade() {
                                let _ = tx.send(Msg::Expire { peer, retire_at });
                            }
                        });
                        for w in waiters {
                            let _ = w.send(Ok(conn.clone()));
                        }
                    }
                    Err(e) => {
                        slot.failures = slot.failures.saturating_add(1);
                        let wait = backoff(slot.failures);
                        slot.retry_at = Some(now + wait);
                        tracing::info!(%peer, error = %e, backoff = ?wait, "dial failed");
                        for w in waiters {
                            let _ = w.send(Err(PoolError::Dial {
                                peer: peer.to_string(),
                                source: e.clone(),
                            }));
                        }
                    }
                }
            }
        }
    }
}

/// The peer of `slot` closed its connection going away, at `now` (invariant 6).
fn gone<C>(slot: &mut Slot<C>, peer: &PeerKey, now: Instant) {
    tracing::info!(%peer, hold = ?GOING_AWAY_HOLD, "peer gateway closed its connection going away; new streams go elsewhere");
    slot.gone_until = Some(now + GOING_AWAY_HOLD);
    slot.refused_draining = false;
}

impl<C> Slot<C> {
    /// What a caller is told during a hold (invariants 6 and 7).
    fn held(&self, peer: &PeerKey) -> PoolError {
        let peer = peer.to_string();
        if self.refused_draining {
            PoolError::Draining { peer }
        } else {
            PoolError::GoingAway { peer }
        }
    }
}

#[cfg(test)]
mod tests {
    //! On paused time: every instant below is exact, so the tests assert each boundary (the
    //! last instant a connection is still handed out and the first it is not) instead of
    //! sleeping past it with a margin.

    use super::*;
    use std::sync::atomic::AtomicBool;

    /// How long a fake handshake takes.
    const HANDSHAKE: Duration = Duration::from_millis(20);
    const MS: Duration = Duration::from_millis(1);

    #[derive(Clone)]
    struct FakeConn {
        alive: Arc<AtomicBool>,
        /// Closed by the peer going away (set together with `alive` false).
        going_away: Arc<AtomicBool>,
        /// Told when [`FakeConn::close`] closes it.
        closed: Arc<tokio::sync::Notify>,
        lifetime: Option<Duration>,
    }

    #[derive(Clone, Default)]
    struct FakeDialer {
        dials: Arc<AtomicU64>,
        retired: Arc<AtomicU64>,
        fail: Arc<AtomicBool>,
        /// Milliseconds of certificate-derived lifetime per connection (0: none).
        lifetime_ms: Arc<AtomicU64>,
        /// Which certificate new dials present; bumped to simulate a rotation.
        certificate: Arc<AtomicU64>,
    }

    impl Dialer for FakeDialer {
        type Conn = FakeConn;
        fn dial(&self, peer: &PeerKey) -> BoxFuture<'static, Result<FakeConn, ConnectError>> {
            self.dials.fetch_add(1, Ordering::SeqCst);
            let fail = self.fail.load(Ordering::SeqCst);
            let lifetime = match self.lifetime_ms.load(Ordering::SeqCst) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            };
            let addr = peer.addr;
            Box::pin(async move {
                // A handshake takes time, so concurrent callers overlap with it.
                tokio::time::sleep(HANDSHAKE).await;
                if fail {
                    Err(ConnectError::Timeout {
                        addr,
                        timeout: HANDSHAKE,
                    })
                } else {
                    Ok(FakeConn {
                        alive: Arc::new(AtomicBool::new(true)),
                        going_away: Arc::new(AtomicBool::new(false)),
                        closed: Arc::new(tokio::sync::Notify::new()),
                        lifetime,
                    })
                }
            })
        }
        fn is_usable(conn: &FakeConn) -> bool {
            conn.alive.load(Ordering::SeqCst)
        }
        fn going_away(conn: &FakeConn) -> bool {
            conn.going_away.load(Ordering::SeqCst)
        }
        fn closed(conn: &FakeConn) -> BoxFuture<'static, ()> {
            let closed = conn.closed.clone();
            Box::pin(async move { closed.notified().await })
        }
        fn same(a: &FakeConn, b: &FakeConn) -> bool {
            same(a, b)
        }
        fn retire(&self, _conn: FakeConn) {
            self.retired.fetch_add(1, Ordering::SeqCst);
        }
        fn lifetime(&self, conn: &FakeConn) -> Option<Duration> {
            conn.lifetime
        }
    }

    impl Credentials for FakeDialer {
        fn credentials(&self) -> String {
            format!("certificate {}", self.certificate.load(Ordering::SeqCst))
        }
    }

    impl FakeDialer {
        fn dials(&self) -> u64 {
            self.dials.load(Ordering::SeqCst)
        }
        fn retired(&self) -> u64 {
            self.retired.load(Ordering::SeqCst)
        }
    }

    fn peer() -> PeerKey {
        PeerKey {
            cluster: ClusterName::new("west").expect("valid"),
            addr: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    fn same(a: &FakeConn, b: &FakeConn) -> bool {
        Arc::ptr_eq(&a.alive, &b.alive)
    }

    /// A connection from the pool and the instant it was handed out (on paused time, the
    /// instant its dial completed when it was a new one).
    async fn get(pool: &Pool<FakeConn>) -> (FakeConn, Instant) {
        let conn = pool.get(&peer()).await.expect("a connection");
        (conn, Instant::now())
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn thousand_concurrent_callers_cause_one_dial() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(3600));
        let gets = (0..1000).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get(&peer()).await.is_ok() })
        });
        for g in futures::future::join_all(gets).await {
            assert!(g.expect("task"));
        }
        assert_eq!(dialer.dials(), 1);
        assert_eq!(pool.dials(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn dead_and_old_connections_are_replaced() {
        const AGE: Duration = Duration::from_millis(300);
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), AGE);
        let (c1, _) = get(&pool).await;
        let (again, _) = get(&pool).await;
        assert!(same(&c1, &again));
        assert_eq!(dialer.dials(), 1);

        c1.alive.store(false, Ordering::SeqCst);
        let (c2, dialled) = get(&pool).await;
        assert!(!same(&c1, &c2));
        assert_eq!(dialer.dials(), 2);
        // A dead connection is simply dropped: nothing to retire.
        assert_eq!(dialer.retired(), 0);

        // Handed out until the last instant before its age, not at it.
        tokio::time::sleep_until(dialled + AGE - MS).await;
        let (still, _) = get(&pool).await;
        assert!(same(&c2, &still), "replaced before its age");
        assert_eq!(dialer.retired(), 0);
        tokio::time::sleep_until(dialled + AGE).await;
        let (c3, _) = get(&pool).await;
        assert!(!same(&c2, &c3), "handed out at its age");
        assert_eq!(dialer.dials(), 3);
        // The old but usable one is handed to the dialer to be closed after a grace.
        assert_eq!(dialer.retired(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn departed_peers_are_forgotten_and_kept_ones_stay_pooled() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(3600));
        let other = PeerKey {
            cluster: ClusterName::new("north").expect("valid"),
            addr: "127.0.0.1:2".parse().expect("addr"),
        };
        pool.get(&peer()).await.expect("dial");
        pool.get(&other).await.expect("dial");
        assert_eq!(pool.connections().await.len(), 2);

        pool.retain(HashSet::from([peer()]));
        let live: Vec<PeerKey> = pool
            .connections()
            .await
            .into_iter()
            .map(|l| l.peer)
            .collect();
        assert_eq!(live, vec![peer()]);
        pool.get(&peer()).await.expect("still pooled");
        assert_eq!(dialer.dials(), 2);
        // A departed peer that comes back is dialled afresh.
        pool.get(&other).await.expect("dial again");
        assert_eq!(dialer.dials(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connections_own_lifetime_caps_its_age() {
        const LIFETIME: Duration = Duration::from_millis(200);
        let dialer = FakeDialer::default();
        dialer
            .lifetime_ms
            .store(LIFETIME.as_millis() as u64, Ordering::SeqCst);
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(3600));
        let (c1, dialled) = get(&pool).await;
        tokio::time::sleep_until(dialled + LIFETIME - MS).await;
        let (again, _) = get(&pool).await;
        assert!(same(&c1, &again), "replaced before its lifetime");
        tokio::time::sleep_until(dialled + LIFETIME).await;
        let (c2, _) = get(&pool).await;
        assert!(!same(&c1, &c2), "handed out past its lifetime");
        assert_eq!(dialer.dials(), 2);
        assert_eq!(dialer.retired(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_retired_at_its_age_without_a_caller() {
        const LIFETIME: Duration = Duration::from_millis(200);
        let dialer = FakeDialer::default();
        dialer
            .lifetime_ms
            .store(LIFETIME.as_millis() as u64, Ordering::SeqCst);
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(3600));
        let (_, dialled) = get(&pool).await;
        tokio::time::sleep_until(dialled + LIFETIME - MS).await;
        let live = pool.connections().await;
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].age, LIFETIME - MS);
        assert_eq!(dialer.retired(), 0);
        tokio::time::sleep_until(dialled + LIFETIME).await;
        // The expiry is a message to the pool task: the listing after it sees it done.
        tokio::task::yield_now().await;
        assert!(
            pool.connections().await.is_empty(),
            "an idle connection outlived its age"
        );
        assert_eq!(dialer.retired(), 1);
        // The next caller dials afresh; nothing is retired twice.
        let _ = get(&pool).await;
        assert_eq!(dialer.dials(), 2);
        assert_eq!(dialer.retired(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_dials_back_off_and_callers_fail_fast() {
        let dialer = FakeDialer::default();
        dialer.fail.store(true, Ordering::SeqCst);
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(60));
        assert!(matches!(
            pool.get(&peer()).await,
            Err(PoolError::Dial { .. })
        ));
        let failed = Instant::now();
        // Within the backoff: no dial, immediate error, up to its last instant.
        for _ in 0..50 {
            assert!(matches!(
                pool.get(&peer()).await,
                Err(PoolError::Backoff { .. })
            ));
        }
        tokio::time::sleep_until(failed + backoff(1) - MS).await;
        assert!(matches!(
            pool.get(&peer()).await,
            Err(PoolError::Backoff { .. })
        ));
        assert_eq!(dialer.dials(), 1);
        // At its end: the next caller dials.
        tokio::time::sleep_until(failed + backoff(1)).await;
        assert!(matches!(
            pool.get(&peer()).await,
            Err(PoolError::Dial { .. })
        ));
        let failed = Instant::now();
        assert_eq!(dialer.dials(), 2);
        // Second failure: the backoff doubled.
        tokio::time::sleep_until(failed + backoff(2) - MS).await;
        assert!(matches!(
            pool.get(&peer()).await,
            Err(PoolError::Backoff { .. })
        ));
        assert_eq!(dialer.dials(), 2);
        tokio::time::sleep_until(failed + backoff(2)).await;
        dialer.fail.store(false, Ordering::SeqCst);
        assert!(pool.get(&peer()).await.is_ok());
        assert_eq!(dialer.dials(), 3);
    }

    impl FakeConn {
        /// The peer closes it, going away or not, and the pool is told.
        fn close(&self, going_away: bool) {
            self.going_away.store(going_away, Ordering::SeqCst);
            self.alive.store(false, Ordering::SeqCst);
            self.closed.notify_one();
        }
    }

    /// A caller's view of the pool: whether it got a connection, was told the peer is going
    /// away, or was refused for backoff.
    async fn outcome(pool: &Pool<FakeConn>) -> &'static str {
        match pool.get(&peer()).await {
            Ok(_) => "connection",
            Err(PoolError::GoingAway { .. }) => "going away",
            Err(PoolError::Draining { .. }) => "draining",
            Err(PoolError::Backoff { .. }) => "backoff",
            Err(_) => "other error",
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_going_away_is_not_dialled_for_the_hold_after_its_close() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(60));
        let (c1, _) = get(&pool).await;
        let closed = Instant::now();
        c1.close(true);
        // The pool hears of the close at once: every caller within the hold, up to its
        // last instant, is told at once, and nobody dials.
        for at in [MS, GOING_AWAY_HOLD / 2, GOING_AWAY_HOLD - MS] {
            tokio::time::sleep_until(closed + at).await;
            assert_eq!(outcome(&pool).await, "going away", "{at:?} after the close");
        }
        assert_eq!(dialer.dials(), 1);
        // At its end the address is dialled again (a new process may serve it now).
        tokio::time::sleep_until(closed + GOING_AWAY_HOLD).await;
        let (c2, _) = get(&pool).await;
        assert!(!same(&c1, &c2));
        assert_eq!(dialer.dials(), 2);

        // A connection that simply closed is redialled by the next caller, as before.
        c2.close(false);
        tokio::time::sleep(MS).await;
        let (c3, _) = get(&pool).await;
        assert!(!same(&c2, &c3));
        assert_eq!(dialer.dials(), 3);

        // A close long past is not held against the address: the hold counts from the close,
        // not from the first caller that finds it.
        c3.close(true);
        tokio::time::sleep(GOING_AWAY_HOLD * 10).await;
        assert_eq!(outcome(&pool).await, "connection");
        assert_eq!(dialer.dials(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_refusing_a_stream_draining_is_held_back_while_its_connection_stays() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(60));
        let (c1, _) = get(&pool).await;
        let refused = Instant::now();
        pool.refused_draining(&peer(), c1.clone());
        // Every caller within the hold, up to its last instant, is told at once; the
        // connection is neither closed nor replaced.
        for at in [MS, GOING_AWAY_HOLD / 2, GOING_AWAY_HOLD - MS] {
            tokio::time::sleep_until(refused + at).await;
            assert_eq!(outcome(&pool).await, "draining", "{at:?} after the refusal");
        }
        assert!(
            FakeDialer::is_usable(&c1),
            "the refusal closed the connection"
        );
        // A refusal during the hold does not extend it.
        pool.refused_draining(&peer(), c1.clone());
        // At its end the same connection is handed out again (one stream tries again).
        tokio::time::sleep_until(refused + GOING_AWAY_HOLD).await;
        let (again, _) = get(&pool).await;
        assert!(same(&c1, &again), "handed out another connection");
        assert_eq!(dialer.dials(), 1);

        // A refusal on a connection the pool no longer holds changes nothing.
        c1.close(false);
        tokio::time::sleep(MS).await;
        let (c2, _) = get(&pool).await;
        assert!(!same(&c1, &c2));
        pool.refused_draining(&peer(), c1.clone());
        tokio::time::sleep(MS).await;
        assert_eq!(outcome(&pool).await, "connection");

        // Refused, then closed going away: the hold counts from the close, and callers are
        // told the gateway went away.
        pool.refused_draining(&peer(), c2.clone());
        tokio::time::sleep(GOING_AWAY_HOLD / 2).await;
        c2.close(true);
        let closed = Instant::now();
        tokio::time::sleep_until(closed + GOING_AWAY_HOLD - MS).await;
        assert_eq!(outcome(&pool).await, "going away");
        tokio::time::sleep_until(closed + GOING_AWAY_HOLD).await;
        assert_eq!(outcome(&pool).await, "connection");
        assert_eq!(dialer.dials(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_finds_a_going_away_close_first_does_not_dial() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(60));
        let (c1, _) = get(&pool).await;
        // Closed without the pool being told yet (its watch has not run).
        c1.going_away.store(true, Ordering::SeqCst);
        c1.alive.store(false, Ordering::SeqCst);
        let found = Instant::now();
        assert_eq!(outcome(&pool).await, "going away");
        tokio::time::sleep_until(found + GOING_AWAY_HOLD - MS).await;
        assert_eq!(outcome(&pool).await, "going away");
        assert_eq!(dialer.dials(), 1);
        tokio::time::sleep_until(found + GOING_AWAY_HOLD).await;
        assert_eq!(outcome(&pool).await, "connection");
        assert_eq!(dialer.dials(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_certificate_moves_new_callers_to_a_new_connection_and_spares_the_old_one() {
        const AGE: Duration = Duration::from_millis(300);
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), AGE);
        let (old, dialled) = get(&pool).await;
        tokio::time::sleep_until(dialled + AGE / 3).await;

        dialer.certificate.fetch_add(1, Ordering::SeqCst);
        let (new, _) = get(&pool).await;
        assert!(
            !same(&old, &new),
            "handed out a connection with the old certificate"
        );
        assert_eq!(dialer.dials(), 2);
        let (again, _) = get(&pool).await;
        assert!(same(&new, &again), "the new connection is pooled");
        assert_eq!(dialer.dials(), 2);

        // The old connection is not cut: it is retired only at the age it was dialled for.
        assert!(old.alive.load(Ordering::SeqCst));
        tokio::time::sleep_until(dialled + AGE - MS).await;
        assert_eq!(dialer.retired(), 0, "retired before its age");
        tokio::time::sleep_until(dialled + AGE + MS).await;
        assert_eq!(dialer.retired(), 1, "not retired at its age");
        let (still, _) = get(&pool).await;
        assert!(same(&new, &still));
        assert_eq!(dialer.dials(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_certificate_that_changes_during_a_dial_costs_one_more_dial() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer.clone(), Duration::from_secs(3600));
        let first = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get(&peer()).await.expect("dial") })
        };
        // Mid-handshake: this dial may present either certificate, so it counts as the old.
        tokio::time::sleep(HANDSHAKE / 2).await;
        dialer.certificate.fetch_add(1, Ordering::SeqCst);
        let c1 = first.await.expect("task");
        let (c2, _) = get(&pool).await;
        assert!(!same(&c1, &c2));
        assert_eq!(dialer.dials(), 2);
        let (c3, _) = get(&pool).await;
        assert!(same(&c2, &c3));
        assert_eq!(dialer.dials(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_lists_only_usable_pooled_connections() {
        let dialer = FakeDialer::default();
        let pool = Pool::spawn(dialer, Duration::from_secs(60));
        let a = PeerKey {
            cluster: ClusterName::new("west").expect("valid"),
            addr: "127.0.0.1:1".parse().expect("addr"),
        };
        let b = PeerKey {
            cluster: ClusterName::new("north").expect("valid"),
            addr: "127.0.0.1:2".parse().expect("addr"),
        };
        assert!(pool.connections().await.is_empty());
        let conn_a = pool.get(&a).await.expect("dial a");
        pool.get(&b).await.expect("dial b");
        let mut listed: Vec<PeerKey> = pool
            .connections()
            .await
            .into_iter()
            .map(|l| l.peer)
            .collect();
        listed.sort();
        assert_eq!(listed, vec![b.clone(), a.clone()]);
        conn_a.alive.store(false, Ordering::SeqCst);
        let listed: Vec<PeerKey> = pool
            .connections()
            .await
            .into_iter()
            .map(|l| l.peer)
            .collect();
        assert_eq!(listed, vec![b]);
    }
}

//! Outbound: accept clients on VIP:port listeners and carry each connection to a local
//! endpoint or through a QUIC stream to a peer gateway.
//!
//! - The reconciler task owns the listeners: on every catalog or local-export change (and
//!   every few seconds, to retry binds that failed) it diffs [`route::desired_listeners`]
//!   against what is bound. A removed listener is closed at once (new connects are refused);
//!   connections it already accepted run to their end.
//! - Each client connection is one task: it asks the failover decision ([`steer`], over
//!   [`meshup_policy::decide`]) which clusters to try and in which order, attempts them, and
//!   reports every outcome back (outlier detection, circuit counts, the retry budget). What
//!   to do after a failed attempt is [`after_failure`], pure: nothing is retried once a peer
//!   may have passed a client byte on.
//! - [`liveness`] bounds the wait for a peer's answer by its RTT and skips peers that went
//!   silent, so a dead gateway costs new connections one bounded wait, not a QUIC idle
//!   timeout (docs/policy.md, "Fast failover"). A monitor task samples every pooled
//!   connection for proof of life and feeds each cluster's signal to the decision.
//! - [`pool`] keeps one QUIC connection per peer gateway; streams to a cluster with several
//!   gateways rotate across them.

pub mod changes;
pub mod http;
pub mod link_metrics;
pub mod liveness;
pub mod pool;
mod replay;
pub mod route;
pub mod steer;
mod streams;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use ipnet::IpNet;
use meshup_core::catalog::Snapshot;
use meshup_core::model::AppProtocol;
use meshup_core::names::ClusterName;
use meshup_core::tunnel::{RequestHeader, STATUS_LEN, Status, decode_status, encode_header};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use pool::{PeerKey, Pool, PoolError};
pub use route::{DesiredListeners, Listeners, Route, Serving, Target, desired_listeners, serving};
pub use steer::{ServiceMetrics, Steering};

use meshup_policy::Locality;

use crate::handover::{Kind, SocketSets};
use crate::inbound::{DrainReport, LocalExports, connect_tcp};
use crate::tunnel::metrics::Label;
use crate::tunnel::{
    self, CLOSE_RECYCLED, ConnectError, Endpoint, RESET_ABORT,
    splice::{splice, splice_result, splice_tcp},
};

/// How often the reconciler re-checks listeners even without a catalog change (retries
/// binds that failed, e.g. an address still held by a closing listener).
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(2);

/// Why one attempt at one candidate failed (the next candidate is tried).
#[derive(Debug, Error)]
enum AttemptError {
    #[error("no pooled connection: {0}")]
    Pool(#[from] PoolError),
    #[error("cannot open a stream: {0}")]
    Open(String),
    #[error("no answer to the header: {0}")]
    Answer(String),
    #[error("the peer sent nothing within {0:?} of the header: suspected dead")]
    Silent(Duration),
    #[error("peer answered {0}")]
    Refused(Status),
    #[error("no local endpoint accepted the connection")]
    LocalConnect,
    #[error("the client reset its connection before the peer answered")]
    ClientReset,
}

/// Most client bytes sent ahead of the peer's answer (see [`Early`]).
const EARLY_DATA_MAX: usize = 16 * 1024;

/// Client bytes read while waiting for a peer's answer. They go out right behind the header,
/// so a new connection's first request does not wait a round trip for `Connected`; they are
/// kept until a peer accepts, so a refusal can still be retried elsewhere with nothing lost.
/// A refusing peer never passes them on (its answer comes before any byte reaches a backend).
#[derive(Debug, Default)]
struct Early {
    bytes: Vec<u8>,
    /// The client half-closed before any peer answered.
    eof: bool,
}

/// The real pool dialer: QUIC through the gateway's endpoint. A completed handshake is
/// proof of life of the peer ([`liveness`]), told to the steering state.
#[derive(Debug, Clone)]
pub struct QuicDialer(pub Arc<Endpoint>, pub Arc<Steering>, pub Arc<ConnsInUse>);

impl pool::Dialer for QuicDialer {
    type Conn = quinn::Connection;

    fn dial(&self, peer: &PeerKey) -> BoxFuture<'static, Result<quinn::Connection, ConnectError>> {
        let endpoint = self.0.clone();
        let steering = self.1.clone();
        let peer = peer.clone();
        Box::pin(async move {
            let result = endpoint.connect(peer.addr, &peer.cluster).await;
            endpoint
                .metrics()
                .dialed(if result.is_ok() { "ok" } else { "error" });
            if result.is_ok() {
                let t = steering
                    .lock()
                    .liveness
                    .answered(&peer, std::time::Instant::now());
                steering.peer_transition(&peer, t);
            }
            result
        })
    }

    fn is_usable(conn: &quinn::Connection) -> bool {
        conn.close_reason().is_none()
    }

    fn same(a: &quinn::Connection, b: &quinn::Connection) -> bool {
        a.stable_id() == b.stable_id()
    }

    fn closed(conn: &quinn::Connection) -> BoxFuture<'static, ()> {
        let conn = conn.clone();
        Box::pin(async move {
            conn.closed().await;
        })
    }

    /// The peer closed with [`crate::tunnel::CLOSE_DRAINING`] or [`crate::tunnel::CLOSE_SHUTDOWN`].
    fn going_away(conn: &quinn::Connection) -> bool {
        matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == crate::tunnel::CLOSE_DRAINING
                    || close.error_code == crate::tunnel::CLOSE_SHUTDOWN
        )
    }

    /// A connection superseded by a rotation closes as soon as no stream uses it (quinn
    /// keeps it open otherwise: its keep-alives never let it idle out), and at `at` at the
    /// latest. Left open, each rotation would leave a connection behind until `at` (half a
    /// certificate's lifetime, hours): the 16th would meet the peer's
    /// `max_connections_per_cluster` and every new stream would be refused.
    fn retire_when_idle(self: Arc<Self>, conn: quinn::Connection, at: tokio::time::Instant) {
        tokio::spawn(async move {
            let id = conn.stable_id();
            let mut idle = IdleChecks::default();
            let mut tick = tokio::time::interval(IDLE_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = conn.closed() => return,
                    () = tokio::time::sleep_until(at) => {
                        pool::Dialer::retire(&*self, conn);
                        return;
                    }
                    _ = tick.tick() => {
                        if idle.observe(self.2.count(&id)) {
                            tracing::debug!(remote = %conn.remote_address(), "superseded connection idle; closing it");
                            conn.close(CLOSE_RECYCLED, b"superseded");
                            return;
                        }
                    }
                }
            }
        });
    }

    fn retire(&self, conn: quinn::Connection) {
        // Like a maximum connection duration elsewhere: no new streams from now on, the
        // open ones get the drain deadline, then the connection closes, so no connection
        // outlives its age (or its certificate's half-life) by more than that.
        let grace = self.0.config().drain_deadline;
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.closed() => {}
                _ = tokio::time::sleep(grace) => conn.close(CLOSE_RECYCLED, b"recycled"),
            }
        });
    }

    /// See [`connection_lifetime`]: rotated certificates are in use on every connection well
    /// before the old ones expire (docs/reliability.md promise 15).
    fn lifetime(&self, conn: &quinn::Connection) -> Option<Duration> {
        let peer = crate::tunnel::peer_identity_unchecked(conn)?;
        let own = self.0.identity().current().not_after;
        let own = own
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Some(connection_lifetime(
            (peer.not_before, peer.not_after),
            own,
            steer::unix_now(),
        ))
    }
}

/// Shortest time a pooled connection is handed out for: a dial per second at most.
pub const MIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(1);

/// How long a connection made `now` is handed out (all Unix seconds): half the peer
/// certificate's whole validity, and half of what is left of either certificate it was made
/// with — the peer's, and ours, at whose expiry the peer cuts the connection. Issuers
/// back-date `not_before` for clock skew (ours by 5 minutes), so the whole validity alone
/// would let a connection made with a 30-second certificate outlive it. At least
/// [`MIN_CONNECTION_LIFETIME`]. Pure.
pub fn connection_lifetime(peer: (i64, i64), own_not_after: i64, now: i64) -> Duration {
    let (not_before, not_after) = peer;
    let half = |secs: i64| secs.max(0) / 2;
    let secs = half(not_after - not_before)
        .min(half(not_after - now))
        .min(half(own_not_after - now));
    Duration::from_secs(u64::try_from(secs).unwrap_or(0)).max(MIN_CONNECTION_LIFETIME)
}

/// A live connection to a peer gateway, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    pub peer: PeerKey,
    /// quinn's smoothed RTT estimate.
    pub rtt: Duration,
    /// The path MTU (largest UDP payload) discovery has found so far.
    pub mtu: u16,
    /// Packets declared lost on this connection so far.
    pub lost_packets: u64,
    /// Packets sent on this connection so far (the base of a loss ratio).
    pub sent_packets: u64,
    /// Times the path MTU fell back to the minimum after losses of large packets.
    pub black_holes: u64,
    /// Tunnel streams open on it now: client connections carried to that peer.
    pub open_streams: usize,
    /// Time since its handshake: below half the peer certificate's lifetime and the
    /// configured maximum age (docs/reliability.md promise 15).
    pub age: Duration,
}

/// How often a superseded connection is checked for streams still using it.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Whether a superseded connection may close: no stream used it at two checks in a row,
/// [`IDLE_CHECK`] apart. One check is not enough: a caller handed the connection just before
/// it was superseded counts its stream a moment later. Pure.
#[derive(Debug, Default)]
struct IdleChecks {
    idle_before: bool,
}

impl IdleChecks {
    /// Records a check that found `in_use` streams; true when the connection may close.
    fn observe(&mut self, in_use: usize) -> bool {
        let idle = in_use == 0;
        let close = idle && self.idle_before;
        self.idle_before = idle;
        close
    }
}

/// Counts of live guards per key: a guard counts while it lives, however it ends.
#[derive(Debug)]
pub struct Counts<K: std::hash::Hash + Eq + Clone>(std::sync::Mutex<foldhash::HashMap<K, usize>>);

impl<K: std::hash::Hash + Eq + Clone> Default for Counts<K> {
    fn default() -> Self {
        Self(Default::default())
    }
}

impl<K: std::hash::Hash + Eq + Clone> Counts<K> {
    fn hold(self: &Arc<Self>, key: K) -> Counted<K> {
        *self.lock().entry(key.clone()).or_default() += 1;
        Counted {
            counts: self.clone(),
            key,
        }
    }

    fn count(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashMap<K, usize>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One guard of [`Counts`]; uncounted when dropped.
#[derive(Debug)]
struct Counted<K: std::hash::Hash + Eq + Clone> {
    counts: Arc<Counts<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Counted<K> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Streams (open or being opened) on each pooled QUIC connection, by `stable_id`: a
/// superseded connection closes once this is zero ([`QuicDialer`]).
pub type ConnsInUse = Counts<usize>;
/// One stream's use of a connection.
type InUse = Counted<usize>;

/// Tunnel streams open to each peer gateway, counted by the guards the connections hold.
type OpenStreams = Counts<PeerKey>;
/// One open tunnel stream to a peer.
type OpenStream = Counted<PeerKey>;

/// The running outbound proxy.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    endpoint: Arc<Endpoint>,
    local: ClusterName,
    steering: Arc<Steering>,
    exports: watch::Receiver<Arc<LocalExports>>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// The cluster's `vip_cidr`: listeners are only ever bound inside it.
    vip_range: IpNet,
    /// VIP listeners handed over by a predecessor (taken when bound) and the ones this
    /// process would hand to a successor.
    sockets: SocketSets,
    /// How requests of `http` and `grpc` ports are answered.
    http: http::HttpOptions,
    /// Set once a successor process serves this node: the listeners stay as they are
    /// (binding a new VIP here would race the successor for the address).
    frozen: std::sync::atomic::AtomicBool,
    pool: Pool<quinn::Connection>,
    connections: TaskTracker,
    stop_listeners: CancellationToken,
    bound: watch::Sender<imbl::OrdMap<SocketAddr, Route>>,
    /// The catalog revision the listeners were last reconciled with.
    reconciled: watch::Sender<i64>,
    rotation: AtomicUsize,
    next_request_id: AtomicU64,
    prepared: std::sync::Mutex<PreparedCache>,
    open_streams: Arc<OpenStreams>,
    /// Streams per pooled connection, shared with the pool's dialer.
    in_use: Arc<ConnsInUse>,
    /// Tunnel streams of the HTTP path kept for the next request ([`streams`]).
    http_streams: Arc<streams::Streams>,
    /// Requests of `http` and `grpc` ports waiting for their response, by client address.
    client_load: http::ClientLoad,
    /// Failovers and ejections as [`changes`] detects them.
    changes: tokio::sync::broadcast::Sender<changes::SteeringChange>,
}

/// Each route's [`steer::Prepared`] for the current catalog snapshot and local exports: a
/// new connection reuses it instead of reading the catalog again. A new snapshot drops only
/// the routes of the services whose steering inputs changed
/// ([`Snapshot::steering_changed_since`]), so catalog churn of one service does not make
/// every other service's next connection read the catalog again.
#[derive(Debug)]
struct RouteCache<V> {
    snapshot: Option<Arc<Snapshot>>,
    exports: Option<Arc<LocalExports>>,
    routes: foldhash::HashMap<Route, Arc<V>>,
}

impl<V> Default for RouteCache<V> {
    fn default() -> Self {
        Self {
            snapshot: None,
            exports: None,
            routes: foldhash::HashMap::default(),
        }
    }
}

type PreparedCache = RouteCache<steer::Prepared>;

impl<V> RouteCache<V> {
    /// `route`'s value for `snapshot` and `exports`: the cached one when its inputs did not
    /// change since it was made, else `make`'s.
    fn get_or_make(
        &mut self,
        snapshot: &Arc<Snapshot>,
        exports: &Arc<LocalExports>,
        route: &Route,
        make: impl FnOnce() -> V,
    ) -> Arc<V> {
        let same_exports = self
            .exports
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(e, exports));
        let same_snapshot = self
            .snapshot
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, snapshot));
        if !(same_exports && same_snapshot) {
            let changed = match &self.snapshot {
                Some(old) if same_exports => snapshot.steering_changed_since(old),
                _ => None,
            };
            match changed {
                Some(services) => {
                    let services: HashSet<&meshup_core::names::ServiceKey> =
                        services.iter().collect();
                    self.routes.retain(|r, _| !services.contains(&r.service));
                }
                None => self.routes.clear(),
            }
            self.snapshot = Some(snapshot.clone());
            self.exports = Some(exports.clone());
        }
        if let Some(v) = self.routes.get(route) {
            return v.clone();
        }
        let v = Arc::new(make());
        self.routes.insert(route.clone(), v.clone());
        v
    }
}

/// The route's prepared catalog view, from the cache or made now.
fn prepared(shared: &Shared, route: &Route) -> Arc<steer::Prepared> {
    let snapshot = shared.snapshots.borrow().clone();
    let exports = shared.exports.borrow().clone();
    let mut cache = shared.prepared.lock().unwrap_or_else(|e| e.into_inner());
    cache.get_or_make(&snapshot, &exports, route, || {
        shared.steering.prepare(
            &snapshot,
            &route.service,
            serving(&snapshot, &shared.local, &exports, route),
        )
    })
}

/// Where the proxy listens: the cluster's VIP range (listeners are only ever bound inside
/// it) and the listening sockets handed over by a predecessor process or kept for a
/// successor ([`crate::handover`]); and how requests of `http` and `grpc` ports are answered.
#[derive(Debug, Clone)]
pub struct VipListeners {
    pub range: IpNet,
    pub sockets: SocketSets,
    /// How requests of `http` and `grpc` ports are answered.
    pub http: http::HttpOptions,
}

impl Proxy {
    /// Starts the reconciler (which binds listeners as the catalog asks) until `shutdown`.
    /// `local` says where this gateway is (the default failover order starts there);
    /// `metrics` are the per-service metrics it counts into.
    pub fn spawn(
        endpoint: Arc<Endpoint>,
        local: Locality,
        exports: watch::Receiver<Arc<LocalExports>>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        listeners: VipListeners,
        metrics: ServiceMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let VipListeners {
            range: vip_range,
            sockets,
            http,
        } = listeners;
        let steering = Arc::new(Steering::new(local.clone(), metrics));
        let in_use = Arc::new(ConnsInUse::default());
        let pool = Pool::spawn(
            QuicDialer(endpoint.clone(), steering.clone(), in_use.clone()),
            endpoint.config().max_connection_age,
        );
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let inner = Arc::new(Shared {
            endpoint,
            local: local.cluster.clone(),
            steering,
            exports,
            snapshots,
            vip_range,
            sockets,
            http,
            frozen: Default::default(),
            pool,
            connections: TaskTracker::new(),
            stop_listeners: shutdown.child_token(),
            bound: watch::Sender::new(imbl::OrdMap::new()),
            reconciled: watch::Sender::new(-1),
            rotation: AtomicUsize::new(0),
            next_request_id: AtomicU64::new(seed << 16),
            prepared: Default::default(),
            open_streams: Default::default(),
            in_use,
            http_streams: streams::Streams::spawn(),
            client_load: Default::default(),
            changes: tokio::sync::broadcast::Sender::new(changes::CHANNEL_CAPACITY),
        });
        tokio::spawn(reconcile_loop(inner.clone()));
        tokio::spawn(monitor_peers(inner.clone()));
        let proxy = Self { inner };
        tokio::spawn(changes::run(
            proxy.clone(),
            proxy.inner.changes.clone(),
            shutdown.child_token(),
        ));
        proxy
    }

    /// Keeps the VIP listeners as they are from now on: a successor process on this node
    /// binds what the catalog adds (see [`crate::handover`]).
    pub fn freeze_listeners(&self) {
        self.inner.frozen.store(true, Ordering::Release);
    }

    /// Failovers and ejections from now on (see [`changes`]).
    pub fn watch_changes(&self) -> tokio::sync::broadcast::Receiver<changes::SteeringChange> {
        self.inner.changes.subscribe()
    }

    /// The listeners currently bound.
    pub fn listeners(&self) -> imbl::OrdMap<SocketAddr, Route> {
        self.inner.bound.borrow().clone()
    }

    /// Waits until the VIP listeners have been reconciled with a catalog of at least
    /// `revision` and every one of them is bound (for readiness: the VIPs of the synced
    /// catalog are served). A bind that fails (the address held by another socket, no
    /// descriptor left) keeps this waiting until a later reconcile binds it.
    pub async fn reconciled(&self, revision: i64) {
        let mut rx = self.inner.reconciled.subscribe();
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// Watches the bound listeners (for readiness: "every VIP is listening").
    pub fn watch_listeners(&self) -> watch::Receiver<imbl::OrdMap<SocketAddr, Route>> {
        self.inner.bound.subscribe()
    }

    /// Client connections currently being proxied.
    pub fn in_flight(&self) -> usize {
        self.inner.connections.len()
    }

    /// Live QUIC connections to peer gateways with their current RTT estimate.
    pub async fn links(&self) -> Vec<PeerLink> {
        self.inner
            .pool
            .connections()
            .await
            .into_iter()
            .map(|pool::Live { peer, conn, age }| {
                let path = conn.stats().path;
                PeerLink {
                    age,
                    rtt: conn.rtt(),
                    mtu: path.current_mtu,
                    lost_packets: path.lost_packets,
                    sent_packets: path.sent_packets,
                    black_holes: path.black_holes_detected,
                    open_streams: self.inner.open_streams.count(&peer),
                    peer,
                }
            })
            .collect()
    }

    /// The decision a new connection for `route` would get now, with the explanation of every
    /// cluster. Changes nothing (no retry-budget count, no availability observed).
    pub fn explain(
        &self,
        snapshot: &Snapshot,
        exports: &LocalExports,
        route: &Route,
    ) -> meshup_policy::Decision {
        let steering = &self.inner.steering;
        let prepared = steering.prepare(
            snapshot,
            &route.service,
            serving(snapshot, &self.inner.local, exports, route),
        );
        steering.explain(&route.service, &prepared)
    }

    /// [`explain`](Self::explain) for the current snapshot and exports, from the routes'
    /// prepared cache (the steering detector's looks, which ask for every service).
    pub fn explain_now(&self, route: &Route) -> meshup_policy::Decision {
        let prepared = prepared(&self.inner, route);
        self.inner.steering.explain(&route.service, &prepared)
    }

    /// The decision's live state (health, liveness) and the per-service metrics.
    pub fn steering(&self) -> &Steering {
        &self.inner.steering
    }

    /// QUIC dials made by the pool so far.
    pub fn dials(&self) -> u64 {
        self.inner.pool.dials()
    }

    /// Closes every listener (new connects are refused) and waits up to `deadline` for the
    /// connections in flight to finish.
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.inner.stop_listeners.cancel();
        self.inner.connections.close();
        let completed = tokio::time::timeout(deadline, self.inner.connections.wait())
            .await
            .is_ok();
        DrainReport {
            completed,
            remaining: self.inner.connections.len() as i64,
        }
    }
}

// === reconciler ===

struct Bound {
    route: Route,
    stop: CancellationToken,
}

async fn reconcile_loop(shared: Arc<Shared>) {
    let mut snapshots = shared.snapshots.clone();
    let mut exports = shared.exports.clone();
    let mut state = Reconciled::default();
    let mut warned = BTreeSet::new();
    // The snapshot last reconciled against, and whether the loop woke for a new snapshot
    // alone (not for this cluster's exports or the tick).
    let mut pruned: Option<Arc<Snapshot>> = None;
    let mut desired: Option<DesiredListeners> = None;
    let mut catalog_only = false;
    // Whether the last reconcile bound every listener it wanted.
    let mut complete = false;
    let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        // Catalog churn that changes no VIP, gateway, port or exporting cluster (endpoint
        // counts) changes no listener and no peer: skip the reconcile (docs/scale.md).
        let unchanged = catalog_only
            && pruned
                .as_ref()
                .is_some_and(|p| !p.addressing_differs(&snapshot));
        if !unchanged {
            // A new snapshot moves the desired set by what changed since the last one; the
            // tick and this cluster's exports rebuild it in full and compare every
            // listener, a safety net of a few milliseconds per RECONCILE_INTERVAL.
            let (set, touched) = match (desired.take(), &pruned) {
                (Some(mut set), Some(before)) if catalog_only => {
                    let touched = set.update(before, &snapshot, &shared.local, &shared.vip_range);
                    (set, touched)
                }
                _ => (
                    DesiredListeners::build(&snapshot, &shared.local, &shared.vip_range),
                    None,
                ),
            };
            let wanted = set.listeners();
            // Once per VIP while it stays out of range, not at every tick.
            for vip in wanted.outside.difference(&warned) {
                tracing::warn!(%vip, range = %shared.vip_range, "catalog VIP outside vip_cidr; not listening on it");
            }
            warned.clone_from(&wanted.outside);
            // The peer set changes only with the catalog, not at every tick.
            if pruned.as_ref().is_none_or(|p| !Arc::ptr_eq(p, &snapshot)) {
                shared.pool.retain(catalog_peers(&snapshot));
            }
            exports.borrow_and_update();
            complete = reconcile(&shared, &mut state, &wanted.routes, touched.as_ref());
            desired = Some(set);
        }
        pruned = Some(snapshot);
        let revision = pruned.as_ref().map_or(0, |s| s.revision);
        shared.reconciled.send_if_modified(|r| {
            if !complete {
                return false;
            }
            let newer = *r < revision;
            if newer {
                *r = revision;
            }
            newer
        });
        catalog_only = tokio::select! {
            _ = shared.stop_listeners.cancelled() => break,
            r = snapshots.changed() => if r.is_err() { break } else { true },
            r = exports.changed() => if r.is_err() { break } else { false },
            _ = tick.tick() => false,
        };
    }
    for (_, b) in std::mem::take(&mut state.bound) {
        b.stop.cancel();
    }
    shared.bound.send_replace(imbl::OrdMap::new());
    shared.endpoint.metrics().listeners.set(0);
}

/// Every (cluster, QUIC address) of every gateway the catalog lists.
fn catalog_peers(snapshot: &Snapshot) -> HashSet<PeerKey> {
    snapshot
        .clusters()
        .flat_map(|c| snapshot.gateways_of(c))
        .flat_map(|g| {
            g.quic_addrs.iter().map(|addr| PeerKey {
                cluster: g.cluster.clone(),
                addr: *addr,
            })
        })
        .collect()
}

/// How often every pooled connection is sampled for proof of life, and suspect peers probed.
pub const PEER_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Samples every pooled connection (datagrams received, RTT) so peers that went silent are
/// noticed and peers that came back are trusted again; asks the pool for a connection to each
/// suspect peer (it dials with backoff when the old connection closed), and hands each
/// cluster's signal to the decision.
async fn monitor_peers(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(PEER_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probing: HashSet<PeerKey> = HashSet::new();
    let (probed_tx, mut probed_rx) = tokio::sync::mpsc::unbounded_channel::<PeerKey>();
    loop {
        tokio::select! {
            _ = shared.stop_listeners.cancelled() => return,
            _ = tick.tick() => {}
        }
        while let Ok(peer) = probed_rx.try_recv() {
            probing.remove(&peer);
        }
        let conns = shared.pool.connections().await;
        let now = std::time::Instant::now();
        let mut transitions = Vec::new();
        let suspects: Vec<PeerKey> = {
            let mut st = shared.steering.lock();
            for pool::Live { peer, conn, .. } in &conns {
                let t = st.liveness.sample(
                    peer,
                    conn.stable_id(),
                    conn.stats().udp_rx.datagrams,
                    conn.rtt(),
                    now,
                );
                transitions.push((peer.clone(), t));
            }
            st.liveness.suspects().cloned().collect()
        };
        for (peer, t) in transitions {
            shared.steering.peer_transition(&peer, t);
        }
        for peer in suspects {
            if probing.insert(peer.clone()) {
                let pool = shared.pool.clone();
                let done = probed_tx.clone();
                tokio::spawn(async move {
                    // A new connection shows up in the next sample; a failure keeps it suspect.
                    let _ = pool.get(&peer).await;
                    let _ = done.send(peer);
                });
            }
        }
        let snapshot = shared.snapshots.borrow().clone();
        shared
            .steering
            .refresh_peers(&snapshot, &catalog_peers(&snapshot));
    }
}

/// The reconciler's listeners.
#[derive(Default)]
struct Reconciled {
    bound: BTreeMap<SocketAddr, Bound>,
    /// The routes of `bound`, as [`Outbound::listeners`] shows them (a persistent map:
    /// publishing it is a pointer copy).
    published: imbl::OrdMap<SocketAddr, Route>,
    /// Desired listeners whose bind failed: retried at every reconcile.
    unbound: BTreeSet<SocketAddr>,
}

/// Closes the listeners `desired` no longer has and binds the ones it adds, looking at the
/// `touched` addresses (and the ones that failed to bind before) or, with `None`, at every
/// one; returns whether every desired listener is bound (a frozen set counts as complete:
/// its successor binds).
fn reconcile(
    shared: &Arc<Shared>,
    state: &mut Reconciled,
    desired: &BTreeMap<SocketAddr, Route>,
    touched: Option<&BTreeSet<SocketAddr>>,
) -> bool {
    if shared.frozen.load(Ordering::Acquire) {
        return true;
    }
    let metrics = shared.endpoint.metrics();
    let Reconciled {
        bound,
        published,
        unbound,
    } = state;
    let mut changed = false;
    let mut close = |addr: &SocketAddr, b: &Bound| {
        tracing::info!(%addr, service = %b.route.service, "closing VIP listener");
        b.stop.cancel();
        shared.sockets.offer.remove(Kind::Vip, *addr);
        published.remove(addr);
        changed = true;
    };
    let candidates: Vec<SocketAddr> = match touched {
        None => {
            bound.retain(|addr, b| {
                let keep = desired.get(addr) == Some(&b.route);
                if !keep {
                    close(addr, b);
                }
                keep
            });
            desired
                .keys()
                .filter(|a| !bound.contains_key(*a))
                .copied()
                .collect()
        }
        Some(touched) => {
            for addr in touched {
                if let Some(b) = bound.get(addr)
                    && desired.get(addr) != Some(&b.route)
                {
                    close(addr, b);
                    bound.remove(addr);
                }
            }
            touched
                .union(unbound)
                .filter(|a| desired.contains_key(*a) && !bound.contains_key(*a))
                .copied()
                .collect()
        }
    };
    unbound.clear();
    for addr in candidates {
        let Some(route) = desired.get(&addr) else {
            continue;
        };
        match bind(addr, &shared.sockets) {
            Ok(listener) => {
                tracing::info!(%addr, service = %route.service, target = ?route.target, "VIP listener bound");
                let stop = shared.stop_listeners.child_token();
                tokio::spawn(accept_loop(
                    shared.clone(),
                    listener,
                    route.clone(),
                    stop.clone(),
                ));
                bound.insert(
                    addr,
                    Bound {
                        route: route.clone(),
                        stop,
                    },
                );
                published.insert(addr, route.clone());
                changed = true;
            }
            Err(e) => {
                // Retried at the next reconcile: a just-closed listener may still hold it.
                tracing::warn!(%addr, error = %e, "cannot bind VIP listener; will retry");
                metrics.listener_bind_failures.inc();
                unbound.insert(addr);
            }
        }
    }
    metrics.listeners.set(bound.len() as i64);
    metrics.listeners_unbound.set(unbound.len() as i64);
    if changed {
        shared.bound.send_replace(published.clone());
    }
    unbound.is_empty()
}

/// The VIP listener for `addr`: the one a predecessor handed over, or a new one. Either way
/// the offer set shares it, to hand it to a successor (one descriptor per listener).
fn bind(addr: SocketAddr, sockets: &SocketSets) -> std::io::Result<Arc<TcpListener>> {
    let listener = match sockets.inherited.take_tcp(Kind::Vip, addr) {
        Some(inherited) => {
            tracing::debug!(%addr, "VIP listener taken over");
            inherited.set_nonblocking(true)?;
            TcpListener::from_std(inherited)?
        }
        None => {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.set_nodelay(true)?;
            socket.bind(addr)?;
            socket.listen(1024)?
        }
    };
    let listener = Arc::new(listener);
    sockets.offer.add_shared(Kind::Vip, addr, listener.clone());
    Ok(listener)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: Arc<TcpListener>,
    route: Route,
    stop: CancellationToken,
) {
    let route = Arc::new(route);
    loop {
        let (tcp, client) = tokio::select! {
            // Lets go of the listener; it closes once the offer set lets go too (the
            // reconcile removes it there as it stops the loop).
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let shared2 = shared.clone();
        let route = route.clone();
        // Read per connection, so a port that changes protocol needs no new listener.
        let app = app_protocol(&shared.snapshots.borrow(), &route);
        if app.per_request() {
            shared
                .connections
                .spawn(http::serve(shared2, tcp, client, route, app));
        } else {
            shared
                .connections
                .spawn(handle_client(shared2, tcp, client, route));
        }
    }
}

/// How the route's port is served: its `app_protocol` in the catalog (an unknown one is
/// served as `tcp`).
fn app_protocol(snapshot: &Snapshot, route: &Route) -> AppProtocol {
    snapshot
        .service(&route.service)
        .and_then(|v| v.ports.iter().find(|p| p.port == route.port))
        .map_or(AppProtocol::Tcp, |p| p.app_protocol)
}

// === one client connection ===

async fn handle_client(shared: Arc<Shared>, tcp: TcpStream, client: SocketAddr, route: Arc<Route>) {
    let request_id = shared.next_request_id.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("outbound", id = request_id, %client, service = %route.service, port = route.port);
    async move {
        let metrics = shared.endpoint.metrics().clone();
        let steering = &shared.steering;
        let service = &route.service;
        let plan = steering.plan(service, prepared(&shared, &route));
        if plan.decision.order.is_empty() {
            tracing::debug!(explanations = ?plan.decision.explanations, "no cluster can serve this connection");
        }
        let header = RequestHeader {
            request_id,
            service: service.clone(),
            port: route.port,
            caller: shared.local.clone(),
        };
        let sm = &steering.metrics;
        // Label values are shared text (see `tunnel::metrics::Label`): no allocation here.
        let labels = plan.prepared.labels();
        let pair = |cluster: &ClusterName| labels.to(Label::from(cluster));
        let counted = |cluster: Option<&ClusterName>, result: &'static str| {
            plan.prepared.count_connection(sm, cluster, result);
        };
        let failed_attempt = |cluster: &ClusterName, reason: &'static str| {
            sm.attempt_failures
                .get_or_create(&labels.result(Label::from(cluster), reason))
                .inc();
        };
        // The last failure names the stream's result if nothing connects; with no attempt at
        // all, an open circuit is the reason if the decision left a cluster out for one.
        let mut result = if plan.circuit_open().next().is_some() {
            "circuit_open"
        } else {
            "no_route"
        };
        let mut tcp = tcp;
        let mut early = Early::default();
        let max_attempts = plan.decision.max_attempts.max(1) as usize;
        let mut attempts = 0;
        let targets: Vec<(&ClusterName, &Target)> = plan.targets().collect();
        for (i, &(cluster, target)) in targets.iter().enumerate() {
            if attempts == max_attempts {
                break;
            }
            // Whether another cluster could still be tried after this one: if not, a peer that
            // is only slow (its path's RTT just grew) must not be given up on early.
            let more_after = i + 1 < targets.len() && attempts + 1 < max_attempts;
            {
                let mut st = steering.lock();
                if attempts > 0 && !st.health.take_retry(service, &plan.policy().retry, std::time::Instant::now()) {
                    drop(st);
                    tracing::debug!(%cluster, "retry budget spent; not retrying");
                    sm.retry_budget_exhausted.get_or_create(labels).inc();
                    result = "retry_budget";
                    break;
                }
                if let Err((active, pending)) = st.health.try_start(service, cluster, &plan.policy().circuit) {
                    drop(st);
                    tracing::debug!(%cluster, active, pending, "circuit open; next candidate");
                    sm.circuit_open.get_or_create(&pair(cluster)).inc();
                    result = "circuit_open";
                    continue;
                }
            }
            if attempts > 0 {
                sm.retries.get_or_create(&pair(cluster)).inc();
            }
            attempts += 1;
            let mut guard = metrics.stream("outbound", labels.source_cluster.clone(), Label::from(cluster));
            let attempt = match target {
                Target::Local { endpoints, .. } => attempt_local(&shared, endpoints, tcp, &early).await,
                Target::Remote { gateways } => {
                    attempt_remote(&shared, cluster, gateways, &header, Some(tcp), &mut early, more_after)
                        .await
                }
            };
            match attempt {
                Attempt::Connected(conn) => {
                    steering.lock().health.attempt_finished(service, cluster, true);
                    steering.record(service, cluster, &plan, true);
                    counted(Some(cluster), "connected");
                    let idle = shared.endpoint.config().stream_idle_timeout;
                    let out = match conn {
                        Connected::Local { tcp, up } => splice_tcp(tcp, up, idle).await,
                        Connected::Remote { tcp: Some(tcp), send, recv, _open, _in_use, .. } => splice(tcp, send, recv, &[], idle).await,
                        // A connection attempt always carries its client.
                        Connected::Remote { tcp: None, .. } => return,
                    };
                    steering.lock().health.connection_ended(service, cluster);
                    let sent = out.tcp_to_quic + early.bytes.len() as u64;
                    guard.add_bytes(sent, out.quic_to_tcp);
                    guard.set_result(splice_result(&out));
                    return;
                }
                Attempt::Failed { tcp: back, result: r, cluster_failed, stop } => {
                    steering.lock().health.attempt_finished(service, cluster, false);
                    if cluster_failed {
                        steering.record(service, cluster, &plan, false);
                    }
                    failed_attempt(cluster, r);
                    guard.set_result(r);
                    drop(guard);
                    result = r;
                    match (back, stop) {
                        (Some(t), false) => tcp = t,
                        (back, _) => {
                            counted(Some(cluster), r);
                            if let Some(t) = back {
                                reset_tcp(t);
                            }
                            return;
                        }
                    }
                }
            }
        }
        counted(None, result);
        reset_tcp(tcp);
    }
    .instrument(span)
    .await;
}

/// A connection that reached its upstream.
enum Connected {
    Local {
        tcp: TcpStream,
        up: TcpStream,
    },
    Remote {
        /// The client connection (`None` for a request of the HTTP path, [`http`]).
        tcp: Option<TcpStream>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        /// Counts the stream as open to its peer until the splice ends.
        _open: OpenStream,
        /// Keeps its connection from closing as superseded until the splice ends.
        _in_use: InUse,
        /// The gateway that took the stream.
        peer: PeerKey,
        /// Whether that gateway speaks `meshup/1.1` ([`tunnel::speaks_1_1`]).
        speaks_1_1: bool,
    },
}

/// How one attempt at one cluster ended.
enum Attempt {
    Connected(Connected),
    Failed {
        /// The client connection, unless it is gone.
        tcp: Option<TcpStream>,
        result: &'static str,
        /// Whether the failure says the cluster cannot serve (for outlier detection); a client
        /// that went away or a request nobody would accept says nothing of the cluster.
        cluster_failed: bool,
        /// Whether the connection ends here (no retry elsewhere).
        stop: bool,
    },
}

async fn attempt_local(
    shared: &Shared,
    eps: &[SocketAddr],
    tcp: TcpStream,
    early: &Early,
) -> Attempt {
    match connect_local(shared, eps).await {
        Ok(mut up) => {
            // Bytes a refusing remote peer did not pass on go first. A client FIN seen
            // meanwhile is read again from the socket by the splice.
            if up.write_all(&early.bytes).await.is_err() {
                return Attempt::Failed {
                    tcp: Some(tcp),
                    result: "error",
                    cluster_failed: false,
                    stop: true,
                };
            }
            Attempt::Connected(Connected::Local { tcp, up })
        }
        Err(e) => {
            tracing::debug!(error = %e, "local endpoints failed");
            Attempt::Failed {
                tcp: Some(tcp),
                result: "unreachable",
                cluster_failed: true,
                stop: false,
            }
        }
    }
}

/// Tries the cluster's gateways in rotation (suspect ones last, skipped while others are
/// left), each address in order, as [`after_failure`] says. `more_after`: whether another
/// cluster may be tried after this one. `tcp`: the client connection whose first bytes go
/// out early ([`open_tunnel`]); `None` for a request of the HTTP path.
async fn attempt_remote(
    shared: &Shared,
    cluster: &ClusterName,
    gateways: &[Vec<SocketAddr>],
    header: &RequestHeader,
    mut tcp: Option<TcpStream>,
    early: &mut Early,
    more_after: bool,
) -> Attempt {
    let start = shared.rotation.fetch_add(1, Ordering::Relaxed);
    let order = attempt_order(gateways, start);
    let mut result = "unreachable";
    let mut answered = None;
    let order: Vec<(usize, SocketAddr)> = {
        let st = shared.steering.lock();
        let peer = |addr: SocketAddr| PeerKey {
            cluster: cluster.clone(),
            addr,
        };
        let (live, suspect): (Vec<_>, Vec<_>) = order
            .into_iter()
            .partition(|(_, a)| !st.liveness.is_suspect(&peer(*a)));
        if live.is_empty() { suspect } else { live }
    };
    let count = order.len();
    for (k, (i, addr)) in order.into_iter().enumerate() {
        if answered == Some(i) {
            continue;
        }
        let peer = PeerKey {
            cluster: cluster.clone(),
            addr,
        };
        tracing::trace!(%peer, "attempt");
        let last = !more_after && k + 1 == count;
        let failed = match open_tunnel(shared, &peer, header, tcp.as_mut(), early, last).await {
            Ok(Opened {
                send,
                recv,
                in_use: _in_use,
                speaks_1_1,
            }) => {
                let _open = shared.open_streams.hold(peer.clone());
                return Attempt::Connected(Connected::Remote {
                    tcp,
                    send,
                    recv,
                    _open,
                    _in_use,
                    peer,
                    speaks_1_1,
                });
            }
            Err(f) => f,
        };
        match after_failure(&failed.error, failed.sent_client_bytes) {
            AfterFailure::Stop {
                result,
                reset_client,
            } => {
                tracing::debug!(%peer, error = %failed.error, "attempt failed; not retrying");
                let cluster_failed = !matches!(
                    failed.error,
                    AttemptError::ClientReset | AttemptError::Refused(Status::BadRequest)
                );
                return Attempt::Failed {
                    tcp: tcp.filter(|_| reset_client),
                    result,
                    cluster_failed,
                    stop: true,
                };
            }
            AfterFailure::NextGateway { result: r } => {
                tracing::debug!(%peer, error = %failed.error, "gateway refused or lost; trying the next");
                answered = Some(i);
                result = r;
            }
            AfterFailure::NextAddress { result: r } => {
                tracing::debug!(%peer, error = %failed.error, "address unreachable; trying the next");
                result = r;
            }
        }
    }
    Attempt::Failed {
        tcp,
        result,
        cluster_failed: true,
        stop: false,
    }
}

/// The order of attempts within one remote cluster: each gateway once, the first choice
/// rotating with `start` so streams spread across the cluster's gateways, and for each gateway
/// its advertised addresses in order. Yields (gateway index, address).
fn attempt_order(gateways: &[Vec<SocketAddr>], start: usize) -> Vec<(usize, SocketAddr)> {
    let n = gateways.len();
    (0..n)
        .flat_map(|k| {
            let i = (start + k) % n;
            gateways[i].iter().map(move |addr| (i, *addr))
        })
        .collect()
}

/// What a failed attempt means for the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    /// Give up with this stream result; reset the client unless it is already gone.
    Stop {
        result: &'static str,
        reset_client: bool,
    },
    /// The gateway answered or took the stream, so its other addresses would answer the
    /// same: try the next gateway.
    NextGateway { result: &'static str },
    /// The address could not be reached: try the gateway's next address, then the next gateway.
    NextAddress { result: &'static str },
}

/// Retry or stop after `error`, given whether client bytes went out with the attempt (pure).
/// Nothing is retried once a peer may have passed client bytes on (RELIABILITY 10 in
/// docs/reliability.md): a lost answer after early bytes resets the client instead.
fn after_failure(error: &AttemptError, early_bytes_sent: bool) -> AfterFailure {
    match error {
        AttemptError::ClientReset => AfterFailure::Stop {
            result: "reset",
            reset_client: false,
        },
        AttemptError::Refused(status) if !status.retry_elsewhere() => AfterFailure::Stop {
            result: status.as_str(),
            reset_client: true,
        },
        AttemptError::Answer(_) | AttemptError::Silent(_) if early_bytes_sent => {
            AfterFailure::Stop {
                result: "unreachable",
                reset_client: true,
            }
        }
        AttemptError::Refused(status) => AfterFailure::NextGateway {
            result: status.as_str(),
        },
        AttemptError::Answer(_) => AfterFailure::NextGateway {
            result: "unreachable",
        },
        // A silent peer's other addresses reach the same dead process, and so do a
        // departing one's.
        AttemptError::Silent(_) => AfterFailure::NextGateway { result: "silent" },
        AttemptError::Pool(PoolError::GoingAway { .. } | PoolError::Draining { .. }) => {
            AfterFailure::NextGateway { result: "draining" }
        }
        AttemptError::Pool(_) | AttemptError::Open(_) | AttemptError::LocalConnect => {
            AfterFailure::NextAddress {
                result: "unreachable",
            }
        }
    }
}

async fn connect_local(shared: &Shared, eps: &[SocketAddr]) -> Result<TcpStream, AttemptError> {
    let start = shared.rotation.fetch_add(1, Ordering::Relaxed);
    for i in 0..eps.len().min(3) {
        let ep = eps[(start + i) % eps.len()];
        if let Some(s) = connect_tcp(ep, shared.endpoint.config().connect_timeout).await {
            return Ok(s);
        }
    }
    Err(AttemptError::LocalConnect)
}

/// A failed attempt at one peer, and whether client bytes went out with it.
#[derive(Debug)]
struct Failed {
    error: AttemptError,
    sent_client_bytes: bool,
}

impl From<AttemptError> for Failed {
    fn from(error: AttemptError) -> Self {
        Self {
            error,
            sent_client_bytes: false,
        }
    }
}

/// Opens a stream to `peer`, sends the header and waits for `Connected`, reading client bytes
/// meanwhile (up to [`EARLY_DATA_MAX`], kept in `early`). They go out right behind the header
/// only to a peer with fresh proof of life ([`liveness`]); otherwise they follow the answer.
/// The wait for the answer is bounded by the peer's RTT: a peer that sends nothing at all in
/// that time is suspected dead and the attempt abandoned; one that is alive gets up to the
/// configured answer timeout. The `last` attempt of a connection (nowhere else to go) gets
/// the answer timeout in any case: giving up early there gains nothing and would fail a
/// connection to a live peer whose path just got slower than its smoothed RTT says (a route
/// change, a queue filling up: tests/tests/link_faults.rs).
async fn open_tunnel(
    shared: &Shared,
    peer: &PeerKey,
    header: &RequestHeader,
    mut tcp: Option<&mut TcpStream>,
    early: &mut Early,
    last: bool,
) -> Result<Opened, Failed> {
    let steering = &shared.steering;
    let conn = match shared.pool.get(peer).await {
        Ok(c) => c,
        Err(e) => {
            // A gateway that refused a stream draining answered: it is alive, and only held
            // back by the pool for a while (invariant 7), so it is not suspected.
            if !matches!(e, PoolError::Closed | PoolError::Draining { .. }) {
                let t = steering
                    .lock()
                    .liveness
                    .suspect(peer, std::time::Instant::now());
                // A gateway going away said so (the pool logged it): new connections skip
                // it all the same, but it is not reported as silent.
                if !matches!(e, PoolError::GoingAway { .. }) {
                    steering.peer_transition(peer, t);
                }
            }
            return Err(AttemptError::Pool(e).into());
        }
    };
    // Counted from the moment the pool handed the connection out, so a rotation that
    // supersedes it meanwhile does not close it under this stream.
    let in_use = shared.in_use.hold(conn.stable_id());
    let cap = shared.endpoint.config().answer_timeout();
    let (early_ok, wait) = {
        let st = steering.lock();
        (
            st.liveness.early_allowed(peer, std::time::Instant::now()),
            st.liveness.answer_wait(peer, cap),
        )
    };
    // quinn waits silently while the peer's stream limit is reached; bound the wait so the
    // connection moves on to another gateway or cluster (no client byte was sent yet).
    let (mut send, mut recv) = tokio::time::timeout(cap, conn.open_bi())
        .await
        .map_err(|_| AttemptError::Open(format!("no stream credit from {peer} within {cap:?}")))?
        .map_err(|e| AttemptError::Open(e.to_string()))?;
    let received_before = conn.stats().udp_rx.datagrams;
    let mut sent_client_bytes = false;
    let answer = |e: quinn::WriteError| AttemptError::Answer(e.to_string());
    let outcome = {
        let sent = &mut sent_client_bytes;
        let exchange = async {
            let mut first = encode_header(header);
            if early_ok {
                first.extend_from_slice(&early.bytes);
                *sent = !early.bytes.is_empty();
            }
            send.write_all(&first).await.map_err(answer)?;
            let mut status = [0u8; STATUS_LEN];
            let mut got = 0;
            let mut chunk = vec![0u8; EARLY_DATA_MAX];
            // A refusing peer stops our sending side right after its answer, so a failed
            // write here only ends the early bytes: the answer (read next) says what happened.
            let mut sending = true;
            while got < STATUS_LEN {
                let room = EARLY_DATA_MAX - early.bytes.len();
                tokio::select! {
                    // Both reads are cancel-safe: a read that loses the race consumed nothing.
                    r = recv.read(&mut status[got..]) => match r {
                        Ok(Some(n)) => got += n,
                        Ok(None) => return Err(AttemptError::Answer("stream finished".into())),
                        Err(e) => return Err(AttemptError::Answer(e.to_string())),
                    },
                    r = read_client(tcp.as_deref_mut(), &mut chunk[..room]), if sending && !early.eof && room > 0 => match r {
                        Ok(0) => early.eof = true,
                        Ok(n) => {
                            early.bytes.extend_from_slice(&chunk[..n]);
                            if early_ok {
                                *sent = true;
                                sending = send.write_all(&chunk[..n]).await.is_ok();
                            }
                        }
                        Err(_) => return Err(AttemptError::ClientReset),
                    },
                }
            }
            let status = decode_status(&status).map_err(|e| AttemptError::Answer(e.to_string()))?;
            Ok((status, sending))
        };
        tokio::pin!(exchange);
        let silent = || conn.stats().udp_rx.datagrams == received_before;
        match tokio::time::timeout(wait, &mut exchange).await {
            Ok(r) => Some(r),
            // Nothing at all from the peer since the header, and somewhere else to go:
            // suspect it, move on.
            Err(_) if silent() && !last => None,
            // Alive, just slow to answer (its backend is slow to accept), or the last
            // chance: wait on.
            Err(_) => match tokio::time::timeout(cap.saturating_sub(wait), &mut exchange).await {
                Ok(r) => Some(r),
                Err(_) if silent() => None,
                Err(_) => Some(Err(AttemptError::Answer(format!(
                    "timed out after {cap:?}"
                )))),
            },
        }
    };
    let fail = |error: AttemptError,
                sent_client_bytes: bool,
                send: &mut quinn::SendStream,
                recv: &mut quinn::RecvStream| {
        let _ = send.reset(RESET_ABORT);
        let _ = recv.stop(RESET_ABORT);
        Failed {
            error,
            sent_client_bytes,
        }
    };
    let (status, sent_all) = match outcome {
        Some(Ok(s)) => s,
        Some(Err(e)) => return Err(fail(e, sent_client_bytes, &mut send, &mut recv)),
        None => {
            let t = steering
                .lock()
                .liveness
                .suspect(peer, std::time::Instant::now());
            steering.peer_transition(peer, t);
            return Err(fail(
                AttemptError::Silent(if last { cap } else { wait }),
                sent_client_bytes,
                &mut send,
                &mut recv,
            ));
        }
    };
    let t = steering
        .lock()
        .liveness
        .answered(peer, std::time::Instant::now());
    steering.peer_transition(peer, t);
    if status != Status::Connected {
        if status == Status::Draining {
            shared.pool.refused_draining(peer, conn.clone());
        }
        return Err(fail(
            AttemptError::Refused(status),
            sent_client_bytes,
            &mut send,
            &mut recv,
        ));
    }
    if !sent_all {
        // Accepted, yet some early bytes did not go out: the stream is broken, and the
        // peer may already have passed the rest on, so this ends without a retry.
        return Err(fail(
            AttemptError::Answer("the stream failed while sending the client's first bytes".into()),
            sent_client_bytes,
            &mut send,
            &mut recv,
        ));
    }
    if !early_ok && !early.bytes.is_empty() {
        // Held back until the answer: they go first now.
        if let Err(e) = send.write_all(&early.bytes).await {
            // Some may have gone out: no retry.
            return Err(fail(
                AttemptError::Answer(e.to_string()),
                true,
                &mut send,
                &mut recv,
            ));
        }
    }
    if early.eof {
        // The client's FIN came before the answer: pass it on now (splice reads EOF again
        // from the socket, and finishing twice is harmless).
        let _ = send.finish();
    }
    Ok(Opened {
        send,
        recv,
        in_use,
        speaks_1_1: tunnel::speaks_1_1(&conn),
    })
}

/// A stream the peer accepted ([`open_tunnel`]).
struct Opened {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    in_use: InUse,
    /// Whether the peer speaks `meshup/1.1` ([`tunnel::speaks_1_1`]).
    speaks_1_1: bool,
}

/// Reads the client's next bytes; with no client (a request of the HTTP path), never ready.
/// Cancel-safe, as `TcpStream::read` is.
async fn read_client(tcp: Option<&mut TcpStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match tcp {
        Some(t) => t.read(buf).await,
        None => std::future::pending().await,
    }
}

fn reset_tcp(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which cached routes a new snapshot or new local exports keep: after each kind of
    /// change, the routes of the services it changed are made again, the others kept; after
    /// new local exports, all are made again.
    #[test]
    fn the_route_cache_keeps_the_routes_a_change_did_not_touch() {
        use meshup_core::fixture;
        let route = |svc: &str| Route {
            service: fixture::service(svc),
            port: 8080,
            target: None,
        };
        let services = ["pay.prod", "db.prod"];
        let base = Arc::new(fixture::steering_base());
        let exports = Arc::new(LocalExports::new());
        for new_exports in [false, true] {
            for case in fixture::steering_cases() {
                let mut cache: RouteCache<u32> = RouteCache::default();
                for svc in services {
                    cache.get_or_make(&base, &exports, &route(svc), || 1);
                }
                let next = Arc::new(case.applied_to(&base));
                let exports = if new_exports {
                    Arc::new(LocalExports::new())
                } else {
                    exports.clone()
                };
                let made =
                    services.map(|svc| *cache.get_or_make(&next, &exports, &route(svc), || 2) == 2);
                let want = services.map(|svc| {
                    new_exports || case.changed.as_ref().is_none_or(|c| c.contains(&svc))
                });
                assert_eq!(made, want, "{}, new exports: {new_exports}", case.what);
            }
        }
    }

    #[test]
    fn a_superseded_connection_closes_after_two_idle_checks_in_a_row() {
        // (streams in use at each check, whether that check closes it)
        let table: &[(&str, &[(usize, bool)])] = &[
            ("idle from the start", &[(0, false), (0, true)]),
            (
                "in use, then done",
                &[(2, false), (1, false), (0, false), (0, true)],
            ),
            (
                "a stream counted between two idle checks",
                &[(0, false), (1, false), (0, false), (0, true)],
            ),
            ("never idle", &[(1, false), (1, false), (3, false)]),
        ];
        for (what, checks) in table {
            let mut idle = IdleChecks::default();
            for (i, &(in_use, closes)) in checks.iter().enumerate() {
                assert_eq!(idle.observe(in_use), closes, "{what}: check {i}");
            }
        }
    }

    #[test]
    fn streams_are_counted_per_connection_until_their_guards_drop() {
        let conns = Arc::new(ConnsInUse::default());
        let guard = |id| conns.hold(id);
        let a1 = guard(1);
        let a2 = guard(1);
        let b = guard(2);
        assert_eq!(
            (conns.count(&1), conns.count(&2), conns.count(&3)),
            (2, 1, 0)
        );
        drop(a1);
        drop(b);
        assert_eq!((conns.count(&1), conns.count(&2)), (1, 0));
        drop(a2);
        assert_eq!(conns.count(&1), 0);
        assert!(conns.lock().is_empty(), "no entry left behind");
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    #[test]
    fn connections_live_half_of_the_shortest_certificate_validity_left() {
        const NOW: i64 = 1_000_000;
        // (peer not_before, peer not_after, own not_after) relative to NOW → seconds.
        let cases = [
            // A day-long peer certificate issued now, ours as long: half its lifetime.
            ((0, 86_400), 86_400, 43_200),
            // Back-dated by 5 minutes, 30 s left: half of what is left, not of 330 s.
            ((-300, 30), 30, 15),
            // Our certificate expires first: the peer cuts at its expiry, so half of ours.
            ((0, 3_600), 600, 300),
            // The peer's certificate is old: half of what is left of it.
            ((-3_000, 600), 86_400, 300),
            // (Nearly) expired: never below the floor, so no dial storm.
            ((-300, 1), 86_400, 1),
            ((-300, -5), -5, 1),
        ];
        for ((nb, na), own, want) in cases {
            assert_eq!(
                connection_lifetime((NOW + nb, NOW + na), NOW + own, NOW),
                Duration::from_secs(want),
                "peer ({nb}, {na}), own {own}"
            );
        }
    }

    #[test]
    fn attempts_rotate_gateways_and_keep_each_gateways_addresses_in_order() {
        let gateways = vec![
            vec![addr(1), addr(2)],
            vec![addr(3)],
            vec![addr(4), addr(5)],
        ];
        let table: [(usize, Vec<(usize, u16)>); 4] = [
            (0, vec![(0, 1), (0, 2), (1, 3), (2, 4), (2, 5)]),
            (1, vec![(1, 3), (2, 4), (2, 5), (0, 1), (0, 2)]),
            (2, vec![(2, 4), (2, 5), (0, 1), (0, 2), (1, 3)]),
            (4, vec![(1, 3), (2, 4), (2, 5), (0, 1), (0, 2)]),
        ];
        for (start, want) in table {
            let got: Vec<(usize, u16)> = attempt_order(&gateways, start)
                .into_iter()
                .map(|(i, a)| (i, a.port()))
                .collect();
            assert_eq!(got, want, "start {start}");
        }
        assert!(attempt_order(&[], 3).is_empty());
    }

    #[test]
    fn a_failure_is_retried_only_while_no_peer_can_have_passed_client_bytes_on() {
        use AfterFailure::*;
        let refused = |s| AttemptError::Refused(s);
        let lost = || AttemptError::Answer("connection lost".into());
        let table: Vec<(AttemptError, bool, AfterFailure)> = vec![
            // Unreachable before anything was sent: the next address of the same gateway.
            (
                AttemptError::Open("closed".into()),
                false,
                NextAddress {
                    result: "unreachable",
                },
            ),
            (
                AttemptError::Open("closed".into()),
                true,
                NextAddress {
                    result: "unreachable",
                },
            ),
            (
                AttemptError::LocalConnect,
                false,
                NextAddress {
                    result: "unreachable",
                },
            ),
            // A refusal comes before any byte reaches a backend: the next gateway, early
            // bytes or not.
            (
                refused(Status::NoEndpoints),
                false,
                NextGateway {
                    result: "no_endpoints",
                },
            ),
            (
                refused(Status::Draining),
                true,
                NextGateway { result: "draining" },
            ),
            (
                AttemptError::Pool(PoolError::GoingAway {
                    peer: "east@127.0.0.1:1".into(),
                }),
                false,
                NextGateway { result: "draining" },
            ),
            (
                AttemptError::Pool(PoolError::Draining {
                    peer: "east@127.0.0.1:1".into(),
                }),
                false,
                NextGateway { result: "draining" },
            ),
            (
                refused(Status::Forbidden),
                true,
                NextGateway {
                    result: "forbidden",
                },
            ),
            (
                refused(Status::ConnectFailed),
                false,
                NextGateway {
                    result: "connect_failed",
                },
            ),
            (
                refused(Status::UnknownService),
                false,
                NextGateway {
                    result: "unknown_service",
                },
            ),
            // A request every peer would refuse the same way: stop.
            (
                refused(Status::BadRequest),
                false,
                Stop {
                    result: "bad_request",
                    reset_client: true,
                },
            ),
            // A lost answer: retried only if no client byte went out with the attempt.
            (
                lost(),
                false,
                NextGateway {
                    result: "unreachable",
                },
            ),
            (
                lost(),
                true,
                Stop {
                    result: "unreachable",
                    reset_client: true,
                },
            ),
            // The client is gone: nothing to retry, nobody to reset.
            (
                AttemptError::ClientReset,
                false,
                Stop {
                    result: "reset",
                    reset_client: false,
                },
            ),
        ];
        for (error, early, want) in table {
            assert_eq!(
                after_failure(&error, early),
                want,
                "{error} (early bytes sent: {early})"
            );
        }
    }
}

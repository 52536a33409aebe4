//! Inbound: serve peers' tunnel streams to local endpoints.
//!
//! Accept loop (one task): caps handshakes in progress at `max_handshakes`, asks unvalidated
//! clients for a Retry once half of that is in use (address validation under load), and
//! refuses everything while draining. Per connection (one task): reads the caller's cluster
//! from its certificate, then accepts streams. Per stream (one task): header under a
//! timeout → authorization → endpoint choice (power of two choices on in-flight streams) →
//! TCP connect under a timeout → one status answer → splice.
//!
//! Every answer other than `Connected` is sent before any byte reaches a backend, so the
//! caller may retry elsewhere.

mod balance;
mod http;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use meshup_core::names::{ClusterName, ServiceKey};
use meshup_core::tunnel::{
    DecodeError, MAX_HEADER_LEN, RequestHeader, Status, decode_header, encode_status,
};
use quinn::{RecvStream, SendStream};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use balance::Balancer;
pub use balance::pick_two;

use crate::tunnel::metrics::Label;
use crate::tunnel::{
    self, Endpoint, RESET_ABORT,
    splice::{splice, splice_result},
};

/// One service this gateway serves to the federation, from the gateway's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalExport {
    pub service: ServiceKey,
    /// Service ports peers may ask for (the port number is the same on the endpoints).
    pub ports: Vec<u16>,
    /// Local endpoints (IP:port pairs are built from these IPs and the requested port when
    /// the port differs — see [`LocalExport::endpoint_addrs`]).
    pub endpoints: Vec<SocketAddr>,
    /// Callers allowed; empty means every cluster of the federation.
    pub allowed_callers: Vec<ClusterName>,
    /// Of `ports`, those whose `app_protocol` is `http` or `grpc`: their streams are served
    /// as HTTP over pooled endpoint connections ([`http`]).
    pub http_ports: Vec<u16>,
    /// Of `http_ports`, those whose endpoints speak only HTTP/1.1 (`endpoint_protocol:
    /// http1`): every request reaches them as HTTP/1.1 ([`http`]).
    pub http1_ports: Vec<u16>,
}

impl LocalExport {
    /// Whether `caller` may use this export.
    pub fn allows(&self, caller: &ClusterName) -> bool {
        self.allowed_callers.is_empty() || self.allowed_callers.contains(caller)
    }

    /// The endpoints to connect to for service `port`: endpoints whose port equals `port`,
    /// or, if the export lists single-port endpoints with another port (a service port
    /// mapped to a target port), all of them as listed.
    pub fn endpoint_addrs(&self, port: u16) -> Vec<SocketAddr> {
        let exact: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .copied()
            .filter(|e| e.port() == port)
            .collect();
        if exact.is_empty() && self.ports.len() == 1 {
            self.endpoints.clone()
        } else {
            exact
        }
    }
}

/// The local exports, keyed by service. Published through a `watch` so config reloads apply
/// to new streams without restarting anything.
pub type LocalExports = BTreeMap<ServiceKey, LocalExport>;

/// Builds the map from a list (later entries replace earlier ones of the same service).
pub fn local_exports(list: impl IntoIterator<Item = LocalExport>) -> LocalExports {
    list.into_iter().map(|e| (e.service.clone(), e)).collect()
}

/// What a finished drain looked like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Whether every in-flight stream finished before the deadline.
    pub completed: bool,
    /// Streams still open when the drain returned.
    pub remaining: i64,
}

/// Errors of one inbound stream (logged, counted; the stream is answered or reset).
#[derive(Debug, Error)]
enum StreamError {
    #[error("peer sent no complete header within {0:?}")]
    HeaderTimeout(Duration),
    #[error("invalid header: {0}")]
    BadHeader(DecodeError),
    #[error("stream closed before a complete header: {0}")]
    Read(String),
    #[error("cannot answer the peer: {0}")]
    Answer(String),
}

/// The running inbound server. Dropping it does not stop it; use the shutdown token or
/// [`Server::drain`].
#[derive(Debug, Clone)]
pub struct Server {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    endpoint: Arc<Endpoint>,
    exports: watch::Receiver<Arc<LocalExports>>,
    draining: AtomicBool,
    drain_started: CancellationToken,
    streams: TaskTracker,
    balancer: Arc<Balancer>,
    /// Pooled endpoint connections of `http` and `grpc` ports.
    backends: Arc<http::Backends>,
    handshakes: Arc<Semaphore>,
    /// Live connections per caller cluster, capped at `max_connections_per_cluster`.
    per_cluster: Arc<std::sync::Mutex<BTreeMap<ClusterName, u32>>>,
}

/// Holds one of a cluster's connection slots; frees it on drop.
struct ClusterSlot {
    counts: Arc<std::sync::Mutex<BTreeMap<ClusterName, u32>>>,
    cluster: ClusterName,
}

impl ClusterSlot {
    /// Takes a slot for `cluster` if it has fewer than `max` connections. Pure bookkeeping,
    /// never awaits while holding the lock.
    fn acquire(
        counts: &Arc<std::sync::Mutex<BTreeMap<ClusterName, u32>>>,
        cluster: &ClusterName,
        max: u32,
    ) -> Option<Self> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(cluster.clone()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Self {
            counts: counts.clone(),
            cluster: cluster.clone(),
        })
    }
}

impl Drop for ClusterSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.cluster) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.cluster);
            }
        }
    }
}

impl Server {
    /// Starts accepting peers on `endpoint` until `shutdown`.
    pub fn spawn(
        endpoint: Arc<Endpoint>,
        exports: watch::Receiver<Arc<LocalExports>>,
        shutdown: CancellationToken,
    ) -> Self {
        let max_handshakes = endpoint.config().max_handshakes as usize;
        let inner = Arc::new(Shared {
            endpoint,
            exports,
            draining: AtomicBool::new(false),
            drain_started: CancellationToken::new(),
            streams: TaskTracker::new(),
            balancer: Default::default(),
            backends: Default::default(),
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
            per_cluster: Arc::default(),
        });
        tokio::spawn(accept_loop(inner.clone(), shutdown));
        Self { inner }
    }

    /// Streams currently being served.
    pub fn in_flight(&self) -> usize {
        self.inner.streams.len()
    }

    /// Whether [`Server::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    /// Stops taking new connections (refused) and new streams (answered `Draining`), then
    /// waits for in-flight streams up to `deadline`. Does not close the endpoint: call
    /// [`Endpoint::close`] with [`tunnel::CLOSE_DRAINING`] afterwards (outbound shares it).
    pub async fn drain(&self, deadline: Duration) -> DrainReport {
        self.inner.draining.store(true, Ordering::Release);
        self.inner.drain_started.cancel();
        self.inner.streams.close();
        let completed = tokio::time::timeout(deadline, self.inner.streams.wait())
            .await
            .is_ok();
        DrainReport {
            completed,
            remaining: self.inner.streams.len() as i64,
        }
    }
}

async fn accept_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let cfg = shared.endpoint.config().clone();
    let retry_above = (cfg.max_handshakes / 2) as usize;
    let metrics = shared.endpoint.metrics().clone();
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = shared.endpoint.quinn().accept() => match i {
                Some(i) => i,
                None => return, // endpoint closed
            },
        };
        if shared.draining.load(Ordering::Acquire) {
            metrics.handshake_failed("draining");
            incoming.refuse();
            continue;
        }
        let in_progress = cfg.max_handshakes as usize - shared.handshakes.available_permits();
        // Under load, make unvalidated clients prove their address first (a Retry costs the
        // attacker a round trip and keeps us under 3x amplification).
        if in_progress >= retry_above && !incoming.remote_address_validated() {
            if incoming.may_retry() {
                let _ = incoming.retry();
            } else {
                incoming.refuse();
            }
            continue;
        }
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            metrics.handshake_failed("too_many_handshakes");
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connecting = match incoming.accept() {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "incoming connection failed");
                    return;
                }
            };
            let timeout = shared.endpoint.config().connect_timeout;
            let conn = match tokio::time::timeout(timeout, connecting).await {
                Err(_) => {
                    shared.endpoint.metrics().handshake_failed("timeout");
                    return;
                }
                Ok(Err(e)) => {
                    // Certificate rejections were counted by the verifier with their reason.
                    if !is_verifier_rejection(&e) {
                        shared
                            .endpoint
                            .metrics()
                            .handshake_failed(classify_handshake_error(&e));
                    }
                    tracing::debug!(%remote, error = %e, "inbound handshake failed");
                    return;
                }
                Ok(Ok(conn)) => conn,
            };
            drop(permit);
            serve_connection(shared, conn, shutdown).await;
        });
    }
}

fn is_verifier_rejection(e: &quinn::ConnectionError) -> bool {
    let s = e.to_string();
    s.contains("invalid peer certificate")
}

fn classify_handshake_error(e: &quinn::ConnectionError) -> &'static str {
    let s = e.to_string();
    if s.contains("NoCertificatesPresented") || s.contains("no certificates") {
        "no_client_cert"
    } else if s.contains("ALPN") || s.contains("NoApplicationProtocol") {
        "alpn"
    } else {
        "handshake"
    }
}

async fn serve_connection(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
) {
    let remote = conn.remote_address();
    let Some(peer) = tunnel::peer_identity(&conn, &shared.endpoint.identity().trust_domain) else {
        // The verifier accepted it, so this cannot happen short of a bug; refuse loudly.
        tracing::error!(%remote, "connected peer has no readable SVID; closing");
        conn.close(RESET_ABORT, b"no identity");
        return;
    };
    let caller = peer.identity.cluster.clone();
    // One cluster's gateways need a connection each (plus one being recycled); a peer that
    // opens more is misbehaving, and each connection can carry thousands of streams.
    let max = shared.endpoint.config().max_connections_per_cluster;
    let Some(_slot) = ClusterSlot::acquire(&shared.per_cluster, &caller, max) else {
        shared
            .endpoint
            .metrics()
            .handshake_failed("too_many_connections");
        tracing::debug!(%remote, cluster = %caller, max, "cluster at its connection limit; closing");
        conn.close(RESET_ABORT, b"too many connections");
        return;
    };
    shared.endpoint.track(&conn);
    let span = tracing::info_span!("inbound", peer = %caller, %remote, serial = %peer.serial);
    // A connection never outlives the certificate that opened it (docs/reliability.md 15): a
    // well-behaved peer recycles at half the lifetime, this is the backstop.
    let expiry = tokio::time::sleep(until_expiry(peer.not_after, unix_now()));
    // Streams of this connection still waiting for their header. A peer gateway sends the
    // header with the stream's first bytes, so this stays near zero; a peer that opens
    // streams and sends nothing (or a byte at a time) would otherwise make us hold a task and
    // a timer for every one of its `max_streams` streams and churn through them each
    // `header_timeout`. At the cap we stop accepting its streams: the ones it opened wait
    // inside QUIC (counted against its stream limit, costing us no task), other connections
    // are not affected (docs/reliability.md 12).
    let pending = Arc::new(Semaphore::new(
        shared.endpoint.config().max_pending_headers as usize,
    ));
    let stalls = Arc::new(Stalls {
        conn: conn.clone(),
        in_a_row: AtomicU32::new(0),
        max: shared.endpoint.config().max_pending_headers,
    });
    async move {
        tracing::debug!("peer connected");
        tokio::pin!(expiry);
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.close(tunnel::CLOSE_SHUTDOWN, b"shutdown");
                    return;
                }
                () = &mut expiry => {
                    tracing::info!("peer certificate expired; closing its connection");
                    conn.close(tunnel::CLOSE_EXPIRED, b"certificate expired");
                    return;
                }
                reason = conn.closed() => {
                    tracing::debug!(%reason, "peer connection ended");
                    return;
                }
                p = pending.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    // The semaphore is never closed.
                    Err(_) => return,
                },
            };
            let (send, recv) = tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.close(tunnel::CLOSE_SHUTDOWN, b"shutdown");
                    return;
                }
                () = &mut expiry => {
                    tracing::info!("peer certificate expired; closing its connection");
                    conn.close(tunnel::CLOSE_EXPIRED, b"certificate expired");
                    return;
                }
                s = conn.accept_bi() => match s {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(reason = %e, "peer connection ended");
                        return;
                    }
                },
            };
            let shared2 = shared.clone();
            let caller = caller.clone();
            shared.streams.spawn(
                serve_stream(shared2, caller, send, recv, (permit, stalls.clone()))
                    .in_current_span(),
            );
        }
    }
    .instrument(span)
    .await;
}

/// Seconds since the Unix epoch, by the wall clock certificates are judged by.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Time until a certificate valid until `not_after` expires, as of `now` (both Unix
/// seconds): zero once expired, at most [`tunnel::MAX_DURATION`] so a far-off date cannot
/// overflow a timer.
pub fn until_expiry(not_after: i64, now: i64) -> Duration {
    let secs = u64::try_from(not_after.saturating_sub(now)).unwrap_or(0);
    Duration::from_secs(secs).min(tunnel::MAX_DURATION)
}

/// The decision for one header: which status to answer, and where to connect if any.
/// Pure: everything it needs is passed in.
pub fn authorize(
    header: &RequestHeader,
    peer_cluster: &ClusterName,
    exports: &LocalExports,
    draining: bool,
) -> Result<Vec<SocketAddr>, Status> {
    if draining {
        return Err(Status::Draining);
    }
    // The header's caller must be the cluster the certificate proves.
    if &header.caller != peer_cluster {
        return Err(Status::Forbidden);
    }
    let Some(export) = exports.get(&header.service) else {
        return Err(Status::UnknownService);
    };
    if !export.ports.contains(&header.port) {
        return Err(Status::UnknownService);
    }
    if !export.allows(peer_cluster) {
        return Err(Status::Forbidden);
    }
    let endpoints = export.endpoint_addrs(header.port);
    if endpoints.is_empty() {
        return Err(Status::NoEndpoints);
    }
    Ok(endpoints)
}

async fn serve_stream(
    shared: Arc<Shared>,
    caller: ClusterName,
    mut send: SendStream,
    mut recv: RecvStream,
    (pending, stalls): (tokio::sync::OwnedSemaphorePermit, Arc<Stalls>),
) {
    let metrics = shared.endpoint.metrics().clone();
    let mut guard = metrics.stream(
        "inbound",
        Label::from(&caller),
        Label::from(&shared.endpoint.identity().cluster),
    );
    let header_timeout = shared.endpoint.config().header_timeout;
    let connect_timeout = shared.endpoint.config().connect_timeout;
    let header = read_header(&mut recv, header_timeout).await;
    drop(pending);
    stalls.record(&header, &metrics);
    let (header, rest) = match header {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "rejecting stream");
            if let StreamError::BadHeader(_) = e {
                guard.set_result(Status::BadRequest.as_str());
                let _ = answer(&mut send, Status::BadRequest).await;
            } else if let StreamError::HeaderTimeout(_) = e {
                // A peer holding streams open without a header (docs/reliability.md 12).
                guard.set_result("header_timeout");
                let _ = send.reset(RESET_ABORT);
            } else {
                guard.set_result("header_error");
                let _ = send.reset(RESET_ABORT);
            }
            let _ = recv.stop(RESET_ABORT);
            return;
        }
    };
    let exports = shared.exports.borrow().clone();
    let draining = shared.draining.load(Ordering::Acquire);
    let span = tracing::info_span!("stream", id = header.request_id, service = %header.service, port = header.port);
    async move {
        let endpoints = match authorize(&header, &caller, &exports, draining) {
            Ok(e) => e,
            Err(status) => {
                tracing::debug!(%status, "refusing stream");
                guard.set_result(status.as_str());
                let _ = answer(&mut send, status).await;
                let _ = recv.stop(RESET_ABORT);
                return;
            }
        };
        let export = exports.get(&header.service);
        let per_request = export.is_some_and(|e| e.http_ports.contains(&header.port));
        let http1_only = export.is_some_and(|e| e.http1_ports.contains(&header.port));
        // An `http` or `grpc` port needs an endpoint known to answer: an idle pooled
        // connection, else a new one, as a spliced stream needs.
        let pooled = per_request
            .then(|| shared.backends.ready(&endpoints, http1_only))
            .flatten();
        let upstream = match pooled {
            Some(first) => Some(Upstream::Http(first)),
            None => {
                // The whole search is bounded by one connect timeout, so the caller (which
                // waits header + connect timeout for our answer) always hears from us first.
                let search = shared.balancer.connect(&endpoints, connect_timeout);
                match tokio::time::timeout(connect_timeout, search).await {
                    Ok(Some((tcp, load))) if per_request => tcp
                        .peer_addr()
                        .ok()
                        .map(|ep| Upstream::Http(http::First::Fresh(ep, tcp, load))),
                    Ok(Some((tcp, load))) => Some(Upstream::Tcp(tcp, load)),
                    _ => None,
                }
            }
        };
        let Some(upstream) = upstream else {
            guard.set_result(Status::ConnectFailed.as_str());
            let _ = answer(&mut send, Status::ConnectFailed).await;
            let _ = recv.stop(RESET_ABORT);
            return;
        };
        if let Err(e) = answer(&mut send, Status::Connected).await {
            tracing::debug!(error = %e, "caller went away before the answer");
            guard.set_result("error");
            return;
        }
        let (tcp, load) = match upstream {
            Upstream::Tcp(tcp, load) => (tcp, load),
            Upstream::Http(first) => {
                let clean = http::serve(
                    shared.backends.clone(),
                    shared.balancer.clone(),
                    (endpoints, connect_timeout, http1_only),
                    first,
                    (send, recv, rest),
                    shared.drain_started.clone(),
                )
                .await;
                guard.set_result(if clean { "done" } else { "reset" });
                return;
            }
        };
        let idle = shared.endpoint.config().stream_idle_timeout;
        let outcome = splice(tcp, send, recv, &rest, idle).await;
        drop(load);
        // Inbound: TCP is the backend, so QUIC → TCP is toward the upstream.
        guard.add_bytes(outcome.quic_to_tcp, outcome.tcp_to_quic);
        guard.set_result(splice_result(&outcome));
    }
    .instrument(span)
    .await;
}

/// Where an accepted stream goes: spliced to a new endpoint connection, or served as HTTP
/// over pooled ones ([`http`]).
enum Upstream {
    Tcp(TcpStream, balance::Load),
    Http(http::First),
}

/// Header timeouts in a row on one connection. A peer gateway sends the header with the
/// stream's first bytes; `max` streams in a row without one in time (no success between)
/// is a peer holding streams open on purpose, so the whole connection is closed: every
/// stream it queued behind the pending-header cap goes with it at no cost per stream,
/// instead of each being accepted and timed out in turn.
#[derive(Debug)]
struct Stalls {
    conn: quinn::Connection,
    in_a_row: AtomicU32,
    max: u32,
}

impl Stalls {
    fn record(
        &self,
        header: &Result<(RequestHeader, Vec<u8>), StreamError>,
        metrics: &tunnel::Metrics,
    ) {
        match header {
            Err(StreamError::HeaderTimeout(_)) => {
                if self.in_a_row.fetch_add(1, Ordering::AcqRel) + 1 == self.max {
                    tracing::warn!(
                        streams = self.max,
                        "peer opened streams and sent no header in time, {} in a row; closing its connection",
                        self.max
                    );
                    metrics.stalling_peers.inc();
                    self.conn
                        .close(tunnel::CLOSE_STALLING, b"streams without a header");
                }
            }
            Ok(_) => self.in_a_row.store(0, Ordering::Release),
            Err(_) => {}
        }
    }
}

/// Reads one header (bounded in size and time). Returns it and any payload bytes that came
/// after it in the same read.
async fn read_header(
    recv: &mut RecvStream,
    timeout: Duration,
) -> Result<(RequestHeader, Vec<u8>), StreamError> {
    let read = async {
        let mut buf = vec![0u8; MAX_HEADER_LEN];
        let mut len = 0;
        loop {
            match decode_header(&buf[..len]) {
                Ok((header, used)) => return Ok((header, buf[used..len].to_vec())),
                Err(e) if e.is_incomplete() => {}
                Err(e) => return Err(StreamError::BadHeader(e)),
            }
            // `len < MAX_HEADER_LEN` here: a full buffer always decodes or fails, because the
            // body length is bounded so that the whole header fits.
            match recv.read(&mut buf[len..]).await {
                Ok(Some(n)) => len += n,
                Ok(None) => return Err(StreamError::Read("stream finished".into())),
                Err(e) => return Err(StreamError::Read(e.to_string())),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| StreamError::HeaderTimeout(timeout))?
}

async fn answer(send: &mut SendStream, status: Status) -> Result<(), StreamError> {
    send.write_all(&encode_status(status))
        .await
        .map_err(|e| StreamError::Answer(e.to_string()))?;
    if status != Status::Connected {
        let _ = send.finish();
    }
    Ok(())
}

/// Connects to a local endpoint, with `TCP_NODELAY` (small writes must not wait on Nagle).
pub(crate) async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Option<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(%addr, error = %e, "local endpoint refused");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, ?timeout, "local endpoint connect timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> ServiceKey {
        s.parse().expect("valid")
    }
    fn cluster(s: &str) -> ClusterName {
        ClusterName::new(s).expect("valid")
    }

    #[test]
    fn expiry_is_never_negative_and_never_overflows() {
        assert_eq!(until_expiry(100, 40), Duration::from_secs(60));
        assert_eq!(until_expiry(100, 100), Duration::ZERO);
        assert_eq!(until_expiry(100, 500), Duration::ZERO);
        assert_eq!(until_expiry(i64::MIN, i64::MAX), Duration::ZERO);
        assert_eq!(until_expiry(i64::MAX, i64::MIN), tunnel::MAX_DURATION);
    }

    #[test]
    fn authorize_table() {
        let ep: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let exports = local_exports([
            LocalExport {
                service: key("pay.prod"),
                ports: vec![8080],
                endpoints: vec![ep],
                allowed_callers: vec![cluster("east")],
                http_ports: vec![],
                http1_ports: vec![],
            },
            LocalExport {
                service: key("empty.prod"),
                ports: vec![80],
                endpoints: vec![],
                allowed_callers: vec![],
                http_ports: vec![],
                http1_ports: vec![],
            },
        ]);
        let h = |svc: &str, port: u16, caller: &str| RequestHeader {
            request_id: 1,
            service: key(svc),
            port,
            caller: cluster(caller),
        };
        let east = cluster("east");
        let west = cluster("west");
        type Case<'a> = (
            RequestHeader,
            &'a ClusterName,
            bool,
            Result<Vec<SocketAddr>, Status>,
        );
        let cases: &[Case<'_>] = &[
            (h("pay.prod", 8080, "east"), &east, false, Ok(vec![ep])),
            (
                h("pay.prod", 8080, "east"),
                &east,
                true,
                Err(Status::Draining),
            ),
            (
                h("pay.prod", 8080, "east"),
                &west,
                false,
                Err(Status::Forbidden),
            ),
            (
                h("pay.prod", 8080, "west"),
                &west,
                false,
                Err(Status::Forbidden),
            ),
            (
                h("pay.prod", 9090, "east"),
                &east,
                false,
                Err(Status::UnknownService),
            ),
            (
                h("nope.prod", 8080, "east"),
                &east,
                false,
                Err(Status::UnknownService),
            ),
            (
                h("empty.prod", 80, "west"),
                &west,
                false,
                Err(Status::NoEndpoints),
            ),
        ];
        for (header, peer, draining, want) in cases {
            assert_eq!(
                &authorize(header, peer, &exports, *draining),
                want,
                "{header:?} from {peer}"
            );
        }
    }

    #[test]
    fn connections_per_cluster_are_capped_and_slots_come_back() {
        let counts = Arc::default();
        let east = ClusterName::new("east").expect("valid");
        let west = ClusterName::new("west").expect("valid");
        let a = ClusterSlot::acquire(&counts, &east, 2).expect("first");
        let b = ClusterSlot::acquire(&counts, &east, 2).expect("second");
        assert!(
            ClusterSlot::acquire(&counts, &east, 2).is_none(),
            "third refused"
        );
        assert!(
            ClusterSlot::acquire(&counts, &west, 2).is_some(),
            "other clusters unaffected"
        );
        drop(a);
        let _c = ClusterSlot::acquire(&counts, &east, 2).expect("freed slot reused");
        drop(b);
        assert_eq!(
            counts.lock().expect("lock").get(&west),
            None,
            "empty entries removed"
        );
    }
}

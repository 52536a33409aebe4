//! The HTTP path: `http` and `grpc` ports are routed per request (docs/http-routing.md).
//!
//! - The client's connection is served by hyper (HTTP/1.1, or h2c with prior knowledge,
//!   told apart by the connection preface), with limits on what the client controls.
//! - Each request is decided on its own: the service's route rules ([`CompiledRoutes`]) pick
//!   the first matching rule and draw a destination by weight; no rule, or a destination
//!   naming the policy, takes the failover decision's order, as a TCP connection does.
//! - Each try is one tunnel stream (the same header, status and pool as a TCP connection),
//!   carrying one HTTP/1.1 exchange, or one h2 connection for a request that may need h2's
//!   trailers (gRPC); the serving gateway splices it to an endpoint. An h2 client's other
//!   requests cross as HTTP/1.1, marked [`H2_CLIENT`], and reach the endpoint as h2
//!   ([`tunnel_wire`]), between gateways that speak `meshup/1.1` ([`Hop`]). A local
//!   endpoint gets its own connection. Endpoints that speak only HTTP/1.1
//!   (`endpoint_protocol: http1`) get every request as HTTP/1.1.
//! - A request is tried again elsewhere while nothing of it can have reached a backend (the
//!   stream was refused, the peer did not answer), and after a retryable status, a reset or a
//!   per-try timeout only when it can be sent again whole: an idempotent method with no body.
//! - Which clusters, in which order, and whether to try again are pure functions below.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshup_core::model::AppProtocol;
use meshup_core::names::ClusterName;
use meshup_core::routes::{CompiledRule, HOP_BY_HOP_HEADERS, HeaderEdits, HttpRetry, RequestView};
use meshup_core::tunnel::RequestHeader;
use tokio::net::TcpStream;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use super::pool::PeerKey;
use super::replay::Tape;
use super::route::Target;
use super::steer::{Plan, RequestLabels, ServiceLabels};
use super::streams::{Kept, StreamKey, Streams, Via};
use super::{Attempt, Connected, Early, Shared, attempt_remote, connect_local, prepared};
use crate::outbound::Route;
use crate::tunnel::metrics::Label;

/// Longest request line and header block of an HTTP/1.1 request (hyper's read buffer):
/// more gets `431`/`414` and the connection closed.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields of an HTTP/1.1 request: more gets `431`.
pub const MAX_HEADERS: usize = 100;
/// Longest wait for a request's headers on an HTTP/1.1 connection (slow-loris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most concurrent requests on one h2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Longest a request waits for its response headers when its rule sets no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// Marks a serving gateway's answer to a request it forwarded to no endpoint (none
/// accepted it): the caller may try another cluster, as after a refused stream. Only ever
/// between gateways: the caller removes it.
pub const NOT_FORWARDED: HeaderName = HeaderName::from_static("meshup-not-forwarded");
/// Marks a request of an h2 client that crosses to the serving gateway as HTTP/1.1
/// ([`tunnel_wire`]), with its `:scheme` as the value: that gateway removes it and sends
/// the request to its endpoint as h2, as the client spoke it. Only ever between gateways:
/// the calling gateway removes any a client or a rule's edit set.
pub const H2_CLIENT: HeaderName = HeaderName::from_static("meshup-h2-client");

/// How requests of `http` and `grpc` ports are answered (the config's `http` section).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// A response header naming the cluster that served each request (`None`: none).
    pub serving_cluster_header: Option<HeaderName>,
    /// Longest a request body may go without a byte once started (`http` ports).
    pub body_idle_timeout: Duration,
    /// The same for `grpc` ports, whose streams idle between messages.
    pub grpc_body_idle_timeout: Duration,
    /// Most requests of one client address waiting for their response headers at once.
    pub max_requests_per_client: u32,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            serving_cluster_header: None,
            body_idle_timeout: crate::config::DEFAULT_BODY_IDLE_TIMEOUT,
            grpc_body_idle_timeout: crate::config::DEFAULT_GRPC_BODY_IDLE_TIMEOUT,
            max_requests_per_client: crate::config::DEFAULT_MAX_REQUESTS_PER_CLIENT,
        }
    }
}

/// Requests waiting for their response headers, by client address
/// ([`HttpOptions::max_requests_per_client`]). Clients choose the keys, so this map keeps
/// std's keyed SipHash (the maps keyed by what the catalog names use foldhash).
#[derive(Debug, Default)]
pub(super) struct ClientLoad(std::sync::Mutex<HashMap<IpAddr, u32>>);

/// One request counted in [`ClientLoad`] until dropped.
struct ClientSlot<'a> {
    load: &'a ClientLoad,
    client: IpAddr,
}

impl ClientLoad {
    /// A slot for one more request of `client`, unless it has `max` already.
    fn take(&self, client: IpAddr, max: u32) -> Option<ClientSlot<'_>> {
        let mut load = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = load.entry(client).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot { load: self, client })
    }
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut load = self.load.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = load.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                load.remove(&self.client);
            }
        }
    }
}

/// The body of every response the HTTP path gives a client or a caller.
pub(crate) type RespBody = BoxBody<Bytes, hyper::Error>;
/// The body of a request on its way to a cluster.
pub(super) type ReqBody = BoxBody<Bytes, BoxError>;
pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one client connection of an `http` or `grpc` port until it closes.
pub(super) async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    client: SocketAddr,
    route: Arc<Route>,
    app: AppProtocol,
) {
    let draining = shared.stop_listeners.clone();
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        let route = route.clone();
        async move { Ok::<_, Infallible>(handle(shared, route, app, client.ip(), req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(64);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    // Draining: requests in flight finish, then the connection closes (HTTP/1.1 after the
    // current response, h2 with GOAWAY), so an idle keep-alive client does not hold the
    // drain until its deadline.
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "http connection ended with an error");
    }
}

/// Which HTTP a try speaks over its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Http1,
    H2,
}

/// One request of a connection to an `app` port, end to end: decide, try, answer.
async fn handle(
    shared: Arc<Shared>,
    route: Arc<Route>,
    app: AppProtocol,
    client: IpAddr,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let started = Instant::now();
    // A CONNECT asks for a tunnel to the authority it names, which is not this service's
    // business: a TCP tunnel across clusters is a `tcp` port. Forwarded, it would reach an
    // endpoint as a request it cannot serve, or open a tunnel behind the route's back.
    if req.method() == Method::CONNECT {
        return answered_here(
            &shared,
            &route,
            req.method(),
            StatusCode::NOT_IMPLEMENTED,
            "meshup: CONNECT is not served on an http or grpc port; export a tcp port to tunnel\n",
        );
    }
    let Some(_slot) = shared
        .client_load
        .take(client, shared.http.max_requests_per_client)
    else {
        return answered_here(
            &shared,
            &route,
            req.method(),
            StatusCode::TOO_MANY_REQUESTS,
            "meshup: too many requests from this client at once\n",
        );
    };
    let snapshot = shared.snapshots.borrow().clone();
    let routes = snapshot.routes(&route.service).cloned();
    let (mut parts, body) = req.into_parts();
    let rule = routes.as_deref().and_then(|r| {
        let header = |name: &str| -> Vec<&str> {
            parts
                .headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect()
        };
        r.matching(&RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            header: &header,
        })
    });
    let steering = &shared.steering;
    let plan = steering.plan(&route.service, prepared(&shared, &route));
    let order = request_order(
        rule.map(|r| r.order(steering.draw())).as_deref(),
        &plan.decision.order,
        &plan.prepared.serving.targets,
    );
    let retry = rule.map_or_else(
        || HttpRetry {
            attempts: plan
                .decision
                .max_attempts
                .clamp(1, meshup_core::routes::MAX_ATTEMPTS),
            ..HttpRetry::default()
        },
        |r| r.retry.clone(),
    );
    let upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .filter(|_| is_upgrade(&parts.headers));
    let h2_client = parts.version == Version::HTTP_2;
    // Only an h2 client's request may cross as h2 for them (HTTP/1.1 crosses as it came).
    let needs_trailers = h2_client && may_need_trailers(&parts.headers);
    clean_hop_by_hop(&mut parts.headers, upgrade.is_some());
    if let Some(r) = rule {
        apply_edits(&mut parts.headers, &r.request_headers);
    }
    // Set by no client and no rule: only ever between gateways.
    parts.headers.remove(&H2_CLIENT);
    let wire = tunnel_wire(app, parts.version, needs_trailers, parts.headers.len());
    let empty_body = body.is_end_stream();
    let replayable = upgrade.is_none() && is_idempotent(&parts.method) && empty_body;
    let method_class = method_class(upgrade.is_some(), &parts.method);
    let route_label = rule.map_or(Label::Static("none"), |r| {
        Label::Text(r.name.as_str().into())
    });
    let deadline = started + rule.and_then(|r| r.timeout).unwrap_or(DEFAULT_TIMEOUT);

    // A body that stalls is abandoned (`408`); an empty one stays empty, so h2 ends the
    // stream with the headers. A body is read through a tape, for a try that reaches no
    // backend ([`forwarded`]); an upgrade's is not (it is the start of a tunnel).
    let idle = match app {
        AppProtocol::Grpc => shared.http.grpc_body_idle_timeout,
        _ => shared.http.body_idle_timeout,
    };
    let (tape, body) = if empty_body {
        (None, empty_body_of())
    } else {
        let body = TimeoutBody::new(idle, body).boxed();
        if upgrade.is_none() {
            let (tape, reader) = Tape::new(body);
            (Some(tape), reader)
        } else {
            (None, body)
        }
    };
    let mut body = Some(body);
    let request = Outgoing {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        wire,
        h2_client,
        reuse: upgrade.is_none(),
        empty_body,
        tape,
    };
    let mut attempts = 0u32;
    // Failed tries that reached a backend: the next retry waits (`retry_backoff`).
    let mut reached_backend = 0u32;
    let mut failure = Answer::NoRoute;
    let sm = &steering.metrics;
    let labels = plan.prepared.labels();
    for (i, cluster) in order.iter().enumerate() {
        if attempts == retry.attempts {
            break;
        }
        let Some(target) = plan.prepared.serving.targets.get(cluster) else {
            continue;
        };
        {
            let mut st = steering.lock();
            if attempts > 0
                && !st
                    .health
                    .take_retry(&route.service, &plan.policy().retry, Instant::now())
            {
                sm.retry_budget_exhausted.get_or_create(labels).inc();
                break;
            }
            if st
                .health
                .try_start(&route.service, cluster, &plan.policy().circuit)
                .is_err()
            {
                drop(st);
                sm.circuit_open
                    .get_or_create(&labels.to(Label::from(cluster)))
                    .inc();
                continue;
            }
        }
        if attempts > 0 {
            sm.retries
                .get_or_create(&labels.to(Label::from(cluster)))
                .inc();
        }
        if reached_backend > 0 {
            let wait = retry_backoff(reached_backend - 1, steering.draw());
            if Instant::now() + wait >= deadline {
                break;
            }
            tokio::time::sleep(wait).await;
        }
        attempts += 1;
        let more_after = i + 1 < order.len() && attempts < retry.attempts;
        let now = Instant::now();
        let try_deadline = retry
            .per_try_timeout
            .map_or(deadline, |t| (now + t).min(deadline));
        let tried = tokio::time::timeout_at(
            try_deadline.into(),
            try_once(
                &shared, &route, cluster, target, &request, &mut body, more_after,
            ),
        )
        .await
        .unwrap_or(Err(TryFailed {
            answer: Answer::Timeout,
            cluster_failed: true,
            sent: true,
        }));
        // The circuit breaker's count of this try ends with its response headers.
        let finished = |ok: bool| {
            let mut st = steering.lock();
            st.health.attempt_finished(&route.service, cluster, ok);
            st.health.connection_ended(&route.service, cluster);
        };
        let outcome: Result<(), TryFailed> = match tried {
            Ok(resp) => {
                let status = resp.status();
                let again = status_retried(status, &retry, replayable) && more_after;
                let ok = !status.is_server_error();
                finished(ok);
                steering.record(&route.service, cluster, &plan, ok);
                if !again {
                    let mut resp = resp;
                    finish_response(&mut resp, rule, upgrade, status);
                    if let Some(name) = &shared.http.serving_cluster_header
                        && let Ok(value) = HeaderValue::from_str(cluster.as_str())
                    {
                        resp.headers_mut().insert(name.clone(), value);
                    }
                    count(
                        sm,
                        &plan,
                        cluster,
                        &route_label,
                        method_class,
                        resp.status(),
                        started,
                    );
                    return resp.map(|b| b.boxed());
                }
                sm.attempt_failures
                    .get_or_create(&labels.result(Label::from(cluster), "retried_status"))
                    .inc();
                Err(TryFailed {
                    answer: Answer::Status(status),
                    cluster_failed: true,
                    sent: true,
                })
            }
            Err(f) => {
                finished(false);
                if f.cluster_failed {
                    steering.record(&route.service, cluster, &plan, false);
                }
                sm.attempt_failures
                    .get_or_create(&labels.result(Label::from(cluster), f.answer.reason()))
                    .inc();
                Err(f)
            }
        };
        if let Err(f) = outcome {
            let stop = f.sent && !replayable;
            if f.sent {
                reached_backend += 1;
            }
            failure = f.answer;
            if stop || Instant::now() >= deadline {
                break;
            }
        }
    }
    let resp = failure.response();
    sm.http
        .requests
        .get_or_create(&RequestLabels {
            service: labels.service.clone(),
            source_cluster: labels.source_cluster.clone(),
            destination_cluster: Label::Static("none"),
            route: route_label,
            method: method_class,
            code: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// Counts a request a cluster answered.
fn count(
    sm: &super::ServiceMetrics,
    plan: &Plan,
    cluster: &ClusterName,
    route: &Label,
    method: &'static str,
    code: StatusCode,
    started: Instant,
) {
    plan.prepared.count_request(
        sm,
        cluster,
        (route, method, code.as_u16()),
        started.elapsed().as_secs_f64(),
    );
}

/// What is sent on each try: the request without its body (which is taken once).
struct Outgoing {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    /// What a tunnel stream carries it as ([`tunnel_wire`]).
    wire: Wire,
    /// Whether the client spoke h2: a local endpoint gets it as h2 (unless it speaks only
    /// HTTP/1.1), a serving gateway learns it from [`H2_CLIENT`] when it crosses as
    /// HTTP/1.1.
    h2_client: bool,
    /// Whether a kept stream may carry it (not an upgrade, which takes its stream).
    reuse: bool,
    /// Whether it has no body: one it can be sent again whole, whatever its method.
    empty_body: bool,
    /// Its body as sent, for a try that reached no backend ([`forwarded`]).
    tape: Option<Tape>,
}

/// Where one try goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// An endpoint of this cluster; `http1_only`: the port's endpoints speak only HTTP/1.1
    /// (`endpoint_protocol: http1`).
    Local { http1_only: bool },
    /// A serving gateway, over a tunnel stream; `speaks_1_1`: it speaks `meshup/1.1`, so
    /// it sends a request marked [`H2_CLIENT`] to its endpoint as h2
    /// ([`crate::tunnel::speaks_1_1`]).
    Gateway { speaks_1_1: bool },
}

impl Outgoing {
    /// What a try to `hop` speaks: every request is HTTP/1.1 to a local endpoint that
    /// speaks only that; an h2 client's request is h2 to another local endpoint, and to a
    /// gateway that would not read the mark (an older one, during a rolling upgrade); else
    /// what [`tunnel_wire`] chose.
    fn wire(&self, hop: Hop) -> Wire {
        match hop {
            Hop::Local { http1_only: true } => Wire::Http1,
            Hop::Local { .. } | Hop::Gateway { speaks_1_1: false } if self.h2_client => Wire::H2,
            _ => self.wire,
        }
    }

    /// Whether the request crosses marked where it can: as HTTP/1.1 to a gateway that
    /// speaks `meshup/1.1` (to an older one it goes as h2, unmarked: [`Outgoing::wire`]).
    fn marked(&self) -> bool {
        self.h2_client && self.wire == Wire::Http1
    }

    /// The request of one try spoken as `wire`, to a local endpoint (`local`) or a serving
    /// gateway. The body goes with the first try; a retried request gets an empty one (it
    /// had none), or its body replayed from the tape ([`forwarded`]).
    fn build(&self, wire: Wire, local: bool, body: Option<ReqBody>) -> Request<ReqBody> {
        let mut uri = self.uri.clone();
        let version = match wire {
            Wire::Http1 => {
                // Origin form on an HTTP/1.1 stream; the Host header says the authority.
                uri = origin_form(uri);
                Version::HTTP_11
            }
            Wire::H2 => {
                uri = h2_uri(uri, "http", &self.headers);
                Version::HTTP_2
            }
        };
        let mut req = Request::new(body.unwrap_or_else(empty_body_of));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = self.headers.clone();
        match wire {
            Wire::H2 => {
                req.headers_mut().remove(header::HOST);
            }
            // An h2 client's request: its `:authority` becomes the Host header (in place of
            // any Host it sent too, RFC 9113 8.3.1), and to a serving gateway the mark, with
            // its `:scheme`, tells it to speak h2 to its endpoint.
            Wire::Http1 if self.h2_client => {
                let headers = req.headers_mut();
                h2_fields_for_http1(&self.uri, headers);
                if !local {
                    let scheme = match self.uri.scheme_str() {
                        Some("https") => "https",
                        _ => "http",
                    };
                    headers.insert(H2_CLIENT, HeaderValue::from_static(scheme));
                }
            }
            Wire::Http1 => {}
        }
        req
    }
}

/// Whether a request may need what only h2 carries end to end: trailers, which a gRPC
/// call always has, which an HTTP/1.1 hop passes on only to a client that said
/// `TE: trailers` (RFC 9110, 6.5.1), and which a request announcing its own (`Trailer`)
/// would lose on the way. Read before the hop-by-hop headers are removed.
fn may_need_trailers(headers: &HeaderMap) -> bool {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    });
    grpc || te_trailers || headers.contains_key(header::TRAILER)
}

/// Header fields an h2 client's request gains when it crosses as HTTP/1.1: Host and the
/// mark ([`H2_CLIENT`]).
const CROSSING_FIELDS: usize = 2;

/// What a tunnel stream carries a request of `fields` header fields (as it is sent, after
/// a rule's edits) as. HTTP/1.1 costs the two gateways a third less per request than h2
/// (docs/benchmarks.md, "An h2 client's request crosses as HTTP/1.1"), so an h2 client's
/// request crosses as HTTP/1.1 unless it may need trailers ([`may_need_trailers`]) or has
/// more header fields than an HTTP/1.1 hop takes ([`MAX_HEADERS`], hyper's and Envoy's
/// default; h2 clients are held only to the size of their header list). A `grpc` port is
/// h2 throughout.
fn tunnel_wire(app: AppProtocol, version: Version, needs_trailers: bool, fields: usize) -> Wire {
    let h2_only =
        version == Version::HTTP_2 && (needs_trailers || fields + CROSSING_FIELDS > MAX_HEADERS);
    if app == AppProtocol::Grpc || h2_only {
        Wire::H2
    } else {
        Wire::Http1
    }
}

/// `uri` in the form h2 needs, with a scheme and an authority (`:scheme`, `:authority`):
/// an origin-form URI gets `scheme` and the Host header's authority.
pub(crate) fn h2_uri(uri: Uri, scheme: &str, headers: &HeaderMap) -> Uri {
    if uri.authority().is_some() {
        return uri;
    }
    let authority = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned();
    let pq = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(pq)
        .build()
        .unwrap_or(uri)
}

/// `uri` in origin form (path and query), for an HTTP/1.1 hop.
pub(crate) fn origin_form(uri: Uri) -> Uri {
    match uri.path_and_query() {
        Some(pq) if uri.authority().is_some() => Uri::from(pq.clone()),
        _ => uri,
    }
}

/// An h2 request's header fields as an HTTP/1.1 hop needs them: its `:authority` as the
/// Host header, in place of any Host it sent too (RFC 9113 8.3.1), and its cookie crumbs
/// in one field ([`join_cookies`]).
pub(crate) fn h2_fields_for_http1(uri: &Uri, headers: &mut HeaderMap) {
    if let Some(authority) = uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    join_cookies(headers);
}

/// Joins the `cookie` fields an h2 client may split its cookies into into one, with "; ",
/// as an HTTP/1.1 hop needs them (RFC 9113 8.2.3). One field or none stays as it is.
pub(crate) fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    if crumbs.nth(1).is_none() {
        return;
    }
    let joined = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

fn empty_body_of() -> ReqBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Why a try failed, and what the client gets if it was the last.
#[derive(Debug)]
struct TryFailed {
    answer: Answer,
    /// Whether the failure says the cluster cannot serve (outlier detection).
    cluster_failed: bool,
    /// Whether any of the request may have reached a backend.
    sent: bool,
}

/// The client's answer when no try succeeded.
#[derive(Debug, Clone, Copy)]
enum Answer {
    /// No cluster can serve the request.
    NoRoute,
    /// No gateway or endpoint of the clusters tried took the request.
    Unreachable,
    /// A serving gateway forwarded it to no endpoint ([`NOT_FORWARDED`]).
    NotForwarded,
    /// A try was sent and lost (reset, broken stream).
    Lost,
    /// The request's time ran out.
    Timeout,
    /// The client's request body stopped coming (`http.body_idle_timeout`).
    BodyStalled,
    /// The last try's retryable status (it was retried, and nothing better came).
    Status(StatusCode),
}

impl Answer {
    fn reason(self) -> &'static str {
        match self {
            Answer::NoRoute => "no_route",
            Answer::Unreachable => "unreachable",
            Answer::NotForwarded => "not_forwarded",
            Answer::Lost => "reset",
            Answer::Timeout => "timeout",
            Answer::BodyStalled => "body_stalled",
            Answer::Status(_) => "retried_status",
        }
    }

    fn response(self) -> Response<RespBody> {
        let (status, text) = match self {
            Answer::NoRoute => (
                StatusCode::SERVICE_UNAVAILABLE,
                "meshup: no cluster can serve this request\n",
            ),
            Answer::Unreachable | Answer::NotForwarded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "meshup: no cluster tried took the request\n",
            ),
            Answer::Lost => (
                StatusCode::BAD_GATEWAY,
                "meshup: the request was lost on its way to the service\n",
            ),
            Answer::Timeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "meshup: the service did not answer in time\n",
            ),
            Answer::BodyStalled => (
                StatusCode::REQUEST_TIMEOUT,
                "meshup: the request body stopped coming\n",
            ),
            Answer::Status(s) => (s, "meshup: every cluster tried answered this status\n"),
        };
        let mut resp = text_response(status, text);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

/// A request the gateway answers itself, before any decision: counted with no destination
/// and no route.
fn answered_here(
    shared: &Shared,
    route: &Route,
    method: &Method,
    status: StatusCode,
    text: &'static str,
) -> Response<RespBody> {
    let labels = ServiceLabels::new(&route.service, &shared.local);
    shared
        .steering
        .metrics
        .http
        .requests
        .get_or_create(&RequestLabels {
            service: labels.service,
            source_cluster: labels.source_cluster,
            destination_cluster: Label::Static("none"),
            route: Label::Static("none"),
            method: method_class(false, method),
            code: status.as_u16(),
        })
        .inc();
    text_response(status, text)
}

/// A response of the gateway's own: `status` with a short text body.
pub(crate) fn text_response(status: StatusCode, text: &'static str) -> Response<RespBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// One try at one cluster: a kept stream or connection, else a new stream (or a new local
/// connection), an HTTP client on it, the request, its response headers.
async fn try_once(
    shared: &Shared,
    route: &Route,
    cluster: &ClusterName,
    target: &Target,
    request: &Outgoing,
    body: &mut Option<ReqBody>,
    more_after: bool,
) -> Result<Response<Incoming>, TryFailed> {
    let unreachable = |cluster_failed| TryFailed {
        answer: Answer::Unreachable,
        cluster_failed,
        sent: false,
    };
    let key = StreamKey {
        cluster: cluster.clone(),
        service: route.service.clone(),
        port: route.port,
    };
    let streams = &shared.http_streams;
    let local_hop = match target {
        Target::Local { http1_only, .. } => Some(Hop::Local {
            http1_only: *http1_only,
        }),
        Target::Remote { .. } => None,
    };
    let local = local_hop.is_some();
    if request.reuse
        && let Some(result) = try_kept(shared, &key, request, local_hop, body).await
    {
        return result;
    }
    let opened = tokio::time::Instant::now();
    let (mut sender, via, wire) = match target {
        Target::Local {
            endpoints,
            http1_only,
        } => {
            let tcp = connect_local(shared, endpoints)
                .await
                .map_err(|_| unreachable(true))?;
            let addr = tcp.peer_addr().map_err(|_| unreachable(true))?;
            let wire = request.wire(Hop::Local {
                http1_only: *http1_only,
            });
            let sender = handshake(TokioIo::new(tcp), wire, ())
                .await
                .map_err(|_| unreachable(true))?;
            let peer = PeerKey {
                cluster: cluster.clone(),
                addr,
            };
            let via = Via {
                peer,
                opened,
                speaks_1_1: false,
            };
            (sender, via, wire)
        }
        Target::Remote { gateways } => {
            let header = RequestHeader {
                request_id: shared.next_request_id.fetch_add(1, Ordering::Relaxed),
                service: route.service.clone(),
                port: route.port,
                caller: shared.local.clone(),
            };
            let mut early = Early::default();
            match attempt_remote(
                shared, cluster, gateways, &header, None, &mut early, more_after,
            )
            .await
            {
                Attempt::Connected(Connected::Remote {
                    send,
                    recv,
                    _open,
                    _in_use,
                    peer,
                    speaks_1_1,
                    ..
                }) => {
                    let io = TokioIo::new(tokio::io::join(recv, send));
                    let wire = request.wire(Hop::Gateway { speaks_1_1 });
                    let sender =
                        handshake(io, wire, (_open, _in_use))
                            .await
                            .map_err(|_| TryFailed {
                                answer: Answer::Lost,
                                cluster_failed: true,
                                sent: false,
                            })?;
                    let via = Via {
                        peer,
                        opened,
                        speaks_1_1,
                    };
                    (sender, via, wire)
                }
                Attempt::Connected(Connected::Local { .. }) => return Err(unreachable(false)),
                Attempt::Failed { cluster_failed, .. } => {
                    return Err(unreachable(cluster_failed));
                }
            }
        }
    };
    if let (true, Sender::H2(s)) = (request.reuse, &sender) {
        streams.share_h2(key.clone(), s.clone(), via.clone());
    }
    let (result, keep) = forwarded(
        send(&mut sender, request.build(wire, local, body.take()), body).await,
        request,
        body,
    );
    if request.reuse {
        keep_or_forget(streams, &key, sender, via, keep);
    }
    result
}

/// After a try on a stream that may be kept: an HTTP/1.1 stream that may take more requests
/// is kept, a shared h2 one that may not is no longer shared.
fn keep_or_forget(streams: &Streams, key: &StreamKey, sender: Sender, via: Via, keep: bool) {
    match (keep, sender) {
        (true, Sender::Http1(s)) => streams.put_h1(key.clone(), s, via),
        (false, Sender::H2(_)) => streams.forget_h2(key),
        _ => {}
    }
}

/// The try on a kept stream (or kept local connection, `local_hop` when this cluster serves
/// the request) for `key`, if there is one: `None` when none is left that could take the
/// request (it was not sent). A marked request
/// ([`Outgoing::marked`]) takes an HTTP/1.1 stream to a gateway that speaks `meshup/1.1`,
/// else the shared h2 stream, if there is one.
async fn try_kept(
    shared: &Shared,
    key: &StreamKey,
    request: &Outgoing,
    local_hop: Option<Hop>,
    body: &mut Option<ReqBody>,
) -> Option<Result<Response<Incoming>, TryFailed>> {
    let streams = &shared.http_streams;
    let alive = |p: &PeerKey| !shared.steering.lock().liveness.is_suspect(p);
    let local = local_hop.is_some();
    let marked = !local && request.marked();
    let first = local_hop.map_or(request.wire, |hop| request.wire(hop));
    for wire in std::iter::once(first).chain(marked.then_some(Wire::H2)) {
        while let Some(kept) = streams.take(key, wire == Wire::H2, marked, alive) {
            let (mut sender, via) = match kept {
                Kept::H1(s, via) => (Sender::Http1(s), via),
                Kept::H2(s, via) => (Sender::H2(s), via),
            };
            match send(&mut sender, request.build(wire, local, body.take()), body).await {
                Err(f) if !f.sent => {
                    // It had closed before it wrote the request: another one.
                    keep_or_forget(streams, key, sender, via, false);
                }
                result => {
                    let (result, keep) = forwarded(result, request, body);
                    keep_or_forget(streams, key, sender, via, keep);
                    return Some(result);
                }
            }
        }
    }
    None
}

/// A try's outcome, and whether its stream may take more requests. A serving gateway's
/// answer saying it forwarded nothing ([`NOT_FORWARDED`]: no local endpoint accepted the
/// request) is a try that reached no backend: tried again elsewhere if the request can
/// still be sent whole (it had no body, or its body is within the replay limit: `body`
/// becomes its replay from the tape), else the client gets that `503`. Either way the
/// stream is not used again, so the next request opens a new one, which that gateway
/// refuses for as long as it has no endpoint, and the refusal is retried elsewhere.
fn forwarded(
    result: Result<Response<Incoming>, TryFailed>,
    request: &Outgoing,
    body: &mut Option<ReqBody>,
) -> (Result<Response<Incoming>, TryFailed>, bool) {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(f) => return (Err(f), false),
    };
    if resp.headers_mut().remove(&NOT_FORWARDED).is_none() {
        return (Ok(resp), true);
    }
    if let Some(replay) = request.tape.as_ref().and_then(Tape::replay) {
        *body = Some(replay);
    } else if !request.empty_body {
        return (Ok(resp), false);
    }
    let f = TryFailed {
        answer: Answer::NotForwarded,
        cluster_failed: true,
        sent: false,
    };
    (Err(f), false)
}

/// An HTTP client on one try's connection.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// Sends the request; a request hyper never wrote gives its body back for the next try.
async fn send(
    sender: &mut Sender,
    req: Request<ReqBody>,
    body: &mut Option<ReqBody>,
) -> Result<Response<Incoming>, TryFailed> {
    let result = match sender {
        Sender::Http1(s) => s.try_send_request(req).await,
        Sender::H2(s) => s.try_send_request(req).await,
    };
    result.map_err(|mut e| {
        let unsent = e.take_message();
        let sent = unsent.is_none();
        if let Some(req) = unsent {
            *body = Some(req.into_body());
        }
        // The client's body stalled: the client's failure, not the cluster's.
        let stalled =
            std::iter::successors(Some(e.error() as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.is::<TimeoutError>());
        TryFailed {
            sent,
            answer: if stalled {
                Answer::BodyStalled
            } else {
                Answer::Lost
            },
            cluster_failed: !stalled,
        }
    })
}

/// Starts an HTTP client on `io`; its connection task keeps `guards` (the stream's counts)
/// until the exchange ends.
async fn handshake<I, G>(io: TokioIo<I>, wire: Wire, guards: G) -> hyper::Result<Sender>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    G: Send + 'static,
{
    match wire {
        Wire::Http1 => {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(async move {
                let _guards = guards;
                let _ = conn.with_upgrades().await;
            });
            Ok(Sender::Http1(sender))
        }
        Wire::H2 => {
            let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .handshake(io)
                .await?;
            tokio::spawn(async move {
                let _guards = guards;
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        }
    }
}

/// The response the client gets: hop-by-hop headers out, the rule's edits in, and an
/// accepted upgrade joined to the client's connection.
fn finish_response(
    resp: &mut Response<Incoming>,
    rule: Option<&CompiledRule>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    status: StatusCode,
) {
    let upgraded = status == StatusCode::SWITCHING_PROTOCOLS && upgrade.is_some();
    clean_hop_by_hop(resp.headers_mut(), upgraded);
    if let Some(r) = rule {
        apply_edits(resp.headers_mut(), &r.response_headers);
    }
    if let (true, Some(client)) = (upgraded, upgrade) {
        let server = hyper::upgrade::on(&mut *resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(server)) = (client.await, server.await) else {
                return;
            };
            let _ =
                tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(server))
                    .await;
        });
    }
}

// === pure parts ===

/// The clusters a request tries, in order: the rule's destinations as drawn (`None`, the
/// policy, stands for the failover decision's order), else the decision's order; each
/// cluster once, only clusters that can serve the service.
fn request_order(
    rule_order: Option<&[Option<&ClusterName>]>,
    policy_order: &[ClusterName],
    serving: &BTreeMap<ClusterName, Target>,
) -> Vec<ClusterName> {
    let mut out: Vec<ClusterName> = Vec::new();
    let mut push = |c: &ClusterName| {
        if serving.contains_key(c) && !out.contains(c) {
            out.push(c.clone());
        }
    };
    match rule_order {
        None => policy_order.iter().for_each(&mut push),
        Some(destinations) => {
            for d in destinations {
                match d {
                    Some(c) => push(c),
                    None => policy_order.iter().for_each(&mut push),
                }
            }
        }
    }
    out
}

/// Whether a response with `status` is tried again elsewhere: a status the retry policy
/// names, for a request that can be sent again whole.
fn status_retried(status: StatusCode, retry: &HttpRetry, replayable: bool) -> bool {
    replayable && retry.on_status.contains(&status.as_u16())
}

/// The wait before a retry that follows `n` earlier tries that reached a backend (a status,
/// a reset, a timeout): uniform in 0..=25 ms × 2ⁿ, at most 250 ms (Envoy's defaults, full
/// jitter), so a struggling service is not hit by every client's retries at once. A try that
/// reached nothing (a refused stream) is retried at once, elsewhere.
fn retry_backoff(n: u32, draw: u64) -> Duration {
    let cap_ms = (25u64 << n.min(4)).min(250);
    Duration::from_micros(draw % (cap_ms * 1000 + 1))
}

/// The `method` label of a request: `upgrade`, `read` (GET, HEAD, OPTIONS) or `write`.
fn method_class(upgrade: bool, method: &Method) -> &'static str {
    match (upgrade, method) {
        (true, _) => "upgrade",
        (false, &Method::GET | &Method::HEAD | &Method::OPTIONS) => "read",
        _ => "write",
    }
}

/// RFC 9110 §9.2.2.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether an HTTP/1.1 request asks to switch protocols (`Connection: upgrade`).
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers of one connection (RFC 9110 §7.6.1): `Connection` and every header
/// it names, and the fixed hop-by-hop ones. `TE: trailers` stays (gRPC needs it); an
/// upgrade keeps `Connection: upgrade` and `Upgrade`.
fn clean_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // Most messages carry none of them: one pass over the names present, instead of a
    // lookup per hop-by-hop name, for every request and response.
    if !upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
    ] {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` is one of the hop-by-hop headers [`clean_hop_by_hop`] removes whatever
/// `Connection` names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP_HEADERS.contains(&name.as_str())
}

/// Applies a rule's edits: remove, then set, then add. The record was checked, so every
/// name and value is valid; one that is not would be skipped.
fn apply_edits(headers: &mut HeaderMap, edits: &HeaderEdits) {
    for n in &edits.remove {
        headers.remove(n.as_str());
    }
    let parse = |n: &String, v: &String| {
        Some((
            HeaderName::from_bytes(n.as_bytes()).ok()?,
            HeaderValue::from_str(v).ok()?,
        ))
    };
    for (n, v) in edits.set.iter().filter_map(|(n, v)| parse(n, v)) {
        headers.insert(n, v);
    }
    for (n, v) in edits.add.iter().filter_map(|(n, v)| parse(n, v)) {
        headers.append(n, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).expect("name")
    }

    fn serving(names: &[&str]) -> BTreeMap<ClusterName, Target> {
        names
            .iter()
            .map(|n| (c(n), Target::Remote { gateways: vec![] }))
            .collect()
    }

    #[test]
    fn a_request_tries_the_rules_destinations_then_the_policy_each_cluster_once() {
        let (west, north, south) = (c("west"), c("north"), c("south"));
        let policy = vec![north.clone(), west.clone()];
        let all = serving(&["west", "north"]);
        type Drawn<'a> = Option<Vec<Option<&'a ClusterName>>>;
        let cases: Vec<(Drawn, Vec<&ClusterName>)> = vec![
            (None, vec![&north, &west]),
            (Some(vec![None]), vec![&north, &west]),
            (Some(vec![Some(&west)]), vec![&west]),
            (Some(vec![Some(&west), Some(&north)]), vec![&west, &north]),
            (Some(vec![Some(&west), None]), vec![&west, &north]),
            (Some(vec![None, Some(&west)]), vec![&north, &west]),
            // A destination that does not export the service is left out.
            (Some(vec![Some(&south)]), vec![]),
            (Some(vec![Some(&south), None]), vec![&north, &west]),
        ];
        for (rule, want) in cases {
            let got = request_order(rule.as_deref(), &policy, &all);
            let want: Vec<ClusterName> = want.into_iter().cloned().collect();
            assert_eq!(got, want, "{rule:?}");
        }
        let only_west = serving(&["west"]);
        assert_eq!(request_order(None, &policy, &only_west), vec![west.clone()]);
    }

    #[test]
    fn only_a_whole_idempotent_request_is_retried_after_a_status() {
        let retry = HttpRetry::default();
        let cases = [
            (503, true, true),
            (503, false, false),
            (502, true, false),
            (500, true, false),
            (200, true, false),
        ];
        for (status, replayable, want) in cases {
            let s = StatusCode::from_u16(status).expect("status");
            assert_eq!(
                status_retried(s, &retry, replayable),
                want,
                "{status} {replayable}"
            );
        }
        let on_502 = HttpRetry {
            on_status: vec![502, 503],
            ..HttpRetry::default()
        };
        assert!(status_retried(StatusCode::BAD_GATEWAY, &on_502, true));
        for (m, want) in [
            (Method::GET, true),
            (Method::PUT, true),
            (Method::DELETE, true),
            (Method::POST, false),
            (Method::PATCH, false),
        ] {
            assert_eq!(is_idempotent(&m), want, "{m}");
        }
    }

    #[test]
    fn retries_after_a_backend_answered_wait_a_jittered_growing_time() {
        for (n, cap_ms) in [(0, 25), (1, 50), (2, 100), (3, 200), (4, 250), (9, 250)] {
            let cap = Duration::from_millis(cap_ms);
            let waits: Vec<Duration> = (0..1000u64)
                .map(|d| retry_backoff(n, d.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect();
            assert!(waits.iter().all(|w| *w <= cap), "n={n}");
            let max = waits.iter().max().copied().unwrap_or_default();
            let min = waits.iter().min().copied().unwrap_or_default();
            assert!(
                max > cap * 9 / 10 && min < cap / 10,
                "n={n}: {min:?}..{max:?} spread over 0..={cap:?}"
            );
        }
        assert_eq!(retry_backoff(0, 0), Duration::ZERO);
        assert_eq!(retry_backoff(0, 25_000), Duration::from_millis(25));
    }

    #[test]
    fn an_h2_clients_request_crosses_as_http1_unless_it_may_need_trailers() {
        // Header fields as `name: value` lines.
        for (fields, want) in [
            ("", false),
            ("content-type: text/plain", false),
            ("te: trailers", true),
            ("te: gzip, Trailers", true),
            ("te: gzip\nte: trailers", true),
            ("te: trailersx", false),
            ("content-type: application/grpc+proto", true),
            ("trailer: x-checksum", true),
        ] {
            let mut headers = HeaderMap::new();
            for line in fields.lines() {
                let (name, value) = line.split_once(": ").expect("name: value");
                headers.append(
                    HeaderName::from_bytes(name.as_bytes()).expect("name"),
                    HeaderValue::from_str(value).expect("value"),
                );
            }
            assert_eq!(may_need_trailers(&headers), want, "{fields:?}");
        }

        use AppProtocol::{Grpc, Http};
        use Wire::{H2, Http1};
        let (h1, h2) = (Version::HTTP_11, Version::HTTP_2);
        // (port, client, may need trailers, header fields, what crosses)
        for (app, version, trailers, fields, want) in [
            (Http, h1, false, 5, Http1),
            (Http, h2, false, 5, Http1),
            (Http, h2, true, 5, H2),
            // An HTTP/1.1 client's request crosses HTTP/1.1 as it came, trailers and all.
            (Http, h1, true, 5, Http1),
            // With Host and the mark, an HTTP/1.1 hop's 100 fields at most.
            (Http, h2, false, MAX_HEADERS - 2, Http1),
            (Http, h2, false, MAX_HEADERS - 1, H2),
            (Http, h2, false, 150, H2),
            (Grpc, h1, false, 5, H2),
            (Grpc, h2, false, 5, H2),
        ] {
            let got = tunnel_wire(app, version, trailers, fields);
            assert_eq!(got, want, "{app:?} {version:?} {trailers} {fields}");
        }
    }

    #[test]
    fn an_h2_request_crossing_as_http1_names_its_authority_and_is_marked() {
        let mut headers = HeaderMap::new();
        headers.insert("x-tag", HeaderValue::from_static("a"));
        // A Host the client sent beside `:authority`: `:authority` wins (RFC 9113 8.3.1).
        headers.insert(header::HOST, HeaderValue::from_static("other.example"));
        // Cookie crumbs, as h2 clients send them (RFC 9113 8.2.3).
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        let cookies = |req: &Request<ReqBody>| -> Vec<String> {
            req.headers()
                .get_all(header::COOKIE)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        let outgoing = |h2_client| Outgoing {
            method: Method::GET,
            uri: Uri::from_static("http://web.shop:8080/a/b?c=d"),
            headers: headers.clone(),
            wire: Wire::Http1,
            h2_client,
            reuse: true,
            empty_body: true,
            tape: None,
        };
        let o = outgoing(true);
        assert!(o.marked());
        // Over a tunnel stream to a gateway speaking meshup/1.1: HTTP/1.1, origin form, Host,
        // the mark.
        let wire = o.wire(Hop::Gateway { speaks_1_1: true });
        assert_eq!(wire, Wire::Http1);
        let req = o.build(wire, false, None);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.headers()[header::HOST], "web.shop:8080");
        assert_eq!(req.headers()[&H2_CLIENT], "http");
        assert_eq!(req.headers()["x-tag"], "a");
        assert_eq!(cookies(&req), ["a=1; b=2"], "one field on an HTTP/1.1 hop");
        // What the serving gateway makes of it: h2 again, with the same authority.
        assert_eq!(
            h2_uri(req.uri().clone(), "http", req.headers()),
            "http://web.shop:8080/a/b?c=d"
        );
        // An `https` scheme (a TLS-terminating proxy in front of the client) crosses in the
        // mark.
        let tls = Outgoing {
            uri: Uri::from_static("https://web.shop/x"),
            ..outgoing(true)
        };
        let req = tls.build(Wire::Http1, false, None);
        assert_eq!(req.headers()[&H2_CLIENT], "https");
        assert_eq!(
            h2_uri(req.uri().clone(), "https", req.headers()),
            "https://web.shop/x"
        );
        // To a local endpoint, and to an older gateway (which would not read the mark): h2,
        // as the client spoke it, unmarked.
        let local = Hop::Local { http1_only: false };
        for hop in [local, Hop::Gateway { speaks_1_1: false }] {
            let wire = o.wire(hop);
            assert_eq!(wire, Wire::H2, "{hop:?}");
            let req = o.build(wire, hop == local, None);
            assert_eq!(req.version(), Version::HTTP_2);
            assert_eq!(req.uri(), "http://web.shop:8080/a/b?c=d");
            assert!(!req.headers().contains_key(header::HOST));
            assert!(!req.headers().contains_key(&H2_CLIENT));
            assert_eq!(cookies(&req), ["a=1", "b=2"], "h2 keeps the crumbs");
        }
        // To a local endpoint that speaks only HTTP/1.1: HTTP/1.1, origin form, Host, no mark.
        let http1_local = Hop::Local { http1_only: true };
        let wire = o.wire(http1_local);
        assert_eq!(wire, Wire::Http1);
        let req = o.build(wire, true, None);
        assert_eq!(req.version(), Version::HTTP_11);
        assert_eq!(req.uri(), "/a/b?c=d");
        assert_eq!(req.headers()[header::HOST], "web.shop:8080");
        assert!(!req.headers().contains_key(&H2_CLIENT));
        assert_eq!(cookies(&req), ["a=1; b=2"]);
        // An HTTP/1.1 client's request is never marked, and goes as HTTP/1.1 everywhere.
        let every_hop = [
            local,
            http1_local,
            Hop::Gateway { speaks_1_1: false },
            Hop::Gateway { speaks_1_1: true },
        ];
        let h1 = outgoing(false);
        assert!(!h1.marked());
        for hop in every_hop {
            assert_eq!(h1.wire(hop), Wire::Http1, "{hop:?}");
        }
        let req = h1.build(Wire::Http1, false, None);
        assert!(!req.headers().contains_key(&H2_CLIENT));
        assert_eq!(
            cookies(&req),
            ["a=1", "b=2"],
            "an HTTP/1.1 client's fields as sent"
        );
        // An h2 client's request chosen to cross as h2 (it may need trailers) is h2 to
        // every hop, and unmarked.
        let h2 = Outgoing {
            wire: Wire::H2,
            ..outgoing(true)
        };
        assert!(!h2.marked());
        for hop in every_hop {
            let want = if hop == http1_local {
                Wire::Http1
            } else {
                Wire::H2
            };
            assert_eq!(h2.wire(hop), want, "{hop:?}");
        }
    }

    #[test]
    fn connection_headers_stay_on_their_connection() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-end", "2"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        clean_hop_by_hop(&mut plain, false);
        let mut names: Vec<&str> = plain.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["te", "traceparent", "x-end"]);
        assert!(!is_upgrade(&h), "keep-alive, x-hop is not an upgrade");

        h.insert("connection", HeaderValue::from_static("Upgrade"));
        assert!(is_upgrade(&h));
        clean_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get("upgrade").map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
        assert_eq!(
            h.get("connection").map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert!(h.get("transfer-encoding").is_none());

        // Nothing hop-by-hop: every header stays, in its order.
        let mut end_to_end = HeaderMap::new();
        for (n, v) in [("host", "a"), ("x-b", "1"), ("accept", "*/*"), ("x-b", "2")] {
            end_to_end.append(n, HeaderValue::from_static(v));
        }
        let before = end_to_end.clone();
        clean_hop_by_hop(&mut end_to_end, false);
        assert_eq!(end_to_end, before);
        // Any one hop-by-hop name alone is removed.
        for n in HOP_BY_HOP_HEADERS {
            let mut one = before.clone();
            one.append(n, HeaderValue::from_static("x"));
            clean_hop_by_hop(&mut one, false);
            assert_eq!(one, before, "{n} is removed");
        }
    }

    #[test]
    fn edits_remove_then_set_then_add() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("old"));
        h.insert("x-gone", HeaderValue::from_static("1"));
        let edits = HeaderEdits {
            set: [("x-a".to_owned(), "new".to_owned())].into(),
            add: [("x-a".to_owned(), "more".to_owned())].into(),
            remove: vec!["x-gone".to_owned()],
        };
        apply_edits(&mut h, &edits);
        let a: Vec<&[u8]> = h.get_all("x-a").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(a, [&b"new"[..], &b"more"[..]]);
        assert!(h.get("x-gone").is_none());
    }
}

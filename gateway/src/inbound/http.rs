//! The serving side of the HTTP path (docs/http-routing.md): a stream for an `http` or
//! `grpc` port is served as HTTP, and its requests go to local endpoints over pooled
//! keep-alive connections instead of a new connection per stream.
//!
//! - Before `Connected` is answered an endpoint must be known to answer: an idle pooled
//!   connection to one of the export's endpoints, or a new connection made now (the same
//!   connect as a spliced stream, so a refusal is still retried elsewhere by the caller).
//! - HTTP/1.1 connections are listed in the pool when their response headers come, and
//!   handed out again once that response has been read to the end (`SendRequest::is_ready`);
//!   an h2 connection is shared by every h2 request to its endpoint.
//! - Connections are kept at most [`IDLE_TIMEOUT`] after their last response's headers, and
//!   [`MAX_KEPT_PER_ENDPOINT`] per endpoint: shorter than the keep-alive timeouts backends
//!   commonly use (Node.js: 5 s), so the pool rarely hands out a connection the backend is
//!   closing.
//! - A request hyper hands back unsent (its pooled connection had just closed) is sent again
//!   on a new connection. An idempotent request written on a pooled connection that then
//!   closed without an answer (the backend closed it at the same moment, or is going away)
//!   is answered "not forwarded", so the caller sends it again elsewhere (RFC 9110, 9.2.2);
//!   any other request gets a 502. An upgrade (WebSocket) gets a connection of its own.
//! - A request marked [`H2_CLIENT`] (an h2 client's, carried as HTTP/1.1 between the
//!   gateways) goes to its endpoint as h2, as the client spoke it, unless the port's
//!   endpoints speak only HTTP/1.1 (`endpoint_protocol: http1`): then every request goes as
//!   HTTP/1.1 ([`as_the_endpoint_speaks`]).
//! - A stream carrying a whole client connection (a caller that splices the port, an older
//!   gateway) works the same: every request on it is forwarded in turn.

use foldhash::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::balance::{Balancer, Load};
use crate::outbound::http::{
    H2_CLIENT, MAX_HEADER_BYTES, NOT_FORWARDED, RespBody, h2_fields_for_http1, h2_uri,
    join_cookies, origin_form, text_response,
};

/// Longest a backend connection stays in the pool after its last response's headers.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Most HTTP/1.1 connections kept per endpoint, idle or finishing a response.
pub const MAX_KEPT_PER_ENDPOINT: usize = 256;
/// Most concurrent requests on one h2 tunnel stream: a calling gateway shares one per
/// service port among all its clients' requests to this cluster that cross as h2 (gRPC,
/// and h2 requests that may need trailers).
pub const MAX_STREAMS_PER_TUNNEL_STREAM: u32 = 1024;

/// A kept HTTP/1.1 connection and when its last response's headers came.
type Idle = (http1::SendRequest<Incoming>, Instant);

/// Idle and shared backend connections, by endpoint (foldhash: the local exports name the
/// keys, and each request looks one up).
#[derive(Debug, Default)]
pub(super) struct Backends {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<Incoming>>>,
}

/// What made the stream worth answering `Connected`: a pooled connection or a new one.
pub(super) enum First {
    Pooled(SocketAddr, http1::SendRequest<Incoming>),
    Shared,
    Fresh(SocketAddr, TcpStream, Load),
}

impl Backends {
    /// An idle HTTP/1.1 connection to one of `endpoints`, or a live h2 one unless the
    /// endpoints speak only HTTP/1.1 (`http1_only`).
    pub(super) fn ready(&self, endpoints: &[SocketAddr], http1_only: bool) -> Option<First> {
        if let Some((ep, sender)) = self.take_idle(endpoints) {
            return Some(First::Pooled(ep, sender));
        }
        if http1_only {
            return None;
        }
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        endpoints
            .iter()
            .find(|ep| h2.get(ep).is_some_and(|s| !s.is_closed()))
            .map(|_| First::Shared)
    }

    /// An idle HTTP/1.1 connection to one of `endpoints`; stale and closed ones are dropped
    /// on the way, ones still carrying a response stay.
    fn take_idle(
        &self,
        endpoints: &[SocketAddr],
    ) -> Option<(SocketAddr, http1::SendRequest<Incoming>)> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        for ep in endpoints {
            let Some(list) = idle.get_mut(ep) else {
                continue;
            };
            let mut i = list.len();
            while i > 0 {
                i -= 1;
                let (sender, since) = &list[i];
                if now.duration_since(*since) >= IDLE_TIMEOUT || sender.is_closed() {
                    list.swap_remove(i);
                } else if sender.is_ready() {
                    return Some((*ep, list.swap_remove(i).0));
                }
            }
        }
        None
    }

    /// Keeps a connection whose response headers came: it takes another request once that
    /// response was read to its end (hyper says it is ready; no task waits for that).
    fn put_idle(&self, ep: SocketAddr, sender: http1::SendRequest<Incoming>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(ep).or_default();
        if list.len() < MAX_KEPT_PER_ENDPOINT {
            list.push((sender, Instant::now()));
        }
    }

    fn h2_sender(&self, ep: SocketAddr) -> Option<http2::SendRequest<Incoming>> {
        let h2 = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        h2.get(&ep).filter(|s| !s.is_closed()).cloned()
    }
}

/// One stream's requests, forwarded to the export's endpoints.
struct Forwarder {
    backends: Arc<Backends>,
    balancer: Arc<Balancer>,
    endpoints: Vec<SocketAddr>,
    connect_timeout: Duration,
    /// The endpoints speak only HTTP/1.1 (`endpoint_protocol: http1`): every request
    /// reaches them as HTTP/1.1, whatever its client spoke.
    http1_only: bool,
    /// The connection that made the stream worth accepting, used by its first request.
    first: Mutex<Option<First>>,
}

/// Serves a stream whose `Connected` answer was sent: HTTP in, pooled connections out.
/// The calling gateway may keep the stream for later requests; when this gateway drains
/// (`draining`), requests in flight finish and the stream closes (HTTP/1.1 after the current
/// response, h2 with GOAWAY). Its requests go to `endpoints`, connected within
/// `connect_timeout`, as HTTP/1.1 only if `http1_only` ([`as_the_endpoint_speaks`]).
/// Returns whether the stream ended cleanly.
pub(super) async fn serve(
    backends: Arc<Backends>,
    balancer: Arc<Balancer>,
    (endpoints, connect_timeout, http1_only): (Vec<SocketAddr>, Duration, bool),
    first: First,
    (send, recv, rest): (SendStream, RecvStream, Vec<u8>),
    draining: CancellationToken,
) -> bool {
    let fwd = Arc::new(Forwarder {
        backends,
        balancer,
        endpoints,
        connect_timeout,
        http1_only,
        first: Mutex::new(Some(first)),
    });
    let service = hyper::service::service_fn(move |req| {
        let fwd = fwd.clone();
        async move { Ok::<_, Infallible>(fwd.forward(req).await) }
    });
    let io = TokioIo::new(tokio::io::join(
        std::io::Cursor::new(rest).chain(recv),
        send,
    ));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(MAX_STREAMS_PER_TUNNEL_STREAM)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r.is_ok(),
        _ = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await.is_ok()
        }
    }
}

/// The answer to a request no local endpoint accepted: nothing of it reached a backend, or
/// it is idempotent and its kept connection closed before any answer, so the calling
/// gateway may try another cluster ([`NOT_FORWARDED`]).
fn not_forwarded() -> Response<RespBody> {
    let mut resp = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "meshup: no local endpoint accepted the request\n",
    );
    resp.headers_mut()
        .insert(NOT_FORWARDED, http::HeaderValue::from_static("1"));
    resp
}

/// Puts a request that crossed into the form its endpoint gets. Endpoints that speak only
/// HTTP/1.1 (`http1_only`) get it as HTTP/1.1: one that crossed as h2 is turned into it,
/// its `:authority` as the Host header, and an h2 client's cookie crumbs are joined
/// ([`h2_fields_for_http1`]). Otherwise an h2 client's request that crossed as
/// HTTP/1.1 ([`H2_CLIENT`]) goes on as h2, as it was spoken, with the scheme the mark
/// carries; the mark is read from any caller, since gateways of the first releases that
/// mark speak only `meshup/1` (docs/http-routing.md). The mark never reaches the endpoint.
fn as_the_endpoint_speaks<B>(req: &mut Request<B>, http1_only: bool, upgrade: bool) {
    let mark = req.headers_mut().remove(H2_CLIENT);
    if http1_only {
        if req.version() == Version::HTTP_2 {
            let uri = std::mem::take(req.uri_mut());
            h2_fields_for_http1(&uri, req.headers_mut());
            *req.uri_mut() = origin_form(uri);
            *req.version_mut() = Version::HTTP_11;
        } else if mark.is_some() {
            // Crossed as HTTP/1.1 from an h2 client: a caller of the first releases that
            // mark left its cookie crumbs apart.
            join_cookies(req.headers_mut());
        }
    } else if let Some(mark) = mark
        && !upgrade
    {
        let scheme = if mark == "https" { "https" } else { "http" };
        *req.version_mut() = Version::HTTP_2;
        *req.uri_mut() = h2_uri(std::mem::take(req.uri_mut()), scheme, req.headers());
        req.headers_mut().remove(http::header::HOST);
    }
}

/// A backend connection for one request.
enum Conn {
    H1(SocketAddr, http1::SendRequest<Incoming>, Option<Load>),
    H2(http2::SendRequest<Incoming>),
}

impl Forwarder {
    async fn forward(&self, mut req: Request<Incoming>) -> Response<RespBody> {
        let upgrade =
            req.headers().contains_key(http::header::UPGRADE) && req.version() == Version::HTTP_11;
        as_the_endpoint_speaks(&mut req, self.http1_only, upgrade);
        let h2 = req.version() == Version::HTTP_2;
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let idempotent = req.method().is_idempotent();
        for fresh in [false, true] {
            let Some(conn) = self.conn(h2, upgrade || fresh).await else {
                return not_forwarded();
            };
            let (result, pooled) = match conn {
                Conn::H1(ep, mut sender, load) => {
                    // Only a connection made for this request carries a connect load.
                    let pooled = load.is_none();
                    let r = sender.try_send_request(req).await;
                    if r.is_ok() && !upgrade {
                        self.backends.put_idle(ep, sender);
                    }
                    drop(load);
                    (r, pooled)
                }
                Conn::H2(mut sender) => (sender.try_send_request(req).await, false),
            };
            match result {
                Ok(mut resp) => {
                    if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) =
                        (client_upgrade, resp.status())
                    {
                        let server = hyper::upgrade::on(&mut resp);
                        tokio::spawn(async move {
                            if let (Ok(c), Ok(s)) = (client.await, server.await) {
                                let _ = tokio::io::copy_bidirectional(
                                    &mut TokioIo::new(c),
                                    &mut TokioIo::new(s),
                                )
                                .await;
                            }
                        });
                    }
                    return resp.map(|b| b.boxed());
                }
                Err(mut e) => match e.take_message() {
                    // Never written (the pooled connection had closed): once more, new.
                    Some(back) if !fresh => req = back,
                    // Written on a kept connection the endpoint closed without an answer
                    // (the keep-alive race, or an endpoint going away): an idempotent
                    // request may be sent again (RFC 9110, 9.2.2), here by the caller.
                    None if pooled && idempotent => {
                        tracing::debug!(error = %e.error(), "a kept endpoint connection closed before answering an idempotent request");
                        return not_forwarded();
                    }
                    _ => {
                        tracing::debug!(error = %e.error(), "local endpoint failed the request");
                        return text_response(
                            StatusCode::BAD_GATEWAY,
                            "meshup: the local endpoint failed the request\n",
                        );
                    }
                },
            }
        }
        not_forwarded()
    }

    /// The stream's first connection, an idle pooled one, the endpoint's shared h2 one, or
    /// a new one (`fresh`: only a new one).
    async fn conn(&self, h2: bool, fresh: bool) -> Option<Conn> {
        let first = self.first.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (tcp, ep, load) = match first {
            Some(First::Fresh(ep, tcp, load)) => (tcp, ep, Some(load)),
            Some(First::Pooled(ep, sender)) if !h2 && !fresh => {
                return Some(Conn::H1(ep, sender, None));
            }
            other => {
                // A pooled connection of the other kind goes back unused.
                if let Some(First::Pooled(ep, sender)) = other {
                    self.backends.put_idle(ep, sender);
                }
                if !fresh {
                    if h2 {
                        if let Some(s) = self
                            .endpoints
                            .iter()
                            .find_map(|ep| self.backends.h2_sender(*ep))
                        {
                            return Some(Conn::H2(s));
                        }
                    } else if let Some((ep, sender)) = self.backends.take_idle(&self.endpoints) {
                        return Some(Conn::H1(ep, sender, None));
                    }
                }
                let (tcp, load) = self
                    .balancer
                    .connect(&self.endpoints, self.connect_timeout)
                    .await?;
                let ep = tcp.peer_addr().ok()?;
                (tcp, ep, Some(load))
            }
        };
        let io = TokioIo::new(tcp);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .ok()?;
            tokio::spawn(async move {
                let _load = load;
                let _ = conn.await;
            });
            self.backends
                .h2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(ep, sender.clone());
            Some(Conn::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(io).await.ok()?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Some(Conn::H1(ep, sender, load))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use http::header::HOST;

    /// (version, URI, Host, mark, endpoints speak only HTTP/1.1, upgrade) → (version, URI,
    /// Host) as the endpoint gets it.
    #[test]
    fn a_request_reaches_its_endpoint_as_the_endpoint_speaks() {
        let (h1, h2) = (Version::HTTP_11, Version::HTTP_2);
        let abs = "http://web.shop:8080/a?b=c";
        for (version, uri, host, mark, http1_only, upgrade, want) in [
            // Marked (an h2 client's request that crossed as HTTP/1.1): h2 again, with the
            // mark's scheme; to HTTP/1.1-only endpoints it stays as it crossed.
            (
                h1,
                "/a?b=c",
                Some("web.shop:8080"),
                Some("http"),
                false,
                false,
                (h2, abs, None),
            ),
            (
                h1,
                "/a?b=c",
                Some("web.shop"),
                Some("https"),
                false,
                false,
                (h2, "https://web.shop/a?b=c", None),
            ),
            (
                h1,
                "/a?b=c",
                Some("web.shop:8080"),
                Some("http"),
                true,
                false,
                (h1, "/a?b=c", Some("web.shop:8080")),
            ),
            // An upgrade stays HTTP/1.1 whatever it carries.
            (
                h1,
                "/ws",
                Some("web.shop"),
                Some("http"),
                false,
                true,
                (h1, "/ws", Some("web.shop")),
            ),
            // Crossed as h2 (it may need trailers): h2, unless the endpoints speak only
            // HTTP/1.1; then origin form with `:authority` as the Host, in place of any Host.
            (h2, abs, None, None, false, false, (h2, abs, None)),
            (
                h2,
                abs,
                None,
                None,
                true,
                false,
                (h1, "/a?b=c", Some("web.shop:8080")),
            ),
            (
                h2,
                abs,
                Some("other.example"),
                None,
                true,
                false,
                (h1, "/a?b=c", Some("web.shop:8080")),
            ),
            // An HTTP/1.1 client's request goes as it came, everywhere.
            (
                h1,
                "/a?b=c",
                Some("web.shop"),
                None,
                false,
                false,
                (h1, "/a?b=c", Some("web.shop")),
            ),
            (
                h1,
                "/a?b=c",
                Some("web.shop"),
                None,
                true,
                false,
                (h1, "/a?b=c", Some("web.shop")),
            ),
        ] {
            let mut req = Request::new(());
            *req.version_mut() = version;
            *req.uri_mut() = uri.parse().expect("uri");
            if let Some(h) = host {
                req.headers_mut().insert(HOST, HeaderValue::from_static(h));
            }
            if let Some(m) = mark {
                req.headers_mut()
                    .insert(H2_CLIENT, HeaderValue::from_static(m));
            }
            as_the_endpoint_speaks(&mut req, http1_only, upgrade);
            let case = format!("{version:?} {uri} {host:?} {mark:?} {http1_only} {upgrade}");
            assert_eq!(req.version(), want.0, "{case}");
            assert_eq!(req.uri(), want.1, "{case}");
            assert_eq!(
                req.headers().get(HOST).and_then(|h| h.to_str().ok()),
                want.2,
                "{case}"
            );
            assert!(!req.headers().contains_key(H2_CLIENT), "{case}");
        }
    }

    /// An h2 client's cookie crumbs reach an HTTP/1.1-only endpoint in one field (RFC 9113
    /// 8.2.3), whether the request crossed as h2 or marked; an h2 endpoint gets them as they
    /// came, and an HTTP/1.1 client's fields are left alone.
    #[test]
    fn cookie_crumbs_are_joined_for_an_http1_endpoint() {
        let (h1, h2) = (Version::HTTP_11, Version::HTTP_2);
        for (version, uri, mark, http1_only, want) in [
            (h2, "http://web.shop/a", None, true, vec!["a=1; b=2"]),
            (h1, "/a", Some("http"), true, vec!["a=1; b=2"]),
            (h1, "/a", Some("http"), false, vec!["a=1", "b=2"]),
            (h2, "http://web.shop/a", None, false, vec!["a=1", "b=2"]),
            (h1, "/a", None, true, vec!["a=1", "b=2"]),
        ] {
            let mut req = Request::new(());
            *req.version_mut() = version;
            *req.uri_mut() = uri.parse().expect("uri");
            req.headers_mut()
                .insert(HOST, HeaderValue::from_static("web.shop"));
            for c in ["a=1", "b=2"] {
                req.headers_mut()
                    .append(http::header::COOKIE, HeaderValue::from_static(c));
            }
            if let Some(m) = mark {
                req.headers_mut()
                    .insert(H2_CLIENT, HeaderValue::from_static(m));
            }
            as_the_endpoint_speaks(&mut req, http1_only, false);
            let got: Vec<&str> = req
                .headers()
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            assert_eq!(got, want, "{version:?} {mark:?} {http1_only}");
        }
    }
}

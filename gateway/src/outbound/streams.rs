//! Tunnel streams of the HTTP path kept for the next request, and connections to this
//! cluster's own endpoints kept the same way (docs/http-routing.md, "How a request travels").
//!
//! A try that opens a stream pays a round trip for the serving gateway's answer, an HTTP
//! handshake on both gateways and a task on each; a stream kept open after its response
//! pays none of them again. So:
//!
//! - an HTTP/1.1 stream is listed for its (cluster, service, port) when its response headers
//!   come, and the next request to that cluster takes it once that response was read to
//!   its end (no task waits for that: a request looks for a stream hyper says is ready);
//! - an h2 stream (requests that cross as h2: gRPC, and h2 requests that may need
//!   trailers) is shared: every such request to that cluster's port goes over it as its
//!   own h2 stream, while it lasts.
//!
//! A stream takes new requests for at most [`REUSE_FOR`] after it opened, so a connection
//! a certificate rotation superseded is not kept alive by reuse, and requests spread over a
//! cluster's gateways as new streams rotate through them; an idle one is dropped after
//! [`IDLE_FOR`]. A stream to a peer suspected dead, or whose connection closed, is never
//! handed out. A request its stream never wrote (the stream had just closed) is sent again
//! on another one, as a refused stream is.

use foldhash::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use meshup_core::names::{ClusterName, ServiceKey};
use tokio::time::Instant;

use super::http::ReqBody;
use super::pool::PeerKey;

/// How long after it opened a stream still takes new requests.
pub const REUSE_FOR: Duration = Duration::from_secs(5);
/// How long an HTTP/1.1 stream is kept after its last response's headers came.
pub const IDLE_FOR: Duration = Duration::from_secs(2);
/// Most HTTP/1.1 streams kept per (cluster, service, port).
pub const MAX_KEPT: usize = 256;
/// How often streams past their time are dropped when nothing else looks at them.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where a kept stream leads: requests for the same service and port to the same cluster
/// share it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct StreamKey {
    pub cluster: ClusterName,
    pub service: ServiceKey,
    pub port: u16,
}

/// Where a kept stream goes, and since when.
#[derive(Debug, Clone)]
pub(super) struct Via {
    pub peer: PeerKey,
    /// When the stream opened: it takes new requests until [`REUSE_FOR`] later.
    pub opened: Instant,
    /// Whether the peer is a gateway that speaks `meshup/1.1`, so an h2 client's request
    /// may cross to it as HTTP/1.1 (`crate::tunnel::speaks_1_1`; false for this cluster's
    /// own endpoints).
    pub speaks_1_1: bool,
}

/// An HTTP/1.1 stream kept after a response: idle, or still carrying that response.
struct IdleH1 {
    sender: http1::SendRequest<ReqBody>,
    via: Via,
    /// When its last response's headers came.
    kept_since: Instant,
}

/// The h2 stream requests of one key share.
struct SharedH2 {
    sender: http2::SendRequest<ReqBody>,
    via: Via,
}

/// A stream handed out for one request.
pub(super) enum Kept {
    H1(http1::SendRequest<ReqBody>, Via),
    H2(http2::SendRequest<ReqBody>, Via),
}

/// The kept streams, by key (foldhash: the catalog names the keys, and each request looks
/// one up; docs/benchmarks.md, "The per-request decision and its counts").
#[derive(Default)]
pub(super) struct Streams {
    h1: Mutex<HashMap<StreamKey, Vec<IdleH1>>>,
    h2: Mutex<HashMap<StreamKey, SharedH2>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

/// Whether a stream opened at `opened`, kept since `kept_since` (`None`: a shared one, never
/// waiting in a list), may take a request at `now`. Pure.
fn reusable(opened: Instant, kept_since: Option<Instant>, now: Instant) -> bool {
    now.saturating_duration_since(opened) < REUSE_FOR
        && kept_since.is_none_or(|t| now.saturating_duration_since(t) < IDLE_FOR)
}

impl Streams {
    /// A new set, with a task that drops streams past their time until the set is dropped.
    pub(super) fn spawn() -> Arc<Self> {
        let streams = Arc::new(Self::default());
        tokio::spawn(sweep(Arc::downgrade(&streams)));
        streams
    }

    /// A kept stream for `key` that may take a request now, from a peer `alive` says is
    /// not suspected; past ones found on the way are dropped. A `marked` request (an h2
    /// client's, crossing as HTTP/1.1) takes only an HTTP/1.1 stream to a gateway that
    /// speaks `meshup/1.1`; the others stay kept for other requests.
    pub(super) fn take(
        &self,
        key: &StreamKey,
        h2: bool,
        marked: bool,
        alive: impl Fn(&PeerKey) -> bool,
    ) -> Option<Kept> {
        let now = Instant::now();
        if h2 {
            let mut shared = lock(&self.h2);
            let s = shared.get(key)?;
            if reusable(s.via.opened, None, now) && !s.sender.is_closed() && alive(&s.via.peer) {
                return Some(Kept::H2(s.sender.clone(), s.via.clone()));
            }
            shared.remove(key);
            return None;
        }
        let mut idle = lock(&self.h1);
        let list = idle.get_mut(key)?;
        // Streams still carrying a response stay listed; past or dead ones go.
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let s = &list[i];
            if !reusable(s.via.opened, Some(s.kept_since), now)
                || s.sender.is_closed()
                || !alive(&s.via.peer)
            {
                list.swap_remove(i);
            } else if marked && !s.via.speaks_1_1 {
                continue;
            } else if s.sender.is_ready() {
                let s = list.swap_remove(i);
                return Some(Kept::H1(s.sender, s.via));
            }
        }
        None
    }

    /// Keeps an HTTP/1.1 stream whose response headers came: it takes the next request once
    /// that response was read to its end (hyper says it is ready). One past its time is
    /// dropped, which finishes it after its response.
    pub(super) fn put_h1(&self, key: StreamKey, sender: http1::SendRequest<ReqBody>, via: Via) {
        let now = Instant::now();
        if !reusable(via.opened, None, now) {
            return;
        }
        let mut idle = lock(&self.h1);
        let list = idle.entry(key).or_default();
        if list.len() < MAX_KEPT {
            list.push(IdleH1 {
                sender,
                via,
                kept_since: now,
            });
        }
    }

    /// Shares an h2 stream for `key`'s next requests (replacing one past its time).
    pub(super) fn share_h2(&self, key: StreamKey, sender: http2::SendRequest<ReqBody>, via: Via) {
        lock(&self.h2).insert(key, SharedH2 { sender, via });
    }

    /// Stops sharing `key`'s h2 stream (it failed a request it never wrote).
    pub(super) fn forget_h2(&self, key: &StreamKey) {
        lock(&self.h2).remove(key);
    }

    /// Drops every stream past its time.
    fn sweep(&self, now: Instant) {
        lock(&self.h1).retain(|_, list| {
            list.retain(|s| {
                reusable(s.via.opened, Some(s.kept_since), now) && !s.sender.is_closed()
            });
            !list.is_empty()
        });
        lock(&self.h2).retain(|_, s| reusable(s.via.opened, None, now) && !s.sender.is_closed());
    }

    /// Kept streams: (idle HTTP/1.1, shared h2).
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (
            lock(&self.h1).values().map(Vec::len).sum(),
            lock(&self.h2).len(),
        )
    }
}

async fn sweep(streams: Weak<Streams>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(streams) = streams.upgrade() else {
            return;
        };
        streams.sweep(Instant::now());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams to west's `echo.prod` port 80, and the gateway they lead to.
    fn west() -> (StreamKey, PeerKey) {
        let key = StreamKey {
            cluster: ClusterName::new("west").expect("name"),
            service: "echo.prod".parse().expect("service"),
            port: 80,
        };
        let peer = PeerKey {
            cluster: key.cluster.clone(),
            addr: "127.0.0.1:4433".parse().expect("addr"),
        };
        (key, peer)
    }

    #[test]
    fn a_stream_takes_requests_for_a_while_after_it_opened_and_not_long_idle() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // (opened, idle since, now) as offsets from t0; want.
        let cases: [(Duration, Option<Duration>, Duration, bool); 8] = [
            (s(0), None, s(0), true),
            (s(0), None, REUSE_FOR - ms(1), true),
            (s(0), None, REUSE_FOR, false),
            (s(0), Some(s(1)), s(1) + IDLE_FOR - ms(1), true),
            (s(0), Some(s(1)), s(1) + IDLE_FOR, false),
            // Busy all along, but opened too long ago.
            (s(0), Some(REUSE_FOR - ms(1)), REUSE_FOR, false),
            // Idle only briefly, well within its time.
            (s(2), Some(s(3)), s(4), true),
            // A clock read before the stream's own instants (another thread's `now`).
            (s(2), Some(s(3)), s(1), true),
        ];
        for (opened, idle, now, want) in cases {
            assert_eq!(
                reusable(t0 + opened, idle.map(|i| t0 + i), t0 + now),
                want,
                "opened {opened:?}, idle since {idle:?}, now {now:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_streams_are_swept_without_traffic() {
        let streams = Streams::spawn();
        let (a, b) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(
                    hyper_util::rt::TokioIo::new(b),
                    hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<bytes::Bytes>::new(),
                        ))
                    }),
                )
                .await;
        });
        let (sender, conn) = http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake::<_, ReqBody>(hyper_util::rt::TokioIo::new(a))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let (key, peer) = west();
        let via = Via {
            peer: peer.clone(),
            opened: Instant::now(),
            speaks_1_1: true,
        };
        streams.share_h2(key.clone(), sender.clone(), via.clone());
        assert!(streams.take(&key, true, false, |_| true).is_some());
        assert!(
            streams.take(&key, false, false, |_| true).is_none(),
            "no idle HTTP/1.1 stream"
        );
        assert!(
            streams.take(&key, true, false, |p| p != &peer).is_none(),
            "a suspected peer's stream is not handed out"
        );
        assert_eq!(streams.len(), (0, 0), "and it is no longer shared");
        streams.share_h2(key.clone(), sender, via);
        tokio::time::sleep(REUSE_FOR - SWEEP_EVERY * 2).await;
        assert_eq!(streams.len(), (0, 1), "kept while it may take requests");
        tokio::time::sleep(SWEEP_EVERY * 3).await;
        assert_eq!(streams.len(), (0, 0), "swept once past its time");
    }

    #[tokio::test]
    async fn a_stream_carrying_a_response_stays_kept_and_is_taken_once_it_was_read() {
        use http_body_util::BodyExt;
        type Frames = tokio::sync::mpsc::Receiver<
            Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>,
        >;
        let streams = Streams::default();
        let (a, b) = tokio::io::duplex(64 * 1024);
        // The first response's body comes as the test sends it; later ones at once.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first: Arc<Mutex<Option<Frames>>> = Arc::new(Mutex::new(Some(rx)));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let frames = lock(&first).take();
                async move {
                    let body = match frames {
                        Some(rx) => http_body_util::StreamBody::new(futures::stream::unfold(
                            rx,
                            |mut rx| async move { rx.recv().await.map(|f| (f, rx)) },
                        ))
                        .boxed(),
                        None => http_body_util::Full::new(bytes::Bytes::from_static(b"again"))
                            .map_err(|never| match never {})
                            .boxed(),
                    };
                    Ok::<_, std::convert::Infallible>(http::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(b), service)
                .await;
        });
        let (mut sender, conn) = http1::handshake::<_, ReqBody>(hyper_util::rt::TokioIo::new(a))
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let (key, peer) = west();
        let get = || {
            http::Request::builder()
                .uri("/")
                .header("host", "echo")
                .body(
                    http_body_util::Empty::<bytes::Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .expect("request")
        };
        let resp = sender.send_request(get()).await.expect("response");
        let via = Via {
            peer,
            opened: Instant::now(),
            speaks_1_1: false,
        };
        streams.put_h1(key.clone(), sender, via);
        tx.send(Ok(hyper::body::Frame::data(bytes::Bytes::from_static(
            b"part",
        ))))
        .await
        .expect("send a part");
        let mut body = resp.into_body();
        let part = body.frame().await.expect("a frame").expect("data");
        assert_eq!(part.into_data().ok().as_deref(), Some(&b"part"[..]));
        assert!(
            streams.take(&key, false, false, |_| true).is_none(),
            "its response is still coming"
        );
        assert_eq!(streams.len(), (1, 0), "and it stays kept");
        drop(tx);
        assert!(body.frame().await.is_none(), "the body ends");
        // hyper's connection task marks the stream ready once it saw the body's end.
        let kept = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(k) = streams.take(&key, false, false, |_| true) {
                    return k;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("taken once its response was read");
        let Kept::H1(sender, via) = kept else {
            panic!("an HTTP/1.1 stream")
        };
        assert_eq!(streams.len(), (0, 0));
        streams.put_h1(key.clone(), sender, via);
        assert!(
            streams.take(&key, false, true, |_| true).is_none(),
            "an h2 client's request crossing as HTTP/1.1 takes no stream to a gateway that does not speak meshup/1.1"
        );
        assert_eq!(streams.len(), (1, 0), "which stays kept");
        let Some(Kept::H1(mut sender, ..)) = streams.take(&key, false, false, |_| true) else {
            panic!("and taken by another request")
        };
        let resp = sender.send_request(get()).await.expect("a second response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"again");
    }
}

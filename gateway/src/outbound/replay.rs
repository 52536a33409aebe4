//! A request body kept while it is sent, so that a request a serving gateway forwarded to no
//! endpoint (`meshup-not-forwarded`) can be sent whole to another cluster even when it had a
//! body (docs/http-routing.md, "When a request is tried again").
//!
//! The client's body is read through a [`Tape`]: every frame read is kept while the body
//! stays within [`REPLAY_LIMIT`]. A replay reads the kept frames again, then the rest of the
//! client's body from where the earlier try stopped reading it (a serving gateway that
//! forwards nothing answers before it has read the body). Once more than the limit has been
//! read, nothing is kept and there is no further replay (the reader at the head reads on):
//! that client gets the `503`. Envoy's router buffers a request for its retries the same
//! way, up to a buffer limit, and gives up retrying past it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use super::http::{BoxError, ReqBody};

/// The most of a request body kept for a replay. Each request in flight holds at most this
/// much more than it would otherwise, until it ends.
pub(super) const REPLAY_LIMIT: usize = 16 * 1024;

/// One request body and the frames read from it, shared by every try's reader.
#[derive(Clone)]
pub(super) struct Tape(Arc<Mutex<Recorded>>);

struct Recorded {
    /// The client's body; `None` once it ended or failed.
    source: Option<ReqBody>,
    /// The frames read so far; `None` once past the limit or failed: no replay.
    kept: Option<Vec<Frame<Bytes>>>,
    /// Frames read from the source so far.
    read: usize,
    bytes: usize,
    /// Replays made: a reader of an earlier try fails, so its abandoned connection stops
    /// reading the client's body.
    generation: u64,
}

impl Tape {
    /// A tape of `body`, and the reader of the first try.
    pub(super) fn new(body: ReqBody) -> (Self, ReqBody) {
        let tape = Self(Arc::new(Mutex::new(Recorded {
            source: Some(body),
            kept: Some(Vec::new()),
            read: 0,
            bytes: 0,
            generation: 0,
        })));
        let reader = tape.reader(0);
        (tape, reader)
    }

    /// The whole body again, from its first frame, unless it is past the limit or failed.
    /// Earlier readers fail from now on.
    pub(super) fn replay(&self) -> Option<ReqBody> {
        let generation = {
            let mut r = self.lock();
            r.kept.as_ref()?;
            r.generation += 1;
            r.generation
        };
        Some(self.reader(generation))
    }

    fn reader(&self, generation: u64) -> ReqBody {
        Reader {
            tape: self.clone(),
            next: 0,
            generation,
        }
        .boxed()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A copy of a data or trailers frame (data is reference-counted: no bytes are copied).
fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(Frame::data(data.clone()))
    } else {
        frame
            .trailers_ref()
            .map(|t: &HeaderMap| Frame::trailers(t.clone()))
    }
}

/// One try's view of the body: the frames already read, then the client's body.
struct Reader {
    tape: Tape,
    /// The next frame this reader returns.
    next: usize,
    generation: u64,
}

impl Body for Reader {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let tape = self.tape.clone();
        let mut r = tape.lock();
        if r.generation != self.generation {
            return Poll::Ready(Some(Err("the request was sent again elsewhere".into())));
        }
        if self.next < r.read {
            let kept = r.kept.as_ref().and_then(|k| k.get(self.next));
            let Some(frame) = kept.and_then(copy_frame) else {
                return Poll::Ready(Some(Err("the request body is no longer kept".into())));
            };
            self.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(source) = r.source.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *source).poll_frame(cx);
        let ended = source.is_end_stream();
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                r.read += 1;
                r.bytes += frame.data_ref().map_or(0, Bytes::len);
                if r.bytes > REPLAY_LIMIT {
                    r.kept = None;
                } else if let (Some(kept), Some(copy)) = (r.kept.as_mut(), copy_frame(&frame)) {
                    kept.push(copy);
                }
                if ended {
                    r.source = None;
                }
                self.next += 1;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                r.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                r.source = None;
                r.kept = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let r = self.tape.lock();
        r.generation == self.generation && self.next >= r.read && r.source.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let r = self.tape.lock();
        let kept: u64 = r
            .kept
            .as_deref()
            .and_then(|k| k.get(self.next..))
            .unwrap_or_default()
            .iter()
            .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
            .sum();
        let rest = r
            .source
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(kept + rest.lower());
        if let Some(upper) = rest.upper() {
            hint.set_upper(kept + upper);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn frames(chunks: &[&'static [u8]], trailers: bool) -> ReqBody {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("grpc-status", http::HeaderValue::from_static("0"));
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures::stream::iter(frames)).boxed()
    }

    /// The body's data and whether it had trailers, or `None` if it failed.
    async fn read(body: ReqBody) -> Option<(Vec<u8>, bool)> {
        let collected = body.collect().await.ok()?;
        let trailers = collected.trailers().is_some();
        Some((collected.to_bytes().to_vec(), trailers))
    }

    #[tokio::test]
    async fn a_replay_sends_the_whole_body_again_while_it_is_within_the_limit() {
        let big = Box::leak(vec![7u8; REPLAY_LIMIT + 1].into_boxed_slice());
        let at_limit = Box::leak(vec![7u8; REPLAY_LIMIT].into_boxed_slice());
        // (case, the body, frames the first try reads, the replay: data and trailers)
        type Case = (
            &'static str,
            ReqBody,
            Option<usize>,
            Option<(Vec<u8>, bool)>,
        );
        let cases: Vec<Case> = vec![
            (
                "chunks, read to the end",
                frames(&[b"ab", b"cd"], false),
                None,
                Some((b"abcd".to_vec(), false)),
            ),
            (
                "a gRPC-style body with trailers",
                frames(&[b"msg"], true),
                None,
                Some((b"msg".to_vec(), true)),
            ),
            (
                "a sized body, read to its length",
                Full::new(Bytes::from_static(b"whole"))
                    .map_err(|never| match never {})
                    .boxed(),
                None,
                Some((b"whole".to_vec(), false)),
            ),
            (
                "read in part: the replay reads the rest from the client",
                frames(&[b"ab", b"cd", b"ef"], false),
                Some(1),
                Some((b"abcdef".to_vec(), false)),
            ),
            (
                "not read at all",
                frames(&[b"ab"], false),
                Some(0),
                Some((b"ab".to_vec(), false)),
            ),
            (
                "exactly at the limit",
                frames(&[at_limit], false),
                None,
                Some((at_limit.to_vec(), false)),
            ),
            ("past the limit", frames(&[big], false), None, None),
            (
                "within the limit when replayed, past it after: the replay reads on",
                frames(&[b"ab", big], false),
                Some(1),
                Some(([b"ab".as_slice(), big].concat(), false)),
            ),
            (
                "a body that failed",
                StreamBody::new(futures::stream::iter(vec![
                    Ok(Frame::data(Bytes::from_static(b"ab"))),
                    Err::<Frame<Bytes>, BoxError>("client gone".into()),
                ]))
                .boxed(),
                None,
                None,
            ),
        ];
        for (name, body, first_reads, want) in cases {
            let (tape, mut first) = Tape::new(body);
            // What hyper does: read frames until the body says it ended (or the try ends).
            let mut n = 0;
            while first_reads.is_none_or(|max| n < max) && !first.is_end_stream() {
                match first.frame().await {
                    Some(Ok(_)) => n += 1,
                    Some(Err(_)) | None => break,
                }
            }
            let Some(replay) = tape.replay() else {
                assert_eq!(None, want, "{name}: no replay");
                continue;
            };
            // The abandoned first try reads nothing more of the client's body.
            assert!(
                matches!(first.frame().await, Some(Err(_))),
                "{name}: the first try's reader after the replay"
            );
            let replayed = read(replay).await;
            assert_eq!(replayed, want, "{name}");
            // Another cluster may forward nothing too: a replay replays again, while the
            // tape still holds the whole body.
            let whole = replayed.is_some_and(|(data, _)| data.len() <= REPLAY_LIMIT);
            match tape.replay() {
                Some(again) => {
                    assert!(whole, "{name}: replayed past the limit");
                    assert_eq!(read(again).await, want, "{name}: second replay");
                }
                None => assert!(!whole, "{name}: no second replay"),
            }
        }
    }
}

//! A hostile h2 client: frames written as an attacker chooses, not as a well-behaved client
//! would. It is the `h2` crate's own frame codec (exposed by its `unstable` feature), so every
//! frame is well formed, but nothing here obeys the server: it opens streams past the
//! server's SETTINGS_MAX_CONCURRENT_STREAMS, resets them as soon as it opens them
//! (CVE-2023-44487), and sends header lists past SETTINGS_MAX_HEADER_LIST_SIZE.
//!
//! Frames are buffered ([`RawH2::headers`], [`RawH2::reset`], …) and written by
//! [`RawH2::flush`], so a test decides what the server reads in one go.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt as _};
use h2::Codec;
use h2::Reason;
use h2::frame::{Data, Frame, Headers, Pseudo, Reset, Settings, StreamId, WindowUpdate};
use http::{HeaderMap, Method, Uri};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One h2 connection driven frame by frame.
pub struct RawH2 {
    codec: Codec<TcpStream, Bytes>,
    authority: String,
    next_id: u32,
}

impl std::fmt::Debug for RawH2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawH2")
            .field("authority", &self.authority)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl RawH2 {
    /// Connects, writes the preface and default SETTINGS, and opens the connection's flow
    /// control window wide, so the server never waits for this client to read.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        tcp.set_nodelay(true)?;
        tcp.write_all(PREFACE).await?;
        let mut codec = Codec::new(tcp);
        sent(codec.feed(Settings::default().into()).await)?;
        sent(
            codec
                .feed(WindowUpdate::new(StreamId::zero(), 1 << 30).into())
                .await,
        )?;
        sent(SinkExt::flush(&mut codec).await)?;
        Ok(Self {
            codec,
            authority: addr.to_string(),
            next_id: 1,
        })
    }

    /// Buffers a request's HEADERS on the next stream, `fields` besides the pseudo-headers;
    /// returns the stream id.
    pub async fn headers(
        &mut self,
        method: Method,
        path: &str,
        fields: HeaderMap,
        end_stream: bool,
    ) -> anyhow::Result<u32> {
        let id = self.next_id;
        self.next_id += 2;
        let uri: Uri = format!("http://{}{path}", self.authority).parse()?;
        let mut frame = Headers::new(
            StreamId::from(id),
            Pseudo::request(method, uri, None),
            fields,
        );
        if end_stream {
            frame.set_end_stream();
        }
        sent(self.codec.feed(frame.into()).await)?;
        Ok(id)
    }

    /// Buffers a RST_STREAM of stream `id`.
    pub async fn reset(&mut self, id: u32, reason: Reason) -> anyhow::Result<()> {
        sent(
            self.codec
                .feed(Reset::new(StreamId::from(id), reason).into())
                .await,
        )
    }

    /// Buffers an empty DATA frame that ends stream `id`'s request.
    pub async fn end_stream(&mut self, id: u32) -> anyhow::Result<()> {
        let mut data = Data::new(StreamId::from(id), Bytes::new());
        data.set_end_stream(true);
        sent(self.codec.feed(data.into()).await)
    }

    /// Writes every buffered frame.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        sent(SinkExt::flush(&mut self.codec).await)
    }

    /// The server's next frame within `timeout`; `None` once the connection is closed (or
    /// reset after the server's last frame).
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<Option<Frame>> {
        match tokio::time::timeout(timeout, self.codec.next()).await {
            Err(_) => anyhow::bail!("no frame from the server within {timeout:?}"),
            Ok(None) => Ok(None),
            Ok(Some(Ok(frame))) => Ok(Some(frame)),
            Ok(Some(Err(h2::proto::Error::Io(..)))) => Ok(None),
            Ok(Some(Err(e))) => anyhow::bail!("a frame the codec cannot read: {e:?}"),
        }
    }

    /// A frame already received, if any, without waiting.
    pub fn try_next(&mut self) -> Option<Frame> {
        match futures::FutureExt::now_or_never(self.codec.next()) {
            Some(Some(Ok(frame))) => Some(frame),
            _ => None,
        }
    }
}

/// A write's outcome as a result the tests can `?` (the codec's errors are not `Sync`).
fn sent<E: std::fmt::Debug>(r: Result<(), E>) -> anyhow::Result<()> {
    r.map_err(|e| anyhow::anyhow!("h2 write: {e:?}"))
}

/// A frame in a few words, for assertion messages.
pub fn describe(frame: &Frame) -> String {
    match frame {
        Frame::Headers(h) => format!(
            "HEADERS stream {} end_stream {}",
            u32::from(h.stream_id()),
            h.is_end_stream()
        ),
        Frame::Data(d) => format!(
            "DATA stream {} end_stream {}",
            u32::from(d.stream_id()),
            d.is_end_stream()
        ),
        Frame::Reset(r) => format!(
            "RST_STREAM stream {} {:?}",
            u32::from(r.stream_id()),
            r.reason()
        ),
        Frame::GoAway(g) => format!(
            "GOAWAY last stream {} {:?} {:?}",
            u32::from(g.last_stream_id()),
            g.reason(),
            g.debug_data()
        ),
        other => format!("{other:?}"),
    }
}

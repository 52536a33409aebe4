//! Bytes both ways between a TCP connection and a QUIC stream, with half-close and reset
//! carried across.
//!
//! - TCP FIN (read returns 0) → QUIC `finish`; QUIC finish (read returns `None`) → TCP
//!   `shutdown(Write)` (FIN). Each direction ends on its own: half-closed connections keep
//!   flowing the other way.
//! - TCP RST (read/write fails) → QUIC `reset` of our send side and `stop` of our receive
//!   side; QUIC reset/stop from the peer or a lost connection → TCP RST (zero linger, close).
//! - Idle: no byte either way for `idle_timeout` resets both sides (docs/reliability.md 12).
//! - Backpressure: each direction awaits its write before the next read, so a slow reader
//!   slows the writer down through TCP windows and QUIC flow control; nothing buffers more
//!   than one read per direction.
//! - No copies of our own: TCP reads land in a `BytesMut` whose filled part is handed to
//!   quinn as it is, and quinn's received chunks go to TCP in one vectored write.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{RESET_ABORT, RESET_TCP};

/// Allocation the TCP → QUIC direction reads into; each read's bytes go to quinn as a
/// slice of it, and a new one is taken when less than a quarter is left.
const CHUNK: usize = 64 * 1024;
/// Received chunks gathered into one TCP write: a whole flight of packets at a jumbo MTU.
const QUIC_TO_TCP_CHUNKS: usize = 32;

/// How a splice ended and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SpliceOutcome {
    /// Bytes read from TCP and written to the stream ([`splice_tcp`]: client → upstream).
    pub tcp_to_quic: u64,
    /// Bytes read from the stream and written to TCP ([`splice_tcp`]: upstream → client).
    pub quic_to_tcp: u64,
    /// Whether the connection ended with a reset (either side) instead of two FINs.
    pub reset: bool,
    /// Whether the reset was ours, for idleness.
    pub idle: bool,
}

/// The metric label of a finished splice.
pub(crate) fn splice_result(out: &SpliceOutcome) -> &'static str {
    match (out.idle, out.reset) {
        (true, _) => "idle",
        (false, true) => "reset",
        (false, false) => "done",
    }
}

/// Why one direction stopped early.
#[derive(Debug)]
enum Abort {
    /// The TCP side failed (RST or error): reset the QUIC side.
    Tcp,
    /// The QUIC side was reset/stopped or the connection died: reset the TCP side.
    Quic,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Splices until both directions are done or either aborts. `initial` is payload already
/// read from the stream (bytes that arrived with the header) and goes to TCP first.
pub(crate) async fn splice(
    tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    initial: &[u8],
    idle_timeout: Duration,
) -> SpliceOutcome {
    let (mut tr, mut tw) = tcp.into_split();
    let mut up = 0u64;
    let mut down = 0u64;
    let activity = Activity::new();
    let touch = || activity.touch();

    let tcp_to_quic = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            if buf.capacity() < CHUNK / 4 {
                buf = BytesMut::with_capacity(CHUNK);
            }
            match tr.read_buf(&mut buf).await {
                Ok(0) => {
                    // FIN from TCP: finish the stream (already-closed is fine), then wait
                    // until the peer has acknowledged every byte. `finish` only queues the
                    // FIN; returning at once would let a drain consider this stream done and
                    // close the connection with its tail still unacknowledged (lost).
                    let _ = send.finish();
                    let _ = send.stopped().await;
                    return Ok(());
                }
                Ok(n) => {
                    // The read bytes leave `buf` (which keeps its spare capacity) without a
                    // copy; quinn holds them until the peer acknowledges them.
                    if send.write_chunk(buf.split().freeze()).await.is_err() {
                        return Err(Abort::Quic);
                    }
                    up += n as u64;
                    touch();
                }
                Err(_) => return Err(Abort::Tcp),
            }
        }
    };
    let quic_to_tcp = async {
        if !initial.is_empty() {
            tw.write_all(initial).await.map_err(|_| Abort::Tcp)?;
            down += initial.len() as u64;
        }
        // Every chunk quinn has ready goes to TCP in one vectored write, so the TCP side
        // sees few large sends instead of one per QUIC packet (each of which runs the
        // kernel's receive path and wakes the reader).
        let mut chunks: [Bytes; QUIC_TO_TCP_CHUNKS] = Default::default();
        loop {
            match recv.read_chunks(&mut chunks).await {
                Ok(Some(k)) => {
                    let n = write_all_chunks(&mut tw, &mut chunks[..k])
                        .await
                        .map_err(|_| Abort::Tcp)?;
                    down += n as u64;
                    touch();
                }
                Ok(None) => {
                    // Stream finished: send FIN to TCP.
                    return tw.shutdown().await.map_err(|_| Abort::Tcp);
                }
                Err(
                    ReadError::Reset(_) | ReadError::ConnectionLost(_) | ReadError::ClosedStream,
                ) => {
                    return Err(Abort::Quic);
                }
                Err(_) => return Err(Abort::Quic),
            }
        }
    };

    let both = futures::future::try_join(tcp_to_quic, quic_to_tcp);
    let result = tokio::select! {
        r = both => r.map(|_| ()),
        () = activity.idle(idle_timeout) => Err(Abort::Idle),
    };
    let idled = matches!(result, Err(Abort::Idle));
    let reset = match result {
        Ok(()) => false,
        Err(abort) => {
            let code = match abort {
                Abort::Tcp => RESET_TCP,
                Abort::Quic | Abort::Idle => RESET_ABORT,
            };
            // Either side failing aborts both: a half-dead proxied connection is worse than
            // a clean reset the application can see.
            let _ = send.reset(code);
            let _ = recv.stop(code);
            if let Ok(tcp) = tr.reunite(tw) {
                reset(tcp);
            }
            true
        }
    };
    SpliceOutcome {
        tcp_to_quic: up,
        quic_to_tcp: down,
        reset,
        idle: idled,
    }
}

/// When a splice last moved a byte, for its idle timeout. Nanoseconds since `start` in an
/// atomic, not a `Cell`, because the splice future must stay `Send`; both directions run in
/// one task. Not milliseconds: rounding the last byte's instant down would put the deadline
/// up to a millisecond before `idle_timeout` had passed.
struct Activity {
    start: Instant,
    last_ns: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ns: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        // u64 nanoseconds last 584 years.
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_ns.store(ns, Ordering::Relaxed);
    }

    /// When the splice is idle unless another byte moves first.
    fn deadline(&self, timeout: Duration) -> Instant {
        self.start + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed)) + timeout
    }

    /// Resolves once nothing has moved for `timeout`, never earlier.
    async fn idle(&self, timeout: Duration) {
        loop {
            let deadline = self.deadline(timeout);
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Closes `tcp` with a reset instead of a FIN (zero linger).
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}

/// Splices a client TCP connection to a local endpoint's (the outbound path when this
/// cluster serves the service itself), with the same rules as [`splice`]: each direction's
/// FIN is passed on alone, a reset on either side resets the other, and `idle_timeout` with
/// nothing moving resets both.
pub(crate) async fn splice_tcp(
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
) -> SpliceOutcome {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut up = 0u64;
    let mut down = 0u64;
    let activity = Activity::new();
    async fn pump(
        from: &mut tokio::net::tcp::OwnedReadHalf,
        to: &mut tokio::net::tcp::OwnedWriteHalf,
        moved: &mut u64,
        activity: &Activity,
    ) -> Result<(), Abort> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from.read(&mut buf).await {
                Ok(0) => return to.shutdown().await.map_err(|_| Abort::Tcp),
                Ok(n) => {
                    to.write_all(&buf[..n]).await.map_err(|_| Abort::Tcp)?;
                    *moved += n as u64;
                    activity.touch();
                }
                Err(_) => return Err(Abort::Tcp),
            }
        }
    }
    let both = futures::future::try_join(
        pump(&mut cr, &mut uw, &mut up, &activity),
        pump(&mut ur, &mut cw, &mut down, &activity),
    );
    let result = tokio::select! {
        r = both => r.map(|_| ()),
        () = activity.idle(idle_timeout) => Err(Abort::Idle),
    };
    let idled = matches!(result, Err(Abort::Idle));
    let reset_both = result.is_err();
    if reset_both {
        if let Ok(tcp) = cr.reunite(cw) {
            reset(tcp);
        }
        if let Ok(tcp) = ur.reunite(uw) {
            reset(tcp);
        }
    }
    SpliceOutcome {
        tcp_to_quic: up,
        quic_to_tcp: down,
        reset: reset_both,
        idle: idled,
    }
}

/// Writes every byte of `chunks` to `w`, as few vectored writes as the socket allows, and
/// returns how many that was. The chunks are consumed (left empty).
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut chunks: &mut [Bytes],
) -> io::Result<usize> {
    let total = chunks.iter().map(Bytes::len).sum();
    loop {
        while chunks.first().is_some_and(Bytes::is_empty) {
            chunks = &mut chunks[1..];
        }
        if chunks.is_empty() {
            return Ok(total);
        }
        let mut slices = [IoSlice::new(&[]); QUIC_TO_TCP_CHUNKS];
        let count = chunks.len().min(QUIC_TO_TCP_CHUNKS);
        for (slice, chunk) in slices.iter_mut().zip(chunks.iter()) {
            *slice = IoSlice::new(chunk);
        }
        let mut written = w.write_vectored(&slices[..count]).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        for chunk in chunks.iter_mut() {
            let step = written.min(chunk.len());
            chunk.advance(step);
            written -= step;
            if written == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A writer that takes at most `limit` bytes per call, across slices, to exercise
    /// partial vectored writes.
    struct Trickle {
        out: Vec<u8>,
        limit: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut left = self.limit;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_vectored_writes_deliver_every_byte_in_order() {
        let pieces: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"abc".to_vec(),
            vec![7u8; 1000],
            b"".to_vec(),
            b"z".to_vec(),
            (0..=255u8).collect(),
        ];
        let expected: Vec<u8> = pieces.concat();
        for limit in [1, 2, 3, 7, 999, 1000, 1004, 5000] {
            let mut chunks: Vec<Bytes> = pieces.iter().cloned().map(Bytes::from).collect();
            let mut w = Trickle {
                out: Vec::new(),
                limit,
            };
            let n = write_all_chunks(&mut w, &mut chunks).await.expect("writes");
            assert_eq!(n, expected.len(), "limit {limit}");
            assert_eq!(w.out, expected, "limit {limit}");
            assert!(chunks.iter().all(Bytes::is_empty));
        }
    }

    /// Pure timer logic, on paused time: the idle deadline is exactly `timeout` after the last
    /// byte's instant (not a rounded one), moves with every byte, and the splice is not idle
    /// before it.
    #[tokio::test(start_paused = true)]
    async fn idle_fires_no_sooner_than_the_timeout_after_the_last_byte() {
        const TIMEOUT: Duration = Duration::from_millis(600);
        let activity = Activity::new();
        // Bytes move at instants that are not whole milliseconds after the splice began.
        tokio::time::advance(Duration::from_micros(1_700)).await;
        activity.touch();
        assert_eq!(activity.deadline(TIMEOUT), Instant::now() + TIMEOUT);
        let idle = activity.idle(TIMEOUT);
        tokio::pin!(idle);
        tokio::select! {
            () = &mut idle => panic!("idle while bytes were still moving"),
            () = tokio::time::sleep(TIMEOUT / 2) => {}
        }
        tokio::time::advance(Duration::from_micros(400)).await;
        activity.touch();
        let last_byte = Instant::now();
        assert_eq!(activity.deadline(TIMEOUT), last_byte + TIMEOUT);
        (&mut idle).await;
        let fired = Instant::now();
        assert!(
            fired >= last_byte + TIMEOUT,
            "idle {:?} after the last byte, before the {TIMEOUT:?} timeout",
            fired - last_byte
        );
        // The timer wheel rounds deadlines up to the next millisecond, no more.
        assert!(fired <= last_byte + TIMEOUT + Duration::from_millis(1));
    }

    #[tokio::test]
    async fn a_writer_that_takes_nothing_is_an_error_not_a_spin() {
        let mut chunks = vec![Bytes::from_static(b"data")];
        let mut w = Trickle {
            out: Vec::new(),
            limit: 0,
        };
        let err = write_all_chunks(&mut w, &mut chunks)
            .await
            .expect_err("WriteZero");
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
    }
}

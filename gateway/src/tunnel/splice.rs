//! Bytes both ways between a TCP connection and a QUIC stream, with half-close and reset
//! carried across.
//!
//! - TCP FIN (read returns 0) → QUIC `finish`; QUIC finish (read returns `None`) → TCP
//!   `shutdown(Write)` (FIN). Each direction ends on its own: half-closed connections keep
//!   flowing the other way.
//! - TCP RST (read/write fails) → QUIC `reset` of our send side and `stop` of our receive
//!   side; QUIC reset/stop from the peer or a lost connection → TCP RST (zero linger, close).
//! - Idle: no byte either way for `idle_timeout` resets both sides (RELIABILITY.md 12).
//! - Backpressure: each direction awaits its write before the next read, so a slow reader
//!   slows the writer down through TCP windows and QUIC flow control; nothing buffers more
//!   than one chunk per direction.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{ReadError, RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{RESET_ABORT, RESET_TCP};

const CHUNK: usize = 64 * 1024;
/// Buffer of the QUIC → TCP direction: large enough to gather a whole flight of packets.
const QUIC_TO_TCP_BUFFER: usize = 256 * 1024;

/// How a splice ended and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SpliceOutcome {
    /// Bytes read from TCP and written to the stream.
    pub tcp_to_quic: u64,
    /// Bytes read from the stream and written to TCP.
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
    // Milliseconds since `start` of the last byte moved in either direction. An atomic, not a
    // Cell, because the future must stay `Send`; both directions run in this one task.
    let start = Instant::now();
    let last_active = AtomicU64::new(0);
    let touch = || last_active.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);

    let tcp_to_quic = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match tr.read(&mut buf).await {
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
                    if send.write_all(&buf[..n]).await.is_err() {
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
        // `read` gathers every chunk quinn has ready into one buffer, so the TCP side sees
        // few large writes instead of one small `send` per QUIC packet (each of which runs
        // the kernel's receive path and wakes the reader): the copy is cheaper than those
        // system calls.
        let mut buf = vec![0u8; QUIC_TO_TCP_BUFFER];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    tw.write_all(&buf[..n]).await.map_err(|_| Abort::Tcp)?;
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

    let idle = async {
        loop {
            let last = Duration::from_millis(last_active.load(Ordering::Relaxed));
            let deadline = start + last + idle_timeout;
            if Instant::now() >= deadline {
                return Err::<(), Abort>(Abort::Idle);
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    let both = futures::future::try_join(tcp_to_quic, quic_to_tcp);
    let result = tokio::select! {
        r = both => r.map(|_| ()),
        Err(e) = idle => Err(e),
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
                // Zero linger makes close() send RST instead of FIN.
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
                drop(tcp);
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

//! A peer with a valid certificate that misbehaves on a stream: it says nothing, stops
//! halfway through its header, or sends something that is not a meshup header. Each such
//! stream is reset after `header_timeout` or answered `bad_request`, counted, and never
//! reaches a backend; the gateway keeps serving that peer's other streams and other peers.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use meshup_core::tunnel::{
    MAGIC, MAX_BODY_LEN, PREFIX_LEN, RequestHeader, Status, VERSION, decode_status, encode_header,
    encode_status,
};
use meshup_gateway::tunnel::RESET_ABORT;
use quinn::{ReadError, RecvStream, SendStream};

/// Short, so the test is quick, and long enough that a stream finished early (reset at once)
/// is told apart from one that timed out, even on a busy machine.
const HEADER_TIMEOUT: Duration = Duration::from_secs(1);

/// Streams the inbound side closed with `result`, from any caller.
fn closed(gw: &Gateway, result: &'static str) -> u64 {
    gw.sum(
        "meshup_tunnel_streams_closed_total",
        &[("direction", "inbound"), ("result", result)],
    ) as u64
}

/// Payload bytes the inbound side passed on to a backend, from any caller.
fn upstream_bytes(gw: &Gateway) -> u64 {
    gw.sum(
        "meshup_tunnel_bytes_total",
        &[("direction", "inbound"), ("flow", "to_upstream")],
    ) as u64
}

/// A header for `pay.prod:8080` that a gateway of `caller` may send.
fn header(caller: &str) -> RequestHeader {
    RequestHeader {
        request_id: 7,
        service: service(),
        port: SERVICE_PORT,
        caller: cluster(caller),
    }
}

/// Opens a stream, sends a valid header of `caller`, and returns the stream once the server
/// answered `connected`.
async fn open_tunnel(conn: &quinn::Connection, caller: &str) -> (SendStream, RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(&encode_header(&header(caller)))
        .await
        .expect("send header");
    let mut status = [0u8; 2];
    recv.read_exact(&mut status).await.expect("status answer");
    assert_eq!(decode_status(&status), Ok(Status::Connected));
    (send, recv)
}

/// Sends `msg` on a tunnel stream and reads the echo back.
async fn echo_over(send: &mut SendStream, recv: &mut RecvStream, msg: &[u8]) {
    send.write_all(msg).await.expect("send payload");
    let mut back = vec![0u8; msg.len()];
    recv.read_exact(&mut back).await.expect("echo");
    assert_eq!(back, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_complete_header_are_reset_after_the_header_timeout() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let west = Gateway::start("west", &pki.issue("west", "west"), |c| {
            c.header_timeout = HEADER_TIMEOUT;
        });
        west.export(echo.addr, &[]);
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let conn = raw_connection(&east, &west).await;
        let full = encode_header(&header("east"));

        // QUIC tells the server about a stream only when a frame of it, or of a later
        // stream, arrives: the silent stream is opened on the server by the next one.
        let (silent_send, silent_recv) = conn.open_bi().await.expect("open");
        let (mut magic_send, magic_recv) = conn.open_bi().await.expect("open");
        magic_send.write_all(&MAGIC[..2]).await.expect("write");
        let (mut half_send, half_recv) = conn.open_bi().await.expect("open");
        half_send
            .write_all(&full[..full.len() / 2])
            .await
            .expect("write");
        let sent = Instant::now();
        // Control: half a header and then the end of the stream is not a slow peer; it is
        // reset at once, not after the timeout.
        let (mut fin_send, fin_recv) = conn.open_bi().await.expect("open");
        fin_send
            .write_all(&full[..full.len() / 2])
            .await
            .expect("write");
        fin_send.finish().expect("finish");
        let fin_sent = Instant::now();

        let (fin_result, fin_after) = reset_code(fin_recv, fin_sent).await;
        assert_eq!(fin_result, Some(RESET_ABORT), "finished early: reset");
        assert!(
            fin_after < HEADER_TIMEOUT,
            "a stream finished before its header was reset only after {fin_after:?}"
        );

        let mut slow = vec![
            ("nothing sent", silent_send, silent_recv),
            ("two bytes of magic", magic_send, magic_recv),
            ("half a header", half_send, half_recv),
        ];
        for (what, send, recv) in slow.drain(..) {
            let (code, after) = reset_code(recv, sent).await;
            assert_eq!(code, Some(RESET_ABORT), "{what}: reset with the abort code");
            // The server's timer starts when the stream reached it, after `sent`.
            assert!(
                after >= HEADER_TIMEOUT,
                "{what}: reset after {after:?}, before the {HEADER_TIMEOUT:?} header timeout"
            );
            assert!(
                after < HEADER_TIMEOUT + Duration::from_secs(2),
                "{what}: reset only after {after:?}"
            );
            // The server also stops reading: what the peer writes from now on is refused.
            let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
                .await
                .expect("stop arrives");
            assert_eq!(stopped.ok().flatten(), Some(RESET_ABORT), "{what}: stopped");
        }

        // The three slow ones counted under `header_timeout`, the finished one under
        // `header_error`, nothing else; nothing reached a backend.
        assert_eventually(
            "three header timeouts counted",
            Duration::from_secs(5),
            || {
                let n = closed(&west, "header_timeout");
                async move { n == 3 }
            },
        )
        .await;
        assert_eq!(closed(&west, "header_timeout"), 3);
        assert_eq!(closed(&west, "header_error"), 1);
        assert_eq!(closed(&west, Status::BadRequest.as_str()), 0);
        assert_eq!(west.metrics.in_flight("inbound"), 0);
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 0, "backend dialed");
        assert_eq!(upstream_bytes(&west), 0);

        // The connection itself is fine: a proper stream on it still gets through.
        let (mut send, mut recv) = open_tunnel(&conn, "east").await;
        echo_over(&mut send, &mut recv, b"still here").await;
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

/// Waits for the server's side of the stream to end; returns the reset code (None if it
/// ended otherwise) and the time since `since`. Any byte from the server fails the test, and
/// so does a server that never gives up (the wait is bounded).
async fn reset_code(mut recv: RecvStream, since: Instant) -> (Option<quinn::VarInt>, Duration) {
    let mut buf = [0u8; 64];
    let limit = HEADER_TIMEOUT + Duration::from_secs(5);
    let read = tokio::time::timeout(limit, recv.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("stream neither answered nor reset within {limit:?}"));
    let code = match read {
        Ok(Some(n)) => panic!("server sent {:02x?} instead of a reset", &buf[..n]),
        Ok(None) => None,
        Err(ReadError::Reset(code)) => Some(code),
        Err(e) => panic!("stream ended by {e}, not a reset"),
    };
    (code, since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_are_refused_and_everything_else_keeps_working() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let west = Gateway::start("west", &pki.issue("west", "west"), |c| {
            c.header_timeout = HEADER_TIMEOUT;
        });
        west.export(echo.addr, &[]);
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let conn = raw_connection(&east, &west).await;

        // A proxied connection in flight on the same QUIC connection the whole time.
        let (mut good_send, mut good_recv) = open_tunnel(&conn, "east").await;
        echo_over(&mut good_send, &mut good_recv, b"before").await;

        let valid = encode_header(&header("east"));
        let patched = |at: usize, bytes: &[u8]| {
            let mut h = valid.clone();
            h[at..at + bytes.len()].copy_from_slice(bytes);
            h
        };
        let with_body_len = |len: u16| {
            let mut h = MAGIC.to_vec();
            h.push(VERSION);
            h.extend_from_slice(&len.to_be_bytes());
            // A body follows, so the refusal does not depend on waiting for more bytes.
            h.extend(std::iter::repeat_n(b'a', 64));
            h
        };
        // Body layout: request_id (8) | port (2) | ns_len | ns | ...
        let port_at = PREFIX_LEN + 8;
        let ns_at = PREFIX_LEN + 8 + 2 + 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "HTTP instead of a header",
                b"GET / HTTP/1.1\r\nHost: pay\r\n\r\n".to_vec(),
            ),
            ("body length 65535", with_body_len(u16::MAX)),
            (
                "body length one over the limit",
                with_body_len(MAX_BODY_LEN as u16 + 1),
            ),
            ("unknown version 2", patched(MAGIC.len(), &[2])),
            ("version 0", patched(MAGIC.len(), &[0])),
            ("port 0", patched(port_at, &[0, 0])),
            ("namespace not a DNS label", patched(ns_at, b"PROD")),
            ("magic only, wrong case", b"mshp".to_vec()),
        ];
        for (what, bytes) in &cases {
            let (mut send, mut recv) = conn.open_bi().await.expect("open");
            send.write_all(bytes).await.expect("write");
            // The refusal comes without the peer finishing its side, and it is the whole
            // answer: the status, then the end of the stream.
            let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(64))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
                .unwrap_or_else(|e| panic!("{what}: stream failed: {e}"));
            assert_eq!(
                answer,
                encode_status(Status::BadRequest),
                "{what}: answered {:?}",
                decode_status(&answer)
            );
            let stopped = tokio::time::timeout(Duration::from_secs(5), send.stopped())
                .await
                .expect("stop arrives");
            assert_eq!(stopped.ok().flatten(), Some(RESET_ABORT), "{what}: stopped");
            assert_eq!(
                echo.accepted.load(Ordering::SeqCst),
                1,
                "{what}: the backend was dialed"
            );
        }
        let refused = cases.len() as u64;
        assert_eventually("refusals counted", Duration::from_secs(5), || {
            let n = closed(&west, Status::BadRequest.as_str());
            async move { n == refused }
        })
        .await;
        assert_eq!(closed(&west, Status::BadRequest.as_str()), refused);
        assert_eq!(closed(&west, "header_error"), 0);
        // Bytes are counted when a stream ends: none of the refused ones carried any.
        assert_eq!(upstream_bytes(&west), 0);

        // The stream in flight is untouched, and new ones on the same connection work.
        echo_over(&mut good_send, &mut good_recv, b"after").await;
        let (mut again_send, mut again_recv) = open_tunnel(&conn, "east").await;
        echo_over(&mut again_send, &mut again_recv, b"new stream").await;
        // So do other peers, on their own connections.
        let south = Gateway::start("south", &pki.issue("south", "south"), |_| {});
        let other = raw_connection(&south, &west).await;
        let (mut south_send, mut south_recv) = open_tunnel(&other, "south").await;
        echo_over(&mut south_send, &mut south_recv, b"another peer").await;
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(
            conn.close_reason(),
            None,
            "the misbehaving streams did not cost the peer its connection"
        );

        // The three good streams end cleanly; they are the only ones that carried bytes.
        for (send, recv) in [
            (&mut good_send, &mut good_recv),
            (&mut again_send, &mut again_recv),
            (&mut south_send, &mut south_recv),
        ] {
            send.finish().expect("finish");
            let rest = recv.read_to_end(64).await.expect("clean end");
            assert!(rest.is_empty(), "unexpected bytes {rest:?}");
        }
        assert_eventually("good streams done", Duration::from_secs(5), || {
            let n = closed(&west, "done");
            async move { n == 3 }
        })
        .await;
        let carried =
            b"before".len() + b"after".len() + b"new stream".len() + b"another peer".len();
        assert_eq!(upstream_bytes(&west), carried as u64);
        assert_eq!(closed(&west, Status::BadRequest.as_str()), refused);
    })
    .await;
}

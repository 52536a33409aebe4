//! Shutting the DNS server down over TCP: a connection idle at that moment is closed at once,
//! a query the server is in the middle of receiving is still answered (then the connection
//! closes), a query that never completes is closed at its read deadline, no new connection
//! is accepted, and `run` returns as soon as the last connection is done, not at the drain
//! deadline.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use meshup_dns::fixture::three_clusters;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NAME: &str = "pay.prod.svc.clusterset.local.";

/// Bytes the server has not read yet from its side of the connection `client` → `server`,
/// from the kernel's socket table: zero means the server has taken everything sent so far.
/// `None` if the connection is not in the table (IPv4 loopback only, which the tests use).
fn unread_by_server(server: SocketAddr, client: SocketAddr) -> Option<u64> {
    let hex = |a: SocketAddr| match a {
        // The kernel prints the address as the native-endian value of its network-order bytes.
        SocketAddr::V4(v4) => format!(
            "{:08X}:{:04X}",
            u32::from_ne_bytes(v4.ip().octets()),
            v4.port()
        ),
        SocketAddr::V6(_) => String::new(),
    };
    let (local, remote) = (hex(server), hex(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&local.as_str()) || fields.get(2) != Some(&remote.as_str()) {
            return None;
        }
        let (_, rx) = fields.get(4)?.split_once(':')?;
        u64::from_str_radix(rx, 16).ok()
    })
}

/// Reads one length-prefixed reply.
async fn read_reply(stream: &mut TcpStream) -> anyhow::Result<Message> {
    let reply = read_tcp_reply(stream).await?;
    Ok(Message::from_vec(&reply)?)
}

/// Waits for the server to end the connection: EOF, or a reset if it closed with data
/// unread. Anything it sends instead is an error.
async fn closed_by_server(stream: &mut TcpStream, what: &str) -> anyhow::Result<()> {
    let mut byte = [0u8; 1];
    match tokio::time::timeout(REPLY_DEADLINE, stream.read(&mut byte)).await {
        Err(_) => anyhow::bail!("{what}: still open {REPLY_DEADLINE:?} after shutdown"),
        Ok(Ok(0)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
        Ok(Ok(_)) => anyhow::bail!("{what}: the server sent more bytes"),
        Ok(Err(e)) => anyhow::bail!("{what}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_query_in_flight_closes_idle_ones_and_refuses_new_ones()
-> anyhow::Result<()> {
    with_deadline(async {
        let mut server = TestServer::start(three_clusters(), |_| {}).await?;
        // Two connections the server took and answered once.
        let mut idle = TcpStream::connect(server.addr).await?;
        let mut busy = TcpStream::connect(server.addr).await?;
        for s in [&mut idle, &mut busy] {
            let reply = tcp_exchange(s, &query(1, NAME, RecordType::A, None)).await?;
            assert_eq!(
                Message::from_vec(&reply)?.metadata.response_code,
                ResponseCode::NoError
            );
        }
        // `busy` starts its next query: the length and half the message, and the server
        // reads them (so it is inside that query when the shutdown comes).
        let q = query(2, NAME, RecordType::A, None);
        busy.write_all(&u16::try_from(q.len())?.to_be_bytes())
            .await?;
        busy.write_all(&q[..q.len() / 2]).await?;
        let client = busy.local_addr()?;
        assert_eventually("server read the half query", REPLY_DEADLINE, || async {
            unread_by_server(server.addr, client) == Some(0)
        })
        .await;

        server.begin_stop();
        closed_by_server(&mut idle, "idle connection").await?;
        // New connections are refused: the listening socket is closed, not merely no longer
        // accepted from (clients would then wait for answers that never come).
        assert_eventually("new connections refused", REPLY_DEADLINE, || async {
            TcpStream::connect(server.addr)
                .await
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .await;
        // The query in flight is answered in full, then its connection is closed too.
        busy.write_all(&q[q.len() / 2..])
            .await
            .context("the query in flight was cut off")?;
        let reply = read_reply(&mut busy).await?;
        assert_eq!(reply.metadata.id, 2);
        assert_eq!(rdata(&reply), ["A 10.64.0.1"]);
        closed_by_server(&mut busy, "connection after its last answer").await?;
        // Nothing else was open, so the server stops now rather than at its drain deadline.
        let took = server.stopped_within(Duration::from_secs(3)).await?;
        eprintln!("stopped {took:?} after the last answer");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_never_completes_is_closed_at_its_read_deadline() -> anyhow::Result<()> {
    const IDLE: Duration = Duration::from_millis(800);
    with_deadline(async {
        let mut server = TestServer::start(three_clusters(), |c| c.tcp_idle_timeout = IDLE).await?;
        let mut stuck = TcpStream::connect(server.addr).await?;
        tcp_exchange(&mut stuck, &query(1, NAME, RecordType::A, None)).await?;
        // Forty bytes announced, three sent, no more ever.
        stuck.write_all(&[0, 40, 0x12, 0x34, 0x01]).await?;
        let last_byte = tokio::time::Instant::now();
        let client = stuck.local_addr()?;
        assert_eventually(
            "server read the stuck query's start",
            REPLY_DEADLINE,
            || async { unread_by_server(server.addr, client) == Some(0) },
        )
        .await;
        server.begin_stop();
        closed_by_server(&mut stuck, "stuck connection").await?;
        // Like any query in flight it had its whole read deadline, and no more.
        let open_for = last_byte.elapsed();
        assert!(open_for >= IDLE, "closed {open_for:?} after its last byte");
        assert!(
            open_for < IDLE + REPLY_DEADLINE,
            "closed only after {open_for:?}"
        );
        // The stuck connection held the shutdown for its read deadline at most.
        let took = server.stopped_within(IDLE + Duration::from_secs(2)).await?;
        eprintln!("stopped {took:?} after the stuck connection closed");
        Ok(())
    })
    .await
}

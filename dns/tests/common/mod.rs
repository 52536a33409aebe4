//! Harness for the DNS server tests: a server on 127.0.0.1:0 fed from a `watch` channel,
//! raw UDP/TCP query helpers and a deadline for every test. Waiting on a condition comes from
//! `meshup-test-support`.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use meshup_core::catalog::Snapshot;
use meshup_core::names::ClusterName;
use meshup_dns::{DnsConfig, DnsServer, Metrics};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

// Not every test binary uses both.
#[allow(unused_imports)]
pub use meshup_test_support::{assert_eventually, eventually_ok};

/// Every test body runs under this deadline.
pub const TEST_DEADLINE: Duration = Duration::from_secs(30);
/// How long a single query waits for its answer.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(3);

/// Runs a test body with a deadline; a hang fails the test instead of blocking CI.
pub async fn with_deadline<F: Future<Output = anyhow::Result<()>>>(body: F) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_DEADLINE, body)
        .await
        .map_err(|_| anyhow::anyhow!("test did not finish within {TEST_DEADLINE:?}"))?
}

/// A running server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub catalog: watch::Sender<Arc<Snapshot>>,
    pub registry: Registry,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), meshup_dns::DnsError>>>,
}

impl TestServer {
    /// Starts a server for cluster `east` on a free loopback port.
    pub async fn start(
        snapshot: Snapshot,
        tweak: impl FnOnce(&mut DnsConfig),
    ) -> anyhow::Result<Self> {
        let mut cfg = DnsConfig {
            listen: "127.0.0.1:0".parse()?,
            ..DnsConfig::default()
        };
        tweak(&mut cfg);
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let server = DnsServer::bind(&cfg, ClusterName::new("east")?, rx, metrics)?;
        let addr = server.local_addr();
        let shutdown = CancellationToken::new();
        let task = server.spawn(shutdown.clone());
        Ok(Self {
            addr,
            catalog: tx,
            registry,
            shutdown,
            task: Some(task),
        })
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task).await???;
        }
        Ok(())
    }

    /// Starts the shutdown without waiting for it, so a test can watch the drain.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server's `run` has returned, at most `limit`; how long that took.
    pub async fn stopped_within(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let started = tokio::time::Instant::now();
        let task = self
            .task
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("server already stopped"))?;
        tokio::time::timeout(limit, task)
            .await
            .map_err(|_| anyhow::anyhow!("server still running {limit:?} after shutdown"))???;
        self.task = None;
        Ok(started.elapsed())
    }

    /// The metrics in Prometheus text form.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap_or_else(|e| panic!("bad test name {s:?}: {e}"))
}

/// A query message; `edns` is the advertised UDP size, if any.
pub fn query(id: u16, qname: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(name(qname), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg.to_vec()
        .unwrap_or_else(|e| panic!("cannot encode query: {e}"))
}

/// Sends raw bytes over UDP and returns the raw reply (error if none within the deadline).
pub async fn udp_raw(addr: SocketAddr, packet: &[u8]) -> anyhow::Result<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(packet, addr).await?;
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(REPLY_DEADLINE, sock.recv_from(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("no UDP reply within {REPLY_DEADLINE:?}"))??;
    buf.truncate(n);
    Ok(buf)
}

/// One query over UDP, decoded.
pub async fn udp(
    addr: SocketAddr,
    qname: &str,
    qtype: RecordType,
    edns: Option<u16>,
) -> anyhow::Result<Message> {
    let id = rand::random();
    let reply = udp_raw(addr, &query(id, qname, qtype, edns)).await?;
    let msg = Message::from_vec(&reply)?;
    anyhow::ensure!(
        msg.metadata.id == id,
        "reply has ID {} for query {id}",
        msg.metadata.id
    );
    Ok(msg)
}

/// Sends one length-prefixed message on a TCP stream and reads one reply.
pub async fn tcp_exchange(stream: &mut TcpStream, packet: &[u8]) -> anyhow::Result<Vec<u8>> {
    let len = u16::try_from(packet.len())?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(packet).await?;
    read_tcp_reply(stream).await
}

/// Reads one length-prefixed reply from a TCP stream, within [`REPLY_DEADLINE`].
pub async fn read_tcp_reply(stream: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    tokio::time::timeout(REPLY_DEADLINE, async {
        let len = stream.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await?;
        anyhow::Ok(buf)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no TCP reply within {REPLY_DEADLINE:?}"))?
}

/// One query over a fresh TCP connection, decoded.
pub async fn tcp(addr: SocketAddr, qname: &str, qtype: RecordType) -> anyhow::Result<Message> {
    let mut stream = TcpStream::connect(addr).await?;
    let id = rand::random();
    let reply = tcp_exchange(&mut stream, &query(id, qname, qtype, None)).await?;
    let msg = Message::from_vec(&reply)?;
    anyhow::ensure!(
        msg.metadata.id == id,
        "reply has ID {} for query {id}",
        msg.metadata.id
    );
    Ok(msg)
}

/// Record data as text, e.g. `A 10.64.0.1`.
pub fn rdata(msg: &Message) -> Vec<String> {
    msg.answers
        .iter()
        .map(|r| format!("{} {}", r.record_type(), r.data))
        .collect()
}

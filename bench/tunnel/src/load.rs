//! The load generator: throughput, warm request/response latency and new-connection latency.
//!
//! Every loop is bounded twice: by a count or a duration, and by a hard time limit after
//! which the phase fails instead of hanging on a stalled tunnel.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::protocol::{FRAME_PAYLOAD, MESSAGE_SIZE, MODE_ECHO, MODE_SINK, SINK_READY};

/// Limit for establishing one connection through a tunnel.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Extra time a throughput connection gets after its sending window to drain the tunnel's
/// buffers and receive the backend's byte count.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// Requests sent on the request/response connection before measuring, to warm caches,
/// congestion windows and the tunnels' buffers.
const WARMUP_REQUESTS: usize = 200;
/// Largest latency recorded in the histograms (ns): anything slower is clamped.
const HISTOGRAM_MAX_NS: u64 = 60_000_000_000;

/// Result of one throughput phase.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    /// Payload bytes the backend confirmed it received.
    pub bytes: u64,
    /// From the common start until the last backend answer.
    pub elapsed: Duration,
}

impl Throughput {
    /// Gigabits per second.
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e9
    }
}

/// Latency percentiles of one phase, in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Operations done in the phase, warm-up included (what the tunnel's CPU was spent on).
    pub ops: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Latency {
    fn from_histogram(hist: &Histogram<u64>, ops: u64) -> Self {
        Self {
            ops,
            p50_us: hist.value_at_quantile(0.50) as f64 / 1e3,
            p99_us: hist.value_at_quantile(0.99) as f64 / 1e3,
        }
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let stream = timeout(CONNECT_LIMIT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connect to {addr}: no answer within {CONNECT_LIMIT:?}"))?
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    Ok(stream)
}

/// `connections` streams each send for `duration`, all starting together; the aggregate is
/// what the backend confirmed over the time until the last confirmation.
pub async fn throughput(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> Result<Throughput> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(open_sink(addr).await?);
    }
    // Connections are set up end to end (the backend has answered on each) before the clock
    // starts: this measure is about the data path, connection set-up has its own phase.
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|stream| tokio::spawn(send_until(stream, deadline)))
        .collect();
    let mut bytes = 0;
    for task in tasks {
        let confirmed = timeout(duration + DRAIN_LIMIT, task)
            .await
            .context("throughput connection did not finish in time (tunnel stalled?)")?
            .context("throughput task panicked")??;
        bytes += confirmed;
    }
    Ok(Throughput {
        bytes,
        elapsed: start.elapsed(),
    })
}

/// Connects and waits for the backend's ready byte, proving every hop is established.
async fn open_sink(addr: SocketAddr) -> Result<TcpStream> {
    let mut stream = connect(addr).await?;
    stream
        .write_all(&[MODE_SINK])
        .await
        .context("write mode byte")?;
    let mut ready = [0u8; 1];
    timeout(CONNECT_LIMIT, stream.read_exact(&mut ready))
        .await
        .context("backend did not answer a new throughput connection within 10 s")?
        .context("read backend ready byte")?;
    ensure!(
        ready[0] == SINK_READY,
        "unexpected ready byte {:#x}",
        ready[0]
    );
    Ok(stream)
}

/// Sends frames until `deadline`, then the end frame; returns the backend's byte count after
/// checking that it matches what was sent (so a tunnel that drops data cannot look fast).
async fn send_until(mut stream: TcpStream, deadline: Instant) -> Result<u64> {
    let mut frame = vec![0x5au8; 4 + FRAME_PAYLOAD];
    frame[..4].copy_from_slice(&(FRAME_PAYLOAD as u32).to_be_bytes());
    let mut sent: u64 = 0;
    while Instant::now() < deadline {
        stream.write_all(&frame).await.context("write frame")?;
        sent += FRAME_PAYLOAD as u64;
    }
    stream
        .write_all(&0u32.to_be_bytes())
        .await
        .context("write end frame")?;
    let mut count = [0u8; 8];
    stream
        .read_exact(&mut count)
        .await
        .context("read backend byte count")?;
    let confirmed = u64::from_be_bytes(count);
    ensure!(
        confirmed == sent,
        "backend confirmed {confirmed} bytes but {sent} were sent"
    );
    Ok(confirmed)
}

/// One warm connection for sequential 1 KiB request/response exchanges, measured in slices
/// so that contenders can take turns: on a shared machine the background load shifts within
/// seconds, and interleaving lets every contender see the same mix of it.
#[derive(Debug)]
pub struct RrConnection {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
    hist: Histogram<u64>,
    /// Requests done so far, warm-up included.
    ops: u64,
    /// Time spent inside `open` and `run`, checked against the phase limit.
    active: Duration,
    limit: Duration,
}

impl RrConnection {
    /// Connects and sends the warm-up requests (not recorded).
    pub async fn open(addr: SocketAddr, limit: Duration) -> Result<Self> {
        let t0 = Instant::now();
        let stream = connect(addr).await?;
        let mut request = vec![0x42u8; MESSAGE_SIZE];
        request[0] = MODE_ECHO;
        let mut conn = Self {
            stream,
            request,
            response: vec![0u8; MESSAGE_SIZE],
            hist: new_histogram()?,
            ops: 0,
            active: Duration::ZERO,
            limit,
        };
        for _ in 0..WARMUP_REQUESTS {
            conn.exchange().await?;
        }
        conn.active += t0.elapsed();
        Ok(conn)
    }

    /// `requests` measured exchanges.
    pub async fn run(&mut self, requests: usize) -> Result<()> {
        let t0 = Instant::now();
        for i in 0..requests {
            if self.active + t0.elapsed() > self.limit {
                bail!(
                    "request/response phase exceeded {:?} after {} requests",
                    self.limit,
                    self.ops as usize + i
                );
            }
            let elapsed = self.exchange().await?;
            record(&mut self.hist, elapsed);
        }
        self.active += t0.elapsed();
        Ok(())
    }

    /// Percentiles of the measured exchanges so far.
    pub fn latency(&self) -> Latency {
        Latency::from_histogram(&self.hist, self.ops)
    }

    async fn exchange(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        // A single request must not hang the run: bound each one.
        timeout(Duration::from_secs(5), async {
            self.stream
                .write_all(&self.request)
                .await
                .context("write request")?;
            self.stream
                .read_exact(&mut self.response)
                .await
                .context("read response")?;
            anyhow::Ok(())
        })
        .await
        .context("request got no response within 5 s")??;
        self.ops += 1;
        Ok(t0.elapsed())
    }
}

/// `connections` times: connect, send 1 KiB, wait for the first response byte, close.
/// The time covers the whole set-up through the tunnel (handshakes included).
pub async fn new_connections(
    addr: SocketAddr,
    connections: usize,
    limit: Duration,
) -> Result<Latency> {
    let started = Instant::now();
    let mut request = vec![0x42u8; MESSAGE_SIZE];
    request[0] = MODE_ECHO;
    let mut response = vec![0u8; MESSAGE_SIZE];
    let mut hist = new_histogram()?;
    for i in 0..connections {
        if started.elapsed() > limit {
            bail!("new-connection phase exceeded {limit:?} after {i} connections");
        }
        let t0 = Instant::now();
        let mut stream = connect(addr).await?;
        let first = timeout(Duration::from_secs(5), async {
            stream.write_all(&request).await.context("write request")?;
            let n = stream
                .read(&mut response)
                .await
                .context("read first response byte")?;
            ensure!(n > 0, "connection closed before the first response byte");
            anyhow::Ok(n)
        })
        .await
        .context("new connection got no response within 5 s")??;
        record(&mut hist, t0.elapsed());
        // Drain the rest of the response so the backend's write never sees a reset, then
        // close; not timed.
        let _ = timeout(Duration::from_secs(1), async {
            let mut got = first;
            while got < MESSAGE_SIZE {
                match stream.read(&mut response).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
        })
        .await;
    }
    Ok(Latency::from_histogram(&hist, connections as u64))
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_NS, 3).context("create latency histogram")
}

fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(ns.clamp(1, HISTOGRAM_MAX_NS));
}

//! A workload of new connections, and the checker of what a fault did to it.
//!
//! [`Workload`] runs `loops` concurrent loops; each opens a NEW TCP connection at its own
//! target rate, sends a short request at once (the client speaks first), reads the echo,
//! checks it byte for byte and closes. Every attempt becomes an [`Outcome`]: when it started,
//! how long connect → whole response took, and why it failed if it did. The rate holds while
//! attempts hang: a loop does not wait for its attempt to end before it starts the next
//! (a loop that waited would offer almost no load while the path is broken, which is the
//! very second being measured). Attempts in flight are bounded all the same: each ends
//! within [`Workload::timeout`], so a loop has at most `rate × timeout` of them. A loop that
//! falls behind its schedule does not burst to catch up.
//!
//! [`check`] cuts the outcomes at a fault instant into three phases (before, the first
//! `window` after, the rest) and computes per phase: attempts, failures by reason, p50/p99
//! latency of the successes; and over everything that started at or after the fault, the time
//! until the last failure and until the start of an unbroken run of successes.
//!
//! [`LongStream`] is one long connection (a bulk transfer, or a slow steady one) whose
//! echo is checked by SHA-256, with its duration for throughput.
//!
//! [`EchoServer`] is the backend: it echoes every byte and records when it accepted each
//! client connection, so a test can say which of several servers served a phase.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What one workload does.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Where every connection goes.
    pub addr: SocketAddr,
    /// Concurrent loops.
    pub loops: usize,
    /// New connections per second of each loop.
    pub rate_per_loop: f64,
    /// Bytes of each request (at least 32: the request names its loop and sequence number,
    /// so an echo of another connection's bytes is caught).
    pub request_len: usize,
    /// Longest connect → whole response; past it the attempt is a [`Failure::Timeout`].
    pub timeout: Duration,
    /// Hard bound on the whole run: the loops stop by themselves after it.
    pub limit: Duration,
}

impl Workload {
    /// `loops` loops at `rate_per_loop` connections per second each, 64-byte requests,
    /// 2 s timeout, at most 120 s.
    pub fn new(addr: SocketAddr, loops: usize, rate_per_loop: f64) -> Self {
        Self {
            addr,
            loops,
            rate_per_loop,
            request_len: 64,
            timeout: Duration::from_secs(2),
            limit: Duration::from_secs(120),
        }
    }

    /// Starts the loops on the current tokio runtime.
    pub fn start(self) -> Running {
        let origin = Instant::now();
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(1.0 / self.rate_per_loop.max(0.001));
        let tasks = (0..self.loops)
            .map(|id| {
                let (outcomes, stop, w) = (outcomes.clone(), stop.clone(), self.clone());
                tokio::spawn(async move {
                    // Loops start spread over one interval, not all at once.
                    let mut next = origin + interval.mul_f64(id as f64 / w.loops.max(1) as f64);
                    let mut seq = 0u64;
                    let mut in_flight = JoinSet::new();
                    while !stop.load(Ordering::Relaxed) && origin.elapsed() < w.limit {
                        tokio::time::sleep_until(next.into()).await;
                        while in_flight.try_join_next().is_some() {}
                        let request = request_bytes(id, seq, w.request_len);
                        let (outcomes, addr, timeout) = (outcomes.clone(), w.addr, w.timeout);
                        in_flight.spawn(async move {
                            let begun = Instant::now();
                            let result = attempt(addr, &request, timeout).await;
                            let outcome = Outcome {
                                start: begun - origin,
                                latency: begun.elapsed(),
                                result,
                            };
                            outcomes.lock().expect("outcome list lock").push(outcome);
                        });
                        seq += 1;
                        next = (next + interval).max(Instant::now());
                    }
                    while in_flight.join_next().await.is_some() {}
                })
            })
            .collect();
        Running {
            origin,
            outcomes,
            stop,
            tasks,
        }
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// The connect was refused (nothing listens).
    Refused,
    /// The connection was reset (or aborted, or the pipe broke) before the whole echo came.
    Reset,
    /// No whole echo within the workload's timeout.
    Timeout,
    /// The answer differed from the request.
    WrongBytes,
    /// The connection was closed cleanly before the whole echo came.
    Closed,
    /// Any other I/O error.
    Other,
}

impl Failure {
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Refused => "refused",
            Failure::Reset => "reset",
            Failure::Timeout => "timeout",
            Failure::WrongBytes => "wrong bytes",
            Failure::Closed => "closed",
            Failure::Other => "other",
        }
    }

    fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Failure::Refused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => Failure::Reset,
            K::UnexpectedEof => Failure::Closed,
            K::TimedOut => Failure::Timeout,
            _ => Failure::Other,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One attempt: when it started (from the workload's origin), how long connect → whole echo
/// (or → the failure) took, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub start: Duration,
    pub latency: Duration,
    pub result: Result<(), Failure>,
}

impl Outcome {
    /// When the attempt ended, from the origin.
    pub fn end(&self) -> Duration {
        self.start + self.latency
    }
}

/// A running workload.
#[derive(Debug)]
pub struct Running {
    origin: Instant,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The instant outcome start times count from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// `at` as an offset from the origin (zero if earlier).
    pub fn offset(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.origin)
    }

    /// The outcomes so far, in the order they ended.
    pub fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().expect("outcome list lock").clone()
    }

    /// Successful attempts that started at or after `since` (an offset from the origin).
    pub fn successes_since(&self, since: Duration) -> usize {
        self.outcomes
            .lock()
            .expect("outcome list lock")
            .iter()
            .filter(|o| o.start >= since && o.result.is_ok())
            .count()
    }

    /// Stops the loops (the attempts in flight finish, bounded by the timeout) and returns
    /// every outcome.
    pub async fn stop(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        self.join().await
    }

    /// Waits until the loops end by themselves at the workload's limit; returns every
    /// outcome.
    pub async fn finish(mut self) -> Vec<Outcome> {
        self.join().await
    }

    async fn join(&mut self) -> Vec<Outcome> {
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.outcomes()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The request of loop `id`'s `seq`-th connection: a line naming both, padded to `len`.
fn request_bytes(id: usize, seq: u64, len: usize) -> Vec<u8> {
    let mut bytes = format!("workload loop {id} connection {seq} ").into_bytes();
    let pad = (bytes.len()..len.max(32)).map(|i| b'a' + (i % 26) as u8);
    bytes.extend(pad);
    bytes
}

/// One connection: connect, send `request`, read as many bytes back, compare, close.
async fn attempt(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<(), Failure> {
    let exchange = async {
        let mut conn = TcpStream::connect(addr)
            .await
            .map_err(|e| Failure::of(&e))?;
        let _ = conn.set_nodelay(true);
        conn.write_all(request).await.map_err(|e| Failure::of(&e))?;
        let mut answer = vec![0u8; request.len()];
        conn.read_exact(&mut answer)
            .await
            .map_err(|e| Failure::of(&e))?;
        if answer == request {
            Ok(())
        } else {
            Err(Failure::WrongBytes)
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

// === long streams ===

/// One long connection: the client sends `total` bytes of a seeded pseudo-random pattern in
/// `chunk`-byte writes (one every `pace`, or as fast as the path takes them), half-closes,
/// and reads the echo meanwhile; the SHA-256 of what came back must equal that of what went
/// out. Bounded by `timeout` as a whole.
#[derive(Debug, Clone)]
pub struct LongStream {
    pub addr: SocketAddr,
    pub total: u64,
    pub chunk: usize,
    /// Time between writes; `None`: back to back (a bulk transfer).
    pub pace: Option<Duration>,
    pub timeout: Duration,
    /// Seeds the pattern, so two streams carry different bytes.
    pub seed: u64,
}

/// How a [`LongStream`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOutcome {
    /// When it started and ended.
    pub started: Instant,
    pub ended: Instant,
    /// Bytes written and echoed bytes read.
    pub sent: u64,
    pub received: u64,
    /// SHA-256 of the bytes sent and of the bytes received, in hex.
    pub sent_sha256: String,
    pub received_sha256: String,
    /// `Ok` only if every byte came back and the hashes match.
    pub result: Result<(), Failure>,
}

impl StreamOutcome {
    /// How long it ran.
    pub fn elapsed(&self) -> Duration {
        self.ended - self.started
    }

    /// Echoed megabytes (10^6 bytes) per second.
    pub fn megabytes_per_second(&self) -> f64 {
        self.received as f64 / 1e6 / self.elapsed().as_secs_f64().max(1e-9)
    }
}

impl LongStream {
    /// A bulk transfer of `total` bytes in 64 KiB writes, as fast as the path allows.
    pub fn bulk(addr: SocketAddr, total: u64, timeout: Duration) -> Self {
        Self {
            addr,
            total,
            chunk: 64 * 1024,
            pace: None,
            timeout,
            seed: 1,
        }
    }

    /// Runs the stream to its end.
    pub async fn run(self) -> StreamOutcome {
        use rand::{RngCore, SeedableRng};
        use sha2::{Digest, Sha256};
        let started = Instant::now();
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let hashes = Arc::new(Mutex::new((Sha256::new(), Sha256::new())));
        let exchange = {
            let (sent, received, hashes) = (sent.clone(), received.clone(), hashes.clone());
            let this = self.clone();
            async move {
                let conn = TcpStream::connect(this.addr)
                    .await
                    .map_err(|e| Failure::of(&e))?;
                let _ = conn.set_nodelay(true);
                let (mut r, mut w) = conn.into_split();
                let writer = async {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(this.seed);
                    let mut buf = vec![0u8; this.chunk.max(1)];
                    let mut left = this.total;
                    while left > 0 {
                        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                        rng.fill_bytes(&mut buf[..n]);
                        hashes.lock().expect("hash lock").0.update(&buf[..n]);
                        w.write_all(&buf[..n]).await.map_err(|e| Failure::of(&e))?;
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                        left -= n as u64;
                        if let Some(pace) = this.pace {
                            tokio::time::sleep(pace).await;
                        }
                    }
                    w.shutdown().await.map_err(|e| Failure::of(&e))
                };
                let reader = async {
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let n = r.read(&mut buf).await.map_err(|e| Failure::of(&e))?;
                        if n == 0 {
                            return Ok::<(), Failure>(());
                        }
                        hashes.lock().expect("hash lock").1.update(&buf[..n]);
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                };
                // The reader's error is the one that says what happened to the connection
                // (a reset); the writer's may only be its echo (a broken pipe).
                let (wrote, read) = tokio::join!(writer, reader);
                read.and(wrote)
            }
        };
        let result = tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout));
        let ended = Instant::now();
        let (sent_hash, received_hash) = {
            let h = hashes.lock().expect("hash lock");
            (h.0.clone().finalize(), h.1.clone().finalize())
        };
        let (sent, received) = (
            sent.load(Ordering::Relaxed),
            received.load(Ordering::Relaxed),
        );
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let result = result.and_then(|()| {
            if sent == self.total && received == sent && sent_hash == received_hash {
                Ok(())
            } else if received < sent {
                Err(Failure::Closed)
            } else {
                Err(Failure::WrongBytes)
            }
        });
        StreamOutcome {
            started,
            ended,
            sent,
            received,
            sent_sha256: hex(&sent_hash),
            received_sha256: hex(&received_hash),
            result,
        }
    }
}

// === the checker ===

/// Figures of the attempts that started in one phase.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Phase {
    pub attempts: usize,
    pub failed: BTreeMap<Failure, usize>,
    /// Latency of the successful attempts (nearest rank); `None` without a success.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Phase {
    /// The figures of `outcomes` (a test picks which: by start time, for instance).
    pub fn of<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> Self {
        let mut phase = Phase::default();
        let mut latencies = Vec::new();
        for o in outcomes {
            phase.attempts += 1;
            match o.result {
                Ok(()) => latencies.push(o.latency),
                Err(f) => *phase.failed.entry(f).or_default() += 1,
            }
        }
        latencies.sort_unstable();
        phase.p50 = percentile(&latencies, 50);
        phase.p99 = percentile(&latencies, 99);
        phase
    }

    /// Failed attempts, whatever the reason.
    pub fn failures(&self) -> usize {
        self.failed.values().sum()
    }

    /// Failed attempts in percent of attempts (0 without attempts).
    pub fn failed_percent(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            100.0 * self.failures() as f64 / self.attempts as f64
        }
    }

    /// Failures by reason, e.g. `3 (reset 2, timeout 1)`, or `0`.
    pub fn failures_text(&self) -> String {
        if self.failed.is_empty() {
            return "0".to_owned();
        }
        let reasons: Vec<String> = self
            .failed
            .iter()
            .map(|(f, n)| format!("{f} {n}"))
            .collect();
        format!("{} ({})", self.failures(), reasons.join(", "))
    }
}

/// The `q`-th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[Duration], q: usize) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len()).div_ceil(100).max(1);
    Some(sorted[rank - 1])
}

/// What a fault did to a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultFigures {
    /// The fault, as an offset from the workload's origin.
    pub fault: Duration,
    /// Length of the `first` phase.
    pub window: Duration,
    /// Attempts that started before the fault.
    pub before: Phase,
    /// Of those, failed ones still in flight at the fault (they ended after it).
    pub before_in_flight_failed: usize,
    /// Attempts that started in `[fault, fault + window)`.
    pub first: Phase,
    /// Attempts that started at `fault + window` or later.
    pub after: Phase,
    /// From the fault to the start of the last failed attempt that started at or after it;
    /// `None` when none failed.
    pub last_failure: Option<Duration>,
    /// From the fault to the start of the unbroken run of successes that ends the run (zero
    /// when nothing failed); `None` when the last attempt failed or none started after the
    /// fault: no recovery was seen.
    pub recovered: Option<Duration>,
}

impl FaultFigures {
    /// Failures that started before the fault and did not end before it either: connections
    /// the fault cut, as opposed to ones that failed on their own.
    pub fn failed_before_fault(&self) -> usize {
        self.before.failures() - self.before_in_flight_failed
    }
}

/// Cuts `outcomes` at `fault` (an offset from the workload's origin) into before, the first
/// `window` after, and the rest, and finds the last failure and the recovery.
pub fn check(outcomes: &[Outcome], fault: Duration, window: Duration) -> FaultFigures {
    let before = outcomes.iter().filter(|o| o.start < fault);
    let before_in_flight_failed = before
        .clone()
        .filter(|o| o.result.is_err() && o.end() >= fault)
        .count();
    let mut since: Vec<&Outcome> = outcomes.iter().filter(|o| o.start >= fault).collect();
    since.sort_by_key(|o| o.start);
    let last_failed = since.iter().rposition(|o| o.result.is_err());
    let recovered = match last_failed {
        _ if since.is_empty() => None,
        None => Some(Duration::ZERO),
        Some(i) => since.get(i + 1).map(|o| o.start - fault),
    };
    FaultFigures {
        fault,
        window,
        before: Phase::of(before),
        before_in_flight_failed,
        first: Phase::of(since.iter().copied().filter(|o| o.start < fault + window)),
        after: Phase::of(since.iter().copied().filter(|o| o.start >= fault + window)),
        last_failure: last_failed.map(|i| since[i].start - fault),
        recovered,
    }
}

/// From `fault` to the start of the last successful attempt that started at or after it and
/// took longer than `over`: how long the fault kept new connections slow (`None`: none was).
/// A failover that makes connections wait instead of fail shows here, not in the failures.
pub fn last_slower_than(outcomes: &[Outcome], fault: Duration, over: Duration) -> Option<Duration> {
    outcomes
        .iter()
        .filter(|o| o.start >= fault && o.result.is_ok() && o.latency > over)
        .map(|o| o.start - fault)
        .max()
}

/// Milliseconds with one decimal, or `-`.
pub fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0),
    )
}

impl fmt::Display for FaultFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let window = format!("first {:.1?}", self.window);
        writeln!(
            f,
            "{:<14} {:>8} {:>10}  {:<34} {:>10} {:>10}",
            "phase", "attempts", "failed %", "failed (by reason)", "p50", "p99"
        )?;
        for (name, phase) in [
            ("before", &self.before),
            (window.as_str(), &self.first),
            ("after", &self.after),
        ] {
            writeln!(
                f,
                "{:<14} {:>8} {:>9.2}%  {:<34} {:>10} {:>10}",
                name,
                phase.attempts,
                phase.failed_percent(),
                phase.failures_text(),
                ms(phase.p50),
                ms(phase.p99)
            )?;
        }
        if self.before_in_flight_failed > 0 {
            writeln!(
                f,
                "  ({} of the failures before were in flight at the fault)",
                self.before_in_flight_failed
            )?;
        }
        write!(
            f,
            "fault → last failure: {}; fault → unbroken successes: {}",
            self.last_failure
                .map_or_else(|| "none failed".to_owned(), |d| ms(Some(d))),
            self.recovered
                .map_or_else(|| "NOT RECOVERED".to_owned(), |d| ms(Some(d)))
        )
    }
}

// === a run with a fault ===

/// How a workload meets a fault: how much load comes before it, how long the first phase
/// after it is, and how long the workload goes on once it has recovered.
#[derive(Debug, Clone, Copy)]
pub struct FaultPlan {
    /// Successful attempts before the fault is injected (the path is warm by then).
    pub warm_successes: usize,
    /// The first phase after the fault (the failover target's second).
    pub window: Duration,
    /// How long an unbroken run of successes must last, past the end of the window, before
    /// the run ends.
    pub settle: Duration,
    /// Longest wait for the warm-up, and for the recovery after the fault.
    pub limit: Duration,
}

impl Default for FaultPlan {
    /// 200 successes first, a 1 s window, 2 s of unbroken successes after it, 15 s limits.
    fn default() -> Self {
        Self {
            warm_successes: 200,
            window: Duration::from_secs(1),
            settle: Duration::from_secs(2),
            limit: Duration::from_secs(15),
        }
    }
}

/// What [`run_with_fault`] saw.
#[derive(Debug, Clone)]
pub struct FaultRun {
    pub figures: FaultFigures,
    /// When the workload started.
    pub origin: Instant,
    /// The instant the fault closure returned (just before the fault took effect).
    pub fault: Instant,
    /// When the workload was stopped.
    pub end: Instant,
    /// Whether the run ended on a settled recovery rather than on the limit.
    pub settled: bool,
    /// Every attempt, for figures beyond [`FaultFigures`].
    pub outcomes: Vec<Outcome>,
}

/// Runs `workload`; once it has `plan.warm_successes` successes, calls `fault` (which injects
/// the fault and returns the instant just before it did so); then polls until the outcomes show a
/// recovery that lasted `plan.settle` past the end of the window, or `plan.limit` passed;
/// stops the workload and checks the outcomes. Fails only if the warm-up does not succeed
/// or the fault cannot be injected.
/// Needs a multi-thread tokio runtime (the fault runs in `block_in_place`).
pub async fn run_with_fault(
    workload: Workload,
    plan: &FaultPlan,
    fault: impl FnOnce() -> anyhow::Result<Instant>,
) -> anyhow::Result<FaultRun> {
    let running = workload.start();
    let warm = crate::eventually::poll_until(plan.limit, || async {
        running.successes_since(Duration::ZERO) >= plan.warm_successes
    })
    .await;
    if !warm {
        let outcomes = running.stop().await;
        let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
        anyhow::bail!(
            "only {} of {} attempts succeeded within {:?} before any fault (first failures: {:?})",
            outcomes.len() - failed.len(),
            outcomes.len(),
            plan.limit,
            &failed[..failed.len().min(5)]
        );
    }
    // The fault may block (a kill(1) or etcdctl process): keep the loops running meanwhile.
    let at = match tokio::task::block_in_place(fault) {
        Ok(at) => at,
        Err(e) => {
            running.stop().await;
            return Err(e.context("injecting the fault"));
        }
    };
    let fault_offset = running.offset(at);
    let settled = crate::eventually::poll_until(plan.limit, || {
        let figures = check(&running.outcomes(), fault_offset, plan.window);
        let now = running.offset(Instant::now());
        async move {
            figures.recovered.is_some_and(|r| {
                now >= fault_offset + r.max(plan.window) + plan.settle && figures.after.attempts > 0
            })
        }
    })
    .await;
    let end = Instant::now();
    let origin = running.origin();
    let outcomes = running.stop().await;
    Ok(FaultRun {
        figures: check(&outcomes, fault_offset, plan.window),
        origin,
        fault: at,
        end,
        settled,
        outcomes,
    })
}

// === the backend ===

/// An echo server on 127.0.0.1 that records when it accepted each connection that sent a
/// byte (a gateway's health probes connect and close: they are not counted). Stops
/// accepting when dropped.
#[derive(Debug)]
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Instant>>>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Binds a free loopback port and serves until dropped.
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let log = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let at = Instant::now();
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = conn.set_nodelay(true);
                    let (mut r, mut w) = conn.into_split();
                    let mut first = [0u8; 512];
                    // A connection that closes without a byte is a health probe, not a client.
                    let Ok(n @ 1..) = r.read(&mut first).await else {
                        return;
                    };
                    log.lock().expect("accept log lock").push(at);
                    if w.write_all(&first[..n]).await.is_ok() {
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(Self {
            addr,
            accepted,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Client connections (ones that sent a byte) accepted at or after `from` and before `to`
    /// (`None`: until now).
    pub fn accepted_between(&self, from: Instant, to: Option<Instant>) -> usize {
        self.accepted
            .lock()
            .expect("accept log lock")
            .iter()
            .filter(|t| **t >= from && to.is_none_or(|to| **t < to))
            .count()
    }

    /// When the first client connection at or after `from` was accepted, if one was.
    pub fn first_accepted_since(&self, from: Instant) -> Option<Instant> {
        self.accepted
            .lock()
            .expect("accept log lock")
            .iter()
            .filter(|t| **t >= from)
            .min()
            .copied()
    }

    /// Client connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().expect("accept log lock").len()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A long connection to a VIP that sends 1 KiB every 5 ms and checks every echoed byte,
/// until [`RunningStream::finish`] (a [`LongStream`] without a set length).
#[derive(Debug)]
pub struct RunningStream {
    end: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<u64>>,
}

impl RunningStream {
    pub fn start(vip: SocketAddr) -> Self {
        let end = Arc::new(AtomicBool::new(false));
        let echoed = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(long_stream(vip, end.clone(), echoed.clone()));
        Self { end, echoed, task }
    }

    /// Bytes echoed intact so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Ends the stream; returns the bytes echoed intact, or what broke it.
    pub async fn finish(self) -> anyhow::Result<u64> {
        self.end.store(true, Ordering::Relaxed);
        self.task.await?
    }
}

async fn long_stream(
    vip: SocketAddr,
    end: Arc<AtomicBool>,
    echoed: Arc<AtomicU64>,
) -> anyhow::Result<u64> {
    let mut conn = TcpStream::connect(vip).await?;
    let mut sent: u64 = 0;
    let mut chunk = vec![0u8; 1024];
    let mut back = vec![0u8; 1024];
    while !end.load(Ordering::Relaxed) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((sent + i as u64) % 251) as u8;
        }
        conn.write_all(&chunk).await?;
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut back)).await??;
        anyhow::ensure!(back == chunk, "echoed bytes differ at offset {sent}");
        sent += chunk.len() as u64;
        echoed.store(sent, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    conn.shutdown().await?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn ok(start: u64, latency: u64) -> Outcome {
        Outcome {
            start: ms(start),
            latency: ms(latency),
            result: Ok(()),
        }
    }
    fn failed(start: u64, latency: u64, why: Failure) -> Outcome {
        Outcome {
            start: ms(start),
            latency: ms(latency),
            result: Err(why),
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(percentile(&v, 50), Some(ms(50)));
        assert_eq!(percentile(&v, 99), Some(ms(99)));
        let four = [ms(1), ms(2), ms(3), ms(4)];
        assert_eq!(percentile(&four, 50), Some(ms(2)));
        assert_eq!(percentile(&four, 99), Some(ms(4)));
        assert_eq!(percentile(&[ms(7)], 99), Some(ms(7)));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn phases_count_attempts_failures_by_reason_and_latency_of_successes() {
        // Fault at 1000 ms, window 1000 ms.
        let outcomes = [
            ok(100, 2),
            ok(500, 4),
            // Started before the fault, cut by it (ended at 1900): in flight.
            failed(900, 1000, Failure::Reset),
            // Started and ended before the fault: failed on its own.
            failed(950, 10, Failure::Refused),
            failed(1000, 2000, Failure::Timeout),
            failed(1200, 5, Failure::Reset),
            failed(1300, 5, Failure::Reset),
            ok(1500, 30),
            ok(1999, 10),
            ok(2000, 3),
            ok(2500, 5),
        ];
        let f = check(&outcomes, ms(1000), ms(1000));
        assert_eq!(f.before.attempts, 4);
        assert_eq!(f.before.failures(), 2);
        assert_eq!(f.before_in_flight_failed, 1);
        assert_eq!(f.failed_before_fault(), 1);
        assert_eq!(f.before.p50, Some(ms(2)));
        assert_eq!(f.before.p99, Some(ms(4)));

        assert_eq!(f.first.attempts, 5);
        assert_eq!(
            f.first.failed,
            BTreeMap::from([(Failure::Reset, 2), (Failure::Timeout, 1)])
        );
        assert_eq!(f.first.failures_text(), "3 (reset 2, timeout 1)");
        assert!((f.first.failed_percent() - 60.0).abs() < 1e-9);
        // Latency of successes only: 30 and 10.
        assert_eq!(f.first.p50, Some(ms(10)));
        assert_eq!(f.first.p99, Some(ms(30)));

        assert_eq!(f.after.attempts, 2);
        assert_eq!(f.after.failures(), 0);
        assert_eq!(f.after.failures_text(), "0");
        assert_eq!(f.after.p50, Some(ms(3)));

        // Last failure started 300 ms after the fault; successes from 500 ms on.
        assert_eq!(f.last_failure, Some(ms(300)));
        assert_eq!(f.recovered, Some(ms(500)));
    }

    #[test]
    fn recovery_is_the_start_of_the_final_unbroken_run_across_loops() {
        // Loops interleave: a success of one loop between failures of another does not
        // end the outage; the order is by start time, not by when attempts ended.
        let outcomes = [
            ok(0, 1),
            ok(1100, 1),
            failed(1050, 2000, Failure::Timeout), // ends last, starts early
            failed(1400, 1, Failure::Refused),
            ok(1600, 1),
            ok(1700, 1),
        ];
        let f = check(&outcomes, ms(1000), ms(1000));
        assert_eq!(f.last_failure, Some(ms(400)));
        assert_eq!(f.recovered, Some(ms(600)));
        assert_eq!(f.first.failures(), 2);
        assert_eq!(f.after.attempts, 0);
        assert_eq!(f.after.p50, None);
    }

    #[test]
    fn no_failure_is_recovery_at_zero_and_a_failed_end_is_no_recovery() {
        let clean = [ok(0, 1), ok(1000, 1), ok(2500, 1)];
        let f = check(&clean, ms(1000), ms(1000));
        assert_eq!(f.last_failure, None);
        assert_eq!(f.recovered, Some(Duration::ZERO));

        let broken = [ok(0, 1), ok(1000, 1), failed(2500, 1, Failure::Reset)];
        let f = check(&broken, ms(1000), ms(1000));
        assert_eq!(f.last_failure, Some(ms(1500)));
        assert_eq!(f.recovered, None);
        assert_eq!(f.after.failures(), 1);

        // Nothing started after the fault: nothing shows a recovery.
        let f = check(&[ok(0, 1)], ms(1000), ms(1000));
        assert_eq!(f.recovered, None);
        assert_eq!(f.first.attempts + f.after.attempts, 0);
    }

    #[test]
    fn the_last_slow_connection_counts_successes_after_the_fault_only() {
        let outcomes = [
            ok(500, 900),                         // before the fault
            ok(1100, 1150),                       // slow: waited on a dead end
            ok(1300, 120),                        // slow
            failed(1900, 2000, Failure::Timeout), // a failure, not a slow success
            ok(2200, 5),
        ];
        let over = ms(100);
        assert_eq!(last_slower_than(&outcomes, ms(1000), over), Some(ms(300)));
        assert_eq!(last_slower_than(&outcomes, ms(1000), ms(2000)), None);
        assert_eq!(last_slower_than(&outcomes, ms(1400), over), None);
    }

    #[test]
    fn an_attempt_at_the_fault_instant_or_window_end_belongs_to_the_later_phase() {
        let outcomes = [ok(999, 1), ok(1000, 1), ok(1999, 1), ok(2000, 1)];
        let f = check(&outcomes, ms(1000), ms(1000));
        assert_eq!(
            (f.before.attempts, f.first.attempts, f.after.attempts),
            (1, 2, 1)
        );
    }

    #[test]
    fn the_figures_print_every_phase_and_the_recovery() {
        let outcomes = [
            ok(0, 1),
            failed(1200, 5, Failure::Reset),
            ok(1300, 2),
            ok(2100, 2),
        ];
        let text = check(&outcomes, ms(1000), ms(1000)).to_string();
        assert!(text.contains("before"), "{text}");
        assert!(text.contains("first 1.0s"), "{text}");
        assert!(text.contains("1 (reset 1)"), "{text}");
        assert!(text.contains("fault → last failure: 200.0 ms"), "{text}");
        assert!(text.contains("unbroken successes: 300.0 ms"), "{text}");
    }

    #[test]
    fn requests_name_their_loop_and_connection_and_have_the_asked_length() {
        let a = request_bytes(1, 2, 64);
        let b = request_bytes(1, 3, 64);
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.starts_with(b"workload loop 1 connection 2 "));
        assert_eq!(request_bytes(0, 0, 8).len(), 32, "at least 32 bytes");
    }

    #[tokio::test]
    async fn the_rate_holds_while_attempts_hang_and_hung_ones_time_out() {
        // Accepts and holds every connection, never answers.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                held.push(c);
            }
        });
        let mut w = Workload::new(addr, 1, 50.0);
        w.timeout = Duration::from_millis(300);
        w.limit = Duration::from_millis(500);
        let outcomes = w.start().finish().await;
        holder.abort();
        // 50/s for 0.5 s: about 25 attempts, not the 2 a loop waiting for each would make.
        assert!(outcomes.len() >= 15, "{} attempts", outcomes.len());
        assert!(
            outcomes
                .iter()
                .all(|o| o.result == Err(Failure::Timeout) && o.latency >= ms(300)),
            "{outcomes:?}"
        );
    }

    #[tokio::test]
    async fn a_long_stream_comes_back_whole_and_a_cut_one_says_so() {
        let echo = EchoServer::start().await.expect("echo server");
        let out = LongStream::bulk(echo.addr(), 4 << 20, Duration::from_secs(20))
            .run()
            .await;
        assert_eq!(out.result, Ok(()), "{out:?}");
        assert_eq!((out.sent, out.received), (4 << 20, 4 << 20));
        assert_eq!(out.sent_sha256, out.received_sha256);
        assert!(out.megabytes_per_second() > 0.0);

        // A server that echoes 1000 bytes, then resets: the stream ends with an error at once,
        // not at its timeout.
        let cutter = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = cutter.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut c, _) = cutter.accept().await.expect("accept");
            let mut buf = [0u8; 1000];
            c.read_exact(&mut buf).await.expect("read");
            c.write_all(&buf).await.expect("write");
            // SO_LINGER 0: closing sends a RST.
            c.set_zero_linger().expect("linger");
            drop(c);
        });
        let stream = LongStream {
            pace: Some(Duration::from_millis(5)),
            chunk: 500,
            ..LongStream::bulk(addr, 1 << 20, Duration::from_secs(20))
        };
        let out = stream.run().await;
        server.await.expect("server");
        assert!(
            matches!(out.result, Err(Failure::Reset | Failure::Closed)),
            "{out:?}"
        );
        assert!(out.received >= 1000 && out.received < 1 << 20, "{out:?}");
        assert!(out.elapsed() < Duration::from_secs(10), "{out:?}");
    }

    #[tokio::test]
    async fn the_echo_server_counts_clients_not_probes() {
        let echo = EchoServer::start().await.expect("echo server");
        let from = Instant::now();
        drop(TcpStream::connect(echo.addr()).await.expect("probe"));
        let mut client = TcpStream::connect(echo.addr()).await.expect("client");
        client.write_all(b"ping").await.expect("write");
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).await.expect("echo");
        assert_eq!(&answer, b"ping");
        assert_eq!(echo.accepted(), 1);
        assert_eq!(echo.accepted_between(from, None), 1);
        assert_eq!(echo.accepted_between(from, Some(from)), 0);
    }

    #[tokio::test]
    async fn the_driver_records_echoes_and_refusals() {
        let echo = EchoServer::start().await.expect("echo server");
        let mut w = Workload::new(echo.addr(), 2, 50.0);
        w.limit = Duration::from_secs(10);
        let running = w.start();
        crate::eventually::assert_eventually(
            "ten echoed connections",
            Duration::from_secs(10),
            || async { running.successes_since(Duration::ZERO) >= 10 },
        )
        .await;
        let outcomes = running.stop().await;
        assert!(outcomes.iter().all(|o| o.result.is_ok()), "{outcomes:?}");
        assert_eq!(echo.accepted(), outcomes.len());

        // Nothing listens on a port just released: every attempt is refused.
        let closed = crate::free_port().expect("free port");
        let mut w = Workload::new(SocketAddr::from(([127, 0, 0, 1], closed)), 1, 100.0);
        w.limit = Duration::from_millis(200);
        let outcomes = w.start().finish().await;
        assert!(!outcomes.is_empty());
        assert!(
            outcomes.iter().all(|o| o.result == Err(Failure::Refused)),
            "{outcomes:?}"
        );
    }
}

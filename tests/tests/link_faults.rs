//! Network faults between gateways, with real gateway processes on a real etcd and a
//! user-space UDP relay between them (`meshup_tests::relay`: this kernel has no `tc netem`).
//! The serving gateway advertises the relay's address as its tunnel address, so every QUIC
//! datagram between the client cluster's gateway and it crosses the relay; etcd is not behind
//! the relay (the catalog stays in sync: only the link between the gateways is faulty).
//!
//! 1. A lossy (1 %, 5 %) and a slow (50 ms ± 10 ms each way) link between two clusters
//!    (client → east → relay → west → echo server): every byte intact (request/response
//!    connections checked byte for byte, a bulk stream checked by SHA-256), no attempt stuck
//!    past its timeout; RR latency and bulk throughput printed against a clean link through
//!    the same relay in the same run.
//! 2. A partition of the serving cluster (the relay drops everything both ways) for 10 s
//!    under new connections and long streams, then healed, with the policy
//!    `levels: [[west], [north]]` and a 10 s failback hold-down: new connections served by
//!    north within the failover target (1 s, ≤ 1 % of that second's connections failing, none
//!    after); west takes new connections back only once the hold-down has passed since it
//!    was seen alive again, and then within the liveness bound; the long streams through the
//!    partition end with an error within the tunnel's idle timeout, never hang.
//!
//! Durations are the by default; `MESHUP_LINK_FAULTS_SCALE=N` multiplies them (the RR
//! phase, the bulk stream's size, the partition) for a longer run by hand. `MESHUP_RELAY_SEED`
//! replays the relay's draws (each run prints its seed). Run with `--no-capture` to see the
//! tables when the tests pass; they are printed before any assertion.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshup_gateway::outbound::pool::BACKOFF_MAX;
use meshup_gateway::tunnel::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_IDLE_TIMEOUT};
use meshup_tests::failover::{Federation, Options};
use meshup_tests::gateways::free_udp_port;
use meshup_tests::link::Link;
use meshup_tests::poll_until;
use meshup_tests::relay::{Counts, Direction, Faults, Relay};
use meshup_tests::workload::{LongStream, Outcome, Phase, StreamOutcome, Workload, check};

/// Scenarios measure time on a shared 2-core machine: they take turns.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The environment variable that lengthens every phase for a run by hand.
const SCALE_ENV: &str = "MESHUP_LINK_FAULTS_SCALE";

/// How many times longer than the CI defaults this run's phases are (at least 1).
fn scale() -> u32 {
    match std::env::var(SCALE_ENV) {
        Ok(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| panic!("{SCALE_ENV}={v:?}: want a whole number ≥ 1")),
        Err(_) => 1,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.1}", d.as_secs_f64() * 1e3),
    )
}

fn since(a: Instant, b: Instant) -> String {
    format!("{:.2} s", b.saturating_duration_since(a).as_secs_f64())
}

// === 1. lossy and slow links ===

/// Request/response connections per link condition: 4 loops × 25 new connections/s.
const RR_LOOPS: usize = 4;
const RR_RATE_PER_LOOP: f64 = 25.0;
/// How long each condition's RR phase lasts (× scale).
const RR_PHASE: Duration = Duration::from_secs(4);
/// Bytes of each condition's bulk stream (× scale), echoed back: both ways cross the link.
const BULK_BYTES: u64 = 8 << 20;
/// Longest a bulk stream may take; past it, it is stuck.
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
/// The promise this scenario finds out about: QUIC loss recovery keeps a request/response
/// connection's p99 at 5 % loss within this of the clean link's (a lost datagram costs one
/// probe timeout, a few RTTs, not a retransmission timer of hundreds of milliseconds).
const MAX_P99_ADDED_AT_5_PERCENT: Duration = Duration::from_millis(100);

/// What one link condition did.
struct Condition {
    name: &'static str,
    rr: Phase,
    /// The slowest attempt, success or not.
    slowest: Duration,
    bulk: StreamOutcome,
    up: Counts,
    down: Counts,
}

fn diff(after: Counts, before: Counts) -> Counts {
    Counts {
        received: after.received - before.received,
        forwarded: after.forwarded - before.forwarded,
        lost: after.lost - before.lost,
        partitioned: after.partitioned - before.partitioned,
        duplicated: after.duplicated - before.duplicated,
        reordered: after.reordered - before.reordered,
        overflow: after.overflow - before.overflow,
    }
}

async fn run_condition(link: &Link, name: &'static str, faults: Faults, bulk: u64) -> Condition {
    link.relay.set_both(faults);
    let (up0, down0) = (
        link.relay.counts(Direction::ToUpstream),
        link.relay.counts(Direction::ToClient),
    );
    let mut w = Workload::new(link.vip, RR_LOOPS, RR_RATE_PER_LOOP);
    w.limit = RR_PHASE * scale();
    let outcomes: Vec<Outcome> = w.start().finish().await;
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap_or_default();
    let bulk = LongStream {
        seed: name.len() as u64,
        ..LongStream::bulk(link.vip, bulk * u64::from(scale()), BULK_TIMEOUT)
    }
    .run()
    .await;
    Condition {
        name,
        rr: Phase::of(outcomes.iter()),
        slowest,
        bulk,
        up: diff(link.relay.counts(Direction::ToUpstream), up0),
        down: diff(link.relay.counts(Direction::ToClient), down0),
    }
}

fn print_conditions(seed: u64, rows: &[Condition]) {
    let mut t = format!(
        "\n=== link faults between east and west (relay seed {seed}; each way; RR = a new \
         connection, 64-byte request, echo checked)\n{:<16} {:>6} {:<22} {:>8} {:>8} {:>9} \
         {:>9} {:>10} {:>8} {:<7} {:>16} {:>16}\n",
        "link",
        "RR",
        "RR failed",
        "p50 ms",
        "p99 ms",
        "max ms",
        "bulk MiB",
        "bulk MB/s",
        "bulk s",
        "sha256",
        "east→west lost",
        "west→east lost",
    );
    for c in rows {
        t.push_str(&format!(
            "{:<16} {:>6} {:<22} {:>8} {:>8} {:>9} {:>9.1} {:>10.1} {:>8.2} {:<7} {:>16} {:>16}\n",
            c.name,
            c.rr.attempts,
            c.rr.failures_text(),
            ms(c.rr.p50),
            ms(c.rr.p99),
            ms(Some(c.slowest)),
            c.bulk.received as f64 / f64::from(1 << 20),
            c.bulk.megabytes_per_second(),
            c.bulk.elapsed().as_secs_f64(),
            if c.bulk.result.is_ok() {
                "match"
            } else {
                "FAILED"
            },
            format!("{}/{}", c.up.lost, c.up.received),
            format!("{}/{}", c.down.lost, c.down.received),
        ));
    }
    eprintln!("{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_and_slow_links_keep_every_byte_and_no_stream_sticks() {
    let _turn = SERIAL.lock().await;
    let link = Link::start("/link-faults", None).await;
    let (d, j) = (Duration::from_millis(50), Duration::from_millis(10));
    // (name, faults, bulk bytes): the reordering link moves a bulk stream at a fraction of a
    // MB/s (see docs/reliability.md), so its stream is shorter.
    let conditions = [
        ("clean (relay)", Faults::clean(), BULK_BYTES),
        ("1 % loss", Faults::loss(0.01), BULK_BYTES),
        ("5 % loss", Faults::loss(0.05), BULK_BYTES),
        ("50±10 ms", Faults::delay_in_order(d, j), BULK_BYTES),
        ("50±10 ms reorder", Faults::delay(d, j), BULK_BYTES / 8),
    ];
    let mut rows = Vec::new();
    for (name, faults, bulk) in conditions {
        rows.push(run_condition(&link, name, faults, bulk).await);
    }
    print_conditions(link.relay.seed(), &rows);

    let mut missed = Vec::new();
    for c in &rows {
        if c.rr.attempts == 0 || c.up.forwarded == 0 || c.down.forwarded == 0 {
            missed.push(format!(
                "{}: nothing crossed the relay ({} RR, {:?} / {:?})",
                c.name, c.rr.attempts, c.up, c.down
            ));
        }
        if c.rr.failures() > 0 {
            missed.push(format!(
                "{}: {} of {} RR connections failed",
                c.name,
                c.rr.failures_text(),
                c.rr.attempts
            ));
        }
        if let Err(f) = c.bulk.result {
            missed.push(format!(
                "{}: the bulk stream failed ({f}): {} of {} bytes back, sha256 sent {} received {}",
                c.name, c.bulk.received, c.bulk.sent, c.bulk.sent_sha256, c.bulk.received_sha256
            ));
        }
    }
    let [clean, one, five, delays @ ..] = &rows[..] else {
        unreachable!("five conditions")
    };
    for c in [one, five] {
        if c.up.lost == 0 || c.down.lost == 0 {
            missed.push(format!("{}: the relay lost nothing: {:?}", c.name, c.up));
        }
    }
    if let (Some(p99), Some(clean_p99)) = (five.rr.p99, clean.rr.p99)
        && p99 > clean_p99 + MAX_P99_ADDED_AT_5_PERCENT
    {
        missed.push(format!(
            "RR p99 at 5 % loss is {p99:?}, more than {MAX_P99_ADDED_AT_5_PERCENT:?} above the \
             clean link's {clean_p99:?}"
        ));
    }
    // The delay is real: no RR can be faster than one round trip of the link's minimum.
    for delay in delays {
        if delay.rr.p50.is_none_or(|p| p < Duration::from_millis(80)) {
            missed.push(format!(
                "{}: RR p50 is {:?}, below the link's 80 ms minimum round trip",
                delay.name, delay.rr.p50
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "missed {} target(s):\n- {}\n--- east's log (tail):\n{}",
        missed.len(),
        missed.join("\n- "),
        tail(&link.east.log_text(), 40)
    );
    drop(link.echo);
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// === 2. a partition of the serving cluster ===

/// How long the partition lasts (× scale).
const PARTITION: Duration = Duration::from_secs(10);
/// The policy's failback hold-down for this scenario.
const HOLD_DOWN: Duration = Duration::from_secs(10);
/// The policy's outlier ejection time: the silent attempts at west in the partition's first
/// moments eject it, and an ejection holds the cluster out until its end plus the hold-down.
/// Shorter than the partition, so the failback is the hold-down's after the heal (with the
/// default 30 s it would come 30 s + the hold-down after the partition).
const BASE_EJECTION: Duration = Duration::from_secs(5);
/// The failover target (docs/reliability.md, promise 10): the next level serves within this
/// of the fault...
const WINDOW: Duration = Duration::from_secs(1);
/// ...with at most this share of that second's new connections failing, and none after.
const MAX_FAILED_PERCENT_IN_WINDOW: f64 = 1.0;
/// Long streams through west when the partition starts.
const LONG_STREAMS: usize = 3;
/// How long after the partition a connection already past the relay may reach west's echo
/// server (the failover tests' accept slack).
const IN_TRANSIT: Duration = Duration::from_millis(250);
/// Scheduling slack on a busy 2-core machine for the bounds below.
const SLACK: Duration = Duration::from_secs(1);

/// How long after the heal east can first see west alive again: its old connection died
/// (idle timeout) during the partition, and the pool redials with backoff, at most
/// [`BACKOFF_MAX`] between dials, each dial up to the connect timeout.
fn detection_bound() -> Duration {
    BACKOFF_MAX + DEFAULT_CONNECT_TIMEOUT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_of_the_serving_cluster_fails_over_and_fails_back_after_the_hold_down() {
    let _turn = SERIAL.lock().await;
    let west_port = free_udp_port();
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], west_port)))
        .await
        .expect("relay");
    let fed = Federation::start(Options {
        prefix: "/link-partition",
        vip_octet: 91,
        west_tunnel: Some((west_port, relay.addr())),
        failback_hold_down: Some(HOLD_DOWN),
        base_ejection: Some(BASE_EJECTION),
        ..Options::default()
    })
    .await
    .expect("federation");

    // Long streams first, so they are known to go through west: a chunk every 50 ms.
    let streams: Vec<_> = (0..LONG_STREAMS)
        .map(|i| {
            tokio::spawn(
                LongStream {
                    addr: fed.vip,
                    total: 1 << 30,
                    chunk: 1024,
                    pace: Some(Duration::from_millis(50)),
                    timeout: Duration::from_secs(110),
                    seed: i as u64,
                }
                .run(),
            )
        })
        .collect();
    let on_west = poll_until(Duration::from_secs(10), || async {
        fed.echo("west").accepted() == LONG_STREAMS
    })
    .await;
    assert!(
        on_west && fed.echo("north").accepted() == 0,
        "the long streams go to west, the policy's first level (west {}, north {})",
        fed.echo("west").accepted(),
        fed.echo("north").accepted()
    );

    let mut w = Workload::new(fed.vip, 4, 50.0);
    w.limit = Duration::from_secs(110);
    let running = w.start();
    // Outcomes count their start from the workload's origin.
    let origin = running.origin();
    let warm = poll_until(Duration::from_secs(15), || async {
        running.successes_since(Duration::ZERO) >= 200
    })
    .await;
    assert!(warm, "the workload through east works before the partition");

    let partition = Instant::now();
    relay.partition(true);
    // The fault lasts its set time: this wait is the scenario, not a guess at a condition.
    tokio::time::sleep_until((partition + PARTITION * scale()).into()).await;
    let heal = Instant::now();
    relay.partition(false);
    let partitioned = (
        relay.counts(Direction::ToUpstream).partitioned,
        relay.counts(Direction::ToClient).partitioned,
    );

    // West takes new connections back after the hold-down (bounded, so a failback that never
    // comes fails the test instead of hanging it).
    let latest_failback = HOLD_DOWN + detection_bound() + SLACK;
    let failed_back = poll_until(latest_failback + Duration::from_secs(5), || async {
        fed.echo("west").first_accepted_since(heal).is_some()
    })
    .await;
    let failback = fed.echo("west").first_accepted_since(heal);
    // A little traffic after the failback, to see where new connections go then.
    if let Some(at) = failback {
        tokio::time::sleep_until((at + Duration::from_secs(2)).into()).await;
    }
    let end = Instant::now();
    let outcomes = running.stop().await;
    let streams: Vec<StreamOutcome> = futures::future::join_all(streams)
        .await
        .into_iter()
        .map(|r| r.expect("long stream task"))
        .collect();

    // === the figures ===
    let off = |t: Instant| t.saturating_duration_since(origin);
    let failback_or_end = failback.unwrap_or(end);
    let cuts: [(&str, Instant, Instant); 5] = [
        ("before", origin, partition),
        ("partition, 1st s", partition, partition + WINDOW),
        ("partition, rest", partition + WINDOW, heal),
        ("heal → failback", heal, failback_or_end),
        ("after failback", failback_or_end, end),
    ];
    let mut table = format!(
        "\n=== partition of west (the serving cluster) for {:?}, failback hold-down {HOLD_DOWN:?} \
         (relay seed {})\n{:<18} {:>15} {:>8} {:<26} {:>8} {:>8} {:>6} {:>6}\n",
        PARTITION * scale(),
        relay.seed(),
        "phase",
        "from → to (s)",
        "new conn",
        "failed",
        "p50 ms",
        "p99 ms",
        "west",
        "north"
    );
    for (name, from, to) in cuts {
        let (a, b) = (off(from), off(to));
        let phase = Phase::of(outcomes.iter().filter(|o| o.start >= a && o.start < b));
        table.push_str(&format!(
            "{:<18} {:>15} {:>8} {:<26} {:>8} {:>8} {:>6} {:>6}\n",
            name,
            format!("{:.2} → {:.2}", off(from).as_secs_f64(), b.as_secs_f64()),
            phase.attempts,
            phase.failures_text(),
            ms(phase.p50),
            ms(phase.p99),
            fed.echo("west").accepted_between(from, Some(to)),
            fed.echo("north").accepted_between(from, Some(to)),
        ));
    }
    let first_north = fed.echo("north").first_accepted_since(partition);
    let figures = check(&outcomes, off(partition), WINDOW);
    table.push_str(&format!(
        "partition → first connection served by north: {}\n\
         partition → last failed new connection: {}; → unbroken successes: {}\n\
         heal → first connection served by west again: {} (bound: hold-down {HOLD_DOWN:?} .. \
         + detection {:?} + slack {SLACK:?})\n\
         datagrams dropped by the partition: east→west {}, west→east {}\n",
        first_north.map_or("NONE".to_owned(), |t| since(partition, t)),
        figures
            .last_failure
            .map_or("none failed".to_owned(), |d| format!("{d:?}")),
        figures
            .recovered
            .map_or("NOT RECOVERED".to_owned(), |d| format!("{d:?}")),
        failback.map_or("NONE".to_owned(), |t| since(heal, t)),
        detection_bound(),
        partitioned.0,
        partitioned.1,
    ));
    for (i, s) in streams.iter().enumerate() {
        table.push_str(&format!(
            "long stream {i}: {} bytes echoed, ended {} after the partition: {:?}\n",
            s.received,
            since(partition, s.ended),
            s.result
        ));
    }
    eprintln!("{table}");

    // === the promises ===
    let mut missed = Vec::new();
    if figures.failed_before_fault() > 0 {
        missed.push(format!(
            "{} connections failed before the partition",
            figures.failed_before_fault()
        ));
    }
    if figures.first.failed_percent() > MAX_FAILED_PERCENT_IN_WINDOW {
        missed.push(format!(
            "{:.2} % of the new connections of the partition's first second failed ({} of {}); \
             target ≤ {MAX_FAILED_PERCENT_IN_WINDOW} %",
            figures.first.failed_percent(),
            figures.first.failures_text(),
            figures.first.attempts
        ));
    }
    if figures.after.failures() > 0 {
        missed.push(format!(
            "{} new connections failed after the partition's first second (through the heal \
             and the failback); target 0",
            figures.after.failures_text()
        ));
    }
    match figures.recovered {
        Some(r) if r <= WINDOW => {}
        other => missed.push(format!(
            "new connections succeeded without a break only {other:?} after the partition; \
             target ≤ {WINDOW:?}"
        )),
    }
    match first_north {
        Some(t) if t <= partition + WINDOW => {}
        other => missed.push(format!(
            "north served its first connection {} after the partition; target ≤ {WINDOW:?}",
            other.map_or("never".to_owned(), |t| since(partition, t))
        )),
    }
    // Datagrams the relay forwarded just before the partition may still reach west's echo
    // server just after it: those connections are not a failback.
    let west_too_early = fed
        .echo("west")
        .accepted_between(partition + IN_TRANSIT, Some(heal + HOLD_DOWN));
    if west_too_early > 0 {
        missed.push(format!(
            "west accepted {west_too_early} connections between {IN_TRANSIT:?} after the \
             partition and the end of the hold-down after the heal: it failed back before the \
             hold-down"
        ));
    }
    match failback {
        Some(t) if t <= heal + latest_failback => {}
        other => missed.push(format!(
            "west served again {} after the heal; bound: {latest_failback:?} (hold-down + \
             detection + slack){}",
            other.map_or("never".to_owned(), |t| since(heal, t)),
            if failed_back {
                ""
            } else {
                " — never within the wait"
            }
        )),
    }
    if let Some(at) = failback {
        let (west, north) = (
            fed.echo("west")
                .accepted_between(at + Duration::from_millis(500), None),
            fed.echo("north")
                .accepted_between(at + Duration::from_millis(500), None),
        );
        if west == 0 || north > west / 10 {
            missed.push(format!(
                "after the failback, new connections did not go back to west (west {west}, \
                 north {north})"
            ));
        }
    }
    let stream_bound = DEFAULT_IDLE_TIMEOUT + SLACK;
    for (i, s) in streams.iter().enumerate() {
        let ended_after = s.ended.saturating_duration_since(partition);
        let cut = matches!(
            s.result,
            Err(meshup_tests::workload::Failure::Reset | meshup_tests::workload::Failure::Closed)
        );
        if !cut || ended_after > stream_bound || s.ended < partition || s.received == 0 {
            missed.push(format!(
                "long stream {i} ended {ended_after:?} after the partition with {:?} ({} bytes \
                 echoed); target: reset or closed within {stream_bound:?} (tunnel idle timeout \
                 + slack)",
                s.result, s.received
            ));
        }
    }
    assert!(
        missed.is_empty(),
        "missed {} target(s):\n- {}\n--- east's log (tail):\n{}",
        missed.len(),
        missed.join("\n- "),
        tail(&fed.east.log_text(), 60)
    );
}

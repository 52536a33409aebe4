//! Side-by-side data-path benchmark: direct TCP, the stunnel mTLS pair, the nginx stream
//! mTLS pair and the meshup gateway pair, measured in one run and printed as ratios.
//!
//! The machine is shared and noisy (docs/benchmarks.md), so absolute figures mean little: each
//! measure runs every contender back to back (order rotated per round), and the tables
//! compare them with each other. CPU is the tunnel processes' own utime + stime over each
//! phase, from /proc.
//!
//! Layout: `backend` (sink/echo server) and `load` (the clients) speak `protocol`;
//! `peers/` sets up the contenders, `meshup_pair` the gateways; `report` prints the tables.
//! Child processes, nginx's set-up, the gateway pair and the CPU meter are shared with the
//! other benchmarks (`meshup_tests::procs`, `nginx`, `gateway_pair`, `cpu`).

mod backend;
mod load;
mod meshup_pair;
mod peers;
mod protocol;
mod redis;
mod report;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::peers::Contender;
use crate::report::{Figure, Measure, Report};
use meshup_tests::bench::{PairArgs, ScratchDir};
use meshup_tests::tls::Pki;

/// Side-by-side data-path benchmark of meshup against stunnel and nginx mTLS pairs.
#[derive(Debug, Parser)]
#[command(name = "meshup-bench-tunnel", args_override_self = true)]
struct Args {
    /// Seconds each throughput phase sends for.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Measured 1 KiB request/response exchanges per contender and round.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// New connections per contender and round.
    #[arg(long, default_value_t = 500)]
    new_connections: usize,
    /// GETs per redis-benchmark run at 1 connection (5× at 16, 10× at 64).
    #[arg(long, default_value_t = 20_000)]
    redis_requests: u64,
    /// Leave out the redis-benchmark measure (and redis-server).
    #[arg(long)]
    no_redis: bool,
    /// Rounds; each figure is the median over the rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Short smoke run (1 s phases, few requests, one round): checks that everything
    /// works, its figures are not worth comparing.
    #[arg(long)]
    quick: bool,
    /// Run only these contenders (comma-separated: direct, stunnel, nginx, meshup), e.g.
    /// `--only direct,meshup` while working on the gateway. Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[command(flatten)]
    pair: PairArgs,
    /// Internal: run as one plain TCP relay (`LISTEN=TARGET`) of the `relay` floor pair.
    #[arg(long, hide = true)]
    relay: Option<String>,
}

/// Contender names, in the order they are set up and printed.
const CONTENDERS: [&str; 5] = ["direct", "relay", "stunnel", "nginx", "meshup"];

/// Upper bound on one latency phase, whatever the request count: a stalled or crawling
/// tunnel fails the phase instead of holding the run.
const LATENCY_PHASE_LIMIT: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(spec) = &args.relay {
        let (listen, target) = peers::relay::parse_spec(spec)?;
        return peers::relay::run(listen, target);
    }
    if args.quick {
        args.duration = 1.0;
        args.requests = 2_000;
        args.new_connections = 100;
        args.redis_requests = 2_000;
        args.rounds = 1;
    }
    meshup_tests::procs::run_until_signalled(run(args))
}

async fn run(args: Args) -> Result<()> {
    // Removed on drop unless kept (on request, or below when a phase failed).
    let mut scratch = ScratchDir::new("meshup-bench-tunnel-", args.pair.keep_temp)?;
    let dir = scratch.path().to_owned();

    let backend = backend::start().await?;
    let pki = Pki::generate(&dir)?;
    let mut report = Report::default();

    for name in &args.only {
        anyhow::ensure!(
            CONTENDERS.contains(&name.as_str()),
            "--only: unknown contender {name:?} (known: {})",
            CONTENDERS.join(", ")
        );
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);

    // A missing or broken peer is a broken benchmark: fail loudly, naming the package.
    let mut contenders = start_contenders(
        &dir,
        &pki,
        backend.addr(),
        meshup_pair::SINK,
        &args,
        &wanted,
        &mut report,
    )
    .await?;
    // The same contenders again in front of a redis-server, for redis-benchmark.
    let mut redis_contenders = Vec::new();
    let _redis_server = if args.no_redis {
        None
    } else {
        let rdir = dir.join("redis");
        let server = redis::start_server(&rdir).await.context("redis-server")?;
        let mut ignored = Report::default();
        redis_contenders = start_contenders(
            &rdir,
            &pki,
            server.addr,
            meshup_pair::REDIS,
            &args,
            &wanted,
            &mut ignored,
        )
        .await?;
        Some(server)
    };

    print_header(&args, &contenders, &redis_contenders);
    let duration = Duration::from_secs_f64(args.duration);
    let measures = [
        Measure::Throughput(1),
        Measure::Throughput(16),
        Measure::Throughput(64),
        Measure::RequestResponse,
        Measure::NewConnection,
        Measure::Redis(1),
        Measure::Redis(16),
        Measure::Redis(64),
    ];
    for round in 0..args.rounds {
        for measure in measures {
            if measure == Measure::RequestResponse {
                let outcomes =
                    request_response_interleaved(&mut contenders, args.requests, round).await;
                for (contender, outcome) in contenders.iter().zip(outcomes) {
                    record_outcome(&mut report, round, args.rounds, measure, contender, outcome);
                }
                continue;
            }
            // redis-benchmark runs through the contenders in front of redis-server (none
            // with `--no-redis`).
            let set = match measure {
                Measure::Redis(_) => &mut redis_contenders,
                _ => &mut contenders,
            };
            run_rotated(set, measure, &args, duration, round, &mut report).await;
        }
    }
    println!("{}", report.render());
    // Contenders (and their child guards) drop here, before the temp dir.
    drop(contenders);
    drop(redis_contenders);
    let meshup_ran = !report.is_unavailable("meshup");
    args.pair
        .finish(&mut scratch, report.failed_phases(), meshup_ran)
}

/// Starts the wanted contenders in front of `backend`, with their files under `dir`, and
/// probes each. A meshup pair that cannot start is recorded as unavailable in `report`.
async fn start_contenders(
    dir: &std::path::Path,
    pki: &Pki,
    backend: std::net::SocketAddr,
    service: meshup_pair::Service,
    args: &Args,
    wanted: &dyn Fn(&str) -> bool,
    report: &mut Report,
) -> Result<Vec<Contender>> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut contenders = Vec::new();
    if wanted("direct") {
        contenders.push(Contender::direct(backend).serving(service.backend));
    }
    if wanted("relay") {
        contenders.push(
            peers::relay::start(dir, backend)
                .context("relay pair")?
                .serving(service.backend),
        );
    }
    if wanted("stunnel") {
        contenders.push(
            peers::stunnel::start(dir, pki, backend)
                .context("stunnel pair")?
                .serving(service.backend),
        );
    }
    if wanted("nginx") {
        contenders.push(
            peers::nginx::start(dir, pki, backend)
                .context("nginx pair")?
                .serving(service.backend),
        );
    }
    if !wanted("meshup") {
        // Left out on purpose: nothing to report.
    } else if args.pair.no_meshup {
        report.record_unavailable("meshup", "left out with --no-meshup".to_owned());
    } else {
        let binary = args.pair.binary();
        match meshup_pair::start(dir, &binary, backend, service, args.pair.gateway_threads).await {
            Ok(contender) => contenders.push(contender),
            Err(e) => {
                let reason = format!("{e:#}");
                eprintln!("meshup: not available ({reason})");
                report.record_unavailable("meshup", reason);
            }
        }
    }
    for contender in &mut contenders {
        contender.probe(Duration::from_secs(10)).await?;
    }
    Ok(contenders)
}

/// Runs `measure` against every contender, one after the other, the order rotated each
/// round so no contender always runs first or last.
async fn run_rotated(
    contenders: &mut [Contender],
    measure: Measure,
    args: &Args,
    duration: Duration,
    round: usize,
    report: &mut Report,
) {
    let n = contenders.len();
    for i in 0..n {
        let contender = &mut contenders[(i + round) % n];
        let outcome = run_phase(contender, measure, args, duration).await;
        record_outcome(report, round, args.rounds, measure, contender, outcome);
        // Let the previous phase's connections close and sockets drain.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Prints a phase's outcome and records it.
fn record_outcome(
    report: &mut Report,
    round: usize,
    rounds: usize,
    measure: Measure,
    contender: &Contender,
    outcome: Result<Figure>,
) {
    match outcome {
        Ok(figure) => {
            eprintln!(
                "round {}/{rounds} {measure:?} {}: {}",
                round + 1,
                contender.name,
                describe(&figure)
            );
            report.record(measure, &contender.name, contender.kind, figure);
        }
        Err(e) => {
            eprintln!("{measure:?} {}: FAILED: {e:#}", contender.name);
            report.record_failure(measure, &contender.name, contender.kind, format!("{e:#}"));
        }
    }
}

/// Slices the request/response phase is cut into; contenders take turns slice by slice.
const RR_SLICES: usize = 10;

/// The request/response measure for every contender at once: each opens and warms its
/// connection, then they take turns running `requests / RR_SLICES` exchanges, the order
/// rotated per slice. CPU counts only the contender's own turns. Returns one outcome per
/// contender, in order.
async fn request_response_interleaved(
    contenders: &mut [Contender],
    requests: usize,
    round: usize,
) -> Vec<Result<Figure>> {
    struct Turn {
        conn: load::RrConnection,
        cpu_s: Option<f64>,
    }
    let mut turns: Vec<Result<Turn>> = Vec::with_capacity(contenders.len());
    for contender in contenders.iter_mut() {
        let opened = async {
            contender.ensure_running()?;
            let before = cpu_seconds(contender)?;
            let conn = load::RrConnection::open(contender.addr, LATENCY_PHASE_LIMIT).await?;
            let cpu_s = cpu_delta(contender, before)?;
            anyhow::Ok(Turn { conn, cpu_s })
        }
        .await;
        turns.push(opened);
    }
    let n = contenders.len();
    let per_slice = requests.div_ceil(RR_SLICES);
    for slice in 0..RR_SLICES {
        let count = per_slice.min(requests.saturating_sub(slice * per_slice));
        for i in 0..n {
            let idx = (i + slice + round) % n;
            let contender = &mut contenders[idx];
            let Ok(turn) = &mut turns[idx] else { continue };
            let result = async {
                contender.ensure_running()?;
                let before = cpu_seconds(contender)?;
                turn.conn.run(count).await?;
                let spent = cpu_delta(contender, before)?;
                turn.cpu_s = turn.cpu_s.zip(spent).map(|(a, b)| a + b);
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = result {
                turns[idx] = Err(e);
            }
        }
    }
    turns
        .into_iter()
        .map(|turn| {
            let turn = turn?;
            let l = turn.conn.latency();
            Ok(Figure::Latency {
                p50_us: l.p50_us,
                p99_us: l.p99_us,
                ops: l.ops,
                cpu_s: turn.cpu_s,
            })
        })
        .collect()
}

/// Runs one measure against one contender, with the tunnel's CPU time around it.
async fn run_phase(
    contender: &mut Contender,
    measure: Measure,
    args: &Args,
    duration: Duration,
) -> Result<Figure> {
    contender.ensure_running()?;
    let cpu_before = cpu_seconds(contender)?;
    let figure = match measure {
        Measure::Throughput(connections) => {
            let t = load::throughput(contender.addr, connections, duration).await?;
            let cpu_s = cpu_delta(contender, cpu_before)?;
            Figure::Throughput {
                gbps: t.gbps(),
                bytes: t.bytes,
                cpu_s,
            }
        }
        Measure::RequestResponse => {
            // Interleaved across contenders instead: see `request_response_interleaved`.
            anyhow::bail!("request/response runs interleaved, not per contender")
        }
        Measure::Redis(connections) => {
            let requests = redis_requests(args, connections);
            let r = redis::get(contender.addr, connections, requests).await?;
            let cpu_s = cpu_delta(contender, cpu_before)?;
            Figure::Rate {
                rps: r.rps,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                ops: r.requests,
                cpu_s,
            }
        }
        Measure::NewConnection => {
            let l =
                load::new_connections(contender.addr, args.new_connections, LATENCY_PHASE_LIMIT)
                    .await?;
            let cpu_s = cpu_delta(contender, cpu_before)?;
            Figure::Latency {
                p50_us: l.p50_us,
                p99_us: l.p99_us,
                ops: l.ops,
                cpu_s,
            }
        }
    };
    // A tunnel that crashed at the end of a phase must not report figures as if it worked.
    contender.ensure_running()?;
    Ok(figure)
}

/// GETs of one redis-benchmark run at `connections`: `--redis-requests` at 1 connection, 5×
/// at up to 16, 10× beyond.
fn redis_requests(args: &Args, connections: usize) -> u64 {
    let factor = match connections {
        1 => 1,
        n if n <= 16 => 5,
        _ => 10,
    };
    args.redis_requests * factor
}

fn cpu_seconds(contender: &Contender) -> Result<Option<f64>> {
    if contender.cpu.is_empty() {
        return Ok(None);
    }
    contender.cpu.seconds().map(Some)
}

fn cpu_delta(contender: &Contender, before: Option<f64>) -> Result<Option<f64>> {
    Ok(match (before, cpu_seconds(contender)?) {
        (Some(b), Some(a)) => Some(a - b),
        _ => None,
    })
}

fn describe(figure: &Figure) -> String {
    match figure {
        Figure::Throughput { gbps, cpu_s, .. } => {
            format!("{gbps:.2} Gb/s, tunnel CPU {cpu_s:.2?} s")
        }
        Figure::Latency {
            p50_us,
            p99_us,
            cpu_s,
            ..
        } => format!("p50 {p50_us:.1} µs, p99 {p99_us:.1} µs, tunnel CPU {cpu_s:.2?} s"),
        Figure::Rate {
            rps,
            p50_us,
            p99_us,
            cpu_s,
            ..
        } => format!(
            "{rps:.0} req/s, p50 {p50_us:.0} µs, p99 {p99_us:.0} µs, tunnel CPU {cpu_s:.2?} s"
        ),
    }
}

fn print_header(args: &Args, contenders: &[Contender], redis: &[Contender]) {
    println!("{}", meshup_tests::bench::machine_line("tunnel"));
    println!(
        "throughput phases {:.1} s; {} warm requests of 1 KiB; {} new connections; {} round(s){}",
        args.duration,
        args.requests,
        args.new_connections,
        args.rounds,
        if args.quick {
            " (quick smoke run: figures not comparable)"
        } else {
            ""
        }
    );
    for c in contenders {
        println!("  {:<8} via {}", c.name, c.addr);
    }
    if !redis.is_empty() {
        println!(
            "redis-benchmark GET: {} / {} / {} requests at 1 / 16 / 64 connections",
            redis_requests(args, 1),
            redis_requests(args, 16),
            redis_requests(args, 64)
        );
        for c in redis {
            println!("  {:<8} via {} (to redis-server)", c.name, c.addr);
        }
    }
    println!("Each figure is the median over rounds; CPU is the tunnel processes' utime+stime.");
}

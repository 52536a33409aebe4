//! Side-by-side failover benchmark: meshup (three clusters, policy `[[west], [north]]`)
//! against an nginx `stream` mTLS pair with a primary and a `backup` server end, under the
//! same workload of new connections, for kill -9 and SIGSTOP of the serving end and (meshup
//! only) a `fail` drill. Prints, per fault, one table with a column per contender: time to
//! full recovery, failed connections, p50/p99 connect → response before, during (the first
//! second) and after.
//!
//! Every contender is set up afresh for every fault, and the fault always hits the end that
//! served the connections before it; the table says when that was not the end the
//! configuration names first (a policy that is not honoured).
//!
//! Layout: `contenders` sets up meshup and nginx and injects the faults; `report` prints the
//! tables. The federation, the workload and its checker, nginx's set-up and the child
//! process guard are `meshup_tests`'s, shared with tests/tests/failover.rs and bench/tunnel.

mod contenders;
mod report;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use meshup_tests::tls::Pki;
use meshup_tests::workload::{FaultPlan, Workload, run_with_fault};

use crate::contenders::{Contender, Fault};
use crate::report::{Report, Row, TARGET_WINDOW};

/// Failover of new connections: meshup vs an nginx stream mTLS pair with a backup upstream.
#[derive(Debug, Parser)]
#[command(name = "meshup-bench-failover", args_override_self = true)]
struct Args {
    /// The `meshup` binary (a release build).
    #[arg(long)]
    meshup: PathBuf,
    /// Concurrent workload loops.
    #[arg(long, default_value_t = 4)]
    loops: usize,
    /// New connections per second of each loop.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Successful connections before the fault.
    #[arg(long, default_value_t = 600)]
    warm: usize,
    /// Seconds of unbroken successes, past the first second after the fault, that end a run.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Longest a run waits for its warm-up, and for the recovery after the fault (seconds).
    #[arg(long, default_value_t = 15.0)]
    limit: f64,
    /// nginx's `proxy_connect_timeout` (ms): how long it waits for the primary's TCP and TLS
    /// handshake before it tries the backup.
    #[arg(long, default_value_t = 1000)]
    nginx_connect_timeout_ms: u64,
    /// `worker_threads` of each meshup gateway (default: the gateway's own).
    #[arg(long)]
    gateway_threads: Option<usize>,
    /// Only these contenders (comma-separated: meshup, nginx).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Short run (fewer connections before the fault, shorter settling): proves everything
    /// works; its figures are not worth comparing.
    #[arg(long)]
    quick: bool,
}

/// A connection that started just before the end of the first second may reach the faulted
/// end just after it: its accepts are counted from this long after the window.
const ACCEPT_SLACK: Duration = Duration::from_millis(250);

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.warm = 200;
        args.settle = 1.5;
    }
    meshup_tests::procs::run_until_signalled(run(args))
}

async fn run(args: Args) -> Result<()> {
    for name in &args.only {
        anyhow::ensure!(
            ["meshup", "nginx"].contains(&name.as_str()),
            "--only: unknown contender {name:?} (known: meshup, nginx)"
        );
    }
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let temp = tempfile::Builder::new()
        .prefix("meshup-bench-failover-")
        .tempdir()
        .context("create temp dir")?;
    let pki = Pki::generate(temp.path())?;
    print_header(&args);

    let mut report = Report::default();
    for fault in [Fault::Kill9, Fault::Stop, Fault::Drill] {
        for name in ["meshup", "nginx"] {
            if !wanted(name) || (name == "nginx" && fault == Fault::Drill) {
                continue;
            }
            eprintln!("== {}: {name}", fault.title());
            let dir = temp.path().join(format!("{name}-{fault:?}"));
            std::fs::create_dir_all(&dir).context("create run dir")?;
            let row = async {
                let contender = match name {
                    "meshup" => Contender::meshup(&args.meshup, args.gateway_threads).await,
                    _ => {
                        let timeout = Duration::from_millis(args.nginx_connect_timeout_ms);
                        Contender::nginx(&dir, &pki, timeout).await
                    }
                }
                .with_context(|| format!("set up {name}"))?;
                measure(contender, fault, &args).await
            }
            .await;
            match &row {
                Ok(r) => eprintln!("{}", r.run.figures),
                Err(e) => eprintln!("FAILED: {e:#}"),
            }
            report
                .entries
                .push((fault, name, row.map_err(|e| format!("{e:#}"))));
        }
    }
    println!("{}", report.render());
    anyhow::ensure!(
        report.failed() == 0,
        "{} run(s) failed; see above",
        report.failed()
    );
    Ok(())
}

/// One workload through `contender`, with `fault` on the end that served it.
async fn measure(mut contender: Contender, fault: Fault, args: &Args) -> Result<Row> {
    let mut workload = Workload::new(contender.addr(), args.loops, args.rate);
    workload.limit = Duration::from_secs(120);
    let plan = FaultPlan {
        warm_successes: args.warm,
        window: TARGET_WINDOW,
        settle: Duration::from_secs_f64(args.settle),
        limit: Duration::from_secs_f64(args.limit),
    };
    let started = Instant::now();
    let mut primary = "";
    let result = run_with_fault(workload, &plan, || {
        primary = contender.serving_since(started);
        contender.inject(fault, primary)
    })
    .await;
    if fault == Fault::Stop && !primary.is_empty() {
        contender.resume(primary)?;
    }
    let run = result.with_context(|| contender.log_tails())?;
    let window_end = run.fault + TARGET_WINDOW;
    Ok(Row {
        primary,
        configured_primary: contender.ends()[0],
        served: [
            contender.served_between(run.origin, Some(run.fault)),
            contender.served_between(run.fault, Some(window_end)),
            contender.served_between(window_end + ACCEPT_SLACK, None),
        ],
        ends: contender.ends(),
        run,
    })
}

fn print_header(args: &Args) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "meshup failover benchmark: {cores} cores, load average {}",
        load.trim()
    );
    println!(
        "workload: {} loops × {} new connections/s, 64-byte request echoed, 2 s timeout; \
         fault after {} successes; a run ends {:.1} s into unbroken successes past the first \
         second, or {:.0} s after the fault{}",
        args.loops,
        args.rate,
        args.warm,
        args.settle,
        args.limit,
        if args.quick {
            " (quick smoke run: figures not comparable)"
        } else {
            ""
        }
    );
    println!(
        "meshup: east → QUIC mTLS → west (policy level 1) or north (level 2), one gateway each, \
         worker_threads {}; nginx: front (proxy_ssl) → primary | backup server ends, \
         proxy_connect_timeout {} ms, proxy_next_upstream on, max_fails=1 fail_timeout=10s",
        args.gateway_threads
            .map_or_else(|| "default".to_owned(), |n| n.to_string()),
        args.nginx_connect_timeout_ms
    );
}

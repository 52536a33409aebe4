//! Side-by-side HTTP benchmark: HTTP/1.1 keep-alive (wrk) and h2c (h2load) at 1, 16 and 64
//! clients through (a) nothing, (b) an nginx HTTP reverse-proxy pair with mTLS and
//! keep-alive upstream, (c) the meshup gateway pair with a `tcp` port and (d) the same pair
//! with an `http` port, in one run, printed with the ratios the targets name.
//!
//! The machine is shared and noisy (docs/benchmarks.md), so every point runs all
//! contenders back to back (order rotated per point) and the ratios compare them within
//! the run; `--rounds N` repeats the whole sequence and reports medians. CPU is the proxy
//! processes' own utime + stime over each phase, from /proc.
//!
//! Layout: `backend` (the hyper server), `contenders` (set-up and probes), `load` (wrk and
//! h2load, their output parsed), `report` (tables and ratios). nginx, the gateway pair, child
//! processes and the CPU meter are shared with the other benchmarks (`meshup_tests`).

mod backend;
mod contenders;
mod load;
mod report;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use meshup_tests::bench::{PairArgs, ScratchDir};
use meshup_tests::tls::Pki;

use crate::contenders::{Contender, MESHUP_HTTP, MESHUP_HTTP1, MESHUP_TCP};
use crate::load::Protocol;
use crate::report::{Phase, Report};

/// Side-by-side HTTP benchmark of meshup's tcp and http ports against an nginx pair.
#[derive(Debug, Parser)]
#[command(name = "meshup-bench-http", args_override_self = true)]
struct Args {
    /// Seconds each point (a contender, a protocol, a client count) runs the load for.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Client counts (connections), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    clients: Vec<usize>,
    /// Rounds: the whole sequence of points is run this many times; each figure is then the
    /// median over the rounds and each ratio the median of the rounds' own ratios.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=50))]
    rounds: u16,
    /// Smoke run: 1 s points, one round. Proves everything works; its figures are not worth
    /// comparing.
    #[arg(long)]
    quick: bool,
    /// Run only these contenders (comma-separated: direct, nginx, meshup). Default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Set the contenders up, print their addresses and process ids, and keep them running
    /// without load until interrupted: for attaching perf, strace or callgrind by hand.
    #[arg(long)]
    hold: bool,
    /// Seconds each contender gets to answer its first requests (more for a `--meshup`
    /// wrapper that starts the gateways under valgrind).
    #[arg(long, default_value_t = 10)]
    probe_secs: u64,
    #[command(flatten)]
    pair: PairArgs,
}

/// Contender groups `--only` knows.
const GROUPS: [&str; 3] = ["direct", "nginx", "meshup"];

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.duration = 1;
        args.rounds = 1;
    }
    meshup_tests::procs::run_until_signalled(run(args))
}

async fn run(args: Args) -> Result<()> {
    for name in &args.only {
        anyhow::ensure!(
            GROUPS.contains(&name.as_str()),
            "--only: unknown contender {name:?} (known: {})",
            GROUPS.join(", ")
        );
    }
    anyhow::ensure!(
        !args.clients.is_empty() && !args.clients.contains(&0),
        "--clients: give one or more client counts above 0, e.g. 1,16,64"
    );
    // Removed on drop unless kept (on request, or below when a point failed).
    let mut scratch = ScratchDir::new("meshup-bench-http-", args.pair.keep_temp)?;
    let dir = scratch.path().to_owned();
    let wanted = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);

    let backend = backend::start().await?;
    let pki = Pki::generate(&dir)?;
    let mut report = Report::default();
    // A missing or broken peer is a broken benchmark: fail loudly, naming the package.
    let mut contenders = Vec::new();
    if wanted("direct") {
        contenders.push(Contender::direct(backend.addr()));
    }
    if wanted("nginx") {
        contenders.push(contenders::nginx_pair(&dir, &pki, backend.addr()).context("nginx pair")?);
    }
    if !wanted("meshup") {
        // Left out on purpose: nothing to report.
    } else if args.pair.no_meshup {
        report.record_unavailable(MESHUP_TCP, "left out with --no-meshup".to_owned());
        report.record_unavailable(MESHUP_HTTP, "left out with --no-meshup".to_owned());
        report.record_unavailable(MESHUP_HTTP1, "left out with --no-meshup".to_owned());
    } else {
        let binary = args.pair.binary();
        let threads = args.pair.gateway_threads;
        match contenders::meshup_pair(&dir, &binary, backend.addr(), threads).await {
            Ok(pair) => contenders.extend(pair),
            Err(e) => {
                let reason = format!("{e:#}");
                eprintln!("meshup: not available ({reason})");
                report.record_unavailable(MESHUP_TCP, reason.clone());
                report.record_unavailable(MESHUP_HTTP, reason.clone());
                report.record_unavailable(MESHUP_HTTP1, reason);
            }
        }
    }
    for contender in &contenders {
        contender
            .probe(Duration::from_secs(args.probe_secs))
            .await?;
    }

    print_header(&args, &contenders);
    if args.hold {
        return hold(&contenders).await;
    }
    let duration = Duration::from_secs(args.duration);
    let mut point = 0;
    for round in 0..usize::from(args.rounds) {
        for protocol in [Protocol::Http1, Protocol::H2] {
            for &clients in &args.clients {
                // Rotate the order per point so no contender always runs first or last.
                let n = contenders.len();
                for i in 0..n {
                    let contender = &contenders[(i + point) % n];
                    let outcome = measure(contender, protocol, clients, duration, &dir).await;
                    let label = format!(
                        "{}{} {clients} clients, {}",
                        round_label(round, args.rounds),
                        protocol.label(),
                        contender.name
                    );
                    match &outcome {
                        Ok(p) => eprintln!(
                            "{label}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, proxy CPU {:.2?} s",
                            p.load.requests_per_second, p.load.p50_ms, p.load.p99_ms, p.cpu_s
                        ),
                        Err(e) => eprintln!("{label}: FAILED: {e:#}"),
                    }
                    report.record(
                        protocol,
                        clients,
                        round,
                        contender.name,
                        outcome.map_err(|e| format!("{e:#}")),
                    );
                }
                point += 1;
            }
        }
    }
    println!("{}", report.render());
    drop(contenders);
    let meshup_ran = !report.is_unavailable(MESHUP_HTTP);
    args.pair
        .finish(&mut scratch, report.failed_phases(), meshup_ran)
}

/// `--hold`: the contenders' process ids, then nothing until a signal stops the run (its
/// peers are stopped as the contenders drop).
async fn hold(contenders: &[Contender]) -> Result<()> {
    for c in contenders {
        println!("  {:<16} processes {:?}", c.name, c.cpu.roots());
    }
    println!("holding: the contenders run until interrupted (Ctrl-C, SIGTERM)");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for c in contenders {
            c.ensure_running()?;
        }
    }
}

/// `round 2/3: ` when there are several rounds, else nothing.
fn round_label(round: usize, rounds: u16) -> String {
    if rounds > 1 {
        format!("round {}/{rounds}: ", round + 1)
    } else {
        String::new()
    }
}

/// One point: the load through one contender, with its proxies' CPU around it.
async fn measure(
    contender: &Contender,
    protocol: Protocol,
    clients: usize,
    duration: Duration,
    scratch: &std::path::Path,
) -> Result<Phase> {
    contender.ensure_running()?;
    let before = contender.cpu_seconds()?;
    let load = load::run(
        protocol,
        contender.addr(protocol),
        clients,
        duration,
        scratch,
    )
    .await?;
    let after = contender.cpu_seconds()?;
    // A proxy that crashed at the end of a point must not report figures as if it worked.
    contender.ensure_running()?;
    Ok(Phase {
        load,
        cpu_s: before.zip(after).map(|(b, a)| a - b),
    })
}

fn print_header(args: &Args, contenders: &[Contender]) {
    println!("{}", meshup_tests::bench::machine_line("HTTP"));
    if !args.hold {
        println!(
            "{} s per point; clients {:?}; {}; body {} bytes{}",
            args.duration,
            args.clients,
            if args.rounds > 1 {
                format!("{} rounds, figures are medians over them", args.rounds)
            } else {
                "one round".to_owned()
            },
            backend::BODY.len(),
            if args.quick {
                " (quick smoke run: figures not comparable)"
            } else {
                ""
            }
        );
    }
    for c in contenders {
        println!(
            "  {:<16} HTTP/1.1 via {}, h2c via {}",
            c.name, c.http1, c.h2
        );
    }
    if !args.hold {
        println!(
            "CPU is the proxy processes' utime+stime (nginx: both masters and workers; meshup: both gateways)."
        );
    }
}

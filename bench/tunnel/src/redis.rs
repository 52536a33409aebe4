//! A real client and server through each contender: `redis-benchmark` GET against a
//! `redis-server` the benchmark starts, at 1, 16 and 64 connections (one request in flight
//! per connection, no pipelining). Small requests (a 3-byte value) on warm connections:
//! what a chain of dependent requests pays per hop, and how concurrency hides it.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use meshup_tests::free_port;
use meshup_tests::procs::{ChildGuard, find_program};

/// Upper bound on one redis-benchmark run: a stalled tunnel fails the phase.
const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A redis-server on loopback, without persistence; stopped on drop.
#[derive(Debug)]
pub struct RedisServer {
    pub addr: SocketAddr,
    _child: ChildGuard,
}

/// Starts redis-server in `dir` on a free loopback port and stores the key GET reads.
pub async fn start_server(dir: &Path) -> Result<RedisServer> {
    let program = find_program(&["redis-server"], "redis-server")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = std::process::Command::new(program);
    cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir);
    let mut child = ChildGuard::spawn("redis-server", cmd, &dir.join("redis-server.log"))?;
    child.wait_for_port(addr, Duration::from_secs(10))?;
    // One SET of the key the GETs read (redis-benchmark's default key without `-r`, and its
    // default 3-byte value), so that every answer carries a value, not a nil.
    run_benchmark(addr, &["-t", "set", "-n", "1", "-c", "1"])
        .await
        .context("store the key")?;
    Ok(RedisServer {
        addr,
        _child: child,
    })
}

/// What one redis-benchmark GET run measured.
#[derive(Debug, Clone, Copy)]
pub struct Rate {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `requests` GETs over `connections` connections to `addr` (a contender's entry).
pub async fn get(addr: SocketAddr, connections: usize, requests: u64) -> Result<Rate> {
    let (n, c) = (requests.to_string(), connections.to_string());
    let csv = run_benchmark(addr, &["-t", "get", "-n", &n, "-c", &c]).await?;
    let mut rate = parse_csv(&csv, "GET")?;
    rate.requests = requests;
    Ok(rate)
}

/// Runs redis-benchmark against `addr` with `--csv` and returns its output; killed if it
/// takes longer than `RUN_LIMIT`.
async fn run_benchmark(addr: SocketAddr, args: &[&str]) -> Result<String> {
    let program = find_program(&["redis-benchmark"], "redis-tools")?;
    let run = tokio::process::Command::new(program)
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(args)
        .arg("--csv")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "redis-benchmark {args:?} through {addr} did not finish within {RUN_LIMIT:?}"
            )
        })?
        .context("run redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(
        output.status.success(),
        "redis-benchmark {args:?} through {addr} failed ({}): {}{}",
        output.status,
        stdout.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(stdout)
}

/// Reads the row of `test` from redis-benchmark's `--csv` output (a header row naming the
/// columns, then one row per test; redis 7: `rps`, `p50_latency_ms`, `p99_latency_ms`).
fn parse_csv(csv: &str, test: &str) -> Result<Rate> {
    let split = |line: &str| -> Vec<String> {
        line.split(',')
            .map(|cell| cell.trim().trim_matches('"').to_owned())
            .collect()
    };
    let mut lines = csv.lines().filter(|l| !l.trim().is_empty());
    let header = split(lines.next().context("redis-benchmark printed nothing")?);
    let row = lines
        .map(split)
        .find(|row| row.first().map(String::as_str) == Some(test))
        .with_context(|| format!("no {test} row in redis-benchmark's output: {csv:?}"))?;
    let column = |name: &str| -> Result<f64> {
        let i = header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("no column {name} in redis-benchmark's header {header:?}"))?;
        let cell = row.get(i).with_context(|| format!("short row {row:?}"))?;
        cell.parse::<f64>()
            .with_context(|| format!("column {name}: not a number: {cell:?}"))
    };
    let rps = column("rps")?;
    ensure!(rps > 0.0, "redis-benchmark reported {rps} requests/s");
    Ok(Rate {
        requests: 0,
        rps,
        p50_us: column("p50_latency_ms")? * 1e3,
        p99_us: column("p99_latency_ms")? * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_get_row_by_its_header() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"GET\",\"41152.26\",\"0.371\",\"0.136\",\"0.351\",\"0.519\",\"0.719\",\"3.247\"\n";
        let rate = parse_csv(csv, "GET").expect("parse");
        assert_eq!(rate.rps, 41152.26);
        assert!((rate.p50_us - 351.0).abs() < 1e-6);
        assert!((rate.p99_us - 719.0).abs() < 1e-6);
    }

    #[test]
    fn a_missing_row_or_column_is_an_error() {
        let header = "\"test\",\"rps\",\"p50_latency_ms\",\"p99_latency_ms\"\n";
        assert!(parse_csv(&format!("{header}\"SET\",\"1\",\"1\",\"1\"\n"), "GET").is_err());
        assert!(parse_csv("\"test\",\"rps\"\n\"GET\",\"5\"\n", "GET").is_err());
        assert!(parse_csv("", "GET").is_err());
        assert!(parse_csv(&format!("{header}\"GET\",\"0\",\"1\",\"1\"\n"), "GET").is_err());
    }
}

//! The load generators, run as the user would run them: `wrk --latency` for HTTP/1.1
//! keep-alive and `h2load` for h2 (h2c with prior knowledge, one request in flight per
//! client: `-m 1`), each client one connection. Their output is parsed by the pure functions
//! below; a run with failed requests, socket errors or non-2xx answers is an error, so a
//! broken proxy fails its phase instead of looking fast.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshup_tests::procs::find_program;

/// Which protocol a phase speaks, and so which tool drives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive, driven by wrk.
    Http1,
    /// h2c with prior knowledge, driven by h2load.
    H2,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "HTTP/1.1",
            Protocol::H2 => "h2c",
        }
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadFigures {
    /// Requests answered with 2xx during the run.
    pub requests: u64,
    pub requests_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Threads of the load generator: one per client up to the machine's cores (wrk and
/// h2load need at least one connection per thread).
fn threads(clients: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    clients.clamp(1, cores.max(1))
}

/// Longest a load run may take past its duration (start-up, connection set-up, the last
/// responses) before it counts as stalled.
const RUN_SLACK: Duration = Duration::from_secs(30);

/// Runs the protocol's tool against `http://addr/` with `clients` connections for
/// `duration`; `scratch` is a directory for h2load's per-request log.
pub async fn run(
    protocol: Protocol,
    addr: SocketAddr,
    clients: usize,
    duration: Duration,
    scratch: &Path,
) -> Result<LoadFigures> {
    let url = format!("http://{addr}/");
    let threads = threads(clients).to_string();
    let clients_arg = clients.to_string();
    let seconds = format!("{}s", duration.as_secs_f64().ceil().max(1.0));
    let (program, args, log) = match protocol {
        Protocol::Http1 => {
            let program = find_program(&["wrk"], "wrk")?;
            let args = vec![
                "--latency".to_owned(),
                "-t".to_owned(),
                threads,
                "-c".to_owned(),
                clients_arg,
                "-d".to_owned(),
                seconds,
                url,
            ];
            (program, args, None)
        }
        Protocol::H2 => {
            let program = find_program(&["h2load"], "nghttp2-client")?;
            let log = scratch.join(format!("h2load-{}-{clients}.log", addr.port()));
            let args = vec![
                "-t".to_owned(),
                threads,
                "-c".to_owned(),
                clients_arg,
                "-m".to_owned(),
                "1".to_owned(),
                "-D".to_owned(),
                seconds,
                "--log-file".to_owned(),
                log.display().to_string(),
                url,
            ];
            (program, args, Some(log))
        }
    };
    let out = tokio::time::timeout(
        duration + RUN_SLACK,
        tokio::process::Command::new(&program)
            .args(&args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| {
        format!(
            "{} {} did not finish within {:?}",
            program.display(),
            args.join(" "),
            duration + RUN_SLACK
        )
    })?
    .with_context(|| format!("run {}", program.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} {} failed ({}):\n{stdout}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let figures = match log {
        None => parse_wrk(&stdout),
        Some(log) => {
            let per_request = std::fs::read_to_string(&log)
                .with_context(|| format!("read h2load's log {}", log.display()))?;
            let figures = parse_h2load(&stdout, &per_request);
            // Up to hundreds of thousands of lines per run: not kept.
            let _ = std::fs::remove_file(&log);
            figures
        }
    };
    figures.with_context(|| format!("{} {}:\n{stdout}", program.display(), args.join(" ")))
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<LoadFigures> {
    let mut requests = None;
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = Some(rest.trim().parse::<f64>().context("Requests/sec value")?);
        } else if let Some(rest) = line.strip_prefix("50%") {
            p50 = Some(parse_duration_ms(rest.trim())?);
        } else if let Some(rest) = line.strip_prefix("99%") {
            p99 = Some(parse_duration_ms(rest.trim())?);
        } else if line.contains(" requests in ") {
            let count = line.split_whitespace().next().unwrap_or_default();
            requests = Some(count.parse::<u64>().context("request count")?);
        } else if line.starts_with("Non-2xx or 3xx responses:") {
            bail!("wrk saw failed requests: {line}");
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            bail!("wrk saw socket errors:{rest}");
        }
    }
    let requests = requests.context("no `N requests in` line")?;
    if requests == 0 {
        bail!("no request was answered");
    }
    Ok(LoadFigures {
        requests,
        requests_per_second: rps.context("no Requests/sec line")?,
        p50_ms: p50.context("no 50% latency line (was --latency given?)")?,
        p99_ms: p99.context("no 99% latency line")?,
    })
}

/// A wrk duration (`45.00us`, `1.20ms`, `2.00s`, `1.00m`) in milliseconds.
fn parse_duration_ms(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("duration {text:?} without a unit"))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("duration {text:?}"))?;
    let factor = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => bail!("duration {text:?}: unknown unit {other:?}"),
    };
    Ok(value * factor)
}

/// Parses h2load's summary and its `--log-file` (one line per request: start time in µs
/// since the epoch, status code, µs until the end of the response), the source of the
/// percentiles h2load itself does not print.
pub fn parse_h2load(summary: &str, per_request: &str) -> Result<LoadFigures> {
    let mut rps = None;
    let mut succeeded = None;
    for line in summary.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // finished in 5.00s, 41234.40 req/s, 3.59MB/s
            let value = rest
                .split(", ")
                .find_map(|part| part.strip_suffix(" req/s"))
                .context("no req/s in the `finished in` line")?;
            rps = Some(value.parse::<f64>().context("req/s value")?);
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout
            let count = |what: &str| -> Result<u64> {
                rest.split(", ")
                    .find_map(|part| part.strip_suffix(what))
                    .with_context(|| format!("no `{what}` count in {line:?}"))?
                    .trim()
                    .parse::<u64>()
                    .with_context(|| format!("`{what}` count in {line:?}"))
            };
            for bad in [" failed", " errored", " timeout"] {
                if count(bad)? > 0 {
                    bail!("h2load saw failed requests: {line}");
                }
            }
            succeeded = Some(count(" succeeded")?);
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            // status codes: 100 2xx, 0 3xx, 0 4xx, 0 5xx
            for part in rest.split(", ").filter(|p| !p.ends_with(" 2xx")) {
                if part.split_whitespace().next() != Some("0") {
                    bail!("h2load saw non-2xx answers: {line}");
                }
            }
        }
    }
    let requests = succeeded.context("no `requests:` line")?;
    if requests == 0 {
        bail!("no request was answered");
    }
    let mut micros = Vec::new();
    for line in per_request.lines().filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let (Some(_start), Some(status), Some(took)) =
            (fields.next(), fields.next(), fields.next())
        else {
            bail!("h2load log line {line:?}: expected start, status, duration");
        };
        if !status.starts_with('2') {
            bail!("h2load log line {line:?}: status {status}");
        }
        micros.push(
            took.parse::<u64>()
                .with_context(|| format!("h2load log line {line:?}: duration"))?,
        );
    }
    if micros.is_empty() {
        bail!("h2load's log has no requests");
    }
    micros.sort_unstable();
    Ok(LoadFigures {
        requests,
        requests_per_second: rps.context("no `finished in` line")?,
        p50_ms: percentile(&micros, 0.50) as f64 / 1000.0,
        p99_ms: percentile(&micros, 0.99) as f64 / 1000.0,
    })
}

/// The nearest-rank percentile of sorted, non-empty `values`.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 5s test @ http://127.0.0.1:41000/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   412.51us  301.02us  12.01ms   93.12%
    Req/Sec    19.80k     1.10k   22.10k    70.00%
  Latency Distribution
     50%  352.00us
     75%  480.00us
     90%  610.00us
     99%    1.52ms
  197042 requests in 5.00s, 26.31MB read
Requests/sec:  39401.23
Transfer/sec:      5.26MB
";

    const H2LOAD: &str = "starting benchmark...
finished in 5.00s, 30123.40 req/s, 2.10MB/s
requests: 150617 total, 150633 started, 150617 done, 150617 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 150617 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 10.50MB (11010048) total, 1.20MB (1258291) headers (space savings 90.00%), 9.19MB (9639488) data
";

    #[test]
    fn wrk_figures_are_read_with_their_units() {
        let f = parse_wrk(WRK).expect("parses");
        assert_eq!(f.requests, 197_042);
        assert_eq!(f.requests_per_second, 39_401.23);
        assert!((f.p50_ms - 0.352).abs() < 1e-9, "{}", f.p50_ms);
        assert!((f.p99_ms - 1.52).abs() < 1e-9, "{}", f.p99_ms);
    }

    #[test]
    fn wrk_errors_fail_the_run() {
        let cases = [
            ("  Non-2xx or 3xx responses: 12\n", "failed requests"),
            (
                "  Socket errors: connect 0, read 3, write 0, timeout 0\n",
                "socket errors",
            ),
        ];
        for (extra, want) in cases {
            let text = WRK.replace("Requests/sec", &format!("{extra}Requests/sec"));
            let err = parse_wrk(&text).expect_err(extra);
            assert!(format!("{err:#}").contains(want), "{extra}: {err:#}");
        }
        let err = parse_wrk("Running 5s test\n").expect_err("empty output");
        assert!(format!("{err:#}").contains("requests in"), "{err:#}");
    }

    #[test]
    fn wrk_durations_in_every_unit() {
        for (text, ms) in [
            ("45.00us", 0.045),
            ("1.20ms", 1.2),
            ("2.00s", 2000.0),
            ("1.00m", 60_000.0),
        ] {
            assert!(
                (parse_duration_ms(text).expect(text) - ms).abs() < 1e-9,
                "{text}"
            );
        }
        assert!(parse_duration_ms("12").is_err());
        assert!(parse_duration_ms("12parsecs").is_err());
    }

    #[test]
    fn h2load_percentiles_come_from_its_log() {
        // 100 requests of 1..=100 ms: p50 is the 50th, p99 the 99th.
        let log: String = (1..=100u64)
            .map(|i| format!("1700000000{i:06}\t200\t{}\n", i * 1000))
            .collect();
        let f = parse_h2load(H2LOAD, &log).expect("parses");
        assert_eq!(f.requests, 150_617);
        assert_eq!(f.requests_per_second, 30_123.40);
        assert_eq!(f.p50_ms, 50.0);
        assert_eq!(f.p99_ms, 99.0);
    }

    #[test]
    fn h2load_failures_fail_the_run() {
        let log = "1\t200\t100\n";
        let cases = [
            (
                H2LOAD.replace("0 failed", "3 failed"),
                log.to_owned(),
                "failed requests",
            ),
            (H2LOAD.replace("0 5xx", "7 5xx"), log.to_owned(), "non-2xx"),
            (H2LOAD.to_owned(), "1\t503\t100\n".to_owned(), "status 503"),
            (H2LOAD.to_owned(), String::new(), "no requests"),
        ];
        for (summary, log, want) in cases {
            let err = parse_h2load(&summary, &log).expect_err(want);
            assert!(format!("{err:#}").contains(want), "{want}: {err:#}");
        }
    }

    #[test]
    fn nearest_rank_percentile() {
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), 2);
        assert_eq!(percentile(&[1, 2, 3, 4], 0.99), 4);
    }
}

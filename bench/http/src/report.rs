//! Collects every phase's figures and prints one table per protocol plus the ratios the
//! targets name (docs/benchmarks.md): (d)/(b) requests per proxy CPU-second (target ≥ 1.0×)
//! and (d)/(c) requests/s (target ≥ 0.9×, "within 10 %"). Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::contenders::{MESHUP_HTTP, MESHUP_TCP, NGINX};
use crate::load::{LoadFigures, Protocol};

/// What one phase (a contender, a protocol, a client count) measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub load: LoadFigures,
    /// The proxy processes' CPU-seconds over the phase (`None` for direct).
    pub cpu_s: Option<f64>,
}

impl Phase {
    /// Proxy CPU-seconds per 100,000 requests.
    pub fn cpu_per_100k(&self) -> Option<f64> {
        self.cpu_s
            .map(|cpu| cpu / self.load.requests as f64 * 100_000.0)
    }

    /// Requests answered per proxy CPU-second.
    pub fn requests_per_cpu_second(&self) -> Option<f64> {
        self.cpu_s
            .filter(|cpu| *cpu > 0.0)
            .map(|cpu| self.load.requests as f64 / cpu)
    }
}

/// The outcomes at one point (a protocol and a client count): contender, phase or error.
type Outcomes = Vec<(&'static str, Result<Phase, String>)>;

/// Every phase's outcome, keyed by protocol, clients and contender (in the order added).
#[derive(Debug, Default)]
pub struct Report {
    phases: BTreeMap<(Protocol, usize), Outcomes>,
    unavailable: Vec<(&'static str, String)>,
}

/// Ratio targets (docs/benchmarks.md).
const TARGET_HTTP_VS_NGINX_PER_CPU: f64 = 1.0;
const TARGET_HTTP_VS_TCP_RPS: f64 = 0.9;

impl Report {
    pub fn record(
        &mut self,
        protocol: Protocol,
        clients: usize,
        contender: &'static str,
        phase: Result<Phase, String>,
    ) {
        self.phases
            .entry((protocol, clients))
            .or_default()
            .push((contender, phase));
    }

    pub fn record_unavailable(&mut self, contender: &'static str, reason: String) {
        self.unavailable.push((contender, reason));
    }

    pub fn is_unavailable(&self, contender: &str) -> bool {
        self.unavailable.iter().any(|(c, _)| *c == contender)
    }

    pub fn failed_phases(&self) -> usize {
        self.phases
            .values()
            .flatten()
            .filter(|(_, p)| p.is_err())
            .count()
    }

    fn phase(&self, protocol: Protocol, clients: usize, contender: &str) -> Option<&Phase> {
        self.phases
            .get(&(protocol, clients))?
            .iter()
            .find(|(c, _)| *c == contender)
            .and_then(|(_, p)| p.as_ref().ok())
    }

    /// The tables, as Markdown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut protocols: Vec<Protocol> = self.phases.keys().map(|(p, _)| *p).collect();
        protocols.dedup();
        for protocol in &protocols {
            let tool = match protocol {
                Protocol::Http1 => "wrk, keep-alive",
                Protocol::H2 => "h2load -m 1, prior knowledge",
            };
            let _ = writeln!(out, "\n{} ({tool})\n", protocol.label());
            let _ = writeln!(
                out,
                "| clients | contender | requests/s | p50 ms | p99 ms | proxy CPU-s per 100k requests |"
            );
            let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- |");
            for ((_, clients), rows) in self.phases.range((*protocol, 0)..=(*protocol, usize::MAX))
            {
                // Run order rotates; print in the contenders' own order, (a) to (d).
                let mut rows: Vec<_> = rows.iter().collect();
                rows.sort_by_key(|(contender, _)| *contender);
                for (contender, phase) in rows {
                    match phase {
                        Ok(p) => {
                            let cpu = p
                                .cpu_per_100k()
                                .map_or("—".to_owned(), |c| format!("{c:.2}"));
                            let _ = writeln!(
                                out,
                                "| {clients} | {contender} | {:.0} | {:.3} | {:.3} | {cpu} |",
                                p.load.requests_per_second, p.load.p50_ms, p.load.p99_ms
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(
                                out,
                                "| {clients} | {contender} | FAILED: {} | | | |",
                                first_line(e)
                            );
                        }
                    }
                }
            }
        }
        let _ = writeln!(
            out,
            "\nRatios (targets from docs/benchmarks.md)\n\n\
             | protocol | clients | (d)/(b) requests per CPU-second (≥ {TARGET_HTTP_VS_NGINX_PER_CPU:.1}×) | (d)/(c) requests/s (≥ {TARGET_HTTP_VS_TCP_RPS:.1}×) |\n\
             | --- | --- | --- | --- |"
        );
        for (protocol, clients) in self.phases.keys() {
            let http = self.phase(*protocol, *clients, MESHUP_HTTP);
            let per_cpu = http
                .and_then(Phase::requests_per_cpu_second)
                .zip(
                    self.phase(*protocol, *clients, NGINX)
                        .and_then(Phase::requests_per_cpu_second),
                )
                .map(|(d, b)| verdict(d / b, TARGET_HTTP_VS_NGINX_PER_CPU));
            let rps = http
                .zip(self.phase(*protocol, *clients, MESHUP_TCP))
                .map(|(d, c)| {
                    verdict(
                        d.load.requests_per_second / c.load.requests_per_second,
                        TARGET_HTTP_VS_TCP_RPS,
                    )
                });
            let _ = writeln!(
                out,
                "| {} | {clients} | {} | {} |",
                protocol.label(),
                per_cpu.as_deref().unwrap_or("—"),
                rps.as_deref().unwrap_or("—"),
            );
        }
        for (contender, reason) in &self.unavailable {
            let _ = writeln!(out, "\n{contender}: not available ({})", first_line(reason));
        }
        out
    }
}

fn verdict(ratio: f64, target: f64) -> String {
    let word = if ratio >= target { "met" } else { "missed" };
    format!("{ratio:.2}× {word}")
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contenders::DIRECT;

    fn phase(rps: f64, requests: u64, cpu_s: Option<f64>) -> Result<Phase, String> {
        Ok(Phase {
            load: LoadFigures {
                requests,
                requests_per_second: rps,
                p50_ms: 0.25,
                p99_ms: 1.5,
            },
            cpu_s,
        })
    }

    #[test]
    fn cpu_per_100k_and_per_cpu_second() {
        let p = phase(20_000.0, 100_000, Some(2.5)).expect("ok");
        assert_eq!(p.cpu_per_100k(), Some(2.5));
        assert_eq!(p.requests_per_cpu_second(), Some(40_000.0));
        let direct = phase(50_000.0, 250_000, None).expect("ok");
        assert_eq!(direct.cpu_per_100k(), None);
        assert_eq!(direct.requests_per_cpu_second(), None);
    }

    #[test]
    fn ratios_compare_http_mode_with_nginx_per_cpu_and_with_tcp_mode() {
        let mut r = Report::default();
        let h1 = Protocol::Http1;
        r.record(h1, 16, DIRECT, phase(60_000.0, 300_000, None));
        // nginx: 100k requests for 4 CPU-s = 25k per CPU-s.
        r.record(h1, 16, NGINX, phase(20_000.0, 100_000, Some(4.0)));
        r.record(h1, 16, MESHUP_TCP, phase(30_000.0, 150_000, Some(3.0)));
        // http mode: 120k requests for 4 CPU-s = 30k per CPU-s: 1.2× nginx; 24k/30k = 0.8× tcp.
        r.record(h1, 16, MESHUP_HTTP, phase(24_000.0, 120_000, Some(4.0)));
        let text = r.render();
        assert!(
            text.contains("| HTTP/1.1 | 16 | 1.20× met | 0.80× missed |"),
            "{text}"
        );
        assert!(
            text.contains("| 16 | (b) nginx pair | 20000 | 0.250 | 1.500 | 4.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| 16 | (a) direct | 60000 | 0.250 | 1.500 | — |"),
            "{text}"
        );
        assert_eq!(r.failed_phases(), 0);
    }

    #[test]
    fn a_failed_phase_is_counted_and_leaves_its_ratios_empty() {
        let mut r = Report::default();
        r.record(Protocol::H2, 64, NGINX, phase(20_000.0, 100_000, Some(4.0)));
        r.record(
            Protocol::H2,
            64,
            MESHUP_HTTP,
            Err("h2load saw failed requests\nmore".to_owned()),
        );
        let text = r.render();
        assert!(
            text.contains("| 64 | (d) meshup http | FAILED: h2load saw failed requests |"),
            "{text}"
        );
        assert!(text.contains("| h2c | 64 | — | — |"), "{text}");
        assert_eq!(r.failed_phases(), 1);
    }
}

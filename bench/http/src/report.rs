//! Collects every phase's figures and prints one table per protocol plus the ratios the
//! targets name (docs/benchmarks.md): (d)/(b) requests per proxy CPU-second (target ≥ 1.0×)
//! and (d)/(c) requests/s (target ≥ 0.9×, "within 10 %"). With several rounds, each figure
//! is the median over the rounds, and each ratio the median of the rounds' own ratios (the
//! contenders of one round ran back to back, so a round compares like with like), with its
//! range. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use meshup_tests::bench::median;

use crate::contenders::{MESHUP_HTTP, MESHUP_HTTP1, MESHUP_TCP, NGINX};
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

/// One phase's outcome: which contender, in which round, its figures or its error.
#[derive(Debug)]
struct Outcome {
    contender: &'static str,
    round: usize,
    phase: Result<Phase, String>,
}

/// Every phase's outcome, keyed by protocol and clients (in the order run).
#[derive(Debug, Default)]
pub struct Report {
    phases: BTreeMap<(Protocol, usize), Vec<Outcome>>,
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
        round: usize,
        contender: &'static str,
        phase: Result<Phase, String>,
    ) {
        self.phases
            .entry((protocol, clients))
            .or_default()
            .push(Outcome {
                contender,
                round,
                phase,
            });
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
            .filter(|o| o.phase.is_err())
            .count()
    }

    /// A contender's phase at a point in one round, if it succeeded.
    fn phase(&self, point: (Protocol, usize), round: usize, contender: &str) -> Option<&Phase> {
        self.phases
            .get(&point)?
            .iter()
            .find(|o| o.contender == contender && o.round == round)
            .and_then(|o| o.phase.as_ref().ok())
    }

    /// The rounds recorded at a point, in order.
    fn rounds(&self, point: (Protocol, usize)) -> Vec<usize> {
        let mut rounds: Vec<usize> = self.phases[&point].iter().map(|o| o.round).collect();
        rounds.sort_unstable();
        rounds.dedup();
        rounds
    }

    /// A ratio of two contenders' figures, one per round where both succeeded.
    fn ratios(
        &self,
        point: (Protocol, usize),
        (ours, theirs): (&str, &str),
        figure: impl Fn(&Phase) -> Option<f64>,
    ) -> Vec<f64> {
        self.rounds(point)
            .into_iter()
            .filter_map(|r| {
                let a = figure(self.phase(point, r, ours)?)?;
                let b = figure(self.phase(point, r, theirs)?)?;
                Some(a / b)
            })
            .collect()
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
            for (&(_, clients), outcomes) in
                self.phases.range((*protocol, 0)..=(*protocol, usize::MAX))
            {
                // Run order rotates; print in the contenders' own order, (a) to (d).
                let mut contenders: Vec<&'static str> =
                    outcomes.iter().map(|o| o.contender).collect();
                contenders.sort_unstable();
                contenders.dedup();
                for contender in contenders {
                    let mine = outcomes.iter().filter(|o| o.contender == contender);
                    // A contender that failed in any round is reported as failed.
                    if let Some(e) = mine.clone().find_map(|o| o.phase.as_ref().err()) {
                        let _ = writeln!(
                            out,
                            "| {clients} | {contender} | FAILED: {} | | | |",
                            first_line(e)
                        );
                        continue;
                    }
                    // At least one round, none failed.
                    let phases: Vec<&Phase> = mine.filter_map(|o| o.phase.as_ref().ok()).collect();
                    let median_of = |f: fn(&Phase) -> f64| {
                        median(&mut phases.iter().map(|p| f(p)).collect::<Vec<_>>())
                    };
                    let rps = median_of(|p| p.load.requests_per_second);
                    let p50 = median_of(|p| p.load.p50_ms);
                    let p99 = median_of(|p| p.load.p99_ms);
                    let mut cpu: Vec<f64> =
                        phases.iter().filter_map(|p| p.cpu_per_100k()).collect();
                    let cpu = if cpu.is_empty() {
                        "—".to_owned()
                    } else {
                        format!("{:.2}", median(&mut cpu))
                    };
                    let _ = writeln!(
                        out,
                        "| {clients} | {contender} | {rps:.0} | {p50:.3} | {p99:.3} | {cpu} |"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "\nRatios (targets from docs/benchmarks.md)\n\n\
             | protocol | clients | (d)/(b) requests per CPU-second (≥ {TARGET_HTTP_VS_NGINX_PER_CPU:.1}×) | (d)/(c) requests/s (≥ {TARGET_HTTP_VS_TCP_RPS:.1}×) | (b)/(c) requests/s, for reference | (e)/(b) requests per CPU-second (≥ {TARGET_HTTP_VS_NGINX_PER_CPU:.1}×) | (e)/(c) requests/s (≥ {TARGET_HTTP_VS_TCP_RPS:.1}×) |\n\
             | --- | --- | --- | --- | --- | --- | --- |"
        );
        for &point in self.phases.keys() {
            let per_cpu = self.ratios(point, (MESHUP_HTTP, NGINX), Phase::requests_per_cpu_second);
            let rps = self.ratios(point, (MESHUP_HTTP, MESHUP_TCP), |p| {
                Some(p.load.requests_per_second)
            });
            // What an HTTP proxy pair that is not meshup reaches against the tcp port: the
            // yardstick for the (d)/(c) target.
            let nginx_rps = self.ratios(point, (NGINX, MESHUP_TCP), |p| {
                Some(p.load.requests_per_second)
            });
            // The same port with HTTP/1.1 to the endpoint, as the nginx pair speaks to it.
            let http1_per_cpu =
                self.ratios(point, (MESHUP_HTTP1, NGINX), Phase::requests_per_cpu_second);
            let http1_rps = self.ratios(point, (MESHUP_HTTP1, MESHUP_TCP), |p| {
                Some(p.load.requests_per_second)
            });
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                point.0.label(),
                point.1,
                verdict(per_cpu, Some(TARGET_HTTP_VS_NGINX_PER_CPU)),
                verdict(rps, Some(TARGET_HTTP_VS_TCP_RPS)),
                verdict(nginx_rps, None),
                verdict(http1_per_cpu, Some(TARGET_HTTP_VS_NGINX_PER_CPU)),
                verdict(http1_rps, Some(TARGET_HTTP_VS_TCP_RPS)),
            );
        }
        for (contender, reason) in &self.unavailable {
            let _ = writeln!(out, "\n{contender}: not available ({})", first_line(reason));
        }
        out
    }
}

/// A ratio over the rounds: the median of the rounds' ratios, against the target if it has
/// one, with their range (and how many rounds met the target) when there were several;
/// `—` when no round has both figures.
fn verdict(mut ratios: Vec<f64>, target: Option<f64>) -> String {
    if ratios.is_empty() {
        return "—".to_owned();
    }
    // Sorts them: the first and last are the range.
    let m = median(&mut ratios);
    let mut text = format!("{m:.2}×");
    if let Some(t) = target {
        text += if m >= t { " met" } else { " missed" };
    }
    if let [low, .., high] = ratios.as_slice() {
        let _ = write!(text, " (rounds {low:.2}–{high:.2}");
        if let Some(t) = target {
            let met = ratios.iter().filter(|r| **r >= t).count();
            let _ = write!(text, ", {met} of {} met", ratios.len());
        }
        text.push(')');
    }
    text
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
        r.record(h1, 16, 0, DIRECT, phase(60_000.0, 300_000, None));
        // nginx: 100k requests for 4 CPU-s = 25k per CPU-s.
        r.record(h1, 16, 0, NGINX, phase(20_000.0, 100_000, Some(4.0)));
        r.record(h1, 16, 0, MESHUP_TCP, phase(30_000.0, 150_000, Some(3.0)));
        // http mode: 120k requests for 4 CPU-s = 30k per CPU-s: 1.2× nginx; 24k/30k = 0.8× tcp.
        r.record(h1, 16, 0, MESHUP_HTTP, phase(24_000.0, 120_000, Some(4.0)));
        // Endpoint HTTP/1.1: 135k for 4.5 CPU-s = 30k per CPU-s; 27k/30k = 0.9× tcp.
        r.record(h1, 16, 0, MESHUP_HTTP1, phase(27_000.0, 135_000, Some(4.5)));
        let text = r.render();
        assert!(
            text.contains(
                "| HTTP/1.1 | 16 | 1.20× met | 0.80× missed | 0.67× | 1.20× met | 0.90× met |"
            ),
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
    fn a_failed_phase_is_counted_and_leaves_its_ratios_to_the_rounds_that_answered() {
        let mut r = Report::default();
        r.record(
            Protocol::H2,
            64,
            0,
            NGINX,
            phase(20_000.0, 100_000, Some(4.0)),
        );
        r.record(
            Protocol::H2,
            64,
            0,
            MESHUP_HTTP,
            Err("h2load saw failed requests\nmore".to_owned()),
        );
        let text = r.render();
        assert!(
            text.contains("| 64 | (d) meshup http | FAILED: h2load saw failed requests |"),
            "{text}"
        );
        assert!(text.contains("| h2c | 64 | — | — | — | — | — |"), "{text}");
        assert_eq!(r.failed_phases(), 1);

        // A contender that failed in one round of several is reported failed; the ratios
        // use the rounds where both contenders answered (here round 0 only: no range).
        let h2 = Protocol::H2;
        r.record(h2, 1, 0, NGINX, phase(10_000.0, 50_000, Some(5.0)));
        r.record(h2, 1, 0, MESHUP_HTTP, phase(10_000.0, 50_000, Some(4.0)));
        r.record(h2, 1, 1, NGINX, phase(10_000.0, 50_000, Some(5.0)));
        r.record(h2, 1, 1, MESHUP_HTTP, Err("connection refused".to_owned()));
        let text = r.render();
        assert!(
            text.contains("| 1 | (d) meshup http | FAILED: connection refused |"),
            "{text}"
        );
        assert!(
            text.contains("| h2c | 1 | 1.25× met | — | — | — | — |"),
            "{text}"
        );
        assert_eq!(r.failed_phases(), 2);
    }

    #[test]
    fn rounds_give_medians_and_ratios_paired_within_each_round() {
        let mut r = Report::default();
        let h1 = Protocol::Http1;
        // Three rounds; the machine is slower in round 1 for every contender, so the
        // ratios of each round stay near 1.1× (per CPU-second) and 0.8× (requests/s).
        for (round, speed) in [(0, 1.0), (1, 0.5), (2, 1.1)] {
            let rps = |base: f64| base * speed;
            let n = |base: f64| (base * speed * 5.0) as u64;
            r.record(
                h1,
                16,
                round,
                NGINX,
                phase(rps(20_000.0), n(20_000.0), Some(4.0)),
            );
            r.record(
                h1,
                16,
                round,
                MESHUP_TCP,
                phase(rps(30_000.0), n(30_000.0), Some(3.0)),
            );
            r.record(
                h1,
                16,
                round,
                MESHUP_HTTP,
                phase(rps(24_000.0), n(24_000.0), Some(4.4 - round as f64 * 0.2)),
            );
        }
        let text = r.render();
        // Medians of the figures: 20000 of (20000, 10000, 22000).
        assert!(
            text.contains("| 16 | (b) nginx pair | 20000 | 0.250 | 1.500 | 4.00 |"),
            "{text}"
        );
        // Per CPU-second, round by round: (24k·5/4.4)/(20k·5/4) = 1.09, then 1.14, 1.20
        // (speed cancels out within a round); requests/s: 0.80 in every round.
        assert!(
            text.contains(
                "| HTTP/1.1 | 16 | 1.14× met (rounds 1.09–1.20, 3 of 3 met) | 0.80× missed (rounds 0.80–0.80, 0 of 3 met) | 0.67× (rounds 0.67–0.67) | — | — |"
            ),
            "{text}"
        );
    }
}

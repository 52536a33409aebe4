//! Collects the figures of every phase and prints one table per measure, with ratios to
//! direct TCP and to the best tunnel peer, CPU per unit of work, and meshup's targets.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use meshup_tests::bench::median;

use crate::peers::Kind;

/// The measures, in the order they are run and printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Measure {
    /// Aggregate throughput over this many connections.
    Throughput(usize),
    /// 1 KiB request/response on one warm connection.
    RequestResponse,
    /// Connect, 1 KiB request, first response byte.
    NewConnection,
    /// redis-benchmark GET over this many connections, to a redis-server.
    Redis(usize),
}

impl Measure {
    fn title(&self) -> String {
        match self {
            Measure::Throughput(1) => "Single-stream throughput (1 connection)".to_owned(),
            Measure::Throughput(n) => format!("Aggregate throughput ({n} connections)"),
            Measure::RequestResponse => "1 KiB request/response, one warm connection".to_owned(),
            Measure::NewConnection => {
                "New connection: connect → 1 KiB request → first response byte".to_owned()
            }
            Measure::Redis(1) => "redis-benchmark GET, 1 connection".to_owned(),
            Measure::Redis(n) => format!("redis-benchmark GET, {n} connections"),
        }
    }
}

/// One contender's figures in one phase of one round.
#[derive(Debug, Clone, Copy)]
pub enum Figure {
    Throughput {
        gbps: f64,
        bytes: u64,
        /// Tunnel CPU seconds over the phase (None for direct).
        cpu_s: Option<f64>,
    },
    Latency {
        p50_us: f64,
        p99_us: f64,
        /// Operations (requests or connections) done in the phase, warm-up included, which
        /// is what the CPU was spent on.
        ops: u64,
        cpu_s: Option<f64>,
    },
    /// Requests per second from a real client, with its own percentiles.
    Rate {
        rps: f64,
        p50_us: f64,
        p99_us: f64,
        /// Requests done in the phase.
        ops: u64,
        cpu_s: Option<f64>,
    },
}

/// Median of each figure over the rounds.
#[derive(Debug, Clone, Copy)]
struct Summary {
    /// Gb/s, p50 µs, or requests/s.
    main: f64,
    /// p50 µs for rate measures.
    p50: f64,
    /// p99 µs for latency and rate measures.
    p99: f64,
    /// CPU seconds per GB or per 1000 operations.
    cpu_per_unit: Option<f64>,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    kind: Kind,
    /// `Err(reason)` when the contender could not run this measure.
    figures: Result<Vec<Figure>, String>,
}

/// All results of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// Per measure, the contenders in their set-up order.
    entries: BTreeMap<Measure, Vec<Entry>>,
    /// Contenders that were not available at all, with the reason.
    unavailable: Vec<(String, String)>,
}

impl Report {
    pub fn record(&mut self, measure: Measure, name: &str, kind: Kind, figure: Figure) {
        let entry = self.entry(measure, name, kind);
        if let Ok(figures) = &mut entry.figures {
            figures.push(figure);
        }
    }

    /// Marks a contender as failed for a measure (it keeps running the others).
    pub fn record_failure(&mut self, measure: Measure, name: &str, kind: Kind, reason: String) {
        self.entry(measure, name, kind).figures = Err(reason);
    }

    pub fn record_unavailable(&mut self, name: &str, reason: String) {
        self.unavailable.push((name.to_owned(), reason));
    }

    /// Whether `name` could not be set up at all.
    pub fn is_unavailable(&self, name: &str) -> bool {
        self.unavailable.iter().any(|(n, _)| n == name)
    }

    /// How many (measure, contender) pairs failed.
    pub fn failed_phases(&self) -> usize {
        self.entries
            .values()
            .flatten()
            .filter(|e| e.figures.is_err())
            .count()
    }

    fn entry(&mut self, measure: Measure, name: &str, kind: Kind) -> &mut Entry {
        let entries = self.entries.entry(measure).or_default();
        if let Some(i) = entries.iter().position(|e| e.name == name) {
            &mut entries[i]
        } else {
            entries.push(Entry {
                name: name.to_owned(),
                kind,
                figures: Ok(Vec::new()),
            });
            let last = entries.len() - 1;
            &mut entries[last]
        }
    }

    /// Renders every table and the target check.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut targets = Vec::new();
        for (measure, entries) in &self.entries {
            let _ = writeln!(out, "\n== {} ==", measure.title());
            let summaries: Vec<(&Entry, Result<Summary, String>)> =
                entries.iter().map(|e| (e, summarize(e))).collect();
            match measure {
                Measure::Throughput(_) => {
                    render_throughput(&mut out, &summaries, *measure, &mut targets)
                }
                Measure::RequestResponse => render_rr(&mut out, &summaries, &mut targets),
                Measure::NewConnection => render_new_connection(&mut out, &summaries, &mut targets),
                Measure::Redis(n) => render_redis(&mut out, &summaries, *n, &mut targets),
            }
        }
        for (name, reason) in &self.unavailable {
            let _ = writeln!(out, "\n{name}: not available ({reason})");
        }
        if !targets.is_empty() {
            let _ = writeln!(out, "\n== meshup targets (docs/benchmarks.md) ==");
            for line in targets {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

fn summarize(entry: &Entry) -> Result<Summary, String> {
    let figures = entry.figures.as_ref().map_err(Clone::clone)?;
    if figures.is_empty() {
        return Err("no figures".to_owned());
    }
    let mut main = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut cpu = Vec::new();
    for figure in figures {
        match *figure {
            Figure::Throughput { gbps, bytes, cpu_s } => {
                main.push(gbps);
                if let Some(c) = cpu_s {
                    cpu.push(c / (bytes as f64 / 1e9));
                }
            }
            Figure::Latency {
                p50_us,
                p99_us,
                ops,
                cpu_s,
            } => {
                main.push(p50_us);
                p99.push(p99_us);
                if let Some(c) = cpu_s {
                    cpu.push(c / ops as f64 * 1000.0);
                }
            }
            Figure::Rate {
                rps,
                p50_us,
                p99_us,
                ops,
                cpu_s,
            } => {
                main.push(rps);
                p50.push(p50_us);
                p99.push(p99_us);
                if let Some(c) = cpu_s {
                    cpu.push(c / ops as f64 * 1000.0);
                }
            }
        }
    }
    let median_or_nan = |v: &mut Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
    Ok(Summary {
        main: median(&mut main),
        p50: median_or_nan(&mut p50),
        p99: median_or_nan(&mut p99),
        cpu_per_unit: (!cpu.is_empty()).then(|| median(&mut cpu)),
    })
}

type Rows<'a> = [(&'a Entry, Result<Summary, String>)];

fn find<'a>(rows: &'a Rows<'a>, kind: Kind) -> Vec<(&'a str, Summary)> {
    rows.iter()
        .filter(|(e, _)| e.kind == kind)
        .filter_map(|(e, s)| s.as_ref().ok().map(|s| (e.name.as_str(), *s)))
        .collect()
}

fn cpu_cell(cpu: Option<f64>) -> String {
    cpu.map_or_else(|| "—".to_owned(), |c| format!("{c:.3}"))
}

fn ratio_cell(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}×", value / b),
        _ => "—".to_owned(),
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "MET" } else { "MISSED" }
}

/// meshup's targets, as docs/benchmarks.md states them ("meshup's targets").
mod target {
    /// Throughput, 1, 16 and 64 connections: over the better tunnel pair.
    pub const THROUGHPUT_OVER_BEST_PEER: f64 = 1.5;
    /// Throughput, one stream: over the relay floor.
    pub const ONE_STREAM_OVER_FLOOR: f64 = 1.0;
    /// CPU-seconds per GB: over the relay floor's.
    pub const CPU_PER_GB_OVER_FLOOR: f64 = 1.0;
    /// 1 KiB request/response p50: µs added over the relay floor's p50.
    pub const RR_P50_OVER_FLOOR_US: f64 = 20.0;
    /// New connection, time to first response p50: over the stunnel pair's.
    pub const NEW_CONNECTION_OVER_STUNNEL: f64 = 0.15;
    /// New connection p50: over the relay floor's.
    pub const NEW_CONNECTION_OVER_FLOOR: f64 = 1.2;
}

/// The stunnel pair's summary, when it ran.
fn stunnel_of(rows: &Rows<'_>) -> Option<Summary> {
    find(rows, Kind::Peer)
        .into_iter()
        .find(|(name, _)| *name == "stunnel")
        .map(|(_, s)| s)
}

/// The relay floor's summary, when it ran.
fn floor_of(rows: &Rows<'_>) -> Option<Summary> {
    find(rows, Kind::Floor).first().map(|(_, s)| *s)
}

/// "a / b ≤ or ≥ limit", as a target line's clause.
fn ratio_clause(what: &str, value: f64, base: f64, at_least: bool, limit: f64) -> String {
    let r = value / base;
    let (sign, met) = if at_least {
        ("≥", r >= limit)
    } else {
        ("≤", r <= limit)
    };
    format!(
        "{r:.2}× {what} (target {sign} {limit:.2}×) {}",
        verdict(met)
    )
}

fn render_throughput(
    out: &mut String,
    rows: &Rows<'_>,
    measure: Measure,
    targets: &mut Vec<String>,
) {
    let direct = find(rows, Kind::Direct).first().map(|(_, s)| s.main);
    // The better tunnel pair is the faster one.
    let best = find(rows, Kind::Peer)
        .into_iter()
        .max_by(|a, b| a.1.main.total_cmp(&b.1.main));
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>10} {:>14} {:>16}",
        "contender", "Gb/s", "× direct", "× best peer", "tunnel CPU-s/GB"
    );
    for (entry, summary) in rows {
        match summary {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "{:<10} {:>9.2} {:>10} {:>14} {:>16}",
                    entry.name,
                    s.main,
                    ratio_cell(s.main, direct),
                    ratio_cell(s.main, best.map(|b| b.1.main)),
                    cpu_cell(s.cpu_per_unit)
                );
                if entry.kind == Kind::Meshup {
                    let mut clauses = Vec::new();
                    if let Some((best_name, b)) = best {
                        clauses.push(ratio_clause(
                            best_name,
                            s.main,
                            b.main,
                            true,
                            target::THROUGHPUT_OVER_BEST_PEER,
                        ));
                    }
                    if let Some(f) = floor_of(rows) {
                        if measure == Measure::Throughput(1) {
                            clauses.push(ratio_clause(
                                "the relay floor",
                                s.main,
                                f.main,
                                true,
                                target::ONE_STREAM_OVER_FLOOR,
                            ));
                        }
                        if let (Some(m), Some(fc)) = (s.cpu_per_unit, f.cpu_per_unit) {
                            clauses.push(format!(
                                "CPU per GB {}",
                                ratio_clause(
                                    "the relay floor's",
                                    m,
                                    fc,
                                    false,
                                    target::CPU_PER_GB_OVER_FLOOR
                                )
                            ));
                        }
                    }
                    if !clauses.is_empty() {
                        targets.push(format!(
                            "{}: {}",
                            measure_short(measure),
                            clauses.join("; ")
                        ));
                    }
                }
            }
            Err(reason) => {
                let _ = writeln!(out, "{:<10} failed: {reason}", entry.name);
            }
        }
    }
    if let Some((name, _)) = best {
        let _ = writeln!(out, "(best peer: {name})");
    }
}

fn measure_short(measure: Measure) -> String {
    match measure {
        Measure::Throughput(1) => "throughput, 1 stream".to_owned(),
        Measure::Throughput(n) => format!("throughput, {n} connections"),
        Measure::RequestResponse => "1 KiB RR".to_owned(),
        Measure::NewConnection => "new connection".to_owned(),
        Measure::Redis(n) => format!("redis-benchmark GET, {n} connection(s)"),
    }
}

/// meshup's redis-benchmark target over the stunnel pair's requests/s (docs/benchmarks.md).
fn redis_target(connections: usize) -> f64 {
    match connections {
        1 => 1.2,
        n if n <= 16 => 1.5,
        _ => 2.5,
    }
}

fn render_redis(out: &mut String, rows: &Rows<'_>, connections: usize, targets: &mut Vec<String>) {
    let direct = find(rows, Kind::Direct).first().map(|(_, s)| s.main);
    let stunnel = stunnel_of(rows);
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>8} {:>8} {:>10} {:>11} {:>17}",
        "contender", "req/s", "p50 µs", "p99 µs", "× direct", "× stunnel", "CPU-s/1000 req"
    );
    for (entry, summary) in rows {
        match summary {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "{:<10} {:>10.0} {:>8.0} {:>8.0} {:>10} {:>11} {:>17}",
                    entry.name,
                    s.main,
                    s.p50,
                    s.p99,
                    ratio_cell(s.main, direct),
                    ratio_cell(s.main, stunnel.map(|b| b.main)),
                    cpu_cell(s.cpu_per_unit)
                );
                if entry.kind == Kind::Meshup
                    && let Some(st) = stunnel
                {
                    let r = s.main / st.main;
                    let target = redis_target(connections);
                    let cpu = match (s.cpu_per_unit, st.cpu_per_unit) {
                        (Some(m), Some(p)) if p > 0.0 => format!("; CPU per request {:.2}×", m / p),
                        _ => String::new(),
                    };
                    targets.push(format!(
                        "{}: {r:.2}× the stunnel pair's requests/s (target ≥ {target:.1}×) {}{cpu}",
                        measure_short(Measure::Redis(connections)),
                        verdict(r >= target)
                    ));
                }
            }
            Err(reason) => {
                let _ = writeln!(out, "{:<10} failed: {reason}", entry.name);
            }
        }
    }
}

fn render_rr(out: &mut String, rows: &Rows<'_>, targets: &mut Vec<String>) {
    let direct = find(rows, Kind::Direct).first().map(|(_, s)| *s);
    // The better tunnel pair is the one with the lower median.
    let best = find(rows, Kind::Peer)
        .into_iter()
        .min_by(|a, b| a.1.main.total_cmp(&b.1.main));
    let _ = writeln!(
        out,
        "{:<10} {:>8} {:>8} {:>11} {:>11} {:>13} {:>17}",
        "contender", "p50 µs", "p99 µs", "+p50 µs", "+p99 µs", "p50 × best", "CPU-s/1000 req"
    );
    for (entry, summary) in rows {
        match summary {
            Ok(s) => {
                let added = |v: f64, d: Option<f64>| {
                    d.map_or_else(|| "—".to_owned(), |d| format!("{:+.1}", v - d))
                };
                let _ = writeln!(
                    out,
                    "{:<10} {:>8.1} {:>8.1} {:>11} {:>11} {:>13} {:>17}",
                    entry.name,
                    s.main,
                    s.p99,
                    added(s.main, direct.map(|d| d.main)),
                    added(s.p99, direct.map(|d| d.p99)),
                    ratio_cell(s.main, best.map(|b| b.1.main)),
                    cpu_cell(s.cpu_per_unit)
                );
                if entry.kind == Kind::Meshup {
                    if let Some(st) = stunnel_of(rows) {
                        let cpu = match (s.cpu_per_unit, st.cpu_per_unit) {
                            (Some(m), Some(p)) if p > 0.0 => format!(
                                "; CPU per 1000 requests {}",
                                ratio_clause("the stunnel pair's", m, p, false, 1.0)
                            ),
                            _ => String::new(),
                        };
                        targets.push(format!(
                            "1 KiB RR: p50 {:.1} µs against the stunnel pair's {:.1} (target ≤) {}; p99 {:.1} µs against {:.1} (target ≤) {}{cpu}",
                            s.main,
                            st.main,
                            verdict(s.main <= st.main),
                            s.p99,
                            st.p99,
                            verdict(s.p99 <= st.p99)
                        ));
                    }
                    if let Some(f) = floor_of(rows) {
                        let added = s.main - f.main;
                        targets.push(format!(
                            "1 KiB RR: p50 {added:+.1} µs over the relay floor's {:.1} (target ≤ +{:.0}) {}",
                            f.main,
                            target::RR_P50_OVER_FLOOR_US,
                            verdict(added <= target::RR_P50_OVER_FLOOR_US)
                        ));
                    }
                }
            }
            Err(reason) => {
                let _ = writeln!(out, "{:<10} failed: {reason}", entry.name);
            }
        }
    }
    if let Some((name, _)) = best {
        let _ = writeln!(out, "(best peer: {name}; +p50/+p99 are added over direct)");
    }
}

fn render_new_connection(out: &mut String, rows: &Rows<'_>, targets: &mut Vec<String>) {
    let direct = find(rows, Kind::Direct).first().map(|(_, s)| s.main);
    let stunnel = stunnel_of(rows);
    let best = find(rows, Kind::Peer)
        .into_iter()
        .min_by(|a, b| a.1.main.total_cmp(&b.1.main));
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>9} {:>10} {:>13} {:>12} {:>18}",
        "contender",
        "p50 µs",
        "p99 µs",
        "× direct",
        "p50 × stunnel",
        "p50 × best",
        "CPU-s/1000 conn"
    );
    for (entry, summary) in rows {
        match summary {
            Ok(s) => {
                let _ = writeln!(
                    out,
                    "{:<10} {:>9.1} {:>9.1} {:>10} {:>13} {:>12} {:>18}",
                    entry.name,
                    s.main,
                    s.p99,
                    ratio_cell(s.main, direct),
                    ratio_cell(s.main, stunnel.map(|b| b.main)),
                    ratio_cell(s.main, best.map(|b| b.1.main)),
                    cpu_cell(s.cpu_per_unit)
                );
                if entry.kind == Kind::Meshup {
                    let mut clauses = Vec::new();
                    if let Some(st) = stunnel {
                        clauses.push(ratio_clause(
                            "the stunnel pair",
                            s.main,
                            st.main,
                            false,
                            target::NEW_CONNECTION_OVER_STUNNEL,
                        ));
                    }
                    if let Some(f) = floor_of(rows) {
                        clauses.push(ratio_clause(
                            "the relay floor",
                            s.main,
                            f.main,
                            false,
                            target::NEW_CONNECTION_OVER_FLOOR,
                        ));
                    }
                    if !clauses.is_empty() {
                        targets.push(format!("new connection p50: {}", clauses.join("; ")));
                    }
                }
            }
            Err(reason) => {
                let _ = writeln!(out, "{:<10} failed: {reason}", entry.name);
            }
        }
    }
    if let Some((name, _)) = best {
        let _ = writeln!(out, "(best peer: {name})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throughput(gbps: f64) -> Figure {
        Figure::Throughput {
            gbps,
            bytes: 1_000_000_000,
            cpu_s: Some(0.5),
        }
    }

    #[test]
    fn throughput_table_compares_meshup_with_the_faster_peer() {
        let mut report = Report::default();
        let m = Measure::Throughput(1);
        report.record(
            m,
            "direct",
            Kind::Direct,
            Figure::Throughput {
                gbps: 20.0,
                bytes: 1,
                cpu_s: None,
            },
        );
        report.record(m, "stunnel", Kind::Peer, throughput(4.0));
        report.record(m, "nginx", Kind::Peer, throughput(5.0));
        report.record(m, "meshup", Kind::Meshup, throughput(6.0));
        let text = report.render();
        assert!(text.contains("(best peer: nginx)"), "{text}");
        assert!(
            text.contains("throughput, 1 stream: 1.20× nginx (target ≥ 1.50×) MISSED"),
            "{text}"
        );
        assert!(text.contains("0.500"), "CPU-s/GB: {text}");
    }

    #[test]
    fn every_documented_target_is_checked_against_its_own_peer() {
        let mut report = Report::default();
        let gbps = |gbps: f64, cpu_s: f64| Figure::Throughput {
            gbps,
            bytes: 1_000_000_000,
            cpu_s: Some(cpu_s),
        };
        let m = Measure::Throughput(1);
        report.record(m, "relay", Kind::Floor, gbps(5.0, 1.0));
        report.record(m, "stunnel", Kind::Peer, gbps(4.0, 2.0));
        report.record(m, "meshup", Kind::Meshup, gbps(6.4, 0.9));
        let m = Measure::Throughput(16);
        report.record(m, "relay", Kind::Floor, gbps(5.0, 1.0));
        report.record(m, "stunnel", Kind::Peer, gbps(4.0, 2.0));
        report.record(m, "meshup", Kind::Meshup, gbps(5.6, 1.2));
        let latency = |p50_us: f64, p99_us: f64, cpu_s: f64| Figure::Latency {
            p50_us,
            p99_us,
            ops: 1000,
            cpu_s: Some(cpu_s),
        };
        let m = Measure::RequestResponse;
        report.record(m, "relay", Kind::Floor, latency(100.0, 200.0, 0.06));
        report.record(m, "stunnel", Kind::Peer, latency(130.0, 250.0, 0.10));
        report.record(m, "meshup", Kind::Meshup, latency(125.0, 260.0, 0.11));
        let m = Measure::NewConnection;
        report.record(m, "relay", Kind::Floor, latency(300.0, 500.0, 0.0));
        report.record(m, "stunnel", Kind::Peer, latency(2000.0, 2500.0, 0.0));
        report.record(m, "meshup", Kind::Meshup, latency(340.0, 700.0, 0.0));
        let text = report.render();
        for want in [
            "throughput, 1 stream: 1.60× stunnel (target ≥ 1.50×) MET; 1.28× the relay floor (target ≥ 1.00×) MET; CPU per GB 0.90× the relay floor's (target ≤ 1.00×) MET",
            "throughput, 16 connections: 1.40× stunnel (target ≥ 1.50×) MISSED; CPU per GB 1.20× the relay floor's (target ≤ 1.00×) MISSED",
            "1 KiB RR: p50 125.0 µs against the stunnel pair's 130.0 (target ≤) MET; p99 260.0 µs against 250.0 (target ≤) MISSED; CPU per 1000 requests 1.10× the stunnel pair's (target ≤ 1.00×) MISSED",
            "1 KiB RR: p50 +25.0 µs over the relay floor's 100.0 (target ≤ +20) MISSED",
            "new connection p50: 0.17× the stunnel pair (target ≤ 0.15×) MISSED; 1.13× the relay floor (target ≤ 1.20×) MET",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // The floor is a reference, never the best peer.
        assert!(!text.contains("× relay (target"), "{text}");
    }

    #[test]
    fn redis_table_compares_meshup_with_the_stunnel_pair() {
        let mut report = Report::default();
        let rate = |rps: f64, cpu_s: Option<f64>| Figure::Rate {
            rps,
            p50_us: 300.0,
            p99_us: 900.0,
            ops: 10_000,
            cpu_s,
        };
        for connections in [1, 64] {
            let m = Measure::Redis(connections);
            report.record(m, "direct", Kind::Direct, rate(20_000.0, None));
            report.record(m, "stunnel", Kind::Peer, rate(5_000.0, Some(1.0)));
            report.record(m, "meshup", Kind::Meshup, rate(6_500.0, Some(1.5)));
        }
        let text = report.render();
        assert!(
            text.contains("== redis-benchmark GET, 64 connections =="),
            "{text}"
        );
        assert!(
            text.contains("1 connection(s): 1.30× the stunnel pair's requests/s (target ≥ 1.2×) MET; CPU per request 1.50×"),
            "{text}"
        );
        assert!(
            text.contains(
                "64 connection(s): 1.30× the stunnel pair's requests/s (target ≥ 2.5×) MISSED"
            ),
            "{text}"
        );
        assert!(
            text.contains("0.150"),
            "meshup's CPU-s per 1000 requests: {text}"
        );
    }

    #[test]
    fn failed_and_unavailable_contenders_are_reported() {
        let mut report = Report::default();
        let m = Measure::RequestResponse;
        report.record(
            m,
            "direct",
            Kind::Direct,
            Figure::Latency {
                p50_us: 20.0,
                p99_us: 30.0,
                ops: 1000,
                cpu_s: None,
            },
        );
        report.record_failure(m, "nginx", Kind::Peer, "boom".to_owned());
        report.record_unavailable("meshup", "binary missing".to_owned());
        let text = report.render();
        assert_eq!(report.failed_phases(), 1);
        assert!(report.is_unavailable("meshup"));
        assert!(text.contains("nginx      failed: boom"), "{text}");
        assert!(
            text.contains("meshup: not available (binary missing)"),
            "{text}"
        );
    }
}

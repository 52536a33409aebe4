//! The tables: one per fault, one column per contender, side by side.

use std::fmt::Write as _;
use std::time::Duration;

use meshup_tests::workload::{FaultRun, Phase, last_slower_than, ms};

use crate::contenders::Fault;

/// The failover target (docs/benchmarks.md): every new connection served elsewhere within
/// 1 s of the fault, ≤ 1 % of that second's new connections failing, none after (a drill:
/// none failing at all, which the same figures show).
pub const TARGET_WINDOW: Duration = Duration::from_secs(1);
pub const TARGET_FAILED_PERCENT: f64 = 1.0;
/// A new connection slower than this after the fault waited on the faulted end (on loopback,
/// connect → response takes about a millisecond).
pub const SLOW: Duration = Duration::from_millis(100);

/// What one contender did under one fault.
#[derive(Debug)]
pub struct Row {
    /// The end that served before the fault (the one faulted).
    pub primary: &'static str,
    /// The end the configuration names first.
    pub configured_primary: &'static str,
    pub run: FaultRun,
    /// Connections each end served (configured order) before / in the window / after.
    pub served: [[usize; 2]; 3],
    pub ends: [&'static str; 2],
}

impl Row {
    /// Whether the run met the failover target.
    pub fn met(&self) -> bool {
        let f = &self.run.figures;
        f.first.failed_percent() <= TARGET_FAILED_PERCENT
            && f.after.failures() == 0
            && f.recovered.is_some_and(|r| r <= TARGET_WINDOW)
            && self.primary == self.configured_primary
            && self.served_after_by_primary() == 0
    }

    /// Connections the faulted end still served after the window.
    pub fn served_after_by_primary(&self) -> usize {
        let i = usize::from(self.ends[1] == self.primary);
        self.served[2][i]
    }
}

/// All outcomes of a run: per fault, per contender, a row or why there is none.
#[derive(Debug, Default)]
pub struct Report {
    pub entries: Vec<(Fault, &'static str, Result<Row, String>)>,
}

impl Report {
    pub fn failed(&self) -> usize {
        self.entries.iter().filter(|e| e.2.is_err()).count()
    }

    /// One markdown table per fault.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut faults: Vec<Fault> = self.entries.iter().map(|e| e.0).collect();
        faults.dedup();
        for fault in faults {
            let cols: Vec<(&str, &Result<Row, String>)> = self
                .entries
                .iter()
                .filter(|e| e.0 == fault)
                .map(|e| (e.1, &e.2))
                .collect();
            let _ = writeln!(out, "\n### {}\n", fault.title());
            let header: Vec<&str> = cols.iter().map(|c| c.0).collect();
            let _ = writeln!(out, "| measure | {} |", header.join(" | "));
            let _ = writeln!(out, "| --- |{}", " --- |".repeat(cols.len()));
            let line = |out: &mut String, name: &str, cell: &dyn Fn(&Row) -> String| {
                let cells: Vec<String> = cols
                    .iter()
                    .map(|(_, r)| match r {
                        Ok(row) => cell(row),
                        Err(_) => "—".to_owned(),
                    })
                    .collect();
                let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
            };
            line(&mut out, "served before the fault by (faulted)", &|r| {
                if r.primary == r.configured_primary {
                    r.primary.to_owned()
                } else {
                    format!(
                        "{} (configured first: {}, not honoured)",
                        r.primary, r.configured_primary
                    )
                }
            });
            line(&mut out, "time to full recovery", &|r| {
                r.run
                    .figures
                    .recovered
                    .map_or_else(|| "not recovered".to_owned(), |d| ms(Some(d)))
                    + if r.run.settled {
                        ""
                    } else {
                        " (run hit its limit)"
                    }
            });
            line(&mut out, "fault → last failure", &|r| {
                r.run
                    .figures
                    .last_failure
                    .map_or_else(|| "none failed".to_owned(), |d| ms(Some(d)))
            });
            line(
                &mut out,
                &format!(
                    "fault → last connection slower than {} ms",
                    SLOW.as_millis()
                ),
                &|r| {
                    let fault = r.run.figures.fault;
                    last_slower_than(&r.run.outcomes, fault, SLOW)
                        .map_or_else(|| "none".to_owned(), |d| ms(Some(d)))
                },
            );
            line(&mut out, "failed, first second", &|r| {
                failed(&r.run.figures.first)
            });
            line(&mut out, "failed, after", &|r| failed(&r.run.figures.after));
            line(&mut out, "failed, in flight at the fault", &|r| {
                r.run.figures.before_in_flight_failed.to_string()
            });
            line(&mut out, "p50 / p99 before", &|r| {
                latency(&r.run.figures.before)
            });
            line(&mut out, "p50 / p99 first second", &|r| {
                latency(&r.run.figures.first)
            });
            line(&mut out, "p50 / p99 after", &|r| {
                latency(&r.run.figures.after)
            });
            line(&mut out, "accepted by (before / first s / after)", &|r| {
                let [a, b] = r.ends;
                r.served
                    .iter()
                    .map(|[x, y]| format!("{a} {x}, {b} {y}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            });
            line(
                &mut out,
                "target (≤ 1 s, ≤ 1 % in the first second, 0 after)",
                &|r| if r.met() { "met" } else { "missed" }.to_owned(),
            );
            for (name, r) in &cols {
                if let Err(e) = r {
                    let _ = writeln!(out, "\n{name}: FAILED: {e}");
                }
            }
        }
        out
    }
}

fn failed(p: &Phase) -> String {
    format!(
        "{} of {} ({:.2} %)",
        p.failures_text(),
        p.attempts,
        p.failed_percent()
    )
}

fn latency(p: &Phase) -> String {
    format!("{} / {}", ms(p.p50), ms(p.p99))
}

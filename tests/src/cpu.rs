//! CPU time of the processes a benchmark measures (tunnels, proxies, gateways), from
//! `/proc/<pid>/stat` (utime + stime, which for a process cover all its threads).
//!
//! A benchmark's contender names its root processes; their direct children are included too, which is
//! how nginx's worker (forked by the master) is counted with the master.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Linux reports utime/stime in USER_HZ ticks; it is 100 on every Linux ABI we run on, but
/// ask `getconf` in case.
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// Sums CPU seconds of a set of processes.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    roots: Vec<u32>,
    ticks_per_second: f64,
}

impl CpuMeter {
    pub fn new(roots: Vec<u32>) -> Self {
        Self {
            roots,
            ticks_per_second: clock_ticks_per_second(),
        }
    }

    /// The measured processes (their direct children count too).
    pub fn roots(&self) -> &[u32] {
        &self.roots
    }

    /// Whether there is anything to measure (the direct contender has no tunnel process).
    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Current CPU seconds (user + system) of the roots and their direct children.
    pub fn seconds(&self) -> Result<f64> {
        let mut pids: BTreeSet<u32> = self.roots.iter().copied().collect();
        pids.extend(children_of(&self.roots)?);
        let mut ticks = 0u64;
        for pid in pids {
            ticks += process_ticks(pid)?;
        }
        Ok(ticks as f64 / self.ticks_per_second)
    }
}

/// Fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may
/// itself contain spaces and parentheses, so it is skipped up to the last `)`.
fn stat_fields(pid: u32) -> Result<Vec<String>> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_stat_after_comm(&text).with_context(|| format!("parse {path}"))
}

fn parse_stat_after_comm(text: &str) -> Result<Vec<String>> {
    let Some(close) = text.rfind(')') else {
        bail!("no ')' after the command name");
    };
    Ok(text[close + 1..]
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// utime + stime in ticks. After the command name: field 0 is state, 1 ppid, 11 utime,
/// 12 stime (fields 14 and 15 in proc(5)'s 1-based numbering).
fn process_ticks(pid: u32) -> Result<u64> {
    let fields = stat_fields(pid)?;
    let get = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("/proc/{pid}/stat has too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("/proc/{pid}/stat field {i} is not a number"))
    };
    Ok(get(11)? + get(12)?)
}

/// Direct children of any of `parents`, by scanning /proc (a process may have exited between
/// listing and reading; it is skipped).
fn children_of(parents: &[u32]) -> Result<Vec<u32>> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").context("list /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fields) = stat_fields(pid) else {
            continue;
        };
        if let Some(ppid) = fields.get(1).and_then(|p| p.parse::<u32>().ok())
            && parents.contains(&ppid)
        {
            children.push(pid);
        }
    }
    Ok(children)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_name_with_spaces_and_parens_is_skipped() {
        let line =
            "1234 (nginx: (worker) x) S 1200 1234 1234 0 -1 4194560 100 0 0 0 37 12 0 0 20 0 1";
        let fields = parse_stat_after_comm(line).expect("parse");
        assert_eq!(fields[0], "S");
        assert_eq!(fields[1], "1200");
        assert_eq!(fields[11], "37");
        assert_eq!(fields[12], "12");
    }

    #[test]
    fn own_process_has_readable_ticks() {
        process_ticks(std::process::id()).expect("own /proc stat");
    }
}

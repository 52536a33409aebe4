//! Child processes of the benchmarks (tunnel peers, etcd, gateways) and the guard that ends
//! them.
//!
//! Every child is started in its own process group, so that ending the group also ends the
//! processes it forked itself (nginx's worker). The guard ends the group on drop: first a
//! SIGTERM so that nginx and etcd shut down their own children, then a SIGKILL after a short
//! grace period. Drop runs on normal return, on `?` errors and on panics, and `main` turns
//! Ctrl-C into an error so that it runs then too.

use std::fs::File;
use std::future::Future;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a child gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(2);

/// A running child process that is ended (with its whole process group) on drop.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Child,
    log: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` in a new process group, stdout and stderr going to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("create log {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("clone log handle {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("start {name} ({program})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    /// The child's process id (the leader of its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, with the end of the child's log, if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); end of its log {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            ),
            Err(e) => Err(e).with_context(|| format!("poll {}", self.name)),
        }
    }

    /// Waits until `addr` accepts TCP connections, failing early if the child exits.
    pub fn wait_for_port(&mut self, addr: SocketAddr, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.ensure_running()?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not listen on {addr} within {limit:?}; end of its log {}:\n{}",
                    self.name,
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, …) to the child's whole process group (so a
    /// master and the workers it forked alike); returns the instant just before it was sent.
    pub fn signal_group(&self, signal: &str) -> Result<Instant> {
        let at = Instant::now();
        if !signal_group(signal, &format!("-{}", self.child.id())) {
            bail!(
                "kill -{signal} of {}'s process group failed",
                self.describe()
            );
        }
        Ok(at)
    }

    /// Waits until the child exits by itself; fails if it does not within `limit` or exits
    /// with a failure status.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("poll {}", self.name))?
            {
                if status.success() {
                    return Ok(());
                }
                bail!(
                    "{} exited with {status}:\n{}",
                    self.describe(),
                    self.log_tail()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {limit:?}:\n{}",
                    self.describe(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What this child is, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} (pid {}, log {})",
            self.name,
            self.child.id(),
            self.log.display()
        )
    }

    /// The last lines of the child's log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let group = format!("-{}", self.child.id());
        signal_group("TERM", &group);
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // The leader is gone; make sure nothing it forked lingers.
                signal_group("KILL", &group);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        signal_group("KILL", &group);
        // The leader may not be in its group any more if it changed it; kill it directly too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal to a process group through kill(1) (the crate forbids `unsafe`); whether
/// it was delivered.
fn signal_group(signal: &str, group: &str) -> bool {
    Command::new("kill")
        .args([format!("-{signal}").as_str(), "--", group])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The last 30 lines of a log file (or why it could not be read).
pub fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Finds `names` on PATH (first match wins), or fails naming the Debian package to install.
pub fn find_program(names: &[&str], package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    // /usr/sbin is not on every user's PATH, and nginx lives there.
    for name in names {
        let candidate = Path::new("/usr/sbin").join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "none of {names:?} found on PATH: install the Debian package `{package}` (apt-get install {package})"
    )
}

/// Runs `work` on a new multi-thread runtime until it ends, or until the process gets SIGINT
/// (Ctrl-C), SIGTERM (e.g. from `timeout`) or SIGHUP: those become an error, so that every
/// child guard's Drop runs on the way out; otherwise the peers would outlive the benchmark.
pub fn run_until_signalled<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?
        .block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
            let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
            tokio::select! {
                result = work => result,
                _ = tokio::signal::ctrl_c() => bail!("interrupted (SIGINT); peers stopped"),
                _ = term.recv() => bail!("terminated (SIGTERM); peers stopped"),
                _ = hup.recv() => bail!("hung up (SIGHUP); peers stopped"),
            }
        })
}

/// What a process holds now: resident memory and open file descriptors, from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub rss_kib: u64,
    pub fds: usize,
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// Reads [`Usage`] of `pid` from `/proc/<pid>/status` (VmRSS) and `/proc/<pid>/fd`.
pub fn usage(pid: u32) -> Result<Usage> {
    let rss_kib = rss_kib(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("/proc/{pid}/fd"))?
        .count();
    Ok(Usage { rss_kib, fds })
}

/// CPU time (user + system) spent so far by the threads of `pid` whose name starts with
/// `prefix` (`/proc/<pid>/task/*/stat`; all threads for `""`). Threads that ended are not
/// counted, so sample threads that live through the measurement.
pub fn threads_cpu(pid: u32, prefix: &str) -> Result<Duration> {
    let tasks = format!("/proc/{pid}/task");
    let mut ticks = 0u64;
    for task in std::fs::read_dir(&tasks).with_context(|| format!("read {tasks}"))? {
        let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
            // The thread ended between the listing and the read.
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // After the ")" of comm: state is field 3 of the whole line, utime 14, stime 15.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        ticks += field(14).unwrap_or(0) + field(15).unwrap_or(0);
    }
    Ok(Duration::from_millis(ticks * 1000 / USER_HZ))
}

/// Clock ticks per second of `/proc` CPU times (USER_HZ: 100 on every Linux architecture
/// this runs on).
const USER_HZ: u64 = 100;

/// Datagrams the kernel dropped at the UDP socket bound to `addr` because its receive
/// buffer was full (the `drops` column of `/proc/net/udp` or `/proc/net/udp6`), summed
/// over every socket on that address.
pub fn udp_drops(addr: SocketAddr) -> Result<u64> {
    let (table, local) = match addr {
        SocketAddr::V4(v4) => (
            "/proc/net/udp",
            format!(
                "{:08X}:{:04X}",
                u32::from_le_bytes(v4.ip().octets()),
                v4.port()
            ),
        ),
        SocketAddr::V6(v6) => {
            let words: String = v6
                .ip()
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_le_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", v6.port()))
        }
    };
    let text = std::fs::read_to_string(table).with_context(|| format!("read {table}"))?;
    let mut found = false;
    let mut drops = 0;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&local.as_str()) {
            found = true;
            drops += fields
                .last()
                .and_then(|d| d.parse::<u64>().ok())
                .with_context(|| format!("no drops column in {table}: {line}"))?;
        }
    }
    anyhow::ensure!(found, "no UDP socket on {addr} in {table}");
    Ok(drops)
}

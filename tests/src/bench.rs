//! What the side-by-side benchmarks with a meshup gateway pair share (bench/tunnel,
//! bench/http): their gateway-pair options, a work directory that is kept when it is
//! worth reading, and the in-process backend's accept loop.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Command-line options for the gateway pair and the work directory
/// (`#[command(flatten)]` into a benchmark's own arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct PairArgs {
    /// The `meshup` binary for the gateway pair. Default: target/release/meshup.
    #[arg(long)]
    pub meshup: Option<PathBuf>,
    /// Leave out the meshup pair (e.g. while the daemon does not build).
    #[arg(long)]
    pub no_meshup: bool,
    /// Fail (exit non-zero) if the meshup pair cannot be set up, instead of measuring the
    /// others and reporting it as not available. For CI smoke runs.
    #[arg(long)]
    pub require_meshup: bool,
    /// `worker_threads` of each meshup gateway. Default: the gateway's own (one per core).
    #[arg(long)]
    pub gateway_threads: Option<usize>,
    /// Keep the temporary directory (configs, certificates, logs) for inspection.
    #[arg(long)]
    pub keep_temp: bool,
}

impl PairArgs {
    /// The `meshup` binary to run: `--meshup`, or the workspace's release build.
    pub fn binary(&self) -> PathBuf {
        self.meshup
            .clone()
            .unwrap_or_else(crate::gateway_pair::default_binary)
    }

    /// The end of a run, after the tables are printed: the figures are never a gate, but a
    /// failed phase means a contender broke or lost data, which a smoke run must notice
    /// (the scratch dir is kept for its logs); with `--require-meshup`, so does a gateway
    /// pair that did not run.
    pub fn finish(&self, scratch: &mut ScratchDir, failed: usize, meshup_ran: bool) -> Result<()> {
        if failed > 0 {
            // The peers' and gateways' logs are the first thing to read after a failure.
            scratch.keep("a phase failed: its configs and logs");
        }
        anyhow::ensure!(
            failed == 0,
            "{failed} phase(s) failed; see the tables above"
        );
        anyhow::ensure!(
            meshup_ran || !self.require_meshup,
            "--require-meshup: the meshup pair did not run"
        );
        Ok(())
    }
}

/// The first line of a benchmark's output: what the figures were measured on (cores, and
/// the load average, since the machines are shared).
pub fn machine_line(benchmark: &str) -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "meshup {benchmark} benchmark: {cores} cores, load average {}",
        load.trim()
    )
}

/// The median of `values` (sorted in place; the mean of the middle two for an even count).
/// Benchmarks report medians over rounds, since the machines are shared and noisy.
///
/// # Panics
///
/// If `values` is empty.
pub fn median(values: &mut [f64]) -> f64 {
    assert!(!values.is_empty(), "the median of no values");
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// A benchmark's temporary directory: removed at the end, unless kept on request or after a
/// failure (its configs and logs are then the first thing to read).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    /// `None` once kept.
    temp: Option<tempfile::TempDir>,
}

impl ScratchDir {
    /// Creates `<prefix>XXXX` in the temp directory, kept from the start when `keep` is set.
    pub fn new(prefix: &str, keep: bool) -> Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("create temp dir")?;
        let mut dir = Self {
            path: temp.path().to_owned(),
            temp: Some(temp),
        };
        if keep {
            dir.keep("asked for with --keep-temp");
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after the run and says where it is, and why.
    pub fn keep(&mut self, why: &str) {
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
            eprintln!("keeping {} ({why})", self.path.display());
        }
    }
}

/// An in-process server on 127.0.0.1 (a benchmark's backend): every accepted connection is
/// handed to `serve` on a task of its own; the accept loop ends when this is dropped.
#[derive(Debug)]
pub struct LoopbackServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LoopbackServer {
    /// Binds 127.0.0.1 on a free port and serves until dropped. A connection that fails
    /// mid-way is the client's to report, not the server's.
    pub async fn start<F, Fut>(serve: F) -> Result<Self>
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind backend on 127.0.0.1")?;
        let addr = listener.local_addr().context("backend local address")?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        tokio::spawn(serve(stream));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off a little instead of spinning.
                        eprintln!("backend: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
            }
        });
        Ok(Self { addr, task })
    }

    /// The address the contenders forward to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
    }
}

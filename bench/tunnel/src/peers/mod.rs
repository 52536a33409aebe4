//! The contenders: direct TCP and the tunnel pairs a user would pick instead of meshup.
//! Each is set up by the benchmark itself on 127.0.0.1 and torn down when dropped.

pub mod nginx;
pub mod relay;
pub mod stunnel;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::{MESSAGE_SIZE, MODE_ECHO};
use meshup_tests::cpu::CpuMeter;
use meshup_tests::procs::ChildGuard;

/// What a contender is, which decides the ratios it is compared by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Plain loopback TCP straight to the backend: the physical limit.
    Direct,
    /// An mTLS tunnel pair a user would pick instead (stunnel, nginx).
    Peer,
    /// The meshup gateway pair under test.
    Meshup,
    /// Two plain TCP relay processes: what any two-process tunnel pays for its hops on
    /// this machine. A reference line, not a peer.
    Floor,
}

/// What a contender forwards to, which decides how [`Contender::probe`] checks the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The benchmark's own backend (`crate::backend`): an echo request.
    Echo,
    /// A redis-server: `PING`, answered `+PONG`.
    Redis,
}

/// One way from the load generator to the backend.
#[derive(Debug)]
pub struct Contender {
    pub name: String,
    pub kind: Kind,
    /// Where the load generator connects.
    pub addr: SocketAddr,
    /// CPU of the tunnel processes only (empty for direct).
    pub cpu: CpuMeter,
    /// Processes to check between phases and to end on drop.
    children: Vec<ChildGuard>,
    /// What is behind the contender (the benchmark's backend unless said otherwise).
    backend: Backend,
}

impl Contender {
    pub fn direct(backend: SocketAddr) -> Self {
        Self {
            name: "direct".to_owned(),
            kind: Kind::Direct,
            addr: backend,
            cpu: CpuMeter::new(Vec::new()),
            children: Vec::new(),
            backend: Backend::Echo,
        }
    }

    /// The same contender, forwarding to `backend`.
    pub fn serving(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// A contender whose tunnel processes are `tunnel` (CPU is counted for these and their
    /// children) and which also owns `helpers` (e.g. etcd), not counted.
    pub fn with_processes(
        name: &str,
        kind: Kind,
        addr: SocketAddr,
        tunnel: Vec<ChildGuard>,
        helpers: Vec<ChildGuard>,
    ) -> Self {
        let cpu = CpuMeter::new(tunnel.iter().map(ChildGuard::pid).collect());
        let mut children = tunnel;
        children.extend(helpers);
        Self {
            name: name.to_owned(),
            kind,
            addr,
            cpu,
            children,
            backend: Backend::Echo,
        }
    }

    /// Fails if any of the contender's processes has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        for child in &mut self.children {
            child.ensure_running()?;
        }
        Ok(())
    }

    /// Sends one echo request through the contender, retrying until `limit`: proves the whole
    /// path (including both TLS handshakes and certificate checks) works before measuring.
    pub async fn probe(&mut self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.ensure_running()?;
            let once = async {
                match self.backend {
                    Backend::Echo => echo_once(self.addr).await,
                    Backend::Redis => ping_once(self.addr).await,
                }
            };
            let attempt = tokio::time::timeout(Duration::from_secs(3), once).await;
            let error = match attempt {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => e,
                Err(_) => anyhow::anyhow!("no response within 3 s"),
            };
            if Instant::now() >= deadline {
                let logs: Vec<String> = self
                    .children
                    .iter()
                    .map(|c| format!("--- {}:\n{}", c.describe(), c.log_tail()))
                    .collect();
                bail!(
                    "{}: a request through {} failed for {limit:?}: {error:#}\n{}",
                    self.name,
                    self.addr,
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn ping_once(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.write_all(b"PING\r\n").await.context("write PING")?;
    let mut answer = [0u8; 7];
    stream
        .read_exact(&mut answer)
        .await
        .context("read PING's answer")?;
    anyhow::ensure!(
        &answer == b"+PONG\r\n",
        "PING answered {:?}",
        String::from_utf8_lossy(&answer)
    );
    Ok(())
}

async fn echo_once(addr: SocketAddr) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let mut buf = vec![0x42u8; MESSAGE_SIZE];
    buf[0] = MODE_ECHO;
    stream
        .write_all(&buf)
        .await
        .context("write probe request")?;
    stream
        .read_exact(&mut buf)
        .await
        .context("read probe response")?;
    Ok(())
}

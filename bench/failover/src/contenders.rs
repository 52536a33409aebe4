//! The two contenders, each with a primary and a secondary server end, both echo backends
//! known, so the serving side of every connection is known:
//!
//! - meshup: three clusters on one etcd (`meshup_tests::failover`): the client connects to
//!   east's VIP for `echo.prod`; west and north export it; the policy says `[[west],
//!   [north]]`.
//! - nginx: a client-side nginx (plain in, `proxy_ssl` out with a client certificate) whose
//!   upstream is the primary server end and a `backup` one, `proxy_next_upstream on`,
//!   `proxy_connect_timeout` as a user sets it; each server end is its own nginx (TLS 1.3,
//!   `ssl_verify_client on`) in front of its own echo backend, so one can be killed or stopped
//!   alone.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use meshup_tests::failover::{Federation, LEVELS, Options};
use meshup_tests::free_port;
use meshup_tests::nginx::{self, mtls_client_directives, mtls_server_directives};
use meshup_tests::procs::ChildGuard;
use meshup_tests::tls::Pki;
use meshup_tests::workload::EchoServer;

/// The faults, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9 of the serving end (nginx: master and worker).
    Kill9,
    /// SIGSTOP of the serving end: alive, holding its sockets, answering nothing.
    Stop,
    /// A `fail` drill on the serving cluster (meshup only: nginx has no such thing).
    Drill,
}

impl Fault {
    pub fn title(self) -> &'static str {
        match self {
            Fault::Kill9 => "kill -9 of the primary's server end",
            Fault::Stop => "SIGSTOP of the primary's server end",
            Fault::Drill => "`fail` drill on the primary (meshup only)",
        }
    }
}

/// Gateway log filter: warnings only; nothing per connection.
const GATEWAY_LOG: &str = "warn";

/// One contender, set up and ready for a workload.
#[derive(Debug)]
pub enum Contender {
    Meshup(Box<Federation>),
    Nginx(Box<NginxPair>),
}

impl Contender {
    pub async fn meshup(binary: &Path, threads: Option<usize>) -> Result<Self> {
        if !binary.is_file() {
            bail!(
                "no meshup binary at {} (cargo build --release -p meshup-gateway)",
                binary.display()
            );
        }
        let fed = Federation::start(Options {
            prefix: "/bench-failover",
            vip_octet: 87,
            binary: Some(binary),
            log_filter: Some(GATEWAY_LOG),
            worker_threads: threads,
            ..Options::default()
        })
        .await?;
        Ok(Self::Meshup(Box::new(fed)))
    }

    pub async fn nginx(dir: &Path, pki: &Pki, connect_timeout: Duration) -> Result<Self> {
        let pair = NginxPair::start(dir, pki, connect_timeout).await?;
        Ok(Self::Nginx(Box::new(pair)))
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Contender::Meshup(fed) => fed.vip,
            Contender::Nginx(pair) => pair.front_addr,
        }
    }

    /// The configured primary and secondary server ends.
    pub fn ends(&self) -> [&'static str; 2] {
        match self {
            Contender::Meshup(_) => LEVELS,
            Contender::Nginx(_) => ["primary", "backup"],
        }
    }

    /// Connections each end's backend accepted in `[from, to)`, in [`Self::ends`] order.
    pub fn served_between(&self, from: Instant, to: Option<Instant>) -> [usize; 2] {
        match self {
            Contender::Meshup(fed) => fed.served_between(from, to).map(|(_, n)| n),
            Contender::Nginx(pair) => {
                [&pair.primary_echo, &pair.backup_echo].map(|e| e.accepted_between(from, to))
            }
        }
    }

    /// The end that served the most connections since `from`.
    pub fn serving_since(&self, from: Instant) -> &'static str {
        let [a, b] = self.served_between(from, None);
        let [first, second] = self.ends();
        if b > a { second } else { first }
    }

    /// Injects `fault` on `end`; the instant just before.
    pub fn inject(&mut self, fault: Fault, end: &str) -> Result<Instant> {
        match (self, fault) {
            (Contender::Meshup(fed), Fault::Kill9) => Ok(fed.gateway(end).kill9()),
            (Contender::Meshup(fed), Fault::Stop) => Ok(fed.gateway(end).signal("-STOP")),
            (Contender::Meshup(fed), Fault::Drill) => {
                fed.write_drill(&format!("fail-{end}"), "fail", end)
            }
            (Contender::Nginx(pair), Fault::Kill9) => pair.end(end).signal_group("KILL"),
            (Contender::Nginx(pair), Fault::Stop) => pair.end(end).signal_group("STOP"),
            (Contender::Nginx(_), Fault::Drill) => bail!("nginx has no drills"),
        }
    }

    /// Undoes a SIGSTOP, so teardown does not wait on a stopped process.
    pub fn resume(&mut self, end: &str) -> Result<()> {
        match self {
            Contender::Meshup(fed) => {
                fed.gateway(end).signal("-CONT");
            }
            Contender::Nginx(pair) => {
                pair.end(end).signal_group("CONT")?;
            }
        }
        Ok(())
    }

    /// The end of the logs worth reading after a failed run.
    pub fn log_tails(&self) -> String {
        match self {
            Contender::Meshup(fed) => {
                let log = fed.east.log_text();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- east's gateway:\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                )
            }
            Contender::Nginx(pair) => [&pair.front, &pair.primary, &pair.backup]
                .iter()
                .map(|c| format!("--- {}:\n{}", c.describe(), c.log_tail()))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// The nginx pair with a backup server end.
#[derive(Debug)]
pub struct NginxPair {
    front_addr: SocketAddr,
    front: ChildGuard,
    primary: ChildGuard,
    backup: ChildGuard,
    primary_echo: EchoServer,
    backup_echo: EchoServer,
}

impl NginxPair {
    async fn start(dir: &Path, pki: &Pki, connect_timeout: Duration) -> Result<Self> {
        let primary_echo = EchoServer::start().await.context("primary's echo")?;
        let backup_echo = EchoServer::start().await.context("backup's echo")?;
        let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let (front_addr, primary_addr, backup_addr) = (
            loopback(free_port()?),
            loopback(free_port()?),
            loopback(free_port()?),
        );
        let server_end = |name: &str, listen: SocketAddr, echo: &EchoServer| {
            let stream = format!(
                "server {{\n\
                   listen {listen} ssl;\n\
                   {server}\
                   proxy_pass {backend};\n\
                 }}\n",
                server = mtls_server_directives(pki),
                backend = echo.addr(),
            );
            nginx::start(dir, name, &stream, &[listen])
        };
        let primary = server_end("nginx-primary", primary_addr, &primary_echo)?;
        let backup = server_end("nginx-backup", backup_addr, &backup_echo)?;
        // What a user sets for failover: the backup takes over when the primary refuses or
        // does not finish the TCP + TLS handshake within `proxy_connect_timeout`; after one
        // failure (`max_fails=1`) the primary is skipped for `fail_timeout`.
        let stream = format!(
            "upstream ends {{\n\
               server {primary_addr} max_fails=1 fail_timeout=10s;\n\
               server {backup_addr} backup;\n\
             }}\n\
             server {{\n\
               listen {front_addr};\n\
               proxy_pass ends;\n\
               proxy_connect_timeout {timeout}ms;\n\
               proxy_next_upstream on;\n\
               {client}\
             }}\n",
            timeout = connect_timeout.as_millis(),
            client = mtls_client_directives(pki),
        );
        let front = nginx::start(dir, "nginx-front", &stream, &[front_addr])?;
        Ok(Self {
            front_addr,
            front,
            primary,
            backup,
            primary_echo,
            backup_echo,
        })
    }

    fn end(&self, name: &str) -> &ChildGuard {
        if name == "backup" {
            &self.backup
        } else {
            &self.primary
        }
    }
}

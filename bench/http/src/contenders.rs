//! The four ways from the load generator to the backend, each set up by the benchmark on
//! 127.0.0.1 and ended when dropped:
//!
//! - (a) `direct`: the backend itself;
//! - (b) `nginx`: a source nginx (plain HTTP/1.1 on one port, h2c with prior knowledge on
//!   another) proxying over TLS 1.3 with a client certificate and upstream keep-alive to a
//!   destination nginx (`ssl_verify_client on`), which proxies to the backend with
//!   keep-alive: two processes, one worker each;
//! - (c) `meshup-tcp`: the gateway pair with the backend exported on a plain `tcp` port
//!   (each client connection spliced over one QUIC stream);
//! - (d) `meshup-http`: the same pair, the backend exported on an `app_protocol: http` port
//!   (requests on kept QUIC streams, pooled backend connections); each request reaches the
//!   backend as its client spoke it;
//! - (e) `meshup-http1`: the same again on a port with `endpoint_protocol: http1`: every
//!   request reaches the backend as HTTP/1.1, as the nginx pair's do.
//!
//! (c), (d) and (e) are three exports of one gateway pair, so all run the same two processes.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshup_tests::cpu::CpuMeter;
use meshup_tests::free_port;
use meshup_tests::gateway_pair::{self, Export, FIRST_REQUEST_LIMIT};
use meshup_tests::nginx::{self, mtls_http_client_directives, mtls_server_directives};
use meshup_tests::procs::ChildGuard;
use meshup_tests::tls::Pki;
use tokio::net::TcpStream;

use crate::backend::BODY;
use crate::load::Protocol;

/// Connections each nginx keeps open to its upstream: more than the most clients, so no
/// request waits for or opens a connection once warm.
const NGINX_UPSTREAM_KEEPALIVE: usize = 128;
/// Service ports of the two meshup exports.
const MESHUP_TCP_PORT: u16 = 8080;
const MESHUP_HTTP_PORT: u16 = 8081;
const MESHUP_HTTP1_PORT: u16 = 8082;

/// Processes shared by contenders (the gateway pair serves both meshup contenders).
type Processes = Arc<Mutex<Vec<ChildGuard>>>;

/// One way from the load generator to the backend.
#[derive(Debug)]
pub struct Contender {
    /// `(a) direct` and so on, as printed.
    pub name: &'static str,
    /// Where HTTP/1.1 clients connect.
    pub http1: SocketAddr,
    /// Where h2c (prior knowledge) clients connect.
    pub h2: SocketAddr,
    /// CPU of the proxy processes (empty for direct).
    pub cpu: CpuMeter,
    processes: Processes,
}

pub const DIRECT: &str = "(a) direct";
pub const NGINX: &str = "(b) nginx pair";
pub const MESHUP_TCP: &str = "(c) meshup tcp";
pub const MESHUP_HTTP: &str = "(d) meshup http";
pub const MESHUP_HTTP1: &str = "(e) meshup http, endpoint http1";

impl Contender {
    pub fn direct(backend: SocketAddr) -> Self {
        Self {
            name: DIRECT,
            http1: backend,
            h2: backend,
            cpu: CpuMeter::new(Vec::new()),
            processes: Processes::default(),
        }
    }

    /// The address for `protocol`.
    pub fn addr(&self, protocol: Protocol) -> SocketAddr {
        match protocol {
            Protocol::Http1 => self.http1,
            Protocol::H2 => self.h2,
        }
    }

    /// CPU seconds of the proxy processes so far (`None` for direct).
    pub fn cpu_seconds(&self) -> Result<Option<f64>> {
        if self.cpu.is_empty() {
            return Ok(None);
        }
        self.cpu.seconds().map(Some)
    }

    /// Fails, with the end of its log, if any of the contender's processes has exited.
    pub fn ensure_running(&self) -> Result<()> {
        let mut processes = self
            .processes
            .lock()
            .map_err(|_| anyhow::anyhow!("process list poisoned by an earlier panic"))?;
        for process in processes.iter_mut() {
            process.ensure_running()?;
        }
        Ok(())
    }

    /// One GET per protocol through the contender, retried until `limit`: proves the whole
    /// path (both TLS handshakes, certificates, the catalog) answers `200` with the
    /// backend's body before anything is measured.
    pub async fn probe(&self, limit: Duration) -> Result<()> {
        for protocol in [Protocol::Http1, Protocol::H2] {
            let addr = self.addr(protocol);
            let deadline = Instant::now() + limit;
            loop {
                self.ensure_running()?;
                let attempt =
                    tokio::time::timeout(Duration::from_secs(3), get_once(protocol, addr)).await;
                let error = match attempt {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => e,
                    Err(_) => anyhow::anyhow!("no response within 3 s"),
                };
                if Instant::now() >= deadline {
                    let logs = self
                        .processes
                        .lock()
                        .map(|p| {
                            p.iter()
                                .map(|c| format!("--- {}:\n{}", c.describe(), c.log_tail()))
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default();
                    bail!(
                        "{}: {} GET through {addr} failed for {limit:?}: {error:#}\n{logs}",
                        self.name,
                        protocol.label()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// One GET of `/` over a new connection, checking status and body.
async fn get_once(protocol: Protocol, addr: SocketAddr) -> Result<()> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    let io = TokioIo::new(tcp);
    let mut request = http::Request::get(format!("http://{addr}/"));
    if protocol == Protocol::Http1 {
        // h2 carries the authority in the URI (`:authority`); a Host header there as well
        // is a request nginx rejects.
        request = request.header(http::header::HOST, addr.to_string());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .context("build probe request")?;
    let response = match protocol {
        Protocol::Http1 => {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .context("HTTP/1.1 handshake")?;
            tokio::spawn(conn);
            sender.send_request(request).await.context("HTTP/1.1 GET")?
        }
        Protocol::H2 => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .context("h2c handshake")?;
            tokio::spawn(conn);
            sender.send_request(request).await.context("h2c GET")?
        }
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("read probe body")?
        .to_bytes();
    if status != http::StatusCode::OK || body.as_ref() != BODY.as_slice() {
        bail!(
            "answer {status} with {} bytes of body, not 200 with the backend's {} bytes",
            body.len(),
            BODY.len()
        );
    }
    Ok(())
}

/// Starts the destination nginx (TLS, client certificate required → backend) and the
/// source nginx (plain HTTP/1.1 and h2c in → TLS with a client certificate out).
pub fn nginx_pair(dir: &Path, pki: &Pki, backend: SocketAddr) -> Result<Contender> {
    let dest = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let http1 = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let h2 = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    // Both ends keep their client connections for the whole run (the default of 1000
    // requests per connection would make the load generators reconnect all the time).
    let keep = "keepalive_requests 100000000;\nkeepalive_timeout 300s;\n";
    let upstream_keep = format!(
        "keepalive {NGINX_UPSTREAM_KEEPALIVE};\nkeepalive_requests 100000000;\nkeepalive_timeout 300s;\n"
    );
    let to_upstream = "proxy_http_version 1.1;\nproxy_set_header Connection \"\";\n";
    let destination = format!(
        "upstream backend {{\n\
           server {backend};\n\
           {upstream_keep}\
         }}\n\
         server {{\n\
           listen {dest} ssl;\n\
           {server_tls}\
           {keep}\
           location / {{\n\
             proxy_pass http://backend;\n\
             {to_upstream}\
           }}\n\
         }}\n",
        server_tls = mtls_server_directives(pki),
    );
    // nginx 1.22 (Debian 12) has no `http2 on;` (1.25.1+): `http2` is a `listen` parameter,
    // and on a listener without `ssl` it serves h2c with prior knowledge only, so HTTP/1.1
    // and h2c get a port each.
    let source = format!(
        "upstream destination {{\n\
           server {dest};\n\
           {upstream_keep}\
         }}\n\
         server {{\n\
           listen {http1};\n\
           listen {h2} http2;\n\
           {keep}\
           location / {{\n\
             proxy_pass https://destination;\n\
             {to_upstream}\
             {client_tls}\
           }}\n\
         }}\n",
        client_tls = mtls_http_client_directives(pki),
    );
    let destination = nginx::start_http(dir, "nginx-destination", &destination, &[dest])?;
    let source = nginx::start_http(dir, "nginx-source", &source, &[http1, h2])?;
    let processes = vec![source, destination];
    Ok(Contender {
        name: NGINX,
        http1,
        h2,
        cpu: CpuMeter::new(processes.iter().map(ChildGuard::pid).collect()),
        processes: Arc::new(Mutex::new(processes)),
    })
}

/// Starts the gateway pair with the backend exported three times, on a `tcp` port, an
/// `http` port and an `http` port whose endpoints get HTTP/1.1, and returns the three
/// contenders that share it.
pub async fn meshup_pair(
    dir: &Path,
    binary: &Path,
    backend: SocketAddr,
    threads: Option<usize>,
) -> Result<[Contender; 3]> {
    let exports = [
        Export {
            name: "web-tcp",
            port: MESHUP_TCP_PORT,
            app_protocol: None,
            endpoint_protocol: None,
        },
        Export {
            name: "web-http",
            port: MESHUP_HTTP_PORT,
            app_protocol: Some("http"),
            endpoint_protocol: None,
        },
        Export {
            name: "web-http1",
            port: MESHUP_HTTP1_PORT,
            app_protocol: Some("http"),
            endpoint_protocol: Some("http1"),
        },
    ];
    let pair = gateway_pair::start(dir, binary, backend, threads, &exports).await?;
    let cpu = CpuMeter::new(pair.gateways.iter().map(ChildGuard::pid).collect());
    let mut processes = pair.gateways;
    // etcd is checked for being alive, not counted for CPU.
    processes.push(pair.etcd);
    let processes = Arc::new(Mutex::new(processes));
    let contender = |name, addr| Contender {
        name,
        http1: addr,
        h2: addr,
        cpu: cpu.clone(),
        processes: processes.clone(),
    };
    let all = [
        contender(MESHUP_TCP, pair.addrs[0]),
        contender(MESHUP_HTTP, pair.addrs[1]),
        contender(MESHUP_HTTP1, pair.addrs[2]),
    ];
    for c in &all {
        c.probe(FIRST_REQUEST_LIMIT).await?;
    }
    Ok(all)
}

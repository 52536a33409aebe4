//! The backend behind every contender: hyper 1.x serving HTTP/1.1 (keep-alive) and h2c with
//! prior knowledge on one loopback port (`hyper_util`'s auto builder tells them apart by
//! the connection preface), answering every request `200` with the same small body.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// The response body: small, so the figures measure the proxies' per-request work.
pub const BODY: &[u8; 64] = b"meshup-bench-http backend: 64 bytes of body, the same each time\n";

/// A running backend; the accept loop ends when this is dropped.
#[derive(Debug)]
pub struct Backend {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Backend {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind backend on 127.0.0.1")?;
        let addr = listener.local_addr().context("backend local address")?;
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(async move {
                            // A connection a client or proxy drops mid-way is theirs to report.
                            let _ = auto::Builder::new(TokioExecutor::new())
                                .serve_connection(TokioIo::new(stream), service_fn(answer))
                                .await;
                        });
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

    /// The address every contender forwards to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

//! The backend behind every contender: hyper 1.x serving HTTP/1.1 (keep-alive) and h2c with
//! prior knowledge on one loopback port (`hyper_util`'s auto builder tells them apart by
//! the connection preface), answering every request `200` with the same small body.

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use meshup_tests::bench::LoopbackServer;
use std::convert::Infallible;

/// The response body: small, so the figures measure the proxies' per-request work.
pub const BODY: &[u8; 64] = b"meshup-bench-http backend: 64 bytes of body, the same each time\n";

/// Starts the backend on 127.0.0.1 (a free port); it serves until dropped.
pub async fn start() -> Result<LoopbackServer> {
    LoopbackServer::start(|stream| async move {
        let _ = stream.set_nodelay(true);
        // A connection a client or proxy drops mid-way is theirs to report.
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service_fn(answer))
            .await;
    })
    .await
}

async fn answer(_request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    Ok(response)
}

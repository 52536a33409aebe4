//! Backends and clients of the HTTP routing tests (tests/tests/http_routing.rs).
//!
//! [`WebBackend`] serves HTTP/1.1 and h2c (prior knowledge) on a loopback port and names its
//! cluster in every answer, so a test knows which cluster served each request:
//! - any path: `200`, body
//!   `cluster=<name> method=<m> path=<p> tag=<x-route-tag> version=<v> trace=<traceparent>
//!   authority=<:authority, or Host> scheme=<:scheme, or -> fields=<header fields>
//!   internal=<names of meshup-* headers that reached it, comma-separated, or ->
//!   body=<the request body's length>:<its FNV-1a hash, hex>` (`body=-` when the request
//!   declares no `content-length`: such a body is not read before the answer);
//! - `/slow`: the same after 2 s;
//! - an `Upgrade: websocket` request: `101`, then every byte echoed on the connection;
//! - [`WebBackend::fail_with`] makes every request (or only those of one method) answer a
//!   status instead.
//!
//! It counts the requests it answered, by method, and the connections it accepted. [`GrpcBackend`] is a tonic gRPC server with
//! the standard health service, reporting one service named after its cluster as serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct State {
    /// Requests answered, by method.
    answered: BTreeMap<String, u64>,
    /// (method or `None` for every method, status) to answer instead.
    fail: Option<(Option<String>, u16)>,
    /// Connections accepted.
    connections: u64,
    /// Close the connection of the next request instead of answering it.
    hang_up: bool,
}

/// An HTTP backend naming its cluster; serves until dropped.
#[derive(Debug)]
pub struct WebBackend {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// The accept loop (taken by [`WebBackend::crash`]).
    task: Mutex<Option<JoinHandle<()>>>,
    /// Its connections' tasks, so [`WebBackend::stop`] ends them too.
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl WebBackend {
    pub async fn start(cluster: &str) -> std::io::Result<Self> {
        Self::start_with(cluster, false).await
    }

    /// A backend that speaks only HTTP/1.1: the h2 preface is not HTTP/1.1, so an h2
    /// connection fails.
    pub async fn start_http1_only(cluster: &str) -> std::io::Result<Self> {
        Self::start_with(cluster, true).await
    }

    async fn start_with(cluster: &str, http1_only: bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let cluster: Arc<str> = cluster.into();
        let st = state.clone();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tasks = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                st.lock().expect("backend state").connections += 1;
                let (st, cluster) = (st.clone(), cluster.clone());
                let conn = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (st, cluster) = (st.clone(), cluster.clone());
                        async move {
                            if std::mem::take(&mut st.lock().expect("backend state").hang_up) {
                                // A service error closes the connection without an answer.
                                return Err(std::io::Error::other("hung up on purpose"));
                            }
                            Ok(answer(&st, &cluster, req).await)
                        }
                    });
                    let mut builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    if http1_only {
                        builder = builder.http1_only();
                    }
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                        .await;
                });
                tasks.lock().expect("backend tasks").push(conn);
            }
        });
        Ok(Self {
            addr,
            state,
            task: Mutex::new(Some(task)),
            conns,
        })
    }

    /// Stops as a crashed backend does: its port refuses connections and every open one
    /// is closed.
    pub fn stop(&self) {
        if let Some(task) = self.task.lock().expect("backend task").as_ref() {
            task.abort();
        }
        for conn in self.conns.lock().expect("backend tasks").iter() {
            conn.abort();
        }
    }

    /// Stops as [`stop`](Self::stop) does and returns once it has: the port refuses
    /// connections and every connection is closed (an aborted task lets go of its socket
    /// only when the runtime drops it, which a loaded machine may not do at once).
    pub async fn crash(&self) {
        let task = self.task.lock().expect("backend task").take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
        // The accept loop is gone: no connection task comes after these.
        let conns = std::mem::take(&mut *self.conns.lock().expect("backend tasks"));
        for conn in &conns {
            conn.abort();
        }
        for conn in conns {
            let _ = conn.await;
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests answered so far with `method` (`None`: every method).
    pub fn answered(&self, method: Option<&str>) -> u64 {
        let st = self.state.lock().expect("backend state");
        match method {
            Some(m) => st.answered.get(m).copied().unwrap_or(0),
            None => st.answered.values().sum(),
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.lock().expect("backend state").connections
    }

    /// Reads the next request and closes its connection without answering, as a backend
    /// closing a keep-alive connection at the moment it is reused (or going away) does.
    pub fn hang_up_on_next_request(&self) {
        self.state.lock().expect("backend state").hang_up = true;
    }

    /// From now on, answer `status` to every request (`method` `None`) or to that method's;
    /// `None` status: answer normally again.
    pub fn fail_with(&self, method: Option<&str>, status: Option<u16>) {
        self.state.lock().expect("backend state").fail =
            status.map(|s| (method.map(str::to_owned), s));
    }
}

impl Drop for WebBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn answer(
    st: &Mutex<State>,
    cluster: &str,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().as_str().to_owned();
    let fail = {
        let mut st = st.lock().expect("backend state");
        *st.answered.entry(method.clone()).or_default() += 1;
        st.fail
            .clone()
            .filter(|(m, _)| m.as_deref().is_none_or(|m| m == method))
            .map(|(_, s)| s)
    };
    let upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v == "websocket");
    // Only a body of a declared length is read before the answer: the hostile tests' bodies
    // never end, and their requests are answered at once.
    let body = if !upgrade && req.headers().contains_key("content-length") {
        use http_body_util::BodyExt;
        let bytes = req
            .body_mut()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        body_digest(&bytes)
    } else {
        "-".to_owned()
    };
    let text = format!(
        "cluster={cluster} method={method} path={} tag={} version={:?} trace={} authority={} scheme={} fields={} internal={} cookie={} body={}\n",
        req.uri().path(),
        req.headers()
            .get("x-route-tag")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        req.version(),
        req.headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        req.uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers().get("host").and_then(|v| v.to_str().ok()))
            .unwrap_or("-"),
        req.uri().scheme_str().unwrap_or("-"),
        req.headers().len(),
        internal_headers(req.headers()),
        cookie_fields(req.headers()),
        body,
    );
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    resp.headers_mut()
        .insert("x-served-by", cluster.parse().expect("header value"));
    if let Some(status) = fail {
        *resp.status_mut() = StatusCode::from_u16(status).expect("status");
        return resp;
    }
    if upgrade {
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut io = TokioIo::new(up);
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = io.read(&mut buf).await {
                if io.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        resp.headers_mut()
            .insert("upgrade", "websocket".parse().expect("value"));
        resp.headers_mut()
            .insert("connection", "upgrade".parse().expect("value"));
        return resp;
    }
    if req.uri().path() == "/upload" {
        // Reads the whole body first, and names its length.
        let n = match http_body_util::BodyExt::collect(req.into_body()).await {
            Ok(b) => b.to_bytes().len().to_string(),
            Err(e) => format!("error: {e}"),
        };
        *resp.body_mut() = Full::new(Bytes::from(format!("cluster={cluster} uploaded={n}\n")));
        return resp;
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    resp
}

/// A gRPC server with the standard health service (`grpc.health.v1.Health`): the service
/// named `cluster` is SERVING, every other name is unknown (NOT_FOUND, in trailers).
#[derive(Debug)]
pub struct GrpcBackend {
    addr: SocketAddr,
    reporter: tonic_health::server::HealthReporter,
    task: JoinHandle<()>,
}

impl GrpcBackend {
    pub async fn start(cluster: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(cluster, tonic_health::ServingStatus::Serving)
            .await;
        let incoming = tokio_stream_incoming(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        Ok(Self {
            addr,
            reporter,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the status of the service named `name`.
    pub async fn set(&self, name: &str, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter.set_service_status(name, status).await;
    }
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The accepted connections of `listener` as the stream tonic serves.
fn tokio_stream_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| s);
        Some((r, l))
    })
}

/// The names of the gateways' own headers (`meshup-*`) among `headers`, comma-separated,
/// or `-`: none should ever reach a backend.
/// The request's `cookie` fields, `|` between fields (`-`: none), so one field of two
/// cookies (`a=1; b=2`) reads apart from two fields (`a=1|b=2`).
fn cookie_fields(headers: &http::HeaderMap) -> String {
    let fields: Vec<&str> = headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if fields.is_empty() {
        "-".to_owned()
    } else {
        fields.join("|")
    }
}

fn internal_headers(headers: &http::HeaderMap) -> String {
    let names: Vec<&str> = headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.starts_with("meshup-"))
        .collect();
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(",")
    }
}

/// How [`WebBackend`] names a request body in its answer: `<length>:<FNV-1a hash, hex>`.
pub fn body_digest(body: &[u8]) -> String {
    let hash = body.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    format!("{}:{hash:08x}", body.len())
}

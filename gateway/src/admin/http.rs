//! The admin HTTP server: `/live`, `/ready`, `/metrics`, `/status` (JSON) and `/` (the status
//! page).
//!
//! It binds to loopback by default (the config refuses a non-loopback address unless the
//! operator opts in), runs until shutdown and never blocks the data path: every handler reads
//! shared snapshots or atomics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::page;
use super::view::{StatusSource, StatusView};
use crate::handover::{self, Kind, Sockets};
use crate::readiness::Readiness;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin HTTP address {addr}: {source} (is another gateway running?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Arc<Registry>,
    status: Arc<dyn StatusSource>,
}

/// A bound admin server, not yet serving.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
}

impl AdminServer {
    /// Binds the admin address, or takes the listener a predecessor handed over; a port
    /// conflict fails start-up here.
    pub async fn bind(addr: SocketAddr, inherited: &Sockets) -> Result<Self, AdminError> {
        let listener = handover::tcp_listener(inherited, Kind::AdminHttp, addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The listening socket, to offer a successor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener always has a local address")
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(
        self,
        readiness: Readiness,
        registry: Arc<Registry>,
        status: Arc<dyn StatusSource>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let state = AdminState {
            readiness,
            registry,
            status,
        };
        let app = Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/status", get(status_json))
            .route("/", get(status_page))
            .with_state(state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}

async fn ready(State(state): State<AdminState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn status_json(State(state): State<AdminState>) -> Response {
    (
        // The page polls this: a cached answer would freeze the picture.
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json::<StatusView>(state.status.status()),
    )
        .into_response()
}

/// The page is static: everything it shows comes from `/status`, drawn with DOM text nodes,
/// so no name from the catalog is ever parsed as HTML. The policy header lets the browser
/// enforce what the page promises: no fetch but `/status` on this server, nothing loaded
/// from anywhere else.
async fn status_page() -> Response {
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(page::CONTENT_SECURITY_POLICY),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        Html(page::HTML),
    )
        .into_response()
}

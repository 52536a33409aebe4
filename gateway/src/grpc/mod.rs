//! The gRPC admin API (`proto/meshup/admin/v1/admin.proto`) on `admin.grpc`: the
//! `meshup.admin.v1.AdminService` ([`service`]; the route rules methods in [`routes`], the
//! compare-and-set writes that policies and route rules share in [`cas`]), the standard
//! `grpc.health.v1.Health` (SERVING once the gateway is ready, NOT_SERVING while it starts or
//! drains) and server reflection v1 and v1alpha (older clients know only the latter), so
//! `grpcurl` works unchanged.
//!
//! Two listeners serve the same API. `admin.grpc` is plaintext and loopback only (the config
//! refuses any other address): its callers are users of this host, recorded by the name they
//! give. `admin.grpc_remote` is mutual TLS only, for operators with a certificate from
//! `meshup certs issue --operator NAME` ([`remote`]): their certificate names them in every
//! write, and `admin.operators`, when set, lists the operators allowed in. Every write logs an
//! audit event ([`caller::audit`]).
//!
//! Limits are explicit: message size both ways, concurrent requests and HTTP/2 streams per
//! connection, a deadline for every unary call, and a bounded number of event watchers.

pub mod caller;
pub mod cas;
pub mod events;
pub mod remote;
pub mod routes;
pub mod service;

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

use meshup_admin_api::MAX_MESSAGE_BYTES;
use meshup_admin_api::pb::admin_service_server::AdminServiceServer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic_health::ServingStatus;

use crate::handover::{self, Kind, Sockets};
use crate::identity::Identity;
use caller::Caller;

pub use service::{AdminApi, Context};

/// Requests one connection may have in progress at once; more wait.
pub const CONCURRENCY_PER_CONNECTION: usize = 32;
/// HTTP/2 streams one connection may open at once (watch streams included).
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// Longest a unary call may take (a client's shorter `grpc-timeout` wins). Streams are not
/// cut by it: a watch runs until the client leaves.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Event watchers at once, over all connections; more are RESOURCE_EXHAUSTED.
pub const MAX_WATCHERS: usize = 64;
/// HTTP/2 keep-alive: a silent peer is dropped after the interval plus the timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the gRPC admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot bind the admin gRPC address {addr}: {source} (is another gateway running?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot set up TLS for the remote admin API: {0}")]
    Tls(#[from] rustls::Error),
}

/// A bound gRPC admin server, not yet serving.
#[derive(Debug)]
pub struct GrpcServer {
    listener: TcpListener,
    /// The remote listener's mTLS set-up; `None` on the loopback listener.
    remote: Option<Remote>,
}

/// What the remote listener needs beyond its socket.
#[derive(Debug)]
struct Remote {
    identity: Arc<Identity>,
    tls: Arc<rustls::ServerConfig>,
    /// Operators allowed in; empty: every operator of the trust domain.
    operators: Arc<BTreeSet<String>>,
}

impl GrpcServer {
    /// Binds the loopback listener (`admin.grpc`); a port conflict fails start-up here.
    pub async fn bind(addr: SocketAddr, inherited: &Sockets) -> Result<Self, GrpcError> {
        let listener = handover::tcp_listener(inherited, Kind::AdminGrpc, addr)
            .await
            .map_err(|source| GrpcError::Bind { addr, source })?;
        Ok(Self {
            listener,
            remote: None,
        })
    }

    /// Binds the remote mTLS listener (`admin.grpc_remote`): it presents `identity`'s
    /// certificate and admits operators of its trust domain (only those in `operators`
    /// unless that is empty).
    pub async fn bind_remote(
        addr: SocketAddr,
        identity: Arc<Identity>,
        operators: BTreeSet<String>,
        inherited: &Sockets,
    ) -> Result<Self, GrpcError> {
        let tls = remote::server_config(&identity)?;
        let listener = handover::tcp_listener(inherited, Kind::AdminGrpcRemote, addr)
            .await
            .map_err(|source| GrpcError::Bind { addr, source })?;
        Ok(Self {
            listener,
            remote: Some(Remote {
                identity,
                tls,
                operators: Arc::new(operators),
            }),
        })
    }

    /// The listening socket, to offer a successor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.listener.as_fd()
    }

    /// Whether this is the remote (mTLS) listener.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener always has a local address")
    }

    /// Serves until `shutdown` is cancelled. Health follows the gateway: NOT_SERVING until
    /// it is ready, SERVING while it serves, NOT_SERVING once it drains.
    pub async fn run(
        self,
        context: Arc<Context>,
        shutdown: CancellationToken,
    ) -> Result<(), tonic::transport::Error> {
        match self.remote {
            None => {
                let incoming = remote::local_incoming(self.listener);
                serve(incoming, context, Arc::default(), shutdown).await
            }
            Some(r) => {
                let incoming =
                    remote::tls_incoming(self.listener, r.identity, r.tls, shutdown.clone());
                serve(incoming, context, r.operators, shutdown).await
            }
        }
    }
}

/// The admin, health and reflection services on the connections of `incoming`.
async fn serve<S, IO>(
    incoming: S,
    context: Arc<Context>,
    operators: Arc<BTreeSet<String>>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<AdminServiceServer<AdminApi>>()
        .await;
    // Each reflection version lists every service, the other version's included.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(meshup_admin_api::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the generated descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .expect("the generated descriptor sets are valid");
    let admin = AdminServiceServer::new(AdminApi::new(context.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tokio::spawn(follow_health(health, context, shutdown.clone()));
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .timeout(REQUEST_TIMEOUT)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(tonic::service::InterceptorLayer::new(
            move |request: tonic::Request<()>| admit(&operators, request),
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(admin)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

/// Lets a request in if its connection has a caller and, when `operators` is not empty, the
/// caller is a local one or an operator on the list.
fn admit(
    operators: &BTreeSet<String>,
    request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    match caller::caller_of(&request)? {
        Caller::Operator(op) if !operators.is_empty() && !operators.contains(&op.name) => {
            tracing::info!(operator = %op.name, "remote admin: operator not in admin.operators; refused");
            Err(tonic::Status::permission_denied(format!(
                "operator {} may not use this gateway's admin API: it is not in admin.operators ({}); ask for it to be added, or use a listed operator's certificate",
                op.name,
                operators.iter().cloned().collect::<Vec<_>>().join(", ")
            )))
        }
        _ => Ok(request),
    }
}

/// Keeps the health service's answer in step with readiness and drain.
async fn follow_health(
    health: tonic_health::server::HealthReporter,
    context: Arc<Context>,
    stop: CancellationToken,
) {
    let mut draining = context.draining.clone();
    let mut serving = None;
    loop {
        let now = context.readiness.is_ready() && !*draining.borrow_and_update();
        if serving != Some(now) {
            let status = if now {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("", status).await;
            health
                .set_service_status(meshup_admin_api::SERVICE_NAME, status)
                .await;
            serving = Some(now);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = draining.changed() => if changed.is_err() { return },
            // Readiness has no channel: look again shortly.
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

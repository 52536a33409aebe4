//! The gRPC admin API (`proto/meshup/admin/v1/admin.proto`) on `admin.grpc`: the
//! `meshup.admin.v1.AdminService` ([`service`]), the standard `grpc.health.v1.Health`
//! (SERVING once the gateway is ready, NOT_SERVING while it starts or drains) and server
//! reflection v1 and v1alpha (older clients know only the latter), so `grpcurl` works
//! unchanged.
//!
//! Plaintext on loopback by default (the config refuses another address unless
//! `admin.allow_non_loopback_grpc` is set). There is no caller identity on this listener, so
//! drill writes take a `who` field from the caller; remote admin with operator certificates
//! is not built yet.
//!
//! Limits are explicit: message size both ways, concurrent requests and HTTP/2 streams per
//! connection, a deadline for every unary call, and a bounded number of event watchers.

pub mod events;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshup_admin_api::MAX_MESSAGE_BYTES;
use meshup_admin_api::pb::admin_service_server::AdminServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

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
}

/// A bound gRPC admin server, not yet serving.
#[derive(Debug)]
pub struct GrpcServer {
    listener: TcpListener,
}

impl GrpcServer {
    /// Binds the address; a port conflict fails start-up here.
    pub async fn bind(addr: SocketAddr) -> Result<Self, GrpcError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| GrpcError::Bind { addr, source })?;
        Ok(Self { listener })
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
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
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
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(self.listener);
        tonic::transport::Server::builder()
            .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .timeout(REQUEST_TIMEOUT)
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .tcp_nodelay(true)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
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

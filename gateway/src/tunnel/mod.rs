//! The QUIC endpoint every tunnel stream runs over: mutual TLS 1.3 with SPIFFE identities,
//! ALPN `meshup/1.1` or `meshup/1` ([`PROTOCOLS`]), and transport settings chosen on purpose
//! (see [`transport_config`]).
//!
//! One UDP socket serves both directions: [`crate::inbound`] accepts peers' connections on it
//! and [`crate::outbound`] dials peers from it. There is no plaintext mode and no fallback:
//! a peer without a valid client certificate never completes a handshake.

mod config;
pub mod metrics;
mod queues;
mod replays;
mod socket;
pub(crate) mod splice;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshup_core::names::ClusterName;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{AckFrequencyConfig, IdleTimeout, TransportConfig, VarInt};
use thiserror::Error;

pub use config::{
    ConfigError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_CONNECTION_WINDOW_BYTES, DEFAULT_DRAIN_DEADLINE,
    DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_LISTEN,
    DEFAULT_MAX_CONNECTION_AGE, DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_PENDING_HEADERS,
    DEFAULT_MAX_STREAMS, DEFAULT_MAX_UDP_PAYLOAD, DEFAULT_SOCKET_BUFFER_BYTES,
    DEFAULT_STREAM_IDLE_TIMEOUT, DEFAULT_STREAM_WINDOW_BYTES, MAX_DURATION, MIN_UDP_PAYLOAD,
    TunnelConfig,
};
pub(crate) use metrics::ConnectionGuard;
pub use metrics::{
    BytesLabels, DialLabels, Label, Metrics, ReasonLabels, StreamLabels, StreamResultLabels,
};

use crate::identity::{
    CertResolver, Identity, PeerIdentity, PeerVerifier, check_svid, server_name_for,
};

/// ALPN id of the first tunnel protocol, which every gateway speaks.
pub const ALPN: &[u8] = b"meshup/1";
/// ALPN id of `meshup/1` plus one promise of the serving gateway: it sends an HTTP/1.1
/// request marked `meshup-h2-client` (an h2 client's, carried as HTTP/1.1 between the
/// gateways) to its endpoint as h2 (docs/http-routing.md, "How a request travels").
pub const ALPN_1_1: &[u8] = b"meshup/1.1";
/// The tunnel protocols a gateway speaks, newest first. Both ends offer all of them and the
/// handshake settles on the newest both speak (the server's order decides), so gateways of
/// two releases connect during a rolling upgrade; a peer speaking none of them fails the
/// handshake.
pub const PROTOCOLS: [&[u8]; 2] = [ALPN_1_1, ALPN];

/// The ALPN ids `cfg` offers and accepts ([`PROTOCOLS`]).
fn alpn_ids(cfg: &TunnelConfig) -> Vec<Vec<u8>> {
    let ids: &[&[u8]] = if cfg.first_protocol_only {
        &[ALPN]
    } else {
        &PROTOCOLS
    };
    ids.iter().map(|id| id.to_vec()).collect()
}

/// Whether the gateway at the other end of `conn` speaks `meshup/1.1` ([`ALPN_1_1`]).
pub fn speaks_1_1(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .is_some_and(|d| d.protocol.as_deref() == Some(ALPN_1_1))
}

/// Application close code: the gateway is draining (peers should not reconnect to it).
pub const CLOSE_DRAINING: VarInt = VarInt::from_u32(0x10);
/// Application close code: the connection reached its maximum age and is being replaced.
pub const CLOSE_RECYCLED: VarInt = VarInt::from_u32(0x11);
/// Application close code: the gateway shut down without a drain.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0x12);
/// Application close code: the peer's certificate expired while the connection was open.
pub const CLOSE_EXPIRED: VarInt = VarInt::from_u32(0x13);
/// Application close code: nothing arrived from the peer for `tunnel.idle_timeout`.
pub const CLOSE_SILENT: VarInt = VarInt::from_u32(0x14);
/// Application close code: `max_pending_headers` streams in a row sent no header in time.
pub const CLOSE_STALLING: VarInt = VarInt::from_u32(0x15);
/// Stream reset/stop code: the TCP connection on the other side was reset (RST).
pub const RESET_TCP: VarInt = VarInt::from_u32(0x1);
/// Stream reset/stop code: the stream is abandoned (protocol error, timeout, shutdown).
pub const RESET_ABORT: VarInt = VarInt::from_u32(0x2);

/// Errors binding the endpoint. None is worth retrying without changing config or files.
#[derive(Debug, Error)]
pub enum BindError {
    #[error("invalid tunnel config: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot build TLS config: {0}")]
    Tls(String),
    #[error("cannot bind QUIC endpoint on udp {addr} (is another gateway running?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Errors dialing a peer gateway.
#[derive(Debug, Clone, Error)]
pub enum ConnectError {
    #[error("cannot start a connection to {addr}: {reason}")]
    Start { addr: SocketAddr, reason: String },
    #[error("handshake with {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: quinn::ConnectionError,
    },
}

impl ConnectError {
    /// Whether retrying later may succeed. A rejected certificate is not transient in
    /// seconds, but a rotation can fix it, so only local misuse is final.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ConnectError::Start { .. })
    }
}

/// The transport settings every tunnel connection uses, both directions.
///
/// - keep-alive + idle timeout: a silently dead peer is noticed within `idle_timeout`
///   (quinn's default is 30 s and no keep-alive).
/// - explicit stream limit (quinn's default of 100 makes extra streams wait silently).
/// - receive windows sized for throughput on a fast path.
/// - ACK delay: with quinn's default 25 ms `max_ack_delay`, a lone small packet that gets no
///   reply is acknowledged only 25 ms later, and whoever waits for that ACK (a finished
///   stream's data, a sender at its window) stalls that long. We ask the peer (ACK
///   frequency extension, both ends are quinn) for at most 1 ms, keeping its default of an
///   immediate ACK every second packet so bulk transfers do not send more ACKs. The data
///   path never waits for ACKs of its own (`finish` is not awaited), and tests assert small
///   request/response p50 far below 25 ms.
pub fn transport_config(cfg: &TunnelConfig) -> Result<TransportConfig, ConfigError> {
    cfg.validate()?;
    let mut t = TransportConfig::default();
    let idle = IdleTimeout::try_from(cfg.idle_timeout)
        .map_err(|_| ConfigError::IdleTooLong(cfg.idle_timeout))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(cfg.keep_alive));
    t.max_concurrent_bidi_streams(VarInt::from_u32(cfg.max_streams));
    // We never use unidirectional streams or datagrams: grant none.
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window(VarInt::from_u32(cfg.stream_window_bytes));
    t.receive_window(VarInt::from_u32(cfg.connection_window_bytes));
    t.send_window(u64::from(cfg.connection_window_bytes));
    let mut ack = AckFrequencyConfig::default();
    ack.max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(cfg.max_udp_payload);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// The gateway's QUIC endpoint.
#[derive(Debug)]
pub struct Endpoint {
    quinn: quinn::Endpoint,
    identity: Arc<Identity>,
    config: TunnelConfig,
    metrics: Metrics,
    client_config: quinn::ClientConfig,
    local_addr: SocketAddr,
}

impl Endpoint {
    /// Validates `config`, builds the TLS and transport configs and binds the UDP socket.
    /// Must be called inside a tokio runtime.
    pub fn bind(
        config: &TunnelConfig,
        identity: Arc<Identity>,
        metrics: Metrics,
    ) -> Result<Arc<Self>, BindError> {
        let transport = Arc::new(transport_config(config)?);
        identity.attach_metrics(metrics.clone());
        let server = server_config(config, &identity, transport.clone())?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(client_tls(config, &identity)?));
        client_config.transport_config(transport);
        let bind_error = |source| BindError::Bind {
            addr: config.listen,
            source,
        };
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload)
            .map_err(|e| bind_error(std::io::Error::other(e.to_string())))?;
        let (socket, new) = match queues::bind(config.listen).map_err(bind_error)? {
            queues::PortSockets::Split { known, new, tag } => {
                endpoint_config.cid_generator(move || Box::new(queues::TaggedCids(tag)));
                if let Err(e) = socket::size_buffers(&new, queues::NEW_BUFFER_BYTES) {
                    tracing::warn!(error = %e, "cannot size the new connections' queue");
                }
                (known, Some(new))
            }
            queues::PortSockets::Single(socket) => (socket, None),
        };
        let wanted = config.socket_buffer_bytes as usize;
        match socket::size_buffers(&socket, wanted) {
            // Linux reports twice the usable size it granted.
            Ok((recv, send)) if recv / 2 < wanted || send / 2 < wanted => tracing::warn!(
                wanted,
                recv_granted = recv / 2,
                send_granted = send / 2,
                "the kernel gave the tunnel socket smaller buffers than tunnel.socket_buffer_bytes; \
                 bursts may be dropped (raise net.core.rmem_max and net.core.wmem_max)"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot size the tunnel socket's buffers"),
        }
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
        let new = match new {
            Some(s) => Some(socket::NewQueue::new(
                socket::QueueSocket::new(s).map_err(bind_error)?,
                metrics.replayed_initials_blocked.clone(),
            )),
            None => None,
        };
        let socket =
            socket::TunnelSocket::new(socket::QueueSocket::new(socket).map_err(bind_error)?, new);
        let quinn = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(server),
            socket,
            runtime,
        )
        .map_err(bind_error)?;
        let local_addr = quinn.local_addr().map_err(|source| BindError::Bind {
            addr: config.listen,
            source,
        })?;
        Ok(Arc::new(Self {
            quinn,
            identity,
            config: config.clone(),
            metrics,
            client_config,
            local_addr,
        }))
    }

    /// The bound UDP address (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Addresses to publish in this gateway's catalog record.
    pub fn advertised_addrs(&self) -> Vec<SocketAddr> {
        self.config.advertised(self.local_addr)
    }

    /// The config the endpoint was bound with.
    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    /// Our identity.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// The metrics this endpoint records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The underlying quinn endpoint.
    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.quinn
    }

    /// Dials a gateway of `cluster` at `addr`. The server must present an SVID of our trust
    /// domain naming exactly `cluster`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        cluster: &ClusterName,
    ) -> Result<quinn::Connection, ConnectError> {
        let connecting = self
            .quinn
            .connect_with(self.client_config.clone(), addr, &server_name_for(cluster))
            .map_err(|e| ConnectError::Start {
                addr,
                reason: e.to_string(),
            })?;
        let timeout = self.config.connect_timeout;
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                self.metrics.handshake_failed("timeout");
                return Err(ConnectError::Timeout { addr, timeout });
            }
            Ok(Err(source)) => return Err(ConnectError::Handshake { addr, source }),
            Ok(Ok(conn)) => conn,
        };
        self.track(&conn);
        Ok(conn)
    }

    /// Counts `conn` in the active-connections gauge until it closes, and closes it once the
    /// peer has been silent for `idle_timeout` (see [`peer_silent_for`]).
    pub(crate) fn track(&self, conn: &quinn::Connection) {
        let guard = ConnectionGuard::new(&self.metrics);
        let conn = conn.clone();
        let idle = self.config.idle_timeout;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = conn.closed() => {}
                () = peer_silent_for(&conn, idle) => {
                    tracing::info!(remote = %conn.remote_address(), ?idle, "peer silent; closing the connection");
                    metrics.silent_peers.inc();
                    conn.close(CLOSE_SILENT, b"peer silent");
                }
            }
            drop(guard);
        });
    }

    /// Closes every connection with `code` and stops the endpoint.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.quinn.close(code, reason);
    }

    /// Waits until every connection is closed and its close was sent (bounded by idle
    /// timeouts), so a process can exit without peers waiting on a silent socket.
    pub async fn wait_idle(&self) {
        self.quinn.wait_idle().await;
    }
}

/// Resolves once nothing has arrived on `conn` for `idle`.
///
/// quinn's own idle timer starts again at the first packet we send after the peer's last one,
/// and with keep-alives that packet is our next keep-alive, up to `keep_alive` later: a peer
/// that died right after its last packet would be noticed only after `idle + keep_alive`.
/// Counting from the last packet received makes `idle_timeout` mean what it says (a peer
/// silent this long is dead). Live peers answer our keep-alives, so with `keep_alive` below
/// `idle_timeout` (the config insists) a live connection never stays silent that long;
/// quinn's timer remains the backstop.
async fn peer_silent_for(conn: &quinn::Connection, idle: Duration) {
    // Arrivals are seen at this granularity, so silence is noticed at most one check late.
    let check = (idle / 30).max(Duration::from_millis(10));
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut since = tokio::time::Instant::now();
    loop {
        let deadline = since + idle;
        tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + check)).await;
        let now = conn.stats().udp_rx.datagrams;
        if now != seen {
            seen = now;
            since = tokio::time::Instant::now();
        } else if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}

/// Who the peer of an established connection is, read from its certificate (which the
/// verifier already checked during the handshake).
pub fn peer_identity(conn: &quinn::Connection, trust_domain: &str) -> Option<PeerIdentity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let leaf = certs.first()?;
    check_svid(leaf.as_ref(), trust_domain, None).ok()
}

/// The peer's certificate details without the trust-domain check (for connections we
/// dialed, whose server certificate the verifier already checked).
pub(crate) fn peer_identity_unchecked(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let leaf = certs.first()?;
    let td = crate::identity::trust_domain_of(leaf.as_ref())?;
    check_svid(leaf.as_ref(), &td, None).ok()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(
    cfg: &TunnelConfig,
    identity: &Arc<Identity>,
    transport: Arc<TransportConfig>,
) -> Result<quinn::ServerConfig, BindError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BindError::Tls(e.to_string()))?
        .with_client_cert_verifier(PeerVerifier::new(identity.clone()))
        .with_cert_resolver(Arc::new(CertResolver(identity.clone())));
    tls.alpn_protocols = alpn_ids(cfg);
    // 0-RTT off: replayable early data has no place in a proxy of arbitrary TCP.
    tls.max_early_data_size = 0;
    tls.send_half_rtt_data = false;
    // No session tickets: a resumed handshake would skip client-certificate verification.
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| BindError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(transport);
    // Bounded queue of connection attempts not yet handled by the accept loop; the accept
    // loop itself caps handshakes in progress at `max_handshakes`.
    server.max_incoming(
        usize::try_from(cfg.max_handshakes)
            .unwrap_or(usize::MAX)
            .saturating_mul(2),
    );
    server.incoming_buffer_size(64 * 1024);
    server.incoming_buffer_size_total(u64::from(cfg.max_handshakes) * 64 * 1024);
    Ok(server)
}

fn client_tls(cfg: &TunnelConfig, identity: &Arc<Identity>) -> Result<QuicClientConfig, BindError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| BindError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(PeerVerifier::new(identity.clone()))
        .with_client_cert_resolver(Arc::new(CertResolver(identity.clone())));
    tls.alpn_protocols = alpn_ids(cfg);
    tls.enable_early_data = false;
    // Session resumption would skip our verifier on later handshakes (and its cluster
    // check); every handshake verifies the full chain.
    tls.resumption = rustls::client::Resumption::disabled();
    QuicClientConfig::try_from(tls).map_err(|e| BindError::Tls(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityFiles;

    /// The settings are asserted as quinn sees them (its Debug output is the only reader
    /// of a built `TransportConfig`); behaviour is asserted in `tests/tunnel_lifecycle.rs`.
    #[test]
    fn transport_settings_are_the_chosen_ones() {
        let cfg = TunnelConfig::with_files(IdentityFiles::in_dir(std::path::Path::new("x")));
        let t = format!("{:?}", transport_config(&cfg).expect("valid"));
        for expected in [
            "max_concurrent_bidi_streams: 4096",
            "max_concurrent_uni_streams: 0",
            "max_idle_timeout: Some(3000)",
            "keep_alive_interval: Some(1s)",
            &format!("stream_receive_window: {}", 8 * 1024 * 1024),
            &format!("receive_window: {}", 32 * 1024 * 1024),
            "max_ack_delay: Some(1ms)",
            "datagram_receive_buffer_size: None",
            "upper_bound: 8952",
        ] {
            assert!(t.contains(expected), "{expected:?} not in {t}");
        }
    }
}

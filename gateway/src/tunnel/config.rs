//! The `tunnel:` section of the gateway config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::identity::IdentityFiles;

/// Default QUIC listen address (loopback: a gateway exposed beyond it is an explicit choice).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15443";
/// Idle timeout: a peer silent this long is dead, counted from its last packet (see
/// `Endpoint::track`). With keep-alives every second a live peer is never silent that long,
/// and a dead one is noticed within a thirtieth more: at most ~3.1 s after it died.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Keep-alive interval: keeps idle connections alive and probes liveness.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(1);
/// Concurrent bidirectional streams per connection: one per proxied TCP connection, so
/// 1000 concurrent client connections to one peer fit with room to spare.
pub const DEFAULT_MAX_STREAMS: u32 = 4096;
/// Incoming handshakes in progress; above half of it, unvalidated clients get a Retry.
pub const DEFAULT_MAX_HANDSHAKES: u32 = 256;
/// Connections are recycled after this age, so rotated certificates are eventually used by
/// every connection (keep it below half the certificate lifetime; default SVIDs live 24 h).
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);
/// Timeout of one QUIC handshake and of one TCP connect to a local endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time a peer has to send a complete header on a new stream.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Streams of one connection accepted and still waiting for their header; above it, the
/// connection's further streams wait inside QUIC until one is decided (a real peer sends the
/// header with the stream's first bytes, so only a stalling peer ever reaches it).
pub const DEFAULT_MAX_PENDING_HEADERS: u32 = 128;
/// How long a drain waits for in-flight streams before closing anyway.
pub const DEFAULT_DRAIN_DEADLINE: Duration = Duration::from_secs(20);
/// A proxied connection with no byte in either direction for this long is reset on both
/// sides, so abandoned connections cannot pin streams and memory forever (one hour, like
/// Envoy's default idle timeout: long-lived but quiet database connections survive).
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Per-stream receive window: one stream can fill a ~1 ms RTT path at several Gb/s.
pub const DEFAULT_STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// Per-connection receive window, shared by all streams of a connection.
pub const DEFAULT_CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Configuration of the QUIC tunnel. The trust domain is not here: it is federation-wide
/// and lives at the top level of the gateway config (the integrator passes it to
/// [`crate::identity::Identity::load`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelConfig {
    /// UDP address the QUIC endpoint binds (inbound and outbound share it).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Addresses peers should dial (published in the gateway record); empty means `listen`.
    #[serde(default)]
    pub advertise: Vec<SocketAddr>,
    /// The UDP port a successor process binds while this one drains during a hand-over on
    /// the node (`handover.socket`); the next successor goes back to `listen`'s port, so both
    /// must be open. Advertised addresses with `listen`'s port are published with the port in
    /// use.
    #[serde(default)]
    pub handover_port: Option<u16>,
    /// PEM certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM PKCS#8/SEC1/PKCS#1 private key.
    pub key: PathBuf,
    /// PEM trust bundle (federation CA certificates).
    pub bundle: PathBuf,
    #[serde(default = "d_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "d_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(default = "d_max_streams")]
    pub max_streams: u32,
    #[serde(default = "d_max_handshakes")]
    pub max_handshakes: u32,
    /// Streams of one connection accepted and still waiting for a complete header.
    #[serde(default = "d_max_pending_headers")]
    pub max_pending_headers: u32,
    #[serde(default = "d_max_age", with = "humantime_serde")]
    pub max_connection_age: Duration,
    #[serde(default = "d_connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "d_header", with = "humantime_serde")]
    pub header_timeout: Duration,
    #[serde(default = "d_drain", with = "humantime_serde")]
    pub drain_deadline: Duration,
    #[serde(default = "d_stream_idle", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    #[serde(default = "d_stream_window")]
    pub stream_window_bytes: u32,
    #[serde(default = "d_conn_window")]
    pub connection_window_bytes: u32,
    /// Largest UDP payload path-MTU discovery probes for, and the largest this endpoint
    /// accepts. Discovery starts at 1200 bytes and falls back on black holes, so a value
    /// above the real path MTU only costs a few probes; on jumbo-frame networks (and
    /// loopback) large packets cut per-packet work several times over.
    #[serde(default = "d_max_udp_payload")]
    pub max_udp_payload: u16,
    /// Live QUIC connections one caller cluster may hold to this gateway.
    #[serde(default = "d_max_conns_per_cluster")]
    pub max_connections_per_cluster: u32,
    /// Send and receive buffer asked of the kernel for the UDP socket. The kernel caps it at
    /// `net.core.rmem_max` / `wmem_max`; the gateway warns at start when it got less.
    #[serde(default = "d_socket_buffer")]
    pub socket_buffer_bytes: u32,
    /// Speak only the first tunnel protocol, `meshup/1`, as gateways released before
    /// `meshup/1.1` do ([`super::PROTOCOLS`]). Not a config-file setting (a file naming it
    /// is refused as unknown): tests set it so a gateway stands in for an older one in a
    /// rolling upgrade.
    #[serde(skip)]
    #[doc(hidden)]
    pub first_protocol_only: bool,
}

/// Default `max_udp_payload`: a 9000-byte jumbo frame less IPv6 and UDP headers.
pub const DEFAULT_MAX_UDP_PAYLOAD: u16 = 8952;
/// Smallest UDP payload QUIC allows (RFC 9000 §14).
pub const MIN_UDP_PAYLOAD: u16 = 1200;
/// Largest UDP payload there is (65535 less the 8-byte UDP header).
pub const MAX_UDP_PAYLOAD: u16 = 65527;

/// Default `max_connections_per_cluster`: one per peer gateway of a large cluster, with
/// room for connections being recycled.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLUSTER: u32 = 16;

/// Default `socket_buffer_bytes`: a whole flight at several Gb/s and a ~1 ms RTT, so a
/// burst is not dropped at the socket while the gateway is busy elsewhere.
pub const DEFAULT_SOCKET_BUFFER_BYTES: u32 = 4 * 1024 * 1024;
/// Largest `socket_buffer_bytes` accepted.
pub const MAX_SOCKET_BUFFER_BYTES: u32 = 256 * 1024 * 1024;

fn d_socket_buffer() -> u32 {
    DEFAULT_SOCKET_BUFFER_BYTES
}

fn d_max_conns_per_cluster() -> u32 {
    DEFAULT_MAX_CONNECTIONS_PER_CLUSTER
}

fn d_max_udp_payload() -> u16 {
    DEFAULT_MAX_UDP_PAYLOAD
}

fn default_listen() -> SocketAddr {
    // The constant is a literal address; parsing it cannot fail.
    DEFAULT_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 15443)))
}
fn d_idle() -> Duration {
    DEFAULT_IDLE_TIMEOUT
}
fn d_keep_alive() -> Duration {
    DEFAULT_KEEP_ALIVE
}
fn d_max_streams() -> u32 {
    DEFAULT_MAX_STREAMS
}
fn d_max_handshakes() -> u32 {
    DEFAULT_MAX_HANDSHAKES
}
fn d_max_pending_headers() -> u32 {
    DEFAULT_MAX_PENDING_HEADERS
}
fn d_max_age() -> Duration {
    DEFAULT_MAX_CONNECTION_AGE
}
fn d_connect() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}
fn d_header() -> Duration {
    DEFAULT_HEADER_TIMEOUT
}
fn d_drain() -> Duration {
    DEFAULT_DRAIN_DEADLINE
}
fn d_stream_idle() -> Duration {
    DEFAULT_STREAM_IDLE_TIMEOUT
}
fn d_stream_window() -> u32 {
    DEFAULT_STREAM_WINDOW_BYTES
}
fn d_conn_window() -> u32 {
    DEFAULT_CONNECTION_WINDOW_BYTES
}

/// Longest duration any tunnel setting may have.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// A `tunnel:` section that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error("tunnel.max_udp_payload is {0}; QUIC needs {MIN_UDP_PAYLOAD} to {MAX_UDP_PAYLOAD}")]
    UdpPayload(u16),
    #[error("tunnel.{field} is longer than the {}-day maximum", max.as_secs() / 86_400)]
    DurationTooLong { field: &'static str, max: Duration },
    #[error("tunnel.{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error(
        "tunnel.keep_alive ({keep_alive:?}) must be shorter than tunnel.idle_timeout ({idle:?}), or idle connections die"
    )]
    KeepAliveTooLong {
        keep_alive: Duration,
        idle: Duration,
    },
    #[error("tunnel.idle_timeout {0:?} exceeds the QUIC limit")]
    IdleTooLong(Duration),
    #[error("tunnel.{field} = {value} is above the limit of {max}")]
    TooLarge {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("tunnel.stream_window_bytes must not exceed tunnel.connection_window_bytes")]
    WindowOrder,
    #[error(
        "tunnel.handover_port {port} must differ from tunnel.listen's port and not be 0, and tunnel.listen must name a port (not 0): a successor binds the other of the two while this gateway drains"
    )]
    HandoverPort { port: u16 },
}

impl TunnelConfig {
    /// A config with every default and the given identity files.
    pub fn with_files(files: IdentityFiles) -> Self {
        Self {
            listen: default_listen(),
            advertise: Vec::new(),
            handover_port: None,
            cert: files.cert,
            key: files.key,
            bundle: files.bundle,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_streams: DEFAULT_MAX_STREAMS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_pending_headers: DEFAULT_MAX_PENDING_HEADERS,
            max_connection_age: DEFAULT_MAX_CONNECTION_AGE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            drain_deadline: DEFAULT_DRAIN_DEADLINE,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            stream_window_bytes: DEFAULT_STREAM_WINDOW_BYTES,
            connection_window_bytes: DEFAULT_CONNECTION_WINDOW_BYTES,
            max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
            max_connections_per_cluster: DEFAULT_MAX_CONNECTIONS_PER_CLUSTER,
            socket_buffer_bytes: DEFAULT_SOCKET_BUFFER_BYTES,
            first_protocol_only: false,
        }
    }

    /// The identity files named by this config.
    pub fn files(&self) -> IdentityFiles {
        IdentityFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            bundle: self.bundle.clone(),
        }
    }

    /// Rejects impossible combinations with a message naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, d) in [
            ("idle_timeout", self.idle_timeout),
            ("keep_alive", self.keep_alive),
            ("max_connection_age", self.max_connection_age),
            ("connect_timeout", self.connect_timeout),
            ("header_timeout", self.header_timeout),
            ("stream_idle_timeout", self.stream_idle_timeout),
            ("drain_deadline", self.drain_deadline),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero { field });
            }
            // `Instant + Duration` panics past ~292 years; every deadline is built that way,
            // so a typo like `300000y` must be refused here, not crash a task later.
            if d > MAX_DURATION {
                return Err(ConfigError::DurationTooLong {
                    field,
                    max: MAX_DURATION,
                });
            }
        }
        for (field, v) in [
            ("max_streams", self.max_streams),
            ("max_handshakes", self.max_handshakes),
            ("max_pending_headers", self.max_pending_headers),
            ("stream_window_bytes", self.stream_window_bytes),
            (
                "max_connections_per_cluster",
                self.max_connections_per_cluster,
            ),
            ("connection_window_bytes", self.connection_window_bytes),
            ("socket_buffer_bytes", self.socket_buffer_bytes),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { field });
            }
        }
        if let Some(port) = self.handover_port
            && (port == 0 || self.listen.port() == 0 || port == self.listen.port())
        {
            return Err(ConfigError::HandoverPort { port });
        }
        if self.keep_alive >= self.idle_timeout {
            return Err(ConfigError::KeepAliveTooLong {
                keep_alive: self.keep_alive,
                idle: self.idle_timeout,
            });
        }
        if quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return Err(ConfigError::IdleTooLong(self.idle_timeout));
        }
        // Bounded so a config typo cannot ask for millions of streams' worth of state.
        const MAX_STREAMS: u32 = 1 << 20;
        if self.max_streams > MAX_STREAMS {
            return Err(ConfigError::TooLarge {
                field: "max_streams",
                value: self.max_streams.into(),
                max: MAX_STREAMS.into(),
            });
        }
        if self.socket_buffer_bytes > MAX_SOCKET_BUFFER_BYTES {
            return Err(ConfigError::TooLarge {
                field: "socket_buffer_bytes",
                value: self.socket_buffer_bytes.into(),
                max: MAX_SOCKET_BUFFER_BYTES.into(),
            });
        }
        if self.stream_window_bytes > self.connection_window_bytes {
            return Err(ConfigError::WindowOrder);
        }
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            return Err(ConfigError::UdpPayload(self.max_udp_payload));
        }
        Ok(())
    }

    /// How long a caller waits for the status answer: the peer's header read plus its
    /// (bounded) search for a local endpoint, so a slow-but-working peer is not abandoned
    /// while it is still connecting.
    pub fn answer_timeout(&self) -> Duration {
        self.header_timeout + self.connect_timeout
    }

    /// Addresses to publish for peers.
    pub fn advertised(&self, bound: SocketAddr) -> Vec<SocketAddr> {
        if self.advertise.is_empty() {
            vec![bound]
        } else {
            self.advertise.clone()
        }
    }

    /// The config a successor process uses to take over from a predecessor serving QUIC on
    /// `predecessor_port`: it listens on the other of `listen`'s port and `handover_port`
    /// (and its own successor will use the predecessor's), and advertises that port where
    /// the config advertises the predecessor's. `None` without a `handover_port`.
    pub fn for_successor(&self, predecessor_port: u16) -> Option<Self> {
        let alternate = self.handover_port?;
        let port = if predecessor_port == self.listen.port() {
            alternate
        } else {
            self.listen.port()
        };
        let mut next = self.clone();
        next.listen.set_port(port);
        next.handover_port = Some(predecessor_port);
        for a in &mut next.advertise {
            if a.port() == predecessor_port {
                a.set_port(port);
            }
        }
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_only_paths_gets_every_default_and_unknown_fields_are_refused() {
        let cfg: TunnelConfig =
            serde_norway::from_str("cert: c.pem\nkey: k.pem\nbundle: b.pem\n").expect("parses");
        assert_eq!(cfg, TunnelConfig::with_files(cfg.files()));
        assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
        cfg.validate().expect("defaults are valid");

        let cfg: TunnelConfig = serde_norway::from_str(
            "cert: c\nkey: k\nbundle: b\nidle_timeout: 5s\nkeep_alive: 500ms\nmax_streams: 10\n",
        )
        .expect("parses");
        assert_eq!(cfg.idle_timeout, Duration::from_secs(5));
        assert_eq!(cfg.keep_alive, Duration::from_millis(500));
        assert_eq!(cfg.max_streams, 10);

        assert!(
            serde_norway::from_str::<TunnelConfig>("cert: c\nkey: k\nbundle: b\nidle: 1s\n")
                .is_err()
        );
        // Standing in for an older release is for tests, not a setting a file can make.
        assert!(
            serde_norway::from_str::<TunnelConfig>(
                "cert: c\nkey: k\nbundle: b\nfirst_protocol_only: true\n"
            )
            .is_err()
        );
    }

    #[test]
    fn absurd_durations_are_rejected_before_they_can_overflow_a_deadline() {
        let mut cfg = TunnelConfig::with_files(IdentityFiles::in_dir(std::path::Path::new("x")));
        cfg.max_connection_age = Duration::from_secs(u64::MAX / 2);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::DurationTooLong {
                field: "max_connection_age",
                ..
            })
        ));
        cfg.max_connection_age = MAX_DURATION;
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn impossible_combinations_are_rejected() {
        let base = TunnelConfig::with_files(IdentityFiles::in_dir(std::path::Path::new("x")));
        let mut c = base.clone();
        c.keep_alive = Duration::from_secs(3);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::KeepAliveTooLong { .. })
        ));
        let mut c = base.clone();
        c.max_streams = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "max_streams"
            })
        );
        let mut c = base.clone();
        c.header_timeout = Duration::ZERO;
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "header_timeout"
            })
        );
        let mut c = base.clone();
        c.max_pending_headers = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "max_pending_headers"
            })
        );
        let mut c = base.clone();
        c.socket_buffer_bytes = 0;
        assert_eq!(
            c.validate(),
            Err(ConfigError::Zero {
                field: "socket_buffer_bytes"
            })
        );
        let mut c = base.clone();
        c.socket_buffer_bytes = MAX_SOCKET_BUFFER_BYTES + 1;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooLarge {
                field: "socket_buffer_bytes",
                ..
            })
        ));
        let mut c = base;
        c.stream_window_bytes = c.connection_window_bytes + 1;
        assert_eq!(c.validate(), Err(ConfigError::WindowOrder));
    }

    #[test]
    fn a_successor_takes_the_other_port_and_advertises_it() {
        let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let mut c = TunnelConfig::with_files(IdentityFiles::in_dir(std::path::Path::new("x")));
        c.listen = addr("0.0.0.0:15443");
        c.advertise = vec![addr("10.0.0.7:15443"), addr("10.0.0.7:9999")];
        assert!(
            c.for_successor(15443).is_none(),
            "no handover_port: no successor config"
        );
        c.handover_port = Some(15444);
        c.validate().expect("valid");
        // (predecessor's port, listen, handover_port, advertised)
        let cases = [
            (15443, 15444, 15443, vec!["10.0.0.7:15444", "10.0.0.7:9999"]),
            (15444, 15443, 15444, vec!["10.0.0.7:15443", "10.0.0.7:9999"]),
        ];
        for (from, listen, next, advertised) in cases {
            let s = c.for_successor(from).expect("successor config");
            assert_eq!(s.listen.port(), listen, "from {from}");
            assert_eq!(s.handover_port, Some(next), "from {from}");
            s.validate().expect("the successor's config is valid");
            let want: Vec<SocketAddr> = advertised.into_iter().map(addr).collect();
            assert_eq!(s.advertised(s.listen), want, "from {from}");
        }
        for bad in [0, 15443] {
            c.handover_port = Some(bad);
            assert!(
                matches!(c.validate(), Err(ConfigError::HandoverPort { .. })),
                "{bad}"
            );
        }
        c.handover_port = Some(15444);
        c.listen = addr("0.0.0.0:0");
        assert!(matches!(
            c.validate(),
            Err(ConfigError::HandoverPort { .. })
        ));
    }
}

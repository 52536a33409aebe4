//! Prometheus metrics of the data plane. Cheap to clone (every field is an `Arc` inside).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `direction`: `outbound` (we are the caller) or `inbound` (we serve a peer).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// How a stream ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamResultLabels {
    pub direction: &'static str,
    /// A tunnel status (`connected`, `forbidden`, ...) for streams that never carried
    /// bytes, or `reset`, `error`, `done` for ones that did.
    pub result: &'static str,
}

/// Bytes moved: `flow` is `to_upstream` (client → server) or `to_client`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub flow: &'static str,
}

/// A reason label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Outcome of a pool dial.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    pub result: &'static str,
}

/// Data-plane metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub streams_opened: Family<DirectionLabels, Counter>,
    pub streams_closed: Family<StreamResultLabels, Counter>,
    pub streams_in_flight: Family<DirectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub pool_dials: Family<DialLabels, Counter>,
    pub active_connections: Gauge,
    /// Connections closed because nothing arrived from the peer for `tunnel.idle_timeout`.
    pub silent_peers: Counter,
    pub listeners: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `meshup_tunnel_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("tunnel");
        r.register(
            "streams_opened",
            "Tunnel streams opened",
            m.streams_opened.clone(),
        );
        r.register(
            "streams_closed",
            "Tunnel streams closed, by result",
            m.streams_closed.clone(),
        );
        r.register(
            "streams_in_flight",
            "Tunnel streams currently open",
            m.streams_in_flight.clone(),
        );
        r.register("bytes", "Payload bytes spliced", m.bytes.clone());
        r.register(
            "handshake_failures",
            "QUIC/TLS handshakes that failed, by reason",
            m.handshake_failures.clone(),
        );
        r.register(
            "pool_dials",
            "QUIC connections dialed by the outbound pool, by result",
            m.pool_dials.clone(),
        );
        r.register(
            "active_connections",
            "QUIC connections currently established (both directions)",
            m.active_connections.clone(),
        );
        r.register(
            "silent_peers",
            "QUIC connections closed because the peer sent nothing for tunnel.idle_timeout",
            m.silent_peers.clone(),
        );
        r.register(
            "listeners",
            "Outbound VIP listeners currently bound",
            m.listeners.clone(),
        );
        m
    }

    pub(crate) fn handshake_failed(&self, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn dialed(&self, result: &'static str) {
        self.pool_dials.get_or_create(&DialLabels { result }).inc();
    }

    /// Counts a stream open now and its close (with the result set later) when the guard
    /// drops, so early returns still count.
    pub(crate) fn stream(&self, direction: &'static str) -> StreamGuard {
        self.streams_opened
            .get_or_create(&DirectionLabels { direction })
            .inc();
        self.streams_in_flight
            .get_or_create(&DirectionLabels { direction })
            .inc();
        StreamGuard {
            metrics: self.clone(),
            direction,
            result: "error",
        }
    }

    pub(crate) fn add_bytes(&self, direction: &'static str, to_upstream: u64, to_client: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: "to_upstream",
            })
            .inc_by(to_upstream);
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: "to_client",
            })
            .inc_by(to_client);
    }

    /// Current in-flight streams in one direction.
    pub fn in_flight(&self, direction: &'static str) -> i64 {
        self.streams_in_flight
            .get_or_create(&DirectionLabels { direction })
            .get()
    }
}

/// Records a stream's close on drop.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    metrics: Metrics,
    direction: &'static str,
    result: &'static str,
}

impl StreamGuard {
    pub(crate) fn set_result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .streams_in_flight
            .get_or_create(&DirectionLabels {
                direction: self.direction,
            })
            .dec();
        self.metrics
            .streams_closed
            .get_or_create(&StreamResultLabels {
                direction: self.direction,
                result: self.result,
            })
            .inc();
    }
}

/// Counts an established connection while alive.
#[derive(Debug)]
pub(crate) struct ConnectionGuard(Gauge);

impl ConnectionGuard {
    pub(crate) fn new(metrics: &Metrics) -> Self {
        metrics.active_connections.inc();
        Self(metrics.active_connections.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

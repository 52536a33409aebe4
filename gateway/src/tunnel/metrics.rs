//! Prometheus metrics of the data plane. Cheap to clone (every field is an `Arc` inside).
//!
//! Traffic series carry `source_cluster` and `destination_cluster`. Their label values are
//! [`Label`]s: cluster names and service keys are `Arc<str>` inside, so building a label set
//! for a new connection clones pointers and allocates nothing; the service's text is made
//! once per catalog change (`steer::Prepared`), not once per connection.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use meshup_core::names::ClusterName;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A label value that costs a reference-count bump to clone. Equal texts are equal labels
/// whatever the variant, so one series never appears twice.
#[derive(Clone, Debug)]
pub enum Label {
    Cluster(ClusterName),
    Text(Arc<str>),
    Static(&'static str),
}

impl Label {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Cluster(c) => c.as_str(),
            Self::Text(t) => t,
            Self::Static(s) => s,
        }
    }

    /// A cluster's name, or `none` when no cluster took a connection.
    pub fn cluster_or_none(cluster: Option<&ClusterName>) -> Self {
        cluster.map_or(Self::Static("none"), |c| Self::Cluster(c.clone()))
    }
}

impl From<&ClusterName> for Label {
    fn from(c: &ClusterName) -> Self {
        Self::Cluster(c.clone())
    }
}

impl PartialEq for Label {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Label {}

impl Hash for Label {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// `direction` (`outbound`: we are the caller; `inbound`: we serve a peer) and the two
/// clusters of the traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub direction: &'static str,
    pub source_cluster: Label,
    pub destination_cluster: Label,
}

/// How a stream ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamResultLabels {
    pub direction: &'static str,
    pub source_cluster: Label,
    pub destination_cluster: Label,
    /// A tunnel status (`connected`, `forbidden`, ...) for streams that never carried
    /// bytes, or `reset`, `error`, `done` for ones that did.
    pub result: &'static str,
}

/// Bytes moved: `flow` is `to_upstream` (client → server) or `to_client`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: &'static str,
    pub source_cluster: Label,
    pub destination_cluster: Label,
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
    pub streams_opened: Family<StreamLabels, Counter>,
    pub streams_closed: Family<StreamResultLabels, Counter>,
    pub streams_in_flight: Family<StreamLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub handshake_failures: Family<ReasonLabels, Counter>,
    pub pool_dials: Family<DialLabels, Counter>,
    pub active_connections: Gauge,
    /// Connections closed because nothing arrived from the peer for `tunnel.idle_timeout`.
    pub silent_peers: Counter,
    /// Connections closed because `tunnel.max_pending_headers` of their streams in a row
    /// sent no complete header within `tunnel.header_timeout`.
    pub stalling_peers: Counter,
    /// Connection IDs whose client Initial came from too many source addresses: their
    /// copies are dropped in the kernel from then on (gateway/src/tunnel/replays.rs).
    pub replayed_initials_blocked: Counter,
    pub listeners: Gauge,
    /// VIP listeners the catalog asks for that could not be bound at the last reconcile
    /// (retried every reconcile); the gateway is not ready while its first catalog has any.
    pub listeners_unbound: Gauge,
    /// Failed VIP listener binds, each retry counted.
    pub listener_bind_failures: Counter,
    /// In-flight streams per direction over every cluster pair (`[outbound, inbound]`), for
    /// [`Metrics::in_flight`]; not exported (the family above has the same numbers).
    in_flight_by_direction: [Gauge; 2],
}

impl Metrics {
    /// Creates the metrics and registers them under `meshup_tunnel_*`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // The reasons the endpoint itself counts exist from the start, so dashboards show 0
        // rather than "no data" (certificate rejections add their own reasons when they occur).
        for reason in ["timeout", "draining", "too_many_handshakes"] {
            let _ = m.handshake_failures.get_or_create(&ReasonLabels { reason });
        }
        let r = registry.sub_registry_with_prefix("tunnel");
        r.register(
            "streams_opened",
            "Proxied streams opened (outbound: one per attempt at a cluster, local ones included), by direction and cluster pair",
            m.streams_opened.clone(),
        );
        r.register(
            "streams_closed",
            "Proxied streams closed, by direction, cluster pair and result",
            m.streams_closed.clone(),
        );
        r.register(
            "streams_in_flight",
            "Proxied streams currently open, by direction and cluster pair",
            m.streams_in_flight.clone(),
        );
        r.register(
            "bytes",
            "Payload bytes spliced, by direction, cluster pair and flow (to_upstream, to_client)",
            m.bytes.clone(),
        );
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
            "stalling_peers",
            "QUIC connections closed because tunnel.max_pending_headers of their streams in a row sent no header within tunnel.header_timeout",
            m.stalling_peers.clone(),
        );
        r.register(
            "replayed_initials_blocked",
            "Connection IDs of client Initials replayed from many source addresses, blocked in the new connections' socket filter",
            m.replayed_initials_blocked.clone(),
        );
        r.register(
            "listeners",
            "Outbound VIP listeners currently bound",
            m.listeners.clone(),
        );
        r.register(
            "listeners_unbound",
            "Outbound VIP listeners the catalog asks for that could not be bound at the last reconcile (retried)",
            m.listeners_unbound.clone(),
        );
        r.register(
            "listener_bind_failures",
            "Failed binds of outbound VIP listeners, each retry counted",
            m.listener_bind_failures.clone(),
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
    pub(crate) fn stream(
        &self,
        direction: &'static str,
        source_cluster: Label,
        destination_cluster: Label,
    ) -> StreamGuard {
        let labels = StreamLabels {
            direction,
            source_cluster,
            destination_cluster,
        };
        self.streams_opened.get_or_create(&labels).inc();
        self.streams_in_flight.get_or_create(&labels).inc();
        self.in_flight_by_direction[direction_index(direction)].inc();
        StreamGuard {
            metrics: self.clone(),
            labels,
            result: "error",
        }
    }

    /// Current in-flight streams in one direction, over every cluster pair.
    pub fn in_flight(&self, direction: &'static str) -> i64 {
        self.in_flight_by_direction[direction_index(direction)].get()
    }
}

fn direction_index(direction: &str) -> usize {
    usize::from(direction != "outbound")
}

/// Records a stream's close on drop.
#[derive(Debug)]
pub(crate) struct StreamGuard {
    metrics: Metrics,
    labels: StreamLabels,
    result: &'static str,
}

impl StreamGuard {
    pub(crate) fn set_result(&mut self, result: &'static str) {
        self.result = result;
    }

    /// Counts the bytes the stream moved each way.
    pub(crate) fn add_bytes(&self, to_upstream: u64, to_client: u64) {
        for (flow, n) in [("to_upstream", to_upstream), ("to_client", to_client)] {
            self.metrics
                .bytes
                .get_or_create(&BytesLabels {
                    direction: self.labels.direction,
                    source_cluster: self.labels.source_cluster.clone(),
                    destination_cluster: self.labels.destination_cluster.clone(),
                    flow,
                })
                .inc_by(n);
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics
            .streams_in_flight
            .get_or_create(&self.labels)
            .dec();
        self.metrics.in_flight_by_direction[direction_index(self.labels.direction)].dec();
        self.metrics
            .streams_closed
            .get_or_create(&StreamResultLabels {
                direction: self.labels.direction,
                source_cluster: self.labels.source_cluster.clone(),
                destination_cluster: self.labels.destination_cluster.clone(),
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

//! Prometheus metrics of the DNS server.
//!
//! Every counter handle is created once at registration and kept in fixed arrays, so the
//! per-packet cost is one relaxed atomic add: no label allocation, no map lookup. The
//! latency histogram is sampled on the fast path (1 in [`FAST_LATENCY_SAMPLE`]), because
//! reading the clock twice costs as much as the rest of a fast answer.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One fast-path answer in this many has its latency recorded.
pub const FAST_LATENCY_SAMPLE: u64 = 64;

/// Query type label (the common ones by name, the rest as `other`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum QType {
    A,
    AAAA,
    SRV,
    TXT,
    SOA,
    NS,
    ANY,
    Other,
}

const QTYPES: [QType; 8] = [
    QType::A,
    QType::AAAA,
    QType::SRV,
    QType::TXT,
    QType::SOA,
    QType::NS,
    QType::ANY,
    QType::Other,
];

impl QType {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::A,
            28 => Self::AAAA,
            33 => Self::SRV,
            16 => Self::TXT,
            6 => Self::SOA,
            2 => Self::NS,
            255 => Self::ANY,
            _ => Self::Other,
        }
    }
}

/// Response code label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(clippy::upper_case_acronyms)]
pub enum RCode {
    NOERROR,
    NXDOMAIN,
    REFUSED,
    FORMERR,
    SERVFAIL,
    NOTIMP,
    BADVERS,
    Other,
}

const RCODES: [RCode; 8] = [
    RCode::NOERROR,
    RCode::NXDOMAIN,
    RCode::REFUSED,
    RCode::FORMERR,
    RCode::SERVFAIL,
    RCode::NOTIMP,
    RCode::BADVERS,
    RCode::Other,
];

impl RCode {
    fn from_u16(v: u16) -> Self {
        match v {
            0 => Self::NOERROR,
            3 => Self::NXDOMAIN,
            5 => Self::REFUSED,
            1 => Self::FORMERR,
            2 => Self::SERVFAIL,
            4 => Self::NOTIMP,
            16 => Self::BADVERS,
            _ => Self::Other,
        }
    }
}

/// Which path answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Path {
    /// Precomputed wire answers over UDP.
    Fast,
    /// hickory's catalog over UDP.
    Slow,
    /// hickory's catalog over TCP.
    Tcp,
}

const PATHS: [Path; 3] = [Path::Fast, Path::Slow, Path::Tcp];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueryLabels {
    qtype: QType,
    rcode: RCode,
    path: Path,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PathLabels {
    path: Path,
}

/// The DNS server's metrics. Clone is cheap (shared atomics).
#[derive(Debug, Clone)]
pub struct Metrics {
    queries: Vec<Counter>,
    latency: Vec<Histogram>,
    truncated: Counter,
    refused: Counter,
    dropped: Counter,
    tcp_rejected: Counter,
    tcp_evicted: Counter,
    tcp_timed_out: Counter,
    table_rebuilds: Counter,
}

impl Metrics {
    /// Registers every metric under the `dns` prefix.
    pub fn register(registry: &mut Registry) -> Self {
        let registry = registry.sub_registry_with_prefix("dns");
        let queries_family = Family::<QueryLabels, Counter>::default();
        let latency_family = Family::<PathLabels, Histogram>::new_with_constructor(|| {
            // 1 µs .. ~16 ms
            Histogram::new(exponential_buckets(1e-6, 2.0, 15))
        });
        registry.register(
            "queries",
            "DNS queries answered, by query type, response code and path",
            queries_family.clone(),
        );
        registry.register(
            "response_seconds",
            "Time from packet received to response ready (fast path sampled)",
            latency_family.clone(),
        );
        let truncated = Counter::default();
        let refused = Counter::default();
        let dropped = Counter::default();
        let tcp_rejected = Counter::default();
        let tcp_evicted = Counter::default();
        let tcp_timed_out = Counter::default();
        let table_rebuilds = Counter::default();
        registry.register(
            "truncated",
            "UDP answers sent with TC=1 because they exceeded the client's buffer",
            truncated.clone(),
        );
        registry.register(
            "refused",
            "Queries refused because the name is outside the served zone",
            refused.clone(),
        );
        registry.register(
            "dropped",
            "Packets not answered: responses (QR=1), packets shorter than a header, overload",
            dropped.clone(),
        );
        registry.register(
            "tcp_rejected",
            "TCP connections closed at accept because max_tcp_connections was reached",
            tcp_rejected.clone(),
        );
        registry.register(
            "tcp_evicted",
            "TCP connections closed to make room for a new one at max_tcp_connections: the one waiting longest for a query",
            tcp_evicted.clone(),
        );
        registry.register(
            "tcp_timed_out",
            "TCP connections closed because no complete query arrived within tcp_idle_timeout",
            tcp_timed_out.clone(),
        );
        registry.register(
            "table_rebuilds",
            "Precomputed answer tables built after catalog changes",
            table_rebuilds.clone(),
        );
        let mut queries = Vec::with_capacity(PATHS.len() * QTYPES.len() * RCODES.len());
        for path in PATHS {
            for qtype in QTYPES {
                for rcode in RCODES {
                    queries.push(
                        queries_family
                            .get_or_create(&QueryLabels { qtype, rcode, path })
                            .clone(),
                    );
                }
            }
        }
        let latency = PATHS
            .iter()
            .map(|&path| latency_family.get_or_create(&PathLabels { path }).clone())
            .collect();
        Self {
            queries,
            latency,
            truncated,
            refused,
            dropped,
            tcp_rejected,
            tcp_evicted,
            tcp_timed_out,
            table_rebuilds,
        }
    }

    /// Counts one answered query.
    #[inline]
    pub(crate) fn query(&self, path: Path, qtype: u16, rcode: u16) {
        let p = PATHS.iter().position(|&x| x == path).unwrap_or(0);
        let t = QTYPES
            .iter()
            .position(|&x| x == QType::from_u16(qtype))
            .unwrap_or(QTYPES.len() - 1);
        let r = RCODES
            .iter()
            .position(|&x| x == RCode::from_u16(rcode))
            .unwrap_or(RCODES.len() - 1);
        if let Some(c) = self.queries.get((p * QTYPES.len() + t) * RCODES.len() + r) {
            c.inc();
        }
        if rcode == 5 {
            self.refused.inc();
        }
    }

    pub(crate) fn latency(&self, path: Path, seconds: f64) {
        let p = PATHS.iter().position(|&x| x == path).unwrap_or(0);
        if let Some(h) = self.latency.get(p) {
            h.observe(seconds);
        }
    }

    pub(crate) fn truncated(&self) {
        self.truncated.inc();
    }

    pub(crate) fn dropped(&self) {
        self.dropped.inc();
    }

    pub(crate) fn tcp_rejected(&self) {
        self.tcp_rejected.inc();
    }

    pub(crate) fn tcp_evicted(&self) {
        self.tcp_evicted.inc();
    }

    pub(crate) fn tcp_timed_out(&self) {
        self.tcp_timed_out.inc();
    }

    pub(crate) fn table_rebuilt(&self) {
        self.table_rebuilds.inc();
    }
}

/// Query type and response code of a response we built (for metrics), including the
/// extended rcode of an OPT (BADVERS). Returns (qtype, rcode, truncated).
pub(crate) fn classify_response(resp: &[u8]) -> (u16, u16, bool) {
    let Some(h) = resp.get(..12) else {
        return (0, 2, false);
    };
    let truncated = h[2] & 0x02 != 0;
    let mut rcode = u16::from(h[3] & 0x0f);
    let mut qtype = 0;
    // Walk the question to find the qtype, then look for an OPT at the very end (where we
    // and hickory put it) for the high rcode bits.
    if u16::from_be_bytes([h[4], h[5]]) >= 1 {
        let mut pos = 12;
        while let Some(&len) = resp.get(pos) {
            if len == 0 {
                pos += 1;
                break;
            }
            if len & 0xc0 != 0 {
                pos += 2;
                break;
            }
            pos += 1 + usize::from(len);
        }
        if let Some(t) = resp.get(pos..pos + 2) {
            qtype = u16::from_be_bytes([t[0], t[1]]);
        }
    }
    if u16::from_be_bytes([h[10], h[11]]) >= 1 && resp.len() >= 23 {
        let opt = &resp[resp.len() - 11..];
        if opt[0] == 0 && opt[1] == 0 && opt[2] == 41 {
            rcode |= u16::from(opt[5]) << 4;
        }
    }
    (qtype, rcode, truncated)
}

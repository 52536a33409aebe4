//! The fuzz harness for the query path, shared by the cargo-fuzz target
//! (`fuzz/dns/fuzz_targets/query_path.rs`) and the stable mutation test
//! (`dns/tests/fuzz_stable.rs`), so CI without nightly runs the same checks.
//!
//! For any bytes received over UDP it checks: nothing panics; a response (QR=1) is never
//! answered; every answer is a response with the query's ID; and no answer is larger than
//! the client's EDNS buffer (512 bytes without EDNS), which bounds amplification; and a
//! FORMERR the fast path sends is byte for byte the catalog path's.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, ResponseCode};
use hickory_server::net::xfer::Protocol;
use meshup_core::names::ClusterName;
use tokio::sync::watch;

use crate::answer::{ZoneSettings, ZoneView};
use crate::config::DnsConfig;
use crate::fixture::three_clusters;
use crate::handler::{ClustersetZone, Guarded, ViewSource};
use crate::wire::{Fast, FastTable, HEADER_LEN, MAX_PLAIN_UDP};

/// A zone (the three-cluster fixture, seen from `east`) with both answer paths.
pub struct QueryHarness {
    table: FastTable,
    guarded: Guarded,
    runtime: tokio::runtime::Runtime,
    out: Vec<u8>,
    // Keeps the snapshot channel open for the catalog path.
    _catalog: watch::Sender<Arc<meshup_core::catalog::Snapshot>>,
}

impl std::fmt::Debug for QueryHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryHarness").finish_non_exhaustive()
    }
}

impl QueryHarness {
    /// Builds the harness. Panics only on a broken fixture (a bug, not an input).
    #[allow(clippy::expect_used)]
    pub fn new() -> Self {
        let settings = Arc::new(
            ZoneSettings::from_config(&DnsConfig::default()).expect("default config is valid"),
        );
        let local = ClusterName::new("east").expect("literal cluster name is valid");
        let snapshot = Arc::new(three_clusters());
        let (tx, rx) = watch::channel(snapshot.clone());
        let view = ZoneView::new(settings.clone(), local.clone(), snapshot);
        let table = FastTable::build(&view).expect("fixture table encodes");
        let guarded = Guarded::new(ClustersetZone::new(ViewSource::new(settings, local, rx)));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime without drivers always builds");
        Self {
            table,
            guarded,
            runtime,
            out: Vec::with_capacity(4096),
            _catalog: tx,
        }
    }

    /// Runs one packet through the fast path and the catalog path; panics if an invariant
    /// is broken (that is the fuzzer's signal).
    pub fn check(&mut self, packet: &[u8]) {
        let src: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 5353));
        let limit = udp_limit(packet);
        let fast = self.table.answer(packet, &mut self.out);
        if let Fast::Answered { .. } = fast {
            check_answer(packet, &self.out, limit, "fast");
        }
        let slow = self
            .runtime
            .block_on(self.guarded.answer_bytes(packet, src, Protocol::Udp));
        if let Some(resp) = &slow {
            check_answer(packet, resp, limit, "catalog");
        }
        // The fast path's FORMERR stands for the catalog path's: it must be the very same.
        if let Fast::Answered {
            rcode: ResponseCode::FormErr,
            ..
        } = fast
        {
            assert_eq!(
                slow.as_deref(),
                Some(&self.out[..]),
                "fast FORMERR differs from the catalog's for {packet:02x?}"
            );
        }
        // Over TCP the size bound is the 16-bit length prefix; it must not panic either.
        let _ = self
            .runtime
            .block_on(self.guarded.answer_bytes(packet, src, Protocol::Tcp));
    }
}

impl Default for QueryHarness {
    fn default() -> Self {
        Self::new()
    }
}

/// The largest UDP answer allowed for this packet: the client's EDNS size (at least 512),
/// or 512 when the packet has no readable OPT.
fn udp_limit(packet: &[u8]) -> usize {
    Message::from_vec(packet)
        .ok()
        .and_then(|m| m.edns.map(|e| usize::from(e.max_payload())))
        .map_or(MAX_PLAIN_UDP, |p| p.max(MAX_PLAIN_UDP))
}

fn check_answer(query: &[u8], resp: &[u8], limit: usize, path: &str) {
    assert!(
        query.len() >= HEADER_LEN && query[2] & 0x80 == 0,
        "{path}: answered a packet that is a response or has no header: {query:02x?}"
    );
    assert!(
        resp.len() >= HEADER_LEN,
        "{path}: answer shorter than a header"
    );
    assert_eq!(resp[..2], query[..2], "{path}: answer ID differs");
    assert!(resp[2] & 0x80 != 0, "{path}: answer without QR");
    assert!(
        resp.len() <= limit,
        "{path}: {} byte answer over the {limit} byte limit for {query:02x?}",
        resp.len()
    );
}

/// Seed queries: every name form, with and without EDNS, in two spellings.
pub fn seed_corpus() -> Vec<Vec<u8>> {
    use hickory_proto::op::{Edns, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let names = [
        "pay.prod.svc.clusterset.local.",
        "PaY.PrOd.SvC.ClUsTeRsEt.LoCaL.",
        "_http._tcp.pay.prod.svc.clusterset.local.",
        "_tcp.pay.prod.svc.clusterset.local.",
        "pay.prod.svc.west.clusterset.local.",
        "west.pay.prod.svc.clusterset.local.",
        "dns-version.clusterset.local.",
        "clusterset.local.",
        "ns.dns.clusterset.local.",
        "prod.svc.clusterset.local.",
        "nothere.prod.svc.clusterset.local.",
        "example.com.",
    ];
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::SOA,
        RecordType::NS,
        RecordType::ANY,
        RecordType::AXFR,
    ];
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let Ok(name) = Name::from_ascii(name) else {
            continue;
        };
        for (j, qtype) in types.iter().enumerate() {
            for edns in [None, Some(512u16), Some(4096)] {
                let mut msg = Message::new((i * 31 + j) as u16, MessageType::Query, OpCode::Query);
                msg.metadata.recursion_desired = j % 2 == 0;
                msg.add_query(Query::query(name.clone(), *qtype));
                if let Some(size) = edns {
                    let mut e = Edns::new();
                    e.set_max_payload(size);
                    msg.set_edns(e);
                }
                if let Ok(bytes) = msg.to_vec() {
                    out.push(bytes);
                }
            }
        }
    }
    out
}

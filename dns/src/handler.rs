//! The slow path: hickory's `Catalog` with meshup's [`ClustersetZone`] as its `ZoneHandler`.
//!
//! Used for TCP and for every UDP query the fast path declines (truncation, unusual flags,
//! EDNS versions, out-of-zone names, malformed packets). The zone handler answers from the
//! *latest* snapshot through the same pure [`resolve`] the fast table is built from.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hickory_proto::op::{MessageType, ResponseCode};
use hickory_proto::rr::{LowerName, RecordType};
use hickory_proto::serialize::binary::BinEncoder;
use hickory_server::net::NetError;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::rr::Record;
use hickory_server::server::{Request, RequestHandler, RequestInfo, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, Catalog, LookupControlFlow, LookupError, LookupOptions, LookupRecords,
    MessageResponse, ZoneHandler, ZoneType,
};
use meshup_core::catalog::Snapshot;
use meshup_core::names::ClusterName;
use tokio::sync::watch;

use crate::answer::{Answer, ZoneSettings, ZoneView, resolve, soa_record};
use crate::wire::{HEADER_LEN, MAX_PLAIN_UDP, formerr};

/// The clusterset zone as a hickory `ZoneHandler`.
#[derive(Debug)]
pub struct ClustersetZone {
    origin: LowerName,
    views: ViewSource,
}

/// Hands out a [`ZoneView`] of the latest snapshot, reusing it while the snapshot is the same.
#[derive(Debug)]
pub(crate) struct ViewSource {
    settings: Arc<ZoneSettings>,
    local: ClusterName,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    cached: Mutex<Option<Arc<ZoneView>>>,
}

impl ViewSource {
    pub(crate) fn new(
        settings: Arc<ZoneSettings>,
        local: ClusterName,
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        Self {
            settings,
            local,
            snapshots,
            cached: Mutex::new(None),
        }
    }

    /// The view of the newest snapshot (slow path only: takes the watch's read lock).
    pub(crate) fn current(&self) -> Arc<ZoneView> {
        let snapshot = self.snapshots.borrow().clone();
        // A poisoned cache only means another thread panicked mid-update; the value is a
        // plain Option and still usable.
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(view) = cached.as_ref()
            && Arc::ptr_eq(&view.snapshot, &snapshot)
        {
            return view.clone();
        }
        let view = Arc::new(ZoneView::new(
            self.settings.clone(),
            self.local.clone(),
            snapshot,
        ));
        *cached = Some(view.clone());
        view
    }
}

impl ClustersetZone {
    pub(crate) fn new(views: ViewSource) -> Self {
        Self {
            origin: LowerName::new(&views.settings.origin),
            views,
        }
    }

    fn lookup_answer(&self, answer: Answer) -> LookupControlFlow<AuthLookup> {
        if answer.rcode == ResponseCode::NXDomain {
            return LookupControlFlow::Break(Err(LookupError::ResponseCode(
                ResponseCode::NXDomain,
            )));
        }
        if answer.rcode != ResponseCode::NoError {
            return LookupControlFlow::Break(Err(LookupError::ResponseCode(answer.rcode)));
        }
        if answer.answers.is_empty() {
            // NODATA: the catalog adds the SOA (via `lookup(origin, SOA)`) itself.
            return LookupControlFlow::Break(Err(LookupError::NameExists));
        }
        let additionals =
            (!answer.additionals.is_empty()).then_some(LookupRecords::Section(answer.additionals));
        // `answer.authorities` is not passed on: for the one positive answer that has any (the
        // NS set next to a SOA), the catalog adds it itself through `lookup(origin, NS)`.
        LookupControlFlow::Break(Ok(AuthLookup::answers(
            LookupRecords::Section(answer.answers),
            additionals,
        )))
    }
}

#[async_trait::async_trait]
impl ZoneHandler for ClustersetZone {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        // The zone is derived from the catalog; other gateways read the catalog, not us.
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    /// Called by the catalog for the records it adds around an answer: the SOA of negative
    /// answers (negative TTL, RFC 2308) and the NS set that accompanies a SOA answer.
    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        let view = self.views.current();
        let settings = &view.settings;
        if *name == self.origin && rtype == RecordType::SOA {
            let soa = soa_record(settings, 0, settings.negative_ttl);
            return LookupControlFlow::Break(Ok(AuthLookup::answers(
                LookupRecords::Section(vec![soa]),
                None,
            )));
        }
        self.lookup_answer(resolve(&view, &name.into(), rtype))
    }

    async fn search(
        &self,
        request: &Request,
        _lookup_options: LookupOptions,
    ) -> (
        LookupControlFlow<AuthLookup>,
        Option<hickory_proto::rr::TSigResponseContext>,
    ) {
        let info = match request.request_info() {
            Ok(info) => info,
            Err(e) => return (LookupControlFlow::Break(Err(e)), None),
        };
        let view = self.views.current();
        let answer = resolve(&view, &info.query.name().into(), info.query.query_type());
        (self.lookup_answer(answer), None)
    }

    async fn nsec_records(
        &self,
        _name: &LowerName,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Break(Ok(AuthLookup::default()))
    }
}

/// The request handler given to the slow path: drops responses (QR=1) instead of answering
/// them (hickory's catalog would answer FORMERR, which lets two servers loop), then defers
/// to the catalog.
pub struct Guarded {
    catalog: Catalog,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded").finish_non_exhaustive()
    }
}

impl Guarded {
    pub(crate) fn new(zone: ClustersetZone) -> Self {
        let mut catalog = Catalog::new();
        let origin = zone.origin.clone();
        catalog.upsert(origin, vec![Arc::new(zone)]);
        Self { catalog }
    }

    /// Answers one raw query; `None` means send nothing. Never panics on any input.
    pub async fn answer_bytes(
        &self,
        raw: &[u8],
        src: SocketAddr,
        protocol: Protocol,
    ) -> Option<Vec<u8>> {
        let header = raw.get(..HEADER_LEN)?;
        if header[2] & 0x80 != 0 {
            return None;
        }
        let request = match Request::from_bytes(raw.to_vec(), src, protocol) {
            Ok(request) => request,
            Err(_) => {
                let mut out = Vec::with_capacity(HEADER_LEN);
                formerr(header, &mut out);
                return Some(out);
            }
        };
        let capture = Capture {
            protocol,
            out: Arc::new(Mutex::new(None)),
        };
        self.handle_request::<Capture, TokioTime>(&request, capture.clone())
            .await;
        capture.out.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[async_trait::async_trait]
impl RequestHandler for Guarded {
    async fn handle_request<R: ResponseHandler, T: hickory_server::net::runtime::Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        if request.metadata.message_type == MessageType::Response {
            return ResponseInfo::from(hickory_proto::op::Header {
                metadata: hickory_proto::op::Metadata::response_from_request(&request.metadata),
                counts: hickory_proto::op::HeaderCounts::default(),
            });
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A `ResponseHandler` that keeps the encoded response for the caller to send.
#[derive(Clone)]
struct Capture {
    protocol: Protocol,
    out: Arc<Mutex<Option<Vec<u8>>>>,
}

#[async_trait::async_trait]
impl ResponseHandler for Capture {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Same size rule as hickory's own UDP handler: the client's EDNS size (the catalog
        // echoes max(client, 512)), 512 without EDNS, no limit over TCP.
        let max = match self.protocol {
            Protocol::Udp => response
                .edns()
                .map_or(MAX_PLAIN_UDP as u16, |e| e.max_payload()),
            _ => u16::MAX,
        };
        let mut bytes = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(max);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(NetError::from)?;
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
        Ok(info)
    }
}

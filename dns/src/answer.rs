//! Pure answer synthesis: (zone view, query name, query type) → answer records and rcode.
//!
//! Nothing here touches a socket or a clock. The hickory `ZoneHandler` (slow path) and the
//! precomputed wire table (fast path) are both built from [`resolve`], so they cannot
//! disagree about what exists.
//!
//! Names served (Kubernetes Multi-Cluster Services DNS specification v1.0.0):
//!
//! | name (relative to the zone)          | records                                     |
//! | ------------------------------------ | ------------------------------------------- |
//! | apex                                 | SOA, NS (+ glue for an in-zone NS host)     |
//! | `dns-version`                        | TXT `"1.0.0"`                               |
//! | `<svc>.<ns>.svc`                     | A or AAAA: this cluster's VIP for the service |
//! | `_<port>._<proto>.<svc>.<ns>.svc`    | SRV 10 100 `<port>` `<svc>.<ns>.svc.<zone>` (+ A/AAAA additional) |
//! | `<svc>.<ns>.svc.<cluster>`           | A or AAAA: the VIP pinned to `<cluster>`    |
//! | `svc`, `<ns>.svc`, `_<proto>.<svc>.<ns>.svc`, `<cluster>`, `svc.<cluster>`, `<ns>.svc.<cluster>` | empty non-terminals (NODATA) |
//!
//! A service in the catalog without a VIP for this cluster yet answers NODATA (NOERROR, no
//! records, SOA in authority, short negative TTL): the name exists, the client caches the
//! absence only for the negative TTL and retries, whereas SERVFAIL makes many stub resolvers
//! try every search domain and server and then fail hard. The reserved form
//! `<cluster>.<svc>.<ns>.svc` does not exist (NXDOMAIN).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::{A, AAAA, NS, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use meshup_core::catalog::{ServiceView, Snapshot};
use meshup_core::names::{ClusterName, Namespace, ServiceKey};

use crate::config::{ConfigError, DnsConfig, secs_u32};

/// The version TXT the MCS DNS specification asks for.
pub const SCHEMA_VERSION_TXT: &str = "1.0.0";
/// SRV priority for a ClusterSetIP service (the specification's example, `SRV 10 100 ...`).
pub const SRV_PRIORITY: u16 = 10;
/// SRV weight for a ClusterSetIP service: one target, so the value only has to be non-zero.
pub const SRV_WEIGHT: u16 = 100;

/// Static zone settings, derived once from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZoneSettings {
    /// Zone apex, lowercase and fully qualified.
    pub origin: Name,
    /// TTL of positive answers, seconds.
    pub ttl: u32,
    /// TTL of the SOA record when asked for, seconds.
    pub soa_ttl: u32,
    /// TTL of the SOA in negative answers: min(SOA TTL, SOA MINIMUM) (RFC 2308 §3).
    pub negative_ttl: u32,
    /// SOA MINIMUM field.
    pub soa_minimum: u32,
    pub soa_refresh: i32,
    pub soa_retry: i32,
    pub soa_expire: i32,
    pub ns_host: Name,
    pub rname: Name,
    /// Address answered for `ns_host` when it lies inside the zone.
    pub ns_glue: Option<IpAddr>,
}

impl ZoneSettings {
    /// Derives the settings from a config (validates it first).
    pub fn from_config(cfg: &DnsConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let as_i32 = |d| i32::try_from(secs_u32(d)).unwrap_or(i32::MAX);
        let soa_ttl = secs_u32(cfg.soa_ttl);
        let soa_minimum = secs_u32(cfg.negative_ttl);
        Ok(Self {
            origin: cfg.zone_name()?,
            ttl: secs_u32(cfg.ttl),
            soa_ttl,
            negative_ttl: soa_ttl.min(soa_minimum),
            soa_minimum,
            soa_refresh: as_i32(cfg.soa_refresh),
            soa_retry: as_i32(cfg.soa_retry),
            soa_expire: as_i32(cfg.soa_expire),
            ns_host: cfg.ns_host()?,
            rname: cfg.rname()?,
            ns_glue: cfg.ns_glue(),
        })
    }
}

/// Everything an answer depends on: settings, this gateway's cluster and one snapshot.
#[derive(Debug)]
pub struct ZoneView {
    pub settings: Arc<ZoneSettings>,
    pub local: ClusterName,
    pub snapshot: Arc<Snapshot>,
}

impl ZoneView {
    /// A view of one snapshot.
    pub fn new(settings: Arc<ZoneSettings>, local: ClusterName, snapshot: Arc<Snapshot>) -> Self {
        Self {
            settings,
            local,
            snapshot,
        }
    }

    /// Whether `cluster` exports anything (in namespace `ns`): the cluster-pinned empty
    /// non-terminals. A lookup in the snapshot's index, whatever the catalog's size.
    fn cluster_exports(&self, cluster: &str, ns: Option<&str>) -> bool {
        let Ok(cluster) = ClusterName::new(cluster) else {
            return false;
        };
        match ns.map(Namespace::new) {
            None => self.snapshot.cluster_exports(&cluster, None),
            Some(Ok(ns)) => self.snapshot.cluster_exports(&cluster, Some(&ns)),
            Some(Err(_)) => false,
        }
    }

    /// Whether any service lives in namespace `ns` (O(log n): keys sort by namespace first).
    fn namespace_exists(&self, ns: &str) -> bool {
        let Ok(first) = ServiceKey::parse(ns, "a") else {
            return false;
        };
        self.snapshot
            .service_map()
            .range(first..)
            .next()
            .is_some_and(|(k, _)| k.namespace.as_str() == ns)
    }
}

/// The result of one lookup, in the layout of the response message.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub rcode: ResponseCode,
    /// AA: set for every answer from inside the zone, clear for REFUSED.
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Self {
            rcode: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            authorities: vec![],
            additionals: vec![],
        }
    }

    /// NOERROR with nothing in the answer section.
    pub fn is_nodata(&self) -> bool {
        self.rcode == ResponseCode::NoError && self.answers.is_empty()
    }
}

/// What a name inside the zone is.
#[derive(Debug, Clone, PartialEq)]
enum Node {
    Apex,
    Version,
    NsHost,
    /// Exists only because names exist below it.
    EmptyNonTerminal,
    Service {
        view: Arc<ServiceView>,
        pinned: Option<ClusterName>,
    },
    Srv {
        view: Arc<ServiceView>,
        port: u16,
    },
}

/// Answers one question. `qname` may be in any case; records carry lowercase owner names
/// (the question section, echoed by the server, keeps the client's case).
pub fn resolve(zone: &ZoneView, qname: &Name, qtype: RecordType) -> Answer {
    let settings = &*zone.settings;
    let mut name = qname.to_lowercase();
    name.set_fqdn(true);
    if !settings.origin.zone_of(&name) {
        return Answer::refused();
    }
    let Some(node) = classify(zone, &name) else {
        return negative(settings, ResponseCode::NXDomain);
    };
    let ttl = settings.ttl;
    let mut answer = Answer {
        rcode: ResponseCode::NoError,
        authoritative: true,
        answers: vec![],
        authorities: vec![],
        additionals: vec![],
    };
    let any = qtype == RecordType::ANY;
    match node {
        Node::Apex => match qtype {
            RecordType::SOA => {
                answer.answers.push(soa_record(
                    settings,
                    zone.snapshot.revision,
                    settings.soa_ttl,
                ));
                // Like hickory's catalog: a SOA answer carries the NS set in authority.
                answer.authorities.push(ns_record(settings));
                answer.additionals.extend(glue(settings));
            }
            RecordType::NS => {
                answer.answers.push(ns_record(settings));
                answer.additionals.extend(glue(settings));
            }
            // RFC 8482: one RRset is a complete answer to ANY.
            RecordType::ANY => {
                answer.answers.push(soa_record(
                    settings,
                    zone.snapshot.revision,
                    settings.soa_ttl,
                ));
            }
            _ => {}
        },
        Node::Version => {
            if qtype == RecordType::TXT || any {
                answer.answers.push(Record::from_rdata(
                    name,
                    ttl,
                    RData::TXT(TXT::new(vec![SCHEMA_VERSION_TXT.to_owned()])),
                ));
            }
        }
        Node::NsHost => {
            if let Some(ip) = settings.ns_glue
                && wants_address(qtype, ip)
            {
                answer.answers.push(address_record(name, ttl, ip));
            }
        }
        Node::EmptyNonTerminal => {}
        Node::Service { view, pinned } => {
            if let Some(ip) = zone.snapshot.vip(&zone.local, &view.key, pinned.as_ref())
                && wants_address(qtype, ip)
            {
                answer.answers.push(address_record(name, ttl, ip));
            }
        }
        Node::Srv { view, port } => {
            if qtype == RecordType::SRV || any {
                let target = service_name(settings, &view.key, None);
                if let Some(target) = target {
                    answer.answers.push(Record::from_rdata(
                        name,
                        ttl,
                        RData::SRV(SRV::new(SRV_PRIORITY, SRV_WEIGHT, port, target.clone())),
                    ));
                    if let Some(ip) = zone.snapshot.vip(&zone.local, &view.key, None) {
                        answer.additionals.push(address_record(target, ttl, ip));
                    }
                }
            }
        }
    }
    if answer.answers.is_empty() {
        return negative(settings, ResponseCode::NoError);
    }
    answer
}

/// NXDOMAIN or NODATA: no answer, the SOA in authority with the negative TTL.
fn negative(settings: &ZoneSettings, rcode: ResponseCode) -> Answer {
    Answer {
        rcode,
        authoritative: true,
        answers: vec![],
        // The serial in a negative answer does not matter to caches; 0 keeps the negative
        // templates independent of the catalog revision.
        authorities: vec![soa_record(settings, 0, settings.negative_ttl)],
        additionals: vec![],
    }
}

/// The SOA record; the serial is the catalog revision (modulo 2^32, serial arithmetic).
pub fn soa_record(settings: &ZoneSettings, revision: i64, ttl: u32) -> Record {
    Record::from_rdata(
        settings.origin.clone(),
        ttl,
        RData::SOA(SOA::new(
            settings.ns_host.clone(),
            settings.rname.clone(),
            revision as u32,
            settings.soa_refresh,
            settings.soa_retry,
            settings.soa_expire,
            settings.soa_minimum,
        )),
    )
}

/// The apex NS record.
pub fn ns_record(settings: &ZoneSettings) -> Record {
    Record::from_rdata(
        settings.origin.clone(),
        settings.soa_ttl,
        RData::NS(NS(settings.ns_host.clone())),
    )
}

/// Glue for an in-zone NS host.
fn glue(settings: &ZoneSettings) -> Option<Record> {
    let ip = settings.ns_glue?;
    settings
        .origin
        .zone_of(&settings.ns_host)
        .then(|| address_record(settings.ns_host.clone(), settings.soa_ttl, ip))
}

fn wants_address(qtype: RecordType, ip: IpAddr) -> bool {
    matches!(
        (qtype, ip),
        (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_)) | (RecordType::ANY, _)
    )
}

fn address_record(name: Name, ttl: u32, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, ttl, rdata)
}

/// `<svc>.<ns>.svc[.<cluster>].<zone>`.
pub fn service_name(
    settings: &ZoneSettings,
    key: &ServiceKey,
    pinned: Option<&ClusterName>,
) -> Option<Name> {
    let mut labels: Vec<&str> = vec![key.name.as_str(), key.namespace.as_str(), "svc"];
    if let Some(cluster) = pinned {
        labels.push(cluster.as_str());
    }
    relative_name(settings, &labels)
}

/// A name from labels (leftmost first) under the zone apex.
pub fn relative_name(settings: &ZoneSettings, labels: &[&str]) -> Option<Name> {
    let rel = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
    rel.append_domain(&settings.origin).ok()
}

/// Finds what `name` (lowercase, inside the zone) is; `None` when it does not exist.
fn classify(zone: &ZoneView, name: &Name) -> Option<Node> {
    let settings = &*zone.settings;
    let depth = usize::from(name.num_labels() - settings.origin.num_labels());
    let mut labels: Vec<&str> = Vec::with_capacity(depth);
    for label in name.iter().take(depth) {
        // Every name we serve is ASCII; anything else does not exist.
        labels.push(std::str::from_utf8(label).ok()?);
    }
    if labels.is_empty() {
        return Some(Node::Apex);
    }
    if *name == settings.ns_host && settings.ns_glue.is_some() {
        return Some(Node::NsHost);
    }
    if name.zone_of(&settings.ns_host) && settings.ns_glue.is_some() {
        return Some(Node::EmptyNonTerminal);
    }
    let snapshot = &*zone.snapshot;
    let service = |ns: &str, svc: &str| {
        let key = ServiceKey::parse(ns, svc).ok()?;
        snapshot.service(&key).cloned()
    };
    let ent = || Some(Node::EmptyNonTerminal);
    match labels.as_slice() {
        ["dns-version"] => Some(Node::Version),
        ["svc"] if snapshot.service_count() > 0 => ent(),
        [ns, "svc"] if zone.namespace_exists(ns) => ent(),
        [svc, ns, "svc"] => service(ns, svc).map(|view| Node::Service { view, pinned: None }),
        [proto, svc, ns, "svc"] if proto.starts_with('_') => {
            let view = service(ns, svc)?;
            let proto = &proto[1..];
            view.ports
                .iter()
                .any(|p| p.protocol.as_str() == proto)
                .then_some(Node::EmptyNonTerminal)
        }
        [port, proto, svc, ns, "svc"] if port.starts_with('_') && proto.starts_with('_') => {
            let view = service(ns, svc)?;
            let found = view
                .port(&port[1..])
                .filter(|p| p.protocol.as_str() == &proto[1..])?;
            let port = found.port;
            Some(Node::Srv { view, port })
        }
        [cluster] | ["svc", cluster] if zone.cluster_exports(cluster, None) => ent(),
        [ns, "svc", cluster] if zone.cluster_exports(cluster, Some(ns)) => ent(),
        [svc, ns, "svc", cluster] => {
            let view = service(ns, svc)?;
            let pinned = ClusterName::new(cluster).ok()?;
            view.clusters
                .contains_key(&pinned)
                .then_some(Node::Service {
                    view,
                    pinned: Some(pinned),
                })
        }
        _ => None,
    }
}

/// Every name that exists in the zone (lowercase), for precomputing answers. Names are
/// unique; the order is stable for a given snapshot.
pub fn existing_names(zone: &ZoneView) -> Vec<Name> {
    let settings = &*zone.settings;
    let mut names: BTreeSet<Name> = zone_names(settings).into_iter().collect();
    for view in zone.snapshot.services() {
        names.extend(service_names(settings, view));
    }
    names.into_iter().collect()
}

/// The names the fast table holds (lowercase, unique): every name that exists but the
/// cluster-pinned names without an address of this cluster, which answer NODATA to every
/// type and which the table's miss path tells from nonexistent names by a lookup in the
/// snapshot (`wire`, "Pinned names"). At 100 clusters, those are 100 names per service.
///
/// The pinned empty non-terminals (`<cluster>`, `svc.<cluster>`, `<ns>.svc.<cluster>`)
/// come from the exporting index, once per (cluster, namespace) rather than once per
/// service.
pub fn table_names(zone: &ZoneView) -> Vec<Name> {
    let settings = &*zone.settings;
    let snapshot = &*zone.snapshot;
    let mut names: BTreeSet<Name> = zone_names(settings).into_iter().collect();
    for view in snapshot.services() {
        names.extend(service_base_names(settings, view));
    }
    for (key, _) in snapshot.vips_of(&zone.local) {
        let Some(target) = &key.target else {
            continue;
        };
        if snapshot
            .service(&key.service)
            .is_some_and(|view| view.clusters.contains_key(target))
        {
            names.extend(service_name(settings, &key.service, Some(target)));
        }
    }
    for (cluster, ns) in snapshot.exporting_pairs() {
        names.extend(pinned_empty_names(settings, cluster, ns));
    }
    names.into_iter().collect()
}

/// The empty non-terminals above the pinned names of `cluster`'s services in `ns`, which
/// exist while the cluster exports any service of the namespace.
pub fn pinned_empty_names(
    settings: &ZoneSettings,
    cluster: &ClusterName,
    ns: &Namespace,
) -> impl Iterator<Item = Name> {
    let (c, ns) = (cluster.as_str(), ns.as_str());
    [&[c][..], &["svc", c][..], &[ns, "svc", c][..]]
        .into_iter()
        .filter_map(|labels| relative_name(settings, labels))
        .collect::<Vec<_>>()
        .into_iter()
}

/// Names that exist whatever the catalog holds: the apex, `dns-version`, and the NS host
/// with the empty non-terminals between it and the apex (when it is in the zone and has an
/// address).
pub fn zone_names(settings: &ZoneSettings) -> Vec<Name> {
    let mut out: Vec<Name> = [&[][..], &["dns-version"][..]]
        .iter()
        .filter_map(|labels| relative_name(settings, labels))
        .collect();
    if settings.ns_glue.is_some() && settings.origin.zone_of(&settings.ns_host) {
        let mut host = settings.ns_host.clone();
        while host.num_labels() > settings.origin.num_labels() {
            out.push(host.clone());
            host = host.base_name();
        }
    }
    out
}

/// The names one service makes exist, including the empty non-terminals above them
/// (which other services may share).
pub fn service_names(settings: &ZoneSettings, view: &ServiceView) -> Vec<Name> {
    let mut names = service_base_names(settings, view);
    for cluster in view.clusters.keys() {
        names.extend(pinned_names(settings, &view.key, cluster));
    }
    names
}

/// The names of a service that do not name a cluster: what its ports and its clusterset
/// VIP answer, and the empty non-terminals above them.
pub fn service_base_names(settings: &ZoneSettings, view: &ServiceView) -> Vec<Name> {
    let (svc, ns) = (view.key.name.as_str(), view.key.namespace.as_str());
    let mut rel: Vec<Vec<&str>> = vec![vec!["svc"], vec![ns, "svc"], vec![svc, ns, "svc"]];
    let protos: Vec<String> = view
        .ports
        .iter()
        .map(|p| format!("_{}", p.protocol.as_str()))
        .collect();
    let port_names: Vec<String> = view.ports.iter().map(|p| format!("_{}", p.name)).collect();
    for (proto, port) in protos.iter().zip(&port_names) {
        rel.push(vec![proto, svc, ns, "svc"]);
        rel.push(vec![port, proto, svc, ns, "svc"]);
    }
    rel.iter()
        .filter_map(|labels| relative_name(settings, labels))
        .collect()
}

/// The names exporting `cluster` gives a service: its cluster-pinned name and the empty
/// non-terminals above it (shared with the cluster's other services).
pub fn pinned_names(settings: &ZoneSettings, key: &ServiceKey, cluster: &ClusterName) -> Vec<Name> {
    let (svc, ns, c) = (key.name.as_str(), key.namespace.as_str(), cluster.as_str());
    [
        &[c][..],
        &["svc", c][..],
        &[ns, "svc", c][..],
        &[svc, ns, "svc", c][..],
    ]
    .iter()
    .filter_map(|labels| relative_name(settings, labels))
    .collect()
}

#[cfg(test)]
mod tests;

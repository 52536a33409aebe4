//! The records a gateway publishes to the catalog, as JSON with a schema version.
//!
//! Records evolve while gateways of two versions run side by side (a rolling upgrade), so
//! their decoding is forward-compatible (docs/records.md): `schema` is the major version and
//! a reader accepts every record of its major version, whatever its `schema_minor`, ignoring
//! fields it does not know. A writer adds fields under a new minor; only a change an older
//! reader would misread takes a new major, and only records of an unknown major are skipped.
//! Config files, written by people, stay strict instead (unknown fields rejected).
//!
//! Every record is decoded and then validated; a record that fails either is skipped by the
//! catalog reducer (never a crash, never poisoning the rest). Validation is pure so it is
//! table-tested here and fuzzed with the rest of the catalog decoding.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::{GatewayIdentity, SpiffeId};
use crate::names::{ClusterName, GatewayId, NameError, check_port_name};

/// The schema major version this build writes and reads (the `schema` field). Records of
/// this major are read whatever their minor (`schema_minor`, absent means 0).
pub const SCHEMA_VERSION: u32 = 1;
/// Largest catalog value a gateway accepts, in bytes; larger ones are skipped unread.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most ports one export may declare.
pub const MAX_PORTS: usize = 64;
/// Most addresses one gateway may advertise.
pub const MAX_GATEWAY_ADDRS: usize = 8;
/// Most labels on one export, and the longest label key or value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_TEXT: usize = 253;
/// Most caller clusters one export may list.
pub const MAX_ALLOWED_CALLERS: usize = 256;
/// Longest region or zone name.
pub const MAX_LOCALITY_LEN: usize = 128;

/// Why a record was rejected. Each variant says what to fix in the publishing gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("value is {len} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("value is not valid JSON for this record: {0}")]
    Decode(String),
    #[error(
        "schema version {found} is not supported (this gateway reads version {SCHEMA_VERSION})"
    )]
    UnsupportedSchema { found: u32 },
    #[error("port {port} of {name:?} is not a valid port (1-65535)")]
    BadPort { name: String, port: u16 },
    #[error("port name is invalid: {0}")]
    BadPortName(NameError),
    #[error("port {name:?}: app_protocol {app_protocol} needs protocol tcp")]
    AppProtocolNeedsTcp {
        name: String,
        app_protocol: &'static str,
    },
    #[error("port name {0:?} is declared twice")]
    DuplicatePort(String),
    #[error("{what}: {count} entries, more than the limit of {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("endpoint counts are inconsistent: {healthy} healthy of {total} total")]
    BadEndpointCounts { healthy: u32, total: u32 },
    #[error(
        "address {0} is not routable between clusters (unspecified, multicast, link-local, or loopback where loopback is not allowed)"
    )]
    UnroutableAddress(IpAddr),
    #[error("address {0} has port 0")]
    ZeroPort(SocketAddr),
    #[error("record is for {found}, but its key names {expected}")]
    WrongOwner { expected: String, found: String },
    #[error("identity {0:?} is not a gateway SPIFFE ID of that cluster")]
    BadIdentity(String),
    #[error("{what} is longer than {max} characters")]
    TextTooLong { what: &'static str, max: usize },
}

/// Which addresses a federation accepts in records. Loopback addresses only make sense when
/// every gateway runs on one machine (the demo, tests); elsewhere a loopback address in the
/// catalog would make peers dial themselves, so it is rejected unless allowed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddressRules {
    pub allow_loopback: bool,
}

impl AddressRules {
    /// Rules for a federation whose gateways all run on one host.
    pub const LOOPBACK: Self = Self {
        allow_loopback: true,
    };

    /// Checks that `addr` could be reached from another cluster.
    pub fn check_ip(&self, addr: IpAddr) -> Result<(), RecordError> {
        let unroutable = addr.is_unspecified()
            || addr.is_multicast()
            || (addr.is_loopback() && !self.allow_loopback)
            || match addr {
                IpAddr::V4(v4) => v4.is_link_local() || v4.is_broadcast(),
                IpAddr::V6(v6) => v6.is_unicast_link_local(),
            };
        if unroutable {
            Err(RecordError::UnroutableAddress(addr))
        } else {
            Ok(())
        }
    }

    /// Checks a socket address: a routable IP and a non-zero port.
    pub fn check_socket(&self, addr: SocketAddr) -> Result<(), RecordError> {
        self.check_ip(addr.ip())?;
        if addr.port() == 0 {
            return Err(RecordError::ZeroPort(addr));
        }
        Ok(())
    }
}

/// A transport protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The lowercase name used in SRV names (`_http._tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// What a TCP port carries, as far as the gateways care (Kubernetes' `appProtocol`): `tcp`
/// bytes are spliced, one decision per connection; `http` (HTTP/1.1, or h2c with prior
/// knowledge) and `grpc` are routed per request (docs/http-routing.md).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    #[default]
    Tcp,
    Http,
    Grpc,
    /// A value only a newer gateway knows: its port is served as `tcp`, which every peer can
    /// serve (the record is read, not skipped: docs/records.md).
    #[serde(other)]
    Unknown,
}

impl AppProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            AppProtocol::Tcp => "tcp",
            AppProtocol::Http => "http",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Unknown => "unknown",
        }
    }

    /// Whether requests on the port are routed one by one (`http`, `grpc`).
    pub fn per_request(self) -> bool {
        matches!(self, AppProtocol::Http | AppProtocol::Grpc)
    }

    fn is_tcp(&self) -> bool {
        *self == AppProtocol::Tcp
    }
}

/// What an `http` port's endpoints speak (docs/http-routing.md, "What the endpoints
/// speak"): by default each request reaches them as its client spoke it (HTTP/1.1, or h2
/// for an h2 client); `http1` is for endpoints that speak only HTTP/1.1, as an nginx or
/// Envoy upstream does by default: every request reaches them as HTTP/1.1.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EndpointProtocol {
    #[default]
    AsClient,
    Http1,
    /// A value only a newer gateway knows: read as `as_client` (the record is read, not
    /// skipped: docs/records.md). Only the serving gateway acts on the field, and it is
    /// the one that wrote it.
    #[serde(other)]
    Unknown,
}

impl EndpointProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointProtocol::AsClient => "as_client",
            EndpointProtocol::Http1 => "http1",
            EndpointProtocol::Unknown => "unknown",
        }
    }

    /// Whether every request reaches the endpoints as HTTP/1.1.
    pub fn http1_only(self) -> bool {
        self == EndpointProtocol::Http1
    }

    fn is_as_client(&self) -> bool {
        *self == EndpointProtocol::AsClient
    }
}

/// One named port of a service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Left out when `tcp`, so a record of a `tcp` port is the same bytes older gateways
    /// wrote; an older gateway reading `http` or `grpc` ignores the field and splices.
    #[serde(default, skip_serializing_if = "AppProtocol::is_tcp")]
    pub app_protocol: AppProtocol,
    /// Left out when `as_client`, so records of ports that do not set it are the bytes
    /// older gateways wrote; an older gateway ignores the field.
    #[serde(default, skip_serializing_if = "EndpointProtocol::is_as_client")]
    pub endpoint_protocol: EndpointProtocol,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

impl PortSpec {
    /// Checks the name and the number.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_port_name(&self.name).map_err(RecordError::BadPortName)?;
        if self.port == 0 {
            return Err(RecordError::BadPort {
                name: self.name.clone(),
                port: self.port,
            });
        }
        if self.app_protocol.per_request() && self.protocol != Protocol::Tcp {
            return Err(RecordError::AppProtocolNeedsTcp {
                name: self.name.clone(),
                app_protocol: self.app_protocol.as_str(),
            });
        }
        Ok(())
    }
}

/// Checks a list of ports: each valid, names unique, not too many.
pub fn validate_ports(ports: &[PortSpec]) -> Result<(), RecordError> {
    check_count("ports", ports.len(), MAX_PORTS)?;
    let mut seen = std::collections::BTreeSet::new();
    for p in ports {
        p.validate()?;
        if !seen.insert(p.name.as_str()) {
            return Err(RecordError::DuplicatePort(p.name.clone()));
        }
    }
    Ok(())
}

/// Checks an export's labels: at most [`MAX_LABELS`], each key and value at most
/// [`MAX_LABEL_TEXT`] bytes. The config file and the admin API hold exports to it before
/// publishing, so a record is never skipped by its readers for its labels.
pub fn validate_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), RecordError> {
    check_count("labels", labels.len(), MAX_LABELS)?;
    for (k, v) in labels {
        check_text("label key", k, MAX_LABEL_TEXT)?;
        check_text("label value", v, MAX_LABEL_TEXT)?;
    }
    Ok(())
}

/// Checks the number of caller clusters an export lists (at most [`MAX_ALLOWED_CALLERS`]).
pub fn validate_allowed_callers(count: usize) -> Result<(), RecordError> {
    check_count("allowed_callers", count, MAX_ALLOWED_CALLERS)
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), RecordError> {
    if count > max {
        Err(RecordError::TooMany { what, count, max })
    } else {
        Ok(())
    }
}

fn check_text(what: &'static str, text: &str, max: usize) -> Result<(), RecordError> {
    if text.len() > max {
        Err(RecordError::TextTooLong { what, max })
    } else {
        Ok(())
    }
}

/// A gateway's own record: where peers reach it and who it is.
/// Key: `<prefix>/v1/clusters/<cluster>/gateways/<gateway-id>`, bound to the gateway's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub schema: u32,
    pub cluster: ClusterName,
    pub gateway_id: GatewayId,
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    /// QUIC addresses peers dial, in order of preference.
    pub quic_addrs: Vec<SocketAddr>,
    /// The SPIFFE ID the gateway presents: `spiffe://<td>/cluster/<cluster>/gateway`.
    pub spiffe_id: String,
    /// Set while the gateway drains: peers open no new streams to it.
    #[serde(default)]
    pub draining: bool,
}

impl GatewayRecord {
    /// Checks the record on its own and against the key it was found under.
    pub fn validate(
        &self,
        key_cluster: &ClusterName,
        key_gateway: &GatewayId,
        rules: &AddressRules,
    ) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        if &self.cluster != key_cluster || &self.gateway_id != key_gateway {
            return Err(RecordError::WrongOwner {
                expected: format!("{key_cluster}/{key_gateway}"),
                found: format!("{}/{}", self.cluster, self.gateway_id),
            });
        }
        check_text("region", &self.region, MAX_LOCALITY_LEN)?;
        check_text("zone", &self.zone, MAX_LOCALITY_LEN)?;
        check_count("quic_addrs", self.quic_addrs.len(), MAX_GATEWAY_ADDRS)?;
        for addr in &self.quic_addrs {
            rules.check_socket(*addr)?;
        }
        let identity = SpiffeId::parse(&self.spiffe_id)
            .ok()
            .and_then(|id| GatewayIdentity::from_spiffe_id(&id).ok());
        match identity {
            Some(id) if id.cluster == self.cluster => Ok(()),
            _ => Err(RecordError::BadIdentity(self.spiffe_id.clone())),
        }
    }
}

/// Reads a sequence into a vector with no spare room. Without a length to go by, serde grows
/// a vector from room for four: an export's usual single port held 128 bytes instead of 32,
/// and a snapshot holds one record per export (docs/scale.md, "Memory per record").
fn compact_vec<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    let mut items = Vec::<T>::deserialize(deserializer)?;
    items.shrink_to_fit();
    Ok(items)
}

/// An export's ports: a list shared, copy on write, between the records of one service
/// whose ports are the same (a snapshot makes them share, `Snapshot::apply`). At 1M records
/// a list of its own per record held a vector and a name string, 80 bytes of heap each
/// (docs/scale.md, "Memory per record"). Reads and writes as the list itself; changing it
/// through `DerefMut` copies it first when it is shared.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Ports(#[serde(deserialize_with = "compact_arc_vec")] Arc<Vec<PortSpec>>);

impl Ports {
    /// Whether the two share one list (not merely equal ones).
    pub fn shares(&self, other: &Ports) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Deref for Ports {
    type Target = Vec<PortSpec>;
    fn deref(&self) -> &Vec<PortSpec> {
        &self.0
    }
}

impl std::ops::DerefMut for Ports {
    fn deref_mut(&mut self) -> &mut Vec<PortSpec> {
        Arc::make_mut(&mut self.0)
    }
}

impl From<Vec<PortSpec>> for Ports {
    fn from(ports: Vec<PortSpec>) -> Self {
        Self(Arc::new(ports))
    }
}

impl FromIterator<PortSpec> for Ports {
    fn from_iter<I: IntoIterator<Item = PortSpec>>(iter: I) -> Self {
        Self::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a> IntoIterator for &'a Ports {
    type Item = &'a PortSpec;
    type IntoIter = std::slice::Iter<'a, PortSpec>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

fn compact_arc_vec<'de, D>(deserializer: D) -> Result<Arc<Vec<PortSpec>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    compact_vec(deserializer).map(Arc::new)
}

/// An export's labels: none allocated while there are none (most exports), so a record in a
/// snapshot is 16 bytes smaller than with a map inline (docs/scale.md, "Memory per
/// record"). Reads as the map; written and read as the map on the wire.
#[derive(Clone, PartialEq, Eq, Default)]
// The box is the point: 8 bytes in the record for the usual "no labels", not a map's 24.
#[allow(clippy::box_collection)]
pub struct Labels(Option<Box<BTreeMap<String, String>>>);

/// The map an export without labels reads as.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

impl Labels {
    /// The map, to change (allocated on the first change).
    pub fn to_mut(&mut self) -> &mut BTreeMap<String, String> {
        self.0.get_or_insert_with(Default::default)
    }
}

impl std::fmt::Debug for Labels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

impl std::ops::Deref for Labels {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &BTreeMap<String, String> {
        self.0.as_deref().unwrap_or(&NO_LABELS)
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self((!map.is_empty()).then(|| Box::new(map)))
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        Self::from(BTreeMap::from(pairs))
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(deserializer).map(Self::from)
    }
}

/// A service one cluster offers to the federation.
/// Key: `<prefix>/v1/clusters/<cluster>/gateways/<gateway-id>/exports/<ns>/<name>`, lease-bound.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub schema: u32,
    pub ports: Ports,
    /// Local endpoints the exporting gateway knows of.
    pub endpoints_total: u32,
    /// Of those, the ones that passed the gateway's last probe.
    pub endpoints_healthy: u32,
    /// Clusters allowed to call this export; empty means every cluster of the federation.
    #[serde(default, deserialize_with = "compact_vec")]
    pub allowed_callers: Vec<ClusterName>,
    #[serde(default)]
    pub labels: Labels,
}

impl ExportRecord {
    /// Checks ports, counts and limits.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        validate_ports(&self.ports)?;
        if self.endpoints_healthy > self.endpoints_total {
            return Err(RecordError::BadEndpointCounts {
                healthy: self.endpoints_healthy,
                total: self.endpoints_total,
            });
        }
        validate_allowed_callers(self.allowed_callers.len())?;
        validate_labels(self.labels.iter())
    }

    /// Whether `caller` may open streams to this export.
    pub fn allows(&self, caller: &ClusterName) -> bool {
        self.allowed_callers.is_empty() || self.allowed_callers.contains(caller)
    }
}

/// A VIP allocated to one service in one cluster.
/// Key: `<prefix>/v1/vips/<cluster>/<ns>/<name>` (clusterset VIP) or
/// `<prefix>/v1/vips/<cluster>/<ns>/<name>/pinned/<target>` (cluster-pinned VIP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipRecord {
    pub schema: u32,
    pub vip: IpAddr,
}

impl VipRecord {
    /// Checks the schema and that the address is usable as a listener address.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        if self.vip.is_unspecified() || self.vip.is_multicast() {
            return Err(RecordError::UnroutableAddress(self.vip));
        }
        Ok(())
    }
}

fn check_schema(found: u32) -> Result<(), RecordError> {
    if found == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(RecordError::UnsupportedSchema { found })
    }
}

/// Decodes a record from catalog bytes: size limit first, then JSON. Validation is separate
/// because some checks need the key.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge { len: bytes.len() });
    }
    serde_json::from_slice(bytes).map_err(|e| RecordError::Decode(e.to_string()))
}

/// Encodes a record for the catalog.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, maps with string keys) cannot fail.
    serde_json::to_vec(record).expect("catalog records always serialize to JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway the JSON texts below describe.
    fn gateway() -> GatewayRecord {
        GatewayRecord {
            region: "us-east-1".into(),
            zone: "us-east-1a".into(),
            quic_addrs: vec!["10.0.0.1:15443".parse().expect("addr")],
            spiffe_id: "spiffe://mesh.local/cluster/east/gateway".into(),
            ..crate::fixture::gateway("east", "gw-0")
        }
    }

    /// The export the JSON texts below describe.
    fn export() -> ExportRecord {
        ExportRecord {
            endpoints_total: 3,
            ..crate::fixture::export(8080, 2)
        }
    }

    fn check_gw(g: &GatewayRecord, rules: AddressRules) -> Result<(), RecordError> {
        let c = ClusterName::new("east").expect("valid");
        let id = GatewayId::new("gw-0").expect("valid");
        g.validate(&c, &id, &rules)
    }

    #[test]
    fn labels_read_and_write_as_the_map_and_allocate_nothing_when_empty() {
        let plain = export();
        let text = String::from_utf8(encode(&plain)).expect("utf-8");
        assert!(text.contains(r#""labels":{}"#), "{text}");
        let back: ExportRecord = decode(text.as_bytes()).expect("decodes");
        assert!(back.labels.0.is_none(), "no map for no labels");
        let mut labelled = export();
        labelled.labels.to_mut().insert("team".into(), "pay".into());
        let text = String::from_utf8(encode(&labelled)).expect("utf-8");
        assert!(text.contains(r#""labels":{"team":"pay"}"#), "{text}");
        let back: ExportRecord = decode(text.as_bytes()).expect("decodes");
        assert_eq!(back.labels.get("team").map(String::as_str), Some("pay"));
        assert_eq!(back, labelled);
    }

    #[test]
    fn gateway_records_are_checked_against_their_key() {
        let strict = AddressRules::default();
        assert_eq!(check_gw(&gateway(), strict), Ok(()));

        let mut g = gateway();
        g.cluster = ClusterName::new("west").expect("valid");
        g.spiffe_id = "spiffe://mesh.local/cluster/west/gateway".into();
        assert!(matches!(
            check_gw(&g, strict),
            Err(RecordError::WrongOwner { .. })
        ));

        let mut g = gateway();
        g.spiffe_id = "spiffe://mesh.local/cluster/west/gateway".into();
        assert!(matches!(
            check_gw(&g, strict),
            Err(RecordError::BadIdentity(_))
        ));

        let mut g = gateway();
        g.schema = 2;
        assert_eq!(
            check_gw(&g, strict),
            Err(RecordError::UnsupportedSchema { found: 2 })
        );
    }

    /// What a gateway of a later minor version may write: new fields at every level and its
    /// minor version. A gateway of this version must read it as the record it knows.
    #[test]
    fn records_of_a_newer_minor_are_read_with_their_new_fields_ignored() {
        let gateway_json = r#"{"schema":1,"schema_minor":7,"cluster":"east","gateway_id":"gw-0",
            "region":"us-east-1","zone":"us-east-1a","quic_addrs":["10.0.0.1:15443"],
            "spiffe_id":"spiffe://mesh.local/cluster/east/gateway","draining":false,
            "capacity":{"streams":100},"build":"0.9.0"}"#;
        let g: GatewayRecord = decode(gateway_json.as_bytes()).expect("a newer minor decodes");
        assert_eq!(g, gateway());
        assert_eq!(check_gw(&g, AddressRules::default()), Ok(()));

        let export_json = r#"{"schema":1,"schema_minor":3,"ports":[{"name":"http","port":8080,
            "protocol":"tcp","idle_timeout":"30s"}],"endpoints_total":3,"endpoints_healthy":2,
            "allowed_callers":[],"labels":{},"weight_hint":40}"#;
        let e: ExportRecord = decode(export_json.as_bytes()).expect("a newer minor decodes");
        assert_eq!(e, export());
        assert_eq!(e.validate(), Ok(()));

        // An application protocol only a newer gateway knows: the record is read, and the
        // port is served as plain TCP, which any gateway can do.
        let newer_app = export_json.replace(r#""idle_timeout":"30s""#, r#""app_protocol":"http3""#);
        let e: ExportRecord =
            decode(newer_app.as_bytes()).expect("an unknown app_protocol decodes");
        assert_eq!(e.ports[0].app_protocol, AppProtocol::Unknown);
        assert!(!e.ports[0].app_protocol.per_request());
        assert_eq!(e.validate(), Ok(()));

        let vip_json = r#"{"schema":1,"schema_minor":2,"vip":"127.77.0.1","family":"v4"}"#;
        let v: VipRecord = decode(vip_json.as_bytes()).expect("a newer minor decodes");
        assert_eq!(v.validate(), Ok(()));
    }

    /// The other direction: a gateway of a later minor (modelled by a record type with one
    /// more field, defaulted) reads what this version writes, and this version reads the
    /// exact bytes the first release wrote (no `schema_minor`).
    #[test]
    fn records_of_an_older_minor_are_read_by_newer_readers() {
        #[derive(Debug, Deserialize)]
        struct NewerExport {
            schema: u32,
            #[serde(default)]
            schema_minor: u32,
            ports: Vec<PortSpec>,
            endpoints_total: u32,
            endpoints_healthy: u32,
            #[serde(default)]
            weight_hint: Option<u32>,
        }
        let written = encode(&export());
        let newer: NewerExport = decode(&written).expect("a newer reader decodes our record");
        assert_eq!((newer.schema, newer.schema_minor), (SCHEMA_VERSION, 0));
        assert_eq!(newer.ports, *export().ports);
        assert_eq!((newer.endpoints_total, newer.endpoints_healthy), (3, 2));
        assert_eq!(newer.weight_hint, None);

        // Bytes as the first release (schema 1, no minor) published them.
        let first_release = br#"{"schema":1,"ports":[{"name":"http","port":8080,"protocol":"tcp"}],"endpoints_total":3,"endpoints_healthy":2,"allowed_callers":[],"labels":{}}"#;
        let e: ExportRecord = decode(first_release).expect("first-release bytes decode");
        assert_eq!(e, export());
        assert_eq!(e.ports[0].app_protocol, AppProtocol::Tcp);
        // A tcp port is written as those same bytes: no `app_protocol` key.
        assert!(!String::from_utf8_lossy(&written).contains("app_protocol"));

        // An older reader (a port without `app_protocol`) reads an `http` port as its
        // port, and splices it.
        #[derive(Debug, Deserialize)]
        struct OlderPort {
            name: String,
            port: u16,
        }
        #[derive(Debug, Deserialize)]
        struct OlderExport {
            ports: Vec<OlderPort>,
        }
        let mut http = export();
        http.ports[0].app_protocol = AppProtocol::Http;
        let written = encode(&http);
        assert!(String::from_utf8_lossy(&written).contains(r#""app_protocol":"http""#));
        let older: OlderExport = decode(&written).expect("an older reader decodes an http port");
        assert_eq!(
            (older.ports[0].name.as_str(), older.ports[0].port),
            ("http", 8080)
        );
        let back: ExportRecord = decode(&written).expect("round trip");
        assert_eq!(back, http);
        // Ports that do not say what their endpoints speak are written as before.
        assert!(!String::from_utf8_lossy(&written).contains("endpoint_protocol"));

        // What the endpoints speak: written only when set, ignored by an older reader, and
        // a value only a newer gateway knows is read, not a reason to skip the record.
        http.ports[0].endpoint_protocol = EndpointProtocol::Http1;
        let written = encode(&http);
        assert!(String::from_utf8_lossy(&written).contains(r#""endpoint_protocol":"http1""#));
        let older: OlderExport = decode(&written).expect("an older reader decodes it");
        assert_eq!(older.ports[0].port, 8080);
        let back: ExportRecord = decode(&written).expect("round trip");
        assert_eq!(back, http);
        let newer = String::from_utf8_lossy(&written).replace("http1", "h3");
        let e: ExportRecord = decode(newer.as_bytes()).expect("an unknown value decodes");
        assert_eq!(e.ports[0].endpoint_protocol, EndpointProtocol::Unknown);
        assert!(!e.ports[0].endpoint_protocol.http1_only());
        assert_eq!(e.validate(), Ok(()));
    }

    /// A new major is the one change an older reader must not guess at: skipped, named.
    #[test]
    fn records_of_another_major_are_rejected_whatever_they_hold() {
        for json in [
            r#"{"schema":2,"vip":"127.77.0.1"}"#,
            r#"{"schema":0,"vip":"127.77.0.1","extra":1}"#,
        ] {
            let v: VipRecord = decode(json.as_bytes()).expect("decodes");
            assert!(
                matches!(v.validate(), Err(RecordError::UnsupportedSchema { .. })),
                "{json}"
            );
        }
    }

    #[test]
    fn unroutable_gateway_addresses_are_rejected() {
        let strict = AddressRules::default();
        for (addr, strict_ok, loopback_ok) in [
            ("10.0.0.1:15443", true, true),
            ("[2001:db8::1]:15443", true, true),
            ("127.0.0.1:15443", false, true),
            ("[::1]:15443", false, true),
            ("169.254.1.1:15443", false, false),
            ("[fe80::1]:15443", false, false),
            ("0.0.0.0:15443", false, false),
            ("224.0.0.1:15443", false, false),
            ("10.0.0.1:0", false, false),
        ] {
            let mut g = gateway();
            g.quic_addrs = vec![addr.parse().expect("addr")];
            assert_eq!(check_gw(&g, strict).is_ok(), strict_ok, "{addr} strict");
            assert_eq!(
                check_gw(&g, AddressRules::LOOPBACK).is_ok(),
                loopback_ok,
                "{addr} loopback allowed"
            );
        }
    }

    #[test]
    fn export_records_are_validated() {
        assert_eq!(export().validate(), Ok(()));
        let mut e = export();
        e.ports[0].port = 0;
        assert!(matches!(e.validate(), Err(RecordError::BadPort { .. })));
        let mut e = export();
        let first = e.ports[0].clone();
        e.ports.push(first);
        assert!(matches!(e.validate(), Err(RecordError::DuplicatePort(_))));
        let mut e = export();
        e.ports[0].name = "HTTP".into();
        assert!(matches!(e.validate(), Err(RecordError::BadPortName(_))));
        let mut e = export();
        e.endpoints_healthy = 4;
        assert!(matches!(
            e.validate(),
            Err(RecordError::BadEndpointCounts { .. })
        ));
        let mut e = export();
        e.labels = (0..=MAX_LABELS)
            .map(|i| (i.to_string(), String::new()))
            .collect::<BTreeMap<_, _>>()
            .into();
        assert!(matches!(e.validate(), Err(RecordError::TooMany { .. })));
    }

    #[test]
    fn decode_rejects_bad_bytes_without_panicking() {
        assert!(matches!(
            decode::<ExportRecord>(b"{not json"),
            Err(RecordError::Decode(_))
        ));
        assert!(matches!(
            decode::<ExportRecord>(&vec![b' '; MAX_RECORD_BYTES + 1]),
            Err(RecordError::TooLarge { .. })
        ));
        // A missing required field or a wrong type is an error (unknown fields are not: see
        // `records_of_a_newer_minor_are_read_with_their_new_fields_ignored`).
        let mut v = serde_json::to_value(export()).expect("to value");
        v["endpoints_total"] = serde_json::json!("three");
        assert!(decode::<ExportRecord>(&serde_json::to_vec(&v).expect("bytes")).is_err());
        let mut v = serde_json::to_value(export()).expect("to value");
        v.as_object_mut().expect("an object").remove("ports");
        assert!(decode::<ExportRecord>(&serde_json::to_vec(&v).expect("bytes")).is_err());
        let e = export();
        assert_eq!(decode::<ExportRecord>(&encode(&e)), Ok(e));
    }

    #[test]
    fn allowed_callers_default_to_everyone() {
        let east = ClusterName::new("east").expect("valid");
        let west = ClusterName::new("west").expect("valid");
        let mut e = export();
        assert!(e.allows(&east));
        e.allowed_callers = vec![west.clone()];
        assert!(!e.allows(&east));
        assert!(e.allows(&west));
    }
}

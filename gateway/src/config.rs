//! The gateway's configuration: one YAML file, unknown fields rejected, every default named,
//! `validate()` rejecting impossible combinations with a message that says what to change,
//! plus a few environment overrides for deployment (`MESHUP_*`).
//!
//! Each subsystem owns its section's type (`catalog:` → meshup-federation, `dns:` →
//! meshup-dns, `tunnel:` → this crate's tunnel module); this module composes them.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use meshup_core::identity::check_trust_domain;
use meshup_core::model::{
    AppProtocol, EndpointProtocol, PortSpec, Protocol, validate_allowed_callers, validate_labels,
    validate_ports,
};
use meshup_core::names::{ClusterName, GatewayId, Namespace, ServiceKey, ServiceName};
use meshup_dns::DnsConfig;
use meshup_federation::config::CatalogConfig;
use serde::{Deserialize, Serialize};

use crate::datapath::DatapathConfig;
use crate::tunnel::TunnelConfig;

/// Default admin HTTP address: loopback only.
pub const DEFAULT_ADMIN_HTTP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
/// Smallest VIP range we accept: a /30 would leave no room for a real catalog.
pub const MIN_VIP_ADDRESSES: u128 = 16;
/// Most exports one gateway may declare.
pub const MAX_EXPORTS: usize = 4096;
/// Most endpoints one export may declare.
pub const MAX_ENDPOINTS_PER_EXPORT: usize = 1024;

/// Why a configuration was rejected. Every message names the field to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("environment variable {name}={value:?} is not valid: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This gateway's cluster (an RFC 1123 label).
    pub cluster: ClusterName,
    /// This gateway's id within its cluster. Default: `<cluster>-0`.
    #[serde(default)]
    pub gateway_id: Option<GatewayId>,
    /// Locality, used to prefer nearby clusters.
    #[serde(default)]
    pub region: String,
    #[serde(default)]
    pub zone: String,
    /// The federation's SPIFFE trust domain.
    pub trust_domain: String,
    /// Where the catalog lives.
    pub catalog: CatalogConfig,
    /// Range this cluster's VIPs are allocated from.
    pub vip_cidr: IpNet,
    /// Which cluster-pinned names (`<svc>.<ns>.svc.<cluster>`) get a VIP of this cluster:
    /// `all` (default), `none`, or a list of `name.namespace`. Each pinned name costs one
    /// address per exporting cluster (docs/scale.md).
    #[serde(default, skip_serializing_if = "PinnedNamesConfig::is_all")]
    pub pinned_names: PinnedNamesConfig,
    pub tunnel: TunnelConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The node datapath (docs/datapath.md): a dummy interface with the VIP range (and these
    /// addresses) local on the node, set up at start-up. Absent: nothing is changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datapath: Option<DatapathConfig>,
    /// Services this cluster offers to the federation.
    #[serde(default)]
    pub exports: Vec<ExportConfig>,
    /// Requests of `http` and `grpc` ports (docs/http-routing.md).
    #[serde(default, skip_serializing_if = "HttpConfig::is_default")]
    pub http: HttpConfig,
    /// Threads that run the gateway (data path, DNS, catalog). Default: one per CPU core.
    /// On a node whose cores are mostly the workloads', 1 avoids handing work between
    /// threads and is the cheapest per byte and per request.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Replacing this gateway's process on the node without a lost connection
    /// (docs/upgrade.md). Unset: a new process cannot start while this one runs.
    #[serde(default)]
    pub handover: Option<HandoverConfig>,
}

/// `pinned_names`: `all`, `none` or a list of `name.namespace` (docs/scale.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PinnedNamesConfig {
    /// Every service in every cluster that exports it.
    #[default]
    All,
    /// None: only clusterset names answer.
    None,
    /// Only these services (in every cluster that exports them).
    Only(BTreeSet<ServiceKey>),
}

impl PinnedNamesConfig {
    /// Whether this is the default (left out of a config dump).
    pub fn is_all(&self) -> bool {
        *self == PinnedNamesConfig::All
    }

    /// What the VIP allocator takes.
    pub fn to_allocator(&self) -> meshup_federation::vips::PinnedNames {
        use meshup_federation::vips::PinnedNames;
        match self {
            PinnedNamesConfig::All => PinnedNames::All,
            PinnedNamesConfig::None => PinnedNames::None,
            PinnedNamesConfig::Only(services) => PinnedNames::Only(services.clone()),
        }
    }
}

impl Serialize for PinnedNamesConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            PinnedNamesConfig::All => s.serialize_str("all"),
            PinnedNamesConfig::None => s.serialize_str("none"),
            PinnedNamesConfig::Only(services) => {
                s.collect_seq(services.iter().map(ServiceKey::to_string))
            }
        }
    }
}

impl<'de> Deserialize<'de> for PinnedNamesConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PinnedNamesConfig;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`all`, `none` or a list of services as `name.namespace`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                match v {
                    "all" => Ok(PinnedNamesConfig::All),
                    "none" => Ok(PinnedNamesConfig::None),
                    other => Err(E::custom(format!(
                        "pinned_names: {other:?} is neither `all` nor `none`; list services as [name.namespace, ...]"
                    ))),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut services = BTreeSet::new();
                while let Some(entry) = seq.next_element::<String>()? {
                    let key: ServiceKey = entry.parse().map_err(|e| {
                        serde::de::Error::custom(format!(
                            "pinned_names: {entry:?} is not a service as name.namespace: {e}"
                        ))
                    })?;
                    services.insert(key);
                }
                Ok(PinnedNamesConfig::Only(services))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Where a successor process finds this one to take its listening sockets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverConfig {
    /// The Unix socket the running gateway listens on (its directory should be private to
    /// the gateway's user; peers of another user are refused).
    pub socket: std::path::PathBuf,
}

/// Largest `worker_threads` accepted.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The admin surface.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin HTTP address (`/ready`, `/live`, `/metrics`, status page).
    #[serde(default = "default_admin_http")]
    pub http: SocketAddr,
    /// The admin API has no authentication of its own, so it binds to loopback unless the
    /// operator says otherwise here.
    #[serde(default)]
    pub allow_non_loopback: bool,
    /// The gRPC admin API on loopback, plaintext (`meshup status`, `policy`, `drill`, ...;
    /// docs/admin-api.md). Default: none. `127.0.0.1:15021` is what the CLI looks for first.
    /// Loopback only: it writes policies and drills, and plaintext never leaves the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<SocketAddr>,
    /// The gRPC admin API for remote operators: mutual TLS only (TLS 1.3), with the gateway's
    /// tunnel certificate as the server's and an operator certificate
    /// (`meshup certs issue --operator NAME`) required of every client. Any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_remote: Option<SocketAddr>,
    /// Operators allowed on `grpc_remote`, by name; empty: every operator certificate of the
    /// trust domain. Each one may read and write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<String>,
}

fn default_admin_http() -> SocketAddr {
    DEFAULT_ADMIN_HTTP
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            http: DEFAULT_ADMIN_HTTP,
            allow_non_loopback: false,
            grpc: None,
            grpc_remote: None,
            operators: Vec::new(),
        }
    }
}

/// How requests of `http` and `grpc` ports are answered (docs/http-routing.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A response header naming the cluster that served each request, e.g.
    /// `x-meshup-cluster`. Absent (the default): none, since which cluster serves is
    /// topology some federations keep from their clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_cluster_header: Option<String>,
    /// Longest a request's body may go without a byte from the client once it started
    /// (slow or stalled uploads): the request is then abandoned, and the client answered
    /// `408` if nothing was answered yet. gRPC streams idle longer between messages: their
    /// ports get [`HttpConfig::grpc_body_idle_timeout`].
    #[serde(
        default = "d_body_idle",
        with = "humantime_serde",
        skip_serializing_if = "is_d_body_idle"
    )]
    pub body_idle_timeout: Duration,
    /// [`HttpConfig::body_idle_timeout`] for `grpc` ports.
    #[serde(
        default = "d_grpc_body_idle",
        with = "humantime_serde",
        skip_serializing_if = "is_d_grpc_body_idle"
    )]
    pub grpc_body_idle_timeout: Duration,
    /// Most requests of one client address waiting for their response headers at once,
    /// over all its connections: more are answered `429` at once.
    #[serde(
        default = "d_max_requests_per_client",
        skip_serializing_if = "is_d_max_requests_per_client"
    )]
    pub max_requests_per_client: u32,
}

/// Default [`HttpConfig::max_requests_per_client`].
pub const DEFAULT_MAX_REQUESTS_PER_CLIENT: u32 = 1024;

fn d_max_requests_per_client() -> u32 {
    DEFAULT_MAX_REQUESTS_PER_CLIENT
}
fn is_d_max_requests_per_client(n: &u32) -> bool {
    *n == DEFAULT_MAX_REQUESTS_PER_CLIENT
}

/// Default [`HttpConfig::body_idle_timeout`].
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`HttpConfig::grpc_body_idle_timeout`] (Envoy's stream idle timeout).
pub const DEFAULT_GRPC_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

fn d_body_idle() -> Duration {
    DEFAULT_BODY_IDLE_TIMEOUT
}
fn is_d_body_idle(d: &Duration) -> bool {
    *d == DEFAULT_BODY_IDLE_TIMEOUT
}
fn d_grpc_body_idle() -> Duration {
    DEFAULT_GRPC_BODY_IDLE_TIMEOUT
}
fn is_d_grpc_body_idle(d: &Duration) -> bool {
    *d == DEFAULT_GRPC_BODY_IDLE_TIMEOUT
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            serving_cluster_header: None,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            grpc_body_idle_timeout: DEFAULT_GRPC_BODY_IDLE_TIMEOUT,
            max_requests_per_client: DEFAULT_MAX_REQUESTS_PER_CLIENT,
        }
    }
}

impl HttpConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The header, once validated ([`Config::validate`]).
    pub fn serving_cluster_header(&self) -> Option<::http::HeaderName> {
        self.serving_cluster_header
            .as_deref()
            .and_then(|n| ::http::HeaderName::from_bytes(n.as_bytes()).ok())
    }
}

/// One service this cluster exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    pub name: ServiceName,
    pub namespace: Namespace,
    #[serde(deserialize_with = "strict_ports")]
    pub ports: Vec<PortSpec>,
    /// Local endpoints (`ip:port`) the gateway connects to. The port of a service port maps
    /// to the same port on each endpoint unless the endpoint names its own.
    pub endpoints: Vec<SocketAddr>,
    /// Clusters allowed to call this service; empty means every cluster of the federation.
    #[serde(default)]
    pub allowed_callers: Vec<ClusterName>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The config file's port entries. Unlike a catalog record (read leniently, docs/records.md),
/// a port entry with an unknown field or an `app_protocol` this gateway does not know is an
/// error: a typo must not quietly turn per-request routing off.
fn strict_ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PortSpec>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Port {
        name: String,
        port: u16,
        #[serde(default)]
        protocol: Option<Protocol>,
        #[serde(default)]
        app_protocol: Option<App>,
        #[serde(default)]
        endpoint_protocol: Option<Endpoint>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Endpoint {
        AsClient,
        Http1,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum App {
        Tcp,
        Http,
        Grpc,
    }
    let ports = Vec::<Port>::deserialize(d)?;
    Ok(ports
        .into_iter()
        .map(|p| PortSpec {
            name: p.name,
            port: p.port,
            protocol: p.protocol.unwrap_or(Protocol::Tcp),
            app_protocol: match p.app_protocol {
                None | Some(App::Tcp) => AppProtocol::Tcp,
                Some(App::Http) => AppProtocol::Http,
                Some(App::Grpc) => AppProtocol::Grpc,
            },
            endpoint_protocol: match p.endpoint_protocol {
                None | Some(Endpoint::AsClient) => EndpointProtocol::AsClient,
                Some(Endpoint::Http1) => EndpointProtocol::Http1,
            },
        })
        .collect())
}

impl ExportConfig {
    /// The clusterset service this export belongs to.
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(self.namespace.clone(), self.name.clone())
    }

    /// Checks one export of cluster `cluster`; errors name `field`. The same rules hold for
    /// the config file's exports and for those registered through the admin API.
    pub fn validate(&self, field: &str, cluster: &ClusterName) -> Result<(), ConfigError> {
        if self.ports.is_empty() {
            return Err(invalid(field, "an export needs at least one port"));
        }
        validate_ports(&self.ports).map_err(|err| invalid(field, err.to_string()))?;
        // A gateway proxies TCP only: a UDP or SCTP port would get a VIP in DNS and nothing
        // behind it.
        if let Some(p) = self.ports.iter().find(|p| p.protocol != Protocol::Tcp) {
            return Err(invalid(
                field,
                format!(
                    "port {:?}: protocol {} is not proxied (a gateway serves tcp ports only)",
                    p.name,
                    p.protocol.as_str()
                ),
            ));
        }
        let mut numbers = std::collections::BTreeMap::new();
        for p in &self.ports {
            if let Some(first) = numbers.insert(p.port, &p.name) {
                return Err(invalid(
                    field,
                    format!(
                        "ports {first:?} and {:?} both use port {}: a VIP listens once per port",
                        p.name, p.port
                    ),
                ));
            }
        }
        // The record's own limits, so that readers never skip what this gateway publishes.
        validate_labels(self.labels.iter()).map_err(|err| invalid(field, err.to_string()))?;
        validate_allowed_callers(self.allowed_callers.len())
            .map_err(|err| invalid(field, err.to_string()))?;
        if let Some(p) = self
            .ports
            .iter()
            .find(|p| p.endpoint_protocol.http1_only() && p.app_protocol != AppProtocol::Http)
        {
            return Err(invalid(
                field,
                format!(
                    "port {:?}: endpoint_protocol http1 needs app_protocol http (a grpc port's endpoints speak h2, a tcp port is spliced)",
                    p.name
                ),
            ));
        }
        if self.endpoints.is_empty() {
            return Err(invalid(
                field,
                "an export needs at least one local endpoint (ip:port)",
            ));
        }
        if self.endpoints.len() > MAX_ENDPOINTS_PER_EXPORT {
            return Err(invalid(
                field,
                format!("more than {MAX_ENDPOINTS_PER_EXPORT} endpoints"),
            ));
        }
        if let Some(bad) = self
            .endpoints
            .iter()
            .find(|a| a.port() == 0 || a.ip().is_unspecified() || a.ip().is_multicast())
        {
            return Err(invalid(
                field,
                format!("endpoint {bad} is not an address a gateway can connect to"),
            ));
        }
        if self.allowed_callers.contains(cluster) && self.allowed_callers.len() == 1 {
            // Allowed only from itself: legal, but almost always a typo for the peer.
            tracing::warn!(%field, "export allows only its own cluster as a caller");
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses, applies environment overrides and validates a config file.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::load_text(&text, path, env)
    }

    /// Parses, applies environment overrides and validates the text of the config file at
    /// `path` (for messages): what [`Config::load`] does after reading, and what a reload
    /// does with the bytes it hashed.
    pub fn load_text(text: &str, path: &Path, env: &dyn Env) -> Result<Self, ConfigError> {
        let mut config = Self::parse(text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })?;
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses YAML text (no validation).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<text>".into(),
            message: e.to_string(),
        })
    }

    /// This gateway's id, defaulted from the cluster name.
    pub fn gateway_id(&self) -> GatewayId {
        self.gateway_id.clone().unwrap_or_else(|| {
            GatewayId::new(&format!("{}-0", self.cluster))
                .unwrap_or_else(|_| GatewayId::new("gateway-0").expect("a literal valid label"))
        })
    }

    /// Applies `MESHUP_*` environment overrides (for containers, where the file is shared
    /// across replicas and the per-replica bits come from the environment).
    pub fn apply_env(&mut self, env: &dyn Env) -> Result<(), ConfigError> {
        if let Some(v) = env.var("MESHUP_GATEWAY_ID") {
            self.gateway_id = Some(GatewayId::new(&v).map_err(|e| ConfigError::Env {
                name: "MESHUP_GATEWAY_ID",
                value: v.clone(),
                message: e.to_string(),
            })?);
        }
        if let Some(v) = env.var("MESHUP_CATALOG_ENDPOINTS") {
            self.catalog.endpoints = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        if let Some(v) = env.var("MESHUP_TUNNEL_ADVERTISE") {
            // The per-node address peers dial (a DaemonSet passes `status.hostIP`).
            self.tunnel.advertise = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse().map_err(|e| ConfigError::Env {
                        name: "MESHUP_TUNNEL_ADVERTISE",
                        value: v.clone(),
                        message: format!(
                            "{s:?}: {e}; want comma-separated IP:port (an IPv6 one as [addr]:port)"
                        ),
                    })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = env.var("MESHUP_ADMIN_HTTP") {
            self.admin.http = v.parse().map_err(|e| ConfigError::Env {
                name: "MESHUP_ADMIN_HTTP",
                value: v.clone(),
                message: format!("{e}"),
            })?;
        }
        Ok(())
    }

    /// Rejects impossible combinations. Each error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_trust_domain(&self.trust_domain)
            .map_err(|e| invalid("trust_domain", e.to_string()))?;
        self.catalog
            .validate()
            .map_err(|e| invalid("catalog", e.to_string()))?;
        self.tunnel
            .validate()
            .map_err(|e| invalid("tunnel", e.to_string()))?;
        self.dns
            .validate()
            .map_err(|e| invalid("dns", e.to_string()))?;
        if let Some(name) = &self.http.serving_cluster_header
            && (::http::HeaderName::from_bytes(name.as_bytes()).is_err()
                || name.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return Err(invalid(
                "http.serving_cluster_header",
                format!("{name:?} is not a lowercase header name (e.g. x-meshup-cluster)"),
            ));
        }
        for (field, d) in [
            ("http.body_idle_timeout", self.http.body_idle_timeout),
            (
                "http.grpc_body_idle_timeout",
                self.http.grpc_body_idle_timeout,
            ),
        ] {
            if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
                return Err(invalid(field, format!("{d:?} is outside 100ms..1h")));
            }
        }
        if !(1..=65_536).contains(&self.http.max_requests_per_client) {
            return Err(invalid(
                "http.max_requests_per_client",
                format!("{} is outside 1..65536", self.http.max_requests_per_client),
            ));
        }
        if self.handover.is_some() && self.tunnel.handover_port.is_none() {
            return Err(invalid(
                "handover",
                "a hand-over needs tunnel.handover_port: the successor serves QUIC on it while this gateway drains on tunnel.listen's port (docs/upgrade.md)",
            ));
        }
        if let Some(n) = self.worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            return Err(invalid(
                "worker_threads",
                format!(
                    "{n} is outside 1 to {MAX_WORKER_THREADS}; leave it out for one per CPU core"
                ),
            ));
        }

        let vip_count: u128 = match self.vip_cidr {
            IpNet::V4(n) => 1u128 << (32 - n.prefix_len()),
            IpNet::V6(n) => 1u128 << (128 - n.prefix_len()).min(127),
        };
        if vip_count < MIN_VIP_ADDRESSES {
            return Err(invalid(
                "vip_cidr",
                format!(
                    "{} holds {vip_count} addresses; use a range of at least {MIN_VIP_ADDRESSES} (e.g. a /24)",
                    self.vip_cidr
                ),
            ));
        }
        if let Some(datapath) = &self.datapath {
            datapath
                .validate(self.vip_cidr)
                .map_err(|(field, message)| invalid(field, message))?;
        }
        if !self.admin.http.ip().is_loopback() && !self.admin.allow_non_loopback {
            return Err(invalid(
                "admin.http",
                format!(
                    "{} is not a loopback address; the admin API has no authentication, so bind it to 127.0.0.1 or set admin.allow_non_loopback: true",
                    self.admin.http
                ),
            ));
        }
        if let Some(grpc) = self.admin.grpc
            && !grpc.ip().is_loopback()
        {
            return Err(invalid(
                "admin.grpc",
                format!(
                    "{grpc} is not a loopback address; this listener is plaintext and writes policies and drills, so it is loopback only: bind it to 127.0.0.1, and serve remote operators over mTLS on admin.grpc_remote (docs/admin-api.md)"
                ),
            ));
        }
        if let (Some(grpc), Some(remote)) = (self.admin.grpc, self.admin.grpc_remote)
            && grpc == remote
            && grpc.port() != 0
        {
            return Err(invalid(
                "admin.grpc_remote",
                format!("{remote} is admin.grpc's address too; give each listener its own port"),
            ));
        }
        if !self.admin.operators.is_empty() && self.admin.grpc_remote.is_none() {
            return Err(invalid(
                "admin.operators",
                "lists operators but admin.grpc_remote is not set: operators only call the remote listener",
            ));
        }
        let mut operators = BTreeSet::new();
        for (i, name) in self.admin.operators.iter().enumerate() {
            meshup_core::identity::check_operator_name(name)
                .map_err(|e| invalid(format!("admin.operators[{i}]"), e.to_string()))?;
            if !operators.insert(name) {
                return Err(invalid(
                    format!("admin.operators[{i}]"),
                    format!("{name} is listed twice"),
                ));
            }
        }
        if self.exports.len() > MAX_EXPORTS {
            return Err(invalid(
                "exports",
                format!("{} exports, more than {MAX_EXPORTS}", self.exports.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, e) in self.exports.iter().enumerate() {
            let field = format!("exports[{i}] ({}.{})", e.name, e.namespace);
            if !seen.insert(e.key()) {
                return Err(invalid(field, "the same service is exported twice"));
            }
            e.validate(&field, &self.cluster)?;
        }
        Ok(())
    }

    /// The config as YAML with secrets redacted, for `meshup config check` and logs.
    pub fn redacted_yaml(&self) -> String {
        let mut value = match serde_norway::to_value(self) {
            Ok(v) => v,
            Err(e) => return format!("# cannot render config: {e}\n"),
        };
        redact(&mut value);
        serde_norway::to_string(&value).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Replaces values of keys that look secret.
fn redact(value: &mut serde_norway::Value) {
    match value {
        serde_norway::Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let secret = k
                    .as_str()
                    .is_some_and(|k| k.contains("password") && !k.ends_with("_file"));
                if secret {
                    *v = serde_norway::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_norway::Value::Sequence(seq) => seq.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Where environment overrides come from. Tests pass a map; the binary passes the process
/// environment, so tests never depend on (or change) the real environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for std::collections::HashMap<&'static str, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use meshup_core::model::{MAX_LABEL_TEXT, MAX_LABELS};

    #[test]
    fn pinned_names_are_all_none_or_a_list_of_services() {
        let with = |v: &str| {
            Config::parse(&SAMPLE.replace("region: us-east-1", &format!("pinned_names: {v}")))
        };
        assert_eq!(sample().pinned_names, PinnedNamesConfig::All, "default");
        assert_eq!(
            with("all").expect("all").pinned_names,
            PinnedNamesConfig::All
        );
        assert_eq!(
            with("none").expect("none").pinned_names,
            PinnedNamesConfig::None
        );
        assert_eq!(
            with("[pay.prod, db.prod]").expect("list").pinned_names,
            PinnedNamesConfig::Only(
                [
                    "pay.prod".parse().expect("key"),
                    "db.prod".parse().expect("key")
                ]
                .into()
            )
        );
        for (bad, says) in [
            ("some", "\"some\" is neither `all` nor `none`"),
            (
                "[pay.prod, Pay]",
                "pinned_names: \"Pay\" is not a service as name.namespace",
            ),
        ] {
            let err = with(bad).expect_err(bad).to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // A dump reads back the same.
        let config = with("[pay.prod]").expect("list");
        let text = serde_norway::to_string(&config).expect("dump");
        assert!(text.contains("pinned_names:\n- pay.prod"), "{text}");
        assert_eq!(
            Config::parse(&text).expect("reparse").pinned_names,
            config.pinned_names
        );
    }

    const SAMPLE: &str = r#"
cluster: east
region: us-east-1
trust_domain: mesh.local
catalog:
  backend: embedded
  prefix: /meshup
  lease_ttl: 10s
vip_cidr: 127.77.0.0/16
tunnel:
  cert: certs/cert.pem
  key: certs/key.pem
  bundle: certs/bundle.pem
admin:
  http: 127.0.0.1:15020
exports:
  - name: pay
    namespace: prod
    ports: [{name: http, port: 8080, protocol: tcp}]
    endpoints: ["127.0.0.1:18080"]
"#;

    fn sample() -> Config {
        Config::parse(SAMPLE).expect("sample parses")
    }

    #[test]
    fn sample_config_is_valid() {
        let c = sample();
        c.validate().expect("valid");
        assert_eq!(c.gateway_id().as_str(), "east-0");
        assert_eq!(c.exports[0].key().to_string(), "pay.prod");
        assert_eq!(c.worker_threads, None);
        assert_eq!(
            c.admin.grpc, None,
            "the gRPC admin API is off unless configured"
        );
        let grpc = Config::parse(&SAMPLE.replace(
            "http: 127.0.0.1:15020",
            "http: 127.0.0.1:15020\n  grpc: 127.0.0.1:15021\n  grpc_remote: 10.0.0.1:15022\n  operators: [ana, ci-deploy]",
        ))
        .expect("parses");
        grpc.validate()
            .expect("a remote mTLS listener on any address, with an operator list");
        assert_eq!(
            grpc.admin.grpc_remote,
            Some("10.0.0.1:15022".parse().expect("addr"))
        );
        assert_eq!(grpc.admin.operators, ["ana", "ci-deploy"]);
        let one = Config::parse(&SAMPLE.replace("region: us-east-1", "worker_threads: 1"))
            .expect("parses");
        one.validate().expect("valid");
        assert_eq!(one.worker_threads, Some(1));
    }

    #[test]
    fn datapath_section_is_optional_defaulted_and_checked() {
        assert_eq!(sample().datapath, None, "no datapath unless configured");
        let node = Config::parse(&SAMPLE.replace(
            "vip_cidr: 127.77.0.0/16",
            "vip_cidr: 169.254.253.0/24\ndatapath: {}",
        ))
        .expect("parses");
        node.validate().expect("valid");
        let datapath = node.datapath.expect("present");
        assert_eq!(datapath.interface, crate::datapath::DEFAULT_INTERFACE);
        assert!(datapath.addresses.is_empty());
        let cases: &[(&str, &str)] = &[
            (
                "vip_cidr: 127.77.0.0/16\ndatapath: {}",
                "datapath: vip_cidr 127.77.0.0/16 is in the loopback range",
            ),
            (
                "vip_cidr: 169.254.253.0/24\ndatapath: {addresses: [169.254.253.53/32]}",
                "datapath.addresses[0]: 169.254.253.53/32 is inside vip_cidr",
            ),
            (
                "vip_cidr: 169.254.253.0/24\ndatapath: {interface: meshup-datapath-0}",
                "datapath.interface",
            ),
            (
                "vip_cidr: 169.254.253.0/24\ndatapath: {interfce: meshup0}",
                "interfce",
            ),
        ];
        for (to, want) in cases {
            let text = SAMPLE.replace("vip_cidr: 127.77.0.0/16", to);
            let err = match Config::parse(&text) {
                Ok(c) => c.validate().expect_err(to).to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{to}: {err}");
        }
    }

    #[test]
    fn exports_a_gateway_cannot_serve_or_publish_are_refused() {
        let port = "ports: [{name: http, port: 8080, protocol: tcp}]";
        let long = "x".repeat(MAX_LABEL_TEXT + 1);
        let many: String = (0..=MAX_LABELS).map(|i| format!("l{i}: v, ")).collect();
        for (entry, names) in [
            (
                "ports: [{name: dns, port: 53, protocol: udp}]".to_owned(),
                "protocol udp is not proxied",
            ),
            (
                "ports: [{name: http, port: 8080}, {name: s, port: 9000, protocol: sctp}]"
                    .to_owned(),
                "protocol sctp is not proxied",
            ),
            (
                "ports: [{name: a, port: 8080}, {name: b, port: 8080}]".to_owned(),
                "\"a\" and \"b\" both use port 8080",
            ),
            (
                format!("{port}\n    labels: {{owner: {long}}}"),
                "label value",
            ),
            (format!("{port}\n    labels: {{{long}: v}}"), "label key"),
            (format!("{port}\n    labels: {{{many}}}"), "labels"),
        ] {
            let err = Config::parse(&SAMPLE.replace(port, &entry))
                .and_then(|c| c.validate().map(|()| c))
                .expect_err(&entry)
                .to_string();
            assert!(err.contains(names), "{entry}: {err}");
        }
        // At the limits, accepted.
        let at: String = (0..MAX_LABELS).map(|i| format!("l{i}: v, ")).collect();
        let edge = "y".repeat(MAX_LABEL_TEXT);
        for entry in [
            format!("{port}\n    labels: {{{at}}}"),
            format!("{port}\n    labels: {{{edge}: {edge}}}"),
            "ports: [{name: a, port: 8080}, {name: b, port: 8081}]".to_owned(),
        ] {
            let c = Config::parse(&SAMPLE.replace(port, &entry)).expect(&entry);
            c.validate().expect(&entry);
        }
    }

    #[test]
    fn port_entries_are_strict_and_say_how_they_are_routed() {
        let port = "ports: [{name: http, port: 8080, protocol: tcp}]";
        let with = |p: &str| Config::parse(&SAMPLE.replace(port, p));
        assert_eq!(
            sample().exports[0].ports[0].app_protocol,
            AppProtocol::Tcp,
            "default"
        );
        for (text, want) in [
            ("app_protocol: http", AppProtocol::Http),
            ("app_protocol: grpc", AppProtocol::Grpc),
            ("app_protocol: tcp", AppProtocol::Tcp),
        ] {
            let c = with(&format!("ports: [{{name: http, port: 8080, {text}}}]")).expect(text);
            assert_eq!(c.exports[0].ports[0].app_protocol, want, "{text}");
            assert_eq!(c.exports[0].ports[0].protocol, Protocol::Tcp, "{text}");
        }
        assert_eq!(
            sample().exports[0].ports[0].endpoint_protocol,
            EndpointProtocol::AsClient,
            "default"
        );
        for (text, want) in [
            ("endpoint_protocol: http1", EndpointProtocol::Http1),
            ("endpoint_protocol: as_client", EndpointProtocol::AsClient),
        ] {
            let c = with(&format!(
                "ports: [{{name: http, port: 8080, app_protocol: http, {text}}}]"
            ))
            .expect(text);
            c.validate().expect(text);
            assert_eq!(c.exports[0].ports[0].endpoint_protocol, want, "{text}");
        }
        for (text, names) in [
            ("app_protocol: http3", "http3"),
            ("app_protocl: http", "app_protocl"),
            ("protocol: udp, app_protocol: grpc", "needs protocol tcp"),
            ("app_protocol: http, endpoint_protocol: h2", "h2"),
            (
                "app_protocol: http, endpoint_protocl: http1",
                "endpoint_protocl",
            ),
            (
                "app_protocol: grpc, endpoint_protocol: http1",
                "needs app_protocol http",
            ),
            ("endpoint_protocol: http1", "needs app_protocol http"),
        ] {
            let err = with(&format!("ports: [{{name: http, port: 8080, {text}}}]"))
                .and_then(|c| c.validate().map(|()| c))
                .expect_err(text)
                .to_string();
            assert!(err.contains(names), "{text}: {err}");
        }
    }

    #[test]
    fn the_serving_cluster_header_is_off_by_default_and_must_be_a_header_name() {
        assert_eq!(sample().http.serving_cluster_header(), None);
        let with = |v: &str| {
            Config::parse(&SAMPLE.replace(
                "region: us-east-1",
                &format!("region: us-east-1\nhttp:\n  serving_cluster_header: {v}"),
            ))
            .and_then(|c| c.validate().map(|()| c))
        };
        let c = with("x-meshup-cluster").expect("valid");
        assert_eq!(
            c.http.serving_cluster_header().map(|h| h.to_string()),
            Some("x-meshup-cluster".to_owned())
        );
        for bad in ["\"x meshup\"", "X-Meshup-Cluster"] {
            let err = with(bad).expect_err(bad).to_string();
            assert!(err.contains("http.serving_cluster_header"), "{bad}: {err}");
        }
        let err = Config::parse(&SAMPLE.replace(
            "region: us-east-1",
            "region: us-east-1\nhttp:\n  cluster_header: x",
        ))
        .expect_err("unknown field")
        .to_string();
        assert!(err.contains("cluster_header"), "{err}");
    }

    #[test]
    fn http_limits_default_and_are_bounded() {
        let c = sample();
        assert_eq!(c.http.body_idle_timeout, DEFAULT_BODY_IDLE_TIMEOUT);
        assert_eq!(
            c.http.grpc_body_idle_timeout,
            DEFAULT_GRPC_BODY_IDLE_TIMEOUT
        );
        let with = |field: &str, v: &str| {
            Config::parse(&SAMPLE.replace(
                "region: us-east-1",
                &format!("region: us-east-1\nhttp:\n  {field}: {v}"),
            ))
            .and_then(|c| c.validate().map(|()| c))
        };
        let c = with("body_idle_timeout", "2s").expect("2s");
        assert_eq!(c.http.body_idle_timeout, Duration::from_secs(2));
        let c = with("grpc_body_idle_timeout", "10m").expect("10m");
        assert_eq!(c.http.grpc_body_idle_timeout, Duration::from_secs(600));
        for (field, bad) in [
            ("body_idle_timeout", "0s"),
            ("body_idle_timeout", "50ms"),
            ("grpc_body_idle_timeout", "2h"),
            ("body_idle_timeout", "soon"),
        ] {
            let err = with(field, bad).expect_err(bad).to_string();
            assert!(err.contains(field), "{field}: {bad}: {err}");
        }
        assert_eq!(
            sample().http.max_requests_per_client,
            DEFAULT_MAX_REQUESTS_PER_CLIENT
        );
        let c = with("max_requests_per_client", "4").expect("4");
        assert_eq!(c.http.max_requests_per_client, 4);
        for bad in ["0", "70000", "-1"] {
            let err = with("max_requests_per_client", bad)
                .expect_err(bad)
                .to_string();
            assert!(err.contains("max_requests_per_client"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_rejected_with_their_name() {
        let text = SAMPLE.replace("region:", "regoin:");
        let err = Config::parse(&text).expect_err("typo must be rejected");
        assert!(err.to_string().contains("regoin"), "{err}");
    }

    #[test]
    fn impossible_combinations_are_explained() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "vip_cidr: 127.77.0.0/16",
                "vip_cidr: 127.77.0.0/30",
                "vip_cidr",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 10.1.2.3:15020",
                "admin.http",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc: 10.1.2.3:15021\n  allow_non_loopback: true",
                "admin.grpc",
            ),
            // Plaintext off loopback has no opt-in any more.
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc: 10.1.2.3:15021\n  allow_non_loopback_grpc: true",
                "allow_non_loopback_grpc",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc: 127.0.0.1:15021\n  grpc_remote: 127.0.0.1:15021",
                "admin.grpc_remote",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc: 127.0.0.1:15021\n  operators: [ana]",
                "admin.operators",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc_remote: 0.0.0.0:15022\n  operators: [ana, Bo]",
                "admin.operators[1]",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  grpc_remote: 0.0.0.0:15022\n  operators: [ana, ana]",
                "admin.operators[1]",
            ),
            (
                "http: 127.0.0.1:15020",
                "http: 127.0.0.1:15020\n  gprc: 127.0.0.1:15021",
                "gprc",
            ),
            (
                "trust_domain: mesh.local",
                "trust_domain: Mesh.Local",
                "trust_domain",
            ),
            ("port: 8080", "port: 0", "exports[0]"),
            (
                r#"endpoints: ["127.0.0.1:18080"]"#,
                "endpoints: []",
                "exports[0]",
            ),
            (
                "region: us-east-1",
                "region: x\nworker_threads: 0",
                "worker_threads",
            ),
            (
                "region: us-east-1",
                "region: x\nworker_threads: 5000",
                "worker_threads",
            ),
        ];
        for (from, to, field) in cases {
            let text = SAMPLE.replace(from, to);
            let err = match Config::parse(&text) {
                Ok(c) => c.validate().expect_err(to).to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(field), "{to}: {err}");
        }
        let mut twice = sample();
        twice.exports.push(twice.exports[0].clone());
        let err = twice.validate().expect_err("duplicate export");
        assert!(err.to_string().contains("exported twice"), "{err}");
    }

    #[test]
    fn redaction_hides_every_password_value_but_keeps_file_paths() {
        let mut value: serde_norway::Value = serde_norway::from_str(
            "catalog:\n  password: hunter2\n  password_file: /etc/pw\n  nested: [{etcd_password: x}]\n",
        )
        .expect("yaml");
        redact(&mut value);
        let text = serde_norway::to_string(&value).expect("render");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("password: <redacted>"), "{text}");
        assert!(text.contains("etcd_password: <redacted>"), "{text}");
        assert!(text.contains("password_file: /etc/pw"), "{text}");
    }

    #[test]
    fn environment_overrides_apply_and_are_checked() {
        let mut c = sample();
        let env: HashMap<&'static str, String> = HashMap::from([
            ("MESHUP_GATEWAY_ID", "east-7".to_string()),
            ("MESHUP_ADMIN_HTTP", "127.0.0.1:25020".to_string()),
        ]);
        c.apply_env(&env).expect("valid overrides");
        assert_eq!(c.gateway_id().as_str(), "east-7");
        assert_eq!(c.admin.http.port(), 25020);

        let bad: HashMap<&'static str, String> =
            HashMap::from([("MESHUP_GATEWAY_ID", "East_7".to_string())]);
        let err = c.apply_env(&bad).expect_err("bad id");
        assert!(err.to_string().contains("MESHUP_GATEWAY_ID"), "{err}");
    }

    #[test]
    fn tunnel_advertise_comes_from_the_environment() {
        let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        // (value, the advertised addresses, or the part of the error naming the problem)
        let cases: &[(&str, Result<Vec<SocketAddr>, &str>)] = &[
            ("10.0.3.7:15443", Ok(vec![addr("10.0.3.7:15443")])),
            (
                " 10.0.3.7:15443 , [fd00::7]:15443,",
                Ok(vec![addr("10.0.3.7:15443"), addr("[fd00::7]:15443")]),
            ),
            ("", Ok(vec![])),
            ("10.0.3.7", Err("\"10.0.3.7\"")),
            ("10.0.3.7:15443,fd00::7:15443", Err("\"fd00::7:15443\"")),
            ("node-a:15443", Err("\"node-a:15443\"")),
        ];
        for (value, want) in cases {
            let mut c = sample();
            c.tunnel.advertise = vec![addr("192.0.2.1:1")];
            let env: HashMap<&'static str, String> =
                HashMap::from([("MESHUP_TUNNEL_ADVERTISE", value.to_string())]);
            match (c.apply_env(&env), want) {
                (Ok(()), Ok(addrs)) => assert_eq!(&c.tunnel.advertise, addrs, "{value:?}"),
                (Err(e), Err(part)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains("MESHUP_TUNNEL_ADVERTISE") && e.contains(part),
                        "{value:?}: {e}"
                    );
                    // Refused: the file's value stays.
                    assert_eq!(c.tunnel.advertise, vec![addr("192.0.2.1:1")], "{value:?}");
                }
                (got, want) => panic!("{value:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}

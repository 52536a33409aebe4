//! The `dns:` section of the gateway config: where to listen, which zone to serve and the
//! timings that end up in answers (TTLs, SOA fields) or protect the server (TCP limits).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::rr::Name;
use serde::{Deserialize, Serialize};

/// Default listen address: loopback only, an unprivileged port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15053);
/// Default zone, as in the Multi-Cluster Services DNS specification.
pub const DEFAULT_ZONE: &str = "clusterset.local";
/// Default TTL of positive answers: short, because a VIP can move when the catalog changes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5);
/// Default TTL of the SOA record itself.
pub const DEFAULT_SOA_TTL: Duration = Duration::from_secs(5);
/// Default negative-caching TTL (the SOA MINIMUM field, RFC 2308): a name that appears in the
/// catalog must not stay cached as missing for long.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Default SOA REFRESH (seconds on the wire). Nothing transfers this zone; informative only.
pub const DEFAULT_SOA_REFRESH: Duration = Duration::from_secs(60);
/// Default SOA RETRY.
pub const DEFAULT_SOA_RETRY: Duration = Duration::from_secs(10);
/// Default SOA EXPIRE.
pub const DEFAULT_SOA_EXPIRE: Duration = Duration::from_secs(3600);
/// Default time a TCP connection may stay idle (or take to send one query) before it is closed.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap on concurrent TCP connections; more are closed at accept.
pub const DEFAULT_MAX_TCP_CONNECTIONS: usize = 256;
/// Default number of UDP worker threads (they share the one UDP socket): one per CPU the
/// process may run on, as Knot DNS's `udp-workers` and CoreDNS (one goroutine per CPU) do.
/// A flood then meets as many readers as there are CPUs, and the scheduler gives the socket
/// a share of each core instead of one thread's share of one.
pub fn default_udp_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .clamp(1, MAX_UDP_WORKERS)
}

/// Largest TTL DNS allows (RFC 2181 §8).
pub const MAX_TTL: Duration = Duration::from_secs(i32::MAX as u64);
/// Longest negative-caching TTL RFC 2308 §5 recommends.
pub const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(3 * 3600);
/// Most UDP workers accepted; more only add contention on a gateway host.
pub const MAX_UDP_WORKERS: usize = 64;

/// Why a `dns:` config was rejected. Each message names the field and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("dns.zone {zone:?} is not a valid DNS name: {reason}")]
    BadZone { zone: String, reason: String },
    #[error("dns.{field} {name:?} is not a valid DNS name: {reason}")]
    BadName {
        field: &'static str,
        name: String,
        reason: String,
    },
    #[error("dns.{field} is {value:?}, more than the largest allowed {max:?}")]
    TooLong {
        field: &'static str,
        value: Duration,
        max: Duration,
    },
    #[error("dns.{field} must be greater than zero")]
    Zero { field: &'static str },
    #[error("dns.udp_workers is {0}; use 1 to {MAX_UDP_WORKERS}")]
    BadWorkers(usize),
}

/// Configuration of the built-in DNS server (the gateway's `dns:` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP and TCP listen address (both are bound on the same port).
    pub listen: SocketAddr,
    /// The zone served (without trailing dot), e.g. `clusterset.local`.
    pub zone: String,
    /// TTL of positive answers (A, AAAA, SRV, TXT).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// TTL of the SOA record.
    #[serde(with = "humantime_serde")]
    pub soa_ttl: Duration,
    /// Negative-caching TTL: the SOA MINIMUM. NXDOMAIN/NODATA answers carry the SOA with
    /// TTL = min(soa_ttl, negative_ttl) (RFC 2308 §3).
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// SOA REFRESH.
    #[serde(with = "humantime_serde")]
    pub soa_refresh: Duration,
    /// SOA RETRY.
    #[serde(with = "humantime_serde")]
    pub soa_retry: Duration,
    /// SOA EXPIRE.
    #[serde(with = "humantime_serde")]
    pub soa_expire: Duration,
    /// Name server host name in the apex NS and SOA MNAME. Default `ns.dns.<zone>`.
    pub ns_name: Option<String>,
    /// Address answered for `ns_name` when it is inside the zone (glue). Default: the listen
    /// IP unless it is unspecified (0.0.0.0 / ::), in which case there is no glue address.
    pub ns_address: Option<IpAddr>,
    /// SOA RNAME (mailbox as a name). Default `hostmaster.<zone>`.
    pub soa_rname: Option<String>,
    /// A TCP connection whose next query (length prefix and body) has not wholly arrived
    /// this long after the server began waiting for it is closed: a client dribbling bytes
    /// gets no more time than one that sends nothing.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// Concurrent TCP connections. At the cap, a new connection takes the slot of the one
    /// that has waited longest for a query; it is closed at once only when every open one is
    /// busy answering.
    pub max_tcp_connections: usize,
    /// UDP worker threads; they share the one UDP socket. Default: one per CPU.
    pub udp_workers: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            zone: DEFAULT_ZONE.to_owned(),
            ttl: DEFAULT_TTL,
            soa_ttl: DEFAULT_SOA_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            soa_refresh: DEFAULT_SOA_REFRESH,
            soa_retry: DEFAULT_SOA_RETRY,
            soa_expire: DEFAULT_SOA_EXPIRE,
            ns_name: None,
            ns_address: None,
            soa_rname: None,
            tcp_idle_timeout: DEFAULT_TCP_IDLE_TIMEOUT,
            max_tcp_connections: DEFAULT_MAX_TCP_CONNECTIONS,
            udp_workers: default_udp_workers(),
        }
    }
}

impl DnsConfig {
    /// Rejects values that cannot work, with a message naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.zone_name()?;
        self.ns_host()?;
        self.rname()?;
        for (field, value, max) in [
            ("ttl", self.ttl, MAX_TTL),
            ("soa_ttl", self.soa_ttl, MAX_TTL),
            ("negative_ttl", self.negative_ttl, MAX_NEGATIVE_TTL),
            ("soa_refresh", self.soa_refresh, MAX_TTL),
            ("soa_retry", self.soa_retry, MAX_TTL),
            ("soa_expire", self.soa_expire, MAX_TTL),
        ] {
            if value > max {
                return Err(ConfigError::TooLong { field, value, max });
            }
        }
        if self.tcp_idle_timeout.is_zero() {
            return Err(ConfigError::Zero {
                field: "tcp_idle_timeout",
            });
        }
        if self.max_tcp_connections == 0 {
            return Err(ConfigError::Zero {
                field: "max_tcp_connections",
            });
        }
        if self.udp_workers == 0 || self.udp_workers > MAX_UDP_WORKERS {
            return Err(ConfigError::BadWorkers(self.udp_workers));
        }
        Ok(())
    }

    /// The zone apex as a lowercase, fully qualified name.
    pub fn zone_name(&self) -> Result<Name, ConfigError> {
        let bad = |reason: String| ConfigError::BadZone {
            zone: self.zone.clone(),
            reason,
        };
        let zone = self.zone.trim_end_matches('.');
        if zone.is_empty() {
            return Err(bad("the root zone cannot be served".into()));
        }
        let mut name = Name::from_ascii(zone).map_err(|e| bad(e.to_string()))?;
        name.set_fqdn(true);
        Ok(name.to_lowercase())
    }

    /// The name server host name (`ns_name` or `ns.dns.<zone>`).
    pub fn ns_host(&self) -> Result<Name, ConfigError> {
        let zone = self.zone_name()?;
        match &self.ns_name {
            None => Ok(Name::from_ascii("ns.dns")
                .and_then(|n| n.append_domain(&zone))
                .map_err(|e| ConfigError::BadZone {
                    zone: self.zone.clone(),
                    reason: e.to_string(),
                })?),
            Some(text) => parse_fqdn("ns_name", text),
        }
    }

    /// The SOA RNAME (`soa_rname` or `hostmaster.<zone>`).
    pub fn rname(&self) -> Result<Name, ConfigError> {
        let zone = self.zone_name()?;
        match &self.soa_rname {
            None => Ok(Name::from_ascii("hostmaster")
                .and_then(|n| n.append_domain(&zone))
                .map_err(|e| ConfigError::BadZone {
                    zone: self.zone.clone(),
                    reason: e.to_string(),
                })?),
            Some(text) => parse_fqdn("soa_rname", text),
        }
    }

    /// The glue address for the NS host, if any.
    pub fn ns_glue(&self) -> Option<IpAddr> {
        self.ns_address
            .or_else(|| (!self.listen.ip().is_unspecified()).then_some(self.listen.ip()))
    }
}

fn parse_fqdn(field: &'static str, text: &str) -> Result<Name, ConfigError> {
    let mut name =
        Name::from_ascii(text.trim_end_matches('.')).map_err(|e| ConfigError::BadName {
            field,
            name: text.to_owned(),
            reason: e.to_string(),
        })?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// Seconds of a validated duration as a DNS 32-bit field (validate() bounds it).
pub(crate) fn secs_u32(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_named() {
        let cfg = DnsConfig::default();
        assert_eq!(cfg.validate(), Ok(()));
        assert_eq!(cfg.listen, DEFAULT_LISTEN);
        assert_eq!(
            cfg.ns_host().map(|n| n.to_string()),
            Ok("ns.dns.clusterset.local.".to_owned())
        );
        assert_eq!(cfg.ns_glue(), Some(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }

    #[test]
    fn yaml_like_json_with_durations_and_unknown_fields() {
        let cfg: DnsConfig =
            serde_json::from_str(r#"{"zone":"Example.Org.","ttl":"30s","negative_ttl":"1m"}"#)
                .expect("parses");
        assert_eq!(cfg.ttl, Duration::from_secs(30));
        assert_eq!(
            cfg.zone_name().map(|n| n.to_string()),
            Ok("example.org.".into())
        );
        assert!(serde_json::from_str::<DnsConfig>(r#"{"zonee":"x"}"#).is_err());
    }

    #[test]
    fn impossible_values_are_rejected() {
        let bad = |f: fn(&mut DnsConfig)| {
            let mut c = DnsConfig::default();
            f(&mut c);
            c.validate()
        };
        assert!(matches!(
            bad(|c| c.zone = ".".into()),
            Err(ConfigError::BadZone { .. })
        ));
        assert!(matches!(
            bad(|c| c.negative_ttl = Duration::from_secs(86400)),
            Err(ConfigError::TooLong { .. })
        ));
        assert!(matches!(
            bad(|c| c.udp_workers = 0),
            Err(ConfigError::BadWorkers(0))
        ));
        assert!(matches!(
            bad(|c| c.max_tcp_connections = 0),
            Err(ConfigError::Zero { .. })
        ));
        assert!(matches!(
            bad(|c| c.ns_name = Some("a..b".into())),
            Err(ConfigError::BadName { .. })
        ));
    }
}

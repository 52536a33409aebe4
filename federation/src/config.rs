//! The `catalog` section of the gateway configuration, and turning it into a store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::embedded::EmbeddedStore;
use crate::etcd::{EtcdOptions, EtcdStore};
use crate::keys::{DEFAULT_PREFIX, KeyLayout};
use crate::store::{Store, StoreError};

/// Default lease TTL of a gateway's records.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Shortest lease etcd grants (etcd 3.4 raises anything shorter to 2 s).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest lease TTL accepted: longer ones keep a dead gateway in the catalog too long.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(300);

/// Why a catalog configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("catalog.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("catalog.{field}: cannot read {path}: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("catalog: the embedded backend needs the in-process store, and none was passed")]
    NoEmbeddedStore,
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// Which store holds the catalog.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In-process (`meshup demo`, single-process setups).
    #[default]
    Embedded,
    /// An etcd cluster.
    Etcd,
}

/// TLS to etcd: the CA that signed etcd's certificate, and optionally a client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// The `catalog` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    #[serde(default)]
    pub backend: Backend,
    /// etcd client URLs (`http://` or, with `tls`, `https://`).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix of this federation.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// TTL of the lease a gateway's records are bound to.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How long a gateway or export record that left the catalog is still answered and routed
    /// to while this gateway's link to its gateway is alive ([`crate::grace`]); `0s` turns
    /// the grace off.
    #[serde(default = "default_withdrawal_grace", with = "humantime_serde")]
    pub withdrawal_grace: Duration,
    /// etcd user, when etcd authentication is on.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding that user's password (the password itself never goes in the config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Accept loopback addresses in records (single-host demos and tests only).
    #[serde(default)]
    pub allow_loopback_addresses: bool,
}

fn default_prefix() -> String {
    DEFAULT_PREFIX.to_owned()
}

fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}

fn default_withdrawal_grace() -> Duration {
    crate::grace::DEFAULT_WITHDRAWAL_GRACE
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            endpoints: Vec::new(),
            prefix: default_prefix(),
            lease_ttl: DEFAULT_LEASE_TTL,
            withdrawal_grace: default_withdrawal_grace(),
            username: None,
            password_file: None,
            tls: None,
            allow_loopback_addresses: false,
        }
    }
}

impl CatalogConfig {
    /// Rejects impossible combinations with a message naming the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        KeyLayout::new(&self.prefix).map_err(|e| invalid("prefix", e.to_string()))?;
        if self.lease_ttl < MIN_LEASE_TTL || self.lease_ttl > MAX_LEASE_TTL {
            return Err(invalid(
                "lease_ttl",
                format!(
                    "{} is outside {}..={}",
                    humantime::format_duration(self.lease_ttl),
                    humantime::format_duration(MIN_LEASE_TTL),
                    humantime::format_duration(MAX_LEASE_TTL)
                ),
            ));
        }
        if self.lease_ttl.subsec_nanos() != 0 {
            return Err(invalid(
                "lease_ttl",
                "must be whole seconds (etcd leases are)",
            ));
        }
        if self.withdrawal_grace > crate::grace::MAX_WITHDRAWAL_GRACE {
            return Err(invalid(
                "withdrawal_grace",
                format!(
                    "{} is longer than {}: a withdrawn service would linger; use a shorter grace, or 0s to turn it off",
                    humantime::format_duration(self.withdrawal_grace),
                    humantime::format_duration(crate::grace::MAX_WITHDRAWAL_GRACE)
                ),
            ));
        }
        match self.backend {
            Backend::Embedded => {
                let etcd_only = !self.endpoints.is_empty()
                    || self.username.is_some()
                    || self.password_file.is_some()
                    || self.tls.is_some();
                if etcd_only {
                    return Err(invalid(
                        "backend",
                        "endpoints, username, password_file and tls only apply to backend: etcd",
                    ));
                }
            }
            Backend::Etcd => {
                if self.endpoints.is_empty() {
                    return Err(invalid(
                        "endpoints",
                        "backend etcd needs at least one endpoint",
                    ));
                }
                let scheme = if self.tls.is_some() {
                    "https://"
                } else {
                    "http://"
                };
                for e in &self.endpoints {
                    if !e.starts_with(scheme) {
                        return Err(invalid(
                            "endpoints",
                            format!(
                                "{e:?} must start with {scheme} (https:// exactly when tls is set)"
                            ),
                        ));
                    }
                }
                if self.username.is_some() != self.password_file.is_some() {
                    return Err(invalid(
                        "username",
                        "username and password_file go together",
                    ));
                }
                if let Some(tls) = &self.tls
                    && tls.cert.is_some() != tls.key.is_some()
                {
                    return Err(invalid("tls", "cert and key go together"));
                }
            }
        }
        Ok(())
    }

    /// The key layout of this federation (after `validate`).
    pub fn layout(&self) -> Result<KeyLayout, ConfigError> {
        KeyLayout::new(&self.prefix).map_err(|e| invalid("prefix", e.to_string()))
    }

    /// The address rules records are checked against.
    pub fn address_rules(&self) -> meshup_core::model::AddressRules {
        meshup_core::model::AddressRules {
            allow_loopback: self.allow_loopback_addresses,
        }
    }

    /// Builds the store: the etcd client (reading the password and TLS files), or the
    /// in-process store the caller shares between its components.
    pub async fn connect(
        &self,
        embedded: Option<&EmbeddedStore>,
    ) -> Result<Arc<dyn Store>, ConfigError> {
        self.validate()?;
        match self.backend {
            Backend::Embedded => {
                let store = embedded.ok_or(ConfigError::NoEmbeddedStore)?;
                Ok(Arc::new(store.clone()))
            }
            Backend::Etcd => {
                let user = match (&self.username, &self.password_file) {
                    (Some(user), Some(file)) => {
                        let password = read("password_file", file)?;
                        Some((
                            user.clone(),
                            password.trim_end_matches(['\r', '\n']).to_owned(),
                        ))
                    }
                    _ => None,
                };
                let tls = match &self.tls {
                    Some(tls) => {
                        let ca = read("tls.ca", &tls.ca)?;
                        let mut options = etcd_client::TlsOptions::new()
                            .ca_certificate(etcd_client::Certificate::from_pem(ca));
                        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                            options = options.identity(etcd_client::Identity::from_pem(
                                read("tls.cert", cert)?,
                                read("tls.key", key)?,
                            ));
                        }
                        Some(options)
                    }
                    None => None,
                };
                let store = EtcdStore::connect(EtcdOptions {
                    endpoints: self.endpoints.clone(),
                    user,
                    tls,
                    request_timeout: Duration::ZERO,
                })
                .await?;
                Ok(Arc::new(store))
            }
        }
    }
}

fn read(field: &'static str, path: &PathBuf) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        field,
        path: path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<CatalogConfig, String> {
        serde_norway::from_str::<CatalogConfig>(yaml).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_durations() {
        let c = parse("backend: etcd\nendpoints: [\"http://127.0.0.1:2379\"]\nlease_ttl: 5s\n")
            .expect("parses");
        assert_eq!(c.prefix, "/meshup");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert!(!c.allow_loopback_addresses);
        assert_eq!(c.withdrawal_grace, crate::grace::DEFAULT_WITHDRAWAL_GRACE);
        c.validate().expect("valid");
        let off = parse("withdrawal_grace: 0s").expect("parses");
        assert_eq!(off.withdrawal_grace, Duration::ZERO);
        off.validate().expect("a zero grace turns it off");
        let d = parse("{}").expect("empty section");
        assert_eq!(d, CatalogConfig::default());
        d.validate().expect("embedded default is valid");
        assert!(parse("surprise: 1").is_err(), "unknown fields are rejected");
    }

    #[test]
    fn impossible_combinations_are_rejected() {
        let bad = [
            "backend: etcd",
            "backend: etcd\nendpoints: [\"127.0.0.1:2379\"]",
            "backend: etcd\nendpoints: [\"http://e:2379\"]\ntls: {ca: /ca.pem}",
            "backend: etcd\nendpoints: [\"http://e:2379\"]\nusername: gw",
            "backend: etcd\nendpoints: [\"https://e:2379\"]\ntls: {ca: /ca.pem, cert: /c.pem}",
            "endpoints: [\"http://e:2379\"]",
            "lease_ttl: 1s",
            "lease_ttl: 2500ms",
            "lease_ttl: 1h",
            "withdrawal_grace: 61s",
            "prefix: meshup",
            "prefix: /meshup/",
        ];
        for yaml in bad {
            let c = parse(yaml).expect("parses");
            assert!(c.validate().is_err(), "{yaml:?} should be invalid");
        }
        let long = parse("withdrawal_grace: 2m").expect("parses");
        let message = long.validate().expect_err("too long").to_string();
        assert!(
            message.starts_with("catalog.withdrawal_grace: 2m is longer than 1m"),
            "{message}"
        );
    }
}

//! The catalog's key layout. Pure: builds keys and parses them back, table-tested.
//!
//! ```text
//! <prefix>/v1/clusters/<cluster>/gateways/<gateway-id>                          GatewayRecord (lease-bound)
//! <prefix>/v1/clusters/<cluster>/gateways/<gateway-id>/exports/<ns>/<name>      ExportRecord (lease-bound)
//! <prefix>/v1/vips/<cluster>/<ns>/<name>                                        VipRecord, clusterset VIP
//! <prefix>/v1/vips/<cluster>/<ns>/<name>/pinned/<target-cluster>                VipRecord, cluster-pinned VIP
//! <prefix>/v1/vip-claims/<cluster>/<ip>                                         address claim
//! <prefix>/v1/policies/<ns>/<name>                                            PolicyRecord of a clusterset service
//! <prefix>/v1/routes/<ns>/<name>                                              RouteRecord (per-request HTTP rules) of a clusterset service
//! <prefix>/v1/drills/<drill-id>                                                DrillRecord (an operator override)
//! <prefix>/v1/drill-audit/<drill-id>                                           DrillAudit: how a drill ended (not watched into the snapshot)
//! ```
//!
//! **Address claims.** A VIP key maps a service to an address; the claim key maps the address
//! back to its owner. The allocator creates both in one transaction that requires both to be
//! absent, so two services of one cluster can never hold the same IP, and two replicas racing
//! for one service agree (the loser reads the winner's VIP). The claim's value is the VIP key
//! it belongs to, so an operator can see who holds an address.

use std::net::IpAddr;

use meshup_core::catalog::{ExportKey, VipKey};
use meshup_core::names::{ClusterName, DrillId, GatewayId, NameError, ServiceKey};

/// The schema generation of the key layout.
pub const LAYOUT_VERSION: &str = "v1";
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/meshup";

/// Why a key is not a catalog key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is not UTF-8")]
    NotUtf8,
    #[error("key {0:?} is outside this federation's prefix")]
    OutsidePrefix(String),
    #[error("key {0:?} does not match the catalog layout")]
    Unrecognized(String),
    #[error("key {key:?} has an invalid name: {source}")]
    BadName { key: String, source: NameError },
    #[error("key {key:?} has an invalid address {text:?}")]
    BadAddress { key: String, text: String },
    #[error(
        "prefix {0:?} is invalid: it must start with '/', not end with '/', and have no empty segments"
    )]
    BadPrefix(String),
}

/// Catalog areas the snapshot does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IgnoredKind {
    /// How drills ended: written once, read by operators, never routed on.
    DrillAudit,
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogKey {
    Gateway {
        cluster: ClusterName,
        gateway: GatewayId,
    },
    Export(ExportKey),
    Vip(VipKey),
    /// An address claim: `ip` of `cluster`'s VIP range is taken.
    AddressClaim {
        cluster: ClusterName,
        ip: IpAddr,
    },
    /// A clusterset service's failover policy.
    Policy(ServiceKey),
    /// A clusterset service's per-request routing rules.
    Routes(ServiceKey),
    /// An operator drill.
    Drill(DrillId),
    Ignored(IgnoredKind),
}

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLayout {
    /// `<prefix>/v1/`
    root: String,
}

impl KeyLayout {
    /// A layout under `prefix` (e.g. `/meshup`).
    pub fn new(prefix: &str) -> Result<Self, KeyError> {
        let ok = prefix.starts_with('/')
            && !prefix.ends_with('/')
            && !prefix[1..].split('/').any(str::is_empty);
        if !ok {
            return Err(KeyError::BadPrefix(prefix.to_owned()));
        }
        Ok(Self {
            root: format!("{prefix}/{LAYOUT_VERSION}/"),
        })
    }

    /// `<prefix>/v1/`: everything the watcher watches.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `<prefix>/v1/clusters/<cluster>/gateways/<gateway-id>`
    pub fn gateway(&self, cluster: &ClusterName, gateway: &GatewayId) -> String {
        format!("{}clusters/{cluster}/gateways/{gateway}", self.root)
    }

    /// `<prefix>/v1/clusters/<cluster>/gateways/<gateway-id>/exports/<ns>/<name>`
    pub fn export(&self, key: &ExportKey) -> String {
        format!(
            "{}/exports/{}/{}",
            self.gateway(&key.cluster, &key.gateway),
            key.service.namespace,
            key.service.name
        )
    }

    /// The prefix under which a gateway's exports live (with trailing '/').
    pub fn exports_of(&self, cluster: &ClusterName, gateway: &GatewayId) -> String {
        format!("{}/exports/", self.gateway(cluster, gateway))
    }

    /// `<prefix>/v1/vips/<cluster>/<ns>/<name>[/pinned/<target>]`
    pub fn vip(&self, key: &VipKey) -> String {
        let base = format!(
            "{}vips/{}/{}/{}",
            self.root, key.cluster, key.service.namespace, key.service.name
        );
        match &key.target {
            Some(target) => format!("{base}/pinned/{target}"),
            None => base,
        }
    }

    /// `<prefix>/v1/vips/<cluster>/`: every VIP of one cluster.
    pub fn vips_of(&self, cluster: &ClusterName) -> String {
        format!("{}vips/{cluster}/", self.root)
    }

    /// `<prefix>/v1/policies/<ns>/<name>`
    pub fn policy(&self, service: &ServiceKey) -> String {
        format!(
            "{}policies/{}/{}",
            self.root, service.namespace, service.name
        )
    }

    /// `<prefix>/v1/routes/<ns>/<name>`
    pub fn routes(&self, service: &ServiceKey) -> String {
        format!("{}routes/{}/{}", self.root, service.namespace, service.name)
    }

    /// `<prefix>/v1/drills/<drill-id>`
    pub fn drill(&self, id: &DrillId) -> String {
        format!("{}drills/{id}", self.root)
    }

    /// `<prefix>/v1/drills/`: every drill.
    pub fn drills(&self) -> String {
        format!("{}drills/", self.root)
    }

    /// `<prefix>/v1/drill-audit/<drill-id>`
    pub fn drill_audit(&self, id: &DrillId) -> String {
        format!("{}drill-audit/{id}", self.root)
    }

    /// `<prefix>/v1/drill-audit/`: every drill audit entry.
    pub fn drill_audits(&self) -> String {
        format!("{}drill-audit/", self.root)
    }

    /// `<prefix>/v1/vip-claims/<cluster>/<ip>`
    pub fn address_claim(&self, cluster: &ClusterName, ip: IpAddr) -> String {
        format!("{}vip-claims/{cluster}/{ip}", self.root)
    }

    /// `<prefix>/v1/vip-claims/<cluster>/`: every claimed address of one cluster.
    pub fn address_claims_of(&self, cluster: &ClusterName) -> String {
        format!("{}vip-claims/{cluster}/", self.root)
    }

    /// Parses a key read from the store.
    pub fn parse(&self, key: &[u8]) -> Result<CatalogKey, KeyError> {
        let key = std::str::from_utf8(key).map_err(|_| KeyError::NotUtf8)?;
        let rest = key
            .strip_prefix(self.root.as_str())
            .ok_or_else(|| KeyError::OutsidePrefix(key.to_owned()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name_err = |source| KeyError::BadName {
            key: key.to_owned(),
            source,
        };
        let cluster = |s: &str| ClusterName::new(s).map_err(name_err);
        let gateway = |s: &str| GatewayId::new(s).map_err(name_err);
        let service = |ns: &str, name: &str| ServiceKey::parse(ns, name).map_err(name_err);
        match parts.as_slice() {
            ["clusters", c, "gateways", g] => Ok(CatalogKey::Gateway {
                cluster: cluster(c)?,
                gateway: gateway(g)?,
            }),
            ["clusters", c, "gateways", g, "exports", ns, name] => {
                Ok(CatalogKey::Export(ExportKey {
                    cluster: cluster(c)?,
                    gateway: gateway(g)?,
                    service: service(ns, name)?,
                }))
            }
            ["vips", c, ns, name] => Ok(CatalogKey::Vip(VipKey {
                cluster: cluster(c)?,
                service: service(ns, name)?,
                target: None,
            })),
            ["vips", c, ns, name, "pinned", t] => Ok(CatalogKey::Vip(VipKey {
                cluster: cluster(c)?,
                service: service(ns, name)?,
                target: Some(cluster(t)?),
            })),
            ["vip-claims", c, ip] => Ok(CatalogKey::AddressClaim {
                cluster: cluster(c)?,
                ip: ip.parse().map_err(|_| KeyError::BadAddress {
                    key: key.to_owned(),
                    text: (*ip).to_owned(),
                })?,
            }),
            ["policies", ns, name] => Ok(CatalogKey::Policy(service(ns, name)?)),
            ["routes", ns, name] => Ok(CatalogKey::Routes(service(ns, name)?)),
            ["drills", id] => Ok(CatalogKey::Drill(DrillId::new(id).map_err(name_err)?)),
            ["drill-audit", _] => Ok(CatalogKey::Ignored(IgnoredKind::DrillAudit)),
            _ => Err(KeyError::Unrecognized(key.to_owned())),
        }
    }
}

impl Default for KeyLayout {
    fn default() -> Self {
        Self {
            root: format!("{DEFAULT_PREFIX}/{LAYOUT_VERSION}/"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).expect("valid")
    }
    fn g(s: &str) -> GatewayId {
        GatewayId::new(s).expect("valid")
    }
    fn svc(s: &str) -> ServiceKey {
        s.parse().expect("valid")
    }

    #[test]
    fn keys_round_trip() {
        let l = KeyLayout::new("/meshup").expect("prefix");
        let export = ExportKey {
            cluster: c("east"),
            gateway: g("gw-0"),
            service: svc("pay.prod"),
        };
        let vip = VipKey {
            cluster: c("east"),
            service: svc("pay.prod"),
            target: None,
        };
        let pinned = VipKey {
            target: Some(c("west")),
            ..vip.clone()
        };
        let ip: IpAddr = "127.77.0.9".parse().expect("ip");
        let table: Vec<(String, CatalogKey)> = vec![
            (
                "/meshup/v1/clusters/east/gateways/gw-0".into(),
                CatalogKey::Gateway {
                    cluster: c("east"),
                    gateway: g("gw-0"),
                },
            ),
            (
                "/meshup/v1/clusters/east/gateways/gw-0/exports/prod/pay".into(),
                CatalogKey::Export(export.clone()),
            ),
            (
                "/meshup/v1/vips/east/prod/pay".into(),
                CatalogKey::Vip(vip.clone()),
            ),
            (
                "/meshup/v1/vips/east/prod/pay/pinned/west".into(),
                CatalogKey::Vip(pinned.clone()),
            ),
            (
                "/meshup/v1/vip-claims/east/127.77.0.9".into(),
                CatalogKey::AddressClaim {
                    cluster: c("east"),
                    ip,
                },
            ),
        ];
        for (key, parsed) in &table {
            assert_eq!(l.parse(key.as_bytes()).as_ref(), Ok(parsed), "{key}");
        }
        assert_eq!(l.gateway(&c("east"), &g("gw-0")), table[0].0);
        assert_eq!(l.export(&export), table[1].0);
        assert_eq!(l.vip(&vip), table[2].0);
        assert_eq!(l.vip(&pinned), table[3].0);
        assert_eq!(l.address_claim(&c("east"), ip), table[4].0);
    }

    #[test]
    fn bad_and_ignored_keys() {
        let l = KeyLayout::new("/m").expect("prefix");
        assert_eq!(
            l.parse(b"/m/v1/policies/prod/pay"),
            Ok(CatalogKey::Policy(svc("pay.prod")))
        );
        assert_eq!(l.policy(&svc("pay.prod")), "/m/v1/policies/prod/pay");
        assert_eq!(
            l.parse(b"/m/v1/routes/prod/pay"),
            Ok(CatalogKey::Routes(svc("pay.prod")))
        );
        assert_eq!(l.routes(&svc("pay.prod")), "/m/v1/routes/prod/pay");
        let drill = DrillId::new("drain-east").expect("valid");
        assert_eq!(
            l.parse(b"/m/v1/drills/drain-east"),
            Ok(CatalogKey::Drill(drill.clone()))
        );
        assert_eq!(l.drill(&drill), "/m/v1/drills/drain-east");
        assert_eq!(
            l.parse(l.drill_audit(&drill).as_bytes()),
            Ok(CatalogKey::Ignored(IgnoredKind::DrillAudit))
        );
        assert_eq!(l.drill_audit(&drill), "/m/v1/drill-audit/drain-east");
        assert!(l.drill_audit(&drill).starts_with(&l.drill_audits()));
        assert!(!l.drill(&drill).starts_with(&l.drill_audits()));
        for bad in [
            "/m/v1/policies/prod",
            "/m/v1/policies/prod/pay/x",
            "/m/v1/routes/prod",
            "/m/v1/drills/a/b",
        ] {
            assert!(
                matches!(l.parse(bad.as_bytes()), Err(KeyError::Unrecognized(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            l.parse(b"/m/v1/drills/Drain_East"),
            Err(KeyError::BadName { .. })
        ));
        type Check = fn(&KeyError) -> bool;
        let bad: [(&[u8], Check); 9] = [
            (b"/m/v1/clusters/East/gateways/gw", |e| {
                matches!(e, KeyError::BadName { .. })
            }),
            (b"/m/v1/clusters/east/gateways/", |e| {
                matches!(e, KeyError::BadName { .. })
            }),
            (b"/m/v1/clusters/east/gateways/gw/exports/prod", |e| {
                matches!(e, KeyError::Unrecognized(_))
            }),
            (b"/m/v1/clusters/east/gateways/gw/exports/prod/9pay", |e| {
                matches!(e, KeyError::BadName { .. })
            }),
            (b"/m/v2/clusters/east/gateways/gw", |e| {
                matches!(e, KeyError::OutsidePrefix(_))
            }),
            (b"/other", |e| matches!(e, KeyError::OutsidePrefix(_))),
            (b"/m/v1/\xff", |e| matches!(e, KeyError::NotUtf8)),
            (b"/m/v1/vip-claims/east/not-an-ip", |e| {
                matches!(e, KeyError::BadAddress { .. })
            }),
            (b"/m/v1/surprise", |e| {
                matches!(e, KeyError::Unrecognized(_))
            }),
        ];
        for (key, check) in bad {
            let result = l.parse(key);
            assert!(matches!(&result, Err(e) if check(e)), "{key:?}: {result:?}");
        }
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(KeyLayout::new("/meshup").is_ok());
        assert!(KeyLayout::new("/a/b").is_ok());
        for bad in ["", "meshup", "/meshup/", "/a//b", "/"] {
            assert!(KeyLayout::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            KeyLayout::default(),
            KeyLayout::new(DEFAULT_PREFIX).expect("default")
        );
    }
}

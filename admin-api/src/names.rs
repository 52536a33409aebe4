//! The names the API takes: services (`pay.prod`) and what `Resolve` accepts (a DNS name of
//! the clusterset zone, pinned or not, or a service). Pure, table-tested.

use meshup_core::names::{ClusterName, NameError, ServiceKey};

/// What a name passed to `Resolve` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveName {
    pub service: ServiceKey,
    /// A cluster-pinned name (`<svc>.<ns>.svc.<cluster>.<zone>`): only that cluster serves it.
    pub cluster: Option<ClusterName>,
}

/// Why a name cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("{0}")]
    Name(#[from] NameError),
    #[error(
        "{name:?} is not a name this gateway answers: use <service>.<namespace>.svc.{zone}, <service>.<namespace>.svc.<cluster>.{zone}, or <service>.<namespace>"
    )]
    Shape { name: String, zone: String },
}

/// Parses a service as operators type it: `<name>.<namespace>`.
pub fn parse_service(text: &str) -> Result<ServiceKey, NameError> {
    text.trim().parse()
}

/// Parses a name for `Resolve`: `<svc>.<ns>.svc.<zone>` (the clusterset name),
/// `<svc>.<ns>.svc.<cluster>.<zone>` (pinned to one cluster), or `<svc>.<ns>`. Case and a
/// trailing dot do not matter, as in DNS.
pub fn parse_resolve_name(name: &str, zone: &str) -> Result<ResolveName, BadName> {
    let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
    let zone = zone.trim_end_matches('.').to_ascii_lowercase();
    let shape = || BadName::Shape {
        name: name.to_owned(),
        zone: zone.clone(),
    };
    let labels: Vec<&str> = lower.split('.').collect();
    if labels.len() == 2 {
        return Ok(ResolveName {
            service: ServiceKey::parse(labels[1], labels[0])?,
            cluster: None,
        });
    }
    let head = lower
        .strip_suffix(zone.as_str())
        .and_then(|h| h.strip_suffix('.'))
        .ok_or_else(shape)?;
    match head.split('.').collect::<Vec<_>>().as_slice() {
        [svc, ns, "svc"] => Ok(ResolveName {
            service: ServiceKey::parse(ns, svc)?,
            cluster: None,
        }),
        [svc, ns, "svc", cluster] => Ok(ResolveName {
            service: ServiceKey::parse(ns, svc)?,
            cluster: Some(ClusterName::new(cluster)?),
        }),
        _ => Err(shape()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_names_in_every_form() {
        let zone = "clusterset.local";
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        for name in [
            "pay.prod.svc.clusterset.local",
            "pay.prod.svc.clusterset.local.",
            "Pay.Prod.svc.ClusterSet.local",
            "pay.prod",
        ] {
            let r = parse_resolve_name(name, zone).expect(name);
            assert_eq!((r.service, r.cluster), (pay.clone(), None), "{name}");
        }
        let pinned = parse_resolve_name("pay.prod.svc.west.clusterset.local", zone).expect("ok");
        assert_eq!(pinned.cluster.map(|c| c.to_string()), Some("west".into()));
        for bad in [
            "pay",
            "pay.prod.svc.other.zone",
            "pay.prod.svc.a.b.clusterset.local",
            "pay.prod.pod.clusterset.local",
            "",
        ] {
            let err = parse_resolve_name(bad, zone).expect_err(bad);
            assert!(
                err.to_string().contains("<service>.<namespace>"),
                "{bad}: {err}"
            );
        }
        let err = parse_resolve_name("Pay_x.prod", zone).expect_err("bad label");
        assert!(err.to_string().contains("pay_x"), "{err}");
    }
}

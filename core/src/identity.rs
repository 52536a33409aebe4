//! SPIFFE IDs, parsed strictly, and the gateway identity they carry.
//!
//! A gateway's SPIFFE ID is `spiffe://<trust-domain>/cluster/<cluster>/gateway`; an operator's
//! (a person or tool with remote admin rights, docs/admin-api.md) is
//! `spiffe://<trust-domain>/operator/<name>`. The two path forms cannot overlap, so a gateway
//! certificate is never an operator and an operator certificate is never a gateway. The parser
//! follows the SPIFFE ID specification (SPIFFE-ID.md §2): lowercase trust domain of
//! `[a-z0-9.-_]`, no port, user info, query or fragment; path segments of `[A-Za-z0-9.-_]`,
//! none empty, `.` or `..`; at most 2048 bytes in all. Certificate checks (one URI SAN, leaf
//! not a CA, chain to the bundle) live with the TLS code; this module only judges the text.

use std::fmt;
use std::str::FromStr;

use crate::names::{ClusterName, NameError};

/// Longest SPIFFE ID the spec allows, in bytes.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain the spec allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID or gateway identity was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID {0:?} must start with \"spiffe://\" (lowercase scheme)")]
    BadScheme(String),
    #[error("SPIFFE ID {0:?} has no trust domain")]
    EmptyTrustDomain(String),
    #[error(
        "trust domain {0:?} may hold only lowercase letters, digits, '.', '-' and '_' (no port, no user info)"
    )]
    BadTrustDomain(String),
    #[error("SPIFFE ID {0:?} may not carry a query or a fragment")]
    QueryOrFragment(String),
    #[error(
        "SPIFFE ID {0:?} has a bad path: segments must be non-empty, not '.' or '..', of letters, digits, '.', '-' and '_'"
    )]
    BadPath(String),
    #[error(
        "SPIFFE ID {0:?} is not a gateway identity (want spiffe://<trust-domain>/cluster/<cluster>/gateway)"
    )]
    NotAGateway(String),
    #[error("SPIFFE ID names a bad cluster: {0}")]
    BadCluster(#[from] NameError),
    #[error(
        "SPIFFE ID {0:?} is not an operator identity (want spiffe://<trust-domain>/operator/<name>)"
    )]
    NotAnOperator(String),
    #[error(
        "operator name {0:?} is invalid: use 1 to 63 lowercase letters, digits and '-', starting with a letter and not ending with '-' (and not \"local\", which names loopback callers)"
    )]
    BadOperatorName(String),
}

/// A parsed SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    /// The path, with its leading '/', or empty.
    path: String,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(id: &str) -> Result<Self, IdentityError> {
        if id.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        let rest = id
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::BadScheme(id.to_owned()))?;
        if rest.contains(['?', '#']) {
            return Err(IdentityError::QueryOrFragment(id.to_owned()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        check_trust_domain(td).map_err(|e| match e {
            IdentityError::EmptyTrustDomain(_) => IdentityError::EmptyTrustDomain(id.to_owned()),
            other => other,
        })?;
        if !path.is_empty() {
            let segments_ok = path[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            });
            if !segments_ok {
                return Err(IdentityError::BadPath(id.to_owned()));
            }
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The trust domain (`example.org`).
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path with its leading '/', or "" for a trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// Checks a trust domain name on its own (as given in configuration).
pub fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::EmptyTrustDomain(td.to_owned()));
    }
    let ok = td.len() <= MAX_TRUST_DOMAIN_LEN
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadTrustDomain(td.to_owned()))
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({self})")
    }
}

/// Who a gateway is: its trust domain and its cluster.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GatewayIdentity {
    pub trust_domain: String,
    pub cluster: ClusterName,
}

impl GatewayIdentity {
    /// Builds an identity from a validated trust domain and cluster.
    pub fn new(trust_domain: &str, cluster: ClusterName) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            cluster,
        })
    }

    /// Reads a gateway identity out of a SPIFFE ID of the form
    /// `spiffe://<td>/cluster/<cluster>/gateway`.
    pub fn from_spiffe_id(id: &SpiffeId) -> Result<Self, IdentityError> {
        let mut parts = id.path().split('/').skip(1);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("cluster"), Some(cluster), Some("gateway"), None) => Ok(Self {
                trust_domain: id.trust_domain().to_owned(),
                cluster: ClusterName::new(cluster)?,
            }),
            _ => Err(IdentityError::NotAGateway(id.to_string())),
        }
    }

    /// The SPIFFE ID of this gateway identity.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            path: format!("/cluster/{}/gateway", self.cluster),
        }
    }
}

impl fmt::Debug for GatewayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GatewayIdentity({})", self.spiffe_id())
    }
}

impl fmt::Display for GatewayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spiffe_id().fmt(f)
    }
}

/// The name loopback callers are recorded under; no operator certificate may carry it.
pub const LOCAL_CALLER: &str = "local";
/// Longest operator name, in bytes (a DNS label).
pub const MAX_OPERATOR_NAME_LEN: usize = 63;

/// Checks an operator name: a DNS label (`ana`, `ci-deploy`), never [`LOCAL_CALLER`].
pub fn check_operator_name(name: &str) -> Result<(), IdentityError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= MAX_OPERATOR_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && name != LOCAL_CALLER;
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadOperatorName(name.to_owned()))
    }
}

/// Who an operator is: a name under a trust domain, from an operator certificate
/// (`meshup certs issue --operator NAME`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct OperatorIdentity {
    pub trust_domain: String,
    /// A DNS label, checked by [`check_operator_name`].
    pub name: String,
}

impl OperatorIdentity {
    /// Builds an identity from a trust domain and a name, both checked.
    pub fn new(trust_domain: &str, name: &str) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        check_operator_name(name)?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Reads an operator identity out of a SPIFFE ID of the form
    /// `spiffe://<td>/operator/<name>`.
    pub fn from_spiffe_id(id: &SpiffeId) -> Result<Self, IdentityError> {
        let mut parts = id.path().split('/').skip(1);
        match (parts.next(), parts.next(), parts.next()) {
            (Some("operator"), Some(name), None) => {
                check_operator_name(name)?;
                Ok(Self {
                    trust_domain: id.trust_domain().to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(IdentityError::NotAnOperator(id.to_string())),
        }
    }

    /// The SPIFFE ID of this operator.
    pub fn spiffe_id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.trust_domain.clone(),
            path: format!("/operator/{}", self.name),
        }
    }
}

impl fmt::Debug for OperatorIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperatorIdentity({})", self.spiffe_id())
    }
}

impl fmt::Display for OperatorIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.spiffe_id().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_parsed_strictly() {
        let long = format!("spiffe://td/{}", "a".repeat(2048));
        let cases: &[(&str, bool)] = &[
            ("spiffe://example.org/cluster/east/gateway", true),
            ("spiffe://example.org", true),
            ("spiffe://my_td-1.org/a.b/c-d/e_f", true),
            ("SPIFFE://example.org/x", false),
            ("https://example.org/x", false),
            ("spiffe:///x", false),
            ("spiffe://Example.org/x", false),
            ("spiffe://example.org:8080/x", false),
            ("spiffe://user@example.org/x", false),
            ("spiffe://example.org/", false),
            ("spiffe://example.org//x", false),
            ("spiffe://example.org/x/", false),
            ("spiffe://example.org/./x", false),
            ("spiffe://example.org/../x", false),
            ("spiffe://example.org/x?y=1", false),
            ("spiffe://example.org/x#y", false),
            ("spiffe://example.org/x%20y", false),
            (&long, false),
        ];
        for (id, ok) in cases {
            assert_eq!(SpiffeId::parse(id).is_ok(), *ok, "{id:?}");
        }
    }

    #[test]
    fn gateway_identity_reads_the_cluster() {
        let id = SpiffeId::parse("spiffe://mesh.local/cluster/east/gateway").expect("valid");
        let gw = GatewayIdentity::from_spiffe_id(&id).expect("gateway");
        assert_eq!(gw.cluster.as_str(), "east");
        assert_eq!(gw.trust_domain, "mesh.local");
        assert_eq!(gw.spiffe_id(), id);

        for bad in [
            "spiffe://mesh.local/cluster/east",
            "spiffe://mesh.local/cluster/east/gateway/extra",
            "spiffe://mesh.local/ns/east/sa/gateway",
            "spiffe://mesh.local/cluster/East/gateway",
            "spiffe://mesh.local",
        ] {
            let id = SpiffeId::parse(bad).expect("syntactically valid");
            assert!(GatewayIdentity::from_spiffe_id(&id).is_err(), "{bad}");
        }
    }

    #[test]
    fn operator_and_gateway_ids_never_overlap() {
        let cases: &[(&str, Option<&str>, bool)] = &[
            // id, operator name if it is one, whether it is a gateway
            ("spiffe://mesh.local/operator/ana", Some("ana"), false),
            (
                "spiffe://mesh.local/operator/ci-deploy-2",
                Some("ci-deploy-2"),
                false,
            ),
            ("spiffe://mesh.local/cluster/east/gateway", None, true),
            ("spiffe://mesh.local/operator/local", None, false),
            ("spiffe://mesh.local/operator/Ana", None, false),
            ("spiffe://mesh.local/operator/-ana", None, false),
            ("spiffe://mesh.local/operator/ana-", None, false),
            ("spiffe://mesh.local/operator/9ana", None, false),
            ("spiffe://mesh.local/operator/a_b", None, false),
            ("spiffe://mesh.local/operator/ana/extra", None, false),
            ("spiffe://mesh.local/operator", None, false),
            ("spiffe://mesh.local/operators/ana", None, false),
            ("spiffe://mesh.local/cluster/ana/operator", None, false),
            ("spiffe://mesh.local", None, false),
        ];
        for (text, operator, gateway) in cases {
            let id = SpiffeId::parse(text).expect("syntactically valid");
            let op = OperatorIdentity::from_spiffe_id(&id);
            assert_eq!(
                op.as_ref().ok().map(|o| o.name.as_str()),
                *operator,
                "{text}"
            );
            if let Ok(op) = op {
                assert_eq!(op.spiffe_id(), id, "{text}");
                assert_eq!(op.trust_domain, "mesh.local");
            }
            assert_eq!(
                GatewayIdentity::from_spiffe_id(&id).is_ok(),
                *gateway,
                "{text}"
            );
        }
        let long = "a".repeat(MAX_OPERATOR_NAME_LEN + 1);
        assert!(check_operator_name(&long).is_err());
        assert!(check_operator_name(&long[1..]).is_ok());
        assert!(matches!(
            OperatorIdentity::new("mesh.local", "local"),
            Err(IdentityError::BadOperatorName(_))
        ));
        assert!(OperatorIdentity::new("Mesh", "ana").is_err());
    }
}

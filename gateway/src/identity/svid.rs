//! SPIFFE X.509-SVID rules on a leaf certificate, as a pure function of its DER bytes.
//!
//! The chain itself is verified by webpki against the trust bundle ([`super::verify`]); this
//! adds what webpki does not know about (docs/reliability.md promise 14): exactly one URI SAN, a
//! valid gateway SPIFFE ID, the trust domain equal to ours, the leaf not a CA, and (when the
//! caller knows whom it dialed) the cluster equal to the expected one.

use meshup_core::identity::{GatewayIdentity, SpiffeId};
use meshup_core::names::ClusterName;
use thiserror::Error;
use x509_parser::prelude::*;

/// Why a peer certificate broke the SVID rules. Never retryable with the same certificate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SvidError {
    #[error("peer certificate is not valid X.509")]
    BadEncoding,
    #[error("peer certificate has {0} URI SANs; an SVID has exactly one")]
    UriSanCount(usize),
    #[error("peer certificate URI SAN {0:?} is not a valid gateway SPIFFE ID")]
    NotAGateway(String),
    #[error("peer trust domain {found:?} is not ours ({expected:?})")]
    WrongTrustDomain { expected: String, found: String },
    #[error("peer is cluster {found:?} but we dialed a gateway of cluster {expected:?}")]
    WrongCluster { expected: String, found: String },
    #[error("peer leaf certificate is flagged as a CA; an SVID leaf must not be")]
    LeafIsCa,
}

impl SvidError {
    /// Metric label for handshake failures.
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::BadEncoding => "bad_encoding",
            SvidError::UriSanCount(_) | SvidError::NotAGateway(_) | SvidError::LeafIsCa => {
                "not_an_svid"
            }
            SvidError::WrongTrustDomain { .. } => "wrong_trust_domain",
            SvidError::WrongCluster { .. } => "wrong_cluster",
        }
    }
}

/// Who a verified peer is, read from its leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    pub identity: GatewayIdentity,
    /// Certificate serial number, lower-case hex: tells rotations apart in logs and tests.
    pub serial: String,
    /// Validity of the peer's certificate (Unix seconds), to bound connection lifetimes.
    pub not_before: i64,
    pub not_after: i64,
}

/// The trust domain named by a certificate's first SPIFFE URI SAN, if any.
pub fn trust_domain_of(leaf_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(leaf_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::URI(u) => SpiffeId::parse(u)
            .ok()
            .map(|id| id.trust_domain().to_owned()),
        _ => None,
    })
}

/// Every URI SAN of a certificate; `None` if its SAN extension does not parse.
pub(super) fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Option<Vec<&'a str>> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => Some(
            san.value
                .general_names
                .iter()
                .filter_map(|g| match g {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
        ),
        Ok(None) => Some(Vec::new()),
        Err(_) => None,
    }
}

/// Applies the SVID rules to a leaf certificate.
pub fn check_svid(
    leaf_der: &[u8],
    trust_domain: &str,
    expected_cluster: Option<&ClusterName>,
) -> Result<PeerIdentity, SvidError> {
    let (_, cert) = X509Certificate::from_der(leaf_der).map_err(|_| SvidError::BadEncoding)?;
    if cert.is_ca() {
        return Err(SvidError::LeafIsCa);
    }
    let uris = uri_sans(&cert).ok_or(SvidError::BadEncoding)?;
    let [uri] = uris.as_slice() else {
        return Err(SvidError::UriSanCount(uris.len()));
    };
    let identity = SpiffeId::parse(uri)
        .ok()
        .and_then(|id| GatewayIdentity::from_spiffe_id(&id).ok())
        .ok_or_else(|| SvidError::NotAGateway((*uri).to_owned()))?;
    if identity.trust_domain != trust_domain {
        return Err(SvidError::WrongTrustDomain {
            expected: trust_domain.to_owned(),
            found: identity.trust_domain,
        });
    }
    if let Some(expected) = expected_cluster
        && &identity.cluster != expected
    {
        return Err(SvidError::WrongCluster {
            expected: expected.to_string(),
            found: identity.cluster.to_string(),
        });
    }
    Ok(PeerIdentity {
        identity,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

//! Operator certificates on the remote admin API: webpki chain verification against the
//! gateway's (hot-reloaded) trust bundle, then the operator rules, as a pure function of the
//! leaf's DER bytes: exactly one URI SAN, `spiffe://<our trust domain>/operator/<name>`, the
//! leaf not a CA, and the certificate allowed to authenticate a client.
//!
//! A gateway SVID (`/cluster/<c>/gateway`) fails here, and an operator certificate fails the
//! gateway rules of [`super::svid`]: the two roles never stand in for each other.

use std::sync::Arc;

use meshup_core::identity::{OperatorIdentity, SpiffeId};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};
use thiserror::Error;
use x509_parser::prelude::*;

use super::Identity;
use super::svid::{check_svid, uri_sans};
use super::verify::map_webpki_error;
use super::verify::tls13_signatures;

/// Why a client certificate is not an operator of this trust domain. Never retryable with the
/// same certificate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OperatorCertError {
    #[error("client certificate is not valid X.509")]
    BadEncoding,
    #[error("client certificate has {0} URI SANs; an operator certificate has exactly one")]
    UriSanCount(usize),
    #[error(
        "client certificate {0:?} is not an operator identity (spiffe://<trust-domain>/operator/<name>): issue one with `meshup certs issue --operator NAME`"
    )]
    NotAnOperator(String),
    #[error("operator trust domain {found:?} is not ours ({expected:?})")]
    WrongTrustDomain { expected: String, found: String },
    #[error("client leaf certificate is flagged as a CA; an operator certificate must not be")]
    LeafIsCa,
}

/// Applies the operator rules to a leaf certificate whose chain is verified already.
pub fn check_operator_cert(
    leaf_der: &[u8],
    trust_domain: &str,
) -> Result<OperatorIdentity, OperatorCertError> {
    let (_, cert) =
        X509Certificate::from_der(leaf_der).map_err(|_| OperatorCertError::BadEncoding)?;
    if cert.is_ca() {
        return Err(OperatorCertError::LeafIsCa);
    }
    let uris = uri_sans(&cert).ok_or(OperatorCertError::BadEncoding)?;
    let [uri] = uris.as_slice() else {
        return Err(OperatorCertError::UriSanCount(uris.len()));
    };
    let operator = SpiffeId::parse(uri)
        .ok()
        .and_then(|id| OperatorIdentity::from_spiffe_id(&id).ok())
        .ok_or_else(|| OperatorCertError::NotAnOperator((*uri).to_owned()))?;
    if operator.trust_domain != trust_domain {
        return Err(OperatorCertError::WrongTrustDomain {
            expected: trust_domain.to_owned(),
            found: operator.trust_domain,
        });
    }
    Ok(operator)
}

/// Verifies admin clients: chain to the gateway's current bundle for client authentication,
/// then [`check_operator_cert`]. A client without a certificate is refused (mandatory).
#[derive(Debug)]
pub struct OperatorVerifier {
    identity: Arc<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl OperatorVerifier {
    /// A verifier bound to `identity`'s trust domain and bundle (read at every handshake).
    pub fn new(identity: Arc<Identity>) -> Arc<Self> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Arc::new(Self {
            identity,
            algorithms,
        })
    }

    /// The operator a verified leaf names (the TLS layer has verified it by the time the
    /// connection exists; this reads the name back).
    pub fn operator_of(&self, leaf_der: &[u8]) -> Result<OperatorIdentity, OperatorCertError> {
        check_operator_cert(leaf_der, &self.identity.trust_domain)
    }
}

impl ClientCertVerifier for OperatorVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let material = self.identity.current();
        let refuse = |reason: &str, error: rustls::Error| {
            tracing::info!(reason, error = %error, "admin client certificate refused");
            error
        };
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            refuse(
                "bad_encoding",
                rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
            )
        })?;
        cert.verify_for_usage(
            self.algorithms.all,
            &material.anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            let (reason, error) = map_webpki_error(e);
            refuse(reason, error)
        })?;
        self.operator_of(end_entity.as_ref()).map_err(|e| {
            refuse(
                "not_an_operator",
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(e),
                ))),
            )
        })?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!(rustls::PeerIncompatible::Tls12NotOffered);
}

/// What the CLI checks of the gateway it calls on the remote admin API: the chain verifies
/// against the federation bundle it was given, for server authentication, and the leaf is a
/// gateway SVID of the operator's own trust domain (any cluster: the operator dials an
/// address, not a cluster).
#[derive(Debug)]
pub struct AdminServerVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl AdminServerVerifier {
    pub fn new(anchors: Vec<TrustAnchor<'static>>, trust_domain: &str) -> Arc<Self> {
        Arc::new(Self {
            anchors,
            trust_domain: trust_domain.to_owned(),
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for AdminServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| map_webpki_error(e).1)?;
        check_svid(end_entity.as_ref(), &self.trust_domain, None).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(e),
            )))
        })?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!(rustls::PeerIncompatible::Tls12NotOffered);
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::certs::{self, LeafSpec};
    use rustls::pki_types::pem::PemObject;

    fn leaf(spec: &LeafSpec) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        certs::init_ca("mesh.test", &ca).expect("ca");
        let out = dir.path().join("leaf");
        certs::write_leaf(&ca, spec, &out).expect("leaf");
        let pem = std::fs::read(out.join(certs::CERT_FILE)).expect("read");
        CertificateDer::from_pem_slice(&pem)
            .expect("pem")
            .as_ref()
            .to_vec()
    }

    #[test]
    fn only_operator_ids_of_our_trust_domain_pass() {
        let op = LeafSpec::operator("mesh.test", "ana");
        let mut two = op.clone();
        two.uri_sans.push("spiffe://mesh.test/operator/bo".into());
        let mut none = op.clone();
        none.uri_sans.clear();
        let mut ca_leaf = op.clone();
        ca_leaf.is_ca = true;
        let mut expired = op.clone();
        expired.not_before = SystemTime::now() - Duration::from_secs(7200);
        expired.not_after = SystemTime::now() - Duration::from_secs(3600);
        let cases: Vec<(&str, LeafSpec, Result<&str, OperatorCertError>)> = vec![
            ("operator", op.clone(), Ok("ana")),
            // Validity is the chain verifier's business, not this pure check's.
            ("expired operator", expired, Ok("ana")),
            (
                "gateway SVID",
                LeafSpec::gateway("mesh.test", "east"),
                Err(OperatorCertError::NotAnOperator(
                    "spiffe://mesh.test/cluster/east/gateway".into(),
                )),
            ),
            (
                "other trust domain",
                LeafSpec::operator("other.test", "ana"),
                Err(OperatorCertError::WrongTrustDomain {
                    expected: "mesh.test".into(),
                    found: "other.test".into(),
                }),
            ),
            ("two URI SANs", two, Err(OperatorCertError::UriSanCount(2))),
            ("no URI SAN", none, Err(OperatorCertError::UriSanCount(0))),
            ("CA leaf", ca_leaf, Err(OperatorCertError::LeafIsCa)),
            (
                "reserved name",
                LeafSpec::operator("mesh.test", "local"),
                Err(OperatorCertError::NotAnOperator(
                    "spiffe://mesh.test/operator/local".into(),
                )),
            ),
        ];
        for (what, spec, want) in cases {
            let got = check_operator_cert(&leaf(&spec), "mesh.test");
            assert_eq!(
                got.as_ref().map(|o| o.name.as_str()),
                want.as_ref().map(|n| *n),
                "{what}"
            );
        }
        assert_eq!(
            check_operator_cert(b"not a certificate", "mesh.test"),
            Err(OperatorCertError::BadEncoding)
        );
    }
}

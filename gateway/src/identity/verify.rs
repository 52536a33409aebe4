//! rustls verifiers: webpki chain verification against the (hot-reloaded) trust bundle plus
//! the SVID rules of [`super::svid`].
//!
//! One type serves both directions. Outbound, the cluster we dialed travels in the TLS server
//! name ([`server_name_for`]), so one `ClientConfig` serves every peer and the verifier still
//! knows which cluster the server must be. Inbound, any cluster of our trust domain may
//! connect; the caller's cluster is read from its certificate afterwards.

use std::sync::Arc;

use meshup_core::names::ClusterName;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};

use super::Identity;
use super::svid::{SvidError, check_svid};

/// The three signature methods every verifier here shares: TLS 1.3 signatures checked with
/// the verifier's `algorithms`, TLS 1.2 refused with `$tls12` (no config we build offers it).
macro_rules! tls13_signatures {
    ($tls12:expr) => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &rustls::pki_types::CertificateDer<'_>,
            _dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible($tls12))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.algorithms.supported_schemes()
        }
    };
}
pub(super) use tls13_signatures;

/// Suffix of the TLS server name that carries the expected cluster.
const SERVER_NAME_SUFFIX: &str = "cluster.meshup.invalid";

/// The TLS server name to dial a gateway of `cluster` with; the verifier reads the cluster
/// back from it. (`.invalid` can never resolve, so it is never mistaken for a DNS name.)
pub fn server_name_for(cluster: &ClusterName) -> String {
    format!("{cluster}.{SERVER_NAME_SUFFIX}")
}

fn cluster_from_server_name(name: &ServerName<'_>) -> Option<ClusterName> {
    let ServerName::DnsName(dns) = name else {
        return None;
    };
    let label = dns
        .as_ref()
        .strip_suffix(SERVER_NAME_SUFFIX)?
        .strip_suffix('.')?;
    ClusterName::new(label).ok()
}

/// Verifies peers against the identity's current bundle and trust domain.
#[derive(Debug)]
pub struct PeerVerifier {
    identity: Arc<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    /// A verifier bound to `identity` (its bundle is read at every handshake, so bundle
    /// rotation takes effect without rebuilding TLS configs).
    pub fn new(identity: Arc<Identity>) -> Arc<Self> {
        let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        Arc::new(Self {
            identity,
            algorithms,
        })
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        expected_cluster: Option<&ClusterName>,
    ) -> Result<(), rustls::Error> {
        let material = self.identity.current();
        let result = self.verify_with(
            &material.anchors,
            end_entity,
            intermediates,
            now,
            usage,
            expected_cluster,
        );
        if let Err((reason, _)) = &result {
            self.identity.record_rejection(reason);
        }
        result.map_err(|(_, e)| e)
    }

    fn verify_with(
        &self,
        anchors: &[rustls::pki_types::TrustAnchor<'static>],
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
        expected_cluster: Option<&ClusterName>,
    ) -> Result<(), (&'static str, rustls::Error)> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            (
                "bad_encoding",
                rustls::Error::InvalidCertificate(CertificateError::BadEncoding),
            )
        })?;
        cert.verify_for_usage(
            self.algorithms.all,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(map_webpki_error)?;
        check_svid(
            end_entity.as_ref(),
            &self.identity.trust_domain,
            expected_cluster,
        )
        .map_err(|e: SvidError| {
            (
                e.reason(),
                rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                    Arc::new(e),
                ))),
            )
        })?;
        Ok(())
    }
}

pub(super) fn map_webpki_error(e: webpki::Error) -> (&'static str, rustls::Error) {
    use webpki::Error as W;
    let (reason, err) = match e {
        W::CertExpired { .. } => ("expired", CertificateError::Expired),
        W::CertNotValidYet { .. } => ("not_yet_valid", CertificateError::NotValidYet),
        W::UnknownIssuer => ("unknown_issuer", CertificateError::UnknownIssuer),
        W::InvalidSignatureForPublicKey => ("bad_signature", CertificateError::BadSignature),
        W::RequiredEkuNotFoundContext(_) => ("bad_usage", CertificateError::InvalidPurpose),
        W::CaUsedAsEndEntity => (
            "not_an_svid",
            CertificateError::Other(rustls::OtherError(Arc::new(SvidError::LeafIsCa))),
        ),
        W::BadDer | W::BadDerTime => ("bad_encoding", CertificateError::BadEncoding),
        other => (
            "chain_invalid",
            CertificateError::Other(rustls::OtherError(Arc::new(other))),
        ),
    };
    (reason, rustls::Error::InvalidCertificate(err))
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Without a cluster in the server name we would not know whom to expect: refuse
        // rather than accept any gateway.
        let expected = cluster_from_server_name(server_name).ok_or_else(|| {
            rustls::Error::General(format!(
                "dial name {server_name:?} does not name a cluster (use server_name_for)"
            ))
        })?;
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            Some(&expected),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!(rustls::PeerIncompatible::Tls13RequiredForQuic);
}

impl ClientCertVerifier for PeerVerifier {
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
        self.verify(
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!(rustls::PeerIncompatible::Tls13RequiredForQuic);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_name_carries_the_cluster() {
        let east = ClusterName::new("east").expect("valid");
        let name = ServerName::try_from(server_name_for(&east)).expect("valid dns name");
        assert_eq!(cluster_from_server_name(&name), Some(east));
        for other in [
            "east.example.org",
            "cluster.meshup.invalid",
            "a.b.cluster.meshup.invalid",
        ] {
            let name = ServerName::try_from(other).expect("valid dns name");
            assert_eq!(cluster_from_server_name(&name), None, "{other}");
        }
    }
}

//! A throw-away PKI for plain TLS peers (etcd with client-certificate auth in tests; the
//! stunnel and nginx pairs in the tunnel benchmark): one CA, a server certificate for
//! `localhost`/127.0.0.1 and a client certificate, written as PEM files.
//!
//! Gateways make their own SPIFFE certificates with `meshup certs`, as an operator would.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The DNS name in the server certificate, which the client side of each pair verifies.
pub const SERVER_NAME: &str = "localhost";

/// Paths of the PEM files of the PKI.
#[derive(Debug, Clone)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    /// Generates the CA and both leaf certificates (ECDSA P-256) into `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let ca_key = KeyPair::generate().context("generate CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "meshup test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).context("self-sign CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().context("generate server key")?;
        let mut server_params =
            CertificateParams::new(vec![SERVER_NAME.to_owned()]).context("server params")?;
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        server_params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // ClientAuth too: etcd's own HTTP gateway dials its gRPC port with this certificate.
        server_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        server_params.use_authority_key_identifier_extension = true;
        let server_cert = server_params
            .signed_by(&server_key, &issuer)
            .context("sign server certificate")?;

        let client_key = KeyPair::generate().context("generate client key")?;
        let mut client_params = CertificateParams::new(vec!["client.meshup.test".to_owned()])
            .context("client params")?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, "meshup test client");
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        client_params.use_authority_key_identifier_extension = true;
        let client_cert = client_params
            .signed_by(&client_key, &issuer)
            .context("sign client certificate")?;

        let pki = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
        };
        write(&pki.ca, &ca_cert.pem())?;
        write(&pki.server_cert, &server_cert.pem())?;
        write(&pki.server_key, &server_key.serialize_pem())?;
        write(&pki.client_cert, &client_cert.pem())?;
        write(&pki.client_key, &client_key.serialize_pem())?;
        Ok(pki)
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

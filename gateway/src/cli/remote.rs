//! The CLI's side of the remote admin API (`--admin https://HOST:PORT`): mutual TLS 1.3 with
//! the operator's certificate (`meshup certs issue --operator NAME`), the gateway verified as
//! a gateway SVID of the operator's own trust domain against the federation bundle (`--ca`).
//!
//! Files are checked before any byte goes out, so a wrong file is named as such rather than
//! surfacing as a handshake failure: the certificate must be an operator's, the key must
//! match it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{CliError, Conn, exit};
use crate::identity::{AdminServerVerifier, check_operator_cert, trust_domain_of};

/// The TLS server name the CLI sends; the verifier checks the SPIFFE ID, not this name.
const SERVER_NAME: &str = "admin.meshup.invalid";

/// Where the admin API is and whether to speak TLS, from `--admin` and the certificate flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`
    pub authority: String,
    pub tls: bool,
}

/// Reads `--admin`: `https://` is the remote listener (TLS), `http://` or a bare `HOST:PORT`
/// the loopback one; a bare address with `--cert` is TLS too.
pub fn target(admin: &str, has_cert: bool) -> Result<Target, CliError> {
    let bad_input = |m: String| CliError::new(exit::BAD_INPUT, m);
    let (scheme, authority) = match admin.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest.trim_end_matches('/')),
        None => (None, admin),
    };
    if authority.is_empty() || authority.contains('/') {
        return Err(bad_input(format!(
            "--admin {admin:?} is not an address: use HOST:PORT (loopback, e.g. 127.0.0.1:15021) or https://HOST:PORT (remote, with --cert/--key)"
        )));
    }
    let tls = match scheme {
        Some("https") => true,
        Some("http") if has_cert => {
            return Err(bad_input(format!(
                "--admin {admin:?} is plaintext but --cert is set: the remote admin API takes https://{authority}"
            )));
        }
        Some("http") => false,
        None => has_cert,
        Some(other) => {
            return Err(bad_input(format!(
                "--admin {admin:?}: unknown scheme {other:?}; use https://HOST:PORT or HOST:PORT"
            )));
        }
    };
    Ok(Target {
        authority: authority.to_owned(),
        tls,
    })
}

/// The operator's files: `--cert`, and `--key`/`--ca` defaulting to `key.pem`/`bundle.pem`
/// next to the certificate (the layout `meshup certs issue --operator` writes).
fn files(conn: &Conn) -> Result<(PathBuf, PathBuf, PathBuf), CliError> {
    let Some(cert) = conn.cert.clone() else {
        return Err(CliError::new(
            exit::BAD_INPUT,
            format!(
                "{} is the remote admin API: it wants an operator certificate. Pass --cert and --key (or MESHUP_ADMIN_CERT, MESHUP_ADMIN_KEY) issued by `meshup certs issue --operator NAME`, and --ca with the federation's bundle.pem",
                conn.admin
            ),
        ));
    };
    let dir = cert.parent().map(Path::to_path_buf).unwrap_or_default();
    let key = conn
        .key
        .clone()
        .unwrap_or_else(|| dir.join(crate::certs::KEY_FILE));
    let ca = conn
        .ca
        .clone()
        .unwrap_or_else(|| dir.join(crate::certs::BUNDLE_FILE));
    Ok((cert, key, ca))
}

fn read(path: &Path, flag: &str) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!("{flag} {}: cannot read it: {e}", path.display()),
        )
    })
}

/// The client TLS settings from the operator's files, checked.
pub fn client_config(conn: &Conn) -> Result<rustls::ClientConfig, CliError> {
    let (cert_path, key_path, ca_path) = files(conn)?;
    let bad = |flag: &str, path: &Path, what: String| {
        CliError::new(
            exit::BAD_INPUT,
            format!("{flag} {}: {what}", path.display()),
        )
    };
    let chain = CertificateDer::pem_slice_iter(&read(&cert_path, "--cert")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--cert", &cert_path, format!("not a PEM certificate: {e}")))?;
    let leaf = chain
        .first()
        .ok_or_else(|| bad("--cert", &cert_path, "holds no certificate".into()))?;
    let not_operator = |what: String| {
        bad(
            "--cert",
            &cert_path,
            format!(
                "{what}; the remote admin API takes an operator certificate: issue one with `meshup certs issue --operator NAME`"
            ),
        )
    };
    let trust_domain = trust_domain_of(leaf.as_ref())
        .ok_or_else(|| not_operator("it names no SPIFFE ID".into()))?;
    check_operator_cert(leaf.as_ref(), &trust_domain).map_err(|e| not_operator(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&key_path, "--key")?)
        .map_err(|e| bad("--key", &key_path, format!("not a PEM private key: {e}")))?;
    let anchors = CertificateDer::pem_slice_iter(&read(&ca_path, "--ca")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("--ca", &ca_path, format!("not PEM certificates: {e}")))?
        .iter()
        .map(|der| webpki::anchor_from_trusted_cert(der).map(|a| a.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            bad(
                "--ca",
                &ca_path,
                format!("not a usable CA certificate: {e}"),
            )
        })?;
    if anchors.is_empty() {
        return Err(bad("--ca", &ca_path, "holds no CA certificate".into()));
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| CliError::new(exit::OTHER, e.to_string()))?
    .dangerous()
    .with_custom_certificate_verifier(AdminServerVerifier::new(anchors, &trust_domain))
    .with_client_auth_cert(chain, key)
    .map_err(|e| {
        bad(
            "--key",
            &key_path,
            format!("does not fit the certificate in --cert: {e}"),
        )
    })?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    Ok(tls)
}

/// A channel to the remote admin API over mutual TLS.
pub async fn channel(
    endpoint: Endpoint,
    target: &Target,
    tls: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let authority = target.authority.clone();
    let connect = tower::service_fn(move |_: Uri| {
        let (connector, authority) = (connector.clone(), authority.clone());
        async move {
            let tcp = TcpStream::connect(authority.as_str()).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(SERVER_NAME)
                .expect("a constant, valid DNS name")
                .to_owned();
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(connect).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--admin`, whether `--cert` is set, and the authority and TLS it means (`None`: refused).
    type Case = (&'static str, bool, Option<(&'static str, bool)>);

    #[test]
    fn the_address_says_whether_to_speak_tls() {
        let cases: &[Case] = &[
            ("127.0.0.1:15021", false, Some(("127.0.0.1:15021", false))),
            ("127.0.0.1:15021", true, Some(("127.0.0.1:15021", true))),
            (
                "http://127.0.0.1:15021",
                false,
                Some(("127.0.0.1:15021", false)),
            ),
            (
                "https://gw.example:15022",
                false,
                Some(("gw.example:15022", true)),
            ),
            (
                "https://gw.example:15022/",
                true,
                Some(("gw.example:15022", true)),
            ),
            ("http://127.0.0.1:15021", true, None),
            ("ftp://x:1", false, None),
            ("https://", false, None),
            ("https://a:1/path", false, None),
        ];
        for (admin, cert, want) in cases {
            let got = target(admin, *cert).ok();
            assert_eq!(
                got.as_ref().map(|t| (t.authority.as_str(), t.tls)),
                *want,
                "{admin} cert={cert}"
            );
        }
    }
}

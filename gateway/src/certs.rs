//! Federation CA and gateway SVIDs on disk (rcgen).
//!
//! `meshup` ships its own minimal CA so a federation can start without external PKI:
//! [`init_ca`] writes the CA once, [`issue`] mints a short-lived gateway X.509-SVID whose only
//! URI SAN is `spiffe://<td>/cluster/<cluster>/gateway`. Gateways hot-reload the files
//! ([`crate::identity`]), so rotation is "run `issue` again into the same directory".
//! [`issue_operator`] mints an operator's client certificate, `spiffe://<td>/operator/<name>`,
//! for the remote admin API (docs/admin-api.md): client authentication only, so it can never
//! serve as a gateway, and gateways refuse it as a tunnel peer (not a gateway SPIFFE ID).
//!
//! [`LeafSpec`] and [`write_leaf`] also mint deliberately bad certificates (expired, wrong
//! trust domain, CA-flagged leaf, ...) for the tests that prove those are rejected.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use meshup_core::identity::{GatewayIdentity, OperatorIdentity, check_trust_domain};
use meshup_core::names::ClusterName;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use thiserror::Error;

/// CA certificate file written by [`init_ca`].
pub const CA_CERT_FILE: &str = "ca.pem";
/// CA private key file written by [`init_ca`] (mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Trust bundle file: the CA certificates peers are verified against.
pub const BUNDLE_FILE: &str = "bundle.pem";
/// Gateway certificate file written by [`issue`].
pub const CERT_FILE: &str = "cert.pem";
/// Gateway private key file written by [`issue`] (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// Default operator certificate lifetime: a working day; issue a new one each day.
pub const DEFAULT_OPERATOR_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Default SVID lifetime: short, because rotation is cheap (hot reload) and a leaked key
/// should not stay useful for long.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Default CA lifetime.
pub const DEFAULT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Back-dating of `not_before`, so small clock skew between gateways does not reject a fresh
/// certificate.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(300);

/// Errors of CA and SVID issuance.
#[derive(Debug, Error)]
pub enum CertsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (check the directory exists and is writable)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a CA (remove it to start over)")]
    AlreadyExists { path: PathBuf },
    #[error("invalid cluster name {0:?}: {1}")]
    Cluster(String, meshup_core::names::NameError),
    #[error("invalid trust domain {0:?}")]
    TrustDomain(String),
    #[error("{0}")]
    Operator(meshup_core::identity::IdentityError),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("CA files in {dir} are unusable: {reason}")]
    BadCa { dir: PathBuf, reason: String },
}

/// Writes a new federation CA into `out_dir`: `ca.pem`, `ca-key.pem` and `bundle.pem` (the
/// same certificate, as the bundle gateways trust). Refuses to overwrite an existing CA.
pub fn init_ca(trust_domain: &str, out_dir: &Path) -> Result<(), CertsError> {
    check_trust_domain(trust_domain).map_err(|_| CertsError::TrustDomain(trust_domain.into()))?;
    let ca_key_path = out_dir.join(CA_KEY_FILE);
    if ca_key_path.exists() {
        return Err(CertsError::AlreadyExists { path: ca_key_path });
    }
    let (cert_pem, key_pem) = make_ca(trust_domain, DEFAULT_CA_LIFETIME)?;
    create_dir(out_dir)?;
    write_file(&out_dir.join(CA_CERT_FILE), &cert_pem, false)?;
    write_file(&out_dir.join(BUNDLE_FILE), &cert_pem, false)?;
    write_file(&ca_key_path, &key_pem, true)?;
    Ok(())
}

/// Issues a gateway SVID for `cluster` (a DNS-1123 label, validated here) signed by the CA in
/// `ca_dir`, valid for `lifetime` ([`DEFAULT_SVID_LIFETIME`] is a good choice), into `out_dir`
/// (`cert.pem`, `key.pem`, `bundle.pem`). The trust domain is the CA's.
/// Files are replaced atomically (write, then rename), so a reloading gateway never sees half a
/// file.
pub fn issue(
    ca_dir: &Path,
    cluster: &str,
    out_dir: &Path,
    lifetime: Duration,
) -> Result<GatewayIdentity, CertsError> {
    let cluster =
        ClusterName::new(cluster).map_err(|e| CertsError::Cluster(cluster.to_owned(), e))?;
    let ca = Ca::load(ca_dir)?;
    let identity = GatewayIdentity::new(&ca.trust_domain, cluster)
        .map_err(|_| CertsError::TrustDomain(ca.trust_domain.clone()))?;
    let now = SystemTime::now();
    let spec = LeafSpec {
        uri_sans: vec![identity.spiffe_id().to_string()],
        not_before: now - CLOCK_SKEW_ALLOWANCE,
        not_after: now + lifetime,
        is_ca: false,
        self_signed: false,
        client_only: false,
    };
    write_leaf(ca_dir, &spec, out_dir)?;
    Ok(identity)
}

/// Issues an operator certificate for `name` (a DNS label, checked here), signed by the CA in
/// `ca_dir`, valid for `lifetime`, into `out_dir` (`cert.pem`, `key.pem`, `bundle.pem`). Its
/// only URI SAN is `spiffe://<td>/operator/<name>` and it may only authenticate a client.
pub fn issue_operator(
    ca_dir: &Path,
    name: &str,
    out_dir: &Path,
    lifetime: Duration,
) -> Result<OperatorIdentity, CertsError> {
    let ca = Ca::load(ca_dir)?;
    let identity = OperatorIdentity::new(&ca.trust_domain, name).map_err(CertsError::Operator)?;
    let mut spec = LeafSpec::operator(&ca.trust_domain, name);
    let now = SystemTime::now();
    spec.not_before = now - CLOCK_SKEW_ALLOWANCE;
    spec.not_after = now + lifetime;
    write_leaf(ca_dir, &spec, out_dir)?;
    Ok(identity)
}

/// How to mint a leaf certificate; the knobs exist so tests can make bad ones.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// URI SANs, normally exactly one SPIFFE ID.
    pub uri_sans: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Flag the leaf as a CA (must be rejected as a peer certificate).
    pub is_ca: bool,
    /// Sign with its own key instead of the CA's (must be rejected).
    pub self_signed: bool,
    /// Client authentication only (operator certificates); otherwise server and client.
    pub client_only: bool,
}

impl LeafSpec {
    /// A valid gateway SVID spec for `trust_domain`/`cluster`, valid from now on for a day.
    pub fn gateway(trust_domain: &str, cluster: &str) -> Self {
        let now = SystemTime::now();
        Self {
            uri_sans: vec![format!("spiffe://{trust_domain}/cluster/{cluster}/gateway")],
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + DEFAULT_SVID_LIFETIME,
            is_ca: false,
            self_signed: false,
            client_only: false,
        }
    }

    /// A valid operator certificate spec for `trust_domain`/`name`, valid from now on for
    /// [`DEFAULT_OPERATOR_LIFETIME`].
    pub fn operator(trust_domain: &str, name: &str) -> Self {
        let now = SystemTime::now();
        Self {
            uri_sans: vec![format!("spiffe://{trust_domain}/operator/{name}")],
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + DEFAULT_OPERATOR_LIFETIME,
            is_ca: false,
            self_signed: false,
            client_only: true,
        }
    }
}

/// Mints a leaf per `spec`, signed by the CA in `ca_dir` (unless self-signed), and writes
/// `cert.pem`, `key.pem` and `bundle.pem` (the CA's bundle) into `out_dir` atomically.
pub fn write_leaf(ca_dir: &Path, spec: &LeafSpec, out_dir: &Path) -> Result<(), CertsError> {
    let ca = Ca::load(ca_dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let common_name = if spec.client_only {
        "meshup operator"
    } else {
        "meshup gateway"
    };
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = spec
        .uri_sans
        .iter()
        .map(|u| Ok(SanType::URI(u.clone().try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    params.not_before = spec.not_before.into();
    params.not_after = spec.not_after.into();
    params.serial_number = Some(random_serial(&key));
    params.use_authority_key_identifier_extension = true;
    if spec.is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
    } else {
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    }
    // Gateways are both TLS servers (inbound) and clients (outbound) with one SVID;
    // operators are only ever clients.
    params.extended_key_usages = if spec.client_only {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    } else {
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ]
    };
    let cert = if spec.self_signed {
        params.self_signed(&key)?
    } else {
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, &ca.key)?;
        params.signed_by(&key, &issuer)?
    };
    create_dir(out_dir)?;
    // Key first: a reloader that sees the new cert with the old key rejects the pair and
    // keeps the old material until both are in place.
    write_file(&out_dir.join(KEY_FILE), &key.serialize_pem(), true)?;
    write_file(&out_dir.join(CERT_FILE), &cert.pem(), false)?;
    write_file(&out_dir.join(BUNDLE_FILE), &ca.bundle_pem, false)?;
    Ok(())
}

/// Writes a fresh CA for `trust_domain` into `out_dir`, overwriting: for tests that need a
/// second, untrusted CA.
pub fn init_ca_overwrite(trust_domain: &str, out_dir: &Path) -> Result<(), CertsError> {
    let (cert_pem, key_pem) = make_ca(trust_domain, DEFAULT_CA_LIFETIME)?;
    create_dir(out_dir)?;
    write_file(&out_dir.join(CA_CERT_FILE), &cert_pem, false)?;
    write_file(&out_dir.join(BUNDLE_FILE), &cert_pem, false)?;
    write_file(&out_dir.join(CA_KEY_FILE), &key_pem, true)?;
    Ok(())
}

// === impl Ca ===

/// A loaded CA: its certificate, key, bundle and trust domain.
struct Ca {
    cert_pem: String,
    bundle_pem: String,
    key: KeyPair,
    trust_domain: String,
}

impl Ca {
    fn load(dir: &Path) -> Result<Self, CertsError> {
        let cert_pem = read_file(&dir.join(CA_CERT_FILE))?;
        let key_pem = read_file(&dir.join(CA_KEY_FILE))?;
        let bundle_pem = read_file(&dir.join(BUNDLE_FILE)).unwrap_or_else(|_| cert_pem.clone());
        let bad = |reason: String| CertsError::BadCa {
            dir: dir.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("ca-key.pem: {e}")))?;
        let trust_domain = ca_trust_domain(&cert_pem).ok_or_else(|| {
            bad("ca.pem is not a meshup CA (no spiffe:// URI SAN naming the trust domain)".into())
        })?;
        Ok(Self {
            cert_pem,
            bundle_pem,
            key,
            trust_domain,
        })
    }
}

/// The trust domain a meshup CA certificate names in its `spiffe://<td>` URI SAN.
fn ca_trust_domain(cert_pem: &str) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::URI(u) => u.strip_prefix("spiffe://").map(str::to_owned),
        _ => None,
    })
}

fn make_ca(trust_domain: &str, lifetime: Duration) -> Result<(String, String), CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("meshup federation CA {trust_domain}"),
    );
    params.distinguished_name = dn;
    // The CA carries the trust domain's SPIFFE ID, so `issue` knows which domain it signs for.
    params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - CLOCK_SKEW_ALLOWANCE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial(&key));
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serial unique per certificate: derived from the fresh key and the time of issue, so two
/// certificates never share one (tests read serials to tell rotations apart).
fn random_serial(key: &KeyPair) -> rcgen::SerialNumber {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut bytes = [0u8; 16];
    let pk = key.public_key_raw();
    for (i, b) in pk.iter().rev().take(8).enumerate() {
        bytes[i] = *b;
    }
    bytes[8..].copy_from_slice(&(nanos as u64).to_be_bytes());
    // Positive: the top bit of a DER INTEGER's first byte is the sign.
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

fn read_file(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Writes `path` atomically: a temp file in the same directory, then a rename.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    let err = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("pem.tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    #[test]
    fn issued_svid_has_one_spiffe_uri_and_is_not_a_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let gw = dir.path().join("east");
        init_ca("mesh.test", &ca).expect("ca");
        assert!(matches!(
            init_ca("mesh.test", &ca),
            Err(CertsError::AlreadyExists { .. })
        ));
        assert!(matches!(
            issue(&ca, "East", &gw, Duration::from_secs(1)),
            Err(CertsError::Cluster(..))
        ));
        let id = issue(&ca, "east", &gw, Duration::from_secs(3600)).expect("issue");
        assert_eq!(id.to_string(), "spiffe://mesh.test/cluster/east/gateway");

        let pem = fs::read(gw.join(CERT_FILE)).expect("cert");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        let uris: Vec<_> = cert
            .subject_alternative_name()
            .expect("san ext")
            .expect("has san")
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://mesh.test/cluster/east/gateway"]);
        assert!(!cert.is_ca());
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 3600 + CLOCK_SKEW_ALLOWANCE.as_secs() as i64);
        assert!(gw.join(KEY_FILE).exists() && gw.join(BUNDLE_FILE).exists());
    }

    #[test]
    fn operator_certificates_are_client_only_with_an_operator_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let out = dir.path().join("ana");
        init_ca("mesh.test", &ca).expect("ca");
        for bad in ["Ana", "local", "", "a_b"] {
            assert!(
                matches!(
                    issue_operator(&ca, bad, &out, DEFAULT_OPERATOR_LIFETIME),
                    Err(CertsError::Operator(_))
                ),
                "{bad:?}"
            );
        }
        let id = issue_operator(&ca, "ana", &out, Duration::from_secs(600)).expect("issue");
        assert_eq!(id.to_string(), "spiffe://mesh.test/operator/ana");
        let pem = fs::read(out.join(CERT_FILE)).expect("cert");
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        assert!(!cert.is_ca());
        let eku = cert
            .extended_key_usage()
            .expect("eku ext")
            .expect("has eku")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(life, 600 + CLOCK_SKEW_ALLOWANCE.as_secs() as i64);
    }
}

//! The gateway's own identity: certificate, key and trust bundle read from files and
//! hot-reloaded, plus the rustls verifiers that enforce the SPIFFE rules on peers.
//!
//! One reloader task owns the files: every [`DEFAULT_RELOAD_INTERVAL`] it reads them, and if
//! their contents changed it parses and checks the new material and swaps it in. TLS configs
//! never hold a certificate themselves: the resolvers and verifiers ask [`Identity::current`]
//! at every handshake, so new handshakes use the new certificate within one poll interval,
//! and established connections are untouched. Broken new files (half-written, mismatched
//! key, wrong identity, expired) are logged and ignored; the last good material stays.

mod operator;
mod svid;
mod verify;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use meshup_core::identity::GatewayIdentity;
use meshup_core::names::ClusterName;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use rustls::sign::CertifiedKey;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use operator::{AdminServerVerifier, OperatorCertError, OperatorVerifier, check_operator_cert};
pub use svid::{PeerIdentity, SvidError, check_svid, trust_domain_of};
pub use verify::{PeerVerifier, server_name_for};

use crate::tunnel::Metrics;

/// How often the reloader looks at the files. Half a second keeps "new handshakes use the
/// new certificate within ~1 s" with margin; reading three small files is cheap.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// Errors loading identity material. All of them are operator errors in the files: retrying
/// without changing the files does not help (the reloader retries anyway when they change).
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} contains no PEM {what}")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("{path}: invalid PEM: {reason}")]
    BadPem { path: PathBuf, reason: String },
    #[error("private key in {path} is unusable: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("certificate and key do not match: {0}")]
    KeyMismatch(String),
    #[error("trust bundle {path}: certificate {index} is not a usable CA: {reason}")]
    BadAnchor {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("our own certificate is not a valid SVID for us: {0}")]
    NotOurSvid(#[from] SvidError),
    #[error("our own certificate does not verify against our bundle: {0}")]
    OwnChain(String),
}

/// Where the identity files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

impl IdentityFiles {
    /// The layout [`crate::certs::issue`] writes: `cert.pem`, `key.pem`, `bundle.pem` in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join(crate::certs::CERT_FILE),
            key: dir.join(crate::certs::KEY_FILE),
            bundle: dir.join(crate::certs::BUNDLE_FILE),
        }
    }
}

/// Raw bytes of the cert, key and bundle files, compared to notice changes.
type FileContents = (Vec<u8>, Vec<u8>, Vec<u8>);

/// One consistent set of identity material.
pub struct Material {
    /// What we present in handshakes.
    pub certified_key: Arc<CertifiedKey>,
    /// What we verify peers against.
    pub anchors: Vec<TrustAnchor<'static>>,
    /// Our own certificate's serial (hex).
    pub serial: String,
    /// Our own certificate's expiry.
    pub not_after: SystemTime,
    /// Raw file contents, to notice changes without parsing.
    fingerprint: FileContents,
}

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("serial", &self.serial)
            .field("anchors", &self.anchors.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The gateway's identity with hot-reloaded material.
pub struct Identity {
    /// Our trust domain: peers must be in it, our certificate must be in it.
    pub trust_domain: String,
    /// Our cluster: our certificate must name it.
    pub cluster: ClusterName,
    files: IdentityFiles,
    current: RwLock<Arc<Material>>,
    metrics: OnceLock<Metrics>,
    /// New material swapped in since start-up.
    reloads: AtomicU64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("trust_domain", &self.trust_domain)
            .field("cluster", &self.cluster)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads and checks the files once. Start-up fails loudly if they are unusable.
    pub fn load(
        files: IdentityFiles,
        trust_domain: &str,
        cluster: ClusterName,
    ) -> Result<Arc<Self>, IdentityError> {
        let material = load_material(&files, trust_domain, &cluster)?;
        Ok(Arc::new(Self {
            trust_domain: trust_domain.to_owned(),
            cluster,
            files,
            current: RwLock::new(Arc::new(material)),
            metrics: OnceLock::new(),
            reloads: AtomicU64::new(0),
        }))
    }

    /// Our identity as a value.
    pub fn gateway_identity(&self) -> GatewayIdentity {
        GatewayIdentity {
            trust_domain: self.trust_domain.clone(),
            cluster: self.cluster.clone(),
        }
    }

    /// The material new handshakes use.
    pub fn current(&self) -> Arc<Material> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc inside
        // is still whole.
        self.current
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }

    /// Reads the files; if they changed and are valid, swaps them in. Returns whether the
    /// material changed. On error the old material stays in use.
    pub fn reload(&self) -> Result<bool, IdentityError> {
        let fingerprint = read_all(&self.files)?;
        if fingerprint == self.current().fingerprint {
            return Ok(false);
        }
        let material = material_from(&self.files, fingerprint, &self.trust_domain, &self.cluster)?;
        *self
            .current
            .write()
            .unwrap_or_else(|poison| poison.into_inner()) = Arc::new(material);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// New certificates swapped in since start-up.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Spawns the reloader: polls the files every `interval` until `shutdown`. A broken set of
    /// files is logged once per distinct error, and only when it is seen on two polls in a
    /// row: rotation writes the key before the certificate, so one poll may see a new key
    /// with the old certificate, which is normal and fixes itself.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_error: Option<String> = None;
            let mut pending: Option<String> = None;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // File reads are small and local; a blocking read here costs microseconds.
                match this.reload() {
                    Ok(true) => {
                        last_error = None;
                        pending = None;
                        tracing::info!(serial = %this.current().serial, "identity reloaded: new handshakes use the new certificate");
                    }
                    Ok(false) => {
                        // Files equal the material in use: healthy again.
                        pending = None;
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let persists = pending.as_deref() == Some(&msg);
                        pending = Some(msg.clone());
                        if persists && last_error.as_deref() != Some(&msg) {
                            tracing::warn!(error = %msg, serial = %this.current().serial, "new identity files rejected; keeping the previous certificate");
                            last_error = Some(msg);
                        }
                    }
                }
            }
        })
    }

    /// Attaches metrics (handshake rejections are counted by the verifier).
    pub(crate) fn attach_metrics(&self, metrics: Metrics) {
        let _ = self.metrics.set(metrics);
    }

    fn record_rejection(&self, reason: &'static str) {
        if let Some(m) = self.metrics.get() {
            m.handshake_failed(reason);
        }
    }
}

fn read_all(files: &IdentityFiles) -> Result<FileContents, IdentityError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| IdentityError::Read {
            path: path.to_owned(),
            source,
        })
    };
    Ok((read(&files.cert)?, read(&files.key)?, read(&files.bundle)?))
}

fn load_material(
    files: &IdentityFiles,
    trust_domain: &str,
    cluster: &ClusterName,
) -> Result<Material, IdentityError> {
    material_from(files, read_all(files)?, trust_domain, cluster)
}

/// Parses and checks a set of files: our chain must verify against our own bundle and be an
/// SVID for exactly our trust domain and cluster, and the key must match the certificate.
fn material_from(
    files: &IdentityFiles,
    fingerprint: FileContents,
    trust_domain: &str,
    cluster: &ClusterName,
) -> Result<Material, IdentityError> {
    let (cert_pem, key_pem, bundle_pem) = &fingerprint;
    let chain = parse_certs(&files.cert, cert_pem, "certificate")?;
    let bundle = parse_certs(&files.bundle, bundle_pem, "CA certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| IdentityError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        IdentityError::BadKey {
            path: files.key.clone(),
            reason: e.to_string(),
        }
    })?;
    let certified_key = CertifiedKey::new(chain.clone(), signing_key);
    certified_key
        .keys_match()
        .map_err(|e| IdentityError::KeyMismatch(e.to_string()))?;

    let anchors = bundle
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|e| IdentityError::BadAnchor {
                    path: files.bundle.clone(),
                    index,
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let leaf = &chain[0];
    let own = check_svid(leaf.as_ref(), trust_domain, Some(cluster))?;
    // Our own chain must verify against our bundle now: catches a cert from the wrong CA, an
    // expired or not-yet-valid cert before peers would reject it.
    let algorithms = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| IdentityError::OwnChain(e.to_string()))?
        .verify_for_usage(
            algorithms.all,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| IdentityError::OwnChain(e.to_string()))?;
    let not_after = not_after_of(leaf);

    Ok(Material {
        certified_key: Arc::new(certified_key),
        anchors,
        serial: own.serial,
        not_after,
        fingerprint,
    })
}

fn parse_certs(
    path: &Path,
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::BadPem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::NoPem {
            path: path.to_owned(),
            what,
        });
    }
    Ok(certs)
}

fn not_after_of(der: &CertificateDer<'_>) -> SystemTime {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der.as_ref())
        .ok()
        .and_then(|(_, c)| u64::try_from(c.validity().not_after.timestamp()).ok())
        .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

// === impl CertResolver ===

/// Presents the current certificate in every handshake, as server and as client.
#[derive(Debug)]
pub struct CertResolver(pub Arc<Identity>);

impl rustls::server::ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key.clone())
    }
}

impl rustls::client::ResolvesClientCert for CertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The certificate in use as Prometheus series, read at scrape time:
/// `meshup_certificate_expiry_timestamp_seconds` (alert on it well before it passes) and
/// `meshup_certificate_reloads_total`.
#[derive(Debug)]
pub struct IdentityCollector(pub Arc<Identity>);

impl prometheus_client::collector::Collector for IdentityCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), fmt::Error> {
        use prometheus_client::encoding::NoLabelSet;
        use prometheus_client::metrics::MetricType;
        let expiry = self
            .0
            .current()
            .not_after
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        encoder
            .encode_descriptor(
                "certificate_expiry_timestamp_seconds",
                "Expiry (Unix time) of the certificate this gateway presents in new handshakes",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&expiry)?;
        encoder
            .encode_descriptor(
                "certificate_reloads",
                "New certificates taken from disk since start-up (rotations)",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&self.0.reloads(), None)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{self, LeafSpec};

    fn cluster(name: &str) -> ClusterName {
        ClusterName::new(name).expect("valid")
    }

    #[test]
    fn loads_issued_material_and_keeps_it_when_new_files_are_bad() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        let gw = dir.path().join("gw");
        certs::init_ca("mesh.test", &ca).expect("ca");
        certs::issue(&ca, "east", &gw, Duration::from_secs(3600)).expect("issue");

        // Wrong cluster or trust domain for our own cert: refused at load.
        assert!(matches!(
            Identity::load(IdentityFiles::in_dir(&gw), "mesh.test", cluster("west")),
            Err(IdentityError::NotOurSvid(SvidError::WrongCluster { .. }))
        ));
        assert!(Identity::load(IdentityFiles::in_dir(&gw), "other.test", cluster("east")).is_err());

        let id = Identity::load(IdentityFiles::in_dir(&gw), "mesh.test", cluster("east"))
            .expect("loads");
        let first = id.current().serial.clone();
        assert!(!id.reload().expect("unchanged"));

        // A truncated certificate: rejected, old material kept.
        std::fs::write(
            gw.join(certs::CERT_FILE),
            "-----BEGIN CERTIFICATE-----\nAAA",
        )
        .expect("write");
        assert!(id.reload().is_err());
        assert_eq!(id.current().serial, first);

        // An expired certificate: rejected.
        let mut spec = LeafSpec::gateway("mesh.test", "east");
        spec.not_before = SystemTime::now() - Duration::from_secs(7200);
        spec.not_after = SystemTime::now() - Duration::from_secs(3600);
        certs::write_leaf(&ca, &spec, &gw).expect("write");
        assert!(matches!(id.reload(), Err(IdentityError::OwnChain(_))));
        assert_eq!(id.current().serial, first);

        // A fresh valid one: swapped in.
        certs::issue(&ca, "east", &gw, Duration::from_secs(3600)).expect("issue");
        assert!(id.reload().expect("valid"));
        assert_ne!(id.current().serial, first);
    }
}

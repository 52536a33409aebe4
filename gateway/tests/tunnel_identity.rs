//! Who may talk to whom: every kind of bad peer certificate is rejected with zero bytes
//! proxied, and certificate rotation on disk is picked up by new handshakes (and, on the
//! caller's side, by new proxied connections) without disturbing open connections.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use common::*;
use meshup_core::tunnel::{RequestHeader, decode_status, encode_header};
use meshup_gateway::certs::{self, LeafSpec};
use meshup_gateway::identity::server_name_for;
use meshup_gateway::tunnel::{self, ALPN};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client-side verifier that accepts any server: the tests below attack the *server's*
/// checks, so the attacker does not care who answers.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Dials `server` as a raw QUIC client presenting the certificate in `id_dir` (or none),
/// and tries to open a tunnel to `pay.prod:8080` as `caller`. Returns the status if the
/// server answered one.
async fn attack(server: SocketAddr, id_dir: Option<&Path>, caller: &str) -> Result<String, String> {
    // The attacker's own set-up must work: a failure here would look like a rejection.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut tls = match id_dir {
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join(certs::CERT_FILE))
                .expect("attacker's certificate file")
                .collect::<Result<Vec<_>, _>>()
                .expect("attacker's certificate PEM");
            let key =
                PrivateKeyDer::from_pem_file(dir.join(certs::KEY_FILE)).expect("attacker's key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("attacker's certificate and key match")
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS config");
    let mut client =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = client
        .connect(server, &server_name_for(&cluster("west")))
        .expect("a valid dial")
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // In TLS 1.3 the client finishes before the server checked its certificate, so a
    // rejected client may believe it is connected: it must still get nothing through.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
    let header = RequestHeader {
        request_id: 1,
        service: service(),
        port: SERVICE_PORT,
        caller: cluster(caller),
    };
    let mut request = encode_header(&header);
    request.extend_from_slice(b"GET / HTTP/1.0\r\n\r\n");
    // A server that refuses after reading the header answers, then stops the stream: the
    // write may lose that race, and the answer is still there to read.
    let written = send.write_all(&request).await;
    let mut status = [0u8; 2];
    match recv.read_exact(&mut status).await {
        Ok(()) => decode_status(&status)
            .map(|s| s.to_string())
            .map_err(|e| e.to_string()),
        Err(read) => match written {
            Err(write) => Err(format!("write: {write}")),
            Ok(()) => Err(format!("read: {read}")),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_get_zero_bytes_proxied() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(echo.addr, &[]);

        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let mut expired = LeafSpec::gateway(TD, "east");
        expired.not_before = now - 3 * hour;
        expired.not_after = now - hour;
        let mut future = LeafSpec::gateway(TD, "east");
        future.not_before = now + hour;
        future.not_after = now + 3 * hour;
        let mut self_signed = LeafSpec::gateway(TD, "east");
        self_signed.self_signed = true;
        let mut ca_leaf = LeafSpec::gateway(TD, "east");
        ca_leaf.is_ca = true;
        let mut two_uris = LeafSpec::gateway(TD, "east");
        two_uris
            .uri_sans
            .push(format!("spiffe://{TD}/cluster/south/gateway"));
        // Signed by our CA, but naming another trust domain.
        let other_td_same_ca = LeafSpec::gateway("other.test", "east");
        // A whole other federation: its own CA and trust domain.
        let other_ca = pki.dir.path().join("other-ca");
        certs::init_ca_overwrite("other.test", &other_ca).expect("other ca");
        let foreign = pki.dir.path().join("foreign");
        certs::issue(&other_ca, "east", &foreign, hour).expect("foreign svid");

        // Each certificate, the reason the server must count it under.
        let cases: Vec<(&str, Option<std::path::PathBuf>, &'static str)> = vec![
            ("no client certificate", None, "no_client_cert"),
            ("expired", Some(pki.leaf("expired", &expired)), "expired"),
            (
                "not yet valid",
                Some(pki.leaf("future", &future)),
                "not_yet_valid",
            ),
            (
                "self-signed",
                Some(pki.leaf("self-signed", &self_signed)),
                "unknown_issuer",
            ),
            (
                "CA-flagged leaf",
                Some(pki.leaf("ca-leaf", &ca_leaf)),
                "not_an_svid",
            ),
            (
                "two URI SANs",
                Some(pki.leaf("two-uris", &two_uris)),
                "not_an_svid",
            ),
            (
                "other trust domain, our CA",
                Some(pki.leaf("other-td", &other_td_same_ca)),
                "wrong_trust_domain",
            ),
            ("other trust domain and CA", Some(foreign), "unknown_issuer"),
            // An operator of our federation is no gateway: it calls the admin API only.
            (
                "operator certificate",
                Some(pki.operator("ana")),
                "not_an_svid",
            ),
        ];
        let rejections = |reason: &'static str| {
            west.metrics
                .handshake_failures
                .get_or_create(&tunnel::ReasonLabels { reason })
                .get()
        };
        // From any caller: an attacker must not get a byte through whatever it claims.
        let upstream_bytes = || {
            west.sum(
                "meshup_tunnel_bytes_total",
                &[("direction", "inbound"), ("flow", "to_upstream")],
            ) as u64
        };
        for (name, dir, reason) in &cases {
            let before = rejections(reason);
            let result = attack(west.addr(), dir.as_deref(), "east").await;
            assert!(
                result.is_err(),
                "{name}: expected rejection, got status {result:?}"
            );
            // Rejected by the server for the right reason, counted once.
            assert_eventually(
                &format!("{name}: counted as {reason}"),
                Duration::from_secs(5),
                || {
                    let n = rejections(reason);
                    async move { n == before + 1 }
                },
            )
            .await;
            assert_eq!(rejections(reason), before + 1, "{name}: counted once");
            // And nothing of it reached a backend.
            assert_eq!(
                echo.accepted.load(Ordering::SeqCst),
                0,
                "{name}: reached the backend"
            );
            assert_eq!(upstream_bytes(), 0, "{name}: bytes were proxied");
        }
        // A valid certificate of cluster south claiming to be east in the header: refused
        // by the cluster check, still before any backend connection.
        let south = pki.issue("south", "south");
        assert_eq!(
            attack(west.addr(), Some(&south), "east").await.as_deref(),
            Ok("forbidden")
        );
        // Control: the same client with a valid east certificate does get through, so the
        // rejections above are not an artefact of the attack client.
        let east_dir = pki.issue("east", "east");
        assert_eq!(
            attack(west.addr(), Some(&east_dir), "east")
                .await
                .as_deref(),
            Ok("connected")
        );
        assert_eventually(
            "control connection reached the backend",
            Duration::from_secs(5),
            || {
                let n = echo.accepted.load(Ordering::SeqCst);
                async move { n == 1 }
            },
        )
        .await;
        assert_eq!(
            echo.accepted.load(Ordering::SeqCst),
            1,
            "only the control got through"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_the_wrong_cluster_in_its_id_gets_zero_bytes() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        // A genuine south gateway, listed in the catalog as west's gateway.
        let impostor = Gateway::start("south", &pki.issue("south", "south"), |_| {});
        impostor.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots
            .send_replace(east_to_west(vip, impostor.addr()));
        east.wait_listening(vip).await;

        let res = try_ping(vip, b"hello").await;
        assert!(
            res.is_err(),
            "connection through an impostor must fail, got {res:?}"
        );
        assert_eq!(
            echo.accepted.load(Ordering::SeqCst),
            0,
            "backend saw a connection"
        );
        let wrong = east
            .metrics
            .handshake_failures
            .get_or_create(&tunnel::ReasonLabels {
                reason: "wrong_cluster",
            })
            .get();
        assert!(wrong >= 1, "wrong_cluster rejection counted");
    })
    .await;
}

/// How long rotated files may sit on disk before new handshakes present them.
const ROTATION_BOUND: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_reaches_new_handshakes_and_spares_open_connections() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west_dir = pki.issue("west", "west");
        let west = Gateway::start("west", &west_dir, |_| {});
        west.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;

        let mut open = Vec::new();
        for i in 0..100 {
            let mut c = dial(vip).await.expect("connect");
            let msg = format!("before {i:03}");
            assert_eq!(
                ping(&mut c, msg.as_bytes()).await.expect("echo"),
                msg.as_bytes()
            );
            open.push(c);
        }
        // The serial a fresh handshake sees, from a separate east endpoint.
        let prober = Gateway::start("east", &pki.dir.path().join("east"), |_| {});
        let serial_seen = || async {
            let conn = prober
                .endpoint
                .connect(west.addr(), &cluster("west"))
                .await
                .expect("probe handshake");
            let serial = tunnel::peer_identity(&conn, TD).expect("peer id").serial;
            conn.close(0u32.into(), b"probe");
            serial
        };
        let old = serial_seen().await;
        assert_eq!(old, west.identity.current().serial);

        certs::issue(&pki.ca, "west", &west_dir, Duration::from_secs(7200)).expect("rotate");
        // Timed from the moment the files are all on disk to the moment west's handshakes
        // would pick the new certificate (the resolver reads `current()` in every handshake).
        // Polling that is cheap; polling with whole handshakes would add their duration,
        // which on a loaded machine says nothing about the reload.
        let took = assert_eventually("west reloaded its certificate", ROTATION_BOUND, || {
            let changed = west.identity.current().serial != old;
            async move { changed }
        })
        .await;
        eprintln!("rotation picked up after {took:?}");
        let new = west.identity.current().serial.clone();
        // And a new handshake does present it.
        assert_eq!(serial_seen().await, new);

        for (i, c) in open.iter_mut().enumerate() {
            let msg = format!("after  {i:03}");
            assert_eq!(
                ping(c, msg.as_bytes()).await.expect("still works"),
                msg.as_bytes()
            );
        }
        assert_eq!(east.proxy.dials(), 1, "open connections were not cut");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_caller_certificate_reaches_new_proxied_connections_and_spares_open_ones() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        let east_dir = pki.issue("east", "east");
        let east = Gateway::start("east", &east_dir, |_| {});
        // West records which of east's certificates carried each stream.
        let west = EchoPeer::start(&pki.issue("west", "west"), "west");
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr));
        east.wait_listening(vip).await;

        let old = east.identity.current().serial.clone();
        let mut open = Vec::new();
        for i in 0..10 {
            let mut c = dial(vip).await.expect("connect");
            let msg = format!("before {i:02}");
            assert_eq!(
                ping(&mut c, msg.as_bytes()).await.expect("echo"),
                msg.as_bytes()
            );
            open.push(c);
        }
        assert_eq!(west.stream_serials(), vec![old.clone(); 10]);
        assert_eq!(east.proxy.dials(), 1);

        // Rotate east's own certificate on disk.
        certs::issue(&pki.ca, "east", &east_dir, Duration::from_secs(7200)).expect("rotate");
        let took = assert_eventually("east reloaded its certificate", ROTATION_BOUND, || {
            let changed = east.identity.current().serial != old;
            async move { changed }
        })
        .await;
        eprintln!("east's rotation picked up after {took:?}");
        let new = east.identity.current().serial.clone();

        // From the first one on, new proxied connections reach west with the new certificate:
        // the pool dials a new QUIC connection for them instead of reusing the old one.
        for i in 0..10 {
            let mut c = dial(vip).await.expect("connect");
            let msg = format!("new {i:02}");
            assert_eq!(
                ping(&mut c, msg.as_bytes()).await.expect("echo"),
                msg.as_bytes()
            );
            assert_eq!(
                west.stream_serials().last(),
                Some(&new),
                "proxied connection {i} after the rotation presented the old certificate"
            );
        }
        assert_eq!(
            east.proxy.dials(),
            2,
            "one new QUIC connection for all of them"
        );
        assert_eq!(west.connections(), 2);

        // The connections opened before are not cut: they still talk over the old QUIC
        // connection (no new stream appeared for them) and end cleanly.
        for (i, c) in open.iter_mut().enumerate() {
            let msg = format!("after  {i:02}");
            assert_eq!(
                ping(c, msg.as_bytes()).await.expect("still works"),
                msg.as_bytes()
            );
        }
        assert_eq!(west.stream_serials().len(), 20);
        assert_eq!(east.metrics.active_connections.get(), 2);
        for c in &mut open {
            c.shutdown().await.expect("FIN");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).await.expect("clean end");
            assert!(rest.is_empty());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_inbound_connection_outlives_the_peers_certificate() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let mut short = LeafSpec::gateway(TD, "east");
        short.not_after = SystemTime::now() + Duration::from_secs(3);
        let east = Gateway::start("east", &pki.leaf("east-short", &short), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        // A raw connection, outside east's pool (which would recycle it at half-life): west
        // itself must close it when the certificate that opened it expires.
        let conn = east
            .endpoint
            .connect(west.addr(), &cluster("west"))
            .await
            .expect("connect while valid");
        let opened = std::time::Instant::now();
        match conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, tunnel::CLOSE_EXPIRED)
            }
            other => panic!("expected the certificate-expired close, got {other:?}"),
        }
        let lived = opened.elapsed();
        assert!(
            lived <= Duration::from_secs(5),
            "closed {lived:?} after opening; the certificate expired within 3 s"
        );
    })
    .await;
}

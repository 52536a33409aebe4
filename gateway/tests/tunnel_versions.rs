//! Gateways of two releases side by side, as during a rolling upgrade. The tunnel handshake
//! settles on the newest protocol both ends speak (`meshup/1.1`, else `meshup/1`), and an
//! h2 client's request reaches its endpoint as h2 whichever of the two gateways is the
//! older one: it crosses as marked HTTP/1.1 only between two gateways that speak
//! `meshup/1.1` (docs/http-routing.md, "How a request travels"). A gateway stands in for
//! an older release by speaking only `meshup/1` (`TunnelConfig::first_protocol_only`).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshup_core::model::{AppProtocol, PortSpec, Protocol};
use meshup_core::tunnel::{RequestHeader, Status, decode_status, encode_header};
use meshup_gateway::inbound::{self, LocalExport};
use meshup_gateway::tunnel::{self, ALPN, ALPN_1_1};
use meshup_tests::web::WebBackend;

/// A gateway of `cluster_name` with the identity in `id`, of this release or (`older`) one
/// that speaks only `meshup/1`.
fn gateway(cluster_name: &str, id: &Path, older: bool) -> Gateway {
    Gateway::start(cluster_name, id, |c| c.first_protocol_only = older)
}

/// Two clusters' identities.
fn identities(pki: &Pki) -> [std::path::PathBuf; 2] {
    [pki.issue("east", "east"), pki.issue("west", "west")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handshake_settles_on_the_newest_protocol_both_ends_speak() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        let [east_id, west_id] = identities(&pki);
        // (caller older, server older, the protocol both settle on)
        for (caller_older, server_older, want) in [
            (false, false, ALPN_1_1),
            (true, false, ALPN),
            (false, true, ALPN),
            (true, true, ALPN),
        ] {
            let server = gateway("west", &west_id, server_older);
            let caller = gateway("east", &east_id, caller_older);
            let conn = raw_connection(&caller, &server).await;
            let data = conn
                .handshake_data()
                .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .expect("the handshake's data");
            let case = format!("caller older: {caller_older}, server older: {server_older}");
            assert_eq!(data.protocol.as_deref(), Some(want), "{case}");
            assert_eq!(tunnel::speaks_1_1(&conn), want == ALPN_1_1, "{case}");
        }
    })
    .await;
}

/// `west` serves `pay.prod:8080` as an `http` port from `backend`.
fn serve_http(west: &Gateway, backend: SocketAddr) {
    west.exports
        .send_replace(Arc::new(inbound::local_exports([LocalExport {
            service: service(),
            ports: vec![SERVICE_PORT],
            endpoints: vec![backend],
            allowed_callers: vec![],
            http_ports: vec![SERVICE_PORT],
            http1_ports: vec![],
        }])));
}

/// The catalog `east` sees: `west` exports `pay.prod:8080` as an `http` port, at `vip`.
async fn http_export(east: &Gateway, west: &Gateway, vip: IpAddr) {
    let mut export = fixture::export(SERVICE_PORT, 1);
    export.ports = vec![PortSpec {
        name: "http".into(),
        port: SERVICE_PORT,
        protocol: Protocol::Tcp,
        app_protocol: AppProtocol::Http,
        endpoint_protocol: Default::default(),
    }]
    .into();
    east.snapshots.send_replace(snapshot([
        gateway_record("west", "w1", west.addr(), false),
        fixture::put_export("west", "w1", SERVICE, export),
        vip_record("east", None, vip),
    ]));
    east.wait_listening(vip).await;
}

/// Concurrent slow requests (the backend answers `/slow` after 2 s).
const BURST: u32 = 8;

/// curl's output for `url` with `args`: the backend's echo line.
async fn curl(args: &[&str], url: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_clients_request_reaches_its_endpoint_as_h2_whichever_gateway_is_older() {
    within(Duration::from_secs(90), async {
        let pki = Pki::new();
        let [east_id, west_id] = identities(&pki);
        let backend = WebBackend::start("west").await.expect("backend");
        for (caller_older, server_older) in [(false, false), (false, true), (true, false)] {
            let case = format!("caller older: {caller_older}, server older: {server_older}");
            let west = gateway("west", &west_id, server_older);
            let east = gateway("east", &east_id, caller_older);
            serve_http(&west, backend.addr());
            let vip = next_vip();
            http_export(&east, &west, vip).await;
            let url = format!("http://{vip}:{SERVICE_PORT}/x");
            // HTTP/1.1 requests first: the streams they leave kept lead to the same serving
            // gateway, and an h2 client's request must not take one it would not read the
            // mark on.
            for _ in 0..3 {
                let out = curl(&["--http1.1"], &url).await;
                assert!(out.contains("version=HTTP/1.1"), "{case}: {out}");
            }
            for _ in 0..3 {
                let out = curl(&["--http2-prior-knowledge"], &url).await;
                assert!(
                    out.contains("version=HTTP/2.0") && out.contains("internal=-"),
                    "{case}: {out}"
                );
                assert!(
                    out.contains(&format!("authority={vip}:{SERVICE_PORT} scheme=http")),
                    "{case}: {out}"
                );
            }
            // Which way they crossed, seen in the streams the serving gateway was opened:
            // as HTTP/1.1, each request in flight needs a stream of its own, so a burst of
            // more slow requests than streams were ever opened before opens new ones; as
            // h2 they all share the port's one h2 stream, opened above.
            let opened = || {
                west.sum(
                    "meshup_tunnel_streams_opened_total",
                    &[("direction", "inbound")],
                )
            };
            let before = opened();
            let slow = format!("http://{vip}:{SERVICE_PORT}/slow");
            let burst = (0..BURST).map(|_| curl(&["--http2-prior-knowledge"], &slow));
            for out in futures::future::join_all(burst).await {
                assert!(out.contains("version=HTTP/2.0"), "{case}: {out}");
            }
            let new_streams = opened() - before;
            if caller_older || server_older {
                assert_eq!(
                    new_streams, 0.0,
                    "{case}: crossed as h2 on the shared stream"
                );
            } else {
                assert!(
                    before < f64::from(BURST) && new_streams >= f64::from(BURST) - before,
                    "{case}: crossed as HTTP/1.1: {before} streams before, {new_streams} new"
                );
            }
        }
    })
    .await;
}

/// What `conn`'s serving gateway answers on a new stream to `pay.prod:8080` carrying
/// `request`, an HTTP/1.1 request without a body: the echo line of the backend's response.
async fn over_raw_stream(conn: &quinn::Connection, caller: &str, request: &str) -> String {
    let (mut send, mut recv) = conn.open_bi().await.expect("a stream");
    let header = RequestHeader {
        request_id: 1,
        service: service(),
        port: SERVICE_PORT,
        caller: cluster(caller),
    };
    let mut bytes = encode_header(&header);
    bytes.extend_from_slice(request.as_bytes());
    send.write_all(&bytes).await.expect("the request is sent");
    let mut status = [0u8; 2];
    recv.read_exact(&mut status).await.expect("an answer");
    assert_eq!(decode_status(&status).ok(), Some(Status::Connected));
    // The response's headers, then its body: one line.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n")
            && body.ends_with('\n')
        {
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            return body.to_owned();
        }
        let n = recv
            .read(&mut buf)
            .await
            .expect("the response")
            .expect("the response before the stream ends");
        got.extend_from_slice(&buf[..n]);
    }
}

/// The first releases that mark an h2 client's request speak only `meshup/1`, so a serving
/// gateway reads the mark whatever the caller speaks: the same marked HTTP/1.1 bytes reach
/// the endpoint as h2, without the mark, on a `meshup/1` connection as on a `meshup/1.1` one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_is_read_from_a_caller_of_either_protocol() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        let [east_id, west_id] = identities(&pki);
        let backend = WebBackend::start("west").await.expect("backend");
        let west = gateway("west", &west_id, false);
        serve_http(&west, backend.addr());
        let request = "GET /x HTTP/1.1\r\nhost: pay.prod:8080\r\nmeshup-h2-client: http\r\n\r\n";
        for caller_older in [true, false] {
            let east = gateway("east", &east_id, caller_older);
            let conn = raw_connection(&east, &west).await;
            let out = over_raw_stream(&conn, "east", request).await;
            assert!(
                out.contains("version=HTTP/2.0 ") && out.contains("internal=-"),
                "caller older: {caller_older}: {out}"
            );
            assert!(
                out.contains("authority=pay.prod:8080 "),
                "caller older: {caller_older}: {out}"
            );
        }
    })
    .await;
}

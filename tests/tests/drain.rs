//! A drain that runs past its deadline: a stream in flight that never ends is cut at
//! `tunnel.drain_deadline`, the gateway stops anyway, and the result says the drain was
//! forced — `Gateway::drain` returns `false` in process, and a `meshup gateway` process told
//! to stop with SIGTERM exits non-zero. A drain with nothing in flight stays clean (`true`,
//! exit status 0) and does not wait for the deadline.
//!
//! The catalog is the embedded store (one process each), so no etcd is involved.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use meshup_core::model::{PortSpec, Protocol};
use meshup_core::names::{ClusterName, Namespace, ServiceKey, ServiceName};
use meshup_core::tunnel::{RequestHeader, Status, decode_status, encode_header};
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_gateway::app::Gateway;
use meshup_gateway::config::{AdminConfig, Config, ExportConfig};
use meshup_gateway::identity::{Identity, IdentityFiles};
use meshup_gateway::tunnel::{Endpoint, Metrics, TunnelConfig};
use meshup_tests::eventually_ok;
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, TRUST_DOMAIN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const SERVICE_NAME: &str = "hang";
const SERVICE_NAMESPACE: &str = "test";
const PORT: u16 = 7000;
/// Short, so the forced stop comes quickly; every check below is relative to it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);
/// A deadline no drain in these tests should come near.
const LONG_DEADLINE: Duration = Duration::from_secs(10);
/// What a drain may take beyond its deadline: closing the QUIC endpoint, revoking the
/// lease, stopping the tasks. Generous for a loaded machine, far below the deadline-free
/// alternative (the stream never ends, so an unbounded drain never returns).
const STOP_SLACK: Duration = Duration::from_secs(4);

/// A backend whose connections never end: it reads and discards, never answers, never
/// closes. Reports each connection's first bytes (probes send none) and, later, that the
/// connection was closed by the gateway.
async fn endless_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Event>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut seen = false;
                loop {
                    match conn.read(&mut buf).await {
                        Ok(n) if n > 0 => {
                            if !seen {
                                seen = true;
                                let _ = tx.send(Event::Bytes(buf[..n].to_vec()));
                            }
                        }
                        // A probe (no bytes) is not a proxied connection.
                        _ if !seen => return,
                        _ => {
                            let _ = tx.send(Event::Closed);
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, rx)
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Bytes(Vec<u8>),
    Closed,
}

async fn next_event(rx: &mut mpsc::UnboundedReceiver<Event>, what: &str) -> Event {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("backend: no {what} within 10 s"))
        .expect("backend running")
}

fn service_key() -> ServiceKey {
    format!("{SERVICE_NAME}.{SERVICE_NAMESPACE}")
        .parse()
        .expect("valid service")
}

fn export(backend: SocketAddr) -> ExportConfig {
    let key = service_key();
    ExportConfig {
        name: ServiceName::new(key.name.as_str()).expect("name"),
        namespace: Namespace::new(key.namespace.as_str()).expect("namespace"),
        ports: vec![PortSpec {
            name: "tcp".into(),
            port: PORT,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }],
        endpoints: vec![backend],
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

/// An in-process gateway of `cluster` on loopback, catalog in the shared embedded store.
fn config(
    certs: &Certs,
    cluster: &str,
    vip_cidr: &str,
    exports: Vec<ExportConfig>,
    drain_deadline: Duration,
) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut config = Config {
        cluster: ClusterName::new(cluster).expect("cluster"),
        gateway_id: None,
        region: String::new(),
        zone: String::new(),
        trust_domain: TRUST_DOMAIN.into(),
        catalog: CatalogConfig {
            backend: Backend::Embedded,
            prefix: "/drain".into(),
            allow_loopback_addresses: true,
            ..CatalogConfig::default()
        },
        vip_cidr: vip_cidr.parse().expect("cidr"),
        pinned_names: Default::default(),
        tunnel: TunnelConfig {
            listen: any,
            drain_deadline,
            ..TunnelConfig::with_files(IdentityFiles::in_dir(&certs.of(cluster)))
        },
        dns: Default::default(),
        admin: AdminConfig {
            http: any,
            ..AdminConfig::default()
        },
        exports,
        worker_threads: None,
        http: Default::default(),
        handover: None,
        datapath: None,
    };
    config.dns.listen = any;
    config.validate().expect("valid config");
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_stream_is_cut_at_the_drain_deadline_and_the_drain_says_so() {
    let (backend, mut events) = endless_backend().await;
    let certs = Certs::new(&["east", "west"]);
    let store = EmbeddedStore::new();
    let west = Gateway::start(
        config(
            &certs,
            "west",
            "127.79.2.0/24",
            vec![export(backend)],
            DRAIN_DEADLINE,
        ),
        Some(&store),
    )
    .await
    .expect("west starts");
    let east = Gateway::start(
        // A long deadline, so the control drain below cannot pass by waiting it out.
        config(&certs, "east", "127.79.1.0/24", vec![], LONG_DEADLINE),
        Some(&store),
    )
    .await
    .expect("east starts");

    // A client of east reaches west's backend through the tunnel.
    let key = service_key();
    let vip = eventually_ok(
        "east listens on a VIP for the service",
        Duration::from_secs(20),
        || {
            let snapshot = east.snapshots().borrow().clone();
            let vip = snapshot.vip(east.cluster(), &key, None);
            let listening =
                vip.is_some_and(|v| east.listeners().contains_key(&SocketAddr::new(v, PORT)));
            let state = match (vip, listening, east.readiness().is_ready()) {
                (Some(vip), true, true) => Ok(vip),
                state => Err(format!("vip, listening, ready: {state:?}")),
            };
            async move { state }
        },
    )
    .await;
    let mut client = connect_and_send(vip, b"hello").await;
    assert_eq!(
        next_event(&mut events, "proxied bytes").await,
        Event::Bytes(b"hello".to_vec())
    );

    // West drains with that stream in flight. It never ends, so the drain runs to its
    // deadline, cuts it, stops, and says it was not clean.
    let started = Instant::now();
    let completed = tokio::time::timeout(DRAIN_DEADLINE + STOP_SLACK * 2, west.drain())
        .await
        .expect("a drain past its deadline still returns");
    let took = started.elapsed();
    let forced = took;
    assert!(
        !completed,
        "the drain reported a clean finish after cutting a stream"
    );
    assert!(
        took >= DRAIN_DEADLINE,
        "gave up after {took:?}, before its deadline"
    );
    assert!(
        took < DRAIN_DEADLINE + STOP_SLACK,
        "stopped only after {took:?}"
    );

    // The cut reaches both ends: the backend's connection is closed, and east resets its
    // client (bytes were already delivered, so nothing is retried elsewhere).
    assert_eq!(next_event(&mut events, "close").await, Event::Closed);
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .expect("the client hears of the cut");
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the client must see a reset, not a clean end of a stream that was cut"
    );

    // Control: east has nothing in flight any more; its drain is clean and does not wait
    // for its deadline.
    let started = Instant::now();
    assert!(
        east.drain().await,
        "a drain with nothing in flight is clean"
    );
    let took = started.elapsed();
    assert!(took < LONG_DEADLINE / 2, "a clean drain waited {took:?}");
    eprintln!("forced drain took {forced:?}, clean drain {took:?}");
}

async fn connect_and_send(vip: IpAddr, msg: &[u8]) -> TcpStream {
    let mut client = TcpStream::connect(SocketAddr::new(vip, PORT))
        .await
        .expect("connect");
    client.write_all(msg).await.expect("send");
    client
}

// === the real process ===

/// One `meshup gateway` process of cluster `west`, exporting the endless backend, with its
/// own embedded catalog.
fn west_process(certs: &Certs, backend: SocketAddr, drain_deadline: Duration) -> GatewaySpec<'_> {
    GatewaySpec {
        exports: vec![(SERVICE_NAME, SERVICE_NAMESPACE, PORT, backend)],
        drain_deadline,
        ..GatewaySpec::embedded("west", "127.79.12.0/24", certs)
    }
}

/// A peer's QUIC endpoint with the certificate of `east`.
fn east_endpoint(certs: &Certs) -> std::sync::Arc<Endpoint> {
    let files = IdentityFiles::in_dir(&certs.of("east"));
    let mut cfg = TunnelConfig::with_files(files.clone());
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    let identity = Identity::load(files, TRUST_DOMAIN, ClusterName::new("east").expect("name"))
        .expect("east identity");
    Endpoint::bind(&cfg, identity, Metrics::default()).expect("bind")
}

fn header() -> Vec<u8> {
    encode_header(&RequestHeader {
        request_id: 1,
        service: service_key(),
        port: PORT,
        caller: ClusterName::new("east").expect("name"),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_past_the_drain_deadline_exits_non_zero_and_says_why() {
    let (backend, mut events) = endless_backend().await;
    let certs = Certs::new(&["east", "west"]);
    let mut west = GatewayProcess::start(west_process(&certs, backend, DRAIN_DEADLINE));
    west.wait_ready().await;
    let quic = west.quic_addr().await;
    // The process's catalog is its own, so the test dials it directly as east's pool would,
    // and opens one tunnel stream.
    let endpoint = east_endpoint(&certs);
    let conn = endpoint
        .connect(quic, &ClusterName::new("west").expect("name"))
        .await
        .expect("handshake with the gateway process");
    let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
    send.write_all(&header()).await.expect("header");
    send.write_all(b"hello").await.expect("payload");
    let mut status = [0u8; 2];
    recv.read_exact(&mut status).await.expect("status");
    assert_eq!(decode_status(&status), Ok(Status::Connected));
    assert_eq!(
        next_event(&mut events, "proxied bytes").await,
        Event::Bytes(b"hello".to_vec())
    );

    let signalled = Instant::now();
    west.signal("-TERM");
    let code = west.wait_exit(DRAIN_DEADLINE + STOP_SLACK * 2).await;
    let took = signalled.elapsed();
    let log = west.log_text();
    assert_eq!(
        code,
        Some(1),
        "exit status after a forced drain; log:\n{log}"
    );
    assert!(
        took >= DRAIN_DEADLINE,
        "exited {took:?} after SIGTERM, before the deadline"
    );
    assert!(
        took < DRAIN_DEADLINE + STOP_SLACK,
        "exited only {took:?} after SIGTERM"
    );
    eprintln!("forced exit {took:?} after SIGTERM");
    assert!(
        log.contains("drain deadline passed") && log.contains("drain deadline of 1s passed"),
        "the log must say the drain was cut short:\n{log}"
    );
    // The stream was cut, not left dangling: the backend's connection is closed and the
    // peer's QUIC connection ends with the gateway's close.
    assert_eq!(next_event(&mut events, "close").await, Event::Closed);
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the peer hears the close");
    assert!(
        reason.to_string().contains("draining"),
        "closed with {reason}, not the draining close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_nothing_in_flight_exits_zero_without_waiting_for_the_deadline() {
    // A long deadline, so an exit well before it proves the drain did not wait for it.
    const LONG: Duration = LONG_DEADLINE;
    let (backend, _events) = endless_backend().await;
    let certs = Certs::new(&["west"]);
    let mut west = GatewayProcess::start(west_process(&certs, backend, LONG));
    west.wait_ready().await;
    let signalled = Instant::now();
    west.signal("-TERM");
    let code = west.wait_exit(LONG + STOP_SLACK).await;
    let took = signalled.elapsed();
    let log = west.log_text();
    assert_eq!(
        code,
        Some(0),
        "exit status after a clean drain; log:\n{log}"
    );
    assert!(
        took < LONG / 2,
        "a drain with nothing in flight took {took:?}"
    );
    eprintln!("clean exit {took:?} after SIGTERM");
    assert!(log.contains("drain complete"), "log:\n{log}");
}

//! Bytes through client → east outbound → QUIC → west inbound → backend: integrity (also
//! across a path-MTU black hole), half close, resets, many concurrent connections on one QUIC
//! connection, and latency of small request/response exchanges.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use meshup_gateway::tunnel::{DEFAULT_MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Two gateways wired east → west for `pay.prod` at a fresh VIP.
async fn pair(backend: &Backend) -> (Pki, Gateway, Gateway, std::net::IpAddr) {
    let pki = Pki::new();
    let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
    let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
    west.export(backend.addr, &[]);
    let vip = next_vip();
    east.snapshots.send_replace(east_to_west(vip, west.addr()));
    east.wait_listening(vip).await;
    (pki, east, west, vip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_arrives_intact() {
    within(Duration::from_secs(240), async {
        let sink = Backend::sha256_sink().await;
        let (_pki, east, _west, vip) = pair(&sink).await;
        let mut client = dial(vip).await.expect("connect");

        const TOTAL: usize = 1 << 30;
        let mut chunk = vec![0u8; 1 << 20];
        let mut state: u64 = 0x1234_5678_9abc_def0;
        let mut hash = Sha256::new();
        let start = Instant::now();
        for _ in 0..TOTAL / chunk.len() {
            // Cheap pseudo-random bytes: a stuck or reordered chunk changes the digest.
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            hash.update(&chunk);
            client.write_all(&chunk).await.expect("write");
        }
        client.shutdown().await.expect("FIN");
        let mut digest = Vec::new();
        client.read_to_end(&mut digest).await.expect("digest");
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(digest, hash.finalize().to_vec(), "SHA-256 through the tunnel differs");
        eprintln!(
            "1 GiB through the tunnel in {secs:.1} s = {:.2} Gb/s (debug build, includes hashing both ends)",
            8.0 * TOTAL as f64 / secs / 1e9
        );
        assert_eq!(sink.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(east.proxy.dials(), 1);

        // Loopback carries jumbo packets: path MTU discovery must end at the configured
        // maximum and stay there. A GSO batch larger than one UDP send is refused by the
        // kernel (EMSGSIZE) and lost whole, which trips quinn's black-hole detector and pins
        // the MTU at 1200 bytes for the connection's busy life.
        let links = east.proxy.links().await;
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].black_holes, 0, "MTU black hole detected: {links:?}");
        assert_eventually("path MTU at tunnel.max_udp_payload", Duration::from_secs(5), || async {
            let links = east.proxy.links().await;
            links.len() == 1 && links[0].mtu == DEFAULT_MAX_UDP_PAYLOAD && links[0].black_holes == 0
        })
        .await;
    })
    .await;
}

/// Two gateways wired east → relay → west, so the path between them can be degraded.
async fn pair_via_relay(backend: &Backend) -> (Pki, Gateway, Gateway, Relay, std::net::IpAddr) {
    let pki = Pki::new();
    let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
    let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
    west.export(backend.addr, &[]);
    let relay = Relay::start(west.addr()).await;
    let vip = next_vip();
    east.snapshots.send_replace(east_to_west(vip, relay.addr));
    east.wait_listening(vip).await;
    (pki, east, west, relay, vip)
}

/// The largest UDP payload the degraded path below carries: an MTU of 1328 bytes (a tunnel
/// with 172 bytes of overhead), between QUIC's minimum and the configured maximum.
const PATH_PAYLOAD: usize = 1300;

/// Writes `total` pseudo-random bytes in 1 MiB chunks, continuing from `state`, into `client`
/// and `hash`.
async fn write_random(
    client: &mut tokio::net::TcpStream,
    total: usize,
    state: &mut u64,
    hash: &mut Sha256,
) {
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..total / chunk.len() {
        for word in chunk.chunks_exact_mut(8) {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        hash.update(&chunk);
        client.write_all(&chunk).await.expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_mtu_black_hole_falls_back_to_the_minimum_and_data_arrives_intact() {
    within(Duration::from_secs(120), async {
        let sink = Backend::sha256_sink().await;
        let (_pki, east, _west, relay, vip) = pair_via_relay(&sink).await;
        let mut client = dial(vip).await.expect("connect");
        let mut state: u64 = 0x0fed_cba9_8765_4321;
        let mut hash = Sha256::new();
        write_random(&mut client, 1 << 20, &mut state, &mut hash).await;
        // Path MTU discovery first climbs to the configured maximum over the clean path.
        assert_eventually(
            "path MTU at tunnel.max_udp_payload",
            Duration::from_secs(10),
            || async {
                let links = east.proxy.links().await;
                links.len() == 1 && links[0].mtu == DEFAULT_MAX_UDP_PAYLOAD
            },
        )
        .await;

        // Then the path stops carrying large datagrams, silently, mid-stream: every packet
        // of the size in use is lost from now on.
        relay.max_datagram.store(PATH_PAYLOAD, Ordering::SeqCst);
        let degraded = Instant::now();
        const TOTAL: usize = 32 << 20;
        write_random(&mut client, TOTAL, &mut state, &mut hash).await;
        client.shutdown().await.expect("FIN");
        let mut digest = Vec::new();
        client.read_to_end(&mut digest).await.expect("digest");
        let took = degraded.elapsed();
        assert_eq!(
            digest,
            hash.finalize().to_vec(),
            "SHA-256 through the tunnel differs"
        );
        eprintln!("32 MiB after the path MTU dropped took {took:?}");
        // Nothing stalled: this takes about half a second here, while a connection stuck on
        // packets the path cannot carry never finishes (the bound leaves room for a loaded
        // machine).
        assert!(took < Duration::from_secs(10), "stalled: {took:?}");

        assert!(
            relay.dropped_large.load(Ordering::SeqCst) > 0,
            "nothing was dropped"
        );
        let links = east.proxy.links().await;
        assert_eq!(links.len(), 1, "{links:?}");
        assert!(
            links[0].black_holes >= 1,
            "no black hole detected: {links:?}"
        );
        // Back to QUIC's minimum, which every path carries (a new search waits a minute).
        assert_eq!(links[0].mtu, MIN_UDP_PAYLOAD, "{links:?}");
        assert_eq!(east.proxy.dials(), 1, "the connection survived");
        assert_eq!(sink.accepted.load(Ordering::SeqCst), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_mtu_discovery_stays_within_a_path_that_never_carried_large_datagrams() {
    within(Duration::from_secs(120), async {
        let sink = Backend::sha256_sink().await;
        let (_pki, east, _west, relay, vip) = pair_via_relay(&sink).await;
        relay.max_datagram.store(PATH_PAYLOAD, Ordering::SeqCst);
        let mut client = dial(vip).await.expect("connect");
        let mut state: u64 = 0x1357_9bdf_2468_ace0;
        let mut hash = Sha256::new();
        let start = Instant::now();
        write_random(&mut client, 32 << 20, &mut state, &mut hash).await;
        client.shutdown().await.expect("FIN");
        let mut digest = Vec::new();
        client.read_to_end(&mut digest).await.expect("digest");
        let took = start.elapsed();
        assert_eq!(
            digest,
            hash.finalize().to_vec(),
            "SHA-256 through the tunnel differs"
        );
        eprintln!("32 MiB over a {PATH_PAYLOAD}-byte path took {took:?}");
        assert!(took < Duration::from_secs(10), "stalled: {took:?}");

        // Discovery probed above the path's limit (those probes were dropped) and settled
        // within it; lost probes are not a black hole.
        assert!(
            relay.dropped_large.load(Ordering::SeqCst) > 0,
            "no probe went above the path"
        );
        let links = east.proxy.links().await;
        assert_eq!(links.len(), 1, "{links:?}");
        let mtu = usize::from(links[0].mtu);
        assert!(
            (usize::from(MIN_UDP_PAYLOAD)..=PATH_PAYLOAD).contains(&mtu),
            "path MTU {mtu} outside what the path carries: {links:?}"
        );
        assert_eq!(links[0].black_holes, 0, "{links:?}");
        assert_eq!(east.proxy.dials(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_is_carried_both_ways() {
    within(Duration::from_secs(30), async {
        // Backend: reads to EOF, then answers how much it got, then closes.
        let counter = Backend::start(|mut s| async move {
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_ok() {
                let _ = s.write_all(format!("got {}", got.len()).as_bytes()).await;
            }
        })
        .await;
        let (_pki, east, west, vip) = pair(&counter).await;

        // Client → server FIN: the server sees EOF and can still answer.
        let mut c = dial(vip).await.expect("connect");
        c.write_all(&[7u8; 100_000]).await.expect("write");
        c.shutdown().await.expect("FIN");
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .await
            .expect("answer after our FIN");
        assert_eq!(answer, "got 100000");

        // Server → client FIN: the client sees EOF and can still send.
        let greeter = Backend::start(|mut s| async move {
            let _ = s.write_all(b"hello").await;
            let _ = s.shutdown().await; // FIN towards the client
            let mut got = Vec::new();
            if s.read_to_end(&mut got).await.is_ok() {
                // Report on a side channel: the length of what arrived after our FIN.
                let _ = std::fs::write(
                    std::env::temp_dir().join(format!("meshup-halfclose-{}", std::process::id())),
                    got.len().to_string(),
                );
            }
        })
        .await;
        west.export(greeter.addr, &[]);
        let mut c = dial(vip).await.expect("connect");
        let mut hello = Vec::new();
        c.read_to_end(&mut hello).await.expect("read to server FIN");
        assert_eq!(hello, b"hello");
        c.write_all(&[1u8; 54_321])
            .await
            .expect("still writable after server FIN");
        c.shutdown().await.expect("FIN");
        let marker = std::env::temp_dir().join(format!("meshup-halfclose-{}", std::process::id()));
        assert_eventually(
            "server got bytes sent after its FIN",
            Duration::from_secs(5),
            || {
                let ok = std::fs::read_to_string(&marker)
                    .map(|s| s == "54321")
                    .unwrap_or(false);
                async move { ok }
            },
        )
        .await;
        let _ = std::fs::remove_file(marker);
        drop(east);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_carried_across_both_ways() {
    within(Duration::from_secs(30), async {
        let (backend, mut reports) = Backend::reset_probe().await;
        let (_pki, _east, _west, vip) = pair(&backend).await;
        resets_cross_both_ways(vip, &mut reports).await;
    })
    .await;
}

/// How the backend's read ended after its echo, within 5 s.
async fn backend_saw(
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::ErrorKind>,
) -> std::io::ErrorKind {
    tokio::time::timeout(Duration::from_secs(5), reports.recv())
        .await
        .expect("backend noticed within 5 s")
        .expect("report")
}

/// Through `vip` to a [`Backend::reset_probe`]: a client RST reaches the backend as a reset,
/// not a FIN, and a backend RST reaches the client as a reset, not a clean EOF.
async fn resets_cross_both_ways(
    vip: std::net::IpAddr,
    reports: &mut tokio::sync::mpsc::UnboundedReceiver<std::io::ErrorKind>,
) {
    let mut c = dial(vip).await.expect("connect");
    assert_eq!(ping(&mut c, b"hello").await.expect("echo"), b"hello");
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(c);
    assert_eq!(
        backend_saw(reports).await,
        std::io::ErrorKind::ConnectionReset
    );

    let mut c = dial(vip).await.expect("connect");
    c.write_all(b"reset").await.expect("write");
    let mut buf = [0u8; 16];
    let res = c.read(&mut buf).await;
    assert!(
        matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "client should see a reset, got {res:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_connections_share_one_quic_connection() {
    within(Duration::from_secs(90), async {
        let echo = Backend::echo().await;
        let (_pki, east, west, vip) = pair(&echo).await;
        // Open all first (so they are concurrent), then talk on each.
        let mut clients = Vec::new();
        for _ in 0..1000 {
            clients.push(dial(vip).await.expect("connect"));
        }
        let tasks = clients.into_iter().enumerate().map(|(i, mut c)| {
            tokio::spawn(async move {
                let msg = format!("client {i:04}");
                let back = ping(&mut c, msg.as_bytes()).await.expect("echo");
                assert_eq!(back, msg.as_bytes());
                c // keep it open until all have answered
            })
        });
        let open: Vec<_> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.expect("client task"))
            .collect();
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1000);
        assert_eq!(
            east.proxy.dials(),
            1,
            "1000 connections must share one QUIC dial"
        );
        assert_eq!(west.server.in_flight(), 1000);
        assert_eq!(east.metrics.active_connections.get(), 1);
        drop(open);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_request_response_has_no_delayed_ack_stall() {
    within(Duration::from_secs(60), async {
        let echo = Backend::echo().await;
        let (_pki, _east, _west, vip) = pair(&echo).await;
        let mut c = dial(vip).await.expect("connect");
        let msg = vec![0x5au8; 1024];
        for _ in 0..50 {
            ping(&mut c, &msg).await.expect("warm-up");
        }
        let mut samples = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            ping(&mut c, &msg).await.expect("echo");
            samples.push(t.elapsed());
        }
        samples.sort();
        let p50 = samples[samples.len() / 2];
        let p99 = samples[samples.len() * 99 / 100];
        eprintln!("1 KiB RR through the gateway pair, warm stream: p50 {p50:?}, p99 {p99:?}");
        // A 25 ms delayed-ACK stall would put p50 at ~25 ms.
        assert!(
            p50 < Duration::from_millis(5),
            "p50 {p50:?} suggests ACK-delay stalls"
        );
    })
    .await;
}

/// ACK-only packets on a request/response chain: a 1 KiB exchange needs two datagrams, the
/// request and the response, each carrying the ACK of the other, because both gateways ask
/// their peer for ACKs within 1 ms rather than at once (gateway/src/tunnel/mod.rs,
/// `transport_config`). Acknowledging every packet at once makes it four datagrams: two
/// more sends, wake-ups and receives per exchange (docs/benchmarks.md, "Small messages").
/// Counted at a relay between the gateways, exchange by exchange (from one's start to the
/// next one's); the median, so that the few exchanges a loaded machine slows past 1 ms
/// (whose ACK then goes alone) do not decide it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_response_exchange_takes_two_datagrams_and_no_ack_only_packet() {
    within(Duration::from_secs(60), async {
        let echo = Backend::echo().await;
        let (_pki, _east, _west, relay, vip) = pair_via_relay(&echo).await;
        let mut c = dial(vip).await.expect("connect");
        let msg = vec![0x5au8; 1024];
        for _ in 0..50 {
            ping(&mut c, &msg).await.expect("warm-up");
        }
        let mut marks = vec![relay.passed.load(Ordering::SeqCst)];
        for _ in 0..300 {
            ping(&mut c, &msg).await.expect("echo");
            marks.push(relay.passed.load(Ordering::SeqCst));
        }
        let mut per_exchange: Vec<usize> = marks.windows(2).map(|w| w[1] - w[0]).collect();
        let total: usize = per_exchange.iter().sum();
        per_exchange.sort_unstable();
        let median = per_exchange[per_exchange.len() / 2];
        let mut histogram = std::collections::BTreeMap::<usize, usize>::new();
        for n in &per_exchange {
            *histogram.entry(*n).or_default() += 1;
        }
        eprintln!(
            "datagrams per 1 KiB exchange: median {median}, mean {:.2}, exchanges by datagrams {histogram:?}",
            total as f64 / per_exchange.len() as f64
        );
        assert_eq!(
            median, 2,
            "datagrams per exchange {histogram:?}: ACK-only packets on a request/response chain"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_spread_across_a_clusters_gateways_with_one_dial_each() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west_dir = pki.issue("west", "west");
        let w1 = Gateway::start("west", &west_dir, |_| {});
        let w2 = Gateway::start("west", &west_dir, |_| {});
        w1.export(echo.addr, &[]);
        w2.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(snapshot([
            gateway_record("west", "w1", w1.addr(), false),
            gateway_record("west", "w2", w2.addr(), false),
            export_record("west", "w1", 1),
            export_record("west", "w2", 1),
            vip_record("east", None, vip),
        ]));
        east.wait_listening(vip).await;
        let mut open = Vec::new();
        for i in 0..40 {
            let mut c = dial(vip).await.expect("connect");
            let msg = format!("spread {i:02}");
            assert_eq!(
                ping(&mut c, msg.as_bytes()).await.expect("echo"),
                msg.as_bytes()
            );
            open.push(c);
        }
        let (a, b) = (w1.server.in_flight(), w2.server.in_flight());
        assert_eq!(a + b, 40);
        assert!(a >= 10 && b >= 10, "streams not spread: {a} vs {b}");
        assert_eq!(
            east.proxy.dials(),
            2,
            "one QUIC connection per peer gateway"
        );
    })
    .await;
}

/// East serves `pay.prod` itself: the VIP goes straight to the local endpoint, no tunnel.
async fn local(backend: &Backend, idle: Duration) -> (Pki, Gateway, std::net::IpAddr) {
    let pki = Pki::new();
    let east = Gateway::start("east", &pki.issue("east", "east"), |c| {
        c.stream_idle_timeout = idle
    });
    east.export(backend.addr, &[]);
    let vip = next_vip();
    east.snapshots.send_replace(snapshot([
        gateway_record("east", "e1", east.addr(), false),
        export_record("east", "e1", 1),
        vip_record("east", None, vip),
    ]));
    east.wait_listening(vip).await;
    (pki, east, vip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_carries_half_close_and_resets_and_times_out_idle_connections() {
    within(Duration::from_secs(30), async {
        let (backend, mut reports) = Backend::reset_probe().await;
        let idle = Duration::from_millis(500);
        let (_pki, east, vip) = local(&backend, idle).await;

        // Client FIN: the backend sees EOF and still answers.
        let mut c = dial(vip).await.expect("connect");
        c.write_all(b"count").await.expect("write");
        c.write_all(&[7u8; 100_000]).await.expect("write");
        c.shutdown().await.expect("FIN");
        let mut answer = String::new();
        c.read_to_string(&mut answer)
            .await
            .expect("answer after our FIN");
        assert_eq!(answer, "got 100000");

        resets_cross_both_ways(vip, &mut reports).await;

        // Nothing moving for the idle timeout: both sides are reset.
        let mut c = dial(vip).await.expect("connect");
        // The gateway last moved a byte of this connection after this instant (taken once the
        // echo came back, it could be a little after, and the check a little early).
        let started = std::time::Instant::now();
        assert_eq!(ping(&mut c, b"quiet").await.expect("echo"), b"quiet");
        let mut buf = [0u8; 16];
        let res = c.read(&mut buf).await;
        assert!(
            matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "idle client should see a reset, got {res:?}"
        );
        assert!(started.elapsed() >= idle, "reset before the idle timeout");
        assert_eq!(
            backend_saw(&mut reports).await,
            std::io::ErrorKind::ConnectionReset
        );
        // Every one of these went to the local endpoint: no QUIC dial at all.
        assert_eq!(east.proxy.dials(), 0);
    })
    .await;
}

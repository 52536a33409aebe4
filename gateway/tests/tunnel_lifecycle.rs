//! Things that change while traffic flows: catalog changes close listeners, peers die
//! silently, pooled connections age out, gateways drain, candidates refuse, clients must
//! prove their address.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use meshup_gateway::tunnel::{self, CLOSE_DRAINING};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_export_closes_its_listener_but_open_connections_finish() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;

        let mut open = dial(vip).await.expect("connect");
        assert_eq!(ping(&mut open, b"one").await.expect("echo"), b"one");

        // West withdraws the export and the VIP goes with it.
        east.snapshots
            .send_replace(snapshot([gateway_record("west", "w1", west.addr(), false)]));
        assert_eventually("VIP listener closed (connect refused)", Duration::from_secs(5), || async {
            matches!(dial(vip).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
        })
        .await;
        assert!(east.proxy.listeners().is_empty());

        // The connection accepted before keeps working and ends cleanly.
        assert_eq!(ping(&mut open, b"two").await.expect("still echoes"), b"two");
        open.shutdown().await.expect("FIN");
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.expect("clean end");
        assert!(rest.is_empty());
        assert_eventually(
            "proxy has no connection in flight",
            Duration::from_secs(5),
            || {
                let n = east.proxy.in_flight();
                async move { n == 0 }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_noticed_within_three_and_a_half_seconds_and_idle_is_kept_alive() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        let relay = Relay::start(west.addr()).await;
        let conn = east
            .endpoint
            .connect(relay.addr, &cluster("west"))
            .await
            .expect("connect through relay");

        // Idle for longer than the idle timeout: keep-alives hold the connection open.
        tokio::time::sleep(tunnel::DEFAULT_IDLE_TIMEOUT + Duration::from_secs(1)).await;
        assert!(
            conn.close_reason().is_none(),
            "idle connection died: {:?}",
            conn.close_reason()
        );

        // The peer goes silent (packets dropped both ways, like SIGKILL or a blackhole) once an
        // exchange is complete: the worst moment, as east then sends nothing until its next
        // keep-alive, a whole interval away, and quinn's own idle timer only starts again
        // there (it would notice after up to idle + keep_alive = 4 s). Timed from the peer's
        // last datagram to east: the peer died no earlier than that.
        relay.blackhole_when_quiet(Duration::from_millis(50));
        assert_eventually("the relay went silent", Duration::from_secs(5), || {
            let silent = relay.blackhole.load(Ordering::SeqCst);
            async move { silent }
        })
        .await;
        let died = relay.last_to_client().expect("east heard from west");
        let reason = conn.closed().await;
        let took = died.elapsed();
        eprintln!("silent peer noticed {took:?} after its last datagram ({reason})");
        assert!(
            took <= Duration::from_millis(3500),
            "noticed {took:?} after the peer died"
        );
        // Not before either: a peer is dead after `idle_timeout` of silence, not sooner.
        assert!(
            took >= tunnel::DEFAULT_IDLE_TIMEOUT,
            "closed after only {took:?} of silence"
        );
        assert!(
            matches!(reason, quinn::ConnectionError::LocallyClosed),
            "{reason:?}"
        );
        assert_eq!(east.metrics.silent_peers.get(), 1, "closed for silence");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aged_connection_takes_no_new_streams_and_its_open_stream_runs_to_its_end() {
    within(Duration::from_secs(30), async {
        const AGE: Duration = Duration::from_secs(1);
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |c| {
            c.max_connection_age = AGE;
            // Grace for the streams of a retired connection: long enough for `before` to end.
            c.drain_deadline = Duration::from_secs(5);
        });
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;

        // Taken before the first dial starts, so the first QUIC connection is handed out
        // until at least `first_dial + AGE`.
        let first_dial = Instant::now();
        let mut before = dial(vip).await.expect("connect");
        assert_eq!(ping(&mut before, b"before").await.expect("echo"), b"before");
        assert_eq!(east.proxy.dials(), 1);

        // New proxied connections, one at a time: each that finished before the age rode the
        // first QUIC connection; after the age, one of them dials a second.
        let give_up = Instant::now() + AGE + Duration::from_secs(5);
        let replaced = loop {
            let mut c = dial(vip).await.expect("connect");
            assert_eq!(ping(&mut c, b"probe").await.expect("echo"), b"probe");
            let done = Instant::now();
            match east.proxy.dials() {
                1 => assert!(done < give_up, "no new QUIC connection after the age"),
                2 => break done,
                n => panic!("{n} dials"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            replaced >= first_dial + AGE,
            "a new QUIC connection {:?} after the first, before max_connection_age",
            replaced - first_dial
        );
        eprintln!(
            "first QUIC connection replaced {:?} after it was dialled",
            replaced - first_dial
        );
        // Later ones share the new connection.
        for _ in 0..3 {
            assert_eq!(try_ping(vip, b"later").await.expect("echo"), b"later");
        }
        assert_eq!(east.proxy.dials(), 2);

        // The stream opened before still works on the old connection, and ends cleanly.
        assert_eq!(east.metrics.active_connections.get(), 2);
        assert_eq!(
            ping(&mut before, b"after the age")
                .await
                .expect("still works"),
            b"after the age"
        );
        before.shutdown().await.expect("FIN");
        let mut rest = Vec::new();
        before.read_to_end(&mut rest).await.expect("clean end");
        assert!(rest.is_empty());
        // Then the retired connection closes (after its grace), and only the new one is left.
        assert_eventually(
            "the retired connection closed",
            Duration::from_secs(10),
            || {
                let n = east.metrics.active_connections.get();
                async move { n == 1 }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_work_lets_streams_finish_and_closes_with_draining() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;

        let mut inflight = dial(vip).await.expect("connect");
        assert_eq!(
            ping(&mut inflight, b"before").await.expect("echo"),
            b"before"
        );
        assert_eq!(west.server.in_flight(), 1);

        // A connection made before the drain, to watch how it is closed at the end.
        let prober = Gateway::start("east", &pki.dir.path().join("east"), |_| {});
        let watcher = prober
            .endpoint
            .connect(west.addr(), &cluster("west"))
            .await
            .expect("connect before drain");

        let server = west.server.clone();
        let drain = tokio::spawn(async move { server.drain(Duration::from_secs(10)).await });
        assert_eventually("drain started", Duration::from_secs(2), || {
            let d = west.server.is_draining();
            async move { d }
        })
        .await;

        // New stream on the existing QUIC connection: answered `draining`, nothing proxied.
        let res = try_ping(vip, b"new").await;
        assert!(
            res.is_err(),
            "new connection during drain must fail: {res:?}"
        );
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
        assert_eventually(
            "outbound stream counted as draining",
            Duration::from_secs(2),
            || {
                let n = east.sum(
                    "meshup_tunnel_streams_closed_total",
                    &[
                        ("direction", "outbound"),
                        ("source_cluster", "east"),
                        ("destination_cluster", "west"),
                        ("result", "draining"),
                    ],
                );
                async move { n == 1.0 }
            },
        )
        .await;
        // New QUIC connections are refused too.
        assert!(
            prober
                .endpoint
                .connect(west.addr(), &cluster("west"))
                .await
                .is_err()
        );

        // The in-flight stream still works, and the drain ends when it does.
        assert_eq!(
            ping(&mut inflight, b"during").await.expect("echo"),
            b"during"
        );
        assert!(!drain.is_finished());
        drop(inflight);
        let report = drain.await.expect("drain task");
        assert!(report.completed, "{report:?}");
        assert_eq!(report.remaining, 0);

        // Close with the draining code: peers see why.
        west.endpoint.close(CLOSE_DRAINING, b"draining");
        match watcher.closed().await {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, CLOSE_DRAINING)
            }
            other => panic!("expected an application close with the draining code, got {other:?}"),
        }
        west.endpoint.wait_idle().await;
    })
    .await;
}

/// East's catalog with north and west both exporting `pay.prod` (north first in line),
/// plus `vips`.
fn north_then_west(
    north: std::net::SocketAddr,
    west: std::net::SocketAddr,
    vips: impl IntoIterator<Item = meshup_core::catalog::Change>,
) -> std::sync::Arc<meshup_core::catalog::Snapshot> {
    // North first, whatever the RTTs measured so far (the default order would sort by them).
    let north_first = meshup_core::policy::PolicyRecord {
        levels: ["north", "west"]
            .into_iter()
            .map(|c| meshup_core::policy::Level {
                clusters: vec![meshup_core::policy::Member {
                    cluster: cluster(c),
                    weight: 1,
                }],
            })
            .collect(),
        ..Default::default()
    };
    snapshot(
        [
            gateway_record("north", "n1", north, false),
            gateway_record("west", "w1", west, false),
            export_record("north", "n1", 1),
            export_record("west", "w1", 1),
            meshup_core::catalog::Change::PutPolicy(service(), Arc::new(north_first)),
        ]
        .into_iter()
        .chain(vips),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_candidate_fails_over_before_any_byte_and_pinned_vip_stays_pinned() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let north_backend = Backend::echo().await;
        let west_backend = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let north = Gateway::start("north", &pki.issue("north", "north"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        // North only lets south call it: east gets `forbidden` there and moves on to west.
        north.export(north_backend.addr, &["south"]);
        west.export(west_backend.addr, &[]);
        let vip = next_vip();
        let pinned = next_vip();
        east.snapshots.send_replace(north_then_west(
            north.addr(),
            west.addr(),
            [
                vip_record("east", None, vip),
                vip_record("east", Some("north"), pinned),
            ],
        ));
        east.wait_listening(vip).await;
        east.wait_listening(pinned).await;

        let mut c = dial(vip).await.expect("connect");
        assert_eq!(
            ping(&mut c, b"hello").await.expect("echo via west"),
            b"hello"
        );
        assert_eq!(north_backend.accepted.load(Ordering::SeqCst), 0);
        assert_eq!(west_backend.accepted.load(Ordering::SeqCst), 1);

        // The VIP pinned to north never falls over to west.
        assert!(try_ping(pinned, b"hello").await.is_err());
        assert_eq!(west_backend.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(north_backend.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_before_the_answer_survive_a_refusal_exactly_once() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let north_backend = Backend::sha256_sink().await;
        let west_backend = Backend::sha256_sink().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let north = Gateway::start("north", &pki.issue("north", "north"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        north.export(north_backend.addr, &["south"]);
        west.export(west_backend.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(north_then_west(
            north.addr(),
            west.addr(),
            [vip_record("east", None, vip)],
        ));
        east.wait_listening(vip).await;

        // The client writes more than the early-data allowance and half-closes at once,
        // before any peer can have answered: north refuses after some of it went out, west
        // must receive every byte once, in order, then the FIN.
        for len in [1, 1000, 16 * 1024, 100 * 1024] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let mut c = dial(vip).await.expect("connect");
            c.write_all(&payload).await.expect("write");
            c.shutdown().await.expect("FIN");
            let mut digest = Vec::new();
            c.read_to_end(&mut digest).await.expect("digest");
            assert_eq!(
                digest,
                Sha256::digest(&payload).to_vec(),
                "{len} bytes arrived altered"
            );
        }
        assert_eq!(north_backend.accepted.load(Ordering::SeqCst), 0);
        assert_eq!(west_backend.accepted.load(Ordering::SeqCst), 4);
    })
    .await;
}

/// A peer gateway that accepts streams, reads `wait_for` bytes of each (header included),
/// then drops the whole connection without answering (as a gateway killed mid-stream would).
/// Counts the bytes it received.
async fn mute_peer(
    pki: &Pki,
    wait_for: usize,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let files = meshup_gateway::identity::IdentityFiles::in_dir(&pki.issue("north", "north"));
    let mut cfg = tunnel::TunnelConfig::with_files(files.clone());
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    let identity =
        meshup_gateway::identity::Identity::load(files, TD, cluster("north")).expect("identity");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = tunnel::Metrics::register(&mut registry);
    let endpoint = tunnel::Endpoint::bind(&cfg, identity, metrics).expect("bind");
    let addr = endpoint.local_addr();
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = received.clone();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.quinn().accept().await {
            let Ok(conn) = incoming.await else { continue };
            let Ok((_send, mut recv)) = conn.accept_bi().await else {
                continue;
            };
            let mut seen = 0;
            let mut buf = vec![0u8; 64 * 1024];
            while seen < wait_for {
                match recv.read(&mut buf).await {
                    Ok(Some(n)) => {
                        seen += n;
                        counted.fetch_add(n, Ordering::SeqCst);
                    }
                    _ => break,
                }
            }
            conn.close(tunnel::CLOSE_SHUTDOWN, b"gone");
        }
    });
    (addr, task, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_lost_after_client_bytes_went_out_is_never_replayed() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let west_backend = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(west_backend.addr, &[]);
        // North comes first among the candidates, takes the stream and vanishes unanswered.
        let via = |north: std::net::SocketAddr, vip| {
            north_then_west(north, west.addr(), [vip_record("east", None, vip)])
        };

        // Nothing of the client's went out before the loss: the connection moves to west.
        let (north_addr, north, _) = mute_peer(&pki, 0).await;
        let vip = next_vip();
        east.snapshots.send_replace(via(north_addr, vip));
        east.wait_listening(vip).await;
        let mut c = dial(vip).await.expect("connect");
        assert_eventually(
            "east dialled west after north",
            Duration::from_secs(5),
            || {
                let dials = east.proxy.dials();
                async move { dials >= 2 }
            },
        )
        .await;
        assert_eq!(
            ping(&mut c, b"hello").await.expect("echo via west"),
            b"hello"
        );
        assert_eq!(west_backend.accepted.load(Ordering::SeqCst), 1);
        north.abort();

        // North reads the header and the client's first bytes, then vanishes unanswered. If
        // the bytes went out with the header (north had just completed its handshake, so it
        // counted as fresh), north may have passed them on: they are not replayed to west and
        // the client sees its connection reset. If east held them back for the answer, north
        // never saw them and the connection moves on to west. Either way no byte is ever
        // delivered twice.
        let payload = vec![0x5au8; 1000];
        let (north_addr, north, north_got) = mute_peer(&pki, payload.len()).await;
        let vip = next_vip();
        east.snapshots.send_replace(via(north_addr, vip));
        east.wait_listening(vip).await;
        let mut c = dial(vip).await.expect("connect");
        c.write_all(&payload).await.expect("write");
        let mut buf = vec![0u8; payload.len()];
        let res = c.read_exact(&mut buf).await;
        let got = north_got.load(Ordering::SeqCst);
        if got >= payload.len() {
            // A reset (as promised), not a clean EOF the client could take for a complete
            // answer; an echo would mean west got the bytes too.
            assert!(
                matches!(&res, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "north got the client's bytes ({got}): the client must be reset, got {res:?}"
            );
            assert_eq!(
                west_backend.accepted.load(Ordering::SeqCst),
                1,
                "client bytes were replayed to west"
            );
        } else {
            res.expect("north never saw the client's bytes: west serves them");
            assert_eq!(buf, payload);
            assert_eq!(west_backend.accepted.load(Ordering::SeqCst), 2);
        }
        north.abort();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_next_address_is_dialled_when_the_first_is_dead() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |c| {
            c.connect_timeout = Duration::from_millis(300)
        });
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(echo.addr, &[]);
        // A UDP socket nobody reads: a handshake to it times out.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        let vip = next_vip();
        east.snapshots.send_replace(snapshot([
            gateway_record_at("west", "w1", &[dead_addr, west.addr()], false),
            export_record("west", "w1", 1),
            vip_record("east", None, vip),
        ]));
        east.wait_listening(vip).await;
        for _ in 0..3 {
            assert_eq!(try_ping(vip, b"hello").await.expect("echo"), b"hello");
        }
        // The dead address was dialled once and is in backoff; the live one serves all.
        assert_eq!(east.proxy.dials(), 2);
        let links = east.proxy.links().await;
        assert_eq!(links.len(), 1, "{links:?}");
        assert_eq!(links[0].peer.addr, west.addr());

        // West leaves the catalog: its pooled connection is forgotten.
        east.snapshots
            .send_replace(snapshot([vip_record("east", None, vip)]));
        assert_eventually(
            "departed peer dropped from the pool",
            Duration::from_secs(5),
            || {
                let proxy = east.proxy.clone();
                async move { proxy.links().await.is_empty() }
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unvalidated_clients_get_a_retry_under_load() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        // max_handshakes = 1 puts the Retry threshold at 0 handshakes in progress: every new
        // client must validate its address first.
        let west = Gateway::start("west", &pki.issue("west", "west"), |c| c.max_handshakes = 1);
        let relay = Relay::start(west.addr()).await;
        let conn = east
            .endpoint
            .connect(relay.addr, &cluster("west"))
            .await
            .expect("connects after a Retry");
        assert!(
            relay.retries_seen.load(Ordering::SeqCst) >= 1,
            "no Retry packet seen"
        );
        drop(conn);

        // With the default cap nobody is asked to retry when idle.
        let calm = Gateway::start("west", &pki.dir.path().join("west"), |_| {});
        let relay = Relay::start(calm.addr()).await;
        east.endpoint
            .connect(relay.addr, &cluster("west"))
            .await
            .expect("connects");
        assert_eq!(relay.retries_seen.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_with_fin_per_new_connection_has_no_ack_delay_stall() {
    within(Duration::from_secs(60), async {
        let pki = Pki::new();
        // HTTP/1.0 style: request, FIN, response, close — a new TCP connection every time.
        let backend = Backend::start(|mut s| async move {
            let mut req = Vec::new();
            if s.read_to_end(&mut req).await.is_ok() {
                let _ = s.write_all(&req).await;
            }
        })
        .await;
        let east = Gateway::start("east", &pki.issue("east", "east"), |_| {});
        let west = Gateway::start("west", &pki.issue("west", "west"), |_| {});
        west.export(backend.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;
        let req = vec![0x42u8; 1024];
        let mut samples = Vec::new();
        for i in 0..220 {
            let t = Instant::now();
            let mut c = dial(vip).await.expect("connect");
            c.write_all(&req).await.expect("write");
            c.shutdown().await.expect("FIN");
            let mut resp = Vec::new();
            c.read_to_end(&mut resp).await.expect("read");
            assert_eq!(resp.len(), req.len());
            if i >= 20 {
                samples.push(t.elapsed());
            }
        }
        samples.sort();
        let p50 = samples[samples.len() / 2];
        let p99 = samples[samples.len() * 99 / 100];
        eprintln!("1 KiB request+FIN on a new TCP connection, warm QUIC: p50 {p50:?}, p99 {p99:?}");
        assert!(
            p50 < Duration::from_millis(5),
            "p50 {p50:?} suggests ACK-delay stalls"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_proxied_connections_are_reset_busy_ones_are_not() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let echo = Backend::echo().await;
        let idle = Duration::from_millis(600);
        let east = Gateway::start("east", &pki.issue("east", "east"), |c| {
            c.stream_idle_timeout = idle
        });
        let west = Gateway::start("west", &pki.issue("west", "west"), |c| {
            c.stream_idle_timeout = idle
        });
        west.export(echo.addr, &[]);
        let vip = next_vip();
        east.snapshots.send_replace(east_to_west(vip, west.addr()));
        east.wait_listening(vip).await;

        let mut quiet = dial(vip).await.expect("connect");
        let mut busy = dial(vip).await.expect("connect");
        // The gateways last saw the quiet connection move a byte after this instant.
        let quiet_last = Instant::now();
        assert_eq!(ping(&mut quiet, b"hi").await.expect("echo"), b"hi");
        let quiet_reset = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let res = quiet.read(&mut buf).await.map_err(|e| e.kind());
            (res, Instant::now())
        });
        let start = Instant::now();
        // Busy: a byte every 50 ms (a twelfth of the idle timeout, so a slow machine does not
        // make it idle) for three idle periods.
        while start.elapsed() < 3 * idle {
            assert_eq!(
                ping(&mut busy, b"x")
                    .await
                    .expect("busy connection survives"),
                b"x"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Quiet: reset by now, and not before it had been idle for the timeout.
        let (res, reset_at) = tokio::time::timeout(Duration::from_secs(2), quiet_reset)
            .await
            .expect("quiet connection was not closed")
            .expect("reader task");
        assert_eq!(
            res.map(|_| ()),
            Err(std::io::ErrorKind::ConnectionReset),
            "idle connection should be reset"
        );
        assert!(
            reset_at - quiet_last >= idle,
            "reset after {:?}, before the idle timeout",
            reset_at - quiet_last
        );
    })
    .await;
}

#[tokio::test]
async fn a_cluster_beyond_its_connection_limit_is_closed() {
    within(Duration::from_secs(30), async {
        let pki = Pki::new();
        let east_id = pki.issue("east", "east");
        let west = Gateway::start("west", &pki.issue("west", "west"), |c| {
            c.max_connections_per_cluster = 2;
        });
        let east = Gateway::start("east", &east_id, |_| {});
        let mut kept = Vec::new();
        for _ in 0..2 {
            let conn = east
                .endpoint
                .connect(west.addr(), &cluster("west"))
                .await
                .expect("within the limit");
            kept.push(conn);
        }
        let third = east
            .endpoint
            .connect(west.addr(), &cluster("west"))
            .await
            .expect("the handshake itself succeeds");
        let reason = tokio::time::timeout(Duration::from_secs(5), third.closed())
            .await
            .expect("the third connection is closed by the server");
        assert!(
            reason.to_string().contains("too many connections"),
            "closed for the limit: {reason}"
        );
        // The first two are untouched, and closing one frees its slot.
        assert!(kept.iter().all(|c| c.close_reason().is_none()));
        let first = kept.remove(0);
        first.close(0u32.into(), b"done");
        assert_eventually(
            "a freed slot admits a new connection",
            Duration::from_secs(5),
            || {
                let endpoint = east.endpoint.clone();
                let addr = west.addr();
                async move {
                    let Ok(conn) = endpoint.connect(addr, &cluster("west")).await else {
                        return false;
                    };
                    // Admitted means served: the server answers a tunnel header (for a
                    // service it does not export) with a status. A connection over the limit
                    // is closed instead, however slowly the server gets to it.
                    answers_a_header(&conn).await
                }
            },
        )
        .await;
    })
    .await;
}

/// Whether the server at the other end of `conn` answers a tunnel header with a status.
async fn answers_a_header(conn: &quinn::Connection) -> bool {
    use meshup_core::tunnel::{RequestHeader, decode_status, encode_header};
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    let header = RequestHeader {
        request_id: 7,
        service: "nothing.here".parse().expect("a valid service key"),
        port: SERVICE_PORT,
        caller: cluster("east"),
    };
    if send.write_all(&encode_header(&header)).await.is_err() {
        return false;
    }
    let mut status = [0u8; 2];
    match tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut status)).await {
        Ok(Ok(())) => decode_status(&status).is_ok(),
        _ => false,
    }
}

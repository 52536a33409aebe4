//! Replacing a gateway process on a node (an upgrade, a restart) while clients use it:
//! real `meshup gateway` processes on a real etcd, a client loop of new connections through
//! the VIP, a long stream with every byte checked, and `dig` asking the node's DNS all along.
//!
//! The successor connects to the running gateway's hand-over socket, takes its listening
//! sockets (VIP listeners, DNS, admin), serves QUIC on the other of the two hand-over ports,
//! and becomes ready; then the old process gets SIGTERM and drains. Nothing may fail: not a
//! connection, not a DNS answer, not a byte of the long stream, which stays on the old
//! process until it ends. A second successor goes back to the first QUIC port. Peers see it
//! too: a client loop in the other cluster reaching a backend behind the replaced gateway
//! loses nothing either, its gateway moving to the successor's QUIC port. The replaced
//! gateway and its successors run one worker thread (`worker_threads: 1`).

use std::net::SocketAddr;
use std::time::Duration;

use meshup_tests::gateways::{Certs, DigLoop, GatewayProcess, GatewaySpec};
use meshup_tests::workload::{EchoServer, RunningStream, Workload};
use meshup_tests::{EtcdServer, eventually_ok};

const SERVICE: &str = "echo.prod";
const NAME: &str = "echo.prod.svc.clusterset.local";
const PORT: u16 = 7000;
/// Exported by the gateway being replaced, called from the other cluster.
const INBOUND: &str = "pay.prod";
const INBOUND_PORT: u16 = 7100;
/// Bytes the long stream must move after the old process began draining (32 round trips).
const STILL_FLOWING: u64 = 32 * 1024;

/// The QUIC port the catalog publishes for `east` (as `west` sees it, from its status).
fn published_quic_port(west: &GatewayProcess) -> anyhow::Result<u16> {
    let (_, body) = west.admin_get("/status")?;
    let status: serde_json::Value = serde_json::from_str(&body)?;
    let text = status.to_string();
    // The status lists every gateway of every cluster with its QUIC addresses.
    let clusters = status["clusters"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no clusters in {text}"))?;
    let east = clusters
        .iter()
        .find(|c| c["name"] == "east")
        .ok_or_else(|| anyhow::anyhow!("no east in {text}"))?;
    let addr = east["gateways"][0]["addrs"][0]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no QUIC address of east in {east}"))?;
    Ok(addr.parse::<SocketAddr>()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_successor_process_takes_over_without_losing_a_connection_or_a_dns_answer() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east", "west"]);
    let echo = EchoServer::start().await.expect("echo backend");
    let east_backend = EchoServer::start().await.expect("east's backend");
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("echo", "prod", PORT, echo.addr())],
        ..GatewaySpec::new("west", "127.86.2.0/24", &etcd, &certs, "/handover")
    });
    // One worker thread (tokio's current-thread scheduler; successors share the config):
    // every other test's gateways run the multi-thread one.
    let mut first = GatewayProcess::start(GatewaySpec {
        handover: true,
        worker_threads: Some(1),
        exports: vec![("pay", "prod", INBOUND_PORT, east_backend.addr())],
        drain_deadline: Duration::from_secs(20),
        ..GatewaySpec::new("east", "127.86.1.0/24", &etcd, &certs, "/handover")
    });
    west.wait_ready().await;
    first.wait_ready().await;
    let vip = first.wait_routable(SERVICE, PORT).await;
    let dns = first.dns_addr().await;
    let first_port = eventually_ok(
        "west sees east's QUIC port",
        Duration::from_secs(20),
        || async { published_quic_port(&west) },
    )
    .await;

    let inbound_vip = west.wait_routable(INBOUND, INBOUND_PORT).await;
    let load = Workload::new(vip, 4, 40.0).start();
    let inbound = Workload::new(inbound_vip, 2, 40.0).start();
    let dns_loop = DigLoop::start(None, dns, NAME, vip.ip());
    let stream = RunningStream::start(vip);
    eventually_ok("the loops are running", Duration::from_secs(10), || async {
        anyhow::ensure!(load.successes_since(Duration::ZERO) >= 20 && dns_loop.answers() >= 5);
        Ok(())
    })
    .await;

    // The successor takes over, with the old process serving throughout.
    let mut second = first.start_successor();
    second
        .wait_log("took over from the previous gateway process")
        .await;
    first.wait_log("the successor is ready").await;
    second.wait_ready().await;
    // The same kernel sockets, not new ones: a second bind of a VIP would fail here.
    let log = second.log_text();
    assert!(
        log.contains("VIP listener taken over") && !log.contains("cannot bind VIP listener"),
        "the successor did not take the VIP listener over; log:\n{log}"
    );
    let second_port = eventually_ok(
        "the catalog publishes the successor's QUIC port",
        Duration::from_secs(20),
        || async {
            let p = published_quic_port(&west)?;
            anyhow::ensure!(p != first_port, "still {p}");
            Ok(p)
        },
    )
    .await;
    let overlap = load.offset(std::time::Instant::now());
    eventually_ok(
        "new connections succeed with both processes up",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(load.successes_since(overlap) >= 40);
            Ok(())
        },
    )
    .await;

    // The old process drains: the long stream still runs on it, then ends cleanly.
    let term = first.signal("-TERM");
    first.wait_log("draining after a hand-over").await;
    let at_drain = stream.echoed();
    eventually_ok(
        "the long stream keeps flowing through the draining process",
        Duration::from_secs(10),
        || async {
            let moved = stream.echoed() - at_drain;
            anyhow::ensure!(
                moved >= STILL_FLOWING,
                "{moved} bytes since the drain began"
            );
            Ok(())
        },
    )
    .await;
    let streamed = stream
        .finish()
        .await
        .expect("the long stream stayed intact");
    let code = first.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "old process log:\n{}", first.log_text());
    let after = load.offset(std::time::Instant::now());
    eventually_ok(
        "the successor alone serves new connections",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(load.successes_since(after) >= 40);
            Ok(())
        },
    )
    .await;

    // A second successor goes back to the first QUIC port.
    let mut third = second.start_successor();
    third
        .wait_log("took over from the previous gateway process")
        .await;
    third.wait_ready().await;
    // SIGTERM at once, before the catalog names the third's QUIC port: the second keeps
    // serving the streams the other cluster still opens to it until peers can move.
    second.signal("-TERM");
    assert_eq!(
        second.wait_exit(Duration::from_secs(30)).await,
        Some(0),
        "second process log:\n{}",
        second.log_text()
    );
    let third_port = eventually_ok(
        "the catalog publishes the third process's QUIC port",
        Duration::from_secs(20),
        || async {
            let p = published_quic_port(&west)?;
            anyhow::ensure!(p == first_port, "still {p}");
            Ok(p)
        },
    )
    .await;
    let last = load.offset(std::time::Instant::now());
    eventually_ok(
        "the third process serves new connections",
        Duration::from_secs(10),
        || async {
            anyhow::ensure!(load.successes_since(last) >= 40);
            Ok(())
        },
    )
    .await;

    let outcomes = load.stop().await;
    let inbound_outcomes = inbound.stop().await;
    let inbound_failed: Vec<_> = inbound_outcomes
        .iter()
        .filter(|o| o.result.is_err())
        .collect();
    let (answers, dns_failures) = dns_loop.finish();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    eprintln!(
        "hand-over: {} connections ({} failed), {} from the other cluster ({} failed), {answers} DNS answers ({} failed), long stream {streamed} bytes intact; QUIC ports {first_port} -> {second_port} -> {third_port}; old process stopped {:?} after SIGTERM",
        outcomes.len(),
        failed.len(),
        inbound_outcomes.len(),
        inbound_failed.len(),
        dns_failures.len(),
        term.elapsed(),
    );
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert!(
        inbound_failed.is_empty(),
        "failed connections from the other cluster: {inbound_failed:?}\nwest's log:\n{}\nsecond's log:\n{}",
        west.log_text(),
        second.log_text()
    );
    assert!(
        east_backend.accepted() >= inbound_outcomes.len(),
        "the other cluster's connections did not all reach east's backend"
    );
    assert!(dns_failures.is_empty(), "DNS failures: {dns_failures:?}");
    // Every record is the last process's: its lease holds them, the old leases are gone.
    let (code, _) = third.admin_get("/ready").expect("ready");
    assert_eq!(code, 200);
}

/// A successor under another gateway id (a DaemonSet's new pod has its own name), while a
/// long stream from the other cluster holds the old process's drain open: once peers can
/// reach the successor, the old process marks its own record draining, so the other cluster
/// stops opening streams to it instead of having each refused there for the rest of the
/// drain. New connections lose nothing, none is refused by the old process after the mark,
/// and the long stream finishes intact on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_predecessor_under_another_id_is_marked_draining_while_a_stream_holds_its_drain() {
    const PREFIX: &str = "/handover-new-id";
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east", "west"]);
    let east_backend = EchoServer::start().await.expect("east's backend");
    let mut west = GatewayProcess::start(GatewaySpec::new(
        "west",
        "127.86.4.0/24",
        &etcd,
        &certs,
        PREFIX,
    ));
    let mut first = GatewayProcess::start(GatewaySpec {
        handover: true,
        replica_id: Some("east-1"),
        exports: vec![("pay", "prod", INBOUND_PORT, east_backend.addr())],
        drain_deadline: Duration::from_secs(30),
        ..GatewaySpec::new("east", "127.86.3.0/24", &etcd, &certs, PREFIX)
    });
    west.wait_ready().await;
    first.wait_ready().await;
    let inbound_vip = west.wait_routable(INBOUND, INBOUND_PORT).await;
    // East has one gateway yet: the long stream is served by the old process.
    let stream = RunningStream::start(inbound_vip);
    eventually_ok("the long stream flows", Duration::from_secs(10), || async {
        anyhow::ensure!(stream.echoed() >= 16 * 1024, "{} bytes", stream.echoed());
        Ok(())
    })
    .await;

    let mut second = first.start_successor_as("east-2");
    second.wait_taken_over().await;
    let term = first.signal("-TERM");
    first
        .wait_log("marking this gateway draining in the catalog")
        .await;
    eventually_ok(
        "west sees east-1 draining beside east-2",
        Duration::from_secs(10),
        || async {
            let east = west.catalog_gateways("east")?;
            let want = [("east-1".to_owned(), true), ("east-2".to_owned(), false)];
            anyhow::ensure!(east == want, "{east:?}");
            Ok(())
        },
    )
    .await;
    // The drain is still held open by the stream: the old process has not exited.
    assert!(
        first.is_running(),
        "the old process exited under its long stream"
    );

    // Counted from the 10th new connection on: the status above shows the catalog as west
    // received it, and its routing acts on it a task hop later.
    let draining = "result=\"draining\"";
    let load = Workload::new(inbound_vip, 2, 40.0).start();
    let went_through = |n| {
        let load = &load;
        move || async move {
            anyhow::ensure!(load.successes_since(Duration::ZERO) >= n);
            Ok(())
        }
    };
    eventually_ok(
        "new connections go through",
        Duration::from_secs(20),
        went_through(10),
    )
    .await;
    let refused_before = west.metric_sum("meshup_service_attempt_failures_total", &[draining]);
    let refused_before = refused_before.expect("west's metrics");
    eventually_ok(
        "new connections go through",
        Duration::from_secs(20),
        went_through(70),
    )
    .await;
    let outcomes = load.stop().await;
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let refused = west
        .metric_sum("meshup_service_attempt_failures_total", &[draining])
        .expect("west's metrics")
        - refused_before;
    let streamed = stream
        .finish()
        .await
        .expect("the long stream stayed intact");
    let code = first.wait_exit(Duration::from_secs(30)).await;
    eprintln!(
        "new-id hand-over: {} new connections from the other cluster ({} failed, {refused} refused as draining) during the drain, long stream {streamed} bytes intact; old process stopped {:?} after SIGTERM",
        outcomes.len(),
        failed.len(),
        term.elapsed()
    );
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    assert_eq!(
        refused,
        0.0,
        "streams refused by the draining process after west saw it draining; west's log:\n{}",
        west.log_text()
    );
    assert_eq!(code, Some(0), "old process log:\n{}", first.log_text());

    // A plain SIGTERM of a gateway that serves the hand-over socket with no successor
    // waiting: it revokes its lease (its records leave the catalog at once, not after the
    // lease's TTL) before it closes its QUIC connections.
    second.signal("-TERM");
    let code = second.wait_exit(Duration::from_secs(30)).await;
    let log = second.log_text();
    assert_eq!(code, Some(0), "east-2's log:\n{log}");
    let revoked = log.find("catalog lease revoked; own records removed");
    assert!(revoked.is_some(), "east-2's log:\n{log}");
    assert!(
        !log.contains("publisher still shared"),
        "east-2's log:\n{log}"
    );
}

//! Tests with real `meshup gateway` processes on a real etcd: what depends on a process dying
//! (kill -9) or being told to stop (SIGTERM) can only be shown with real processes.
//!
//! The `meshup` binary must be built (`cargo build --workspace` builds it; `.ci/test` does).
//! A missing binary, `etcd` or `etcdctl` is a loud failure, never a skip.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use meshup_core::model::{VipRecord, decode};
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::store::{self, KeyValue, Store};
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, LEASE_TTL, dig};
use meshup_tests::link::Link;
use meshup_tests::relay::Direction;
use meshup_tests::workload::{EchoServer, RunningStream, Workload};
use meshup_tests::{EtcdServer, eventually_ok};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A backend that streams bytes forever to each connection.
async fn streaming_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 16 * 1024];
                while c.write_all(&chunk).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    });
    addr
}

/// An in-process etcd client: polling through it costs a loopback round trip, not an
/// `etcdctl` process, so a deadline checked with it measures etcd, not process start-up.
async fn catalog_client(etcd: &EtcdServer) -> Arc<dyn Store> {
    Arc::new(
        EtcdStore::connect(EtcdOptions {
            endpoints: vec![etcd.endpoint()],
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .expect("connect to etcd"),
    )
}

/// Every key under `prefix`, read in-process.
async fn list(store: &dyn Store, prefix: &str) -> anyhow::Result<Vec<KeyValue>> {
    Ok(store::list_prefix(store, prefix.as_bytes()).await?.0)
}

fn key_str(kv: &KeyValue) -> String {
    String::from_utf8_lossy(&kv.key).into_owned()
}

fn keys_under(etcd: &EtcdServer, prefix: &str) -> Vec<String> {
    etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix])
        .expect("etcdctl get")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_gateway_records_leave_the_catalog_within_ttl_plus_one_second() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let catalog = catalog_client(&etcd).await;
    let certs = Certs::new(&["west"]);
    let echo = EchoServer::start().await.expect("echo server");
    let backend = echo.addr();
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("pay", "prod", 8080, backend)],
        ..GatewaySpec::new("west", "127.78.2.0/24", &etcd, &certs, "/lease")
    });
    west.wait_ready().await;
    let own = "/lease/v1/clusters/west/";
    let records = eventually_ok(
        "west's gateway and export records",
        Duration::from_secs(10),
        || async {
            let keys: Vec<String> = list(catalog.as_ref(), own)
                .await?
                .iter()
                .map(key_str)
                .collect();
            if keys.len() == 2 && keys.iter().any(|k| k.ends_with("/exports/prod/pay")) {
                Ok(keys)
            } else {
                Err(anyhow::anyhow!("records: {keys:?}"))
            }
        },
    )
    .await;
    assert!(
        records.iter().any(|k| k.ends_with("/gateways/west-0")),
        "{records:?}"
    );
    // The VIPs (clusterset and pinned to west) are allocated asynchronously after start:
    // wait for both, so the check below that they survive the kill is about survival, not
    // about timing.
    let vips_prefix = "/lease/v1/vips/west/";
    let vips = eventually_ok("west's VIPs allocated", Duration::from_secs(10), || async {
        let vips = list(catalog.as_ref(), vips_prefix).await?;
        if vips.len() == 2 {
            Ok(vips)
        } else {
            Err(anyhow::anyhow!(
                "VIPs: {:?}",
                vips.iter().map(key_str).collect::<Vec<_>>()
            ))
        }
    })
    .await;

    let killed = west.kill9();
    // Polled in-process every 20 ms: the first poll that finds the records gone comes
    // within a loopback round trip of their deletion.
    eventually_ok(
        "records gone after kill -9",
        Duration::from_secs(10),
        || async {
            let keys = list(catalog.as_ref(), own).await?;
            if keys.is_empty() {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "still there: {:?}",
                    keys.iter().map(key_str).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    let gone_after = killed.elapsed();
    eprintln!(
        "records of a kill -9'd gateway gone {gone_after:?} after the kill (TTL {LEASE_TTL:?})"
    );
    assert!(
        gone_after <= LEASE_TTL + Duration::from_secs(1),
        "records took {gone_after:?} to leave the catalog (TTL {LEASE_TTL:?} + 1 s allowed)"
    );
    west.wait_exit(Duration::from_secs(5)).await;
    // VIPs are not lease-bound: the cluster's allocation survives its gateway, unchanged.
    let after = list(catalog.as_ref(), vips_prefix)
        .await
        .expect("list VIPs");
    assert_eq!(after, vips, "VIPs must outlive a gateway restart");
}

/// Two replicas of one cluster (same config, different `MESHUP_GATEWAY_ID`) allocate VIPs
/// from one etcd at the same moments: every VIP is allocated once, by one of them, and both
/// answer exactly etcd's address for every name, clusterset and cluster-pinned, over DNS and
/// on their status page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_one_cluster_answer_the_same_vip_for_every_service() {
    const PREFIX: &str = "/replicas";
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let catalog = catalog_client(&etcd).await;
    let certs = Certs::new(&["east", "west"]);
    let echo = EchoServer::start().await.expect("echo server");
    let backend = echo.addr();
    // Both replicas start together and export the same local service, so they race for its
    // VIPs from their first catalog on.
    let spec = |id| GatewaySpec {
        exports: vec![("ledger", "prod", 7000, backend)],
        replica_id: Some(id),
        ..GatewaySpec::new("east", "127.78.41.0/24", &etcd, &certs, PREFIX)
    };
    let mut replicas = [
        GatewayProcess::start(spec("east-0")),
        GatewayProcess::start(spec("east-1")),
    ];
    // Both share this host's loopback, so each VIP and port can be bound by one of them
    // only; the other keeps retrying it, reports it unbound (checked below) and is not ready
    // while any of its first catalog's VIPs is held by the other.
    for r in &mut replicas {
        r.wait_ready_but_listeners().await;
    }
    // West joins once both replicas are up: both see its four services in the same watch
    // event and race for all of their VIPs.
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![
            ("pay", "prod", 8080, backend),
            ("cart", "prod", 8081, backend),
            ("search", "prod", 8082, backend),
            ("mail", "prod", 8083, backend),
        ],
        ..GatewaySpec::new("west", "127.78.42.0/24", &etcd, &certs, PREFIX)
    });
    west.wait_ready().await;
    let services: BTreeMap<&str, &str> = [
        ("ledger.prod", "east"),
        ("pay.prod", "west"),
        ("cart.prod", "west"),
        ("search.prod", "west"),
        ("mail.prod", "west"),
    ]
    .into_iter()
    .collect();
    // One clusterset VIP per service and one pinned to the cluster that exports it.
    let wanted = services.len() * 2;

    let vip_prefix = format!("{PREFIX}/v1/vips/east/");
    let claim_prefix = format!("{PREFIX}/v1/vip-claims/east/");
    let vips: BTreeMap<String, KeyValue> =
        eventually_ok("east's VIPs allocated", Duration::from_secs(20), || async {
            let vips = list(catalog.as_ref(), &vip_prefix).await?;
            if vips.len() == wanted {
                Ok(vips.into_iter().map(|kv| (key_str(&kv), kv)).collect())
            } else {
                Err(anyhow::anyhow!(
                    "{} of {wanted} VIPs: {:?}",
                    vips.len(),
                    vips.iter().map(key_str).collect::<Vec<_>>()
                ))
            }
        })
        .await;
    // etcd's answer, per DNS name.
    let mut expected: BTreeMap<String, IpAddr> = BTreeMap::new();
    for (svc, exporter) in &services {
        let (name, ns) = svc.split_once('.').expect("name.namespace");
        let base = format!("{vip_prefix}{ns}/{name}");
        for (key, dns) in [
            (base.clone(), format!("{name}.{ns}.svc.clusterset.local")),
            (
                format!("{base}/pinned/{exporter}"),
                format!("{name}.{ns}.svc.{exporter}.clusterset.local"),
            ),
        ] {
            let kv = vips
                .get(&key)
                .unwrap_or_else(|| panic!("no VIP key {key}: {:?}", vips.keys()));
            // Written once: a replica that lost the race adopted the winner's record
            // instead of overwriting it.
            assert_eq!(
                kv.create_revision, kv.mod_revision,
                "{key} was overwritten after its allocation"
            );
            let record: VipRecord = decode(&kv.value).expect("a valid VIP record");
            assert!(
                matches!(record.vip, IpAddr::V4(v4) if v4.octets()[..3] == [127, 78, 41]),
                "{key}: {} is outside east's vip_cidr",
                record.vip
            );
            expected.insert(dns, record.vip);
        }
    }
    let distinct: BTreeSet<IpAddr> = expected.values().copied().collect();
    assert_eq!(
        distinct.len(),
        wanted,
        "two names share an address: {expected:?}"
    );
    // One address claim per VIP, naming its VIP key: no replica claimed a second address
    // for a service it lost.
    let claims = list(catalog.as_ref(), &claim_prefix)
        .await
        .expect("list claims");
    let claimed: BTreeMap<String, String> = claims
        .iter()
        .map(|kv| {
            let ip = key_str(kv)[claim_prefix.len()..].to_owned();
            (ip, String::from_utf8_lossy(&kv.value).into_owned())
        })
        .collect();
    let held: BTreeMap<String, String> = vips
        .iter()
        .map(|(key, kv)| {
            let record: VipRecord = decode(&kv.value).expect("VIP record");
            (record.vip.to_string(), key.clone())
        })
        .collect();
    assert_eq!(claimed, held, "address claims and VIP keys disagree");
    // Between them, the replicas allocated each VIP exactly once.
    let allocated = eventually_ok("allocation counters", Duration::from_secs(10), || async {
        let mut total = 0.0;
        for r in &replicas {
            total += r.metric("meshup_catalog_vips_allocated_total")?;
        }
        Ok::<_, anyhow::Error>(total)
    })
    .await;
    assert_eq!(
        allocated, wanted as f64,
        "VIP allocations by both replicas together"
    );
    // Every VIP is listened on, by exactly one replica: a bind never takes an address the
    // other replica holds (no SO_REUSEPORT), and the one that lost it says so.
    eventually_ok(
        "each VIP bound by one replica",
        Duration::from_secs(10),
        || async {
            let mut bound = 0.0;
            let mut unbound = 0.0;
            for r in &replicas {
                bound += r.metric("meshup_tunnel_listeners")?;
                unbound += r.metric("meshup_tunnel_listeners_unbound")?;
            }
            if bound == wanted as f64 && unbound == wanted as f64 {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "{bound} bound and {unbound} unbound of {wanted} VIP listeners per replica"
                ))
            }
        },
    )
    .await;

    for (i, replica) in replicas.iter().enumerate() {
        let dns = replica.dns_addr().await;
        // Over DNS, every name: each replica serves its own watcher's copy of the catalog.
        let answers = eventually_ok(
            &format!("replica {i} answers etcd's VIP for every name"),
            Duration::from_secs(10),
            || async {
                let mut answers = BTreeMap::new();
                for name in expected.keys() {
                    let query = name.clone();
                    let got = tokio::task::spawn_blocking(move || dig(dns, &query))
                        .await
                        .expect("dig task")?;
                    answers.insert(name.clone(), got);
                }
                let wanted: BTreeMap<String, Vec<IpAddr>> = expected
                    .iter()
                    .map(|(n, ip)| (n.clone(), vec![*ip]))
                    .collect();
                if answers == wanted {
                    Ok(answers)
                } else {
                    Err(anyhow::anyhow!("answers {answers:?}, etcd {wanted:?}"))
                }
            },
        )
        .await;
        assert_eq!(answers.len(), wanted);
        // And on the status page, every service with its clusterset VIP.
        let (code, body) = replica.admin_get("/status").expect("/status");
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        assert_eq!(
            status["gateway_id"],
            format!("east-{i}"),
            "MESHUP_GATEWAY_ID names the replica"
        );
        let shown: BTreeMap<String, String> = status["services"]
            .as_array()
            .expect("services")
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().expect("name").to_owned(),
                    s["vip"].as_str().unwrap_or("none").to_owned(),
                )
            })
            .collect();
        let clusterset: BTreeMap<String, String> = services
            .keys()
            .map(|svc| {
                let (name, ns) = svc.split_once('.').expect("name.namespace");
                let ip = expected[&format!("{name}.{ns}.svc.clusterset.local")];
                ((*svc).to_owned(), ip.to_string())
            })
            .collect();
        assert_eq!(shown, clusterset, "replica {i}'s status page");
    }
    // Both replicas are in the catalog under their own ids.
    let gateways: Vec<String> = list(
        catalog.as_ref(),
        &format!("{PREFIX}/v1/clusters/east/gateways/"),
    )
    .await
    .expect("list")
    .iter()
    .map(key_str)
    .filter(|k| !k.contains("/exports/"))
    .collect();
    assert_eq!(
        gateways,
        [
            format!("{PREFIX}/v1/clusters/east/gateways/east-0"),
            format!("{PREFIX}/v1/clusters/east/gateways/east-1"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_remote_gateway_resets_the_client_within_seconds() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = Certs::new(&["east", "west"]);
    let backend = streaming_backend().await;
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("stream", "test", 9000, backend)],
        ..GatewaySpec::new("west", "127.78.12.0/24", &etcd, &certs, "/kill")
    });
    let mut east = GatewayProcess::start(GatewaySpec::new(
        "east",
        "127.78.11.0/24",
        &etcd,
        &certs,
        "/kill",
    ));
    west.wait_ready().await;
    east.wait_ready().await;
    let vip = east.wait_routable("stream.test", 9000).await;

    let mut client = TcpStream::connect(vip).await.expect("connect to the VIP");
    let mut buf = vec![0u8; 64 * 1024];
    let mut received = 0usize;
    while received < 256 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("bytes flow before the kill")
            .expect("read");
        assert!(n > 0, "stream ended before the kill");
        received += n;
    }

    let killed = west.kill9();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    let noticed = killed.elapsed();
    let outcome = outcome.unwrap_or_else(|_| {
        panic!(
            "client connection still hanging 10 s after kill -9; east log:\n{}",
            east.log_text()
        )
    });
    let err = outcome.expect_err("a dead remote must reset the client, not end it cleanly");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        noticed <= Duration::from_millis(4500),
        "client saw the reset {noticed:?} after kill -9 (promise: ~3.5 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_connections_to_completion() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = Certs::new(&["east", "west"]);
    let echo = EchoServer::start().await.expect("echo server");
    let backend = echo.addr();
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("echo", "test", 7000, backend)],
        drain_deadline: Duration::from_secs(10),
        ..GatewaySpec::new("west", "127.78.22.0/24", &etcd, &certs, "/drain")
    });
    let mut east = GatewayProcess::start(GatewaySpec::new(
        "east",
        "127.78.21.0/24",
        &etcd,
        &certs,
        "/drain",
    ));
    west.wait_ready().await;
    east.wait_ready().await;
    let vip = east.wait_routable("echo.test", 7000).await;

    // Five connections, each sending 40 chunks of 16 KiB over ~2 s and reading the echo.
    const CHUNKS: usize = 40;
    const CHUNK: usize = 16 * 1024;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(8);
    let mut clients = Vec::new();
    for i in 0..5u8 {
        let started = started_tx.clone();
        clients.push(tokio::spawn(async move {
            let conn = TcpStream::connect(vip).await?;
            let (mut r, mut w) = conn.into_split();
            let writer = tokio::spawn(async move {
                let mut sent = Sha256::new();
                for c in 0..CHUNKS {
                    let chunk: Vec<u8> =
                        (0..CHUNK).map(|j| (j + c + usize::from(i)) as u8).collect();
                    w.write_all(&chunk).await?;
                    sent.update(&chunk);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                w.shutdown().await?;
                Ok::<_, std::io::Error>(sent.finalize())
            });
            let mut got = Sha256::new();
            let mut buf = vec![0u8; 32 * 1024];
            let mut total = 0;
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                if total == 0 {
                    // The first echoed byte proves the stream reached west's backend: from
                    // now on the connection is in flight through west.
                    let _ = started.send(()).await;
                }
                got.update(&buf[..n]);
                total += n;
            }
            let sent = writer.await.map_err(std::io::Error::other)??;
            Ok::<_, std::io::Error>((total, sent == got.finalize()))
        }));
    }
    for _ in 0..5 {
        started_rx.recv().await.expect("every client started");
    }

    west.signal("-TERM");
    // Peers learn of the drain through the catalog before the gateway goes away.
    eventually_ok(
        "west marked draining in etcd",
        Duration::from_secs(3),
        || async {
            let v = etcd.etcdctl(&[
                "get",
                "/drain/v1/clusters/west/gateways/west-0",
                "--print-value-only",
            ])?;
            if v.contains("\"draining\":true") {
                Ok(())
            } else {
                Err(anyhow::anyhow!("record: {v}"))
            }
        },
    )
    .await;
    for c in clients {
        let (total, same) = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("in-flight connection finished")
            .expect("client task")
            .unwrap_or_else(|e| {
                panic!(
                    "in-flight connection broke during drain: {e}; west log:\n{}",
                    west.log_text()
                )
            });
        assert_eq!(total, CHUNKS * CHUNK, "every byte echoed");
        assert!(same, "echo intact");
    }
    let code = west.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "a drained gateway exits cleanly");
    assert!(
        west.log_text().contains("draining"),
        "the gateway logs its drain"
    );
    // After a clean exit the lease is revoked: the records are gone at once, not after TTL.
    assert!(keys_under(&etcd, "/drain/v1/clusters/west/").is_empty());
}

/// A backend that answers every connection with `len` bytes of a known pattern and closes.
async fn bulk_backend(len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if c.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n;
                }
                let _ = c.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_cut_the_tail_of_a_response_that_already_finished() {
    // The backend writes the whole response and closes at once, so on the serving gateway the
    // stream is "finished" long before the client has read it: the drain must still wait
    // until the peer acknowledged every byte before closing the QUIC connection.
    const LEN: usize = 48 * 1024 * 1024;
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = Certs::new(&["east", "west"]);
    let backend = bulk_backend(LEN).await;
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("bulk", "test", 7100, backend)],
        drain_deadline: Duration::from_secs(10),
        ..GatewaySpec::new("west", "127.78.32.0/24", &etcd, &certs, "/tail")
    });
    let mut east = GatewayProcess::start(GatewaySpec::new(
        "east",
        "127.78.31.0/24",
        &etcd,
        &certs,
        "/tail",
    ));
    west.wait_ready().await;
    east.wait_ready().await;
    let vip = east.wait_routable("bulk.test", 7100).await;

    let mut client = TcpStream::connect(vip).await.expect("connect");
    // The client has nothing to send (like an HTTP/1.0 request already written): its FIN
    // ends the upstream direction, so once the backend finishes, no stream stays open to
    // hold the drain back.
    client.shutdown().await.expect("half-close");
    let mut buf = vec![0u8; 64 * 1024];
    let first = tokio::time::timeout(Duration::from_secs(10), client.read(&mut buf))
        .await
        .expect("first bytes")
        .expect("read");
    assert!(first > 0);
    // Let the serving side run ahead: the client pauses, so most of the response sits in
    // QUIC buffers, unacknowledged, when the drain starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    west.signal("-TERM");
    let mut total = first;
    let mut intact = buf[..first]
        .iter()
        .enumerate()
        .all(|(i, b)| usize::from(*b) == i % 251);
    loop {
        let n = tokio::time::timeout(Duration::from_secs(20), client.read(&mut buf))
            .await
            .expect("response keeps flowing during the drain")
            .unwrap_or_else(|e| {
                panic!(
                    "response cut after {total} of {LEN} bytes: {e}; west log:\n{}",
                    west.log_text()
                )
            });
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            // The pattern restarts with every 64 KiB chunk the backend writes.
            intact &= usize::from(*b) == total % (64 * 1024) % 251;
            total += 1;
        }
    }
    assert_eq!(total, LEN, "every byte of the response arrived");
    assert!(intact, "bytes arrived in order and unchanged");
    assert_eq!(west.wait_exit(Duration::from_secs(15)).await, Some(0));
}

/// A gateway with one worker thread (`worker_threads: 1`) runs tokio's current-thread
/// scheduler, which runs woken tasks in turn: the streams whose clients wrote at the same
/// moment all write to the QUIC connection before its driver runs, and it sends their
/// messages together, several to a datagram. The multi-thread scheduler ran the driver
/// straight after each stream's write (its LIFO slot) and sent one datagram per message
/// (docs/benchmarks.md, "One worker thread").
///
/// East is stopped (SIGSTOP) while 32 clients each send a message, then continued, so it
/// wakes with all 32 connections readable at once; the datagrams from east to west are
/// counted at a relay between the gateways. The same one-thread gateways answer DNS (a name
/// outside the fast table goes through the runtime from a DNS thread) and drain on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_thread_gateway_sends_messages_that_arrive_together_in_few_datagrams() {
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 10;
    let mut link = Link::start("/one-thread", Some(1)).await;
    let (relay, vip) = (&link.relay, link.vip);
    let dns = link.east.dns_addr().await;
    let found = tokio::task::spawn_blocking(move || dig(dns, "echo.prod.svc.clusterset.local"))
        .await
        .expect("dig task")
        .expect("dig");
    assert_eq!(
        found,
        vec![vip.ip()],
        "the one-thread gateway's DNS names the VIP"
    );
    // EDNS version 1 is not the fast table's: hickory's catalog answers it, reached through
    // the runtime from the DNS thread.
    let out = std::process::Command::new("dig")
        .args([
            format!("@{}", dns.ip()),
            "-p".to_owned(),
            dns.port().to_string(),
        ])
        .args([
            "+edns=1",
            "+noednsnegotiation",
            "+tries=1",
            "+time=5",
            "echo.prod.svc.clusterset.local",
        ])
        .output()
        .expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("status: BADVERS"),
        "the catalog path answers EDNS version 1 with BADVERS: {text}"
    );

    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let mut c = TcpStream::connect(vip).await.expect("connect");
        c.set_nodelay(true).expect("nodelay");
        let hello = format!("hello {i:02}");
        c.write_all(hello.as_bytes()).await.expect("write");
        let mut got = vec![0u8; hello.len()];
        c.read_exact(&mut got).await.expect("echo");
        assert_eq!(got, hello.as_bytes());
        clients.push(c);
    }

    let mut per_round = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let before = relay.counts(Direction::ToUpstream).forwarded;
        link.east.signal("-STOP");
        // Loopback delivers each write into east's receive queue before it returns.
        for (i, c) in clients.iter_mut().enumerate() {
            let msg = [u8::try_from((round * CLIENTS + i) % 256).expect("byte"); 64];
            c.write_all(&msg).await.expect("write");
        }
        link.east.signal("-CONT");
        for (i, c) in clients.iter_mut().enumerate() {
            let mut got = [0u8; 64];
            tokio::time::timeout(Duration::from_secs(10), c.read_exact(&mut got))
                .await
                .expect("echo within 10 s")
                .expect("echo");
            let want = u8::try_from((round * CLIENTS + i) % 256).expect("byte");
            assert!(got.iter().all(|b| *b == want), "client {i}'s own echo");
        }
        per_round.push(relay.counts(Direction::ToUpstream).forwarded - before);
    }
    let mut sorted = per_round.clone();
    sorted.sort_unstable();
    let median = sorted[ROUNDS / 2];
    eprintln!(
        "datagrams east → west per burst of {CLIENTS} messages (ACKs included): {per_round:?}, median {median}"
    );
    assert!(
        median <= (CLIENTS / 4) as u64,
        "a burst of {CLIENTS} messages took a median of {median} datagrams ({per_round:?}): \
         one datagram per message"
    );

    drop(clients);
    link.east.signal("-TERM");
    assert_eq!(
        link.east.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "a one-thread gateway drains and exits cleanly"
    );
}

/// Two gateways of west (`west-0`, `west-1`) serving an echo backend as `echo.prod:7000`,
/// and east with its VIP, on one etcd, once east's catalog lists both west gateways serving.
/// Bind every field: the backend and the certificates must outlive the test's traffic.
struct TwoWests {
    etcd: EtcdServer,
    _certs: Certs,
    _echo: EchoServer,
    wests: [GatewayProcess; 2],
    east: GatewayProcess,
    vip: SocketAddr,
}

impl TwoWests {
    async fn start(
        prefix: &str,
        west_cidr: &str,
        east_cidr: &str,
        drain_deadline: Option<Duration>,
    ) -> Self {
        let etcd = tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .expect("etcd");
        let certs = Certs::new(&["east", "west"]);
        let echo = EchoServer::start().await.expect("echo server");
        let spec = |id| {
            let base = GatewaySpec::new("west", west_cidr, &etcd, &certs, prefix);
            GatewaySpec {
                exports: vec![("echo", "prod", 7000, echo.addr())],
                replica_id: Some(id),
                drain_deadline: drain_deadline.unwrap_or(base.drain_deadline),
                ..base
            }
        };
        let mut wests = [
            GatewayProcess::start(spec("west-0")),
            GatewayProcess::start(spec("west-1")),
        ];
        for w in &mut wests {
            w.wait_ready_but_listeners().await;
        }
        let mut east =
            GatewayProcess::start(GatewaySpec::new("east", east_cidr, &etcd, &certs, prefix));
        east.wait_ready().await;
        let vip = east.wait_routable("echo.prod", 7000).await;
        eventually_ok(
            "east lists both west gateways",
            Duration::from_secs(20),
            || async {
                let west = east.catalog_gateways("west")?;
                let want = [("west-0".to_owned(), false), ("west-1".to_owned(), false)];
                anyhow::ensure!(west == want, "{west:?}");
                Ok(())
            },
        )
        .await;
        Self {
            etcd,
            _certs: certs,
            _echo: echo,
            wests,
            east,
            vip,
        }
    }
}

/// A peer gateway that closes its connections as it drains while this gateway's catalog
/// still lists it as serving (etcd hung: neither its draining mark nor its lease's
/// revocation reaches anyone) is left at once: new connections go to its cluster's other
/// gateway, and none waits out a handshake with the address nobody serves any more (the
/// connection pool's invariant 6, `gateway/src/outbound/pool.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_closing_going_away_is_left_at_once_while_the_catalog_still_lists_it() {
    let TwoWests {
        etcd,
        mut wests,
        east,
        vip,
        _certs,
        _echo,
    } = TwoWests::start("/going-away", "127.78.51.0/24", "127.78.52.0/24", None).await;
    // New connections take turns between the two gateways: east holds a connection to each.
    let load = Workload::new(vip, 1, 50.0).start();
    eventually_ok(
        "connections go through",
        Duration::from_secs(20),
        || async {
            anyhow::ensure!(load.successes_since(Duration::ZERO) >= 20);
            Ok(())
        },
    )
    .await;

    etcd.pause();
    wests[0].signal("-TERM");
    wests[0].wait_exit(Duration::from_secs(30)).await;
    let closed = load.offset(std::time::Instant::now());
    eventually_ok(
        "connections go on after west-0 closed",
        Duration::from_secs(20),
        || async {
            anyhow::ensure!(load.successes_since(closed) >= 50);
            Ok(())
        },
    )
    .await;
    let outcomes = load.stop().await;
    etcd.resume();
    let listed = east.catalog_gateways("west").expect("east's status");
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let slowest = outcomes.iter().map(|o| o.latency).max().unwrap_or_default();
    let log = east.log_text();
    println!(
        "{} connections ({} failed), the slowest {slowest:?}; east's catalog listed {listed:?} throughout",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}\neast's log:\n{log}");
    assert!(
        listed
            .iter()
            .any(|(id, draining)| id == "west-0" && !draining),
        "the hung catalog still lists west-0 as serving: {listed:?}"
    );
    // The close's code was read as going away, when it came (not when a caller found it).
    assert!(
        log.contains("closed its connection going away"),
        "east's log:\n{log}"
    );
    assert!(
        slowest < Duration::from_millis(500),
        "a connection took {slowest:?} (a handshake with the closed address waits 2 s)\neast's log:\n{log}"
    );
}

/// A gateway that drains while a long stream holds it open, with etcd hung (SIGSTOP) so the
/// other cluster's catalog still lists it as serving: it refuses every new stream with
/// `draining`. The other cluster, told so once, sends its new streams to the cluster's other
/// gateway for the pool's hold (1 s) instead of having each refused there, a round trip each
/// (the pool's invariant 7). Counted at the draining gateway: without the hold about half of
/// the new connections were refused there (they went through at the other gateway after).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_refusing_streams_draining_is_left_for_a_while_while_the_catalog_still_lists_it() {
    let TwoWests {
        etcd,
        mut wests,
        east,
        vip,
        _certs,
        _echo,
    } = TwoWests::start(
        "/refused-draining",
        "127.78.53.0/24",
        "127.78.54.0/24",
        Some(Duration::from_secs(60)),
    )
    .await;

    // Long streams, until west-0 carries one: it holds west-0's drain open.
    let inbound = ["direction=\"inbound\""];
    let mut streams = Vec::new();
    for _ in 0..8 {
        let stream = RunningStream::start(vip);
        eventually_ok("the long stream flows", Duration::from_secs(10), || async {
            anyhow::ensure!(stream.echoed() >= 1024, "{} bytes", stream.echoed());
            Ok(())
        })
        .await;
        streams.push(stream);
        let held = wests[0]
            .metric_sum("meshup_tunnel_streams_in_flight", &inbound)
            .expect("west-0's metrics");
        if held >= 1.0 {
            break;
        }
    }
    let held = wests[0]
        .metric_sum("meshup_tunnel_streams_in_flight", &inbound)
        .expect("west-0's metrics");
    assert!(
        held >= 1.0,
        "none of {} long streams reached west-0",
        streams.len()
    );

    etcd.pause();
    wests[0].signal("-TERM");
    wests[0]
        .wait_log("draining: marked in the catalog, no new connections")
        .await;
    let refused_here = |w: &GatewayProcess| {
        w.metric_sum(
            "meshup_tunnel_streams_closed_total",
            &["direction=\"inbound\"", "result=\"draining\""],
        )
        .expect("west-0's metrics while it drains")
    };
    let refused_before = refused_here(&wests[0]);
    let load = Workload::new(vip, 1, 50.0).start();
    let started = std::time::Instant::now();
    eventually_ok(
        "connections go on while west-0 drains",
        Duration::from_secs(20),
        || async {
            anyhow::ensure!(load.successes_since(Duration::ZERO) >= 150);
            Ok(())
        },
    )
    .await;
    let outcomes = load.stop().await;
    let took = started.elapsed();
    assert!(
        wests[0].is_running(),
        "west-0 exited: its long stream did not hold its drain"
    );
    let refused = refused_here(&wests[0]) - refused_before;
    let listed = east.catalog_gateways("west").expect("east's status");
    for stream in streams {
        stream
            .finish()
            .await
            .expect("the long stream stayed intact");
    }
    let code = wests[0].wait_exit(Duration::from_secs(30)).await;
    etcd.resume();
    let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    let log = east.log_text();
    println!(
        "{} connections in {took:?} ({} failed) while west-0 drained; west-0 refused {refused} streams as draining; east's catalog listed {listed:?}",
        outcomes.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed: {failed:?}\neast's log:\n{log}");
    assert!(
        listed
            .iter()
            .any(|(id, draining)| id == "west-0" && !draining),
        "the hung catalog still lists west-0 as serving: {listed:?}"
    );
    // One refusal per hold (connections come one at a time): the first, then one each time
    // the hold ends (each hold lasts 1 s, and the next attempt at west-0 follows within
    // 40 ms); a hold that never ended would leave one.
    let holds = took.as_secs_f64().ceil() + 1.0;
    let fewest = (took.as_secs_f64().floor() - 1.0).max(2.0);
    assert!(
        refused >= fewest && refused <= holds,
        "west-0 refused {refused} of {} new connections in {took:?} (from {fewest} to {holds} with the hold)\neast's log:\n{log}",
        outcomes.len()
    );
    assert!(
        log.contains("refused a stream: it is draining"),
        "east's log:\n{log}"
    );
    // Held back, not suspected: the draining gateway answered.
    assert!(
        !log.contains("alive again"),
        "east suspected the draining gateway; east's log:\n{log}"
    );
    assert_eq!(code, Some(0), "west-0's log:\n{}", wests[0].log_text());
}

//! Real etcd outages: kill -9 for 30 s, SIGSTOP (a hung server), and a network partition
//! between one watcher and etcd while the catalog changes and etcd compacts. The watcher
//! keeps serving its last catalog and reports staleness; afterwards the catalog converges
//! (after a compaction, through exactly one relist) and the publishers re-publish under new
//! leases.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::relay::Relay;
use common::*;
use meshup_core::catalog::{ExportKey, Snapshot, VipKey};
use meshup_core::model::{AddressRules, SCHEMA_VERSION, VipRecord, encode};
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::publisher::Publisher;
use meshup_federation::store::{self, Store};
use meshup_federation::watcher::{self, Watcher};
use tokio_util::sync::CancellationToken;

const OUTAGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_killed_for_30s_then_restarted() {
    let mut fixture = Fixture::etcd().await;
    let store = fixture.store();
    let Fixture::Etcd { server, .. } = &mut fixture else {
        unreachable!("Fixture::etcd builds an etcd fixture")
    };
    within(Duration::from_secs(90), async {
        let cancel = CancellationToken::new();
        let ttl = 3;
        let east = Publisher::new(store.clone(), layout(), gateway("east", "gw-0"))
            .with_exports([(service("pay.prod"), export(8080, 1))])
            .with_config(publisher_config(ttl))
            .spawn(cancel.child_token());
        let west = publish_pay(store.clone(), "west", ttl, &cancel);
        let metrics = watcher::Metrics::default();
        let view = Watcher::spawn(
            store.clone(),
            layout(),
            AddressRules::default(),
            watcher_config(),
            metrics.clone(),
            cancel.child_token(),
        );
        let mut snaps = view.snapshots();
        tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.gateways().count() == 2 && s.export_count() == 2),
        )
        .await
        .expect("initial catalog")
        .expect("watcher alive");
        let before = view.snapshots().borrow().clone();

        server.kill9();
        let down_at = Instant::now();
        let mut staleness = Vec::new();
        while down_at.elapsed() < OUTAGE {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // Fail-static: the very same snapshot keeps serving.
            assert!(
                Arc::ptr_eq(&before, &view.snapshots().borrow()),
                "catalog changed while etcd was down"
            );
            staleness.push(metrics.staleness_seconds());
        }
        let status = view.status().borrow().clone();
        assert!(!status.connected, "{status:?}");
        assert!(
            status.staleness().expect("had contact") >= Duration::from_secs(25),
            "{status:?}"
        );
        assert!(
            staleness.windows(2).all(|w| w[0] <= w[1]),
            "staleness not rising: {staleness:?}"
        );
        assert!(
            *staleness.last().expect("samples") >= 25.0,
            "staleness gauge: {staleness:?}"
        );
        eprintln!("staleness gauge during the outage: {staleness:?}");

        // Restart on the same ports and data dir (blocking: polls etcd's health).
        tokio::task::block_in_place(|| server.restart());
        let restarted = Instant::now();

        // The publishers gave their leases up after a TTL without keep-alive and re-publish
        // under new ones; the watcher reconnects and sees changes made after the restart.
        east.set_exports([
            (service("pay.prod"), export(8080, 1)),
            (service("cart.prod"), export(9090, 1)),
        ]);
        tokio::time::timeout(
            Duration::from_secs(20),
            snaps.wait_for(|s| {
                s.service(&service("cart.prod")).is_some() && s.gateways().count() == 2
            }),
        )
        .await
        .expect("catalog converges after the restart")
        .expect("watcher alive");
        eprintln!("converged {:?} after the restart", restarted.elapsed());
        for (name, p) in [("east", &east), ("west", &west)] {
            let mut status = p.status();
            let s = tokio::time::timeout(
                Duration::from_secs(10),
                status.wait_for(|s| s.in_sync && s.leases_granted >= 2),
            )
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name} did not re-publish under a new lease: {:?}",
                    p.status().borrow()
                )
            })
            .expect("publisher alive")
            .clone();
            assert!(s.lease.is_some(), "{name}: {s:?}");
        }
        // etcd restored the old leases at their full TTL; once they lapse (or are revoked),
        // the records must survive because they moved to the new leases.
        tokio::time::sleep(Duration::from_secs(ttl + 1)).await;
        let snap = view.snapshots().borrow().clone();
        assert_eq!(
            snap.gateways().count(),
            2,
            "records lost with the old leases"
        );
        assert_eq!(snap.export_count(), 3);
        let status = view.status().borrow().clone();
        assert!(
            status.connected
                && status
                    .staleness()
                    .is_some_and(|s| s < Duration::from_secs(3)),
            "{status:?}"
        );
        assert!(metrics.staleness_seconds() < 3.0);
        cancel.cancel();
    })
    .await;
}

/// A hung etcd (SIGSTOP) answers nothing but keeps its connections: only the stall detector
/// (progress requests with a deadline) notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_etcd_is_detected_as_a_stalled_watch() {
    let fixture = Fixture::etcd().await;
    let Fixture::Etcd { server, .. } = &fixture else {
        unreachable!("Fixture::etcd builds an etcd fixture")
    };
    let store = fixture.store();
    within(Duration::from_secs(60), async {
        let cancel = CancellationToken::new();
        let view = watch_catalog(store.clone(), &cancel);
        assert!(view.wait_synced().await);
        server.pause();
        let mut status = view.status();
        // `wait_for` returns a read guard; keep only the verdict so no guard outlives this line.
        let stalled =
            tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| !s.connected))
                .await
                .is_ok_and(|r| r.is_ok());
        server.resume();
        let now = view.status().borrow().clone();
        assert!(stalled, "a stalled watch went unnoticed: {now:?}");
        fixture
            .put_raw(
                &format!("{}clusters/east/gateways/gw-0", layout().root()),
                &meshup_core::model::encode(&gateway("east", "gw-0")),
            )
            .await;
        let mut snaps = view.snapshots();
        tokio::time::timeout(
            Duration::from_secs(15),
            snaps.wait_for(|s| s.gateways().count() == 1),
        )
        .await
        .expect("watch recovers after SIGCONT")
        .expect("watcher alive");
        assert!(view.status().borrow().watch_restarts >= 1);
        cancel.cancel();
    })
    .await;
}

/// Everything a snapshot holds, in a comparable form: exports as (cluster, gateway, service,
/// first port), gateways as (cluster, gateway), VIPs as (key, address).
type Contents = (
    Vec<(String, String, String, u16)>,
    Vec<(String, String)>,
    Vec<(VipKey, IpAddr)>,
);

fn contents(s: &Snapshot) -> Contents {
    let mut exports = Vec::new();
    for view in s.services() {
        for ((cluster, gateway), record) in s.exports_of(&view.key) {
            exports.push((
                cluster.to_string(),
                gateway.to_string(),
                view.key.to_string(),
                record.ports.first().map_or(0, |p| p.port),
            ));
        }
    }
    exports.sort();
    let mut gateways: Vec<(String, String)> = s
        .gateways()
        .map(|g| (g.cluster.to_string(), g.gateway_id.to_string()))
        .collect();
    gateways.sort();
    let vips = s.vips().map(|(k, ip)| (k.clone(), *ip)).collect();
    (exports, gateways, vips)
}

/// A real partition: the watcher reaches etcd only through a relay, which is cut. Meanwhile
/// the catalog changes (deletions included) and etcd compacts past the watcher's revision.
/// When the link comes back, the watch cannot resume: the watcher relists exactly once, the
/// deletions are gone, and nothing that still exists was pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_during_a_real_partition_relists_exactly_once() {
    let fixture = Fixture::etcd().await;
    let Fixture::Etcd { server, .. } = &fixture else {
        unreachable!("Fixture::etcd builds an etcd fixture")
    };
    // The test writes, deletes and compacts through its own, uncut connection.
    let direct = fixture.store();
    within(Duration::from_secs(60), async {
        let cancel = CancellationToken::new();
        let relay = Relay::start(server.client_addr()).await;
        let cut_off: Arc<dyn Store> = Arc::new(
            EtcdStore::connect(EtcdOptions {
                endpoints: vec![relay.endpoint()],
                request_timeout: Duration::from_secs(1),
                ..Default::default()
            })
            .await
            .expect("connect through the relay"),
        );
        let l = layout();
        let export_key = |c: &str, svc: &str| {
            l.export(&ExportKey {
                cluster: cluster(c),
                gateway: gateway_id("gw-0"),
                service: service(svc),
            })
        };
        let put = |key: String, value: Vec<u8>| {
            let direct = direct.clone();
            async move {
                store::put(direct.as_ref(), key, value, 0)
                    .await
                    .expect("put")
            }
        };
        for c in ["east", "west"] {
            put(
                l.gateway(&cluster(c), &gateway_id("gw-0")),
                encode(&gateway(c, "gw-0")),
            )
            .await;
        }
        for (c, svc) in [
            ("east", "a.prod"),
            ("east", "b.prod"),
            ("east", "c.prod"),
            ("west", "d.prod"),
            ("west", "e.prod"),
        ] {
            put(export_key(c, svc), encode(&export(80, 1))).await;
        }
        let metrics = watcher::Metrics::default();
        let view = Watcher::spawn(
            cut_off.clone(),
            layout(),
            AddressRules::default(),
            watcher_config(),
            metrics.clone(),
            cancel.child_token(),
        );
        let mut snaps = view.snapshots();
        tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.export_count() == 5 && s.gateways().count() == 2),
        )
        .await
        .expect("initial catalog through the relay")
        .expect("watcher alive");
        // A change that arrives as a watch event: the link is cut under a live watch.
        let b_vip = VipKey {
            cluster: cluster("east"),
            service: service("b.prod"),
            target: None,
        };
        let b_ip: IpAddr = "127.77.0.5".parse().expect("ip");
        let vip_rev = put(
            l.vip(&b_vip),
            encode(&VipRecord {
                schema: SCHEMA_VERSION,
                vip: b_ip,
            }),
        )
        .await;
        tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.revision == vip_rev),
        )
        .await
        .expect("the VIP arrives through the watch")
        .expect("watcher alive");
        let before = view.snapshots().borrow().clone();
        assert_eq!(
            before.vip(&cluster("east"), &service("b.prod"), None),
            Some(b_ip)
        );
        assert_eq!(view.status().borrow().relists, 0);

        // Every catalog the watcher publishes from here on.
        let observed = Arc::new(std::sync::Mutex::new(Vec::<Contents>::new()));
        let observer = {
            let mut rx = view.snapshots();
            rx.borrow_and_update();
            let observed = observed.clone();
            tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    let snap = rx.borrow_and_update().clone();
                    observed.lock().expect("observed").push(contents(&snap));
                }
            })
        };
        relay.sever();
        assert_eventually(
            "the watcher notices the cut",
            Duration::from_secs(10),
            || {
                let connected = view.status().borrow().connected;
                async move { !connected }
            },
        )
        .await;
        // Reconnects are refused for real: the watcher is cut off, not merely slow.
        assert_eventually(
            "the watcher tries to reconnect and is refused",
            Duration::from_secs(10),
            || {
                let refused = relay.refused();
                async move { refused >= 1 }
            },
        )
        .await;

        store::delete(direct.as_ref(), export_key("east", "a.prod"))
            .await
            .expect("delete");
        store::delete(direct.as_ref(), export_key("west", "d.prod"))
            .await
            .expect("delete");
        put(export_key("east", "c.prod"), encode(&export(81, 1))).await;
        put(export_key("east", "f.prod"), encode(&export(80, 1))).await;
        for i in 0..20 {
            put(format!("/other-tenant/k{i}"), b"x".to_vec()).await;
        }
        let compacted_at = direct.revision().await.expect("revision");
        tokio::task::block_in_place(|| {
            server
                .etcdctl(&["compaction", &compacted_at.to_string()])
                .expect("etcdctl compaction")
        });
        let resume = metrics.resume_revision();
        assert!(
            resume + 1 < compacted_at,
            "the compaction ({compacted_at}) must pass the watcher's resume point ({resume})"
        );
        // Nothing reached the watcher during the cut: it still serves the same catalog.
        assert!(
            Arc::ptr_eq(&before, &view.snapshots().borrow()),
            "the catalog changed while the watcher was cut off"
        );
        assert_eq!(view.status().borrow().relists, 0);

        relay.restore();
        let row =
            |c: &str, svc: &str, port: u16| (c.to_owned(), "gw-0".to_owned(), svc.to_owned(), port);
        let expected: Contents = (
            vec![
                row("east", "b.prod", 80),
                row("east", "c.prod", 81),
                row("east", "f.prod", 80),
                row("west", "e.prod", 80),
            ],
            vec![
                ("east".to_owned(), "gw-0".to_owned()),
                ("west".to_owned(), "gw-0".to_owned()),
            ],
            vec![(b_vip.clone(), b_ip)],
        );
        // Deletions made during the cut are gone; the change and the addition are there;
        // nothing else was pruned.
        let after = eventually_ok(
            "the catalog after the cut, as etcd has it",
            Duration::from_secs(15),
            || {
                let snap = view.snapshots().borrow().clone();
                let status = view.status().borrow().clone();
                let expected = &expected;
                async move {
                    if contents(&snap) == *expected {
                        Ok(snap)
                    } else {
                        Err((contents(&snap), status))
                    }
                }
            },
        )
        .await;
        assert!(after.revision >= compacted_at, "{}", after.revision);
        assert_eq!(metrics.relists(), 1, "relists");
        // The status channel follows the snapshot channel by a moment.
        let status = eventually_ok(
            "the status shows the relisted catalog",
            Duration::from_secs(5),
            || {
                let status = view.status().borrow().clone();
                async move {
                    if status.revision >= compacted_at {
                        Ok(status)
                    } else {
                        Err(status)
                    }
                }
            },
        )
        .await;
        assert_eq!(status.relists, 1, "{status:?}");
        assert!(status.watch_restarts >= 1, "{status:?}");
        // The relist replaced the catalog in one step: no snapshot published since the cut
        // lacked a record that was never deleted.
        assert_eventually(
            "the observer saw the relisted catalog",
            Duration::from_secs(5),
            || {
                let last = observed.lock().expect("observed").last().cloned();
                let done = last.as_ref() == Some(&expected);
                async move { done }
            },
        )
        .await;
        observer.abort();
        let _ = observer.await;
        let seen = observed.lock().expect("observed").clone();
        let survivors = |c: &Contents| {
            ["b.prod", "c.prod", "e.prod"]
                .iter()
                .all(|svc| c.0.iter().any(|(_, _, s, _)| s == svc))
                && c.1.len() == 2
                && c.2 == expected.2
        };
        for c in &seen {
            assert!(
                survivors(c),
                "a published catalog lost records nobody deleted: {c:?}"
            );
        }

        // The relisted catalog is exactly what a fresh list of etcd gives.
        let fresh = watch_catalog(direct.clone(), &cancel);
        assert!(fresh.wait_synced().await);
        let listed = fresh.snapshots().borrow().clone();
        assert_eq!(contents(&after), contents(&listed));

        // The watch runs again from the relist: later changes arrive without another relist.
        let last = put(export_key("west", "g.prod"), encode(&export(80, 1))).await;
        tokio::time::timeout(
            Duration::from_secs(10),
            snaps.wait_for(|s| s.revision == last && s.export_count() == 5),
        )
        .await
        .expect("a change after the relist arrives through the watch")
        .expect("watcher alive");
        let status = view.status().borrow().clone();
        assert!(status.connected, "{status:?}");
        assert_eq!(status.relists, 1, "relisted again: {status:?}");
        assert_eq!(metrics.relists(), 1, "relists after a later change");
        cancel.cancel();
    })
    .await;
}

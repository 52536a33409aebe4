//! Real etcd outages: kill -9 for 30 s and SIGSTOP (a hung server). The watcher keeps
//! serving its last catalog and reports staleness; afterwards the catalog converges and the
//! publishers re-publish under new leases.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use meshup_core::model::AddressRules;
use meshup_federation::publisher::Publisher;
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

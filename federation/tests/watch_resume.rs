//! A quiet catalog on a busy store: etcd revisions are store-wide, so while other tenants
//! write and ours does not, the catalog's last event falls below the compaction point. The
//! watcher must resume from its progress answers (bookmarks), not from its last event:
//! otherwise every gateway relists the whole catalog after any broken watch.
//!
//! etcd 3.4.23 (the version CI installs) sends answers to progress *requests* out of order
//! with events (etcd-io/etcd#15220), so the store uses etcd's periodic progress
//! notifications there. Their interval is a server flag (10 min by default); the etcd test
//! starts its etcd with a short one.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use meshup_core::catalog::{ExportKey, Snapshot};
use meshup_core::model::{AddressRules, encode};
use meshup_federation::store::{self, Revision, Store};
use meshup_federation::watcher::{self, Watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(15);
/// etcd's periodic progress notifications, every 500 ms, in the etcd test.
const NOTIFY_FLAG: &str = "--experimental-watch-progress-notify-interval=500ms";

fn export_key(svc: &str) -> String {
    layout().export(&ExportKey {
        cluster: cluster("east"),
        gateway: gateway_id("gw-0"),
        service: service(svc),
    })
}

/// Waits until the snapshot satisfies `check`.
async fn until(rx: &watch::Receiver<Arc<Snapshot>>, what: &str, check: impl Fn(&Snapshot) -> bool) {
    let mut rx = rx.clone();
    // Keep only the verdict: `wait_for` hands out a read guard that must not be held.
    let ok = tokio::time::timeout(CONVERGE, rx.wait_for(|s| check(s)))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(ok, "catalog did not converge within {CONVERGE:?}: {what}");
}

/// Another tenant's busy prefix: many revisions, none in the catalog. Returns the store's
/// revision after them.
async fn busy_neighbour(store: &dyn Store, round: usize) -> Revision {
    let mut rev = 0;
    for i in 0..100 {
        rev = store::put(store, format!("/other-tenant/r{round}/k{i}"), "x", 0)
            .await
            .expect("put outside the catalog");
    }
    rev
}

/// Waits until the watcher's resume point reached `rev` through progress answers.
async fn until_bookmarked(metrics: &watcher::Metrics, rev: Revision) {
    let reached = tokio::time::timeout(CONVERGE, async {
        while metrics.resume_revision() < rev {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "no progress answer moved the resume point to {rev} (at {})",
        metrics.resume_revision()
    );
}

/// Writes elsewhere, lets a bookmark arrive, compacts at the current revision, breaks the
/// watch (and changes the catalog meanwhile): the watch resumes, with zero relists.
async fn quiet_catalog_resumes_from_bookmarks(
    f: &Fixture,
) -> (Arc<TestStore>, Watcher, watcher::Metrics, CancellationToken) {
    let store = f.store();
    for svc in ["a.prod", "b.prod", "c.prod"] {
        store::put(store.as_ref(), export_key(svc), encode(&export(80, 1)), 0)
            .await
            .expect("put");
    }
    let cancel = CancellationToken::new();
    let flaky = TestStore::new(store.clone());
    let metrics = watcher::Metrics::default();
    let view = Watcher::spawn(
        flaky.clone(),
        layout(),
        AddressRules::default(),
        watcher_config(),
        metrics.clone(),
        cancel.child_token(),
    );
    until(&view.snapshots(), "initial three exports", |s| {
        s.export_count() == 3
    })
    .await;
    let data_rev = view.snapshots().borrow().revision;

    let busy = busy_neighbour(store.as_ref(), 0).await;
    until_bookmarked(&metrics, busy).await;
    assert_eq!(
        view.snapshots().borrow().revision,
        data_rev,
        "the snapshot's revision stays the revision of its data"
    );
    store.compact(busy).await.expect("compact");

    flaky.disconnect();
    let mut status = view.status();
    tokio::time::timeout(CONVERGE, status.wait_for(|s| !s.connected))
        .await
        .expect("watcher notices the cut connection")
        .expect("status");
    // Changed while the watch is down, after the compaction point: the resumed watch
    // replays these.
    store::delete(store.as_ref(), export_key("a.prod"))
        .await
        .expect("delete");
    let last = store::put(
        store.as_ref(),
        export_key("d.prod"),
        encode(&export(80, 1)),
        0,
    )
    .await
    .expect("put");
    flaky.reconnect();
    until(&view.snapshots(), "a gone, d present", |s| {
        s.export_count() == 3
            && s.service(&service("a.prod")).is_none()
            && s.service(&service("d.prod")).is_some()
    })
    .await;
    let status = view.status().borrow().clone();
    assert_eq!(
        status.relists, 0,
        "resumed from a compacted revision: {status:?}"
    );
    assert_eq!(metrics.relists(), 0);
    assert!(status.synced && status.watch_restarts >= 1, "{status:?}");
    assert_eq!(view.snapshots().borrow().revision, last);
    (flaky, view, metrics, cancel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_quiet_catalog_resumes_from_bookmarks_without_relist() {
    let f = Fixture::embedded();
    within(LIMIT, async {
        let (_flaky, _view, _metrics, cancel) = quiet_catalog_resumes_from_bookmarks(&f).await;
        cancel.cancel();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_quiet_catalog_resumes_from_bookmarks_without_relist() {
    let mut f = Fixture::etcd_with_args(&[NOTIFY_FLAG]).await;
    let store = f.store();
    let (_flaky, view, metrics, cancel) =
        within(LIMIT, quiet_catalog_resumes_from_bookmarks(&f)).await;

    // A real break: etcd killed and restarted on its data dir after a compaction at the
    // current revision.
    within(LIMIT, async {
        let busy = busy_neighbour(store.as_ref(), 1).await;
        until_bookmarked(&metrics, busy).await;
        store.compact(busy).await.expect("compact");
        let Fixture::Etcd { server, .. } = &mut f else {
            unreachable!("Fixture::etcd builds an etcd fixture")
        };
        tokio::task::block_in_place(|| {
            server.kill9();
            server.restart();
        });
        let mut status = view.status();
        tokio::time::timeout(CONVERGE, status.wait_for(|s| s.watch_restarts >= 2))
            .await
            .expect("watcher notices the restart")
            .expect("status");
        // The client reconnects on its own; the first request may still find it down.
        let last = eventually_ok("put after the restart", CONVERGE, || {
            let store = store.clone();
            async move {
                store::put(
                    store.as_ref(),
                    export_key("e.prod"),
                    encode(&export(80, 1)),
                    0,
                )
                .await
            }
        })
        .await;
        until(&view.snapshots(), "e present after the restart", |s| {
            s.export_count() == 4 && s.service(&service("e.prod")).is_some()
        })
        .await;
        let status = view.status().borrow().clone();
        assert_eq!(status.relists, 0, "relisted after the restart: {status:?}");
        assert_eq!(metrics.relists(), 0);
        assert_eq!(view.snapshots().borrow().revision, last);
        cancel.cancel();
    })
    .await;
}

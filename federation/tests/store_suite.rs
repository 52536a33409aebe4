//! One suite for the store seam, run against the embedded store and a real etcd: the two
//! implementations must agree on revisions, paging, watches, compaction, leases and
//! transactions.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Fixture, within};
use meshup_federation::store::{
    self, CreateOutcome, EventKind, KeyRange, LIST_PAGE_KEYS, StoreError, Txn, TxnOp, WatchItem,
};

const LIMIT: Duration = Duration::from_secs(60);

async fn revisions_increase_per_write(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let r0 = s.revision().await.expect("revision");
        let r1 = store::put(s.as_ref(), "/suite/a", "1", 0)
            .await
            .expect("put");
        let r2 = store::put(s.as_ref(), "/suite/a", "2", 0)
            .await
            .expect("put");
        assert_eq!((r1, r2), (r0 + 1, r0 + 2));
        let kv = store::get(s.as_ref(), "/suite/a")
            .await
            .expect("get")
            .expect("present");
        assert_eq!((kv.create_revision, kv.mod_revision), (r1, r2));
        assert_eq!(kv.value, Bytes::from_static(b"2"));
        // Deleting a missing key changes nothing, as in etcd.
        let r3 = store::delete(s.as_ref(), "/suite/missing")
            .await
            .expect("delete");
        assert_eq!(r3, r2);
    })
    .await;
}

async fn lists_page_at_one_pinned_revision(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let n = LIST_PAGE_KEYS * 2 + 17;
        // Batched writes keep the setup fast on etcd.
        let keys: Vec<String> = (0..n).map(|i| format!("/suite/list/{i:05}")).collect();
        for chunk in keys.chunks(100) {
            let ops = chunk
                .iter()
                .map(|k| TxnOp::Put {
                    key: Bytes::from(k.clone()),
                    value: Bytes::from_static(b"v"),
                    lease: 0,
                })
                .collect();
            s.txn(Txn {
                compares: vec![],
                success: ops,
                failure: vec![],
            })
            .await
            .expect("txn");
        }
        store::put(s.as_ref(), "/suite/listx", "outside", 0)
            .await
            .expect("put");
        let (kvs, rev) = store::list_prefix(s.as_ref(), b"/suite/list/")
            .await
            .expect("list");
        assert_eq!(kvs.len(), n);
        assert!(kvs.windows(2).all(|w| w[0].key < w[1].key), "key order");

        // A page read at a pinned revision does not see later writes.
        let first = s
            .range(KeyRange::prefix("/suite/list/"), Some(rev), 10)
            .await
            .expect("page");
        assert!(first.more);
        store::delete(s.as_ref(), "/suite/list/00000")
            .await
            .expect("delete");
        store::put(s.as_ref(), "/suite/list/zzz", "new", 0)
            .await
            .expect("put");
        let pinned = s
            .range(KeyRange::prefix("/suite/list/"), Some(rev), n + 10)
            .await
            .expect("page");
        assert_eq!(pinned.kvs.len(), n, "pinned read sees the old state");
        assert_eq!(pinned.revision, rev);
        let now = s
            .range(KeyRange::prefix("/suite/list/"), None, n + 10)
            .await
            .expect("page");
        assert_eq!(now.kvs.len(), n, "one deleted, one added");
        assert_eq!(
            now.kvs.last().map(|kv| kv.key.clone()),
            Some(Bytes::from_static(b"/suite/list/zzz"))
        );
    })
    .await;
}

async fn watches_deliver_in_order_from_a_revision(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let r1 = store::put(s.as_ref(), "/suite/w/a", "1", 0)
            .await
            .expect("put");
        store::put(s.as_ref(), "/suite/other", "x", 0)
            .await
            .expect("put");
        store::put(s.as_ref(), "/suite/w/b", "1", 0)
            .await
            .expect("put");
        let mut w = s
            .watch(KeyRange::prefix("/suite/w/"), r1)
            .await
            .expect("watch");
        store::delete(s.as_ref(), "/suite/w/a")
            .await
            .expect("delete");
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
                Ok(Some(Ok(WatchItem::Events(events)))) => seen.extend(events),
                Ok(Some(Ok(WatchItem::Progress { .. } | WatchItem::Alive))) => {}
                other => panic!("unexpected watch item: {other:?}"),
            }
        }
        let summary: Vec<(EventKind, &[u8])> =
            seen.iter().map(|e| (e.kind, &e.kv.key[..])).collect();
        assert_eq!(
            summary,
            vec![
                (EventKind::Put, &b"/suite/w/a"[..]),
                (EventKind::Put, &b"/suite/w/b"[..]),
                (EventKind::Delete, &b"/suite/w/a"[..]),
            ]
        );
        assert!(
            seen.windows(2)
                .all(|p| p[0].kv.mod_revision < p[1].kv.mod_revision)
        );
        // Progress requests are answered (a bookmark, or only a sign of life on etcd
        // releases that do not order those answers with events).
        w.request_progress();
        let answered = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Some(Ok(WatchItem::Progress { .. } | WatchItem::Alive)) = w.next().await {
                    return;
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "no progress answer");
    })
    .await;
}

async fn watching_below_compaction_is_compacted(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let r1 = store::put(s.as_ref(), "/suite/c", "1", 0).await.expect("put");
        let r2 = store::put(s.as_ref(), "/suite/c", "2", 0).await.expect("put");
        store::put(s.as_ref(), "/suite/c", "3", 0).await.expect("put");
        s.compact(r2).await.expect("compact");
        let mut w = s.watch(KeyRange::prefix("/suite/"), r1).await.expect("watch opens");
        let item = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match w.next().await {
                    Some(Ok(WatchItem::Progress { .. } | WatchItem::Alive)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("an answer");
        assert!(
            matches!(item, Some(Ok(WatchItem::Compacted { compact_revision })) if compact_revision == r2),
            "{item:?}"
        );
        let read = s.range(KeyRange::prefix("/suite/"), Some(r1), 10).await;
        assert!(matches!(read, Err(StoreError::Compacted { .. })), "{read:?}");
    })
    .await;
}

/// A bookmark (`Progress`) promises that every event up to its revision was delivered, so a
/// watcher may resume after it. Watching from old history (the replay still running) and
/// asking for progress at once must not yield a bookmark ahead of the replay: etcd's
/// creation acknowledgement and, on etcd 3.4.23, its requested progress answers carry the
/// store's revision before the replay is through.
async fn bookmarks_never_run_ahead_of_events(f: Fixture) {
    // etcd 3.4 bookmarks a caught-up watch only periodically (every 10 min by default), and
    // this test waits for one: its etcd runs with a short interval.
    let f = match f {
        Fixture::Etcd { .. } => {
            drop(f);
            Fixture::etcd_with_args(&["--experimental-watch-progress-notify-interval=500ms"]).await
        }
        embedded => embedded,
    };
    within(LIMIT, async {
        let s = f.store();
        let mut revisions = Vec::new();
        for i in 0..200 {
            revisions.push(
                store::put(s.as_ref(), format!("/suite/b/{i:03}"), "v", 0)
                    .await
                    .expect("put"),
            );
        }
        let (first, last) = (revisions[0], revisions[revisions.len() - 1]);
        let mut w = s
            .watch(KeyRange::prefix("/suite/b/"), first)
            .await
            .expect("watch");
        w.request_progress();
        let mut delivered = first - 1;
        let mut bookmarks = 0;
        while delivered < last {
            let item = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("the replay goes on");
            match item {
                Some(Ok(WatchItem::Events(events))) => {
                    for e in events {
                        assert_eq!(e.kv.mod_revision, delivered + 1, "gap or repeat");
                        delivered = e.kv.mod_revision;
                    }
                }
                Some(Ok(WatchItem::Progress { revision })) => {
                    bookmarks += 1;
                    assert!(
                        revision <= delivered,
                        "bookmark at {revision} while events up to {} were outstanding",
                        revision.min(last)
                    );
                }
                Some(Ok(WatchItem::Alive)) => w.request_progress(),
                other => panic!("unexpected watch item: {other:?}"),
            }
        }
        // Bookmarks flow at all: once caught up, one arrives (etcd's periodic notification,
        // every 500 ms here; the embedded store answers the request), and it
        // covers everything delivered. Without this the loop above could pass on a store
        // that never sends a bookmark.
        w.request_progress();
        let caught_up = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match w.next().await {
                    Some(Ok(WatchItem::Progress { revision })) => return revision,
                    Some(Ok(WatchItem::Alive)) => w.request_progress(),
                    other => panic!("unexpected watch item after the replay: {other:?}"),
                }
            }
        })
        .await
        .expect("a bookmark once the watch caught up");
        assert!(
            caught_up >= last,
            "bookmark at {caught_up} behind the delivered {last}"
        );
        eprintln!(
            "{bookmarks} bookmarks during the replay, none ahead of it; then one at {caught_up}"
        );
    })
    .await;
}

async fn leases_expire_unless_kept_alive(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let kept = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
        let dropped = s.grant_lease(Duration::from_secs(2)).await.expect("grant");
        store::put(s.as_ref(), "/suite/l/kept", "1", kept)
            .await
            .expect("put");
        store::put(s.as_ref(), "/suite/l/dropped", "1", dropped)
            .await
            .expect("put");
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(3500) {
            let ttl = s.keep_alive(kept).await.expect("keep-alive");
            assert_eq!(ttl, Duration::from_secs(2));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            store::get(s.as_ref(), "/suite/l/kept")
                .await
                .expect("get")
                .is_some()
        );
        assert!(
            store::get(s.as_ref(), "/suite/l/dropped")
                .await
                .expect("get")
                .is_none()
        );
        assert_eq!(
            s.keep_alive(dropped).await,
            Err(StoreError::LeaseNotFound(dropped))
        );
        // Writing under a dead lease fails and writes nothing.
        let put = store::put(s.as_ref(), "/suite/l/late", "1", dropped).await;
        assert!(matches!(put, Err(StoreError::LeaseNotFound(_))), "{put:?}");
        s.revoke_lease(kept).await.expect("revoke");
        assert!(
            store::get(s.as_ref(), "/suite/l/kept")
                .await
                .expect("get")
                .is_none()
        );
    })
    .await;
}

async fn transactions_compare_and_set(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let created = store::create_if_absent(s.as_ref(), "/suite/t", "first", 0)
            .await
            .expect("txn");
        let CreateOutcome::Created(rev) = created else {
            panic!("expected creation, got {created:?}")
        };
        let again = store::create_if_absent(s.as_ref(), "/suite/t", "second", 0)
            .await
            .expect("txn");
        assert!(
            matches!(&again, CreateOutcome::Exists(kv) if kv.value == Bytes::from_static(b"first")),
            "{again:?}"
        );
        assert!(
            !store::delete_if_mod_revision(s.as_ref(), "/suite/t", rev + 100)
                .await
                .expect("txn")
        );
        assert!(
            store::delete_if_mod_revision(s.as_ref(), "/suite/t", rev)
                .await
                .expect("txn")
        );
        assert!(
            store::get(s.as_ref(), "/suite/t")
                .await
                .expect("get")
                .is_none()
        );
    })
    .await;
}

both_backends!(
    revisions_increase_per_write,
    lists_page_at_one_pinned_revision,
    watches_deliver_in_order_from_a_revision,
    watching_below_compaction_is_compacted,
    bookmarks_never_run_ahead_of_events,
    leases_expire_unless_kept_alive,
    transactions_compare_and_set,
);

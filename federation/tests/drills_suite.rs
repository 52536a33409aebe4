//! The drill lifecycle against the embedded store and a real etcd: a drill starts once, ends
//! once (stopped or expired), and every end leaves exactly one audit entry, even when several
//! gateways end it at once or it changes while being ended (docs/policy.md).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Fixture, TestStore, eventually_ok, layout, within};
use meshup_core::model::encode;
use meshup_core::names::DrillId;
use meshup_core::policy::{self, DrillEnd, DrillKind, DrillRecord, EXPIRY_ACTOR, SCHEMA_VERSION};
use meshup_federation::drills::{
    self, AuditEntry, DrillError, Ended, end_drill, expire_drills, list_audit, start_drill,
};
use meshup_federation::store::{self, Store, Txn, TxnOp};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);
/// Gateways expiring one drill at once in the race test.
const RACERS: usize = 8;

fn now() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_secs()).expect("seconds fit")
}

fn id(s: &str) -> DrillId {
    DrillId::new(s).expect("valid drill id")
}

/// A drain of `west` by ana, in force from `created` until `expires`.
fn drill(created: i64, expires: i64) -> DrillRecord {
    DrillRecord {
        schema: SCHEMA_VERSION,
        schema_minor: 0,
        kind: DrillKind::Drain,
        cluster: common::cluster("west"),
        service: Some(common::service("pay.prod")),
        who: "ana".into(),
        why: "game day".into(),
        created,
        expires,
    }
}

/// A drill in force for the next hour.
fn running() -> DrillRecord {
    drill(now() - 60, now() + 3600)
}

/// A drill whose expiry passed a minute ago.
fn expired() -> DrillRecord {
    drill(now() - 3600, now() - 60)
}

async fn stored(s: &dyn Store, id: &DrillId) -> Option<(DrillRecord, i64)> {
    let kv = store::get(s, layout().drill(id)).await.expect("get")?;
    let d = policy::decode::<DrillRecord>(&kv.value).expect("a drill record");
    Some((d, kv.mod_revision))
}

async fn audit_of(s: &dyn Store) -> Vec<AuditEntry> {
    list_audit(s, &layout()).await.expect("list audit")
}

/// Exactly one audit entry, for `id`, written once.
fn the_one_entry(entries: &[AuditEntry], id: &DrillId) -> AuditEntry {
    assert_eq!(entries.len(), 1, "one audit entry: {entries:?}");
    let e = entries[0].clone();
    assert_eq!(&e.id, id);
    assert_eq!(e.create_revision, e.mod_revision, "written once: {e:?}");
    e
}

async fn a_started_drill_is_visible(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let cancel = CancellationToken::new();
        let watcher = common::watch_catalog(s.clone(), &cancel);
        assert!(watcher.wait_synced().await, "watcher synced");
        let (d1, d) = (id("d1"), running());
        let revision = start_drill(s.as_ref(), &layout(), &d1, &d)
            .await
            .expect("start");
        assert_eq!(stored(s.as_ref(), &d1).await, Some((d.clone(), revision)));
        let mut snapshots = watcher.snapshots();
        eventually_ok("the drill is in the catalog snapshot", LIMIT, || {
            let snapshot = snapshots.borrow_and_update().clone();
            let d = d.clone();
            let d1 = d1.clone();
            async move {
                match snapshot.drills().find(|(i, _)| **i == d1) {
                    Some((_, got)) if **got == d => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
        cancel.cancel();
    })
    .await;
}

async fn starting_twice_is_refused_and_loses_nothing(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let (d1, first) = (id("d1"), running());
        let revision = start_drill(s.as_ref(), &layout(), &d1, &first)
            .await
            .expect("start");
        let second = DrillRecord {
            who: "bo".into(),
            kind: DrillKind::Fail,
            ..running()
        };
        let err = start_drill(s.as_ref(), &layout(), &d1, &second)
            .await
            .expect_err("the id is taken");
        assert!(matches!(err, DrillError::Exists { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("drill d1 already exists")
                && text.contains("drain of cluster west for pay.prod by ana: game day")
                && text.contains("stop it first, or choose another id"),
            "{text}"
        );
        assert_eq!(
            stored(s.as_ref(), &d1).await,
            Some((first, revision)),
            "the first drill is untouched"
        );

        // A drill that cannot work is refused with the reason, and nothing is written.
        let d2 = id("d2");
        let err = start_drill(
            s.as_ref(),
            &layout(),
            &d2,
            &drill(now(), now() + 8 * 86_400),
        )
        .await
        .expect_err("too long");
        assert!(
            err.to_string()
                .contains("drill d2 is not valid: a drill may last at most 7 days"),
            "{err}"
        );
        assert_eq!(stored(s.as_ref(), &d2).await, None);
        assert!(audit_of(s.as_ref()).await.is_empty());
    })
    .await;
}

async fn stopping_ends_the_drill_with_one_audit_entry(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let (d1, d) = (id("d1"), running());
        let started = start_drill(s.as_ref(), &layout(), &d1, &d)
            .await
            .expect("start");
        let at = now();
        let ended = end_drill(s.as_ref(), &layout(), &d1, DrillEnd::Stopped, "bo", at)
            .await
            .expect("stop");
        let Ended::Now { audit, revision } = ended else {
            panic!("expected the stop to end the drill, got {ended:?}")
        };
        assert!(revision > started);
        assert_eq!(stored(s.as_ref(), &d1).await, None, "the drill is gone");
        let entry = the_one_entry(&audit_of(s.as_ref()).await, &d1);
        assert_eq!(entry.audit, *audit);
        assert_eq!(entry.mod_revision, revision, "one transaction");
        let a = entry.audit;
        assert_eq!(
            (a.how, a.ended_by.as_str(), a.ended, a.created_revision),
            (DrillEnd::Stopped, "bo", at, Some(started))
        );
        assert_eq!(a.drill, d);

        // Ending it again: a stop says there is no such drill (and how it ended), an expiry
        // that it already ended; neither writes anything.
        let err = end_drill(s.as_ref(), &layout(), &d1, DrillEnd::Stopped, "bo", now())
            .await
            .expect_err("already stopped");
        let text = err.to_string();
        assert!(
            text.starts_with("no such drill d1: it already ended (stopped by bo at "),
            "{text}"
        );
        assert_eq!(
            end_drill(
                s.as_ref(),
                &layout(),
                &d1,
                DrillEnd::Expired,
                EXPIRY_ACTOR,
                now()
            )
            .await,
            Ok(Ended::AlreadyEnded)
        );
        let err = end_drill(
            s.as_ref(),
            &layout(),
            &id("nope"),
            DrillEnd::Stopped,
            "bo",
            now(),
        )
        .await
        .expect_err("never existed");
        assert_eq!(err.to_string(), "no such drill nope");
        the_one_entry(&audit_of(s.as_ref()).await, &d1);

        // The id stays used: a new drill under it would overwrite the audit entry.
        let err = start_drill(s.as_ref(), &layout(), &d1, &running())
            .await
            .expect_err("id used");
        assert!(
            err.to_string()
                .contains("drill id d1 was used by a drill that already ended")
                && err.to_string().contains("choose another id"),
            "{err}"
        );
        assert_eq!(stored(s.as_ref(), &d1).await, None);
    })
    .await;
}

async fn gateways_expiring_a_drill_at_once_write_one_audit_entry(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let (d1, d) = (id("d1"), expired());
        start_drill(s.as_ref(), &layout(), &d1, &d)
            .await
            .expect("start");
        let barrier = Arc::new(tokio::sync::Barrier::new(RACERS));
        let mut racers = Vec::new();
        for _ in 0..RACERS {
            let client = f.another_client().await;
            let (barrier, d1, d) = (barrier.clone(), d1.clone(), d.clone());
            racers.push(tokio::spawn(async move {
                barrier.wait().await;
                expire_drills(client.as_ref(), &layout(), [(&d1, &d)], now()).await
            }));
        }
        let mut winners = Vec::new();
        for racer in racers {
            winners.extend(racer.await.expect("racer").expect("expire"));
        }
        assert_eq!(winners, vec![d1.clone()], "exactly one gateway ended it");
        assert_eq!(stored(s.as_ref(), &d1).await, None);
        let entry = the_one_entry(&audit_of(s.as_ref()).await, &d1);
        assert_eq!(
            (entry.audit.how, entry.audit.ended_by.as_str()),
            (DrillEnd::Expired, EXPIRY_ACTOR)
        );
        assert_eq!(entry.audit.drill, d);
    })
    .await;
}

/// A store on which, just before the first transaction that deletes `id`'s drill, someone
/// else rewrites that drill as `to`.
fn changing_before_the_end(s: Arc<dyn Store>, id: &DrillId, to: &DrillRecord) -> Arc<TestStore> {
    let key = Bytes::from(layout().drill(id));
    let value = Bytes::from(encode(to));
    let fired = AtomicBool::new(false);
    TestStore::with_before_txn(s, move |txn: &Txn| {
        let deletes = txn
            .success
            .iter()
            .any(|op| matches!(op, TxnOp::Delete { key: k } if *k == key));
        (deletes && !fired.swap(true, Ordering::SeqCst)).then(|| Txn {
            compares: vec![],
            success: vec![TxnOp::Put {
                key: key.clone(),
                value: value.clone(),
                lease: 0,
            }],
            failure: vec![],
        })
    })
}

async fn a_drill_changed_while_being_ended_is_read_again(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();

        // Stopped: the audit entry holds the value it had when it ended.
        let (d1, d) = (id("d1"), running());
        start_drill(s.as_ref(), &layout(), &d1, &d)
            .await
            .expect("start");
        let changed = DrillRecord {
            why: "game day, second half".into(),
            ..d.clone()
        };
        let racing = changing_before_the_end(s.clone(), &d1, &changed);
        let ended = end_drill(
            racing.as_ref(),
            &layout(),
            &d1,
            DrillEnd::Stopped,
            "bo",
            now(),
        )
        .await
        .expect("stop");
        assert!(
            matches!(&ended, Ended::Now { audit, .. } if audit.drill == changed),
            "{ended:?}"
        );
        assert_eq!(stored(s.as_ref(), &d1).await, None);
        let entry = the_one_entry(&audit_of(s.as_ref()).await, &d1);
        assert_eq!(entry.audit.drill, changed, "the latest value is audited");

        // Expiring: an operator extended it meanwhile, so it stays, unaudited.
        let (d2, due) = (id("d2"), expired());
        start_drill(s.as_ref(), &layout(), &d2, &due)
            .await
            .expect("start");
        let extended = DrillRecord {
            expires: now() + 3600,
            ..due.clone()
        };
        let racing = changing_before_the_end(s.clone(), &d2, &extended);
        let ended = end_drill(
            racing.as_ref(),
            &layout(),
            &d2,
            DrillEnd::Expired,
            EXPIRY_ACTOR,
            now(),
        )
        .await
        .expect("expire");
        assert_eq!(
            ended,
            Ended::NotDue {
                expires: extended.expires
            }
        );
        assert_eq!(
            stored(s.as_ref(), &d2).await.map(|(d, _)| d),
            Some(extended)
        );
        the_one_entry(&audit_of(s.as_ref()).await, &d1);
    })
    .await;
}

async fn expiring_skips_drills_not_yet_due(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let (past, later, stale) = (id("past"), id("later"), id("stale"));
        let (due, running) = (expired(), running());
        for (i, d) in [(&past, &due), (&later, &running), (&stale, &running)] {
            start_drill(s.as_ref(), &layout(), i, d)
                .await
                .expect("start");
        }
        // `stale` as an old snapshot shows it: expired, though the store says otherwise.
        let seen = [(&past, &due), (&later, &running), (&stale, &due)];
        let ended = expire_drills(s.as_ref(), &layout(), seen, now())
            .await
            .expect("expire");
        assert_eq!(ended, vec![past.clone()]);
        assert_eq!(stored(s.as_ref(), &past).await, None);
        assert!(stored(s.as_ref(), &later).await.is_some());
        assert!(stored(s.as_ref(), &stale).await.is_some());
        the_one_entry(&audit_of(s.as_ref()).await, &past);
        // Again: nothing left to end.
        let ended = expire_drills(s.as_ref(), &layout(), seen, now())
            .await
            .expect("expire");
        assert!(ended.is_empty(), "{ended:?}");
        the_one_entry(&audit_of(s.as_ref()).await, &past);
    })
    .await;
}

async fn run_expiry_ends_a_drill_after_its_expiry(f: Fixture) {
    within(LIMIT, async {
        let s = f.store();
        let cancel = CancellationToken::new();
        let watcher = common::watch_catalog(s.clone(), &cancel);
        assert!(watcher.wait_synced().await, "watcher synced");
        tokio::spawn(drills::run_expiry(
            s.clone(),
            layout(),
            watcher.snapshots(),
            cancel.child_token(),
        ));
        let (d1, d) = (id("d1"), drill(now() - 1, now() + 2));
        start_drill(s.as_ref(), &layout(), &d1, &d)
            .await
            .expect("start");
        let entry = eventually_ok("the drill ended by itself", Duration::from_secs(15), || {
            let (s, d1) = (s.clone(), d1.clone());
            async move {
                let audit = audit_of(s.as_ref()).await;
                match (stored(s.as_ref(), &d1).await, audit.as_slice()) {
                    (None, [entry]) => Ok(entry.clone()),
                    (drill, audit) => Err(format!("drill {drill:?}, audit {audit:?}")),
                }
            }
        })
        .await;
        assert_eq!(entry.id, d1);
        assert_eq!(entry.create_revision, entry.mod_revision);
        let a = entry.audit;
        assert_eq!(
            (a.how, a.ended_by.as_str()),
            (DrillEnd::Expired, EXPIRY_ACTOR)
        );
        assert!(
            a.ended >= d.expires,
            "ended at {} before {}",
            a.ended,
            d.expires
        );
        assert_eq!(a.drill, d);
        cancel.cancel();
    })
    .await;
}

both_backends!(
    a_started_drill_is_visible,
    starting_twice_is_refused_and_loses_nothing,
    stopping_ends_the_drill_with_one_audit_entry,
    gateways_expiring_a_drill_at_once_write_one_audit_entry,
    a_drill_changed_while_being_ended_is_read_again,
    expiring_skips_drills_not_yet_due,
    run_expiry_ends_a_drill_after_its_expiry,
);

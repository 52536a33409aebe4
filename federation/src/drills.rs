//! The drill lifecycle in the catalog: start, stop, expire, audit.
//!
//! A drill (`<prefix>/v1/drills/<id>`, [`DrillRecord`]) is an operator override of routing
//! with a mandatory expiry (docs/policy.md). It ends in one of two ways: an operator stops
//! it, or its expiry passes and a gateway ends it, so a forgotten drill ends by itself.
//! Either way the end is one transaction that deletes the drill only if it is unchanged since
//! it was read, and writes its audit entry (`<prefix>/v1/drill-audit/<id>`, [`DrillAudit`]).
//! So a drill is either in force or audited, never both and never neither, and gateways
//! expiring one drill at once write one audit entry: the first transaction wins, the others
//! find the drill gone. A drill that changed between the read and the transaction is read
//! again, so its audit entry holds its last value.
//!
//! A drill id is used once: [`start_drill`] refuses an id that has a drill or an audit
//! entry, so a later drill never overwrites the audit entry of an earlier one.
//!
//! [`run_expiry`] ends drills as their expiry passes, driven by the watcher's snapshots. Which
//! drills are due and when to look again is decided by `ExpiryTracker` (pure, with an
//! explicit clock, table-tested); the loop only moves events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use meshup_core::catalog::Snapshot;
use meshup_core::model::encode;
use meshup_core::names::DrillId;
use meshup_core::policy::{
    self, DrillAudit, DrillEnd, DrillRecord, EXPIRY_ACTOR, RecordError, SCHEMA_VERSION,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::keys::KeyLayout;
use crate::store::{self, Compare, Revision, Store, StoreError, Txn, TxnOp};

/// Transactions one [`end_drill`] tries before giving up on a drill that keeps changing.
/// Each failed attempt means someone else wrote the drill, so a few are plenty.
pub const END_ATTEMPTS: usize = 5;
/// A due drill this gateway already handled (ended, found gone, or could not end) is looked
/// at again after this long if the snapshot still shows it: the watcher may lag behind the
/// delete, and a drill that could not be ended (an unreadable record) is retried, but neither
/// costs more than a read a minute.
pub const EXPIRY_RECHECK_SECS: i64 = 60;
/// The expiry loop reads the wall clock at least this often, so a step of the wall clock
/// delays an expiry by at most this long.
pub const MAX_EXPIRY_SLEEP: Duration = Duration::from_secs(60);
/// Backoff of the expiry loop after a store error: first and longest delay.
pub const EXPIRY_RETRY_MIN: Duration = Duration::from_secs(1);
pub const EXPIRY_RETRY_MAX: Duration = Duration::from_secs(30);

/// Why a drill could not be started or stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("drill {id} is not valid: {reason}")]
    Invalid { id: DrillId, reason: RecordError },
    #[error("drill {id} already exists ({existing}); stop it first, or choose another id")]
    Exists { id: DrillId, existing: String },
    #[error(
        "drill id {id} was used by a drill that already ended ({ended}); its audit entry keeps that id, so choose another id"
    )]
    IdUsed { id: DrillId, ended: String },
    #[error("no such drill {id}{}", ended_note(.ended))]
    NoSuchDrill {
        id: DrillId,
        /// How it ended, when its audit entry says.
        ended: Option<String>,
    },
    #[error("drill record at {key} is unreadable ({reason}); fix or delete it with etcdctl")]
    Unreadable { key: String, reason: RecordError },
    #[error(
        "drill {id} changed {attempts} times while it was being ended (someone keeps rewriting it); try again"
    )]
    Contended { id: DrillId, attempts: usize },
}

fn ended_note(ended: &Option<String>) -> String {
    ended
        .as_ref()
        .map_or(String::new(), |e| format!(": it already ended ({e})"))
}

/// What [`end_drill`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// This call ended the drill and wrote its audit entry, at `revision`.
    Now {
        audit: Box<DrillAudit>,
        revision: Revision,
    },
    /// Expiry only: the drill was already gone (another gateway or an operator ended it).
    AlreadyEnded,
    /// Expiry only: the drill's latest value expires at `expires`, later than the caller
    /// thought (an operator extended it), so it stays.
    NotDue { expires: i64 },
}

/// One audit entry of [`list_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: DrillId,
    pub audit: DrillAudit,
    /// Equal to `mod_revision` when the entry was written once, as it should be.
    pub create_revision: Revision,
    pub mod_revision: Revision,
}

/// Starts drill `id`: validates it, then creates it only if neither a drill nor an audit
/// entry of that id exists. Returns the revision it was created at.
pub async fn start_drill(
    store: &dyn Store,
    layout: &KeyLayout,
    id: &DrillId,
    drill: &DrillRecord,
) -> Result<Revision, DrillError> {
    drill.validate().map_err(|reason| DrillError::Invalid {
        id: id.clone(),
        reason,
    })?;
    let key = Bytes::from(layout.drill(id));
    let audit_key = Bytes::from(layout.drill_audit(id));
    let result = store
        .txn(Txn {
            compares: vec![
                Compare::Absent(key.clone()),
                Compare::Absent(audit_key.clone()),
            ],
            success: vec![TxnOp::Put {
                key: key.clone(),
                value: Bytes::from(encode(drill)),
                lease: 0,
            }],
            failure: vec![TxnOp::Get { key }, TxnOp::Get { key: audit_key }],
        })
        .await?;
    if result.succeeded {
        return Ok(result.revision);
    }
    let mut gets = result.gets.into_iter();
    match (gets.next().flatten(), gets.next().flatten()) {
        (Some(existing), _) => Err(DrillError::Exists {
            id: id.clone(),
            existing: describe_drill(&existing.value),
        }),
        (None, Some(audit)) => Err(DrillError::IdUsed {
            id: id.clone(),
            ended: describe_audit(&audit.value),
        }),
        // Both absent would have made the compares hold: the store broke its promise.
        (None, None) => Err(StoreError::Unavailable(
            "start-drill transaction failed but neither key exists".into(),
        )
        .into()),
    }
}

/// Ends drill `id` `how` (by `ended_by`, at `unix_now`): deletes it and writes its audit entry
/// in one transaction that requires the drill unchanged since it was read. If it changed, it
/// is read again and the end retried (at most [`END_ATTEMPTS`] transactions), so the audit
/// entry holds the drill's last value.
///
/// A drill that is gone is [`Ended::AlreadyEnded`] for an expiry and
/// [`DrillError::NoSuchDrill`] for a stop. An expiry of a drill whose latest value expires
/// after `unix_now` ends nothing ([`Ended::NotDue`]).
pub async fn end_drill(
    store: &dyn Store,
    layout: &KeyLayout,
    id: &DrillId,
    how: DrillEnd,
    ended_by: &str,
    unix_now: i64,
) -> Result<Ended, DrillError> {
    let invalid = |reason| DrillError::Invalid {
        id: id.clone(),
        reason,
    };
    if ended_by.trim().is_empty() {
        return Err(invalid(RecordError::MissingEndedBy));
    }
    let key = Bytes::from(layout.drill(id));
    let audit_key = Bytes::from(layout.drill_audit(id));
    let mut current = store::get(store, key.clone()).await?;
    for _ in 0..END_ATTEMPTS {
        let Some(kv) = current else {
            return match how {
                DrillEnd::Expired => Ok(Ended::AlreadyEnded),
                DrillEnd::Stopped => {
                    let audit = store::get(store, audit_key).await?;
                    Err(DrillError::NoSuchDrill {
                        id: id.clone(),
                        ended: audit.map(|kv| describe_audit(&kv.value)),
                    })
                }
            };
        };
        let drill = policy::decode::<DrillRecord>(&kv.value)
            .and_then(|d| d.validate().map(|()| d))
            .map_err(|reason| DrillError::Unreadable {
                key: layout.drill(id),
                reason,
            })?;
        if how == DrillEnd::Expired && !is_due(&drill, unix_now) {
            return Ok(Ended::NotDue {
                expires: drill.expires,
            });
        }
        let audit = DrillAudit {
            schema: SCHEMA_VERSION,
            schema_minor: 0,
            drill,
            ended: unix_now,
            how,
            ended_by: ended_by.to_owned(),
            created_revision: Some(kv.create_revision),
        };
        audit.validate().map_err(invalid)?;
        let result = store
            .txn(Txn {
                compares: vec![Compare::ModRevision(key.clone(), kv.mod_revision)],
                success: vec![
                    TxnOp::Delete { key: key.clone() },
                    TxnOp::Put {
                        key: audit_key.clone(),
                        value: Bytes::from(encode(&audit)),
                        lease: 0,
                    },
                ],
                failure: vec![TxnOp::Get { key: key.clone() }],
            })
            .await?;
        if result.succeeded {
            return Ok(Ended::Now {
                audit: Box::new(audit),
                revision: result.revision,
            });
        }
        debug!(drill = %id, "drill changed while being ended; reading it again");
        current = result.gets.into_iter().next().flatten();
    }
    Err(DrillError::Contended {
        id: id.clone(),
        attempts: END_ATTEMPTS,
    })
}

/// Ends, as expired, every drill of `drills` whose expiry is at or before `unix_now`; returns
/// the ids this call ended. A drill another gateway ended first, or that an operator extended,
/// is left alone; one that cannot be ended for another reason (an unreadable record) is logged
/// and skipped. A store error stops the round: the caller retries it later.
pub async fn expire_drills<'a>(
    store: &dyn Store,
    layout: &KeyLayout,
    drills: impl IntoIterator<Item = (&'a DrillId, &'a DrillRecord)>,
    unix_now: i64,
) -> Result<Vec<DrillId>, StoreError> {
    let due: Vec<&DrillId> = drills
        .into_iter()
        .filter(|(_, d)| is_due(d, unix_now))
        .map(|(id, _)| id)
        .collect();
    let mut ended = Vec::new();
    for id in due {
        match end_drill(store, layout, id, DrillEnd::Expired, EXPIRY_ACTOR, unix_now).await {
            Ok(Ended::Now { audit, revision }) => {
                let d = &audit.drill;
                info!(
                    drill = %id,
                    kind = d.kind.as_str(),
                    cluster = %d.cluster,
                    service = %service_text(d),
                    who = %d.who,
                    why = %d.why,
                    expires = d.expires,
                    revision,
                    "drill expired: ended it and wrote its audit entry"
                );
                ended.push(id.clone());
            }
            Ok(Ended::AlreadyEnded) => {
                debug!(drill = %id, "expired drill already ended elsewhere");
            }
            Ok(Ended::NotDue { expires }) => {
                info!(drill = %id, expires, "drill was extended before it could expire; it stays");
            }
            Err(DrillError::Store(e)) => return Err(e),
            Err(e) => warn!(drill = %id, error = %e, "could not end an expired drill"),
        }
    }
    Ok(ended)
}

/// Every drill audit entry, in id order. An entry whose key or value cannot be read is
/// logged and left out.
pub async fn list_audit(
    store: &dyn Store,
    layout: &KeyLayout,
) -> Result<Vec<AuditEntry>, StoreError> {
    let prefix = layout.drill_audits();
    let (kvs, _) = store::list_prefix(store, prefix.as_bytes()).await?;
    let mut entries = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let id = key
            .strip_prefix(prefix.as_str())
            .ok_or_else(|| "outside the audit prefix".to_owned())
            .and_then(|id| DrillId::new(id).map_err(|e| e.to_string()));
        let audit = policy::decode::<DrillAudit>(&kv.value)
            .and_then(|a| a.validate().map(|()| a))
            .map_err(|e| e.to_string());
        match (id, audit) {
            (Ok(id), Ok(audit)) => entries.push(AuditEntry {
                id,
                audit,
                create_revision: kv.create_revision,
                mod_revision: kv.mod_revision,
            }),
            (Err(e), _) | (_, Err(e)) => {
                warn!(key, error = %e, "skipping an unreadable drill audit entry");
            }
        }
    }
    Ok(entries)
}

/// Ends drills as their expiry passes, until `cancel` fires or the snapshot channel closes.
///
/// Wakes at the earliest expiry among the snapshot's drills, or when a new snapshot arrives,
/// and ends the due drills with [`expire_drills`] at the wall clock's time. Every gateway may
/// run it: the end transaction makes one of them win. A store error is logged and the round
/// retried after a backoff ([`EXPIRY_RETRY_MIN`] doubling to [`EXPIRY_RETRY_MAX`]).
pub async fn run_expiry(
    store: Arc<dyn Store>,
    layout: KeyLayout,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    cancel: CancellationToken,
) {
    expiry_loop(store.as_ref(), &layout, snapshots, &cancel, wall_clock).await;
}

/// The time since the Unix epoch; a clock before 1970 reads as the epoch.
fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// [`run_expiry`] with its clock (time since the Unix epoch) as a parameter, for tests on
/// paused tokio time.
async fn expiry_loop(
    store: &dyn Store,
    layout: &KeyLayout,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    cancel: &CancellationToken,
    clock: impl Fn() -> Duration,
) {
    let mut tracker = ExpiryTracker::default();
    let mut backoff = Backoff::new(EXPIRY_RETRY_MIN, EXPIRY_RETRY_MAX);
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let now = clock();
        let unix_now = unix_seconds(now);
        let plan = tracker.plan(snapshot.drills().map(|(id, d)| (id, &**d)), unix_now);
        drop(snapshot);
        if !plan.due.is_empty() {
            let round = expire_drills(
                store,
                layout,
                plan.due.iter().map(|(id, d)| (id, d)),
                unix_now,
            );
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                result = round => result,
            };
            match result {
                Ok(ended) => {
                    backoff.reset();
                    tracker.handled(&plan.due, unix_now);
                    debug!(
                        due = plan.due.len(),
                        ended = ended.len(),
                        "drill expiry round done"
                    );
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "could not end expired drills; will retry");
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
            // Plan again: the clock moved, and handled drills now wait for their recheck.
            continue;
        }
        let sleep = sleep_until(plan.wake_at, now);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    debug!("snapshot channel closed; drill expiry stops");
                    return;
                }
            }
            _ = async {
                match sleep {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

/// Whether `drill` is due to end at `unix_now`: its expiry is now or past.
fn is_due(drill: &DrillRecord, unix_now: i64) -> bool {
    drill.expires <= unix_now
}

/// Which drills to end now and when to look again (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExpiryPlan {
    due: Vec<(DrillId, DrillRecord)>,
    wake_at: Option<i64>,
}

/// The expiry loop's decisions, pure: which drills are due and when to wake next. Remembers
/// the drills it handed out as due, so a drill the snapshot still shows after it was ended
/// (the watcher lags behind the delete) is not ended over and over, only looked at again
/// after [`EXPIRY_RECHECK_SECS`].
#[derive(Debug, Default)]
struct ExpiryTracker {
    handled: BTreeMap<DrillId, Handled>,
}

#[derive(Debug)]
struct Handled {
    /// The value that was handled: a drill re-created or extended under the same id is new.
    drill: DrillRecord,
    recheck_at: i64,
}

impl ExpiryTracker {
    /// Plans from the snapshot's `drills` at `unix_now`: due drills not handled recently, and
    /// the earliest time something becomes due (an expiry or a recheck). Forgets handled
    /// drills the snapshot no longer shows, or shows with another value.
    fn plan<'a>(
        &mut self,
        drills: impl IntoIterator<Item = (&'a DrillId, &'a DrillRecord)>,
        unix_now: i64,
    ) -> ExpiryPlan {
        let mut due = Vec::new();
        let mut wake_at: Option<i64> = None;
        let mut wake = |at: i64| wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
        let mut seen = BTreeSet::new();
        for (id, drill) in drills {
            let handled = self
                .handled
                .get(id)
                .filter(|h| &h.drill == drill)
                .map(|h| h.recheck_at);
            if handled.is_some() {
                seen.insert(id.clone());
            }
            if !is_due(drill, unix_now) {
                wake(drill.expires);
                continue;
            }
            match handled {
                Some(recheck_at) if unix_now < recheck_at => wake(recheck_at),
                _ => due.push((id.clone(), drill.clone())),
            }
        }
        self.handled.retain(|id, _| seen.contains(id));
        ExpiryPlan { due, wake_at }
    }

    /// Records that `due` was handled at `unix_now`.
    fn handled(&mut self, due: &[(DrillId, DrillRecord)], unix_now: i64) {
        for (id, drill) in due {
            self.handled.insert(
                id.clone(),
                Handled {
                    drill: drill.clone(),
                    recheck_at: unix_now.saturating_add(EXPIRY_RECHECK_SECS),
                },
            );
        }
    }
}

/// How long to sleep from `now` (since the Unix epoch) until `wake_at` (Unix seconds), at
/// most [`MAX_EXPIRY_SLEEP`]; `None` when nothing is scheduled.
fn sleep_until(wake_at: Option<i64>, now: Duration) -> Option<Duration> {
    wake_at.map(|at| {
        Duration::from_secs(u64::try_from(at).unwrap_or(0))
            .saturating_sub(now)
            .min(MAX_EXPIRY_SLEEP)
    })
}

/// Whole Unix seconds of a time since the epoch.
fn unix_seconds(since_epoch: Duration) -> i64 {
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}

/// The service a drill covers, for logs and messages.
fn service_text(drill: &DrillRecord) -> String {
    drill
        .service
        .as_ref()
        .map_or("every service".to_owned(), ToString::to_string)
}

/// A Unix time as RFC 3339, for operators; the raw number outside years 1970 to 9999.
fn unix_time_text(secs: i64) -> String {
    const YEAR_10000: u64 = 253_402_300_800;
    match u64::try_from(secs) {
        Ok(s) if s < YEAR_10000 => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => format!("{secs} (Unix seconds)"),
    }
}

/// An existing drill in words, for an error message.
fn describe_drill(value: &[u8]) -> String {
    match policy::decode::<DrillRecord>(value) {
        Ok(d) => format!(
            "{} of cluster {} for {} by {}: {}; expires {}",
            d.kind.as_str(),
            d.cluster,
            service_text(&d),
            d.who,
            d.why,
            unix_time_text(d.expires)
        ),
        Err(e) => format!("an unreadable record: {e}"),
    }
}

/// An audit entry in words, for an error message.
fn describe_audit(value: &[u8]) -> String {
    match policy::decode::<DrillAudit>(value) {
        Ok(a) => format!(
            "{} by {} at {}",
            a.how.as_str(),
            a.ended_by,
            unix_time_text(a.ended)
        ),
        Err(e) => format!("its audit entry is unreadable: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use meshup_core::catalog::Change;
    use meshup_core::names::ClusterName;
    use meshup_core::policy::DrillKind;

    use super::*;
    use crate::embedded::EmbeddedStore;
    use crate::test_store::{Call, TestStore};

    /// A Unix time in 2027, where the paused test clocks start.
    const T0: i64 = 1_800_000_000;

    fn id(s: &str) -> DrillId {
        DrillId::new(s).expect("valid id")
    }

    fn drill(expires: i64) -> DrillRecord {
        DrillRecord {
            schema: SCHEMA_VERSION,
            schema_minor: 0,
            kind: DrillKind::Drain,
            cluster: ClusterName::new("west").expect("valid cluster"),
            service: None,
            who: "ana".into(),
            why: "game day".into(),
            created: expires - 3600,
            expires,
        }
    }

    fn ids(due: &[(DrillId, DrillRecord)]) -> Vec<String> {
        due.iter().map(|(id, _)| id.to_string()).collect()
    }

    #[test]
    fn plans_the_due_drills_and_the_next_wake() {
        const R: i64 = EXPIRY_RECHECK_SECS;
        type Row<'a> = (
            &'a str,
            &'a [(&'a str, i64)],      // the snapshot's drills: id, expires
            &'a [(&'a str, i64, i64)], // handled before: id, expires, when
            i64,                       // now
            &'a [&'a str],             // due
            Option<i64>,               // wake at
        );
        let table: &[Row] = &[
            ("no drills", &[], &[], 100, &[], None),
            (
                "not yet due: wake at its expiry",
                &[("a", 200)],
                &[],
                100,
                &[],
                Some(200),
            ),
            (
                "due at its expiry second",
                &[("a", 100)],
                &[],
                100,
                &["a"],
                None,
            ),
            (
                "several: the due ones, and the earliest of the rest",
                &[("a", 90), ("b", 150), ("c", 120), ("d", 100)],
                &[],
                100,
                &["a", "d"],
                Some(120),
            ),
            (
                "handled and still shown: wait for its recheck",
                &[("a", 90), ("b", 500)],
                &[("a", 90, 95)],
                100,
                &[],
                Some(95 + R),
            ),
            (
                "handled: due again at its recheck",
                &[("a", 90)],
                &[("a", 90, 95)],
                95 + R,
                &["a"],
                None,
            ),
            (
                "handled, then re-created with another value: due",
                &[("a", 80)],
                &[("a", 90, 95)],
                100,
                &["a"],
                None,
            ),
            (
                "handled, then extended: wake at the new expiry",
                &[("a", 300)],
                &[("a", 90, 95)],
                100,
                &[],
                Some(300),
            ),
            (
                "a recheck later than the next expiry",
                &[("a", 90), ("b", 130)],
                &[("a", 90, 95)],
                100,
                &[],
                Some(130),
            ),
        ];
        for (what, drills, handled, now, due, wake) in table {
            let mut tracker = ExpiryTracker::default();
            for (name, expires, at) in *handled {
                tracker.handled(&[(id(name), drill(*expires))], *at);
            }
            let drills: Vec<(DrillId, DrillRecord)> =
                drills.iter().map(|(n, e)| (id(n), drill(*e))).collect();
            let plan = tracker.plan(drills.iter().map(|(i, d)| (i, d)), *now);
            assert_eq!(ids(&plan.due), *due, "{what}: due");
            assert_eq!(plan.wake_at, *wake, "{what}: wake");
        }
    }

    #[test]
    fn a_handled_drill_is_forgotten_once_the_snapshot_drops_it() {
        let mut tracker = ExpiryTracker::default();
        let (a, d) = (id("a"), drill(90));
        tracker.handled(&[(a.clone(), d.clone())], 100);
        assert_eq!(
            ids(&tracker.plan([(&a, &d)], 101).due),
            Vec::<String>::new()
        );
        assert_eq!(tracker.plan(std::iter::empty(), 102).due, vec![]);
        // Back with the very same value (re-created): a new drill, due at once.
        assert_eq!(ids(&tracker.plan([(&a, &d)], 103).due), vec!["a"]);
    }

    #[test]
    fn sleeps_until_the_wake_time_at_most_the_cap() {
        let ms = Duration::from_millis;
        let table = [
            (None, ms(100_000), None),
            (Some(101), ms(100_700), Some(ms(300))),
            (Some(100), ms(100_500), Some(Duration::ZERO)),
            (Some(-5), ms(100_000), Some(Duration::ZERO)),
            (Some(10_000), ms(100_000), Some(MAX_EXPIRY_SLEEP)),
        ];
        for (wake, now, want) in table {
            assert_eq!(sleep_until(wake, now), want, "{wake:?} at {now:?}");
        }
    }

    /// The embedded store behind the test store, which counts transactions (every read and
    /// write of this module is one) and fails them all while disconnected.
    fn test_store() -> Arc<TestStore> {
        TestStore::new(Arc::new(EmbeddedStore::new()))
    }

    async fn has(store: &TestStore, key: String) -> bool {
        store::get(store.inner().as_ref(), key)
            .await
            .expect("get")
            .is_some()
    }

    fn snapshot(drills: &[(&str, &DrillRecord)]) -> Arc<Snapshot> {
        let mut s = Snapshot::new();
        for (name, d) in drills {
            s.apply(Change::PutDrill(id(name), Arc::new((*d).clone())));
        }
        Arc::new(s)
    }

    /// Runs the expiry loop on a clock that reads `T0` at the start and follows tokio time.
    fn spawn_loop(
        store: &Arc<TestStore>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        cancel: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (store, cancel) = (store.clone(), cancel.clone());
        let start = tokio::time::Instant::now();
        let clock = move || Duration::from_secs(T0 as u64) + start.elapsed();
        tokio::spawn(async move {
            expiry_loop(
                store.as_ref(),
                &KeyLayout::default(),
                snapshots,
                &cancel,
                clock,
            )
            .await;
        })
    }

    async fn sleep_ms(ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_ends_a_drill_at_its_expiry_then_leaves_it_alone() {
        let store = test_store();
        let layout = KeyLayout::default();
        let (a, d) = (id("a"), drill(T0 + 5));
        start_drill(store.as_ref(), &layout, &a, &d)
            .await
            .expect("start");
        let (tx, rx) = watch::channel(snapshot(&[("a", &d)]));
        let cancel = CancellationToken::new();
        let task = spawn_loop(&store, rx, &cancel);

        let before = store.calls(Call::Txn);
        sleep_ms(4_900).await;
        assert!(has(&store, layout.drill(&a)).await, "not ended early");
        assert_eq!(
            store.calls(Call::Txn),
            before,
            "no store traffic before the expiry"
        );
        sleep_ms(200).await;
        assert!(!has(&store, layout.drill(&a)).await, "ended at its expiry");
        let audit = list_audit(store.inner().as_ref(), &layout)
            .await
            .expect("list");
        assert_eq!(audit.len(), 1);
        assert_eq!(
            (
                audit[0].audit.how,
                audit[0].audit.ended,
                audit[0].audit.ended_by.as_str()
            ),
            (DrillEnd::Expired, T0 + 5, EXPIRY_ACTOR)
        );
        assert_eq!(audit[0].audit.drill, d);
        let ended = store.calls(Call::Txn);
        assert_eq!(ended, before + 2, "one read, one transaction");

        // The watcher has not caught up: the snapshot still shows the drill. It is looked at
        // again only at its recheck, once.
        sleep_ms(50_000).await;
        assert_eq!(
            store.calls(Call::Txn),
            ended,
            "no retries while the snapshot lags"
        );
        sleep_ms(15_000).await;
        assert_eq!(store.calls(Call::Txn), ended + 1, "one recheck read");
        tx.send(snapshot(&[])).expect("loop alive");
        sleep_ms(200_000).await;
        assert_eq!(store.calls(Call::Txn), ended + 1, "nothing to do");
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the loop stops on cancel")
            .expect("the loop does not panic");
    }

    #[tokio::test(start_paused = true)]
    async fn store_errors_back_off_and_the_round_is_retried() {
        let store = test_store();
        let layout = KeyLayout::default();
        let (a, d) = (id("a"), drill(T0 - 1));
        start_drill(store.as_ref(), &layout, &a, &d)
            .await
            .expect("start");
        store.disconnect();
        let before = store.calls(Call::Txn);
        let (_tx, rx) = watch::channel(snapshot(&[("a", &d)]));
        let cancel = CancellationToken::new();
        let _task = spawn_loop(&store, rx, &cancel);
        // Attempts at 0, 1, 3 and 7 s: the backoff doubles from 1 s.
        sleep_ms(10_500).await;
        assert_eq!(
            store.calls(Call::Txn) - before,
            4,
            "backed off, no busy loop"
        );
        store.reconnect();
        // The next attempt, at 15 s, ends it.
        sleep_ms(4_000).await;
        assert!(has(&store, layout.drill(&a)).await);
        sleep_ms(1_000).await;
        assert!(!has(&store, layout.drill(&a)).await);
        assert_eq!(
            list_audit(store.inner().as_ref(), &layout)
                .await
                .expect("list")
                .len(),
            1
        );
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_snapshot_wakes_the_loop_and_a_closed_channel_stops_it() {
        let store = test_store();
        let layout = KeyLayout::default();
        let (tx, rx) = watch::channel(snapshot(&[]));
        let cancel = CancellationToken::new();
        let task = spawn_loop(&store, rx, &cancel);
        sleep_ms(1_000).await;
        let (a, d) = (id("a"), drill(T0));
        start_drill(store.as_ref(), &layout, &a, &d)
            .await
            .expect("start");
        tx.send(snapshot(&[("a", &d)])).expect("loop alive");
        sleep_ms(1).await;
        assert!(
            !has(&store, layout.drill(&a)).await,
            "ended on the new snapshot"
        );
        drop(tx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the loop stops when the snapshots end")
            .expect("the loop does not panic");
    }

    #[tokio::test]
    async fn ending_needs_someone_who_ends_it_and_a_readable_drill() {
        let store = EmbeddedStore::new();
        let layout = KeyLayout::default();
        let a = id("a");
        let err = end_drill(&store, &layout, &a, DrillEnd::Stopped, " ", T0)
            .await
            .expect_err("no ended_by");
        assert!(err.to_string().contains("needs ended_by"), "{err}");
        store::put(&store, layout.drill(&a), "{not json", 0)
            .await
            .expect("put");
        let err = end_drill(&store, &layout, &a, DrillEnd::Stopped, "ana", T0)
            .await
            .expect_err("unreadable");
        let text = err.to_string();
        assert!(
            text.contains("/meshup/v1/drills/a is unreadable") && text.contains("etcdctl"),
            "{text}"
        );
        let nobody = DrillRecord {
            who: String::new(),
            ..drill(T0)
        };
        let err = start_drill(&store, &layout, &id("b"), &nobody)
            .await
            .expect_err("invalid");
        assert!(
            err.to_string()
                .contains("drill b is not valid: a drill needs who"),
            "{err}"
        );
    }
}

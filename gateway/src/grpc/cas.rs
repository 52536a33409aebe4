//! The writes of the records operators keep in the catalog through the admin API (failover
//! policies, route rules): compare-and-set on the key's mod revision, or an overwrite, each
//! one store transaction. A lost compare-and-set is FAILED_PRECONDITION with the current
//! revision in the message and the `meshup-current-revision` trailer, and the message says
//! what to do ([`Record`] words it for each kind of record; pure and table-tested).

use bytes::Bytes;
use meshup_admin_api::CURRENT_REVISION_METADATA;
use meshup_core::names::ServiceKey;
use meshup_federation::store::{Compare, Store, StoreError, Txn, TxnOp};
use tonic::{Code, Status};

/// The kind of record a write is about, for its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    Policy,
    Routes,
}

/// How a kind of record is spoken of (one policy; route rules, plural).
struct Words {
    /// "a policy" / "route rules"
    some: &'static str,
    /// "the policy" / "the route rules"
    the: &'static str,
    /// "no policy" / "no route rules"
    none: &'static str,
    /// "it" / "they", "it" / "them"
    subject: &'static str,
    object: &'static str,
    /// "is" / "are", "was" / "were", "exists" / "exist"
    is: &'static str,
    was: &'static str,
    exists: &'static str,
    /// The CLI command that reads it.
    command: &'static str,
    /// What holds once none is stored.
    without: &'static str,
}

impl Record {
    fn words(self) -> Words {
        match self {
            Record::Policy => Words {
                some: "a policy",
                the: "the policy",
                none: "no policy",
                subject: "it",
                object: "it",
                is: "is",
                was: "was",
                exists: "exists",
                command: "policy",
                without: "the default applies already",
            },
            Record::Routes => Words {
                some: "route rules",
                the: "the route rules",
                none: "no route rules",
                subject: "they",
                object: "them",
                is: "are",
                was: "were",
                exists: "exist",
                command: "route",
                without: "every request follows the failover policy already",
            },
        }
    }

    /// Why a write at revision `wanted` (0: create) lost to what is stored now (`current`,
    /// 0: nothing).
    pub fn lost_write(self, key: &ServiceKey, wanted: i64, current: i64) -> String {
        let w = self.words();
        match (wanted, current) {
            (0, c) => format!(
                "{} for {key} already {} (revision {c}): read {} with `meshup {} get {key}` and pass --revision {c} to replace {}",
                w.some, w.exists, w.object, w.command, w.object
            ),
            (r, 0) => format!(
                "{} for {key} {} stored (you passed revision {r}: {} {} deleted since, or never {}): pass revision 0 to create {}",
                w.none, w.is, w.subject, w.was, w.was, w.object
            ),
            (r, c) => format!(
                "{} for {key} changed since revision {r}: {} {} at revision {c} now; read {} again, merge your change and retry with revision {c}",
                w.the, w.subject, w.is, w.object
            ),
        }
    }

    /// Why a delete at revision `wanted` lost to revision `current`.
    pub fn lost_delete(self, key: &ServiceKey, wanted: i64, current: i64) -> String {
        let w = self.words();
        format!(
            "{} for {key} changed since revision {wanted}: {} {} at revision {current} now; read {} again before deleting {}",
            w.the, w.subject, w.is, w.object, w.object
        )
    }

    /// Nothing stored to delete.
    pub fn absent(self, key: &ServiceKey) -> String {
        let w = self.words();
        format!("{} stored for {key}: {}", w.none, w.without)
    }
}

/// A store error as a status: UNAVAILABLE when a retry may work.
pub fn store_status(e: &StoreError) -> Status {
    let code = if e.is_retryable() {
        Code::Unavailable
    } else {
        Code::FailedPrecondition
    };
    Status::new(code, format!("catalog store: {e}"))
}

/// A lost compare-and-set: FAILED_PRECONDITION, with the current revision in the message
/// and the trailer.
pub fn conflict(message: String, current: i64) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(v) = current.to_string().parse() {
        metadata.insert(CURRENT_REVISION_METADATA, v);
    }
    Status::with_metadata(Code::FailedPrecondition, message, metadata)
}

/// Writes `value` at `key` if the key is still at mod revision `revision` (0: absent);
/// returns the new revision.
pub async fn put_if(
    store: &dyn Store,
    record: Record,
    service: &ServiceKey,
    key: String,
    value: String,
    revision: i64,
) -> Result<i64, Status> {
    let k = Bytes::from(key);
    let compare = if revision == 0 {
        Compare::Absent(k.clone())
    } else {
        Compare::ModRevision(k.clone(), revision)
    };
    let result = store
        .txn(Txn {
            compares: vec![compare],
            success: vec![TxnOp::Put {
                key: k.clone(),
                value: Bytes::from(value),
                lease: 0,
            }],
            failure: vec![TxnOp::Get { key: k }],
        })
        .await
        .map_err(|e| store_status(&e))?;
    if !result.succeeded {
        let current = result
            .gets
            .into_iter()
            .next()
            .flatten()
            .map_or(0, |kv| kv.mod_revision);
        return Err(conflict(
            record.lost_write(service, revision, current),
            current,
        ));
    }
    Ok(result.revision)
}

/// Writes `value` at `key` whatever is stored; returns the new revision and the mod
/// revision it replaced (0: none).
pub async fn put(store: &dyn Store, key: String, value: String) -> Result<(i64, i64), Status> {
    let k = Bytes::from(key);
    let result = store
        .txn(Txn {
            compares: Vec::new(),
            success: vec![
                TxnOp::Get { key: k.clone() },
                TxnOp::Put {
                    key: k,
                    value: Bytes::from(value),
                    lease: 0,
                },
            ],
            failure: Vec::new(),
        })
        .await
        .map_err(|e| store_status(&e))?;
    let previous = result
        .gets
        .into_iter()
        .next()
        .flatten()
        .map_or(0, |kv| kv.mod_revision);
    Ok((result.revision, previous))
}

/// Deletes `key` if it is still at mod revision `revision` (0: whatever is stored); returns
/// the store revision after the delete. NOT_FOUND when nothing is stored.
pub async fn delete_if(
    store: &dyn Store,
    record: Record,
    service: &ServiceKey,
    key: String,
    revision: i64,
) -> Result<i64, Status> {
    let k = Bytes::from(key);
    let revision = if revision == 0 {
        match meshup_federation::store::get(store, k.clone())
            .await
            .map_err(|e| store_status(&e))?
        {
            Some(kv) => kv.mod_revision,
            None => return Err(Status::not_found(record.absent(service))),
        }
    } else {
        revision
    };
    let result = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(k.clone(), revision)],
            success: vec![TxnOp::Delete { key: k.clone() }],
            failure: vec![TxnOp::Get { key: k }],
        })
        .await
        .map_err(|e| store_status(&e))?;
    if !result.succeeded {
        return Err(match result.gets.into_iter().next().flatten() {
            None => Status::not_found(record.absent(service)),
            Some(kv) => conflict(
                record.lost_delete(service, revision, kv.mod_revision),
                kv.mod_revision,
            ),
        });
    }
    Ok(result.revision)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every message, as operators read it (the policy's as they were before routes shared
    /// them).
    #[test]
    fn lost_writes_say_what_is_stored_and_what_to_do() {
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        let cases: &[(String, &str)] = &[
            (
                Record::Policy.lost_write(&pay, 0, 7),
                "a policy for pay.prod already exists (revision 7): read it with `meshup policy get pay.prod` and pass --revision 7 to replace it",
            ),
            (
                Record::Policy.lost_write(&pay, 5, 0),
                "no policy for pay.prod is stored (you passed revision 5: it was deleted since, or never was): pass revision 0 to create it",
            ),
            (
                Record::Policy.lost_write(&pay, 5, 7),
                "the policy for pay.prod changed since revision 5: it is at revision 7 now; read it again, merge your change and retry with revision 7",
            ),
            (
                Record::Policy.lost_delete(&pay, 5, 7),
                "the policy for pay.prod changed since revision 5: it is at revision 7 now; read it again before deleting it",
            ),
            (
                Record::Policy.absent(&pay),
                "no policy stored for pay.prod: the default applies already",
            ),
            (
                Record::Routes.lost_write(&pay, 0, 7),
                "route rules for pay.prod already exist (revision 7): read them with `meshup route get pay.prod` and pass --revision 7 to replace them",
            ),
            (
                Record::Routes.lost_write(&pay, 5, 0),
                "no route rules for pay.prod are stored (you passed revision 5: they were deleted since, or never were): pass revision 0 to create them",
            ),
            (
                Record::Routes.lost_write(&pay, 5, 7),
                "the route rules for pay.prod changed since revision 5: they are at revision 7 now; read them again, merge your change and retry with revision 7",
            ),
            (
                Record::Routes.lost_delete(&pay, 5, 7),
                "the route rules for pay.prod changed since revision 5: they are at revision 7 now; read them again before deleting them",
            ),
            (
                Record::Routes.absent(&pay),
                "no route rules stored for pay.prod: every request follows the failover policy already",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }
    }
}

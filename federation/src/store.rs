//! The store seam: what the catalog needs from a key-value store, and nothing more.
//!
//! Two implementations share these semantics and one test suite: [`crate::etcd::EtcdStore`]
//! (a real etcd cluster) and [`crate::embedded::EmbeddedStore`] (in-process).
//!
//! - Every write gets a store-wide, strictly increasing **revision**.
//! - **Leases** expire unless kept alive; keys written under a lease vanish with it.
//! - **Ranges** are read in pages at one pinned revision, so a 100k-key list never becomes
//!   one huge message and is still one consistent view.
//! - **Watches** deliver every change from a start revision, in order; below the compaction
//!   point a watch yields [`WatchItem::Compacted`], which is an outcome, not an error.
//! - **Transactions** compare-and-set: "create if absent", "delete if unchanged".
//!
//! The trait is object safe (`Arc<dyn Store>`): methods return boxed futures.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

/// A store revision (etcd's `mod_revision` space). Starts at 1 for an empty store.
pub type Revision = i64;
/// A lease id. Never 0 (0 means "no lease" in etcd).
pub type LeaseId = i64;

/// A boxed future returning a store result; what every [`Store`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Keys in the first page of a list, and in any page after a larger one failed. Catalog
/// values are at most 64 KiB (`MAX_RECORD_BYTES`), so a page of this many always stays
/// below the gRPC message limit the etcd client is configured with.
pub const LIST_PAGE_KEYS: usize = 1000;

/// About how many bytes a later page of a list carries: pages grow from
/// [`LIST_PAGE_KEYS`] by doubling, up to this at the previous page's mean record size.
///
/// Pages must grow with the catalog: etcd walks its index from a page's first key to the
/// end of the range for every page (to count what is left; etcd 3.4 even collects it), so
/// listing N keys in pages of P walks about N²/2P index entries. At 1M records in pages of
/// 1,000 that is 5·10⁸ and took minutes; in pages of 8 MiB (~25,000 records of ~330 bytes),
/// 2·10⁷.
pub const LIST_PAGE_BYTES: usize = 8 * 1024 * 1024;

/// Why a store operation failed. [`StoreError::is_retryable`] tells callers whether to back
/// off and try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error(
        "catalog store unreachable or not ready: {0} (check that etcd is running and has a leader)"
    )]
    Unavailable(String),
    #[error("catalog store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("revision {requested} was compacted (oldest readable revision: {compacted}); relist")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("lease {0:x} does not exist (expired, revoked, or lost in a store restart)")]
    LeaseNotFound(LeaseId),
    #[error("catalog store rejected the request: {0} (check permissions and request size)")]
    Rejected(String),
    #[error("catalog store configuration is unusable: {0}")]
    Config(String),
    #[error("catalog store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the same request may succeed later (back off and retry).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Timeout(_))
    }

    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Timeout(_) => "timeout",
            StoreError::Compacted { .. } => "compacted",
            StoreError::LeaseNotFound(_) => "lease_not_found",
            StoreError::Rejected(_) => "rejected",
            StoreError::Config(_) => "config",
            StoreError::Closed => "closed",
        }
    }
}

/// One stored key with its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    pub create_revision: Revision,
    pub mod_revision: Revision,
    /// 0 when the key is not lease-bound.
    pub lease: LeaseId,
}

/// One page of a range read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub kvs: Vec<KeyValue>,
    /// Whether keys remain after the last one in `kvs`.
    pub more: bool,
    /// The revision the page was read at.
    pub revision: Revision,
}

/// A key range `[start, end)`. An empty `end` means "to the end of the keyspace".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Bytes,
    pub end: Bytes,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let start: Bytes = prefix.into();
        let end = prefix_end(&start);
        Self { start, end }
    }

    /// Whether `key` is inside the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= &self.start[..] && (self.end.is_empty() || key < &self.end[..])
    }
}

/// The first key after every key with this prefix (etcd's range-end convention).
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    // All 0xff (or empty): the range runs to the end of the keyspace.
    Bytes::new()
}

/// Whether an event stored or removed its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change to one key. For a delete, `kv.value` is empty and `kv.mod_revision` is the
/// revision of the deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Changes in revision order (one message may span several revisions).
    Events(Vec<Event>),
    /// A bookmark: every event of this watch at or below `revision` has been delivered, so a
    /// new watch may resume from `revision + 1` without a gap even when the watched range
    /// itself had no event for a long time (etcd revisions are store-wide: on a shared etcd a
    /// quiet range's last event soon falls below the compaction point). Successive bookmarks
    /// may repeat a revision or even go back; callers keep the maximum. Also proves liveness.
    Progress { revision: Revision },
    /// The watch is alive, but the answer carries no revision that is safe to resume from:
    /// etcd's creation acknowledgement (history may still be replaying) and, on etcd
    /// releases that send requested progress answers out of order with events
    /// (etcd-io/etcd#15220), the answer to [`Watch::request_progress`].
    Alive,
    /// The start revision is below the compaction point: this watch is over; relist.
    Compacted { compact_revision: Revision },
}

/// A running watch. Items arrive on a bounded channel; the stream ends (`None`) when the
/// store cancels the watch (a broken connection, or a watcher too slow to keep up), after
/// which the caller resumes after the last revision it knows complete (its last event or
/// bookmark, whichever is later). Dropping the `Watch` cancels
/// it on the store.
pub struct Watch {
    items: mpsc::Receiver<Result<WatchItem, StoreError>>,
    progress: Box<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch").finish_non_exhaustive()
    }
}

impl Watch {
    /// Builds a watch from its item channel and a function that asks the store for a
    /// progress notification.
    pub fn new(
        items: mpsc::Receiver<Result<WatchItem, StoreError>>,
        progress: Box<dyn Fn() + Send + Sync>,
    ) -> Self {
        Self { items, progress }
    }

    /// The next item, or `None` when the watch was cancelled by the store.
    pub async fn next(&mut self) -> Option<Result<WatchItem, StoreError>> {
        self.items.recv().await
    }

    /// Asks the store to send a [`WatchItem::Progress`] (or [`WatchItem::Alive`]) soon; used
    /// to detect stalled watches and to advance the resume point of a quiet watch.
    /// Never blocks; a request that cannot be queued is dropped (the stall detector notices).
    pub fn request_progress(&self) {
        (self.progress)();
    }
}

/// A condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compare {
    /// The key does not exist.
    Absent(Bytes),
    /// The key exists with exactly this `mod_revision`.
    ModRevision(Bytes, Revision),
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put {
        key: Bytes,
        value: Bytes,
        /// 0 for no lease.
        lease: LeaseId,
    },
    Delete {
        key: Bytes,
    },
    Get {
        key: Bytes,
    },
}

/// A compare-and-set transaction: if every compare holds, run `success`, else `failure`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The store revision after the transaction.
    pub revision: Revision,
    /// One entry per `Get` of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// What the catalog needs from a key-value store. See the module docs for the semantics both
/// implementations share.
pub trait Store: Send + Sync + fmt::Debug {
    /// "etcd" or "embedded", for logs and metrics.
    fn backend(&self) -> &'static str;

    /// The current revision.
    fn revision(&self) -> StoreFuture<'_, Revision>;

    /// Reads at most `limit` keys of `range` in key order, at `revision` (`None`: the current
    /// one). Reading below the compaction point fails with [`StoreError::Compacted`].
    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page>;

    /// Watches `range` from `start_revision` (inclusive).
    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch>;

    /// Grants a lease of `ttl` (rounded up to whole seconds).
    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId>;

    /// Refreshes a lease once; returns the TTL it now has. A lease that no longer exists is
    /// [`StoreError::LeaseNotFound`].
    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, Duration>;

    /// Revokes a lease, deleting its keys at once.
    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()>;

    /// Runs a compare-and-set transaction.
    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult>;

    /// Discards history before `revision`: watches and reads below it become `Compacted`.
    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()>;
}

// === helpers over any Store ===

/// Every key with `prefix`, read page by page at one pinned revision, and that revision.
///
/// If the pinned revision is compacted while paging (a very slow list on a busy store), the
/// list starts over at the then-current revision, at most `LIST_RESTARTS` times.
pub async fn list_prefix(
    store: &dyn Store,
    prefix: &[u8],
) -> Result<(Vec<KeyValue>, Revision), StoreError> {
    let mut kvs = Vec::new();
    let revision = list_prefix_pages(store, prefix, |page, first| {
        if first {
            kvs.clear();
        }
        kvs.extend(page);
    })
    .await?;
    Ok((kvs, revision))
}

/// Like [`list_prefix`], but hands each page to `on_page` as it arrives, so a large list
/// is reduced page by page instead of held whole. `on_page`'s second argument is true for
/// the first page of an attempt: after a restart, the pages before it are void.
///
/// Pages grow (see [`LIST_PAGE_BYTES`]); a grown page that fails for any reason but
/// compaction (too large to decode, when the records further on are much larger than the
/// ones before; too slow) is read again in pages of [`LIST_PAGE_KEYS`], which grow anew.
pub async fn list_prefix_pages(
    store: &dyn Store,
    prefix: &[u8],
    mut on_page: impl FnMut(Vec<KeyValue>, bool),
) -> Result<Revision, StoreError> {
    const LIST_RESTARTS: usize = 3;
    let range = KeyRange::prefix(Bytes::copy_from_slice(prefix));
    let mut attempt = 0;
    'restart: loop {
        attempt += 1;
        let mut revision = None;
        let mut next = range.clone();
        let mut limit = LIST_PAGE_KEYS;
        loop {
            let page = match store.range(next.clone(), revision, limit).await {
                Ok(page) => page,
                Err(StoreError::Compacted { .. }) if attempt < LIST_RESTARTS => continue 'restart,
                Err(e) if limit > LIST_PAGE_KEYS => {
                    tracing::debug!(limit, error = %e, "a large list page failed; reading it in small pages");
                    limit = LIST_PAGE_KEYS;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let first = revision.is_none();
            revision = Some(page.revision);
            limit = next_page_limit(limit, &page.kvs);
            let last = page.kvs.last().map(|kv| kv.key.clone());
            on_page(page.kvs, first);
            match last {
                Some(last) if page.more => {
                    // The next page starts right after the last key: append a zero byte.
                    let mut start = last.to_vec();
                    start.push(0);
                    next.start = Bytes::from(start);
                }
                _ => return Ok(page.revision),
            }
        }
    }
}

/// The next page's limit after a page of `limit` that brought `kvs`: doubled, and at most
/// what [`LIST_PAGE_BYTES`] holds at `kvs`' mean size; never below [`LIST_PAGE_KEYS`].
fn next_page_limit(limit: usize, kvs: &[KeyValue]) -> usize {
    let bytes: usize = kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    let mean = (bytes / kvs.len().max(1)).max(1);
    limit
        .saturating_mul(2)
        .min(LIST_PAGE_BYTES / mean)
        .max(LIST_PAGE_KEYS)
}

/// Reads one key.
pub async fn get(store: &dyn Store, key: impl Into<Bytes>) -> Result<Option<KeyValue>, StoreError> {
    let result = store
        .txn(Txn {
            compares: vec![],
            success: vec![TxnOp::Get { key: key.into() }],
            failure: vec![],
        })
        .await?;
    Ok(result.gets.into_iter().next().flatten())
}

/// Writes one key (under `lease`, 0 for none); returns the new revision.
pub async fn put(
    store: &dyn Store,
    key: impl Into<Bytes>,
    value: impl Into<Bytes>,
    lease: LeaseId,
) -> Result<Revision, StoreError> {
    let result = store
        .txn(Txn {
            compares: vec![],
            success: vec![TxnOp::Put {
                key: key.into(),
                value: value.into(),
                lease,
            }],
            failure: vec![],
        })
        .await?;
    Ok(result.revision)
}

/// Deletes one key unconditionally; returns the revision after.
pub async fn delete(store: &dyn Store, key: impl Into<Bytes>) -> Result<Revision, StoreError> {
    let result = store
        .txn(Txn {
            compares: vec![],
            success: vec![TxnOp::Delete { key: key.into() }],
            failure: vec![],
        })
        .await?;
    Ok(result.revision)
}

/// What [`create_if_absent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key was created at this revision.
    Created(Revision),
    /// The key already existed with this value.
    Exists(KeyValue),
}

/// Creates `key` only if it does not exist; otherwise returns what is there.
pub async fn create_if_absent(
    store: &dyn Store,
    key: impl Into<Bytes>,
    value: impl Into<Bytes>,
    lease: LeaseId,
) -> Result<CreateOutcome, StoreError> {
    let key = key.into();
    let result = store
        .txn(Txn {
            compares: vec![Compare::Absent(key.clone())],
            success: vec![TxnOp::Put {
                key: key.clone(),
                value: value.into(),
                lease,
            }],
            failure: vec![TxnOp::Get { key }],
        })
        .await?;
    if result.succeeded {
        return Ok(CreateOutcome::Created(result.revision));
    }
    match result.gets.into_iter().next().flatten() {
        Some(kv) => Ok(CreateOutcome::Exists(kv)),
        // Deleted between the compare and the get is impossible inside one transaction.
        None => Err(StoreError::Unavailable(
            "create-if-absent failed but the key is missing".into(),
        )),
    }
}

/// Deletes `key` only if its `mod_revision` is still `mod_revision`; returns whether it did.
pub async fn delete_if_mod_revision(
    store: &dyn Store,
    key: impl Into<Bytes>,
    mod_revision: Revision,
) -> Result<bool, StoreError> {
    let key = key.into();
    let result = store
        .txn(Txn {
            compares: vec![Compare::ModRevision(key.clone(), mod_revision)],
            success: vec![TxnOp::Delete { key }],
            failure: vec![],
        })
        .await?;
    Ok(result.succeeded)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn prefix_end_follows_etcd() {
        assert_eq!(prefix_end(b"/a/"), Bytes::from_static(b"/a0"));
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::new());
        let r = KeyRange::prefix(Bytes::from_static(b"/m/"));
        assert!(r.contains(b"/m/x"));
        assert!(!r.contains(b"/m0"));
        assert!(!r.contains(b"/l"));
    }

    /// A list whose pinned revision is compacted between two pages starts over, telling
    /// its consumer so, and ends with each key once, at the new revision.
    #[tokio::test]
    async fn a_list_compacted_between_pages_starts_over() {
        use futures::FutureExt;

        let store = crate::embedded::EmbeddedStore::new();
        let keys = 2 * LIST_PAGE_KEYS + 500;
        for i in 0..keys {
            put(&store, format!("/l/{i:05}"), "v", 0)
                .await
                .expect("put");
        }
        let mut firsts = Vec::new();
        let mut listed: Vec<Bytes> = Vec::new();
        let revision = list_prefix_pages(&store, b"/l/", |page, first| {
            firsts.push(first);
            if first {
                listed.clear();
            }
            listed.extend(page.into_iter().map(|kv| kv.key));
            if firsts.len() == 1 {
                // Between the first and the second page: a new key, and the pinned
                // revision compacted away (the embedded store answers at once).
                let rev = put(&store, "/l/99999", "v", 0)
                    .now_or_never()
                    .expect("embedded put is ready")
                    .expect("put");
                store
                    .compact(rev)
                    .now_or_never()
                    .expect("embedded compact is ready")
                    .expect("compact");
            }
        })
        .await
        .expect("list");
        // The first attempt's first page, then the second attempt's pages (which grow).
        assert_eq!(firsts[..2], [true, true], "pages and restarts: {firsts:?}");
        assert!(firsts[2..].iter().all(|f| !f), "one restart: {firsts:?}");
        assert_eq!(listed.len(), keys + 1);
        assert!(
            listed.windows(2).all(|w| w[0] < w[1]),
            "each key once, in order"
        );
        assert_eq!(listed.last().map(|k| &k[..]), Some(&b"/l/99999"[..]));
        let (all, at) = list_prefix(&store, b"/l/").await.expect("list");
        assert_eq!((all.len(), at), (keys + 1, revision));
    }

    /// Pages double from `LIST_PAGE_KEYS` up to `LIST_PAGE_BYTES` at the records' size; a
    /// grown page that fails is read again in small pages, and the list still ends whole.
    #[tokio::test]
    async fn list_pages_grow_and_fall_back_to_small_ones() {
        let embedded = crate::embedded::EmbeddedStore::new();
        let store = crate::test_store::TestStore::new(Arc::new(embedded));
        let value = vec![b'v'; 1000];
        let keys = 40 * LIST_PAGE_KEYS;
        for chunk in (0..keys).collect::<Vec<_>>().chunks(500) {
            let success = chunk
                .iter()
                .map(|i| TxnOp::Put {
                    key: Bytes::from(format!("/g/{i:06}")),
                    value: Bytes::from(value.clone()),
                    lease: 0,
                })
                .collect();
            let txn = Txn {
                compares: vec![],
                success,
                failure: vec![],
            };
            store.txn(txn).await.expect("put");
        }
        let pages = |store: Arc<crate::test_store::TestStore>| async move {
            let mut sizes = Vec::new();
            let mut seen = 0;
            list_prefix_pages(store.as_ref(), b"/g/", |page, _| {
                sizes.push(page.len());
                seen += page.len();
            })
            .await
            .expect("list");
            (sizes, seen)
        };
        // 1,009-byte records (key and value): 8 MiB holds 8,313 of them.
        let cap = LIST_PAGE_BYTES / ("/g/000000".len() + value.len());
        let (sizes, seen) = pages(store.clone()).await;
        assert_eq!(seen, keys);
        assert_eq!(sizes[..4], [1000, 2000, 4000, 8000], "{sizes:?}");
        assert!(
            sizes[4..sizes.len() - 1].iter().all(|&n| n == cap),
            "{sizes:?}"
        );

        // Pages above 3,000 keys fail: each is read again from 1,000.
        store.cap_range_limit(3000);
        let (sizes, seen) = pages(store.clone()).await;
        assert_eq!(seen, keys);
        assert_eq!(sizes[..5], [1000, 2000, 1000, 2000, 1000], "{sizes:?}");
    }
}

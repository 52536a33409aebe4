//! The in-process store: etcd's semantics for `meshup demo` and single-process federations.
//!
//! One `Mutex<State>` holds the keys, the history of recent changes (with the previous value
//! of each key, so reads at a past revision work like etcd's MVCC), the leases and the
//! watchers. The lock is never held across an `.await`: every operation is a short critical
//! section, and watch fan-out uses `try_send` on bounded channels.
//!
//! Bounded memory:
//! - history keeps at most [`EmbeddedConfig::max_history_events`] events; older revisions are
//!   compacted automatically (a watch below them gets `Compacted` and relists, as with etcd);
//! - each watch has a buffer of [`EmbeddedConfig::watch_buffer`] messages; a watcher that
//!   lets it fill up has its watch cancelled (its stream ends) and resumes from its last
//!   revision, instead of making the store buffer without bound.
//!
//! Leases expire on tokio time: a reaper task, holding only a `Weak` reference, expires due
//! leases every [`REAPER_TICK`] and stops when the store is dropped.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::store::{
    Compare, Event, EventKind, KeyRange, KeyValue, LeaseId, Page, Revision, Store, StoreError,
    StoreFuture, Txn, TxnOp, TxnResult, Watch, WatchItem,
};

/// How often due leases are expired: keys vanish at most this long after their TTL.
pub const REAPER_TICK: Duration = Duration::from_millis(50);
/// Default watch buffer, in messages.
pub const DEFAULT_WATCH_BUFFER: usize = 1024;
/// Default history kept for watches and past-revision reads, in events.
pub const DEFAULT_MAX_HISTORY_EVENTS: usize = 100_000;
/// Events per message when a new watch replays history.
const REPLAY_CHUNK: usize = 512;

/// Limits of an [`EmbeddedStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmbeddedConfig {
    /// Messages a watch may have queued before it is cancelled as too slow.
    pub watch_buffer: usize,
    /// Events of history kept; older ones are compacted automatically.
    pub max_history_events: usize,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            watch_buffer: DEFAULT_WATCH_BUFFER,
            max_history_events: DEFAULT_MAX_HISTORY_EVENTS,
        }
    }
}

/// An in-process store with etcd's semantics. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    config: EmbeddedConfig,
}

#[derive(Debug, Clone)]
struct Stored {
    value: Bytes,
    create_revision: Revision,
    mod_revision: Revision,
    lease: LeaseId,
}

/// One change kept in history, with the key's previous state for past-revision reads.
#[derive(Debug)]
struct HistoryEntry {
    event: Event,
    prev: Option<Stored>,
}

#[derive(Debug)]
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: HashSet<Bytes>,
}

#[derive(Debug)]
struct Subscriber {
    id: u64,
    range: KeyRange,
    tx: mpsc::Sender<Result<WatchItem, StoreError>>,
}

#[derive(Debug)]
struct State {
    revision: Revision,
    compact_revision: Revision,
    kv: BTreeMap<Bytes, Stored>,
    history: VecDeque<HistoryEntry>,
    leases: HashMap<LeaseId, Lease>,
    next_lease: LeaseId,
    subscribers: Vec<Subscriber>,
    next_watch: u64,
}

// === impl EmbeddedStore ===

impl EmbeddedStore {
    /// A new empty store with default limits. Must be called inside a tokio runtime (it
    /// spawns the lease reaper).
    pub fn new() -> Self {
        Self::with_config(EmbeddedConfig::default())
    }

    /// A new empty store with these limits. Must be called inside a tokio runtime.
    pub fn with_config(config: EmbeddedConfig) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                // etcd starts at revision 1 with an empty keyspace.
                revision: 1,
                compact_revision: 0,
                kv: BTreeMap::new(),
                history: VecDeque::new(),
                leases: HashMap::new(),
                next_lease: 0x7e57_0000,
                subscribers: Vec::new(),
                next_watch: 1,
            }),
            config,
        });
        tokio::spawn(reap_leases(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// Number of open watches (for tests of slow-watcher cancellation).
    pub fn watch_count(&self) -> usize {
        self.inner.lock().subscribers.len()
    }

    /// Number of live leases.
    pub fn lease_count(&self) -> usize {
        self.inner.lock().leases.len()
    }
}

impl Default for EmbeddedStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-updated in a way later
        // operations misread (every mutation completes before fan-out), so poisoning is
        // ignored rather than turned into a second panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn reap_leases(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(REAPER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut state = inner.lock();
        let due: Vec<LeaseId> = state
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            state.revoke(id, &inner.config);
        }
    }
}

impl State {
    fn to_kv(key: &Bytes, s: &Stored) -> KeyValue {
        KeyValue {
            key: key.clone(),
            value: s.value.clone(),
            create_revision: s.create_revision,
            mod_revision: s.mod_revision,
            lease: s.lease,
        }
    }

    /// Applies writes as one revision, records history and fans out. Returns the revision.
    fn commit(
        &mut self,
        writes: Vec<TxnOp>,
        config: &EmbeddedConfig,
    ) -> Result<Revision, StoreError> {
        // Check every lease first so a failing transaction changes nothing.
        for op in &writes {
            if let TxnOp::Put { lease, .. } = op
                && *lease != 0
                && !self.leases.contains_key(lease)
            {
                return Err(StoreError::LeaseNotFound(*lease));
            }
        }
        let rev = self.revision + 1;
        let mut entries = Vec::new();
        for op in writes {
            match op {
                TxnOp::Put { key, value, lease } => {
                    let prev = self.kv.get(&key).cloned();
                    if let Some(p) = &prev
                        && p.lease != 0
                        && p.lease != lease
                        && let Some(l) = self.leases.get_mut(&p.lease)
                    {
                        l.keys.remove(&key);
                    }
                    if lease != 0
                        && let Some(l) = self.leases.get_mut(&lease)
                    {
                        l.keys.insert(key.clone());
                    }
                    let stored = Stored {
                        value,
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        lease,
                    };
                    let kv = Self::to_kv(&key, &stored);
                    self.kv.insert(key, stored);
                    entries.push(HistoryEntry {
                        event: Event {
                            kind: EventKind::Put,
                            kv,
                        },
                        prev,
                    });
                }
                TxnOp::Delete { key } => {
                    if let Some(prev) = self.kv.remove(&key) {
                        if prev.lease != 0
                            && let Some(l) = self.leases.get_mut(&prev.lease)
                        {
                            l.keys.remove(&key);
                        }
                        entries.push(HistoryEntry {
                            event: Event {
                                kind: EventKind::Delete,
                                kv: KeyValue {
                                    key,
                                    value: Bytes::new(),
                                    create_revision: 0,
                                    mod_revision: rev,
                                    lease: 0,
                                },
                            },
                            prev: Some(prev),
                        });
                    }
                }
                TxnOp::Get { .. } => {}
            }
        }
        if entries.is_empty() {
            // Like etcd: a transaction that changes nothing does not create a revision.
            return Ok(self.revision);
        }
        self.revision = rev;
        self.fan_out(&entries);
        self.history.extend(entries);
        // Automatic compaction keeps history bounded; compact at revision boundaries.
        while self.history.len() > config.max_history_events {
            let oldest = self.history.front().map(|e| e.event.kv.mod_revision);
            let Some(oldest) = oldest else { break };
            while self
                .history
                .front()
                .is_some_and(|e| e.event.kv.mod_revision == oldest)
            {
                self.history.pop_front();
            }
            self.compact_revision = self.compact_revision.max(oldest + 1);
        }
        Ok(rev)
    }

    /// Sends one revision's events to every matching watch; cancels watches that are full.
    fn fan_out(&mut self, entries: &[HistoryEntry]) {
        self.subscribers.retain(|sub| {
            let events: Vec<Event> = entries
                .iter()
                .filter(|e| sub.range.contains(&e.event.kv.key))
                .map(|e| e.event.clone())
                .collect();
            if events.is_empty() {
                return !sub.tx.is_closed();
            }
            match sub.tx.try_send(Ok(WatchItem::Events(events))) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Dropping the sender ends the watcher's stream after what it already
                    // has; it resumes from its last revision with a fresh watch.
                    tracing::warn!(
                        watch = sub.id,
                        "embedded store: watcher too slow, cancelling its watch"
                    );
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    fn revoke(&mut self, id: LeaseId, config: &EmbeddedConfig) -> bool {
        let Some(lease) = self.leases.remove(&id) else {
            return false;
        };
        let mut keys: Vec<Bytes> = lease.keys.into_iter().collect();
        keys.sort();
        let deletes = keys.into_iter().map(|key| TxnOp::Delete { key }).collect();
        // Deletes need no lease, so this cannot fail.
        let _ = self.commit(deletes, config);
        true
    }

    fn compare(&self, c: &Compare) -> bool {
        match c {
            Compare::Absent(key) => !self.kv.contains_key(key),
            Compare::ModRevision(key, rev) => {
                self.kv.get(key).is_some_and(|s| s.mod_revision == *rev)
            }
        }
    }

    /// The keys of `range` as of `revision`, at most `limit` (+1 to know about `more`).
    fn range_at(&self, range: &KeyRange, revision: Revision, limit: usize) -> Page {
        let upper = if range.end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(range.end.clone())
        };
        let bounds = (Bound::Included(range.start.clone()), upper);
        // Undo the changes made after `revision`, newest first, so each key ends with its
        // state at `revision`.
        let mut overlay: BTreeMap<Bytes, Option<Stored>> = BTreeMap::new();
        for entry in self.history.iter().rev() {
            if entry.event.kv.mod_revision <= revision {
                break;
            }
            if range.contains(&entry.event.kv.key) {
                overlay.insert(entry.event.kv.key.clone(), entry.prev.clone());
            }
        }
        let mut kvs = Vec::new();
        let mut current = self.kv.range::<Bytes, _>(bounds.clone()).peekable();
        let mut past = overlay.range::<Bytes, _>(bounds).peekable();
        let mut more = false;
        loop {
            let next = match (current.peek(), past.peek()) {
                (None, None) => break,
                (Some((ck, _)), Some((pk, _))) if ck == pk => {
                    current.next();
                    past.next().map(|(k, v)| (k, v.as_ref()))
                }
                (Some((ck, _)), Some((pk, _))) if pk < ck => {
                    past.next().map(|(k, v)| (k, v.as_ref()))
                }
                (Some(_), _) => current.next().map(|(k, v)| (k, Some(v))),
                (None, Some(_)) => past.next().map(|(k, v)| (k, v.as_ref())),
            };
            let Some((key, Some(stored))) = next else {
                continue;
            };
            if kvs.len() == limit {
                more = true;
                break;
            }
            kvs.push(Self::to_kv(key, stored));
        }
        Page {
            kvs,
            more,
            revision,
        }
    }
}

impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    fn revision(&self) -> StoreFuture<'_, Revision> {
        let rev = self.inner.lock().revision;
        Box::pin(async move { Ok(rev) })
    }

    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page> {
        let result = {
            let state = self.inner.lock();
            let at = revision.unwrap_or(state.revision);
            if at > state.revision {
                Err(StoreError::Rejected(format!(
                    "revision {at} is in the future (current {})",
                    state.revision
                )))
            } else if at < state.compact_revision {
                Err(StoreError::Compacted {
                    requested: at,
                    compacted: state.compact_revision,
                })
            } else {
                Ok(state.range_at(&range, at, limit.max(1)))
            }
        };
        Box::pin(async move { result })
    }

    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch> {
        let capacity = self.inner.config.watch_buffer.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let mut state = self.inner.lock();
        let id = state.next_watch;
        state.next_watch += 1;
        let start = start_revision.max(1);
        if start < state.compact_revision {
            let compact_revision = state.compact_revision;
            // The channel is new and has room for one item.
            let _ = tx.try_send(Ok(WatchItem::Compacted { compact_revision }));
            drop(state);
            return Box::pin(async move { Ok(Watch::new(rx, Box::new(|| {}))) });
        }
        // Replay history from `start`, then join the live fan-out; both happen under the
        // lock so no revision is missed or doubled.
        let replay: Vec<Event> = state
            .history
            .iter()
            .filter(|e| e.event.kv.mod_revision >= start && range.contains(&e.event.kv.key))
            .map(|e| e.event.clone())
            .collect();
        let mut registered = true;
        for chunk in replay.chunks(REPLAY_CHUNK) {
            if tx.try_send(Ok(WatchItem::Events(chunk.to_vec()))).is_err() {
                // More history than the buffer holds: end this watch; the caller resumes
                // from what it applied (or relists), like a slow watcher.
                registered = false;
                break;
            }
        }
        if registered {
            // A bookmark: the replay above and every later fan-out go through this channel
            // under the lock, so everything up to `state.revision` precedes it.
            let _ = tx.try_send(Ok(WatchItem::Progress {
                revision: state.revision,
            }));
            state.subscribers.push(Subscriber { id, range, tx });
        }
        drop(state);
        let weak = Arc::downgrade(&self.inner);
        let progress = Box::new(move || {
            let Some(inner) = weak.upgrade() else { return };
            let state = inner.lock();
            let revision = state.revision;
            // Also a bookmark: fan-out happens under this lock, so every event up to
            // `revision` is queued before it (a watch whose queue overflowed was removed).
            if let Some(sub) = state.subscribers.iter().find(|s| s.id == id) {
                // A full buffer already proves the watch is alive; dropping is fine.
                let _ = sub.tx.try_send(Ok(WatchItem::Progress { revision }));
            }
        });
        Box::pin(async move { Ok(Watch::new(rx, progress)) })
    }

    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        // Like etcd: whole seconds, at least one.
        let ttl = Duration::from_secs(ttl.as_secs_f64().ceil().max(1.0) as u64);
        let mut state = self.inner.lock();
        state.next_lease += 1;
        let id = state.next_lease;
        state.leases.insert(
            id,
            Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: HashSet::new(),
            },
        );
        drop(state);
        Box::pin(async move { Ok(id) })
    }

    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, Duration> {
        let result = {
            let mut state = self.inner.lock();
            match state.leases.get_mut(&lease) {
                Some(l) => {
                    l.deadline = Instant::now() + l.ttl;
                    Ok(l.ttl)
                }
                None => Err(StoreError::LeaseNotFound(lease)),
            }
        };
        Box::pin(async move { result })
    }

    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        let found = self.inner.lock().revoke(lease, &self.inner.config);
        Box::pin(async move {
            if found {
                Ok(())
            } else {
                Err(StoreError::LeaseNotFound(lease))
            }
        })
    }

    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult> {
        let result = {
            let mut state = self.inner.lock();
            let succeeded = txn.compares.iter().all(|c| state.compare(c));
            let ops = if succeeded { txn.success } else { txn.failure };
            let gets = ops
                .iter()
                .filter_map(|op| match op {
                    TxnOp::Get { key } => Some(state.kv.get(key).map(|s| State::to_kv(key, s))),
                    _ => None,
                })
                .collect();
            let writes: Vec<TxnOp> = ops
                .into_iter()
                .filter(|op| !matches!(op, TxnOp::Get { .. }))
                .collect();
            state
                .commit(writes, &self.inner.config)
                .map(|revision| TxnResult {
                    succeeded,
                    revision,
                    gets,
                })
        };
        Box::pin(async move { result })
    }

    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()> {
        let result = {
            let mut state = self.inner.lock();
            if revision > state.revision {
                Err(StoreError::Rejected(format!(
                    "cannot compact at {revision}: beyond the current revision {}",
                    state.revision
                )))
            } else if revision <= state.compact_revision {
                Err(StoreError::Compacted {
                    requested: revision,
                    compacted: state.compact_revision,
                })
            } else {
                while state
                    .history
                    .front()
                    .is_some_and(|e| e.event.kv.mod_revision < revision)
                {
                    state.history.pop_front();
                }
                state.compact_revision = revision;
                Ok(())
            }
        };
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{get, put};

    #[tokio::test]
    async fn reads_at_past_revisions_see_the_past() {
        let store = EmbeddedStore::new();
        let r1 = put(&store, "/k/a", "1", 0).await.expect("put");
        let _ = put(&store, "/k/b", "1", 0).await.expect("put");
        let _ = put(&store, "/k/a", "2", 0).await.expect("put");
        let _ = crate::store::delete(&store, "/k/b").await.expect("delete");
        let page = store
            .range(KeyRange::prefix("/k/"), Some(r1), 10)
            .await
            .expect("range");
        assert_eq!(page.kvs.len(), 1);
        assert_eq!(page.kvs[0].value, Bytes::from_static(b"1"));
        let now = store
            .range(KeyRange::prefix("/k/"), None, 10)
            .await
            .expect("range");
        assert_eq!(now.kvs.len(), 1);
        assert_eq!(now.kvs[0].value, Bytes::from_static(b"2"));
        assert_eq!(get(&store, "/k/b").await.expect("get"), None);
    }

    #[tokio::test]
    async fn a_slow_watcher_is_cancelled_not_buffered_forever() {
        let store = EmbeddedStore::with_config(EmbeddedConfig {
            watch_buffer: 4,
            max_history_events: 1000,
        });
        let mut watch = store
            .watch(KeyRange::prefix("/k/"), 1)
            .await
            .expect("watch");
        for i in 0..10 {
            put(&store, format!("/k/{i}"), "v", 0).await.expect("put");
        }
        assert_eq!(store.watch_count(), 0, "the slow watch was cancelled");
        let mut seen = 0;
        while let Some(item) = watch.next().await {
            if let Ok(WatchItem::Events(e)) = item {
                seen += e.len();
            }
        }
        assert!(seen < 10, "the stream ended early ({seen} events)");
    }

    #[tokio::test]
    async fn history_is_bounded_by_automatic_compaction() {
        let store = EmbeddedStore::with_config(EmbeddedConfig {
            watch_buffer: 16,
            max_history_events: 5,
        });
        for i in 0..20 {
            put(&store, format!("/k/{i}"), "v", 0).await.expect("put");
        }
        let mut watch = store
            .watch(KeyRange::prefix("/k/"), 2)
            .await
            .expect("watch");
        assert!(matches!(
            watch.next().await,
            Some(Ok(WatchItem::Compacted { .. }))
        ));
    }
}

//! The watcher: keeps an `Arc<Snapshot>` of the catalog current, from the store.
//!
//! One task owns the snapshot. It lists the whole catalog at one revision, publishes the
//! snapshot, then watches from that revision + 1 and applies every event in order:
//!
//! - events at or below the applied revision are dropped (no duplicates; the snapshot's
//!   revision only moves forward);
//! - two revisions are kept apart. The snapshot's `revision` is the revision of the data:
//!   the list revision or the last applied event. The **resume revision** is how far the
//!   watch is known to be complete: the maximum of the snapshot's revision and every
//!   bookmark ([`WatchItem::Progress`]) received. etcd revisions are store-wide, so on a
//!   shared etcd a quiet catalog's last event soon falls below the compaction point while
//!   bookmarks keep up with the store; resuming from the last event would make every
//!   gateway relist the whole catalog after any broken watch (a thundering herd);
//! - a broken stream (error, end, or a stall: no event and no progress answer for
//!   [`WatcherConfig::stall_timeout`] although progress is requested every
//!   [`WatcherConfig::progress_interval`]) is resumed from the resume revision + 1;
//! - `Compacted` (the resume point is gone) triggers one relist: the new snapshot is built
//!   from scratch on the side and published once, so deletions that happened meanwhile are
//!   reconciled only after the full list, atomically;
//! - while the store is unreachable the last snapshot keeps being served;
//!   [`WatcherStatus::last_contact`] and the `catalog_staleness_seconds` gauge say how old it
//!   is.
//!
//! Stop it with the `CancellationToken` given to [`Watcher::spawn`], or drop the [`Watcher`]
//! (its tasks are aborted).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use meshup_core::catalog::{Batch, Snapshot};
use meshup_core::model::AddressRules;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::keys::KeyLayout;
use crate::reducer::{self, Outcome, SkipReason};
use crate::store::{
    self, Event, EventKind, KeyRange, Revision, Store, StoreError, Watch, WatchItem,
};

/// Default stall timeout: no message for this long and the watch is reconnected.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between progress requests on an idle watch.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(3);
/// An open watch hears from the store at least every [`DEFAULT_PROGRESS_INTERVAL`]; no word
/// for this long and the store counts as silent ([`WatcherStatus::silent_since`]).
pub const SILENT_AFTER: Duration = DEFAULT_PROGRESS_INTERVAL.saturating_add(Duration::from_secs(1));
/// Longest pause between retries while the store is unreachable. It bounds how long a
/// gateway stays behind once etcd is back: a change converges within one publisher retry,
/// one watcher retry and the write itself, 3 s after quorum returns at most
/// (docs/reliability.md, "quorum lost"). With 2 s each, changes took 3.3 s.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Status updates for mere contact (no other change) are published at most this often.
const CONTACT_PUBLISH_INTERVAL: Duration = Duration::from_millis(250);
/// How often the staleness gauge is refreshed.
const STALENESS_TICK: Duration = Duration::from_millis(500);

/// Tuning of a [`Watcher`].
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    pub stall_timeout: Duration,
    pub progress_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for WatcherConfig {
    fn default() -> Self {
        Self {
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            backoff_min: Duration::from_millis(100),
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

/// What the watcher knows about its own health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherStatus {
    /// The first full list has been applied: the snapshot is the catalog, not a fragment.
    pub synced: bool,
    /// A watch is open and answering.
    pub connected: bool,
    /// Relists after the first list (each one follows a compaction).
    pub relists: u64,
    /// Watches re-opened after a broken or stalled stream.
    pub watch_restarts: u64,
    /// Revision of the published snapshot.
    pub revision: Revision,
    /// Last successful answer from the store (list, event or progress).
    pub last_contact: Option<Instant>,
    /// The last error, for the admin page.
    pub last_error: Option<String>,
}

impl WatcherStatus {
    /// How long ago the store last answered (`None` before the first answer).
    pub fn staleness(&self) -> Option<Duration> {
        self.last_contact.map(|t| t.elapsed())
    }

    /// The store's last answer if it has gone silent since: no watch open, or none of its
    /// answers for [`SILENT_AFTER`] (`None` while it answers, and before its first answer).
    pub fn silent_since(&self, now: Instant) -> Option<Instant> {
        let last = self.last_contact?;
        (!self.connected || now.saturating_duration_since(last) > SILENT_AFTER).then_some(last)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// The watcher's Prometheus metrics. Clones share the series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    skipped: Family<ReasonLabels, Counter>,
    relists: Counter,
    watch_restarts: Counter,
    staleness_seconds: Gauge<f64, AtomicU64>,
    revision: Gauge,
    resume_revision: Gauge,
    exports: Gauge,
}

impl Metrics {
    /// Creates the series and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for reason in SkipReason::ALL {
            // Pre-create every series so dashboards show 0, not "no data".
            let _ = m.skipped.get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            });
        }
        registry.register(
            "catalog_skipped_records",
            "Catalog keys skipped because the key or value is bad, by reason",
            m.skipped.clone(),
        );
        registry.register(
            "catalog_relists",
            "Full relists after a compaction",
            m.relists.clone(),
        );
        registry.register(
            "catalog_watch_restarts",
            "Catalog watches reopened after a broken or stalled stream",
            m.watch_restarts.clone(),
        );
        registry.register(
            "catalog_staleness_seconds",
            "Seconds since the catalog store last answered the watcher",
            m.staleness_seconds.clone(),
        );
        registry.register(
            "catalog_revision",
            "Store revision of the served catalog",
            m.revision.clone(),
        );
        registry.register(
            "catalog_resume_revision",
            "Store revision a broken catalog watch resumes after (advanced by progress answers)",
            m.resume_revision.clone(),
        );
        registry.register(
            "catalog_exports",
            "Export records in the served catalog",
            m.exports.clone(),
        );
        m
    }

    /// Skipped records so far for one reason (for tests and the admin page).
    pub fn skipped(&self, reason: SkipReason) -> u64 {
        self.skipped
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    /// Relists so far.
    pub fn relists(&self) -> u64 {
        self.relists.get()
    }

    /// The revision a broken watch resumes after (for tests and the admin page).
    pub fn resume_revision(&self) -> Revision {
        self.resume_revision.get()
    }

    /// The staleness gauge's current value.
    pub fn staleness_seconds(&self) -> f64 {
        self.staleness_seconds.get()
    }
}

/// A running watcher: the snapshot and status channels, and its tasks.
#[derive(Debug)]
pub struct Watcher {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<WatcherStatus>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watcher {
    /// Starts watching `layout.root()` of `store`. Stops when `cancel` fires or the returned
    /// value is dropped.
    pub fn spawn(
        store: Arc<dyn Store>,
        layout: KeyLayout,
        rules: AddressRules,
        config: WatcherConfig,
        metrics: Metrics,
        cancel: CancellationToken,
    ) -> Self {
        let (snap_tx, snapshots) = watch::channel(Arc::new(Snapshot::new()));
        let initial = WatcherStatus {
            synced: false,
            connected: false,
            relists: 0,
            watch_restarts: 0,
            revision: 0,
            last_contact: None,
            last_error: None,
        };
        let (status_tx, status) = watch::channel(initial.clone());
        let run = Run {
            store,
            layout,
            rules,
            backoff: Backoff::new(config.backoff_min, config.backoff_max),
            config,
            metrics: metrics.clone(),
            snapshot: Snapshot::new(),
            resume_rev: 0,
            snap_tx,
            status: initial,
            status_tx,
            last_status_publish: Instant::now(),
        };
        let main = tokio::spawn(run.run(cancel.clone()));
        let gauge = tokio::spawn(track_staleness(status.clone(), metrics, cancel));
        Self {
            snapshots,
            status,
            tasks: vec![main, gauge],
        }
    }

    /// The snapshot channel: the current catalog, replaced on every change.
    ///
    /// Clone the `Arc` out of `borrow()` and drop the guard at once: a `Ref` (also the one
    /// `wait_for` returns) held across an `.await` blocks the watcher's next publish.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshots.clone()
    }

    /// The status channel.
    pub fn status(&self) -> watch::Receiver<WatcherStatus> {
        self.status.clone()
    }

    /// Waits until the first full list is applied (or the watcher stopped).
    pub async fn wait_synced(&self) -> bool {
        let mut status = self.status.clone();
        status.wait_for(|s| s.synced).await.is_ok()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn track_staleness(
    mut status: watch::Receiver<WatcherStatus>,
    metrics: Metrics,
    cancel: CancellationToken,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(STALENESS_TICK);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = status.changed() => if changed.is_err() { return },
        }
        let since = status.borrow().last_contact.unwrap_or(started);
        metrics.staleness_seconds.set(since.elapsed().as_secs_f64());
    }
}

/// How one watch ended.
enum WatchEnd {
    Compacted,
    Broken(String),
    Cancelled,
}

/// The watcher task's state; only this task touches it.
struct Run {
    store: Arc<dyn Store>,
    layout: KeyLayout,
    rules: AddressRules,
    config: WatcherConfig,
    backoff: Backoff,
    metrics: Metrics,
    snapshot: Snapshot,
    /// Every event of the catalog up to this revision is in `snapshot`: the watch resumes
    /// after it. At least `snapshot.revision`; ahead of it after bookmarks on a quiet
    /// catalog. Only a relist sets it back (a store restored from an older backup).
    resume_rev: Revision,
    snap_tx: watch::Sender<Arc<Snapshot>>,
    status: WatcherStatus,
    status_tx: watch::Sender<WatcherStatus>,
    last_status_publish: Instant,
}

impl Run {
    async fn run(mut self, cancel: CancellationToken) {
        let mut need_list = true;
        loop {
            if need_list {
                // Each page is reduced as it arrives, into a batch that derives every
                // service's view once at the end: the raw list is never held whole.
                let mut fresh = Batch::default();
                let mut keys = 0;
                let (layout, rules, metrics) = (&self.layout, &self.rules, &self.metrics);
                let listed = tokio::select! {
                    () = cancel.cancelled() => return,
                    r = store::list_prefix_pages(self.store.as_ref(), layout.root().as_bytes(), |page, first| {
                        if first {
                            fresh = Batch::default();
                            keys = 0;
                        }
                        keys += page.len();
                        for kv in page {
                            let outcome = reducer::reduce(layout, rules, &kv.key, Some(&kv.value));
                            apply_outcome(&mut fresh, outcome, &kv.key, metrics);
                        }
                    }) => r,
                };
                match listed {
                    Ok(revision) => {
                        self.replace(fresh, keys, revision);
                        need_list = false;
                        self.backoff.reset();
                    }
                    Err(e) => {
                        self.lost_contact(&e.to_string());
                        if !self.pause(&cancel).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let from = self.resume_rev + 1;
            let watch = tokio::select! {
                () = cancel.cancelled() => return,
                w = self.store.watch(KeyRange::prefix(self.layout.root().to_owned()), from) => w,
            };
            let end = match watch {
                Ok(watch) => self.follow(watch, &cancel).await,
                Err(StoreError::Compacted { .. }) => WatchEnd::Compacted,
                Err(e) => WatchEnd::Broken(e.to_string()),
            };
            match end {
                WatchEnd::Cancelled => return,
                WatchEnd::Compacted => {
                    tracing::warn!(
                        revision = self.snapshot.revision,
                        resume = self.resume_rev,
                        "catalog watch fell below the compaction point; relisting"
                    );
                    need_list = true;
                }
                WatchEnd::Broken(reason) => {
                    tracing::warn!(
                        revision = self.snapshot.revision,
                        resume = self.resume_rev,
                        %reason,
                        "catalog watch broken; resuming"
                    );
                    self.status.watch_restarts += 1;
                    self.metrics.watch_restarts.inc();
                    self.lost_contact(&reason);
                    if !self.pause(&cancel).await {
                        return;
                    }
                }
            }
        }
    }

    /// Sleeps for the next backoff delay; false if cancelled meanwhile.
    async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.backoff.next_delay();
        tokio::select! {
            () = cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Follows one watch until it ends.
    async fn follow(&mut self, mut watch: Watch, cancel: &CancellationToken) -> WatchEnd {
        let mut progress = tokio::time::interval(self.config.progress_interval);
        progress.reset(); // The first tick would fire at once; the watch just started.
        let mut deadline = tokio::time::Instant::now() + self.config.stall_timeout;
        loop {
            let item = tokio::select! {
                () = cancel.cancelled() => return WatchEnd::Cancelled,
                _ = progress.tick() => {
                    watch.request_progress();
                    continue;
                }
                item = tokio::time::timeout_at(deadline, watch.next()) => item,
            };
            let item = match item {
                Err(_) => {
                    return WatchEnd::Broken(format!(
                        "watch stalled: no event or progress for {:?}",
                        self.config.stall_timeout
                    ));
                }
                Ok(None) => return WatchEnd::Broken("watch stream ended".into()),
                Ok(Some(Err(StoreError::Compacted { .. }))) => return WatchEnd::Compacted,
                Ok(Some(Err(e))) => return WatchEnd::Broken(e.to_string()),
                Ok(Some(Ok(item))) => item,
            };
            deadline = tokio::time::Instant::now() + self.config.stall_timeout;
            match item {
                WatchItem::Compacted { .. } => return WatchEnd::Compacted,
                WatchItem::Progress { revision } => {
                    self.advance_resume(revision);
                    self.contact(false);
                }
                WatchItem::Alive => self.contact(false),
                WatchItem::Events(events) => {
                    self.apply_events(events);
                    self.backoff.reset();
                }
            }
        }
    }

    /// Applies one watch message and publishes the result once.
    fn apply_events(&mut self, events: Vec<Event>) {
        // One revision can carry several events (a transaction, a lease expiry); they all
        // arrive in one message, so duplicates are judged against the revision applied
        // before this message, not against the event just applied.
        let before = self.snapshot.revision;
        let mut applied = before;
        let mut batch = Batch::new(std::mem::take(&mut self.snapshot));
        for event in events {
            let rev = event.kv.mod_revision;
            if rev <= before || rev < applied {
                // Already applied (a resumed watch may repeat the boundary revision).
                tracing::debug!(rev, applied = before, "dropping duplicate catalog event");
                continue;
            }
            let value = match event.kind {
                EventKind::Put => Some(&event.kv.value[..]),
                EventKind::Delete => None,
            };
            let outcome = reducer::reduce(&self.layout, &self.rules, &event.kv.key, value);
            apply_outcome(&mut batch, outcome, &event.kv.key, &self.metrics);
            applied = rev;
        }
        batch.set_revision(applied);
        self.snapshot = batch.finish();
        if self.snapshot.revision != before {
            self.publish();
        }
        self.advance_resume(self.snapshot.revision);
        self.contact(false);
    }

    /// Moves the resume point forward (never back: bookmarks may repeat or lag).
    fn advance_resume(&mut self, revision: Revision) {
        let next = self.resume_rev.max(revision);
        if next != self.resume_rev {
            self.resume_rev = next;
            self.metrics.resume_revision.set(next);
        }
    }

    /// Replaces the whole view with a fresh list of `keys` keys (first sync or relist after
    /// compaction), reduced into `fresh`.
    fn replace(&mut self, mut fresh: Batch, keys: usize, revision: Revision) {
        fresh.set_revision(revision);
        let fresh = fresh.finish();
        if revision < self.snapshot.revision {
            // Only possible if the store itself went back (restored from an older backup):
            // the store is the source of truth, so its view wins.
            tracing::error!(
                listed = revision,
                served = self.snapshot.revision,
                "catalog store revision went backwards (etcd restored from a backup?); adopting the store's view"
            );
        }
        self.snapshot = fresh;
        // Set, not advanced: after a store that went back, the old resume point is invalid.
        self.resume_rev = revision;
        self.metrics.resume_revision.set(revision);
        if self.status.synced {
            self.status.relists += 1;
            self.metrics.relists.inc();
        }
        tracing::info!(
            revision,
            keys,
            exports = self.snapshot.export_count(),
            "catalog listed"
        );
        self.status.synced = true;
        self.publish();
        self.contact(true);
    }

    fn publish(&mut self) {
        self.metrics.revision.set(self.snapshot.revision);
        self.metrics
            .exports
            .set(i64::try_from(self.snapshot.export_count()).unwrap_or(i64::MAX));
        self.snap_tx.send_replace(Arc::new(self.snapshot.clone()));
        self.status.revision = self.snapshot.revision;
    }

    /// Records a successful answer from the store.
    fn contact(&mut self, force: bool) {
        let now = Instant::now();
        let changed =
            !self.status.connected || self.status.revision != self.status_tx.borrow().revision;
        self.status.connected = true;
        self.status.last_contact = Some(now);
        self.status.last_error = None;
        if force
            || changed
            || now.duration_since(self.last_status_publish) >= CONTACT_PUBLISH_INTERVAL
        {
            self.last_status_publish = now;
            self.status_tx.send_replace(self.status.clone());
        }
    }

    fn lost_contact(&mut self, error: &str) {
        self.status.connected = false;
        self.status.last_error = Some(error.to_owned());
        self.status_tx.send_replace(self.status.clone());
    }
}

/// Applies a reducer outcome, logging and counting skipped keys.
fn apply_outcome(batch: &mut Batch, outcome: Outcome, key: &[u8], metrics: &Metrics) {
    match outcome {
        Outcome::Apply(change) => {
            batch.apply(change);
        }
        Outcome::Ignore => {}
        Outcome::Skip {
            reason,
            detail,
            retract,
        } => {
            tracing::warn!(
                key = %String::from_utf8_lossy(key),
                reason = reason.as_str(),
                %detail,
                "skipping catalog record"
            );
            metrics
                .skipped
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .inc();
            if let Some(change) = retract {
                batch.apply(change);
            }
        }
    }
}

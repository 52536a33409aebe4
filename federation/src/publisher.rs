//! The publisher: a gateway's own records in the catalog, bound to its lease.
//!
//! One task owns the lease and the desired records. It
//! - grants a lease and writes the gateway record and every export under it;
//! - keeps the lease alive (every TTL/3); when the store says the lease is gone (expired,
//!   revoked, lost with an etcd data loss), or the lease must have expired because no
//!   keep-alive got through for a whole TTL, it grants a new lease and re-publishes;
//! - re-asserts its records every [`PublisherConfig::anti_entropy_interval`] and on every
//!   change: it lists its own key prefix, writes what differs (value or lease) and deletes
//!   its own keys that should not exist (anti-entropy);
//! - retries with bounded backoff. The caller never waits on the store: updates go through a
//!   `watch` channel and the task picks up the latest.
//!
//! Stopping: [`PublisherHandle::shutdown`] revokes the lease (records vanish at once) and
//! waits for the task; the `CancellationToken` does the same; dropping the handle (or
//! [`PublisherHandle::abort`]) stops the task *without* revoking, like a crash: the records
//! expire with the lease.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use meshup_core::catalog::ExportKey;
use meshup_core::model::{ExportRecord, GatewayRecord, encode};
use meshup_core::names::ServiceKey;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::keys::KeyLayout;
use crate::store::{self, LeaseId, Store, StoreError, Txn, TxnOp};

/// Default lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default interval between anti-entropy passes.
pub const DEFAULT_ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(30);
/// Most operations in one write transaction (etcd's default limit is 128).
const MAX_TXN_OPS: usize = 64;
/// Most value bytes in one write transaction (etcd's default request limit is 1.5 MiB).
const MAX_TXN_BYTES: usize = 1024 * 1024;
/// How long shutdown waits for the lease revocation.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Tuning of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    pub lease_ttl: Duration,
    pub anti_entropy_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            lease_ttl: DEFAULT_LEASE_TTL,
            anti_entropy_interval: DEFAULT_ANTI_ENTROPY_INTERVAL,
            backoff_min: Duration::from_millis(100),
            // One retry gap of the convergence bound after an outage (see there).
            backoff_max: crate::watcher::DEFAULT_BACKOFF_MAX,
        }
    }
}

/// What the publisher has achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherStatus {
    /// The current lease, if one is held.
    pub lease: Option<LeaseId>,
    /// The store matched the desired records at the end of the last pass.
    pub in_sync: bool,
    /// Leases granted so far (more than one means a lease was lost and records republished).
    pub leases_granted: u64,
    /// Records written (puts and deletes) by all passes so far.
    pub writes: u64,
    /// The last pass that matched the store wrote the gateway record as draining.
    pub draining_written: bool,
    /// The last error, for the admin page.
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

/// The publisher's Prometheus metrics. Clones share the series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    errors: Family<ErrorLabels, Counter>,
    lease_grants: Counter,
    writes: Counter,
}

impl Metrics {
    /// Creates the series and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "catalog_publish_errors",
            "Failed catalog publish operations, by error kind",
            m.errors.clone(),
        );
        registry.register(
            "catalog_lease_grants",
            "Leases granted to this gateway",
            m.lease_grants.clone(),
        );
        registry.register(
            "catalog_publish_writes",
            "Own catalog records written or deleted",
            m.writes.clone(),
        );
        m
    }

    /// Publish errors so far (all kinds).
    pub fn errors(&self) -> u64 {
        [
            "unavailable",
            "timeout",
            "compacted",
            "lease_not_found",
            "rejected",
            "config",
            "closed",
        ]
        .into_iter()
        .map(|error| self.errors.get_or_create(&ErrorLabels { error }).get())
        .sum()
    }
}

/// What the gateway wants published.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    gateway: GatewayRecord,
    exports: BTreeMap<ServiceKey, ExportRecord>,
    /// No writes while set (the lease is still kept alive): a successor process publishes
    /// the same keys during a hand-over.
    paused: bool,
}

/// Builder of a publisher task.
#[derive(Debug)]
pub struct Publisher {
    store: Arc<dyn Store>,
    layout: KeyLayout,
    desired: Desired,
    config: PublisherConfig,
    metrics: Metrics,
}

impl Publisher {
    /// A publisher of `gateway` (its cluster and id name the keys) with no exports yet.
    pub fn new(store: Arc<dyn Store>, layout: KeyLayout, gateway: GatewayRecord) -> Self {
        Self {
            store,
            layout,
            desired: Desired {
                gateway,
                exports: BTreeMap::new(),
                paused: false,
            },
            config: PublisherConfig::default(),
            metrics: Metrics::default(),
        }
    }

    /// The initial exports.
    pub fn with_exports(
        mut self,
        exports: impl IntoIterator<Item = (ServiceKey, ExportRecord)>,
    ) -> Self {
        self.desired.exports = exports.into_iter().collect();
        self
    }

    /// Tuning.
    pub fn with_config(mut self, config: PublisherConfig) -> Self {
        self.config = config;
        self
    }

    /// Metrics (default: unregistered).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Starts the task. It stops (revoking the lease) on `cancel` or
    /// [`PublisherHandle::shutdown`], and stops without revoking when the handle is dropped.
    pub fn spawn(self, cancel: CancellationToken) -> PublisherHandle {
        let (desired_tx, desired_rx) = watch::channel(self.desired.clone());
        let (status_tx, status) = watch::channel(PublisherStatus::default());
        let stop = cancel.child_token();
        let task = Task {
            store: self.store,
            layout: self.layout,
            backoff: Backoff::new(self.config.backoff_min, self.config.backoff_max),
            config: self.config,
            metrics: self.metrics,
            desired: desired_rx,
            status: PublisherStatus::default(),
            status_tx,
            lease: None,
            stale_leases: Vec::new(),
            kept_alive_at: tokio::time::Instant::now(),
        };
        let join = tokio::spawn(task.run(stop.clone()));
        PublisherHandle {
            desired: desired_tx,
            status,
            stop,
            join: Some(join),
        }
    }
}

/// Controls a running publisher. Never blocks on the store.
#[derive(Debug)]
pub struct PublisherHandle {
    desired: watch::Sender<Desired>,
    status: watch::Receiver<PublisherStatus>,
    stop: CancellationToken,
    join: Option<JoinHandle<()>>,
}

impl PublisherHandle {
    /// Replaces the exports; the task publishes the difference.
    pub fn set_exports(&self, exports: impl IntoIterator<Item = (ServiceKey, ExportRecord)>) {
        let exports: BTreeMap<_, _> = exports.into_iter().collect();
        self.desired.send_if_modified(|d| {
            let changed = d.exports != exports;
            d.exports = exports;
            changed
        });
    }

    /// Sets the gateway's `draining` flag (peers stop opening new streams to it).
    pub fn set_draining(&self, draining: bool) {
        self.desired.send_if_modified(|d| {
            let changed = d.gateway.draining != draining;
            d.gateway.draining = draining;
            changed
        });
    }

    /// Stops (`true`) or resumes (`false`) every write; the lease is kept alive either way.
    /// A gateway handing its node over to a successor process pauses, so the two never
    /// fight over the keys they share; resuming re-asserts every record at once.
    pub fn set_paused(&self, paused: bool) {
        self.desired.send_if_modified(|d| {
            let changed = d.paused != paused;
            d.paused = paused;
            changed
        });
    }

    /// Re-asserts every record now (value and lease), as the periodic anti-entropy pass does:
    /// a successor calls it once its predecessor has paused, so keys the predecessor wrote
    /// last are moved to this gateway's lease before that lease is revoked.
    pub fn reassert(&self) {
        self.desired.send_modify(|_| {});
    }

    /// Waits (at most `within`) until the store holds this gateway's record marked draining
    /// ([`Self::set_draining`]), so peers watching it see the mark before the records go;
    /// returns whether it does.
    pub async fn draining_written(&self, within: Duration) -> bool {
        let mut status = self.status.clone();
        let written = status.wait_for(|s| s.in_sync && s.draining_written);
        matches!(tokio::time::timeout(within, written).await, Ok(Ok(_)))
    }

    /// The publisher's status channel.
    pub fn status(&self) -> watch::Receiver<PublisherStatus> {
        self.status.clone()
    }

    /// Revokes the lease (the records vanish at once) and waits for the task to end.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }

    /// Stops the task at once without revoking: the records expire with the lease, as if
    /// the gateway had crashed.
    pub fn abort(mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

impl Drop for PublisherHandle {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

/// A lease held by the task.
#[derive(Debug, Clone, Copy)]
struct HeldLease {
    id: LeaseId,
    /// When the lease expires if no further keep-alive gets through.
    expires: Instant,
}

/// The publisher task's state; only this task touches it.
struct Task {
    store: Arc<dyn Store>,
    layout: KeyLayout,
    config: PublisherConfig,
    backoff: Backoff,
    metrics: Metrics,
    desired: watch::Receiver<Desired>,
    status: PublisherStatus,
    status_tx: watch::Sender<PublisherStatus>,
    lease: Option<HeldLease>,
    /// Leases given up locally (no keep-alive for a TTL) that may still exist in the store,
    /// revoked best-effort once the records moved to the new lease.
    stale_leases: Vec<LeaseId>,
    /// When the last keep-alive was sent (or the lease granted): a long reconcile sends
    /// the keep-alives that come due while it writes.
    kept_alive_at: tokio::time::Instant,
}

impl Task {
    /// How often the lease is kept alive: a third of its TTL.
    fn keep_alive_every(&self) -> Duration {
        (self.config.lease_ttl / 3).max(Duration::from_millis(200))
    }

    async fn run(mut self, stop: CancellationToken) {
        let mut keep_alive = tokio::time::interval(self.keep_alive_every());
        let mut anti_entropy = tokio::time::interval(self.config.anti_entropy_interval);
        keep_alive.reset();
        anti_entropy.reset();
        let mut dirty = true;
        loop {
            if self.lease.is_none() {
                match self.store.grant_lease(self.config.lease_ttl).await {
                    Ok(id) => {
                        tracing::info!(lease = format!("{id:x}"), "catalog lease granted");
                        self.lease = Some(HeldLease {
                            id,
                            expires: Instant::now() + self.config.lease_ttl,
                        });
                        self.status.lease = Some(id);
                        self.status.leases_granted += 1;
                        self.metrics.lease_grants.inc();
                        dirty = true;
                        keep_alive.reset();
                        self.kept_alive_at = tokio::time::Instant::now();
                    }
                    Err(e) => {
                        self.failed(&e);
                        if !self.pause(&stop).await {
                            return self.finish().await;
                        }
                        continue;
                    }
                }
            }
            // A failed pass is retried after a backoff delay, but from the select below, so
            // keep-alives continue while the store refuses writes.
            let mut retry_in = None;
            // Paused: nothing is written (the change is marked seen, so the loop waits for
            // the next one) and the records are re-asserted when it resumes.
            let paused = dirty && self.desired.borrow_and_update().paused;
            if dirty && !paused {
                match self.reconcile().await {
                    Ok(()) => {
                        dirty = false;
                        self.backoff.reset();
                        self.status.in_sync = true;
                        self.status.last_error = None;
                        self.status_tx.send_replace(self.status.clone());
                        self.revoke_stale().await;
                    }
                    Err(e) => {
                        self.failed(&e);
                        if matches!(e, StoreError::LeaseNotFound(_)) {
                            self.lease_lost("store reports the lease gone while writing");
                            if !self.pause(&stop).await {
                                return self.finish().await;
                            }
                            continue;
                        }
                        retry_in = Some(self.backoff.next_delay());
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return self.finish().await,
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        // The handle is gone; the task is being aborted.
                        return;
                    }
                    dirty = true;
                }
                _ = anti_entropy.tick() => dirty = true,
                _ = keep_alive.tick() => self.keep_alive().await,
                () = tokio::time::sleep(retry_in.unwrap_or_default()), if retry_in.is_some() => {}
            }
        }
    }

    async fn keep_alive(&mut self) {
        let Some(lease) = self.lease else { return };
        self.kept_alive_at = tokio::time::Instant::now();
        match self.store.keep_alive(lease.id).await {
            Ok(ttl) => {
                if let Some(l) = self.lease.as_mut() {
                    l.expires = Instant::now() + ttl;
                }
            }
            Err(StoreError::LeaseNotFound(_)) => {
                self.lease_lost("store reports the lease gone");
                self.metrics
                    .errors
                    .get_or_create(&ErrorLabels {
                        error: "lease_not_found",
                    })
                    .inc();
            }
            Err(e) => {
                self.failed(&e);
                if Instant::now() >= lease.expires {
                    // No keep-alive got through for a whole TTL: if the store was up, the
                    // lease expired. Grant a new one as soon as the store answers; the old one
                    // is revoked afterwards in case it survived (an etcd restart restores
                    // leases at their full TTL).
                    self.stale_leases.push(lease.id);
                    self.lease_lost("no keep-alive got through for a whole TTL");
                }
            }
        }
    }

    fn lease_lost(&mut self, why: &str) {
        if let Some(lease) = self.lease.take() {
            tracing::warn!(
                lease = format!("{:x}", lease.id),
                why,
                "catalog lease lost; will re-grant and re-publish"
            );
        }
        self.status.lease = None;
        self.status.in_sync = false;
        self.status_tx.send_replace(self.status.clone());
    }

    async fn revoke_stale(&mut self) {
        for id in std::mem::take(&mut self.stale_leases) {
            // Best effort: the lease most likely expired already.
            let _ = tokio::time::timeout(REVOKE_TIMEOUT, self.store.revoke_lease(id)).await;
        }
    }

    /// Makes the store match the desired records: one list of the own prefix, then batched
    /// writes of what differs.
    async fn reconcile(&mut self) -> Result<(), StoreError> {
        let Some(lease) = self.lease else {
            return Err(StoreError::LeaseNotFound(0));
        };
        let desired = self.desired.borrow_and_update().clone();
        let wanted = desired_keys(&self.layout, &desired);
        let own = self
            .layout
            .gateway(&desired.gateway.cluster, &desired.gateway.gateway_id);
        let (actual, _) = store::list_prefix(self.store.as_ref(), own.as_bytes()).await?;
        let ops = plan(&own, &wanted, &actual, lease.id);
        let count = ops.len() as u64;
        for batch in batches(ops) {
            // Writing 10,000 records to a loaded store can take longer than the lease's
            // TTL: keep it alive between batches, or it expires halfway and every attempt
            // starts over under a new lease, never done (seen at 100 clusters × 10,000
            // services, docs/scale.md).
            if self.kept_alive_at.elapsed() >= self.keep_alive_every() {
                self.keep_alive().await;
                if self.lease.map(|l| l.id) != Some(lease.id) {
                    return Err(StoreError::LeaseNotFound(lease.id));
                }
            }
            self.store
                .txn(Txn {
                    compares: vec![],
                    success: batch,
                    failure: vec![],
                })
                .await?;
        }
        if count > 0 {
            tracing::debug!(writes = count, "catalog records re-asserted");
        }
        self.status.writes += count;
        self.status.draining_written = desired.gateway.draining;
        self.metrics.writes.inc_by(count);
        Ok(())
    }

    fn failed(&mut self, e: &StoreError) {
        tracing::warn!(error = %e, "catalog publish failed; retrying");
        self.metrics
            .errors
            .get_or_create(&ErrorLabels { error: e.label() })
            .inc();
        self.status.in_sync = false;
        self.status.last_error = Some(e.to_string());
        self.status_tx.send_replace(self.status.clone());
    }

    async fn pause(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.backoff.next_delay();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Revokes the lease so the records vanish now rather than after the TTL.
    async fn finish(mut self) {
        if let Some(lease) = self.lease.take() {
            match tokio::time::timeout(REVOKE_TIMEOUT, self.store.revoke_lease(lease.id)).await {
                Ok(Ok(())) | Ok(Err(StoreError::LeaseNotFound(_))) => {
                    tracing::info!("catalog lease revoked; own records removed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not revoke the catalog lease; records expire with it")
                }
                Err(_) => {
                    tracing::warn!("revoking the catalog lease timed out; records expire with it")
                }
            }
        }
        self.status.lease = None;
        self.status.in_sync = false;
        self.status_tx.send_replace(self.status.clone());
    }
}

/// Every key the gateway should own, with its encoded value.
fn desired_keys(layout: &KeyLayout, desired: &Desired) -> BTreeMap<String, Bytes> {
    let gw = &desired.gateway;
    let mut keys = BTreeMap::new();
    keys.insert(
        layout.gateway(&gw.cluster, &gw.gateway_id),
        Bytes::from(encode(gw)),
    );
    for (service, record) in &desired.exports {
        let key = ExportKey {
            cluster: gw.cluster.clone(),
            gateway: gw.gateway_id.clone(),
            service: service.clone(),
        };
        keys.insert(layout.export(&key), Bytes::from(encode(record)));
    }
    keys
}

/// The writes that turn `actual` (a list of the own prefix) into `wanted`. Pure.
fn plan(
    own: &str,
    wanted: &BTreeMap<String, Bytes>,
    actual: &[store::KeyValue],
    lease: LeaseId,
) -> Vec<TxnOp> {
    let own_dir = format!("{own}/");
    let mut ops = Vec::new();
    let mut present = BTreeMap::new();
    for kv in actual {
        // The prefix `.../gateways/gw-1` also matches `.../gateways/gw-10`: keep only keys
        // that are exactly ours.
        let Ok(key) = std::str::from_utf8(&kv.key) else {
            continue;
        };
        if key != own && !key.starts_with(&own_dir) {
            continue;
        }
        present.insert(key, kv);
        if !wanted.contains_key(key) {
            ops.push(TxnOp::Delete {
                key: kv.key.clone(),
            });
        }
    }
    for (key, value) in wanted {
        let current = present.get(key.as_str());
        if current.is_some_and(|kv| kv.value == *value && kv.lease == lease) {
            continue;
        }
        ops.push(TxnOp::Put {
            key: Bytes::from(key.clone()),
            value: value.clone(),
            lease,
        });
    }
    ops
}

/// Splits writes into transactions within etcd's per-request limits.
fn batches(ops: Vec<TxnOp>) -> Vec<Vec<TxnOp>> {
    let mut out: Vec<Vec<TxnOp>> = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = match &op {
            TxnOp::Put { key, value, .. } => key.len() + value.len(),
            TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
        };
        let full = out
            .last()
            .is_none_or(|b| b.len() >= MAX_TXN_OPS || bytes + size > MAX_TXN_BYTES);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(batch) = out.last_mut() {
            batch.push(op);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str, lease: LeaseId) -> store::KeyValue {
        store::KeyValue {
            key: Bytes::from(key.to_owned()),
            value: Bytes::from(value.to_owned()),
            create_revision: 1,
            mod_revision: 1,
            lease,
        }
    }

    /// A first publish that takes several lease TTLs (640 records in 10 transactions of
    /// 300 ms each against a 1 s lease) keeps its one lease and gets in sync; before, the
    /// lease expired halfway and every attempt started over under a new one.
    #[tokio::test(start_paused = true)]
    async fn a_publish_longer_than_the_lease_keeps_its_lease() {
        use crate::embedded::EmbeddedStore;
        use crate::test_store::TestStore;
        use meshup_core::fixture;

        let store = TestStore::new(Arc::new(EmbeddedStore::new()));
        store.set_txn_delay(Duration::from_millis(300));
        let exports = (0..640).map(|i| {
            (
                fixture::service(&format!("svc-{i:03}.prod")),
                fixture::export(8080, 1),
            )
        });
        let cancel = CancellationToken::new();
        let handle = Publisher::new(
            store.clone(),
            KeyLayout::new("/m").expect("prefix"),
            fixture::gateway("east", "gw-1"),
        )
        .with_exports(exports)
        .with_config(PublisherConfig {
            lease_ttl: Duration::from_secs(1),
            anti_entropy_interval: Duration::from_secs(600),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
        })
        .spawn(cancel.clone());
        let mut status = handle.status();
        let synced = tokio::time::timeout(Duration::from_secs(30), status.wait_for(|s| s.in_sync))
            .await
            .expect("in sync within 30 s")
            .expect("publisher running")
            .clone();
        assert_eq!(synced.leases_granted, 1, "{synced:?}");
        assert!(synced.writes >= 641, "{synced:?}");
        let listed = store::list_prefix(store.inner().as_ref(), b"/m/")
            .await
            .expect("list")
            .0;
        assert_eq!(listed.len(), 641, "the gateway record and every export");
        cancel.cancel();
    }

    #[test]
    fn plan_fixes_differences_and_leaves_neighbours_alone() {
        let own = "/m/v1/clusters/east/gateways/gw-1";
        let wanted: BTreeMap<String, Bytes> = [
            (own.to_owned(), Bytes::from_static(b"gw")),
            (format!("{own}/exports/prod/a"), Bytes::from_static(b"a")),
            (format!("{own}/exports/prod/b"), Bytes::from_static(b"b")),
        ]
        .into();
        let actual = vec![
            kv(own, "gw", 7),                                     // up to date
            kv(&format!("{own}/exports/prod/a"), "old", 7),       // wrong value
            kv(&format!("{own}/exports/prod/gone"), "x", 7),      // stale: delete
            kv("/m/v1/clusters/east/gateways/gw-10", "other", 9), // a neighbour: untouched
        ];
        let ops = plan(own, &wanted, &actual, 7);
        let summary: Vec<String> = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, .. } => format!("put {}", String::from_utf8_lossy(key)),
                TxnOp::Delete { key } => format!("del {}", String::from_utf8_lossy(key)),
                TxnOp::Get { .. } => "get".into(),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                format!("del {own}/exports/prod/gone"),
                format!("put {own}/exports/prod/a"),
                format!("put {own}/exports/prod/b"),
            ]
        );
        // A new lease rewrites everything.
        assert_eq!(plan(own, &wanted, &actual, 8).len(), 4);
    }

    #[test]
    fn batches_respect_limits_exactly() {
        fn put(i: usize, value_len: usize) -> TxnOp {
            TxnOp::Put {
                key: Bytes::from(format!("k{i:03}")), // 4 bytes
                value: Bytes::from(vec![0u8; value_len]),
                lease: 1,
            }
        }
        fn size(op: &TxnOp) -> usize {
            match op {
                TxnOp::Put { key, value, .. } => key.len() + value.len(),
                TxnOp::Delete { key } | TxnOp::Get { key } => key.len(),
            }
        }
        // (ops, expected batch sizes)
        let per_mib = MAX_TXN_BYTES / 30_004; // 30,000-byte values: 34 fit in 1 MiB
        let cases: Vec<(Vec<TxnOp>, Vec<usize>)> = vec![
            // The byte cap binds: 34 ops of 30,004 bytes fill a batch, the 35th starts one.
            (
                (0..150).map(|i| put(i, 30_000)).collect(),
                vec![per_mib, per_mib, per_mib, per_mib, 150 - 4 * per_mib],
            ),
            // The op cap binds: 64 small ops, then the rest.
            ((0..150).map(|i| put(i, 10)).collect(), vec![64, 64, 22]),
            // Exactly at the byte cap: one batch; one byte more: two.
            (
                vec![put(0, MAX_TXN_BYTES / 2 - 4), put(1, MAX_TXN_BYTES / 2 - 4)],
                vec![2],
            ),
            (
                vec![put(0, MAX_TXN_BYTES / 2 - 4), put(1, MAX_TXN_BYTES / 2 - 3)],
                vec![1, 1],
            ),
            // An op larger than the cap on its own still goes out, alone.
            (
                vec![put(0, 10), put(1, MAX_TXN_BYTES), put(2, 10)],
                vec![1, 1, 1],
            ),
            (Vec::new(), Vec::new()),
        ];
        for (n, (ops, want)) in cases.into_iter().enumerate() {
            let total = ops.len();
            let b = batches(ops);
            let got: Vec<usize> = b.iter().map(Vec::len).collect();
            assert_eq!(got, want, "case {n}");
            assert_eq!(got.iter().sum::<usize>(), total, "case {n}: ops lost");
            for batch in &b {
                let bytes: usize = batch.iter().map(size).sum();
                assert!(batch.len() <= MAX_TXN_OPS, "case {n}: {} ops", batch.len());
                assert!(
                    bytes <= MAX_TXN_BYTES || batch.len() == 1,
                    "case {n}: {bytes} bytes in {} ops",
                    batch.len()
                );
            }
        }
    }
}

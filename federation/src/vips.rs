//! VIP allocation: one address per clusterset service (and per service and target cluster
//! for the cluster-pinned names [`PinnedNames`] asks for) from the cluster's `vip_cidr`.
//!
//! The reconciler allocates in batches ([`ALLOCATION_BATCH`] keys per transaction): it picks
//! each key's first candidate address not held by this cluster in the snapshot nor picked
//! earlier in the batch ([`pick`]), and writes them all in one transaction guarded by the
//! same absence checks; up to [`ALLOCATIONS_IN_FLIGHT`] batches are written at once (their
//! picks are made one batch after another, so they never collide with each other). Only
//! when a batch loses a race (a replica or an operator wrote one
//! of its keys meanwhile) do its keys fall back to [`VipAllocator::allocate`], one
//! transaction each, which adopts what the winner wrote. Clusterset VIPs go before pinned
//! ones, so a range too small for every pinned name still serves every clusterset name.
//!
//! Allocation is one transaction that creates both the VIP key (service → address) and the
//! address-claim key (address → service) only if both are absent (see [`crate::keys`]).
//! Every replica of a cluster tries the same first candidate (a stable hash of the VIP key),
//! so two replicas racing for one service collide on the VIP key and the loser adopts the
//! winner's address; two services hashing to one address collide on the claim and the
//! second probes the next address. VIPs are not lease-bound: they outlive gateway restarts.
//!
//! A VIP is freed when its service (or, for a pinned VIP, the service in its target
//! cluster) has been gone from the catalog for the grace period; the delete is conditional
//! on the VIP's `mod_revision`, so replicas freeing at once do no harm.
//!
//! [`VipAllocator::spawn`] runs the reconciler, driven by the watcher's snapshots; it stops
//! on the `CancellationToken` (or when the snapshot channel closes). It plans only when a
//! new snapshot arrives; its tick only frees VIPs whose grace period ended and retries keys
//! whose backoff ended. A key that failed (range full, corrupt record, store error) waits
//! [`retry_delay`] before its next attempt (1 s doubling to 60 s), so one full range or
//! one corrupt record costs a few transactions and log lines a minute, not up to
//! [`MAX_PROBES`] transactions and a warning per key per second. The backoff of a key ends
//! early when the catalog frees an address (after a full range) and is forgotten when the
//! key stops being missing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use imbl::ordmap::DiffItem;
use ipnet::IpNet;
use meshup_core::catalog::{ServiceView, Snapshot, VipKey};
use meshup_core::model::{SCHEMA_VERSION, VipRecord, decode, encode};
use meshup_core::names::{ClusterName, ServiceKey};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyLayout;
use crate::store::{self, Compare, Store, StoreError, Txn, TxnOp};

/// Default grace period before an unused VIP is freed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(300);
/// Addresses tried for one VIP before giving up.
pub const MAX_PROBES: u32 = 64;
/// Keys allocated in one transaction: two absence checks and two puts each, inside etcd's
/// default limit of 128 operations per list (`--max-txn-ops`).
pub const ALLOCATION_BATCH: usize = 32;
/// How often the reconciler looks for ended grace periods and ended backoffs; planning
/// itself happens only on a new snapshot.
const RECONCILE_TICK: Duration = Duration::from_secs(1);
/// Backoff of a key after its first failure; doubled per further failure.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest backoff of a key: how long a repaired corrupt record or a widened store
/// permission may go unnoticed.
pub const RETRY_MAX: Duration = Duration::from_secs(60);

/// Addresses picked for a batch of keys, not written yet ([`VipAllocator::pick_batch`]).
#[derive(Debug, Default)]
pub struct Picked(Vec<(VipKey, String, IpAddr)>);

impl Picked {
    /// The picked addresses, in key order.
    fn addresses(&self) -> Vec<IpAddr> {
        self.0.iter().map(|(_, _, ip)| *ip).collect()
    }
}

/// One key's allocation result.
pub type Allocation = (VipKey, Result<IpAddr, VipError>);

/// VIP allocation transactions a reconcile keeps in flight at once.
pub const ALLOCATIONS_IN_FLIGHT: usize = 8;

/// Why a VIP could not be allocated or freed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VipError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no free address for {key} in {cidr} after {probes} tries: the VIP range is full or too small; widen vip_cidr"
    )]
    Exhausted {
        key: String,
        cidr: IpNet,
        probes: u32,
    },
    #[error(
        "no address for the pinned name of {key}: pinned names may hold at most half of {cidr} ({cap} addresses), the rest stays for clusterset names; list fewer pinned_names or widen vip_cidr"
    )]
    PinnedFull { key: String, cidr: IpNet, cap: u128 },
    #[error(
        "VIP record at {key} is corrupt ({detail}); delete it with etcdctl so it is reallocated"
    )]
    Corrupt { key: String, detail: String },
}

/// What the allocator works with.
#[derive(Debug, Clone)]
pub struct VipConfig {
    /// The cluster whose VIPs this allocator manages.
    pub cluster: ClusterName,
    /// The range VIPs come from (e.g. 127.77.0.0/16).
    pub cidr: IpNet,
    /// How long a service must be gone before its VIP is freed.
    pub grace: Duration,
    /// Which cluster-pinned names get a VIP.
    pub pinned: PinnedNames,
}

/// Which cluster-pinned names (`<svc>.<ns>.svc.<cluster>`) this cluster gives a VIP of its
/// own. Each costs one address per (service, exporting cluster): 100 clusters exporting
/// 1,000 services want 100,000 pinned VIPs, more than a /16 holds (docs/scale.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum PinnedNames {
    /// Every service in every exporting cluster (the default: small federations).
    #[default]
    All,
    /// None: only the clusterset names answer.
    None,
    /// Only these services (in every cluster that exports them).
    Only(BTreeSet<ServiceKey>),
}

impl PinnedNames {
    /// Whether `service`'s pinned names get VIPs.
    pub fn covers(&self, service: &ServiceKey) -> bool {
        match self {
            PinnedNames::All => true,
            PinnedNames::None => false,
            PinnedNames::Only(services) => services.contains(service),
        }
    }
}

/// What the reconciler has tried: for readiness, which must not wait for a key that failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipProgress {
    /// Keys whose last allocation failed; each waits for its next try.
    pub failing: BTreeSet<VipKey>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    error: &'static str,
}

/// The allocator's Prometheus metrics. Clones share the series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    allocated: Counter,
    freed: Counter,
    errors: Family<ErrorLabels, Counter>,
    backing_off: Gauge,
}

impl Metrics {
    /// Creates the series and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "catalog_vips_allocated",
            "VIPs this gateway allocated",
            m.allocated.clone(),
        );
        registry.register(
            "catalog_vips_freed",
            "VIPs this gateway freed after the grace period",
            m.freed.clone(),
        );
        registry.register(
            "catalog_vip_errors",
            "Failed VIP allocations or frees, by kind",
            m.errors.clone(),
        );
        registry.register(
            "catalog_vips_backing_off",
            "VIPs this cluster needs whose allocation failed and waits for its next try",
            m.backing_off.clone(),
        );
        m
    }

    /// Failed allocations or frees so far of one kind ("exhausted", "corrupt", or a store
    /// error label), for tests and the admin page.
    pub fn errors(&self, kind: &'static str) -> u64 {
        self.errors
            .get_or_create(&ErrorLabels { error: kind })
            .get()
    }

    /// VIPs waiting for their next allocation try.
    pub fn backing_off(&self) -> i64 {
        self.backing_off.get()
    }

    fn set_backing_off(&self, retries: &Retries) {
        self.backing_off
            .set(i64::try_from(retries.len()).unwrap_or(i64::MAX));
    }

    fn count_error(&self, e: &VipError) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: error_label(e),
            })
            .inc();
    }
}

/// Allocates and frees one cluster's VIPs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    store: Arc<dyn Store>,
    layout: KeyLayout,
    config: VipConfig,
    metrics: Metrics,
    progress: Arc<watch::Sender<VipProgress>>,
}

impl VipAllocator {
    /// An allocator for `config.cluster`.
    pub fn new(
        store: Arc<dyn Store>,
        layout: KeyLayout,
        config: VipConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            store,
            layout,
            config,
            metrics,
            progress: Arc::new(watch::Sender::new(VipProgress::default())),
        }
    }

    /// What the reconciler has tried so far (updated after each allocation pass).
    pub fn progress(&self) -> watch::Receiver<VipProgress> {
        self.progress.subscribe()
    }

    /// Picks an address for each of `keys` (at most [`ALLOCATION_BATCH`]): its first
    /// candidate that is not in `used` (this cluster's addresses as far as it knows, and
    /// what earlier batches picked), and adds the picks to `used`. What [`commit_batch`]
    /// then writes; keys without a free candidate come back as errors at once.
    ///
    /// [`commit_batch`]: Self::commit_batch
    pub fn pick_batch(
        &self,
        keys: &[VipKey],
        used: &mut HashSet<IpAddr>,
    ) -> (Picked, Vec<Allocation>) {
        let mut exhausted = Vec::new();
        let mut chosen = Vec::with_capacity(keys.len());
        let cap = pinned_cap(self.config.cidr);
        for key in keys {
            let owner = self.layout.vip(key);
            if key.target.is_some() && used.len() as u128 >= cap {
                let cidr = self.config.cidr;
                exhausted.push((
                    key.clone(),
                    Err(VipError::PinnedFull {
                        key: owner,
                        cidr,
                        cap,
                    }),
                ));
                continue;
            }
            match pick(self.config.cidr, stable_hash(owner.as_bytes()), |ip| {
                used.contains(ip)
            }) {
                Some(ip) => {
                    used.insert(ip);
                    chosen.push((key.clone(), owner, ip));
                }
                None => exhausted.push((
                    key.clone(),
                    Err(VipError::Exhausted {
                        key: owner,
                        cidr: self.config.cidr,
                        probes: probe_limit(self.config.cidr),
                    }),
                )),
            }
        }
        (Picked(chosen), exhausted)
    }

    /// Writes a batch of picks in one transaction guarded by the absence of every VIP key
    /// and address claim. If it loses a race, keys whose VIP exists now adopt it and the
    /// others are allocated one by one. One result per key, in order. Batches of disjoint
    /// picks may be committed concurrently: etcd puts concurrent proposals in one raft
    /// round, so a joining gateway's thousands of VIPs cost a few rounds, not one each.
    pub async fn commit_batch(&self, picked: Picked) -> Vec<Allocation> {
        let chosen = picked.0;
        let mut results = Vec::with_capacity(chosen.len());
        if chosen.is_empty() {
            return results;
        }
        let mut txn = Txn::default();
        for (_, owner, ip) in &chosen {
            let vip_key = Bytes::from(owner.clone());
            let claim_key = Bytes::from(self.layout.address_claim(&self.config.cluster, *ip));
            let record = Bytes::from(encode(&VipRecord {
                schema: SCHEMA_VERSION,
                vip: *ip,
            }));
            txn.compares.push(Compare::Absent(vip_key.clone()));
            txn.compares.push(Compare::Absent(claim_key.clone()));
            txn.success.push(TxnOp::Put {
                key: vip_key.clone(),
                value: record,
                lease: 0,
            });
            txn.success.push(TxnOp::Put {
                key: claim_key,
                value: Bytes::from(owner.clone()),
                lease: 0,
            });
            txn.failure.push(TxnOp::Get { key: vip_key });
        }
        match self.store.txn(txn).await {
            Err(e) => {
                for (key, _, _) in chosen {
                    results.push((key, Err(VipError::Store(e.clone()))));
                }
            }
            Ok(result) if result.succeeded => {
                tracing::debug!(vips = chosen.len(), "VIPs allocated in one transaction");
                self.metrics.allocated.inc_by(chosen.len() as u64);
                for (key, _, ip) in chosen {
                    results.push((key, Ok(ip)));
                }
            }
            Ok(result) => {
                // Lost a race: adopt what exists, allocate the rest one by one.
                let mut existing = result.gets.into_iter();
                for (key, owner, _) in chosen {
                    let outcome = match existing.next().flatten() {
                        Some(kv) => decode::<VipRecord>(&kv.value).map(|r| r.vip).map_err(|e| {
                            VipError::Corrupt {
                                key: owner,
                                detail: e.to_string(),
                            }
                        }),
                        None => self.allocate(&key).await,
                    };
                    results.push((key, outcome));
                }
            }
        }
        results
    }

    /// The VIP of `key`: the existing one, or a new one allocated by transaction. Replicas
    /// calling this at once get the same address.
    pub async fn allocate(&self, key: &VipKey) -> Result<IpAddr, VipError> {
        let vip_key = Bytes::from(self.layout.vip(key));
        let owner = self.layout.vip(key);
        let seed = stable_hash(owner.as_bytes());
        let probes = probe_limit(self.config.cidr);
        for probe in 0..probes {
            let Some(ip) = candidate(self.config.cidr, seed, probe) else {
                break;
            };
            let claim_key = Bytes::from(self.layout.address_claim(&self.config.cluster, ip));
            let record = Bytes::from(encode(&VipRecord {
                schema: SCHEMA_VERSION,
                vip: ip,
            }));
            let result = self
                .store
                .txn(Txn {
                    compares: vec![
                        Compare::Absent(vip_key.clone()),
                        Compare::Absent(claim_key.clone()),
                    ],
                    success: vec![
                        TxnOp::Put {
                            key: vip_key.clone(),
                            value: record.clone(),
                            lease: 0,
                        },
                        TxnOp::Put {
                            key: claim_key.clone(),
                            value: Bytes::from(owner.clone()),
                            lease: 0,
                        },
                    ],
                    failure: vec![
                        TxnOp::Get {
                            key: vip_key.clone(),
                        },
                        TxnOp::Get {
                            key: claim_key.clone(),
                        },
                    ],
                })
                .await?;
            if result.succeeded {
                tracing::info!(vip = %ip, key = %owner, "VIP allocated");
                self.metrics.allocated.inc();
                return Ok(ip);
            }
            let mut gets = result.gets.into_iter();
            let (existing, claim) = (gets.next().flatten(), gets.next().flatten());
            if let Some(existing) = existing {
                // Allocated before, or by a replica that won the race: adopt it.
                let record: VipRecord = decode(&existing.value).map_err(|e| VipError::Corrupt {
                    key: owner.clone(),
                    detail: e.to_string(),
                })?;
                return Ok(record.vip);
            }
            if let Some(claim) = claim
                && claim.value == owner.as_bytes()
            {
                // Our own claim survived without its VIP key (a manual delete): re-create the
                // VIP key on the same address, if the claim is still unchanged.
                let retaken = self
                    .store
                    .txn(Txn {
                        compares: vec![
                            Compare::Absent(vip_key.clone()),
                            Compare::ModRevision(claim_key.clone(), claim.mod_revision),
                        ],
                        success: vec![TxnOp::Put {
                            key: vip_key.clone(),
                            value: record,
                            lease: 0,
                        }],
                        failure: vec![],
                    })
                    .await?;
                if retaken.succeeded {
                    return Ok(ip);
                }
            }
            // The address belongs to another service: try the next one.
        }
        Err(VipError::Exhausted {
            key: owner,
            cidr: self.config.cidr,
            probes,
        })
    }

    /// Frees `key`'s VIP and its address claim. Returns whether this call freed it.
    ///
    /// A corrupt VIP record does not say which address it holds, so its claims are found by
    /// owner instead (a claim's value is the VIP key): otherwise the address would stay
    /// claimed by nobody, forever.
    pub async fn release(&self, key: &VipKey) -> Result<bool, VipError> {
        let vip_key = self.layout.vip(key);
        let Some(existing) = store::get(self.store.as_ref(), vip_key.clone()).await? else {
            return Ok(false);
        };
        let mut compares = vec![Compare::ModRevision(
            Bytes::from(vip_key.clone()),
            existing.mod_revision,
        )];
        let mut success = vec![TxnOp::Delete {
            key: Bytes::from(vip_key.clone()),
        }];
        match decode::<VipRecord>(&existing.value) {
            Ok(record) => success.push(TxnOp::Delete {
                key: Bytes::from(self.layout.address_claim(&self.config.cluster, record.vip)),
            }),
            Err(e) => {
                let (claims, _) = store::list_prefix(
                    self.store.as_ref(),
                    self.layout
                        .address_claims_of(&self.config.cluster)
                        .as_bytes(),
                )
                .await?;
                let owned: Vec<_> = claims
                    .into_iter()
                    .filter(|claim| claim.value == vip_key.as_bytes())
                    .collect();
                tracing::warn!(
                    key = %vip_key,
                    error = %e,
                    claims = owned.len(),
                    "freeing a corrupt VIP record; its address claims are found by owner"
                );
                for claim in owned {
                    // Only if unchanged: a claim re-taken meanwhile belongs to someone else.
                    compares.push(Compare::ModRevision(claim.key.clone(), claim.mod_revision));
                    success.push(TxnOp::Delete { key: claim.key });
                }
            }
        }
        let result = self
            .store
            .txn(Txn {
                compares,
                success,
                failure: vec![],
            })
            .await?;
        if result.succeeded {
            tracing::info!(key = %vip_key, "VIP freed after the grace period");
            self.metrics.freed.inc();
        }
        Ok(result.succeeded)
    }

    /// Runs the reconciler: allocates missing VIPs and frees unused ones after the grace
    /// period, from the watcher's snapshots. Stops on `cancel` or when the channel closes.
    pub fn spawn(
        self,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        cancel: CancellationToken,
    ) -> JoinHandle<()> {
        tokio::spawn(self.reconcile_loop(snapshots, cancel))
    }

    async fn reconcile_loop(
        self,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        cancel: CancellationToken,
    ) {
        let mut unused_since: HashMap<VipKey, Instant> = HashMap::new();
        let mut allocations = Retries::default();
        let mut frees = Retries::default();
        // The work list of the last plan: keys leave it when done, so a tick between our
        // write and the snapshot that shows it does not redo the work.
        let mut work = VipPlan::default();
        // The addresses of this cluster's VIPs and those allocated since: what a batch must
        // not pick.
        let mut used: HashSet<IpAddr> = HashSet::new();
        let mut tick = tokio::time::interval(
            RECONCILE_TICK.min(self.config.grace.max(Duration::from_millis(50))),
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Plans once at start even without a change notification: the receiver may come in
        // having seen the current snapshot already.
        let mut planned: Option<Arc<Snapshot>> = None;
        loop {
            let changed = tokio::select! {
                () = cancel.cancelled() => return,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                _ = tick.tick() => false,
            };
            if changed || planned.is_none() {
                let snapshot = snapshots.borrow_and_update().clone();
                // Revision 0: the watcher has not listed yet; an empty catalog would free
                // every VIP.
                if snapshot.revision == 0 {
                    continue;
                }
                // Churn of endpoint counts changes nothing the plan reads: keep the plan
                // (and its work list) instead of walking the catalog again; other changes
                // re-decide only what they touched.
                let cluster = &self.config.cluster;
                let freed_address = match planned.replace(snapshot.clone()) {
                    Some(older) if !older.addressing_differs(&snapshot) => None,
                    Some(older) => Some(replan(
                        &mut work,
                        &mut used,
                        &older,
                        &snapshot,
                        cluster,
                        &self.config.pinned,
                    )),
                    None => {
                        work = plan(&snapshot, cluster, &self.config.pinned);
                        used = snapshot.vips_of(cluster).map(|(_, ip)| ip).collect();
                        Some(false)
                    }
                };
                if let Some(freed_address) = freed_address {
                    allocations.retain_only(&work.missing);
                    frees.retain_only(&work.unused);
                    if freed_address {
                        // A full range may have room now: retry those keys at once.
                        allocations.reset_kind(FailureKind::Exhausted);
                    }
                    self.metrics.set_backing_off(&allocations);
                }
            }
            if !self
                .allocate_due(&mut work, &mut allocations, &mut used, &cancel)
                .await
            {
                return;
            }
            self.free_due(&mut work, &mut unused_since, &mut frees)
                .await;
        }
    }

    /// Allocates every missing key whose backoff has ended, clusterset VIPs first, in
    /// batches; false if cancelled meanwhile.
    async fn allocate_due(
        &self,
        work: &mut VipPlan,
        retries: &mut Retries,
        used: &mut HashSet<IpAddr>,
        cancel: &CancellationToken,
    ) -> bool {
        let now = Instant::now();
        let due = allocation_order(&work.missing, |key| retries.is_due(key, now));
        // Set once a key found no free address although its probes covered the whole range:
        // every other key would probe the same full range, so they wait too.
        let mut range_full = false;
        let mut waiting_for_room = 0usize;
        let mut done = Vec::new();
        // Addresses are picked batch by batch here (each batch sees the earlier picks), then
        // the batches are written ALLOCATIONS_IN_FLIGHT at a time.
        let mut batches = Vec::new();
        for batch in due.chunks(ALLOCATION_BATCH) {
            if range_full {
                for key in batch {
                    retries.failed(key, FailureKind::Exhausted, now);
                    waiting_for_room += 1;
                }
                continue;
            }
            let (picked, exhausted) = self.pick_batch(batch, used);
            for (key, result) in exhausted {
                range_full |= self.settle(key, result, retries, &mut done);
            }
            batches.push(picked);
        }
        let mut commits = futures::stream::iter(batches.into_iter().map(|picked| {
            let ips = picked.addresses();
            async move { (ips, self.commit_batch(picked).await) }
        }))
        .buffered(ALLOCATIONS_IN_FLIGHT);
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return false,
                next = commits.next() => next,
            };
            let Some((ips, results)) = next else {
                break;
            };
            for ((key, result), picked) in results.into_iter().zip(ips) {
                // A key that adopted a racing writer's address, or failed, frees its pick.
                if result.as_ref().ok() != Some(&picked) {
                    used.remove(&picked);
                }
                if let Ok(ip) = &result {
                    used.insert(*ip);
                }
                // Every batch is picked already: a full range found now shows at the next
                // round (a fallback allocation probing past a racing writer's picks).
                self.settle(key, result, retries, &mut done);
            }
        }
        if waiting_for_room > 0 {
            tracing::warn!(
                cidr = %self.config.cidr,
                waiting = waiting_for_room,
                "VIP range is full: more services need a VIP than vip_cidr holds; widen it"
            );
        }
        for key in done {
            work.missing.remove(&key);
        }
        self.metrics.set_backing_off(retries);
        self.progress.send_if_modified(|p| {
            let failing: BTreeSet<VipKey> = retries.keys().cloned().collect();
            let changed = p.failing != failing;
            p.failing = failing;
            changed
        });
        true
    }

    /// Records one key's allocation result; true if it found the whole range full.
    fn settle(
        &self,
        key: VipKey,
        result: Result<IpAddr, VipError>,
        retries: &mut Retries,
        done: &mut Vec<VipKey>,
    ) -> bool {
        match result {
            Ok(_) => {
                retries.succeeded(&key);
                done.push(key);
                false
            }
            Err(e) => {
                let kind = FailureKind::of(&e);
                let (delay, first) = retries.failed(&key, kind, Instant::now());
                self.metrics.count_error(&e);
                if first {
                    tracing::warn!(error = %e, key = %self.layout.vip(&key), retry_in = ?delay, "VIP allocation failed; will retry with backoff");
                } else {
                    tracing::debug!(error = %e, key = %self.layout.vip(&key), retry_in = ?delay, "VIP allocation failed again");
                }
                matches!(e, VipError::Exhausted { .. }) && probes_cover_range(self.config.cidr)
            }
        }
    }

    /// Frees unused VIPs whose grace period (and any backoff after a failed free) ended.
    async fn free_due(
        &self,
        work: &mut VipPlan,
        unused_since: &mut HashMap<VipKey, Instant>,
        retries: &mut Retries,
    ) {
        let now = Instant::now();
        unused_since.retain(|k, _| work.unused.contains(k));
        let mut done = Vec::new();
        for key in &work.unused {
            let since = *unused_since.entry(key.clone()).or_insert(now);
            if now.duration_since(since) < self.config.grace || !retries.is_due(key, now) {
                continue;
            }
            match self.release(key).await {
                Ok(_) => {
                    retries.succeeded(key);
                    unused_since.remove(key);
                    done.push(key.clone());
                }
                Err(e) => {
                    let (delay, first) = retries.failed(key, FailureKind::of(&e), Instant::now());
                    self.metrics.count_error(&e);
                    if first {
                        tracing::warn!(error = %e, key = %self.layout.vip(key), retry_in = ?delay, "freeing VIP failed; will retry with backoff");
                    } else {
                        tracing::debug!(error = %e, key = %self.layout.vip(key), retry_in = ?delay, "freeing VIP failed again");
                    }
                }
            }
        }
        for key in done {
            work.unused.remove(&key);
        }
    }
}

/// Why the last try for a key failed: decides what ends its backoff early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No free address: ends when the catalog frees one.
    Exhausted,
    /// A corrupt VIP record: an operator must delete it; noticed at the next try.
    Corrupt,
    /// The store failed or refused: noticed at the next try.
    Store,
}

impl FailureKind {
    /// The kind of `e`.
    pub fn of(e: &VipError) -> Self {
        match e {
            VipError::Exhausted { .. } | VipError::PinnedFull { .. } => FailureKind::Exhausted,
            VipError::Corrupt { .. } => FailureKind::Corrupt,
            VipError::Store(_) => FailureKind::Store,
        }
    }
}

/// The wait after `failures` consecutive failures of one key: [`RETRY_MIN`] doubling up to
/// [`RETRY_MAX`]. Pure.
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_MIN.saturating_mul(1 << doublings).min(RETRY_MAX)
}

#[derive(Debug, Clone)]
struct RetryState {
    failures: u32,
    kind: FailureKind,
    not_before: Instant,
}

/// Per-key backoff of the reconciler. Pure bookkeeping: the caller passes the time.
#[derive(Debug, Default)]
pub struct Retries {
    keys: HashMap<VipKey, RetryState>,
}

impl Retries {
    /// Whether `key` may be tried at `now` (never failed, or its backoff ended).
    pub fn is_due(&self, key: &VipKey, now: Instant) -> bool {
        self.keys.get(key).is_none_or(|s| now >= s.not_before)
    }

    /// Records a failure at `now`; returns the backoff and whether this is the first failure
    /// of this kind in a row (worth a warning; repeats are not).
    pub fn failed(&mut self, key: &VipKey, kind: FailureKind, now: Instant) -> (Duration, bool) {
        let (failures, first) = match self.keys.get(key) {
            Some(s) if s.kind == kind => (s.failures.saturating_add(1), false),
            _ => (1, true),
        };
        let delay = retry_delay(failures);
        self.keys.insert(
            key.clone(),
            RetryState {
                failures,
                kind,
                not_before: now + delay,
            },
        );
        (delay, first)
    }

    /// Forgets `key`'s failures.
    pub fn succeeded(&mut self, key: &VipKey) {
        self.keys.remove(key);
    }

    /// Forgets every key outside `active` (a key that comes back starts afresh).
    pub fn retain_only(&mut self, active: &BTreeSet<VipKey>) {
        self.keys.retain(|k, _| active.contains(k));
    }

    /// Ends the backoff of every key whose last failure was `kind` (its cause may be gone).
    pub fn reset_kind(&mut self, kind: FailureKind) {
        self.keys.retain(|_, s| s.kind != kind);
    }

    /// Keys with a recorded failure.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key has a recorded failure.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys with a recorded failure.
    pub fn keys(&self) -> impl Iterator<Item = &VipKey> {
        self.keys.keys()
    }
}

fn error_label(e: &VipError) -> &'static str {
    match e {
        VipError::Store(s) => s.label(),
        VipError::Exhausted { .. } | VipError::PinnedFull { .. } => "exhausted",
        VipError::Corrupt { .. } => "corrupt",
    }
}

/// What the reconciler should do for one cluster, given a snapshot. Pure.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VipPlan {
    /// VIPs the catalog needs but does not have.
    pub missing: BTreeSet<VipKey>,
    /// VIPs the catalog has but no service needs (freed after the grace period).
    pub unused: BTreeSet<VipKey>,
}

/// Every VIP `cluster` needs: one per clusterset service, and one per (service, exporting
/// cluster) for the cluster-pinned names `pinned` covers.
pub fn wanted(
    snapshot: &Snapshot,
    cluster: &ClusterName,
    pinned: &PinnedNames,
) -> BTreeSet<VipKey> {
    let mut keys = BTreeSet::new();
    for view in snapshot.services() {
        wanted_of(view, cluster, pinned, &mut keys);
    }
    keys
}

/// The VIPs `cluster` needs for one service, added to `keys`.
fn wanted_of(
    view: &ServiceView,
    cluster: &ClusterName,
    pinned: &PinnedNames,
    keys: &mut BTreeSet<VipKey>,
) {
    keys.insert(VipKey {
        cluster: cluster.clone(),
        service: view.key.clone(),
        target: None,
    });
    if !pinned.covers(&view.key) {
        return;
    }
    for target in view.clusters.keys() {
        keys.insert(VipKey {
            cluster: cluster.clone(),
            service: view.key.clone(),
            target: Some(target.clone()),
        });
    }
}

/// Compares what `cluster` needs with what the snapshot has.
pub fn plan(snapshot: &Snapshot, cluster: &ClusterName, pinned: &PinnedNames) -> VipPlan {
    let wanted = wanted(snapshot, cluster, pinned);
    let have: BTreeSet<VipKey> = snapshot.vips_of(cluster).map(|(k, _)| k.clone()).collect();
    VipPlan {
        missing: wanted.difference(&have).cloned().collect(),
        unused: have.difference(&wanted).cloned().collect(),
    }
}

/// Brings `plan`, made for `older`, up to `newer`, deciding again only the keys whose
/// inputs differ between the two: the VIPs of services that came, went or changed their
/// exporting clusters, and this cluster's VIPs that changed. `used` (the addresses this
/// cluster's VIPs hold, and picks in flight) follows the VIP changes. Returns whether one of
/// this cluster's addresses was freed. Pure.
///
/// A whole plan per new service walked every service and every VIP of this cluster: at
/// 10,000 services that was most of a joined gateway's CPU under churn and most of a new
/// service's time to its first answer (docs/scale.md). A key taken off `missing` as
/// allocated is not put back by a snapshot that does not show the allocation yet, as a
/// whole plan would do.
pub fn replan(
    plan: &mut VipPlan,
    used: &mut HashSet<IpAddr>,
    older: &Snapshot,
    newer: &Snapshot,
    cluster: &ClusterName,
    pinned: &PinnedNames,
) -> bool {
    let mut touched = BTreeSet::new();
    for item in older.service_map().diff(newer.service_map()) {
        match item {
            DiffItem::Add(_, view) | DiffItem::Remove(_, view) => {
                wanted_of(view, cluster, pinned, &mut touched);
            }
            DiffItem::Update {
                old: (_, was),
                new: (_, is),
            } => {
                if was.addressing_differs(is) {
                    wanted_of(was, cluster, pinned, &mut touched);
                    wanted_of(is, cluster, pinned, &mut touched);
                }
            }
        }
    }
    let mut freed = false;
    for item in older.vip_map().diff(newer.vip_map()) {
        let (key, was, is) = match item {
            DiffItem::Add(key, ip) => (key, None, Some(*ip)),
            DiffItem::Remove(key, ip) => (key, Some(*ip), None),
            DiffItem::Update {
                old: (key, was),
                new: (_, is),
            } => (key, Some(*was), Some(*is)),
        };
        if &key.cluster != cluster {
            continue;
        }
        if let Some(was) = was.filter(|w| Some(*w) != is) {
            used.remove(&was);
            freed = true;
        }
        if let Some(is) = is {
            used.insert(is);
        }
        touched.insert(key.clone());
    }
    for key in touched {
        let wanted = newer
            .service(&key.service)
            .is_some_and(|view| match &key.target {
                None => true,
                Some(target) => pinned.covers(&key.service) && view.clusters.contains_key(target),
            });
        let has = newer.vip_map().contains_key(&key);
        if wanted && !has {
            plan.missing.insert(key.clone());
        } else {
            plan.missing.remove(&key);
        }
        if has && !wanted {
            plan.unused.insert(key);
        } else {
            plan.unused.remove(&key);
        }
    }
    freed
}

/// The `due` keys of `missing` in the order they are allocated: every clusterset VIP before
/// any pinned one (a range too small for every pinned name still serves every clusterset
/// name, and the names most clients use answer first). Pure.
pub fn allocation_order(missing: &BTreeSet<VipKey>, due: impl Fn(&VipKey) -> bool) -> Vec<VipKey> {
    let clusterset = missing.iter().filter(|k| k.target.is_none());
    let pinned = missing.iter().filter(|k| k.target.is_some());
    clusterset
        .chain(pinned)
        .filter(|k| due(k))
        .cloned()
        .collect()
}

/// Clusterset services of `snapshot` that `cluster` cannot answer yet, in name order: no
/// VIP in the snapshot and no failed allocation in `progress` (a failed one is retried with
/// backoff and logged; waiting for it would keep a gateway with a full range unready
/// forever). Readiness waits until this is empty. Pure.
///
/// One ordered walk over the services beside the cluster's clusterset VIPs (both in
/// service order), not a lookup per service: readiness asks again at every snapshot while
/// a joining gateway allocates its VIPs, which at 10,000 services were 10,000 lookups ×
/// some 300 allocation transactions (docs/scale.md).
pub fn unanswered<'a>(
    snapshot: &'a Snapshot,
    cluster: &'a ClusterName,
    progress: &'a VipProgress,
) -> impl Iterator<Item = &'a ServiceKey> + 'a {
    let mut vips = snapshot
        .vips_of(cluster)
        .filter(|(k, _)| k.target.is_none())
        .map(|(k, _)| &k.service)
        .peekable();
    snapshot
        .services()
        .map(|view| &view.key)
        .filter(move |key| {
            while vips.next_if(|v| *v < *key).is_some() {}
            vips.next_if(|v| *v == *key).is_none()
        })
        .filter(move |key| {
            progress.failing.is_empty()
                || !progress.failing.contains(&VipKey {
                    cluster: cluster.clone(),
                    service: (*key).clone(),
                    target: None,
                })
        })
}

/// The first of `seed`'s candidates in `cidr` (at most [`probe_limit`]) that `taken` does
/// not hold. Pure.
pub fn pick(cidr: IpNet, seed: u128, taken: impl Fn(&IpAddr) -> bool) -> Option<IpAddr> {
    (0..probe_limit(cidr))
        .filter_map(|probe| candidate(cidr, seed, probe))
        .find(|ip| !taken(ip))
}

/// FNV-1a: stable across builds and machines, so every replica probes the same addresses.
fn stable_hash(bytes: &[u8]) -> u128 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    u128::from(h)
}

/// The first usable offset in `cidr` and the number of usable addresses: IPv4 ranges
/// larger than /31 lose their network and broadcast addresses. Pure.
fn usable(cidr: IpNet) -> (u128, u128) {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    match cidr {
        IpNet::V4(_) if host_bits >= 2 => (1, (1u128 << host_bits) - 2),
        _ => (0, 1u128.checked_shl(host_bits).unwrap_or(u128::MAX)),
    }
}

/// How many of `cidr`'s addresses pinned names may hold: half. A pinned VIP is picked only
/// while fewer addresses than that are in use, so clusterset names (one per service, the
/// names most clients use) always find room, services added later included: at 100 × 1,000
/// with `pinned_names: all` the pinned VIPs filled a /16 and a new service got no VIP at
/// all (docs/scale.md, "Pinned names: the decision"). Half is also where hashed probing
/// starts to miss (the rule of thumb there). Pure.
pub fn pinned_cap(cidr: IpNet) -> u128 {
    usable(cidr).1 / 2
}

/// Addresses one allocation tries in `cidr`: [`MAX_PROBES`], or fewer when the range is
/// smaller (probing a /30 64 times would ask about its two addresses 32 times each). Pure.
pub fn probe_limit(cidr: IpNet) -> u32 {
    let (_, count) = usable(cidr);
    u32::try_from(count.min(u128::from(MAX_PROBES))).unwrap_or(MAX_PROBES)
}

/// Whether one allocation's probes try every usable address of `cidr`, so that its
/// failure means the range is full for every key. Pure.
pub fn probes_cover_range(cidr: IpNet) -> bool {
    let (_, count) = usable(cidr);
    count <= u128::from(probe_limit(cidr))
}

/// The `probe`-th candidate address for a key with hash `seed` in `cidr`. Skips the network
/// and broadcast addresses of IPv4 ranges larger than /31. `None` if the range is empty.
pub fn candidate(cidr: IpNet, seed: u128, probe: u32) -> Option<IpAddr> {
    // Number of usable offsets and the first one.
    let (first, count) = usable(cidr);
    if count == 0 {
        return None;
    }
    let offset = first + (seed.wrapping_add(u128::from(probe))) % count;
    Some(match cidr {
        IpNet::V4(net) => {
            let base = u32::from(net.network());
            IpAddr::V4(Ipv4Addr::from(
                base.wrapping_add(u32::try_from(offset).ok()?),
            ))
        }
        IpNet::V6(net) => {
            let base = u128::from(net.network());
            IpAddr::V6(Ipv6Addr::from(base.wrapping_add(offset)))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_stay_inside_the_range() {
        let table = [
            ("127.77.0.0/16", 65534u128),
            ("10.0.0.0/30", 2),
            ("10.0.0.0/31", 2),
            ("10.0.0.7/32", 1),
            ("fd00::/120", 256),
        ];
        for (cidr, count) in table {
            let net: IpNet = cidr.parse().expect("cidr");
            let mut seen = BTreeSet::new();
            for probe in 0..600 {
                let ip = candidate(net, stable_hash(b"svc"), probe).expect("candidate");
                assert!(net.contains(&ip), "{ip} in {cidr}");
                if let (IpNet::V4(n), IpAddr::V4(v4)) = (net, ip)
                    && n.prefix_len() < 31
                {
                    assert_ne!(v4, n.network());
                    assert_ne!(v4, n.broadcast());
                }
                seen.insert(ip);
            }
            assert_eq!(seen.len() as u128, count.min(600), "{cidr}");
        }
        // Same key, same first candidate: replicas agree without talking.
        let net: IpNet = "127.77.0.0/16".parse().expect("cidr");
        assert_eq!(
            candidate(net, stable_hash(b"a"), 0),
            candidate(net, stable_hash(b"a"), 0)
        );
    }

    #[test]
    fn probes_stop_at_the_size_of_small_ranges() {
        let table = [
            ("127.77.0.0/16", MAX_PROBES, false),
            ("10.0.0.0/26", 62, true),
            ("10.0.0.0/25", MAX_PROBES, false),
            ("10.0.0.0/30", 2, true),
            ("10.0.0.7/32", 1, true),
            ("fd00::/120", MAX_PROBES, false),
            ("fd00::/64", MAX_PROBES, false),
        ];
        for (cidr, limit, covers) in table {
            let net: IpNet = cidr.parse().expect("cidr");
            assert_eq!(probe_limit(net), limit, "{cidr}");
            assert_eq!(probes_cover_range(net), covers, "{cidr}");
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(retry_delay(0), RETRY_MIN);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    fn key(name: &str) -> VipKey {
        VipKey {
            cluster: ClusterName::new("east").expect("cluster"),
            service: format!("{name}.prod").parse().expect("service"),
            target: None,
        }
    }

    #[test]
    fn retries_back_off_per_key_and_reset() {
        let t0 = Instant::now();
        let mut r = Retries::default();
        let (a, b) = (key("a"), key("b"));
        assert!(r.is_due(&a, t0));
        assert_eq!(r.failed(&a, FailureKind::Exhausted, t0), (RETRY_MIN, true));
        assert!(!r.is_due(&a, t0 + Duration::from_millis(999)));
        assert!(r.is_due(&a, t0 + RETRY_MIN));
        assert!(r.is_due(&b, t0), "backoff is per key");
        // Repeats double and are not worth another warning; a new kind starts over.
        assert_eq!(
            r.failed(&a, FailureKind::Exhausted, t0),
            (Duration::from_secs(2), false)
        );
        assert_eq!(r.failed(&a, FailureKind::Store, t0), (RETRY_MIN, true));
        // Success forgets the key.
        r.succeeded(&a);
        assert!(r.is_due(&a, t0) && r.is_empty());
        // Freed room ends only the "range full" backoffs.
        r.failed(&a, FailureKind::Exhausted, t0);
        r.failed(&b, FailureKind::Corrupt, t0);
        r.reset_kind(FailureKind::Exhausted);
        assert!(r.is_due(&a, t0) && !r.is_due(&b, t0));
        // A key that is no longer missing is forgotten.
        r.retain_only(&BTreeSet::from([a.clone()]));
        assert!(r.is_due(&b, t0) && r.is_empty());
    }

    mod scale {
        use super::*;
        use meshup_core::catalog::Change;
        use meshup_core::fixture::{
            cluster, export, gateway, put_export, put_gateway, put_vip, service, snapshot,
        };

        fn ip(s: &str) -> IpAddr {
            s.parse().expect("ip")
        }

        /// west and north export pay.prod, west exports db.prod.
        fn catalog(vips: Vec<Change>) -> Snapshot {
            let mut changes = vec![
                put_gateway(gateway("west", "w1")),
                put_gateway(gateway("north", "n1")),
                put_export("west", "w1", "pay.prod", export(80, 1)),
                put_export("north", "n1", "pay.prod", export(80, 1)),
                put_export("west", "w1", "db.prod", export(5432, 1)),
            ];
            changes.extend(vips);
            snapshot(changes)
        }

        fn vip_key(service_key: &str, target: Option<&str>) -> VipKey {
            VipKey {
                cluster: cluster("east"),
                service: service(service_key),
                target: target.map(cluster),
            }
        }

        #[test]
        fn pinned_names_decide_which_pinned_vips_are_wanted() {
            let snap = catalog(vec![]);
            let only_pay = PinnedNames::Only([service("pay.prod")].into());
            type Case<'a> = (&'a PinnedNames, &'a [(&'a str, Option<&'a str>)]);
            let cases: &[Case] = &[
                (
                    &PinnedNames::All,
                    &[
                        ("db.prod", None),
                        ("db.prod", Some("west")),
                        ("pay.prod", None),
                        ("pay.prod", Some("north")),
                        ("pay.prod", Some("west")),
                    ],
                ),
                (&PinnedNames::None, &[("db.prod", None), ("pay.prod", None)]),
                (
                    &only_pay,
                    &[
                        ("db.prod", None),
                        ("pay.prod", None),
                        ("pay.prod", Some("north")),
                        ("pay.prod", Some("west")),
                    ],
                ),
            ];
            for (pinned, want) in cases {
                let want: BTreeSet<VipKey> = want.iter().map(|(s, t)| vip_key(s, *t)).collect();
                assert_eq!(wanted(&snap, &cluster("east"), pinned), want, "{pinned:?}");
            }
            // Switching pinned names off makes the pinned VIPs unused (freed after the grace).
            let held = catalog(vec![put_vip(
                "east",
                "pay.prod",
                Some("west"),
                ip("127.77.0.9"),
            )]);
            let plan = plan(&held, &cluster("east"), &PinnedNames::None);
            assert_eq!(plan.unused, [vip_key("pay.prod", Some("west"))].into());
        }

        /// Replanning step by step equals a whole plan of each snapshot, and the addresses
        /// in use follow this cluster's VIPs, under every pinned-names setting.
        #[test]
        fn replanning_the_changes_equals_a_whole_plan() {
            use meshup_core::catalog::ExportKey;
            let export_key = |c: &str, id: &str, s: &str| ExportKey {
                cluster: cluster(c),
                gateway: meshup_core::fixture::gateway_id(id),
                service: service(s),
            };
            type Step = (&'static str, Vec<Change>, bool);
            let steps: Vec<Step> = vec![
                (
                    "this cluster's clusterset VIP and another cluster's",
                    vec![
                        put_vip("east", "pay.prod", None, ip("127.77.0.1")),
                        put_vip("south", "pay.prod", None, ip("127.66.0.1")),
                    ],
                    false,
                ),
                (
                    "a pinned VIP",
                    vec![put_vip("east", "pay.prod", Some("west"), ip("127.77.0.2"))],
                    false,
                ),
                (
                    "a new service",
                    vec![put_export("north", "n1", "new.prod", export(80, 1))],
                    false,
                ),
                (
                    "endpoint churn only",
                    vec![put_export("west", "w1", "pay.prod", export(80, 3))],
                    false,
                ),
                (
                    "a cluster stops exporting a service: its pinned VIP is unused",
                    vec![Change::DeleteExport(export_key("west", "w1", "pay.prod"))],
                    false,
                ),
                (
                    "the unused VIP freed",
                    vec![Change::DeleteVip(vip_key("pay.prod", Some("west")))],
                    true,
                ),
                (
                    "a VIP moved to another address",
                    vec![put_vip("east", "pay.prod", None, ip("127.77.0.3"))],
                    true,
                ),
                (
                    "a service gone with its VIP",
                    vec![
                        Change::DeleteExport(export_key("west", "w1", "db.prod")),
                        put_vip("east", "db.prod", None, ip("127.77.0.4")),
                    ],
                    false,
                ),
                (
                    "and its VIP freed",
                    vec![Change::DeleteVip(vip_key("db.prod", None))],
                    true,
                ),
            ];
            let only_pay = PinnedNames::Only([service("pay.prod")].into());
            for pinned in [PinnedNames::All, PinnedNames::None, only_pay] {
                let east = cluster("east");
                let mut older = catalog(vec![]);
                let mut work = plan(&older, &east, &pinned);
                let mut used: HashSet<IpAddr> = HashSet::new();
                for (name, changes, freed) in &steps {
                    let mut newer = older.clone();
                    for change in changes {
                        newer.apply(change.clone());
                    }
                    let was_freed = replan(&mut work, &mut used, &older, &newer, &east, &pinned);
                    assert_eq!(work, plan(&newer, &east, &pinned), "{pinned:?}, {name}");
                    let addresses: HashSet<IpAddr> =
                        newer.vips_of(&east).map(|(_, ip)| ip).collect();
                    assert_eq!(used, addresses, "{pinned:?}, {name}: addresses in use");
                    assert_eq!(was_freed, *freed, "{pinned:?}, {name}: freed");
                    older = newer;
                }
            }
        }

        #[test]
        fn clusterset_vips_are_allocated_before_any_pinned_one() {
            let missing: BTreeSet<VipKey> = [
                vip_key("a.prod", None),
                vip_key("a.prod", Some("west")),
                vip_key("b.prod", None),
                vip_key("b.prod", Some("west")),
                vip_key("c.prod", None),
            ]
            .into();
            assert_eq!(
                allocation_order(&missing, |_| true),
                vec![
                    vip_key("a.prod", None),
                    vip_key("b.prod", None),
                    vip_key("c.prod", None),
                    vip_key("a.prod", Some("west")),
                    vip_key("b.prod", Some("west")),
                ]
            );
            // Keys backing off are left out.
            let not_b = |k: &VipKey| k.service != service("b.prod");
            assert_eq!(
                allocation_order(&missing, not_b),
                vec![
                    vip_key("a.prod", None),
                    vip_key("c.prod", None),
                    vip_key("a.prod", Some("west")),
                ]
            );
        }

        #[test]
        fn pick_skips_taken_addresses_and_gives_up_after_the_probes() {
            let net: IpNet = "10.0.0.0/24".parse().expect("cidr");
            let seed = stable_hash(b"/vips/east/pay.prod");
            let first = candidate(net, seed, 0).expect("candidate");
            let second = candidate(net, seed, 1).expect("candidate");
            assert_eq!(pick(net, seed, |_| false), Some(first));
            assert_eq!(pick(net, seed, |a| *a == first), Some(second));
            // Same key, same first pick: replicas with the same snapshot agree.
            assert_eq!(pick(net, seed, |_| false), pick(net, seed, |_| false));
            // Every probe taken: none (the caller reports the range full).
            assert_eq!(pick(net, seed, |_| true), None);
            let tiny: IpNet = "10.0.0.0/30".parse().expect("cidr");
            let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
            assert_eq!(pick(tiny, seed, |x| *x == a || *x == b), None);
        }

        /// Pinned names stop at half the range; clusterset names still get the rest.
        #[tokio::test]
        async fn pinned_names_leave_half_the_range_to_clusterset_names() {
            let cidr: IpNet = "10.0.0.0/28".parse().expect("cidr");
            assert_eq!(pinned_cap(cidr), 7, "14 usable addresses");
            let allocator = VipAllocator::new(
                Arc::new(crate::embedded::EmbeddedStore::new()),
                KeyLayout::new("/t").expect("layout"),
                VipConfig {
                    cluster: cluster("east"),
                    cidr,
                    grace: Duration::from_secs(1),
                    pinned: PinnedNames::All,
                },
                Metrics::default(),
            );
            let pinned: Vec<VipKey> = (0..10)
                .map(|i| vip_key(&format!("s{i}.prod"), Some("west")))
                .collect();
            let mut used = HashSet::new();
            let (picked, refused) = allocator.pick_batch(&pinned, &mut used);
            assert_eq!(picked.0.len(), 7, "pinned names take half");
            assert_eq!(refused.len(), 3);
            assert!(
                refused
                    .iter()
                    .all(|(_, r)| matches!(r, Err(VipError::PinnedFull { cap: 7, .. }))),
                "{refused:?}"
            );
            assert!(
                refused
                    .iter()
                    .all(|(_, r)| FailureKind::of(r.as_ref().expect_err("refused"))
                        == FailureKind::Exhausted),
                "retried when an address is freed"
            );
            let clusterset: Vec<VipKey> = (0..7)
                .map(|i| vip_key(&format!("s{i}.prod"), None))
                .collect();
            let (picked, refused) = allocator.pick_batch(&clusterset, &mut used);
            assert!(refused.is_empty(), "{refused:?}");
            assert_eq!(picked.0.len(), 7, "clusterset names take the other half");
            assert_eq!(used.len(), 14);
        }

        #[test]
        fn unanswered_lists_clusterset_services_without_a_vip_that_did_not_fail() {
            let none = VipProgress::default();
            let cases: &[(Vec<Change>, &VipProgress, &[&str])] = &[
                (vec![], &none, &["db.prod", "pay.prod"]),
                (
                    vec![put_vip("east", "pay.prod", None, ip("127.77.0.1"))],
                    &none,
                    &["db.prod"],
                ),
                // A pinned VIP does not answer the clusterset name.
                (
                    vec![put_vip("east", "db.prod", Some("west"), ip("127.77.0.2"))],
                    &none,
                    &["db.prod", "pay.prod"],
                ),
                // Another cluster's VIP does not either.
                (
                    vec![put_vip("north", "db.prod", None, ip("127.77.0.3"))],
                    &none,
                    &["db.prod", "pay.prod"],
                ),
                (
                    vec![
                        put_vip("east", "pay.prod", None, ip("127.77.0.1")),
                        put_vip("east", "db.prod", None, ip("127.77.0.2")),
                    ],
                    &none,
                    &[],
                ),
                // VIPs of services gone from the catalog (in their grace period) before,
                // between and after the services do not answer them.
                (
                    vec![
                        put_vip("east", "aaa.prod", None, ip("127.77.0.4")),
                        put_vip("east", "eee.prod", None, ip("127.77.0.5")),
                        put_vip("east", "pay.prod", Some("west"), ip("127.77.0.6")),
                        put_vip("east", "zzz.prod", None, ip("127.77.0.7")),
                        put_vip("east", "pay.prod", None, ip("127.77.0.1")),
                    ],
                    &none,
                    &["db.prod"],
                ),
            ];
            for (vips, progress, want) in cases {
                let snap = catalog(vips.clone());
                let want: Vec<ServiceKey> = want.iter().map(|s| service(s)).collect();
                assert_eq!(
                    unanswered(&snap, &cluster("east"), progress)
                        .cloned()
                        .collect::<Vec<_>>(),
                    want,
                    "{vips:?}"
                );
            }
            // A failed allocation (full range, corrupt record, store down) does not hold
            // readiness: it is retried and logged.
            let failing = VipProgress {
                failing: [vip_key("db.prod", None)].into(),
            };
            assert_eq!(
                unanswered(&catalog(vec![]), &cluster("east"), &failing)
                    .cloned()
                    .collect::<Vec<_>>(),
                vec![service("pay.prod")]
            );
        }
    }
}

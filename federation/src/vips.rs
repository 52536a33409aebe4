//! VIP allocation: one address per clusterset service (and per service and target cluster
//! for cluster-pinned names) from the cluster's `vip_cidr`.
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
//! on the `CancellationToken` (or when the snapshot channel closes).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use meshup_core::catalog::{Snapshot, VipKey};
use meshup_core::model::{SCHEMA_VERSION, VipRecord, decode, encode};
use meshup_core::names::ClusterName;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
/// How often the reconciler re-checks even without catalog changes (grace expiry, retries).
const RECONCILE_TICK: Duration = Duration::from_secs(1);

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
        m
    }
}

/// Allocates and frees one cluster's VIPs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct VipAllocator {
    store: Arc<dyn Store>,
    layout: KeyLayout,
    config: VipConfig,
    metrics: Metrics,
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
        }
    }

    /// The VIP of `key`: the existing one, or a new one allocated by transaction. Replicas
    /// calling this at once get the same address.
    pub async fn allocate(&self, key: &VipKey) -> Result<IpAddr, VipError> {
        let vip_key = Bytes::from(self.layout.vip(key));
        let owner = self.layout.vip(key);
        let seed = stable_hash(owner.as_bytes());
        for probe in 0..MAX_PROBES {
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
            probes: MAX_PROBES,
        })
    }

    /// Frees `key`'s VIP and its address claim. Returns whether this call freed it.
    pub async fn release(&self, key: &VipKey) -> Result<bool, VipError> {
        let vip_key = self.layout.vip(key);
        let Some(existing) = store::get(self.store.as_ref(), vip_key.clone()).await? else {
            return Ok(false);
        };
        let mut success = vec![TxnOp::Delete {
            key: Bytes::from(vip_key.clone()),
        }];
        if let Ok(record) = decode::<VipRecord>(&existing.value) {
            success.push(TxnOp::Delete {
                key: Bytes::from(self.layout.address_claim(&self.config.cluster, record.vip)),
            });
        }
        let result = self
            .store
            .txn(Txn {
                compares: vec![Compare::ModRevision(
                    Bytes::from(vip_key.clone()),
                    existing.mod_revision,
                )],
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
        let mut tick = tokio::time::interval(
            RECONCILE_TICK.min(self.config.grace.max(Duration::from_millis(50))),
        );
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = snapshots.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let snapshot = snapshots.borrow_and_update().clone();
            // Revision 0: the watcher has not listed yet; an empty catalog would free
            // every VIP.
            if snapshot.revision == 0 {
                continue;
            }
            let plan = plan(&snapshot, &self.config.cluster);
            for key in &plan.missing {
                if cancel.is_cancelled() {
                    return;
                }
                if let Err(e) = self.allocate(key).await {
                    tracing::warn!(error = %e, key = %self.layout.vip(key), "VIP allocation failed; will retry");
                    self.metrics
                        .errors
                        .get_or_create(&ErrorLabels {
                            error: error_label(&e),
                        })
                        .inc();
                }
            }
            let now = Instant::now();
            unused_since.retain(|k, _| plan.unused.contains(k));
            for key in &plan.unused {
                let since = *unused_since.entry(key.clone()).or_insert(now);
                if now.duration_since(since) < self.config.grace {
                    continue;
                }
                match self.release(key).await {
                    Ok(_) => {
                        unused_since.remove(key);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, key = %self.layout.vip(key), "freeing VIP failed; will retry");
                        self.metrics
                            .errors
                            .get_or_create(&ErrorLabels {
                                error: error_label(&e),
                            })
                            .inc();
                    }
                }
            }
        }
    }
}

fn error_label(e: &VipError) -> &'static str {
    match e {
        VipError::Store(s) => s.label(),
        VipError::Exhausted { .. } => "exhausted",
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
/// cluster) for the cluster-pinned names.
pub fn wanted(snapshot: &Snapshot, cluster: &ClusterName) -> BTreeSet<VipKey> {
    let mut keys = BTreeSet::new();
    for view in snapshot.services() {
        keys.insert(VipKey {
            cluster: cluster.clone(),
            service: view.key.clone(),
            target: None,
        });
        for target in view.clusters.keys() {
            keys.insert(VipKey {
                cluster: cluster.clone(),
                service: view.key.clone(),
                target: Some(target.clone()),
            });
        }
    }
    keys
}

/// Compares what `cluster` needs with what the snapshot has.
pub fn plan(snapshot: &Snapshot, cluster: &ClusterName) -> VipPlan {
    let wanted = wanted(snapshot, cluster);
    let have: BTreeSet<VipKey> = snapshot
        .vips()
        .filter(|(k, _)| &k.cluster == cluster)
        .map(|(k, _)| k.clone())
        .collect();
    VipPlan {
        missing: wanted.difference(&have).cloned().collect(),
        unused: have.difference(&wanted).cloned().collect(),
    }
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

/// The `probe`-th candidate address for a key with hash `seed` in `cidr`. Skips the network
/// and broadcast addresses of IPv4 ranges larger than /31. `None` if the range is empty.
pub fn candidate(cidr: IpNet, seed: u128, probe: u32) -> Option<IpAddr> {
    let host_bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    // Number of usable offsets and the first one.
    let (first, count): (u128, u128) = match cidr {
        IpNet::V4(_) if host_bits >= 2 => (1, (1u128 << host_bits) - 2),
        _ => (0, 1u128.checked_shl(host_bits).unwrap_or(u128::MAX)),
    };
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
}

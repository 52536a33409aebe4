//! The catalog snapshot: the federation as one gateway sees it at one etcd revision.
//!
//! A `Snapshot` is a value. The watcher task owns one, applies `Change`s to it and publishes
//! clones (`Arc<Snapshot>`) on a `tokio::sync::watch` channel; readers (DNS, router) never
//! lock. The maps are persistent (`imbl`), so a clone is O(1) and one change costs
//! O(log n): updating one service in a catalog of 100k exports touches a handful of nodes,
//! not the whole snapshot.
//!
//! Besides the raw records, the snapshot keeps one derived `ServiceView` per clusterset
//! service (the union of every cluster's export of it), recomputed from that service's own
//! exports only when one of them changes.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use imbl::OrdMap;
use imbl::ordmap::DiffItem;

use crate::model::{ExportRecord, GatewayRecord, PortSpec};
use crate::names::{ClusterName, DrillId, GatewayId, Namespace, ServiceKey};
use crate::policy::{DrillRecord, PolicyRecord};
use crate::routes::CompiledRoutes;

/// Identifies one export: which gateway of which cluster exports which service.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExportKey {
    pub cluster: ClusterName,
    pub gateway: GatewayId,
    pub service: ServiceKey,
}

/// Identifies one VIP: the VIP `cluster`'s gateways listen on for `service`; with a
/// `target`, the cluster-pinned VIP that reaches only that target cluster.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VipKey {
    pub cluster: ClusterName,
    pub service: ServiceKey,
    pub target: Option<ClusterName>,
}

/// One change to the catalog, already decoded and validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    PutGateway(Arc<GatewayRecord>),
    DeleteGateway {
        cluster: ClusterName,
        gateway: GatewayId,
    },
    PutExport(ExportKey, Arc<ExportRecord>),
    DeleteExport(ExportKey),
    PutVip(VipKey, IpAddr),
    DeleteVip(VipKey),
    /// A clusterset service's failover policy.
    PutPolicy(ServiceKey, Arc<PolicyRecord>),
    DeletePolicy(ServiceKey),
    /// A clusterset service's per-request routing rules.
    PutRoutes(ServiceKey, Arc<CompiledRoutes>),
    DeleteRoutes(ServiceKey),
    /// An operator drill (in force or not: its times say).
    PutDrill(DrillId, Arc<DrillRecord>),
    DeleteDrill(DrillId),
}

/// What one cluster contributes to a clusterset service, summed over its gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterExport {
    /// Gateways of this cluster that export the service.
    pub gateways: u32,
    /// Endpoint counts: the largest any gateway of the cluster reported (replicas of one
    /// cluster see the same local endpoints, so counts are not summed).
    pub endpoints_total: u32,
    pub endpoints_healthy: u32,
    /// Callers allowed by this cluster's export; empty means everyone.
    pub allowed_callers: Box<[ClusterName]>,
}

/// A clusterset service: the union of all clusters' exports of one `<name>.<ns>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub key: ServiceKey,
    /// Ports by name. When clusters disagree on a port's definition, the cluster whose name
    /// sorts first wins, so every gateway derives the same answer from the same catalog.
    pub ports: Vec<PortSpec>,
    /// Clusters exporting the service.
    pub clusters: BTreeMap<ClusterName, ClusterExport>,
}

impl ServiceView {
    /// Clusters that export the service with at least one healthy endpoint.
    pub fn healthy_clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.clusters
            .iter()
            .filter(|(_, c)| c.endpoints_healthy > 0)
            .map(|(name, _)| name)
    }

    /// The port with this name, if the service has one.
    pub fn port(&self, name: &str) -> Option<&PortSpec> {
        self.ports.iter().find(|p| p.name == name)
    }

    /// Whether the two views address the service differently: other ports or another set of
    /// exporting clusters (what names, VIPs and listeners are derived from). Endpoint counts
    /// and allowed callers are not compared.
    pub fn addressing_differs(&self, other: &ServiceView) -> bool {
        self.ports != other.ports || !self.clusters.keys().eq(other.clusters.keys())
    }
}

type ServiceExports = OrdMap<(ClusterName, GatewayId), Arc<ExportRecord>>;

/// The federation's catalog at one revision. Cheap to clone; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The store revision this snapshot reflects (0 before the first sync).
    pub revision: i64,
    gateways: OrdMap<ClusterName, OrdMap<GatewayId, Arc<GatewayRecord>>>,
    exports: OrdMap<ServiceKey, ServiceExports>,
    services: OrdMap<ServiceKey, Arc<ServiceView>>,
    vips: OrdMap<VipKey, IpAddr>,
    policies: OrdMap<ServiceKey, Arc<PolicyRecord>>,
    routes: OrdMap<ServiceKey, Arc<CompiledRoutes>>,
    drills: OrdMap<DrillId, Arc<DrillRecord>>,
    export_count: usize,
    /// For every (cluster, namespace): how many services of the namespace list the cluster
    /// in their view. Kept with the views, so "does cluster X export anything (in namespace
    /// N)?" is a lookup, not a scan of every service.
    exporting: OrdMap<(ClusterName, Namespace), u32>,
}

impl Snapshot {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one change. Returns whether anything changed.
    pub fn apply(&mut self, change: Change) -> bool {
        let (changed, touched) = self.apply_raw(change);
        if let Some(service) = touched {
            self.refresh_view(service);
        }
        changed
    }

    /// Applies one change to the records; returns whether anything changed and, for an
    /// export change, the service whose view the caller must derive again.
    fn apply_raw(&mut self, change: Change) -> (bool, Option<ServiceKey>) {
        let changed = match change {
            Change::PutGateway(record) => {
                let mut of_cluster = self
                    .gateways
                    .get(&record.cluster)
                    .cloned()
                    .unwrap_or_default();
                let old = of_cluster.insert(record.gateway_id.clone(), record.clone());
                let changed = old.as_deref() != Some(&*record);
                self.gateways.insert(record.cluster.clone(), of_cluster);
                changed
            }
            Change::DeleteGateway { cluster, gateway } => {
                let Some(mut of_cluster) = self.gateways.get(&cluster).cloned() else {
                    return (false, None);
                };
                let changed = of_cluster.remove(&gateway).is_some();
                if of_cluster.is_empty() {
                    self.gateways.remove(&cluster);
                } else {
                    self.gateways.insert(cluster, of_cluster);
                }
                changed
            }
            Change::PutExport(key, mut record) => {
                let at = self.interned(key.cluster, key.gateway);
                let of_service = self.exports.get(&key.service);
                if of_service.and_then(|m| m.get(&at)).map(|r| &**r) == Some(&*record) {
                    return (false, None);
                }
                // The service's records share one port list when their ports are the same
                // (a record just decoded is ours alone to change).
                if let Some(first) = of_service.and_then(|m| m.values().next())
                    && !first.ports.shares(&record.ports)
                    && first.ports == record.ports
                    && let Some(fresh) = Arc::get_mut(&mut record)
                {
                    fresh.ports = first.ports.clone();
                }
                // In place: a map no published snapshot shares (a list being reduced) is
                // changed without copying its path.
                let added = match self.exports.get_mut(&key.service) {
                    Some(of_service) => of_service.insert(at, record).is_none(),
                    None => {
                        self.exports
                            .insert(key.service.clone(), OrdMap::unit(at, record));
                        true
                    }
                };
                if added {
                    self.export_count += 1;
                }
                return (true, Some(key.service));
            }
            Change::DeleteExport(key) => {
                let at = (key.cluster, key.gateway);
                if !self
                    .exports
                    .get(&key.service)
                    .is_some_and(|m| m.contains_key(&at))
                {
                    return (false, None);
                }
                let Some(of_service) = self.exports.get_mut(&key.service) else {
                    return (false, None);
                };
                of_service.remove(&at);
                if of_service.is_empty() {
                    self.exports.remove(&key.service);
                }
                self.export_count -= 1;
                return (true, Some(key.service));
            }
            Change::PutVip(key, vip) => self.vips.insert(key, vip) != Some(vip),
            Change::DeleteVip(key) => self.vips.remove(&key).is_some(),
            Change::PutPolicy(key, policy) => {
                self.policies.insert(key, policy.clone()).as_deref() != Some(&*policy)
            }
            Change::DeletePolicy(key) => self.policies.remove(&key).is_some(),
            Change::PutRoutes(key, routes) => {
                self.routes.insert(key, routes.clone()).as_deref() != Some(&*routes)
            }
            Change::DeleteRoutes(key) => self.routes.remove(&key).is_some(),
            Change::PutDrill(id, drill) => {
                self.drills.insert(id, drill.clone()).as_deref() != Some(&*drill)
            }
            Change::DeleteDrill(id) => self.drills.remove(&id).is_some(),
        };
        (changed, None)
    }

    /// The cluster's and gateway's names as the gateway records hold them, when they do: an
    /// export's key then shares their strings instead of holding copies of its own (at
    /// 1M exports, two allocations per record less).
    fn interned(&self, cluster: ClusterName, gateway: GatewayId) -> (ClusterName, GatewayId) {
        let Some((cluster, of_cluster)) = self.gateways.get_key_value(&cluster) else {
            return (cluster, gateway);
        };
        let gateway = of_cluster
            .get_key_value(&gateway)
            .map_or(gateway, |(id, _)| id.clone());
        (cluster.clone(), gateway)
    }

    /// Derives a service's view again from its exports alone (removes it when none are
    /// left), and moves the exporting index along.
    fn refresh_view(&mut self, service: ServiceKey) {
        let Some(exports) = self.exports.get(&service) else {
            if let Some(old) = self.services.remove(&service) {
                self.count_exporting(&service.namespace, Some(&old), None);
            }
            return;
        };
        let view = Arc::new(derive_view(service.clone(), exports));
        let old = self.services.insert(service.clone(), view.clone());
        self.count_exporting(&service.namespace, old.as_deref(), Some(&view));
    }

    /// Moves the (cluster, namespace) counts from `old`'s clusters to `new`'s.
    fn count_exporting(
        &mut self,
        namespace: &Namespace,
        old: Option<&ServiceView>,
        new: Option<&ServiceView>,
    ) {
        fn clusters(v: Option<&ServiceView>) -> impl Iterator<Item = &ClusterName> {
            v.into_iter().flat_map(|v| v.clusters.keys())
        }
        for gone in clusters(old).filter(|c| !new.is_some_and(|n| n.clusters.contains_key(*c))) {
            let key = ((*gone).clone(), namespace.clone());
            match self.exporting.get(&key).copied() {
                Some(n) if n > 1 => {
                    self.exporting.insert(key, n - 1);
                }
                _ => {
                    self.exporting.remove(&key);
                }
            }
        }
        for came in clusters(new).filter(|c| !old.is_some_and(|o| o.clusters.contains_key(*c))) {
            let key = ((*came).clone(), namespace.clone());
            let n = self.exporting.get(&key).copied().unwrap_or(0);
            self.exporting.insert(key, n + 1);
        }
    }

    /// Whether any clusterset service lists `cluster` among its exporters; with
    /// `namespace`, any service of that namespace. A range of an index kept with the views.
    pub fn cluster_exports(&self, cluster: &ClusterName, namespace: Option<&Namespace>) -> bool {
        match namespace {
            Some(ns) => self.exporting.contains_key(&(cluster.clone(), ns.clone())),
            None => self
                .exporting
                .range((cluster.clone(), Namespace::lowest())..)
                .next()
                .is_some_and(|((c, _), _)| c == cluster),
        }
    }

    /// Every (cluster, namespace) with at least one service of the namespace exported by
    /// the cluster, in order: the index behind [`cluster_exports`](Self::cluster_exports).
    pub fn exporting_pairs(&self) -> impl Iterator<Item = &(ClusterName, Namespace)> {
        self.exporting.keys()
    }

    /// The persistent exporting index, for cheap diffs between two snapshots.
    pub fn exporting_map(&self) -> &OrdMap<(ClusterName, Namespace), u32> {
        &self.exporting
    }

    /// Every clusterset service, in name order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceView>> {
        self.services.values()
    }

    /// The persistent map of gateways by cluster, for cheap comparisons between snapshots.
    pub fn gateway_map(&self) -> &OrdMap<ClusterName, OrdMap<GatewayId, Arc<GatewayRecord>>> {
        &self.gateways
    }

    /// The persistent map of services, for cheap diffs between two snapshots.
    pub fn service_map(&self) -> &OrdMap<ServiceKey, Arc<ServiceView>> {
        &self.services
    }

    /// One clusterset service.
    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<ServiceView>> {
        self.services.get(key)
    }

    /// Number of clusterset services.
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// Number of export records (one per exporting gateway per service).
    pub fn export_count(&self) -> usize {
        self.export_count
    }

    /// The export record one gateway published for a service.
    pub fn export(&self, key: &ExportKey) -> Option<&Arc<ExportRecord>> {
        self.exports
            .get(&key.service)?
            .get(&(key.cluster.clone(), key.gateway.clone()))
    }

    /// Every export of one service: ((cluster, gateway), record).
    pub fn exports_of(
        &self,
        service: &ServiceKey,
    ) -> impl Iterator<Item = (&(ClusterName, GatewayId), &Arc<ExportRecord>)> {
        self.exports.get(service).into_iter().flat_map(|m| m.iter())
    }

    /// Every cluster that has at least one live gateway, in name order.
    pub fn clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.gateways.keys()
    }

    /// The gateways of one cluster.
    pub fn gateways_of(&self, cluster: &ClusterName) -> impl Iterator<Item = &Arc<GatewayRecord>> {
        self.gateways
            .get(cluster)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// Every gateway of the federation.
    pub fn gateways(&self) -> impl Iterator<Item = &Arc<GatewayRecord>> {
        self.gateways.values().flat_map(|m| m.values())
    }

    /// One gateway record.
    pub fn gateway(&self, cluster: &ClusterName, id: &GatewayId) -> Option<&Arc<GatewayRecord>> {
        self.gateways.get(cluster)?.get(id)
    }

    /// The VIP `cluster` uses for `service` (`target: None`), or for the cluster-pinned name
    /// of `service` in `target`.
    pub fn vip(
        &self,
        cluster: &ClusterName,
        service: &ServiceKey,
        target: Option<&ClusterName>,
    ) -> Option<IpAddr> {
        self.vips
            .get(&VipKey {
                cluster: cluster.clone(),
                service: service.clone(),
                target: target.cloned(),
            })
            .copied()
    }

    /// Whether the records operators write (policies, routing rules, drills) may differ from
    /// `other`'s: a pointer comparison of the persistent maps, so a snapshot derived from
    /// `other` by export, gateway or VIP changes alone answers `false` at once.
    pub fn operator_records_differ(&self, other: &Snapshot) -> bool {
        !(self.policies.ptr_eq(&other.policies)
            && self.routes.ptr_eq(&other.routes)
            && self.drills.ptr_eq(&other.drills))
    }

    /// Whether `other` may differ in what addresses, names and listeners follow: the VIPs,
    /// the gateways, a service that came or went, or a service whose ports or exporting
    /// clusters changed. Endpoint counts and allowed callers are not compared, so a catalog
    /// churning only those answers `false` after a diff of the changed services alone (the
    /// persistent maps share every untouched subtree).
    pub fn addressing_differs(&self, other: &Snapshot) -> bool {
        if !self.vips.ptr_eq(&other.vips) || !self.gateways.ptr_eq(&other.gateways) {
            return true;
        }
        self.services.diff(&other.services).any(|item| match item {
            DiffItem::Update {
                old: (_, was),
                new: (_, is),
            } => was.addressing_differs(is),
            _ => true,
        })
    }

    /// The services whose steering inputs (view, policy, drills, gateways) may differ
    /// between `older` and this snapshot: `None` when every service's may (an operator's
    /// record or a gateway changed), else those whose view changed, found by a diff of the
    /// persistent maps. Under churn of one service's endpoints that is one service.
    pub fn steering_changed_since(&self, older: &Snapshot) -> Option<Vec<ServiceKey>> {
        if self.operator_records_differ(older) || !self.gateways.ptr_eq(&older.gateways) {
            return None;
        }
        Some(
            older
                .services
                .diff(&self.services)
                .map(|item| match item {
                    DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k.clone(),
                    DiffItem::Update { new: (k, _), .. } => k.clone(),
                })
                .collect(),
        )
    }

    /// The VIPs `cluster` allocated for `service` (clusterset first, then pinned by target):
    /// a range of the map.
    pub fn vips_of_service<'a>(
        &'a self,
        cluster: &'a ClusterName,
        service: &'a ServiceKey,
    ) -> impl Iterator<Item = (&'a VipKey, IpAddr)> + 'a {
        let from = VipKey {
            cluster: cluster.clone(),
            service: service.clone(),
            target: None,
        };
        self.vips
            .range(from..)
            .take_while(move |(k, _)| k.cluster == *cluster && k.service == *service)
            .map(|(k, ip)| (k, *ip))
    }

    /// Every VIP `cluster` allocated (clusterset and pinned), in key order: a range of the
    /// map, so its cost follows that cluster's VIPs, not every (service, cluster) pair.
    pub fn vips_of<'a>(
        &'a self,
        cluster: &'a ClusterName,
    ) -> impl Iterator<Item = (&'a VipKey, IpAddr)> + 'a {
        let from = VipKey {
            cluster: cluster.clone(),
            service: ServiceKey::new(Namespace::lowest(), crate::names::ServiceName::lowest()),
            target: None,
        };
        self.vips
            .range(from..)
            .take_while(move |(k, _)| k.cluster == *cluster)
            .map(|(k, ip)| (k, *ip))
    }

    /// Every VIP allocated, with its key.
    pub fn vips(&self) -> impl Iterator<Item = (&VipKey, &IpAddr)> {
        self.vips.iter()
    }

    /// A service's failover policy, if an operator set one (else the default applies).
    pub fn policy(&self, service: &ServiceKey) -> Option<&Arc<PolicyRecord>> {
        self.policies.get(service)
    }

    /// A service's routing rules, if an operator set some (else the policy decides).
    pub fn routes(&self, service: &ServiceKey) -> Option<&Arc<CompiledRoutes>> {
        self.routes.get(service)
    }

    /// Every service's routing rules, by service.
    pub fn all_routes(&self) -> impl Iterator<Item = (&ServiceKey, &Arc<CompiledRoutes>)> {
        self.routes.iter()
    }

    /// Every policy, by service.
    pub fn policies(&self) -> impl Iterator<Item = (&ServiceKey, &Arc<PolicyRecord>)> {
        self.policies.iter()
    }

    /// Every drill record, in force or not (see [`DrillRecord::active`]), by id.
    pub fn drills(&self) -> impl Iterator<Item = (&DrillId, &Arc<DrillRecord>)> {
        self.drills.iter()
    }

    /// The persistent map of VIPs, for cheap diffs between two snapshots.
    pub fn vip_map(&self) -> &OrdMap<VipKey, IpAddr> {
        &self.vips
    }
}

/// Builds a service's view from its exports. Pure; called only for the service that changed.
/// Changes applied to a snapshot with each touched service's view derived once, when the
/// batch is finished, not once per change.
///
/// A list of the whole catalog arrives cluster by cluster (the store's key order), so
/// applying it change by change derives a service's view once per exporting cluster, each
/// time over every cluster so far: C²/2 cluster entries per service, 5,000 at 100 clusters.
/// A batch derives it once, over C.
#[derive(Debug, Default)]
pub struct Batch {
    snapshot: Snapshot,
    touched: HashSet<ServiceKey>,
}

impl Batch {
    /// A batch of changes to `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Self {
            snapshot,
            touched: HashSet::new(),
        }
    }

    /// Applies one change to the records; returns whether anything changed. The views of
    /// the services it touches are derived by [`Batch::finish`].
    pub fn apply(&mut self, change: Change) -> bool {
        let (changed, touched) = self.snapshot.apply_raw(change);
        self.touched.extend(touched);
        changed
    }

    /// Sets the revision the snapshot will reflect.
    pub fn set_revision(&mut self, revision: i64) {
        self.snapshot.revision = revision;
    }

    /// The snapshot, with the views of every touched service derived.
    pub fn finish(mut self) -> Snapshot {
        for service in self.touched {
            self.snapshot.refresh_view(service);
        }
        self.snapshot
    }
}

fn derive_view(key: ServiceKey, exports: &ServiceExports) -> ServiceView {
    // Collected in order, then built in one go: a B-tree built from sorted entries has full
    // nodes, one grown by inserts in order half-empty ones (at 1M records the views' maps
    // were about a tenth of the gateway's memory; docs/scale.md, "Memory per record").
    let mut clusters: Vec<(ClusterName, ClusterExport)> = Vec::new();
    let mut ports: BTreeMap<&str, &PortSpec> = BTreeMap::new();
    // Exports iterate in (cluster, gateway) order, so the first definition of a port name
    // comes from the cluster that sorts first, and a cluster's gateways come together.
    for ((cluster, _gateway), record) in exports {
        if clusters.last().is_none_or(|(last, _)| last != cluster) {
            clusters.push((
                cluster.clone(),
                ClusterExport {
                    gateways: 0,
                    endpoints_total: 0,
                    endpoints_healthy: 0,
                    allowed_callers: record.allowed_callers.as_slice().into(),
                },
            ));
        }
        let Some((_, entry)) = clusters.last_mut() else {
            continue;
        };
        entry.gateways += 1;
        entry.endpoints_total = entry.endpoints_total.max(record.endpoints_total);
        entry.endpoints_healthy = entry.endpoints_healthy.max(record.endpoints_healthy);
        for port in &record.ports {
            ports.entry(port.name.as_str()).or_insert(port);
        }
    }
    ServiceView {
        key,
        ports: ports.into_values().cloned().collect(),
        clusters: clusters.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{self, cluster};

    fn export(port: u16, healthy: u32) -> Arc<ExportRecord> {
        Arc::new(fixture::export(port, healthy))
    }

    fn key(c: &str, gw: &str, svc: &str) -> ExportKey {
        ExportKey {
            cluster: cluster(c),
            gateway: fixture::gateway_id(gw),
            service: fixture::service(svc),
        }
    }

    #[test]
    fn services_are_the_union_of_cluster_exports() {
        let mut snap = Snapshot::new();
        assert!(snap.apply(Change::PutExport(
            key("west", "gw-0", "pay.prod"),
            export(9090, 0)
        )));
        assert!(snap.apply(Change::PutExport(
            key("east", "gw-0", "pay.prod"),
            export(8080, 2)
        )));
        assert!(snap.apply(Change::PutExport(
            key("east", "gw-1", "pay.prod"),
            export(8080, 3)
        )));
        // Re-applying the same record is not a change.
        assert!(!snap.apply(Change::PutExport(
            key("east", "gw-1", "pay.prod"),
            export(8080, 3)
        )));

        let view = snap
            .service(&"pay.prod".parse().expect("valid"))
            .expect("present");
        assert_eq!(view.clusters.len(), 2);
        assert_eq!(view.clusters[&cluster("east")].gateways, 2);
        assert_eq!(view.clusters[&cluster("east")].endpoints_healthy, 3);
        // "east" sorts before "west", so east's definition of the port wins.
        assert_eq!(view.port("http").map(|p| p.port), Some(8080));
        let healthy: Vec<_> = view.healthy_clusters().cloned().collect();
        assert_eq!(healthy, vec![cluster("east")]);
        assert_eq!(snap.export_count(), 3);

        assert!(snap.apply(Change::DeleteExport(key("east", "gw-0", "pay.prod"))));
        assert!(snap.apply(Change::DeleteExport(key("east", "gw-1", "pay.prod"))));
        assert!(!snap.apply(Change::DeleteExport(key("east", "gw-1", "pay.prod"))));
        let view = snap
            .service(&"pay.prod".parse().expect("valid"))
            .expect("present");
        assert_eq!(view.port("http").map(|p| p.port), Some(9090));
        assert!(snap.apply(Change::DeleteExport(key("west", "gw-0", "pay.prod"))));
        assert_eq!(snap.service_count(), 0);
        assert_eq!(snap.export_count(), 0);
    }

    #[test]
    fn records_of_a_service_with_the_same_ports_share_one_list() {
        let mut snap = Snapshot::new();
        let record = |snap: &Snapshot, c: &str, svc: &str| {
            snap.export(&key(c, "gw-0", svc))
                .cloned()
                .expect("record in the snapshot")
        };
        for (c, svc, port) in [
            ("east", "pay.prod", 8080),
            ("west", "pay.prod", 8080),
            ("north", "pay.prod", 9090),
            ("south", "cart.prod", 8080),
        ] {
            snap.apply(Change::PutExport(key(c, "gw-0", svc), export(port, 1)));
        }
        let (east, west, north) = (
            record(&snap, "east", "pay.prod"),
            record(&snap, "west", "pay.prod"),
            record(&snap, "north", "pay.prod"),
        );
        assert!(
            east.ports.shares(&west.ports),
            "same ports, one service: one list"
        );
        assert!(
            !east.ports.shares(&north.ports),
            "other ports: a list of its own"
        );
        assert!(
            !east
                .ports
                .shares(&record(&snap, "south", "cart.prod").ports),
            "another service: its own list"
        );
        // A record that others hold too is left as it is (it is not ours to change).
        let held = export(8080, 2);
        snap.apply(Change::PutExport(
            key("west", "gw-0", "pay.prod"),
            held.clone(),
        ));
        assert!(Arc::ptr_eq(&record(&snap, "west", "pay.prod"), &held));
        assert_eq!(record(&snap, "west", "pay.prod").ports, east.ports);
        // Changing a shared list copies it first.
        let mut changed = ExportRecord::clone(&east);
        changed.ports[0].port = 7070;
        assert_eq!(east.ports[0].port, 8080);
        assert!(!changed.ports.shares(&east.ports));
    }

    #[test]
    fn clones_are_independent_values() {
        let mut a = Snapshot::new();
        a.apply(Change::PutExport(
            key("east", "gw-0", "pay.prod"),
            export(8080, 1),
        ));
        let b = a.clone();
        a.apply(Change::PutExport(
            key("east", "gw-0", "cart.prod"),
            export(8080, 1),
        ));
        assert_eq!(a.service_count(), 2);
        assert_eq!(b.service_count(), 1);
    }

    #[test]
    fn vips_are_per_cluster_and_target() {
        let mut snap = Snapshot::new();
        let svc: ServiceKey = "pay.prod".parse().expect("valid");
        let vk = |target: Option<&str>| VipKey {
            cluster: cluster("east"),
            service: svc.clone(),
            target: target.map(cluster),
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(snap.apply(Change::PutVip(vk(None), ip("127.77.0.1"))));
        assert!(snap.apply(Change::PutVip(vk(Some("west")), ip("127.77.0.2"))));
        assert_eq!(
            snap.vip(&cluster("east"), &svc, None),
            Some(ip("127.77.0.1"))
        );
        assert_eq!(
            snap.vip(&cluster("east"), &svc, Some(&cluster("west"))),
            Some(ip("127.77.0.2"))
        );
        assert_eq!(snap.vip(&cluster("west"), &svc, None), None);
        assert!(snap.apply(Change::DeleteVip(vk(None))));
        assert_eq!(snap.vip(&cluster("east"), &svc, None), None);
    }

    #[test]
    fn vips_of_a_cluster_are_exactly_its_own_whatever_the_neighbours_names() {
        let mut snap = Snapshot::new();
        let ip = |n: u8| IpAddr::from([127, 77, 0, n]);
        // Clusters whose names sort right before and after "east", and are prefixes of it
        // or have it as a prefix.
        let owners = [
            "ea", "eas", "east", "east-2", "east2", "eastern", "west", "a", "z",
        ];
        let services = ["a.a", "pay.prod", "zz.zz"];
        let mut n = 0u8;
        let mut want = Vec::new();
        for owner in owners {
            for svc in services {
                for target in [None, Some("west"), Some("ea")] {
                    n += 1;
                    let key = VipKey {
                        cluster: cluster(owner),
                        service: svc.parse().expect("service"),
                        target: target.map(cluster),
                    };
                    if owner == "east" {
                        want.push((key.clone(), ip(n)));
                    }
                    assert!(snap.apply(Change::PutVip(key, ip(n))));
                }
            }
        }
        want.sort();
        let got: Vec<(VipKey, IpAddr)> = snap
            .vips_of(&cluster("east"))
            .map(|(k, ip)| (k.clone(), ip))
            .collect();
        assert_eq!(got, want);
        assert_eq!(snap.vips_of(&cluster("north")).count(), 0);
        assert_eq!(snap.vips_of(&cluster("z")).count(), 9);
    }

    #[test]
    fn gateways_group_by_cluster() {
        let mut snap = Snapshot::new();
        let gw = |c: &str, id: &str| Arc::new(fixture::gateway(c, id));
        assert!(snap.apply(Change::PutGateway(gw("east", "a"))));
        assert!(snap.apply(Change::PutGateway(gw("east", "b"))));
        assert!(snap.apply(Change::PutGateway(gw("west", "a"))));
        assert_eq!(snap.gateways_of(&cluster("east")).count(), 2);
        assert_eq!(snap.clusters().count(), 2);
        assert!(snap.apply(Change::DeleteGateway {
            cluster: cluster("west"),
            gateway: GatewayId::new("a").expect("valid"),
        }));
        assert_eq!(snap.clusters().count(), 1);
    }

    /// The (cluster, namespace) index follows every export put and delete, including
    /// clusters whose names prefix or sort next to each other: after each step it equals a
    /// scan of every view.
    /// Exports coming and going, with cluster names that prefix each other, an export
    /// put again unchanged and deletes of what is not there.
    fn export_steps() -> Vec<Change> {
        vec![
            Change::PutExport(key("east", "gw-0", "pay.prod"), export(80, 1)),
            Change::PutExport(key("east", "gw-1", "pay.prod"), export(80, 0)),
            Change::PutExport(key("east-2", "gw-0", "pay.prod"), export(80, 1)),
            Change::PutExport(key("east", "gw-0", "db.prod"), export(5432, 1)),
            Change::PutExport(key("west", "gw-0", "db.prod-2"), export(5432, 1)),
            Change::PutExport(key("east", "gw-0", "pay.prod"), export(81, 3)),
            Change::PutExport(key("east", "gw-0", "pay.prod"), export(81, 3)),
            Change::DeleteExport(key("east", "gw-0", "pay.prod")),
            Change::DeleteExport(key("east", "gw-0", "pay.prod")),
            Change::DeleteExport(key("east", "gw-1", "pay.prod")),
            Change::DeleteExport(key("east", "gw-0", "db.prod")),
            Change::DeleteExport(key("east-2", "gw-0", "pay.prod")),
            Change::DeleteExport(key("east-2", "gw-0", "nothing.prod")),
            Change::PutExport(key("eas", "gw-0", "web.dev"), export(8080, 0)),
            Change::PutExport(key("west", "gw-0", "web.dev"), export(8081, 1)),
            Change::DeleteExport(key("west", "gw-0", "db.prod-2")),
        ]
    }

    /// Whether two snapshots hold the same records, views and index.
    fn same_catalog(a: &Snapshot, b: &Snapshot) -> bool {
        a.exports == b.exports
            && a.services == b.services
            && a.exporting == b.exporting
            && a.export_count == b.export_count
            && a.revision == b.revision
    }

    /// An export's key shares the names its gateway's record holds (one string per cluster
    /// and gateway, however many exports); without the record, it keeps its own.
    #[test]
    fn export_keys_share_their_gateways_names() {
        let same = |a: &str, b: &str| a.as_ptr() == b.as_ptr();
        let mut snap = fixture::snapshot([fixture::put_gateway(fixture::gateway("east", "gw-0"))]);
        let record = snap
            .gateway(&cluster("east"), &fixture::gateway_id("gw-0"))
            .cloned();
        let record = record.expect("gateway record");
        for (c, svc) in [
            ("east", "pay.prod"),
            ("east", "db.prod"),
            ("west", "pay.prod"),
        ] {
            snap.apply(Change::PutExport(key(c, "gw-0", svc), export(80, 1)));
        }
        let keys: Vec<(ClusterName, GatewayId)> = ["pay.prod", "db.prod"]
            .iter()
            .flat_map(|s| {
                let service = fixture::service(s);
                snap.exports_of(&service)
                    .map(|(k, _)| k.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(keys.len(), 3);
        for (c, gw) in &keys {
            let own = c.as_str() == "east";
            assert_eq!(same(c.as_str(), record.cluster.as_str()), own, "{c}");
            assert_eq!(
                same(gw.as_str(), record.gateway_id.as_str()),
                own,
                "{c}/{gw}"
            );
        }
    }

    /// A batch split anywhere in a sequence of changes ends where applying them one by one
    /// ends, and says the same about each change.
    #[test]
    fn a_batch_equals_its_changes_applied_one_by_one() {
        let steps = export_steps();
        let mut one_by_one = Snapshot::new();
        let said: Vec<bool> = steps.iter().map(|c| one_by_one.apply(c.clone())).collect();
        for split in 0..=steps.len() {
            for end in split..=steps.len() {
                let mut before = Snapshot::new();
                let mut expected = Snapshot::new();
                for change in &steps[..split] {
                    before.apply(change.clone());
                    expected.apply(change.clone());
                }
                for change in &steps[split..end] {
                    expected.apply(change.clone());
                }
                let mut batch = Batch::new(before);
                for (i, change) in steps[split..end].iter().enumerate() {
                    assert_eq!(
                        batch.apply(change.clone()),
                        said[split + i],
                        "change {} in the batch {split}..{end}",
                        split + i
                    );
                }
                let batched = batch.finish();
                assert!(same_catalog(&batched, &expected), "batch {split}..{end}");
            }
        }
    }

    #[test]
    fn the_exporting_index_equals_a_scan_of_the_views() {
        let mut snap = Snapshot::new();
        let clusters = ["east", "east-2", "eas", "west"];
        let namespaces = ["prod", "prod-2", "dev"];
        for (i, change) in export_steps().into_iter().enumerate() {
            snap.apply(change);
            for c in clusters.map(cluster) {
                let scan = |ns: Option<&str>| {
                    snap.services().any(|v| {
                        v.clusters.contains_key(&c)
                            && ns.is_none_or(|ns| v.key.namespace.as_str() == ns)
                    })
                };
                assert_eq!(snap.cluster_exports(&c, None), scan(None), "step {i}, {c}");
                for ns in namespaces {
                    let namespace = Namespace::new(ns).expect("valid");
                    assert_eq!(
                        snap.cluster_exports(&c, Some(&namespace)),
                        scan(Some(ns)),
                        "step {i}, {c}, {ns}"
                    );
                }
            }
        }
        let left: Vec<(&str, &str)> = snap
            .exporting
            .keys()
            .map(|(c, ns)| (c.as_str(), ns.as_str()))
            .collect();
        assert_eq!(left, [("eas", "dev"), ("west", "dev")]);
    }

    /// What `addressing_differs` sees: every kind of change, one at a time, from the same
    /// starting catalog.
    #[test]
    fn addressing_differs_ignores_endpoint_counts_only() {
        let base = fixture::snapshot([
            fixture::put_gateway(fixture::gateway("east", "gw-0")),
            Change::PutExport(key("east", "gw-0", "pay.prod"), export(80, 2)),
            Change::PutExport(key("west", "gw-0", "pay.prod"), export(80, 1)),
        ]);
        let ip: IpAddr = "10.64.0.1".parse().expect("ip");
        let cases: Vec<(&str, Vec<Change>, bool)> = vec![
            ("nothing", vec![], false),
            (
                "healthy endpoints",
                vec![Change::PutExport(
                    key("east", "gw-0", "pay.prod"),
                    export(80, 0),
                )],
                false,
            ),
            (
                "a second gateway of an exporting cluster",
                vec![Change::PutExport(
                    key("east", "gw-1", "pay.prod"),
                    export(80, 2),
                )],
                false,
            ),
            (
                "a port",
                vec![Change::PutExport(
                    key("east", "gw-0", "pay.prod"),
                    export(81, 2),
                )],
                true,
            ),
            (
                "a cluster joins",
                vec![Change::PutExport(
                    key("south", "gw-0", "pay.prod"),
                    export(80, 2),
                )],
                true,
            ),
            (
                "a cluster leaves",
                vec![Change::DeleteExport(key("west", "gw-0", "pay.prod"))],
                true,
            ),
            (
                "a new service",
                vec![Change::PutExport(
                    key("east", "gw-0", "db.prod"),
                    export(5432, 1),
                )],
                true,
            ),
            (
                "a VIP",
                vec![fixture::put_vip("east", "pay.prod", None, ip)],
                true,
            ),
            (
                "a gateway",
                vec![fixture::put_gateway(fixture::gateway("west", "gw-0"))],
                true,
            ),
        ];
        for (what, changes, want) in cases {
            let mut next = base.clone();
            for c in changes {
                next.apply(c);
            }
            assert_eq!(base.addressing_differs(&next), want, "{what}");
            assert_eq!(next.addressing_differs(&base), want, "{what}, backwards");
        }
    }

    #[test]
    fn steering_changes_are_every_service_or_the_diff() {
        let base = fixture::steering_base();
        for case in fixture::steering_cases() {
            let next = case.applied_to(&base);
            let want = case
                .changed
                .map(|keys| keys.into_iter().map(fixture::service).collect::<Vec<_>>());
            assert_eq!(next.steering_changed_since(&base), want, "{}", case.what);
        }
    }
}

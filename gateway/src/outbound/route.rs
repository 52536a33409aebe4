//! Pure routing inputs: which VIP:port listeners should exist, and which clusters could serve
//! one new client connection (the policy decides among them). No I/O; table-tested.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use imbl::ordmap::DiffItem;
use ipnet::IpNet;
use meshup_core::catalog::{Snapshot, VipKey};
use meshup_core::model::Protocol;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_policy::ClusterState;

use crate::inbound::LocalExports;

/// What a VIP:port listener serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub service: ServiceKey,
    pub port: u16,
    /// `Some` for a cluster-pinned VIP: only that cluster may serve it.
    pub target: Option<ClusterName>,
}

/// Where one cluster's share of a connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// This cluster exports the service: connect to these local endpoints directly;
    /// `http1_only`: they speak only HTTP/1.1 (the port's `endpoint_protocol: http1`).
    Local {
        endpoints: Vec<SocketAddr>,
        http1_only: bool,
    },
    /// A remote cluster: open a stream to one of its gateways (draining gateways left
    /// out), each with its advertised addresses in order.
    Remote { gateways: Vec<Vec<SocketAddr>> },
}

/// Every cluster that could serve a connection for a route, as the decision needs them
/// ([`ClusterState`], in the order given) and with where to send it ([`Target`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Serving {
    pub states: Vec<ClusterState>,
    pub targets: BTreeMap<ClusterName, Target>,
}

/// The listeners this cluster's gateways keep.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listeners {
    pub routes: BTreeMap<SocketAddr, Route>,
    /// Catalog VIPs of ours outside `vip_cidr`, left out (the caller logs them once).
    pub outside: BTreeSet<IpAddr>,
}

/// The listeners this cluster's gateways keep: every TCP port of every service that has a
/// VIP allocated for `local`, plus every cluster-pinned VIP of it. Only VIPs inside
/// `vip_range` (the cluster's `vip_cidr`) are listened on: a catalog record naming any other
/// address (a narrowed range, a hand-written or hostile record) must never make the gateway
/// open an unauthenticated proxy on, say, the node's own address.
pub fn desired_listeners(snapshot: &Snapshot, local: &ClusterName, vip_range: &IpNet) -> Listeners {
    let mut out = Listeners::default();
    // A range over this cluster's VIPs, not a lookup per (service, cluster): at 10,000
    // services × 100 clusters the lookups were most of a reconcile (docs/scale.md).
    for (key, vip) in snapshot.vips_of(local) {
        add_vip(snapshot, key, vip, vip_range, &mut out);
    }
    out
}

/// Adds one VIP's listeners (or its address to `outside`) as [`desired_listeners`] does.
fn add_vip(snapshot: &Snapshot, key: &VipKey, vip: IpAddr, vip_range: &IpNet, out: &mut Listeners) {
    let Some(svc) = snapshot.service(&key.service) else {
        return;
    };
    if let Some(target) = &key.target
        && !svc.clusters.contains_key(target)
    {
        return;
    }
    if !vip_range.contains(&vip) {
        out.outside.insert(vip);
        return;
    }
    for p in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        out.routes.insert(
            SocketAddr::new(vip, p.port),
            Route {
                service: key.service.clone(),
                port: p.port,
                target: key.target.clone(),
            },
        );
    }
}

/// [`desired_listeners`] kept up to date across snapshots by what changed between them, so
/// a new snapshot costs in proportion to the services whose listeners it changes, not to
/// every VIP: a joining gateway gets a snapshot per VIP allocation transaction (some 300
/// at 10,000 services), and rebuilding the whole set for each was most of its CPU between
/// its catalog list and `/ready` (docs/scale.md).
#[derive(Debug, Clone)]
pub struct DesiredListeners {
    listeners: Listeners,
    /// How many of this cluster's VIP records hold each address.
    uses: HashMap<IpAddr, u32>,
    /// Addresses held by more than one VIP record (only a hand-written or hostile record
    /// does that): whose record wins depends on the order of the whole set, so while any
    /// exists every update is a full build.
    shared: usize,
}

impl DesiredListeners {
    /// The listeners of `snapshot`, built in full.
    pub fn build(snapshot: &Snapshot, local: &ClusterName, vip_range: &IpNet) -> Self {
        let mut uses: HashMap<IpAddr, u32> = HashMap::new();
        for (_, vip) in snapshot.vips_of(local) {
            *uses.entry(vip).or_default() += 1;
        }
        Self {
            listeners: desired_listeners(snapshot, local, vip_range),
            shared: uses.values().filter(|n| **n > 1).count(),
            uses,
        }
    }

    /// The listeners.
    pub fn listeners(&self) -> &Listeners {
        &self.listeners
    }

    /// Moves the set from the listeners of `before` (what it holds) to those of `after`;
    /// returns the addresses whose route may have changed (every added, removed or
    /// different one, and some that came back the same), or `None` after a full build
    /// (then any address may have).
    pub fn update(
        &mut self,
        before: &Snapshot,
        after: &Snapshot,
        local: &ClusterName,
        vip_range: &IpNet,
    ) -> Option<BTreeSet<SocketAddr>> {
        let shared_before = self.shared;
        let mut touched: BTreeSet<&ServiceKey> = BTreeSet::new();
        for item in before.vip_map().diff(after.vip_map()) {
            match item {
                DiffItem::Add(k, ip) if k.cluster == *local => {
                    self.count(*ip, true);
                    touched.insert(&k.service);
                }
                DiffItem::Remove(k, ip) if k.cluster == *local => {
                    self.count(*ip, false);
                    touched.insert(&k.service);
                }
                DiffItem::Update {
                    old: (k, was),
                    new: (_, is),
                } if k.cluster == *local => {
                    self.count(*was, false);
                    self.count(*is, true);
                    touched.insert(&k.service);
                }
                _ => {}
            }
        }
        if shared_before > 0 || self.shared > 0 {
            self.listeners = desired_listeners(after, local, vip_range);
            return None;
        }
        for item in before.service_map().diff(after.service_map()) {
            match item {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) => {
                    touched.insert(k);
                }
                DiffItem::Update {
                    old: (k, was),
                    new: (_, is),
                } => {
                    if was.addressing_differs(is) {
                        touched.insert(k);
                    }
                }
            }
        }
        // Every old listener of the touched services goes before any new one comes: two
        // services that swapped addresses must not remove each other's new routes. No
        // address is shared, so each belongs to one service alone.
        let mut changed = BTreeSet::new();
        let mut old = Listeners::default();
        for service in &touched {
            for (key, vip) in before.vips_of_service(local, service) {
                add_vip(before, key, vip, vip_range, &mut old);
            }
        }
        for (addr, route) in old.routes {
            if self.listeners.routes.get(&addr) == Some(&route) {
                self.listeners.routes.remove(&addr);
                changed.insert(addr);
            }
        }
        for ip in old.outside {
            self.listeners.outside.remove(&ip);
        }
        let mut new = Listeners::default();
        for service in &touched {
            for (key, vip) in after.vips_of_service(local, service) {
                add_vip(after, key, vip, vip_range, &mut new);
            }
        }
        for (addr, route) in new.routes {
            self.listeners.routes.insert(addr, route);
            changed.insert(addr);
        }
        self.listeners.outside.extend(new.outside);
        Some(changed)
    }

    fn count(&mut self, ip: IpAddr, add: bool) {
        let n = self.uses.entry(ip).or_default();
        let was_shared = *n > 1;
        if add {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
        }
        let is_shared = *n > 1;
        if *n == 0 {
            self.uses.remove(&ip);
        }
        match (was_shared, is_shared) {
            (false, true) => self.shared += 1,
            (true, false) => self.shared -= 1,
            _ => {}
        }
    }
}

/// The clusters that export `route`'s service, with what the catalog says of each: this
/// cluster if it exports the service itself (its endpoint counts from its published record
/// when there is one), then every other exporting cluster with its healthy endpoint counts,
/// its locality, whether its export allows `local`, and its gateways that are not draining.
/// A pinned route keeps only its target. The decision ([`meshup_policy::decide`]) chooses.
pub fn serving(
    snapshot: &Snapshot,
    local: &ClusterName,
    local_exports: &LocalExports,
    route: &Route,
) -> Serving {
    let mut out = Serving::default();
    let view = snapshot.service(&route.service);
    let wanted = |c: &ClusterName| route.target.as_ref().is_none_or(|t| t == c);
    let locality = |c: &ClusterName| {
        snapshot
            .gateways_of(c)
            .next()
            .map(|g| (g.region.clone(), g.zone.clone()))
            .unwrap_or_default()
    };
    if wanted(local)
        && let Some(export) = local_exports.get(&route.service)
        && export.ports.contains(&route.port)
    {
        let eps = export.endpoint_addrs(route.port);
        if !eps.is_empty() {
            let n = u32::try_from(eps.len()).unwrap_or(u32::MAX);
            let (total, healthy) = view
                .and_then(|v| v.clusters.get(local))
                .map_or((n, n), |c| (c.endpoints_total, c.endpoints_healthy));
            let (region, zone) = locality(local);
            out.states.push(ClusterState {
                cluster: local.clone(),
                region,
                zone,
                endpoints_total: total,
                endpoints_healthy: healthy,
                allows_us: true,
                gateways: 0,
            });
            let http1_only = export.http1_ports.contains(&route.port);
            out.targets.insert(
                local.clone(),
                Target::Local {
                    endpoints: eps,
                    http1_only,
                },
            );
        }
    }
    let Some(view) = view else {
        return out;
    };
    for (cluster, export) in &view.clusters {
        if cluster == local || !wanted(cluster) {
            continue;
        }
        let gateways: Vec<Vec<SocketAddr>> = snapshot
            .gateways_of(cluster)
            .filter(|g| !g.draining && !g.quic_addrs.is_empty())
            .map(|g| g.quic_addrs.clone())
            .collect();
        let (region, zone) = locality(cluster);
        out.states.push(ClusterState {
            cluster: cluster.clone(),
            region,
            zone,
            endpoints_total: export.endpoints_total,
            endpoints_healthy: export.endpoints_healthy,
            allows_us: export.allowed_callers.is_empty() || export.allowed_callers.contains(local),
            gateways: gateways.len(),
        });
        out.targets
            .insert(cluster.clone(), Target::Remote { gateways });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use meshup_core::catalog::Change;
    use meshup_core::fixture;
    use meshup_core::model::{ExportRecord, GatewayRecord};

    use crate::inbound::{LocalExport, local_exports};

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).expect("valid")
    }
    fn loopback() -> IpNet {
        "127.0.0.0/8".parse().expect("cidr")
    }
    fn key() -> ServiceKey {
        "pay.prod".parse().expect("valid")
    }
    fn gateway(cluster: &str, id: &str, port: u16, draining: bool) -> Change {
        fixture::put_gateway(GatewayRecord {
            quic_addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            draining,
            ..fixture::gateway(cluster, id)
        })
    }
    fn export(cluster: &str, id: &str, healthy: u32) -> Change {
        export_allowing(cluster, id, healthy, &[])
    }
    fn export_allowing(cluster: &str, id: &str, healthy: u32, allowed: &[&str]) -> Change {
        let record = ExportRecord {
            allowed_callers: allowed.iter().map(|a| c(a)).collect(),
            ..fixture::export(8080, healthy)
        };
        fixture::put_export(cluster, id, "pay.prod", record)
    }
    fn vip(target: Option<&str>, ip: [u8; 4]) -> Change {
        fixture::put_vip("east", "pay.prod", target, IpAddr::from(ip))
    }
    use fixture::snapshot;

    #[test]
    fn listeners_cover_clusterset_and_pinned_vips() {
        let s = snapshot(vec![
            export("west", "w1", 2),
            export("south", "s1", 1),
            vip(None, [127, 77, 0, 1]),
            vip(Some("west"), [127, 77, 0, 2]),
            // Left VIPs: pinned to a cluster that does not export the service, and of a
            // service nobody exports. Neither gets a listener.
            vip(Some("north"), [127, 77, 0, 3]),
            fixture::put_vip("east", "gone.prod", None, IpAddr::from([127, 77, 0, 4])),
        ]);
        let l = desired_listeners(&s, &c("east"), &loopback()).routes;
        let addrs: Vec<String> = l.keys().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["127.77.0.1:8080", "127.77.0.2:8080"]);
        assert_eq!(
            l.values().nth(1).and_then(|r| r.target.clone()),
            Some(c("west"))
        );
        // Another cluster's VIPs are not ours.
        assert_eq!(
            desired_listeners(&s, &c("west"), &loopback()),
            Listeners::default()
        );
        // VIPs outside the cluster's range are never listened on, and are reported.
        let narrow: IpNet = "10.0.0.0/8".parse().expect("cidr");
        let l = desired_listeners(&s, &c("east"), &narrow);
        assert!(l.routes.is_empty());
        let outside: Vec<String> = l.outside.iter().map(ToString::to_string).collect();
        assert_eq!(outside, ["127.77.0.1", "127.77.0.2"]);
    }

    /// A sequence of catalog changes: after each, the incrementally updated set equals one
    /// built from scratch, and every address whose route differs from the step before is
    /// among the touched ones. A VIP address held by two records (hostile) makes updates
    /// full builds until it is not.
    #[test]
    fn desired_listeners_updated_by_diff_equal_a_full_build() {
        use meshup_core::catalog::{ExportKey, VipKey};
        let put = |cluster: &str, service: &str, port: u16| {
            fixture::put_export(cluster, "gw-0", service, fixture::export(port, 1))
        };
        let vip = |service: &str, target: Option<&str>, last: u8| {
            fixture::put_vip("east", service, target, IpAddr::from([127, 77, 0, last]))
        };
        let vip_key = |service: &str, target: Option<&str>| VipKey {
            cluster: c("east"),
            service: fixture::service(service),
            target: target.map(c),
        };
        let range: IpNet = "127.77.0.0/26".parse().expect("cidr");
        let steps: Vec<(&str, Vec<Change>, bool)> = vec![
            (
                "VIPs come",
                vec![vip("a.prod", None, 1), vip("b.prod", None, 2)],
                true,
            ),
            ("a pinned VIP", vec![vip("a.prod", Some("west"), 3)], true),
            (
                "another cluster's VIP",
                vec![fixture::put_vip(
                    "west",
                    "a.prod",
                    None,
                    IpAddr::from([127, 77, 0, 9]),
                )],
                true,
            ),
            ("a port is added", vec![put("south", "a.prod", 9090)], true),
            (
                "endpoints only",
                vec![fixture::put_export(
                    "west",
                    "gw-0",
                    "a.prod",
                    fixture::export(8080, 5),
                )],
                true,
            ),
            (
                "two services swap addresses",
                vec![vip("a.prod", None, 2), vip("b.prod", None, 1)],
                true,
            ),
            (
                "a VIP outside the range",
                vec![vip("c.prod", None, 100)],
                true,
            ),
            (
                "the pinned target stops exporting",
                vec![Change::DeleteExport(ExportKey {
                    cluster: c("west"),
                    gateway: fixture::gateway_id("gw-0"),
                    service: fixture::service("a.prod"),
                })],
                true,
            ),
            (
                "a second record on one address",
                vec![vip("c.prod", None, 1)],
                false,
            ),
            ("still shared", vec![vip("d.prod", None, 20)], false),
            (
                "no longer shared",
                vec![Change::DeleteVip(vip_key("c.prod", None))],
                false,
            ),
            ("incremental again", vec![vip("d.prod", None, 21)], true),
            (
                "a service goes",
                vec![Change::DeleteExport(ExportKey {
                    cluster: c("south"),
                    gateway: fixture::gateway_id("gw-0"),
                    service: fixture::service("b.prod"),
                })],
                true,
            ),
        ];
        let mut snap = snapshot(vec![
            put("west", "a.prod", 8080),
            put("south", "b.prod", 8080),
            put("south", "c.prod", 7000),
            put("south", "d.prod", 7000),
        ]);
        let mut set = DesiredListeners::build(&snap, &c("east"), &range);
        let mut saw_outside = false;
        for (what, changes, incremental) in steps {
            let before = snap.clone();
            for change in changes {
                snap.apply(change);
            }
            let touched = set.update(&before, &snap, &c("east"), &range);
            let full = desired_listeners(&snap, &c("east"), &range);
            assert_eq!(set.listeners(), &full, "{what}");
            assert_eq!(touched.is_some(), incremental, "{what}: {touched:?}");
            saw_outside |= !full.outside.is_empty();
            if let Some(touched) = touched {
                let was = desired_listeners(&before, &c("east"), &range).routes;
                let differs: Vec<&SocketAddr> = was
                    .keys()
                    .chain(full.routes.keys())
                    .filter(|a| was.get(a) != full.routes.get(a))
                    .collect();
                for addr in differs {
                    assert!(touched.contains(addr), "{what}: {addr} not touched");
                }
            }
        }
        assert!(saw_outside, "the range check was exercised");
    }

    #[test]
    fn serving_lists_local_then_every_exporting_cluster_with_what_the_decision_needs() {
        let s = snapshot(vec![
            gateway("west", "w1", 1001, false),
            gateway("west", "w2", 1002, true),
            gateway("south", "s1", 2001, true),
            gateway("north", "n1", 3001, false),
            export("west", "w1", 2),
            export("south", "s1", 2),
            export("north", "n1", 0),
            export_allowing("far", "f1", 1, &["west"]),
        ]);
        let route = Route {
            service: key(),
            port: 8080,
            target: None,
        };
        let ep: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let none = LocalExports::new();
        let state = |cluster: &str, healthy: u32, allows_us: bool, gateways: usize| ClusterState {
            cluster: c(cluster),
            region: String::new(),
            zone: String::new(),
            endpoints_total: healthy.max(1),
            endpoints_healthy: healthy,
            allows_us,
            gateways,
        };
        // Every exporting cluster is listed (the decision says why one is out): far forbids
        // us; north has no healthy endpoint; south only a draining gateway.
        let got = serving(&s, &c("east"), &none, &route);
        assert_eq!(
            got.states,
            [
                state("far", 1, false, 0),
                state("north", 0, true, 1),
                state("south", 2, true, 0),
                state("west", 2, true, 1),
            ]
        );
        assert_eq!(
            got.targets.get(&c("west")),
            Some(&Target::Remote {
                gateways: vec![vec!["127.0.0.1:1001".parse().expect("addr")]]
            })
        );

        let mine = local_exports([LocalExport {
            service: key(),
            ports: vec![8080],
            endpoints: vec![ep],
            allowed_callers: vec![],
            http_ports: vec![],
            http1_ports: vec![],
        }]);
        let got = serving(&s, &c("east"), &mine, &route);
        assert_eq!(got.states[0], state("east", 1, true, 0));
        assert_eq!(
            got.targets.get(&c("east")),
            Some(&Target::Local {
                endpoints: vec![ep],
                http1_only: false
            })
        );
        assert_eq!(got.states.len(), 5);
        // Pinned to west: only west, even though we export it locally.
        let pinned = Route {
            target: Some(c("west")),
            ..route.clone()
        };
        let got = serving(&s, &c("east"), &mine, &pinned);
        assert_eq!(got.states, [state("west", 2, true, 1)]);
        // A port the local export does not serve: not local.
        let other_port = Route {
            port: 9999,
            ..route
        };
        assert!(
            !serving(&s, &c("east"), &mine, &other_port)
                .targets
                .contains_key(&c("east"))
        );
    }
}

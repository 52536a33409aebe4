//! Pure routing inputs: which VIP:port listeners should exist, and which clusters could serve
//! one new client connection (the policy decides among them). No I/O; table-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshup_core::catalog::Snapshot;
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
    /// This cluster exports the service: connect to these local endpoints directly.
    Local(Vec<SocketAddr>),
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
    let mut out = BTreeMap::new();
    let mut outside = BTreeSet::new();
    // A range over this cluster's VIPs, not a lookup per (service, cluster): at 10,000
    // services × 100 clusters the lookups were most of a reconcile (docs/scale.md).
    for (key, vip) in snapshot.vips_of(local) {
        let Some(svc) = snapshot.service(&key.service) else {
            continue;
        };
        if let Some(target) = &key.target
            && !svc.clusters.contains_key(target)
        {
            continue;
        }
        if !vip_range.contains(&vip) {
            outside.insert(vip);
            continue;
        }
        for p in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            out.insert(
                SocketAddr::new(vip, p.port),
                Route {
                    service: key.service.clone(),
                    port: p.port,
                    target: key.target.clone(),
                },
            );
        }
    }
    Listeners {
        routes: out,
        outside,
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
            out.targets.insert(local.clone(), Target::Local(eps));
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
        }]);
        let got = serving(&s, &c("east"), &mine, &route);
        assert_eq!(got.states[0], state("east", 1, true, 0));
        assert_eq!(got.targets.get(&c("east")), Some(&Target::Local(vec![ep])));
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

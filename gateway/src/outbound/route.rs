//! Pure routing decisions: which VIP:port listeners should exist, and where one new client
//! connection should go. No I/O; table-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use meshup_core::catalog::Snapshot;
use meshup_core::model::Protocol;
use meshup_core::names::{ClusterName, ServiceKey};

use crate::inbound::LocalExports;

/// What a VIP:port listener serves.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    pub service: ServiceKey,
    pub port: u16,
    /// `Some` for a cluster-pinned VIP: only that cluster may serve it.
    pub target: Option<ClusterName>,
}

/// One place a connection may go, in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// This cluster exports the service: connect to these local endpoints directly.
    Local(Vec<SocketAddr>),
    /// A remote cluster: open a stream to one of its gateways (draining gateways left
    /// out), each with its advertised addresses in order.
    Remote {
        cluster: ClusterName,
        gateways: Vec<Vec<SocketAddr>>,
    },
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
    let mut vip = |target: Option<&ClusterName>, svc: &ServiceKey| {
        let v = snapshot.vip(local, svc, target)?;
        if vip_range.contains(&v) {
            Some(v)
        } else {
            outside.insert(v);
            None
        }
    };
    for svc in snapshot.services() {
        let tcp_ports = || svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp);
        if let Some(vip) = vip(None, &svc.key) {
            for p in tcp_ports() {
                out.insert(
                    SocketAddr::new(vip, p.port),
                    Route {
                        service: svc.key.clone(),
                        port: p.port,
                        target: None,
                    },
                );
            }
        }
        for target in svc.clusters.keys() {
            if let Some(vip) = vip(Some(target), &svc.key) {
                for p in tcp_ports() {
                    out.insert(
                        SocketAddr::new(vip, p.port),
                        Route {
                            service: svc.key.clone(),
                            port: p.port,
                            target: Some(target.clone()),
                        },
                    );
                }
            }
        }
    }
    Listeners {
        routes: out,
        outside,
    }
}

/// Where a new connection for `route` may go, best first. Local endpoints first if this
/// cluster exports the service; then every other cluster exporting it with healthy
/// endpoints and at least one non-draining gateway. A pinned route yields only its target.
pub fn candidates(
    snapshot: &Snapshot,
    local: &ClusterName,
    local_exports: &LocalExports,
    route: &Route,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    let local_allowed = route.target.as_ref().is_none_or(|t| t == local);
    if local_allowed
        && let Some(export) = local_exports.get(&route.service)
        && export.ports.contains(&route.port)
    {
        let eps = export.endpoint_addrs(route.port);
        if !eps.is_empty() {
            out.push(Candidate::Local(eps));
        }
    }
    let Some(view) = snapshot.service(&route.service) else {
        return out;
    };
    for cluster in view.healthy_clusters() {
        if cluster == local || route.target.as_ref().is_some_and(|t| t != cluster) {
            continue;
        }
        let gateways: Vec<Vec<SocketAddr>> = snapshot
            .gateways_of(cluster)
            .filter(|g| !g.draining && !g.quic_addrs.is_empty())
            .map(|g| g.quic_addrs.clone())
            .collect();
        if !gateways.is_empty() {
            out.push(Candidate::Remote {
                cluster: cluster.clone(),
                gateways,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::sync::Arc;

    use meshup_core::catalog::{Change, ExportKey, VipKey};
    use meshup_core::model::{ExportRecord, GatewayRecord, PortSpec, SCHEMA_VERSION};
    use meshup_core::names::GatewayId;

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
        Change::PutGateway(Arc::new(GatewayRecord {
            schema: SCHEMA_VERSION,
            cluster: c(cluster),
            gateway_id: GatewayId::new(id).expect("valid"),
            region: String::new(),
            zone: String::new(),
            quic_addrs: vec![SocketAddr::from(([127, 0, 0, 1], port))],
            spiffe_id: format!("spiffe://td/cluster/{cluster}/gateway"),
            draining,
        }))
    }
    fn export(cluster: &str, id: &str, healthy: u32) -> Change {
        Change::PutExport(
            ExportKey {
                cluster: c(cluster),
                gateway: GatewayId::new(id).expect("valid"),
                service: key(),
            },
            Arc::new(ExportRecord {
                schema: SCHEMA_VERSION,
                ports: vec![PortSpec {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                endpoints_total: healthy.max(1),
                endpoints_healthy: healthy,
                allowed_callers: vec![],
                labels: Default::default(),
            }),
        )
    }
    fn vip(target: Option<&str>, ip: [u8; 4]) -> Change {
        Change::PutVip(
            VipKey {
                cluster: c("east"),
                service: key(),
                target: target.map(c),
            },
            IpAddr::from(ip),
        )
    }

    fn snapshot(changes: Vec<Change>) -> Snapshot {
        let mut s = Snapshot::new();
        for ch in changes {
            s.apply(ch);
        }
        s
    }

    #[test]
    fn listeners_cover_clusterset_and_pinned_vips() {
        let s = snapshot(vec![
            export("west", "w1", 2),
            export("south", "s1", 1),
            vip(None, [127, 77, 0, 1]),
            vip(Some("west"), [127, 77, 0, 2]),
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
    fn candidates_prefer_local_then_healthy_non_draining_remotes() {
        let s = snapshot(vec![
            gateway("west", "w1", 1001, false),
            gateway("west", "w2", 1002, true),
            gateway("south", "s1", 2001, true),
            gateway("north", "n1", 3001, false),
            export("west", "w1", 2),
            export("south", "s1", 2),
            export("north", "n1", 0),
        ]);
        let route = Route {
            service: key(),
            port: 8080,
            target: None,
        };
        let ep: SocketAddr = "127.0.0.1:9000".parse().expect("addr");
        let none = LocalExports::new();
        let remote_west = Candidate::Remote {
            cluster: c("west"),
            gateways: vec![vec!["127.0.0.1:1001".parse().expect("addr")]],
        };
        // south: only draining gateways; north: no healthy endpoints.
        assert_eq!(
            candidates(&s, &c("east"), &none, &route),
            std::slice::from_ref(&remote_west)
        );

        let mine = local_exports([LocalExport {
            service: key(),
            ports: vec![8080],
            endpoints: vec![ep],
            allowed_callers: vec![],
        }]);
        assert_eq!(
            candidates(&s, &c("east"), &mine, &route),
            [Candidate::Local(vec![ep]), remote_west.clone()]
        );
        // Pinned to west: only west, even though we export it locally.
        let pinned = Route {
            target: Some(c("west")),
            ..route.clone()
        };
        assert_eq!(candidates(&s, &c("east"), &mine, &pinned), [remote_west]);
        // Pinned to a cluster without healthy endpoints: nothing.
        let pinned_north = Route {
            target: Some(c("north")),
            ..route
        };
        assert!(candidates(&s, &c("east"), &mine, &pinned_north).is_empty());
    }
}

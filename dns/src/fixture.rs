//! Synthetic catalogs for tests, fuzzing and benchmarks (no etcd needed): snapshots built
//! from `Change`s exactly as the catalog watcher builds them.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use meshup_core::catalog::{Change, ExportKey, Snapshot, VipKey};
use meshup_core::model::{ExportRecord, PortSpec, Protocol, SCHEMA_VERSION};
use meshup_core::names::{ClusterName, GatewayId, NameError, ServiceKey};

/// An export of `ports` by one gateway (`gw-0`) of `cluster`.
pub fn export(
    cluster: &str,
    service: &str,
    ports: &[(&str, u16, Protocol)],
) -> Result<Change, NameError> {
    let key = ExportKey {
        cluster: ClusterName::new(cluster)?,
        gateway: GatewayId::new("gw-0")?,
        service: service.parse()?,
    };
    let record = ExportRecord {
        schema: SCHEMA_VERSION,
        ports: ports
            .iter()
            .map(|(name, port, protocol)| PortSpec {
                name: (*name).to_owned(),
                port: *port,
                protocol: *protocol,
                app_protocol: Default::default(),
                endpoint_protocol: Default::default(),
            })
            .collect(),
        endpoints_total: 1,
        endpoints_healthy: 1,
        allowed_callers: vec![],
        labels: BTreeMap::new().into(),
    };
    Ok(Change::PutExport(key, Arc::new(record)))
}

/// The VIP `cluster` uses for `service` (or for its name pinned to `target`).
pub fn vip(
    cluster: &str,
    service: &str,
    target: Option<&str>,
    ip: IpAddr,
) -> Result<Change, NameError> {
    Ok(Change::PutVip(
        VipKey {
            cluster: ClusterName::new(cluster)?,
            service: service.parse::<ServiceKey>()?,
            target: target.map(ClusterName::new).transpose()?,
        },
        ip,
    ))
}

/// A catalog of `services` services (`svc-<i>.ns-<i % 10>`), each exported by every one of
/// `clusters` with ports `http` (tcp) and `dns` (udp), with a VIP for `local` and a pinned
/// VIP per cluster. Used by the benchmark.
pub fn synthetic(local: &str, clusters: &[&str], services: usize) -> Result<Snapshot, NameError> {
    let mut snap = Snapshot::new();
    for i in 0..services {
        let svc = format!("svc-{i}.ns-{}", i % 10);
        for cluster in clusters {
            snap.apply(export(
                cluster,
                &svc,
                &[("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)],
            )?);
        }
        let n = u32::try_from(i).unwrap_or(u32::MAX);
        let base = Ipv4Addr::from(0x0a40_0000u32.wrapping_add(n.wrapping_mul(8)));
        snap.apply(vip(local, &svc, None, IpAddr::V4(base))?);
        for (j, cluster) in clusters.iter().enumerate() {
            let pinned = Ipv4Addr::from(u32::from(base).wrapping_add(1 + j as u32));
            snap.apply(vip(local, &svc, Some(cluster), IpAddr::V4(pinned))?);
        }
    }
    snap.revision = 1;
    Ok(snap)
}

/// Three clusters, seen from `east` (the local cluster):
///
/// - `pay.prod`: exported by `east` (ports `http`/tcp 8080, `dns`/udp 53) and `west`; east's
///   VIP 10.64.0.1, pinned-to-west VIP 10.64.0.2 (no pinned VIP for east: NODATA).
/// - `cart.shop`: exported by `south` only; VIP 10.64.0.3.
/// - `v6.prod`: exported by `west`; IPv6 VIP fd00::6.
/// - `novip.prod`: exported by `west`; no VIP for east yet (only west has one).
///
/// Revision 42.
pub fn three_clusters() -> Snapshot {
    let ip = |s: &str| {
        s.parse::<IpAddr>()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    };
    let changes = [
        export(
            "east",
            "pay.prod",
            &[("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)],
        ),
        export("west", "pay.prod", &[("http", 8080, Protocol::Tcp)]),
        export("south", "cart.shop", &[("grpc", 9000, Protocol::Tcp)]),
        export("west", "v6.prod", &[("http", 80, Protocol::Tcp)]),
        export("west", "novip.prod", &[("http", 80, Protocol::Tcp)]),
        vip("east", "pay.prod", None, ip("10.64.0.1")),
        vip("east", "pay.prod", Some("west"), ip("10.64.0.2")),
        vip("east", "cart.shop", None, ip("10.64.0.3")),
        vip("east", "v6.prod", None, ip("fd00::6")),
        // Another cluster's VIP must not leak into east's answers.
        vip("west", "novip.prod", None, ip("10.99.0.1")),
    ];
    let mut snap = Snapshot::new();
    // The names above are literals that satisfy the name rules; a typo would show up as a
    // missing service in every test using the fixture.
    for change in changes.into_iter().flatten() {
        snap.apply(change);
    }
    snap.revision = 42;
    snap
}

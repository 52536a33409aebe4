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
            })
            .collect(),
        endpoints_total: 1,
        endpoints_healthy: 1,
        allowed_callers: vec![],
        labels: BTreeMap::new(),
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

//! A federation of many clusters played into a catalog, for the scale benchmark
//! (`bench/scale`) and the CI-sized scale tests: one [`Publisher`] per cluster (the project's
//! own, with its lease and keep-alives and batched writes), every service exported by every
//! cluster, as the "N clusters × M services" federation is laid out.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meshup_core::model::{ExportRecord, GatewayRecord, PortSpec, Protocol, SCHEMA_VERSION};
use meshup_core::names::{ClusterName, GatewayId, ServiceKey};
use meshup_federation::keys::KeyLayout;
use meshup_federation::publisher::{Publisher, PublisherConfig, PublisherHandle};
use meshup_federation::store::Store;
use tokio_util::sync::CancellationToken;

/// The namespace of every service.
pub const NAMESPACE: &str = "bench";

/// Cluster `c` (`c000`, `c001`, ...).
pub fn cluster(c: usize) -> ClusterName {
    ClusterName::new(&format!("c{c:03}")).expect("valid cluster name")
}

/// The one gateway id of every played cluster.
pub fn gateway_id() -> GatewayId {
    GatewayId::new("gw-0").expect("valid gateway id")
}

/// Service `s` (`svc-000000.bench`, ...): zero-padded, so the lexically last service (the
/// one a VIP allocator reaches last) is the one with the highest number.
pub fn service(s: usize) -> ServiceKey {
    ServiceKey::parse(NAMESPACE, &format!("svc-{s:06}")).expect("valid service")
}

/// The clusterset DNS name of `service`.
pub fn clusterset_name(service: &ServiceKey) -> String {
    format!(
        "{}.{}.svc.clusterset.local",
        service.name, service.namespace
    )
}

/// The cluster-pinned DNS name of `service` in `cluster`.
pub fn pinned_name(service: &ServiceKey, cluster: &ClusterName) -> String {
    format!(
        "{}.{}.svc.{cluster}.clusterset.local",
        service.name, service.namespace
    )
}

/// The gateway record of a played cluster. Nothing listens at its QUIC address: a joining
/// gateway dials a peer only for a connection.
pub fn gateway_record(cluster: ClusterName, c: usize) -> GatewayRecord {
    GatewayRecord {
        schema: SCHEMA_VERSION,
        spiffe_id: format!(
            "spiffe://{}/cluster/{cluster}/gateway",
            crate::gateways::TRUST_DOMAIN
        ),
        cluster,
        gateway_id: gateway_id(),
        region: format!("r{}", c % 4),
        zone: format!("z{}", c % 12),
        quic_addrs: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
        draining: false,
    }
}

/// One export: an `http` port, `healthy` of 3 endpoints healthy.
pub fn export_record(healthy: u32) -> ExportRecord {
    ExportRecord {
        schema: SCHEMA_VERSION,
        ports: vec![PortSpec {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }]
        .into(),
        endpoints_total: 3,
        endpoints_healthy: healthy,
        allowed_callers: vec![],
        labels: BTreeMap::new().into(),
    }
}

/// Starts cluster `c`'s publisher (its gateway record and `services` exports, under a
/// lease of `lease_ttl` kept alive until `cancel` or the handle's abort).
pub fn publisher(
    store: Arc<dyn Store>,
    layout: &KeyLayout,
    c: usize,
    services: usize,
    lease_ttl: Duration,
    cancel: &CancellationToken,
) -> PublisherHandle {
    Publisher::new(store, layout.clone(), gateway_record(cluster(c), c))
        .with_exports((0..services).map(|s| (service(s), export_record(3))))
        .with_config(PublisherConfig {
            lease_ttl,
            ..PublisherConfig::default()
        })
        .spawn(cancel.child_token())
}

/// Starts one publisher per cluster, each exporting services `0..services`, `wave`
/// publishers at a time (a wave starts once the one before is in sync), and waits until
/// every one is in sync (its records written, within `limit` in all).
///
/// Waves keep a large federation's first publish from overloading a small etcd: a hundred
/// publishers writing 10,000 records each at once left the members minutes behind on their
/// applies, and a lease renewal waits for the applies, so leases expired under publishers
/// that were still writing (docs/scale.md, "The 1M run").
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    store: Arc<dyn Store>,
    layout: &KeyLayout,
    clusters: usize,
    services: usize,
    wave: usize,
    lease_ttl: Duration,
    limit: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<Vec<PublisherHandle>> {
    anyhow::ensure!(wave > 0, "a wave holds at least one publisher");
    let deadline = tokio::time::Instant::now() + limit;
    let mut publishers = Vec::with_capacity(clusters);
    for first in (0..clusters).step_by(wave) {
        let this_wave = first..(first + wave).min(clusters);
        for c in this_wave.clone() {
            publishers.push(publisher(
                store.clone(),
                layout,
                c,
                services,
                lease_ttl,
                cancel,
            ));
        }
        for c in this_wave {
            let mut status = publishers[c].status();
            tokio::time::timeout_at(deadline, status.wait_for(|s| s.in_sync))
                .await
                .with_context(|| {
                    format!("publisher of {} not in sync within {limit:?}", cluster(c))
                })??;
        }
    }
    Ok(publishers)
}

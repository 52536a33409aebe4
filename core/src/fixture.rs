//! Catalog records for tests: one builder per record and change, holding the values most
//! tests want, so a test spells out only the fields it is about (struct update syntax:
//! `GatewayRecord { draining: true, ..fixture::gateway("west", "w1") }`).
//!
//! Compiled for this crate's own tests and, with the `test-util` feature, for other crates'
//! tests (`[dev-dependencies] meshup-core = { ..., features = ["test-util"] }`); never part of
//! a release build. Names are taken as text and panic when invalid: a test's own typo.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::catalog::{Change, ExportKey, Snapshot, VipKey};
use crate::model::{ExportRecord, GatewayRecord, PortSpec, Protocol, SCHEMA_VERSION};
use crate::names::{ClusterName, GatewayId, ServiceKey};
use crate::policy::{DrillKind, DrillRecord};

/// The trust domain of the SPIFFE IDs in these records.
pub const TRUST_DOMAIN: &str = "mesh.test";

/// A cluster name (panics on an invalid one).
pub fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).unwrap_or_else(|e| panic!("test cluster name {name:?}: {e}"))
}

/// A gateway id (panics on an invalid one).
pub fn gateway_id(id: &str) -> GatewayId {
    GatewayId::new(id).unwrap_or_else(|e| panic!("test gateway id {id:?}: {e}"))
}

/// A service key, `<name>.<namespace>` (panics on an invalid one).
pub fn service(key: &str) -> ServiceKey {
    key.parse()
        .unwrap_or_else(|e| panic!("test service key {key:?}: {e}"))
}

/// Gateway `id` of `cluster`: no region or zone, not draining, the cluster's gateway SPIFFE ID
/// in [`TRUST_DOMAIN`], one QUIC address in private space (`10.1.2.3:15443`), which the
/// catalog's default address rules accept. Tests that dial it set `quic_addrs`.
pub fn gateway(cluster_name: &str, id: &str) -> GatewayRecord {
    GatewayRecord {
        schema: SCHEMA_VERSION,
        cluster: cluster(cluster_name),
        gateway_id: gateway_id(id),
        region: String::new(),
        zone: String::new(),
        quic_addrs: vec![SocketAddr::from(([10, 1, 2, 3], 15443))],
        spiffe_id: format!("spiffe://{TRUST_DOMAIN}/cluster/{cluster_name}/gateway"),
        draining: false,
    }
}

/// An export of one TCP port named `http`: `healthy` endpoints healthy out of
/// `max(healthy, 1)`, no labels, every cluster allowed to call.
pub fn export(port: u16, healthy: u32) -> ExportRecord {
    ExportRecord {
        schema: SCHEMA_VERSION,
        ports: vec![PortSpec {
            name: "http".into(),
            port,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }]
        .into(),
        endpoints_total: healthy.max(1),
        endpoints_healthy: healthy,
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

/// The change that stores `record`.
pub fn put_gateway(record: GatewayRecord) -> Change {
    Change::PutGateway(Arc::new(record))
}

/// The change that stores `record` as gateway `id` of `cluster` exporting `service`.
pub fn put_export(cluster_name: &str, id: &str, service_key: &str, record: ExportRecord) -> Change {
    Change::PutExport(
        ExportKey {
            cluster: cluster(cluster_name),
            gateway: gateway_id(id),
            service: service(service_key),
        },
        Arc::new(record),
    )
}

/// The change that gives `cluster` the VIP `ip` for `service` (with a `target`, the VIP
/// pinned to that cluster).
pub fn put_vip(cluster_name: &str, service_key: &str, target: Option<&str>, ip: IpAddr) -> Change {
    Change::PutVip(
        VipKey {
            cluster: cluster(cluster_name),
            service: service(service_key),
            target: target.map(cluster),
        },
        ip,
    )
}

/// A drill of `kind` on every service of `cluster`, by ana for a game day, in force from
/// 1970 for an hour of Unix time (tests that compare against a clock set `created` and
/// `expires`).
pub fn drill(kind: DrillKind, cluster_name: &str) -> DrillRecord {
    DrillRecord {
        schema: SCHEMA_VERSION,
        schema_minor: 0,
        kind,
        cluster: cluster(cluster_name),
        service: None,
        who: "ana".into(),
        why: "game day".into(),
        created: 0,
        expires: 3600,
    }
}

/// A snapshot with `changes` applied in order, as the catalog watcher builds one.
pub fn snapshot(changes: impl IntoIterator<Item = Change>) -> Snapshot {
    let mut s = Snapshot::new();
    for change in changes {
        s.apply(change);
    }
    s
}

/// One kind of catalog change, applied to [`steering_base`], and which services' steering
/// inputs it changes (`None`: every service's).
#[derive(Debug)]
pub struct SteeringCase {
    pub what: &'static str,
    pub changes: Vec<Change>,
    pub changed: Option<Vec<&'static str>>,
}

impl SteeringCase {
    /// `base` with this case's changes applied.
    pub fn applied_to(&self, base: &Snapshot) -> Snapshot {
        let mut next = base.clone();
        for change in &self.changes {
            next.apply(change.clone());
        }
        next
    }
}

/// The catalog the [`steering_cases`] start from: gateway `west/w1` exporting `pay.prod`
/// and `db.prod` on port 8080.
pub fn steering_base() -> Snapshot {
    snapshot([
        put_gateway(gateway("west", "w1")),
        put_export("west", "w1", "pay.prod", export(8080, 1)),
        put_export("west", "w1", "db.prod", export(8080, 1)),
    ])
}

/// Every kind of change a consumer of steering inputs tells apart, for their table tests.
pub fn steering_cases() -> Vec<SteeringCase> {
    let ip = IpAddr::from([10, 64, 0, 1]);
    let case = |what, changes, changed| SteeringCase {
        what,
        changes,
        changed,
    };
    vec![
        case("nothing", vec![], Some(vec![])),
        case(
            "endpoints of one service",
            vec![put_export("west", "w1", "pay.prod", export(8080, 0))],
            Some(vec!["pay.prod"]),
        ),
        case(
            "a new service",
            vec![put_export("west", "w1", "web.prod", export(80, 1))],
            Some(vec!["web.prod"]),
        ),
        case(
            "a service gone",
            vec![Change::DeleteExport(ExportKey {
                cluster: cluster("west"),
                gateway: gateway_id("w1"),
                service: service("db.prod"),
            })],
            Some(vec!["db.prod"]),
        ),
        case(
            "a VIP",
            vec![put_vip("east", "pay.prod", None, ip)],
            Some(vec![]),
        ),
        case("a gateway", vec![put_gateway(gateway("south", "s1"))], None),
        case(
            "a drill",
            vec![Change::PutDrill(
                crate::names::DrillId::new("fail-west").expect("valid id"),
                Arc::new(drill(DrillKind::Fail, "west")),
            )],
            None,
        ),
    ]
}

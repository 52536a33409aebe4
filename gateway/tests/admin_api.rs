//! The gRPC admin API of whole gateways (`app::Gateway`) on the embedded store, asked through
//! a real tonic client: every method of `meshup.admin.v1.AdminService` with good and bad
//! input (an unknown service, a policy that cannot work, a drill without expiry, a policy
//! write that loses the compare-and-set to a concurrent one), the route rules methods, the
//! event stream, the standard health service and server reflection v1 and v1alpha.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use common::federation::gateway_config;
use common::{Pki, assert_eventually, within};
use meshup_admin_api::pb::admin_service_client::AdminServiceClient;
use meshup_admin_api::pb::{self, DrillKind, EventKind, LinkState};
use meshup_admin_api::{CURRENT_REVISION_METADATA, SERVICE_NAME};
use meshup_core::model::{PortSpec, Protocol};
use meshup_core::names::{Namespace, ServiceName};
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_gateway::app::Gateway;
use meshup_gateway::config::{Config, ExportConfig};
use tonic::Code;
use tonic::transport::Channel;

const PORT: u16 = 7100;

fn pay_export(backend: SocketAddr) -> ExportConfig {
    ExportConfig {
        name: ServiceName::new("pay").expect("name"),
        namespace: Namespace::new("prod").expect("namespace"),
        ports: vec![PortSpec {
            name: "http".into(),
            port: PORT,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }],
        endpoints: vec![backend],
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

/// A gateway of `cluster` on kernel-chosen loopback ports, with the gRPC admin API.
fn config(pki: &Pki, cluster: &str, vip_cidr: &str, exports: Vec<ExportConfig>) -> Config {
    let catalog = CatalogConfig {
        backend: Backend::Embedded,
        prefix: "/admin-api".into(),
        allow_loopback_addresses: true,
        ..CatalogConfig::default()
    };
    let mut config = gateway_config(
        &pki.issue(cluster, cluster),
        cluster,
        catalog,
        vip_cidr,
        exports,
    );
    config.admin.grpc = Some("127.0.0.1:0".parse().expect("addr"));
    config.validate().expect("valid config");
    config
}

async fn client(gateway: &Gateway) -> AdminServiceClient<Channel> {
    let addr = gateway.addrs().grpc.expect("the gRPC admin API is bound");
    AdminServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to the admin API")
}

/// Asserts a call failed with `code` and a message containing every one of `words`.
fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: Code,
    words: &[&str],
) -> tonic::Status {
    let status = match result {
        Ok(v) => panic!("expected {code:?}, got {v:?}"),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "{w:?} not in {:?}",
            status.message()
        );
    }
    status
}

const SPLIT: &str = r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":80},{"cluster":"north","weight":20}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_method_with_good_and_bad_input() {
    within(Duration::from_secs(120), async {
        let (west_backend, north_backend) = (common::Backend::echo().await, common::Backend::echo().await);
        let pki = Pki::new();
        let store = EmbeddedStore::new();
        let west = Gateway::start(config(&pki, "west", "127.82.2.0/24", vec![pay_export(west_backend.addr)]), Some(&store))
            .await
            .expect("west starts");
        let north = Gateway::start(config(&pki, "north", "127.82.3.0/24", vec![pay_export(north_backend.addr)]), Some(&store))
            .await
            .expect("north starts");
        let east = Gateway::start(config(&pki, "east", "127.82.1.0/24", vec![]), Some(&store))
            .await
            .expect("east starts");
        let mut api = client(&east).await;

        // Health: SERVING once ready (the standard service, as grpcurl and kubelet ask it).
        let addr = east.addrs().grpc.expect("grpc");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(addr).await);
        assert_eventually("health is SERVING", Duration::from_secs(20), || {
            let mut health = health.clone();
            async move {
                health
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await
                    .is_ok_and(|r| r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
            }
        })
        .await;
        let per_service = health
            .check(tonic_health::pb::HealthCheckRequest { service: SERVICE_NAME.into() })
            .await
            .expect("health of the admin service")
            .into_inner();
        assert_eq!(per_service.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

        // Reflection, both versions: every service is listed.
        let v1 = reflection_v1(addr).await;
        let v1alpha = reflection_v1alpha(addr).await;
        for listed in [&v1, &v1alpha] {
            for want in [
                SERVICE_NAME,
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ] {
                assert!(listed.contains(want), "{want} not in {listed:?}");
            }
        }

        // Every gateway sees both exporters of pay.prod.
        assert_eventually("east sees pay.prod from west and north", Duration::from_secs(20), || {
            let mut api = api.clone();
            async move {
                api.list_services(pb::ListServicesRequest { service: "pay.prod".into() })
                    .await
                    .is_ok_and(|r| {
                        let s = &r.into_inner().services[0];
                        s.clusters.iter().filter(|c| c.healthy == 1).count() == 2 && !s.vip.is_empty()
                    })
            }
        })
        .await;

        // GetStatus: this gateway, the catalog, every cluster.
        let status = api.get_status(pb::GetStatusRequest {}).await.expect("status").into_inner();
        let gw = status.gateway.expect("gateway");
        assert_eq!((gw.cluster.as_str(), gw.gateway_id.as_str(), gw.ready), ("east", "east-0", true));
        assert_eq!(gw.dns_zone, "clusterset.local");
        let catalog = status.catalog.expect("catalog");
        assert_eq!(catalog.backend, "embedded");
        assert!(catalog.synced && catalog.connected && catalog.revision > 0, "{catalog:?}");
        assert_eq!((catalog.services, catalog.exports), (1, 2));
        let names: Vec<&str> = status.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["east", "north", "west"]);
        let local = &status.clusters[0];
        assert!(local.local && local.link == LinkState::Local as i32, "{local:?}");
        assert_eq!(local.gateways.len(), 1);
        for remote in &status.clusters[1..] {
            assert!(!remote.local);
            assert_eq!(remote.gateways.len(), 1, "{remote:?}");
            assert_eq!(remote.gateways[0].addrs.len(), 1, "{remote:?}");
        }

        // ListServices: one service, its exporters, a target; an unknown one is NOT_FOUND.
        let services = api.list_services(pb::ListServicesRequest::default()).await.expect("services").into_inner();
        assert_eq!(services.services.len(), 1);
        let pay = &services.services[0];
        assert_eq!(pay.service, "pay.prod");
        assert_eq!(pay.ports[0].port, u32::from(PORT));
        assert!(["west", "north"].contains(&pay.main_target.as_str()), "{pay:?}");
        assert!(!pay.has_policy);
        assert_status(
            api.list_services(pb::ListServicesRequest { service: "nope.prod".into() }).await,
            Code::NotFound,
            &["no service nope.prod"],
        );
        assert_status(
            api.list_services(pb::ListServicesRequest { service: "nope".into() }).await,
            Code::InvalidArgument,
            &["service:", "<name>.<namespace>"],
        );

        // Resolve: a DNS name, a pinned name, the short form; bad names, ports and services.
        let r = api
            .resolve(pb::ResolveRequest { name: "pay.prod.svc.clusterset.local".into(), port: 0 })
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!((r.service.as_str(), r.port, r.policy_source.as_str()), ("pay.prod", u32::from(PORT), "default"));
        assert_eq!(r.vip, pay.vip);
        assert_eq!(r.verdicts.len(), 2, "{r:?}");
        assert_eq!(r.order.len(), 2, "{r:?}");
        assert!(r.verdicts.iter().all(|v| v.candidate && v.code == "candidate"), "{r:?}");
        let pinned = api
            .resolve(pb::ResolveRequest { name: "pay.prod.svc.north.clusterset.local.".into(), port: u32::from(PORT) })
            .await
            .expect("pinned")
            .into_inner();
        assert_eq!((pinned.pinned_cluster.as_str(), pinned.order.as_slice()), ("north", &["north".to_string()][..]));
        assert_status(api.resolve(pb::ResolveRequest { name: "nope.prod".into(), port: 0 }).await, Code::NotFound, &["no service nope.prod", "meshup services"]);
        assert_status(
            api.resolve(pb::ResolveRequest { name: "pay.prod.svc.elsewhere.example".into(), port: 0 }).await,
            Code::InvalidArgument,
            &["name:", "<service>.<namespace>.svc.clusterset.local"],
        );
        assert_status(api.resolve(pb::ResolveRequest { name: "pay.prod".into(), port: 9 }).await, Code::InvalidArgument, &["port:", "9 is not a port of pay.prod", "7100 (http)"]);
        assert_status(
            api.resolve(pb::ResolveRequest { name: "pay.prod.svc.east.clusterset.local".into(), port: 0 }).await,
            Code::NotFound,
            &["east does not export pay.prod", "north, west"],
        );
        assert_status(api.resolve(pb::ResolveRequest::default()).await, Code::InvalidArgument, &["name: missing"]);

        // The event stream, opened before the writes below.
        let mut events = api
            .watch_events(pb::WatchEventsRequest { include_existing: true })
            .await
            .expect("watch")
            .into_inner();
        let first = events.message().await.expect("stream").expect("sync event");
        assert_eq!(first.kind, EventKind::Sync as i32, "{first:?}");

        // Policies: the default, a bad one (named field), create, a lost race, delete.
        let got = api.get_policy(pb::GetPolicyRequest { service: "pay.prod".into() }).await.expect("get").into_inner();
        assert!(!got.found);
        assert_eq!(got.revision, 0);
        assert!(got.policy_json.contains("\"schema\":1"), "{}", got.policy_json);
        assert_status(api.get_policy(pb::GetPolicyRequest { service: "nope.prod".into() }).await, Code::NotFound, &["no policy for nope.prod"]);
        for (json, words) in [
            (r#"{"schema":1,"retry":{"max_attempts":0}}"#, &["policy_json.retry.max_attempts:", "is 0"][..]),
            (r#"{"schema":1,"levels":[{"clusters":[]}]}"#, &["policy_json.levels[0]:", "lists no cluster"][..]),
            (r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"west"}]}]}"#, &["policy_json.levels[1].clusters:", "west is listed twice"][..]),
            (r#"{"schema":1,"failback_hold_down":"soon"}"#, &["policy_json:", "not valid JSON"][..]),
            ("", &["policy_json: missing"][..]),
        ] {
            assert_status(
                api.validate_policy(pb::ValidatePolicyRequest { service: "pay.prod".into(), policy_json: json.into() }).await,
                Code::InvalidArgument,
                words,
            );
            // A write of the same is refused the same way, and writes nothing.
            assert_status(
                api.set_policy(pb::SetPolicyRequest { service: "pay.prod".into(), policy_json: json.into(), revision: 0 }).await,
                Code::InvalidArgument,
                words,
            );
        }
        let valid = api
            .validate_policy(pb::ValidatePolicyRequest {
                service: "pay.prod".into(),
                policy_json: r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"},{"cluster":"wets"}]}]}"#.into(),
            })
            .await
            .expect("legal")
            .into_inner();
        assert!(valid.warnings.iter().any(|w| w.contains("wets is not in the catalog")), "{valid:?}");
        assert!(valid.normalized_json.contains("\"max_attempts\":3"), "{valid:?}");

        let created = api
            .set_policy(pb::SetPolicyRequest { service: "pay.prod".into(), policy_json: SPLIT.into(), revision: 0 })
            .await
            .expect("create")
            .into_inner();
        assert!(created.revision > 0 && created.warnings.is_empty(), "{created:?}");
        // Creating again (revision 0: must not exist) loses and names the current revision.
        let lost = assert_status(
            api.set_policy(pb::SetPolicyRequest { service: "pay.prod".into(), policy_json: SPLIT.into(), revision: 0 }).await,
            Code::FailedPrecondition,
            &["already exists", &format!("revision {}", created.revision)],
        );
        assert_eq!(current_revision(&lost), Some(created.revision));
        let read = api.get_policy(pb::GetPolicyRequest { service: "pay.prod".into() }).await.expect("get").into_inner();
        assert!(read.found);
        assert_eq!(read.revision, created.revision);

        // Two operators read the same revision and write at once: one wins, the other is
        // told the winner's revision, and the stored policy is the winner's.
        let policies = [
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":70},{"cluster":"north","weight":30}]}]}"#,
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":60},{"cluster":"north","weight":40}]}]}"#,
        ];
        let (mut a, mut b) = (client(&east).await, client(&west).await);
        let (ra, rb) = tokio::join!(
            a.set_policy(pb::SetPolicyRequest { service: "pay.prod".into(), policy_json: policies[0].into(), revision: read.revision }),
            b.set_policy(pb::SetPolicyRequest { service: "pay.prod".into(), policy_json: policies[1].into(), revision: read.revision }),
        );
        let (won, lost, winner) = match (ra, rb) {
            (Ok(w), Err(l)) => (w.into_inner(), l, 70),
            (Err(l), Ok(w)) => (w.into_inner(), l, 60),
            other => panic!("exactly one concurrent write must win: {other:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
        assert!(
            lost.message().contains(&format!("changed since revision {}", read.revision))
                && lost.message().contains(&format!("at revision {} now", won.revision)),
            "{lost:?}"
        );
        assert_eq!(current_revision(&lost), Some(won.revision));
        let stored = api.get_policy(pb::GetPolicyRequest { service: "pay.prod".into() }).await.expect("get").into_inner();
        assert_eq!(stored.revision, won.revision);
        assert!(stored.policy_json.contains(&format!("\"weight\":{winner}")), "{}", stored.policy_json);

        // The decision follows the stored policy: both candidates in one level, by weight.
        assert_eventually("resolve uses the stored policy", Duration::from_secs(10), || {
            let mut api = api.clone();
            async move {
                api.resolve(pb::ResolveRequest { name: "pay.prod".into(), port: 0 }).await.is_ok_and(|r| {
                    let r = r.into_inner();
                    r.policy_source == "catalog"
                        // The most likely order: the larger share first.
                        && r.order == ["west", "north"]
                        && r.verdicts.iter().any(|v| v.cluster == "west" && v.weight == winner && v.level == 0)
                })
            }
        })
        .await;

        // Delete: a stale revision is a conflict, the right one deletes, again is NOT_FOUND.
        assert_status(
            api.delete_policy(pb::DeletePolicyRequest { service: "pay.prod".into(), revision: read.revision }).await,
            Code::FailedPrecondition,
            &[&format!("at revision {} now", won.revision)],
        );
        api.delete_policy(pb::DeletePolicyRequest { service: "pay.prod".into(), revision: won.revision }).await.expect("delete");
        assert_status(api.delete_policy(pb::DeletePolicyRequest { service: "pay.prod".into(), revision: 0 }).await, Code::NotFound, &["no policy stored for pay.prod"]);

        // Drills: bad input first, each naming its field.
        let good = pb::StartDrillRequest {
            id: String::new(),
            kind: DrillKind::Fail as i32,
            cluster: "west".into(),
            service: String::new(),
            who: "ana".into(),
            why: "game day".into(),
            duration_seconds: 600,
        };
        for (bad, code, words) in [
            (pb::StartDrillRequest { duration_seconds: 0, ..good.clone() }, Code::InvalidArgument, &["duration_seconds:", "needs an expiry"][..]),
            (pb::StartDrillRequest { duration_seconds: 8 * 86_400, ..good.clone() }, Code::InvalidArgument, &["duration_seconds:", "7 days"][..]),
            (pb::StartDrillRequest { who: " ".into(), ..good.clone() }, Code::InvalidArgument, &["who: missing"][..]),
            (pb::StartDrillRequest { why: String::new(), ..good.clone() }, Code::InvalidArgument, &["why: missing"][..]),
            (pb::StartDrillRequest { kind: 0, ..good.clone() }, Code::InvalidArgument, &["kind:", "drain, fail or pin"][..]),
            (pb::StartDrillRequest { kind: DrillKind::Pin as i32, ..good.clone() }, Code::InvalidArgument, &["service:", "pin drill needs the service"][..]),
            (pb::StartDrillRequest { cluster: "wset".into(), ..good.clone() }, Code::NotFound, &["cluster wset is not in the catalog", "east, north, west"][..]),
            (pb::StartDrillRequest { service: "nope.prod".into(), ..good.clone() }, Code::NotFound, &["no service nope.prod"][..]),
            (pb::StartDrillRequest { kind: DrillKind::Pin as i32, cluster: "east".into(), service: "pay.prod".into(), ..good.clone() }, Code::FailedPrecondition, &["cluster east does not export pay.prod", "exported by: north, west", "nothing to send traffic to"][..]),
            (pb::StartDrillRequest { id: "Bad_Id".into(), ..good.clone() }, Code::InvalidArgument, &["id:"][..]),
        ] {
            assert_status(api.start_drill(bad).await, code, words);
        }
        assert!(api.list_drills(pb::ListDrillsRequest { include_audit: true }).await.expect("list").into_inner().drills.is_empty(), "a refused drill wrote nothing");

        let drill = api.start_drill(good.clone()).await.expect("start").into_inner().drill.expect("drill");
        assert!(drill.id.starts_with("fail-west-"), "{drill:?}");
        assert_eq!(drill.expires - drill.created, 600);
        assert!(drill.active && drill.revision > 0);
        assert_status(
            api.start_drill(pb::StartDrillRequest { id: drill.id.clone(), ..good.clone() }).await,
            Code::AlreadyExists,
            &["already exists"],
        );
        // The decision explains it: west is out until the drill's expiry, north takes it all.
        assert_eventually("resolve shows the drill", Duration::from_secs(10), || {
            let mut api = api.clone();
            let expires = drill.expires;
            async move {
                api.resolve(pb::ResolveRequest { name: "pay.prod".into(), port: 0 }).await.is_ok_and(|r| {
                    let r = r.into_inner();
                    let west = r.verdicts.iter().find(|v| v.cluster == "west");
                    west.is_some_and(|w| {
                        !w.candidate && w.code == "failed_by_drill" && w.until == expires && w.reason.contains("ana: game day")
                    }) && r.order == ["north"]
                })
            }
        })
        .await;
        let listed = api.list_drills(pb::ListDrillsRequest { include_audit: false }).await.expect("list").into_inner();
        assert_eq!(listed.drills.len(), 1);
        assert_eq!((listed.drills[0].id.as_str(), listed.drills[0].who.as_str()), (drill.id.as_str(), "ana"));
        assert_status(api.stop_drill(pb::StopDrillRequest { id: drill.id.clone(), who: String::new() }).await, Code::InvalidArgument, &["who: missing"]);
        let audit = api
            .stop_drill(pb::StopDrillRequest { id: drill.id.clone(), who: "bo".into() })
            .await
            .expect("stop")
            .into_inner()
            .audit
            .expect("audit");
        assert_eq!((audit.how.as_str(), audit.ended_by.as_str()), ("stopped", "bo"));
        assert_status(api.stop_drill(pb::StopDrillRequest { id: drill.id.clone(), who: "bo".into() }).await, Code::NotFound, &["no such drill", "already ended"]);
        let listed = api.list_drills(pb::ListDrillsRequest { include_audit: true }).await.expect("list").into_inner();
        assert!(listed.drills.is_empty());
        assert_eq!(listed.audit.len(), 1);
        assert_eq!(listed.audit[0].drill.as_ref().map(|d| d.who.as_str()), Some("ana"));
        // An id is used once: its audit entry keeps it.
        assert_status(
            api.start_drill(pb::StartDrillRequest { id: drill.id.clone(), ..good.clone() }).await,
            Code::AlreadyExists,
            &["already ended"],
        );

        // The stream told all of it, in order.
        let mut seen = Vec::new();
        let wanted = [
            EventKind::PolicySet,
            EventKind::PolicyDeleted,
            EventKind::DrillStarted,
            EventKind::TargetChanged,
            EventKind::DrillEnded,
        ];
        tokio::time::timeout(Duration::from_secs(15), async {
            while !wanted.iter().all(|k| seen.iter().any(|(s, _): &(i32, String)| *s == *k as i32)) {
                let e = events.message().await.expect("stream").expect("an event");
                seen.push((e.kind, e.text));
            }
        })
        .await
        .unwrap_or_else(|_| panic!("events missing; got {seen:?}"));
        assert!(seen.iter().any(|(k, t)| *k == EventKind::ServiceAdded as i32 && t.contains("pay.prod")), "existing events come first: {seen:?}");
        assert!(
            seen.iter().any(|(k, t)| *k == EventKind::DrillStarted as i32 && t.contains("started by ana") && t.contains("because game day")),
            "{seen:?}"
        );
        assert!(
            seen.iter().any(|(k, t)| *k == EventKind::TargetChanged as i32 && t.contains("now go mainly to north")),
            "{seen:?}"
        );
        drop(events);

        for g in [east, west, north] {
            g.drain().await;
        }
    })
    .await;
}

/// The route rules methods on whole gateways: a bad record named by its field (and nothing
/// written), create, read back with the writer, two operators at once (one wins, the other is
/// told the winner's revision), an overwrite that changes nothing, a stale delete, a delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_rules_methods_with_good_and_bad_input() {
    within(Duration::from_secs(120), async {
        let backend = common::Backend::echo().await;
        let pki = Pki::new();
        let store = EmbeddedStore::new();
        let west = Gateway::start(config(&pki, "west", "127.82.12.0/24", vec![pay_export(backend.addr)]), Some(&store))
            .await
            .expect("west starts");
        let east = Gateway::start(config(&pki, "east", "127.82.11.0/24", vec![]), Some(&store))
            .await
            .expect("east starts");
        let mut api = client(&east).await;
        assert_eventually("east sees pay.prod", Duration::from_secs(20), || {
            let mut api = api.clone();
            async move { api.list_services(pb::ListServicesRequest { service: "pay.prod".into() }).await.is_ok() }
        })
        .await;
        let pay = || "pay.prod".to_string();

        assert_status(api.get_routes(pb::GetRoutesRequest { service: "nope.prod".into() }).await, Code::NotFound, &["no route rules for nope.prod"]);
        let none = api.get_routes(pb::GetRoutesRequest { service: pay() }).await.expect("get").into_inner();
        assert_eq!((none.found, none.revision), (false, 0));
        assert_eq!(none.routes_json, r#"{"schema":1,"schema_minor":0,"rules":[]}"#);
        for (json, words) in [
            (r#"{"schema":1,"rules":[{"retry":{"attempts":0}}]}"#, &["routes_json.rules[0].retry.attempts:", "outside 1..=5"][..]),
            (r#"{"schema":1,"rules":[{"match":[{"path":{"prefix":"api"}}]}]}"#, &["routes_json.rules[0].match[0].path:", "does not start with '/'"][..]),
            (r#"{"schema":2,"rules":[]}"#, &["routes_json.schema:", "schema version 2"][..]),
            (r#"{"schema":1}"#, &["routes_json:", "not valid JSON"][..]),
            ("", &["routes_json: missing"][..]),
        ] {
            assert_status(api.validate_routes(pb::ValidateRoutesRequest { service: pay(), routes_json: json.into() }).await, Code::InvalidArgument, words);
            assert_status(api.apply_routes(pb::ApplyRoutesRequest { service: pay(), routes_json: json.into(), revision: 0 }).await, Code::InvalidArgument, words);
            assert_status(api.set_routes(pb::SetRoutesRequest { service: pay(), routes_json: json.into() }).await, Code::InvalidArgument, words);
        }
        assert!(!api.get_routes(pb::GetRoutesRequest { service: pay() }).await.expect("get").into_inner().found, "refused writes wrote nothing");
        let valid = api
            .validate_routes(pb::ValidateRoutesRequest { service: pay(), routes_json: r#"{"schema":1,"rules":[{"destinations":[{"cluster":"north"}]}]}"#.into() })
            .await
            .expect("legal")
            .into_inner();
        assert!(valid.warnings.iter().any(|w| w.contains("cluster north (rules rule-0) is not in the catalog")), "{valid:?}");
        assert!(valid.warnings.iter().any(|w| w.contains("no http or grpc port")), "{valid:?}");

        let rules = |weight: u32| format!(r#"{{"schema":1,"rules":[{{"name":"api","match":[{{"path":{{"prefix":"/api"}}}}],"destinations":[{{"cluster":"west","weight":{weight}}},{{"weight":1}}]}}],"updated_by":"mallory"}}"#);
        let created = api.apply_routes(pb::ApplyRoutesRequest { service: pay(), routes_json: rules(5), revision: 0 }).await.expect("create").into_inner();
        assert!(created.revision > 0, "{created:?}");
        let lost = assert_status(
            api.apply_routes(pb::ApplyRoutesRequest { service: pay(), routes_json: rules(5), revision: 0 }).await,
            Code::FailedPrecondition,
            &["route rules for pay.prod already exist", &format!("revision {}", created.revision)],
        );
        assert_eq!(current_revision(&lost), Some(created.revision));
        let read = api.get_routes(pb::GetRoutesRequest { service: pay() }).await.expect("get").into_inner();
        assert_eq!((read.found, read.revision), (true, created.revision));
        let stored: serde_json::Value = serde_json::from_str(&read.routes_json).expect("json");
        assert_eq!(stored["updated_by"], "local", "the caller, not what the JSON claimed: {stored}");
        assert!(stored["updated_at"].as_i64().is_some_and(|t| t > 1_700_000_000), "{stored}");

        // Two operators read the same revision and write at once: one wins.
        let (mut a, mut b) = (client(&east).await, client(&west).await);
        let (ra, rb) = tokio::join!(
            a.apply_routes(pb::ApplyRoutesRequest { service: pay(), routes_json: rules(7), revision: read.revision }),
            b.apply_routes(pb::ApplyRoutesRequest { service: pay(), routes_json: rules(8), revision: read.revision }),
        );
        let (won, lost, winner) = match (ra, rb) {
            (Ok(w), Err(l)) => (w.into_inner(), l, 7),
            (Err(l), Ok(w)) => (w.into_inner(), l, 8),
            other => panic!("exactly one concurrent write must win: {other:?}"),
        };
        assert_eq!(lost.code(), Code::FailedPrecondition, "{lost:?}");
        assert!(lost.message().contains(&format!("changed since revision {}: they are at revision {} now", read.revision, won.revision)), "{lost:?}");
        assert_eq!(current_revision(&lost), Some(won.revision));
        let stored = api.get_routes(pb::GetRoutesRequest { service: pay() }).await.expect("get").into_inner();
        assert_eq!(stored.revision, won.revision);
        assert!(stored.routes_json.contains(&format!(r#""cluster":"west","weight":{winner}"#)), "{}", stored.routes_json);

        // Set: the same rules change nothing; others are written over whatever is stored.
        let same = api.set_routes(pb::SetRoutesRequest { service: pay(), routes_json: rules(winner) }).await.expect("set").into_inner();
        assert_eq!((same.changed, same.revision, same.previous_revision), (false, won.revision, won.revision));
        let over = api.set_routes(pb::SetRoutesRequest { service: pay(), routes_json: rules(9) }).await.expect("set").into_inner();
        assert!(over.changed && over.revision > won.revision && over.previous_revision == won.revision, "{over:?}");

        // Delete: a stale revision is a conflict, the right one deletes, again is NOT_FOUND.
        assert_status(
            api.delete_routes(pb::DeleteRoutesRequest { service: pay(), revision: won.revision }).await,
            Code::FailedPrecondition,
            &[&format!("they are at revision {} now", over.revision)],
        );
        api.delete_routes(pb::DeleteRoutesRequest { service: pay(), revision: over.revision }).await.expect("delete");
        assert_status(api.delete_routes(pb::DeleteRoutesRequest { service: pay(), revision: 0 }).await, Code::NotFound, &["no route rules stored for pay.prod"]);
        assert!(!api.get_routes(pb::GetRoutesRequest { service: pay() }).await.expect("get").into_inner().found);

        for g in [east, west] {
            g.drain().await;
        }
    })
    .await;
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

fn current_revision(status: &tonic::Status) -> Option<i64> {
    status
        .metadata()
        .get(CURRENT_REVISION_METADATA)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Services listed by reflection v1.
async fn reflection_v1(addr: SocketAddr) -> BTreeSet<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1 reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1: unexpected answer {other:?}"),
    }
}

/// Services listed by reflection v1alpha (what older clients, grpcurl 1.8 among them, ask).
async fn reflection_v1alpha(addr: SocketAddr) -> BTreeSet<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let answer = answers
        .message()
        .await
        .expect("answer")
        .expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("v1alpha: unexpected answer {other:?}"),
    }
}

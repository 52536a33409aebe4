//! Remote admin over mutual TLS (`admin.grpc_remote`), with whole gateways (`app::Gateway`)
//! on the embedded store and real TLS: an operator certificate from
//! `meshup certs issue --operator` may read and write, and every write names it (drills'
//! `who`, the audit entry's `ended_by`, a policy's and route rules' `updated_by`); no client
//! certificate, a gateway SVID, another federation's operator, an operator left off
//! `admin.operators`, and a plaintext client are all refused with nothing written; the
//! loopback listener works as before, its writes recorded as the local caller's.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::federation::{export_config, gateway_config};
use common::{Pki, assert_eventually, within};
use meshup_admin_api::pb::admin_service_client::AdminServiceClient;
use meshup_admin_api::pb::{self, DrillKind};
use meshup_core::policy::{DrillAudit, DrillRecord, PolicyRecord};
use meshup_federation::config::{Backend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::keys::KeyLayout;
use meshup_federation::store;
use meshup_gateway::app::Gateway;
use meshup_gateway::certs;
use meshup_gateway::cli::remote::{self, Target};
use meshup_gateway::cli::{Conn, Output};
use meshup_gateway::config::Config;
use meshup_gateway::identity::AdminServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const PREFIX: &str = "/admin-remote";
const PORT: u16 = 7200;

fn config(
    pki: &Pki,
    cluster: &str,
    vip_cidr: &str,
    backend: Option<std::net::SocketAddr>,
) -> Config {
    let catalog = CatalogConfig {
        backend: Backend::Embedded,
        prefix: PREFIX.into(),
        allow_loopback_addresses: true,
        ..CatalogConfig::default()
    };
    let exports = backend.map_or_else(Vec::new, |b| vec![export_config("pay.prod", PORT, vec![b])]);
    let mut config = gateway_config(
        &pki.issue(cluster, cluster),
        cluster,
        catalog,
        vip_cidr,
        exports,
    );
    config.admin.grpc = Some("127.0.0.1:0".parse().expect("addr"));
    config.admin.grpc_remote = Some("127.0.0.1:0".parse().expect("addr"));
    config.admin.operators = vec!["ana".into(), "bo".into()];
    config.validate().expect("valid config");
    config
}

/// What the CLI builds from `--cert DIR/cert.pem` (key and bundle next to it).
fn conn(admin: &str, dir: &Path) -> Conn {
    Conn {
        admin: admin.to_owned(),
        output: Output::Table,
        cert: Some(dir.join(certs::CERT_FILE)),
        key: None,
        ca: None,
    }
}

fn endpoint(target: &Target) -> Endpoint {
    Endpoint::from_shared(format!("http://{}", target.authority))
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
}

/// A client of the remote listener as the CLI makes it, with the operator in `dir`.
async fn operator_client(remote_addr: &str, dir: &Path) -> AdminServiceClient<Channel> {
    let admin = format!("https://{remote_addr}");
    let c = conn(&admin, dir);
    let target = remote::target(&admin, true).expect("target");
    let tls = remote::client_config(&c).expect("the operator's files are usable");
    AdminServiceClient::new(
        remote::channel(endpoint(&target), &target, tls)
            .await
            .expect("connect"),
    )
}

/// A TLS client that verifies the gateway properly but presents `identity` (cert.pem and
/// key.pem in that directory), or no certificate at all: the CLI refuses such files itself,
/// so the attacks go around it.
fn raw_tls(bundle: &Path, identity: Option<&Path>) -> rustls::ClientConfig {
    let anchors = CertificateDer::pem_file_iter(bundle)
        .expect("bundle")
        .map(|c| {
            webpki::anchor_from_trusted_cert(&c.expect("pem"))
                .expect("anchor")
                .to_owned()
        })
        .collect();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("tls13")
    .dangerous()
    .with_custom_certificate_verifier(AdminServerVerifier::new(anchors, common::TD));
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(dir) => {
            let chain = CertificateDer::pem_file_iter(dir.join(certs::CERT_FILE))
                .expect("cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("pem");
            let key = PrivateKeyDer::from_pem_file(dir.join(certs::KEY_FILE)).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client auth")
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tls
}

/// Calls GetStatus and StartDrill with `tls`; both must fail (at the handshake, or with
/// `code` when the handshake passes).
async fn assert_refused(
    what: &str,
    remote_addr: &str,
    tls: rustls::ClientConfig,
    code: Option<Code>,
) {
    let target = remote::target(&format!("https://{remote_addr}"), true).expect("target");
    let channel = match remote::channel(endpoint(&target), &target, tls).await {
        Ok(c) => c,
        Err(e) => {
            assert!(
                code.is_none(),
                "{what}: refused at connect ({e}), expected {code:?}"
            );
            return;
        }
    };
    let mut api = AdminServiceClient::new(channel);
    let status = api
        .get_status(pb::GetStatusRequest {})
        .await
        .expect_err(what);
    let drill = api
        .start_drill(drill_request("west", "refused"))
        .await
        .expect_err(what);
    match code {
        // The server refuses the certificate after the client's side of the handshake is
        // done (TLS 1.3), so the client learns it from the alert on its first read.
        None => {
            for s in [&status, &drill] {
                assert!(
                    matches!(
                        s.code(),
                        Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
                    ),
                    "{what}: {s:?}"
                );
            }
        }
        Some(code) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert_eq!(drill.code(), code, "{what}: {drill:?}");
        }
    }
}

fn drill_request(cluster: &str, why: &str) -> pb::StartDrillRequest {
    pb::StartDrillRequest {
        kind: DrillKind::Drain as i32,
        cluster: cluster.into(),
        why: why.into(),
        duration_seconds: 600,
        ..Default::default()
    }
}

/// Every drill, ended drill and policy in the store, as the keys' values.
async fn written(store: &EmbeddedStore) -> (Vec<DrillRecord>, Vec<DrillAudit>, Vec<PolicyRecord>) {
    let layout = KeyLayout::new(PREFIX).expect("layout");
    async fn values<T: serde::de::DeserializeOwned>(
        store: &EmbeddedStore,
        prefix: String,
    ) -> Vec<T> {
        let (kvs, _) = store::list_prefix(store, prefix.as_bytes())
            .await
            .expect("list");
        kvs.iter()
            .map(|kv| serde_json::from_slice(&kv.value).expect("record"))
            .collect()
    }
    (
        values(store, layout.drills()).await,
        values(store, layout.drill_audits()).await,
        values(store, format!("{}policies/", layout.root())).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_write_under_their_own_name_and_nobody_else_gets_in() {
    within(Duration::from_secs(120), async {
        let backend = common::Backend::echo().await;
        let pki = Pki::new();
        let store = EmbeddedStore::new();
        let west = Gateway::start(config(&pki, "west", "127.83.2.0/24", Some(backend.addr)), Some(&store))
            .await
            .expect("west starts");
        let east = Gateway::start(config(&pki, "east", "127.83.1.0/24", None), Some(&store))
            .await
            .expect("east starts");
        let remote_addr = east.addrs().grpc_remote.expect("the remote listener is bound").to_string();
        let loopback = east.addrs().grpc.expect("the loopback listener is bound");
        let ana_dir = pki.operator("ana");
        let bundle = ana_dir.join(certs::BUNDLE_FILE);

        // --- refused, nothing written -------------------------------------------------
        assert_refused("no client certificate", &remote_addr, raw_tls(&bundle, None), None).await;
        let gateway_svid = pki.issue("west-svid", "west");
        assert_refused("a gateway SVID as client", &remote_addr, raw_tls(&bundle, Some(&gateway_svid)), None).await;
        let other_ca = pki.dir.path().join("other-ca");
        certs::init_ca_overwrite(common::TD, &other_ca).expect("other CA");
        let foreign = pki.dir.path().join("foreign-ana");
        certs::issue_operator(&other_ca, "ana", &foreign, Duration::from_secs(600)).expect("foreign operator");
        assert_refused("an operator of another CA", &remote_addr, raw_tls(&bundle, Some(&foreign)), None).await;
        // A valid operator of this federation that the gateway's admin.operators leaves out.
        let carol = pki.operator("carol");
        let carol_tls = remote::client_config(&conn(&format!("https://{remote_addr}"), &carol)).expect("carol's files");
        assert_refused("an operator not in admin.operators", &remote_addr, carol_tls, Some(Code::PermissionDenied)).await;
        // Plaintext gRPC to the TLS port.
        let plain = async {
            let mut api = AdminServiceClient::connect(format!("http://{remote_addr}")).await.map_err(|e| e.to_string())?;
            api.start_drill(drill_request("west", "plaintext")).await.map_err(|e| e.to_string())
        };
        let plain = tokio::time::timeout(Duration::from_secs(15), plain).await.expect("plaintext attempt ends");
        assert!(plain.is_err(), "plaintext on the remote port must fail: {plain:?}");
        // The CLI itself will not call https without an operator certificate, nor with a
        // gateway's.
        let mut bare = conn(&format!("https://{remote_addr}"), &ana_dir);
        bare.cert = None;
        let e = remote::client_config(&bare).expect_err("no certificate");
        assert!(e.message.contains("meshup certs issue --operator NAME"), "{e}");
        let e = remote::client_config(&conn(&format!("https://{remote_addr}"), &gateway_svid)).expect_err("a gateway SVID");
        assert!(e.message.contains("is not an operator identity"), "{e}");
        let (drills, audits, policies) = written(&store).await;
        assert!(drills.is_empty() && audits.is_empty() && policies.is_empty(), "refused calls wrote {drills:?} {audits:?} {policies:?}");

        // --- a valid operator ----------------------------------------------------------
        let mut ana = operator_client(&remote_addr, &ana_dir).await;
        assert_eventually("east sees west's export", Duration::from_secs(20), || {
            let mut ana = ana.clone();
            async move {
                ana.list_services(pb::ListServicesRequest::default())
                    .await
                    .is_ok_and(|r| r.into_inner().services.iter().any(|s| s.service == "pay.prod"))
            }
        })
        .await;
        // `who` may name the operator, but no one else.
        let err = ana
            .start_drill(pb::StartDrillRequest { who: "bo".into(), ..drill_request("west", "impersonation") })
            .await
            .expect_err("ana cannot write as bo");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("who: ") && err.message().contains("\"ana\""), "{err:?}");
        let started = ana
            .start_drill(pb::StartDrillRequest { id: "gd-remote".into(), ..drill_request("west", "game day") })
            .await
            .expect("ana starts a drill")
            .into_inner()
            .drill
            .expect("drill");
        assert_eq!(started.who, "ana");
        let (drills, _, _) = written(&store).await;
        assert_eq!(drills.iter().map(|d| (d.who.as_str(), d.why.as_str())).collect::<Vec<_>>(), [("ana", "game day")]);
        let stopped = ana
            .stop_drill(pb::StopDrillRequest { id: "gd-remote".into(), who: String::new() })
            .await
            .expect("ana stops it")
            .into_inner();
        assert_eq!(stopped.audit.expect("audit").ended_by, "ana");
        let (drills, audits, _) = written(&store).await;
        assert!(drills.is_empty());
        assert_eq!(audits.iter().map(|a| (a.drill.who.as_str(), a.ended_by.as_str())).collect::<Vec<_>>(), [("ana", "ana")]);

        // A policy: the gateway writes the author, whatever the JSON claims.
        let before = meshup_gateway::outbound::steer::unix_now();
        let set = ana
            .set_policy(pb::SetPolicyRequest {
                service: "pay.prod".into(),
                policy_json: r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]}],"updated_by":"mallory"}"#.into(),
                revision: 0,
            })
            .await
            .expect("ana sets a policy")
            .into_inner();
        let (_, _, policies) = written(&store).await;
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0].updated_by.as_deref(), Some("ana"));
        assert!(policies[0].updated_at.is_some_and(|t| t >= before), "{:?}", policies[0].updated_at);
        // Route rules the same way.
        let routes_key = KeyLayout::new(PREFIX).expect("layout").routes(&"pay.prod".parse().expect("key"));
        ana.apply_routes(pb::ApplyRoutesRequest {
            service: "pay.prod".into(),
            routes_json: r#"{"schema":1,"rules":[{"name":"all"}],"updated_by":"mallory"}"#.into(),
            revision: 0,
        })
        .await
        .expect("ana applies route rules");
        let kv = store::get(&store, routes_key.clone()).await.expect("get").expect("stored");
        let routes = meshup_core::routes::decode(&kv.value).expect("a route record");
        assert_eq!(routes.updated_by.as_deref(), Some("ana"));
        assert!(routes.updated_at.is_some_and(|t| t >= before), "{routes:?}");

        // --- loopback, as before: the caller names itself ------------------------------
        let mut local = AdminServiceClient::connect(format!("http://{loopback}")).await.expect("loopback");
        let err = local.start_drill(drill_request("west", "no name")).await.expect_err("who is needed on loopback");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with("who: missing"), "{err:?}");
        let local_drill = local
            .start_drill(pb::StartDrillRequest { who: "bo".into(), ..drill_request("west", "local") })
            .await
            .expect("loopback drill")
            .into_inner()
            .drill
            .expect("drill");
        assert_eq!(local_drill.who, "bo");
        local
            .set_policy(pb::SetPolicyRequest {
                service: "pay.prod".into(),
                policy_json: r#"{"schema":1}"#.into(),
                revision: set.revision,
            })
            .await
            .expect("loopback policy write");
        let (drills, _, policies) = written(&store).await;
        assert_eq!(drills.iter().map(|d| d.who.as_str()).collect::<Vec<_>>(), ["bo"]);
        assert_eq!(policies[0].updated_by.as_deref(), Some("local"));
        local
            .set_routes(pb::SetRoutesRequest { service: "pay.prod".into(), routes_json: r#"{"schema":1,"rules":[{"name":"local"}]}"#.into() })
            .await
            .expect("loopback route rules write");
        let kv = store::get(&store, routes_key).await.expect("get").expect("stored");
        assert_eq!(meshup_core::routes::decode(&kv.value).expect("a route record").updated_by.as_deref(), Some("local"));

        drop(west);
    })
    .await;
}

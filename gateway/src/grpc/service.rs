//! `meshup.admin.v1.AdminService`: every method reads the gateway's live state (catalog
//! snapshot, local exports, links, the decision's health) or writes the catalog store with a
//! compare-and-set transaction. Errors carry the standard codes and say what to do.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use meshup_admin_api::MAX_DRILL_DURATION;
use meshup_admin_api::convert::{Export, export_from_pb, export_to_pb};
use meshup_admin_api::convert::{audit_to_pb, drill_kind_from_pb, drill_to_pb, record_error_field};
use meshup_admin_api::names::{parse_resolve_name, parse_service};
use meshup_admin_api::pb::admin_service_server::AdminService;
use meshup_admin_api::pb::{self, EventKind, LinkState};
use meshup_admin_api::policy_file::record_json;
use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, DrillId, GatewayId, ServiceKey};
use meshup_core::policy::{self, DrillEnd, DrillRecord, PolicyRecord, RecordError};
use meshup_federation::drills::{self, DrillError, Ended};
use meshup_federation::keys::KeyLayout;
use meshup_federation::store::{self, Store};
use meshup_federation::watcher::WatcherStatus;
use meshup_policy::{Decision, Excluded, PeerSignal, Verdict, decide::Note};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tonic::{Request, Response, Status};

use super::caller::{self, AuthorError, Caller, caller_of};
use super::cas::{self, Record, store_status};
use super::{MAX_WATCHERS, events, routes};
use crate::config::ExportConfig;
use crate::exports::{ExportError, Registered};
use crate::inbound::LocalExports;
use crate::outbound::{self, PeerLink, route::Route, steer::unix_now};
use crate::readiness::Readiness;

/// What the API reads and writes: the gateway's live channels and its catalog store.
#[derive(Debug)]
pub struct Context {
    pub cluster: ClusterName,
    pub gateway_id: GatewayId,
    pub region: String,
    pub zone: String,
    /// "etcd" or "embedded".
    pub backend: String,
    /// The DNS zone (`clusterset.local`), for `Resolve`.
    pub dns_zone: String,
    pub store: Arc<dyn Store>,
    pub layout: KeyLayout,
    pub readiness: Readiness,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub watcher: watch::Receiver<WatcherStatus>,
    pub exports: watch::Receiver<Arc<LocalExports>>,
    pub draining: watch::Receiver<bool>,
    pub links: watch::Receiver<Arc<Vec<PeerLink>>>,
    pub outbound: outbound::Proxy,
    /// The exports as configured (file and API): `RegisterExport` / `WithdrawExport`.
    pub export_set: crate::exports::Exports,
    /// The config file in force, for `ListExports`.
    pub loaded: watch::Receiver<crate::reload::Loaded>,
}

/// The service implementation.
#[derive(Debug, Clone)]
pub struct AdminApi {
    ctx: Arc<Context>,
    watchers: Arc<Semaphore>,
}

impl AdminApi {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            watchers: Arc::new(Semaphore::new(MAX_WATCHERS)),
        }
    }
}

pub(super) fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {message}"))
}

/// The author a write records ([`caller::author`]); INVALID_ARGUMENT on `who` otherwise.
fn author_arg(caller: &Caller, who: &str, action: &str) -> Result<String, Status> {
    caller::author(caller, who).map_err(|e| match e {
        AuthorError::Missing => invalid(
            "who",
            format!("missing: say who {action} (--who NAME); it goes into the audit trail"),
        ),
        e => invalid("who", e),
    })
}

pub(super) fn service_arg(text: &str) -> Result<ServiceKey, Status> {
    if text.trim().is_empty() {
        return Err(invalid(
            "service",
            "missing: name it as <name>.<namespace> (pay.prod)",
        ));
    }
    parse_service(text).map_err(|e| invalid("service", e))
}

fn unknown_service(snapshot: &Snapshot, key: &ServiceKey) -> Status {
    Status::not_found(format!(
        "no service {key} in the catalog (revision {}, {} services); `meshup services` lists them",
        snapshot.revision,
        snapshot.service_count()
    ))
}

/// A policy's JSON, decoded and validated; INVALID_ARGUMENT naming the field otherwise.
fn policy_arg(json: &str) -> Result<PolicyRecord, Status> {
    if json.trim().is_empty() {
        return Err(invalid(
            "policy_json",
            "missing: the PolicyRecord as JSON (docs/policy.md)",
        ));
    }
    let bad = |e: RecordError| match record_error_field(&e) {
        Some(field) => invalid(&format!("policy_json.{field}"), e),
        None => invalid("policy_json", e),
    };
    let record: PolicyRecord = policy::decode(json.as_bytes()).map_err(bad)?;
    record.validate().map_err(bad)?;
    Ok(record)
}

/// What is legal in a policy but probably not meant.
fn policy_warnings(snapshot: &Snapshot, key: &ServiceKey, record: &PolicyRecord) -> Vec<String> {
    let mut out = Vec::new();
    let view = snapshot.service(key);
    if view.is_none() {
        out.push(format!(
            "no cluster exports {key} yet: the policy applies once one does"
        ));
    }
    let known: Vec<&ClusterName> = snapshot.clusters().collect();
    for cluster in policy::named_clusters(record) {
        if !known.contains(&&cluster) {
            out.push(format!(
                "cluster {cluster} is not in the catalog (known: {}): a typo gets no traffic",
                join(known.iter())
            ));
        } else if let Some(v) = view
            && !v.clusters.contains_key(&cluster)
        {
            out.push(format!("cluster {cluster} does not export {key} (yet)"));
        }
    }
    out
}

pub(super) fn join<T: std::fmt::Display>(items: impl Iterator<Item = T>) -> String {
    let v: Vec<String> = items.map(|i| i.to_string()).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Unix seconds of a monotonic instant (for "until when").
fn unix_of(at: Instant, now: Instant, unix_now: i64) -> i64 {
    if at >= now {
        unix_now + i64::try_from((at - now).as_secs()).unwrap_or(i64::MAX / 2) + 1
    } else {
        unix_now - i64::try_from((now - at).as_secs()).unwrap_or(0)
    }
}

/// Every cluster's verdict as a message: a fixed code, the reason in words, until when.
pub fn verdicts(decision: &Decision, now: Instant, unix_now: i64) -> Vec<pb::ClusterVerdict> {
    decision
        .explanations
        .iter()
        .map(|e| {
            let mut v = pb::ClusterVerdict {
                cluster: e.cluster.to_string(),
                ..Default::default()
            };
            match &e.verdict {
                Verdict::Candidate {
                    rank,
                    level,
                    share_ppm,
                    weight,
                    note,
                } => {
                    v.candidate = true;
                    v.rank = u32::try_from(*rank).unwrap_or(u32::MAX);
                    v.level = i32::try_from(*level).unwrap_or(i32::MAX);
                    v.share_ppm = *share_ppm;
                    v.weight = *weight;
                    let base = format!(
                        "level {level}, weight {weight}, {:.1}% of new connections",
                        *share_ppm as f64 / 10_000.0
                    );
                    match note {
                        None => {
                            v.code = "candidate".into();
                            v.reason = base;
                        }
                        Some(Note::HoldDown { until }) => {
                            v.code = "hold_down".into();
                            v.reason =
                                "recovered, holding down: tried after every other candidate".into();
                            v.until = unix_of(*until, now, unix_now);
                        }
                        Some(Note::LastResort { ejected_until }) => {
                            v.code = "last_resort".into();
                            v.reason =
                                "ejected by outlier detection, tried as nothing else is left"
                                    .into();
                            v.until = unix_of(*ejected_until, now, unix_now);
                        }
                    }
                }
                Verdict::Excluded(x) => {
                    v.level = -1;
                    let (code, reason, until) = match x {
                        Excluded::PinnedElsewhere { to, who } => (
                            "pinned_elsewhere",
                            format!("a pin drill of {who} sends the traffic to {to}"),
                            0,
                        ),
                        Excluded::FailedByDrill { who, why, expires } => (
                            "failed_by_drill",
                            format!("failed by a drill of {who}: {why}"),
                            *expires,
                        ),
                        Excluded::DrainedByDrill { who, why, expires } => (
                            "drained_by_drill",
                            format!("drained by a drill of {who}: {why}"),
                            *expires,
                        ),
                        Excluded::ForbidsUs => ("forbids_us", x.to_string(), 0),
                        Excluded::LocalOnly => ("local_only", x.to_string(), 0),
                        Excluded::NotInPolicy => ("not_in_policy", x.to_string(), 0),
                        Excluded::NoHealthyEndpoints => ("no_healthy_endpoints", x.to_string(), 0),
                        Excluded::BelowHealthyMinimum { .. } => {
                            ("below_healthy_minimum", x.to_string(), 0)
                        }
                        Excluded::NoGateway => ("no_gateway", x.to_string(), 0),
                        Excluded::PeerDown { since } => (
                            "peer_down",
                            format!(
                                "{} (for {}s)",
                                x,
                                now.saturating_duration_since(*since).as_secs()
                            ),
                            0,
                        ),
                        Excluded::CircuitOpen { .. } => ("circuit_open", x.to_string(), 0),
                        Excluded::Ejected { until } => {
                            ("ejected", x.to_string(), unix_of(*until, now, unix_now))
                        }
                    };
                    v.code = code.into();
                    v.reason = reason;
                    v.until = until;
                }
            }
            v
        })
        .collect()
}

/// The candidates in their most likely order, ranked again: each new connection draws its
/// first choice by share, so the order of one draw (the explanation's ranks) would mislead.
/// Plain candidates by level, then share (largest first); then clusters holding down; then
/// last resorts. Returns the verdicts (in their input order) and that order.
pub fn likely_order(
    mut verdicts: Vec<pb::ClusterVerdict>,
) -> (Vec<pb::ClusterVerdict>, Vec<String>) {
    let class = |v: &pb::ClusterVerdict| match v.code.as_str() {
        "candidate" => 0,
        "hold_down" => 1,
        _ => 2,
    };
    let mut ranked: Vec<usize> = (0..verdicts.len())
        .filter(|&i| verdicts[i].candidate)
        .collect();
    ranked.sort_by(|&a, &b| {
        let (a, b) = (&verdicts[a], &verdicts[b]);
        class(a)
            .cmp(&class(b))
            .then(a.level.cmp(&b.level))
            .then(b.share_ppm.cmp(&a.share_ppm))
            .then(a.rank.cmp(&b.rank))
    });
    let order = ranked
        .iter()
        .map(|&i| verdicts[i].cluster.clone())
        .collect();
    for (rank, &i) in ranked.iter().enumerate() {
        verdicts[i].rank = u32::try_from(rank).unwrap_or(u32::MAX);
    }
    (verdicts, order)
}

impl AdminApi {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.ctx.snapshots.borrow().clone()
    }

    /// The decision for the service's first TCP port (what its VIP serves), as the status
    /// page shows it.
    fn service_decision(
        &self,
        snapshot: &Snapshot,
        exports: &LocalExports,
        key: &ServiceKey,
    ) -> Option<Decision> {
        let svc = snapshot.service(key)?;
        let port = svc.ports.first()?;
        let route = Route {
            service: key.clone(),
            port: port.port,
            target: None,
        };
        Some(self.ctx.outbound.explain(snapshot, exports, &route))
    }

    fn service_info(
        &self,
        snapshot: &Snapshot,
        exports: &LocalExports,
        key: &ServiceKey,
    ) -> Option<pb::ServiceInfo> {
        let svc = snapshot.service(key)?;
        let decision = self.service_decision(snapshot, exports, key);
        let main = decision.as_ref().and_then(|d| d.main_target().cloned());
        let mut shares: Vec<pb::Share> = decision
            .iter()
            .flat_map(|d| d.explanations.iter())
            .filter_map(|e| match e.verdict {
                Verdict::Candidate {
                    share_ppm, level, ..
                } if share_ppm > 0 => Some(pb::Share {
                    cluster: e.cluster.to_string(),
                    share_ppm,
                    level: i32::try_from(level).unwrap_or(i32::MAX),
                }),
                _ => None,
            })
            .collect();
        shares.sort_by(|a, b| {
            b.share_ppm
                .cmp(&a.share_ppm)
                .then(a.cluster.cmp(&b.cluster))
        });
        let level = main
            .as_ref()
            .and_then(|m| shares.iter().find(|s| s.cluster == m.as_str()))
            .map_or(-1, |s| s.level);
        let unix = unix_now();
        Some(pb::ServiceInfo {
            service: key.to_string(),
            vip: snapshot
                .vip(&self.ctx.cluster, key, None)
                .map(|v| v.to_string())
                .unwrap_or_default(),
            ports: svc
                .ports
                .iter()
                .map(|p| pb::Port {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    protocol: p.protocol.as_str().into(),
                    app_protocol: p.app_protocol.as_str().into(),
                    // What one cluster's endpoints speak, not the service's: left out.
                    endpoint_protocol: String::new(),
                })
                .collect(),
            clusters: svc
                .clusters
                .iter()
                .map(|(c, e)| pb::ClusterEndpoints {
                    cluster: c.to_string(),
                    healthy: e.endpoints_healthy,
                    total: e.endpoints_total,
                })
                .collect(),
            main_target: main.map(|c| c.to_string()).unwrap_or_default(),
            failover_level: level,
            shares,
            has_policy: snapshot.policy(key).is_some(),
            drills: snapshot
                .drills()
                .filter(|(_, d)| {
                    d.active(unix) && d.covers(key) && svc.clusters.contains_key(&d.cluster)
                })
                .map(|(id, _)| id.to_string())
                .collect(),
            route_rules: snapshot
                .routes(key)
                .map(|r| r.rules.iter().map(|rule| rule.name.clone()).collect())
                .unwrap_or_default(),
        })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let ctx = &self.ctx;
        let snapshot = self.snapshot();
        let watcher = ctx.watcher.borrow().clone();
        let links = ctx.links.borrow().clone();
        let peers: BTreeMap<ClusterName, Option<PeerSignal>> = {
            let st = ctx.outbound.steering().lock();
            snapshot
                .clusters()
                .map(|c| (c.clone(), st.health.peer(c)))
                .collect()
        };
        let mut exported: BTreeMap<&ClusterName, u64> = BTreeMap::new();
        for view in snapshot.services() {
            for cluster in view.clusters.keys() {
                *exported.entry(cluster).or_default() += 1;
            }
        }
        let mut clusters: Vec<pb::ClusterInfo> = snapshot
            .clusters()
            .map(|c| {
                let local = c == &ctx.cluster;
                let first = snapshot.gateways_of(c).next();
                let (link, rtt) = if local {
                    (LinkState::Local, None)
                } else {
                    match peers.get(c).copied().flatten() {
                        Some(PeerSignal::Up { rtt }) => {
                            (LinkState::Up, Some(rtt.as_secs_f64() * 1000.0))
                        }
                        Some(PeerSignal::Down { .. }) => (LinkState::Down, None),
                        None => (LinkState::Unknown, None),
                    }
                };
                let gateways: Vec<pb::GatewayLink> = snapshot
                    .gateways_of(c)
                    .map(|g| {
                        let link = links.iter().find(|l| {
                            l.peer.cluster == g.cluster && g.quic_addrs.contains(&l.peer.addr)
                        });
                        pb::GatewayLink {
                            id: g.gateway_id.to_string(),
                            addrs: g.quic_addrs.iter().map(ToString::to_string).collect(),
                            draining: g.draining,
                            connected: link.is_some(),
                            rtt_ms: link.map(|l| l.rtt.as_secs_f64() * 1000.0),
                            lost_packets: link.map_or(0, |l| l.lost_packets),
                            sent_packets: link.map_or(0, |l| l.sent_packets),
                            loss_ratio: link
                                .filter(|l| l.sent_packets > 0)
                                .map_or(0.0, |l| l.lost_packets as f64 / l.sent_packets as f64),
                            mtu: link.map_or(0, |l| u32::from(l.mtu)),
                            open_streams: link.map_or(0, |l| l.open_streams as u64),
                        }
                    })
                    .collect();
                // A cluster never measured through the decision but with an open connection.
                let rtt = rtt.or_else(|| gateways.iter().filter_map(|g| g.rtt_ms).reduce(f64::min));
                let open_streams = gateways.iter().map(|g| g.open_streams).sum();
                pb::ClusterInfo {
                    name: c.to_string(),
                    local,
                    region: first.map(|g| g.region.clone()).unwrap_or_default(),
                    zone: first.map(|g| g.zone.clone()).unwrap_or_default(),
                    link: link as i32,
                    rtt_ms: rtt,
                    gateways,
                    exports: exported.get(c).copied().unwrap_or(0),
                    open_streams,
                }
            })
            .collect();
        if !clusters.iter().any(|c| c.local) {
            clusters.push(pb::ClusterInfo {
                name: ctx.cluster.to_string(),
                local: true,
                region: ctx.region.clone(),
                zone: ctx.zone.clone(),
                link: LinkState::Local as i32,
                ..Default::default()
            });
            clusters.sort_by(|a, b| a.name.cmp(&b.name));
        }
        let unix = unix_now();
        Ok(Response::new(pb::GetStatusResponse {
            gateway: Some(pb::GatewayInfo {
                cluster: ctx.cluster.to_string(),
                gateway_id: ctx.gateway_id.to_string(),
                region: ctx.region.clone(),
                zone: ctx.zone.clone(),
                ready: ctx.readiness.is_ready(),
                pending: ctx
                    .readiness
                    .pending()
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                draining: *ctx.draining.borrow(),
                version: env!("CARGO_PKG_VERSION").into(),
                connections_in_flight: ctx.outbound.in_flight() as u64,
                dns_zone: ctx.dns_zone.clone(),
            }),
            catalog: Some(pb::CatalogInfo {
                backend: ctx.backend.clone(),
                revision: snapshot.revision,
                synced: watcher.synced,
                connected: watcher.connected,
                stale_seconds: if watcher.connected {
                    0.0
                } else {
                    watcher.staleness().map_or(0.0, |d| d.as_secs_f64())
                },
                services: snapshot.service_count() as u64,
                exports: snapshot.export_count() as u64,
                policies: snapshot.policies().count() as u64,
                drills: snapshot.drills().filter(|(_, d)| d.active(unix)).count() as u64,
            }),
            clusters,
        }))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let req = request.into_inner();
        let snapshot = self.snapshot();
        let exports = self.ctx.exports.borrow().clone();
        let services = if req.service.trim().is_empty() {
            snapshot
                .services()
                .filter_map(|s| self.service_info(&snapshot, &exports, &s.key))
                .collect()
        } else {
            let key = service_arg(&req.service)?;
            vec![
                self.service_info(&snapshot, &exports, &key)
                    .ok_or_else(|| unknown_service(&snapshot, &key))?,
            ]
        };
        Ok(Response::new(pb::ListServicesResponse {
            services,
            revision: snapshot.revision,
        }))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let req = request.into_inner();
        if req.name.trim().is_empty() {
            return Err(invalid(
                "name",
                format!(
                    "missing: a DNS name (pay.prod.svc.{}) or a service (pay.prod)",
                    self.ctx.dns_zone
                ),
            ));
        }
        let name =
            parse_resolve_name(&req.name, &self.ctx.dns_zone).map_err(|e| invalid("name", e))?;
        let snapshot = self.snapshot();
        let svc = snapshot
            .service(&name.service)
            .ok_or_else(|| unknown_service(&snapshot, &name.service))?;
        let port = if req.port == 0 {
            svc.ports.first().map(|p| p.port).ok_or_else(|| {
                Status::failed_precondition(format!("{} has no port", name.service))
            })?
        } else {
            let wanted = u16::try_from(req.port).ok();
            svc.ports
                .iter()
                .find(|p| Some(p.port) == wanted)
                .map(|p| p.port)
                .ok_or_else(|| {
                    invalid(
                        "port",
                        format!(
                            "{} is not a port of {} (ports: {})",
                            req.port,
                            name.service,
                            join(svc.ports.iter().map(|p| format!("{} ({})", p.port, p.name)))
                        ),
                    )
                })?
        };
        if let Some(c) = &name.cluster
            && !svc.clusters.contains_key(c)
        {
            return Err(Status::not_found(format!(
                "cluster {c} does not export {} (exported by: {})",
                name.service,
                join(svc.clusters.keys())
            )));
        }
        let route = Route {
            service: name.service.clone(),
            port,
            target: name.cluster.clone(),
        };
        let exports = self.ctx.exports.borrow().clone();
        let (now, unix) = (Instant::now(), unix_now());
        let decision = self.ctx.outbound.explain(&snapshot, &exports, &route);
        let (verdicts, order) = likely_order(verdicts(&decision, now, unix));
        Ok(Response::new(pb::ResolveResponse {
            service: name.service.to_string(),
            port: u32::from(port),
            vip: snapshot
                .vip(&self.ctx.cluster, &name.service, name.cluster.as_ref())
                .map(|v| v.to_string())
                .unwrap_or_default(),
            pinned_cluster: name.cluster.map(|c| c.to_string()).unwrap_or_default(),
            order,
            max_attempts: decision.max_attempts,
            verdicts,
            policy_source: if snapshot.policy(&name.service).is_some() {
                "catalog".into()
            } else {
                "default".into()
            },
            revision: snapshot.revision,
            decided_at: unix,
        }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let key = service_arg(&request.into_inner().service)?;
        let stored = store::get(self.ctx.store.as_ref(), self.ctx.layout.policy(&key))
            .await
            .map_err(|e| store_status(&e))?;
        let response = match stored {
            Some(kv) => pb::GetPolicyResponse {
                service: key.to_string(),
                found: true,
                policy_json: String::from_utf8_lossy(&kv.value).into_owned(),
                revision: kv.mod_revision,
            },
            None => {
                let snapshot = self.snapshot();
                if snapshot.service(&key).is_none() {
                    return Err(Status::not_found(format!(
                        "no policy for {key}, and no cluster exports it: check the name (`meshup services` lists the services)"
                    )));
                }
                pb::GetPolicyResponse {
                    service: key.to_string(),
                    found: false,
                    policy_json: record_json(&PolicyRecord::default()),
                    revision: 0,
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn validate_policy(
        &self,
        request: Request<pb::ValidatePolicyRequest>,
    ) -> Result<Response<pb::ValidatePolicyResponse>, Status> {
        let req = request.into_inner();
        let key = service_arg(&req.service)?;
        let record = policy_arg(&req.policy_json)?;
        Ok(Response::new(pb::ValidatePolicyResponse {
            normalized_json: record_json(&record),
            warnings: policy_warnings(&self.snapshot(), &key, &record),
        }))
    }

    async fn set_policy(
        &self,
        request: Request<pb::SetPolicyRequest>,
    ) -> Result<Response<pb::SetPolicyResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let key = service_arg(&req.service)?;
        let mut record = policy_arg(&req.policy_json)?;
        if req.revision < 0 {
            return Err(invalid(
                "revision",
                "must be the revision read with GetPolicy, or 0 to create the policy",
            ));
        }
        // The author is the caller, whatever the JSON says.
        record.updated_by = Some(caller.name().to_owned());
        record.updated_at = Some(unix_now());
        let json = record_json(&record);
        let revision = cas::put_if(
            self.ctx.store.as_ref(),
            Record::Policy,
            &key,
            self.ctx.layout.policy(&key),
            json.clone(),
            req.revision,
        )
        .await?;
        caller::audit(
            &caller,
            caller.name(),
            "policy.set",
            &key.to_string(),
            revision,
        );
        Ok(Response::new(pb::SetPolicyResponse {
            revision,
            normalized_json: json,
            warnings: policy_warnings(&self.snapshot(), &key, &record),
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let key = service_arg(&req.service)?;
        if req.revision < 0 {
            return Err(invalid(
                "revision",
                "must be the revision read, or 0 for whatever is stored",
            ));
        }
        let revision = cas::delete_if(
            self.ctx.store.as_ref(),
            Record::Policy,
            &key,
            self.ctx.layout.policy(&key),
            req.revision,
        )
        .await?;
        caller::audit(
            &caller,
            caller.name(),
            "policy.delete",
            &key.to_string(),
            revision,
        );
        Ok(Response::new(pb::DeletePolicyResponse { revision }))
    }

    async fn get_routes(
        &self,
        request: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        routes::get(&self.ctx, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn validate_routes(
        &self,
        request: Request<pb::ValidateRoutesRequest>,
    ) -> Result<Response<pb::ValidateRoutesResponse>, Status> {
        routes::validate(&self.ctx, request.into_inner()).map(Response::new)
    }

    async fn apply_routes(
        &self,
        request: Request<pb::ApplyRoutesRequest>,
    ) -> Result<Response<pb::ApplyRoutesResponse>, Status> {
        let caller = caller_of(&request)?;
        routes::apply(&self.ctx, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn set_routes(
        &self,
        request: Request<pb::SetRoutesRequest>,
    ) -> Result<Response<pb::SetRoutesResponse>, Status> {
        let caller = caller_of(&request)?;
        routes::set(&self.ctx, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_routes(
        &self,
        request: Request<pb::DeleteRoutesRequest>,
    ) -> Result<Response<pb::DeleteRoutesResponse>, Status> {
        let caller = caller_of(&request)?;
        routes::delete(&self.ctx, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn start_drill(
        &self,
        request: Request<pb::StartDrillRequest>,
    ) -> Result<Response<pb::StartDrillResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let kind = drill_kind_from_pb(req.kind)
            .ok_or_else(|| invalid("kind", "missing or unknown: choose drain, fail or pin"))?;
        if req.cluster.trim().is_empty() {
            return Err(invalid("cluster", "missing: the cluster the drill acts on"));
        }
        let cluster = ClusterName::new(req.cluster.trim()).map_err(|e| invalid("cluster", e))?;
        let service = if req.service.trim().is_empty() {
            None
        } else {
            Some(service_arg(&req.service)?)
        };
        let who = author_arg(&caller, &req.who, "starts the drill")?;
        if req.why.trim().is_empty() {
            return Err(invalid(
                "why",
                "missing: say why (--why TEXT); it goes into the audit trail",
            ));
        }
        if req.duration_seconds == 0 {
            return Err(invalid(
                "duration_seconds",
                format!(
                    "a drill needs an expiry: say how long it lasts (--for 30m), at most {} days, so a forgotten drill ends by itself",
                    MAX_DRILL_DURATION.as_secs() / 86_400
                ),
            ));
        }
        if req.duration_seconds > MAX_DRILL_DURATION.as_secs() {
            return Err(invalid(
                "duration_seconds",
                format!(
                    "{}s is longer than the {} days a drill may last; start a new one when it ends",
                    req.duration_seconds,
                    MAX_DRILL_DURATION.as_secs() / 86_400
                ),
            ));
        }
        if kind == policy::DrillKind::Pin && service.is_none() {
            return Err(invalid(
                "service",
                "a pin drill needs the service whose traffic it pins",
            ));
        }
        let snapshot = self.snapshot();
        if !snapshot.clusters().any(|c| c == &cluster) {
            return Err(Status::not_found(format!(
                "cluster {cluster} is not in the catalog (clusters: {})",
                join(snapshot.clusters())
            )));
        }
        if let Some(s) = &service {
            let Some(view) = snapshot.service(s) else {
                return Err(unknown_service(&snapshot, s));
            };
            // A pin sends every new connection to the cluster: one that does not export the
            // service has nothing to pin to, and the decision would ignore the drill.
            if kind == policy::DrillKind::Pin && !view.clusters.contains_key(&cluster) {
                return Err(Status::failed_precondition(format!(
                    "cluster {cluster} does not export {s} (exported by: {}): a pin there has nothing to send traffic to",
                    join(view.clusters.keys())
                )));
            }
        }
        let created = unix_now();
        let record = DrillRecord {
            schema: policy::SCHEMA_VERSION,
            schema_minor: 0,
            kind,
            cluster: cluster.clone(),
            service,
            who,
            why: req.why.trim().to_owned(),
            created,
            expires: created + i64::try_from(req.duration_seconds).unwrap_or(i64::MAX / 2),
        };
        let given = !req.id.trim().is_empty();
        let ids: Vec<DrillId> = if given {
            vec![DrillId::new(req.id.trim()).map_err(|e| invalid("id", e))?]
        } else {
            (0..3)
                .filter_map(|n| generated_id(kind, &cluster, created, n))
                .collect()
        };
        let mut last = None;
        for id in ids {
            match drills::start_drill(self.ctx.store.as_ref(), &self.ctx.layout, &id, &record).await
            {
                Ok(revision) => {
                    tracing::info!(drill = %id, kind = kind.as_str(), %cluster, who = %record.who, why = %record.why, expires = record.expires, "drill started through the admin API");
                    caller::audit(&caller, &record.who, "drill.start", id.as_str(), revision);
                    return Ok(Response::new(pb::StartDrillResponse {
                        drill: Some(drill_to_pb(&id, &record, revision, unix_now())),
                    }));
                }
                Err(e @ (DrillError::Exists { .. } | DrillError::IdUsed { .. })) if !given => {
                    last = Some(e);
                }
                Err(e) => return Err(drill_status(e)),
            }
        }
        Err(last.map_or_else(
            || Status::internal("no drill id could be made"),
            drill_status,
        ))
    }

    async fn stop_drill(
        &self,
        request: Request<pb::StopDrillRequest>,
    ) -> Result<Response<pb::StopDrillResponse>, Status> {
        let caller = caller_of(&request)?;
        let req = request.into_inner();
        let id = DrillId::new(req.id.trim()).map_err(|e| invalid("id", e))?;
        let who = author_arg(&caller, &req.who, "stops the drill")?;
        let ended = drills::end_drill(
            self.ctx.store.as_ref(),
            &self.ctx.layout,
            &id,
            DrillEnd::Stopped,
            &who,
            unix_now(),
        )
        .await
        .map_err(drill_status)?;
        match ended {
            Ended::Now { audit, revision } => {
                tracing::info!(drill = %id, who = %who, revision, "drill stopped through the admin API");
                caller::audit(&caller, &who, "drill.stop", id.as_str(), revision);
                Ok(Response::new(pb::StopDrillResponse {
                    audit: Some(audit_to_pb(&id, &audit, unix_now())),
                }))
            }
            // Not returned for a stop; answered as "already ended" all the same.
            Ended::AlreadyEnded | Ended::NotDue { .. } => {
                Err(Status::not_found(format!("drill {id} has already ended")))
            }
        }
    }

    async fn list_drills(
        &self,
        request: Request<pb::ListDrillsRequest>,
    ) -> Result<Response<pb::ListDrillsResponse>, Status> {
        let req = request.into_inner();
        let ctx = &self.ctx;
        let prefix = ctx.layout.drills();
        let (kvs, revision) = store::list_prefix(ctx.store.as_ref(), prefix.as_bytes())
            .await
            .map_err(|e| store_status(&e))?;
        let unix = unix_now();
        let mut drills = Vec::new();
        for kv in kvs {
            let key = String::from_utf8_lossy(&kv.key).into_owned();
            let id = key
                .strip_prefix(prefix.as_str())
                .and_then(|s| DrillId::new(s).ok());
            let record =
                policy::decode::<DrillRecord>(&kv.value).and_then(|d| d.validate().map(|()| d));
            match (id, record) {
                (Some(id), Ok(d)) => drills.push(drill_to_pb(&id, &d, kv.create_revision, unix)),
                (_, r) => {
                    tracing::warn!(key, error = ?r.err(), "skipping an unreadable drill in ListDrills");
                }
            }
        }
        let audit = if req.include_audit {
            drills::list_audit(ctx.store.as_ref(), &ctx.layout)
                .await
                .map_err(|e| store_status(&e))?
                .iter()
                .map(|a| audit_to_pb(&a.id, &a.audit, unix))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::ListDrillsResponse {
            drills,
            audit,
            revision,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let req = request.into_inner();
        let permit = self.watchers.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_WATCHERS} event watchers are open already; close one and retry"
            ))
        })?;
        let (tx, rx) = mpsc::channel::<Result<pb::Event, Status>>(256);
        let api = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            watch_loop(api, req.include_existing, tx).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_exports(
        &self,
        _request: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        let set = self.ctx.export_set.current();
        let snapshot = self.snapshot();
        let exports = set
            .with_sources()
            .into_iter()
            .map(|(source, e)| {
                let key = e.key();
                let record = snapshot
                    .service(&key)
                    .and_then(|s| s.clusters.get(&self.ctx.cluster).cloned());
                pb::LocalExportInfo {
                    service: key.to_string(),
                    source: source.as_str().into(),
                    export: Some(export_to_pb(&Export::from(e))),
                    published: record.is_some(),
                    healthy: record.as_ref().map_or(0, |r| r.endpoints_healthy),
                    total: record.as_ref().map_or(0, |r| r.endpoints_total),
                }
            })
            .collect();
        let loaded = self.ctx.loaded.borrow().clone();
        Ok(Response::new(pb::ListExportsResponse {
            exports,
            config: Some(pb::ConfigFileInfo {
                path: loaded.path,
                sha256: loaded.sha256,
                loaded_at: loaded.loaded_at,
                reloads_applied: loaded.applied,
                reloads_refused: loaded.refused,
                last_error: loaded.last_error.unwrap_or_default(),
            }),
        }))
    }

    async fn register_export(
        &self,
        request: Request<pb::RegisterExportRequest>,
    ) -> Result<Response<pb::RegisterExportResponse>, Status> {
        let caller = caller_of(&request)?;
        let spec = request.into_inner().export.ok_or_else(|| {
            invalid(
                "export",
                "missing: the export to register (name, namespace, ports, endpoints)",
            )
        })?;
        let export = export_from_pb(&spec).map_err(|e| invalid(&e.field, &e.message))?;
        let key = export.key();
        let outcome = self
            .ctx
            .export_set
            .register(ExportConfig::from(export))
            .map_err(|e| export_status(&e))?;
        let outcome = match outcome {
            Registered::Created => "created",
            Registered::Updated => "updated",
            Registered::Unchanged => "unchanged",
        };
        // Revision 0: the export task publishes the record afterwards.
        caller::audit(
            &caller,
            caller.name(),
            "export.register",
            &format!("{key} ({outcome})"),
            0,
        );
        Ok(Response::new(pb::RegisterExportResponse {
            service: key.to_string(),
            outcome: outcome.into(),
        }))
    }

    async fn withdraw_export(
        &self,
        request: Request<pb::WithdrawExportRequest>,
    ) -> Result<Response<pb::WithdrawExportResponse>, Status> {
        let caller = caller_of(&request)?;
        let key = service_arg(&request.into_inner().service)?;
        self.ctx
            .export_set
            .withdraw(&key)
            .map_err(|e| export_status(&e))?;
        caller::audit(
            &caller,
            caller.name(),
            "export.withdraw",
            &key.to_string(),
            0,
        );
        Ok(Response::new(pb::WithdrawExportResponse {
            service: key.to_string(),
        }))
    }
}

/// A refused export change as a status: the rules' message with its code.
fn export_status(e: &ExportError) -> Status {
    match e {
        ExportError::Invalid(_) => Status::invalid_argument(e.to_string()),
        ExportError::NotRegistered { .. } => Status::not_found(e.to_string()),
        ExportError::FromFile { .. }
        | ExportError::FromApi { .. }
        | ExportError::TooMany { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn generated_id(
    kind: policy::DrillKind,
    cluster: &ClusterName,
    at: i64,
    n: usize,
) -> Option<DrillId> {
    let suffix = if n == 0 {
        format!("{at}")
    } else {
        format!("{at}-{n}")
    };
    let room = 63usize.saturating_sub(kind.as_str().len() + suffix.len() + 2);
    let c: String = cluster.as_str().chars().take(room).collect();
    let c = c.trim_end_matches('-');
    DrillId::new(&format!("{}-{c}-{suffix}", kind.as_str())).ok()
}

fn drill_status(e: DrillError) -> Status {
    match &e {
        DrillError::Store(s) => store_status(s),
        DrillError::Invalid { reason, .. } => match record_error_field(reason) {
            Some(f) => invalid(&f, &e),
            None => Status::invalid_argument(e.to_string()),
        },
        DrillError::Exists { .. } | DrillError::IdUsed { .. } => {
            Status::already_exists(e.to_string())
        }
        DrillError::NoSuchDrill { .. } => Status::not_found(format!(
            "{e}; `meshup drill list` shows the drills in force"
        )),
        DrillError::Unreadable { .. } => Status::failed_precondition(e.to_string()),
        DrillError::Contended { .. } => Status::aborted(e.to_string()),
    }
}

fn stamp(mut e: pb::Event, revision: i64) -> pb::Event {
    e.revision = revision;
    e.at_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    e
}

/// Sends events until the client leaves: a sync event, optionally the catalog as it is, then
/// every change. Snapshots coalesce in the watch channel, so a slow client gets fewer,
/// larger diffs, never an unbounded queue.
async fn watch_loop(
    api: AdminApi,
    include_existing: bool,
    tx: mpsc::Sender<Result<pb::Event, Status>>,
) {
    let mut snapshots = api.ctx.snapshots.clone();
    let mut current = snapshots.borrow_and_update().clone();
    let sync = pb::Event {
        kind: EventKind::Sync as i32,
        text: format!(
            "watching the catalog from revision {} ({} services)",
            current.revision,
            current.service_count()
        ),
        ..Default::default()
    };
    if tx.send(Ok(stamp(sync, current.revision))).await.is_err() {
        return;
    }
    if include_existing {
        for mut e in events::diff(&Snapshot::new(), &current) {
            e.existing = true;
            if tx.send(Ok(stamp(e, current.revision))).await.is_err() {
                return;
            }
        }
    }
    // Failovers and ejections come from the gateway's one detector (`outbound::changes`).
    let mut steering = Some(api.ctx.outbound.watch_changes());
    loop {
        let mut out = Vec::new();
        tokio::select! {
            _ = tx.closed() => return,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let next = snapshots.borrow_and_update().clone();
                out.extend(events::diff(&current, &next));
                current = next;
            }
            change = next_change(&mut steering) => match change {
                Ok(change) => out.push(events::steering_event(&change)),
                Err(broadcast::error::RecvError::Lagged(n)) => out.push(pb::Event {
                    kind: EventKind::Lagged as i32,
                    text: format!("{n} failover and ejection events were dropped: this watcher fell behind"),
                    ..Default::default()
                }),
                Err(broadcast::error::RecvError::Closed) => steering = None,
            }
        }
        for e in out {
            if tx.send(Ok(stamp(e, current.revision))).await.is_err() {
                return;
            }
        }
    }
}

/// The next steering change, or never once the detector is gone.
async fn next_change(
    rx: &mut Option<broadcast::Receiver<outbound::changes::SteeringChange>>,
) -> Result<outbound::changes::SteeringChange, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

//! The route rules methods of `meshup.admin.v1.AdminService` (GetRoutes, ValidateRoutes,
//! ApplyRoutes, SetRoutes, DeleteRoutes): a service's `RouteRecord` at
//! `<prefix>/v1/routes/<ns>/<name>`, checked as the gateways will compile it, written with
//! the writer's name (`updated_by`, `updated_at`), like policies. What is legal but probably
//! not meant comes back as warnings ([`warnings`], pure and table-tested).

use std::collections::BTreeMap;

use meshup_admin_api::pb;
use meshup_admin_api::route_file::{self, record_json, same_rules};
use meshup_core::catalog::Snapshot;
use meshup_core::model::AppProtocol;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_core::routes::{self, RouteRecord};
use meshup_federation::store;
use tonic::Status;

use super::caller::{self, Caller};
use super::cas::{self, Record, store_status};
use super::service::{Context, invalid, join, service_arg};
use crate::outbound::steer::unix_now;

/// Route rules as JSON, decoded and compiled; INVALID_ARGUMENT naming the field otherwise.
fn routes_arg(json: &str) -> Result<RouteRecord, Status> {
    if json.trim().is_empty() {
        return Err(invalid(
            "routes_json",
            "missing: the RouteRecord as JSON (docs/http-routing.md)",
        ));
    }
    let bad = |e: routes::RouteError| match &e {
        routes::RouteError::Invalid { at, what } => invalid(&format!("routes_json.{at}"), what),
        _ => match route_file::error_field(&e) {
            Some(field) => invalid(&format!("routes_json.{field}"), e),
            None => invalid("routes_json", e),
        },
    };
    let record = routes::decode(json.as_bytes()).map_err(bad)?;
    record.compile().map_err(bad)?;
    Ok(record)
}

/// What is legal in route rules but probably not meant: nobody exports the service, none of
/// its ports is routed per request, a destination cluster the catalog does not know or that
/// does not export the service (a rule leaves such a cluster out).
pub fn warnings(snapshot: &Snapshot, key: &ServiceKey, record: &RouteRecord) -> Vec<String> {
    let mut out = Vec::new();
    let view = snapshot.service(key);
    match view {
        None => out.push(format!(
            "no cluster exports {key} yet: the rules apply once one does"
        )),
        Some(v)
            if !v
                .ports
                .iter()
                .any(|p| matches!(p.app_protocol, AppProtocol::Http | AppProtocol::Grpc)) =>
        {
            out.push(format!(
                "{key} has no http or grpc port ({}): rules route the requests of ports whose app_protocol is http or grpc, and its connections follow the policy",
                join(
                    v.ports
                        .iter()
                        .map(|p| format!("{}/{}", p.port, p.app_protocol.as_str()))
                )
            ));
        }
        Some(_) => {}
    }
    // Each cluster a rule names, with the rules that name it, in the order they appear.
    let mut named: BTreeMap<&ClusterName, Vec<String>> = BTreeMap::new();
    let mut order = Vec::new();
    for (i, rule) in record.rules.iter().enumerate() {
        let name = if rule.name.is_empty() {
            format!("rule-{i}")
        } else {
            rule.name.clone()
        };
        for cluster in rule.destinations.iter().filter_map(|d| d.cluster.as_ref()) {
            let rules = named.entry(cluster).or_insert_with(|| {
                order.push(cluster);
                Vec::new()
            });
            if !rules.contains(&name) {
                rules.push(name.clone());
            }
        }
    }
    let known: Vec<&ClusterName> = snapshot.clusters().collect();
    for cluster in order {
        let rules = named.get(cluster).map(|r| r.join(", ")).unwrap_or_default();
        if !known.contains(&cluster) {
            out.push(format!(
                "cluster {cluster} (rules {rules}) is not in the catalog (known: {}): a typo gets no requests",
                join(known.iter())
            ));
        } else if !view.is_some_and(|v| v.clusters.contains_key(cluster)) {
            out.push(format!(
                "cluster {cluster} (rules {rules}) does not export {key} (yet): the rules leave it out until it does"
            ));
        }
    }
    out
}

fn snapshot(ctx: &Context) -> std::sync::Arc<Snapshot> {
    ctx.snapshots.borrow().clone()
}

pub(super) async fn get(
    ctx: &Context,
    req: pb::GetRoutesRequest,
) -> Result<pb::GetRoutesResponse, Status> {
    let key = service_arg(&req.service)?;
    let stored = store::get(ctx.store.as_ref(), ctx.layout.routes(&key))
        .await
        .map_err(|e| store_status(&e))?;
    Ok(match stored {
        Some(kv) => pb::GetRoutesResponse {
            service: key.to_string(),
            found: true,
            routes_json: String::from_utf8_lossy(&kv.value).into_owned(),
            revision: kv.mod_revision,
        },
        None => {
            if snapshot(ctx).service(&key).is_none() {
                return Err(Status::not_found(format!(
                    "no route rules for {key}, and no cluster exports it: check the name (`meshup services` lists the services)"
                )));
            }
            pb::GetRoutesResponse {
                service: key.to_string(),
                found: false,
                routes_json: record_json(&route_file::no_rules()),
                revision: 0,
            }
        }
    })
}

pub(super) fn validate(
    ctx: &Context,
    req: pb::ValidateRoutesRequest,
) -> Result<pb::ValidateRoutesResponse, Status> {
    let key = service_arg(&req.service)?;
    let record = routes_arg(&req.routes_json)?;
    Ok(pb::ValidateRoutesResponse {
        normalized_json: record_json(&record),
        warnings: warnings(&snapshot(ctx), &key, &record),
    })
}

/// The record a write stores: the caller's rules, with the caller as their writer
/// (whatever the JSON says).
fn authored(caller: &Caller, json: &str) -> Result<RouteRecord, Status> {
    let mut record = routes_arg(json)?;
    record.updated_by = Some(caller.name().to_owned());
    record.updated_at = Some(unix_now());
    Ok(record)
}

pub(super) async fn apply(
    ctx: &Context,
    caller: &Caller,
    req: pb::ApplyRoutesRequest,
) -> Result<pb::ApplyRoutesResponse, Status> {
    let key = service_arg(&req.service)?;
    let record = authored(caller, &req.routes_json)?;
    if req.revision < 0 {
        return Err(invalid(
            "revision",
            "must be the revision read with GetRoutes, or 0 to create the rules",
        ));
    }
    let json = record_json(&record);
    let revision = cas::put_if(
        ctx.store.as_ref(),
        Record::Routes,
        &key,
        ctx.layout.routes(&key),
        json.clone(),
        req.revision,
    )
    .await?;
    caller::audit(
        caller,
        caller.name(),
        "routes.apply",
        &key.to_string(),
        revision,
    );
    Ok(pb::ApplyRoutesResponse {
        revision,
        normalized_json: json,
        warnings: warnings(&snapshot(ctx), &key, &record),
    })
}

pub(super) async fn set(
    ctx: &Context,
    caller: &Caller,
    req: pb::SetRoutesRequest,
) -> Result<pb::SetRoutesResponse, Status> {
    let key = service_arg(&req.service)?;
    let record = authored(caller, &req.routes_json)?;
    let warnings = warnings(&snapshot(ctx), &key, &record);
    // The same rules again: nothing is written (their writer stays who wrote them).
    let stored = store::get(ctx.store.as_ref(), ctx.layout.routes(&key))
        .await
        .map_err(|e| store_status(&e))?;
    if let Some(kv) = stored
        && routes::decode(&kv.value).is_ok_and(|r| same_rules(&r, &record))
    {
        return Ok(pb::SetRoutesResponse {
            revision: kv.mod_revision,
            previous_revision: kv.mod_revision,
            changed: false,
            normalized_json: String::from_utf8_lossy(&kv.value).into_owned(),
            warnings,
        });
    }
    let json = record_json(&record);
    let (revision, previous_revision) =
        cas::put(ctx.store.as_ref(), ctx.layout.routes(&key), json.clone()).await?;
    caller::audit(
        caller,
        caller.name(),
        "routes.set",
        &key.to_string(),
        revision,
    );
    Ok(pb::SetRoutesResponse {
        revision,
        previous_revision,
        changed: true,
        normalized_json: json,
        warnings,
    })
}

pub(super) async fn delete(
    ctx: &Context,
    caller: &Caller,
    req: pb::DeleteRoutesRequest,
) -> Result<pb::DeleteRoutesResponse, Status> {
    let key = service_arg(&req.service)?;
    if req.revision < 0 {
        return Err(invalid(
            "revision",
            "must be the revision read, or 0 for whatever is stored",
        ));
    }
    let revision = cas::delete_if(
        ctx.store.as_ref(),
        Record::Routes,
        &key,
        ctx.layout.routes(&key),
        req.revision,
    )
    .await?;
    caller::audit(
        caller,
        caller.name(),
        "routes.delete",
        &key.to_string(),
        revision,
    );
    Ok(pb::DeleteRoutesResponse { revision })
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshup_core::fixture::{self, export, gateway, put_export, put_gateway};
    use meshup_core::model::ExportRecord;

    fn rules(json: serde_json::Value) -> RouteRecord {
        let record = routes::decode(json.to_string().as_bytes()).expect("decodes");
        record.compile().expect("compiles");
        record
    }

    /// Each catalog and rule set, and the warnings it gets.
    #[test]
    fn warnings_name_what_gets_no_requests() {
        let http = |port| {
            let mut e = export(port, 1);
            e.ports[0].app_protocol = AppProtocol::Http;
            e
        };
        let catalog = |echo: Vec<(&str, ExportRecord)>| {
            let mut changes = vec![
                put_gateway(gateway("west", "w1")),
                put_gateway(gateway("north", "n1")),
                put_gateway(gateway("east", "e1")),
            ];
            for (c, e) in echo {
                changes.push(put_export(c, &format!("{}1", &c[..1]), "echo.prod", e));
            }
            fixture::snapshot(changes)
        };
        let echo = fixture::service("echo.prod");
        let to = |clusters: &[&str]| {
            rules(serde_json::json!({"schema": 1, "rules": [
                {"name": "a", "destinations": clusters.iter().map(|c| serde_json::json!({"cluster": c})).collect::<Vec<_>>()},
                {"destinations": clusters.iter().map(|c| serde_json::json!({"cluster": c})).collect::<Vec<_>>()},
                {"name": "policy", "destinations": [{"weight": 1}]},
            ]}))
        };
        let both = || vec![("west", http(7000)), ("north", http(7000))];
        let cases: Vec<(&str, Snapshot, RouteRecord, Vec<&str>)> = vec![
            ("all well", catalog(both()), to(&["west", "north"]), vec![]),
            (
                "a cluster that does not export it",
                catalog(vec![("west", http(7000))]),
                to(&["west", "north"]),
                vec!["cluster north (rules a, rule-1) does not export echo.prod (yet)"],
            ),
            (
                "a typo",
                catalog(both()),
                to(&["west", "nort"]),
                vec![
                    "cluster nort (rules a, rule-1) is not in the catalog (known: east, north, west)",
                ],
            ),
            (
                "tcp ports only",
                catalog(vec![("west", export(7000, 1))]),
                to(&["west"]),
                vec!["echo.prod has no http or grpc port (7000/tcp)"],
            ),
            (
                "nobody exports it",
                catalog(vec![]),
                to(&["west"]),
                vec![
                    "no cluster exports echo.prod yet",
                    "cluster west (rules a, rule-1) does not export echo.prod",
                ],
            ),
            ("no rules", catalog(both()), route_file::no_rules(), vec![]),
        ];
        for (what, snapshot, record, want) in cases {
            let got = warnings(&snapshot, &echo, &record);
            assert_eq!(got.len(), want.len(), "{what}: {got:?}");
            for (g, w) in got.iter().zip(&want) {
                assert!(g.starts_with(w), "{what}: {g:?} does not start with {w:?}");
            }
        }
    }
}

//! What `WatchEvents` sends: the difference between two catalog snapshots as events, and
//! changes of where services' traffic mainly goes. Pure, table-tested; the stream task in
//! `service.rs` only moves snapshots in and events out.

use std::collections::BTreeMap;
use std::time::Duration;

use meshup_admin_api::convert::drill_kind_to_pb;
use meshup_admin_api::convert::drill_kind_word;
use meshup_admin_api::pb::{Event, EventKind};
use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, ServiceKey};

use crate::outbound::changes::SteeringChange;

/// An event without its time.
fn event(kind: EventKind, text: String) -> Event {
    Event {
        kind: kind as i32,
        text,
        ..Event::default()
    }
}

/// Every change from `old` to `new`, in a stable order: gateways, services and their
/// exports, policies, route rules, drills.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
    let mut out = Vec::new();
    // Gateways.
    let gateways = |s: &Snapshot| {
        s.gateways()
            .map(|g| ((g.cluster.clone(), g.gateway_id.clone()), g.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let (before, after) = (gateways(old), gateways(new));
    for ((cluster, id), g) in &after {
        let mut e = match before.get(&(cluster.clone(), id.clone())) {
            None => event(
                EventKind::GatewayJoined,
                format!("gateway {id} of cluster {cluster} joined"),
            ),
            Some(was) if !was.draining && g.draining => event(
                EventKind::GatewayDraining,
                format!("gateway {id} of cluster {cluster} is draining"),
            ),
            _ => continue,
        };
        e.cluster = cluster.to_string();
        e.gateway = id.to_string();
        out.push(e);
    }
    for (cluster, id) in before.keys().filter(|k| !after.contains_key(k)) {
        let mut e = event(
            EventKind::GatewayLeft,
            format!("gateway {id} of cluster {cluster} left"),
        );
        e.cluster = cluster.to_string();
        e.gateway = id.to_string();
        out.push(e);
    }
    // Services and their exports.
    let (before, after) = (old.service_map(), new.service_map());
    for (key, svc) in after {
        match before.get(key) {
            None => {
                let clusters: Vec<String> = svc.clusters.keys().map(ToString::to_string).collect();
                let mut e = event(
                    EventKind::ServiceAdded,
                    format!("service {key} added, exported by {}", clusters.join(", ")),
                );
                e.service = key.to_string();
                out.push(e);
            }
            Some(was) if !std::sync::Arc::ptr_eq(was, svc) => {
                for (cluster, export) in &svc.clusters {
                    let text = match was.clusters.get(cluster) {
                        None => format!(
                            "{cluster} now exports {key} ({}/{} endpoints healthy)",
                            export.endpoints_healthy, export.endpoints_total
                        ),
                        Some(prev)
                            if (prev.endpoints_healthy, prev.endpoints_total)
                                != (export.endpoints_healthy, export.endpoints_total) =>
                        {
                            format!(
                                "{key} in {cluster}: {}/{} endpoints healthy (was {}/{})",
                                export.endpoints_healthy,
                                export.endpoints_total,
                                prev.endpoints_healthy,
                                prev.endpoints_total
                            )
                        }
                        Some(_) => continue,
                    };
                    out.push(export_event(key, cluster, text));
                }
                for cluster in was
                    .clusters
                    .keys()
                    .filter(|c| !svc.clusters.contains_key(*c))
                {
                    out.push(export_event(
                        key,
                        cluster,
                        format!("{cluster} no longer exports {key}"),
                    ));
                }
            }
            Some(_) => {}
        }
    }
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        let mut e = event(
            EventKind::ServiceRemoved,
            format!("service {key} removed: no cluster exports it"),
        );
        e.service = key.to_string();
        out.push(e);
    }
    // Policies.
    let (before, after) = (
        old.policies().collect::<BTreeMap<_, _>>(),
        new.policies().collect::<BTreeMap<_, _>>(),
    );
    for (key, policy) in &after {
        let verb = match before.get(key) {
            None => "set",
            Some(was) if was != policy => "changed",
            Some(_) => continue,
        };
        let mut e = event(
            EventKind::PolicySet,
            format!("policy for {key} {verb}{}", by(&policy.updated_by)),
        );
        e.service = key.to_string();
        e.who = policy.updated_by.clone().unwrap_or_default();
        out.push(e);
    }
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        let mut e = event(
            EventKind::PolicyDeleted,
            format!("policy for {key} deleted: the default applies"),
        );
        e.service = key.to_string();
        out.push(e);
    }
    // Route rules.
    let (before, after) = (
        old.all_routes().collect::<BTreeMap<_, _>>(),
        new.all_routes().collect::<BTreeMap<_, _>>(),
    );
    for (key, routes) in &after {
        let verb = match before.get(key) {
            None => "set",
            Some(was) if was != routes => "changed",
            Some(_) => continue,
        };
        let names: Vec<&str> = routes.rules.iter().map(|r| r.name.as_str()).collect();
        let rules = match names.len() {
            0 => "no rules, every request follows the failover policy".to_owned(),
            1 => format!("1 rule ({})", names[0]),
            n => format!("{n} rules ({})", names.join(", ")),
        };
        let mut e = event(
            EventKind::RoutesSet,
            format!(
                "route rules for {key} {verb}{}: {rules}",
                by(&routes.record.updated_by)
            ),
        );
        e.service = key.to_string();
        e.who = routes.record.updated_by.clone().unwrap_or_default();
        out.push(e);
    }
    for key in before.keys().filter(|k| !after.contains_key(*k)) {
        let mut e = event(
            EventKind::RoutesDeleted,
            format!("route rules for {key} deleted: every request follows the failover policy"),
        );
        e.service = key.to_string();
        out.push(e);
    }
    // Drills.
    let (before, after) = (
        old.drills().collect::<BTreeMap<_, _>>(),
        new.drills().collect::<BTreeMap<_, _>>(),
    );
    for (id, d) in &after {
        if before.contains_key(id) {
            continue;
        }
        let scope = d
            .service
            .as_ref()
            .map_or("every service".to_owned(), ToString::to_string);
        let mut e = event(
            EventKind::DrillStarted,
            format!(
                "drill {id} started by {}: {} {} ({scope}) until {}, because {}",
                d.who,
                drill_kind_word(drill_kind_to_pb(d.kind) as i32),
                d.cluster,
                unix_text(d.expires),
                d.why
            ),
        );
        e.drill = id.to_string();
        e.cluster = d.cluster.to_string();
        e.service = d
            .service
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        out.push(e);
    }
    for (id, d) in before.iter().filter(|(k, _)| !after.contains_key(*k)) {
        let mut e = event(
            EventKind::DrillEnded,
            format!(
                "drill {id} ended ({} {})",
                drill_kind_word(drill_kind_to_pb(d.kind) as i32),
                d.cluster
            ),
        );
        e.drill = id.to_string();
        e.cluster = d.cluster.to_string();
        out.push(e);
    }
    out
}

/// " by WHO" when a record names its writer.
fn by(who: &Option<String>) -> String {
    who.as_ref().map_or(String::new(), |w| format!(" by {w}"))
}

fn export_event(key: &ServiceKey, cluster: &ClusterName, text: String) -> Event {
    let mut e = event(EventKind::ExportChanged, text);
    e.service = key.to_string();
    e.cluster = cluster.to_string();
    e
}

/// A failover or an ejection (from `outbound::changes`) as an event.
pub fn steering_event(change: &SteeringChange) -> Event {
    let name =
        |c: &Option<ClusterName>| c.as_ref().map_or("nowhere".to_owned(), ToString::to_string);
    let level = |l: &Option<usize>| l.map_or("none".to_owned(), |l| l.to_string());
    match change {
        SteeringChange::Failover {
            service,
            from,
            from_level,
            to,
            to_level,
        } => {
            let mut text = format!(
                "{service}: new connections now go mainly to {} (was {})",
                name(to),
                name(from)
            );
            if from_level != to_level {
                text.push_str(&format!(
                    ", failover level {} (was {})",
                    level(to_level),
                    level(from_level)
                ));
            }
            let mut e = event(EventKind::TargetChanged, text);
            e.service = service.to_string();
            e.cluster = to.as_ref().map(ToString::to_string).unwrap_or_default();
            e
        }
        SteeringChange::Ejected {
            service,
            cluster,
            duration,
        } => {
            let mut e = event(
                EventKind::Ejected,
                format!(
                    "{cluster} ejected from {service} by outlier detection for {}",
                    humantime::format_duration(Duration::from_secs(duration.as_secs().max(1)))
                ),
            );
            e.service = service.to_string();
            e.cluster = cluster.to_string();
            e
        }
        SteeringChange::Returned { service, cluster } => {
            let mut e = event(
                EventKind::EjectionEnded,
                format!("{cluster} is back for {service}: its ejection ended"),
            );
            e.service = service.to_string();
            e.cluster = cluster.to_string();
            e
        }
    }
}

/// Unix seconds as RFC 3339 (UTC), for texts.
pub fn unix_text(secs: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meshup_core::catalog::Change;
    use meshup_core::fixture;
    use meshup_core::model::{ExportRecord, GatewayRecord};
    use meshup_core::names::DrillId;
    use meshup_core::policy::{DrillKind, PolicyRecord};

    use super::*;

    fn c(s: &str) -> ClusterName {
        ClusterName::new(s).expect("cluster")
    }

    fn gateway(cluster: &str, draining: bool) -> Change {
        fixture::put_gateway(GatewayRecord {
            quic_addrs: vec!["127.0.0.1:1".parse().expect("addr")],
            draining,
            ..fixture::gateway(cluster, &format!("{cluster}-0"))
        })
    }

    fn export(cluster: &str, healthy: u32) -> Change {
        let record = ExportRecord {
            endpoints_total: 2,
            ..fixture::export(8080, healthy)
        };
        fixture::put_export(cluster, &format!("{cluster}-0"), "pay.prod", record)
    }

    fn routes(json: &str) -> Change {
        let compiled = meshup_core::routes::decode(json.as_bytes())
            .and_then(|r| r.compile())
            .expect("route record");
        Change::PutRoutes("pay.prod".parse().expect("key"), Arc::new(compiled))
    }

    fn kinds(events: &[Event]) -> Vec<(EventKind, String)> {
        events
            .iter()
            .map(|e| (EventKind::try_from(e.kind).expect("kind"), e.text.clone()))
            .collect()
    }

    #[test]
    fn snapshot_changes_become_events() {
        let mut a = Snapshot::new();
        for ch in [
            gateway("east", false),
            gateway("west", false),
            export("west", 2),
        ] {
            a.apply(ch);
        }
        let mut b = a.clone();
        b.apply(gateway("west", true));
        b.apply(export("east", 2));
        b.apply(export("west", 1));
        b.apply(Change::PutPolicy(
            "pay.prod".parse().expect("key"),
            Arc::new(PolicyRecord {
                updated_by: Some("ana".into()),
                ..PolicyRecord::default()
            }),
        ));
        b.apply(routes(
            r#"{"schema":1,"rules":[{"name":"canary"},{}],"updated_by":"ana"}"#,
        ));
        let drill = DrillId::new("fail-west").expect("id");
        b.apply(Change::PutDrill(
            drill.clone(),
            Arc::new(fixture::drill(DrillKind::Fail, "west")),
        ));
        let got = kinds(&diff(&a, &b));
        assert_eq!(
            got,
            vec![
                (
                    EventKind::GatewayDraining,
                    "gateway west-0 of cluster west is draining".into()
                ),
                (
                    EventKind::ExportChanged,
                    "east now exports pay.prod (2/2 endpoints healthy)".into()
                ),
                (
                    EventKind::ExportChanged,
                    "pay.prod in west: 1/2 endpoints healthy (was 2/2)".into()
                ),
                (EventKind::PolicySet, "policy for pay.prod set by ana".into()),
                (
                    EventKind::RoutesSet,
                    "route rules for pay.prod set by ana: 2 rules (canary, rule-1)".into()
                ),
                (
                    EventKind::DrillStarted,
                    "drill fail-west started by ana: fail west (every service) until 1970-01-01T01:00:00Z, because game day".into()
                ),
            ]
        );
        // And back: everything added is removed again.
        let got = kinds(&diff(&b, &a));
        assert!(got.contains(&(
            EventKind::ExportChanged,
            "east no longer exports pay.prod".into()
        )));
        assert!(got.contains(&(
            EventKind::PolicyDeleted,
            "policy for pay.prod deleted: the default applies".into()
        )));
        assert!(got.contains(&(
            EventKind::RoutesDeleted,
            "route rules for pay.prod deleted: every request follows the failover policy".into()
        )));
        // Changed rules name the new writer; a record that names none says no one.
        let mut c = b.clone();
        c.apply(routes(
            r#"{"schema":1,"rules":[{"name":"api"}],"updated_by":"bo"}"#,
        ));
        let changed = diff(&b, &c);
        assert_eq!(
            kinds(&changed),
            vec![(
                EventKind::RoutesSet,
                "route rules for pay.prod changed by bo: 1 rule (api)".into()
            )]
        );
        assert_eq!(
            (changed[0].service.as_str(), changed[0].who.as_str()),
            ("pay.prod", "bo")
        );
        let mut d = c.clone();
        d.apply(routes(r#"{"schema":1,"rules":[]}"#));
        let cleared = diff(&c, &d);
        assert_eq!(
            kinds(&cleared),
            vec![(
                EventKind::RoutesSet,
                "route rules for pay.prod changed: no rules, every request follows the failover policy".into()
            )]
        );
        assert_eq!(cleared[0].who, "");
        assert!(got.contains(&(
            EventKind::DrillEnded,
            "drill fail-west ended (fail west)".into()
        )));
        let got = kinds(&diff(&Snapshot::new(), &a));
        assert!(got.contains(&(
            EventKind::ServiceAdded,
            "service pay.prod added, exported by west".into()
        )));
        assert!(got.contains(&(
            EventKind::GatewayJoined,
            "gateway east-0 of cluster east joined".into()
        )));
        let got = kinds(&diff(&a, &Snapshot::new()));
        assert!(got.contains(&(
            EventKind::ServiceRemoved,
            "service pay.prod removed: no cluster exports it".into()
        )));
        assert!(diff(&a, &a).is_empty());
    }

    #[test]
    fn steering_changes_become_events_naming_service_and_cluster() {
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        // (change, kind, cluster field, text)
        let table = [
            (
                SteeringChange::Failover {
                    service: pay.clone(),
                    from: Some(c("west")),
                    from_level: Some(0),
                    to: Some(c("north")),
                    to_level: Some(1),
                },
                EventKind::TargetChanged,
                "north",
                "pay.prod: new connections now go mainly to north (was west), failover level 1 (was 0)",
            ),
            (
                SteeringChange::Failover {
                    service: pay.clone(),
                    from: Some(c("west")),
                    from_level: Some(0),
                    to: Some(c("north")),
                    to_level: Some(0),
                },
                EventKind::TargetChanged,
                "north",
                "pay.prod: new connections now go mainly to north (was west)",
            ),
            (
                SteeringChange::Failover {
                    service: pay.clone(),
                    from: Some(c("north")),
                    from_level: Some(1),
                    to: None,
                    to_level: None,
                },
                EventKind::TargetChanged,
                "",
                "pay.prod: new connections now go mainly to nowhere (was north), failover level none (was 1)",
            ),
            (
                SteeringChange::Ejected {
                    service: pay.clone(),
                    cluster: c("west"),
                    duration: Duration::from_millis(29_700),
                },
                EventKind::Ejected,
                "west",
                "west ejected from pay.prod by outlier detection for 29s",
            ),
            (
                SteeringChange::Returned {
                    service: pay.clone(),
                    cluster: c("west"),
                },
                EventKind::EjectionEnded,
                "west",
                "west is back for pay.prod: its ejection ended",
            ),
        ];
        for (change, kind, cluster, text) in table {
            let e = steering_event(&change);
            assert_eq!(
                (
                    EventKind::try_from(e.kind).expect("kind"),
                    e.cluster.as_str(),
                    e.text.as_str()
                ),
                (kind, cluster, text)
            );
            assert_eq!(e.service, "pay.prod");
        }
    }
}

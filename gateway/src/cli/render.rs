//! Tables and lines for people. Pure: answers in, text out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshup_admin_api::convert::drill_kind_word;
use meshup_admin_api::pb::{self, EventKind, LinkState};

use super::Clusters;
use super::record::WriteView;

/// Columns padded to their widest cell, two spaces apart; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        let mut text = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            text.push_str(c);
            if i + 1 < n {
                let pad = widths[i] - c.chars().count() + 2;
                text.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// `2026-12-01T08:00:00Z (in 29m 59s)`.
pub fn when(unix: i64) -> String {
    if unix <= 0 {
        return String::new();
    }
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    let stamp = humantime::format_rfc3339_seconds(at);
    let now = unix_now();
    let delta = Duration::from_secs(unix.abs_diff(now));
    if unix >= now {
        format!("{stamp} (in {})", humantime::format_duration(delta))
    } else {
        format!("{stamp} ({} ago)", humantime::format_duration(delta))
    }
}

fn percent(ppm: u64) -> String {
    format!("{:.1}%", ppm as f64 / 10_000.0)
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn link_word(v: i32) -> &'static str {
    match LinkState::try_from(v).unwrap_or(LinkState::Unspecified) {
        LinkState::Local => "local",
        LinkState::Up => "up",
        LinkState::Down => "down",
        LinkState::Unknown => "not dialled",
        LinkState::Unspecified => "?",
    }
}

pub fn status(r: &pb::GetStatusResponse) -> String {
    let g = r.gateway.clone().unwrap_or_default();
    let c = r.catalog.clone().unwrap_or_default();
    let mut out = format!(
        "gateway  {}/{}  meshup {}  region {}  zone {}\nstate    {}{}  {} connections in flight\n",
        g.cluster,
        g.gateway_id,
        g.version,
        dash(&g.region),
        dash(&g.zone),
        if g.ready {
            "ready".to_owned()
        } else {
            format!("NOT READY (waiting for {})", g.pending.join(", "))
        },
        if g.draining { ", DRAINING" } else { "" },
        g.connections_in_flight,
    );
    out.push_str(&format!(
        "catalog  {} revision {}, {}, {} services, {} exports, {} policies, {} drills in force\n\n",
        c.backend,
        c.revision,
        if !c.synced {
            "first sync pending".to_owned()
        } else if c.connected {
            "store connected".to_owned()
        } else {
            format!(
                "STORE UNREACHABLE, {:.0}s stale (routing on the last catalog)",
                c.stale_seconds
            )
        },
        c.services,
        c.exports,
        c.policies,
        c.drills,
    ));
    let mut rows = Vec::new();
    for cl in &r.clusters {
        let link = link_word(cl.link);
        let rtt = cl.rtt_ms.map_or("-".into(), |v| format!("{v:.2} ms"));
        if cl.gateways.is_empty() {
            rows.push(vec![
                cl.name.clone(),
                link.into(),
                rtt.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for gw in &cl.gateways {
            let state = if gw.draining {
                "draining"
            } else if cl.local {
                "this cluster"
            } else if gw.connected {
                "connected"
            } else {
                "no connection"
            };
            rows.push(vec![
                cl.name.clone(),
                link.into(),
                rtt.clone(),
                gw.id.clone(),
                gw.addrs.join(","),
                state.into(),
                if gw.connected {
                    format!("{:.2}% of {}", gw.loss_ratio * 100.0, gw.sent_packets)
                } else {
                    "-".into()
                },
            ]);
        }
    }
    out.push_str(&table(
        &[
            "CLUSTER", "LINK", "RTT", "GATEWAY", "ADDRESS", "STATE", "LOSS",
        ],
        &rows,
    ));
    out
}

/// One line per cluster, as this gateway sees it: its link, the gateways answering, what it
/// exports, the streams open to it now.
pub fn clusters(r: &Clusters) -> String {
    let rows: Vec<Vec<String>> = r
        .clusters
        .iter()
        .map(|cl| {
            let connected = cl.gateways.iter().filter(|g| g.connected).count();
            let draining = cl.gateways.iter().filter(|g| g.draining).count();
            let (lost, sent) = cl
                .gateways
                .iter()
                .fold((0, 0), |(l, s), g| (l + g.lost_packets, s + g.sent_packets));
            vec![
                cl.name.clone(),
                dash(&cl.region),
                link_word(cl.link).into(),
                cl.rtt_ms.map_or("-".into(), |v| format!("{v:.2} ms")),
                if cl.local {
                    format!("{} (this cluster)", cl.gateways.len())
                } else if draining > 0 {
                    format!(
                        "{connected}/{} connected, {draining} draining",
                        cl.gateways.len()
                    )
                } else {
                    format!("{connected}/{} connected", cl.gateways.len())
                },
                cl.exports.to_string(),
                if cl.local {
                    "-".into()
                } else {
                    cl.open_streams.to_string()
                },
                if sent > 0 {
                    format!("{:.2}%", lost as f64 * 100.0 / sent as f64)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "CLUSTER", "REGION", "LINK", "RTT", "GATEWAYS", "EXPORTS", "STREAMS", "LOSS",
        ],
        &rows,
    )
}

pub fn services(r: &pb::ListServicesResponse) -> String {
    if r.services.is_empty() {
        return format!("no services in the catalog (revision {})\n", r.revision);
    }
    let rows: Vec<Vec<String>> = r
        .services
        .iter()
        .map(|s| {
            let clusters: Vec<String> = s
                .clusters
                .iter()
                .map(|c| format!("{} {}/{}", c.cluster, c.healthy, c.total))
                .collect();
            let shares: Vec<String> = s
                .shares
                .iter()
                .map(|x| format!("{} {}", x.cluster, percent(x.share_ppm)))
                .collect();
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}/{}", p.port, p.protocol))
                .collect();
            vec![
                s.service.clone(),
                dash(&s.vip),
                ports.join(","),
                clusters.join(", "),
                if s.main_target.is_empty() {
                    "NOWHERE".into()
                } else {
                    s.main_target.clone()
                },
                if s.failover_level < 0 {
                    "-".into()
                } else {
                    s.failover_level.to_string()
                },
                if shares.is_empty() {
                    "-".into()
                } else {
                    shares.join(", ")
                },
                format!(
                    "{}{}{}",
                    if s.has_policy { "policy" } else { "default" },
                    if s.route_rules.is_empty() {
                        String::new()
                    } else {
                        format!(", routes: {}", s.route_rules.join(" "))
                    },
                    if s.drills.is_empty() {
                        String::new()
                    } else {
                        format!(", drills: {}", s.drills.join(" "))
                    }
                ),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "VIP",
            "PORTS",
            "CLUSTERS (healthy/total)",
            "TARGET",
            "LEVEL",
            "SHARES",
            "NOTES",
        ],
        &rows,
    )
}

pub fn resolve(r: &pb::ResolveResponse) -> String {
    let mut out = format!(
        "{}:{}{} via VIP {}: {} policy, up to {} attempts (catalog revision {})\n",
        r.service,
        r.port,
        if r.pinned_cluster.is_empty() {
            String::new()
        } else {
            format!(" pinned to {}", r.pinned_cluster)
        },
        dash(&r.vip),
        r.policy_source,
        r.max_attempts,
        r.revision
    );
    out.push_str(&format!(
        "order: {}\n\n",
        if r.order.is_empty() {
            "none: a new connection is refused".to_owned()
        } else {
            r.order.join(" → ")
        }
    ));
    // Candidates in their order, then the clusters that are out.
    let mut sorted: Vec<&pb::ClusterVerdict> = r.verdicts.iter().collect();
    sorted.sort_by_key(|v| (!v.candidate, v.rank));
    let rows: Vec<Vec<String>> = sorted
        .into_iter()
        .map(|v| {
            vec![
                v.cluster.clone(),
                if v.candidate {
                    format!("#{} {}", v.rank + 1, v.code)
                } else {
                    format!("out: {}", v.code)
                },
                if v.level < 0 {
                    "-".into()
                } else {
                    v.level.to_string()
                },
                if v.candidate {
                    percent(v.share_ppm)
                } else {
                    "-".into()
                },
                v.reason.clone(),
                dash(&when(v.until)),
            ]
        })
        .collect();
    out.push_str(&table(
        &["CLUSTER", "VERDICT", "LEVEL", "SHARE", "REASON", "UNTIL"],
        &rows,
    ));
    out
}

/// A stored record (policy, route rules) as the file to edit: `head` (a comment), then the
/// file `to_yaml` makes of it; a record that does not decode is shown as stored.
pub fn as_file<R: serde::de::DeserializeOwned>(
    head: String,
    service: &str,
    record: &serde_json::Value,
    to_yaml: fn(&meshup_core::names::ServiceKey, &R) -> String,
) -> String {
    let decoded: Result<R, _> = serde_json::from_value(record.clone());
    match (decoded, service.parse()) {
        (Ok(r), Ok(s)) => head + &to_yaml(&s, &r),
        _ => format!("{head}# the stored record does not decode; as stored:\n{record}\n"),
    }
}

pub fn written(v: &WriteView) -> String {
    let mut out = if v.changed {
        format!(
            "{} for {} written at revision {}{}\n",
            v.what,
            v.service,
            v.revision,
            if v.previous_revision == 0 {
                " (created)".to_owned()
            } else {
                format!(" (was {})", v.previous_revision)
            }
        )
    } else {
        format!(
            "{} for {} unchanged (revision {})\n",
            v.what, v.service, v.revision
        )
    };
    for w in &v.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

fn scope(d: &pb::Drill) -> String {
    if d.service.is_empty() {
        "every service".into()
    } else {
        d.service.clone()
    }
}

pub fn drill_started(d: &pb::Drill) -> String {
    format!(
        "started drill {}: {} {} ({}) until {}\nstop it early with: meshup drill stop {} --who NAME\n",
        d.id,
        drill_kind_word(d.kind),
        d.cluster,
        scope(d),
        when(d.expires),
        d.id
    )
}

pub fn drill_stopped(a: &pb::DrillAudit) -> String {
    let d = a.drill.clone().unwrap_or_default();
    format!(
        "stopped drill {} ({} {}, started by {}) as {}; audit entry written\n",
        d.id,
        drill_kind_word(d.kind),
        d.cluster,
        d.who,
        a.ended_by
    )
}

pub fn drills(drills: &[pb::Drill], audit: &[pb::DrillAudit]) -> String {
    let mut out = String::new();
    if drills.is_empty() {
        out.push_str("no drills in force\n");
    } else {
        let rows: Vec<Vec<String>> = drills
            .iter()
            .map(|d| {
                vec![
                    d.id.clone(),
                    drill_kind_word(d.kind).into(),
                    d.cluster.clone(),
                    scope(d),
                    d.who.clone(),
                    d.why.clone(),
                    if d.active {
                        when(d.expires)
                    } else {
                        format!("expired, ending: {}", when(d.expires))
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["ID", "KIND", "CLUSTER", "SERVICE", "WHO", "WHY", "EXPIRES"],
            &rows,
        ));
    }
    if !audit.is_empty() {
        out.push_str("\nended:\n");
        let rows: Vec<Vec<String>> = audit
            .iter()
            .map(|a| {
                let d = a.drill.clone().unwrap_or_default();
                vec![
                    d.id.clone(),
                    drill_kind_word(d.kind).into(),
                    d.cluster.clone(),
                    scope(&d),
                    d.who.clone(),
                    d.why.clone(),
                    format!("{} by {}", a.how, a.ended_by),
                    when(a.ended),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "ID", "KIND", "CLUSTER", "SERVICE", "WHO", "WHY", "ENDED", "AT",
            ],
            &rows,
        ));
    }
    out
}

pub fn event(e: &pb::Event) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(e.at_unix_ms).unwrap_or(0));
    let kind = EventKind::try_from(e.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| e.kind.to_string());
    format!(
        "{} rev {} {}{} {}\n",
        humantime::format_rfc3339_millis(at),
        e.revision,
        kind,
        if e.existing { " (existing)" } else { "" },
        e.text
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_trim() {
        let t = table(
            &["A", "LONGER", "C"],
            &[
                vec!["x".into(), "y".into(), "z".into()],
                vec!["wide-cell".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(t, "A          LONGER  C\nx          y       z\nwide-cell\n");
        assert_eq!(when(0), "");
        assert!(
            when(unix_now() + 3600).contains("(in 59m")
                || when(unix_now() + 3600).contains("(in 1h")
        );
    }
}

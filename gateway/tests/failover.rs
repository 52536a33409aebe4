//! Failover and traffic policy end to end: federations of three or four whole gateways
//! (`app::Gateway` on one embedded store, each its own cluster with its region and zone), real
//! QUIC between them and real TCP clients. Policies and drills are written through the store
//! as an operator would; backends answer with their cluster's name, so a client counts where
//! each new connection went; the gateways' `meshup_service_*` and `meshup_catalog_*` series
//! say what the gateway did on the way (docs/policy.md).
//!
//! Time: nothing here sleeps for an outcome. Catalog changes and recoveries are polled for;
//! outlier ejections, hold-downs and drill expiries use durations of 250 ms to 2 s, and the
//! moments they end are bounded from both sides by timestamps taken around each connection.
//!
//! Health probes: a gateway probes its endpoints every `DEFAULT_PROBE_INTERVAL` (2 s) and
//! publishes the counts, after which other clusters stop trying a dead endpoint at all. Tests
//! of what happens *before* the catalog knows (outlier detection, the retry budget) stop a
//! backend right after a probe reached it ([`Backend::refuse_after_probe`]) and finish within
//! that interval; they say so if the machine was too slow for it.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::federation::{Federation, Held, Tally, answer, drill_json, export_health, plan, tally};
use common::{Backend, assert_eventually, cluster, service, within};
use meshup_core::policy::{DrillEnd, DrillRecord, EXPIRY_ACTOR};

const LIMIT: Duration = Duration::from_secs(60);

const CONNECTIONS: &str = "meshup_service_connections_total";
const FAILURES: &str = "meshup_service_attempt_failures_total";
const EJECTIONS: &str = "meshup_service_ejections_total";
const RETRIES: &str = "meshup_service_retries_total";
const BUDGET_SPENT: &str = "meshup_service_retry_budget_exhausted_total";
const CIRCUIT_OPEN: &str = "meshup_service_circuit_open_total";
const SKIPPED: &str = "meshup_catalog_skipped_records_total";

/// Labels of a per-service series from east to `destination`.
fn to(destination: &str) -> [(&'static str, &str); 3] {
    [
        ("service", "pay.prod"),
        ("source_cluster", "east"),
        ("destination_cluster", destination),
    ]
}

/// Whether east's catalog still shows `cluster` healthy: the health probe has not yet told
/// the federation that its backend stopped.
fn still_healthy(fed: &Federation, name: &str) -> bool {
    export_health(&fed.snapshot("east"), &cluster(name)) == Some(1)
}

fn assert_all(t: &Tally, cluster: &str, what: &str) {
    assert!(
        t.all(cluster),
        "{what}: every connection to {cluster}, got {t:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_policy_connections_go_to_the_own_cluster_then_its_zone_then_its_region_then_the_rest()
 {
    within(LIMIT, async {
        let mut fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[true]),
            plan("zone-mate", "us-east", "us-east-1a", &[true]),
            plan("region-mate", "us-east", "us-east-1b", &[true]),
            plan("far", "eu-north", "eu-north-1a", &[true]),
        ])
        .await;
        let vip = fed.vip("east").await;
        assert_all(
            &tally(vip, 100, 4).await,
            "east",
            "its own cluster serves it",
        );

        // The own endpoint stops; once the probe has published that, the zone takes over.
        fed.backend("east", 0).refuse().await;
        fed.wait_export("east", "east", Some(0)).await;
        assert_all(&tally(vip, 100, 4).await, "zone-mate", "own cluster down");

        fed.drain("zone-mate").await;
        fed.wait_export("east", "zone-mate", None).await;
        assert_all(&tally(vip, 100, 4).await, "region-mate", "zone gone");

        fed.drain("region-mate").await;
        fed.wait_export("east", "region-mate", None).await;
        assert_all(&tally(vip, 100, 4).await, "far", "region gone");

        // Every step was the decision's: no connection tried a cluster that was out.
        assert_eq!(fed.counter("east", FAILURES, &[]).await, 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_list_sends_all_to_its_first_level_until_outlier_detection_ejects_it() {
    within(LIMIT, async {
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
            plan("west", "us-west", "us-west-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]},{"clusters":[{"cluster":"west"}]}],
                "outlier":{"consecutive_failures":3,"base_ejection":"60s","max_ejection":"60s"}}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        assert_all(&tally(vip, 100, 4).await, "north", "first level");

        // North's backend stops while the catalog still counts it healthy: the first three
        // connections each fail at north and are retried at west, then north is ejected and
        // no connection tries it any more.
        let probe_due = fed.backend("north", 0).refuse_after_probe().await;
        let t = tally(vip, 30, 1).await;
        let window = format!(
            "(north's next health probe due in {:?}, catalog still healthy: {})",
            probe_due.saturating_duration_since(Instant::now()),
            still_healthy(&fed, "north")
        );
        assert_all(&t, "west", "north refusing");
        let m = fed.metrics("east").await;
        let failures = m.sum(FAILURES, &to("north"));
        assert_eq!(
            m.sum(FAILURES, &[("destination_cluster", "north"), ("result", "connect_failed")]),
            3.0,
            "consecutive failures before the ejection {window}"
        );
        assert_eq!(failures, 3.0, "{window}");
        assert_eq!(m.sum(EJECTIONS, &to("north")), 1.0, "{window}");
        assert_eq!(m.sum(RETRIES, &to("west")), 3.0, "{window}");

        // Once the probe has told the federation, north is out for that reason too.
        fed.wait_export("east", "north", Some(0)).await;
        assert_all(&tally(vip, 50, 4).await, "west", "north down");
        assert_eq!(fed.counter("east", FAILURES, &to("north")).await, failures);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_split_a_level_80_20_and_its_survivor_then_the_next_level_take_over() {
    within(LIMIT, async {
        let mut fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("west", "us-west", "us-west-1a", &[true]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
            plan("south", "sa-east", "sa-east-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":80},{"cluster":"north","weight":20}]},
                {"clusters":[{"cluster":"south"}]}]}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        let t = tally(vip, 2000, 8).await;
        eprintln!(
            "80/20 over {} new connections: west {:.1} %, north {:.1} %",
            t.total(),
            t.percent("west"),
            t.percent("north")
        );
        assert_eq!((t.failures, t.count("south")), (0, 0), "{t:?}");
        assert_eq!(t.count("west") + t.count("north"), 2000, "{t:?}");
        assert!(
            (75.0..=85.0).contains(&t.percent("west")),
            "west's share 80 ± 5 %: {t:?}"
        );

        // West's gateway stops: north takes the whole level.
        fed.drain("west").await;
        fed.wait_export("east", "west", None).await;
        assert_all(&tally(vip, 300, 8).await, "north", "west stopped");

        // North's endpoint stops too: the level is exhausted, the next one takes it all.
        fed.backend("north", 0).refuse().await;
        fed.wait_export("east", "north", Some(0)).await;
        assert_all(&tally(vip, 300, 8).await, "south", "first level exhausted");
        assert_eq!(fed.counter("east", FAILURES, &[]).await, 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_with_half_its_endpoints_healthy_keeps_70_percent_and_spills_the_rest() {
    within(LIMIT, async {
        // West exports two endpoints, the second down from the start: its first probe,
        // before it publishes anything, counts 1 of 2 healthy.
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("west", "us-west", "us-west-1a", &[true, false]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
        ])
        .await;
        let west = fed
            .snapshot("east")
            .service(&service())
            .and_then(|s| s.clusters.get(&cluster("west")).cloned())
            .expect("west exports pay.prod");
        assert_eq!((west.endpoints_healthy, west.endpoints_total), (1, 2));
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"north"}]}]}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        let t = tally(vip, 1000, 8).await;
        eprintln!(
            "west at 1 of 2 endpoints, over {} new connections: west {:.1} %, north {:.1} %",
            t.total(),
            t.percent("west"),
            t.percent("north")
        );
        assert_eq!(t.failures, 0, "{t:?}");
        assert!(
            (65.0..=75.0).contains(&t.percent("west")),
            "140 % × 50 % healthy = 70 % ± 5 to west, the rest to north: {t:?}"
        );
        assert_eq!(t.count("west") + t.count("north"), 1000, "{t:?}");
        assert_eq!(
            fed.counter("east", FAILURES, &[]).await,
            0.0,
            "the split is the decision's, not retries'"
        );

        // The second endpoint comes back; once probed, west takes everything again.
        fed.backend("west", 1).resume().await;
        fed.wait_export("east", "west", Some(2)).await;
        assert_all(&tally(vip, 200, 8).await, "west", "both endpoints healthy");
    })
    .await;
}

/// One connection of a sequence, with east's counters for north right after it.
#[derive(Debug, Clone, Copy)]
struct Step {
    start: Instant,
    end: Instant,
    failures: f64,
    ejections: f64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_ejects_for_longer_each_time_brings_the_cluster_back_and_never_ejects_the_last()
 {
    within(LIMIT, async {
        const BASE: Duration = Duration::from_millis(250);
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
            plan("west", "us-west", "us-west-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]},{"clusters":[{"cluster":"west"}]}],
                "outlier":{"consecutive_failures":3,"base_ejection":"250ms","max_ejection":"10s","max_ejected_percent":100},
                "failback_hold_down":"0s"}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        assert_all(&tally(vip, 20, 1).await, "north", "first level");

        // North refuses while the catalog still counts it healthy. One connection after
        // another, each followed by east's counters, until north was ejected three times.
        let probe_due = fed.backend("north", 0).refuse_after_probe().await;
        let mut steps: Vec<Step> = Vec::new();
        while steps.last().is_none_or(|s| s.ejections < 3.0) {
            assert!(
                still_healthy(&fed, "north"),
                "north's health probe reported it down before its third ejection (a machine \
                 too slow for this test's window: the probe was due in {:?}); steps: {steps:#?}",
                probe_due.saturating_duration_since(Instant::now())
            );
            let start = Instant::now();
            let answered = answer(vip).await;
            assert_eq!(answered.as_deref().ok(), Some("west"), "retried at west");
            let m = fed.metrics("east").await;
            steps.push(Step {
                start,
                end: Instant::now(),
                failures: m.sum(FAILURES, &to("north")),
                ejections: m.sum(EJECTIONS, &to("north")),
            });
        }
        let first = |f: f64| {
            steps
                .iter()
                .position(|s| s.failures >= f)
                .expect("seen")
        };
        let ejected = |n: f64| {
            steps
                .iter()
                .position(|s| s.ejections >= n)
                .expect("seen")
        };
        // Ejected at the third consecutive failure.
        assert_eq!((first(1.0), first(2.0), first(3.0)), (0, 1, 2), "{steps:#?}");
        assert_eq!(ejected(1.0), 2, "{steps:#?}");
        // Back after the base time, on probation: its next failure ejects it again, for
        // twice as long; then a third time.
        let (i4, i5) = (first(4.0), first(5.0));
        assert_eq!((ejected(2.0), ejected(3.0)), (i4, i5), "{steps:#?}");
        assert_eq!(steps[i5].failures, 5.0, "{steps:#?}");
        let (e1, e2) = (steps[2], steps[i4]);
        for (ejection, length, retried) in [(e1, BASE, i4), (e2, BASE * 2, i5)] {
            // Not tried while ejected...
            assert!(
                steps[retried].end.duration_since(ejection.start) >= length,
                "tried {:?} after an ejection of {length:?}: {steps:#?}",
                steps[retried].end.duration_since(ejection.start)
            );
            // ...and tried by the first connection after the ejection ended: the one before
            // started while it was still ejected.
            assert!(
                steps[retried - 1].start < ejection.end + length,
                "not tried again right after an ejection of {length:?}: {steps:#?}"
            );
        }
        eprintln!(
            "north ejected after 3 failures; tried again {:?} and {:?} after its first and second ejections (base {BASE:?})",
            steps[i4].start.duration_since(e1.end),
            steps[i5].start.duration_since(e2.end)
        );

        // The probe tells the federation north is down: west is the only cluster left.
        // When west refuses too, it is never ejected: every new connection still tries it.
        fed.wait_export("east", "north", Some(0)).await;
        let probe_due = fed.backend("west", 0).refuse_after_probe().await;
        let t = tally(vip, 10, 1).await;
        let window = format!(
            "(west's next probe due in {:?}, catalog still healthy: {})",
            probe_due.saturating_duration_since(Instant::now()),
            still_healthy(&fed, "west")
        );
        assert_eq!(t.failures, 10, "nothing left to serve them {window}");
        let m = fed.metrics("east").await;
        assert_eq!(m.sum(FAILURES, &to("west")), 10.0, "{window}");
        assert_eq!(m.sum(EJECTIONS, &to("west")), 0.0, "{window}");
    })
    .await;
}

/// One connection while a recovered cluster holds down, and what east's catalog said of the
/// cluster just before it started.
#[derive(Debug, Clone)]
struct Observed {
    /// When the catalog was looked at (just before `start`).
    checked: Instant,
    healthy: bool,
    start: Instant,
    end: Instant,
    cluster: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_primary_gets_no_new_connection_before_its_hold_down_ends_and_all_after() {
    within(LIMIT, async {
        const HOLD: Duration = Duration::from_secs(2);
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
            plan("west", "us-west", "us-west-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]},{"clusters":[{"cluster":"west"}]}],
                "failback_hold_down":"2s","outlier":{"consecutive_failures":1000}}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        assert_all(&tally(vip, 50, 4).await, "north", "first level");

        // North's endpoint dies; once the catalog says so, west takes everything.
        let north = fed.backend("north", 0);
        north.refuse().await;
        fed.wait_export("east", "north", Some(0)).await;
        assert_all(&tally(vip, 20, 1).await, "west", "north down");

        // It comes back. Connections one after another, each after a look at east's catalog,
        // until north has had 50 connections in a row after its hold-down.
        north.resume().await;
        let mut seen: Vec<Observed> = Vec::new();
        let back = |seen: &[Observed]| seen.iter().position(|o| o.healthy);
        // Paced, not to load the machine: the bounds below hold at any pace.
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            pace.tick().await;
            if let Some(k) = back(&seen) {
                let after = seen[k].end + HOLD;
                if seen.iter().filter(|o| o.start >= after).count() >= 50 {
                    break;
                }
            }
            let checked = Instant::now();
            let healthy = still_healthy(&fed, "north");
            let start = Instant::now();
            let cluster = answer(vip).await.expect("answered");
            seen.push(Observed {
                checked,
                healthy,
                start,
                end: Instant::now(),
                cluster,
            });
        }
        let k = back(&seen).expect("north came back");
        assert!(k > 0, "the probe cannot have published north's recovery at once");
        // The hold-down began at the first decision that saw north healthy again: after
        // the last look that saw it down.
        let began_after = seen[k - 1].checked;
        let early: Vec<&Observed> = seen
            .iter()
            .filter(|o| o.cluster == "north" && o.end < began_after + HOLD)
            .collect();
        assert!(
            early.is_empty(),
            "north got connections before its {HOLD:?} hold-down ended: {early:#?}"
        );
        // ...and no later than the decision of the first connection that saw it.
        let ended_by = seen[k].end + HOLD;
        let late: Vec<&Observed> = seen
            .iter()
            .filter(|o| o.start >= ended_by && o.cluster != "north")
            .collect();
        assert!(
            late.is_empty(),
            "after the hold-down every new connection goes to north: {late:#?}"
        );
        let held = seen[k..].iter().filter(|o| o.cluster == "west").count();
        assert!(held > 0, "connections during the hold-down went to west");
        let first_north = seen[k..]
            .iter()
            .find(|o| o.cluster == "north")
            .expect("north got connections");
        eprintln!(
            "north healthy again in east's catalog; its first new connection {:?} later (hold-down {HOLD:?}), {held} to west meanwhile",
            first_north.start.duration_since(seen[k].checked)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_max_connections_new_connections_go_to_the_next_cluster_and_are_counted() {
    within(LIMIT, async {
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("west", "us-west", "us-west-1a", &[true]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"north"}]}],
                "circuit":{"max_connections":2}}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(Held::open(vip).await.expect("connected"));
        }
        let clusters: Vec<&str> = held.iter().map(|h| h.cluster.as_str()).collect();
        assert_eq!(clusters, ["west", "west", "north", "north"]);
        let m = fed.metrics("east").await;
        assert_eq!(
            (m.sum(CIRCUIT_OPEN, &to("west")), m.sum(CIRCUIT_OPEN, &to("north"))),
            (2.0, 0.0),
            "west's circuit skipped for the 3rd and 4th"
        );

        // Both circuits open: the next connection is refused at once.
        assert!(Held::open(vip).await.is_err(), "no cluster can take a 5th");
        let m = fed.metrics("east").await;
        assert_eq!(
            (m.sum(CIRCUIT_OPEN, &to("west")), m.sum(CIRCUIT_OPEN, &to("north"))),
            (3.0, 1.0)
        );
        assert_eq!(
            m.sum(CONNECTIONS, &[("destination_cluster", "none"), ("result", "circuit_open")]),
            1.0,
            "refused for the circuits"
        );
        for h in &mut held {
            assert_eq!(h.echo(b"still here").await.expect("echo"), b"still here");
        }

        // One of west's connections ends: west takes new connections again.
        drop(held.remove(0));
        assert_eventually("west takes a new connection", Duration::from_secs(5), || async move {
            answer(vip).await.is_ok_and(|c| c == "west")
        })
        .await;
        assert_eq!(fed.counter("east", FAILURES, &[]).await, 0.0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_away_from_a_refusing_cluster_stay_within_the_retry_budget() {
    within(LIMIT, async {
        const N: u64 = 60;
        const PERCENT: u64 = 20;
        const MIN_PER_SECOND: u64 = 1;
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
            plan("west", "us-west", "us-west-1a", &[true]),
        ])
        .await;
        // Ejection capped at 0 %: north stays first however often it fails.
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]},{"clusters":[{"cluster":"west"}]}],
                "outlier":{"max_ejected_percent":0},
                "retry":{"max_attempts":3,"budget_percent":20,"min_retries":1}}"#,
        )
        .await;
        // No connection before these: the 10 s budget window holds exactly the N below.
        let vip = fed.vip("east").await;
        let probe_due = fed.backend("north", 0).refuse_after_probe().await;
        let t = tally(vip, N as usize, 1).await;
        let window = format!(
            "(north's next probe due in {:?}, catalog still healthy: {})",
            probe_due.saturating_duration_since(Instant::now()),
            still_healthy(&fed, "north")
        );
        // The budget, connection by connection: retries in the window stay below 20 % of
        // the connections in it, but 1 per second of the window (10) is always allowed.
        let (mut retries, mut spent) = (0, 0);
        for k in 1..=N {
            if retries < (k * PERCENT / 100).max(MIN_PER_SECOND * 10) {
                retries += 1;
            } else {
                spent += 1;
            }
        }
        assert_eq!((retries, spent), (12, 48), "the rule's numbers for 60 connections");
        eprintln!(
            "north refusing, {N} connections: {} retried at west, {} refused (budget spent)",
            t.count("west"),
            t.failures
        );
        assert_eq!(t.count("west") as u64, retries, "{t:?} {window}");
        assert_eq!(t.failures as u64, spent, "{t:?} {window}");
        let m = fed.metrics("east").await;
        assert_eq!(m.sum(RETRIES, &to("west")), retries as f64, "{window}");
        assert_eq!(
            m.sum(BUDGET_SPENT, &[("service", "pay.prod")]),
            spent as f64,
            "{window}"
        );
        assert_eq!(m.sum(FAILURES, &to("north")), N as f64, "{window}");
        assert_eq!(m.sum(EJECTIONS, &to("north")), 0.0, "{window}");
        assert_eq!(
            m.sum(CONNECTIONS, &[("destination_cluster", "none"), ("result", "retry_budget")]),
            spent as f64
        );
    })
    .await;
}

/// Waits until new connections go to west again and the gateways ended drill `id` at its
/// expiry: it left the catalog with one audit entry saying so (written by whichever gateway
/// got there first). Returns the drill as audited.
async fn expired(fed: &Federation, vip: SocketAddr, id: &str) -> DrillRecord {
    assert_eventually(
        &format!("{id} ended"),
        Duration::from_secs(6),
        || async move { tally(vip, 5, 1).await.all("west") },
    )
    .await;
    let store = &fed.store;
    let layout = &fed.layout;
    let audit = meshup_tests::eventually_ok(
        &format!("{id} audited"),
        Duration::from_secs(5),
        || async move {
            let entries = meshup_federation::drills::list_audit(store, layout)
                .await
                .map_err(|e| e.to_string())?;
            entries
                .into_iter()
                .find(|e| e.id.as_str() == id)
                .ok_or_else(|| "no audit entry yet".to_owned())
        },
    )
    .await;
    assert_eq!(audit.audit.how, DrillEnd::Expired, "{id}: {audit:?}");
    assert_eq!(audit.audit.ended_by, EXPIRY_ACTOR, "{id}: {audit:?}");
    let drill = audit.audit.drill;
    assert!(
        audit.audit.ended >= drill.expires,
        "{id} ended at its expiry, not before"
    );
    assert!(
        fed.snapshot("east").drills().all(|(i, _)| i.as_str() != id),
        "{id} audited yet still in the catalog"
    );
    drill
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_drain_fail_and_pin_steer_new_connections_until_deleted_or_expired() {
    within(LIMIT, async {
        const HOLD: Duration = Duration::from_secs(1);
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("west", "us-west", "us-west-1a", &[true]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
        ])
        .await;
        fed.put_policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"north"}]}],
                "failback_hold_down":"1s"}"#,
        )
        .await;
        let vip = fed.vip("east").await;
        assert_all(&tally(vip, 30, 4).await, "west", "first level");
        let mut open = Held::open(vip).await.expect("connected");
        assert_eq!(open.cluster, "west");

        // Drain: new connections leave west, the open one keeps working; deleted, west is
        // first again at once (a drained cluster did not fail).
        fed.put_drill("drain-west", &drill_json("drain", "west", false, 600))
            .await;
        assert_all(&tally(vip, 30, 4).await, "north", "west drained");
        assert_eq!(open.echo(b"drained").await.expect("echo"), b"drained");
        fed.delete_drill("drain-west").await;
        assert_all(&tally(vip, 30, 4).await, "west", "drain over");

        // Each kind ends by itself at its expiry: written for 2 s, never deleted.
        fed.put_drill("drain-west-briefly", &drill_json("drain", "west", false, 2))
            .await;
        assert_all(&tally(vip, 10, 1).await, "north", "west drained");
        expired(&fed, vip, "drain-west-briefly").await;

        // Fail: as if west were dead. The open connection is not cut (a drill steers new
        // connections only); when the drill ends, west is back from an outage and gets its
        // traffic after the hold-down.
        fed.put_drill("fail-west-briefly", &drill_json("fail", "west", false, 2))
            .await;
        assert_all(&tally(vip, 10, 1).await, "north", "west failed");
        assert_eq!(open.echo(b"failed").await.expect("echo"), b"failed");
        let drill = expired(&fed, vip, "fail-west-briefly").await;
        let expiry = UNIX_EPOCH + Duration::from_secs(drill.expires.unsigned_abs());
        let since = SystemTime::now()
            .duration_since(expiry)
            .expect("after the expiry");
        assert!(since >= HOLD, "west first again {since:?} after the expiry, within its {HOLD:?} hold-down");
        eprintln!("fail drill expired: west first again {since:?} later (hold-down {HOLD:?})");

        // Pin: all of the service's traffic to north.
        fed.put_drill("pin-north-briefly", &drill_json("pin", "north", true, 2))
            .await;
        assert_all(&tally(vip, 10, 1).await, "north", "pinned to north");
        expired(&fed, vip, "pin-north-briefly").await;
        assert_eq!(open.echo(b"still open").await.expect("echo"), b"still open");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_skipped_and_counted_while_the_last_good_one_stays_and_deleting_it_restores_the_default()
 {
    within(LIMIT, async {
        let fed = Federation::start(&[
            plan("east", "us-east", "us-east-1a", &[]),
            plan("west", "us-east", "us-east-1b", &[true]),
            plan("north", "eu-north", "eu-north-1a", &[true]),
        ])
        .await;
        let vip = fed.vip("east").await;
        assert_all(&tally(vip, 30, 4).await, "west", "default: east's region");
        let good = r#"{"schema":1,"levels":[{"clusters":[{"cluster":"north"}]}]}"#;
        fed.put_policy(good).await;
        assert_all(&tally(vip, 30, 4).await, "north", "the policy");
        let good_record = fed.snapshot("east").policy(&service()).cloned();

        let bad = [
            (
                r#"{"schema":2,"levels":[{"clusters":[{"cluster":"west"}]}]}"#,
                "unsupported_schema",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":0},{"cluster":"north","weight":0}]}]}"#,
                "invalid",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"west"}]}]}"#,
                "invalid",
            ),
        ];
        for (record, reason) in bad {
            let mut before = Vec::new();
            for g in ["east", "west", "north"] {
                before.push(fed.counter(g, SKIPPED, &[("reason", reason)]).await);
            }
            fed.write_policy(record).await;
            assert_eventually(
                &format!("every gateway skipped {record} as {reason}"),
                Duration::from_secs(10),
                || {
                    let fed = &fed;
                    let before = before.clone();
                    async move {
                        for (g, b) in ["east", "west", "north"].into_iter().zip(before) {
                            if fed.counter(g, SKIPPED, &[("reason", reason)]).await != b + 1.0 {
                                return false;
                            }
                        }
                        true
                    }
                },
            )
            .await;
            assert_eq!(
                fed.snapshot("east").policy(&service()).cloned(),
                good_record,
                "the good policy stays after {record}"
            );
            assert_all(&tally(vip, 30, 4).await, "north", record);
        }

        fed.delete_policy().await;
        assert_all(&tally(vip, 30, 4).await, "west", "default again");
    })
    .await;
}

/// The harness itself: a backend refuses while stopped and answers again on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_backend_refuses_while_stopped_and_answers_again_on_its_address() {
    within(LIMIT, async {
        let b = Backend::named("west").await;
        let addr = b.addr;
        assert_eq!(answer(addr).await.expect("answers"), "west");
        b.refuse().await;
        let refused = tokio::net::TcpStream::connect(addr).await.map(|_| ());
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused)
        );
        b.resume().await;
        assert_eq!(answer(addr).await.expect("answers again"), "west");
        assert_eq!(b.accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
    })
    .await;
}

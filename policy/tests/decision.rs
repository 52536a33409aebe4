//! Table and property tests of the decision: every rule, through the public API only.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshup_core::names::{ClusterName, ServiceKey};
use meshup_policy::decide::Note;
use meshup_policy::health::Outcome;
use meshup_policy::record::{DrillKind, Level, Member};
use meshup_policy::{
    ClusterState, Decision, DrillRecord, Excluded, Health, Inputs, Locality, PeerSignal,
    PolicyRecord, Verdict, decide,
};
use rand::{Rng, SeedableRng};

fn c(name: &str) -> ClusterName {
    ClusterName::new(name).expect("valid cluster name")
}

fn svc() -> ServiceKey {
    "pay.prod".parse().expect("valid key")
}

/// A cluster with all `total` endpoints healthy, one gateway, allowing us.
fn cluster(name: &str, region: &str, zone: &str, total: u32) -> ClusterState {
    ClusterState {
        cluster: c(name),
        region: region.into(),
        zone: zone.into(),
        endpoints_total: total,
        endpoints_healthy: total,
        allows_us: true,
        gateways: 1,
    }
}

/// Everything a decision depends on, with defaults a test changes.
struct World {
    local: Locality,
    clusters: Vec<ClusterState>,
    policy: PolicyRecord,
    health: Health,
    drills: Vec<DrillRecord>,
    t0: Instant,
    now: Instant,
    unix_now: i64,
}

impl World {
    fn new(clusters: Vec<ClusterState>) -> Self {
        let t0 = Instant::now();
        Self {
            local: Locality {
                cluster: c("east"),
                region: "us-east".into(),
                zone: "us-east-a".into(),
            },
            clusters,
            policy: PolicyRecord::default(),
            health: Health::new(t0),
            drills: Vec::new(),
            t0,
            now: t0,
            unix_now: 1_000,
        }
    }

    fn decide(&self, draw: u64) -> Decision {
        let service = svc();
        decide(&Inputs {
            service: &service,
            local: &self.local,
            policy: &self.policy,
            clusters: &self.clusters,
            health: &self.health,
            drills: &self.drills,
            now: self.now,
            unix_now: self.unix_now,
            draw,
        })
    }

    fn order(&self, draw: u64) -> Vec<String> {
        self.decide(draw)
            .order
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    /// Share of first choices over `n` seeded random draws, in percent.
    fn first_choice_shares(&self, n: usize) -> BTreeMap<String, f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for _ in 0..n {
            let d = self.decide(rng.random());
            let first = d
                .order
                .first()
                .map_or("<none>".to_owned(), |c| c.to_string());
            *counts.entry(first).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|(k, v)| (k, v as f64 * 100.0 / n as f64))
            .collect()
    }

    fn verdict(&self, cluster: &str) -> Verdict {
        self.decide(0)
            .explanations
            .into_iter()
            .find(|e| e.cluster.as_str() == cluster)
            .map(|e| e.verdict)
            .unwrap_or_else(|| panic!("no explanation for {cluster}"))
    }

    fn set(&mut self, name: &str, change: impl FnOnce(&mut ClusterState)) {
        let state = self
            .clusters
            .iter_mut()
            .find(|s| s.cluster.as_str() == name)
            .expect("a cluster of the world");
        change(state);
    }

    fn drill(&mut self, kind: DrillKind, cluster: &str, service: Option<&str>) {
        self.drills.push(DrillRecord {
            schema: 1,
            schema_minor: 0,
            kind,
            cluster: c(cluster),
            service: service.map(|s| s.parse().expect("key")),
            who: "ana".into(),
            why: "game day".into(),
            created: self.unix_now - 10,
            expires: self.unix_now + 600,
        });
    }
}

fn levels(spec: &[&[(&str, u32)]]) -> Vec<Level> {
    spec.iter()
        .map(|l| Level {
            clusters: l
                .iter()
                .map(|(name, weight)| Member {
                    cluster: c(name),
                    weight: *weight,
                })
                .collect(),
        })
        .collect()
}

fn near(share: f64, want: f64, tolerance: f64) -> bool {
    (share - want).abs() <= tolerance
}

#[test]
fn default_order_is_local_then_zone_then_region_then_the_rest_by_rtt() {
    let mut w = World::new(vec![
        cluster("far-unmeasured", "ap-south", "ap-south-a", 2),
        cluster("west", "us-west", "us-west-a", 2),
        cluster("north", "eu-north", "eu-north-a", 2),
        cluster("south", "us-east", "us-east-b", 2),
        cluster("zonemate", "us-east", "us-east-a", 2),
        cluster("east", "us-east", "us-east-a", 2),
    ]);
    w.health.observe_peer(
        &c("west"),
        PeerSignal::Up {
            rtt: Duration::from_millis(60),
        },
    );
    w.health.observe_peer(
        &c("north"),
        PeerSignal::Up {
            rtt: Duration::from_millis(20),
        },
    );
    for draw in [0, u64::MAX, 12345] {
        assert_eq!(
            w.order(draw),
            [
                "east",
                "zonemate",
                "south",
                "north",
                "west",
                "far-unmeasured"
            ],
            "draw {draw}"
        );
    }
    // Without a local export, the zone comes first; RTT changes reorder the far ones.
    w.clusters.retain(|s| s.cluster.as_str() != "east");
    w.health.observe_peer(
        &c("west"),
        PeerSignal::Up {
            rtt: Duration::from_millis(5),
        },
    );
    assert_eq!(
        w.order(0),
        ["zonemate", "south", "west", "north", "far-unmeasured"]
    );
}

#[test]
fn weights_and_failover_combine_within_and_across_levels() {
    let mut w = World::new(vec![
        cluster("east", "us-east", "us-east-a", 4),
        cluster("west", "us-west", "us-west-a", 4),
        cluster("north", "eu-north", "eu-north-a", 4),
    ]);
    w.policy.levels = levels(&[&[("west", 80), ("north", 20)], &[("east", 1)]]);
    let shares = w.first_choice_shares(20_000);
    assert!(near(shares["west"], 80.0, 1.5), "{shares:?}");
    assert!(near(shares["north"], 20.0, 1.5), "{shares:?}");
    assert!(!shares.contains_key("east"), "{shares:?}");
    // Retries follow: the other member of the level, then the next level.
    let d = w.decide(0);
    assert_eq!(d.order.len(), 3);
    assert_eq!(d.order[2].as_str(), "east");
    assert!(
        matches!(w.verdict("west"), Verdict::Candidate { level: 0, weight: 80, share_ppm, .. } if share_ppm == 800_000)
    );

    // The 80 % cluster dies: all of the level's traffic to the other.
    w.set("west", |s| s.endpoints_healthy = 0);
    let shares = w.first_choice_shares(2_000);
    assert_eq!(shares.get("north"), Some(&100.0), "{shares:?}");
    assert_eq!(
        w.verdict("west"),
        Verdict::Excluded(Excluded::NoHealthyEndpoints)
    );
    // The level is exhausted: the next level.
    w.set("north", |s| s.endpoints_healthy = 0);
    assert_eq!(w.order(0), ["east"]);
    assert_eq!(w.first_choice_shares(500).get("east"), Some(&100.0));
}

#[test]
fn a_level_spills_in_proportion_to_lost_capacity() {
    let mut w = World::new(vec![
        cluster("west", "us-west", "us-west-a", 10),
        cluster("north", "eu-north", "eu-north-a", 10),
    ]);
    w.policy.levels = levels(&[&[("west", 1)], &[("north", 1)]]);
    // (healthy endpoints of west out of 10, west's expected share in %)
    for (healthy, want) in [
        (10, 100.0),
        (8, 100.0),
        (7, 98.0),
        (5, 70.0),
        (2, 28.0),
        (1, 14.0),
    ] {
        w.set("west", |s| s.endpoints_healthy = healthy);
        let shares = w.first_choice_shares(20_000);
        let got = shares.get("west").copied().unwrap_or(0.0);
        assert!(
            near(got, want, 1.5),
            "{healthy}/10 healthy: west {got:.1} %, want {want} %"
        );
        assert!(
            near(
                got + shares.get("north").copied().unwrap_or(0.0),
                100.0,
                0.01
            ),
            "{shares:?}"
        );
    }
    // Both levels degraded below 100 % together: scaled up, nothing lost.
    w.set("west", |s| s.endpoints_healthy = 2); // 28 %
    w.set("north", |s| s.endpoints_healthy = 2); // 28 % of what is left
    let shares = w.first_choice_shares(20_000);
    assert!(near(shares["west"], 50.0, 1.5), "{shares:?}");
    assert_eq!(shares.get("<none>"), None, "{shares:?}");
    // Within a level, a half-healthy member weighs half.
    w.policy.levels = levels(&[&[("west", 1), ("north", 1)]]);
    w.set("west", |s| s.endpoints_healthy = 5);
    w.set("north", |s| s.endpoints_healthy = 10);
    let shares = w.first_choice_shares(20_000);
    assert!(near(shares["west"], 33.3, 1.5), "{shares:?}");
}

#[test]
fn every_exclusion_is_explained() {
    let mut w = World::new(vec![
        cluster("east", "us-east", "us-east-a", 2),
        cluster("forbids", "x", "x", 2),
        cluster("lowhealth", "x", "x", 10),
        cluster("nogateway", "x", "x", 2),
        cluster("peerdown", "x", "x", 2),
        cluster("busy", "x", "x", 2),
        cluster("drained", "x", "x", 2),
        cluster("failed", "x", "x", 2),
        cluster("ok", "x", "x", 2),
    ]);
    w.policy.min_healthy.percent = 50;
    w.policy.circuit.max_connections = 2;
    w.set("forbids", |s| s.allows_us = false);
    w.set("lowhealth", |s| s.endpoints_healthy = 4);
    w.set("nogateway", |s| s.gateways = 0);
    let down_since = w.t0;
    w.health
        .observe_peer(&c("peerdown"), PeerSignal::Down { since: down_since });
    for _ in 0..2 {
        w.health.attempt_started(&svc(), &c("busy"));
        w.health.attempt_finished(&svc(), &c("busy"), true);
    }
    w.drill(DrillKind::Drain, "drained", None);
    w.drill(DrillKind::Fail, "failed", Some("pay.prod"));
    w.drill(DrillKind::Fail, "ok", Some("ledger.prod")); // another service: no effect

    assert_eq!(w.order(0), ["east", "ok"]);
    let table = [
        ("forbids", Excluded::ForbidsUs),
        (
            "lowhealth",
            Excluded::BelowHealthyMinimum {
                healthy: 4,
                total: 10,
            },
        ),
        ("nogateway", Excluded::NoGateway),
        ("peerdown", Excluded::PeerDown { since: down_since }),
        (
            "busy",
            Excluded::CircuitOpen {
                active: 2,
                pending: 0,
            },
        ),
        (
            "drained",
            Excluded::DrainedByDrill {
                who: "ana".into(),
                why: "game day".into(),
                expires: 1_600,
            },
        ),
        (
            "failed",
            Excluded::FailedByDrill {
                who: "ana".into(),
                why: "game day".into(),
                expires: 1_600,
            },
        ),
    ];
    for (cluster, want) in table {
        assert_eq!(
            w.verdict(cluster),
            Verdict::Excluded(want.clone()),
            "{cluster}"
        );
        assert!(!want.to_string().is_empty());
    }
    // A policy naming only some clusters, and local-only.
    w.policy.levels = levels(&[&[("ok", 1)]]);
    assert_eq!(w.verdict("east"), Verdict::Excluded(Excluded::NotInPolicy));
    w.policy.levels.clear();
    w.policy.local_only = true;
    assert_eq!(w.order(0), ["east"]);
    assert_eq!(w.verdict("ok"), Verdict::Excluded(Excluded::LocalOnly));
    // Drills end by themselves.
    w.policy.local_only = false;
    w.unix_now += 600;
    assert!(matches!(w.verdict("drained"), Verdict::Candidate { .. }));
    assert!(matches!(w.verdict("failed"), Verdict::Candidate { .. }));
}

#[test]
fn a_pin_drill_sends_the_service_to_one_cluster_only() {
    let mut w = World::new(vec![
        cluster("east", "us-east", "us-east-a", 2),
        cluster("west", "us-west", "us-west-a", 2),
    ]);
    w.drill(DrillKind::Pin, "west", Some("pay.prod"));
    assert_eq!(w.order(0), ["west"]);
    assert!(matches!(
        w.verdict("east"),
        Verdict::Excluded(Excluded::PinnedElsewhere { ref to, .. }) if to.as_str() == "west"
    ));
    // Pinned to a dead cluster: nothing, rather than a silent move elsewhere.
    w.set("west", |s| s.endpoints_healthy = 0);
    assert!(w.order(0).is_empty());
}

#[test]
fn ejected_clusters_are_skipped_but_never_leave_nothing() {
    let mut w = World::new(vec![
        cluster("west", "us-west", "us-west-a", 2),
        cluster("north", "eu-north", "eu-north-a", 2),
    ]);
    let cfg = w.policy.outlier;
    let mut ejection = None;
    for _ in 0..cfg.consecutive_failures {
        ejection = w
            .health
            .record(&svc(), &c("west"), Outcome::Failure, 2, &cfg, w.now);
    }
    let until = ejection.expect("ejected").until;
    assert_eq!(w.order(0), ["north"]);
    assert_eq!(
        w.verdict("west"),
        Verdict::Excluded(Excluded::Ejected { until })
    );
    // North dies too: the ejected west is the last resort, marked as such.
    w.set("north", |s| s.endpoints_healthy = 0);
    assert_eq!(w.order(0), ["west"]);
    assert!(matches!(
        w.verdict("west"),
        Verdict::Candidate { rank: 0, note: Some(Note::LastResort { ejected_until }), .. } if ejected_until == until
    ));
}

#[test]
fn a_recovered_cluster_waits_out_its_hold_down_before_taking_traffic_back() {
    let mut w = World::new(vec![
        cluster("west", "us-west", "us-west-a", 2),
        cluster("north", "eu-north", "eu-north-a", 2),
    ]);
    w.policy.levels = levels(&[&[("west", 1)], &[("north", 1)]]);
    w.policy.failback_hold_down = Duration::from_secs(30);
    // West goes down, then comes back at t0 + 10 s.
    w.health.observe_available(&svc(), &c("west"), false, w.t0);
    w.health
        .observe_available(&svc(), &c("west"), true, w.t0 + Duration::from_secs(10));
    for (at, west_share) in [(10, 0.0), (25, 0.0), (39, 0.0), (40, 100.0), (100, 100.0)] {
        w.now = w.t0 + Duration::from_secs(at);
        let shares = w.first_choice_shares(1_000);
        assert_eq!(
            shares.get("west").copied().unwrap_or(0.0),
            west_share,
            "at {at} s: {shares:?}"
        );
    }
    // During the hold-down it is still a fallback, after everything else.
    w.now = w.t0 + Duration::from_secs(20);
    assert_eq!(w.order(0), ["north", "west"]);
    assert!(matches!(
        w.verdict("west"),
        Verdict::Candidate {
            note: Some(Note::HoldDown { .. }),
            ..
        }
    ));
}

/// Random worlds: invariants that hold whatever the state.
#[test]
fn invariants_hold_in_random_worlds() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let names = ["east", "west", "north", "south", "central", "edge"];
    for round in 0..3_000 {
        let mut w = World::new(
            names
                .iter()
                .map(|n| {
                    let total = rng.random_range(1..6);
                    let mut s = cluster(
                        n,
                        ["us-east", "us-west"][rng.random_range(0..2)],
                        "z",
                        total,
                    );
                    s.endpoints_healthy = rng.random_range(0..=total);
                    s.allows_us = rng.random_bool(0.9);
                    s.gateways = rng.random_range(0..3);
                    s
                })
                .collect(),
        );
        for n in names {
            if rng.random_bool(0.15) {
                w.drill(
                    [DrillKind::Drain, DrillKind::Fail][rng.random_range(0..2)],
                    n,
                    None,
                );
            }
            if rng.random_bool(0.2) {
                let cfg = w.policy.outlier;
                for _ in 0..cfg.consecutive_failures {
                    w.health
                        .record(&svc(), &c(n), Outcome::Failure, names.len(), &cfg, w.now);
                }
            }
        }
        if rng.random_bool(0.5) {
            let mut shuffled = names.to_vec();
            shuffled.sort_by_key(|_| rng.random::<u32>());
            w.policy.levels = levels(&[
                &[(shuffled[0], rng.random_range(0..5)), (shuffled[1], 3)],
                &[(shuffled[2], 1)],
                &[(shuffled[3], 1), (shuffled[4], 1)],
            ]);
        }
        let d = w.decide(rng.random());
        // One explanation per cluster; ranks are exactly the order.
        assert_eq!(d.explanations.len(), names.len(), "round {round}");
        for (rank, cluster) in d.order.iter().enumerate() {
            let e = d
                .explanations
                .iter()
                .find(|e| &e.cluster == cluster)
                .expect("explained");
            assert!(
                matches!(e.verdict, Verdict::Candidate { rank: r, .. } if r == rank),
                "round {round}: {e:?}"
            );
        }
        let candidates = d
            .explanations
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Candidate { .. }))
            .count();
        assert_eq!(candidates, d.order.len(), "round {round}");
        // Never a cluster that forbids us, that a drill took out, or with no healthy endpoint.
        for e in &d.explanations {
            if let Verdict::Excluded(x) = &e.verdict {
                assert!(
                    !d.order.contains(&e.cluster),
                    "round {round}: {x:?} yet ordered"
                );
            }
        }
        for cluster in &d.order {
            let s = w
                .clusters
                .iter()
                .find(|s| &s.cluster == cluster)
                .expect("known");
            assert!(
                s.allows_us && s.endpoints_healthy > 0,
                "round {round}: {s:?}"
            );
            assert!(
                !w.drills.iter().any(|dr| &dr.cluster == cluster),
                "round {round}: drilled {cluster}"
            );
        }
        // An ejected cluster is never first while a non-ejected candidate exists.
        if let Some(first) = d.order.first() {
            let ejected = w.health.ejected_until(&svc(), first, w.now).is_some();
            let alternative = d
                .order
                .iter()
                .any(|c| w.health.ejected_until(&svc(), c, w.now).is_none());
            assert!(
                !ejected || !alternative,
                "round {round}: ejected {first} first"
            );
        }
    }
}

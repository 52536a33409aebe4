//! What the failover decision costs per new connection, at 10 and 100 clusters exporting the
//! service, printed next to what a new connection costs anyway in the same run: one loopback
//! TCP connect + accept + close (the client's own connection to the VIP is at least that).
//!
//! Rows:
//! - `decide`: the pure decision alone (`meshup_policy::decide`).
//! - `per connection`: what the outbound proxy does before its first attempt once the route's
//!   catalog view is prepared (`Steering::plan`: lock the health state, count the connection
//!   for the retry budget, decide, note each cluster's availability, set the level gauge).
//! - `after a change`: the first connection after a catalog change also prepares the view
//!   (`route::serving` and `Steering::prepare`: clusters, policy, drills from the snapshot).
//!
//! Policies: none (the default locality order, one level per cluster), and two weighted
//! levels over every cluster; with one `drain` drill in force.
//!
//!   cargo run --release -p meshup-bench-decision [-- --iterations N]

use std::hint::black_box;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use meshup_core::catalog::{Change, ExportKey, Snapshot};
use meshup_core::model::{ExportRecord, GatewayRecord, PortSpec, Protocol, SCHEMA_VERSION};
use meshup_core::names::{ClusterName, DrillId, GatewayId, ServiceKey};
use meshup_core::policy::{DrillKind, DrillRecord, Level, Member, PolicyRecord};
use meshup_gateway::inbound::LocalExports;
use meshup_gateway::outbound::{Route, ServiceMetrics, Steering, serving};
use meshup_policy::{Health, Inputs, Locality, decide};

const PORT: u16 = 8080;

fn cluster(i: usize) -> ClusterName {
    ClusterName::new(&format!("c{i:03}")).expect("valid name")
}

/// A catalog where `n` clusters export pay.prod, one gateway each, in four regions.
fn snapshot(n: usize, policy: Option<PolicyRecord>, drill: bool) -> Snapshot {
    let svc: ServiceKey = "pay.prod".parse().expect("key");
    let mut s = Snapshot::new();
    for i in 1..=n {
        let c = cluster(i);
        let gw = GatewayId::new("gw-0").expect("id");
        s.apply(Change::PutGateway(Arc::new(GatewayRecord {
            schema: SCHEMA_VERSION,
            cluster: c.clone(),
            gateway_id: gw.clone(),
            region: format!("r{}", i % 4),
            zone: format!("r{}z{}", i % 4, i % 3),
            quic_addrs: vec![SocketAddr::from(([127, 0, 0, 1], 20_000 + i as u16))],
            spiffe_id: format!("spiffe://bench/cluster/{c}/gateway"),
            draining: false,
        })));
        s.apply(Change::PutExport(
            ExportKey {
                cluster: c,
                gateway: gw,
                service: svc.clone(),
            },
            Arc::new(ExportRecord {
                schema: SCHEMA_VERSION,
                ports: vec![PortSpec {
                    name: "http".into(),
                    port: PORT,
                    protocol: Protocol::Tcp,
                    app_protocol: Default::default(),
                    endpoint_protocol: Default::default(),
                }]
                .into(),
                endpoints_total: 4,
                endpoints_healthy: if i % 5 == 0 { 2 } else { 4 },
                allowed_callers: vec![],
                labels: Default::default(),
            }),
        ));
    }
    if let Some(p) = policy {
        s.apply(Change::PutPolicy(svc.clone(), Arc::new(p)));
    }
    if drill {
        s.apply(Change::PutDrill(
            DrillId::new("drain-c002").expect("id"),
            Arc::new(DrillRecord {
                schema: 1,
                schema_minor: 0,
                kind: DrillKind::Drain,
                cluster: cluster(2),
                service: None,
                who: "bench".into(),
                why: "measuring".into(),
                created: 0,
                expires: i64::MAX / 2,
            }),
        ));
    }
    s
}

/// Two weighted levels over all `n` clusters: the first half (weights 1..), then the rest.
fn weighted(n: usize) -> PolicyRecord {
    let member = |i: usize| Member {
        cluster: cluster(i),
        weight: 1 + (i % 7) as u32,
    };
    PolicyRecord {
        levels: vec![
            Level {
                clusters: (1..=n / 2).map(member).collect(),
            },
            Level {
                clusters: (n / 2 + 1..=n).map(member).collect(),
            },
        ],
        ..PolicyRecord::default()
    }
}

/// Nanoseconds per call of `f`, the best of 5 rounds of `iterations` calls.
fn per_call(iterations: u32, mut f: impl FnMut(u64)) -> f64 {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for i in 0..iterations {
                f(u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            }
            start.elapsed().as_nanos() as f64 / f64::from(iterations)
        })
        .fold(f64::INFINITY, f64::min)
}

/// Nanoseconds per loopback TCP connect + accept + close, the best of 5 rounds.
fn tcp_connect(iterations: u32) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").context("bind")?;
    let addr = listener.local_addr()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..iterations {
            let c = TcpStream::connect(addr)?;
            let (s, _) = listener.accept()?;
            drop(c);
            drop(s);
        }
        best = best.min(start.elapsed().as_nanos() as f64 / f64::from(iterations));
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let mut iterations: u32 = 20_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--iterations" => {
                iterations = args
                    .next()
                    .context("--iterations needs a number")?
                    .parse()
                    .context("--iterations needs a number")?;
            }
            other => anyhow::bail!("unknown argument {other:?} (try --iterations N)"),
        }
    }
    let local = Locality {
        cluster: ClusterName::new("c000").expect("name"),
        region: "r0".into(),
        zone: "r0z0".into(),
    };
    let svc: ServiceKey = "pay.prod".parse().expect("key");
    let route = Route {
        service: svc.clone(),
        port: PORT,
        target: None,
    };
    let exports = LocalExports::new();
    // The whole run's connect figure, measured first and last so noise shows.
    let tcp_before = tcp_connect(iterations.min(5_000))?;

    println!("failover decision per new connection (best of 5 × {iterations} calls)\n");
    println!(
        "{:<9} {:<20} {:>10} {:>13} {:>15} {:>16}",
        "clusters", "policy", "decide ns", "per conn. ns", "after change ns", "per conn. / TCP"
    );
    let mut rows = Vec::new();
    for n in [10usize, 100] {
        for (name, policy, drill) in [
            ("default (locality)", None, false),
            ("2 weighted levels", Some(weighted(n)), false),
            ("2 levels + drill", Some(weighted(n)), true),
        ] {
            let snap = snapshot(n, policy.clone(), drill);
            let serving_now = serving(&snap, &local.cluster, &exports, &route);
            let policy = policy.unwrap_or_default();
            let drills: Vec<DrillRecord> = snap.drills().map(|(_, d)| (**d).clone()).collect();
            let health = Health::new(Instant::now());
            let decide_ns = per_call(iterations, |draw| {
                black_box(decide(&Inputs {
                    service: &svc,
                    local: &local,
                    policy: &policy,
                    clusters: &serving_now.states,
                    health: &health,
                    drills: &drills,
                    now: Instant::now(),
                    unix_now: 1_800_000_000,
                    draw,
                }));
            });
            let steering = Steering::new(local.clone(), ServiceMetrics::default());
            let prepared = Arc::new(steering.prepare(
                &snap,
                &svc,
                serving(&snap, &local.cluster, &exports, &route),
            ));
            let plan_ns = per_call(iterations, |_| {
                black_box(steering.plan(&svc, prepared.clone()));
            });
            let change_ns = per_call(iterations, |_| {
                let s = serving(&snap, &local.cluster, &exports, &route);
                let p = Arc::new(steering.prepare(&snap, &svc, s));
                black_box(steering.plan(&svc, p));
            });
            rows.push((n, name, decide_ns, plan_ns, change_ns));
        }
    }
    let tcp_after = tcp_connect(iterations.min(5_000))?;
    let tcp = (tcp_before + tcp_after) / 2.0;
    for (n, name, decide_ns, plan_ns, change_ns) in rows {
        println!(
            "{:<9} {:<20} {:>10.0} {:>13.0} {:>15.0} {:>15.3}×",
            n,
            name,
            decide_ns,
            plan_ns,
            change_ns,
            plan_ns / tcp
        );
    }
    println!(
        "\nloopback TCP connect + accept + close, same run: {:.0} ns (before {:.0}, after {:.0})",
        tcp, tcp_before, tcp_after
    );
    Ok(())
}

//! etcd faults under load, with real gateway processes on a real three-member etcd
//! (docs/reliability.md, "etcd fault scenarios"; promises 1, 2, 3 and 6):
//!
//! - **leader killed**: kill -9 of the etcd leader while the catalog churns and traffic
//!   flows. Must hold: no request fails; a catalog change made after the new leader is
//!   visible in the other cluster's gateway within 3 s of the election; no gateway relists;
//!   no gateway or export record is missing from etcd for longer than the lease TTL.
//! - **quorum lost**: the two followers of the three members stopped (SIGSTOP: a
//!   partition, see `meshup_tests::EtcdCluster`) for 60 s, then back. Must hold: every DNS answer is the one
//!   from before, no request fails; the staleness gauge rises during the outage and falls
//!   back after; a change made while quorum was lost, and one made right after it returned,
//!   are visible in the other gateway within 3 s of the return. Quorum has returned when
//!   etcd commits a write again: the resumed members' own word for who leads can be stale.
//! - **quorum lost with the leader**: the leader and one follower stopped for 20 s. The same
//!   promises; on the return etcd revokes every lease, so the records may be missing from
//!   etcd for up to the withdrawal grace, and peers keep answering and routing meanwhile.
//!
//! Set-up: clusters east (the client side, no exports) and west (exports `echo.prod`, backed
//! by an echo server), one gateway each, both given all three etcd endpoints. The workload
//! (`meshup_tests::workload`) opens new connections to east's VIP for `echo.prod` and checks
//! every echo. Catalog changes are export edits in west's config file, applied by its
//! reload (as an operator makes them), published by west, seen through east's admin view.
//!
//! `MESHUP_FAULT_SCALE` (a factor ≥ 1, default 1) lengthens every phase for a run by hand:
//! `MESHUP_FAULT_SCALE=5` runs a 5-minute quorum loss. Figures are printed before any
//! assertion (run with `--no-capture` to see them when it passes).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshup_tests::gateways::{
    Certs, GatewayProcess, GatewaySpec, LEASE_TTL, export_entry, metric_in, replace_file,
};
use meshup_tests::sampler::{Sample, Sampler, dig_loop, longest_false};
use meshup_tests::workload::{EchoServer, FaultFigures, Outcome, Workload, check, ms};
use meshup_tests::{EtcdCluster, eventually_ok, http, poll_until};

const SERVICE: &str = "echo.prod";
const DNS_NAME: &str = "echo.prod.svc.clusterset.local";
const PORT: u16 = 7000;
/// The promise: a change is visible in the other cluster this long after etcd is back.
const CONVERGED_WITHIN: Duration = Duration::from_secs(3);
/// The workload: 4 loops × 25 new connections per second.
const LOOPS: usize = 4;
const RATE_PER_LOOP: f64 = 25.0;
/// Catalog churn: one export edit of west's config this often (each adds one export and
/// removes another: two record changes).
const CHURN_EVERY: Duration = Duration::from_millis(400);
/// How often east's admin view, the metrics and etcd's keys are sampled.
const VIEW_EVERY: Duration = Duration::from_millis(50);
const METRIC_EVERY: Duration = Duration::from_millis(250);
const KEYS_EVERY: Duration = Duration::from_millis(100);
const DIG_EVERY: Duration = Duration::from_millis(100);

/// Both scenarios measure time on a shared 2-core machine: they take turns (under nextest
/// the `real-etcd` group runs one at a time anyway).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `MESHUP_FAULT_SCALE`: how many times longer every phase runs (default 1).
fn scale() -> f64 {
    match std::env::var("MESHUP_FAULT_SCALE") {
        Err(_) => 1.0,
        Ok(v) => match v.parse::<f64>() {
            Ok(f) if f >= 1.0 && f.is_finite() => f,
            _ => panic!("MESHUP_FAULT_SCALE={v:?}: give a factor of at least 1, e.g. 5"),
        },
    }
}

fn scaled(d: Duration) -> Duration {
    d.mul_f64(scale())
}

/// East and west on a three-member etcd.
struct Federation {
    etcd: EtcdCluster,
    east: GatewayProcess,
    west: GatewayProcess,
    echo: EchoServer,
    /// East's VIP and port for `echo.prod`.
    vip: SocketAddr,
    prefix: String,
    /// West's config file up to and including `exports:`.
    west_head: String,
    _certs: Certs,
}

impl Federation {
    async fn start(prefix: &str, vip_octet: u8) -> Self {
        let etcd = tokio::task::spawn_blocking(EtcdCluster::start)
            .await
            .expect("etcd start task");
        let certs = Certs::new(&["east", "west"]);
        let echo = EchoServer::start().await.expect("echo server");
        let (east_cidr, west_cidr) = (
            format!("127.{vip_octet}.1.0/24"),
            format!("127.{vip_octet}.2.0/24"),
        );
        let mut west = GatewayProcess::start(GatewaySpec {
            exports: vec![("echo", "prod", PORT, echo.addr())],
            ..GatewaySpec::new("west", &west_cidr, &etcd, &certs, prefix)
        });
        let mut east =
            GatewayProcess::start(GatewaySpec::new("east", &east_cidr, &etcd, &certs, prefix));
        west.wait_ready().await;
        east.wait_ready().await;
        let vip = east.wait_routable(SERVICE, PORT).await;
        let config = west.config_text();
        let at = config
            .find("exports:\n")
            .expect("west's config lists exports")
            + 9;
        let west_head = config[..at].to_owned();
        Self {
            etcd,
            east,
            west,
            echo,
            vip,
            prefix: prefix.to_owned(),
            west_head,
            _certs: certs,
        }
    }

    /// West's config file with `echo.prod` and the extra exports `names`.
    fn west_exports(&self, names: &[String]) -> String {
        exports_config(&self.west_head, self.echo.addr(), names)
    }

    /// The services east's admin view lists, every [`VIEW_EVERY`].
    fn sample_east_view(&self) -> Sampler<Option<BTreeSet<String>>> {
        let admin = self.east.admin_addr();
        Sampler::start(VIEW_EVERY, move || service_names(admin).ok())
    }

    /// `metric` of both gateways, every [`METRIC_EVERY`]: (east, west).
    fn sample_metric(&self, metric: &'static str) -> Sampler<(Option<f64>, Option<f64>)> {
        let (east, west) = (self.east.admin_addr(), self.west.admin_addr());
        Sampler::start(METRIC_EVERY, move || {
            (metric_at(east, metric).ok(), metric_at(west, metric).ok())
        })
    }

    /// The keys under `<prefix>/v1/clusters/` in etcd (through every member), every
    /// [`KEYS_EVERY`]; `None` when etcd did not answer (no leader to read from).
    fn sample_keys(&self) -> Sampler<Option<BTreeSet<String>>> {
        let endpoints = self.etcd.endpoints();
        let prefix = format!("{}/v1/clusters/", self.prefix);
        Sampler::start(KEYS_EVERY, move || {
            meshup_tests::etcdctl_at(
                &endpoints,
                &[
                    "--command-timeout=1s",
                    "get",
                    "--prefix",
                    "--keys-only",
                    &prefix,
                ],
                None,
            )
            .ok()
            .map(|out| {
                out.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(str::to_owned)
                    .collect()
            })
        })
    }

    /// The records that must never be missing for long: each gateway's own record and
    /// west's `echo.prod` export.
    fn lasting_records(&self) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}/v1/clusters/east/gateways/east-0"),
            format!("{p}/v1/clusters/west/gateways/west-0"),
            format!("{p}/v1/clusters/west/gateways/west-0/exports/prod/echo"),
        ]
    }

    /// A counter of both gateways now: (east, west).
    fn counters(&self, metric: &str) -> (f64, f64) {
        let read = |g: &GatewayProcess| {
            g.metric(metric)
                .unwrap_or_else(|e| panic!("{metric} of {}: {e:#}", g.cluster()))
        };
        (read(&self.east), read(&self.west))
    }
}

/// A config file: `head` (up to and including `exports:`), then `echo.prod` and the extra
/// exports `names` (namespace prod), all served by `echo`.
fn exports_config(head: &str, echo: SocketAddr, names: &[String]) -> String {
    let mut text = head.to_owned();
    text.push_str(&export_entry("echo", "prod", PORT, echo));
    for name in names {
        text.push_str(&export_entry(name, "prod", PORT, echo));
    }
    text
}

/// The service names a gateway's `/status` lists.
fn service_names(admin: SocketAddr) -> anyhow::Result<BTreeSet<String>> {
    let (code, body) = http::get(admin, "/status")?;
    anyhow::ensure!(code == 200, "/status answered {code}");
    let status: serde_json::Value = serde_json::from_str(&body)?;
    Ok(status["services"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

fn metric_at(admin: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (code, body) = http::get(admin, "/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    metric_in(&body, name)
}

fn workload(vip: SocketAddr, limit: Duration) -> Workload {
    let mut w = Workload::new(vip, LOOPS, RATE_PER_LOOP);
    w.limit = limit;
    w
}

/// Waits until the workload has `n` successes (the path is warm).
async fn warm(running: &meshup_tests::workload::Running, n: usize) {
    eventually_ok(
        "the workload gets through east",
        Duration::from_secs(20),
        || async {
            let ok = running.successes_since(Duration::ZERO);
            anyhow::ensure!(ok >= n, "{ok} successes");
            Ok(())
        },
    )
    .await;
}

/// Every failed attempt, whatever the phase.
fn failures(f: &FaultFigures) -> usize {
    f.before.failures() + f.first.failures() + f.after.failures()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn since(later: Option<Instant>, earlier: Instant) -> String {
    later.map_or_else(
        || "NOT SEEN".to_owned(),
        |t| secs(t.saturating_duration_since(earlier)),
    )
}

/// The catalog promises every scenario shares: no gateway relisted, and no record missing
/// from etcd longer than `bound` (the lease TTL, or the withdrawal grace where etcd revokes
/// the leases; `when` qualifies the absence in the message).
fn catalog_kept(
    missed: &mut Vec<String>,
    (relists_before, relists_after): ((f64, f64), (f64, f64)),
    (records, missing, bound): (&[String], &[Duration], Duration),
    when: &str,
) {
    if relists_after != relists_before {
        missed.push(format!(
            "a gateway relisted: (east, west) {relists_before:?} → {relists_after:?}"
        ));
    }
    for (r, d) in records.iter().zip(missing) {
        if *d > bound {
            missed.push(format!(
                "{r} was missing from etcd for {d:?}{when} > {bound:?}"
            ));
        }
    }
}

fn absences(keys: &[Sample<Option<BTreeSet<String>>>], records: &[String]) -> Vec<Duration> {
    records
        .iter()
        .map(|r| longest_false(keys, |k| k.as_ref().map(|k| k.contains(r))))
        .collect()
}

// === leader killed ===

/// One churn step: the step number and when west's config was written.
type Step = u64;

fn churn_names(step: Step) -> Vec<String> {
    // Step n lists churn-(n-1) and churn-n: each step adds one export and removes one.
    (step.saturating_sub(1)..=step)
        .map(|n| format!("churn-{n}"))
        .collect()
}

/// When east first listed a churn export of step `step` or later, at or after `from`.
fn seen_step(
    view: &[Sample<Option<BTreeSet<String>>>],
    from: Instant,
    step: Step,
) -> Option<Instant> {
    view.iter()
        .find(|(at, names)| {
            *at >= from
                && names.as_ref().is_some_and(|names| {
                    names.iter().any(|n| {
                        n.strip_prefix("churn-")
                            .and_then(|n| n.strip_suffix(".prod"))
                            .and_then(|n| n.parse::<Step>().ok())
                            .is_some_and(|n| n >= step)
                    })
                })
        })
        .map(|(at, _)| *at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_killed_under_catalog_churn_and_traffic() {
    let _turn = SERIAL.lock().await;
    let mut fed = Federation::start("/leader-kill", 91).await;
    let relists_before = fed.counters("meshup_catalog_relists_total");
    let grants_before = fed.counters("meshup_catalog_lease_grants_total");
    let restarts_before = fed.counters("meshup_catalog_watch_restarts_total");
    let keys = fed.sample_keys();
    let view = fed.sample_east_view();
    let churn = {
        let (config, head, echo) = (
            fed.west.config_path().to_owned(),
            fed.west_head.clone(),
            fed.echo.addr(),
        );
        let mut step: Step = 0;
        Sampler::start(CHURN_EVERY, move || {
            step += 1;
            replace_file(&config, &exports_config(&head, echo, &churn_names(step)));
            step
        })
    };
    let before_fault = scaled(Duration::from_secs(4));
    let after_fault = scaled(Duration::from_secs(12));
    let running = workload(
        fed.vip,
        before_fault + after_fault + Duration::from_secs(60),
    )
    .start();
    warm(&running, 20).await;
    tokio::time::sleep(before_fault).await;

    // The fault: kill -9 of the leader, then the first instant a new one is seen.
    let (old, killed_at, (new, elected_at)) = tokio::task::block_in_place(|| {
        let old = fed
            .etcd
            .wait_leader(None, Duration::from_secs(10))
            .expect("a leader before the fault")
            .0;
        let killed_at = fed.etcd.kill9(old);
        let new = fed
            .etcd
            .wait_leader(Some(old), Duration::from_secs(20))
            .expect("a new leader after kill -9 of the old one");
        (old, killed_at, new)
    });
    // The first churn step written after the election, and when east lists it.
    let first_after = eventually_ok(
        "a churn step written after the election",
        Duration::from_secs(10),
        || async {
            churn
                .samples()
                .into_iter()
                .find(|(at, _)| *at >= elected_at)
                .ok_or("none yet")
        },
    )
    .await;
    let seen_after_election = poll_until(Duration::from_secs(15), || async {
        seen_step(&view.samples(), elected_at, first_after.1).is_some()
    })
    .await;
    let end = killed_at + after_fault;
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    let fault = running.offset(killed_at);
    let outcomes: Vec<Outcome> = running.stop().await;
    let steps = churn.stop();
    // The last steps need a moment to reach east before the view stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let view = view.stop();
    let keys = keys.stop();
    let relists_after = fed.counters("meshup_catalog_relists_total");
    let grants_after = fed.counters("meshup_catalog_lease_grants_total");
    let restarts_after = fed.counters("meshup_catalog_watch_restarts_total");
    let figures = check(&outcomes, fault, elected_at - killed_at + CONVERGED_WITHIN);
    let converged = seen_step(&view, elected_at, first_after.1).map(|t| t - elected_at);
    // Churn lag (write → east lists it) of every step before the fault and after the
    // election: the steady state beside the fault.
    let lag = |from: Instant, to: Instant| -> Vec<Duration> {
        let mut lags: Vec<Duration> = steps
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .filter_map(|(at, step)| seen_step(&view, *at, *step).map(|seen| seen - *at))
            .collect();
        lags.sort_unstable();
        lags
    };
    let lag_text = |lags: &[Duration]| {
        format!(
            "{} steps, p50 {}, max {}",
            lags.len(),
            ms(lags.get(lags.len() / 2).copied()),
            ms(lags.last().copied())
        )
    };
    let lag_before = lag(running_origin_floor(&steps), killed_at);
    let lag_after = lag(elected_at, end - Duration::from_secs(1));
    let records = fed.lasting_records();
    let missing = absences(&keys, &records);
    let unknown_keys = keys.iter().filter(|(_, k)| k.is_none()).count();
    eprintln!(
        "\n=== etcd leader killed (kill -9) under catalog churn and traffic (scale {})\n{figures}\n\
         total failed: {}\n\
         leader: member {old} killed; member {new} elected after {}\n\
         catalog converged (election → first change written after it listed by east): {}\n\
         churn lag before the fault: {}\n\
         churn lag after the election: {}\n\
         churn steps written: {} (one every {CHURN_EVERY:?}, 2 record changes each)\n\
         relists (east, west): before {relists_before:?}, after {relists_after:?}\n\
         watch restarts (east, west): before {restarts_before:?}, after {restarts_after:?}\n\
         lease grants (east, west): before {grants_before:?}, after {grants_after:?}\n\
         longest a record was missing from etcd (TTL {LEASE_TTL:?}):\n{}\n\
         etcd key samples: {} ({unknown_keys} without an answer)\n",
        scale(),
        failures(&figures),
        secs(elected_at - killed_at),
        converged.map_or_else(|| "NOT SEEN".to_owned(), secs),
        lag_text(&lag_before),
        lag_text(&lag_after),
        steps.len(),
        records
            .iter()
            .zip(&missing)
            .map(|(r, d)| format!("  {r}: {}", secs(*d)))
            .collect::<Vec<_>>()
            .join("\n"),
        keys.len(),
    );

    let mut missed = Vec::new();
    if failures(&figures) > 0 {
        missed.push(format!("{} requests failed; must be 0", failures(&figures)));
    }
    if figures.first.attempts == 0 || figures.after.attempts == 0 {
        missed.push("too few attempts during or after the fault to judge".to_owned());
    }
    match converged {
        Some(c) if seen_after_election && c <= CONVERGED_WITHIN => {}
        other => missed.push(format!(
            "catalog converged {other:?} after the new leader; must be ≤ {CONVERGED_WITHIN:?}"
        )),
    }
    catalog_kept(
        &mut missed,
        (relists_before, relists_after),
        (&records, &missing, LEASE_TTL),
        "",
    );
    if keys.iter().all(|(_, k)| k.is_none()) {
        missed.push("etcd's keys were never read: the record check saw nothing".to_owned());
    }
    assert!(
        missed.is_empty(),
        "leader kill: missed {} promise(s):\n- {}\n--- east's log (tail):\n{}\n--- west's log (tail):\n{}",
        missed.len(),
        missed.join("\n- "),
        tail(&fed.east.log_text(), 30),
        tail(&fed.west.log_text(), 30),
    );
}

// === quorum lost ===

/// A value of both gateways: (east, west).
type Pair = (Option<f64>, Option<f64>);

/// The largest value of `pick` among samples taken in `[from, to)`.
fn max_between(
    samples: &[Sample<(Option<f64>, Option<f64>)>],
    from: Instant,
    to: Instant,
    pick: impl Fn(&(Option<f64>, Option<f64>)) -> Option<f64>,
) -> Option<f64> {
    samples
        .iter()
        .filter(|(at, _)| *at >= from && *at < to)
        .filter_map(|(_, v)| pick(v))
        .reduce(f64::max)
}

/// The first sample at or after `from` whose `pick` is at most `bound`.
fn first_at_most(
    samples: &[Sample<(Option<f64>, Option<f64>)>],
    from: Instant,
    bound: f64,
    pick: impl Fn(&(Option<f64>, Option<f64>)) -> Option<f64>,
) -> Option<Instant> {
    samples
        .iter()
        .find(|(at, v)| *at >= from && pick(v).is_some_and(|x| x <= bound))
        .map(|(at, _)| *at)
}

/// Which two of the three members a quorum loss stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stopped {
    /// The followers: the leader, alone, loses its quorum and steps down; no lease is
    /// revoked.
    Followers,
    /// The leader and one follower: when they resume, the old leader still holds its term
    /// with the resumed follower and revokes every lease it thinks expired, so every
    /// gateway's records vanish until it publishes them again. Peers with a live link keep
    /// answering and routing through the withdrawal grace (docs/records.md).
    LeaderAndFollower,
}

impl Stopped {
    /// The longest a lasting record may be missing from etcd after the return.
    fn absence_bound(self) -> Duration {
        match self {
            Stopped::Followers => LEASE_TTL,
            Stopped::LeaderAndFollower => meshup_federation::grace::DEFAULT_WITHDRAWAL_GRACE,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_quorum_lost_for_60s_then_restored() {
    quorum_lost(
        Stopped::Followers,
        Duration::from_secs(60),
        "/quorum-loss",
        92,
    )
    .await;
}

/// The other way to lose quorum: the leader and a follower stopped (shorter: what differs is
/// the return, when the leases are revoked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_leader_and_a_follower_stopped_for_20s_then_restored() {
    quorum_lost(
        Stopped::LeaderAndFollower,
        Duration::from_secs(20),
        "/quorum-loss-leader",
        93,
    )
    .await;
}

async fn quorum_lost(which: Stopped, outage: Duration, prefix: &str, vip_octet: u8) {
    let _turn = SERIAL.lock().await;
    let mut fed = Federation::start(prefix, vip_octet).await;
    let outage = scaled(outage);
    let before_fault = scaled(Duration::from_secs(4));
    let after_return = scaled(Duration::from_secs(8));
    let relists_before = fed.counters("meshup_catalog_relists_total");
    let dns = fed.east.dns_addr().await;
    let expected = vec![fed.vip.ip()];
    let digs = dig_loop(dns, DNS_NAME, DIG_EVERY);
    let staleness = fed.sample_metric("meshup_catalog_staleness_seconds");
    let view = fed.sample_east_view();
    let keys = fed.sample_keys();
    let running = workload(
        fed.vip,
        before_fault + outage + after_return + Duration::from_secs(60),
    )
    .start();
    warm(&running, 20).await;
    tokio::time::sleep(before_fault).await;

    // The fault: two members stop answering (SIGSTOP); the one left loses its quorum.
    let (stopped, fault_at) = tokio::task::block_in_place(|| {
        let leader = fed
            .etcd
            .wait_leader(None, Duration::from_secs(10))
            .expect("a leader before the fault")
            .0;
        let first = match which {
            Stopped::Followers => 1,
            Stopped::LeaderAndFollower => 0,
        };
        let members = [first, 2].map(|k| (leader + k) % meshup_tests::etcd_cluster::MEMBERS);
        let at = fed.etcd.stop(members[0]);
        fed.etcd.stop(members[1]);
        (members, at)
    });
    // Halfway through, an operator adds an export on west: the change waits for etcd.
    tokio::time::sleep(outage / 2).await;
    let pending_at = Instant::now();
    fed.west
        .write_config(&fed.west_exports(&["pending".to_owned()]));
    tokio::time::sleep((fault_at + outage).saturating_duration_since(Instant::now())).await;

    // Back: both members resume; quorum is back at the first write etcd commits. The
    // members' own word for who leads comes first and can be stale (`wait_writable`).
    let (returned_at, (leader_after, named_at), quorum_at) = tokio::task::block_in_place(|| {
        let at = fed.etcd.resume(stopped[0]);
        fed.etcd.resume(stopped[1]);
        let leader = fed
            .etcd
            .wait_leader(None, Duration::from_secs(30))
            .expect("a leader once two members answer again");
        let writable = fed
            .etcd
            .wait_writable(Duration::from_secs(30))
            .expect("a write committed once two members answer again");
        (at, leader, writable)
    });
    // Right after the return, another change.
    let after_at = Instant::now();
    fed.west
        .write_config(&fed.west_exports(&["pending".to_owned(), "after".to_owned()]));
    let listed = |name: &'static str| {
        move |names: &Option<BTreeSet<String>>| names.as_ref().is_some_and(|n| n.contains(name))
    };
    poll_until(Duration::from_secs(15), || async {
        view.first_since(after_at, listed("after.prod")).is_some()
    })
    .await;
    // Counted from the election, not the resume: etcd's election after a long stop took
    // 1.7–3.5 s in most runs and once 9.5 s, which left this window no time after it.
    let end = quorum_at + after_return;
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    let fault = running.offset(fault_at);
    let outcomes: Vec<Outcome> = running.stop().await;
    let digs = digs.stop();
    let staleness = staleness.stop();
    let view = view.stop();
    let keys = keys.stop();
    let relists_after = fed.counters("meshup_catalog_relists_total");

    let figures = check(&outcomes, fault, returned_at - fault_at);
    let first = |from: Instant, name: &'static str| {
        view.iter()
            .find(|(at, v)| *at >= from && listed(name)(v))
            .map(|(at, _)| *at)
    };
    let pending_seen = first(pending_at, "pending.prod");
    let after_seen = first(after_at, "after.prod");
    let wrong: Vec<String> = digs
        .iter()
        .filter(|(_, a)| a.as_ref().ok() != Some(&expected))
        .map(|(at, a)| {
            format!(
                "{:.2} s after the fault: {a:?}",
                at.saturating_duration_since(fault_at).as_secs_f64()
            )
        })
        .collect();
    let east = |v: &(Option<f64>, Option<f64>)| v.0;
    let west = |v: &(Option<f64>, Option<f64>)| v.1;
    let start = staleness.first().map_or(fault_at, |s| s.0);
    let normal = |pick: fn(&Pair) -> Option<f64>| {
        max_between(&staleness, start, fault_at, pick).unwrap_or(0.0)
    };
    let (normal_east, normal_west) = (normal(east), normal(west));
    let peak_east = max_between(&staleness, fault_at, returned_at, east);
    let peak_west = max_between(&staleness, fault_at, returned_at, west);
    // Fallen back: at most the largest value seen before the fault, plus one sample period.
    let bound = |normal: f64| normal + METRIC_EVERY.as_secs_f64();
    let fell_east = first_at_most(&staleness, quorum_at, bound(normal_east), east);
    let fell_west = first_at_most(&staleness, quorum_at, bound(normal_west), west);
    let records = fed.lasting_records();
    let missing = absences(
        &keys
            .iter()
            .filter(|(at, _)| *at >= quorum_at)
            .cloned()
            .collect::<Vec<_>>(),
        &records,
    );
    let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2} s"));
    eprintln!(
        "\n=== etcd quorum lost for {} ({which:?}: members {stopped:?} of 3 stopped), then restored (scale {})\n{figures}\n\
         total failed: {}\n\
         quorum back: member {leader_after} named leader {} after the members resumed, the first write committed {} after\n\
         DNS answers checked: {} ({} not {expected:?})\n\
         staleness (east, west): normal max {normal_east:.2} s, {normal_west:.2} s; peak during {}, {}; \
         back to normal {}, {} after quorum returned\n\
         change made during the outage listed by east: {} after quorum returned\n\
         change made right after the return listed by east: {} after it was made ({} after quorum returned)\n\
         relists (east, west): before {relists_before:?}, after {relists_after:?}\n\
         longest a record was missing from etcd after the return:\n{}\n",
        secs(outage),
        scale(),
        failures(&figures),
        secs(named_at - returned_at),
        secs(quorum_at - returned_at),
        digs.len(),
        wrong.len(),
        fmt(peak_east),
        fmt(peak_west),
        since(fell_east, quorum_at),
        since(fell_west, quorum_at),
        since(pending_seen, quorum_at),
        since(after_seen, after_at),
        since(after_seen, quorum_at),
        records
            .iter()
            .zip(&missing)
            .map(|(r, d)| format!("  {r}: {}", secs(*d)))
            .collect::<Vec<_>>()
            .join("\n"),
    );

    let mut missed = Vec::new();
    if failures(&figures) > 0 {
        missed.push(format!("{} requests failed; must be 0", failures(&figures)));
    }
    if figures.first.attempts == 0 || figures.after.attempts == 0 {
        missed.push("too few attempts during or after the outage to judge".to_owned());
    }
    if !wrong.is_empty() || digs.is_empty() {
        missed.push(format!(
            "{} of {} DNS answers differ from {expected:?}: {:?}",
            wrong.len(),
            digs.len(),
            &wrong[..wrong.len().min(5)]
        ));
    }
    // Rises: by the end of the outage it says the catalog is at least half the outage old.
    let half = outage.as_secs_f64() / 2.0;
    for (who, peak, fell) in [
        ("east", peak_east, fell_east),
        ("west", peak_west, fell_west),
    ] {
        if peak.is_none_or(|p| p < half) {
            missed.push(format!(
                "{who}'s staleness peaked at {} during a {outage:?} outage; must pass {half:.0} s",
                fmt(peak)
            ));
        }
        match fell {
            Some(t) if t - quorum_at <= CONVERGED_WITHIN => {}
            other => missed.push(format!(
                "{who}'s staleness fell back {} after quorum returned; must be ≤ {CONVERGED_WITHIN:?}",
                since(other, quorum_at)
            )),
        }
    }
    match pending_seen {
        Some(t) if t.saturating_duration_since(quorum_at) <= CONVERGED_WITHIN => {}
        other => missed.push(format!(
            "the change made during the outage was listed {} after quorum returned; must be ≤ {CONVERGED_WITHIN:?}",
            since(other, quorum_at)
        )),
    }
    match after_seen {
        Some(t) if t - after_at <= CONVERGED_WITHIN => {}
        other => missed.push(format!(
            "the change made after the return was listed {} after it was made; must be ≤ {CONVERGED_WITHIN:?}",
            since(other, after_at)
        )),
    }
    catalog_kept(
        &mut missed,
        (relists_before, relists_after),
        (&records, &missing, which.absence_bound()),
        " after the return",
    );
    assert!(
        missed.is_empty(),
        "quorum loss ({which:?}): missed {} promise(s):\n- {}\n--- east's catalog log (tail):\n{}\n--- west's catalog log (tail):\n{}",
        missed.len(),
        missed.join("\n- "),
        tail(&catalog_lines(&fed.east.log_text()), 150),
        tail(&catalog_lines(&fed.west.log_text()), 80),
    );
}

/// The first churn step's instant (steps before it have no view to compare with).
fn running_origin_floor(steps: &[Sample<Step>]) -> Instant {
    steps.first().map_or_else(Instant::now, |s| s.0)
}

/// The lines of a gateway's log about its catalog (the store client, watcher, publisher and
/// withdrawal grace).
fn catalog_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("meshup_federation") || l.contains("grace"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! The fault phases of a size (issue #15's last two targets), run on the joined gateway after
//! the change → DNS probes:
//!
//! - **leader kill under churn**: the etcd leader is killed (SIGKILL) while the background
//!   churn writes 100 changes/s; a marker export is written as soon as a write commits
//!   again, and the joiner has converged once its catalog revision reaches the marker's.
//!   Printed: kill → a write committed, kill → the joiner at that revision, kill → its DNS
//!   answers the marker, the joiner's relists (target: converged ≤ 3 s, no relist).
//! - **stale while down**: every etcd member is killed for `--outage` seconds and started
//!   again on its data dir. A sample of clusterset names is asked of the joiner's DNS before
//!   and throughout: every answer must stay what it was, the VIP listeners stay bound, and
//!   after the restart the joiner catches up with at most one relist.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use meshup_core::catalog::ExportKey;
use meshup_core::model::encode;
use meshup_core::names::{ClusterName, ServiceKey};
use meshup_federation::keys::KeyLayout;
use meshup_federation::store::{Revision, Store, Txn, TxnOp};
use meshup_tests::dns::query_a;
use meshup_tests::gateways::GatewayProcess;
use meshup_tests::scale::{NAMESPACE, clusterset_name, export_record, gateway_id, service};
use meshup_tests::{EtcdCluster, poll_every};

use crate::PROBE_CLUSTER;

const RELISTS: &str = "meshup_catalog_relists_total";
const REVISION: &str = "meshup_catalog_revision";
const LISTENERS: &str = "meshup_tunnel_listeners";
const EXPORTS: &str = "meshup_catalog_exports";
/// Longest wait for a write to commit, the joiner to converge, or a name to be answered.
const CONVERGE_WAIT: Duration = Duration::from_secs(30);
/// Clusterset names asked of the joiner's DNS during the outage.
const SAMPLE_NAMES: usize = 100;
/// Pause between two sweeps over the sample.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// What the leader kill showed.
#[derive(Debug, Default)]
pub struct LeaderKill {
    /// Kill → the marker write committed (an election and the client finding the leader).
    pub committed: Option<Duration>,
    /// Kill → the joiner's catalog at the marker's revision.
    pub converged: Option<Duration>,
    /// Kill → the joiner's DNS answers the marker (its VIP allocated, a second write).
    pub answered: Option<Duration>,
    pub relists: f64,
    /// Churn writes that failed from the kill until the joiner converged.
    pub churn_errors: u64,
}

/// What the outage showed.
#[derive(Debug, Default)]
pub struct Outage {
    pub length: Duration,
    /// Restart until every member was healthy.
    pub restart: Duration,
    /// Names asked, sweeps over them during the outage, answers that differed.
    pub names: usize,
    pub sweeps: usize,
    pub wrong: usize,
    pub first_wrong: Option<String>,
    /// VIP listeners before, at the end of the outage, after the catch-up.
    pub listeners: [f64; 3],
    /// Export records in the joiner's catalog before and after.
    pub exports: [f64; 2],
    /// Healthy again → the joiner's catalog at the revision of a write made then.
    pub caught_up: Option<Duration>,
    pub relists: f64,
}

fn metric(gateway: &GatewayProcess, name: &str) -> anyhow::Result<f64> {
    tokio::task::block_in_place(|| gateway.metric(name))
}

/// Writes the probe cluster's export of `name` under `lease`; its revision. Each attempt is
/// cut after a second so that a request held by a dead member is sent again.
async fn write_marker(
    store: &dyn Store,
    layout: &KeyLayout,
    name: &str,
    lease: i64,
    within: Duration,
) -> anyhow::Result<(ExportKey, Revision)> {
    let key = ExportKey {
        cluster: ClusterName::new(PROBE_CLUSTER)?,
        gateway: gateway_id(),
        service: ServiceKey::parse(NAMESPACE, name)?,
    };
    let deadline = Instant::now() + within;
    loop {
        let put = TxnOp::Put {
            key: Bytes::from(layout.export(&key)),
            value: Bytes::from(encode(&export_record(3))),
            lease,
        };
        let txn = Txn {
            compares: vec![],
            success: vec![put],
            failure: vec![],
        };
        match tokio::time::timeout(Duration::from_secs(1), store.txn(txn)).await {
            Ok(Ok(result)) => return Ok((key, result.revision)),
            _ if Instant::now() >= deadline => {
                anyhow::bail!("no write committed within {within:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn delete(store: &dyn Store, layout: &KeyLayout, key: &ExportKey) -> anyhow::Result<()> {
    store
        .txn(Txn {
            compares: vec![],
            success: vec![TxnOp::Delete {
                key: Bytes::from(layout.export(key)),
            }],
            failure: vec![],
        })
        .await?;
    Ok(())
}

/// Polls the joiner's catalog revision until it reaches `revision`; when it did.
async fn reaches(gateway: &GatewayProcess, revision: Revision) -> Option<Instant> {
    crate::metric_until(gateway.admin_addr(), REVISION, CONVERGE_WAIT, move |r| {
        r >= revision as f64
    })
    .await
}

/// Polls the joiner's DNS until it answers `name`; when it did.
async fn answered(dns: SocketAddr, name: String) -> Option<Instant> {
    tokio::task::spawn_blocking(move || {
        poll_every(CONVERGE_WAIT, Duration::from_millis(2), || {
            query_a(dns, &name, Duration::from_millis(200)).is_ok_and(|a| !a.addresses().is_empty())
        })
    })
    .await
    .ok()
    .flatten()
}

/// Kills the etcd leader while the churn runs (its failed writes count in `churn_errors`);
/// restarts the member afterwards.
pub async fn leader_kill(
    etcd: &mut EtcdCluster,
    store: &dyn Store,
    layout: &KeyLayout,
    gateway: &GatewayProcess,
    dns: SocketAddr,
    lease: i64,
    churn_errors: &AtomicU64,
) -> anyhow::Result<LeaderKill> {
    let relists = metric(gateway, RELISTS)?;
    let errors = churn_errors.load(Ordering::Relaxed);
    let leader = tokio::task::block_in_place(|| etcd.wait_leader(None, Duration::from_secs(10)))?.0;
    let killed = etcd.kill9(leader);
    let mut figures = LeaderKill::default();
    let (key, revision) =
        write_marker(store, layout, "marker-leader-kill", lease, CONVERGE_WAIT).await?;
    figures.committed = Some(killed.elapsed());
    let name = clusterset_name(&key.service);
    let (converged, answer) = tokio::join!(reaches(gateway, revision), answered(dns, name));
    figures.converged = converged.map(|t| t - killed);
    figures.answered = answer.map(|t| t - killed);
    figures.churn_errors = churn_errors.load(Ordering::Relaxed) - errors;
    figures.relists = metric(gateway, RELISTS)? - relists;
    tokio::task::block_in_place(|| etcd.restart(leader));
    delete(store, layout, &key).await?;
    eprintln!(
        "   leader (member {leader}) killed under churn: a write committed {:?} later, the joiner at its revision {:?}, DNS {:?}; relists {}, churn writes failed {}",
        figures.committed,
        figures.converged,
        figures.answered,
        figures.relists,
        figures.churn_errors
    );
    Ok(figures)
}

/// Every clusterset name of the sample and the addresses the joiner answers for it.
fn sweep(dns: SocketAddr, names: &[String]) -> Vec<(String, Result<Vec<IpAddr>, String>)> {
    names
        .iter()
        .map(|name| {
            let answer = query_a(dns, name, Duration::from_millis(500))
                .map(|a| {
                    let mut v = a.addresses().to_vec();
                    v.sort();
                    v
                })
                .map_err(|e| e.to_string());
            (name.clone(), answer)
        })
        .collect()
}

/// Kills every etcd member for `length`, then starts them again; `services` per cluster.
pub async fn outage(
    etcd: &mut EtcdCluster,
    store: &dyn Store,
    layout: &KeyLayout,
    gateway: &GatewayProcess,
    dns: SocketAddr,
    services: usize,
    length: Duration,
) -> anyhow::Result<Outage> {
    let step = (services / SAMPLE_NAMES).max(1);
    let names: Vec<String> = (0..services)
        .step_by(step)
        .take(SAMPLE_NAMES)
        .map(|i| clusterset_name(&service(i)))
        .collect();
    let baseline = tokio::task::block_in_place(|| sweep(dns, &names));
    if let Some((name, answer)) = baseline
        .iter()
        .find(|(_, a)| a.as_ref().is_ok_and(Vec::is_empty) || a.is_err())
    {
        anyhow::bail!("before the outage the joiner does not answer {name}: {answer:?}");
    }
    let mut figures = Outage {
        length,
        names: names.len(),
        ..Outage::default()
    };
    let relists = metric(gateway, RELISTS)?;
    figures.listeners[0] = metric(gateway, LISTENERS)?;
    figures.exports[0] = metric(gateway, EXPORTS)?;

    let stop = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut wrong = Vec::new();
            let mut count = 0;
            while !stop.load(Ordering::Relaxed) {
                for ((name, now), (_, before)) in sweep(dns, &names).into_iter().zip(&baseline) {
                    if &now != before {
                        wrong.push(format!("{name}: {before:?} → {now:?}"));
                    }
                }
                count += 1;
                std::thread::sleep(SWEEP_EVERY);
            }
            (count, wrong)
        })
    };
    let down = etcd.kill_all();
    tokio::time::sleep(length.saturating_sub(down.elapsed())).await;
    figures.listeners[1] = metric(gateway, LISTENERS)?;
    let restart = tokio::task::block_in_place(|| etcd.restart_all())?;
    figures.restart = restart.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (sweeps, wrong) = sweeper
        .join()
        .map_err(|_| anyhow::anyhow!("the sweeper panicked"))?;
    figures.sweeps = sweeps;
    figures.wrong = wrong.len();
    figures.first_wrong = wrong.into_iter().next();

    let healthy = Instant::now();
    let lease = store.grant_lease(Duration::from_secs(600)).await?;
    let (key, revision) =
        write_marker(store, layout, "marker-outage", lease, CONVERGE_WAIT).await?;
    figures.caught_up = reaches(gateway, revision).await.map(|t| t - healthy);
    figures.relists = metric(gateway, RELISTS)? - relists;
    figures.listeners[2] = metric(gateway, LISTENERS)?;
    // The marker is one of them now.
    figures.exports[1] = metric(gateway, EXPORTS)? - 1.0;
    delete(store, layout, &key).await?;
    store
        .revoke_lease(lease)
        .await
        .context("revoke the marker's lease")?;
    eprintln!(
        "   etcd down {length:?} (all members killed), restarted in {:.1} s: {} sweeps × {} names, {} answers differed{}; listeners {:?}; exports {:?}; caught up {:?} after; relists {}",
        figures.restart.as_secs_f64(),
        figures.sweeps,
        figures.names,
        figures.wrong,
        figures
            .first_wrong
            .as_deref()
            .map(|w| format!(", first: {w}"))
            .unwrap_or_default(),
        figures.listeners,
        figures.exports,
        figures.caught_up,
        figures.relists,
    );
    Ok(figures)
}

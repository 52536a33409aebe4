//! Feeds the catalog's withdrawal grace ([`meshup_federation::grace`]) and publishes the
//! catalog this gateway acts on: DNS answers and the outbound proxy (VIP listeners,
//! candidates) read it; the admin views, the VIP allocator and the drill expiry read the raw
//! catalog, as etcd has it.
//!
//! One task owns the [`Grace`]. It wakes on every raw catalog change, at the next hold's
//! expiry, and every [`LINK_POLL`] while something is held (to drop a hold as soon as its
//! link goes, and to see the store go silent or answer again); each time it asks the outbound
//! pool which links are alive and the watcher whether the store answers, and publishes what
//! the decision returns when that changed.

use std::sync::Arc;
use std::time::Duration;

use meshup_core::catalog::Snapshot;
use meshup_federation::grace::{Grace, Kind, Links, Outcome};
use meshup_federation::watcher::WatcherStatus;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::outbound;

/// How often the links are checked while a record is held: a hold ends at most this long
/// after its link went.
pub const LINK_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WithdrawalLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// The grace's Prometheus metrics. Clones share the series.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    withdrawals: Family<WithdrawalLabels, Counter>,
    held: Gauge,
}

impl Metrics {
    /// Creates the series and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        for kind in [Kind::Gateway, Kind::Export] {
            for outcome in Outcome::ALL {
                let _ = m.withdrawals.get_or_create(&WithdrawalLabels {
                    kind: kind.as_str(),
                    outcome: outcome.as_str(),
                });
            }
        }
        registry.register(
            "catalog_withdrawals",
            "Gateway and export records that left the catalog, by how their grace ended (dropped: not held, no live link or draining)",
            m.withdrawals.clone(),
        );
        registry.register(
            "catalog_withdrawals_held",
            "Records gone from the catalog that this gateway still acts on while their gateway's link is alive",
            m.held.clone(),
        );
        m
    }

    fn count(&self, kind: Kind, outcome: Outcome) {
        self.withdrawals
            .get_or_create(&WithdrawalLabels {
                kind: kind.as_str(),
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

/// Runs the grace of `period` over `raw` until `stop`, publishing on `out` (which the
/// consumers were given before the outbound proxy existed). The watcher's `status` says
/// whether the store answers (the grace does not run out while it is silent).
pub fn spawn(
    mut raw: watch::Receiver<Arc<Snapshot>>,
    status: watch::Receiver<WatcherStatus>,
    out: watch::Sender<Arc<Snapshot>>,
    outbound: outbound::Proxy,
    period: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        // Start from what the consumers were given: the watcher may have published since,
        // and the first pass below (before any wait) hands that on.
        let mut grace = Grace::new(period, out.borrow().clone());
        let mut deadline = None;
        let mut was_held = 0;
        let mut first = true;
        loop {
            let poll = grace.held() > 0;
            if !std::mem::take(&mut first) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = raw.changed() => if changed.is_err() { return },
                    _ = sleep_until(deadline), if deadline.is_some() => {}
                    _ = tokio::time::sleep(LINK_POLL), if poll => {}
                }
            }
            let snapshot = raw.borrow_and_update().clone();
            let links = Links::new(
                outbound
                    .links()
                    .await
                    .into_iter()
                    .map(|l| (l.peer.cluster, l.peer.addr)),
            );
            let now = std::time::Instant::now();
            let silent = status.borrow().silent_since(now);
            let update = grace.update(snapshot, &links, silent, now);
            for (kind, outcome) in &update.ended {
                metrics.count(*kind, *outcome);
                if *outcome != Outcome::Dropped {
                    tracing::debug!(
                        kind = kind.as_str(),
                        outcome = outcome.as_str(),
                        "withdrawal grace ended"
                    );
                }
            }
            let held = grace.held();
            if held > 0 && was_held == 0 {
                tracing::info!(
                    held,
                    ?period,
                    "catalog records withdrawn while their gateways' links are alive: still served for the grace"
                );
            } else if held == 0 && was_held > 0 {
                tracing::info!("withdrawal grace over: acting on the catalog as it is");
            }
            was_held = held;
            metrics.held.set(i64::try_from(held).unwrap_or(i64::MAX));
            deadline = update.next_deadline;
            if update.changed {
                out.send_replace(update.snapshot);
            }
        }
    })
}

async fn sleep_until(deadline: Option<std::time::Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(at.into()).await;
    }
}

//! A whole cluster joins the federation and leaves it by lease expiry (issue #15's target:
//! every gateway converged ≤ 5 s), timed on the joined gateway.
//!
//! Join: one more cluster's publisher (the project's own, as the others) publishes every
//! service; timed from its start until it is in sync (its records written), and until the
//! joiner's catalog holds every one of them (`meshup_catalog_exports` up by the services).
//! Leave: the publisher is aborted without revoking its lease (a gateway that crashed or
//! lost its network), etcd deletes its records when the lease expires; timed from the
//! moment etcd no longer has its gateway record until the joiner's count is back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshup_federation::keys::KeyLayout;
use meshup_federation::store::Store;
use meshup_tests::gateways::GatewayProcess;
use meshup_tests::scale::{self, cluster, gateway_id};
use tokio_util::sync::CancellationToken;

const EXPORTS: &str = "meshup_catalog_exports";
/// Longest wait for each step.
const STEP_WAIT: Duration = Duration::from_secs(120);

/// What the join and the leave showed.
#[derive(Debug, Default)]
pub struct Membership {
    pub services: usize,
    /// Publisher started → its records all written.
    pub published: Option<Duration>,
    /// Publisher started → the joiner holds every record.
    pub joined: Option<Duration>,
    /// Lease expiry seen in etcd (its gateway record gone) → the joiner holds none.
    pub left: Option<Duration>,
    /// Publisher aborted → its records gone from etcd (the lease TTL and etcd's expiry
    /// check).
    pub expired: Option<Duration>,
}

/// Polls the joiner's export count until `done` says yes; when it did.
async fn exports_until(
    admin: SocketAddr,
    done: impl Fn(f64) -> bool + Send + 'static,
) -> Option<Instant> {
    crate::metric_until(admin, EXPORTS, STEP_WAIT, done).await
}

/// Cluster number `c` (after the federation's) joins with `services` services and leaves.
pub async fn join_and_leave(
    store: Arc<dyn Store>,
    layout: &KeyLayout,
    gateway: &GatewayProcess,
    c: usize,
    services: usize,
    lease_ttl: Duration,
    cancel: &CancellationToken,
) -> anyhow::Result<Membership> {
    let admin = gateway.admin_addr();
    let before = tokio::task::block_in_place(|| gateway.metric(EXPORTS))?;
    let all = before + services as f64;
    let mut figures = Membership {
        services,
        ..Membership::default()
    };

    let started = Instant::now();
    let publisher = scale::publisher(store.clone(), layout, c, services, lease_ttl, cancel);
    let mut status = publisher.status();
    let (in_sync, joined) = tokio::join!(
        tokio::time::timeout(STEP_WAIT, status.wait_for(|s| s.in_sync)),
        exports_until(admin, move |n| n >= all),
    );
    anyhow::ensure!(
        matches!(in_sync, Ok(Ok(_))),
        "cluster {c}'s publisher not in sync"
    );
    figures.published = Some(started.elapsed());
    figures.joined = joined.map(|t| t - started);

    // Leaving: no revoke, the lease runs out.
    publisher.abort();
    let aborted = Instant::now();
    let key = layout.gateway(&cluster(c), &gateway_id());
    let expired = {
        let deadline = Instant::now() + lease_ttl + STEP_WAIT;
        loop {
            if meshup_federation::store::get(store.as_ref(), key.clone())
                .await?
                .is_none()
            {
                break Some(Instant::now());
            }
            if Instant::now() >= deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    figures.expired = expired.map(|t| t - aborted);
    if let Some(expired) = expired {
        figures.left = exports_until(admin, move |n| n <= before)
            .await
            .map(|t| t.saturating_duration_since(expired));
    }
    eprintln!(
        "   a cluster of {services} services joined: published in {:?}, the joiner held them {:?} after the start; left (lease expiry {:?} after the abort): the joiner dropped them {:?} after etcd did",
        figures.published, figures.joined, figures.expired, figures.left
    );
    Ok(figures)
}

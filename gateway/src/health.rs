//! Active health probes of this cluster's local endpoints.
//!
//! Every `interval` the prober tries a TCP connect to each endpoint of each export (in
//! parallel, each bounded by `timeout`) and publishes the result as an immutable map on a
//! `watch` channel. The publisher turns it into the endpoint counts of the catalog's export
//! records, so other clusters stop choosing this one when it has nothing healthy — live
//! signals, not a stale catalog, decide routing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use meshup_core::names::ServiceKey;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How often endpoints are probed.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take before the endpoint counts as down.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// Health of one export's endpoints, in the order the config lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointHealth {
    pub endpoints: Vec<(SocketAddr, bool)>,
}

impl EndpointHealth {
    /// Endpoints that answered the last probe.
    pub fn healthy(&self) -> u32 {
        count(self.endpoints.iter().filter(|(_, up)| *up).count())
    }

    /// All endpoints.
    pub fn total(&self) -> u32 {
        count(self.endpoints.len())
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The health of every export, keyed by service.
pub type HealthMap = Arc<BTreeMap<ServiceKey, EndpointHealth>>;

/// Probes every endpoint once.
pub async fn probe_once(
    targets: &[(ServiceKey, Vec<SocketAddr>)],
    timeout: Duration,
) -> BTreeMap<ServiceKey, EndpointHealth> {
    let probes = targets.iter().map(|(key, endpoints)| async move {
        let results = join_all(endpoints.iter().map(|addr| async move {
            let up = matches!(
                tokio::time::timeout(timeout, TcpStream::connect(addr)).await,
                Ok(Ok(_))
            );
            (*addr, up)
        }))
        .await;
        (key.clone(), EndpointHealth { endpoints: results })
    });
    join_all(probes).await.into_iter().collect()
}

/// What to probe: each export's endpoints.
pub type Targets = Arc<Vec<(ServiceKey, Vec<SocketAddr>)>>;

/// Starts the prober. The first probe runs before this returns, so the first catalog
/// publication already carries real counts (a gateway does not start out "all down"). When
/// `targets` change (a reload, an export registered) the new ones are probed at once.
pub async fn spawn(
    mut targets: watch::Receiver<Targets>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) -> watch::Receiver<HealthMap> {
    let current = targets.borrow_and_update().clone();
    let first = probe_once(&current, timeout).await;
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                changed = targets.changed() => if changed.is_err() { return },
            }
            let current = targets.borrow_and_update().clone();
            let next = probe_once(&current, timeout).await;
            // Only wake readers when something changed.
            tx.send_if_modified(|cur| {
                if **cur == next {
                    false
                } else {
                    *cur = Arc::new(next);
                    true
                }
            });
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probes_tell_listening_from_closed_endpoints() {
        let up = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let up_addr = up.local_addr().expect("addr");
        // Bind then drop: nothing listens there now.
        let down_addr = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            l.local_addr().expect("addr")
        };
        let key: ServiceKey = "pay.prod".parse().expect("valid");
        let map = probe_once(
            &[(key.clone(), vec![up_addr, down_addr])],
            Duration::from_secs(2),
        )
        .await;
        let h = &map[&key];
        assert_eq!(h.total(), 2);
        assert_eq!(h.healthy(), 1);
        assert_eq!(h.endpoints, vec![(up_addr, true), (down_addr, false)]);
    }
}

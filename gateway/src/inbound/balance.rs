//! Local endpoint choice: power of two choices on in-flight streams.
//!
//! Two random endpoints are compared and the one with fewer streams in flight wins: nearly
//! as good as "least loaded" without scanning or coordinating, and never herds every new
//! stream onto one endpoint the way strict least-loaded does with stale counts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpStream;

/// Picks between two candidates by load: the index of the less loaded of `a` and `b`
/// (ties go to `a`). Pure, so the policy is table-tested.
pub fn pick_two(loads: &[usize], a: usize, b: usize) -> usize {
    if loads[b] < loads[a] { b } else { a }
}

/// In-flight counters per endpoint.
#[derive(Debug, Default)]
pub(super) struct Balancer {
    // Held only to look up or insert a counter, never across an await.
    counters: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
}

/// Counts one in-flight stream on an endpoint until dropped.
#[derive(Debug)]
pub(super) struct Load(Arc<AtomicUsize>);

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    fn counter(&self, addr: SocketAddr) -> Arc<AtomicUsize> {
        let mut map = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(addr).or_default().clone()
    }

    /// Connects to an endpoint chosen by two random choices; on failure tries the others
    /// (least loaded first) until one accepts. Returns the connection and its load guard.
    pub(super) async fn connect(
        &self,
        endpoints: &[SocketAddr],
        timeout: Duration,
    ) -> Option<(TcpStream, Load)> {
        let counters: Vec<Arc<AtomicUsize>> = endpoints.iter().map(|e| self.counter(*e)).collect();
        let loads: Vec<usize> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let n = endpoints.len();
        let first = if n == 1 {
            0
        } else {
            let a = rand_index(n);
            let mut b = rand_index(n - 1);
            if b >= a {
                b += 1;
            }
            pick_two(&loads, a, b)
        };
        let mut order: Vec<usize> = (0..n).filter(|i| *i != first).collect();
        order.sort_by_key(|i| loads[*i]);
        order.insert(0, first);
        // Bounded: at most three endpoints per stream, so a dead subnet cannot hold a stream
        // for endpoints × timeout.
        for i in order.into_iter().take(3) {
            counters[i].fetch_add(1, Ordering::Relaxed);
            let load = Load(counters[i].clone());
            if let Some(tcp) = super::connect_tcp(endpoints[i], timeout).await {
                return Some((tcp, load));
            }
        }
        None
    }
}

/// A cheap random index: quality is irrelevant, only spread.
fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default(),
    );
    (h.finish() % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_two_prefers_the_less_loaded() {
        let loads = [5, 1, 1, 9];
        assert_eq!(pick_two(&loads, 0, 1), 1);
        assert_eq!(pick_two(&loads, 1, 0), 1);
        assert_eq!(pick_two(&loads, 1, 2), 1); // tie → first
        assert_eq!(pick_two(&loads, 3, 0), 0);
    }

    #[test]
    fn rand_index_stays_in_range_and_spreads() {
        let mut seen = [false; 4];
        for _ in 0..1000 {
            let i = rand_index(4);
            seen[i] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}

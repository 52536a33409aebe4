//! Readiness: the gateway is ready when every start-up task it registered has finished.
//!
//! Each start-up task (certificate loaded, first catalog sync, listeners bound) holds a
//! [`BlockReady`] guard and drops it when done. `/ready` answers 200 only when no guard is
//! left, and otherwise names what is still pending, so an operator sees *why* a gateway is
//! not ready. Dropping a guard early (a task that fails) keeps nothing blocked forever only
//! if the task says so: a failed task should keep its guard and exit the process instead.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Shared readiness state. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<&'static str>>>,
    /// Whether nothing is pending, for [`Readiness::wait`].
    ready: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            pending: Default::default(),
            ready: Arc::new(tokio::sync::watch::Sender::new(true)),
        }
    }
}

impl Readiness {
    /// A readiness with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a start-up task; the gateway is not ready until the guard is dropped.
    pub fn register(&self, task: &'static str) -> BlockReady {
        {
            let mut pending = self.lock();
            pending.insert(task);
            self.ready.send_replace(false);
        }
        BlockReady {
            readiness: self.clone(),
            task,
        }
    }

    /// Tasks still pending, in name order; empty means ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock().iter().copied().collect()
    }

    /// Returns once every registered task has finished (at once if none is pending). For
    /// what must happen exactly when `/ready` turns 200, such as telling systemd.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Whether every registered task has finished.
    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        // A panic while holding this lock cannot leave the set inconsistent (single insert or
        // remove), so a poisoned lock is still safe to use.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps the gateway not-ready while alive.
#[derive(Debug)]
#[must_use = "readiness is released when the guard is dropped"]
pub struct BlockReady {
    readiness: Readiness,
    task: &'static str,
}

impl Drop for BlockReady {
    fn drop(&mut self) {
        let mut pending = self.readiness.lock();
        pending.remove(self.task);
        self.readiness.ready.send_replace(pending.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_guard_is_dropped() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let certs = r.register("certificates");
        let sync = r.register("catalog sync");
        assert_eq!(r.pending(), vec!["catalog sync", "certificates"]);
        drop(certs);
        assert!(!r.is_ready());
        drop(sync);
        assert!(r.is_ready());
    }

    #[tokio::test]
    async fn wait_ready_returns_when_the_last_guard_drops() {
        let r = Readiness::new();
        r.wait_ready().await; // nothing pending: at once
        let certs = r.register("certificates");
        let sync = r.register("catalog sync");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        drop(certs);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one task is still pending");
        drop(sync);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the last guard")
            .expect("waiter task");
        assert!(r.is_ready());
    }
}

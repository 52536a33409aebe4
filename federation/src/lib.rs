//! meshup-federation: the federation's catalog over a key-value store.
//!
//! - [`store`]: the store seam ([`Store`]) with two implementations of the same semantics,
//!   [`etcd::EtcdStore`] and [`embedded::EmbeddedStore`].
//! - [`keys`]: the key layout; [`reducer`]: key + value → snapshot change or skip reason
//!   (pure).
//! - [`watcher`]: list, watch, resume, relist; publishes `Arc<Snapshot>`s.
//! - [`grace`]: the withdrawal grace: withdrawn records kept while the link to their gateway
//!   is alive (pure).
//! - [`publisher`]: a gateway's own records under its lease, with anti-entropy.
//! - [`vips`]: VIP allocation by create-if-absent transactions.
//! - [`drills`]: starting, stopping and expiring operator drills, each end audited once.
//! - [`config`]: the `catalog` configuration section and the store constructor.
//! - `test_store` (tests only: this crate's, or others' with the `test-util` feature): a
//!   store wrapper that counts calls, cuts the connection and stages races.
//!
//! Every task stops on a `tokio_util::sync::CancellationToken`; see each module for what
//! dropping its handle does.

pub mod backoff;
pub mod config;
pub mod drills;
pub mod embedded;
pub mod etcd;
mod etcd_balance;
pub mod grace;
pub mod keys;
pub mod publisher;
pub mod reducer;
pub mod store;
#[cfg(any(test, feature = "test-util"))]
pub mod test_store;
pub mod vips;
pub mod watcher;

use prometheus_client::registry::Registry;

pub use store::{Store, StoreError};

/// Every catalog metric, registered at once.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub watcher: watcher::Metrics,
    pub publisher: publisher::Metrics,
    pub vips: vips::Metrics,
}

impl Metrics {
    /// Registers the metrics of all catalog modules.
    pub fn register(registry: &mut Registry) -> Self {
        Self {
            watcher: watcher::Metrics::register(registry),
            publisher: publisher::Metrics::register(registry),
            vips: vips::Metrics::register(registry),
        }
    }
}

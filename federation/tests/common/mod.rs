//! Shared pieces of the federation integration tests: the two store fixtures, the watcher and
//! publisher with test settings, and timeouts.
//!
//! The etcd harness, the test PKI and `eventually` come from `meshup-test-support`, which
//! depends on no meshup crate (so these tests do not build the gateway); the store wrapper
//! ([`TestStore`]: counts calls, cuts the connection, stages races) from this crate's
//! `test-util` feature, the record builders from `meshup-core`'s.
#![allow(dead_code)]

pub mod relay;

// Not every test binary uses all three.
#[allow(unused_imports)]
pub use meshup_test_support::{etcd, eventually, tls};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::keys::KeyLayout;
use meshup_federation::publisher::PublisherConfig;
use meshup_federation::store::Store;
use meshup_federation::watcher::WatcherConfig;
use tokio_util::sync::CancellationToken;

pub use etcd::EtcdServer;
#[allow(unused_imports)]
pub use eventually::{assert_eventually, eventually_ok};
#[allow(unused_imports)]
pub use meshup_core::fixture::{cluster, export, gateway, gateway_id, service};
#[allow(unused_imports)]
pub use meshup_federation::test_store::{Call, TestStore};

/// Runs a test body with a deadline, so a hang fails the test instead of the CI job.
pub async fn within<F: Future>(limit: Duration, body: F) -> F::Output {
    match tokio::time::timeout(limit, body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {limit:?}"),
    }
}

/// Logs to the test output (shown for failing tests), filtered by `RUST_LOG`.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
}

/// Which store a test runs against.
#[allow(clippy::large_enum_variant)] // one per test; size is irrelevant
pub enum Fixture {
    Embedded(EmbeddedStore),
    Etcd {
        server: EtcdServer,
        store: EtcdStore,
    },
}

impl Fixture {
    pub fn embedded() -> Self {
        init_logs();
        Fixture::Embedded(EmbeddedStore::new())
    }

    /// Starts a real etcd (blocking work off the runtime threads) and connects to it.
    pub async fn etcd() -> Self {
        Self::etcd_with_args(&[]).await
    }

    /// An etcd fixture whose server runs with extra flags.
    pub async fn etcd_with_args(args: &'static [&'static str]) -> Self {
        init_logs();
        let server = tokio::task::spawn_blocking(move || EtcdServer::start_with_args(args))
            .await
            .expect("etcd start task");
        let store = EtcdStore::connect(EtcdOptions {
            endpoints: vec![server.endpoint()],
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .expect("connect to etcd");
        Fixture::Etcd { server, store }
    }

    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Fixture::Embedded(s) => Arc::new(s.clone()),
            Fixture::Etcd { store, .. } => Arc::new(store.clone()),
        }
    }

    /// A second client of the same store, as another gateway would have: its own etcd
    /// connection; for the embedded fixture the same store behind a [`TestStore`], whose
    /// transactions yield first as a round trip would, so racing clients interleave.
    pub async fn another_client(&self) -> Arc<dyn Store> {
        match self {
            Fixture::Embedded(s) => TestStore::new(Arc::new(s.clone())),
            Fixture::Etcd { server, .. } => Arc::new(
                EtcdStore::connect(EtcdOptions {
                    endpoints: vec![server.endpoint()],
                    request_timeout: Duration::from_secs(2),
                    ..Default::default()
                })
                .await
                .expect("connect to etcd"),
            ),
        }
    }

    pub fn is_etcd(&self) -> bool {
        matches!(self, Fixture::Etcd { .. })
    }

    /// Writes raw bytes the way an operator would: `etcdctl put` on etcd (value from stdin,
    /// so any bytes and sizes work), a plain put on the embedded store.
    pub async fn put_raw(&self, key: &str, value: &[u8]) {
        match self {
            Fixture::Embedded(s) => {
                meshup_federation::store::put(s, key.to_owned(), Bytes::copy_from_slice(value), 0)
                    .await
                    .expect("put");
            }
            Fixture::Etcd { server, .. } => {
                server
                    .etcdctl_with_stdin(&["put", key], Some(value))
                    .expect("etcdctl put");
            }
        }
    }

    /// Deletes a key the way an operator would: `etcdctl del` on etcd, a plain delete on the
    /// embedded store. Returns how many keys were deleted.
    pub async fn delete_raw(&self, key: &str) -> u64 {
        match self {
            Fixture::Embedded(s) => {
                let existed = meshup_federation::store::get(s, key.to_owned())
                    .await
                    .expect("get")
                    .is_some();
                meshup_federation::store::delete(s, key.to_owned())
                    .await
                    .expect("delete");
                u64::from(existed)
            }
            Fixture::Etcd { server, .. } => {
                let out = tokio::task::block_in_place(|| server.etcdctl(&["del", key]))
                    .expect("etcdctl del");
                out.trim()
                    .parse()
                    .expect("etcdctl del prints the number deleted")
            }
        }
    }
}

/// Fast settings so tests converge in seconds.
pub fn watcher_config() -> WatcherConfig {
    WatcherConfig {
        stall_timeout: Duration::from_secs(3),
        progress_interval: Duration::from_secs(1),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }
}

/// A watcher of the whole catalog on `store` with the test settings, stopped by `cancel`.
pub fn watch_catalog(
    store: Arc<dyn Store>,
    cancel: &CancellationToken,
) -> meshup_federation::watcher::Watcher {
    meshup_federation::watcher::Watcher::spawn(
        store,
        layout(),
        meshup_core::model::AddressRules::default(),
        watcher_config(),
        meshup_federation::watcher::Metrics::default(),
        cancel.child_token(),
    )
}

/// `cluster`'s gateway `gw-0` publishing `pay.prod:8080` with one endpoint on `store`.
pub fn publish_pay(
    store: Arc<dyn Store>,
    cluster: &str,
    ttl_secs: u64,
    cancel: &CancellationToken,
) -> meshup_federation::publisher::PublisherHandle {
    meshup_federation::publisher::Publisher::new(store, layout(), gateway(cluster, "gw-0"))
        .with_exports([(service("pay.prod"), export(8080, 1))])
        .with_config(publisher_config(ttl_secs))
        .spawn(cancel.child_token())
}

pub fn publisher_config(ttl_secs: u64) -> PublisherConfig {
    PublisherConfig {
        lease_ttl: Duration::from_secs(ttl_secs),
        anti_entropy_interval: Duration::from_secs(2),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(500),
    }
}

pub fn layout() -> KeyLayout {
    KeyLayout::new("/meshup-test").expect("valid prefix")
}

/// Generates one `#[tokio::test]` per backend for a generic test function taking a
/// [`Fixture`].
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Fixture::embedded()).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Fixture::etcd().await).await;
                }
            )*
        }
    };
}

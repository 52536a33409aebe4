//! Shared pieces of the federation integration tests: the two store fixtures, store wrappers
//! (one that can be "disconnected", one that counts transactions, one that stages a race),
//! record builders and timeouts.
//!
//! The etcd harness, the test PKI and `eventually` come from `meshup-test-support`, which
//! depends on no meshup crate (so these tests do not build the gateway).
#![allow(dead_code)]

pub mod relay;

// Not every test binary uses all three.
#[allow(unused_imports)]
pub use meshup_test_support::{etcd, eventually, tls};

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use meshup_core::model::{ExportRecord, GatewayRecord, PortSpec, Protocol, SCHEMA_VERSION};
use meshup_core::names::{ClusterName, GatewayId, ServiceKey};
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::keys::KeyLayout;
use meshup_federation::publisher::PublisherConfig;
use meshup_federation::store::{
    KeyRange, LeaseId, Page, Revision, Store, StoreError, StoreFuture, Txn, TxnResult, Watch,
};
use meshup_federation::watcher::WatcherConfig;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use etcd::EtcdServer;
#[allow(unused_imports)]
pub use eventually::{assert_eventually, eventually_ok};

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
    /// connection; for the embedded fixture the same store behind [`Interleave`], whose
    /// transactions yield first as a round trip would, so racing clients interleave.
    pub async fn another_client(&self) -> Arc<dyn Store> {
        match self {
            Fixture::Embedded(s) => Interleave::new(Arc::new(s.clone()), |_| None),
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

pub fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).expect("valid cluster")
}

pub fn gateway_id(name: &str) -> GatewayId {
    GatewayId::new(name).expect("valid gateway id")
}

pub fn service(key: &str) -> ServiceKey {
    key.parse().expect("valid service key")
}

pub fn gateway(cluster_name: &str, id: &str) -> GatewayRecord {
    GatewayRecord {
        schema: SCHEMA_VERSION,
        cluster: cluster(cluster_name),
        gateway_id: gateway_id(id),
        region: "r1".into(),
        zone: "z1".into(),
        quic_addrs: vec!["10.1.2.3:15443".parse().expect("addr")],
        spiffe_id: format!("spiffe://mesh.test/cluster/{cluster_name}/gateway"),
        draining: false,
    }
}

pub fn export(port: u16, healthy: u32) -> ExportRecord {
    ExportRecord {
        schema: SCHEMA_VERSION,
        ports: vec![PortSpec {
            name: "http".into(),
            port,
            protocol: Protocol::Tcp,
        }],
        endpoints_total: healthy.max(1),
        endpoints_healthy: healthy,
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

/// A store wrapper whose "connection" can be cut: while down, every call fails as if etcd
/// were unreachable and open watches end. Writers keep using the real store meanwhile.
#[derive(Debug)]
pub struct Flaky {
    inner: Arc<dyn Store>,
    down: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
}

impl Flaky {
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            down: Arc::new(AtomicBool::new(false)),
            epoch: watch::channel(0).0,
        })
    }

    pub fn disconnect(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn reconnect(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test: connection cut".into()))
        } else {
            Ok(())
        }
    }
}

impl Store for Flaky {
    fn backend(&self) -> &'static str {
        "flaky"
    }
    fn revision(&self) -> StoreFuture<'_, Revision> {
        Box::pin(async move {
            self.check()?;
            self.inner.revision().await
        })
    }
    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page> {
        Box::pin(async move {
            self.check()?;
            self.inner.range(range, revision, limit).await
        })
    }
    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch> {
        Box::pin(async move {
            // Subscribe before checking, so a disconnect racing with this call still ends
            // the watch.
            let mut epoch = self.epoch.subscribe();
            epoch.borrow_and_update();
            self.check()?;
            let mut inner = self.inner.watch(range, start_revision).await?;
            let (tx, rx) = mpsc::channel(64);
            let (ptx, mut prx) = mpsc::channel::<()>(1);
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = epoch.changed() => return,
                        Some(()) = prx.recv() => inner.request_progress(),
                        item = inner.next() => match item {
                            Some(item) => if tx.send(item).await.is_err() { return },
                            None => return,
                        },
                    }
                }
            });
            Ok(Watch::new(
                rx,
                Box::new(move || {
                    let _ = ptx.try_send(());
                }),
            ))
        })
    }
    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        Box::pin(async move {
            self.check()?;
            self.inner.grant_lease(ttl).await
        })
    }
    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, Duration> {
        Box::pin(async move {
            self.check()?;
            self.inner.keep_alive(lease).await
        })
    }
    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.check()?;
            self.inner.revoke_lease(lease).await
        })
    }
    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult> {
        Box::pin(async move {
            self.check()?;
            self.inner.txn(txn).await
        })
    }
    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.check()?;
            self.inner.compact(revision).await
        })
    }
}

/// What [`Interleave`] runs before a transaction: given the transaction about to run, the
/// one to run first, if any.
pub type InterleaveHook = Box<dyn Fn(&Txn) -> Option<Txn> + Send + Sync>;

/// A store wrapper that shows its hook every transaction and runs a transaction of its own
/// just before one the hook picks: to stage a race at an exact point (another writer getting
/// in between a read and a compare-and-set), or just to count transactions. Every transaction yields to the scheduler first, as a round trip to
/// etcd would, so callers racing on the in-process store interleave rather than run each
/// read-then-write to completion.
pub struct Interleave {
    inner: Arc<dyn Store>,
    hook: InterleaveHook,
}

impl std::fmt::Debug for Interleave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interleave")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl Interleave {
    pub fn new(
        inner: Arc<dyn Store>,
        hook: impl Fn(&Txn) -> Option<Txn> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner,
            hook: Box::new(hook),
        })
    }
}

impl Store for Interleave {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn revision(&self) -> StoreFuture<'_, Revision> {
        self.inner.revision()
    }
    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page> {
        self.inner.range(range, revision, limit)
    }
    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch> {
        self.inner.watch(range, start_revision)
    }
    fn grant_lease(&self, ttl: Duration) -> StoreFuture<'_, LeaseId> {
        self.inner.grant_lease(ttl)
    }
    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, Duration> {
        self.inner.keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        self.inner.revoke_lease(lease)
    }
    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult> {
        let first = (self.hook)(&txn);
        Box::pin(async move {
            tokio::task::yield_now().await;
            if let Some(first) = first {
                self.inner.txn(first).await?;
            }
            self.inner.txn(txn).await
        })
    }
    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()> {
        self.inner.compact(revision)
    }
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

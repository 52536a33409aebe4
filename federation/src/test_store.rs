//! A [`Store`] for tests: it wraps another store and forwards every call, so a test can
//! count the calls, cut the "connection" ([`TestStore::disconnect`]: every call fails as if
//! etcd were unreachable and open watches end) and stage a race at an exact point (a hook
//! that runs another writer's transaction just before the one it picks).
//!
//! Compiled for this crate's own tests and, with the `test-util` feature, for other crates'
//! tests; never part of a release build.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::store::{
    KeyRange, LeaseId, Page, Revision, Store, StoreError, StoreFuture, Txn, TxnResult, Watch,
};

/// One method of [`Store`], for [`TestStore::calls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    Revision,
    Range,
    Watch,
    GrantLease,
    KeepAlive,
    RevokeLease,
    Txn,
    Compact,
}

const CALLS: usize = 8;

/// What a [`TestStore`] asks before each transaction: given the transaction about to run,
/// the one to run first, if any.
pub type BeforeTxn = Box<dyn Fn(&Txn) -> Option<Txn> + Send + Sync>;

/// A store wrapper for tests; see the module docs.
///
/// Every call is counted when it starts, whether it then fails or not. Every transaction
/// yields to the scheduler first, as a round trip to etcd would, so callers racing on the
/// in-process store interleave rather than run each read-then-write to completion.
pub struct TestStore {
    inner: Arc<dyn Store>,
    calls: [AtomicU64; CALLS],
    down: AtomicBool,
    /// Bumped by each disconnect: open watches end when it changes.
    epoch: watch::Sender<u64>,
    before_txn: Option<BeforeTxn>,
    /// How long every transaction takes before it is forwarded, in milliseconds (tokio
    /// time: a slow or loaded etcd, on paused time in tests).
    txn_delay_ms: AtomicU64,
    /// Ranges asking for more keys than this fail (`usize::MAX`: none).
    range_limit_cap: AtomicUsize,
}

impl fmt::Debug for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestStore")
            .field("inner", &self.inner)
            .field("down", &self.down)
            .finish_non_exhaustive()
    }
}

impl TestStore {
    /// Forwards every call to `inner`.
    pub fn new(inner: Arc<dyn Store>) -> Arc<Self> {
        Self::build(inner, None)
    }

    /// Forwards every call to `inner`, and before each transaction runs the one `hook`
    /// returns for it, if any (another writer getting in between a read and a
    /// compare-and-set). The hook sees every transaction, so it can also count or record
    /// them.
    pub fn with_before_txn(
        inner: Arc<dyn Store>,
        hook: impl Fn(&Txn) -> Option<Txn> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::build(inner, Some(Box::new(hook)))
    }

    fn build(inner: Arc<dyn Store>, before_txn: Option<BeforeTxn>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            calls: Default::default(),
            down: AtomicBool::new(false),
            epoch: watch::channel(0).0,
            before_txn,
            txn_delay_ms: AtomicU64::new(0),
            range_limit_cap: AtomicUsize::new(usize::MAX),
        })
    }

    /// Makes every transaction from now on take `delay` (tokio time) before it is
    /// forwarded, as a loaded store would.
    pub fn set_txn_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.txn_delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Makes every range asking for more than `cap` keys fail from now on, as a page too
    /// large for the client's message limit does.
    pub fn cap_range_limit(&self, cap: usize) {
        self.range_limit_cap.store(cap, Ordering::SeqCst);
    }

    /// The wrapped store, to read or write past the wrapper (as another client would).
    pub fn inner(&self) -> &Arc<dyn Store> {
        &self.inner
    }

    /// How many calls of this kind have started so far.
    pub fn calls(&self, call: Call) -> u64 {
        self.calls[call as usize].load(Ordering::SeqCst)
    }

    /// Cuts the connection: from now on every call fails with [`StoreError::Unavailable`],
    /// and every open watch ends (its stream returns `None`), as after a broken connection.
    /// The wrapped store itself keeps working for its other clients.
    pub fn disconnect(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Restores the connection: calls reach the wrapped store again.
    pub fn reconnect(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Counts a call and fails it while disconnected.
    fn admit(&self, call: Call) -> Result<(), StoreError> {
        self.calls[call as usize].fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("test: connection cut".into()))
        } else {
            Ok(())
        }
    }

    /// `op` on the wrapped store, once the call is admitted.
    fn forward<'a, T: Send + 'a>(
        &'a self,
        call: Call,
        op: impl FnOnce(&'a dyn Store) -> StoreFuture<'a, T> + Send + 'a,
    ) -> StoreFuture<'a, T> {
        Box::pin(async move {
            self.admit(call)?;
            op(self.inner.as_ref()).await
        })
    }
}

impl Store for TestStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn revision(&self) -> StoreFuture<'_, Revision> {
        self.forward(Call::Revision, |s| s.revision())
    }
    fn range(
        &self,
        range: KeyRange,
        revision: Option<Revision>,
        limit: usize,
    ) -> StoreFuture<'_, Page> {
        if limit > self.range_limit_cap.load(Ordering::SeqCst) {
            let _ = self.admit(Call::Range);
            return Box::pin(std::future::ready(Err(StoreError::Unavailable(format!(
                "a page of {limit} keys is too large (test store cap)"
            )))));
        }
        self.forward(Call::Range, move |s| s.range(range, revision, limit))
    }
    fn watch(&self, range: KeyRange, start_revision: Revision) -> StoreFuture<'_, Watch> {
        Box::pin(async move {
            // Subscribe before admitting, so a disconnect racing with this call still ends
            // the watch.
            let mut epoch = self.epoch.subscribe();
            epoch.borrow_and_update();
            self.admit(Call::Watch)?;
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
        self.forward(Call::GrantLease, move |s| s.grant_lease(ttl))
    }
    fn keep_alive(&self, lease: LeaseId) -> StoreFuture<'_, Duration> {
        self.forward(Call::KeepAlive, move |s| s.keep_alive(lease))
    }
    fn revoke_lease(&self, lease: LeaseId) -> StoreFuture<'_, ()> {
        self.forward(Call::RevokeLease, move |s| s.revoke_lease(lease))
    }
    fn txn(&self, txn: Txn) -> StoreFuture<'_, TxnResult> {
        Box::pin(async move {
            self.admit(Call::Txn)?;
            tokio::task::yield_now().await;
            let delay = self.txn_delay_ms.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_millis(delay)).await;
            }
            if let Some(first) = self.before_txn.as_ref().and_then(|hook| hook(&txn)) {
                self.inner.txn(first).await?;
            }
            self.inner.txn(txn).await
        })
    }
    fn compact(&self, revision: Revision) -> StoreFuture<'_, ()> {
        self.forward(Call::Compact, move |s| s.compact(revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embedded::EmbeddedStore;
    use crate::store::{self, WatchItem};

    #[tokio::test]
    async fn counts_calls_fails_them_while_cut_and_ends_open_watches() {
        let store = TestStore::new(Arc::new(EmbeddedStore::new()));
        store::put(store.as_ref(), "/k".to_owned(), "v", 0)
            .await
            .expect("put");
        let mut watch = store
            .watch(KeyRange::prefix("/"), 1)
            .await
            .expect("watch opens");
        assert!(
            matches!(watch.next().await, Some(Ok(WatchItem::Events(_)))),
            "the put"
        );

        store.disconnect();
        assert_eq!(
            store.revision().await,
            Err(StoreError::Unavailable("test: connection cut".into()))
        );
        // Items already forwarded may still be read; then the stream ends.
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(item) = watch.next().await {
                assert!(item.is_ok(), "{item:?}");
            }
        });
        drained.await.expect("the open watch ended");
        store.reconnect();
        assert!(store.revision().await.is_ok());
        assert_eq!(
            (store.calls(Call::Txn), store.calls(Call::Revision)),
            (1, 2),
            "failed calls count too"
        );
    }

    #[tokio::test]
    async fn the_hook_runs_its_transaction_first() {
        let put = |value: &'static str| Txn {
            success: vec![crate::store::TxnOp::Put {
                key: "/k".into(),
                value: value.into(),
                lease: 0,
            }],
            ..Txn::default()
        };
        let store =
            TestStore::with_before_txn(Arc::new(EmbeddedStore::new()), move |_| Some(put("first")));
        let done = store.txn(put("second")).await.expect("txn");
        let kv = store::get(store.inner().as_ref(), "/k".to_owned())
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(kv.value, "second");
        assert_eq!(kv.create_revision + 1, kv.mod_revision, "two writes");
        assert_eq!(done.revision, kv.mod_revision);
    }
}

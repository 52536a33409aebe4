//! The etcd store on a three-member etcd with one member killed (kill -9): every request
//! still succeeds. etcd-client balances requests over all endpoints and keeps choosing the
//! dead member's (etcdv3/etcd-client#39); without the store's resend of requests whose
//! connection was refused, about a third of them failed, and a gateway with a 2 s lease TTL
//! lost its lease within seconds (docs/reliability.md, "leader killed").

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::within;
use meshup_federation::etcd::{EtcdOptions, EtcdStore};
use meshup_federation::store::{self, Store, Txn, TxnOp};
use meshup_test_support::EtcdCluster;

/// Requests of each kind sent with one member down.
const ROUNDS: usize = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_of_three_killed_every_request_still_succeeds() {
    let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .expect("etcd cluster");
    within(Duration::from_secs(60), async {
        let store = EtcdStore::connect(EtcdOptions {
            endpoints: cluster.endpoints(),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await
        .expect("connect to the three members");
        let lease = store
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        // A follower: the leader stays, so every failure below is the client's, not an
        // election's.
        let (leader, _) =
            tokio::task::block_in_place(|| cluster.wait_leader(None, Duration::from_secs(10)))
                .expect("a leader");
        let follower = (leader + 1) % meshup_test_support::etcd_cluster::MEMBERS;
        tokio::task::block_in_place(|| cluster.kill9(follower));

        let mut failed = Vec::new();
        for i in 0..ROUNDS {
            if let Err(e) = store.keep_alive(lease).await {
                failed.push(format!("keep-alive {i}: {e}"));
            }
            let put = Txn {
                success: vec![TxnOp::Put {
                    key: Bytes::from(format!("/members/{i}")),
                    value: Bytes::from_static(b"v"),
                    lease,
                }],
                ..Default::default()
            };
            if let Err(e) = store.txn(put).await {
                failed.push(format!("put {i}: {e}"));
            }
            match store::list_prefix(&store, b"/members/").await {
                Ok((kvs, _)) if kvs.len() == i + 1 => {}
                Ok((kvs, _)) => failed.push(format!("list {i}: {} keys", kvs.len())),
                Err(e) => failed.push(format!("list {i}: {e}")),
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {} requests failed with member {follower} of 3 killed (leader {leader}):\n{}",
            failed.len(),
            3 * ROUNDS,
            failed.join("\n")
        );
    })
    .await;
}

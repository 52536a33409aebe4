//! The etcd store on a three-member etcd with one member killed (kill -9) or stopped
//! (SIGSTOP): every request still succeeds, and a stopped member does not cost a small request
//! its deadline. etcd-client balances requests over all endpoints and keeps choosing the
//! dead member's (etcdv3/etcd-client#39); without the store's resend of requests whose
//! connection was refused, about a third of them failed, and a gateway with a 2 s lease TTL
//! lost its lease within seconds (docs/reliability.md, "leader killed").

mod common;

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::within;
use meshup_federation::etcd::{EtcdOptions, EtcdStore, HEDGE_AFTER};
use meshup_federation::store::{self, Store, StoreError, Txn, TxnOp};
use meshup_test_support::EtcdCluster;

/// Requests of each kind sent with one member killed.
const ROUNDS: usize = 30;
/// Requests of each kind sent with one member stopped (a third of them wait for a hedge).
const STOPPED_ROUNDS: usize = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_of_three_killed_every_request_still_succeeds() {
    let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .expect("etcd cluster");
    within(Duration::from_secs(60), async {
        let store = connect(&cluster, Duration::from_secs(2)).await;
        let lease = store
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        let (leader, follower) = leader_and_follower(&cluster);
        tokio::task::block_in_place(|| cluster.kill9(follower));

        let mut failed = Vec::new();
        for i in 0..ROUNDS {
            if let Err(e) = store.keep_alive(lease).await {
                failed.push(format!("keep-alive {i}: {e}"));
            }
            if let Err(e) = store.txn(put(i, lease)).await {
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

/// A stopped member keeps its connections open and answers nothing, like a hung process or
/// a partition the client has not noticed. Requests the store hedges (lease keep-alives and
/// grants, revisions, writes without a compare: all a gateway's publisher sends) must not
/// wait out their deadline when balanced to it: each is sent again after `HEDGE_AFTER`, to a
/// member with fewer requests pending. Without the hedge about a third of them timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_member_of_three_stopped_small_requests_answer_within_a_hedge() {
    const DEADLINE: Duration = Duration::from_secs(3);
    let mut cluster = tokio::task::spawn_blocking(EtcdCluster::start)
        .await
        .expect("etcd cluster");
    within(Duration::from_secs(90), async {
        let store = connect(&cluster, DEADLINE).await;
        let lease = store
            .grant_lease(Duration::from_secs(30))
            .await
            .expect("lease");
        let (leader, follower) = leader_and_follower(&cluster);
        tokio::task::block_in_place(|| cluster.stop(follower));

        let mut took = Vec::new();
        let mut failed = Vec::new();
        for i in 0..STOPPED_ROUNDS {
            timed(format!("keep-alive {i}"), store.keep_alive(lease), &mut took, &mut failed).await;
            timed(format!("put {i}"), store.txn(put(i, lease)), &mut took, &mut failed).await;
            timed(format!("revision {i}"), store.revision(), &mut took, &mut failed).await;
            timed(
                format!("grant {i}"),
                store.grant_lease(Duration::from_secs(5)),
                &mut took,
                &mut failed,
            )
            .await;
        }
        took.sort();
        let hedged = took.iter().filter(|t| **t >= HEDGE_AFTER).count();
        let figures = format!(
            "{} requests with member {follower} of 3 stopped (leader {leader}): median {:?}, slowest {:?}, {hedged} answered only after a hedge",
            took.len(),
            took[took.len() / 2],
            took.last().copied().unwrap_or_default(),
        );
        eprintln!("{figures}");
        assert!(
            failed.is_empty(),
            "{} failed within the {DEADLINE:?} deadline; {figures}:\n{}",
            failed.len(),
            failed.join("\n")
        );
        // The stopped member did hold some of them: otherwise this tested nothing.
        assert!(hedged > 0, "no request met the stopped member; {figures}");
        // And no request needed a second hedge: the balancer sends the copy of a held
        // request to a member with fewer requests pending, so never to the stopped one.
        let slowest = took.last().copied().unwrap_or_default();
        assert!(
            slowest < 2 * HEDGE_AFTER,
            "a request took {slowest:?}, more than one hedge; {figures}"
        );
        tokio::task::block_in_place(|| cluster.resume(follower));
    })
    .await;
}

async fn connect(cluster: &EtcdCluster, request_timeout: Duration) -> EtcdStore {
    EtcdStore::connect(EtcdOptions {
        endpoints: cluster.endpoints(),
        request_timeout,
        ..Default::default()
    })
    .await
    .expect("connect to the three members")
}

/// The leader and a follower: with the leader left running, every failure is the client's,
/// not an election's.
fn leader_and_follower(cluster: &EtcdCluster) -> (usize, usize) {
    let (leader, _) =
        tokio::task::block_in_place(|| cluster.wait_leader(None, Duration::from_secs(10)))
            .expect("a leader");
    (
        leader,
        (leader + 1) % meshup_test_support::etcd_cluster::MEMBERS,
    )
}

/// A write without a compare, under `lease`.
fn put(i: usize, lease: store::LeaseId) -> Txn {
    Txn {
        success: vec![TxnOp::Put {
            key: Bytes::from(format!("/members/{i}")),
            value: Bytes::from_static(b"v"),
            lease,
        }],
        ..Default::default()
    }
}

/// Awaits `request`, recording how long it took, or what it failed with.
async fn timed<T>(
    what: String,
    request: impl Future<Output = Result<T, StoreError>>,
    took: &mut Vec<Duration>,
    failed: &mut Vec<String>,
) {
    let started = Instant::now();
    match request.await {
        Ok(_) => took.push(started.elapsed()),
        Err(e) => failed.push(format!("{what}: {e} after {:?}", started.elapsed())),
    }
}

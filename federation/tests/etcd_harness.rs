//! The etcd harness itself: start, write, kill -9, restart on the same data, stop.

mod common;

use common::etcd::EtcdServer;

#[test]
fn etcd_harness_survives_kill_and_restart() {
    let mut etcd = EtcdServer::start();
    etcd.etcdctl(&["put", "/harness/a", "1"]).expect("put");
    let rev = etcd.revision().expect("revision");
    assert!(rev >= 2, "revision {rev}");
    etcd.kill9();
    // A later flag overrides the harness default, so the dead endpoint fails fast.
    let dead = etcd.etcdctl(&["--command-timeout=1s", "get", "/harness/a"]);
    assert!(dead.is_err(), "etcd is dead");
    etcd.restart();
    let out = etcd
        .etcdctl(&["get", "/harness/a", "--print-value-only"])
        .expect("get");
    assert_eq!(out.trim(), "1", "data dir kept across restart");
    etcd.etcdctl_with_stdin(&["put", "/harness/big"], Some(&vec![b'x'; 70_000]))
        .expect("put from stdin");
    etcd.stop();
    assert!(!etcd.is_running());
    etcd.restart();
    assert!(etcd.revision().expect("revision") > rev);
}

/// The three-member harness: a leader a quorum follows, a new one after kill -9 of it, none
/// while two members are stopped, one again after they resume.
#[test]
fn three_members_elect_a_new_leader_after_kill_9_and_none_without_quorum() {
    use meshup_test_support::EtcdCluster;
    use std::time::Duration;

    let mut cluster = EtcdCluster::start();
    assert_eq!(cluster.endpoints().len(), 3);
    let (old, _) = cluster
        .wait_leader(None, Duration::from_secs(10))
        .expect("a leader");
    cluster.etcdctl(&["put", "/members/a", "1"]).expect("put");
    cluster.kill9(old);
    let (new, _) = cluster
        .wait_leader(Some(old), Duration::from_secs(10))
        .expect("a new leader");
    assert_ne!(new, old);
    let out = cluster
        .etcdctl(&["get", "/members/a", "--print-value-only"])
        .expect("get from the two left");
    assert_eq!(out.trim(), "1");
    cluster.restart(old);
    assert_eq!(cluster.answering().len(), 3);

    // Two of three stopped: the one left answers its status but follows no quorum.
    let leader = cluster.leader().expect("a leader with all three back");
    let other = (leader + 1) % 3;
    cluster.stop(leader);
    cluster.stop(other);
    assert_eq!(cluster.answering().len(), 1);
    assert_eq!(cluster.leader(), None);
    assert!(
        cluster
            .etcdctl(&["--command-timeout=1s", "put", "/members/b", "2"])
            .is_err(),
        "no write without a quorum"
    );
    cluster.resume(leader);
    cluster.resume(other);
    cluster
        .wait_leader(None, Duration::from_secs(10))
        .expect("a leader once two answer again");
    cluster
        .etcdctl(&["put", "/members/b", "2"])
        .expect("put with quorum back");
}

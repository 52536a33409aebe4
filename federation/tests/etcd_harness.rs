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

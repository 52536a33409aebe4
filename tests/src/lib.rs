//! Test harness shared by the integration tests and the benchmarks: a real etcd server
//! (plain or TLS), a real headless Chromium, the `meshup` binary and real gateway processes,
//! the three-cluster failover federation, free loopback ports, network namespaces playing nodes and pods, polling helpers, a throw-away
//! TLS PKI, two gateways with a relay on the link between them, a new-connection workload with its fault checker, child processes ended with
//! their process group, background samplers (a dig loop, metrics, catalog keys) with
//! timestamps, the benchmarks' gateway pair, CPU meter, options, work dir and backend server, nginx `stream` and `http` peers, HTTP/1.1, h2c and gRPC backends naming their cluster, a hostile h2 client driven frame by frame, and the Grafana dashboard checked against
//! `/metrics`.

pub mod bench;
pub mod browser;
pub mod cpu;
pub mod dashboard;
pub mod dns;
pub mod failover;
pub mod gateway_pair;
pub mod gateways;
pub mod h2_raw;
pub mod hostile;
pub mod http;
pub mod link;
pub mod meshup;
pub mod netns;
pub mod nginx;
pub mod procs;
pub mod sampler;
pub mod scale;
pub mod web;
pub mod workload;

pub use meshup::{meshup, meshup_bin};
pub use meshup_test_support::{
    EtcdCluster, EtcdEndpoints, EtcdServer, assert_eventually, etcd, etcd_cluster, etcdctl_at,
    eventually, eventually_ok, free_port, poll_every, poll_until, relay, tls,
};

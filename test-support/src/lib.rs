//! Test helpers that every suite shares (the crate's own unit tests, the workspace-level
//! integration tests in `tests/`, the benchmarks) and that depend on no meshup crate, so a
//! crate's own tests can use them without building the gateway:
//!
//! - [`etcd`]: a real etcd on a free loopback port with a temp data dir (or a 3-member
//!   cluster), started and stopped by the test;
//! - [`tls`]: a test PKI (CA, server and client certificates) for etcd over TLS and the peers
//!   benchmarks compare against;
//! - [`eventually`]: waiting on a condition with a deadline instead of sleeping;
//! - [`relay`]: a UDP relay that makes a link lossy, slow, duplicating, reordering or
//!   partitioned (this kernel has no `tc netem`).

pub mod etcd;
pub mod etcd_cluster;
pub mod eventually;
pub mod relay;
pub mod tls;

pub use etcd::{EtcdEndpoints, EtcdServer, etcdctl_at, free_port};
pub use etcd_cluster::EtcdCluster;
pub use eventually::{assert_eventually, eventually_ok, poll_every, poll_until};

//! Test harness shared by the integration tests: a real etcd server and polling helpers.

pub mod etcd;
pub mod eventually;

pub use etcd::EtcdServer;
pub use eventually::{assert_eventually, eventually_ok};

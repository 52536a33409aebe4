//! Test harness shared by the integration tests: a real etcd server, the `meshup` binary,
//! free loopback ports and polling helpers.

pub mod etcd;
pub mod eventually;
pub mod meshup;

pub use etcd::{EtcdServer, free_port};
pub use eventually::{assert_eventually, eventually_ok};
pub use meshup::meshup_bin;

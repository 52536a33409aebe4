//! Test harness shared by the integration tests: a real etcd server (plain or TLS), the
//! `meshup` binary and real gateway processes, free loopback ports, polling helpers, a
//! throw-away TLS PKI, and a new-connection workload with its fault checker.

pub mod etcd;
pub mod eventually;
pub mod gateways;
pub mod http;
pub mod meshup;
pub mod tls;
pub mod workload;

pub use etcd::{EtcdServer, free_port};
pub use eventually::{assert_eventually, eventually_ok, poll_until};
pub use meshup::meshup_bin;

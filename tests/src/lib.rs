//! Test harness shared by the integration tests: a real etcd server (plain or TLS), the
//! `meshup` binary, free loopback ports, polling helpers and a throw-away TLS PKI.

pub mod etcd;
pub mod eventually;
pub mod http;
pub mod meshup;
pub mod tls;

pub use etcd::{EtcdServer, free_port};
pub use eventually::{assert_eventually, eventually_ok};
pub use meshup::meshup_bin;

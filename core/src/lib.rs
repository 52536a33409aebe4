//! meshup-core: the vocabulary every other meshup crate shares.
//!
//! Pure code only: no sockets, no etcd, no QUIC, no DNS server. What is here takes values and
//! returns values, so it is table-tested and fuzzed without a network.
//!
//! - [`names`]: validated cluster, namespace, service and port names.
//! - [`identity`]: SPIFFE IDs and gateway identities, parsed strictly.
//! - [`model`]: the catalog records gateways publish (JSON with a schema version) and their
//!   validation.
//! - [`policy`]: the failover policy and drill records operators write, and their
//!   validation (the decision that uses them is the `meshup-policy` crate).
//! - [`tunnel`]: the tunnel stream header and status codec.
//! - [`catalog`]: the immutable, cheaply cloned catalog snapshot and the changes applied to it.
//! - `fixture` (tests only: this crate's, or others' with the `test-util` feature): record,
//!   change and snapshot builders with the values most tests want.

pub mod catalog;
#[cfg(any(test, feature = "test-util"))]
pub mod fixture;
pub mod identity;
pub mod model;
pub mod names;
pub mod policy;
pub mod routes;
pub mod tunnel;

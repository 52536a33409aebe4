//! meshup-dns: the gateway's authoritative DNS for clusterset names.
//!
//! Follows the Kubernetes Multi-Cluster Services DNS specification v1.0.0 for the zone
//! `clusterset.local` (configurable); see [`answer`] for the names served.
//!
//! Design, outside in:
//! - [`DnsServer`] binds UDP and TCP at start-up, then runs until a `CancellationToken`
//!   fires. It reads the catalog from a `watch::Receiver<Arc<Snapshot>>` and never locks on
//!   the hot path. UDP is served by dedicated worker threads (sharing one socket,
//!   `recvmmsg`/`sendmmsg` batches); TCP by a capped accept loop with per-connection
//!   deadlines (see [`server`]).
//! - The **fast path** ([`wire`]): every answer of the current snapshot precomputed in wire
//!   form, keyed by lowercased name and type; a UDP query is answered by copying a template
//!   and patching ID, RD, question case and EDNS.
//! - The **slow path** ([`handler`]): hickory's `Catalog` with [`handler::ClustersetZone`]
//!   as its `ZoneHandler`, for TCP and for anything the fast path declines. It answers from
//!   the newest snapshot, so a catalog change is visible to the next query even before the
//!   fast table for it is published.
//! - Both paths take their records from one pure function, [`answer::resolve`].
//!
//! Safety rules (docs/reliability.md 17–19): authoritative only (REFUSED outside the zone,
//! RA=0, no recursion), UDP answers within the client's EDNS size (512 without) with TC=1
//! when cut, minimal ANY (RFC 8482), responses (QR=1) never answered, malformed queries
//! answered FORMERR or dropped (FORMERR over UDP within an error budget, [`budget`]), TCP
//! connections capped and under read deadlines.

pub mod answer;
pub mod budget;
pub mod config;
pub mod fixture;
pub mod fuzzing;
pub mod handler;
pub mod metrics;
pub mod server;
pub mod wire;

#[cfg(test)]
mod agreement_tests;

pub use config::DnsConfig;
pub use metrics::Metrics;
pub use server::{DnsError, DnsServer};

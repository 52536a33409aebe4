//! The failover and traffic decision of meshup, as pure code.
//!
//! A gateway asks this crate, for every new connection: given the service's policy, what the
//! catalog says of each cluster, the live health this gateway has observed, the operators'
//! drills, and a random draw, which clusters should be tried, in which order, and why each
//! other cluster is not. The outbound path only asks, attempts and reports outcomes back
//! (see `docs/policy.md`).
//!
//! - [`record`]: the policy record (`<prefix>/v1/policies/<ns>/<name>`) and the drill record
//!   (`<prefix>/v1/drills/<id>`), versioned JSON, validated like every catalog record.
//! - [`health`]: live health per (service, cluster) and per peer cluster: outlier detection
//!   with growing ejections, failback hold-down, circuit-breaker counts, the retry budget.
//! - [`decide`]: the decision and its explanation.
//!
//! Nothing here reads a clock: every function that depends on time takes `now` (a monotonic
//! [`std::time::Instant`] for health, Unix seconds for drills, which carry wall-clock expiry).

pub mod decide;
pub mod health;
/// The records live in `meshup-core` with every other catalog record; re-exported here.
pub mod record {
    pub use meshup_core::policy::*;
}

pub use decide::{
    ClusterState, Decision, Excluded, Explanation, Inputs, Locality, Verdict, decide,
};
pub use health::{Health, Outcome, PeerSignal};
pub use record::{DrillKind, DrillRecord, PolicyRecord, RecordError};

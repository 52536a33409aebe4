//! Policy and drill records: what operators write, as versioned JSON in the catalog store.
//!
//! Both follow the catalog's evolution rule (docs/records.md): `schema` is the major version,
//! `schema_minor` the minor, unknown fields are ignored, and a record of another major is
//! skipped. Everything else about a record is checked by `validate`, which says what is wrong
//! in words an operator can act on; a bad record is skipped and the previous good one (or the
//! default) stays in force.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::names::{ClusterName, ServiceKey};
use serde::{Deserialize, Serialize};

/// The major schema version of policy and drill records.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest record accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most priority levels, and most clusters in one level.
pub const MAX_LEVELS: usize = 16;
pub const MAX_LEVEL_CLUSTERS: usize = 256;
/// Largest weight of one cluster in a level.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most attempts (the first one and retries) at one new connection.
pub const MAX_ATTEMPTS: u32 = 10;
/// Longest a drill may last: a forgotten drill ends by itself.
pub const MAX_DRILL_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// Longest free text (who, why) of a drill.
pub const MAX_DRILL_TEXT: usize = 512;

/// Default consecutive failures that eject a cluster (Envoy's `consecutive_5xx`).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// Default first ejection; the n-th ejection lasts n times as long, up to the maximum.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
/// Default largest share of a service's clusters ejected at once. Unlike Envoy's 10 % (which
/// with few clusters means "never"), a federation has a handful of clusters: half of them.
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;
/// Default time a recovered cluster must stay healthy before it takes its traffic back.
pub const DEFAULT_FAILBACK_HOLD_DOWN: Duration = Duration::from_secs(30);
/// Default over-provisioning factor of spill-over, in percent (Envoy's 1.4): a level keeps all
/// of its traffic down to 1/1.4 ≈ 71 % healthy capacity and spills the rest.
pub const DEFAULT_OVERPROVISIONING_PERCENT: u32 = 140;
/// Default circuit-breaker limits per target cluster.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
pub const DEFAULT_MAX_PENDING: u32 = 1_000;
/// Default attempts per connection and retry budget (Envoy: 20 % of active, minimum 3).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Retries per second always allowed, whatever the budget.
pub const DEFAULT_MIN_RETRIES: u32 = 3;

/// Why a policy or drill record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("value is {len} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("value is not valid JSON for this record: {0}")]
    Decode(String),
    #[error(
        "schema version {found} is not supported (this gateway reads version {SCHEMA_VERSION})"
    )]
    UnsupportedSchema { found: u32 },
    #[error("level {level} lists no cluster")]
    EmptyLevel { level: usize },
    #[error("cluster {cluster} is listed twice (levels {first} and {second})")]
    DuplicateCluster {
        cluster: ClusterName,
        first: usize,
        second: usize,
    },
    #[error("the weights of level {level} sum to zero: no cluster of it could get traffic")]
    ZeroWeights { level: usize },
    #[error("{what} is {value}, outside {min}..={max}")]
    OutOfRange {
        what: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("local_only and priority levels contradict each other: drop one")]
    LocalOnlyWithLevels,
    #[error("outlier detection: max_ejection ({max:?}) is shorter than base_ejection ({base:?})")]
    EjectionOrder { base: Duration, max: Duration },
    #[error("a drill needs {0}: who did it and why are the audit trail")]
    MissingAudit(&'static str),
    #[error("{0} is longer than {MAX_DRILL_TEXT} bytes")]
    TextTooLong(&'static str),
    #[error("a drill must expire after it starts (created {created}, expires {expires})")]
    ExpiresBeforeCreated { created: i64, expires: i64 },
    #[error("a drill may last at most {} days; set an earlier expiry", MAX_DRILL_LIFETIME.as_secs() / 86_400)]
    TooLong,
    #[error("a pin drill needs the service whose traffic it pins")]
    PinWithoutService,
    #[error("a drill audit entry needs ended_by: who ended the drill")]
    MissingEndedBy,
    #[error("a drill cannot have expired at {ended}, before its expiry at {expires}")]
    ExpiredEarly { ended: i64, expires: i64 },
}

/// Decodes a record: size limit first, then JSON. A record of another major schema is named
/// as such even when its fields no longer decode as ours.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    #[derive(Deserialize)]
    struct SchemaOnly {
        schema: u32,
    }
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RecordError::TooLarge { len: bytes.len() });
    }
    serde_json::from_slice(bytes).map_err(|e| match serde_json::from_slice::<SchemaOnly>(bytes) {
        Ok(s) if s.schema != SCHEMA_VERSION => RecordError::UnsupportedSchema { found: s.schema },
        _ => RecordError::Decode(e.to_string()),
    })
}

fn check_schema(found: u32) -> Result<(), RecordError> {
    if found == SCHEMA_VERSION {
        Ok(())
    } else {
        Err(RecordError::UnsupportedSchema { found })
    }
}

fn check_range(what: &'static str, value: u64, min: u64, max: u64) -> Result<(), RecordError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(RecordError::OutOfRange {
            what,
            value,
            min,
            max,
        })
    }
}

// === policy ===

/// Failover and traffic policy of one clusterset service.
/// Key: `<prefix>/v1/policies/<ns>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub schema: u32,
    #[serde(default)]
    pub schema_minor: u32,
    /// Priority levels, best first; traffic goes to the first level with healthy capacity and
    /// spills to the next in proportion to what it lost. Empty: the default locality order
    /// (this cluster, then its zone, its region, then the rest by measured RTT). Clusters
    /// listed in no level get no traffic.
    #[serde(default)]
    pub levels: Vec<Level>,
    /// Only this cluster's own endpoints; never another cluster.
    #[serde(default)]
    pub local_only: bool,
    #[serde(default)]
    pub min_healthy: MinHealthy,
    /// Spill-over factor in percent: a level's share is min(100, factor × healthy %).
    #[serde(default = "default_overprovisioning")]
    pub overprovisioning_percent: u32,
    #[serde(default)]
    pub outlier: OutlierDetection,
    /// A recovered cluster takes its traffic back only after staying healthy this long.
    #[serde(default = "default_hold_down", with = "humantime_serde")]
    pub failback_hold_down: Duration,
    #[serde(default)]
    pub circuit: CircuitBreaker,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Who wrote this record through the admin API: an operator's certificate name, or the
    /// caller on the gateway's loopback listener (`local`). Set by the gateway, never taken
    /// from the writer's JSON. Absent in records written before it existed, or by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
    /// When (Unix seconds) the admin API wrote this record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
}

/// One priority level: clusters that share traffic by weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    pub clusters: Vec<Member>,
}

/// A cluster of a level and its weight within it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub cluster: ClusterName,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Below this many healthy endpoints (and this share of its endpoints), a cluster is not a
/// candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinHealthy {
    #[serde(default = "default_min_endpoints")]
    pub endpoints: u32,
    #[serde(default)]
    pub percent: u32,
}

/// Passive outlier detection of a target cluster, from the outcomes of attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierDetection {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

/// Limits per target cluster; over them, the next candidate (or a fast refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CircuitBreaker {
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
}

/// Retries before any byte went upstream: at most `max_attempts` per connection, and retries
/// at most `budget_percent` of recent connections, but always `min_retries` per second, so a
/// quiet service can still fail over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    #[serde(default = "default_min_retries")]
    pub min_retries: u32,
}

fn default_weight() -> u32 {
    1
}
fn default_min_endpoints() -> u32 {
    1
}
fn default_overprovisioning() -> u32 {
    DEFAULT_OVERPROVISIONING_PERCENT
}
fn default_hold_down() -> Duration {
    DEFAULT_FAILBACK_HOLD_DOWN
}
fn default_consecutive_failures() -> u32 {
    DEFAULT_CONSECUTIVE_FAILURES
}
fn default_base_ejection() -> Duration {
    DEFAULT_BASE_EJECTION
}
fn default_max_ejection() -> Duration {
    DEFAULT_MAX_EJECTION
}
fn default_max_ejected_percent() -> u32 {
    DEFAULT_MAX_EJECTED_PERCENT
}
fn default_max_connections() -> u32 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_max_pending() -> u32 {
    DEFAULT_MAX_PENDING
}
fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}
fn default_budget_percent() -> u32 {
    DEFAULT_RETRY_BUDGET_PERCENT
}
fn default_min_retries() -> u32 {
    DEFAULT_MIN_RETRIES
}

impl Default for MinHealthy {
    fn default() -> Self {
        Self {
            endpoints: default_min_endpoints(),
            percent: 0,
        }
    }
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejected_percent: DEFAULT_MAX_EJECTED_PERCENT,
        }
    }
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_pending: DEFAULT_MAX_PENDING,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
            min_retries: DEFAULT_MIN_RETRIES,
        }
    }
}

impl Default for PolicyRecord {
    /// The policy of a service that has none: default locality order, default limits.
    fn default() -> Self {
        Self {
            schema: SCHEMA_VERSION,
            schema_minor: 0,
            levels: Vec::new(),
            local_only: false,
            min_healthy: MinHealthy::default(),
            overprovisioning_percent: DEFAULT_OVERPROVISIONING_PERCENT,
            outlier: OutlierDetection::default(),
            failback_hold_down: DEFAULT_FAILBACK_HOLD_DOWN,
            circuit: CircuitBreaker::default(),
            retry: RetryPolicy::default(),
            updated_by: None,
            updated_at: None,
        }
    }
}

impl PolicyRecord {
    /// Whether two records say the same thing, whoever wrote them and when.
    pub fn same_rules(&self, other: &Self) -> bool {
        let rules = |r: &Self| Self {
            updated_by: None,
            updated_at: None,
            ..r.clone()
        };
        rules(self) == rules(other)
    }

    /// Rejects a policy that cannot work, saying why.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        if self
            .updated_by
            .as_ref()
            .is_some_and(|w| w.len() > MAX_DRILL_TEXT)
        {
            return Err(RecordError::TextTooLong("updated_by"));
        }
        check_range("levels", self.levels.len() as u64, 0, MAX_LEVELS as u64)?;
        if self.local_only && !self.levels.is_empty() {
            return Err(RecordError::LocalOnlyWithLevels);
        }
        let mut seen: Vec<(ClusterName, usize)> = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            if level.clusters.is_empty() {
                return Err(RecordError::EmptyLevel { level: i });
            }
            check_range(
                "clusters in a level",
                level.clusters.len() as u64,
                1,
                MAX_LEVEL_CLUSTERS as u64,
            )?;
            for m in &level.clusters {
                if let Some((_, first)) = seen.iter().find(|(c, _)| c == &m.cluster) {
                    return Err(RecordError::DuplicateCluster {
                        cluster: m.cluster.clone(),
                        first: *first,
                        second: i,
                    });
                }
                seen.push((m.cluster.clone(), i));
                check_range("weight", u64::from(m.weight), 0, u64::from(MAX_WEIGHT))?;
            }
            if level.clusters.iter().all(|m| m.weight == 0) {
                return Err(RecordError::ZeroWeights { level: i });
            }
        }
        check_range(
            "min_healthy.percent",
            u64::from(self.min_healthy.percent),
            0,
            100,
        )?;
        check_range(
            "overprovisioning_percent",
            u64::from(self.overprovisioning_percent),
            100,
            1000,
        )?;
        let o = &self.outlier;
        check_range(
            "outlier.consecutive_failures",
            u64::from(o.consecutive_failures),
            1,
            1000,
        )?;
        check_range(
            "outlier.max_ejected_percent",
            u64::from(o.max_ejected_percent),
            0,
            100,
        )?;
        check_range(
            "outlier.base_ejection (ms)",
            o.base_ejection.as_millis() as u64,
            1,
            3_600_000,
        )?;
        if o.max_ejection < o.base_ejection {
            return Err(RecordError::EjectionOrder {
                base: o.base_ejection,
                max: o.max_ejection,
            });
        }
        check_range(
            "failback_hold_down (s)",
            self.failback_hold_down.as_secs(),
            0,
            3600,
        )?;
        check_range(
            "circuit.max_connections",
            u64::from(self.circuit.max_connections),
            1,
            1 << 24,
        )?;
        check_range(
            "circuit.max_pending",
            u64::from(self.circuit.max_pending),
            1,
            1 << 24,
        )?;
        check_range(
            "retry.max_attempts",
            u64::from(self.retry.max_attempts),
            1,
            u64::from(MAX_ATTEMPTS),
        )?;
        check_range(
            "retry.budget_percent",
            u64::from(self.retry.budget_percent),
            0,
            100,
        )?;
        check_range(
            "retry.min_retries",
            u64::from(self.retry.min_retries),
            0,
            1000,
        )?;
        Ok(())
    }

    /// Every cluster the levels name, with its level.
    pub fn level_of(&self, cluster: &ClusterName) -> Option<(usize, u32)> {
        self.levels.iter().enumerate().find_map(|(i, l)| {
            l.clusters
                .iter()
                .find(|m| &m.cluster == cluster)
                .map(|m| (i, m.weight))
        })
    }
}

// === drills ===

/// What a drill does to its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillKind {
    /// No new connections to the cluster; existing ones finish.
    Drain,
    /// The cluster is treated as dead, as in a real outage.
    Fail,
    /// The service's traffic goes to this cluster only.
    Pin,
}

impl DrillKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillKind::Drain => "drain",
            DrillKind::Fail => "fail",
            DrillKind::Pin => "pin",
        }
    }
}

/// An operator override. Key: `<prefix>/v1/drills/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillRecord {
    pub schema: u32,
    #[serde(default)]
    pub schema_minor: u32,
    pub kind: DrillKind,
    pub cluster: ClusterName,
    /// One service only; none: every service (not allowed for `pin`).
    #[serde(default)]
    pub service: Option<ServiceKey>,
    pub who: String,
    pub why: String,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds; mandatory, so a forgotten drill ends by itself.
    pub expires: i64,
}

impl DrillRecord {
    /// Rejects a drill without its audit fields, with a bad lifetime, or a pin without a
    /// service.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        if self.who.trim().is_empty() {
            return Err(RecordError::MissingAudit("who"));
        }
        if self.why.trim().is_empty() {
            return Err(RecordError::MissingAudit("why"));
        }
        if self.who.len() > MAX_DRILL_TEXT {
            return Err(RecordError::TextTooLong("who"));
        }
        if self.why.len() > MAX_DRILL_TEXT {
            return Err(RecordError::TextTooLong("why"));
        }
        if self.expires <= self.created {
            return Err(RecordError::ExpiresBeforeCreated {
                created: self.created,
                expires: self.expires,
            });
        }
        if self.expires - self.created > MAX_DRILL_LIFETIME.as_secs() as i64 {
            return Err(RecordError::TooLong);
        }
        if self.kind == DrillKind::Pin && self.service.is_none() {
            return Err(RecordError::PinWithoutService);
        }
        Ok(())
    }

    /// Whether the drill is in force at `unix_now`.
    pub fn active(&self, unix_now: i64) -> bool {
        self.created <= unix_now && unix_now < self.expires
    }

    /// Whether the drill applies to `service`.
    pub fn covers(&self, service: &ServiceKey) -> bool {
        self.service.as_ref().is_none_or(|s| s == service)
    }
}

/// How a drill ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillEnd {
    /// An operator stopped it before its expiry.
    Stopped,
    /// Its expiry passed and a gateway ended it.
    Expired,
}

impl DrillEnd {
    pub fn as_str(self) -> &'static str {
        match self {
            DrillEnd::Stopped => "stopped",
            DrillEnd::Expired => "expired",
        }
    }
}

/// Who ends a drill whose expiry passed, in its audit entry.
pub const EXPIRY_ACTOR: &str = "meshup";

/// How a drill ended: the drill as it last stood, when, how and by whom. Written once per
/// drill, in the transaction that deletes the drill, so a drill is either in force or audited,
/// never both and never neither (docs/policy.md). Key: `<prefix>/v1/drill-audit/<id>`; the
/// watcher does not read it into the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillAudit {
    pub schema: u32,
    #[serde(default)]
    pub schema_minor: u32,
    /// The drill as it was when it ended.
    pub drill: DrillRecord,
    /// Unix seconds.
    pub ended: i64,
    pub how: DrillEnd,
    /// The operator who stopped it, or [`EXPIRY_ACTOR`] for an expiry.
    pub ended_by: String,
    /// The store revision the drill was created at, when known: tells two drills of one id
    /// apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_revision: Option<i64>,
}

impl DrillAudit {
    /// Rejects an audit entry that cannot be true: a bad drill, no one who ended it, or an
    /// expiry recorded before the drill's expiry.
    pub fn validate(&self) -> Result<(), RecordError> {
        check_schema(self.schema)?;
        self.drill.validate()?;
        if self.ended_by.trim().is_empty() {
            return Err(RecordError::MissingEndedBy);
        }
        if self.ended_by.len() > MAX_DRILL_TEXT {
            return Err(RecordError::TextTooLong("ended_by"));
        }
        if self.how == DrillEnd::Expired && self.ended < self.drill.expires {
            return Err(RecordError::ExpiredEarly {
                ended: self.ended,
                expires: self.drill.expires,
            });
        }
        if let Some(revision) = self.created_revision {
            let value = u64::try_from(revision).unwrap_or(0);
            check_range("created_revision", value, 1, i64::MAX as u64)?;
        }
        Ok(())
    }
}

/// The clusters a policy names, for checks elsewhere.
pub fn named_clusters(policy: &PolicyRecord) -> BTreeSet<ClusterName> {
    policy
        .levels
        .iter()
        .flat_map(|l| l.clusters.iter().map(|m| m.cluster.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Result<PolicyRecord, RecordError> {
        let p: PolicyRecord = decode(json.as_bytes())?;
        p.validate()?;
        Ok(p)
    }

    #[test]
    fn a_minimal_policy_gets_every_default() {
        let p = policy(r#"{"schema":1}"#).expect("valid");
        assert_eq!(p, PolicyRecord::default());
        let p = policy(
            r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":80},{"cluster":"north","weight":20}]},{"clusters":[{"cluster":"east"}]}],
                "failback_hold_down":"10s","outlier":{"consecutive_failures":3,"base_ejection":"2s"}}"#,
        )
        .expect("valid");
        assert_eq!(p.levels.len(), 2);
        assert_eq!(p.levels[1].clusters[0].weight, 1);
        assert_eq!(p.failback_hold_down, Duration::from_secs(10));
        assert_eq!(p.outlier.consecutive_failures, 3);
        assert_eq!(p.outlier.base_ejection, Duration::from_secs(2));
        assert_eq!(p.outlier.max_ejection, DEFAULT_MAX_EJECTION);
        let west = ClusterName::new("west").expect("valid");
        assert_eq!(p.level_of(&west), Some((0, 80)));
    }

    #[test]
    fn policies_that_cannot_work_are_rejected_with_the_reason() {
        let table: &[(&str, &str)] = &[
            (r#"{"schema":2}"#, "schema version 2"),
            (
                r#"{"schema":1,"levels":[{"clusters":[]}]}"#,
                "level 0 lists no cluster",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]},{"clusters":[{"cluster":"west"}]}]}"#,
                "west is listed twice (levels 0 and 1)",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":0},{"cluster":"east","weight":0}]}]}"#,
                "weights of level 0 sum to zero",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":10001}]}]}"#,
                "weight is 10001",
            ),
            (
                r#"{"schema":1,"local_only":true,"levels":[{"clusters":[{"cluster":"west"}]}]}"#,
                "local_only and priority levels",
            ),
            (
                r#"{"schema":1,"outlier":{"base_ejection":"60s","max_ejection":"10s"}}"#,
                "max_ejection",
            ),
            (
                r#"{"schema":1,"retry":{"max_attempts":0}}"#,
                "retry.max_attempts is 0",
            ),
            (
                r#"{"schema":1,"overprovisioning_percent":50}"#,
                "overprovisioning_percent is 50",
            ),
            (
                r#"{"schema":1,"min_healthy":{"percent":101}}"#,
                "min_healthy.percent is 101",
            ),
            (
                r#"{"schema":1,"failback_hold_down":"soon"}"#,
                "not valid JSON",
            ),
            (
                r#"{"schema":1,"levels":[{"clusters":[{"cluster":"West!"}]}]}"#,
                "not valid JSON",
            ),
            (r#"{"schema":"1"}"#, "not valid JSON"),
            ("not json", "not valid JSON"),
        ];
        for (json, want) in table {
            let err = policy(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let huge = format!(r#"{{"schema":1,"pad":"{}"}}"#, "x".repeat(MAX_RECORD_BYTES));
        assert!(matches!(policy(&huge), Err(RecordError::TooLarge { .. })));
    }

    #[test]
    fn policies_and_drills_of_a_newer_minor_are_read() {
        let p = policy(r#"{"schema":1,"schema_minor":5,"canary":{"cluster":"west"},"retry":{"max_attempts":2,"jitter":"5ms"}}"#)
            .expect("a newer minor is read");
        assert_eq!(p.retry.max_attempts, 2);
        let d: DrillRecord = decode(
            br#"{"schema":1,"schema_minor":2,"kind":"fail","cluster":"west","who":"ana","why":"game day","created":100,"expires":200,"ticket":"OPS-1"}"#,
        )
        .expect("decodes");
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn the_author_fields_are_optional_both_ways() {
        // A record from before the author fields: read, no author.
        let before = policy(r#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]}]}"#)
            .expect("an old record is read");
        assert_eq!(
            (before.updated_by.as_deref(), before.updated_at),
            (None, None)
        );
        assert!(
            !serde_json::to_string(&before)
                .expect("json")
                .contains("updated_"),
            "a record without an author is written without the fields"
        );
        // A record written now, read back; and read by a reader that knows none of its
        // fields beyond the schema (as an older gateway ignores fields it does not know).
        let mut now = before.clone();
        now.updated_by = Some("ana".into());
        now.updated_at = Some(1_796_000_000);
        let json = serde_json::to_string(&now).expect("json");
        assert!(
            json.contains(r#""updated_by":"ana","updated_at":1796000000"#),
            "{json}"
        );
        assert_eq!(policy(&json), Ok(now.clone()));
        assert!(now.same_rules(&before) && now != before);
        let mut other = now.clone();
        other.local_only = true;
        assert!(!other.same_rules(&now));
        #[derive(Deserialize)]
        struct Older {
            schema: u32,
            levels: Vec<Level>,
        }
        let older: Older = decode(json.as_bytes()).expect("an older reader skips the new fields");
        assert_eq!((older.schema, older.levels), (1, now.levels.clone()));
        let long = json.replace(r#""ana""#, &format!("{:?}", "a".repeat(MAX_DRILL_TEXT + 1)));
        assert_eq!(policy(&long), Err(RecordError::TextTooLong("updated_by")));
    }

    fn drill(kind: &str, service: Option<&str>, created: i64, expires: i64) -> String {
        let service = service.map_or(String::new(), |s| format!(r#","service":{s}"#));
        format!(
            r#"{{"schema":1,"kind":"{kind}","cluster":"west","who":"ana","why":"game day","created":{created},"expires":{expires}{service}}}"#
        )
    }

    #[test]
    fn drills_need_an_audit_trail_an_expiry_and_a_service_to_pin() {
        let pay = r#"{"namespace":"prod","name":"pay"}"#;
        let ok = [
            drill("drain", None, 100, 200),
            drill("fail", Some(pay), 100, 200),
            drill("pin", Some(pay), 100, 100 + 7 * 86_400),
        ];
        for json in &ok {
            let d: DrillRecord = decode(json.as_bytes()).expect(json);
            assert_eq!(d.validate(), Ok(()), "{json}");
        }
        let bad = [
            (drill("pin", None, 100, 200), "needs the service"),
            (
                drill("drain", None, 200, 200),
                "must expire after it starts",
            ),
            (
                drill("drain", None, 100, 101 + 7 * 86_400),
                "at most 7 days",
            ),
            (
                drill("drain", None, 100, 200).replace(r#""who":"ana""#, r#""who":" ""#),
                "needs who",
            ),
            (
                drill("drain", None, 100, 200).replace(r#""why":"game day""#, r#""why":"""#),
                "needs why",
            ),
            (drill("explode", None, 100, 200), "not valid JSON"),
            (
                drill("drain", None, 100, 200).replace(r#","expires":200"#, ""),
                "not valid JSON",
            ),
        ];
        for (json, want) in &bad {
            let err = decode::<DrillRecord>(json.as_bytes())
                .and_then(|d| d.validate())
                .expect_err(json)
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    fn audit(how: &str, ended: i64, extra: &str) -> String {
        format!(
            r#"{{"schema":1,"drill":{},"ended":{ended},"how":"{how}","ended_by":"meshup"{extra}}}"#,
            drill("drain", None, 100, 200)
        )
    }

    fn read_audit(json: &str) -> Result<DrillAudit, RecordError> {
        let a: DrillAudit = decode(json.as_bytes())?;
        a.validate()?;
        Ok(a)
    }

    #[test]
    fn a_drill_audit_round_trips_and_needs_no_revision() {
        let a = read_audit(&audit("expired", 200, r#","created_revision":42"#)).expect("valid");
        assert_eq!(
            (a.how, a.ended, a.ended_by.as_str(), a.created_revision),
            (DrillEnd::Expired, 200, EXPIRY_ACTOR, Some(42))
        );
        assert_eq!(a.drill.who, "ana");
        let bytes = serde_json::to_vec(&a).expect("encodes");
        assert_eq!(decode::<DrillAudit>(&bytes), Ok(a.clone()));
        // Without a revision the field is left out, and absent reads as none.
        let plain = DrillAudit {
            created_revision: None,
            ..a
        };
        let text = serde_json::to_string(&plain).expect("encodes");
        assert!(!text.contains("created_revision"), "{text}");
        assert_eq!(read_audit(&text), Ok(plain));
        let stopped =
            read_audit(&audit("stopped", 50, "")).expect("a stop may come before the start");
        assert_eq!((stopped.how, stopped.schema_minor), (DrillEnd::Stopped, 0));
    }

    #[test]
    fn drill_audits_of_a_newer_minor_are_read() {
        let json = format!(
            r#"{{"schema":1,"schema_minor":3,"drill":{},"ended":300,"how":"stopped","ended_by":"ana","approved_by":"bo","created_revision":7}}"#,
            drill("fail", None, 100, 200).replace(
                r#""schema":1,"#,
                r#""schema":1,"schema_minor":4,"ticket":"OPS-1","#
            )
        );
        let a = read_audit(&json).expect("a newer minor with unknown fields is read");
        assert_eq!(
            (a.schema_minor, a.drill.schema_minor, a.drill.kind, a.how),
            (3, 4, DrillKind::Fail, DrillEnd::Stopped)
        );
        assert_eq!(a.created_revision, Some(7));
    }

    #[test]
    fn drill_audits_that_cannot_be_true_are_rejected_with_the_reason() {
        let bad = [
            (
                audit("expired", 200, "")
                    .replace(r#"{"schema":1,"drill""#, r#"{"schema":2,"drill""#),
                "schema version 2",
            ),
            (audit("vanished", 200, ""), "not valid JSON"),
            (
                audit("expired", 199, ""),
                "expired at 199, before its expiry at 200",
            ),
            (
                audit("stopped", 150, "").replace(r#""ended_by":"meshup""#, r#""ended_by":" ""#),
                "needs ended_by",
            ),
            (
                audit("stopped", 150, "").replace(r#","ended_by":"meshup""#, ""),
                "not valid JSON",
            ),
            (
                audit("stopped", 150, "").replace(r#""who":"ana""#, r#""who":"""#),
                "needs who",
            ),
            (
                audit("stopped", 150, r#","created_revision":0"#),
                "created_revision is 0",
            ),
            (
                r#"{"schema":1,"ended":1,"how":"stopped","ended_by":"ana"}"#.to_owned(),
                "not valid JSON",
            ),
        ];
        for (json, want) in &bad {
            let err = read_audit(json).expect_err(json).to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn a_drill_is_active_from_creation_until_expiry_and_covers_its_service() {
        let d: DrillRecord = decode(
            drill(
                "fail",
                Some(r#"{"namespace":"prod","name":"pay"}"#),
                100,
                200,
            )
            .as_bytes(),
        )
        .expect("decodes");
        for (now, active) in [(99, false), (100, true), (199, true), (200, false)] {
            assert_eq!(d.active(now), active, "at {now}");
        }
        assert!(d.covers(&"pay.prod".parse().expect("key")));
        assert!(!d.covers(&"ledger.prod".parse().expect("key")));
    }
}

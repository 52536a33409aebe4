//! Policy files: what people write (YAML, the service named in the file, defaults left out)
//! to the catalog's record (`PolicyRecord`, JSON; docs/policy.md), and back.
//!
//! ```yaml
//! service: pay.prod
//! levels:
//!   - clusters:
//!       - {cluster: west, weight: 80}
//!       - {cluster: north, weight: 20}
//!   - clusters: [{cluster: east}]
//! failback_hold_down: 30s
//! ```
//!
//! Unlike the record in the catalog (whose unknown fields are ignored, for evolution), a file
//! is strict: a misspelt field is an error, not a silent default. Every error names the line
//! and the field: a wrong type or unknown field from the YAML parser's position, a policy
//! that cannot work (`PolicyRecord::validate`) from the field its error is about.

use std::time::Duration;

use meshup_core::names::{ClusterName, ServiceKey};
use meshup_core::policy::{self, PolicyRecord};
use serde::{Deserialize, Serialize};

use crate::convert::record_error_field;
pub use crate::file::FileError;
use crate::file::{find_line, yaml_error};

/// A policy file, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFile {
    pub service: ServiceKey,
    pub record: PolicyRecord,
}

impl PolicyFile {
    /// The record as the catalog stores it.
    pub fn json(&self) -> String {
        record_json(&self.record)
    }
}

/// The record as compact JSON, as the catalog stores it.
pub fn record_json(record: &PolicyRecord) -> String {
    serde_json::to_string(record).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

// The file's shape: the record's fields, all optional, unknown ones refused. A test checks
// that every field of the record is accepted, so the two cannot drift apart.

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(skip_serializing)]
    service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema_minor: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    levels: Option<Vec<LevelShape>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_only: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_healthy: Option<MinHealthyShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    overprovisioning_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outlier: Option<OutlierShape>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    failback_hold_down: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    circuit: Option<CircuitShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<RetryShape>,
    /// Who last wrote the stored policy and when, as `policy get` prints them: accepted so
    /// that file applies as it is, and replaced by the gateway with the writer of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_at: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct LevelShape {
    clusters: Vec<MemberShape>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MemberShape {
    cluster: ClusterName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MinHealthyShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoints: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct OutlierShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consecutive_failures: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    base_ejection: Option<Duration>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    max_ejection: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_ejected_percent: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CircuitShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_pending: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RetryShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    budget_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_retries: Option<u32>,
}

/// Reads a policy file. `service` is the service given on the command line, if any: the file
/// may leave `service:` out then, and must agree with it otherwise.
pub fn parse(text: &str, service: Option<&ServiceKey>) -> Result<PolicyFile, FileError> {
    crate::file::empty(
        text,
        "a policy file names its service and sets at least `levels` or `local_only` (see docs/policy.md)",
    )?;
    let shape: FileShape = serde_norway::from_str(text).map_err(|e| yaml_error(&e))?;
    let service = crate::file::service(
        text,
        shape.service.as_deref(),
        service,
        "service: pay.prod",
        "the policy",
    )?;
    let mut value = serde_json::to_value(&shape).map_err(|e| FileError {
        line: None,
        field: None,
        message: e.to_string(),
    })?;
    if let Some(map) = value.as_object_mut() {
        map.entry("schema")
            .or_insert(serde_json::Value::from(policy::SCHEMA_VERSION));
    }
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let record: PolicyRecord = policy::decode(&bytes).map_err(|e| FileError {
        line: None,
        field: record_error_field(&e),
        message: e.to_string(),
    })?;
    record.validate().map_err(|e| {
        let field = record_error_field(&e);
        FileError {
            line: line_of_record_error(text, &e),
            field,
            message: e.to_string(),
        }
    })?;
    Ok(PolicyFile { service, record })
}

/// A policy as a file people edit: `service:` first, then the record's fields in their order
/// (every default spelt out, so the file shows what is in force).
pub fn to_yaml(service: &ServiceKey, record: &PolicyRecord) -> String {
    let mut out = format!("service: {service}\n");
    match serde_norway::to_string(record) {
        Ok(text) => out.push_str(&text),
        Err(e) => out.push_str(&format!("# cannot render the policy: {e}\n")),
    }
    out
}

/// Where in the file the field a validation error names is (best effort: the error names a
/// path, the file is read line by line).
fn line_of_record_error(text: &str, e: &policy::RecordError) -> Option<usize> {
    use policy::RecordError as E;
    match e {
        E::EmptyLevel { level } | E::ZeroWeights { level } => level_line(text, *level),
        E::DuplicateCluster { cluster, .. } => {
            // The second listing of the cluster.
            lines_with_key_value(text, "cluster", cluster.as_str())
                .get(1)
                .copied()
        }
        E::OutOfRange {
            what: "weight",
            value,
            ..
        } => lines_with_key_value(text, "weight", &value.to_string())
            .first()
            .copied(),
        E::OutOfRange { what: "levels", .. } => find_line(text, &["levels"]),
        _ => {
            let field = record_error_field(e)?;
            let path: Vec<&str> = field.split('.').collect();
            find_line(text, &path)
        }
    }
}

/// Lines (1-based) where `key: value` appears.
fn lines_with_key_value(text: &str, key: &str, value: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let code = l.split(" #").next().unwrap_or(l);
            code.match_indices(&format!("{key}:")).any(|(at, m)| {
                let rest = code[at + m.len()..].trim_start();
                let rest = rest.trim_start_matches(['"', '\'']);
                rest.starts_with(value)
                    && !rest[value.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            })
        })
        .map(|(i, _)| i + 1)
        .collect()
}

/// The line of the `level`-th item under `levels:`.
fn level_line(text: &str, level: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = find_line(text, &["levels"])?;
    let mut indent = None;
    let mut n = 0;
    for (i, line) in lines.iter().enumerate().skip(start) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let this = line.len() - trimmed.len();
        if !trimmed.starts_with('-') {
            if indent.is_none_or(|d| this <= d) && this == 0 {
                break; // the next top-level key
            }
            continue;
        }
        let d = *indent.get_or_insert(this);
        if this == d {
            if n == level {
                return Some(i + 1);
            }
            n += 1;
        }
    }
    Some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# pay: mostly west
service: pay.prod
levels:
  - clusters:
      - {cluster: west, weight: 80}
      - {cluster: north, weight: 20}
  - clusters: [{cluster: east}]
failback_hold_down: 10s
outlier:
  consecutive_failures: 3
";

    #[test]
    fn a_file_becomes_the_record_with_every_default() {
        let f = parse(GOOD, None).expect("valid");
        assert_eq!(f.service.to_string(), "pay.prod");
        assert_eq!(f.record.schema, policy::SCHEMA_VERSION);
        assert_eq!(f.record.levels.len(), 2);
        assert_eq!(f.record.levels[1].clusters[0].weight, 1);
        assert_eq!(f.record.failback_hold_down, Duration::from_secs(10));
        assert_eq!(f.record.outlier.consecutive_failures, 3);
        assert_eq!(
            f.record.outlier.base_ejection,
            policy::DEFAULT_BASE_EJECTION
        );
        // The JSON is the catalog's record.
        let back: PolicyRecord = policy::decode(f.json().as_bytes()).expect("decodes");
        assert_eq!(back, f.record);
        // The service may come from the command line instead, but not disagree with it.
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        let other: ServiceKey = "pay.dev".parse().expect("key");
        let without = GOOD.replace("service: pay.prod\n", "");
        assert_eq!(parse(&without, Some(&pay)).expect("ok").service, pay);
        let err = parse(GOOD, Some(&other)).expect_err("disagree");
        assert_eq!(err.line, Some(2), "{err}");
        let err = parse(&without, None).expect_err("no service");
        assert_eq!(err.field.as_deref(), Some("service"), "{err}");
    }

    #[test]
    fn every_record_field_is_accepted_and_round_trips_through_yaml() {
        // The whole record as `policy get` prints it parses as a file, to the same record:
        // the file's shape knows every field of the record.
        let mut record = parse(GOOD, None).expect("valid").record;
        record.local_only = false;
        record.min_healthy.percent = 10;
        record.updated_by = Some("ana".into());
        record.updated_at = Some(1_796_000_000);
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        let text = to_yaml(&pay, &record);
        assert!(text.starts_with("service: pay.prod\n"), "{text}");
        let again = parse(&text, None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again.record, record);
        let default = to_yaml(&pay, &PolicyRecord::default());
        assert_eq!(
            parse(&default, None).expect("default").record,
            PolicyRecord::default()
        );
    }

    #[test]
    fn mistakes_name_their_line_and_field() {
        let cases: &[(&str, &str, usize, &str, &str)] = &[
            (
                "{cluster: north, weight: 20}",
                "{cluster: north, wieght: 20}",
                6,
                "levels[0].clusters[1].wieght",
                "unknown field `wieght`",
            ),
            (
                "outlier:",
                "outlyer:",
                9,
                "outlyer",
                "unknown field `outlyer`",
            ),
            (
                "consecutive_failures: 3",
                "consecutive_failures: three",
                10,
                "outlier.consecutive_failures",
                "invalid type",
            ),
            (
                "failback_hold_down: 10s",
                "failback_hold_down: soon",
                8,
                "failback_hold_down",
                "",
            ),
            (
                "{cluster: east}",
                "{cluster: East_1}",
                7,
                "levels[1].clusters[0]",
                "cluster name \"East_1\"",
            ),
            (
                "{cluster: east}",
                "{cluster: west}",
                7,
                "levels[1].clusters",
                "west is listed twice",
            ),
            (
                "weight: 20}",
                "weight: 20000}",
                6,
                "levels[].clusters[].weight",
                "weight is 20000",
            ),
            (
                "consecutive_failures: 3",
                "consecutive_failures: 0",
                10,
                "outlier.consecutive_failures",
                "outlier.consecutive_failures is 0",
            ),
            (
                "  - clusters: [{cluster: east}]",
                "  - clusters: []",
                7,
                "levels[1]",
                "level 1 lists no cluster",
            ),
            (
                "service: pay.prod",
                "service: pay",
                2,
                "service",
                "<name>.<namespace>",
            ),
        ];
        for (from, to, line, field, message) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text, None).expect_err(to);
            assert_eq!(err.line, Some(*line), "{to}: {err}");
            assert_eq!(err.field.as_deref(), Some(*field), "{to}: {err}");
            assert!(err.message.contains(message), "{to}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("line {line}, field {field}: ")),
                "{err}"
            );
        }
        let err = parse("   \n", None).expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = parse(
            "service: pay.prod\nlocal_only: true\nlevels: [{clusters: [{cluster: a}]}]\n",
            None,
        )
        .expect_err("contradiction");
        assert_eq!(
            (err.line, err.field.as_deref()),
            (Some(2), Some("local_only")),
            "{err}"
        );
    }
}

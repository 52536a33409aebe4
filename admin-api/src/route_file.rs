//! Route files: the route rules of one clusterset service as people write them (YAML or
//! JSON, the service named in the file) to the catalog's record (`RouteRecord`, JSON;
//! docs/http-routing.md), and back.
//!
//! ```yaml
//! service: echo.prod
//! rules:
//!   - name: canary
//!     match:
//!       - headers: [{name: x-canary, exact: "1"}]
//!     destinations: [{cluster: north}]
//!   - name: api
//!     match: [{path: {prefix: /api}}]
//!     destinations:
//!       - {cluster: west, weight: 90}
//!       - {cluster: north, weight: 10}
//!     timeout: 2s
//! ```
//!
//! Unlike the record in the catalog (whose unknown fields are ignored, for evolution), a file
//! is strict: a misspelt field is an error, not a silent default. Every error names the
//! field, and the line when it can be found: a wrong type or unknown field from the YAML
//! parser's position, rules that cannot work (`RouteRecord::compile`) from the field path
//! the error names.

use std::collections::BTreeMap;
use std::time::Duration;

use meshup_core::names::{ClusterName, ServiceKey};
use meshup_core::routes::{self, RouteError, RouteRecord};
use serde::{Deserialize, Serialize};

use crate::file::{FileError, locate, yaml_error};

/// A route file, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteFile {
    pub service: ServiceKey,
    pub record: RouteRecord,
}

impl RouteFile {
    /// The record as the catalog stores it.
    pub fn json(&self) -> String {
        record_json(&self.record)
    }
}

/// The record as compact JSON, as the catalog stores it.
pub fn record_json(record: &RouteRecord) -> String {
    serde_json::to_string(record).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// An empty record: no rules, every request follows the service's failover policy.
pub fn no_rules() -> RouteRecord {
    RouteRecord {
        schema: routes::SCHEMA_VERSION,
        schema_minor: 0,
        rules: Vec::new(),
        updated_by: None,
        updated_at: None,
    }
}

/// Whether two records route alike: equal but for who wrote them and when.
pub fn same_rules(a: &RouteRecord, b: &RouteRecord) -> bool {
    let rules = |r: &RouteRecord| RouteRecord {
        updated_by: None,
        updated_at: None,
        ..r.clone()
    };
    rules(a) == rules(b)
}

// The file's shape: the record's fields, unknown ones refused. A test checks that every
// field of the record is accepted, so the two cannot drift apart.

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    #[serde(skip_serializing)]
    service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    schema_minor: Option<u32>,
    #[serde(default)]
    rules: Vec<RuleShape>,
    /// Who last wrote the stored rules and when, as `route get` prints them: accepted so that
    /// file applies as it is, and replaced by the gateway with the writer of the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    updated_at: Option<i64>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RuleShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    matches: Vec<MatchShape>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    destinations: Vec<DestinationShape>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<RetryShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request_headers: Option<EditsShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    response_headers: Option<EditsShape>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MatchShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathShape>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<ValueShape>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    query: Vec<ValueShape>,
}

/// One of the three, as a map (`{prefix: /api}`): the record's enum, written as people
/// write it (a YAML library would write an enum as a tag, `!prefix /api`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct PathShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ValueShape {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct DestinationShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster: Option<ClusterName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RetryShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(
        default,
        with = "humantime_serde::option",
        skip_serializing_if = "Option::is_none"
    )]
    per_try_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_status: Option<Vec<u16>>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EditsShape {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    remove: Vec<String>,
}

/// Reads a route file and checks its rules as the gateways will. `service` is the service
/// given on the command line, if any: the file may leave `service:` out then, and must agree
/// with it otherwise.
pub fn parse(text: &str, service: Option<&ServiceKey>) -> Result<RouteFile, FileError> {
    crate::file::empty(
        text,
        "a route file names its service and lists its `rules` (see docs/http-routing.md)",
    )?;
    let shape: FileShape = serde_norway::from_str(text).map_err(|e| yaml_error(&e))?;
    let service = crate::file::service(
        text,
        shape.service.as_deref(),
        service,
        "service: echo.prod",
        "the rules",
    )?;
    check_paths(text, &shape)?;
    let mut value = serde_json::to_value(&shape).map_err(|e| FileError {
        line: None,
        field: None,
        message: e.to_string(),
    })?;
    if let Some(map) = value.as_object_mut() {
        map.entry("schema")
            .or_insert(serde_json::Value::from(routes::SCHEMA_VERSION));
    }
    let bytes = serde_json::to_vec(&value).unwrap_or_default();
    let record = routes::decode(&bytes).map_err(|e| record_error(text, e))?;
    record.compile().map_err(|e| record_error(text, e))?;
    Ok(RouteFile { service, record })
}

/// Each path match says exactly one of `exact`, `prefix`, `regex`.
fn check_paths(text: &str, shape: &FileShape) -> Result<(), FileError> {
    for (i, rule) in shape.rules.iter().enumerate() {
        for (j, m) in rule.matches.iter().enumerate() {
            let Some(p) = &m.path else { continue };
            let set = [&p.exact, &p.prefix, &p.regex]
                .iter()
                .filter(|v| v.is_some())
                .count();
            if set != 1 {
                let field = format!("rules[{i}].match[{j}].path");
                return Err(FileError {
                    line: locate(text, &field),
                    field: Some(field),
                    message: "say exactly one of exact, prefix or regex".into(),
                });
            }
        }
    }
    Ok(())
}

/// A record error as a file error: the field it names, and that field's line.
fn record_error(text: &str, e: RouteError) -> FileError {
    let field = error_field(&e);
    FileError {
        line: field.as_deref().and_then(|f| locate(text, f)),
        field,
        message: match e {
            RouteError::Invalid { what, .. } => what,
            e => e.to_string(),
        },
    }
}

/// The field of a route record an error is about, as a path (`rules[2].match[0].path`).
pub fn error_field(e: &RouteError) -> Option<String> {
    match e {
        RouteError::Invalid { at, .. } => Some(at.clone()),
        RouteError::UnsupportedSchema { .. } => Some("schema".into()),
        RouteError::TooLarge { .. } | RouteError::Decode(_) => None,
    }
}

/// Rules as a file people edit: `service:` first, then the record as stored, in the file's
/// shape (fields in the record's order, path matches as maps).
pub fn to_yaml(service: &ServiceKey, record: &RouteRecord) -> String {
    let mut out = format!("service: {service}\n");
    let text = serde_json::to_value(record)
        .and_then(serde_json::from_value::<FileShape>)
        .map_err(|e| e.to_string())
        .and_then(|shape| serde_norway::to_string(&shape).map_err(|e| e.to_string()));
    match text {
        Ok(text) => out.push_str(&text),
        Err(e) => out.push_str(&format!("# cannot render the rules: {e}\n")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# echo: a canary by header, the API split 90/10
service: echo.prod
rules:
  - name: canary
    match:
      - headers: [{name: x-canary, exact: \"1\"}]
    destinations: [{cluster: north}]
    response_headers:
      add: {x-route: canary}
  - name: api
    match:
      - path: {prefix: /api}
        method: GET
    destinations:
      - {cluster: west, weight: 90}
      - {cluster: north, weight: 10}
    timeout: 2s
    retry:
      attempts: 3
      per_try_timeout: 500ms
";

    #[test]
    fn a_file_becomes_the_record() {
        let f = parse(GOOD, None).expect("valid");
        assert_eq!(f.service.to_string(), "echo.prod");
        assert_eq!(f.record.schema, routes::SCHEMA_VERSION);
        assert_eq!(f.record.rules.len(), 2);
        let api = &f.record.rules[1];
        assert_eq!(api.name, "api");
        assert_eq!(api.destinations[0].weight, 90);
        assert_eq!(api.timeout, Some(Duration::from_secs(2)));
        let retry = api.retry.as_ref().expect("retry");
        assert_eq!(retry.attempts, 3);
        assert_eq!(retry.on_status, vec![503], "the default");
        assert_eq!(
            f.record.rules[0].response_headers.add.get("x-route"),
            Some(&"canary".to_owned())
        );
        // The JSON is the catalog's record, and compiles as the gateways will.
        let back = routes::decode(f.json().as_bytes()).expect("decodes");
        assert_eq!(back, f.record);
        back.compile().expect("compiles");
        // JSON is a route file too.
        let json = serde_json::json!({"service": "echo.prod", "rules": [
            {"name": "api", "match": [{"path": {"prefix": "/api"}}],
             "destinations": [{"cluster": "north"}]}]});
        let j = parse(&json.to_string(), None).expect("JSON");
        assert_eq!(j.record.rules[0].destinations.len(), 1);
        // No rules is a valid file: every request follows the policy.
        let none = parse("service: echo.prod\nrules: []\n", None).expect("no rules");
        assert_eq!(none.record, no_rules());
        // The service may come from the command line instead (file::service's rules).
        let echo: ServiceKey = "echo.prod".parse().expect("key");
        let without = GOOD.replace("service: echo.prod\n", "");
        assert_eq!(parse(&without, Some(&echo)).expect("ok").service, echo);
        assert!(parse(&without, None).is_err(), "no service");
    }

    #[test]
    fn every_record_field_is_accepted_and_round_trips_through_yaml() {
        // Every field of the record set, as `route get` prints it: it parses as a file, to
        // the same record, so the file's shape knows every field of the record.
        let json = serde_json::json!({"schema": 1, "schema_minor": 0, "rules": [{
            "name": "all",
            "match": [
                {"path": {"exact": "/a"}, "method": "GET",
                 "headers": [{"name": "x-a", "exact": "1"}, {"name": "x-b", "regex": "b.*"}, {"name": "x-c"}],
                 "query": [{"name": "q", "exact": "1"}]},
                {"path": {"regex": "/v[0-9]+"}}, {"path": {"prefix": "/p"}}],
            "destinations": [{"cluster": "west", "weight": 3}, {"weight": 0}],
            "timeout": "3s",
            "retry": {"attempts": 4, "per_try_timeout": "1s", "on_status": [502, 503]},
            "request_headers": {"set": {"x-s": "1"}, "add": {"x-t": "2"}, "remove": ["x-u"]},
            "response_headers": {"set": {"x-v": "3"}}
        }], "updated_by": "ana", "updated_at": 1_796_000_000});
        let record = routes::decode(json.to_string().as_bytes()).expect("record");
        assert_eq!(
            serde_json::to_value(&record).expect("json"),
            json,
            "the example sets every field of the record"
        );
        let echo: ServiceKey = "echo.prod".parse().expect("key");
        let text = to_yaml(&echo, &record);
        assert!(text.starts_with("service: echo.prod\n"), "{text}");
        let again = parse(&text, None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again.record, record);
        assert!(same_rules(
            &again.record,
            &RouteRecord {
                updated_by: None,
                updated_at: None,
                ..record.clone()
            }
        ));
        assert!(!same_rules(&again.record, &no_rules()));
    }

    /// Each mistake, made in GOOD: the line, the field and the message.
    #[test]
    fn mistakes_name_their_line_and_field() {
        let cases: &[(&str, &str, Option<usize>, &str, &str)] = &[
            (
                "{cluster: west, weight: 90}",
                "{cluster: west, wieght: 90}",
                Some(15),
                "rules[1].destinations[0].wieght",
                "unknown field `wieght`",
            ),
            (
                "    timeout: 2s",
                "    timout: 2s",
                Some(17),
                "rules[1].timout",
                "unknown field `timout`",
            ),
            (
                "rules:",
                "rulez:",
                Some(3),
                "rulez",
                "unknown field `rulez`",
            ),
            (
                "{prefix: /api}",
                "{prefx: /api}",
                Some(12),
                "rules[1].match[0].path.prefx",
                "unknown field `prefx`",
            ),
            (
                "{prefix: /api}",
                "{prefix: /api, exact: /api}",
                Some(12),
                "rules[1].match[0].path",
                "exactly one of exact, prefix or regex",
            ),
            (
                "    timeout: 2s",
                "    timeout: soon",
                Some(17),
                "rules[1].timeout",
                "",
            ),
            (
                "      attempts: 3",
                "      attempts: three",
                Some(19),
                "rules[1].retry.attempts",
                "invalid type",
            ),
            (
                "{cluster: north}",
                "{cluster: North_1}",
                Some(7),
                "rules[0].destinations[0]",
                "cluster name \"North_1\"",
            ),
            // Rules that parse but cannot work: compile's field, found in the text.
            (
                "{prefix: /api}",
                "{prefix: api}",
                Some(12),
                "rules[1].match[0].path",
                "does not start with '/'",
            ),
            (
                "        method: GET",
                "        method: G T",
                Some(13),
                "rules[1].match[0].method",
                "not an HTTP method",
            ),
            (
                "      attempts: 3",
                "      attempts: 9",
                Some(19),
                "rules[1].retry.attempts",
                "outside 1..=5",
            ),
            (
                "      - {cluster: north, weight: 10}",
                "      - {cluster: west, weight: 10}",
                Some(16),
                "rules[1].destinations[1]",
                "cluster west is listed twice",
            ),
            (
                "  - name: api",
                "  - name: canary",
                Some(10),
                "rules[1].name",
                "names two rules",
            ),
            (
                "      add: {x-route: canary}",
                "      add: {connection: close}",
                Some(8),
                "rules[0].response_headers",
                "set by the gateway itself",
            ),
            (
                "service: echo.prod",
                "service: echo",
                Some(2),
                "service",
                "<name>.<namespace>",
            ),
        ];
        for (from, to, line, field, message) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text, None).expect_err(to);
            assert_eq!(err.line, *line, "{to}: {err}");
            assert_eq!(err.field.as_deref(), Some(*field), "{to}: {err}");
            assert!(err.message.contains(message), "{to}: {err}");
        }
        let err = parse("   \n", None).expect_err("empty");
        assert!(err.to_string().contains("empty"), "{err}");
        let err = parse("service: echo.prod\nschema: 2\nrules: []\n", None).expect_err("v2");
        assert_eq!(
            (err.line, err.field.as_deref()),
            (Some(2), Some("schema")),
            "{err}"
        );
    }
}

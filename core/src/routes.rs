//! Route records: how the requests of a clusterset service's `http` and `grpc` ports are
//! routed, one by one (docs/http-routing.md). Key: `<prefix>/v1/routes/<ns>/<name>`.
//!
//! A record is an ordered list of rules. The first rule whose match holds for a request wins;
//! it names weighted destinations (a cluster, or the service's failover policy), a timeout, a
//! retry policy and header edits. No rule matches: the service's failover policy decides, as
//! for a TCP connection.
//!
//! The record follows the catalog's evolution rule (docs/records.md) like policy records:
//! `schema` is the major version, `schema_minor` the minor, unknown fields are ignored.
//! [`RouteRecord::compile`] checks everything else (names, limits, regular expressions) and
//! returns the form the gateway matches with; a bad record is skipped and the previous good
//! one stays in force. Matching and choosing ([`CompiledRoutes::matching`],
//! [`CompiledRule::order`]) are pure: the caller passes the random draw.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names::ClusterName;

/// The major schema version of route records.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest record accepted, in bytes.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// Most rules in a record, alternatives in a rule, conditions (headers and query parameters)
/// in one alternative, destinations in a rule, header edits in one direction.
pub const MAX_RULES: usize = 64;
pub const MAX_MATCHES: usize = 16;
pub const MAX_CONDITIONS: usize = 16;
pub const MAX_DESTINATIONS: usize = 16;
pub const MAX_HEADER_EDITS: usize = 32;
/// Longest text of a path, value or regular expression.
pub const MAX_TEXT: usize = 1024;
/// Largest compiled regular expression (bytes of the regex crate's program): bounds the
/// memory and the time a hostile pattern can cost every gateway.
pub const MAX_REGEX_SIZE: usize = 64 * 1024;
/// Largest weight of a destination.
pub const MAX_WEIGHT: u32 = 10_000;
/// Most tries of one request (the first and its retries).
pub const MAX_ATTEMPTS: u32 = 5;
/// Longest timeout of a request or of one try.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Tries of a request when its rule sets no retry policy (the first and one retry).
pub const DEFAULT_ATTEMPTS: u32 = 2;

/// Why a route record was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("value is {len} bytes, more than the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge { len: usize },
    #[error("value is not valid JSON for a route record: {0}")]
    Decode(String),
    #[error(
        "schema version {found} is not supported (this gateway reads route records of version {SCHEMA_VERSION})"
    )]
    UnsupportedSchema { found: u32 },
    #[error("{at}: {what}")]
    Invalid { at: String, what: String },
}

/// The routing rules of one clusterset service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRecord {
    pub schema: u32,
    #[serde(default)]
    pub schema_minor: u32,
    pub rules: Vec<RouteRule>,
    /// Who last wrote the record through the admin API (an operator's name, or `local`), and
    /// when (Unix seconds): set by the gateway that wrote it, absent in records written
    /// otherwise. Ignored by routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
}

/// One rule: when it matches, where the request goes and how it is handled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRule {
    /// Names the rule in metrics and logs; default `rule-<index>`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Alternatives: the rule matches when any one holds. None: every request.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RequestMatch>,
    /// Weighted destinations. None: the service's failover policy chooses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destinations: Vec<Destination>,
    /// Longest a request may take, every try included, until its response headers.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HttpRetry>,
    /// Edits of the request before it leaves, and of the response before the client gets it.
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub request_headers: HeaderEdits,
    #[serde(default, skip_serializing_if = "HeaderEdits::is_empty")]
    pub response_headers: HeaderEdits,
}

/// Conditions that all hold for a matching request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// An HTTP method, as sent (`GET`, `POST`): case-sensitive, per RFC 9110.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
    /// Query parameters, percent-decoded before they are compared.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query: Vec<ValueMatch>,
}

/// How the request's path (without the query) is matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    Exact(String),
    /// Whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
    Prefix(String),
    /// The whole path must match (anchored).
    Regex(String),
}

/// A header or query parameter: present, equal to `exact`, or matching `regex` (anchored).
/// Header names are case-insensitive; with several values, any one may match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Where a matching request may go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    /// A cluster exporting the service; absent: the service's failover policy chooses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterName>,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// When a request is tried again. A request is retried only while it can be sent again
/// whole: not sent yet, or idempotent with a body the gateway still holds (docs/http-routing.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRetry {
    /// Tries in all, the first included.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Longest one try may take until its response headers.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Response statuses that are tried again elsewhere.
    #[serde(default = "default_retry_on")]
    pub on_status: Vec<u16>,
}

fn default_attempts() -> u32 {
    DEFAULT_ATTEMPTS
}

fn default_retry_on() -> Vec<u16> {
    vec![503]
}

impl Default for HttpRetry {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_ATTEMPTS,
            per_try_timeout: None,
            on_status: default_retry_on(),
        }
    }
}

/// Header edits: `set` replaces, `add` appends, `remove` deletes (applied remove, set, add).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderEdits {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// The connection's own headers (RFC 9110 §7.6.1), which a proxy removes from every message
/// it forwards (besides those `Connection` names).
pub const HOP_BY_HOP_HEADERS: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Whether a rule may not edit the header `name` (lowercase): a hop-by-hop one, or the
/// framing and authority, which the gateway sets itself.
fn is_reserved_header(name: &str) -> bool {
    HOP_BY_HOP_HEADERS.contains(&name) || name == "content-length" || name == "host"
}

/// Decodes a route record: size limit first, then JSON; another major schema is named as
/// such even when its fields no longer decode as ours.
pub fn decode(bytes: &[u8]) -> Result<RouteRecord, RouteError> {
    #[derive(Deserialize)]
    struct SchemaOnly {
        schema: u32,
    }
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(RouteError::TooLarge { len: bytes.len() });
    }
    let record: RouteRecord = serde_json::from_slice(bytes).map_err(|e| {
        match serde_json::from_slice::<SchemaOnly>(bytes) {
            Ok(s) if s.schema != SCHEMA_VERSION => {
                RouteError::UnsupportedSchema { found: s.schema }
            }
            _ => RouteError::Decode(e.to_string()),
        }
    })?;
    if record.schema != SCHEMA_VERSION {
        return Err(RouteError::UnsupportedSchema {
            found: record.schema,
        });
    }
    Ok(record)
}

/// A record ready to match requests with: checked, regular expressions compiled.
#[derive(Debug, Clone)]
pub struct CompiledRoutes {
    pub record: RouteRecord,
    pub rules: Vec<CompiledRule>,
}

impl PartialEq for CompiledRoutes {
    fn eq(&self, other: &Self) -> bool {
        self.record == other.record
    }
}

/// One rule, compiled.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// The rule's name, or `rule-<index>`.
    pub name: String,
    matches: Vec<CompiledMatch>,
    pub destinations: Vec<Destination>,
    pub timeout: Option<Duration>,
    pub retry: HttpRetry,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
}

#[derive(Debug, Clone)]
struct CompiledMatch {
    path: Option<CompiledPath>,
    method: Option<String>,
    headers: Vec<CompiledValue>,
    query: Vec<CompiledValue>,
}

#[derive(Debug, Clone)]
enum CompiledPath {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug, Clone)]
struct CompiledValue {
    name: String,
    test: ValueTest,
}

#[derive(Debug, Clone)]
enum ValueTest {
    Present,
    Exact(String),
    Regex(regex::Regex),
}

impl ValueTest {
    fn holds(&self, value: &str) -> bool {
        match self {
            ValueTest::Present => true,
            ValueTest::Exact(e) => e == value,
            ValueTest::Regex(r) => r.is_match(value),
        }
    }
}

/// What a rule matches a request on: pure data, so matching needs no HTTP library.
#[derive(Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    /// The raw query (after `?`), if any.
    pub query: Option<&'a str>,
    /// Every value of a header (lowercase name).
    pub header: &'a dyn Fn(&str) -> Vec<&'a str>,
}

impl std::fmt::Debug for RequestView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestView")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

impl RouteRecord {
    /// Checks the record and compiles it; the error names the rule and field.
    pub fn compile(&self) -> Result<CompiledRoutes, RouteError> {
        if self.schema != SCHEMA_VERSION {
            return Err(RouteError::UnsupportedSchema { found: self.schema });
        }
        check_count("rules", self.rules.len(), MAX_RULES)?;
        let mut names = std::collections::BTreeSet::new();
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let rule = compile_rule(i, rule)?;
                if !names.insert(rule.name.clone()) {
                    return Err(invalid(
                        format!("rules[{i}].name"),
                        format!("{:?} names two rules", rule.name),
                    ));
                }
                Ok(rule)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CompiledRoutes {
            record: self.clone(),
            rules,
        })
    }
}

fn invalid(at: String, what: impl Into<String>) -> RouteError {
    RouteError::Invalid {
        at,
        what: what.into(),
    }
}

fn check_count(at: &str, count: usize, max: usize) -> Result<(), RouteError> {
    if count > max {
        return Err(invalid(
            at.to_owned(),
            format!("{count} entries, more than the limit of {max}"),
        ));
    }
    Ok(())
}

fn check_text(at: &str, text: &str) -> Result<(), RouteError> {
    if text.len() > MAX_TEXT {
        return Err(invalid(
            at.to_owned(),
            format!("longer than {MAX_TEXT} bytes"),
        ));
    }
    Ok(())
}

fn compile_regex(at: &str, pattern: &str) -> Result<regex::Regex, RouteError> {
    check_text(at, pattern)?;
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_SIZE)
        .dfa_size_limit(MAX_REGEX_SIZE)
        .build()
        .map_err(|e| {
            invalid(
                at.to_owned(),
                format!("not a usable regular expression: {e}"),
            )
        })
}

fn check_duration(at: &str, d: Option<Duration>) -> Result<(), RouteError> {
    match d {
        Some(d) if d.is_zero() || d > MAX_TIMEOUT => Err(invalid(
            at.to_owned(),
            format!("{d:?} is outside 1ms..={}s", MAX_TIMEOUT.as_secs()),
        )),
        _ => Ok(()),
    }
}

/// Whether `name` is an HTTP field name (RFC 9110 §5.1: a token), compared lowercase.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` may be sent as a field value (visible ASCII, spaces and tabs inside).
fn is_field_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        && value.trim() == value
}

fn compile_rule(i: usize, rule: &RouteRule) -> Result<CompiledRule, RouteError> {
    let at = |field: &str| format!("rules[{i}].{field}");
    let name = if rule.name.is_empty() {
        format!("rule-{i}")
    } else {
        rule.name.clone()
    };
    if name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            at("name"),
            format!("{name:?} is not 1-63 letters, digits, '-' or '_'"),
        ));
    }
    check_count(&at("match"), rule.matches.len(), MAX_MATCHES)?;
    let matches = rule
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| compile_match(&at(&format!("match[{j}]")), m))
        .collect::<Result<Vec<_>, _>>()?;
    check_count(
        &at("destinations"),
        rule.destinations.len(),
        MAX_DESTINATIONS,
    )?;
    let mut seen = std::collections::BTreeSet::new();
    for (j, d) in rule.destinations.iter().enumerate() {
        if d.weight > MAX_WEIGHT {
            return Err(invalid(
                at(&format!("destinations[{j}].weight")),
                format!("{} is more than {MAX_WEIGHT}", d.weight),
            ));
        }
        if !seen.insert(d.cluster.clone()) {
            return Err(invalid(
                at(&format!("destinations[{j}]")),
                match &d.cluster {
                    Some(c) => format!("cluster {c} is listed twice"),
                    None => "the failover policy is listed twice".to_owned(),
                },
            ));
        }
    }
    if !rule.destinations.is_empty() && rule.destinations.iter().all(|d| d.weight == 0) {
        return Err(invalid(
            at("destinations"),
            "the weights sum to zero: no destination could get a request",
        ));
    }
    check_duration(&at("timeout"), rule.timeout)?;
    let retry = rule.retry.clone().unwrap_or_default();
    if !(1..=MAX_ATTEMPTS).contains(&retry.attempts) {
        return Err(invalid(
            at("retry.attempts"),
            format!("{} is outside 1..={MAX_ATTEMPTS}", retry.attempts),
        ));
    }
    check_duration(&at("retry.per_try_timeout"), retry.per_try_timeout)?;
    check_count(&at("retry.on_status"), retry.on_status.len(), 16)?;
    if let Some(s) = retry.on_status.iter().find(|s| !(500..=599).contains(*s)) {
        return Err(invalid(
            at("retry.on_status"),
            format!(
                "{s} is not a 5xx status: only a server error says another cluster may do better"
            ),
        ));
    }
    for (field, edits) in [
        ("request_headers", &rule.request_headers),
        ("response_headers", &rule.response_headers),
    ] {
        check_edits(&at(field), edits)?;
    }
    Ok(CompiledRule {
        name,
        matches,
        destinations: rule.destinations.clone(),
        timeout: rule.timeout,
        retry,
        request_headers: rule.request_headers.clone(),
        response_headers: rule.response_headers.clone(),
    })
}

fn check_edits(at: &str, edits: &HeaderEdits) -> Result<(), RouteError> {
    check_count(
        at,
        edits.set.len() + edits.add.len() + edits.remove.len(),
        MAX_HEADER_EDITS,
    )?;
    let names = edits
        .set
        .keys()
        .chain(edits.add.keys())
        .chain(edits.remove.iter());
    for name in names {
        if !is_token(name) || name.len() > 256 {
            return Err(invalid(
                at.to_owned(),
                format!("{name:?} is not a header name"),
            ));
        }
        if is_reserved_header(&name.to_ascii_lowercase()) {
            return Err(invalid(
                at.to_owned(),
                format!(
                    "{name} is set by the gateway itself (connection and framing headers cannot be edited)"
                ),
            ));
        }
    }
    for (name, value) in edits.set.iter().chain(edits.add.iter()) {
        check_text(at, value)?;
        if !is_field_value(value) {
            return Err(invalid(
                at.to_owned(),
                format!(
                    "the value of {name} is not a header value (visible ASCII, no leading or trailing space)"
                ),
            ));
        }
    }
    Ok(())
}

fn compile_match(at: &str, m: &RequestMatch) -> Result<CompiledMatch, RouteError> {
    let path = match &m.path {
        None => None,
        Some(PathMatch::Exact(p)) | Some(PathMatch::Prefix(p)) if !p.starts_with('/') => {
            return Err(invalid(
                format!("{at}.path"),
                format!("{p:?} does not start with '/'"),
            ));
        }
        Some(PathMatch::Exact(p)) => {
            check_text(&format!("{at}.path"), p)?;
            Some(CompiledPath::Exact(p.clone()))
        }
        Some(PathMatch::Prefix(p)) => {
            check_text(&format!("{at}.path"), p)?;
            Some(CompiledPath::Prefix(p.trim_end_matches('/').to_owned()))
        }
        Some(PathMatch::Regex(r)) => Some(CompiledPath::Regex(compile_regex(
            &format!("{at}.path"),
            r,
        )?)),
    };
    if let Some(method) = &m.method
        && (!is_token(method) || method.len() > 32)
    {
        return Err(invalid(
            format!("{at}.method"),
            format!("{method:?} is not an HTTP method"),
        ));
    }
    check_count(at, m.headers.len() + m.query.len(), MAX_CONDITIONS)?;
    let values = |what: &str, list: &[ValueMatch], header: bool| {
        list.iter()
            .enumerate()
            .map(|(k, v)| {
                let at = format!("{at}.{what}[{k}]");
                if header && !is_token(&v.name) || v.name.is_empty() || v.name.len() > 256 {
                    return Err(invalid(at, format!("{:?} is not a {what} name", v.name)));
                }
                let test = match (&v.exact, &v.regex) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(at, "exact and regex exclude each other: keep one"));
                    }
                    (Some(e), None) => {
                        check_text(&at, e)?;
                        ValueTest::Exact(e.clone())
                    }
                    (None, Some(r)) => ValueTest::Regex(compile_regex(&at, r)?),
                    (None, None) => ValueTest::Present,
                };
                let name = if header {
                    v.name.to_ascii_lowercase()
                } else {
                    v.name.clone()
                };
                Ok(CompiledValue { name, test })
            })
            .collect::<Result<Vec<_>, RouteError>>()
    };
    Ok(CompiledMatch {
        path,
        method: m.method.clone(),
        headers: values("headers", &m.headers, true)?,
        query: values("query", &m.query, false)?,
    })
}

impl CompiledMatch {
    fn holds(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(CompiledPath::Exact(p)) => req.path == p,
            Some(CompiledPath::Prefix(p)) => {
                p.is_empty()
                    || req
                        .path
                        .strip_prefix(p.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
            Some(CompiledPath::Regex(r)) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self
                .headers
                .iter()
                .all(|h| (req.header)(&h.name).iter().any(|v| h.test.holds(v)))
            && self.query.iter().all(|q| {
                req.query.is_some_and(|query| {
                    form_urlencoded::parse(query.as_bytes())
                        .any(|(k, v)| k == q.name.as_str() && q.test.holds(&v))
                })
            })
    }
}

impl CompiledRoutes {
    /// The first rule that matches the request; `None`: the service's policy decides.
    pub fn matching(&self, req: &RequestView<'_>) -> Option<&CompiledRule> {
        self.rules
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.holds(req)))
    }
}

impl CompiledRule {
    /// The destinations in the order to try them: the first drawn by weight with `draw`
    /// (uniform over `u64`), the others after it by weight, heaviest first. Zero-weight
    /// destinations are only ever fallbacks. No destinations: one entry, the policy (`None`).
    pub fn order(&self, draw: u64) -> Vec<Option<&ClusterName>> {
        if self.destinations.is_empty() {
            return vec![None];
        }
        let total: u64 = self.destinations.iter().map(|d| u64::from(d.weight)).sum();
        let mut point = draw % total.max(1);
        let first = self
            .destinations
            .iter()
            .position(|d| {
                let w = u64::from(d.weight);
                if point < w {
                    true
                } else {
                    point -= w;
                    false
                }
            })
            .unwrap_or(0);
        let mut rest: Vec<usize> = (0..self.destinations.len())
            .filter(|&k| k != first)
            .collect();
        rest.sort_by_key(|&k| std::cmp::Reverse(self.destinations[k].weight));
        std::iter::once(first)
            .chain(rest)
            .map(|k| self.destinations[k].cluster.as_ref())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: serde_json::Value) -> Result<CompiledRoutes, RouteError> {
        decode(json.to_string().as_bytes())?.compile()
    }

    /// The name of the rule that matches the request, if any.
    fn matched(
        routes: &CompiledRoutes,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Option<String> {
        let header = |name: &str| -> Vec<&str> {
            headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| *v)
                .collect()
        };
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        let view = RequestView {
            method,
            path,
            query,
            header: &header,
        };
        routes.matching(&view).map(|r| r.name.clone())
    }

    /// Which rule (by name) matches each request, or none.
    #[test]
    fn the_first_matching_rule_wins() {
        let routes = record(serde_json::json!({"schema": 1, "rules": [
            {"name": "exact", "match": [{"path": {"exact": "/healthz"}}]},
            {"name": "canary", "match": [{"headers": [{"name": "X-Canary", "exact": "1"}]}]},
            {"name": "api-post", "match": [{"path": {"prefix": "/api/"}, "method": "POST"}]},
            {"name": "api", "match": [{"path": {"prefix": "/api"}}]},
            {"name": "regex", "match": [{"path": {"regex": "/v[0-9]+/items"}}]},
            {"name": "query", "match": [{"query": [{"name": "debug", "exact": "on"}]},
                                         {"query": [{"name": "trace"}]}]},
            {"name": "ua", "match": [{"headers": [{"name": "user-agent", "regex": "curl/.*"}]}]},
        ]}))
        .expect("valid");
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            ("GET", "/healthz", &[], Some("exact")),
            ("GET", "/healthz/x", &[], None),
            ("GET", "/healthz", &[("x-canary", "1")], Some("exact")),
            ("GET", "/other", &[("x-canary", "1")], Some("canary")),
            ("GET", "/other", &[("x-canary", "2")], None),
            (
                "GET",
                "/other",
                &[("x-canary", "2"), ("X-Canary", "1")],
                Some("canary"),
            ),
            ("POST", "/api/pay", &[], Some("api-post")),
            ("post", "/api/pay", &[], Some("api")),
            ("GET", "/api", &[], Some("api")),
            ("GET", "/api/", &[], Some("api")),
            ("GET", "/apix", &[], None),
            ("GET", "/v2/items", &[], Some("regex")),
            ("GET", "/v2/items/3", &[], None),
            ("GET", "/x/v2/items", &[], None),
            ("GET", "/x?debug=on", &[], Some("query")),
            ("GET", "/x?a=1&debug=o%6E", &[], Some("query")),
            ("GET", "/x?debug=off", &[], None),
            ("GET", "/x?trace", &[], Some("query")),
            ("GET", "/x", &[("user-agent", "curl/8.1")], Some("ua")),
            ("GET", "/x", &[("user-agent", "Mozilla curl/8.1")], None),
        ];
        for (method, target, headers, want) in cases {
            let got = matched(&routes, method, target, headers);
            assert_eq!(got.as_deref(), *want, "{method} {target} {headers:?}");
        }
    }

    #[test]
    fn a_rule_without_match_takes_every_request_and_unnamed_rules_are_numbered() {
        let routes = record(serde_json::json!({"schema": 1, "rules": [
            {"match": [{"method": "DELETE"}]},
            {},
        ]}))
        .expect("valid");
        assert_eq!(
            matched(&routes, "GET", "/anything", &[]).as_deref(),
            Some("rule-1")
        );
        assert_eq!(
            matched(&routes, "DELETE", "/", &[]).as_deref(),
            Some("rule-0")
        );
        assert_eq!(
            routes.rules[1].order(7),
            vec![None],
            "no destination: the policy"
        );
        assert_eq!(routes.rules[1].retry, HttpRetry::default());
    }

    #[test]
    fn weights_split_draws_in_proportion_and_the_rest_follow_heaviest_first() {
        let routes = record(serde_json::json!({"schema": 1, "rules": [{"destinations": [
            {"cluster": "west", "weight": 90},
            {"cluster": "north", "weight": 10},
            {"weight": 0},
        ]}]}))
        .expect("valid");
        let rule = &routes.rules[0];
        let west = ClusterName::new("west").expect("name");
        let north = ClusterName::new("north").expect("name");
        let mut firsts = BTreeMap::new();
        for draw in 0..1000u64 {
            let order = rule.order(draw);
            assert_eq!(order.len(), 3, "every destination is a fallback");
            assert_eq!(order[2], None, "the zero-weight policy comes last");
            *firsts.entry(order[0].cloned()).or_insert(0) += 1;
        }
        assert_eq!(firsts.get(&Some(west.clone())), Some(&900));
        assert_eq!(firsts.get(&Some(north.clone())), Some(&100));
        assert_eq!(rule.order(95), vec![Some(&north), Some(&west), None]);
        assert_eq!(rule.order(5), vec![Some(&west), Some(&north), None]);
        assert_eq!(rule.order(u64::MAX).len(), 3);
    }

    /// Each bad record is refused, naming where it is wrong.
    #[test]
    fn bad_records_are_refused_with_the_field_named() {
        let rule = |r: serde_json::Value| serde_json::json!({"schema": 1, "rules": [r]});
        let long = "a".repeat(MAX_TEXT + 1);
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (
                rule(serde_json::json!({"match": [{"path": {"prefix": "api"}}]})),
                "rules[0].match[0].path",
            ),
            (
                rule(serde_json::json!({"match": [{"path": {"regex": "("}}]})),
                "regular expression",
            ),
            (
                rule(serde_json::json!({"match": [{"path": {"regex": "a{1000}{1000}"}}]})),
                "regular expression",
            ),
            (
                rule(serde_json::json!({"match": [{"path": {"exact": format!("/{long}")}}]})),
                "longer than",
            ),
            (
                rule(serde_json::json!({"match": [{"method": "G T"}]})),
                "not an HTTP method",
            ),
            (
                rule(serde_json::json!({"match": [{"headers": [{"name": "a b"}]}]})),
                "headers[0]",
            ),
            (
                rule(
                    serde_json::json!({"match": [{"headers": [{"name": "a", "exact": "1", "regex": "1"}]}]}),
                ),
                "exclude each other",
            ),
            (
                rule(serde_json::json!({"destinations": [{"cluster": "west", "weight": 0}]})),
                "sum to zero",
            ),
            (
                rule(
                    serde_json::json!({"destinations": [{"cluster": "west"}, {"cluster": "west"}]}),
                ),
                "listed twice",
            ),
            (
                rule(serde_json::json!({"destinations": [{"cluster": "west", "weight": 10001}]})),
                "weight",
            ),
            (
                rule(serde_json::json!({"destinations": [{"cluster": "West!"}]})),
                "JSON",
            ),
            (
                rule(serde_json::json!({"timeout": "0s"})),
                "rules[0].timeout",
            ),
            (
                rule(serde_json::json!({"timeout": "2h"})),
                "rules[0].timeout",
            ),
            (
                rule(serde_json::json!({"retry": {"attempts": 0}})),
                "retry.attempts",
            ),
            (
                rule(serde_json::json!({"retry": {"attempts": 6}})),
                "retry.attempts",
            ),
            (
                rule(serde_json::json!({"retry": {"on_status": [404]}})),
                "not a 5xx",
            ),
            (
                rule(serde_json::json!({"request_headers": {"set": {"Connection": "close"}}})),
                "set by the gateway",
            ),
            (
                rule(serde_json::json!({"request_headers": {"set": {"x-a": "b\r\nc"}}})),
                "not a header value",
            ),
            (
                rule(serde_json::json!({"response_headers": {"remove": ["x y"]}})),
                "not a header name",
            ),
            (
                rule(serde_json::json!({"name": "has space"})),
                "rules[0].name",
            ),
            (
                serde_json::json!({"schema": 1, "rules": [{"name": "a"}, {"name": "a"}]}),
                "names two rules",
            ),
            (
                serde_json::json!({"schema": 2, "rules": "whatever"}),
                "schema version 2",
            ),
            (serde_json::json!({"schema": 1}), "JSON"),
        ];
        for (json, want) in cases {
            let err = record(json.clone())
                .expect_err(&json.to_string())
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(
            decode(&big),
            Err(RouteError::TooLarge {
                len: MAX_RECORD_BYTES + 1
            })
        );
        let many =
            serde_json::json!({"schema": 1, "rules": vec![serde_json::json!({}); MAX_RULES + 1]});
        assert!(
            record(many)
                .expect_err("too many")
                .to_string()
                .contains("rules")
        );
    }

    /// A newer gateway's record (a new field anywhere, a higher minor) is read, its new
    /// fields ignored; what this version writes omits what is unset.
    #[test]
    fn records_of_a_newer_minor_are_read() {
        let newer = br#"{"schema":1,"schema_minor":4,"rules":[{"name":"a","mirror":"east",
            "match":[{"path":{"prefix":"/a"},"sni":"x"}],
            "destinations":[{"cluster":"west","weight":3,"subset":"v2"}],
            "retry":{"attempts":3,"budget":"10%"}}],"owner":"team-pay"}"#;
        let r = decode(newer).expect("decodes");
        assert_eq!(r.schema_minor, 4);
        let c = r.compile().expect("valid");
        assert_eq!(c.rules[0].retry.attempts, 3);
        assert_eq!(c.rules[0].retry.on_status, vec![503]);
        let written = serde_json::to_string(&RouteRecord {
            schema: 1,
            schema_minor: 0,
            rules: vec![RouteRule::default()],
            updated_by: None,
            updated_at: None,
        })
        .expect("encode");
        assert_eq!(written, r#"{"schema":1,"schema_minor":0,"rules":[{}]}"#);
    }
}

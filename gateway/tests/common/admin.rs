//! A gateway's admin HTTP surface, asked as a probe or a scraper would: one `GET` over a
//! fresh TCP connection, and a strict parser of the `/metrics` exposition.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `GET path` over a fresh TCP connection, as a probe or a scraper would.
pub async fn get(addr: SocketAddr, path: &str) -> Response {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response within 5 s"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let text = String::from_utf8(raw).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("header and body");
    let mut lines = head.lines();
    let status_line = lines.next().expect("status line");
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<BTreeMap<_, _>>();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Response {
        status,
        headers,
        body,
    }
}

/// Decodes a chunked body (what a large `/metrics` answer may come as).
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
}

/// `GET /metrics`, checked and parsed.
pub async fn scrape(admin: SocketAddr) -> Exposition {
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200, "{r:?}");
    Exposition::parse(&r.body)
}

/// One sample: metric name, labels as written, value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// One parsed OpenMetrics exposition: sample (`name{labels}`, labels sorted) → value, and
/// family → type.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: BTreeMap<String, f64>,
    pub types: BTreeMap<String, String>,
    /// Every sample with its labels, in the order of the text.
    pub series: Vec<Sample>,
}

impl Exposition {
    /// Parses the text strictly: every line is a `# HELP`/`# TYPE`/`# UNIT` comment or a
    /// sample of a family declared before it, names and labels are well formed, values are
    /// numbers, no sample repeats, and the text ends with `# EOF`. Panics on anything else.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let body = text
            .strip_suffix("# EOF\n")
            .unwrap_or_else(|| panic!("exposition does not end with '# EOF':\n{text}"));
        for line in body.lines() {
            if let Some(comment) = line.strip_prefix("# ") {
                let mut parts = comment.splitn(3, ' ');
                let (kind, name) = (parts.next(), parts.next().expect("family name"));
                assert!(valid_name(name), "bad family name in {line:?}");
                match kind {
                    Some("TYPE") => {
                        let ty = parts.next().expect("type").to_owned();
                        assert!(
                            [
                                "counter",
                                "gauge",
                                "histogram",
                                "gaugehistogram",
                                "stateset",
                                "info",
                                "summary",
                                "unknown"
                            ]
                            .contains(&ty.as_str()),
                            "unknown type in {line:?}"
                        );
                        let again = out.types.insert(name.to_owned(), ty);
                        assert!(again.is_none(), "family {name} declared twice");
                    }
                    Some("HELP" | "UNIT") => {}
                    _ => panic!("unknown comment {line:?}"),
                }
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').expect("closing brace"), line),
                ),
                None => (series, Vec::new()),
            };
            assert!(valid_name(name), "bad metric name in {line:?}");
            let family = out
                .types
                .iter()
                .filter(|(f, ty)| {
                    let suffixes: &[&str] = match ty.as_str() {
                        "counter" => &["_total", "_created"],
                        "histogram" => &["_bucket", "_count", "_sum", "_created"],
                        "info" => &["_info"],
                        _ => &[""],
                    };
                    suffixes.iter().any(|s| name == format!("{f}{s}"))
                })
                .map(|(f, _)| f.clone())
                .next();
            assert!(family.is_some(), "sample of no declared family: {line:?}");
            let key = series_key(name, &labels);
            let again = out.samples.insert(key, value);
            assert!(again.is_none(), "sample repeated: {line:?}");
            out.series.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        out
    }

    /// The value of one sample; `labels` as `k="v"` pairs in name order.
    pub fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no sample {series}; have {:#?}", self.samples.keys()))
    }

    /// The sum of every sample of `name` whose labels include all of `labels` (0 when there
    /// is none: a counter series not created yet has counted nothing).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// The key of a sample in [`Exposition::samples`]: `name{k="v",...}`, labels sorted.
fn series_key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_owned();
    }
    let mut labels = labels.to_vec();
    labels.sort();
    let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", text.join(","))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses `k="v",k2="v2"` (escapes `\\`, `\"`, `\n` in values).
fn parse_labels(mut rest: &str, line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("bad label in {line:?}"));
        assert!(
            valid_name(key) && !key.contains(':'),
            "bad label name in {line:?}"
        );
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    _ => panic!("bad escape in {line:?}"),
                },
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        out.push((key.to_owned(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    out
}

//! What the files people write (policy files, route files) share: the error that names a line
//! and a field, the service the file is for, and finding a field's line in the text.
//!
//! Files are YAML (JSON is YAML too). The parser gives a line for what it refuses itself (a
//! wrong type, an unknown field); a record that parses but cannot work names a field path
//! (`rules[2].match[0].path`), and [`locate`] finds that path's line in the text, best effort.

use std::fmt;

use meshup_core::names::ServiceKey;

/// What is wrong with a file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// 1-based.
    pub line: Option<usize>,
    /// The field, as a path (`levels[0].clusters[1].weight`).
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.line, &self.field) {
            (Some(l), Some(field)) => write!(f, "line {l}, field {field}: {}", self.message),
            (Some(l), None) => write!(f, "line {l}: {}", self.message),
            (None, Some(field)) => write!(f, "field {field}: {}", self.message),
            (None, None) => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FileError {}

/// A file with nothing in it: `what` says what it should hold.
pub fn empty(text: &str, what: &str) -> Result<(), FileError> {
    if text.trim().is_empty() {
        return Err(FileError {
            line: None,
            field: None,
            message: format!("the file is empty; {what}"),
        });
    }
    Ok(())
}

/// The service a file is for: the file's `service:` (`named`) or the one the command line
/// gives (`given`), which must agree when both are there. `example` shows the field
/// (`service: pay.prod`), `what` says what the file holds (`the policy`).
pub fn service(
    text: &str,
    named: Option<&str>,
    given: Option<&ServiceKey>,
    example: &str,
    what: &str,
) -> Result<ServiceKey, FileError> {
    let named = match named {
        Some(s) => Some(s.parse::<ServiceKey>().map_err(|e| FileError {
            line: find_line(text, &["service"]),
            field: Some("service".into()),
            message: format!("{e} (e.g. `{example}`)"),
        })?),
        None => None,
    };
    match (named, given) {
        (Some(a), Some(b)) if &a != b => Err(FileError {
            line: find_line(text, &["service"]),
            field: Some("service".into()),
            message: format!(
                "the file is for {a} but the command names {b}; drop one or make them agree"
            ),
        }),
        (Some(a), _) => Ok(a),
        (None, Some(b)) => Ok(b.clone()),
        (None, None) => Err(FileError {
            line: Some(1),
            field: Some("service".into()),
            message: format!("missing: name the service {what} is for (`{example}`)"),
        }),
    }
}

/// The line and field of a YAML parse error (`levels[0].clusters[1]: unknown field ...`).
pub fn yaml_error(e: &serde_norway::Error) -> FileError {
    let text = e.to_string();
    let line = e.location().map(|l| l.line());
    // The message ends with " at line L column C"; the position is reported on its own.
    let message = match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text.clone(),
    };
    // "path: message" when the error is inside a field.
    let (mut field, message) = match message.split_once(": ") {
        Some((path, rest))
            if !path.contains(' ')
                && path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c)) =>
        {
            (Some(path.to_owned()), rest.to_owned())
        }
        _ => (None, message),
    };
    // An unknown field is the field at fault.
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((name, _)) = rest.split_once('`')
    {
        field = Some(match field {
            Some(parent) => format!("{parent}.{name}"),
            None => name.to_owned(),
        });
    }
    FileError {
        line,
        field,
        message,
    }
}

/// The line of `key:` for each segment of `path` in turn, each searched after the previous
/// one (so `retry.max_attempts` finds the `max_attempts` under `retry`, in block or flow
/// style).
pub fn find_line(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut found = None;
    for seg in path {
        let i = (from..lines.len()).find(|&i| has_key(lines[i], seg))?;
        found = Some(i + 1);
        from = i;
    }
    found
}

/// Whether a line holds `key:` (or JSON's `"key":`) as a key (not inside a longer name or a
/// comment).
pub fn has_key(line: &str, key: &str) -> bool {
    let code = line.split(" #").next().unwrap_or(line);
    [format!("{key}:"), format!("\"{key}\":")]
        .iter()
        .any(|pattern| {
            code.match_indices(pattern.as_str()).any(|(at, _)| {
                code[..at]
                    .chars()
                    .last()
                    .is_none_or(|c| c == ' ' || c == '{' || c == ',' || c == '-')
            })
        })
}

/// The line (1-based) of the field `path` (`rules[2].match[0].path`) in a YAML text, best
/// effort. Block mappings and sequences are followed key by key and item by item; where the
/// rest of the path is written in flow style (`{...}`, `[...]`) on one line, that line is
/// the answer. When the walk loses its way it answers the deepest line it found; `None` only
/// when the first key is nowhere at the top.
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut range = 0..lines.len();
    let mut found = None;
    for segment in path.split('.') {
        let (key, indices) = split_segment(segment);
        let Some((line, col)) = find_key(&lines, range.clone(), key) else {
            // Not block style from the top (JSON, say): the keys in the order of the path.
            return found.or_else(|| {
                let keys: Vec<&str> = path.split('.').map(|s| split_segment(s).0).collect();
                find_line(text, &keys).or_else(|| find_line(text, &[key]))
            });
        };
        found = Some(line + 1);
        if has_inline_value(lines[line], key) {
            return found;
        }
        let mut inner = line + 1..block_end(&lines, line + 1, range.end, |l| {
            content(l).is_some_and(|(c, _)| c <= col)
        });
        for i in indices {
            let Some(item) = nth_item(&lines, inner.clone(), i) else {
                return found;
            };
            found = Some(item + 1);
            let dash = indent(lines[item]);
            inner = item..block_end(&lines, item + 1, inner.end, |l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && indent(l) <= dash
            });
        }
        range = inner;
    }
    found
}

/// `match[0]` → (`match`, [0]); `rules` → (`rules`, []).
fn split_segment(segment: &str) -> (&str, Vec<usize>) {
    let key = segment.split('[').next().unwrap_or(segment);
    let indices = segment[key.len()..]
        .split('[')
        .filter_map(|s| s.strip_suffix(']'))
        .filter_map(|s| s.parse().ok())
        .collect();
    (key, indices)
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// A line's column of content, sequence dashes counted as indentation (`  - a: 1` → 4), and
/// the content; `None` for blank and comment lines.
fn content(line: &str) -> Option<(usize, &str)> {
    let mut col = 0;
    let mut rest = line;
    loop {
        let trimmed = rest.trim_start_matches(' ');
        col += rest.len() - trimmed.len();
        match trimmed.strip_prefix("- ") {
            Some(after) => {
                col += 2;
                rest = after;
            }
            None => {
                rest = trimmed;
                break;
            }
        }
    }
    if rest.is_empty() || rest.starts_with('#') || rest == "-" {
        return None;
    }
    Some((col, rest))
}

/// The first line at or after `from` (before `end`) where `ends` holds, or `end`.
fn block_end(lines: &[&str], from: usize, end: usize, ends: impl Fn(&str) -> bool) -> usize {
    (from..end).find(|&i| ends(lines[i])).unwrap_or(end)
}

/// The line and column of `key:` among the shallowest content of `range`.
fn find_key(lines: &[&str], range: std::ops::Range<usize>, key: &str) -> Option<(usize, usize)> {
    let col = range
        .clone()
        .filter_map(|i| content(lines[i]).map(|(c, _)| c))
        .min()?;
    range
        .filter_map(|i| content(lines[i]).map(|(c, text)| (i, c, text)))
        .find(|(_, c, text)| {
            *c == col
                && [format!("{key}:"), format!("\"{key}\":")].iter().any(|k| {
                    text.strip_prefix(k.as_str())
                        .is_some_and(|r| r.is_empty() || r.starts_with(' '))
                })
        })
        .map(|(i, c, _)| (i, c))
}

/// Whether `key:` on this line has its value on the same line (a scalar or a flow collection).
fn has_inline_value(line: &str, key: &str) -> bool {
    let Some((_, text)) = content(line) else {
        return false;
    };
    let after = text
        .strip_prefix(&format!("{key}:"))
        .or_else(|| text.strip_prefix(&format!("\"{key}\":")))
        .unwrap_or("");
    let value = after.split(" #").next().unwrap_or("").trim();
    !value.is_empty()
}

/// The line of the `n`-th item (`- ...`) of the block sequence in `range`.
fn nth_item(lines: &[&str], range: std::ops::Range<usize>, n: usize) -> Option<usize> {
    let is_item = |l: &str| {
        let t = l.trim_start_matches(' ');
        t.starts_with("- ") || t == "-"
    };
    let first = range.clone().find(|&i| is_item(lines[i]))?;
    let dash = indent(lines[first]);
    range
        .filter(|&i| is_item(lines[i]) && indent(lines[i]) == dash)
        .nth(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "\
# echo: canary by header
service: echo.prod
rules:
  - name: canary
    match:
      - headers:
          - {name: x-canary, exact: \"1\"}
      - path: {prefix: /beta}
    destinations: [{cluster: north}]
  - name: api
    match:
    - path:
        prefix: /api
      method: GET
    retry:
      attempts: 3
  -
    name: rest
";

    /// Each path's line, block or flow, first item or later.
    #[test]
    fn fields_are_found_by_their_path() {
        let cases: &[(&str, Option<usize>)] = &[
            ("service", Some(2)),
            ("rules", Some(3)),
            ("rules[0]", Some(4)),
            ("rules[0].name", Some(4)),
            ("rules[0].match", Some(5)),
            ("rules[0].match[0].headers", Some(6)),
            ("rules[0].match[0].headers[0]", Some(7)),
            ("rules[0].match[0].headers[0].exact", Some(7)),
            ("rules[0].match[1].path", Some(8)),
            ("rules[0].destinations[0].weight", Some(9)),
            ("rules[1]", Some(10)),
            ("rules[1].match[0].path", Some(12)),
            ("rules[1].match[0].method", Some(14)),
            ("rules[1].retry.attempts", Some(16)),
            ("rules[2]", Some(17)),
            ("rules[2].name", Some(18)),
            // Not written: the nearest line that is.
            ("rules[1].timeout", Some(10)),
            ("rules[7].name", Some(3)),
            ("nothing", None),
        ];
        for (path, want) in cases {
            assert_eq!(locate(ROUTES, path), *want, "{path}");
        }
        let json =
            "{\n  \"service\": \"echo.prod\",\n  \"rules\": [\n    {\"name\": \"a\"}\n  ]\n}\n";
        assert_eq!(
            locate(json, "rules[0].name"),
            Some(4),
            "JSON: the keys in order"
        );
        assert_eq!(
            locate(json, "rules[0].timeout"),
            Some(3),
            "JSON: the first key"
        );
    }

    #[test]
    fn the_service_comes_from_the_file_or_the_command_and_they_agree() {
        let pay: ServiceKey = "pay.prod".parse().expect("key");
        let dev: ServiceKey = "pay.dev".parse().expect("key");
        let text = "a: 1\nservice: pay.prod\n";
        let s = |named, given| service(text, named, given, "service: pay.prod", "the policy");
        assert_eq!(s(Some("pay.prod"), None), Ok(pay.clone()));
        assert_eq!(s(None, Some(&pay)), Ok(pay.clone()));
        assert_eq!(s(Some("pay.prod"), Some(&pay)), Ok(pay.clone()));
        let err = s(Some("pay.prod"), Some(&dev)).expect_err("disagree");
        assert_eq!((err.line, err.field.as_deref()), (Some(2), Some("service")));
        let err = s(None, None).expect_err("none");
        assert!(err.message.contains("the policy is for"), "{err}");
        let err = s(Some("pay"), None).expect_err("bad");
        assert!(err.message.contains("(e.g. `service: pay.prod`)"), "{err}");
    }
}

//! The Grafana dashboard against a gateway's `/metrics` and the metrics reference: which
//! metrics each panel queries (PromQL parsed by `promql-parser`, not matched by pattern),
//! which families and series an exposition holds, which metrics `docs/metrics.md` lists.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use promql_parser::parser::{self, Expr};
use serde_json::Value;

/// Grafana's variables as a query would see them, so the expression parses: ranges become
/// `5m`, label values a regex that matches anything.
const VARIABLES: [(&str, &str); 6] = [
    ("$__rate_interval", "5m"),
    ("$__interval", "1m"),
    ("$__range", "1h"),
    ("${cluster}", ".*"),
    ("$cluster", ".*"),
    ("${DS_PROMETHEUS}", "prometheus"),
];

/// Every metric name a PromQL expression selects (the names of its vector and range
/// selectors, through functions, aggregations, binary operators and subqueries).
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>> {
    let mut text = expr.to_owned();
    for (var, value) in VARIABLES {
        text = text.replace(var, value);
    }
    if text.contains('$') {
        bail!("{expr:?}: a Grafana variable this check does not know");
    }
    let ast = parser::parse(&text).map_err(|e| anyhow::anyhow!("{expr:?}: {e}"))?;
    let mut out = BTreeSet::new();
    walk(&ast, &mut out)?;
    Ok(out)
}

fn walk(expr: &Expr, out: &mut BTreeSet<String>) -> Result<()> {
    match expr {
        Expr::Aggregate(a) => {
            walk(&a.expr, out)?;
            if let Some(p) = &a.param {
                walk(p, out)?;
            }
        }
        Expr::Unary(u) => walk(&u.expr, out)?,
        Expr::Binary(b) => {
            walk(&b.lhs, out)?;
            walk(&b.rhs, out)?;
        }
        Expr::Paren(p) => walk(&p.expr, out)?,
        Expr::Subquery(s) => walk(&s.expr, out)?,
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) => {}
        Expr::VectorSelector(vs) => selector(vs, out)?,
        Expr::MatrixSelector(ms) => selector(&ms.vs, out)?,
        Expr::Call(c) => {
            for arg in &c.args.args {
                walk(arg, out)?;
            }
        }
        Expr::Extension(_) => bail!("an extension node the parser never makes"),
    }
    Ok(())
}

fn selector(vs: &promql_parser::parser::VectorSelector, out: &mut BTreeSet<String>) -> Result<()> {
    let name = vs.name.clone().or_else(|| {
        vs.matchers
            .matchers
            .iter()
            .find(|m| m.name == "__name__")
            .map(|m| m.value.clone())
    });
    match name {
        Some(n) => {
            out.insert(n);
            Ok(())
        }
        None => bail!("a selector without a metric name: {vs}"),
    }
}

/// Every panel's queries: `(panel title, expr)`, rows' nested panels included.
pub fn panel_queries(dashboard: &Value) -> Result<Vec<(String, String)>> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) -> Result<()> {
        for p in list.as_array().context("`panels` is not a list")? {
            let title = p["title"].as_str().unwrap_or("(untitled)").to_owned();
            if let Some(nested) = p.get("panels") {
                panels(nested, out)?;
            }
            for t in p
                .get("targets")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let expr = t["expr"]
                    .as_str()
                    .with_context(|| format!("panel {title:?}: a target without `expr`"))?;
                out.push((title.clone(), expr.to_owned()));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out)?;
    Ok(out)
}

/// Metric families of a Prometheus text exposition: name → type, from the `# TYPE` lines.
pub fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// Names of the samples in an exposition (`meshup_x_total`, `meshup_y_bucket`, ...).
pub fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The family a sample or queried name belongs to: `x_total` to counter `x`, `x_bucket`,
/// `x_sum`, `x_count` to histogram `x`, `x_info` to info `x`; `None` if none has it.
pub fn family_of<'a>(name: &str, families: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let suffixes: [(&str, &[&str]); 4] = [
        ("_total", &["counter"]),
        ("_bucket", &["histogram"]),
        ("_sum", &["histogram", "summary"]),
        ("_count", &["histogram", "summary"]),
    ];
    let found = |base: &str, types: &[&str]| {
        families
            .get_key_value(base)
            .filter(|(_, t)| types.contains(&t.as_str()))
            .map(|(k, _)| k.as_str())
    };
    for (suffix, types) in suffixes {
        if let Some(base) = name.strip_suffix(suffix)
            && let Some(f) = found(base, types)
        {
            return Some(f);
        }
    }
    if let Some(base) = name.strip_suffix("_info")
        && let Some(f) = found(base, &["info"])
    {
        return Some(f);
    }
    found(name, &["gauge", "unknown", "stateset"])
}

/// The metric names in the first column of the tables of a metrics reference in Markdown
/// (`` | `meshup_x_total` | counter | ... ``).
pub fn documented_metrics(markdown: &str) -> BTreeSet<String> {
    markdown
        .lines()
        .filter_map(|l| l.trim().strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("meshup_"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_out_of_every_kind_of_expression() {
        // (expression, names)
        let table: [(&str, &[&str]); 8] = [
            ("rate(a_total[5m])", &["a_total"]),
            (
                "histogram_quantile(0.99, sum by (le) (rate(lat_seconds_bucket[$__rate_interval])))",
                &["lat_seconds_bucket"],
            ),
            (
                r#"sum by (source_cluster) (rate(c_total{source_cluster=~"$cluster", result!="ok"}[5m]))"#,
                &["c_total"],
            ),
            (
                "sum(rate(x_total[5m])) / sum(rate(y_total[5m]))",
                &["x_total", "y_total"],
            ),
            (
                r#"rate(d_total[5m]) * on (instance) group_left (cluster) info_info{cluster=~"$cluster"}"#,
                &["d_total", "info_info"],
            ),
            (r#"{__name__="by_matcher"}"#, &["by_matcher"]),
            ("max_over_time(g[10m:1m])", &["g"]),
            ("-(g) + 1", &["g"]),
        ];
        for (expr, want) in table {
            let got = metric_names(expr).unwrap_or_else(|e| panic!("{expr}: {e:#}"));
            let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
            assert_eq!(got, want, "{expr}");
        }
        assert!(metric_names("rate(x[5m]").is_err(), "unbalanced");
        assert!(
            metric_names("rate(x[$unknown])").is_err(),
            "unknown variable"
        );
    }

    #[test]
    fn samples_resolve_to_their_families() {
        let text = "# HELP c A counter.\n# TYPE c counter\nc_total{a=\"1\"} 3\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n\
                    # TYPE g gauge\ng 2\n# TYPE i info\ni_info{v=\"1\"} 1\n# EOF\n";
        let f = families(text);
        assert_eq!(
            sample_names(text),
            ["c_total", "g", "h_bucket", "h_count", "h_sum", "i_info"]
                .map(String::from)
                .into()
        );
        // (name, family)
        let table = [
            ("c_total", Some("c")),
            ("h_bucket", Some("h")),
            ("h_sum", Some("h")),
            ("h_count", Some("h")),
            ("g", Some("g")),
            ("i_info", Some("i")),
            ("c", None),
            ("g_total", None),
            ("h", None),
            ("nothing", None),
        ];
        for (name, want) in table {
            assert_eq!(family_of(name, &f), want, "{name}");
        }
    }

    #[test]
    fn the_reference_lists_the_first_column_of_its_tables() {
        let md = "# Metrics\n\n| name | type |\n| --- | --- |\n| `meshup_a_total` | counter |\n\
                  | `meshup_b` | gauge |\nText with `meshup_c` is no row.\n| `other` | x |\n";
        assert_eq!(
            documented_metrics(md),
            ["meshup_a_total", "meshup_b"].map(String::from).into()
        );
    }
}

//! A plain HTTP/1.1 GET for the gateway's admin server, as a probe would send it.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

/// GETs `path` from `addr` with `Connection: close`: (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    Ok((code, body.to_string()))
}

/// Every series of the metric `family` on the admin server at `addr`: (labels as exposed,
/// e.g. `{source_cluster="east",destination_cluster="west"}` or empty, value).
pub fn metric_series(addr: SocketAddr, family: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let (code, body) = get(addr, "/metrics")?;
    anyhow::ensure!(code == 200, "/metrics answered {code}");
    series_in(&body, family)
}

/// Every series of the metric `family` in a Prometheus text exposition: (labels as written,
/// or empty, value).
pub fn series_in(exposition: &str, family: &str) -> anyhow::Result<Vec<(String, f64)>> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = rest.rsplit_once(' ')?;
            (labels.is_empty() || labels.starts_with('{')).then(|| {
                let value: f64 = value.parse().with_context(|| format!("value of {l}"))?;
                Ok((labels.to_owned(), value))
            })
        })
        .collect()
}

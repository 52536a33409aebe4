//! The admin HTTP server: `/live`, `/ready`, `/metrics`, `/status` (JSON) and `/` (a status
//! page that draws the federation).
//!
//! It binds to loopback by default (the config refuses a non-loopback address unless the
//! operator opts in), runs until shutdown and never blocks the data path: every handler reads
//! shared snapshots or atomics.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::readiness::Readiness;

/// Why the admin server could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot bind the admin HTTP address {addr}: {source} (is another gateway running?)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the status page and `/status` show. Built on demand by the app from its snapshots.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusView {
    pub cluster: String,
    pub gateway_id: String,
    pub region: String,
    pub ready: bool,
    pub pending: Vec<String>,
    pub draining: bool,
    pub catalog: CatalogStatus,
    pub clusters: Vec<ClusterStatus>,
    pub services: Vec<ServiceStatus>,
}

/// The catalog as this gateway last saw it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CatalogStatus {
    pub backend: String,
    pub revision: i64,
    pub synced: bool,
    pub connected: bool,
    /// Seconds since the store last answered; grows while the store is down.
    pub stale_seconds: f64,
    pub services: usize,
    pub exports: usize,
}

/// One cluster of the federation and this gateway's link to it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub local: bool,
    pub gateways: Vec<GatewayStatus>,
}

/// One gateway of a cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayStatus {
    pub id: String,
    pub addrs: Vec<String>,
    pub draining: bool,
    /// Whether this gateway holds a live QUIC connection to it.
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    /// Path MTU of the live connection (UDP payload bytes).
    pub mtu: Option<u16>,
    /// Packets lost on the live connection so far.
    pub lost_packets: Option<u64>,
    /// MTU black holes detected on the live connection (each drops the MTU to 1200).
    pub black_holes: Option<u64>,
}

/// One clusterset service and where its traffic from this cluster goes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: Option<String>,
    pub ports: Vec<String>,
    /// (cluster, healthy endpoints, total endpoints)
    pub clusters: Vec<(String, u32, u32)>,
    /// The cluster new connections go to now, if any.
    pub target: Option<String>,
}

/// Builds the current status. Implemented by the app.
pub trait StatusSource: Send + Sync + 'static {
    fn status(&self) -> StatusView;
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    registry: Arc<Registry>,
    status: Arc<dyn StatusSource>,
}

/// A bound admin server, not yet serving.
#[derive(Debug)]
pub struct AdminServer {
    listener: TcpListener,
}

impl AdminServer {
    /// Binds the admin address; a port conflict fails start-up here.
    pub async fn bind(addr: SocketAddr) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self { listener })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener always has a local address")
    }

    /// Serves until `shutdown` is cancelled.
    pub async fn run(
        self,
        readiness: Readiness,
        registry: Arc<Registry>,
        status: Arc<dyn StatusSource>,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let state = AdminState {
            readiness,
            registry,
            status,
        };
        let app = Router::new()
            .route("/live", get(|| async { "live\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/status", get(status_json))
            .route("/", get(status_page))
            .with_state(state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }
}

async fn ready(State(state): State<AdminState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: waiting for {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn status_json(State(state): State<AdminState>) -> Json<StatusView> {
    Json(state.status.status())
}

async fn status_page(State(state): State<AdminState>) -> Html<String> {
    Html(render_page(&state.status.status()))
}

/// Renders the status page: the federation as a picture (clusters on a circle, this gateway's
/// links to each with RTT), then services and where their traffic goes now. Pure.
pub fn render_page(view: &StatusView) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let title = format!(
        "meshup — {} / {}",
        esc(&view.cluster),
        esc(&view.gateway_id)
    );
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=utf-8><title>{title}</title>\
         <meta http-equiv=refresh content=2><style>\
         body{{font:14px system-ui,sans-serif;margin:24px;color:#222}}\
         table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}\
         .ok{{color:#17803d}}.bad{{color:#b42318}}.muted{{color:#777}}</style></head><body>\
         <h1>{title}</h1><p>region {region} · {ready} · {drain} · catalog {backend} rev {rev}, {svcs} services, \
         <span class={stale_class}>{stale}</span></p>",
        region = esc(&view.region),
        ready = if view.ready {
            "<span class=ok>ready</span>".to_string()
        } else {
            format!(
                "<span class=bad>not ready: {}</span>",
                esc(&view.pending.join(", "))
            )
        },
        drain = if view.draining {
            "<span class=bad>draining</span>"
        } else {
            "serving"
        },
        backend = esc(&view.catalog.backend),
        rev = view.catalog.revision,
        svcs = view.catalog.services,
        stale_class = if view.catalog.connected { "ok" } else { "bad" },
        stale = if view.catalog.connected {
            "store connected".to_string()
        } else {
            format!(
                "store unreachable, {:.0}s stale",
                view.catalog.stale_seconds
            )
        },
    );
    out.push_str(&render_picture(view));
    out.push_str("<h2>Services</h2><table><tr><th>service</th><th>VIP</th><th>ports</th><th>clusters (healthy/total)</th><th>traffic goes to</th></tr>");
    for s in &view.services {
        let clusters: Vec<String> = s
            .clusters
            .iter()
            .map(|(c, h, t)| {
                let class = if *h > 0 { "ok" } else { "bad" };
                format!("<span class={class}>{} {h}/{t}</span>", esc(c))
            })
            .collect();
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.name),
            esc(s.vip.as_deref().unwrap_or("—")),
            esc(&s.ports.join(", ")),
            clusters.join(" · "),
            s.target
                .as_deref()
                .map(esc)
                .unwrap_or_else(|| "<span class=bad>nowhere</span>".into()),
        );
    }
    out.push_str("</table></body></html>");
    out
}

fn render_picture(view: &StatusView) -> String {
    const W: f64 = 640.0;
    const H: f64 = 360.0;
    let n = view.clusters.len().max(1) as f64;
    let (cx, cy, r) = (W / 2.0, H / 2.0, 130.0);
    let pos = |i: usize| {
        let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
        (cx + r * a.cos(), cy + r * a.sin())
    };
    let local = view.clusters.iter().position(|c| c.local);
    let mut svg = format!(
        "<svg width='{W}' height='{H}' viewBox='0 0 {W} {H}' role='img' aria-label='federation'>"
    );
    if let Some(li) = local {
        let (lx, ly) = pos(li);
        for (i, c) in view.clusters.iter().enumerate() {
            if i == li {
                continue;
            }
            let (x, y) = pos(i);
            let up = c.gateways.iter().any(|g| g.connected);
            let rtt = c
                .gateways
                .iter()
                .filter_map(|g| g.rtt_ms)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.min(v))));
            let color = if up { "#17803d" } else { "#aaa" };
            let dash = if up { "" } else { " stroke-dasharray='6 4'" };
            let _ = write!(
                svg,
                "<line x1='{lx:.0}' y1='{ly:.0}' x2='{x:.0}' y2='{y:.0}' stroke='{color}' stroke-width='2'{dash}/>\
                 <text x='{:.0}' y='{:.0}' font-size='12' fill='#555'>{}</text>",
                (lx + x) / 2.0 + 4.0,
                (ly + y) / 2.0 - 4.0,
                rtt.map(|v| format!("{v:.2} ms"))
                    .unwrap_or_else(|| "no link".into())
            );
        }
    }
    for (i, c) in view.clusters.iter().enumerate() {
        let (x, y) = pos(i);
        let draining = c.gateways.iter().all(|g| g.draining) && !c.gateways.is_empty();
        let fill = if c.local {
            "#dbeafe"
        } else if draining {
            "#fde2e1"
        } else {
            "#eef2f6"
        };
        let _ = write!(
            svg,
            "<circle cx='{x:.0}' cy='{y:.0}' r='38' fill='{fill}' stroke='#345' stroke-width='1.5'/>\
             <text x='{x:.0}' y='{y:.0}' text-anchor='middle' font-weight='bold'>{}</text>\
             <text x='{x:.0}' y='{:.0}' text-anchor='middle' font-size='11' fill='#555'>{} gw</text>",
            esc(&c.name),
            y + 16.0,
            c.gateways.len()
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_names_and_draws_every_cluster() {
        let view = StatusView {
            cluster: "east".into(),
            gateway_id: "<script>".into(),
            clusters: vec![
                ClusterStatus {
                    name: "east".into(),
                    local: true,
                    gateways: vec![],
                },
                ClusterStatus {
                    name: "west".into(),
                    local: false,
                    gateways: vec![GatewayStatus {
                        id: "w0".into(),
                        connected: true,
                        rtt_ms: Some(0.25),
                        ..Default::default()
                    }],
                },
            ],
            ..Default::default()
        };
        let page = render_page(&view);
        assert!(!page.contains("<script>"));
        assert!(page.contains("&lt;script&gt;"));
        assert_eq!(page.matches("<circle").count(), 2);
        // Inside SVG every attribute value is quoted: an unquoted value swallows the '/' of
        // '/>' and nests every following element inside the circle, where it is not drawn.
        let svg = &page[page.find("<svg").expect("svg")..page.find("</svg>").expect("end")];
        for (i, _) in svg.match_indices('=') {
            assert_eq!(
                &svg[i + 1..i + 2],
                "'",
                "unquoted attribute near {:?}",
                &svg[i.saturating_sub(12)..i + 6]
            );
        }
        assert!(page.contains("0.25 ms"));
    }
}

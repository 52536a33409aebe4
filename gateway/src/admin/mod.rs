//! The admin HTTP surface: `/live`, `/ready`, `/metrics` (Prometheus text), `/status` (JSON)
//! and `/` (the live status page).
//!
//! One idea per file:
//! - [`view`]: what `/status` says — the [`StatusView`] model and how it is built from the
//!   gateway's snapshots (pure, with an explicit clock) and gathered from its live channels;
//! - [`http`]: the server — bind, routes, handlers;
//! - [`page`]: the status page — one self-contained HTML document (inline CSS and JS, no
//!   external fetches) that polls `/status` and redraws.
//!
//! The gRPC admin API lives in [`crate::grpc`].

pub mod http;
pub mod page;
pub mod view;

pub use http::{AdminError, AdminServer};
pub use view::{
    CatalogStatus, ClusterStatus, DrillStatus, EjectionStatus, GatewayStatus, LiveStatus,
    ServiceStatus, ShareStatus, StatusSource, StatusView,
};

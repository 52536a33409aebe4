//! The gateway, wired: bind everything, run, drain.
//!
//! Start-up binds every socket first (QUIC, DNS, admin), so a port conflict fails loudly before
//! anything is published; then it starts the catalog watcher, publisher, VIP allocator,
//! endpoint probes, inbound and outbound proxies and the admin server. `/ready` turns 200 when
//! the identity is loaded and the first full catalog sync is done; one unreachable remote
//! cluster never holds readiness back (peers are dialed lazily).
//!
//! Drain (SIGTERM or [`Gateway::drain`]): mark the gateway draining in the catalog, stop
//! taking connections, let in-flight streams finish up to `tunnel.drain_deadline`, close the
//! QUIC endpoint with the `draining` code, revoke the lease, stop every task.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshup_core::catalog::Snapshot;
use meshup_core::model::{ExportRecord, GatewayRecord, SCHEMA_VERSION};
use meshup_core::names::{ClusterName, GatewayId, ServiceKey};
use meshup_dns::DnsServer;
use meshup_federation::config::Backend;
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::publisher::{Publisher, PublisherConfig, PublisherHandle};
use meshup_federation::vips::{VipAllocator, VipConfig};
use meshup_federation::watcher::{Watcher, WatcherConfig, WatcherStatus};
use meshup_policy::Locality;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{
    AdminServer, CatalogStatus, ClusterStatus, GatewayStatus, ServiceStatus, StatusSource,
    StatusView,
};
use crate::config::{Config, ExportConfig};
use crate::health::{self, HealthMap};
use crate::identity::{DEFAULT_RELOAD_INTERVAL, Identity};
use crate::inbound::{self, LocalExport, LocalExports};
use crate::outbound::{self, route};
use crate::readiness::Readiness;
use crate::tunnel::{self, Endpoint};

/// How long a service must be gone from every cluster before its VIP is freed.
pub const VIP_GRACE: Duration = Duration::from_secs(300);
/// How long the final stop waits for background tasks after the drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gateway could not start, or did not stop cleanly. Each variant names the part
/// that failed; the cause is the error's source (print with `{:#}` for the whole chain).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("identity")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("QUIC endpoint")]
    Tunnel(#[from] tunnel::BindError),
    #[error("catalog store")]
    Catalog(#[from] meshup_federation::config::ConfigError),
    #[error("DNS server")]
    Dns(#[from] meshup_dns::DnsError),
    #[error("admin server")]
    Admin(#[from] crate::admin::AdminError),
    #[error("gRPC admin server")]
    Grpc(#[from] crate::grpc::GrpcError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The drain ran out of time: in-flight streams were cut, not finished. Reported so the
    /// exit status tells a supervisor (and whoever reads its log) that clients saw errors.
    #[error(
        "drain deadline of {} passed with connections still open; they were closed (raise tunnel.drain_deadline if they were meant to finish)",
        humantime::format_duration(*.0)
    )]
    DrainDeadline(Duration),
}

/// Addresses a running gateway actually bound (the real ports when the config asked for 0).
#[derive(Debug, Clone, Copy)]
pub struct BoundAddrs {
    pub quic: SocketAddr,
    pub dns: SocketAddr,
    pub admin: SocketAddr,
    /// The gRPC admin API, when `admin.grpc` is set.
    pub grpc: Option<SocketAddr>,
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    cluster: ClusterName,
    addrs: BoundAddrs,
    drain_deadline: Duration,
    readiness: Readiness,
    shutdown: CancellationToken,
    endpoint: Arc<Endpoint>,
    publisher: Arc<PublisherHandle>,
    /// Feeds probe results to the publisher; stopped first on drain so the publisher can be
    /// shut down (which needs the only reference).
    export_updates: JoinHandle<()>,
    watcher: Watcher,
    inbound: inbound::Server,
    outbound: outbound::Proxy,
    draining: watch::Sender<bool>,
    /// The local exports the proxies serve. Kept open: a closed channel tells the proxies
    /// to stop.
    _exports: Arc<watch::Sender<Arc<LocalExports>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds and starts a gateway. `embedded` is the in-process store shared by the gateways
    /// of one process (required when `catalog.backend` is `embedded`).
    pub async fn start(config: Config, embedded: Option<&EmbeddedStore>) -> Result<Self, AppError> {
        let cluster = config.cluster.clone();
        let gateway_id = config.gateway_id();
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new();
        let identity_ready = readiness.register("identity");
        let sync_ready = readiness.register("catalog sync");
        let mut registry = Registry::with_prefix("meshup");

        // Identity and every socket first: failures here stop start-up before anything is
        // published.
        let identity =
            Identity::load(config.tunnel.files(), &config.trust_domain, cluster.clone())?;
        let tunnel_metrics = tunnel::metrics::Metrics::register(&mut registry);
        let endpoint = Endpoint::bind(&config.tunnel, identity.clone(), tunnel_metrics)?;
        drop(identity_ready);
        let store = config.catalog.connect(embedded).await?;
        let layout = config.catalog.layout()?;
        let catalog_metrics = meshup_federation::Metrics::register(&mut registry);
        let watcher = Watcher::spawn(
            store.clone(),
            layout.clone(),
            config.catalog.address_rules(),
            WatcherConfig::default(),
            catalog_metrics.watcher.clone(),
            shutdown.child_token(),
        );
        let dns_metrics = meshup_dns::Metrics::register(&mut registry);
        let dns = DnsServer::bind(
            &config.dns,
            cluster.clone(),
            watcher.snapshots(),
            dns_metrics,
        )?;
        let admin = AdminServer::bind(config.admin.http).await?;
        let grpc = match config.admin.grpc {
            Some(addr) => Some(crate::grpc::GrpcServer::bind(addr).await?),
            None => None,
        };
        let addrs = BoundAddrs {
            quic: endpoint.local_addr(),
            dns: dns.local_addr(),
            admin: admin.local_addr(),
            grpc: grpc.as_ref().map(|g| g.local_addr()),
        };
        tracing::info!(
            %cluster, gateway = %gateway_id, quic = %addrs.quic, dns = %addrs.dns, admin = %addrs.admin,
            catalog = ?config.catalog.backend, "gateway bound"
        );

        let mut tasks = Vec::new();
        tasks.push(identity.spawn_reloader(DEFAULT_RELOAD_INTERVAL, shutdown.child_token()));
        let dns_stop = shutdown.child_token();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns.run(dns_stop).await {
                tracing::error!(error = %e, "DNS server stopped");
            }
        }));

        // Local endpoints: probed, published as counts, served to peers.
        let targets: Vec<(ServiceKey, Vec<SocketAddr>)> = config
            .exports
            .iter()
            .map(|e| (e.key(), e.endpoints.clone()))
            .collect();
        let health = health::spawn(
            targets,
            health::DEFAULT_PROBE_INTERVAL,
            health::DEFAULT_PROBE_TIMEOUT,
            shutdown.child_token(),
        )
        .await;
        let record = GatewayRecord {
            schema: SCHEMA_VERSION,
            cluster: cluster.clone(),
            gateway_id: gateway_id.clone(),
            region: config.region.clone(),
            zone: config.zone.clone(),
            quic_addrs: endpoint.advertised_addrs(),
            spiffe_id: identity.gateway_identity().spiffe_id().to_string(),
            draining: false,
        };
        let publisher = Publisher::new(store.clone(), layout.clone(), record)
            .with_exports(export_records(&config.exports, &health.borrow()))
            .with_config(PublisherConfig {
                lease_ttl: config.catalog.lease_ttl,
                ..PublisherConfig::default()
            })
            .with_metrics(catalog_metrics.publisher.clone())
            .spawn(shutdown.child_token());
        let publisher = Arc::new(publisher);
        let exports_tx = Arc::new(watch::Sender::new(Arc::new(local_exports(
            &config.exports,
            &health.borrow(),
        ))));
        let exports_rx = exports_tx.subscribe();
        let export_updates = spawn_export_updates(
            config.exports.clone(),
            health,
            publisher.clone(),
            exports_tx.clone(),
            shutdown.child_token(),
        );

        let vips = VipAllocator::new(
            store.clone(),
            layout.clone(),
            VipConfig {
                cluster: cluster.clone(),
                cidr: config.vip_cidr,
                grace: VIP_GRACE,
            },
            catalog_metrics.vips.clone(),
        );
        tasks.push(vips.spawn(watcher.snapshots(), shutdown.child_token()));
        // Every gateway ends drills past their expiry; one transaction per drill makes the
        // race between gateways harmless (one audit entry each).
        tasks.push(tokio::spawn(meshup_federation::drills::run_expiry(
            store.clone(),
            layout.clone(),
            watcher.snapshots(),
            shutdown.child_token(),
        )));

        let inbound =
            inbound::Server::spawn(endpoint.clone(), exports_rx.clone(), shutdown.child_token());
        let outbound = outbound::Proxy::spawn(
            endpoint.clone(),
            Locality {
                cluster: cluster.clone(),
                region: config.region.clone(),
                zone: config.zone.clone(),
            },
            exports_rx.clone(),
            watcher.snapshots(),
            config.vip_cidr,
            outbound::ServiceMetrics::register(&mut registry),
            shutdown.child_token(),
        );

        // Ready once the first full catalog sync is applied.
        let status = watcher.status();
        let sync_stop = shutdown.child_token();
        tasks.push(tokio::spawn(async move {
            let mut status = status;
            tokio::select! {
                _ = sync_stop.cancelled() => {}
                synced = status.wait_for(|s| s.synced) => {
                    if synced.is_ok() {
                        tracing::info!("first catalog sync done: ready");
                    }
                }
            }
            drop(sync_ready);
        }));

        let links = spawn_link_refresh(outbound.clone(), shutdown.child_token(), &mut tasks);
        let (draining, _) = watch::channel(false);
        let source = Arc::new(Status {
            cluster: cluster.clone(),
            gateway_id: gateway_id.to_string(),
            region: config.region.clone(),
            backend: match config.catalog.backend {
                Backend::Embedded => "embedded".into(),
                Backend::Etcd => "etcd".into(),
            },
            readiness: readiness.clone(),
            snapshots: watcher.snapshots(),
            watcher: watcher.status(),
            exports: exports_rx,
            draining: draining.subscribe(),
            links,
            outbound: outbound.clone(),
        });
        if let Some(grpc) = grpc {
            tracing::info!(addr = %grpc.local_addr(), "gRPC admin API listening");
            let context = Arc::new(crate::grpc::Context {
                cluster: cluster.clone(),
                gateway_id: gateway_id.clone(),
                region: config.region.clone(),
                zone: config.zone.clone(),
                backend: source.backend.clone(),
                dns_zone: config.dns.zone.clone(),
                store: store.clone(),
                layout: layout.clone(),
                readiness: readiness.clone(),
                snapshots: watcher.snapshots(),
                watcher: watcher.status(),
                exports: source.exports.clone(),
                draining: draining.subscribe(),
                links: source.links.clone(),
                outbound: outbound.clone(),
            });
            let grpc_stop = shutdown.child_token();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = grpc.run(context, grpc_stop).await {
                    tracing::error!(error = %e, "gRPC admin server stopped");
                }
            }));
        }
        register_gateway_metrics(&mut registry, &cluster, &gateway_id, &source.links);
        let registry = Arc::new(registry);
        let admin_stop = shutdown.child_token();
        let admin_readiness = readiness.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = admin
                .run(admin_readiness, registry, source, admin_stop)
                .await
            {
                tracing::error!(error = %e, "admin server stopped");
            }
        }));

        Ok(Self {
            cluster,
            addrs,
            drain_deadline: config.tunnel.drain_deadline,
            readiness,
            shutdown,
            endpoint,
            publisher,
            export_updates,
            watcher,
            inbound,
            outbound,
            draining,
            _exports: exports_tx,
            tasks,
        })
    }

    /// The addresses bound.
    pub fn addrs(&self) -> BoundAddrs {
        self.addrs
    }

    /// The cluster this gateway belongs to.
    pub fn cluster(&self) -> &ClusterName {
        &self.cluster
    }

    /// Readiness (what `/ready` reports).
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The catalog as this gateway sees it.
    pub fn snapshots(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.watcher.snapshots()
    }

    /// The watcher's health.
    pub fn watcher_status(&self) -> watch::Receiver<WatcherStatus> {
        self.watcher.status()
    }

    /// VIP:port listeners currently bound by the outbound proxy.
    pub fn listeners(&self) -> Arc<BTreeMap<SocketAddr, route::Route>> {
        self.outbound.listeners()
    }

    /// Drains and stops the gateway; returns whether every in-flight stream finished in time.
    pub async fn drain(self) -> bool {
        let deadline = self.drain_deadline;
        tracing::info!(
            ?deadline,
            "draining: marked in the catalog, no new connections"
        );
        self.draining.send_replace(true);
        self.publisher.set_draining(true);
        let (inbound, outbound) =
            tokio::join!(self.inbound.drain(deadline), self.outbound.drain(deadline));
        let completed = inbound.completed && outbound.completed;
        if completed {
            tracing::info!("drain complete: every in-flight stream finished");
        } else {
            tracing::warn!(
                inbound_left = inbound.remaining,
                outbound_left = outbound.remaining,
                "drain deadline passed; closing the remaining streams"
            );
        }
        self.endpoint.close(tunnel::CLOSE_DRAINING, b"draining");
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.endpoint.wait_idle()).await;
        // Revoking the lease removes our records at once instead of after the TTL.
        self.export_updates.abort();
        let _ = self.export_updates.await;
        match Arc::try_unwrap(self.publisher) {
            Ok(publisher) => publisher.shutdown().await,
            // Unreachable while the update task was the only other holder; cancelling the
            // token below still revokes the lease, just without waiting for it.
            Err(_) => {
                tracing::warn!("publisher still shared at shutdown; revoking in the background")
            }
        }
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(STOP_TIMEOUT, task).await;
        }
        tracing::info!("gateway stopped");
        completed
    }
}

/// Runs a gateway until SIGTERM or Ctrl-C, then drains it. The daemon's main loop. A drain
/// that had to cut streams at `tunnel.drain_deadline` ends in [`AppError::DrainDeadline`],
/// so the process exits non-zero.
pub async fn run_until_signal(config: Config) -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    let embedded = (config.catalog.backend == Backend::Embedded).then(EmbeddedStore::new);
    let gateway = Gateway::start(config, embedded.as_ref()).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    let deadline = gateway.drain_deadline;
    if gateway.drain().await {
        Ok(())
    } else {
        Err(AppError::DrainDeadline(deadline))
    }
}

/// The inbound/outbound view of this gateway's exports: only the endpoints that passed the
/// last probe, so new connections skip a dead endpoint instead of waiting out its connect
/// timeout. When none passed, all are kept: trying is better than refusing outright (the
/// probe may be what is wrong), and the catalog already tells peers we have nothing healthy.
/// Pure.
pub fn local_exports(exports: &[ExportConfig], health: &HealthMap) -> LocalExports {
    inbound::local_exports(exports.iter().map(|e| {
        let key = e.key();
        let healthy: Vec<SocketAddr> = health
            .get(&key)
            .map(|h| {
                h.endpoints
                    .iter()
                    .filter(|(_, up)| *up)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default();
        LocalExport {
            service: key,
            ports: e.ports.iter().map(|p| p.port).collect(),
            endpoints: if healthy.is_empty() {
                e.endpoints.clone()
            } else {
                healthy
            },
            allowed_callers: e.allowed_callers.clone(),
        }
    }))
}

/// The export records to publish, with endpoint counts from the latest probes. Pure.
pub fn export_records(
    exports: &[ExportConfig],
    health: &HealthMap,
) -> Vec<(ServiceKey, ExportRecord)> {
    exports
        .iter()
        .map(|e| {
            let key = e.key();
            let (healthy, total) = health
                .get(&key)
                .map(|h| (h.healthy(), h.total()))
                .unwrap_or((0, u32::try_from(e.endpoints.len()).unwrap_or(u32::MAX)));
            let record = ExportRecord {
                schema: SCHEMA_VERSION,
                ports: e.ports.clone(),
                endpoints_total: total,
                endpoints_healthy: healthy,
                allowed_callers: e.allowed_callers.clone(),
                labels: e.labels.clone(),
            };
            (key, record)
        })
        .collect()
}

/// Republishes the exports, and updates the endpoints the proxies use, whenever the probes
/// change what is healthy.
fn spawn_export_updates(
    exports: Vec<ExportConfig>,
    mut health: watch::Receiver<HealthMap>,
    publisher: Arc<PublisherHandle>,
    local: Arc<watch::Sender<Arc<LocalExports>>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = health.changed() => if changed.is_err() { return },
            }
            let current = health.borrow_and_update().clone();
            publisher.set_exports(export_records(&exports, &current));
            local.send_replace(Arc::new(local_exports(&exports, &current)));
        }
    })
}

/// Builds the admin status view from the gateway's live channels.
struct Status {
    cluster: ClusterName,
    gateway_id: String,
    region: String,
    backend: String,
    readiness: Readiness,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    watcher: watch::Receiver<WatcherStatus>,
    exports: watch::Receiver<Arc<LocalExports>>,
    draining: watch::Receiver<bool>,
    links: watch::Receiver<Arc<Vec<outbound::PeerLink>>>,
    outbound: outbound::Proxy,
}

/// The series that describe the gateway itself: `meshup_gateway_info` (so a dashboard can
/// join per-gateway series such as DNS and catalog ones to a cluster) and the peer links.
fn register_gateway_metrics(
    registry: &mut Registry,
    cluster: &ClusterName,
    gateway_id: &GatewayId,
    links: &watch::Receiver<Arc<Vec<outbound::PeerLink>>>,
) {
    registry.register(
        "gateway",
        "This gateway: its cluster, id and version (the value is always 1)",
        prometheus_client::metrics::info::Info::new(vec![
            ("cluster".to_owned(), cluster.to_string()),
            ("gateway".to_owned(), gateway_id.to_string()),
            ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ]),
    );
    registry.register_collector(Box::new(outbound::link_metrics::LinkCollector::new(
        cluster.clone(),
        links.clone(),
    )));
}

/// How often the status page's view of peer links is refreshed.
const LINK_REFRESH: Duration = Duration::from_secs(1);

/// Keeps a snapshot of the live peer links for the status page (the pool answers
/// asynchronously; the admin handlers read this without waiting).
fn spawn_link_refresh(
    outbound: outbound::Proxy,
    stop: CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> watch::Receiver<Arc<Vec<outbound::PeerLink>>> {
    let (tx, rx) = watch::channel(Arc::new(Vec::new()));
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(LINK_REFRESH);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            tx.send_replace(Arc::new(outbound.links().await));
        }
    }));
    rx
}

impl StatusSource for Status {
    fn status(&self) -> StatusView {
        let snapshot = self.snapshots.borrow().clone();
        let watcher = self.watcher.borrow().clone();
        let exports = self.exports.borrow().clone();
        let links = self.links.borrow().clone();
        let mut clusters: Vec<ClusterStatus> = snapshot
            .clusters()
            .map(|c| ClusterStatus {
                name: c.to_string(),
                local: *c == self.cluster,
                gateways: snapshot
                    .gateways_of(c)
                    .map(|g| {
                        let link = links.iter().find(|l| {
                            l.peer.cluster == g.cluster && g.quic_addrs.contains(&l.peer.addr)
                        });
                        GatewayStatus {
                            id: g.gateway_id.to_string(),
                            addrs: g.quic_addrs.iter().map(ToString::to_string).collect(),
                            draining: g.draining,
                            connected: link.is_some(),
                            rtt_ms: link.map(|l| l.rtt.as_secs_f64() * 1000.0),
                            mtu: link.map(|l| l.mtu),
                            lost_packets: link.map(|l| l.lost_packets),
                            black_holes: link.map(|l| l.black_holes),
                        }
                    })
                    .collect(),
            })
            .collect();
        if !clusters.iter().any(|c| c.local) {
            clusters.push(ClusterStatus {
                name: self.cluster.to_string(),
                local: true,
                gateways: vec![],
            });
        }
        let services = snapshot
            .services()
            .map(|svc| {
                let target = svc.ports.first().and_then(|p| {
                    let r = route::Route {
                        service: svc.key.clone(),
                        port: p.port,
                        target: None,
                    };
                    self.outbound
                        .explain(&snapshot, &exports, &r)
                        .main_target()
                        .map(|c| {
                            if c == &self.cluster {
                                format!("{c} (local)")
                            } else {
                                c.to_string()
                            }
                        })
                });
                ServiceStatus {
                    name: svc.key.to_string(),
                    vip: snapshot
                        .vip(&self.cluster, &svc.key, None)
                        .map(|v| v.to_string()),
                    ports: svc
                        .ports
                        .iter()
                        .map(|p| format!("{}/{} {}", p.port, p.protocol.as_str(), p.name))
                        .collect(),
                    clusters: svc
                        .clusters
                        .iter()
                        .map(|(c, e)| (c.to_string(), e.endpoints_healthy, e.endpoints_total))
                        .collect(),
                    target,
                }
            })
            .collect();
        StatusView {
            cluster: self.cluster.to_string(),
            gateway_id: self.gateway_id.clone(),
            region: self.region.clone(),
            ready: self.readiness.is_ready(),
            pending: self
                .readiness
                .pending()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            draining: *self.draining.borrow(),
            catalog: CatalogStatus {
                backend: self.backend.clone(),
                revision: snapshot.revision,
                synced: watcher.synced,
                connected: watcher.connected,
                stale_seconds: watcher.staleness().map_or(0.0, |d| d.as_secs_f64()),
                services: snapshot.service_count(),
                exports: snapshot.export_count(),
            },
            clusters,
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::health::EndpointHealth;

    fn export() -> ExportConfig {
        serde_norway::from_str(
            "{name: pay, namespace: prod, ports: [{name: http, port: 8080}], endpoints: [\"127.0.0.1:1\", \"127.0.0.1:2\"]}",
        )
        .expect("valid export")
    }

    fn health(up: &[bool]) -> HealthMap {
        let addrs = export().endpoints;
        Arc::new(BTreeMap::from([(
            export().key(),
            EndpointHealth {
                endpoints: addrs.into_iter().zip(up.iter().copied()).collect(),
            },
        )]))
    }

    #[test]
    fn counts_and_endpoints_follow_the_probes() {
        let exports = [export()];
        let key = export().key();
        let h = health(&[false, true]);
        let records = export_records(&exports, &h);
        assert_eq!(records[0].1.endpoints_total, 2);
        assert_eq!(records[0].1.endpoints_healthy, 1);
        let local = local_exports(&exports, &h);
        assert_eq!(
            local[&key].endpoints,
            vec!["127.0.0.1:2".parse().expect("addr")]
        );
        // Nothing healthy: keep trying every endpoint rather than refusing outright.
        let none = local_exports(&exports, &health(&[false, false]));
        assert_eq!(none[&key].endpoints.len(), 2);
        let records = export_records(&exports, &health(&[false, false]));
        assert_eq!(records[0].1.endpoints_healthy, 0);
    }
}

//! The gateway, wired: bind everything, run, drain.
//!
//! Start-up binds every socket first (QUIC, DNS, admin), so a port conflict fails loudly before
//! anything is published; then it starts the catalog watcher, publisher, VIP allocator,
//! endpoint probes, inbound and outbound proxies and the admin server. `/ready` turns 200 when
//! the identity is loaded and the first full catalog sync is done; one unreachable remote
//! cluster never holds readiness back (peers are dialed lazily).
//!
//! Drain (SIGTERM or [`Gateway::drain`]): mark the gateway draining in the catalog, stop
//! taking connections, let in-flight streams finish up to `tunnel.drain_deadline`, revoke the
//! lease, close the QUIC endpoint with the `draining` code, stop every task.
//!
//! Exports change while it runs ([`crate::exports`]): the export task follows the configured
//! set (config reload on SIGHUP or a file change, [`crate::reload`]; the admin API) and
//! turns each change into probe targets, catalog records and the proxies' endpoints.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
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

use crate::admin::{AdminServer, LiveStatus};
use crate::config::{Config, ExportConfig};
use crate::exports::{ExportSet, Exports};
use crate::handover::{Kind, SocketSets, Sockets, Successor};
use crate::health::{self, HealthMap, Targets};
use crate::identity::{DEFAULT_RELOAD_INTERVAL, Identity};
use crate::inbound::{self, LocalExport, LocalExports};
use crate::outbound::{self, route};
use crate::readiness::Readiness;
use crate::reload::{self, Loaded};
use crate::tunnel::{self, Endpoint};

/// How long a service must be gone from every cluster before its VIP is freed.
pub const VIP_GRACE: Duration = Duration::from_secs(300);
/// How long the final stop waits for background tasks after the drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the gateway could not start, or did not stop cleanly. Each variant names the part
/// that failed; the cause is the error's source (print with `{:#}` for the whole chain).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("node datapath")]
    Datapath(#[from] crate::datapath::DatapathError),
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
    #[error("hand-over")]
    Handover(#[from] crate::handover::HandoverError),
    #[error("cannot take over a running gateway's sockets: {0}")]
    TakeOver(String),
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
    /// The remote (mTLS) gRPC admin API, when `admin.grpc_remote` is set.
    pub grpc_remote: Option<SocketAddr>,
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    cluster: ClusterName,
    gateway_id: GatewayId,
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
    /// The catalog DNS and the outbound proxy act on (the raw catalog plus held records).
    acting: watch::Receiver<Arc<Snapshot>>,
    inbound: inbound::Server,
    outbound: outbound::Proxy,
    draining: watch::Sender<bool>,
    /// The listening sockets this gateway serves (to offer a successor) and the ones it
    /// inherited from a predecessor.
    sockets: SocketSets,
    /// Stops the admin HTTP and gRPC servers alone (a successor took them over).
    admin_stop: CancellationToken,
    /// Stops the DNS server alone (at a hand-over drain, the successor answers).
    dns_stop: CancellationToken,
    /// Set once a successor process has taken over this node.
    handed_over: watch::Sender<Option<crate::handover::HandedOver>>,
    /// The local exports the proxies serve. Kept open: a closed channel tells the proxies
    /// to stop.
    _exports: Arc<watch::Sender<Arc<LocalExports>>>,
    /// The exports as configured (file and API); changes are applied by the export task.
    exports: Exports,
    /// The config file in force (set by the reloader; empty for gateways started in-process).
    loaded: Arc<watch::Sender<Loaded>>,
    /// `meshup_config_reloads_total`, for the reloader.
    reload_metrics: reload::Metrics,
    /// Serves the hand-over socket ([`Self::serve_handover`]): its stop and its task. It
    /// holds a reference to the publisher, so it is stopped before the publisher is shut
    /// down on drain.
    handover: Option<(CancellationToken, JoinHandle<()>)>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Binds and starts a gateway. `embedded` is the in-process store shared by the gateways
    /// of one process (required when `catalog.backend` is `embedded`).
    pub async fn start(config: Config, embedded: Option<&EmbeddedStore>) -> Result<Self, AppError> {
        Self::start_with(config, embedded, None).await
    }

    /// [`Gateway::start`], taking over from the gateway process `successor` connected to:
    /// its listening sockets are used instead of binding new ones, QUIC is bound on the
    /// other of the two hand-over ports, and DNS starts answering once the catalog is synced
    /// (the predecessor answers until then).
    pub async fn start_with(
        config: Config,
        embedded: Option<&EmbeddedStore>,
        successor: Option<&Successor>,
    ) -> Result<Self, AppError> {
        let cluster = config.cluster.clone();
        let gateway_id = config.gateway_id();
        let shutdown = CancellationToken::new();
        let readiness = Readiness::new();
        let identity_ready = readiness.register("identity");
        let sync_ready = readiness.register("catalog sync");
        let listeners_ready = readiness.register("VIP listeners");
        let mut registry = Registry::with_prefix("meshup");

        // The node datapath before any socket: the VIP range and the node-local addresses
        // (e.g. dns.listen's) must be local before anything binds them.
        match &config.datapath {
            Some(datapath) => crate::datapath::prepare(datapath, config.vip_cidr).await?,
            None => {
                let reach = crate::datapath::check_vips_local(config.vip_cidr);
                if let Some(warning) = crate::datapath::reach_warning(config.vip_cidr, &reach) {
                    tracing::warn!("{warning}");
                }
            }
        }
        // Identity and every socket first: failures here stop start-up before anything is
        // published.
        let identity =
            Identity::load(config.tunnel.files(), &config.trust_domain, cluster.clone())?;
        let tunnel_metrics = tunnel::metrics::Metrics::register(&mut registry);
        registry.register_collector(Box::new(crate::identity::IdentityCollector(
            identity.clone(),
        )));
        let inherited = successor.map(|s| s.sockets.clone()).unwrap_or_default();
        let sockets = SocketSets {
            offer: Sockets::default(),
            inherited: inherited.clone(),
        };
        let tunnel_config = match successor {
            None => config.tunnel.clone(),
            Some(s) => config.tunnel.for_successor(s.quic_port).ok_or_else(|| {
                AppError::TakeOver(
                    "tunnel.handover_port is not set, so there is no free QUIC port to serve on while the running gateway drains".into(),
                )
            })?,
        };
        let endpoint = Endpoint::bind(&tunnel_config, identity.clone(), tunnel_metrics)?;
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
        // What DNS and the outbound proxy act on: the catalog plus the records that left it
        // while their gateway's link is alive (the withdrawal grace, fed once the outbound
        // proxy exists, below).
        let acting = watch::Sender::new(watcher.snapshots().borrow().clone());
        let grace_metrics = crate::grace::Metrics::register(&mut registry);
        let dns_metrics = meshup_dns::Metrics::register(&mut registry);
        let dns_udp = inherited.take_matching(Kind::DnsUdp, config.dns.listen);
        let dns_tcp = inherited.take_matching(Kind::DnsTcp, config.dns.listen);
        let dns = match (dns_udp.is_empty(), dns_tcp.into_iter().next()) {
            (false, Some(tcp)) => DnsServer::inherit(
                &config.dns,
                cluster.clone(),
                acting.subscribe(),
                dns_metrics,
                dns_udp.into_iter().map(std::net::UdpSocket::from).collect(),
                tcp.into(),
            )?,
            _ => DnsServer::bind(
                &config.dns,
                cluster.clone(),
                acting.subscribe(),
                dns_metrics,
            )?,
        };
        let admin = AdminServer::bind(config.admin.http, &inherited).await?;
        let grpc = match config.admin.grpc {
            Some(addr) => Some(crate::grpc::GrpcServer::bind(addr, &inherited).await?),
            None => None,
        };
        let grpc_remote = match config.admin.grpc_remote {
            Some(addr) => Some(
                crate::grpc::GrpcServer::bind_remote(
                    addr,
                    identity.clone(),
                    config.admin.operators.iter().cloned().collect(),
                    &inherited,
                )
                .await?,
            ),
            None => None,
        };
        let addrs = BoundAddrs {
            quic: endpoint.local_addr(),
            dns: dns.local_addr(),
            admin: admin.local_addr(),
            grpc: grpc.as_ref().map(|g| g.local_addr()),
            grpc_remote: grpc_remote.as_ref().map(|g| g.local_addr()),
        };
        tracing::info!(
            %cluster, gateway = %gateway_id, quic = %addrs.quic, dns = %addrs.dns, admin = %addrs.admin,
            catalog = ?config.catalog.backend, taken_over = successor.is_some(), "gateway bound"
        );
        offer_sockets(&sockets.offer, &addrs, &dns, &admin, &grpc, &grpc_remote).map_err(|e| {
            AppError::TakeOver(format!(
                "cannot keep the listening sockets for a successor: {e}"
            ))
        })?;

        let mut tasks = Vec::new();
        tasks.push(identity.spawn_reloader(DEFAULT_RELOAD_INTERVAL, shutdown.child_token()));
        let dns_stop = shutdown.child_token();
        let dns_run_stop = dns_stop.clone();
        // Taking over: the predecessor answers from its synced catalog until this one has its
        // own; answering from an empty one would deny names that exist.
        let mut dns_synced = successor.map(|_| watcher.status());
        tasks.push(tokio::spawn(async move {
            if let Some(status) = dns_synced.as_mut() {
                tokio::select! {
                    _ = dns_run_stop.cancelled() => return,
                    _ = status.wait_for(|s| s.synced) => {}
                }
            }
            if let Err(e) = dns.run(dns_run_stop).await {
                tracing::error!(error = %e, "DNS server stopped");
            }
        }));

        // Local endpoints: probed, published as counts, served to peers. The exports change at
        // runtime (config reload, admin API); the export task follows them.
        let exports = Exports::new(cluster.clone(), ExportSet::new(config.exports.clone()));
        let targets = watch::Sender::new(probe_targets(&config.exports));
        let health = health::spawn(
            targets.subscribe(),
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
            .with_exports(export_records(
                &config.exports,
                &health.borrow(),
                &BTreeMap::new(),
            ))
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
            exports.subscribe(),
            targets,
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
                pinned: config.pinned_names.to_allocator(),
            },
            catalog_metrics.vips.clone(),
        );
        let vip_progress = vips.progress();
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
            acting.subscribe(),
            outbound::VipListeners {
                range: config.vip_cidr,
                sockets: sockets.clone(),
                http: outbound::http::HttpOptions {
                    serving_cluster_header: config.http.serving_cluster_header(),
                    body_idle_timeout: config.http.body_idle_timeout,
                    grpc_body_idle_timeout: config.http.grpc_body_idle_timeout,
                    max_requests_per_client: config.http.max_requests_per_client,
                },
            },
            outbound::ServiceMetrics::register(&mut registry),
            shutdown.child_token(),
        );

        let acting_rx = acting.subscribe();
        tasks.push(crate::grace::spawn(
            watcher.snapshots(),
            watcher.status(),
            acting,
            outbound.clone(),
            config.catalog.withdrawal_grace,
            grace_metrics,
            shutdown.child_token(),
        ));

        // Ready once the first full catalog sync is applied, every clusterset service of it
        // has this cluster's VIP (or its allocation failed and is retried, logged): "catalog
        // sync"; and every VIP listener of that snapshot is bound (a failed bind is retried
        // at each reconcile and keeps this pending): "VIP listeners". A ready gateway answers
        // every name it serves.
        let status = watcher.status();
        let sync_stop = shutdown.child_token();
        let (sync_snapshots, sync_outbound) = (watcher.snapshots(), outbound.clone());
        let sync_cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            let mut status = status;
            tokio::select! {
                _ = sync_stop.cancelled() => {}
                synced = async {
                    status.wait_for(|s| s.synced).await?;
                    let revision = answers_every_service(sync_snapshots, vip_progress, &sync_cluster).await?;
                    drop(sync_ready);
                    sync_outbound.reconciled(revision).await;
                    Ok::<_, watch::error::RecvError>(())
                } => {
                    if synced.is_ok() {
                        let unused = inherited.clear();
                        if unused > 0 {
                            tracing::info!(unused, "closed the inherited sockets the catalog no longer wants");
                        }
                        tracing::info!("first catalog sync done, every clusterset service has its VIP, VIP listeners bound: ready");
                    }
                }
            }
            drop(listeners_ready);
        }));

        let (links, link_refresh) =
            crate::admin::view::spawn_link_refresh(outbound.clone(), shutdown.child_token());
        tasks.push(link_refresh);
        let (draining, _) = watch::channel(false);
        let loaded = Arc::new(watch::Sender::new(Loaded::default()));
        let reload_metrics = reload::Metrics::register(&mut registry);
        let source = Arc::new(LiveStatus {
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
        let admin_stop = shutdown.child_token();
        let grpc_servers: Vec<_> = grpc.into_iter().chain(grpc_remote).collect();
        if !grpc_servers.is_empty() {
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
                export_set: exports.clone(),
                loaded: loaded.subscribe(),
            });
            for grpc in grpc_servers {
                let remote = grpc.is_remote();
                tracing::info!(addr = %grpc.local_addr(), remote, "gRPC admin API listening");
                let (context, grpc_stop) = (context.clone(), admin_stop.child_token());
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = grpc.run(context, grpc_stop).await {
                        tracing::error!(error = %e, remote, "gRPC admin server stopped");
                    }
                }));
            }
        }
        register_gateway_metrics(&mut registry, &cluster, &gateway_id, &source.links);
        let registry = Arc::new(registry);
        let admin_task_stop = admin_stop.clone();
        let admin_readiness = readiness.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = admin
                .run(admin_readiness, registry, source, admin_task_stop)
                .await
            {
                tracing::error!(error = %e, "admin server stopped");
            }
        }));

        Ok(Self {
            cluster,
            gateway_id,
            addrs,
            drain_deadline: config.tunnel.drain_deadline,
            readiness,
            shutdown,
            endpoint,
            publisher,
            export_updates,
            watcher,
            acting: acting_rx,
            inbound,
            outbound,
            draining,
            sockets,
            admin_stop,
            dns_stop,
            handed_over: watch::Sender::new(None),
            _exports: exports_tx,
            exports,
            loaded,
            reload_metrics,
            handover: None,
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

    /// The catalog this gateway acts on: what DNS answers from and the outbound proxy routes
    /// by. It follows [`Self::snapshots`] once the withdrawal grace has seen each change, and
    /// keeps a withdrawn record while its grace holds it.
    pub fn acting(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.acting.clone()
    }

    /// The watcher's health.
    pub fn watcher_status(&self) -> watch::Receiver<WatcherStatus> {
        self.watcher.status()
    }

    /// The exports as configured (the file's and the admin API's), to change at runtime.
    pub fn exports(&self) -> &Exports {
        &self.exports
    }

    /// A reloader of the config file this gateway was started from (`text`: its bytes then).
    pub fn reloader(&self, path: PathBuf, text: &str, config: Config) -> reload::Reloader {
        reload::Reloader::new(
            path,
            Box::new(crate::config::ProcessEnv),
            config,
            text,
            self.exports.clone(),
            self.reload_metrics.clone(),
            self.loaded.clone(),
        )
    }

    /// VIP:port listeners currently bound by the outbound proxy.
    pub fn listeners(&self) -> imbl::OrdMap<SocketAddr, route::Route> {
        self.outbound.listeners()
    }

    /// Serves a successor process on `listener` (the hand-over socket): see
    /// [`crate::handover`]. Once one has taken over, [`Gateway::drain`] leaves the catalog to
    /// it.
    pub fn serve_handover(&mut self, listener: std::os::unix::net::UnixListener) {
        let predecessor = Arc::new(NodeHandover {
            quic_port: self.addrs.quic.port(),
            sockets: self.sockets.offer.clone(),
            publisher: self.publisher.clone(),
            readiness: self.readiness.clone(),
            handing_over: std::sync::Mutex::new(None),
            admin_stop: self.admin_stop.clone(),
            outbound: self.outbound.clone(),
        });
        let stop = self.shutdown.child_token();
        let task = tokio::spawn(crate::handover::serve(
            listener,
            predecessor,
            self.handed_over.clone(),
            stop.clone(),
        ));
        self.handover = Some((stop, task));
    }

    /// Re-asserts every catalog record under this gateway's lease (a successor, once its
    /// predecessor stopped writing).
    pub fn reassert_records(&self) {
        self.publisher.reassert();
    }

    /// After a hand-over, waits (until `until`, the drain deadline at the latest) until peers
    /// can reach the successor: peers find this node's gateway through catalog records. The
    /// successor publishes under `successor` (this gateway's own id, re-published with its
    /// QUIC address, or a new id, a new pod's name); until that record names a QUIC address
    /// other than this process's, a stream refused here would leave a peer with no other
    /// gateway of this cluster nowhere to go. So new streams are still served here until it
    /// does and [`HANDOVER_SETTLE`] has passed for peers' watches to see it.
    async fn peers_moved_to_successor(&self, successor: &GatewayId, until: tokio::time::Instant) {
        let own = self.endpoint.advertised_addrs();
        let mut snapshots = self.watcher.snapshots();
        let published = async {
            loop {
                let moved = successor_published(
                    &snapshots.borrow_and_update(),
                    &self.cluster,
                    successor,
                    &own,
                );
                if moved || snapshots.changed().await.is_err() {
                    return moved;
                }
            }
        };
        match tokio::time::timeout_at(until, published).await {
            Ok(true) => {
                tracing::info!(
                    settle = ?HANDOVER_SETTLE,
                    "the catalog names the successor's QUIC address; refusing new streams after the settle time"
                );
                let settled = tokio::time::Instant::now() + HANDOVER_SETTLE;
                tokio::time::sleep_until(settled.min(until)).await;
            }
            Ok(false) => {}
            Err(_) => tracing::warn!(
                "the catalog never named the successor's QUIC address; refusing new streams at the drain deadline"
            ),
        }
    }

    /// Drains and stops the gateway; returns whether every in-flight stream finished in time.
    /// After a hand-over the successor serves the node: this gateway stops answering DNS at
    /// once and leaves its records alone when the successor took its id (they are the
    /// successor's now), or marks them draining once peers can reach a successor under a new
    /// id; otherwise it marks itself draining in the catalog at once.
    pub async fn drain(self) -> bool {
        let deadline = self.drain_deadline;
        let handed_over = self.handed_over.borrow().clone();
        // An older successor does not name itself: it re-publishes under this id.
        let successor = handed_over.as_ref().map(|h| {
            h.successor
                .as_deref()
                .and_then(|id| GatewayId::new(id).ok())
                .unwrap_or_else(|| self.gateway_id.clone())
        });
        if handed_over.is_some() {
            tracing::info!(
                ?deadline,
                "draining after a hand-over: the successor serves the node; finishing in-flight streams"
            );
            self.dns_stop.cancel();
        } else {
            tracing::info!(
                ?deadline,
                "draining: marked in the catalog, no new connections"
            );
            self.publisher.set_draining(true);
        }
        self.draining.send_replace(true);
        let until = tokio::time::Instant::now() + deadline;
        let inbound = async {
            if let Some(successor) = &successor {
                self.peers_moved_to_successor(successor, until).await;
                // A successor under another id (a new pod's name) publishes keys of its own,
                // so this gateway's records are still its own: marked draining, they stop
                // peers opening new streams here for the rest of the drain, where each would
                // otherwise be refused and cost the peer a round trip (docs/upgrade.md).
                if successor != &self.gateway_id {
                    tracing::info!(
                        "the successor publishes under its own id: marking this gateway draining in the catalog"
                    );
                    self.publisher.set_draining(true);
                    self.publisher.set_paused(false);
                }
            }
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            self.inbound.drain(left).await
        };
        let (inbound, outbound) = tokio::join!(inbound, self.outbound.drain(deadline));
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
        // Revoking the lease removes our records at once instead of after the TTL. It comes
        // before the QUIC connections close, so a peer learns from its catalog watch that
        // this gateway is gone while its connections still refuse new streams with
        // `draining` (a cheap retry elsewhere), rather than finding a closed connection under
        // a record that still names this gateway and dialling an address nobody serves.
        // The records go marked draining, when this gateway marks them (not after a
        // successor took its id): a peer's catalog then drops the gateway as draining instead
        // of holding a record that vanished while its link was up (the withdrawal grace).
        let marked = successor.as_ref().is_none_or(|s| s != &self.gateway_id);
        if marked && !self.publisher.draining_written(MARK_WAIT).await {
            tracing::warn!(
                wait = ?MARK_WAIT,
                "the catalog does not show this gateway draining yet; revoking its records all the same"
            );
        }
        self.export_updates.abort();
        let _ = self.export_updates.await;
        if let Some((stop, task)) = self.handover {
            stop.cancel();
            let _ = tokio::time::timeout(STOP_TIMEOUT, task).await;
        }
        match Arc::try_unwrap(self.publisher) {
            // Bounded: a hung store must not hold the QUIC close back for long (a write in
            // flight waits out its request timeout before the revocation even starts).
            // Past the bound the publisher is dropped, and the records expire with the lease.
            Ok(publisher) => {
                if tokio::time::timeout(PUBLISHER_STOP, publisher.shutdown())
                    .await
                    .is_err()
                {
                    tracing::warn!(wait = ?PUBLISHER_STOP, "the catalog store did not answer the lease's revocation; the records expire with it");
                }
            }
            // Unreachable while the update task was the only other holder; cancelling the
            // token below still revokes the lease, just without waiting for it.
            Err(_) => {
                tracing::warn!("publisher still shared at shutdown; revoking in the background")
            }
        }
        self.endpoint.close(tunnel::CLOSE_DRAINING, b"draining");
        let _ = tokio::time::timeout(STOP_TIMEOUT, self.endpoint.wait_idle()).await;
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = tokio::time::timeout(STOP_TIMEOUT, task).await;
        }
        tracing::info!("gateway stopped");
        completed
    }
}

/// Longest wait at the end of a drain for the store to show this gateway draining before its
/// records are revoked.
const MARK_WAIT: Duration = Duration::from_secs(1);
/// Longest wait for the publisher to revoke the lease and stop, at the end of a drain.
const PUBLISHER_STOP: Duration = Duration::from_secs(3);

/// How long a predecessor keeps serving new streams after the catalog names its successor's
/// QUIC address: peers watch the same store and see the change within milliseconds.
const HANDOVER_SETTLE: Duration = Duration::from_secs(1);

/// Whether the catalog's record of gateway `successor` (this gateway's own id, or the new one
/// the successor took) names QUIC addresses of another process rather than `own`. Pure.
fn successor_published(
    snapshot: &Snapshot,
    cluster: &ClusterName,
    successor: &GatewayId,
    own: &[SocketAddr],
) -> bool {
    snapshot.gateway(cluster, successor).is_some_and(|record| {
        !record.quic_addrs.is_empty() && !record.quic_addrs.iter().any(|a| own.contains(a))
    })
}

/// This gateway's side of a hand-over (see [`crate::handover`]).
struct NodeHandover {
    quic_port: u16,
    sockets: Sockets,
    publisher: Arc<PublisherHandle>,
    readiness: Readiness,
    handing_over: std::sync::Mutex<Option<crate::readiness::BlockReady>>,
    admin_stop: CancellationToken,
    outbound: outbound::Proxy,
}

impl NodeHandover {
    fn guard(&self) -> std::sync::MutexGuard<'_, Option<crate::readiness::BlockReady>> {
        self.handing_over.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl crate::handover::Predecessor for NodeHandover {
    fn offer(&self) -> std::io::Result<(u16, Sockets)> {
        Ok((self.quic_port, self.sockets.clone()))
    }

    fn offered(&self) {
        // The successor publishes the same keys; /ready answers for it from now on.
        self.publisher.set_paused(true);
        *self.guard() = Some(self.readiness.register("hand-over to a successor process"));
    }

    fn released(&self) {
        // The successor answers the admin port and binds VIPs the catalog adds.
        self.admin_stop.cancel();
        self.outbound.freeze_listeners();
    }

    fn abandoned(&self, why: &str) {
        tracing::warn!(%why, "hand-over abandoned: publishing and reporting ready again");
        self.publisher.set_paused(false);
        *self.guard() = None;
    }
}

/// Keeps a duplicate of every fixed listening socket in `offer`, for a successor.
fn offer_sockets(
    offer: &Sockets,
    addrs: &BoundAddrs,
    dns: &DnsServer,
    admin: &AdminServer,
    grpc: &Option<crate::grpc::GrpcServer>,
    grpc_remote: &Option<crate::grpc::GrpcServer>,
) -> std::io::Result<()> {
    let (udp, tcp) = dns.sockets();
    for fd in udp {
        offer.add(Kind::DnsUdp, addrs.dns, fd)?;
    }
    offer.add(Kind::DnsTcp, addrs.dns, tcp)?;
    offer.add(Kind::AdminHttp, addrs.admin, admin.as_fd())?;
    if let (Some(g), Some(addr)) = (grpc, addrs.grpc) {
        offer.add(Kind::AdminGrpc, addr, g.as_fd())?;
    }
    if let (Some(g), Some(addr)) = (grpc_remote, addrs.grpc_remote) {
        offer.add(Kind::AdminGrpcRemote, addr, g.as_fd())?;
    }
    Ok(())
}

/// The config file a daemon was started from: its path and its bytes then.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub text: String,
}

/// Runs a gateway until SIGTERM or Ctrl-C, then drains it. The daemon's main loop. A drain
/// that had to cut streams at `tunnel.drain_deadline` ends in [`AppError::DrainDeadline`],
/// so the process exits non-zero. With `file`, SIGHUP and changes of the file reload it
/// ([`reload`]).
pub async fn run_until_signal(config: Config, file: Option<ConfigFile>) -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(AppError::Signals)?;
    // Installed before start-up: SIGHUP's default action would end the process.
    let mut hup = signal(SignalKind::hangup()).map_err(AppError::Signals)?;
    let embedded = (config.catalog.backend == Backend::Embedded).then(EmbeddedStore::new);
    // A gateway running on this node with the same hand-over socket hands its listening
    // sockets over instead of making this one fail to bind them.
    let successor = match &config.handover {
        Some(h) => {
            let path = h.socket.clone();
            tokio::task::spawn_blocking(move || crate::handover::take_over(&path))
                .await
                .map_err(|e| AppError::TakeOver(e.to_string()))??
        }
        None => None,
    };
    let mut gateway =
        Gateway::start_with(config.clone(), embedded.as_ref(), successor.as_ref()).await?;
    // Held while the predecessor drains; its end closes when it exits.
    let mut _predecessor = None;
    if let Some(successor) = successor {
        gateway.readiness.wait_ready().await;
        let id = gateway.gateway_id.to_string();
        let released = tokio::task::spawn_blocking(move || successor.ready(&id))
            .await
            .map_err(|e| AppError::TakeOver(e.to_string()))??;
        // The predecessor writes no more; move every record to this gateway's lease.
        gateway.reassert_records();
        tracing::info!("took over from the previous gateway process; it drains on SIGTERM");
        _predecessor = Some(released);
    }
    if let Some(h) = &config.handover {
        gateway.serve_handover(crate::handover::listen(&h.socket)?);
    }
    let (hup_tx, hup_rx) = tokio::sync::mpsc::channel(1);
    let reload_stop = gateway.shutdown.child_token();
    let reloader = file.map(|f| gateway.reloader(f.path, &f.text, config));
    // systemd (`Type=notify`): READY=1 exactly when `/ready` turns 200.
    let ready = gateway.readiness.clone();
    let told_ready = tokio::spawn(async move {
        ready.wait_ready().await;
        crate::notify::ready();
    });
    let (readiness, mut loaded) = (gateway.readiness.clone(), gateway.loaded.subscribe());
    let signals = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if hup_tx.is_closed() {
                tracing::warn!("SIGHUP: no config file to reload (started without one)");
            } else {
                // Before the first READY=1, `told_ready` says it; a reload has nothing to add.
                let was_ready = readiness.is_ready();
                if was_ready {
                    crate::notify::reloading();
                }
                loaded.borrow_and_update();
                // Full: a reload is pending already and will read the file.
                let _ = hup_tx.try_send(());
                // Every SIGHUP reload ends applied, unchanged or refused, each a change of
                // `loaded`: READY=1 again then.
                if loaded.changed().await.is_ok() && was_ready {
                    crate::notify::ready();
                }
            }
        }
    });
    if let Some(r) = reloader {
        tokio::spawn(r.run(hup_rx, reload_stop));
    } else {
        drop(hup_rx);
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
    crate::notify::stopping();
    signals.abort();
    told_ready.abort();
    let deadline = gateway.drain_deadline;
    if gateway.drain().await {
        Ok(())
    } else {
        Err(AppError::DrainDeadline(deadline))
    }
}

/// What the prober probes for `exports`.
pub fn probe_targets(exports: &[ExportConfig]) -> Targets {
    Arc::new(
        exports
            .iter()
            .map(|e| (e.key(), e.endpoints.clone()))
            .collect(),
    )
}

/// The inbound/outbound view of this gateway's exports: its endpoints less those the last
/// probe found down, so new connections skip a dead endpoint instead of waiting out its
/// connect timeout. Endpoints not probed yet (just configured) are kept: they were just
/// configured to be used. When every endpoint is down, all are kept: trying is better than
/// refusing outright (the probe may be what is wrong), and the catalog already tells peers
/// we have nothing healthy. Pure.
pub fn local_exports(exports: &[ExportConfig], health: &HealthMap) -> LocalExports {
    inbound::local_exports(exports.iter().map(|e| {
        let key = e.key();
        let down: Vec<SocketAddr> = health
            .get(&key)
            .map(|h| {
                h.endpoints
                    .iter()
                    .filter(|(_, up)| !*up)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default();
        let usable: Vec<SocketAddr> = e
            .endpoints
            .iter()
            .copied()
            .filter(|a| !down.contains(a))
            .collect();
        LocalExport {
            service: key,
            ports: e.ports.iter().map(|p| p.port).collect(),
            endpoints: if usable.is_empty() {
                e.endpoints.clone()
            } else {
                usable
            },
            allowed_callers: e.allowed_callers.clone(),
            http_ports: e
                .ports
                .iter()
                .filter(|p| p.app_protocol.per_request())
                .map(|p| p.port)
                .collect(),
            http1_ports: e
                .ports
                .iter()
                .filter(|p| p.app_protocol.per_request() && p.endpoint_protocol.http1_only())
                .map(|p| p.port)
                .collect(),
        }
    }))
}

/// The export records to publish, with endpoint counts from the latest probes. An export
/// whose endpoints were not all probed yet (just added or changed) is published once they
/// were, as at start-up, so peers never see it as all-down or untested: until then a changed
/// export keeps the counts of its `previous` record, and a new one is left out. Pure.
pub fn export_records(
    exports: &[ExportConfig],
    health: &HealthMap,
    previous: &BTreeMap<ServiceKey, ExportRecord>,
) -> Vec<(ServiceKey, ExportRecord)> {
    exports
        .iter()
        .filter_map(|e| {
            let key = e.key();
            let probed = health.get(&key).filter(|h| {
                h.endpoints.len() == e.endpoints.len()
                    && h.endpoints
                        .iter()
                        .zip(&e.endpoints)
                        .all(|((a, _), b)| a == b)
            });
            let total = u32::try_from(e.endpoints.len()).unwrap_or(u32::MAX);
            let healthy = match (probed, previous.get(&key)) {
                (Some(h), _) => h.healthy(),
                (None, Some(old)) => old.endpoints_healthy.min(total),
                (None, None) => return None,
            };
            let record = ExportRecord {
                schema: SCHEMA_VERSION,
                ports: e.ports.clone().into(),
                endpoints_total: total,
                endpoints_healthy: healthy,
                allowed_callers: e.allowed_callers.clone(),
                labels: e.labels.clone().into(),
            };
            Some((key, record))
        })
        .collect()
}

/// The export task: follows the configured exports (reloads, the admin API) and the probes.
/// On every change it sets what the prober probes, republishes the catalog records and
/// updates the endpoints the proxies use. Removed exports leave the catalog at once (peers
/// close their listeners; streams already open finish); new connections of a removed
/// export are refused, of a changed one reach its new endpoints.
fn spawn_export_updates(
    mut set: watch::Receiver<Arc<ExportSet>>,
    targets: watch::Sender<Targets>,
    mut health: watch::Receiver<HealthMap>,
    publisher: Arc<PublisherHandle>,
    local: Arc<watch::Sender<Arc<LocalExports>>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut published: BTreeMap<ServiceKey, ExportRecord> = {
            let h = health.borrow_and_update().clone();
            export_records(&set.borrow_and_update().all(), &h, &BTreeMap::new())
                .into_iter()
                .collect()
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = health.changed() => if changed.is_err() { return },
                changed = set.changed() => if changed.is_err() { return },
            }
            let exports = set.borrow_and_update().all();
            let next = probe_targets(&exports);
            targets.send_if_modified(|t| {
                let differs = *t != next;
                if differs {
                    *t = next;
                }
                differs
            });
            let current = health.borrow_and_update().clone();
            let records = export_records(&exports, &current, &published);
            publisher.set_exports(records.clone());
            published = records.into_iter().collect();
            let view = local_exports(&exports, &current);
            local.send_if_modified(|l| {
                let differs = **l != view;
                if differs {
                    *l = Arc::new(view);
                }
                differs
            });
        }
    })
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

/// Waits until the catalog snapshot has this cluster's VIP for every clusterset service
/// (or a failed allocation for it, retried with backoff: [`meshup_federation::vips::unanswered`]);
/// returns that snapshot's revision. Logs what it waits for every few seconds, so a slow
/// start says why.
async fn answers_every_service(
    mut snapshots: watch::Receiver<Arc<meshup_core::catalog::Snapshot>>,
    mut progress: watch::Receiver<meshup_federation::vips::VipProgress>,
    cluster: &meshup_core::names::ClusterName,
) -> Result<i64, watch::error::RecvError> {
    const REPORT_EVERY: Duration = Duration::from_secs(5);
    let mut last_report = tokio::time::Instant::now();
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        {
            let progress = progress.borrow_and_update();
            let mut waiting = meshup_federation::vips::unanswered(&snapshot, cluster, &progress);
            let Some(first) = waiting.next() else {
                return Ok(snapshot.revision);
            };
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = tokio::time::Instant::now();
                tracing::info!(
                    waiting = 1 + waiting.count(),
                    %first,
                    "not ready: clusterset services wait for their VIP"
                );
            }
        }
        tokio::select! {
            changed = snapshots.changed() => changed?,
            changed = progress.changed() => changed?,
            () = tokio::time::sleep(REPORT_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::health::EndpointHealth;

    #[test]
    fn the_predecessor_refuses_streams_only_once_the_record_names_the_successor() {
        use meshup_core::fixture;
        let cluster = fixture::cluster("east");
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let own = [addr(4000)];
        let with = |cluster: &str, id: &str, ports: &[u16]| {
            let mut snapshot = Snapshot::new();
            snapshot.apply(fixture::put_gateway(GatewayRecord {
                quic_addrs: ports.iter().map(|p| addr(*p)).collect(),
                ..fixture::gateway(cluster, id)
            }));
            snapshot
        };
        let both = {
            let mut snapshot = with("east", "east-0", &[4000]);
            snapshot.apply(fixture::put_gateway(GatewayRecord {
                quic_addrs: vec![addr(4001)],
                ..fixture::gateway("east", "east-1")
            }));
            snapshot
        };
        // (what, the catalog, the id the successor publishes under, refuse new streams?)
        let cases = [
            ("no record yet", Snapshot::new(), "east-0", false),
            (
                "still ours",
                with("east", "east-0", &[4000]),
                "east-0",
                false,
            ),
            (
                "ours among others",
                with("east", "east-0", &[4001, 4000]),
                "east-0",
                false,
            ),
            (
                "the successor's",
                with("east", "east-0", &[4001]),
                "east-0",
                true,
            ),
            (
                "another gateway of the cluster",
                with("east", "east-1", &[4001]),
                "east-0",
                false,
            ),
            (
                "another cluster's",
                with("west", "east-0", &[4001]),
                "east-0",
                false,
            ),
            (
                "no address at all",
                with("east", "east-0", &[]),
                "east-0",
                false,
            ),
            (
                "a successor under a new id, not yet published",
                with("east", "east-0", &[4000]),
                "east-1",
                false,
            ),
            (
                "a successor under a new id, published beside ours",
                both,
                "east-1",
                true,
            ),
        ];
        for (what, snapshot, successor, want) in cases {
            assert_eq!(
                successor_published(&snapshot, &cluster, &fixture::gateway_id(successor), &own),
                want,
                "{what}"
            );
        }
    }

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
        let none = BTreeMap::new();
        let h = health(&[false, true]);
        let records = export_records(&exports, &h, &none);
        assert_eq!(records[0].1.endpoints_total, 2);
        assert_eq!(records[0].1.endpoints_healthy, 1);
        let local = local_exports(&exports, &h);
        assert_eq!(
            local[&key].endpoints,
            vec!["127.0.0.1:2".parse().expect("addr")]
        );
        // Nothing healthy: keep trying every endpoint rather than refusing outright.
        let all_down = local_exports(&exports, &health(&[false, false]));
        assert_eq!(all_down[&key].endpoints.len(), 2);
        let records = export_records(&exports, &health(&[false, false]), &none);
        assert_eq!(records[0].1.endpoints_healthy, 0);
    }

    /// Exports added or changed at runtime (reload, admin API), before and after their first
    /// probe.
    #[test]
    fn new_and_changed_exports_before_their_first_probe() {
        let addr = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let key = export().key();
        let probed = health(&[false, true]); // :1 down, :2 up
        let published: BTreeMap<ServiceKey, ExportRecord> =
            export_records(&[export()], &probed, &BTreeMap::new())
                .into_iter()
                .collect();

        // Not probed and never published: left out until probed.
        let unprobed: HealthMap = Arc::new(BTreeMap::new());
        assert!(export_records(&[export()], &unprobed, &BTreeMap::new()).is_empty());
        // ... but the proxies may use it at once.
        assert_eq!(
            local_exports(&[export()], &unprobed)[&key].endpoints.len(),
            2
        );

        // Endpoint :2 swapped for :3: the record keeps its last counts until :3 is probed;
        // new connections go to :3 at once, never to the removed :2 nor the down :1.
        let mut swapped = export();
        swapped.endpoints = vec![addr("127.0.0.1:1"), addr("127.0.0.1:3")];
        let records = export_records(std::slice::from_ref(&swapped), &probed, &published);
        assert_eq!(
            (records[0].1.endpoints_healthy, records[0].1.endpoints_total),
            (1, 2)
        );
        assert_eq!(
            local_exports(std::slice::from_ref(&swapped), &probed)[&key].endpoints,
            vec![addr("127.0.0.1:3")]
        );
        // Probed: its own counts.
        let after: HealthMap = Arc::new(BTreeMap::from([(
            key.clone(),
            EndpointHealth {
                endpoints: vec![(addr("127.0.0.1:1"), true), (addr("127.0.0.1:3"), true)],
            },
        )]));
        let records = export_records(std::slice::from_ref(&swapped), &after, &published);
        assert_eq!(records[0].1.endpoints_healthy, 2);
        // Removed: gone from the records and the proxies' view.
        assert!(export_records(&[], &after, &published).is_empty());
        assert!(local_exports(&[], &after).is_empty());
    }
}

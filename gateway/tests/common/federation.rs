//! Whole gateways (`app::Gateway`) federated in one process: one `EmbeddedStore`, each gateway
//! its own cluster with its region and zone, exporting `pay.prod:8080` from in-test backends
//! that answer every connection with their cluster's name. Policies and drills are written
//! through the store, as an operator would; a client opens new connections to a VIP and
//! counts where each went; metric series are read from `/metrics`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use meshup_core::catalog::Snapshot;
use meshup_core::model::{PortSpec, Protocol};
use meshup_core::names::{ClusterName, DrillId, ServiceKey};
use meshup_core::policy::{DrillRecord, PolicyRecord};
use meshup_federation::config::{Backend as StoreBackend, CatalogConfig};
use meshup_federation::embedded::EmbeddedStore;
use meshup_federation::keys::KeyLayout;
use meshup_gateway::app::Gateway;
use meshup_gateway::config::{AdminConfig, Config, ExportConfig};
use meshup_gateway::identity::IdentityFiles;
use meshup_gateway::tunnel::TunnelConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::admin::{Exposition, scrape};
use super::{Backend, Pki, SERVICE_PORT, TD, assert_eventually, cluster, service};

/// The catalog prefix of test federations.
pub const PREFIX: &str = "/fedtest";
/// How long start-up and catalog changes may take to reach every gateway.
const CONVERGE: Duration = Duration::from_secs(20);

// === configs ===

/// A gateway of `cluster` on loopback ports chosen by the kernel, with its identity in
/// `identity`, VIPs from `vip_cidr`, and `exports`.
pub fn gateway_config(
    identity: &Path,
    cluster_name: &str,
    catalog: CatalogConfig,
    vip_cidr: &str,
    exports: Vec<ExportConfig>,
) -> Config {
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut config = Config {
        cluster: cluster(cluster_name),
        gateway_id: None,
        region: String::new(),
        zone: String::new(),
        trust_domain: TD.into(),
        catalog,
        vip_cidr: vip_cidr.parse().expect("cidr"),
        pinned_names: Default::default(),
        tunnel: TunnelConfig {
            listen: any,
            ..TunnelConfig::with_files(IdentityFiles::in_dir(identity))
        },
        dns: Default::default(),
        admin: AdminConfig {
            http: any,
            ..AdminConfig::default()
        },
        exports,
        worker_threads: None,
        http: Default::default(),
        handover: None,
        datapath: None,
    };
    config.dns.listen = any;
    config.validate().expect("valid config");
    config
}

/// An export of `service` (`<name>.<namespace>`) on TCP `port`, served by `endpoints`.
pub fn export_config(service: &str, port: u16, endpoints: Vec<SocketAddr>) -> ExportConfig {
    let key: ServiceKey = service.parse().expect("service key");
    ExportConfig {
        name: key.name,
        namespace: key.namespace,
        ports: vec![PortSpec {
            name: "tcp".into(),
            port,
            protocol: Protocol::Tcp,
            app_protocol: Default::default(),
            endpoint_protocol: Default::default(),
        }],
        endpoints,
        allowed_callers: vec![],
        labels: Default::default(),
    }
}

// === backends ===

impl Backend {
    /// A backend of cluster `name`: it answers every connection with `<name>\n`, then echoes
    /// until the client's EOF.
    pub async fn named(name: &str) -> Self {
        let line = format!("{name}\n").into_bytes();
        Self::start(move |mut s| {
            let line = line.clone();
            async move {
                if s.write_all(&line).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            }
        })
        .await
    }

    /// Stops listening right after its gateway's health probe connected, and returns when the
    /// next probe is due: until then the catalog still counts this endpoint healthy while
    /// every connection to it is refused, which is how a backend that just died looks to
    /// outlier detection. Only the probe may reach the backend meanwhile (no client traffic
    /// to it), since any accept counts as the probe.
    pub async fn refuse_after_probe(&self) -> Instant {
        let before = self.accepted.load(Ordering::SeqCst);
        let accepted = self.accepted.clone();
        assert_eventually(
            "the gateway's health probe reached the backend",
            meshup_gateway::health::DEFAULT_PROBE_INTERVAL * 3,
            || {
                let probed = accepted.load(Ordering::SeqCst) > before;
                async move { probed }
            },
        )
        .await;
        let probed = Instant::now();
        self.refuse().await;
        probed + meshup_gateway::health::DEFAULT_PROBE_INTERVAL
    }
}

// === the federation ===

/// One cluster of a test federation.
#[derive(Debug, Clone)]
pub struct ClusterPlan {
    pub name: &'static str,
    pub region: &'static str,
    pub zone: &'static str,
    /// One backend per entry, listening from the start if `true`; empty: no export.
    pub endpoints: Vec<bool>,
}

/// A cluster `name` in `region`/`zone` exporting `pay.prod` from one backend per entry of
/// `endpoints` (`true`: listening from the start).
pub fn plan(
    name: &'static str,
    region: &'static str,
    zone: &'static str,
    endpoints: &[bool],
) -> ClusterPlan {
    ClusterPlan {
        name,
        region,
        zone,
        endpoints: endpoints.to_vec(),
    }
}

struct Member {
    plan: ClusterPlan,
    /// `None` once drained.
    gateway: Option<Gateway>,
    backends: Vec<Backend>,
}

/// Whole gateways on one embedded store.
pub struct Federation {
    pub store: EmbeddedStore,
    pub layout: KeyLayout,
    members: BTreeMap<&'static str, Member>,
    _pki: Pki,
    _vips: VipBlock,
}

impl Federation {
    /// Starts one gateway per plan, each with its backends, and waits until every gateway is
    /// ready and sees every export with the healthy count its plan gives.
    pub async fn start(plans: &[ClusterPlan]) -> Self {
        assert!(plans.len() <= 4, "a VIP block has room for four gateways");
        let pki = Pki::new();
        let vips = VipBlock::reserve();
        let store = EmbeddedStore::new();
        let mut members = BTreeMap::new();
        for (i, plan) in plans.iter().enumerate() {
            let mut backends = Vec::new();
            for up in &plan.endpoints {
                let b = Backend::named(plan.name).await;
                if !up {
                    b.refuse().await;
                }
                backends.push(b);
            }
            let exports = if backends.is_empty() {
                vec![]
            } else {
                vec![export_config(
                    "pay.prod",
                    SERVICE_PORT,
                    backends.iter().map(|b| b.addr).collect(),
                )]
            };
            let catalog = CatalogConfig {
                backend: StoreBackend::Embedded,
                prefix: PREFIX.into(),
                lease_ttl: Duration::from_secs(5),
                allow_loopback_addresses: true,
                ..CatalogConfig::default()
            };
            let mut config = gateway_config(
                &pki.issue(plan.name, plan.name),
                plan.name,
                catalog,
                &vips.range(i),
                exports,
            );
            config.region = plan.region.into();
            config.zone = plan.zone.into();
            // No test holds a connection across a drain for long.
            config.tunnel.drain_deadline = Duration::from_secs(2);
            // The admin API too, for tests that watch the event stream.
            config.admin.grpc = Some("127.0.0.1:0".parse().expect("addr"));
            let gateway = Gateway::start(config, Some(&store))
                .await
                .unwrap_or_else(|e| panic!("starting {}: {e:#}", plan.name));
            members.insert(
                plan.name,
                Member {
                    plan: plan.clone(),
                    gateway: Some(gateway),
                    backends,
                },
            );
        }
        let fed = Self {
            store,
            layout: KeyLayout::new(PREFIX).expect("prefix"),
            members,
            _pki: pki,
            _vips: vips,
        };
        for m in fed.members.values() {
            let up = m.plan.endpoints.iter().filter(|u| **u).count() as u32;
            if m.plan.endpoints.is_empty() {
                continue;
            }
            for observer in fed.members.keys() {
                fed.wait_export(observer, m.plan.name, Some(up)).await;
            }
        }
        assert_eventually("every gateway ready", CONVERGE, || {
            let ready = fed
                .members
                .values()
                .all(|m| m.gateway.as_ref().is_some_and(|g| g.readiness().is_ready()));
            async move { ready }
        })
        .await;
        fed
    }

    /// The running gateway of `name`.
    pub fn gateway(&self, name: &str) -> &Gateway {
        self.member(name)
            .gateway
            .as_ref()
            .unwrap_or_else(|| panic!("{name} was drained"))
    }

    fn member(&self, name: &str) -> &Member {
        self.members
            .get(name)
            .unwrap_or_else(|| panic!("no cluster {name} in this federation"))
    }

    /// The `i`-th backend of `name`.
    pub fn backend(&self, name: &str, i: usize) -> &Backend {
        &self.member(name).backends[i]
    }

    /// What `observer` currently believes of the catalog.
    pub fn snapshot(&self, observer: &str) -> Arc<Snapshot> {
        self.gateway(observer).snapshots().borrow().clone()
    }

    /// Drains and stops the gateway of `name` (its records leave the catalog).
    pub async fn drain(&mut self, name: &str) {
        let gateway = self
            .members
            .get_mut(name)
            .and_then(|m| m.gateway.take())
            .unwrap_or_else(|| panic!("{name} is not running"));
        gateway.drain().await;
    }

    /// The address a client of `observer`'s cluster connects to for `pay.prod:8080`, once its
    /// gateway listens there.
    pub async fn vip(&self, observer: &str) -> SocketAddr {
        let g = self.gateway(observer);
        let key = service();
        let mut vip = None;
        assert_eventually(
            &format!("{observer} listens on pay.prod's VIP"),
            CONVERGE,
            || {
                let snapshot = g.snapshots().borrow().clone();
                vip = snapshot
                    .vip(g.cluster(), &key, None)
                    .map(|ip| SocketAddr::new(ip, SERVICE_PORT))
                    .filter(|addr| g.listeners().contains_key(addr));
                let found = vip.is_some();
                async move { found }
            },
        )
        .await;
        vip.expect("found")
    }

    /// Waits until `observer`'s catalog satisfies `check`.
    pub async fn wait_catalog(
        &self,
        observer: &str,
        what: &str,
        check: impl Fn(&Snapshot) -> bool,
    ) {
        let g = self.gateway(observer);
        // The catalog as read, and the one the data path routes by: the second follows the
        // first through the withdrawal grace's task, so a test that routes right after this
        // wait must not act on a change only the first has seen.
        assert_eventually(&format!("{observer}: {what}"), CONVERGE, || {
            let ok = check(&g.snapshots().borrow()) && check(&g.acting().borrow());
            async move { ok }
        })
        .await;
    }

    /// Waits until `observer` sees `cluster`'s export of `pay.prod` with `healthy` healthy
    /// endpoints and a gateway that is not draining (`None`: until it sees no export of it).
    pub async fn wait_export(&self, observer: &str, cluster_name: &str, healthy: Option<u32>) {
        let c = cluster(cluster_name);
        let what = match healthy {
            Some(h) => format!("{cluster_name} exports pay.prod with {h} healthy endpoints"),
            None => format!("{cluster_name} no longer exports pay.prod"),
        };
        self.wait_catalog(observer, &what, |s| export_health(s, &c) == healthy)
            .await;
    }

    /// Writes `pay.prod`'s policy as an operator would, and waits until every running
    /// gateway applies it.
    pub async fn put_policy(&self, json: &str) {
        let want: PolicyRecord = meshup_core::policy::decode(json.as_bytes()).expect("policy JSON");
        want.validate().expect("a valid policy");
        self.write_policy(json).await;
        let key = service();
        for name in self.running() {
            self.wait_catalog(name, "the policy is in force", |s| {
                s.policy(&key).is_some_and(|p| **p == want)
            })
            .await;
        }
    }

    /// Writes `pay.prod`'s policy key with any bytes, without waiting for anything.
    pub async fn write_policy(&self, value: &str) {
        meshup_federation::store::put(
            &self.store,
            self.layout.policy(&service()),
            value.as_bytes().to_vec(),
            0,
        )
        .await
        .expect("write the policy");
    }

    /// Deletes `pay.prod`'s policy and waits until no running gateway has one.
    pub async fn delete_policy(&self) {
        meshup_federation::store::delete(&self.store, self.layout.policy(&service()))
            .await
            .expect("delete the policy");
        let key = service();
        for name in self.running() {
            self.wait_catalog(name, "no policy", |s| s.policy(&key).is_none())
                .await;
        }
    }

    /// Writes drill `id` and waits until every running gateway has it.
    pub async fn put_drill(&self, id: &str, json: &str) {
        let want: DrillRecord = meshup_core::policy::decode(json.as_bytes()).expect("drill JSON");
        want.validate().expect("a valid drill");
        let id = DrillId::new(id).expect("drill id");
        meshup_federation::store::put(
            &self.store,
            self.layout.drill(&id),
            json.as_bytes().to_vec(),
            0,
        )
        .await
        .expect("write the drill");
        for name in self.running() {
            self.wait_catalog(name, &format!("drill {id} is known"), |s| {
                s.drills().any(|(i, d)| i == &id && **d == want)
            })
            .await;
        }
    }

    /// Deletes drill `id` and waits until no running gateway has it.
    pub async fn delete_drill(&self, id: &str) {
        let id = DrillId::new(id).expect("drill id");
        meshup_federation::store::delete(&self.store, self.layout.drill(&id))
            .await
            .expect("delete the drill");
        for name in self.running() {
            self.wait_catalog(name, &format!("drill {id} is gone"), |s| {
                s.drills().all(|(i, _)| i != &id)
            })
            .await;
        }
    }

    fn running(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.members
            .iter()
            .filter(|(_, m)| m.gateway.is_some())
            .map(|(n, _)| *n)
    }

    /// `observer`'s `/metrics`.
    pub async fn metrics(&self, observer: &str) -> Exposition {
        scrape(self.gateway(observer).addrs().admin).await
    }

    /// The sum of the series of `name` on `observer` whose labels include `labels`.
    pub async fn counter(&self, observer: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metrics(observer).await.sum(name, labels)
    }
}

/// `cluster`'s healthy endpoints of `pay.prod` in `snapshot`, if it exports it from a gateway
/// that is not draining.
pub fn export_health(snapshot: &Snapshot, cluster: &ClusterName) -> Option<u32> {
    let export = snapshot.service(&service())?.clusters.get(cluster)?;
    snapshot
        .gateways_of(cluster)
        .any(|g| !g.draining)
        .then_some(export.endpoints_healthy)
}

/// A drill record of `kind` on `cluster` (for `pay.prod` if `for_service`), in force from now
/// for `secs` seconds.
pub fn drill_json(kind: &str, cluster: &str, for_service: bool, secs: i64) -> String {
    let now = unix_now();
    let service = if for_service {
        r#","service":{"namespace":"prod","name":"pay"}"#
    } else {
        ""
    };
    format!(
        r#"{{"schema":1,"kind":"{kind}","cluster":"{cluster}"{service},"who":"failover-tests","why":"checking {kind}","created":{now},"expires":{}}}"#,
        now + secs
    )
}

/// Unix seconds now, as drills count time.
pub fn unix_now() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_secs()).expect("in range")
}

// === VIP ranges ===

/// A /24 of loopback addresses for one federation's VIPs (a /26 per gateway), reserved across
/// processes: the reservation is a TCP listener on the block's network address, which no
/// VIP ever is, so two tests running at once never bind each other's VIPs.
struct VipBlock {
    base: Ipv4Addr,
    _lock: std::net::TcpListener,
}

impl VipBlock {
    /// Blocks live in 127.200.0.0 – 127.254.255.255.
    const BLOCKS: usize = 55 * 256;
    const LOCK_PORT: u16 = 65_432;

    fn reserve() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let start = std::process::id() as usize * 16 + NEXT.fetch_add(1, Ordering::Relaxed);
        for i in 0..Self::BLOCKS {
            let n = (start + i) % Self::BLOCKS;
            let base = Ipv4Addr::new(127, 200 + (n / 256) as u8, (n % 256) as u8, 0);
            if let Ok(lock) = std::net::TcpListener::bind((base, Self::LOCK_PORT)) {
                return Self { base, _lock: lock };
            }
        }
        panic!("no free VIP block in 127.200.0.0/8");
    }

    /// The `i`-th gateway's `vip_cidr`.
    fn range(&self, i: usize) -> String {
        let [a, b, c, _] = self.base.octets();
        format!("{a}.{b}.{c}.{}/26", 64 * i)
    }
}

// === clients ===

/// Where new connections went: answers by cluster, and connections that got none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub by_cluster: BTreeMap<String, usize>,
    pub failures: usize,
}

impl Tally {
    /// Connections that `cluster` answered.
    pub fn count(&self, cluster: &str) -> usize {
        self.by_cluster.get(cluster).copied().unwrap_or(0)
    }

    /// Connections made.
    pub fn total(&self) -> usize {
        self.by_cluster.values().sum::<usize>() + self.failures
    }

    /// `cluster`'s share of the connections, in percent.
    pub fn percent(&self, cluster: &str) -> f64 {
        100.0 * self.count(cluster) as f64 / self.total().max(1) as f64
    }

    /// Whether every connection went to `cluster`.
    pub fn all(&self, cluster: &str) -> bool {
        self.failures == 0 && self.by_cluster.keys().all(|c| c == cluster)
    }

    fn add(&mut self, answer: std::io::Result<String>) {
        match answer {
            Ok(c) => *self.by_cluster.entry(c).or_default() += 1,
            Err(_) => self.failures += 1,
        }
    }
}

/// Opens `n` new connections to `vip`, `concurrency` at a time, and counts which cluster
/// answered each (or that none did). `concurrency` 1 makes them strictly one after another.
pub async fn tally(vip: SocketAddr, n: usize, concurrency: usize) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                let mut t = Tally::default();
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    t.add(answer(vip).await);
                }
                t
            })
        })
        .collect();
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.expect("client task");
        for (c, k) in t.by_cluster {
            *total.by_cluster.entry(c).or_default() += k;
        }
        total.failures += t.failures;
    }
    total
}

/// One new connection to `vip`: the cluster that answered it, then closed.
pub async fn answer(vip: SocketAddr) -> std::io::Result<String> {
    Held::open(vip).await.map(|h| h.cluster)
}

/// A client connection held open, with the cluster that answered it.
pub struct Held {
    pub cluster: String,
    stream: TcpStream,
}

impl Held {
    /// Connects to `vip` and reads the answering cluster's name.
    pub async fn open(vip: SocketAddr) -> std::io::Result<Self> {
        let exchange = async {
            let mut stream = TcpStream::connect(vip).await?;
            let _ = stream.set_nodelay(true);
            // The backend sends its line, then nothing until the client does.
            let mut line = Vec::new();
            let mut chunk = [0u8; 64];
            while !line.ends_with(b"\n") && line.len() < 64 {
                match stream.read(&mut chunk).await? {
                    0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                    n => line.extend_from_slice(&chunk[..n]),
                }
            }
            match std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.strip_suffix('\n'))
            {
                Some(cluster) => Ok(Self {
                    cluster: cluster.to_owned(),
                    stream,
                }),
                None => Err(std::io::ErrorKind::InvalidData.into()),
            }
        };
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }

    /// Sends `msg` and reads it back from the backend's echo.
    pub async fn echo(&mut self, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        let exchange = super::ping(&mut self.stream, msg);
        tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

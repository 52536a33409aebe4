//! The failover set-up shared by `tests/tests/failover.rs` and `bench/failover`: three
//! clusters on one real etcd, one gateway each. `east` is the client side (no exports);
//! `west` and `north` export `echo.prod`, each backed by an [`EchoServer`] of its own, so
//! every connection's serving cluster is known. The policy of `echo.prod` is written with
//! `etcdctl put` before the gateways start: `levels: [[west], [north]]` (docs/policy.md).
//! Drills are written the same way.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use meshup_core::policy::{DrillRecord, PolicyRecord};

use crate::gateways::{Certs, GatewayProcess, GatewaySpec};
use crate::workload::EchoServer;
use crate::{EtcdServer, eventually_ok};

/// The service clients reach through east.
pub const SERVICE: &str = "echo.prod";
pub const SERVICE_NAME: &str = "echo";
pub const NAMESPACE: &str = "prod";
pub const PORT: u16 = 7000;
/// The policy's levels, best first.
pub const LEVELS: [&str; 2] = ["west", "north"];

/// How the federation is started.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    /// Catalog prefix.
    pub prefix: &'a str,
    /// Second octet of the VIP ranges: east `127.<o>.1.0/24`, west `.2`, north `.3`.
    pub vip_octet: u8,
    /// The `meshup` binary; `None`: the one under test ([`crate::meshup_bin`]).
    pub binary: Option<&'a Path>,
    /// `MESHUP_LOG` of the gateways (`None`: the harness default).
    pub log_filter: Option<&'a str>,
    /// `worker_threads` of the gateways (`None`: the gateway's default).
    pub worker_threads: Option<usize>,
    /// West's QUIC listen port and the address it advertises instead (a fault relay in
    /// front of it, [`crate::relay`]); `None`: any port, advertised as bound.
    pub west_tunnel: Option<(u16, SocketAddr)>,
    /// The policy's `failback_hold_down`; `None`: the policy default.
    pub failback_hold_down: Option<Duration>,
    /// The policy's `outlier.base_ejection`; `None`: the policy default.
    pub base_ejection: Option<Duration>,
    /// West's and north's backends instead of their echo servers (which then serve nothing).
    pub backends: Option<[SocketAddr; 2]>,
    /// The export port's `app_protocol` (`http`, `grpc`); `None`: tcp.
    pub app_protocol: Option<&'a str>,
    /// The export port's `endpoint_protocol` (`http1`); `None`: as the client spoke.
    pub endpoint_protocol: Option<&'a str>,
    /// East serves the gRPC admin API ([`GatewayProcess::grpc_addr`]), for the CLI.
    pub east_admin: bool,
    /// East's `http.serving_cluster_header`; `None`: none.
    pub serving_cluster_header: Option<&'a str>,
    /// East's `http.body_idle_timeout`; `None`: the default.
    pub body_idle_timeout: Option<Duration>,
    /// East's `http.max_requests_per_client`; `None`: the default.
    pub max_requests_per_client: Option<u32>,
    /// East exports `echo.prod` too, to this backend (the source cluster serves it itself);
    /// `None`: east only calls it.
    pub east_backend: Option<SocketAddr>,
    /// The policy's levels, one cluster each, best first; `None`: [`LEVELS`].
    pub levels: Option<&'a [&'a str]>,
}

/// East, west and north on one etcd, with the policy in force.
#[derive(Debug)]
pub struct Federation {
    pub etcd: EtcdServer,
    pub east: GatewayProcess,
    pub west: GatewayProcess,
    pub north: GatewayProcess,
    pub west_echo: EchoServer,
    pub north_echo: EchoServer,
    /// East's VIP and port for `echo.prod`: where clients connect.
    pub vip: SocketAddr,
    prefix: String,
    // Certificates live as long as the gateways that read them.
    _certs: Certs,
}

/// The policy record of `echo.prod`: one level per cluster, in `levels` order.
pub fn policy_json(levels: &[&str]) -> String {
    policy_json_with(levels, None, None)
}

/// [`policy_json`] with a `failback_hold_down` and an `outlier.base_ejection` when given.
pub fn policy_json_with(
    levels: &[&str],
    failback_hold_down: Option<Duration>,
    base_ejection: Option<Duration>,
) -> String {
    let levels: Vec<serde_json::Value> = levels
        .iter()
        .map(|c| serde_json::json!({"clusters": [{"cluster": c}]}))
        .collect();
    let mut policy = serde_json::json!({"schema": 1, "levels": levels});
    if let Some(hold) = failback_hold_down {
        policy["failback_hold_down"] = format!("{}ms", hold.as_millis()).into();
    }
    if let Some(base) = base_ejection {
        policy["outlier"] = serde_json::json!({"base_ejection": format!("{}ms", base.as_millis())});
    }
    policy.to_string()
}

/// A drill record of `kind` (`drain`, `fail`, `pin`) on `cluster` for `echo.prod`, made now,
/// expiring in ten minutes.
pub fn drill_json(kind: &str, cluster: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    serde_json::json!({
        "schema": 1,
        "kind": kind,
        "cluster": cluster,
        "service": {"namespace": NAMESPACE, "name": SERVICE_NAME},
        "who": "meshup failover harness",
        "why": "failover test: new connections must leave the cluster, none may fail",
        "created": now,
        "expires": now + 600,
    })
    .to_string()
}

impl Federation {
    /// Starts etcd, writes the policy, starts the three gateways and waits until east routes
    /// `echo.prod` and lists both exporting clusters.
    pub async fn start(options: Options<'_>) -> anyhow::Result<Self> {
        let etcd = tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .context("etcd start task")?;
        let clusters = ["east", "west", "north"];
        let certs = match options.binary {
            Some(binary) => Certs::with_binary(binary, &clusters),
            None => Certs::new(&clusters),
        };
        let prefix = options.prefix.to_owned();
        // Checked against the record types first: a policy the gateways skip as invalid
        // would make every figure below meaningless.
        let levels = options.levels.unwrap_or(&LEVELS);
        let policy = policy_json_with(levels, options.failback_hold_down, options.base_ejection);
        meshup_core::policy::decode::<PolicyRecord>(policy.as_bytes())?.validate()?;
        etcd.etcdctl(&[
            "put",
            &format!("{prefix}/v1/policies/{NAMESPACE}/{SERVICE_NAME}"),
            &policy,
        ])?;

        let west_echo = EchoServer::start().await?;
        let north_echo = EchoServer::start().await?;
        let cidr = |n: u8| format!("127.{}.{n}.0/24", options.vip_octet);
        let (east_cidr, west_cidr, north_cidr) = (cidr(1), cidr(2), cidr(3));
        let backend = |cluster: &str, echo: &EchoServer| match (cluster, options.backends) {
            ("west", Some([west, _])) => west,
            ("north", Some([_, north])) => north,
            _ => echo.addr(),
        };
        let spec = |cluster, vip_cidr, echo: Option<&EchoServer>| GatewaySpec {
            exports: echo
                .map(|e| vec![(SERVICE_NAME, NAMESPACE, PORT, backend(cluster, e))])
                .unwrap_or_default(),
            app_protocol: options.app_protocol,
            endpoint_protocol: options.endpoint_protocol,
            log_filter: options.log_filter,
            worker_threads: options.worker_threads,
            ..GatewaySpec::new(cluster, vip_cidr, &etcd, &certs, &prefix)
        };
        let mut west = GatewayProcess::start(GatewaySpec {
            tunnel_port: options.west_tunnel.map(|t| t.0),
            advertise: options.west_tunnel.map(|t| t.1),
            ..spec("west", &west_cidr, Some(&west_echo))
        });
        let mut north = GatewayProcess::start(spec("north", &north_cidr, Some(&north_echo)));
        let mut east = GatewayProcess::start(GatewaySpec {
            grpc: options.east_admin,
            serving_cluster_header: options.serving_cluster_header,
            body_idle_timeout: options.body_idle_timeout,
            max_requests_per_client: options.max_requests_per_client,
            exports: options
                .east_backend
                .map(|b| vec![(SERVICE_NAME, NAMESPACE, PORT, b)])
                .unwrap_or_default(),
            ..spec("east", &east_cidr, None)
        });
        for g in [&mut west, &mut north, &mut east] {
            g.wait_ready().await;
        }
        let exporters: Vec<&str> = LEVELS
            .into_iter()
            .chain(options.east_backend.map(|_| "east"))
            .collect();
        eventually_ok(
            "east lists every exporting cluster for echo.prod",
            Duration::from_secs(20),
            || async {
                let listed = listed_clusters(&east)?;
                anyhow::ensure!(
                    exporters.iter().all(|c| listed.iter().any(|l| l == c)),
                    "east lists {listed:?}"
                );
                Ok(())
            },
        )
        .await;
        let vip = east.wait_routable(SERVICE, PORT).await;
        Ok(Self {
            etcd,
            east,
            west,
            north,
            west_echo,
            north_echo,
            vip,
            prefix,
            _certs: certs,
        })
    }

    /// The gateway of `cluster` (west or north).
    pub fn gateway(&mut self, cluster: &str) -> &mut GatewayProcess {
        match cluster {
            "west" => &mut self.west,
            "north" => &mut self.north,
            "east" => &mut self.east,
            other => panic!("no cluster {other} in the failover federation"),
        }
    }

    /// The echo server behind `cluster` (west or north).
    pub fn echo(&self, cluster: &str) -> &EchoServer {
        match cluster {
            "west" => &self.west_echo,
            "north" => &self.north_echo,
            other => panic!("{other} exports no echo server"),
        }
    }

    /// The exporting cluster whose echo server accepted the most connections since `from`.
    pub fn serving_since(&self, from: Instant) -> &'static str {
        let west = self.west_echo.accepted_between(from, None);
        let north = self.north_echo.accepted_between(from, None);
        if north > west { "north" } else { "west" }
    }

    /// Connections each exporting cluster's echo server accepted in `[from, to)`, in
    /// [`LEVELS`] order.
    pub fn served_between(&self, from: Instant, to: Option<Instant>) -> [(&'static str, usize); 2] {
        LEVELS.map(|c| (c, self.echo(c).accepted_between(from, to)))
    }

    /// Writes the route rules of `echo.prod` with `etcdctl put` under
    /// `<prefix>/v1/routes/<ns>/<name>`, checked against the record type first.
    pub fn write_routes(&self, json: &str) -> anyhow::Result<()> {
        meshup_core::routes::decode(json.as_bytes())?.compile()?;
        let key = format!("{}/v1/routes/{NAMESPACE}/{SERVICE_NAME}", self.prefix);
        self.etcd.etcdctl(&["put", &key, json])?;
        Ok(())
    }

    /// Writes a drill with `etcdctl put` under `<prefix>/v1/drills/<id>`; returns the instant
    /// just before the put.
    pub fn write_drill(&self, id: &str, kind: &str, cluster: &str) -> anyhow::Result<Instant> {
        let drill = drill_json(kind, cluster);
        meshup_core::policy::decode::<DrillRecord>(drill.as_bytes())?.validate()?;
        let key = format!("{}/v1/drills/{id}", self.prefix);
        let at = Instant::now();
        self.etcd.etcdctl(&["put", &key, &drill])?;
        Ok(at)
    }
}

/// The clusters east's status page lists for `echo.prod` (from its catalog, stale or not).
pub fn listed_clusters(east: &GatewayProcess) -> anyhow::Result<Vec<String>> {
    let svc = east.service_status(SERVICE)?;
    Ok(svc["clusters"]
        .as_array()
        .context("no clusters")?
        .iter()
        .filter_map(|c| c[0].as_str().map(str::to_owned))
        .collect())
}

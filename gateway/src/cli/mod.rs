//! The `meshup` client commands: `status`, `clusters`, `services`, `resolve`, `policy`,
//! `route`, `drill`, `events`, `export`. Each talks to a gateway's gRPC admin API (`--admin ADDR`, or `MESHUP_ADMIN`,
//! default 127.0.0.1:15021; `--admin https://HOST:PORT` with an operator certificate for a
//! remote gateway, [`remote`]), prints a table for people or `-o json|yaml` for scripts, and
//! exits with a code a script can trust:
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | anything else (an internal error of the gateway, a failed write of the output) |
//! | 2 | bad input: a wrong argument, a policy or route file or record that is not valid |
//! | 3 | the gateway cannot be reached, or did not answer in time |
//! | 4 | not found: an unknown service, cluster, policy, route rules or drill |
//! | 5 | conflict: a compare-and-set lost (someone changed the policy or route rules since you read them), a drill id in use |
//!
//! Every error message says what to do next.

mod export;
mod policy;
mod record;
pub mod remote;
mod render;
mod route;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use meshup_admin_api::pb::admin_service_client::AdminServiceClient;
use meshup_admin_api::pb::{self, DrillKind as PbDrillKind};
use meshup_admin_api::{DEFAULT_ADMIN_GRPC, MAX_MESSAGE_BYTES};
use serde::Serialize;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long to wait for the connection to the admin API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Exit codes (see the module docs).
pub mod exit {
    pub const OTHER: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const UNREACHABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const CONFLICT: u8 = 5;
}

/// A failed command: the message to print and the exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

impl CliError {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, CliError>;

/// Where the admin API is and how to print.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The gateway's gRPC admin address (`admin.grpc` in its config).
    /// `https://HOST:PORT` for a remote gateway's `admin.grpc_remote` (mutual TLS).
    #[arg(long, env = "MESHUP_ADMIN", default_value_t = DEFAULT_ADMIN_GRPC.to_string())]
    pub admin: String,
    /// Operator certificate for the remote admin API (`meshup certs issue --operator NAME`).
    #[arg(long, env = "MESHUP_ADMIN_CERT")]
    pub cert: Option<PathBuf>,
    /// Its private key (default: key.pem next to --cert).
    #[arg(long, env = "MESHUP_ADMIN_KEY")]
    pub key: Option<PathBuf>,
    /// The federation's trust bundle to verify the gateway with (default: bundle.pem next to
    /// --cert).
    #[arg(long, env = "MESHUP_ADMIN_CA")]
    pub ca: Option<PathBuf>,
    /// Output: a table for people, json or yaml for scripts.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

/// The client commands, flattened into `meshup`'s own.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// This gateway and the federation: clusters, gateways, links (RTT, loss), catalog.
    Status {
        #[command(flatten)]
        conn: Conn,
    },
    /// The federation's clusters as this gateway sees them: link, RTT, gateways connected,
    /// services exported, streams open, loss.
    Clusters {
        #[command(flatten)]
        conn: Conn,
    },
    /// Clusterset services: who exports them, healthy endpoints, VIP, where traffic goes now.
    Services {
        /// Only this service (`name.namespace`).
        service: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Where a new connection to NAME goes now, and why for every cluster.
    Resolve {
        /// `pay.prod.svc.clusterset.local`, a cluster-pinned name, or `pay.prod`.
        name: String,
        /// The service port (default: its first).
        #[arg(long)]
        port: Option<u16>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Failover policies: get, validate, apply, set, delete (the same verbs as `route`).
    #[command(subcommand)]
    Policy(record::RecordCommand),
    /// Route rules of http and grpc ports: get, validate, apply, set, delete (the same verbs
    /// as `policy`).
    #[command(subcommand)]
    Route(record::RecordCommand),
    /// Drills: drain, fail or pin a cluster for a while, with an audit trail.
    #[command(subcommand)]
    Drill(DrillCommand),
    /// Catalog changes as they happen (services, exports, gateways, policies, drills,
    /// failovers), until Ctrl-C.
    Events {
        /// First list the catalog as it is now.
        #[arg(long)]
        existing: bool,
        /// Stop after this many events (the first is the sync event).
        #[arg(long)]
        count: Option<usize>,
        #[command(flatten)]
        conn: Conn,
    },
    /// This gateway's exports: list them, register or withdraw one at runtime.
    #[command(subcommand)]
    Export(export::ExportCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// No new connections to the cluster; open ones finish.
    Drain,
    /// The cluster is treated as dead, as in a real outage.
    Fail,
    /// The service's traffic goes to this cluster only (needs --service).
    Pin,
}

#[derive(Debug, Subcommand)]
pub enum DrillCommand {
    /// Start a drill. It ends by itself after --for.
    Start {
        #[arg(long, value_enum)]
        kind: Kind,
        #[arg(long)]
        cluster: String,
        /// Only this service (`name.namespace`); default: every service.
        #[arg(long)]
        service: Option<String>,
        /// Why: goes into the audit trail.
        #[arg(long)]
        why: String,
        /// Who starts it: goes into the audit trail. Needed on the loopback API, which cannot
        /// tell who calls; over https the operator certificate names you.
        #[arg(long, env = "MESHUP_WHO")]
        who: Option<String>,
        /// How long it lasts (mandatory, at most 7 days): 30m, 2h.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// The drill id (default: made from kind, cluster and time).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Stop a drill before its expiry; its audit entry records who stopped it.
    Stop {
        id: String,
        /// Who stops it (as for `start`).
        #[arg(long, env = "MESHUP_WHO")]
        who: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Drills in force, and how the ended ones ended.
    List {
        /// Leave out the ended drills.
        #[arg(long)]
        no_audit: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

/// What `meshup clusters` prints: the clusters of `GetStatus`, from the gateway in `cluster`.
#[derive(Debug, Serialize)]
pub struct Clusters {
    pub cluster: String,
    pub clusters: Vec<pb::ClusterInfo>,
}

async fn get_status(conn: &Conn) -> Result<pb::GetStatusResponse> {
    Ok(connect(conn)
        .await?
        .get_status(pb::GetStatusRequest {})
        .await
        .map_err(|s| status_error(conn, s))?
        .into_inner())
}

/// Runs one client command.
pub async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Status { conn } => {
            let r = get_status(&conn).await?;
            print(&conn, &r, render::status)
        }
        AdminCommand::Clusters { conn } => {
            let r = get_status(&conn).await?;
            let view = Clusters {
                cluster: r.gateway.map(|g| g.cluster).unwrap_or_default(),
                clusters: r.clusters,
            };
            print(&conn, &view, render::clusters)
        }
        AdminCommand::Services { service, conn } => {
            let r = connect(&conn)
                .await?
                .list_services(pb::ListServicesRequest {
                    service: service.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            print(&conn, &r, render::services)
        }
        AdminCommand::Resolve { name, port, conn } => {
            let r = connect(&conn)
                .await?
                .resolve(pb::ResolveRequest {
                    name,
                    port: port.map_or(0, u32::from),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            print(&conn, &r, render::resolve)
        }
        AdminCommand::Policy(p) => record::run::<policy::Policies>(p).await,
        AdminCommand::Route(r) => record::run::<route::Routes>(r).await,
        AdminCommand::Drill(d) => drill(d).await,
        AdminCommand::Events {
            existing,
            count,
            conn,
        } => events(&conn, existing, count).await,
        AdminCommand::Export(e) => export::run(e).await,
    }
}

async fn connect(conn: &Conn) -> Result<AdminServiceClient<Channel>> {
    let target = remote::target(&conn.admin, conn.cert.is_some())?;
    let tls = if target.tls {
        Some(remote::client_config(conn)?)
    } else {
        None
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority))
        .map_err(|e| {
            CliError::new(
                exit::BAD_INPUT,
                format!(
                    "--admin {:?} is not an address: {e} (use HOST:PORT, e.g. 127.0.0.1:15021)",
                    conn.admin
                ),
            )
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = match tls {
        Some(tls) => remote::channel(endpoint, &target, tls).await,
        None => endpoint.connect().await,
    }
    .map_err(|e| unreachable(conn, &error_chain(&e)))?;
    Ok(AdminServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

fn unreachable(conn: &Conn, detail: &str) -> CliError {
    if detail.contains("alert") || detail.contains("certificate") {
        return CliError::new(
            exit::UNREACHABLE,
            format!(
                "the gateway at {} refused the TLS connection: {detail}. The remote admin API wants an operator certificate of its federation: pass --cert/--key issued by `meshup certs issue --operator NAME` with the federation's CA, and --ca with its bundle.pem.",
                conn.admin
            ),
        );
    }
    CliError::new(
        exit::UNREACHABLE,
        format!(
            "cannot reach the admin API at {}: {detail}. Is the gateway running with `admin: {{grpc: {}}}` in its config? Point --admin (or MESHUP_ADMIN) at its admin.grpc address (or at its admin.grpc_remote address as https://HOST:PORT, with --cert/--key).",
            conn.admin, conn.admin
        ),
    )
}

/// A gRPC error as a message and an exit code.
fn status_error(conn: &Conn, s: Status) -> CliError {
    let message = s.message().to_owned();
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => CliError::new(exit::BAD_INPUT, message),
        Code::NotFound => CliError::new(exit::NOT_FOUND, message),
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => {
            CliError::new(exit::CONFLICT, message)
        }
        Code::Unavailable if message.contains("catalog store") => CliError::new(
            exit::UNREACHABLE,
            format!("{message} (the gateway answers, its catalog store does not)"),
        ),
        Code::Unavailable | Code::Unknown
            if message.contains("transport error") || message.contains("connect") =>
        {
            unreachable(conn, &message)
        }
        Code::Unavailable => unreachable(conn, &message),
        // A plaintext client at a TLS port: the server's TLS alert is no HTTP/2 frame.
        Code::Internal | Code::Unknown
            if message.contains("h2 protocol error") && !conn.admin.starts_with("https://") =>
        {
            CliError::new(
                exit::UNREACHABLE,
                format!(
                    "the server at {} does not speak plaintext gRPC ({message}): if it is a gateway's remote admin address (admin.grpc_remote, mutual TLS), use --admin https://{} with --cert from `meshup certs issue --operator NAME`",
                    conn.admin, conn.admin
                ),
            )
        }
        Code::DeadlineExceeded | Code::Cancelled => CliError::new(
            exit::UNREACHABLE,
            format!(
                "the gateway at {} did not answer within {}s; try again, or check its log",
                conn.admin,
                CALL_TIMEOUT.as_secs()
            ),
        ),
        Code::ResourceExhausted => {
            CliError::new(exit::OTHER, format!("{message}; try again later"))
        }
        Code::Unimplemented => CliError::new(
            exit::OTHER,
            format!(
                "the server at {} does not serve this call of meshup.admin.v1 (another program, or an older meshup): {message}",
                conn.admin
            ),
        ),
        code => CliError::new(exit::OTHER, format!("{code:?}: {message}")),
    }
}

/// Prints an answer: the table, or JSON / YAML.
fn print<T: Serialize>(conn: &Conn, value: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    let text = match conn.output {
        Output::Table => table(value),
        Output::Json => serde_json::to_string_pretty(value)
            .map(|s| s + "\n")
            .map_err(other)?,
        Output::Yaml => serde_norway::to_string(value).map_err(other)?,
    };
    print!("{text}");
    Ok(())
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::new(exit::OTHER, e.to_string())
}

/// What `drill start` prints for scripts.
#[derive(Debug, Serialize)]
struct DrillsView {
    drills: Vec<pb::Drill>,
    audit: Vec<pb::DrillAudit>,
    revision: i64,
}

async fn drill(command: DrillCommand) -> Result<()> {
    match command {
        DrillCommand::Start {
            kind,
            cluster,
            service,
            why,
            who,
            duration,
            id,
            conn,
        } => {
            let kind = match kind {
                Kind::Drain => PbDrillKind::Drain,
                Kind::Fail => PbDrillKind::Fail,
                Kind::Pin => PbDrillKind::Pin,
            };
            let r = connect(&conn)
                .await?
                .start_drill(pb::StartDrillRequest {
                    id: id.unwrap_or_default(),
                    kind: kind as i32,
                    cluster,
                    service: service.unwrap_or_default(),
                    who: who.unwrap_or_default(),
                    why,
                    duration_seconds: duration.as_secs(),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            let drill = r.drill.unwrap_or_default();
            print(&conn, &drill, render::drill_started)
        }
        DrillCommand::Stop { id, who, conn } => {
            let r = connect(&conn)
                .await?
                .stop_drill(pb::StopDrillRequest {
                    id,
                    who: who.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            let audit = r.audit.unwrap_or_default();
            print(&conn, &audit, render::drill_stopped)
        }
        DrillCommand::List { no_audit, conn } => {
            let r = connect(&conn)
                .await?
                .list_drills(pb::ListDrillsRequest {
                    include_audit: !no_audit,
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            let view = DrillsView {
                drills: r.drills,
                audit: r.audit,
                revision: r.revision,
            };
            print(&conn, &view, |v| render::drills(&v.drills, &v.audit))
        }
    }
}

async fn events(conn: &Conn, existing: bool, count: Option<usize>) -> Result<()> {
    let mut client = connect(conn).await?;
    let mut stream = client
        .watch_events(pb::WatchEventsRequest {
            include_existing: existing,
        })
        .await
        .map_err(|s| status_error(conn, s))?
        .into_inner();
    let mut seen = 0;
    while count.is_none_or(|n| seen < n) {
        let event = tokio::select! {
            m = stream.message() => m.map_err(|s| status_error(conn, s))?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let Some(event) = event else {
            return Err(CliError::new(
                exit::UNREACHABLE,
                format!(
                    "the gateway at {} ended the event stream (it is stopping?)",
                    conn.admin
                ),
            ));
        };
        let line = match conn.output {
            Output::Table => render::event(&event),
            Output::Json => serde_json::to_string(&event).map_err(other)? + "\n",
            Output::Yaml => format!("---\n{}", serde_norway::to_string(&event).map_err(other)?),
        };
        print!("{line}");
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        seen += 1;
    }
    Ok(())
}

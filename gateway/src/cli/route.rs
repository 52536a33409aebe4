//! `meshup route get|validate|apply|set|delete`: the route rules of a service's http and grpc
//! ports (docs/http-routing.md), written as a route file (YAML or JSON, strict:
//! `meshup_admin_api::route_file`) and stored through the admin API.
//!
//! `apply` never writes over a change it has not seen: with `--revision N` only if the
//! stored rules are still at N (0: none stored), without it over the rules it reads first.
//! `set` writes whatever is stored (with `--revision N`, it is `apply --revision N`).

use std::path::PathBuf;

use clap::Subcommand;
use meshup_admin_api::pb;
use meshup_admin_api::route_file::{self, RouteFile};
use serde::Serialize;
use tonic::Code;
use tonic::transport::Channel;

use meshup_admin_api::pb::admin_service_client::AdminServiceClient;

use super::{
    Conn, Result, WriteView, cas_error, connect, print, print_deleted, print_valid, read_file,
    render, status_error,
};

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Print a service's route rules as a file to edit (no rules when none are stored).
    Get {
        /// `name.namespace`
        service: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Check a route file, here and against the gateway's catalog; writes nothing.
    Validate {
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// The service, if the file does not name it.
        #[arg(long)]
        service: Option<String>,
        /// Only check the file, without asking a gateway.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a route file if the stored rules are still at --revision (0: none stored);
    /// without --revision, over the rules stored now (refused if someone writes them
    /// between the read and the write).
    Apply {
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// The revision `route get` printed; 0 to create.
        #[arg(long)]
        revision: Option<i64>,
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write a route file over whatever is stored (with --revision: only if still at it).
    Set {
        #[arg(long, short = 'f')]
        file: PathBuf,
        #[arg(long)]
        revision: Option<i64>,
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a service's route rules: every request follows the failover policy again.
    Delete {
        service: String,
        /// Only if the stored rules are still at this revision.
        #[arg(long)]
        revision: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// What `route get -o json|yaml` prints: the record as a value, not a string.
#[derive(Debug, Serialize)]
pub struct RoutesView {
    service: String,
    found: bool,
    revision: i64,
    routes: serde_json::Value,
}

const WHAT: &str = "route rules";

fn read_route_file(file: &PathBuf, service: Option<&str>) -> Result<RouteFile> {
    read_file(file, service, "route", route_file::parse)
}

pub async fn run(command: RouteCommand) -> Result<()> {
    match command {
        RouteCommand::Get { service, conn } => {
            let r = connect(&conn)
                .await?
                .get_routes(pb::GetRoutesRequest { service })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            let routes: serde_json::Value = serde_json::from_str(&r.routes_json)
                .unwrap_or(serde_json::Value::String(r.routes_json.clone()));
            let view = RoutesView {
                service: r.service,
                found: r.found,
                revision: r.revision,
                routes,
            };
            print(&conn, &view, render_get)
        }
        RouteCommand::Validate {
            file,
            service,
            offline,
            conn,
        } => {
            let f = read_route_file(&file, service.as_deref())?;
            let mut warnings = Vec::new();
            if !offline {
                warnings = connect(&conn)
                    .await?
                    .validate_routes(pb::ValidateRoutesRequest {
                        service: f.service.to_string(),
                        routes_json: f.json(),
                    })
                    .await
                    .map_err(|s| status_error(&conn, s))?
                    .into_inner()
                    .warnings;
            }
            print_valid(&conn, WHAT, f.service.to_string(), "are", warnings)
        }
        RouteCommand::Apply {
            file,
            revision,
            service,
            conn,
        } => {
            let f = read_route_file(&file, service.as_deref())?;
            let mut client = connect(&conn).await?;
            let revision = match revision {
                Some(r) => r,
                None => {
                    let (current, same) = stored(&mut client, &conn, &f).await?;
                    if same {
                        return print(&conn, &unchanged(&f, current), render::written);
                    }
                    current
                }
            };
            apply(&mut client, &conn, &f, revision).await
        }
        RouteCommand::Set {
            file,
            revision: Some(revision),
            service,
            conn,
        } => {
            let f = read_route_file(&file, service.as_deref())?;
            apply(&mut connect(&conn).await?, &conn, &f, revision).await
        }
        RouteCommand::Set {
            file,
            revision: None,
            service,
            conn,
        } => {
            let f = read_route_file(&file, service.as_deref())?;
            let r = connect(&conn)
                .await?
                .set_routes(pb::SetRoutesRequest {
                    service: f.service.to_string(),
                    routes_json: f.json(),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            let view = WriteView {
                what: WHAT,
                service: f.service.to_string(),
                revision: r.revision,
                previous_revision: r.previous_revision,
                changed: r.changed,
                warnings: r.warnings,
            };
            print(&conn, &view, render::written)
        }
        RouteCommand::Delete {
            service,
            revision,
            conn,
        } => {
            let r = connect(&conn)
                .await?
                .delete_routes(pb::DeleteRoutesRequest {
                    service: service.clone(),
                    revision: revision.unwrap_or(0),
                })
                .await
                .map_err(|s| cas_error(&conn, s, "route"))?
                .into_inner();
            print_deleted(
                &conn,
                WHAT,
                service,
                revision.unwrap_or(0),
                r.revision,
                "every request follows the failover policy again",
            )
        }
    }
}

/// The revision of the rules stored for the file's service (0: none), and whether they are
/// the file's already.
async fn stored(
    client: &mut AdminServiceClient<Channel>,
    conn: &Conn,
    f: &RouteFile,
) -> Result<(i64, bool)> {
    match client
        .get_routes(pb::GetRoutesRequest {
            service: f.service.to_string(),
        })
        .await
    {
        Ok(r) => {
            let r = r.into_inner();
            let same = r.found
                && meshup_core::routes::decode(r.routes_json.as_bytes())
                    .is_ok_and(|stored| route_file::same_rules(&stored, &f.record));
            Ok((r.revision, same))
        }
        // None stored and the service not exported yet: create them (the gateway warns).
        Err(s) if s.code() == Code::NotFound => Ok((0, false)),
        Err(s) => Err(status_error(conn, s)),
    }
}

fn unchanged(f: &RouteFile, revision: i64) -> WriteView {
    WriteView {
        what: WHAT,
        service: f.service.to_string(),
        revision,
        previous_revision: revision,
        changed: false,
        warnings: Vec::new(),
    }
}

/// Writes the file's rules if the stored ones are still at `revision` (0: none stored).
async fn apply(
    client: &mut AdminServiceClient<Channel>,
    conn: &Conn,
    f: &RouteFile,
    revision: i64,
) -> Result<()> {
    let r = client
        .apply_routes(pb::ApplyRoutesRequest {
            service: f.service.to_string(),
            routes_json: f.json(),
            revision,
        })
        .await
        .map_err(|s| cas_error(conn, s, "route"))?
        .into_inner();
    let view = WriteView {
        what: WHAT,
        service: f.service.to_string(),
        revision: r.revision,
        previous_revision: revision,
        changed: true,
        warnings: r.warnings,
    };
    print(conn, &view, render::written)
}

/// `route get` for people: a route file to edit, with where it stands in a comment.
fn render_get(v: &RoutesView) -> String {
    let head = if v.found {
        format!(
            "# route rules for {} at revision {} (apply changes with --revision {})\n",
            v.service, v.revision, v.revision
        )
    } else {
        format!(
            "# no route rules stored for {}: every request follows the failover policy (create them with --revision 0)\n",
            v.service
        )
    };
    render::as_file(head, &v.service, &v.routes, route_file::to_yaml)
}

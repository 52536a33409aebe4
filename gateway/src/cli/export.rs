//! `meshup export list|register|withdraw`: the services a gateway exports, and exports
//! registered at runtime through the admin API (as a Consul agent's services are), for a
//! controller or a VM agent to drive a gateway.
//!
//! `register -f FILE` reads one export written as an entry of the config file's `exports:`
//! (YAML or JSON, strict: a misspelt field is an error naming its line), so an export moves
//! between the file and the API unchanged.

use std::path::PathBuf;

use clap::Subcommand;
use meshup_admin_api::convert::{Export, export_to_pb};
use meshup_admin_api::pb;

use super::render::{table, when};
use super::{CliError, Conn, Result, connect, exit, print, status_error};
use crate::config::ExportConfig;

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// The services this gateway exports, from its config file and the API, and the config
    /// file in force (hash, reloads).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Export a service from this gateway until it is withdrawn or the gateway restarts
    /// (registering it again replaces it). Refused for a service the config file exports.
    Register {
        /// One export, as an entry of the config file's `exports:` (YAML or JSON).
        #[arg(long, short = 'f')]
        file: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
    /// Withdraw a service registered through the API: it leaves the catalog, open
    /// connections finish, new ones are refused.
    Withdraw {
        /// `name.namespace`
        service: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// Reads an export file: one `exports:` entry, strict.
pub fn read_export_file(file: &PathBuf) -> Result<ExportConfig> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!("cannot read export file {}: {e}", file.display()),
        )
    })?;
    serde_norway::from_str::<ExportConfig>(&text).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!(
                "{}: {e}\n(an export file holds one entry of the config file's `exports:`: name, namespace, ports, endpoints, and optionally allowed_callers and labels; docs/admin-api.md)",
                file.display()
            ),
        )
    })
}

pub async fn run(command: ExportCommand) -> Result<()> {
    match command {
        ExportCommand::List { conn } => {
            let r = connect(&conn)
                .await?
                .list_exports(pb::ListExportsRequest {})
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            print(&conn, &r, render_list)
        }
        ExportCommand::Register { file, conn } => {
            let export = read_export_file(&file)?;
            let r = connect(&conn)
                .await?
                .register_export(pb::RegisterExportRequest {
                    export: Some(export_to_pb(&Export::from(&export))),
                })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            print(&conn, &r, |r| {
                format!(
                    "registered {} ({}): exported until `meshup export withdraw {}` or a restart of the gateway\n",
                    r.service, r.outcome, r.service
                )
            })
        }
        ExportCommand::Withdraw { service, conn } => {
            let r = connect(&conn)
                .await?
                .withdraw_export(pb::WithdrawExportRequest { service })
                .await
                .map_err(|s| status_error(&conn, s))?
                .into_inner();
            print(&conn, &r, |r| {
                format!(
                    "withdrew {}: it leaves the catalog; open connections finish, new ones are refused\n",
                    r.service
                )
            })
        }
    }
}

/// The exports table and the config file line.
pub fn render_list(r: &pb::ListExportsResponse) -> String {
    let rows: Vec<Vec<String>> = r
        .exports
        .iter()
        .map(|e| {
            let spec = e.export.clone().unwrap_or_default();
            vec![
                e.service.clone(),
                e.source.clone(),
                spec.ports
                    .iter()
                    .map(
                        |p| match (p.app_protocol.as_str(), p.endpoint_protocol.as_str()) {
                            ("" | "tcp", _) => format!("{}/{}", p.port, p.protocol),
                            (app, "http1") => {
                                format!("{}/{} ({app}, endpoints http1)", p.port, p.protocol)
                            }
                            (app, _) => format!("{}/{} ({app})", p.port, p.protocol),
                        },
                    )
                    .collect::<Vec<_>>()
                    .join(","),
                if e.published {
                    format!("{}/{}", e.healthy, e.total)
                } else {
                    "not yet".into()
                },
                spec.endpoints.join(","),
            ]
        })
        .collect();
    let mut out = if rows.is_empty() {
        "no exports\n".to_owned()
    } else {
        table(
            &["SERVICE", "SOURCE", "PORTS", "PUBLISHED", "ENDPOINTS"],
            &rows,
        )
    };
    if let Some(c) = &r.config
        && !c.path.is_empty()
    {
        let short: String = c.sha256.chars().take(12).collect();
        out.push_str(&format!(
            "\nconfig  {} sha256:{short} loaded {} ({} reloads applied, {} refused)\n",
            c.path,
            when(c.loaded_at),
            c.reloads_applied,
            c.reloads_refused
        ));
        if !c.last_error.is_empty() {
            out.push_str(&format!("last reload refused: {}\n", c.last_error));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_shows_sources_counts_and_the_config_file() {
        let spec = |port: u32, ep: &str| pb::ExportSpec {
            name: "x".into(),
            namespace: "y".into(),
            ports: vec![pb::Port {
                name: "tcp".into(),
                port,
                protocol: "tcp".into(),
                app_protocol: if port == 80 {
                    "http".into()
                } else {
                    String::new()
                },
                endpoint_protocol: if port == 80 {
                    "http1".into()
                } else {
                    String::new()
                },
            }],
            endpoints: vec![ep.into()],
            ..Default::default()
        };
        let r = pb::ListExportsResponse {
            exports: vec![
                pb::LocalExportInfo {
                    service: "pay.prod".into(),
                    source: "file".into(),
                    export: Some(spec(8080, "127.0.0.1:9000")),
                    published: true,
                    healthy: 1,
                    total: 1,
                },
                pb::LocalExportInfo {
                    service: "cart.prod".into(),
                    source: "api".into(),
                    export: Some(spec(80, "127.0.0.1:9001")),
                    published: false,
                    healthy: 0,
                    total: 0,
                },
            ],
            config: Some(pb::ConfigFileInfo {
                path: "gateway.yaml".into(),
                sha256: "0123456789abcdef".into(),
                loaded_at: 0,
                reloads_applied: 2,
                reloads_refused: 1,
                last_error: "vip_cidr cannot change without a restart; running config kept".into(),
            }),
        };
        let out = render_list(&r);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "SERVICE    SOURCE  PORTS                           PUBLISHED  ENDPOINTS"
        );
        assert_eq!(
            lines[1],
            "pay.prod   file    8080/tcp                        1/1        127.0.0.1:9000"
        );
        assert_eq!(
            lines[2],
            "cart.prod  api     80/tcp (http, endpoints http1)  not yet    127.0.0.1:9001"
        );
        assert!(
            out.contains(
                "config  gateway.yaml sha256:0123456789ab loaded  (2 reloads applied, 1 refused)"
            ),
            "{out}"
        );
        assert!(
            out.contains("last reload refused: vip_cidr cannot change"),
            "{out}"
        );
    }
}

//! The verbs of the records operators keep in the catalog through the admin API: failover
//! policies (`meshup policy …`, [`super::policy`]) and route rules (`meshup route …`,
//! [`super::route`]). Both families take the same words with the same meaning, written once
//! here; a [`Family`] says only how its record is read, compared, written and shown.
//!
//! | verb | what it does |
//! | --- | --- |
//! | `get SERVICE` | prints the stored record as a file to edit, with its revision |
//! | `validate -f F` | checks the file here and against the gateway's catalog; writes nothing |
//! | `apply -f F` | validates, reads what is stored, writes over it with a compare-and-set on what it read (someone writing in between: exit 5); the same rules already stored: nothing written |
//! | `apply -f F --revision N` | validates, writes only if the stored record is still at N (0: none may be stored) |
//! | `set -f F --revision N` | the same as `apply --revision N`; `set` needs `--revision` (without it: exit 2, nothing sent) |
//! | `delete SERVICE [--revision N]` | deletes it (only if still at N) |
//!
//! `set` without `--revision` is refused rather than written over whatever is stored: a write
//! never replaces a change its writer has not seen (`apply` is the way to write over what is
//! stored now).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use meshup_admin_api::CURRENT_REVISION_METADATA;
use meshup_admin_api::file::FileError;
use meshup_admin_api::pb::admin_service_client::AdminServiceClient;
use meshup_core::names::ServiceKey;
use serde::Serialize;
use serde::ser::SerializeStruct as _;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{CliError, Conn, Result, connect, exit, print, render, status_error};

/// The admin API client the families call.
pub(super) type Client = AdminServiceClient<Channel>;

/// The verbs of `meshup policy` and `meshup route` (see the module docs).
#[derive(Debug, Subcommand)]
pub enum RecordCommand {
    /// Print what is stored for a service as a file to edit, with its revision.
    Get {
        /// `name.namespace`
        service: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Check a file, here and against the gateway's catalog; writes nothing.
    Validate {
        /// The policy or route file (YAML or JSON) to check.
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
    /// Validate a file and write it over what is stored now (refused if someone writes
    /// between the read and the write; nothing written when it is stored already). With
    /// --revision N: only if the stored record is still at N (0: none stored).
    Apply(WriteArgs),
    /// Write a file only if the stored record is still at --revision (0: none stored), as
    /// `apply --revision`. --revision is required.
    Set(WriteArgs),
    /// Delete what is stored for a service.
    Delete {
        service: String,
        /// Only if the stored record is still at this revision.
        #[arg(long)]
        revision: Option<i64>,
        #[command(flatten)]
        conn: Conn,
    },
}

/// What `apply` and `set` take.
#[derive(Debug, Args)]
pub struct WriteArgs {
    /// The policy or route file (YAML or JSON) to write.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// The revision `get` printed; 0 to create (required by `set`).
    #[arg(long)]
    revision: Option<i64>,
    /// The service, if the file does not name it.
    #[arg(long)]
    service: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// What a `get` found.
pub(super) struct Stored {
    pub found: bool,
    pub revision: i64,
    /// The record as JSON (for a policy not stored: the default that applies).
    pub json: String,
}

/// What a write answered.
pub(super) struct Written {
    pub revision: i64,
    pub warnings: Vec<String>,
}

/// A kind of record the verbs work on: its words, its file, and its admin API calls.
pub(super) trait Family {
    type File;
    /// The command word: `policy`, `route`.
    const COMMAND: &'static str;
    /// How it is named in messages: "policy", "route rules".
    const WHAT: &'static str;
    /// "is" or "are", after [`Self::WHAT`].
    const IS: &'static str;
    /// The field of `get -o json|yaml` that holds the record: `policy`, `routes`.
    const FIELD: &'static str;
    /// What holds once it is deleted.
    const DELETED: &'static str;

    fn parse(
        text: &str,
        service: Option<&ServiceKey>,
    ) -> std::result::Result<Self::File, FileError>;
    fn service(f: &Self::File) -> &ServiceKey;
    /// Whether a stored record (JSON) says what the file says, whoever wrote it.
    fn same(stored_json: &str, f: &Self::File) -> bool;
    /// `get` for people: a file to edit, with where it stands in a comment.
    fn render_get(v: &StoredView) -> String;

    async fn get(c: &mut Client, service: String) -> std::result::Result<Stored, Status>;
    async fn validate(c: &mut Client, f: &Self::File) -> std::result::Result<Vec<String>, Status>;
    /// Writes if the stored record is still at `revision` (0: none stored).
    async fn write(
        c: &mut Client,
        f: &Self::File,
        revision: i64,
    ) -> std::result::Result<Written, Status>;
    /// Deletes if still at `revision` (0: whatever is stored); the store revision after.
    async fn delete(
        c: &mut Client,
        service: String,
        revision: i64,
    ) -> std::result::Result<i64, Status>;
}

/// What `get -o json|yaml` prints: the record as a value (under [`Family::FIELD`]), not a
/// string.
#[derive(Debug)]
pub(super) struct StoredView {
    pub service: String,
    pub found: bool,
    pub revision: i64,
    pub field: &'static str,
    pub record: serde_json::Value,
}

impl Serialize for StoredView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let mut v = s.serialize_struct("StoredView", 4)?;
        v.serialize_field("service", &self.service)?;
        v.serialize_field("found", &self.found)?;
        v.serialize_field("revision", &self.revision)?;
        v.serialize_field(self.field, &self.record)?;
        v.end()
    }
}

/// What the writes, `validate` and `delete` print for scripts.
#[derive(Debug, Serialize)]
pub(super) struct WriteView {
    /// "policy" or "route rules", for the table.
    #[serde(skip)]
    pub what: &'static str,
    pub service: String,
    pub revision: i64,
    pub previous_revision: i64,
    pub changed: bool,
    pub warnings: Vec<String>,
}

/// Runs one verb of family `F`.
pub(super) async fn run<F: Family>(command: RecordCommand) -> Result<()> {
    match command {
        RecordCommand::Get { service, conn } => {
            let r = F::get(&mut connect(&conn).await?, service.clone())
                .await
                .map_err(|s| status_error(&conn, s))?;
            let record =
                serde_json::from_str(&r.json).unwrap_or(serde_json::Value::String(r.json.clone()));
            let view = StoredView {
                service,
                found: r.found,
                revision: r.revision,
                field: F::FIELD,
                record,
            };
            print(&conn, &view, F::render_get)
        }
        RecordCommand::Validate {
            file,
            service,
            offline,
            conn,
        } => {
            let f = read_file::<F>(&file, service.as_deref())?;
            let mut warnings = Vec::new();
            if !offline {
                warnings = F::validate(&mut connect(&conn).await?, &f)
                    .await
                    .map_err(|s| status_error(&conn, s))?;
            }
            let view = WriteView {
                what: F::WHAT,
                service: F::service(&f).to_string(),
                revision: 0,
                previous_revision: 0,
                changed: false,
                warnings,
            };
            print(&conn, &view, |v| {
                let mut out = format!("ok: the {} for {} {} valid\n", v.what, v.service, F::IS);
                for w in &v.warnings {
                    out.push_str(&format!("warning: {w}\n"));
                }
                out
            })
        }
        RecordCommand::Apply(WriteArgs {
            file,
            revision,
            service,
            conn,
        }) => {
            let f = read_file::<F>(&file, service.as_deref())?;
            let mut client = connect(&conn).await?;
            let revision = match revision {
                Some(r) => r,
                None => {
                    let (current, same) = stored::<F>(&mut client, &conn, &f).await?;
                    if same {
                        let view = WriteView {
                            what: F::WHAT,
                            service: F::service(&f).to_string(),
                            revision: current,
                            previous_revision: current,
                            changed: false,
                            warnings: Vec::new(),
                        };
                        return print(&conn, &view, render::written);
                    }
                    current
                }
            };
            write::<F>(&mut client, &conn, &f, revision).await
        }
        RecordCommand::Set(WriteArgs {
            file,
            revision,
            service,
            conn,
        }) => {
            let Some(revision) = revision else {
                return Err(set_needs_revision(F::COMMAND));
            };
            let f = read_file::<F>(&file, service.as_deref())?;
            write::<F>(&mut connect(&conn).await?, &conn, &f, revision).await
        }
        RecordCommand::Delete {
            service,
            revision,
            conn,
        } => {
            let after = F::delete(
                &mut connect(&conn).await?,
                service.clone(),
                revision.unwrap_or(0),
            )
            .await
            .map_err(|s| cas_error(&conn, s, F::COMMAND))?;
            let view = WriteView {
                what: F::WHAT,
                service,
                revision: after,
                previous_revision: revision.unwrap_or(0),
                changed: true,
                warnings: Vec::new(),
            };
            print(&conn, &view, |v| {
                format!(
                    "deleted the {} for {} (catalog revision {}): {}\n",
                    v.what,
                    v.service,
                    v.revision,
                    F::DELETED
                )
            })
        }
    }
}

/// `set` without `--revision`: refused before anything is read or sent.
fn set_needs_revision(command: &str) -> CliError {
    CliError::new(
        exit::BAD_INPUT,
        format!(
            "`meshup {command} set` writes only at a revision you read: pass --revision N (the revision `meshup {command} get SERVICE` printed; 0 to create). To write over what is stored now, use `meshup {command} apply -f FILE`: it reads the revision itself and refuses if someone writes in between"
        ),
    )
}

/// Reads a file of family `F`; `--service`, if given, is the service when the file names
/// none.
fn read_file<F: Family>(file: &PathBuf, service: Option<&str>) -> Result<F::File> {
    let service = service
        .map(|s| {
            s.parse::<ServiceKey>()
                .map_err(|e| CliError::new(exit::BAD_INPUT, format!("--service: {e}")))
        })
        .transpose()?;
    let what = F::COMMAND;
    let text = std::fs::read_to_string(file).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!("cannot read {what} file {}: {e}", file.display()),
        )
    })?;
    F::parse(&text, service.as_ref()).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            format!(
                "{}: {e}\n({what} files: docs/admin-api.md; `meshup {what} get SERVICE` prints one to start from)",
                file.display()
            ),
        )
    })
}

/// The revision of what is stored for the file's service (0: nothing), and whether it is
/// the file's already.
async fn stored<F: Family>(client: &mut Client, conn: &Conn, f: &F::File) -> Result<(i64, bool)> {
    match F::get(client, F::service(f).to_string()).await {
        Ok(r) => Ok((r.revision, r.found && F::same(&r.json, f))),
        // Nothing stored and the service not exported yet: create it (the gateway warns).
        Err(s) if s.code() == Code::NotFound => Ok((0, false)),
        Err(s) => Err(status_error(conn, s)),
    }
}

/// Writes the file if the stored record is still at `revision` (0: none stored), and prints
/// what changed.
async fn write<F: Family>(
    client: &mut Client,
    conn: &Conn,
    f: &F::File,
    revision: i64,
) -> Result<()> {
    let r = F::write(client, f, revision)
        .await
        .map_err(|s| cas_error(conn, s, F::COMMAND))?;
    let view = WriteView {
        what: F::WHAT,
        service: F::service(f).to_string(),
        revision: r.revision,
        previous_revision: revision,
        changed: true,
        warnings: r.warnings,
    };
    print(conn, &view, render::written)
}

/// A lost compare-and-set says the current revision (from the trailer) and how to go on;
/// `command` reads what is stored (`policy`, `route`).
fn cas_error(conn: &Conn, s: Status, command: &str) -> CliError {
    let current = s
        .metadata()
        .get(CURRENT_REVISION_METADATA)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let mut e = status_error(conn, s);
    if e.code == exit::CONFLICT
        && let Some(c) = current
    {
        e.message.push_str(&format!(
            "\n(current revision: {c}; `meshup {command} get` shows what is stored)"
        ));
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_without_a_revision_says_what_to_run_instead() {
        for command in ["policy", "route"] {
            let e = set_needs_revision(command);
            assert_eq!(e.code, exit::BAD_INPUT);
            assert!(
                e.message
                    .contains(&format!("`meshup {command} set` writes only at a revision"))
                    && e.message.contains("pass --revision N")
                    && e.message
                        .contains(&format!("`meshup {command} apply -f FILE`")),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn get_prints_the_record_under_the_family_field() {
        let view = StoredView {
            service: "pay.prod".into(),
            found: true,
            revision: 7,
            field: "routes",
            record: serde_json::json!({"rules": []}),
        };
        assert_eq!(
            serde_json::to_string(&view).expect("json"),
            r#"{"service":"pay.prod","found":true,"revision":7,"routes":{"rules":[]}}"#
        );
    }
}

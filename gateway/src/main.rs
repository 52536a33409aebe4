//! The `meshup` command: the gateway daemon, the demo, certificate tooling and config checks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use meshup_gateway::config::{Config, ConfigError, ProcessEnv};
use meshup_gateway::identity::Identity;
use meshup_gateway::{app, certs, cli as client, demo};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "meshup",
    version,
    about = "Link service clusters across regions."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an east-west gateway (the daemon).
    Gateway {
        /// The gateway's YAML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start a live federation of three clusters on this machine and keep it running.
    Demo(demo::DemoOptions),
    /// Create a federation CA or issue gateway certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Work with config files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Client commands: ask a running gateway's admin API (see `meshup status --help`).
    #[command(flatten)]
    Admin(client::AdminCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Create a federation CA (ca.pem, ca-key.pem, bundle.pem) in DIR.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a gateway SVID (spiffe://TD/cluster/NAME/gateway, --cluster NAME) or an
    /// operator certificate for the remote admin API (spiffe://TD/operator/NAME,
    /// --operator NAME), signed by the CA in --ca.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        /// The cluster of the gateway the certificate is for.
        #[arg(
            long,
            required_unless_present = "operator",
            conflicts_with = "operator"
        )]
        cluster: Option<String>,
        /// The operator (a person or tool) the client certificate is for: a DNS label.
        #[arg(long)]
        operator: Option<String>,
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime (e.g. 24h, 7d; default 24h for a gateway, 12h for an
        /// operator).
        #[arg(long, value_parser = humantime::parse_duration)]
        lifetime: Option<Duration>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print it with defaults filled in and secrets redacted.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshup: {e:#}");
            match e.downcast_ref::<client::CliError>() {
                Some(c) => ExitCode::from(c.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Gateway { config: path } => {
            meshup_gateway::limits::raise_open_files();
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let config = Config::load_text(&text, &path, &ProcessEnv)?;
            let file = app::ConfigFile { path, text };
            let runtime = runtime(config.worker_threads)?;
            let result = runtime.block_on(app::run_until_signal(config, Some(file)));
            // A hand-over thread may still wait on a successor that will not answer; the
            // drain is over, so do not wait for it.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
            result?;
        }
        Command::Demo(opts) => runtime(None)?.block_on(demo::run(opts))?,
        Command::Admin(command) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?
            .block_on(client::run(command))?,
        Command::Certs(CertsCommand::Init { trust_domain, out }) => {
            certs::init_ca(&trust_domain, &out)?;
            println!(
                "created federation CA for {trust_domain} in {}",
                out.display()
            );
        }
        Command::Certs(CertsCommand::Issue {
            ca,
            cluster,
            operator,
            out,
            lifetime,
        }) => match (cluster, operator) {
            (Some(cluster), _) => {
                let lifetime = lifetime.unwrap_or(certs::DEFAULT_SVID_LIFETIME);
                certs::issue(&ca, &cluster, &out, lifetime)?;
                println!(
                    "issued gateway certificate for cluster {cluster} in {} (valid {})",
                    out.display(),
                    humantime::format_duration(lifetime)
                );
            }
            (None, Some(name)) => {
                let lifetime = lifetime.unwrap_or(certs::DEFAULT_OPERATOR_LIFETIME);
                let id = certs::issue_operator(&ca, &name, &out, lifetime)?;
                let dir = out.display();
                println!(
                    "issued operator certificate {id} in {dir} (valid {})\nuse it with: meshup status --admin https://HOST:PORT --cert {dir}/cert.pem --key {dir}/key.pem --ca {dir}/bundle.pem",
                    humantime::format_duration(lifetime)
                );
            }
            (None, None) => anyhow::bail!("certs issue needs --cluster NAME or --operator NAME"),
        },
        Command::Config(ConfigCommand::Check { file }) => {
            let config = Config::load(&file, &ProcessEnv)?;
            println!("# {} is valid", file.display());
            print!("{}", config.redacted_yaml());
            // The files the gateway needs at start-up must load too; a config that parses
            // but points at a missing or wrong certificate would fail only at start.
            Identity::load(
                config.tunnel.files(),
                &config.trust_domain,
                config.cluster.clone(),
            )
            .context("the tunnel's certificate files cannot be used")?;
            println!("# certificates load and match cluster {}", config.cluster);
        }
    }
    Ok(())
}

/// The async runtime: `worker_threads` threads, or one per CPU core.
///
/// One thread is tokio's current-thread scheduler on the main thread, which runs woken tasks
/// in turn: the messages of connections that wrote together leave in the same datagrams
/// (docs/benchmarks.md, "One worker thread").
fn runtime(worker_threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = worker_threads {
            b.worker_threads(n);
        }
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("MESHUP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

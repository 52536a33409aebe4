//! Config reload without a restart: on SIGHUP, and when the config file changes on disk.
//!
//! A reload reads the whole file, validates it with the start-up parser (unknown fields
//! rejected, the same environment overrides, `validate()`), and then asks [`plan`] — pure —
//! what differs from the running config and whether that may change at runtime. Only
//! `exports` may: listen addresses, identity, catalog, DNS, admin, VIP range and threads are
//! bound or connected at start-up, so a file that changes any of them is refused whole, with
//! the field named ("tunnel.listen cannot change without a restart; running config kept"),
//! and nothing of it is applied. A refused file leaves the running config as it was; the
//! reason is logged and counted.
//!
//! An applied reload replaces the file's exports ([`crate::exports`]): new ones are probed
//! and published, removed ones are withdrawn from the catalog (peers close their VIP
//! listeners; streams already open finish), changed ones take effect for new connections.
//! The diff is logged by service name.
//!
//! The file is watched through its directory (editors and Kubernetes ConfigMap volumes
//! replace files by rename, which a watch on the file itself would lose), debounced, and
//! deduplicated by content hash: a file event whose bytes are the ones last seen is ignored,
//! so an edit followed by SIGHUP is applied once.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Env};
use crate::exports::{ExportDiff, ExportError, Exports};

/// Quiet time after the last file event before the file is read: an editor's save is
/// several events (write a temporary file, rename it over, change modes).
pub const DEBOUNCE: Duration = Duration::from_millis(250);
/// Longest a stream of file events delays a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// Triggers waiting to be handled; more are dropped (a pending one reloads anyway).
const TRIGGER_QUEUE: usize = 16;

/// Why a reload was refused. The running config stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}; running config kept")]
    Invalid(#[from] ConfigError),
    #[error(
        "{field} cannot change without a restart; running config kept (only exports change at runtime)"
    )]
    Immutable { field: String },
    #[error("{0}; running config kept")]
    Exports(#[from] ExportError),
}

/// What a reload may change, from the running config to the file's: the exports' diff, or
/// the first field that cannot change at runtime. Pure.
pub fn plan(running: &Config, next: &Config) -> Result<ExportDiff, ReloadError> {
    // Compared as data, so a new config field is covered without a change here. A config
    // that cannot be rendered cannot be compared: refused rather than assumed equal.
    let fixed = |c: &Config| {
        let mut v = serde_norway::to_value(c).map_err(|e| ReloadError::Immutable {
            field: format!("config (cannot compare it with the running one: {e})"),
        })?;
        if let serde_norway::Value::Mapping(m) = &mut v {
            m.remove("exports");
        }
        Ok::<_, ReloadError>(v)
    };
    if let Some(field) = first_difference(&fixed(running)?, &fixed(next)?, "") {
        return Err(ReloadError::Immutable { field });
    }
    Ok(ExportDiff::between(&running.exports, &next.exports))
}

/// The path (`catalog.endpoints[1]`) of the first place two values differ.
fn first_difference(a: &serde_norway::Value, b: &serde_norway::Value, at: &str) -> Option<String> {
    use serde_norway::Value;
    let join = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match (a, b) {
        (Value::Mapping(x), Value::Mapping(y)) => {
            let mut keys: Vec<String> = x
                .keys()
                .chain(y.keys())
                .map(|k| k.as_str().map_or_else(|| format!("{k:?}"), String::from))
                .collect();
            keys.sort();
            keys.dedup();
            keys.into_iter().find_map(|k| {
                let (va, vb) = (x.get(k.as_str()), y.get(k.as_str()));
                match (va, vb) {
                    (Some(va), Some(vb)) => first_difference(va, vb, &join(&k)),
                    _ => Some(join(&k)),
                }
            })
        }
        (Value::Sequence(x), Value::Sequence(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(va, vb, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(if at.is_empty() {
            "config".into()
        } else {
            at.into()
        }),
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The file changed on disk.
    File,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::File => "file",
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file's exports differ and were applied.
    Applied,
    /// Nothing to apply: the same bytes as last time, or the same exports.
    Unchanged,
    /// The file was refused; the running config stays.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Refused => "refused",
        }
    }
}

/// `meshup_config_reloads_total{trigger="signal|file", result="applied|unchanged|refused"}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub trigger: &'static str,
    pub result: &'static str,
}

/// The reload metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub reloads: Family<ReloadLabels, Counter>,
}

impl Metrics {
    /// Registers `meshup_config_reloads_total`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.sub_registry_with_prefix("config").register(
            "reloads",
            "Config reloads, by what asked (signal, file) and how they ended (applied, unchanged, refused)",
            m.reloads.clone(),
        );
        m
    }
}

/// The config file as last loaded, for status and `meshup export list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Loaded {
    /// The file's path as given on the command line.
    pub path: String,
    /// SHA-256 of the bytes in force, hex.
    pub sha256: String,
    /// Unix seconds they were loaded (start-up or the last applied reload).
    pub loaded_at: i64,
    pub applied: u64,
    pub refused: u64,
    /// Why the last reload was refused, if the last one was.
    pub last_error: Option<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Owns the running config and applies reloads to the gateway's exports. One task.
pub struct Reloader {
    path: PathBuf,
    env: Box<dyn Env + Send + Sync>,
    running: Config,
    /// The bytes last read (applied, unchanged or refused): file events with the same
    /// bytes are ignored.
    last_seen: String,
    exports: Exports,
    metrics: Metrics,
    loaded: Arc<watch::Sender<Loaded>>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .field("last_seen", &self.last_seen)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// A reloader for the gateway started with `running`, read from `path` (`text`: the
    /// file's bytes then). It applies reloads to `exports`, counts them in `metrics` and
    /// says what is in force in `loaded`.
    pub fn new(
        path: PathBuf,
        env: Box<dyn Env + Send + Sync>,
        running: Config,
        text: &str,
        exports: Exports,
        metrics: Metrics,
        loaded: Arc<watch::Sender<Loaded>>,
    ) -> Self {
        let sha256 = sha256_hex(text.as_bytes());
        loaded.send_replace(Loaded {
            path: path.display().to_string(),
            sha256: sha256.clone(),
            loaded_at: unix_now(),
            ..Loaded::default()
        });
        Self {
            path,
            env,
            running,
            last_seen: sha256,
            exports,
            metrics,
            loaded,
        }
    }

    /// Follows what is loaded.
    pub fn loaded(&self) -> watch::Receiver<Loaded> {
        self.loaded.subscribe()
    }

    /// Reads the file and applies it: one reload.
    pub fn reload(&mut self, trigger: Trigger) -> Outcome {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(source) => {
                let e = ReloadError::Invalid(ConfigError::Read {
                    path: self.path.display().to_string(),
                    source,
                });
                return self.refused(trigger, &e);
            }
        };
        let sha256 = sha256_hex(text.as_bytes());
        let same_bytes = sha256 == self.last_seen;
        self.last_seen = sha256.clone();
        if same_bytes && trigger == Trigger::File {
            // An echo of a change already handled (or of the SIGHUP that came first).
            return self.count(trigger, Outcome::Unchanged);
        }
        let result = Config::load_text(&text, &self.path, self.env.as_ref())
            .map_err(ReloadError::from)
            .and_then(|next| {
                let diff = plan(&self.running, &next)?;
                if !diff.is_empty() {
                    let applied = self.exports.set_file(next.exports.clone())?;
                    debug_assert_eq!(applied, diff, "the file's exports are the running ones");
                }
                Ok((next, diff))
            });
        match result {
            Err(e) => self.refused(trigger, &e),
            Ok((next, diff)) => {
                self.running = next;
                let outcome = if diff.is_empty() {
                    tracing::info!(trigger = trigger.as_str(), config = %self.path.display(), sha256 = %sha256, "config reloaded: no export changed");
                    Outcome::Unchanged
                } else {
                    tracing::info!(
                        trigger = trigger.as_str(),
                        config = %self.path.display(),
                        sha256 = %sha256,
                        "config reloaded: exports {diff}"
                    );
                    Outcome::Applied
                };
                self.loaded.send_modify(|l| {
                    l.sha256 = sha256;
                    l.loaded_at = unix_now();
                    l.last_error = None;
                    if outcome == Outcome::Applied {
                        l.applied += 1;
                    }
                });
                self.count(trigger, outcome)
            }
        }
    }

    fn refused(&mut self, trigger: Trigger, e: &ReloadError) -> Outcome {
        tracing::error!(trigger = trigger.as_str(), config = %self.path.display(), "config reload refused: {e}");
        self.loaded.send_modify(|l| {
            l.refused += 1;
            l.last_error = Some(e.to_string());
        });
        self.count(trigger, Outcome::Refused)
    }

    fn count(&self, trigger: Trigger, outcome: Outcome) -> Outcome {
        self.metrics
            .reloads
            .get_or_create(&ReloadLabels {
                trigger: trigger.as_str(),
                result: outcome.as_str(),
            })
            .inc();
        outcome
    }

    /// Reloads on every trigger until `stop`: SIGHUP (from `signals`, one `()` each) and
    /// debounced changes of the file's directory. A watcher that cannot start is logged, and
    /// SIGHUP keeps working.
    pub async fn run(mut self, mut signals: mpsc::Receiver<()>, stop: CancellationToken) {
        let (file_tx, mut file_rx) = mpsc::channel(TRIGGER_QUEUE);
        let _watcher = match watch_dir(&self.path, file_tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(config = %self.path.display(), error = %e, "cannot watch the config file; reload with SIGHUP");
                None
            }
        };
        loop {
            let trigger = tokio::select! {
                _ = stop.cancelled() => return,
                s = signals.recv() => match s {
                    Some(()) => Trigger::Signal,
                    None => return,
                },
                Some(()) = file_rx.recv() => {
                    debounce(&mut file_rx).await;
                    Trigger::File
                }
            };
            self.reload(trigger);
        }
    }
}

/// Waits until no file event came for [`DEBOUNCE`] (at most [`MAX_DEBOUNCE`]).
async fn debounce(events: &mut mpsc::Receiver<()>) {
    let end = tokio::time::Instant::now() + MAX_DEBOUNCE;
    loop {
        let quiet = (tokio::time::Instant::now() + DEBOUNCE).min(end);
        tokio::select! {
            _ = tokio::time::sleep_until(quiet) => return,
            e = events.recv() => if e.is_none() { return },
        }
    }
}

/// Whether a file event in the config's directory may concern the config: the file itself
/// (written in place, or a temporary file renamed over it shows the target name), or a
/// Kubernetes ConfigMap volume's `..data` link being swapped.
fn concerns(config: &Path, event: &Path) -> bool {
    match (config.file_name(), event.file_name()) {
        (Some(c), Some(e)) => c == e || e.to_string_lossy().starts_with(".."),
        _ => false,
    }
}

/// Watches the directory of `path`; each event that may concern it sends `()` (dropped when
/// the queue is full: a reload is pending anyway).
fn watch_dir(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    use notify::{EventKind, RecursiveMode, Watcher};
    let config = path.to_owned();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if matches!(event.kind, EventKind::Access(_)) {
            return;
        }
        if event.paths.iter().any(|p| concerns(&config, p)) {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::exports::ExportSet;

    const BASE: &str = r#"
cluster: east
trust_domain: mesh.local
catalog:
  backend: embedded
vip_cidr: 127.77.0.0/16
tunnel:
  listen: 127.0.0.1:4433
  cert: certs/cert.pem
  key: certs/key.pem
  bundle: certs/bundle.pem
exports:
  - name: pay
    namespace: prod
    ports: [{name: http, port: 8080}]
    endpoints: ["127.0.0.1:18080"]
"#;

    fn config(text: &str) -> Config {
        let c = Config::parse(text).expect("parses");
        c.validate().expect("valid");
        c
    }

    #[test]
    fn plan_table() {
        let base = config(BASE);
        let add = BASE.to_owned()
            + "  - {name: cart, namespace: prod, ports: [{name: http, port: 80}], endpoints: [\"127.0.0.1:1\"]}\n";
        let cases: &[(&str, String, Result<&str, &str>)] = &[
            (
                "same file",
                BASE.into(),
                Ok("added [], removed [], changed []"),
            ),
            (
                "comments and order of keys do not matter",
                BASE.replace("cluster: east\n", "# hello\ncluster: east\n"),
                Ok("added [], removed [], changed []"),
            ),
            (
                "an export added",
                add,
                Ok("added [cart.prod], removed [], changed []"),
            ),
            (
                "an endpoint swapped",
                BASE.replace("127.0.0.1:18080", "127.0.0.1:18081"),
                Ok("added [], removed [], changed [pay.prod]"),
            ),
            (
                "every export removed",
                BASE[..BASE.find("exports:").expect("exports")].to_owned(),
                Ok("added [], removed [pay.prod], changed []"),
            ),
            (
                "a listen address",
                BASE.replace("127.0.0.1:4433", "127.0.0.1:4434"),
                Err("tunnel.listen"),
            ),
            (
                "the cluster",
                BASE.replace("cluster: east", "cluster: west"),
                Err("cluster"),
            ),
            (
                "a field that was defaulted before",
                BASE.replace("cluster: east\n", "cluster: east\nregion: eu\n"),
                Err("region"),
            ),
            (
                "the VIP range",
                BASE.replace("127.77.0.0/16", "127.78.0.0/16"),
                Err("vip_cidr"),
            ),
            (
                "the admin address",
                BASE.to_owned() + "admin: {http: 127.0.0.1:15999}\n",
                Err("admin.http"),
            ),
        ];
        for (what, text, want) in cases {
            let got = plan(&base, &config(text));
            match (want, got) {
                (Ok(d), Ok(diff)) => assert_eq!(&diff.to_string(), d, "{what}"),
                (Err(field), Err(ReloadError::Immutable { field: f })) => {
                    assert_eq!(&f, field, "{what}")
                }
                (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
            }
        }
        let err = plan(
            &base,
            &config(&BASE.replace("127.0.0.1:4433", "127.0.0.1:4434")),
        )
        .expect_err("refused");
        assert_eq!(
            err.to_string(),
            "tunnel.listen cannot change without a restart; running config kept (only exports change at runtime)"
        );
    }

    #[test]
    fn file_events_that_concern_the_config() {
        let config = Path::new("/etc/meshup/gateway.yaml");
        for (event, want) in [
            ("/etc/meshup/gateway.yaml", true),
            ("/etc/meshup/..data", true),
            ("/etc/meshup/..2026_12_01_10_00_00.123", true),
            ("/etc/meshup/gateway.log", false),
            ("/etc/meshup/.gateway.yaml.swp", false),
        ] {
            assert_eq!(concerns(config, Path::new(event)), want, "{event}");
        }
    }

    /// The reloader against a real file: applied, unchanged, refused (bad syntax, unknown
    /// field, immutable field), and a file event echoing a change already handled.
    #[test]
    fn reloads_apply_or_refuse_and_keep_the_running_config() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, BASE).expect("write");
        let running = config(BASE);
        let exports = Exports::new(
            running.cluster.clone(),
            ExportSet::new(running.exports.clone()),
        );
        let metrics = Metrics::default();
        let env: HashMap<&'static str, String> = HashMap::new();
        let mut r = Reloader::new(
            path.clone(),
            Box::new(env),
            running,
            BASE,
            exports.clone(),
            metrics.clone(),
            Arc::new(watch::Sender::new(Loaded::default())),
        );
        let loaded = r.loaded();
        let keys = |e: &Exports| {
            e.current()
                .all()
                .iter()
                .map(|e| e.key().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(r.reload(Trigger::File), Outcome::Unchanged, "same bytes");
        assert_eq!(
            r.reload(Trigger::Signal),
            Outcome::Unchanged,
            "SIGHUP, same file"
        );

        let added = BASE.to_owned()
            + "  - {name: cart, namespace: prod, ports: [{name: http, port: 80}], endpoints: [\"127.0.0.1:1\"]}\n";
        std::fs::write(&path, &added).expect("write");
        assert_eq!(r.reload(Trigger::Signal), Outcome::Applied);
        assert_eq!(keys(&exports), ["pay.prod", "cart.prod"]);
        assert_eq!(r.reload(Trigger::File), Outcome::Unchanged, "the echo");
        assert_eq!(loaded.borrow().sha256, sha256_hex(added.as_bytes()));

        let refusals = [
            (
                added.replace(
                    "ports: [{name: http, port: 80}]",
                    "ports: [{name: http, port: 80}",
                ),
                "line",
            ),
            (
                added.replace(
                    "endpoints: [\"127.0.0.1:1\"]",
                    "endpoint: [\"127.0.0.1:1\"]",
                ),
                "unknown field `endpoint`",
            ),
            (
                added.replace("port: 80}", "port: 0}"),
                "exports[1] (cart.prod)",
            ),
            (
                added.replace("127.77.0.0/16", "127.78.0.0/16"),
                "vip_cidr cannot change without a restart",
            ),
        ];
        for (text, why) in refusals {
            std::fs::write(&path, &text).expect("write");
            assert_eq!(r.reload(Trigger::File), Outcome::Refused, "{why}");
            let err = loaded.borrow().last_error.clone().unwrap_or_default();
            assert!(err.contains(why), "{why}: {err}");
            assert!(err.contains("running config kept"), "{err}");
            assert_eq!(keys(&exports), ["pay.prod", "cart.prod"], "kept: {why}");
        }
        std::fs::remove_file(&path).expect("rm");
        assert_eq!(r.reload(Trigger::Signal), Outcome::Refused, "file gone");
        assert_eq!(keys(&exports), ["pay.prod", "cart.prod"]);

        std::fs::write(&path, BASE).expect("write");
        assert_eq!(r.reload(Trigger::File), Outcome::Applied, "back");
        assert_eq!(keys(&exports), ["pay.prod"]);
        let l = loaded.borrow().clone();
        assert_eq!((l.applied, l.refused, l.last_error), (2, 5, None));
        let count = |t: &'static str, res: &'static str| {
            metrics
                .reloads
                .get_or_create(&ReloadLabels {
                    trigger: t,
                    result: res,
                })
                .get()
        };
        assert_eq!(count("signal", "applied"), 1);
        assert_eq!(count("file", "applied"), 1);
        assert_eq!(count("file", "refused"), 4);
        assert_eq!(count("signal", "refused"), 1);
        assert_eq!(count("file", "unchanged"), 2);
        assert_eq!(count("signal", "unchanged"), 1);
    }
}

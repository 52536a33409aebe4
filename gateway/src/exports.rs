//! The services this gateway exports, from two sources, and how they change at runtime.
//!
//! - **The config file** (`exports:`): replaced as a whole when the file is reloaded
//!   ([`crate::reload`]).
//! - **The admin API** (`RegisterExport` / `WithdrawExport`, `meshup export register|withdraw`),
//!   the way a controller or a VM agent registers services with a Consul agent. An
//!   API-registered export lives until it is withdrawn or the process stops: it is not
//!   written anywhere, so a restarted gateway serves the file's exports only and the agent
//!   registers again.
//!
//! A service is exported by one source at a time: registering a service the file exports is
//! refused (edit the file), and so is a reload that adds a service the API registered
//! (withdraw it first). Both sources are validated by the same rules
//! ([`ExportConfig::validate`]) and share the [`MAX_EXPORTS`] limit.
//!
//! The set is pure data ([`ExportSet`]: every change returns a new set or an error, and the
//! old one stays). [`Exports`] publishes it through a `watch` channel; the gateway's export
//! task turns each new set into probe targets, catalog records and the inbound proxy's
//! endpoints.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use meshup_admin_api::convert::Export;
use meshup_core::names::{ClusterName, ServiceKey};
use tokio::sync::watch;

use crate::config::{ConfigError, ExportConfig, MAX_EXPORTS};

/// Where an export comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The config file's `exports:`.
    File,
    /// Registered through the admin API.
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Api => "api",
        }
    }
}

/// Why a change to the exports was refused. The running set is kept.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    #[error(
        "{key} is exported by the config file; change or remove it there (and reload), not through the API"
    )]
    FromFile { key: ServiceKey },
    #[error(
        "{field}: {key} is registered through the admin API; withdraw it first (`meshup export withdraw {key}`) or leave it out of the file"
    )]
    FromApi { field: String, key: ServiceKey },
    #[error(
        "{key} is not registered through the admin API (`meshup export list` shows every export and its source)"
    )]
    NotRegistered { key: ServiceKey },
    #[error(
        "{count} exports (the file's and the API's together) would pass the limit of {MAX_EXPORTS} per gateway; withdraw some first"
    )]
    TooMany { count: usize },
}

/// What changed between two lists of exports, by service. Pure data, for logs and answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportDiff {
    pub added: Vec<ServiceKey>,
    pub removed: Vec<ServiceKey>,
    /// Same service, other ports, endpoints, callers or labels.
    pub changed: Vec<ServiceKey>,
}

impl ExportDiff {
    /// The difference from `old` to `new` (each list has a service at most once).
    pub fn between(old: &[ExportConfig], new: &[ExportConfig]) -> Self {
        let old: BTreeMap<ServiceKey, &ExportConfig> = old.iter().map(|e| (e.key(), e)).collect();
        let new: BTreeMap<ServiceKey, &ExportConfig> = new.iter().map(|e| (e.key(), e)).collect();
        let mut diff = Self::default();
        for (key, e) in &new {
            match old.get(key) {
                None => diff.added.push(key.clone()),
                Some(o) if o != e => diff.changed.push(key.clone()),
                Some(_) => {}
            }
        }
        diff.removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for ExportDiff {
    /// `added [a.ns, b.ns], removed [c.ns], changed []`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |keys: &[ServiceKey]| {
            keys.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(
            f,
            "added [{}], removed [{}], changed [{}]",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )
    }
}

/// What a registration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// A new export.
    Created,
    /// It replaced the API's earlier registration of the same service.
    Updated,
    /// The same export was registered already: nothing changed.
    Unchanged,
}

/// Every export of this gateway, by source. Immutable: changes return a new set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSet {
    file: Vec<ExportConfig>,
    api: BTreeMap<ServiceKey, ExportConfig>,
}

impl ExportSet {
    /// The file's exports (already validated with the rest of the file), none from the API.
    pub fn new(file: Vec<ExportConfig>) -> Self {
        Self {
            file,
            api: BTreeMap::new(),
        }
    }

    /// Every export: the file's in file order, then the API's by service.
    pub fn all(&self) -> Vec<ExportConfig> {
        self.file.iter().chain(self.api.values()).cloned().collect()
    }

    /// Every export with its source.
    pub fn with_sources(&self) -> Vec<(Source, &ExportConfig)> {
        self.file
            .iter()
            .map(|e| (Source::File, e))
            .chain(self.api.values().map(|e| (Source::Api, e)))
            .collect()
    }

    /// The file's exports.
    pub fn file(&self) -> &[ExportConfig] {
        &self.file
    }

    fn count(&self) -> usize {
        self.file.len() + self.api.len()
    }

    /// The set with the file's exports replaced by `file` (a reloaded, validated file).
    /// Refused if the file now exports a service the API registered, or if both together
    /// pass [`MAX_EXPORTS`].
    pub fn with_file(&self, file: Vec<ExportConfig>) -> Result<Self, ExportError> {
        for (i, e) in file.iter().enumerate() {
            let key = e.key();
            if self.api.contains_key(&key) {
                return Err(ExportError::FromApi {
                    field: format!("exports[{i}] ({key})"),
                    key,
                });
            }
        }
        let count = file.len() + self.api.len();
        if count > MAX_EXPORTS {
            return Err(ExportError::TooMany { count });
        }
        Ok(Self {
            file,
            api: self.api.clone(),
        })
    }

    /// The set with `export` registered (or its earlier registration replaced), validated as
    /// the file's exports are.
    pub fn register(
        &self,
        export: ExportConfig,
        cluster: &ClusterName,
    ) -> Result<(Self, Registered), ExportError> {
        let key = export.key();
        export.validate(&format!("export ({key})"), cluster)?;
        if self.file.iter().any(|e| e.key() == key) {
            return Err(ExportError::FromFile { key });
        }
        let outcome = match self.api.get(&key) {
            Some(e) if *e == export => return Ok((self.clone(), Registered::Unchanged)),
            Some(_) => Registered::Updated,
            None if self.count() >= MAX_EXPORTS => {
                return Err(ExportError::TooMany {
                    count: self.count() + 1,
                });
            }
            None => Registered::Created,
        };
        let mut next = self.clone();
        next.api.insert(key, export);
        Ok((next, outcome))
    }

    /// The set without the API's export of `key`.
    pub fn withdraw(&self, key: &ServiceKey) -> Result<Self, ExportError> {
        if !self.api.contains_key(key) {
            if self.file.iter().any(|e| &e.key() == key) {
                return Err(ExportError::FromFile { key: key.clone() });
            }
            return Err(ExportError::NotRegistered { key: key.clone() });
        }
        let mut next = self.clone();
        next.api.remove(key);
        Ok(next)
    }
}

/// The live export set of a running gateway: changes are applied one at a time (the watch
/// channel's lock is held only while a pure function runs, never across an await) and
/// published to the gateway's export task.
#[derive(Debug, Clone)]
pub struct Exports {
    cluster: ClusterName,
    tx: Arc<watch::Sender<Arc<ExportSet>>>,
}

impl Exports {
    pub fn new(cluster: ClusterName, set: ExportSet) -> Self {
        Self {
            cluster,
            tx: Arc::new(watch::Sender::new(Arc::new(set))),
        }
    }

    /// The set now.
    pub fn current(&self) -> Arc<ExportSet> {
        self.tx.borrow().clone()
    }

    /// Follows the set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ExportSet>> {
        self.tx.subscribe()
    }

    /// Applies `change` to the current set; publishes the new set when it differs. Returns
    /// what changed, or the refusal (the set is kept).
    fn apply<T>(
        &self,
        change: impl FnOnce(&ExportSet) -> Result<(ExportSet, T), ExportError>,
    ) -> Result<(ExportDiff, T), ExportError> {
        let mut out = None;
        self.tx.send_if_modified(|set| match change(set) {
            Ok((next, t)) => {
                let diff = ExportDiff::between(&set.all(), &next.all());
                let modified = !diff.is_empty();
                if modified {
                    *set = Arc::new(next);
                }
                out = Some(Ok((diff, t)));
                modified
            }
            Err(e) => {
                out = Some(Err(e));
                false
            }
        });
        out.expect("send_if_modified runs the closure exactly once")
    }

    /// Replaces the file's exports (a reload).
    pub fn set_file(&self, file: Vec<ExportConfig>) -> Result<ExportDiff, ExportError> {
        self.apply(|set| Ok((set.with_file(file)?, ())))
            .map(|(d, ())| d)
    }

    /// Registers an export through the API.
    pub fn register(&self, export: ExportConfig) -> Result<Registered, ExportError> {
        let cluster = self.cluster.clone();
        self.apply(|set| set.register(export, &cluster))
            .map(|(_, r)| r)
    }

    /// Withdraws an export registered through the API.
    pub fn withdraw(&self, key: &ServiceKey) -> Result<(), ExportError> {
        self.apply(|set| Ok((set.withdraw(key)?, ()))).map(|_| ())
    }
}

impl From<Export> for ExportConfig {
    fn from(e: Export) -> Self {
        Self {
            name: e.name,
            namespace: e.namespace,
            ports: e.ports,
            endpoints: e.endpoints,
            allowed_callers: e.allowed_callers,
            labels: e.labels,
        }
    }
}

impl From<&ExportConfig> for Export {
    fn from(e: &ExportConfig) -> Self {
        Self {
            name: e.name.clone(),
            namespace: e.namespace.clone(),
            ports: e.ports.clone(),
            endpoints: e.endpoints.clone(),
            allowed_callers: e.allowed_callers.clone(),
            labels: e.labels.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export(name: &str, endpoint: &str) -> ExportConfig {
        serde_norway::from_str(&format!(
            "{{name: {name}, namespace: prod, ports: [{{name: tcp, port: 80}}], endpoints: [\"{endpoint}\"]}}"
        ))
        .expect("valid export")
    }

    fn key(s: &str) -> ServiceKey {
        s.parse().expect("valid")
    }

    fn keys(v: &[&str]) -> Vec<ServiceKey> {
        v.iter().map(|s| key(s)).collect()
    }

    #[test]
    fn diff_table() {
        let a = export("a", "127.0.0.1:1");
        let a2 = export("a", "127.0.0.1:2");
        let b = export("b", "127.0.0.1:1");
        let c = export("c", "127.0.0.1:1");
        type Case = (Vec<ExportConfig>, Vec<ExportConfig>, ExportDiff);
        let cases: Vec<Case> = vec![
            (vec![], vec![], ExportDiff::default()),
            (vec![a.clone()], vec![a.clone()], ExportDiff::default()),
            (
                vec![a.clone(), b.clone()],
                vec![b.clone(), a.clone()],
                ExportDiff::default(),
            ),
            (
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                ExportDiff {
                    added: keys(&["b.prod"]),
                    ..Default::default()
                },
            ),
            (
                vec![a.clone(), b.clone()],
                vec![a2.clone(), c.clone()],
                ExportDiff {
                    added: keys(&["c.prod"]),
                    removed: keys(&["b.prod"]),
                    changed: keys(&["a.prod"]),
                },
            ),
        ];
        for (old, new, want) in cases {
            assert_eq!(ExportDiff::between(&old, &new), want, "{old:?} -> {new:?}");
        }
        let d = ExportDiff::between(&[a, b], &[a2, c]);
        assert_eq!(
            d.to_string(),
            "added [c.prod], removed [b.prod], changed [a.prod]"
        );
    }

    #[test]
    fn sources_do_not_overlap_and_refusals_keep_the_set() {
        let east = ClusterName::new("east").expect("valid");
        let set = ExportSet::new(vec![export("file", "127.0.0.1:1")]);

        // Register, re-register the same (no change), update.
        let (set, r) = set
            .register(export("api", "127.0.0.1:1"), &east)
            .expect("registered");
        assert_eq!(r, Registered::Created);
        let (same, r) = set
            .register(export("api", "127.0.0.1:1"), &east)
            .expect("again");
        assert_eq!((r, &same), (Registered::Unchanged, &set));
        let (set, r) = set
            .register(export("api", "127.0.0.1:2"), &east)
            .expect("updated");
        assert_eq!(r, Registered::Updated);
        let sources: Vec<(Source, String)> = set
            .with_sources()
            .into_iter()
            .map(|(s, e)| (s, e.key().to_string()))
            .collect();
        assert_eq!(
            sources,
            vec![
                (Source::File, "file.prod".into()),
                (Source::Api, "api.prod".into())
            ]
        );

        // The file's services are the file's; the API's are the API's.
        let err = set
            .register(export("file", "127.0.0.1:9"), &east)
            .expect_err("file export");
        assert!(
            err.to_string().contains("exported by the config file"),
            "{err}"
        );
        let err = set.withdraw(&key("file.prod")).expect_err("file export");
        assert!(matches!(err, ExportError::FromFile { .. }), "{err}");
        let err = set.withdraw(&key("nope.prod")).expect_err("unknown");
        assert!(matches!(err, ExportError::NotRegistered { .. }), "{err}");
        let err = set
            .with_file(vec![
                export("file", "127.0.0.1:1"),
                export("api", "127.0.0.1:1"),
            ])
            .expect_err("clash");
        assert_eq!(
            err.to_string().split(':').next(),
            Some("exports[1] (api.prod)"),
            "{err}"
        );

        // Invalid registrations are refused by the file's rules, naming the export.
        let mut bad = export("bad", "127.0.0.1:1");
        bad.endpoints = vec!["0.0.0.0:80".parse().expect("addr")];
        let err = set.register(bad, &east).expect_err("invalid");
        assert!(
            err.to_string()
                .starts_with("export (bad.prod): endpoint 0.0.0.0:80 is not an address"),
            "{err}"
        );

        // Withdraw: gone; the file's exports are untouched by a reload of the file.
        let set = set.withdraw(&key("api.prod")).expect("withdrawn");
        assert_eq!(set.all(), vec![export("file", "127.0.0.1:1")]);
        let set = set.with_file(vec![]).expect("reload");
        assert!(set.all().is_empty());
    }

    #[test]
    fn the_live_set_publishes_changes_only() {
        let exports = Exports::new(
            ClusterName::new("east").expect("valid"),
            ExportSet::new(vec![export("a", "127.0.0.1:1")]),
        );
        let mut rx = exports.subscribe();
        rx.borrow_and_update();
        let diff = exports
            .set_file(vec![export("a", "127.0.0.1:1")])
            .expect("same file");
        assert!(diff.is_empty());
        assert!(!rx.has_changed().expect("open"), "nothing published");
        let diff = exports
            .set_file(vec![export("b", "127.0.0.1:1")])
            .expect("new file");
        assert_eq!(
            diff.to_string(),
            "added [b.prod], removed [a.prod], changed []"
        );
        assert!(rx.has_changed().expect("open"));
        exports
            .withdraw(&key("b.prod"))
            .expect_err("a file export cannot be withdrawn");
        assert_eq!(exports.current().file().len(), 1, "refusal keeps the set");
    }
}

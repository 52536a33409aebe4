//! The `meshup` binary under test.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Sources the `meshup` binary is built from (the gateway and the crates it depends on): an
/// edit to any of them makes the binary stale.
const SOURCES: &[&str] = &[
    "core/src",
    "core/Cargo.toml",
    "federation/src",
    "federation/Cargo.toml",
    "dns/src",
    "dns/Cargo.toml",
    "policy/src",
    "policy/Cargo.toml",
    "gateway/src",
    "gateway/Cargo.toml",
    "policy/src",
    "policy/Cargo.toml",
    "admin-api/src",
    "admin-api/Cargo.toml",
    "admin-api/build.rs",
    "proto",
];

/// The `meshup` binary next to the running test executable (`target/<profile>/meshup`),
/// checked to be newer than every source it is built from, so a test never runs a stale
/// gateway after an edit (`cargo test -p meshup-tests` alone does not rebuild it; `.ci/test`
/// builds the workspace first). A missing or stale binary is a loud failure.
pub fn meshup_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .join("meshup");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| {
            panic!(
                "the meshup binary is missing at {} ({e}): run `cargo build --workspace` first (.ci/test does)",
                bin.display()
            )
        });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root");
    if let Some((newer, at)) = SOURCES
        .iter()
        .filter_map(|s| newest(&root.join(s)))
        .max_by_key(|(_, at)| *at)
        && at > built
    {
        panic!(
            "the meshup binary at {} is older than {} (modified {:?} after the build): run `cargo build --workspace` first",
            bin.display(),
            newer.display(),
            at.duration_since(built).unwrap_or_default()
        );
    }
    bin
}

/// The most recently modified file under `path` (itself, if a file), skipping build output.
fn newest(path: &Path) -> Option<(PathBuf, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((path.to_path_buf(), meta.modified().ok()?));
    }
    std::fs::read_dir(path)
        .ok()?
        .flatten()
        .filter(|e| e.file_name() != "target")
        .filter_map(|e| newest(&e.path()))
        .max_by_key(|(_, at)| *at)
}

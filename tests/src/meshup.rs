//! The `meshup` binary under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

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

/// Runs `meshup ARGS` as an operator would, with `env` on top of this process's environment
/// (less `MESHUP_ADMIN` and `MESHUP_WHO`, so only the test decides them); panics after 30 s.
/// Returns (exit code, stdout, stderr).
pub fn meshup(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut child = Command::new(meshup_bin())
        .args(args)
        .env("MESHUP_LOG", "warn")
        .env_remove("MESHUP_ADMIN")
        .env_remove("MESHUP_WHO")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshup");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("meshup {args:?} did not finish within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

//! The `meshup` binary under test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The `meshup` binary of the running test's profile (`target/<profile>/meshup`), built fresh:
/// the first call in a test process runs `cargo build -p meshup-gateway --bin meshup` for that
/// profile, which is a no-op when the binary is current and a rebuild after an edit, so
/// `cargo test -p meshup-tests` never tests a stale gateway. A failed build is a loud failure.
pub fn meshup_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build).clone()
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory sits in the target directory");
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .expect("a UTF-8 profile name");
    // cargo names the dev profile's directory `debug`.
    let profile = if profile == "debug" { "dev" } else { profile };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--locked",
            "-p",
            "meshup-gateway",
            "--bin",
            "meshup",
        ])
        .args(["--profile", profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir)
        .output()
        .expect("run cargo to build the meshup binary");
    assert!(
        out.status.success(),
        "building the meshup binary failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile_dir.join("meshup");
    assert!(
        bin.exists(),
        "cargo built meshup, but not at {}",
        bin.display()
    );
    bin
}

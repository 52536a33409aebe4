//! The `meshup` binary under test.

use std::path::{Path, PathBuf};

/// The `meshup` binary next to the running test executable (`target/<profile>/meshup`).
/// `cargo build --workspace` builds it (`.ci/test` does); a missing binary is a loud failure.
pub fn meshup_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps")
        .join("meshup");
    assert!(
        bin.exists(),
        "the meshup binary is missing at {}: run `cargo build --workspace` first (.ci/test does)",
        bin.display()
    );
    bin
}

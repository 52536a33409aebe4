//! The CI configuration keeps its promises: every test binary that starts a real etcd is in
//! the `real-etcd` test group of `.ci/nextest.toml`, so the isolation that group promises
//! covers the tests it was made for, including ones added later.

use std::path::Path;

/// `<crate>/tests/<name>.rs` files of the workspace.
fn integration_tests(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let crates = std::fs::read_dir(root).expect("read the workspace root");
    for krate in crates.flatten() {
        let Ok(files) = std::fs::read_dir(krate.path().join("tests")) else {
            continue;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_some_and(|e| e == "rs") {
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .expect("a UTF-8 file name")
                    .to_owned();
                let text = std::fs::read_to_string(&path).expect("read test source");
                out.push((name, text));
            }
        }
    }
    out
}

#[test]
fn every_test_binary_that_starts_etcd_is_in_the_real_etcd_group() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root");
    let config = std::fs::read_to_string(root.join(".ci/nextest.toml")).expect("nextest.toml");
    let filter = config
        .lines()
        .skip_while(|l| !l.starts_with("[[profile.default.overrides]]"))
        .find_map(|l| l.strip_prefix("filter = "))
        .expect("an override with a filter");
    assert!(
        config.contains("test-group = 'real-etcd'") && config.contains("real-etcd = { max-threads"),
        "the real-etcd group must be declared and used"
    );
    let mut starting_etcd = Vec::new();
    let mut missing = Vec::new();
    for (name, text) in integration_tests(root) {
        if name == "ci_config" {
            continue; // names the markers, starts nothing
        }
        if text.contains("EtcdServer::start")
            || text.contains("Fixture::etcd")
            // The failover federation (meshup_tests::failover) starts its own etcd.
            || text.contains("Federation::start")
            || text.contains("both_backends!")
        {
            starting_etcd.push(name.clone());
            if !filter.contains(&format!("binary({name})")) {
                missing.push(name);
            }
        }
    }
    assert!(
        starting_etcd.len() >= 8,
        "the scan must find the etcd tests (found {starting_etcd:?})"
    );
    assert!(
        missing.is_empty(),
        "test binaries that start etcd but are not in the real-etcd group of .ci/nextest.toml: {missing:?}"
    );
}

/// The fuzz crates live outside the workspace with lockfiles of their own, and `.ci/fuzz`
/// builds them `--locked`: a dependency added to a crate they use must be in their lockfiles
/// too, or CI's fuzz tier fails after every test passed. Caught here, in the suite, instead.
#[test]
fn the_fuzz_lockfiles_match_the_crates_they_build() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root");
    let mut checked = 0;
    for dir in std::fs::read_dir(root.join("fuzz"))
        .expect("read fuzz/")
        .flatten()
    {
        let manifest = dir.path().join("Cargo.toml");
        if !manifest.exists() {
            continue;
        }
        let out = std::process::Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--locked",
                "--offline",
                "--format-version",
                "1",
                "--manifest-path",
            ])
            .arg(&manifest)
            .output()
            .expect("run cargo metadata");
        assert!(
            out.status.success(),
            "{} is out of date (run `cargo fetch` in {}): {}",
            dir.path().join("Cargo.lock").display(),
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 2,
        "found {checked} fuzz crates, expected the dns and tunnel ones"
    );
}

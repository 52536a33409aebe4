//! The `meshup` command as a user runs it: the demo (the README's first command) and
//! `config check`.

use std::path::Path;

use meshup_tests::meshup_bin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs meshup with a hard timeout; returns (success, stdout, stderr).
fn run(args: &[&str], timeout: Duration) -> (bool, String, String) {
    let mut child = Command::new(meshup_bin())
        .args(args)
        .env("MESHUP_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn meshup");
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("meshup {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_federates_three_clusters_and_routes_across_them() {
    let (ok, out, err) = run(&["demo", "--check"], Duration::from_secs(90));
    assert!(ok, "demo --check failed:\n{out}\n{err}");
    // Every cluster printed with its status page, and the checks went where they should:
    // hello.demo served locally by east, pay.prod tunnelled to a remote cluster, ledger.prod
    // refused because only west may call it.
    for cluster in ["east", "west", "north"] {
        assert!(out.contains(cluster), "{cluster} missing:\n{out}");
    }
    assert!(
        out.contains("hello from hello.demo in cluster east"),
        "{out}"
    );
    let pay = out
        .lines()
        .find(|l| l.starts_with("hello from pay.prod in cluster"))
        .unwrap_or_else(|| panic!("no pay.prod answer:\n{out}"));
    assert!(
        pay.contains("cluster west") || pay.contains("cluster north"),
        "pay.prod must be served by a remote exporter: {pay}"
    );
    assert!(
        out.contains("check ledger.prod: refused as configured"),
        "{out}"
    );
}

#[test]
fn config_check_explains_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/west.yaml"),
    )
    .expect("example config");
    let cases = [
        ("region:", "regoin:", "unknown field `regoin`"),
        ("lease_ttl: 10s", "lease_ttl: soon", "lease_ttl"),
        (
            "vip_cidr: 127.77.2.0/24",
            "vip_cidr: 127.77.2.0/31",
            "vip_cidr",
        ),
        ("http: 127.0.0.1:15021", "http: 0.0.0.0:15021", "admin.http"),
    ];
    for (from, to, expect) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, good.replace(from, to)).expect("write");
        let (ok, out, err) = run(
            &["config", "check", path.to_str().expect("utf-8")],
            Duration::from_secs(20),
        );
        assert!(!ok, "{to}: must be rejected\n{out}");
        assert!(
            err.contains(expect),
            "{to}: error must mention {expect}: {err}"
        );
    }
    // The example itself is valid, but its certificates do not exist until issued.
    let path = dir.path().join("west.yaml");
    std::fs::write(&path, &good).expect("write");
    let (ok, out, err) = run(
        &["config", "check", path.to_str().expect("utf-8")],
        Duration::from_secs(20),
    );
    assert!(!ok);
    assert!(out.contains("is valid"), "{out}");
    assert!(err.contains("certificate"), "{err}");
}

//! The `meshup` command as a user runs it: the demo (the README's first command) and
//! `config check`.

use std::path::Path;

use meshup_tests::meshup_bin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs meshup with a hard timeout; returns (success, stdout, stderr).
fn run(args: &[&str], timeout: Duration) -> (bool, String, String) {
    run_with_env(args, &[], timeout)
}

fn run_with_env(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (bool, String, String) {
    let mut child = Command::new(meshup_bin())
        .args(args)
        .env("MESHUP_LOG", "warn")
        .envs(env.iter().copied())
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
    // Each cluster has its row in the table: name, status page, DNS and QUIC addresses.
    for cluster in ["east", "west", "north"] {
        let row = out
            .lines()
            .find(|l| l.starts_with(&format!("{cluster} ")))
            .unwrap_or_else(|| panic!("no table row for {cluster}:\n{out}"));
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "{row}");
        assert!(fields[1].starts_with("http://127.0.0.1:"), "{row}");
        for addr in &fields[2..] {
            addr.parse::<std::net::SocketAddr>()
                .unwrap_or_else(|e| panic!("{addr} in {row}: {e}"));
        }
    }
    // The checks went where they should: hello.demo served locally by east, pay.prod
    // tunnelled to both remote exporters by its 80/20 policy, ledger.prod refused by east from
    // the catalog's export rules (the demo itself checks the reset, east's counter and that
    // north saw no stream, and fails otherwise).
    assert!(out.contains("check hello.demo: served by east\n"), "{out}");
    let split = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("check pay.prod: 50 new connections, policy west 80 / north 20: ")
        })
        .unwrap_or_else(|| panic!("no pay.prod check line:\n{out}"));
    let counts: Vec<u32> = split
        .split(", ")
        .filter_map(|part| part.split_once(' ').and_then(|(_, n)| n.parse().ok()))
        .collect();
    assert!(
        matches!(counts.as_slice(), [west, north] if west + north == 50 && west > north && *north > 0),
        "pay.prod's split must follow its policy: {split}"
    );
    assert!(
        out.contains(
            "check ledger.prod: refused as configured (north allows only west: east never tried it"
        ),
        "{out}"
    );
}

/// A valid west config with certificates issued by `meshup certs`, in `dir`.
fn valid_config(dir: &Path) -> String {
    let ca = dir.join("ca");
    let west = dir.join("west");
    let path = |p: &Path| p.to_str().expect("utf-8 temp path").to_owned();
    let (ok, out, err) = run(
        &[
            "certs",
            "init",
            "--trust-domain",
            "example.mesh",
            "--out",
            &path(&ca),
        ],
        Duration::from_secs(20),
    );
    assert!(ok, "certs init: {out}{err}");
    let (ok, out, err) = run(
        &[
            "certs",
            "issue",
            "--ca",
            &path(&ca),
            "--cluster",
            "west",
            "--out",
            &path(&west),
        ],
        Duration::from_secs(20),
    );
    assert!(ok, "certs issue: {out}{err}");
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/west.yaml"),
    )
    .expect("example config");
    assert!(
        example.contains("examples/certs/west/"),
        "the example's certificate paths moved"
    );
    example.replace("examples/certs/west/", &format!("{}/", path(&west)))
}

#[test]
fn config_check_accepts_the_example_and_explains_what_is_wrong() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = valid_config(dir.path());
    let path = dir.path().join("west.yaml");
    let path_str = path.to_str().expect("utf-8");

    // The example with real certificates passes, and every default is printed.
    std::fs::write(&path, &good).expect("write");
    let (ok, out, err) = run(&["config", "check", path_str], Duration::from_secs(20));
    assert!(ok, "the example must be valid:\n{out}\n{err}");
    assert!(out.contains("is valid"), "{out}");
    assert!(
        out.contains("# certificates load and match cluster west"),
        "{out}"
    );
    for default in [
        "idle_timeout: 3s",
        "max_streams: 4096",
        "drain_deadline: 20s",
        "ttl: 5s",
    ] {
        assert!(
            out.contains(default),
            "default {default} not printed:\n{out}"
        );
    }

    // Each mistake is rejected with a message that names it.
    let cases = [
        ("region:", "regoin:", "unknown field `regoin`"),
        ("lease_ttl: 10s", "lease_ttl: soon", "lease_ttl"),
        (
            "vip_cidr: 127.77.2.0/24",
            "vip_cidr: 127.77.2.0/31",
            "vip_cidr",
        ),
        ("http: 127.0.0.1:15021", "http: 0.0.0.0:15021", "admin.http"),
        ("cert: ", "cert: /nonexistent", "certificate"),
    ];
    for (from, to, expect) in cases {
        assert!(good.contains(from), "the example no longer has {from}");
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, good.replacen(from, to, 1)).expect("write");
        let (ok, out, err) = run(
            &["config", "check", bad.to_str().expect("utf-8")],
            Duration::from_secs(20),
        );
        assert!(!ok, "{to}: must be rejected\n{out}");
        assert!(
            err.contains(expect),
            "{to}: error must mention {expect}: {err}"
        );
    }
}

#[test]
fn config_check_applies_environment_overrides_and_redacts_secrets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = valid_config(dir.path());
    // etcd credentials: a user and a password file; the URL carries a password too.
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "pw-in-file-1234").expect("write");
    let with_auth = good.replace(
        "  prefix: /meshup\n",
        &format!(
            "  prefix: /meshup\n  username: west\n  password_file: {}\n",
            password_file.display()
        ),
    );
    assert_ne!(with_auth, good);
    let path = dir.path().join("west.yaml");
    std::fs::write(&path, &with_auth).expect("write");
    let (ok, out, err) = run_with_env(
        &["config", "check", path.to_str().expect("utf-8")],
        &[
            (
                "MESHUP_CATALOG_ENDPOINTS",
                "http://127.0.0.1:23790, http://127.0.0.1:23791",
            ),
            ("MESHUP_GATEWAY_ID", "west-7"),
        ],
        Duration::from_secs(20),
    );
    assert!(ok, "{out}\n{err}");
    assert!(
        out.contains("- http://127.0.0.1:23790\n") && out.contains("- http://127.0.0.1:23791\n"),
        "MESHUP_CATALOG_ENDPOINTS must replace the file's endpoints:\n{out}"
    );
    assert!(
        !out.contains("127.0.0.1:2379\n"),
        "the file's endpoint must be gone:\n{out}"
    );
    assert!(out.contains("gateway_id: west-7"), "{out}");
    assert!(out.contains("username: west"), "{out}");
    assert!(
        !out.contains("pw-in-file-1234"),
        "the password leaked:\n{out}"
    );

    // A bad override is an error naming the variable, not a silent default.
    let (ok, _, err) = run_with_env(
        &["config", "check", path.to_str().expect("utf-8")],
        &[("MESHUP_GATEWAY_ID", "West_7")],
        Duration::from_secs(20),
    );
    assert!(!ok);
    assert!(err.contains("MESHUP_GATEWAY_ID"), "{err}");
}

/// `meshup policy` and `meshup route` take the same verbs with the same meaning
/// (docs/admin-api.md): the same subcommands, `--revision` on `apply` and `set`, and `set`
/// without `--revision` refused before any file is read or gateway asked (exit 2, not 3:
/// nothing listens at the admin address given).
#[test]
fn policy_and_route_take_the_same_verbs() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let verbs = |family: &str| {
        let (ok, out, err) = run(&[family, "--help"], Duration::from_secs(20));
        assert!(ok, "{err}");
        out.lines()
            .skip_while(|l| !l.starts_with("Commands:"))
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        verbs("policy"),
        ["get", "validate", "apply", "set", "delete", "help"]
    );
    assert_eq!(verbs("policy"), verbs("route"));
    for family in ["policy", "route"] {
        for verb in ["apply", "set"] {
            let (ok, out, err) = run(&[family, verb, "--help"], Duration::from_secs(20));
            assert!(ok, "{err}");
            assert!(
                out.contains("--revision <REVISION>"),
                "{family} {verb}: {out}"
            );
        }
        let (code, _, err) = meshup_tests::meshup(
            &[family, "set", "-f", "no-such-file.yaml", "--admin", &closed],
            &[],
        );
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!(
                "`meshup {family} set` writes only at a revision you read: pass --revision N"
            )) && err.contains(&format!("use `meshup {family} apply -f FILE`")),
            "{err}"
        );
    }
}

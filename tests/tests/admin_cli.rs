//! The `meshup` client commands as an operator runs them: the real binary against real
//! `meshup gateway` processes on a real etcd, tables for people, `-o json|yaml` for scripts,
//! and the exit codes scripts rely on (2 bad input, 3 unreachable, 4 not found, 5 conflict).
//! And `grpcurl` (a required tool: `.ci/packages`) against the same API through reflection,
//! with the standard health check.
//!
//! The `meshup` binary must be built (`cargo build --workspace`; `.ci/test` does). A missing
//! binary, etcd or grpcurl is a loud failure, never a skip.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, grpcurl, path_str};
use meshup_tests::{EtcdServer, free_port, meshup, meshup_bin};

const PORT: u16 = 7200;

/// A backend that accepts connections (the gateway's probes) and closes them.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind backend");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || for _ in l.incoming() {});
    addr
}

/// A gateway process of this suite: `cluster`'s VIPs in 127.83.N.0/24, pay.prod exported
/// to `backend` when given, the gRPC admin API on loopback when asked.
fn gateway(
    cluster: &str,
    certs: &Certs,
    etcd: &EtcdServer,
    prefix: &str,
    grpc: bool,
    backend: Option<SocketAddr>,
) -> GatewayProcess {
    let n = match cluster {
        "east" => 1,
        "west" => 2,
        _ => 3,
    };
    let vip_cidr = format!("127.83.{n}.0/24");
    GatewayProcess::start(GatewaySpec {
        grpc,
        exports: backend
            .map(|b| ("pay", "prod", PORT, b))
            .into_iter()
            .collect(),
        ..GatewaySpec::new(cluster, &vip_cidr, etcd, certs, prefix)
    })
}

/// Polls `check` until it holds (30 s at most).
fn until(what: &str, gateway: &GatewayProcess, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(
            Instant::now() < deadline,
            "not within 30s: {what}; east's log:\n{}",
            gateway.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

const GOOD: &str = "\
# pay: mostly west
service: pay.prod
levels:
  - clusters:
      - {cluster: west, weight: 80}
      - {cluster: north, weight: 20}
";

#[test]
fn client_commands_against_gateway_processes() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east", "west", "north"]);
    let prefix = "/cli";
    let east = gateway("east", &certs, &etcd, prefix, true, None);
    let _west = gateway("west", &certs, &etcd, prefix, false, Some(backend()));
    let _north = gateway("north", &certs, &etcd, prefix, false, Some(backend()));
    let admin = east.grpc_addr().expect("east's admin API").to_string();
    let a = ["--admin", admin.as_str()];
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&a);
        meshup(&all, &[])
    };

    until("east sees pay.prod served by west and north", &east, || {
        let (code, out, _) = run(&["services", "-o", "json"]);
        code == 0
            && json(&out)["services"][0]["clusters"]
                .as_array()
                .is_some_and(|c| c.iter().filter(|c| c["healthy"] == 1).count() == 2)
    });

    // status: this gateway, the catalog, every cluster; MESHUP_ADMIN works like --admin.
    let (code, out, err) = meshup(&["status"], &[("MESHUP_ADMIN", &admin)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("gateway  east/east-0  meshup "), "{out}");
    assert!(out.contains("state    ready"), "{out}");
    assert!(out.contains("catalog  etcd revision "), "{out}");
    for row in ["east     local", "north    ", "west     "] {
        assert!(
            out.lines().any(|l| l.starts_with(row)),
            "no row {row:?}:\n{out}"
        );
    }
    let (code, out, _) = run(&["status", "-o", "json"]);
    assert_eq!(code, 0);
    let status = json(&out);
    assert_eq!(status["gateway"]["cluster"], "east");
    assert_eq!(status["catalog"]["synced"], true);
    assert_eq!(status["clusters"].as_array().map(Vec::len), Some(3));
    assert_eq!(status["clusters"][0]["link"], "LINK_STATE_LOCAL");

    // clusters: one line each, with what it exports; JSON names the answering cluster.
    let (code, out, err) = run(&["clusters"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("CLUSTER  REGION") && out.contains("EXPORTS  STREAMS  LOSS"),
        "{out}"
    );
    let cells = |name: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row {name}:\n{out}"));
        line.split("  ")
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
            .collect()
    };
    assert_eq!(
        cells("east")[2..5],
        ["local", "-", "1 (this cluster)"],
        "{out}"
    );
    assert_eq!(cells("east")[5], "0", "east exports nothing:\n{out}");
    for remote in ["west", "north"] {
        assert_eq!(cells(remote)[5], "1", "{remote} exports pay.prod:\n{out}");
    }
    let (code, out, _) = run(&["clusters", "-o", "json"]);
    assert_eq!(code, 0);
    let clusters = json(&out);
    assert_eq!(clusters["cluster"], "east");
    assert_eq!(clusters["clusters"][2]["name"], "west");
    assert_eq!(clusters["clusters"][2]["exports"], 1);

    // services: a table, and YAML for scripts.
    let (code, out, err) = run(&["services"]);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("pay.prod "))
        .unwrap_or_else(|| panic!("no pay.prod row:\n{out}"));
    assert!(
        row.contains("north 1/1, west 1/1") && row.contains("7200/tcp"),
        "{row}"
    );
    let (code, out, _) = run(&["services", "pay.prod", "-o", "yaml"]);
    assert_eq!(code, 0);
    assert!(out.contains("service: pay.prod"), "{out}");
    let (code, _, err) = run(&["services", "nope.prod"]);
    assert_eq!(code, 4, "unknown service: {err}");
    assert!(err.contains("no service nope.prod"), "{err}");

    // resolve: the decision and every cluster's verdict.
    let (code, out, err) = run(&["resolve", "pay.prod.svc.clusterset.local"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("pay.prod:7200 via VIP 127.83.1."), "{out}");
    assert!(out.contains("default policy, up to 3 attempts"), "{out}");
    assert!(out.contains("order: "), "{out}");
    for c in ["north ", "west "] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(c) && l.contains("candidate")),
            "{c}:\n{out}"
        );
    }
    let (code, _, err) = run(&["resolve", "nope.prod.svc.clusterset.local"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("no service nope.prod") && err.contains("meshup services"),
        "{err}"
    );
    let (code, _, err) = run(&["resolve", "pay.prod", "--port", "9"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("port: 9 is not a port of pay.prod"), "{err}");

    // policy: a malformed file names its line and field, and writes nothing.
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        GOOD.replace(
            "{cluster: north, weight: 20}",
            "{cluster: north, wieght: 20}",
        ),
    )
    .expect("write");
    let bad = bad.to_str().expect("utf-8");
    for cmd in [
        &["policy", "validate", "-f", bad][..],
        &["policy", "apply", "-f", bad][..],
    ] {
        let (code, _, err) = run(cmd);
        assert_eq!(code, 2, "{cmd:?}: {err}");
        assert!(
            err.contains(
                "bad.yaml: line 6, field levels[0].clusters[1].wieght: unknown field `wieght`"
            ),
            "{err}"
        );
    }
    let (code, out, _) = run(&["policy", "get", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["found"], false, "the bad file wrote nothing");

    let good = dir.path().join("pay.yaml");
    std::fs::write(&good, GOOD).expect("write");
    let good = good.to_str().expect("utf-8");
    let (code, out, err) = run(&["policy", "validate", "-f", good]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "ok: the policy for pay.prod is valid\n");
    let (code, out, err) = run(&["policy", "apply", "-f", good]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("policy for pay.prod written at revision ") && out.ends_with("(created)\n"),
        "{out}"
    );
    let (code, out, _) = run(&["policy", "get", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    let first = json(&out)["revision"].as_i64().expect("revision");
    assert_eq!(
        json(&out)["policy"]["levels"][0]["clusters"][0]["weight"],
        80
    );
    let (code, out, _) = run(&["policy", "apply", "-f", good]);
    assert_eq!(
        (code, out),
        (
            0,
            format!("policy for pay.prod unchanged (revision {first})\n")
        )
    );
    // The table form is a file to edit: it parses back as a policy file.
    let (code, out, _) = run(&["policy", "get", "pay.prod"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("# policy for pay.prod at revision {first}")),
        "{out}"
    );
    let edited = dir.path().join("edited.yaml");
    std::fs::write(&edited, out.replace("weight: 80", "weight: 70")).expect("write");
    let edited = edited.to_str().expect("utf-8");
    let (code, out, err) = run(&[
        "policy",
        "set",
        "-f",
        edited,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let second: i64 = out
        .strip_prefix("policy for pay.prod written at revision ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // A second operator who read the first revision loses, and is told what to do.
    let (code, _, err) = run(&[
        "policy",
        "set",
        "-f",
        good,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(code, 5, "a stale write must be a conflict: {err}");
    assert!(
        err.contains(&format!("changed since revision {first}"))
            && err.contains(&format!("current revision: {second}")),
        "{err}"
    );
    // The same words as `route`: apply takes --revision too, and set needs it.
    let (code, _, err) = run(&[
        "policy",
        "apply",
        "-f",
        good,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(
        code, 5,
        "a stale apply --revision must be a conflict: {err}"
    );
    assert!(
        err.contains(&format!("current revision: {second}")),
        "{err}"
    );
    let (code, _, err) = run(&["policy", "set", "-f", good]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`meshup policy set` writes only at a revision you read: pass --revision N")
            && err.contains("use `meshup policy apply -f FILE`"),
        "{err}"
    );
    let (code, out, _) = run(&["policy", "get", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        (
            json(&out)["revision"].as_i64(),
            json(&out)["policy"]["levels"][0]["clusters"][0]["weight"].clone()
        ),
        (Some(second), 70.into()),
        "neither wrote"
    );
    until("resolve follows the stored policy", &east, || {
        let (code, out, _) = run(&["resolve", "pay.prod", "-o", "json"]);
        code == 0 && json(&out)["policy_source"] == "catalog"
    });

    // drill: no expiry is refused before anything is sent; then start, list, stop.
    let (code, _, err) = run(&[
        "drill",
        "start",
        "--kind",
        "fail",
        "--cluster",
        "west",
        "--why",
        "game day",
        "--who",
        "ana",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--for <DURATION>"), "{err}");
    let (code, _, err) = run(&[
        "drill",
        "start",
        "--kind",
        "fail",
        "--cluster",
        "wset",
        "--why",
        "game day",
        "--who",
        "ana",
        "--for",
        "10m",
    ]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("cluster wset is not in the catalog"), "{err}");

    // Watch the events while the drill starts and stops.
    let events = Events::watch(&admin);

    let (code, out, err) = meshup(
        &[
            "drill",
            "start",
            "--kind",
            "fail",
            "--cluster",
            "west",
            "--why",
            "game day",
            "--for",
            "10m",
            "--id",
            "gd-1",
            "--admin",
            &admin,
        ],
        &[("MESHUP_WHO", "ana")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("started drill gd-1: fail west (every service) until "),
        "{out}"
    );
    let (code, out, _) = run(&["drill", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let list = json(&out);
    assert_eq!(list["drills"][0]["id"], "gd-1");
    assert_eq!(list["drills"][0]["who"], "ana");
    assert_eq!(list["drills"][0]["kind"], "DRILL_KIND_FAIL");
    until("resolve shows west failed by the drill", &east, || {
        let (_, out, _) = run(&["resolve", "pay.prod"]);
        out.lines().any(|l| {
            l.starts_with("west ")
                && l.contains("out: failed_by_drill")
                && l.contains("ana: game day")
        })
    });
    let (code, out, _) = run(&["drill", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .any(|l| l.starts_with("gd-1 ") && l.contains("game day")),
        "{out}"
    );
    let (code, out, err) = run(&["drill", "stop", "gd-1", "--who", "bo"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("stopped drill gd-1") && out.contains("as bo"),
        "{out}"
    );
    let (code, _, err) = run(&["drill", "stop", "gd-1", "--who", "bo"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("already ended"), "{err}");
    let (code, out, _) = run(&["drill", "list", "-o", "json"]);
    assert_eq!(code, 0);
    let list = json(&out);
    assert_eq!(list["drills"].as_array().map(Vec::len), Some(0));
    assert_eq!(list["audit"][0]["ended_by"], "bo");
    assert_eq!(list["audit"][0]["how"], "stopped");

    let seen = events.until("EVENT_KIND_DRILL_ENDED", "gd-1");
    assert!(
        seen.iter().any(|e| e["kind"] == "EVENT_KIND_DRILL_STARTED"),
        "{seen:?}"
    );
    drop(events);

    // policy delete: the default applies again; deleting again is not found.
    let (code, out, err) = run(&["policy", "delete", "pay.prod"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("the default applies again"), "{out}");
    let (code, _, err) = run(&["policy", "delete", "pay.prod"]);
    assert_eq!(code, 4, "{err}");

    // events --count ends by itself.
    let (code, out, err) = run(&["events", "--existing", "--count", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(
        out.lines().nth(1).is_some_and(|l| l.contains("(existing)")),
        "{out}"
    );

    // Nothing listening: exit 3, saying where to point.
    let nowhere = format!("127.0.0.1:{}", free_port().expect("port"));
    let (code, _, err) = meshup(&["status", "--admin", &nowhere], &[]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("cannot reach the admin API at {nowhere}"))
            && err.contains("admin.grpc"),
        "{err}"
    );
}

/// `meshup events -o json` running against a gateway, its lines read as they come.
struct Events {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Events {
    /// Starts the watch and waits for its first event, the sync.
    fn watch(admin: &str) -> Self {
        let mut child = Command::new(meshup_bin())
            .args(["events", "-o", "json", "--admin", admin])
            .env("MESHUP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn meshup events");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let events = Self { child, lines };
        let sync = events
            .lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a sync event");
        assert_eq!(json(&sync)["kind"], "EVENT_KIND_SYNC", "{sync}");
        events
    }

    /// Reads events until one of `kind` that names `about` (its service or drill) comes
    /// (15 s at most); returns every event read, that one last.
    fn until(&self, kind: &str, about: &str) -> Vec<serde_json::Value> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {kind} event about {about}; got {seen:?}"));
            let e = json(&line);
            let found = e["kind"] == kind && (e["service"] == about || e["drill"] == about);
            seen.push(e);
            if found {
                return seen;
            }
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const ROUTES: &str = "\
# pay: a canary by header, the API split
service: pay.prod
rules:
  - name: canary
    match:
      - headers: [{name: x-canary, exact: \"1\"}]
    destinations: [{cluster: north}]
  - name: api
    match: [{path: {prefix: /api}}]
    destinations:
      - {cluster: west, weight: 90}
      - {cluster: north, weight: 10}
    timeout: 2s
";

/// `meshup route` against a gateway process on etcd: a file's mistakes named (exit 2), the
/// rules written under `<prefix>/v1/routes/<ns>/<name>` with their writer, read back as a
/// file that applies again, a stale revision refused (exit 5), an overwrite, a delete.
#[test]
fn route_rules_through_the_cli() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east", "west", "north"]);
    let prefix = "/routes-cli";
    let east = gateway("east", &certs, &etcd, prefix, true, None);
    let _west = gateway("west", &certs, &etcd, prefix, false, Some(backend()));
    let _north = gateway("north", &certs, &etcd, prefix, false, Some(backend()));
    let admin = east.grpc_addr().expect("east's admin API").to_string();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--admin", admin.as_str()]);
        meshup(&all, &[])
    };
    let key = format!("{prefix}/v1/routes/prod/pay");
    let stored = || {
        etcd.etcdctl(&["get", &key, "--print-value-only"])
            .expect("etcdctl get")
    };
    until("east sees pay.prod served by west and north", &east, || {
        let (code, out, _) = run(&["services", "pay.prod", "-o", "json"]);
        code == 0
            && json(&out)["services"][0]["clusters"]
                .as_array()
                .is_some_and(|c| c.len() == 2)
    });

    // Nothing stored: a file with no rules to start from; an unknown service is not found.
    let (code, out, err) = run(&["route", "get", "pay.prod"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(
            "# no route rules stored for pay.prod: every request follows the failover policy"
        ) && out.contains("service: pay.prod\n")
            && out.contains("rules: []"),
        "{out}"
    );
    let (code, _, err) = run(&["route", "get", "nope.prod"]);
    assert_eq!(code, 4, "{err}");

    // Mistakes: the line and the field, exit 2, nothing written.
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let misspelt = write("bad.yaml", &ROUTES.replace("weight: 90", "wieght: 90"));
    let unusable = write("worse.yaml", &ROUTES.replace("prefix: /api", "prefix: api"));
    for (file, want) in [
        (
            &misspelt,
            "bad.yaml: line 11, field rules[1].destinations[0].wieght: unknown field `wieght`",
        ),
        (
            &unusable,
            "worse.yaml: line 9, field rules[1].match[0].path: \"api\" does not start with '/'",
        ),
    ] {
        for cmd in [
            &["validate"][..],
            &["apply"],
            &["apply", "--revision", "0"],
            &["set", "--revision", "0"],
        ] {
            let mut args = vec!["route"];
            args.extend_from_slice(cmd);
            args.extend_from_slice(&["-f", file]);
            let (code, _, err) = run(&args);
            assert_eq!(code, 2, "{cmd:?} {file}: {err}");
            assert!(err.contains(want), "{cmd:?}: {err}");
        }
    }
    let (code, out, _) = run(&["route", "get", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)["found"], false, "the bad files wrote nothing");
    assert_eq!(stored(), "", "nothing under {key}");

    // Valid, with the warnings of this catalog: pay.prod's only port is tcp, and a typo.
    let good = write("pay.yaml", ROUTES);
    let (code, out, err) = run(&["route", "validate", "-f", &good]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("ok: the route rules for pay.prod are valid\nwarning: pay.prod has no http or grpc port (7200/tcp)"),
        "{out}"
    );
    let typo = write(
        "typo.yaml",
        &ROUTES.replace("{cluster: north}", "{cluster: nort}"),
    );
    let (code, out, err) = run(&["route", "validate", "-f", &typo]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "warning: cluster nort (rules canary) is not in the catalog (known: east, north, west)"
        ),
        "{out}"
    );

    // Create (revision 0), read back with the writer, apply again: unchanged. Operators see
    // it: an event naming the service, the writer and the revision, and `services` names
    // the rules.
    let events = Events::watch(&admin);
    let (code, out, err) = run(&["route", "apply", "-f", &good, "--revision", "0"]);
    assert_eq!(code, 0, "{err}");
    let first: i64 = written_at(&out, "(created)");
    let seen = events.until("EVENT_KIND_ROUTES_SET", "pay.prod");
    let set = seen.last().expect("the event");
    assert_eq!(
        (
            set["text"].as_str(),
            set["who"].as_str(),
            set["revision"].as_i64()
        ),
        (
            Some("route rules for pay.prod set by local: 2 rules (canary, api)"),
            Some("local"),
            Some(first)
        ),
        "{set}"
    );
    let (code, out, _) = run(&["services", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        json(&out)["services"][0]["route_rules"],
        serde_json::json!(["canary", "api"]),
        "{out}"
    );
    let (code, out, _) = run(&["services", "pay.prod"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.ends_with("default, routes: canary api")),
        "{out}"
    );
    let record = json(&stored());
    assert_eq!(
        record["rules"][1]["destinations"][0]["weight"], 90,
        "{record}"
    );
    assert_eq!(
        record["updated_by"], "local",
        "the loopback caller: {record}"
    );
    let (code, out, _) = run(&["route", "get", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    let got = json(&out);
    assert_eq!(
        (got["found"].clone(), got["revision"].as_i64()),
        (true.into(), Some(first))
    );
    assert_eq!(got["routes"]["rules"][0]["name"], "canary");
    let (code, out, _) = run(&["route", "apply", "-f", &good]);
    assert_eq!(
        (code, out),
        (
            0,
            format!("route rules for pay.prod unchanged (revision {first})\n")
        )
    );
    let (code, _, err) = run(&["route", "apply", "-f", &good, "--revision", "0"]);
    assert_eq!(code, 5, "creating again is a conflict: {err}");
    assert!(
        err.contains("already exist") && err.contains(&format!("current revision: {first}")),
        "{err}"
    );

    // The table form is a file to edit: it applies at the revision it names.
    let (code, out, _) = run(&["route", "get", "pay.prod"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(&format!("# route rules for pay.prod at revision {first}")),
        "{out}"
    );
    let edited = write("edited.yaml", &out.replace("weight: 90", "weight: 80"));
    let (code, out, err) = run(&[
        "route",
        "apply",
        "-f",
        &edited,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let second = written_at(&out, &format!("(was {first})"));
    assert_eq!(json(&stored())["rules"][1]["destinations"][0]["weight"], 80);

    // A second operator who read the first revision loses, and is told what to do.
    let (code, _, err) = run(&[
        "route",
        "apply",
        "-f",
        &good,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(code, 5, "a stale write must be a conflict: {err}");
    assert!(
        err.contains(&format!("changed since revision {first}"))
            && err.contains(&format!("current revision: {second}"))
            && err.contains("meshup route get"),
        "{err}"
    );
    assert_eq!(
        json(&stored())["rules"][1]["destinations"][0]["weight"],
        80,
        "kept"
    );

    // set needs --revision (it never writes over what its writer has not seen): without
    // it, exit 2 naming what to run instead, and nothing written.
    let (code, _, err) = run(&["route", "set", "-f", &good]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("`meshup route set` writes only at a revision you read: pass --revision N")
            && err.contains("use `meshup route apply -f FILE`"),
        "{err}"
    );
    assert_eq!(
        json(&stored())["rules"][1]["destinations"][0]["weight"],
        80,
        "set without --revision wrote nothing"
    );
    // set --revision N is apply --revision N: a stale one loses, the current one writes.
    let (code, _, err) = run(&[
        "route",
        "set",
        "-f",
        &good,
        "--revision",
        &first.to_string(),
    ]);
    assert_eq!(code, 5, "a stale set must be a conflict: {err}");
    let (code, out, err) = run(&[
        "route",
        "set",
        "-f",
        &edited,
        "--revision",
        &second.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    let after_set = written_at(&out, &format!("(was {second})"));
    // apply without --revision writes over what it reads; the same rules again change nothing.
    let (code, out, err) = run(&["route", "apply", "-f", &good]);
    assert_eq!(code, 0, "{err}");
    let third = written_at(&out, &format!("(was {after_set})"));
    assert_eq!(json(&stored())["rules"][1]["destinations"][0]["weight"], 90);
    let (code, out, _) = run(&["route", "apply", "-f", &good]);
    assert_eq!(
        (code, out.lines().next()),
        (
            0,
            Some(format!("route rules for pay.prod unchanged (revision {third})").as_str())
        ),
        "{out}"
    );

    // delete: a stale revision is a conflict; then gone; again: not found.
    let (code, _, err) = run(&[
        "route",
        "delete",
        "pay.prod",
        "--revision",
        &second.to_string(),
    ]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains(&format!("they are at revision {third} now")),
        "{err}"
    );
    let (code, out, err) = run(&[
        "route",
        "delete",
        "pay.prod",
        "--revision",
        &third.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("every request follows the failover policy again"),
        "{out}"
    );
    assert_eq!(stored(), "", "deleted from {key}");
    let deleted_at: i64 = out
        .split("(catalog revision ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"));
    let seen = events.until("EVENT_KIND_ROUTES_DELETED", "pay.prod");
    assert!(
        seen.iter().any(|e| e["kind"] == "EVENT_KIND_ROUTES_SET"
            && e["text"] == "route rules for pay.prod changed by local: 2 rules (canary, api)"
            && e["revision"] == third),
        "the writes in between are events too: {seen:?}"
    );
    let deleted = seen.last().expect("the event");
    assert_eq!(
        (
            deleted["text"].as_str(),
            deleted["who"].as_str(),
            deleted["revision"].as_i64()
        ),
        (
            Some("route rules for pay.prod deleted: every request follows the failover policy"),
            Some(""),
            Some(deleted_at)
        ),
        "{deleted}"
    );
    let (code, out, _) = run(&["services", "pay.prod", "-o", "json"]);
    assert_eq!(code, 0);
    assert_eq!(
        json(&out)["services"][0]["route_rules"],
        serde_json::json!([]),
        "{out}"
    );
    let (code, _, err) = run(&["route", "delete", "pay.prod"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no route rules stored for pay.prod"), "{err}");
}

/// The revision in "… written at revision N (tail)", the first line (warnings follow).
fn written_at(out: &str, tail: &str) -> i64 {
    out.lines()
        .next()
        .and_then(|l| l.strip_prefix("route rules for pay.prod written at revision "))
        .and_then(|r| r.strip_suffix(&format!(" {tail}")))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("not written with {tail:?}: {out}"))
}

#[test]
fn grpcurl_lists_the_services_and_sees_serving() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east"]);
    let east = gateway("east", &certs, &etcd, "/grpcurl", true, Some(backend()));
    let addr = east.grpc_addr().expect("east's admin API").to_string();
    until("grpcurl: the gateway is SERVING", &east, || {
        let (ok, out, _) = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]);
        ok && out.contains("\"status\": \"SERVING\"")
    });
    let (ok, out, err) = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(ok, "{err}");
    let listed: Vec<&str> = out.lines().collect();
    for want in [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "meshup.admin.v1.AdminService",
    ] {
        assert!(listed.contains(&want), "{want} not listed:\n{out}");
    }
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "meshup.admin.v1.AdminService",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("rpc Resolve")
            && out.contains("stream .meshup.admin.v1.Event")
            && out.contains("rpc ApplyRoutes"),
        "{out}"
    );
    until("grpcurl: ListServices shows pay.prod", &east, || {
        let (ok, out, _) = grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service": "pay.prod"}"#,
            &addr,
            "meshup.admin.v1.AdminService/ListServices",
        ]);
        ok && out.contains("\"service\": \"pay.prod\"")
    });
    // A bad call's status and message come through as they are.
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "pay.prod", "policy_json": "{\"schema\":1,\"retry\":{\"max_attempts\":0}}"}"#,
        &addr,
        "meshup.admin.v1.AdminService/ValidatePolicy",
    ]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("policy_json.retry.max_attempts"),
        "{err}"
    );
    // Route rules the same way: the field inside the rules is named.
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "pay.prod", "routes_json": "{\"schema\":1,\"rules\":[{\"retry\":{\"attempts\":0}}]}"}"#,
        &addr,
        "meshup.admin.v1.AdminService/ValidateRoutes",
    ]);
    assert!(!ok);
    assert!(
        err.contains("InvalidArgument") && err.contains("routes_json.rules[0].retry.attempts"),
        "{err}"
    );
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "pay.prod", "routes_json": "{\"schema\":1,\"rules\":[{\"name\":\"all\"}]}"}"#,
        &addr,
        "meshup.admin.v1.AdminService/SetRoutes",
    ]);
    assert!(ok && out.contains("\"changed\": true"), "{out}{err}");
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "pay.prod"}"#,
        &addr,
        "meshup.admin.v1.AdminService/GetRoutes",
    ]);
    assert!(
        ok && out.contains("\"found\": true") && out.contains("\\\"name\\\":\\\"all\\\""),
        "{out}{err}"
    );
}

/// Remote admin as an operator meets it: a gateway process with `admin.grpc_remote`, the real
/// `meshup` binary with an operator certificate from `meshup certs issue --operator`, and
/// grpcurl as a third-party client. Only an operator certificate of the federation gets in;
/// everything else is refused and writes nothing.
#[test]
fn remote_admin_takes_operator_certificates_only() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east", "west"]);
    let ana = certs.operator("ana");
    let mut east = GatewayProcess::start(GatewaySpec {
        grpc: true,
        grpc_remote: true,
        ..GatewaySpec::new("east", "127.85.1.0/24", &etcd, &certs, "/remote")
    });
    let mut west = GatewayProcess::start(GatewaySpec::new(
        "west",
        "127.85.2.0/24",
        &etcd,
        &certs,
        "/remote",
    ));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        east.wait_ready().await;
        west.wait_ready().await;
    });
    let remote_addr = east.grpc_remote_addr().expect("remote admin").to_string();
    let remote = format!("https://{remote_addr}");
    let local = east.grpc_addr().expect("local admin").to_string();
    let ana_cert = ana.join("cert.pem");
    until("east sees west in the catalog", &east, || {
        let (code, out, _) = meshup(&["clusters", "-o", "json", "--admin", &local], &[]);
        code == 0
            && json(&out)["clusters"]
                .as_array()
                .is_some_and(|c| c.len() == 2)
    });
    let drill = |id: &str, extra: &[&str]| {
        let mut args = vec![
            "drill",
            "start",
            "--kind",
            "drain",
            "--cluster",
            "west",
            "--why",
            "rehearsal",
            "--for",
            "10m",
            "--id",
            id,
        ];
        args.extend_from_slice(extra);
        meshup(&args, &[])
    };

    // An operator certificate: the drill is written, and its author is the certificate's.
    let (code, out, err) = drill(
        "remote-ana",
        &["--admin", &remote, "--cert", path_str(&ana_cert)],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", east.log_text());
    let (code, out, err) = meshup(
        &[
            "drill",
            "list",
            "-o",
            "json",
            "--admin",
            &remote,
            "--cert",
            path_str(&ana_cert),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let list = json(&out);
    let drills = list["drills"].as_array().expect("drills");
    assert_eq!(drills.len(), 1, "{out}");
    assert_eq!(drills[0]["id"], "remote-ana");
    assert_eq!(
        drills[0]["who"], "ana",
        "the author comes from the certificate: {out}"
    );

    // No certificate: the CLI says what to do, exit 2.
    let (code, _, err) = drill("remote-none", &["--admin", &remote, "--who", "ana"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("meshup certs issue --operator"), "{err}");
    // A gateway's certificate is not an operator's.
    let west_cert = certs.of("west").join("cert.pem");
    let (code, _, err) = drill(
        "remote-gateway",
        &["--admin", &remote, "--cert", path_str(&west_cert)],
    );
    assert_ne!(code, 0, "a gateway SVID must not act as an operator");
    assert!(err.contains("not an operator"), "{err}");
    // Plaintext to the mTLS port: nothing answers in plaintext (the server's TLS alert comes
    // back as an HTTP/2 error or a closed connection, depending on timing); either way the
    // error points at https://.
    let (code, _, err) = drill("remote-plain", &["--admin", &remote_addr, "--who", "ana"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("https://"), "{err}");

    // The server refuses by itself, whatever the client: grpcurl without a client certificate
    // fails the handshake; with ana's it lists the services.
    let (ok, _, err) = grpcurl(&["-insecure", "-max-time", "5", &remote_addr, "list"]);
    assert!(!ok, "no client certificate must be refused: {err}");
    let ana_key = ana.join("key.pem");
    let (ok, out, err) = grpcurl(&[
        "-insecure",
        "-cert",
        path_str(&ana_cert),
        "-key",
        path_str(&ana_key),
        &remote_addr,
        "list",
    ]);
    assert!(
        ok && out.contains("meshup.admin.v1.AdminService"),
        "{out}{err}"
    );

    // Nothing the refused calls tried was written.
    let (code, out, err) = meshup(&["drill", "list", "-o", "json", "--admin", &local], &[]);
    assert_eq!(code, 0, "{err}");
    let ids: Vec<String> = json(&out)["drills"]
        .as_array()
        .expect("drills")
        .iter()
        .map(|d| d["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(ids, ["remote-ana"], "{out}");
}

//! The deployment files keep their promises (docs/deployment.md): the Kubernetes manifests
//! pass the 1.30 schemas (strict: unknown fields fail) and yamllint, match the gateway's
//! design (host network, surge upgrades, probes on the node's loopback, a grace period above
//! the drain deadline, the config mounted as a directory, the hand-over socket on a hostPath)
//! and carry a config that `meshup config check` accepts; the etcd roles script gives each
//! cluster write access to its own keys only; the systemd unit passes `systemd-analyze
//! verify`, and a real gateway tells systemd `READY=1` only once `/ready` is 200.

use std::collections::BTreeSet;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, path_str};
use meshup_tests::{EtcdServer, assert_eventually, meshup, meshup_bin};
use serde::Deserialize;
use serde_norway::Value;

/// The Kubernetes version whose schemas the manifests must pass.
const KUBERNETES: &str = "1.30.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// Every manifest: `deploy/kubernetes/**/*.yaml`.
fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir)
            .expect("read deploy/kubernetes")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root().join("deploy/kubernetes"), &mut out);
    out.sort();
    assert!(out.len() >= 4, "manifests found: {out:?}");
    out
}

/// The YAML documents of a manifest file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read manifest");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// The one object of `kind` named `name` in the manifests.
fn object(kind: &str, name: &str) -> Value {
    let found: Vec<Value> = manifests()
        .iter()
        .flat_map(|p| documents(p))
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(found.len(), 1, "want exactly one {kind}/{name}");
    found.into_iter().next().expect("one")
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: want a string, got {v:?}"))
}

/// The gateway's config file, as the ConfigMap carries it.
fn gateway_config_text() -> String {
    str_of(
        &object("ConfigMap", "meshup-gateway")["data"]["gateway.yaml"],
        "ConfigMap meshup-gateway data.gateway.yaml",
    )
    .to_owned()
}

fn gateway_config() -> Value {
    serde_norway::from_str(&gateway_config_text()).expect("the ConfigMap's gateway.yaml is YAML")
}

/// `kubernetes-validate` and its result.
fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let out = Command::new("kubernetes-validate")
        .args(["-k", KUBERNETES, "--strict"])
        .args(files)
        .output()
        .expect("run kubernetes-validate (`bash .ci/setup test` installs it)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn manifests_pass_the_kubernetes_schemas_strictly() {
    let files = manifests();
    let (ok, out) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate -k {KUBERNETES} --strict:\n{out}");
    // One line per object, each passed: nothing skipped as an unknown kind.
    let objects: usize = files.iter().map(|f| documents(f).len()).sum();
    let passed = out
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    assert_eq!(passed, objects, "every object is checked:\n{out}");

    // Strict means strict: a misspelt field fails, naming the field.
    let dir = tempfile::tempdir().expect("temp dir");
    let daemonset = root().join("deploy/kubernetes/gateway-daemonset.yaml");
    let text = std::fs::read_to_string(&daemonset).expect("read the DaemonSet");
    assert!(text.contains("      hostNetwork: true\n"));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        text.replace("      hostNetwork: true\n", "      hostNetwrok: true\n"),
    )
    .expect("write");
    let (ok, out) = kubernetes_validate(&[bad]);
    assert!(!ok && out.contains("'hostNetwrok' was unexpected"), "{out}");
}

#[test]
fn manifests_pass_yamllint() {
    let out = Command::new("yamllint")
        .args(["--strict", "--format", "parsable", "-c"])
        .arg(root().join("deploy/.yamllint"))
        .arg(root().join("deploy/kubernetes"))
        .output()
        .expect("run yamllint (`bash .ci/setup test` installs it)");
    assert!(
        out.status.success(),
        "yamllint --strict:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The DaemonSet follows the design of docs/deployment.md, and agrees with the config it
/// mounts.
#[test]
fn the_daemonset_matches_the_design_and_its_config() {
    let ds = object("DaemonSet", "meshup-gateway");
    let config = gateway_config();
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");

    // A surge upgrade: the new pod beside the old one, which goes only once the new is ready.
    let strategy = &ds["spec"]["updateStrategy"];
    assert_eq!(strategy["type"], "RollingUpdate");
    assert_eq!(strategy["rollingUpdate"]["maxSurge"], 1);
    assert_eq!(strategy["rollingUpdate"]["maxUnavailable"], 0);

    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1);
    let gateway = &containers[0];
    // With host networking a declared port is a hostPort, which would keep the surge pod
    // from ever being scheduled beside the old one.
    assert!(
        gateway["ports"].is_null(),
        "no ports may be declared: {:?}",
        gateway["ports"]
    );

    // The grace period covers the drain.
    let drain = humantime::parse_duration(str_of(
        &config["tunnel"]["drain_deadline"],
        "tunnel.drain_deadline",
    ))
    .expect("a duration");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        Duration::from_secs(grace) >= drain + Duration::from_secs(10),
        "grace {grace}s must exceed the drain deadline {drain:?} with room for the close"
    );

    // Probes dial the node's loopback, where the admin server listens (host network).
    let admin: std::net::SocketAddr = str_of(&config["admin"]["http"], "admin.http")
        .parse()
        .expect("admin.http");
    assert!(admin.ip().is_loopback());
    for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/live")] {
        let get = &gateway[probe]["httpGet"];
        assert_eq!(get["host"], admin.ip().to_string(), "{probe}");
        assert_eq!(get["port"], u64::from(admin.port()), "{probe}");
        assert_eq!(get["path"], path, "{probe}");
    }

    // Capabilities: exactly the two the gateway needs, nothing else, no escalation.
    let security = &gateway["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(
        security["capabilities"]["drop"],
        serde_norway::from_str::<Value>("[ALL]").expect("yaml")
    );
    let added: BTreeSet<&str> = security["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| str_of(c, "capability"))
        .collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "NET_BIND_SERVICE"]));

    // Every file the config names lies in a mount, of the right volume kind.
    let mounts = gateway["volumeMounts"].as_sequence().expect("volumeMounts");
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    let volume_of = |file: &str| -> &Value {
        let mount = mounts
            .iter()
            .find(|m| {
                let dir = str_of(&m["mountPath"], "mountPath");
                file.strip_prefix(dir)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .unwrap_or_else(|| panic!("{file} is in no volume mount"));
        assert!(
            mount["subPath"].is_null(),
            "{file}: a subPath mount is never updated in place"
        );
        volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("no volume {:?}", mount["name"]))
    };
    let args: Vec<&str> = gateway["args"]
        .as_sequence()
        .expect("args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    let config_file = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("--config FILE");
    let config_volume = volume_of(config_file);
    assert_eq!(config_volume["configMap"]["name"], "meshup-gateway");
    assert_eq!(
        Path::new(config_file).file_name().and_then(|n| n.to_str()),
        Some("gateway.yaml"),
        "the ConfigMap's key"
    );
    for key in ["cert", "key", "bundle"] {
        let file = str_of(&config["tunnel"][key], key);
        assert_eq!(
            volume_of(file)["secret"]["secretName"],
            "meshup-gateway-tls",
            "tunnel.{key}"
        );
    }
    let catalog = &config["catalog"];
    for file in [
        &catalog["tls"]["ca"],
        &catalog["tls"]["cert"],
        &catalog["tls"]["key"],
        &catalog["password_file"],
    ] {
        let file = str_of(file, "catalog file");
        assert_eq!(
            volume_of(file)["secret"]["secretName"],
            "meshup-etcd-client",
            "{file}"
        );
    }
    // The hand-over socket is on the node, shared by the old and the new pod.
    let socket = str_of(&config["handover"]["socket"], "handover.socket");
    assert!(
        volume_of(socket)["hostPath"]["path"].is_string(),
        "{socket} must be on a hostPath"
    );

    // Per-node values come from the environment the gateway reads.
    let env = gateway["env"].as_sequence().expect("env");
    let var = |name: &str| -> &Value {
        env.iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
    };
    assert_eq!(
        var("MESHUP_GATEWAY_ID")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        var("HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    let listen: std::net::SocketAddr = str_of(&config["tunnel"]["listen"], "tunnel.listen")
        .parse()
        .expect("tunnel.listen");
    assert_eq!(
        var("MESHUP_TUNNEL_ADVERTISE")["value"],
        format!("$(HOST_IP):{}", listen.port())
    );
}

/// The CoreDNS example forwards `clusterset.local` to the gateway's node-local DNS address,
/// which the datapath puts on the node.
#[test]
fn coredns_forwards_clusterset_local_to_the_node_local_dns() {
    let config = gateway_config();
    let dns: std::net::SocketAddr = str_of(&config["dns"]["listen"], "dns.listen")
        .parse()
        .expect("dns.listen");
    assert_eq!(dns.port(), 53, "CoreDNS forwards to port 53");
    let addresses: Vec<&str> = config["datapath"]["addresses"]
        .as_sequence()
        .expect("datapath.addresses")
        .iter()
        .map(|a| str_of(a, "address"))
        .collect();
    assert!(
        addresses.contains(&format!("{}/32", dns.ip()).as_str()),
        "dns.listen {dns} must be one of datapath.addresses {addresses:?}"
    );
    let corefile = object("ConfigMap", "coredns")["data"]["Corefile"].clone();
    let corefile = str_of(&corefile, "Corefile");
    let block = corefile
        .split("clusterset.local:53 {")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .expect("a clusterset.local:53 server block");
    assert!(
        block.contains(&format!("forward . {}", dns.ip())),
        "{block}"
    );
}

/// The ConfigMap's config is one the gateway accepts, with the environment the DaemonSet
/// gives it. Needs the `datapath` and `handover` sections in the gateway's config.
#[test]
fn the_configmap_config_passes_meshup_config_check() {
    let text = gateway_config_text();
    let config = gateway_config();
    let trust_domain = str_of(&config["trust_domain"], "trust_domain");
    let cluster = str_of(&config["cluster"], "cluster");
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = dir.path().join("ca");
    let certs = dir.path().join("tls");
    for args in [
        vec![
            "certs",
            "init",
            "--trust-domain",
            trust_domain,
            "--out",
            path_str(&ca),
        ],
        vec![
            "certs",
            "issue",
            "--ca",
            path_str(&ca),
            "--cluster",
            cluster,
            "--out",
            path_str(&certs),
        ],
    ] {
        let (code, _, err) = meshup(&args, &[]);
        assert_eq!(code, 0, "meshup {args:?}: {err}");
    }
    // The certificates where the Secret would be mounted.
    let tls_dir = Path::new(str_of(&config["tunnel"]["cert"], "tunnel.cert"))
        .parent()
        .expect("a directory")
        .to_str()
        .expect("utf-8");
    let file = dir.path().join("gateway.yaml");
    std::fs::write(&file, text.replace(tls_dir, path_str(&certs))).expect("write config");
    let (code, out, err) = meshup(
        &["config", "check", path_str(&file)],
        &[
            ("MESHUP_GATEWAY_ID", "meshup-gateway-x7k2p"),
            ("MESHUP_TUNNEL_ADVERTISE", "10.0.3.7:15443"),
        ],
    );
    assert_eq!(code, 0, "meshup config check:\n{out}{err}");
    assert!(out.contains("is valid"), "{out}");
    assert!(out.contains("certificates load"), "{out}");
    assert!(
        out.contains("10.0.3.7:15443"),
        "the advertised address: {out}"
    );
    assert!(
        out.contains("meshup-gateway-x7k2p"),
        "the gateway id: {out}"
    );
}

/// `etcd/roles.sh` on a real etcd: each cluster's user writes its own keys only, reads the
/// whole prefix, and a second run changes nothing.
#[test]
fn the_etcd_roles_let_a_cluster_write_only_its_own_keys() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let passwords = dir.path().join("passwords");
    let script = root().join("deploy/kubernetes/etcd/roles.sh");
    let run = |extra_env: &[(&str, String)], args: &[&str]| {
        let out = Command::new("bash")
            .arg(&script)
            .args(["--prefix", "/meshup", "--passwords", path_str(&passwords)])
            .args(args)
            .env("ETCDCTL_ENDPOINTS", etcd.endpoint())
            .envs(extra_env.iter().map(|(k, v)| (*k, v)))
            .output()
            .expect("run roles.sh");
        assert!(
            out.status.success(),
            "roles.sh {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[], &["--enable-auth", "east", "west"]);
    let password = |user: &str| {
        std::fs::read_to_string(passwords.join(user)).expect("a password file per user")
    };
    let east = format!("--user=meshup-east:{}", password("meshup-east"));
    for part in ["clusters", "vips", "vip-claims"] {
        let key = format!("/meshup/v1/{part}/east/x");
        etcd.etcdctl(&[&east, "put", &key, "v"])
            .unwrap_or_else(|e| panic!("east writes {key}: {e:#}"));
        let other = format!("/meshup/v1/{part}/west/x");
        let err = etcd
            .etcdctl(&[&east, "put", &other, "v"])
            .expect_err("east must not write west's keys");
        assert!(
            format!("{err:#}").contains("permission denied"),
            "{other}: {err:#}"
        );
    }
    let read = etcd
        .etcdctl(&[&east, "get", "--prefix", "--keys-only", "/meshup/"])
        .expect("east reads the whole prefix");
    assert!(read.contains("/meshup/v1/vips/east/x"), "{read}");
    // Authentication is on: no user, no access.
    assert!(etcd.etcdctl(&["get", "/meshup/v1/vips/east/x"]).is_err());

    // Idempotent: a second run (as root now) keeps the users and their passwords.
    let before = password("meshup-east");
    let root_user = format!("root:{}", password("root"));
    run(&[("ETCDCTL_USER", root_user)], &["east", "west"]);
    assert_eq!(password("meshup-east"), before);
    etcd.etcdctl(&[&east, "put", "/meshup/v1/clusters/east/y", "v"])
        .expect("east still logs in with its password");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(root().join("deploy/systemd/meshup-gateway.service"))
        .expect("read the unit");
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=meshup",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_NET_ADMIN",
        "RuntimeDirectory=meshup",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    // verify wants the ExecStart binary at its path: the one under test.
    let exec = "ExecStart=/usr/local/bin/meshup ";
    assert!(unit.contains(exec));
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = dir.path().join("meshup-gateway.service");
    std::fs::write(
        &copy,
        unit.replace(exec, &format!("ExecStart={} ", meshup_bin().display())),
    )
    .expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown keys are warnings with exit status 0: any output fails too.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// The next notification on the socket, waiting up to `timeout`.
fn next_notification(socket: &UnixDatagram, timeout: Duration) -> String {
    socket.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within {timeout:?}: {e}"));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A real gateway under a stand-in for systemd: READY=1 comes when `/ready` is 200 and not
/// before (the first catalog sync is held back by a paused etcd), RELOADING=1 and READY=1
/// around a SIGHUP reload, STOPPING=1 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_only_once_the_gateway_is_ready() {
    let etcd = EtcdServer::start();
    let certs = Certs::new(&["east"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");

    // A hung etcd: the gateway binds and serves /ready (503) but cannot sync.
    etcd.pause();
    let mut east = GatewayProcess::start(GatewaySpec {
        env: vec![("NOTIFY_SOCKET", path_str(&socket_path).to_owned())],
        ..GatewaySpec::new("east", "127.79.13.0/24", &etcd, &certs, "/notify")
    });
    assert_eventually(
        "/ready answers 503 waiting for the catalog sync",
        Duration::from_secs(20),
        || async {
            matches!(east.admin_get("/ready"), Ok((503, body)) if body.contains("catalog sync"))
        },
    )
    .await;
    socket.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "nothing may be sent before ready, got {:?}",
            other.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        ),
    }
    socket.set_nonblocking(false).expect("blocking");

    etcd.resume();
    let ready = next_notification(&socket, Duration::from_secs(30));
    let (code, body) = east.admin_get("/ready").expect("GET /ready");
    assert_eq!(
        (code, ready.lines().next()),
        (200, Some("READY=1")),
        "READY=1 when /ready is 200: {ready:?} / {body}"
    );

    east.signal("-HUP");
    let reloading = next_notification(&socket, Duration::from_secs(10));
    assert!(
        reloading.starts_with("RELOADING=1\n") && reloading.contains("MONOTONIC_USEC="),
        "{reloading:?}"
    );
    let reloaded = next_notification(&socket, Duration::from_secs(10));
    assert!(reloaded.starts_with("READY=1"), "{reloaded:?}");

    east.signal("-TERM");
    let stopping = next_notification(&socket, Duration::from_secs(10));
    assert!(stopping.starts_with("STOPPING=1"), "{stopping:?}");
    assert_eq!(east.wait_exit(Duration::from_secs(20)).await, Some(0));
}

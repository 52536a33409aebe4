//! Exports change without a restart, with real `meshup gateway` processes on a real etcd:
//! west's config file is edited (and SIGHUP sent), exports are registered and withdrawn
//! through the admin API with the real CLI, and east — another cluster — sees each change in
//! its DNS (real `dig` queries) and routes real TCP connections through it.
//!
//! The `meshup` binary must be built (`cargo build --workspace`; `.ci/test` does). A missing
//! binary, `etcd` or `dig` is a loud failure, never a skip.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec, dig, export_entry, grpcurl};
use meshup_tests::{EtcdServer, assert_eventually, eventually_ok, meshup};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// A backend that greets each connection with its tag and a newline, then echoes.
async fn tagged_backend(tag: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                if c.write_all(format!("{tag}\n").as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Connects to `addr` and reads the backend's tag; returns it with the open connection.
async fn tag_via(addr: SocketAddr) -> anyhow::Result<(String, BufReader<TcpStream>)> {
    let c = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let mut c = BufReader::new(c);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_line(&mut line))
        .await
        .context("no tag within 5s")??;
    if line.is_empty() {
        bail!("closed before the tag");
    }
    Ok((line.trim().to_owned(), c))
}

/// Echo round trip on an open connection.
async fn echo(c: &mut BufReader<TcpStream>, text: &str) -> anyhow::Result<()> {
    c.get_mut().write_all(text.as_bytes()).await?;
    let mut got = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut got))
        .await
        .context("no echo within 5s")??;
    anyhow::ensure!(
        got == text.as_bytes(),
        "echo {:?}",
        String::from_utf8_lossy(&got)
    );
    Ok(())
}

fn name(service: &str) -> String {
    let (svc, ns) = service.split_once('.').expect("name.ns");
    format!("{svc}.{ns}.svc.clusterset.local")
}

/// Waits until `dns` answers `service`'s clusterset name with an address.
async fn wait_in_dns(dns: SocketAddr, service: &str) {
    let n = name(service);
    eventually_ok(&format!("{n} in DNS"), WAIT, || {
        let n = n.clone();
        async move {
            let ips = tokio::task::spawn_blocking(move || dig(dns, &n)).await??;
            if ips.is_empty() {
                bail!("no address yet");
            }
            Ok::<_, anyhow::Error>(ips)
        }
    })
    .await;
}

/// Waits until `dns` no longer answers `service`'s clusterset name.
async fn wait_gone_from_dns(dns: SocketAddr, service: &str) {
    let n = name(service);
    eventually_ok(&format!("{n} gone from DNS"), WAIT, || {
        let n = n.clone();
        async move {
            let ips = tokio::task::spawn_blocking(move || dig(dns, &n)).await??;
            if !ips.is_empty() {
                bail!("still answered: {ips:?}");
            }
            Ok::<_, anyhow::Error>(())
        }
    })
    .await;
}

/// A counter of `meshup_config_reloads_total`, 0 while it has not counted yet.
fn reloads(g: &GatewayProcess, trigger: &str, result: &str) -> f64 {
    g.metric(&format!(
        "meshup_config_reloads_total{{trigger=\"{trigger}\",result=\"{result}\"}}"
    ))
    .unwrap_or(0.0)
}

async fn federation(
    etcd: &EtcdServer,
    certs: &Certs,
    prefix: &str,
    alpha: SocketAddr,
    grpc: bool,
) -> (GatewayProcess, GatewayProcess) {
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("alpha", "test", 7100, alpha)],
        grpc,
        ..GatewaySpec::new("west", "127.79.2.0/24", etcd, certs, prefix)
    });
    let mut east = GatewayProcess::start(GatewaySpec::new(
        "east",
        "127.79.1.0/24",
        etcd,
        certs,
        prefix,
    ));
    west.wait_ready().await;
    east.wait_ready().await;
    let vip = east.wait_routable("alpha.test", 7100).await;
    let (tag, _) = eventually_ok("alpha reachable through east", WAIT, || tag_via(vip)).await;
    assert_eq!(tag, "alpha");
    (west, east)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_config_file_adds_changes_and_removes_exports() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = Certs::new(&["east", "west"]);
    let alpha = tagged_backend("alpha").await;
    let (west, east) = federation(&etcd, &certs, "/reload-file", alpha, false).await;
    let dns = east.dns_addr().await;
    let base = west.config_text();

    // Added: in east's DNS, and a connection through east reaches west's new backend.
    let beta1 = tagged_backend("beta-1").await;
    west.write_config(&format!(
        "{base}{}",
        export_entry("beta", "test", 7101, beta1)
    ));
    wait_in_dns(dns, "beta.test").await;
    let vip = east.wait_routable("beta.test", 7101).await;
    let (tag, _) = eventually_ok("beta through east", WAIT, || tag_via(vip)).await;
    assert_eq!(tag, "beta-1");

    // Changed: the endpoint swapped; new connections reach the new backend.
    let beta2 = tagged_backend("beta-2").await;
    west.write_config(&format!(
        "{base}{}",
        export_entry("beta", "test", 7101, beta2)
    ));
    eventually_ok("new connections reach beta-2", WAIT, || async {
        let (tag, _) = tag_via(vip).await?;
        anyhow::ensure!(tag == "beta-2", "reached {tag}");
        Ok(())
    })
    .await;

    // Removed: gone from east's DNS, while a connection opened before keeps working.
    let (tag, mut open) = tag_via(vip).await.expect("open a connection first");
    assert_eq!(tag, "beta-2");
    echo(&mut open, "before")
        .await
        .expect("echo before removal");
    west.write_config(&base);
    wait_gone_from_dns(dns, "beta.test").await;
    echo(&mut open, "after the removal")
        .await
        .expect("a connection opened before the removal keeps working");
    assert_eventually("east closed beta's VIP listener", WAIT, || async {
        tag_via(vip).await.is_err()
    })
    .await;
    echo(&mut open, "still").await.expect("and it still works");
    drop(open);
    let log = west.log_text();
    for diff in [
        "config reloaded: exports added [beta.test], removed [], changed []",
        "config reloaded: exports added [], removed [], changed [beta.test]",
        "config reloaded: exports added [], removed [beta.test], changed []",
    ] {
        assert_eq!(log.matches(diff).count(), 1, "{diff:?} logged once:\n{log}");
    }
    assert_eq!(reloads(&west, "file", "applied"), 3.0);

    // Broken files are refused with the reason; the running config stays and is served.
    let alpha_vip = east.wait_routable("alpha.test", 7100).await;
    let broken = [
        (base.replace("exports:", "exports: [oops"), "config file"),
        (
            base.replace("protocol: tcp}]", "protocol: tcp}], colour: blue"),
            "unknown field `colour`",
        ),
        (
            base.replace("127.79.2.0/24", "127.79.9.0/24"),
            "vip_cidr cannot change without a restart; running config kept",
        ),
    ];
    for (n, (text, reason)) in broken.into_iter().enumerate() {
        west.write_config(&text);
        let refused = (n + 1) as f64;
        assert_eventually(&format!("refused: {reason}"), WAIT, || async {
            reloads(&west, "file", "refused") >= refused
        })
        .await;
        let log = west.log_text();
        let line = log
            .lines()
            .filter(|l| l.contains("config reload refused"))
            .nth(n)
            .unwrap_or_else(|| panic!("no refusal logged:\n{log}"));
        assert!(line.contains(reason), "{reason:?} not in {line:?}");
        assert!(line.contains("running config kept"), "{line}");
        let (tag, _) = tag_via(alpha_vip).await.expect("alpha still served");
        assert_eq!(tag, "alpha");
    }
    assert!(
        west.log_text()
            .lines()
            .find(|l| l.contains("config reload refused"))
            .is_some_and(|l| l.contains("line")),
        "a syntax error names its line"
    );
    let ips = tokio::task::spawn_blocking(move || dig(dns, &name("alpha.test")))
        .await
        .expect("dig task")
        .expect("dig");
    assert_eq!(ips.len(), 1, "alpha still in DNS");
    assert_eq!(
        reloads(&west, "file", "applied"),
        3.0,
        "nothing else applied"
    );
}

/// Runs `meshup ARGS --admin ADDR` (30 s at most): (exit code, stdout, stderr).
fn cli(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let admin = admin.to_string();
    let mut all = args.to_vec();
    all.extend(["--admin", admin.as_str()]);
    meshup(&all, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_once_and_the_api_registers_and_withdraws_exports() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = Certs::new(&["east", "west"]);
    let alpha = tagged_backend("alpha").await;
    let (west, east) = federation(&etcd, &certs, "/reload-api", alpha, true).await;
    let dns = east.dns_addr().await;
    let admin = west.grpc_addr().expect("west serves the admin API");
    let base = west.config_text();

    // An edit followed by SIGHUP, with the file watched too: applied exactly once.
    let beta = tagged_backend("beta").await;
    west.write_config(&format!(
        "{base}{}",
        export_entry("beta", "test", 7101, beta)
    ));
    west.signal("-HUP");
    assert_eventually(
        "both the signal and the file event were handled",
        WAIT,
        || async {
            let seen = |t| {
                ["applied", "unchanged", "refused"]
                    .iter()
                    .map(|r| reloads(&west, t, r))
                    .sum::<f64>()
            };
            seen("signal") >= 1.0 && seen("file") >= 1.0
        },
    )
    .await;
    assert_eq!(
        reloads(&west, "signal", "applied") + reloads(&west, "file", "applied"),
        1.0,
        "one change, applied once"
    );
    let log = west.log_text();
    assert_eq!(
        log.matches("config reloaded: exports added [beta.test]")
            .count(),
        1,
        "{log}"
    );
    wait_in_dns(dns, "beta.test").await;
    let vip = east.wait_routable("beta.test", 7101).await;
    let (tag, _) = eventually_ok("beta through east", WAIT, || tag_via(vip)).await;
    assert_eq!(tag, "beta");

    // Register through the CLI (the gRPC API): in east's DNS and routable.
    let gamma = tagged_backend("gamma").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gamma.yaml");
    std::fs::write(
        &file,
        format!("name: gamma\nnamespace: test\nports: [{{name: tcp, port: 7102}}]\nendpoints: [\"{gamma}\"]\nlabels: {{owner: vm-agent}}\n"),
    )
    .expect("write export file");
    let file = file.to_str().expect("utf-8");
    let (code, out, err) = cli(admin, &["export", "register", "-f", file]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("registered gamma.test (created)"), "{out}");
    let (code, out, _) = cli(admin, &["export", "register", "-f", file, "-o", "json"]);
    assert_eq!(code, 0);
    let again: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        again["outcome"], "unchanged",
        "registering the same export again"
    );
    wait_in_dns(dns, "gamma.test").await;
    let gamma_vip = east.wait_routable("gamma.test", 7102).await;
    let (tag, mut open) = eventually_ok("gamma through east", WAIT, || tag_via(gamma_vip)).await;
    assert_eq!(tag, "gamma");

    // The list: every export, its source, whether it is published; the config file.
    eventually_ok("gamma published", WAIT, || async {
        let (code, out, err) = cli(admin, &["export", "list", "-o", "json"]);
        anyhow::ensure!(code == 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let sources: Vec<(String, String, bool)> = v["exports"]
            .as_array()
            .context("exports")?
            .iter()
            .map(|e| {
                (
                    e["service"].as_str().unwrap_or_default().to_owned(),
                    e["source"].as_str().unwrap_or_default().to_owned(),
                    e["published"].as_bool().unwrap_or_default(),
                )
            })
            .collect();
        anyhow::ensure!(
            sources
                == [
                    ("alpha.test".into(), "file".into(), true),
                    ("beta.test".into(), "file".into(), true),
                    ("gamma.test".into(), "api".into(), true),
                ],
            "{sources:?}"
        );
        anyhow::ensure!(v["config"]["reloads_applied"] == 1, "{}", v["config"]);
        anyhow::ensure!(
            v["config"]["sha256"]
                .as_str()
                .is_some_and(|s| s.len() == 64),
            "{}",
            v["config"]
        );
        Ok(())
    })
    .await;
    let (code, out, _) = cli(admin, &["export", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.starts_with("gamma.test  api ")),
        "{out}"
    );
    assert!(out.contains("(1 reloads applied, 0 refused)"), "{out}");

    // Bad input: exit codes and messages that say what to do; nothing changes.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: delta\nnamespace: test\nports: [{name: tcp, port: 7103}]\nendpoints: [\"0.0.0.0:80\"]\n").expect("write");
    let (code, _, err) = cli(
        admin,
        &["export", "register", "-f", bad.to_str().expect("utf-8")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("export (delta.test): endpoint 0.0.0.0:80 is not an address"),
        "{err}"
    );
    std::fs::write(&bad, "name: delta\nnamespace: test\nports: [{name: tcp, port: 7103}]\nendpoint: [\"127.0.0.1:80\"]\n").expect("write");
    let (code, _, err) = cli(
        admin,
        &["export", "register", "-f", bad.to_str().expect("utf-8")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `endpoint`"), "{err}");
    let alpha_file = dir.path().join("alpha.yaml");
    std::fs::write(&alpha_file, format!("name: alpha\nnamespace: test\nports: [{{name: tcp, port: 7100}}]\nendpoints: [\"{gamma}\"]\n")).expect("write");
    let (code, _, err) = cli(
        admin,
        &[
            "export",
            "register",
            "-f",
            alpha_file.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("alpha.test is exported by the config file"),
        "{err}"
    );
    let (code, _, err) = cli(admin, &["export", "withdraw", "alpha.test"]);
    assert_eq!(code, 5, "{err}");
    let (code, _, err) = cli(admin, &["export", "withdraw", "nope.test"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("not registered through the admin API"),
        "{err}"
    );

    // The API itself, with a standard client: register and withdraw through grpcurl.
    let delta = tagged_backend("delta").await;
    let addr = admin.to_string();
    let body = format!(
        r#"{{"export":{{"name":"delta","namespace":"test","ports":[{{"name":"tcp","port":7103}}],"endpoints":["{delta}"]}}}}"#
    );
    let (ok, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        &body,
        &addr,
        "meshup.admin.v1.AdminService/RegisterExport",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("\"outcome\": \"created\""), "{out}");
    wait_in_dns(dns, "delta.test").await;
    let delta_vip = east.wait_routable("delta.test", 7103).await;
    let (tag, _) = eventually_ok("delta through east", WAIT, || tag_via(delta_vip)).await;
    assert_eq!(tag, "delta");
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"delta.test"}"#,
        &addr,
        "meshup.admin.v1.AdminService/WithdrawExport",
    ]);
    assert!(ok, "{err}");
    wait_gone_from_dns(dns, "delta.test").await;
    let (ok, _, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"delta.test"}"#,
        &addr,
        "meshup.admin.v1.AdminService/WithdrawExport",
    ]);
    assert!(!ok && err.contains("NotFound"), "withdrawn twice: {err}");

    // A reload that would take over an API export is refused; the API's stays.
    let refused_before = reloads(&west, "signal", "refused");
    let with_gamma = format!(
        "{}{}",
        west.config_text(),
        export_entry("gamma", "test", 7102, gamma)
    );
    west.write_config(&with_gamma);
    west.signal("-HUP");
    assert_eventually("the clash refused", WAIT, || async {
        reloads(&west, "signal", "refused") + reloads(&west, "file", "refused") > refused_before
    })
    .await;
    assert!(
        west.log_text()
            .contains("gamma.test is registered through the admin API; withdraw it first"),
        "{}",
        west.log_text()
    );
    west.write_config(&format!(
        "{base}{}",
        export_entry("beta", "test", 7101, beta)
    ));

    // Withdraw through the CLI: gone from east's DNS; the open connection finishes.
    let (code, out, err) = cli(admin, &["export", "withdraw", "gamma.test"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("withdrew gamma.test"), "{out}");
    wait_gone_from_dns(dns, "gamma.test").await;
    echo(&mut open, "after the withdrawal")
        .await
        .expect("a connection opened before the withdrawal keeps working");
    let (code, _, err) = cli(admin, &["export", "withdraw", "gamma.test"]);
    assert_eq!(code, 4, "withdrawn twice: {err}");
    // beta, from the file, is untouched by all of this.
    let (tag, _) = tag_via(vip).await.expect("beta still served");
    assert_eq!(tag, "beta");
}

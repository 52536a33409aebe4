//! Per-request routing of `http` and `grpc` ports across clusters, with real clients (curl,
//! a tonic gRPC client) and real gateway processes on one etcd: east is the client side,
//! west and north export `echo.prod` port 7000 with a backend that names its cluster. The
//! failover policy is `levels: [[west], [north]]`; route rules are written with `etcdctl put`
//! (docs/http-routing.md), and once with `meshup route apply` through east's admin API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use meshup_tests::failover::{Federation, Options};
use meshup_tests::gateways::{GatewayProcess, path_str};
use meshup_tests::web::{GrpcBackend, WebBackend, body_digest};
use meshup_tests::{eventually_ok, meshup};

/// One curl run: (exit code, stdout). `-s`, no proxy from the environment.
fn curl(args: &[&str]) -> (i32, String) {
    let out = Command::new("curl")
        .args(["-s", "--noproxy", "*", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl runs (.ci/packages: curl)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The cluster a backend answer names (`cluster=<name> …`).
fn cluster_of(body: &str) -> Option<&str> {
    body.lines()
        .find_map(|l| l.strip_prefix("cluster="))
        .and_then(|rest| rest.split_whitespace().next())
}

/// GETs `path` through east with extra headers: (status, cluster that answered or `-`).
fn get(vip: SocketAddr, path: &str, headers: &[&str]) -> (u16, String, String) {
    let url = format!("http://{vip}{path}");
    let mut args: Vec<&str> = vec!["-w", "\n%{http_code}"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.push(&url);
    let (_, out) = curl(&args);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        cluster_of(body).unwrap_or("-").to_owned(),
        body.to_owned(),
    )
}

/// Waits (10 s at most) until a GET of `path` through east is answered 200 by `cluster`.
async fn routed_to(vip: SocketAddr, path: &str, cluster: &str) {
    eventually_ok(
        &format!("east routes {path} to {cluster}"),
        Duration::from_secs(10),
        || async {
            let (code, got, _) = get(vip, path, &[]);
            anyhow::ensure!((code, got.as_str()) == (200, cluster), "{code} {got}");
            Ok(())
        },
    )
    .await;
}

async fn federation(
    prefix: &str,
    octet: u8,
    backends: [SocketAddr; 2],
    app: &str,
) -> anyhow::Result<Federation> {
    Federation::start(Options {
        prefix,
        vip_octet: octet,
        backends: Some(backends),
        app_protocol: Some(app),
        serving_cluster_header: (app == "http").then_some("x-meshup-cluster"),
        body_idle_timeout: Some(Duration::from_secs(1)),
        max_requests_per_client: Some(4),
        // Outlier detection's first ejection outlasts the test.
        base_ejection: Some(Duration::from_secs(120)),
        ..Options::default()
    })
    .await
}

const RULES: &str = r#"{"schema": 1, "rules": [
    {"name": "canary", "match": [{"headers": [{"name": "x-canary", "exact": "1"}]}],
     "destinations": [{"cluster": "north"}],
     "request_headers": {"set": {"x-route-tag": "canary"}},
     "response_headers": {"add": {"x-route": "canary"}}},
    {"name": "api", "match": [{"path": {"prefix": "/api"}}], "destinations": [{"cluster": "north"}]},
    {"name": "slow-tries", "match": [{"path": {"exact": "/slow"}, "headers": [{"name": "x-tries"}]}],
     "timeout": "5s", "retry": {"attempts": 2, "per_try_timeout": "300ms"},
     "destinations": [{"cluster": "west"}, {"cluster": "north"}]},
    {"name": "slow", "match": [{"path": {"exact": "/slow"}}], "timeout": "500ms",
     "retry": {"attempts": 1}},
    {"name": "west", "match": [{"path": {"prefix": "/west"}}], "destinations": [{"cluster": "west"}]},
    {"name": "split", "match": [{"path": {"prefix": "/split"}}],
     "destinations": [{"cluster": "west", "weight": 90}, {"cluster": "north", "weight": 10}]}
]}"#;

/// Rules by path prefix and header, header edits both ways, a 90/10 split over one
/// keep-alive connection, h2c, a WebSocket upgrade and a timeout, across two clusters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_routed_one_by_one_by_the_rules() -> anyhow::Result<()> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = federation("/http-rules", 101, [west.addr(), north.addr()], "http").await?;
    let vip = fed.vip;

    // No rule yet: the policy sends everything to west, over HTTP (the gateway parses it).
    let (code, cluster, body) = get(vip, "/api/pay", &[]);
    assert_eq!((code, cluster.as_str()), (200, "west"), "{body}");

    fed.write_routes(RULES)?;
    routed_to(vip, "/api/pay", "north").await;

    // Path prefix by whole segments, header match, the rest to the policy.
    for (path, headers, want) in [
        ("/api", &[][..], "north"),
        ("/api/v1/x", &[][..], "north"),
        ("/apix", &[][..], "west"),
        ("/other", &["x-canary: 1"][..], "north"),
        ("/other", &["x-canary: 0"][..], "west"),
        ("/", &[][..], "west"),
    ] {
        let (code, cluster, body) = get(vip, path, headers);
        assert_eq!(
            (code, cluster.as_str()),
            (200, want),
            "{path} {headers:?}: {body}"
        );
    }

    // Header edits: the backend sees the request's tag, the client the response's header.
    let (_, out) = curl(&["-i", "-H", "x-canary: 1", &format!("http://{vip}/x")]);
    assert!(out.contains("tag=canary"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-route: canary"),
        "{out}"
    );
    assert!(
        out.to_ascii_lowercase().contains("x-served-by: north"),
        "{out}"
    );
    // W3C trace context passes untouched.
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, _, body) = get(vip, "/traced", &[&format!("traceparent: {trace}")]);
    assert!(body.contains(&format!("trace={trace}")), "{body}");
    // The gateway's own header naming the serving cluster (configured on east).
    assert!(
        out.to_ascii_lowercase().contains("x-meshup-cluster: north"),
        "{out}"
    );

    // 90/10 over 2,000 requests on ONE keep-alive connection.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("urls");
    let urls: String = (0..2000)
        .map(|i| format!("url = \"http://{vip}/split/{i}\"\n"))
        .collect();
    std::fs::write(&config, urls)?;
    let west_connections = west.connections();
    let (code, out) = curl(&["-K", path_str(&config), "-w", "connects=%{num_connects}\n"]);
    assert_eq!(code, 0, "curl: {out}");
    let mut by_cluster: BTreeMap<&str, usize> = BTreeMap::new();
    for c in out.lines().filter_map(|l| l.strip_prefix("cluster=")) {
        *by_cluster
            .entry(c.split_whitespace().next().unwrap_or("-"))
            .or_default() += 1;
    }
    let connects: usize = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .map(|n| n.parse::<usize>().unwrap_or(99))
        .sum();
    assert_eq!(connects, 1, "all 2,000 requests on one connection");
    let west_n = by_cluster.get("west").copied().unwrap_or(0);
    let north_n = by_cluster.get("north").copied().unwrap_or(0);
    assert_eq!(west_n + north_n, 2000, "{by_cluster:?}");
    let west_pct = west_n as f64 / 20.0;
    println!("90/10 split over one connection: west {west_n}, north {north_n} ({west_pct:.1} %)");
    assert!(
        (87.0..=93.0).contains(&west_pct),
        "west {west_pct} % (want 90 ± 3)"
    );
    // West's gateway sends them to its backend over pooled keep-alive connections.
    let opened = west.connections() - west_connections;
    println!("west's backend: {west_n} requests over {opened} connections");
    assert!(
        opened <= 8,
        "{opened} backend connections for {west_n} requests"
    );

    // h2c with prior knowledge: routed per request the same way, h2 to the backend (it
    // crosses between the gateways as HTTP/1.1, marked, and the mark stays there).
    let (_, out) = curl(&["--http2-prior-knowledge", &format!("http://{vip}/api/h2")]);
    assert_eq!(cluster_of(&out), Some("north"), "{out}");
    assert!(out.contains("version=HTTP/2.0"), "{out}");
    assert!(
        out.contains(&format!("authority={vip} scheme=http ")),
        "{out}"
    );
    assert!(out.contains("internal=-"), "{out}");
    // More header fields than an HTTP/1.1 client may send (100) cross with it.
    let many: Vec<String> = (0..150).map(|i| format!("x-field-{i}: {i}")).collect();
    let mut args = vec!["--http2-prior-knowledge"];
    for field in &many {
        args.extend(["-H", field.as_str()]);
    }
    let url = format!("http://{vip}/west/many");
    args.push(&url);
    let (_, out) = curl(&args);
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("version=HTTP/2.0"), "{out}");
    let fields: usize = out
        .split_once(" fields=")
        .and_then(|(_, rest)| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(fields >= 150, "{fields} fields reached the backend: {out}");
    let (_, out) = curl(&["--http2-prior-knowledge", &format!("http://{vip}/west/h2")]);
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("version=HTTP/2.0"), "{out}");
    // ... with a body, which goes on as h2 too.
    let (_, out) = curl(&[
        "--http2-prior-knowledge",
        "--data-binary",
        "h2 body",
        &format!("http://{vip}/west/h2"),
    ]);
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("method=POST"), "{out}");
    assert!(out.contains("version=HTTP/2.0"), "{out}");
    assert!(
        out.contains(&format!("body={}\n", body_digest(b"h2 body"))),
        "{out}"
    );
    // A client's own mark is not taken: HTTP/1.1 stays HTTP/1.1, and the mark goes no
    // further than the calling gateway.
    let (_, _, out) = get(vip, "/west/h1", &["meshup-h2-client: 1"]);
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("version=HTTP/1.1"), "{out}");
    assert!(out.contains("internal=-"), "{out}");

    // A WebSocket upgrade passes through as a tunnel: bytes echoed after the 101.
    websocket_echo(vip).await?;

    // The rule's timeout: the backend answers /slow after 2 s; the client gets 504 at 0.5 s.
    let started = std::time::Instant::now();
    let (code, _, _) = get(vip, "/slow", &[]);
    let took = started.elapsed();
    assert_eq!(code, 504);
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    // Per-try timeouts: west, then north, each cut at 0.3 s (a GET is replayable), then 504.
    let (west_before, north_before) = (west.answered(None), north.answered(None));
    let started = std::time::Instant::now();
    let (code, _, _) = get(vip, "/slow", &["x-tries: 1"]);
    let took = started.elapsed();
    assert_eq!(code, 504);
    assert_eq!(
        (
            west.answered(None) - west_before,
            north.answered(None) - north_before
        ),
        (1, 1),
        "one try at each cluster"
    );
    assert!(
        (Duration::from_millis(550)..Duration::from_millis(1900)).contains(&took),
        "two tries of 0.3 s took {took:?}"
    );

    // Counted by destination, route and code.
    let series = fed.east.metric_sum(
        "meshup_http_requests_total",
        &[
            "route=\"split\"",
            "destination_cluster=\"west\"",
            "code=\"200\"",
        ],
    )?;
    assert_eq!(series as usize, west_n);

    // SIGTERM with an idle keep-alive client: the connection is closed at once (after its
    // last response), so the drain completes instead of waiting out its deadline.
    idle_keep_alive_does_not_hold_the_drain(fed).await
}

async fn idle_keep_alive_does_not_hold_the_drain(mut fed: Federation) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(fed.vip).await?;
    s.write_all(b"GET /x HTTP/1.1\r\nHost: echo\r\n\r\n")
        .await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("cluster=") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed before the response");
        got.extend_from_slice(&buf[..n]);
    }
    fed.east.signal("-TERM");
    let code = fed.east.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "a completed drain exits 0");
    let n = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await??;
    assert_eq!(n, 0, "the idle client connection was closed");
    let log = fed.east.log_text();
    assert!(log.contains("drain complete"), "{log}");
    Ok(())
}

/// Sends an upgrade request by hand, then bytes that must come back.
async fn websocket_echo(vip: SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(vip).await?;
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(s.read(&mut b).await? == 1, "closed before the 101");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    anyhow::ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello through the tunnel"[..], &[0u8, 1, 2, 255][..]] {
        s.write_all(msg).await?;
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await??;
        assert_eq!(back, msg);
    }
    Ok(())
}

/// A cluster answering 503 is retried elsewhere and ejected; a POST is never retried once
/// sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cluster_is_retried_around_and_ejected_and_a_post_is_never_repeated()
-> anyhow::Result<()> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = federation("/http-retry", 102, [west.addr(), north.addr()], "http").await?;
    let vip = fed.vip;
    let (code, cluster, _) = get(vip, "/", &[]);
    assert_eq!((code, cluster.as_str()), (200, "west"));

    // A POST with a body that west answers 503: the client gets west's 503, north never
    // sees it (it may have changed state at west).
    west.fail_with(Some("POST"), Some(503));
    let (north_before, west_before) = (north.answered(Some("POST")), west.answered(Some("POST")));
    let (_, out) = curl(&[
        "-X",
        "POST",
        "-d",
        "pay=1",
        "-w",
        "\n%{http_code}",
        &format!("http://{vip}/pay"),
    ]);
    assert!(out.ends_with("503"), "{out}");
    assert_eq!(west.answered(Some("POST")) - west_before, 1);
    assert_eq!(
        north.answered(Some("POST")) - north_before,
        0,
        "a sent POST is not retried"
    );

    // Every GET at west answers 503: each is retried at north (the client sees 200), and
    // within a handful of requests west is ejected: it sees no more.
    west.fail_with(None, Some(503));
    let west_before = west.answered(Some("GET"));
    for i in 0..40 {
        let (code, cluster, body) = get(vip, &format!("/get/{i}"), &[]);
        assert_eq!(
            (code, cluster.as_str()),
            (200, "north"),
            "request {i}: {body}"
        );
    }
    let west_saw = west.answered(Some("GET")) - west_before;
    println!("west answered {west_saw} of 40 GETs with 503 before it was ejected");
    assert!((1..=6).contains(&west_saw), "west saw {west_saw} GETs");
    let ejections = fed.east.metric_sum(
        "meshup_service_ejections_total",
        &["destination_cluster=\"west\""],
    )?;
    assert!(ejections >= 1.0, "ejections {ejections}");

    hostile_clients_are_held_to_the_limits(vip, &north, &fed.east).await
}

/// A header block past 64 KiB gets 431 and reaches no backend; connections that never finish
/// their headers are closed after the header timeout while other clients are served.
async fn hostile_clients_are_held_to_the_limits(
    vip: SocketAddr,
    backend: &WebBackend,
    east: &GatewayProcess,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let before = backend.answered(None);
    let big = format!("x-big: {}", "a".repeat(70 * 1024));
    let (code, _, _) = get(vip, "/big", &[&big]);
    assert_eq!(code, 431, "a 70 KiB header block");
    assert_eq!(backend.answered(None), before, "no backend saw it");

    // Header fields: 100 pass, 101 get 431. A request line past the 64 KiB buffer is refused.
    let status_of = |fields: usize, path: String| async move {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n");
        for i in 2..fields {
            req += &format!("x-f{i}: 1\r\n");
        }
        req += "\r\n";
        let mut s = tokio::net::TcpStream::connect(vip).await?;
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
        let out = String::from_utf8_lossy(&out).into_owned();
        anyhow::Ok(out.get(9..12).unwrap_or("-").to_owned())
    };
    assert_eq!(
        status_of(100, "/fields".into()).await?,
        "200",
        "100 header fields"
    );
    let seen = backend.answered(None);
    assert_eq!(
        status_of(101, "/fields".into()).await?,
        "431",
        "101 header fields"
    );
    let long = status_of(3, format!("/{}", "a".repeat(70 * 1024))).await?;
    assert!(
        long == "414" || long == "431",
        "a 70 KiB request line: {long}"
    );
    assert_eq!(backend.answered(None), seen, "no backend saw them");

    // A CONNECT (a tunnel to the authority it names) is answered 501 by the gateway, and the
    // connection goes on serving requests.
    let mut s = tokio::net::TcpStream::connect(vip).await?;
    s.write_all(b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&head).contains("export a tcp port to tunnel\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "closed after {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(head.starts_with("HTTP/1.1 501"), "{head}");
    s.write_all(b"GET /after-connect HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(
        backend.answered(None),
        seen + 1,
        "the backend saw the GET, not the CONNECT"
    );
    let refused = east.metric_sum("meshup_http_requests_total", &["code=\"501\""])?;
    assert_eq!(refused, 1.0);

    let started = std::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(vip).await?;
        s.write_all(b"GET /never HTTP/1.1\r\nHost: echo\r\nx-slow: 1\r\n")
            .await?;
        slow.push(s);
    }
    // Other clients are served meanwhile.
    let (code, cluster, _) = get(vip, "/meanwhile", &[]);
    assert_eq!((code, cluster.as_str()), (200, "north"));
    let mut buf = [0u8; 1024];
    for mut s in slow {
        // Closed by the gateway (possibly after a 408): reads end within the timeout.
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a connection without its headers stayed open"
        );
    }
    let took = started.elapsed();
    println!("20 connections that never finished their headers were closed after {took:?}");
    assert!(
        took >= Duration::from_secs(9),
        "closed after {took:?}, before the 10 s timeout"
    );

    // An upload that stops halfway: abandoned after `http.body_idle_timeout` (1 s here) with
    // a 408, and not held against the cluster.
    let started = std::time::Instant::now();
    let mut s = tokio::net::TcpStream::connect(vip).await?;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: echo\r\nContent-Length: 100\r\n\r\nfirst ten.")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await??;
    let took = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    println!("a stalled upload was answered after {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body stopped coming"),
        "{answer}"
    );
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(5)).contains(&took),
        "answered after {took:?}"
    );
    let stalled = east.metric_sum(
        "meshup_service_attempt_failures_total",
        &["result=\"body_stalled\""],
    )?;
    assert_eq!(stalled, 1.0);
    let north_ejected = east.metric_sum(
        "meshup_service_ejections_total",
        &["destination_cluster=\"north\""],
    )?;
    assert_eq!(
        north_ejected, 0.0,
        "the client's stall is not the cluster's failure"
    );

    // One client address with 4 requests waiting (`max_requests_per_client: 4`): its 5th is
    // answered 429 at once; another address is served meanwhile.
    let waiting_before = backend.answered(Some("GET"));
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(vip).await?;
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: echo\r\nConnection: close\r\n\r\n")
            .await?;
        waiting.push(tokio::spawn(async move {
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        }));
    }
    meshup_tests::assert_eventually(
        "the 4 slow requests reached the backend",
        Duration::from_secs(10),
        || async { backend.answered(Some("GET")) - waiting_before == 4 },
    )
    .await;
    let (code, _, body) = get(vip, "/fifth", &[]);
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("too many requests"), "{body}");
    let (_, other) = curl(&[
        "--interface",
        "127.0.0.2",
        "-w",
        "\n%{http_code}",
        &format!("http://{vip}/other"),
    ]);
    assert!(other.ends_with("200"), "another client address: {other}");
    for w in waiting {
        let out = w.await?;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    let (code, _, _) = get(vip, "/after-slow", &[]);
    assert_eq!(code, 200, "the client's slots are free again");
    let limited = east.metric_sum("meshup_http_requests_total", &["code=\"429\""])?;
    assert_eq!(limited, 1.0);
    Ok(())
}

/// A gRPC unary call and a server stream with trailers across clusters, routed by metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_and_streams_cross_clusters_with_their_trailers() -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let west = GrpcBackend::start("west").await?;
    let north = GrpcBackend::start("north").await?;
    let fed = federation("/http-grpc", 103, [west.addr(), north.addr()], "grpc").await?;
    fed.write_routes(
        r#"{"schema": 1, "rules": [{"name": "to-north",
            "match": [{"headers": [{"name": "x-cluster", "exact": "north"}]}],
            "destinations": [{"cluster": "north"}]}]}"#,
    )?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", fed.vip))?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let check = |service: &str, to_north: bool| {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        if to_north {
            req.metadata_mut()
                .insert("x-cluster", "north".parse().expect("value"));
        }
        req
    };
    // The policy's west serves "west"; "north" is unknown there: NOT_FOUND comes in the
    // trailers (grpc-status), through both gateways.
    let ok = client.check(check("west", false)).await?.into_inner();
    assert_eq!(ok.status, ServingStatus::Serving as i32);
    let err = client
        .check(check("north", false))
        .await
        .expect_err("unknown at west");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    eventually_ok("east applies the rules", Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let ok = client.check(check("north", true)).await?.into_inner();
            anyhow::ensure!(ok.status == ServingStatus::Serving as i32);
            Ok(())
        }
    })
    .await;

    // A server stream on one request, across clusters: updates arrive as they happen.
    let mut stream = client.watch(check("north", true)).await?.into_inner();
    let first = stream.message().await?.expect("first update");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    north.set("north", false).await;
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("second update");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    Ok(())
}

/// Rules written with `meshup route apply -f` (a route file, through east's admin API) route
/// the next requests; `meshup route delete` gives them back to the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_applied_with_the_cli_route_requests() -> anyhow::Result<()> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = Federation::start(Options {
        prefix: "/http-cli",
        vip_octet: 104,
        backends: Some([west.addr(), north.addr()]),
        app_protocol: Some("http"),
        east_admin: true,
        ..Options::default()
    })
    .await?;
    let vip = fed.vip;
    let admin = fed.east.grpc_addr().expect("east's admin API").to_string();
    let (code, cluster, body) = get(vip, "/api/pay", &[]);
    assert_eq!(
        (code, cluster.as_str()),
        (200, "west"),
        "the policy: {body}"
    );

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("echo.yaml");
    std::fs::write(
        &file,
        "service: echo.prod\nrules:\n  - name: api\n    match: [{path: {prefix: /api}}]\n    destinations: [{cluster: north}]\n",
    )?;
    let (code, out, err) = meshup(
        &[
            "route",
            "apply",
            "-f",
            path_str(&file),
            "--revision",
            "0",
            "--admin",
            &admin,
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("route rules for echo.prod written at revision "),
        "{out}"
    );
    routed_to(vip, "/api/pay", "north").await;
    let (code, cluster, body) = get(vip, "/other", &[]);
    assert_eq!(
        (code, cluster.as_str()),
        (200, "west"),
        "no rule: the policy: {body}"
    );
    let routed = fed.east.metric_sum(
        "meshup_http_requests_total",
        &[
            "route=\"api\"",
            "destination_cluster=\"north\"",
            "code=\"200\"",
        ],
    )?;
    assert!(routed >= 1.0, "counted under the rule's name: {routed}");

    let (code, out, err) = meshup(&["route", "delete", "echo.prod", "--admin", &admin], &[]);
    assert_eq!(code, 0, "{out}{err}");
    routed_to(vip, "/api/pay", "west").await;
    Ok(())
}

/// Requests share kept tunnel streams; a kept stream whose cluster lost its endpoint says it
/// forwarded nothing, and the request is served elsewhere; a draining serving gateway
/// closes the streams kept to it instead of waiting out its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_streams_carry_requests_and_a_lost_endpoint_behind_one_is_tried_elsewhere()
-> anyhow::Result<()> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let mut fed = federation("/http-kept", 106, [west.addr(), north.addr()], "http").await?;
    let vip = fed.vip;
    routed_to(vip, "/", "west").await;

    // 50 requests, each on its own client connection: a handful of tunnel streams.
    let streams = |fed: &Federation| {
        fed.west.metric_sum(
            "meshup_tunnel_streams_opened_total",
            &["direction=\"inbound\"", "source_cluster=\"east\""],
        )
    };
    let before = streams(&fed)?;
    for i in 0..50 {
        let (code, cluster, body) = get(vip, &format!("/kept/{i}"), &[]);
        assert_eq!(
            (code, cluster.as_str()),
            (200, "west"),
            "request {i}: {body}"
        );
    }
    let opened = streams(&fed)? - before;
    println!("50 requests took {opened} new tunnel streams to west");
    assert!(opened <= 10.0, "{opened} streams for 50 requests");

    // Kept streams past their time are dropped without traffic.
    let in_flight = |fed: &Federation| {
        fed.west.metric_sum(
            "meshup_tunnel_streams_in_flight",
            &["direction=\"inbound\"", "source_cluster=\"east\""],
        )
    };
    eventually_ok(
        "east drops the streams it kept to west",
        Duration::from_secs(15),
        || async {
            let n = in_flight(&fed)?;
            anyhow::ensure!(n == 0.0, "{n} streams open");
            Ok(())
        },
    )
    .await;

    // A new stream carries the next request and is kept. West's backend dies with its
    // connections: the request after, a POST with a body, goes out on the kept stream, west
    // has no endpoint for it and says so, and north serves it, body and all (it reached no
    // backend, so sending it again is safe whatever its method).
    let before = streams(&fed)?;
    let (code, cluster, _) = get(vip, "/warm", &[]);
    assert_eq!((code, cluster.as_str()), (200, "west"));
    assert_eq!(streams(&fed)? - before, 1.0, "one new stream");
    let north_before = north.answered(Some("GET"));
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    // The client is connected first, so the request follows the stop within a millisecond,
    // long before west's next health probe (every 2 s) could withdraw its export.
    let mut client = tokio::net::TcpStream::connect(vip).await?;
    west.crash().await;
    let body = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut request = format!(
            "POST /after HTTP/1.1\r\nHost: echo\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            payload.len()
        )
        .into_bytes();
        request.extend_from_slice(&payload);
        client.write_all(&request).await?;
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut out)).await??;
        out
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert_eq!(cluster_of(&body), Some("north"), "{body}");
    assert!(body.contains("method=POST path=/after "), "{body}");
    assert!(
        body.contains(&format!("body={}\n", body_digest(&payload))),
        "north got the body whole: {body}"
    );
    assert_eq!(north.answered(Some("POST")), 1);
    assert_eq!(streams(&fed)? - before, 1.0, "the kept stream carried it");
    let not_forwarded = fed.east.metric_sum(
        "meshup_service_attempt_failures_total",
        &["destination_cluster=\"west\"", "result=\"not_forwarded\""],
    )?;
    assert_eq!(not_forwarded, 1.0);
    // The stream is not used again: the next requests' new streams are refused by west and
    // served by north.
    for i in 0..4 {
        let (code, cluster, body) = get(vip, &format!("/after/{i}"), &[]);
        assert_eq!(
            (code, cluster.as_str()),
            (200, "north"),
            "request {i}: {body}"
        );
        assert!(!body.contains("meshup"), "a gateway's own answer: {body}");
    }
    assert_eq!(north.answered(Some("GET")) - north_before, 4);

    // North drains with east's streams kept open to it (the last request was just served
    // over one): they close after their response, so the drain completes instead of waiting
    // for its deadline.
    fed.north.signal("-TERM");
    let code = fed.north.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "a completed drain exits 0");
    let log = fed.north.log_text();
    assert!(
        log.contains("drain complete") && !log.contains("drain deadline passed"),
        "{log}"
    );
    Ok(())
}

/// The keep-alive race: west's backend closes a kept connection without answering the
/// request west just wrote on it (as a backend closing an idle connection at the moment it
/// is reused does, or one going away). The request is a GET, which may be sent again: west
/// says it forwarded nothing and north serves it, instead of the client getting a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_endpoint_connection_hung_up_sends_an_idempotent_request_elsewhere()
-> anyhow::Result<()> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = federation("/http-hang-up", 109, [west.addr(), north.addr()], "http").await?;
    let vip = fed.vip;
    // The answer leaves west's connection to its backend in the pool, kept for 4 s.
    routed_to(vip, "/", "west").await;
    let north_before = north.answered(Some("GET"));
    west.hang_up_on_next_request();
    let (code, cluster, body) = get(vip, "/hung-up", &[]);
    assert_eq!((code, cluster.as_str()), (200, "north"), "{body}");
    assert_eq!(north.answered(Some("GET")) - north_before, 1);
    let not_forwarded = fed.east.metric_sum(
        "meshup_service_attempt_failures_total",
        &["destination_cluster=\"west\"", "result=\"not_forwarded\""],
    )?;
    assert_eq!(not_forwarded, 1.0, "west's answer: forwarded nothing");
    Ok(())
}

/// West is killed (kill -9) while east keeps streams to it: the next request goes out on a
/// kept stream into silence, QUIC's idle timeout (3 s) ends the connection and its streams,
/// and the GET is served by north, instead of waiting out its 60 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_behind_kept_streams_is_left_within_the_idle_timeout() -> anyhow::Result<()>
{
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let mut fed = federation("/http-killed", 107, [west.addr(), north.addr()], "http").await?;
    let vip = fed.vip;
    routed_to(vip, "/", "west").await;
    for i in 0..10 {
        let (code, cluster, body) = get(vip, &format!("/before/{i}"), &[]);
        assert_eq!(
            (code, cluster.as_str()),
            (200, "west"),
            "request {i}: {body}"
        );
    }
    fed.west.kill9();
    let started = std::time::Instant::now();
    let (code, cluster, body) = get(vip, "/after-kill", &[]);
    let took = started.elapsed();
    println!("the first request after west's kill -9 was served by {cluster} after {took:?}");
    assert_eq!((code, cluster.as_str()), (200, "north"), "{body}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let (code, cluster, _) = get(vip, "/next", &[]);
    assert_eq!((code, cluster.as_str()), (200, "north"));
    Ok(())
}

/// The source cluster exports the service itself (an `http` port), first in the policy:
/// requests no rule sends elsewhere are served by east's own endpoint, directly (a local
/// connection, no tunnel stream), and the requests a rule sends to a remote cluster still go
/// there, on the same client connection, one request at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_cluster_serves_what_no_rule_sends_elsewhere() -> anyhow::Result<()> {
    let east = WebBackend::start("east").await?;
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = Federation::start(Options {
        prefix: "/http-local",
        vip_octet: 105,
        backends: Some([west.addr(), north.addr()]),
        app_protocol: Some("http"),
        serving_cluster_header: Some("x-meshup-cluster"),
        east_backend: Some(east.addr()),
        levels: Some(&["east", "west", "north"]),
        ..Options::default()
    })
    .await?;
    let vip = fed.vip;

    // No rule: the policy's first level is east itself, served from its own endpoint.
    let (_, out) = curl(&["-i", &format!("http://{vip}/api/pay")]);
    assert_eq!(cluster_of(&out), Some("east"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("x-meshup-cluster: east"),
        "{out}"
    );

    fed.write_routes(
        r#"{"schema": 1, "rules": [
        {"name": "api", "match": [{"path": {"prefix": "/api"}}], "destinations": [{"cluster": "north"}]},
        {"name": "west", "match": [{"path": {"prefix": "/west"}}], "destinations": [{"cluster": "west"}]}
    ]}"#,
    )?;
    routed_to(vip, "/api/pay", "north").await;

    // 300 requests on ONE keep-alive connection, interleaved: each goes where its own rule
    // (or the policy, for the rest) says.
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("urls");
    let urls: String = (0..100)
        .flat_map(|i| ["api", "west", "other"].map(|p| format!("url = \"http://{vip}/{p}/{i}\"\n")))
        .collect();
    std::fs::write(&config, urls)?;
    let answered = |b: &WebBackend| b.answered(None);
    let before = [answered(&east), answered(&west), answered(&north)];
    let east_connections = east.connections();
    let local_before = fed.east.metric_sum(
        "meshup_http_requests_total",
        &["destination_cluster=\"east\"", "code=\"200\""],
    )?;
    let (code, out) = curl(&["-K", path_str(&config), "-w", "connects=%{num_connects}\n"]);
    assert_eq!(code, 0, "curl: {out}");
    let connects: usize = out
        .lines()
        .filter_map(|l| l.strip_prefix("connects="))
        .map(|n| n.parse::<usize>().unwrap_or(99))
        .sum();
    assert_eq!(connects, 1, "all 300 requests on one connection");
    // The answers in order: api → north, west → west, the rest → east.
    let got: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("cluster="))
        .map(|c| c.split_whitespace().next().unwrap_or("-"))
        .collect();
    let want: Vec<&str> = (0..100).flat_map(|_| ["north", "west", "east"]).collect();
    assert_eq!(got, want);
    // Each backend saw exactly its share, and east's local ones were counted as served by
    // east.
    let after = [answered(&east), answered(&west), answered(&north)];
    assert_eq!(
        [
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2]
        ],
        [100, 100, 100]
    );
    let local = fed.east.metric_sum(
        "meshup_http_requests_total",
        &["destination_cluster=\"east\"", "code=\"200\""],
    )? - local_before;
    assert_eq!(local, 100.0, "east's own endpoint served 100 requests");
    // Kept like tunnel streams: a handful of connections, not one per request.
    let local_connections = east.connections() - east_connections;
    println!("east's own backend: 100 requests over {local_connections} connections");
    assert!(local_connections <= 10, "{local_connections} connections");

    // Without the rules, every request is east's again.
    fed.etcd
        .etcdctl(&["del", "/http-local/v1/routes/prod/echo"])?;
    routed_to(vip, "/api/pay", "east").await;
    Ok(())
}

/// Endpoints that speak only HTTP/1.1 (`endpoint_protocol: http1`, docs/http-routing.md,
/// "What the endpoints speak"): every request reaches them as HTTP/1.1, whatever its client
/// spoke and however it crossed. The backends refuse h2, so a request that reached one as
/// h2 would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_that_speak_only_http1_get_every_request_as_http1() -> anyhow::Result<()> {
    let east = WebBackend::start_http1_only("east").await?;
    let west = WebBackend::start_http1_only("west").await?;
    let north = WebBackend::start_http1_only("north").await?;
    let fed = Federation::start(Options {
        prefix: "/http-endpoint-http1",
        vip_octet: 116,
        backends: Some([west.addr(), north.addr()]),
        app_protocol: Some("http"),
        endpoint_protocol: Some("http1"),
        east_backend: Some(east.addr()),
        levels: Some(&["east", "west", "north"]),
        ..Options::default()
    })
    .await?;
    let vip = fed.vip;
    fed.write_routes(
        r#"{"schema": 1, "rules": [
        {"name": "west", "match": [{"path": {"prefix": "/west"}}], "destinations": [{"cluster": "west"}]}
    ]}"#,
    )?;
    routed_to(vip, "/west/ready", "west").await;
    let h2 = |path: &str, extra: &[&str]| {
        let url = format!("http://{vip}{path}");
        let mut args = vec![
            "--http2-prior-knowledge",
            "-w",
            "status=%{http_code} http=%{http_version}\n",
        ];
        args.extend_from_slice(extra);
        args.push(&url);
        let (code, out) = curl(&args);
        assert_eq!(code, 0, "curl {path}: {out}");
        assert!(out.contains("status=200 http=2"), "{path}: {out}");
        out
    };
    let authority = format!("authority={vip} ");

    // An h2 client's request to another cluster crosses as HTTP/1.1, marked; the serving
    // gateway sends it on as it crossed, its cookie fields in one (RFC 9113 8.2.3).
    let cookies = ["-H", "cookie: a=1", "-H", "cookie: b=2"];
    let out = h2("/west/a", &cookies);
    assert!(out.contains("cookie=a=1; b=2 "), "{out}");
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("version=HTTP/1.1 "), "{out}");
    assert!(out.contains(&authority), "{out}");
    assert!(
        out.contains("internal=-"),
        "the mark is not passed on: {out}"
    );

    // One that may need trailers crosses as h2; the serving gateway turns it into HTTP/1.1,
    // its `:authority` the Host, its body whole.
    let out = h2(
        "/west/b",
        &[
            "-H",
            "te: trailers",
            "-H",
            "cookie: a=1",
            "-H",
            "cookie: b=2",
            "--data-binary",
            "hello, endpoint",
        ],
    );
    assert!(out.contains("cookie=a=1; b=2 "), "{out}");
    assert_eq!(cluster_of(&out), Some("west"), "{out}");
    assert!(out.contains("method=POST "), "{out}");
    assert!(out.contains("version=HTTP/1.1 "), "{out}");
    assert!(out.contains(&authority), "{out}");
    let digest = body_digest(b"hello, endpoint");
    assert!(out.contains(&format!("body={digest}")), "{out}");

    // Served by east's own endpoint: HTTP/1.1 too.
    let out = h2("/local", &cookies);
    assert!(out.contains("cookie=a=1; b=2 "), "{out}");
    assert_eq!(cluster_of(&out), Some("east"), "{out}");
    assert!(out.contains("version=HTTP/1.1 "), "{out}");
    assert!(out.contains(&authority), "{out}");
    assert!(out.contains("internal=-"), "{out}");

    // An HTTP/1.1 client's request, as before.
    let (code, _, body) = get(vip, "/west/c", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("version=HTTP/1.1 "), "{body}");
    Ok(())
}

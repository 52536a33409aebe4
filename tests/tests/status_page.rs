//! The live status page in a real headless Chromium, against real `meshup gateway` processes
//! on a real etcd: east (the page's gateway, with the gRPC admin API), west and north
//! (each exporting `echo.prod`, each backed by an echo server).
//!
//! The page must load with no console error and no uncaught exception for the whole
//! session, show every cluster of the federation, and show a drill started from the CLI
//! (`meshup drill start --admin ...`) within a few seconds on the page already open — no
//! navigation — and drop it when the drill is stopped.
//!
//! The screenshot goes to the test's temp dir; with `MESHUP_UPDATE_SCREENSHOT=1` it replaces
//! `docs/images/status-page.png` (the picture the docs show).
//!
//! The `meshup` binary must be built (`cargo build --workspace`); a missing binary, etcd or
//! Chromium fails the test, never skips it.

use std::path::PathBuf;
use std::time::Duration;

use meshup_tests::browser::{Browser, eval};
use meshup_tests::gateways::{Certs, GatewayProcess, GatewaySpec};
use meshup_tests::workload::EchoServer;
use meshup_tests::{EtcdServer, eventually_ok, meshup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SERVICE: &str = "echo.prod";
const PORT: u16 = 7300;
/// How soon the open page must show a change: it polls every second.
const PAGE_UPDATE: Duration = Duration::from_secs(5);
/// The committed screenshot may not grow past this.
const MAX_SCREENSHOT_BYTES: usize = 300 * 1024;

/// The text of the elements `selector` finds on the page, one string each.
async fn texts(page: &chromiumoxide::Page, selector: &str) -> anyhow::Result<Vec<String>> {
    let js = format!(
        "Array.from(document.querySelectorAll({}), e => e.textContent)",
        serde_json::to_string(selector)?
    );
    eval(page, &js).await
}

/// The value of attribute `attr` of every element `selector` finds, sorted, duplicates out.
async fn attrs(
    page: &chromiumoxide::Page,
    selector: &str,
    attr: &str,
) -> anyhow::Result<Vec<String>> {
    let js = format!(
        "Array.from(document.querySelectorAll({}), e => e.getAttribute({}))",
        serde_json::to_string(selector)?,
        serde_json::to_string(attr)?
    );
    let mut v: Vec<String> = eval(page, &js).await?;
    v.sort();
    v.dedup();
    Ok(v)
}

fn screenshot_path() -> PathBuf {
    if std::env::var_os("MESHUP_UPDATE_SCREENSHOT").is_some() {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/images/status-page.png")
    } else {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_federation_and_a_drill_live() {
    tokio::time::timeout(Duration::from_secs(180), run())
        .await
        .expect("the status page test finishes within 180s");
}

async fn run() {
    let etcd = tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .expect("etcd");
    let certs = tokio::task::spawn_blocking(|| Certs::new(&["east", "west", "north"]))
        .await
        .expect("certs");
    let west_echo = EchoServer::start().await.expect("west echo");
    let north_echo = EchoServer::start().await.expect("north echo");
    let prefix = "/page";
    let mut east = GatewayProcess::start(GatewaySpec {
        grpc: true,
        ..GatewaySpec::new("east", "127.84.1.0/24", &etcd, &certs, prefix)
    });
    let mut west = GatewayProcess::start(GatewaySpec {
        exports: vec![("echo", "prod", PORT, west_echo.addr())],
        ..GatewaySpec::new("west", "127.84.2.0/24", &etcd, &certs, prefix)
    });
    let mut north = GatewayProcess::start(GatewaySpec {
        exports: vec![("echo", "prod", PORT, north_echo.addr())],
        ..GatewaySpec::new("north", "127.84.3.0/24", &etcd, &certs, prefix)
    });
    east.wait_ready().await;
    west.wait_ready().await;
    north.wait_ready().await;
    let vip = east.wait_routable(SERVICE, PORT).await;

    // Client connections held open through east, so the links carry streams and the page
    // has traffic to show.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = TcpStream::connect(vip)
            .await
            .expect("connect through the VIP");
        c.write_all(b"hello").await.expect("send");
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.expect("echoed");
        assert_eq!(&back, b"hello");
        clients.push(c);
    }

    let mut browser = Browser::launch(1400, 820).await.expect("launch chromium");
    let url = format!("http://{}/", east.admin_addr());
    let page = browser.open(&url).await.expect("open the status page");

    // Every cluster of the federation, in the picture and in the table.
    eventually_ok(
        "the page draws east, north and west",
        Duration::from_secs(10),
        || async {
            let drawn = attrs(&page, "#picture [data-cluster]", "data-cluster").await?;
            let listed = attrs(&page, "#clusters tbody tr[data-cluster]", "data-cluster").await?;
            if drawn == ["east", "north", "west"] && listed == drawn {
                Ok(())
            } else {
                Err(anyhow::anyhow!("drawn {drawn:?}, listed {listed:?}"))
            }
        },
    )
    .await;
    let title: String = eval(&page, "document.title").await.expect("title");
    assert_eq!(title, "meshup — east / east-0");
    // The service, and links that carry the held connections.
    eventually_ok(
        "the page shows echo.prod and the open streams",
        PAGE_UPDATE,
        || async {
            let svc = texts(&page, "#services tr[data-service=\"echo.prod\"]").await?;
            let streams: Vec<u32> = eval(
                &page,
                "Array.from(document.querySelectorAll('#clusters tbody tr td.num:nth-last-child(2)'), e => Number(e.textContent))",
            )
            .await?;
            let total: u32 = streams.iter().sum();
            if svc.len() == 1 && svc[0].contains("west") && svc[0].contains("north") && total == 3 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("service row {svc:?}, streams per link {streams:?}"))
            }
        },
    )
    .await;
    let drills = texts(&page, "#drills tbody tr").await.expect("drills");
    assert_eq!(drills, ["none"], "no drill before one is started");

    // A drill from the CLI reaches the page already open: marked, so a reload would show.
    let _: bool = eval(&page, "(window.meshupTestMarker = true)")
        .await
        .expect("mark the page");
    let renders_before: u64 = eval(&page, "Number(document.body.dataset.renders)")
        .await
        .expect("renders");
    let admin = east
        .grpc_addr()
        .expect("east serves the admin API")
        .to_string();
    let (code, out, err) = meshup(
        &[
            "drill",
            "start",
            "--kind",
            "fail",
            "--cluster",
            "west",
            "--why",
            "game <day>",
            "--who",
            "ana",
            "--for",
            "10m",
            "--id",
            "page-1",
            "--admin",
            &admin,
        ],
        &[],
    );
    assert_eq!(code, 0, "drill start: {out}{err}");
    let row = eventually_ok("the open page shows the drill", PAGE_UPDATE, || async {
        let rows = texts(&page, "#drills tr[data-drill=\"page-1\"]").await?;
        let target = texts(
            &page,
            "#services tr[data-service=\"echo.prod\"] td:nth-child(5) b",
        )
        .await?;
        match (rows.as_slice(), target.as_slice()) {
            ([row], [t]) if t == "north" => Ok(row.clone()),
            _ => Err(anyhow::anyhow!("drill rows {rows:?}, target {target:?}")),
        }
    })
    .await;
    // Names are text: the "<day>" of the reason is shown as typed, not parsed as a tag.
    for part in [
        "page-1",
        "fail",
        "west",
        "every service",
        "ana",
        "game <day>",
    ] {
        assert!(row.contains(part), "{part:?} not in the drill row {row:?}");
    }
    // Ends in 10 minutes: "in 10m 0s" within the second it started, "in 9m 5…s" after.
    assert!(
        row.ends_with("in 10m 0s") || row.contains("in 9m 5"),
        "expiry in {row:?}"
    );
    let marker: bool = eval(&page, "window.meshupTestMarker === true")
        .await
        .expect("marker");
    assert!(marker, "the page was reloaded; it must update in place");
    let renders_after: u64 = eval(&page, "Number(document.body.dataset.renders)")
        .await
        .expect("renders");
    assert!(
        renders_after > renders_before,
        "{renders_before} → {renders_after}"
    );
    let drilled = texts(&page, "#picture [data-cluster=\"west\"] text")
        .await
        .expect("west in the picture");
    assert!(
        drilled.iter().any(|t| t == "fail drill"),
        "the picture marks west: {drilled:?}"
    );

    // The picture for the docs, taken while the drill is on.
    let png = page
        .screenshot(
            chromiumoxide::page::ScreenshotParams::builder()
                .full_page(true)
                .build(),
        )
        .await
        .expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        png.len() < MAX_SCREENSHOT_BYTES,
        "screenshot is {} bytes",
        png.len()
    );
    let path = screenshot_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("screenshot dir");
    }
    std::fs::write(&path, &png).expect("write the screenshot");
    eprintln!("screenshot: {} ({} bytes)", path.display(), png.len());

    // Stopped from the CLI: gone from the open page.
    let (code, out, err) = meshup(
        &["drill", "stop", "page-1", "--who", "ana", "--admin", &admin],
        &[],
    );
    assert_eq!(code, 0, "drill stop: {out}{err}");
    eventually_ok("the open page drops the drill", PAGE_UPDATE, || async {
        let rows = texts(&page, "#drills tbody tr").await?;
        let marks = texts(&page, "#picture [data-cluster=\"west\"] text").await?;
        if rows == ["none"] && !marks.iter().any(|t| t.contains("drill")) {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "drill rows {rows:?}, west in the picture {marks:?}"
            ))
        }
    })
    .await;
    let marker: bool = eval(&page, "window.meshupTestMarker === true")
        .await
        .expect("marker");
    assert!(marker, "the page was reloaded; it must update in place");

    let errors = browser.errors();
    browser.close().await;
    assert!(
        errors.is_empty(),
        "the page reported errors:\n{}",
        errors.join("\n")
    );
    drop(clients);
}

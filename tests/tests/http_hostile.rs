//! A hostile h2 client against the source gateway's `http` VIP port (docs/http-routing.md,
//! "Limits"), with real gateway processes on one etcd: east takes the client, west serves
//! `echo.prod` (the policy's first level) with a backend that counts what reaches it.
//!
//! The client is the `h2` crate's own frame codec driven frame by frame
//! (`meshup_tests::h2_raw`): it ignores the server's SETTINGS, so it can do what a
//! well-behaved client never does.
//!
//! - More concurrent streams than the gateway's 256: exactly the ones past 256 are refused
//!   (RST_STREAM REFUSED_STREAM) and never reach a backend; the first 256 are answered.
//! - Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, again and again. Each connection
//!   is closed with GOAWAY ENHANCE_YOUR_CALM ("too_many_resets", hyper's limit of 64 pending
//!   resets), while an ordinary client is served during and after, and the gateway's memory
//!   stays bounded.
//! - A header list over 64 KiB, and a CONNECT: answered 431 and 501 on their streams, never
//!   reaching a backend; the connection goes on serving.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use h2::Reason;
use h2::frame::Frame;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use meshup_tests::failover::{Federation, Options};
use meshup_tests::h2_raw::{RawH2, describe};
use meshup_tests::hostile::RssWatch;
use meshup_tests::procs::rss_kib;
use meshup_tests::web::WebBackend;

/// The gateway's h2 limits (gateway/src/outbound/http.rs), as a client sees them.
const MAX_STREAMS: usize = 256;
const MAX_HEADER_LIST: usize = 64 * 1024;

/// How long any one frame may take to come.
const FRAME_WAIT: Duration = Duration::from_secs(10);

async fn federation(prefix: &str, octet: u8) -> anyhow::Result<(Federation, WebBackend)> {
    let west = WebBackend::start("west").await?;
    let north = WebBackend::start("north").await?;
    let fed = Federation::start(Options {
        prefix,
        vip_octet: octet,
        backends: Some([west.addr(), north.addr()]),
        app_protocol: Some("http"),
        ..Options::default()
    })
    .await?;
    Ok((fed, west))
}

/// One ordinary HTTP/1.1 GET with curl on a new connection: (status, how long it took).
fn ordinary_get(vip: SocketAddr, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let out = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", &format!("http://{vip}{path}")])
        .output()
        .expect("curl runs (.ci/packages: curl)");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, started.elapsed())
}

/// The `q`-quantile of `samples` (sorted here).
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
    samples.get(i).copied().unwrap_or_default()
}

/// The status of a response HEADERS frame.
fn status(frame: Frame) -> Option<(u32, u16)> {
    match frame {
        Frame::Headers(h) => {
            let id = u32::from(h.stream_id());
            let (pseudo, _) = h.into_parts();
            pseudo.status.map(|s| (id, s.as_u16()))
        }
        _ => None,
    }
}

/// 300 requests opened at once on one connection, none of them finished: the server says
/// 256 in its SETTINGS and refuses exactly the 44 past it, which never reach a backend; the
/// first 256 are routed and answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_limit_are_refused() -> anyhow::Result<()> {
    let (fed, west) = federation("/h2-streams", 106).await?;
    let before = west.answered(Some("POST"));

    let mut h2 = RawH2::connect(fed.vip).await?;
    let mut ids = Vec::new();
    for i in 0..MAX_STREAMS + 44 {
        // POSTs whose bodies never end: each holds its stream open.
        ids.push(
            h2.headers(
                Method::POST,
                &format!("/streams/{i}"),
                HeaderMap::new(),
                false,
            )
            .await?,
        );
    }
    h2.flush().await?;

    let mut advertised = None;
    let mut refused = BTreeSet::new();
    let mut answered = BTreeMap::new();
    let mut other = Vec::new();
    while refused.len() < 44 || answered.len() < MAX_STREAMS {
        let frame = h2.next(FRAME_WAIT).await.map_err(|e| {
            anyhow::anyhow!(
                "{e}: {} refused, {} answered",
                refused.len(),
                answered.len()
            )
        })?;
        match frame {
            None => anyhow::bail!("the gateway closed the connection; other frames: {other:?}"),
            Some(Frame::Settings(s)) if !s.is_ack() => advertised = s.max_concurrent_streams(),
            Some(Frame::Reset(r)) if r.reason() == Reason::REFUSED_STREAM => {
                refused.insert(u32::from(r.stream_id()));
            }
            Some(f @ Frame::Headers(_)) => {
                let (id, code) = status(f).expect("a response");
                answered.insert(id, code);
            }
            Some(Frame::Settings(_) | Frame::WindowUpdate(_) | Frame::Ping(_) | Frame::Data(_)) => {
            }
            // A stream answered before its request ended is closed with NO_ERROR.
            Some(Frame::Reset(r)) if r.reason() == Reason::NO_ERROR => {}
            Some(f) => other.push(describe(&f)),
        }
    }
    assert_eq!(advertised, Some(MAX_STREAMS as u32));
    let past: BTreeSet<u32> = ids[MAX_STREAMS..].iter().copied().collect();
    assert_eq!(
        refused, past,
        "exactly the streams past the limit are refused"
    );
    let first: BTreeMap<u32, u16> = ids[..MAX_STREAMS].iter().map(|&id| (id, 200)).collect();
    assert_eq!(answered, first, "the first 256 are answered 200");
    assert!(other.is_empty(), "unexpected frames: {other:?}");
    assert_eq!(
        west.answered(Some("POST")) - before,
        MAX_STREAMS as u64,
        "no refused stream reached the backend"
    );
    Ok(())
}

/// Rapid reset: on each of 100 connections, HEADERS then RST_STREAM in bursts of 200 pairs
/// until the gateway answers GOAWAY ENHANCE_YOUR_CALM. An ordinary client is served before
/// (the control), during and after; the gateway's RSS is read from /proc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_answered_with_goaway() -> anyhow::Result<()> {
    const CONNECTIONS: usize = 100;
    const BURST: usize = 200;
    const BURSTS: usize = 20;
    let (fed, _west) = federation("/h2-reset", 107).await?;
    let vip = fed.vip;
    let pid = fed.east.pid();

    // Control: the ordinary client alone.
    let mut control: Vec<Duration> = (0..30)
        .map(|_| {
            let (code, took) = ordinary_get(vip, "/control");
            assert_eq!(code, 200, "control request");
            took
        })
        .collect();

    // The ordinary client keeps going in its own thread while the attack runs.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(ordinary_get(vip, "/during"));
            }
            seen
        })
    };

    let baseline = rss_kib(pid)?;
    let watch = RssWatch::start(pid);
    let mut pairs = 0usize;
    let mut after_first_tenth = 0;
    for c in 0..CONNECTIONS {
        let mut h2 = RawH2::connect(vip).await?;
        let mut goaway = None;
        'attack: for _ in 0..BURSTS {
            for _ in 0..BURST {
                let sent = async {
                    let id = h2
                        .headers(Method::GET, "/reset", HeaderMap::new(), false)
                        .await?;
                    h2.reset(id, Reason::CANCEL).await
                };
                if sent.await.is_err() {
                    break 'attack;
                }
                pairs += 1;
            }
            if h2.flush().await.is_err() {
                break;
            }
            while let Some(frame) = h2.try_next() {
                if let Frame::GoAway(g) = frame {
                    goaway = Some(g);
                    break 'attack;
                }
            }
        }
        while goaway.is_none() {
            match h2.next(FRAME_WAIT).await? {
                Some(Frame::GoAway(g)) => goaway = Some(g),
                Some(_) => {}
                None => break,
            }
        }
        let g = goaway.unwrap_or_else(|| panic!("connection {c}: closed without GOAWAY"));
        assert_eq!(
            (g.reason(), g.debug_data().as_ref()),
            (Reason::ENHANCE_YOUR_CALM, &b"too_many_resets"[..]),
            "connection {c}"
        );
        // The first burst is enough: the gateway never took more than one burst's streams.
        assert!(
            u32::from(g.last_stream_id()) < 2 * BURST as u32,
            "connection {c}: streams up to {} were taken",
            u32::from(g.last_stream_id())
        );
        if c + 1 == CONNECTIONS / 10 {
            after_first_tenth = rss_kib(pid)?;
        }
    }
    let peak = watch.peak_kib();
    drop(watch);
    stop.store(true, Ordering::Relaxed);
    let mut during = client.join().expect("the ordinary client");
    let after = rss_kib(pid)?;

    // Served during the attack, every time, and after it.
    assert!(
        during.iter().all(|(code, _)| *code == 200),
        "ordinary requests during the attack: {:?}",
        during.iter().map(|(c, _)| c).collect::<Vec<_>>()
    );
    assert!(
        during.len() >= 3,
        "only {} ordinary requests during the attack",
        during.len()
    );
    for _ in 0..10 {
        assert_eq!(ordinary_get(vip, "/after").0, 200, "after the attack");
    }
    let mut during: Vec<Duration> = during.drain(..).map(|(_, t)| t).collect();
    println!(
        "rapid reset: {pairs} HEADERS+RST_STREAM pairs written on {CONNECTIONS} connections, each closed with GOAWAY; \
         ordinary client p50/p99 {:?}/{:?} alone, {:?}/{:?} during ({} requests); \
         RSS {baseline} KiB before, {after_first_tenth} after {} connections, peak {peak}, {after} after",
        quantile(&mut control, 0.5),
        quantile(&mut control, 0.99),
        quantile(&mut during, 0.5),
        quantile(&mut during, 0.99),
        during.len(),
        CONNECTIONS / 10,
    );
    // Bounded memory: what the first tenth of the connections took is not taken again by
    // the other nine tenths (each connection's memory goes with it).
    assert!(
        after <= after_first_tenth + 8 * 1024,
        "RSS grew from {after_first_tenth} KiB to {after} KiB over the last {} connections",
        CONNECTIONS - CONNECTIONS / 10
    );
    assert!(
        peak <= baseline + 64 * 1024,
        "RSS peaked at {peak} KiB from {baseline} KiB"
    );
    Ok(())
}

/// A request whose header list is over 64 KiB is answered 431 on its stream and a CONNECT
/// (RFC 9113 §8.5: `:authority` alone) 501; neither reaches a backend, and the connection
/// stays up and serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_lists_over_the_limit_and_connect_are_refused_on_their_stream() -> anyhow::Result<()>
{
    let (fed, west) = federation("/h2-headers", 108).await?;
    let mut h2 = RawH2::connect(fed.vip).await?;
    let before = west.answered(None);

    // 70 headers of 1,000 bytes: 70 KiB and more once each entry's 32 bytes count.
    let mut big = HeaderMap::new();
    for i in 0..70 {
        big.insert(
            HeaderName::from_bytes(format!("x-pad-{i:02}").as_bytes())?,
            HeaderValue::from_str(&"a".repeat(1000))?,
        );
    }
    let size: usize = big
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum();
    assert!(size > MAX_HEADER_LIST, "{size}");

    let small = h2
        .headers(Method::GET, "/small", HeaderMap::new(), true)
        .await?;
    let large = h2.headers(Method::GET, "/large", big, true).await?;
    // The h2 crate leaves `:scheme` and `:path` out of a CONNECT without `:protocol`.
    let connect = h2
        .headers(Method::CONNECT, "/", HeaderMap::new(), false)
        .await?;
    let next = h2
        .headers(Method::GET, "/after", HeaderMap::new(), true)
        .await?;
    h2.flush().await?;

    let mut answers = BTreeMap::new();
    let mut other = Vec::new();
    while answers.len() < 4 {
        match h2.next(FRAME_WAIT).await? {
            None => anyhow::bail!("the gateway closed the connection; got {answers:?} {other:?}"),
            Some(f @ Frame::Headers(_)) => {
                let (id, code) = status(f).expect("a response");
                answers.insert(id, code);
            }
            Some(Frame::Settings(_) | Frame::WindowUpdate(_) | Frame::Ping(_) | Frame::Data(_)) => {
            }
            // The refused stream may also be reset after its 431.
            Some(Frame::Reset(r)) if [large, connect].contains(&u32::from(r.stream_id())) => {}
            Some(f) => other.push(describe(&f)),
        }
    }
    assert_eq!(
        answers,
        BTreeMap::from([(small, 200), (large, 431), (connect, 501), (next, 200)])
    );
    assert!(other.is_empty(), "unexpected frames: {other:?}");
    assert_eq!(
        west.answered(None) - before,
        2,
        "neither the 431 nor the CONNECT reached the backend"
    );
    Ok(())
}

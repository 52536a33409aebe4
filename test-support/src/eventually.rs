//! Poll a condition until it holds, instead of sleeping and hoping.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `true`; panics with `what` after `timeout`. Returns how long
/// the condition took to hold (a test may print or bound it).
pub async fn assert_eventually<F, Fut>(what: &str, timeout: Duration, check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    assert!(
        poll_until(timeout, check).await,
        "condition not met within {timeout:?}: {what}"
    );
    start.elapsed()
}

/// Polls `check` until it returns `Ok`, and returns that value; panics after `timeout` with
/// `what` and the last error, so the failure message shows the state that was wrong.
pub async fn eventually_ok<T, E, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(e) if Instant::now() >= deadline => {
                panic!("condition not met within {timeout:?}: {what}; last state: {e:?}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Polls `check` until it returns `true` or `timeout` passes; whether it held. For waits
/// whose failure the caller reports itself (with figures gathered meanwhile).
pub async fn poll_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `check` every `every` on this thread until it returns `true` (the instant it did)
/// or `timeout` passes (`None`). For timing loops that poll faster than [`POLL_INTERVAL`]
/// and run on a thread of their own (`spawn_blocking`), such as the scale benchmark's.
pub fn poll_every(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> bool,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

//! Background observers of a running federation: a thread that samples something every
//! interval (a DNS answer, a metric, the services an admin page lists, the catalog keys in
//! etcd) and keeps every sample with the instant it was taken, so a fault test can say
//! afterwards what was seen before, during and after the fault, and for how long.
//!
//! The sampling runs on its own OS thread, not on the test's tokio runtime: the probes are
//! blocking (a `dig` or `etcdctl` process, a blocking HTTP GET) and must keep their pace
//! while the runtime is busy with the workload.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One sample: when it was taken (just before the probe ran) and what the probe returned.
pub type Sample<T> = (Instant, T);

/// A thread calling a probe every `interval` until stopped or dropped.
#[derive(Debug)]
pub struct Sampler<T> {
    samples: Arc<Mutex<Vec<Sample<T>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<T: Send + Clone + 'static> Sampler<T> {
    /// Starts sampling at once. A probe slower than `interval` sets the pace itself (no
    /// burst to catch up).
    pub fn start(interval: Duration, mut probe: impl FnMut() -> T + Send + 'static) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let value = probe();
                    samples.lock().expect("sample list lock").push((at, value));
                    let next = at + interval;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        };
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The samples so far, oldest first.
    pub fn samples(&self) -> Vec<Sample<T>> {
        self.samples.lock().expect("sample list lock").clone()
    }

    /// The first sample taken at or after `from` that satisfies `pred`: when it was taken.
    pub fn first_since(&self, from: Instant, pred: impl Fn(&T) -> bool) -> Option<Instant> {
        self.samples
            .lock()
            .expect("sample list lock")
            .iter()
            .find(|(at, v)| *at >= from && pred(v))
            .map(|(at, _)| *at)
    }

    /// Stops the thread (after the probe running now) and returns every sample.
    pub fn stop(mut self) -> Vec<Sample<T>> {
        self.halt();
        self.samples()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<T> Drop for Sampler<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Not joined: a drop during a panic must not wait for a hung probe.
    }
}

/// `dig` for `name` at `server` every `interval`: every answer, or why there was none.
pub fn dig_loop(
    server: SocketAddr,
    name: &str,
    interval: Duration,
) -> Sampler<Result<Vec<IpAddr>, String>> {
    let name = name.to_owned();
    Sampler::start(interval, move || {
        crate::gateways::dig(server, &name).map_err(|e| format!("{e:#}"))
    })
}

/// The longest stretch in which a condition was seen false: from the first sample that
/// says `Some(false)` to the next one that says `Some(true)` (or the last sample, if none
/// did). `None` samples (the probe could not tell, e.g. etcd had no leader to read from)
/// neither end nor start a stretch. Zero when it was never seen false.
pub fn longest_false<T>(samples: &[Sample<T>], seen: impl Fn(&T) -> Option<bool>) -> Duration {
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    let mut last = None;
    for (at, value) in samples {
        last = Some(*at);
        match seen(value) {
            Some(false) => {
                since.get_or_insert(*at);
            }
            Some(true) => {
                if let Some(from) = since.take() {
                    longest = longest.max(*at - from);
                }
            }
            None => {}
        }
    }
    if let (Some(from), Some(last)) = (since, last) {
        longest = longest.max(last - from);
    }
    longest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_false_stretch_runs_from_the_first_false_to_the_next_true() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let s = |v: &[(u64, Option<bool>)]| -> Vec<Sample<Option<bool>>> {
            v.iter().map(|(ms, b)| (at(*ms), *b)).collect()
        };
        type Case<'a> = (&'a [(u64, Option<bool>)], u64);
        let cases: &[Case] = &[
            (&[], 0),
            (&[(0, Some(true)), (100, Some(true))], 0),
            // False at 100 and 200, true at 400: 300 ms.
            (
                &[
                    (0, Some(true)),
                    (100, Some(false)),
                    (200, Some(false)),
                    (400, Some(true)),
                ],
                300,
            ),
            // Unknown samples neither start nor end a stretch.
            (
                &[
                    (0, Some(true)),
                    (100, None),
                    (200, Some(false)),
                    (300, None),
                    (900, Some(true)),
                ],
                700,
            ),
            // Still false at the end: until the last sample.
            (&[(0, Some(false)), (500, Some(false))], 500),
            // Two stretches: the longer wins.
            (
                &[
                    (0, Some(false)),
                    (100, Some(true)),
                    (200, Some(false)),
                    (600, Some(true)),
                ],
                400,
            ),
        ];
        for (samples, want) in cases {
            assert_eq!(
                longest_false(&s(samples), |v| *v),
                Duration::from_millis(*want),
                "{samples:?}"
            );
        }
    }

    #[test]
    fn a_sampler_keeps_every_sample_in_order_and_stops() {
        let mut n = 0u32;
        let sampler = Sampler::start(Duration::from_millis(1), move || {
            n += 1;
            n
        });
        let from = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sampler.first_since(from, |v| *v >= 5).is_none() {
            assert!(Instant::now() < deadline, "no fifth sample");
            std::thread::sleep(Duration::from_millis(1));
        }
        let samples = sampler.stop();
        let values: Vec<u32> = samples.iter().map(|s| s.1).collect();
        assert_eq!(values, (1..=values.len() as u32).collect::<Vec<_>>());
        assert!(samples.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}

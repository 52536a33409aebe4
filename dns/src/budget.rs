//! A budget of error answers per second, the way BIND's and Knot's response-rate limiting
//! treat errors (`errors-per-second`): a UDP query a legitimate client sends is never
//! malformed, so FORMERR answers are rare unless someone floods the port with junk, and
//! then each answer costs the server a send (on loopback, the whole delivery to the
//! sender's socket too) and gives the sender nothing. Beyond the budget the junk is
//! dropped unanswered, which keeps the worker's time for the queries that matter.
//!
//! Pure: a token bucket driven by the caller's clock, table-tested below.

use std::time::{Duration, Instant};

/// Error answers allowed per second per UDP worker, and the burst the bucket holds.
pub const ERRORS_PER_SECOND: u32 = 1_000;

/// A token bucket: `rate` tokens a second, at most `rate` held.
#[derive(Debug, Clone)]
pub struct ErrorBudget {
    rate: u32,
    tokens: f64,
    last: Instant,
}

impl ErrorBudget {
    /// A full bucket at `now`.
    pub fn new(rate: u32, now: Instant) -> Self {
        Self {
            rate,
            tokens: f64::from(rate),
            last: now,
        }
    }

    /// Whether one more error answer may be sent at `now` (and takes its token if so).
    /// A clock that goes backwards adds nothing.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        if elapsed > Duration::ZERO {
            self.tokens = (self.tokens + elapsed.as_secs_f64() * f64::from(self.rate))
                .min(f64::from(self.rate));
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_beyond_the_rate_are_dropped_and_the_budget_refills_with_time() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // (at, asks, allowed) in sequence on one bucket of 10 a second.
        let steps: [(Instant, usize, usize); 6] = [
            // A full bucket: the burst is the rate.
            (ms(0), 15, 10),
            // Empty: nothing until time passes.
            (ms(0), 3, 0),
            // 100 ms = 1 token.
            (ms(100), 3, 1),
            // 10 s idle refills only up to the rate.
            (ms(10_100), 20, 10),
            // The clock going back gives nothing.
            (ms(5_000), 2, 0),
            // 250 ms after the newest time seen: 2.5 tokens, 2 usable.
            (ms(10_350), 5, 2),
        ];
        let mut budget = ErrorBudget::new(10, t0);
        for (i, (at, asks, allowed)) in steps.into_iter().enumerate() {
            let got = (0..asks).filter(|_| budget.allow(at)).count();
            assert_eq!(got, allowed, "step {i}");
        }
    }
}

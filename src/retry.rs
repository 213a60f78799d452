//! Retry policy (rules layer): exponential backoff with jitter, and the marketplace's `Retry-After`.
//!
//! The emitter retries transient marketplace failures and the alert delivery retries its webhook with the same
//! arithmetic; only the bounds differ.

use backon::BackoffBuilder;
use chrono::Duration;

/// The bounds of a backoff sequence.
#[derive(Debug, Clone, Copy)]
pub struct RetryDelays {
    /// First delay.
    pub min: std::time::Duration,
    /// Largest delay.
    pub max: std::time::Duration,
}

/// The bounds of the alert webhook's retries.
pub const ALERT_DELIVERY: RetryDelays = RetryDelays {
    min: std::time::Duration::from_secs(5),
    max: std::time::Duration::from_secs(600),
};

impl RetryDelays {
    /// Delay before the retry that follows attempt number `attempts`, as a chrono duration.
    pub fn after(&self, attempts: i64) -> Duration {
        Duration::from_std(backoff_delay(attempts, *self)).unwrap_or(Duration::seconds(60))
    }

    /// Delay before the retry that follows attempt number `attempts` when the answer may carry a `Retry-After`:
    /// the marketplace's delay wins (at least one second), else the backoff.
    pub fn after_answer(
        &self,
        attempts: i64,
        retry_after: Option<std::time::Duration>,
    ) -> Duration {
        let delay = self.after(attempts);
        match retry_after {
            Some(ra) => Duration::from_std(ra)
                .unwrap_or(delay)
                .max(Duration::seconds(1)),
            None => delay,
        }
    }
}

/// The delay before retry number `attempts` (1-based): exponential from `min`, doubling, at most `max`, jittered
/// (backon computes the sequence).
pub fn backoff_delay(attempts: i64, delays: RetryDelays) -> std::time::Duration {
    let mut it = backon::ExponentialBuilder::default()
        .with_min_delay(delays.min)
        .with_max_delay(delays.max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build();
    let n = attempts.clamp(1, 64) as usize;
    it.nth(n - 1).unwrap_or(delays.max)
}

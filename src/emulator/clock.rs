//! The emulator's own clock: a base clock (the wall clock, or one a test injects) plus an offset the admin API moves.
//!
//! Token expiry, the 24-hour window and `messageTime` all read this clock, so a test can shift the marketplace two
//! hours ahead without touching the daemon's clock, or the other way round.

use crate::clock::{Clock, SharedClock, SystemClock};
use chrono::{DateTime, Duration, Utc};
use std::sync::{Arc, Mutex};

/// A base clock shifted by an adjustable offset.
#[derive(Debug)]
pub(crate) struct EmulatorClock {
    base: SharedClock,
    offset: Mutex<Duration>,
}

impl EmulatorClock {
    /// A clock reading `base` (the wall clock when `None`), not shifted.
    pub(crate) fn new(base: Option<SharedClock>) -> Self {
        Self {
            base: base.unwrap_or_else(|| Arc::new(SystemClock)),
            offset: Mutex::new(Duration::zero()),
        }
    }

    /// Moves the clock by `by` (negative: back).
    pub(crate) fn shift(&self, by: Duration) {
        *self.lock() += by;
    }

    /// Makes `now()` return `at` at this instant.
    pub(crate) fn set(&self, at: DateTime<Utc>) {
        *self.lock() = at - self.base.now();
    }

    /// Back to the base clock.
    pub(crate) fn reset(&self) {
        *self.lock() = Duration::zero();
    }

    /// The current offset from the base clock.
    pub(crate) fn offset(&self) -> Duration {
        *self.lock()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Duration> {
        // A poisoned offset is still a valid Duration.
        self.offset.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for EmulatorClock {
    fn now(&self) -> DateTime<Utc> {
        self.base.now() + self.offset()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn shift_and_set_apply_on_top_of_the_base() {
        let t0 = DateTime::parse_from_rfc3339("2026-03-10T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let base = ManualClock::new(t0);
        let clock = EmulatorClock::new(Some(Arc::new(base.clone())));
        clock.shift(Duration::hours(2));
        assert_eq!(clock.now(), t0 + Duration::hours(2));
        base.advance(Duration::minutes(1));
        assert_eq!(clock.now(), t0 + Duration::minutes(121));
        clock.set(t0);
        assert_eq!(clock.now(), t0);
        clock.reset();
        assert_eq!(clock.now(), t0 + Duration::minutes(1));
    }
}

//! Time as a value passed in: the daemon uses [`SystemClock`], tests use [`ManualClock`].
//!
//! meterd never reads local time. Every decision that depends on "now" (closing an hour, the 24-hour window, retry
//! deadlines, token expiry) asks a [`Clock`], so tests move time by hand instead of sleeping.
//!
//! The hour math lives here too: meterd counts in UTC hours kept as unix seconds ([`hour_of`], [`HOUR`]) and
//! prints instants one way ([`fmt_time`]).

use chrono::{DateTime, Duration, Utc};
use std::sync::{Arc, Mutex};

/// Seconds in an hour.
pub const HOUR: i64 = 3600;

/// The start of the UTC hour holding `t`, in unix seconds.
pub fn hour_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(HOUR) * HOUR
}

/// Unix seconds to a UTC instant.
pub fn to_utc(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or_default()
}

/// RFC 3339 with `Z`, seconds precision.
pub fn fmt_time(secs: i64) -> String {
    to_utc(secs).format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A source of the current UTC instant.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current instant, in UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    /// A clock stopped at `now`.
    pub fn new(now: DateTime<Utc>) -> Self {
        Self {
            now: Arc::new(Mutex::new(now)),
        }
    }

    /// Sets the clock to `now` (it may move backwards: tests of clock steps rely on that).
    pub fn set(&self, now: DateTime<Utc>) {
        *self.now.lock().expect("clock lock") = now;
    }

    /// Moves the clock by `by` (negative moves it back).
    pub fn advance(&self, by: Duration) {
        let mut guard = self.now.lock().expect("clock lock");
        *guard += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().expect("clock lock")
    }
}

/// A clock that runs with the wall clock but shifted by a fixed offset (the emulator's "shift the clock").
#[derive(Debug)]
pub struct OffsetClock {
    offset: Mutex<Duration>,
}

impl OffsetClock {
    /// A clock `offset` ahead of the wall clock (negative: behind).
    pub fn new(offset: Duration) -> Self {
        Self {
            offset: Mutex::new(offset),
        }
    }

    /// Adds `by` to the offset.
    pub fn shift(&self, by: Duration) {
        *self.offset.lock().expect("clock lock") += by;
    }

    /// Sets the offset so that `now()` returns `at` right now.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.offset.lock().expect("clock lock") = at - Utc::now();
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + *self.offset.lock().expect("clock lock")
    }
}

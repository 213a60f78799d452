//! Operations: liveness of the daemon's moving parts (health probes and the systemd watchdog read it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Last signs of life of the scheduler, which `/healthz` and the watchdog check.
#[derive(Debug)]
pub struct Liveness {
    scheduler_tick: Mutex<Option<Instant>>,
    /// How stale a scheduler tick may be before the daemon counts as unhealthy.
    pub max_tick_age: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            scheduler_tick: Mutex::new(None),
            max_tick_age: Duration::from_secs(120),
        }
    }
}

impl Liveness {
    /// Called by the scheduler's heartbeat.
    pub fn tick(&self) {
        *self.scheduler_tick.lock().expect("liveness lock") = Some(Instant::now());
    }

    /// `Ok` when the scheduler ticked recently (or no scheduler runs), else why not.
    pub fn scheduler_ok(&self) -> Result<(), String> {
        match *self.scheduler_tick.lock().expect("liveness lock") {
            None => Ok(()),
            Some(t) if t.elapsed() <= self.max_tick_age => Ok(()),
            Some(t) => Err(format!(
                "scheduler last ticked {}s ago",
                t.elapsed().as_secs()
            )),
        }
    }
}

//! Operations: liveness of the daemon's moving parts (health probes and the systemd watchdog read it), the
//! systemd notify protocol (`READY=1`, `WATCHDOG=1`, `STATUS=`, `STOPPING=1`), socket activation
//! ([`activation`]), Prometheus metrics ([`metrics`]) and typed telemetry ([`telemetry`]).

pub mod activation;
pub mod metrics;
pub mod telemetry;

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

/// Tells systemd the daemon is ready (journal open, migrations run, listener bound). No-op outside systemd.
pub fn notify_ready() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("ready; first pass under way"),
    ]);
}

/// Tells systemd the daemon is stopping.
pub fn notify_stopping() {
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping: draining ingest, final pass"),
    ]);
}

/// `STATUS=` after each pass (the line the emitter's pass summary prints: pending count and when it ran).
pub fn notify_status(line: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(line)]);
}

/// Pings the systemd watchdog at half its interval, but only while the journal writer answers and the scheduler
/// ticks: a wedged daemon stops pinging and systemd restarts it.
pub fn spawn_watchdog(
    journal: crate::journal::Journal,
    liveness: std::sync::Arc<Liveness>,
    env: &std::collections::BTreeMap<String, String>,
) -> Option<tokio::task::JoinHandle<()>> {
    let usec: u64 = env.get("WATCHDOG_USEC")?.parse().ok()?;
    if let Some(pid) = env.get("WATCHDOG_PID").and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        loop {
            let writer_ok = matches!(
                tokio::time::timeout(every, journal.ping()).await,
                Ok(Ok(()))
                    | Ok(Err(crate::journal::JournalError::Full { .. }))
                    | Ok(Err(crate::journal::JournalError::ReadOnly { .. }))
            );
            match (writer_ok, liveness.scheduler_ok()) {
                (true, Ok(())) => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                (w, s) => tracing::error!(
                    message = "Liveness check failed; not pinging the watchdog.",
                    writer_ok = w,
                    scheduler = %s.err().unwrap_or_default()
                ),
            }
            tokio::time::sleep(every).await;
        }
    }))
}

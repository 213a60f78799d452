//! Prometheus metrics: the recorder, every metric's `# HELP` (in one place, [`describe`]), and the gauges read
//! from the journal (pending events, oldest pending age, time to the nearest expiry, events per outcome).
//!
//! Counters and histograms are recorded where things happen (`metrics::counter!` in ingest, journal, emit and
//! marketplace). The journal gauges are refreshed by [`spawn_journal_gauges`] (every 15 s and after each pass);
//! the two time-based gauges are recomputed from absolute timestamps at every scrape, so they are exact even
//! between refreshes.

use crate::clock::SharedClock;
use crate::journal::reads::Reads;
use crate::outcome::Outcome;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the journal gauges are refreshed when no pass asks for it.
pub const REFRESH_EVERY: Duration = Duration::from_secs(15);

/// Reported as `meterd_nearest_expiry_seconds` when nothing is pending: no event can be closer to its
/// deadline than a whole marketplace window, so `< N` alerts need no extra condition.
pub const NO_PENDING_EXPIRY_SECONDS: f64 = 86_400.0;

/// Registers `# HELP` (and units) for every metric meterd emits. Called once when the recorder is installed.
pub fn describe() {
    // Ingest.
    describe_counter!(
        "meterd_ingest_requests_total",
        "Ingest requests (POST /v1/usage, POST /api/v1/events) by result: accepted, late, invalid, unauthorized, unavailable."
    );
    describe_counter!(
        "meterd_ingest_records_total",
        "Usage records received by result: accepted (new), duplicate (idempotency key seen), carried (moved to the open hour), rejected (late, reject policy)."
    );
    // Journal.
    describe_histogram!(
        "meterd_journal_commit_seconds",
        Unit::Seconds,
        "Duration of one group commit (synchronous=FULL) of the journal writer."
    );
    describe_histogram!(
        "meterd_journal_commit_jobs",
        Unit::Count,
        "Write jobs (ingest requests, emitter updates) sharing one group commit."
    );
    describe_histogram!(
        "meterd_journal_sync_seconds",
        Unit::Seconds,
        "Duration of the COMMIT statement alone of a group commit (the WAL fsync, and a WAL checkpoint when one runs in it)."
    );
    describe_gauge!(
        "meterd_journal_records",
        Unit::Count,
        "Raw usage records kept in the journal (for deduplication)."
    );
    // Emission.
    describe_gauge!(
        "meterd_pending_events",
        Unit::Count,
        "Outbound hourly events frozen and not yet settled (waiting to be sent or retried)."
    );
    describe_gauge!(
        "meterd_oldest_pending_age_seconds",
        Unit::Seconds,
        "Seconds since the end of the hour of the oldest pending event (0 when nothing is pending). The marketplace accepts an hour for 24 h."
    );
    describe_gauge!(
        "meterd_nearest_expiry_seconds",
        Unit::Seconds,
        "Seconds until the nearest pending event stops being retried and expires (86400 when nothing is pending)."
    );
    describe_gauge!(
        "meterd_journal_events",
        Unit::Count,
        "Outbound hourly events in the journal by outcome (pending, accepted, duplicate, duplicate_mismatch, expired, expired_unconfirmed, rejected, skipped_unsubscribed, not_active, carried)."
    );
    describe_gauge!(
        "meterd_last_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time when the marketplace last accepted (or confirmed as duplicate) an event; 0 if never."
    );
    describe_counter!(
        "meterd_events_total",
        "Outcomes written to outbound events by this process, by outcome (terminal outcomes, and retry/held/deferred for events still pending)."
    );
    describe_histogram!(
        "meterd_emit_pass_seconds",
        Unit::Seconds,
        "Duration of one emission pass (freeze closed hours, refresh subscriptions, send, record outcomes)."
    );
    describe_histogram!(
        "meterd_emit_wait_seconds",
        Unit::Seconds,
        "What an emission call slot waited for before its call, by on: journal (the commit marking its batch in flight, with the last call's answers), queue (the next batch)."
    );
    describe_histogram!(
        "meterd_emit_producer_seconds",
        Unit::Seconds,
        "Steps of an emission pass's producer, by step: page (read due events), dispose (bill and write bodies), freeze (a freeze chunk), queue (waiting for room on the senders' queue)."
    );
    // Marketplace.
    describe_counter!(
        "meterd_marketplace_calls_total",
        "Marketplace API calls by call and HTTP status (or network/timeout)."
    );
    describe_histogram!(
        "meterd_marketplace_call_seconds",
        Unit::Seconds,
        "Duration of marketplace API calls by call."
    );
    describe_counter!(
        "meterd_subscription_refreshes_total",
        "Refreshes of the SaaS subscription list by result (ok, error)."
    );
    describe_histogram!(
        "meterd_subscription_refresh_seconds",
        Unit::Seconds,
        "Duration of a full (all pages) subscription list refresh."
    );
    // Fleet emission (docs/fleet.md).
    describe_counter!(
        "meterd_fleet_stale_settles_total",
        "Fleet mode: settles refused because this replica's lease on the event had passed to another replica (nothing changed)."
    );
    describe_counter!(
        "meterd_fleet_leases_lost_total",
        "Fleet mode: calls not made because the lease on one of their events was lost before the call."
    );
    describe_gauge!(
        "meterd_fleet_clock_ahead_seconds",
        Unit::Seconds,
        "Fleet mode: how far this host's clock was ahead of the fleet PostgreSQL's at the last freeze (0 when not ahead); while ahead, hours are closed by the database's clock."
    );
    // Billing policy and alerts.
    describe_counter!(
        "meterd_thresholds_crossed_total",
        "Consumption thresholds crossed (each raises a `threshold` alert once per term), by dimension."
    );
    describe_counter!(
        "meterd_pool_thresholds_crossed_total",
        "Credit pool thresholds crossed (80% of a period, exhausted; each raises a `pool_threshold` alert once per pool and period), by dimension."
    );
    describe_counter!(
        "meterd_alerts_total",
        "Alerts raised (written to the journal for webhook delivery) by kind, e.g. threshold, duplicate_mismatch."
    );
    describe_counter!(
        "meterd_webhook_deliveries_total",
        "Alert webhook delivery attempts by result (delivered, failed; failed ones are retried)."
    );
    // Fleet (docs/fleet.md).
    describe_gauge!(
        "meterd_fleet_unforwarded_records",
        Unit::Count,
        "Fleet mode: records acknowledged by this replica and not yet in the shared PostgreSQL journal."
    );
    describe_gauge!(
        "meterd_fleet_forward_lag_seconds",
        Unit::Seconds,
        "Fleet mode: age of the oldest record not yet forwarded to PostgreSQL (0 when the outbox is empty)."
    );
    describe_counter!(
        "meterd_fleet_forwarded_records_total",
        "Fleet mode: records forwarded to PostgreSQL by result (inserted, duplicate, carried)."
    );
    describe_counter!(
        "meterd_fleet_forward_errors_total",
        "Fleet mode: failed forward or heartbeat attempts (PostgreSQL unreachable or refusing); each is retried."
    );
    describe_counter!(
        "meterd_fleet_retention_deleted_total",
        "Fleet mode: rows the shared journal's retention deleted (events, hourly_totals, records, carries, alerts)."
    );
    describe_counter!(
        "meterd_token_refreshes_total",
        "Access token fetches from Entra ID / managed identity by result (ok, error); an error while a cached token is still valid keeps serving it."
    );
}

/// Installs the Prometheus recorder (once per process), describes every metric, and returns the handle.
pub fn install() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .ok()?
                .set_buckets_for_metric(
                    Matcher::Full("meterd_journal_commit_jobs".into()),
                    &[
                        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
                    ],
                )
                .ok()?
                .install_recorder()
                .ok()?;
            INSTALLED.store(true, std::sync::atomic::Ordering::Release);
            describe();
            Some(handle)
        })
        .clone()
}

/// The journal figures behind the gauges, with absolute times so scrapes can compute ages exactly.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JournalFigures {
    /// Pending outbound events.
    pub pending: i64,
    /// Unix time of the end of the oldest pending event's hour.
    pub oldest_pending_hour_end: Option<i64>,
    /// Unix time of the nearest pending deadline.
    pub nearest_deadline: Option<i64>,
    /// Events per outcome.
    pub outcomes: BTreeMap<String, i64>,
    /// Raw records kept.
    pub records: i64,
    /// Unix time of the last success.
    pub last_success: Option<i64>,
}

impl JournalFigures {
    /// From `journal::status::status` taken at `now`.
    pub fn from_status(s: &crate::journal::status::JournalStatus, now: i64) -> Self {
        JournalFigures {
            pending: s.pending_events,
            oldest_pending_hour_end: s.oldest_pending_age_seconds.map(|a| now - a),
            nearest_deadline: s.nearest_expiry_seconds.map(|e| now + e),
            outcomes: s.outcomes.clone(),
            records: s.records,
            last_success: s
                .last_success
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp()),
        }
    }

    /// Writes the gauges for the time `now` (unix seconds).
    pub fn publish(&self, now: i64) {
        metrics::gauge!("meterd_pending_events").set(self.pending as f64);
        let age = match (self.pending, self.oldest_pending_hour_end) {
            (p, Some(end)) if p > 0 => (now - end).max(0) as f64,
            _ => 0.0,
        };
        metrics::gauge!("meterd_oldest_pending_age_seconds").set(age);
        let expiry = match (self.pending, self.nearest_deadline) {
            (p, Some(d)) if p > 0 => (d - now) as f64,
            _ => NO_PENDING_EXPIRY_SECONDS,
        };
        metrics::gauge!("meterd_nearest_expiry_seconds").set(expiry);
        // Every outcome is written, zero included, so alert expressions never meet a missing series.
        for outcome in Outcome::ALL {
            let n = self.outcomes.get(outcome.as_str()).copied().unwrap_or(0);
            metrics::gauge!("meterd_journal_events", "outcome" => outcome.as_str()).set(n as f64);
        }
        for (outcome, n) in &self.outcomes {
            if Outcome::parse(outcome).is_none() {
                metrics::gauge!("meterd_journal_events", "outcome" => outcome.clone())
                    .set(*n as f64);
            }
        }
        metrics::gauge!("meterd_journal_records").set(self.records as f64);
        metrics::gauge!("meterd_last_success_timestamp_seconds")
            .set(self.last_success.unwrap_or(0) as f64);
    }
}

/// Shared latest journal figures and a way to ask for a refresh.
#[derive(Debug, Default)]
pub struct JournalGauges {
    figures: Mutex<Option<JournalFigures>>,
    refresh: tokio::sync::Notify,
}

impl JournalGauges {
    /// Asks the refresher to read the journal now (after a pass, or on a scrape).
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// Writes the gauges from the latest figures, ages computed at `now`.
    pub fn publish(&self, now: i64) {
        if let Some(f) = self
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            f.publish(now);
        }
    }

    /// Reads the journal once and publishes.
    pub async fn refresh(&self, journal: &Reads, clock: &SharedClock) {
        let now = clock.now();
        match journal.status(now).await {
            Ok((s, _)) => {
                let f = JournalFigures::from_status(&s, now.timestamp());
                f.publish(clock.now().timestamp());
                *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
            }
            Err(e) => {
                tracing::debug!(message = "Cannot read journal figures for metrics.", error = %e)
            }
        }
    }
}

/// Refreshes the journal gauges every [`REFRESH_EVERY`] and whenever [`JournalGauges::request_refresh`] is
/// called (after each pass, on each scrape). Ends when `stop` turns true.
pub fn spawn_journal_gauges(
    gauges: Arc<JournalGauges>,
    journal: Reads,
    clock: SharedClock,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // The first read waits for the startup pass (which asks for it) or a scrape, so it does not compete
        // with the startup catch-up pass.
        loop {
            tokio::select! {
                _ = stop.wait_for(|v| *v) => break,
                _ = gauges.refresh.notified() => {}
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
            gauges.refresh(&journal, &clock).await;
        }
    })
}

/// Set once [`install`] has made meterd's recorder the process's global recorder: from then on a metric handle
/// registered once stays the one `metrics::counter!` would look up on every call.
static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The four counters an accepted ingest request adds to, registered once (issue 15: four `metrics::counter!`
/// lookups per request, each hashing its name and labels into the registry).
struct IngestCounters {
    records_accepted: metrics::Counter,
    records_duplicate: metrics::Counter,
    records_carried: metrics::Counter,
    requests_accepted: metrics::Counter,
}

impl IngestCounters {
    /// The counters as `metrics::counter!` finds them in the current recorder.
    fn look_up() -> IngestCounters {
        IngestCounters {
            records_accepted: metrics::counter!("meterd_ingest_records_total", "result" => "accepted"),
            records_duplicate: metrics::counter!("meterd_ingest_records_total", "result" => "duplicate"),
            records_carried: metrics::counter!("meterd_ingest_records_total", "result" => "carried"),
            requests_accepted: metrics::counter!("meterd_ingest_requests_total", "result" => "accepted"),
        }
    }
}

/// Counts an accepted ingest request and its records (`meterd_ingest_records_total` by accepted, duplicate and
/// carried, then `meterd_ingest_requests_total{result="accepted"}`). With meterd's recorder installed the handles
/// are registered at the first accepted request (so the series appear when they did before, at the first
/// request) and kept; otherwise (no recorder, or another one) each call looks them up, as the macros do.
pub fn ingest_accepted(accepted: u64, duplicates: u64, carried: u64) {
    static KEPT: std::sync::OnceLock<IngestCounters> = std::sync::OnceLock::new();
    let looked_up;
    let c = if INSTALLED.load(std::sync::atomic::Ordering::Acquire) {
        KEPT.get_or_init(IngestCounters::look_up)
    } else {
        looked_up = IngestCounters::look_up();
        &looked_up
    };
    c.records_accepted.increment(accepted);
    c.records_duplicate.increment(duplicates);
    c.records_carried.increment(carried);
    c.requests_accepted.increment(1);
}

/// The `/metrics` renderer: recomputes the time-based gauges at `clock.now()`, then renders. `None` when the
/// recorder could not be installed (another recorder in this process).
pub fn renderer(
    gauges: Option<(Arc<JournalGauges>, SharedClock)>,
) -> Option<Arc<dyn Fn() -> String + Send + Sync>> {
    let handle = install()?;
    Some(Arc::new(move || {
        if let Some((g, clock)) = &gauges {
            g.publish(clock.now().timestamp());
            g.request_refresh();
        }
        handle.render()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_status_keep_absolute_times() {
        let s = crate::journal::status::JournalStatus {
            pending_events: 2,
            oldest_pending_age_seconds: Some(600),
            nearest_expiry_seconds: Some(3_000),
            nearest_expiry_hour: None,
            last_success: Some("2026-01-01T00:00:00Z".into()),
            outcomes: BTreeMap::from([("pending".into(), 2), ("accepted".into(), 5)]),
            outcome_quantities: BTreeMap::new(),
            unfrozen_hours: 0,
            frozen_through: None,
            records: 9,
            schema_version: 1,
            last_error: None,
        };
        let f = JournalFigures::from_status(&s, 10_000);
        assert_eq!(f.oldest_pending_hour_end, Some(9_400));
        assert_eq!(f.nearest_deadline, Some(13_000));
        assert_eq!(f.last_success, Some(1_767_225_600));
    }
}

//! Alerts: thresholds and operational problems, delivered to `alerts.webhook_url`.
//!
//! An alert is written into the journal in the same transaction as the event that caused it (a threshold
//! crossed, a `duplicate_mismatch`, ...), with a dedupe key so it fires once. A delivery task POSTs undelivered
//! alerts as JSON, retrying with exponential backoff (the attempt count and next attempt live in the journal, so
//! a restart loses nothing). Every alert is also a log event and a metric when it is raised.
//!
//! In fleet mode the alerts live in the shared PostgreSQL journal (they are raised in the transactions of their
//! causes there), and every replica's delivery task claims due ones from it ([`AlertStore::Fleet`]), one replica
//! per alert at a time.

use crate::journal::alerts::PendingAlert;
use crate::journal::pg::PgJournal;
use crate::journal::{Journal, JournalError};
use chrono::{DateTime, Utc};

/// Where the delivery task finds its alerts.
#[derive(Clone)]
pub enum AlertStore {
    /// This replica's SQLite journal (single-replica mode).
    Local(Journal),
    /// The fleet's shared journal.
    Fleet(PgJournal),
}

impl AlertStore {
    async fn due(&self, now: DateTime<Utc>) -> Result<Vec<PendingAlert>, JournalError> {
        match self {
            AlertStore::Local(j) => j.alerts_due(now).await,
            AlertStore::Fleet(pg) => Ok(pg.claim_alerts(now).await?),
        }
    }

    async fn attempted(
        &self,
        id: i64,
        attempts: i64,
        result: Result<DateTime<Utc>, (Option<String>, DateTime<Utc>)>,
    ) -> Result<(), JournalError> {
        match self {
            AlertStore::Local(j) => j.alert_attempted(id, attempts, result).await,
            AlertStore::Fleet(pg) => Ok(pg.alert_attempted(id, attempts, result).await?),
        }
    }
}

/// Every alert (newest first), for status and tests: [`crate::journal::alerts::list`].
pub use crate::journal::alerts::list;

/// Delivers due alerts to `url` until `stop` turns true; checks every `every`.
pub async fn deliver_loop(
    journal: AlertStore,
    clock: crate::clock::SharedClock,
    url: Option<String>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // The webhook's client only when there is a webhook: building one loads the system's root certificates
    // (issue 15, memory: the third such load at every start, about 19 million instructions and their heap, for a
    // client that without `alerts.webhook` is never used).
    let http = url.as_ref().and_then(|_| {
        crate::tls::install_crypto_provider();
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .ok()
    });
    loop {
        if let Err(e) = deliver_from(&journal, &clock, url.as_deref(), http.as_ref()).await {
            tracing::warn!(message = "Alert delivery pass failed.", error = %e);
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One delivery pass over the local journal. Without a webhook, alerts count as delivered once logged.
pub async fn deliver_once(
    journal: &Journal,
    clock: &crate::clock::SharedClock,
    url: Option<&str>,
    http: Option<&reqwest::Client>,
) -> Result<usize, JournalError> {
    deliver_from(&AlertStore::Local(journal.clone()), clock, url, http).await
}

/// One delivery pass over `journal` (local or the fleet's). Without a webhook, alerts count as delivered once
/// logged.
pub async fn deliver_from(
    journal: &AlertStore,
    clock: &crate::clock::SharedClock,
    url: Option<&str>,
    http: Option<&reqwest::Client>,
) -> Result<usize, JournalError> {
    let now = clock.now();
    let due = journal.due(now).await?;
    let mut delivered = 0;
    for alert in due {
        let result: Result<(), String> = match (url, http) {
            (None, _) => Ok(()),
            (Some(_), None) => Err("no HTTP client".into()),
            (Some(u), Some(h)) => {
                // A short in-call retry for blips (backon); longer outages wait for the persisted next attempt.
                let send = || async {
                    let r = h
                        .post(u)
                        .header("content-type", "application/json")
                        .body(alert.body.clone())
                        .send()
                        .await
                        .map_err(|e| format!("webhook call failed: {e}"))?;
                    if r.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("webhook answered HTTP {}", r.status().as_u16()))
                    }
                };
                use backon::Retryable;
                send.retry(
                    backon::ExponentialBuilder::default()
                        .with_min_delay(std::time::Duration::from_millis(200))
                        .with_max_times(2),
                )
                .await
            }
        };
        let id = alert.id;
        let attempts = alert.attempts + 1;
        let ok = result.is_ok();
        let err = result.err();
        let outcome = if ok { "delivered" } else { "failed" };
        metrics::counter!("meterd_webhook_deliveries_total", "result" => outcome).increment(1);
        if let Some(e) = &err {
            tracing::warn!(message = "Alert webhook delivery failed; retrying later.", error = %e, attempts);
        }
        journal
            .attempted(
                id,
                attempts,
                if ok {
                    Ok(now)
                } else {
                    Err((err, now + crate::retry::ALERT_DELIVERY.after(attempts)))
                },
            )
            .await?;
        if ok {
            delivered += 1;
        }
    }
    Ok(delivered)
}

/// Starts the delivery task.
pub fn spawn(
    journal: AlertStore,
    clock: crate::clock::SharedClock,
    url: Option<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(deliver_loop(
        journal,
        clock,
        url,
        std::time::Duration::from_secs(2),
        stop,
    ))
}

//! Alerts: thresholds and operational problems, delivered to `alerts.webhook_url`.
//!
//! An alert is written into the journal in the same transaction as the event that caused it (a threshold
//! crossed, a `duplicate_mismatch`, ...), with a dedupe key so it fires once. A delivery task POSTs undelivered
//! alerts as JSON, retrying with exponential backoff (the attempt count and next attempt live in the journal, so
//! a restart loses nothing). Every alert is also a log event and a metric when it is raised.

use crate::journal::{Journal, JournalError};
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, params};
use std::sync::Arc;

/// Records an alert once per `dedupe` key. Returns true when it is new.
pub fn raise(
    conn: &Connection,
    kind: &str,
    dedupe: &str,
    mut body: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<bool, JournalError> {
    body["kind"] = kind.into();
    body["raised_at"] = crate::clock::fmt_time(now.timestamp()).into();
    let n = conn
        .prepare_cached(
            "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at) VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT (dedupe) DO NOTHING",
        )?
        .execute(params![kind, dedupe, body.to_string(), now.timestamp()])?;
    if n == 1 {
        metrics::counter!("meterd_alerts_total", "kind" => kind.to_string()).increment(1);
    }
    Ok(n == 1)
}

/// An alert waiting for delivery.
#[derive(Debug, Clone)]
pub struct PendingAlert {
    /// Row id.
    pub id: i64,
    /// JSON body.
    pub body: String,
    /// Attempts so far.
    pub attempts: i64,
}

/// Alerts due for delivery.
pub fn due(conn: &Connection, now: DateTime<Utc>) -> Result<Vec<PendingAlert>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, body, attempts FROM alerts WHERE delivered_at IS NULL AND next_attempt_at <= ?1 ORDER BY id LIMIT 100",
    )?;
    let rows = stmt.query_map([now.timestamp()], |r| {
        Ok(PendingAlert {
            id: r.get(0)?,
            body: r.get(1)?,
            attempts: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every alert (newest first), for status and tests.
pub fn list(conn: &Connection, limit: i64) -> Result<Vec<serde_json::Value>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT body, delivered_at, attempts, last_error FROM alerts ORDER BY id DESC LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit], |r| {
        let body: String = r.get(0)?;
        let mut v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v["delivered_at"] = r
            .get::<_, Option<i64>>(1)?
            .map(crate::clock::fmt_time)
            .into();
        v["attempts"] = r.get::<_, i64>(2)?.into();
        v["last_error"] = r.get::<_, Option<String>>(3)?.into();
        Ok(v)
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Delivers due alerts to `url` until `stop` turns true; checks every `every`.
pub async fn deliver_loop(
    journal: Journal,
    clock: crate::clock::SharedClock,
    url: Option<String>,
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    crate::tls::install_crypto_provider();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .ok();
    loop {
        if let Err(e) = deliver_once(&journal, &clock, url.as_deref(), http.as_ref()).await {
            tracing::warn!(message = "Alert delivery pass failed.", error = %e);
        }
        tokio::select! {
            _ = stop.wait_for(|v| *v) => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// One delivery pass. Without a webhook, alerts count as delivered once logged.
pub async fn deliver_once(
    journal: &Journal,
    clock: &crate::clock::SharedClock,
    url: Option<&str>,
    http: Option<&reqwest::Client>,
) -> Result<usize, JournalError> {
    let now = clock.now();
    let due = journal.read(move |c| due(c, now)).await?;
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
            .write(move |c| {
                if ok {
                    c.execute("UPDATE alerts SET delivered_at = ?2, attempts = ?3, last_error = NULL WHERE id = ?1", params![id, now.timestamp(), attempts])?;
                } else {
                    let delay = crate::emit::backoff_delay(
                        attempts,
                        crate::emit::RetryDelays { min: std::time::Duration::from_secs(5), max: std::time::Duration::from_secs(600) },
                    );
                    let next = now + Duration::from_std(delay).unwrap_or(Duration::seconds(60));
                    c.execute(
                        "UPDATE alerts SET attempts = ?2, last_error = ?3, next_attempt_at = ?4 WHERE id = ?1",
                        params![id, attempts, err, next.timestamp()],
                    )?;
                }
                Ok(())
            })
            .await?;
        if ok {
            delivered += 1;
        }
    }
    Ok(delivered)
}

/// Starts the delivery task.
pub fn spawn(
    journal: Journal,
    clock: crate::clock::SharedClock,
    url: Option<String>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let _ = Arc::new(());
    tokio::spawn(deliver_loop(
        journal,
        clock,
        url,
        std::time::Duration::from_secs(2),
        stop,
    ))
}

//! Alerts storage (`alerts` table): raised once per dedupe key in the transaction of their cause, then
//! delivered (see [`crate::alerts`]).

use super::JournalError;
use crate::alert_kind::AlertKey;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

/// Records an alert once per `dedupe` key. Returns true when it is new.
pub fn raise(
    conn: &Connection,
    key: &AlertKey,
    mut body: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<bool, JournalError> {
    let (kind, dedupe) = (key.kind.as_str(), key.dedupe.as_str());
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

/// Records a delivered alert.
pub fn delivered(conn: &Connection, id: i64, attempts: i64, now: DateTime<Utc>) -> Result<(), JournalError> {
    conn.execute(
        "UPDATE alerts SET delivered_at = ?2, attempts = ?3, last_error = NULL WHERE id = ?1",
        params![id, now.timestamp(), attempts],
    )?;
    Ok(())
}

/// Records a failed delivery and when to try again.
pub fn failed(
    conn: &Connection,
    id: i64,
    attempts: i64,
    error: Option<&str>,
    next: DateTime<Utc>,
) -> Result<(), JournalError> {
    conn.execute(
        "UPDATE alerts SET attempts = ?2, last_error = ?3, next_attempt_at = ?4 WHERE id = ?1",
        params![id, attempts, error, next.timestamp()],
    )?;
    Ok(())
}

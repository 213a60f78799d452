//! Alerts storage (`alerts` table): raised once per dedupe key in the transaction of their cause (the raises
//! about outbound events are here too), then delivered (see [`crate::alerts`]).

use super::JournalError;
use crate::alert_kind::{AlertKey, AlertKind};
use crate::clock::{HOUR, fmt_time};
use crate::settle::Settle;
use chrono::{DateTime, Duration, Utc};
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
pub fn delivered(
    conn: &Connection,
    id: i64,
    attempts: i64,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
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

/// An outbound event as JSON, for alerts.
pub fn event_summary(conn: &Connection, id: i64) -> Result<serde_json::Value, JournalError> {
    Ok(conn
        .prepare_cached("SELECT resource, plan, dimension, hour, quantity, send_quantity, state FROM outbound_events WHERE id = ?1")?
        .query_row([id], |r| {
            Ok(serde_json::json!({
                "resource": r.get::<_, String>(0)?,
                "plan": r.get::<_, String>(1)?,
                "dimension": r.get::<_, String>(2)?,
                "hour": fmt_time(r.get(3)?),
                "quantity": crate::quantity::Micros(r.get::<_, Option<i64>>(5)?.unwrap_or(r.get(4)?)).to_decimal_string(),
                "outcome": r.get::<_, String>(6)?,
            }))
        })?)
}

/// Raises a `pending_age` alert (once per event) for events pending longer than `age` since their hour ended.
pub fn raise_pending_age_alerts(
    conn: &Connection,
    now: DateTime<Utc>,
    age: Duration,
) -> Result<usize, JournalError> {
    let limit = now.timestamp() - age.num_seconds() - HOUR;
    let ids: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT id, deadline FROM outbound_events WHERE state = 'pending' AND hour <= ?1",
        )?
        .query_map([limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut n = 0;
    for (id, deadline) in ids {
        let mut body = event_summary(conn, id)?;
        body["seconds_to_expiry"] = (deadline - now.timestamp()).into();
        body["last_error"] = conn
            .prepare_cached("SELECT last_error FROM outbound_events WHERE id = ?1")?
            .query_row([id], |r| r.get::<_, Option<String>>(0))?
            .into();
        if raise(conn, &AlertKey::event(AlertKind::PendingAge, id), body, now)? {
            tracing::warn!(
                message = "An event has been pending longer than alerts.pending_age.",
                id,
                alert = "pending_age"
            );
            n += 1;
        }
    }
    Ok(n)
}

/// Raises the reconcile alert for an event that ended `expired_unconfirmed` (whichever way it got there) and logs
/// it at error level, in the same transaction as the outcome.
pub fn raise_expired_unconfirmed(
    c: &Connection,
    id: i64,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    let mut body = event_summary(c, id)?;
    body["advice"] =
        "an attempt may have been recorded; run `meterd reconcile --date` for this day".into();
    if raise(
        c,
        &AlertKey::event(AlertKind::ExpiredUnconfirmed, id),
        body.clone(),
        now,
    )? {
        tracing::error!(
            message = "Event expired after an ambiguous attempt; nothing carried. Run `meterd reconcile` for its day.",
            resource = %body["resource"].as_str().unwrap_or(""), dimension = %body["dimension"].as_str().unwrap_or(""),
            hour = %body["hour"].as_str().unwrap_or(""), alert = "expired_unconfirmed"
        );
    }
    Ok(())
}

/// Raises the alert an outcome calls for, in the same transaction as the outcome.
pub fn raise_for_settle(
    c: &Connection,
    id: i64,
    s: &Settle,
    now: DateTime<Utc>,
) -> Result<(), JournalError> {
    let (kind, detail) = match s {
        Settle::DuplicateMismatch { market_quantity } => (
            AlertKind::DuplicateMismatch,
            serde_json::json!({"marketplace_quantity": crate::quantity::Micros(*market_quantity).to_decimal_string()}),
        ),
        Settle::Rejected { reason } if reason.starts_with("ResourceNotAuthorized") => (
            AlertKind::ResourceNotAuthorized,
            serde_json::json!({"reason": reason}),
        ),
        Settle::Rejected { reason } => (AlertKind::Rejected, serde_json::json!({"reason": reason})),
        _ => return Ok(()),
    };
    let mut body = event_summary(c, id)?;
    if let (Some(b), Some(d)) = (body.as_object_mut(), detail.as_object()) {
        b.extend(d.clone());
    }
    raise(c, &AlertKey::event(kind, id), body, now)?;
    Ok(())
}

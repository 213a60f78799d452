//! Figures for `meterd status` and `GET /v1/status`, read from the journal alone.

use super::JournalError;
use super::usage::frozen_through;
use crate::clock::{HOUR, fmt_time, hour_of};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;
use std::collections::BTreeMap;

/// What is waiting and what happened.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JournalStatus {
    /// Outbound events frozen and not yet settled.
    pub pending_events: i64,
    /// Age of the oldest pending event's hour end, seconds (how long it has waited to be billed).
    pub oldest_pending_age_seconds: Option<i64>,
    /// Seconds until the nearest pending event stops being retried.
    pub nearest_expiry_seconds: Option<i64>,
    /// Hour of the event with the nearest expiry.
    pub nearest_expiry_hour: Option<String>,
    /// When the marketplace last accepted (or confirmed as duplicate) an event.
    pub last_success: Option<String>,
    /// Outbound events per outcome (`pending` included).
    pub outcomes: BTreeMap<String, i64>,
    /// Quantity per outcome, decimal units.
    pub outcome_quantities: BTreeMap<String, String>,
    /// Hours with usage of some key not frozen yet (open, waiting for the grace period, or late usage in its own
    /// hour waiting for the next pass).
    pub unfrozen_hours: i64,
    /// First hour not yet frozen.
    pub frozen_through: Option<String>,
    /// Raw records kept (for deduplication).
    pub records: i64,
    /// Schema version.
    pub schema_version: i64,
    /// Last error of a pending event, to see why it waits.
    pub last_error: Option<String>,
}

/// Reads the status at `now`.
pub fn status(conn: &Connection, now: DateTime<Utc>) -> Result<JournalStatus, JournalError> {
    let now_s = now.timestamp();
    let mut outcomes = BTreeMap::new();
    let mut quantities = BTreeMap::new();
    let mut stmt = conn.prepare_cached(
        "SELECT CASE WHEN state = 'expired' AND carried_to IS NOT NULL THEN 'carried' ELSE state END AS s,
                COUNT(*), SUM(quantity) FROM outbound_events GROUP BY s",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (s, n, q) = row?;
        outcomes.insert(s.clone(), n);
        quantities.insert(s, crate::quantity::Micros(q).to_decimal_string());
    }
    let (pending, oldest, nearest): (i64, Option<i64>, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MIN(hour), MIN(deadline) FROM outbound_events WHERE state = 'pending'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let nearest_hour: Option<i64> = match nearest {
        Some(d) => conn
            .query_row(
                "SELECT hour FROM outbound_events WHERE state = 'pending' AND deadline = ?1 LIMIT 1",
                [d],
                |r| r.get(0),
            )
            .optional()?,
        None => None,
    };
    let last_success: Option<i64> = conn.query_row(
        "SELECT MAX(finished_at) FROM outbound_events WHERE state IN ('accepted', 'duplicate')",
        [],
        |r| r.get(0),
    )?;
    let last_error: Option<String> = conn
        .query_row(
            "SELECT last_error FROM outbound_events WHERE state = 'pending' AND last_error IS NOT NULL
             ORDER BY hour LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let frozen = frozen_through(conn)?;
    let unfrozen: i64 = conn.query_row(
        "SELECT COUNT(DISTINCT hour) FROM hourly_totals WHERE outbound_id IS NULL",
        [],
        |r| r.get(0),
    )?;
    let records: i64 = conn.query_row("SELECT COUNT(*) FROM usage_records", [], |r| r.get(0))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let _ = hour_of(now);
    Ok(JournalStatus {
        pending_events: pending,
        oldest_pending_age_seconds: oldest.map(|h| (now_s - (h + HOUR)).max(0)),
        nearest_expiry_seconds: nearest.map(|d| d - now_s),
        nearest_expiry_hour: nearest_hour.map(fmt_time),
        last_success: last_success.map(fmt_time),
        outcomes,
        outcome_quantities: quantities,
        unfrozen_hours: unfrozen,
        frozen_through: (frozen != i64::MIN).then(|| fmt_time(frozen)),
        records,
        schema_version: version,
        last_error,
    })
}

/// One outbound event, as `meterd flush` lists what a pass touched.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventLine {
    /// Hour start, RFC 3339.
    pub hour: String,
    /// Subscription or resource URI.
    pub resource: String,
    /// Dimension.
    pub dimension: String,
    /// Quantity sent (billing units after the billing policy), decimal.
    pub quantity: String,
    /// `pending` or the outcome.
    pub state: String,
    /// Marketplace usage event id when accepted.
    pub usage_event_id: Option<String>,
    /// Why it still waits or was refused.
    pub last_error: Option<String>,
}

/// Outbound events frozen or finished at or after `since`, oldest hour first (what one pass did).
pub fn events_since(
    conn: &Connection,
    since: DateTime<Utc>,
) -> Result<Vec<EventLine>, JournalError> {
    let mut stmt = conn.prepare(
        "SELECT hour, resource, dimension, COALESCE(send_quantity, quantity), state, usage_event_id, last_error
         FROM outbound_events WHERE frozen_at >= ?1 OR finished_at >= ?1
         ORDER BY hour, resource, dimension",
    )?;
    let rows = stmt.query_map([since.timestamp()], |r| {
        Ok(EventLine {
            hour: fmt_time(r.get::<_, i64>(0)?),
            resource: r.get(1)?,
            dimension: r.get(2)?,
            quantity: crate::quantity::Micros(r.get(3)?).to_decimal_string(),
            state: r.get(4)?,
            usage_event_id: r.get(5)?,
            last_error: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Quantities (micro-units, sent quantity) of the events the marketplace accepted or confirmed as duplicates, per
/// lower-cased resource and dimension, for hours in `[from, to)` (`meterd reconcile`).
pub fn accepted_totals(
    conn: &Connection,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<BTreeMap<(String, String), i64>, JournalError> {
    let mut stmt = conn.prepare(
        "SELECT resource, dimension, COALESCE(send_quantity, quantity) FROM outbound_events
         WHERE hour >= ?1 AND hour < ?2 AND state IN ('accepted', 'duplicate')",
    )?;
    let rows = stmt.query_map([from.timestamp(), to.timestamp()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let mut out: BTreeMap<(String, String), i64> = BTreeMap::new();
    for row in rows {
        let (r, d, q) = row?;
        let e = out.entry((r.to_ascii_lowercase(), d)).or_default();
        *e = e.checked_add(q).ok_or_else(|| {
            JournalError::Invalid("accepted quantities overflow i64 micro-units".to_string())
        })?;
    }
    Ok(out)
}

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

/// The schema version from which `outcome_totals` holds the per-outcome figures and `outbound_events_pending`
/// indexes the pending events (migration 7).
const COUNTED_SINCE: i64 = 7;

/// Per-outcome counts and quantities from the totals the triggers of migration 7 keep (a few rows).
const OUTCOMES_COUNTED: &str =
    "SELECT outcome, events, quantity FROM outcome_totals WHERE events > 0 ORDER BY outcome";
/// The same from every outbound event (journals older than schema 7).
const OUTCOMES_SCANNED: &str =
    "SELECT CASE WHEN state = 'expired' AND carried_to IS NOT NULL THEN 'carried' ELSE state END AS s,
            COUNT(*), SUM(quantity) FROM outbound_events GROUP BY s ORDER BY s";
/// The last accepted or duplicate answer, from the totals.
const LAST_SUCCESS_COUNTED: &str =
    "SELECT MAX(last_finished) FROM outcome_totals WHERE outcome IN ('accepted', 'duplicate')";
/// The same from every accepted event (journals older than schema 7).
const LAST_SUCCESS_SCANNED: &str =
    "SELECT MAX(finished_at) FROM outbound_events WHERE state IN ('accepted', 'duplicate')";
/// Pending events: the partial index of pending events (schema 7) holds every column read, so this reads
/// as many index entries as events are pending and no table row.
const PENDING_INDEXED: &str = "SELECT COUNT(*), MIN(hour), MIN(deadline) FROM outbound_events
     INDEXED BY outbound_events_pending WHERE state = 'pending'";
/// The same through the state index and the table (journals older than schema 7).
const PENDING_SCANNED: &str =
    "SELECT COUNT(*), MIN(hour), MIN(deadline) FROM outbound_events WHERE state = 'pending'";
const NEAREST_HOUR_INDEXED: &str =
    "SELECT hour FROM outbound_events INDEXED BY outbound_events_pending
     WHERE state = 'pending' AND deadline = ?1 LIMIT 1";
const NEAREST_HOUR_SCANNED: &str =
    "SELECT hour FROM outbound_events WHERE state = 'pending' AND deadline = ?1 LIMIT 1";
/// Pending events in hour order (state index) until one has an error: at most the pending events.
const LAST_ERROR: &str =
    "SELECT last_error FROM outbound_events WHERE state = 'pending' AND last_error IS NOT NULL
     ORDER BY hour LIMIT 1";
/// Through the partial index of unfrozen totals.
const UNFROZEN: &str = "SELECT COUNT(DISTINCT hour) FROM hourly_totals WHERE outbound_id IS NULL";
/// Counts the smallest index of the raw records (compacted after `ingest.dedupe_window`).
const RECORDS: &str = "SELECT COUNT(*) FROM usage_records";

/// Reads the status at `now`.
pub fn status(conn: &Connection, now: DateTime<Utc>) -> Result<JournalStatus, JournalError> {
    let now_s = now.timestamp();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // Schema 7 keeps the per-outcome figures in `outcome_totals` (triggers on `outbound_events`); a read-only
    // `meterd status` of this build on an older journal (its daemon not upgraded yet) still scans.
    let counted = version >= COUNTED_SINCE;
    let mut outcomes = BTreeMap::new();
    let mut quantities = BTreeMap::new();
    let mut stmt = conn.prepare_cached(if counted {
        OUTCOMES_COUNTED
    } else {
        OUTCOMES_SCANNED
    })?;
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
        if counted {
            PENDING_INDEXED
        } else {
            PENDING_SCANNED
        },
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    let nearest_hour: Option<i64> = match nearest {
        Some(d) => conn
            .query_row(
                if counted {
                    NEAREST_HOUR_INDEXED
                } else {
                    NEAREST_HOUR_SCANNED
                },
                [d],
                |r| r.get(0),
            )
            .optional()?,
        None => None,
    };
    let last_success: Option<i64> = conn.query_row(
        if counted {
            LAST_SUCCESS_COUNTED
        } else {
            LAST_SUCCESS_SCANNED
        },
        [],
        |r| r.get(0),
    )?;
    let last_error: Option<String> = conn.query_row(LAST_ERROR, [], |r| r.get(0)).optional()?;
    let frozen = frozen_through(conn)?;
    let unfrozen: i64 = conn.query_row(UNFROZEN, [], |r| r.get(0))?;
    let records: i64 = conn.query_row(RECORDS, [], |r| r.get(0))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

    fn journal() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::journal::migrate(&mut c).unwrap();
        c
    }

    fn insert(c: &Connection, hour: i64, state: &str, quantity: i64) -> i64 {
        c.execute(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                 deadline, frozen_at) VALUES ('r', '', 'd', ?1, ?2, '', ?3, 0, ?1 + 86100, 0)",
            params![hour, quantity, state],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    /// What the scan over every event answers (the figures before schema 7).
    fn scanned(c: &Connection) -> (Vec<(String, i64, i64)>, Option<i64>) {
        let rows = c
            .prepare(OUTCOMES_SCANNED)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let last = c.query_row(LAST_SUCCESS_SCANNED, [], |r| r.get(0)).unwrap();
        (rows, last)
    }

    fn counted(c: &Connection) -> (Vec<(String, i64, i64)>, Option<i64>) {
        let rows = c
            .prepare(OUTCOMES_COUNTED)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let last = c.query_row(LAST_SUCCESS_COUNTED, [], |r| r.get(0)).unwrap();
        (rows, last)
    }

    fn plan(c: &Connection, sql: &str) -> Vec<String> {
        let n = c.prepare(sql).unwrap().parameter_count();
        let args: Vec<i64> = vec![0; n];
        c.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// Schema 7: no read of `meterd status` / `GET /v1/status` scans the outbound events or the hourly totals
    /// (each is an index search bounded by the pending events or the unfrozen totals, or reads `outcome_totals`).
    /// Only the raw record count counts an index of `usage_records` (compacted after `ingest.dedupe_window`).
    #[test]
    fn status_reads_scan_neither_the_events_nor_the_totals() {
        let c = journal();
        for sql in [
            OUTCOMES_COUNTED,
            LAST_SUCCESS_COUNTED,
            PENDING_INDEXED,
            NEAREST_HOUR_INDEXED,
            LAST_ERROR,
            UNFROZEN,
        ] {
            let p = plan(&c, sql);
            for line in &p {
                assert!(
                    !line.contains("outbound_events")
                        || line.starts_with("SEARCH")
                        || line.contains("COVERING INDEX outbound_events_pending"),
                    "{sql}: {p:?}"
                );
                assert!(
                    !line.contains("hourly_totals") || line.contains("hourly_totals_unfrozen"),
                    "{sql}: {p:?}"
                );
            }
        }
        for sql in [OUTCOMES_COUNTED, LAST_SUCCESS_COUNTED] {
            let p = plan(&c, sql);
            assert!(
                p.iter().all(|l| l.contains("outcome_totals")),
                "{sql}: {p:?}"
            );
        }
        let p = plan(&c, LAST_ERROR);
        assert!(
            p.iter()
                .any(|l| l.contains("outbound_events_state (state=?)")),
            "{p:?}"
        );
        for sql in [PENDING_INDEXED, NEAREST_HOUR_INDEXED] {
            let p = plan(&c, sql);
            assert!(
                p.iter()
                    .all(|l| l.contains("COVERING INDEX outbound_events_pending")),
                "{sql}: {p:?}"
            );
        }
    }

    /// `status` takes its outcome figures from `outcome_totals` on schema 7 (not from a scan): a figure
    /// changed there is what it reports.
    #[test]
    fn status_reports_the_kept_totals() {
        let c = journal();
        insert(&c, 0, "accepted", 3_000_000);
        let now = crate::clock::to_utc(100 * HOUR);
        assert_eq!(status(&c, now).unwrap().outcomes["accepted"], 1);
        c.execute_batch(
            "UPDATE outcome_totals SET events = 41, quantity = 7000000, last_finished = 36000
             WHERE outcome = 'accepted'",
        )
        .unwrap();
        let s = status(&c, now).unwrap();
        assert_eq!(s.outcomes["accepted"], 41);
        assert_eq!(s.outcome_quantities["accepted"], "7");
        assert_eq!(s.last_success.as_deref(), Some("1970-01-01T10:00:00Z"));
    }

    /// The triggers keep `outcome_totals` equal to the scan through inserts, settles (every outcome, expiry with
    /// and without a carry), no-op updates and deletes; a deleted last success is still the last success.
    #[test]
    fn kept_totals_equal_the_scan_through_every_change() {
        let c = journal();
        let mut ids = Vec::new();
        let states = [
            "accepted",
            "duplicate",
            "included",
            "remainder",
            "rejected",
            "expired",
            "expired_unconfirmed",
            "not_active",
        ];
        for i in 0..40i64 {
            ids.push(insert(&c, i * HOUR, "pending", 1_000_000 + i * 250_000));
        }
        assert_eq!(counted(&c), scanned(&c));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for (n, id) in ids.iter().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let state = states[(x % states.len() as u64) as usize];
            let carried = (state == "expired" && x.is_multiple_of(2)).then_some(99 * HOUR);
            c.execute(
                "UPDATE outbound_events SET state = ?2, carried_to = ?3, finished_at = ?4 WHERE id = ?1",
                params![id, state, carried, 1000 + n as i64],
            )
            .unwrap();
            // An update of other columns (retry bookkeeping) and one that writes the same values.
            c.execute(
                "UPDATE outbound_events SET attempts = attempts + 1, last_error = 'x' WHERE id = ?1",
                [id],
            )
            .unwrap();
            c.execute(
                "UPDATE outbound_events SET state = state, carried_to = carried_to WHERE id = ?1",
                [id],
            )
            .unwrap();
            assert_eq!(counted(&c), scanned(&c), "after settling {id} as {state}");
        }
        // Retention: every settled event before hour 20, in one statement.
        let last = scanned(&c).1;
        c.execute(
            "DELETE FROM outbound_events WHERE hour < ?1 AND state != 'pending'",
            [20 * HOUR],
        )
        .unwrap();
        assert_eq!(counted(&c).0, scanned(&c).0, "after retention");
        c.execute("DELETE FROM outbound_events", []).unwrap();
        let (rows, kept_last) = counted(&c);
        assert!(rows.is_empty(), "{rows:?}");
        assert!(last.is_some());
        assert_eq!(kept_last, last, "the last success outlives its event");
    }

    /// Migration 7 on a journal of schema 6 that holds events: the totals start equal to the scan, and `status`
    /// answers what it answered before the migration.
    #[test]
    fn migration_7_counts_the_events_a_journal_holds() {
        let mut c = Connection::open_in_memory().unwrap();
        for m in &crate::journal::schema::MIGRATIONS[..6] {
            c.execute_batch(m).unwrap();
        }
        c.execute_batch("PRAGMA user_version = 6").unwrap();
        for (i, state) in [
            "accepted",
            "accepted",
            "duplicate",
            "expired",
            "expired",
            "pending",
            "included",
        ]
        .iter()
        .enumerate()
        {
            let id = insert(&c, i as i64 * HOUR, state, 1_500_000);
            if *state != "pending" {
                c.execute(
                    "UPDATE outbound_events SET finished_at = ?2, carried_to = ?3 WHERE id = ?1",
                    params![id, 5000 + i as i64, (i == 3).then_some(50 * HOUR)],
                )
                .unwrap();
            }
        }
        let now = crate::clock::to_utc(100 * HOUR);
        let before = status(&c, now).unwrap();
        assert_eq!(before.outcomes.get("carried"), Some(&1));
        let scan = scanned(&c);
        crate::journal::migrate(&mut c).unwrap();
        assert_eq!(counted(&c), scan);
        let after = status(&c, now).unwrap();
        assert_eq!(
            JournalStatus {
                schema_version: before.schema_version,
                ..after
            },
            before
        );
    }
}

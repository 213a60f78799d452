//! Outbound events: freezing closed hours, claiming due events, recording attempts, settling results, expiry.
//! (Subscriptions seen and the emitter lease have their own files; re-exported here.)
//!
//! Every function here runs inside a writer job (or a read), so each step is one transaction: a crash leaves the
//! event either before or after the step, never between.

use super::JournalError;
use super::usage::{add_to_hour, frozen_through, record_carry};
use crate::clock::{HOUR, fmt_time, hour_of};
use crate::config::LateUsage;
use crate::outcome::Outcome;
use chrono::{DateTime, Duration, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::collections::BTreeMap;

pub use crate::settle::REFUSED;

/// The first hour that is not closed at `now`: hour H is closed when `H + 1h + grace <= now`.
pub fn first_open_hour(now: DateTime<Utc>, grace: Duration) -> i64 {
    hour_of(now - Duration::hours(1) - grace) + HOUR
}

/// What a freeze did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FreezeSummary {
    /// Outbound events written.
    pub frozen: usize,
    /// New `frozen_through` (first hour still open), unix seconds.
    pub through: i64,
    /// Events frozen already past their retry deadline (expired by the same job, see
    /// `Journal::freeze_more`).
    #[serde(skip)]
    pub overdue: usize,
}

/// Freezes every key of every closed hour that has no outbound event yet: one outbound event per
/// (resource, dimension, hour) with its exact total. Freezing is per key: a key of an hour frozen earlier (late
/// usage that went into its own hour, or totals left by a daemon that was down) is frozen by the next pass, and a
/// key frozen past its window expires on the same pass (and is carried), so nothing vanishes. The totals to
/// freeze are found through the partial index `hourly_totals_unfrozen`, not by scanning every total kept.
///
/// The plan is taken from the records when they name one (the one with the largest share if they disagree: the
/// marketplace keeps one event per resource, dimension and hour); otherwise it is decided before the first send.
pub fn freeze(
    conn: &Connection,
    now: DateTime<Utc>,
    grace: Duration,
    safety_margin: Duration,
) -> Result<FreezeSummary, JournalError> {
    Ok(freeze_some(conn, now, grace, safety_margin, usize::MAX)?.0)
}

/// Hourly totals a yielding chunk ([`freeze_chunk`]) freezes between two looks at whether another job waits.
const FREEZE_STEP: usize = 100;

/// [`freeze_some`] for a writer job of the emission pass, in steps of [`FREEZE_STEP`] totals: after each step it
/// stops, saying `true` (more left), when another job is waiting for the writer
/// ([`crate::journal::others_waiting`]: an ingest request, a sender's in-flight mark), so the pass's next chunk
/// goes on from there. A chunk of 1,000 totals at once held the writer for 20-45 ms, and every job queued behind
/// it (a mark, so a call slot; an ingest request) waited that long (issue 15). Each step is a whole
/// [`freeze_some`], so stopping between two leaves the journal as a smaller chunk would.
pub fn freeze_chunk(
    conn: &Connection,
    now: DateTime<Utc>,
    grace: Duration,
    safety_margin: Duration,
    limit: usize,
) -> Result<(FreezeSummary, bool), JournalError> {
    let mut left = limit.max(1);
    let mut total = FreezeSummary::default();
    loop {
        let step_limit = left.min(FREEZE_STEP);
        let (step, more) = freeze_some(conn, now, grace, safety_margin, step_limit)?;
        left -= step_limit;
        total.frozen += step.frozen;
        total.overdue += step.overdue;
        total.through = step.through;
        if !more {
            return Ok((total, false));
        }
        if left == 0 || crate::journal::others_waiting() {
            return Ok((total, true));
        }
    }
}

/// [`freeze`] for at most about `limit` hourly totals (whole keys: a key's totals of several plans are frozen
/// together), oldest hour first; the `bool` says whether closed totals are left for another call. The emission
/// pass freezes in chunks so its first call starts after the first chunk, not after every key of the hour
/// (issue 15).
///
/// `frozen_through` moves forward in the first chunk already: from then on ingest looks up the key of every
/// record of an hour before it, so a record of a key frozen in an earlier chunk is carried (late), and a record of
/// a key not frozen yet goes into that key's total, which a later chunk freezes with it (invariants 5 and 6).
pub fn freeze_some(
    conn: &Connection,
    now: DateTime<Utc>,
    grace: Duration,
    safety_margin: Duration,
    limit: usize,
) -> Result<(FreezeSummary, bool), JournalError> {
    let old = frozen_through(conn)?;
    let through = first_open_hour(now, grace).max(old);
    let mut summary = FreezeSummary {
        frozen: 0,
        through,
        overdue: 0,
    };
    type Row = (String, String, String, i64, i64, i64);
    let read = |r: &rusqlite::Row<'_>| -> rusqlite::Result<Row> {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ))
    };
    let sql_limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows: Vec<Row> = conn
        .prepare_cached(
            "SELECT resource, plan, dimension, hour, quantity, prebilled FROM hourly_totals
             INDEXED BY hourly_totals_unfrozen
             WHERE outbound_id IS NULL AND hour < ?1 ORDER BY hour, resource, dimension, plan LIMIT ?2",
        )?
        .query_map(params![through, sql_limit], read)?
        .collect::<Result<_, _>>()?;
    let more = rows.len() as i64 >= sql_limit;
    if more {
        // The limit may have cut the last key's totals (one per plan): leave that key whole for the next call,
        // unless it is the only key read, then read all of its totals.
        let (resource, dimension, hour) = {
            let last = rows.last().expect("limit >= 1");
            (last.0.clone(), last.2.clone(), last.3)
        };
        let same = |r: &Row| r.0 == resource && r.2 == dimension && r.3 == hour;
        while rows.last().is_some_and(same) {
            rows.pop();
        }
        if rows.is_empty() {
            rows = conn
                .prepare_cached(
                    "SELECT resource, plan, dimension, hour, quantity, prebilled FROM hourly_totals
                     WHERE outbound_id IS NULL AND resource = ?1 AND dimension = ?2 AND hour = ?3 ORDER BY plan",
                )?
                .query_map(params![resource, dimension, hour], read)?
                .collect::<Result<_, _>>()?;
        }
    }
    // Group by the marketplace's key.
    // (hour, resource, dimension) -> (total, prebilled, quantity per explicitly named plan)
    type Group = (i64, i64, BTreeMap<String, i64>);
    let mut groups: BTreeMap<(i64, String, String), Group> = BTreeMap::new();
    for (resource, plan, dimension, hour, qty, prebilled) in rows {
        let g = groups.entry((hour, resource, dimension)).or_default();
        g.0 =
            g.0.checked_add(qty)
                .ok_or_else(|| JournalError::Invalid("hourly total overflows".into()))?;
        g.1 += prebilled;
        if !plan.is_empty() {
            *g.2.entry(plan).or_default() += qty;
        }
    }
    let now_s = now.timestamp();
    for ((hour, resource, dimension), (qty, prebilled, plans)) in groups {
        if plans.len() > 1 {
            tracing::warn!(
                message = "Records of one hour name different plans; the marketplace takes one event per hour, so the plan with the largest share is used.",
                %resource, %dimension, hour = %fmt_time(hour), plans = ?plans.keys().collect::<Vec<_>>()
            );
        }
        let plan = plans
            .iter()
            .max_by_key(|(_, q)| **q)
            .map(|(p, _)| p.clone())
            .unwrap_or_default();
        let existing: Option<i64> = conn
            .prepare_cached("SELECT id FROM outbound_events WHERE resource = ?1 AND dimension = ?2 AND hour = ?3")?
            .query_row(params![resource, dimension, hour], |r| r.get(0))
            .optional()?;
        if existing.is_some() {
            // Ingest carries usage of a key that has its event, so this cannot happen; never lose the units if
            // it does. The target is later than `hour` (hour < through <= target) and not frozen.
            let target = hour_of(now).max(through);
            tracing::error!(message = "Hour already has an outbound event; carrying the new units forward.", %resource, %dimension, hour = %fmt_time(hour));
            add_to_hour(conn, &resource, &plan, &dimension, target, qty, 0, qty)?;
            record_carry(
                conn, &resource, &plan, &dimension, hour, target, qty, "late", None, now_s,
            )?;
            conn.prepare_cached("DELETE FROM hourly_totals WHERE resource = ?1 AND dimension = ?2 AND hour = ?3 AND outbound_id IS NULL")?
                .execute(params![resource, dimension, hour])?;
            continue;
        }
        let deadline = hour + 24 * HOUR - safety_margin.num_seconds();
        if deadline <= now_s {
            summary.overdue += 1;
        }
        conn.prepare_cached(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at, deadline, frozen_at, prebilled)
             VALUES (?1, ?2, ?3, ?4, ?5, '', 'pending', ?6, ?7, ?6, ?8)",
        )?
        .execute(params![resource, plan, dimension, hour, qty, now_s, deadline, prebilled])?;
        let id = conn.last_insert_rowid();
        conn.prepare_cached("UPDATE hourly_totals SET outbound_id = ?1 WHERE resource = ?2 AND dimension = ?3 AND hour = ?4 AND outbound_id IS NULL")?
            .execute(params![id, resource, dimension, hour])?;
        summary.frozen += 1;
    }
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('frozen_through', ?1)
         ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
    )?
    .execute([through])?;
    Ok((summary, more))
}

/// A pending outbound event as the emitter sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    /// Row id.
    pub id: i64,
    /// Subscription id or resource URI.
    pub resource: String,
    /// Plan ('' until decided).
    pub plan: String,
    /// Dimension.
    pub dimension: String,
    /// Hour start, unix seconds.
    pub hour: i64,
    /// Frozen quantity, micro-units.
    pub quantity: i64,
    /// Frozen JSON ('' until the first send).
    pub body: String,
    /// Attempts so far.
    pub attempts: i64,
    /// Retries stop here, unix seconds.
    pub deadline: i64,
    /// Some attempt may have been recorded without an answer.
    pub ambiguous: bool,
    /// Held for its subscription (not active yet).
    pub held: bool,
    /// Held because the marketplace refused it (`ResourceNotFound` / `ResourceNotActive`).
    pub refused: bool,
    /// Part of `quantity` that already went through the allowance (carried after an expiry).
    pub prebilled: i64,
    /// Quantity sent, billing units in micro-units (set with the body).
    pub send_quantity: Option<i64>,
}

/// Pending events due at `now`, oldest hour first.
pub fn due_events(
    conn: &Connection,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<PendingEvent>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, resource, plan, dimension, hour, quantity, body, attempts, deadline, ambiguous, held IS NOT NULL,
                prebilled, send_quantity, COALESCE(substr(held, 1, length(?3)) = ?3, 0) FROM outbound_events
         WHERE state = 'pending' AND next_attempt_at <= ?1 AND deadline > ?1 ORDER BY hour, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now.timestamp(), limit, REFUSED], |r| {
        Ok(PendingEvent {
            id: r.get(0)?,
            resource: r.get(1)?,
            plan: r.get(2)?,
            dimension: r.get(3)?,
            hour: r.get(4)?,
            quantity: r.get(5)?,
            body: r.get(6)?,
            attempts: r.get(7)?,
            deadline: r.get(8)?,
            ambiguous: r.get::<_, i64>(9)? != 0,
            held: r.get::<_, i64>(10)? != 0,
            prebilled: r.get(11)?,
            send_quantity: r.get(12)?,
            refused: r.get::<_, i64>(13)? != 0,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One page of the events due at `now`: at most `limit`, by id, after id `after` (the emission pass streams them
/// page by page so its memory does not grow with the number of events; events frozen by a later chunk of the
/// same pass have higher ids, so they come in later pages). A range scan of the primary key from `after`
/// (`NOT INDEXED`: the `state` index would read every pending event for each page); start it at
/// [`first_pending_id`] so settled events before the oldest pending one are not read.
pub fn due_page(
    conn: &Connection,
    now: DateTime<Utc>,
    after: i64,
    limit: i64,
) -> Result<Vec<PendingEvent>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, resource, plan, dimension, hour, quantity, body, attempts, deadline, ambiguous, held IS NOT NULL,
                prebilled, send_quantity, COALESCE(substr(held, 1, length(?3)) = ?3, 0) FROM outbound_events NOT INDEXED
         WHERE id > ?4 AND state = 'pending' AND next_attempt_at <= ?1 AND deadline > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![now.timestamp(), limit, REFUSED, after],
        pending_event,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The id just before the oldest pending event (where [`due_page`] starts); `i64::MAX` when none is pending.
pub fn first_pending_id(conn: &Connection) -> Result<i64, JournalError> {
    let min: Option<i64> = conn
        .prepare_cached("SELECT MIN(id) FROM outbound_events WHERE state = 'pending'")?
        .query_row([], |r| r.get(0))?;
    Ok(min.map_or(i64::MAX, |m| m - 1))
}

fn pending_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<PendingEvent> {
    Ok(PendingEvent {
        id: r.get(0)?,
        resource: r.get(1)?,
        plan: r.get(2)?,
        dimension: r.get(3)?,
        hour: r.get(4)?,
        quantity: r.get(5)?,
        body: r.get(6)?,
        attempts: r.get(7)?,
        deadline: r.get(8)?,
        ambiguous: r.get::<_, i64>(9)? != 0,
        held: r.get::<_, i64>(10)? != 0,
        prebilled: r.get(11)?,
        send_quantity: r.get(12)?,
        refused: r.get::<_, i64>(13)? != 0,
    })
}

/// When the next pending event becomes due (unix seconds), if any.
pub fn next_due(conn: &Connection) -> Result<Option<i64>, JournalError> {
    Ok(conn.query_row(
        "SELECT MIN(next_attempt_at) FROM outbound_events WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?)
}

/// Writes the frozen body, plan and billing figures of an event, once: an event that has a body keeps it.
pub fn set_body(
    conn: &Connection,
    id: i64,
    plan: &str,
    body: &str,
    bill: &crate::bill::Bill,
) -> Result<String, JournalError> {
    conn.prepare_cached(
        "UPDATE outbound_events SET plan = ?2, body = ?3, included = ?4, billable = ?5, send_quantity = ?6, term_start = ?7
         WHERE id = ?1 AND body = ''",
    )?
    .execute(params![id, plan, body, bill.included, bill.billable, bill.send, bill.term_start])?;
    Ok(conn
        .prepare_cached("SELECT body FROM outbound_events WHERE id = ?1")?
        .query_row([id], |r| r.get(0))?)
}

/// Settles an event that billing left nothing to send for: `included` (the allowance covered it) or
/// `remainder` (below one billing unit, carried to the next hour).
pub fn settle_unbilled(
    conn: &Connection,
    id: i64,
    plan: &str,
    bill: &crate::bill::Bill,
    now: DateTime<Utc>,
) -> Result<Outcome, JournalError> {
    let state = if bill.billable == 0 {
        Outcome::Included
    } else {
        Outcome::Remainder
    };
    conn.prepare_cached(
        "UPDATE outbound_events SET plan = ?2, state = ?3, included = ?4, billable = ?5, send_quantity = 0, term_start = ?6,
                finished_at = ?7, held = NULL, in_flight = 0
         WHERE id = ?1 AND state = 'pending'",
    )?
    .execute(params![id, plan, state.as_str(), bill.included, bill.billable, bill.term_start, now.timestamp()])?;
    Ok(state)
}

/// Adds already-billed usage (carried after an expiry) to an hour: it skips the allowance when that hour is billed.
pub fn add_prebilled(
    conn: &Connection,
    resource: &str,
    plan: &str,
    dimension: &str,
    hour: i64,
    amount: i64,
) -> Result<(), JournalError> {
    if amount != 0 {
        conn.prepare_cached("UPDATE hourly_totals SET prebilled = prebilled + ?5 WHERE resource = ?1 AND plan = ?2 AND dimension = ?3 AND hour = ?4")?
            .execute(params![resource, plan, dimension, hour, amount])?;
    }
    Ok(())
}

pub use crate::settle::Settle;

/// What settling an event needs from the settings: the late-usage policy for expired units and the billing
/// unit of each dimension (to know how much of a billed event's usage its whole units cover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlePolicy {
    /// What happens to the units of an expired event.
    pub late: LateUsage,
    /// Billing unit per dimension (`unit`); dimensions not listed use 1.
    pub units: BTreeMap<String, i64>,
}

impl SettlePolicy {
    /// The policy of `settings`.
    pub fn from_settings(settings: &crate::config::Settings) -> Self {
        SettlePolicy {
            late: settings.late_usage,
            units: settings
                .dimensions
                .iter()
                .filter_map(|d| d.unit.map(|u| (d.id.clone(), u)))
                .collect(),
        }
    }

    /// A policy with `late` and no billing units.
    pub fn late(late: LateUsage) -> Self {
        SettlePolicy {
            late,
            units: BTreeMap::new(),
        }
    }

    fn unit(&self, dimension: &str) -> i64 {
        self.units.get(dimension).copied().unwrap_or(1).max(1)
    }
}

/// The raw usage the whole units of a billed event cover: `send_quantity` billing units of `unit` each.
/// The rest of its billable quantity is the remainder billing left in `remainders`.
fn sent_raw(send_quantity: i64, unit: i64) -> i64 {
    send_quantity.saturating_mul(unit)
}

/// Gives back to the `remainders` table what billing event `id` took from it, when the event ends without
/// being billed (`not_active`, `rejected`, `skipped_unsubscribed`, `expired` and not carried).
///
/// Billing moved the remainder carried in (`c`) into the event and left its own leftover (`r`) in the table;
/// undoing that adds `c - r`, which is `units sent x unit - (overage + prebilled)`. Afterwards, for the
/// subscription and dimension, `units x unit + remainder` is again the usage of the events that are billed.
/// The result may be negative when a later hour already sent units built on `r`: that hour then sent more
/// than its usage, and the negative remainder takes it off the next bill.
fn restore_remainder(conn: &Connection, id: i64, unit: i64) -> Result<(), JournalError> {
    type Billed = (String, String, i64, i64, i64, Option<i64>);
    let row: Option<Billed> = conn
        .prepare_cached(
            "SELECT resource, dimension, quantity, prebilled, COALESCE(included, 0), send_quantity
             FROM outbound_events WHERE id = ?1 AND billable IS NOT NULL",
        )?
        .query_row([id], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    let Some((resource, dimension, raw, prebilled, included, Some(send))) = row else {
        return Ok(());
    };
    let overage = raw - prebilled - included;
    let delta = sent_raw(send, unit) - overage - prebilled;
    if delta != 0 {
        conn.prepare_cached(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES (?1, ?2, ?3)
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = remainder + excluded.remainder",
        )?
        .execute(params![resource, dimension, delta])?;
    }
    Ok(())
}

/// Records the outcome of one attempt (or decision) for event `id` under `policy`. Returns the state written.
///
/// Every answer clears the in-flight marker: only an attempt that got no answer may have been recorded unseen.
pub fn settle(
    conn: &Connection,
    id: i64,
    outcome: &Settle,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<Outcome, JournalError> {
    let now_s = now.timestamp();
    let unit = || -> Result<i64, JournalError> {
        let dimension: Option<String> = conn
            .prepare_cached("SELECT dimension FROM outbound_events WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?;
        Ok(dimension.map(|d| policy.unit(&d)).unwrap_or(1))
    };
    let finish = |state: Outcome,
                  error: Option<&str>,
                  usage_event_id: Option<&str>,
                  market: Option<i64>|
     -> Result<Outcome, JournalError> {
        let pending: bool = conn
            .prepare_cached(
                "SELECT COUNT(*) FROM outbound_events WHERE id = ?1 AND state = 'pending'",
            )?
            .query_row([id], |r| r.get::<_, i64>(0))?
            == 1;
        if pending && matches!(state, Outcome::Rejected | Outcome::SkippedUnsubscribed) {
            restore_remainder(conn, id, unit()?)?;
        }
        conn.prepare_cached(
            "UPDATE outbound_events SET state = ?2, last_error = COALESCE(?3, last_error), usage_event_id = ?4,
                    market_quantity = ?5, finished_at = ?6, held = NULL, in_flight = 0
             WHERE id = ?1 AND state = 'pending'",
        )?
        .execute(params![id, state.as_str(), error, usage_event_id, market, now_s])?;
        Ok(state)
    };
    match outcome {
        Settle::Accepted { usage_event_id } => {
            finish(Outcome::Accepted, None, usage_event_id.as_deref(), None)
        }
        Settle::Duplicate {
            market_quantity,
            usage_event_id,
        } => finish(
            Outcome::Duplicate,
            None,
            usage_event_id.as_deref(),
            *market_quantity,
        ),
        Settle::DuplicateMismatch { market_quantity } => finish(
            Outcome::DuplicateMismatch,
            Some("the marketplace holds another quantity for this hour"),
            None,
            Some(*market_quantity),
        ),
        Settle::Rejected { reason } => finish(Outcome::Rejected, Some(reason), None, None),
        Settle::SkippedUnsubscribed => finish(
            Outcome::SkippedUnsubscribed,
            Some("the subscription was cancelled before this hour closed"),
            None,
            None,
        ),
        Settle::Expired { message } => expire(conn, id, message, now, policy, false),
        Settle::Hold { reason, next_at } => {
            conn.prepare_cached(
                "UPDATE outbound_events SET held = ?2, last_error = ?2, next_attempt_at = ?3, in_flight = 0
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, reason, next_at.timestamp()])?;
            Ok(Outcome::Pending)
        }
        Settle::Defer { reason, next_at } => {
            conn.prepare_cached(
                "UPDATE outbound_events SET last_error = ?2, next_attempt_at = ?3, held = NULL, in_flight = 0
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, reason, next_at.timestamp()])?;
            Ok(Outcome::Pending)
        }
        Settle::Retry {
            error,
            next_at,
            ambiguous,
        } => {
            conn.prepare_cached(
                "UPDATE outbound_events SET last_error = ?2, next_attempt_at = ?3,
                        ambiguous = MAX(ambiguous, ?4), held = NULL, in_flight = 0
                 WHERE id = ?1 AND state = 'pending'",
            )?
            .execute(params![id, error, next_at.timestamp(), *ambiguous as i64])?;
            Ok(Outcome::Pending)
        }
    }
}

/// Makes every held event due at `now` (an operator's flush: a subscription may just have been activated).
pub fn release_holds(conn: &Connection, now: DateTime<Utc>) -> Result<usize, JournalError> {
    Ok(conn
        .prepare_cached(
            "UPDATE outbound_events SET next_attempt_at = ?1 WHERE state = 'pending' AND held IS NOT NULL AND next_attempt_at > ?1",
        )?
        .execute([now.timestamp()])?)
}

/// Marks an attempt as under way (committed before the call), so that a crash during the call is remembered as
/// a possibly recorded attempt.
pub fn mark_attempt(conn: &Connection, ids: &[i64]) -> Result<(), JournalError> {
    let mut stmt = conn.prepare_cached("UPDATE outbound_events SET attempts = attempts + 1, in_flight = 1 WHERE id = ?1 AND state = 'pending'")?;
    for id in ids {
        stmt.execute([id])?;
    }
    Ok(())
}

/// After a crash: attempts left in flight may have reached the marketplace. Call only while holding the lease.
pub fn recover_in_flight(conn: &Connection) -> Result<usize, JournalError> {
    Ok(conn.execute("UPDATE outbound_events SET ambiguous = 1, in_flight = 0 WHERE in_flight = 1 AND state = 'pending'", [])?)
}

/// Ends event `id` after its window: `expired_unconfirmed` if some attempt was ambiguous (carrying could bill
/// twice), `not_active` if it was held for its subscription, else `expired` with its units carried into the open
/// hour under `carry_forward`.
fn expire(
    conn: &Connection,
    id: i64,
    message: &str,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
    by_deadline: bool,
) -> Result<Outcome, JournalError> {
    let late = policy.late;
    type Row = (
        String,
        String,
        String,
        i64,
        i64,
        i64,
        Option<String>,
        Option<i64>,
        i64,
    );
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT resource, plan, dimension, hour, quantity, ambiguous, held, send_quantity, prebilled FROM outbound_events
             WHERE id = ?1 AND state = 'pending'",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)))
        .optional()?;
    let Some((resource, plan, dimension, hour, raw, ambiguous, held, send_quantity, prebilled)) =
        row
    else {
        return Ok(Outcome::Pending);
    };
    // A billed event carries what its whole units covered (it already went through the allowance); the
    // sub-unit remainder it left in `remainders` stays there and meets the next hour from there, so carrying it
    // too would bill it twice. An event never billed carries its raw usage, which meets the allowance again in
    // its new hour.
    let (qty, carry_prebilled) = match send_quantity {
        Some(s) => {
            let covered = sent_raw(s, policy.unit(&dimension));
            (covered, covered)
        }
        None => (raw, prebilled),
    };
    let now_s = now.timestamp();
    let (state, carried_to) = if ambiguous != 0 {
        (Outcome::ExpiredUnconfirmed, None)
    } else if by_deadline && held.is_some() {
        restore_remainder(conn, id, policy.unit(&dimension))?;
        (Outcome::NotActive, None)
    } else if late == LateUsage::CarryForward {
        let target = hour_of(now).max(frozen_through(conn)?);
        add_to_hour(conn, &resource, &plan, &dimension, target, qty, 0, qty)?;
        add_prebilled(conn, &resource, &plan, &dimension, target, carry_prebilled)?;
        record_carry(
            conn,
            &resource,
            &plan,
            &dimension,
            hour,
            target,
            qty,
            Outcome::Expired.as_str(),
            Some(id),
            now_s,
        )?;
        (Outcome::Expired, Some(target))
    } else {
        restore_remainder(conn, id, policy.unit(&dimension))?;
        (Outcome::Expired, None)
    };
    let error = match (state, &held) {
        (Outcome::NotActive, Some(h)) => format!("window ran out while held: {h}"),
        (Outcome::ExpiredUnconfirmed, _) => {
            format!("{message}; an earlier attempt may have been recorded: run `meterd reconcile`")
        }
        _ => message.to_string(),
    };
    conn.prepare_cached(
        "UPDATE outbound_events SET state = ?2, last_error = ?3, carried_to = ?4, finished_at = ?5 WHERE id = ?1",
    )?
    .execute(params![id, state.as_str(), error, carried_to, now_s])?;
    Ok(state)
}

/// An event ended by its deadline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Expired {
    /// Row id.
    pub id: i64,
    /// Resource.
    pub resource: String,
    /// Dimension.
    pub dimension: String,
    /// Hour, RFC 3339.
    pub hour: String,
    /// Outcome written.
    pub state: Outcome,
}

/// Ends every pending event whose retry deadline has passed.
pub fn expire_overdue(
    conn: &Connection,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<Vec<Expired>, JournalError> {
    let ids: Vec<(i64, String, String, i64, Option<String>)> = conn
        .prepare_cached("SELECT id, resource, dimension, hour, last_error FROM outbound_events WHERE state = 'pending' AND deadline <= ?1 ORDER BY hour")?
        .query_map([now.timestamp()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for (id, resource, dimension, hour, last_error) in ids {
        let msg = format!(
            "retries stopped at the end of the 24-hour window (less emit.safety_margin){}",
            last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        let state = expire(conn, id, &msg, now, policy, true)?;
        out.push(Expired {
            id,
            resource,
            dimension,
            hour: fmt_time(hour),
            state,
        });
    }
    Ok(out)
}

pub use super::leases::{acquire_lease, clear_leases, release_lease};
pub use super::subscriptions::{
    KnownSubscription, ListedSubscription, known_subscriptions, store_subscriptions,
};

pub use super::alerts::{
    event_summary, raise_expired_unconfirmed, raise_for_settle, raise_pending_age_alerts,
};

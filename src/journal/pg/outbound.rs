//! Outbound events in the shared journal: claims under a lease with a fencing counter (F4 of [`super`]), the
//! attempt mark, billing and the body at the first send, fenced settles, expiry.
//!
//! - **Claim** ([`claim`]): up to `limit` due events, `FOR UPDATE SKIP LOCKED`, whose lease is free or expired
//!   (`lease_until` by the database clock); each gets `lease_owner`, `lease_until = db now + lease` and
//!   `fence = fence + 1`. An event claimed while `in_flight = 1` (its previous owner's lease expired during a
//!   call) becomes `ambiguous`: the call may have been recorded, so the resend is of the same bytes and a
//!   same-quantity `Duplicate` counts as billed once.
//! - **Mark** ([`mark_attempt`]): `attempts + 1`, `in_flight = 1` and the lease renewed, for every event of the
//!   call or none (fence lost: the call is not made).
//! - **Settle** ([`settle`]): applies only while `lease_owner` and `fence` still match, and frees the lease; a
//!   stale owner's settle changes nothing (logged, `meterd_fleet_stale_settles_total`).
//!
//! The rules of each outcome are those of `journal/outbound.rs` (the SQLite side), statement for statement.

use super::PgError;
use super::billing::{bill_batch, event_summary, raise_alert};
use crate::alert_kind::{AlertKey, AlertKind};
use crate::bill::Bill;
use crate::clock::{HOUR, fmt_time, hour_of};
use crate::config::{LateUsage, Settings};
use crate::journal::Disposition;
use crate::journal::outbound::{Expired, PendingEvent, REFUSED, Settle, SettlePolicy};
use crate::outcome::Outcome;
use chrono::{DateTime, Duration, Utc};
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::{GenericClient, Transaction};

/// The database clock in unix seconds (leases are measured by it, never by a replica's clock).
pub const DB_NOW: &str = "extract(epoch from clock_timestamp())::bigint";

/// Adds carried units to an hour's total (`records` records; all of `quantity` counts as carried in).
#[allow(clippy::too_many_arguments)]
pub async fn add_to_hour(
    tx: &Transaction<'_>,
    resource: &str,
    plan: &str,
    dimension: &str,
    hour: i64,
    quantity: i64,
    records: i64,
) -> Result<(), PgError> {
    tx.execute(
        "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, carried_in)
         VALUES ($1, $2, $3, $4, $5, $6, $5)
         ON CONFLICT (resource, plan, dimension, hour) DO UPDATE SET
             quantity = hourly_totals.quantity + excluded.quantity,
             records = hourly_totals.records + excluded.records,
             carried_in = hourly_totals.carried_in + excluded.carried_in",
        &[&resource, &plan, &dimension, &hour, &quantity, &records],
    )
    .await?;
    Ok(())
}

/// Records that `quantity` moved from hour `from` to hour `to`.
#[allow(clippy::too_many_arguments)]
pub async fn record_carry(
    tx: &Transaction<'_>,
    resource: &str,
    plan: &str,
    dimension: &str,
    from: i64,
    to: i64,
    quantity: i64,
    reason: &str,
    outbound_id: Option<i64>,
    now: i64,
) -> Result<(), PgError> {
    if outbound_id.is_some() {
        tx.execute(
            "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, outbound_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[&resource, &plan, &dimension, &from, &to, &quantity, &reason, &outbound_id, &now],
        )
        .await?;
    } else {
        tx.execute(
            "INSERT INTO carries (resource, plan, dimension, from_hour, to_hour, quantity, reason, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (resource, plan, dimension, from_hour, to_hour, reason) WHERE outbound_id IS NULL
             DO UPDATE SET quantity = carries.quantity + excluded.quantity",
            &[&resource, &plan, &dimension, &from, &to, &quantity, &reason, &now],
        )
        .await?;
    }
    Ok(())
}

/// An event claimed by this replica: the event and the fence its settle must present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The event as the emitter sees it.
    pub event: PendingEvent,
    /// The fencing counter this claim set.
    pub fence: i64,
    /// The previous lease expired while a call was in flight: this claim made the event ambiguous.
    pub recovered: bool,
}

/// The claim: up to `limit` events due at `now` for `owner`, oldest hour first, skipping events another replica
/// holds (row locks: `SKIP LOCKED`; leases: `lease_until` by the database clock). One statement (parameters: now,
/// limit, owner, lease seconds, [`REFUSED`], excluded ids), run in the transaction of
/// `PgJournal::settle_and_mark` after [`GENERIC_PLANS`].
///
/// `ORDER BY hour` alone (not `hour, id`): the index `outbound_events_state (state, hour)` then yields the rows in
/// that order and the scan stops at the 25th lockable one. Ordered by `hour, id`, PostgreSQL 15 chose a bitmap scan
/// of every pending row (each claim, mark and settle leaves a new index entry behind) and a sort: 412 ms per claim
/// with 9,000 events pending in the 100,000-event benchmark, 0.7 ms this way (docs/performance.md). Within an
/// hour the order does not matter (one event per key and hour; billing sorts its batch itself).
/// Events in `excluding` are never claimed (a worker's own call in flight, while it claims its next batch).
pub static CLAIM_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH c AS (
             SELECT id, in_flight AS was_in_flight FROM outbound_events
             WHERE state = 'pending' AND next_attempt_at <= $1 AND deadline > $1
               AND (lease_until IS NULL OR lease_until <= {DB_NOW}) AND id <> ALL($6::int8[])
             ORDER BY hour LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE outbound_events o SET lease_owner = $3, lease_until = {DB_NOW} + $4, fence = o.fence + 1,
                ambiguous = CASE WHEN c.was_in_flight = 1 THEN 1 ELSE o.ambiguous END, in_flight = 0
         FROM c WHERE o.id = c.id
         RETURNING o.id, o.resource, o.plan, o.dimension, o.hour, o.quantity, o.body, o.attempts, o.deadline,
                   o.ambiguous, o.held IS NOT NULL, o.prebilled, o.send_quantity,
                   COALESCE(substr(o.held, 1, length($5)) = $5, false), o.fence, c.was_in_flight = 1"
    )
});

/// Set right before each claim ([`CLAIM_SQL`], in its transaction): the claim runs its generic plan from the
/// first execution on a connection. With the parameters' values, and statistics that lag the table (a freeze
/// adds thousands of pending rows at once; ANALYZE comes later, or never with autovacuum off), PostgreSQL
/// planned the claim as a bitmap scan of every due row of `outbound_events_due` plus a sort:
/// 120 ms per claim at 45,000 pending in the benchmark, for the first five executions on each connection (the
/// plan cache tries custom plans five times before it compares them with the generic one), against 0.6 ms for
/// the generic plan, the `(state, hour)` index in order, stopping at the 25th row. Transaction-local, so a
/// pooler in transaction mode is fine. Only for the claim: the billing reads joined with `unnest` of a batch's
/// keys did worse with generic plans (the read of `term_usage`: 0.67 ms against 0.43 per batch).
pub const GENERIC_PLANS: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

/// What a claim asks for: up to `limit` events due at `now`, under a lease of `lease`, none of `excluding`.
#[derive(Debug, Clone)]
pub struct ClaimArgs {
    /// The pass's time (due and deadline are measured by it; the lease by the database clock).
    pub now: DateTime<Utc>,
    /// At most this many events.
    pub limit: i64,
    /// The lease length.
    pub lease: Duration,
    /// Never these events (the claimer's own calls).
    pub excluding: Vec<i64>,
}

/// Runs the claim `stmt` ([`CLAIM_SQL`], prepared on `c`) for `owner`; the caller commits.
pub async fn claim_with(
    c: &(impl GenericClient + Sync),
    stmt: &tokio_postgres::Statement,
    a: &ClaimArgs,
    owner: &str,
) -> Result<Vec<Claimed>, PgError> {
    let rows = c
        .query(
            stmt,
            &[
                &a.now.timestamp(),
                &a.limit,
                &owner,
                &a.lease.num_seconds(),
                &REFUSED,
                &a.excluding,
            ],
        )
        .await?;
    let mut out: Vec<Claimed> = rows
        .into_iter()
        .map(|r| Claimed {
            event: PendingEvent {
                id: r.get(0),
                resource: r.get(1),
                plan: r.get(2),
                dimension: r.get(3),
                hour: r.get(4),
                quantity: r.get(5),
                body: r.get(6),
                attempts: r.get(7),
                deadline: r.get(8),
                ambiguous: r.get::<_, i64>(9) != 0,
                held: r.get(10),
                prebilled: r.get(11),
                send_quantity: r.get(12),
                refused: r.get(13),
            },
            fence: r.get(14),
            recovered: r.get(15),
        })
        .collect();
    out.sort_by_key(|c| (c.event.hour, c.event.id));
    let recovered = out.iter().filter(|c| c.recovered).count();
    if recovered > 0 {
        tracing::warn!(
            message = "Claimed events whose previous lease expired during a call; they count as possibly recorded.",
            events = recovered,
            owner
        );
    }
    Ok(out)
}

/// The mark of a call's events (see [`mark_attempt`]); parameters: ids, fences, bodies, owner, lease seconds,
/// count.
pub const MARK_SQL: &str = "WITH mine AS MATERIALIZED (
         SELECT o.id FROM outbound_events o
           JOIN unnest($1::bigint[], $2::bigint[], $3::text[]) AS f(id, fence, body)
           ON o.id = f.id AND o.fence = f.fence AND o.body = f.body
         WHERE o.lease_owner = $4 AND o.state = 'pending' ORDER BY o.id FOR UPDATE OF o)
     UPDATE outbound_events o SET attempts = o.attempts + 1, in_flight = 1,
            lease_until = extract(epoch from clock_timestamp())::bigint + $5
     FROM mine WHERE o.id = mine.id AND (SELECT count(*) FROM mine) = $6";

/// Marks a call's events in flight (attempts + 1) and renews their leases, all or none, with `stmt` (the
/// prepared [`MARK_SQL`]): false (nothing changed) when any of them is no longer `owner`'s at its fence, or its
/// stored body is not the body about to be sent; the call must then not be made. `marks` are (id, fence, body to
/// send). One statement: the events still ours are locked first (`FOR UPDATE`, re-checked against concurrent
/// claims), and the update applies only when that is all of them.
///
/// The body check makes the bill-and-body transaction's asynchronous commit safe (see `dispose`): a mark applies
/// only when the transaction that billed the event and wrote those bytes is committed and visible, so it precedes
/// the mark in the WAL, and the mark's synchronous commit flushes it. Had a PostgreSQL crash lost it (its claim
/// survived, or was redone by another worker of this replica at the same fence), the stored body is empty or
/// another one, the mark changes nothing and those bytes are never sent.
pub async fn mark_attempt(
    c: &(impl GenericClient + Sync),
    stmt: &tokio_postgres::Statement,
    owner: &str,
    marks: &[(i64, i64, &str)],
    lease: Duration,
) -> Result<bool, PgError> {
    let mut cols: (Vec<i64>, Vec<i64>, Vec<&str>) = Default::default();
    for (id, fence, body) in marks {
        cols.0.push(*id);
        cols.1.push(*fence);
        cols.2.push(body);
    }
    let n = c
        .execute(
            stmt,
            &[
                &cols.0,
                &cols.1,
                &cols.2,
                &owner,
                &lease.num_seconds(),
                &(marks.len() as i64),
            ],
        )
        .await?;
    Ok(n as usize == marks.len())
}

/// Frees `owner`'s leases on `fenced` (id, fence) events claimed and not sent: any replica may claim them at
/// once. Only events not in flight are freed (one marked for a call stays held until its answer or its lease's
/// end), and an event whose fence moved on is left alone.
pub async fn release_leases(
    c: &deadpool_postgres::ClientWrapper,
    owner: &str,
    fenced: &[(i64, i64)],
) -> Result<u64, PgError> {
    let (ids, fences): (Vec<i64>, Vec<i64>) = fenced.iter().copied().unzip();
    Ok(c.execute(
        "UPDATE outbound_events o SET lease_owner = NULL, lease_until = NULL
         FROM unnest($1::bigint[], $2::bigint[]) AS f(id, fence)
         WHERE o.id = f.id AND o.fence = f.fence AND o.lease_owner = $3 AND o.state = 'pending'
           AND o.in_flight = 0",
        &[&ids, &fences, &owner],
    )
    .await?)
}

/// The raw usage the whole units of a billed event cover.
fn sent_raw(send_quantity: i64, unit: i64) -> i64 {
    send_quantity.saturating_mul(unit)
}

fn unit_of(policy: &SettlePolicy, dimension: &str) -> i64 {
    policy.units.get(dimension).copied().unwrap_or(1).max(1)
}

/// Gives back the remainder event `id` took, when it ends without being billed (see `journal/outbound.rs`).
async fn restore_remainder(tx: &Transaction<'_>, id: i64, unit: i64) -> Result<(), PgError> {
    let row = tx
        .query_opt(
            "SELECT resource, dimension, quantity, prebilled, COALESCE(included, 0), send_quantity
             FROM outbound_events WHERE id = $1 AND billable IS NOT NULL",
            &[&id],
        )
        .await?;
    let Some(r) = row else { return Ok(()) };
    let (resource, dimension): (String, String) = (r.get(0), r.get(1));
    let (raw, prebilled, included): (i64, i64, i64) = (r.get(2), r.get(3), r.get(4));
    let Some(send) = r.get::<_, Option<i64>>(5) else {
        return Ok(());
    };
    let overage = raw - prebilled - included;
    let delta = sent_raw(send, unit) - overage - prebilled;
    if delta != 0 {
        tx.execute(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES ($1, $2, $3)
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = remainders.remainder + excluded.remainder",
            &[&resource, &dimension, &delta],
        )
        .await?;
    }
    Ok(())
}

/// Whether `owner` still holds event `id` at `fence` (the row is locked until the transaction ends). A stale
/// holder is logged and counted.
async fn still_ours(
    tx: &Transaction<'_>,
    id: i64,
    owner: &str,
    fence: i64,
) -> Result<bool, PgError> {
    let row = tx
        .query_opt(
            "SELECT lease_owner, fence, state FROM outbound_events WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
    let Some(r) = row else { return Ok(false) };
    let (holder, current, state): (Option<String>, i64, String) = (r.get(0), r.get(1), r.get(2));
    if holder.as_deref() == Some(owner) && current == fence && state == "pending" {
        return Ok(true);
    }
    tracing::warn!(
        message = "Settle refused: this replica's lease on the event ended (another replica claimed it, or it settled); nothing changed.",
        id, owner, fence, current_fence = current, holder = holder.as_deref().unwrap_or(""), state = %state
    );
    metrics::counter!("meterd_fleet_stale_settles_total").increment(1);
    Ok(false)
}

/// Of `fenced` (id, fence), the events `owner` still holds at their fence, locked until the transaction ends (one
/// round trip for a batch); the others are logged and counted as stale.
async fn owned(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    fenced: &[(i64, i64)],
) -> Result<std::collections::HashSet<i64>, PgError> {
    if fenced.is_empty() {
        return Ok(Default::default());
    }
    let (ids, fences): (Vec<i64>, Vec<i64>) = fenced.iter().copied().unzip();
    let stmt = tx
        .prepare_cached(
            "SELECT o.id FROM outbound_events o JOIN unnest($1::bigint[], $2::bigint[]) AS f(id, fence)
               ON o.id = f.id AND o.fence = f.fence
             WHERE o.lease_owner = $3 AND o.state = 'pending' ORDER BY o.id FOR UPDATE OF o",
        )
        .await?;
    let rows = tx.query(&stmt, &[&ids, &fences, &owner]).await?;
    let mine: std::collections::HashSet<i64> = rows.into_iter().map(|r| r.get(0)).collect();
    for (id, fence) in fenced.iter().filter(|(id, _)| !mine.contains(id)) {
        tracing::warn!(
            message = "This replica's lease on a claimed event ended before its body was written; another replica sends it.",
            id,
            owner,
            fence
        );
        metrics::counter!("meterd_fleet_stale_settles_total").increment(1);
    }
    Ok(mine)
}

/// Records the outcome of one attempt (or decision) for event `id` under `owner`'s lease at `fence`, and frees
/// the lease. `None` when the lease is no longer ours (nothing changed).
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    tx: &Transaction<'_>,
    id: i64,
    owner: &str,
    fence: i64,
    outcome: &Settle,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<Option<Outcome>, PgError> {
    if !still_ours(tx, id, owner, fence).await? {
        return Ok(None);
    }
    let now_s = now.timestamp();
    let state = match outcome {
        Settle::Accepted { usage_event_id } => {
            finish(
                tx,
                id,
                Outcome::Accepted,
                None,
                usage_event_id.as_deref(),
                None,
                now_s,
                policy,
            )
            .await?
        }
        Settle::Duplicate {
            market_quantity,
            usage_event_id,
        } => {
            finish(
                tx,
                id,
                Outcome::Duplicate,
                None,
                usage_event_id.as_deref(),
                *market_quantity,
                now_s,
                policy,
            )
            .await?
        }
        Settle::DuplicateMismatch { market_quantity } => {
            finish(
                tx,
                id,
                Outcome::DuplicateMismatch,
                Some("the marketplace holds another quantity for this hour"),
                None,
                Some(*market_quantity),
                now_s,
                policy,
            )
            .await?
        }
        Settle::Rejected { reason } => {
            finish(
                tx,
                id,
                Outcome::Rejected,
                Some(reason),
                None,
                None,
                now_s,
                policy,
            )
            .await?
        }
        Settle::SkippedUnsubscribed => {
            finish(
                tx,
                id,
                Outcome::SkippedUnsubscribed,
                Some("the subscription was cancelled before this hour closed"),
                None,
                None,
                now_s,
                policy,
            )
            .await?
        }
        Settle::Expired { message } => expire(tx, id, message, now, policy, false).await?,
        Settle::Hold { reason, next_at } => {
            tx.execute(
                "UPDATE outbound_events SET held = $2, last_error = $2, next_attempt_at = $3, in_flight = 0,
                        lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND state = 'pending'",
                &[&id, &reason, &next_at.timestamp()],
            )
            .await?;
            Outcome::Pending
        }
        Settle::Defer { reason, next_at } => {
            tx.execute(
                "UPDATE outbound_events SET last_error = $2, next_attempt_at = $3, held = NULL, in_flight = 0,
                        lease_owner = NULL, lease_until = NULL
                 WHERE id = $1 AND state = 'pending'",
                &[&id, &reason, &next_at.timestamp()],
            )
            .await?;
            Outcome::Pending
        }
        Settle::Retry {
            error,
            next_at,
            ambiguous,
        } => {
            tx.execute(
                // A retry due at once (the halves of a batch refused with 400) keeps the lease: the same
                // sender goes on with it; any later retry frees it for whichever replica claims it then.
                "UPDATE outbound_events SET last_error = $2, next_attempt_at = $3,
                        ambiguous = GREATEST(ambiguous, $4), held = NULL, in_flight = 0,
                        lease_owner = CASE WHEN $3::bigint <= $5::bigint THEN lease_owner END,
                        lease_until = CASE WHEN $3::bigint <= $5::bigint THEN lease_until END
                 WHERE id = $1 AND state = 'pending'",
                &[
                    &id,
                    &error,
                    &next_at.timestamp(),
                    &(*ambiguous as i64),
                    &now_s,
                ],
            )
            .await?;
            Outcome::Pending
        }
    };
    Ok(Some(state))
}

#[allow(clippy::too_many_arguments)]
async fn finish(
    tx: &Transaction<'_>,
    id: i64,
    state: Outcome,
    error: Option<&str>,
    usage_event_id: Option<&str>,
    market: Option<i64>,
    now_s: i64,
    policy: &SettlePolicy,
) -> Result<Outcome, PgError> {
    let row = tx
        .query_opt(
            "SELECT dimension FROM outbound_events WHERE id = $1 AND state = 'pending'",
            &[&id],
        )
        .await?;
    if let Some(r) = row
        && matches!(state, Outcome::Rejected | Outcome::SkippedUnsubscribed)
    {
        let dimension: String = r.get(0);
        restore_remainder(tx, id, unit_of(policy, &dimension)).await?;
    }
    tx.execute(
        "UPDATE outbound_events SET state = $2, last_error = COALESCE($3, last_error), usage_event_id = $4,
                market_quantity = $5, finished_at = $6, held = NULL, in_flight = 0, lease_owner = NULL, lease_until = NULL
         WHERE id = $1 AND state = 'pending'",
        &[&id, &state.as_str(), &error, &usage_event_id, &market, &now_s],
    )
    .await?;
    Ok(state)
}

/// Ends event `id` after its window (the rules of `journal/outbound.rs`): `expired_unconfirmed` after an
/// ambiguous attempt, `not_active` if held by its deadline, else `expired` (carried under `carry_forward`).
async fn expire(
    tx: &Transaction<'_>,
    id: i64,
    message: &str,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
    by_deadline: bool,
) -> Result<Outcome, PgError> {
    let row = tx
        .query_opt(
            "SELECT resource, plan, dimension, hour, quantity, ambiguous, held, send_quantity, prebilled, in_flight
             FROM outbound_events WHERE id = $1 AND state = 'pending'",
            &[&id],
        )
        .await?;
    let Some(r) = row else {
        return Ok(Outcome::Pending);
    };
    let (resource, plan, dimension): (String, String, String) = (r.get(0), r.get(1), r.get(2));
    let (hour, raw, ambiguous): (i64, i64, i64) = (r.get(3), r.get(4), r.get(5));
    let held: Option<String> = r.get(6);
    let send_quantity: Option<i64> = r.get(7);
    let (prebilled, in_flight): (i64, i64) = (r.get(8), r.get(9));
    let unit = unit_of(policy, &dimension);
    let (qty, carry_prebilled) = match send_quantity {
        Some(s) => {
            let covered = sent_raw(s, unit);
            (covered, covered)
        }
        None => (raw, prebilled),
    };
    let now_s = now.timestamp();
    // A call left in flight by a replica whose lease ran out may have been recorded.
    let (state, carried_to) = if ambiguous != 0 || (by_deadline && in_flight != 0) {
        (Outcome::ExpiredUnconfirmed, None)
    } else if by_deadline && held.is_some() {
        restore_remainder(tx, id, unit).await?;
        (Outcome::NotActive, None)
    } else if policy.late == LateUsage::CarryForward {
        let through: i64 = tx
            .query_opt("SELECT value FROM meta WHERE key = 'frozen_through'", &[])
            .await?
            .map(|r| r.get(0))
            .unwrap_or(i64::MIN);
        let target = hour_of(now).max(through);
        add_to_hour(tx, &resource, &plan, &dimension, target, qty, 0).await?;
        if carry_prebilled != 0 {
            tx.execute(
                "UPDATE hourly_totals SET prebilled = prebilled + $5
                 WHERE resource = $1 AND plan = $2 AND dimension = $3 AND hour = $4",
                &[&resource, &plan, &dimension, &target, &carry_prebilled],
            )
            .await?;
        }
        record_carry(
            tx,
            &resource,
            &plan,
            &dimension,
            hour,
            target,
            qty,
            Outcome::Expired.as_str(),
            Some(id),
            now_s,
        )
        .await?;
        (Outcome::Expired, Some(target))
    } else {
        restore_remainder(tx, id, unit).await?;
        (Outcome::Expired, None)
    };
    let error = match (state, &held) {
        (Outcome::NotActive, Some(h)) => format!("window ran out while held: {h}"),
        (Outcome::ExpiredUnconfirmed, _) => {
            format!("{message}; an earlier attempt may have been recorded: run `meterd reconcile`")
        }
        _ => message.to_string(),
    };
    tx.execute(
        "UPDATE outbound_events SET state = $2, last_error = $3, carried_to = $4, finished_at = $5,
                in_flight = 0, ambiguous = GREATEST(ambiguous, in_flight), lease_owner = NULL, lease_until = NULL
         WHERE id = $1",
        &[&id, &state.as_str(), &error, &carried_to, &now_s],
    )
    .await?;
    Ok(state)
}

/// Ends every pending event whose retry deadline has passed and that no replica holds a live lease on (a holder
/// mid-call settles it itself; it is expired by a later pass otherwise), raising the reconcile alert of each
/// `expired_unconfirmed`.
pub async fn expire_overdue(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<Vec<Expired>, PgError> {
    let sql = format!(
        "SELECT id, resource, dimension, hour, last_error FROM outbound_events
         WHERE state = 'pending' AND deadline <= $1 AND (lease_until IS NULL OR lease_until <= {DB_NOW})
         ORDER BY hour, id FOR UPDATE SKIP LOCKED"
    );
    let rows = tx.query(&sql, &[&now.timestamp()]).await?;
    let mut out = Vec::new();
    for r in rows {
        let (id, resource, dimension, hour): (i64, String, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let last_error: Option<String> = r.get(4);
        let msg = format!(
            "retries stopped at the end of the 24-hour window (less emit.safety_margin){}",
            last_error
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        );
        let state = expire(tx, id, &msg, now, policy, true).await?;
        if state == Outcome::ExpiredUnconfirmed {
            raise_expired_unconfirmed(tx, id, now).await?;
        }
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

/// The reconcile alert of an event that ended `expired_unconfirmed`, logged at error level.
async fn raise_expired_unconfirmed(
    tx: &Transaction<'_>,
    id: i64,
    now: DateTime<Utc>,
) -> Result<(), PgError> {
    let mut body = event_summary(tx, id).await?;
    body["advice"] =
        "an attempt may have been recorded; run `meterd reconcile --date` for this day".into();
    if raise_alert(
        tx,
        &AlertKey::event(AlertKind::ExpiredUnconfirmed, id),
        body.clone(),
        now,
    )
    .await?
    {
        tracing::error!(
            message = "Event expired after an ambiguous attempt; nothing carried. Run `meterd reconcile` for its day.",
            resource = %body["resource"].as_str().unwrap_or(""), dimension = %body["dimension"].as_str().unwrap_or(""),
            hour = %body["hour"].as_str().unwrap_or(""), alert = "expired_unconfirmed"
        );
    }
    Ok(())
}

/// The alert an answer calls for (duplicate mismatch, rejection), in the settle's transaction.
async fn raise_for_settle(
    tx: &Transaction<'_>,
    id: i64,
    s: &Settle,
    now: DateTime<Utc>,
) -> Result<(), PgError> {
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
    let mut body = event_summary(tx, id).await?;
    if let (Some(b), Some(d)) = (body.as_object_mut(), detail.as_object()) {
        b.extend(d.clone());
    }
    raise_alert(tx, &AlertKey::event(kind, id), body, now).await?;
    Ok(())
}

/// Raises a `pending_age` alert (once per event) for events pending longer than `age` since their hour ended.
/// Set-based: one read of the events old enough that have no such alert yet, and one insert of their alerts per
/// chunk (`ON CONFLICT DO NOTHING`: a replica raising the same alerts at once adds none twice).
pub async fn raise_pending_age_alerts(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    age: Duration,
) -> Result<usize, PgError> {
    let limit = now.timestamp() - age.num_seconds() - HOUR;
    let kind = AlertKind::PendingAge.as_str();
    let prefix = format!("{kind}:");
    let rows = tx
        .query(
            &format!(
                "SELECT o.id, o.deadline, o.last_error, {} FROM outbound_events o
                 WHERE o.state = 'pending' AND o.hour <= $1
                   AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.dedupe = $2 || o.id::text)
                 ORDER BY o.id",
                super::billing::SUMMARY_COLUMNS
            ),
            &[&limit, &prefix],
        )
        .await?;
    let mut n = 0;
    for chunk in rows.chunks(5000) {
        let mut dedupes = Vec::with_capacity(chunk.len());
        let mut bodies = Vec::with_capacity(chunk.len());
        for r in chunk {
            let (id, deadline, last_error): (i64, i64, Option<String>) =
                (r.get(0), r.get(1), r.get(2));
            let mut body = super::billing::summary_of(r, 3);
            body["seconds_to_expiry"] = (deadline - now.timestamp()).into();
            body["last_error"] = last_error.into();
            let key = AlertKey::event(AlertKind::PendingAge, id);
            bodies.push(super::billing::alert_body(&key, body, now));
            dedupes.push(key.dedupe);
        }
        let raised = tx
            .query(
                "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at)
                 SELECT $1, d, b, $4, $4 FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(d, b, n)
                 ORDER BY n
                 ON CONFLICT (dedupe) DO NOTHING RETURNING dedupe",
                &[&kind, &dedupes, &bodies, &now.timestamp()],
            )
            .await?;
        for r in &raised {
            let dedupe: String = r.get(0);
            let id = dedupe.strip_prefix(&prefix).unwrap_or(&dedupe);
            tracing::warn!(
                message = "An event has been pending longer than alerts.pending_age.",
                id,
                alert = "pending_age"
            );
        }
        if !raised.is_empty() {
            metrics::counter!("meterd_alerts_total", "kind" => kind.to_string())
                .increment(raised.len() as u64);
        }
        n += raised.len();
    }
    Ok(n)
}

/// Makes every held event due at `now` (an operator's flush).
pub async fn release_holds(tx: &Transaction<'_>, now: DateTime<Utc>) -> Result<u64, PgError> {
    Ok(tx
        .execute(
            "UPDATE outbound_events SET next_attempt_at = $1 WHERE state = 'pending' AND held IS NOT NULL AND next_attempt_at > $1",
            &[&now.timestamp()],
        )
        .await?)
}

/// Writes the frozen body, plan and billing figures of each event once (an event with a body keeps it), in one
/// statement; returns the body to send of each (by id).
async fn set_bodies(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[(i64, &str, String, &Bill)],
) -> Result<HashMap<i64, String>, PgError> {
    #[allow(clippy::type_complexity)]
    let mut cols: (
        Vec<i64>,
        Vec<&str>,
        Vec<&str>,
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
    ) = Default::default();
    for (id, plan, body, bill) in rows {
        cols.0.push(*id);
        cols.1.push(plan);
        cols.2.push(body);
        cols.3.push(bill.included);
        cols.4.push(bill.billable);
        cols.5.push(bill.send);
        cols.6.push(bill.term_start);
    }
    let write = tx
        .prepare_cached(
            "UPDATE outbound_events o SET plan = f.plan, body = f.body, included = f.included, billable = f.billable,
                    send_quantity = f.send, term_start = f.term_start
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
                  AS f(id, plan, body, included, billable, send, term_start)
             WHERE o.id = f.id AND o.body = '' RETURNING o.id, o.body",
        )
        .await?;
    let mut stored: HashMap<i64, String> = tx
        .query(
            &write,
            &[
                &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6,
            ],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let kept: Vec<i64> = cols
        .0
        .iter()
        .copied()
        .filter(|id| !stored.contains_key(id))
        .collect();
    if !kept.is_empty() {
        // Written before (cannot happen under our lease, which an empty claimed body implies): keep that body.
        for r in tx
            .query(
                "SELECT id, body FROM outbound_events WHERE id = ANY($1)",
                &[&kept],
            )
            .await?
        {
            stored.insert(r.get(0), r.get(1));
        }
    }
    Ok(stored)
}

/// Settles events that billing left nothing to send for (`included` or `remainder`), freeing their leases, in
/// one statement.
async fn settle_unbilled(
    tx: &deadpool_postgres::Transaction<'_>,
    rows: &[(i64, &str, &Bill)],
    now: DateTime<Utc>,
) -> Result<(), PgError> {
    #[allow(clippy::type_complexity)]
    let mut cols: (Vec<i64>, Vec<&str>, Vec<&str>, Vec<i64>, Vec<i64>, Vec<i64>) =
        Default::default();
    for (id, plan, bill) in rows {
        cols.0.push(*id);
        cols.1.push(plan);
        cols.2.push(unbilled_state(bill).as_str());
        cols.3.push(bill.included);
        cols.4.push(bill.billable);
        cols.5.push(bill.term_start);
    }
    let write = tx
        .prepare_cached(
            "UPDATE outbound_events o SET plan = f.plan, state = f.state, included = f.included,
                    billable = f.billable, send_quantity = 0, term_start = f.term_start, finished_at = $7,
                    held = NULL, in_flight = 0, lease_owner = NULL, lease_until = NULL
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[])
                  AS f(id, plan, state, included, billable, term_start)
             WHERE o.id = f.id AND o.state = 'pending'",
        )
        .await?;
    tx.execute(
        &write,
        &[
            &cols.0,
            &cols.1,
            &cols.2,
            &cols.3,
            &cols.4,
            &cols.5,
            &now.timestamp(),
        ],
    )
    .await?;
    Ok(())
}

/// The outcome of an event billing left nothing to send for.
fn unbilled_state(bill: &Bill) -> Outcome {
    if bill.billable == 0 {
        Outcome::Included
    } else {
        Outcome::Remainder
    }
}

/// One transaction for a claimed batch: settles what is not sent, bills what is sent for the first time and
/// writes its body (`body(event, plan, quantity to send)`), each only while `owner` holds it at its fence.
/// Events billed are taken in (resource, dimension, hour) order, so concurrent replicas lock billing rows in
/// one order. Billing and bodies are set-based ([`bill_batch`], one statement for the bodies, one for the events
/// settled unbilled), so a batch costs a handful of round trips, not several per event. Returns the events to
/// send (with their fences) and the count per outcome settled.
#[allow(clippy::type_complexity)]
pub async fn dispose<B>(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    mut decided: Vec<(Claimed, Disposition)>,
    settings: &Settings,
    now: DateTime<Utc>,
    policy: &SettlePolicy,
    body: &B,
) -> Result<(Vec<Claimed>, BTreeMap<String, usize>), PgError>
where
    B: Fn(&PendingEvent, &str, i64) -> String,
{
    decided.sort_by(|(a, _), (b, _)| {
        (&a.event.resource, &a.event.dimension, a.event.hour).cmp(&(
            &b.event.resource,
            &b.event.dimension,
            b.event.hour,
        ))
    });
    let mut sendable = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let to_send: Vec<(i64, i64)> = decided
        .iter()
        .filter(|(_, d)| matches!(d, Disposition::Send { .. }))
        .map(|(c, _)| (c.event.id, c.fence))
        .collect();
    // Nothing outside the database depends on this transaction before the call's mark, a synchronous commit
    // that flushes the WAL up to it (as does any synchronous commit that read what it wrote): it may commit
    // without waiting for its own flush. A PostgreSQL crash can lose it only whole, before anything was sent.
    let (_, owned) = tokio::try_join!(
        async {
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .await
                .map_err(PgError::from)
        },
        owned(tx, owner, &to_send),
    )?;
    // Events to bill (first send: no body yet), in (resource, dimension, hour) order.
    let mut to_bill: Vec<(Claimed, String)> = Vec::new();
    for (claimed, decision) in decided {
        let (id, fence) = (claimed.event.id, claimed.fence);
        match decision {
            Disposition::Settle(s) => {
                let Some(state) = settle(tx, id, owner, fence, &s, now, policy).await? else {
                    *counts.entry("stale".to_string()).or_default() += 1;
                    continue;
                };
                let name = match (&s, state) {
                    (Settle::Hold { .. }, _) => "held",
                    (Settle::Defer { .. }, _) => "deferred",
                    (_, st) => st.as_str(),
                };
                *counts.entry(name.to_string()).or_default() += 1;
            }
            Disposition::Send { plan } => {
                if !owned.contains(&id) {
                    *counts.entry("stale".to_string()).or_default() += 1;
                    continue;
                }
                if !claimed.event.body.is_empty() {
                    sendable.push(Claimed {
                        event: PendingEvent {
                            plan,
                            ..claimed.event
                        },
                        ..claimed
                    });
                    continue;
                }
                to_bill.push((claimed, plan));
            }
        }
    }
    if !to_bill.is_empty() {
        let items: Vec<(&PendingEvent, &str)> = to_bill
            .iter()
            .map(|(c, p)| (&c.event, p.as_str()))
            .collect();
        let bills = bill_batch(tx, settings, &items, now).await?;
        let mut unbilled: Vec<(i64, &str, &Bill)> = Vec::new();
        let mut bodies: Vec<(i64, &str, String, &Bill)> = Vec::new();
        for ((c, plan), b) in to_bill.iter().zip(&bills) {
            if b.send == 0 {
                unbilled.push((c.event.id, plan, b));
                *counts.entry(unbilled_state(b).to_string()).or_default() += 1;
            } else {
                bodies.push((c.event.id, plan, body(&c.event, plan, b.send), b));
            }
        }
        let stored = match (unbilled.is_empty(), bodies.is_empty()) {
            (false, false) => {
                tokio::try_join!(set_bodies(tx, &bodies), settle_unbilled(tx, &unbilled, now))?.0
            }
            (true, _) => set_bodies(tx, &bodies).await?,
            (false, true) => {
                settle_unbilled(tx, &unbilled, now).await?;
                HashMap::new()
            }
        };
        for ((claimed, plan), b) in to_bill.into_iter().zip(&bills) {
            if b.send == 0 {
                continue;
            }
            let body = stored.get(&claimed.event.id).cloned().unwrap_or_default();
            sendable.push(Claimed {
                event: PendingEvent {
                    body,
                    plan,
                    send_quantity: Some(b.send),
                    ..claimed.event
                },
                ..claimed
            });
        }
    }
    sendable.sort_by_key(|c| (c.event.hour, c.event.id));
    Ok((sendable, counts))
}

/// The batch settle of the common answers (accepted, duplicate), fenced per event.
pub const SETTLE_SIMPLE: &str =
    "UPDATE outbound_events o SET state = f.state, usage_event_id = f.usage_event_id,
        market_quantity = f.market_quantity, finished_at = $6, held = NULL, in_flight = 0,
        lease_owner = NULL, lease_until = NULL
 FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])
      AS f(id, fence, state, usage_event_id, market_quantity)
 WHERE o.id = f.id AND o.fence = f.fence AND o.lease_owner = $7 AND o.state = 'pending'
 RETURNING o.id, o.state";

/// True when every answer is a common one (accepted, duplicate): no alert, no billing change, so the settle is
/// the one statement [`SETTLE_SIMPLE`], atomic by itself (no transaction needed around it).
pub fn all_simple(settles: &[(i64, i64, Settle)]) -> bool {
    settles
        .iter()
        .all(|(_, _, s)| matches!(s, Settle::Accepted { .. } | Settle::Duplicate { .. }))
}

/// Settles accepted and duplicate answers with `stmt` ([`SETTLE_SIMPLE`], prepared on `c`) in one statement, each
/// only while `owner` holds it at its fence; the others are counted `stale`.
pub async fn settle_simple(
    c: &(impl GenericClient + Sync),
    stmt: &tokio_postgres::Statement,
    owner: &str,
    simple: &[&(i64, i64, Settle)],
    now: DateTime<Utc>,
    counts: &mut BTreeMap<String, usize>,
) -> Result<(), PgError> {
    let mut ids = Vec::new();
    let mut fences = Vec::new();
    let mut states = Vec::new();
    let mut usage_ids: Vec<Option<String>> = Vec::new();
    let mut markets: Vec<Option<i64>> = Vec::new();
    for (id, fence, s) in simple {
        ids.push(*id);
        fences.push(*fence);
        match s {
            Settle::Accepted { usage_event_id } => {
                states.push(Outcome::Accepted.as_str().to_string());
                usage_ids.push(usage_event_id.clone());
                markets.push(None);
            }
            Settle::Duplicate {
                market_quantity,
                usage_event_id,
            } => {
                states.push(Outcome::Duplicate.as_str().to_string());
                usage_ids.push(usage_event_id.clone());
                markets.push(*market_quantity);
            }
            _ => return Err(PgError::Invalid("not a simple settle".into())),
        }
    }
    let rows = c
        .query(
            stmt,
            &[
                &ids,
                &fences,
                &states,
                &usage_ids,
                &markets,
                &now.timestamp(),
                &owner,
            ],
        )
        .await?;
    let done: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    for r in &rows {
        *counts.entry(r.get::<_, String>(1)).or_default() += 1;
    }
    for (id, fence, _) in simple.iter().filter(|(id, _, _)| !done.contains(id)) {
        tracing::warn!(
            message = "Settle refused: this replica's lease on the event ended (another replica claimed it, or it settled); nothing changed.",
            id,
            owner,
            fence
        );
        metrics::counter!("meterd_fleet_stale_settles_total").increment(1);
        *counts.entry("stale".to_string()).or_default() += 1;
    }
    Ok(())
}

/// One transaction: the call's alert (if any), then each answered event settled (fenced) with its alerts.
/// Returns the count per outcome (`stale` for settles refused because the lease was lost).
pub async fn settle_answers(
    tx: &deadpool_postgres::Transaction<'_>,
    owner: &str,
    call_alert: Option<(AlertKey, serde_json::Value)>,
    settles: &[(i64, i64, Settle)],
    now: DateTime<Utc>,
    policy: &SettlePolicy,
) -> Result<BTreeMap<String, usize>, PgError> {
    if let Some((dedupe, body)) = &call_alert {
        raise_alert(tx, dedupe, body.clone(), now).await?;
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    // The common answers (accepted, duplicate: no alert, no billing change) in one statement for the batch.
    let (simple, rest): (Vec<_>, Vec<_>) = settles
        .iter()
        .partition(|(_, _, s)| matches!(s, Settle::Accepted { .. } | Settle::Duplicate { .. }));
    if !simple.is_empty() {
        let stmt = tx.prepare_cached(SETTLE_SIMPLE).await?;
        settle_simple(&**tx, &stmt, owner, &simple, now, &mut counts).await?;
    }
    for (id, fence, s) in rest {
        let Some(state) = settle(tx, *id, owner, *fence, s, now, policy).await? else {
            *counts.entry("stale".to_string()).or_default() += 1;
            continue;
        };
        raise_for_settle(tx, *id, s, now).await?;
        if state == Outcome::ExpiredUnconfirmed {
            raise_expired_unconfirmed(tx, *id, now).await?;
        }
        let name = match (s, state) {
            (Settle::Hold { .. }, _) => "held",
            (Settle::Retry { .. }, _) => "retry",
            (_, st) => st.as_str(),
        };
        *counts.entry(name.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// How many outbound events are `pending`.
pub async fn pending_count(c: &(impl GenericClient + Sync)) -> Result<i64, PgError> {
    Ok(c.query_one(
        "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
        &[],
    )
    .await?
    .get(0))
}

/// When the next pending event becomes due (unix seconds), if any.
pub async fn next_due(c: &(impl GenericClient + Sync)) -> Result<Option<i64>, PgError> {
    Ok(c.query_one(
        "SELECT MIN(next_attempt_at) FROM outbound_events WHERE state = 'pending'",
        &[],
    )
    .await?
    .get(0))
}

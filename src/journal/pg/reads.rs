//! Fleet reads: `status` (with the replicas), the hourly report and carries, balances and consumption, read from
//! the shared journal so that every replica answers the same. The same figures and JSON shapes as the SQLite
//! side (`journal/status.rs`, `journal/usage.rs`, `journal/billing.rs`).

use super::PgError;
use super::billing::term_for;
use super::outbound::DB_NOW;
use crate::clock::{HOUR, fmt_time, hour_of};
use crate::config::{Included, Settings};
use crate::journal::billing::{DimensionBalance, GroupBy, group_by_period};
use crate::journal::status::JournalStatus;
use crate::journal::usage::{CarryRow, HourlyRow, ReportFilter};
use crate::outcome::Outcome;
use crate::quantity::Micros;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// One replica as `status` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplicaLine {
    /// `fleet.replica_id`.
    pub replica_id: String,
    /// Its last heartbeat (its clock), RFC 3339.
    pub heartbeat_at: String,
    /// Heartbeat within `fleet.replica_timeout`: it holds freezes back until it has forwarded.
    pub live: bool,
    /// Every record it received before this is in the shared journal, RFC 3339.
    pub watermark: String,
    /// How far its forwarding is behind now, seconds.
    pub forward_lag_seconds: i64,
    /// Records it had not forwarded at its last heartbeat.
    pub unforwarded: i64,
    /// Events it holds a live lease on (claimed, being sent).
    pub leases_held: i64,
    /// Its meterd version.
    pub version: String,
}

/// The fleet's status at `now`: the journal figures of every replica's events, and the replicas.
pub async fn status(
    c: &(impl GenericClient + Sync),
    now: DateTime<Utc>,
) -> Result<JournalStatus, PgError> {
    let now_s = now.timestamp();
    let mut outcomes = BTreeMap::new();
    let mut quantities = BTreeMap::new();
    for r in c
        .query(
            "SELECT CASE WHEN state = 'expired' AND carried_to IS NOT NULL THEN 'carried' ELSE state END AS s,
                    COUNT(*), SUM(quantity)::bigint FROM outbound_events GROUP BY s",
            &[],
        )
        .await?
    {
        let (s, n, q): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        outcomes.insert(s.clone(), n);
        quantities.insert(s, Micros(q).to_decimal_string());
    }
    let r = c
        .query_one(
            "SELECT COUNT(*), MIN(hour), MIN(deadline) FROM outbound_events WHERE state = 'pending'",
            &[],
        )
        .await?;
    let (pending, oldest, nearest): (i64, Option<i64>, Option<i64>) =
        (r.get(0), r.get(1), r.get(2));
    let nearest_hour: Option<i64> = match nearest {
        Some(d) => c
            .query_opt(
                "SELECT hour FROM outbound_events WHERE state = 'pending' AND deadline = $1 LIMIT 1",
                &[&d],
            )
            .await?
            .map(|r| r.get(0)),
        None => None,
    };
    let last_success: Option<i64> = c
        .query_one(
            "SELECT MAX(finished_at) FROM outbound_events WHERE state IN ('accepted', 'duplicate')",
            &[],
        )
        .await?
        .get(0);
    let last_error: Option<String> = c
        .query_opt(
            "SELECT last_error FROM outbound_events WHERE state = 'pending' AND last_error IS NOT NULL
             ORDER BY hour LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let frozen: Option<i64> = c
        .query_opt("SELECT value FROM meta WHERE key = 'frozen_through'", &[])
        .await?
        .map(|r| r.get(0));
    let unfrozen: i64 = c
        .query_one(
            "SELECT COUNT(DISTINCT hour) FROM hourly_totals WHERE outbound_id IS NULL",
            &[],
        )
        .await?
        .get(0);
    let records: i64 = c
        .query_one("SELECT COUNT(*) FROM records", &[])
        .await?
        .get(0);
    let version: i64 = c
        .query_one("SELECT version FROM meterd_schema", &[])
        .await?
        .get(0);
    Ok(JournalStatus {
        pending_events: pending,
        oldest_pending_age_seconds: oldest.map(|h| (now_s - (h + HOUR)).max(0)),
        nearest_expiry_seconds: nearest.map(|d| d - now_s),
        nearest_expiry_hour: nearest_hour.map(fmt_time),
        last_success: last_success.map(fmt_time),
        outcomes,
        outcome_quantities: quantities,
        unfrozen_hours: unfrozen,
        frozen_through: frozen.map(fmt_time),
        records,
        schema_version: version,
        last_error,
    })
}

/// Every replica that ever published a heartbeat, with its forward lag and the leases it holds.
pub async fn replicas(
    c: &(impl GenericClient + Sync),
    now: DateTime<Utc>,
    replica_timeout: Duration,
) -> Result<Vec<ReplicaLine>, PgError> {
    let sql = format!(
        "SELECT r.replica_id, r.heartbeat_at, r.watermark, r.unforwarded, r.version,
                (SELECT COUNT(*) FROM outbound_events o
                  WHERE o.lease_owner = r.replica_id AND o.state = 'pending' AND o.lease_until > {DB_NOW})
         FROM replicas r ORDER BY r.replica_id"
    );
    let live_since = now.timestamp() - replica_timeout.num_seconds();
    Ok(c.query(&sql, &[])
        .await?
        .into_iter()
        .map(|r| {
            let (heartbeat, watermark): (i64, i64) = (r.get(1), r.get(2));
            ReplicaLine {
                replica_id: r.get(0),
                heartbeat_at: fmt_time(heartbeat),
                live: heartbeat >= live_since,
                watermark: fmt_time(watermark),
                forward_lag_seconds: (now.timestamp() - watermark).max(0),
                unforwarded: r.get(3),
                version: r.get(4),
                leases_held: r.get(5),
            }
        })
        .collect())
}

/// Hourly totals of every replica with their outcomes, oldest first (as `journal::usage::hourly_report`).
pub async fn hourly_report(
    c: &(impl GenericClient + Sync),
    filter: &ReportFilter,
    now: DateTime<Utc>,
    grace: Duration,
) -> Result<Vec<HourlyRow>, PgError> {
    let from = filter.from.map(|t| t.timestamp()).unwrap_or(i64::MIN);
    let to = filter.to.map(|t| t.timestamp()).unwrap_or(i64::MAX);
    let open_hour = hour_of(now);
    let closed_before = hour_of(now - Duration::hours(1) - grace) + HOUR;
    let rows = c
        .query(
            "SELECT h.resource, h.plan, h.dimension, h.hour, h.quantity, h.records, h.carried_in,
                    o.state, o.usage_event_id, o.carried_to, o.last_error, o.plan, o.included, o.send_quantity
             FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
             WHERE ($1::text IS NULL OR lower(h.resource) = lower($1::text))
               AND h.hour >= $2 AND h.hour < $3
             ORDER BY h.hour, h.resource, h.dimension, h.plan",
            &[&filter.resource, &from, &to],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let hour: i64 = r.get(3);
            let qty: i64 = r.get(4);
            let state: Option<String> = r.get(7);
            let carried_to: Option<i64> = r.get(9);
            let plan: String = r.get(1);
            let sent_plan: Option<String> = r.get(11);
            let outcome = match (state, carried_to) {
                (Some(s), Some(_)) if s == Outcome::Expired.as_str() => {
                    Outcome::Carried.to_string()
                }
                (Some(s), _) => s,
                (None, _) if hour >= open_hour => "open".to_string(),
                (None, _) if hour >= closed_before => "closing".to_string(),
                (None, _) => "closed".to_string(),
            };
            HourlyRow {
                // Credit pools are SQLite mode's (docs/fleet.md); the plan allowance shows in `included`.
                pools: Vec::new(),
                resource: r.get(0),
                plan: if plan.is_empty() {
                    sent_plan.unwrap_or_default()
                } else {
                    plan
                },
                dimension: r.get(2),
                hour: fmt_time(hour),
                quantity: Micros(qty).to_decimal_string(),
                quantity_micros: qty,
                records: r.get(5),
                carried_in_micros: r.get(6),
                outcome,
                usage_event_id: r.get(8),
                carried_to: carried_to.map(fmt_time),
                last_error: r.get(10),
                included: r
                    .get::<_, Option<i64>>(12)
                    .map(|q| Micros(q).to_decimal_string()),
                billed: r
                    .get::<_, Option<i64>>(13)
                    .map(|q| Micros(q).to_decimal_string()),
            }
        })
        .collect())
}

/// Quantities moved between hours, oldest first.
pub async fn carry_report(
    c: &(impl GenericClient + Sync),
    filter: &ReportFilter,
) -> Result<Vec<CarryRow>, PgError> {
    let from = filter.from.map(|t| t.timestamp()).unwrap_or(i64::MIN);
    let to = filter.to.map(|t| t.timestamp()).unwrap_or(i64::MAX);
    let rows = c
        .query(
            "SELECT resource, plan, dimension, from_hour, to_hour, quantity, reason FROM carries
             WHERE ($1::text IS NULL OR lower(resource) = lower($1::text))
               AND from_hour >= $2 AND from_hour < $3
             ORDER BY from_hour, resource, dimension",
            &[&filter.resource, &from, &to],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| CarryRow {
            resource: r.get(0),
            plan: r.get(1),
            dimension: r.get(2),
            from_hour: fmt_time(r.get(3)),
            to_hour: fmt_time(r.get(4)),
            quantity: Micros(r.get(5)).to_decimal_string(),
            reason: r.get(6),
        })
        .collect())
}

/// The journaled spelling of `resource` (any letter case), if the fleet has seen it.
async fn known_spelling(
    c: &(impl GenericClient + Sync),
    resource: &str,
) -> Result<Option<String>, PgError> {
    Ok(c.query_opt(
        "SELECT spelling FROM resource_spellings WHERE folded = $1",
        &[&resource.to_ascii_lowercase()],
    )
    .await?
    .map(|r| r.get(0)))
}

/// The balance of every declared dimension for `resource` at `now` (as `journal::billing::balance`).
pub async fn balance(
    c: &(impl GenericClient + Sync),
    settings: &Settings,
    resource: &str,
    now: DateTime<Utc>,
) -> Result<Vec<DimensionBalance>, PgError> {
    let journaled = known_spelling(c, resource).await?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let hour = hour_of(now);
    let (term_start, term_end) = term_for(c, settings, resource, hour).await?;
    let sub_plan: Option<String> = c
        .query_opt(
            "SELECT plan FROM subscriptions WHERE id = $1",
            &[&resource.to_ascii_lowercase()],
        )
        .await?
        .map(|r| r.get::<_, String>(0))
        .filter(|p| !p.is_empty());
    let mut out = Vec::new();
    for d in &settings.dimensions {
        // Not listed: the plan of this term's latest frozen hour (as `journal::billing::balance`).
        let last_plan: Option<String> = c
            .query_opt(
                "SELECT plan FROM outbound_events WHERE resource = $1 AND dimension = $2 AND term_start = $3
                   AND plan <> '' ORDER BY hour DESC LIMIT 1",
                &[&resource, &d.id, &term_start],
            )
            .await?
            .map(|r| r.get(0));
        let plan = sub_plan
            .clone()
            .or(last_plan)
            .or_else(|| settings.default_plan.clone())
            .unwrap_or_default();
        let billed: i64 = c
            .query_one(
                "SELECT COALESCE(SUM(consumed), 0)::bigint FROM term_usage
                 WHERE resource = $1 AND dimension = $2 AND plan = $3 AND term_start = $4",
                &[&resource, &d.id, &plan, &term_start],
            )
            .await?
            .get(0);
        let unbilled: i64 = c
            .query_one(
                "SELECT COALESCE(SUM(h.quantity - h.prebilled), 0)::bigint
                 FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
                 WHERE h.resource = $1 AND h.dimension = $2 AND h.hour >= $3 AND h.hour < $4
                   AND (o.id IS NULL OR (o.state = 'pending' AND o.billable IS NULL))",
                &[&resource, &d.id, &term_start, &term_end],
            )
            .await?
            .get(0);
        let consumed = billed + unbilled;
        let r = c
            .query_one(
                "SELECT COALESCE(SUM(send_quantity), 0)::bigint,
                        COALESCE(SUM(CASE WHEN state IN ('accepted', 'duplicate') THEN send_quantity ELSE 0 END), 0)::bigint
                 FROM outbound_events WHERE resource = $1 AND dimension = $2 AND term_start = $3",
                &[&resource, &d.id, &term_start],
            )
            .await?;
        let (mut frozen, mut accepted): (i64, i64) = (r.get(0), r.get(1));
        // All usage of the term, every plan's (as `journal::billing::balance`).
        let mut usage: i64 = c
            .query_one(
                "SELECT COALESCE(SUM(quantity - prebilled), 0)::bigint FROM hourly_totals
                 WHERE resource = $1 AND dimension = $2 AND hour >= $3 AND hour < $4",
                &[&resource, &d.id, &term_start, &term_end],
            )
            .await?
            .get(0);
        // What retention deleted of this term's events and totals (`journal/pg/retention.rs`).
        if let Some(r) = c
            .query_opt(
                "SELECT frozen, accepted, usage FROM retired_overage
                 WHERE resource = $1 AND dimension = $2 AND term_start = $3",
                &[&resource, &d.id, &term_start],
            )
            .await?
        {
            let sum = |a: i64, b: i64| {
                a.checked_add(b)
                    .ok_or_else(|| PgError::Invalid("a balance overflows".into()))
            };
            frozen = sum(frozen, r.get(0))?;
            accepted = sum(accepted, r.get(1))?;
            usage = sum(usage, r.get(2))?;
        }
        let remainder: i64 = c
            .query_opt(
                "SELECT remainder FROM remainders WHERE resource = $1 AND dimension = $2",
                &[&resource, &d.id],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let (included, remaining) = match settings.included(&plan, &d.id) {
            Included::Infinite => ("infinite".to_string(), "infinite".to_string()),
            Included::Quantity(q) => (
                Micros(q).to_decimal_string(),
                Micros((q - consumed).max(0)).to_decimal_string(),
            ),
        };
        // Fleet mode has the plan allowance as its only pool (credit pools are kept by SQLite mode only).
        let plan_pool = crate::journal::pools::plan_pool_balance(
            settings,
            &plan,
            &d.id,
            resource,
            consumed,
            (term_start, term_end),
        );
        out.push(DimensionBalance {
            usage: Micros(usage).to_decimal_string(),
            pools: vec![plan_pool],
            dimension: d.id.clone(),
            plan,
            term_start: fmt_time(term_start),
            term_end: fmt_time(term_end),
            included,
            consumed: Micros(consumed).to_decimal_string(),
            remaining,
            overage_frozen: Micros(frozen).to_decimal_string(),
            overage_accepted: Micros(accepted).to_decimal_string(),
            carried_remainder: Micros(remainder).to_decimal_string(),
            unit: d.unit.unwrap_or(1),
        });
    }
    Ok(out)
}

/// Raw consumption of `resource` (optionally one dimension) over `[from, to)`: (dimension, micro-units, hours).
pub async fn consumption(
    c: &(impl GenericClient + Sync),
    resource: &str,
    dimension: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, i64, i64)>, PgError> {
    let journaled = known_spelling(c, resource).await?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let rows = c
        .query(
            "SELECT dimension, COALESCE(SUM(quantity), 0)::bigint, COUNT(DISTINCT hour) FROM hourly_totals
             WHERE resource = $1 AND ($2::text IS NULL OR dimension = $2::text) AND hour >= $3 AND hour < $4
             GROUP BY dimension ORDER BY dimension",
            &[&resource, &dimension, &from, &to],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Consumption of `resource` (optionally one dimension) over `[from, to)` grouped by `by` (`dimension`, `hour`,
/// `day` or `month`, as `journal::billing::consumption_grouped`: the same rows and JSON; `month` and `dimension`
/// add the monthly sums retention kept in `usage_months`). `pool` is refused: fleet mode has no credit pools.
pub async fn consumption_grouped(
    c: &(impl GenericClient + Sync),
    resource: &str,
    dimension: Option<&str>,
    from: i64,
    to: i64,
    by: GroupBy,
) -> Result<Vec<serde_json::Value>, PgError> {
    if by == GroupBy::Pool {
        return Err(PgError::Invalid(POOL_GROUPING_REFUSED.to_string()));
    }
    let journaled = known_spelling(c, resource).await?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let hours = c
        .query(
            "SELECT dimension, hour, quantity FROM hourly_totals
             WHERE resource = $1 AND ($2::text IS NULL OR dimension = $2::text) AND hour >= $3 AND hour < $4",
            &[&resource, &dimension, &from, &to],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let months = if matches!(by, GroupBy::Month | GroupBy::Dimension) {
        c.query(
            "SELECT dimension, month, quantity FROM usage_months
             WHERE resource = $1 AND ($2::text IS NULL OR dimension = $2::text) AND month >= $3 AND month < $4",
            &[&resource, &dimension, &from, &to],
        )
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
    } else {
        Vec::new()
    };
    Ok(group_by_period(by, hours, months))
}

/// Why `group_by=pool` is refused in fleet mode.
pub const POOL_GROUPING_REFUSED: &str = "`group_by=pool` is not available in fleet mode: credit pools ([[pools]]) \
     and their draws are kept by the single-replica SQLite journal only, and the fleet's shared journal has none; \
     use group_by=dimension, hour, day or month";

/// What the fleet sent and the marketplace accepted per (resource folded, dimension), hours in `[from, to)`
/// (as `journal::status::accepted_totals`), for `meterd reconcile`.
pub async fn accepted_totals(
    c: &(impl GenericClient + Sync),
    from: i64,
    to: i64,
) -> Result<BTreeMap<(String, String), i64>, PgError> {
    let rows = c
        .query(
            "SELECT lower(resource), dimension, SUM(COALESCE(send_quantity, quantity))::bigint FROM outbound_events
             WHERE hour >= $1 AND hour < $2 AND state IN ('accepted', 'duplicate')
             GROUP BY lower(resource), dimension",
            &[&from, &to],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect())
}

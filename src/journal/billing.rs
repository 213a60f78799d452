//! Billing storage: the term of an event, the term's consumption (`term_usage`), carried remainders
//! (`remainders`), thresholds fired (`thresholds_fired`), balances and consumption reports.
//!
//! The arithmetic is [`crate::bill`]; this module reads its inputs and stores its results, in the writer
//! transaction that freezes the event's body (see the policy there).

use super::JournalError;
use crate::alert_kind::AlertKey;
use crate::bill::{Bill, BillInputs, Computed, Crossing, compute, months_of, term_around};
use crate::clock::fmt_time;
use crate::config::{Included, Settings};
use crate::quantity::Micros;
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// The term holding `hour` for `resource`.
pub fn term_for(
    conn: &Connection,
    settings: &Settings,
    resource: &str,
    hour: i64,
) -> Result<(i64, i64), JournalError> {
    let at = crate::clock::to_utc(hour);
    let sub: Option<(Option<i64>, Option<String>)> = conn
        .prepare_cached("SELECT term_start, term_unit FROM subscriptions WHERE id = ?1")?
        .query_row([resource.to_ascii_lowercase()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(term_from(settings, sub, at))
}

/// The term around `at` of a subscription row `(term_start, term_unit)` (either journal's), or of the
/// `billing.fallback_term_months` calendar terms when the row is missing or has no usable term.
pub(crate) fn term_from(
    settings: &Settings,
    sub: Option<(Option<i64>, Option<String>)>,
    at: DateTime<Utc>,
) -> (i64, i64) {
    let (anchor, months) = match sub {
        Some((Some(start), Some(unit))) if months_of(&unit).is_some() => {
            (crate::clock::to_utc(start), months_of(&unit).unwrap_or(1))
        }
        _ => (
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            settings.billing.fallback_term_months,
        ),
    };
    let (s, e) = term_around(anchor, months, at);
    (s.timestamp(), e.timestamp())
}

/// Bills an event (allowance, units and thresholds: [`crate::bill::compute`]) and stores what that changes:
/// the term's consumption, the remainder, the thresholds fired (each raising its alert once). Runs once per event,
/// inside the writer transaction that stores its body.
pub fn bill(
    conn: &Connection,
    settings: &Settings,
    ev: &crate::journal::outbound::PendingEvent,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<Bill, JournalError> {
    let (resource, dimension, hour) = (ev.resource.as_str(), ev.dimension.as_str(), ev.hour);
    let (term_start, term_end) = term_for(conn, settings, resource, hour)?;
    let included = settings.included(plan, dimension);
    let before: i64 = conn
        .prepare_cached("SELECT consumed FROM term_usage WHERE resource = ?1 AND dimension = ?2 AND plan = ?3 AND term_start = ?4")?
        .query_row(params![resource, dimension, plan, term_start], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let carried_in: i64 = conn
        .prepare_cached("SELECT remainder FROM remainders WHERE resource = ?1 AND dimension = ?2")?
        .query_row(params![resource, dimension], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let decl = settings.dimension(dimension);
    let inputs = BillInputs {
        raw: ev.quantity,
        prebilled: ev.prebilled,
        consumed_before: before,
        carried_in,
        included,
        unit: decl.and_then(|d| d.unit).unwrap_or(1),
        term: (term_start, term_end),
        thresholds: decl.map(|d| d.thresholds.as_slice()).unwrap_or(&[]),
    };
    let overflow = || JournalError::Invalid("term consumption overflows".into());
    // Credit pools (`crate::pools`): only when a pool applies does the event go through them; otherwise the
    // arithmetic (and so the body) is exactly the plan allowance's.
    let term =
        |r: &str, t: i64| term_for(conn, settings, r, t).unwrap_or((t, t + crate::clock::HOUR));
    let pools = super::pools::event_pools(conn, settings, &term, resource, dimension, hour)?;
    let plan_pool = crate::pools::plan_pool_id(plan);
    let computed = if pools.is_empty() {
        compute(inputs).ok_or_else(overflow)?
    } else {
        let usage = super::pools::event_usage(
            conn,
            resource,
            dimension,
            hour,
            ev.quantity - ev.prebilled,
            &pools,
        )?;
        let percents: Vec<i64> = inputs
            .thresholds
            .iter()
            .filter_map(|t| match t {
                crate::config::Threshold::Percent(bp) => Some(*bp),
                crate::config::Threshold::Absolute(_) => None,
            })
            .collect();
        let pooled = crate::pools::bill_event(
            inputs,
            &usage,
            &pools,
            (&plan_pool, settings.billing.plan_pool_priority),
            &percents,
        )
        .ok_or_else(overflow)?;
        super::pools::record_draws(conn, ev, &plan_pool, &pooled.draws)?;
        super::pools::fire_crossings(conn, &pooled.crossings, resource, dimension, hour, now)?;
        pooled.computed
    };
    let Computed {
        mut bill,
        fresh,
        overage,
        consumed_after: after,
        store_remainder,
        crossings,
    } = computed;
    conn.prepare_cached(
        "INSERT INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (resource, dimension, plan, term_start) DO UPDATE SET consumed = consumed + excluded.consumed, overage = overage + excluded.overage",
    )?
    .execute(params![resource, dimension, plan, term_start, term_end, fresh, overage])?;
    if store_remainder {
        conn.prepare_cached(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES (?1, ?2, ?3)
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = excluded.remainder",
        )?
        .execute(params![resource, dimension, bill.remainder])?;
    }
    for Crossing { text, value } in crossings {
        let inserted = conn
            .prepare_cached(
                "INSERT INTO thresholds_fired (resource, dimension, term_start, threshold, fired_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT DO NOTHING",
            )?
            .execute(params![resource, dimension, term_start, text, now.timestamp()])?;
        if inserted == 1 {
            let body = serde_json::json!({
                "kind": "threshold",
                "resource": resource,
                "dimension": dimension,
                "plan": plan,
                "threshold": text,
                "threshold_quantity": Micros(value).to_decimal_string(),
                "consumed": Micros(after).to_decimal_string(),
                "included": match included { Included::Infinite => "infinite".to_string(), Included::Quantity(q) => Micros(q).to_decimal_string() },
                "hour": fmt_time(hour),
                "term_start": fmt_time(term_start),
                "term_end": fmt_time(term_end),
            });
            super::alerts::raise(
                conn,
                &AlertKey::threshold(resource, dimension, term_start, &text),
                body,
                now,
            )?;
            tracing::warn!(
                message = "Consumption crossed a threshold.",
                %resource, %dimension, threshold = %text, consumed = %Micros(after), alert = "threshold"
            );
            metrics::counter!("meterd_thresholds_crossed_total", "dimension" => dimension.to_string()).increment(1);
            bill.crossed.push(text);
        }
    }
    Ok(bill)
}

/// One dimension's balance for a subscription's current term.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct DimensionBalance {
    /// Dimension.
    pub dimension: String,
    /// Plan the balance is for.
    pub plan: String,
    /// Term start (RFC 3339).
    pub term_start: String,
    /// Term end, exclusive (RFC 3339).
    pub term_end: String,
    /// Included quantity, or `infinite`.
    pub included: String,
    /// Consumed this term under this plan (frozen and not yet frozen usage).
    pub consumed: String,
    /// Included quantity left (`infinite` when unlimited).
    pub remaining: String,
    /// Overage frozen into outbound events this term (billing units).
    pub overage_frozen: String,
    /// Of which the marketplace accepted (billing units).
    pub overage_accepted: String,
    /// Partial billing unit carried to the next hour (usage units).
    pub carried_remainder: String,
    /// Usage per billing unit.
    pub unit: i64,
    /// All usage this term (every pool's and the overage), frozen or not.
    pub usage: String,
    /// The pools this dimension draws from, in draw order; the plan allowance is `plan:<plan>`.
    pub pools: Vec<super::pools::PoolBalance>,
}

/// The overage frozen and accepted in the term starting at `?3` of one resource (`?1`) and dimension (`?2`).
///
/// An event's `term_start` is the start of the term holding its hour (`bill::term_around`), so its hour is at
/// least that: `hour >= ?3` bounds the read to the term's events through the unique index (resource, dimension,
/// hour) instead of every hour the key ever had (a balance read each of them: 730 rows for two years of days).
pub(crate) const TERM_OVERAGE: &str = "SELECT COALESCE(SUM(send_quantity), 0),
        COALESCE(SUM(CASE WHEN state IN ('accepted', 'duplicate') THEN send_quantity ELSE 0 END), 0)
     FROM outbound_events WHERE resource = ?1 AND dimension = ?2 AND hour >= ?3 AND term_start = ?3";

/// The balance of every declared dimension for `resource` at `now`.
pub fn balance(
    conn: &Connection,
    settings: &Settings,
    resource: &str,
    now: DateTime<Utc>,
) -> Result<Vec<DimensionBalance>, JournalError> {
    // Every spelling of a resource is journaled as its first one (case-insensitive).
    let journaled = super::usage::known_spelling(conn, resource)?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let hour = crate::clock::hour_of(now);
    let (term_start, term_end) = term_for(conn, settings, resource, hour)?;
    let sub_plan: Option<String> = conn
        .prepare_cached("SELECT plan FROM subscriptions WHERE id = ?1")?
        .query_row([resource.to_ascii_lowercase()], |r| r.get(0))
        .optional()?
        .filter(|p: &String| !p.is_empty());
    let term =
        |r: &str, t: i64| term_for(conn, settings, r, t).unwrap_or((t, t + crate::clock::HOUR));
    let retired: bool = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'retired_overage'",
        )?
        .query_row([], |r| r.get::<_, i64>(0))?
        == 1;
    let mut out = Vec::new();
    for d in &settings.dimensions {
        // Not listed (or listed without a plan): the plan of this term's latest frozen hour (its event's plan is
        // what term_usage was billed under).
        let last_plan: Option<String> = conn
            .prepare_cached(
                "SELECT plan FROM outbound_events WHERE resource = ?1 AND dimension = ?2 AND term_start = ?3
                   AND plan <> '' ORDER BY hour DESC LIMIT 1",
            )?
            .query_row(params![resource, d.id, term_start], |r| r.get(0))
            .optional()?;
        let plan = sub_plan
            .clone()
            .or(last_plan)
            .or_else(|| settings.default_plan.clone())
            .unwrap_or_default();
        let billed: i64 = conn
            .prepare_cached("SELECT COALESCE(SUM(consumed), 0) FROM term_usage WHERE resource = ?1 AND dimension = ?2 AND plan = ?3 AND term_start = ?4")?
            .query_row(params![resource, d.id, plan, term_start], |r| r.get(0))?;
        let unbilled: i64 = conn
            .prepare_cached(
                "SELECT COALESCE(SUM(h.quantity - h.prebilled), 0) FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
                 WHERE h.resource = ?1 AND h.dimension = ?2 AND h.hour >= ?3 AND h.hour < ?4
                   AND (o.id IS NULL OR (o.state = 'pending' AND o.billable IS NULL))",
            )?
            .query_row(params![resource, d.id, term_start, term_end], |r| r.get(0))?;
        let consumed = billed + unbilled;
        let (frozen, accepted): (i64, i64) = conn
            .prepare_cached(TERM_OVERAGE)?
            .query_row(params![resource, d.id, term_start], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
        // What retention deleted of this term (`usage::apply_retention`): a term longer than retention. A
        // journal of schema 7 or older (an older daemon still runs it) has no such table and deleted nothing kept.
        let (retired_frozen, retired_accepted, retired_usage): (i64, i64, i64) = if retired {
            conn.prepare_cached(
                "SELECT frozen, accepted, usage FROM retired_overage
                 WHERE resource = ?1 AND dimension = ?2 AND term_start = ?3",
            )?
            .query_row(params![resource, d.id, term_start], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?
            .unwrap_or_default()
        } else {
            (0, 0, 0)
        };
        let (frozen, accepted) = (frozen + retired_frozen, accepted + retired_accepted);
        let remainder: i64 = conn
            .prepare_cached(
                "SELECT remainder FROM remainders WHERE resource = ?1 AND dimension = ?2",
            )?
            .query_row(params![resource, d.id], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
        let term_usage: i64 = conn
            .prepare_cached(
                "SELECT COALESCE(SUM(quantity - prebilled), 0) FROM hourly_totals
                 WHERE resource = ?1 AND dimension = ?2 AND hour >= ?3 AND hour < ?4",
            )?
            .query_row(params![resource, d.id, term_start, term_end], |r| r.get(0))?;
        let term_usage = term_usage + retired_usage;
        let mut pools = vec![super::pools::plan_pool_balance(
            settings,
            &plan,
            &d.id,
            resource,
            consumed,
            (term_start, term_end),
        )];
        for p in super::pools::for_resource(conn, settings, resource, Some(&d.id))? {
            pools.push(super::pools::pool_balance(
                conn,
                &term,
                &p,
                resource,
                now.timestamp(),
            )?);
        }
        // Draw order: priority, the earliest expiry (none last; RFC 3339 strings sort by time), then the id.
        pools.sort_by(|a, b| {
            (a.priority, a.expires_at.is_none(), &a.expires_at, &a.id).cmp(&(
                b.priority,
                b.expires_at.is_none(),
                &b.expires_at,
                &b.id,
            ))
        });
        let (included, remaining) = match settings.included(&plan, &d.id) {
            Included::Infinite => ("infinite".to_string(), "infinite".to_string()),
            Included::Quantity(q) => (
                Micros(q).to_decimal_string(),
                Micros((q - consumed).max(0)).to_decimal_string(),
            ),
        };
        out.push(DimensionBalance {
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
            usage: Micros(term_usage).to_decimal_string(),
            pools,
        });
    }
    Ok(out)
}

/// A customer's (tenant's) pooled view: its subscriptions (as the SaaS list names them), the pools they share
/// (customer scope, and groups holding any of them) and each subscription's balance.
pub fn customer_balance(
    conn: &Connection,
    settings: &Settings,
    tenant: &str,
    now: DateTime<Utc>,
) -> Result<serde_json::Value, JournalError> {
    let tenant = tenant.trim().to_ascii_lowercase();
    let members = super::pools::members_of(conn, &tenant)?;
    let term =
        |r: &str, t: i64| term_for(conn, settings, r, t).unwrap_or((t, t + crate::clock::HOUR));
    let mut shared = Vec::new();
    for p in super::pools::all(conn)? {
        let holds = match &p.def.scope {
            crate::pools::Scope::Customer(c) => *c == tenant,
            crate::pools::Scope::Group(g) => members
                .iter()
                .any(|m| settings.groups_of(m).contains(&g.as_str())),
            crate::pools::Scope::Resource(_) => false,
        };
        if holds {
            let mut b = serde_json::to_value(super::pools::pool_balance(
                conn,
                &term,
                &p,
                "",
                now.timestamp(),
            )?)
            .unwrap_or_default();
            b["dimension"] = p.def.dimension.clone().into();
            shared.push(b);
        }
    }
    let mut subscriptions = Vec::new();
    for m in &members {
        let journaled = super::usage::known_spelling(conn, m)?;
        let resource = journaled.as_deref().unwrap_or(m);
        subscriptions.push(serde_json::json!({
            "resource": resource,
            "dimensions": balance(conn, settings, resource, now)?,
        }));
    }
    Ok(serde_json::json!({
        "tenant": tenant,
        "at": fmt_time(now.timestamp()),
        "pools": shared,
        "subscriptions": subscriptions,
    }))
}

/// Raw consumption of `resource` (optionally one dimension) over `[from, to)`, per dimension, micro-units.
pub fn consumption(
    conn: &Connection,
    resource: &str,
    dimension: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, i64, i64)>, JournalError> {
    let journaled = super::usage::known_spelling(conn, resource)?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let mut stmt = conn.prepare_cached(
        "SELECT dimension, COALESCE(SUM(quantity), 0), COUNT(DISTINCT hour) FROM hourly_totals
         WHERE resource = ?1 AND (?2 IS NULL OR dimension = ?2) AND hour >= ?3 AND hour < ?4 GROUP BY dimension ORDER BY dimension",
    )?;
    let rows = stmt.query_map(params![resource, dimension, from, to], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// How `GET /v1/consumption` groups usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// Per dimension (with the months retention summed into `usage_months`).
    Dimension,
    /// Per UTC hour.
    Hour,
    /// Per UTC day.
    Day,
    /// Per UTC calendar month (with the months retention summed into `usage_months`).
    Month,
    /// Per pool that covered it (`plan:<plan>` for the plan allowance), `overage` for what none covered and
    /// `unbilled` for usage not billed yet (not frozen, or frozen and not yet billed).
    Pool,
}

impl GroupBy {
    /// From the query parameter.
    pub fn parse(s: &str) -> Option<GroupBy> {
        match s.trim() {
            "dimension" => Some(GroupBy::Dimension),
            "hour" => Some(GroupBy::Hour),
            "day" => Some(GroupBy::Day),
            "month" => Some(GroupBy::Month),
            "pool" => Some(GroupBy::Pool),
            _ => None,
        }
    }
}

/// Consumption of `resource` (optionally one dimension) over `[from, to)` grouped by `by`: rows of
/// `{"dimension", ("period" | "pool"), "quantity"}` in dimension, then period or pool order.
pub fn consumption_grouped(
    conn: &Connection,
    resource: &str,
    dimension: Option<&str>,
    from: i64,
    to: i64,
    by: GroupBy,
) -> Result<Vec<serde_json::Value>, JournalError> {
    use std::collections::BTreeMap;
    let journaled = super::usage::known_spelling(conn, resource)?;
    let resource = journaled.as_deref().unwrap_or(resource);
    if by != GroupBy::Pool {
        let mut stmt = conn.prepare_cached(
            "SELECT dimension, hour, quantity FROM hourly_totals
             WHERE resource = ?1 AND (?2 IS NULL OR dimension = ?2) AND hour >= ?3 AND hour < ?4",
        )?;
        let hours: Vec<(String, i64, i64)> = stmt
            .query_map(params![resource, dimension, from, to], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        let mut months = Vec::new();
        if matches!(by, GroupBy::Month | GroupBy::Dimension) && super::pools::has_schema(conn)? {
            let mut stmt = conn.prepare_cached(
                "SELECT dimension, month, quantity FROM usage_months
                 WHERE resource = ?1 AND (?2 IS NULL OR dimension = ?2) AND month >= ?3 AND month < ?4",
            )?;
            months = stmt
                .query_map(params![resource, dimension, from, to], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<_, _>>()?;
        }
        return Ok(group_by_period(by, hours, months));
    }
    let mut sums: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut add = |d: String, k: String, q: i64| *sums.entry((d, k)).or_default() += q;
    if by == GroupBy::Pool {
        let mut stmt = conn.prepare_cached(
            "SELECT h.dimension, h.quantity - h.prebilled, o.id, o.plan, o.included, o.billable
             FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
             WHERE h.resource = ?1 AND (?2 IS NULL OR h.dimension = ?2) AND h.hour >= ?3 AND h.hour < ?4",
        )?;
        type Row = (
            String,
            i64,
            Option<i64>,
            Option<String>,
            Option<i64>,
            Option<i64>,
        );
        let rows: Vec<Row> = stmt
            .query_map(params![resource, dimension, from, to], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })?
            .collect::<Result<_, _>>()?;
        let mut seen = std::collections::BTreeSet::new();
        for (dim, fresh, id, plan, included, billable) in rows {
            match (id, included, billable) {
                (Some(id), Some(included), Some(_)) => {
                    // One event may hold several totals (plans): its covers count once.
                    if !seen.insert(id) {
                        continue;
                    }
                    let (fresh_all, covers): (i64, Vec<(String, i64)>) = {
                        let fresh_all: i64 = conn
                            .prepare_cached(
                                "SELECT quantity - prebilled FROM outbound_events WHERE id = ?1",
                            )?
                            .query_row([id], |r| r.get(0))?;
                        let mut c = Vec::new();
                        for p in super::usage::pool_covers(
                            conn,
                            id,
                            plan.as_deref().unwrap_or(""),
                            included,
                        )? {
                            let q = crate::quantity::Micros::parse_decimal(&p.quantity)
                                .map(|m| m.0)
                                .unwrap_or(0);
                            c.push((p.id, q));
                        }
                        (fresh_all, c)
                    };
                    let covered: i64 = covers.iter().map(|c| c.1).sum();
                    for (p, q) in covers {
                        add(dim.clone(), p, q);
                    }
                    if fresh_all - covered != 0 {
                        add(dim.clone(), "overage".into(), fresh_all - covered);
                    }
                }
                _ => add(dim, "unbilled".into(), fresh),
            }
        }
    }
    Ok(render_groups(by, sums))
}

/// The period of `hour` in a grouping by `by`: its hour, UTC day or UTC month (RFC 3339); empty for `dimension`
/// and `pool`.
fn period_of(by: GroupBy, hour: i64) -> String {
    match by {
        GroupBy::Dimension | GroupBy::Pool => String::new(),
        GroupBy::Hour => fmt_time(hour),
        GroupBy::Day => fmt_time(hour - hour.rem_euclid(86_400)),
        GroupBy::Month => fmt_time(crate::pools::month_start(hour)),
    }
}

/// `GET /v1/consumption`'s groups for `by` (not `pool`), either journal's: hourly sums `(dimension, hour,
/// micro-units)` and, for `month` and `dimension`, the monthly sums retention kept `(dimension, month start,
/// micro-units)`; rows of `{"dimension", ("period"), "quantity"}` in dimension, then period order.
pub fn group_by_period(
    by: GroupBy,
    hours: Vec<(String, i64, i64)>,
    months: Vec<(String, i64, i64)>,
) -> Vec<serde_json::Value> {
    let mut sums: std::collections::BTreeMap<(String, String), i64> = Default::default();
    let months = if matches!(by, GroupBy::Month | GroupBy::Dimension) {
        months
    } else {
        Vec::new()
    };
    for (dim, hour, q) in hours.into_iter().chain(months) {
        *sums.entry((dim, period_of(by, hour))).or_default() += q;
    }
    render_groups(by, sums)
}

fn render_groups(
    by: GroupBy,
    sums: std::collections::BTreeMap<(String, String), i64>,
) -> Vec<serde_json::Value> {
    sums.into_iter()
        .map(|((dim, key), q)| {
            let mut v =
                serde_json::json!({"dimension": dim, "quantity": Micros(q).to_decimal_string()});
            match by {
                GroupBy::Pool => v["pool"] = key.into(),
                GroupBy::Dimension => {}
                _ => v["period"] = key.into(),
            }
            v
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const POLICY: &str = r#"
[marketplace]
mode = "emulator"
[[dimensions]]
id = "api_calls"
[[plans]]
id = "gold"
included = { api_calls = 100 }
[[plans]]
id = "silver"
included = { api_calls = 10 }
"#;

    /// A subscription the list does not (or no longer) show keeps the plan its term was billed under; the lookup
    /// used to read `rowid` of a WITHOUT ROWID table, failed, and the error was swallowed (plan "").
    #[test]
    fn an_unlisted_subscription_is_balanced_under_the_plan_it_was_billed_under() {
        let mut c = Connection::open_in_memory().unwrap();
        crate::journal::migrate(&mut c).unwrap();
        let settings = crate::config::load_str_for(
            POLICY,
            "test",
            &BTreeMap::new(),
            crate::config::Credentials::Optional,
        )
        .unwrap();
        let now = Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap();
        let (start, end) = term_for(&c, &settings, "r1", crate::clock::hour_of(now)).unwrap();
        for (hour, plan, consumed) in [
            (start + 3600, "silver", 4_000_000),
            (start + 7200, "gold", 30_000_000),
        ] {
            c.execute(
                "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                     deadline, frozen_at, term_start, send_quantity) VALUES ('r1', ?1, 'api_calls', ?2, ?3, '', 'accepted', 0, ?2 + 86100, 0, ?4, 0)",
                params![plan, hour, consumed, start],
            )
            .unwrap();
            c.execute(
                "INSERT INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage)
                     VALUES ('r1', 'api_calls', ?1, ?2, ?3, ?4, 0)",
                params![plan, start, end, consumed],
            )
            .unwrap();
        }
        let b = balance(&c, &settings, "r1", now).unwrap();
        let api = b.iter().find(|d| d.dimension == "api_calls").unwrap();
        assert_eq!(
            api.plan, "gold",
            "the plan of the term's latest frozen hour"
        );
        assert_eq!(api.consumed, "30");
        assert_eq!(api.remaining, "70");
    }
}

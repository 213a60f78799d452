//! Billing policy: included quantities per subscription term, billing units with carried remainders, thresholds.
//!
//! Azure bills only the usage above what a plan includes, so the publisher must subtract the allowance itself.
//! meterd does it once per outbound event, in the same transaction that writes the event's frozen body (just
//! before its first send, when the plan is known):
//!
//! 1. The **term** holding the event's hour comes from the subscription list (`term.startDate` + `termUnit`,
//!    rolled forward or back in whole terms, so a renewal needs no new list), or, for resources without a term
//!    (managed applications), from `billing.fallback_term` (calendar months, UTC). A subscription listed
//!    without its term keeps the one meterd knew, and a listed term that starts later (a renewal into another
//!    term unit) replaces the running one only when it starts (`journal::outbound::store_subscriptions`).
//! 2. **Included quantity**: the term's consumption (per subscription, dimension, term and plan) draws the plan's
//!    allowance first; only the part above it is billable. The hour in which the allowance runs out bills just
//!    the excess. `"infinite"` never bills; a dimension a plan does not list includes nothing.
//!    **Plan change rule:** consumption is kept per plan, so a new plan mid-term starts from its own full
//!    allowance; usage already billed under the old plan stays billed.
//! 3. **Billing units**: with `unit = N`, the billable quantity plus the remainder carried from earlier hours is
//!    divided by N; whole units are sent, the rest is carried to the next hour of the same subscription and
//!    dimension (the `remainders` table), never billed early and never lost. If the event later expires, only
//!    what its whole units covered is carried (the remainder is already in the table); if it ends not billed
//!    (`rejected`, `not_active`, `skipped_unsubscribed`, `expired` without carrying), the remainder it took is
//!    given back (see `journal::outbound::settle`). So `units sent x unit + remainder == usage billed`, per
//!    subscription and dimension, after any sequence of outcomes (`tests/outcome_props.rs`). A remainder can be
//!    negative when a later hour already sent units built on the leftover of an hour that then ended not billed;
//!    nothing is sent until usage covers it.
//! 4. **Thresholds** (a percentage of the included quantity, or an absolute quantity) fire once per
//!    subscription, dimension and term when the consumption crosses them: a log event, a metric and an alert.
//!
//! An event whose billable quantity rounds to zero whole units is settled as `included` (within the allowance)
//! or `remainder` (below one unit, carried), without a marketplace call.

use crate::config::{Included, Settings, Threshold};
use crate::journal::JournalError;
use crate::clock::fmt_time;
use chrono::{DateTime, Datelike, Months, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};

/// What billing decided for one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// Quantity to send, micro-units of billing units (0: nothing to send).
    pub send: i64,
    /// Raw usage covered by the allowance.
    pub included: i64,
    /// Raw usage that was billable (overage + prebilled + remainder carried in).
    pub billable: i64,
    /// Remainder carried to the next hour, raw micro-units.
    pub remainder: i64,
    /// Term start, unix seconds.
    pub term_start: i64,
    /// Term end (exclusive), unix seconds.
    pub term_end: i64,
    /// Thresholds crossed by this event, as configured text.
    pub crossed: Vec<String>,
}

/// Months in a term unit (`P1M`, `P1Y`, ... `P5Y`).
pub fn months_of(unit: &str) -> Option<u32> {
    match unit.trim() {
        "P1M" => Some(1),
        "P1Y" => Some(12),
        "P2Y" => Some(24),
        "P3Y" => Some(36),
        "P4Y" => Some(48),
        "P5Y" => Some(60),
        _ => None,
    }
}

fn add_months(anchor: DateTime<Utc>, months: i64) -> DateTime<Utc> {
    if months >= 0 {
        anchor
            .checked_add_months(Months::new(months as u32))
            .unwrap_or(anchor)
    } else {
        anchor
            .checked_sub_months(Months::new((-months) as u32))
            .unwrap_or(anchor)
    }
}

/// The term `[start, end)` of `months` months anchored at `anchor` that holds `at`.
pub fn term_around(
    anchor: DateTime<Utc>,
    months: u32,
    at: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let m = months.max(1) as i64;
    let diff = (at.year() as i64 - anchor.year() as i64) * 12
        + (at.month() as i64 - anchor.month() as i64);
    let mut k = diff.div_euclid(m);
    // Month arithmetic clamps days (Jan 31 + 1 month = Feb 28); step until the term holds `at`.
    while add_months(anchor, k * m) > at {
        k -= 1;
    }
    while add_months(anchor, (k + 1) * m) <= at {
        k += 1;
    }
    (add_months(anchor, k * m), add_months(anchor, (k + 1) * m))
}

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
    let (anchor, months) = match sub {
        Some((Some(start), Some(unit))) if months_of(&unit).is_some() => (
            crate::clock::to_utc(start),
            months_of(&unit).unwrap_or(1),
        ),
        _ => (
            Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            settings.billing.fallback_term_months,
        ),
    };
    let (s, e) = term_around(anchor, months, at);
    Ok((s.timestamp(), e.timestamp()))
}

fn threshold_value(t: Threshold, included: Included) -> Option<i64> {
    match (t, included) {
        (Threshold::Absolute(v), _) => Some(v),
        (Threshold::Percent(bp), Included::Quantity(q)) if q > 0 => {
            Some(((q as i128 * bp as i128) / 10_000) as i64)
        }
        _ => None,
    }
}

/// Applies the allowance, units and thresholds to an event's raw quantity. Runs once per event, inside the
/// writer transaction that stores its body.
pub fn bill(
    conn: &Connection,
    settings: &Settings,
    ev: &crate::journal::outbound::PendingEvent,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<Bill, JournalError> {
    let (resource, dimension, hour, raw, prebilled) = (
        ev.resource.as_str(),
        ev.dimension.as_str(),
        ev.hour,
        ev.quantity,
        ev.prebilled,
    );
    let (term_start, term_end) = term_for(conn, settings, resource, hour)?;
    let included = settings.included(plan, dimension);
    let before: i64 = conn
        .prepare_cached("SELECT consumed FROM term_usage WHERE resource = ?1 AND dimension = ?2 AND plan = ?3 AND term_start = ?4")?
        .query_row(params![resource, dimension, plan, term_start], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let fresh = raw - prebilled;
    let after = before
        .checked_add(fresh)
        .ok_or_else(|| JournalError::Invalid("term consumption overflows".into()))?;
    let overage = match included {
        Included::Infinite => 0,
        Included::Quantity(q) => (after - q).max(0) - (before - q).max(0),
    };
    let included_part = fresh - overage;
    conn.prepare_cached(
        "INSERT INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (resource, dimension, plan, term_start) DO UPDATE SET consumed = consumed + excluded.consumed, overage = overage + excluded.overage",
    )?
    .execute(params![resource, dimension, plan, term_start, term_end, fresh, overage])?;

    let unit = settings
        .dimension(dimension)
        .and_then(|d| d.unit)
        .unwrap_or(1);
    let carried_in: i64 = conn
        .prepare_cached("SELECT remainder FROM remainders WHERE resource = ?1 AND dimension = ?2")?
        .query_row(params![resource, dimension], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let billable = overage + prebilled + carried_in;
    let (send, remainder) = if billable <= 0 {
        // A negative remainder: an hour whose units were later given back (it ended not billed) after a later
        // hour had already sent units built on its leftover. Nothing is sent until usage covers it.
        (0, billable)
    } else if unit > 1 {
        let per_unit = unit * crate::quantity::MICROS;
        let whole = billable / per_unit;
        (whole * crate::quantity::MICROS, billable - whole * per_unit)
    } else {
        (billable, 0)
    };
    if unit > 1 || carried_in != 0 || remainder != 0 {
        conn.prepare_cached(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES (?1, ?2, ?3)
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = excluded.remainder",
        )?
        .execute(params![resource, dimension, remainder])?;
    }

    let mut crossed = Vec::new();
    if let Some(decl) = settings.dimension(dimension) {
        for t in &decl.thresholds {
            let Some(value) = threshold_value(*t, included) else {
                continue;
            };
            if before < value && after >= value {
                let text = t.to_string();
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
                        "threshold_quantity": crate::quantity::Micros(value).to_decimal_string(),
                        "consumed": crate::quantity::Micros(after).to_decimal_string(),
                        "included": match included { Included::Infinite => "infinite".to_string(), Included::Quantity(q) => crate::quantity::Micros(q).to_decimal_string() },
                        "hour": fmt_time(hour),
                        "term_start": fmt_time(term_start),
                        "term_end": fmt_time(term_end),
                    });
                    crate::alerts::raise(
                        conn,
                        "threshold",
                        &format!("threshold:{resource}:{dimension}:{term_start}:{text}"),
                        body,
                        now,
                    )?;
                    tracing::warn!(
                        message = "Consumption crossed a threshold.",
                        %resource, %dimension, threshold = %text, consumed = %crate::quantity::Micros(after), alert = "threshold"
                    );
                    metrics::counter!("meterd_thresholds_crossed_total", "dimension" => dimension.to_string()).increment(1);
                    crossed.push(text);
                }
            }
        }
    }
    Ok(Bill {
        send,
        included: included_part,
        billable,
        remainder,
        term_start,
        term_end,
        crossed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn terms_roll_forward_and_back_from_the_anchor() {
        let anchor = t("2026-01-31T00:00:00Z");
        let (s, e) = term_around(anchor, 1, t("2026-03-10T09:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2026-02-28T00:00:00Z"), t("2026-03-31T00:00:00Z"))
        );
        let (s, e) = term_around(t("2026-03-01T00:00:00Z"), 1, t("2026-03-10T09:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2026-03-01T00:00:00Z"), t("2026-04-01T00:00:00Z"))
        );
        let (s, e) = term_around(t("2026-03-01T00:00:00Z"), 12, t("2025-12-31T23:00:00Z"));
        assert_eq!(
            (s, e),
            (t("2025-03-01T00:00:00Z"), t("2026-03-01T00:00:00Z"))
        );
        let (s, _) = term_around(t("2024-06-15T00:00:00Z"), 36, t("2026-03-10T00:00:00Z"));
        assert_eq!(s, t("2024-06-15T00:00:00Z"));
        let (s, e) = term_around(t("1970-01-01T00:00:00Z"), 1, t("2026-03-31T23:59:59Z"));
        assert_eq!(
            (s, e),
            (t("2026-03-01T00:00:00Z"), t("2026-04-01T00:00:00Z"))
        );
    }
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
}

/// The balance of every declared dimension for `resource` at `now`.
pub fn balance(
    conn: &Connection,
    settings: &Settings,
    resource: &str,
    now: DateTime<Utc>,
) -> Result<Vec<DimensionBalance>, JournalError> {
    use crate::quantity::Micros;
    let hour = crate::clock::hour_of(now);
    let (term_start, term_end) = term_for(conn, settings, resource, hour)?;
    let sub_plan: Option<String> = conn
        .prepare_cached("SELECT plan FROM subscriptions WHERE id = ?1")?
        .query_row([resource.to_ascii_lowercase()], |r| r.get(0))
        .optional()?
        .filter(|p: &String| !p.is_empty());
    let mut out = Vec::new();
    for d in &settings.dimensions {
        let last_plan: Option<String> = conn
            .prepare_cached("SELECT plan FROM term_usage WHERE resource = ?1 AND dimension = ?2 AND term_start = ?3 ORDER BY rowid DESC LIMIT 1")
            .and_then(|mut s| s.query_row(params![resource, d.id, term_start], |r| r.get(0)).optional())
            .unwrap_or(None);
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
            .prepare_cached(
                "SELECT COALESCE(SUM(send_quantity), 0),
                        COALESCE(SUM(CASE WHEN state IN ('accepted', 'duplicate') THEN send_quantity ELSE 0 END), 0)
                 FROM outbound_events WHERE resource = ?1 AND dimension = ?2 AND term_start = ?3",
            )?
            .query_row(params![resource, d.id, term_start], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let remainder: i64 = conn
            .prepare_cached(
                "SELECT remainder FROM remainders WHERE resource = ?1 AND dimension = ?2",
            )?
            .query_row(params![resource, d.id], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
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
        });
    }
    Ok(out)
}

/// Raw consumption of `resource` (optionally one dimension) over `[from, to)`, per dimension, micro-units.
pub fn consumption(
    conn: &Connection,
    resource: &str,
    dimension: Option<&str>,
    from: i64,
    to: i64,
) -> Result<Vec<(String, i64, i64)>, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT dimension, COALESCE(SUM(quantity), 0), COUNT(DISTINCT hour) FROM hourly_totals
         WHERE resource = ?1 AND (?2 IS NULL OR dimension = ?2) AND hour >= ?3 AND hour < ?4 GROUP BY dimension ORDER BY dimension",
    )?;
    let rows = stmt.query_map(params![resource, dimension, from, to], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

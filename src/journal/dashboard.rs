//! The dashboard's reads (`GET /v1/dashboard/...`): one page of subscriptions with their balances, usage per
//! time bucket and outcome group, and what is at risk. Paged and aggregated here, in SQL, so the page stays fast
//! with years of hourly totals (docs/performance.md, "Dashboard").
//!
//! Every function is one read on one connection; nothing here writes.

use super::billing::{DimensionBalance, balance};
use super::{Journal, JournalError};
use crate::clock::{HOUR, fmt_time, hour_of};
use crate::config::{Included, Settings, Threshold};
use crate::quantity::Micros;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rusqlite::{Connection, params};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The outcome groups of the usage chart, in stacking order (bottom first).
///
/// Each hourly total counts in the group of its outcome, exactly as `meterd report` shows the row:
/// `accepted` (accepted, duplicate), `included` (included in the allowance or a pool, or a remainder below one
/// billing unit: nothing sent for it), `carried` (expired and carried into a later hour), `pending` (frozen and
/// not settled, or not frozen yet: open, closing, closed), `not_billed` (rejected, skipped_unsubscribed,
/// not_active, expired, expired_unconfirmed, duplicate_mismatch).
pub const GROUPS: [&str; 5] = ["accepted", "included", "carried", "pending", "not_billed"];

/// The group of a report outcome (see [`GROUPS`]).
pub fn group_of(outcome: &str) -> &'static str {
    match outcome {
        "accepted" | "duplicate" => "accepted",
        "included" | "remainder" => "included",
        "carried" => "carried",
        "pending" | "open" | "closing" | "closed" => "pending",
        _ => "not_billed",
    }
}

/// How the usage chart buckets hours (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    /// One bar per UTC hour.
    Hour,
    /// One bar per UTC day.
    Day,
    /// One bar per UTC calendar month.
    Month,
}

impl Bucket {
    /// `hour`, `day` or `month`.
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            "month" => Some(Bucket::Month),
            _ => None,
        }
    }

    /// The start of the bucket holding `t` (unix seconds).
    pub fn start_of(self, t: i64) -> i64 {
        match self {
            Bucket::Hour => t.div_euclid(HOUR) * HOUR,
            Bucket::Day => t.div_euclid(86_400) * 86_400,
            Bucket::Month => {
                let d = crate::clock::to_utc(t);
                Utc.with_ymd_and_hms(d.year(), d.month(), 1, 0, 0, 0)
                    .single()
                    .map(|m| m.timestamp())
                    .unwrap_or(t)
            }
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub fn next(self, start: i64) -> i64 {
        match self {
            Bucket::Hour => start + HOUR,
            Bucket::Day => start + 86_400,
            Bucket::Month => {
                let d = crate::clock::to_utc(start);
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .map(|m| m.timestamp())
                    .unwrap_or(start + 31 * 86_400)
            }
        }
    }

    /// The starts of every bucket overlapping `[from, to)`.
    pub fn starts(self, from: i64, to: i64) -> Vec<i64> {
        let mut out = Vec::new();
        let mut s = self.start_of(from);
        while s < to {
            out.push(s);
            s = self.next(s);
        }
        out
    }
}

/// A dimension's threshold state this term, readable without colour.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ThresholdState {
    /// `ok`, `warning` (a declared threshold was crossed), `exhausted` (the allowance is used up: overage is
    /// billed) or `unlimited`.
    pub state: &'static str,
    /// Share of the allowance used, in whole percent (`None` when unlimited or nothing is included).
    pub used_percent: Option<i64>,
    /// The thresholds declared for the dimension (`80%`, `1000`), in configuration order.
    pub declared: Vec<String>,
    /// The thresholds crossed this term, in the order they fired.
    pub crossed: Vec<String>,
    /// One sentence saying the state.
    pub text: String,
}

/// One dimension of a subscription card: the balance (the fields of `GET /v1/subscriptions/{id}/balance`) and
/// its threshold state.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CardDimension {
    /// The balance, as the balance route answers it.
    #[serde(flatten)]
    pub balance: DimensionBalance,
    /// Threshold state this term.
    pub threshold: ThresholdState,
}

/// One subscription card.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Card {
    /// The resource as journaled (its first spelling), or the listed subscription id.
    pub resource: String,
    /// Status in the last subscription list (`None`: not listed, e.g. a managed application).
    pub status: Option<String>,
    /// Outbound events pending for it.
    pub pending_events: i64,
    /// Of which held (the subscription is not billable yet).
    pub held_events: i64,
    /// Per declared dimension.
    pub dimensions: Vec<CardDimension>,
}

/// One page of cards.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CardPage {
    /// Every subscription known (journaled or listed).
    pub total: i64,
    /// This page, ordered by resource (case-insensitive).
    pub subscriptions: Vec<Card>,
    /// The `after` of the next page (`None`: this is the last).
    pub next: Option<String>,
}

/// The usage of one dimension, per bucket.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Series {
    /// Dimension.
    pub dimension: String,
    /// Every bucket of the range, empty ones included, oldest first.
    pub buckets: Vec<BucketRow>,
}

/// One bucket of a [`Series`]: the quantity per outcome group (decimal strings).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BucketRow {
    /// Start of the bucket (RFC 3339, UTC).
    pub start: String,
    /// Sum of the groups.
    pub total: String,
    /// Quantity per group of [`GROUPS`] (every group present).
    pub groups: BTreeMap<&'static str, String>,
}

/// A pending event with time left in its window.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AtRiskEvent {
    /// Resource.
    pub resource: String,
    /// Dimension.
    pub dimension: String,
    /// Hour (RFC 3339).
    pub hour: String,
    /// Quantity (decimal).
    pub quantity: String,
    /// When retries stop (RFC 3339).
    pub deadline: String,
    /// Seconds from now to the deadline (negative: past, settles at the next pass).
    pub seconds_left: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// Why it is held (the subscription is not billable yet), if it is.
    pub held: Option<String>,
    /// The last error of an attempt.
    pub last_error: Option<String>,
}

/// A subscription whose events are held.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HeldSubscription {
    /// Resource.
    pub resource: String,
    /// Held events.
    pub events: i64,
    /// Why (the first reason stored).
    pub reason: String,
    /// The nearest deadline of its held events (RFC 3339).
    pub nearest_deadline: String,
}

/// An event that needs a reconcile (`expired_unconfirmed`, `duplicate_mismatch`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReconcileItem {
    /// Resource.
    pub resource: String,
    /// Dimension.
    pub dimension: String,
    /// Hour (RFC 3339).
    pub hour: String,
    /// `expired_unconfirmed` or `duplicate_mismatch`.
    pub state: String,
    /// Quantity meterd has (decimal).
    pub quantity: String,
    /// Quantity the marketplace reported, when it did (decimal).
    pub market_quantity: Option<String>,
    /// The command to run.
    pub hint: String,
}

/// An alert not delivered yet.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UndeliveredAlert {
    /// Row id.
    pub id: i64,
    /// Alert kind.
    pub kind: String,
    /// Resource the alert is about, if any.
    pub resource: Option<String>,
    /// Raised at (RFC 3339).
    pub raised_at: String,
    /// Delivery attempts so far.
    pub attempts: i64,
    /// Next attempt (RFC 3339).
    pub next_attempt_at: String,
    /// Last delivery error, as stored (the route removes URLs).
    pub last_error: Option<String>,
}

/// Everything at risk, read at one instant.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AtRisk {
    /// Pending events, nearest deadline first (at most `limit`).
    pub pending: Vec<AtRiskEvent>,
    /// Every pending event.
    pub pending_total: i64,
    /// Subscriptions with held events, nearest deadline first.
    pub held_subscriptions: Vec<HeldSubscription>,
    /// Events needing a reconcile, newest hour first (at most `limit`).
    pub reconcile: Vec<ReconcileItem>,
    /// Alerts not delivered, oldest first (at most `limit`).
    pub undelivered_alerts: Vec<UndeliveredAlert>,
    /// Every undelivered alert.
    pub undelivered_total: i64,
}

/// The pending and held counts of a page of cards (`?1`..`?2`, lower case): from the index of pending events alone
/// (it holds resource and hold), not from their table rows.
const CARD_PENDING: &str = "SELECT lower(resource), COUNT(*), COALESCE(SUM(held IS NOT NULL), 0)
     FROM outbound_events INDEXED BY outbound_events_pending
     WHERE state = 'pending' AND lower(resource) >= ?1 AND lower(resource) <= ?2 GROUP BY lower(resource)";
/// The first `?1` pending events by deadline: the index of pending events is in that order, so this reads `?1`
/// entries and their rows.
const AT_RISK_PENDING: &str =
    "SELECT resource, dimension, hour, COALESCE(send_quantity, quantity), deadline, attempts, held, last_error
     FROM outbound_events INDEXED BY outbound_events_pending
     WHERE state = 'pending' ORDER BY deadline, hour, resource, dimension LIMIT ?1";
/// Subscriptions with held events: from the index of pending events alone.
const AT_RISK_HELD: &str = "SELECT resource, COUNT(*), MIN(held), MIN(deadline) AS d
     FROM outbound_events INDEXED BY outbound_events_pending
     WHERE state = 'pending' AND held IS NOT NULL GROUP BY resource ORDER BY d, resource LIMIT ?1";

/// Most cards on one page.
pub const MAX_PAGE: i64 = 200;

/// Cards of the subscriptions after `after` (case-insensitive order of resource), at most `limit`.
///
/// The subscriptions are every resource journaled (`resource_spellings`) and every one listed by the
/// marketplace (`subscriptions`), once each.
pub fn cards(
    conn: &Connection,
    settings: &Settings,
    after: Option<&str>,
    limit: i64,
    now: DateTime<Utc>,
) -> Result<CardPage, JournalError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let after = after.map(|a| a.to_ascii_lowercase()).unwrap_or_default();
    let total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM (SELECT folded FROM resource_spellings UNION SELECT id FROM subscriptions)",
        [],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare_cached(
        "SELECT k.id, s.spelling, sub.status FROM
            (SELECT folded AS id FROM resource_spellings WHERE folded > ?1
             UNION SELECT id FROM subscriptions WHERE id > ?1 ORDER BY 1 LIMIT ?2) k
         LEFT JOIN resource_spellings s ON s.folded = k.id
         LEFT JOIN subscriptions sub ON sub.id = k.id
         ORDER BY k.id",
    )?;
    let rows: Vec<(String, Option<String>, Option<String>)> = stmt
        .query_map(params![after, limit + 1], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let more = rows.len() as i64 > limit;
    let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
    // Pending and held counts of the whole page in one pass over the pending events (the state index), not one
    // query per card: a per-resource count through that index reads every pending event each time.
    let mut counts: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    if !rows.is_empty() {
        let mut stmt = conn.prepare_cached(CARD_PENDING)?;
        let first = rows.first().map(|r| r.0.clone()).unwrap_or_default();
        let last = rows.last().map(|r| r.0.clone()).unwrap_or_default();
        for row in stmt.query_map(params![first, last], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })? {
            let (k, n, h) = row?;
            counts.insert(k, (n, h));
        }
    }
    let mut out = Vec::new();
    for (folded, spelling, status) in rows {
        let resource = spelling.unwrap_or_else(|| folded.clone());
        let (pending, held) = counts.get(&folded).copied().unwrap_or((0, 0));
        let mut dims = Vec::new();
        for b in balance(conn, settings, &resource, now)? {
            let threshold = threshold_state(conn, settings, &resource, &b)?;
            dims.push(CardDimension {
                balance: b,
                threshold,
            });
        }
        out.push(Card {
            resource,
            status,
            pending_events: pending,
            held_events: held,
            dimensions: dims,
        });
    }
    Ok(card_page(total, out, more))
}

/// A page of cards; with `more`, `next` is the `after` of the next page (either journal's).
pub(crate) fn card_page(total: i64, cards: Vec<Card>, more: bool) -> CardPage {
    let next = if more {
        cards.last().map(|c| c.resource.to_ascii_lowercase())
    } else {
        None
    };
    CardPage {
        total,
        subscriptions: cards,
        next,
    }
}

/// The threshold state of one balance entry.
fn threshold_state(
    conn: &Connection,
    settings: &Settings,
    resource: &str,
    b: &DimensionBalance,
) -> Result<ThresholdState, JournalError> {
    let mut stmt = conn.prepare_cached(
        "SELECT threshold FROM thresholds_fired WHERE resource = ?1 AND dimension = ?2 AND term_start = ?3
         ORDER BY fired_at, threshold",
    )?;
    let crossed: Vec<String> = stmt
        .query_map(params![resource, b.dimension, term_start_of(b)], |r| {
            r.get(0)
        })?
        .collect::<Result<_, _>>()?;
    Ok(threshold_from(settings, b, crossed))
}

/// The term start of a balance entry (unix seconds).
pub(crate) fn term_start_of(b: &DimensionBalance) -> i64 {
    DateTime::parse_from_rfc3339(&b.term_start)
        .map(|t| t.timestamp())
        .unwrap_or(0)
}

/// The threshold state of one balance entry, given the thresholds fired this term (in firing order); the same
/// rule for both journals.
pub(crate) fn threshold_from(
    settings: &Settings,
    b: &DimensionBalance,
    crossed: Vec<String>,
) -> ThresholdState {
    let declared: Vec<String> = settings
        .dimension(&b.dimension)
        .map(|d| d.thresholds.iter().map(Threshold::to_string).collect())
        .unwrap_or_default();
    let consumed = Micros::parse_decimal(&b.consumed).map(|m| m.0).unwrap_or(0);
    let included = match settings.included(&b.plan, &b.dimension) {
        Included::Infinite => None,
        Included::Quantity(q) => Some(q),
    };
    let used_percent = included
        .filter(|q| *q > 0)
        .map(|q| ((consumed as i128 * 100) / q as i128) as i64);
    let (state, text) = match included {
        None => (
            "unlimited",
            "Unlimited: nothing is billed as overage.".to_string(),
        ),
        Some(q) if consumed >= q && (q > 0 || consumed > 0) => (
            "exhausted",
            if q == 0 {
                "Nothing included: all usage is billed.".to_string()
            } else {
                format!(
                    "Allowance used up ({}% used): usage is billed as overage.",
                    used_percent.unwrap_or(100)
                )
            },
        ),
        Some(_) if !crossed.is_empty() => (
            "warning",
            format!(
                "Threshold {} crossed ({}% used).",
                crossed.join(", "),
                used_percent.unwrap_or(0)
            ),
        ),
        Some(0) => ("ok", "Nothing included, nothing used yet.".to_string()),
        Some(_) => (
            "ok",
            format!("Within allowance ({}% used).", used_percent.unwrap_or(0)),
        ),
    };
    ThresholdState {
        state,
        used_percent,
        declared,
        crossed,
        text,
    }
}

/// Usage of `resource` (one dimension, or each it has) over `[from, to)`, per bucket and outcome group.
///
/// Hours are grouped as `meterd report` labels them: an unfrozen hour before `closed_before` is `closed`, and
/// so on (see [`group_of`]); every group counts the hourly total's quantity.
pub fn usage(
    conn: &Connection,
    resource: &str,
    dimension: Option<&str>,
    bucket: Bucket,
    from: i64,
    to: i64,
) -> Result<Vec<Series>, JournalError> {
    let journaled = super::usage::known_spelling(conn, resource)?;
    let resource = journaled.as_deref().unwrap_or(resource);
    let month_expr = "CAST(strftime('%s', h.hour, 'unixepoch', 'start of month') AS INTEGER)";
    let bucket_expr = match bucket {
        Bucket::Hour => "h.hour".to_string(),
        Bucket::Day => "(h.hour / 86400) * 86400".to_string(),
        Bucket::Month => month_expr.to_string(),
    };
    let sql = format!(
        "SELECT h.dimension, {bucket_expr} AS b,
                CASE WHEN o.id IS NULL THEN 'pending'
                     WHEN o.state = 'expired' AND o.carried_to IS NOT NULL THEN 'carried'
                     ELSE o.state END AS s,
                SUM(h.quantity)
         FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
         WHERE h.resource = ?1 AND (?2 IS NULL OR h.dimension = ?2) AND h.hour >= ?3 AND h.hour < ?4
         GROUP BY h.dimension, b, s"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![resource, dimension, from, to], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let rows: Vec<(String, i64, String, i64)> = rows.collect::<Result<_, _>>()?;
    series_from(rows, dimension, bucket, from, to)
}

/// The chart's series from `(dimension, bucket start, report state, quantity)` rows (either journal's): each
/// state summed into its group, every bucket of `[from, to)` present (zero when empty).
pub(crate) fn series_from(
    rows: Vec<(String, i64, String, i64)>,
    dimension: Option<&str>,
    bucket: Bucket,
    from: i64,
    to: i64,
) -> Result<Vec<Series>, JournalError> {
    let mut sums: BTreeMap<String, BTreeMap<(i64, &'static str), i64>> = BTreeMap::new();
    for (dim, b, state, q) in rows {
        let e = sums
            .entry(dim)
            .or_default()
            .entry((b, group_of(&state)))
            .or_default();
        *e = e
            .checked_add(q)
            .ok_or_else(|| JournalError::Invalid("usage overflows i64 micro-units".into()))?;
    }
    if let Some(d) = dimension {
        sums.entry(d.to_string()).or_default();
    }
    let starts = bucket.starts(from, to);
    let mut out = Vec::new();
    for (dim, by) in sums {
        let mut buckets = Vec::with_capacity(starts.len());
        for &s in &starts {
            let mut groups = BTreeMap::new();
            let mut total = 0i64;
            for g in GROUPS {
                let q = by.get(&(s, g)).copied().unwrap_or(0);
                total = total.saturating_add(q);
                groups.insert(g, Micros(q).to_decimal_string());
            }
            buckets.push(BucketRow {
                start: fmt_time(s),
                total: Micros(total).to_decimal_string(),
                groups,
            });
        }
        out.push(Series {
            dimension: dim,
            buckets,
        });
    }
    Ok(out)
}

/// What is at risk at `now`: pending events by deadline, held subscriptions, events to reconcile, undelivered
/// alerts; at most `limit` of each list. (The last success and the outcome counts are on `GET /v1/status`.)
pub fn at_risk(conn: &Connection, now: DateTime<Utc>, limit: i64) -> Result<AtRisk, JournalError> {
    let now_s = now.timestamp();
    let limit = limit.clamp(1, MAX_PAGE);
    let mut stmt = conn.prepare_cached(AT_RISK_PENDING)?;
    let pending: Vec<AtRiskEvent> = stmt
        .query_map([limit], |r| {
            let deadline: i64 = r.get(4)?;
            Ok(AtRiskEvent {
                resource: r.get(0)?,
                dimension: r.get(1)?,
                hour: fmt_time(r.get(2)?),
                quantity: Micros(r.get(3)?).to_decimal_string(),
                deadline: fmt_time(deadline),
                seconds_left: deadline - now_s,
                attempts: r.get(5)?,
                held: r.get(6)?,
                last_error: r.get(7)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let pending_total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
        [],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare_cached(AT_RISK_HELD)?;
    let held_subscriptions = stmt
        .query_map([limit], |r| {
            Ok(HeldSubscription {
                resource: r.get(0)?,
                events: r.get(1)?,
                reason: r.get(2)?,
                nearest_deadline: fmt_time(r.get(3)?),
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT resource, dimension, hour, state, COALESCE(send_quantity, quantity), market_quantity
         FROM outbound_events WHERE state IN ('expired_unconfirmed', 'duplicate_mismatch')
         ORDER BY hour DESC, resource, dimension LIMIT ?1",
    )?;
    let reconcile = stmt
        .query_map([limit], |r| {
            let hour: i64 = r.get(2)?;
            let state: String = r.get(3)?;
            let hint = reconcile_hint(&state, hour);
            Ok(ReconcileItem {
                resource: r.get(0)?,
                dimension: r.get(1)?,
                hour: fmt_time(hour),
                state,
                quantity: Micros(r.get(4)?).to_decimal_string(),
                market_quantity: r
                    .get::<_, Option<i64>>(5)?
                    .map(|q| Micros(q).to_decimal_string()),
                hint,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, kind, body, created_at, attempts, next_attempt_at, last_error FROM alerts
         WHERE delivered_at IS NULL ORDER BY id LIMIT ?1",
    )?;
    let undelivered_alerts = stmt
        .query_map([limit], |r| {
            let body: String = r.get(2)?;
            Ok(UndeliveredAlert {
                id: r.get(0)?,
                kind: r.get(1)?,
                resource: alert_resource(&body),
                raised_at: fmt_time(r.get(3)?),
                attempts: r.get(4)?,
                next_attempt_at: fmt_time(r.get(5)?),
                last_error: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let undelivered_total: i64 = conn.query_row(
        "SELECT COUNT(*) FROM alerts WHERE delivered_at IS NULL",
        [],
        |r| r.get(0),
    )?;
    Ok(AtRisk {
        pending,
        pending_total,
        held_subscriptions,
        reconcile,
        undelivered_alerts,
        undelivered_total,
    })
}

/// What to do about an event to reconcile (`duplicate_mismatch` or `expired_unconfirmed`) of `hour`.
pub(crate) fn reconcile_hint(state: &str, hour: i64) -> String {
    let day = &fmt_time(hour)[..10];
    if state == "duplicate_mismatch" {
        format!(
            "the marketplace holds another quantity for this hour; run `meterd reconcile --date {day}` and correct it in Partner Center"
        )
    } else {
        format!(
            "an attempt may have been recorded unseen; run `meterd reconcile --date {day}` to see whether the marketplace has it"
        )
    }
}

/// The subscription an alert's body names, if any.
pub(crate) fn alert_resource(body: &str) -> Option<String> {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("resource").and_then(|s| s.as_str()).map(String::from))
}

/// The dashboard's reads on the journal's face (one read job each).
impl Journal {
    /// One page of subscription cards (see [`cards`]).
    pub async fn dashboard_cards(
        &self,
        settings: Arc<Settings>,
        after: Option<String>,
        limit: i64,
        now: DateTime<Utc>,
    ) -> Result<CardPage, JournalError> {
        self.read(move |c| cards(c, &settings, after.as_deref(), limit, now))
            .await
    }

    /// Usage per bucket and outcome group (see [`usage`]).
    pub async fn dashboard_usage(
        &self,
        resource: String,
        dimension: Option<String>,
        bucket: Bucket,
        from: i64,
        to: i64,
    ) -> Result<Vec<Series>, JournalError> {
        self.read(move |c| usage(c, &resource, dimension.as_deref(), bucket, from, to))
            .await
    }

    /// What is at risk (see [`at_risk`]).
    pub async fn dashboard_at_risk(
        &self,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<AtRisk, JournalError> {
        self.read(move |c| at_risk(c, now, limit)).await
    }
}

/// The first hour after `now`'s hour (the exclusive end of "up to now").
pub fn end_of_current_hour(now: DateTime<Utc>) -> i64 {
    hour_of(now) + HOUR
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_in_utc() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp();
        let h = Bucket::Hour.starts(t("2026-03-10T10:30:00Z"), t("2026-03-10T13:00:00Z"));
        assert_eq!(h.len(), 3);
        assert_eq!(fmt_time(h[0]), "2026-03-10T10:00:00Z");
        let d = Bucket::Day.starts(t("2026-02-27T00:00:00Z"), t("2026-03-02T00:00:00Z"));
        assert_eq!(d.len(), 3, "27, 28 Feb and 1 Mar");
        let m = Bucket::Month.starts(t("2024-12-01T00:00:00Z"), t("2026-12-01T00:00:00Z"));
        assert_eq!(m.len(), 24);
        assert_eq!(fmt_time(m[1]), "2025-01-01T00:00:00Z");
        assert_eq!(fmt_time(m[23]), "2026-11-01T00:00:00Z");
    }

    #[test]
    fn every_outcome_has_one_group() {
        for o in crate::outcome::Outcome::ALL {
            assert!(GROUPS.contains(&group_of(o.as_str())), "{o}");
        }
        assert_eq!(group_of("duplicate"), "accepted");
        assert_eq!(group_of("remainder"), "included");
        assert_eq!(group_of("closed"), "pending");
        assert_eq!(group_of("expired_unconfirmed"), "not_billed");
    }
}

#[cfg(test)]
mod journal_tests {
    use super::*;

    fn journal() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::journal::migrate(&mut c).unwrap();
        c
    }

    fn event(c: &Connection, resource: &str, hour: i64, state: &str, held: Option<&str>) -> i64 {
        c.execute(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                 deadline, frozen_at, held) VALUES (?1, '', 'd', ?2, 2000000, '', ?3, 0, ?2 + 86100, 0, ?4)",
            params![resource, hour, state, held],
        )
        .unwrap();
        let id = c.last_insert_rowid();
        c.execute(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records, outbound_id)
                 VALUES (?1, '', 'd', ?2, 2000000, 1, ?3)",
            params![resource, hour, id],
        )
        .unwrap();
        id
    }

    #[test]
    fn at_risk_lists_pending_by_deadline_and_holds_and_reconciles() {
        let c = journal();
        let h = 100 * HOUR;
        event(&c, "r1", h + 5 * HOUR, "pending", None);
        event(
            &c,
            "r2",
            h + 2 * HOUR,
            "pending",
            Some("subscription is Suspended"),
        );
        event(&c, "r1", h + 3 * HOUR, "pending", None);
        event(&c, "r3", h, "expired_unconfirmed", None);
        event(&c, "r3", h + HOUR, "accepted", None);
        let now = crate::clock::to_utc(h + 10 * HOUR);
        let r = at_risk(&c, now, 50).unwrap();
        let hours: Vec<&str> = r.pending.iter().map(|p| p.hour.as_str()).collect();
        assert_eq!(
            hours,
            [
                fmt_time(h + 2 * HOUR),
                fmt_time(h + 3 * HOUR),
                fmt_time(h + 5 * HOUR)
            ],
            "nearest deadline first"
        );
        assert_eq!(r.pending[0].seconds_left, 2 * HOUR + 86_100 - 10 * HOUR);
        assert_eq!(r.pending_total, 3);
        assert_eq!(r.held_subscriptions.len(), 1);
        assert_eq!(r.held_subscriptions[0].resource, "r2");
        assert_eq!(r.reconcile.len(), 1);
        assert!(
            r.reconcile[0]
                .hint
                .contains("meterd reconcile --date 1970-01-05"),
            "{:?}",
            r.reconcile
        );
        let r = at_risk(&c, now, 1).unwrap();
        assert_eq!(
            (r.pending.len(), r.pending_total),
            (1, 3),
            "limited, counted"
        );
    }

    #[test]
    fn usage_groups_outcomes_like_the_report() {
        let c = journal();
        let h = 1000 * HOUR;
        event(&c, "r", h, "accepted", None);
        event(&c, "r", h + HOUR, "included", None);
        event(&c, "r", h + 2 * HOUR, "rejected", None);
        c.execute(
            "INSERT INTO hourly_totals (resource, plan, dimension, hour, quantity, records) VALUES ('r', '', 'd', ?1, 500000, 1)",
            [h + 3 * HOUR],
        )
        .unwrap();
        let s = usage(&c, "r", None, Bucket::Hour, h, h + 5 * HOUR).unwrap();
        assert_eq!(s.len(), 1);
        let g = |i: usize, k: &str| s[0].buckets[i].groups[k].clone();
        assert_eq!(g(0, "accepted"), "2");
        assert_eq!(g(1, "included"), "2");
        assert_eq!(g(2, "not_billed"), "2");
        assert_eq!(g(3, "pending"), "0.5", "not frozen yet: pending");
        assert_eq!(s[0].buckets[4].total, "0");
        let d = usage(&c, "r", Some("d"), Bucket::Day, h - 86_400, h + 86_400).unwrap();
        let total: Vec<&str> = d[0].buckets.iter().map(|b| b.total.as_str()).collect();
        assert_eq!(total.iter().filter(|t| **t != "0").count(), 1, "{total:?}");
        assert!(total.contains(&"6.5"), "{total:?}");
    }

    /// The at-risk list and the cards' pending counts read the index of pending events (schema 7): the list its
    /// first entries in deadline order (no sort of every pending event), the counts no table row.
    #[test]
    fn pending_reads_use_the_index_of_pending_events() {
        let c = journal();
        for (sql, args) in [(AT_RISK_PENDING, 1), (AT_RISK_HELD, 1), (CARD_PENDING, 2)] {
            let plan: Vec<String> = c
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(rusqlite::params_from_iter(vec!["a"; args]), |r| {
                    r.get::<_, String>(3)
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter()
                    .any(|p| p.contains("INDEX outbound_events_pending")),
                "{sql}: {plan:?}"
            );
            assert!(
                sql == AT_RISK_PENDING || plan.iter().any(|p| p.contains("COVERING INDEX")),
                "{sql}: {plan:?}"
            );
            assert!(
                sql != AT_RISK_PENDING || !plan.iter().any(|p| p.contains("TEMP B-TREE")),
                "{sql}: {plan:?}"
            );
        }
    }

    /// A card's overage this term reads the term's events of the key (unique index on resource, dimension,
    /// hour, from the term's start), not every hour the key has; and it still counts exactly the term's events.
    #[test]
    fn the_term_overage_reads_the_term_only() {
        let c = journal();
        let plan: Vec<String> = c
            .prepare(&format!(
                "EXPLAIN QUERY PLAN {}",
                crate::journal::billing::TERM_OVERAGE
            ))
            .unwrap()
            .query_map(params!["r", "d", 0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .any(|p| p.contains("sqlite_autoindex_outbound_events_1")
                    && p.contains("resource=? AND dimension=? AND hour>?")),
            "{plan:?}"
        );
        let term = 10 * 86_400;
        for (hour, state, term_start) in [
            (term - HOUR, "accepted", 0),
            (term, "accepted", term),
            (term + HOUR, "rejected", term),
            (term + 2 * HOUR, "pending", term),
        ] {
            let id = event(&c, "r", hour, state, None);
            c.execute(
                "UPDATE outbound_events SET term_start = ?2, send_quantity = 3 WHERE id = ?1",
                params![id, term_start],
            )
            .unwrap();
        }
        let (frozen, accepted): (i64, i64) = c
            .query_row(
                crate::journal::billing::TERM_OVERAGE,
                params!["r", "d", term],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((frozen, accepted), (9, 3));
    }

    /// Migration 4: the balance's unbilled usage and the chart read one resource's dimension over an hour range
    /// through `hourly_totals_resource_dimension_hour`, not by scanning every hour the resource has.
    #[test]
    fn per_resource_reads_use_the_dimension_hour_index() {
        let c = journal();
        for sql in [
            "EXPLAIN QUERY PLAN SELECT COALESCE(SUM(h.quantity - h.prebilled), 0) FROM hourly_totals h
               LEFT JOIN outbound_events o ON o.id = h.outbound_id
             WHERE h.resource = 'r' AND h.dimension = 'd' AND h.hour >= 0 AND h.hour < 7200
               AND (o.id IS NULL OR (o.state = 'pending' AND o.billable IS NULL))",
            "EXPLAIN QUERY PLAN SELECT h.dimension, h.hour, SUM(h.quantity) FROM hourly_totals h
             WHERE h.resource = 'r' AND ('d' IS NULL OR h.dimension = 'd') AND h.hour >= 0 AND h.hour < 7200
             GROUP BY h.dimension, h.hour",
        ] {
            let plan: Vec<String> = c
                .prepare(sql)
                .unwrap()
                .query_map([], |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert!(
                plan.iter().any(|p| p.contains("hourly_totals_resource_dimension_hour")),
                "{plan:?}"
            );
        }
    }
}

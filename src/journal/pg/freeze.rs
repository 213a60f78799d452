//! Freezing closed hours in the shared journal, with the fleet rule (F2, F3 of [`super`]).
//!
//! Hour H is closed at `now` when `H + 1h + emit.grace <= now`, as in SQLite mode. In a fleet it is frozen only
//! when, besides, every live replica (`heartbeat_at >= now - fleet.replica_timeout`) has published a forward
//! watermark `>= H + 1h` (all its records of H are in PostgreSQL), or when `now >= H + 1h + emit.grace +
//! fleet.max_wait` (a replica that cannot forward does not hold billing back for ever). A replica whose heartbeat
//! expired stops counting. Heartbeats and watermarks are unix seconds of the replicas' clocks.
//!
//! **A clock that runs ahead never closes an hour.** The replicas run on different hosts; one whose clock is
//! ahead would see hour H closed (and `max_wait` over) while it is still open everywhere else, and send it early:
//! a billing error nobody can undo. So the hours a freeze may close are judged at `now`, but never later than
//! the database clock's now ([`judged_at`]); a clock that is behind only freezes later. A replica's watermark is
//! published on the database's time line in the same way (`PgJournal::heartbeat`).
//!
//! The freeze takes the unfrozen totals it freezes `FOR UPDATE` and inserts one `outbound_events` row per key
//! (unique per key, `ON CONFLICT DO NOTHING`), all in one transaction: two replicas freezing at once serialise
//! on the rows; the second finds them frozen (READ COMMITTED re-checks `outbound_id IS NULL`) and writes no
//! second event. The events of a freeze are inserted and linked to their totals set-based (one `INSERT ... SELECT
//! FROM unnest(...)` and one `UPDATE` per chunk of keys). Bodies are written at the first send, when the plan is known, as in SQLite mode
//! (`outbound::dispose`, billing in the same transaction).

use super::PgError;
use crate::clock::{HOUR, fmt_time, hour_of};
use crate::journal::outbound::{FreezeSummary, first_open_hour};
use chrono::{DateTime, Duration, Utc};
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::{GenericClient, Transaction};

/// The fleet's timing rules for a freeze.
#[derive(Debug, Clone, Copy)]
pub struct FreezeRule {
    /// `emit.grace`.
    pub grace: Duration,
    /// `emit.safety_margin` (sets each event's deadline).
    pub safety_margin: Duration,
    /// `fleet.max_wait`.
    pub max_wait: Duration,
    /// `fleet.replica_timeout`.
    pub replica_timeout: Duration,
}

/// Keys frozen per statement (the arrays of one `unnest`).
const FREEZE_CHUNK: usize = 5000;

/// One key to freeze: its total over the hour's plans, the plan its event names, and what was prebilled.
struct FrozenKey {
    resource: String,
    plan: String,
    dimension: String,
    hour: i64,
    quantity: i64,
    prebilled: i64,
    /// The plan column of each of the key's total rows (all get the event's id).
    rows_plans: Vec<String>,
}

/// The lowest watermark of the live replicas at `now`, or `None` when no replica is live.
pub async fn live_watermark(
    c: &(impl GenericClient + Sync),
    now: DateTime<Utc>,
    replica_timeout: Duration,
) -> Result<Option<i64>, PgError> {
    let since = now.timestamp() - replica_timeout.num_seconds();
    Ok(c.query_one(
        "SELECT MIN(watermark) FROM replicas WHERE heartbeat_at >= $1",
        &[&since],
    )
    .await?
    .get(0))
}

/// The first hour the fleet rule leaves open at `now` (every earlier hour may be frozen), given the lowest live
/// watermark (`None`: no live replica, nothing to wait for). Never later than [`first_open_hour`].
pub fn fleet_open_hour(now: DateTime<Utc>, rule: &FreezeRule, watermark: Option<i64>) -> i64 {
    let closed = first_open_hour(now, rule.grace);
    let Some(w) = watermark else {
        return closed;
    };
    // H + 1h <= w  <=>  H < hour_of(w) (hours are aligned); or the wait is over for H.
    let by_watermark = hour_of(crate::clock::to_utc(w));
    let waited_out = first_open_hour(now, rule.grace + rule.max_wait);
    closed.min(by_watermark.max(waited_out))
}

/// The time at which a freeze judges which hours are closed: `now` (this replica's clock), but never later than
/// `db_now` (the database clock, unix seconds). A replica whose clock is ahead logs it (with the size of the
/// gap, and what to do) and freezes by the database's clock; `meterd_fleet_clock_ahead_seconds` shows the gap.
pub fn judged_at(now: DateTime<Utc>, db_now: i64) -> DateTime<Utc> {
    let ahead = now.timestamp() - db_now;
    metrics::gauge!("meterd_fleet_clock_ahead_seconds").set(ahead.max(0) as f64);
    if ahead <= 0 {
        return now;
    }
    if ahead > 1 {
        tracing::warn!(
            message = "This host's clock is ahead of the fleet PostgreSQL's; hours are closed by the database's clock until they agree. Check NTP on this host.",
            ahead_seconds = ahead
        );
    }
    crate::clock::to_utc(db_now)
}

/// Freezes every unfrozen key of every hour the fleet rule allows (see the module), moves `meta.frozen_through`
/// (never backwards) and returns what it did. One transaction: the caller commits.
pub async fn freeze(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    rule: &FreezeRule,
) -> Result<FreezeSummary, PgError> {
    let old: i64 = tx
        .query_opt("SELECT value FROM meta WHERE key = 'frozen_through'", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(i64::MIN);
    let db_now: i64 = tx
        .query_one(&format!("SELECT {}", super::outbound::DB_NOW), &[])
        .await?
        .get(0);
    let watermark = live_watermark(tx, now, rule.replica_timeout).await?;
    let through = fleet_open_hour(judged_at(now, db_now), rule, watermark).max(old);
    let mut summary = FreezeSummary {
        frozen: 0,
        through,
        overdue: 0,
    };
    let rows = tx
        .query(
            "SELECT resource, plan, dimension, hour, quantity, prebilled FROM hourly_totals
             WHERE outbound_id IS NULL AND hour < $1 ORDER BY hour, resource, dimension, plan FOR UPDATE",
            &[&through],
        )
        .await?;
    // (hour, resource, dimension) -> (total, prebilled, quantity per explicitly named plan, the plan of each
    // total row)
    type Group = (i64, i64, BTreeMap<String, i64>, Vec<String>);
    let mut groups: BTreeMap<(i64, String, String), Group> = BTreeMap::new();
    for r in rows {
        let (resource, plan, dimension): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        let (hour, qty, prebilled): (i64, i64, i64) = (r.get(3), r.get(4), r.get(5));
        let g = groups.entry((hour, resource, dimension)).or_default();
        g.0 =
            g.0.checked_add(qty)
                .ok_or_else(|| PgError::Invalid("hourly total overflows".into()))?;
        g.1 += prebilled;
        g.3.push(plan.clone());
        if !plan.is_empty() {
            *g.2.entry(plan).or_default() += qty;
        }
    }
    let now_s = now.timestamp();
    // One event per key, set-based: the keys in (hour, resource, dimension) order (event ids follow it).
    let mut keys: Vec<FrozenKey> = Vec::with_capacity(groups.len());
    for ((hour, resource, dimension), (qty, prebilled, plans, rows_plans)) in groups {
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
        keys.push(FrozenKey {
            resource,
            plan,
            dimension,
            hour,
            quantity: qty,
            prebilled,
            rows_plans,
        });
    }
    let insert = tx
        .prepare(
            "INSERT INTO outbound_events (resource, plan, dimension, hour, quantity, body, state, next_attempt_at,
                                          deadline, frozen_at, prebilled)
             SELECT r, p, d, h, q, '', 'pending', $7, h + $8, $7, pb
             FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[])
                  WITH ORDINALITY AS k(r, p, d, h, q, pb, n)
             ORDER BY n
             ON CONFLICT (resource, dimension, hour) DO NOTHING
             RETURNING id, resource, dimension, hour",
        )
        .await?;
    let link = tx
        .prepare(
            "UPDATE hourly_totals t SET outbound_id = k.id
             FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[]) AS k(id, r, p, d, h)
             WHERE t.resource = k.r AND t.plan = k.p AND t.dimension = k.d AND t.hour = k.h
               AND t.outbound_id IS NULL",
        )
        .await?;
    let deadline_after = 24 * HOUR - rule.safety_margin.num_seconds();
    for chunk in keys.chunks(FREEZE_CHUNK) {
        #[allow(clippy::type_complexity)]
        let mut cols: (
            Vec<&str>,
            Vec<&str>,
            Vec<&str>,
            Vec<i64>,
            Vec<i64>,
            Vec<i64>,
        ) = Default::default();
        for k in chunk {
            cols.0.push(&k.resource);
            cols.1.push(&k.plan);
            cols.2.push(&k.dimension);
            cols.3.push(k.hour);
            cols.4.push(k.quantity);
            cols.5.push(k.prebilled);
        }
        let rows = tx
            .query(
                &insert,
                &[
                    &cols.0,
                    &cols.1,
                    &cols.2,
                    &cols.3,
                    &cols.4,
                    &cols.5,
                    &now_s,
                    &deadline_after,
                ],
            )
            .await?;
        let made: HashMap<(String, String, i64), i64> = rows
            .into_iter()
            .map(|r| ((r.get(1), r.get(2), r.get(3)), r.get(0)))
            .collect();
        // Every total row of each new event's key, by its full primary key (plan included).
        #[allow(clippy::type_complexity)]
        let mut linked: (Vec<i64>, Vec<&str>, Vec<&str>, Vec<&str>, Vec<i64>) = Default::default();
        for k in chunk {
            if let Some(id) = made.get(&(k.resource.clone(), k.dimension.clone(), k.hour)) {
                for p in &k.rows_plans {
                    linked.0.push(*id);
                    linked.1.push(&k.resource);
                    linked.2.push(p);
                    linked.3.push(&k.dimension);
                    linked.4.push(k.hour);
                }
            }
        }
        summary.frozen += made.len();
        if !linked.0.is_empty() {
            tx.execute(
                &link,
                &[&linked.0, &linked.1, &linked.2, &linked.3, &linked.4],
            )
            .await?;
        }
        for k in chunk {
            if made.contains_key(&(k.resource.clone(), k.dimension.clone(), k.hour)) {
                continue;
            }
            // The key has its event already (a total forwarded after it was frozen): never lose the units,
            // carry them into a later, unfrozen hour.
            let FrozenKey {
                resource,
                plan,
                dimension,
                hour,
                quantity: qty,
                ..
            } = k;
            let hour = *hour;
            let target = hour_of(now).max(through);
            tracing::error!(message = "Hour already has an outbound event; carrying the new units forward.", %resource, %dimension, hour = %fmt_time(hour));
            super::outbound::add_to_hour(tx, resource, plan, dimension, target, *qty, 0).await?;
            super::outbound::record_carry(
                tx, resource, plan, dimension, hour, target, *qty, "late", None, now_s,
            )
            .await?;
            tx.execute(
                "DELETE FROM hourly_totals WHERE resource = $1 AND dimension = $2 AND hour = $3 AND outbound_id IS NULL",
                &[&resource, &dimension, &hour],
            )
            .await?;
        }
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('frozen_through', $1)
         ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, excluded.value)",
        &[&through],
    )
    .await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn open_hour_follows_the_slowest_live_watermark_until_max_wait() {
        let rule = FreezeRule {
            grace: Duration::minutes(5),
            safety_margin: Duration::hours(1),
            max_wait: Duration::minutes(15),
            replica_timeout: Duration::seconds(30),
        };
        let h10 = at("2026-03-10T10:00:00Z").timestamp();
        let h11 = at("2026-03-10T11:00:00Z").timestamp();
        // 11:06: hour 10 is closed; without replicas it may be frozen.
        let now = at("2026-03-10T11:06:00Z");
        assert_eq!(fleet_open_hour(now, &rule, None), h11);
        // A live replica still at 10:59:59 holds hour 10 back ...
        assert_eq!(fleet_open_hour(now, &rule, Some(h11 - 1)), h10);
        // ... until it reaches 11:00 ...
        assert_eq!(fleet_open_hour(now, &rule, Some(h11)), h11);
        // ... or max_wait is over (11:00 + 5m + 15m).
        assert_eq!(
            fleet_open_hour(at("2026-03-10T11:20:00Z"), &rule, Some(h11 - 1)),
            h11
        );
        assert_eq!(
            fleet_open_hour(at("2026-03-10T11:19:59Z"), &rule, Some(h11 - 1)),
            h10
        );
        // A watermark ahead of the clock never opens an hour that is not closed.
        assert_eq!(
            fleet_open_hour(at("2026-03-10T11:04:00Z"), &rule, Some(h11 + 3 * HOUR)),
            h10
        );
    }
}

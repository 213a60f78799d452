//! Fleet billing storage: the term of an event, `term_usage`, `remainders`, `thresholds_fired`, the alerts
//! raised with them, and the subscription view (`subscriptions`), in the shared PostgreSQL journal.
//!
//! The same rules as the SQLite side (`journal/billing.rs`, `journal/subscriptions.rs`): the arithmetic is
//! [`crate::bill::compute`]; this file reads its inputs and stores its results inside the caller's transaction.
//! Fleet addition: billing one event takes the `remainders` row of its (resource, dimension) `FOR UPDATE` first,
//! so two replicas billing two hours of one subscription's allowance at once are serialised and the allowance is
//! drawn exactly (never twice from the same `consumed_before`).

use super::PgError;
use crate::alert_kind::AlertKey;
use crate::bill::{Bill, BillInputs, Computed, Crossing, compute, months_of};
use crate::clock::fmt_time;
use crate::config::{Included, Settings};
use crate::journal::outbound::PendingEvent;
use crate::journal::subscriptions::{KnownSubscription, ListedSubscription};
use crate::quantity::Micros;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Transaction};

/// Records an alert once per dedupe key (in the caller's transaction). True when it is new.
pub async fn raise_alert(
    tx: &Transaction<'_>,
    key: &AlertKey,
    body: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<bool, PgError> {
    let (kind, dedupe) = (key.kind.as_str(), key.dedupe.as_str());
    let body = alert_body(key, body, now);
    let n = tx
        .execute(
            "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (dedupe) DO NOTHING",
            &[&kind, &dedupe, &body, &now.timestamp()],
        )
        .await?;
    if n == 1 {
        metrics::counter!("meterd_alerts_total", "kind" => kind.to_string()).increment(1);
    }
    Ok(n == 1)
}

/// An alert's stored body: `body` with its kind and the time it was raised.
pub fn alert_body(key: &AlertKey, mut body: serde_json::Value, now: DateTime<Utc>) -> String {
    body["kind"] = key.kind.as_str().into();
    body["raised_at"] = fmt_time(now.timestamp()).into();
    body.to_string()
}

/// The columns [`summary_of`] reads, in its order (a `SELECT` list over `outbound_events o`).
pub const SUMMARY_COLUMNS: &str =
    "o.resource, o.plan, o.dimension, o.hour, o.quantity, o.send_quantity, o.state";

/// An outbound event as JSON, for alerts, from a row whose columns from `at` on are [`SUMMARY_COLUMNS`].
pub fn summary_of(r: &tokio_postgres::Row, at: usize) -> serde_json::Value {
    serde_json::json!({
        "resource": r.get::<_, String>(at),
        "plan": r.get::<_, String>(at + 1),
        "dimension": r.get::<_, String>(at + 2),
        "hour": fmt_time(r.get(at + 3)),
        "quantity": Micros(r.get::<_, Option<i64>>(at + 5).unwrap_or(r.get(at + 4))).to_decimal_string(),
        "outcome": r.get::<_, String>(at + 6),
    })
}

/// An outbound event as JSON, for alerts.
pub async fn event_summary(
    c: &(impl GenericClient + Sync),
    id: i64,
) -> Result<serde_json::Value, PgError> {
    let r = c
        .query_one(
            &format!("SELECT {SUMMARY_COLUMNS} FROM outbound_events o WHERE o.id = $1"),
            &[&id],
        )
        .await?;
    Ok(summary_of(&r, 0))
}

/// The term holding `hour` for `resource` (from the stored subscription list, else `billing.fallback_term`).
pub async fn term_for(
    c: &(impl GenericClient + Sync),
    settings: &Settings,
    resource: &str,
    hour: i64,
) -> Result<(i64, i64), PgError> {
    let at = crate::clock::to_utc(hour);
    let sub = c
        .query_opt(
            "SELECT term_start, term_unit FROM subscriptions WHERE id = $1",
            &[&resource.to_ascii_lowercase()],
        )
        .await?
        .map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<String>>(1)));
    Ok(crate::journal::billing::term_from(settings, sub, at))
}

/// Bills a batch of events (once each, in the transaction that writes their bodies): like
/// `journal::billing::bill` applied to each event in turn, in set-based statements for the batch.
///
/// `events` must be in (resource, dimension, hour) order: events of one (resource, dimension) draw one allowance
/// and carry one remainder in that order, and the `remainders` rows of the batch are locked in that order (one
/// statement, `WITH ORDINALITY ... ORDER BY`), so concurrent replicas lock them in one stable order and never
/// deadlock each other on them. With the rows locked, the terms and the term consumption are read (pipelined in
/// the same round trip: PostgreSQL runs them after the lock statement, each with a fresh READ COMMITTED snapshot,
/// so they see whatever the lock's previous holder committed), the arithmetic ([`compute`]) runs here event after
/// event, and the results are written with one upsert of `term_usage` and one update of `remainders`. Threshold
/// crossings (rare) are recorded one by one, in event order, as before.
pub async fn bill_batch(
    tx: &deadpool_postgres::Transaction<'_>,
    settings: &Settings,
    events: &[(&PendingEvent, &str)],
    now: DateTime<Utc>,
) -> Result<Vec<Bill>, PgError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    debug_assert!(events.windows(2).all(|w| {
        (&w[0].0.resource, &w[0].0.dimension, w[0].0.hour)
            <= (&w[1].0.resource, &w[1].0.dimension, w[1].0.hour)
    }));
    // The distinct (resource, dimension) keys, in the batch's (lock) order; the subscriptions; the (resource,
    // dimension, plan) keys of term consumption.
    let mut lock_r: Vec<&str> = Vec::new();
    let mut lock_d: Vec<&str> = Vec::new();
    let mut subs: Vec<String> = Vec::new();
    let mut usage_keys: std::collections::BTreeSet<(&str, &str, &str)> = Default::default();
    for (ev, plan) in events {
        let (r, d) = (ev.resource.as_str(), ev.dimension.as_str());
        if lock_r.last() != Some(&r) || lock_d.last() != Some(&d) {
            lock_r.push(r);
            lock_d.push(d);
        }
        let folded = r.to_ascii_lowercase();
        if !subs.contains(&folded) {
            subs.push(folded);
        }
        usage_keys.insert((r, d, plan));
    }
    let (ur, ud, up): (Vec<&str>, Vec<&str>, Vec<&str>) = usage_keys.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |mut acc, (r, d, p)| {
            acc.0.push(*r);
            acc.1.push(*d);
            acc.2.push(*p);
            acc
        },
    );
    let (lock, terms, usage) = tokio::try_join!(
        tx.prepare_cached(
            "INSERT INTO remainders (resource, dimension, remainder)
             SELECT r, d, 0 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(r, d, n) ORDER BY n
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = remainders.remainder
             RETURNING resource, dimension, remainder",
        ),
        tx.prepare_cached("SELECT id, term_start, term_unit FROM subscriptions WHERE id = ANY($1)"),
        tx.prepare_cached(
            "SELECT t.resource, t.dimension, t.plan, t.term_start, t.consumed FROM term_usage t
             JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(r, d, p)
               ON t.resource = k.r AND t.dimension = k.d AND t.plan = k.p",
        ),
    )?;
    // One round trip: the locks first, then the two reads (sent in this order on one connection).
    let lock_params: [&(dyn ToSql + Sync); 2] = [&lock_r, &lock_d];
    let terms_params: [&(dyn ToSql + Sync); 1] = [&subs];
    let usage_params: [&(dyn ToSql + Sync); 3] = [&ur, &ud, &up];
    let (locked, terms, usage) = tokio::try_join!(
        tx.query(&lock, &lock_params),
        tx.query(&terms, &terms_params),
        tx.query(&usage, &usage_params),
    )?;
    let mut remainder: HashMap<(String, String), i64> = locked
        .into_iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    let terms: HashMap<String, (Option<i64>, Option<String>)> = terms
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut consumed: HashMap<(String, String, String, i64), i64> = usage
        .into_iter()
        .map(|r| ((r.get(0), r.get(1), r.get(2), r.get(3)), r.get(4)))
        .collect();

    // The arithmetic, event after event (each sees the consumption and remainder the previous ones left).
    type Usage = (i64, i64, i64); // (term_end, fresh, overage)
    let mut usage_out: BTreeMap<(String, String, String, i64), Usage> = BTreeMap::new();
    let mut remainder_out: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut bills = Vec::with_capacity(events.len());
    let mut crossings_of = Vec::with_capacity(events.len());
    for (ev, plan) in events {
        let (resource, dimension) = (ev.resource.as_str(), ev.dimension.as_str());
        let rd = (resource.to_string(), dimension.to_string());
        let carried_in = remainder.get(&rd).copied().unwrap_or(0);
        let sub = terms.get(&resource.to_ascii_lowercase()).cloned();
        let (term_start, term_end) =
            crate::journal::billing::term_from(settings, sub, crate::clock::to_utc(ev.hour));
        let usage_key = (rd.0.clone(), rd.1.clone(), plan.to_string(), term_start);
        let before = consumed.get(&usage_key).copied().unwrap_or(0);
        let decl = settings.dimension(dimension);
        let included = settings.included(plan, dimension);
        let Computed {
            bill,
            fresh,
            overage,
            consumed_after,
            store_remainder,
            crossings,
        } = compute(BillInputs {
            raw: ev.quantity,
            prebilled: ev.prebilled,
            consumed_before: before,
            carried_in,
            included,
            unit: decl.and_then(|d| d.unit).unwrap_or(1),
            term: (term_start, term_end),
            thresholds: decl.map(|d| d.thresholds.as_slice()).unwrap_or(&[]),
        })
        .ok_or_else(|| PgError::Invalid("term consumption overflows".into()))?;
        consumed.insert(usage_key.clone(), consumed_after);
        let u = usage_out.entry(usage_key).or_insert((term_end, 0, 0));
        u.1 =
            u.1.checked_add(fresh)
                .ok_or_else(|| PgError::Invalid("term consumption overflows".into()))?;
        u.2 =
            u.2.checked_add(overage)
                .ok_or_else(|| PgError::Invalid("term overage overflows".into()))?;
        if store_remainder {
            remainder.insert(rd.clone(), bill.remainder);
            remainder_out.insert(rd, bill.remainder);
        }
        crossings_of.push((crossings, consumed_after, included));
        bills.push(bill);
    }

    // The writes: the term consumption added (one upsert) and the remainders stored (one update), pipelined.
    #[allow(clippy::type_complexity)]
    let mut cols: (
        Vec<&str>,
        Vec<&str>,
        Vec<&str>,
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
        Vec<i64>,
    ) = Default::default();
    for ((r, d, p, ts), (te, fresh, overage)) in &usage_out {
        cols.0.push(r);
        cols.1.push(d);
        cols.2.push(p);
        cols.3.push(*ts);
        cols.4.push(*te);
        cols.5.push(*fresh);
        cols.6.push(*overage);
    }
    let (rr, rd, rv): (Vec<&str>, Vec<&str>, Vec<i64>) = remainder_out.iter().fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |mut acc, ((r, d), v)| {
            acc.0.push(r);
            acc.1.push(d);
            acc.2.push(*v);
            acc
        },
    );
    let (add_usage, store) = tokio::try_join!(
        tx.prepare_cached(
            "INSERT INTO term_usage AS t (resource, dimension, plan, term_start, term_end, consumed, overage)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[], $5::int8[], $6::int8[], $7::int8[])
             ON CONFLICT (resource, dimension, plan, term_start) DO UPDATE SET
                 consumed = t.consumed + excluded.consumed, overage = t.overage + excluded.overage",
        ),
        tx.prepare_cached(
            "UPDATE remainders m SET remainder = k.v
             FROM unnest($1::text[], $2::text[], $3::int8[]) AS k(r, d, v)
             WHERE m.resource = k.r AND m.dimension = k.d",
        ),
    )?;
    let usage_params: [&(dyn ToSql + Sync); 7] = [
        &cols.0, &cols.1, &cols.2, &cols.3, &cols.4, &cols.5, &cols.6,
    ];
    if rr.is_empty() {
        tx.execute(&add_usage, &usage_params).await?;
    } else {
        let store_params: [&(dyn ToSql + Sync); 3] = [&rr, &rd, &rv];
        tokio::try_join!(
            tx.execute(&add_usage, &usage_params),
            tx.execute(&store, &store_params),
        )?;
    }

    // Thresholds: each fires once per term (the first event to cross it), in event order.
    for (i, (crossings, after, included)) in crossings_of.into_iter().enumerate() {
        let (ev, plan) = events[i];
        for Crossing { text, value } in crossings {
            if fire_threshold(tx, ev, plan, &bills[i], &text, value, after, included, now).await? {
                bills[i].crossed.push(text);
            }
        }
    }
    Ok(bills)
}

/// Records one threshold crossing of `ev` (once per term) and raises its alert; true when it fired now.
#[allow(clippy::too_many_arguments)]
async fn fire_threshold(
    tx: &Transaction<'_>,
    ev: &PendingEvent,
    plan: &str,
    bill: &Bill,
    text: &str,
    value: i64,
    after: i64,
    included: Included,
    now: DateTime<Utc>,
) -> Result<bool, PgError> {
    let (resource, dimension, hour) = (ev.resource.as_str(), ev.dimension.as_str(), ev.hour);
    let (term_start, term_end) = (bill.term_start, bill.term_end);
    let inserted = tx
        .execute(
            "INSERT INTO thresholds_fired (resource, dimension, term_start, threshold, fired_at)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&resource, &dimension, &term_start, &text, &now.timestamp()],
        )
        .await?;
    if inserted != 1 {
        return Ok(false);
    }
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
    raise_alert(
        tx,
        &AlertKey::threshold(resource, dimension, term_start, text),
        body,
        now,
    )
    .await?;
    tracing::warn!(
        message = "Consumption crossed a threshold.",
        %resource, %dimension, threshold = %text, consumed = %Micros(after), alert = "threshold"
    );
    metrics::counter!("meterd_thresholds_crossed_total", "dimension" => dimension.to_string())
        .increment(1);
    Ok(true)
}

/// A subscription's term as stored: start, end (unix seconds) and unit.
type StoredTerm = (Option<i64>, Option<i64>, Option<String>);

/// The term to store for a listed subscription (the rule of `journal/subscriptions.rs`: never reset mid-term).
async fn term_to_store(
    tx: &Transaction<'_>,
    id: &str,
    listed: &ListedSubscription,
    now: DateTime<Utc>,
) -> Result<StoredTerm, PgError> {
    let as_listed = (listed.term_start, listed.term_end, listed.term_unit.clone());
    let unit_known = listed
        .term_unit
        .as_deref()
        .is_some_and(|u| months_of(u).is_some());
    let starts_later = listed.term_start.is_some_and(|s| s > now.timestamp());
    if listed.term_start.is_some() && unit_known && !starts_later {
        return Ok(as_listed);
    }
    let known: Option<StoredTerm> = tx
        .query_opt(
            "SELECT term_start, term_end, term_unit FROM subscriptions WHERE id = $1",
            &[&id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2)));
    Ok(match known {
        Some(k @ (Some(start), _, Some(_))) if start <= now.timestamp() => k,
        _ => as_listed,
    })
}

/// Stores a full subscription list seen at `now` (one transaction; any replica may refresh it).
pub async fn store_subscriptions(
    tx: &Transaction<'_>,
    list: &[ListedSubscription],
    now: DateTime<Utc>,
) -> Result<(), PgError> {
    let now_s = now.timestamp();
    for s in list {
        let id = s.id.to_ascii_lowercase();
        let (term_start, term_end, term_unit) = term_to_store(tx, &id, s, now).await?;
        tx.execute(
            "INSERT INTO subscriptions (id, status, plan, offer, term_start, term_end, term_unit, unsubscribed_seen_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $2 = 'Unsubscribed' THEN $8::bigint END, $8)
             ON CONFLICT (id) DO UPDATE SET
                 status = excluded.status, plan = excluded.plan, offer = excluded.offer,
                 term_start = excluded.term_start, term_end = excluded.term_end, term_unit = excluded.term_unit,
                 unsubscribed_seen_at = CASE WHEN excluded.status = 'Unsubscribed'
                                             THEN COALESCE(subscriptions.unsubscribed_seen_at, excluded.updated_at)
                                             ELSE NULL END,
                 updated_at = GREATEST(subscriptions.updated_at, excluded.updated_at)",
            &[
                &id,
                &s.status,
                &s.plan.as_deref().unwrap_or(""),
                &s.offer,
                &term_start,
                &term_end,
                &term_unit,
                &now_s,
            ],
        )
        .await?;
    }
    tx.execute(
        "UPDATE subscriptions SET status = 'Unknown' WHERE updated_at < $1 AND status != 'Unsubscribed'",
        &[&now_s],
    )
    .await?;
    Ok(())
}

/// Every subscription the fleet knows, by id.
pub async fn known_subscriptions(
    c: &(impl GenericClient + Sync),
) -> Result<BTreeMap<String, KnownSubscription>, PgError> {
    let rows = c
        .query(
            "SELECT id, status, plan, unsubscribed_seen_at, term_start, term_end FROM subscriptions",
            &[],
        )
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let s = KnownSubscription {
                id: r.get(0),
                status: r.get(1),
                plan: Some(r.get::<_, String>(2)).filter(|p| !p.is_empty()),
                unsubscribed_seen_at: r.get(3),
                term_start: r.get(4),
                term_end: r.get(5),
            };
            (s.id.clone(), s)
        })
        .collect())
}

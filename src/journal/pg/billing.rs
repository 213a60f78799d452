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
use std::collections::BTreeMap;
use tokio_postgres::{GenericClient, Transaction};

/// Records an alert once per dedupe key (in the caller's transaction). True when it is new.
pub async fn raise_alert(
    tx: &Transaction<'_>,
    key: &AlertKey,
    mut body: serde_json::Value,
    now: DateTime<Utc>,
) -> Result<bool, PgError> {
    let (kind, dedupe) = (key.kind.as_str(), key.dedupe.as_str());
    body["kind"] = kind.into();
    body["raised_at"] = fmt_time(now.timestamp()).into();
    let n = tx
        .execute(
            "INSERT INTO alerts (kind, dedupe, body, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $4)
             ON CONFLICT (dedupe) DO NOTHING",
            &[&kind, &dedupe, &body.to_string(), &now.timestamp()],
        )
        .await?;
    if n == 1 {
        metrics::counter!("meterd_alerts_total", "kind" => kind.to_string()).increment(1);
    }
    Ok(n == 1)
}

/// An outbound event as JSON, for alerts.
pub async fn event_summary(
    c: &(impl GenericClient + Sync),
    id: i64,
) -> Result<serde_json::Value, PgError> {
    let r = c
        .query_one(
            "SELECT resource, plan, dimension, hour, quantity, send_quantity, state FROM outbound_events WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(serde_json::json!({
        "resource": r.get::<_, String>(0),
        "plan": r.get::<_, String>(1),
        "dimension": r.get::<_, String>(2),
        "hour": fmt_time(r.get(3)),
        "quantity": Micros(r.get::<_, Option<i64>>(5).unwrap_or(r.get(4))).to_decimal_string(),
        "outcome": r.get::<_, String>(6),
    }))
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

/// Bills an event (once, in the transaction that writes its body): like `journal::billing::bill`, with the
/// (resource, dimension) `remainders` row locked first so that concurrent replicas bill one allowance in turn.
pub async fn bill(
    tx: &Transaction<'_>,
    settings: &Settings,
    ev: &PendingEvent,
    plan: &str,
    now: DateTime<Utc>,
) -> Result<Bill, PgError> {
    let (resource, dimension, hour) = (ev.resource.as_str(), ev.dimension.as_str(), ev.hour);
    // The per-(resource, dimension) billing lock: the row (0 is "no remainder"), created if missing, locked to
    // commit by the no-op update, and its value, in one round trip.
    let carried_in: i64 = tx
        .query_one(
            "INSERT INTO remainders (resource, dimension, remainder) VALUES ($1, $2, 0)
             ON CONFLICT (resource, dimension) DO UPDATE SET remainder = remainders.remainder
             RETURNING remainder",
            &[&resource, &dimension],
        )
        .await?
        .get(0);
    let (term_start, term_end) = term_for(tx, settings, resource, hour).await?;
    let included = settings.included(plan, dimension);
    let before: i64 = tx
        .query_opt(
            "SELECT consumed FROM term_usage WHERE resource = $1 AND dimension = $2 AND plan = $3 AND term_start = $4",
            &[&resource, &dimension, &plan, &term_start],
        )
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    let decl = settings.dimension(dimension);
    let computed = compute(BillInputs {
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
    let Computed {
        mut bill,
        fresh,
        overage,
        consumed_after: after,
        store_remainder,
        crossings,
    } = computed;
    tx.execute(
        "INSERT INTO term_usage (resource, dimension, plan, term_start, term_end, consumed, overage)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (resource, dimension, plan, term_start) DO UPDATE SET
             consumed = term_usage.consumed + excluded.consumed, overage = term_usage.overage + excluded.overage",
        &[&resource, &dimension, &plan, &term_start, &term_end, &fresh, &overage],
    )
    .await?;
    if store_remainder {
        tx.execute(
            "UPDATE remainders SET remainder = $3 WHERE resource = $1 AND dimension = $2",
            &[&resource, &dimension, &bill.remainder],
        )
        .await?;
    }
    for Crossing { text, value } in crossings {
        let inserted = tx
            .execute(
                "INSERT INTO thresholds_fired (resource, dimension, term_start, threshold, fired_at)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&resource, &dimension, &term_start, &text, &now.timestamp()],
            )
            .await?;
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
            raise_alert(
                tx,
                &AlertKey::threshold(resource, dimension, term_start, &text),
                body,
                now,
            )
            .await?;
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

//! The dashboard's reads on the fleet's shared journal (`GET /v1/dashboard/...` in fleet mode): the same cards,
//! chart series and at-risk lists as `journal/dashboard.rs`, from PostgreSQL, so every replica's dashboard shows
//! the fleet's figures (a replica's local journal holds only its own share, never sent). The rules that are not
//! SQL (threshold state, outcome groups, bucket assembly, reconcile hints) are the SQLite side's, shared.

use super::PgError;
use super::reads::balance;
use crate::clock::fmt_time;
use crate::config::Settings;
use crate::journal::dashboard::{
    AtRisk, AtRiskEvent, Bucket, Card, CardDimension, CardPage, HeldSubscription, MAX_PAGE,
    ReconcileItem, Series, UndeliveredAlert, alert_resource, card_page, reconcile_hint,
    series_from, term_start_of, threshold_from,
};
use crate::quantity::Micros;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use tokio_postgres::GenericClient;

/// One page of subscription cards (as `journal::dashboard::cards`).
pub async fn cards(
    c: &(impl GenericClient + Sync),
    settings: &Settings,
    after: Option<&str>,
    limit: i64,
    now: DateTime<Utc>,
) -> Result<CardPage, PgError> {
    let limit = limit.clamp(1, MAX_PAGE);
    let after = after.map(|a| a.to_ascii_lowercase()).unwrap_or_default();
    let total: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM (SELECT folded FROM resource_spellings UNION SELECT id FROM subscriptions) k",
            &[],
        )
        .await?
        .get(0);
    let rows = c
        .query(
            "SELECT k.id, s.spelling, sub.status FROM
                (SELECT folded AS id FROM resource_spellings WHERE folded > $1
                 UNION SELECT id FROM subscriptions WHERE id > $1 ORDER BY 1 LIMIT $2) k
             LEFT JOIN resource_spellings s ON s.folded = k.id
             LEFT JOIN subscriptions sub ON sub.id = k.id
             ORDER BY k.id",
            &[&after, &(limit + 1)],
        )
        .await?;
    let rows: Vec<(String, Option<String>, Option<String>)> = rows
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let more = rows.len() as i64 > limit;
    let rows: Vec<_> = rows.into_iter().take(limit as usize).collect();
    let mut counts: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        for r in c
            .query(
                "SELECT lower(resource), COUNT(*), COUNT(held) FROM outbound_events
                 WHERE state = 'pending' AND lower(resource) >= $1 AND lower(resource) <= $2
                 GROUP BY lower(resource)",
                &[&first.0, &last.0],
            )
            .await?
        {
            counts.insert(r.get(0), (r.get(1), r.get(2)));
        }
    }
    let mut out = Vec::new();
    for (folded, spelling, status) in rows {
        let resource = spelling.unwrap_or_else(|| folded.clone());
        let (pending, held) = counts.get(&folded).copied().unwrap_or((0, 0));
        let mut dims = Vec::new();
        for b in balance(c, settings, &resource, now).await? {
            let crossed: Vec<String> = c
                .query(
                    "SELECT threshold FROM thresholds_fired WHERE resource = $1 AND dimension = $2 AND term_start = $3
                     ORDER BY fired_at, threshold",
                    &[&resource, &b.dimension, &term_start_of(&b)],
                )
                .await?
                .into_iter()
                .map(|r| r.get(0))
                .collect();
            let threshold = threshold_from(settings, &b, crossed);
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

/// Usage of `resource` per bucket and outcome group (as `journal::dashboard::usage`).
pub async fn usage(
    c: &(impl GenericClient + Sync),
    resource: &str,
    dimension: Option<&str>,
    bucket: Bucket,
    from: i64,
    to: i64,
) -> Result<Vec<Series>, PgError> {
    let journaled: Option<String> = c
        .query_opt(
            "SELECT spelling FROM resource_spellings WHERE folded = $1",
            &[&resource.to_ascii_lowercase()],
        )
        .await?
        .map(|r| r.get(0));
    let resource = journaled.as_deref().unwrap_or(resource);
    let bucket_expr = match bucket {
        Bucket::Hour => "h.hour",
        Bucket::Day => "(h.hour / 86400) * 86400",
        Bucket::Month => {
            "EXTRACT(EPOCH FROM date_trunc('month', to_timestamp(h.hour) AT TIME ZONE 'UTC'))::bigint"
        }
    };
    let sql = format!(
        "SELECT h.dimension, {bucket_expr} AS b,
                CASE WHEN o.id IS NULL THEN 'pending'
                     WHEN o.state = 'expired' AND o.carried_to IS NOT NULL THEN 'carried'
                     ELSE o.state END AS s,
                SUM(h.quantity)::bigint
         FROM hourly_totals h LEFT JOIN outbound_events o ON o.id = h.outbound_id
         WHERE h.resource = $1 AND ($2::text IS NULL OR h.dimension = $2::text) AND h.hour >= $3 AND h.hour < $4
         GROUP BY h.dimension, b, s"
    );
    let rows = c
        .query(&sql, &[&resource, &dimension, &from, &to])
        .await?
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    series_from(rows, dimension, bucket, from, to).map_err(|e| PgError::Invalid(e.to_string()))
}

/// What is at risk at `now` (as `journal::dashboard::at_risk`), fleet-wide.
pub async fn at_risk(
    c: &(impl GenericClient + Sync),
    now: DateTime<Utc>,
    limit: i64,
) -> Result<AtRisk, PgError> {
    let now_s = now.timestamp();
    let limit = limit.clamp(1, MAX_PAGE);
    let pending = c
        .query(
            "SELECT resource, dimension, hour, COALESCE(send_quantity, quantity), deadline, attempts, held, last_error
             FROM outbound_events WHERE state = 'pending' ORDER BY deadline, hour, resource, dimension LIMIT $1",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(|r| {
            let deadline: i64 = r.get(4);
            AtRiskEvent {
                resource: r.get(0),
                dimension: r.get(1),
                hour: fmt_time(r.get(2)),
                quantity: Micros(r.get(3)).to_decimal_string(),
                deadline: fmt_time(deadline),
                seconds_left: deadline - now_s,
                attempts: r.get(5),
                held: r.get(6),
                last_error: r.get(7),
            }
        })
        .collect();
    let pending_total: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM outbound_events WHERE state = 'pending'",
            &[],
        )
        .await?
        .get(0);
    let held_subscriptions = c
        .query(
            "SELECT resource, COUNT(*), MIN(held), MIN(deadline) AS d FROM outbound_events
             WHERE state = 'pending' AND held IS NOT NULL GROUP BY resource ORDER BY d, resource LIMIT $1",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(|r| HeldSubscription {
            resource: r.get(0),
            events: r.get(1),
            reason: r.get(2),
            nearest_deadline: fmt_time(r.get(3)),
        })
        .collect();
    let reconcile = c
        .query(
            "SELECT resource, dimension, hour, state, COALESCE(send_quantity, quantity), market_quantity
             FROM outbound_events WHERE state IN ('expired_unconfirmed', 'duplicate_mismatch')
             ORDER BY hour DESC, resource, dimension LIMIT $1",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(|r| {
            let hour: i64 = r.get(2);
            let state: String = r.get(3);
            ReconcileItem {
                resource: r.get(0),
                dimension: r.get(1),
                hour: fmt_time(hour),
                hint: reconcile_hint(&state, hour),
                state,
                quantity: Micros(r.get(4)).to_decimal_string(),
                market_quantity: r
                    .get::<_, Option<i64>>(5)
                    .map(|q| Micros(q).to_decimal_string()),
            }
        })
        .collect();
    let undelivered_alerts = c
        .query(
            "SELECT id, kind, body, created_at, attempts, next_attempt_at, last_error FROM alerts
             WHERE delivered_at IS NULL ORDER BY id LIMIT $1",
            &[&limit],
        )
        .await?
        .into_iter()
        .map(|r| UndeliveredAlert {
            id: r.get(0),
            kind: r.get(1),
            resource: alert_resource(r.get(2)),
            raised_at: fmt_time(r.get(3)),
            attempts: r.get(4),
            next_attempt_at: fmt_time(r.get(5)),
            last_error: r.get(6),
        })
        .collect();
    let undelivered_total: i64 = c
        .query_one(
            "SELECT COUNT(*) FROM alerts WHERE delivered_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    Ok(AtRisk {
        pending,
        pending_total,
        held_subscriptions,
        reconcile,
        undelivered_alerts,
        undelivered_total,
    })
}

//! The dashboard's JSON routes (`GET /v1/dashboard/...`): paged cards, usage per bucket and outcome group, and
//! what is at risk. Behind the bearer token like every data route; the page itself is [`crate::ui`].

use super::usage_api::{parse_bound, query_rejection};
use super::validate::FieldError;
use super::{SharedState, error_response, journal_error_response};
use crate::journal::dashboard::{Bucket, GROUPS, MAX_PAGE, end_of_current_hour};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Query of `GET /v1/dashboard/subscriptions`.
#[derive(Debug, serde::Deserialize)]
pub struct CardsQuery {
    after: Option<String>,
    limit: Option<i64>,
}

fn bad(m: impl Into<String>) -> Response {
    error_response(StatusCode::BAD_REQUEST, vec![FieldError::request(m)])
}

/// `GET /v1/dashboard/subscriptions?after=&limit=`: one page of subscription cards.
pub async fn subscriptions(
    State(state): State<SharedState>,
    q: Result<Query<CardsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_rejection(&e),
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return bad(format!(
            "`limit` must be between 1 and {MAX_PAGE}; got {limit}"
        ));
    }
    let now = state.clock.now();
    let after = q.after.filter(|a| !a.is_empty());
    match state
        .reads
        .dashboard_cards(state.settings.clone(), after, limit, now)
        .await
    {
        Ok(page) => {
            let mut v = serde_json::to_value(page).unwrap_or_default();
            v["at"] = crate::clock::fmt_time(now.timestamp()).into();
            axum::Json(v).into_response()
        }
        Err(e) => journal_error_response(&e),
    }
}

/// Query of `GET /v1/dashboard/usage`.
#[derive(Debug, serde::Deserialize)]
pub struct UsageQuery {
    resource: Option<String>,
    dimension: Option<String>,
    bucket: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// Most buckets of one answer: hourly up to 31 days, daily up to 2 years and a day, monthly up to 5 years.
fn max_buckets(bucket: Bucket) -> usize {
    match bucket {
        Bucket::Hour => 31 * 24,
        Bucket::Day => 732,
        Bucket::Month => 60,
    }
}

/// `GET /v1/dashboard/usage?resource=&dimension=&bucket=hour|day|month&from=&to=`: usage per UTC bucket and
/// outcome group, every bucket of the range present.
pub async fn usage(
    State(state): State<SharedState>,
    q: Result<Query<UsageQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_rejection(&e),
    };
    let Some(resource) = q
        .resource
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty())
    else {
        return bad("`resource` is required (a subscription id or a managed application URI)");
    };
    let resource = super::validate::resource(resource).unwrap_or_else(|_| resource.to_string());
    let b = q.bucket.as_deref().unwrap_or("hour");
    let Some(bucket) = Bucket::parse(b) else {
        return bad(format!("`bucket` must be hour, day or month; got `{b}`"));
    };
    let now = state.clock.now();
    let (from, to) = match (
        parse_bound("from", q.from.as_deref()),
        parse_bound("to", q.to.as_deref()),
    ) {
        (Ok(f), Ok(t)) => (f, t),
        (Err(m), _) | (_, Err(m)) => return bad(m),
    };
    let to = to
        .map(|t| t.timestamp())
        .unwrap_or_else(|| end_of_current_hour(now));
    let from = from.map(|t| t.timestamp()).unwrap_or(match bucket {
        Bucket::Hour => to - 48 * 3600,
        Bucket::Day => to - 30 * 86_400,
        Bucket::Month => to - 730 * 86_400,
    });
    if from >= to {
        return bad("`from` must be before `to`");
    }
    // A bound on the bucket count from the length alone first (a month is at least 28 days), so a range of
    // centuries is refused before any bucket is built.
    let shortest = match bucket {
        Bucket::Hour => 3600,
        Bucket::Day => 86_400,
        Bucket::Month => 28 * 86_400,
    };
    let rough = (to - from) / shortest;
    let buckets = if rough > max_buckets(bucket) as i64 + 2 {
        rough as usize
    } else {
        bucket.starts(from, to).len()
    };
    if buckets > max_buckets(bucket) {
        return bad(format!(
            "{buckets} buckets is too many for bucket={}: at most {}; choose a shorter range or a larger bucket (hour, day, month)",
            serde_json::to_value(bucket)
                .unwrap_or_default()
                .as_str()
                .unwrap_or(""),
            max_buckets(bucket)
        ));
    }
    let dimension = q.dimension.filter(|d| !d.is_empty());
    match state
        .reads
        .dashboard_usage(resource.clone(), dimension, bucket, from, to)
        .await
    {
        Ok(series) => axum::Json(json!({
            "resource": resource,
            "bucket": bucket,
            "timezone": "UTC",
            "from": crate::clock::fmt_time(from),
            "to": crate::clock::fmt_time(to),
            "groups": GROUPS,
            "series": series,
        }))
        .into_response(),
        Err(e) => journal_error_response(&e),
    }
}

/// Query of `GET /v1/dashboard/at-risk`.
#[derive(Debug, serde::Deserialize)]
pub struct AtRiskQuery {
    limit: Option<i64>,
}

/// Replaces every word holding `://` (a URL: a webhook URL may carry a secret) with `<url>`.
fn without_urls(s: &str) -> String {
    s.split(' ')
        .map(|w| if w.contains("://") { "<url>" } else { w })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `GET /v1/dashboard/at-risk?limit=`: pending events by expiry, held subscriptions, events to reconcile,
/// undelivered alerts.
pub async fn at_risk(
    State(state): State<SharedState>,
    q: Result<Query<AtRiskQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return query_rejection(&e),
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=MAX_PAGE).contains(&limit) {
        return bad(format!(
            "`limit` must be between 1 and {MAX_PAGE}; got {limit}"
        ));
    }
    let now = state.clock.now();
    match state.reads.dashboard_at_risk(now, limit).await {
        Ok(mut r) => {
            for a in &mut r.undelivered_alerts {
                a.last_error = a.last_error.as_deref().map(without_urls);
            }
            for e in &mut r.pending {
                e.last_error = e.last_error.as_deref().map(without_urls);
            }
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["at"] = crate::clock::fmt_time(now.timestamp()).into();
            axum::Json(v).into_response()
        }
        Err(e) => journal_error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_removed_from_errors() {
        assert_eq!(
            without_urls(
                "webhook call failed: error sending request for url (https://hooks.example/T0/s3cret)"
            ),
            "webhook call failed: error sending request for url <url>"
        );
    }
}

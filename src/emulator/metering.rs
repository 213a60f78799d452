//! The Metering API routes: `POST /api/batchUsageEvent`, `POST /api/usageEvent`, `GET /api/usageEvents`.
//!
//! Whole-call errors (400): missing or unsupported `api-version`, malformed JSON, a batch without the `request`
//! wrapper or with 0 or more than 25 events. Otherwise a batch always answers 200 with one result per event, even
//! when every event failed; the single call maps the event's status to 200 / 409 (duplicate) / 403 (forbidden
//! resource) / 500 (injected `Error`) / 400 (everything else, BadArgument shape). The rules themselves are in
//! [`super::usage`].

use super::Emulator;
use super::call::{Call, bad_argument, guarded, precheck};
use super::config::ResultOrder;
use super::faults::Route;
use super::model::ReceivedEvent;
use super::state::State as World;
use super::usage::{
    Status, Verdict, accepted_json, bad_request_json, batch_item, conflict_json, judge,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tracing::info;

/// (day, resource, dimension, plan): one row of `GET /usageEvents`.
type DayKey = (NaiveDate, String, String, String);
/// (offer, offer type, Azure subscription, quantity, count).
type DayTotal = (String, String, String, f64, u64);

/// Most events one batch may carry.
pub(super) const MAX_BATCH: usize = 25;

fn record(
    world: &mut World,
    route: Route,
    call: &Call,
    event: &Value,
    verdict: &Verdict,
    now: DateTime<Utc>,
) {
    world.received.push(ReceivedEvent {
        route: route.name().into(),
        request_id: call.ids.request_id.clone(),
        received_at: now,
        event: event.clone(),
        status: verdict.status().as_str().into(),
        usage_event_id: match verdict {
            Verdict::Accepted(a) => Some(a.usage_event_id.clone()),
            _ => None,
        },
    });
}

fn parse_json(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_argument(
            "usageEventRequest",
            &format!("The request body is not valid JSON: {e}."),
        ))
    })
}

/// `POST /api/batchUsageEvent`.
pub(super) async fn batch(State(emulator): State<Emulator>, call: Call, body: Bytes) -> Response {
    guarded(&emulator, Route::BatchUsageEvent, &call, || async {
        if let Some(r) = precheck(&emulator, &call) {
            return r;
        }
        let value = match parse_json(&body) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let Some(events) = value.get("request").and_then(Value::as_array) else {
            return bad_argument("request", "The request field is required and must be an array of usage events.");
        };
        {
            let world = emulator.lock();
            if let Some(d) = events.iter().find_map(|e| {
                e.get("dimension")
                    .and_then(Value::as_str)
                    .filter(|d| world.faults.poison_dimensions.contains(*d))
            }) {
                return bad_argument("request.dimension", &format!("One or more errors have occurred: the event for dimension {d} is malformed."));
            }
        }
        if events.is_empty() || events.len() > MAX_BATCH {
            return bad_argument(
                "request",
                &format!("The batch must contain between 1 and {MAX_BATCH} usage events; it contains {}.", events.len()),
            );
        }
        let now = emulator.now();
        let (mut results, order, accepted) = {
            let mut world = emulator.lock();
            let mut accepted = 0;
            let results: Vec<Value> = events
                .iter()
                .map(|event| {
                    let verdict = judge(&mut world, event, now);
                    accepted += usize::from(verdict.status() == Status::Accepted);
                    record(&mut world, Route::BatchUsageEvent, &call, event, &verdict, now);
                    batch_item(event, &verdict, now)
                })
                .collect();
            (results, world.current.result_order, accepted)
        };
        match order {
            ResultOrder::AsSent => {}
            ResultOrder::Reversed => results.reverse(),
            ResultOrder::Shuffled => results.shuffle(&mut rand::rng()),
        }
        info!(message = "Usage batch.", request_id = %call.ids.request_id, events = events.len(), accepted);
        axum::Json(json!({"count": results.len(), "result": results})).into_response()
    })
    .await
}

/// `POST /api/usageEvent`.
pub(super) async fn single(State(emulator): State<Emulator>, call: Call, body: Bytes) -> Response {
    guarded(&emulator, Route::UsageEvent, &call, || async {
        if let Some(r) = precheck(&emulator, &call) {
            return r;
        }
        let event = match parse_json(&body) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        let now = emulator.now();
        let verdict = {
            let mut world = emulator.lock();
            let verdict = judge(&mut world, &event, now);
            record(&mut world, Route::UsageEvent, &call, &event, &verdict, now);
            verdict
        };
        info!(message = "Usage event.", request_id = %call.ids.request_id, status = verdict.status().as_str());
        let (status, body) = match &verdict {
            Verdict::Accepted(accepted) => (StatusCode::OK, accepted_json(accepted, Status::Accepted)),
            Verdict::Duplicate(original) => (StatusCode::CONFLICT, conflict_json(original)),
            Verdict::Rejected { status: Status::ResourceNotAuthorized, .. } => (
                StatusCode::FORBIDDEN,
                json!({"message": "Client is not authorized for this usage resource.", "code": "Forbidden"}),
            ),
            Verdict::Rejected { status: Status::Error, message, .. } => (
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"code": "InternalServerError", "message": message}),
            ),
            Verdict::Rejected { target, message, .. } => (StatusCode::BAD_REQUEST, bad_request_json(target, message)),
        };
        (status, axum::Json(body)).into_response()
    })
    .await
}

/// Parses the dates `GET /usageEvents` takes: `2020-12-03`, `2020-12-03T15:00`, `2020-12-03T15:00:00` or RFC 3339.
fn parse_day(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc).date_naive())
        .ok()
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S")
                .ok()
                .map(|t| t.date())
        })
        .or_else(|| {
            NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M")
                .ok()
                .map(|t| t.date())
        })
        .or_else(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
}

/// `GET /api/usageEvents?usageStartDate=..&UsageEndDate=..`: daily totals of accepted events per resource,
/// dimension and plan, for the UTC days from the start date to the end date inclusive (default: today).
/// Optional filters: `offerId`, `planId`, `dimension`, `azureSubscriptionId`, `reconStatus`.
pub(super) async fn usage_events(State(emulator): State<Emulator>, call: Call) -> Response {
    guarded(&emulator, Route::UsageEvents, &call, || async {
        if let Some(r) = precheck(&emulator, &call) {
            return r;
        }
        let param = |a: &str, b: &str| call.param(a).or_else(|| call.param(b)).map(str::to_owned);
        let Some(start) = param("usageStartDate", "UsageStartDate") else {
            return bad_argument(
                "usageStartDate",
                "The usageStartDate query parameter is required.",
            );
        };
        let Some(start) = parse_day(&start) else {
            return bad_argument(
                "usageStartDate",
                "The usageStartDate must be a date in ISO 8601 format.",
            );
        };
        let end = match param("UsageEndDate", "usageEndDate") {
            None => emulator.now().date_naive(),
            Some(end) => match parse_day(&end) {
                Some(end) => end,
                None => {
                    return bad_argument(
                        "UsageEndDate",
                        "The UsageEndDate must be a date in ISO 8601 format.",
                    );
                }
            },
        };
        let filters: Vec<(&str, Option<String>)> = [
            "offerId",
            "planId",
            "dimension",
            "azureSubscriptionId",
            "reconStatus",
        ]
        .into_iter()
        .map(|name| (name, call.param(name).map(str::to_owned)))
        .collect();
        let world = emulator.lock();
        // (day, resource, dimension, plan) -> (offer, offer type, Azure subscription, quantity, count)
        let mut totals: BTreeMap<DayKey, DayTotal> = BTreeMap::new();
        for event in &world.accepted {
            let day = event.effective_start.date_naive();
            if day < start || day > end {
                continue;
            }
            let keep = filters.iter().all(|(name, wanted)| {
                let Some(wanted) = wanted else { return true };
                let actual = match *name {
                    "offerId" => event.offer_id.as_str(),
                    "planId" => event.plan_id.as_str(),
                    "dimension" => event.dimension.as_str(),
                    "azureSubscriptionId" => event.azure_subscription_id.as_str(),
                    _ => "Submitted",
                };
                actual.eq_ignore_ascii_case(wanted)
            });
            if !keep {
                continue;
            }
            let resource = event
                .resource_id
                .clone()
                .or_else(|| event.resource_uri.clone())
                .unwrap_or_default();
            let entry = totals
                .entry((
                    day,
                    resource,
                    event.dimension.clone(),
                    event.plan_id.clone(),
                ))
                .or_insert_with(|| {
                    (
                        event.offer_id.clone(),
                        event.offer_type.clone(),
                        event.azure_subscription_id.clone(),
                        0.0,
                        0,
                    )
                });
            entry.3 += event.quantity;
            entry.4 += 1;
        }
        let rows: Vec<Value> = totals
            .into_iter()
            .map(
                |(
                    (day, resource, dimension, plan),
                    (offer, offer_type, azure_subscription, quantity, count),
                )| {
                    json!({
                        "usageDate": format!("{day}T00:00:00Z"),
                        "usageResourceId": resource,
                        "dimension": dimension,
                        "planId": plan,
                        "planName": "",
                        "offerId": offer,
                        "offerName": "",
                        "offerType": offer_type,
                        "azureSubscriptionId": azure_subscription,
                        "reconStatus": "Submitted",
                        "submittedQuantity": quantity,
                        "processedQuantity": 0.0,
                        "submittedCount": count,
                    })
                },
            )
            .collect();
        axum::Json(Value::Array(rows)).into_response()
    })
    .await
}

//! The admin API under `/emulator/` (JSON, no auth): what a test or a developer changes in the marketplace.
//!
//! | route | body | effect |
//! |---|---|---|
//! | `GET /emulator/clock` | | `{"now", "offsetSeconds"}` |
//! | `POST /emulator/clock` | `{"shift":"2h"}` or `{"set":"RFC 3339"}` | moves the emulator clock |
//! | `GET/POST /emulator/subscriptions` | a subscription or an array (SaaS field names) | list / add or replace |
//! | `DELETE /emulator/subscriptions/{id}` | | removes one |
//! | `POST /emulator/subscriptions/{id}/{action}` | `subscribe`, `suspend`, `unsubscribe`, `pending`, or `status` with `{"status":"Suspended"}` | changes its status |
//! | `GET/POST /emulator/plans` | `{"id":"gold","dimensions":["api_calls"]}` (no `dimensions`: any) | list / add or replace |
//! | `GET/POST /emulator/managed-apps` | `{"resourceUri":"..","resourceUsageId":".."}` | list / add or replace |
//! | `GET /emulator/events` | | every usage event received, with its status |
//! | `GET /emulator/events/accepted` | | accepted events only |
//! | `GET /emulator/stats` | | calls per route, events received and accepted |
//! | `POST /emulator/tokens` | | issues a bearer token |
//! | `POST /emulator/reset` | | back to the initial configuration |
//! | `GET/POST/DELETE /emulator/faults` | a [`Fault`] or an array | list / script / clear all faults |
//! | `PUT /emulator/faults/latency` | `{"ms":200}` | latency on every marketplace call |
//! | `POST/DELETE /emulator/faults/forbidden` | `{"resource":"<id or uri>"}` | 403 / `ResourceNotAuthorized` for it / clear |
//! | `POST /emulator/faults/event-errors` | `{"count":2}` | the next events get `Error` |
//! | `POST /emulator/faults/cancellations` | `{"subscription":"<id>","at":"<RFC 3339>"}` | really cancelled at `at`: listed `Unsubscribed` from then, later hours `ResourceNotFound` |
//! | `POST /emulator/faults/poison` | `{"dimension":"<id>"}` | a batch holding an event of it fails as a whole with 400 |

use super::Emulator;
use super::config::parse_duration;
use super::faults::{Fault, Route};
use super::model::{ManagedApp, Plan, Subscription, SubscriptionStatus};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tracing::info;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum AdminError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match self {
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        (status, axum::Json(json!({"error": self.to_string()}))).into_response()
    }
}

type AdminResult = Result<axum::Json<Value>, AdminError>;

/// The `/emulator` routes.
pub(super) fn router() -> Router<Emulator> {
    Router::new()
        .route("/clock", get(clock).post(set_clock))
        .route(
            "/subscriptions",
            get(subscriptions).post(upsert_subscriptions),
        )
        .route(
            "/subscriptions/{id}",
            axum::routing::delete(delete_subscription).get(subscription),
        )
        .route("/subscriptions/{id}/{action}", post(subscription_action))
        .route("/plans", get(plans).post(upsert_plan))
        .route("/managed-apps", get(managed_apps).post(upsert_managed_app))
        .route("/events", get(events))
        .route("/events/accepted", get(accepted))
        .route("/stats", get(stats))
        .route("/tokens", post(token))
        .route("/reset", post(reset))
        .route("/faults", get(faults).post(add_faults).delete(clear_faults))
        .route("/faults/latency", put(latency))
        .route("/faults/forbidden", post(forbid).delete(clear_forbidden))
        .route("/faults/event-errors", post(event_errors))
        .route("/faults/cancellations", post(cancellation))
        .route("/faults/poison", post(poison))
}

/// Parses a JSON body (an empty body reads as `null`).
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, AdminError> {
    let value: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(bytes)
            .map_err(|e| AdminError::BadRequest(format!("invalid JSON: {e}")))?
    };
    serde_json::from_value(value).map_err(|e| AdminError::BadRequest(format!("invalid body: {e}")))
}

/// One item or an array of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::Many(v) => v,
            OneOrMany::One(t) => vec![t],
        }
    }
}

fn to_json<T: serde::Serialize>(value: T) -> axum::Json<Value> {
    axum::Json(serde_json::to_value(value).unwrap_or(Value::Null))
}

/// What every fault-scripting call answers: the faults now in force.
fn faults_json(emulator: &Emulator) -> axum::Json<Value> {
    to_json(emulator.lock().faults.clone())
}

fn clock_json(emulator: &Emulator) -> axum::Json<Value> {
    let offset = emulator.emulator_clock().offset();
    axum::Json(
        json!({"now": emulator.now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "offsetSeconds": offset.num_seconds()}),
    )
}

async fn clock(State(emulator): State<Emulator>) -> axum::Json<Value> {
    clock_json(&emulator)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClockChange {
    shift: Option<String>,
    set: Option<String>,
}

async fn set_clock(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let change: ClockChange = body(&bytes)?;
    match (change.shift, change.set) {
        (Some(shift), None) => {
            let by = parse_duration(&shift).map_err(|e| AdminError::BadRequest(e.to_string()))?;
            emulator.shift_clock(by);
        }
        (None, Some(set)) => {
            let at = DateTime::parse_from_rfc3339(&set)
                .map_err(|e| AdminError::BadRequest(format!("set must be RFC 3339: {e}")))?;
            emulator.set_clock(at.with_timezone(&Utc));
        }
        _ => {
            return Err(AdminError::BadRequest(
                "give exactly one of shift or set".into(),
            ));
        }
    }
    info!(message = "Emulator clock changed.", now = %emulator.now());
    Ok(clock_json(&emulator))
}

async fn subscriptions(State(emulator): State<Emulator>) -> axum::Json<Value> {
    to_json(emulator.subscriptions())
}

async fn subscription(State(emulator): State<Emulator>, Path(id): Path<String>) -> AdminResult {
    emulator
        .lock()
        .subscription(&id)
        .map(to_json)
        .ok_or_else(|| AdminError::NotFound(format!("no subscription {id}")))
}

async fn upsert_subscriptions(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let items: OneOrMany<Subscription> = body(&bytes)?;
    let items = items.into_vec();
    for s in &items {
        emulator.add_subscription(s.clone());
    }
    info!(message = "Subscriptions upserted.", count = items.len());
    Ok(to_json(items))
}

async fn delete_subscription(
    State(emulator): State<Emulator>,
    Path(id): Path<String>,
) -> AdminResult {
    let mut world = emulator.lock();
    let before = world.current.subscriptions.len();
    world
        .current
        .subscriptions
        .retain(|s| !s.id.eq_ignore_ascii_case(&id));
    if world.current.subscriptions.len() == before {
        return Err(AdminError::NotFound(format!("no subscription {id}")));
    }
    Ok(axum::Json(json!({"deleted": id})))
}

#[derive(Deserialize, Default)]
struct StatusBody {
    status: Option<String>,
}

async fn subscription_action(
    State(emulator): State<Emulator>,
    Path((id, action)): Path<(String, String)>,
    bytes: Bytes,
) -> AdminResult {
    let name = if action == "status" {
        let b: Option<StatusBody> = body(&bytes)?;
        b.unwrap_or_default()
            .status
            .ok_or_else(|| AdminError::BadRequest("body must be {\"status\": \"...\"}".into()))?
    } else {
        action
    };
    let status = SubscriptionStatus::parse(&name).ok_or_else(|| {
        AdminError::BadRequest(format!(
            "unknown status or action {name:?}: use subscribe, suspend, unsubscribe, pending or a status name"
        ))
    })?;
    if !emulator.set_status(&id, status) {
        return Err(AdminError::NotFound(format!("no subscription {id}")));
    }
    info!(message = "Subscription status changed.", subscription = %id, status = ?status);
    subscription(State(emulator), Path(id)).await
}

async fn plans(State(emulator): State<Emulator>) -> axum::Json<Value> {
    to_json(emulator.lock().current.plans.clone())
}

async fn upsert_plan(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let items: OneOrMany<Plan> = body(&bytes)?;
    let items = items.into_vec();
    for p in &items {
        emulator.add_plan(p.clone());
    }
    Ok(to_json(items))
}

async fn managed_apps(State(emulator): State<Emulator>) -> axum::Json<Value> {
    to_json(emulator.lock().current.managed_apps.clone())
}

async fn upsert_managed_app(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let items: OneOrMany<ManagedApp> = body(&bytes)?;
    let items = items.into_vec();
    for a in &items {
        emulator.add_managed_app(a.clone());
    }
    Ok(to_json(items))
}

async fn events(State(emulator): State<Emulator>) -> axum::Json<Value> {
    to_json(emulator.received_events())
}

async fn accepted(State(emulator): State<Emulator>) -> axum::Json<Value> {
    to_json(emulator.accepted_events())
}

async fn stats(State(emulator): State<Emulator>) -> axum::Json<Value> {
    let now = emulator.now();
    let world = emulator.lock();
    axum::Json(json!({
        "requests": world.requests,
        "eventsReceived": world.received.len(),
        "eventsAccepted": world.accepted.len(),
        "tokensActive": world.tokens.values().filter(|exp| **exp > now).count(),
    }))
}

async fn token(State(emulator): State<Emulator>) -> axum::Json<Value> {
    let now = emulator.now();
    let (token, expires) = emulator.lock().issue_token(now);
    axum::Json(json!({"access_token": token, "expires_on": expires.to_rfc3339()}))
}

async fn reset(State(emulator): State<Emulator>) -> axum::Json<Value> {
    emulator.reset();
    info!(message = "Emulator reset.");
    axum::Json(json!({"reset": true}))
}

async fn faults(State(emulator): State<Emulator>) -> axum::Json<Value> {
    faults_json(&emulator)
}

async fn add_faults(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let items: OneOrMany<Fault> = body(&bytes)?;
    let items = items.into_vec();
    if let Some(bad) = items.iter().find(|f| !f.route_is_valid()) {
        let names: Vec<&str> = Route::ALL.iter().map(|r| r.name()).collect();
        return Err(AdminError::BadRequest(format!(
            "unknown route {:?}: use one of {} or *",
            bad.route,
            names.join(", ")
        )));
    }
    for f in &items {
        info!(message = "Fault scripted.", route = %f.route, kind = ?f.kind, times = f.times);
        emulator.add_fault(f.clone());
    }
    Ok(faults_json(&emulator))
}

async fn clear_faults(State(emulator): State<Emulator>) -> axum::Json<Value> {
    emulator.clear_faults();
    axum::Json(json!({"cleared": true}))
}

#[derive(Deserialize)]
struct LatencyBody {
    ms: u64,
}

async fn latency(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let b: LatencyBody = body(&bytes)?;
    emulator.set_latency(std::time::Duration::from_millis(b.ms));
    Ok(faults_json(&emulator))
}

#[derive(Deserialize)]
struct ResourceBody {
    resource: String,
}

async fn forbid(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let b: ResourceBody = body(&bytes)?;
    emulator.forbid_resource(&b.resource);
    Ok(faults_json(&emulator))
}

async fn clear_forbidden(State(emulator): State<Emulator>) -> axum::Json<Value> {
    emulator.lock().faults.forbidden.clear();
    faults_json(&emulator)
}

#[derive(Deserialize)]
struct CountBody {
    count: u32,
}

#[derive(Deserialize)]
struct CancellationBody {
    subscription: String,
    at: String,
}

async fn cancellation(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let b: CancellationBody = body(&bytes)?;
    let at = DateTime::parse_from_rfc3339(&b.at)
        .map_err(|e| {
            AdminError::BadRequest(format!(
                "`at` must be an RFC 3339 time such as 2026-03-10T09:50:00Z: {e}"
            ))
        })?
        .with_timezone(&Utc);
    emulator.cancel_at(&b.subscription, at);
    Ok(faults_json(&emulator))
}

#[derive(Deserialize)]
struct PoisonBody {
    dimension: String,
}

async fn poison(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let b: PoisonBody = body(&bytes)?;
    emulator.poison_dimension(&b.dimension);
    Ok(faults_json(&emulator))
}

async fn event_errors(State(emulator): State<Emulator>, bytes: Bytes) -> AdminResult {
    let b: CountBody = body(&bytes)?;
    emulator.fail_next_events(b.count);
    Ok(faults_json(&emulator))
}

//! The local HTTP API: ingest (`POST /v1/usage`, `POST /api/v1/events`), reports (`GET /v1/usage`), and the
//! operator routes (`/v1/status`, `/v1/flush`, `/metrics`, `/healthz`, `/readyz`), the dashboard's reads
//! (`/v1/dashboard/...`) and the dashboard page itself ([`crate::ui`], `/ui/`).
//!
//! Ingest answers only after the durable commit (journal invariant 1). A request with any invalid record is
//! rejected whole, so the application never has to work out which half of a batch landed.

pub mod cloudevents;
pub mod dashboard;
pub mod ops;
pub mod pools_api;
pub mod usage_api;
pub mod validate;

use crate::clock::SharedClock;
use crate::config::Settings;
use crate::journal::{Journal, JournalError};
use crate::secret::Secret;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use validate::FieldError;

/// What the emitter offers the HTTP routes (a trait so the API does not depend on how emission is built).
pub trait EmitControl: Send + Sync {
    /// Runs one emission pass now (closed hours only) and returns its summary as JSON.
    fn flush(&self) -> FlushFuture;
    /// Extra status fields (last pass, last success) as JSON.
    fn status_extra(&self) -> serde_json::Value;
}

/// The future [`EmitControl::flush`] returns.
pub type FlushFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<serde_json::Value>> + Send>>;

/// Shared state of every route.
#[derive(Clone)]
pub struct AppState {
    /// Validated configuration.
    pub settings: Arc<Settings>,
    /// The journal (ingest writes here: the local outbox in fleet mode).
    pub journal: Journal,
    /// Where the shared reads come from (report, status, balance, usage, consumption): this journal, or the
    /// fleet's shared journal.
    pub reads: crate::journal::reads::Reads,
    /// Source of "now".
    pub clock: SharedClock,
    /// Bearer token required on every route but the probes.
    pub token: Option<Arc<Secret>>,
    /// Emission, when the daemon runs one.
    pub emitter: Option<Arc<dyn EmitControl>>,
    /// Prometheus text renderer, when metrics are installed.
    pub metrics: Option<Arc<dyn Fn() -> String + Send + Sync>>,
    /// Readiness: set once the journal is open and the listener bound.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Liveness of the scheduler, checked by `/healthz`.
    pub liveness: Arc<crate::ops::Liveness>,
}

/// The router's state: one [`AppState`] behind one `Arc`, so that the extractors' per-request clones (the token
/// middleware's, the handler's) are one reference count each instead of one per field (issue 15: at 256
/// connections every request cloned and dropped the state's nine `Arc`s several times, on counters shared by
/// both cores).
pub type SharedState = Arc<AppState>;

/// Builds the router with every route.
pub fn router(state: AppState) -> Router {
    let state: SharedState = Arc::new(state);
    let guarded = Router::new()
        .route(
            "/v1/usage",
            axum::routing::post(usage_api::post_usage).get(usage_api::get_usage),
        )
        .route(
            "/api/v1/events",
            axum::routing::post(cloudevents::post_events),
        )
        .route("/v1/status", axum::routing::get(ops::status))
        .route("/v1/flush", axum::routing::post(ops::flush))
        .route(
            "/v1/subscriptions/{id}/balance",
            axum::routing::get(ops::balance),
        )
        .route("/v1/consumption", axum::routing::get(ops::consumption))
        .merge(pool_routes(state.settings.fleet.is_some()))
        .route(
            "/v1/dashboard/subscriptions",
            axum::routing::get(dashboard::subscriptions),
        )
        .route("/v1/dashboard/usage", axum::routing::get(dashboard::usage))
        .route(
            "/v1/dashboard/at-risk",
            axum::routing::get(dashboard::at_risk),
        )
        .route("/metrics", axum::routing::get(ops::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", axum::routing::get(ops::healthz))
        .route("/readyz", axum::routing::get(ops::readyz))
        .merge(guarded)
        // The dashboard's static page and assets: public (no data in them); its data comes from the guarded routes.
        .merge(crate::ui::router())
        .fallback(not_found)
        .with_state(state)
}

/// The credit pool routes; in fleet mode every one answers 400 (pools are refused with `[fleet]`, and these
/// would read and write this replica's local journal, not the fleet's).
fn pool_routes(fleet: bool) -> Router<SharedState> {
    use axum::routing::{get, post};
    if fleet {
        let no = || pools_api::fleet_mode;
        return Router::new()
            .route("/v1/pools", post(no()).get(no()))
            .route("/v1/pools/{id}", get(no()))
            .route("/v1/pools/{id}/void", post(no()))
            .route("/v1/customers/{tenant}/balance", get(no()));
    }
    Router::new()
        .route("/v1/pools", post(pools_api::create).get(pools_api::list))
        .route("/v1/pools/{id}", get(pools_api::get))
        .route("/v1/pools/{id}/void", post(pools_api::void))
        .route(
            "/v1/customers/{tenant}/balance",
            get(pools_api::customer_balance),
        )
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        vec![FieldError::request(
            "no such route; ingest is POST /v1/usage or POST /api/v1/events, reports GET /v1/usage",
        )],
    )
}

async fn require_token(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok: bool = given.as_bytes().ct_eq(expected.expose().as_bytes()).into();
        if !ok {
            metrics::counter!("meterd_ingest_requests_total", "result" => "unauthorized")
                .increment(1);
            let mut resp = error_response(
                StatusCode::UNAUTHORIZED,
                vec![FieldError::request(
                    "missing or wrong bearer token; send `Authorization: Bearer <token>` with the token from ingest.token_file",
                )],
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"meterd\""),
            );
            return resp;
        }
    }
    next.run(req).await
}

/// `{"errors": [...]}` with `status`.
pub fn error_response(status: StatusCode, errors: Vec<FieldError>) -> Response {
    (status, axum::Json(json!({ "errors": errors }))).into_response()
}

/// The answer for a journal failure: 503 with `Retry-After` when it may pass (disk full, read-only), else 500.
pub fn journal_error_response(e: &JournalError) -> Response {
    let status = if e.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    };
    tracing::error!(message = "Journal write failed; request not acknowledged.", error = %e);
    let mut resp = error_response(
        status,
        vec![FieldError::request(format!(
            "{e}; retry the same request later"
        ))],
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    resp
}

/// Most bytes of a refused (over-limit) body read and dropped before the 413 is sent.
const DRAIN_MAX: u64 = 64 * 1024 * 1024;

/// Reads `body` and drops it, until it ends, fails, or `max` bytes were read.
async fn drain(mut body: Body, max: u64) {
    use axum::body::HttpBody;
    let mut read = 0u64;
    while read < max {
        match std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await {
            Some(Ok(frame)) => {
                read += frame.data_ref().map(|d| d.len() as u64).unwrap_or(0);
            }
            _ => return,
        }
    }
}

/// Reads the body up to `max_body_bytes`, checking the content type against `accepted`.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    accepted: &[&str],
) -> Result<(Bytes, String), Response> {
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !accepted.contains(&ctype.as_str()) {
        return Err(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            vec![FieldError::request(format!(
                "Content-Type must be {}; got `{}`",
                accepted.join(" or "),
                if ctype.is_empty() { "none" } else { &ctype }
            ))],
        ));
    }
    let limit = state.settings.ingest.max_body_bytes;
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            vec![FieldError::request(format!(
                "body is larger than ingest.max_body_bytes ({limit} bytes); send smaller batches"
            ))],
        )
    };
    // The body must arrive within `ingest.request_timeout` (slow clients). This is the only timeout of a request:
    // once the body is read, its journal job may be queued, and no error may be answered for a job that commits.
    let timeout = state.settings.ingest.request_timeout_std();
    // A declared length over the limit is refused from the header alone: the answer is 413 whatever part of the
    // body has arrived (hyper has already refused a length that is not a number). What the client sends anyway
    // is read and dropped, within the same timeout and up to `DRAIN_MAX` bytes, so that it can read the answer:
    // closing a socket with unread data resets the connection, and many clients then report a broken pipe.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        let _ = tokio::time::timeout(timeout, drain(body, DRAIN_MAX)).await;
        return Err(too_large());
    }
    let read = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(r) => r,
        Err(_) => {
            return Err(error_response(
                StatusCode::REQUEST_TIMEOUT,
                vec![FieldError::request(format!(
                    "the body did not arrive within ingest.request_timeout ({}s); nothing was stored, send it again",
                    timeout.as_secs_f64()
                ))],
            ));
        }
    };
    match read {
        Ok(b) => Ok((b, ctype)),
        Err(e) => {
            let too_big = std::error::Error::source(&e)
                .map(|s| s.to_string().contains("length limit"))
                .unwrap_or(false)
                || e.to_string().contains("length limit");
            if too_big {
                Err(too_large())
            } else {
                Err(error_response(
                    StatusCode::BAD_REQUEST,
                    vec![FieldError::request(format!("could not read the body: {e}"))],
                ))
            }
        }
    }
}

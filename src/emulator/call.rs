//! What every marketplace call shares: request ids, logging, bearer authentication, the `api-version` check, the
//! fault guard and the request counters. The handlers of [`super::metering`], [`super::saas`] and [`super::token`]
//! build on it; the route table in [`super::routes`] puts them together.

use super::Emulator;
use super::faults::{ConnectionKill, FaultKind, Phase, Route, failure_response};
use axum::extract::{FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// The only API version the marketplace serves.
pub(super) const API_VERSION: &str = "2018-08-31";

/// The ids of one call: the client's `x-ms-requestid` / `x-ms-correlationid`, or fresh GUIDs.
#[derive(Debug, Clone)]
pub(super) struct RequestIds {
    /// `x-ms-requestid`: the client's, or a fresh GUID.
    pub request_id: String,
    /// `x-ms-correlationid`: the client's, or a fresh GUID.
    pub correlation_id: String,
}

fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Assigns request ids, echoes them on the answer, and logs every call.
pub(crate) async fn request_ids(mut request: Request, next: Next) -> Response {
    let ids = RequestIds {
        request_id: header(request.headers(), "x-ms-requestid")
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        correlation_id: header(request.headers(), "x-ms-correlationid")
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
    };
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    request.extensions_mut().insert(ids.clone());
    let started = Instant::now();
    let mut response = next.run(request).await;
    for (name, value) in [
        ("x-ms-requestid", &ids.request_id),
        ("x-ms-correlationid", &ids.correlation_id),
    ] {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(name, value);
        }
    }
    info!(
        message = "Request.",
        request_id = %ids.request_id,
        correlation_id = %ids.correlation_id,
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_ms = started.elapsed().as_millis() as u64,
    );
    response
}

/// What a handler needs to know about the call beside its body.
#[derive(Debug, Clone)]
pub(super) struct Call {
    /// The call's request ids.
    pub ids: RequestIds,
    /// Present when served by [`super::server`]: lets a fault drop the connection.
    pub kill: Option<ConnectionKill>,
    /// The request headers.
    pub headers: HeaderMap,
    /// Decoded query parameters (last value wins).
    pub query: HashMap<String, String>,
}

impl Call {
    /// A query parameter, by exact name.
    pub(super) fn param(&self, name: &str) -> Option<&str> {
        self.query.get(name).map(String::as_str)
    }

    /// A header as a string.
    pub(super) fn header(&self, name: &str) -> Option<String> {
        header(&self.headers, name)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Call {
            ids: parts
                .extensions
                .get::<RequestIds>()
                .cloned()
                .unwrap_or_else(|| RequestIds {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    correlation_id: uuid::Uuid::new_v4().to_string(),
                }),
            kill: parts.extensions.get::<ConnectionKill>().cloned(),
            headers: parts.headers.clone(),
            query: Query::<HashMap<String, String>>::try_from_uri(&parts.uri)
                .map(|q| q.0)
                .unwrap_or_default(),
        })
    }
}

/// Runs `work` for a marketplace call of `route`, after counting it, adding latency and applying the next scripted
/// fault of that route.
pub(super) async fn guarded<F, Fut>(
    emulator: &Emulator,
    route: Route,
    call: &Call,
    work: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Response>,
{
    let (fault, latency) = {
        let mut state = emulator.lock();
        state.count(route);
        let latency = state.current.latency + Duration::from_millis(state.faults.latency_ms);
        (state.faults.take(route), latency)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let Some(fault) = fault else {
        return work().await;
    };
    info!(message = "Injecting fault.", request_id = %call.ids.request_id, route = route.name(), fault = ?fault);
    match fault {
        FaultKind::Fail {
            status,
            retry_after,
            body,
        } => failure_response(status, retry_after, body),
        FaultKind::Delay { delay_ms, phase } => {
            let delay = Duration::from_millis(delay_ms);
            if phase == Phase::Before {
                tokio::time::sleep(delay).await;
                work().await
            } else {
                let response = work().await;
                tokio::time::sleep(delay).await;
                response
            }
        }
        FaultKind::Drop { phase } => {
            if phase == Phase::After {
                drop(work().await);
            }
            match &call.kill {
                Some(kill) => {
                    kill.kill();
                    // The connection task drops this future together with the socket.
                    std::future::pending::<Response>().await
                }
                None => {
                    warn!(message = "Cannot drop the connection: not served by Emulator::serve.", request_id = %call.ids.request_id);
                    failure_response(
                        502,
                        None,
                        Some(json!({"code": "ConnectionDropUnsupported",
                                    "message": "Dropping connections needs Emulator::serve or spawn_local."})),
                    )
                }
            }
        }
    }
}

/// Checks the bearer token of an `/api` call: the static token, or an issued token not expired by the emulator clock.
pub(super) fn authorize(emulator: &Emulator, call: &Call) -> Option<Response> {
    let token = call
        .header("authorization")
        .and_then(|h| {
            let (scheme, token) = h.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        })
        .filter(|t| !t.is_empty());
    let message = match token {
        None => "The Authorization header is missing or is not a Bearer token.",
        Some(token) if emulator.lock().token_is_valid(&token, emulator.now()) => return None,
        Some(_) => "The access token is invalid or has expired.",
    };
    info!(message = "Unauthorized call.", request_id = %call.ids.request_id, reason = message);
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": {"code": "Unauthorized", "message": message}})),
    )
        .into_response();
    response.headers_mut().insert(
        "www-authenticate",
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    Some(response)
}

/// Checks `api-version` (required on every marketplace API call).
pub(super) fn check_api_version(call: &Call) -> Option<Response> {
    let message = match call.param("api-version") {
        Some(API_VERSION) => return None,
        None => "The api-version query parameter (?api-version=) is required for all requests."
            .to_owned(),
        Some(other) => format!(
            "Unsupported api-version '{other}'. The supported api-versions are '{API_VERSION}'."
        ),
    };
    Some(bad_argument("api-version", &message))
}

/// The checks every `/api` call starts with: bearer token, then `api-version`. `Some` is the answer to give.
pub(super) fn precheck(emulator: &Emulator, call: &Call) -> Option<Response> {
    authorize(emulator, call).or_else(|| check_api_version(call))
}

/// A 400 with the BadArgument shape of `single_400_badargument.json`.
pub(super) fn bad_argument(target: &str, message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        axum::Json(super::usage::bad_request_json(target, message)),
    )
        .into_response()
}

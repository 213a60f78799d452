//! Operator routes: `/v1/status`, `/v1/flush`, `/metrics`, `/healthz`, `/readyz`.

use super::validate::FieldError;
use super::{AppState, error_response, journal_error_response};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::sync::atomic::Ordering;

/// The status document: journal figures plus the emitter's own.
pub async fn status_json(
    state: &AppState,
) -> Result<serde_json::Value, crate::journal::JournalError> {
    let now = state.clock.now();
    let js = state
        .journal
        .read(move |conn| crate::journal::status::status(conn, now))
        .await?;
    let mut v = serde_json::to_value(js).unwrap_or_default();
    v["now"] = now.format("%Y-%m-%dT%H:%M:%SZ").to_string().into();
    if let Some(e) = &state.emitter {
        v["emitter"] = e.status_extra();
    }
    Ok(v)
}

/// `GET /v1/status`.
pub async fn status(State(state): State<AppState>) -> Response {
    match status_json(&state).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => journal_error_response(&e),
    }
}

/// `POST /v1/flush`: one emission pass now.
pub async fn flush(State(state): State<AppState>) -> Response {
    let Some(e) = &state.emitter else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![FieldError::request(
                "emission is not running in this process",
            )],
        );
    };
    match e.flush().await {
        Ok(v) => axum::Json(v).into_response(),
        Err(err) => error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            vec![FieldError::request(format!("{err:#}"))],
        ),
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(render) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(),
        )
            .into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            vec![FieldError::request("metrics are not enabled")],
        ),
    }
}

/// `GET /healthz`: the writer thread answers and the scheduler ticks.
pub async fn healthz(State(state): State<AppState>) -> Response {
    let writer = if !state.journal.writer_alive() {
        Err("journal writer thread stopped".to_string())
    } else {
        match tokio::time::timeout(std::time::Duration::from_secs(5), state.journal.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if e.is_unavailable() => Ok(()), // disk full is not a reason to restart; readyz says it
            Ok(Err(e)) => Err(format!("journal writer error: {e}")),
            Err(_) => Err("journal writer did not answer within 5s".to_string()),
        }
    };
    match writer.and_then(|_| state.liveness.scheduler_ok()) {
        Ok(()) => (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response(),
        Err(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unhealthy", "reason": m})),
        )
            .into_response(),
    }
}

/// `GET /readyz`: journal open and listener bound.
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::SeqCst) && state.journal.writer_alive() {
        (StatusCode::OK, axum::Json(json!({"status": "ready"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

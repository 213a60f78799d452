//! Operator routes: `/v1/status`, `/v1/flush`, `/metrics`, `/healthz`, `/readyz`.

use super::validate::FieldError;
use super::{AppState, SharedState, error_response, journal_error_response};
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
    let (js, replicas) = state.reads.status(now).await?;
    let mut v = serde_json::to_value(js).unwrap_or_default();
    if let Some(replicas) = replicas {
        // Fleet mode: the figures are the shared journal's; every replica with its heartbeat, lag and leases.
        v["fleet"] = json!({ "replicas": replicas });
    }
    v["now"] = now.format("%Y-%m-%dT%H:%M:%SZ").to_string().into();
    if let Some(e) = &state.emitter {
        v["emitter"] = e.status_extra();
    }
    // In emulator mode the marketplace is the daemon's in-process emulator on an ephemeral port: say where, so
    // `meterd subscriptions`, `reconcile` and `check-config --online` can reach it.
    if state.settings.marketplace.mode == crate::config::MarketplaceMode::Emulator {
        v["emulator"] = json!({ "base_url": state.settings.marketplace.base_url });
    }
    Ok(v)
}

/// `GET /v1/status`.
pub async fn status(State(state): State<SharedState>) -> Response {
    match status_json(&state).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => journal_error_response(&e),
    }
}

/// `POST /v1/flush`: one emission pass now.
pub async fn flush(State(state): State<SharedState>) -> Response {
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
pub async fn metrics(State(state): State<SharedState>) -> Response {
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
pub async fn healthz(State(state): State<SharedState>) -> Response {
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
pub async fn readyz(State(state): State<SharedState>) -> Response {
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

/// `GET /v1/subscriptions/{id}/balance`.
pub async fn balance(
    State(state): State<SharedState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let resource = match super::validate::resource(&id) {
        Ok(r) => r,
        Err(m) => return error_response(StatusCode::BAD_REQUEST, vec![FieldError::request(m)]),
    };
    let now = state.clock.now();
    let settings = state.settings.clone();
    let r = resource.clone();
    match state.reads.balance(settings, r, now).await {
        Ok(dims) => axum::Json(json!({"resource": resource, "at": crate::clock::fmt_time(now.timestamp()), "dimensions": dims})).into_response(),
        Err(e) => journal_error_response(&e),
    }
}

/// Query of `GET /v1/consumption`.
#[derive(Debug, serde::Deserialize)]
pub struct ConsumptionQuery {
    resource: Option<String>,
    dimension: Option<String>,
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
}

/// `GET /v1/consumption?resource=&dimension=&from=&to=`: raw consumption over any range.
pub async fn consumption(
    State(state): State<SharedState>,
    q: Result<axum::extract::Query<ConsumptionQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return super::usage_api::query_rejection(&e),
    };
    use super::usage_api::parse_bound;
    let Some(resource) = q
        .resource
        .as_deref()
        .map(|r| super::validate::resource(r).unwrap_or_else(|_| r.to_string()))
    else {
        return error_response(
            StatusCode::BAD_REQUEST,
            vec![FieldError::request("`resource` is required")],
        );
    };
    let (from, to) = match (
        parse_bound("from", q.from.as_deref()),
        parse_bound("to", q.to.as_deref()),
    ) {
        (Ok(f), Ok(t)) => (
            f.map(|t| t.timestamp()).unwrap_or(i64::MIN),
            t.map(|t| t.timestamp()).unwrap_or(i64::MAX),
        ),
        (Err(m), _) | (_, Err(m)) => {
            return error_response(StatusCode::BAD_REQUEST, vec![FieldError::request(m)]);
        }
    };
    let (r, d) = (resource.clone(), q.dimension.clone());
    if let Some(g) = q.group_by.as_deref() {
        let Some(by) = crate::billing::GroupBy::parse(g) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                vec![FieldError::request(format!(
                    "`group_by`: `{g}` is not one of pool, dimension, hour, day, month"
                ))],
            );
        };
        if by == crate::billing::GroupBy::Pool
            && matches!(state.reads, crate::journal::reads::Reads::Fleet { .. })
        {
            // Credit pools are kept by the single-replica SQLite journal only (docs/fleet.md).
            return error_response(
                StatusCode::BAD_REQUEST,
                vec![FieldError::request(
                    crate::journal::pg::reads::POOL_GROUPING_REFUSED,
                )],
            );
        }
        return match state.reads.consumption_grouped(r, d, from, to, by).await {
            Ok(groups) => axum::Json(json!({
                "resource": resource, "from": q.from, "to": q.to, "group_by": g.trim(), "groups": groups,
            }))
            .into_response(),
            Err(e) => journal_error_response(&e),
        };
    }
    match state.reads.consumption(r, d, from, to).await {
        Ok(rows) => {
            let dims: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(dim, q, hours)| json!({"dimension": dim, "quantity": crate::quantity::Micros(q).to_decimal_string(), "hours_with_usage": hours}))
                .collect();
            axum::Json(
                json!({"resource": resource, "from": q.from, "to": q.to, "dimensions": dims}),
            )
            .into_response()
        }
        Err(e) => journal_error_response(&e),
    }
}

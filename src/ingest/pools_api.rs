//! Credit pool routes: `POST /v1/pools` (create, idempotent by id), `GET /v1/pools?resource=`,
//! `GET /v1/pools/{id}`, `POST /v1/pools/{id}/void`, and a customer's pooled balance
//! `GET /v1/customers/{tenant}/balance`. The rules are in [`crate::pools`], the storage in `journal::pools`.
//!
//! Every change is journaled with who made it: `api` for these routes (the bearer token, when one is configured,
//! is the only identity a request carries), `config` for `[[pools]]`.

use super::validate::FieldError;
use super::{SharedState, error_response, journal_error_response, read_body};
use crate::journal::pools::Created;
use crate::pool_def::{PLAN_POOL_PREFIX, PoolSpec, Scope};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Who a request to these routes is, in the audit trail.
const WHO: &str = "api";

fn bad(message: impl Into<String>) -> Response {
    error_response(StatusCode::BAD_REQUEST, vec![FieldError::request(message)])
}

/// Every pool route in fleet mode: credit pools are a single-replica feature for now (docs/fleet.md).
pub async fn fleet_mode() -> Response {
    bad(
        "credit pools are not available in fleet mode yet: the shared journal's billing does not draw from pools; \
         run a single replica to use them (docs/fleet.md)",
    )
}

/// `POST /v1/pools`: creates a pool. 201 when created, 200 when the same id with the same content exists,
/// 409 when the id exists with other content.
pub async fn create(State(state): State<SharedState>, headers: HeaderMap, body: Body) -> Response {
    let (bytes, _) = match read_body(&state, &headers, body, &["application/json"]).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let spec: PoolSpec = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return bad(format!(
                "not a pool: {e}; send {{\"id\", \"dimension\", \"amount\", \"priority\", \"scope\": {{\"resource\"|\"customer\"|\"group\": \"...\"}}, \"effective_at\", \"expires_at\", \"refresh\"}}"
            ));
        }
    };
    let def = match spec.validate() {
        Ok(d) => d,
        Err(m) => return bad(m),
    };
    if state.settings.dimension(&def.dimension).is_none() {
        return bad(format!(
            "`dimension`: `{}` is not a declared dimension; declare it in [[dimensions]]",
            def.dimension
        ));
    }
    if let Scope::Group(g) = &def.scope
        && !state.settings.groups.iter().any(|x| &x.name == g)
    {
        return bad(format!(
            "`scope.group`: `{g}` is not a declared group; add [[groups]] name = \"{g}\" to the configuration"
        ));
    }
    let now = state.clock.now();
    let id = def.id.clone();
    let status = match state.journal.create_pool(def, WHO.into(), now).await {
        Ok(Created::Created(_)) => StatusCode::CREATED,
        Ok(Created::Unchanged(_)) => StatusCode::OK,
        Ok(Created::Conflict(m)) => {
            return error_response(StatusCode::CONFLICT, vec![FieldError::request(m)]);
        }
        Err(e) => return journal_error_response(&e),
    };
    match state.journal.pool(state.settings.clone(), id, now).await {
        Ok(Some(v)) => (status, axum::Json(v)).into_response(),
        Ok(None) => journal_error_response(&crate::journal::JournalError::Invalid(
            "the pool just created is not there".into(),
        )),
        Err(e) => journal_error_response(&e),
    }
}

/// Query of `GET /v1/pools`.
#[derive(Debug, serde::Deserialize)]
pub struct ListQuery {
    resource: Option<String>,
}

/// `GET /v1/pools?resource=`: the pools whose scope holds `resource` (in draw order), or every pool.
pub async fn list(
    State(state): State<SharedState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return super::usage_api::query_rejection(&e),
    };
    let resource = q
        .resource
        .map(|r| super::validate::resource(&r).unwrap_or(r))
        .filter(|r| !r.trim().is_empty());
    let now = state.clock.now();
    match state
        .journal
        .list_pools(state.settings.clone(), resource.clone(), now)
        .await
    {
        Ok(pools) => axum::Json(json!({
            "resource": resource,
            "at": crate::clock::fmt_time(now.timestamp()),
            "pools": pools,
        }))
        .into_response(),
        Err(e) => journal_error_response(&e),
    }
}

/// `GET /v1/pools/{id}`.
pub async fn get(State(state): State<SharedState>, Path(id): Path<String>) -> Response {
    match state
        .journal
        .pool(state.settings.clone(), id.clone(), state.clock.now())
        .await
    {
        Ok(Some(v)) => axum::Json(v).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => journal_error_response(&e),
    }
}

fn not_found(id: &str) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        vec![FieldError::request(format!(
            "no pool `{id}`; GET /v1/pools lists them"
        ))],
    )
}

/// `POST /v1/pools/{id}/void`: no further draws (what was drawn stays drawn). Voiding twice is not an error.
pub async fn void(State(state): State<SharedState>, Path(id): Path<String>) -> Response {
    if id.starts_with(PLAN_POOL_PREFIX) {
        return bad(format!(
            "`{id}` is a plan allowance pool; it follows the plan's included quantities in [[plans]] and cannot be voided"
        ));
    }
    let now = state.clock.now();
    match state.journal.void_pool(id.clone(), WHO.into(), now).await {
        Ok(Some(_)) => get(State(state), Path(id)).await,
        Ok(None) => not_found(&id),
        Err(e) => journal_error_response(&e),
    }
}

/// `GET /v1/customers/{tenant}/balance`: a customer's pooled view (shared pools, each subscription's balance).
pub async fn customer_balance(
    State(state): State<SharedState>,
    Path(tenant): Path<String>,
) -> Response {
    if tenant.trim().is_empty() {
        return bad("give the customer's tenant id (the SaaS list's beneficiary.tenantId)");
    }
    match state
        .journal
        .customer_balance(state.settings.clone(), tenant, state.clock.now())
        .await
    {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => journal_error_response(&e),
    }
}

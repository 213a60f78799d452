//! Token endpoints: Entra ID client credentials (v2 and v1) and managed identity (IMDS and App Service).
//!
//! The shapes follow `token_v2_response.json` (numbers as JSON numbers), `token_v1_response.json` and
//! `token_imds_response.json` (every number a string). Tokens are opaque random strings remembered with an expiry
//! on the emulator clock, so shifting the clock expires them. Errors are Entra-shaped:
//! `{"error", "error_description": "AADSTSnnnn: ...", "error_codes": [n], "timestamp", "trace_id",
//! "correlation_id", "error_uri"}`:
//! - unknown tenant: 400 `invalid_request` AADSTS90002;
//! - missing parameter or not a form: 400 `invalid_request` AADSTS900144;
//! - grant type other than `client_credentials`: 400 `unsupported_grant_type` AADSTS70003;
//! - unknown client id: 401 `invalid_client` AADSTS700016; wrong secret: 401 `invalid_client` AADSTS7000215;
//! - scope / resource other than the marketplace's: 400 `invalid_resource` AADSTS500011.

use super::Emulator;
use super::call::{Call, guarded};
use super::config::MARKETPLACE_RESOURCE;
use super::faults::Route;
use axum::Form;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::HashMap;
use tracing::info;

type FormResult = Result<Form<HashMap<String, String>>, FormRejection>;

/// Which Entra endpoint answered: v2 writes numbers as numbers, v1 as strings.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

fn entra_error(
    status: StatusCode,
    error: &str,
    code: u32,
    message: &str,
    now: DateTime<Utc>,
) -> Response {
    let trace_id = uuid::Uuid::new_v4();
    let correlation_id = uuid::Uuid::new_v4();
    let stamp = now.format("%Y-%m-%d %H:%M:%SZ").to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {message}\r\nTrace ID: {trace_id}\r\nCorrelation ID: {correlation_id}\r\nTimestamp: {stamp}"
        ),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace_id.to_string(),
        "correlation_id": correlation_id.to_string(),
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

/// `POST /{tenant}/oauth2/v2.0/token`.
pub(super) async fn v2(
    State(emulator): State<Emulator>,
    call: Call,
    Path(tenant): Path<String>,
    form: FormResult,
) -> Response {
    entra_token(emulator, call, tenant, form, Version::V2).await
}

/// `POST /{tenant}/oauth2/token`.
pub(super) async fn v1(
    State(emulator): State<Emulator>,
    call: Call,
    Path(tenant): Path<String>,
    form: FormResult,
) -> Response {
    entra_token(emulator, call, tenant, form, Version::V1).await
}

/// Both Entra endpoints: the token route's fault guard around [`client_credentials`].
async fn entra_token(
    emulator: Emulator,
    call: Call,
    tenant: String,
    form: FormResult,
    version: Version,
) -> Response {
    guarded(&emulator, Route::Token, &call, || async {
        client_credentials(&emulator, &call, &tenant, form, version)
    })
    .await
}

fn client_credentials(
    emulator: &Emulator,
    call: &Call,
    tenant: &str,
    form: FormResult,
    version: Version,
) -> Response {
    let now = emulator.now();
    let credentials = emulator.lock().current.credentials.clone();
    if !tenant.eq_ignore_ascii_case(&credentials.tenant) {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
            now,
        );
    }
    let Ok(Form(form)) = form else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "The request body must contain the following parameter: 'grant_type'.",
            now,
        );
    };
    let field = |name: &str| form.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let missing = |name: &str| {
        entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{name}'."),
            now,
        )
    };
    let Some(grant_type) = field("grant_type") else {
        return missing("grant_type");
    };
    if grant_type != "client_credentials" {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant_type}'."),
            now,
        );
    }
    let Some(client_id) = field("client_id") else {
        return missing("client_id");
    };
    if !client_id.eq_ignore_ascii_case(&credentials.client_id) {
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
            now,
        );
    }
    let Some(secret) = field("client_secret") else {
        return missing("client_secret");
    };
    if secret != credentials.client_secret {
        info!(message = "Token refused: wrong client secret.", request_id = %call.ids.request_id);
        return entra_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
            ),
            now,
        );
    }
    let (param, value) = match version {
        Version::V2 => ("scope", field("scope")),
        Version::V1 => ("resource", field("resource")),
    };
    let Some(value) = value else {
        return missing(param);
    };
    let valid = match version {
        Version::V2 => value == format!("{MARKETPLACE_RESOURCE}/.default"),
        Version::V1 => resource_is_marketplace(value),
    };
    if !valid {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            500011,
            &format!(
                "The resource principal named {value} was not found in the tenant named {tenant}. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You might have sent your authentication request to the wrong tenant."
            ),
            now,
        );
    }
    let (token, expires) = emulator.lock().issue_token(now);
    let lifetime = (expires - now).num_seconds();
    info!(message = "Token issued.", request_id = %call.ids.request_id, kind = if version == Version::V2 { "v2" } else { "v1" }, lifetime_s = lifetime);
    let body = match version {
        Version::V2 => {
            json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token})
        }
        Version::V1 => json!({
            "token_type": "Bearer",
            "expires_in": lifetime.to_string(),
            "ext_expires_in": lifetime.to_string(),
            "expires_on": expires.timestamp().to_string(),
            "not_before": now.timestamp().to_string(),
            "resource": value,
            "access_token": token,
        }),
    };
    axum::Json(body).into_response()
}

fn resource_is_marketplace(resource: &str) -> bool {
    resource.trim_end_matches('/') == MARKETPLACE_RESOURCE
}

/// Both managed identity endpoints, once their own header checks passed: checks `resource`, then issues a token
/// for `client_id` (default: the configured one) in the endpoint's shape.
fn managed_identity_token(emulator: &Emulator, call: &Call, app_service: bool) -> Response {
    let resource = match check_resource(call) {
        Ok(resource) => resource,
        Err(response) => return *response,
    };
    let client_id = call.param("client_id");
    let now = emulator.now();
    let default_client = emulator.lock().current.credentials.client_id.clone();
    let (token, expires) = emulator.lock().issue_token(now);
    let lifetime = (expires - now).num_seconds().to_string();
    let client_id = client_id.map(str::to_owned).unwrap_or(default_client);
    let body: Value = if app_service {
        json!({"access_token": token, "expires_on": expires.timestamp().to_string(), "resource": resource,
               "token_type": "Bearer", "client_id": client_id})
    } else {
        json!({"access_token": token, "client_id": client_id, "expires_in": lifetime, "expires_on": expires.timestamp().to_string(),
               "ext_expires_in": lifetime, "not_before": now.timestamp().to_string(), "resource": resource, "token_type": "Bearer"})
    };
    axum::Json(body).into_response()
}

fn identity_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

fn check_resource(call: &Call) -> Result<String, Box<Response>> {
    match call.param("resource") {
        None => Err(Box::new(identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required query variable 'resource' is missing",
        ))),
        Some(r) if resource_is_marketplace(r) => Ok(r.to_owned()),
        Some(r) => Err(Box::new(identity_error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            &format!("AADSTS500011: The resource principal named {r} was not found in the tenant."),
        ))),
    }
}

/// `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...` with `Metadata: true` (IMDS).
pub(super) async fn imds(State(emulator): State<Emulator>, call: Call) -> Response {
    guarded(&emulator, Route::Token, &call, || async {
        if !call
            .header("metadata")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return identity_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        if call.param("api-version").is_none() {
            return identity_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required query variable 'api-version' is missing",
            );
        }
        managed_identity_token(&emulator, &call, false)
    })
    .await
}

/// `GET /msi/token?api-version=2019-08-01&resource=...` with `X-IDENTITY-HEADER` (App Service / Functions).
pub(super) async fn app_service(State(emulator): State<Emulator>, call: Call) -> Response {
    guarded(&emulator, Route::Token, &call, || async {
        let expected = emulator.lock().current.credentials.identity_header.clone();
        if call.header("x-identity-header").as_deref() != Some(expected.as_str()) {
            return identity_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "The X-IDENTITY-HEADER header is missing or invalid.",
            );
        }
        managed_identity_token(&emulator, &call, true)
    })
    .await
}

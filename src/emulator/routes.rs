//! The router: the route table of the emulator. What every call shares (request ids, logging, bearer auth, the
//! fault guard) is in [`super::call`].
//!
//! Route map (production paths, so meterd's `base_url` is `http://HOST:PORT/api`):
//! - `/api/...`: metering and SaaS subscription APIs, bearer token required;
//! - `/{tenant}/oauth2/v2.0/token`, `/{tenant}/oauth2/token`, `/metadata/identity/oauth2/token`, `/msi/token`:
//!   token endpoints (Entra v2, v1, IMDS, App Service);
//! - `/emulator/...`: the admin API (no auth), see [`super::admin`].

use super::Emulator;
use super::call::request_ids;
use super::{admin, metering, saas, token};
use axum::Router;
use axum::middleware::from_fn;
use axum::routing::{get, post};

/// All routes, with request-id handling and logging.
pub(super) fn router(emulator: &Emulator) -> Router {
    Router::new()
        .route("/api/batchUsageEvent", post(metering::batch))
        .route("/api/usageEvent", post(metering::single))
        .route("/api/usageEvents", get(metering::usage_events))
        .route("/api/saas/subscriptions", get(saas::list))
        .route("/api/saas/subscriptions/", get(saas::list))
        .route("/api/saas/subscriptions/{id}", get(saas::one))
        .route("/{tenant}/oauth2/v2.0/token", post(token::v2))
        .route("/{tenant}/oauth2/token", post(token::v1))
        .route("/metadata/identity/oauth2/token", get(token::imds))
        .route("/msi/token", get(token::app_service))
        .nest("/emulator", admin::router())
        .layer(from_fn(request_ids))
        .with_state(emulator.clone())
}

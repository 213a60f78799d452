//! Azure Marketplace wire types, token providers, client and outcome classification.
//!
//! Everything meterd knows about the marketplace's HTTP contract (see `shared/azure-marketplace.md`) lives here, so
//! the emitter and the CLI deal in domain values ([`outcome::Classified`], [`client::CallError`]) rather than in
//! status codes and JSON.
//!
//! # Layout
//!
//! - [`types`]: request and response bodies, and the frozen bytes of one usage event.
//! - [`auth_config`]: how meterd authenticates ([`auth_config::AuthConfig`]), re-exported by [`auth`].
//! - [`auth`]: Entra ID token providers (client secret v1/v2, managed identity, static), cached and refreshed early.
//! - [`client`]: the HTTP client: batch usage, subscription list, usage report.
//! - [`error`]: what went wrong, as values ([`error::CallError`], re-exported by [`client`]; [`error::AuthError`],
//!   re-exported by [`auth`]).
//! - [`advice`]: actionable text for 401/403 answers and Entra `AADSTS` errors.
//! - [`outcome`]: per-event classification of a batch answer and matching results to what was sent.
//!
//! What [`auth`] and [`client`] share (the API version, the resource id, `error_chain`) is here, so neither imports
//! the other for it.

pub mod advice;
pub mod auth;
pub mod auth_config;
pub mod client;
pub mod error;
pub mod outcome;
pub mod types;

/// The marketplace API version sent on every call.
pub const API_VERSION: &str = "2018-08-31";

/// The marketplace API's Entra application id: the audience of every token meterd requests.
///
/// An older id (`62d94f6c-...`) still appears in stale documentation; tokens for it are refused.
pub const MARKETPLACE_RESOURCE_ID: &str = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7";

/// The public production base URL.
pub const DEFAULT_BASE_URL: &str = "https://marketplaceapi.microsoft.com/api";

/// An error and its sources on one line (reqwest's `Display` alone hides the cause, e.g. "connection refused").
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

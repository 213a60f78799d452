//! Azure Marketplace wire types, token providers, client and outcome classification.
//!
//! Everything meterd knows about the marketplace's HTTP contract (see `shared/azure-marketplace.md`) lives here, so
//! the emitter and the CLI deal in domain values ([`outcome::Classified`], [`client::CallError`]) rather than in
//! status codes and JSON.
//!
//! # Layout
//!
//! - [`types`]: request and response bodies, and the frozen bytes of one usage event.
//! - [`auth`]: Entra ID token providers (client secret v1/v2, managed identity, static), cached and refreshed early.
//! - [`client`]: the HTTP client: batch usage, subscription list, usage report; what went wrong as a value.
//! - [`advice`]: actionable text for 401/403 answers and Entra `AADSTS` errors.
//! - [`outcome`]: per-event classification of a batch answer and matching results to what was sent.

pub mod advice;
pub mod auth;
pub mod client;
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

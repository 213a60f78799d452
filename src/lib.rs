//! meterd: a metering daemon for the Azure Marketplace.
//!
//! The application reports what each customer consumed; meterd journals it durably in SQLite, adds it up per
//! subscription, plan, dimension and UTC hour, and reports each closed hour exactly once through the marketplace's
//! batch usage API.
//!
//! # Layout
//!
//! - [`clock`]: the injected source of "now" (UTC only).
//! - [`config`]: `meterd.toml` + `METERD_*` overrides, validated into [`config::Settings`].
//! - [`quantity`]: exact micro-unit quantities.
//! - [`journal`]: the SQLite journal, its writer thread and invariants.
//! - [`ingest`]: the local HTTP API (usage, CloudEvents, reports, status, probes).
//! - [`daemon`]: `meterd run`: wires journal, API, emitter and signals together.
//! - [`ops`]: liveness for probes and the watchdog.
//! - [`secret`]: secrets that never print.
//! - [`emulator`]: `meterd emulator`, a local Azure Marketplace (token, metering, subscriptions) with fault injection.
//! - [`marketplace`]: the marketplace wire types, token providers, HTTP client and outcome classification.
//! - [`tls`]: the one TLS crypto provider (ring) of every HTTPS client.

pub mod alerts;
pub mod billing;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod emit;
pub mod emulator;
pub mod ingest;
pub mod journal;
pub mod marketplace;
pub mod ops;
pub mod quantity;
pub mod resource;
pub mod secret;
pub mod tls;

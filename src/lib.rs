//! meterd: a metering daemon for the Azure Marketplace.
//!
//! The application reports what each customer consumed; meterd journals it durably in SQLite, adds it up per
//! subscription, plan, dimension and UTC hour, and reports each closed hour exactly once through the marketplace's
//! batch usage API.
//!
//! # Layout
//!
//! Layers, bottom to top; a module imports only from its own layer's rules or from layers below it
//! (`ci/check-layers.py` fails on an import loop). See `docs/architecture.md`.
//!
//! **Rules** (pure: no I/O, no SQL; the secret loader reads one file):
//! - [`clock`]: the injected source of "now" (UTC only) and the hour math (`HOUR`, `hour_of`, `fmt_time`).
//! - [`quantity`]: exact micro-unit quantities ([`quantity::Micros`]) and their decimal wire form.
//! - [`secret`]: secrets that never print, and where they are loaded from.
//! - [`resource`]: resource identity: SaaS GUID, managed-app URI or `resourceUsageId`.
//! - [`outcome`]: the one list of event outcomes ([`outcome::Outcome`]), as stored and exported.
//! - [`bill`]: billing arithmetic (allowance, overage, billing units, remainders, thresholds) into a [`bill::Bill`].
//! - [`pool_def`]: what a pool is and how `[[pools]]` / `POST /v1/pools` write it (below `config`).
//! - [`pools`]: credit pools (free tier, prepaid, plan allowance): which apply, the draw order, drawing an
//!   event's usage across them by record time, refresh and rollover.
//! - [`retry`]: retry policy (backoff with jitter, `Retry-After`).
//! - [`alert_kind`]: alert kinds and their dedupe keys.
//! - [`settle`]: per-event settlements ([`settle::Settle`], [`settle::Settlement`]); the pure mapping of a
//!   classified answer onto one is `marketplace::outcome::settle`, next to the classification.
//! - [`config`]: `meterd.toml` + `METERD_*` overrides, validated into [`config::Settings`] (reads its file and
//!   the environment it is given; used by every layer above).
//!
//! **Storage**:
//! - [`journal`]: the SQLite journal: every SQL statement of the crate, its writer thread, invariants and tables.
//!   The layers above call its typed face (`journal/ops.rs`: one method per operation, one job each), never SQL.
//!   [`billing`] is its billing face (balances, consumption), re-exported at the crate root.
//!
//! **Wire**:
//! - [`marketplace`]: the marketplace wire types, token providers, HTTP client and outcome classification.
//! - [`tls`]: the one TLS crypto provider (ring) of every HTTPS client.
//!
//! **Effects**:
//! - [`ingest`]: the local HTTP API (usage, CloudEvents, reports, status, probes, the dashboard's reads).
//! - [`ui`]: the usage dashboard in the browser (`/ui/`): static assets embedded in the binary.
//! - [`emit`]: the emission pass: freeze, decide, bill, send, settle.
//! - [`alerts`]: delivery of raised alerts to the webhook.
//! - [`fleet`]: fleet mode on the shared PostgreSQL journal (the fleet emitter, [`fleet::emit`]).
//! - [`ops`]: liveness for probes and the watchdog, systemd notify, metrics.
//! - [`fleet`]: fleet mode's forward path (local outbox to the shared PostgreSQL journal) and heartbeat.
//!
//! **Wiring**:
//! - [`daemon`]: `meterd run`: wires journal, API, emitter, alerts and signals together.
//! - [`cli`]: the commands.
//! - [`emulator`]: `meterd emulator`, a local Azure Marketplace (token, metering, subscriptions) with fault injection.

#![warn(missing_docs, unreachable_pub)]

pub mod alert_kind;
pub mod alerts;
pub mod bill;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod emit;
pub mod emulator;
pub mod fleet;
pub mod ingest;
pub mod journal;
pub mod marketplace;
pub mod ops;
pub mod outcome;
pub mod pool_def;
pub mod pools;
pub mod quantity;
pub mod resource;
pub mod retry;
pub mod secret;
pub mod settle;
pub mod tls;
pub mod ui;

/// Balances and consumption (the journal's billing face, [`journal::billing`]), at the path callers know.
pub use journal::billing;

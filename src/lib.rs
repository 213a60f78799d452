//! meterd: a metering daemon for the Azure Marketplace.
//!
//! The application reports what each customer consumed; meterd journals it durably in SQLite, adds it up per
//! subscription, plan, dimension and UTC hour, and reports each closed hour exactly once through the marketplace's
//! batch usage API.
//!
//! # Layout
//!
//! - [`clock`]: the injected source of "now" (UTC only).
//! - [`emulator`]: `meterd emulator`, a local Azure Marketplace (token, metering, subscriptions) with fault injection.
//! - [`marketplace`]: the marketplace wire types, token providers, HTTP client and outcome classification.

pub mod clock;
pub mod emulator;
pub mod marketplace;

//! The `meterd` command line: argument parsing and the small commands that talk to a running daemon, the
//! marketplace, or read the journal. `meterd run` itself lives in [`crate::daemon`].
//!
//! - `args`: the clap definitions ([`Cli`], [`Command`]).
//! - `setup`: finding and loading the configuration; opening the journal read-only.
//! - `client`: the client for the running daemon (TCP or unix socket, bearer token).
//! - `daemon_commands`: `record`, `flush`, `status`.
//! - `journal_views`: `report`, `balance`.
//! - `marketplace_commands`: `subscriptions`, `check-config`, `reconcile`.
//! - `dispatch`: runs one parsed command line (the whole of `main`).

mod args;
mod client;
mod daemon_commands;
mod dispatch;
mod journal_views;
mod marketplace_commands;
mod setup;

pub use args::{Cli, Command, ConfigArg, Format};
pub use client::{call_daemon, daemon_url};
pub use daemon_commands::{flush, print_flush, record, status};
pub use dispatch::main;
pub use journal_views::{balance, report};
pub use marketplace_commands::{
    Difference, check_config, check_online, marketplace_settings, reconcile, subscriptions,
};
pub use setup::{
    find_config, load_settings, load_settings_without_credentials, warn_missing_credentials,
};

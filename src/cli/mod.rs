//! The `meterd` command line: argument parsing and the small commands that talk to a running daemon, the
//! marketplace, or read the journal. `meterd run` itself lives in [`crate::daemon`].
//!
//! - `args`: the clap definitions ([`Cli`], [`Command`]).
//! - `setup`: finding and loading the configuration; opening the journal read-only.
//! - `client`: the client for the running daemon (TCP or unix socket, bearer token).
//! - `daemon_commands`: `record`, `flush`, `status`.
//! - `journal_views`: `report`, `balance`.
//! - `marketplace_commands`: `subscriptions`, `check-config`, `reconcile`.
//! - `fleet_commands`: `forward` (fleet mode: ship a journal's un-forwarded records).
//! - `dispatch`: runs one parsed command line (the whole of `main`).
//!
//! Public: the clap types, [`main`], and [`reconcile`] (its differences are checked in-process by the tests);
//! the rest is `pub(crate)`.

mod args;
mod client;
mod daemon_commands;
mod dispatch;
mod fleet_commands;
mod journal_views;
mod marketplace_commands;
mod setup;

pub use args::{Cli, Command, ConfigArg, Format};
pub use dispatch::main;
pub use marketplace_commands::{Difference, reconcile};

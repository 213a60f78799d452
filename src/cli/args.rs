//! The clap definitions of the `meterd` command line: every command and flag (the interface users and scripts
//! rely on; names, help texts and defaults stay as they are).

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// meterd: meters your SaaS usage and reports it to the Azure Marketplace, each closed hour exactly once.
#[derive(Debug, Parser)]
#[command(name = "meterd", version, about, long_about = None, after_help = "\
Try it without credentials:   meterd run --emulator     (then: meterd record --resource 11111111-1111-4111-8111-111111111111 --dimension api_calls --quantity 3)
Configuration file:           --config FILE, else $METERD_CONFIG, else /etc/meterd/meterd.toml, else ./meterd.toml
Every key can be overridden:  METERD_<SECTION>__<KEY>=value, e.g. METERD_EMIT__GRACE=0s")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by commands that read the configuration.
#[derive(Debug, clap::Args, Clone, Default)]
pub struct ConfigArg {
    /// Configuration file (default: $METERD_CONFIG, /etc/meterd/meterd.toml, ./meterd.toml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// Output formats of `report`.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// Comma-separated, with a header line.
    Csv,
    /// One JSON document.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: ingest API, journal, hourly emission.
    Run {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Start the built-in marketplace emulator in-process and report to it (no credentials needed).
        #[arg(long)]
        emulator: bool,
    },
    /// Send one usage record to the running daemon.
    Record {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// SaaS subscription id (GUID) or managed application resource URI.
        #[arg(long)]
        resource: String,
        /// Dimension id, as declared in the configuration.
        #[arg(long)]
        dimension: String,
        /// Quantity, > 0, at most 6 decimals.
        #[arg(long)]
        quantity: String,
        /// When the usage happened (RFC 3339, UTC); default now.
        #[arg(long)]
        time: Option<String>,
        /// Idempotency key: sending the same id again is counted once.
        #[arg(long)]
        id: Option<String>,
        /// Plan id (default: from the subscription list).
        #[arg(long)]
        plan: Option<String>,
        /// Daemon URL (default: from ingest.listen).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run one emission pass now (closed hours only) and print what was sent.
    Flush {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Print the daemon's answer as one JSON line (the pass summary of POST /v1/flush).
        #[arg(long)]
        json: bool,
        /// Daemon URL (default: from ingest.listen).
        #[arg(long)]
        url: Option<String>,
    },
    /// Show pending events, oldest pending age, time to the nearest expiry, last success, counts per outcome.
    Status {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (the same document as GET /v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Hourly totals with their outcomes.
    Report {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Only this subscription id or resource URI.
        #[arg(long)]
        resource: Option<String>,
        /// Hours from this time (RFC 3339 or YYYY-MM-DD), inclusive.
        #[arg(long)]
        from: Option<String>,
        /// Hours before this time (RFC 3339 or YYYY-MM-DD), exclusive.
        #[arg(long)]
        to: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// A subscription's balance this term: included, consumed, remaining, overage, carried remainder.
    Balance {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// SaaS subscription id or resource URI.
        #[arg(long)]
        resource: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Compare the marketplace's daily totals (GET /usageEvents) with what meterd recorded as accepted.
    Reconcile {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The UTC day, YYYY-MM-DD.
        #[arg(long)]
        date: String,
    },
    /// List the SaaS subscriptions as meterd sees them (with advice on 401/403).
    Subscriptions {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration file; --online also fetches a token and the first subscription page.
    CheckConfig {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Also talk to the marketplace.
        #[arg(long)]
        online: bool,
    },
    /// Fleet mode: ship the records of a journal file that are not yet in the shared PostgreSQL journal (a
    /// replica that never comes back), then print a summary. Idempotent: records already there count once.
    Forward {
        /// The configuration file (for the fleet's PostgreSQL URL and the late-usage rule).
        #[command(flatten)]
        config: ConfigArg,
        /// The journal file to forward from (a copy is fine; no meterd may be running on it).
        #[arg(long, value_name = "PATH")]
        journal: PathBuf,
        /// Name the records are forwarded under (default: forward@<fleet.replica_id>).
        #[arg(long)]
        replica: Option<String>,
        /// Print the summary as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Run a local Azure Marketplace emulator (token, metering, subscriptions) for development and tests.
    Emulator(crate::emulator::EmulatorArgs),
}

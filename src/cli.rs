//! The `meterd` command line: argument parsing and the small commands that talk to a running daemon or read the
//! journal. `meterd run` itself lives in [`crate::daemon`].

use crate::config::{self, ListenAddr, Settings};
use crate::ingest::usage_api::parse_bound;
use crate::journal::usage::{self, ReportFilter};
use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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
        #[command(flatten)]
        config: ConfigArg,
        /// Start the built-in marketplace emulator in-process and report to it (no credentials needed).
        #[arg(long)]
        emulator: bool,
    },
    /// Send one usage record to the running daemon.
    Record {
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
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON (the same document as GET /v1/status).
        #[arg(long)]
        json: bool,
    },
    /// Hourly totals with their outcomes.
    Report {
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
        #[command(flatten)]
        config: ConfigArg,
        /// The UTC day, YYYY-MM-DD.
        #[arg(long)]
        date: String,
    },
    /// List the SaaS subscriptions as meterd sees them (with advice on 401/403).
    Subscriptions {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration file; --online also fetches a token and the first subscription page.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Also talk to the marketplace.
        #[arg(long)]
        online: bool,
    },
    /// Run a local Azure Marketplace emulator (token, metering, subscriptions) for development and tests.
    Emulator(crate::emulator::EmulatorArgs),
}

/// Finds the configuration file: `--config`, `$METERD_CONFIG`, `/etc/meterd/meterd.toml`, `./meterd.toml`.
pub fn find_config(arg: &ConfigArg, env: &BTreeMap<String, String>) -> Option<PathBuf> {
    if let Some(p) = &arg.config {
        return Some(p.clone());
    }
    if let Some(p) = env.get("METERD_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    ["/etc/meterd/meterd.toml", "meterd.toml"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Loads settings; with `dev_fallback`, uses the built-in development settings when no file exists.
pub fn load_settings(
    arg: &ConfigArg,
    env: &BTreeMap<String, String>,
    dev_fallback: bool,
) -> anyhow::Result<Settings> {
    match find_config(arg, env) {
        Some(path) => Ok(config::load(&path, env)?),
        None if dev_fallback => Ok(Settings::dev_defaults(env)?),
        None => bail!(
            "no configuration file: pass --config FILE, set METERD_CONFIG, or create /etc/meterd/meterd.toml \
             (start from config.toml.example); to try meterd without one, run `meterd run --emulator`"
        ),
    }
}

/// Loads settings for a command that does not talk to the marketplace (`status`, `report`, `balance`,
/// `record`, `flush`, offline `check-config`): the built-in development settings when no file exists, and
/// missing marketplace credentials listed in `marketplace.missing_credentials` rather than refused.
pub fn load_settings_without_credentials(
    arg: &ConfigArg,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Settings> {
    match find_config(arg, env) {
        Some(path) => Ok(config::load_for(&path, env, config::Credentials::Optional)?),
        None => Ok(Settings::dev_defaults(env)?),
    }
}

/// Prints, on stderr, what the marketplace commands would refuse (the journal commands work without it).
pub fn warn_missing_credentials(settings: &Settings) {
    for m in &settings.marketplace.missing_credentials {
        eprintln!(
            "warning: {m} (needed by `meterd run`, `subscriptions`, `reconcile` and `check-config --online`; \
             this command reads only the journal)"
        );
    }
}

fn open_journal(settings: &Settings) -> anyhow::Result<crate::journal::ReadOnlyJournal> {
    let j = crate::journal::open_read_only(&settings.journal.path)?;
    if let Some(note) = &j.note {
        eprintln!("{note}");
    }
    Ok(j)
}

/// Where `record` and `flush` reach the daemon.
pub fn daemon_url(settings: &Settings) -> String {
    match &settings.ingest.listen {
        ListenAddr::Tcp(a) => format!(
            "http://{}",
            a.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")
        ),
        ListenAddr::Unix(p) => format!("unix:{}", p.display()),
    }
}

/// A minimal HTTP/1.1 exchange with the daemon, over TCP or a unix socket.
pub async fn call_daemon(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let base = url
        .map(str::to_string)
        .unwrap_or_else(|| daemon_url(settings));
    let token = crate::daemon::ingest_token(settings, env)?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: meterd\r\nConnection: close\r\n");
    if let Some(t) = &token {
        req.push_str(&format!("Authorization: Bearer {}\r\n", t.expose()));
    }
    let body = body.unwrap_or("");
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    let mut raw = Vec::new();
    let unreachable = || {
        format!(
            "cannot reach the daemon at {base}; is `meterd run` running with this configuration?"
        )
    };
    if let Some(p) = base.strip_prefix("unix:") {
        let mut s = tokio::net::UnixStream::connect(p)
            .await
            .with_context(unreachable)?;
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut raw).await?;
    } else {
        let host = base.trim_start_matches("http://").trim_end_matches('/');
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .with_context(unreachable)?;
        s.write_all(req.as_bytes()).await?;
        s.read_to_end(&mut raw).await?;
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// `meterd record`.
#[allow(clippy::too_many_arguments)]
pub async fn record(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    resource: &str,
    dimension: &str,
    quantity: &str,
    time: Option<&str>,
    id: Option<&str>,
    plan: Option<&str>,
) -> anyhow::Result<()> {
    // The quantity goes as a JSON number literal so the daemon checks it exactly as typed.
    if crate::quantity::Micros::parse_decimal(quantity).is_err() && quantity.parse::<f64>().is_err()
    {
        bail!("--quantity `{quantity}` is not a number");
    }
    let mut body = format!(
        "{{\"resource\":{},\"dimension\":{},\"quantity\":{}",
        serde_json::to_string(resource)?,
        serde_json::to_string(dimension)?,
        serde_json::to_string(quantity)?
    );
    for (k, v) in [("time", time), ("id", id), ("plan", plan)] {
        if let Some(v) = v {
            body.push_str(&format!(",\"{k}\":{}", serde_json::to_string(v)?));
        }
    }
    body.push('}');
    let (status, answer) =
        call_daemon(settings, env, url, "POST", "/v1/usage", Some(&body)).await?;
    if status == 202 {
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        if v["duplicates"].as_u64() == Some(1) {
            println!("duplicate: a record with this id was already recorded; counted once");
        } else if v["carried"].as_u64() == Some(1) {
            println!("recorded (late: carried into the open hour)");
        } else {
            println!("recorded");
        }
        Ok(())
    } else {
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
        let msgs: Vec<String> = v["errors"]
            .as_array()
            .map(|es| {
                es.iter()
                    .map(|e| match e["field"].as_str() {
                        Some(f) => format!("{f}: {}", e["message"].as_str().unwrap_or("")),
                        None => e["message"].as_str().unwrap_or("").to_string(),
                    })
                    .collect()
            })
            .unwrap_or_else(|| vec![answer.clone()]);
        bail!(
            "the daemon refused the record (HTTP {status}): {}",
            msgs.join("; ")
        )
    }
}

/// `meterd status`: read from the journal file directly, so it works whether or not the daemon runs.
pub fn status(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
    json: bool,
) -> anyhow::Result<()> {
    let conn = open_journal(settings)?;
    let s = crate::journal::status::status(&conn, now)?;
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["now"] = now.format("%Y-%m-%dT%H:%M:%SZ").to_string().into();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let age = |s: Option<i64>| s.map(human_secs).unwrap_or_else(|| "-".into());
    println!(
        "journal            {} (schema v{})",
        settings.journal.path.display(),
        s.schema_version
    );
    println!("pending events     {}", s.pending_events);
    println!("oldest pending     {}", age(s.oldest_pending_age_seconds));
    println!(
        "nearest expiry     {}{}",
        age(s.nearest_expiry_seconds),
        s.nearest_expiry_hour
            .as_deref()
            .map(|h| format!(" (hour {h})"))
            .unwrap_or_default()
    );
    println!(
        "last success       {}",
        s.last_success.as_deref().unwrap_or("never")
    );
    println!("hours not frozen   {}", s.unfrozen_hours);
    if let Some(e) = &s.last_error {
        println!("last error         {e}");
    }
    if s.outcomes.is_empty() {
        println!("outcomes           none yet");
    } else {
        println!("outcomes");
        for (k, n) in &s.outcomes {
            println!(
                "  {k:<20} {n:>8} events  {:>16} units",
                s.outcome_quantities
                    .get(k)
                    .map(String::as_str)
                    .unwrap_or("0")
            );
        }
    }
    Ok(())
}

fn human_secs(s: i64) -> String {
    let sign = if s < 0 { "-" } else { "" };
    let a = s.abs();
    if a >= 3600 {
        format!("{sign}{}h{:02}m", a / 3600, (a % 3600) / 60)
    } else if a >= 60 {
        format!("{sign}{}m{:02}s", a / 60, a % 60)
    } else {
        format!("{sign}{a}s")
    }
}

/// `meterd report`.
pub fn report(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
    resource: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    format: Format,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let filter = ReportFilter {
        resource: resource
            .map(|r| crate::ingest::validate::resource(r).unwrap_or_else(|_| r.to_string())),
        from: parse_bound("from", from).map_err(anyhow::Error::msg)?,
        to: parse_bound("to", to).map_err(anyhow::Error::msg)?,
    };
    let conn = open_journal(settings)?;
    let hours = usage::hourly_report(&conn, &filter, now, settings.emit.grace)?;
    let carries = usage::carry_report(&conn, &filter)?;
    match format {
        Format::Json => {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"hours": hours, "carries": carries})
                )?
            )?;
        }
        Format::Csv => {
            writeln!(
                out,
                "hour,resource,plan,dimension,quantity,records,carried_in,included,billed,outcome,usage_event_id,carried_to"
            )?;
            for h in &hours {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{}",
                    h.hour,
                    csv(&h.resource),
                    csv(&h.plan),
                    csv(&h.dimension),
                    h.quantity,
                    h.records,
                    crate::quantity::Micros(h.carried_in_micros),
                    h.included.as_deref().unwrap_or(""),
                    h.billed.as_deref().unwrap_or(""),
                    h.outcome,
                    h.usage_event_id.as_deref().unwrap_or(""),
                    h.carried_to.as_deref().unwrap_or("")
                )?;
            }
        }
        Format::Table => {
            if hours.is_empty() {
                writeln!(out, "no usage recorded in this range")?;
            } else {
                writeln!(
                    out,
                    "{:<20}  {:<36}  {:<10}  {:<14}  {:>14}  {:>7}  {:>12}  {:>10}  OUTCOME",
                    "HOUR",
                    "RESOURCE",
                    "PLAN",
                    "DIMENSION",
                    "QUANTITY",
                    "RECORDS",
                    "INCLUDED",
                    "BILLED"
                )?;
                for h in &hours {
                    let mut outcome = h.outcome.clone();
                    if let Some(t) = &h.carried_to {
                        outcome.push_str(&format!(" -> {t}"));
                    }
                    if h.carried_in_micros > 0 {
                        outcome.push_str(&format!(
                            " (incl. {} carried in)",
                            crate::quantity::Micros(h.carried_in_micros)
                        ));
                    }
                    writeln!(
                        out,
                        "{:<20}  {:<36}  {:<10}  {:<14}  {:>14}  {:>7}  {:>12}  {:>10}  {outcome}",
                        h.hour,
                        h.resource,
                        h.plan,
                        h.dimension,
                        h.quantity,
                        h.records,
                        h.included.as_deref().unwrap_or("-"),
                        h.billed.as_deref().unwrap_or("-")
                    )?;
                }
            }
            if !carries.is_empty() {
                writeln!(out, "\nCARRIED")?;
                for c in &carries {
                    writeln!(
                        out,
                        "{} -> {}  {}  {}  {}  ({})",
                        c.from_hour, c.to_hour, c.resource, c.dimension, c.quantity, c.reason
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn csv(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `meterd check-config` (offline part): prints a summary of the validated settings.
pub fn check_config(settings: &Settings, path: Option<&Path>) {
    println!(
        "configuration OK: {}",
        path.map(|p| p.display().to_string())
            .unwrap_or_else(|| settings.source.clone())
    );
    println!("  journal        {}", settings.journal.path.display());
    println!("  ingest         {}", settings.ingest.listen);
    match settings.marketplace.mode {
        config::MarketplaceMode::Emulator => println!(
            "  marketplace    the built-in emulator, started inside `meterd run` (nothing is billed)"
        ),
        config::MarketplaceMode::Azure => {
            println!(
                "  marketplace    Azure at {}",
                settings.marketplace.base_url
            )
        }
    }
    println!("  auth           {:?}", settings.marketplace.auth.kind);
    println!(
        "  schedule       {} (UTC), grace {}",
        settings.emit.schedule,
        config::format_duration(settings.emit.grace)
    );
    println!("  late usage     {:?}", settings.late_usage);
    println!(
        "  dimensions     {}",
        settings
            .dimensions
            .iter()
            .map(|d| d.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if settings.dimensions.is_empty() {
        println!("  warning: no [[dimensions]] declared; ingest will refuse every record");
    }
    for m in &settings.marketplace.missing_credentials {
        println!(
            "  warning: {m}\n           (`status`, `report` and `balance` work without it; `run`, `subscriptions`, \
             `reconcile` and `check-config --online` refuse)"
        );
    }
}

/// `meterd subscriptions`: fetches the whole list and prints it; explains 401/403.
pub async fn subscriptions(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: crate::clock::SharedClock,
) -> anyhow::Result<()> {
    let client = crate::emit::client(settings, env, clock)?;
    let list = client
        .list_subscriptions()
        .await
        .map_err(explain_call_error)?;
    if list.is_empty() {
        println!("no subscriptions (the marketplace answered with an empty list)");
        return Ok(());
    }
    println!(
        "{:<36}  {:<24}  {:<12}  {:<24}  TERM",
        "ID", "STATUS", "PLAN", "OFFER"
    );
    for s in &list {
        let term = s
            .term
            .as_ref()
            .map(|t| {
                format!(
                    "{} .. {} {}",
                    t.start_date
                        .map(|d| d.format("%Y-%m-%d").to_string())
                        .unwrap_or_default(),
                    t.end_date
                        .map(|d| d.format("%Y-%m-%d").to_string())
                        .unwrap_or_default(),
                    t.term_unit.clone().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let billable = if s.saas_subscription_status.trim() == "Subscribed" {
            ""
        } else {
            "  (not billable)"
        };
        println!(
            "{:<36}  {:<24}  {:<12}  {:<24}  {term}{billable}",
            s.id,
            s.saas_subscription_status.trim(),
            s.plan_id.as_deref().unwrap_or(""),
            s.offer_id.as_deref().unwrap_or("")
        );
    }
    println!("{} subscriptions", list.len());
    Ok(())
}

/// Settings for a command that talks to the marketplace. In emulator mode the marketplace is the in-process
/// emulator of the running daemon, on a port chosen at its start: its address comes from the daemon's
/// `GET /v1/status` (`emulator.base_url`).
pub async fn marketplace_settings(
    settings: &Settings,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Settings> {
    let mut settings = settings.clone();
    if settings.marketplace.mode != config::MarketplaceMode::Emulator {
        return Ok(settings);
    }
    let how = "in emulator mode the marketplace is the emulator inside the running daemon: start it with \
               `meterd run --emulator` (or `meterd run` with this configuration) and run this command again";
    let (status, body) = call_daemon(&settings, env, None, "GET", "/v1/status", None)
        .await
        .with_context(|| how.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let Some(base) = v["emulator"]["base_url"].as_str().filter(|_| status == 200) else {
        bail!(
            "the daemon at {} answered GET /v1/status with HTTP {status} and no emulator address; is it running \
             in emulator mode? ({how})",
            daemon_url(&settings)
        );
    };
    settings.marketplace.base_url = base.to_string();
    Ok(settings)
}

fn explain_call_error(e: crate::marketplace::client::CallError) -> anyhow::Error {
    match e.advice() {
        Some(a) => anyhow::anyhow!("{e}\n\n{a}"),
        None => anyhow::anyhow!("{e}"),
    }
}

/// `meterd check-config --online`: a token and the first subscription page.
pub async fn check_online(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: crate::clock::SharedClock,
) -> anyhow::Result<()> {
    let provider = crate::emit::token_provider(settings, env, clock.clone())?;
    match provider.token().await {
        Ok(t) => println!(
            "token: OK (valid until {})",
            t.expires_at().format("%Y-%m-%dT%H:%M:%SZ")
        ),
        Err(e) => {
            let advice = e.advice().map(|a| format!("\n\n{a}")).unwrap_or_default();
            bail!("token: FAILED: {e}{advice}");
        }
    }
    let client = crate::emit::client(settings, env, clock)?.with_max_pages(1);
    match client.list_subscriptions().await {
        Ok(list) => {
            println!("subscriptions: OK ({} on the first page)", list.len());
            Ok(())
        }
        // Only one page was asked for: a longer list ends with a page-limit error, which is fine here.
        Err(crate::marketplace::client::CallError::Fatal {
            kind: crate::marketplace::client::FatalKind::Protocol,
            message,
            ..
        }) if message.contains("page") => {
            println!("subscriptions: OK (first page read; more pages follow)");
            Ok(())
        }
        Err(e) => Err(explain_call_error(e)).context("subscriptions: FAILED"),
    }
}

/// Prints a flush answer (a pass summary) for people: one line for the pass, then a table of the events it
/// froze or settled (read from the journal when this user can read it), then the outcome counts.
pub fn print_flush(body: &str, events: Option<&[crate::journal::status::EventLine]>) {
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => {
            println!("{body}");
            return;
        }
    };
    if let Some(holder) = v["lease_held_by"].as_str() {
        println!("another emitter holds the lease ({holder}); nothing done");
        return;
    }
    println!(
        "pass at {}: froze {} hourly events, made {} calls sending {} events",
        v["started"].as_str().unwrap_or("?"),
        v["frozen"],
        v["calls"],
        v["sent"]
    );
    match events {
        Some([]) | None => {}
        Some(events) => {
            println!(
                "{:<20}  {:<36}  {:<14}  {:>14}  {:<20}  USAGE EVENT ID / LAST ERROR",
                "HOUR", "RESOURCE", "DIMENSION", "QUANTITY", "OUTCOME"
            );
            for e in events {
                println!(
                    "{:<20}  {:<36}  {:<14}  {:>14}  {:<20}  {}",
                    e.hour,
                    e.resource,
                    e.dimension,
                    e.quantity,
                    e.state,
                    e.usage_event_id
                        .as_deref()
                        .or(e.last_error.as_deref())
                        .unwrap_or("-")
                );
            }
        }
    }
    if let Some(o) = v["outcomes"].as_object().filter(|o| !o.is_empty()) {
        println!("outcomes");
        for (k, n) in o {
            println!("  {k:<20} {n:>8} events");
        }
    } else {
        println!("nothing was due (only closed hours are sent)");
    }
    println!("pending after the pass: {}", v["pending_after"]);
}

/// `meterd flush`: asks the daemon for a pass and prints what it did (`json`: the daemon's answer as is).
pub async fn flush(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    url: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let (status, body) = call_daemon(settings, env, url, "POST", "/v1/flush", None).await?;
    if status != 200 {
        println!("{body}");
        bail!("flush failed (HTTP {status})");
    }
    if json {
        println!("{body}");
        return Ok(());
    }
    let started = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["started"].as_str().map(str::to_string))
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&chrono::Utc));
    // The events themselves come from the journal; a user who cannot read it still gets the counts.
    let events = started.and_then(|t| {
        let j = crate::journal::open_read_only(&settings.journal.path).ok()?;
        crate::journal::status::events_since(&j, t).ok()
    });
    print_flush(&body, events.as_deref());
    Ok(())
}

/// `meterd balance`.
pub fn balance(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
    resource: &str,
    json: bool,
) -> anyhow::Result<()> {
    let resource = crate::ingest::validate::resource(resource).map_err(anyhow::Error::msg)?;
    let conn = open_journal(settings)?;
    let dims = crate::journal::billing::balance(&conn, settings, &resource, now)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"resource": resource, "dimensions": dims})
            )?
        );
        return Ok(());
    }
    println!("{resource}");
    println!(
        "{:<16}  {:<10}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  {:>10}  TERM",
        "DIMENSION",
        "PLAN",
        "INCLUDED",
        "CONSUMED",
        "REMAINING",
        "OVERAGE",
        "ACCEPTED",
        "REMAINDER"
    );
    for d in dims {
        println!(
            "{:<16}  {:<10}  {:>12}  {:>12}  {:>12}  {:>10}  {:>10}  {:>10}  {} .. {}",
            d.dimension,
            d.plan,
            d.included,
            d.consumed,
            d.remaining,
            d.overage_frozen,
            d.overage_accepted,
            d.carried_remainder,
            d.term_start,
            d.term_end
        );
    }
    Ok(())
}

/// A difference found by `reconcile`.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Difference {
    /// Resource.
    pub resource: String,
    /// Dimension.
    pub dimension: String,
    /// What meterd recorded as accepted (billing units).
    pub meterd: String,
    /// What the marketplace reports.
    pub marketplace: String,
}

/// Compares the marketplace's totals for `day` with the journal's accepted events; returns the differences.
pub async fn reconcile(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: crate::clock::SharedClock,
    day: &str,
) -> anyhow::Result<Vec<Difference>> {
    let date = chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
        .with_context(|| format!("--date `{day}` is not YYYY-MM-DD"))?;
    let start = date.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc();
    let end = start + chrono::Duration::days(1);
    let client = crate::emit::client(settings, env, clock)?;
    let theirs = client
        .get_usage_events(start, end)
        .await
        .map_err(explain_call_error)?;
    let mut market: BTreeMap<(String, String), i64> = BTreeMap::new();
    for d in theirs {
        let (Some(r), Some(dim)) = (d.usage_resource_id.clone(), d.dimension.clone()) else {
            continue;
        };
        // What was submitted and recorded; `processedQuantity` lags behind it.
        let q = crate::quantity::Micros::from_f64_rounded(
            d.submitted_quantity.or(d.processed_quantity).unwrap_or(0.0),
        )
        .map_or(0, |m| m.0);
        *market.entry((r.to_ascii_lowercase(), dim)).or_default() += q;
    }
    let conn = open_journal(settings)?;
    let ours = crate::journal::status::accepted_totals(&conn, start, end)?;
    let keys: std::collections::BTreeSet<_> = market.keys().chain(ours.keys()).cloned().collect();
    let mut diffs = Vec::new();
    for k in keys {
        let (a, b) = (
            ours.get(&k).copied().unwrap_or(0),
            market.get(&k).copied().unwrap_or(0),
        );
        if a != b {
            diffs.push(Difference {
                resource: k.0.clone(),
                dimension: k.1.clone(),
                meterd: crate::quantity::Micros(a).to_decimal_string(),
                marketplace: crate::quantity::Micros(b).to_decimal_string(),
            });
        }
    }
    Ok(diffs)
}

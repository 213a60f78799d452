//! The commands that talk to the marketplace (`subscriptions`, `check-config --online`, `reconcile`) and the
//! offline part of `check-config`.

use super::client::{call_daemon, daemon_url};
use super::setup::open_journal;
use crate::config::{self, Settings};
use crate::marketplace::types::SubscriptionStatus;
use anyhow::{Context, bail};
use std::collections::BTreeMap;
use std::path::Path;

/// `meterd check-config` (offline part): prints a summary of the validated settings.
pub(crate) fn check_config(settings: &Settings, path: Option<&Path>) {
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
    match &settings.fleet {
        // Never the URL (it may hold a password): where it came from and its TLS mode.
        Some(f) => {
            let tls = match crate::journal::pg::conn::parse(f.url.expose()) {
                Ok(t) => format!("sslmode {:?}", t.mode),
                Err(e) => format!("invalid: {e}"),
            };
            let from = match &f.url_file {
                Some(p) => p.display().to_string(),
                None => "$CREDENTIALS_DIRECTORY/postgres-url or METERD_FLEET__URL".to_string(),
            };
            println!(
                "  fleet          replica {}, PostgreSQL URL from {from} ({tls}), heartbeat {}, max_wait {}",
                f.replica_id,
                config::format_duration(f.heartbeat),
                config::format_duration(f.max_wait)
            );
        }
        None => println!("  fleet          off (single replica; no [fleet] PostgreSQL URL)"),
    }
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
pub(crate) async fn subscriptions(
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
        let billable = if s.status() == SubscriptionStatus::Subscribed {
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
pub(crate) async fn marketplace_settings(
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
pub(crate) async fn check_online(
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
    // In fleet mode what the fleet sent is in the shared journal (a replica's own journal sends nothing).
    let ours = match super::journal_views::fleet_read(settings, async |r| {
        r.accepted_totals(start, end).await
    }) {
        Some(totals) => totals?,
        None => open_journal(settings)?.accepted_totals(start, end)?,
    };
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

/// `meterd reconcile`: prints the differences (or that there are none); any difference is an error (exit 1).
pub(crate) async fn print_reconcile(
    settings: &Settings,
    env: &BTreeMap<String, String>,
    clock: crate::clock::SharedClock,
    date: &str,
) -> anyhow::Result<()> {
    let diffs = reconcile(settings, env, clock, date).await?;
    if diffs.is_empty() {
        println!(
            "{date}: no differences between meterd's accepted events and the marketplace's totals"
        );
        return Ok(());
    }
    println!(
        "{:<40}  {:<16}  {:>14}  {:>14}",
        "RESOURCE", "DIMENSION", "METERD", "MARKETPLACE"
    );
    for d in &diffs {
        println!(
            "{:<40}  {:<16}  {:>14}  {:>14}",
            d.resource, d.dimension, d.meterd, d.marketplace
        );
    }
    bail!("{} differences on {date}", diffs.len())
}

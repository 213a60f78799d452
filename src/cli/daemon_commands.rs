//! The commands about the daemon: `record` and `flush` (through its HTTP API) and `status` (from its journal, so
//! it works whether or not the daemon runs).

use super::client::call_daemon;
use super::setup::open_journal;
use crate::config::Settings;
use anyhow::bail;
use std::collections::BTreeMap;

/// `meterd record`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record(
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
    // The quantity goes as a JSON string of the decimal as typed, so the daemon parses it exactly (no f64 on the way).
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
pub(crate) fn status(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
    json: bool,
) -> anyhow::Result<()> {
    let (s, replicas) =
        match super::journal_views::fleet_read(settings, async |r| r.status(now).await) {
            Some(read) => read?,
            None => (open_journal(settings)?.status(now)?, None),
        };
    if json {
        let mut v = serde_json::to_value(&s)?;
        v["now"] = now.format("%Y-%m-%dT%H:%M:%SZ").to_string().into();
        if let Some(replicas) = &replicas {
            v["fleet"] = serde_json::json!({ "replicas": replicas });
        }
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
    if let Some(replicas) = &replicas {
        println!("fleet replicas");
        for r in replicas {
            println!(
                "  {:<20} heartbeat {} ({}), forward lag {}, unforwarded {}, leases {}",
                r.replica_id,
                r.heartbeat_at,
                if r.live { "live" } else { "gone" },
                human_secs(r.forward_lag_seconds),
                r.unforwarded,
                r.leases_held
            );
        }
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

/// Prints a flush answer (a pass summary) for people: one line for the pass, then a table of the events it
/// froze or settled (read from the journal when this user can read it), then the outcome counts.
pub(crate) fn print_flush(body: &str, events: Option<&[crate::journal::status::EventLine]>) {
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
pub(crate) async fn flush(
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
        j.events_since(t).ok()
    });
    print_flush(&body, events.as_deref());
    Ok(())
}

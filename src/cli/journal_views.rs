//! The journal views: `report` (hourly totals with their outcomes) and `balance` (a subscription's term).

use super::args::Format;
use super::setup::open_journal;
use crate::config::Settings;
use crate::ingest::usage_api::parse_bound;
use crate::journal::usage::ReportFilter;

/// In fleet mode (`[fleet]` with a URL), runs `read` against the shared journal, so every replica's command
/// answers the same; `None` in single-replica mode (the caller reads the local journal file as before). The
/// commands are synchronous and may be called from inside the CLI's runtime: the read runs on a thread of its
/// own with a small runtime of its own (a runtime cannot be started from within another).
pub(crate) fn fleet_read<T: Send>(
    settings: &Settings,
    read: impl AsyncFnOnce(&crate::journal::reads::Reads) -> Result<T, crate::journal::JournalError>
    + Send,
) -> Option<anyhow::Result<T>> {
    let fleet = settings.fleet.as_ref()?;
    let run = move || -> anyhow::Result<T> {
        let pg = crate::journal::pg::PgJournal::connect(&fleet.url, 1)?;
        let reads = crate::journal::reads::Reads::Fleet {
            pg,
            replica_timeout: fleet.replica_timeout,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(read(&reads))?)
    };
    Some(std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the fleet read panicked")))
    }))
}

/// `meterd report`.
pub(crate) fn report(
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
    let grace = settings.emit.grace;
    let (hours, carries) = match fleet_read(settings, async |r| {
        r.report(filter.clone(), now, grace).await
    }) {
        Some(read) => read?,
        None => open_journal(settings)?.report(&filter, now, grace)?,
    };
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
                "hour,resource,plan,dimension,quantity,records,carried_in,included,billed,outcome,usage_event_id,carried_to,pools"
            )?;
            for h in &hours {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{},{},{},{}",
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
                    h.carried_to.as_deref().unwrap_or(""),
                    csv(&h
                        .pools
                        .iter()
                        .map(|p| format!("{}={}", p.id, p.quantity))
                        .collect::<Vec<_>>()
                        .join(" "))
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
                    if !h.pools.is_empty() {
                        let covered: Vec<String> = h
                            .pools
                            .iter()
                            .map(|p| format!("{} {}", p.id, p.quantity))
                            .collect();
                        outcome.push_str(&format!(" [pools: {}]", covered.join(", ")));
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

/// `meterd balance`.
pub(crate) fn balance(
    settings: &Settings,
    now: chrono::DateTime<chrono::Utc>,
    resource: &str,
    json: bool,
) -> anyhow::Result<()> {
    let resource = crate::ingest::validate::resource(resource).map_err(anyhow::Error::msg)?;
    let shared = std::sync::Arc::new(settings.clone());
    let dims = match fleet_read(settings, async |r| {
        r.balance(shared.clone(), resource.clone(), now).await
    }) {
        Some(read) => read?,
        None => open_journal(settings)?.balance(settings, &resource, now)?,
    };
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
        println!("  usage this term: {}", d.usage);
        for p in &d.pools {
            println!("  {}", pool_line(p, now.timestamp()));
        }
    }
    Ok(())
}

/// "in 30 days", "in 5 hours", "in 20 minutes" from `now` to `at` (RFC 3339).
fn until(at: &str, now: i64) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(at) else {
        return format!("at {at}");
    };
    let secs = t.timestamp() - now;
    let (n, unit) = if secs >= 86_400 {
        (secs / 86_400, "day")
    } else if secs >= 3_600 {
        (secs / 3_600, "hour")
    } else {
        ((secs / 60).max(0), "minute")
    };
    format!("in {n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// One pool of a balance as a customer reads it: `pool prepaid (priority 1): 140 of 150 available, 10 used, ends
/// in 30 days`.
fn pool_line(p: &crate::journal::pools::PoolBalance, now: i64) -> String {
    let mut line = format!(
        "pool {} (priority {}): {} of {} available, {} used",
        p.id, p.priority, p.available, p.total, p.used
    );
    if p.voided {
        line.push_str(", voided");
    } else if let Some(e) = p.expires_at.as_deref() {
        let ended = chrono::DateTime::parse_from_rfc3339(e).is_ok_and(|t| t.timestamp() <= now);
        if ended {
            line.push_str(&format!(", ended {e}"));
        } else {
            line.push_str(&format!(", ends {}", until(e, now)));
        }
    }
    if !p.voided
        && let Some(r) = p.refreshes_at.as_deref()
    {
        line.push_str(&format!(", refreshes {}", until(r, now)));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_lines_say_available_of_total_and_when_it_ends_or_refreshes() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-03-10T00:00:00Z")
            .unwrap()
            .timestamp();
        let mut p = crate::journal::pools::PoolBalance {
            id: "prepaid".into(),
            priority: 1,
            scope: serde_json::json!({"resource": "r"}),
            total: "150".into(),
            available: "140".into(),
            used: "10".into(),
            effective_at: "2026-03-01T00:00:00Z".into(),
            expires_at: Some("2026-04-09T00:00:00Z".into()),
            refreshes_at: None,
            voided: false,
        };
        assert_eq!(
            pool_line(&p, now),
            "pool prepaid (priority 1): 140 of 150 available, 10 used, ends in 30 days"
        );
        p.expires_at = None;
        p.refreshes_at = Some("2026-03-22T00:00:00Z".into());
        assert_eq!(
            pool_line(&p, now),
            "pool prepaid (priority 1): 140 of 150 available, 10 used, refreshes in 12 days"
        );
        p.voided = true;
        assert!(pool_line(&p, now).ends_with(", voided"));
    }
}

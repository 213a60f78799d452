//! `meterd forward --journal PATH`: ships the records of a journal file that are still in its outbox (a replica
//! that died and never came back) into the fleet's PostgreSQL journal, from any host, then prints a summary.
//! Idempotent: a record already in the shared journal counts once; running it twice forwards nothing the second
//! time.

use crate::clock::SharedClock;
use crate::config::Settings;
use crate::journal::Journal;
use anyhow::Context;
use std::path::Path;

/// Runs `meterd forward`.
pub(crate) async fn forward(
    settings: &Settings,
    clock: SharedClock,
    path: &Path,
    replica: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    let Some(fleet) = &settings.fleet else {
        anyhow::bail!(
            "meterd forward needs the fleet's PostgreSQL URL: set [fleet] url_file in the configuration, pass the \
             credential `postgres-url` ($CREDENTIALS_DIRECTORY), or set METERD_FLEET__URL"
        );
    };
    if !path.exists() {
        anyhow::bail!(
            "no journal at {}; give the path of the dead replica's journal.db (its volume, or a copy)",
            path.display()
        );
    }
    let journal = Journal::open(path).with_context(|| {
        format!(
            "cannot open the journal at {} (is a meterd still running on it? stop it first)",
            path.display()
        )
    })?;
    let pg = crate::fleet::connect(fleet)?;
    let version = pg.migrate().await?;
    if version > crate::journal::pg::schema::current_version() {
        anyhow::bail!(
            "the fleet database has schema version {version}, newer than this meterd; use a newer meterd"
        );
    }
    let before = journal.outbox_stats().await?;
    let name = replica
        .map(str::to_string)
        .unwrap_or_else(|| format!("forward@{}", fleet.replica_id));
    let (done, result) =
        crate::fleet::drain(&journal, &pg, &name, settings, &clock, fleet.forward_batch).await;
    let left = journal.outbox_stats().await?.unforwarded;
    journal.checkpoint().await.ok();
    journal.close();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "journal": path.display().to_string(),
                "waiting": before.unforwarded,
                "forwarded": done.records(),
                "inserted": done.inserted,
                "duplicates": done.duplicates,
                "carried": done.carried,
                "left": left,
            })
        );
    } else {
        println!(
            "{}: {} record(s) were waiting; forwarded {} ({} new to the fleet, {} already there, {} carried into a \
             later hour); {} left",
            path.display(),
            before.unforwarded,
            done.records(),
            done.inserted,
            done.duplicates,
            done.carried,
            left
        );
    }
    result
        .context("forwarding stopped; run meterd forward again (it continues where it stopped)")?;
    Ok(())
}

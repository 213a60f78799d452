//! Finding and loading the configuration for a command, and opening the journal read-only.

use super::args::ConfigArg;
use crate::config::{self, Settings};
use anyhow::bail;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Finds the configuration file: `--config`, `$METERD_CONFIG`, `/etc/meterd/meterd.toml`, `./meterd.toml`.
pub(crate) fn find_config(arg: &ConfigArg, env: &BTreeMap<String, String>) -> Option<PathBuf> {
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
pub(crate) fn load_settings(
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
pub(crate) fn load_settings_without_credentials(
    arg: &ConfigArg,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Settings> {
    match find_config(arg, env) {
        Some(path) => Ok(config::load_for(&path, env, config::Credentials::Optional)?),
        None => Ok(Settings::dev_defaults(env)?),
    }
}

/// Prints, on stderr, what the marketplace commands would refuse (the journal commands work without it).
pub(crate) fn warn_missing_credentials(settings: &Settings) {
    for m in &settings.marketplace.missing_credentials {
        eprintln!(
            "warning: {m} (needed by `meterd run`, `subscriptions`, `reconcile` and `check-config --online`; \
             this command reads only the journal)"
        );
    }
}

pub(crate) fn open_journal(settings: &Settings) -> anyhow::Result<crate::journal::ReadOnlyJournal> {
    let j = crate::journal::open_read_only(&settings.journal.path)?;
    if let Some(note) = &j.note {
        eprintln!("{note}");
    }
    Ok(j)
}

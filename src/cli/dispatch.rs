//! Runs one parsed command line: loads the settings each command needs and calls it; errors go to stderr with
//! exit code 1.

use super::args::{Cli, Command};
use super::setup::{load_settings, load_settings_without_credentials, warn_missing_credentials};
use super::{daemon_commands, fleet_commands, journal_views, marketplace_commands, setup};
use crate::clock::{SharedClock, SystemClock};
use crate::config::process_env;
use std::process::ExitCode;
use std::sync::Arc;

/// The whole of the `meterd` binary after argument parsing: starts the async runtime and runs the command.
pub fn main(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let env = process_env();
    let clock: SharedClock = Arc::new(SystemClock);
    match cli.command {
        Command::Run { config, emulator } => {
            let mut settings = load_settings(&config, &env, emulator)?;
            if emulator {
                settings.marketplace.mode = crate::config::MarketplaceMode::Emulator;
            }
            crate::daemon::init_logging(settings.log_format, &settings.log_level);
            crate::daemon::run(settings, crate::daemon::RunContext { clock, env }).await
        }
        Command::Record {
            config,
            resource,
            dimension,
            quantity,
            time,
            id,
            plan,
            url,
        } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            daemon_commands::record(
                &settings,
                &env,
                url.as_deref(),
                &resource,
                &dimension,
                &quantity,
                time.as_deref(),
                id.as_deref(),
                plan.as_deref(),
            )
            .await
        }
        Command::Flush { config, json, url } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            daemon_commands::flush(&settings, &env, url.as_deref(), json).await
        }
        Command::Status { config, json } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            warn_missing_credentials(&settings);
            daemon_commands::status(&settings, clock.now(), json)
        }
        Command::Report {
            config,
            resource,
            from,
            to,
            format,
        } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            warn_missing_credentials(&settings);
            journal_views::report(
                &settings,
                clock.now(),
                resource.as_deref(),
                from.as_deref(),
                to.as_deref(),
                format,
                &mut std::io::stdout().lock(),
            )
        }
        Command::Balance {
            config,
            resource,
            json,
        } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            warn_missing_credentials(&settings);
            journal_views::balance(&settings, clock.now(), &resource, json)
        }
        Command::Reconcile { config, date } => {
            // No file: the development settings, whose marketplace is a `run --emulator` daemon's.
            let settings = load_settings(&config, &env, true)?;
            let settings = marketplace_commands::marketplace_settings(&settings, &env).await?;
            marketplace_commands::print_reconcile(&settings, &env, clock, &date).await
        }
        Command::Subscriptions { config } => {
            // No file: the development settings, whose marketplace is a `run --emulator` daemon's.
            let settings = load_settings(&config, &env, true)?;
            let settings = marketplace_commands::marketplace_settings(&settings, &env).await?;
            marketplace_commands::subscriptions(&settings, &env, clock).await
        }
        Command::CheckConfig { config, online } => {
            let path = setup::find_config(&config, &env);
            if online {
                // Talks to the marketplace: the credentials must be complete.
                let settings = load_settings(&config, &env, false)?;
                marketplace_commands::check_config(&settings, path.as_deref());
                let settings = marketplace_commands::marketplace_settings(&settings, &env).await?;
                marketplace_commands::check_online(&settings, &env, clock).await?;
            } else {
                if path.is_none() {
                    load_settings(&config, &env, false)?; // says where to put a file
                }
                let settings = load_settings_without_credentials(&config, &env)?;
                marketplace_commands::check_config(&settings, path.as_deref());
            }
            Ok(())
        }
        Command::Forward {
            config,
            journal,
            replica,
            json,
        } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            fleet_commands::forward(&settings, clock, &journal, replica.as_deref(), json).await
        }
        Command::Emulator(args) => {
            // Its log says where it listens (`--listen 127.0.0.1:0` picks a free port).
            crate::daemon::init_logging(crate::config::LogFormat::Text, "info");
            crate::emulator::run_cli(args).await
        }
    }
}

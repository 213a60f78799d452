//! The `meterd` binary: parse arguments, load configuration, call into the library.

use clap::Parser;
use meterd::cli::{
    Cli, Command, load_settings, load_settings_without_credentials, warn_missing_credentials,
};
use meterd::clock::{SharedClock, SystemClock};
use meterd::config::process_env;
use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
                settings.marketplace.mode = meterd::config::MarketplaceMode::Emulator;
            }
            meterd::daemon::init_logging(settings.log_format, &settings.log_level);
            meterd::daemon::run(settings, meterd::daemon::RunContext { clock, env }).await
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
            meterd::cli::record(
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
            meterd::cli::flush(&settings, &env, url.as_deref(), json).await
        }
        Command::Status { config, json } => {
            let settings = load_settings_without_credentials(&config, &env)?;
            warn_missing_credentials(&settings);
            meterd::cli::status(&settings, clock.now(), json)
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
            meterd::cli::report(
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
            meterd::cli::balance(&settings, clock.now(), &resource, json)
        }
        Command::Reconcile { config, date } => {
            // No file: the development settings, whose marketplace is a `run --emulator` daemon's.
            let settings = load_settings(&config, &env, true)?;
            let settings = meterd::cli::marketplace_settings(&settings, &env).await?;
            let diffs = meterd::cli::reconcile(&settings, &env, clock, &date).await?;
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
            anyhow::bail!("{} differences on {date}", diffs.len())
        }
        Command::Subscriptions { config } => {
            // No file: the development settings, whose marketplace is a `run --emulator` daemon's.
            let settings = load_settings(&config, &env, true)?;
            let settings = meterd::cli::marketplace_settings(&settings, &env).await?;
            meterd::cli::subscriptions(&settings, &env, clock).await
        }
        Command::CheckConfig { config, online } => {
            let path = meterd::cli::find_config(&config, &env);
            if online {
                // Talks to the marketplace: the credentials must be complete.
                let settings = load_settings(&config, &env, false)?;
                meterd::cli::check_config(&settings, path.as_deref());
                let settings = meterd::cli::marketplace_settings(&settings, &env).await?;
                meterd::cli::check_online(&settings, &env, clock).await?;
            } else {
                if path.is_none() {
                    load_settings(&config, &env, false)?; // says where to put a file
                }
                let settings = load_settings_without_credentials(&config, &env)?;
                meterd::cli::check_config(&settings, path.as_deref());
            }
            Ok(())
        }
        Command::Emulator(args) => meterd::emulator::run_cli(args).await,
    }
}

//! The `tributary` binary: command line, configuration, wiring, shutdown.

mod check;
mod cli;
mod config_error;
mod dba;
mod dead_letter;
mod format_stage;
mod http;
mod logging;
mod null_sink;
mod pipeline;
mod pretty;
mod replica;
mod settings;
mod startup;
mod tail;
mod validate;
mod verify;

use std::process::ExitCode;

use clap::Parser as _;

use crate::cli::{Cli, Command, ConfigArg, DeadLetterCommand, SlotsAction};
use crate::settings::ConfigError;
use crate::startup::StartupError;

/// Records are allocated on the reader's thread and freed on the sink's:
/// mimalloc handles that cross-thread traffic with less work than the
/// system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            let (code, text) = if let Some(config) = err.downcast_ref::<ConfigError>() {
                (2, format!("invalid configuration: {config}"))
            } else if let Some(startup) = err.downcast_ref::<StartupError>() {
                (startup.exit_code(), startup.to_string())
            } else {
                (1, tributary_envelope::error_text::one_line(err.as_ref()))
            };
            report(&text);
            ExitCode::from(code)
        }
    }
}

/// Prints the failure that ends the process, once: as the last JSON log
/// line when logs are JSON (log collectors parse them), else as a plain
/// `error:` line.
fn report(text: &str) {
    if logging::is_json() {
        tracing::error!(error = text, "tributary stopped");
    } else {
        eprintln!("error: {text}");
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run { config } => {
            let validated = load(&config)?;
            logging::init(&validated.settings.log);
            let region = validated.region.clone();
            let code = pipeline::run(validated)
                .await
                .map_err(|err| startup::stream_not_found(err, &region))?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Tail {
            config,
            stream,
            from,
            follow,
            pretty,
            validate,
        } => tail::run(&config.config, &stream, from, follow, pretty, validate).await,
        Command::Verify {
            config,
            table,
            json,
            since,
        } => {
            let request = verify::Request {
                tables: &table,
                as_json: json,
                since,
            };
            verify::run(&load(&config)?, request).await
        }
        Command::Check { config, json } => Ok(check::run(&load(&config)?, json).await),
        Command::Setup {
            config,
            apply,
            admin_url,
        } => dba::setup(&load(&config)?, apply, admin_url.as_deref()).await,
        Command::Schema { config, table } => dba::table_schema(&load(&config)?, &table).await,
        Command::Slots { config, action } => match action {
            None | Some(SlotsAction::List) => dba::list_slots(&load(&config)?).await,
            Some(SlotsAction::Drop { name }) => dba::drop_slot(&load(&config)?, &name).await,
        },
        Command::DeadLetter { command } => match command {
            DeadLetterCommand::List { config, json } => dead_letter::list(&config.config, json),
            DeadLetterCommand::Replay { config, reason, id } => {
                dead_letter::replay(&config.config, reason.as_deref(), id.as_deref()).await
            }
        },
    }
}

/// Loads and validates the configuration named by `-c`.
fn load(config: &ConfigArg) -> anyhow::Result<settings::Validated> {
    let explicit = config.config.as_os_str() != "config.toml";
    let file = config.config.exists().then_some(config.config.as_path());
    Ok(
        settings::load::<settings::Settings>(&config.config, explicit)?
            .validate()
            .map_err(|err| config_error::locate(err, file))?,
    )
}

//! The `tributary` binary: command line, configuration, wiring, shutdown.

mod cli;
mod dead_letter;
mod logging;
mod null_sink;
mod pipeline;
mod settings;
mod tail;

use std::process::ExitCode;

use clap::Parser as _;

use crate::cli::{Cli, Command, DeadLetterCommand};
use crate::settings::ConfigError;

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
            if let Some(config) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: invalid configuration: {config}");
                return ExitCode::from(2);
            }
            tracing::error!(error = format!("{err:#}"), "tributary failed");
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run { config } => {
            let explicit = config.config.as_os_str() != "config.toml";
            let validated =
                settings::load::<settings::Settings>(&config.config, explicit)?.validate()?;
            logging::init(&validated.settings.log);
            let code = pipeline::run(validated).await?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::Tail {
            config,
            stream,
            from,
            follow,
        } => tail::run(&config.config, &stream, from, follow).await,
        Command::DeadLetter { command } => match command {
            DeadLetterCommand::List { config, json } => dead_letter::list(&config.config, json),
            DeadLetterCommand::Replay { config, reason, id } => {
                dead_letter::replay(&config.config, reason.as_deref(), id.as_deref()).await
            }
        },
    }
}

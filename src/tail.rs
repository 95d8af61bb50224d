//! `tributary tail`: prints a stream's envelopes, one JSON object per line
//! (or, with `--pretty`, indented over several lines).

use std::path::Path;

use std::io::IsTerminal as _;

use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use tributary_kinesis::{StartFrom, tail};

use crate::cli::From;
use crate::settings::SinkSettings;
use crate::startup::StartupError;

/// Bytes buffered between the reader and the `--pretty` printer.
const PIPE_BYTES: usize = 64 * 1024;

/// Only `[sink]` matters to `tail`; other sections are read by `run`.
#[derive(Debug, Deserialize)]
struct TailSettings {
    sink: Option<SinkSettings>,
}

/// A Kinesis client for the region and endpoint of `[sink]` (region from
/// `AWS_REGION`, else us-east-1, when the config has none), once the AWS
/// credentials were found.
pub async fn checked_client_for(
    sink: Option<&SinkSettings>,
) -> anyhow::Result<tributary_kinesis::Client> {
    let region = sink
        .and_then(|s| s.region.clone())
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_owned());
    let endpoint = sink.and_then(|s| s.endpoint_url.clone());
    Ok(tributary_kinesis::checked_client(
        &region,
        endpoint.as_deref(),
        tributary_kinesis::DEFAULT_REQUEST_TIMEOUT,
        tributary_kinesis::DEFAULT_CONNECT_TIMEOUT,
    )
    .await
    .map_err(StartupError)?)
}

/// Reads the stream and writes it to stdout; exit code 0, or with
/// `validate` 1 when an envelope does not conform to the schema.
pub async fn run(
    config: &Path,
    stream: &str,
    from: From,
    follow: bool,
    pretty: bool,
    validate: bool,
) -> anyhow::Result<u8> {
    // Only `[sink]` is read: `tail` works with a partial config or none.
    let settings: TailSettings = crate::settings::load(config, false)?;
    // Credentials and the stream are checked first, so that a mistake is one
    // message naming `--stream`, not an error from the first shard read.
    let client = checked_client_for(settings.sink.as_ref()).await?;
    tributary_kinesis::check_stream(&client, stream, "--stream")
        .await
        .map_err(StartupError)?;
    let from = match from {
        From::TrimHorizon => StartFrom::TrimHorizon,
        From::Latest => StartFrom::Latest,
    };
    let mut stdout = tokio::io::stdout();
    if !pretty && !validate {
        tokio::select! {
            result = tail(&client, stream, from, follow, &mut stdout) => { result?; }
            _ = tokio::signal::ctrl_c() => {}
        }
        stdout.flush().await?;
        return Ok(0);
    }
    // tail writes JSON lines into a pipe; the validator checks them and the
    // printer re-indents them, each passing them on.
    let tables = if validate {
        table_schemas(config).await
    } else {
        None
    };
    let colour = std::io::stdout().is_terminal();
    let (mut lines, reader) = tokio::io::duplex(PIPE_BYTES);
    let consumer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        if !validate {
            crate::pretty::print_lines(reader, &mut stdout, colour).await?;
            return anyhow::Ok(None);
        }
        if !pretty {
            return Ok(Some(
                crate::validate::pass_lines(reader, &mut stdout, tables).await?,
            ));
        }
        let (mut checked, printed) = tokio::io::duplex(PIPE_BYTES);
        let printer =
            tokio::spawn(
                async move { crate::pretty::print_lines(printed, &mut stdout, colour).await },
            );
        let summary = crate::validate::pass_lines(reader, &mut checked, tables).await?;
        drop(checked);
        printer.await??;
        Ok(Some(summary))
    });
    tokio::select! {
        result = tail(&client, stream, from, follow, &mut lines) => { result?; }
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(lines);
    match consumer.await?? {
        Some(summary) => {
            eprintln!("{}", crate::validate::verdict(summary));
            Ok(u8::from(summary.invalid > 0))
        }
        None => Ok(0),
    }
}

/// The tables' schemas `--validate` checks values against: those of the
/// configured source; `None` (said on stderr) when there is no usable
/// source configuration or its catalogue cannot be read.
async fn table_schemas(config: &Path) -> Option<crate::validate::TableSchemas> {
    let loaded = crate::settings::load::<crate::settings::Settings>(config, false)
        .map_err(anyhow::Error::from)
        .and_then(|settings| Ok(settings.validate()?));
    let validated = match loaded {
        Ok(validated) => validated,
        Err(err) => {
            eprintln!("note: no usable [source] in the config ({err}): column types not checked");
            return None;
        }
    };
    match &validated.source {
        crate::settings::SourceConfig::Postgres(cfg) => {
            match tributary_postgres::replication::connect_sql(&cfg.connection).await {
                Ok(client) => Some(crate::validate::TableSchemas::postgres(client)),
                Err(err) => {
                    eprintln!(
                        "note: cannot read the source's catalogue ({err}): column types not checked"
                    );
                    None
                }
            }
        }
        crate::settings::SourceConfig::Mysql(cfg) => match cfg.opts.connect().await {
            Ok(conn) => Some(crate::validate::TableSchemas::mysql(conn)),
            Err(err) => {
                eprintln!(
                    "note: cannot read the source's catalogue ({err}): column types not checked"
                );
                None
            }
        },
    }
}

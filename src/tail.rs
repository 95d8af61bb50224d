//! `tributary tail`: prints a stream's envelopes, one JSON object per line.

use std::path::Path;

use serde::Deserialize;
use tributary_kinesis::{StartFrom, tail};

use crate::cli::From;
use crate::settings::SinkSettings;

/// Only `[sink]` matters to `tail`; other sections are read by `run`.
#[derive(Debug, Deserialize)]
struct TailSettings {
    sink: Option<SinkSettings>,
}

/// A Kinesis client for the region and endpoint of `[sink]` (region from
/// `AWS_REGION`, else us-east-1, when the config has none).
pub async fn client_for(sink: Option<&SinkSettings>) -> tributary_kinesis::Client {
    let region = sink
        .and_then(|s| s.region.clone())
        .or_else(|| std::env::var("AWS_REGION").ok())
        .unwrap_or_else(|| "us-east-1".to_owned());
    let endpoint = sink.and_then(|s| s.endpoint_url.clone());
    tributary_kinesis::build_client(&region, endpoint.as_deref()).await
}

/// Reads the stream and writes it to stdout; exit code 0.
pub async fn run(config: &Path, stream: &str, from: From, follow: bool) -> anyhow::Result<u8> {
    // Only `[sink]` is read: `tail` works with a partial config or none.
    let settings: TailSettings = crate::settings::load(config, false)?;
    let client = client_for(settings.sink.as_ref()).await;
    let from = match from {
        From::TrimHorizon => StartFrom::TrimHorizon,
        From::Latest => StartFrom::Latest,
    };
    let mut stdout = tokio::io::stdout();
    tokio::select! {
        result = tail(&client, stream, from, follow, &mut stdout) => { result?; }
        _ = tokio::signal::ctrl_c() => {}
    }
    use tokio::io::AsyncWriteExt as _;
    stdout.flush().await?;
    Ok(0)
}

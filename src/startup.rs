//! Start-up checks of `tributary run`, before the source is touched: the
//! AWS credential chain resolves and a fixed sink stream exists and is
//! ACTIVE. A failure here stops the process before the replication slot is
//! created or read, with one message that names the fix (exit 2, or 1 when
//! starting again later may work: Kinesis unreachable, a stream still being
//! created).
//!
//! Streams named by a template are only known once a change arrives; the
//! sink checks them then, and [`stream_not_found`] gives that failure the
//! message and exit code of the start-up check.

use std::time::Duration;

use tracing::info;
use tributary_kinesis::{KinesisError, PreflightError, check_stream, checked_client};

use crate::settings::{Settings, SinkKind};

/// The config key that names the sink's stream.
const STREAM_KEY: &str = "sink.stream";

/// A start-up check failed.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StartupError(#[from] pub PreflightError);

impl StartupError {
    /// 2 when a person must change something, 1 when a restart may do.
    pub fn exit_code(&self) -> u8 {
        if self.0.needs_a_person() { 2 } else { 1 }
    }
}

/// Checks the sink's credentials and (fixed) stream.
pub async fn check(settings: &Settings, region: &str) -> Result<(), StartupError> {
    let sink = &settings.sink;
    if sink.kind != SinkKind::Kinesis {
        return Ok(());
    }
    let client = checked_client(
        region,
        sink.endpoint_url.as_deref(),
        Duration::from_secs(sink.request_timeout_secs),
        Duration::from_secs(sink.connect_timeout_secs),
    )
    .await?;
    let Some(stream) = sink.stream.as_deref().filter(|s| !s.contains('{')) else {
        info!("aws credentials found; streams named by the template are checked when first used");
        return Ok(());
    };
    let summary = check_stream(&client, stream, STREAM_KEY).await?;
    info!(
        stream = %summary.name,
        open_shards = summary.open_shards,
        max_record_bytes = summary.max_record_bytes,
        "aws credentials found; kinesis stream is active"
    );
    Ok(())
}

/// The start-up message for a sink failure that is a missing stream (one
/// named by a template, first used after start-up); other errors unchanged.
pub fn stream_not_found(err: anyhow::Error, region: &str) -> anyhow::Error {
    let missing = err.chain().find_map(|cause| match cause.downcast_ref() {
        Some(KinesisError::StreamNotFound { stream, .. }) => Some(stream.clone()),
        _ => None,
    });
    match missing {
        Some(stream) => StartupError(PreflightError::stream_not_found(
            region, &stream, STREAM_KEY,
        ))
        .into(),
        None => err,
    }
}

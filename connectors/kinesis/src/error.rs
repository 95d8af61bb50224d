//! The crate's one error type.
//!
//! Everything a retry can fix (timeouts, throttling, 5xx, network errors) is
//! retried inside the sink and never surfaces here; a [`KinesisError`] is
//! what stops the sink for good: a configuration mistake, a missing stream,
//! a call Kinesis refuses for a reason a retry cannot change, or a
//! dead-letter store that cannot be written. Records not yet reported done
//! when it is returned stay unacknowledged, so the source sends them again
//! after a restart.

use std::path::PathBuf;

use thiserror::Error;

/// A boxed error from the AWS SDK, kept whole as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error that stops the Kinesis sink or the tail reader.
#[derive(Debug, Error)]
pub enum KinesisError {
    /// A configuration value is out of range; `key` names the config key.
    #[error("{key}: {message}")]
    Config {
        /// The config key, e.g. `sink.quota.share`.
        key: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The stream does not exist (or is being deleted).
    #[error("kinesis stream `{stream}` does not exist: create it or fix `sink.stream`")]
    StreamNotFound {
        /// The stream's name.
        stream: String,
        /// What Kinesis answered, when it answered.
        #[source]
        source: Option<BoxError>,
    },
    /// A call failed for a reason a retry cannot fix (access denied, a
    /// validation error, a disabled KMS key, ...).
    #[error("kinesis {operation} on stream `{stream}` failed and a retry cannot fix it")]
    Permanent {
        /// The API operation, e.g. `PutRecords`.
        operation: &'static str,
        /// The stream's name.
        stream: String,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// A call failed for a reason that may go away (throttling, a timeout,
    /// a 5xx, a network error). The sink retries these itself; only
    /// one-shot helpers such as [`crate::describe_stream`] return it.
    #[error("kinesis {operation} on stream `{stream}` failed (a retry may succeed)")]
    Transient {
        /// The API operation, e.g. `ListShards`.
        operation: &'static str,
        /// The stream's name.
        stream: String,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// Kinesis described the stream in a way the sink cannot use (no open
    /// shard, a hash key range that is not a 128-bit number, ...).
    #[error("kinesis stream `{stream}`: {message}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What is wrong.
        message: String,
    },
    /// The dead-letter store could not be written or synced: the record
    /// cannot be reported done, so the sink stops rather than drop it.
    #[error("dead-letter store {}: cannot write", path.display())]
    DeadLetter {
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Writing the tail reader's output failed.
    #[error("writing the tail output failed")]
    Output(#[source] std::io::Error),
    /// A lane task panicked or was cancelled.
    #[error("a kinesis lane task failed")]
    Task(#[source] tokio::task::JoinError),
}

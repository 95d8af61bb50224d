//! What the sink needs to know, filled by the binary from `[sink]`,
//! `[sink.quota]` and `[state]`.
//!
//! The binary parses the TOML; this crate only checks ranges
//! ([`KinesisSinkConfig::validate`], pure: no network, no files) and names
//! the offending key in its error.

use std::path::PathBuf;
use std::time::Duration;

use tributary_envelope::Format;

use crate::error::KinesisError;

/// Kinesis' per-shard write quota in records per second.
pub const DEFAULT_RECORDS_PER_SHARD_PER_SEC: u32 = 1_000;
/// Kinesis' per-shard write quota in bytes (data + partition key) per second.
pub const DEFAULT_BYTES_PER_SHARD_PER_SEC: u32 = 1_048_576;
/// How long one attempt of a Kinesis call may take.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// PutRecords calls a shard's lane may have in flight at once.
pub const DEFAULT_MAX_IN_FLIGHT_PER_SHARD: usize = 2;
/// The most `sink.max_in_flight_per_shard` may ask for.
pub const MAX_IN_FLIGHT_PER_SHARD: usize = 16;
/// How long opening a connection to Kinesis may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the sink retries.
///
/// Whole-call failures that a retry can fix and entry failures Kinesis
/// calls retryable (`ProvisionedThroughputExceededException`,
/// `InternalFailure`) are retried without limit, with exponential backoff
/// from `initial_backoff` doubling up to `max_backoff`, each delay jittered
/// to between half and all of its value; entries refused inside an answered
/// call wait much less (from at most 20 ms, doubling only while whole calls
/// are refused, up to 500 ms), since the quota does the pacing. Any other
/// entry error is retried
/// `max_rejections` times in all; then the record goes to the dead-letter
/// store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first backoff delay.
    pub initial_backoff: Duration,
    /// The longest backoff delay.
    pub max_backoff: Duration,
    /// Attempts before a record with a non-retryable entry error is
    /// dead-lettered.
    pub max_rejections: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_rejections: 10,
        }
    }
}

/// The Kinesis sink's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct KinesisSinkConfig {
    /// `sink.region`: the AWS region of the streams.
    pub region: String,
    /// `sink.endpoint_url`: an emulator or VPC endpoint instead of the
    /// region's public one.
    pub endpoint_url: Option<String>,
    /// `sink.quota.records_per_shard_per_sec`: the shard's record quota.
    pub records_per_shard_per_sec: u32,
    /// `sink.quota.bytes_per_shard_per_sec`: the shard's byte quota (data
    /// plus partition key).
    pub bytes_per_shard_per_sec: u32,
    /// `sink.quota.share`: the fraction of each shard's quota this producer
    /// may use, in (0, 1].
    pub share: f64,
    /// `sink.aggregation`: pack the records of a shard into KPL aggregated
    /// records (many envelopes per Kinesis record).
    pub aggregation: bool,
    /// `sink.max_in_flight_per_shard`: PutRecords calls one shard's lane
    /// may have in flight at once (a key is never in two of them). Far from
    /// the region, about the round trip divided by 10 ms keeps latency low.
    pub max_in_flight_per_shard: usize,
    /// The directory of `dead-letters.jsonl` (under `state.dir`).
    pub dead_letter_dir: PathBuf,
    /// `dead_letter.stream`: a Kinesis stream for dead letters instead of
    /// the file (which keeps only what that stream cannot hold).
    pub dead_letter_stream: Option<String>,
    /// How long one attempt of a Kinesis call may take.
    pub request_timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// Backoff and give-up settings.
    pub retry: RetryPolicy,
    /// `sink.format`: the layout of the transaction markers the sink
    /// writes (records arrive already in it).
    pub format: Format,
}

impl KinesisSinkConfig {
    /// A config with every default: full quotas, share 1.0, two calls in
    /// flight per shard, 30 s requests,
    /// 5 s connects, the default [`RetryPolicy`].
    pub fn new(region: impl Into<String>, dead_letter_dir: impl Into<PathBuf>) -> Self {
        Self {
            region: region.into(),
            endpoint_url: None,
            records_per_shard_per_sec: DEFAULT_RECORDS_PER_SHARD_PER_SEC,
            bytes_per_shard_per_sec: DEFAULT_BYTES_PER_SHARD_PER_SEC,
            share: 1.0,
            aggregation: false,
            max_in_flight_per_shard: DEFAULT_MAX_IN_FLIGHT_PER_SHARD,
            dead_letter_dir: dead_letter_dir.into(),
            dead_letter_stream: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry: RetryPolicy::default(),
            format: Format::Tributary,
        }
    }

    /// Checks every range; the error names the key and the fix.
    pub fn validate(&self) -> Result<(), KinesisError> {
        fn bad(key: &'static str, message: impl Into<String>) -> Result<(), KinesisError> {
            Err(KinesisError::Config {
                key,
                message: message.into(),
            })
        }
        if self.region.trim().is_empty() {
            return bad("sink.region", "must not be empty (e.g. \"us-east-1\")");
        }
        if !(self.share > 0.0 && self.share <= 1.0) {
            return bad(
                "sink.quota.share",
                format!("must be > 0 and <= 1, got {}", self.share),
            );
        }
        if self.records_per_shard_per_sec == 0 {
            return bad("sink.quota.records_per_shard_per_sec", "must be at least 1");
        }
        if self.bytes_per_shard_per_sec == 0 {
            return bad("sink.quota.bytes_per_shard_per_sec", "must be at least 1");
        }
        if !(1..=MAX_IN_FLIGHT_PER_SHARD).contains(&self.max_in_flight_per_shard) {
            return bad(
                "sink.max_in_flight_per_shard",
                format!(
                    "must be 1 to {MAX_IN_FLIGHT_PER_SHARD}, got {}",
                    self.max_in_flight_per_shard
                ),
            );
        }
        if self.request_timeout.is_zero() {
            return bad("sink.request_timeout_secs", "must be at least 1");
        }
        if self.connect_timeout.is_zero() {
            return bad("sink.connect_timeout_secs", "must be at least 1");
        }
        if self.retry.initial_backoff.is_zero()
            || self.retry.max_backoff < self.retry.initial_backoff
        {
            return bad(
                "retry policy",
                "initial backoff must be longer than zero and at most the max backoff",
            );
        }
        if self.retry.max_rejections == 0 {
            return bad("retry policy", "max_rejections must be at least 1");
        }
        if self
            .dead_letter_stream
            .as_deref()
            .is_some_and(|s| s.trim().is_empty())
        {
            return bad("dead_letter.stream", "must not be empty when set");
        }
        if self.dead_letter_dir.as_os_str().is_empty() {
            return bad("state.dir", "must not be empty");
        }
        Ok(())
    }

    /// The record rate one lane may use: `records_per_shard_per_sec * share`.
    pub fn lane_records_per_sec(&self) -> f64 {
        f64::from(self.records_per_shard_per_sec) * self.share
    }

    /// The byte rate one lane may use: `bytes_per_shard_per_sec * share`.
    pub fn lane_bytes_per_sec(&self) -> f64 {
        f64::from(self.bytes_per_shard_per_sec) * self.share
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_values_name_their_key() {
        let config = KinesisSinkConfig::new("us-east-1", "/tmp/state");
        config.validate().unwrap();
        assert_eq!(config.lane_records_per_sec(), 1000.0);

        for (share, ok) in [
            (0.0, false),
            (-0.5, false),
            (1.01, false),
            (f64::NAN, false),
            (0.25, true),
            (1.0, true),
        ] {
            let mut c = config.clone();
            c.share = share;
            match c.validate() {
                Ok(()) => assert!(ok, "share {share} accepted"),
                Err(KinesisError::Config { key, .. }) => {
                    assert!(!ok, "share {share} refused");
                    assert_eq!(key, "sink.quota.share");
                }
                Err(other) => panic!("unexpected {other}"),
            }
        }

        for (calls, ok) in [(0, false), (1, true), (16, true), (17, false)] {
            let mut c = config.clone();
            c.max_in_flight_per_shard = calls;
            match c.validate() {
                Ok(()) => assert!(ok, "{calls} calls accepted"),
                Err(err) => {
                    assert!(!ok, "{calls} calls refused: {err}");
                    assert!(err.to_string().starts_with("sink.max_in_flight_per_shard:"));
                }
            }
        }

        let mut c = config.clone();
        c.records_per_shard_per_sec = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(
            err.starts_with("sink.quota.records_per_shard_per_sec:"),
            "{err}"
        );
    }
}

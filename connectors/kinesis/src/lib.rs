//! Tributary's Kinesis Data Streams sink and the `tail` reader.
//!
//! This crate is the "kinesis writer" box of the dataflow: it receives
//! encoded envelopes ([`tributary_envelope::Record`]) from the router, in
//! source order, writes them to their streams with PutRecords, and reports
//! each one done to the ack tracker once Kinesis returned a sequence number
//! for it or it was synced to the dead-letter store. The ack tracker turns
//! those reports into the source position that may be acknowledged.
//!
//! Inside, a dispatcher ([`KinesisSink`]) sends every record to the lane of
//! its shard (MD5 of the partition key against the shards' hash key
//! ranges); each lane batches, paces itself with `governor` quotas, and
//! retries failed entries together with the later records of their keys so
//! that per-key order survives a partial failure.
//!
//! Files:
//! - `config.rs`: [`KinesisSinkConfig`] and [`RetryPolicy`], range checks.
//! - `batch.rs`: cutting a lane's next call, plain or aggregated.
//! - `aggregate.rs`: the KPL aggregated record format, both ways.
//! - `client.rs`: the SDK client with timeouts and the standard retry policy.
//! - `shards.rs`: reading a stream's shards, routing a key to its lane.
//! - `sink.rs`: [`KinesisSink`], the dispatcher and the [`Sink`] impl.
//! - `lane.rs`: one shard's batching, sending and ordered retries.
//! - `markers.rs`: transaction markers, `begin`/`end` per shard a
//!   transaction touched (`sink.transaction_markers`).
//! - `quota.rs`: per-lane record and byte rate limits, adaptive slow-down.
//! - `retry.rs`: sorting failures, backoff with jitter, rate-limited warnings.
//! - `dead_letter.rs`: [`DeadLetterStore`], the JSON Lines file of records
//!   Kinesis can never take, and reading it back.
//! - `dead_letter_stream.rs`: the same entries sent to `[dead_letter] stream`.
//! - `replay.rs`: [`replay`], sending dead-lettered entries again.
//! - `metrics.rs`: the metric names the writer records (`metrics` facade).
//! - `tail.rs`: [`tail`], reading a stream back as JSON Lines.
//! - `preflight.rs`: [`checked_client`] and [`check_stream`], the
//!   start-up checks that run before the source is touched.
//! - `write_probe.rs`: [`probe_write`], whether a write is permitted,
//!   asked without writing (`tributary check`).
//! - `error.rs`: [`KinesisError`].
//!
//! [`Sink`]: tributary_envelope::Sink

mod aggregate;
mod batch;
mod client;
mod config;
mod dead_letter;
mod dead_letter_stream;
mod error;
mod lane;
mod markers;
pub mod metrics;
mod preflight;
mod quota;
mod replay;
mod retry;
mod shards;
mod sink;
mod tail;
mod write_probe;

#[cfg(test)]
mod sink_tests;

pub use aggregate::{AggregationError, MAGIC as AGGREGATION_MAGIC, SubRecord, deaggregate};
/// The SDK's Kinesis client, which [`build_client`] returns.
pub use aws_sdk_kinesis::Client;
pub use client::{build_client, build_client_with_timeouts, build_sink_client};
pub use config::{
    DEFAULT_BYTES_PER_SHARD_PER_SEC, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_IN_FLIGHT_PER_SHARD,
    DEFAULT_RECORDS_PER_SHARD_PER_SEC, DEFAULT_REQUEST_TIMEOUT, KinesisSinkConfig,
    MAX_IN_FLIGHT_PER_SHARD, RetryPolicy,
};
pub use dead_letter::{
    DEAD_LETTER_FILE, DeadLetterEntry, DeadLetterReason, DeadLetterStore, DeadLetters,
    REPLAYED_FILE, mark_replayed, read_dead_letters,
};
pub use error::{BoxError, KinesisError};
pub use lane::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
pub use preflight::{
    CREDENTIAL_CHAIN, CREDENTIALS_TIMEOUT, PreflightError, StreamSummary, check_stream,
    checked_client,
};
pub use replay::{ReplayReport, replay};
pub use shards::{
    DEFAULT_MAX_RECORD_BYTES, ShardMap, ShardRange, StreamInfo, describe_stream, hash_key,
};
pub use sink::KinesisSink;
pub use tail::{RecordVisitor, StartFrom, read_stream, tail};
pub use write_probe::{WriteProbe, probe_write};

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
//! - `client.rs`: the SDK client with timeouts and the standard retry policy.
//! - `shards.rs`: reading a stream's shards, routing a key to its lane.
//! - `sink.rs`: [`KinesisSink`], the dispatcher and the [`Sink`] impl.
//! - `lane.rs`: one shard's batching, sending and ordered retries.
//! - `quota.rs`: per-lane record and byte rate limits, adaptive slow-down.
//! - `retry.rs`: sorting failures, backoff with jitter, rate-limited warnings.
//! - `dead_letter.rs`: [`DeadLetterStore`], the JSON Lines file of records
//!   Kinesis can never take.
//! - `tail.rs`: [`tail`], reading a stream back as JSON Lines.
//! - `preflight.rs`: [`checked_client`] and [`check_stream`], the
//!   start-up checks that run before the source is touched.
//! - `error.rs`: [`KinesisError`].
//!
//! [`Sink`]: tributary_envelope::Sink

mod client;
mod config;
mod dead_letter;
mod error;
mod lane;
mod preflight;
mod quota;
mod retry;
mod shards;
mod sink;
mod tail;

#[cfg(test)]
mod sink_tests;

pub use client::{build_client, build_client_with_timeouts, build_sink_client};
pub use config::{
    DEFAULT_BYTES_PER_SHARD_PER_SEC, DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECORDS_PER_SHARD_PER_SEC,
    DEFAULT_REQUEST_TIMEOUT, KinesisSinkConfig, RetryPolicy,
};
pub use dead_letter::{DEAD_LETTER_FILE, DeadLetterStore};
pub use error::{BoxError, KinesisError};
pub use lane::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
pub use preflight::{
    CREDENTIAL_CHAIN, CREDENTIALS_TIMEOUT, PreflightError, StreamSummary, check_stream,
    checked_client,
};
pub use shards::{
    DEFAULT_MAX_RECORD_BYTES, ShardMap, ShardRange, StreamInfo, describe_stream, hash_key,
};
pub use sink::KinesisSink;
pub use tail::{StartFrom, tail};

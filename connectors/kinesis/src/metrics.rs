//! The Kinesis writer's metrics, recorded through the `metrics` facade: the
//! binary installs an exporter (the HTTP `/metrics` endpoint), tests a
//! debugging recorder; without one, recording costs next to nothing.
//!
//! Names are constants, never literals at call sites. Labels: `stream`
//! everywhere but `source` on the source lag, `shard` where a value is per lane, `code` for refused
//! entries, `reason` for dead letters, `kind` (`entry` or `call`) for
//! retries.

/// Counter: records (envelopes) Kinesis accepted.
pub const RECORDS_SENT: &str = "tributary_kinesis_records_sent_total";
/// Counter: bytes (data + partition key, as sent) Kinesis accepted.
pub const BYTES_SENT: &str = "tributary_kinesis_bytes_sent_total";
/// Histogram: seconds from sending a PutRecords call to its answer.
pub const PUT_RECORDS_SECONDS: &str = "tributary_kinesis_put_records_seconds";
/// Counter: request entries Kinesis refused, by error `code`.
pub const ENTRIES_REFUSED: &str = "tributary_kinesis_entries_refused_total";
/// Gauge: a lane's adaptive rate factor (1 = the full quota).
pub const RATE_FACTOR: &str = "tributary_kinesis_rate_factor";
/// Histogram: seconds a lane waited for its quota before a call.
pub const LIMITER_WAIT_SECONDS: &str = "tributary_kinesis_limiter_wait_seconds";
/// Counter: retries, `kind` = `entry` (records of a partly refused call
/// sent again) or `call` (a whole call sent again).
pub const RETRIES: &str = "tributary_kinesis_retries_total";
/// Counter: records written to the dead-letter store, by `reason`.
pub const DEAD_LETTERS: &str = "tributary_kinesis_dead_letters_total";
/// Gauge: records queued in a lane and not yet accepted.
pub const QUEUED_RECORDS: &str = "tributary_kinesis_queued_records";
/// Gauge: bytes of the records queued in a lane and not yet accepted.
pub const QUEUED_BYTES: &str = "tributary_kinesis_queued_bytes";

/// Histogram: seconds from a change's commit on the source (`commit_ts`)
/// to Kinesis accepting its record, per streamed change (snapshot rows and
/// transaction markers excluded). Label `stream`.
pub const COMMIT_TO_ACK_SECONDS: &str = "tributary_commit_to_ack_seconds";
/// Gauge: how far behind the source the stream is: the commit-to-ack time
/// of the newest change Kinesis accepted, set at each acceptance (it does
/// not grow while the source is idle). Label `source`.
pub const SOURCE_LAG_SECONDS: &str = "tributary_source_lag_seconds";

/// Every metric name, for exporters that describe them up front.
pub const ALL: [&str; 12] = [
    COMMIT_TO_ACK_SECONDS,
    SOURCE_LAG_SECONDS,
    RECORDS_SENT,
    BYTES_SENT,
    PUT_RECORDS_SECONDS,
    ENTRIES_REFUSED,
    RATE_FACTOR,
    LIMITER_WAIT_SECONDS,
    RETRIES,
    DEAD_LETTERS,
    QUEUED_RECORDS,
    QUEUED_BYTES,
];

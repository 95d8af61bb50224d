//! The contract between the pipeline and a destination.

use std::future::Future;

use tokio::sync::mpsc;

use crate::ack::Acks;
use crate::record::Record;

/// A destination for records.
///
/// Guarantees a sink must keep:
/// - every record received is eventually reported through
///   [`Acks::done`] exactly when it is durably accepted by the destination or
///   written to the dead-letter store, never before;
/// - records with the same `stream` and `partition_key` reach the destination
///   in the order received, and a retried record is never the last occurrence
///   before a newer record of the same key;
/// - a record with [`Record::fan_out`] is written once to every shard
///   (partition) of its stream, each copy ahead of every record received
///   after it that lands on that shard, and is reported done when its last
///   copy is (a sink without shards writes it once);
/// - `run` returns `Ok` only after `input` is closed and every received record
///   is reported done (this is the graceful flush).
///
/// A sink may assume records arrive in source order with increasing `seq`,
/// and must tolerate duplicates after a restart (delivery is at-least-once).
pub trait Sink: Send + 'static {
    /// What stops the sink for good.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Delivers batches from `input` until it closes, then flushes.
    fn run(
        self,
        input: mpsc::Receiver<Vec<Record>>,
        acks: Acks,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

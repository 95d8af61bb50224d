//! `sink.kind = "null"`: accepts and discards every record. Used by the
//! benchmark to measure the source side alone, and for dry runs.

use std::convert::Infallible;

use tokio::sync::mpsc;
use tributary_envelope::{Acks, Record, Sink};

/// A sink that reports every record done as soon as it arrives.
#[derive(Debug, Default)]
pub struct NullSink {
    /// Records discarded.
    pub records: u64,
}

impl Sink for NullSink {
    type Error = Infallible;

    async fn run(
        mut self,
        mut input: mpsc::Receiver<Vec<Record>>,
        acks: Acks,
    ) -> Result<(), Infallible> {
        while let Some(batch) = input.recv().await {
            self.records += batch.len() as u64;
            acks.done(batch.iter());
        }
        tracing::info!(records = self.records, "null sink discarded records");
        Ok(())
    }
}

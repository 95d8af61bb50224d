//! `[dead_letter] stream`: dead-letter entries written to a Kinesis stream
//! instead of the local file, for deployments whose local disk does not
//! outlive the pod.
//!
//! Each entry (the same JSON object as a line of the file) becomes one
//! record, under the original partition key (or `dead-letter` when that
//! key is itself the problem). An entry the dead-letter stream cannot hold
//! either (a `too_large` record is too large for a stream with the same
//! limit) goes to the local file, so nothing is dropped. The records are
//! reported done only once the dead-letter stream accepted them: failures
//! a retry can fix are retried without limit (the pipeline waits, as it
//! does for the main stream); anything else stops the sink.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use tokio::sync::OnceCell;
use tracing::warn;
use tributary_envelope::record::MAX_PARTITION_KEY_CHARS;

use crate::config::RetryPolicy;
use crate::error::KinesisError;
use crate::lane::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
use crate::retry::{Backoff, Failure, WARN_EVERY, WarnGate, classify};
use crate::shards::describe_stream;

/// The partition key of an entry whose own key Kinesis cannot take.
const FALLBACK_KEY: &str = "dead-letter";

/// One rendered entry on its way to the dead-letter stream.
#[derive(Debug)]
pub(crate) struct StreamEntry {
    pub(crate) partition_key: String,
    /// The entry's JSON object, without the newline.
    pub(crate) data: Vec<u8>,
}

impl StreamEntry {
    /// An entry under `partition_key`, or the fallback key when Kinesis
    /// would refuse that one.
    pub(crate) fn new(partition_key: &str, data: Vec<u8>) -> Self {
        let usable =
            !partition_key.is_empty() && partition_key.chars().count() <= MAX_PARTITION_KEY_CHARS;
        Self {
            partition_key: if usable {
                partition_key.to_owned()
            } else {
                FALLBACK_KEY.to_owned()
            },
            data,
        }
    }

    fn weight(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// The dead-letter stream and what the writer knows about it.
#[derive(Debug)]
pub(crate) struct DeadLetterStream {
    client: Client,
    name: String,
    retry: RetryPolicy,
    max_record_bytes: OnceCell<usize>,
}

impl DeadLetterStream {
    pub(crate) fn new(client: Client, name: String, retry: RetryPolicy) -> Self {
        Self {
            client,
            name,
            retry,
            max_record_bytes: OnceCell::new(),
        }
    }

    /// The stream's name.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// True when `entry` fits in one record of the stream (read once).
    pub(crate) async fn fits(&self, entry: &StreamEntry) -> Result<bool, KinesisError> {
        Ok(entry.weight() <= self.max_record_bytes().await?)
    }

    /// The stream's largest record (data and key), read once.
    pub(crate) async fn max_record_bytes(&self) -> Result<usize, KinesisError> {
        let max = self
            .max_record_bytes
            .get_or_try_init(|| async {
                describe_stream(&self.client, &self.name)
                    .await
                    .map(|info| info.max_record_bytes)
            })
            .await?;
        Ok(*max)
    }

    /// Writes every entry, retrying what a retry can fix until it is all
    /// accepted; a permanent failure is an error.
    pub(crate) async fn write(&self, mut entries: Vec<StreamEntry>) -> Result<(), KinesisError> {
        let mut backoff = Backoff::new(self.retry);
        let mut warnings = WarnGate::new(WARN_EVERY);
        while !entries.is_empty() {
            let count = batch_len(&entries);
            let records: Vec<PutRecordsRequestEntry> = entries[..count]
                .iter()
                .map(|e| {
                    PutRecordsRequestEntry::builder()
                        .data(Blob::new(e.data.clone()))
                        .partition_key(e.partition_key.clone())
                        .build()
                        .expect("data and partition key are set")
                })
                .collect();
            let answer = self
                .client
                .put_records()
                .stream_name(&self.name)
                .set_records(Some(records))
                .send()
                .await;
            let problem = match answer {
                Ok(output) if output.records().len() == count => {
                    // Keep the refused entries (in order), drop the accepted.
                    let mut first_error = None;
                    let mut kept = Vec::new();
                    for (entry, result) in entries.drain(..count).zip(output.records()) {
                        if result.sequence_number().is_some() {
                            continue;
                        }
                        first_error.get_or_insert_with(|| {
                            format!(
                                "{}: {}",
                                result.error_code().unwrap_or("MissingSequenceNumber"),
                                result.error_message().unwrap_or_default()
                            )
                        });
                        kept.push(entry);
                    }
                    kept.append(&mut entries);
                    entries = kept;
                    first_error
                }
                Ok(output) => Some(format!(
                    "putrecords answered {} results for {count} records",
                    output.records().len()
                )),
                Err(err) => {
                    let failure = classify(&err, |e| match e {
                        PutRecordsError::ProvisionedThroughputExceededException(_)
                        | PutRecordsError::KmsThrottlingException(_) => Some(Failure::Throttled),
                        PutRecordsError::InternalFailureException(_) => Some(Failure::Transient),
                        _ => None,
                    });
                    if failure == Failure::Permanent {
                        return Err(KinesisError::Permanent {
                            operation: "PutRecords (dead-letter stream)",
                            stream: self.name.clone(),
                            source: err.into(),
                        });
                    }
                    Some(aws_sdk_kinesis::error::DisplayErrorContext(&err).to_string())
                }
            };
            let Some(problem) = problem else {
                backoff.reset();
                continue;
            };
            let delay = backoff.next_delay();
            if let Some(suppressed) = warnings.allow() {
                warn!(
                    stream = %self.name, waiting = entries.len(), suppressed,
                    retry_in_ms = delay.as_millis() as u64, error = %problem,
                    "cannot write to the dead-letter stream yet; retrying"
                );
            }
            tokio::time::sleep(delay.min(Duration::from_secs(10))).await;
        }
        Ok(())
    }
}

/// How many entries from the front fit in one call.
fn batch_len(entries: &[StreamEntry]) -> usize {
    let (mut count, mut bytes) = (0, 0);
    for entry in entries.iter().take(MAX_BATCH_RECORDS) {
        if count > 0 && bytes + entry.weight() > MAX_BATCH_BYTES {
            break;
        }
        count += 1;
        bytes += entry.weight();
    }
    count
}

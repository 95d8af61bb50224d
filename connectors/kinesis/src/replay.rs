//! `tributary dead-letter replay`: sends dead-lettered entries to their
//! streams again, outside the pipeline (the dead-letter store is the
//! source, Kinesis the destination, and no source position is involved).
//!
//! Per-key order is the rule here too: entries are taken in file order (per
//! key, the order the source produced them), one call carries at most one
//! entry of a key, and once an entry of a key is not accepted, the later
//! entries of that key stay in the store too (else the older one, replayed
//! next time, would land after them). Entries still larger than the
//! stream's maximum record size are not sent at all. Throttling and
//! transient failures are retried a few times with backoff; a permanent
//! failure (missing stream, access denied) ends the replay with an error,
//! after the accepted entries were reported.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::ProvideErrorMetadata as _;
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;

use crate::config::RetryPolicy;
use crate::dead_letter::DeadLetterEntry;
use crate::error::KinesisError;
use crate::lane::{MAX_BATCH_BYTES, MAX_BATCH_RECORDS};
use crate::retry::{Backoff, Failure, classify, entry_error_is_retryable};
use crate::shards::describe_stream;

/// How often an entry (or a whole call) is tried before replay gives up on it.
const MAX_TRIES: u32 = 6;

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplayReport {
    /// Offsets of the entries Kinesis accepted.
    pub accepted: Vec<u64>,
    /// Offsets of the entries left in the store, each with why.
    pub kept: Vec<(u64, String)>,
}

/// One entry on its way.
struct Attempt<'e> {
    entry: &'e DeadLetterEntry,
    data: Vec<u8>,
    tries: u32,
}

/// Sends `entries` (in file order) again; see the module doc for the rules.
/// Returns what was accepted and what was kept, or the permanent error that
/// stopped the replay together with the report so far.
pub async fn replay(
    client: &Client,
    entries: &[&DeadLetterEntry],
) -> Result<ReplayReport, (ReplayReport, KinesisError)> {
    let mut report = ReplayReport::default();
    let mut by_stream: HashMap<&str, Vec<&DeadLetterEntry>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for entry in entries {
        let list = by_stream.entry(entry.stream.as_str()).or_insert_with(|| {
            order.push(entry.stream.as_str());
            Vec::new()
        });
        list.push(entry);
    }
    for stream in order {
        if let Err(err) = replay_stream(client, stream, &by_stream[stream], &mut report).await {
            return Err((report, err));
        }
    }
    Ok(report)
}

async fn replay_stream(
    client: &Client,
    stream: &str,
    entries: &[&DeadLetterEntry],
    report: &mut ReplayReport,
) -> Result<(), KinesisError> {
    let limit = describe_stream(client, stream).await?.max_record_bytes;
    let mut held: HashSet<&str> = HashSet::new();
    let mut queue: Vec<Attempt> = Vec::new();
    for &entry in entries {
        let key = entry.partition_key.as_str();
        if held.contains(key) {
            report.kept.push((entry.offset, held_message()));
            continue;
        }
        let why = match entry.data() {
            Ok(data) if data.len() + key.len() > limit => Some(format!(
                "still too large: {} bytes, the stream takes at most {limit}",
                data.len() + key.len()
            )),
            Ok(_) if key.is_empty() => Some("the partition key is empty".to_owned()),
            Ok(data) => {
                queue.push(Attempt {
                    entry,
                    data,
                    tries: 0,
                });
                None
            }
            Err(err) => Some(err),
        };
        if let Some(why) = why {
            held.insert(key);
            report.kept.push((entry.offset, why));
        }
    }
    let mut backoff = Backoff::new(RetryPolicy {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        max_rejections: MAX_TRIES,
    });
    while !queue.is_empty() {
        let batch = next_batch(&queue);
        let records: Vec<PutRecordsRequestEntry> =
            batch.iter().map(|&i| request_entry(&queue[i])).collect();
        let answer = client
            .put_records()
            .stream_name(stream)
            .set_records(Some(records))
            .send()
            .await;
        let mut settled: Vec<(usize, Result<(), String>)> = Vec::new();
        match answer {
            Ok(output) if output.records().len() == batch.len() => {
                for (&i, result) in batch.iter().zip(output.records()) {
                    match (result.error_code(), result.sequence_number()) {
                        (None, Some(_)) => settled.push((i, Ok(()))),
                        (code, _) => {
                            let code = code.unwrap_or("MissingSequenceNumber");
                            queue[i].tries += 1;
                            if !entry_error_is_retryable(code) || queue[i].tries >= MAX_TRIES {
                                let message = result.error_message().unwrap_or_default();
                                settled.push((i, Err(format!("{code}: {message}"))));
                            }
                        }
                    }
                }
            }
            Ok(output) => {
                if backoff.failures() + 1 >= MAX_TRIES {
                    return Err(KinesisError::Stream {
                        stream: stream.to_owned(),
                        message: format!(
                            "putrecords answered {} results for {} records, {MAX_TRIES} times",
                            output.records().len(),
                            batch.len()
                        ),
                    });
                }
            }
            Err(err) => {
                let failure = classify(&err, |e| match e {
                    PutRecordsError::ProvisionedThroughputExceededException(_) => {
                        Some(Failure::Throttled)
                    }
                    PutRecordsError::InternalFailureException(_) => Some(Failure::Transient),
                    _ => None,
                });
                if failure == Failure::Permanent || backoff.failures() + 1 >= MAX_TRIES {
                    return Err(KinesisError::Permanent {
                        operation: "PutRecords",
                        stream: stream.to_owned(),
                        source: format!(
                            "{}: {}",
                            err.code().unwrap_or("error"),
                            aws_sdk_kinesis::error::DisplayErrorContext(&err)
                        )
                        .into(),
                    });
                }
            }
        }
        let progressed = settled.iter().any(|(_, r)| r.is_ok());
        // Remove settled entries back to front so the indices stay valid.
        settled.sort_by_key(|&(i, _)| std::cmp::Reverse(i));
        for (i, result) in settled {
            let attempt = queue.remove(i);
            match result {
                Ok(()) => report.accepted.push(attempt.entry.offset),
                Err(why) => {
                    held.insert(attempt.entry.partition_key.as_str());
                    report.kept.push((attempt.entry.offset, why));
                }
            }
        }
        // Later entries of a key given up on stay in the store.
        queue.retain(|a| {
            let keep = !held.contains(a.entry.partition_key.as_str());
            if !keep {
                report.kept.push((a.entry.offset, held_message()));
            }
            keep
        });
        if progressed {
            backoff.reset();
        } else if !queue.is_empty() {
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
    report.accepted.sort_unstable();
    Ok(())
}

fn held_message() -> String {
    "held: an earlier entry of its key stays in the store".to_owned()
}

/// Indices into `queue` for the next call: in order, at most one entry per
/// key, within the call limits.
fn next_batch(queue: &[Attempt]) -> Vec<usize> {
    let mut keys: HashSet<&str> = HashSet::new();
    let mut blocked: HashSet<&str> = HashSet::new();
    let (mut batch, mut bytes) = (Vec::new(), 0);
    for (i, attempt) in queue.iter().enumerate() {
        let key = attempt.entry.partition_key.as_str();
        let weight = attempt.data.len() + key.len();
        if blocked.contains(key) || keys.contains(key) {
            // A key's later entries wait for its earlier one.
            blocked.insert(key);
            continue;
        }
        if batch.len() == MAX_BATCH_RECORDS
            || (!batch.is_empty() && bytes + weight > MAX_BATCH_BYTES)
        {
            break;
        }
        keys.insert(key);
        batch.push(i);
        bytes += weight;
    }
    batch
}

fn request_entry(attempt: &Attempt) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .data(Blob::new(attempt.data.clone()))
        .partition_key(attempt.entry.partition_key.clone())
        .set_explicit_hash_key(attempt.entry.explicit_hash_key.clone())
        .build()
        .expect("data and partition key are set")
}

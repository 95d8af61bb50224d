//! One ordered lane per (stream, shard): batching, quotas, PutRecords and
//! ordered retries.
//!
//! The dispatcher hands a lane the records whose partition key hashes into
//! its shard, in source order. The lane keeps them in one queue and loops:
//! cut a batch off the front (at most 500 records, 5 MiB and the quota's
//! burst), wait for the quota, send it, and sort the answer:
//! - accepted entries (a sequence number) are reported done;
//! - failed entries go back to the front of the queue, in their original
//!   order, together with every later entry of the same batch that shares a
//!   partition key with a retried one, accepted or not. Nothing newer of the
//!   lane is sent before them, so the last copy of every record of a key
//!   lands in source order (PutRecords itself does not keep order when part
//!   of a call fails);
//! - an entry error Kinesis does not call retryable is tried
//!   `max_rejections` times in all, then the record is dead-lettered.
//!
//! A lane has one call in flight. That is enough: one 500-record call per
//! round trip already goes past a shard's 1,000 records/s once the round
//! trip is under half a second, and the quota is the limit after that. It
//! also keeps the retry rule simple: the batch being retried is always the
//! oldest thing the lane has not delivered.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tracing::{debug, warn};
use tributary_envelope::error_text::one_line;
use tributary_envelope::record::MAX_PARTITION_KEY_CHARS;
use tributary_envelope::{Acks, Record};

use crate::config::RetryPolicy;
use crate::dead_letter::DeadLetterStore;
use crate::error::KinesisError;
use crate::quota::LaneQuota;
use crate::retry::{
    Backoff, Failure, WARN_EVERY, WarnGate, classify, entry_error_is_retryable,
    entry_error_is_throttle,
};

/// Kinesis' limit on records per PutRecords call.
pub const MAX_BATCH_RECORDS: usize = 500;
/// Kinesis' limit on the data and partition keys of one PutRecords call.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;

/// What a lane needs besides its input.
pub(crate) struct LaneSetup {
    pub(crate) client: Client,
    pub(crate) stream: Arc<str>,
    pub(crate) shard_id: Arc<str>,
    pub(crate) max_record_bytes: usize,
    pub(crate) quota: LaneQuota,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letters: Arc<DeadLetterStore>,
    pub(crate) acks: Acks,
}

/// A record waiting in a lane.
struct Pending {
    record: Record,
    /// Times Kinesis refused it with a non-retryable entry error.
    rejections: u32,
}

/// What happens to one entry of an answered batch.
enum Outcome {
    Done,
    Retry,
    DeadLetter(String),
}

/// One shard's ordered writer.
pub(crate) struct Lane {
    setup: LaneSetup,
    input: mpsc::UnboundedReceiver<Record>,
    queue: VecDeque<Pending>,
    open: bool,
    backoff: Backoff,
    call_warnings: WarnGate,
    entry_warnings: WarnGate,
}

impl Lane {
    pub(crate) fn new(setup: LaneSetup, input: mpsc::UnboundedReceiver<Record>) -> Self {
        let backoff = Backoff::new(setup.retry);
        Self {
            setup,
            input,
            queue: VecDeque::new(),
            open: true,
            backoff,
            call_warnings: WarnGate::new(WARN_EVERY),
            entry_warnings: WarnGate::new(WARN_EVERY),
        }
    }

    /// Delivers records until the input closes and the queue is empty.
    pub(crate) async fn run(mut self) -> Result<(), KinesisError> {
        loop {
            self.fill().await?;
            if self.queue.is_empty() {
                debug!(stream = %self.setup.stream, shard = %self.setup.shard_id, "lane drained");
                return Ok(());
            }
            let (count, bytes) = self.next_batch();
            self.setup.quota.acquire(count, bytes).await;
            let entries: Vec<PutRecordsRequestEntry> = self
                .queue
                .iter()
                .take(count)
                .map(|p| entry(&p.record))
                .collect();
            let answer = self
                .setup
                .client
                .put_records()
                .stream_name(&*self.setup.stream)
                .set_records(Some(entries))
                .send()
                .await;
            match answer {
                Ok(output) => self.on_answer(count, &output).await?,
                Err(err) => self.on_call_error(count, err).await?,
            }
        }
    }

    /// Takes whatever the dispatcher has queued; waits when there is
    /// nothing to send yet. Records Kinesis could never take are
    /// dead-lettered on the way in.
    async fn fill(&mut self) -> Result<(), KinesisError> {
        loop {
            let mut refused = Vec::new();
            if self.queue.is_empty() && self.open {
                match self.input.recv().await {
                    Some(record) => self.admit(record, &mut refused),
                    None => self.open = false,
                }
            }
            while self.open {
                match self.input.try_recv() {
                    Ok(record) => self.admit(record, &mut refused),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => self.open = false,
                }
            }
            if !refused.is_empty() {
                self.dead_letter(&refused).await?;
            }
            if !self.queue.is_empty() || !self.open {
                return Ok(());
            }
        }
    }

    fn admit(&mut self, record: Record, refused: &mut Vec<(Record, String)>) {
        match self.never_writable(&record) {
            Some(reason) => refused.push((record, reason)),
            None => self.queue.push_back(Pending {
                record,
                rejections: 0,
            }),
        }
    }

    /// Why Kinesis would refuse `record` whatever happens, if it would.
    fn never_writable(&self, record: &Record) -> Option<String> {
        let size = record.weight();
        if size > self.setup.max_record_bytes {
            return Some(format!(
                "record of {size} bytes (data + partition key) exceeds the stream's maximum record size of {} bytes",
                self.setup.max_record_bytes
            ));
        }
        if record.partition_key.is_empty() {
            return Some("the partition key is empty".to_owned());
        }
        let chars = record.partition_key.chars().count();
        if chars > MAX_PARTITION_KEY_CHARS {
            return Some(format!(
                "the partition key has {chars} characters; kinesis allows at most {MAX_PARTITION_KEY_CHARS}"
            ));
        }
        None
    }

    /// How many records from the front go into the next call, and their bytes.
    fn next_batch(&self) -> (usize, usize) {
        let max_records = MAX_BATCH_RECORDS.min(self.setup.quota.max_records());
        let max_bytes = MAX_BATCH_BYTES.min(self.setup.quota.max_bytes());
        let (mut count, mut bytes) = (0, 0);
        for pending in &self.queue {
            let weight = pending.record.weight();
            if count == max_records || (count > 0 && bytes + weight > max_bytes) {
                break;
            }
            count += 1;
            bytes += weight;
        }
        (count, bytes)
    }

    /// Sorts an answer to a call that carried the first `count` queued records.
    async fn on_answer(
        &mut self,
        count: usize,
        output: &PutRecordsOutput,
    ) -> Result<(), KinesisError> {
        let results = output.records();
        if results.len() != count {
            let delay = self.backoff.next_delay();
            if let Some(suppressed) = self.call_warnings.allow() {
                warn!(
                    stream = %self.setup.stream, shard = %self.setup.shard_id,
                    sent = count, answered = results.len(), suppressed,
                    retry_in_ms = delay.as_millis() as u64,
                    "kinesis answered putrecords with the wrong number of results; sending the batch again"
                );
            }
            tokio::time::sleep(delay).await;
            return Ok(());
        }
        let all_accepted = output.failed_record_count().unwrap_or(0) == 0
            && results
                .iter()
                .all(|r| r.error_code().is_none() && r.sequence_number().is_some());
        if all_accepted {
            self.setup
                .acks
                .done(self.queue.iter().take(count).map(|p| &p.record));
            self.queue.drain(..count);
            self.backoff.reset();
            self.setup.quota.accepted();
            return Ok(());
        }
        self.on_partial_failure(count, output).await
    }

    async fn on_partial_failure(
        &mut self,
        count: usize,
        output: &PutRecordsOutput,
    ) -> Result<(), KinesisError> {
        let mut batch: Vec<Pending> = self.queue.drain(..count).collect();
        let sorted = sort_answer(
            &mut batch,
            output.records(),
            self.setup.retry.max_rejections,
        );
        self.setup.acks.done(
            batch
                .iter()
                .zip(&sorted.outcomes)
                .filter(|(_, o)| matches!(o, Outcome::Done))
                .map(|(p, _)| &p.record),
        );
        let mut refused: Vec<(Record, String)> = Vec::new();
        // Back to the front, oldest first: push in reverse.
        for (pending, outcome) in batch.into_iter().zip(sorted.outcomes).rev() {
            match outcome {
                Outcome::Done => {}
                Outcome::Retry => self.queue.push_front(pending),
                Outcome::DeadLetter(reason) => refused.push((pending.record, reason)),
            }
        }
        refused.reverse();
        if !refused.is_empty() {
            self.dead_letter(&refused).await?;
        }
        if sorted.throttled {
            self.setup.quota.throttled();
        }
        if sorted.retrying == 0 {
            self.backoff.reset();
            return Ok(());
        }
        let delay = self.backoff.next_delay();
        if let Some(suppressed) = self.entry_warnings.allow() {
            warn!(
                stream = %self.setup.stream, shard = %self.setup.shard_id,
                sent = count, failed = sorted.failed, retrying = sorted.retrying,
                error_code = %sorted.first_error.0, error = %sorted.first_error.1,
                rate_factor = self.setup.quota.factor(), suppressed,
                retry_in_ms = delay.as_millis() as u64,
                "kinesis refused part of a putrecords call; retrying the failed records and the later records of their keys"
            );
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// A whole call failed: retry the same batch after a backoff, or stop.
    async fn on_call_error(
        &mut self,
        count: usize,
        err: SdkError<PutRecordsError>,
    ) -> Result<(), KinesisError> {
        let failure = classify(&err, |e| match e {
            PutRecordsError::ProvisionedThroughputExceededException(_)
            | PutRecordsError::KmsThrottlingException(_) => Some(Failure::Throttled),
            PutRecordsError::InternalFailureException(_) => Some(Failure::Transient),
            PutRecordsError::ResourceNotFoundException(_)
            | PutRecordsError::AccessDeniedException(_)
            | PutRecordsError::InvalidArgumentException(_)
            | PutRecordsError::DryRunOperationException(_)
            | PutRecordsError::KmsAccessDeniedException(_)
            | PutRecordsError::KmsDisabledException(_)
            | PutRecordsError::KmsInvalidStateException(_)
            | PutRecordsError::KmsNotFoundException(_)
            | PutRecordsError::KmsOptInRequired(_) => Some(Failure::Permanent),
            _ => None,
        });
        match failure {
            Failure::Permanent => {
                let stream = self.setup.stream.to_string();
                if let Some(PutRecordsError::ResourceNotFoundException(_)) = err.as_service_error()
                {
                    return Err(KinesisError::StreamNotFound {
                        stream,
                        source: Some(err.into()),
                    });
                }
                return Err(KinesisError::Permanent {
                    operation: "PutRecords",
                    stream,
                    source: err.into(),
                });
            }
            Failure::Throttled => self.setup.quota.throttled(),
            Failure::Transient => {}
        }
        let delay = self.backoff.next_delay();
        if let Some(suppressed) = self.call_warnings.allow() {
            warn!(
                stream = %self.setup.stream, shard = %self.setup.shard_id,
                records = count, attempt = self.backoff.failures(),
                throttled = failure == Failure::Throttled,
                rate_factor = self.setup.quota.factor(), suppressed,
                retry_in_ms = delay.as_millis() as u64,
                error = %one_line(&err),
                "putrecords failed; retrying the batch"
            );
        }
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Writes records to the dead-letter store, then reports them done.
    async fn dead_letter(&self, refused: &[(Record, String)]) -> Result<(), KinesisError> {
        self.setup
            .dead_letters
            .write(refused.iter().map(|(r, why)| (r, why.as_str())))
            .await?;
        for (record, reason) in refused {
            warn!(
                stream = %record.stream, shard = %self.setup.shard_id,
                partition_key = %record.partition_key, seq = record.seq, reason = %reason,
                path = %self.setup.dead_letters.path().display(),
                "record written to the dead-letter store"
            );
        }
        self.setup.acks.done(refused.iter().map(|(r, _)| r));
        Ok(())
    }
}

/// An answered batch, sorted entry by entry.
struct SortedAnswer {
    outcomes: Vec<Outcome>,
    failed: usize,
    retrying: usize,
    throttled: bool,
    /// The first entry error: (code, message).
    first_error: (String, String),
}

/// Decides each entry's fate. An accepted entry is done unless an earlier
/// entry of its key is retried (then it goes again too, to land after it);
/// a failed entry is retried, or dead-lettered once a non-retryable error
/// has refused it `max_rejections` times (counted in `batch`).
///
/// A copy of a fanned-out record (a truncate) is ordered against every
/// entry of the lane, not just its key: it goes again when anything before
/// it does, and when it goes again so does everything after it.
fn sort_answer(
    batch: &mut [Pending],
    results: &[PutRecordsResultEntry],
    max_rejections: u32,
) -> SortedAnswer {
    let mut sorted = SortedAnswer {
        outcomes: Vec::with_capacity(batch.len()),
        failed: 0,
        retrying: 0,
        throttled: false,
        first_error: (String::new(), String::new()),
    };
    let mut retried_keys: HashSet<&str> = HashSet::new();
    let mut barrier_retried = false;
    for (pending, result) in batch.iter_mut().zip(results) {
        let key = pending.record.partition_key.as_str();
        let barrier = pending.record.copies.is_some();
        let held =
            barrier_retried || retried_keys.contains(key) || (barrier && !retried_keys.is_empty());
        let outcome = match (result.error_code(), result.sequence_number()) {
            (None, Some(_)) if held => Outcome::Retry,
            (None, Some(_)) => Outcome::Done,
            (code, _) => {
                let code = code.unwrap_or("MissingSequenceNumber");
                let message = result.error_message().unwrap_or_default();
                if sorted.failed == 0 {
                    sorted.first_error = (code.to_owned(), message.to_owned());
                }
                sorted.failed += 1;
                sorted.throttled |= entry_error_is_throttle(code);
                if !entry_error_is_retryable(code) {
                    pending.rejections += 1;
                }
                if pending.rejections >= max_rejections {
                    Outcome::DeadLetter(format!(
                        "kinesis rejected the record {} times; last error: {code}: {message}",
                        pending.rejections
                    ))
                } else {
                    Outcome::Retry
                }
            }
        };
        if matches!(outcome, Outcome::Retry) {
            sorted.retrying += 1;
            retried_keys.insert(key);
            barrier_retried |= barrier;
        }
        sorted.outcomes.push(outcome);
    }
    sorted
}

/// The request entry for a record: one copy of the data per attempt (the
/// SDK's `Blob` owns its bytes).
fn entry(record: &Record) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .data(Blob::new(record.data.clone()))
        .partition_key(record.partition_key.clone())
        .set_explicit_hash_key(record.explicit_hash_key.map(|hash| hash.to_string()))
        .build()
        .expect("data and partition key are set")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(seq: u64, key: &str, rejections: u32) -> Pending {
        Pending {
            record: Record {
                seq,
                ..Record::new("s".into(), key.to_owned(), Vec::new())
            },
            rejections,
        }
    }

    fn accepted() -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .sequence_number("1")
            .build()
    }

    fn refused(code: &str) -> PutRecordsResultEntry {
        PutRecordsResultEntry::builder()
            .error_code(code)
            .error_message("no")
            .build()
    }

    fn kinds(sorted: &SortedAnswer) -> String {
        sorted
            .outcomes
            .iter()
            .map(|o| match o {
                Outcome::Done => 'd',
                Outcome::Retry => 'r',
                Outcome::DeadLetter(_) => 'x',
            })
            .collect()
    }

    #[test]
    fn later_records_of_a_retried_key_go_again_and_others_do_not() {
        let mut batch = vec![
            pending(0, "a", 0),
            pending(1, "b", 0),
            pending(2, "a", 0),
            pending(3, "c", 0),
            pending(4, "a", 0),
            pending(5, "b", 0),
        ];
        let results = [
            accepted(),
            refused("ProvisionedThroughputExceededException"),
            accepted(),
            accepted(),
            accepted(),
            accepted(),
        ];
        let sorted = sort_answer(&mut batch, &results, 3);
        // Key a was accepted before anything of it failed: done. Key b's
        // later record goes again with the refused one.
        assert_eq!(kinds(&sorted), "drdddr");
        assert!(sorted.throttled);
        assert_eq!((sorted.failed, sorted.retrying), (1, 2));
        assert_eq!(
            sorted.first_error.0,
            "ProvisionedThroughputExceededException"
        );
        assert_eq!(
            batch[1].rejections, 0,
            "a retryable error is not a rejection"
        );
    }

    #[test]
    fn a_truncate_copy_is_ordered_against_every_key_of_the_lane() {
        let copy = |seq: u64| {
            let mut pending = pending(seq, "public.t", 0);
            let copies = tributary_envelope::record::Copies::new(2);
            pending.record = pending.record.copy_for(0, &copies);
            pending
        };
        // The copy is refused: everything after it goes again.
        let mut batch = vec![pending(0, "t:1", 0), copy(1), pending(2, "t:2", 0)];
        let results = [
            accepted(),
            refused("ProvisionedThroughputExceededException"),
            accepted(),
        ];
        assert_eq!(kinds(&sort_answer(&mut batch, &results, 3)), "drr");
        // Something before it is refused: the copy and what follows go again.
        let mut batch = vec![pending(0, "t:1", 0), copy(1), pending(2, "t:2", 0)];
        let results = [refused("InternalFailure"), accepted(), accepted()];
        assert_eq!(kinds(&sort_answer(&mut batch, &results, 3)), "rrr");
        // Refusals after it hold back only their own keys.
        let mut batch = vec![copy(0), pending(1, "t:1", 0), pending(2, "t:2", 0)];
        let results = [accepted(), refused("InternalFailure"), accepted()];
        assert_eq!(kinds(&sort_answer(&mut batch, &results, 3)), "drd");
    }

    #[test]
    fn a_record_given_up_holds_nothing_back() {
        let mut batch = vec![pending(0, "a", 2), pending(1, "a", 0), pending(2, "b", 0)];
        let results = [
            refused("InvalidArgumentException"),
            accepted(),
            refused("InternalFailure"),
        ];
        let sorted = sort_answer(&mut batch, &results, 3);
        // The third rejection dead-letters record 0, so record 1 of the same
        // key stands as accepted; record 2 failed with a retryable error.
        assert_eq!(kinds(&sorted), "xdr");
        assert!(!sorted.throttled);
        match &sorted.outcomes[0] {
            Outcome::DeadLetter(reason) => {
                assert!(reason.contains("3 times") && reason.contains("InvalidArgumentException"))
            }
            _ => unreachable!(),
        }
    }
}

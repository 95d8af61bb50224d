//! One ordered lane per (stream, shard): batching, quotas, PutRecords and
//! ordered retries.
//!
//! The dispatcher hands a lane the records whose partition key hashes into
//! its shard, in source order. The lane keeps them in one queue and loops:
//! cut a batch off the front (at most 500 entries, 5 MiB and the quota's
//! burst; with `sink.aggregation`, records packed into KPL aggregated
//! records, see `batch.rs`), wait for the quota, send it, and sort the
//! answer (an aggregated entry's result is its every record's):
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::types::PutRecordsResultEntry;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tracing::{debug, warn};
use tributary_envelope::error_text::one_line;
use tributary_envelope::record::MAX_PARTITION_KEY_CHARS;
use tributary_envelope::time::parse_unix_millis;
use tributary_envelope::transaction::TxTag;
use tributary_envelope::{Acks, Record};

use ::metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use tokio::time::Instant;

use crate::batch::{self, Batch, Limits};
use crate::config::RetryPolicy;
use crate::dead_letter::{DeadLetter, DeadLetterReason, DeadLetterStore};
use crate::error::KinesisError;
use crate::metrics;
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
    /// `sink.aggregation`: pack records into KPL aggregated records.
    pub(crate) aggregation: bool,
    pub(crate) quota: LaneQuota,
    pub(crate) retry: RetryPolicy,
    pub(crate) dead_letters: Arc<DeadLetterStore>,
    pub(crate) acks: Acks,
    /// Set when Kinesis put a record on another shard: the stream's shard
    /// map changed, the dispatcher reads it again.
    pub(crate) stale: Arc<AtomicBool>,
}

/// A record waiting in a lane.
struct Pending {
    record: Record,
    /// Times Kinesis refused it with a non-retryable entry error.
    rejections: u32,
    /// PutRecords calls that carried it.
    attempts: u32,
    /// Kinesis accepted a copy of it that was then sent again (held behind
    /// an earlier record of its key): that copy is in the stream, so the
    /// record is never dead-lettered, or the copy, older than the records
    /// of its key sent meanwhile, would stay its key's last occurrence.
    accepted_once: bool,
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
    /// Backoff after a whole call failed: up to `retry.max_backoff`.
    backoff: Backoff,
    /// Backoff before re-sending refused entries: tens to hundreds of ms.
    entry_backoff: Backoff,
    call_warnings: WarnGate,
    entry_warnings: WarnGate,
    /// Bytes (record weights) in `queue`.
    queued_bytes: usize,
    metrics: LaneMetrics,
}

/// The lane's metric handles, registered once (see `metrics.rs`).
struct LaneMetrics {
    records_sent: Counter,
    bytes_sent: Counter,
    put_seconds: Histogram,
    limiter_wait: Histogram,
    rate_factor: Gauge,
    entry_retries: Counter,
    call_retries: Counter,
    queued_records: Gauge,
    queued_bytes: Gauge,
    commit_to_ack: Histogram,
}

impl LaneMetrics {
    fn new(stream: &str, shard: &str) -> Self {
        let stream = stream.to_owned();
        let shard = shard.to_owned();
        Self {
            records_sent: counter!(metrics::RECORDS_SENT, "stream" => stream.clone()),
            bytes_sent: counter!(metrics::BYTES_SENT, "stream" => stream.clone()),
            put_seconds: histogram!(metrics::PUT_RECORDS_SECONDS, "stream" => stream.clone()),
            limiter_wait: histogram!(metrics::LIMITER_WAIT_SECONDS, "stream" => stream.clone()),
            rate_factor: gauge!(metrics::RATE_FACTOR, "stream" => stream.clone(), "shard" => shard.clone()),
            entry_retries: counter!(metrics::RETRIES, "stream" => stream.clone(), "kind" => "entry"),
            call_retries: counter!(metrics::RETRIES, "stream" => stream.clone(), "kind" => "call"),
            queued_records: gauge!(metrics::QUEUED_RECORDS, "stream" => stream.clone(), "shard" => shard.clone()),
            queued_bytes: gauge!(metrics::QUEUED_BYTES, "stream" => stream.clone(), "shard" => shard),
            commit_to_ack: histogram!(metrics::COMMIT_TO_ACK_SECONDS, "stream" => stream),
        }
    }
}

impl Lane {
    pub(crate) fn new(setup: LaneSetup, input: mpsc::UnboundedReceiver<Record>) -> Self {
        let backoff = Backoff::new(setup.retry);
        let entry_backoff = Backoff::new(entry_retry_policy(setup.retry));
        let metrics = LaneMetrics::new(&setup.stream, &setup.shard_id);
        metrics.rate_factor.set(1.0);
        Self {
            queued_bytes: 0,
            metrics,
            setup,
            input,
            queue: VecDeque::new(),
            open: true,
            backoff,
            entry_backoff,
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
            self.report_queue();
            let mut batch = self.next_batch();
            let waited = Instant::now();
            self.setup
                .quota
                .acquire(batch.entries.len(), batch.bytes)
                .await;
            self.metrics
                .limiter_wait
                .record(waited.elapsed().as_secs_f64());
            let sent = Instant::now();
            for pending in self.queue.iter_mut().take(batch.records) {
                pending.attempts += 1;
            }
            let answer = self
                .setup
                .client
                .put_records()
                .stream_name(&*self.setup.stream)
                .set_records(Some(std::mem::take(&mut batch.entries)))
                .send()
                .await;
            self.metrics
                .put_seconds
                .record(sent.elapsed().as_secs_f64());
            match answer {
                Ok(output) => self.on_answer(&batch, &output).await?,
                Err(err) => self.on_call_error(batch.records, err).await?,
            }
        }
    }

    /// Takes whatever the dispatcher has queued; waits when there is
    /// nothing to send yet. Records Kinesis could never take are
    /// dead-lettered on the way in.
    async fn fill(&mut self) -> Result<(), KinesisError> {
        loop {
            let mut refused: Vec<DeadLetter> = Vec::new();
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

    fn admit(&mut self, record: Record, refused: &mut Vec<DeadLetter>) {
        match never_writable(&record, self.setup.max_record_bytes) {
            Some((reason, error)) => refused.push(DeadLetter {
                record,
                reason,
                error,
                attempts: 0,
                limit: (reason == DeadLetterReason::TooLarge)
                    .then_some(self.setup.max_record_bytes),
            }),
            None => {
                self.queued_bytes += record.weight();
                self.queue.push_back(Pending {
                    record,
                    rejections: 0,
                    attempts: 0,
                    accepted_once: false,
                });
            }
        }
    }

    /// The next call, cut off the front of the queue.
    fn next_batch(&self) -> Batch {
        let limits = Limits {
            entries: MAX_BATCH_RECORDS.min(self.setup.quota.max_records()),
            bytes: MAX_BATCH_BYTES.min(self.setup.quota.max_bytes()),
            record_bytes: self.setup.max_record_bytes,
        };
        let records = self.queue.iter().map(|p| &p.record);
        if self.setup.aggregation {
            batch::aggregated(records, limits)
        } else {
            batch::plain(records, limits)
        }
    }

    /// Sorts the answer to `batch`.
    async fn on_answer(
        &mut self,
        batch: &Batch,
        output: &PutRecordsOutput,
    ) -> Result<(), KinesisError> {
        let count = batch.records;
        let results = output.records();
        let Some(spread) = batch.spread(results) else {
            let delay = self.backoff.next_delay();
            self.metrics.call_retries.increment(1);
            if let Some(suppressed) = self.call_warnings.allow() {
                warn!(
                    stream = %self.setup.stream, shard = %self.setup.shard_id,
                    sent = batch.entries_sent(), answered = results.len(), suppressed,
                    retry_in_ms = delay.as_millis() as u64,
                    "kinesis answered putrecords with the wrong number of results; sending the batch again"
                );
            }
            tokio::time::sleep(delay).await;
            return Ok(());
        };
        if results
            .iter()
            .any(|r| r.shard_id().is_some_and(|id| id != &*self.setup.shard_id))
        {
            self.setup.stale.store(true, Ordering::Relaxed);
        }
        let all_accepted = output.failed_record_count().unwrap_or(0) == 0
            && results
                .iter()
                .all(|r| r.error_code().is_none() && r.sequence_number().is_some());
        if all_accepted {
            self.setup
                .acks
                .done(self.queue.iter().take(count).map(|p| &p.record));
            self.observe_commit_latency(self.queue.iter().take(count).map(|p| &p.record));
            let bytes: usize = self.queue.drain(..count).map(|p| p.record.weight()).sum();
            self.queued_bytes -= bytes;
            self.metrics.records_sent.increment(count as u64);
            self.metrics.bytes_sent.increment(bytes as u64);
            self.backoff.reset();
            self.entry_backoff.reset();
            self.observe(count, 0);
            return Ok(());
        }
        self.on_partial_failure(count, &spread).await
    }

    /// Sorts an answer with failures; `results` has one entry per record.
    async fn on_partial_failure(
        &mut self,
        count: usize,
        results: &[PutRecordsResultEntry],
    ) -> Result<(), KinesisError> {
        let mut batch: Vec<Pending> = self.queue.drain(..count).collect();
        let sorted = sort_answer(&mut batch, results, self.setup.retry.max_rejections);
        let done = || {
            batch
                .iter()
                .zip(&sorted.outcomes)
                .filter(|(_, o)| matches!(o, Outcome::Done))
                .map(|(p, _)| &p.record)
        };
        self.setup.acks.done(done());
        self.observe_commit_latency(done());
        let done_bytes: usize = done().map(Record::weight).sum();
        self.metrics.records_sent.increment(done().count() as u64);
        self.metrics.bytes_sent.increment(done_bytes as u64);
        for code in results.iter().filter_map(|r| r.error_code()) {
            counter!(metrics::ENTRIES_REFUSED, "stream" => self.setup.stream.to_string(), "code" => code.to_owned())
                .increment(1);
        }
        self.queued_bytes -= batch.iter().map(|p| p.record.weight()).sum::<usize>();
        let mut refused: Vec<DeadLetter> = Vec::new();
        // Back to the front, oldest first: push in reverse.
        for (pending, outcome) in batch.into_iter().zip(sorted.outcomes).rev() {
            match outcome {
                Outcome::Done => {}
                Outcome::Retry => {
                    self.queued_bytes += pending.record.weight();
                    self.queue.push_front(pending);
                }
                Outcome::DeadLetter(error) => refused.push(DeadLetter {
                    record: pending.record,
                    reason: DeadLetterReason::Rejected,
                    error,
                    attempts: pending.attempts,
                    limit: None,
                }),
            }
        }
        refused.reverse();
        if !refused.is_empty() {
            self.dead_letter(&refused).await?;
        }
        self.observe(count, sorted.throttled);
        self.backoff.reset();
        self.metrics.entry_retries.increment(sorted.retrying as u64);
        if sorted.retrying == 0 {
            self.entry_backoff.reset();
            return Ok(());
        }
        // A call that got something through starts the entry backoff over:
        // only calls refused whole wait longer and longer.
        if sorted.failed < count {
            self.entry_backoff.reset();
        }
        let delay = self.entry_backoff.next_delay();
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
            Failure::Throttled => self.observe(count, count),
            Failure::Transient => {}
        }
        let delay = self.backoff.next_delay();
        self.metrics.call_retries.increment(1);
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

    /// Records the commit-to-ack time of the streamed changes among the
    /// just accepted `records`, and sets the source lag to the newest one's.
    fn observe_commit_latency<'r>(&self, records: impl Iterator<Item = &'r Record>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Records of one transaction share its tag: parse its time once.
        let mut last: Option<(&Arc<TxTag>, Option<i64>)> = None;
        let mut newest: Option<(&TxTag, f64)> = None;
        for record in records {
            let Some(tx) = &record.tx else { continue };
            let commit_ms = match last {
                Some((tag, ms)) if Arc::ptr_eq(tag, &tx.tag) => ms,
                _ => {
                    let ms = tx
                        .tag
                        .commit_ts
                        .as_ref()
                        .and_then(|ts| parse_unix_millis(std::str::from_utf8(ts).ok()?));
                    last = Some((&tx.tag, ms));
                    ms
                }
            };
            let Some(commit_ms) = commit_ms else { continue };
            let secs = now_ms.saturating_sub(commit_ms).max(0) as f64 / 1000.0;
            self.metrics.commit_to_ack.record(secs);
            if newest.is_none_or(|(tag, _)| tag.major <= tx.tag.major) {
                newest = Some((&tx.tag, secs));
            }
        }
        if let Some((tag, secs)) = newest {
            gauge!(metrics::SOURCE_LAG_SECONDS, "source" => tag.name.to_string()).set(secs);
        }
    }

    /// Counts an answer in the quota's window and reports the rate factor.
    fn observe(&mut self, sent: usize, throttled: usize) {
        self.setup.quota.observe(sent, throttled);
        self.metrics.rate_factor.set(self.setup.quota.factor());
    }

    fn report_queue(&self) {
        self.metrics.queued_records.set(self.queue.len() as f64);
        self.metrics.queued_bytes.set(self.queued_bytes as f64);
    }

    /// Writes records to the dead-letter store, then reports them done.
    async fn dead_letter(&self, refused: &[DeadLetter]) -> Result<(), KinesisError> {
        self.setup.dead_letters.write(refused).await?;
        for letter in refused {
            counter!(metrics::DEAD_LETTERS, "stream" => record_stream(letter), "reason" => letter.reason.as_str())
                .increment(1);
            let record = &letter.record;
            warn!(
                stream = %record.stream, shard = %self.setup.shard_id,
                partition_key = %record.partition_key, seq = record.seq,
                reason = %letter.reason, error = %letter.error, attempts = letter.attempts,
                path = %self.setup.dead_letters.path().display(),
                dead_letter_stream = self.setup.dead_letters.stream().unwrap_or_default(),
                "record written to the dead-letter store"
            );
        }
        self.setup.acks.done(refused.iter().map(|l| &l.record));
        Ok(())
    }
}

fn record_stream(letter: &DeadLetter) -> String {
    letter.record.stream.to_string()
}

/// Why Kinesis would refuse `record` whatever happens, if it would: the
/// reason and a message with the numbers.
fn never_writable(record: &Record, max_record_bytes: usize) -> Option<(DeadLetterReason, String)> {
    let size = record.weight();
    if size > max_record_bytes {
        return Some((
            DeadLetterReason::TooLarge,
            format!(
                "record of {size} bytes (data + partition key) exceeds the stream's maximum record size of {max_record_bytes} bytes"
            ),
        ));
    }
    if record.partition_key.is_empty() {
        return Some((
            DeadLetterReason::InvalidPartitionKey,
            "the partition key is empty".to_owned(),
        ));
    }
    let chars = record.partition_key.chars().count();
    if chars > MAX_PARTITION_KEY_CHARS {
        return Some((
            DeadLetterReason::InvalidPartitionKey,
            format!(
                "the partition key has {chars} characters; kinesis allows at most {MAX_PARTITION_KEY_CHARS}"
            ),
        ));
    }
    None
}

/// An answered batch, sorted entry by entry.
struct SortedAnswer {
    outcomes: Vec<Outcome>,
    failed: usize,
    retrying: usize,
    /// Entries refused as throttled.
    throttled: usize,
    /// The first entry error: (code, message).
    first_error: (String, String),
}

/// Decides each entry's fate. An accepted entry is done unless an earlier
/// entry of its key is retried (then it goes again too, to land after it);
/// a failed entry is retried, or dead-lettered once a non-retryable error
/// has refused it `max_rejections` times (counted in `batch`).
///
/// A copy of a fanned-out record (a truncate) and a transaction marker are
/// ordered against every entry of the lane, not just its key: it goes again when anything before
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
        throttled: 0,
        first_error: (String::new(), String::new()),
    };
    let mut retried_keys: HashSet<&str> = HashSet::new();
    let mut barrier_retried = false;
    for (pending, result) in batch.iter_mut().zip(results) {
        let key = pending.record.partition_key.as_str();
        let barrier = pending.record.copies.is_some() || pending.record.marker.is_some();
        let held =
            barrier_retried || retried_keys.contains(key) || (barrier && !retried_keys.is_empty());
        let outcome = match (result.error_code(), result.sequence_number()) {
            (None, Some(_)) if held => {
                pending.accepted_once = true;
                Outcome::Retry
            }
            (None, Some(_)) => Outcome::Done,
            (code, _) => {
                let code = code.unwrap_or("MissingSequenceNumber");
                let message = result.error_message().unwrap_or_default();
                if sorted.failed == 0 {
                    sorted.first_error = (code.to_owned(), message.to_owned());
                }
                sorted.failed += 1;
                sorted.throttled += usize::from(entry_error_is_throttle(code));
                if !entry_error_is_retryable(code) {
                    pending.rejections += 1;
                }
                // Not while an earlier record of its key (or a truncate
                // copy before it) is retried: an
                // accepted copy of this one may already be in the stream,
                // and the earlier record would land after it for good.
                // Held, it goes again behind that record and is given up
                // once it is the first of its key.
                // Nor when a copy of it was accepted before: the record
                // must land again, after what was sent ahead of it.
                if pending.rejections >= max_rejections && !held && !pending.accepted_once {
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

/// Backoff for re-sending refused entries: from at most 20 ms, doubling
/// only while whole calls are refused, up to at most 500 ms. Kinesis asks
/// for a short pause, and the quota (slowed by the refused fraction) does
/// the pacing; a pause of seconds after every partly refused call is what
/// left a shard sharing its quota nearly idle.
fn entry_retry_policy(policy: RetryPolicy) -> RetryPolicy {
    let initial_backoff = policy.initial_backoff.min(ENTRY_INITIAL_BACKOFF);
    RetryPolicy {
        initial_backoff,
        max_backoff: policy.max_backoff.clamp(initial_backoff, ENTRY_MAX_BACKOFF),
        ..policy
    }
}

/// The first pause before refused entries go again.
const ENTRY_INITIAL_BACKOFF: Duration = Duration::from_millis(20);
/// The longest pause before refused entries go again.
const ENTRY_MAX_BACKOFF: Duration = Duration::from_millis(500);

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
            attempts: 1,
            accepted_once: false,
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
        assert_eq!(sorted.throttled, 1);
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
    fn a_record_is_not_given_up_while_an_earlier_one_of_its_key_is_retried() {
        let mut batch = vec![pending(0, "a", 0), pending(1, "a", 2), pending(2, "a", 0)];
        let results = [
            refused("ProvisionedThroughputExceededException"),
            refused("InvalidArgumentException"),
            accepted(),
        ];
        let sorted = sort_answer(&mut batch, &results, 3);
        // Record 1 reached its third rejection, but record 0 of its key is
        // retried: it is held behind it (and counted), not dead-lettered.
        assert_eq!(kinds(&sorted), "rrr");
        assert_eq!(batch[1].rejections, 3);
        // Once it leads its key, it is given up.
        let mut again = vec![pending(1, "a", 3)];
        let sorted = sort_answer(&mut again, &[refused("InvalidArgumentException")], 3);
        assert_eq!(kinds(&sorted), "x");
    }

    #[test]
    fn a_record_with_an_accepted_copy_is_never_given_up() {
        // Record 1 is accepted but held behind record 0 of its key.
        let mut batch = vec![pending(0, "a", 0), pending(1, "a", 2)];
        let results = [refused("InternalFailure"), accepted()];
        let sorted = sort_answer(&mut batch, &results, 3);
        assert_eq!(kinds(&sorted), "rr");
        assert!(batch[1].accepted_once);
        // Next call: record 0 lands, record 1 is rejected a third time. Its
        // earlier copy is in the stream before record 0: giving it up now
        // would leave that stale copy as the key's last occurrence.
        let mut again: Vec<Pending> = batch.into_iter().collect();
        let results = [accepted(), refused("InvalidArgumentException")];
        let sorted = sort_answer(&mut again, &results, 3);
        assert_eq!(kinds(&sorted), "dr");
        assert_eq!(again[1].rejections, 3);
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
        assert_eq!(sorted.throttled, 0);
        match &sorted.outcomes[0] {
            Outcome::DeadLetter(reason) => {
                assert!(reason.contains("3 times") && reason.contains("InvalidArgumentException"))
            }
            _ => unreachable!(),
        }
    }
}

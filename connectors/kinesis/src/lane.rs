//! One ordered lane per (stream, shard): batching, quotas, PutRecords and
//! ordered retries, with up to `sink.max_in_flight_per_shard` calls in
//! flight.
//!
//! The dispatcher hands a lane the records whose partition key hashes into
//! its shard, in source order. The lane keeps them in one queue, ordered by
//! arrival, and loops: cut a batch (at most 500 entries, 5 MiB and the
//! quota's burst; with `sink.aggregation`, records packed into KPL
//! aggregated records, see `batch.rs`), wait for the quota, send it, and
//! sort the answer when it comes (an aggregated entry's result is its
//! every record's):
//! - accepted entries (a sequence number) are reported done;
//! - failed entries go back into the queue at their original place,
//!   together with every later entry of the same batch that shares a
//!   partition key with a retried one, accepted or not. Nothing newer of
//!   their keys is sent before them, so the last copy of every record of a
//!   key lands in source order (PutRecords itself does not keep order when
//!   part of a call fails);
//! - an entry error Kinesis does not call retryable is tried
//!   `max_rejections` times in all, then the record is dead-lettered.
//!
//! Pipelining for distance. One 500-record call per round trip caps a shard
//! at 500 / RTT records/s, and smaller batches (a steady trickle of changes)
//! cap it lower, so a lane may have several calls in flight. The rule that
//! keeps per-key order: a key is in at most one call in flight. When a lane
//! has nothing in flight, the batch is the front of the queue (as with one
//! call in flight). While calls are in flight, the next batch takes queued
//! records in order, skipping every record whose partition key is in a call
//! in flight (so all its later records are skipped too: a key's records
//! never race, and a record still queued is always newer than its key's
//! records in flight). A barrier, a fanned-out copy (truncate) or a
//! transaction marker, is ordered against every record of the lane: it
//! goes only in a batch cut while nothing is in flight, nothing else goes
//! while a call carrying one is in flight, and a batch cut while calls are
//! in flight stops before the first barrier. So everything the retry rules
//! rely on holds per call as it did with one call: the records of a key
//! that a call carries are the oldest of that key not yet delivered, and
//! an answer only ever moves records of its own keys. Retries and whole
//! call failures pause the start of new calls (calls in flight still get
//! their answers sorted), as the single call used to sleep.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsOutput};
use aws_sdk_kinesis::types::PutRecordsResultEntry;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::task::JoinSet;
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
/// How many queued records a batch cut while calls are in flight looks at:
/// past them, records of free keys wait for the next cut (bounds the work
/// of a cut when most of a long queue belongs to keys in flight).
const SCAN_LIMIT: usize = 4 * MAX_BATCH_RECORDS;

/// What a lane needs besides its input.
pub(crate) struct LaneSetup {
    pub(crate) client: Client,
    pub(crate) stream: Arc<str>,
    pub(crate) shard_id: Arc<str>,
    pub(crate) max_record_bytes: usize,
    /// `sink.aggregation`: pack records into KPL aggregated records.
    pub(crate) aggregation: bool,
    /// `sink.max_in_flight_per_shard`: PutRecords calls in flight at once.
    pub(crate) max_in_flight: usize,
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
    /// Its place in the lane's arrival order: retried records go back to
    /// the queue by it.
    ord: u64,
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

/// A PutRecords call in flight: the records it carries, in queue order.
struct Call {
    records: Vec<Pending>,
    /// The batch it was cut as (its entries are with the request).
    batch: Batch,
    /// It carries a barrier: nothing else may be in flight with it.
    barrier: bool,
}

/// What a finished call task hands back: its id, the answer and how long it took.
type Answered = (
    u64,
    Result<PutRecordsOutput, SdkError<PutRecordsError>>,
    Duration,
);

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
    /// Records not in a call, in arrival order (`ord`).
    queue: VecDeque<Pending>,
    /// The next record's `ord`.
    next_ord: u64,
    /// Calls in flight by id, and their tasks.
    in_flight: HashMap<u64, Call>,
    calls: JoinSet<Answered>,
    next_call: u64,
    /// Partition keys of the records in flight.
    busy_keys: HashSet<String>,
    /// No new call starts before this (a backoff after a failure).
    paused_until: Option<Instant>,
    open: bool,
    /// Backoff after a whole call failed: up to `retry.max_backoff`.
    backoff: Backoff,
    /// Backoff before re-sending refused entries: tens to hundreds of ms.
    entry_backoff: Backoff,
    call_warnings: WarnGate,
    entry_warnings: WarnGate,
    /// Bytes (record weights) in `queue` and in flight.
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
            next_ord: 0,
            in_flight: HashMap::new(),
            calls: JoinSet::new(),
            next_call: 0,
            busy_keys: HashSet::new(),
            paused_until: None,
            open: true,
            backoff,
            entry_backoff,
            call_warnings: WarnGate::new(WARN_EVERY),
            entry_warnings: WarnGate::new(WARN_EVERY),
        }
    }

    /// Delivers records until the input closes, the queue is empty and no
    /// call is in flight.
    pub(crate) async fn run(mut self) -> Result<(), KinesisError> {
        loop {
            self.take_input().await?;
            self.start_calls().await;
            if !self.open && self.queue.is_empty() && self.in_flight.is_empty() {
                debug!(stream = %self.setup.stream, shard = %self.setup.shard_id, "lane drained");
                return Ok(());
            }
            self.report_queue();
            let pause = self.paused_until;
            tokio::select! {
                biased;
                Some(joined) = self.calls.join_next(), if !self.calls.is_empty() => {
                    let (id, answer, took) = joined.map_err(KinesisError::Task)?;
                    self.on_done(id, answer, took).await?;
                }
                received = self.input.recv(), if self.open => match received {
                    Some(record) => {
                        let mut refused = Vec::new();
                        self.admit(record, &mut refused);
                        if !refused.is_empty() {
                            self.dead_letter(&refused).await?;
                        }
                    }
                    None => self.open = false,
                },
                () = tokio::time::sleep_until(pause.unwrap_or_else(Instant::now)), if pause.is_some() => {
                    self.paused_until = None;
                }
                else => {
                    // Not reachable: with the input closed, nothing in
                    // flight and no pause, `start_calls` sent the queue's
                    // front. Stay loud all the same.
                    return Err(KinesisError::Stream {
                        stream: self.setup.stream.to_string(),
                        message: "a lane found nothing to wait for with records queued".to_owned(),
                    });
                }
            }
        }
    }

    /// Takes whatever the dispatcher has queued, without waiting. Records
    /// Kinesis could never take are dead-lettered on the way in.
    async fn take_input(&mut self) -> Result<(), KinesisError> {
        let mut refused: Vec<DeadLetter> = Vec::new();
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
        Ok(())
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
                    ord: self.next_ord,
                    rejections: 0,
                    attempts: 0,
                    accepted_once: false,
                });
                self.next_ord += 1;
            }
        }
    }

    /// Starts calls while there is room in flight, no pause, and a batch
    /// the order rules allow.
    async fn start_calls(&mut self) {
        while self.in_flight.len() < self.setup.max_in_flight
            && self
                .paused_until
                .is_none_or(|until| until <= Instant::now())
        {
            self.paused_until = None;
            let Some(mut call) = self.cut() else { break };
            let waited = Instant::now();
            self.setup
                .quota
                .acquire(call.batch.entries.len(), call.batch.bytes)
                .await;
            self.metrics
                .limiter_wait
                .record(waited.elapsed().as_secs_f64());
            // One attempt per call: the lane retries a failed call itself
            // (its backoff, order rules, rate factor and metrics); SDK
            // retries under it would wait out their own backoff (1 s base)
            // unseen, e.g. after an outage ends.
            let request = self
                .setup
                .client
                .put_records()
                .stream_name(&*self.setup.stream)
                .set_records(Some(std::mem::take(&mut call.batch.entries)))
                .customize()
                .config_override(
                    aws_sdk_kinesis::config::Builder::default()
                        .retry_config(RetryConfig::disabled()),
                );
            let id = self.next_call;
            self.next_call += 1;
            self.calls.spawn(async move {
                let sent = Instant::now();
                let answer = request.send().await;
                (id, answer, sent.elapsed())
            });
            self.in_flight.insert(id, call);
        }
    }

    /// The next call, taken out of the queue under the order rules (see the
    /// module doc); `None` when nothing may go now.
    fn cut(&mut self) -> Option<Call> {
        let limits = Limits {
            entries: MAX_BATCH_RECORDS.min(self.setup.quota.max_records()),
            bytes: MAX_BATCH_BYTES.min(self.setup.quota.max_bytes()),
            record_bytes: self.setup.max_record_bytes,
        };
        let barrier_in_flight = self.in_flight.values().any(|call| call.barrier);
        let mut picks: Vec<usize> = Vec::new();
        let batch = {
            let eligible = eligible(
                &self.queue,
                &self.busy_keys,
                self.in_flight.is_empty(),
                barrier_in_flight,
            )
            .inspect(|&i| picks.push(i))
            .map(|i| &self.queue[i].record);
            if self.setup.aggregation {
                batch::aggregated(eligible, limits)
            } else {
                batch::plain(eligible, limits)
            }
        };
        if batch.records == 0 {
            return None;
        }
        picks.truncate(batch.records);
        let mut records = take_picks(&mut self.queue, &picks);
        let mut barrier = false;
        for pending in &mut records {
            pending.attempts += 1;
            barrier |= is_barrier(&pending.record);
            self.busy_keys.insert(pending.record.partition_key.clone());
        }
        Some(Call {
            records,
            batch,
            barrier,
        })
    }

    /// Puts records of an answered call back into the queue at their place.
    fn requeue(&mut self, records: Vec<Pending>) {
        self.queued_bytes += records.iter().map(|p| p.record.weight()).sum::<usize>();
        requeue(&mut self.queue, records);
    }

    /// Sorts the answer of call `id`.
    async fn on_done(
        &mut self,
        id: u64,
        answer: Result<PutRecordsOutput, SdkError<PutRecordsError>>,
        took: Duration,
    ) -> Result<(), KinesisError> {
        self.metrics.put_seconds.record(took.as_secs_f64());
        let call = self
            .in_flight
            .remove(&id)
            .expect("every call task has its call");
        for pending in &call.records {
            self.busy_keys.remove(pending.record.partition_key.as_str());
        }
        self.queued_bytes -= call
            .records
            .iter()
            .map(|p| p.record.weight())
            .sum::<usize>();
        match answer {
            Ok(output) => self.on_answer(call, &output).await,
            Err(err) => self.on_call_error(call, err).await,
        }
    }

    /// Holds back new calls for `delay` (or longer, if already held).
    fn pause(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        self.paused_until = Some(self.paused_until.map_or(until, |held| held.max(until)));
    }

    /// Sorts the answer to `call`.
    async fn on_answer(
        &mut self,
        call: Call,
        output: &PutRecordsOutput,
    ) -> Result<(), KinesisError> {
        let count = call.records.len();
        let results = output.records();
        let Some(spread) = call.batch.spread(results) else {
            let delay = self.backoff.next_delay();
            self.metrics.call_retries.increment(1);
            if let Some(suppressed) = self.call_warnings.allow() {
                warn!(
                    stream = %self.setup.stream, shard = %self.setup.shard_id,
                    sent = call.batch.entries_sent(), answered = results.len(), suppressed,
                    retry_in_ms = delay.as_millis() as u64,
                    "kinesis answered putrecords with the wrong number of results; sending the batch again"
                );
            }
            self.requeue(call.records);
            self.pause(delay);
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
            let records = || call.records.iter().map(|p| &p.record);
            self.setup.acks.done(records());
            self.observe_commit_latency(records());
            let bytes: usize = records().map(Record::weight).sum();
            self.metrics.records_sent.increment(count as u64);
            self.metrics.bytes_sent.increment(bytes as u64);
            self.backoff.reset();
            self.entry_backoff.reset();
            self.observe(count, 0);
            return Ok(());
        }
        self.on_partial_failure(call.records, &spread).await
    }

    /// Sorts an answer with failures; `results` has one entry per record.
    async fn on_partial_failure(
        &mut self,
        mut batch: Vec<Pending>,
        results: &[PutRecordsResultEntry],
    ) -> Result<(), KinesisError> {
        let count = batch.len();
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
        let mut refused: Vec<DeadLetter> = Vec::new();
        let mut retried: Vec<Pending> = Vec::new();
        for (pending, outcome) in batch.into_iter().zip(sorted.outcomes) {
            match outcome {
                Outcome::Done => {}
                Outcome::Retry => retried.push(pending),
                Outcome::DeadLetter(error) => refused.push(DeadLetter {
                    record: pending.record,
                    reason: DeadLetterReason::Rejected,
                    error,
                    attempts: pending.attempts,
                    limit: None,
                }),
            }
        }
        self.requeue(retried);
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
        self.pause(delay);
        Ok(())
    }

    /// A whole call failed: retry the same batch after a backoff, or stop.
    async fn on_call_error(
        &mut self,
        call: Call,
        err: SdkError<PutRecordsError>,
    ) -> Result<(), KinesisError> {
        let count = call.records.len();
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
        self.requeue(call.records);
        self.pause(delay);
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

/// True for a record ordered against every record of its lane: a
/// fanned-out copy (truncate) or a transaction marker.
fn is_barrier(record: &Record) -> bool {
    record.copies.is_some() || record.marker.is_some()
}

/// The queue positions a batch may take, in order: the whole queue when
/// nothing is in flight (`idle`); else the records whose key is in no call
/// in flight, up to the first barrier and within [`SCAN_LIMIT`]; nothing
/// while a barrier is in flight.
fn eligible<'q>(
    queue: &'q VecDeque<Pending>,
    busy_keys: &'q HashSet<String>,
    idle: bool,
    barrier_in_flight: bool,
) -> impl Iterator<Item = usize> + 'q {
    let scan = if idle {
        queue.len()
    } else if barrier_in_flight {
        0
    } else {
        SCAN_LIMIT
    };
    queue
        .iter()
        .take(scan)
        .enumerate()
        .take_while(move |(_, p)| idle || !is_barrier(&p.record))
        .filter(move |(_, p)| idle || !busy_keys.contains(p.record.partition_key.as_str()))
        .map(|(i, _)| i)
}

/// Takes the records at `picks` (ascending positions) out of `queue`, in order.
fn take_picks(queue: &mut VecDeque<Pending>, picks: &[usize]) -> Vec<Pending> {
    if picks.iter().enumerate().all(|(n, &i)| n == i) {
        return queue.drain(..picks.len()).collect();
    }
    let mut taken = Vec::with_capacity(picks.len());
    let mut kept = VecDeque::with_capacity(queue.len() - picks.len());
    let mut next = picks.iter().peekable();
    for (i, pending) in std::mem::take(queue).into_iter().enumerate() {
        if next.next_if(|&&p| p == i).is_some() {
            taken.push(pending);
        } else {
            kept.push_back(pending);
        }
    }
    *queue = kept;
    taken
}

/// Puts `records` (in arrival order) back into `queue` at their place by `ord`.
fn requeue(queue: &mut VecDeque<Pending>, records: Vec<Pending>) {
    if queue
        .front()
        .is_none_or(|front| records.last().is_none_or(|last| last.ord < front.ord))
    {
        for pending in records.into_iter().rev() {
            queue.push_front(pending);
        }
        return;
    }
    for pending in records {
        let at = queue.partition_point(|queued| queued.ord < pending.ord);
        queue.insert(at, pending);
    }
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
        let barrier = is_barrier(&pending.record);
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
            ord: seq,
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

    fn queue_of(keys: &[&str]) -> VecDeque<Pending> {
        keys.iter()
            .enumerate()
            .map(|(seq, key)| {
                let mut pending = pending(seq as u64, key, 0);
                if key.starts_with("barrier") {
                    let copies = tributary_envelope::record::Copies::new(2);
                    pending.record = pending.record.copy_for(0, &copies);
                }
                pending
            })
            .collect()
    }

    fn picks(queue: &VecDeque<Pending>, busy: &[&str], idle: bool, barrier: bool) -> Vec<usize> {
        let busy: HashSet<String> = busy.iter().map(|k| (*k).to_owned()).collect();
        eligible(queue, &busy, idle, barrier).collect()
    }

    #[test]
    fn with_calls_in_flight_a_batch_skips_their_keys_and_stops_at_a_barrier() {
        let queue = queue_of(&["a", "b", "a", "c", "barrier", "d"]);
        // Nothing in flight: the queue's front, barrier and all.
        assert_eq!(picks(&queue, &[], true, false), [0, 1, 2, 3, 4, 5]);
        // Key a in flight: its records are skipped (all of them, so a
        // later record of a never overtakes an earlier one); the barrier
        // waits for the call in flight, and so does everything after it.
        assert_eq!(picks(&queue, &["a"], false, false), [1, 3]);
        // A barrier in flight: nothing else goes.
        assert_eq!(picks(&queue, &["x"], false, true), Vec::<usize>::new());
    }

    #[test]
    fn picked_records_leave_the_queue_and_retries_go_back_to_their_place() {
        let mut queue = queue_of(&["a", "b", "a", "c", "d"]);
        let taken = take_picks(&mut queue, &[1, 3]);
        assert_eq!(taken.iter().map(|p| p.ord).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(queue.iter().map(|p| p.ord).collect::<Vec<_>>(), [0, 2, 4]);
        // Retried, they go back between the records that were queued
        // around them.
        requeue(&mut queue, taken);
        assert_eq!(
            queue.iter().map(|p| p.ord).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
        // A prefix is drained; retried, it goes back to the front.
        let front = take_picks(&mut queue, &[0, 1]);
        assert_eq!(queue.iter().map(|p| p.ord).collect::<Vec<_>>(), [2, 3, 4]);
        requeue(&mut queue, front);
        assert_eq!(
            queue.iter().map(|p| p.ord).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4]
        );
    }
}

//! The contract between a source (Postgres, MySQL, ...) and the pipeline.
//!
//! First stage of the dataflow: a [`Source`] connects to a database, resumes
//! after the last acknowledged position, decodes committed row changes into
//! [`Record`]s and hands them to the sink in commit order, tells the
//! [`AckTracker`] where each transaction ends, and acknowledges to the
//! database (or to its [`OffsetStore`]) only the positions the tracker
//! releases. `tributary run` has one wiring for every source: it builds a
//! source from its validated config with [`Source::connect`] and runs it with
//! a [`SourceContext`].
//!
//! # Positions and the watermark
//!
//! Two kinds of position exist, for two readers:
//! - the envelope's `source.position` ([`crate::Position`]): a fixed-width
//!   string that sorts in commit order, with the ordinal of the change in its
//!   transaction. Consumers see it.
//! - the acknowledgement **watermark**, a `u64` the [`AckTracker`] orders.
//!   Each source maps its log position onto it so that a later commit always
//!   has a larger watermark: Postgres uses the commit's end LSN; MySQL packs
//!   the binlog file's index into the high 32 bits and the offset after the
//!   transaction's commit event into the low 32 bits (binlog offsets are 32
//!   bits in the v4 format). What the watermark cannot hold (the binlog file
//!   name, the GTID state) the source keeps beside it and writes to its
//!   offset store when the tracker releases that watermark. A plain `u64`
//!   keeps the tracker's hot path free of allocation and comparison calls.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::ack::{AckTracker, Budget};
use crate::record::Record;

/// How a source's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was requested; everything read was delivered and acknowledged.
    Drained,
    /// Shutdown was requested; records were still in flight when the
    /// deadline passed (they are sent again after a restart).
    TimedOut,
}

/// What the pipeline hands a running source.
#[derive(Debug)]
pub struct SourceContext {
    /// Where batches of records go, in source order.
    pub out: mpsc::Sender<Vec<Record>>,
    /// The acknowledgement watermark; the sink reports records done into it.
    pub tracker: Arc<AckTracker>,
    /// The in-flight byte budget: take it before decoding more.
    pub budget: Arc<Budget>,
    /// Turns true when the process should stop.
    pub shutdown: watch::Receiver<bool>,
    /// How long a graceful stop waits for in-flight records.
    pub drain_timeout: Duration,
    /// Whether the source is connected to its server (`/readyz`): a source
    /// that reconnects sets it false when a session fails and true once a
    /// new one streams.
    pub connected: watch::Sender<bool>,
}

/// What a source's error must tell the pipeline.
pub trait SourceError: std::error::Error + Send + Sync + 'static {
    /// True when reconnecting may fix it (a dropped connection, a server
    /// restart); false for errors that need a person.
    fn is_transient(&self) -> bool;

    /// When the error is a setting a person must change (a server variable,
    /// a privilege, a config key): its name. The process then exits with
    /// code 2 like any configuration error.
    fn misconfigured(&self) -> Option<&str> {
        None
    }
}

/// A database whose committed changes Tributary captures.
///
/// Guarantees a source must keep:
/// - records reach `ctx.out` in commit order, numbered with dense increasing
///   `seq` starting at 0, and each record's envelope carries a
///   `source.position` that sorts (as a string) in that order and is the same
///   when the change is read again after a restart (so `id` is stable);
/// - after handing over the last record of a transaction it calls
///   [`AckTracker::commit`] with the transaction's watermark, and it never
///   calls `commit` in the middle of a transaction (guarantee 4);
/// - it acknowledges to the database, or writes to its offset store, only
///   positions the tracker has released ([`AckTracker::acked`] and
///   [`AckTracker::subscribe`]), never anything later (guarantee 1);
/// - it takes `ctx.budget` for every record before decoding further, so a
///   stalled sink stalls the source;
/// - on `ctx.shutdown` it stops at a transaction boundary, drops `ctx.out`,
///   waits up to `ctx.drain_timeout` for the tracker to drain, acknowledges
///   the last released position and returns [`Stopped`];
/// - a transient failure is retried inside `run` (reconnecting resumes after
///   the tracker's acknowledged position); `run` returns an error only for
///   what needs a person.
///
/// A source may assume that the sink reports every record done exactly when
/// it is durable, in any order, and that delivery is at-least-once (after a
/// crash everything after the acknowledged position is read again).
pub trait Source: Sized + Send + 'static {
    /// The source's validated settings (parsed and checked by its crate).
    type Config: Send;
    /// What stops the source.
    type Error: SourceError;

    /// The connector's name in logs and envelopes (`postgres`, `mysql`).
    const KIND: &'static str;

    /// Connects, checks the server and prepares what streaming needs
    /// (slots, publications, the stored offset).
    fn connect(config: Self::Config) -> impl Future<Output = Result<Self, Self::Error>> + Send;

    /// The watermark the source resumes after (the tracker starts there).
    fn resume_watermark(&self) -> u64;

    /// True when the source had no stored position and starts at the
    /// database's current end (rows written before are not sent).
    fn starts_fresh(&self) -> bool;

    /// Streams until shutdown; see the trait's guarantees.
    fn run(self, ctx: SourceContext) -> impl Future<Output = Result<Stopped, Self::Error>> + Send;
}

/// Durable storage of a source's acknowledged position, for sources whose
/// database does not keep it (MySQL; Postgres keeps it in the slot).
///
/// Guarantees a store must keep: [`OffsetStore::save`] returns only after
/// the offset is durable (a crash right after returns it from
/// [`OffsetStore::load`]), and a crash during `save` leaves either the old or
/// the new offset, never a mix. A store may assume one writer.
pub trait OffsetStore: Send {
    /// What reading or writing the store can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The last saved offset, if any (opaque bytes the source wrote).
    fn load(&self) -> Result<Option<Vec<u8>>, Self::Error>;

    /// Replaces the stored offset, durably.
    fn save(&mut self, offset: &[u8]) -> Result<(), Self::Error>;
}

/// The `[source]` settings every source shares, validated by the binary
/// (`source.name`, `tables`, `exclude_tables`, the password) and handed to
/// the source's own `validate()` with its `[source.<kind>]` section.
#[derive(Clone, Debug)]
pub struct SourceCommon {
    /// `source.name`: event ids, metrics, state.
    pub name: String,
    /// `source.url`, as written (may hold a password: never log it).
    pub url: String,
    /// The password given beside the URL, if any.
    pub password: Option<String>,
    /// Which tables are captured.
    pub filter: crate::TableFilter,
    /// Where each table's records go.
    pub router: crate::StreamRouter,
    /// `[state] dir`: where sources keep offsets.
    pub state_dir: std::path::PathBuf,
    /// `source.snapshot = "initial"`: copy the existing rows of the
    /// captured tables when the source starts without a position.
    pub snapshot: bool,
    /// `source.snapshot = "only"`: copy the captured tables' rows, then
    /// stop (no streaming, nothing left on the server).
    pub snapshot_only: bool,
    /// `source.snapshot_chunk_rows`: rows a snapshot reads per keyset
    /// chunk (the unit of resumption after a crash).
    pub snapshot_chunk_rows: usize,
    /// `source.snapshot_parallelism`: reader connections of a snapshot
    /// (tables, and key ranges of large tables, read at once).
    pub snapshot_parallelism: usize,
}

/// A setting a source cannot use; names the key and the fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SettingError {
    /// The config key, e.g. `source.mysql.server_id`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl SettingError {
    /// An error for `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match authority.rfind('@') {
        Some(at) => match authority[..at].find(':') {
            Some(colon) => format!(
                "{}{}:***{}",
                &url[..scheme_end + 3],
                &authority[..colon],
                &rest[at..]
            ),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Budget a source takes at a time (records draw on it one by one).
const BUDGET_CHUNK: usize = 256 * 1024;

/// How often a wait on the pipeline wakes up to look at the stop's deadline
/// and to let the source keep its connection alive.
const WAIT_TICK: Duration = Duration::from_millis(100);

/// What a source does while the pipeline makes it wait (for budget, or for
/// room in the queue to the sink), every [`WAIT_TICK`]: e.g. Postgres sends
/// standby status updates so the server neither times the connection out
/// nor holds WAL that is already acknowledged.
pub trait WhileWaiting: Send {
    /// The source's error; a closed pipeline is one of them.
    type Error: From<PipelineClosed>;
    /// Called between looks at the budget and the queue.
    fn tick(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Nothing to do while waiting.
impl WhileWaiting for () {
    type Error = PipelineClosed;
    async fn tick(&mut self) -> Result<(), PipelineClosed> {
        Ok(())
    }
}

/// Hands records to the sink in batches, numbered and paid for from the
/// budget: the shared half of every source's streaming and snapshot loops.
///
/// Every wait it does (for budget while the sink is behind, for room in the
/// queue to the sink) watches the stop: once a shutdown was requested
/// ([`Emitter::stop_when`]) a wait lasts until the drain timeout at most,
/// then the open transaction is dropped uncommitted and the emitter is
/// [`Emitter::abandoned`]. A stalled Kinesis can therefore never hold a stop
/// past `sink.drain_timeout_secs`.
#[derive(Debug)]
pub struct Emitter {
    out: Option<mpsc::Sender<Vec<Record>>>,
    tracker: Arc<AckTracker>,
    budget: Arc<Budget>,
    next_seq: u64,
    batch: Vec<Record>,
    batch_records: usize,
    /// Budget taken but not yet given to a record.
    credit: usize,
    /// Set by [`Emitter::stop_when`]: turns true on shutdown.
    shutdown: Option<watch::Receiver<bool>>,
    /// How long a wait may last after the shutdown.
    drain_timeout: Duration,
    /// When the stop must be over, once a wait saw the shutdown.
    stop_deadline: Option<tokio::time::Instant>,
    /// The sink stayed stalled through the drain timeout: the open
    /// transaction was dropped, nothing more is taken or committed.
    abandoned: bool,
}

/// The sink side of the pipeline is gone.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pipeline stopped receiving records")]
pub struct PipelineClosed;

impl Emitter {
    /// An emitter that sends batches of up to `batch_records` records.
    pub fn new(
        out: mpsc::Sender<Vec<Record>>,
        tracker: Arc<AckTracker>,
        budget: Arc<Budget>,
        batch_records: usize,
    ) -> Self {
        let batch_records = batch_records.max(1);
        Self {
            out: Some(out),
            tracker,
            budget,
            next_seq: 0,
            batch: Vec::with_capacity(batch_records),
            batch_records,
            credit: 0,
            shutdown: None,
            drain_timeout: Duration::ZERO,
            stop_deadline: None,
            abandoned: false,
        }
    }

    /// An emitter for a [`SourceContext`]: its queue, tracker and budget,
    /// with waits bounded by its shutdown and drain timeout.
    pub fn for_context(ctx: SourceContext, batch_records: usize) -> Self {
        Self::new(ctx.out, ctx.tracker, ctx.budget, batch_records)
            .stop_when(ctx.shutdown, ctx.drain_timeout)
    }

    /// Bounds every wait by the shutdown: once `shutdown` is true, a wait
    /// for budget or for the sink (a stalled sink, e.g. Kinesis down) lasts
    /// at most `drain_timeout`; then the open transaction is dropped
    /// uncommitted (so nothing of it is acknowledged and a restart sends it
    /// again), [`Emitter::abandoned`] turns true and the source should stop
    /// reading.
    pub fn stop_when(mut self, shutdown: watch::Receiver<bool>, drain_timeout: Duration) -> Self {
        self.shutdown = Some(shutdown);
        self.drain_timeout = drain_timeout;
        self
    }

    /// True once a stop gave up waiting for the sink (see [`Emitter::stop_when`]).
    pub fn abandoned(&self) -> bool {
        self.abandoned
    }

    /// True once a shutdown was requested and its drain timeout passed
    /// (counted from the first wait that saw the request).
    fn stop_overdue(
        shutdown: Option<&watch::Receiver<bool>>,
        stop_deadline: &mut Option<tokio::time::Instant>,
        drain_timeout: Duration,
    ) -> bool {
        if !shutdown.is_some_and(|s| *s.borrow()) {
            return false;
        }
        let deadline =
            *stop_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain_timeout);
        tokio::time::Instant::now() >= deadline
    }

    /// Gives up the open transaction: its batched records are dropped
    /// (their budget given back) and nothing is committed from now on.
    fn abandon(&mut self) {
        let budget = &self.budget;
        let held: usize = self
            .batch
            .drain(..)
            .map(|r| r.weight().min(budget.capacity()))
            .sum();
        budget.release(held + std::mem::take(&mut self.credit));
        self.abandoned = true;
    }

    /// Waits for `want` bytes of budget, ticking `waiting`; false when the
    /// stop's deadline passed first.
    async fn acquire<W: WhileWaiting>(
        &mut self,
        want: usize,
        waiting: &mut W,
    ) -> Result<bool, W::Error> {
        let budget = self.budget.clone();
        let acquire = budget.acquire(want);
        tokio::pin!(acquire);
        loop {
            if Self::stop_overdue(
                self.shutdown.as_ref(),
                &mut self.stop_deadline,
                self.drain_timeout,
            ) {
                return Ok(false);
            }
            tokio::select! {
                _ = &mut acquire => return Ok(true),
                _ = tokio::time::sleep(WAIT_TICK) => waiting.tick().await?,
            }
        }
    }

    /// The sequence number the next record gets: the records pushed so far
    /// are below it.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The tracker records are numbered for.
    pub fn tracker(&self) -> &Arc<AckTracker> {
        &self.tracker
    }

    /// Takes budget for a record (waiting while the sink is behind), numbers
    /// it and adds it to the batch.
    pub async fn push(&mut self, record: Record) -> Result<(), PipelineClosed> {
        self.push_waiting(record, &mut ()).await
    }

    /// [`Emitter::push`], ticking `waiting` while it waits.
    pub async fn push_waiting<W: WhileWaiting>(
        &mut self,
        mut record: Record,
        waiting: &mut W,
    ) -> Result<(), W::Error> {
        if self.abandoned {
            return Ok(());
        }
        let weight = record.weight().min(self.budget.capacity());
        if self.credit < weight {
            // Take budget in chunks; give the remainder back first so a
            // record as large as the whole budget can still get it.
            if self.credit > 0 {
                self.budget.release(self.credit);
                self.credit = 0;
            }
            let want = weight.max(BUDGET_CHUNK).min(self.budget.capacity());
            if self.budget.available() < want {
                // Hand over what we hold so it can complete and free budget.
                self.flush_waiting(waiting).await?;
                if self.abandoned {
                    return Ok(());
                }
            }
            if !self.acquire(want, waiting).await? {
                self.abandon();
                return Ok(());
            }
            self.credit = want;
        }
        self.credit -= weight;
        record.seq = self.next_seq;
        self.next_seq += 1;
        self.batch.push(record);
        if self.batch.len() >= self.batch_records {
            self.flush_waiting(waiting).await?;
        }
        Ok(())
    }

    /// Hands the batch to the sink.
    pub async fn flush(&mut self) -> Result<(), PipelineClosed> {
        self.flush_waiting(&mut ()).await
    }

    /// [`Emitter::flush`], ticking `waiting` while the queue to the sink is
    /// full (the sink is behind: e.g. many one-record transactions during a
    /// Kinesis outage).
    pub async fn flush_waiting<W: WhileWaiting>(
        &mut self,
        waiting: &mut W,
    ) -> Result<(), W::Error> {
        if self.batch.is_empty() || self.abandoned {
            return Ok(());
        }
        let out = self.out.clone().ok_or(PipelineClosed)?;
        let permit = loop {
            if let Ok(permit) = out.try_reserve() {
                break permit;
            }
            if Self::stop_overdue(
                self.shutdown.as_ref(),
                &mut self.stop_deadline,
                self.drain_timeout,
            ) {
                // Only records of the open transaction are batched (every
                // commit flushes): dropping them loses nothing acknowledged.
                self.abandon();
                return Ok(());
            }
            tokio::select! {
                permit = out.reserve() => break permit.map_err(|_| PipelineClosed)?,
                _ = tokio::time::sleep(WAIT_TICK) => waiting.tick().await?,
            }
        };
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_records));
        self.tracker.issued(self.next_seq);
        permit.send(batch);
        Ok(())
    }

    /// A transaction ended at `watermark`: hands its records over and tells
    /// the tracker.
    pub async fn commit(&mut self, watermark: u64) -> Result<(), PipelineClosed> {
        self.commit_waiting(watermark, &mut ()).await
    }

    /// [`Emitter::commit`], ticking `waiting` while it waits.
    pub async fn commit_waiting<W: WhileWaiting>(
        &mut self,
        watermark: u64,
        waiting: &mut W,
    ) -> Result<(), W::Error> {
        self.flush_waiting(waiting).await?;
        if self.abandoned {
            // Records of this transaction were dropped: never commit it.
            return Ok(());
        }
        self.tracker.commit(self.next_seq, watermark);
        Ok(())
    }

    /// True when records wait in the batch.
    pub fn has_pending(&self) -> bool {
        !self.batch.is_empty()
    }

    /// Flushes and closes the sink's input (graceful stop), then waits for
    /// the tracker to drain: up to `timeout`, or to the stop's deadline if a
    /// wait already started it.
    pub async fn close_and_drain(&mut self, timeout: Duration) -> Result<Stopped, PipelineClosed> {
        self.close_and_drain_waiting(timeout, &mut ()).await
    }

    /// [`Emitter::close_and_drain`], ticking `waiting` while it waits.
    pub async fn close_and_drain_waiting<W: WhileWaiting>(
        &mut self,
        timeout: Duration,
        waiting: &mut W,
    ) -> Result<Stopped, W::Error> {
        self.flush_waiting(waiting).await?;
        self.out = None;
        if self.abandoned {
            // The open transaction was dropped: work is left whatever the
            // tracker says.
            return Ok(Stopped::TimedOut);
        }
        let deadline = self
            .stop_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + timeout);
        while !self.tracker.is_drained() {
            if tokio::time::Instant::now() >= deadline {
                return Ok(Stopped::TimedOut);
            }
            waiting.tick().await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Stopped::Drained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::Acks;

    fn record(len: usize) -> Record {
        Record::new("s".into(), "k".into(), vec![b'x'; len])
    }

    fn block_on(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(test);
    }

    #[test]
    fn numbers_batches_and_commits_at_transaction_ends() {
        block_on(async {
            let tracker = Arc::new(AckTracker::new(0));
            let budget = Arc::new(Budget::new(1 << 20));
            let acks = Acks::new(tracker.clone(), budget.clone());
            let (tx, mut rx) = mpsc::channel(16);
            let mut emitter = Emitter::new(tx, tracker.clone(), budget.clone(), 2);
            for _ in 0..3 {
                emitter.push(record(10)).await.unwrap();
            }
            let first = rx.recv().await.unwrap();
            assert_eq!(first.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1]);
            assert!(emitter.has_pending());
            emitter.commit(0x1_0000_0200).await.unwrap();
            let second = rx.recv().await.unwrap();
            assert_eq!(second[0].seq, 2);
            acks.done(&first);
            assert_eq!(tracker.acked(), 0, "record 2 is not done");
            acks.done(&second);
            assert_eq!(tracker.acked(), 0x1_0000_0200);
            assert_eq!(
                emitter
                    .close_and_drain(Duration::from_millis(50))
                    .await
                    .unwrap(),
                Stopped::Drained
            );
            assert!(emitter.push(record(1)).await.is_ok(), "batched, not sent");
            assert!(emitter.flush().await.is_err(), "the input is closed");
        });
    }

    #[test]
    fn a_stop_while_the_sink_is_stalled_drops_the_open_transaction_at_the_timeout() {
        block_on(async {
            let tracker = Arc::new(AckTracker::new(0));
            let budget = Arc::new(Budget::new(1024));
            let (tx, _rx) = mpsc::channel(16);
            let (stop, shutdown) = watch::channel(false);
            let mut emitter = Emitter::new(tx, tracker.clone(), budget.clone(), 100)
                .stop_when(shutdown, Duration::from_millis(200));
            // The sink never reports anything done: the budget runs out.
            emitter.push(record(1000)).await.unwrap();
            let stopped =
                tokio::time::timeout(Duration::from_millis(300), emitter.push(record(1000)));
            assert!(stopped.await.is_err(), "without a stop, the wait goes on");
            stop.send_replace(true);
            let started = tokio::time::Instant::now();
            emitter.push(record(1000)).await.unwrap();
            assert!(emitter.abandoned());
            assert!(started.elapsed() >= Duration::from_millis(200));
            // Nothing of the open transaction is committed or sent.
            emitter.commit(0x2_0000_0000).await.unwrap();
            assert!(!emitter.has_pending());
            assert_eq!(
                emitter
                    .close_and_drain(Duration::from_secs(60))
                    .await
                    .unwrap(),
                Stopped::TimedOut,
                "the drain shares the deadline: no second wait"
            );
            assert_eq!(tracker.acked(), 0);
        });
    }
}

//! Snapshot progress: what a resumable snapshot has delivered (persisted in
//! `[state] dir`), and what a person watches while it runs (log lines, a
//! progress bar, metrics).
//!
//! First stage of the dataflow, beside each source's snapshot reader. The
//! rule that protects "nothing lost": a chunk counts as done only when the
//! [`AckTracker`] reports every record up to the chunk's last one done
//! (records are numbered densely in the order they were read, so
//! [`AckTracker::done_below`] passing the chunk's end means Kinesis, or the
//! dead-letter store, holds every row of it and of every chunk before it).
//! [`ChunkLedger`] keeps the chunks handed to the sink in order and writes
//! the progress of the last done one, atomically (see [`crate::state_file`]),
//! into the snapshot's marker file. A restart reads the tables not done
//! from the key after the stored one: rows of a chunk that was sent but not
//! yet acknowledged are read and sent again (at-least-once).
//!
//! Snapshot rows take positions `{major}:{ordinal}` below the stream's
//! start; the progress keeps the position of the last row of the last done
//! chunk, so a resumed snapshot numbers the rows it re-reads from the same
//! ordinal the first run gave them. A snapshot read in key ranges by
//! parallel readers (Postgres) stores its plan, [`RangeProgress`] per
//! range: each range has its own `major` and counts its own ordinals, and
//! its chunks are recorded with [`ChunkLedger::sent_range`]; chunks of all
//! ranges still reach the ledger in the order they were handed over, so
//! the rule above holds unchanged.
//!
//! A chunk is recorded with the [`Emitter`] that handed it over, never with
//! a bare sequence number: once a stop gave up waiting for the sink
//! ([`Emitter::abandoned`]) later records of the chunk were dropped, not
//! numbered, so "every record below the end is done" would pass over them;
//! the ledger then records nothing more, and a restart reads that chunk
//! again.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, counter, gauge};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::OffsetStore as _;
use crate::ack::AckTracker;
use crate::source::Emitter;
use crate::state_file::FileOffsetStore;

/// Counter: snapshot rows read and handed to the sink, by `source` and
/// `table`.
pub const ROWS: &str = "tributary_snapshot_rows_total";
/// Gauge: the table's estimated row count from the server's statistics
/// (Postgres `pg_class.reltuples`, MySQL `information_schema.TABLES.TABLE_ROWS`),
/// by `source` and `table`.
pub const ROWS_ESTIMATED: &str = "tributary_snapshot_rows_estimated";
/// Gauge: tables whose snapshot copy is finished in this run (or was
/// finished before a resume), by `source`.
pub const TABLES_DONE: &str = "tributary_snapshot_tables_done";

/// Every snapshot metric name.
pub const ALL: [&str; 3] = [ROWS, ROWS_ESTIMATED, TABLES_DONE];

/// How often a table's progress line is logged.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// The stored progress of a snapshot: where its stream starts and what of
/// each table Kinesis holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// The source position the stream starts from once the snapshot is
    /// delivered (Postgres: the slot's consistent point as an LSN; MySQL:
    /// the binlog offset), in the source's own text. Empty until the
    /// consistent point is taken: such a snapshot cannot be resumed.
    pub start: String,
    /// `major` of the snapshot rows' positions after the last done chunk.
    pub major: u64,
    /// The ordinal of the last row of the last done chunk: a resumed
    /// snapshot numbers its rows from the next one.
    pub ordinal: u32,
    /// Per captured table (`schema.table`, MySQL `db.table`): its progress.
    /// A table not listed is read from its first row.
    pub tables: BTreeMap<String, TableProgress>,
    /// A snapshot read in key ranges (Postgres): the ranges as planned
    /// when it began, fixed for its whole life, each with its own
    /// progress and position space. Empty for a snapshot read table by
    /// table (MySQL).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<RangeProgress>,
}

/// One key range of a table read by a parallel snapshot, and how far it got.
///
/// Every range has its own `major`, so its rows take positions
/// `{major}:{ordinal}` with ordinals counted from 0 within the range:
/// whichever reader reads it, and in whatever order the ranges finish, a
/// chunk read again after a restart starts at the ordinal the first run
/// gave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeProgress {
    /// The table (`schema.table`).
    pub table: String,
    /// The lowest value of the key's first column in the range (inclusive,
    /// as text); `None`: unbounded.
    pub from: Option<String>,
    /// The value of the key's first column where the next range starts
    /// (exclusive, as text); `None`: unbounded.
    pub to: Option<String>,
    /// The `major` of the range's row positions.
    pub major: u64,
    /// The ordinal the range's next row takes (rows delivered so far).
    pub ordinal: u32,
    /// How far the range got; `None`: not started.
    pub state: Option<TableProgress>,
}

/// How far one table's copy got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableProgress {
    /// Every row is delivered.
    Done,
    /// Rows up to this primary key (its columns' values, in key order, as
    /// the source encodes them) are delivered.
    After(Vec<String>),
}

impl SnapshotProgress {
    /// Progress of a snapshot whose stream starts at `start`, nothing read.
    pub fn new(start: impl Into<String>, major: u64) -> Self {
        Self {
            start: start.into(),
            major,
            ..Self::default()
        }
    }

    /// The stored bytes (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("progress always serializes")
    }

    /// Parses [`SnapshotProgress::encode`]'s bytes; `None` for anything
    /// else (such as the marker of an older version: not resumable).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// True when the stored progress names a stream start: a resumable
    /// snapshot.
    pub fn resumable(&self) -> bool {
        !self.start.is_empty()
    }

    /// Reads the progress in the marker `path`: `None` when the file is
    /// missing, `Some(None)` when it holds no resumable progress.
    pub fn load(path: &Path) -> std::io::Result<Option<Option<Self>>> {
        Ok(FileOffsetStore::new(path)
            .load()?
            .map(|bytes| Self::decode(&bytes).filter(Self::resumable)))
    }

    /// Writes the progress to `path`, atomically and durably.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        FileOffsetStore::new(path).save(&self.encode())
    }
}

/// The end of a chunk handed to the sink: what becomes true of the
/// progress once every record before `end_seq` is done.
#[derive(Debug)]
struct ChunkEnd {
    end_seq: u64,
    state: TableProgress,
    ordinal: u32,
    of: ChunkOf,
}

/// What a chunk belongs to.
#[derive(Debug)]
enum ChunkOf {
    /// A table read whole, with the snapshot's one position space.
    Table { table: String, major: u64 },
    /// The range at this index of [`SnapshotProgress::ranges`].
    Range(usize),
}

/// Chunks handed to the sink, in order, and the progress file that
/// records the last one the tracker reports done.
#[derive(Debug)]
pub struct ChunkLedger {
    path: PathBuf,
    stored: SnapshotProgress,
    pending: VecDeque<ChunkEnd>,
}

impl ChunkLedger {
    /// A ledger over the progress `stored` (already in the file at `path`).
    pub fn new(path: impl Into<PathBuf>, stored: SnapshotProgress) -> Self {
        Self {
            path: path.into(),
            stored,
            pending: VecDeque::new(),
        }
    }

    /// The progress as stored (only acknowledged chunks).
    pub fn stored(&self) -> &SnapshotProgress {
        &self.stored
    }

    /// A chunk of `table` was handed over through `emitter` (its records
    /// are below [`Emitter::next_seq`]); once done, the table is in
    /// `state` and its next row takes position `major:ordinal`. Ignored
    /// once the emitter gave up (see the module doc).
    pub fn sent(
        &mut self,
        emitter: &Emitter,
        table: &str,
        state: TableProgress,
        major: u64,
        ordinal: u32,
    ) {
        let of = ChunkOf::Table {
            table: table.to_owned(),
            major,
        };
        self.handed_over(emitter, state, ordinal, of);
    }

    /// A chunk of the range at `index` of the stored progress's `ranges`
    /// was handed over through `emitter`; once done, the range is in
    /// `state` and its next row takes ordinal `ordinal`. Ignored once the
    /// emitter gave up.
    pub fn sent_range(
        &mut self,
        emitter: &Emitter,
        index: usize,
        state: TableProgress,
        ordinal: u32,
    ) {
        self.handed_over(emitter, state, ordinal, ChunkOf::Range(index));
    }

    fn handed_over(&mut self, emitter: &Emitter, state: TableProgress, ordinal: u32, of: ChunkOf) {
        if emitter.abandoned() {
            return;
        }
        self.pending.push_back(ChunkEnd {
            end_seq: emitter.next_seq(),
            state,
            ordinal,
            of,
        });
    }

    /// Stores the progress of the chunks the tracker reports done; returns
    /// whether the file was written.
    pub fn persist_done(&mut self, tracker: &AckTracker) -> std::io::Result<bool> {
        let done_below = tracker.done_below();
        let mut changed = false;
        while let Some(chunk) = self.pending.front() {
            if chunk.end_seq > done_below {
                break;
            }
            let chunk = self.pending.pop_front().expect("front exists");
            match chunk.of {
                ChunkOf::Table { table, major } => {
                    self.stored.tables.insert(table, chunk.state);
                    self.stored.major = major;
                    self.stored.ordinal = chunk.ordinal;
                }
                ChunkOf::Range(index) => {
                    if let Some(range) = self.stored.ranges.get_mut(index) {
                        range.state = Some(chunk.state);
                        range.ordinal = chunk.ordinal;
                    }
                }
            }
            changed = true;
        }
        if changed {
            self.stored.save(&self.path)?;
        }
        Ok(changed)
    }
}

static BAR: AtomicBool = AtomicBool::new(false);

/// The bars of the tables being copied, drawn together on stderr.
fn bars() -> &'static indicatif::MultiProgress {
    static BARS: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    BARS.get_or_init(|| {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
    })
}

/// Draw a progress bar on stderr while a snapshot copies a table (the
/// binary turns it on when stderr is a terminal and logs are not JSON).
pub fn enable_progress_bar(on: bool) {
    BAR.store(on, Ordering::Relaxed);
}

/// The snapshot metrics of one source, registered once.
#[derive(Debug)]
pub struct SnapshotMetrics {
    source: String,
    tables_done: Gauge,
    done: u32,
}

impl SnapshotMetrics {
    /// The metrics of source `source`.
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_owned(),
            tables_done: gauge!(TABLES_DONE, "source" => source.to_owned()),
            done: 0,
        }
    }

    /// Starts watching the copy of `table`, of about `estimated` rows
    /// (0: unknown), logging where it starts.
    pub fn start_table(&self, table: &str, estimated: u64, after: Option<&[String]>) -> TableWatch {
        let labels = [("source", self.source.clone()), ("table", table.to_owned())];
        let estimate_gauge = gauge!(ROWS_ESTIMATED, &labels);
        #[allow(clippy::cast_precision_loss)]
        estimate_gauge.set(estimated as f64);
        match after {
            Some(key) => {
                info!(table, estimated_rows = estimated, after_key = ?key, "snapshot: resuming table after its last acknowledged key");
            }
            None => info!(table, estimated_rows = estimated, "snapshot: copying table"),
        }
        let bar = BAR.load(Ordering::Relaxed).then(|| {
            // One set of bars on stderr: tables copied at once each get a
            // line of their own.
            let bar = bars().add(indicatif::ProgressBar::new(estimated));
            if estimated == 0 {
                bar.unset_length();
            }
            let style = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} rows, {per_sec}, eta {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(table.to_owned());
            bar
        });
        TableWatch {
            table: table.to_owned(),
            estimated,
            rows: 0,
            began: Instant::now(),
            reported: Instant::now(),
            counter: counter!(ROWS, &labels),
            bar,
        }
    }

    /// A table was finished (in this run, or before a resume).
    pub fn table_done(&mut self) {
        self.done += 1;
        self.tables_done.set(f64::from(self.done));
    }
}

/// The watch over one table's copy: counts rows, logs every
/// [`REPORT_EVERY`] (rows, estimate, rows/s, ETA), draws the bar.
#[derive(Debug)]
pub struct TableWatch {
    table: String,
    estimated: u64,
    rows: u64,
    began: Instant,
    reported: Instant,
    counter: Counter,
    bar: Option<indicatif::ProgressBar>,
}

impl TableWatch {
    /// `rows` more rows were handed to the sink.
    pub fn add(&mut self, rows: u64) {
        self.rows += rows;
        self.counter.increment(rows);
        if let Some(bar) = &self.bar {
            bar.inc(rows);
        }
        if self.reported.elapsed() >= REPORT_EVERY {
            self.reported = Instant::now();
            let per_sec = self.per_sec();
            let eta_secs = eta(self.rows, self.estimated, per_sec);
            let line = || {
                info!(table = %self.table, rows = self.rows, estimated_rows = self.estimated,
                      rows_per_sec = per_sec as u64, eta_secs, "snapshot: copying");
            };
            match &self.bar {
                Some(_) => bars().suspend(line),
                None => line(),
            }
        }
    }

    /// Rows handed over so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn per_sec(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let rows = self.rows as f64;
        rows / self.began.elapsed().as_secs_f64().max(0.001)
    }

    /// The table is read to its end.
    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
            bars().remove(bar);
        }
        info!(table = %self.table, rows = self.rows, rows_per_sec = self.per_sec() as u64,
              secs = self.began.elapsed().as_secs_f64(), "snapshot: table copied");
    }
}

/// Seconds left at `per_sec` for the rows between `rows` and `estimated`
/// (0 when the estimate is passed or unknown).
fn eta(rows: u64, estimated: u64, per_sec: f64) -> u64 {
    if per_sec <= 0.0 {
        return 0;
    }
    #[allow(clippy::cast_precision_loss)]
    let left = estimated.saturating_sub(rows) as f64;
    (left / per_sec) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An emitter to number records with, on its own runtime.
    struct Emitting {
        emitter: Emitter,
        runtime: tokio::runtime::Runtime,
        _batches: tokio::sync::mpsc::Receiver<Vec<crate::Record>>,
        stop: tokio::sync::watch::Sender<bool>,
    }

    impl Emitting {
        /// With a budget of `budget` bytes and no drain time once stopped.
        fn new(budget: usize) -> Self {
            let (out, batches) = tokio::sync::mpsc::channel(16);
            let (stop, shutdown) = tokio::sync::watch::channel(false);
            let emitter = Emitter::new(
                out,
                std::sync::Arc::new(AckTracker::new(0)),
                std::sync::Arc::new(crate::ack::Budget::new(budget)),
                10_000,
            )
            .stop_when(shutdown, Duration::ZERO);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            Self {
                emitter,
                runtime,
                _batches: batches,
                stop,
            }
        }

        /// Hands over `n` records of 100 bytes.
        fn push(&mut self, n: usize) {
            for _ in 0..n {
                let record = crate::Record::new("s".into(), "k".into(), vec![b'x'; 100]);
                self.runtime.block_on(self.emitter.push(record)).unwrap();
            }
        }
    }

    #[test]
    fn a_chunk_handed_over_after_the_emitter_gave_up_is_not_recorded() {
        let dir = std::env::temp_dir().join(format!("tributary-gaveup-{}", std::process::id()));
        let path = dir.join("snap.pending");
        let first = SnapshotProgress::new("0/16B3748", 41);
        first.save(&path).unwrap();
        let mut ledger = ChunkLedger::new(&path, first.clone());
        let tracker = AckTracker::new(0);
        // A budget of two records: the third waits for the sink.
        let mut emitter = Emitting::new(2 * 120);
        emitter.push(2);
        ledger.sent(
            &emitter.emitter,
            "public.a",
            TableProgress::After(vec!["2".into()]),
            41,
            2,
        );
        // A stop with the sink stalled: the emitter gives up on the third
        // record of the next chunk and drops the rest of it.
        emitter.stop.send(true).unwrap();
        emitter.push(3);
        assert!(emitter.emitter.abandoned());
        ledger.sent(
            &emitter.emitter,
            "public.a",
            TableProgress::After(vec!["5".into()]),
            41,
            5,
        );
        // The two numbered records are done: only the first chunk counts.
        tracker.issued(2);
        tracker.complete([0, 1]);
        assert!(ledger.persist_done(&tracker).unwrap());
        let stored = SnapshotProgress::load(&path).unwrap().unwrap().unwrap();
        assert_eq!(
            stored.tables["public.a"],
            TableProgress::After(vec!["2".into()]),
            "the chunk whose rows were dropped is read again"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn only_done_chunks_reach_the_file() {
        let dir = std::env::temp_dir().join(format!("tributary-progress-{}", std::process::id()));
        let path = dir.join("snap.pending");
        let first = SnapshotProgress::new("0/16B3748", 41);
        first.save(&path).unwrap();
        let mut ledger = ChunkLedger::new(&path, first.clone());
        let tracker = AckTracker::new(0);
        tracker.issued(6);
        let mut emitter = Emitting::new(1 << 20);
        emitter.push(3);
        ledger.sent(
            &emitter.emitter,
            "public.a",
            TableProgress::After(vec!["3".into()]),
            41,
            3,
        );
        emitter.push(3);
        ledger.sent(&emitter.emitter, "public.a", TableProgress::Done, 41, 6);
        tracker.complete([0, 1, 3, 4, 5]);
        assert!(
            !ledger.persist_done(&tracker).unwrap(),
            "row 2 is in flight"
        );
        assert_eq!(SnapshotProgress::load(&path).unwrap(), Some(Some(first)));
        tracker.complete([2]);
        assert!(ledger.persist_done(&tracker).unwrap());
        let stored = SnapshotProgress::load(&path).unwrap().unwrap().unwrap();
        assert_eq!(stored.tables["public.a"], TableProgress::Done);
        assert_eq!((stored.major, stored.ordinal), (41, 6));
        std::fs::write(&path, b"a snapshot is under way\n").unwrap();
        assert_eq!(
            SnapshotProgress::load(&path).unwrap(),
            Some(None),
            "an old marker is not resumable"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ranges_record_their_own_progress_in_the_order_chunks_were_sent() {
        let dir = std::env::temp_dir().join(format!("tributary-ranges-{}", std::process::id()));
        let path = dir.join("snap.pending");
        let range = |from: Option<&str>, to: Option<&str>, major| RangeProgress {
            table: "public.t".into(),
            from: from.map(Into::into),
            to: to.map(Into::into),
            major,
            ordinal: 0,
            state: None,
        };
        let mut first = SnapshotProgress::new("0/16B3748", 41);
        first.ranges = vec![range(None, Some("500"), 41), range(Some("500"), None, 40)];
        first.save(&path).unwrap();
        let mut ledger = ChunkLedger::new(&path, first);
        let tracker = AckTracker::new(0);
        tracker.issued(6);
        // Chunks of the two ranges interleave as their readers deliver.
        let mut emitter = Emitting::new(1 << 20);
        emitter.push(2);
        ledger.sent_range(
            &emitter.emitter,
            1,
            TableProgress::After(vec!["501".into()]),
            2,
        );
        emitter.push(2);
        ledger.sent_range(
            &emitter.emitter,
            0,
            TableProgress::After(vec!["2".into()]),
            2,
        );
        emitter.push(2);
        ledger.sent_range(&emitter.emitter, 1, TableProgress::Done, 4);
        tracker.complete([0, 1, 3, 4, 5]);
        assert!(ledger.persist_done(&tracker).unwrap());
        let stored = SnapshotProgress::load(&path).unwrap().unwrap().unwrap();
        assert_eq!(
            stored.ranges[1].state,
            Some(TableProgress::After(vec!["501".into()]))
        );
        assert_eq!(stored.ranges[1].ordinal, 2);
        assert_eq!(stored.ranges[0].state, None, "row 2 is in flight");
        tracker.complete([2]);
        assert!(ledger.persist_done(&tracker).unwrap());
        let stored = SnapshotProgress::load(&path).unwrap().unwrap().unwrap();
        assert_eq!(
            (stored.ranges[0].state.clone(), stored.ranges[0].ordinal),
            (Some(TableProgress::After(vec!["2".into()])), 2)
        );
        assert_eq!(
            (stored.ranges[1].state.clone(), stored.ranges[1].ordinal),
            (Some(TableProgress::Done), 4)
        );
        assert_eq!(stored.ranges[1].major, 40, "the plan is kept as it was");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_watched_table_counts_its_rows_with_or_without_a_bar() {
        let mut metrics = SnapshotMetrics::new("shop");
        for bar in [true, false] {
            enable_progress_bar(bar);
            let mut watch = metrics.start_table("public.t", 10, None);
            assert_eq!(watch.bar.is_some(), bar);
            watch.add(4);
            watch.add(3);
            assert_eq!(watch.rows(), 7);
            watch.finish();
            metrics.table_done();
        }
        enable_progress_bar(false);
        assert_eq!(metrics.done, 2);
    }

    #[test]
    fn eta_counts_the_rows_left() {
        assert_eq!(eta(1_000, 11_000, 500.0), 20);
        assert_eq!(eta(12_000, 11_000, 500.0), 0);
        assert_eq!(eta(0, 0, 0.0), 0);
    }
}

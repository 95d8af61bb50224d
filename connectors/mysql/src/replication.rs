//! The streaming loop: reads the row binlog as a replica, decodes row
//! changes into records for the sink, and writes to the offset store only
//! the positions the [`AckTracker`](tributary_envelope::AckTracker) says are
//! fully done.
//!
//! A transaction is never split across an acknowledgement: the tracker is
//! told only about transaction ends (the position after an XID event, a
//! `COMMIT` query, or a DDL statement), so the stored offset is always a
//! transaction boundary. On shutdown the loop finishes the transaction it is
//! in, waits for the sink to report everything done, writes the last offset
//! and only then closes the stream. After a dropped connection it resumes
//! after the last transaction it read (records in flight stay in flight);
//! after a restart, after the stored offset.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use mysql_async::binlog::events::{Event, EventData};
use mysql_async::prelude::Queryable as _;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};
use tributary_envelope::captured::display_all;
use tributary_envelope::{
    CapturedTables, Emitter, OffsetStore as _, SourceContext, SourceError as _, Stopped,
};

use crate::config::MysqlSourceConfig;
use crate::decoder::{Decoder, Transaction, truncated_table};
use crate::error::MysqlError;
use crate::gtid::GtidState;
use crate::offsets::{FileOffsetStore, Offset, file_index, watermark};
use crate::schema::{Catalog, TableSchema};
use crate::setup::{self, StartBy};
use crate::snapshot::{self, PendingSnapshot};
use tributary_envelope::snapshot_progress::{
    ChunkLedger, SnapshotMetrics, SnapshotProgress, TableProgress,
};

/// `fut`, failed as a dropped connection when it takes longer than `limit`
/// (a statement on a connection whose peer went silent never ends).
async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, MysqlError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| MysqlError::Connection {
            context: format!("{what}: no answer within {limit:?}"),
            source: mysql_async::Error::Other("statement timed out".into()),
        })
}

/// MariaDB's GTID event (read by hand: the library does not decode it).
const MARIADB_GTID_EVENT: u8 = 162;
/// MariaDB's GTID event flag: a statement outside any BEGIN (DDL).
const MARIADB_FL_STANDALONE: u8 = 1;
/// The offset store is written at most this often while streaming.
const SAVE_INTERVAL: Duration = Duration::from_millis(100);

/// A connected MySQL source, ready to stream.
pub struct MysqlSource {
    cfg: MysqlSourceConfig,
    side: Conn,
    start: Offset,
    fresh: bool,
    store: FileOffsetStore,
    snapshot: Option<PendingSnapshot>,
    /// Tables whose rows were copied (or that were captured from their
    /// first row), as stored in `[state] dir`.
    captured: CapturedTables,
    captured_path: std::path::PathBuf,
    /// Tables added to `source.tables` since the last run: copied alone
    /// before streaming resumes.
    added: Vec<(String, String)>,
    /// The chunk ledger of a snapshot a stop interrupted: what the final
    /// drain delivers is recorded in it before the process exits.
    interrupted: Option<ChunkLedger>,
}

impl std::fmt::Debug for MysqlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlSource")
            .field("server_id", &self.cfg.server_id)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

fn describe(cfg: &MysqlSourceConfig) -> String {
    format!("{}:{}", cfg.opts.ip_or_hostname(), cfg.opts.tcp_port())
}

impl MysqlSource {
    /// Connects, checks the server, and loads the stored offset (or takes
    /// the server's current position on the first start and stores it).
    pub async fn connect(cfg: MysqlSourceConfig) -> Result<Self, MysqlError> {
        let server = describe(&cfg);
        let mut side = cfg
            .opts
            .connect()
            .await
            .map_err(MysqlError::connection(format!("connecting to {server}")))?;
        let settings = setup::server_settings(&mut side).await?;
        setup::check(&settings, cfg.server_id)?;
        setup::check_server_id_unique(
            &mut side,
            cfg.server_id,
            &setup::registration_host(&cfg.name),
        )
        .await?;
        let mut store = FileOffsetStore::new(&cfg.offset_file);
        let offset_error = |source| MysqlError::Offset {
            path: cfg.offset_file.display().to_string(),
            source,
        };
        // A marker: an earlier snapshot did not finish. When it recorded
        // its binlog position the snapshot resumes (the offset file, if
        // any, is not trusted); otherwise it is taken again.
        let marker = snapshot::marker_path(&cfg.state_dir, &cfg.name);
        if cfg.snapshot_only {
            // Copy and stop: no offset, no marker, no lock.
            let taken = snapshot::begin(&cfg.opts, None, None).await?;
            return Ok(Self {
                start: taken.position.clone(),
                snapshot: Some(taken),
                captured_path: CapturedTables::path(&cfg.state_dir, "mysql", &cfg.name),
                cfg,
                side,
                fresh: false,
                store,
                captured: CapturedTables::default(),
                added: Vec::new(),
                interrupted: None,
            });
        }
        let unfinished = marker.exists();
        let resume = if unfinished {
            resumable(&mut side, &marker).await?
        } else {
            None
        };
        if unfinished && resume.is_none() {
            warn!(marker = %marker.display(),
                  "an earlier snapshot did not finish and cannot be resumed: taking the snapshot again");
        }
        let stored = if unfinished {
            None
        } else {
            store.load().map_err(offset_error)?
        };
        let mut pending = None;
        let (start, fresh) = match stored {
            Some(bytes) => {
                let offset = Offset::decode(&bytes).ok_or_else(|| {
                    offset_error(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "unreadable offset file (expected file=, pos= and gtid= lines)",
                    ))
                })?;
                let present = setup::binlog_present(&mut side, &offset.file).await?;
                let plan = setup::start_by(
                    cfg.resume,
                    &offset,
                    settings.server_id,
                    present,
                    &cfg.offset_file.display().to_string(),
                )?;
                info!(file = %offset.file, pos = offset.pos, gtid = offset.gtid.as_deref().unwrap_or(""),
                      resume_by = ?plan, "resuming at the stored offset");
                (offset, false)
            }
            // The offset is written only once the snapshot is acknowledged.
            None if resume.is_some() => {
                let taken = snapshot::begin(&cfg.opts, Some(marker), resume).await?;
                let start = taken.position.clone();
                pending = Some(taken);
                (start, false)
            }
            None if cfg.snapshot || unfinished => {
                snapshot::write_marker(&marker)?;
                let taken = snapshot::begin(&cfg.opts, Some(marker.clone()), None).await?;
                // From here on an interrupted snapshot can be resumed: the
                // marker names the position the stream starts from.
                let start = taken.position.clone();
                let progress = SnapshotProgress::new(
                    String::from_utf8_lossy(&start.encode()),
                    start.watermark().unwrap_or(0).saturating_sub(1),
                );
                progress
                    .save(&marker)
                    .map_err(|source| MysqlError::Offset {
                        path: marker.display().to_string(),
                        source,
                    })?;
                pending = Some(taken);
                (start, false)
            }
            None => {
                let offset = setup::current_position(&mut side).await?;
                store.save(&offset.encode()).map_err(offset_error)?;
                (offset, true)
            }
        };
        if file_index(&start.file).is_none() {
            return Err(MysqlError::Misconfigured {
                setting: "log_bin".into(),
                message: format!(
                    "binlog file {} has no numeric suffix (name.000001)",
                    start.file
                ),
            });
        }
        info!(server = %server, version = %settings.version, file = %start.file, pos = start.pos,
              fresh, "mysql source ready");
        let mut source = Self {
            captured_path: CapturedTables::path(&cfg.state_dir, "mysql", &cfg.name),
            cfg,
            side,
            start,
            fresh,
            store,
            snapshot: pending,
            captured: CapturedTables::default(),
            added: Vec::new(),
            interrupted: None,
        };
        source.plan_added_tables().await?;
        Ok(source)
    }

    /// Compares the matching tables with the stored set of captured ones:
    /// tables added to `source.tables` since the last run are copied before
    /// streaming resumes, unless `snapshot = "never"`; tables no longer
    /// matching are dropped from the set.
    async fn plan_added_tables(&mut self) -> Result<(), MysqlError> {
        if self.snapshot.is_some() {
            // The snapshot copies every matching table and records them.
            return Ok(());
        }
        let mut current = CapturedTables::new(self.matching_tables().await?);
        let stored =
            CapturedTables::load(&self.captured_path).map_err(|source| MysqlError::Offset {
                path: self.captured_path.display().to_string(),
                source,
            })?;
        current.snapshot_end = stored.as_ref().and_then(|s| s.snapshot_end);
        let added: Vec<(String, String)> = match &stored {
            // First start without a snapshot, or a state kept by a version
            // without this file: every matching table streams already.
            None => Vec::new(),
            Some(_) if self.fresh => Vec::new(),
            Some(stored) => current
                .tables
                .iter()
                .filter(|t| !stored.tables.contains(*t))
                .cloned()
                .collect(),
        };
        if let Some(stored) = &stored {
            for gone in stored.tables.difference(&current.tables) {
                info!(table = %tributary_envelope::captured::display(gone),
                      "table no longer matches source.tables (or was dropped): its changes are no \
                       longer captured");
            }
        }
        if added.is_empty() || !self.cfg.snapshot {
            if !added.is_empty() {
                info!(tables = %display_all(&added),
                      "snapshot = \"never\": tables added to source.tables are streamed from now on, \
                       their existing rows are not copied");
            }
            if stored.as_ref() != Some(&current) {
                self.save_captured(current)?;
            } else {
                self.captured = current;
            }
            return Ok(());
        }
        self.captured = CapturedTables::still_current(stored, &current);
        self.added = added;
        Ok(())
    }

    /// The server's base tables that match `source.tables`.
    async fn matching_tables(&mut self) -> Result<Vec<(String, String)>, MysqlError> {
        Ok(snapshot::base_tables(&mut self.side)
            .await?
            .into_iter()
            .filter(|(db, table)| self.cfg.filter.matches(db, table))
            .collect())
    }

    /// Writes the set of captured tables to `[state] dir`.
    /// A set without [`CapturedTables::snapshot_end`] keeps the current one.
    fn save_captured(&mut self, mut captured: CapturedTables) -> Result<(), MysqlError> {
        captured.snapshot_end = captured.snapshot_end.or(self.captured.snapshot_end);
        captured
            .save(&self.captured_path)
            .map_err(|source| MysqlError::Offset {
                path: self.captured_path.display().to_string(),
                source,
            })?;
        self.captured = captured;
        Ok(())
    }

    /// Copies the tables added to `source.tables` since the last run (see
    /// `docs/snapshots.md`, "Tables added later"): read in `START
    /// TRANSACTION WITH CONSISTENT SNAPSHOT` (no lock), their rows take
    /// positions just below the stored offset, where the stream resumes.
    /// False when a shutdown interrupted it (the next start copies them
    /// again).
    async fn copy_added(
        &mut self,
        added: Vec<(String, String)>,
        st: &mut State,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, MysqlError> {
        info!(tables = %display_all(&added), file = %self.start.file, pos = self.start.pos,
              "snapshot: copying tables added to source.tables; the others stream on from the offset");
        let reader = snapshot::begin(&self.cfg.opts, None, None).await?.reader;
        let at = self.start.clone();
        let Some(rows) = self
            .copy_tables(reader, &added, &at, None, st, shutdown)
            .await?
        else {
            return Ok(false);
        };
        let mut captured = self.captured.clone();
        captured.tables.extend(added);
        self.save_captured(captured)?;
        info!(
            rows,
            "snapshot of the added tables complete; streaming from the offset"
        );
        Ok(true)
    }

    /// The watermark of the stored offset (just before the snapshot's
    /// position when a snapshot comes first: its rows commit at it).
    pub fn resume_watermark(&self) -> u64 {
        let mark = self.start.watermark().unwrap_or(0);
        if self.snapshot.is_some() {
            mark.saturating_sub(1)
        } else {
            mark
        }
    }

    /// True when no offset was stored: streaming starts at the server's
    /// current position.
    pub fn starts_fresh(&self) -> bool {
        self.fresh
    }

    /// Streams until shutdown, reconnecting after transient failures.
    pub async fn run(mut self, ctx: SourceContext) -> Result<Stopped, MysqlError> {
        let SourceContext {
            out,
            tracker,
            budget,
            mut shutdown,
            drain_timeout,
            connected,
        } = ctx;
        let mut st = State {
            emitter: Emitter::new(out, tracker, budget, self.cfg.batch_records)
                .stop_when(shutdown.clone(), drain_timeout),
            decoder: Decoder::new(
                &self.cfg.name,
                self.cfg.router.clone(),
                self.cfg.filter.clone(),
            ),
            catalog: Catalog::default(),
            gtids: GtidState::parse(self.start.gtid.as_deref()),
            server_id: self.start.server_id,
            read_to: self.start.clone(),
            saved: self.start.clone(),
            saved_at: Instant::now(),
            pending: VecDeque::new(),
            committed_seq: 0,
            connected,
        };
        if let Some(pending) = self.snapshot.take()
            && !self.copy_snapshot(pending, &mut st, &shutdown).await?
        {
            // Stopped during the snapshot: what the drain delivers is
            // recorded, and the next run resumes after it.
            let stopped = st.emitter.close_and_drain(drain_timeout).await?;
            persist_ledger(self.interrupted.as_mut(), st.emitter.tracker())?;
            return Ok(stopped);
        }
        if self.cfg.snapshot_only {
            info!("snapshot = \"only\": the copy is delivered; stopping");
            return Ok(st.emitter.close_and_drain(drain_timeout).await?);
        }
        let added = std::mem::take(&mut self.added);
        if !added.is_empty() && !self.copy_added(added, &mut st, &shutdown).await? {
            // Stopped during the copy: the next run copies them again.
            return Ok(st.emitter.close_and_drain(drain_timeout).await?);
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let began = Instant::now();
            match self.session(&mut st, &mut shutdown, drain_timeout).await {
                Ok(stopped) => return Ok(stopped),
                Err(err) if err.is_transient() && !*shutdown.borrow() => {
                    st.connected.send_replace(false);
                    if began.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(200);
                    }
                    warn!(error = %err, retry_in = ?backoff, "binlog session failed; reconnecting");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(side) = self.cfg.opts.connect().await {
                        self.side = side;
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Copies every captured table in the snapshot's view (see
    /// `snapshot`), waits until Kinesis has every row, then writes the
    /// offset and removes the marker. False when a shutdown interrupted it.
    async fn copy_snapshot(
        &mut self,
        pending: PendingSnapshot,
        st: &mut State,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, MysqlError> {
        let PendingSnapshot {
            mut reader,
            position,
            marker,
            resume,
            ..
        } = pending;
        let mark = position.watermark().unwrap_or(0);
        let progress = resume.unwrap_or_else(|| {
            SnapshotProgress::new(
                String::from_utf8_lossy(&position.encode()),
                mark.saturating_sub(1),
            )
        });
        let tables: Vec<(String, String)> = snapshot::base_tables(&mut reader)
            .await?
            .into_iter()
            .filter(|(db, table)| self.cfg.filter.matches(db, table))
            .collect();
        info!(tables = tables.len(), file = %position.file, pos = position.pos,
              "snapshot: copying the captured tables");
        let began = Instant::now();
        let Some(total) = self
            .copy_tables(
                reader,
                &tables,
                &position,
                Some((progress, marker.as_deref())),
                st,
                shutdown,
            )
            .await?
        else {
            return Ok(false);
        };
        if marker.is_some() {
            self.save_captured(CapturedTables::new(tables))?;
        }
        if let Some(marker) = &marker {
            self.store
                .save(&position.encode())
                .map_err(|source| MysqlError::Offset {
                    path: self.store.path().display().to_string(),
                    source,
                })?;
            snapshot::remove_marker(marker)?;
        }
        info!(
            rows = total,
            secs = began.elapsed().as_secs_f64(),
            "snapshot complete; streaming from its binlog position"
        );
        Ok(true)
    }

    /// Reads `tables` through `reader` (inside its consistent snapshot) as
    /// snapshot rows, ends the transaction, and waits until Kinesis holds
    /// every row. With `resume` (the initial snapshot) the rows sit at the
    /// progress's position, tables it marks done are skipped, the others
    /// start after their stored key, and acknowledged chunks are recorded
    /// in the marker (when there is one); without it (tables added later)
    /// they sit at `{watermark of at - 1}:{ordinal}`. The row count, or
    /// None when a shutdown interrupted it.
    async fn copy_tables(
        &mut self,
        mut reader: Conn,
        tables: &[(String, String)],
        at: &Offset,
        resume: Option<(SnapshotProgress, Option<&std::path::Path>)>,
        st: &mut State,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<usize>, MysqlError> {
        let mark = at.watermark().unwrap_or(0);
        let (progress, marker) = match resume {
            Some((progress, marker)) => (Some(progress), marker),
            None => (None, None),
        };
        let mut copy = SnapshotCopy {
            decoder: Decoder::new(
                &self.cfg.name,
                self.cfg.router.clone(),
                self.cfg.filter.clone(),
            ),
            tx: Transaction::begin(&at.file, at.file_index().unwrap_or(0), at.pos, None, 0),
            captured_at: tributary_envelope::time::now(),
            decoded: Vec::with_capacity(1),
            metrics: SnapshotMetrics::new(&self.cfg.name),
            ledger: marker
                .zip(progress.as_ref())
                .map(|(m, p)| ChunkLedger::new(m, p.clone())),
            chunk_rows: self.cfg.snapshot_chunk_rows,
        };
        copy.tx.major = progress
            .as_ref()
            .map_or(mark.saturating_sub(1), |p| p.major);
        copy.tx.ordinal = progress.as_ref().map_or_else(
            || self.captured.ordinal_after(copy.tx.major, 0),
            |p| p.ordinal,
        );
        copy.tx.meta.commit_ts = None;
        let mut total = 0usize;
        for (id, (db, table)) in (0u64..).zip(tables) {
            let stored = progress
                .as_ref()
                .and_then(|p| p.tables.get(&format!("{db}.{table}")));
            let after = match stored {
                Some(TableProgress::Done) => {
                    info!(table = %format!("{db}.{table}"), "snapshot: table already delivered before the restart");
                    copy.metrics.table_done();
                    continue;
                }
                Some(TableProgress::After(key)) => Some(
                    key.iter()
                        .map(|k| snapshot::decode_key(k))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| MysqlError::Offset {
                            path: marker.map(|m| m.display().to_string()).unwrap_or_default(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                "unreadable key in the snapshot progress (delete the file to take the snapshot again)",
                            ),
                        })?,
                ),
                None => None,
            };
            match copy
                .table(&mut reader, id, (db, table), after, st, shutdown)
                .await?
            {
                Some(rows) => total += rows,
                None => {
                    self.interrupted = copy.ledger.take();
                    return Ok(None);
                }
            }
        }
        self.captured.snapshot_end = Some((copy.tx.major, copy.tx.ordinal));
        reader
            .query_drop("COMMIT")
            .await
            .map_err(MysqlError::connection("ending the snapshot transaction"))?;
        drop(reader);
        st.emitter.commit(mark).await?;
        // Streaming (and the offset) may start only once Kinesis holds
        // every copied row: until then the marker says it is unfinished.
        while !st.emitter.tracker().is_drained() {
            if *shutdown.borrow() || st.emitter.abandoned() {
                self.interrupted = copy.ledger.take();
                return Ok(None);
            }
            copy.persist(st)?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        copy.persist(st)?;
        Ok(Some(total))
    }

    /// Opens the binlog stream after `from`: by file and offset, or by GTID
    /// (see [`setup::start_by`]); returns how it was asked for and the
    /// server's `@@server_id`.
    async fn open_stream(
        &self,
        from: &Offset,
        gtids: &GtidState,
    ) -> Result<(BinlogStream, StartBy, u32), MysqlError> {
        let mut conn = self
            .cfg
            .opts
            .connect()
            .await
            .map_err(MysqlError::connection(format!(
                "connecting to {}",
                describe(&self.cfg)
            )))?;
        // MariaDB sends its GTID events only to replicas that say they can
        // read them; the heartbeat period is in nanoseconds. Both answers
        // are bounded: a server gone silent must not hang the session.
        let silence = self.read_deadline();
        let prepare = conn.query_drop(format!(
            "SET @mariadb_slave_capability = 4, @master_heartbeat_period = {}",
            self.cfg.heartbeat.as_nanos()
        ));
        bounded(silence, "preparing the binlog session", prepare)
            .await?
            .map_err(MysqlError::connection("preparing the binlog session"))?;
        let plan = bounded(silence, "choosing where to resume", async {
            let server_id: u32 = conn
                .query_first("SELECT @@GLOBAL.server_id")
                .await
                .map_err(MysqlError::connection("reading the server's server_id"))?
                .unwrap_or_default();
            let present = setup::binlog_present(&mut conn, &from.file).await?;
            let offset_file = self.cfg.offset_file.display().to_string();
            setup::start_by(self.cfg.resume, from, server_id, present, &offset_file)
                .map(|plan| (plan, server_id))
        })
        .await??;
        let (plan, server_id) = plan;
        let host = setup::registration_host(&self.cfg.name);
        let sids = gtids.sids();
        let mut request =
            BinlogStreamRequest::new(self.cfg.server_id).with_hostname(host.as_bytes());
        request = match plan {
            StartBy::Position => request
                .with_filename(from.file.as_bytes())
                .with_pos(u64::from(from.pos)),
            // MySQL: COM_BINLOG_DUMP_GTID with the executed set.
            StartBy::Gtid { .. } if gtids.is_mysql() => request
                .with_gtid()
                .with_gtid_set(sids.iter().cloned())
                .with_filename(b"")
                .with_pos(4),
            // MariaDB: the position per domain, then an empty file name. In
            // strict mode the server refuses a state its binlog does not
            // hold instead of guessing.
            StartBy::Gtid { .. } => {
                let state = gtids.connect_state().replace('\'', "");
                let connect = conn.query_drop(format!(
                    "SET @slave_connect_state = '{state}', @slave_gtid_strict_mode = 1, \
                     @slave_gtid_ignore_duplicates = 0"
                ));
                bounded(silence, "sending the GTID state", connect)
                    .await?
                    .map_err(MysqlError::connection("sending the GTID state"))?;
                request.with_filename(b"").with_pos(4)
            }
        };
        let stream = bounded(
            silence,
            "requesting the binlog stream",
            conn.get_binlog_stream(request),
        )
        .await?
        .map_err(MysqlError::connection("requesting the binlog stream"))?;
        Ok((stream, plan, server_id))
    }

    /// How long the binlog stream may stay silent: twice the heartbeat
    /// period (`source.mysql.heartbeat_interval_secs`).
    fn read_deadline(&self) -> Duration {
        self.cfg.heartbeat * 2
    }

    async fn session(
        &mut self,
        st: &mut State,
        shutdown: &mut watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Result<Stopped, MysqlError> {
        let from = st.read_to.clone();
        let (mut stream, plan, server_id) = self.open_stream(&from, &st.gtids).await?;
        st.connected.send_replace(true);
        st.server_id = Some(server_id);
        let by_gtid = matches!(plan, StartBy::Gtid { .. });
        info!(server = %describe(&self.cfg), file = %from.file, pos = from.pos,
              gtid = %if by_gtid { st.gtids.render().unwrap_or_default() } else { String::new() },
              server_id = self.cfg.server_id, "streaming changes from mysql");
        let mut reader = Reader {
            // By GTID the server names its file in its first (artificial)
            // rotate event.
            file: if by_gtid {
                String::new()
            } else {
                from.file.clone()
            },
            file_index: from.file_index().unwrap_or(0),
            base: from.index_base,
            new_history: match plan {
                StartBy::Gtid { new_history: true } => from.file_index(),
                _ => None,
            },
            tx: None,
            in_begin: false,
            tx_gtid: None,
            captured_at: tributary_envelope::time::now(),
            decoded: Vec::with_capacity(8),
        };
        let mut acked = st.emitter.tracker().subscribe();
        let mut stopping = *shutdown.borrow();
        let silence = self.read_deadline();
        // The read deadline runs from the last event or heartbeat heard.
        let mut heard_at = Instant::now();
        loop {
            // A stop while the sink stayed stalled: the open transaction
            // was dropped uncommitted (see `Emitter::stop_when`).
            if (stopping && reader.tx.is_none()) || st.emitter.abandoned() {
                break;
            }
            let next = match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Nothing buffered: hand over what waits, then sleep.
                    st.emitter.flush().await?;
                    tokio::select! {
                        biased;
                        _ = shutdown.changed(), if !stopping => {
                            stopping = *shutdown.borrow();
                            continue;
                        }
                        _ = acked.changed() => {
                            st.save_acked(&mut self.store, true)?;
                            continue;
                        }
                        _ = tokio::time::sleep_until(heard_at + silence) => {
                            return Err(MysqlError::Connection {
                                context: format!(
                                    "nothing from the server for {silence:?}, not even a \
                                     heartbeat (twice source.mysql.heartbeat_interval_secs)"
                                ),
                                source: mysql_async::Error::Other(
                                    "read deadline passed: the connection is taken for dead".into(),
                                ),
                            });
                        }
                        next = stream.next() => next,
                    }
                }
            };
            let event = match next {
                Some(Ok(event)) => {
                    heard_at = Instant::now();
                    event
                }
                Some(Err(err)) => {
                    let err = MysqlError::connection("reading the binlog stream")(err);
                    if err.is_missing_binlog() {
                        return Err(MysqlError::Purged {
                            file: from.file.clone(),
                            pos: from.pos,
                            offset_file: self.cfg.offset_file.display().to_string(),
                        });
                    }
                    return Err(err);
                }
                None => {
                    return Err(MysqlError::Connection {
                        context: "the server ended the binlog stream".into(),
                        source: mysql_async::Error::Other("end of stream".into()),
                    });
                }
            };
            self.handle(&mut reader, st, &stream, &event).await?;
            st.save_acked(&mut self.store, false)?;
        }
        let stopped = st.emitter.close_and_drain(drain_timeout).await?;
        st.save_acked(&mut self.store, true)?;
        let _ = stream.close().await;
        info!(file = %st.saved.file, pos = st.saved.pos,
              in_flight = st.emitter.tracker().in_flight(), "replication stopped");
        Ok(stopped)
    }

    async fn handle(
        &mut self,
        r: &mut Reader,
        st: &mut State,
        stream: &BinlogStream,
        event: &Event,
    ) -> Result<(), MysqlError> {
        let header = event.header();
        let end = header.log_pos();
        let start = end.saturating_sub(header.event_size());
        let file = r.file.clone();
        let decode_error = |source| MysqlError::Decode {
            file: file.clone(),
            pos: start,
            source,
        };
        if header.event_type_raw() == MARIADB_GTID_EVENT {
            let data = event.data();
            let (Some(seq), Some(domain), Some(flags)) = (
                data.get(0..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes),
                data.get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_le_bytes),
                data.get(12).copied(),
            ) else {
                return Err(decode_error(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "short MariaDB GTID event",
                )));
            };
            let gtid = format!("{domain}-{}-{seq}", header.server_id());
            r.begin(start, Some(&gtid), header.timestamp());
            r.tx_gtid = Some(TxGtid::Mariadb(domain, gtid));
            r.in_begin = flags & MARIADB_FL_STANDALONE == 0;
            return Ok(());
        }
        let Some(data) = event.read_data().map_err(decode_error)? else {
            return Ok(()); // other MariaDB events: GTID list, checkpoints, annotations
        };
        match data {
            EventData::RotateEvent(rotate) => {
                let artificial = header.log_pos() == 0;
                let (name, index) = rotated_file(rotate.name_raw(), artificial, &r.file)
                    .ok_or_else(|| {
                        decode_error(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "binlog file {} has no numeric suffix",
                                String::from_utf8_lossy(rotate.name_raw())
                            ),
                        ))
                    })?;
                if artificial && let Some(stored) = r.new_history.take() {
                    // Another binlog history: its first file sorts just
                    // after the stored offset's, so positions keep growing.
                    let needed = stored.saturating_add(1).saturating_sub(index);
                    if needed > r.base {
                        r.base = needed;
                    }
                    info!(file = %name, index_base = r.base,
                          "resumed by GTID on another binlog history: positions continue after the stored offset");
                }
                r.file = name;
                r.file_index = index.saturating_add(r.base);
            }
            EventData::GtidEvent(gtid) => {
                let (uuid, gno) = (uuid_text(&gtid.sid()), gtid.gno());
                r.begin(start, Some(&format!("{uuid}:{gno}")), header.timestamp());
                r.tx_gtid = Some(TxGtid::Mysql(uuid, gno));
                r.in_begin = false;
            }
            EventData::AnonymousGtidEvent(_) => {
                r.begin(start, None, header.timestamp());
                r.in_begin = false;
            }
            EventData::QueryEvent(query) => {
                let text = query.query();
                let statement = text.trim();
                if statement.eq_ignore_ascii_case("BEGIN") {
                    if r.tx.is_none() {
                        r.begin(start, None, header.timestamp());
                    }
                    r.in_begin = true;
                } else if statement.eq_ignore_ascii_case("COMMIT") {
                    self.commit(r, st, end).await?;
                } else {
                    // DDL (or a statement outside a transaction): the next
                    // TABLE_MAP is the truth, the catalog may be stale.
                    st.catalog.invalidate();
                    if r.tx.is_none() {
                        r.begin(start, None, header.timestamp());
                    }
                    if let Some((db, table)) = truncated_table(statement, &query.schema())
                        && st.decoder.captures(&db, &table)
                        && let Some(tx) = r.tx.as_mut()
                    {
                        st.decoder
                            .truncate(&db, &table, tx, &r.captured_at, &mut r.decoded);
                        for record in r.decoded.drain(..) {
                            st.emitter.push(record).await?;
                        }
                    }
                    if !r.in_begin {
                        self.commit(r, st, end).await?;
                    }
                }
            }
            EventData::TableMapEvent(tme) => {
                let id = tme.table_id();
                let (db, table) = (tme.database_name(), tme.table_name());
                if st.decoder.captures(&db, &table) {
                    if !self.captured.contains(&db, &table) {
                        // Created while the source runs: its changes flow
                        // from its first row; the next start copies nothing.
                        info!(table = %format!("{db}.{table}"), "capturing a new table matching source.tables");
                        let mut captured = self.captured.clone();
                        captured.tables.insert((db.to_string(), table.to_string()));
                        self.save_captured(captured)?;
                    }
                    let mut schema = TableSchema::from_event(&tme).map_err(|e| {
                        decode_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                    })?;
                    if !schema.names_from_event || may_hold_json(&schema) {
                        // Bounded: a silent side connection must not hang
                        // the stream (the session reconnects instead).
                        let limit = self.read_deadline();
                        let lookup = st.catalog.facts(&mut self.side, &schema);
                        let facts = bounded(limit, "reading a table's columns", lookup).await??;
                        schema.complete(facts);
                    }
                    st.decoder.table_map(id, schema);
                } else {
                    st.decoder.forget(id);
                }
            }
            EventData::RowsEvent(rows) => {
                let Some(tme) = stream.get_tme(rows.table_id()) else {
                    return Ok(());
                };
                if r.tx.is_none() {
                    r.begin(start, None, header.timestamp());
                }
                let Some(tx) = r.tx.as_mut() else {
                    return Ok(());
                };
                st.decoder
                    .rows(&rows, tme, tx, &r.captured_at, &mut r.decoded)
                    .map_err(|e| {
                        decode_error(std::io::Error::new(std::io::ErrorKind::InvalidData, e))
                    })?;
                for record in r.decoded.drain(..) {
                    st.emitter.push(record).await?;
                }
            }
            EventData::XidEvent(_) => self.commit(r, st, end).await?,
            _ => {}
        }
        Ok(())
    }

    async fn commit(&mut self, r: &mut Reader, st: &mut State, end: u32) -> Result<(), MysqlError> {
        r.tx = None;
        r.in_begin = false;
        match r.tx_gtid.take() {
            Some(TxGtid::Mariadb(domain, gtid)) => st.gtids.commit_mariadb(domain, gtid),
            Some(TxGtid::Mysql(uuid, gno)) => st.gtids.commit_mysql(&uuid, gno),
            None => {}
        }
        let mark = watermark(r.file_index, end);
        let empty = st.emitter.next_seq() == st.committed_seq;
        st.emitter.commit(mark).await?;
        st.committed_seq = st.emitter.next_seq();
        let offset = Offset {
            file: r.file.clone(),
            pos: end,
            gtid: st.gtids.render(),
            server_id: st.server_id,
            index_base: r.base,
        };
        // A transaction with no captured row is acknowledged with the one
        // before it (the tracker merges them too): it replaces that entry,
        // so uncaptured traffic during a stall does not grow the queue.
        match st.pending.back_mut() {
            Some(back) if empty => *back = (mark, offset.clone()),
            _ => st.pending.push_back((mark, offset.clone())),
        }
        st.read_to = offset;
        Ok(())
    }
}

/// The snapshot's rendering state, shared by its tables.
struct SnapshotCopy {
    decoder: Decoder,
    /// Every snapshot row's position: `{snapshot watermark - 1}:{ordinal}`.
    tx: Transaction,
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
    decoded: Vec<tributary_envelope::Record>,
    metrics: SnapshotMetrics,
    /// Records acknowledged chunks in the marker (none for `snapshot = "only"`).
    ledger: Option<ChunkLedger>,
    /// `source.snapshot_chunk_rows`.
    chunk_rows: usize,
}

impl SnapshotCopy {
    /// Copies `db.table` (mapped as `id`) into the emitter, by primary key
    /// in chunks from after `after` (or from its first row; a table without
    /// a key in one pass); its row count, or None when a shutdown
    /// interrupted it.
    async fn table(
        &mut self,
        reader: &mut Conn,
        id: u64,
        (db, table): (&str, &str),
        mut after: Option<Vec<mysql_async::Value>>,
        st: &mut State,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<usize>, MysqlError> {
        let name = format!("{db}.{table}");
        let facts = crate::schema::read_table_facts(reader, db, table).await?;
        let schema = TableSchema::from_facts(db, table, &facts);
        let expected: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
        let key: Vec<usize> = schema.key.clone();
        let key_names: Vec<String> = key.iter().map(|&i| expected[i].clone()).collect();
        self.decoder.table_map(id, schema);
        if key.is_empty() {
            after = None;
        }
        let estimated = snapshot::estimated_rows(reader, db, table).await?;
        let shown: Option<Vec<String>> = after
            .as_ref()
            .map(|a| a.iter().map(snapshot::encode_key).collect());
        let mut watch = self.metrics.start_table(&name, estimated, shown.as_deref());
        loop {
            // A stop is taken between chunks, so every chunk handed over
            // is whole and recorded once the final drain delivers it.
            if *shutdown.borrow() || st.emitter.abandoned() {
                info!(table = %name, rows = watch.rows(), "snapshot interrupted: it resumes after the last acknowledged chunk at the next run");
                return Ok(None);
            }
            let key_refs: Vec<&str> = key_names.iter().map(String::as_str).collect();
            let (sql, params) =
                snapshot::select_chunk(db, table, &key_refs, after.as_deref(), self.chunk_rows);
            let read = match self
                .chunk(
                    reader,
                    id,
                    &name,
                    (&sql, params),
                    &expected,
                    &key,
                    st,
                    shutdown,
                )
                .await?
            {
                Some((read, last)) => {
                    if last.is_some() {
                        after = last;
                    }
                    read
                }
                None => {
                    info!(table = %name, rows = watch.rows(), "snapshot interrupted: it resumes after the last acknowledged chunk at the next run");
                    return Ok(None);
                }
            };
            watch.add(read as u64);
            if key.is_empty() || read < self.chunk_rows {
                if let Some(ledger) = &mut self.ledger {
                    ledger.sent(
                        &st.emitter,
                        &name,
                        TableProgress::Done,
                        self.tx.major,
                        self.tx.ordinal,
                    );
                }
                break;
            }
            if let (Some(ledger), Some(last)) = (&mut self.ledger, &after) {
                let state = TableProgress::After(last.iter().map(snapshot::encode_key).collect());
                ledger.sent(&st.emitter, &name, state, self.tx.major, self.tx.ordinal);
            }
            self.persist(st)?;
        }
        let rows = watch.rows();
        watch.finish();
        self.metrics.table_done();
        Ok(Some(usize::try_from(rows).unwrap_or(usize::MAX)))
    }

    /// Reads one chunk (`sql` with `params`) into the emitter: the rows
    /// read and the key of the last, or None when a shutdown interrupted it.
    #[allow(clippy::too_many_arguments)]
    async fn chunk(
        &mut self,
        reader: &mut Conn,
        id: u64,
        name: &str,
        (sql, params): (&str, Vec<mysql_async::Value>),
        expected: &[String],
        key: &[usize],
        st: &mut State,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Option<(usize, Option<Vec<mysql_async::Value>>)>, MysqlError> {
        let mut result = reader
            .exec_iter(sql, params)
            .await
            .map_err(MysqlError::connection(format!("reading {name}")))?;
        let charsets = snapshot::result_charsets(result.columns_ref(), name, expected)?;
        let (mut rows, mut last) = (0usize, None);
        let read_error = |e| MysqlError::connection(format!("reading {name}"))(e);
        while let Some(row) = result.next().await.map_err(read_error)? {
            // Mid-chunk only for a table without a key (read in one pass,
            // never resumed) or when the sink gave up.
            if (key.is_empty() && *shutdown.borrow()) || st.emitter.abandoned() {
                return Ok(None);
            }
            if self.tx.ordinal == u32::MAX {
                // 2^32 rows: the next ones sort one position earlier,
                // still before every change.
                self.tx.major = self.tx.major.saturating_sub(1);
                self.tx.ordinal = 0;
            }
            if !key.is_empty() {
                last = Some(snapshot::row_key(&row, key));
            }
            let (tx, at) = (&mut self.tx, &self.captured_at);
            self.decoder
                .snapshot_row(id, row.unwrap(), &charsets, tx, at, &mut self.decoded);
            for record in self.decoded.drain(..) {
                st.emitter.push(record).await?;
            }
            rows += 1;
        }
        Ok(Some((rows, last)))
    }

    /// Stores the progress of every chunk Kinesis acknowledged.
    fn persist(&mut self, st: &State) -> Result<(), MysqlError> {
        persist_ledger(self.ledger.as_mut(), st.emitter.tracker())
    }
}

/// The progress of the unfinished snapshot in `marker` and the binlog
/// position it streams from, when it can be resumed: the marker names the
/// position and the server still holds that binlog (else start-up fails
/// and says so: the changes between it and now are gone).
async fn resumable(
    side: &mut Conn,
    marker: &std::path::Path,
) -> Result<Option<(Offset, SnapshotProgress)>, MysqlError> {
    let progress = SnapshotProgress::load(marker)
        .map_err(|source| MysqlError::Offset {
            path: marker.display().to_string(),
            source,
        })?
        .flatten();
    let Some(progress) = progress else {
        return Ok(None);
    };
    let Some(offset) = Offset::decode(progress.start.as_bytes()) else {
        return Ok(None);
    };
    setup::check_offset(side, &offset, &marker.display().to_string()).await?;
    info!(file = %offset.file, pos = offset.pos,
          tables_done = progress.tables.values().filter(|t| **t == TableProgress::Done).count(),
          "an earlier snapshot did not finish: resuming it after its last acknowledged chunks");
    Ok(Some((offset, progress)))
}

/// Where the reader is inside the binlog.
struct Reader {
    file: String,
    /// The index of `file` with `base` added.
    file_index: u32,
    /// Added to the server's file indexes (see `offsets`).
    base: u32,
    /// Resumed by GTID on another binlog history: the stored offset's
    /// file index, which the first file read must sort after.
    new_history: Option<u32>,
    tx: Option<Transaction>,
    /// Inside BEGIN ... COMMIT (a statement does not end the transaction).
    in_begin: bool,
    /// The GTID of the open transaction.
    tx_gtid: Option<TxGtid>,
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
    decoded: Vec<tributary_envelope::Record>,
}

impl Reader {
    fn begin(&mut self, start: u32, gtid: Option<&str>, timestamp: u32) {
        self.tx = Some(Transaction::begin(
            &self.file,
            self.file_index,
            start,
            gtid,
            timestamp,
        ));
        self.tx_gtid = None;
        self.captured_at = tributary_envelope::time::now();
    }
}

/// The GTID of a transaction being read, added to the state at its commit.
enum TxGtid {
    /// MariaDB: domain and `D-S-N`.
    Mariadb(u32, String),
    /// MySQL: source UUID and number.
    Mysql(String, u64),
}

/// What survives reconnects.
/// Stores in `ledger` (if any) the progress of every chunk Kinesis
/// acknowledged.
fn persist_ledger(
    ledger: Option<&mut ChunkLedger>,
    tracker: &tributary_envelope::AckTracker,
) -> Result<(), MysqlError> {
    if let Some(ledger) = ledger {
        ledger
            .persist_done(tracker)
            .map_err(|source| MysqlError::Offset {
                path: "the snapshot progress in [state] dir".into(),
                source,
            })?;
    }
    Ok(())
}

struct State {
    emitter: Emitter,
    decoder: Decoder,
    catalog: Catalog,
    /// The GTID state after the last transaction read.
    gtids: GtidState,
    /// `@@server_id` of the server streamed from (None until known).
    server_id: Option<u32>,
    /// The end of the last transaction read.
    read_to: Offset,
    /// The offset last written to the store.
    saved: Offset,
    saved_at: Instant,
    /// Transaction ends read but not yet acknowledged, in order.
    pending: VecDeque<(u64, Offset)>,
    /// The emitter's next sequence number at the last commit: unchanged
    /// at the next commit means that transaction had no captured row.
    committed_seq: u64,
    /// `/readyz`'s view of the binlog session.
    connected: watch::Sender<bool>,
}

impl State {
    /// Writes the latest offset the tracker released (at most every
    /// [`SAVE_INTERVAL`] unless `force`).
    fn save_acked(&mut self, store: &mut FileOffsetStore, force: bool) -> Result<(), MysqlError> {
        let acked = self.emitter.tracker().acked();
        if self.pending.front().is_none_or(|(mark, _)| *mark > acked) {
            return Ok(());
        }
        if !force && self.saved_at.elapsed() < SAVE_INTERVAL {
            return Ok(());
        }
        let mut latest = None;
        while let Some((mark, _)) = self.pending.front()
            && *mark <= acked
        {
            latest = self.pending.pop_front().map(|(_, offset)| offset);
        }
        if let Some(offset) = latest {
            store
                .save(&offset.encode())
                .map_err(|source| MysqlError::Offset {
                    path: store.path().display().to_string(),
                    source,
                })?;
            self.saved = offset;
            self.saved_at = Instant::now();
        }
        Ok(())
    }
}

/// LONGTEXT columns may be MariaDB JSON: the catalog says which.
fn may_hold_json(schema: &TableSchema) -> bool {
    schema.columns.iter().any(|c| {
        matches!(
            c.kind.column_type,
            mysql_async::consts::ColumnType::MYSQL_TYPE_BLOB
        )
    })
}

/// The file name of a rotate event. The server's first, artificial rotate
/// (`log_pos` 0) arrives before the stream's checksum setting is known, so
/// its name may carry the 4 checksum bytes: when it names the file we asked
/// for (`requested`), with or without them, that name; otherwise (a stream
/// requested by GTID, or another file) the name without the last 4 bytes
/// when those leave a name ending in a 6-digit index (servers write at
/// least 6 digits), else the raw name. Later rotates are clean.
fn rotated_file(raw: &[u8], artificial: bool, requested: &str) -> Option<(String, u32)> {
    let name = if artificial {
        match raw.strip_prefix(requested.as_bytes()) {
            Some(rest) if !requested.is_empty() && (rest.is_empty() || rest.len() == 4) => {
                requested.as_bytes()
            }
            _ => without_checksum(raw),
        }
    } else {
        raw
    };
    let name = std::str::from_utf8(name).ok()?;
    file_index(name).map(|index| (name.to_owned(), index))
}

fn without_checksum(raw: &[u8]) -> &[u8] {
    let Some(stripped) = raw.len().checked_sub(4).and_then(|n| raw.get(..n)) else {
        return raw;
    };
    let digits = stripped
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    let dotted = stripped.len() > digits && stripped[stripped.len() - digits - 1] == b'.';
    if digits >= 6 && dotted { stripped } else { raw }
}

fn uuid_text(sid: &[u8; 16]) -> String {
    let hex: String = sid.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_names_lose_trailing_checksum_bytes() {
        let requested = "binlog.000001";
        for checksum in [&b"\xf19'\x07"[..], b"8\xff\xfe.", b"1234", b""] {
            let raw = [requested.as_bytes(), checksum].concat();
            assert_eq!(
                rotated_file(&raw, true, requested),
                Some((requested.into(), 1)),
                "{checksum:?}"
            );
        }
        assert_eq!(
            rotated_file(b"binlog.000002\x01\x02\x03\x04", true, requested),
            Some(("binlog.000002".into(), 2))
        );
        assert_eq!(
            rotated_file(b"binlog.000002", false, requested),
            Some(("binlog.000002".into(), 2))
        );
        assert_eq!(rotated_file(b"binlog", false, ""), None);
        // Requested by GTID: no name to compare with.
        assert_eq!(
            rotated_file(b"binlog.000007\xf1\x39\x27\x07", true, ""),
            Some(("binlog.000007".into(), 7))
        );
        assert_eq!(
            rotated_file(b"binlog.000007", true, ""),
            Some(("binlog.000007".into(), 7))
        );
        assert_eq!(
            rotated_file(b"binlog.0000071234", true, ""),
            Some(("binlog.000007".into(), 7)),
            "checksum bytes that happen to be digits"
        );
    }

    #[test]
    fn uuids_render_as_text() {
        assert_eq!(
            uuid_text(&[
                0x3e, 0x11, 0xfa, 0x47, 0x71, 0xca, 0x11, 0xe1, 0x9e, 0x33, 0xc8, 0x0a, 0xa9, 0x42,
                0x95, 0x62
            ]),
            "3e11fa47-71ca-11e1-9e33-c80aa9429562"
        );
    }
}

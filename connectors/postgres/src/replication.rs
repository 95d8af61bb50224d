//! The streaming loop: reads `pgoutput` from the slot, decodes row changes
//! into records for the sink, and acknowledges to the server (standby status
//! update) only the positions the [`AckTracker`] says are fully done.
//!
//! A transaction is never split across an acknowledgement: the tracker only
//! ever releases commit end LSNs (or, with nothing in flight, the WAL end of
//! a keepalive). On shutdown the loop finishes the transaction it is in,
//! waits for the sink to report everything done, sends the final standby
//! status update and only then closes the stream. The whole stop takes at
//! most `sink.drain_timeout_secs`: a reader waiting for budget a stalled
//! sink never gives back (Kinesis down) drops the open transaction when the
//! timeout is spent, so it stays unacknowledged and a restart sends it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};
pub use tributary_envelope::Stopped;
use tributary_envelope::error_text::one_line;
use tributary_envelope::snapshot_progress::{
    ChunkLedger, RangeProgress, SnapshotMetrics, SnapshotProgress, TableProgress, TableWatch,
};
use tributary_envelope::{AckTracker, Budget, Emitter, Record, WhileWaiting};

use crate::catalog::Catalog;
use crate::config::{ConnectionConfig, PostgresSourceConfig};
use crate::decoder::{Decoder, Transaction};
use crate::error::PostgresError;
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message};
use crate::setup::{self, SetupReport};
use crate::snapshot::{self, PendingSnapshot};
use crate::snapshot_readers;
use crate::tls::{MakeRustlsConnect, TlsParams};
use crate::wire::{ReplicationConnection, StreamMessage, WireError};
use tributary_envelope::CapturedTables;
use tributary_envelope::captured::display_all;

/// Session settings that give every type one text shape (see `types`).
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC \
     -c bytea_output=hex -c lc_monetary=C -c extra_float_digits=1";

/// Read deadline when neither `source.postgres.read_timeout_secs` nor the
/// server's `wal_sender_timeout` gives one.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// A connected Postgres source, ready to stream.
pub struct PostgresSource {
    cfg: PostgresSourceConfig,
    side: Client,
    catalog: Catalog,
    decoder: Decoder,
    report: SetupReport,
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

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("slot", &self.cfg.slot)
            .field("publication", &self.cfg.publication)
            .finish_non_exhaustive()
    }
}

/// Opens an ordinary (non-replication) connection, over TLS as the URL's
/// `sslmode` says. The whole handshake is bounded by the URL's
/// `connect_timeout` (tokio-postgres bounds only the TCP connect): a
/// server that accepts and then says nothing fails it.
pub async fn connect_sql(config: &ConnectionConfig) -> Result<Client, PostgresError> {
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(crate::config::DEFAULT_CONNECT_TIMEOUT);
    let context = || format!("connecting to {}", describe(config));
    let timed_out = || PostgresError::Connection {
        context: context(),
        source: format!("no answer within {limit:?} (connect_timeout)").into(),
    };
    let failed = |e: tokio_postgres::Error| PostgresError::Connection {
        context: context(),
        source: tls_refusal(&config.tls, e),
    };
    let client = if config.get_ssl_mode() == SslMode::Disable {
        let (client, connection) = tokio::time::timeout(limit, config.connect(NoTls))
            .await
            .map_err(|_| timed_out())?
            .map_err(failed)?;
        tokio::spawn(drive(connection));
        client
    } else {
        let tls = MakeRustlsConnect::new(&config.tls).map_err(PostgresError::Tls)?;
        let (client, connection) = tokio::time::timeout(limit, config.connect(tls))
            .await
            .map_err(|_| timed_out())?
            .map_err(failed)?;
        tokio::spawn(drive(connection));
        client
    };
    Ok(client)
}

/// Runs a query connection until it ends.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(err) = connection.await {
        debug!(error = %err, "postgres connection ended");
    }
}

/// tokio-postgres' "server does not support TLS" in the user's words.
fn tls_refusal(
    tls: &TlsParams,
    err: tokio_postgres::Error,
) -> Box<dyn std::error::Error + Send + Sync> {
    let refused = std::error::Error::source(&err)
        .is_some_and(|cause| cause.to_string() == "server does not support TLS");
    if refused {
        tls.refused_message().into()
    } else {
        Box::new(err)
    }
}

/// `host:port/db` of a connection, without secrets.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

impl PostgresSource {
    /// Connects, checks the server, and creates the publication and the slot
    /// when missing.
    pub async fn connect(cfg: PostgresSourceConfig) -> Result<Self, PostgresError> {
        let side = connect_sql(&cfg.connection).await?;
        if cfg.snapshot_only {
            // Copy and stop: no publication, no slot, nothing left behind.
            let tables = setup::matching_tables(&side, &cfg.filter).await?;
            let report = SetupReport {
                tables: tables
                    .tables
                    .iter()
                    .map(|(s, t)| format!("{s}.{t}"))
                    .collect(),
                matching: tables.tables,
                added_to_publication: Vec::new(),
                publication_created: false,
                slot_created: false,
                confirmed_flush_lsn: 0,
            };
            return Ok(Self::new(cfg, side, report, Some(snapshot::plain())));
        }
        // The publication first (a slot decodes only what was published
        // after its consistent point), then the slot: with an exported
        // snapshot when the captured rows are copied first.
        let mut report = setup::ensure(&side, &cfg.filter, &cfg.publication, &cfg.slot).await?;
        let snapshot = snapshot::prepare(&cfg, &side, SESSION_OPTIONS).await?;
        match &snapshot {
            Some(pending) => {
                report.slot_created = true;
                report.confirmed_flush_lsn = pending.consistent_point;
            }
            // No slot yet and no snapshot wanted: a plain slot.
            None if report.confirmed_flush_lsn == 0 => {
                report.confirmed_flush_lsn = setup::create_slot(&side, &cfg.slot).await?;
                report.slot_created = true;
            }
            None => {}
        }
        let mut source = Self::new(cfg, side, report, snapshot);
        source.plan_added_tables()?;
        Ok(source)
    }

    /// Compares the matching tables with the stored set of captured ones:
    /// tables new to the stream (added to `source.tables`, or added to the
    /// publication now) are copied before streaming resumes, unless
    /// `snapshot = "never"`; tables no longer matching are dropped from the
    /// set (their changes are no longer captured).
    fn plan_added_tables(&mut self) -> Result<(), PostgresError> {
        let state_error = |e: std::io::Error| {
            PostgresError::Setup(format!("cannot read {}: {e}", self.captured_path.display()))
        };
        if self.snapshot.is_some() {
            // The snapshot copies every matching table and records them.
            return Ok(());
        }
        let mut current = CapturedTables::new(self.report.matching.iter().cloned());
        let stored = CapturedTables::load(&self.captured_path).map_err(state_error)?;
        current.snapshot_end = stored.as_ref().and_then(|s| s.snapshot_end);
        if stored.is_none() && !self.report.slot_created && self.cfg.snapshot {
            warn!(slot = %self.cfg.slot, state = %self.captured_path.display(),
                  "the slot exists but [state] dir holds no record of this connector's tables: \
                   if it was lost (a container without a volume) while a snapshot was unfinished, \
                   the rows it had not copied are missing from the stream; drop the slot \
                   (tributary slots drop) to take the snapshot again");
        }
        // New to the stream: matching tables not recorded (none without a
        // record: a state kept by a version without it), and tables the
        // publication lacked until now. A slot made just now (without a
        // snapshot) streams every table from here: nothing is new.
        let mut added: Vec<(String, String)> = Vec::new();
        if !self.report.slot_created {
            if let Some(stored) = &stored {
                added.extend(stored.missing(&self.report.matching).into_iter().cloned());
            }
            for table in &self.report.added_to_publication {
                if !added.contains(table) {
                    added.push(table.clone());
                }
            }
        }
        if let Some(stored) = &stored {
            for gone in stored.tables.difference(&current.tables) {
                info!(table = %tributary_envelope::captured::display(gone),
                      "table no longer matches source.tables (or was dropped): its changes are no \
                       longer captured; it stays in the publication (ALTER PUBLICATION ... DROP \
                       TABLE removes it)");
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
                // The refresh compares new tables with this set.
                self.captured = current;
            }
            return Ok(());
        }
        // The set keeps the tables still matching until the copy is done.
        self.captured = CapturedTables::still_current(stored, &current);
        self.added = added;
        Ok(())
    }

    fn new(
        cfg: PostgresSourceConfig,
        side: Client,
        report: SetupReport,
        snapshot: Option<PendingSnapshot>,
    ) -> Self {
        let db = cfg.connection.get_dbname().unwrap_or_default().to_owned();
        let decoder = Decoder::new(&cfg.name, &db, cfg.router.clone(), cfg.filter.clone());
        let captured_path = CapturedTables::path(&cfg.state_dir, "postgres", &cfg.slot);
        Self {
            cfg,
            side,
            catalog: Catalog::default(),
            decoder,
            report,
            snapshot,
            captured: CapturedTables::default(),
            captured_path,
            added: Vec::new(),
            interrupted: None,
        }
    }

    /// How long the replication stream may stay silent before the session
    /// is failed: `source.postgres.read_timeout_secs`, else twice the
    /// server's `wal_sender_timeout` (the server sends a keepalive at half
    /// of it), else [`DEFAULT_READ_TIMEOUT`] when the server's is off.
    async fn read_deadline(&self) -> Result<Duration, PostgresError> {
        if let Some(limit) = self.cfg.read_timeout {
            return Ok(limit);
        }
        let query = self.side.query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        );
        let row = bounded(DEFAULT_READ_TIMEOUT, "reading wal_sender_timeout", query)
            .await?
            .map_err(PostgresError::query("reading wal_sender_timeout"))?;
        let millis: i64 = row.get(0);
        Ok(match u64::try_from(millis) {
            Ok(ms) if ms > 0 => Duration::from_millis(ms.saturating_mul(2)),
            _ => DEFAULT_READ_TIMEOUT,
        })
    }

    /// True when the run starts with a snapshot of the captured tables.
    pub fn snapshots(&self) -> bool {
        self.snapshot.is_some()
    }

    /// What start-up found: tables, created objects, the resume position.
    pub fn report(&self) -> &SetupReport {
        &self.report
    }

    async fn confirmed_flush(&self, limit: Duration) -> Result<u64, PostgresError> {
        let slot = [&self.cfg.slot as &(dyn tokio_postgres::types::ToSql + Sync)];
        let query = self.side.query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &slot,
        );
        let row = bounded(limit, "reading the slot's confirmed_flush_lsn", query)
            .await?
            .map_err(PostgresError::query(
                "reading the slot's confirmed_flush_lsn",
            ))?
            .ok_or_else(|| {
                PostgresError::Setup(format!("replication slot {} disappeared", self.cfg.slot))
            })?;
        Ok(row
            .get::<_, Option<String>>(0)
            .as_deref()
            .and_then(Lsn::parse)
            .map(|lsn| lsn.0)
            .unwrap_or(0))
    }

    /// Streams until `shutdown` turns true, reconnecting after transient
    /// failures. Records go to `out`; their bytes are taken from `budget`
    /// before they are decoded further.
    pub async fn run(
        mut self,
        out: mpsc::Sender<Vec<Record>>,
        tracker: Arc<AckTracker>,
        budget: Arc<Budget>,
        mut shutdown: watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Result<Stopped, PostgresError> {
        let mut state = RunState {
            emitter: Emitter::new(out, tracker, budget, self.cfg.batch_records)
                .stop_when(shutdown.clone(), drain_timeout),
            captured_at: tributary_envelope::time::now(),
            read_end: 0,
        };
        if let Some(pending) = self.snapshot.take()
            && !self.copy_snapshot(pending, &mut state, &shutdown).await?
        {
            // Stopped during the snapshot: what the drain delivers is
            // recorded, and the next run resumes after it.
            let stopped = state.emitter.close_and_drain(drain_timeout).await?;
            persist_done(self.interrupted.as_mut(), state.emitter.tracker())?;
            return Ok(stopped);
        }
        if self.cfg.snapshot_only {
            info!("snapshot = \"only\": the copy is delivered; stopping");
            return Ok(state.emitter.close_and_drain(drain_timeout).await?);
        }
        let added = std::mem::take(&mut self.added);
        if !added.is_empty() && !self.copy_added(added, &mut state, &shutdown).await? {
            // Stopped during the copy: the next run copies them again.
            return Ok(state.emitter.close_and_drain(drain_timeout).await?);
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let began = tokio::time::Instant::now();
            match self.session(&mut state, &mut shutdown, drain_timeout).await {
                Ok(stopped) => return Ok(stopped),
                Err(err) if err.is_transient() && !*shutdown.borrow() => {
                    if began.elapsed() > Duration::from_secs(60) {
                        // The session had been healthy: start over with short waits.
                        backoff = Duration::from_millis(200);
                    }
                    warn!(
                        error = %one_line(&err),
                        meaning = retry_meaning(&err),
                        retry_in = ?backoff,
                        "replication session failed; reconnecting"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop_requested(&mut shutdown) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    if let Ok(side) = connect_sql(&self.cfg.connection).await {
                        self.side = side;
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Copies every captured table at the slot's consistent point (see
    /// `snapshot`), or what an interrupted copy left, with
    /// `source.snapshot_parallelism` readers on one snapshot (see
    /// `snapshot_readers`), recording each chunk Kinesis acknowledged in
    /// the marker; waits until Kinesis has every row, then removes the
    /// marker. False when a shutdown interrupted it.
    async fn copy_snapshot(
        &mut self,
        pending: PendingSnapshot,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, PostgresError> {
        let parallelism = self.cfg.snapshot_parallelism.max(1);
        if pending.resume.is_some() && !self.report.added_to_publication.is_empty() {
            // A resumed copy reads in a transaction of its own, and tables
            // published only at this start stream from their publication
            // on: rows an older transaction wrote to them are in neither
            // unless it ends before that transaction starts (as for tables
            // added to an unfinished stream, see `copy_added_at`).
            let client = connect_sql(&self.cfg.connection).await?;
            wait_for_older_transactions(&client, OLDER_TRANSACTIONS_WAIT, &mut ()).await?;
        }
        let (readers, taken_at) =
            snapshot_readers::open(&self.cfg.connection, pending.name.as_deref(), parallelism)
                .await?;
        let PendingSnapshot {
            export,
            consistent_point,
            marker,
            resume,
            ..
        } = pending;
        // A resumed copy reads in a new transaction, later than the slot's
        // consistent point, and still streams from that point.
        let consistent_point = match &resume {
            Some(_) => consistent_point,
            None => taken_at.unwrap_or(consistent_point),
        };
        // Every reader imported the snapshot: the exporting connection is
        // no longer needed.
        drop(export);
        let mut progress = resume.unwrap_or_else(|| {
            SnapshotProgress::new(
                Lsn(consistent_point).to_string(),
                consistent_point.saturating_sub(1),
            )
        });
        let tables = self.report.tables.clone();
        info!(tables = tables.len(), readers = readers.len(), consistent_point = %Lsn(consistent_point),
              "snapshot: copying the captured tables");
        let plan = self
            .plan_ranges(&readers[0], &tables, &mut progress, parallelism)
            .await?;
        if let Some(marker) = &marker {
            progress.save(marker).map_err(|e| {
                PostgresError::Setup(format!("cannot write {}: {e}", marker.display()))
            })?;
        }
        st.captured_at = tributary_envelope::time::now();
        let began = tokio::time::Instant::now();
        let mut copy = ParallelCopy::new(&self.cfg.name, &progress, plan.estimated, &self.decoder);
        copy.ledger = marker
            .as_ref()
            .map(|m| ChunkLedger::new(m, progress.clone()));
        let (mut deliveries, _readers) = snapshot_readers::spawn(readers, plan.units);
        let mut read_all = false;
        loop {
            if *shutdown.borrow() || st.emitter.abandoned() {
                info!(
                    rows = copy.total,
                    "snapshot interrupted: it resumes after the last acknowledged chunks at the next run"
                );
                self.interrupted = copy.ledger.take();
                return Ok(false);
            }
            // Start rendering what the readers delivered while a decoder is
            // free (waiting for them only when nothing else is to be done),
            // then hand the oldest delivery over.
            if !read_all && copy.can_render() {
                let next = if copy.queue.is_empty() {
                    Some(deliveries.recv().await)
                } else {
                    match deliveries.try_recv() {
                        Ok(delivery) => Some(Some(delivery)),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
                    }
                };
                match next {
                    Some(Some(delivery)) => {
                        copy.dispatch(delivery?, &plan.relations, st.captured_at);
                        continue;
                    }
                    Some(None) => read_all = true,
                    None => {}
                }
            }
            if !copy.hand_over_oldest(st).await? {
                break;
            }
        }
        // A table created before the stream moved is copied at
        // `{consistent point - 1}:...` too, now or at a later start (the
        // captured-tables record keeps it): after this copy's first range.
        let first_major = consistent_point.saturating_sub(1);
        self.captured.snapshot_end = copy
            .ranges
            .iter()
            .find(|(_, tx, _)| tx.commit_lsn == first_major)
            .map(|(_, tx, _)| (first_major, tx.ordinal));
        st.emitter.commit(consistent_point).await?;
        // Streaming may start only once Kinesis holds every snapshot row:
        // the marker says the snapshot is unfinished until then.
        while !st.emitter.tracker().is_drained() {
            if *shutdown.borrow() || st.emitter.abandoned() {
                self.interrupted = copy.ledger.take();
                return Ok(false);
            }
            copy.persist_with(st.emitter.tracker())?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.cfg.snapshot_only {
            self.save_captured(CapturedTables::new(self.report.matching.clone()))?;
        }
        if let Some(marker) = &marker {
            snapshot::remove_marker(marker)?;
        }
        info!(
            rows = copy.total,
            secs = began.elapsed().as_secs_f64(),
            "snapshot complete; streaming from its consistent point"
        );
        Ok(true)
    }

    /// Plans the copy of `tables`: each table's key ranges (kept from an
    /// interrupted copy's `progress`, else split now: a keyed table of at
    /// least two chunks into up to `parallelism` ranges, see
    /// [`snapshot::TableShape::split`]), added to `progress.ranges` with
    /// their own `major`, and the units left to read, largest tables
    /// first. Teaches the decoder every table.
    async fn plan_ranges(
        &mut self,
        reader: &Client,
        tables: &[String],
        progress: &mut SnapshotProgress,
        parallelism: usize,
    ) -> Result<SnapshotPlan, PostgresError> {
        let chunk_rows = self.cfg.snapshot_chunk_rows.max(1);
        let mut shapes = Vec::with_capacity(tables.len());
        for name in tables {
            let Some((schema, table)) = name.split_once('.') else {
                continue;
            };
            let shape = snapshot::table_shape(
                reader,
                &mut self.catalog,
                &mut self.decoder,
                (schema, table),
            )
            .await?;
            let estimated = snapshot::estimated_rows(reader, shape.relation()).await?;
            shapes.push((name.clone(), shape, estimated));
        }
        shapes.sort_by_key(|(_, _, estimated)| std::cmp::Reverse(*estimated));
        // A copy interrupted before this version stored one position
        // space: new ranges take majors below it.
        let legacy = progress.ranges.is_empty() && progress.ordinal > 0;
        let mut next_major = match progress.ranges.iter().map(|r| r.major).min() {
            Some(lowest) => lowest.saturating_sub(1),
            None if legacy => progress.major.saturating_sub(1),
            None => progress.major,
        };
        for (name, shape, estimated) in &shapes {
            if progress.ranges.iter().any(|r| &r.table == name) {
                continue;
            }
            let ranges = match progress.tables.get(name) {
                Some(TableProgress::Done) => continue,
                Some(after @ TableProgress::After(_)) => vec![RangeProgress {
                    table: name.clone(),
                    from: None,
                    to: None,
                    major: progress.major,
                    ordinal: progress.ordinal,
                    state: Some(after.clone()),
                }],
                None => {
                    let chunks = usize::try_from(estimated.div_ceil(chunk_rows as u64))
                        .unwrap_or(usize::MAX);
                    let parts = if chunks >= 2 {
                        parallelism.min(chunks)
                    } else {
                        1
                    };
                    let mut planned = Vec::new();
                    for range in shape.split(reader, parts).await? {
                        planned.push(RangeProgress {
                            table: name.clone(),
                            from: range.from,
                            to: range.to,
                            major: next_major,
                            ordinal: 0,
                            state: None,
                        });
                        next_major = next_major.saturating_sub(1);
                    }
                    planned
                }
            };
            progress.ranges.extend(ranges);
        }
        let mut plan = SnapshotPlan::default();
        for (name, shape, estimated) in &shapes {
            plan.estimated.insert(name.clone(), *estimated);
            for (index, range) in progress.ranges.iter().enumerate() {
                if &range.table != name || range.state == Some(TableProgress::Done) {
                    continue;
                }
                let after = match &range.state {
                    Some(TableProgress::After(key)) => Some(key.clone()),
                    _ => None,
                };
                let key_range = snapshot::KeyRange {
                    from: range.from.clone(),
                    to: range.to.clone(),
                };
                plan.units.push(snapshot_readers::Unit {
                    index,
                    reader: shape.reader(key_range, after, chunk_rows),
                });
            }
        }
        plan.relations = progress
            .ranges
            .iter()
            .map(|r| {
                shapes
                    .iter()
                    .find(|(name, _, _)| name == &r.table)
                    .map(|(_, shape, _)| shape.relation())
            })
            .collect();
        Ok(plan)
    }

    /// Copies one table chunk by chunk; false when a shutdown interrupted
    /// it. `keep` runs while the pipeline makes the copy wait (a copy
    /// between two transactions of a running stream keeps the replication
    /// connection alive with it).
    #[allow(clippy::too_many_arguments)]
    async fn copy_table<W>(
        &mut self,
        reader: &Client,
        (schema, table): (&str, &str),
        after: Option<Vec<String>>,
        copy: &mut SnapshotCopy,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
        keep: &mut W,
    ) -> Result<bool, PostgresError>
    where
        W: WhileWaiting,
        PostgresError: From<W::Error>,
    {
        let name = format!("{schema}.{table}");
        let mut table_reader = snapshot::open_table(
            reader,
            &mut self.catalog,
            &mut self.decoder,
            (schema, table),
            after,
            self.cfg.snapshot_chunk_rows,
        )
        .await?;
        let estimated = snapshot::estimated_rows(reader, table_reader.relation()).await?;
        let mut watch = copy
            .metrics
            .start_table(&name, estimated, table_reader.last_key());
        loop {
            if *shutdown.borrow() || st.emitter.abandoned() {
                info!(table = %name, rows = watch.rows(), "snapshot interrupted: it resumes after the last acknowledged chunk at the next run");
                return Ok(false);
            }
            // One record at a time: memory holds the chunk's rows as text
            // and the records the budget admits, not a chunk of both.
            let rows = table_reader.fetch(reader).await?;
            let read = rows.len();
            if read == 0 {
                break;
            }
            let relation = table_reader.relation();
            let mut renderer = snapshot::RowRenderer::new(relation, &self.decoder)?;
            for row in rows.iter() {
                let at = &st.captured_at;
                let (decoder, tx) = (&mut self.decoder, &mut copy.tx);
                renderer.render(row, decoder, tx, at, &mut copy.decoded)?;
                decoder.count_snapshot(relation, &copy.decoded);
                for record in copy.decoded.drain(..) {
                    st.emitter.push_waiting(record, keep).await?;
                }
            }
            drop(rows);
            watch.add(read as u64);
            copy.total += read;
            if let Some(key) = table_reader.last_key() {
                copy.sent(&st.emitter, &name, TableProgress::After(key.to_vec()));
            }
            copy.persist_with(st.emitter.tracker())?;
            keep.tick().await?;
        }
        table_reader.close().await?;
        copy.sent(&st.emitter, &name, TableProgress::Done);
        watch.finish();
        copy.metrics.table_done();
        Ok(true)
    }

    /// Copies the tables added to `source.tables` since the last run (see
    /// `docs/snapshots.md`, "Tables added later"): already in the
    /// publication, read in a plain REPEATABLE READ transaction, their rows
    /// take positions just below the slot's position, where the stream
    /// resumes. False when a shutdown interrupted it (the next start copies
    /// them again).
    async fn copy_added(
        &mut self,
        added: Vec<(String, String)>,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, PostgresError> {
        let resume = self.report.confirmed_flush_lsn;
        info!(tables = %display_all(&added), resume_lsn = %Lsn(resume),
              "snapshot: copying tables added to source.tables; the others stream on from the slot");
        let Some(rows) = self
            .copy_added_at(&added, resume, st, shutdown, &mut ())
            .await?
        else {
            return Ok(false);
        };
        if !wait_drained(st, shutdown, &mut ()).await? {
            return Ok(false);
        }
        let mut captured = self.captured.clone();
        captured.tables.extend(added);
        self.save_captured(captured)?;
        info!(
            rows,
            "snapshot of the added tables complete; streaming from the slot"
        );
        Ok(true)
    }

    /// Reads `tables` in a new plain REPEATABLE READ transaction as
    /// snapshot rows at `{resume - 1}:{ordinal}` and commits them to the
    /// tracker at `resume`. The row count, or None when a shutdown
    /// interrupted it.
    async fn copy_added_at<W>(
        &mut self,
        tables: &[(String, String)],
        resume: u64,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
        keep: &mut W,
    ) -> Result<Option<usize>, PostgresError>
    where
        W: WhileWaiting,
        PostgresError: From<W::Error>,
    {
        let reader = connect_sql(&self.cfg.connection).await?;
        wait_for_older_transactions(&reader, OLDER_TRANSACTIONS_WAIT, keep).await?;
        snapshot::begin(&reader, None).await?;
        let major = resume.saturating_sub(1);
        let mut tx = snapshot_transaction(major);
        // Two copies at one position (nothing streamed between them) do
        // not reuse ordinals, so every row keeps its own id.
        tx.ordinal = self.captured.ordinal_after(major, 0);
        st.captured_at = tributary_envelope::time::now();
        // No ledger: an added table interrupted is copied whole again.
        let mut copy = SnapshotCopy {
            metrics: SnapshotMetrics::new(&self.cfg.name),
            ledger: None,
            decoded: Vec::with_capacity(2),
            tx,
            total: 0,
        };
        let mut finished = true;
        for (schema, table) in tables {
            if !self
                .copy_table(
                    &reader,
                    (schema, table),
                    None,
                    &mut copy,
                    st,
                    shutdown,
                    keep,
                )
                .await?
            {
                finished = false;
                break;
            }
        }
        self.captured.snapshot_end = Some((major, copy.tx.ordinal));
        // The rows are acknowledged with the position the stream has
        // reached: nothing beyond it.
        st.emitter.commit_waiting(resume, keep).await?;
        if !finished {
            return Ok(None);
        }
        reader
            .batch_execute("COMMIT")
            .await
            .map_err(PostgresError::query("ending the snapshot transaction"))?;
        Ok(Some(copy.total))
    }

    /// Writes the set of captured tables to `[state] dir`.
    /// A set without [`CapturedTables::snapshot_end`] keeps the current one.
    fn save_captured(&mut self, mut captured: CapturedTables) -> Result<(), PostgresError> {
        captured.snapshot_end = captured.snapshot_end.or(self.captured.snapshot_end);
        captured.save(&self.captured_path).map_err(|e| {
            PostgresError::Setup(format!(
                "cannot write {}: {e}",
                self.captured_path.display()
            ))
        })?;
        self.captured = captured;
        Ok(())
    }

    /// Captures tables that match `source.tables` but are new to the
    /// stream (created while it runs, or dropped and created again): adds
    /// them to the publication, copies their rows between two transactions
    /// of the stream, waits until Kinesis holds the copy, then records them
    /// as captured. False when a shutdown interrupted it.
    async fn refresh_tables(
        &mut self,
        st: &mut RunState,
        keep: &mut KeepAlive<'_>,
        shutdown: &watch::Receiver<bool>,
        silence: Duration,
    ) -> Result<bool, PostgresError> {
        // Bounded like every query of the session: a dead peer must not
        // hold the stream.
        let look = async {
            let matching = setup::matching_tables(&self.side, &self.cfg.filter).await?;
            let published = setup::published_tables(&self.side, &self.cfg.publication).await?;
            Ok::<_, PostgresError>((matching.tables, published))
        };
        let (matching, published) = bounded(silence, "looking for new tables", look).await??;
        let new: Vec<(String, String)> = matching
            .iter()
            .filter(|t| !published.contains(t) || !self.captured.tables.contains(*t))
            .cloned()
            .collect();
        if new.is_empty() {
            return Ok(true);
        }
        let unpublished: Vec<(String, String)> = new
            .iter()
            .filter(|t| !published.contains(t))
            .cloned()
            .collect();
        // In the publication first: every change committed after this is
        // streamed, and the copy below is read after it.
        let add = setup::add_to_publication(&self.side, &self.cfg.publication, &unpublished);
        match bounded(silence, "adding new tables to the publication", add).await? {
            Ok(()) => {}
            // A table made by another role, or dropped since it was
            // listed: the stream goes on and the next refresh tries again
            // (at start-up the same refusal stops with the statement).
            Err(PostgresError::Misconfigured { message, .. }) => {
                warn!(tables = %display_all(&unpublished), error = %message,
                      "new tables matching source.tables are not captured yet; retrying at the next refresh");
                return Ok(true);
            }
            Err(err) => return Err(err),
        }
        if self.cfg.snapshot {
            info!(tables = %display_all(&new), "snapshot: copying new tables matching source.tables");
            let copied = self
                .copy_added_at(&new, st.read_end, st, shutdown, keep)
                .await?;
            if copied.is_none() || !wait_drained(st, shutdown, keep).await? {
                return Ok(false);
            }
        }
        // Recorded: the tables still matching (dropped ones leave) and the
        // new ones.
        let captured = CapturedTables::new(
            matching
                .into_iter()
                .filter(|t| self.captured.tables.contains(t) || new.contains(t)),
        );
        self.save_captured(captured)?;
        Ok(true)
    }

    async fn session(
        &mut self,
        st: &mut RunState,
        shutdown: &mut watch::Receiver<bool>,
        drain_timeout: Duration,
    ) -> Result<Stopped, PostgresError> {
        let silence = self.read_deadline().await?;
        let tracker = st.emitter.tracker().clone();
        let start = self.confirmed_flush(silence).await?.max(tracker.acked());
        let mut conn = ReplicationConnection::start(
            &self.cfg.connection,
            SESSION_OPTIONS,
            &format!("tributary-{}", self.cfg.name),
            &self.cfg.slot,
            &self.cfg.publication,
            0,
        )
        .await
        .map_err(wire_error("starting replication"))?;
        info!(
            server = %describe(&self.cfg.connection),
            slot = %self.cfg.slot,
            publication = %self.cfg.publication,
            from_lsn = %Lsn(start),
            tables = self.report.tables.len(),
            "streaming changes from postgres"
        );
        // Ask for a reply often enough that a live server is never silent
        // for `silence`, whatever its wal_sender_timeout.
        let mut feedback = Feedback::new(start, (silence / 3).min(Feedback::HEARTBEAT));
        st.read_end = st.read_end.max(start);
        // New tables matching source.tables are looked for this often,
        // between two transactions.
        let refresh_every = self.cfg.table_refresh;
        let mut refresh_due = refresh_every.map(|every| tokio::time::Instant::now() + every);
        // Time spent waiting on the socket with nothing arriving (time spent
        // handing records downstream does not count).
        let mut quiet = Duration::ZERO;
        let mut acked = tracker.subscribe();
        let mut tx: Option<Transaction> = None;
        let mut stopping = *shutdown.borrow();
        let mut decoded = Vec::with_capacity(4);
        let mut heartbeat_due = self
            .cfg
            .heartbeat
            .map(|every| tokio::time::Instant::now() + every);
        'stream: loop {
            // Everything already read, without waiting.
            while let Some(message) = conn
                .next_message()
                .map_err(wire_error("reading the replication stream"))?
            {
                match message {
                    StreamMessage::XLogData { data, .. } => {
                        let msg = pgoutput::parse(&data)?;
                        match &msg {
                            Message::Begin {
                                final_lsn,
                                commit_time,
                                xid,
                            } => {
                                tx = Some(Transaction::begin(*final_lsn, *xid, *commit_time));
                                st.captured_at = tributary_envelope::time::now();
                            }
                            Message::Commit { end_lsn, .. } => {
                                let mut keep = KeepAlive {
                                    conn: &mut conn,
                                    feedback: &mut feedback,
                                    tracker: &tracker,
                                };
                                st.emitter.commit_waiting(*end_lsn, &mut keep).await?;
                                st.read_end = st.read_end.max(*end_lsn);
                                tx = None;
                                if stopping || st.emitter.abandoned() {
                                    break 'stream;
                                }
                            }
                            Message::Relation(rel) => {
                                let facts = if self.decoder.captures(&rel.schema, &rel.table) {
                                    let describe = self.catalog.describe(&self.side, rel);
                                    bounded(silence, "reading a table's catalogue", describe)
                                        .await??
                                } else {
                                    Default::default()
                                };
                                self.decoder.relation(rel, facts);
                            }
                            _ => {
                                let Some(tx) = tx.as_mut() else { continue };
                                self.decoder
                                    .change(&msg, tx, &st.captured_at, &mut decoded)?;
                            }
                        }
                        // The message's bytes are freed before its records
                        // wait for budget: a large row is held once, as its
                        // envelope, not twice.
                        drop(msg);
                        drop(data);
                        let mut keep = KeepAlive {
                            conn: &mut conn,
                            feedback: &mut feedback,
                            tracker: &tracker,
                        };
                        for record in decoded.drain(..) {
                            st.emitter.push_waiting(record, &mut keep).await?;
                        }
                        if st.emitter.abandoned() {
                            // Stopping while the sink is stalled: the open
                            // transaction is never committed, so nothing of
                            // it is acknowledged.
                            break 'stream;
                        }
                    }
                    StreamMessage::KeepAlive { wal_end, reply } => {
                        if tx.is_none() && !st.emitter.has_pending() {
                            tracker.idle(wal_end);
                            st.read_end = st.read_end.max(wal_end);
                        }
                        if reply {
                            feedback.send(&mut conn, tracker.acked(), true).await?;
                        }
                    }
                    StreamMessage::End => {
                        return Err(PostgresError::Connection {
                            context: "the server ended the replication stream".into(),
                            source: "stream closed".into(),
                        });
                    }
                }
            }
            if stopping && tx.is_none() {
                break;
            }
            if let (Some(due), Some(every)) = (refresh_due, refresh_every)
                && tx.is_none()
                && tokio::time::Instant::now() >= due
            {
                let mut keep = KeepAlive {
                    conn: &mut conn,
                    feedback: &mut feedback,
                    tracker: &tracker,
                };
                if !self
                    .refresh_tables(st, &mut keep, shutdown, silence)
                    .await?
                    || st.emitter.abandoned()
                {
                    break;
                }
                refresh_due = Some(tokio::time::Instant::now() + every);
            }
            feedback.maybe_send(&mut conn, tracker.acked()).await?;
            // Records wait in the batch only while more of their transaction
            // is on its way; hand them over before sleeping on the socket.
            if tx.is_some() {
                let mut keep = KeepAlive {
                    conn: &mut conn,
                    feedback: &mut feedback,
                    tracker: &tracker,
                };
                st.emitter.flush_waiting(&mut keep).await?;
                if st.emitter.abandoned() {
                    break;
                }
            }
            let feedback_due = feedback.next_due(tracker.acked());
            let waiting_since = tokio::time::Instant::now();
            let read_deadline = waiting_since + silence.saturating_sub(quiet);
            let mut heard = false;
            tokio::select! {
                biased;
                requested = stop_requested(shutdown), if !stopping => stopping = requested,
                _ = acked.changed() => {}
                _ = tokio::time::sleep_until(feedback_due) => {}
                _ = sleep_until_some(refresh_due), if tx.is_none() => {}
                _ = tokio::time::sleep_until(heartbeat_due.unwrap_or(read_deadline)),
                    if heartbeat_due.is_some() =>
                {
                    let beating = self.heartbeat(silence).await?;
                    heartbeat_due = self
                        .cfg
                        .heartbeat
                        .filter(|_| beating)
                        .map(|every| tokio::time::Instant::now() + every);
                }
                more = conn.fill() => {
                    if !more.map_err(wire_error("reading the replication stream"))? {
                        return Err(PostgresError::Connection {
                            context: "the server closed the replication connection".into(),
                            source: "end of stream".into(),
                        });
                    }
                    heard = true;
                }
                _ = tokio::time::sleep_until(read_deadline) => {
                    return Err(PostgresError::Connection {
                        context: format!(
                            "nothing from the server for {silence:?}, not even a keepalive \
                             (source.postgres.read_timeout_secs)"
                        ),
                        source: "read deadline passed: the connection is taken for dead".into(),
                    });
                }
            }
            quiet = if heard {
                Duration::ZERO
            } else {
                quiet + waiting_since.elapsed()
            };
        }
        // Shutdown at a transaction boundary: hand over the rest, let the
        // sink finish, then acknowledge the last commit before closing.
        let mut keep = KeepAlive {
            conn: &mut conn,
            feedback: &mut feedback,
            tracker: &tracker,
        };
        let stopped = st
            .emitter
            .close_and_drain_waiting(drain_timeout, &mut keep)
            .await?;
        let last = tracker.acked();
        feedback.send(&mut conn, last, false).await?;
        conn.close()
            .await
            .map_err(wire_error("closing the replication stream"))?;
        info!(acknowledged_lsn = %Lsn(last), in_flight = tracker.in_flight(), "replication stopped");
        Ok(stopped)
    }
}

impl PostgresSource {
    /// Writes a heartbeat (`source.postgres.heartbeat_interval_secs`) into
    /// the captured database's WAL: a non-transactional logical message,
    /// which pgoutput does not send (it is asked for no messages), so
    /// nothing reaches the stream; the walsender decodes past it and its
    /// keepalives carry a WAL end that the idle session confirms. False
    /// when the server refuses it (logged once; no more heartbeats this
    /// session); a silent connection fails the session like any query.
    async fn heartbeat(&self, limit: Duration) -> Result<bool, PostgresError> {
        let query = self
            .side
            .batch_execute("SELECT pg_logical_emit_message(false, 'tributary', 'heartbeat')");
        match bounded(limit, "writing a heartbeat", query).await? {
            Ok(()) => Ok(true),
            Err(err) if err.as_db_error().is_some() => {
                warn!(
                    error = %one_line(&err),
                    "heartbeat refused (source.postgres.heartbeat_interval_secs): \
                     heartbeats stop until the next reconnect"
                );
                Ok(false)
            }
            Err(err) => Err(PostgresError::query("writing a heartbeat")(err)),
        }
    }
}

/// A snapshot's "transaction": every row at `{major}:{ordinal}`, with no
/// transaction id or commit time.
fn snapshot_transaction(major: u64) -> Transaction {
    let mut tx = Transaction::begin(major, 0, 0);
    tx.meta.tx_id.clear();
    tx.meta.commit_ts = None;
    tx
}

/// Waits until the sink has finished everything handed over, running
/// `keep` meanwhile. False when a shutdown came first.
async fn wait_drained<W>(
    st: &RunState,
    shutdown: &watch::Receiver<bool>,
    keep: &mut W,
) -> Result<bool, PostgresError>
where
    W: WhileWaiting,
    PostgresError: From<W::Error>,
{
    while !st.emitter.tracker().is_drained() {
        if *shutdown.borrow() || st.emitter.abandoned() {
            return Ok(false);
        }
        keep.tick().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
}

/// How long a copy of added tables waits for transactions older than the
/// `ADD TABLE` (see [`wait_for_older_transactions`]).
const OLDER_TRANSACTIONS_WAIT: Duration = Duration::from_secs(30);

/// Waits (up to `limit`, running `keep`) until every transaction that was
/// open when the tables were added to the publication has ended. Changes a
/// transaction made to a table before the table was published are not
/// decoded even when it commits later; once it has ended, the copy's
/// snapshot, taken after this, holds them. Past `limit` it warns and goes
/// on (a session left idle in a transaction must not stall the stream).
async fn wait_for_older_transactions<W>(
    client: &Client,
    limit: Duration,
    keep: &mut W,
) -> Result<(), PostgresError>
where
    W: WhileWaiting,
    PostgresError: From<W::Error>,
{
    let context = "waiting for transactions older than the new tables";
    let horizon: String = client
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await
        .map_err(PostgresError::query(context))?
        .get(0);
    let began: std::time::SystemTime = client
        .query_one("SELECT statement_timestamp()", &[])
        .await
        .map_err(PostgresError::query(context))?
        .get(0);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let row = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8, \
                 (SELECT string_agg(pid::text, ', ') FROM pg_stat_activity \
                  WHERE backend_xid IS NOT NULL AND xact_start < $2)",
                &[&horizon, &began],
            )
            .await
            .map_err(PostgresError::query(context))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let pids: Option<String> = row.get(1);
            warn!(waited = ?limit, pids = pids.as_deref().unwrap_or("?"),
                  "transactions older than the new tables are still open: rows they wrote to \
                   those tables before the tables were published are not in the copy and are not \
                   streamed (run `tributary verify` later, or re-snapshot the tables)");
            return Ok(());
        }
        keep.tick().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sleeps until `when`, or forever without one.
async fn sleep_until_some(when: Option<tokio::time::Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

/// `fut`, failed as a dropped connection when it takes longer than `limit`
/// (a query on a connection whose peer went silent never ends by itself).
async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, PostgresError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| PostgresError::Connection {
            context: format!("{what}: no answer within {limit:?}"),
            source: "query timed out".into(),
        })
}

/// Waits for the shutdown flag to change and returns it. When the sender is
/// gone no request can come any more: it waits forever rather than return
/// at once (which would turn every `select!` on it into a busy loop).
async fn stop_requested(shutdown: &mut watch::Receiver<bool>) -> bool {
    if shutdown.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    *shutdown.borrow()
}

fn wire_error(context: &str) -> impl FnOnce(WireError) -> PostgresError {
    let context = context.to_owned();
    move |e| {
        if let WireError::Tls(setup) = e {
            return PostgresError::Tls(*setup);
        }
        if e.is_auth() || !retry_can_fix(&e) {
            PostgresError::Setup(format!("{context}: {e}"))
        } else {
            PostgresError::Connection {
                context,
                source: Box::new(e),
            }
        }
    }
}

/// Whether reconnecting can fix a replication connection error: socket
/// trouble, and server errors of the classes that pass (connection
/// exceptions 08, transaction rollbacks 40, insufficient resources 53,
/// operator intervention 57 such as a shutdown or restart, system errors
/// 58) or an object in use (55006: the slot is held by another session).
/// Anything else (a dropped or invalidated slot, a missing publication, a
/// syntax error) needs a person.
fn retry_can_fix(e: &WireError) -> bool {
    match e {
        WireError::Server { code, .. } => {
            code == OBJECT_IN_USE
                || ["08", "40", "53", "57", "58"]
                    .iter()
                    .any(|c| code.starts_with(c))
        }
        WireError::Io(_) | WireError::Protocol(_) => true,
        WireError::Tls(_) | WireError::TlsRefused(_) => false,
    }
}

/// SQLSTATE of "replication slot ... is active for PID ...".
const OBJECT_IN_USE: &str = "55006";

/// What a transient failure means for the person reading the retry line.
fn retry_meaning(err: &PostgresError) -> &'static str {
    let wire = std::iter::successors(Some(err as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .find_map(|e| e.downcast_ref::<WireError>());
    match wire {
        Some(WireError::Server { code, .. }) if code == OBJECT_IN_USE => {
            "another session streams from this slot: a second connector with the same \
             source.postgres.slot (stop it, or give this one its own slot), or a previous \
             session the server has not noticed is gone yet (it lets go after \
             wal_sender_timeout, 60 s by default); retrying until the slot is free"
        }
        Some(WireError::Server { code, .. }) if code.starts_with("57") => {
            "the server is shutting down, restarting or starting up; retrying"
        }
        Some(WireError::Server { code, .. }) if code.starts_with("53") => {
            "the server is out of connections or resources (max_wal_senders, \
             max_connections); retrying"
        }
        _ => "the connection to the server failed or dropped (network, server restart); retrying",
    }
}

/// When to send standby status updates: soon after the acknowledgeable
/// position rises, and every `heartbeat` regardless (so the server never
/// times the connection out). A heartbeat asks the server for a reply, so
/// a live server is never silent for longer than that.
struct Feedback {
    sent: u64,
    sent_at: tokio::time::Instant,
    heartbeat: Duration,
}

impl Feedback {
    const RAISE_DELAY: Duration = Duration::from_millis(100);
    const HEARTBEAT: Duration = Duration::from_secs(10);

    fn new(start: u64, heartbeat: Duration) -> Self {
        Self {
            sent: start,
            sent_at: tokio::time::Instant::now(),
            heartbeat,
        }
    }

    /// When the next update is due: shortly after a raise, else the heartbeat.
    fn next_due(&self, acked: u64) -> tokio::time::Instant {
        if acked > self.sent {
            self.sent_at + Self::RAISE_DELAY
        } else {
            self.sent_at + self.heartbeat
        }
    }

    async fn maybe_send(
        &mut self,
        conn: &mut ReplicationConnection,
        acked: u64,
    ) -> Result<(), PostgresError> {
        let elapsed = self.sent_at.elapsed();
        let heartbeat = elapsed >= self.heartbeat;
        if (acked > self.sent && elapsed >= Self::RAISE_DELAY) || heartbeat {
            self.send(conn, acked, heartbeat).await?;
        }
        Ok(())
    }

    async fn send(
        &mut self,
        conn: &mut ReplicationConnection,
        acked: u64,
        reply: bool,
    ) -> Result<(), PostgresError> {
        let lsn = acked.max(self.sent);
        conn.send_status(lsn, reply)
            .await
            .map_err(wire_error("sending a standby status update"))?;
        self.sent = lsn;
        self.sent_at = tokio::time::Instant::now();
        Ok(())
    }
}

/// What a parallel copy reads: the units left, each range's relation
/// (by its index in the plan; `None` for a table no longer captured) and
/// each table's estimated rows.
#[derive(Default)]
struct SnapshotPlan {
    units: Vec<snapshot_readers::Unit>,
    relations: Vec<Option<u32>>,
    estimated: HashMap<String, u64>,
}

/// Chunks rendered at once at most, each on a blocking thread with a
/// decoder of its own (see [`ParallelCopy`]).
fn renderers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

/// The renderer of a parallel copy: turns the readers' chunks into
/// records, each range at its own positions, and hands them over in the
/// order the readers delivered them. Each chunk is rendered on a blocking
/// thread by a clone of the source's decoder (up to [`renderers`] chunks
/// at once), so the rendering spreads over the cores while the readers
/// keep the server reading; the records are then pushed in delivery order,
/// which numbers them as one renderer would.
struct ParallelCopy {
    metrics: SnapshotMetrics,
    /// Records acknowledged chunks in the marker (none for `snapshot = "only"`).
    ledger: Option<ChunkLedger>,
    /// Decoders free to render a chunk.
    idle: Vec<Decoder>,
    /// Deliveries not yet handed over, in the order they came.
    queue: VecDeque<InRender>,
    /// Per range of the plan: its table, the position of its next row
    /// (`{range major}:{ordinal}`), and its resume key if it had one.
    ranges: Vec<(String, Transaction, Option<Vec<String>>)>,
    /// Per table: its ranges not yet read to their end.
    open: HashMap<String, usize>,
    /// Per table being read: its watch (rows, log lines, bar).
    watches: HashMap<String, TableWatch>,
    estimated: HashMap<String, u64>,
    total: usize,
}

/// The rendering of one chunk: its decoder (given back) and its records.
type Rendered = Result<(Decoder, Vec<Record>), PostgresError>;

/// A delivery of the readers on its way to the pipeline.
enum InRender {
    /// A chunk of the range at `index`, being rendered.
    Chunk {
        index: usize,
        rows: usize,
        last_key: Option<Vec<String>>,
        /// The range's next ordinal after this chunk.
        ordinal: u32,
        job: tokio::task::JoinHandle<Rendered>,
    },
    /// The range at `index` is read to its end.
    Done { index: usize },
}

impl ParallelCopy {
    fn new(
        source: &str,
        progress: &SnapshotProgress,
        estimated: HashMap<String, u64>,
        decoder: &Decoder,
    ) -> Self {
        let mut metrics = SnapshotMetrics::new(source);
        let mut open: HashMap<String, usize> = HashMap::new();
        for range in &progress.ranges {
            let left = usize::from(range.state != Some(TableProgress::Done));
            *open.entry(range.table.clone()).or_default() += left;
        }
        let mut done: Vec<&String> = estimated
            .keys()
            .filter(|t| open.get(*t).is_none_or(|left| *left == 0))
            .collect();
        done.sort();
        for table in done {
            info!(table = %table, "snapshot: table already delivered before the restart");
            metrics.table_done();
        }
        let ranges = progress
            .ranges
            .iter()
            .map(|r| {
                let mut tx = snapshot_transaction(r.major);
                tx.ordinal = r.ordinal;
                let after = match &r.state {
                    Some(TableProgress::After(key)) => Some(key.clone()),
                    _ => None,
                };
                (r.table.clone(), tx, after)
            })
            .collect();
        Self {
            metrics,
            ledger: None,
            idle: vec![decoder.clone(); renderers()],
            queue: VecDeque::new(),
            ranges,
            open,
            watches: HashMap::new(),
            estimated,
            total: 0,
        }
    }

    /// True while a decoder is free for the next chunk.
    fn can_render(&self) -> bool {
        !self.idle.is_empty()
    }

    /// Queues one delivery of a reader: a chunk starts rendering on an idle
    /// decoder (call only when [`ParallelCopy::can_render`]) at its range's
    /// next positions.
    fn dispatch(
        &mut self,
        delivery: snapshot_readers::Delivery,
        relations: &[Option<u32>],
        captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
    ) {
        use snapshot_readers::Delivery;
        let index = match &delivery {
            Delivery::Rows { index, .. } | Delivery::Done { index } => *index,
        };
        let (table, tx, after) = self
            .ranges
            .get_mut(index)
            .expect("readers only read ranges of the plan");
        self.watches.entry(table.clone()).or_insert_with(|| {
            let estimated = self.estimated.get(table.as_str()).copied().unwrap_or(0);
            self.metrics.start_table(table, estimated, after.as_deref())
        });
        let (rows, last_key) = match delivery {
            Delivery::Rows { rows, last_key, .. } => (rows, last_key),
            Delivery::Done { .. } => {
                self.queue.push_back(InRender::Done { index });
                return;
            }
        };
        let relation = relations
            .get(index)
            .copied()
            .flatten()
            .expect("readers only read ranges of captured tables");
        let mut decoder = self.idle.pop().expect("a decoder is idle");
        let mut chunk_tx = tx.clone();
        let count = rows.len();
        tx.ordinal = tx
            .ordinal
            .saturating_add(u32::try_from(count).unwrap_or(u32::MAX));
        let job = tokio::task::spawn_blocking(move || {
            let mut records = Vec::with_capacity(rows.len());
            snapshot::render_chunk(
                relation,
                &rows,
                &mut decoder,
                &mut chunk_tx,
                &captured_at,
                &mut records,
            )?;
            decoder.count_snapshot(relation, &records);
            Ok((decoder, records))
        });
        self.queue.push_back(InRender::Chunk {
            index,
            rows: count,
            last_key,
            ordinal: tx.ordinal,
            job,
        });
    }

    /// Hands the oldest queued delivery over to the pipeline (waiting for
    /// its rendering) and records its chunk in the ledger; false when
    /// nothing is queued.
    async fn hand_over_oldest(&mut self, st: &mut RunState) -> Result<bool, PostgresError> {
        let Some(next) = self.queue.pop_front() else {
            return Ok(false);
        };
        match next {
            InRender::Chunk {
                index,
                rows,
                last_key,
                ordinal,
                job,
            } => {
                let (decoder, records) = job.await.map_err(|e| {
                    PostgresError::Setup(format!("rendering a snapshot chunk failed: {e}"))
                })??;
                self.idle.push(decoder);
                for record in records {
                    st.emitter.push(record).await?;
                }
                let table = &self.ranges[index].0;
                if let Some(watch) = self.watches.get_mut(table) {
                    watch.add(rows as u64);
                }
                self.total += rows;
                if let (Some(ledger), Some(key)) = (&mut self.ledger, last_key) {
                    ledger.sent_range(&st.emitter, index, TableProgress::After(key), ordinal);
                }
            }
            InRender::Done { index } => {
                let (table, tx, _) = &self.ranges[index];
                if let Some(ledger) = &mut self.ledger {
                    ledger.sent_range(&st.emitter, index, TableProgress::Done, tx.ordinal);
                }
                let left = self.open.entry(table.clone()).or_default();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    if let Some(watch) = self.watches.remove(table.as_str()) {
                        watch.finish();
                    }
                    self.metrics.table_done();
                }
            }
        }
        self.persist_with(st.emitter.tracker())?;
        Ok(true)
    }

    /// Stores the progress of every chunk Kinesis acknowledged.
    fn persist_with(&mut self, tracker: &AckTracker) -> Result<(), PostgresError> {
        persist_done(self.ledger.as_mut(), tracker)
    }
}

/// Stores in `ledger` (if any) the progress of every chunk Kinesis
/// acknowledged.
fn persist_done(
    ledger: Option<&mut ChunkLedger>,
    tracker: &AckTracker,
) -> Result<(), PostgresError> {
    if let Some(ledger) = ledger {
        ledger.persist_done(tracker).map_err(|e| {
            PostgresError::Setup(format!("cannot write the snapshot progress: {e}"))
        })?;
    }
    Ok(())
}

/// A snapshot copy's state shared by its tables.
struct SnapshotCopy {
    metrics: SnapshotMetrics,
    /// Records acknowledged chunks in the marker (none for `snapshot = "only"`).
    ledger: Option<ChunkLedger>,
    decoded: Vec<Record>,
    /// Every snapshot row's position: `{consistent point - 1}:{ordinal}`.
    tx: Transaction,
    total: usize,
}

impl SnapshotCopy {
    /// A chunk of `table` was handed over through `emitter`; once done,
    /// the table is in `state`.
    fn sent(&mut self, emitter: &Emitter, table: &str, state: TableProgress) {
        if let Some(ledger) = &mut self.ledger {
            let (major, ordinal) = (self.tx.commit_lsn, self.tx.ordinal);
            ledger.sent(emitter, table, state, major, ordinal);
        }
    }

    /// Stores the progress of every chunk Kinesis acknowledged.
    fn persist_with(&mut self, tracker: &AckTracker) -> Result<(), PostgresError> {
        persist_done(self.ledger.as_mut(), tracker)
    }
}

/// The reader's side of the pipeline: the emitter and the capture time of
/// the current transaction's records.
struct RunState {
    emitter: Emitter,
    /// `captured_at` of the records of the current transaction.
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
    /// How far the stream has been read: the end of the last commit, or
    /// the WAL end of a keepalive that came with nothing open. Every change
    /// sent so far has a position below it, every later one at or above.
    read_end: u64,
}

/// Keeps the replication connection alive while the pipeline makes the
/// reader wait (budget, a full queue, the final drain): status updates go
/// out as they fall due, so the server neither times the session out nor
/// keeps WAL that is already acknowledged.
struct KeepAlive<'a> {
    conn: &'a mut ReplicationConnection,
    feedback: &'a mut Feedback,
    tracker: &'a AckTracker,
}

impl WhileWaiting for KeepAlive<'_> {
    type Error = PostgresError;

    async fn tick(&mut self) -> Result<(), PostgresError> {
        self.feedback
            .maybe_send(self.conn, self.tracker.acked())
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dropped_shutdown_sender_is_never_a_request() {
        let (sender, mut receiver) = watch::channel(false);
        drop(sender);
        let waited =
            tokio::time::timeout(Duration::from_millis(50), stop_requested(&mut receiver)).await;
        assert!(
            waited.is_err(),
            "returned at once: a select! on it would spin"
        );

        let (sender, mut receiver) = watch::channel(false);
        sender.send(true).unwrap();
        assert!(stop_requested(&mut receiver).await);
    }
}

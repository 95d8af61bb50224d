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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, NoTls};
use tracing::{debug, info, warn};
pub use tributary_envelope::Stopped;
use tributary_envelope::error_text::one_line;
use tributary_envelope::{AckTracker, Budget, Record};

use crate::catalog::Catalog;
use crate::config::PostgresSourceConfig;
use crate::decoder::{Decoder, Transaction};
use crate::error::PostgresError;
use crate::lsn::Lsn;
use crate::pgoutput::{self, Message};
use crate::setup::{self, SetupReport};
use crate::snapshot::{self, PendingSnapshot};
use crate::wire::{ReplicationConnection, StreamMessage, WireError};
use tributary_envelope::CapturedTables;
use tributary_envelope::captured::display_all;

/// Session settings that give every type one text shape (see `types`).
const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC \
     -c bytea_output=hex -c lc_monetary=C -c extra_float_digits=1";

/// Read deadline when neither `source.postgres.read_timeout_secs` nor the
/// server's `wal_sender_timeout` gives one.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Budget the reader takes at a time (records draw on it one by one).
const BUDGET_CHUNK: usize = 256 * 1024;

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
}

impl std::fmt::Debug for PostgresSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSource")
            .field("slot", &self.cfg.slot)
            .field("publication", &self.cfg.publication)
            .finish_non_exhaustive()
    }
}

/// Opens an ordinary (non-replication) connection. The whole handshake is
/// bounded by the URL's `connect_timeout` (tokio-postgres bounds only the
/// TCP connect): a server that accepts and then says nothing fails it.
pub async fn connect_sql(config: &tokio_postgres::Config) -> Result<Client, PostgresError> {
    let limit = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(crate::config::DEFAULT_CONNECT_TIMEOUT);
    let context = || format!("connecting to {}", describe(config));
    let (client, connection) = tokio::time::timeout(limit, config.connect(NoTls))
        .await
        .map_err(|_| PostgresError::Connection {
            context: context(),
            source: format!("no answer within {limit:?} (connect_timeout)").into(),
        })?
        .map_err(|e| PostgresError::Connection {
            context: context(),
            source: Box::new(e),
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            debug!(error = %err, "postgres connection ended");
        }
    });
    Ok(client)
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
        let current = CapturedTables::new(self.report.matching.iter().cloned());
        let stored = CapturedTables::load(&self.captured_path).map_err(state_error)?;
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
            }
            return Ok(());
        }
        // The set keeps the tables still matching until the copy is done.
        self.captured = CapturedTables::new(
            stored
                .unwrap_or_default()
                .tables
                .into_iter()
                .filter(|t| current.tables.contains(t)),
        );
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
            out: Some(out),
            tracker,
            budget,
            next_seq: 0,
            batch: Vec::with_capacity(self.cfg.batch_records),
            captured_at: tributary_envelope::time::now(),
            credit: 0,
            shutdown: shutdown.clone(),
            drain_timeout,
            stop_deadline: None,
            abandoned: false,
            read_end: 0,
            last_snapshot: None,
        };
        if let Some(pending) = self.snapshot.take()
            && !self.copy_snapshot(pending, &mut state, &shutdown).await?
        {
            // Stopped during the snapshot: it starts again at the next run.
            return Ok(state.drain(drain_timeout).await);
        }
        if self.cfg.snapshot_only {
            info!("snapshot = \"only\": the copy is delivered; stopping");
            return Ok(state.drain(drain_timeout).await);
        }
        let added = std::mem::take(&mut self.added);
        if !added.is_empty() && !self.copy_added(added, &mut state, &shutdown).await? {
            // Stopped during the copy: the next run copies them again.
            return Ok(state.drain(drain_timeout).await);
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
    /// `snapshot`), waits until Kinesis has every row, then records the
    /// tables as captured and removes the marker. False when a shutdown
    /// interrupted it.
    async fn copy_snapshot(
        &mut self,
        pending: PendingSnapshot,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<bool, PostgresError> {
        let reader = connect_sql(&self.cfg.connection).await?;
        let taken_at = snapshot::begin(&reader, pending.name.as_deref()).await?;
        let PendingSnapshot {
            export,
            consistent_point,
            marker,
            ..
        } = pending;
        let consistent_point = taken_at.unwrap_or(consistent_point);
        // Imported: the exporting connection is no longer needed.
        drop(export);
        let mut tx = snapshot_transaction(consistent_point.saturating_sub(1));
        st.captured_at = tributary_envelope::time::now();
        let tables = self.report.matching.clone();
        info!(tables = tables.len(), consistent_point = %Lsn(consistent_point), "snapshot: copying the captured tables");
        let began = tokio::time::Instant::now();
        let Some(total) = self
            .copy_tables(&reader, &tables, &mut tx, st, shutdown, None)
            .await?
        else {
            return Ok(false);
        };
        reader
            .batch_execute("COMMIT")
            .await
            .map_err(PostgresError::query("ending the snapshot transaction"))?;
        st.flush().await?;
        st.tracker.commit(st.next_seq, consistent_point);
        // Streaming may start only once Kinesis holds every snapshot row:
        // the marker says the snapshot is unfinished until then.
        if !wait_drained(st, shutdown, None).await? {
            return Ok(false);
        }
        if !self.cfg.snapshot_only {
            self.save_captured(CapturedTables::new(tables))?;
        }
        if let Some(marker) = &marker {
            snapshot::remove_marker(marker)?;
        }
        info!(
            rows = total,
            secs = began.elapsed().as_secs_f64(),
            "snapshot complete; streaming from its consistent point"
        );
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
            .copy_added_at(&added, resume, st, shutdown, None)
            .await?
        else {
            return Ok(false);
        };
        if !wait_drained(st, shutdown, None).await? {
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
    async fn copy_added_at(
        &mut self,
        tables: &[(String, String)],
        resume: u64,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
        session: Option<(&mut ReplicationConnection, &mut Feedback)>,
    ) -> Result<Option<usize>, PostgresError> {
        let reader = connect_sql(&self.cfg.connection).await?;
        snapshot::begin(&reader, None).await?;
        let major = resume.saturating_sub(1);
        let mut tx = snapshot_transaction(major);
        // Two copies at one position (nothing streamed between them) do
        // not reuse ordinals, so every row keeps its own id.
        if let Some((last_major, next)) = st.last_snapshot
            && last_major == major
        {
            tx.ordinal = next;
        }
        st.captured_at = tributary_envelope::time::now();
        let copied = self
            .copy_tables(&reader, tables, &mut tx, st, shutdown, session)
            .await?;
        st.last_snapshot = Some((major, tx.ordinal));
        st.flush().await?;
        // The rows are acknowledged with the position the stream has
        // reached: nothing beyond it.
        st.tracker.commit(st.next_seq, resume);
        if copied.is_some() {
            reader
                .batch_execute("COMMIT")
                .await
                .map_err(PostgresError::query("ending the snapshot transaction"))?;
        }
        Ok(copied)
    }

    /// Reads each of `tables` through the reader's open transaction into
    /// the batch as snapshot rows of `tx`. With a `session` (a copy between
    /// two transactions of a running stream) status updates keep the
    /// replication connection alive meanwhile. The row count, or None when
    /// a shutdown interrupted it.
    async fn copy_tables(
        &mut self,
        reader: &Client,
        tables: &[(String, String)],
        tx: &mut Transaction,
        st: &mut RunState,
        shutdown: &watch::Receiver<bool>,
        mut session: Option<(&mut ReplicationConnection, &mut Feedback)>,
    ) -> Result<Option<usize>, PostgresError> {
        let mut decoded = Vec::with_capacity(snapshot::CHUNK_ROWS);
        let mut total = 0usize;
        for (schema, table) in tables {
            let name = format!("{schema}.{table}");
            let relation =
                snapshot::open_table(reader, &mut self.catalog, &mut self.decoder, schema, table)
                    .await?;
            let (table_began, mut rows, mut reported) = (
                tokio::time::Instant::now(),
                0usize,
                tokio::time::Instant::now(),
            );
            loop {
                if *shutdown.borrow() {
                    info!(table = %name, rows, "snapshot interrupted: it starts again at the next run");
                    return Ok(None);
                }
                let read = snapshot::next_chunk(
                    reader,
                    relation,
                    &mut self.decoder,
                    tx,
                    &st.captured_at,
                    &mut decoded,
                )
                .await?;
                if read == 0 {
                    break;
                }
                for record in decoded.drain(..) {
                    match session.as_mut() {
                        Some((conn, feedback)) => st.push(record, conn, feedback).await?,
                        None => st.push_plain(record).await?,
                    }
                }
                if let Some((conn, feedback)) = session.as_mut() {
                    feedback.maybe_send(conn, st.tracker.acked()).await?;
                }
                rows += read;
                if reported.elapsed() >= Duration::from_secs(5) {
                    reported = tokio::time::Instant::now();
                    let per_sec = rows as f64 / table_began.elapsed().as_secs_f64().max(0.001);
                    info!(table = %name, rows, rows_per_sec = per_sec as u64, "snapshot: copying");
                }
            }
            snapshot::close_cursor(reader).await?;
            total += rows;
            info!(table = %name, rows, secs = table_began.elapsed().as_secs_f64(), "snapshot: table copied");
        }
        Ok(Some(total))
    }

    /// Writes the set of captured tables to `[state] dir`.
    fn save_captured(&mut self, captured: CapturedTables) -> Result<(), PostgresError> {
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
        conn: &mut ReplicationConnection,
        feedback: &mut Feedback,
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
        setup::add_to_publication(&self.side, &self.cfg.publication, &unpublished).await?;
        if self.cfg.snapshot {
            info!(tables = %display_all(&new), "snapshot: copying new tables matching source.tables");
            let copied = self
                .copy_added_at(&new, st.read_end, st, shutdown, Some((conn, feedback)))
                .await?;
            if copied.is_none() || !wait_drained(st, shutdown, Some((conn, feedback))).await? {
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
        let start = self.confirmed_flush(silence).await?.max(st.tracker.acked());
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
        let mut acked = st.tracker.subscribe();
        let mut tx: Option<Transaction> = None;
        let mut stopping = *shutdown.borrow();
        let mut decoded = Vec::with_capacity(4);
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
                                st.flush().await?;
                                st.tracker.commit(st.next_seq, *end_lsn);
                                st.read_end = st.read_end.max(*end_lsn);
                                tx = None;
                                if stopping {
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
                        for record in decoded.drain(..) {
                            st.push(record, &mut conn, &mut feedback).await?;
                        }
                        if st.abandoned {
                            // Stopping while the sink is stalled: the open
                            // transaction is never committed, so nothing of
                            // it is acknowledged.
                            break 'stream;
                        }
                    }
                    StreamMessage::KeepAlive { wal_end, reply } => {
                        if tx.is_none() && st.batch.is_empty() {
                            st.tracker.idle(wal_end);
                            st.read_end = st.read_end.max(wal_end);
                        }
                        if reply {
                            feedback.send(&mut conn, st.tracker.acked(), true).await?;
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
                if !self
                    .refresh_tables(st, &mut conn, &mut feedback, shutdown, silence)
                    .await?
                {
                    break;
                }
                refresh_due = Some(tokio::time::Instant::now() + every);
            }
            feedback.maybe_send(&mut conn, st.tracker.acked()).await?;
            // Records wait in the batch only while more of their transaction
            // is on its way; hand them over before sleeping on the socket.
            if tx.is_some() {
                st.flush().await?;
            }
            let feedback_due = feedback.next_due(st.tracker.acked());
            let waiting_since = tokio::time::Instant::now();
            let read_deadline = waiting_since + silence.saturating_sub(quiet);
            let mut heard = false;
            tokio::select! {
                biased;
                requested = stop_requested(shutdown), if !stopping => stopping = requested,
                _ = acked.changed() => {}
                _ = tokio::time::sleep_until(feedback_due) => {}
                _ = sleep_until_some(refresh_due), if tx.is_none() => {}
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
        st.flush().await?;
        st.out = None;
        let deadline = st
            .stop_deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + drain_timeout);
        let mut stopped = Stopped::Drained;
        while !st.tracker.is_drained() {
            if tokio::time::Instant::now() >= deadline {
                stopped = Stopped::TimedOut;
                break;
            }
            feedback.maybe_send(&mut conn, st.tracker.acked()).await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let last = st.tracker.acked();
        feedback.send(&mut conn, last, false).await?;
        conn.close()
            .await
            .map_err(wire_error("closing the replication stream"))?;
        info!(acknowledged_lsn = %Lsn(last), in_flight = st.tracker.in_flight(), "replication stopped");
        Ok(stopped)
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

/// Waits until the sink has finished everything handed over (sending
/// status updates meanwhile when a replication session is open). False
/// when a shutdown came first.
async fn wait_drained(
    st: &RunState,
    shutdown: &watch::Receiver<bool>,
    mut session: Option<(&mut ReplicationConnection, &mut Feedback)>,
) -> Result<bool, PostgresError> {
    while !st.tracker.is_drained() {
        if *shutdown.borrow() {
            return Ok(false);
        }
        if let Some((conn, feedback)) = session.as_mut() {
            feedback.maybe_send(conn, st.tracker.acked()).await?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(true)
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

struct RunState {
    out: Option<mpsc::Sender<Vec<Record>>>,
    tracker: Arc<AckTracker>,
    budget: Arc<Budget>,
    next_seq: u64,
    batch: Vec<Record>,
    /// `captured_at` of the records of the current transaction.
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
    /// Budget taken but not yet given to a record.
    credit: usize,
    /// Turns true on shutdown; bounds a wait for budget.
    shutdown: watch::Receiver<bool>,
    /// `sink.drain_timeout_secs`.
    drain_timeout: Duration,
    /// Set when a wait for budget first sees the shutdown: the stop must
    /// be over by then, stalled sink or not.
    stop_deadline: Option<tokio::time::Instant>,
    /// A shutdown came while waiting for budget: the open transaction was
    /// dropped (its batch too) and the session must stop reading.
    abandoned: bool,
    /// How far the stream has been read: the end of the last commit, or
    /// the WAL end of a keepalive that came with nothing open. Every change
    /// sent so far has a position below it, every later one at or above.
    read_end: u64,
    /// The major of the last copy of tables and its next ordinal.
    last_snapshot: Option<(u64, u32)>,
}

impl RunState {
    /// Takes budget for a record (sending status updates for what completes
    /// meanwhile) and adds it to the batch.
    async fn push(
        &mut self,
        record: Record,
        conn: &mut ReplicationConnection,
        feedback: &mut Feedback,
    ) -> Result<(), PostgresError> {
        if self.abandoned {
            return Ok(());
        }
        let weight = record.weight().min(self.budget.capacity());
        if self.credit < weight {
            // Take budget in chunks, not per record (what is left over stays
            // below one chunk). Give the remainder back first, so a record
            // as large as the whole budget can still get it.
            if self.credit > 0 {
                self.budget.release(self.credit);
                self.credit = 0;
            }
            let want = weight.max(BUDGET_CHUNK).min(self.budget.capacity());
            if self.budget.available() < want {
                // Hand over what we hold so it can complete and free budget.
                self.flush().await?;
            }
            let budget = self.budget.clone();
            let acquire = budget.acquire(want);
            tokio::pin!(acquire);
            loop {
                if *self.shutdown.borrow() {
                    let deadline = *self
                        .stop_deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + self.drain_timeout);
                    if tokio::time::Instant::now() >= deadline {
                        // The sink stayed stalled (e.g. Kinesis is down) for
                        // the whole drain timeout: stop waiting rather than
                        // hang. The open transaction is never committed, so
                        // nothing of it is acknowledged and a restart sends it.
                        warn!(
                            "the sink is stalled: stopping inside a transaction, which stays unacknowledged"
                        );
                        self.batch.clear();
                        self.abandoned = true;
                        return Ok(());
                    }
                }
                tokio::select! {
                    _ = &mut acquire => break,
                    _ = tokio::time::sleep(Feedback::RAISE_DELAY) => {
                        feedback.maybe_send(conn, self.tracker.acked()).await?;
                    }
                }
            }
            self.credit += want;
        }
        self.credit -= weight;
        self.enqueue(record).await
    }

    /// Takes budget for a snapshot record and adds it to the batch (no
    /// replication session is open yet, so no status updates meanwhile).
    async fn push_plain(&mut self, record: Record) -> Result<(), PostgresError> {
        let weight = record.weight().min(self.budget.capacity());
        if self.budget.available() < weight {
            // Hand over what we hold so it can complete and free budget.
            self.flush().await?;
        }
        self.budget.acquire(weight).await;
        self.enqueue(record).await
    }

    /// Numbers a record that holds its budget and adds it to the batch.
    async fn enqueue(&mut self, mut record: Record) -> Result<(), PostgresError> {
        record.seq = self.next_seq;
        self.next_seq += 1;
        self.batch.push(record);
        if self.batch.len() >= self.batch.capacity() {
            self.flush().await?;
        }
        Ok(())
    }

    /// Hands over what is batched, closes the output and waits up to
    /// `drain_timeout` for the sink to finish it.
    async fn drain(&mut self, drain_timeout: Duration) -> Stopped {
        if self.flush().await.is_err() {
            return Stopped::TimedOut;
        }
        self.out = None;
        let deadline = tokio::time::Instant::now() + drain_timeout;
        while !self.tracker.is_drained() {
            if tokio::time::Instant::now() >= deadline {
                return Stopped::TimedOut;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Stopped::Drained
    }

    async fn flush(&mut self) -> Result<(), PostgresError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let capacity = self.batch.capacity();
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(capacity));
        self.tracker.issued(self.next_seq);
        let out = self.out.as_ref().ok_or(PostgresError::PipelineClosed)?;
        out.send(batch)
            .await
            .map_err(|_| PostgresError::PipelineClosed)
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

//! The initial snapshot: the rows the captured tables held when the slot
//! was created, read at exactly the slot's consistent point.
//!
//! First stage of the dataflow, before streaming. The slot is created on a
//! replication connection that exports a snapshot ([`prepare`]);
//! `source.snapshot_parallelism` reader connections import it (`SET
//! TRANSACTION SNAPSHOT`, REPEATABLE READ, read only: no lock beyond what a
//! plain read takes; see `snapshot_readers`) and only then is the
//! exporting connection closed. Each captured table ([`TableShape`]) is
//! one unit of work, or, when large, several key ranges of its key's first
//! column ([`TableShape::split`]), each read in primary-key chunks
//! ([`TableReader`]: `WHERE (key) > (last) AND first >= from AND first <
//! to ORDER BY key LIMIT n`; a table without a key through a cursor, in
//! one pass); rows arrive as lines of `COPY` text, and each is cut into
//! its text values, which the stream's decoder renders as it renders an
//! Insert's tuple ([`RowRenderer`]), into an `op = "snapshot"` envelope,
//! so snapshot and stream JSON are the same for every type.
//! Every range has its own `major` below the consistent point (the first
//! `consistent point - 1`, the next one less, ...) and its rows take
//! positions `{major}:{ordinal}`, ordinals counted within the range: they
//! sort before every change the stream sends (those commit after the
//! consistent point), and a chunk read again after a restart gets the
//! positions the first run gave it, whatever order ranges were read in.
//!
//! A marker file in `[state] dir` says a snapshot is under way. It is
//! written before the slot is created, then holds the snapshot's progress
//! (the consistent point, the planned ranges and each one's last
//! acknowledged key: see `tributary_envelope::snapshot_progress`), and is
//! removed only after Kinesis acknowledged every snapshot row. A start that finds it with
//! progress, and the slot still at that consistent point, resumes: the
//! exported snapshot is gone, so the rest of the stored plan is read in a
//! new REPEATABLE READ transaction (later than the consistent point,
//! exported by the first reader to the others) and the stream then starts
//! at the consistent point; the stream's changes after it bring every key
//! read later to its latest state. A marker without progress (a crash
//! before the slot existed) drops the slot and takes the snapshot again.

use std::path::{Path, PathBuf};

use std::pin::Pin;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio_postgres::{Client, CopyOutStream};
use tracing::{info, warn};

use crate::config::PostgresSourceConfig;
use crate::error::PostgresError;
use crate::pgoutput::{Relation, RelationColumn, TextSpan};
use crate::setup::quote_ident;
use crate::wire::ReplicationConnection;
use tributary_envelope::snapshot_progress::{SnapshotProgress, TableProgress};

/// Rows a chunk reads when no `source.snapshot_chunk_rows` applies
/// (`tributary verify`).
pub const CHUNK_ROWS: usize = 2_000;

/// A snapshot to read: of a slot just created with an exported snapshot,
/// or (`snapshot = "only"`) of a plain transaction with no slot.
pub struct PendingSnapshot {
    /// Keeps the snapshot importable; closed once the reader imported it.
    /// `None` for a plain transaction.
    pub export: Option<ReplicationConnection>,
    /// The exported snapshot's name (`None`: a plain transaction).
    pub name: Option<String>,
    /// The slot's consistent point (streaming starts here); for a plain
    /// transaction, read when it starts.
    pub consistent_point: u64,
    /// The marker file to remove once every row is acknowledged; it holds
    /// the snapshot's progress.
    pub marker: Option<PathBuf>,
    /// What an interrupted snapshot of the same slot already delivered:
    /// the tables (and keys) to skip. `None`: a new snapshot.
    pub resume: Option<SnapshotProgress>,
}

impl std::fmt::Debug for PendingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSnapshot")
            .field("name", &self.name)
            .field("consistent_point", &self.consistent_point)
            .field("resume", &self.resume.is_some())
            .finish_non_exhaustive()
    }
}

/// The marker of an unfinished snapshot of `slot`.
pub fn marker_path(state_dir: &Path, slot: &str) -> PathBuf {
    state_dir.join(format!("postgres-snapshot-{slot}.pending"))
}

/// Decides whether a snapshot is due and, if so, creates the slot with an
/// exported snapshot (dropping a slot an unfinished snapshot left). Call
/// after the publication exists and before anything else creates the slot.
pub async fn prepare(
    cfg: &PostgresSourceConfig,
    side: &Client,
    options: &str,
) -> Result<Option<PendingSnapshot>, PostgresError> {
    let marker = marker_path(&cfg.state_dir, &cfg.slot);
    let unfinished = marker.exists();
    let slot_exists = side
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(PostgresError::query("reading pg_replication_slots"))?
        .is_some();
    if slot_exists && !unfinished {
        return Ok(None);
    }
    if cfg.snapshot_only {
        return Ok(Some(plain()));
    }
    if !cfg.snapshot && !unfinished {
        return Ok(None);
    }
    if slot_exists {
        if let Some(progress) = resumable(side, &cfg.slot, &marker).await? {
            info!(slot = %cfg.slot, consistent_point = %progress.start,
                  tables_done = progress.tables.values().filter(|t| **t == TableProgress::Done).count(),
                  "an earlier snapshot did not finish: resuming it after its last acknowledged chunks");
            return Ok(Some(PendingSnapshot {
                export: None,
                name: None,
                consistent_point: crate::lsn::Lsn::parse(&progress.start).map_or(0, |l| l.0),
                marker: Some(marker),
                resume: Some(progress),
            }));
        }
        warn!(
            slot = %cfg.slot,
            "an earlier snapshot did not finish and cannot be resumed: dropping the slot and taking the snapshot again"
        );
        side.execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
            .await
            .map_err(PostgresError::query(format!(
                "dropping slot {} to take the snapshot again (is another connector using it?)",
                cfg.slot
            )))?;
    }
    write_marker(&marker)?;
    let mut export = ReplicationConnection::open(
        &cfg.connection,
        options,
        &format!("tributary-{}-snapshot", cfg.name),
    )
    .await
    .map_err(|e| PostgresError::Connection {
        context: "opening the connection that creates the slot".into(),
        source: Box::new(e),
    })?;
    let (consistent_point, name) = export.create_slot_exporting(&cfg.slot).await.map_err(|e| {
        PostgresError::Setup(format!(
            "creating replication slot {} with an exported snapshot (the user needs the \
                 REPLICATION attribute: ALTER ROLE <user> REPLICATION): {e}",
            cfg.slot
        ))
    })?;
    info!(slot = %cfg.slot, consistent_point = %crate::lsn::Lsn(consistent_point), "created logical replication slot with a snapshot");
    // From here on an interrupted snapshot can be resumed: the slot keeps
    // every change after the consistent point.
    let progress = SnapshotProgress::new(
        crate::lsn::Lsn(consistent_point).to_string(),
        consistent_point.saturating_sub(1),
    );
    progress
        .save(&marker)
        .map_err(|e| PostgresError::Setup(format!("cannot write {}: {e}", marker.display())))?;
    Ok(Some(PendingSnapshot {
        export: Some(export),
        name: Some(name),
        consistent_point,
        marker: Some(marker),
        resume: None,
    }))
}

/// The progress of the unfinished snapshot in `marker`, when it can be
/// resumed: it names the consistent point and the slot still starts there
/// (nothing was acknowledged from it: streaming never began).
async fn resumable(
    side: &Client,
    slot: &str,
    marker: &Path,
) -> Result<Option<SnapshotProgress>, PostgresError> {
    let progress = SnapshotProgress::load(marker)
        .map_err(|e| PostgresError::Setup(format!("cannot read {}: {e}", marker.display())))?
        .flatten();
    let Some(progress) = progress else {
        return Ok(None);
    };
    let row = side
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '') FROM pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PostgresError::query(
            "reading the slot's confirmed_flush_lsn",
        ))?;
    let confirmed = crate::lsn::Lsn::parse(&row.get::<_, String>(0));
    let start = crate::lsn::Lsn::parse(&progress.start);
    Ok((confirmed.is_some() && confirmed.map(|l| l.0) == start.map(|l| l.0)).then_some(progress))
}

fn write_marker(marker: &Path) -> Result<(), PostgresError> {
    let dir = marker.parent().unwrap_or(Path::new("."));
    let io =
        |e: std::io::Error| PostgresError::Setup(format!("cannot write {}: {e}", marker.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(marker, b"a snapshot is under way\n").map_err(io)?;
    std::fs::File::open(marker)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

/// Removes the marker, durably: the snapshot is complete.
pub fn remove_marker(marker: &Path) -> Result<(), PostgresError> {
    let io = |e: std::io::Error| {
        PostgresError::Setup(format!("cannot remove {}: {e}", marker.display()))
    };
    std::fs::remove_file(marker).map_err(io)?;
    let dir = marker.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io)
}

/// Opens the reader: a REPEATABLE READ, read-only transaction on the
/// exported snapshot (or, without one, on its own), with the session
/// settings the stream uses (so every value has the same text form).
/// Returns the WAL position the transaction's snapshot was taken at when it
/// has no exported one.
pub async fn begin(reader: &Client, snapshot: Option<&str>) -> Result<Option<u64>, PostgresError> {
    let import = match snapshot {
        Some(name) => format!("SET TRANSACTION SNAPSHOT '{}'", name.replace('\'', "''")),
        None => String::new(),
    };
    let sql = format!(
        "SET DateStyle = ISO; SET IntervalStyle = iso_8601; SET TimeZone = UTC; \
         SET bytea_output = hex; SET lc_monetary = 'C'; SET extra_float_digits = 1; \
         SET standard_conforming_strings = on; \
         BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {import}"
    );
    reader
        .batch_execute(&sql)
        .await
        .map_err(PostgresError::query("opening the snapshot transaction"))?;
    if snapshot.is_some() {
        return Ok(None);
    }
    // The transaction's first query takes its snapshot.
    let row = reader
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(PostgresError::query("reading the snapshot's WAL position"))?;
    Ok(row
        .get::<_, Option<String>>(0)
        .as_deref()
        .and_then(crate::lsn::Lsn::parse)
        .map(|lsn| lsn.0))
}

/// The snapshot of `snapshot = "only"`: a plain transaction, no slot, no
/// marker (an interrupted copy is simply run again).
pub fn plain() -> PendingSnapshot {
    PendingSnapshot {
        export: None,
        name: None,
        consistent_point: 0,
        marker: None,
        resume: None,
    }
}

/// The `pg_attribute a` rows of the columns the stream carries, in a
/// WHERE clause: not dropped, and not generated (pgoutput leaves those out
/// before PostgreSQL 18). Every catalogue query that must line up with
/// [`relation`]'s columns filters with it.
pub(crate) const STREAMED_COLUMNS: &str =
    "a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''";

/// The shape of `schema.table` as a Relation message would give it: the
/// [`STREAMED_COLUMNS`], in column order.
pub async fn relation(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Relation, PostgresError> {
    let context = format!("reading the columns of {schema}.{table}");
    let head = client
        .query_one(
            "SELECT c.oid, c.relreplident::text FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await
        .map_err(PostgresError::query(context.clone()))?;
    let oid: u32 = head.get(0);
    let identity: String = head.get(1);
    let rows = client
        .query(
            &format!(
                "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                        CASE $2::text \
                          WHEN 'f' THEN true \
                          WHEN 'd' THEN coalesce(a.attnum = ANY(p.indkey), false) \
                          WHEN 'i' THEN coalesce(a.attnum = ANY(r.indkey), false) \
                          ELSE false END \
                 FROM pg_attribute a \
                 LEFT JOIN pg_index p ON p.indrelid = a.attrelid AND p.indisprimary \
                 LEFT JOIN pg_index r ON r.indrelid = a.attrelid AND r.indisreplident \
                 WHERE a.attrelid = $1 AND {STREAMED_COLUMNS} \
                 ORDER BY a.attnum"
            ),
            &[&oid, &identity],
        )
        .await
        .map_err(PostgresError::query(context))?;
    let columns = rows
        .iter()
        .map(|r| RelationColumn {
            name: r.get(0),
            type_oid: r.get(1),
            type_modifier: r.get(2),
            is_identity: r.get(3),
        })
        .collect();
    Ok(Relation {
        id: oid,
        schema: schema.to_owned(),
        table: table.to_owned(),
        replica_identity: identity.bytes().next().unwrap_or(b'd'),
        columns,
    })
}

/// A column of a table's primary key, for keyset chunks.
#[derive(Clone, Debug)]
struct KeyColumn {
    /// Its index among the table's columns (as `SELECT *` returns them).
    index: usize,
    /// Its name.
    name: String,
    /// Its name, quoted.
    quoted: String,
    /// Its type as SQL (`format_type`), for the literal of the last key.
    sql_type: String,
}

/// What reading a table needs to know of it: its relation id, its
/// `SELECT`, its primary key. Shared by the readers of its key ranges.
#[derive(Clone, Debug)]
pub struct TableShape {
    relation: u32,
    /// `"schema"."table"`.
    from: String,
    select: String,
    key: Vec<KeyColumn>,
}

/// A range of a table's key: the values of the key's first column from
/// `from` (inclusive) to `to` (exclusive), as text; `None` is unbounded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    /// The lowest value in the range.
    pub from: Option<String>,
    /// The first value after the range.
    pub to: Option<String>,
}

impl TableShape {
    /// The table's relation id.
    pub fn relation(&self) -> u32 {
        self.relation
    }

    /// True when the table has a primary key (it can be read in ranges
    /// and resumed).
    pub fn keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// A reader of `range` (the whole table for a table without a key),
    /// from after the key `after`, `chunk_rows` rows a chunk.
    pub fn reader(
        &self,
        range: KeyRange,
        after: Option<Vec<String>>,
        chunk_rows: usize,
    ) -> TableReader {
        let keyed = self.keyed();
        TableReader {
            relation: self.relation,
            select: self.select.clone(),
            key: self.key.clone(),
            range: if keyed { range } else { KeyRange::default() },
            after: if keyed { after } else { None },
            chunk_rows: chunk_rows.max(1),
            whole: None,
            whole_read: false,
        }
    }

    /// Splits the table into at most `parts` ranges of its key's first
    /// column, as the snapshot `reader` sees it: at the quantiles of the
    /// column's statistics (`pg_stats.histogram_bounds`, present once the
    /// table was analysed: ranges of about equal rows, whatever the type);
    /// without them, for an integer column, evenly between its lowest and
    /// highest value. One unbounded range when the table has no key,
    /// `parts` is 1, or neither gives bounds. The
    /// first range has no lower bound and the last no upper one.
    pub async fn split(
        &self,
        reader: &Client,
        parts: usize,
    ) -> Result<Vec<KeyRange>, PostgresError> {
        let Some(first) = self.key.first() else {
            return Ok(vec![KeyRange::default()]);
        };
        if parts < 2 {
            return Ok(vec![KeyRange::default()]);
        }
        let context = || PostgresError::query("reading the bounds of a table's key");
        let rows = reader
            .query(
                "SELECT unnest(s.histogram_bounds::text::text[]) FROM pg_stats s \
                 JOIN pg_class c ON c.relname = s.tablename \
                 JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname \
                 WHERE c.oid = $1 AND s.attname = $2 AND NOT s.inherited",
                &[&self.relation, &first.name],
            )
            .await
            .map_err(context())?;
        let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        let mut bounds = quantile_bounds(&values, parts);
        if bounds.is_empty() && matches!(first.sql_type.as_str(), "smallint" | "integer" | "bigint")
        {
            let row = reader
                .query_one(
                    &format!(
                        "SELECT min({0})::bigint, max({0})::bigint FROM {1}",
                        first.quoted, self.from
                    ),
                    &[],
                )
                .await
                .map_err(context())?;
            if let (Some(low), Some(high)) =
                (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
            {
                bounds = even_bounds(low, high, parts);
            }
        }
        Ok(ranges_between(bounds))
    }
}

/// `parts - 1` distinct cut points that split `low..=high` evenly.
fn even_bounds(low: i64, high: i64, parts: usize) -> Vec<String> {
    let span = i128::from(high) - i128::from(low) + 1;
    let parts = i128::try_from(parts).unwrap_or(1).min(span);
    let mut cuts: Vec<String> = (1..parts)
        .map(|i| (i128::from(low) + span * i / parts).to_string())
        .collect();
    cuts.dedup();
    cuts
}

/// `parts - 1` cut points taken evenly from sorted statistics `values`.
fn quantile_bounds(values: &[String], parts: usize) -> Vec<String> {
    if values.len() < 3 {
        return Vec::new();
    }
    let mut cuts: Vec<String> = (1..parts)
        .filter_map(|i| values.get(i * (values.len() - 1) / parts).cloned())
        .collect();
    cuts.dedup();
    cuts
}

/// The ranges between sorted cut points: `(-inf, c1), [c1, c2), ..., [cn, inf)`.
fn ranges_between(cuts: Vec<String>) -> Vec<KeyRange> {
    let mut ranges = Vec::with_capacity(cuts.len() + 1);
    let mut from = None;
    for cut in cuts {
        ranges.push(KeyRange {
            from: from.take(),
            to: Some(cut.clone()),
        });
        from = Some(cut);
    }
    ranges.push(KeyRange { from, to: None });
    ranges
}

/// Reads one table, or one key range of it, in chunks, each a `COPY
/// (SELECT ...) TO STDOUT` in text format (the values as the type's output
/// function writes them, as a simple query would return them, without a
/// row description or a UTF-8 check per cell): by primary key (`WHERE
/// (key) > (last) ORDER BY key LIMIT n`), so a chunk can be resumed after
/// its last key; or, for a table without one, one `COPY` of the whole
/// table taken `n` rows at a time (it cannot be resumed: an interrupted
/// copy reads it again from its first row).
pub struct TableReader {
    relation: u32,
    select: String,
    key: Vec<KeyColumn>,
    range: KeyRange,
    after: Option<Vec<String>>,
    chunk_rows: usize,
    /// The open `COPY` of a table without a key.
    whole: Option<Pin<Box<CopyOutStream>>>,
    /// That `COPY` was read to its end.
    whole_read: bool,
}

impl std::fmt::Debug for TableReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableReader")
            .field("relation", &self.relation)
            .field("select", &self.select)
            .field("range", &self.range)
            .field("after", &self.after)
            .finish_non_exhaustive()
    }
}

/// Rows of one chunk, each one line of `COPY ... TO STDOUT` text format:
/// the values separated by tabs, `\N` for null, backslash escapes for
/// tab, newline, carriage return and backslash in values.
#[derive(Debug, Default)]
pub struct Chunk {
    rows: Vec<Bytes>,
}

impl Chunk {
    /// A chunk of these lines (what a benchmark renders).
    pub fn from_lines(rows: Vec<Bytes>) -> Self {
        Self { rows }
    }

    /// Rows in the chunk.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True at the end of the table.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.rows.iter().map(|row| &row[..])
    }
}

impl TableReader {
    /// The table's relation id.
    pub fn relation(&self) -> u32 {
        self.relation
    }

    /// True when the table is read by primary key (resumable).
    pub fn keyed(&self) -> bool {
        !self.key.is_empty()
    }

    /// The key of the last row read (or the key it resumed after), as text.
    pub fn last_key(&self) -> Option<&[String]> {
        self.after.as_deref()
    }

    /// Starts `COPY (chunk) TO STDOUT`.
    async fn copy(&self, reader: &Client) -> Result<CopyOutStream, PostgresError> {
        let select = self.chunk_sql();
        reader
            .copy_out(format!("COPY ({select}) TO STDOUT").as_str())
            .await
            .map_err(PostgresError::query(format!("reading {select}")))
    }

    fn chunk_sql(&self) -> String {
        if self.key.is_empty() {
            return self.select.clone();
        }
        let names: Vec<&str> = self.key.iter().map(|k| k.quoted.as_str()).collect();
        let names = names.join(", ");
        let mut filters = Vec::with_capacity(3);
        if let Some(values) = &self.after {
            let literals: Vec<String> = self
                .key
                .iter()
                .zip(values)
                .map(|(k, v)| format!("{}::{}", quote_literal(v), k.sql_type))
                .collect();
            filters.push(format!("({names}) > ({})", literals.join(", ")));
        }
        let first = &self.key[0];
        if let Some(from) = &self.range.from {
            filters.push(format!(
                "{} >= {}::{}",
                first.quoted,
                quote_literal(from),
                first.sql_type
            ));
        }
        if let Some(to) = &self.range.to {
            filters.push(format!(
                "{} < {}::{}",
                first.quoted,
                quote_literal(to),
                first.sql_type
            ));
        }
        let filter = if filters.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", filters.join(" AND "))
        };
        format!(
            "{}{filter} ORDER BY {names} LIMIT {}",
            self.select, self.chunk_rows
        )
    }

    /// Reads the next chunk's rows (empty at the end of the table) and
    /// remembers the key of its last row. The `COPY` of a table without a
    /// key starts at its first fetch, not before, so that `reader` can
    /// answer other queries until then (a query sent while a `COPY`
    /// streams waits behind rows nobody reads).
    pub async fn fetch(&mut self, reader: &Client) -> Result<Chunk, PostgresError> {
        let read = |e| PostgresError::query("reading a snapshot chunk")(e);
        let mut rows = Vec::with_capacity(self.chunk_rows.min(CHUNK_ROWS));
        if self.key.is_empty() {
            if self.whole.is_none() && !self.whole_read {
                self.whole = Some(Box::pin(self.copy(reader).await?));
            }
            if let Some(copy) = self.whole.as_mut() {
                while rows.len() < self.chunk_rows {
                    match copy.next().await {
                        Some(row) => rows.push(row.map_err(read)?),
                        None => {
                            self.whole = None;
                            self.whole_read = true;
                            break;
                        }
                    }
                }
            }
            return Ok(Chunk { rows });
        }
        let copy = self.copy(reader).await?;
        let mut copy = std::pin::pin!(copy);
        while let Some(row) = copy.next().await {
            rows.push(row.map_err(read)?);
        }
        if let Some(row) = rows.last() {
            let key = self
                .key
                .iter()
                .map(|k| copy_text::field(row, k.index).unwrap_or_default())
                .collect();
            self.after = Some(key);
        }
        Ok(Chunk { rows })
    }

    /// Reads the next chunk and renders every row into `out`; returns the
    /// rows read (0 at the end of the table).
    pub async fn next_chunk(
        &mut self,
        reader: &Client,
        decoder: &mut crate::decoder::Decoder,
        tx: &mut crate::decoder::Transaction,
        captured_at: &[u8; tributary_envelope::time::TIMESTAMP_LEN],
        out: &mut Vec<tributary_envelope::Record>,
    ) -> Result<usize, PostgresError> {
        let rows = self.fetch(reader).await?;
        render_chunk(self.relation, &rows, decoder, tx, captured_at, out)?;
        Ok(rows.len())
    }

    /// Ends the read: reads what is left of the `COPY` of a table without a
    /// key (an interrupted copy), so that `reader` is ready for a query.
    pub async fn close(mut self) -> Result<(), PostgresError> {
        if let Some(copy) = self.whole.as_mut() {
            while let Some(row) = copy.next().await {
                row.map_err(PostgresError::query("ending the snapshot copy"))?;
            }
        }
        Ok(())
    }
}

/// Renders the rows of one table, lines of `COPY` text (see [`Chunk`]), as
/// the stream's decoder does, into `op = "snapshot"` records.
pub struct RowRenderer {
    relation: u32,
    /// The table's column count (an empty line is a row of no columns or
    /// of one empty text).
    columns: usize,
    /// Where the row's values are: in the line, or in `unescaped`.
    spans: Vec<TextSpan>,
    /// The values of a row that holds escapes, unescaped.
    unescaped: Vec<u8>,
}

impl RowRenderer {
    /// A renderer of the table `relation`, which `decoder` must know.
    pub fn new(relation: u32, decoder: &crate::decoder::Decoder) -> Result<Self, PostgresError> {
        let columns = decoder
            .column_count(relation)
            .ok_or(crate::decoder::DecodeError::UnknownRelation(relation))?;
        Ok(Self {
            relation,
            columns,
            spans: Vec::with_capacity(columns),
            unescaped: Vec::new(),
        })
    }

    /// Renders `row` into `out` at `tx`'s next position.
    pub fn render(
        &mut self,
        row: &[u8],
        decoder: &mut crate::decoder::Decoder,
        tx: &mut crate::decoder::Transaction,
        captured_at: &[u8; tributary_envelope::time::TIMESTAMP_LEN],
        out: &mut Vec<tributary_envelope::Record>,
    ) -> Result<(), PostgresError> {
        let values = copy_text::split(row, self.columns, &mut self.spans, &mut self.unescaped);
        let msg = crate::pgoutput::Message::Insert {
            relation: self.relation,
            new: crate::pgoutput::Tuple::from_spans(values, &self.spans),
        };
        decoder.snapshot_row(&msg, tx, captured_at, out)?;
        Ok(())
    }
}

/// Renders every row of `rows` (of the table `relation`) into `out`, as
/// [`RowRenderer::render`] does one, at `tx`'s next positions.
pub fn render_chunk(
    relation: u32,
    rows: &Chunk,
    decoder: &mut crate::decoder::Decoder,
    tx: &mut crate::decoder::Transaction,
    captured_at: &[u8; tributary_envelope::time::TIMESTAMP_LEN],
    out: &mut Vec<tributary_envelope::Record>,
) -> Result<(), PostgresError> {
    let mut renderer = RowRenderer::new(relation, decoder)?;
    for row in rows.iter() {
        renderer.render(row, decoder, tx, captured_at, out)?;
    }
    Ok(())
}

/// A text value as an SQL string literal (`standard_conforming_strings`
/// is on: see [`begin`]).
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Rows of `COPY ... TO STDOUT` in text format (see the PostgreSQL manual,
/// COPY, "Text Format").
mod copy_text {
    use super::TextSpan;

    /// Cuts the row `line` of a table of `columns` columns into its values:
    /// `spans` gets one per value (`None`: null) into the bytes returned,
    /// `line` itself or, when the line holds escapes, `unescaped`. (A row
    /// of a table without columns is an empty line, as is a row whose one
    /// column is the empty text: `columns` tells them apart.)
    pub fn split<'a>(
        line: &'a [u8],
        columns: usize,
        spans: &mut Vec<TextSpan>,
        unescaped: &'a mut Vec<u8>,
    ) -> &'a [u8] {
        spans.clear();
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if columns == 0 && line.is_empty() {
            return line;
        }
        // Most lines hold no escape at all: their values are cut from the
        // line where they are.
        if plain_spans(line, spans) {
            return line;
        }
        spans.clear();
        unescaped.clear();
        for value in tab_separated(line).map(|range| &line[range]) {
            if value == b"\\N" {
                spans.push(None);
                continue;
            }
            let start = unescaped.len();
            unescape(value, unescaped);
            spans.push(Some(start..unescaped.len()));
        }
        unescaped
    }

    /// Pushes the span of each tab-separated value of `line` into `spans`
    /// and says true, or says false as soon as it meets a backslash (the
    /// line holds an escape or a null). One pass, eight bytes at a time:
    /// lines are short and hold a tab every few bytes, where a search per
    /// tab costs more than the bytes it skips.
    fn plain_spans(line: &[u8], spans: &mut Vec<TextSpan>) -> bool {
        const TABS: u64 = u64::from_ne_bytes([b'\t'; 8]);
        const BACKSLASHES: u64 = u64::from_ne_bytes([b'\\'; 8]);
        let mut start = 0;
        let mut cut = |word: u64, base: usize| {
            if zero_bytes(word ^ BACKSLASHES) != 0 {
                return false;
            }
            let mut tabs = zero_bytes(word ^ TABS);
            while tabs != 0 {
                let at = base + (tabs.trailing_zeros() / 8) as usize;
                spans.push(Some(start..at));
                start = at + 1;
                tabs &= tabs - 1;
            }
            true
        };
        let words = line.chunks_exact(8);
        let rest = words.remainder();
        for (i, word) in words.enumerate() {
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if !cut(word, i * 8) {
                return false;
            }
        }
        let mut last = [0u8; 8]; // zeros match neither byte
        last[..rest.len()].copy_from_slice(rest);
        if !cut(u64::from_le_bytes(last), line.len() - rest.len()) {
            return false;
        }
        spans.push(Some(start..line.len()));
        true
    }

    /// The high bit of each byte of `word` that is zero, and no other bit
    /// (exact: no borrow runs from one byte into the next).
    fn zero_bytes(word: u64) -> u64 {
        const LOW7: u64 = u64::from_ne_bytes([0x7f; 8]);
        !(((word & LOW7).wrapping_add(LOW7)) | word | LOW7)
    }

    /// The value of column `index` of `line` as text (`None`: null).
    pub fn field(line: &[u8], index: usize) -> Option<String> {
        let value = fields(line).nth(index)?;
        if value == b"\\N" {
            return None;
        }
        let mut text = Vec::with_capacity(value.len());
        unescape(value, &mut text);
        Some(String::from_utf8_lossy(&text).into_owned())
    }

    /// The line's values, still escaped (a tab in a value is `\t`).
    fn fields(line: &[u8]) -> impl Iterator<Item = &[u8]> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        tab_separated(line).map(move |range| &line[range])
    }

    /// Where the tab-separated parts of `line` are (its newline already
    /// removed).
    fn tab_separated(line: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let mut starts = std::iter::once(0).chain(memchr::memchr_iter(b'\t', line).map(|t| t + 1));
        let mut start = starts.next();
        std::iter::from_fn(move || {
            let from = start?;
            start = starts.next();
            let to = start.map_or(line.len(), |next| next - 1);
            Some(from..to)
        })
    }

    /// Appends `value` with its backslash escapes undone.
    fn unescape(value: &[u8], out: &mut Vec<u8>) {
        let mut rest = value;
        while let Some(at) = memchr::memchr(b'\\', rest) {
            out.extend_from_slice(&rest[..at]);
            let Some(&code) = rest.get(at + 1) else {
                rest = &[];
                break;
            };
            rest = &rest[at + 2..];
            let byte = match code {
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 11,
                b'0'..=b'7' => {
                    let digits = rest
                        .iter()
                        .take(2)
                        .take_while(|d| (b'0'..=b'7').contains(d));
                    let n = digits.count();
                    let octal = std::iter::once(&code).chain(&rest[..n]);
                    rest = &rest[n..];
                    octal.fold(0u8, |v, d| v.wrapping_mul(8).wrapping_add(d - b'0'))
                }
                b'x' if rest.first().is_some_and(u8::is_ascii_hexdigit) => {
                    let n = rest
                        .iter()
                        .take(2)
                        .take_while(|d| d.is_ascii_hexdigit())
                        .count();
                    let hex = std::str::from_utf8(&rest[..n]).unwrap_or("0");
                    rest = &rest[n..];
                    u8::from_str_radix(hex, 16).unwrap_or(0)
                }
                other => other,
            };
            out.push(byte);
        }
        out.extend_from_slice(rest);
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn escapes_are_undone_and_null_is_not_the_text_backslash_n() {
            let mut out = Vec::new();
            unescape(br"a\tb\\c\nd\re\bf\vg\fh\101\x42\q", &mut out);
            assert_eq!(out, b"a\tb\\c\nd\re\x08f\x0bg\x0chAB\x71".to_vec());
            let line = b"1\t\\N\t\\\\N\tit's\\ta tab\t\n";
            assert_eq!(field(line, 0).as_deref(), Some("1"));
            assert_eq!(field(line, 1), None, "\\N is null");
            assert_eq!(
                field(line, 2).as_deref(),
                Some("\\N"),
                "an escaped backslash then N is text"
            );
            assert_eq!(field(line, 3).as_deref(), Some("it's\ta tab"));
            assert_eq!(
                field(line, 4).as_deref(),
                Some(""),
                "the last value is empty"
            );
            assert_eq!(field(line, 5), None, "past the last column");
        }

        /// The values `split` and `Tuple::from_spans` make of `line`.
        fn values(line: &[u8], columns: usize) -> Vec<Option<Vec<u8>>> {
            let (mut spans, mut unescaped) = (Vec::new(), Vec::new());
            let bytes = split(line, columns, &mut spans, &mut unescaped);
            crate::pgoutput::Tuple::from_spans(bytes, &spans)
                .iter()
                .map(|cell| match cell {
                    crate::pgoutput::Cell::Text(text) => Some(text.to_vec()),
                    crate::pgoutput::Cell::Null => None,
                    other => panic!("a text or null cell: {other:?}"),
                })
                .collect()
        }

        fn text(value: &str) -> Option<Vec<u8>> {
            Some(value.as_bytes().to_vec())
        }

        #[test]
        fn word_at_a_time_spans_are_the_tab_separated_values() {
            // Every line of up to 20 bytes of tabs, backslashes and others
            // (and 0x89, 0x09 with its high bit): the fast path cuts what a
            // plain split cuts, or leaves escapes to the slow one.
            let alphabet = [b'\t', b'\\', b'a', 0x89, 0x00, 0xdc];
            let mut spans = Vec::new();
            for len in 0..20usize {
                for seed in 0..600u64 {
                    let line: Vec<u8> = (0..len)
                        .map(|i| {
                            let mix = seed
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add((i as u64).wrapping_mul(1442695040888963407));
                            alphabet[(mix >> 33) as usize % alphabet.len()]
                        })
                        .collect();
                    spans.clear();
                    let plain = plain_spans(&line, &mut spans);
                    assert_eq!(plain, !line.contains(&b'\\'), "{line:?}");
                    if plain {
                        let expected: Vec<TextSpan> = tab_separated(&line).map(Some).collect();
                        assert_eq!(spans, expected, "{line:?}");
                    }
                }
            }
        }

        #[test]
        fn an_empty_line_is_no_value_or_one_empty_value_by_the_column_count() {
            assert_eq!(values(b"\n", 0), []);
            assert_eq!(values(b"\n", 1), [text("")]);
            assert_eq!(
                values(b"5\n", 0),
                [text("5")],
                "a value for no column stays, for the decoder to refuse"
            );
        }

        #[test]
        fn a_line_becomes_the_values_of_its_row() {
            assert_eq!(
                values(b"42\t\\N\ttab\\there\n", 3),
                [text("42"), None, text("tab\there")]
            );
            assert_eq!(
                values(b"1\t\tx\n", 3),
                [text("1"), text(""), text("x")],
                "no escape: cut from the line"
            );
            assert_eq!(
                values(b"a\\\\\n\n", 1),
                [text("a\\\n")],
                "only the line's own newline is removed"
            );
            assert_eq!(
                values(b"\\\\N\t\\N\n", 2),
                [text("\\N"), None],
                "the text \\N is not null"
            );
        }
    }
}

/// The primary key of the table `oid`, in key order (empty: none).
async fn primary_key(reader: &Client, rel: &Relation) -> Result<Vec<KeyColumn>, PostgresError> {
    let rows = reader
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM pg_index i \
             CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
             WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.n",
            &[&rel.id],
        )
        .await
        .map_err(PostgresError::query(format!(
            "reading the primary key of {}.{}",
            rel.schema, rel.table
        )))?;
    let mut key = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.get(0);
        let Some(index) = rel.columns.iter().position(|c| c.name == name) else {
            return Ok(Vec::new());
        };
        key.push(KeyColumn {
            index,
            quoted: quote_ident(&name),
            name,
            sql_type: row.get(1),
        });
    }
    Ok(key)
}

/// The table's estimated row count from its statistics (all partitions
/// of a partitioned table; 0 when never analysed).
pub async fn estimated_rows(reader: &Client, relation: u32) -> Result<u64, PostgresError> {
    let row = reader
        .query_one(
            "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint FROM pg_class c \
             WHERE c.oid = $1 OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass))",
            &[&relation],
        )
        .await
        .map_err(PostgresError::query("reading the table's estimated rows"))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Makes `decoder` know `schema.table` as the stream would (its shape, key
/// and column kinds) and returns what its readers need.
pub async fn table_shape(
    reader: &Client,
    catalog: &mut crate::catalog::Catalog,
    decoder: &mut crate::decoder::Decoder,
    (schema, table): (&str, &str),
) -> Result<TableShape, PostgresError> {
    let rel = relation(reader, schema, table).await?;
    let facts = catalog.describe(reader, &rel).await?;
    let key = primary_key(reader, &rel).await?;
    decoder.relation(&rel, facts);
    let from = format!("{}.{}", quote_ident(schema), quote_ident(table));
    // The columns the stream carries, by name: not `*` (it would read
    // generated columns too).
    let columns: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
    Ok(TableShape {
        relation: rel.id,
        select: format!("SELECT {} FROM {from}", columns.join(", ")),
        from,
        key,
    })
}

/// Makes `decoder` know `schema.table` (see [`table_shape`]) and opens
/// its reader on `reader`: the whole table, by primary key from after
/// `after` (or from its first row), `chunk_rows` rows a chunk.
pub async fn open_table(
    reader: &Client,
    catalog: &mut crate::catalog::Catalog,
    decoder: &mut crate::decoder::Decoder,
    table: (&str, &str),
    after: Option<Vec<String>>,
    chunk_rows: usize,
) -> Result<TableReader, PostgresError> {
    let shape = table_shape(reader, catalog, decoder, table).await?;
    Ok(shape.reader(KeyRange::default(), after, chunk_rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_the_key_after_the_last_one() {
        let mut reader = TableReader {
            relation: 1,
            select: "SELECT * FROM \"public\".\"t\"".into(),
            key: vec![
                KeyColumn {
                    index: 0,
                    name: "a".into(),
                    quoted: "\"a\"".into(),
                    sql_type: "integer".into(),
                },
                KeyColumn {
                    index: 2,
                    name: "b".into(),
                    quoted: "\"b\"".into(),
                    sql_type: "text".into(),
                },
            ],
            range: KeyRange::default(),
            after: None,
            chunk_rows: 500,
            whole: None,
            whole_read: false,
        };
        assert_eq!(
            reader.chunk_sql(),
            "SELECT * FROM \"public\".\"t\" ORDER BY \"a\", \"b\" LIMIT 500"
        );
        reader.after = Some(vec!["7".into(), "it's".into()]);
        assert_eq!(
            reader.chunk_sql(),
            "SELECT * FROM \"public\".\"t\" WHERE (\"a\", \"b\") > ('7'::integer, 'it''s'::text) \
             ORDER BY \"a\", \"b\" LIMIT 500"
        );
        reader.range = KeyRange {
            from: Some("100".into()),
            to: Some("200".into()),
        };
        assert_eq!(
            reader.chunk_sql(),
            "SELECT * FROM \"public\".\"t\" WHERE (\"a\", \"b\") > ('7'::integer, 'it''s'::text) \
             AND \"a\" >= '100'::integer AND \"a\" < '200'::integer ORDER BY \"a\", \"b\" LIMIT 500"
        );
        reader.key.clear();
        assert_eq!(
            reader.chunk_sql(),
            "SELECT * FROM \"public\".\"t\"",
            "a table without a key is read whole, in no order"
        );
    }

    #[test]
    fn ranges_cover_the_whole_key_without_overlap() {
        let cuts = even_bounds(1, 100, 4);
        assert_eq!(cuts, ["26", "51", "76"]);
        let ranges = ranges_between(cuts);
        assert_eq!(ranges.len(), 4);
        assert_eq!(ranges[0].from, None);
        assert_eq!(ranges[3].to, None);
        for pair in ranges.windows(2) {
            assert_eq!(
                pair[0].to, pair[1].from,
                "each range starts where the last ended"
            );
        }
        assert_eq!(
            even_bounds(5, 6, 4),
            ["6"],
            "no empty ranges in a short span"
        );
        assert_eq!(even_bounds(7, 7, 4), Vec::<String>::new());
        assert_eq!(
            even_bounds(i64::MIN, i64::MAX, 2),
            ["0"],
            "the whole bigint span does not overflow"
        );
        let stats: Vec<String> = ["a", "c", "e", "g", "i"].map(String::from).to_vec();
        assert_eq!(quantile_bounds(&stats, 2), ["e"]);
        assert_eq!(quantile_bounds(&stats[..2], 4), Vec::<String>::new());
        assert_eq!(ranges_between(Vec::new()), vec![KeyRange::default()]);
    }
}

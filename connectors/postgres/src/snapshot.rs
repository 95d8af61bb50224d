//! The initial snapshot: the rows the captured tables held when the slot
//! was created, read at exactly the slot's consistent point.
//!
//! First stage of the dataflow, before streaming. The slot is created on a
//! replication connection that exports a snapshot ([`prepare`]); a reader
//! connection imports it (`SET TRANSACTION SNAPSHOT`, REPEATABLE READ, read
//! only: no lock beyond what a plain read takes) and the exporting
//! connection is closed. Each captured table is read through a cursor in
//! chunks; every row becomes a pgoutput Insert message rendered by the same
//! decoder as the stream, as an `op = "snapshot"` envelope, so snapshot and
//! stream JSON are the same for every type. Snapshot rows take positions
//! `{consistent point - 1}:{ordinal}`: they sort before every change the
//! stream sends (those commit after the consistent point).
//!
//! A marker file in `[state] dir` says a snapshot is under way. It is
//! written before the slot is created and removed only after Kinesis
//! acknowledged every snapshot row; a start that finds it (a crash or stop
//! mid-snapshot) drops the slot and takes the snapshot again from a new
//! consistent point, so no row is ever missing (rows already sent come
//! again, with other ids: delivery is at-least-once).

use std::path::{Path, PathBuf};

use tokio_postgres::{Client, SimpleQueryMessage};
use tracing::{info, warn};

use crate::config::PostgresSourceConfig;
use crate::error::PostgresError;
use crate::pgoutput::{Relation, RelationColumn};
use crate::setup::quote_ident;
use crate::wire::ReplicationConnection;

/// Rows fetched from the cursor at a time.
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
    /// The marker file to remove once every row is acknowledged.
    pub marker: Option<PathBuf>,
}

impl std::fmt::Debug for PendingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSnapshot")
            .field("name", &self.name)
            .field("consistent_point", &self.consistent_point)
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
        warn!(
            slot = %cfg.slot,
            "an earlier snapshot did not finish: dropping the slot and taking the snapshot again"
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
    Ok(Some(PendingSnapshot {
        export: Some(export),
        name: Some(name),
        consistent_point,
        marker: Some(marker),
    }))
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
    }
}

/// The shape of `schema.table` as a Relation message would give it.
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
            "SELECT a.attname::text, a.atttypid, a.atttypmod, \
                    CASE $2::text \
                      WHEN 'f' THEN true \
                      WHEN 'd' THEN coalesce(a.attnum = ANY(p.indkey), false) \
                      WHEN 'i' THEN coalesce(a.attnum = ANY(r.indkey), false) \
                      ELSE false END \
             FROM pg_attribute a \
             LEFT JOIN pg_index p ON p.indrelid = a.attrelid AND p.indisprimary \
             LEFT JOIN pg_index r ON r.indrelid = a.attrelid AND r.indisreplident \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
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

/// Declares the cursor that reads `schema.table` (all its partitions for a
/// partitioned table).
pub async fn open_cursor(reader: &Client, schema: &str, table: &str) -> Result<(), PostgresError> {
    let sql = format!(
        "DECLARE tributary_snapshot NO SCROLL CURSOR FOR SELECT * FROM {}.{}",
        quote_ident(schema),
        quote_ident(table)
    );
    reader
        .batch_execute(&sql)
        .await
        .map_err(PostgresError::query(format!("reading {schema}.{table}")))
}

/// Closes the cursor of [`open_cursor`].
pub async fn close_cursor(reader: &Client) -> Result<(), PostgresError> {
    reader
        .batch_execute("CLOSE tributary_snapshot")
        .await
        .map_err(PostgresError::query("closing the snapshot cursor"))
}

/// The next chunk of rows from the cursor, each as the pgoutput Insert
/// message of `relation` it would be in the stream; empty at the end.
pub async fn fetch(reader: &Client, relation: u32) -> Result<Vec<Vec<u8>>, PostgresError> {
    let messages = reader
        .simple_query(&format!("FETCH {CHUNK_ROWS} FROM tributary_snapshot"))
        .await
        .map_err(PostgresError::query("reading a snapshot chunk"))?;
    let mut rows = Vec::with_capacity(CHUNK_ROWS);
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let mut bytes = Vec::with_capacity(64);
        bytes.push(b'I');
        bytes.extend_from_slice(&relation.to_be_bytes());
        bytes.push(b'N');
        let columns = u16::try_from(row.len()).unwrap_or(u16::MAX);
        bytes.extend_from_slice(&columns.to_be_bytes());
        for i in 0..usize::from(columns) {
            match row.get(i) {
                None => bytes.push(b'n'),
                Some(text) => {
                    bytes.push(b't');
                    let len = u32::try_from(text.len()).unwrap_or(u32::MAX);
                    bytes.extend_from_slice(&len.to_be_bytes());
                    bytes.extend_from_slice(text.as_bytes());
                }
            }
        }
        rows.push(bytes);
    }
    Ok(rows)
}

/// Makes `decoder` know `schema.table` as the stream would (its shape, key
/// and column kinds) and opens the cursor that reads it; returns the
/// table's relation id for [`next_chunk`].
pub async fn open_table(
    reader: &Client,
    catalog: &mut crate::catalog::Catalog,
    decoder: &mut crate::decoder::Decoder,
    schema: &str,
    table: &str,
) -> Result<u32, PostgresError> {
    let rel = relation(reader, schema, table).await?;
    let facts = catalog.describe(reader, &rel).await?;
    decoder.relation(&rel, facts);
    open_cursor(reader, schema, table).await?;
    Ok(rel.id)
}

/// Reads the next chunk of the open cursor and renders each row, as the
/// stream's decoder does, into `out` as an `op = "snapshot"` record;
/// returns the rows read (0 at the end of the table).
pub async fn next_chunk(
    reader: &Client,
    relation: u32,
    decoder: &mut crate::decoder::Decoder,
    tx: &mut crate::decoder::Transaction,
    captured_at: &[u8; tributary_envelope::time::TIMESTAMP_LEN],
    out: &mut Vec<tributary_envelope::Record>,
) -> Result<usize, PostgresError> {
    let chunk = fetch(reader, relation).await?;
    for bytes in &chunk {
        let msg = crate::pgoutput::parse(bytes)?;
        decoder.snapshot_row(&msg, tx, captured_at, out)?;
    }
    Ok(chunk.len())
}

//! The initial snapshot: the rows the captured tables held at one binlog
//! position, read before the binlog is streamed from that position.
//!
//! First stage of the MySQL dataflow, before streaming. A reader
//! connection takes `FLUSH TABLES WITH READ LOCK`, opens `START TRANSACTION
//! WITH CONSISTENT SNAPSHOT`, reads the binlog position (`SHOW MASTER
//! STATUS`, `@@gtid_binlog_pos`) and unlocks at once ([`begin`]): while the
//! lock is held no transaction can commit, so the transaction's view holds
//! exactly the commits before that position. The lock is held for a few
//! milliseconds (its duration is logged) but waits for running statements
//! to finish first, and blocks every write on the server while it waits.
//!
//! Each captured table is then read in primary-key chunks
//! ([`select_chunk`]; a table without a key with one `SELECT *`) through
//! the binary protocol, one row at a time off the socket (memory stays
//! bounded by the byte budget whatever the table's size); every value is
//! put in the shape the binlog gives it and rendered by the same code as
//! the stream, as an `op = "snapshot"` envelope, so both paths give the
//! same JSON. Snapshot rows take positions `{snapshot watermark -
//! 1}:{ordinal}`: they sort before every change the stream sends (those
//! commit after the position).
//!
//! A marker file in `[state] dir` says a snapshot is under way. It is
//! written before the snapshot starts, then holds its progress (the binlog
//! position, each table's last acknowledged key: see
//! `tributary_envelope::snapshot_progress`), and is removed only after
//! Kinesis acknowledged every snapshot row and the offset was written. A
//! start that finds it with progress resumes: the binlog must still hold
//! the position; the rest is read in a new consistent snapshot, without
//! the lock, and the binlog is then streamed from the stored position,
//! whose changes bring every key read later to its latest state. A marker
//! without progress takes the snapshot again from a new position.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::Value;
use mysql_async::prelude::Queryable as _;
use tracing::info;
use tributary_envelope::snapshot_progress::SnapshotProgress;

use tributary_envelope::Record;

use crate::decoder::{Decoder, Transaction};
use crate::error::MysqlError;
use crate::offsets::Offset;
use crate::schema::TableSchema;
use crate::setup;

/// A consistent read view and the binlog position it matches, not yet read.
pub struct PendingSnapshot {
    /// The reader, inside `START TRANSACTION WITH CONSISTENT SNAPSHOT`.
    pub reader: Conn,
    /// The binlog position of the view: streaming starts here.
    pub position: Offset,
    /// The marker file to remove once every row is acknowledged (none for
    /// `snapshot = "only"`).
    pub marker: Option<PathBuf>,
    /// How long `FLUSH TABLES WITH READ LOCK` was held.
    pub lock_held: Duration,
    /// What an interrupted snapshot already delivered (`None`: a new
    /// snapshot): the tables and keys to skip.
    pub resume: Option<SnapshotProgress>,
}

impl std::fmt::Debug for PendingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSnapshot")
            .field("position", &self.position)
            .field("lock_held", &self.lock_held)
            .field("resume", &self.resume.is_some())
            .finish_non_exhaustive()
    }
}

/// The marker of an unfinished snapshot of the source `name`.
pub fn marker_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(format!("mysql-snapshot-{name}.pending"))
}

fn marker_error(marker: &Path) -> impl Fn(std::io::Error) -> MysqlError + '_ {
    move |source| MysqlError::Offset {
        path: marker.display().to_string(),
        source,
    }
}

/// Writes the marker durably: a snapshot is under way.
pub fn write_marker(marker: &Path) -> Result<(), MysqlError> {
    let dir = marker.parent().unwrap_or(Path::new("."));
    let io = marker_error(marker);
    std::fs::create_dir_all(dir).map_err(&io)?;
    std::fs::write(marker, b"a snapshot is under way\n").map_err(&io)?;
    std::fs::File::open(marker)
        .and_then(|f| f.sync_all())
        .map_err(&io)?;
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(&io)
}

/// Removes the marker, durably: the snapshot is complete.
pub fn remove_marker(marker: &Path) -> Result<(), MysqlError> {
    let io = marker_error(marker);
    std::fs::remove_file(marker).map_err(&io)?;
    let dir = marker.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(&io)
}

/// Opens the reader, takes the consistent view and its binlog position
/// under a short global read lock. Without `marker` (`snapshot = "only"`:
/// no stream follows) no lock is taken and the position is approximate,
/// used only for the rows' positions. With `resume` (an interrupted
/// snapshot) no lock is taken either: the stream starts from the stored,
/// older position, so a view taken later converges (see the module doc).
pub async fn begin(
    opts: &crate::tls::ConnectOpts,
    marker: Option<PathBuf>,
    resume: Option<(Offset, SnapshotProgress)>,
) -> Result<PendingSnapshot, MysqlError> {
    let mut reader = opts
        .connect()
        .await
        .map_err(MysqlError::connection("opening the snapshot reader"))?;
    // UTC: TIMESTAMP values come back as UTC wall time; utf8mb4: every
    // text column comes back in one character set; a long write timeout:
    // the server waits while the budget holds the reader back.
    for statement in [
        "SET NAMES utf8mb4",
        "SET SESSION time_zone = '+00:00', SESSION net_write_timeout = 86400",
        "SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    ] {
        reader
            .query_drop(statement)
            .await
            .map_err(MysqlError::connection("preparing the snapshot reader"))?;
    }
    let lock = marker.is_some() && resume.is_none();
    let locked = Instant::now();
    if lock {
        reader
            .query_drop("FLUSH TABLES WITH READ LOCK")
            .await
            .map_err(|source| MysqlError::Server {
                context: "FLUSH TABLES WITH READ LOCK for the snapshot (the user needs the \
                          RELOAD privilege: GRANT RELOAD ON *.* TO <user>)"
                    .into(),
                source,
            })?;
    }
    reader
        .query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await
        .map_err(MysqlError::connection("starting the snapshot transaction"))?;
    let (position, resume) = match resume {
        Some((stored, progress)) => (stored, Some(progress)),
        None => (setup::current_position(&mut reader).await?, None),
    };
    if lock {
        reader
            .query_drop("UNLOCK TABLES")
            .await
            .map_err(MysqlError::connection(
                "unlocking after the snapshot position",
            ))?;
    }
    let lock_held = if lock {
        locked.elapsed()
    } else {
        Duration::ZERO
    };
    if resume.is_some() {
        info!(file = %position.file, pos = position.pos,
              "snapshot: resuming in a new consistent view (no lock); the stream starts at the stored position");
    } else if lock {
        info!(file = %position.file, pos = position.pos, gtid = position.gtid.as_deref().unwrap_or(""),
              lock_ms = lock_held.as_secs_f64() * 1000.0,
              "snapshot: consistent view taken; global read lock released");
    } else {
        info!(file = %position.file, pos = position.pos, "snapshot: consistent view taken (no lock)");
    }
    Ok(PendingSnapshot {
        reader,
        position,
        marker,
        lock_held,
        resume,
    })
}

/// The base tables of the server, `(db, table)`, sorted.
pub async fn base_tables(reader: &mut Conn) -> Result<Vec<(String, String)>, MysqlError> {
    reader
        .query(
            "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES \
             WHERE TABLE_TYPE = 'BASE TABLE' ORDER BY TABLE_SCHEMA, TABLE_NAME",
        )
        .await
        .map_err(MysqlError::connection("listing tables for the snapshot"))
}

/// `SELECT *` of `db.table`, the next `limit` rows after the key `after`
/// (with `key` the key columns' names, in key order), in key order. The
/// key comparison is spelled out (`k1 > ? OR (k1 = ? AND k2 > ?)`), which
/// both MySQL and MariaDB turn into an index range. Without a key, the
/// whole table. The returned values are the statement's parameters.
pub fn select_chunk(
    db: &str,
    table: &str,
    key: &[&str],
    after: Option<&[Value]>,
    limit: usize,
) -> (String, Vec<Value>) {
    let mut sql = format!("SELECT * FROM {}.{}", quote_ident(db), quote_ident(table));
    if key.is_empty() {
        return (sql, Vec::new());
    }
    let mut params = Vec::new();
    if let Some(after) = after {
        let mut terms = Vec::with_capacity(key.len());
        for last in 0..key.len() {
            let mut parts = Vec::with_capacity(last + 1);
            for (column, value) in key.iter().zip(after).take(last) {
                parts.push(format!("{} = ?", quote_ident(column)));
                params.push(value.clone());
            }
            parts.push(format!("{} > ?", quote_ident(key[last])));
            params.push(after.get(last).cloned().unwrap_or(Value::NULL));
            terms.push(format!("({})", parts.join(" AND ")));
        }
        sql.push_str(&format!(" WHERE {}", terms.join(" OR ")));
    }
    let order: Vec<String> = key.iter().map(|c| quote_ident(c)).collect();
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", order.join(", ")));
    (sql, params)
}

/// A key value as stored in the progress file: a kind letter and the
/// value, exact for every kind (floats by their bits).
pub fn encode_key(value: &Value) -> String {
    match value {
        Value::NULL => "n".into(),
        Value::Bytes(b) => {
            let mut out = String::with_capacity(1 + b.len() * 2);
            out.push('b');
            for byte in b {
                out.push_str(&format!("{byte:02x}"));
            }
            out
        }
        Value::Int(i) => format!("i{i}"),
        Value::UInt(u) => format!("u{u}"),
        Value::Float(f) => format!("f{}", f.to_bits()),
        Value::Double(d) => format!("d{}", d.to_bits()),
        Value::Date(y, mo, d, h, mi, s, us) => format!("D{y},{mo},{d},{h},{mi},{s},{us}"),
        Value::Time(neg, d, h, mi, s, us) => format!("T{},{d},{h},{mi},{s},{us}", u8::from(*neg)),
    }
}

/// Reads [`encode_key`]'s text back; `None` for anything else.
pub fn decode_key(text: &str) -> Option<Value> {
    let (kind, rest) = text.split_at_checked(1)?;
    let numbers = || -> Option<Vec<u32>> { rest.split(',').map(|n| n.parse().ok()).collect() };
    Some(match kind {
        "n" => Value::NULL,
        "b" => {
            let bytes = (0..rest.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(rest.get(i..i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?;
            Value::Bytes(bytes)
        }
        "i" => Value::Int(rest.parse().ok()?),
        "u" => Value::UInt(rest.parse().ok()?),
        "f" => Value::Float(f32::from_bits(rest.parse().ok()?)),
        "d" => Value::Double(f64::from_bits(rest.parse().ok()?)),
        "D" => match numbers()?.as_slice() {
            &[y, mo, d, h, mi, s, us] => Value::Date(
                u16::try_from(y).ok()?,
                u8::try_from(mo).ok()?,
                u8::try_from(d).ok()?,
                u8::try_from(h).ok()?,
                u8::try_from(mi).ok()?,
                u8::try_from(s).ok()?,
                us,
            ),
            _ => return None,
        },
        "T" => match numbers()?.as_slice() {
            &[neg, d, h, mi, s, us] => Value::Time(
                neg == 1,
                d,
                u8::try_from(h).ok()?,
                u8::try_from(mi).ok()?,
                u8::try_from(s).ok()?,
                us,
            ),
            _ => return None,
        },
        _ => return None,
    })
}

/// The table's estimated row count (`information_schema.TABLES.TABLE_ROWS`,
/// 0 when unknown).
pub async fn estimated_rows(reader: &mut Conn, db: &str, table: &str) -> Result<u64, MysqlError> {
    let rows: Option<Option<u64>> = reader
        .exec_first(
            "SELECT TABLE_ROWS FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
            (db, table),
        )
        .await
        .map_err(MysqlError::connection("reading the table's estimated rows"))?;
    Ok(rows.flatten().unwrap_or(0))
}

/// Checks that a snapshot result has the columns the catalog named
/// (`expected`: a DDL between the catalog read and the SELECT fails the
/// read, to be taken again) and returns the character set each column
/// comes in, as the decoder expects it: binary columns as binary, every
/// other one as utf8mb4 (the reader's `SET NAMES`).
pub fn result_charsets(
    columns: &[mysql_async::Column],
    name: &str,
    expected: &[String],
) -> Result<Vec<u16>, MysqlError> {
    let names: Vec<String> = columns.iter().map(|c| c.name_str().into_owned()).collect();
    if names != expected {
        return Err(MysqlError::Connection {
            context: format!(
                "{name} changed during the snapshot: columns {names:?}, catalog {expected:?}"
            ),
            source: mysql_async::Error::Other("table changed".into()),
        });
    }
    Ok(columns
        .iter()
        .map(|c| match c.character_set() {
            crate::types::BINARY_CHARSET => crate::types::BINARY_CHARSET,
            _ => crate::types::UTF8MB4_CHARSET,
        })
        .collect())
}

/// The key columns' values of a snapshot row (`key`: their indexes).
pub fn row_key(row: &mysql_async::Row, key: &[usize]) -> Vec<Value> {
    key.iter()
        .map(|&i| row.as_ref(i).cloned().unwrap_or(Value::NULL))
        .collect()
}

/// Reads every row of `db.table` in the consistent snapshot open on
/// `reader` (see [`begin`]), by primary key in chunks of `chunk_rows` (a
/// table without a key in one `SELECT *`), each rendered by `decoder` as
/// the `op = "snapshot"` record the snapshot sends (the table mapped as
/// `id`) and handed to `each`. For readers that keep nothing and send
/// nothing (`tributary verify`); the snapshot itself goes through the
/// emitter with its byte budget and chunk ledger.
pub async fn read_table(
    reader: &mut Conn,
    decoder: &mut Decoder,
    id: u64,
    (db, table): (&str, &str),
    chunk_rows: usize,
    mut each: impl FnMut(Record),
) -> Result<(), MysqlError> {
    let name = format!("{db}.{table}");
    let facts = crate::schema::read_table_facts(reader, db, table).await?;
    let schema = TableSchema::from_facts(db, table, &facts);
    let expected: Vec<String> = schema.columns.iter().map(|c| c.name.clone()).collect();
    let key = schema.key.clone();
    let key_names: Vec<&str> = key.iter().map(|&i| expected[i].as_str()).collect();
    decoder.table_map(id, schema);
    let mut tx = Transaction::begin("", 0, 0, None, 0);
    let captured_at = tributary_envelope::time::now();
    let mut decoded = Vec::with_capacity(1);
    let mut after: Option<Vec<Value>> = None;
    loop {
        let (sql, params) = select_chunk(db, table, &key_names, after.as_deref(), chunk_rows);
        let read_error = || MysqlError::connection(format!("reading {name}"));
        let mut result = reader.exec_iter(sql, params).await.map_err(read_error())?;
        let charsets = result_charsets(result.columns_ref(), &name, &expected)?;
        let mut rows = 0usize;
        while let Some(row) = result.next().await.map_err(read_error())? {
            if !key.is_empty() {
                after = Some(row_key(&row, &key));
            }
            decoder.snapshot_row(
                id,
                row.unwrap(),
                &charsets,
                &mut tx,
                &captured_at,
                &mut decoded,
            );
            decoded.drain(..).for_each(&mut each);
            rows += 1;
        }
        if key.is_empty() || rows < chunk_rows {
            return Ok(());
        }
    }
}

/// A backquoted identifier.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_the_key_after_the_last_one() {
        let (sql, params) = select_chunk("shop", "a`b", &[], None, 10);
        assert_eq!(sql, "SELECT * FROM `shop`.`a``b`");
        assert!(params.is_empty());
        let (sql, _) = select_chunk("shop", "t", &["id"], None, 10);
        assert_eq!(sql, "SELECT * FROM `shop`.`t` ORDER BY `id` LIMIT 10");
        let after = [Value::Int(7), Value::Bytes(b"x".to_vec())];
        let (sql, params) = select_chunk("shop", "t", &["a", "b"], Some(&after), 10);
        assert_eq!(
            sql,
            "SELECT * FROM `shop`.`t` WHERE (`a` > ?) OR (`a` = ? AND `b` > ?) \
             ORDER BY `a`, `b` LIMIT 10"
        );
        assert_eq!(
            params,
            vec![after[0].clone(), after[0].clone(), after[1].clone()]
        );
    }

    #[test]
    fn keys_round_trip_through_their_text() {
        for value in [
            Value::NULL,
            Value::Bytes(b"it's \x00\xff".to_vec()),
            Value::Int(-42),
            Value::UInt(u64::MAX),
            Value::Float(1.5),
            Value::Double(-0.1),
            Value::Date(2026, 12, 1, 2, 3, 4, 567_890),
            Value::Time(true, 3, 4, 5, 6, 7),
        ] {
            assert_eq!(decode_key(&encode_key(&value)), Some(value));
        }
        assert_eq!(decode_key("x1"), None);
        assert_eq!(decode_key("bzz"), None);
    }

    #[test]
    fn markers_are_written_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = marker_path(&dir.path().join("state"), "shop");
        write_marker(&marker).unwrap();
        assert!(marker.exists());
        remove_marker(&marker).unwrap();
        assert!(!marker.exists());
        assert!(
            remove_marker(&marker).is_err(),
            "a missing marker is an error"
        );
    }
}

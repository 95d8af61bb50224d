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
//! Each captured table is then read with `SELECT *` through the binary
//! protocol, one row at a time off the socket (memory stays bounded by the
//! byte budget whatever the table's size); every value is put in the shape
//! the binlog gives it and rendered by the same code as the stream, as an
//! `op = "snapshot"` envelope, so both paths give the same JSON. Snapshot
//! rows take positions `{snapshot watermark - 1}:{ordinal}`: they sort
//! before every change the stream sends (those commit after the position).
//!
//! A marker file in `[state] dir` says a snapshot is under way. It is
//! written before the snapshot starts and removed only after Kinesis
//! acknowledged every snapshot row and the offset was written; a start
//! that finds it (a crash or stop mid-snapshot) takes the snapshot again
//! from a new position, so no row is ever missing (rows already sent come
//! again, with other ids: delivery is at-least-once).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use tracing::info;

use crate::error::MysqlError;
use crate::offsets::Offset;
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
}

impl std::fmt::Debug for PendingSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSnapshot")
            .field("position", &self.position)
            .field("lock_held", &self.lock_held)
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
/// used only for the rows' positions.
pub async fn begin(
    opts: &crate::tls::ConnectOpts,
    marker: Option<PathBuf>,
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
    let lock = marker.is_some();
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
    let position = setup::current_position(&mut reader).await?;
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
    if lock {
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

/// `SELECT *` of `db.table`.
pub fn select_all(db: &str, table: &str) -> String {
    format!("SELECT * FROM {}.{}", quote_ident(db), quote_ident(table))
}

/// A backquoted identifier.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(select_all("shop", "a`b"), "SELECT * FROM `shop`.`a``b`");
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

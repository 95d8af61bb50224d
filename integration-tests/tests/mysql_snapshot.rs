//! `source.snapshot = "initial"` on a real MariaDB 10.11 and kinesalite:
//! the rows the tables held before the first start arrive as
//! `op = "snapshot"` envelopes, then the binlog is streamed from the
//! snapshot's position, and a consumer replaying the stream ends with
//! exactly the table.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tributary_integration_tests::snapshot_resume;
use tributary_integration_tests::{MysqlPipeline, StreamRecord, consumer};

const STREAM: &str = "snap-cdc";
const SNAPSHOT: &str = "[source]\nsnapshot = \"initial\"\n";
const SETTLE: Duration = Duration::from_secs(120);

const SETUP: &str = "
CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price INT);
INSERT INTO items (id, name, price)
  SELECT seq, CONCAT('item ', seq), seq * 3 FROM seq_1_to_5000;
CREATE TABLE notes (body VARCHAR(40));
INSERT INTO notes SELECT CONCAT('note ', seq) FROM seq_1_to_10;
";

async fn assert_replica_matches(
    pipeline: &MysqlPipeline,
    records: &[StreamRecord],
    table: &str,
    key: &[&str],
) -> Result<()> {
    let mut conn = pipeline.db.root().await?;
    consumer::assert_mysql_replica_matches(&mut conn, records, table, key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_arrive_as_snapshots_then_the_binlog_follows() -> Result<()> {
    let mut pipeline = MysqlPipeline::start(STREAM, 2, SETUP, SNAPSHOT).await?;
    let logs = pipeline.tributary.logs();
    let lock_ms = logs
        .lines()
        .filter(|l| l.contains("global read lock released"))
        .find_map(|l| serde_json::from_str::<Value>(l).ok()?["lock_ms"].as_f64());
    ensure!(lock_ms.is_some(), "the lock's duration is logged:\n{logs}");
    eprintln!("global read lock held {lock_ms:?} ms");
    pipeline
        .db
        .execute_each(&[
            "UPDATE items SET price = 0 WHERE id <= 100",
            "DELETE FROM items WHERE id > 4900",
            "INSERT INTO items VALUES (9001, 'new', 1)",
        ])
        .await?;
    let records = pipeline.settled(STREAM, SETTLE).await?;
    let envelopes: Vec<Value> = records.iter().map(|r| r.json()).collect::<Result<_>>()?;
    let snapshots: Vec<&Value> = envelopes.iter().filter(|e| e["op"] == "snapshot").collect();
    ensure!(
        snapshots.len() == 5010,
        "{} snapshot envelopes for 5,010 rows",
        snapshots.len()
    );
    for e in &snapshots {
        assert_eq!(e["source"]["snapshot"], true);
        assert_eq!(e["before"], Value::Null);
        assert_eq!(e["source"]["commit_ts"], Value::Null);
    }
    let latest_snapshot = snapshots
        .iter()
        .map(|e| e["source"]["position"].as_str().unwrap())
        .max()
        .unwrap();
    let changes: Vec<&Value> = envelopes.iter().filter(|e| e["op"] != "snapshot").collect();
    ensure!(changes.len() == 201, "{} changes, 201 made", changes.len());
    let earliest_change = changes
        .iter()
        .map(|e| e["source"]["position"].as_str().unwrap())
        .min()
        .unwrap();
    assert!(
        latest_snapshot < earliest_change,
        "snapshot rows sort before every change: {latest_snapshot} vs {earliest_change}"
    );
    let mut ids: Vec<&str> = snapshots
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5010, "snapshot ids are distinct");
    assert!(
        snapshots
            .iter()
            .any(|e| e["source"]["table"] == "notes" && e["key"].is_null()),
        "tables without a key are copied too"
    );
    assert_replica_matches(&pipeline, &records, "shop.items", &["id"]).await?;
    pipeline.stop_gracefully().await?;

    // A restart streams on from the stored offset: no second snapshot.
    pipeline.restart().await?;
    pipeline
        .db
        .execute("INSERT INTO items VALUES (9002, 'later', 2)")
        .await?;
    let again = pipeline.settled(STREAM, SETTLE).await?;
    assert_eq!(again.len(), records.len() + 1, "only the new change");
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// Inserts, updates and deletes rows of `shop.items` (keys 1 to `rows`)
/// until `done`; returns the rounds it ran.
fn spawn_writer(
    mut conn: mysql_async::Conn,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rows: u32,
) -> tokio::task::JoinHandle<Result<u32>> {
    use mysql_async::prelude::Queryable as _;
    tokio::spawn(async move {
        let mut n = 0u32;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            conn.query_drop(format!(
                "UPDATE shop.items SET price = price + 1, name = 'w{n}' WHERE id = {}; \
                 DELETE FROM shop.items WHERE id = {}; \
                 INSERT INTO shop.items VALUES ({}, 'new {n}', {n})",
                (n * 37) % rows + 1,
                (n * 53) % rows + 1,
                10 * rows + n
            ))
            .await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(n)
    })
}

/// 30,000 keyed rows (and a table without a key) copied in 500-row
/// chunks: a few seconds of snapshot to kill in the middle.
const LARGE: &str = "
CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price INT);
INSERT INTO items (id, name, price)
  SELECT seq, CONCAT('item ', seq), seq * 3 FROM seq_1_to_30000;
CREATE TABLE notes (body VARCHAR(40));
INSERT INTO notes SELECT CONCAT('note ', seq) FROM seq_1_to_10;
ANALYZE TABLE items;
";
const LARGE_ROWS: u64 = 30_010;

/// Starts the pipeline on the `LARGE` tables, in 500-row chunks with a
/// small in-flight budget, without waiting for the snapshot.
async fn start_large() -> Result<MysqlPipeline> {
    MysqlPipeline::start_without_waiting(
        STREAM,
        2,
        LARGE,
        "[source]\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 500\n\
         [sink]\nmax_in_flight_bytes = 1048576\n",
    )
    .await
}

/// The snapshot marker's path, once it records 3,000 acknowledged rows of
/// `items`, and the progress it holds then.
async fn marker_after_3000_items(
    pipeline: &MysqlPipeline,
) -> Result<(std::path::PathBuf, serde_json::Value)> {
    let marker = pipeline
        .config
        .state_dir
        .join("mysql-snapshot-shop.pending");
    let progress = snapshot_resume::wait_for_acknowledged_chunk(
        &marker,
        "shop.items",
        3_000,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| pipeline.tributary.logs())?;
    Ok((marker, progress))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_resumes_after_its_acknowledged_chunks_and_converges() -> Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut pipeline = start_large().await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(pipeline.db.root().await?, done.clone(), 30_000);
    let (marker, progress) = marker_after_3000_items(&pipeline).await?;
    pipeline.tributary.kill9().await?;
    ensure!(
        pipeline.stored_offset().is_none(),
        "no offset is written before the snapshot completes"
    );
    let before_kill = pipeline.kin.read_all(STREAM).await?.len();
    eprintln!("killed with {before_kill} snapshot rows out; stored progress {progress}");

    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let logs = pipeline.tributary.logs();
    ensure!(
        !logs.contains("global read lock released"),
        "a resumed snapshot takes no lock:\n{logs}"
    );
    snapshot_resume::assert_resumed(&logs, LARGE_ROWS)?;
    done.store(true, Ordering::Relaxed);
    let rounds = writer.await??;
    ensure!(
        rounds > 10,
        "the writer ran during the snapshot ({rounds} rounds)"
    );
    let records = pipeline
        .settled(STREAM, SETTLE)
        .await
        .context("after the restart")?;
    eprintln!("{rounds} write rounds; {} records in all", records.len());
    assert_replica_matches(&pipeline, &records, "shop.items", &["id"]).await?;
    assert!(!marker.exists(), "the marker is removed once complete");
    pipeline.stop_gracefully().await?;
    Ok(())
}

const EVERY_TYPE: &str = r#"
CREATE TABLE everything (
    id BIGINT UNSIGNED PRIMARY KEY,
    ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
    mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT,
    dec1 DECIMAL(30,10), dec2 DECIMAL(5,2), fl FLOAT, db DOUBLE,
    d DATE, dt DATETIME(6), dt0 DATETIME, ts TIMESTAMP(3) NULL, ts0 TIMESTAMP NULL,
    tm TIME(6), tm0 TIME, yr YEAR, yr0 YEAR,
    vc VARCHAR(20), ch CHAR(5), txt TEXT, lat VARCHAR(10) CHARACTER SET latin1,
    bin BINARY(4), vb VARBINARY(8), bl BLOB,
    en ENUM('small','medium','large'), en0 ENUM('x','y'), st SET('a','b','c'), st0 SET('a','b'),
    bt BIT(12), b1 BIT(1), js JSON, geo GEOMETRY, nothing VARCHAR(5)
) DEFAULT CHARSET = utf8mb4;
"#;

/// The values of one row of `everything` after its id.
const VALUES: &str = r#"-128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
    -9223372036854775808, -12345678901234567890.0123456789, 0.50, 1.5, -2.25,
    '2026-11-23', '2026-11-23 05:21:05.123456', '1000-01-01 00:00:00',
    '2026-11-23 07:21:05.123', '2026-11-23 07:21:05', '-838:59:59.000000', '27:00:01', 2155, 0,
    'héllo "wörld"', 'ab', 'long text ✓', 'café',
    0xDEADBEEF, 0x00FF, 0x0102,
    'large', '', 'a,c', '', b'101000000001', b'1',
    '{"a": [1, 2.5, null], "b": {"c": true}}', ST_GeomFromText('POINT(1 2)'), NULL"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_has_the_same_json_in_the_snapshot_and_the_binlog() -> Result<()> {
    // A zero ENUM ('' in a non-strict session) and the zero YEAR too.
    let insert = |id: u32| {
        format!(
            "SET SESSION sql_mode = ''; SET time_zone = '+02:00'; \
             INSERT INTO everything VALUES ({id}, {VALUES});"
        )
    };
    let setup = format!("{EVERY_TYPE} {}", insert(1));
    let mut pipeline = MysqlPipeline::start(STREAM, 1, &setup, SNAPSHOT).await?;
    pipeline.db.execute(&insert(2)).await?;
    let records = pipeline.settled(STREAM, SETTLE).await?;
    let mut afters: Vec<(String, serde_json::Map<String, Value>)> = Vec::new();
    for record in &records {
        let envelope = record.json()?;
        let mut after = envelope["after"].as_object().context("after")?.clone();
        after.remove("id");
        afters.push((envelope["op"].as_str().unwrap().to_owned(), after));
    }
    afters.sort_by(|a, b| b.0.cmp(&a.0));
    let ops: Vec<&str> = afters.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(ops, ["snapshot", "insert"]);
    let (snapshot, binlog) = (&afters[0].1, &afters[1].1);
    let differing: Vec<String> = binlog
        .iter()
        .filter(|(column, value)| snapshot.get(*column) != Some(*value))
        .map(|(column, value)| {
            format!(
                "{column}: binlog {value}, snapshot {}",
                snapshot.get(column).unwrap_or(&Value::Null)
            )
        })
        .collect();
    assert!(
        differing.is_empty() && snapshot.len() == binlog.len(),
        "the snapshot renders like the binlog:\n{}",
        differing.join("\n")
    );
    assert_eq!(snapshot["ts"], "2026-11-23T05:21:05.123Z");
    assert_eq!(snapshot["en"], "large");
    assert_eq!(snapshot["st"], serde_json::json!(["a", "c"]));
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_snapshot_are_neither_lost_nor_overtaken() -> Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // One slow shard: the copy takes seconds while a writer inserts,
    // updates and deletes rows of the table being copied.
    let mut pipeline = MysqlPipeline::start_without_waiting(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"initial\"\n[sink.quota]\nrecords_per_shard_per_sec = 1000\n",
    )
    .await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(pipeline.db.root().await?, done.clone(), 5_000);
    let waited = pipeline
        .tributary
        .wait_for_log("snapshot complete", Duration::from_secs(120))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, Ordering::Relaxed);
    let rounds = writer.await??;
    waited?;
    let records = pipeline.settled(STREAM, SETTLE).await?;
    let snapshots = records
        .iter()
        .filter(|r| r.json().is_ok_and(|e| e["op"] == "snapshot"))
        .count();
    eprintln!(
        "{rounds} write rounds during the snapshot; {snapshots} snapshot rows, {} records",
        records.len()
    );
    ensure!(
        rounds > 10,
        "the writer ran during the snapshot ({rounds} rounds)"
    );
    assert_replica_matches(&pipeline, &records, "shop.items", &["id"]).await?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_only_copies_and_exits_0_leaving_no_offset() -> Result<()> {
    let mut pipeline =
        MysqlPipeline::start_without_waiting(STREAM, 2, SETUP, "[source]\nsnapshot = \"only\"\n")
            .await?;
    let status = pipeline
        .tributary
        .wait_exit(Duration::from_secs(120))
        .await?;
    assert!(
        status.success(),
        "exit 0: {status}\n{}",
        pipeline.tributary.logs()
    );
    let logs = pipeline.tributary.logs();
    assert!(
        !logs.contains("global read lock released") && !logs.contains("lock_ms"),
        "no lock is taken when no stream follows:\n{logs}"
    );
    let records = pipeline.kin.read_all(STREAM).await?;
    ensure!(
        records.len() == 5010,
        "{} records for 5,010 rows",
        records.len()
    );
    assert!(
        records
            .iter()
            .all(|r| r.json().is_ok_and(|e| e["op"] == "snapshot"))
    );
    assert_replica_matches(&pipeline, &records, "shop.items", &["id"]).await?;
    assert_eq!(pipeline.stored_offset(), None, "no offset is written");
    let marker = pipeline
        .config
        .state_dir
        .join("mysql-snapshot-shop.pending");
    assert!(!marker.exists(), "no marker is left");
    Ok(())
}

/// A snapshot stopped by SIGTERM drains what it handed over, and the
/// marker records it: the next start sends no snapshot row twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_stopped_by_sigterm_records_what_it_drained() -> Result<()> {
    let mut pipeline = start_large().await?;
    let (marker, _) = marker_after_3000_items(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    ensure!(marker.exists(), "stopped before the snapshot completed");
    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let records = pipeline.settled(STREAM, SETTLE).await?;
    snapshot_resume::assert_snapshot_rows_once(&records, LARGE_ROWS)?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

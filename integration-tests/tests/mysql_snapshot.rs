//! `source.snapshot = "initial"` on a real MariaDB 10.11 and kinesalite:
//! the rows the tables held before the first start arrive as
//! `op = "snapshot"` envelopes, then the binlog is streamed from the
//! snapshot's position, and a consumer replaying the stream ends with
//! exactly the table.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
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
    ensure!(
        logs.contains("global read lock released") && logs.contains("lock_ms"),
        "the lock's duration is logged:\n{logs}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_is_taken_again_and_converges() -> Result<()> {
    // A slow stream (400 records/s on one shard) keeps the snapshot going
    // long enough to kill it in the middle.
    let mut pipeline = MysqlPipeline::start_without_waiting(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"initial\"\n[sink.quota]\nrecords_per_shard_per_sec = 400\n",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before_kill = pipeline.kin.read_all(STREAM).await?.len();
    ensure!(
        before_kill > 0 && before_kill < 5010,
        "killed in the middle: {before_kill} rows were out\n{}",
        pipeline.tributary.logs()
    );
    pipeline.tributary.kill9().await?;
    ensure!(
        pipeline.stored_offset().is_none(),
        "no offset is written before the snapshot completes"
    );
    pipeline
        .db
        .execute("UPDATE items SET name = 'changed' WHERE id % 7 = 0")
        .await?;
    std::fs::write(
        pipeline.config.path.as_path(),
        std::fs::read_to_string(&pipeline.config.path)?.replace(
            "records_per_shard_per_sec = 400",
            "records_per_shard_per_sec = 1000",
        ),
    )?;
    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let logs = pipeline.tributary.logs();
    assert!(
        logs.contains("an earlier snapshot did not finish"),
        "the restart says it takes the snapshot again:\n{logs}"
    );
    pipeline
        .db
        .execute("DELETE FROM items WHERE id % 11 = 0")
        .await?;
    let records = pipeline
        .settled(STREAM, SETTLE)
        .await
        .context("after the restart")?;
    eprintln!(
        "{before_kill} snapshot rows were out before kill -9; {} records in all",
        records.len()
    );
    assert_replica_matches(&pipeline, &records, "shop.items", &["id"]).await?;
    let marker = pipeline
        .config
        .state_dir
        .join("mysql-snapshot-shop.pending");
    assert!(!marker.exists(), "the marker is removed once complete");
    pipeline.stop_gracefully().await?;
    Ok(())
}

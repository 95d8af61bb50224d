//! Keys and order on a real Postgres 15 and kinesalite: partitioned tables,
//! keys taken from the right tuple, key changes, and truncates, each checked
//! the way a consumer sees the stream (one worker per shard, only per-shard
//! order; see `tributary_integration_tests::consumer`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tributary_integration_tests::consumer::{self, shards_with_op};
use tributary_integration_tests::{DEFAULT_DATABASE, Faults, Pipeline, Servers, StreamRecord};

const STREAM: &str = "keys-cdc";
const WAIT: Duration = Duration::from_secs(90);

/// Waits for `count` records, then a moment more, and fails if more came
/// than expected (each change must be exactly the records it makes).
async fn exactly(pipeline: &Pipeline, count: usize) -> Result<Vec<StreamRecord>> {
    pipeline.kin.wait_for_records(STREAM, count, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = pipeline.kin.read_all(STREAM).await?;
    ensure!(
        records.len() == count,
        "expected {count} records, the stream holds {}",
        records.len()
    );
    Ok(records)
}

/// Asserts that replaying the stream per shard, in any shard order, gives
/// exactly the rows of `table` (keyed by `key_columns`).
async fn assert_replica_matches(
    pipeline: &Pipeline,
    records: &[StreamRecord],
    table: &str,
    key_columns: &[&str],
) -> Result<()> {
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    consumer::assert_replica_matches(&client, records, table, key_columns).await
}

const PARTITIONED: &str = "
CREATE SCHEMA sales;
CREATE TABLE sales.orders (id int, placed date, amount int, PRIMARY KEY (id, placed))
    PARTITION BY RANGE (placed);
CREATE TABLE sales.orders_2025 PARTITION OF sales.orders
    FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.orders_2026 PARTITION OF sales.orders
    FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_arrive_under_the_parent_whatever_the_patterns_name() -> Result<()> {
    // The last case finds a publication made without
    // publish_via_partition_root, which start-up turns on.
    for (tables, publication) in [
        (r#"["sales.orders"]"#, ""),
        (r#"["sales.*"]"#, ""),
        (r#"["sales.orders", "sales.orders_2025"]"#, ""),
        (
            r#"["sales.orders"]"#,
            "CREATE PUBLICATION tributary_shop FOR TABLE sales.orders;",
        ),
    ] {
        let mut pipeline = Pipeline::start(
            STREAM,
            2,
            &format!("{PARTITIONED}{publication}"),
            &format!("[source]\ntables = {tables}\n"),
        )
        .await?;
        pipeline
            .pg
            .execute_each(&[
                // 20 rows over both partitions.
                "INSERT INTO sales.orders SELECT g, DATE '2025-06-01' + g * 20, g FROM generate_series(1, 20) g",
                "UPDATE sales.orders SET amount = amount * 10 WHERE id <= 10",
                // Five rows move from the 2025 partition to the 2026 one.
                "UPDATE sales.orders SET placed = DATE '2026-06-30' WHERE id IN (1, 2, 3, 4, 5)",
                "DELETE FROM sales.orders WHERE id IN (6, 19, 20, 3, 4)",
            ])
            .await?;
        // 20 inserts, 10 updates, 5 moves (a delete and an insert each), 5 deletes.
        let records = exactly(&pipeline, 45)
            .await
            .with_context(|| format!("tables = {tables}\n{}", pipeline.tributary.logs()))?;
        for record in &records {
            let envelope = record.json()?;
            assert_eq!(envelope["source"]["schema"], "sales", "{envelope}");
            assert_eq!(envelope["source"]["table"], "orders", "{envelope}");
            assert!(record.partition_key.starts_with("sales.orders:"));
        }
        assert_replica_matches(&pipeline, &records, "sales.orders", &["id", "placed"])
            .await
            .with_context(|| format!("tables = {tables}"))?;
        pipeline.stop_gracefully().await?;
    }
    Ok(())
}

const IDENTITIES: &str = "
CREATE TABLE ri (id text PRIMARY KEY, code int NOT NULL, v text);
CREATE UNIQUE INDEX ri_code ON ri (code);
ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code;
CREATE TABLE tk (id text PRIMARY KEY, v int);
ALTER TABLE tk ALTER COLUMN id SET STORAGE EXTERNAL;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_of_a_row_carries_the_same_key() -> Result<()> {
    let mut pipeline = Pipeline::start(STREAM, 2, IDENTITIES, "").await?;
    let long_id = "k".repeat(2500);
    pipeline
        .pg
        .execute_each(&[
            "INSERT INTO ri VALUES ('a', 1, 'x')",
            "UPDATE ri SET v = 'y' WHERE id = 'a'",
            "DELETE FROM ri WHERE id = 'a'",
            // The key is stored out of line (TOAST) and unchanged by the update.
            &format!("INSERT INTO tk VALUES ('{long_id}', 1)"),
            "UPDATE tk SET v = 2",
            "DELETE FROM tk",
        ])
        .await?;
    let records = exactly(&pipeline, 6).await?;
    for (table, key) in [("ri", json!({"code": 1})), ("tk", json!({"id": long_id}))] {
        let of_table: Vec<(&StreamRecord, Value)> = records
            .iter()
            .map(|r| (r, r.json().unwrap()))
            .filter(|(_, e)| e["source"]["table"] == table)
            .collect();
        let ops: Vec<&str> = of_table
            .iter()
            .map(|(_, e)| e["op"].as_str().unwrap())
            .collect();
        assert_eq!(ops, ["insert", "update", "delete"], "{table}");
        for (record, envelope) in &of_table {
            assert_eq!(envelope["key"], key, "{table}: {envelope}");
            assert_eq!(
                record.partition_key, of_table[0].0.partition_key,
                "{table}: one partition key for every op"
            );
        }
    }
    let logs = pipeline.tributary.logs();
    assert!(
        logs.contains("REPLICA IDENTITY USING INDEX does not cover the primary key"),
        "the index-keyed table is warned about:\n{logs}"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// 1,000 rounds over 50 keys: move key k to k + 1000 (dropping what held
/// that key before), then insert k again. Returns the SQL and the number of
/// events it makes.
fn key_change_rounds() -> (String, usize) {
    let mut sql = String::new();
    let mut expected = 0;
    for round in 0..1_000 {
        let k = round % 50;
        let moved = k + 1_000;
        if round >= 50 {
            expected += 1; // the delete of the previous round's moved row
        }
        if round < 50 {
            sql.push_str(&format!("INSERT INTO kc VALUES ({k}, -1);"));
            expected += 1;
        }
        sql.push_str(&format!(
            "BEGIN; DELETE FROM kc WHERE id = {moved}; \
             UPDATE kc SET id = {moved}, v = {round} WHERE id = {k}; \
             INSERT INTO kc VALUES ({k}, {round}); COMMIT;"
        ));
        expected += 3; // delete + insert for the key change, then the insert
    }
    (sql, expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_then_reinserts_of_the_old_key_keep_order() -> Result<()> {
    let mut pipeline =
        Pipeline::start(STREAM, 4, "CREATE TABLE kc (id int PRIMARY KEY, v int)", "").await?;
    let (sql, expected) = key_change_rounds();
    pipeline.pg.execute(&sql).await?;
    let records = exactly(&pipeline, expected).await?;
    assert_replica_matches(&pipeline, &records, "public.kc", &["id"]).await?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_keep_order_while_kinesis_refuses_entries() -> Result<()> {
    let servers = Servers::start(STREAM, 4, "CREATE TABLE kc (id int PRIMARY KEY, v int)").await?;
    let seed = std::env::var("TRIBUTARY_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault seed {seed} (replay with TRIBUTARY_FAULT_SEED={seed})");
    let (faults, mut pipeline) = servers
        .start_tributary_with_faults(Faults::rough(seed))
        .await?;
    let (sql, expected) = key_change_rounds();
    pipeline.pg.execute(&sql).await?;
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(240))
        .await
        .with_context(|| format!("fault seed {seed}"))?;
    let records = pipeline.kin.read_all(STREAM).await?;
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| r.json().map(|e| e["id"].to_string()))
        .collect::<Result<_>>()?;
    ids.sort();
    ids.dedup();
    ensure!(
        ids.len() == expected,
        "seed {seed}: {} distinct events, expected {expected}",
        ids.len()
    );
    let refused = faults.counts().refused_entries.load(Ordering::Relaxed);
    ensure!(refused > 0, "the proxy refused nothing");
    assert_replica_matches(&pipeline, &records, "public.kc", &["id"])
        .await
        .with_context(|| format!("fault seed {seed}"))?;
    eprintln!(
        "{} records for {expected} events; {refused} entries refused, {} calls failed",
        records.len(),
        faults.counts().failed_calls.load(Ordering::Relaxed)
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_reaches_every_shard_before_later_changes() -> Result<()> {
    let mut pipeline =
        Pipeline::start(STREAM, 4, "CREATE TABLE tr (id int PRIMARY KEY, v int)", "").await?;
    pipeline
        .pg
        .execute_each(&[
            "INSERT INTO tr SELECT g, g FROM generate_series(1, 100) g",
            "BEGIN; TRUNCATE tr; INSERT INTO tr SELECT g, g FROM generate_series(101, 200) g; COMMIT",
            "INSERT INTO tr SELECT g, g FROM generate_series(201, 300) g",
        ])
        .await?;
    // 300 inserts and one truncate copy per shard.
    let records = exactly(&pipeline, 304).await?;
    assert_eq!(
        shards_with_op(&records, "truncate").len(),
        4,
        "one truncate per shard"
    );
    assert_replica_matches(&pipeline, &records, "public.tr", &["id"]).await?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

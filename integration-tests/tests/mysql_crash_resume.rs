//! Guarantees 1-4 of the MySQL source under `kill -9`: a writer commits
//! 10,000 transactions over 200 keys (one in four a two-row transaction)
//! into MariaDB while `tributary` is killed at random moments and
//! restarted. Every committed change must be in the stream, duplicates
//! carry the same id, and each key's last occurrences are in commit order.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mysql_async::prelude::Queryable as _;
use rand::Rng as _;
use serde_json::Value;
use tributary_integration_tests::{
    FAST_QUOTA, MysqlPipeline, assert_last_occurrences_in_commit_order,
};

const STREAM: &str = "crash-cdc";
const TRANSACTIONS: i64 = 10_000;
const KEYS: i64 = 200;
/// `(key, value)` of an envelope of table `kv`; values increase in commit
/// order and are unique per row change.
fn key_value(envelope: &Value) -> Option<(i64, i64)> {
    let after = envelope.get("after")?;
    Some((after.get("k")?.as_i64()?, after.get("v")?.as_i64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_keeps_per_key_order() -> anyhow::Result<()> {
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        4,
        "CREATE TABLE kv (k INT PRIMARY KEY, v BIGINT NOT NULL)",
        FAST_QUOTA,
    )
    .await?;

    let writing = Arc::new(AtomicBool::new(true));
    let mut conn = pipeline.db.root().await?;
    conn.query_drop("USE shop").await?;
    let writer = {
        let writing = writing.clone();
        tokio::spawn(async move {
            let mut expected = 0i64;
            for n in 1..=TRANSACTIONS {
                let key = (n * 7919) % KEYS;
                let upsert = "INSERT INTO kv VALUES (?, ?) ON DUPLICATE KEY UPDATE v = VALUES(v)";
                if n % 4 == 0 {
                    let mut tx = conn.start_transaction(Default::default()).await?;
                    tx.exec_drop(upsert, (key, n * 2)).await?;
                    tx.exec_drop(upsert, ((key + 1) % KEYS, n * 2 + 1)).await?;
                    tx.commit().await?;
                    expected += 2;
                } else {
                    conn.exec_drop(upsert, (key, n * 2)).await?;
                    expected += 1;
                }
            }
            writing.store(false, Ordering::SeqCst);
            anyhow::Ok(expected)
        })
    };

    let mut kills = 0;
    while writing.load(Ordering::SeqCst) || kills < 3 {
        let pause = rand::rng().random_range(200..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        pipeline.kill9_and_restart().await?;
        kills += 1;
    }
    let expected = writer.await?? as usize;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let records = loop {
        let records = pipeline.kin.read_all(STREAM).await?;
        let seen: BTreeSet<i64> = records
            .iter()
            .filter_map(|r| r.json().ok())
            .filter_map(|e| key_value(&e))
            .map(|(_, v)| v)
            .collect();
        if seen.len() >= expected || tokio::time::Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut per_key: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut ids_by_value: HashMap<i64, String> = HashMap::new();
    for record in &records {
        let envelope = record.json()?;
        let (k, v) = key_value(&envelope).expect("every envelope is an upsert of kv");
        let id = envelope["id"].as_str().unwrap().to_owned();
        assert_eq!(record.partition_key, format!("shop.kv:{k}"));
        if let Some(previous) = ids_by_value.insert(v, id.clone()) {
            assert_eq!(
                previous, id,
                "a duplicate of change {v} carries the same id"
            );
        }
        per_key.entry(k).or_default().push(v);
    }
    assert_eq!(
        ids_by_value.len(),
        expected,
        "every committed change is in the stream\n{}",
        pipeline.tributary.logs()
    );
    assert_last_occurrences_in_commit_order(&per_key);
    eprintln!(
        "{kills} kills, {} records, {} duplicates",
        records.len(),
        records.len() - expected
    );
    assert!(kills >= 3);
    pipeline.stop_gracefully().await?;
    Ok(())
}

//! Guarantees 1-4 under `kill -9`: a writer commits 10,000 small transactions
//! over 200 keys while the `tributary` process is killed at random moments
//! and restarted. Every committed change must be in the stream, and for
//! every key the last occurrence of each event must be in commit order.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng as _;
use serde_json::Value;
use tributary_integration_tests::{
    DEFAULT_DATABASE, Kinesalite, Pipeline, assert_last_occurrences_in_commit_order,
};

const STREAM: &str = "crash-cdc";
const TRANSACTIONS: i64 = 10_000;
const KEYS: i64 = 200;
/// Generous quotas: kinesalite does not throttle, and the test should not
/// spend its time waiting on the 1,000 records/s default.
const FAST_QUOTA: &str =
    "[sink.quota]\nrecords_per_shard_per_sec = 20000\nbytes_per_shard_per_sec = 20000000\n";

/// `(key, value)` of an envelope of table `kv`; value is the writer's
/// transaction number, increasing in commit order.
fn key_value(envelope: &Value) -> Option<(i64, i64)> {
    let after = envelope.get("after")?;
    Some((after.get("k")?.as_i64()?, after.get("v")?.as_i64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_nothing_and_keeps_per_key_order() -> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        4,
        "CREATE TABLE kv (k int PRIMARY KEY, v bigint NOT NULL)",
        FAST_QUOTA,
    )
    .await?;

    // The writer: one upsert per transaction, v = the transaction's number.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
        let writing = writing.clone();
        tokio::spawn(async move {
            let upsert = db
                .prepare(
                    "INSERT INTO kv VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                )
                .await?;
            for n in 1..=TRANSACTIONS {
                let key = (n * 7919) % KEYS;
                db.execute(&upsert, &[&(key as i32), &n]).await?;
            }
            writing.store(false, Ordering::SeqCst);
            anyhow::Ok(())
        })
    };

    let mut kills = 0;
    while writing.load(Ordering::SeqCst) || kills < 3 {
        let pause = rand::rng().random_range(200..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        pipeline.kill9_and_restart().await?;
        kills += 1;
    }
    writer.await??;

    // Everything the writer committed must arrive (duplicates may come too).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    let records = loop {
        let seen: BTreeSet<i64> = records_values(&pipeline.kin)
            .await?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        if seen.len() as i64 >= TRANSACTIONS || tokio::time::Instant::now() > deadline {
            break pipeline.kin.read_all(STREAM).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    // Per shard, in stream order: each key's events.
    let mut per_key: HashMap<i64, Vec<(i64, String)>> = HashMap::new();
    let mut ids_by_value: HashMap<i64, String> = HashMap::new();
    for record in &records {
        let envelope = record.json()?;
        let (k, v) = key_value(&envelope).expect("every envelope is an upsert of kv");
        let id = envelope["id"].as_str().unwrap().to_owned();
        assert_eq!(record.partition_key, format!("public.kv:{k}"));
        if let Some(previous) = ids_by_value.insert(v, id.clone()) {
            assert_eq!(
                previous, id,
                "a duplicate of transaction {v} carries the same id"
            );
        }
        per_key.entry(k).or_default().push((v, id));
    }
    let seen: BTreeSet<i64> = ids_by_value.keys().copied().collect();
    let missing: Vec<i64> = (1..=TRANSACTIONS)
        .filter(|n| !seen.contains(n))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "committed transactions missing from the stream: {missing:?} ..."
    );
    assert_eq!(per_key.len() as i64, KEYS);

    // The last occurrence of each event, in stream order, must be in commit order.
    let values: HashMap<i64, Vec<i64>> = per_key
        .iter()
        .map(|(key, events)| (*key, events.iter().map(|(v, _)| *v).collect()))
        .collect();
    assert_last_occurrences_in_commit_order(&values);
    let duplicates = records.len() as i64 - TRANSACTIONS;
    eprintln!(
        "{kills} kills, {} records, {duplicates} duplicates",
        records.len()
    );
    assert!(kills >= 3);

    // A graceful stop after the crashes still exits 0.
    pipeline.stop_gracefully().await?;
    Ok(())
}

async fn records_values(kin: &Kinesalite) -> anyhow::Result<Vec<(i64, i64)>> {
    Ok(kin
        .read_all_json(STREAM)
        .await?
        .iter()
        .filter_map(key_value)
        .collect())
}

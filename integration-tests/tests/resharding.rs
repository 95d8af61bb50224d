//! A stream split from 2 to 4 shards while changes flow (issue 7, item 3),
//! on kinesalite (which implements SplitShard): nothing is lost, per-key
//! order holds across the split (parents are read before their children),
//! the new shards receive traffic, and a truncate after the split reaches
//! every shard open then.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use tributary_integration_tests::{DEFAULT_DATABASE, Kinesalite, Pipeline};

const STREAM: &str = "reshard-cdc";
const KEYS: i32 = 300;
const ROUNDS_BEFORE: i32 = 3;
const ROUNDS_AFTER: i32 = 4;

/// Splits every open shard of the stream at the middle of its hash range,
/// one at a time (Kinesis allows one reshard at a time).
async fn split_every_shard(kin: &Kinesalite) -> Result<Vec<String>> {
    let shards = kin
        .client()
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await?;
    let mut parents = Vec::new();
    for shard in shards.shards() {
        let range = shard.hash_key_range().context("a hash key range")?;
        let start: u128 = range.starting_hash_key().parse()?;
        let end: u128 = range.ending_hash_key().parse()?;
        kin.client()
            .split_shard()
            .stream_name(STREAM)
            .shard_to_split(shard.shard_id())
            .new_starting_hash_key((start + (end - start) / 2 + 1).to_string())
            .send()
            .await
            .with_context(|| format!("splitting {}", shard.shard_id()))?;
        kin.wait_active(STREAM).await?;
        parents.push(shard.shard_id().to_owned());
    }
    Ok(parents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_while_changes_flow_loses_nothing_and_keeps_per_key_order() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)",
        "",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0 FROM generate_series(1, {KEYS}) g"
    ))
    .await?;
    for round in 1..ROUNDS_BEFORE {
        db.batch_execute(&format!("UPDATE items SET v = {round}"))
            .await?;
    }
    // Split while the next rounds are committed and flowing.
    let (parents, ()) = tokio::try_join!(split_every_shard(&pipeline.kin), async {
        for round in ROUNDS_BEFORE..ROUNDS_BEFORE + ROUNDS_AFTER {
            db.batch_execute(&format!("UPDATE items SET v = {round}"))
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    })?;
    let committed = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(committed, Duration::from_secs(60))
        .await?;
    // One more round, after the map was read again, then a truncate: its
    // copies go to the shards open now.
    let last = ROUNDS_BEFORE + ROUNDS_AFTER;
    db.batch_execute(&format!("UPDATE items SET v = {last}"))
        .await?;
    db.batch_execute("TRUNCATE items").await?;
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(60))
        .await?;

    let records = pipeline.kin.read_all(STREAM).await?;
    let mut versions: HashMap<i64, Vec<i64>> = HashMap::new();
    let mut ids = HashSet::new();
    let mut truncates: HashSet<String> = HashSet::new();
    let mut per_shard: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *per_shard.entry(record.shard_id.clone()).or_default() += 1;
        let envelope = record.json()?;
        if envelope["op"] == "truncate" {
            truncates.insert(record.shard_id.clone());
            continue;
        }
        assert!(
            ids.insert(envelope["id"].as_str().unwrap().to_owned()),
            "{} sent twice",
            envelope["id"]
        );
        let after = &envelope["after"];
        versions
            .entry(after["id"].as_i64().unwrap())
            .or_default()
            .push(after["v"].as_i64().unwrap());
    }
    eprintln!("records per shard: {per_shard:?}");
    // Shards come back in shard-id order, the parents first: per key, the
    // versions are exactly 0..=last in order.
    let expected: Vec<i64> = (0..=i64::from(last)).collect();
    assert_eq!(versions.len(), KEYS as usize);
    for (key, seen) in &versions {
        assert_eq!(seen, &expected, "key {key}");
    }
    let children: Vec<&String> = per_shard
        .keys()
        .filter(|shard| !parents.contains(shard))
        .collect();
    assert_eq!(
        children.len(),
        4,
        "the new shards receive traffic: {per_shard:?}"
    );
    let child_set: HashSet<String> = children.into_iter().cloned().collect();
    assert_eq!(
        truncates, child_set,
        "the truncate reached every shard open after the split"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

//! Transaction markers (`sink.transaction_markers = true`, issue 11 item 4)
//! through real pipelines: a worker reading one shard sees, for every
//! transaction that touched its shard, a `begin` before its events and an
//! `end` after them whose counts say it holds the transaction's whole part
//! (`consumer::check_transaction_markers`), with Kinesis refusing a share
//! of PutRecords entries (so markers and events are retried); the slot is
//! acknowledged (the markers count in the watermark); the events still
//! replay to the source table. Debezium markers follow Debezium's
//! transaction metadata layout. With aggregation, markers are sub-records
//! that `tail --validate` reads back and accepts. One smaller MySQL run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tributary_integration_tests::consumer::{
    assert_mysql_replica_matches, assert_replica_matches, check_transaction_markers,
};
use tributary_integration_tests::{
    DEFAULT_DATABASE, FAST_QUOTA, Faults, KinesisFaults, MysqlPipeline, Pipeline, Servers,
};

const SETUP: &str = "CREATE TABLE orders (id int PRIMARY KEY, v int NOT NULL);
                     CREATE TABLE items (id int PRIMARY KEY, order_id int NOT NULL, v int NOT NULL)";
/// Multi-table transactions, each touching 5 orders and 5 items.
const TRANSACTIONS: i32 = 20;
/// Single-row transactions after them.
const SINGLES: i32 = 10;

/// The workload: 20 transactions of 10 inserts over 2 tables, 20 of 10
/// updates, 10 single-row updates, a delete.
fn workload() -> Vec<String> {
    let mut statements = Vec::new();
    for t in 0..TRANSACTIONS {
        let keys = t * 5 + 1..=t * 5 + 5;
        statements.push(format!(
            "BEGIN; INSERT INTO orders SELECT g, 0 FROM generate_series({}, {}) g; \
             INSERT INTO items SELECT g, g, 0 FROM generate_series({}, {}) g; COMMIT",
            keys.start(),
            keys.end(),
            keys.start(),
            keys.end()
        ));
    }
    for t in 0..TRANSACTIONS {
        statements.push(format!(
            "BEGIN; UPDATE orders SET v = v + 1 WHERE id % {TRANSACTIONS} = {t}; \
             UPDATE items SET v = v + 1 WHERE id % {TRANSACTIONS} = {t}; COMMIT"
        ));
    }
    for s in 1..=SINGLES {
        statements.push(format!("UPDATE orders SET v = v + 10 WHERE id = {s}"));
    }
    statements.push("DELETE FROM items WHERE id = 3".to_owned());
    statements
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_frame_every_transaction_on_every_shard_while_kinesis_refuses_entries() -> Result<()>
{
    const STREAM: &str = "markers-cdc";
    let servers = Servers::start(STREAM, 4, SETUP).await?;
    let faults = KinesisFaults::start(
        SocketAddr::from(([127, 0, 0, 1], servers.kin.port())),
        Faults {
            throttled_entries: 0.10,
            internal_failure_entries: 0.03,
            failed_calls: 0.0,
            seed: 11,
            ..Faults::default()
        },
    )
    .await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\ntransaction_markers = true\n{FAST_QUOTA}",
        faults.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    for statement in workload() {
        db.batch_execute(&statement).await?;
    }
    // The slot moves only once every end marker is in the stream.
    let committed = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(committed, Duration::from_secs(90))
        .await?;
    pipeline.stop_gracefully().await?;
    ensure!(
        faults
            .counts()
            .refused_entries
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the proxy refused nothing: the retries were not exercised"
    );

    let records = pipeline.kin.read_all(STREAM).await?;
    let found = check_transaction_markers(&records)?;
    // 40 multi-table transactions, 10 single-row ones, the delete.
    let expected = (2 * TRANSACTIONS + SINGLES + 1) as usize;
    assert_eq!(found.transactions, expected, "{found:?}");
    assert_eq!(found.multi_table, 2 * TRANSACTIONS as usize, "{found:?}");
    assert!(
        found.multi_shard >= TRANSACTIONS as usize,
        "10 keys over 4 shards: most transactions span shards: {found:?}"
    );
    for table in ["public.orders", "public.items"] {
        assert_replica_matches(&db, &records, table, &["id"]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_markers_are_debezium_transaction_metadata() -> Result<()> {
    const STREAM: &str = "markers-dbz";
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        SETUP,
        "[sink]\nformat = \"debezium\"\ntransaction_markers = true\n",
    )
    .await?;
    pipeline
        .pg
        .execute_each(&[
            "BEGIN; INSERT INTO orders VALUES (1, 0), (2, 0), (3, 0); \
             INSERT INTO items VALUES (1, 1, 0); COMMIT",
            "UPDATE items SET v = 1 WHERE id = 1",
        ])
        .await?;
    let committed = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(committed, Duration::from_secs(60))
        .await?;
    pipeline.stop_gracefully().await?;
    let records = pipeline.kin.read_all(STREAM).await?;
    let values: Vec<(String, Value)> = records
        .iter()
        .map(|r| Ok((r.shard_id.clone(), r.json()?)))
        .collect::<Result<_>>()?;
    let markers: Vec<&(String, Value)> = values
        .iter()
        .filter(|(_, v)| v["status"].is_string())
        .collect();
    let events: Vec<&(String, Value)> =
        values.iter().filter(|(_, v)| v["op"].is_string()).collect();
    assert_eq!(events.len(), 5);
    for (_, marker) in &markers {
        // Debezium's transaction metadata value, field by field.
        let status = marker["status"].as_str().context("status")?;
        assert!(
            marker["id"].is_string() && marker["ts_ms"].is_i64(),
            "{marker}"
        );
        match status {
            "BEGIN" => {
                assert_eq!(marker["event_count"], Value::Null);
                assert_eq!(marker["data_collections"], Value::Null);
            }
            "END" => {
                assert!(marker["event_count"].is_u64(), "{marker}");
                for collection in marker["data_collections"]
                    .as_array()
                    .context("collections")?
                {
                    assert!(collection["data_collection"].is_string(), "{marker}");
                    assert!(collection["event_count"].is_u64(), "{marker}");
                }
            }
            other => panic!("status {other} in {marker}"),
        }
    }
    // Per shard: BEGIN, the transaction's events (each carrying its
    // transaction block), END with the shard's count.
    let first_id = events[0].1["transaction"]["id"].as_str().context("tx id")?;
    let mut orders = Vec::new();
    for shard in values
        .iter()
        .map(|(s, _)| s)
        .collect::<std::collections::BTreeSet<_>>()
    {
        let on_shard: Vec<&Value> = values
            .iter()
            .filter(|(s, _)| s == shard)
            .map(|(_, v)| v)
            .collect();
        let mut open: Option<(&str, u64)> = None;
        for value in on_shard {
            match value["status"].as_str() {
                Some("BEGIN") => {
                    assert!(open.is_none(), "nested BEGIN on {shard}");
                    open = Some((value["id"].as_str().context("id")?, 0));
                }
                Some(_) => {
                    let (id, seen) = open.take().context("END without BEGIN")?;
                    assert_eq!(value["id"], id);
                    assert_eq!(value["shard_event_count"], seen, "{value}");
                }
                None => {
                    let (id, seen) = open.as_mut().context("an event outside a transaction")?;
                    assert_eq!(value["transaction"]["id"], *id, "{value}");
                    *seen += 1;
                    if value["transaction"]["id"] == first_id {
                        orders.push(
                            value["transaction"]["total_order"]
                                .as_u64()
                                .context("order")?,
                        );
                    }
                }
            }
        }
        assert!(open.is_none(), "{shard} ends inside a transaction");
    }
    orders.sort_unstable();
    assert_eq!(
        orders,
        [1, 2, 3, 4],
        "total_order numbers the first transaction's events"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_transactions_are_framed_on_every_shard() -> Result<()> {
    const STREAM: &str = "markers-mysql";
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        3,
        "CREATE TABLE orders (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE items (id int PRIMARY KEY, order_id int NOT NULL, v int NOT NULL)",
        "[sink]\ntransaction_markers = true\n",
    )
    .await?;
    for t in 0..5 {
        let base = t * 4;
        pipeline
            .db
            .execute(&format!(
                "BEGIN; INSERT INTO orders VALUES ({}, 0), ({}, 0), ({}, 0), ({}, 0); \
                 INSERT INTO items VALUES ({}, 1, 0), ({}, 1, 0); COMMIT",
                base + 1,
                base + 2,
                base + 3,
                base + 4,
                base + 1,
                base + 2
            ))
            .await?;
    }
    pipeline
        .db
        .execute("UPDATE orders SET v = 7 WHERE id = 2")
        .await?;
    // The offset moves only once every end marker is in the stream.
    let records = pipeline.settled(STREAM, Duration::from_secs(60)).await?;
    pipeline.stop_gracefully().await?;
    let found = check_transaction_markers(&records)?;
    assert_eq!(found.transactions, 6, "{found:?}");
    assert_eq!(found.multi_table, 5, "{found:?}");
    let mut conn = pipeline.db.root().await?;
    for table in ["shop.orders", "shop.items"] {
        assert_mysql_replica_matches(&mut conn, &records, table, &["id"]).await?;
    }
    Ok(())
}

/// `sink.aggregation = true`: markers travel as sub-records like events;
/// `tributary tail --validate` de-aggregates them, finds every marker and
/// event valid, and (shards in order, each in sequence order) each
/// transaction's events on a shard come between its begin and its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_markers_are_sub_records_that_tail_validates() -> Result<()> {
    const STREAM: &str = "markers-agg";
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        SETUP,
        "[sink]\naggregation = true\ntransaction_markers = true\n",
    )
    .await?;
    let statements = workload();
    let statements: Vec<&str> = statements.iter().take(8).map(String::as_str).collect();
    pipeline.pg.execute_each(&statements).await?;
    let committed = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(committed, Duration::from_secs(60))
        .await?;
    pipeline.stop_gracefully().await?;
    let raw = pipeline.kin.read_all(STREAM).await?;

    let config = pipeline.config.path.to_str().context("UTF-8 config path")?;
    let mut tail = tributary_integration_tests::TributaryProcess::spawn(
        &["tail", "--stream", STREAM, "--validate", "-c", config],
        &[],
        pipeline.dir.path(),
    )?;
    let status = tail.wait_exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "{}", tail.logs());
    assert!(tail.stderr().contains("all valid"), "{}", tail.stderr());
    let lines: Vec<Value> = tail
        .stdout()
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect::<Result<_>>()?;
    assert!(
        raw.len() < lines.len(),
        "{} records carried {} lines: not aggregated",
        raw.len(),
        lines.len()
    );
    let mut open: Option<(String, u64)> = None;
    let (mut framed, mut events) = (0, 0);
    for line in &lines {
        match line["op"].as_str() {
            Some("begin") => {
                assert!(open.is_none(), "a begin inside a transaction: {line}");
                let id = line["transaction"]["id"].as_str().context("id")?;
                open = Some((id.to_owned(), 0));
            }
            Some("end") => {
                let (id, seen) = open.take().context("an end without a begin")?;
                assert_eq!(line["transaction"]["id"], id.as_str());
                assert_eq!(line["transaction"]["shard_event_count"], seen, "{line}");
                framed += 1;
            }
            _ => {
                let (id, seen) = open.as_mut().context("an event outside a transaction")?;
                let position = line["source"]["position"].as_str().context("position")?;
                assert!(position.starts_with(id.as_str()), "{line} outside {id}");
                *seen += 1;
                events += 1;
            }
        }
    }
    assert!(open.is_none());
    assert_eq!(events, 8 * 10, "8 transactions of 10 changes");
    assert!(framed >= 8, "{framed} framed parts");
    Ok(())
}

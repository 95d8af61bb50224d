//! Resuming by GTID on a real MariaDB pair: a connector stopped on the
//! primary and restarted on a promoted replica (whose binlog files are
//! numbered and sized differently) sends nothing twice, loses nothing,
//! keeps each key's order and keeps `source.position` growing; a
//! `server_id` another replica uses is refused at start-up with exit 2,
//! while a previous run of the connector itself is not taken for one.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use mysql_async::prelude::Queryable as _;
use tributary_integration_tests::{
    MYSQL_SERVER_ID, MYSQL_STREAMING_LOG, MYSQL_USER, Mariadb, MysqlPipeline, TributaryProcess,
};

const STREAM: &str = "failover-cdc";
const REPLICA_SERVER_ID: u32 = 2;
const WAIT: Duration = Duration::from_secs(60);

/// Ten updates of keys 0..10, one transaction: `n` grows by one.
const BUMP: &str = "UPDATE items SET n = n + 1 WHERE id < 10";

fn inserts(range: std::ops::Range<u32>) -> Vec<String> {
    range
        .map(|i| format!("INSERT INTO items VALUES ({i}, 0)"))
        .collect()
}

async fn run_each(db: &Mariadb, statements: &[String]) -> anyhow::Result<()> {
    let statements: Vec<&str> = statements.iter().map(String::as_str).collect();
    db.execute_each(&statements).await
}

/// `tributary run` on `primary` with the `items` table, not yet waited for.
async fn start_on(primary: Mariadb) -> anyhow::Result<MysqlPipeline> {
    MysqlPipeline::start_on(
        primary,
        STREAM,
        1,
        "CREATE TABLE items (id INT PRIMARY KEY, n INT)",
        "",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_a_promoted_replica_resumes_by_gtid() -> anyhow::Result<()> {
    let primary = Mariadb::start().await?;
    let replica = Mariadb::start_replica_of(&primary, REPLICA_SERVER_ID).await?;
    // The primary's files run ahead of the replica's: read on the replica,
    // the same transactions sit at lower file indexes.
    primary.execute("FLUSH BINARY LOGS").await?;
    primary.execute("FLUSH BINARY LOGS").await?;
    let mut pipeline = start_on(primary).await?;
    pipeline
        .tributary
        .wait_for_log(MYSQL_STREAMING_LOG, WAIT)
        .await?;

    // On the primary: 100 single inserts, 10 updates, a 50-row transaction.
    run_each(&pipeline.db, &inserts(0..100)).await?;
    pipeline.db.execute(BUMP).await?;
    let values: Vec<String> = (100..150).map(|i| format!("({i}, 0)")).collect();
    pipeline
        .db
        .execute(&format!("INSERT INTO items VALUES {}", values.join(",")))
        .await?;
    pipeline.wait_for_records(STREAM, 160, WAIT).await?;
    pipeline.stop_gracefully().await?;
    let on_primary = pipeline.stored_offset().expect("an offset file");
    assert!(
        on_primary.contains("file=binlog.000003\n") && on_primary.contains("server_id=1\n"),
        "{on_primary}"
    );

    // While the connector is down the primary takes 60 more changes, the
    // replica catches up and is promoted.
    run_each(&pipeline.db, &inserts(150..200)).await?;
    pipeline.db.execute(BUMP).await?;
    replica.wait_caught_up(&pipeline.db).await?;
    replica.promote().await?;

    let url = replica.url();
    pipeline.tributary =
        TributaryProcess::run(&pipeline.config.path, &[("TRIBUTARY__SOURCE__URL", &url)])?;
    pipeline
        .tributary
        .wait_for_log(MYSQL_STREAMING_LOG, WAIT)
        .await?;
    // The promoted replica's own writes (GTIDs 0-2-N).
    run_each(&replica, &inserts(200..250)).await?;
    replica.execute(BUMP).await?;
    pipeline.wait_for_records(STREAM, 280, WAIT).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pipeline.stop_gracefully().await?;
    let logs = pipeline.tributary.logs();
    assert!(
        logs.contains("resumed by GTID on another binlog history"),
        "{logs}"
    );

    let all = pipeline.kin.read_all_json(STREAM).await?;
    assert_eq!(all.len(), 280, "nothing lost, nothing twice");
    let (mut ids, mut inserted) = (HashSet::new(), Vec::new());
    let mut bumps: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    // Order is per key (two calls in flight per shard may interleave
    // keys); across the failover every position of the second run sorts
    // after every one of the first.
    let position = |e: &serde_json::Value| e["source"]["position"].as_str().unwrap().to_owned();
    let (first_run, second_run) = all.split_at(160);
    let before = first_run.iter().map(position).max().unwrap();
    let after = second_run.iter().map(position).min().unwrap();
    assert!(
        after > before,
        "positions keep growing across the failover: {after} after {before}"
    );
    let mut last_of_key: BTreeMap<i64, String> = BTreeMap::new();
    for envelope in &all {
        let id = envelope["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} was sent twice");
        let key = envelope["key"]["id"].as_i64().unwrap();
        let at = position(envelope);
        if let Some(previous) = last_of_key.insert(key, at.clone()) {
            assert!(at > previous, "key {key}: {at} after {previous}");
        }
        match envelope["op"].as_str().unwrap() {
            "insert" => inserted.push(key),
            "update" => bumps
                .entry(key)
                .or_default()
                .push(envelope["after"]["n"].as_i64().unwrap()),
            op => panic!("unexpected op {op}: {envelope}"),
        }
    }
    inserted.sort_unstable();
    assert_eq!(inserted, (0..250).collect::<Vec<_>>());
    for key in 0..10 {
        assert_eq!(bumps[&key], vec![1, 2, 3], "key {key} in commit order");
    }
    let last = all.iter().max_by_key(|e| position(e)).unwrap();
    assert_eq!(
        last["source"]["gtid"]
            .as_str()
            .map(|g| g.starts_with("0-2-")),
        Some(true)
    );
    assert_eq!(last["source"]["file"], "binlog.000001", "{last}");
    let on_replica = pipeline.stored_offset().expect("an offset file");
    assert!(
        on_replica.contains("server_id=2\n") && on_replica.contains("index_base="),
        "{on_replica}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_id_another_replica_uses_is_refused_with_exit_2() -> anyhow::Result<()> {
    let primary = Mariadb::start().await?;
    let _replica = Mariadb::start_replica_of(&primary, MYSQL_SERVER_ID).await?;
    // MariaDB lists its replicas only to REPLICATION MASTER ADMIN.
    primary
        .execute(&format!(
            "GRANT REPLICATION MASTER ADMIN ON *.* TO '{MYSQL_USER}'@'127.0.0.1'"
        ))
        .await?;
    let mut pipeline = start_on(primary).await?;
    pipeline
        .tributary
        .expect_failure(2, "source.mysql.server_id", WAIT)
        .await?;
    let stderr = pipeline.tributary.stderr();
    assert!(
        stderr.contains(&format!("{MYSQL_SERVER_ID} is in use by another replica")),
        "{stderr}"
    );

    // An unused id streams; after a kill -9 the server may still list the
    // dead run under that id, and the restart must not refuse itself.
    let other = (MYSQL_SERVER_ID + 1).to_string();
    let env = [("TRIBUTARY__SOURCE__MYSQL__SERVER_ID", other.as_str())];
    pipeline.tributary = TributaryProcess::run(&pipeline.config.path, &env)?;
    pipeline
        .tributary
        .wait_for_log(MYSQL_STREAMING_LOG, WAIT)
        .await?;
    let mut root = pipeline.db.root().await?;
    let hosts: Vec<mysql_async::Row> = root.query("SHOW SLAVE HOSTS").await?;
    assert!(
        hosts
            .iter()
            .any(|row| row.get::<u32, _>(0) == Some(MYSQL_SERVER_ID + 1)
                && row.get::<String, _>(1).as_deref() == Some("tributary:shop")),
        "the connector registers under its own host name"
    );
    pipeline.tributary.kill9().await?;
    pipeline.tributary = TributaryProcess::run(&pipeline.config.path, &env)?;
    pipeline
        .tributary
        .wait_for_log(MYSQL_STREAMING_LOG, WAIT)
        .await?;
    pipeline
        .db
        .execute("INSERT INTO items VALUES (1, 1)")
        .await?;
    pipeline.wait_for_records(STREAM, 1, WAIT).await?;
    Ok(())
}

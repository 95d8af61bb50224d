//! A silent network partition to MariaDB (issue 9, items 4 and 5):
//! tributary reaches the server through a [`FaultProxy`] that, when
//! paused, stops forwarding without closing anything. The binlog session
//! asks the server for a heartbeat every
//! `source.mysql.heartbeat_interval_secs` and must take the connection for
//! dead twice that after the last word heard, keep reconnecting with
//! backoff while the partition lasts (each connect bounded), and once it
//! heals deliver every row committed before, during and after it.
//! `/readyz` answers 503 (source not connected) while it lasts.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use tributary_integration_tests::http_probe::wait_status;
use tributary_integration_tests::{
    DEFAULT_DATABASE, FaultProxy, MYSQL_PASSWORD, MYSQL_USER, Mariadb, MysqlPipeline,
};

const STREAM: &str = "mysql-dead-peer-cdc";
/// `source.mysql.heartbeat_interval_secs` for this test.
const HEARTBEAT_SECS: u64 = 1;
/// What detection may take beyond the deadline: the log line, polling.
const DETECT_SLACK: Duration = Duration::from_secs(3);

async fn insert(db: &Mariadb, from: u32, to: u32) -> Result<()> {
    let values: Vec<String> = (from..=to).map(|id| format!("({id})")).collect();
    db.execute(&format!("INSERT INTO items VALUES {}", values.join(",")))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_detected_within_twice_the_heartbeat_and_nothing_is_lost()
-> Result<()> {
    let db = Mariadb::start().await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], db.port()))).await?;
    let extra = format!(
        "[source]\nurl = \"mysql://{MYSQL_USER}:{MYSQL_PASSWORD}@{}/{DEFAULT_DATABASE}\"\n\
         [source.mysql]\nheartbeat_interval_secs = {HEARTBEAT_SECS}\n",
        proxy.addr()
    );
    let mut pipeline = MysqlPipeline::start_on(
        db,
        STREAM,
        2,
        "CREATE TABLE shop.items (id int PRIMARY KEY)",
        &extra,
    )
    .await?;
    pipeline
        .tributary
        .wait_for_log("streaming changes from mysql", Duration::from_secs(30))
        .await?;
    insert(&pipeline.db, 1, 100).await?;
    pipeline.settled(STREAM, Duration::from_secs(30)).await?;
    let http = pipeline.config.http_addr;
    wait_status(http, "/readyz", 200, Duration::from_secs(10)).await?;
    // Quiet and healthy: the server's heartbeats keep a live session
    // from being taken for dead.
    tokio::time::sleep(Duration::from_secs(HEARTBEAT_SECS * 4)).await;
    let logs = pipeline.tributary.logs();
    assert!(
        !logs.contains("heartbeat_interval_secs"),
        "a live, idle session was taken for dead\n{logs}"
    );

    // The partition: nothing is forwarded, nothing is closed.
    proxy.pause();
    let paused_at = Instant::now();
    insert(&pipeline.db, 101, 200).await?;
    let deadline = Duration::from_secs(HEARTBEAT_SECS * 2);
    pipeline
        .tributary
        .wait_for_log("heartbeat_interval_secs", deadline + DETECT_SLACK)
        .await?;
    let detected = paused_at.elapsed();
    eprintln!("silent partition detected after {detected:?}");
    // The deadline runs from the last word heard, at most one heartbeat
    // before the pause.
    assert!(
        detected >= deadline / 2,
        "detected before the deadline could pass ({detected:?})"
    );
    // Reconnects fail while it lasts, the process keeps running, and
    // /readyz says the source is not connected.
    let not_ready = wait_status(http, "/readyz", 503, Duration::from_secs(5)).await?;
    assert!(
        not_ready.contains("\"source_connected\":false"),
        "{not_ready}"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        pipeline.tributary.try_exit()?.is_none(),
        "tributary exited during the partition\n{}",
        pipeline.tributary.logs()
    );
    insert(&pipeline.db, 201, 300).await?;

    // Healed: the pipeline resumes by itself and catches up.
    proxy.resume();
    insert(&pipeline.db, 301, 400).await?;
    let records = pipeline.settled(STREAM, Duration::from_secs(60)).await?;
    wait_status(http, "/readyz", 200, Duration::from_secs(10)).await?;
    let mut ids = BTreeSet::new();
    for record in &records {
        let envelope: serde_json::Value = serde_json::from_slice(&record.data)?;
        ids.insert(envelope["after"]["id"].as_i64().unwrap_or(-1));
    }
    assert_eq!(
        ids,
        (1..=400).collect::<BTreeSet<i64>>(),
        "rows lost or invented\n{}",
        pipeline.tributary.logs()
    );
    let logs = pipeline.tributary.logs();
    assert!(
        logs.contains("binlog session failed; reconnecting"),
        "{logs}"
    );
    Ok(())
}

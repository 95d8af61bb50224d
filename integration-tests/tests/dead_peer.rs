//! A silent network partition to Postgres (issue 9, item 5): tributary
//! reaches the server through a [`FaultProxy`] that, when paused, stops
//! forwarding without closing anything, so no error and no end of stream
//! ever arrives. The session must take the connection for dead within
//! `source.postgres.read_timeout_secs`, keep reconnecting with backoff
//! while the partition lasts (connects time out too), and once it heals
//! deliver every change committed before, during and after it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tributary_integration_tests::consumer::assert_replica_matches;
use tributary_integration_tests::{DEFAULT_DATABASE, FAST_QUOTA, FaultProxy, Servers, USER};

const STREAM: &str = "dead-peer-cdc";
/// `source.postgres.read_timeout_secs` for this test.
const READ_TIMEOUT_SECS: u64 = 3;
/// What detection may take beyond the deadline: the log line, polling.
const DETECT_SLACK: Duration = Duration::from_secs(3);

async fn insert(db: &tokio_postgres::Client, from: i32, to: i32) -> Result<()> {
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, md5(g::text) FROM generate_series({from}, {to}) g"
    ))
    .await
    .with_context(|| format!("inserting rows {from}..={to}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_detected_within_the_read_timeout_and_nothing_is_lost() -> Result<()>
{
    let servers = Servers::start(
        STREAM,
        2,
        "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)",
    )
    .await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], servers.pg.port()))).await?;
    let extra = format!(
        "[source]\nurl = \"postgres://{USER}@{}/{DEFAULT_DATABASE}?connect_timeout=2\"\n\
         [source.postgres]\nread_timeout_secs = {READ_TIMEOUT_SECS}\n{FAST_QUOTA}",
        proxy.addr()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    // The test's own connection goes straight to the server.
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    insert(&db, 1, 100).await?;
    let before = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(before, Duration::from_secs(30))
        .await?;
    // Quiet and healthy: server keepalives (answers to the connector's
    // heartbeat) keep a live session from being taken for dead.
    tokio::time::sleep(Duration::from_secs(READ_TIMEOUT_SECS * 2)).await;
    let logs = pipeline.tributary.logs();
    assert!(
        !logs.contains("read_timeout_secs"),
        "a live, idle session was taken for dead\n{logs}"
    );

    // The partition: nothing is forwarded, nothing is closed.
    proxy.pause();
    let paused_at = Instant::now();
    insert(&db, 101, 200).await?;
    pipeline
        .tributary
        .wait_for_log(
            "read_timeout_secs",
            Duration::from_secs(READ_TIMEOUT_SECS) + DETECT_SLACK,
        )
        .await?;
    let detected = paused_at.elapsed();
    eprintln!("silent partition detected after {detected:?}");
    // The deadline runs from the last message heard, at most one heartbeat
    // (a third of it) before the pause.
    assert!(
        detected >= Duration::from_secs(READ_TIMEOUT_SECS) / 2,
        "detected before the deadline could pass ({detected:?})"
    );
    // Reconnects fail while it lasts, each bounded by connect_timeout, and
    // the process keeps running.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        pipeline.tributary.try_exit()?.is_none(),
        "tributary exited during the partition\n{}",
        pipeline.tributary.logs()
    );
    insert(&db, 201, 300).await?;

    // Healed: the pipeline resumes by itself and catches up.
    proxy.resume();
    insert(&db, 301, 400).await?;
    let after = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(after, Duration::from_secs(60))
        .await?;
    let records = pipeline.kin.read_all(STREAM).await?;
    assert_replica_matches(&db, &records, "public.items", &["id"])
        .await
        .with_context(|| pipeline.tributary.logs())?;
    let logs = pipeline.tributary.logs();
    assert!(
        logs.contains("replication session failed; reconnecting"),
        "{logs}"
    );
    Ok(())
}

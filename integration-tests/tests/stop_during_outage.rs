//! SIGTERM while Kinesis is down (issue 7, item 7): kinesalite sits behind
//! a paused [`FaultProxy`] and a backlog far larger than
//! `sink.max_in_flight_bytes` is committed, so the reader waits for budget
//! the sink never gives back. A SIGTERM must still stop the process within
//! `sink.drain_timeout_secs` (plus start-up slack), with exit code 1 (work
//! was left), without acknowledging anything committed during the outage;
//! once Kinesis is back, a restart delivers every change.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tributary_integration_tests::{DEFAULT_DATABASE, FaultProxy, Pipeline, Servers, StreamRecord};

const STREAM: &str = "stop-outage-cdc";
/// `sink.drain_timeout_secs` for this test.
const DRAIN_SECS: u64 = 3;
/// What the exit may take beyond the drain timeout: the signal, closing
/// the replication connection, the process exit.
const EXIT_SLACK: Duration = Duration::from_secs(7);
const WARMUP_ROWS: i32 = 20;
const TRANSACTIONS: i32 = 8;
const ROWS_PER_TRANSACTION: i32 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_outage_stops_within_the_drain_timeout_and_a_restart_delivers()
-> Result<()> {
    let (servers, proxy) =
        servers_behind_proxy("CREATE TABLE items (id int PRIMARY KEY, pad text NOT NULL)").await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\nmax_in_flight_bytes = 1048576\n\
         drain_timeout_secs = {DRAIN_SECS}\n\
         [sink.quota]\nrecords_per_shard_per_sec = 50000\nbytes_per_shard_per_sec = 100000000\n",
        proxy.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = warm_up(
        &pipeline,
        &format!("INSERT INTO items SELECT g, 'warm' FROM generate_series(1, {WARMUP_ROWS}) g"),
    )
    .await?;

    // The outage: ~4 MB of rows against a 1 MiB budget.
    proxy.pause();
    let confirmed_at_pause = pipeline.confirmed_flush_lsn().await?;
    for t in 0..TRANSACTIONS {
        let first = 1_000 + t * ROWS_PER_TRANSACTION;
        let last = first + ROWS_PER_TRANSACTION - 1;
        db.batch_execute(&format!(
            "INSERT INTO items SELECT g, repeat(md5(g::text), 30) FROM generate_series({first}, {last}) g"
        ))
        .await?;
    }
    // Let the reader fill the budget and stall on it.
    tokio::time::sleep(Duration::from_secs(2)).await;

    sigterm_expecting_work_left(&mut pipeline).await?;
    assert!(
        pipeline
            .tributary
            .logs()
            .contains("stopped before every record was delivered"),
        "{}",
        pipeline.tributary.logs()
    );
    assert_eq!(
        pipeline.confirmed_flush_lsn().await?,
        confirmed_at_pause,
        "nothing committed during the outage was acknowledged"
    );

    // Kinesis is back: a restart sends everything.
    proxy.resume();
    pipeline.restart().await?;
    let every_row = (1..=i64::from(WARMUP_ROWS))
        .chain((0..i64::from(TRANSACTIONS * ROWS_PER_TRANSACTION)).map(|i| 1_000 + i));
    let records = pipeline
        .kin
        .wait_for_ids(STREAM, every_row, Duration::from_secs(120))
        .await?;
    let mut ids = HashSet::new();
    for record in &records {
        let envelope = record.json()?;
        ids.insert(envelope["after"]["id"].as_i64().unwrap_or(-1));
    }
    let expected: HashSet<i64> = (1..=i64::from(WARMUP_ROWS))
        .chain((0..i64::from(TRANSACTIONS * ROWS_PER_TRANSACTION)).map(|i| 1_000 + i))
        .collect();
    let missing: Vec<_> = expected.difference(&ids).take(10).collect();
    assert!(
        missing.is_empty(),
        "rows lost across the stop: {missing:?}..."
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// Many small transactions during the outage: each commit hands the sink a
/// batch of one record, so the queue between the source and the sink is
/// counted in batches, not bytes (it fills once the dispatcher itself waits,
/// e.g. to read the shard map again during a long outage). The stop must
/// not hang on any of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_outage_with_many_small_transactions_stops_in_time() -> Result<()> {
    const SMALL_TRANSACTIONS: i32 = 3_000;
    let (servers, proxy) =
        servers_behind_proxy("CREATE TABLE items (id int PRIMARY KEY, pad text NOT NULL)").await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\ndrain_timeout_secs = {DRAIN_SECS}\n\
         [sink.quota]\nrecords_per_shard_per_sec = 50000\nbytes_per_shard_per_sec = 100000000\n",
        proxy.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = warm_up(&pipeline, "INSERT INTO items VALUES (0, 'warm')").await?;

    proxy.pause();
    let confirmed_at_pause = pipeline.confirmed_flush_lsn().await?;
    db.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{SMALL_TRANSACTIONS} LOOP \
         INSERT INTO items VALUES (i, 'small'); COMMIT; END LOOP; END $$"
    ))
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    sigterm_expecting_work_left(&mut pipeline).await?;
    assert_eq!(
        pipeline.confirmed_flush_lsn().await?,
        confirmed_at_pause,
        "nothing committed during the outage was acknowledged"
    );

    proxy.resume();
    pipeline.restart().await?;
    let records = pipeline
        .kin
        .wait_for_ids(
            STREAM,
            0..=i64::from(SMALL_TRANSACTIONS),
            Duration::from_secs(120),
        )
        .await?;
    assert_every_row(&records, 0..=i64::from(SMALL_TRANSACTIONS))?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// SIGTERM while an initial snapshot waits for budget that an unreachable
/// Kinesis never gives back: the stop takes the drain timeout, not forever,
/// and the next start copies the table again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_snapshot_while_kinesis_is_down_stops_in_time() -> Result<()> {
    const ROWS: i32 = 4_000;
    let (servers, proxy) = servers_behind_proxy(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, pad text NOT NULL); \
             INSERT INTO items SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, {ROWS}) g"
    ))
    .await?;
    // A slow quota keeps the copy going for a while: the outage starts
    // once it is under way (start-up itself needs Kinesis).
    let extra = format!(
        "[source]\nsnapshot = \"initial\"\n\
         [sink]\nendpoint_url = \"{}\"\nmax_in_flight_bytes = 1048576\n\
         drain_timeout_secs = {DRAIN_SECS}\n\
         [sink.quota]\nrecords_per_shard_per_sec = 200\nbytes_per_shard_per_sec = 100000000\n",
        proxy.endpoint()
    );
    let mut pipeline = servers.start_tributary_without_waiting(&extra).await?;
    pipeline
        .tributary
        .wait_for_log(
            "snapshot: copying the captured tables",
            Duration::from_secs(60),
        )
        .await?;
    proxy.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;

    sigterm_expecting_work_left(&mut pipeline).await?;

    proxy.resume();
    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let records = pipeline
        .kin
        .wait_for_ids(STREAM, 1..=i64::from(ROWS), Duration::from_secs(120))
        .await?;
    assert_every_row(&records, 1..=i64::from(ROWS))?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// SIGTERM during an outage: the process must exit within the drain
/// timeout (plus slack), with exit code 1 because work was left.
async fn sigterm_expecting_work_left(pipeline: &mut Pipeline) -> Result<()> {
    let signalled = Instant::now();
    let status = pipeline
        .tributary
        .sigterm_and_wait(Duration::from_secs(DRAIN_SECS) + EXIT_SLACK)
        .await?;
    eprintln!(
        "stopped {:?} after SIGTERM with {status}",
        signalled.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "work was left, so the exit code says so\n{}",
        pipeline.tributary.logs()
    );
    Ok(())
}

/// Every id of `expected` is the `after.id` of some record.
fn assert_every_row(
    records: &[StreamRecord],
    expected: impl IntoIterator<Item = i64>,
) -> Result<()> {
    let ids: HashSet<i64> = records
        .iter()
        .map(|r| -> Result<i64> { r.json()?["after"]["id"].as_i64().context("an id") })
        .collect::<Result<_>>()?;
    let missing: Vec<i64> = expected
        .into_iter()
        .filter(|id| !ids.contains(id))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "rows lost across the stop: {missing:?}");
    Ok(())
}

/// Postgres with `setup_sql` and a 2-shard stream, and a proxy in front of
/// kinesalite whose pause is the outage.
async fn servers_behind_proxy(setup_sql: &str) -> Result<(Servers, FaultProxy)> {
    let servers = Servers::start(STREAM, 2, setup_sql).await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], servers.kin.port()))).await?;
    Ok((servers, proxy))
}

/// Runs `sql` and waits until the slot confirmed it: the pipeline streams
/// and Kinesis is reachable. Returns the client for the test's writes.
async fn warm_up(pipeline: &Pipeline, sql: &str) -> Result<tokio_postgres::Client> {
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(sql).await?;
    let warmed_up = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(warmed_up, Duration::from_secs(60))
        .await?;
    Ok(db)
}

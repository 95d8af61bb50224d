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

use anyhow::Result;
use tributary_integration_tests::{DEFAULT_DATABASE, FaultProxy, Servers};

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
    let servers = Servers::start(
        STREAM,
        2,
        "CREATE TABLE items (id int PRIMARY KEY, pad text NOT NULL)",
    )
    .await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], servers.kin.port()))).await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\nmax_in_flight_bytes = 1048576\n\
         drain_timeout_secs = {DRAIN_SECS}\n\
         [sink.quota]\nrecords_per_shard_per_sec = 50000\nbytes_per_shard_per_sec = 100000000\n",
        proxy.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 'warm' FROM generate_series(1, {WARMUP_ROWS}) g"
    ))
    .await?;
    let warmed_up = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(warmed_up, Duration::from_secs(60))
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

    let signalled = Instant::now();
    let status = pipeline
        .tributary
        .sigterm_and_wait(Duration::from_secs(DRAIN_SECS) + EXIT_SLACK)
        .await?;
    let took = signalled.elapsed();
    eprintln!("stopped {took:?} after SIGTERM with {status}");
    assert_eq!(
        status.code(),
        Some(1),
        "work was left, so the exit code says so\n{}",
        pipeline.tributary.logs()
    );
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
    let total = (WARMUP_ROWS + TRANSACTIONS * ROWS_PER_TRANSACTION) as usize;
    let records = pipeline
        .kin
        .wait_for_records(STREAM, total, Duration::from_secs(120))
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

//! SIGTERM while Kinesis is down, MySQL source (issue 7, item 7): the same
//! as `stop_during_outage.rs` on a real MariaDB. The backlog is committed
//! behind a paused [`FaultProxy`] against a 1 MiB budget; SIGTERM must stop
//! the process within `sink.drain_timeout_secs` with exit code 1, the
//! stored offset must not move past what was delivered, and a restart with
//! Kinesis back delivers every row.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tributary_integration_tests::{
    FaultProxy, Kinesalite, Mariadb, MysqlPipeline, TributaryProcess, write_mysql_config,
};

const STREAM: &str = "mysql-stop-outage-cdc";
const DRAIN_SECS: u64 = 3;
const EXIT_SLACK: Duration = Duration::from_secs(7);
const ROWS: u32 = 4_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_an_outage_stops_within_the_drain_timeout_and_a_restart_delivers()
-> Result<()> {
    let db = Mariadb::start().await?;
    let kin = Kinesalite::start().await?;
    kin.create_stream(STREAM, 2).await?;
    db.execute("CREATE TABLE items (id INT PRIMARY KEY, pad TEXT NOT NULL)")
        .await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], kin.port()))).await?;
    let dir = tempfile::tempdir()?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\nmax_in_flight_bytes = 1048576\n\
         drain_timeout_secs = {DRAIN_SECS}\n",
        proxy.endpoint()
    );
    let config = write_mysql_config(dir.path(), &db, &kin, STREAM, &extra)?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_for_log("streaming changes from mysql", Duration::from_secs(30))
        .await?;
    let mut pipeline = MysqlPipeline {
        tributary,
        config,
        dir,
        kin,
        db,
    };
    pipeline
        .db
        .execute("INSERT INTO items VALUES (1, 'warm')")
        .await?;
    pipeline
        .wait_for_records(STREAM, 1, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let offset_at_pause = pipeline.stored_offset();

    // ~4 MB in 8 transactions against a 1 MiB budget, Kinesis black-holed.
    proxy.pause();
    for t in 0..8 {
        let first = 1_000 + t * ROWS / 8;
        let last = first + ROWS / 8 - 1;
        pipeline
            .db
            .execute(&format!(
                "INSERT INTO items SELECT seq, REPEAT(MD5(seq), 30) FROM seq_{first}_to_{last}"
            ))
            .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let status = pipeline
        .tributary
        .sigterm_and_wait(Duration::from_secs(DRAIN_SECS) + EXIT_SLACK)
        .await?;
    assert_eq!(status.code(), Some(1), "{}", pipeline.tributary.logs());
    assert_eq!(
        pipeline.stored_offset(),
        offset_at_pause,
        "nothing committed during the outage was acknowledged"
    );

    proxy.resume();
    pipeline.restart().await?;
    let records = pipeline
        .kin
        .wait_for_ids(
            STREAM,
            1_000..1_000 + i64::from(ROWS),
            Duration::from_secs(120),
        )
        .await?;
    let ids: HashSet<i64> = records
        .iter()
        .map(|r| -> Result<i64> { r.json()?["after"]["id"].as_i64().context("an id") })
        .collect::<Result<_>>()?;
    let missing: Vec<i64> = (1_000..1_000 + i64::from(ROWS))
        .filter(|id| !ids.contains(id))
        .take(10)
        .collect();
    assert!(missing.is_empty(), "rows lost across the stop: {missing:?}");
    pipeline.stop_gracefully().await?;
    Ok(())
}

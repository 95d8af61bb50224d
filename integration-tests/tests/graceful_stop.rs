//! SIGTERM flushes, acknowledges and exits 0; a restart sends nothing twice.

use std::collections::HashSet;
use std::time::Duration;

use tributary_integration_tests::{DEFAULT_DATABASE, Pipeline};

const STREAM: &str = "graceful-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acknowledges_everything_and_a_restart_sends_nothing_twice() -> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE items (id int PRIMARY KEY, n int)",
        "",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    for i in 0..300 {
        db.execute("INSERT INTO items VALUES ($1, $1)", &[&i])
            .await?;
    }
    pipeline
        .kin
        .wait_for_records(STREAM, 300, Duration::from_secs(60))
        .await?;
    // A multi-row transaction, likely in flight while the signal arrives
    // (hence twice the usual time to stop).
    db.batch_execute("INSERT INTO items SELECT g, g FROM generate_series(1000, 1999) g")
        .await?;
    pipeline
        .tributary
        .stop_gracefully(Duration::from_secs(60))
        .await?;
    let acked_at_stop = pipeline.confirmed_flush_lsn().await?;

    // Whatever was read before the stop is in the stream and acknowledged
    // (whole transactions only): a restart must not send any of it again.
    let first = pipeline.kin.read_all(STREAM).await?;
    assert!(
        first.len() == 300 || first.len() == 1300,
        "the stop flushed whole transactions: {} records",
        first.len()
    );

    pipeline.restart().await?;
    for i in 300..310 {
        db.execute("INSERT INTO items VALUES ($1, $1)", &[&i])
            .await?;
    }
    let all = pipeline
        .kin
        .wait_for_records(STREAM, 1310, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = if all.len() == 1310 {
        pipeline.kin.read_all(STREAM).await?
    } else {
        all
    };
    let mut ids = HashSet::new();
    for record in &all {
        let envelope = record.json()?;
        let id = envelope["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} was sent twice");
    }
    assert_eq!(all.len(), 1310);
    pipeline.stop_gracefully().await?;
    let acked_after = pipeline.confirmed_flush_lsn().await?;
    assert_ne!(
        acked_at_stop, acked_after,
        "the second run acknowledged its transactions too"
    );
    Ok(())
}

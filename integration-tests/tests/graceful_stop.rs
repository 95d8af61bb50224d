//! SIGTERM flushes, acknowledges and exits 0; a restart sends nothing twice.

use std::collections::HashSet;
use std::time::Duration;

use tributary_integration_tests::{
    DEFAULT_DATABASE, Kinesalite, Postgres, SLOT, TributaryProcess, write_config,
};

const STREAM: &str = "graceful-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_acknowledges_everything_and_a_restart_sends_nothing_twice() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let kin = Kinesalite::start().await?;
    kin.create_stream(STREAM, 2).await?;
    pg.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
        .await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &pg, &kin, STREAM, "")?;

    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_streaming(&pg, SLOT, Duration::from_secs(30))
        .await?;
    let db = pg.client(DEFAULT_DATABASE).await?;
    for i in 0..300 {
        db.execute("INSERT INTO items VALUES ($1, $1)", &[&i])
            .await?;
    }
    kin.wait_for_records(STREAM, 300, Duration::from_secs(60))
        .await?;
    // A multi-row transaction, likely in flight while the signal arrives.
    db.batch_execute("INSERT INTO items SELECT g, g FROM generate_series(1000, 1999) g")
        .await?;
    tributary.sigterm()?;
    let status = tributary.wait_exit(Duration::from_secs(60)).await?;
    assert!(
        status.success(),
        "SIGTERM exits 0: {status}\n{}",
        tributary.logs()
    );
    let acked_at_stop: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await?
        .get(0);

    // Whatever was read before the stop is in the stream and acknowledged
    // (whole transactions only): a restart must not send any of it again.
    let first = kin.read_all(STREAM).await?;
    assert!(
        first.len() == 300 || first.len() == 1300,
        "the stop flushed whole transactions: {} records",
        first.len()
    );

    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_streaming(&pg, SLOT, Duration::from_secs(30))
        .await?;
    for i in 300..310 {
        db.execute("INSERT INTO items VALUES ($1, $1)", &[&i])
            .await?;
    }
    let all = kin
        .wait_for_records(STREAM, 1310, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = if all.len() == 1310 {
        kin.read_all(STREAM).await?
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
    tributary.sigterm()?;
    assert!(
        tributary
            .wait_exit(Duration::from_secs(30))
            .await?
            .success()
    );
    let acked_after: String = db
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await?
        .get(0);
    assert_ne!(
        acked_at_stop, acked_after,
        "the second run acknowledged its transactions too"
    );
    Ok(())
}

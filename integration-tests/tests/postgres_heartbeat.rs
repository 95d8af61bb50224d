//! The idle-slot heartbeat (issue 9, item 4): with
//! `source.postgres.heartbeat_interval_secs`, tributary writes a
//! non-transactional logical message into the captured database's WAL
//! every interval. While the captured database is idle and another
//! database of the cluster writes WAL, the slot's `confirmed_flush_lsn`
//! keeps up with the cluster, the messages are in the WAL (a second,
//! probing slot that asks pgoutput for messages sees them), and nothing
//! reaches the stream for them.

use std::time::Duration;

use anyhow::{Context, Result};
use tributary_integration_tests::{DEFAULT_DATABASE, PUBLICATION, Servers};

const STREAM: &str = "heartbeat-cdc";
/// A slot of the test's own that decodes the same WAL with messages on.
const PROBE_SLOT: &str = "heartbeat_probe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_advance_an_idle_slot_and_send_nothing_to_the_stream() -> Result<()> {
    let servers = Servers::start(
        STREAM,
        1,
        &format!(
            "CREATE TABLE items (id int PRIMARY KEY); \
             CREATE PUBLICATION {PUBLICATION} FOR TABLE items"
        ),
    )
    .await?;
    servers.pg.create_database("busy").await?;
    let db = servers.pg.client(DEFAULT_DATABASE).await?;
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&PROBE_SLOT],
    )
    .await
    .context("creating the probe slot")?;
    let pipeline = servers
        .start_tributary("[source.postgres]\nheartbeat_interval_secs = 1\n")
        .await?;
    db.batch_execute("INSERT INTO items VALUES (1)").await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 1, Duration::from_secs(30))
        .await
        .with_context(|| pipeline.tributary.logs())?;

    // The captured database idles; another one of the cluster writes.
    let busy = pipeline.pg.client("busy").await?;
    busy.batch_execute("CREATE TABLE churn (id int)").await?;
    for round in 0..8 {
        busy.batch_execute(&format!(
            "INSERT INTO churn SELECT g FROM generate_series(1, 1000) g -- {round}"
        ))
        .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let written = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(written, Duration::from_secs(20))
        .await
        .with_context(|| pipeline.tributary.logs())?;

    let heartbeats: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2, 'messages', 'true') \
             WHERE substring(data FROM 1 FOR 1) = '\\x4d'::bytea \
               AND position('tributary'::bytea IN data) > 0",
            &[&PROBE_SLOT, &PUBLICATION],
        )
        .await
        .context("peeking at the probe slot")?
        .get(0);
    assert!(
        heartbeats >= 3,
        "{heartbeats} heartbeat messages in 4 s at one a second"
    );
    db.execute("SELECT pg_drop_replication_slot($1)", &[&PROBE_SLOT])
        .await?;
    let records = pipeline.kin.read_all(STREAM).await?;
    assert_eq!(records.len(), 1, "heartbeats reached the stream");
    Ok(())
}

//! An idle connector still moves its slot (keepalives confirm the server's
//! WAL end when nothing is in flight), and `tributary tail` prints every
//! envelope of a stream as JSON Lines.

use std::time::Duration;

use serde_json::Value;
use tributary_integration_tests::{
    DEFAULT_DATABASE, Kinesalite, Postgres, SLOT, TributaryProcess, write_config,
};

const STREAM: &str = "idle-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_of_uncaptured_tables_does_not_pin_the_slot_and_tail_prints_the_stream()
-> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let kin = Kinesalite::start().await?;
    kin.create_stream(STREAM, 2).await?;
    pg.execute(
        "CREATE TABLE captured (id int PRIMARY KEY); CREATE TABLE ignored (id int, pad text)",
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &pg,
        &kin,
        STREAM,
        "[source]\ntables = [\"public.captured\"]\n",
    )?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_streaming(&pg, SLOT, Duration::from_secs(30))
        .await?;
    let db = pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute("INSERT INTO captured SELECT generate_series(1, 25)")
        .await?;
    kin.wait_for_records(STREAM, 25, Duration::from_secs(30))
        .await?;

    // Lots of WAL that the publication does not carry.
    for _ in 0..20 {
        db.batch_execute(
            "INSERT INTO ignored SELECT g, repeat('x', 200) FROM generate_series(1, 500) g",
        )
        .await?;
    }
    let target: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let caught_up: bool = db
            .query_one(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
                &[&SLOT, &target],
            )
            .await?
            .get(0);
        if caught_up {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle slot's confirmed_flush_lsn did not reach {target}\n{}",
            tributary.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        kin.read_all(STREAM).await?.len(),
        25,
        "uncaptured tables send nothing"
    );

    // tail: every envelope, one per line, then exit 0 at the end of the shards.
    let mut tail = TributaryProcess::spawn(
        &[
            "tail",
            "-c",
            config.path.to_str().unwrap(),
            "--stream",
            STREAM,
            "--from",
            "trim-horizon",
        ],
        &[],
        dir.path(),
    )?;
    let status = tail.wait_exit(Duration::from_secs(60)).await?;
    assert!(
        status.success(),
        "tail exits 0 at the end: {status}\n{}",
        tail.logs()
    );
    let lines: Vec<Value> = tail
        .stdout()
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 25);
    let mut ids: Vec<i64> = lines
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, (1..=25).collect::<Vec<_>>());
    assert!(
        lines
            .iter()
            .all(|e| e["op"] == "insert" && e["source"]["table"] == "captured")
    );

    tributary.sigterm()?;
    assert!(
        tributary
            .wait_exit(Duration::from_secs(30))
            .await?
            .success()
    );
    Ok(())
}

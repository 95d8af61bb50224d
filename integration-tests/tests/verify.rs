//! `tributary verify` against a real PostgreSQL and kinesalite: a healthy
//! pipeline (Kinesis refusing a fraction of the entries it is sent)
//! matches; changes lost while the slot was gone are named; a re-snapshot
//! repairs what it can.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::{Value, json};
use tributary_integration_tests::verify_report::{
    VerifyOutcome, assert_named, report_table, run_verify,
};
use tributary_integration_tests::{Faults, Pipeline, Servers};

const STREAM: &str = "verify-cdc";
const WAIT: Duration = Duration::from_secs(90);

const TABLES: &str = "
CREATE TABLE items (id int PRIMARY KEY, v text, n numeric, at timestamptz, tags text[]);
CREATE TABLE pairs (a text, b int, note text, PRIMARY KEY (a, b));
";

/// Runs `tributary verify` with `args`; its exit code, stdout and logs.
async fn verify(pipeline: &Pipeline, args: &[&str]) -> Result<VerifyOutcome> {
    // verify reads kinesalite itself, not through the fault injector.
    let endpoint = pipeline.kin.endpoint();
    let env = [("TRIBUTARY__SINK__ENDPOINT_URL", endpoint.as_str())];
    run_verify(&pipeline.config.path, pipeline.dir.path(), &env, args).await
}

/// Waits until the connector has acknowledged everything written so far.
async fn caught_up(pipeline: &Pipeline) -> Result<()> {
    let lsn = pipeline.pg.current_wal_lsn().await?;
    pipeline.wait_confirmed_flush(lsn, WAIT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_matches_a_healthy_pipeline_and_names_lost_changes() -> Result<()> {
    let servers = Servers::start(STREAM, 3, TABLES).await?;
    let (faults, mut pipeline) = servers
        .start_tributary_with_faults(Faults::rough(11))
        .await?;
    pipeline
        .pg
        .execute_each(&[
            "INSERT INTO items SELECT g, 'v' || g, g * 1.5, TIMESTAMPTZ '2026-01-01 00:00+02' \
             + g * INTERVAL '1 hour', ARRAY['a', NULL, 'c'] FROM generate_series(1, 200) g",
            "INSERT INTO pairs SELECT 'k' || (g % 7), g, NULL FROM generate_series(1, 50) g",
            "UPDATE items SET v = 'changed', n = n * 3 WHERE id % 3 = 0",
            "DELETE FROM items WHERE id % 10 = 0",
            // A key change: a delete of the old key and an insert of the new.
            "UPDATE items SET id = 1000 + id WHERE id IN (1, 2, 7)",
            "UPDATE pairs SET b = b + 100 WHERE b < 5",
            "TRUNCATE pairs",
            "INSERT INTO pairs VALUES ('after', 1, 'x'), ('after', 2, NULL)",
        ])
        .await?;
    caught_up(&pipeline).await?;
    let refused = faults
        .counts()
        .refused_entries
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(refused > 0, "the fault injector refused no entry");

    let (code, stdout, logs) = verify(&pipeline, &[]).await?;
    assert_eq!(code, Some(0), "{logs}");
    assert!(stdout.contains("source and stream match"), "{stdout}");
    assert!(stdout.contains("public.items"), "{stdout}");

    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(0), "{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["match"], true, "{report:#}");
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 2, "{report:#}");
    for (table, rows) in [("public.items", 180), ("public.pairs", 2)] {
        let found = report_table(&report, table);
        assert_eq!(found["source_rows"], rows, "{found:#}");
        assert_eq!(found["stream_rows"], rows, "{found:#}");
        assert_eq!(found["match"], true, "{found:#}");
    }

    // Changes made while there is no slot never reach the stream.
    pipeline.stop_gracefully().await?;
    pipeline
        .pg
        .execute_each(&[
            "SELECT pg_drop_replication_slot('tributary_shop')",
            "INSERT INTO items VALUES (5000, 'lost insert', 1, NULL, NULL)",
            "UPDATE items SET n = 42 WHERE id = 4",
            "DELETE FROM items WHERE id = 5",
            "UPDATE pairs SET note = 'lost' WHERE a = 'after' AND b = 2",
        ])
        .await?;
    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(1), "{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["match"], false, "{report:#}");
    let items = report_table(&report, "public.items");
    assert_named(
        items,
        &json!([{"id": 5000}]),
        &json!([{"id": 5}]),
        &json!([{"key": {"id": 4}, "column": "n"}]),
    );
    assert_eq!(
        (&items["source_rows"], &items["stream_rows"]),
        (&json!(180), &json!(180)),
        "{items:#}"
    );

    // --table narrows it down; the human report names the keys.
    let (code, stdout, logs) = verify(&pipeline, &["--table", "pairs"]).await?;
    assert_eq!(code, Some(1), "{logs}");
    assert!(!stdout.contains("public.items"), "{stdout}");
    assert!(
        stdout.contains(r#"public.pairs: different: {"a":"after","b":2} (column note)"#),
        "{stdout}"
    );
    assert!(stdout.contains("source and stream differ"), "{stdout}");

    // A table that is not captured is a usage mistake: exit 2.
    let (code, _, logs) = verify(&pipeline, &["--table", "public.nope"]).await?;
    assert_eq!(code, Some(2), "{logs}");
    assert!(logs.contains("--table"), "{logs}");

    // A re-snapshot (the slot is gone: the next start takes one) sends every
    // row again: missing and different rows are repaired; a row deleted while
    // nothing captured stays in the stream's replica.
    let text = std::fs::read_to_string(&pipeline.config.path)?;
    let resnapshot = text.replace("snapshot = \"never\"", "snapshot = \"initial\"");
    ensure!(
        resnapshot != text,
        "the test config sets snapshot = \"never\""
    );
    std::fs::write(&pipeline.config.path, resnapshot)?;
    pipeline.restart_with_timeout(WAIT).await?;
    caught_up(&pipeline).await?;
    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(1), "{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    let items = report_table(&report, "public.items");
    assert_eq!(
        (&items["missing"], &items["different"], &items["extra_keys"]),
        (&json!(0), &json!(0), &json!([{"id": 5}])),
        "{items:#}"
    );
    assert_eq!(
        report_table(&report, "public.pairs")["match"],
        true,
        "{report:#}"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

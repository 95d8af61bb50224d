//! An idle connector still moves its slot (keepalives confirm the server's
//! WAL end when nothing is in flight), and `tributary tail` prints every
//! envelope of a stream as JSON Lines.

use std::time::Duration;

use serde_json::Value;
use tributary_integration_tests::{DEFAULT_DATABASE, Pipeline, TributaryProcess};

const STREAM: &str = "idle-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_of_uncaptured_tables_does_not_pin_the_slot_and_tail_prints_the_stream()
-> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE captured (id int PRIMARY KEY); CREATE TABLE ignored (id int, pad text)",
        "[source]\ntables = [\"public.captured\"]\n",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute("INSERT INTO captured SELECT generate_series(1, 25)")
        .await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 25, Duration::from_secs(30))
        .await?;

    // Lots of WAL that the publication does not carry.
    for _ in 0..20 {
        db.batch_execute(
            "INSERT INTO ignored SELECT g, repeat('x', 200) FROM generate_series(1, 500) g",
        )
        .await?;
    }
    // The idle slot's confirmed_flush_lsn reaches the end of all that WAL.
    let target = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(target, Duration::from_secs(30))
        .await?;
    assert_eq!(
        pipeline.kin.read_all(STREAM).await?.len(),
        25,
        "uncaptured tables send nothing"
    );

    // tail: every envelope, one per line, then exit 0 at the end of the shards.
    let mut tail = TributaryProcess::spawn(
        &[
            "tail",
            "-c",
            pipeline.config.path.to_str().unwrap(),
            "--stream",
            STREAM,
            "--from",
            "trim-horizon",
        ],
        &[],
        pipeline.dir.path(),
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

    // tail --validate: every envelope conforms; then a record that is not
    // an envelope makes it exit 1 naming the record's id.
    let validate = |pipeline: &tributary_integration_tests::Pipeline| {
        TributaryProcess::spawn(
            &[
                "tail",
                "-c",
                pipeline.config.path.to_str().unwrap(),
                "--stream",
                STREAM,
                "--validate",
            ],
            &[],
            pipeline.dir.path(),
        )
    };
    let mut tail = validate(&pipeline)?;
    let status = tail.wait_exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "{status}\n{}", tail.logs());
    assert!(
        tail.stderr().contains("validated 25 envelopes: all valid"),
        "{}",
        tail.logs()
    );
    assert_eq!(tail.stdout().lines().count(), 25, "lines pass through");
    pipeline
        .kin
        .client()
        .put_record()
        .stream_name(STREAM)
        .partition_key("public.captured:99")
        .data(aws_sdk_kinesis::primitives::Blob::new(
            r#"{"v":1,"id":"shop:forged","op":"upsert"}"#,
        ))
        .send()
        .await?;
    let mut tail = validate(&pipeline)?;
    let status = tail.wait_exit(Duration::from_secs(60)).await?;
    assert_eq!(status.code(), Some(1), "{}", tail.logs());
    let stderr = tail.stderr();
    assert!(
        stderr.contains("invalid envelope \"shop:forged\"")
            && stderr.contains("validated 26 envelopes: 1 invalid"),
        "{stderr}"
    );

    pipeline.stop_gracefully().await?;
    Ok(())
}

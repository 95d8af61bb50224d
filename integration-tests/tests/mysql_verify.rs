//! `tributary verify` against a real MariaDB row binlog and kinesalite: a
//! healthy pipeline (Kinesis refusing a fraction of the entries) matches (rows that reached the stream through the
//! binlog compare byte for byte with the same rows read as the snapshot
//! reads them); changes skipped by moving the offset forward are named.

use std::time::Duration;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;

use anyhow::{Result, ensure};
use aws_sdk_kinesis::primitives::{DateTime, DateTimeFormat};
use mysql_async::prelude::Queryable as _;
use serde_json::{Value, json};
use tributary_integration_tests::verify_report::{
    VerifyOutcome, assert_named, report_table, run_verify,
};
use tributary_integration_tests::{FAST_QUOTA, Faults, KinesisFaults, MysqlPipeline};

const STREAM: &str = "verify-mysql";
const WAIT: Duration = Duration::from_secs(90);

const TABLES: &str = r#"
CREATE TABLE items (
    id INT PRIMARY KEY, v VARCHAR(40), n DECIMAL(12,3), at DATETIME(6), ts TIMESTAMP(3) NULL,
    f FLOAT, d DOUBLE, js JSON, en ENUM('s','m','l'), st SET('a','b','c'), b BLOB,
    u BIGINT UNSIGNED, lat VARCHAR(10) CHARACTER SET latin1
) DEFAULT CHARSET = utf8mb4;
CREATE TABLE pairs (a VARCHAR(10), b INT, note TEXT, PRIMARY KEY (a, b));
CREATE TABLE logbook (msg VARCHAR(20), at INT);
"#;

/// Runs `tributary verify` with `args`; its exit code, stdout and logs.
async fn verify(pipeline: &MysqlPipeline, args: &[&str]) -> Result<VerifyOutcome> {
    // verify reads kinesalite itself, not through a fault injector.
    let endpoint = pipeline.kin.endpoint();
    let env = [("TRIBUTARY__SINK__ENDPOINT_URL", endpoint.as_str())];
    run_verify(&pipeline.config.path, pipeline.dir.path(), &env, args).await
}

/// Moves the stored offset to the binlog's end: the changes up to there
/// never reach the stream (run while the connector is stopped).
async fn skip_to_binlog_end(pipeline: &MysqlPipeline) -> Result<()> {
    let (file, pos) = pipeline.db.binlog_position().await?;
    let mut offset = format!("file={file}\npos={pos}\n");
    if pipeline
        .stored_offset()
        .is_some_and(|o| o.contains("gtid="))
    {
        let mut conn = pipeline.db.root().await?;
        let gtid: Option<String> = conn.query_first("SELECT @@gtid_binlog_pos").await?;
        offset.push_str(&format!("gtid={}\n", gtid.unwrap_or_default()));
    }
    std::fs::write(pipeline.config.state_dir.join("shop.mysql-offset"), offset)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_matches_a_healthy_mysql_pipeline_and_names_skipped_changes() -> Result<()> {
    let mut pipeline = MysqlPipeline::start(STREAM, 3, TABLES, FAST_QUOTA).await?;
    // From here on the connector writes through a proxy that refuses a
    // fraction of the entries and fails some calls.
    pipeline.stop_gracefully().await?;
    let kinesalite = SocketAddr::from((Ipv4Addr::LOCALHOST, pipeline.kin.port()));
    let faults = KinesisFaults::start(kinesalite, Faults::rough(17)).await?;
    let text = std::fs::read_to_string(&pipeline.config.path)?;
    let through_proxy = text.replace(&pipeline.kin.endpoint(), &faults.endpoint());
    ensure!(
        through_proxy != text,
        "the config names kinesalite's endpoint"
    );
    std::fs::write(&pipeline.config.path, through_proxy)?;
    pipeline.restart().await?;
    pipeline
        .db
        .execute_each(&[
            "SET time_zone = '+02:00'",
            "INSERT INTO shop.items WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 200) \
             SELECT i, CONCAT('v', i), i * 1.5, TIMESTAMP '2026-01-01 00:00:00.123456' + INTERVAL i HOUR, \
             TIMESTAMP '2026-06-01 12:00:00.5' + INTERVAL i MINUTE, i / 3, i / 7, \
             JSON_OBJECT('i', i, 'tags', JSON_ARRAY('a', NULL)), ELT(1 + i % 3, 's', 'm', 'l'), \
             'a,c', UNHEX(HEX(i)), 18446744073709551615 - i, 'café' FROM g",
            "INSERT INTO shop.pairs WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 50) \
             SELECT CONCAT('k', i % 7), i, NULL FROM g",
            "UPDATE shop.items SET v = 'changed', n = n * 3, en = NULL WHERE id % 3 = 0",
            "DELETE FROM shop.items WHERE id % 10 = 0",
            // A key change: a delete of the old key and an insert of the new.
            "UPDATE shop.items SET id = 1000 + id WHERE id IN (1, 2, 7)",
            "UPDATE shop.pairs SET b = b + 100 WHERE b < 5",
            "TRUNCATE TABLE shop.pairs",
            "INSERT INTO shop.pairs VALUES ('after', 1, 'x'), ('after', 2, NULL)",
            "INSERT INTO shop.logbook VALUES ('a', 1), ('b', 2), ('b', 2)",
        ])
        .await?;
    pipeline.settled(STREAM, WAIT).await?;
    let refused = faults.counts().refused_entries.load(Ordering::Relaxed);
    ensure!(refused > 0, "the fault injector refused no entry");

    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(0), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["match"], true, "{report:#}");
    for (name, rows) in [("shop.items", 180), ("shop.pairs", 2)] {
        let found = report_table(&report, name);
        assert_eq!(found["source_rows"], rows, "{found:#}");
        assert_eq!(found["stream_rows"], rows, "{found:#}");
    }
    // A table without a primary key has no key to match rows by.
    let logbook = report_table(&report, "shop.logbook");
    assert_eq!(
        (
            &logbook["no_key"],
            &logbook["not_compared"],
            &logbook["match"]
        ),
        (&json!(true), &json!(3), &json!(true)),
        "{logbook:#}"
    );

    // Changes made while the connector is stopped, then skipped: the
    // offset is moved to the binlog's end.
    pipeline.stop_gracefully().await?;
    pipeline
        .db
        .execute_each(&[
            "INSERT INTO shop.items (id, v) VALUES (5000, 'lost insert')",
            "UPDATE shop.items SET n = 42 WHERE id = 4",
            "DELETE FROM shop.items WHERE id = 5",
            "UPDATE shop.pairs SET note = 'lost' WHERE a = 'after' AND b = 2",
        ])
        .await?;
    skip_to_binlog_end(&pipeline).await?;
    pipeline.restart().await?;
    pipeline
        .db
        .execute("INSERT INTO shop.pairs VALUES ('later', 1, 'streamed')")
        .await?;
    pipeline.settled(STREAM, WAIT).await?;

    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(1), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["match"], false, "{report:#}");
    let items = report_table(&report, "shop.items");
    assert_named(
        items,
        &json!([{"id": 5000}]),
        &json!([{"id": 5}]),
        &json!([{"key": {"id": 4}, "column": "n"}]),
    );
    let pairs = report_table(&report, "shop.pairs");
    assert_eq!(
        pairs["different_keys"],
        json!([{"key": {"a": "after", "b": 2}, "column": "note"}]),
        "{pairs:#}"
    );
    assert_eq!(
        (&pairs["source_rows"], &pairs["stream_rows"]),
        (&json!(3), &json!(3)),
        "{pairs:#}"
    );

    // --table without a database means the URL's; the human report.
    let (code, stdout, logs) = verify(&pipeline, &["--table", "items"]).await?;
    assert_eq!(code, Some(1), "{logs}");
    assert!(!stdout.contains("shop.pairs"), "{stdout}");
    assert!(
        stdout.contains(r#"shop.items: missing from the stream: {"id":5000}"#),
        "{stdout}"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// `verify --since`: the replay starts at a time; only keys changed since
/// are compared, the others are counted as not compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_since_compares_only_the_keys_changed_since() -> Result<()> {
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        2,
        "CREATE TABLE kv (id INT PRIMARY KEY, v INT)",
        FAST_QUOTA,
    )
    .await?;
    pipeline
        .db
        .execute(
            "INSERT INTO shop.kv WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g \
             WHERE i < 100) SELECT i, i FROM g",
        )
        .await?;
    pipeline.settled(STREAM, WAIT).await?;
    // Kinesis stamps records with its arrival time, in milliseconds.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = DateTime::from(std::time::SystemTime::now()).fmt(DateTimeFormat::DateTime)?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pipeline
        .db
        .execute_each(&[
            "UPDATE shop.kv SET v = v + 1000 WHERE id <= 10",
            "DELETE FROM shop.kv WHERE id = 11",
            "INSERT INTO shop.kv VALUES (500, 500)",
        ])
        .await?;
    pipeline.settled(STREAM, WAIT).await?;

    let (code, stdout, logs) = verify(&pipeline, &["--json", "--since", &since]).await?;
    assert_eq!(code, Some(0), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    let kv = report_table(&report, "shop.kv");
    assert_eq!(
        (&kv["source_rows"], &kv["stream_rows"], &kv["not_compared"]),
        (&json!(100), &json!(11), &json!(89)),
        "{report:#}"
    );
    // Kinesis takes the time to the millisecond.
    let echoed = report["since"].as_str().unwrap_or_default();
    assert_eq!(echoed.get(..23), since.get(..23), "{report:#}");

    // Lost: an update of a key changed since (compared), an update of a
    // key not changed since (not compared), a delete of a key changed
    // since, an insert of a key deleted since.
    pipeline.stop_gracefully().await?;
    pipeline
        .db
        .execute_each(&[
            "UPDATE shop.kv SET v = -2 WHERE id = 2",
            "UPDATE shop.kv SET v = -50 WHERE id = 50",
            "DELETE FROM shop.kv WHERE id = 3",
            // Deleted since: the replay saw the key, so it is compared.
            "INSERT INTO shop.kv VALUES (11, 11)",
        ])
        .await?;
    skip_to_binlog_end(&pipeline).await?;
    pipeline.restart().await?;
    let (code, stdout, logs) = verify(&pipeline, &["--json", "--since", &since]).await?;
    assert_eq!(code, Some(1), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    let kv = report_table(&report, "shop.kv");
    assert_named(
        kv,
        &json!([{"id": 11}]),
        &json!([{"id": 3}]),
        &json!([{"key": {"id": 2}, "column": "v"}]),
    );
    assert_eq!(kv["not_compared"], 89, "{report:#}");
    let (_, stdout, _) = verify(&pipeline, &["--since", &since]).await?;
    assert!(
        stdout.contains("shop.kv: 89 source rows not compared"),
        "{stdout}"
    );
    // From the trim horizon, the key not changed since is compared too.
    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(1), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        report_table(&report, "shop.kv")["different_keys"],
        json!([{"key": {"id": 2}, "column": "v"}, {"key": {"id": 50}, "column": "v"}]),
        "{report:#}"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

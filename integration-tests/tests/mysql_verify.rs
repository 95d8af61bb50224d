//! `tributary verify` against a real MariaDB row binlog and kinesalite: a
//! healthy pipeline matches (rows that reached the stream through the
//! binlog compare byte for byte with the same rows read as the snapshot
//! reads them); changes skipped by moving the offset forward are named.

use std::time::Duration;

use anyhow::Result;
use mysql_async::prelude::Queryable as _;
use serde_json::{Value, json};
use tributary_integration_tests::verify_report::{
    VerifyOutcome, assert_named, report_table, run_verify,
};
use tributary_integration_tests::{FAST_QUOTA, MysqlPipeline};

const STREAM: &str = "verify-mysql";
const WAIT: Duration = Duration::from_secs(90);

const TABLES: &str = r#"
CREATE TABLE items (
    id INT PRIMARY KEY, v VARCHAR(40), n DECIMAL(12,3), at DATETIME(6), ts TIMESTAMP(3) NULL,
    f FLOAT, d DOUBLE, js JSON, en ENUM('s','m','l'), st SET('a','b','c'), b BLOB,
    u BIGINT UNSIGNED, lat VARCHAR(10) CHARACTER SET latin1
) DEFAULT CHARSET = utf8mb4;
CREATE TABLE pairs (a VARCHAR(10), b INT, note TEXT, PRIMARY KEY (a, b));
"#;

/// Runs `tributary verify` with `args`; its exit code, stdout and logs.
async fn verify(pipeline: &MysqlPipeline, args: &[&str]) -> Result<VerifyOutcome> {
    run_verify(&pipeline.config.path, pipeline.dir.path(), &[], args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_matches_a_healthy_mysql_pipeline_and_names_skipped_changes() -> Result<()> {
    let mut pipeline = MysqlPipeline::start(STREAM, 3, TABLES, FAST_QUOTA).await?;
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
        ])
        .await?;
    pipeline.settled(STREAM, WAIT).await?;

    let (code, stdout, logs) = verify(&pipeline, &["--json"]).await?;
    assert_eq!(code, Some(0), "{stdout}\n{logs}");
    let report: Value = serde_json::from_str(&stdout)?;
    assert_eq!(report["match"], true, "{report:#}");
    for (name, rows) in [("shop.items", 180), ("shop.pairs", 2)] {
        let found = report_table(&report, name);
        assert_eq!(found["source_rows"], rows, "{found:#}");
        assert_eq!(found["stream_rows"], rows, "{found:#}");
    }

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

//! Tables that join the capture after the first start, on a real MariaDB
//! 10.11 and kinesalite: a table added to `source.tables` between two runs
//! is copied alone at the next start (the others are not copied again),
//! and a table created while `tributary run` streams is captured from its
//! first row (its TABLE_MAP events match the patterns) without a restart.
//! In both, a consumer replaying the stream ends with exactly the tables.

use std::time::Duration;

use anyhow::{Result, ensure};
use tributary_integration_tests::consumer::{self, of, snapshot_sorts_first};
use tributary_integration_tests::{MysqlPipeline, StreamRecord, Writer, set_tables};

const STREAM: &str = "new-tables-cdc";
const SETTLE: Duration = Duration::from_secs(120);

const SETUP: &str = "
CREATE TABLE a (id INT PRIMARY KEY, v VARCHAR(40));
INSERT INTO a SELECT seq, CONCAT('a ', seq) FROM seq_1_to_300;
CREATE TABLE b (id INT PRIMARY KEY, v VARCHAR(40));
INSERT INTO b SELECT seq, CONCAT('b ', seq) FROM seq_1_to_200;
";

/// Fails unless replaying `records` gives exactly each of `tables` (keyed by `id`).
async fn assert_tables_match(
    pipeline: &MysqlPipeline,
    records: &[StreamRecord],
    tables: &[&str],
) -> Result<()> {
    let mut conn = pipeline.db.root().await?;
    for table in tables {
        consumer::assert_mysql_replica_matches(&mut conn, records, table, &["id"]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_config_is_copied_alone_at_the_next_start() -> Result<()> {
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        2,
        SETUP,
        "[source]\nsnapshot = \"initial\"\ntables = [\"shop.a\"]\n",
    )
    .await?;
    pipeline
        .db
        .execute_each(&[
            "UPDATE a SET v = 'first run' WHERE id <= 10",
            "UPDATE b SET v = 'not captured yet' WHERE id <= 10",
        ])
        .await?;
    let first = pipeline.settled(STREAM, SETTLE).await?;
    ensure!(of(&first, "snapshot", "a")?.len() == 300, "a is copied");
    ensure!(
        first
            .iter()
            .all(|r| r.json().is_ok_and(|e| e["source"]["table"] == "a")),
        "b is not captured in the first run"
    );
    pipeline.stop_gracefully().await?;

    // While stopped: b joins source.tables, and both tables change (b's
    // changes after the stored offset are streamed again after its copy).
    set_tables(&pipeline.config.path, &["shop.a", "shop.b"])?;
    pipeline
        .db
        .execute_each(&[
            "UPDATE a SET v = 'while stopped' WHERE id BETWEEN 11 AND 20",
            "DELETE FROM b WHERE id > 190",
            "UPDATE b SET v = 'while stopped' WHERE id BETWEEN 11 AND 20",
        ])
        .await?;
    // A writer changes b while it is copied: updates, and keys deleted and
    // inserted again (b keeps 190 rows).
    let writer = Writer::start(pipeline.db.root().await?, |i| {
        let k = i % 90 + 100;
        format!(
            "UPDATE shop.b SET v = 'writer {i}' WHERE id = {}; BEGIN; \
             DELETE FROM shop.b WHERE id = {k}; INSERT INTO shop.b VALUES ({k}, 'again {i}'); COMMIT",
            (i * 7) % 90 + 100
        )
    });
    pipeline.restart().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = writer.stop().await?;
    eprintln!("the writer made {writes} transactions on b around the copy");
    let logs = pipeline.tributary.logs();
    ensure!(
        logs.contains("copying tables added to source.tables"),
        "the restart copies the added table:\n{logs}"
    );
    ensure!(
        !logs.contains("global read lock"),
        "copying an added table takes no lock:\n{logs}"
    );
    pipeline
        .db
        .execute_each(&[
            "UPDATE a SET v = 'second run' WHERE id BETWEEN 21 AND 30",
            "UPDATE b SET v = 'second run' WHERE id BETWEEN 21 AND 30",
            "DELETE FROM b WHERE id <= 5",
            "INSERT INTO b VALUES (1000, 'new')",
        ])
        .await?;
    let all = pipeline.settled(STREAM, SETTLE).await?;
    let second = &consumer::written_since(&all, &first);
    ensure!(
        of(second, "snapshot", "a")?.is_empty(),
        "a is not copied again"
    );
    let b_rows = of(second, "snapshot", "b")?.len();
    ensure!(b_rows == 190, "b's 190 rows are copied once: {b_rows}");
    snapshot_sorts_first(second, "b")?;
    ensure!(!of(second, "update", "a")?.is_empty(), "a streams on");
    assert_tables_match(&pipeline, &all, &["shop.a", "shop.b"]).await?;
    pipeline.stop_gracefully().await?;

    // A third run copies nothing.
    pipeline.restart().await?;
    pipeline
        .db
        .execute("UPDATE b SET v = 'third run' WHERE id = 50")
        .await?;
    let third = pipeline.settled(STREAM, SETTLE).await?;
    ensure!(
        third.len() == all.len() + 1,
        "only the new change: {} records after {}",
        third.len(),
        all.len()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_while_streaming_is_captured_from_its_first_row() -> Result<()> {
    let mut pipeline =
        MysqlPipeline::start(STREAM, 2, SETUP, "[source]\nsnapshot = \"initial\"\n").await?;
    pipeline
        .db
        .execute_each(&[
            "CREATE TABLE c (id INT PRIMARY KEY, v VARCHAR(40))",
            "INSERT INTO c SELECT seq, CONCAT('c ', seq) FROM seq_1_to_500",
            "UPDATE c SET v = 'changed' WHERE id <= 50",
            "DELETE FROM c WHERE id > 480",
            "UPDATE a SET v = 'meanwhile' WHERE id <= 20",
        ])
        .await?;
    let records = pipeline.settled(STREAM, SETTLE).await?;
    ensure!(
        of(&records, "insert", "c")?.len() == 500,
        "every row of c is streamed from the first"
    );
    ensure!(
        of(&records, "snapshot", "c")?.is_empty(),
        "the binlog holds c from its creation: nothing to copy"
    );
    assert_tables_match(&pipeline, &records, &["shop.a", "shop.b", "shop.c"]).await?;
    pipeline.stop_gracefully().await?;

    // The created table is recorded: a restart copies nothing.
    pipeline.restart().await?;
    pipeline
        .db
        .execute("INSERT INTO c VALUES (9002, 'later')")
        .await?;
    let again = pipeline.settled(STREAM, SETTLE).await?;
    ensure!(
        again.len() == records.len() + 1,
        "only the new change: {} records after {}",
        again.len(),
        records.len()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

//! Tables that join the capture after the first start, on a real Postgres
//! 15 and kinesalite: a table added to `source.tables` between two runs is
//! copied alone at the next start (the others are not copied again), and a
//! table created while `tributary run` streams is captured from its first
//! row without a restart. In both, a consumer replaying the stream ends
//! with exactly the tables.

use std::time::Duration;

use anyhow::{Result, ensure};
use tributary_integration_tests::consumer::{self, of, snapshot_sorts_first};
use tributary_integration_tests::{
    DEFAULT_DATABASE, Pipeline, StreamRecord, TributaryProcess, USER, Writer, set_tables,
};

const STREAM: &str = "new-tables-cdc";

const SETUP: &str = "
CREATE TABLE a (id int PRIMARY KEY, v text);
INSERT INTO a SELECT g, 'a ' || g FROM generate_series(1, 300) g;
CREATE TABLE b (id int PRIMARY KEY, v text);
INSERT INTO b SELECT g, 'b ' || g FROM generate_series(1, 200) g;
";

/// Waits until the slot confirmed everything written so far, then reads
/// the whole stream.
async fn settled(pipeline: &Pipeline) -> Result<Vec<StreamRecord>> {
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(120))
        .await?;
    pipeline.kin.read_all(STREAM).await
}

/// Fails unless replaying `records` gives exactly each of `tables` (keyed by `id`).
async fn assert_tables_match(
    pipeline: &Pipeline,
    records: &[StreamRecord],
    tables: &[&str],
) -> Result<()> {
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    for table in tables {
        consumer::assert_replica_matches(&client, records, table, &["id"]).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_config_is_copied_alone_at_the_next_start() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        SETUP,
        "[source]\nsnapshot = \"initial\"\ntables = [\"public.a\"]\n",
    )
    .await?;
    pipeline
        .pg
        .execute_each(&[
            "UPDATE a SET v = 'first run' WHERE id <= 10",
            "UPDATE b SET v = 'not captured yet' WHERE id <= 10",
        ])
        .await?;
    let first = settled(&pipeline).await?;
    ensure!(of(&first, "snapshot", "a")?.len() == 300, "a is copied");
    ensure!(
        first
            .iter()
            .all(|r| r.json().is_ok_and(|e| e["source"]["table"] == "a")),
        "b is not captured in the first run"
    );
    pipeline.stop_gracefully().await?;

    // While stopped: b joins source.tables, and both tables change.
    set_tables(&pipeline.config.path, &["public.a", "public.b"])?;
    pipeline
        .pg
        .execute_each(&[
            "UPDATE a SET v = 'while stopped' WHERE id BETWEEN 11 AND 20",
            "DELETE FROM b WHERE id > 190",
            "UPDATE b SET v = 'while stopped' WHERE id BETWEEN 11 AND 20",
        ])
        .await?;
    // A writer changes b while it is copied: updates, and keys deleted and
    // inserted again (b keeps 190 rows).
    let writer = Writer::start(pipeline.pg.client(DEFAULT_DATABASE).await?, |i| {
        let k = i % 90 + 100;
        format!(
            "UPDATE b SET v = 'writer {i}' WHERE id = {}; \
             BEGIN; DELETE FROM b WHERE id = {k}; INSERT INTO b VALUES ({k}, 'again {i}'); COMMIT",
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
    pipeline
        .pg
        .execute_each(&[
            "UPDATE a SET v = 'second run' WHERE id BETWEEN 21 AND 30",
            "UPDATE b SET v = 'second run' WHERE id BETWEEN 21 AND 30",
            "DELETE FROM b WHERE id <= 5",
            "INSERT INTO b VALUES (1000, 'new')",
        ])
        .await?;
    let all = settled(&pipeline).await?;
    let second = &consumer::written_since(&all, &first);
    ensure!(
        of(second, "snapshot", "a")?.is_empty(),
        "a is not copied again"
    );
    let b_rows = of(second, "snapshot", "b")?.len();
    ensure!(b_rows == 190, "b's 190 rows are copied once: {b_rows}");
    snapshot_sorts_first(second, "b")?;
    ensure!(!of(second, "update", "a")?.is_empty(), "a streams on");
    assert_tables_match(&pipeline, &all, &["public.a", "public.b"]).await?;
    pipeline.stop_gracefully().await?;

    // A third run copies nothing.
    pipeline.restart().await?;
    pipeline
        .pg
        .execute("UPDATE b SET v = 'third run' WHERE id = 50")
        .await?;
    let third = settled(&pipeline).await?;
    ensure!(
        third.len() == all.len() + 1,
        "only the new change: {} records after {}",
        third.len(),
        all.len()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// A table without a key, added later and larger than the socket buffers
/// (30 MB of rows): its copy streams through one `COPY`, and nothing else
/// is asked on that connection while it streams (a query sent behind an
/// unread `COPY` never gets its answer: the copy hung).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_without_a_key_added_later_is_copied_whole() -> Result<()> {
    const ROWS: usize = 3_000;
    let setup = format!(
        "{SETUP} CREATE TABLE heap (n int, body text); \
         INSERT INTO heap SELECT g, repeat(md5(g::text), 320) FROM generate_series(1, {ROWS}) g;"
    );
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        &setup,
        "[source]\nsnapshot = \"initial\"\ntables = [\"public.a\"]\n",
    )
    .await?;
    settled(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    set_tables(&pipeline.config.path, &["public.a", "public.heap"])?;
    // The slot is taken again once the copy is in Kinesis (30 MB on two
    // kinesalite shards).
    pipeline
        .restart_with_timeout(Duration::from_secs(180))
        .await?;
    // Streaming resumes after the copy: once this change is confirmed, the
    // copy is in the stream.
    pipeline
        .pg
        .execute("UPDATE a SET v = 'after the copy' WHERE id = 1")
        .await?;
    let records = settled(&pipeline).await?;
    let copied = of(&records, "snapshot", "heap")?;
    ensure!(
        copied.len() == ROWS,
        "every row of heap once: {} of {ROWS}\n{}",
        copied.len(),
        pipeline.tributary.logs()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_created_while_streaming_is_captured_from_its_first_row() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        SETUP,
        "[source]\nsnapshot = \"initial\"\n[source.postgres]\ntable_refresh_secs = 1\n",
    )
    .await?;
    // Rows written right after CREATE, before any look for new tables can
    // have added the table to the publication; one table is created with
    // its rows in one transaction.
    pipeline
        .pg
        .execute_each(&[
            "CREATE TABLE c (id int PRIMARY KEY, v text)",
            "INSERT INTO c SELECT g, 'c ' || g FROM generate_series(1, 500) g",
            "UPDATE c SET v = 'early' WHERE id <= 50",
            "BEGIN; CREATE TABLE d (id int PRIMARY KEY, v text); \
             INSERT INTO d SELECT g, 'd ' || g FROM generate_series(1, 100) g; COMMIT",
            "UPDATE a SET v = 'meanwhile' WHERE id <= 20",
        ])
        .await?;
    // A writer keeps changing c before, during and after the refresh that
    // adds it to the publication and copies it.
    let writer = Writer::start(pipeline.pg.client(DEFAULT_DATABASE).await?, |i| {
        format!(
            "UPDATE c SET v = 'writer {i}' WHERE id = {}; \
             INSERT INTO c VALUES ({}, 'writer'); DELETE FROM c WHERE id = {}",
            i % 400 + 1,
            20_000 + i,
            20_000 + i / 2
        )
    });
    pipeline
        .tributary
        .wait_for_log("added tables to the publication", Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let writes = writer.stop().await?;
    eprintln!("the writer made {writes} transactions on c around the refresh");
    // Changes after the table joined the publication flow as changes.
    pipeline
        .pg
        .execute_each(&[
            "UPDATE c SET v = 'late' WHERE id BETWEEN 40 AND 60",
            "DELETE FROM c WHERE id > 480",
            "INSERT INTO c VALUES (9001, 'after')",
            "DELETE FROM d WHERE id <= 10",
        ])
        .await?;
    let records = settled(&pipeline).await?;
    ensure!(
        !of(&records, "delete", "c")?.is_empty(),
        "c's deletes are streamed"
    );
    snapshot_sorts_first(&records, "c")?;
    assert_tables_match(
        &pipeline,
        &records,
        &["public.a", "public.b", "public.c", "public.d"],
    )
    .await?;
    pipeline.stop_gracefully().await?;

    // The created tables are recorded: a restart copies nothing, neither
    // at start-up nor at its first refreshes.
    pipeline.restart().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    pipeline
        .pg
        .execute("INSERT INTO c VALUES (9002, 'later')")
        .await?;
    let again = settled(&pipeline).await?;
    ensure!(
        again.len() == records.len() + 1,
        "only the new change: {} records after {}\n{}",
        again.len(),
        records.len(),
        pipeline.tributary.logs()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_role_may_not_publish_stops_start_up_with_the_statement() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"initial\"\ntables = [\"public.a\"]\n",
    )
    .await?;
    settled(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    // A table another role owns: the connector may read it, not publish it.
    pipeline
        .pg
        .superuser_client(DEFAULT_DATABASE)
        .await?
        .batch_execute(&format!(
            "CREATE TABLE theirs (id int PRIMARY KEY); GRANT SELECT ON theirs TO {USER}"
        ))
        .await?;
    set_tables(&pipeline.config.path, &["public.a", "public.theirs"])?;
    pipeline.tributary = TributaryProcess::run(&pipeline.config.path, &[])?;
    let status = pipeline
        .tributary
        .wait_exit(Duration::from_secs(30))
        .await?;
    let logs = pipeline.tributary.logs();
    ensure!(status.code() == Some(2), "exit 2: {status}\n{logs}");
    ensure!(
        logs.contains(
            "ALTER PUBLICATION \\\"tributary_shop\\\" ADD TABLE \\\"public\\\".\\\"theirs\\\";"
        ) && logs.contains("source.postgres.publication"),
        "the error names the key and the statement to run:\n{logs}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_snapshot_never_an_added_table_streams_without_a_copy() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"never\"\ntables = [\"public.a\"]\n",
    )
    .await?;
    pipeline.stop_gracefully().await?;
    set_tables(&pipeline.config.path, &["public.a", "public.b"])?;
    pipeline.restart().await?;
    pipeline
        .pg
        .execute("UPDATE b SET v = 'streamed' WHERE id <= 3")
        .await?;
    let records = settled(&pipeline).await?;
    ensure!(
        records.len() == 3 && of(&records, "update", "b")?.len() == 3,
        "only b's changes, no copy: {} records",
        records.len()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// A transaction that wrote to a table before start-up added the table to
/// the publication and commits only after that: its rows are not decoded
/// (they were written before the table was published), so the copy must
/// wait for it to end before taking its snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_transaction_open_across_the_add_table_are_copied() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"initial\"\ntables = [\"public.a\"]\n",
    )
    .await?;
    // The slot is active from its creation on, while the first snapshot
    // still copies: stopped then, the next start would resume that
    // snapshot (now with b) instead of copying b as an added table.
    settled(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    set_tables(&pipeline.config.path, &["public.a", "public.b"])?;
    let open = pipeline.pg.client(DEFAULT_DATABASE).await?;
    open.batch_execute(
        "BEGIN; INSERT INTO b SELECT g, 'open across the ADD TABLE' FROM generate_series(1001, 1010) g",
    )
    .await?;
    let commit_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        open.batch_execute("COMMIT").await
    });
    pipeline.restart().await?;
    commit_later.await??;
    let all = settled(&pipeline).await?;
    let logs = pipeline.tributary.logs();
    ensure!(
        logs.contains("copying tables added to source.tables"),
        "the restart copies the added table:\n{logs}"
    );
    assert_tables_match(&pipeline, &all, &["public.b"]).await?;
    // Two copies (a's at the first start, b's now), perhaps at one stream
    // position: no two rows share an id.
    let mut ids = std::collections::HashSet::new();
    for record in &all {
        let envelope = record.json()?;
        if envelope["op"] == "snapshot" {
            let id = envelope["id"].as_str().unwrap_or_default().to_owned();
            ensure!(
                ids.insert(id.clone()),
                "two snapshot rows share the id {id}"
            );
        }
    }
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// A table another role creates while the connector streams (it may not
/// add it to the publication): the stream goes on, the refusal is logged,
/// and the other tables keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_the_role_may_not_publish_at_run_time_does_not_stop_the_stream() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        SETUP,
        "[source]\nsnapshot = \"initial\"\n[source.postgres]\ntable_refresh_secs = 1\n",
    )
    .await?;
    pipeline
        .pg
        .superuser_client(DEFAULT_DATABASE)
        .await?
        .batch_execute(&format!(
            "CREATE TABLE theirs (id int PRIMARY KEY); GRANT SELECT ON theirs TO {USER}"
        ))
        .await?;
    pipeline
        .tributary
        .wait_for_log("are not captured yet", Duration::from_secs(30))
        .await?;
    pipeline
        .pg
        .execute("UPDATE a SET v = 'after the refusal' WHERE id <= 5")
        .await?;
    let records = settled(&pipeline).await?;
    ensure!(
        of(&records, "update", "a")?.len() == 5,
        "the stream goes on:\n{}",
        pipeline.tributary.logs()
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// `[state] dir` lost while the slot stays (a container without a volume):
/// start-up cannot know whether a snapshot was finished, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_state_dir_with_a_kept_slot_is_warned_about() -> Result<()> {
    let mut pipeline =
        Pipeline::start(STREAM, 1, SETUP, "[source]\nsnapshot = \"initial\"\n").await?;
    pipeline.stop_gracefully().await?;
    std::fs::remove_dir_all(&pipeline.config.state_dir)?;
    pipeline.restart().await?;
    let logs = pipeline.tributary.logs();
    ensure!(
        logs.contains("the slot exists but [state] dir holds no record"),
        "start-up warns:\n{logs}"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

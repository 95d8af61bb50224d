//! The MySQL source's life cycle on a real MariaDB: SIGTERM flushes, writes
//! the offset and exits 0, and a restart sends nothing twice; a server
//! without a row binlog is refused with exit 2 naming the setting; a stored
//! offset in a purged binlog stops with a clear error, unless the server
//! still holds its GTID state (then the stream resumes by GTID).

use std::collections::HashSet;
use std::time::Duration;

use tributary_integration_tests::{
    Kinesalite, Mariadb, MysqlPipeline, TributaryProcess, write_mysql_config,
};

const STREAM: &str = "lifecycle-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_writes_the_offset_and_a_restart_sends_nothing_twice() -> anyhow::Result<()> {
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        2,
        "CREATE TABLE items (id INT PRIMARY KEY, n INT)",
        "",
    )
    .await?;
    let singles: Vec<String> = (0..300)
        .map(|i| format!("INSERT INTO items VALUES ({i}, {i})"))
        .collect();
    let singles: Vec<&str> = singles.iter().map(String::as_str).collect();
    pipeline.db.execute_each(&singles).await?;
    pipeline
        .wait_for_records(STREAM, 300, Duration::from_secs(60))
        .await?;
    // A 1,000-row transaction, likely in flight when the signal arrives.
    let values: Vec<String> = (1000..2000).map(|i| format!("({i}, {i})")).collect();
    pipeline
        .db
        .execute(&format!("INSERT INTO items VALUES {}", values.join(",")))
        .await?;
    pipeline
        .tributary
        .stop_gracefully(Duration::from_secs(60))
        .await?;
    let offset_at_stop = pipeline.stored_offset().expect("an offset file");
    let first = pipeline.kin.read_all(STREAM).await?;
    assert!(
        first.len() == 300 || first.len() == 1300,
        "the stop flushed whole transactions: {} records",
        first.len()
    );
    assert!(
        offset_at_stop.contains("file=binlog.000001\n"),
        "{offset_at_stop}"
    );
    assert!(offset_at_stop.contains("gtid=0-1-"), "{offset_at_stop}");

    pipeline.restart().await?;
    pipeline
        .db
        .execute_each(&[
            "INSERT INTO items VALUES (300, 300)",
            "INSERT INTO items VALUES (301, 301)",
        ])
        .await?;
    pipeline
        .wait_for_records(STREAM, 1302, Duration::from_secs(60))
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let all = pipeline.kin.read_all(STREAM).await?;
    let mut ids = HashSet::new();
    for record in &all {
        let envelope = record.json()?;
        let id = envelope["id"].as_str().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "{id} was sent twice");
    }
    assert_eq!(all.len(), 1302);
    pipeline.stop_gracefully().await?;
    assert_ne!(
        pipeline.stored_offset().as_deref(),
        Some(offset_at_stop.as_str()),
        "the second run stored its transactions too"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_binlog_is_refused_with_exit_2_naming_the_setting() -> anyhow::Result<()> {
    let db = Mariadb::start_with(&["--binlog-format=STATEMENT"]).await?;
    let kin = Kinesalite::start().await?;
    let dir = tempfile::tempdir()?;
    let config = write_mysql_config(dir.path(), &db, &kin, STREAM, "[sink]\nkind = \"null\"\n")?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    let status = tributary.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(2), "{}", tributary.logs());
    let stderr = tributary.stderr();
    assert!(stderr.contains("binlog_format"), "{stderr}");
    assert!(
        stderr.contains("STATEMENT") && stderr.contains("ROW"),
        "{stderr}"
    );
    Ok(())
}

/// A pipeline that delivered row 1 of `items` and stopped gracefully.
async fn one_row_delivered_then_stopped() -> anyhow::Result<MysqlPipeline> {
    let mut pipeline =
        MysqlPipeline::start(STREAM, 1, "CREATE TABLE items (id INT PRIMARY KEY)", "").await?;
    pipeline.db.execute("INSERT INTO items VALUES (1)").await?;
    pipeline
        .wait_for_records(STREAM, 1, Duration::from_secs(60))
        .await?;
    pipeline.stop_gracefully().await?;
    Ok(pipeline)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_in_a_purged_binlog_stops_with_a_clear_error() -> anyhow::Result<()> {
    let pipeline = one_row_delivered_then_stopped().await?;
    // The next transaction is purged too: neither the stored file nor the
    // stored GTID is on the server any more.
    pipeline.db.execute("INSERT INTO items VALUES (2)").await?;
    pipeline.db.rotate_and_purge().await?;
    pipeline.db.execute("INSERT INTO items VALUES (3)").await?;

    let mut tributary = TributaryProcess::run(&pipeline.config.path, &[])?;
    let status = match tributary.wait_exit(Duration::from_secs(30)).await {
        Ok(status) => status,
        Err(err) => anyhow::bail!("{err:#}\n{}", tributary.logs()),
    };
    assert_eq!(status.code(), Some(1), "{}", tributary.logs());
    let stderr = tributary.stderr();
    assert!(
        stderr.contains("binlog.000001") && stderr.contains("purged"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shop.mysql-offset"),
        "the way out names the file: {stderr}"
    );
    assert_eq!(
        pipeline.kin.read_all(STREAM).await?.len(),
        1,
        "nothing skipped ahead"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_file_whose_gtid_remains_resumes_by_gtid() -> anyhow::Result<()> {
    let mut pipeline = one_row_delivered_then_stopped().await?;
    // The stored file is gone, but the next binlog starts exactly at the
    // stored GTID state.
    pipeline.db.rotate_and_purge().await?;
    pipeline.db.execute("INSERT INTO items VALUES (2)").await?;
    pipeline.restart().await?;
    pipeline.db.execute("INSERT INTO items VALUES (3)").await?;
    let records = pipeline
        .wait_for_records(STREAM, 3, Duration::from_secs(60))
        .await?;
    let keys: Vec<i64> = records
        .iter()
        .map(|r| r.json().map(|e| e["key"]["id"].as_i64().unwrap_or(-1)))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(keys, [1, 2, 3], "nothing lost, nothing twice");
    pipeline.stop_gracefully().await?;
    let offset = pipeline.stored_offset().unwrap_or_default();
    assert!(offset.contains("file=binlog.000002\n"), "{offset}");

    // With resume = "position" the same situation is the purged-binlog stop.
    pipeline.db.rotate_and_purge().await?;
    let mut tributary = TributaryProcess::run(
        &pipeline.config.path,
        &[("TRIBUTARY__SOURCE__MYSQL__RESUME", "position")],
    )?;
    tributary
        .expect_failure(1, "binlog purged", Duration::from_secs(30))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_stays_connected_through_heartbeats() -> anyhow::Result<()> {
    let mut pipeline =
        MysqlPipeline::start(STREAM, 1, "CREATE TABLE items (id INT PRIMARY KEY)", "").await?;
    // Longer than the source's 30 s silence limit: only the server's
    // heartbeats keep the session from being declared dead.
    tokio::time::sleep(Duration::from_secs(35)).await;
    pipeline.db.execute("INSERT INTO items VALUES (1)").await?;
    pipeline
        .wait_for_records(STREAM, 1, Duration::from_secs(30))
        .await?;
    let logs = pipeline.tributary.logs();
    assert!(!logs.contains("reconnecting"), "{logs}");
    pipeline.stop_gracefully().await?;
    Ok(())
}

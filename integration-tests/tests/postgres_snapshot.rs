//! `source.snapshot = "initial"` on a real Postgres 15 and kinesalite: the
//! rows the tables held before the slot existed arrive as `op = "snapshot"`
//! envelopes, then the stream continues from the snapshot's consistent
//! point, and a consumer replaying the stream ends with exactly the table.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tributary_integration_tests::consumer;
use tributary_integration_tests::{DEFAULT_DATABASE, Pipeline, StreamRecord};

const STREAM: &str = "snap-cdc";

async fn assert_replica_matches(
    pipeline: &Pipeline,
    records: &[StreamRecord],
    table: &str,
    key: &[&str],
) -> Result<()> {
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    consumer::assert_replica_matches(&client, records, table, key).await
}

/// Waits until the slot confirmed everything written so far, then reads
/// the whole stream.
async fn settled(pipeline: &Pipeline) -> Result<Vec<StreamRecord>> {
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(120))
        .await?;
    pipeline.kin.read_all(STREAM).await
}

const SETUP: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, price int);
INSERT INTO items SELECT g, 'item ' || g, g * 3 FROM generate_series(1, 5000) g;
CREATE TABLE notes (body text);
INSERT INTO notes SELECT 'note ' || g FROM generate_series(1, 10) g;
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_arrive_as_snapshots_then_the_stream_follows() -> Result<()> {
    let mut pipeline =
        Pipeline::start(STREAM, 2, SETUP, "[source]\nsnapshot = \"initial\"\n").await?;
    pipeline
        .pg
        .execute_each(&[
            "UPDATE items SET price = 0 WHERE id <= 100",
            "DELETE FROM items WHERE id > 4900",
            "INSERT INTO items VALUES (9001, 'new', 1)",
        ])
        .await?;
    let records = settled(&pipeline).await?;
    let envelopes: Vec<Value> = records.iter().map(|r| r.json()).collect::<Result<_>>()?;
    let snapshots: Vec<&Value> = envelopes.iter().filter(|e| e["op"] == "snapshot").collect();
    ensure!(
        snapshots.len() == 5010,
        "{} snapshot envelopes for 5,010 rows",
        snapshots.len()
    );
    for e in &snapshots {
        assert_eq!(e["source"]["snapshot"], true);
        assert_eq!(e["before"], Value::Null);
        assert_eq!(e["source"]["tx_id"], Value::Null);
    }
    let latest_snapshot = snapshots
        .iter()
        .map(|e| e["source"]["position"].as_str().unwrap())
        .max()
        .unwrap();
    let earliest_change = envelopes
        .iter()
        .filter(|e| e["op"] != "snapshot")
        .map(|e| e["source"]["position"].as_str().unwrap())
        .min()
        .unwrap();
    assert!(
        latest_snapshot < earliest_change,
        "snapshot rows sort before every change: {latest_snapshot} vs {earliest_change}"
    );
    let mut ids: Vec<&str> = snapshots
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5010, "snapshot ids are distinct");
    assert!(
        envelopes.iter().any(|e| e["op"] == "snapshot"
            && e["source"]["table"] == "notes"
            && e["key"].is_null()),
        "tables without a key are copied too"
    );
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    pipeline.stop_gracefully().await?;

    // A restart streams on: no second snapshot.
    pipeline.restart().await?;
    pipeline
        .pg
        .execute("INSERT INTO items VALUES (9002, 'later', 2)")
        .await?;
    let again = settled(&pipeline).await?;
    assert_eq!(again.len(), records.len() + 1, "only the new change");
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// 30,000 keyed rows, 4,000 rows keyed by text and a table without a key,
/// copied in 500-row chunks by the default 4 readers: `items` is split
/// into ranges of its integer key, `codes` at the quantiles of its key's
/// statistics; a few seconds of snapshot to write during or to kill in
/// the middle.
const LARGE: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, price int);
INSERT INTO items SELECT g, 'item ' || g, g * 3 FROM generate_series(1, 30000) g;
CREATE TABLE codes (code text PRIMARY KEY, n int);
INSERT INTO codes SELECT md5(g::text), g FROM generate_series(1, 4000) g;
CREATE TABLE notes (body text);
INSERT INTO notes SELECT 'note ' || g FROM generate_series(1, 10) g;
ANALYZE items; ANALYZE codes;
";
const LARGE_ROWS: u64 = 34_010;
const LARGE_CONFIG: &str = "[source]\nsnapshot = \"initial\"\nsnapshot_chunk_rows = 500\n\
     [sink]\nmax_in_flight_bytes = 1048576\n";

/// Inserts, updates and deletes rows of `items` until `done`; returns the
/// rounds it ran.
fn spawn_writer(
    client: tokio_postgres::Client,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Result<u32>> {
    tokio::spawn(async move {
        let mut n = 0u32;
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            client
                .batch_execute(&format!(
                    "UPDATE items SET price = price + 1, name = 'w{n}' WHERE id = {}; \
                     DELETE FROM items WHERE id = {}; \
                     INSERT INTO items VALUES ({}, 'new {n}', {n}); \
                     UPDATE codes SET n = -n WHERE code = md5('{}'); \
                     DELETE FROM codes WHERE code = md5('{}')",
                    (n * 37) % 30_000 + 1,
                    (n * 53) % 30_000 + 1,
                    100_000 + n,
                    (n * 7) % 4_000 + 1,
                    (n * 11) % 4_000 + 1,
                ))
                .await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(n)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_killed_midway_resumes_after_its_acknowledged_chunks_and_converges() -> Result<()>
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tributary_integration_tests::snapshot_resume;
    let mut pipeline = tributary_integration_tests::Servers::start(STREAM, 2, LARGE)
        .await?
        .start_tributary_without_waiting(LARGE_CONFIG)
        .await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(pipeline.pg.client(DEFAULT_DATABASE).await?, done.clone());
    let (marker, progress) = marker_after_3000_items(&pipeline).await?;
    pipeline.tributary.kill9().await?;
    ensure!(
        ranges_of(&progress, "public.items") == 4,
        "items is read in 4 key ranges: {progress}"
    );
    let before_kill = pipeline.kin.read_all(STREAM).await?.len();
    eprintln!("killed with {before_kill} snapshot rows out; stored progress {progress}");

    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let logs = pipeline.tributary.logs();
    snapshot_resume::assert_resumed(&logs, LARGE_ROWS)?;
    done.store(true, Ordering::Relaxed);
    let rounds = writer.await??;
    ensure!(
        rounds > 10,
        "the writer ran during the snapshot ({rounds} rounds)"
    );
    let records = settled(&pipeline).await.context("after the restart")?;
    eprintln!("{rounds} write rounds; {} records in all", records.len());
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    assert_replica_matches(&pipeline, &records, "public.codes", &["code"]).await?;
    assert!(!marker.exists(), "the marker is removed once complete");
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// The snapshot marker's path, once it records 3,000 acknowledged rows of
/// `items`, and the progress it holds then.
async fn marker_after_3000_items(
    pipeline: &tributary_integration_tests::Pipeline,
) -> Result<(std::path::PathBuf, Value)> {
    let marker = pipeline
        .config
        .state_dir
        .join("postgres-snapshot-tributary_shop.pending");
    let progress = tributary_integration_tests::snapshot_resume::wait_for_acknowledged_chunk(
        &marker,
        "public.items",
        3_000,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| pipeline.tributary.logs())?;
    Ok((marker, progress))
}

/// A snapshot stopped by SIGTERM drains what it handed over, and the
/// marker records it: the next start sends no snapshot row twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_stopped_by_sigterm_records_what_it_drained() -> Result<()> {
    let mut pipeline = tributary_integration_tests::Servers::start(STREAM, 2, LARGE)
        .await?
        .start_tributary_without_waiting(LARGE_CONFIG)
        .await?;
    let (marker, _) = marker_after_3000_items(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    ensure!(marker.exists(), "stopped before the snapshot completed");
    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    let records = settled(&pipeline).await?;
    tributary_integration_tests::snapshot_resume::assert_snapshot_rows_once(&records, LARGE_ROWS)?;
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// A snapshot stopped midway, then resumed with a table added to
/// `source.tables` (published only now) while a transaction that wrote to
/// that table before the restart is still open: its rows are neither
/// decoded (written before the table was published) nor in a copy taken
/// before it commits, so the resumed copy waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_snapshot_copies_rows_of_a_transaction_open_across_an_added_table() -> Result<()>
{
    let setup = format!("{LARGE} CREATE TABLE extra (id int PRIMARY KEY, v text);");
    let mut pipeline = tributary_integration_tests::Servers::start(STREAM, 2, &setup)
        .await?
        .start_tributary_without_waiting(&LARGE_CONFIG.replacen(
            "[sink]",
            "tables = [\"public.items\", \"public.codes\"]\n[sink]",
            1,
        ))
        .await?;
    let (marker, _) = marker_after_3000_items(&pipeline).await?;
    pipeline.stop_gracefully().await?;
    ensure!(marker.exists(), "stopped before the snapshot completed");
    tributary_integration_tests::set_tables(
        &pipeline.config.path,
        &["public.items", "public.codes", "public.extra"],
    )?;
    let open = pipeline.pg.client(DEFAULT_DATABASE).await?;
    open.batch_execute(
        "BEGIN; INSERT INTO extra SELECT g, 'open across the restart' FROM generate_series(1, 10) g",
    )
    .await?;
    let commit_later = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        open.batch_execute("COMMIT").await
    });
    pipeline
        .restart_with_timeout(Duration::from_secs(120))
        .await?;
    commit_later.await??;
    let records = settled(&pipeline).await?;
    assert_replica_matches(&pipeline, &records, "public.extra", &["id"]).await?;
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// The key ranges the stored snapshot `progress` planned for `table`.
fn ranges_of(progress: &Value, table: &str) -> usize {
    progress["ranges"].as_array().map_or(0, |ranges| {
        ranges.iter().filter(|r| r["table"] == table).count()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_readers_copy_tables_and_key_ranges_at_one_point_while_a_writer_runs() -> Result<()>
{
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let servers = tributary_integration_tests::Servers::start(STREAM, 2, LARGE).await?;
    let done = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(servers.pg.client(DEFAULT_DATABASE).await?, done.clone());
    let pipeline = servers
        .start_tributary_without_waiting(LARGE_CONFIG)
        .await?;
    let marker = pipeline
        .config
        .state_dir
        .join("postgres-snapshot-tributary_shop.pending");
    let logs_say = |text: &str| pipeline.tributary.logs().contains(text);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !logs_say("snapshot complete") {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no snapshot complete:\n{}",
            pipeline.tributary.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    let rounds = writer.await??;
    ensure!(
        rounds > 10,
        "the writer ran during the snapshot ({rounds} rounds)"
    );
    ensure!(
        pipeline.tributary.logs().contains("\"readers\":4"),
        "four readers:\n{}",
        pipeline.tributary.logs()
    );
    assert!(!marker.exists(), "the marker is removed once complete");
    let records = settled(&pipeline).await?;
    let envelopes: Vec<Value> = records.iter().map(|r| r.json()).collect::<Result<_>>()?;
    let snapshots: Vec<&Value> = envelopes.iter().filter(|e| e["op"] == "snapshot").collect();
    // The writer ran before the consistent point too: the tables held
    // about LARGE_ROWS rows then, each copied once.
    let rows: BTreeSet<(String, String)> = snapshots
        .iter()
        .map(|e| (e["source"]["table"].to_string(), e["after"].to_string()))
        .collect();
    assert_eq!(rows.len(), snapshots.len(), "every row is copied once");
    ensure!(
        snapshots.len().abs_diff(LARGE_ROWS as usize) < 1_000,
        "{} snapshot envelopes for about {LARGE_ROWS} rows",
        snapshots.len()
    );
    let ids: BTreeSet<&str> = snapshots.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), snapshots.len(), "snapshot ids are distinct");
    // Each range has its own position space: its own major.
    let mut majors: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for e in &snapshots {
        let position = e["source"]["position"].as_str().context("position")?;
        let table = e["source"]["table"].as_str().context("table")?;
        majors.entry(table).or_default().insert(&position[..16]);
    }
    assert_eq!(majors["items"].len(), 4, "items read in 4 ranges");
    assert!(
        majors["codes"].len() >= 2,
        "codes split at its statistics: {majors:?}"
    );
    assert_eq!(
        majors["notes"].len(),
        1,
        "a table without a key is one pass"
    );
    let latest_snapshot = snapshots
        .iter()
        .filter_map(|e| e["source"]["position"].as_str())
        .max()
        .context("snapshot rows")?;
    let earliest_change = envelopes
        .iter()
        .filter(|e| e["op"] != "snapshot")
        .filter_map(|e| e["source"]["position"].as_str())
        .min()
        .context("the writer's changes")?;
    assert!(
        latest_snapshot < earliest_change,
        "snapshot rows sort before every change: {latest_snapshot} vs {earliest_change}"
    );
    eprintln!(
        "{rounds} write rounds during the snapshot; {} records",
        records.len()
    );
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    assert_replica_matches(&pipeline, &records, "public.codes", &["code"]).await?;
    Ok(())
}

/// Runs `snapshot = "only"` (plus `source` lines) on a database set up
/// with `setup`, and checks that it exited 0.
async fn snapshot_only(setup: &str, source: &str) -> Result<Pipeline> {
    let mut pipeline = tributary_integration_tests::Servers::start(STREAM, 2, setup)
        .await?
        .start_tributary_without_waiting(&format!("[source]\nsnapshot = \"only\"\n{source}"))
        .await?;
    let status = pipeline
        .tributary
        .wait_exit(Duration::from_secs(120))
        .await?;
    ensure!(
        status.success(),
        "exit 0: {status}\n{}",
        pipeline.tributary.logs()
    );
    Ok(pipeline)
}

const EVERY_TYPE: &str = r#"
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric, f4 real, f8 double precision,
    flag boolean, t text, vc varchar(20), ch char(5),
    raw bytea, js json, jsb jsonb, u uuid,
    d date, tm time, ts timestamp, tstz timestamptz, iv interval,
    arr_int int[], arr_text text[], m mood, cash money, nothing text,
    -- pgoutput leaves generated columns out of the stream (PostgreSQL 15)
    twice bigint GENERATED ALWAYS AS (i4::bigint * 2) STORED
);
"#;

/// The values of one row of `everything` after its id.
const VALUES: &str = r#"-32768, 2147483647, 9223372036854775807,
    12345678901234567890.123456789, 1.5, -2.25, true, E'héllo "world"\n', 'vc', 'ab',
    '\xdeadbeef', '{"a": [1, 2]}', '{"b": {"c": true}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
    '2026-11-23', '05:21:05.5', '2026-11-23 05:21:05.123456', '2026-11-23 07:21:05.123456+02',
    '1 day 02:00:00', '{1,NULL,3}', '{"a b",c}', 'happy', 1234.56, NULL"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_has_the_same_json_in_the_snapshot_and_the_stream() -> Result<()> {
    let setup = format!("{EVERY_TYPE} INSERT INTO everything VALUES (1, {VALUES});");
    let mut pipeline =
        Pipeline::start(STREAM, 1, &setup, "[source]\nsnapshot = \"initial\"\n").await?;
    pipeline
        .pg
        .execute(&format!("INSERT INTO everything VALUES (2, {VALUES})"))
        .await?;
    let records = settled(&pipeline).await?;
    let mut afters: Vec<(String, serde_json::Map<String, Value>)> = Vec::new();
    for record in &records {
        let envelope = record.json()?;
        let mut after = envelope["after"].as_object().context("after")?.clone();
        after.remove("id");
        afters.push((envelope["op"].as_str().unwrap().to_owned(), after));
    }
    afters.sort_by(|a, b| b.0.cmp(&a.0));
    let ops: Vec<&str> = afters.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(ops, ["snapshot", "insert"]);
    assert_eq!(
        afters[0].1, afters[1].1,
        "the snapshot path renders like the stream"
    );
    assert_eq!(afters[0].1["tstz"], "2026-11-23T05:21:05.123456Z");
    assert!(
        !afters[0].1.contains_key("twice"),
        "a generated column is in neither path"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

/// Text keys and values that `COPY` text escapes (tab, newline, carriage
/// return, backslash, the text `\N`), some of them the last key of a
/// chunk (chunks of 2 rows): each row arrives once, with its exact key
/// and value, and a null stays null.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_text_keys_and_values_are_copied_exactly_across_chunks() -> Result<()> {
    // The keys as the bodies of E'' literals.
    let keys = [
        r"a\tb", r"a\\b", r"\\N", r"a\nb", r"a\rb", "plain", r"tab\t", r"z\\\\",
    ];
    let mut setup = String::from("CREATE TABLE odd (k text PRIMARY KEY, v text);\n");
    for (i, key) in keys.iter().enumerate() {
        let value = if i == 3 {
            "NULL".to_owned()
        } else {
            format!("E'v{i}:{key}'")
        };
        setup.push_str(&format!("INSERT INTO odd VALUES (E'{key}', {value});\n"));
    }
    let pipeline = snapshot_only(&setup, "snapshot_chunk_rows = 2\n").await?;
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    let mut expected: Vec<(String, Option<String>)> = client
        .query("SELECT k, v FROM odd", &[])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    expected.sort();
    let mut copied: Vec<(String, Option<String>)> = Vec::new();
    for record in pipeline.kin.read_all(STREAM).await? {
        let envelope = record.json()?;
        let after = &envelope["after"];
        copied.push((
            after["k"].as_str().context("k is text")?.to_owned(),
            after["v"].as_str().map(str::to_owned),
        ));
    }
    copied.sort();
    assert_eq!(copied, expected, "every row once, keys and values exact");
    assert!(
        copied.iter().any(|(k, v)| k == "\\N" && v.is_some())
            && copied.iter().any(|(_, v)| v.is_none()),
        "the text \\N is text, null is null: {copied:?}"
    );
    Ok(())
}

/// `COPY` writes a row of a table without columns and a row whose only
/// column is the empty text alike, as an empty line: the first is an
/// envelope with an empty `after`, the second keeps its `""`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_lines_of_a_table_without_columns_and_of_one_empty_text_are_copied() -> Result<()> {
    let setup = "CREATE TABLE nothing ();\n\
                 INSERT INTO nothing DEFAULT VALUES;\n\
                 INSERT INTO nothing DEFAULT VALUES;\n\
                 CREATE TABLE blank (t text);\n\
                 INSERT INTO blank VALUES ('');\n";
    let pipeline = snapshot_only(setup, "").await?;
    let mut afters: Vec<(String, Value)> = Vec::new();
    for record in pipeline.kin.read_all(STREAM).await? {
        let envelope = record.json()?;
        assert_eq!(envelope["op"], "snapshot", "{envelope}");
        afters.push((
            envelope["source"]["table"]
                .as_str()
                .context("table")?
                .to_owned(),
            envelope["after"].clone(),
        ));
    }
    afters.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        afters,
        [
            ("blank".to_owned(), serde_json::json!({"t": ""})),
            ("nothing".to_owned(), serde_json::json!({})),
            ("nothing".to_owned(), serde_json::json!({})),
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_only_copies_and_exits_0_leaving_nothing_on_the_server() -> Result<()> {
    let pipeline = snapshot_only(SETUP, "").await?;
    let records = pipeline.kin.read_all(STREAM).await?;
    ensure!(
        records.len() == 5010,
        "{} records for 5,010 rows",
        records.len()
    );
    assert!(
        records
            .iter()
            .all(|r| r.json().is_ok_and(|e| e["op"] == "snapshot"))
    );
    assert_replica_matches(&pipeline, &records, "public.items", &["id"]).await?;
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    let leftovers: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(leftovers, 0, "no slot and no publication were made");
    Ok(())
}

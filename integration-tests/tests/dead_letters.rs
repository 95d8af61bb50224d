//! Records Kinesis can never take (issue 7, items 4 and 5), end to end: a
//! 2 MiB row on kinesalite's 1 MiB records goes to the dead-letter store
//! with reason `too_large`, its size and the limit, while the rows around
//! it flow and the slot moves past it; `tributary dead-letter list` shows
//! it, and `dead-letter replay` keeps it while the stream's limit is still
//! too small. Then an entry that fits (the same row, as it would be once
//! the limit allows) is replayed, lands in the stream and leaves the store.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use tributary_integration_tests::{DEFAULT_DATABASE, Pipeline, TributaryProcess};

const STREAM: &str = "dlq-cdc";
const BIG: usize = 2 * 1024 * 1024;

/// Runs `tributary <args> -c <config>` to its end: (exit code, stdout, stderr).
async fn cli(config: &Path, args: &[&str]) -> Result<(i32, String, String)> {
    let mut full: Vec<&str> = args.to_vec();
    let config = config.to_str().context("config path is UTF-8")?;
    full.extend(["-c", config]);
    let dir = Path::new(config).parent().unwrap_or(Path::new("."));
    let mut process = TributaryProcess::spawn(&full, &[], dir)?;
    let status = process.wait_exit(Duration::from_secs(60)).await?;
    Ok((
        status.code().unwrap_or(-1),
        process.stdout(),
        process.stderr(),
    ))
}

async fn list_json(config: &Path) -> Result<Vec<Value>> {
    let (code, stdout, stderr) = cli(config, &["dead-letter", "list", "--json"]).await?;
    assert_eq!(code, 0, "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).context("a list --json line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_too_large_for_the_stream_is_dead_lettered_listed_and_replayed() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE docs (id int PRIMARY KEY, body text NOT NULL)",
        "",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(&format!(
        "INSERT INTO docs VALUES (1, 'small'); \
         INSERT INTO docs VALUES (2, repeat('x', {BIG})); \
         INSERT INTO docs VALUES (3, 'small too')"
    ))
    .await?;
    let committed = pipeline.pg.current_wal_lsn().await?;
    // The rows around the big one flow, and the acknowledgement moves past
    // it: it is durably in the dead-letter store.
    let records = pipeline
        .kin
        .wait_for_records(STREAM, 2, Duration::from_secs(60))
        .await?;
    pipeline
        .wait_confirmed_flush(committed, Duration::from_secs(60))
        .await?;
    let ids: Vec<i64> = records
        .iter()
        .map(|r| Ok(r.json()?["after"]["id"].as_i64().unwrap_or(-1)))
        .collect::<Result<_>>()?;
    assert_eq!(
        {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids
        },
        [1, 3]
    );

    let config = pipeline.config.path.clone();
    let entries = list_json(&config).await?;
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry = &entries[0];
    assert_eq!(entry["reason"], "too_large");
    assert_eq!(entry["stream"], STREAM);
    assert_eq!(entry["partition_key"], "public.docs:2");
    assert_eq!(entry["limit"], 1024 * 1024);
    assert!(
        entry["size"].as_u64().unwrap() > BIG as u64,
        "{}",
        entry["size"]
    );
    assert_eq!(entry["attempts"], 0);
    assert!(entry["error"].as_str().unwrap().contains("1048576"));
    assert_eq!(entry["envelope"]["after"]["id"], 2);
    assert_eq!(
        entry["envelope"]["after"]["body"].as_str().unwrap().len(),
        BIG
    );
    let id = entry["envelope"]["id"].as_str().unwrap().to_owned();
    assert_eq!(entry["id"], id.as_str());
    assert!(entry["at"].as_str().unwrap().ends_with('Z'));
    let (code, stdout, _) = cli(&config, &["dead-letter", "list"]).await?;
    assert_eq!(code, 0);
    assert!(
        stdout.contains("reason=too_large") && stdout.contains(&format!("id={id}")),
        "{stdout}"
    );

    // The stream still takes at most 1 MiB: replay keeps it, exit 1.
    let (code, _, stderr) =
        cli(&config, &["dead-letter", "replay", "--reason", "too_large"]).await?;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("still too large"), "{stderr}");
    assert_eq!(list_json(&config).await?.len(), 1);

    // Once the record fits (kinesalite cannot raise a stream's limit: the
    // entry is shrunk to what a raised limit would let through), replay
    // sends it and it leaves the store; --reason and --id select.
    let store = pipeline
        .config
        .state_dir
        .join("dead-letters/dead-letters.jsonl");
    let text = std::fs::read_to_string(&store)?;
    let fits = text.replace(&"x".repeat(BIG), "now small");
    std::fs::write(&store, format!("{text}{fits}"))?;
    let (code, _, stderr) =
        cli(&config, &["dead-letter", "replay", "--reason", "rejected"]).await?;
    assert_eq!(code, 0, "nothing is selected: {stderr}");
    assert_eq!(list_json(&config).await?.len(), 2);
    let (code, _, stderr) = cli(&config, &["dead-letter", "replay", "--id", &id]).await?;
    // The first entry of the key is still too large, so the second one,
    // later for the same key, is held behind it.
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("held"), "{stderr}");

    // Meanwhile the row changed again, and that newer change is in the
    // stream: the replayed entry will land after it (the known gap).
    db.batch_execute("UPDATE docs SET body = 'newer' WHERE id = 2")
        .await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 3, Duration::from_secs(30))
        .await?;

    // Without the too-large original (say it was replayed by hand), the
    // fitting entry goes through and leaves the store; replay says that it
    // keeps its original position, which consumers use to skip it.
    std::fs::write(&store, format!("\n{fits}"))?;
    std::fs::remove_file(store.with_file_name("dead-letters.replayed")).ok();
    let (code, _, stderr) = cli(&config, &["dead-letter", "replay", "--id", &id]).await?;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("replayed 1 of 1"), "{stderr}");
    assert!(
        stderr.contains("keep their original source.position"),
        "{stderr}"
    );
    assert!(list_json(&config).await?.is_empty());
    let all = pipeline
        .kin
        .wait_for_records(STREAM, 4, Duration::from_secs(30))
        .await?;
    // Key 2's events in stream order (one shard, sequence order): the
    // newer update, then the replayed insert with its original id and
    // position, which sorts below the update's.
    let key_2: Vec<Value> = all
        .iter()
        .map(|r| r.json())
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .filter(|e| e["after"]["id"] == 2)
        .collect();
    assert_eq!(key_2.len(), 2, "{key_2:?}");
    let (newer, replayed) = (&key_2[0], &key_2[1]);
    assert_eq!(newer["after"]["body"], "newer");
    assert_eq!(replayed["id"], id.as_str());
    assert_eq!(replayed["after"]["body"], "now small");
    assert_eq!(
        replayed["source"]["position"],
        entry["envelope"]["source"]["position"]
    );
    let position = |e: &Value| {
        e["source"]["position"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(position(replayed) < position(newer));
    // A consumer that applies an event only when its position is above the
    // last one it applied for the key (docs/consumers.md) ends with the
    // newest row.
    let mut last: Option<&Value> = None;
    for event in &key_2 {
        if last.is_none_or(|l| position(event) > position(l)) {
            last = Some(event);
        }
    }
    assert_eq!(last.unwrap()["after"]["body"], "newer");
    pipeline.stop_gracefully().await?;
    Ok(())
}

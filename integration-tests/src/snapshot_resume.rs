//! Helpers of the snapshot resume tests: watching the progress a snapshot
//! stores in its marker file, and reading what a resumed run says it did.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// Waits until the snapshot progress in `marker` records an acknowledged
/// chunk of `table` (a stored key after which it resumes) and at least
/// `min_rows` acknowledged rows in all; returns the stored progress. Fails after `timeout`, or when the marker disappears
/// (the snapshot finished first).
pub async fn wait_for_acknowledged_chunk(
    marker: &Path,
    table: &str,
    min_rows: u64,
    timeout: Duration,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen_marker = false;
    loop {
        match std::fs::read(marker) {
            Ok(bytes) => {
                seen_marker = true;
                if let Ok(progress) = serde_json::from_slice::<Value>(&bytes)
                    && acknowledged_rows(&progress, table) >= Some(min_rows)
                {
                    return Ok(progress);
                }
            }
            Err(_) if seen_marker => bail!(
                "{} disappeared before a chunk of {table} was recorded: the snapshot finished too soon",
                marker.display()
            ),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "no acknowledged chunk of {table} in {} within {timeout:?}",
                marker.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The rows of `table` the stored `progress` records as acknowledged,
/// when one of its chunks is: for a snapshot read table by table, the
/// ordinal of the snapshot when `table` has a stored key; for one read in
/// key ranges, the sum of its ranges' ordinals when one of them has a
/// stored key.
pub fn acknowledged_rows(progress: &Value, table: &str) -> Option<u64> {
    if progress["tables"][table]["after"].is_array() {
        return progress["ordinal"].as_u64();
    }
    let ranges: Vec<&Value> = progress["ranges"]
        .as_array()?
        .iter()
        .filter(|r| r["table"] == table)
        .collect();
    ranges
        .iter()
        .any(|r| r["state"]["after"].is_array())
        .then(|| ranges.iter().filter_map(|r| r["ordinal"].as_u64()).sum())
}

/// The `rows` of the `snapshot complete` line in JSON `logs`: the rows
/// the run that finished the snapshot read.
pub fn rows_of_completed_snapshot(logs: &str) -> Result<u64> {
    logs.lines()
        .filter(|l| l.contains("snapshot complete"))
        .find_map(|l| serde_json::from_str::<Value>(l).ok()?["rows"].as_u64())
        .with_context(|| format!("no `snapshot complete` line with rows:\n{logs}"))
}

/// The keys the resumed run says it resumed tables after (the
/// `after_key` of its `resuming table` lines).
pub fn resume_points(logs: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("resuming table after its last acknowledged key"))
        .filter_map(|l| {
            let line: Value = serde_json::from_str(l).ok()?;
            Some(format!("{} after {}", line["table"], line["after_key"]))
        })
        .collect()
}

/// Checks the logs of the run that resumed a snapshot of tables holding
/// `table_rows` rows: it names where it resumed, and it read fewer rows
/// than the tables hold (printed). Returns the rows it read.
pub fn assert_resumed(logs: &str, table_rows: u64) -> Result<u64> {
    let resumed = resume_points(logs);
    ensure!(
        !resumed.is_empty(),
        "the restart says where it resumes:\n{logs}"
    );
    let estimated = logs
        .lines()
        .filter(|l| l.contains("resuming table after its last acknowledged key"))
        .find_map(|l| serde_json::from_str::<Value>(l).ok()?["estimated_rows"].as_u64());
    ensure!(
        estimated.is_some_and(|rows| rows > 0),
        "the resumed table's estimated rows come from the statistics ({estimated:?}):\n{logs}"
    );
    let resent = rows_of_completed_snapshot(logs)?;
    eprintln!("resumed {resumed:?}: {resent} of {table_rows} rows read again after the restart");
    ensure!(
        resent < table_rows,
        "fewer rows re-sent ({resent}) than the tables hold ({table_rows})"
    );
    Ok(resent)
}

/// Fails unless `records` hold exactly `rows` snapshot rows, none of them
/// twice (by id): what a snapshot stopped gracefully and resumed delivers.
pub fn assert_snapshot_rows_once(records: &[crate::StreamRecord], rows: u64) -> Result<()> {
    let mut ids = std::collections::HashSet::new();
    for record in records {
        let envelope = record.json()?;
        if envelope["op"] == "snapshot" {
            let id = envelope["id"].as_str().unwrap_or_default().to_owned();
            ensure!(
                ids.insert(id.clone()),
                "{id} was sent before the stop and again after it"
            );
        }
    }
    ensure!(
        ids.len() as u64 == rows,
        "{} snapshot rows, expected {rows}",
        ids.len()
    );
    Ok(())
}

//! A row far larger than the stream's record limit: it goes to the
//! dead-letter store, the stream flows on, and memory stays bounded.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tributary_integration_tests::Pipeline;

const STREAM: &str = "big-cdc";
/// The row: 30 MiB of text, on a stream that takes 1 MiB records.
const ROW_BYTES: usize = 30 << 20;
/// `sink.max_in_flight_bytes` of the test (the default).
const BUDGET: u64 = 64 << 20;
/// What the process may grow by beyond the budget (allocator arenas,
/// the dead-letter write).
const CONSTANT: u64 = 16 << 20;

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("no value")?
        .parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_over_the_record_limit_is_dead_lettered_in_bounded_memory() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        "CREATE TABLE big (id int PRIMARY KEY, body text)",
        &format!("[sink]\nmax_in_flight_bytes = {BUDGET}\n"),
    )
    .await?;
    // Warm up, so the baseline is a working pipeline's.
    pipeline
        .pg
        .execute("INSERT INTO big SELECT g, repeat('w', 1000) FROM generate_series(1, 200) g")
        .await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 200, Duration::from_secs(60))
        .await?;
    let pid = pipeline.tributary.pid();
    let baseline = status_kib(pid, "VmRSS:")? * 1024;

    pipeline
        .pg
        .execute_each(&[
            &format!("INSERT INTO big VALUES (0, repeat('x', {ROW_BYTES}))"),
            "INSERT INTO big SELECT g, 'after' FROM generate_series(201, 210) g",
        ])
        .await?;
    let records = pipeline
        .kin
        .wait_for_records(STREAM, 210, Duration::from_secs(120))
        .await
        .with_context(|| pipeline.tributary.logs())?;
    let peak = status_kib(pid, "VmHWM:")? * 1024;
    ensure!(
        records.iter().all(|r| r.data.len() < 1 << 20),
        "nothing over the limit reached the stream"
    );

    let dead_letters = pipeline.config.state_dir.join("dead-letters");
    let file = std::fs::read_dir(&dead_letters)?
        .filter_map(|entry| entry.ok())
        .find(|entry| entry.file_name().to_string_lossy().ends_with(".jsonl"))
        .context("a dead-letter file")?;
    let text = std::fs::read_to_string(file.path())?;
    let entries: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        entries.len() == 1,
        "one dead letter, found {}",
        entries.len()
    );
    let entry = &entries[0];
    let reason = entry["reason"].to_string();
    ensure!(
        reason.contains("too_large") || reason.contains("exceeds"),
        "{entry:.300}"
    );
    let body = entry["envelope"]["after"]["body"]
        .as_str()
        .context("the dead letter holds the whole row")?;
    ensure!(body.len() == ROW_BYTES);

    let grew = peak.saturating_sub(baseline);
    eprintln!(
        "baseline VmRSS {} MiB, VmHWM {} MiB: grew by {} MiB for a {} MiB row (budget {} MiB)",
        baseline >> 20,
        peak >> 20,
        grew >> 20,
        ROW_BYTES >> 20,
        BUDGET >> 20
    );
    ensure!(
        grew <= BUDGET + CONSTANT,
        "memory grew by {} MiB, more than the budget plus {} MiB",
        grew >> 20,
        CONSTANT >> 20
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

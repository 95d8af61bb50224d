//! `tributary-verify-bench`: how long `tributary verify` takes on a large
//! table and how much memory it needs (issue 11: peak RSS for 1,000,000
//! rows, target <= 256 MiB).
//!
//! A throwaway PostgreSQL 15 gets a 5-column table of `--rows` rows; a
//! `tributary run` with `snapshot = "only"` and `sink.aggregation = true`
//! copies it into a kinesalite stream of `--shards` shards and exits; then
//! `tributary verify --json` runs under `/usr/bin/time`, which reports its
//! wall time and peak RSS. The binary is `TRIBUTARY_BIN` (default
//! `target/debug/tributary`: use a release build for speed figures).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use tributary_integration_tests::{Servers, TributaryProcess, tributary_bin, write_config};

/// The stream the table is copied to.
const STREAM: &str = "verify-bench";

/// Options.
#[derive(Debug, Parser)]
struct Args {
    /// Rows in the table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Shards of the stream.
    #[arg(long, default_value_t = 4)]
    shards: u32,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let servers = Servers::start(
        STREAM,
        args.shards,
        "CREATE TABLE big (id bigint PRIMARY KEY, name text, amount numeric, \
         at timestamptz, flag boolean)",
    )
    .await?;
    servers
        .pg
        .execute(&format!(
            "INSERT INTO big SELECT g, 'name ' || g, g * 1.25, \
             TIMESTAMPTZ '2026-01-01' + g * INTERVAL '1 second', g % 2 = 0 \
             FROM generate_series(1, {}) g",
            args.rows
        ))
        .await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &servers.pg,
        &servers.kin,
        STREAM,
        "[source]\nsnapshot = \"only\"\n[sink]\naggregation = true\n\
         [sink.quota]\nrecords_per_shard_per_sec = 50000\nbytes_per_shard_per_sec = 1000000000\n",
    )?;
    let copy_started = Instant::now();
    let mut copy = TributaryProcess::run(&config.path, &[])?;
    let status = copy.wait_exit(Duration::from_secs(3600)).await?;
    ensure!(
        status.success(),
        "the snapshot copy failed:\n{}",
        copy.logs()
    );
    println!(
        "copied {} rows into {STREAM} ({} shards) in {:.1} s",
        args.rows,
        args.shards,
        copy_started.elapsed().as_secs_f64()
    );
    let bin = tributary_bin()?;
    let output = Command::new("/usr/bin/time")
        .args(["-f", "wall_s=%e peak_rss_kib=%M cpu_s=%U+%S"])
        .arg(&bin)
        .args(["verify", "--json", "-c"])
        .arg(&config.path)
        .envs(tributary_integration_tests::EMULATOR_AWS_ENV)
        .output()
        .context("running tributary verify under /usr/bin/time")?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)
        .with_context(|| String::from_utf8_lossy(&output.stderr).into_owned())?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let measured = stderr.lines().last().unwrap_or_default();
    println!(
        "verify ({}): exit {:?}, match {}, {measured}",
        bin.display(),
        output.status.code(),
        report["match"]
    );
    if let Some(kib) = measured
        .split_whitespace()
        .find_map(|field| field.strip_prefix("peak_rss_kib="))
        .and_then(|kib| kib.parse::<u64>().ok())
    {
        println!("peak RSS {:.0} MiB", kib as f64 / 1024.0);
    }
    Ok(())
}

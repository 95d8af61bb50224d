//! `tributary-kinesis-bench`: the Kinesis writer benchmark of issue 7.
//!
//! One run, against kinesalite (optionally behind a proxy that adds
//! `--latency-ms` to every answer):
//! 1. Tributary drains a Postgres backlog of `--rows` single-row changes
//!    (~300-byte envelopes, `--transactions` transactions) into stream
//!    `trib` of `--shards` shards: wall time from start to the slot's
//!    acknowledgement of the last commit, and Tributary's CPU seconds.
//! 2. A bare PutRecords client sends the very envelopes Tributary wrote
//!    (read back from `trib`) to stream `bare`: `--max-in-flight` workers
//!    per shard, each with one 500-record call in flight (Tributary's
//!    concurrency: `sink.max_in_flight_per_shard` calls per shard lane),
//!    records grouped by their shard.
//!
//! The figures are printed as a Markdown table row each; nothing is
//! asserted. The numbers are noisy on a shared 2-core machine: kinesalite
//! (one node process) is the bottleneck of both.
//!
//! `--quota N` sets `sink.quota.records_per_shard_per_sec` (default: 50,000,
//! so the quota does not bind and the writer is measured); with `1000` and
//! `--latency-ms 150` it shows what the distance does to a shard's quota;
//! `--max-in-flight 1` gives the lane of one call in flight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use clap::Parser;
use tributary_integration_tests::{DEFAULT_DATABASE, FaultProxy, Servers, StreamRecord};

/// The benchmark's options.
#[derive(Debug, Parser)]
struct Args {
    /// Changes in the backlog.
    #[arg(long, default_value_t = 50_000)]
    rows: u32,
    /// Transactions the backlog is committed in.
    #[arg(long, default_value_t = 50)]
    transactions: u32,
    /// Shards of each stream.
    #[arg(long, default_value_t = 4)]
    shards: u32,
    /// Milliseconds added to every Kinesis answer (a distant region).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// `sink.quota.records_per_shard_per_sec`.
    #[arg(long, default_value_t = 50_000)]
    quota: u32,
    /// `sink.aggregation`.
    #[arg(long)]
    aggregation: bool,
    /// `sink.max_in_flight_per_shard` (and the bare client's calls in
    /// flight per shard).
    #[arg(long, default_value_t = 2)]
    max_in_flight: usize,
}

const TRIB: &str = "trib";
const BARE: &str = "bare";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let servers = Servers::start(
        TRIB,
        args.shards,
        "CREATE TABLE bench (id int PRIMARY KEY, n bigint NOT NULL, pad text NOT NULL)",
    )
    .await?;
    servers.kin.create_stream(BARE, args.shards).await?;
    let proxy = FaultProxy::start_with_latency(
        SocketAddr::from(([127, 0, 0, 1], servers.kin.port())),
        Duration::from_millis(args.latency_ms),
    )
    .await?;
    let extra = format!(
        "[log]\nlevel = \"warn\"\n[sink]\nendpoint_url = \"{}\"\naggregation = {}\n\
         max_in_flight_per_shard = {}\n[sink.quota]\nrecords_per_shard_per_sec = {}\nbytes_per_shard_per_sec = 1000000000\n",
        proxy.endpoint(),
        args.aggregation,
        args.max_in_flight,
        args.quota,
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    // The slot exists now: stop, commit the backlog, and time the drain.
    pipeline.stop_gracefully().await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    let per_tx = args.rows.div_ceil(args.transactions);
    let mut first = 0u32;
    while first < args.rows {
        let last = (first + per_tx).min(args.rows) - 1;
        db.batch_execute(&format!(
            "INSERT INTO bench SELECT g, g * 7, repeat(md5(g::text), 4) \
             FROM generate_series({first}, {last}) g"
        ))
        .await?;
        first = last + 1;
    }
    let end = pipeline.pg.current_wal_lsn().await?;

    let started = Instant::now();
    pipeline.restart().await?;
    let pid = pipeline.tributary.pid();
    loop {
        if pipeline.confirmed_flush_lsn().await? >= end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let trib_wall = started.elapsed();
    let trib_cpu = cpu_seconds(pid)?;
    pipeline.stop_gracefully().await?;

    let written = pipeline.kin.read_all(TRIB).await?;
    let client = tributary_integration_tests::kinesis_client(&proxy.endpoint()).await;
    let (bare_wall, bare_records) = bare_client(&client, &written, args.max_in_flight).await?;

    let rows = f64::from(args.rows);
    let trib_rate = rows / trib_wall.as_secs_f64();
    let bare_rate = bare_records as f64 / bare_wall.as_secs_f64();
    println!(
        "| rows | shards | latency ms | quota/shard | calls in flight/shard | aggregation | kinesis records | tributary s | tributary events/s | tributary CPU-s / M events | bare records | bare s | bare records/s | ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.0} | {:.2} | {} | {:.2} | {:.0} | {:.2} |",
        args.rows,
        args.shards,
        args.latency_ms,
        args.quota,
        args.max_in_flight,
        args.aggregation,
        written.len(),
        trib_wall.as_secs_f64(),
        trib_rate,
        trib_cpu / rows * 1e6,
        bare_records,
        bare_wall.as_secs_f64(),
        bare_rate,
        trib_rate / bare_rate,
    );
    Ok(())
}

/// Sends `records` (data and partition key as read) to stream `bare`:
/// `per_shard` workers per shard of origin, each sending every
/// `per_shard`-th 500-record call, one at a time; partial failures are sent
/// again. Returns the wall time and the records sent.
async fn bare_client(
    client: &Client,
    records: &[StreamRecord],
    per_shard: usize,
) -> Result<(Duration, usize)> {
    let mut groups: HashMap<&str, Vec<&StreamRecord>> = HashMap::new();
    for record in records {
        groups.entry(&record.shard_id).or_default().push(record);
    }
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for ((_, group), worker) in groups
        .into_iter()
        .flat_map(|group| (0..per_shard).map(move |w| (group.clone(), w)))
    {
        let client = client.clone();
        let group: Vec<(Vec<u8>, String)> = group
            .into_iter()
            .map(|r| (r.data.clone(), r.partition_key.clone()))
            .collect();
        workers.spawn(async move {
            for chunk in calls(&group).into_iter().skip(worker).step_by(per_shard) {
                let mut pending: Vec<PutRecordsRequestEntry> = chunk
                    .iter()
                    .map(|(data, key)| {
                        PutRecordsRequestEntry::builder()
                            .data(Blob::new(data.clone()))
                            .partition_key(key)
                            .build()
                            .expect("data and key are set")
                    })
                    .collect();
                while !pending.is_empty() {
                    let answer = client
                        .put_records()
                        .stream_name(BARE)
                        .set_records(Some(pending.clone()))
                        .send()
                        .await
                        .context("bare putrecords")?;
                    pending = pending
                        .into_iter()
                        .zip(answer.records())
                        .filter(|(_, r)| r.error_code().is_some())
                        .map(|(e, _)| e)
                        .collect();
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    Ok((started.elapsed(), records.len()))
}

/// `records` cut into PutRecords calls: at most 500 records and 5 MiB each.
fn calls(records: &[(Vec<u8>, String)]) -> Vec<&[(Vec<u8>, String)]> {
    let mut calls = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (data, key)) in records.iter().enumerate() {
        let weight = data.len() + key.len();
        if i > start && (i - start == 500 || bytes + weight > 5 << 20) {
            calls.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += weight;
    }
    if start < records.len() {
        calls.push(&records[start..]);
    }
    calls
}

/// User + system CPU seconds of process `pid` so far (Linux reports them
/// in USER_HZ = 100 ticks per second).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

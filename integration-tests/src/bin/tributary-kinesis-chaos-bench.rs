//! `tributary-kinesis-chaos-bench`: the writer's acceptance run on a
//! misbehaving Kinesis (issue 7): `--keys` rows changed in `--rounds`
//! rounds (one UPDATE of every row per round), streamed through an outage
//! proxy ([`FaultProxy`]) in front of [`KinesisFaults`] in front of
//! kinesalite, on a 4-shard stream.
//!
//! With `--faults`: 10% of PutRecords entries refused as throttled, 2%
//! InternalFailure, 3% of whole calls HTTP 500, `--resets` of calls carried
//! out and then reset without an answer. With `--outage-secs N`: the
//! endpoint stops answering for N seconds in the middle round. It prints
//! the drain time (first change to the last commit acknowledged), the
//! largest resident memory of `tributary` while it ran, whether nothing was
//! lost and per-key order held (the last occurrence of every change in
//! commit order), and the proxy's counts. Nothing is asserted: compare a
//! run without `--faults` against one with them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use tributary_integration_tests::{
    DEFAULT_DATABASE, FaultProxy, Faults, ITEMS_TABLE, KinesisFaults, Servers,
    check_last_occurrences, versions_per_key,
};

/// The benchmark's options.
#[derive(Debug, Parser)]
struct Args {
    /// Rows (keys).
    #[arg(long, default_value_t = 1_000)]
    keys: i32,
    /// Rounds: the insert, then UPDATEs of every row.
    #[arg(long, default_value_t = 20)]
    rounds: i32,
    /// Inject the faults (else the proxies only forward).
    #[arg(long)]
    faults: bool,
    /// Fraction of PutRecords calls reset without an answer (with `--faults`).
    #[arg(long, default_value_t = 0.01)]
    resets: f64,
    /// Seconds the endpoint stops answering in the middle round (0: none).
    #[arg(long, default_value_t = 0)]
    outage_secs: u64,
    /// `sink.quota.records_per_shard_per_sec`.
    #[arg(long, default_value_t = 5_000)]
    quota: u32,
    /// `sink.max_in_flight_bytes`.
    #[arg(long, default_value_t = 16 * 1024 * 1024)]
    budget: u64,
    /// The generator's seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

const STREAM: &str = "chaos";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let servers = Servers::start(STREAM, 4, ITEMS_TABLE).await?;
    let faults = if args.faults {
        Faults {
            reset_calls: args.resets,
            ..Faults::rough(args.seed)
        }
    } else {
        Faults::default()
    };
    let kinesis_faults = KinesisFaults::start(
        SocketAddr::from(([127, 0, 0, 1], servers.kin.port())),
        faults,
    )
    .await?;
    let outage = FaultProxy::start(kinesis_faults.addr()).await?;
    let extra = format!(
        "[log]\nlevel = \"warn\"\n[sink]\nendpoint_url = \"{}\"\nmax_in_flight_bytes = {}\n\
         [sink.quota]\nrecords_per_shard_per_sec = {}\n",
        outage.endpoint(),
        args.budget,
        args.quota
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let pid = pipeline.tributary.pid();
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;

    let started = Instant::now();
    let mut peak_rss_kib = 0;
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0 FROM generate_series(1, {}) g",
        args.keys
    ))
    .await?;
    for round in 1..args.rounds {
        let outage_now = args.outage_secs > 0 && round == args.rounds / 2;
        if outage_now {
            outage.pause();
        }
        db.batch_execute(&format!("UPDATE items SET v = {round}"))
            .await?;
        if outage_now {
            let until = Instant::now() + Duration::from_secs(args.outage_secs);
            while Instant::now() < until {
                peak_rss_kib = peak_rss_kib.max(rss_kib(pid).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            outage.resume();
        }
    }
    let end = pipeline.pg.current_wal_lsn().await?;
    while pipeline.confirmed_flush_lsn().await? < end {
        peak_rss_kib = peak_rss_kib.max(rss_kib(pid).unwrap_or(0));
        if started.elapsed() > Duration::from_secs(900) {
            anyhow::bail!("not drained in 900 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed();
    pipeline.stop_gracefully().await?;

    let records = pipeline.kin.read_all(STREAM).await?;
    let verdict = versions_per_key(&records).and_then(|per_key| {
        check_last_occurrences(&per_key, args.keys as usize, i64::from(args.rounds))
    });
    let counts = kinesis_faults.counts();
    println!(
        "changes {} | faults {} (resets {}) | outage {} s | drained in {:.2} s | \
         without the outage {:.2} s | peak RSS {} MiB (budget {} MiB) | records {} | {} | \
         refused {} entries, failed {} calls, reset {} calls",
        args.keys * args.rounds,
        args.faults,
        if args.faults { args.resets } else { 0.0 },
        args.outage_secs,
        drained.as_secs_f64(),
        drained.as_secs_f64() - args.outage_secs as f64,
        peak_rss_kib / 1024,
        args.budget >> 20,
        records.len(),
        match verdict {
            Ok(duplicates) => format!("nothing lost, per-key order held ({duplicates} duplicates)"),
            Err(err) => format!("FAILED: {err:#}"),
        },
        counts.refused_entries.load(Ordering::Relaxed),
        counts.failed_calls.load(Ordering::Relaxed),
        counts.reset_calls.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

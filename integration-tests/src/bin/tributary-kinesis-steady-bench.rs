//! `tributary-kinesis-steady-bench`: the Kinesis writer under a steady
//! change rate (issue 7): latency from commit to Kinesis, and the send rate
//! per shard over fixed windows.
//!
//! One run: a Postgres table gets `--rate` new rows per second, committed
//! every 10 ms, for `--secs` seconds, while Tributary streams them into a
//! stream of `--shards` shards through a proxy that adds `--latency-ms` to
//! every Kinesis answer, at `--quota` records per shard per second. Then
//! the stream is read back. `--warmup-secs` seconds (2) of changes at the
//! same rate go first and are acknowledged before the measured part
//! starts; they are left out of every figure (the histograms are taken as
//! the difference of two scrapes). It prints (nothing is asserted):
//! - commit → stored: per record, the stream's `ApproximateArrivalTimestamp`
//!   minus the envelope's `commit_ts` (exact, ms; but the store happens
//!   before the proxy delays the answer, so it leaves out the added
//!   latency);
//! - commit → acknowledged: the `tributary_commit_to_ack_seconds` histogram
//!   from `/metrics` (taken when the answer reaches Tributary), as the
//!   bucket bound at or above p50 and p99;
//! - the PutRecords call time and the limiter wait before each call
//!   (`tributary_kinesis_put_records_seconds`,
//!   `tributary_kinesis_limiter_wait_seconds`), as bucket bounds, to tell
//!   where a tail comes from;
//! - records per shard in each full `--window-secs` window of arrival
//!   times (the first and last, partial, windows left out), and the
//!   entries Kinesis refused (`tributary_kinesis_entries_refused_total`);
//! - the floor, in the same run: a bare PutRecords client at the same rate
//!   into a second stream of as many shards, through the same proxy, with
//!   no database. Every tick it queues the rate's share of the envelopes
//!   Tributary wrote, each in a queue for the shard it landed in; per
//!   shard up to `--max-in-flight` calls at once, each taking everything
//!   queued (at most 500), as Tributary's lanes do. It prints the time
//!   from queueing each record to the answer of the call that carried it
//!   (exact, ms): what the emulator and the proxy cost a client that does
//!   no work of its own. (Not with `--aggregation`.)
//!
//! With `--instant`, PutRecords goes to an endpoint of the bench's own
//! ([`InstantKinesis`]) that accepts every entry at once and notes when it
//! arrived, instead of kinesalite (which still describes the stream): the
//! same figures without the emulator's own queueing, so what is left is
//! Tributary's (and PostgreSQL's) share. "Stored" is then "reached the
//! endpoint", before the proxy delays the answer, and there is no bare
//! client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use clap::Parser;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tributary_envelope::time::parse_unix_millis;
use tributary_integration_tests::{
    DEFAULT_DATABASE, FaultProxy, InstantKinesis, Servers, StreamRecord, http_get, kinesis_client,
    unix_millis,
};
use tributary_kinesis::describe_stream;
use tributary_kinesis::metrics::{
    COMMIT_TO_ACK_SECONDS, ENTRIES_REFUSED, LIMITER_WAIT_SECONDS, PUT_RECORDS_SECONDS,
};

/// The benchmark's options.
#[derive(Debug, Parser)]
struct Args {
    /// Changes per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u32,
    /// Seconds the rate is kept.
    #[arg(long, default_value_t = 20)]
    secs: u64,
    /// Shards of the stream.
    #[arg(long, default_value_t = 8)]
    shards: u32,
    /// Milliseconds added to every Kinesis answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// `sink.quota.records_per_shard_per_sec`.
    #[arg(long, default_value_t = 1_000)]
    quota: u32,
    /// `sink.max_in_flight_per_shard`.
    #[arg(long, default_value_t = 2)]
    max_in_flight: usize,
    /// `sink.aggregation = true` (KPL aggregated records).
    #[arg(long)]
    aggregation: bool,
    /// PutRecords answered at once by the bench's own endpoint instead of
    /// kinesalite (see the module doc).
    #[arg(long)]
    instant: bool,
    /// Seconds of changes at the same rate before the measured part, left
    /// out of every figure (lanes, connections and limiters warm up).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Seconds of each send-rate window.
    #[arg(long, default_value_t = 5)]
    window_secs: i64,
}

const STREAM: &str = "steady";
/// The bare client's stream.
const BARE: &str = "steady-bare";
/// The most records one PutRecords call carries.
const MAX_CALL_RECORDS: usize = 500;
/// How often the writer commits.
const TICK: Duration = Duration::from_millis(10);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let servers = Servers::start(
        STREAM,
        args.shards,
        "CREATE TABLE steady (id bigint PRIMARY KEY, n bigint NOT NULL, pad text NOT NULL)",
    )
    .await?;
    let kinesalite = SocketAddr::from(([127, 0, 0, 1], servers.kin.port()));
    let instant = if args.instant {
        let client = kinesis_client(&format!("http://{kinesalite}")).await;
        let shards = describe_stream(&client, STREAM).await?.shards;
        Some(InstantKinesis::start(kinesalite, STREAM, shards).await?)
    } else {
        None
    };
    let proxy = FaultProxy::start_with_latency(
        instant.as_ref().map_or(kinesalite, InstantKinesis::addr),
        Duration::from_millis(args.latency_ms),
    )
    .await?;
    let extra = format!(
        "[log]\nlevel = \"warn\"\n[sink]\nendpoint_url = \"{}\"\nmax_in_flight_per_shard = {}\n\
         aggregation = {}\n[sink.quota]\nrecords_per_shard_per_sec = {}\n",
        proxy.endpoint(),
        args.max_in_flight,
        args.aggregation,
        args.quota,
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;

    // The warm-up: the same rate, acknowledged, then left out of every figure.
    let mut first_id = 0;
    if args.warmup_secs > 0 {
        first_id = write_steadily(&db, args.rate, args.warmup_secs, 0).await?.0;
        let end = pipeline.pg.current_wal_lsn().await?;
        pipeline
            .wait_confirmed_flush(end, Duration::from_secs(600))
            .await?;
    }
    let (_, warm) = http_get(pipeline.config.http_addr, "/metrics").await?;
    let measured_from = unix_millis();
    let (last_id, offered) = write_steadily(&db, args.rate, args.secs, first_id).await?;
    let written = last_id - first_id;
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(600))
        .await?;
    let (_, metrics) = http_get(pipeline.config.http_addr, "/metrics").await?;
    pipeline.stop_gracefully().await?;
    let records = match &instant {
        Some(instant) => instant.received(),
        None => pipeline.kin.read_all(STREAM).await?,
    };

    let mut stored_ms: Vec<i64> = Vec::with_capacity(records.len());
    let mut measured = 0;
    // Commit -> stored by second of commit time, to see when a tail happens.
    let mut by_second: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut arrivals: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for record in &records {
        let arrival = record.arrival_millis.context("a record without arrival")?;
        // An aggregated record carries several envelopes.
        let envelopes: Vec<Vec<u8>> = match tributary_kinesis::deaggregate(&record.data) {
            Some(subs) => subs?.into_iter().map(|sub| sub.data).collect(),
            None => vec![record.data.clone()],
        };
        for data in &envelopes {
            let envelope: serde_json::Value = serde_json::from_slice(data)?;
            let commit = envelope["source"]["commit_ts"]
                .as_str()
                .and_then(parse_unix_millis)
                .context("an envelope without commit_ts")?;
            // A warm-up row (committed before the measured part began).
            if commit < measured_from {
                continue;
            }
            stored_ms.push(arrival - commit);
            by_second
                .entry(commit / 1_000)
                .or_default()
                .push(arrival - commit);
        }
        if arrival >= measured_from {
            measured += 1;
            arrivals
                .entry(record.shard_id.clone())
                .or_default()
                .push(arrival);
        }
    }
    stored_ms.sort_unstable();
    let first_second = by_second.keys().next().copied().unwrap_or_default();
    let series: Vec<String> = by_second
        .iter_mut()
        .map(|(second, values)| {
            values.sort_unstable();
            format!(
                "{}s:{}/{}",
                second - first_second,
                percentile(values, 0.5),
                percentile(values, 0.99)
            )
        })
        .collect();

    println!(
        "rate {} changes/s offered {offered:.0}/s for {} s after {} s of warm-up; {} shards; \
         quota {}/shard; +{} ms; {} calls in flight/shard; aggregation {}; endpoint {}; \
         {measured} records of the measured part read back, {written} rows written in it",
        args.rate,
        args.secs,
        args.warmup_secs,
        args.shards,
        args.quota,
        args.latency_ms,
        args.max_in_flight,
        args.aggregation,
        if args.instant {
            "instant (bench's own)"
        } else {
            "kinesalite"
        },
    );
    println!(
        "commit -> stored (arrival at the endpoint): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&stored_ms, 0.50),
        percentile(&stored_ms, 0.99),
        stored_ms.last().copied().unwrap_or_default()
    );
    println!(
        "commit -> stored p50/p99 ms by second of commit: {}",
        series.join(" ")
    );
    let buckets = histogram_since(&warm, &metrics, COMMIT_TO_ACK_SECONDS);
    println!(
        "commit -> acknowledged (tributary_commit_to_ack_seconds): p50 <= {} s, p99 <= {} s ({} observed)",
        bucket_at(&buckets, 0.50),
        bucket_at(&buckets, 0.99),
        buckets.last().map_or(0.0, |(_, n)| *n),
    );
    for (what, name) in [
        ("PutRecords call", PUT_RECORDS_SECONDS),
        ("limiter wait", LIMITER_WAIT_SECONDS),
    ] {
        let buckets = histogram_since(&warm, &metrics, name);
        println!(
            "{what} ({name}): p50 <= {} s, p99 <= {} s ({} observed)",
            bucket_at(&buckets, 0.50),
            bucket_at(&buckets, 0.99),
            buckets.last().map_or(0.0, |(_, n)| *n),
        );
    }
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with(ENTRIES_REFUSED))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|count| count as u64)
        .sum();
    println!("entries refused by kinesis (warm-up included): {refused}");
    // With aggregation the records read back are packs of envelopes: a
    // bare client sending them is no comparison.
    if !args.aggregation && !args.instant {
        pipeline.kin.create_stream(BARE, args.shards).await?;
        pipeline.kin.wait_active(BARE).await?;
        let client = kinesis_client(&proxy.endpoint()).await;
        let mut bare_ms = bare_steady(&client, &records, &args).await?;
        bare_ms.sort_unstable();
        println!(
            "bare client, same rate and shards, {} calls in flight/shard, no database: \
             queued -> answered p50 {} ms, p99 {} ms, max {} ms ({} records)",
            args.max_in_flight,
            percentile(&bare_ms, 0.50),
            percentile(&bare_ms, 0.99),
            bare_ms.last().copied().unwrap_or_default(),
            bare_ms.len()
        );
    }
    let window_ms = args.window_secs * 1_000;
    for (shard, times) in &arrivals {
        let (first, last) = (times[0], times[times.len() - 1]);
        let mut counts: BTreeMap<i64, u64> = BTreeMap::new();
        for t in times {
            *counts.entry((t - first) / window_ms).or_default() += 1;
        }
        let full = (last - first) / window_ms;
        let rates: Vec<f64> = counts
            .iter()
            .filter(|(w, _)| **w < full)
            .map(|(_, n)| *n as f64 / args.window_secs as f64)
            .collect();
        println!(
            "{shard}: {} records; per {}-s window (records/s): {}",
            times.len(),
            args.window_secs,
            rates
                .iter()
                .map(|r| format!("{r:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// Inserts `rate` rows per second into the table for `secs` seconds, one
/// transaction per [`TICK`], ids from `first_id` on; returns the id after
/// the last row and the rate offered.
async fn write_steadily(
    db: &tokio_postgres::Client,
    rate: u32,
    secs: u64,
    first_id: u64,
) -> Result<(u64, f64)> {
    let mut pacer = Pacer::new(rate, secs);
    while let Some(rows) = pacer.tick().await {
        if rows == 0 {
            continue;
        }
        let from = first_id + pacer.sent - rows;
        db.batch_execute(&format!(
            "INSERT INTO steady SELECT g, g * 7, repeat(md5(g::text), 4) \
             FROM generate_series({}, {}) g",
            from,
            from + rows - 1
        ))
        .await?;
    }
    let offered = pacer.sent as f64 / pacer.started.elapsed().as_secs_f64();
    Ok((first_id + pacer.sent, offered))
}

/// A steady rate in ticks of [`TICK`]: how many changes (or records) are
/// due at each tick, for `secs` seconds. Tributary's writer and the bare
/// client are paced by the same one, so they offer the same load.
struct Pacer {
    per_tick: f64,
    secs: Duration,
    started: Instant,
    ticker: tokio::time::Interval,
    due: f64,
    /// Everything due so far.
    sent: u64,
}

impl Pacer {
    fn new(rate: u32, secs: u64) -> Self {
        Self {
            per_tick: f64::from(rate) * TICK.as_secs_f64(),
            secs: Duration::from_secs(secs),
            started: Instant::now(),
            ticker: tokio::time::interval(TICK),
            due: 0.0,
            sent: 0,
        }
    }

    /// Waits for the next tick and returns how many fall due at it
    /// (counted into `sent`); `None` once the time is up.
    async fn tick(&mut self) -> Option<u64> {
        if self.started.elapsed() >= self.secs {
            return None;
        }
        self.ticker.tick().await;
        self.due += self.per_tick;
        let now = self.due as u64 - self.sent;
        self.sent += now;
        Some(now)
    }
}

/// The bare client at a steady rate (see the module doc): returns, per
/// record, the milliseconds from queueing it to the answer that carried it.
async fn bare_steady(client: &Client, records: &[StreamRecord], args: &Args) -> Result<Vec<i64>> {
    if records.is_empty() {
        bail!("no records to send");
    }
    // Read back shard after shard: in arrival order the shards take turns
    // as they did for Tributary.
    let mut records: Vec<&StreamRecord> = records.iter().collect();
    records.sort_by_key(|r| r.arrival_millis);
    let mut lanes: BTreeMap<String, mpsc::UnboundedSender<(Instant, PutRecordsRequestEntry)>> =
        BTreeMap::new();
    let mut workers = JoinSet::new();
    for record in &records {
        if lanes.contains_key(&record.shard_id) {
            continue;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        lanes.insert(record.shard_id.clone(), sender);
        workers.spawn(bare_lane(client.clone(), receiver, args.max_in_flight));
    }
    let mut pacer = Pacer::new(args.rate, args.secs);
    while let Some(due) = pacer.tick().await {
        let now = Instant::now();
        let first = pacer.sent - due;
        for sent in first..pacer.sent {
            let record = records[sent as usize % records.len()];
            let entry = PutRecordsRequestEntry::builder()
                .data(Blob::new(record.data.clone()))
                .partition_key(&record.partition_key)
                .build()
                .context("an entry without data or key")?;
            lanes[&record.shard_id]
                .send((now, entry))
                .context("a bare lane stopped")?;
        }
    }
    drop(lanes);
    let mut latencies = Vec::with_capacity(pacer.sent as usize);
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    Ok(latencies)
}

/// One shard's bare lane: up to `in_flight` calls at once, each carrying
/// everything queued (at most [`MAX_CALL_RECORDS`]).
async fn bare_lane(
    client: Client,
    mut input: mpsc::UnboundedReceiver<(Instant, PutRecordsRequestEntry)>,
    in_flight: usize,
) -> Result<Vec<i64>> {
    let mut queue: std::collections::VecDeque<(Instant, PutRecordsRequestEntry)> =
        std::collections::VecDeque::new();
    let mut calls: JoinSet<Result<Vec<Instant>>> = JoinSet::new();
    let mut latencies = Vec::new();
    let mut open = true;
    loop {
        // Everything queued so far goes into the next call, as a lane does.
        while open {
            match input.try_recv() {
                Ok(item) => queue.push_back(item),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        while calls.len() < in_flight.max(1) && !queue.is_empty() {
            let take = queue.len().min(MAX_CALL_RECORDS);
            let (queued, entries): (Vec<Instant>, Vec<PutRecordsRequestEntry>) =
                queue.drain(..take).unzip();
            let request = client
                .put_records()
                .stream_name(BARE)
                .set_records(Some(entries));
            calls.spawn(async move {
                let answer = request.send().await.context("bare putrecords")?;
                if answer.failed_record_count().unwrap_or(0) > 0 {
                    bail!("the emulator refused entries of a bare call");
                }
                Ok(queued)
            });
        }
        if !open && queue.is_empty() && calls.is_empty() {
            return Ok(latencies);
        }
        tokio::select! {
            Some(done) = calls.join_next(), if !calls.is_empty() => {
                let answered = Instant::now();
                latencies.extend(
                    done??
                        .into_iter()
                        .map(|queued| (answered - queued).as_millis() as i64),
                );
            }
            received = input.recv(), if open => match received {
                Some(item) => queue.push_back(item),
                None => open = false,
            },
        }
    }
}

/// The value at fraction `q` of the sorted `values`.
fn percentile(values: &[i64], q: f64) -> i64 {
    if values.is_empty() {
        return 0;
    }
    let at = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len()) - 1;
    values[at]
}

/// The cumulative buckets `(le, count)` of histogram `name`, summed over
/// its label sets, in bound order (`+Inf` last).
fn histogram(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut buckets: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in metrics.lines().filter(|l| l.starts_with(&prefix)) {
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let bound = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        buckets
            .entry(format!("{bound:020.6}"))
            .or_insert((bound, 0.0))
            .1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    sorted
}

/// [`histogram`] of `after` less what `before` had counted: the
/// observations made between the two scrapes.
fn histogram_since(before: &str, after: &str, name: &str) -> Vec<(f64, f64)> {
    let earlier = histogram(before, name);
    histogram(after, name)
        .into_iter()
        .map(|(bound, count)| {
            let was = earlier
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, n)| *n);
            (bound, count - was)
        })
        .collect()
}

/// The smallest bucket bound holding at least fraction `q` of the observations.
fn bucket_at(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map_or(0.0, |(_, n)| *n);
    buckets
        .iter()
        .find(|(_, n)| *n >= total * q)
        .map_or(f64::NAN, |(le, _)| *le)
}

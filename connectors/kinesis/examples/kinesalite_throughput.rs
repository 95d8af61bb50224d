//! Throughput of the Kinesis sink against a running emulator, with a read-back check.
//!
//! Start kinesalite on loopback first (from the repository root):
//! `node -r ./integration-tests/kinesalite-loopback.js node_modules/kinesalite/cli.js --port 4567`
//! then run
//! `AWS_ACCESS_KEY_ID=x AWS_SECRET_ACCESS_KEY=x cargo run --release -p tributary-kinesis --example kinesalite_throughput -- http://127.0.0.1:4567 [records] [shards] [records_per_shard_per_sec] [bytes]`.
//!
//! It creates a fresh stream, pushes `records` envelopes of about `bytes`
//! bytes over 1,000 partition keys through the sink (with the byte budget
//! and ack tracker the pipeline uses), prints records/s, then reads the
//! stream back with `tail` and checks the count and per-key order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::types::StreamStatus;
use tokio::sync::mpsc;
use tributary_envelope::{AckTracker, Acks, Budget, Record, Sink};
use tributary_kinesis::{KinesisSink, KinesisSinkConfig, StartFrom, build_client, tail};

fn arg<T: std::str::FromStr>(index: usize, default: T) -> T {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let endpoint: String = arg(1, "http://127.0.0.1:4567".to_owned());
    let total: u64 = arg(2, 100_000);
    let shards: i32 = arg(3, 4);
    let rate: u32 = arg(4, 10_000);
    let size: usize = arg(5, 300);

    let client = build_client("us-east-1", Some(&endpoint)).await;
    let stream = format!("bench-{}", std::process::id());
    client
        .create_stream()
        .stream_name(&stream)
        .shard_count(shards)
        .send()
        .await
        .expect("create the stream");
    loop {
        let summary = client
            .describe_stream_summary()
            .stream_name(&stream)
            .send()
            .await
            .expect("describe the stream");
        if summary
            .stream_description_summary()
            .is_some_and(|s| *s.stream_status() == StreamStatus::Active)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let mut config = KinesisSinkConfig::new("us-east-1", dir.path());
    config.endpoint_url = Some(endpoint);
    config.records_per_shard_per_sec = rate;
    config.bytes_per_shard_per_sec = rate.saturating_mul(u32::try_from(size).unwrap_or(u32::MAX));
    let sink = KinesisSink::new(client.clone(), config).await.unwrap();

    let tracker = Arc::new(AckTracker::new(0));
    let budget = Arc::new(Budget::new(64 << 20));
    let acks = Acks::new(tracker.clone(), budget.clone());
    let (sender, input) = mpsc::channel(16);
    let stream_name: Arc<str> = stream.as_str().into();
    let source = {
        let budget = budget.clone();
        let tracker = tracker.clone();
        async move {
            let mut batch = Vec::with_capacity(500);
            for seq in 0..total {
                let key = format!("public.t:{}", seq % 1_000);
                let head = format!("{{\"seq\":{seq},\"key\":\"{key}\",\"pad\":\"");
                let mut data = head.into_bytes();
                data.resize(size.saturating_sub(2).max(data.len()), b'x');
                data.extend_from_slice(b"\"}");
                let record = Record {
                    seq,
                    ..Record::new(stream_name.clone(), key, data)
                };
                budget.acquire(record.weight()).await;
                batch.push(record);
                if batch.len() == 500 {
                    tracker.issued(seq + 1);
                    sender.send(std::mem::take(&mut batch)).await.unwrap();
                }
            }
            tracker.commit(total, 1);
            if !batch.is_empty() {
                sender.send(batch).await.unwrap();
            }
        }
    };
    let start = Instant::now();
    let (_, result) = tokio::join!(source, sink.run(input, acks));
    result.expect("the sink finished");
    let elapsed = start.elapsed();
    assert!(tracker.is_drained());
    println!(
        "{total} records of {size} B over {shards} shards in {:.2} s: {:.0} records/s",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64()
    );

    let mut out = Vec::new();
    let read = tail(&client, &stream, StartFrom::TrimHorizon, false, &mut out)
        .await
        .expect("read the stream back");
    let mut last: HashMap<String, u64> = HashMap::new();
    for line in String::from_utf8(out).unwrap().lines() {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let seq = value["seq"].as_u64().unwrap();
        let key = value["key"].as_str().unwrap().to_owned();
        if let Some(previous) = last.insert(key.clone(), seq) {
            assert!(previous < seq, "key {key}: {previous} then {seq}");
        }
    }
    assert_eq!(read, total, "every record once");
    println!("read back {read} records, per-key order kept");
}

//! KPL aggregation (issue 7, item 6) end to end: with `sink.aggregation =
//! true`, Tributary packs envelopes into aggregated records; an independent
//! de-aggregator (PyPI `aws-kinesis-agg`, the library AWS publishes for
//! Lambda consumers) must get back exactly the envelopes sent, each in the
//! shard its own partition key maps to, in per-key commit order; and
//! `tributary tail` de-aggregates to the same envelopes.
//!
//! Needs `python3` with `aws-kinesis-agg` 1.2.3 installed
//! (`pip install aws-kinesis-agg==1.2.3`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tributary_integration_tests::{DEFAULT_DATABASE, Pipeline, StreamRecord, TributaryProcess};

const STREAM: &str = "agg-cdc";
const KEYS: i32 = 200;
/// One insert round, then updates: every key has this many changes.
const ROUNDS: i32 = 10;

/// Reads `{"records": [...], "shards": {id: [start, end]}}` on stdin,
/// de-aggregates with aws-kinesis-agg, checks each sub-record's partition
/// key hashes into the range of the shard it was read from, and prints one
/// line per sub-record: `{"shard":..,"data":<the envelope text>}`.
const DEAGGREGATE: &str = r#"
import base64, hashlib, json, sys
from aws_kinesis_agg.deaggregator import deaggregate_records
job = json.load(sys.stdin)
shards = {k: (int(v[0]), int(v[1])) for k, v in job["shards"].items()}
for raw in job["records"]:
    # The Lambda event shape the library expects.
    raw["kinesis"].update(kinesisSchemaVersion="1.0", approximateArrivalTimestamp=0)
    subs = list(deaggregate_records([{"kinesis": raw["kinesis"]}]))
    for sub in subs:
        k = sub["kinesis"]
        if not k.get("aggregated"):
            sys.exit("a record was not an aggregated record: %r" % raw)
        h = int(hashlib.md5(k["partitionKey"].encode()).hexdigest(), 16)
        if "explicitHashKey" in k and k["explicitHashKey"]:
            h = int(k["explicitHashKey"])
        lo, hi = shards[raw["shard"]]
        if not lo <= h <= hi:
            sys.exit("sub-record %s landed in %s, outside its key's shard" % (k["partitionKey"], raw["shard"]))
        print(json.dumps({"shard": raw["shard"], "data": base64.b64decode(k["data"]).decode()}))
"#;

/// The envelopes de-aggregated by aws-kinesis-agg, in stream order.
fn deaggregate_with_python(
    records: &[StreamRecord],
    shards: &HashMap<String, (String, String)>,
) -> Result<Vec<Value>> {
    use base64::Engine as _;
    let job = json!({
        "records": records.iter().map(|r| json!({
            "shard": r.shard_id,
            "kinesis": {
                "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
                "partitionKey": r.partition_key,
                "sequenceNumber": r.sequence_number,
            },
        })).collect::<Vec<_>>(),
        "shards": shards.iter().map(|(id, (lo, hi))| (id.clone(), json!([lo, hi]))).collect::<serde_json::Map<_, _>>(),
    });
    let mut child = std::process::Command::new("python3")
        .args(["-c", DEAGGREGATE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3 (with aws-kinesis-agg installed)")?;
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().context("python stdin")?;
        stdin.write_all(job.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    // The library reports a record it cannot split on stderr and goes on.
    if !out.status.success() || !out.stderr.is_empty() {
        bail!(
            "the aws-kinesis-agg check failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    text.lines()
        .map(|line| {
            let sub: Value = serde_json::from_str(line)?;
            Ok(serde_json::from_str(
                sub["data"].as_str().unwrap_or_default(),
            )?)
        })
        .collect()
}

/// Per key, the `v` of its envelopes in stream order must be 0, 1, ... ROUNDS-1.
fn assert_exactly_the_changes_in_order(envelopes: &[Value]) {
    let mut ids = HashSet::new();
    let mut per_key: HashMap<i64, Vec<i64>> = HashMap::new();
    for envelope in envelopes {
        assert!(
            ids.insert(envelope["id"].as_str().unwrap().to_owned()),
            "duplicate {}",
            envelope["id"]
        );
        let after = &envelope["after"];
        per_key
            .entry(after["id"].as_i64().unwrap())
            .or_default()
            .push(after["v"].as_i64().unwrap());
    }
    assert_eq!(envelopes.len(), (KEYS * ROUNDS) as usize);
    assert_eq!(per_key.len(), KEYS as usize);
    let expected: Vec<i64> = (0..i64::from(ROUNDS)).collect();
    for (key, versions) in per_key {
        assert_eq!(versions, expected, "key {key}");
    }
}

async fn shard_ranges(pipeline: &Pipeline) -> Result<HashMap<String, (String, String)>> {
    let page = pipeline
        .kin
        .client()
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await?;
    Ok(page
        .shards()
        .iter()
        .map(|s| {
            let range = s.hash_key_range();
            (
                s.shard_id().to_owned(),
                (
                    range
                        .map(|r| r.starting_hash_key().to_owned())
                        .unwrap_or_default(),
                    range
                        .map(|r| r.ending_hash_key().to_owned())
                        .unwrap_or_default(),
                ),
            )
        })
        .collect())
}

async fn tail(config: &Path) -> Result<Vec<Value>> {
    let dir = config.parent().unwrap_or(Path::new("."));
    let config = config.to_str().context("UTF-8 config path")?;
    let mut process =
        TributaryProcess::spawn(&["tail", "--stream", STREAM, "-c", config], &[], dir)?;
    let status = process.wait_exit(Duration::from_secs(60)).await?;
    assert!(status.success(), "{}", process.logs());
    process
        .stdout()
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_records_deaggregate_into_exactly_the_envelopes_sent() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, pad text NOT NULL)",
        "[sink]\naggregation = true\n",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0, repeat('p', 120) FROM generate_series(1, {KEYS}) g"
    ))
    .await?;
    for round in 1..ROUNDS {
        db.batch_execute(&format!("UPDATE items SET v = {round}"))
            .await?;
    }
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(120))
        .await?;

    let raw = pipeline.kin.read_all(STREAM).await?;
    let changes = (KEYS * ROUNDS) as usize;
    assert!(
        !raw.is_empty() && raw.len() * 10 <= changes,
        "{} kinesis records for {changes} changes: not aggregated",
        raw.len()
    );
    eprintln!("{} kinesis records carried {changes} changes", raw.len());
    let envelopes = deaggregate_with_python(&raw, &shard_ranges(&pipeline).await?)?;
    assert_exactly_the_changes_in_order(&envelopes);

    // `tail` de-aggregates too (shards in order, each in sequence order).
    let tailed = tail(&pipeline.config.path).await?;
    assert_exactly_the_changes_in_order(&tailed);
    pipeline.stop_gracefully().await?;
    Ok(())
}

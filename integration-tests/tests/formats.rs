//! `sink.format = "debezium"` and `"cloudevents"` through a real pipeline:
//! the same changes as the v1 envelope, in each ecosystem's layout, read
//! back with that ecosystem's own reader where one exists (the CloudEvents
//! SDK for Python).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tributary_integration_tests::Pipeline;

const STREAM: &str = "formats-cdc";
const SETUP: &str = "CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric)";
const CHANGES: [&str; 5] = [
    "INSERT INTO orders VALUES (1, 'new', 9.99)",
    "UPDATE orders SET status = 'paid' WHERE id = 1",
    "UPDATE orders SET id = 2 WHERE id = 1",
    "DELETE FROM orders WHERE id = 2",
    "TRUNCATE orders",
];
/// Insert, update, delete + insert (the key change), delete, truncate.
const EVENTS: usize = 6;

async fn events(format: &str) -> Result<Vec<Value>> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        SETUP,
        &format!("[sink]\nformat = \"{format}\"\n"),
    )
    .await?;
    pipeline.pg.execute_each(&CHANGES).await?;
    let records = pipeline
        .kin
        .wait_for_records(STREAM, EVENTS, Duration::from_secs(60))
        .await?;
    pipeline.stop_gracefully().await?;
    ensure!(records.len() == EVENTS, "{} records", records.len());
    records.iter().map(|r| r.json()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_change_events() -> Result<()> {
    let events = events("debezium").await?;
    let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "d", "c", "d", "t"]);
    let insert = &events[0];
    assert_eq!(insert["before"], Value::Null);
    assert_eq!(
        insert["after"],
        json!({"id": 1, "status": "new", "total": "9.99"})
    );
    assert!(
        insert["ts_ms"]
            .as_i64()
            .is_some_and(|ms| ms > 1_700_000_000_000)
    );
    assert_eq!(insert["transaction"], Value::Null);
    let source = &insert["source"];
    assert_eq!(source["connector"], "postgresql");
    assert_eq!(source["name"], "shop");
    assert_eq!(source["db"], "shop");
    assert_eq!(source["schema"], "public");
    assert_eq!(source["table"], "orders");
    assert_eq!(source["snapshot"], "false");
    assert!(source["txId"].as_u64().is_some() && source["lsn"].as_u64().is_some());
    assert!(source["ts_ms"].as_i64() <= insert["ts_ms"].as_i64());
    assert!(
        source["version"]
            .as_str()
            .unwrap()
            .starts_with("tributary-")
    );
    let update = &events[1];
    assert_eq!(update["before"], json!({"id": 1}));
    assert_eq!(update["after"]["status"], "paid");
    assert_eq!(events[2]["before"], json!({"id": 1}));
    assert_eq!(events[2]["after"], Value::Null);
    assert_eq!(events[3]["after"]["id"], 2);
    let truncate = &events[5];
    assert_eq!(
        (&truncate["before"], &truncate["after"]),
        (&Value::Null, &Value::Null)
    );
    Ok(())
}

/// Reads each event with the CloudEvents SDK for Python (PyPI
/// `cloudevents`, installed by `scripts/install-deps.sh`) and prints what
/// the SDK made of it, one JSON object per line.
const READ_WITH_SDK: &str = r#"
import json, sys
from cloudevents.core.formats.json import JSONFormat
for line in sys.stdin:
    event = JSONFormat().read(None, line)
    print(json.dumps({"id": event.get_id(), "source": event.get_source(),
        "type": event.get_type(), "subject": event.get_subject(),
        "time": event.get_time().isoformat(), "data": event.get_data()}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_events_parse_with_the_cloudevents_sdk() -> Result<()> {
    let events = events("cloudevents").await?;
    let input: String = events.iter().map(|e| format!("{e}\n")).collect();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, input)?;
    let output = Command::new("python3")
        .arg("-c")
        .arg(READ_WITH_SDK)
        .stdin(std::fs::File::open(&path)?)
        .output()
        .context("running python3 with the cloudevents SDK")?;
    ensure!(
        output.status.success(),
        "the CloudEvents SDK refused an event: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<Value> = String::from_utf8(output.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        parsed.len() == EVENTS,
        "the SDK read {} events",
        parsed.len()
    );
    let types: Vec<&str> = parsed.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "dev.tributary.change.insert",
            "dev.tributary.change.update",
            "dev.tributary.change.delete",
            "dev.tributary.change.insert",
            "dev.tributary.change.delete",
            "dev.tributary.change.truncate",
        ]
    );
    for (sdk, event) in parsed.iter().zip(&events) {
        let envelope = &sdk["data"];
        assert_eq!(envelope["v"], 1);
        assert_eq!(
            sdk["id"], envelope["id"],
            "the event id is the envelope's id"
        );
        assert_eq!(sdk["source"], "/tributary/postgres/shop");
        assert_eq!(event["datacontenttype"], "application/json");
    }
    assert_eq!(parsed[0]["subject"], r#"public.orders:{"id":1}"#);
    assert_eq!(parsed[5]["subject"], "public.orders");
    Ok(())
}

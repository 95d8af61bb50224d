//! The consumer example of `docs/consumers.md` (`examples/consumer.py`,
//! plain boto3) reads a real pipeline's stream and ends with exactly the
//! table: what the guide tells consumers works as written.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use tributary_integration_tests::consumer::postgres_rows;
use tributary_integration_tests::{DEFAULT_DATABASE, EMULATOR_AWS_ENV, Pipeline, repo_root};

const STREAM: &str = "guide-cdc";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_consumer_of_the_guide_rebuilds_the_table() -> Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        3,
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);
         INSERT INTO accounts SELECT g, 'owner ' || g, g FROM generate_series(1, 300) g;",
        "[source]\nsnapshot = \"initial\"\n",
    )
    .await?;
    pipeline
        .pg
        .execute_each(&[
            "UPDATE accounts SET balance = balance + 1000 WHERE id % 3 = 0",
            "DELETE FROM accounts WHERE id % 10 = 0",
            "UPDATE accounts SET id = id + 10000 WHERE id < 20",
            "BEGIN; TRUNCATE accounts; INSERT INTO accounts SELECT g, 'again ' || g, -g FROM generate_series(1, 200) g; COMMIT",
            "UPDATE accounts SET owner = 'last' WHERE id % 7 = 0",
            "INSERT INTO accounts VALUES (5000, 'new', 0)",
        ])
        .await?;
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(120))
        .await?;

    let mut command = Command::new("python3");
    command.arg(repo_root().join("examples/consumer.py")).args([
        "--stream",
        STREAM,
        "--endpoint",
        &pipeline.kin.endpoint(),
    ]);
    for (name, value) in EMULATOR_AWS_ENV {
        command.env(name, value);
    }
    let output = command.output().context("running examples/consumer.py")?;
    ensure!(
        output.status.success(),
        "the example failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut got = BTreeMap::new();
    for line in String::from_utf8(output.stdout)?.lines() {
        let row: Value = serde_json::from_str(line)?;
        ensure!(row["table"] == "public.accounts", "{line}");
        got.insert(row["key"].to_string(), row["row"].clone());
    }
    let client = pipeline.pg.client(DEFAULT_DATABASE).await?;
    let expected: BTreeMap<String, Value> = postgres_rows(&client, "public.accounts", &["id"])
        .await?
        .into_iter()
        .map(|(k, row)| (k, Value::Object(row)))
        .collect();
    ensure!(
        got.len() == expected.len(),
        "{} rows from the example, {} in the table",
        got.len(),
        expected.len()
    );
    ensure!(got == expected, "the example's rows differ from the table");
    pipeline.stop_gracefully().await?;
    Ok(())
}

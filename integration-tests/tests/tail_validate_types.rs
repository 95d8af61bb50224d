//! `tributary tail --validate` with a source configured (PostgreSQL or
//! MariaDB) checks
//! each envelope's `after` and `before` against its table's JSON Schema
//! (what `tributary schema --table` prints): what the connector wrote
//! passes; a value of another type than the column's, or a column the
//! table lacks, is reported with the envelope's id and exits 1.

use std::time::Duration;

use aws_sdk_kinesis::primitives::Blob;
use serde_json::{Value, json};
use tributary_integration_tests::{DEFAULT_DATABASE, MysqlPipeline, Pipeline, TributaryProcess};

const STREAM: &str = "typed-cdc";

/// Runs `tail --validate` over the whole stream; exit code and stderr.
async fn validate(pipeline: &Pipeline) -> anyhow::Result<(Option<i32>, String)> {
    validate_with(&pipeline.config.path, pipeline.dir.path(), STREAM).await
}

/// `tail --validate` of `stream` with the config at `config`.
async fn validate_with(
    config: &std::path::Path,
    dir: &std::path::Path,
    stream: &str,
) -> anyhow::Result<(Option<i32>, String)> {
    let config = config.to_str().unwrap();
    let args = ["tail", "-c", config, "--stream", stream, "--validate"];
    let mut tail = TributaryProcess::spawn(&args, &[], dir)?;
    let status = tail.wait_exit(Duration::from_secs(60)).await?;
    Ok((status.code(), tail.stderr()))
}

/// Puts `envelope` on the stream as another writer would.
async fn put(pipeline: &Pipeline, envelope: &Value) -> anyhow::Result<()> {
    put_on(&pipeline.kin, STREAM, envelope).await
}

/// Puts `envelope` on `stream` as another writer would.
async fn put_on(
    kin: &tributary_integration_tests::Kinesalite,
    stream: &str,
    envelope: &Value,
) -> anyhow::Result<()> {
    kin.client()
        .put_record()
        .stream_name(stream)
        .partition_key("public.typed:1")
        .data(Blob::new(envelope.to_string()))
        .send()
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_validate_reports_values_of_the_wrong_type_by_id() -> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        2,
        "CREATE TABLE typed (id int PRIMARY KEY, n int NOT NULL, amount numeric, \
         at timestamptz, tags text[]); ALTER TABLE typed REPLICA IDENTITY FULL",
        "",
    )
    .await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;
    db.batch_execute(
        "INSERT INTO typed VALUES (1, 10, 1.5, now(), ARRAY['a', NULL]), (2, 20, NULL, NULL, NULL); \
         UPDATE typed SET n = 11 WHERE id = 1; DELETE FROM typed WHERE id = 2",
    )
    .await?;
    let records = pipeline
        .kin
        .wait_for_records(STREAM, 4, Duration::from_secs(30))
        .await?;
    let (code, stderr) = validate(&pipeline).await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("validated 4 envelopes: all valid"),
        "{stderr}"
    );

    // Envelopes that conform to the envelope schema, but not to the table's.
    let update = records
        .iter()
        .map(|r| r.json())
        .collect::<anyhow::Result<Vec<Value>>>()?
        .into_iter()
        .find(|e| e["op"] == "update")
        .expect("the update's envelope");
    let mut wrong_type = update.clone();
    wrong_type["id"] = json!("shop:FFFFFFFFFFFFFFF0:00000001");
    wrong_type["after"]["n"] = json!("eleven");
    put(&pipeline, &wrong_type).await?;
    let mut wrong_before = update.clone();
    wrong_before["id"] = json!("shop:FFFFFFFFFFFFFFF0:00000002");
    wrong_before["before"]["n"] = Value::Null;
    put(&pipeline, &wrong_before).await?;
    let mut unknown_column = update;
    unknown_column["id"] = json!("shop:FFFFFFFFFFFFFFF0:00000003");
    unknown_column["after"]["nope"] = json!(1);
    put(&pipeline, &unknown_column).await?;

    let (code, stderr) = validate(&pipeline).await?;
    assert_eq!(code, Some(1), "{stderr}");
    for expected in [
        "invalid envelope \"shop:FFFFFFFFFFFFFFF0:00000001\": \"eleven\" is not of type \"integer\" at /after/n",
        "invalid envelope \"shop:FFFFFFFFFFFFFFF0:00000002\": null is not of type \"integer\" at /before/n",
        "invalid envelope \"shop:FFFFFFFFFFFFFFF0:00000003\"",
        "validated 7 envelopes: 3 invalid",
    ] {
        assert!(stderr.contains(expected), "{expected:?} in\n{stderr}");
    }
    assert!(stderr.contains("/after"), "{stderr}");
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_validate_checks_mysql_column_types_and_schema_prints_them() -> anyhow::Result<()> {
    const MYSQL_STREAM: &str = "typed-mysql-cdc";
    let mut pipeline = MysqlPipeline::start(
        MYSQL_STREAM,
        1,
        "CREATE TABLE shop.typed (id int PRIMARY KEY, n bigint unsigned NOT NULL, \
         amount decimal(10,2), at datetime(3), flags set('a','b','c'), doc json, \
         raw varbinary(8), kind enum('x','y'))",
        "",
    )
    .await?;
    pipeline
        .db
        .execute(
            "INSERT INTO typed VALUES (1, 18446744073709551615, 1.50, '2026-12-01 04:05:06.789', \
             'a,c', '{\"k\": [1, 2]}', x'00ff', 'y'), (2, 2, NULL, NULL, NULL, NULL, NULL, NULL)",
        )
        .await?;
    pipeline
        .db
        .execute("UPDATE typed SET n = 3 WHERE id = 2")
        .await?;
    let records = pipeline
        .wait_for_records(MYSQL_STREAM, 3, Duration::from_secs(30))
        .await?;
    let (code, stderr) =
        validate_with(&pipeline.config.path, pipeline.dir.path(), MYSQL_STREAM).await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("validated 3 envelopes: all valid"),
        "{stderr}"
    );

    let mut wrong = records
        .iter()
        .map(|r| r.json())
        .collect::<anyhow::Result<Vec<Value>>>()?
        .into_iter()
        .find(|e| e["op"] == "update")
        .expect("the update's envelope");
    wrong["id"] = json!("shop:FFFFFFFFFFFFFFF0:00000001");
    wrong["after"]["flags"] = json!("a,c");
    put_on(&pipeline.kin, MYSQL_STREAM, &wrong).await?;
    let (code, stderr) =
        validate_with(&pipeline.config.path, pipeline.dir.path(), MYSQL_STREAM).await?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("invalid envelope \"shop:FFFFFFFFFFFFFFF0:00000001\""),
        "{stderr}"
    );
    assert!(stderr.contains("/after/flags"), "{stderr}");

    // `schema --table` prints the same schema, by the URL's database.
    let config = pipeline.config.path.to_str().unwrap();
    let mut schema = TributaryProcess::spawn(
        &["schema", "-c", config, "--table", "typed"],
        &[],
        pipeline.dir.path(),
    )?;
    let status = schema.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "{}", schema.stderr());
    let document: Value = serde_json::from_str(&schema.stdout())?;
    assert_eq!(document["x-primary-key"], json!(["id"]), "{document}");
    assert_eq!(document["properties"]["n"]["type"], "integer", "{document}");
    pipeline.stop_gracefully().await?;
    Ok(())
}

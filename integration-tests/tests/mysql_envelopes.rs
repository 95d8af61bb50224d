//! Row changes of every MySQL type, through a real MariaDB 10.11 row binlog
//! and a real kinesalite, arrive as the envelopes PRODUCT.md describes and
//! validate against `schema/envelope.v1.json`.

use std::time::Duration;

use serde_json::{Value, json};
use tributary_integration_tests::{MysqlPipeline, valid_envelopes_by_position};

const STREAM: &str = "shop-cdc";

const SETUP: &str = r#"
CREATE TABLE everything (
    id BIGINT UNSIGNED PRIMARY KEY,
    ti TINYINT, tiu TINYINT UNSIGNED, si SMALLINT, siu SMALLINT UNSIGNED,
    mi MEDIUMINT, miu MEDIUMINT UNSIGNED, i INT, iu INT UNSIGNED, bi BIGINT,
    dec1 DECIMAL(30,10), fl FLOAT, db DOUBLE,
    d DATE, dt DATETIME(6), dt0 DATETIME, ts TIMESTAMP(3) NULL, tm TIME(6), tm0 TIME, yr YEAR,
    vc VARCHAR(20), ch CHAR(5), txt TEXT, lat VARCHAR(10) CHARACTER SET latin1,
    bin BINARY(4), vb VARBINARY(8), bl BLOB,
    en ENUM('small','medium','large'), st SET('a','b','c'), bt BIT(12),
    js JSON, geo GEOMETRY, nothing VARCHAR(5)
) DEFAULT CHARSET = utf8mb4;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_operation_arrives_as_a_valid_envelope() -> anyhow::Result<()> {
    let mut pipeline = MysqlPipeline::start(STREAM, 2, SETUP, "").await?;
    pipeline
        .db
        .execute_each(&[
            "SET time_zone = '+02:00'",
            r#"INSERT INTO everything VALUES (18446744073709551615,
              -128, 255, -32768, 65535, -8388608, 16777215, -2147483648, 4294967295,
              -9223372036854775808, -12345678901234567890.0123456789, 1.5, -2.25,
              '2026-11-23', '2026-11-23 05:21:05.123456', '1000-01-01 00:00:00',
              '2026-11-23 07:21:05.123', '-838:59:59.000000', '27:00:01', 2155,
              'héllo "wörld"', 'ab', 'long text ✓', 'café',
              0xDEADBEEF, 0x00FF, 0x0102,
              'large', 'a,c', b'101000000001',
              '{"a": [1, 2.5, null], "b": {"c": true}}', ST_GeomFromText('POINT(1 2)'), NULL)"#,
            "UPDATE everything SET vc = 'changed', en = 'small' WHERE id = 18446744073709551615",
            "UPDATE everything SET id = 7 WHERE id = 18446744073709551615",
            "DELETE FROM everything WHERE id = 7",
            "TRUNCATE TABLE everything",
        ])
        .await?;
    let records = pipeline
        .wait_for_records(STREAM, 7, Duration::from_secs(60))
        .await?;
    // A truncate is written to every shard (2 here).
    let envelopes = valid_envelopes_by_position(&records)?;
    for (record, envelope) in records
        .iter()
        .zip(records.iter().map(|r| r.json().unwrap()))
    {
        let expected = match envelope["key"].as_object() {
            Some(key) => format!("shop.everything:{}", key["id"]),
            None => "shop.everything".to_owned(),
        };
        assert_eq!(record.partition_key, expected);
    }
    let ops: Vec<&str> = envelopes
        .iter()
        .map(|e| e["op"].as_str().unwrap())
        .collect();
    assert_eq!(
        ops,
        [
            "insert", "update", "delete", "insert", "delete", "truncate", "truncate"
        ],
        "{envelopes:#?}"
    );

    let insert = &envelopes[0];
    assert_eq!(insert["source"]["connector"], "mysql");
    assert_eq!(insert["source"]["db"], "shop");
    assert_eq!(insert["source"]["schema"], Value::Null);
    assert_eq!(insert["source"]["table"], "everything");
    assert!(
        insert["source"]["file"]
            .as_str()
            .unwrap()
            .starts_with("binlog.")
    );
    assert!(insert["source"]["pos"].as_u64().unwrap() > 4);
    let gtid = insert["source"]["gtid"].as_str().unwrap();
    assert!(gtid.starts_with("0-1-"), "{gtid}");
    assert_eq!(insert["source"]["tx_id"], gtid);
    assert_eq!(
        insert["id"],
        format!("shop:{}", insert["source"]["position"].as_str().unwrap())
    );
    assert_eq!(insert["key"], json!({"id": 18446744073709551615u64}));
    assert_eq!(insert["before"], Value::Null);
    assert_eq!(
        insert["after"],
        json!({
            "id": 18446744073709551615u64,
            "ti": -128, "tiu": 255, "si": -32768, "siu": 65535, "mi": -8388608, "miu": 16777215,
            "i": -2147483648i64, "iu": 4294967295u64, "bi": i64::MIN,
            "dec1": "-12345678901234567890.0123456789", "fl": 1.5, "db": -2.25,
            "d": "2026-11-23", "dt": "2026-11-23T05:21:05.123456", "dt0": "1000-01-01T00:00:00",
            "ts": "2026-11-23T05:21:05.123Z", "tm": "-838:59:59.000000", "tm0": "27:00:01",
            "yr": 2155,
            "vc": "héllo \"wörld\"", "ch": "ab", "txt": "long text ✓", "lat": "café",
            "bin": "3q2+7w==", "vb": "AP8=", "bl": "AQI=",
            "en": "large", "st": ["a", "c"], "bt": 2561,
            "js": {"a": [1, 2.5, null], "b": {"c": true}},
            "geo": "000000000101000000000000000000f03f0000000000000040",
            "nothing": null
        })
    );
    assert_eq!(insert["unchanged"], json!([]));

    let update = &envelopes[1];
    assert_eq!(update["before"]["vc"], "héllo \"wörld\"");
    assert_eq!(update["before"]["en"], "large");
    assert_eq!(update["after"]["vc"], "changed");
    assert_eq!(update["after"]["en"], "small");
    assert_eq!(update["after"]["dec1"], "-12345678901234567890.0123456789");

    // The key change: a delete under the old key, an insert under the new
    // one, consecutive positions of one transaction.
    let (delete, insert) = (&envelopes[2], &envelopes[3]);
    assert_eq!(delete["key"], json!({"id": 18446744073709551615u64}));
    assert_eq!(delete["after"], Value::Null);
    assert_eq!(delete["before"]["vc"], "changed");
    assert_eq!(insert["key"], json!({"id": 7}));
    assert_eq!(insert["before"], Value::Null);
    assert_eq!(insert["after"]["vc"], "changed");
    let position = |e: &Value| e["source"]["position"].as_str().unwrap().to_owned();
    let (p_delete, p_insert) = (position(delete), position(insert));
    assert_eq!(p_delete[..16], p_insert[..16], "same transaction");
    assert_eq!(&p_delete[17..], "00000000");
    assert_eq!(&p_insert[17..], "00000001");

    let deleted = &envelopes[4];
    assert_eq!(deleted["key"], json!({"id": 7}));
    assert_eq!(deleted["before"]["st"], json!(["a", "c"]));
    assert_eq!(deleted["after"], Value::Null);

    let truncate = &envelopes[5];
    assert_eq!(truncate["key"], Value::Null);
    assert_eq!(truncate["before"], Value::Null);
    assert_eq!(truncate["source"]["table"], "everything");
    assert_eq!(
        envelopes[5]["id"], envelopes[6]["id"],
        "copies of one truncate"
    );

    // Positions sort in commit order and are unique per change.
    let positions: Vec<String> = envelopes[..6].iter().map(position).collect();
    let mut sorted = positions.clone();
    sorted.dedup();
    assert_eq!(sorted, positions);
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_carries_the_columns_its_row_had_when_written() -> anyhow::Result<()> {
    let mut pipeline = MysqlPipeline::start(
        STREAM,
        1,
        "CREATE TABLE t (id INT PRIMARY KEY, a VARCHAR(10), b INT)",
        "",
    )
    .await?;
    pipeline
        .db
        .execute_each(&[
            "INSERT INTO t VALUES (1, 'one', 10)",
            "ALTER TABLE t ADD COLUMN c JSON AFTER a",
            r#"INSERT INTO t VALUES (2, 'two', '{"x": 1}', 20)"#,
            "ALTER TABLE t DROP COLUMN a",
            "INSERT INTO t VALUES (3, '[3]', 30)",
            "ALTER TABLE t CHANGE b renamed BIGINT",
            "UPDATE t SET renamed = 31 WHERE id = 3",
        ])
        .await?;
    let records = pipeline
        .wait_for_records(STREAM, 4, Duration::from_secs(60))
        .await?;
    let envelopes = valid_envelopes_by_position(&records)?;
    let afters: Vec<&Value> = envelopes.iter().map(|e| &e["after"]).collect();
    assert_eq!(
        afters,
        [
            &json!({"id": 1, "a": "one", "b": 10}),
            &json!({"id": 2, "a": "two", "c": {"x": 1}, "b": 20}),
            &json!({"id": 3, "c": [3], "b": 30}),
            &json!({"id": 3, "c": [3], "renamed": 31}),
        ]
    );
    assert_eq!(
        envelopes[3]["before"],
        json!({"id": 3, "c": [3], "renamed": 30})
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimal_row_metadata_falls_back_to_information_schema() -> anyhow::Result<()> {
    use tributary_integration_tests::{Kinesalite, Mariadb, TributaryProcess, write_mysql_config};
    let db = Mariadb::start_with(&[
        "--binlog-format=ROW",
        "--binlog-row-image=FULL",
        "--binlog-row-metadata=MINIMAL",
    ])
    .await?;
    db.execute(
        "CREATE TABLE t (a INT, id INT PRIMARY KEY, size ENUM('s','m','l'), doc JSON) \
         DEFAULT CHARSET = utf8mb4",
    )
    .await?;
    let kin = Kinesalite::start().await?;
    kin.create_stream(STREAM, 1).await?;
    let dir = tempfile::tempdir()?;
    let config = write_mysql_config(dir.path(), &db, &kin, STREAM, "")?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_for_log("streaming changes from mysql", Duration::from_secs(30))
        .await?;
    db.execute(r#"INSERT INTO t VALUES (1, 2, 'm', '{"k": [1]}')"#)
        .await?;
    let records = kin
        .wait_for_records(STREAM, 1, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e:#}\n{}", tributary.logs()))?;
    let envelopes = valid_envelopes_by_position(&records)?;
    assert_eq!(envelopes[0]["key"], json!({"id": 2}));
    assert_eq!(
        envelopes[0]["after"],
        json!({"a": 1, "id": 2, "size": "m", "doc": {"k": [1]}})
    );
    assert_eq!(records[0].partition_key, "shop.t:2");
    assert!(
        tributary
            .stderr()
            .contains("binlog_row_metadata is not FULL"),
        "the fallback is warned about: {}",
        tributary.logs()
    );
    tributary.stop_gracefully(Duration::from_secs(30)).await?;
    Ok(())
}

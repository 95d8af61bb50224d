//! Row changes of every supported type, through a real Postgres 15 and a real
//! kinesalite, arrive as the envelopes PRODUCT.md describes and validate
//! against `schema/envelope.v1.json`.

use std::time::Duration;

use serde_json::{Value, json};
use tributary_integration_tests::consumer::shards_with_op;
use tributary_integration_tests::{Pipeline, TributaryProcess, valid_envelopes_by_position};

const STREAM: &str = "shop-cdc";

const SETUP: &str = r#"
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE everything (
    id bigint PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    num numeric, f4 real, f8 double precision,
    flag boolean, t text, vc varchar(20), ch char(5),
    raw bytea, js json, jsb jsonb, u uuid,
    d date, tm time, ts timestamp, tstz timestamptz, iv interval,
    arr_int int[], arr_text text[], m mood, cash money, nothing text
);
CREATE TABLE docs (id int PRIMARY KEY, body text, note text);
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_and_operation_arrives_as_a_valid_envelope() -> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(STREAM, 2, SETUP, "").await?;
    pipeline
        .pg
        .execute_each(&[
            r#"INSERT INTO everything VALUES (1, -32768, 2147483647, 9223372036854775807,
            12345678901234567890.123456789, 1.5, -2.25, true, E'héllo "world"\n', 'vc', 'ab',
            '\xdeadbeef', '{"a": [1, 2]}', '{"b": {"c": true}}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
            '2026-11-23', '05:21:05.5', '2026-11-23 05:21:05.123456', '2026-11-23 07:21:05.123456+02',
            '1 day 02:00:00', '{1,NULL,3}', '{"a b",c}', 'happy', 1234.56, NULL)"#,
            "INSERT INTO everything (id, num, f4, f8, tstz, ts, d) \
             VALUES (2, 'NaN', 'Infinity', '-Infinity', 'infinity', '-infinity', 'infinity')",
            "UPDATE everything SET t = 'changed' WHERE id = 1",
            "UPDATE everything SET id = 3 WHERE id = 2",
            "DELETE FROM everything WHERE id = 3",
            "TRUNCATE everything",
            // ~100 KB that does not compress below the TOAST threshold.
            "INSERT INTO docs SELECT 1, string_agg(md5(i::text), '') , 'first' FROM generate_series(1, 3200) i",
            "UPDATE docs SET note = 'second' WHERE id = 1",
        ])
        .await?;

    let records = pipeline
        .kin
        .wait_for_records(STREAM, 10, Duration::from_secs(60))
        .await?;
    // One record per change; a key change is two (delete, insert), and the
    // truncate is written once to each of the two shards.
    assert_eq!(records.len(), 10, "exactly one record per change");
    let envelopes = valid_envelopes_by_position(&records)?;
    for record in &records {
        let envelope = record.json()?;
        let expected_key = match envelope["key"].as_object() {
            Some(key) => format!(
                "public.{}:{}",
                envelope["source"]["table"].as_str().unwrap(),
                key.values()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None => format!("public.{}", envelope["source"]["table"].as_str().unwrap()),
        };
        assert_eq!(record.partition_key, expected_key);
    }
    let ops: Vec<(&str, &str)> = envelopes
        .iter()
        .map(|e| {
            (
                e["source"]["table"].as_str().unwrap(),
                e["op"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("everything", "insert"),
            ("everything", "insert"),
            ("everything", "update"),
            ("everything", "delete"),
            ("everything", "insert"),
            ("everything", "delete"),
            ("everything", "truncate"),
            ("everything", "truncate"),
            ("docs", "insert"),
            ("docs", "update"),
        ]
    );

    let first = &envelopes[0];
    assert_eq!(first["v"], 1);
    assert_eq!(
        first["id"],
        format!("shop:{}", first["source"]["position"].as_str().unwrap())
    );
    assert_eq!(first["source"]["connector"], "postgres");
    assert_eq!(first["source"]["name"], "shop");
    assert_eq!(first["source"]["db"], "shop");
    assert_eq!(first["source"]["schema"], "public");
    assert_eq!(first["source"]["snapshot"], false);
    assert!(
        first["source"]["tx_id"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    assert_eq!(first["key"], json!({"id": 1}));
    assert_eq!(first["before"], Value::Null);
    assert_eq!(first["unchanged"], json!([]));
    assert_eq!(
        first["after"],
        json!({
            "id": 1, "i2": -32768, "i4": 2147483647, "i8": 9223372036854775807i64,
            "num": "12345678901234567890.123456789", "f4": 1.5, "f8": -2.25,
            "flag": true, "t": "héllo \"world\"\n", "vc": "vc", "ch": "ab   ",
            "raw": "3q2+7w==", "js": {"a": [1, 2]}, "jsb": {"b": {"c": true}},
            "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "d": "2026-11-23", "tm": "05:21:05.5", "ts": "2026-11-23T05:21:05.123456",
            "tstz": "2026-11-23T05:21:05.123456Z", "iv": "P1DT2H",
            "arr_int": [1, null, 3], "arr_text": ["a b", "c"], "m": "happy", "cash": "1234.56",
            "nothing": null
        })
    );

    let special = &envelopes[1]["after"];
    assert_eq!(special["num"], "NaN");
    assert_eq!(special["f4"], "Infinity");
    assert_eq!(special["f8"], "-Infinity");
    assert_eq!(special["tstz"], "infinity");
    assert_eq!(special["ts"], "-infinity");
    assert_eq!(special["d"], "infinity");
    assert_eq!(special["i2"], Value::Null);

    let update = &envelopes[2];
    assert_eq!(update["key"], json!({"id": 1}));
    assert_eq!(update["before"], json!({"id": 1}));
    assert_eq!(update["after"]["t"], "changed");
    assert_eq!(update["after"]["i8"], json!(9223372036854775807i64));

    // A key change: a delete under the old key, then an insert under the
    // new one, at consecutive positions of the same transaction.
    let (old_key, new_key) = (&envelopes[3], &envelopes[4]);
    assert_eq!(old_key["key"], json!({"id": 2}));
    assert_eq!(old_key["before"], json!({"id": 2}));
    assert_eq!(old_key["after"], Value::Null);
    assert_eq!(new_key["key"], json!({"id": 3}));
    assert_eq!(new_key["before"], Value::Null);
    assert_eq!(new_key["after"]["id"], 3);
    assert_eq!(new_key["after"]["num"], "NaN");
    assert_eq!(old_key["source"]["tx_id"], new_key["source"]["tx_id"]);
    let (old_pos, new_pos) = (
        old_key["source"]["position"].as_str().unwrap(),
        new_key["source"]["position"].as_str().unwrap(),
    );
    assert_eq!(old_pos[..16], new_pos[..16], "same commit");
    assert!(old_pos < new_pos && old_key["id"] != new_key["id"]);

    let delete = &envelopes[5];
    assert_eq!(delete["key"], json!({"id": 3}));
    assert_eq!(delete["before"], json!({"id": 3}));
    assert_eq!(delete["after"], Value::Null);

    assert_eq!(
        shards_with_op(&records, "truncate").len(),
        2,
        "the truncate reaches every shard"
    );
    for truncate in [&envelopes[6], &envelopes[7]] {
        assert_eq!(truncate["key"], Value::Null);
        assert_eq!(truncate["after"], Value::Null);
    }
    assert_eq!(
        envelopes[6]["id"], envelopes[7]["id"],
        "copies of one event"
    );

    let toast_insert = &envelopes[8];
    assert_eq!(
        toast_insert["after"]["body"].as_str().unwrap().len(),
        3200 * 32
    );
    let toast_update = &envelopes[9];
    assert_eq!(toast_update["unchanged"], json!(["body"]));
    let after = toast_update["after"].as_object().unwrap();
    assert!(
        !after.contains_key("body"),
        "an unchanged TOAST column is left out of after"
    );
    assert_eq!(after["note"], "second");

    // `tributary schema --table`: every `after` the stream carried for the
    // table validates against the schema the catalogue gives.
    let mut schema_cmd = TributaryProcess::spawn(
        &[
            "schema",
            "-c",
            pipeline.config.path.to_str().unwrap(),
            "--table",
            "public.everything",
        ],
        &[],
        pipeline.dir.path(),
    )?;
    let status = schema_cmd.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "{}", schema_cmd.logs());
    let after_schema: Value = serde_json::from_str(&schema_cmd.stdout())?;
    assert_eq!(after_schema["x-primary-key"], json!(["id"]));
    let after_validator = jsonschema::validator_for(&after_schema).expect("schema compiles");
    for envelope in envelopes
        .iter()
        .filter(|e| e["source"]["table"] == "everything")
    {
        if envelope["after"].is_object() {
            let errors: Vec<String> = after_validator
                .iter_errors(&envelope["after"])
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", envelope["after"]);
        }
    }
    assert!(
        !after_validator.is_valid(&json!({"id": "not a number"})),
        "the schema types the columns"
    );
    let mut missing = TributaryProcess::spawn(
        &[
            "schema",
            "-c",
            pipeline.config.path.to_str().unwrap(),
            "--table",
            "nope",
        ],
        &[],
        pipeline.dir.path(),
    )?;
    assert_eq!(
        missing.wait_exit(Duration::from_secs(30)).await?.code(),
        Some(2)
    );
    assert!(
        missing.stderr().contains("--table public.nope"),
        "{}",
        missing.logs()
    );

    pipeline.stop_gracefully().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_full_sends_the_whole_old_row_and_ddl_refreshes_columns()
-> anyhow::Result<()> {
    let mut pipeline = Pipeline::start(
        STREAM,
        1,
        "CREATE TABLE orders (id int PRIMARY KEY, status text); \
         ALTER TABLE orders REPLICA IDENTITY FULL; \
         CREATE TABLE nokey (a int, b text)",
        "",
    )
    .await?;
    pipeline
        .pg
        .execute_each(&[
            "INSERT INTO orders VALUES (42, 'new')",
            "UPDATE orders SET status = 'paid' WHERE id = 42",
            "ALTER TABLE orders ADD COLUMN total numeric(10,2)",
            "UPDATE orders SET total = 9.99 WHERE id = 42",
            "INSERT INTO nokey VALUES (1, 'x')",
        ])
        .await?;

    let records = pipeline
        .kin
        .wait_for_records(STREAM, 4, Duration::from_secs(60))
        .await?;
    let envelopes = valid_envelopes_by_position(&records)?;
    assert_eq!(envelopes[1]["before"], json!({"id": 42, "status": "new"}));
    assert_eq!(envelopes[1]["after"], json!({"id": 42, "status": "paid"}));
    assert_eq!(
        envelopes[1]["key"],
        json!({"id": 42}),
        "FULL identity still keys by the primary key"
    );
    assert_eq!(
        envelopes[2]["after"],
        json!({"id": 42, "status": "paid", "total": "9.99"})
    );
    assert_eq!(
        envelopes[2]["before"],
        json!({"id": 42, "status": "paid", "total": null})
    );
    assert_eq!(envelopes[3]["key"], Value::Null);
    let nokey = records
        .iter()
        .find(|r| r.json().unwrap()["source"]["table"] == "nokey")
        .unwrap();
    assert_eq!(nokey.partition_key, "public.nokey");

    pipeline.stop_gracefully().await?;
    Ok(())
}

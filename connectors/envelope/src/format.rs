//! The record formats a sink can write (`sink.format`): Tributary's envelope
//! v1 as the sources encode it, or the same change as a Debezium change
//! event value or a CloudEvents 1.0 event.
//!
//! Sources always encode v1 (the hot path); [`convert`] rewrites one v1
//! envelope into another format between the source and the sink. Row values
//! (`key`, `before`, `after`) are copied as the raw JSON the source wrote,
//! so column order and exact numbers survive; only the surrounding fields
//! are rebuilt. The mapping, field by field, is in `docs/formats.md`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::time::parse_unix_millis;

/// `sink.format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The envelope v1, as written by the sources.
    #[default]
    Tributary,
    /// A Debezium change event value (JSON, schemas disabled).
    Debezium,
    /// A CloudEvents 1.0 event in structured mode, the v1 envelope as `data`.
    Cloudevents,
}

/// An envelope that is not a v1 envelope (never written by a source).
#[derive(Debug, thiserror::Error)]
#[error("not an envelope v1: {0}")]
pub struct FormatError(#[from] serde_json::Error);

/// The fields of a v1 envelope the other formats use.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(borrow)]
    source: Source<'a>,
    #[serde(borrow)]
    key: Option<&'a RawValue>,
    #[serde(borrow)]
    before: Option<&'a RawValue>,
    #[serde(borrow)]
    after: Option<&'a RawValue>,
    #[serde(borrow)]
    captured_at: Cow<'a, str>,
}

#[derive(Deserialize)]
struct Source<'a> {
    #[serde(borrow)]
    connector: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(borrow)]
    db: Cow<'a, str>,
    #[serde(borrow, default)]
    schema: Option<Cow<'a, str>>,
    #[serde(borrow)]
    table: Cow<'a, str>,
    #[serde(borrow)]
    position: Cow<'a, str>,
    #[serde(borrow, default)]
    tx_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    commit_ts: Option<Cow<'a, str>>,
    #[serde(default)]
    snapshot: bool,
    #[serde(borrow, default)]
    gtid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    file: Option<Cow<'a, str>>,
    #[serde(default)]
    pos: Option<u64>,
}

/// A Debezium change event value.
#[derive(Serialize)]
struct Debezium<'a> {
    before: Option<&'a RawValue>,
    after: Option<&'a RawValue>,
    source: DebeziumSource<'a>,
    op: &'static str,
    ts_ms: Option<i64>,
    transaction: Option<&'a EventOrder>,
}

/// Debezium's `transaction` block of a change event, written when
/// transaction markers are on: the transaction's id (the marker's
/// `transaction.id`) and the event's 1-based order in it, overall and
/// within its table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventOrder {
    /// The transaction's id.
    pub id: String,
    /// The event's order in the transaction, from 1.
    pub total_order: u64,
    /// The event's order among the transaction's events of its table, from 1.
    pub data_collection_order: u64,
}

#[derive(Serialize)]
struct DebeziumSource<'a> {
    version: &'static str,
    connector: &'static str,
    name: &'a str,
    ts_ms: Option<i64>,
    snapshot: &'static str,
    db: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    schema: Option<&'a str>,
    table: &'a str,
    #[serde(rename = "txId", skip_serializing_if = "Option::is_none")]
    tx_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lsn: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gtid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pos: Option<u64>,
    /// Tributary's position, for ordering and de-duplication.
    position: &'a str,
}

/// A CloudEvents 1.0 event, structured mode.
#[derive(Serialize)]
struct CloudEvent<'a> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    time: &'a str,
    subject: String,
    datacontenttype: &'static str,
    data: &'a RawValue,
}

/// Rewrites the v1 envelope `v1` into `format` (a copy of it for
/// [`Format::Tributary`]).
pub fn convert(format: Format, v1: &[u8]) -> Result<Vec<u8>, FormatError> {
    convert_event(format, v1, None)
}

/// [`convert`], with Debezium's `transaction` block set to `order` (the
/// other formats have no such field).
pub fn convert_event(
    format: Format,
    v1: &[u8],
    order: Option<&EventOrder>,
) -> Result<Vec<u8>, FormatError> {
    if format == Format::Tributary {
        return Ok(v1.to_vec());
    }
    let envelope: Envelope<'_> = serde_json::from_slice(v1)?;
    Ok(match format {
        Format::Tributary => unreachable!("returned above"),
        Format::Debezium => serde_json::to_vec(&debezium(&envelope, order))?,
        Format::Cloudevents => {
            let data: &RawValue = serde_json::from_slice(v1)?;
            serde_json::to_vec(&cloud_event(&envelope, data))?
        }
    })
}

fn debezium<'a>(e: &'a Envelope<'a>, order: Option<&'a EventOrder>) -> Debezium<'a> {
    let s = &e.source;
    let postgres = s.connector == "postgres";
    let op = match e.op.as_ref() {
        "insert" => "c",
        "update" => "u",
        "delete" => "d",
        "snapshot" => "r",
        _ => "t",
    };
    let commit_ms = s.commit_ts.as_deref().and_then(parse_unix_millis);
    Debezium {
        before: e.before,
        after: e.after,
        source: DebeziumSource {
            version: concat!("tributary-", env!("CARGO_PKG_VERSION")),
            connector: if postgres { "postgresql" } else { "mysql" },
            name: &s.name,
            ts_ms: commit_ms,
            snapshot: if s.snapshot { "true" } else { "false" },
            db: &s.db,
            schema: s.schema.as_deref(),
            table: &s.table,
            tx_id: s.tx_id.as_deref().and_then(|id| id.parse().ok()),
            // The commit LSN: the first part of a Postgres position.
            lsn: postgres
                .then(|| s.position.split(':').next())
                .flatten()
                .and_then(|hex| u64::from_str_radix(hex, 16).ok()),
            gtid: s.gtid.as_deref(),
            file: s.file.as_deref(),
            pos: s.pos,
            position: &s.position,
        },
        op,
        ts_ms: parse_unix_millis(&e.captured_at),
        transaction: order,
    }
}

fn cloud_event<'a>(e: &'a Envelope<'a>, data: &'a RawValue) -> CloudEvent<'a> {
    let s = &e.source;
    let scope = s.schema.as_deref().unwrap_or(&s.db);
    let subject = match e.key {
        Some(key) => format!("{scope}.{}:{}", s.table, key.get()),
        None => format!("{scope}.{}", s.table),
    };
    CloudEvent {
        specversion: "1.0",
        id: &e.id,
        source: format!("/tributary/{}/{}", s.connector, s.name),
        kind: format!("dev.tributary.change.{}", e.op),
        time: s.commit_ts.as_deref().unwrap_or(&e.captured_at),
        subject,
        datacontenttype: "application/json",
        data,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const V1: &str = r#"{"v":1,"id":"shop:00000000016B3748:00000003","op":"update","source":{"connector":"postgres","name":"shop","db":"shop","schema":"public","table":"orders","position":"00000000016B3748:00000003","tx_id":"7781","commit_ts":"2026-11-23T05:21:05.123456Z","snapshot":false},"key":{"id":42},"before":{"id":42},"after":{"status":"paid","id":18446744073709551615},"unchanged":[],"captured_at":"2026-11-23T05:21:05.130001Z"}"#;

    #[test]
    fn debezium_values_keep_the_rows_as_written() {
        let out = convert(Format::Debezium, V1.as_bytes()).unwrap();
        let text = String::from_utf8(out).unwrap();
        // Raw row JSON: column order and exact integers survive.
        assert!(
            text.contains(r#""after":{"status":"paid","id":18446744073709551615}"#),
            "{text}"
        );
        let event: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(event["op"], "u");
        assert_eq!(event["before"], json!({"id": 42}));
        assert_eq!(event["ts_ms"], 1_795_411_265_130i64);
        assert_eq!(event["transaction"], Value::Null);
        let order = EventOrder {
            id: "00000000016B3748".into(),
            total_order: 3,
            data_collection_order: 2,
        };
        let with_order = convert_event(Format::Debezium, V1.as_bytes(), Some(&order)).unwrap();
        let with_order: Value = serde_json::from_slice(&with_order).unwrap();
        assert_eq!(
            with_order["transaction"],
            json!({"id": "00000000016B3748", "total_order": 3, "data_collection_order": 2})
        );
        let source = &event["source"];
        assert_eq!(source["connector"], "postgresql");
        assert_eq!(source["name"], "shop");
        assert_eq!(source["ts_ms"], 1_795_411_265_123i64);
        assert_eq!(source["snapshot"], "false");
        assert_eq!(source["schema"], "public");
        assert_eq!(source["table"], "orders");
        assert_eq!(source["txId"], 7781);
        assert_eq!(source["lsn"], 0x16B_3748);
        for (op, code) in [
            ("insert", "c"),
            ("delete", "d"),
            ("snapshot", "r"),
            ("truncate", "t"),
        ] {
            let v1 = V1.replace(r#""op":"update""#, &format!(r#""op":"{op}""#));
            let event: Value =
                serde_json::from_slice(&convert(Format::Debezium, v1.as_bytes()).unwrap()).unwrap();
            assert_eq!(event["op"], code);
        }
    }

    #[test]
    fn cloud_events_carry_the_envelope_as_data() {
        let out = convert(Format::Cloudevents, V1.as_bytes()).unwrap();
        let event: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["id"], "shop:00000000016B3748:00000003");
        assert_eq!(event["source"], "/tributary/postgres/shop");
        assert_eq!(event["type"], "dev.tributary.change.update");
        assert_eq!(event["time"], "2026-11-23T05:21:05.123456Z");
        assert_eq!(event["subject"], r#"public.orders:{"id":42}"#);
        assert_eq!(event["datacontenttype"], "application/json");
        assert_eq!(event["data"], serde_json::from_str::<Value>(V1).unwrap());
    }

    #[test]
    fn tributary_is_the_envelope_itself_and_garbage_is_an_error() {
        assert_eq!(
            convert(Format::Tributary, V1.as_bytes()).unwrap(),
            V1.as_bytes()
        );
        assert!(convert(Format::Debezium, b"{}").is_err());
        assert!(convert(Format::Cloudevents, b"not json").is_err());
    }
}

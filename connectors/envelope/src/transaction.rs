//! Transaction markers (`sink.transaction_markers`): what a record says
//! about its transaction, and the `begin` / `end` records a sink writes
//! around a transaction's events on each shard.
//!
//! Place in the dataflow: a source tags every change it streams from the
//! log with a [`TxRef`] (its transaction and its table; snapshot rows carry
//! none). A sink with shards (Kinesis) writes a `begin` marker to a shard
//! before the transaction's first event there and an `end` marker after its
//! last one, so a worker reading one shard sees `begin, events..., end` for
//! each transaction and can tell from the `end`'s counts that it holds the
//! transaction's whole part on that shard. The `end` markers hold the
//! transaction's acknowledgement: the [`crate::AckTracker`] releases its
//! watermark only once every `end` of it is delivered ([`MarkerGroup`]).
//!
//! Marker ids are stable across restarts and re-sends: they are made of the
//! transaction's position, the marker's kind and the shard's first hash key,
//! never of a counter. The layouts, per `sink.format`, are documented in
//! `docs/envelope.md` and `docs/formats.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::format::Format;
use crate::position::Position;
use crate::time::{TIMESTAMP_LEN, parse_unix_millis};

/// The transaction-level facts every marker of one transaction repeats.
#[derive(Debug)]
pub struct TxTag {
    /// `source.connector` (`postgres`, `mysql`).
    pub connector: Arc<str>,
    /// `source.name`.
    pub name: Arc<str>,
    /// `source.db` of the transaction's first event.
    pub db: Arc<str>,
    /// The `major` part of every position in the transaction: identifies
    /// it within the source and sorts in commit order.
    pub major: u64,
    /// `source.tx_id` (empty: null).
    pub tx_id: String,
    /// `source.commit_ts`.
    pub commit_ts: Option<[u8; TIMESTAMP_LEN]>,
    /// Extra raw `source` fields, each starting with a comma (MySQL: gtid,
    /// file, pos).
    pub extra: Vec<u8>,
}

impl TxTag {
    /// `transaction.id`: the 16 hex digits of the transaction's position
    /// (the part before the `:` of each of its events' `source.position`).
    pub fn id(&self) -> String {
        format!("{:016X}", self.major)
    }
}

/// What a streamed change says about its transaction (set by a source).
#[derive(Clone, Debug)]
pub struct TxRef {
    /// The transaction (one `Arc` shared by all its records).
    pub tag: Arc<TxTag>,
    /// The change's table, `{schema or db}.{table}` (Debezium's
    /// `data_collection`).
    pub table: Arc<str>,
}

/// A marker record's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkerKind {
    /// Before the transaction's first event on a shard.
    Begin,
    /// After the transaction's last event on a shard.
    End,
}

impl MarkerKind {
    /// The marker's `op`.
    pub const fn as_str(self) -> &'static str {
        match self {
            MarkerKind::Begin => "begin",
            MarkerKind::End => "end",
        }
    }
}

/// How a sink reports a marker record done (see [`crate::Acks::done`]).
#[derive(Clone, Debug)]
pub enum Marker {
    /// A `begin` marker: it holds no acknowledgement. It is written in its
    /// shard's order ahead of its transaction's `end` there, which is done
    /// only after it.
    Begin,
    /// An `end` marker, counted in its transaction's group.
    End(Arc<MarkerGroup>),
}

/// The `end` markers of one transaction not yet delivered; the last one
/// delivered confirms the transaction's commit to the tracker.
#[derive(Debug)]
pub struct MarkerGroup {
    remaining: AtomicUsize,
    end_seq: u64,
}

impl MarkerGroup {
    /// `count` markers of the transaction whose commit was announced with
    /// `end_seq` (see [`crate::AckTracker::commit_feed`]).
    pub fn new(count: usize, end_seq: u64) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(count),
            end_seq,
        })
    }

    /// One marker was delivered; the commit's `end_seq` when it was the
    /// last one.
    pub fn finish_one(&self) -> Option<u64> {
        (self.remaining.fetch_sub(1, Ordering::AcqRel) == 1).then_some(self.end_seq)
    }
}

/// The counts an `end` marker carries.
#[derive(Clone, Debug, Default)]
pub struct TxCounts {
    /// Events of the whole transaction, per table, in order of first event.
    /// A truncate counts once here (though a copy of it reaches every shard).
    pub tables: Vec<(Arc<str>, u64)>,
}

impl TxCounts {
    /// Counts one event of `table`.
    pub fn add(&mut self, table: &Arc<str>) {
        match self.tables.iter_mut().find(|(t, _)| t == table) {
            Some((_, n)) => *n += 1,
            None => self.tables.push((table.clone(), 1)),
        }
    }

    /// Events of the whole transaction.
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|(_, n)| n).sum()
    }
}

/// The marker's `source.position`: the transaction's position with ordinal
/// 0 for `begin` and the largest ordinal for `end`, so the markers sort
/// around the transaction's events.
pub fn marker_position(tag: &TxTag, kind: MarkerKind) -> Position {
    let minor = match kind {
        MarkerKind::Begin => 0,
        MarkerKind::End => u32::MAX,
    };
    Position::new(tag.major, minor)
}

/// The marker's stable id: `{name}:{position}:{begin|end}:{shard}` where
/// `shard` is the decimal first hash key of the shard's range.
pub fn marker_id(tag: &TxTag, kind: MarkerKind, shard_start: u128) -> String {
    format!(
        "{}:{}:{}:{shard_start}",
        tag.name,
        marker_position(tag, kind),
        kind.as_str()
    )
}

/// The partition key of a marker (its explicit hash key picks the shard):
/// `__transaction:{transaction id}`.
pub fn marker_partition_key(tag: &TxTag) -> String {
    format!("__transaction:{}", tag.id())
}

/// One `data_collections` entry.
#[derive(Serialize)]
struct Collection<'a> {
    data_collection: &'a str,
    event_count: u64,
}

/// The v1 marker's `transaction`.
#[derive(Serialize)]
struct Transaction<'a> {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_collections: Option<Vec<Collection<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard_event_count: Option<u64>,
}

/// The v1 marker.
#[derive(Serialize)]
struct V1Marker<'a> {
    v: u8,
    id: &'a str,
    op: &'static str,
    source: &'a RawValue,
    transaction: Transaction<'a>,
}

/// A Debezium transaction metadata value (plus `shard_event_count`).
#[derive(Serialize)]
struct DebeziumMarker<'a> {
    status: &'static str,
    id: String,
    ts_ms: Option<i64>,
    event_count: Option<u64>,
    data_collections: Option<Vec<Collection<'a>>>,
    shard_event_count: Option<u64>,
}

/// A CloudEvents 1.0 marker, the v1 marker as `data`.
#[derive(Serialize)]
struct CloudMarker<'a> {
    specversion: &'static str,
    id: &'a str,
    source: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<&'a str>,
    subject: String,
    datacontenttype: &'static str,
    data: &'a RawValue,
}

/// What one marker says.
#[derive(Clone, Copy, Debug)]
pub struct MarkerSpec<'a> {
    /// Begin or end.
    pub kind: MarkerKind,
    /// The transaction.
    pub tag: &'a TxTag,
    /// The first hash key of the shard it goes to.
    pub shard_start: u128,
    /// For an `end`: the whole transaction's counts and the events on
    /// this shard.
    pub counts: Option<(&'a TxCounts, u64)>,
}

/// Renders a marker in `format`.
pub fn render_marker(format: Format, spec: MarkerSpec<'_>) -> Vec<u8> {
    let MarkerSpec {
        kind,
        tag,
        shard_start,
        counts,
    } = spec;
    let id = marker_id(tag, kind, shard_start);
    let collections = || {
        counts.map(|(c, _)| {
            c.tables
                .iter()
                .map(|(t, n)| Collection {
                    data_collection: t,
                    event_count: *n,
                })
                .collect::<Vec<_>>()
        })
    };
    let commit_ts = tag
        .commit_ts
        .as_ref()
        .map(|ts| std::str::from_utf8(ts).expect("a rendered timestamp is ASCII"));
    if format == Format::Debezium {
        let marker = DebeziumMarker {
            status: match kind {
                MarkerKind::Begin => "BEGIN",
                MarkerKind::End => "END",
            },
            id: tag.id(),
            ts_ms: commit_ts.and_then(parse_unix_millis),
            event_count: counts.map(|(c, _)| c.total()),
            data_collections: collections(),
            shard_event_count: counts.map(|(_, n)| n),
        };
        return serde_json::to_vec(&marker).expect("a marker always serializes");
    }
    let source = source_json(tag, kind);
    let source = RawValue::from_string(source).expect("the source object is JSON");
    let v1 = serde_json::to_vec(&V1Marker {
        v: 1,
        id: &id,
        op: kind.as_str(),
        source: &source,
        transaction: Transaction {
            id: tag.id(),
            event_count: counts.map(|(c, _)| c.total()),
            data_collections: collections(),
            shard_event_count: counts.map(|(_, n)| n),
        },
    })
    .expect("a marker always serializes");
    if format == Format::Tributary {
        return v1;
    }
    let data: &RawValue =
        serde_json::from_slice(&v1).expect("the v1 marker was just written as JSON");
    let event = CloudMarker {
        specversion: "1.0",
        id: &id,
        source: format!("/tributary/{}/{}", tag.connector, tag.name),
        kind: format!("dev.tributary.transaction.{}", kind.as_str()),
        time: commit_ts,
        subject: format!("transaction:{}", tag.id()),
        datacontenttype: "application/json",
        data,
    };
    serde_json::to_vec(&event).expect("a marker always serializes")
}

/// The marker's `source` object, in the envelope's field order.
fn source_json(tag: &TxTag, kind: MarkerKind) -> String {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"connector\":");
    crate::json::write_str(&mut out, &tag.connector);
    out.extend_from_slice(b",\"name\":");
    crate::json::write_str(&mut out, &tag.name);
    out.extend_from_slice(b",\"db\":");
    crate::json::write_str(&mut out, &tag.db);
    out.extend_from_slice(b",\"schema\":null,\"table\":null,\"position\":\"");
    out.extend_from_slice(&marker_position(tag, kind).render());
    out.push(b'"');
    crate::encoder::write_tx_fields(&mut out, &tag.tx_id, tag.commit_ts.as_ref());
    out.extend_from_slice(b",\"snapshot\":false");
    out.extend_from_slice(&tag.extra);
    out.push(b'}');
    String::from_utf8(out).expect("written from strings and ASCII")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn tag() -> TxTag {
        TxTag {
            connector: "postgres".into(),
            name: "shop".into(),
            db: "shop".into(),
            major: 0x16B_3748,
            tx_id: "7781".into(),
            commit_ts: Some(*b"2026-11-23T05:21:05.123456Z"),
            extra: Vec::new(),
        }
    }

    fn counts() -> TxCounts {
        let mut counts = TxCounts::default();
        let (orders, items): (Arc<str>, Arc<str>) = ("public.orders".into(), "public.items".into());
        counts.add(&orders);
        counts.add(&items);
        counts.add(&orders);
        counts
    }

    #[test]
    fn v1_markers_carry_stable_ids_and_counts() {
        let tag = tag();
        let counts = counts();
        let spec = MarkerSpec {
            kind: MarkerKind::End,
            tag: &tag,
            shard_start: 42,
            counts: Some((&counts, 2)),
        };
        let end: Value = serde_json::from_slice(&render_marker(Format::Tributary, spec)).unwrap();
        assert_eq!(end["id"], "shop:00000000016B3748:FFFFFFFF:end:42");
        assert_eq!(end["op"], "end");
        assert_eq!(end["source"]["position"], "00000000016B3748:FFFFFFFF");
        assert_eq!(end["source"]["table"], Value::Null);
        assert_eq!(end["source"]["tx_id"], "7781");
        assert_eq!(
            end["transaction"],
            json!({"id": "00000000016B3748", "event_count": 3, "data_collections": [
                {"data_collection": "public.orders", "event_count": 2},
                {"data_collection": "public.items", "event_count": 1}],
                "shard_event_count": 2})
        );
        let begin = MarkerSpec {
            kind: MarkerKind::Begin,
            counts: None,
            ..spec
        };
        let begin: Value =
            serde_json::from_slice(&render_marker(Format::Tributary, begin)).unwrap();
        assert_eq!(begin["id"], "shop:00000000016B3748:00000000:begin:42");
        assert_eq!(begin["transaction"], json!({"id": "00000000016B3748"}));
    }

    #[test]
    fn debezium_and_cloudevents_markers_follow_their_layouts() {
        let tag = tag();
        let counts = counts();
        let spec = MarkerSpec {
            kind: MarkerKind::End,
            tag: &tag,
            shard_start: 7,
            counts: Some((&counts, 1)),
        };
        let dbz: Value = serde_json::from_slice(&render_marker(Format::Debezium, spec)).unwrap();
        assert_eq!(dbz["status"], "END");
        assert_eq!(dbz["id"], "00000000016B3748");
        assert_eq!(dbz["event_count"], 3);
        assert_eq!(dbz["ts_ms"], 1_795_411_265_123i64);
        assert_eq!(
            dbz["data_collections"][1]["data_collection"],
            "public.items"
        );
        let begin = MarkerSpec {
            kind: MarkerKind::Begin,
            counts: None,
            ..spec
        };
        let dbz: Value = serde_json::from_slice(&render_marker(Format::Debezium, begin)).unwrap();
        assert_eq!(dbz["status"], "BEGIN");
        assert_eq!(dbz["event_count"], Value::Null);
        assert_eq!(dbz["data_collections"], Value::Null);
        let ce: Value = serde_json::from_slice(&render_marker(Format::Cloudevents, spec)).unwrap();
        assert_eq!(ce["type"], "dev.tributary.transaction.end");
        assert_eq!(ce["id"], "shop:00000000016B3748:FFFFFFFF:end:7");
        assert_eq!(ce["data"]["op"], "end");
        assert_eq!(ce["time"], "2026-11-23T05:21:05.123456Z");
    }

    #[test]
    fn a_group_confirms_with_its_last_marker() {
        let group = MarkerGroup::new(2, 9);
        assert_eq!(group.finish_one(), None);
        assert_eq!(group.finish_one(), Some(9));
    }
}

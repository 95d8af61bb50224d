//! Writes envelope v1 JSON straight into a byte buffer.
//!
//! The encoder is the hot path of the whole pipeline: per-table parts (the
//! `source` object, escaped column names) are rendered once and copied per
//! row; values arrive already rendered as JSON by the source's type decoder.
//! Field order is fixed: `v, id, op, source, key, before, after, unchanged,
//! captured_at`.

use std::sync::{Arc, OnceLock};

use crate::json;
use crate::position::Position;
use crate::record::Record;
use crate::time::TIMESTAMP_LEN;
use crate::transaction::{TxRef, TxTag};

/// The kind of change an envelope carries (`op`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// A table was truncated (key, before and after are null).
    Truncate,
    /// A row read by a snapshot.
    Snapshot,
}

impl Op {
    /// Every op.
    pub const ALL: [Op; 5] = [
        Op::Insert,
        Op::Update,
        Op::Delete,
        Op::Truncate,
        Op::Snapshot,
    ];

    /// The op's place in [`Op::ALL`].
    const fn index(self) -> usize {
        match self {
            Op::Insert => 0,
            Op::Update => 1,
            Op::Delete => 2,
            Op::Truncate => 3,
            Op::Snapshot => 4,
        }
    }

    /// The `op` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
            Op::Snapshot => "snapshot",
        }
    }
}

/// The per-table parts of every envelope of one table, rendered once.
#[derive(Clone, Debug)]
pub struct TableMeta {
    /// `{"v":1,"id":"<name>:` (name escaped).
    head: Vec<u8>,
    /// Per op (in [`Op::ALL`] order): what an envelope holds between the
    /// position in its id and the position in `source`, `","op":"<op>",
    /// "source":{"connector":..,"name":..,"db":..,"schema":..,"table":..,
    /// "position":"`.
    between_positions: [Box<[u8]>; 5],
    /// `{schema or db}.{table}`: the partition key prefix and fallback.
    qualified: Arc<str>,
    /// `connector`, `name` and `db`, for transaction markers.
    origin: [Arc<str>; 3],
}

impl TableMeta {
    /// Renders the parts for one table. `schema` is `None` for MySQL.
    pub fn new(connector: &str, name: &str, db: &str, schema: Option<&str>, table: &str) -> Self {
        let mut head = b"{\"v\":1,\"id\":\"".to_vec();
        json::write_escaped(&mut head, name.as_bytes());
        head.push(b':');
        let mut source = Vec::with_capacity(128);
        source.extend_from_slice(b"\"connector\":");
        json::write_str(&mut source, connector);
        source.extend_from_slice(b",\"name\":");
        json::write_str(&mut source, name);
        source.extend_from_slice(b",\"db\":");
        json::write_str(&mut source, db);
        source.extend_from_slice(b",\"schema\":");
        match schema {
            Some(schema) => json::write_str(&mut source, schema),
            None => source.extend_from_slice(b"null"),
        }
        source.extend_from_slice(b",\"table\":");
        json::write_str(&mut source, table);
        let qualified = format!("{}.{}", schema.unwrap_or(db), table).into();
        let between_positions = Op::ALL.map(|op| {
            let mut between = b"\",\"op\":\"".to_vec();
            between.extend_from_slice(op.as_str().as_bytes());
            between.extend_from_slice(b"\",\"source\":{");
            between.extend_from_slice(&source);
            between.extend_from_slice(b",\"position\":\"");
            between.into_boxed_slice()
        });
        Self {
            head,
            between_positions,
            qualified,
            origin: [connector.into(), name.into(), db.into()],
        }
    }

    /// `{schema or db}.{table}`.
    pub fn qualified_name(&self) -> &str {
        &self.qualified
    }
}

/// The per-transaction parts of the `source` object.
#[derive(Clone, Debug, Default)]
pub struct TxMeta {
    /// `tx_id` (already escaped; sources use digits).
    pub tx_id: String,
    /// `commit_ts`, RFC 3339 UTC.
    pub commit_ts: Option<[u8; TIMESTAMP_LEN]>,
    /// Extra raw `source` fields, each starting with a comma (MySQL: gtid, file, pos).
    pub extra: Vec<u8>,
    /// The transaction's tag, made with its first streamed change.
    pub tag: OnceLock<Arc<TxTag>>,
}

impl TxMeta {
    /// Tags `record`, a change of `table` at `position` streamed from the
    /// log (not a snapshot row), with its transaction and table: what
    /// transaction markers count (see `transaction.rs`).
    pub fn tag(&self, record: &mut Record, table: &TableMeta, position: Position) {
        let tag = self.tag.get_or_init(|| {
            let [connector, name, db] = table.origin.clone();
            Arc::new(TxTag {
                connector,
                name,
                db,
                major: position.major,
                tx_id: self.tx_id.clone(),
                commit_ts: self.commit_ts,
                extra: self.extra.clone(),
            })
        });
        record.tx = Some(TxRef {
            tag: tag.clone(),
            table: table.qualified.clone(),
        });
    }
}

/// Writes `,"tx_id":..,"commit_ts":..` of a `source` object (an empty
/// `tx_id` or no `commit_ts`: null). `tx_id` is written as it is (sources
/// use digits and dashes).
pub(crate) fn write_tx_fields(
    out: &mut Vec<u8>,
    tx_id: &str,
    commit_ts: Option<&[u8; TIMESTAMP_LEN]>,
) {
    out.extend_from_slice(b",\"tx_id\":");
    if tx_id.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        out.push(b'"');
        out.extend_from_slice(tx_id.as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"commit_ts\":");
    match commit_ts {
        Some(ts) => {
            out.push(b'"');
            out.extend_from_slice(ts);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Renders `"name":` for a column once, to be copied per row.
pub fn column_label(name: &str) -> Box<[u8]> {
    let mut out = Vec::with_capacity(name.len() + 3);
    json::write_str(&mut out, name);
    out.push(b':');
    out.into_boxed_slice()
}

/// Writes one envelope into a buffer, section by section.
///
/// Call [`EnvelopeEncoder::begin`], then write `key`, `before`, `after` (each
/// a value, usually an object of columns), then `unchanged`, then
/// [`EnvelopeEncoder::finish`]. Sections not written are null (`unchanged`:
/// `[]`).
pub struct EnvelopeEncoder<'a> {
    out: &'a mut Vec<u8>,
    section: u8,
    first: bool,
}

const SECTION_LABELS: [&[u8]; 3] = [b",\"key\":", b",\"before\":", b",\"after\":"];

impl<'a> EnvelopeEncoder<'a> {
    /// Starts an envelope: writes everything up to the end of `source`.
    pub fn begin(
        out: &'a mut Vec<u8>,
        table: &TableMeta,
        op: Op,
        position: Position,
        tx: &TxMeta,
        snapshot: bool,
    ) -> Self {
        let pos = position.render();
        out.extend_from_slice(&table.head);
        out.extend_from_slice(&pos);
        out.extend_from_slice(&table.between_positions[op.index()]);
        out.extend_from_slice(&pos);
        out.push(b'"');
        write_tx_fields(out, &tx.tx_id, tx.commit_ts.as_ref());
        out.extend_from_slice(if snapshot {
            b",\"snapshot\":true"
        } else {
            b",\"snapshot\":false"
        });
        out.extend_from_slice(&tx.extra);
        out.push(b'}');
        Self {
            out,
            section: 0,
            first: true,
        }
    }

    /// Moves to a section (0 key, 1 before, 2 after), writing null for skipped ones.
    fn enter(&mut self, section: u8) {
        while self.section < section {
            self.out
                .extend_from_slice(SECTION_LABELS[self.section as usize]);
            self.out.extend_from_slice(b"null");
            self.section += 1;
        }
        debug_assert_eq!(self.section, section, "sections are written in order");
        self.out.extend_from_slice(SECTION_LABELS[section as usize]);
        self.section = section + 1;
        self.first = true;
    }

    /// Starts the `key` object.
    pub fn key(&mut self) {
        self.enter(0);
        self.out.push(b'{');
    }

    /// Starts the `before` object.
    pub fn before(&mut self) {
        self.enter(1);
        self.out.push(b'{');
    }

    /// Starts the `after` object.
    pub fn after(&mut self) {
        self.enter(2);
        self.out.push(b'{');
    }

    /// Writes one column of the open object: its label (from
    /// [`column_label`]) and its value, already rendered as JSON.
    #[inline]
    pub fn column(&mut self, label: &[u8], value: &[u8]) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(label);
        self.out.extend_from_slice(value);
    }

    /// Writes one column of the open object whose value `render` writes
    /// as JSON straight into the envelope (no intermediate copy: what a
    /// large value needs).
    #[inline]
    pub fn column_with(&mut self, label: &[u8], render: impl FnOnce(&mut Vec<u8>)) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.extend_from_slice(label);
        render(self.out);
    }

    /// Closes the open object.
    pub fn end_object(&mut self) {
        self.out.push(b'}');
    }

    /// Writes the remaining sections and `unchanged` (names of columns the
    /// source did not send), `captured_at`, and closes the envelope.
    pub fn finish<'n>(
        mut self,
        unchanged: impl IntoIterator<Item = &'n str>,
        captured_at: &[u8; TIMESTAMP_LEN],
    ) {
        while self.section < 3 {
            self.out
                .extend_from_slice(SECTION_LABELS[self.section as usize]);
            self.out.extend_from_slice(b"null");
            self.section += 1;
        }
        self.out.extend_from_slice(b",\"unchanged\":[");
        let mut first = true;
        for name in unchanged {
            if !first {
                self.out.push(b',');
            }
            first = false;
            json::write_str(self.out, name);
        }
        self.out.extend_from_slice(b"],\"captured_at\":\"");
        self.out.extend_from_slice(captured_at);
        self.out.extend_from_slice(b"\"}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn writes_the_documented_envelope() {
        let table = TableMeta::new("postgres", "shop", "shop", Some("public"), "orders");
        let tx = TxMeta {
            tx_id: "7781".into(),
            commit_ts: Some(*b"2026-11-23T05:21:05.123456Z"),
            extra: Vec::new(),
            tag: Default::default(),
        };
        let id = column_label("id");
        let status = column_label("status");
        let mut out = Vec::new();
        let mut enc = EnvelopeEncoder::begin(
            &mut out,
            &table,
            Op::Update,
            Position::new(0x16B_3748, 3),
            &tx,
            false,
        );
        enc.key();
        enc.column(&id, b"42");
        enc.end_object();
        enc.before();
        enc.column(&id, b"42");
        enc.column(&status, b"\"new\"");
        enc.end_object();
        enc.after();
        enc.column(&id, b"42");
        enc.column(&status, b"\"paid\"");
        enc.end_object();
        enc.finish(["note"], b"2026-11-23T05:21:05.130001Z");
        let value: Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(
            value,
            json!({
                "v": 1,
                "id": "shop:00000000016B3748:00000003",
                "op": "update",
                "source": {
                    "connector": "postgres", "name": "shop", "db": "shop", "schema": "public",
                    "table": "orders", "position": "00000000016B3748:00000003",
                    "tx_id": "7781", "commit_ts": "2026-11-23T05:21:05.123456Z", "snapshot": false
                },
                "key": {"id": 42},
                "before": {"id": 42, "status": "new"},
                "after": {"id": 42, "status": "paid"},
                "unchanged": ["note"],
                "captured_at": "2026-11-23T05:21:05.130001Z"
            })
        );
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert!(keys.contains(&"captured_at"));
    }

    #[test]
    fn skipped_sections_are_null_and_mysql_schema_is_null() {
        let table = TableMeta::new("mysql", "we\"ird", "shop", None, "t");
        assert_eq!(table.qualified_name(), "shop.t");
        let tx = TxMeta {
            tx_id: String::new(),
            commit_ts: None,
            extra: b",\"file\":\"binlog.000001\",\"pos\":4".to_vec(),
            tag: Default::default(),
        };
        let mut out = Vec::new();
        let enc = EnvelopeEncoder::begin(
            &mut out,
            &table,
            Op::Truncate,
            Position::new(1, 0),
            &tx,
            true,
        );
        enc.finish([], b"2026-11-23T05:21:05.130001Z");
        let value: Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(value["id"], "we\"ird:0000000000000001:00000000");
        assert_eq!(value["op"], "truncate");
        assert_eq!(value["source"]["schema"], Value::Null);
        assert_eq!(value["source"]["tx_id"], Value::Null);
        assert_eq!(value["source"]["snapshot"], true);
        assert_eq!(value["source"]["pos"], 4);
        assert_eq!(value["key"], Value::Null);
        assert_eq!(value["before"], Value::Null);
        assert_eq!(value["after"], Value::Null);
        assert_eq!(value["unchanged"], json!([]));
    }
}

//! Turns parsed `pgoutput` messages into envelope records.
//!
//! Keeps the relation cache (replaced whenever a Relation message arrives,
//! e.g. after DDL) and renders each row change straight into envelope JSON.
//! Pure: catalog facts a Relation message lacks (primary-key order, kinds of
//! non-built-in types) are looked up by the caller and passed in.

use std::collections::HashMap;
use std::sync::Arc;

use tributary_envelope::encoder::column_label;
use tributary_envelope::time::{POSTGRES_EPOCH_UNIX_MICROS, TIMESTAMP_LEN, format_unix_micros};
use tributary_envelope::{
    EnvelopeEncoder, Op, PartitionKey, Position, Record, StreamRouter, TableFilter, TableMeta,
    TxMeta,
};

use crate::pgoutput::{Cell, Message, OldKind, Relation, Tuple};
use crate::types::{ValueKind, render};

/// The value buffer is given back when a large row grew it past this.
const KEEP_VALUES_BYTES: usize = 8 << 20;

/// What the catalog adds to a Relation message.
#[derive(Clone, Debug, Default)]
pub struct RelationFacts {
    /// The kind of every column, in attribute order.
    pub kinds: Vec<ValueKind>,
    /// Primary-key column names in key order, when the table has one.
    pub primary_key: Option<Vec<String>>,
}

#[derive(Clone, Debug)]
struct Column {
    name: String,
    label: Box<[u8]>,
    kind: ValueKind,
}

#[derive(Clone, Debug)]
struct Table {
    meta: TableMeta,
    stream: Arc<str>,
    columns: Vec<Column>,
    /// Key columns (primary key, else replica identity index) in key order.
    key: Vec<usize>,
    /// Columns an old-key (`K`) tuple carries.
    identity: Vec<usize>,
    /// `is_key[i]`: column `i` is in `key`.
    is_key: Vec<bool>,
    captured: bool,
    /// Events and bytes by op (`tributary_source_*`).
    counters: crate::metrics::TableCounters,
}

/// A transaction being decoded.
#[derive(Clone, Debug)]
pub struct Transaction {
    /// Commit LSN: the `major` of every position in it.
    pub commit_lsn: u64,
    /// Per-transaction `source` fields.
    pub meta: TxMeta,
    /// Changes seen so far (captured or not), for positions.
    pub ordinal: u32,
}

impl Transaction {
    /// A transaction from a Begin message.
    pub fn begin(commit_lsn: u64, xid: u32, commit_time_pg_micros: i64) -> Self {
        Self {
            commit_lsn,
            meta: TxMeta {
                tx_id: xid.to_string(),
                commit_ts: Some(format_unix_micros(
                    commit_time_pg_micros.saturating_add(POSTGRES_EPOCH_UNIX_MICROS),
                )),
                extra: Vec::new(),
                tag: Default::default(),
            },
            ordinal: 0,
        }
    }

    fn next_position(&mut self) -> Position {
        self.ordinal = self.ordinal.saturating_add(1);
        Position::new(self.commit_lsn, self.ordinal)
    }
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Null,
    Unchanged,
    /// Rendered into the decoder's value buffer, at this range.
    Value(usize, usize),
    /// A value not rendered ahead (a new row's non-key column: it is
    /// rendered straight into the envelope's `after`).
    Deferred,
}

/// What a change message needs before it can be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A change for a table whose Relation message never arrived.
    UnknownRelation(u32),
    /// A tuple whose column count differs from its relation's.
    ColumnCount {
        /// Table OID.
        relation: u32,
        /// Columns in the Relation message.
        expected: usize,
        /// Columns in the tuple.
        found: usize,
    },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::UnknownRelation(id) => {
                write!(f, "change for relation {id} before its Relation message")
            }
            DecodeError::ColumnCount {
                relation,
                expected,
                found,
            } => write!(
                f,
                "relation {relation} has {expected} columns but a tuple has {found}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes row changes of one Postgres source into records. A clone
/// decodes the same tables with buffers of its own (a snapshot renders
/// chunks on several).
#[derive(Clone, Debug)]
pub struct Decoder {
    name: String,
    db: String,
    router: StreamRouter,
    filter: TableFilter,
    streams: HashMap<String, Arc<str>>,
    /// By relation id, looked up per change: a fast hasher (the ids
    /// come from the server, not from users).
    tables: HashMap<u32, Table, foldhash::fast::FixedState>,
    values: Vec<u8>,
    new_slots: Vec<Slot>,
    old_slots: Vec<Slot>,
    key_slots: Vec<Slot>,
}

impl Decoder {
    /// A decoder for source `name` reading database `db`.
    pub fn new(name: &str, db: &str, router: StreamRouter, filter: TableFilter) -> Self {
        Self {
            name: name.to_owned(),
            db: db.to_owned(),
            router,
            filter,
            streams: HashMap::new(),
            tables: HashMap::default(),
            values: Vec::with_capacity(4096),
            new_slots: Vec::new(),
            old_slots: Vec::new(),
            key_slots: Vec::new(),
        }
    }

    /// Whether a table is captured by the configured patterns.
    pub fn captures(&self, schema: &str, table: &str) -> bool {
        self.filter.matches(schema, table)
    }

    /// Replaces the cached shape of a table.
    pub fn relation(&mut self, rel: &Relation, facts: RelationFacts) {
        let mut kinds = facts.kinds.into_iter();
        let columns: Vec<Column> = rel
            .columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                label: column_label(&c.name),
                kind: kinds.next().unwrap_or(ValueKind::Text),
            })
            .collect();
        let identity: Vec<usize> = if rel.replica_identity == b'n' {
            Vec::new()
        } else {
            (0..rel.columns.len())
                .filter(|&i| rel.columns[i].is_identity)
                .collect()
        };
        let primary_key: Option<Vec<usize>> = facts.primary_key.as_ref().map(|names| {
            names
                .iter()
                .filter_map(|n| columns.iter().position(|c| &c.name == n))
                .collect()
        });
        let key = table_key(rel.replica_identity, primary_key, &identity);
        let mut is_key = vec![false; columns.len()];
        for &i in &key {
            is_key[i] = true;
        }
        let stream_name = self
            .router
            .resolve(&self.name, &self.db, Some(&rel.schema), &rel.table);
        let stream = self
            .streams
            .entry(stream_name)
            .or_insert_with_key(|name| Arc::from(name.as_str()))
            .clone();
        let table = Table {
            meta: TableMeta::new(
                "postgres",
                &self.name,
                &self.db,
                Some(&rel.schema),
                &rel.table,
            ),
            stream,
            columns,
            key,
            identity,
            is_key,
            captured: self.filter.matches(&rel.schema, &rel.table),
            counters: crate::metrics::TableCounters::new(&self.name, &rel.schema, &rel.table),
        };
        self.tables.insert(rel.id, table);
    }

    /// Decodes one change message into records (none for tables not
    /// captured, one per table for a truncate), pushing them to `out`.
    pub fn change(
        &mut self,
        msg: &Message<'_>,
        tx: &mut Transaction,
        captured_at: &[u8; TIMESTAMP_LEN],
        out: &mut Vec<Record>,
    ) -> Result<(), DecodeError> {
        let (relation, op, old, new) = match msg {
            Message::Insert { relation, new } => (*relation, Op::Insert, None, Some(*new)),
            Message::Update { relation, old, new } => (*relation, Op::Update, *old, Some(*new)),
            Message::Delete { relation, old } => (*relation, Op::Delete, Some(*old), None),
            Message::Truncate { relations, .. } => {
                return self.truncate(relations, tx, captured_at, out);
            }
            Message::Relation(_)
            | Message::Type { .. }
            | Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Other(_) => return Ok(()),
        };
        self.row(relation, op, tx, old, new, captured_at, out)
    }

    /// Counts `records`, rendered by [`Decoder::snapshot_row`] from rows of
    /// the table `relation`, in its metrics (once per chunk: not two
    /// shared counters touched per row by every renderer).
    pub fn count_snapshot(&self, relation: u32, records: &[Record]) {
        if let Some(table) = self.tables.get(&relation) {
            let bytes = records.iter().map(|r| r.data.len()).sum();
            table
                .counters
                .record_many(Op::Snapshot, records.len(), bytes);
        }
    }

    /// How many columns the table `relation` has (as its last Relation
    /// message described them), if the decoder knows it.
    pub fn column_count(&self, relation: u32) -> Option<usize> {
        self.tables.get(&relation).map(|table| table.columns.len())
    }

    /// Decodes one row a snapshot read (an Insert of its text values)
    /// into an `op = "snapshot"` record (not counted: see
    /// [`Decoder::count_snapshot`]).
    pub fn snapshot_row(
        &mut self,
        msg: &Message<'_>,
        tx: &mut Transaction,
        captured_at: &[u8; TIMESTAMP_LEN],
        out: &mut Vec<Record>,
    ) -> Result<(), DecodeError> {
        match msg {
            Message::Insert { relation, new } => self.row(
                *relation,
                Op::Snapshot,
                tx,
                None,
                Some(*new),
                captured_at,
                out,
            ),
            _ => Ok(()),
        }
    }

    fn truncate(
        &mut self,
        relations: &[u32],
        tx: &mut Transaction,
        captured_at: &[u8; TIMESTAMP_LEN],
        out: &mut Vec<Record>,
    ) -> Result<(), DecodeError> {
        for relation in relations {
            let pos = tx.next_position();
            let table = self
                .tables
                .get(relation)
                .ok_or(DecodeError::UnknownRelation(*relation))?;
            if !table.captured {
                continue;
            }
            let mut data = Vec::with_capacity(384);
            EnvelopeEncoder::begin(&mut data, &table.meta, Op::Truncate, pos, &tx.meta, false)
                .finish([], captured_at);
            table.counters.record(Op::Truncate, data.len());
            let mut record = Record {
                fan_out: true,
                ..Record::new(
                    table.stream.clone(),
                    PartitionKey::new(table.meta.qualified_name()).finish(),
                    data,
                )
            };
            tx.meta.tag(&mut record, &table.meta, pos);
            out.push(record);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        relation: u32,
        op: Op,
        tx: &mut Transaction,
        old: Option<(OldKind, Tuple<'_>)>,
        new: Option<Tuple<'_>>,
        captured_at: &[u8; TIMESTAMP_LEN],
        out: &mut Vec<Record>,
    ) -> Result<(), DecodeError> {
        let pos = tx.next_position();
        // An update that carries an old tuple may be a key change, written
        // as two envelopes: it owns the next ordinal too, whatever it turns
        // out to be, so positions depend on the message alone.
        let insert_pos = (op == Op::Update && old.is_some()).then(|| tx.next_position());
        let table = self
            .tables
            .get(&relation)
            .ok_or(DecodeError::UnknownRelation(relation))?;
        if !table.captured {
            return Ok(());
        }
        if self.values.capacity() > KEEP_VALUES_BYTES {
            // A large old row grew the buffer: do not keep that memory.
            self.values = Vec::with_capacity(4096);
        }
        self.values.clear();
        // The new row's key columns only: the rest goes straight into `after`.
        render_cells(
            table,
            relation,
            new,
            Some(&table.is_key),
            &mut self.values,
            &mut self.new_slots,
        )?;
        render_cells(
            table,
            relation,
            old.map(|o| o.1),
            None,
            &mut self.values,
            &mut self.old_slots,
        )?;
        let rows = Rows {
            table,
            values: &self.values,
            new: &self.new_slots,
            old: &self.old_slots,
        };
        // Each key column from the new tuple unless it is absent or an
        // unchanged TOAST value, then from the old one.
        self.key_slots.clear();
        self.key_slots
            .extend(table.key.iter().map(|&i| match rows.new.get(i) {
                Some(slot @ (Slot::Value(..) | Slot::Null)) => *slot,
                _ => match rows.old.get(i) {
                    Some(slot @ Slot::Value(..)) => *slot,
                    _ => Slot::Null,
                },
            }));
        let before = match old {
            Some((OldKind::Full, _)) => Before::Old(None),
            // A partitioned root without an identity of its own sends
            // key tuples without identity columns: nothing to show.
            Some((OldKind::Key, _)) if table.identity.is_empty() => Before::Null,
            Some((OldKind::Key, _)) => Before::Old(Some(&table.identity)),
            // The key did not change: the old key columns equal the new ones.
            None if op == Op::Update && !table.key.is_empty() => Before::Key,
            None => Before::Null,
        };
        let tx_meta = &tx.meta;
        if let Some(insert_pos) = insert_pos.filter(|_| rows.key_changed(&self.key_slots)) {
            // A key change: a delete under the old key, then an insert under
            // the new one, so each key's events stay in its own shard in order.
            let old_key: Vec<Slot> = table.key.iter().map(|&i| rows.old[i]).collect();
            let after = new.map(|cells| After {
                cells,
                old: old.map(|o| o.0),
            });
            out.push(rows.envelope(
                Op::Delete,
                pos,
                tx_meta,
                &old_key,
                before,
                None,
                captured_at,
            ));
            out.push(rows.envelope(
                Op::Insert,
                insert_pos,
                tx_meta,
                &self.key_slots,
                Before::Null,
                after,
                captured_at,
            ));
            return Ok(());
        }
        out.push(rows.envelope(
            op,
            pos,
            tx_meta,
            &self.key_slots,
            before,
            new.map(|cells| After {
                cells,
                old: old.map(|o| o.0),
            }),
            captured_at,
        ));
        Ok(())
    }
}

/// Where an envelope's `before` comes from.
#[derive(Clone, Copy)]
enum Before<'a> {
    /// `null`.
    Null,
    /// The old tuple: every column it has, or only these (the identity).
    Old(Option<&'a [usize]>),
    /// The key columns (an update that kept its key).
    Key,
}

/// Where an envelope's `after` comes from: the new tuple's cells, rendered
/// straight into the envelope.
#[derive(Clone, Copy)]
struct After<'t> {
    cells: Tuple<'t>,
    /// The kind of old tuple sent with it, which holds the values of
    /// unchanged TOAST columns: all of them when it is the whole row
    /// (REPLICA IDENTITY FULL), the identity columns when it is the key.
    old: Option<OldKind>,
}

/// The rendered tuples of one row change.
struct Rows<'a> {
    table: &'a Table,
    values: &'a [u8],
    new: &'a [Slot],
    old: &'a [Slot],
}

impl Rows<'_> {
    fn value(&self, slot: Slot) -> &[u8] {
        match slot {
            Slot::Value(start, end) => &self.values[start..end],
            Slot::Null | Slot::Unchanged | Slot::Deferred => b"null",
        }
    }

    /// The stand-in for a new tuple's unsent (unchanged TOAST) cell: the old
    /// tuple's value where it holds one (a key tuple has nulls in place of
    /// the columns outside the identity, so only its values count).
    fn unsent(&self, column: usize, old: Option<OldKind>) -> Option<Slot> {
        match (old, self.old.get(column)) {
            (Some(OldKind::Full), Some(&slot @ (Slot::Value(..) | Slot::Null))) => Some(slot),
            (Some(OldKind::Key), Some(&slot @ Slot::Value(..))) => Some(slot),
            _ => None,
        }
    }

    /// Whether the old tuple holds a key value other than the new key's.
    fn key_changed(&self, new_key: &[Slot]) -> bool {
        self.table
            .key
            .iter()
            .zip(new_key)
            .any(|(&i, &new)| match self.old.get(i) {
                Some(&old @ Slot::Value(..)) => self.value(old) != self.value(new),
                _ => false,
            })
    }

    #[allow(clippy::too_many_arguments)]
    fn envelope(
        &self,
        op: Op,
        pos: Position,
        tx: &TxMeta,
        key: &[Slot],
        before: Before<'_>,
        after: Option<After<'_>>,
        captured_at: &[u8; TIMESTAMP_LEN],
    ) -> Record {
        let table = self.table;
        let after_bytes = after.map_or(0, |a| a.cells.byte_len());
        let mut data = Vec::with_capacity(512 + self.values.len() + after_bytes + after_bytes / 8);
        let snapshot = op == Op::Snapshot;
        let mut enc = EnvelopeEncoder::begin(&mut data, &table.meta, op, pos, tx, snapshot);
        let mut partition_key = PartitionKey::new(table.meta.qualified_name());
        if !table.key.is_empty() {
            enc.key();
            for (&i, &slot) in table.key.iter().zip(key) {
                let v = self.value(slot);
                enc.column(&table.columns[i].label, v);
                partition_key.push(v);
            }
            enc.end_object();
        }
        match before {
            Before::Null => {}
            Before::Old(None) => {
                enc.before();
                for (column, &slot) in table.columns.iter().zip(self.old) {
                    if !matches!(slot, Slot::Unchanged) {
                        enc.column(&column.label, self.value(slot));
                    }
                }
                enc.end_object();
            }
            Before::Old(Some(columns)) => {
                enc.before();
                for &i in columns {
                    enc.column(&table.columns[i].label, self.value(self.old[i]));
                }
                enc.end_object();
            }
            Before::Key => {
                enc.before();
                for (&i, &slot) in table.key.iter().zip(key) {
                    enc.column(&table.columns[i].label, self.value(slot));
                }
                enc.end_object();
            }
        }
        let mut unchanged: Vec<&str> = Vec::new();
        if let Some(After { cells, old }) = after {
            enc.after();
            for (i, (column, cell)) in table.columns.iter().zip(cells.iter()).enumerate() {
                match cell {
                    Cell::Null => enc.column(&column.label, b"null"),
                    Cell::Text(text) | Cell::Binary(text) => {
                        enc.column_with(&column.label, |out| render(&column.kind, text, out))
                    }
                    Cell::Unchanged => match self.unsent(i, old) {
                        Some(slot) => enc.column(&column.label, self.value(slot)),
                        None => unchanged.push(column.name.as_str()),
                    },
                }
            }
            enc.end_object();
        }
        enc.finish(unchanged, captured_at);
        if !snapshot {
            // Snapshot rows are counted by chunk: see `Decoder::count_snapshot`.
            table.counters.record(op, data.len());
        }
        let mut record = Record::new(table.stream.clone(), partition_key.finish(), data);
        if !snapshot {
            tx.tag(&mut record, &table.meta, pos);
        }
        record
    }
}

/// The columns that key a table's envelopes and partition keys: the primary
/// key, unless a delete cannot tell it (REPLICA IDENTITY USING INDEX on
/// other columns: a delete's old tuple then holds only the index columns),
/// in which case the replica-identity columns key every op of the table so
/// that a row's inserts, updates and deletes share one partition key.
/// Without a primary key: the identity index, else no key.
pub fn table_key(
    replica_identity: u8,
    primary_key: Option<Vec<usize>>,
    identity: &[usize],
) -> Vec<usize> {
    match primary_key {
        Some(pk) if replica_identity == b'i' && !pk.iter().all(|c| identity.contains(c)) => {
            identity.to_vec()
        }
        Some(pk) => pk,
        None if replica_identity == b'i' => identity.to_vec(),
        None => Vec::new(),
    }
}

/// Sorts the cells of a tuple into `slots`, rendering the values of the
/// columns `only` marks (all of them when `None`) into `values`.
fn render_cells(
    table: &Table,
    relation: u32,
    cells: Option<Tuple<'_>>,
    only: Option<&[bool]>,
    values: &mut Vec<u8>,
    slots: &mut Vec<Slot>,
) -> Result<(), DecodeError> {
    slots.clear();
    let Some(cells) = cells else {
        return Ok(());
    };
    if cells.len() != table.columns.len() {
        return Err(DecodeError::ColumnCount {
            relation,
            expected: table.columns.len(),
            found: cells.len(),
        });
    }
    for (i, (cell, column)) in cells.iter().zip(&table.columns).enumerate() {
        let wanted = only.is_none_or(|only| only.get(i).copied().unwrap_or(false));
        slots.push(match cell {
            Cell::Null => Slot::Null,
            Cell::Unchanged => Slot::Unchanged,
            Cell::Text(_) | Cell::Binary(_) if !wanted => Slot::Deferred,
            Cell::Text(text) | Cell::Binary(text) => {
                let start = values.len();
                render(&column.kind, text, values);
                Slot::Value(start, values.len())
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgoutput::{RelationColumn, parse};

    fn decoder(replica_identity: u8, identity: &[&str]) -> Decoder {
        let mut decoder = Decoder::new(
            "shop",
            "shop",
            StreamRouter::parse("s").unwrap(),
            TableFilter::new(&["public.*".to_owned()], &[]),
        );
        let column = |name: &str| RelationColumn {
            is_identity: identity.contains(&name),
            name: name.to_owned(),
            type_oid: 25,
            type_modifier: -1,
        };
        let relation = Relation {
            id: 7,
            schema: "public".into(),
            table: "t".into(),
            replica_identity,
            columns: vec![column("id"), column("note")],
        };
        let facts = RelationFacts {
            kinds: vec![ValueKind::Integer, ValueKind::Text],
            primary_key: Some(vec!["id".into()]),
        };
        decoder.relation(&relation, facts);
        decoder
    }

    /// An Update message: old tuple of `old_kind` then the new tuple, each
    /// cell `Some(text)`, `None` (null) or `Some("\u{1}")` (unchanged).
    fn update(old_kind: u8, old: &[Option<&str>], new: &[Option<&str>]) -> Vec<u8> {
        let mut bytes = vec![b'U'];
        bytes.extend_from_slice(&7u32.to_be_bytes());
        for (kind, cells) in [(old_kind, old), (b'N', new)] {
            bytes.push(kind);
            bytes.extend_from_slice(&(cells.len() as u16).to_be_bytes());
            for cell in cells {
                match cell {
                    None => bytes.push(b'n'),
                    Some("\u{1}") => bytes.push(b'u'),
                    Some(text) => {
                        bytes.push(b't');
                        bytes.extend_from_slice(&(text.len() as u32).to_be_bytes());
                        bytes.extend_from_slice(text.as_bytes());
                    }
                }
            }
        }
        bytes
    }

    fn decode(decoder: &mut Decoder, message: &[u8]) -> Vec<serde_json::Value> {
        let mut tx = Transaction::begin(0x100, 9, 0);
        let mut out = Vec::new();
        let msg = parse(message).unwrap();
        decoder
            .change(&msg, &mut tx, &tributary_envelope::time::now(), &mut out)
            .unwrap();
        out.iter()
            .map(|r| serde_json::from_slice(&r.data).unwrap())
            .collect()
    }

    #[test]
    fn a_key_change_is_a_delete_then_an_insert_and_never_invents_a_toast_value() {
        // Default identity: the old tuple is the key, the rest null; the
        // note is an unchanged TOAST value.
        let mut d = decoder(b'd', &["id"]);
        let events = decode(
            &mut d,
            &update(b'K', &[Some("1"), None], &[Some("2"), Some("\u{1}")]),
        );
        let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
        assert_eq!(ops, ["delete", "insert"]);
        assert_eq!(events[0]["key"], serde_json::json!({"id": 1}));
        assert_eq!(events[1]["key"], serde_json::json!({"id": 2}));
        assert_eq!(events[1]["after"], serde_json::json!({"id": 2}));
        assert_eq!(events[1]["unchanged"], serde_json::json!(["note"]));
        assert!(
            events[0]["source"]["position"].as_str() < events[1]["source"]["position"].as_str()
        );

        // FULL identity: the old row holds the value, so the insert has it.
        let mut d = decoder(b'f', &["id", "note"]);
        let events = decode(
            &mut d,
            &update(
                b'O',
                &[Some("1"), Some("long")],
                &[Some("2"), Some("\u{1}")],
            ),
        );
        assert_eq!(
            events[1]["after"],
            serde_json::json!({"id": 2, "note": "long"})
        );
        assert_eq!(events[1]["unchanged"], serde_json::json!([]));
    }

    #[test]
    fn an_update_that_keeps_its_key_is_one_event_with_the_key_from_the_old_tuple() {
        // The key is an unchanged TOAST value in the new tuple: PostgreSQL
        // then sends it in the old key tuple.
        let mut d = decoder(b'd', &["id"]);
        let events = decode(
            &mut d,
            &update(b'K', &[Some("5"), None], &[Some("\u{1}"), Some("x")]),
        );
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["op"], "update");
        assert_eq!(events[0]["key"], serde_json::json!({"id": 5}));
        assert_eq!(
            events[0]["after"],
            serde_json::json!({"id": 5, "note": "x"})
        );
        assert_eq!(events[0]["unchanged"], serde_json::json!([]));
    }
}

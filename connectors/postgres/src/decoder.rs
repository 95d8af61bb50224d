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

/// What the catalog adds to a Relation message.
#[derive(Clone, Debug, Default)]
pub struct RelationFacts {
    /// The kind of every column, in attribute order.
    pub kinds: Vec<ValueKind>,
    /// Primary-key column names in key order, when the table has one.
    pub primary_key: Option<Vec<String>>,
}

#[derive(Debug)]
struct Column {
    name: String,
    label: Box<[u8]>,
    kind: ValueKind,
}

#[derive(Debug)]
struct Table {
    meta: TableMeta,
    stream: Arc<str>,
    columns: Vec<Column>,
    /// Key columns (primary key, else replica identity index) in key order.
    key: Vec<usize>,
    /// Columns an old-key (`K`) tuple carries.
    identity: Vec<usize>,
    captured: bool,
}

/// A transaction being decoded.
#[derive(Debug)]
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
    Value(usize, usize),
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

/// Decodes row changes of one Postgres source into records.
#[derive(Debug)]
pub struct Decoder {
    name: String,
    db: String,
    router: StreamRouter,
    filter: TableFilter,
    streams: HashMap<String, Arc<str>>,
    tables: HashMap<u32, Table>,
    values: Vec<u8>,
    new_slots: Vec<Slot>,
    old_slots: Vec<Slot>,
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
            tables: HashMap::new(),
            values: Vec::with_capacity(4096),
            new_slots: Vec::new(),
            old_slots: Vec::new(),
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
        let key = match &facts.primary_key {
            Some(names) => names
                .iter()
                .filter_map(|n| columns.iter().position(|c| &c.name == n))
                .collect(),
            None if rel.replica_identity == b'i' => identity.clone(),
            None => Vec::new(),
        };
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
            captured: self.filter.matches(&rel.schema, &rel.table),
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
        let pos = tx.next_position();
        self.row(relation, op, pos, &tx.meta, old, new, captured_at, out)
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
            out.push(Record {
                fan_out: true,
                ..Record::new(
                    table.stream.clone(),
                    PartitionKey::new(table.meta.qualified_name()).finish(),
                    data,
                )
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &mut self,
        relation: u32,
        op: Op,
        pos: Position,
        tx: &TxMeta,
        old: Option<(OldKind, Tuple<'_>)>,
        new: Option<Tuple<'_>>,
        captured_at: &[u8; TIMESTAMP_LEN],
        out: &mut Vec<Record>,
    ) -> Result<(), DecodeError> {
        let table = self
            .tables
            .get(&relation)
            .ok_or(DecodeError::UnknownRelation(relation))?;
        if !table.captured {
            return Ok(());
        }
        self.values.clear();
        render_cells(table, relation, new, &mut self.values, &mut self.new_slots)?;
        render_cells(
            table,
            relation,
            old.map(|o| o.1),
            &mut self.values,
            &mut self.old_slots,
        )?;
        let values = &self.values;
        let value = |slot: Slot| -> &[u8] {
            match slot {
                Slot::Value(start, end) => &values[start..end],
                Slot::Null | Slot::Unchanged => b"null",
            }
        };

        let mut data = Vec::with_capacity(512 + values.len() * 2);
        let mut enc = EnvelopeEncoder::begin(&mut data, &table.meta, op, pos, tx, false);
        let mut partition_key = PartitionKey::new(table.meta.qualified_name());
        let key_slots = if new.is_some() {
            &self.new_slots
        } else {
            &self.old_slots
        };
        if !table.key.is_empty() {
            enc.key();
            for &i in &table.key {
                let v = value(key_slots[i]);
                enc.column(&table.columns[i].label, v);
                partition_key.push(v);
            }
            enc.end_object();
        }
        let before: Option<(&[usize], &[Slot])> = match (op, old) {
            (_, Some((OldKind::Full, _))) => Some((&[], &self.old_slots)),
            (_, Some((OldKind::Key, _))) => Some((&table.identity, &self.old_slots)),
            // The key did not change: the old key columns equal the new ones.
            (Op::Update, None) if !table.key.is_empty() => Some((&table.key, &self.new_slots)),
            _ => None,
        };
        if let Some((columns, slots)) = before {
            enc.before();
            if columns.is_empty() {
                for (column, &slot) in table.columns.iter().zip(slots.iter()) {
                    if !matches!(slot, Slot::Unchanged) {
                        enc.column(&column.label, value(slot));
                    }
                }
            } else {
                for &i in columns {
                    enc.column(&table.columns[i].label, value(slots[i]));
                }
            }
            enc.end_object();
        }
        if new.is_some() {
            enc.after();
            for (column, &slot) in table.columns.iter().zip(self.new_slots.iter()) {
                if !matches!(slot, Slot::Unchanged) {
                    enc.column(&column.label, value(slot));
                }
            }
            enc.end_object();
        }
        let unchanged = table
            .columns
            .iter()
            .zip(self.new_slots.iter())
            .filter(|(_, slot)| new.is_some() && matches!(slot, Slot::Unchanged))
            .map(|(column, _)| column.name.as_str());
        enc.finish(unchanged, captured_at);
        out.push(Record::new(
            table.stream.clone(),
            partition_key.finish(),
            data,
        ));
        Ok(())
    }
}

fn render_cells(
    table: &Table,
    relation: u32,
    cells: Option<Tuple<'_>>,
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
    for (cell, column) in cells.iter().zip(&table.columns) {
        slots.push(match cell {
            Cell::Null => Slot::Null,
            Cell::Unchanged => Slot::Unchanged,
            Cell::Text(text) | Cell::Binary(text) => {
                let start = values.len();
                render(&column.kind, text, values);
                Slot::Value(start, values.len())
            }
        });
    }
    Ok(())
}

//! The `pgoutput` parser and the decoder behind it.

use proptest::prelude::*;
use serde_json::Value;
use tributary_envelope::{StreamRouter, TableFilter};
use tributary_postgres::decoder::{Decoder, RelationFacts, Transaction};
use tributary_postgres::pgoutput::{Cell, Message, OldKind, parse};
use tributary_postgres::types::{ValueKind, render};

/// A column value as the model holds it.
#[derive(Clone, Debug)]
enum ModelCell {
    Null,
    Unchanged,
    Text(Vec<u8>),
    Binary(Vec<u8>),
}

/// A Relation column: flags, name, type OID, type modifier.
type ModelColumn = (u8, String, u32, i32);

/// A `pgoutput` message as the model holds it.
#[derive(Clone, Debug)]
enum Model {
    Begin(u64, i64, u32),
    Commit(u8, u64, u64, i64),
    Relation(u32, String, String, u8, Vec<ModelColumn>),
    Type(u32, String, String),
    Insert(u32, Vec<ModelCell>),
    Update(u32, Option<(u8, Vec<ModelCell>)>, Vec<ModelCell>),
    Delete(u32, u8, Vec<ModelCell>),
    Truncate(Vec<u32>, u8),
}

fn name() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn cell() -> impl Strategy<Value = ModelCell> {
    prop_oneof![
        Just(ModelCell::Null),
        Just(ModelCell::Unchanged),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(ModelCell::Text),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(ModelCell::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Vec<ModelCell>> {
    prop::collection::vec(cell(), 0..8)
}

fn old_kind() -> impl Strategy<Value = u8> {
    prop_oneof![Just(b'K'), Just(b'O')]
}

fn model() -> impl Strategy<Value = Model> {
    let column = (any::<u8>(), name(), any::<u32>(), any::<i32>());
    prop_oneof![
        (any::<u64>(), any::<i64>(), any::<u32>()).prop_map(|(l, t, x)| Model::Begin(l, t, x)),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>())
            .prop_map(|(f, c, e, t)| Model::Commit(f, c, e, t)),
        (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            prop::collection::vec(column, 0..6)
        )
            .prop_map(|(id, s, t, ri, cols)| Model::Relation(id, s, t, ri, cols)),
        (any::<u32>(), name(), name()).prop_map(|(o, s, n)| Model::Type(o, s, n)),
        (any::<u32>(), tuple()).prop_map(|(r, t)| Model::Insert(r, t)),
        (
            any::<u32>(),
            prop::option::of((old_kind(), tuple())),
            tuple()
        )
            .prop_map(|(r, o, n)| Model::Update(r, o, n)),
        (any::<u32>(), old_kind(), tuple()).prop_map(|(r, k, t)| Model::Delete(r, k, t)),
        (prop::collection::vec(any::<u32>(), 0..6), any::<u8>())
            .prop_map(|(r, o)| Model::Truncate(r, o)),
    ]
}

/// Writes pgoutput bytes, big-endian as the server does.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn be(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn cstr(&mut self, s: &str) -> &mut Self {
        self.be(s.as_bytes()).u8(0)
    }
    fn tuple(&mut self, cells: &[ModelCell]) -> &mut Self {
        self.be(&(cells.len() as u16).to_be_bytes());
        for cell in cells {
            match cell {
                ModelCell::Null => self.u8(b'n'),
                ModelCell::Unchanged => self.u8(b'u'),
                ModelCell::Text(v) => self.u8(b't').be(&(v.len() as u32).to_be_bytes()).be(v),
                ModelCell::Binary(v) => self.u8(b'b').be(&(v.len() as u32).to_be_bytes()).be(v),
            };
        }
        self
    }
}

fn encode(model: &Model) -> Vec<u8> {
    let mut w = Writer::default();
    match model {
        Model::Begin(lsn, time, xid) => {
            w.u8(b'B')
                .be(&lsn.to_be_bytes())
                .be(&time.to_be_bytes())
                .be(&xid.to_be_bytes());
        }
        Model::Commit(flags, lsn, end, time) => {
            w.u8(b'C')
                .u8(*flags)
                .be(&lsn.to_be_bytes())
                .be(&end.to_be_bytes())
                .be(&time.to_be_bytes());
        }
        Model::Relation(id, schema, table, ri, columns) => {
            w.u8(b'R').be(&id.to_be_bytes()).cstr(schema).cstr(table);
            w.u8(*ri).be(&(columns.len() as u16).to_be_bytes());
            for (flags, name, oid, modifier) in columns {
                w.u8(*flags)
                    .cstr(name)
                    .be(&oid.to_be_bytes())
                    .be(&modifier.to_be_bytes());
            }
        }
        Model::Type(oid, schema, name) => {
            w.u8(b'Y').be(&oid.to_be_bytes()).cstr(schema).cstr(name);
        }
        Model::Insert(rel, new) => {
            w.u8(b'I').be(&rel.to_be_bytes()).u8(b'N').tuple(new);
        }
        Model::Update(rel, old, new) => {
            w.u8(b'U').be(&rel.to_be_bytes());
            if let Some((kind, old)) = old {
                w.u8(*kind).tuple(old);
            }
            w.u8(b'N').tuple(new);
        }
        Model::Delete(rel, kind, old) => {
            w.u8(b'D').be(&rel.to_be_bytes()).u8(*kind).tuple(old);
        }
        Model::Truncate(rels, options) => {
            w.u8(b'T')
                .be(&(rels.len() as u32).to_be_bytes())
                .u8(*options);
            for rel in rels {
                w.be(&rel.to_be_bytes());
            }
        }
    }
    w.0
}

fn same_cells<'a>(parsed: impl Iterator<Item = Cell<'a>>, model: &[ModelCell]) -> bool {
    let parsed: Vec<Cell<'_>> = parsed.collect();
    parsed.len() == model.len()
        && parsed.iter().zip(model).all(|(p, m)| match (p, m) {
            (Cell::Null, ModelCell::Null) | (Cell::Unchanged, ModelCell::Unchanged) => true,
            (Cell::Text(a), ModelCell::Text(b)) | (Cell::Binary(a), ModelCell::Binary(b)) => {
                a == &b.as_slice()
            }
            _ => false,
        })
}

fn kind_of(byte: u8) -> OldKind {
    if byte == b'K' {
        OldKind::Key
    } else {
        OldKind::Full
    }
}

/// Whether `parsed` is what `model` says.
fn matches_model(parsed: &Message<'_>, model: &Model) -> bool {
    match (parsed, model) {
        (
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            },
            Model::Begin(l, t, x),
        ) => (final_lsn, commit_time, xid) == (l, t, x),
        (
            Message::Commit {
                commit_lsn,
                end_lsn,
            },
            Model::Commit(_, l, e, _),
        ) => (commit_lsn, end_lsn) == (l, e),
        (Message::Relation(r), Model::Relation(id, schema, table, ri, columns)) => {
            (r.id, &r.schema, &r.table, r.replica_identity) == (*id, schema, table, *ri)
                && r.columns.len() == columns.len()
                && r.columns.iter().zip(columns).all(|(c, (f, n, o, m))| {
                    (c.is_identity, &c.name, c.type_oid, c.type_modifier) == (f & 1 == 1, n, *o, *m)
                })
        }
        (Message::Type { oid, schema, name }, Model::Type(o, s, n)) => {
            (oid, schema, name) == (o, s, n)
        }
        (Message::Insert { relation, new }, Model::Insert(r, n)) => {
            relation == r && same_cells(new.iter(), n)
        }
        (Message::Update { relation, old, new }, Model::Update(r, o, n)) => {
            let old_ok = match (old, o) {
                (None, None) => true,
                (Some((kind, tuple)), Some((k, cells))) => {
                    *kind == kind_of(*k) && same_cells(tuple.iter(), cells)
                }
                _ => false,
            };
            relation == r && old_ok && same_cells(new.iter(), n)
        }
        (Message::Delete { relation, old }, Model::Delete(r, k, cells)) => {
            relation == r && old.0 == kind_of(*k) && same_cells(old.1.iter(), cells)
        }
        (Message::Truncate { relations, options }, Model::Truncate(r, o)) => {
            (relations, options) == (r, o)
        }
        _ => false,
    }
}

/// Parses `bytes` and walks every tuple it holds (the lazy part of the
/// parser), returning whether the parse succeeded.
fn parse_and_walk(bytes: &[u8]) -> bool {
    let Ok(message) = parse(bytes) else {
        return false;
    };
    let tuples = match &message {
        Message::Insert { new, .. } => vec![*new],
        Message::Update { old, new, .. } => old.iter().map(|o| o.1).chain([*new]).collect(),
        Message::Delete { old, .. } => vec![old.1],
        _ => Vec::new(),
    };
    for tuple in tuples {
        assert_eq!(
            tuple.iter().count(),
            tuple.len(),
            "a validated tuple iterates fully"
        );
    }
    true
}

/// The kinds the decoder property draws columns from: every renderer whose
/// output is valid JSON for any text (json/jsonb embed what the server
/// validated, so they are covered by the renderer properties instead).
fn column_kind() -> impl Strategy<Value = ValueKind> {
    let scalars: Vec<ValueKind> = ValueKind::SCALARS
        .into_iter()
        .filter(|k| !k.embeds_json())
        .collect();
    prop::sample::select(scalars)
        .prop_flat_map(|k| prop_oneof![Just(k.clone()), Just(ValueKind::Array(Box::new(k)))])
}

/// A table for the decoder property: unique column names (with characters
/// JSON must escape), their kinds, and which columns form the primary key.
fn table() -> impl Strategy<Value = Vec<(String, ValueKind, bool)>> {
    prop::collection::vec(("[^\u{0}]{1,8}", column_kind(), any::<bool>()), 1..6).prop_map(
        |mut columns| {
            for (i, column) in columns.iter_mut().enumerate() {
                column.0 = format!("{}{i}", column.0);
            }
            columns
        },
    )
}

fn rendered(kind: &ValueKind, text: &[u8]) -> Value {
    let mut out = Vec::new();
    render(kind, text, &mut out);
    serde_json::from_slice(&out).expect("rendered value is JSON")
}

proptest! {
    #![proptest_config(crate::seed::config())]

    #[test]
    fn valid_messages_parse_to_their_model(model in model()) {
        let bytes = encode(&model);
        let parsed = parse(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(matches_model(&parsed, &model), "{parsed:?} is not {model:?}");
        for cut in 0..bytes.len() {
            prop_assert!(parse(&bytes[..cut]).is_err(), "a cut at {cut} parsed");
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        model in model(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = encode(&model);
        for (at, byte) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        let keep = cut.index(bytes.len() + 1);
        parse_and_walk(&bytes);
        parse_and_walk(&bytes[..keep]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        tag in prop::sample::select(b"BCRYIUDTO".to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&body);
        parse_and_walk(&bytes);
        parse_and_walk(&body);
    }

    #[test]
    fn decoded_rows_are_envelopes_of_the_rendered_values(
        columns in table(),
        replica_identity in prop::sample::select(b"dnfi".to_vec()),
        rows in prop::collection::vec(
            (prop::collection::vec(cell(), 1..6), prop::option::of(prop::collection::vec(cell(), 1..6)), 0u8..3),
            1..6,
        ),
    ) {
        let relation = Model::Relation(
            7,
            "s\"q".to_owned(),
            "t\\n".to_owned(),
            replica_identity,
            columns.iter().map(|(n, _, key)| (u8::from(*key), n.clone(), 25, -1)).collect(),
        );
        let relation_bytes = encode(&relation);
        let Ok(Message::Relation(rel)) = parse(&relation_bytes) else {
            panic!("relation parses");
        };
        let facts = RelationFacts {
            kinds: columns.iter().map(|c| c.1.clone()).collect(),
            primary_key: Some(columns.iter().filter(|c| c.2).map(|c| c.0.clone()).collect()),
        };
        let mut decoder = Decoder::new(
            "src",
            "db",
            StreamRouter::parse("stream").expect("valid stream"),
            TableFilter::new(&["*.*".to_owned()], &[]),
        );
        decoder.relation(&rel, facts);
        let mut tx = Transaction::begin(0x10, 1, 0);
        let captured_at = tributary_envelope::time::now();
        for (new, old, op) in rows {
            let change = match op {
                0 => Model::Insert(7, new.clone()),
                1 => Model::Update(7, old.clone().map(|o| (b'K', o)), new.clone()),
                _ => Model::Delete(7, b'O', old.clone().unwrap_or_else(|| new.clone())),
            };
            let bytes = encode(&change);
            let message = parse(&bytes).expect("a well-formed change parses");
            let mut out = Vec::new();
            if decoder.change(&message, &mut tx, &captured_at, &mut out).is_err() {
                // Only a tuple of the wrong width may be refused.
                let widths = [Some(new.len()), old.as_ref().map(Vec::len)];
                prop_assert!(widths.iter().flatten().any(|&w| w != columns.len()));
                continue;
            }
            for record in &out {
                let envelope: Value = serde_json::from_slice(&record.data)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&record.data))))?;
                prop_assert_eq!(&envelope["source"]["schema"], "s\"q");
                prop_assert_eq!(&envelope["source"]["table"], "t\\n");
                let Some(after) = envelope["after"].as_object() else { continue };
                if envelope["op"] != "insert" || op != 0 {
                    continue;
                }
                // An insert's `after` holds every column, rendered alone.
                for ((name, kind, _), cell) in columns.iter().zip(&new) {
                    let expected = match cell {
                        ModelCell::Null => Value::Null,
                        ModelCell::Unchanged => continue,
                        ModelCell::Text(t) | ModelCell::Binary(t) => rendered(kind, t),
                    };
                    prop_assert_eq!(&after[name.as_str()], &expected, "column {}", name);
                }
            }
        }
    }
}

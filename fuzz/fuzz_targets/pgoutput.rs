//! The `pgoutput` parser and the decoder behind it: the input is a sequence
//! of messages, each prefixed with its length (u16, big-endian). Each is
//! parsed; Relation messages shape the decoder (kinds from the type OIDs,
//! the identity columns as the primary key) and changes are decoded into
//! envelopes, which must be valid JSON unless a json/jsonb value is in them.
//! Nothing may panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_envelope::{StreamRouter, TableFilter};
use tributary_postgres::decoder::{Decoder, RelationFacts, Transaction};
use tributary_postgres::pgoutput::{Message, parse};
use tributary_postgres::types::{ValueKind, builtin_kind};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new(
        "fuzz",
        "fuzz",
        StreamRouter::parse("fuzz").expect("a fixed stream name parses"),
        TableFilter::new(&["*.*".to_owned()], &[]),
    );
    let mut tx = Transaction::begin(1, 1, 0);
    let captured_at = tributary_envelope::time::now();
    let mut any_json = false;
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        let (bytes, next) = tail.split_at(len);
        rest = next;
        let Ok(message) = parse(bytes) else {
            continue;
        };
        match &message {
            Message::Relation(relation) => {
                let kinds: Vec<ValueKind> = relation
                    .columns
                    .iter()
                    .map(|c| builtin_kind(c.type_oid).unwrap_or(ValueKind::Text))
                    .collect();
                any_json |= kinds.iter().any(ValueKind::embeds_json);
                let primary_key = relation
                    .columns
                    .iter()
                    .filter(|c| c.is_identity)
                    .map(|c| c.name.clone())
                    .collect();
                decoder.relation(
                    relation,
                    RelationFacts {
                        kinds,
                        primary_key: Some(primary_key),
                    },
                );
            }
            Message::Begin {
                final_lsn,
                commit_time,
                xid,
            } => tx = Transaction::begin(*final_lsn, *xid, *commit_time),
            _ => {
                let mut out = Vec::new();
                if decoder
                    .change(&message, &mut tx, &captured_at, &mut out)
                    .is_ok()
                    && !any_json
                {
                    for record in &out {
                        if let Err(err) = serde_json::from_slice::<serde_json::Value>(&record.data)
                        {
                            panic!(
                                "invalid envelope {:?}: {err}",
                                String::from_utf8_lossy(&record.data)
                            );
                        }
                    }
                }
            }
        }
    }
});

//! The source's hot path on bytes in memory: parse a `pgoutput` Insert,
//! render its values and write the envelope, per row. The drain benchmark
//! (`scripts/bench.sh`) measures the whole pipeline against a real server;
//! this one isolates the part Tributary owns. `copy_to_envelope` renders the
//! same rows from `COPY` text lines, as a snapshot reads them (the records
//! dropped outside the timing, as the sink's thread frees them).
//!
//! `cargo bench -p tributary-postgres --bench decode`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tributary_envelope::{StreamRouter, TableFilter};
use tributary_postgres::decoder::{Decoder, RelationFacts, Transaction};
use tributary_postgres::pgoutput::{self, Message};
use tributary_postgres::snapshot::{Chunk, render_chunk};
use tributary_postgres::types::ValueKind;

// What the `tributary` binary allocates with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ROWS: usize = 10_000;

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// A Relation message for the benchmark's 6-column table.
fn relation_message() -> Vec<u8> {
    let columns: [(&str, u32, bool); 6] = [
        ("id", 20, true),
        ("a", 23, false),
        ("b", 25, false),
        ("c", 1700, false),
        ("d", 1184, false),
        ("e", 16, false),
    ];
    let mut m = vec![b'R'];
    m.extend_from_slice(&16384u32.to_be_bytes());
    cstr(&mut m, "public");
    cstr(&mut m, "bench");
    m.push(b'd');
    m.extend_from_slice(&(columns.len() as u16).to_be_bytes());
    for (name, oid, key) in columns {
        m.push(u8::from(key));
        cstr(&mut m, name);
        m.extend_from_slice(&oid.to_be_bytes());
        m.extend_from_slice(&(-1i32).to_be_bytes());
    }
    m
}

/// Insert messages as the server sends them (text format).
fn insert_messages() -> Vec<Vec<u8>> {
    (0..ROWS)
        .map(|i| {
            let values = [
                i.to_string(),
                (i * 7 % 100_000).to_string(),
                format!("customer-{:012}", i * 31),
                format!("{}.{:02}", i % 10_000, i % 100),
                "2026-11-23 05:21:05.123456+00".to_owned(),
                if i % 2 == 0 { "t" } else { "f" }.to_owned(),
            ];
            let mut m = vec![b'I'];
            m.extend_from_slice(&16384u32.to_be_bytes());
            m.push(b'N');
            m.extend_from_slice(&(values.len() as u16).to_be_bytes());
            for v in values {
                m.push(b't');
                m.extend_from_slice(&(v.len() as u32).to_be_bytes());
                m.extend_from_slice(v.as_bytes());
            }
            m
        })
        .collect()
}

fn decode(c: &mut Criterion) {
    let relation = relation_message();
    let inserts = insert_messages();
    let mut decoder = Decoder::new(
        "bench",
        "bench",
        StreamRouter::parse("bench-cdc").expect("valid stream"),
        TableFilter::new(&["public.*".to_owned()], &[]),
    );
    let Ok(Message::Relation(rel)) = pgoutput::parse(&relation) else {
        panic!("relation message parses");
    };
    let facts = RelationFacts {
        kinds: vec![
            ValueKind::Integer,
            ValueKind::Integer,
            ValueKind::Text,
            ValueKind::Numeric,
            ValueKind::TimestampTz,
            ValueKind::Bool,
        ],
        primary_key: Some(vec!["id".to_owned()]),
    };
    decoder.relation(&rel, facts);

    let mut group = c.benchmark_group("pgoutput_to_envelope");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("insert_6_columns", |b| {
        let mut out = Vec::with_capacity(ROWS);
        b.iter(|| {
            out.clear();
            let mut tx = Transaction::begin(0x16B_3748, 7781, 817_000_000_000_000);
            let captured_at = tributary_envelope::time::now();
            for bytes in &inserts {
                let msg = pgoutput::parse(bytes).expect("insert parses");
                decoder
                    .change(&msg, &mut tx, &captured_at, &mut out)
                    .expect("insert decodes");
            }
            out.len()
        })
    });
    group.finish();

    // The same rows as a snapshot reads them: lines of `COPY ... TO STDOUT`.
    let lines: Vec<bytes::Bytes> = (0..ROWS)
        .map(|i| {
            format!(
                "{i}\t{}\tcustomer-{:012}\t{}.{:02}\t2026-11-23 05:21:05.123456+00\t{}\n",
                i * 7 % 100_000,
                i * 31,
                i % 10_000,
                i % 100,
                if i % 2 == 0 { "t" } else { "f" }
            )
            .into()
        })
        .collect();
    let chunk = Chunk::from_lines(lines);
    let mut group = c.benchmark_group("copy_to_envelope");
    group.throughput(Throughput::Elements(ROWS as u64));
    group.bench_function("snapshot_chunk_6_columns", |b| {
        b.iter_with_large_drop(|| {
            let mut out = Vec::with_capacity(ROWS);
            let mut tx = Transaction::begin(0x16B_3748, 0, 0);
            let captured_at = tributary_envelope::time::now();
            render_chunk(16384, &chunk, &mut decoder, &mut tx, &captured_at, &mut out)
                .expect("rows render");
            out
        })
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);

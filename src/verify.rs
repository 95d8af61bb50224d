//! `tributary verify`: reconciles the source's tables with the stream.
//!
//! Beside the dataflow, at both of its ends: it reads what a consumer
//! would hold (the stream replayed with the consumer rules, see
//! [`crate::replica`]) and what the source holds, and names the keys
//! where they differ.
//!
//! Order of the reads, and why rows changed meanwhile are no false alarm:
//! 1. a REPEATABLE READ transaction on the source takes its snapshot (the
//!    consistent point), with the session settings of the stream;
//! 2. every shard of the tables' streams is read from the trim horizon to
//!    its end (after the snapshot: whatever the connector had delivered by
//!    then is in the replica);
//! 3. each table is read in that transaction through the snapshot cursor,
//!    every row rendered by the stream's decoder (an `op = "snapshot"`
//!    envelope, so values compare byte for byte) and compared with the
//!    replica by key; matching keys leave the replica at once;
//! 4. only when keys differ, the table is read again in a fresh snapshot
//!    and those keys are judged on that read: a row that changed after the
//!    consistent point (the stream already holds the change, the first
//!    read does not) matches now and is not reported. What is left is a
//!    row the stream lost, or a change the connector has not delivered
//!    yet (run `verify` when the connector has caught up).
//!
//! Re-checking was chosen over cutting the stream at the consistent
//! point's LSN: it needs no wait for the connector to acknowledge that
//! LSN (an idle connector may not move its slot), and it works the same
//! for a stream some other writer filled.
//!
//! Memory: the replica keeps per key the key's JSON and a 64-bit hash per
//! column; source rows are read a cursor chunk at a time and never kept;
//! the keys that differ are kept until the re-check.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio_postgres::Client;
use tributary_kinesis::{RecordVisitor, StartFrom};
use tributary_postgres::catalog::Catalog;
use tributary_postgres::decoder::{Decoder, Transaction};
use tributary_postgres::replication::connect_sql;
use tributary_postgres::{PostgresSourceConfig, snapshot};

use crate::replica::{Change, Comparison, Replica, TableRows};
use crate::settings::{ConfigError, SourceConfig, Validated};

/// Keys shown per kind of difference.
const SAMPLE_KEYS: usize = 10;
/// How often progress goes to stderr during long reads.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What `verify` found for one table.
#[derive(Debug, Default)]
struct TableReport {
    table: String,
    source_rows: u64,
    stream_rows: u64,
    missing: Vec<String>,
    extra: Vec<String>,
    /// Key and the first column that differs.
    different: Vec<(String, String)>,
}

impl TableReport {
    fn matches(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }

    fn json(&self) -> Value {
        json!({
            "table": self.table,
            "source_rows": self.source_rows,
            "stream_rows": self.stream_rows,
            "match": self.matches(),
            "missing": self.missing.len(),
            "extra": self.extra.len(),
            "different": self.different.len(),
            "missing_keys": self.missing.iter().take(SAMPLE_KEYS).map(|k| key_json(k)).collect::<Vec<_>>(),
            "extra_keys": self.extra.iter().take(SAMPLE_KEYS).map(|k| key_json(k)).collect::<Vec<_>>(),
            "different_keys": self.different.iter().take(SAMPLE_KEYS)
                .map(|(k, column)| json!({"key": key_json(k), "column": column}))
                .collect::<Vec<_>>(),
        })
    }
}

fn key_json(key: &str) -> Value {
    serde_json::from_str(key).unwrap_or_else(|_| Value::String(key.to_owned()))
}

/// Feeds the records read from a stream to the replica, with progress.
struct Replayer<'a> {
    stream: &'a str,
    replica: &'a mut Replica,
    shard: String,
    records: u64,
    reported: Instant,
}

impl RecordVisitor for Replayer<'_> {
    fn record(&mut self, shard: &str, _partition_key: Option<&str>, data: &[u8]) {
        // Shard ids repeat across streams.
        self.shard.clear();
        self.shard.push_str(self.stream);
        self.shard.push('/');
        self.shard.push_str(shard);
        self.replica.apply(&self.shard, data);
        self.records += 1;
        if self.reported.elapsed() >= PROGRESS_EVERY {
            self.reported = Instant::now();
            eprintln!("verify: {}: {} records read", self.stream, self.records);
        }
    }
}

/// Runs `verify`; exit code 0 when every table matches, 1 when not.
pub async fn run(v: &Validated, tables: &[String], as_json: bool) -> anyhow::Result<u8> {
    let cfg = match &v.source {
        SourceConfig::Postgres(cfg) => cfg,
        SourceConfig::Mysql(_) => {
            return Err(ConfigError::Invalid {
                key: "source.kind".into(),
                message: "verify reads PostgreSQL sources; MySQL is not available yet".into(),
            }
            .into());
        }
    };
    let side = connect_sql(&cfg.connection).await?;
    let captured: Vec<String> = tributary_postgres::setup::matching_tables(&side, &cfg.filter)
        .await?
        .tables
        .into_iter()
        .map(|(schema, table)| format!("{schema}.{table}"))
        .collect();
    let tables = chosen_tables(&captured, tables)?;
    let kinesis = crate::tail::checked_client_for(Some(&v.settings.sink)).await?;

    // 1. The consistent point.
    let reader = connect_sql(&cfg.connection).await?;
    snapshot::begin(&reader, None).await?;

    // 2. The stream, after the consistent point.
    let db = cfg.connection.get_dbname().unwrap_or_default().to_owned();
    let mut streams: Vec<String> = tables
        .iter()
        .map(|name| {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            cfg.router.resolve(&cfg.name, &db, Some(schema), table)
        })
        .collect();
    streams.sort();
    streams.dedup();
    let mut replica = Replica::keeping(tables.iter().cloned().collect());
    for stream in &streams {
        tributary_kinesis::check_stream(&kinesis, stream, "sink.stream")
            .await
            .map_err(crate::startup::StartupError)?;
        let mut replayer = Replayer {
            stream,
            replica: &mut replica,
            shard: String::new(),
            records: 0,
            reported: Instant::now(),
        };
        tributary_kinesis::read_stream(
            &kinesis,
            stream,
            StartFrom::TrimHorizon,
            false,
            &mut replayer,
        )
        .await?;
    }

    // 3. Each table at the consistent point.
    let mut scanner = Scanner::new(cfg, &db);
    let mut pending = Vec::with_capacity(tables.len());
    for name in &tables {
        let rows = replica.take_table(name);
        pending.push(first_read(&mut scanner, &reader, name, rows).await?);
    }
    reader
        .batch_execute("COMMIT")
        .await
        .context("ending the consistent read")?;
    // 4. The keys that differ, once more on a fresh read.
    let mut reports = Vec::with_capacity(pending.len());
    for (report, rows, flagged) in pending {
        reports.push(recheck(&mut scanner, &side, report, &rows, flagged).await?);
    }
    if as_json {
        let document = json!({
            "match": reports.iter().all(TableReport::matches),
            "stream_records": replica.envelopes + replica.skipped,
            "tables": reports.iter().map(TableReport::json).collect::<Vec<_>>(),
        });
        println!("{document:#}");
    } else {
        print!("{}", human(&reports));
    }
    Ok(u8::from(!reports.iter().all(TableReport::matches)))
}

/// The tables to verify: every captured one, or those of `--table` (each
/// must be captured).
fn chosen_tables(captured: &[String], wanted: &[String]) -> Result<Vec<String>, ConfigError> {
    if wanted.is_empty() {
        return Ok(captured.to_vec());
    }
    wanted
        .iter()
        .map(|name| {
            let name = if name.contains('.') {
                name.clone()
            } else {
                format!("public.{name}")
            };
            if captured.contains(&name) {
                Ok(name)
            } else {
                Err(ConfigError::Invalid {
                    key: "--table".into(),
                    message: format!(
                        "{name} is not a captured table (captured: {})",
                        captured.join(", ")
                    ),
                })
            }
        })
        .collect()
}

/// Reads tables through the snapshot cursor, rendering every row as the
/// stream's decoder does.
struct Scanner {
    decoder: Decoder,
    catalog: Catalog,
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
}

impl Scanner {
    fn new(cfg: &PostgresSourceConfig, db: &str) -> Self {
        Self {
            decoder: Decoder::new(&cfg.name, db, cfg.router.clone(), cfg.filter.clone()),
            catalog: Catalog::default(),
            captured_at: tributary_envelope::time::now(),
        }
    }

    /// Calls `each` with every row of `name` as the stream renders it, in
    /// the transaction open on `client`.
    async fn scan(
        &mut self,
        client: &Client,
        name: &str,
        mut each: impl FnMut(Change),
    ) -> anyhow::Result<u64> {
        let (schema, table) = name.split_once('.').unwrap_or(("public", name));
        let mut reader = snapshot::open_table(
            client,
            &mut self.catalog,
            &mut self.decoder,
            (schema, table),
            None,
            snapshot::CHUNK_ROWS,
        )
        .await?;
        let mut tx = Transaction::begin(0, 0, 0);
        let (mut rows, mut reported) = (0u64, Instant::now());
        let mut decoded = Vec::with_capacity(snapshot::CHUNK_ROWS);
        loop {
            let read = reader
                .next_chunk(
                    client,
                    &mut self.decoder,
                    &mut tx,
                    &self.captured_at,
                    &mut decoded,
                )
                .await?;
            if read == 0 {
                break;
            }
            for record in decoded.drain(..) {
                if let Some(change) = Change::parse(&record.data) {
                    rows += 1;
                    each(change);
                }
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                eprintln!("verify: {name}: {rows} rows read");
            }
        }
        reader.close(client).await?;
        Ok(rows)
    }
}

/// Compares `name` at the consistent point with its replayed `rows`:
/// matching keys leave `rows`; returns the counts and the keys that differ.
async fn first_read(
    scanner: &mut Scanner,
    reader: &Client,
    name: &str,
    mut rows: TableRows,
) -> anyhow::Result<(TableReport, TableRows, HashSet<Box<str>>)> {
    let mut report = TableReport {
        table: name.to_owned(),
        stream_rows: rows.len() as u64,
        ..TableReport::default()
    };
    let mut flagged = HashSet::new();
    report.source_rows = scanner
        .scan(reader, name, |change| {
            let Some(after) = change.after else { return };
            if rows.compare(&change.key, &after) == Comparison::Same {
                rows.remove(&change.key);
            } else {
                flagged.insert(change.key.into_boxed_str());
            }
        })
        .await?;
    // What is left in the replica and was not in the source: extra.
    flagged.extend(rows.keys().cloned());
    Ok((report, rows, flagged))
}

/// Judges the `flagged` keys on a fresh read of the table: a key whose
/// row changed after the consistent point and matches now is fine.
async fn recheck(
    scanner: &mut Scanner,
    client: &Client,
    mut report: TableReport,
    rows: &TableRows,
    mut flagged: HashSet<Box<str>>,
) -> anyhow::Result<TableReport> {
    if flagged.is_empty() {
        return Ok(report);
    }
    snapshot::begin(client, None).await?;
    let mut different = BTreeMap::new();
    let mut missing = Vec::new();
    scanner
        .scan(client, &report.table, |change| {
            if !flagged.remove(change.key.as_str()) {
                return;
            }
            let Some(after) = change.after else { return };
            match rows.compare(&change.key, &after) {
                Comparison::Same => {}
                Comparison::Absent => missing.push(change.key),
                Comparison::Differs(column) => {
                    let column = column.unwrap_or("(a column the table lacks)").to_owned();
                    different.insert(change.key, column);
                }
            }
        })
        .await?;
    client
        .batch_execute("COMMIT")
        .await
        .context("ending the re-check's read")?;
    // Flagged keys the table no longer holds: extra when the stream has them.
    let mut extra: Vec<String> = flagged
        .into_iter()
        .filter(|key| rows.contains_key(key))
        .map(String::from)
        .collect();
    extra.sort_unstable();
    missing.sort_unstable();
    report.missing = missing;
    report.extra = extra;
    report.different = different.into_iter().collect();
    Ok(report)
}

/// The human report: a table of counts, then sample keys.
fn human(reports: &[TableReport]) -> String {
    use std::fmt::Write as _;
    let width = reports
        .iter()
        .map(|r| r.table.len())
        .chain([5])
        .max()
        .unwrap_or(5);
    let mut out = format!(
        "{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}  {:>9}\n",
        "TABLE", "SOURCE", "STREAM", "MISSING", "EXTRA", "DIFFERENT"
    );
    for r in reports {
        let _ = writeln!(
            out,
            "{:<width$}  {:>10}  {:>10}  {:>8}  {:>8}  {:>9}",
            r.table,
            r.source_rows,
            r.stream_rows,
            r.missing.len(),
            r.extra.len(),
            r.different.len()
        );
    }
    for r in reports {
        let keys = |keys: Vec<String>| keys.join(", ");
        if !r.missing.is_empty() {
            let sample = r.missing.iter().take(SAMPLE_KEYS).cloned().collect();
            let _ = writeln!(
                out,
                "{}: missing from the stream: {}",
                r.table,
                keys(sample)
            );
        }
        if !r.extra.is_empty() {
            let sample = r.extra.iter().take(SAMPLE_KEYS).cloned().collect();
            let _ = writeln!(
                out,
                "{}: in the stream, not in the table: {}",
                r.table,
                keys(sample)
            );
        }
        if !r.different.is_empty() {
            let sample = r
                .different
                .iter()
                .take(SAMPLE_KEYS)
                .map(|(k, c)| format!("{k} (column {c})"))
                .collect();
            let _ = writeln!(out, "{}: different: {}", r.table, keys(sample));
        }
    }
    out.push_str(if reports.iter().all(TableReport::matches) {
        "source and stream match\n"
    } else {
        "source and stream differ\n"
    });
    out
}

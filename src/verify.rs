//! `tributary verify`: reconciles the source's tables with the stream.
//!
//! Beside the dataflow, at both of its ends: it reads what a consumer
//! would hold (the stream replayed with the consumer rules, see
//! [`crate::replica`]) and what the source holds, and names the keys
//! where they differ. The source side is a [`TableSource`]: PostgreSQL
//! ([`postgres`]) or MySQL/MariaDB ([`mysql`]); the rest is shared.
//!
//! Order of the reads, and why rows changed meanwhile are no false alarm:
//! 1. a consistent read on the source takes its snapshot (the consistent
//!    point);
//! 2. every shard of the tables' streams is read from the trim horizon
//!    (or from `--since`) to its end (after the snapshot: whatever the
//!    connector had delivered by then is in the replica);
//! 3. each table is read in that consistent read, every row rendered as
//!    the source's snapshot renders it (an `op = "snapshot"` envelope, so
//!    values compare byte for byte) and compared with the replica by key;
//!    matching keys leave the replica at once;
//! 4. only when keys differ, the tables are read again in a fresh
//!    consistent read and those keys are judged on that read: a row that
//!    changed after the consistent point (the stream already holds the
//!    change, the first read does not) matches now and is not reported.
//!    What is left is a row the stream lost, or a change the connector has
//!    not delivered yet (run `verify` when the connector has caught up).
//!
//! Re-checking was chosen over cutting the stream at the consistent
//! point's position: it needs no wait for the connector to acknowledge
//! that position (an idle connector may not move its slot), and it works
//! the same for a stream some other writer filled.
//!
//! With `--since`, the replay starts at a time: rows whose last change is
//! older are not in it. Only the keys the replay saw (set, deleted or
//! truncated after that time) are compared; the source's other rows are
//! counted as not compared.
//!
//! Memory: the replica keeps per key the key's JSON and a 64-bit hash per
//! column; source rows are read a chunk at a time and never kept; the
//! keys that differ are kept until the re-check.

mod mysql;
mod postgres;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tributary_kinesis::{RecordVisitor, StartFrom};

use crate::replica::{Change, Comparison, Replica, TableRows};
use crate::settings::{ConfigError, SourceConfig, Validated};

/// The `key` of an envelope of a table without a primary key.
const NO_KEY: &str = "null";
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
    /// Source rows whose key the replay never saw (`--since`), or every
    /// row of a table without a primary key.
    not_compared: Option<u64>,
    /// The table has no primary key: its rows cannot be matched by key.
    no_key: bool,
}

impl TableReport {
    fn matches(&self) -> bool {
        self.missing.is_empty() && self.extra.is_empty() && self.different.is_empty()
    }

    fn json(&self) -> Value {
        let mut document = json!({
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
        });
        if let Some(not_compared) = self.not_compared {
            document["not_compared"] = json!(not_compared);
        }
        if self.no_key {
            document["no_key"] = json!(true);
        }
        document
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

/// A source's tables, read at consistent points.
trait TableSource {
    /// Opens a consistent read: every [`TableSource::scan`] until
    /// [`TableSource::end`] sees the tables as of this moment.
    async fn begin(&mut self) -> anyhow::Result<()>;

    /// Calls `each` with every row of `name` as the source's snapshot
    /// renders it.
    async fn scan(&mut self, name: &str, each: &mut dyn FnMut(Change)) -> anyhow::Result<()>;

    /// Ends the consistent read.
    async fn end(&mut self) -> anyhow::Result<()>;
}

/// The captured tables of a source.
struct Captured {
    /// `{schema or db}.{table}` and the stream it routes to.
    tables: Vec<(String, String)>,
    /// The schema (PostgreSQL) or database (MySQL) of a `--table` given
    /// without one.
    default_scope: String,
}

/// What `verify` was asked.
#[derive(Debug)]
pub struct Request<'a> {
    /// `--table` (empty: every captured table).
    pub tables: &'a [String],
    /// `--json`.
    pub as_json: bool,
    /// `--since`: the replay starts at this time instead of the trim horizon.
    pub since: Option<SystemTime>,
}

/// Parses `--since`: an RFC 3339 time in UTC (`2026-12-01T03:00:00Z`).
pub fn parse_since(text: &str) -> Result<SystemTime, String> {
    let millis = tributary_envelope::time::parse_unix_millis(text)
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| {
            format!("{text:?} is not an RFC 3339 time in UTC (e.g. 2026-12-01T03:00:00Z)")
        })?;
    Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(millis))
}

/// Runs `verify`; exit code 0 when every table matches, 1 when not.
pub async fn run(v: &Validated, request: Request<'_>) -> anyhow::Result<u8> {
    match &v.source {
        SourceConfig::Postgres(cfg) => {
            let (captured, source) = postgres::PostgresTables::connect(cfg).await?;
            reconcile(v, captured, source, request).await
        }
        SourceConfig::Mysql(cfg) => {
            let (captured, source) = mysql::MysqlTables::connect(cfg).await?;
            reconcile(v, captured, source, request).await
        }
    }
}

/// Steps 1-4 of the module doc, then the report.
async fn reconcile(
    v: &Validated,
    captured: Captured,
    mut source: impl TableSource,
    request: Request<'_>,
) -> anyhow::Result<u8> {
    let tables = chosen_tables(&captured, request.tables)?;
    let kinesis = crate::tail::checked_client_for(Some(&v.settings.sink)).await?;

    // 1. The consistent point.
    source.begin().await?;

    // 2. The stream, after the consistent point.
    let mut streams: Vec<&str> = captured
        .tables
        .iter()
        .filter(|(name, _)| tables.contains(name))
        .map(|(_, stream)| stream.as_str())
        .collect();
    streams.sort_unstable();
    streams.dedup();
    let from = request
        .since
        .map_or(StartFrom::TrimHorizon, StartFrom::AtTimestamp);
    let mut replica = Replica::keeping(tables.iter().cloned().collect());
    replica.keep_deleted_keys(request.since.is_some());
    for stream in streams {
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
        tributary_kinesis::read_stream(&kinesis, stream, from, false, &mut replayer).await?;
    }

    // 3. Each table at the consistent point.
    let mut pending = Vec::with_capacity(tables.len());
    for name in &tables {
        let rows = replica.take_table(name);
        pending.push(first_read(&mut source, name, rows, request.since.is_some()).await?);
    }
    source.end().await?;
    // 4. The keys that differ, once more on a fresh read.
    let mut reports = Vec::with_capacity(pending.len());
    if pending.iter().any(|(_, _, flagged)| !flagged.is_empty()) {
        source.begin().await?;
        for (report, rows, flagged) in pending {
            reports.push(recheck(&mut source, report, &rows, flagged).await?);
        }
        source.end().await?;
    } else {
        reports.extend(pending.into_iter().map(|(report, _, _)| report));
    }
    if request.as_json {
        let mut document = json!({
            "match": reports.iter().all(TableReport::matches),
            "stream_records": replica.envelopes + replica.skipped,
            "tables": reports.iter().map(TableReport::json).collect::<Vec<_>>(),
        });
        if let Some(since) = request.since {
            let millis = since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
            let text = tributary_envelope::time::format_unix_micros(millis);
            document["since"] = json!(String::from_utf8_lossy(&text));
        }
        println!("{document:#}");
    } else {
        print!("{}", human(&reports));
    }
    Ok(u8::from(!reports.iter().all(TableReport::matches)))
}

/// The tables to verify: every captured one, or those of `--table` (each
/// must be captured).
fn chosen_tables(captured: &Captured, wanted: &[String]) -> Result<Vec<String>, ConfigError> {
    let names: Vec<&str> = captured
        .tables
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    if wanted.is_empty() {
        return Ok(names.iter().map(|&n| n.to_owned()).collect());
    }
    wanted
        .iter()
        .map(|name| {
            let name = if name.contains('.') {
                name.clone()
            } else {
                format!("{}.{name}", captured.default_scope)
            };
            if names.contains(&name.as_str()) {
                Ok(name)
            } else {
                Err(ConfigError::Invalid {
                    key: "--table".into(),
                    message: format!(
                        "{name} is not a captured table (captured: {})",
                        names.join(", ")
                    ),
                })
            }
        })
        .collect()
}

/// Calls `each` with every row of `name`, with progress on stderr; the
/// row count.
async fn scan(
    source: &mut impl TableSource,
    name: &str,
    mut each: impl FnMut(Change),
) -> anyhow::Result<u64> {
    let (mut rows, mut reported) = (0u64, Instant::now());
    source
        .scan(name, &mut |change| {
            rows += 1;
            each(change);
            if rows % 1024 == 0 && reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                eprintln!("verify: {name}: {rows} rows read");
            }
        })
        .await?;
    Ok(rows)
}

/// Compares `name` at the consistent point with its replayed `rows`:
/// matching keys leave `rows`; returns the counts and the keys that differ.
/// With `since`, source rows whose key the replay never saw are only
/// counted; so are the rows of a table without a primary key (`key` null:
/// no key to match them by).
async fn first_read(
    source: &mut impl TableSource,
    name: &str,
    mut rows: TableRows,
    since: bool,
) -> anyhow::Result<(TableReport, TableRows, HashSet<Box<str>>)> {
    let mut report = TableReport {
        table: name.to_owned(),
        stream_rows: rows.len() as u64,
        not_compared: since.then_some(0),
        ..TableReport::default()
    };
    let mut flagged = HashSet::new();
    let (mut not_compared, mut keyless) = (0u64, 0u64);
    report.source_rows = scan(source, name, |change| {
        if change.key == NO_KEY {
            keyless += 1;
            return;
        }
        let Some(after) = change.after else { return };
        match rows.compare(&change.key, &after) {
            Comparison::Same => rows.remove(&change.key),
            Comparison::Absent if since && !rows.saw(&change.key) => not_compared += 1,
            _ => {
                flagged.insert(change.key.into_boxed_str());
            }
        }
    })
    .await?;
    if since {
        report.not_compared = Some(not_compared);
    }
    if keyless > 0 {
        report.no_key = true;
        report.not_compared = Some(not_compared + keyless);
        if rows.contains_key(NO_KEY) {
            rows.remove(NO_KEY);
            report.stream_rows = report.stream_rows.saturating_sub(1);
        }
    }
    // What is left in the replica and was not in the source: extra.
    flagged.extend(rows.keys().map(Box::from));
    Ok((report, rows, flagged))
}

/// Judges the `flagged` keys on a fresh read of the table: a key whose
/// row changed after the consistent point and matches now is fine.
async fn recheck(
    source: &mut impl TableSource,
    mut report: TableReport,
    rows: &TableRows,
    mut flagged: HashSet<Box<str>>,
) -> anyhow::Result<TableReport> {
    if flagged.is_empty() {
        return Ok(report);
    }
    let mut different = BTreeMap::new();
    let mut missing = Vec::new();
    scan(source, &report.table.clone(), |change| {
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
        if let Some(n) = r.not_compared.filter(|&n| n > 0) {
            let why = if r.no_key {
                "the table has no primary key"
            } else {
                "no change since --since"
            };
            let _ = writeln!(out, "{}: {n} source rows not compared ({why})", r.table);
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

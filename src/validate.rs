//! `tributary tail --validate`: checks every envelope a stream holds against
//! the envelope's JSON Schema (`schema/envelope.v1.json`, built into the
//! binary; transaction markers, `op` `begin` or `end`, against
//! `schema/transaction.v1.json`) as it passes by, and reports the ones that
//! do not conform.
//!
//! The consumers' side of the dataflow: `tail` writes one JSON line per
//! record; each line is validated and passed on unchanged (to stdout or the
//! `--pretty` printer), and each failure is reported on stderr with the
//! envelope's `id` and the first errors. The first failures are reported in
//! full; past that only counted.
//!
//! With [`TableSchemas`] (a source configured), each change
//! envelope's `after` and `before` are also checked against the JSON Schema
//! of its table that `tributary schema --table` prints, loaded from the
//! catalogue the first time the table is seen: a value of another type than
//! the column's, or a column the table does not have, is a failure too.

use std::collections::HashMap;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

/// The envelope's JSON Schema, as shipped in the repository.
pub const ENVELOPE_SCHEMA: &str = include_str!("../schema/envelope.v1.json");
/// The transaction markers' JSON Schema, as shipped in the repository.
pub const TRANSACTION_SCHEMA: &str = include_str!("../schema/transaction.v1.json");

/// The compiled schemas: change envelopes and transaction markers.
struct Validators {
    envelope: jsonschema::Validator,
    marker: jsonschema::Validator,
}

impl Validators {
    fn new() -> anyhow::Result<Self> {
        let compile = |text: &str| -> anyhow::Result<jsonschema::Validator> {
            let schema: Value = serde_json::from_str(text)?;
            jsonschema::validator_for(&schema)
                .map_err(|err| anyhow::anyhow!("a built-in schema does not compile: {err}"))
        };
        Ok(Self {
            envelope: compile(ENVELOPE_SCHEMA)?,
            marker: compile(TRANSACTION_SCHEMA)?,
        })
    }

    /// The schema `record` is checked against, by its `op`.
    fn for_record(&self, record: &Value) -> &jsonschema::Validator {
        match record.get("op").and_then(Value::as_str) {
            Some("begin" | "end") => &self.marker,
            _ => &self.envelope,
        }
    }
}

/// Where table schemas come from.
enum Catalogue {
    Postgres(tokio_postgres::Client),
    Mysql(mysql_async::Conn),
}

/// The JSON Schema of each table's `after` (the source's catalogue), loaded
/// the first time an envelope of the table is checked.
pub struct TableSchemas {
    catalogue: Catalogue,
    /// `schema.table` → its validator (`None`: the table cannot be read,
    /// e.g. dropped since; its envelopes get the envelope check only).
    loaded: HashMap<String, Option<jsonschema::Validator>>,
}

impl TableSchemas {
    /// Schemas read through a PostgreSQL `client`.
    pub fn postgres(client: tokio_postgres::Client) -> Self {
        Self {
            catalogue: Catalogue::Postgres(client),
            loaded: HashMap::new(),
        }
    }

    /// Schemas read through a MySQL/MariaDB connection.
    pub fn mysql(conn: mysql_async::Conn) -> Self {
        Self {
            catalogue: Catalogue::Mysql(conn),
            loaded: HashMap::new(),
        }
    }

    /// The schema document of `schema.table` from the catalogue.
    async fn read(&mut self, schema: &str, table: &str) -> anyhow::Result<Value> {
        match &mut self.catalogue {
            Catalogue::Postgres(client) => {
                Ok(tributary_postgres::table_schema::after_schema(client, schema, table).await?)
            }
            Catalogue::Mysql(conn) => {
                tributary_mysql::table_schema::after_schema(conn, schema, table)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no such table"))
            }
        }
    }

    /// The validator of `schema.table`, loading it at first use.
    async fn validator(&mut self, schema: &str, table: &str) -> Option<&jsonschema::Validator> {
        let name = format!("{schema}.{table}");
        if !self.loaded.contains_key(&name) {
            let loaded = match self.read(schema, table).await {
                Ok(document) => jsonschema::validator_for(&document)
                    .map_err(|err| eprintln!("note: the schema of {name} does not compile: {err}"))
                    .ok(),
                Err(err) => {
                    eprintln!("note: {name}: column types not checked ({err})");
                    None
                }
            };
            self.loaded.insert(name.clone(), loaded);
        }
        self.loaded.get(&name).and_then(Option::as_ref)
    }

    /// The errors of `envelope`'s `after` and `before` against its table's
    /// schema, each with its path (`/after/n`).
    async fn errors(&mut self, envelope: &Value) -> Vec<String> {
        let source = envelope.get("source");
        let field = |name: &str| source.and_then(|s| s.get(name)).and_then(Value::as_str);
        // A MySQL envelope names its database in `db` (`schema` is null).
        let (Some(schema), Some(table)) = (field("schema").or(field("db")), field("table")) else {
            return Vec::new();
        };
        let Some(validator) = self.validator(schema, table).await else {
            return Vec::new();
        };
        ["after", "before"]
            .into_iter()
            .filter_map(|side| Some((side, envelope.get(side).filter(|v| v.is_object())?)))
            .flat_map(|(side, row)| {
                validator
                    .iter_errors(row)
                    .map(move |e| format!("{} at /{side}{}", e, e.instance_path()))
                    .collect::<Vec<_>>()
            })
            .take(ERRORS_PER_ENVELOPE)
            .collect()
    }
}

/// Failures reported in full before the rest are only counted.
const REPORTED: usize = 20;
/// Errors shown per failing envelope.
const ERRORS_PER_ENVELOPE: usize = 3;

/// What validation found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Records read.
    pub records: u64,
    /// Records that are not valid envelopes.
    pub invalid: u64,
}

/// Validates each line of `input` (against the tables' schemas too, with
/// `tables`) and writes it, unchanged, to `out`; failures go to stderr.
/// Returns the counts once `input` ends.
pub async fn pass_lines(
    input: impl AsyncRead + Unpin,
    out: &mut (impl AsyncWrite + Unpin),
    mut tables: Option<TableSchemas>,
) -> anyhow::Result<Summary> {
    let validators = Validators::new()?;
    let mut summary = Summary::default();
    let mut lines = BufReader::new(input).lines();
    while let Some(line) = lines.next_line().await? {
        summary.records += 1;
        if let Some(problem) = check(&validators, tables.as_mut(), &line).await {
            summary.invalid += 1;
            if summary.invalid as usize <= REPORTED {
                eprintln!("{problem}");
            }
        }
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    out.flush().await?;
    Ok(summary)
}

/// Why `line` is not a valid envelope (or, with `tables`, holds a value
/// its table's schema refuses), naming its `id`; `None` when it is valid.
async fn check(
    validators: &Validators,
    tables: Option<&mut TableSchemas>,
    line: &str,
) -> Option<String> {
    let envelope: Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(err) => return Some(format!("invalid record (not JSON: {err}): {line:.120}")),
    };
    let mut errors: Vec<String> = validators
        .for_record(&envelope)
        .iter_errors(&envelope)
        .take(ERRORS_PER_ENVELOPE)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if let Some(tables) = tables
        && errors.is_empty()
        && !matches!(
            envelope.get("op").and_then(Value::as_str),
            Some("begin" | "end")
        )
    {
        errors = tables.errors(&envelope).await;
    }
    if errors.is_empty() {
        return None;
    }
    let id = envelope
        .get("id")
        .map_or("(no id)".to_owned(), Value::to_string);
    Some(format!("invalid envelope {id}: {}", errors.join("; ")))
}

/// The last line `tail --validate` prints on stderr.
pub fn verdict(summary: Summary) -> String {
    if summary.invalid == 0 {
        format!("validated {} envelopes: all valid", summary.records)
    } else {
        format!(
            "validated {} envelopes: {} invalid{}",
            summary.records,
            summary.invalid,
            if summary.invalid as usize > REPORTED {
                format!(" (the first {REPORTED} are listed above)")
            } else {
                String::new()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"v":1,"id":"shop:00000000016B3748:00000003","op":"insert","source":{"connector":"postgres","name":"shop","db":"shop","schema":"public","table":"orders","position":"00000000016B3748:00000003","tx_id":"7781","commit_ts":"2026-11-23T05:21:05.123456Z","snapshot":false},"key":{"id":42},"before":null,"after":{"id":42},"unchanged":[],"captured_at":"2026-11-23T05:21:05.130001Z"}"#;

    #[tokio::test]
    async fn valid_envelopes_pass_and_broken_ones_are_counted() {
        let broken = VALID.replace(r#""op":"insert""#, r#""op":"upsert""#);
        let input = format!("{VALID}\n{broken}\nnot json\n");
        let mut out = Vec::new();
        let summary = pass_lines(input.as_bytes(), &mut out, None).await.unwrap();
        assert_eq!(
            summary,
            Summary {
                records: 3,
                invalid: 2
            }
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            input,
            "lines pass unchanged"
        );
        let validators = Validators::new().unwrap();
        let problem = check(&validators, None, &broken).await.unwrap();
        assert!(
            problem.contains("shop:00000000016B3748:00000003"),
            "{problem}"
        );
        assert!(problem.contains("/op"), "{problem}");
        assert_eq!(verdict(summary), "validated 3 envelopes: 2 invalid");
    }

    #[tokio::test]
    async fn markers_are_checked_against_their_own_schema() {
        use tributary_envelope::transaction::{
            MarkerKind, MarkerSpec, TxCounts, TxTag, render_marker,
        };
        let validators = Validators::new().unwrap();
        let tag = TxTag {
            connector: "mysql".into(),
            name: "shop".into(),
            db: "shop".into(),
            major: 0x1_0000_0200,
            tx_id: "0-1-7".into(),
            commit_ts: Some(*b"2026-11-23T05:21:05.000000Z"),
            extra: br#","gtid":"0-1-7","file":"binlog.000001","pos":512"#.to_vec(),
        };
        let mut counts = TxCounts::default();
        counts.add(&"shop.orders".into());
        for (kind, counts) in [
            (MarkerKind::Begin, None),
            (MarkerKind::End, Some((&counts, 1))),
        ] {
            let spec = MarkerSpec {
                kind,
                tag: &tag,
                shard_start: 170141183460469231731687303715884105728,
                counts,
            };
            let line = String::from_utf8(render_marker(Default::default(), spec)).unwrap();
            assert_eq!(check(&validators, None, &line).await, None, "{line}");
        }
        let begin = MarkerSpec {
            kind: MarkerKind::Begin,
            tag: &tag,
            shard_start: 0,
            counts: None,
        };
        let line = String::from_utf8(render_marker(Default::default(), begin)).unwrap();
        let broken = line.replace(r#""op":"begin""#, r#""op":"end""#);
        let problem = check(&validators, None, &broken).await.unwrap();
        assert!(
            problem.contains(":begin:0"),
            "an end without counts: {problem}"
        );
    }
}

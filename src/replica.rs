//! What a consumer that follows `docs/envelope.md` ("Consumer rules")
//! ends up holding, for `tributary verify`.
//!
//! At the consumers' end of the dataflow: envelopes read back from the
//! stream are applied shard by shard in order: `insert`, `update` and
//! `snapshot` set the row under `key` to `after` (columns in `unchanged`
//! keep their value), an `update` whose `before` holds other key values (a
//! key change) first removes the row under the old key, `delete` removes
//! the row, `truncate` removes the table's rows this shard wrote.
//!
//! Memory stays small whatever the rows hold: per key only the shard that
//! wrote it and a 64-bit hash of each column's name and JSON value, not
//! the values.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use serde_json::{Map, Value};

/// A row as hashes: `(column name hash, value hash)`, sorted.
pub type RowHashes = Box<[(u64, u64)]>;

/// One row of the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Index of the shard that wrote it (see [`Replica::apply`]).
    shard: u32,
    /// Its columns, hashed.
    pub columns: RowHashes,
}

/// The rows of one table: key JSON → row.
pub type TableRows = HashMap<Box<str>, Row>;

/// One envelope, as far as the consumer rules need it.
#[derive(Debug, PartialEq)]
pub struct Change {
    /// `{schema or db}.{table}`.
    pub table: String,
    /// The `key` object as JSON text.
    pub key: String,
    /// The `op` field.
    pub op: String,
    /// The key in `before` when it differs from `key` (a key change).
    pub old_key: Option<String>,
    /// The `after` object, when there is one.
    pub after: Option<Map<String, Value>>,
    /// Columns of `unchanged`.
    pub unchanged: Vec<String>,
}

impl Change {
    /// Reads an envelope; `None` for data that is not one (records other
    /// writers put on the stream).
    pub fn parse(data: &[u8]) -> Option<Self> {
        let Ok(Value::Object(mut envelope)) = serde_json::from_slice::<Value>(data) else {
            return None;
        };
        let source = envelope.get("source")?.as_object()?;
        let scope = source
            .get("schema")
            .and_then(Value::as_str)
            .or_else(|| source.get("db").and_then(Value::as_str))?;
        let table = format!("{scope}.{}", source.get("table")?.as_str()?);
        let op = envelope.get("op")?.as_str()?.to_owned();
        let key_value = envelope.get("key").cloned().unwrap_or(Value::Null);
        let key = key_value.to_string();
        let old_key = old_key(&key_value, envelope.get("before")).filter(|old| *old != key);
        let unchanged = envelope
            .get("unchanged")
            .and_then(Value::as_array)
            .map(|columns| {
                columns
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let after = match envelope.remove("after") {
            Some(Value::Object(after)) => Some(after),
            _ => None,
        };
        Some(Self {
            table,
            key,
            op,
            old_key,
            after,
            unchanged,
        })
    }
}

/// The key columns' values in `before`, as a `key` object, when `before`
/// holds them all.
fn old_key(key: &Value, before: Option<&Value>) -> Option<String> {
    let key = key.as_object()?;
    let before = before?.as_object()?;
    let old: Option<Map<String, Value>> = key
        .keys()
        .map(|column| Some((column.clone(), before.get(column)?.clone())))
        .collect();
    Some(Value::Object(old?).to_string())
}

/// The 64-bit hash of a string (a column name or a value's JSON).
pub fn hash(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// The hashes of a row's columns.
pub fn row_hashes(after: &Map<String, Value>) -> Vec<(u64, u64)> {
    let mut columns: Vec<(u64, u64)> = after
        .iter()
        .map(|(name, value)| (hash(name), hash(&value.to_string())))
        .collect();
    columns.sort_unstable();
    columns
}

/// The first column of `source` (in its order) whose value is not the
/// same in `replica`; `None` when every column of `source` is.
pub fn first_difference<'a>(source: &'a Map<String, Value>, replica: &Row) -> Option<&'a str> {
    source
        .iter()
        .find(|(name, value)| {
            let name = hash(name);
            let found = replica
                .columns
                .binary_search_by_key(&name, |(n, _)| *n)
                .ok()
                .map(|i| replica.columns[i].1);
            found != Some(hash(&value.to_string()))
        })
        .map(|(name, _)| name.as_str())
}

/// The replayed stream: every table's rows.
#[derive(Debug, Default)]
pub struct Replica {
    shards: Vec<String>,
    tables: HashMap<String, TableRows>,
    /// Envelopes applied.
    pub envelopes: u64,
    /// Records that were not envelopes (skipped).
    pub skipped: u64,
}

impl Replica {
    /// Applies one record of `shard`; records of a shard must come in the
    /// shard's order.
    pub fn apply(&mut self, shard: &str, data: &[u8]) {
        let Some(change) = Change::parse(data) else {
            self.skipped += 1;
            return;
        };
        self.envelopes += 1;
        let shard = self.shard_index(shard);
        let rows = self.tables.entry(change.table).or_default();
        // A key change: the row leaves its old key (and lends the values
        // of its unchanged columns to the new one).
        let moved = match &change.old_key {
            Some(old) if change.op == "update" => rows.remove(old.as_str()),
            _ => None,
        };
        match change.op.as_str() {
            "insert" | "update" | "snapshot" => {
                let Some(after) = &change.after else { return };
                let mut columns = row_hashes(after);
                if !change.unchanged.is_empty()
                    && let Some(previous) = moved.as_ref().or(rows.get(change.key.as_str()))
                {
                    for name in &change.unchanged {
                        let name = hash(name);
                        if let Ok(i) = previous.columns.binary_search_by_key(&name, |(n, _)| *n) {
                            columns.push(previous.columns[i]);
                        }
                    }
                    columns.sort_unstable();
                }
                rows.insert(
                    change.key.into_boxed_str(),
                    Row {
                        shard,
                        columns: columns.into_boxed_slice(),
                    },
                );
            }
            "delete" => {
                rows.remove(change.key.as_str());
            }
            "truncate" => rows.retain(|_, row| row.shard != shard),
            // Ops a later envelope version may add change no row.
            _ => {}
        }
    }

    fn shard_index(&mut self, shard: &str) -> u32 {
        let index = match self.shards.iter().position(|s| s == shard) {
            Some(index) => index,
            None => {
                self.shards.push(shard.to_owned());
                self.shards.len() - 1
            }
        };
        u32::try_from(index).unwrap_or(u32::MAX)
    }

    /// Takes the rows of `table` out of the replica (empty when the stream
    /// has none).
    pub fn take_table(&mut self, table: &str) -> TableRows {
        self.tables.remove(table).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn envelope(op: &str, key: i64, after: Option<Value>) -> Vec<u8> {
        let mut e = json!({
            "op": op,
            "source": {"schema": "public", "table": "t"},
            "key": {"id": key},
        });
        if let Some(after) = after {
            e["after"] = after;
        }
        e.to_string().into_bytes()
    }

    fn row(after: Value) -> RowHashes {
        row_hashes(after.as_object().unwrap()).into_boxed_slice()
    }

    #[test]
    fn last_event_per_key_wins_and_delete_removes() {
        let mut replica = Replica::default();
        replica.apply(
            "a",
            &envelope("snapshot", 1, Some(json!({"id": 1, "v": "x"}))),
        );
        replica.apply(
            "a",
            &envelope("insert", 2, Some(json!({"id": 2, "v": "y"}))),
        );
        replica.apply(
            "a",
            &envelope("update", 1, Some(json!({"id": 1, "v": "z"}))),
        );
        replica.apply(
            "b",
            &envelope("insert", 3, Some(json!({"id": 3, "v": "w"}))),
        );
        replica.apply("b", &envelope("delete", 3, None));
        replica.apply("b", b"not an envelope");
        assert_eq!((replica.envelopes, replica.skipped), (5, 1));
        let rows = replica.take_table("public.t");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows["{\"id\":1}"].columns, row(json!({"id": 1, "v": "z"})));
        assert!(replica.take_table("public.t").is_empty());
    }

    #[test]
    fn a_key_change_moves_the_row_and_unchanged_columns_keep_their_value() {
        let mut replica = Replica::default();
        replica.apply(
            "a",
            &envelope("insert", 1, Some(json!({"id": 1, "v": "x", "big": "long"}))),
        );
        let mut moved: Value =
            serde_json::from_slice(&envelope("update", 5, Some(json!({"id": 5, "v": "y"}))))
                .unwrap();
        moved["before"] = json!({"id": 1});
        moved["unchanged"] = json!(["big"]);
        replica.apply("a", moved.to_string().as_bytes());
        let mut toast: Value =
            serde_json::from_slice(&envelope("update", 5, Some(json!({"id": 5, "v": "z"}))))
                .unwrap();
        toast["unchanged"] = json!(["big"]);
        replica.apply("a", toast.to_string().as_bytes());
        let rows = replica.take_table("public.t");
        assert_eq!(rows.len(), 1, "{rows:?}");
        let got = &rows["{\"id\":5}"];
        assert_eq!(got.columns, row(json!({"id": 5, "v": "z", "big": "long"})));
        let source = json!({"id": 5, "v": "z", "big": "other"});
        assert_eq!(
            first_difference(source.as_object().unwrap(), got),
            Some("big")
        );
        let same = json!({"id": 5, "v": "z", "big": "long"});
        assert_eq!(first_difference(same.as_object().unwrap(), got), None);
    }

    #[test]
    fn a_truncate_clears_only_the_rows_its_shard_wrote() {
        let mut replica = Replica::default();
        replica.apply("a", &envelope("insert", 1, Some(json!({"id": 1}))));
        replica.apply("b", &envelope("insert", 2, Some(json!({"id": 2}))));
        let truncate = json!({"op": "truncate", "source": {"schema": "public", "table": "t"}});
        replica.apply("a", truncate.to_string().as_bytes());
        replica.apply("a", &envelope("insert", 3, Some(json!({"id": 3}))));
        let rows = replica.take_table("public.t");
        let mut keys: Vec<&str> = rows.keys().map(|k| &**k).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["{\"id\":2}", "{\"id\":3}"]);
    }
}

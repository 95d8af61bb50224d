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
//! wrote it and a 64-bit hash of each column's JSON value, by column slots
//! numbered once per table; never the values.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use serde_json::{Map, Value};

/// The hash of a column a row does not hold.
const ABSENT: u64 = 0;

/// One row of the replica in a single allocation: the index of the shard
/// that wrote it (see [`Replica::apply`]), the number of column slots, the
/// hash of each column's value by the table's slots ([`ABSENT`] where the
/// row has none; slots past the end are absent), then the key's JSON.
/// Hashed and compared by the key alone, so a set of rows is a map from
/// key to row at 16 bytes a slot.
#[derive(Debug, Clone)]
pub struct Row(Box<[u8]>);

/// Bytes before the value hashes: the shard and the slot count (u32 each).
const ROW_HEADER: usize = 8;

impl Row {
    fn new(shard: u32, values: &[u64], key: &str) -> Self {
        let count = u32::try_from(values.len()).unwrap_or(u32::MAX);
        let mut bytes = Vec::with_capacity(ROW_HEADER + values.len() * 8 + key.len());
        bytes.extend_from_slice(&shard.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        for value in values.iter().take(count as usize) {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes.extend_from_slice(key.as_bytes());
        Self(bytes.into_boxed_slice())
    }

    fn word(&self, at: usize) -> u32 {
        self.0
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    }

    fn shard(&self) -> u32 {
        self.word(0)
    }

    fn count(&self) -> usize {
        self.word(4) as usize
    }

    fn value(&self, slot: usize) -> u64 {
        if slot >= self.count() {
            return ABSENT;
        }
        let at = ROW_HEADER + slot * 8;
        self.0
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(ABSENT, u64::from_le_bytes)
    }

    /// The key's JSON.
    fn key(&self) -> &[u8] {
        self.0
            .get(ROW_HEADER + self.count() * 8..)
            .unwrap_or_default()
    }

    /// The key's JSON as text (it was a `str` when the row was made).
    fn key_text(&self) -> &str {
        std::str::from_utf8(self.key()).unwrap_or_default()
    }
}

impl PartialEq for Row {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Row {}

impl std::hash::Hash for Row {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes: `Borrow<[u8]>` looks rows up by key bytes.
        self.key().hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Row {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

/// How a source row compares with the replica's row of its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Comparison<'a> {
    /// The replica has no row under the key.
    Absent,
    /// Every column holds the same value.
    Same,
    /// This column (of the source row, or `None`: one only the replica's
    /// row has) is the first that differs.
    Differs(Option<&'a str>),
}

/// The rows of one table: key JSON → row, the columns numbered once per
/// table (a row keeps only one hash per column, no names).
#[derive(Debug, Default)]
pub struct TableRows {
    /// Column name hash of each slot.
    columns: Vec<u64>,
    rows: HashSet<Row>,
    /// Keys a delete or truncate removed (kept only for `verify --since`:
    /// the replay saw them).
    deleted: HashSet<Box<str>>,
}

impl TableRows {
    /// The slot of a column, numbering it when new.
    fn slot(&mut self, name: &str) -> usize {
        let name = hash(name);
        match self.columns.iter().position(|&c| c == name) {
            Some(slot) => slot,
            None => {
                self.columns.push(name);
                self.columns.len() - 1
            }
        }
    }

    /// The value hashes of `after` by slot.
    fn values(&mut self, after: &Map<String, Value>) -> Vec<u64> {
        let mut values = vec![ABSENT; self.columns.len()];
        for (name, value) in after {
            let slot = self.slot(name);
            if values.len() <= slot {
                values.resize(slot + 1, ABSENT);
            }
            values[slot] = value_hash(value);
        }
        values
    }

    /// How `after` (a source row under `key`) compares with the replica.
    pub fn compare<'a>(&self, key: &str, after: &'a Map<String, Value>) -> Comparison<'a> {
        let Some(row) = self.rows.get(key.as_bytes()) else {
            return Comparison::Absent;
        };
        let mut seen = vec![false; self.columns.len()];
        for (name, value) in after {
            let name_hash = hash(name);
            match self.columns.iter().position(|&c| c == name_hash) {
                Some(slot) => {
                    seen[slot] = true;
                    if row.value(slot) != value_hash(value) {
                        return Comparison::Differs(Some(name));
                    }
                }
                None => return Comparison::Differs(Some(name)),
            }
        }
        let replica_only =
            (0..self.columns.len()).any(|slot| !seen[slot] && row.value(slot) != ABSENT);
        if replica_only {
            Comparison::Differs(None)
        } else {
            Comparison::Same
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the table holds no row.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether the replay saw `key`: it holds a row under it, or (when
    /// [`Replica::keep_deleted_keys`]) removed one.
    pub fn saw(&self, key: &str) -> bool {
        self.rows.contains(key.as_bytes()) || self.deleted.contains(key)
    }

    /// Whether a row is held under `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.rows.contains(key.as_bytes())
    }

    /// Removes the row under `key`.
    pub fn remove(&mut self, key: &str) {
        self.rows.remove(key.as_bytes());
    }

    /// The keys held.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.rows.iter().map(Row::key_text)
    }
}

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
        // A transaction marker (`begin`, `end`) changes no row.
        if matches!(envelope.get("op")?.as_str()?, "begin" | "end") {
            return None;
        }
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

/// The hash of a value's JSON, never [`ABSENT`].
fn value_hash(value: &Value) -> u64 {
    hash(&value.to_string()).max(1)
}

/// The replayed stream: every table's rows.
#[derive(Debug, Default)]
pub struct Replica {
    shards: Vec<String>,
    tables: HashMap<String, TableRows>,
    /// Envelopes applied.
    pub envelopes: u64,
    /// Records that were not change envelopes (other writers' records,
    /// transaction markers): skipped.
    pub skipped: u64,
    /// Only these tables are kept (all when empty).
    wanted: HashSet<String>,
    /// Whether keys removed by a delete or truncate are remembered.
    keep_deleted: bool,
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
        if !self.wanted.is_empty() && !self.wanted.contains(&change.table) {
            return;
        }
        let shard = self.shard_index(shard);
        let rows = self.tables.entry(change.table).or_default();
        // A key change: the row leaves its old key (and lends the values
        // of its unchanged columns to the new one).
        let keep_deleted = self.keep_deleted;
        let moved = match &change.old_key {
            Some(old) if change.op == "update" => {
                if keep_deleted {
                    rows.deleted.insert(old.as_str().into());
                }
                rows.rows.take(old.as_bytes())
            }
            _ => None,
        };
        match change.op.as_str() {
            "insert" | "update" | "snapshot" => {
                let Some(after) = &change.after else { return };
                let mut values = rows.values(after);
                let unchanged: Vec<usize> = change.unchanged.iter().map(|n| rows.slot(n)).collect();
                if !unchanged.is_empty()
                    && let Some(previous) = moved.as_ref().or(rows.rows.get(change.key.as_bytes()))
                {
                    for slot in unchanged {
                        if values.len() <= slot {
                            values.resize(slot + 1, ABSENT);
                        }
                        values[slot] = previous.value(slot);
                    }
                }
                if keep_deleted {
                    rows.deleted.remove(change.key.as_str());
                }
                rows.rows.replace(Row::new(shard, &values, &change.key));
            }
            "delete" => {
                rows.remove(&change.key);
                if keep_deleted {
                    rows.deleted.insert(change.key.into_boxed_str());
                }
            }
            "truncate" => {
                let deleted = &mut rows.deleted;
                rows.rows.retain(|row| {
                    let stays = row.shard() != shard;
                    if !stays && keep_deleted {
                        deleted.insert(row.key_text().into());
                    }
                    stays
                });
            }
            // Ops a later envelope version may add change no row.
            _ => {}
        }
    }

    /// A replica keeping only the tables of `wanted` (all when empty).
    pub fn keeping(wanted: HashSet<String>) -> Self {
        Self {
            wanted,
            ..Self::default()
        }
    }

    /// Remembers the keys deletes and truncates remove (see
    /// [`TableRows::saw`]), for a replay that does not start at the
    /// stream's beginning.
    pub fn keep_deleted_keys(&mut self, keep: bool) {
        self.keep_deleted = keep;
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

    /// The comparison, as its debug text (it borrows the row).
    fn compare(rows: &TableRows, key: &str, after: Value) -> String {
        format!("{:?}", rows.compare(key, after.as_object().unwrap()))
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
        replica.wanted = ["public.t".to_owned()].into();
        replica.apply("b", br#"{"op":"insert","source":{"schema":"public","table":"u"},"key":{"id":1},"after":{"id":1}}"#);
        assert!(
            replica.take_table("public.u").is_empty(),
            "a table not wanted is not kept"
        );
        assert_eq!((replica.envelopes, replica.skipped), (6, 1));
        let rows = replica.take_table("public.t");
        assert_eq!(rows.len(), 2);
        let one = "{\"id\":1}";
        assert_eq!(compare(&rows, one, json!({"id": 1, "v": "z"})), "Same");
        assert_eq!(
            compare(&rows, one, json!({"id": 1, "v": "x"})),
            r#"Differs(Some("v"))"#
        );
        assert_eq!(
            compare(&rows, one, json!({"id": 1})),
            "Differs(None)",
            "a column only the replica has"
        );
        assert_eq!(compare(&rows, "{\"id\":3}", json!({"id": 3})), "Absent");
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
        let five = "{\"id\":5}";
        assert_eq!(
            compare(&rows, five, json!({"id": 5, "v": "z", "big": "long"})),
            "Same"
        );
        assert_eq!(
            compare(&rows, five, json!({"id": 5, "v": "z", "big": "other"})),
            r#"Differs(Some("big"))"#
        );
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
        let mut keys: Vec<&str> = rows.keys().collect();
        assert_eq!(rows.len(), 2);
        keys.sort_unstable();
        assert_eq!(keys, ["{\"id\":2}", "{\"id\":3}"]);
    }

    #[test]
    fn keys_removed_by_deletes_and_truncates_are_remembered_when_asked() {
        let truncate = json!({"op": "truncate", "source": {"schema": "public", "table": "t"}});
        for keep in [false, true] {
            let mut replica = Replica::default();
            replica.keep_deleted_keys(keep);
            replica.apply("a", &envelope("insert", 1, Some(json!({"id": 1}))));
            replica.apply("a", &envelope("delete", 1, None));
            replica.apply("a", &envelope("insert", 2, Some(json!({"id": 2}))));
            replica.apply("a", truncate.to_string().as_bytes());
            replica.apply("b", &envelope("delete", 3, None));
            replica.apply("b", &envelope("insert", 3, Some(json!({"id": 3}))));
            let rows = replica.take_table("public.t");
            assert_eq!(rows.len(), 1);
            for (key, removed) in [
                ("{\"id\":1}", true),
                ("{\"id\":2}", true),
                ("{\"id\":4}", false),
            ] {
                assert_eq!(rows.saw(key), keep && removed, "{key}, keep {keep}");
            }
            assert!(
                rows.saw("{\"id\":3}"),
                "a key set again after its delete is held"
            );
            assert_eq!(rows.keys().count(), 1, "removed keys are not rows");
        }
    }

    #[test]
    fn a_row_holds_its_shard_values_and_key_and_is_found_by_key() {
        let row = Row::new(7, &[1, u64::MAX, ABSENT], "{\"id\":\"é\"}");
        assert_eq!((row.shard(), row.count()), (7, 3));
        assert_eq!(
            (row.value(0), row.value(1), row.value(2), row.value(3)),
            (1, u64::MAX, ABSENT, ABSENT)
        );
        assert_eq!(row.key_text(), "{\"id\":\"é\"}");
        let mut rows = HashSet::new();
        rows.insert(row);
        rows.replace(Row::new(8, &[2], "{\"id\":\"é\"}"));
        assert_eq!(rows.len(), 1, "one row per key");
        let found = rows.get("{\"id\":\"é\"}".as_bytes()).unwrap();
        assert_eq!((found.shard(), found.value(0)), (8, 2));
    }
}

//! A consumer that applies a stream the way `docs/envelope.md` tells one
//! to, for tests that compare what a consumer ends up with against the
//! source table.
//!
//! The rules (one worker per shard, each applying its shard in order):
//! - `insert`, `update`, `snapshot`: the row under its `key` becomes
//!   `after`; columns listed in `unchanged` keep their previous value; an
//!   `update` whose `before` holds other key values (a key change written
//!   as one update) first removes the row under the old key;
//! - `delete`: the row under its `key` is removed;
//! - `truncate`: every row of that table that this shard's events wrote is
//!   removed (the truncate is written to every shard).
//!
//! Only per-shard order may be relied on, so [`replay`] applies whole shards
//! one after the other into one shared table: a stream keeps per-key order
//! exactly when the result is the same whatever order the shards are
//! applied in. [`replay_every_order`] checks that for the forward and the
//! reverse shard order.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

use crate::kinesalite::StreamRecord;

/// Rows a consumer holds: `{schema or db}.{table}` → key JSON → row.
pub type Replica = BTreeMap<String, BTreeMap<String, Map<String, Value>>>;

/// [`Replica`] while replaying: each row with the shard that wrote it.
type Applied = BTreeMap<String, BTreeMap<String, (String, Map<String, Value>)>>;

/// Applies `records` (as [`crate::Kinesalite::read_all`] returns them:
/// grouped by shard, each shard in sequence order), shard after shard in
/// the order of `shards`.
pub fn replay(records: &[StreamRecord], shards: &[String]) -> Result<Replica> {
    // Rows with the shard whose events wrote them.
    let mut rows = Applied::new();
    for shard in shards {
        for record in records.iter().filter(|r| &r.shard_id == shard) {
            let envelope = record.json()?;
            apply(&mut rows, shard, &envelope)
                .with_context(|| format!("applying {envelope} from {shard}"))?;
        }
    }
    Ok(rows
        .into_iter()
        .map(|(table, rows)| {
            let rows = rows.into_iter().map(|(k, (_, row))| (k, row)).collect();
            (table, rows)
        })
        .filter(|(_, rows): &(String, BTreeMap<_, _>)| !rows.is_empty())
        .collect())
}

/// [`replay`] with the shards in their order and in reverse; fails unless
/// both give the same rows, and returns them.
pub fn replay_every_order(records: &[StreamRecord]) -> Result<Replica> {
    let mut shards: Vec<String> = records.iter().map(|r| r.shard_id.clone()).collect();
    shards.sort();
    shards.dedup();
    let forward = replay(records, &shards)?;
    shards.reverse();
    let reverse = replay(records, &shards)?;
    if forward != reverse {
        bail!(
            "the result depends on the order the shards are applied in: per-key order is \
             broken\nforward: {forward:?}\nreverse: {reverse:?}"
        );
    }
    Ok(forward)
}

fn apply(rows: &mut Applied, shard: &str, envelope: &Value) -> Result<()> {
    let source = &envelope["source"];
    let scope = source["schema"]
        .as_str()
        .or_else(|| source["db"].as_str())
        .context("no schema or db")?;
    let table = format!("{scope}.{}", source["table"].as_str().context("no table")?);
    let table_rows = rows.entry(table).or_default();
    let key = envelope["key"].to_string();
    let op = envelope["op"].as_str().context("no op")?;
    if op == "update"
        && let Some(old_key) = old_key(envelope)
        && old_key != key
    {
        table_rows.remove(&old_key);
    }
    match op {
        "insert" | "update" | "snapshot" => {
            let mut after = envelope["after"].as_object().context("no after")?.clone();
            if let Some(unchanged) = envelope["unchanged"].as_array() {
                let previous = table_rows.get(&key).map(|(_, row)| row);
                for column in unchanged.iter().filter_map(Value::as_str) {
                    let value = previous.and_then(|row| row.get(column)).cloned();
                    after.insert(column.to_owned(), value.unwrap_or(Value::Null));
                }
            }
            table_rows.insert(key, (shard.to_owned(), after));
        }
        "delete" => {
            table_rows.remove(&key);
        }
        "truncate" => table_rows.retain(|_, (written_by, _)| written_by != shard),
        other => bail!("unknown op {other}"),
    }
    Ok(())
}

/// Replays `records` per shard in every order ([`replay_every_order`]) and
/// fails unless the result holds exactly the rows of `table` in Postgres
/// (keyed by `key_columns`), naming what is missing, extra or different.
pub async fn assert_replica_matches(
    client: &tokio_postgres::Client,
    records: &[StreamRecord],
    table: &str,
    key_columns: &[&str],
) -> Result<()> {
    let replica = replay_every_order(records)?;
    let expected = postgres_rows(client, table, key_columns).await?;
    compare(table, &replica, &expected)
}

/// [`assert_replica_matches`] for a MariaDB/MySQL table `db.table`
/// (compare tables of integer and text columns, see [`mysql_rows`]).
pub async fn assert_mysql_replica_matches(
    conn: &mut mysql_async::Conn,
    records: &[StreamRecord],
    table: &str,
    key_columns: &[&str],
) -> Result<()> {
    let replica = replay_every_order(records)?;
    let expected = mysql_rows(conn, table, key_columns).await?;
    compare(table, &replica, &expected)
}

/// Fails unless `replica` holds exactly `expected` for `table`, naming
/// what is missing, extra or different.
fn compare(
    table: &str,
    replica: &Replica,
    expected: &BTreeMap<String, Map<String, Value>>,
) -> Result<()> {
    let got = replica.get(table).cloned().unwrap_or_default();
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let different: Vec<&String> = expected
        .iter()
        .filter(|(k, row)| got.get(*k).is_some_and(|g| g != *row))
        .map(|(k, _)| k)
        .collect();
    if !(missing.is_empty() && extra.is_empty() && different.is_empty()) {
        bail!(
            "{table}: the replayed stream differs from the table ({} rows vs {}): missing \
             {missing:.5?}, extra {extra:.5?}, different {different:.5?}",
            got.len(),
            expected.len()
        );
    }
    Ok(())
}

/// The rows of `table` (`db.table`) in MariaDB/MySQL as a consumer would
/// hold them: key JSON → row JSON. Integers become numbers, text strings,
/// NULL null: compare only tables of such columns.
pub async fn mysql_rows(
    conn: &mut mysql_async::Conn,
    table: &str,
    key_columns: &[&str],
) -> Result<BTreeMap<String, Map<String, Value>>> {
    use mysql_async::prelude::Queryable as _;
    let result: Vec<mysql_async::Row> = conn
        .query(format!("SELECT * FROM {table}"))
        .await
        .with_context(|| format!("reading {table}"))?;
    let mut rows = BTreeMap::new();
    for row in result {
        let columns: Vec<(String, bool)> = row
            .columns_ref()
            .iter()
            .map(|c| (c.name_str().into_owned(), c.column_type().is_numeric_type()))
            .collect();
        let mut object = Map::new();
        for ((name, numeric), value) in columns.into_iter().zip(row.unwrap()) {
            let value = match value {
                mysql_async::Value::NULL => Value::Null,
                mysql_async::Value::Int(i) => Value::from(i),
                mysql_async::Value::UInt(u) => Value::from(u),
                mysql_async::Value::Bytes(bytes) => {
                    let text = String::from_utf8(bytes).context("a non-UTF-8 value")?;
                    // The text protocol sends numbers as text too.
                    match text.parse::<i64>() {
                        Ok(number) if numeric => Value::from(number),
                        _ => Value::String(text),
                    }
                }
                other => bail!("{table}.{name}: compare integer and text columns only ({other:?})"),
            };
            object.insert(name, value);
        }
        let key: Map<String, Value> = key_columns
            .iter()
            .map(|c| ((*c).to_owned(), object[*c].clone()))
            .collect();
        rows.insert(Value::Object(key).to_string(), object);
    }
    Ok(rows)
}

/// The records of `all` (a later read of a stream) that `earlier` (a
/// read before) did not hold: what was written in between.
pub fn written_since(all: &[StreamRecord], earlier: &[StreamRecord]) -> Vec<StreamRecord> {
    let seen: std::collections::HashSet<(&str, &str)> = earlier
        .iter()
        .map(|r| (r.shard_id.as_str(), r.sequence_number.as_str()))
        .collect();
    all.iter()
        .filter(|r| !seen.contains(&(r.shard_id.as_str(), r.sequence_number.as_str())))
        .cloned()
        .collect()
}

/// The envelopes of `records` with `op` on `table` (the table's name
/// without its schema or database).
pub fn of(records: &[StreamRecord], op: &str, table: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for record in records {
        let envelope = record.json()?;
        if envelope["op"] == op && envelope["source"]["table"] == table {
            out.push(envelope);
        }
    }
    Ok(out)
}

/// Fails unless every snapshot row of `table` in `records` sorts before
/// every change of it there (a table copied on its own while others
/// stream: its rows must still sort before its later changes).
pub fn snapshot_sorts_first(records: &[StreamRecord], table: &str) -> Result<()> {
    let latest = of(records, "snapshot", table)?
        .iter()
        .filter_map(|e| e["source"]["position"].as_str().map(str::to_owned))
        .max()
        .unwrap_or_default();
    for op in ["insert", "update", "delete"] {
        for change in of(records, op, table)? {
            let position = change["source"]["position"].as_str().unwrap_or_default();
            if position <= latest.as_str() {
                bail!(
                    "{table}: a {op} at {position} sorts before the snapshot rows (up to {latest})"
                );
            }
        }
    }
    Ok(())
}

/// The distinct shards (sorted) that hold an event with `op`.
pub fn shards_with_op(records: &[StreamRecord], op: &str) -> Vec<String> {
    let mut shards: Vec<String> = records
        .iter()
        .filter(|r| r.json().is_ok_and(|e| e["op"] == op))
        .map(|r| r.shard_id.clone())
        .collect();
    shards.sort();
    shards.dedup();
    shards
}

/// The key columns' values in `before`, as a `key` object, when `before`
/// holds them all.
fn old_key(envelope: &Value) -> Option<String> {
    let key = envelope["key"].as_object()?;
    let before = envelope["before"].as_object()?;
    let old: Option<Map<String, Value>> = key
        .keys()
        .map(|column| Some((column.clone(), before.get(column)?.clone())))
        .collect();
    Some(Value::Object(old?).to_string())
}

/// The rows of `table` in Postgres as a consumer would hold them: key JSON
/// (the `key_columns`, as `key` objects are written) → row JSON
/// (`to_jsonb`; compare only tables whose column types render the same
/// way in both, such as integers and text).
pub async fn postgres_rows(
    client: &tokio_postgres::Client,
    table: &str,
    key_columns: &[&str],
) -> Result<BTreeMap<String, Map<String, Value>>> {
    let sql = format!("SELECT to_jsonb(t)::text FROM {table} t");
    let mut rows = BTreeMap::new();
    for row in client
        .query(&sql, &[])
        .await
        .with_context(|| format!("reading {table}"))?
    {
        let text: String = row.get(0);
        let Value::Object(object) = serde_json::from_str(&text)? else {
            bail!("to_jsonb gave no object: {text}");
        };
        let key: Map<String, Value> = key_columns
            .iter()
            .map(|c| ((*c).to_owned(), object[*c].clone()))
            .collect();
        rows.insert(Value::Object(key).to_string(), object);
    }
    Ok(rows)
}

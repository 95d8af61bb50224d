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
//!   removed (the truncate is written to every shard);
//! - `begin`, `end` (transaction markers): change no row.
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
    if is_marker(envelope) {
        return Ok(()); // a transaction marker changes no row
    }
    let table = table_of(envelope)?;
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

/// `{schema or db}.{table}` of an event.
fn table_of(envelope: &Value) -> Result<String> {
    let source = &envelope["source"];
    let scope = source["schema"]
        .as_str()
        .or_else(|| source["db"].as_str())
        .context("no schema or db")?;
    Ok(format!(
        "{scope}.{}",
        source["table"].as_str().context("no table")?
    ))
}

/// True for a transaction marker (`op` `begin` or `end`,
/// `sink.transaction_markers`).
pub fn is_marker(envelope: &Value) -> bool {
    matches!(envelope["op"].as_str(), Some("begin" | "end"))
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

/// What [`check_transaction_markers`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MarkedTransactions {
    /// Transactions framed by markers.
    pub transactions: usize,
    /// (transaction, shard) parts, each with its `begin` and `end`.
    pub shard_parts: usize,
    /// Transactions whose events went to more than one shard.
    pub multi_shard: usize,
    /// Transactions with events of more than one table.
    pub multi_table: usize,
}

/// Checks the transaction markers (`sink.transaction_markers = true`) of
/// `records` (as [`crate::Kinesalite::read_all`] returns them) the way a
/// worker reading one shard relies on them: on every shard, each streamed
/// event's transaction has exactly one `begin` and one `end` there (by
/// `id`, duplicates allowed), the last copy of the `begin` comes before the
/// last copy of each of its events and the last copy of the `end` after
/// them; the `end`'s `shard_event_count` is the number of distinct events
/// of the transaction on that shard; its `data_collections` and
/// `event_count` equal the transaction's distinct events per table over all
/// shards (a truncate counted once); every marker validates against
/// `schema/transaction.v1.json`.
pub fn check_transaction_markers(records: &[StreamRecord]) -> Result<MarkedTransactions> {
    use std::collections::{BTreeSet, HashMap};

    let text = std::fs::read_to_string(crate::repo_root().join("schema/transaction.v1.json"))?;
    let schema: Value = serde_json::from_str(&text)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| anyhow::anyhow!("the marker schema does not compile: {e}"))?;

    // Per (transaction, shard): the index of the last copy of its begin and
    // end, and of each event; per transaction: distinct events per table.
    #[derive(Default)]
    struct Part {
        begins: HashMap<String, usize>,
        ends: HashMap<String, (usize, Value)>,
        events: HashMap<String, usize>,
    }
    let mut parts: BTreeMap<(String, String), Part> = BTreeMap::new();
    let mut per_table: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (index, record) in records.iter().enumerate() {
        let envelope = record.json()?;
        let shard = record.shard_id.clone();
        let id = envelope["id"].as_str().context("no id")?.to_owned();
        if is_marker(&envelope) {
            let errors: Vec<String> = validator
                .iter_errors(&envelope)
                .map(|e| format!("{e} at {}", e.instance_path()))
                .collect();
            if !errors.is_empty() {
                bail!("marker {envelope} is invalid: {errors:?}");
            }
            let tx = envelope["transaction"]["id"]
                .as_str()
                .context("no transaction.id")?
                .to_owned();
            let part = parts.entry((tx, shard)).or_default();
            if envelope["op"] == "begin" {
                part.begins.insert(id, index);
            } else {
                part.ends.insert(id, (index, envelope));
            }
            continue;
        }
        if envelope["source"]["snapshot"] == true {
            continue;
        }
        let position = envelope["source"]["position"]
            .as_str()
            .context("no position")?;
        let tx = position.split(':').next().context("a position")?.to_owned();
        let table = table_of(&envelope)?;
        per_table
            .entry(tx.clone())
            .or_default()
            .entry(table)
            .or_default()
            .insert(id.clone());
        parts
            .entry((tx, shard))
            .or_default()
            .events
            .insert(id, index);
    }

    let mut found = MarkedTransactions::default();
    let mut shards_of: BTreeMap<&str, usize> = BTreeMap::new();
    for ((tx, shard), part) in &parts {
        let context = || format!("transaction {tx} on {shard}");
        if part.begins.len() != 1 || part.ends.len() != 1 {
            bail!(
                "{}: expected one begin and one end, found begins {:?} and ends {:?} \
                 around {} events",
                context(),
                part.begins.keys(),
                part.ends.keys(),
                part.events.len()
            );
        }
        let begin = *part.begins.values().next().expect("one begin");
        let (end, marker) = part.ends.values().next().expect("one end");
        if let Some((id, _)) = part
            .events
            .iter()
            .find(|(_, index)| **index < begin || **index > *end)
        {
            bail!(
                "{}: event {id} is not between the begin and the end",
                context()
            );
        }
        let transaction = &marker["transaction"];
        if transaction["shard_event_count"] != part.events.len() {
            bail!(
                "{}: the end counts {} events on the shard, the shard holds {}",
                context(),
                transaction["shard_event_count"],
                part.events.len()
            );
        }
        let tables = per_table.get(tx).cloned().unwrap_or_default();
        let expected: Vec<Value> = tables
            .iter()
            .map(|(table, ids)| serde_json::json!({"data_collection": table, "event_count": ids.len()}))
            .collect();
        let mut got: Vec<Value> = transaction["data_collections"]
            .as_array()
            .context("no data_collections")?
            .clone();
        got.sort_by_key(|c| c["data_collection"].as_str().map(str::to_owned));
        if got != expected {
            bail!(
                "{}: the end counts {got:?} per table, the stream holds {expected:?}",
                context()
            );
        }
        let total: usize = tables.values().map(BTreeSet::len).sum();
        if transaction["event_count"] != total {
            bail!(
                "{}: event_count {} but the stream holds {total}",
                context(),
                transaction["event_count"]
            );
        }
        found.shard_parts += 1;
        *shards_of.entry(tx).or_default() += 1;
        if tables.len() > 1 && shards_of[tx.as_str()] == 1 {
            found.multi_table += 1;
        }
    }
    found.transactions = shards_of.len();
    found.multi_shard = shards_of.values().filter(|n| **n > 1).count();
    Ok(found)
}

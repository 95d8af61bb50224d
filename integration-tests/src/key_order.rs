//! Per-key order of what landed in a stream, for tests whose table is
//! `items (id int PRIMARY KEY, v int)` updated in rounds (`v` = the round):
//! guarantee 3 says the last occurrence of each change of a key is in
//! commit order, whatever retries duplicated.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};

use crate::StreamRecord;

/// The table these checks expect: one row per key, `v` the round.
pub const ITEMS_TABLE: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL)";

/// Per key (`after.id`), the versions (`after.v`) in stream order (each key
/// lives in one shard, read in sequence order); a version may appear twice.
pub fn versions_per_key(records: &[StreamRecord]) -> Result<HashMap<i64, Vec<i64>>> {
    let mut per_key: HashMap<i64, Vec<i64>> = HashMap::new();
    for record in records {
        let envelope = record.json()?;
        let after = &envelope["after"];
        per_key
            .entry(after["id"].as_i64().context("a key")?)
            .or_default()
            .push(after["v"].as_i64().context("a version")?);
    }
    Ok(per_key)
}

/// Checks that every one of `keys` keys landed versions `0..rounds`, the
/// last occurrence of each in order; returns how many duplicates landed.
pub fn check_last_occurrences(
    per_key: &HashMap<i64, Vec<i64>>,
    keys: usize,
    rounds: i64,
) -> Result<usize> {
    ensure!(
        per_key.len() == keys,
        "{} keys landed, not {keys}",
        per_key.len()
    );
    let expected: Vec<i64> = (0..rounds).collect();
    let mut duplicates = 0;
    for (key, seen) in per_key {
        let last: Vec<i64> = seen
            .iter()
            .enumerate()
            .filter(|(i, v)| !seen[i + 1..].contains(v))
            .map(|(_, v)| *v)
            .collect();
        ensure!(last == expected, "key {key}: landed {seen:?}");
        duplicates += seen.len() - last.len();
    }
    Ok(duplicates)
}

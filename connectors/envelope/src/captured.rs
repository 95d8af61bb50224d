//! The tables a source captures, kept in `[state] dir` between runs.
//!
//! Beside the start-up of every source: a table that matches `source.tables`
//! but is not in the stored set was added to the config (or created) since
//! the last run, so its existing rows have never been sent; the source
//! copies that table alone before streaming on from its stored position.
//! A table is written into the set only once Kinesis holds its copy (or,
//! for a table created while the source runs, once its changes flow), so a
//! crash before that copies it again at the next start: rows may come
//! twice, none is missing.
//!
//! The file is JSON (`{"v":1,"tables":[["public","orders"],...],
//! "snapshot_end":[major,ordinal]}`),
//! written to a temporary file, synced, then renamed over the old one: a
//! reader sees the old set or the new one, never half of either.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// A table, as (schema or database, table).
pub type TableName = (String, String);

/// The stored set of captured tables of one source.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapturedTables {
    /// The tables, sorted.
    pub tables: BTreeSet<TableName>,
    /// Where the last copy's rows ended: the major of their positions and
    /// the ordinal state after its last row. A later copy at the same major
    /// (nothing streamed in between) numbers its rows after it, so two
    /// different rows never share a position, hence an id.
    pub snapshot_end: Option<(u64, u32)>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredTables {
    v: u32,
    tables: Vec<TableName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot_end: Option<(u64, u32)>,
}

impl CapturedTables {
    /// The state file of a source: `{state_dir}/{kind}-tables-{name}.json`
    /// (`name`: the Postgres slot, or the MySQL source's name).
    pub fn path(state_dir: &Path, kind: &str, name: &str) -> PathBuf {
        state_dir.join(format!("{kind}-tables-{name}.json"))
    }

    /// A set of these tables.
    pub fn new(tables: impl IntoIterator<Item = TableName>) -> Self {
        Self {
            tables: tables.into_iter().collect(),
            snapshot_end: None,
        }
    }

    /// Reads the stored set; `None` when no file exists (a first start, or
    /// a state written by a version that did not keep it).
    pub fn load(path: &Path) -> std::io::Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let stored: StoredTables = serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "unreadable captured-tables file (delete it to treat every matching table \
                     as captured): {e}"
                ),
            )
        })?;
        Ok(Some(Self {
            snapshot_end: stored.snapshot_end,
            ..Self::new(stored.tables)
        }))
    }

    /// Writes the set atomically and durably.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let stored = StoredTables {
            v: 1,
            tables: self.tables.iter().cloned().collect(),
            snapshot_end: self.snapshot_end,
        };
        let bytes = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    }

    /// True when `table` is in the set.
    pub fn contains(&self, schema: &str, table: &str) -> bool {
        // BTreeSet of tuples cannot be searched by borrowed parts; the set
        // is small and this runs only when a table first shows up.
        self.tables
            .iter()
            .any(|(s, t)| s.as_str() == schema && t.as_str() == table)
    }

    /// The ordinal state a copy at `major` starts from: after the last
    /// copy's rows when that copy was at the same major, else `start`.
    pub fn ordinal_after(&self, major: u64, start: u32) -> u32 {
        match self.snapshot_end {
            Some((last, next)) if last == major => next.max(start),
            _ => start,
        }
    }

    /// The stored tables that are still in `current` (the set a source
    /// keeps while it copies the tables new to it), with `current`'s
    /// snapshot end.
    pub fn still_current(stored: Option<Self>, current: &Self) -> Self {
        Self {
            snapshot_end: current.snapshot_end,
            ..Self::new(
                stored
                    .unwrap_or_default()
                    .tables
                    .into_iter()
                    .filter(|t| current.tables.contains(t)),
            )
        }
    }

    /// The tables of `current` that are not in the set, in order.
    pub fn missing<'a>(&self, current: &'a [TableName]) -> Vec<&'a TableName> {
        current
            .iter()
            .filter(|t| !self.tables.contains(*t))
            .collect()
    }
}

/// `schema.table`, for logs.
pub fn display(table: &TableName) -> String {
    format!("{}.{}", table.0, table.1)
}

/// `a.b, c.d`, for logs.
pub fn display_all(tables: &[TableName]) -> String {
    tables.iter().map(display).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str, t: &str) -> TableName {
        (s.to_owned(), t.to_owned())
    }

    #[test]
    fn the_set_round_trips_and_a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = CapturedTables::path(&dir.path().join("state"), "postgres", "slot");
        assert_eq!(CapturedTables::load(&path).unwrap(), None);
        let set = CapturedTables::new([name("public", "b"), name("public", "a.x")]);
        set.save(&path).unwrap();
        assert_eq!(CapturedTables::load(&path).unwrap(), Some(set.clone()));
        let ended = CapturedTables {
            snapshot_end: Some((41, 7)),
            ..set.clone()
        };
        ended.save(&path).unwrap();
        let loaded = CapturedTables::load(&path).unwrap().unwrap();
        assert_eq!(loaded, ended);
        assert_eq!(loaded.ordinal_after(41, 0), 7);
        assert_eq!(
            loaded.ordinal_after(42, 0),
            0,
            "another major starts afresh"
        );
        set.save(&path).unwrap();
        assert!(set.contains("public", "a.x"));
        assert!(!set.contains("public.a", "x"));
        let current = vec![name("public", "a.x"), name("public", "c")];
        assert_eq!(set.missing(&current), vec![&name("public", "c")]);
        std::fs::write(&path, b"not json").unwrap();
        assert!(CapturedTables::load(&path).is_err());
    }
}

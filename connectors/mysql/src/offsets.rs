//! Binlog positions and the offset store: where the MySQL source resumes.
//!
//! Last stage of the MySQL dataflow: the server does not keep a replica's
//! position, so the source writes it to `{state.dir}/{name}.mysql-offset`
//! once the [`AckTracker`](tributary_envelope::AckTracker) has released it
//! (everything up to that transaction's end is durable in Kinesis). A write
//! is atomic and durable: a temporary file is written and fsynced, renamed
//! over the old one, and the directory fsynced, so a crash leaves the old
//! offset or the new one.
//!
//! A binlog position (file, offset) maps onto the tracker's `u64`
//! watermark as `file index << 32 | offset`: the index is the numeric
//! suffix of the binlog file (`binlog.000042` → 42), the offset a 32-bit
//! v4 event position. Later commits always have larger watermarks.
//!
//! Another server's binlog (a promoted replica, or the same server after
//! `RESET MASTER`) numbers its files afresh, so a stream resumed there by
//! GTID could sort below what was already sent. The offset therefore keeps
//! `index_base`, added to every file index read from the server the offset
//! names: when a resume moves to a new binlog history, the base is raised
//! so that the new server's first file sorts just after the stored one
//! (see `docs/mysql.md`, "Resuming on another server").

/// The numeric suffix of a binlog file name (`binlog.000042` → 42).
pub fn file_index(file: &str) -> Option<u32> {
    let (_, suffix) = file.rsplit_once('.')?;
    if suffix.is_empty() || !suffix.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    suffix.parse().ok()
}

/// The watermark of a position in the binlog.
pub fn watermark(file_index: u32, pos: u32) -> u64 {
    (u64::from(file_index) << 32) | u64::from(pos)
}

/// Where to resume: the position after a fully acknowledged transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offset {
    /// The binlog file.
    pub file: String,
    /// The offset after the transaction's commit event.
    pub pos: u32,
    /// The server's GTID state at that point (MariaDB `domain-server-seq`
    /// list, MySQL executed set), when GTIDs were seen.
    pub gtid: Option<String>,
    /// `@@server_id` of the server whose binlog `file` is (None in offsets
    /// written before it was kept).
    pub server_id: Option<u32>,
    /// Added to `file`'s index in watermarks and positions (0 until a
    /// resume moved to another binlog history).
    pub index_base: u32,
}

impl Offset {
    /// The offset's watermark, when the file name has an index.
    pub fn watermark(&self) -> Option<u64> {
        self.file_index().map(|i| watermark(i, self.pos))
    }

    /// The index of `file` with `index_base` added.
    pub fn file_index(&self) -> Option<u32> {
        file_index(&self.file).map(|i| i.saturating_add(self.index_base))
    }

    /// The stored text: `file=..`, `pos=..`, then `gtid=..`, `server_id=..`
    /// and `index_base=..` lines where known.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("file={}\npos={}\n", self.file, self.pos);
        if let Some(gtid) = &self.gtid {
            out.push_str(&format!("gtid={gtid}\n"));
        }
        if let Some(id) = self.server_id {
            out.push_str(&format!("server_id={id}\n"));
        }
        if self.index_base > 0 {
            out.push_str(&format!("index_base={}\n", self.index_base));
        }
        out.into_bytes()
    }

    /// Parses [`Offset::encode`]'s text.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (mut file, mut pos, mut gtid) = (None, None, None);
        let (mut server_id, mut index_base) = (None, 0);
        for line in text.lines() {
            match line.split_once('=')? {
                ("file", v) if !v.is_empty() => file = Some(v.to_owned()),
                ("pos", v) => pos = Some(v.parse().ok()?),
                ("gtid", v) if !v.is_empty() => gtid = Some(v.to_owned()),
                ("server_id", v) => server_id = Some(v.parse().ok()?),
                ("index_base", v) => index_base = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(Self {
            file: file?,
            pos: pos?,
            gtid,
            server_id,
            index_base,
        })
    }
}

pub use tributary_envelope::state_file::FileOffsetStore;

#[cfg(test)]
mod tests {
    use std::fs;

    use tributary_envelope::OffsetStore as _;

    use super::*;

    #[test]
    fn watermarks_order_positions_across_files() {
        assert_eq!(file_index("binlog.000042"), Some(42));
        assert_eq!(file_index("mysql-bin.1000000"), Some(1_000_000));
        assert_eq!(file_index("binlog"), None);
        assert_eq!(file_index("binlog.00a"), None);
        assert!(watermark(1, u32::MAX) < watermark(2, 4));
        assert!(watermark(2, 4) < watermark(2, 5));
    }

    #[test]
    fn offsets_round_trip_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileOffsetStore::new(dir.path().join("state/shop.mysql-offset"));
        assert_eq!(store.load().unwrap(), None);
        let first = Offset {
            file: "binlog.000001".into(),
            pos: 1234,
            gtid: Some("0-1-17".into()),
            server_id: Some(1),
            index_base: 0,
        };
        store.save(&first.encode()).unwrap();
        let second = Offset {
            file: "binlog.000002".into(),
            pos: 4,
            gtid: None,
            server_id: Some(2),
            index_base: 7,
        };
        store.save(&second.encode()).unwrap();
        let loaded = Offset::decode(&store.load().unwrap().unwrap()).unwrap();
        assert_eq!(loaded, second);
        assert_eq!(
            Offset::decode(&first.encode()).unwrap().watermark(),
            Some(watermark(1, 1234))
        );
        assert_eq!(loaded.watermark(), Some(watermark(9, 4)), "the base counts");
        assert_eq!(
            Offset::decode(b"file=binlog.000003\npos=4\ngtid=0-1-2\n")
                .unwrap()
                .server_id,
            None,
            "offsets written before server_id was kept still load"
        );
        assert_eq!(Offset::decode(b"file=x\npos=notanumber\n"), None);
        assert_eq!(Offset::decode(b"pos=4\n"), None, "a file is required");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("state")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file remains");
    }
}

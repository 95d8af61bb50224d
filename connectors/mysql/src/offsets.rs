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
    /// list), when GTIDs were seen.
    pub gtid: Option<String>,
}

impl Offset {
    /// The offset's watermark, when the file name has an index.
    pub fn watermark(&self) -> Option<u64> {
        file_index(&self.file).map(|i| watermark(i, self.pos))
    }

    /// The stored text: `file=..`, `pos=..`, `gtid=..` lines.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("file={}\npos={}\n", self.file, self.pos);
        if let Some(gtid) = &self.gtid {
            out.push_str(&format!("gtid={gtid}\n"));
        }
        out.into_bytes()
    }

    /// Parses [`Offset::encode`]'s text.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (mut file, mut pos, mut gtid) = (None, None, None);
        for line in text.lines() {
            match line.split_once('=')? {
                ("file", v) if !v.is_empty() => file = Some(v.to_owned()),
                ("pos", v) => pos = Some(v.parse().ok()?),
                ("gtid", v) if !v.is_empty() => gtid = Some(v.to_owned()),
                _ => return None,
            }
        }
        Some(Self {
            file: file?,
            pos: pos?,
            gtid,
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
        };
        store.save(&first.encode()).unwrap();
        let second = Offset {
            file: "binlog.000002".into(),
            pos: 4,
            gtid: None,
        };
        store.save(&second.encode()).unwrap();
        let loaded = Offset::decode(&store.load().unwrap().unwrap()).unwrap();
        assert_eq!(loaded, second);
        assert_eq!(
            Offset::decode(&first.encode()).unwrap().watermark(),
            Some(watermark(1, 1234))
        );
        assert_eq!(Offset::decode(b"file=x\npos=notanumber\n"), None);
        assert_eq!(Offset::decode(b"pos=4\n"), None, "a file is required");
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("state")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file remains");
    }
}

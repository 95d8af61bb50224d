//! What a source hands to a sink: one encoded envelope with its routing.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use md5::{Digest, Md5};

use crate::transaction::{Marker, TxRef};

/// One envelope on its way to a sink.
#[derive(Clone, Debug)]
pub struct Record {
    /// The record's sequence number in the [`crate::AckTracker`]: dense and
    /// increasing in source order.
    pub seq: u64,
    /// The destination stream.
    pub stream: Arc<str>,
    /// The partition key (`{schema or db}.{table}:{key}`, at most 256 chars).
    pub partition_key: String,
    /// The envelope, UTF-8 JSON.
    pub data: Vec<u8>,
    /// Write one copy of this record to every shard of its stream (set by a
    /// source for a `truncate`: it must reach every shard that holds the
    /// table's keys before any later change of that table).
    pub fan_out: bool,
    /// The hash key that places this record on a shard, overriding the MD5
    /// of the partition key (set by a sink on the copies of a fanned-out
    /// record).
    pub explicit_hash_key: Option<u128>,
    /// The copies of a fanned-out record still undelivered (set by a sink):
    /// the record is done only when the last copy is.
    pub copies: Option<Arc<Copies>>,
    /// The transaction and table of a change streamed from the log (set by
    /// a source; none for snapshot rows): what transaction markers count.
    pub tx: Option<TxRef>,
    /// Set by a sink on the transaction markers it writes: how the marker
    /// is reported done (it holds no budget and no sequence number).
    pub marker: Option<Marker>,
}

impl Record {
    /// A record for `stream` (sequence number 0: the source numbers it
    /// when it hands it over).
    pub fn new(stream: Arc<str>, partition_key: String, data: Vec<u8>) -> Self {
        Self {
            seq: 0,
            stream,
            partition_key,
            data,
            fan_out: false,
            explicit_hash_key: None,
            copies: None,
            tx: None,
            marker: None,
        }
    }

    /// One copy of a fanned-out record, placed by `explicit_hash_key` and
    /// counted in `copies`.
    pub fn copy_for(&self, explicit_hash_key: u128, copies: &Arc<Copies>) -> Self {
        Self {
            seq: self.seq,
            stream: self.stream.clone(),
            partition_key: self.partition_key.clone(),
            data: self.data.clone(),
            fan_out: false,
            explicit_hash_key: Some(explicit_hash_key),
            copies: Some(copies.clone()),
            tx: self.tx.clone(),
            marker: None,
        }
    }

    /// The bytes this record holds against the in-flight [`crate::Budget`].
    pub fn weight(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// The count of a fanned-out record's copies not yet delivered.
#[derive(Debug)]
pub struct Copies(AtomicUsize);

impl Copies {
    /// `count` copies, none delivered.
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(Self(AtomicUsize::new(count)))
    }

    /// One copy was delivered; true when it was the last one.
    pub fn finish_one(&self) -> bool {
        self.0.fetch_sub(1, Ordering::AcqRel) == 1
    }
}

/// Kinesis' limit on a partition key, in Unicode characters.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Builds the partition key `{schema or db}.{table}:{v1},{v2},...`, where each
/// `v` is the JSON text of a key column in primary-key order. A table without
/// a key uses `{schema or db}.{table}` alone. A key longer than 256 characters
/// becomes `{schema or db}.{table}:md5:{hex}` (hex of the MD5 of the full key),
/// or just the hex when even that does not fit.
#[derive(Debug)]
pub struct PartitionKey {
    buf: String,
    prefix_len: usize,
    values: usize,
}

impl PartitionKey {
    /// Starts a key for the table `qualified` (`{schema or db}.{table}`).
    pub fn new(qualified: &str) -> Self {
        let mut buf = String::with_capacity(qualified.len() + 24);
        buf.push_str(qualified);
        Self {
            prefix_len: buf.len(),
            buf,
            values: 0,
        }
    }

    /// Appends one key column's JSON text.
    pub fn push(&mut self, json_value: &[u8]) {
        self.buf.push(if self.values == 0 { ':' } else { ',' });
        match std::str::from_utf8(json_value) {
            Ok(text) => self.buf.push_str(text),
            Err(_) => self.buf.push_str(&String::from_utf8_lossy(json_value)),
        }
        self.values += 1;
    }

    /// The finished key.
    pub fn finish(self) -> String {
        if self.buf.len() <= MAX_PARTITION_KEY_CHARS
            || self.buf.chars().count() <= MAX_PARTITION_KEY_CHARS
        {
            return self.buf;
        }
        let digest = Md5::digest(self.buf.as_bytes());
        let mut hex = String::with_capacity(32);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        let prefix = &self.buf[..self.prefix_len];
        if prefix.chars().count() + 5 + hex.len() <= MAX_PARTITION_KEY_CHARS {
            format!("{prefix}:md5:{hex}")
        } else {
            hex
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract() {
        let mut key = PartitionKey::new("public.orders");
        key.push(b"42");
        assert_eq!(key.finish(), "public.orders:42");

        let mut key = PartitionKey::new("shop.t");
        key.push(b"\"a,b\"");
        key.push(b"7");
        assert_eq!(key.finish(), "shop.t:\"a,b\",7");

        assert_eq!(PartitionKey::new("public.nokey").finish(), "public.nokey");
    }

    #[test]
    fn long_keys_are_hashed_stably() {
        let long = format!("\"{}\"", "x".repeat(300));
        let mut a = PartitionKey::new("public.t");
        a.push(long.as_bytes());
        let a = a.finish();
        let mut b = PartitionKey::new("public.t");
        b.push(long.as_bytes());
        assert_eq!(a, b.finish());
        assert!(a.starts_with("public.t:md5:"), "{a}");
        assert_eq!(a.len(), "public.t:md5:".len() + 32);

        // 256 multi-byte characters still fit: the limit counts characters.
        let mut c = PartitionKey::new("p.t");
        c.push("é".repeat(250).as_bytes());
        let c = c.finish();
        assert_eq!(c.chars().count(), 254);
    }
}

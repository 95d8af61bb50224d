//! KPL-compatible record aggregation (`sink.aggregation = true`): many
//! envelopes of one lane packed into one Kinesis record, and the reverse
//! for `tail`.
//!
//! The format is the Kinesis Producer Library's, which the KCL and the
//! `aws-kinesis-agg` libraries de-aggregate: the magic bytes `F3 89 9A C2`,
//! a protobuf `AggregatedRecord`, and the MD5 of that protobuf.
//!
//! ```protobuf
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;  // never written
//! }
//! ```
//!
//! It is small enough to write by hand (no protobuf crate): the writer
//! appends table entries and records as they come (protobuf allows the
//! fields of a message in any order), so it always knows the exact size
//! and can stop before the stream's maximum record size. Each sub-record
//! keeps its own partition key (and explicit hash key), so a consumer sees
//! exactly what an unaggregated writer would have sent; a lane only packs
//! records of its own shard, and the aggregate is placed on that shard by
//! the first sub-record's key, so every sub-record lands on the shard its
//! own key maps to.

use std::collections::HashMap;

use md5::{Digest, Md5};
use thiserror::Error;

/// The first bytes of an aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
/// The MD5 trailer's length.
const DIGEST_LEN: usize = 16;

/// One aggregated record being built.
#[derive(Debug, Default)]
pub(crate) struct Aggregate {
    /// The protobuf `AggregatedRecord` so far.
    body: Vec<u8>,
    keys: HashMap<String, u64>,
    hash_keys: HashMap<String, u64>,
    /// The partition key of the Kinesis record: the first sub-record's.
    partition_key: Option<String>,
    /// Its explicit hash key, when the first sub-record has one.
    explicit_hash_key: Option<String>,
    records: usize,
}

impl Aggregate {
    /// Sub-records so far.
    pub(crate) fn len(&self) -> usize {
        self.records
    }

    /// Data plus partition key of the Kinesis record as it stands.
    pub(crate) fn weight(&self) -> usize {
        MAGIC.len()
            + self.body.len()
            + DIGEST_LEN
            + self.partition_key.as_ref().map_or(0, String::len)
    }

    /// What [`Aggregate::weight`] would be with one more sub-record.
    pub(crate) fn weight_with(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) -> usize {
        let mut added = 0;
        let key_index = self.keys.get(partition_key).copied().unwrap_or_else(|| {
            added += field_len(partition_key.len());
            self.keys.len() as u64
        });
        let mut record = field_len_varint(key_index) + field_len(data.len());
        if let Some(hash) = explicit_hash_key {
            let hash_index = self.hash_keys.get(hash).copied().unwrap_or_else(|| {
                added += field_len(hash.len());
                self.hash_keys.len() as u64
            });
            record += field_len_varint(hash_index);
        }
        added += field_len(record);
        let key_len = if self.partition_key.is_none() {
            partition_key.len()
        } else {
            0
        };
        self.weight() + added + key_len
    }

    /// Adds a sub-record.
    pub(crate) fn push(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: &[u8],
    ) {
        if self.partition_key.is_none() {
            self.partition_key = Some(partition_key.to_owned());
            self.explicit_hash_key = explicit_hash_key.map(str::to_owned);
        }
        let key_index = table_index(&mut self.body, &mut self.keys, 1, partition_key);
        let hash_index =
            explicit_hash_key.map(|h| table_index(&mut self.body, &mut self.hash_keys, 2, h));
        let mut record = Vec::with_capacity(data.len() + 16);
        put_key(&mut record, 1, 0);
        put_varint(&mut record, key_index);
        if let Some(index) = hash_index {
            put_key(&mut record, 2, 0);
            put_varint(&mut record, index);
        }
        put_bytes(&mut record, 3, data);
        put_bytes(&mut self.body, 3, &record);
        self.records += 1;
    }

    /// The Kinesis record: (partition key, explicit hash key, data).
    pub(crate) fn finish(self) -> (String, Option<String>, Vec<u8>) {
        let mut data = Vec::with_capacity(MAGIC.len() + self.body.len() + DIGEST_LEN);
        data.extend_from_slice(&MAGIC);
        data.extend_from_slice(&self.body);
        data.extend_from_slice(&Md5::digest(&self.body));
        (
            self.partition_key.unwrap_or_default(),
            self.explicit_hash_key,
            data,
        )
    }
}

/// The index of `value` in a string table (field `field`), appending it
/// to the table on first use.
fn table_index(
    body: &mut Vec<u8>,
    table: &mut HashMap<String, u64>,
    field: u32,
    value: &str,
) -> u64 {
    if let Some(&index) = table.get(value) {
        return index;
    }
    let index = table.len() as u64;
    put_bytes(body, field, value.as_bytes());
    table.insert(value.to_owned(), index);
    index
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire_type));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a length-delimited field (fields 1 to 15) of `len` bytes.
fn field_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of a varint field (fields 1 to 15).
fn field_len_varint(value: u64) -> usize {
    1 + varint_len(value)
}

/// One record out of an aggregated record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubRecord {
    /// Its partition key.
    pub partition_key: String,
    /// Its explicit hash key, if it had one.
    pub explicit_hash_key: Option<String>,
    /// Its data.
    pub data: Vec<u8>,
}

/// A record that starts with the magic bytes and carries a valid MD5 but
/// whose protobuf cannot be read.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("aggregated record is malformed: {0}")]
pub struct AggregationError(&'static str);

/// The sub-records of `data` if it is an aggregated record, `None` if it is
/// a plain one (no magic bytes, or an MD5 that does not match: the KCL
/// treats both as plain records).
pub fn deaggregate(data: &[u8]) -> Option<Result<Vec<SubRecord>, AggregationError>> {
    let rest = data.strip_prefix(&MAGIC)?;
    let body_len = rest.len().checked_sub(DIGEST_LEN)?;
    let (body, digest) = rest.split_at(body_len);
    if Md5::digest(body).as_slice() != digest {
        return None;
    }
    Some(parse(body))
}

fn parse(body: &[u8]) -> Result<Vec<SubRecord>, AggregationError> {
    let mut keys: Vec<String> = Vec::new();
    let mut hash_keys: Vec<String> = Vec::new();
    // (key index, hash key index, data), resolved once the tables are read.
    let mut raw: Vec<(u64, Option<u64>, &[u8])> = Vec::new();
    let mut reader = Reader(body);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, 2) => keys.push(reader.string()?),
            (2, 2) => hash_keys.push(reader.string()?),
            (3, 2) => raw.push(parse_record(reader.bytes()?)?),
            _ => reader.skip(wire)?,
        }
    }
    raw.into_iter()
        .map(|(key, hash, data)| {
            let lookup = |table: &[String], index: u64| {
                usize::try_from(index)
                    .ok()
                    .and_then(|i| table.get(i))
                    .cloned()
                    .ok_or(AggregationError("a table index is out of range"))
            };
            Ok(SubRecord {
                partition_key: lookup(&keys, key)?,
                explicit_hash_key: hash.map(|h| lookup(&hash_keys, h)).transpose()?,
                data: data.to_vec(),
            })
        })
        .collect()
}

fn parse_record(bytes: &[u8]) -> Result<(u64, Option<u64>, &[u8]), AggregationError> {
    let mut reader = Reader(bytes);
    let (mut key, mut hash, mut data) = (None, None, None);
    while let Some((field, wire)) = reader.key()? {
        match (field, wire) {
            (1, 0) => key = Some(reader.varint()?),
            (2, 0) => hash = Some(reader.varint()?),
            (3, 2) => data = Some(reader.bytes()?),
            _ => reader.skip(wire)?,
        }
    }
    Ok((
        key.ok_or(AggregationError("a record has no partition key index"))?,
        hash,
        data.ok_or(AggregationError("a record has no data"))?,
    ))
}

/// A protobuf reader over untrusted bytes: every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, AggregationError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .0
                .split_first()
                .ok_or(AggregationError("a varint is cut off"))?;
            self.0 = rest;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(AggregationError("a varint is too long"))
    }

    /// The next field's (number, wire type), or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, AggregationError> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, (key & 7) as u8)))
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], AggregationError> {
        let len = usize::try_from(len).map_err(|_| AggregationError("a length is too large"))?;
        if len > self.0.len() {
            return Err(AggregationError("a field runs past the end"));
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    fn bytes(&mut self) -> Result<&'a [u8], AggregationError> {
        let len = self.varint()?;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, AggregationError> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| AggregationError("a key is not UTF-8"))
    }

    fn skip(&mut self, wire: u8) -> Result<(), AggregationError> {
        match wire {
            0 => self.varint().map(drop),
            1 => self.take(8).map(drop),
            2 => self.bytes().map(drop),
            5 => self.take(4).map(drop),
            _ => Err(AggregationError("an unknown wire type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_records_round_trip_with_shared_tables_and_exact_sizes() {
        let mut aggregate = Aggregate::default();
        let inputs: [(&str, Option<&str>, &[u8]); 4] = [
            ("public.t:1", None, b"{\"a\":1}"),
            ("public.t:2", None, &[0xff, 0x00]),
            ("public.t:1", None, b""),
            ("public.t:1", Some("12345"), &[7; 300]),
        ];
        for (key, hash, data) in inputs {
            let expected = aggregate.weight_with(key, hash, data);
            aggregate.push(key, hash, data);
            assert_eq!(aggregate.weight(), expected, "{key}");
        }
        assert_eq!(aggregate.len(), 4);
        let weight = aggregate.weight();
        let (key, hash, data) = aggregate.finish();
        assert_eq!((key.as_str(), hash), ("public.t:1", None));
        assert_eq!(data.len() + key.len(), weight);
        assert_eq!(&data[..4], &MAGIC);
        let records = deaggregate(&data).unwrap().unwrap();
        let back: Vec<(&str, Option<&str>, &[u8])> = records
            .iter()
            .map(|r| {
                (
                    r.partition_key.as_str(),
                    r.explicit_hash_key.as_deref(),
                    r.data.as_slice(),
                )
            })
            .collect();
        assert_eq!(back, inputs);
    }

    #[test]
    fn plain_and_damaged_records_are_not_aggregates() {
        assert_eq!(deaggregate(b"{\"v\":1}"), None);
        let mut aggregate = Aggregate::default();
        aggregate.push("k", None, b"x");
        let (_, _, mut data) = aggregate.finish();
        let last = data.len() - 1;
        data[last] ^= 1;
        assert_eq!(deaggregate(&data), None, "a wrong digest: a plain record");
        // A valid digest over bytes that are not an AggregatedRecord.
        for body in [
            &[0x1A, 0x05, 0x08][..],
            &[0x1A, 0x02, 0x08, 0x03],
            &[0xFF; 11],
        ] {
            let mut data = MAGIC.to_vec();
            data.extend_from_slice(body);
            data.extend_from_slice(&Md5::digest(body));
            assert!(matches!(deaggregate(&data), Some(Err(_))), "{body:?}");
        }
    }

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
            assert_eq!(Reader(&out).varint().unwrap(), value);
        }
    }
}

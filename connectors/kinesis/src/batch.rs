//! Cutting a lane's next PutRecords call off the front of its queue: one
//! request entry per record, or, with aggregation, records packed into KPL
//! aggregated records (`aggregate.rs`), each within the stream's maximum
//! record size.
//!
//! A call is always a prefix of the queue, in order, so the lane's retry
//! rule (the batch being retried is the oldest thing not yet delivered)
//! holds with aggregation too; an aggregated entry that fails fails for all
//! its records, and each answer entry is spread back over the records it
//! carried before the lane sorts it.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, PutRecordsResultEntry};
use tributary_envelope::Record;

use crate::aggregate::Aggregate;

/// What bounds one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Request entries per call (500, or less under the quota).
    pub(crate) entries: usize,
    /// Bytes per call (5 MiB, or less under the quota); a first entry
    /// larger than this still goes alone.
    pub(crate) bytes: usize,
    /// The stream's maximum record size (data + partition key).
    pub(crate) record_bytes: usize,
}

/// The next call.
#[derive(Debug)]
pub(crate) struct Batch {
    /// How many records from the front of the queue it carries.
    pub(crate) records: usize,
    /// How many records each request entry carries, in order.
    pub(crate) groups: Vec<usize>,
    /// The request entries.
    pub(crate) entries: Vec<PutRecordsRequestEntry>,
    /// Their data and partition keys, in bytes.
    pub(crate) bytes: usize,
}

impl Batch {
    fn new() -> Self {
        Self {
            records: 0,
            groups: Vec::new(),
            entries: Vec::new(),
            bytes: 0,
        }
    }

    fn add(&mut self, records: usize, entry: PutRecordsRequestEntry, bytes: usize) {
        self.records += records;
        self.groups.push(records);
        self.entries.push(entry);
        self.bytes += bytes;
    }

    /// True when one more entry of `bytes` would break `limits`.
    fn full_for(&self, bytes: usize, limits: Limits) -> bool {
        self.entries.len() >= limits.entries
            || (!self.entries.is_empty() && self.bytes + bytes > limits.bytes)
    }

    /// How many request entries the call carried.
    pub(crate) fn entries_sent(&self) -> usize {
        self.groups.len()
    }

    /// The answer's entries spread over the records: each record gets the
    /// result of the entry that carried it. `None` when the answer does not
    /// have one result per entry.
    pub(crate) fn spread(
        &self,
        results: &[PutRecordsResultEntry],
    ) -> Option<Vec<PutRecordsResultEntry>> {
        if results.len() != self.groups.len() {
            return None;
        }
        let mut spread = Vec::with_capacity(self.records);
        for (result, &records) in results.iter().zip(&self.groups) {
            spread.extend(std::iter::repeat_n(result, records).cloned());
        }
        Some(spread)
    }
}

/// One entry per record, from the front of `queue`.
pub(crate) fn plain<'r>(queue: impl Iterator<Item = &'r Record>, limits: Limits) -> Batch {
    let mut batch = Batch::new();
    for record in queue {
        let weight = record.weight();
        if batch.full_for(weight, limits) {
            break;
        }
        batch.add(1, entry(record), weight);
    }
    batch
}

/// Records from the front of `queue` packed into aggregated records; a
/// record too large to be aggregated even alone goes as a plain entry.
pub(crate) fn aggregated<'r>(queue: impl Iterator<Item = &'r Record>, limits: Limits) -> Batch {
    let mut batch = Batch::new();
    let mut current = Aggregate::default();
    for record in queue {
        let hash = record.explicit_hash_key.map(|h| h.to_string());
        let (key, data) = (record.partition_key.as_str(), record.data.as_slice());
        let weight = current.weight_with(key, hash.as_deref(), data);
        if weight <= limits.record_bytes && !batch.full_for(weight, limits) {
            current.push(key, hash.as_deref(), data);
            continue;
        }
        // It does not fit in the current aggregate: close that one.
        if current.len() > 0 {
            close(&mut batch, std::mem::take(&mut current));
        }
        let alone = current.weight_with(key, hash.as_deref(), data);
        if alone <= limits.record_bytes {
            if batch.full_for(alone, limits) {
                break;
            }
            current.push(key, hash.as_deref(), data);
        } else {
            if batch.full_for(record.weight(), limits) {
                break;
            }
            batch.add(1, entry(record), record.weight());
        }
    }
    if current.len() > 0 {
        close(&mut batch, current);
    }
    batch
}

fn close(batch: &mut Batch, aggregate: Aggregate) {
    let records = aggregate.len();
    let weight = aggregate.weight();
    let (partition_key, explicit_hash_key, data) = aggregate.finish();
    let entry = PutRecordsRequestEntry::builder()
        .data(Blob::new(data))
        .partition_key(partition_key)
        .set_explicit_hash_key(explicit_hash_key)
        .build()
        .expect("data and partition key are set");
    batch.add(records, entry, weight);
}

/// The request entry for a record: one copy of the data per attempt (the
/// SDK's `Blob` owns its bytes).
pub(crate) fn entry(record: &Record) -> PutRecordsRequestEntry {
    PutRecordsRequestEntry::builder()
        .data(Blob::new(record.data.clone()))
        .partition_key(record.partition_key.clone())
        .set_explicit_hash_key(record.explicit_hash_key.map(|hash| hash.to_string()))
        .build()
        .expect("data and partition key are set")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::deaggregate;

    fn record(key: &str, len: usize) -> Record {
        Record::new("s".into(), key.to_owned(), vec![b'x'; len])
    }

    const LIMITS: Limits = Limits {
        entries: 500,
        bytes: 5 * 1024 * 1024,
        record_bytes: 1024,
    };

    #[test]
    fn aggregates_stay_within_the_record_size_and_keep_the_order() {
        let key_of = |e: &PutRecordsRequestEntry| e.partition_key().unwrap_or_default().to_owned();
        let records: Vec<Record> = (0..100)
            .map(|i| record(&format!("public.t:{}", i % 7), 90))
            .chain([record("public.t:big", 2_000), record("public.t:last", 10)])
            .collect();
        let batch = aggregated(records.iter(), LIMITS);
        assert_eq!(batch.records, 102);
        assert_eq!(batch.groups.iter().sum::<usize>(), 102);
        let mut back = Vec::new();
        for (entry, &records) in batch.entries.iter().zip(&batch.groups) {
            let weight = entry.data().as_ref().len() + key_of(entry).len();
            match deaggregate(entry.data().as_ref()) {
                Some(subs) => {
                    let subs = subs.unwrap();
                    assert!(weight <= LIMITS.record_bytes, "{weight}");
                    assert_eq!(subs.len(), records);
                    assert_eq!(key_of(entry), subs[0].partition_key);
                    back.extend(subs.into_iter().map(|s| (s.partition_key, s.data.len())));
                }
                None => {
                    // Only the record too large to aggregate goes plain.
                    assert_eq!(key_of(entry), "public.t:big");
                    back.push((key_of(entry), entry.data().as_ref().len()));
                }
            }
        }
        let sent: Vec<(String, usize)> = records
            .iter()
            .map(|r| (r.partition_key.clone(), r.data.len()))
            .collect();
        assert_eq!(back, sent);
        // 100 records of ~103 bytes in 1 KiB aggregates: about 9 per record.
        assert!(batch.entries.len() <= 14, "{}", batch.entries.len());
    }

    #[test]
    fn the_entry_and_byte_limits_cut_the_call() {
        let records: Vec<Record> = (0..100).map(|i| record(&format!("k{i}"), 90)).collect();
        let few = Limits {
            entries: 3,
            ..LIMITS
        };
        let batch = aggregated(records.iter(), few);
        assert_eq!(batch.entries.len(), 3);
        assert!(batch.records < 100);
        let small = Limits {
            bytes: 2_000,
            ..LIMITS
        };
        let batch = aggregated(records.iter(), small);
        assert!(batch.bytes <= 2_000, "{}", batch.bytes);
        let batch = plain(records.iter(), small);
        assert!(batch.bytes <= 2_000 && batch.records == batch.entries.len());
    }

    #[test]
    fn an_answer_is_spread_over_the_records_of_each_entry() {
        let records: Vec<Record> = (0..30).map(|i| record(&format!("k{i}"), 200)).collect();
        let batch = aggregated(records.iter(), LIMITS);
        let results: Vec<PutRecordsResultEntry> = (0..batch.entries.len())
            .map(|i| {
                PutRecordsResultEntry::builder()
                    .sequence_number(i.to_string())
                    .build()
            })
            .collect();
        let spread = batch.spread(&results).unwrap();
        assert_eq!(spread.len(), 30);
        let mut expected = Vec::new();
        for (i, &n) in batch.groups.iter().enumerate() {
            expected.extend(std::iter::repeat_n(i.to_string(), n));
        }
        let got: Vec<String> = spread
            .iter()
            .map(|r| r.sequence_number().unwrap().to_owned())
            .collect();
        assert_eq!(got, expected);
        assert!(batch.spread(&results[1..]).is_none());
    }
}

//! Where a partition key goes: the stream's open shards and their hash key
//! ranges, read once per stream (DescribeStreamSummary + ListShards).
//!
//! Kinesis maps a record to a shard by the MD5 of its partition key, read
//! as a big-endian 128-bit number, against the shards' hash key ranges. The
//! sink uses the same mapping to pick the record's lane, so every record of
//! a key goes through one ordered lane. After a reshard the lane of a key
//! stays the same (the mapping is only re-read on restart): order is still
//! kept, only the lane's quota no longer matches one shard exactly.

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError;
use aws_sdk_kinesis::operation::list_shards::ListShardsError;
use aws_sdk_kinesis::types::{Shard, StreamStatus};
use md5::{Digest, Md5};

use crate::error::KinesisError;
use crate::retry::{Failure, classify};

/// A stream's maximum record size (data + partition key) when Kinesis does
/// not say: 1 MiB.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1 << 20;

/// The 128-bit hash Kinesis routes `partition_key` by: its MD5, big-endian.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// One open shard and the hash keys it owns (both ends inclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardRange {
    /// The shard's id, e.g. `shardId-000000000003`.
    pub shard_id: String,
    /// The first hash key of the shard.
    pub start: u128,
    /// The last hash key of the shard.
    pub end: u128,
}

/// The open shards of a stream, sorted by hash key; a lane is an index into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    ranges: Vec<ShardRange>,
}

impl ShardMap {
    /// A map of `ranges` (any order). `None` when there is none.
    pub fn new(mut ranges: Vec<ShardRange>) -> Option<Self> {
        if ranges.is_empty() {
            return None;
        }
        ranges.sort_by_key(|r| r.start);
        Some(Self { ranges })
    }

    /// The shards, sorted by their first hash key.
    pub fn shards(&self) -> &[ShardRange] {
        &self.ranges
    }

    /// The index of the shard that owns `partition_key`.
    pub fn lane_of(&self, partition_key: &str) -> usize {
        self.lane_of_hash(hash_key(partition_key))
    }

    /// The index of the shard whose range holds `hash`. Open shards cover
    /// the whole hash space; should a gap ever show up, the shard starting
    /// closest below `hash` takes it (any fixed choice keeps per-key order).
    pub fn lane_of_hash(&self, hash: u128) -> usize {
        self.ranges
            .partition_point(|r| r.start <= hash)
            .saturating_sub(1)
    }
}

/// What the sink needs to know about a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    /// The stream's name.
    pub name: String,
    /// The largest record (data + partition key, in bytes) the stream takes.
    pub max_record_bytes: usize,
    /// The open shards.
    pub shards: ShardMap,
}

/// Reads a stream's maximum record size and open shards: one
/// DescribeStreamSummary and as many ListShards pages as there are (the
/// SDK retries each call per its standard policy). A missing stream is
/// [`KinesisError::StreamNotFound`].
pub async fn describe_stream(client: &Client, stream: &str) -> Result<StreamInfo, KinesisError> {
    describe_stream_classified(client, stream)
        .await
        .map_err(|(_, err)| err)
}

/// [`describe_stream`] that also says whether a retry could help.
pub(crate) async fn describe_stream_classified(
    client: &Client,
    stream: &str,
) -> Result<StreamInfo, (Failure, KinesisError)> {
    let summary = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|err| describe_error(stream, err))?;
    let summary = summary.stream_description_summary();
    match summary.map(|s| s.stream_status()) {
        Some(StreamStatus::Creating) => {
            return Err((
                Failure::Transient,
                KinesisError::Stream {
                    stream: stream.to_owned(),
                    message: "the stream is still being created".to_owned(),
                },
            ));
        }
        Some(StreamStatus::Deleting) => {
            return Err((
                Failure::Permanent,
                KinesisError::StreamNotFound {
                    stream: stream.to_owned(),
                    source: Some("the stream is being deleted".into()),
                },
            ));
        }
        _ => {}
    }
    let max_record_bytes = summary
        .and_then(|s| s.max_record_size_in_kib())
        .and_then(|kib| usize::try_from(kib).ok())
        .filter(|&kib| kib > 0)
        .map_or(DEFAULT_MAX_RECORD_BYTES, |kib| kib * 1024);
    let shards = list_shards(client, stream)
        .await
        .map_err(|err| list_error(stream, err))?;
    let mut ranges = Vec::with_capacity(shards.len());
    for shard in shards.iter().filter(|s| is_open(s)) {
        ranges.push(shard_range(stream, shard).map_err(|e| (Failure::Permanent, e))?);
    }
    let shards = ShardMap::new(ranges).ok_or_else(|| {
        (
            Failure::Transient,
            KinesisError::Stream {
                stream: stream.to_owned(),
                message: "the stream has no open shard".to_owned(),
            },
        )
    })?;
    Ok(StreamInfo {
        name: stream.to_owned(),
        max_record_bytes,
        shards,
    })
}

/// Every shard of the stream Kinesis still lists (open and closed), all pages.
pub(crate) async fn list_shards(
    client: &Client,
    stream: &str,
) -> Result<Vec<Shard>, SdkError<ListShardsError>> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        // A follow-up page is asked for by its token alone: Kinesis refuses
        // a stream name next to a token.
        let request = match next_token.take() {
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let page = request.send().await?;
        shards.extend_from_slice(page.shards());
        match page.next_token() {
            Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
            _ => return Ok(shards),
        }
    }
}

/// A shard is open while its sequence number range has no end.
pub(crate) fn is_open(shard: &Shard) -> bool {
    shard
        .sequence_number_range()
        .and_then(|r| r.ending_sequence_number())
        .is_none()
}

fn shard_range(stream: &str, shard: &Shard) -> Result<ShardRange, KinesisError> {
    let bad = |what: &str| KinesisError::Stream {
        stream: stream.to_owned(),
        message: format!("shard {} has {what}", shard.shard_id()),
    };
    let range = shard
        .hash_key_range()
        .ok_or_else(|| bad("no hash key range"))?;
    let start = range
        .starting_hash_key()
        .parse::<u128>()
        .map_err(|_| bad("a starting hash key that is not a 128-bit number"))?;
    let end = range
        .ending_hash_key()
        .parse::<u128>()
        .map_err(|_| bad("an ending hash key that is not a 128-bit number"))?;
    Ok(ShardRange {
        shard_id: shard.shard_id().to_owned(),
        start,
        end,
    })
}

fn describe_error(
    stream: &str,
    err: SdkError<DescribeStreamSummaryError>,
) -> (Failure, KinesisError) {
    if matches!(
        err.as_service_error(),
        Some(DescribeStreamSummaryError::ResourceNotFoundException(_))
    ) {
        return (
            Failure::Permanent,
            KinesisError::StreamNotFound {
                stream: stream.to_owned(),
                source: Some(err.into()),
            },
        );
    }
    let failure = classify(&err, |e| match e {
        DescribeStreamSummaryError::LimitExceededException(_) => Some(Failure::Throttled),
        DescribeStreamSummaryError::AccessDeniedException(_)
        | DescribeStreamSummaryError::InvalidArgumentException(_) => Some(Failure::Permanent),
        _ => None,
    });
    (
        failure,
        call_error(failure, "DescribeStreamSummary", stream, err.into()),
    )
}

fn list_error(stream: &str, err: SdkError<ListShardsError>) -> (Failure, KinesisError) {
    if matches!(
        err.as_service_error(),
        Some(ListShardsError::ResourceNotFoundException(_))
    ) {
        return (
            Failure::Permanent,
            KinesisError::StreamNotFound {
                stream: stream.to_owned(),
                source: Some(err.into()),
            },
        );
    }
    let failure = classify(&err, |e| match e {
        ListShardsError::LimitExceededException(_) => Some(Failure::Throttled),
        ListShardsError::ResourceInUseException(_)
        | ListShardsError::ExpiredNextTokenException(_) => Some(Failure::Transient),
        ListShardsError::AccessDeniedException(_)
        | ListShardsError::InvalidArgumentException(_) => Some(Failure::Permanent),
        _ => None,
    });
    (
        failure,
        call_error(failure, "ListShards", stream, err.into()),
    )
}

/// The error for a failed call, by its class.
pub(crate) fn call_error(
    failure: Failure,
    operation: &'static str,
    stream: &str,
    source: crate::error::BoxError,
) -> KinesisError {
    match failure {
        Failure::Permanent => KinesisError::Permanent {
            operation,
            stream: stream.to_owned(),
            source,
        },
        Failure::Throttled | Failure::Transient => KinesisError::Transient {
            operation,
            stream: stream.to_owned(),
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(id: &str, start: u128, end: u128) -> ShardRange {
        ShardRange {
            shard_id: id.to_owned(),
            start,
            end,
        }
    }

    #[test]
    fn hash_key_is_the_big_endian_md5() {
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(hash_key("a"), 0x0cc1_75b9_c0f1_b6a8_31c3_99e2_6977_2661);
        assert_eq!(hash_key(""), 0xd41d_8cd9_8f00_b204_e980_0998_ecf8_427e);
    }

    #[test]
    fn lanes_follow_the_hash_key_ranges() {
        let half = u128::MAX / 2;
        // Given out of order on purpose.
        let map =
            ShardMap::new(vec![range("s1", half + 1, u128::MAX), range("s0", 0, half)]).unwrap();
        assert_eq!(map.shards()[0].shard_id, "s0");
        assert_eq!(map.lane_of_hash(0), 0);
        assert_eq!(map.lane_of_hash(half), 0);
        assert_eq!(map.lane_of_hash(half + 1), 1);
        assert_eq!(map.lane_of_hash(u128::MAX), 1);
        // "a" hashes to 0x0cc1.. (low half), "c" to 0x4a8a.. and "b" to 0x92eb.. (high half).
        assert_eq!(map.lane_of("a"), 0);
        assert_eq!(map.lane_of("b"), 1);
        assert!(ShardMap::new(Vec::new()).is_none());
    }
}

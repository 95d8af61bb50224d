//! `tributary tail`: reads a stream back and prints one line per record.
//!
//! This is the consumers' side of the dataflow, for people looking at a
//! stream: every shard is read with GetShardIterator / GetRecords (at most
//! five calls per second per shard, Kinesis' read limit). From the trim
//! horizon, closed parent shards are read too, each child only after its
//! parents, so the records of a key come out in order across a reshard.
//! Each record is one line: the data itself when it is JSON (the
//! envelopes), else a JSON object `{"partition_key":..,"data":..}` for other
//! UTF-8 text or `{"partition_key":..,"data_base64":..}` for bytes. A KPL
//! aggregated record (`sink.aggregation`) is one line per sub-record.

use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::get_records::{GetRecordsError, GetRecordsOutput};
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::{Shard, ShardIteratorType};
use tokio::io::{AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;
use tracing::{debug, warn};
use tributary_envelope::error_text::one_line;
use tributary_envelope::json;

use crate::aggregate::deaggregate;
use crate::config::RetryPolicy;
use crate::dead_letter::is_json;
use crate::error::KinesisError;
use crate::retry::{Backoff, Failure, classify};
use crate::shards::{call_error, is_open, list_shards};

/// Kinesis allows five GetRecords calls per second per shard.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// The most records one GetRecords call returns.
const GET_RECORDS_LIMIT: i32 = 10_000;
/// The first call's record limit: small, since records can be up to the
/// stream's record size (aggregated records are often about 1 MiB).
const FIRST_LIMIT: i32 = 10;
/// The data one page should hold at most: what Kinesis itself returns per
/// call. Emulators return far more (kinesalite a whole shard), so the
/// record limit follows the page sizes seen, keeping memory bounded.
const PAGE_BYTES: usize = 10 << 20;

/// Where [`tail`] starts in each shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record the stream still holds (closed shards included).
    TrimHorizon,
    /// Only records written after the tail started.
    Latest,
    /// The first record each shard received at or after this time
    /// (`AT_TIMESTAMP`); closed shards are read too, parents first.
    AtTimestamp(std::time::SystemTime),
}

#[derive(Debug)]
enum State {
    /// Waits for its parent shards to be read to their end.
    Waiting,
    /// Needs a (new) shard iterator.
    Start(ShardIteratorType),
    /// Reading with this iterator.
    Reading(String),
    /// Closed and read to its end.
    Finished,
}

#[derive(Debug)]
struct Cursor {
    shard_id: String,
    parents: Vec<String>,
    state: State,
    /// Where the shard is read from when there is no last record yet.
    origin: ShardIteratorType,
    /// The time of an `AT_TIMESTAMP` origin.
    timestamp: Option<DateTime>,
    last_sequence: Option<String>,
    next_poll: Instant,
    caught_up: bool,
    backoff: Backoff,
    /// The record limit of the next GetRecords call.
    limit: i32,
}

impl Cursor {
    fn new(shard: &Shard, state: State, origin: ShardIteratorType) -> Self {
        let parents = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect();
        Self {
            shard_id: shard.shard_id().to_owned(),
            parents,
            state,
            origin,
            timestamp: None,
            last_sequence: None,
            limit: FIRST_LIMIT,
            next_poll: Instant::now(),
            caught_up: false,
            backoff: Backoff::new(RetryPolicy::default()),
        }
    }

    fn done_for_now(&self) -> bool {
        match self.state {
            State::Finished => true,
            State::Reading(_) => self.caught_up,
            State::Waiting | State::Start(_) => false,
        }
    }
}

/// Where [`read_stream`] hands the records it reads.
pub trait RecordVisitor {
    /// One record of `shard` (a KPL aggregated record comes already split:
    /// one call per sub-record), in the shard's order.
    fn record(&mut self, shard: &str, partition_key: Option<&str>, data: &[u8]);

    /// Called after each page of records was visited (to write them out).
    fn page_done(&mut self) -> impl Future<Output = Result<(), KinesisError>> {
        async { Ok(()) }
    }
}

/// Writes one line per record (see the module doc).
struct LineWriter<'a, W> {
    out: &'a mut W,
    line: Vec<u8>,
}

impl<W: AsyncWrite + Unpin> RecordVisitor for LineWriter<'_, W> {
    fn record(&mut self, _shard: &str, partition_key: Option<&str>, data: &[u8]) {
        render_one(&mut self.line, partition_key, data);
    }

    async fn page_done(&mut self) -> Result<(), KinesisError> {
        if !self.line.is_empty() {
            self.out
                .write_all(&self.line)
                .await
                .map_err(KinesisError::Output)?;
            self.out.flush().await.map_err(KinesisError::Output)?;
            self.line.clear();
        }
        Ok(())
    }
}

/// Reads `stream` from `from` and writes one line per record to `out`.
///
/// Without `follow` it returns once every shard is caught up (an empty
/// answer with `MillisBehindLatest` 0) or closed and read to its end; with
/// `follow` it keeps polling (and picks up shards created by a reshard)
/// until the future is dropped. Returns how many records it wrote.
pub async fn tail(
    client: &Client,
    stream: &str,
    from: StartFrom,
    follow: bool,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<u64, KinesisError> {
    let mut writer = LineWriter {
        out,
        line: Vec::new(),
    };
    let written = read_stream(client, stream, from, follow, &mut writer).await?;
    writer.out.flush().await.map_err(KinesisError::Output)?;
    Ok(written)
}

/// Reads `stream` as [`tail`] does, handing each record (each sub-record
/// of an aggregated one) to `visitor` with its shard; returns how many
/// Kinesis records it read.
pub async fn read_stream(
    client: &Client,
    stream: &str,
    from: StartFrom,
    follow: bool,
    visitor: &mut impl RecordVisitor,
) -> Result<u64, KinesisError> {
    let shards = list_all(client, stream).await?;
    let mut cursors: Vec<Cursor> = match from {
        StartFrom::TrimHorizon => shards
            .iter()
            .map(|s| Cursor::new(s, State::Waiting, ShardIteratorType::TrimHorizon))
            .collect(),
        StartFrom::AtTimestamp(time) => shards
            .iter()
            .map(|s| {
                let mut cursor = Cursor::new(s, State::Waiting, ShardIteratorType::AtTimestamp);
                cursor.timestamp = Some(DateTime::from(time));
                cursor
            })
            .collect(),
        StartFrom::Latest => shards
            .iter()
            .filter(|s| is_open(s))
            .map(|s| {
                Cursor::new(
                    s,
                    State::Start(ShardIteratorType::Latest),
                    ShardIteratorType::Latest,
                )
            })
            .collect(),
    };
    let mut written = 0u64;
    loop {
        release_children(&mut cursors);
        if !follow && cursors.iter().all(Cursor::done_for_now) {
            return Ok(written);
        }
        let Some(index) = next_cursor(&cursors) else {
            // Following, and every shard is closed and read: wait for the
            // children of the reshard to show up.
            tokio::time::sleep(POLL_INTERVAL).await;
            adopt_new_shards(client, stream, &mut cursors).await?;
            continue;
        };
        tokio::time::sleep_until(cursors[index].next_poll).await;
        let cursor = &mut cursors[index];
        cursor.next_poll = Instant::now() + POLL_INTERVAL;
        match std::mem::replace(&mut cursor.state, State::Finished) {
            State::Start(kind) => {
                cursor.state = shard_iterator(client, stream, cursor, kind).await?;
                if matches!(cursor.state, State::Reading(_)) {
                    // The first GetRecords may follow right away.
                    cursor.next_poll = Instant::now();
                }
            }
            State::Reading(iterator) => {
                let Some(output) = get_records(client, stream, cursor, &iterator).await? else {
                    continue;
                };
                for record in output.records() {
                    visit(
                        visitor,
                        &cursor.shard_id,
                        record.partition_key(),
                        record.data().as_ref(),
                    );
                    cursor.last_sequence = Some(record.sequence_number().to_owned());
                }
                written += output.records().len() as u64;
                let bytes = output
                    .records()
                    .iter()
                    .map(|r| r.data().as_ref().len())
                    .sum();
                cursor.limit = next_limit(cursor.limit, output.records().len(), bytes);
                visitor.page_done().await?;
                cursor.caught_up =
                    output.records().is_empty() && output.millis_behind_latest() == Some(0);
                match output.next_shard_iterator() {
                    Some(next) => cursor.state = State::Reading(next.to_owned()),
                    None => {
                        debug!(stream, shard = %cursor.shard_id, "shard closed and read to its end");
                        cursor.state = State::Finished;
                        if follow {
                            adopt_new_shards(client, stream, &mut cursors).await?;
                        }
                    }
                }
            }
            other => cursor.state = other,
        }
    }
}

/// The record limit after a page of `records` records and `bytes` bytes
/// read with `limit`: smaller when the page was over [`PAGE_BYTES`], twice
/// as large (up to [`GET_RECORDS_LIMIT`]) when a full page was well under.
fn next_limit(limit: i32, records: usize, bytes: usize) -> i32 {
    if bytes > PAGE_BYTES && records > 0 {
        let fitting = PAGE_BYTES / (bytes / records).max(1);
        return i32::try_from(fitting)
            .unwrap_or(1)
            .clamp(1, GET_RECORDS_LIMIT);
    }
    let full = i32::try_from(records).unwrap_or(i32::MAX) >= limit;
    if full && bytes < PAGE_BYTES / 2 {
        return limit.saturating_mul(2).min(GET_RECORDS_LIMIT);
    }
    limit
}

/// The cursor to poll next: the one due first among those that can poll.
fn next_cursor(cursors: &[Cursor]) -> Option<usize> {
    cursors
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.state, State::Start(_) | State::Reading(_)))
        .min_by_key(|(_, c)| c.next_poll)
        .map(|(i, _)| i)
}

/// Lets a waiting shard start once none of its parents is still to be read.
fn release_children(cursors: &mut [Cursor]) {
    for i in 0..cursors.len() {
        if !matches!(cursors[i].state, State::Waiting) {
            continue;
        }
        let blocked = cursors[i].parents.iter().any(|parent| {
            cursors
                .iter()
                .any(|c| &c.shard_id == parent && !matches!(c.state, State::Finished))
        });
        if !blocked {
            cursors[i].state = State::Start(cursors[i].origin.clone());
        }
    }
}

/// Adds shards Kinesis lists that the tail does not know yet (the children
/// of a reshard), to be read from their start once their parents are done.
async fn adopt_new_shards(
    client: &Client,
    stream: &str,
    cursors: &mut Vec<Cursor>,
) -> Result<(), KinesisError> {
    for shard in list_all(client, stream).await? {
        if !cursors.iter().any(|c| c.shard_id == shard.shard_id()) {
            debug!(stream, shard = %shard.shard_id(), "following a new shard");
            cursors.push(Cursor::new(
                &shard,
                State::Waiting,
                ShardIteratorType::TrimHorizon,
            ));
        }
    }
    Ok(())
}

async fn list_all(client: &Client, stream: &str) -> Result<Vec<Shard>, KinesisError> {
    list_shards(client, stream).await.map_err(|err| {
        if err
            .as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception())
        {
            return KinesisError::StreamNotFound {
                stream: stream.to_owned(),
                source: Some(err.into()),
            };
        }
        let failure = classify(&err, |_| None);
        call_error(failure, "ListShards", stream, err.into())
    })
}

/// Asks for a shard iterator; returns the cursor's next state: reading,
/// finished (a closed shard with nothing left), or the same start again
/// after a failure a retry can fix (the cursor then waits its backoff).
async fn shard_iterator(
    client: &Client,
    stream: &str,
    cursor: &mut Cursor,
    kind: ShardIteratorType,
) -> Result<State, KinesisError> {
    let request = client
        .get_shard_iterator()
        .stream_name(stream)
        .shard_id(&cursor.shard_id);
    // After an expired iterator, go on right after the last record written.
    let request = match &cursor.last_sequence {
        Some(sequence) => request
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(sequence),
        None => request
            .shard_iterator_type(kind.clone())
            .set_timestamp(cursor.timestamp),
    };
    match request.send().await {
        Ok(output) => {
            cursor.backoff.reset();
            Ok(match output.shard_iterator() {
                Some(iterator) => State::Reading(iterator.to_owned()),
                None => State::Finished,
            })
        }
        Err(err) => {
            let failure = classify(&err, |e| match e {
                GetShardIteratorError::ProvisionedThroughputExceededException(_) => {
                    Some(Failure::Throttled)
                }
                GetShardIteratorError::InternalFailureException(_) => Some(Failure::Transient),
                GetShardIteratorError::ResourceNotFoundException(_)
                | GetShardIteratorError::AccessDeniedException(_)
                | GetShardIteratorError::InvalidArgumentException(_) => Some(Failure::Permanent),
                _ => None,
            });
            retry_or_fail(cursor, stream, "GetShardIterator", failure, err)?;
            Ok(State::Start(kind))
        }
    }
}

/// One GetRecords call, or `None` after a failure a retry can fix.
async fn get_records(
    client: &Client,
    stream: &str,
    cursor: &mut Cursor,
    iterator: &str,
) -> Result<Option<GetRecordsOutput>, KinesisError> {
    let answer = client
        .get_records()
        .shard_iterator(iterator)
        .limit(cursor.limit)
        .send()
        .await;
    match answer {
        Ok(output) => {
            cursor.backoff.reset();
            Ok(Some(output))
        }
        Err(err) => {
            if let Some(GetRecordsError::ExpiredIteratorException(_)) = err.as_service_error() {
                debug!(stream, shard = %cursor.shard_id, "shard iterator expired; asking for a new one");
                cursor.state = State::Start(cursor.origin.clone());
                return Ok(None);
            }
            let failure = classify(&err, |e| match e {
                GetRecordsError::ProvisionedThroughputExceededException(_)
                | GetRecordsError::KmsThrottlingException(_) => Some(Failure::Throttled),
                GetRecordsError::InternalFailureException(_) => Some(Failure::Transient),
                GetRecordsError::ResourceNotFoundException(_)
                | GetRecordsError::AccessDeniedException(_)
                | GetRecordsError::InvalidArgumentException(_)
                | GetRecordsError::KmsAccessDeniedException(_)
                | GetRecordsError::KmsDisabledException(_)
                | GetRecordsError::KmsInvalidStateException(_)
                | GetRecordsError::KmsNotFoundException(_)
                | GetRecordsError::KmsOptInRequired(_) => Some(Failure::Permanent),
                _ => None,
            });
            retry_or_fail(cursor, stream, "GetRecords", failure, err)?;
            cursor.state = State::Reading(iterator.to_owned());
            Ok(None)
        }
    }
}

fn retry_or_fail<E>(
    cursor: &mut Cursor,
    stream: &str,
    operation: &'static str,
    failure: Failure,
    err: SdkError<E>,
) -> Result<(), KinesisError>
where
    E: std::error::Error + Send + Sync + 'static,
{
    if failure == Failure::Permanent {
        return Err(call_error(failure, operation, stream, err.into()));
    }
    let delay = cursor.backoff.next_delay();
    warn!(
        stream, shard = %cursor.shard_id, operation, retry_in_ms = delay.as_millis() as u64,
        error = %one_line(&err), "kinesis read failed; retrying"
    );
    cursor.next_poll = Instant::now() + delay.max(POLL_INTERVAL);
    Ok(())
}

/// Hands a record to the visitor: as it is, or one sub-record at a time
/// for a KPL aggregated record (a malformed one is passed as the bytes it
/// is).
fn visit(visitor: &mut impl RecordVisitor, shard: &str, partition_key: Option<&str>, data: &[u8]) {
    match deaggregate(data) {
        Some(Ok(records)) => {
            for record in records {
                visitor.record(shard, Some(&record.partition_key), &record.data);
            }
        }
        Some(Err(err)) => {
            warn!(error = %err, "passing on a malformed aggregated record as it is");
            visitor.record(shard, partition_key, data);
        }
        None => visitor.record(shard, partition_key, data),
    }
}

/// Appends one output line for one record.
fn render_one(out: &mut Vec<u8>, partition_key: Option<&str>, data: &[u8]) {
    if is_json(data) {
        // Raw CR/LF in valid JSON is whitespace: blank it to keep one line.
        out.extend(data.iter().map(|&b| match b {
            b'\n' | b'\r' => b' ',
            other => other,
        }));
    } else {
        out.extend_from_slice(b"{\"partition_key\":");
        json::write_str(out, partition_key.unwrap_or_default());
        match std::str::from_utf8(data) {
            Ok(text) => {
                out.extend_from_slice(b",\"data\":");
                json::write_str(out, text);
            }
            Err(_) => {
                out.extend_from_slice(b",\"data_base64\":");
                json::write_base64(out, data);
            }
        }
        out.push(b'}');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use aws_sdk_kinesis::config::retry::RetryConfig;
    use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorOutput;
    use aws_sdk_kinesis::operation::list_shards::ListShardsOutput;
    use aws_sdk_kinesis::primitives::Blob;
    use aws_sdk_kinesis::types::{HashKeyRange, Record, SequenceNumberRange};
    use aws_smithy_mocks::{MockResponse, RuleMode, mock, mock_client};

    use super::*;

    #[test]
    fn the_record_limit_follows_page_sizes() {
        // Small records: full pages double the limit up to the maximum.
        assert_eq!(next_limit(10, 10, 3_000), 20);
        assert_eq!(next_limit(8_000, 8_000, 2_400_000), GET_RECORDS_LIMIT);
        // A page that was not full keeps it.
        assert_eq!(next_limit(640, 12, 3_600), 640);
        // 1 MiB records: 10 per page.
        assert_eq!(next_limit(40, 40, 40 << 20), 10);
        // Huge pages never drop it below one record.
        assert_eq!(next_limit(10, 1, 100 << 20), 1);
    }

    /// A stream with a closed parent shard (3 records, one of them binary)
    /// and its open child (2 records). GetRecords returns 2 records a call.
    fn fake_stream() -> Client {
        let shard = |id: &str, parent: Option<&str>, closed: bool| {
            let mut sequence = SequenceNumberRange::builder().starting_sequence_number("1");
            if closed {
                sequence = sequence.ending_sequence_number("9");
            }
            Shard::builder()
                .shard_id(id)
                .set_parent_shard_id(parent.map(str::to_owned))
                .hash_key_range(
                    HashKeyRange::builder()
                        .starting_hash_key("0")
                        .ending_hash_key(u128::MAX.to_string())
                        .build()
                        .unwrap(),
                )
                .sequence_number_range(sequence.build().unwrap())
                .build()
                .unwrap()
        };
        // Listed child first: the tail must still read the parent first.
        let shards = vec![
            shard("child", Some("parent"), false),
            shard("parent", None, true),
        ];
        let list = mock!(Client::list_shards).then_compute_response(move |_| {
            MockResponse::Output(
                ListShardsOutput::builder()
                    .set_shards(Some(shards.clone()))
                    .build(),
            )
        });
        let iterator = mock!(Client::get_shard_iterator).then_compute_response(|input| {
            let shard = input.shard_id().unwrap();
            let start = match input.shard_iterator_type() {
                Some(ShardIteratorType::Latest) => "end",
                _ => "0",
            };
            MockResponse::Output(
                GetShardIteratorOutput::builder()
                    .shard_iterator(format!("{shard}|{start}"))
                    .build(),
            )
        });
        let records = mock!(Client::get_records).then_compute_response(|input| {
            let (shard, offset) = input.shard_iterator().unwrap().split_once('|').unwrap();
            let data: Vec<Vec<u8>> = match shard {
                "parent" => vec![
                    b"{\"n\":1}".to_vec(),
                    b"{\"n\":2}".to_vec(),
                    vec![0xff, 0x01],
                ],
                _ => vec![b"{\"n\":3}".to_vec(), b"{\"n\":4}".to_vec()],
            };
            let offset = if offset == "end" {
                data.len()
            } else {
                offset.parse().unwrap()
            };
            let page: Vec<Record> = data
                .iter()
                .enumerate()
                .skip(offset)
                .take(2)
                .map(|(i, d)| {
                    Record::builder()
                        .sequence_number(format!("{shard}-{i}"))
                        .partition_key(format!("key-{shard}"))
                        .data(Blob::new(d.clone()))
                        .build()
                        .unwrap()
                })
                .collect();
            let next = offset + page.len();
            let closed_and_done = shard == "parent" && page.is_empty();
            let output = GetRecordsOutput::builder()
                .set_records(Some(page))
                .millis_behind_latest(0)
                .set_next_shard_iterator((!closed_and_done).then(|| format!("{shard}|{next}")))
                .build()
                .unwrap();
            MockResponse::Output(output)
        });
        mock_client!(
            aws_sdk_kinesis,
            RuleMode::MatchAny,
            &[&list, &iterator, &records],
            |config| config.retry_config(RetryConfig::disabled())
        )
    }

    #[tokio::test]
    async fn from_the_trim_horizon_parents_come_before_children() {
        let client = fake_stream();
        let mut out = Vec::new();
        let written = tail(&client, "s", StartFrom::TrimHorizon, false, &mut out)
            .await
            .unwrap();
        assert_eq!(written, 5);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "{\"n\":1}",
                "{\"n\":2}",
                "{\"partition_key\":\"key-parent\",\"data_base64\":\"/wE=\"}",
                "{\"n\":3}",
                "{\"n\":4}",
            ]
        );
    }

    #[tokio::test]
    async fn from_latest_an_idle_stream_prints_nothing() {
        let client = fake_stream();
        let mut out = Vec::new();
        let written = tail(&client, "s", StartFrom::Latest, false, &mut out)
            .await
            .unwrap();
        assert_eq!(written, 0);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn following_keeps_polling_until_cancelled() {
        let client = fake_stream();
        let mut out = Vec::new();
        let outcome = tokio::time::timeout(
            Duration::from_millis(1_500),
            tail(&client, "s", StartFrom::TrimHorizon, true, &mut out),
        )
        .await;
        assert!(outcome.is_err(), "a follow only ends when cancelled");
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 5);
    }

    #[test]
    fn lines_are_json_whatever_the_data() {
        let mut sink = Vec::new();
        let mut out = LineWriter {
            out: &mut sink,
            line: Vec::new(),
        };
        visit(&mut out, "s", Some("k"), b"{\"v\":1,\n\"x\":2}");
        visit(&mut out, "s", Some("k\"2"), b"plain text");
        visit(&mut out, "s", Some("k3"), &[0xff, 0x00]);
        let mut aggregate = crate::aggregate::Aggregate::default();
        aggregate.push("a:1", None, b"{\"v\":2}");
        aggregate.push("a:2", None, b"bytes");
        let (key, _, data) = aggregate.finish();
        visit(&mut out, "s", Some(&key), &data);
        let text = String::from_utf8(out.line).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[3], serde_json::json!({"v": 2}));
        assert_eq!(
            lines[4],
            serde_json::json!({"partition_key": "a:2", "data": "bytes"})
        );
        assert_eq!(lines[0], serde_json::json!({"v": 1, "x": 2}));
        assert_eq!(
            lines[1],
            serde_json::json!({"partition_key": "k\"2", "data": "plain text"})
        );
        assert_eq!(
            lines[2],
            serde_json::json!({"partition_key": "k3", "data_base64": "/wA="})
        );
    }
}

//! The sink against a scripted Kinesis (`aws-smithy-mocks`): batching,
//! routing, ordered retries, throttling, dead letters, quotas and the
//! exactly-once done reports.
//!
//! The fake answers DescribeStreamSummary and ListShards (paginated, one
//! shard per page, with a closed parent shard first) and records every
//! PutRecords request it sees; a per-test script decides each answer.
//! Record data is `{"seq":N,"pad":".."}`, so a request's entries can be
//! mapped back to source sequence numbers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::http::HttpResponse;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::operation::describe_stream_summary::{
    DescribeStreamSummaryError, DescribeStreamSummaryOutput,
};
use aws_sdk_kinesis::operation::list_shards::{ListShardsInput, ListShardsOutput};
use aws_sdk_kinesis::operation::put_records::{PutRecordsError, PutRecordsInput, PutRecordsOutput};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types::error::{
    AccessDeniedException, InternalFailureException, ProvisionedThroughputExceededException,
    ResourceNotFoundException,
};
use aws_sdk_kinesis::types::{
    HashKeyRange, PutRecordsResultEntry, SequenceNumberRange, Shard, StreamDescriptionSummary,
    StreamStatus,
};
use aws_smithy_mocks::{MockResponse, RuleMode, mock, mock_client};
use md5::{Digest, Md5};
use tokio::sync::mpsc;
use tributary_envelope::{AckTracker, Acks, Budget, Record, Sink};

use crate::{KinesisError, KinesisSink, KinesisSinkConfig, RetryPolicy};

const STREAM: &str = "shop-cdc";
/// A second stream, for `[dead_letter] stream`: its first PutRecords is
/// throttled whole, later ones are accepted.
const DLQ_STREAM: &str = "shop-cdc-dlq";
/// The position the tests commit for all their records.
const END_POSITION: u64 = 7;

/// One entry of a PutRecords request, as the fake saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    seq: u64,
    key: String,
    bytes: usize,
    /// The open shard Kinesis puts it on (by explicit hash key or key).
    shard: usize,
    /// A transaction's `end` marker.
    end: bool,
}

/// A record's partition key and data.
type KeyedData = (String, Vec<u8>);

/// How the fake answers one PutRecords call.
enum Reply {
    /// Every entry gets a sequence number.
    Accept,
    /// These entry positions fail with these codes; the rest are accepted.
    Fail(Vec<(usize, &'static str)>),
    /// The whole call fails with a modeled error.
    Error(PutRecordsError),
    /// The whole call fails with this HTTP status and an empty body.
    Status(u16),
}

/// A ListShards request as the fake saw it: (stream name, next token).
type ListRequest = (Option<String>, Option<String>);

type Script = dyn Fn(usize, &[Entry]) -> Reply + Send + Sync;

/// A scripted Kinesis with `open_shards` open shards.
struct Fake {
    client: Client,
    calls: Arc<Mutex<Vec<Vec<Entry>>>>,
    /// The data of every record [`DLQ_STREAM`] accepted.
    dead_letter_records: Arc<Mutex<Vec<KeyedData>>>,
    list_requests: Arc<Mutex<Vec<ListRequest>>>,
    ranges: Vec<(u128, u128)>,
}

impl Fake {
    fn new(
        open_shards: usize,
        max_record_kib: Option<i32>,
        script: impl Fn(usize, &[Entry]) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let script: Arc<Script> = Arc::new(script);
        let ranges = split_hash_space(open_shards);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let list_requests = Arc::new(Mutex::new(Vec::new()));

        let describe = mock!(Client::describe_stream_summary).then_compute_response(move |input| {
            let name = input.stream_name().unwrap_or_default();
            if name != STREAM && name != DLQ_STREAM {
                return MockResponse::Error(DescribeStreamSummaryError::ResourceNotFoundException(
                    ResourceNotFoundException::builder()
                        .message(format!("Stream {name} under account 0 not found."))
                        .build(),
                ));
            }
            let mut summary = StreamDescriptionSummary::builder()
                .stream_name(name)
                .stream_arn(format!("arn:aws:kinesis:us-east-1:0:stream/{name}"))
                .stream_status(StreamStatus::Active)
                .retention_period_hours(24)
                .stream_creation_timestamp(DateTime::from_secs(0))
                .set_enhanced_monitoring(Some(Vec::new()))
                .open_shard_count(open_shards as i32);
            if let Some(kib) = max_record_kib {
                summary = summary.max_record_size_in_kib(kib);
            }
            MockResponse::Output(
                DescribeStreamSummaryOutput::builder()
                    .stream_description_summary(summary.build().unwrap())
                    .build(),
            )
        });

        // Page 0: a closed parent shard covering everything; page i: open
        // shard i - 1. One page per call, linked by tokens.
        let mut shards = vec![shard("shardId-parent", 0, u128::MAX, true)];
        for (i, &(start, end)) in ranges.iter().enumerate() {
            shards.push(shard(&format!("shardId-{i:012}"), start, end, false));
        }
        let seen = list_requests.clone();
        let list =
            mock!(Client::list_shards).then_compute_response(move |input: &ListShardsInput| {
                seen.lock().unwrap().push((
                    input.stream_name().map(str::to_owned),
                    input.next_token().map(str::to_owned),
                ));
                let page: usize = input
                    .next_token()
                    .and_then(|t| t.strip_prefix("page-"))
                    .map_or(0, |n| n.parse().unwrap());
                let mut output = ListShardsOutput::builder().shards(shards[page].clone());
                if page + 1 < shards.len() {
                    output = output.next_token(format!("page-{}", page + 1));
                }
                MockResponse::Output(output.build())
            });

        let log = calls.clone();
        let put_ranges = ranges.clone();
        let dead_letter_records = Arc::new(Mutex::new(Vec::new()));
        let dlq_log = dead_letter_records.clone();
        let dlq_calls = Arc::new(Mutex::new(0usize));
        let put =
            mock!(Client::put_records).then_compute_response(move |input: &PutRecordsInput| {
                if input.stream_name() == Some(DLQ_STREAM) {
                    let mut dlq_calls = dlq_calls.lock().unwrap();
                    *dlq_calls += 1;
                    if *dlq_calls == 1 {
                        return MockResponse::Error(
                            PutRecordsError::ProvisionedThroughputExceededException(
                                ProvisionedThroughputExceededException::builder().build(),
                            ),
                        );
                    }
                    let entries: Vec<Entry> = input
                        .records()
                        .iter()
                        .map(|e| {
                            let key = e.partition_key().unwrap_or_default().to_owned();
                            dlq_log
                                .lock()
                                .unwrap()
                                .push((key.clone(), e.data().as_ref().to_vec()));
                            Entry {
                                seq: 0,
                                key,
                                bytes: 0,
                                shard: 0,
                                end: false,
                            }
                        })
                        .collect();
                    return MockResponse::Output(answer(&entries, &[]));
                }
                assert_eq!(input.stream_name(), Some(STREAM));
                let entries: Vec<Entry> = input
                    .records()
                    .iter()
                    .map(|e| {
                        let key = e.partition_key().unwrap_or_default();
                        let hash = e.explicit_hash_key().map_or_else(
                            || u128::from_be_bytes(Md5::digest(key.as_bytes()).into()),
                            |h| h.parse().unwrap(),
                        );
                        Entry {
                            seq: seq_of(e.data().as_ref()),
                            key: key.to_owned(),
                            bytes: e.data().as_ref().len() + key.len(),
                            shard: put_ranges
                                .iter()
                                .position(|&(start, end)| start <= hash && hash <= end)
                                .unwrap(),
                            end: e.data().as_ref().starts_with(br#"{"v":1,"id":"#) && {
                                let end = br#""op":"end","#;
                                e.data().as_ref().windows(end.len()).any(|w| w == end)
                            },
                        }
                    })
                    .collect();
                let index = {
                    let mut log = log.lock().unwrap();
                    log.push(entries.clone());
                    log.len() - 1
                };
                match script(index, &entries) {
                    Reply::Accept => MockResponse::Output(answer(&entries, &[])),
                    Reply::Fail(failures) => MockResponse::Output(answer(&entries, &failures)),
                    Reply::Error(err) => MockResponse::Error(err),
                    Reply::Status(status) => {
                        MockResponse::Http(HttpResponse::new(status.try_into().unwrap(), "".into()))
                    }
                }
            });

        // The SDK's own retries are off: the sink's retries are under test
        // (and the mock cannot replay a computed answer to an SDK retry).
        let client = mock_client!(
            aws_sdk_kinesis,
            RuleMode::MatchAny,
            &[&describe, &list, &put],
            |config| config.retry_config(RetryConfig::disabled())
        );
        Self {
            client,
            calls,
            dead_letter_records,
            list_requests,
            ranges,
        }
    }

    fn calls(&self) -> Vec<Vec<Entry>> {
        self.calls.lock().unwrap().clone()
    }

    /// The open shard whose range holds `key`'s MD5 (computed here, not by the crate).
    fn shard_of(&self, key: &str) -> usize {
        let hash = u128::from_be_bytes(Md5::digest(key.as_bytes()).into());
        self.ranges
            .iter()
            .position(|&(start, end)| start <= hash && hash <= end)
            .unwrap()
    }
}

fn split_hash_space(shards: usize) -> Vec<(u128, u128)> {
    let step = u128::MAX / shards as u128;
    (0..shards)
        .map(|i| {
            let start = step * i as u128;
            let end = if i + 1 == shards {
                u128::MAX
            } else {
                step * (i as u128 + 1) - 1
            };
            (start, end)
        })
        .collect()
}

fn shard(id: &str, start: u128, end: u128, closed: bool) -> Shard {
    let mut sequence = SequenceNumberRange::builder().starting_sequence_number("1");
    if closed {
        sequence = sequence.ending_sequence_number("99");
    }
    Shard::builder()
        .shard_id(id)
        .hash_key_range(
            HashKeyRange::builder()
                .starting_hash_key(start.to_string())
                .ending_hash_key(end.to_string())
                .build()
                .unwrap(),
        )
        .sequence_number_range(sequence.build().unwrap())
        .build()
        .unwrap()
}

fn answer(entries: &[Entry], failures: &[(usize, &str)]) -> PutRecordsOutput {
    let results = entries.iter().enumerate().map(|(i, entry)| {
        match failures.iter().find(|(at, _)| *at == i) {
            Some((_, code)) => PutRecordsResultEntry::builder()
                .error_code(*code)
                .error_message(format!("entry {i} refused"))
                .build(),
            None => PutRecordsResultEntry::builder()
                .sequence_number(format!("4960{:020}", entry.seq))
                .shard_id(format!("shardId-{:012}", entry.shard))
                .build(),
        }
    });
    PutRecordsOutput::builder()
        .failed_record_count(failures.len() as i32)
        .set_records(Some(results.collect()))
        .build()
        .unwrap()
}

fn seq_of(data: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct Probe {
        seq: u64,
    }
    serde_json::from_slice::<Probe>(data).map_or(u64::MAX, |p| p.seq)
}

fn record(seq: u64, key: &str, pad: usize) -> Record {
    let data = format!("{{\"seq\":{seq},\"pad\":\"{}\"}}", "x".repeat(pad)).into_bytes();
    Record {
        seq,
        ..Record::new(STREAM.into(), key.to_owned(), data)
    }
}

fn config(dir: &tempfile::TempDir) -> KinesisSinkConfig {
    let mut config = KinesisSinkConfig::new("us-east-1", dir.path().join("dead-letters"));
    config.retry = RetryPolicy {
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(20),
        max_rejections: 3,
    };
    config
}

/// [`config`] with a record quota whose burst is a full 500-record call.
fn quick(dir: &tempfile::TempDir) -> KinesisSinkConfig {
    let mut config = config(dir);
    config.records_per_shard_per_sec = 2_500;
    config
}

/// What a finished run left behind.
struct Run {
    result: Result<(), KinesisError>,
    tracker: Arc<AckTracker>,
    budget: Arc<Budget>,
}

impl Run {
    /// Every record reported done exactly once: the tracker has no gap and
    /// the budget is exactly full (a double report would overfill it).
    fn assert_all_done_once(&self) {
        if let Err(err) = &self.result {
            panic!("the sink failed: {err:?}");
        }
        assert!(
            self.tracker.is_drained(),
            "{} records not done",
            self.tracker.in_flight()
        );
        assert_eq!(self.tracker.acked(), END_POSITION);
        assert_eq!(
            self.budget.available(),
            self.budget.capacity(),
            "budget not back to full"
        );
    }
}

/// Runs the sink over `records`, fed in input batches of `chunk`, with the
/// input closed after the last one.
async fn run(client: Client, config: KinesisSinkConfig, records: Vec<Record>, chunk: usize) -> Run {
    let total: usize = records.iter().map(|r| r.weight().max(1)).sum();
    let budget = Arc::new(Budget::new(total));
    let tracker = Arc::new(AckTracker::new(0));
    for record in &records {
        budget.acquire(record.weight()).await;
    }
    tracker.commit(records.len() as u64, END_POSITION);
    let sink = KinesisSink::new(client, config).await.unwrap();
    let (sender, input) = mpsc::channel(4);
    let feed = async move {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let batch: Vec<Record> = records.by_ref().take(chunk).collect();
            if sender.send(batch).await.is_err() {
                break;
            }
        }
    };
    let acks = Acks::new(tracker.clone(), budget.clone());
    let (_, result) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(feed, sink.run(input, acks))
    })
    .await
    .expect("the sink finished within a minute");
    Run {
        result,
        tracker,
        budget,
    }
}

fn seqs(call: &[Entry]) -> Vec<u64> {
    call.iter().map(|e| e.seq).collect()
}

/// Per key, the order in which the *last* copy of each record landed must
/// be the source order, and the newest record must land last.
fn assert_last_copies_in_order(calls: &[Vec<Entry>], accepted: impl Fn(usize, usize) -> bool) {
    let mut landed: HashMap<&str, Vec<u64>> = HashMap::new();
    for (c, call) in calls.iter().enumerate() {
        for (i, entry) in call.iter().enumerate() {
            if accepted(c, i) {
                landed.entry(&entry.key).or_default().push(entry.seq);
            }
        }
    }
    for (key, seqs) in landed {
        let mut last: Vec<u64> = Vec::new();
        for (i, seq) in seqs.iter().enumerate() {
            if !seqs[i + 1..].contains(seq) {
                last.push(*seq);
            }
        }
        let mut sorted = last.clone();
        sorted.sort_unstable();
        assert_eq!(
            last, sorted,
            "key {key}: last copies out of order (landed {seqs:?})"
        );
    }
}

#[tokio::test]
async fn calls_carry_at_most_500_records() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let records: Vec<Record> = (0..1_203)
        .map(|i| record(i, &format!("public.t:{i}"), 10))
        .collect();
    let run = run(fake.client.clone(), quick(&dir), records, usize::MAX).await;
    run.assert_all_done_once();
    let calls = fake.calls();
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [500, 500, 203]);
    let sent: Vec<u64> = calls.iter().flat_map(|c| seqs(c)).collect();
    assert_eq!(
        sent,
        (0..1_203).collect::<Vec<_>>(),
        "each record once, in order"
    );
}

#[tokio::test]
async fn calls_carry_at_most_5_mib() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let mut config = config(&dir);
    // A byte quota far above one call, so only the 5 MiB limit cuts.
    config.bytes_per_shard_per_sec = 64 << 20;
    let records: Vec<Record> = (0..12)
        .map(|i| record(i, &format!("public.t:{i}"), 500 * 1024))
        .collect();
    let run = run(fake.client.clone(), config, records, usize::MAX).await;
    run.assert_all_done_once();
    let calls = fake.calls();
    for call in &calls {
        let bytes: usize = call.iter().map(|e| e.bytes).sum();
        assert!(bytes <= 5 * 1024 * 1024, "a call of {bytes} bytes");
    }
    // 10 records of ~500 KiB fit in 5 MiB, 11 do not.
    assert_eq!(calls.iter().map(Vec::len).collect::<Vec<_>>(), [10, 2]);
}

#[tokio::test]
async fn the_byte_quota_cuts_batches_to_its_burst() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let records: Vec<Record> = (0..3)
        .map(|i| record(i, &format!("public.t:{i}"), 80 * 1024))
        .collect();
    // The default 1 MiB/s quota's burst (a fifth of it) holds two of these
    // records, not three.
    let run = run(fake.client.clone(), config(&dir), records, usize::MAX).await;
    run.assert_all_done_once();
    assert_eq!(
        fake.calls().iter().map(Vec::len).collect::<Vec<_>>(),
        [2, 1]
    );
}

#[tokio::test]
async fn records_of_a_key_go_through_one_lane_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(4, None, |_, _| Reply::Accept);
    let records: Vec<Record> = (0..400)
        .map(|i| record(i, &format!("public.orders:{}", i % 40), 20))
        .collect();
    let run = run(fake.client.clone(), config(&dir), records, 37).await;
    run.assert_all_done_once();

    let calls = fake.calls();
    let mut lanes_used = HashSet::new();
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut delivered = Vec::new();
    for call in &calls {
        let lane = fake.shard_of(&call[0].key);
        lanes_used.insert(lane);
        for entry in call {
            assert_eq!(
                fake.shard_of(&entry.key),
                lane,
                "one call mixes shards: {call:?}"
            );
            if let Some(previous) = last_seq.insert(entry.key.clone(), entry.seq) {
                assert!(
                    previous < entry.seq,
                    "key {} went {previous} then {}",
                    entry.key,
                    entry.seq
                );
            }
            delivered.push(entry.seq);
        }
    }
    assert!(
        lanes_used.len() >= 3,
        "40 keys over 4 shards used only {lanes_used:?}"
    );
    delivered.sort_unstable();
    assert_eq!(delivered, (0..400).collect::<Vec<_>>());

    // The shards were listed page by page: follow-up pages by token alone.
    let pages = fake.list_requests.lock().unwrap().clone();
    assert_eq!(pages.len(), 5, "{pages:?}");
    assert_eq!(pages[0], (Some(STREAM.to_owned()), None));
    assert!(
        pages[1..]
            .iter()
            .all(|(name, token)| name.is_none() && token.is_some()),
        "{pages:?}"
    );
}

/// Record 10 (key A, with 20, 30 and 550) is refused on its first two
/// tries; every other key is its own.
fn refuse_record_10_twice() -> (
    impl Fn(usize, &[Entry]) -> Reply + Send + Sync + 'static,
    Vec<Record>,
) {
    let tries = Arc::new(Mutex::new(0));
    let script = move |_: usize, entries: &[Entry]| {
        let mut failures = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let mut tries = tries.lock().unwrap();
            if entry.seq == 10 && *tries < 2 {
                *tries += 1;
                failures.push((i, "ProvisionedThroughputExceededException"));
            }
        }
        if failures.is_empty() {
            Reply::Accept
        } else {
            Reply::Fail(failures)
        }
    };
    let key_of = |i: u64| match i {
        10 | 20 | 30 | 550 => "public.t:A".to_owned(),
        i => format!("public.t:{i}"),
    };
    (
        script,
        (0..600).map(|i| record(i, &key_of(i), 10)).collect(),
    )
}

#[tokio::test]
async fn a_partial_failure_is_retried_with_the_later_records_of_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (script, records) = refuse_record_10_twice();
    let fake = Fake::new(1, None, script);
    let mut config = quick(&dir);
    config.max_in_flight_per_shard = 1;
    let run = run(fake.client.clone(), config, records, usize::MAX).await;
    run.assert_all_done_once();

    let calls = fake.calls();
    assert_eq!(seqs(&calls[0]), (0..500).collect::<Vec<_>>());
    // The refused record comes back first, with the later records of its key
    // (accepted or not); the newer records of the lane only after them.
    let mut second = vec![10, 20, 30];
    second.extend(500..600);
    assert_eq!(seqs(&calls[1]), second);
    // Refused again: 20, 30 and now 550 (a later record of key A in the same
    // call) go again with it; nothing else is sent twice.
    assert_eq!(seqs(&calls[2]), [10, 20, 30, 550]);
    assert_eq!(calls.len(), 3);

    // Replay what the fake accepted: every key's last copies are in order.
    let refused = |c: usize, i: usize| calls[c][i].seq == 10 && c < 2;
    assert_last_copies_in_order(&calls, |c, i| !refused(c, i));
}

#[tokio::test]
async fn with_two_calls_in_flight_a_key_in_flight_waits_and_retries_keep_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let (script, records) = refuse_record_10_twice();
    let fake = Fake::new(1, None, script);
    let mut config = quick(&dir);
    config.max_in_flight_per_shard = 2;
    let run = run(fake.client.clone(), config, records, usize::MAX).await;
    run.assert_all_done_once();

    let calls = fake.calls();
    assert_eq!(seqs(&calls[0]), (0..500).collect::<Vec<_>>());
    // The second call goes while the first is in flight: every newer record
    // but 550, whose key A is in the first call.
    let second: Vec<u64> = (500..600).filter(|&seq| seq != 550).collect();
    assert_eq!(seqs(&calls[1]), second);
    // Record 10 is refused: it comes back before 550, with the later
    // records of its key, and is refused once more.
    assert_eq!(seqs(&calls[2]), [10, 20, 30, 550]);
    assert_eq!(seqs(&calls[3]), [10, 20, 30, 550]);
    assert_eq!(calls.len(), 4);
    let refused = |c: usize, i: usize| calls[c][i].seq == 10 && c != 1 && c < 3;
    assert_last_copies_in_order(&calls, |c, i| !refused(c, i));
}

/// An answer that throttles the entries at `positions`.
fn throttle(positions: impl Iterator<Item = usize>) -> Reply {
    Reply::Fail(
        positions
            .map(|i| (i, "ProvisionedThroughputExceededException"))
            .collect(),
    )
}

/// About one entry in ten, spread pseudo-randomly over calls and positions.
fn randomly_refused(call: usize, position: usize) -> bool {
    (position * 7919 + call * 104_729).is_multiple_of(10)
}

#[tokio::test]
async fn a_throttled_lane_slows_down_to_what_the_shard_takes() {
    let dir = tempfile::tempdir().unwrap();
    // Every other entry of every call is throttled: the shard takes half.
    let fake = Fake::new(1, None, |_, entries| {
        throttle((0..entries.len()).filter(|i| i % 2 == 1))
    });
    let mut config = config(&dir);
    config.records_per_shard_per_sec = 1_000;
    let records: Vec<Record> = (0..1_000)
        .map(|i| record(i, &format!("public.t:{i}"), 10))
        .collect();
    let run = run(fake.client.clone(), config, records, usize::MAX).await;
    run.assert_all_done_once();
    let sizes: Vec<usize> = fake.calls().iter().map(Vec::len).collect();
    assert_eq!(sizes[0], 200, "a full burst first: {sizes:?}");
    // After a one-second window (about six calls of a full 200-record
    // burst) with half refused, the lane sends about what was accepted plus
    // headroom (0.5 * 1.1 + 0.02 of 200 = 114).
    let big = sizes.iter().filter(|&&n| n > 120).count();
    assert!(big <= 8, "the lane did not slow down: {sizes:?}");
    assert!(sizes.iter().any(|&n| (60..=120).contains(&n)), "{sizes:?}");
}

#[tokio::test]
async fn random_refusals_cost_about_their_fraction() {
    let dir = tempfile::tempdir().unwrap();
    // About 10% of the entries of every call refused, spread pseudo-randomly.
    let fake = Fake::new(1, None, |call, entries| {
        throttle((0..entries.len()).filter(|&i| randomly_refused(call, i)))
    });
    let config = quick(&dir);
    let records: Vec<Record> = (0..8_000)
        .map(|i| record(i, &format!("public.t:{}", i % 1_000), 10))
        .collect();
    let run = run(fake.client.clone(), config, records, 500).await;
    run.assert_all_done_once();
    let calls = fake.calls();
    // Each call re-sends the refused entries (and the later entries of
    // their keys) in front of new ones; the calls stay full: the rate
    // factor stays near 1 (the old rule cut them to 1/64 of the burst,
    // 31 records). Only the tail, once nothing new is queued, is short.
    let full = calls.iter().filter(|c| c.len() == 500).count();
    assert!(
        full >= 8_000 / 500 - 1,
        "{full} of {} calls full: {:?}",
        calls.len(),
        calls.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert_last_copies_in_order(&calls, |c, i| !randomly_refused(c, i));
}

#[tokio::test]
async fn failed_whole_calls_are_retried() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |call, _| match call {
        0 => Reply::Error(PutRecordsError::ProvisionedThroughputExceededException(
            ProvisionedThroughputExceededException::builder()
                .message("rate exceeded")
                .build(),
        )),
        1 => Reply::Status(503),
        2 => Reply::Error(PutRecordsError::InternalFailureException(
            InternalFailureException::builder().message("oops").build(),
        )),
        _ => Reply::Accept,
    });
    let records: Vec<Record> = (0..20)
        .map(|i| record(i, &format!("public.t:{}", i % 3), 10))
        .collect();
    let run = run(fake.client.clone(), config(&dir), records, usize::MAX).await;
    run.assert_all_done_once();
    let calls = fake.calls();
    assert_eq!(calls.len(), 4);
    for call in &calls {
        assert_eq!(
            seqs(call),
            (0..20).collect::<Vec<_>>(),
            "the same batch each time"
        );
    }
}

#[tokio::test]
async fn records_too_large_for_the_stream_are_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    // A stream with a 1 KiB maximum record size.
    let fake = Fake::new(1, Some(1), |_, _| Reply::Accept);
    let dead_letters = run_dead_letter_records(&fake, config(&dir)).await;
    let sent: Vec<u64> = fake.calls().iter().flat_map(|c| seqs(c)).collect();
    assert_eq!(sent, [0, 2]);

    let (text, lines) = dead_letter_lines(&dead_letters);
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["stream"], STREAM);
    assert_eq!(lines[0]["partition_key"], "public.t:2");
    assert_eq!(lines[0]["envelope"]["seq"], 1);
    assert_eq!(lines[0]["reason"], "too_large");
    assert_eq!(lines[0]["size"], 2_000 + 18 + "public.t:2".len());
    assert_eq!(lines[0]["limit"], 1024);
    assert_eq!(lines[0]["attempts"], 0);
    let error = lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains("exceeds") && error.contains("1024"),
        "{error}"
    );
    assert_eq!(lines[1]["envelope"]["seq"], 3);
    assert_eq!(lines[1]["reason"], "invalid_partition_key");
    assert!(
        lines[1]["error"]
            .as_str()
            .unwrap()
            .contains("partition key is empty")
    );
}

#[tokio::test]
async fn an_entry_refused_every_time_is_dead_lettered_after_the_bounded_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, entries| {
        let failures: Vec<_> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.seq == 5)
            .map(|(i, _)| (i, "InvalidArgumentException"))
            .collect();
        if failures.is_empty() {
            Reply::Accept
        } else {
            Reply::Fail(failures)
        }
    });
    let config = config(&dir); // max_rejections = 3
    let dead_letters = config.dead_letter_dir.join("dead-letters.jsonl");
    let key_of = |i: u64| {
        if i == 5 || i == 7 {
            "public.t:A".to_owned()
        } else {
            format!("public.t:{i}")
        }
    };
    let records: Vec<Record> = (0..10).map(|i| record(i, &key_of(i), 10)).collect();
    let run = run(fake.client.clone(), config, records, usize::MAX).await;
    run.assert_all_done_once();

    let calls = fake.calls();
    assert_eq!(seqs(&calls[0]), (0..10).collect::<Vec<_>>());
    assert_eq!(seqs(&calls[1]), [5, 7], "7 is held back with 5");
    assert_eq!(seqs(&calls[2]), [5, 7]);
    assert_eq!(calls.len(), 3, "5 is given up after 3 tries");

    let (text, lines) = dead_letter_lines(&dead_letters);
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["envelope"]["seq"], 5);
    assert_eq!(lines[0]["reason"], "rejected");
    assert_eq!(lines[0]["attempts"], 3);
    let error = lines[0]["error"].as_str().unwrap();
    assert!(
        error.contains("3 times") && error.contains("InvalidArgumentException"),
        "{error}"
    );
}

#[tokio::test]
async fn dead_letters_go_to_the_dead_letter_stream_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    // A 1 KiB stream: seq 1 is too large for the dead-letter stream too.
    let fake = Fake::new(1, Some(1), |_, entries| {
        let failures: Vec<_> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.seq == 2)
            .map(|(i, _)| (i, "InvalidArgumentException"))
            .collect();
        Reply::Fail(failures)
    });
    let mut config = config(&dir);
    config.dead_letter_stream = Some(DLQ_STREAM.to_owned());
    let file = run_dead_letter_records(&fake, config).await;

    // The rejected record and the one with an empty key went to the
    // stream (after a throttled first try), as entries of the file's shape.
    let sent = fake.dead_letter_records.lock().unwrap().clone();
    let entries: Vec<(String, serde_json::Value)> = sent
        .iter()
        .map(|(key, data)| (key.clone(), serde_json::from_slice(data).unwrap()))
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let by_seq = |seq: u64| {
        entries
            .iter()
            .find(|(_, e)| e["envelope"]["seq"] == seq)
            .unwrap_or_else(|| panic!("seq {seq} in {entries:?}"))
    };
    let (key, rejected) = by_seq(2);
    assert_eq!(key, "public.t:3");
    assert_eq!(rejected["reason"], "rejected");
    assert_eq!(rejected["attempts"], 3);
    let (key, keyless) = by_seq(3);
    assert_eq!(
        key, "dead-letter",
        "an empty key cannot be used for the stream"
    );
    assert_eq!(keyless["reason"], "invalid_partition_key");

    // The stream cannot hold the too-large one: it is in the file.
    let (text, lines) = dead_letter_lines(&file);
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["envelope"]["seq"], 1);
    assert_eq!(lines[0]["reason"], "too_large");
}

/// The dead-letter file: its text and its lines as JSON.
fn dead_letter_lines(path: &std::path::Path) -> (String, Vec<serde_json::Value>) {
    let text = std::fs::read_to_string(path).unwrap();
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, lines)
}

/// The four records of the dead-letter tests: seq 1 is 2 KB, seq 3 has an
/// empty partition key.
fn dead_letter_records() -> Vec<Record> {
    vec![
        record(0, "public.t:1", 10),
        record(1, "public.t:2", 2_000),
        record(2, "public.t:3", 10),
        record(3, "", 10),
    ]
}

#[test]
fn the_writer_records_its_metrics() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};

    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let dir = tempfile::tempdir().unwrap();
    // A 1 KiB stream (seq 1 is too large); the first call refuses two entries.
    let fake = Fake::new(1, Some(1), |call, _| {
        if call == 0 {
            Reply::Fail(vec![
                (0, "ProvisionedThroughputExceededException"),
                (1, "InternalFailure"),
            ])
        } else {
            Reply::Accept
        }
    });
    metrics::with_local_recorder(&recorder, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let records = (0..10)
                    .map(|i| record(i, &format!("public.t:{i}"), if i == 1 { 2_000 } else { 10 }))
                    .collect();
                run(fake.client.clone(), config(&dir), records, usize::MAX)
                    .await
                    .assert_all_done_once();
            });
    });
    let mut seen: HashMap<String, f64> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let (_, key) = key.into_parts();
        let mut name = key.name().to_owned();
        for label in key.labels() {
            name.push_str(&format!(",{}={}", label.key(), label.value()));
        }
        let value = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        };
        seen.insert(name, value);
    }
    let get = |name: &str| {
        *seen
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {seen:#?}"))
    };
    let stream = format!("stream={STREAM}");
    use crate::metrics as m;
    assert_eq!(get(&format!("{},{stream}", m::RECORDS_SENT)), 9.0);
    assert!(get(&format!("{},{stream}", m::BYTES_SENT)) > 9.0 * 20.0);
    assert_eq!(
        get(&format!(
            "{},{stream},code=ProvisionedThroughputExceededException",
            m::ENTRIES_REFUSED
        )),
        1.0
    );
    assert_eq!(
        get(&format!(
            "{},{stream},code=InternalFailure",
            m::ENTRIES_REFUSED
        )),
        1.0
    );
    assert_eq!(get(&format!("{},{stream},kind=entry", m::RETRIES)), 2.0);
    assert_eq!(
        get(&format!("{},{stream},reason=too_large", m::DEAD_LETTERS)),
        1.0
    );
    assert_eq!(get(&format!("{},{stream}", m::PUT_RECORDS_SECONDS)), 2.0);
    assert_eq!(get(&format!("{},{stream}", m::LIMITER_WAIT_SECONDS)), 2.0);
    let shard = "shard=shardId-000000000000";
    assert_eq!(get(&format!("{},{stream},{shard}", m::RATE_FACTOR)), 1.0);
    assert!(seen.contains_key(&format!("{},{stream},{shard}", m::QUEUED_RECORDS)));
    assert!(seen.contains_key(&format!("{},{stream},{shard}", m::QUEUED_BYTES)));
}

/// Runs the sink over [`dead_letter_records`], checks every record was
/// reported done once, and returns the path of the dead-letter file.
async fn run_dead_letter_records(fake: &Fake, config: KinesisSinkConfig) -> std::path::PathBuf {
    let file = config.dead_letter_dir.join("dead-letters.jsonl");
    run(
        fake.client.clone(),
        config,
        dead_letter_records(),
        usize::MAX,
    )
    .await
    .assert_all_done_once();
    file
}

/// Runs the sink over `records` for `window`, then stops it; returns the calls seen.
async fn calls_within(
    fake: &Fake,
    config: KinesisSinkConfig,
    records: Vec<Record>,
    window: Duration,
) -> Vec<Vec<Entry>> {
    let tracker = Arc::new(AckTracker::new(0));
    let acks = Acks::new(tracker, Arc::new(Budget::new(1 << 30)));
    let sink = KinesisSink::new(fake.client.clone(), config).await.unwrap();
    let (sender, input) = mpsc::channel(1);
    sender.send(records).await.unwrap();
    let outcome = tokio::time::timeout(window, sink.run(input, acks)).await;
    assert!(
        outcome.is_err(),
        "the sink cannot be done yet (input still open)"
    );
    fake.calls()
}

#[tokio::test]
async fn the_record_quota_paces_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let mut config = config(&dir);
    config.records_per_shard_per_sec = 20;
    config.share = 0.5; // 10 records/s
    let records: Vec<Record> = (0..1_000)
        .map(|i| record(i, &format!("public.t:{i}"), 10))
        .collect();
    let calls = calls_within(&fake, config, records, Duration::from_millis(1_500)).await;
    let sent: usize = calls.iter().map(Vec::len).sum();
    assert!(calls.iter().all(|c| c.len() <= 2), "a call above the burst");
    // 10/s for 1.5 s, from an empty limiter, is 15; without the quota all
    // 1,000 go.
    assert!(
        (10..=20).contains(&sent),
        "{sent} records in 1.5 s at 10 records/s"
    );
    assert!(calls.len() <= 10, "{} calls", calls.len());
}

#[tokio::test]
async fn the_byte_quota_paces_the_calls() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let mut config = config(&dir);
    config.bytes_per_shard_per_sec = 2_000;
    let records: Vec<Record> = (0..1_000)
        .map(|i| record(i, &format!("public.t:{i:04}"), 170))
        .collect();
    let calls = calls_within(&fake, config, records, Duration::from_millis(1_500)).await;
    let call_bytes: Vec<usize> = calls
        .iter()
        .map(|c| c.iter().map(|e| e.bytes).sum())
        .collect();
    assert!(
        call_bytes.iter().all(|&b| b <= 400),
        "a call above the burst: {call_bytes:?}"
    );
    // 2,000 B/s for 1.5 s, from an empty limiter, is 3,000 bytes.
    let bytes: usize = call_bytes.iter().sum();
    assert!(
        (2_000..=4_000).contains(&bytes),
        "{bytes} bytes in 1.5 s at 2,000 B/s"
    );
}

#[tokio::test]
async fn a_missing_stream_stops_the_sink_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(1, None, |_, _| Reply::Accept);
    let mut records = vec![record(0, "public.t:1", 10)];
    records[0].stream = "no-such-stream".into();
    let run = run(fake.client.clone(), config(&dir), records, usize::MAX).await;
    match &run.result {
        Err(KinesisError::StreamNotFound { stream, .. }) => assert_eq!(stream, "no-such-stream"),
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    assert!(
        run.result
            .unwrap_err()
            .to_string()
            .contains("`no-such-stream`")
    );
    assert!(
        !run.tracker.is_drained(),
        "nothing was written, nothing is done"
    );
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn a_permanent_error_stops_the_sink_while_input_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::new(2, None, |_, _| {
        Reply::Error(PutRecordsError::AccessDeniedException(
            AccessDeniedException::builder()
                .message("not allowed")
                .build(),
        ))
    });
    let tracker = Arc::new(AckTracker::new(0));
    let budget = Arc::new(Budget::new(1 << 20));
    let acks = Acks::new(tracker.clone(), budget);
    tracker.issued(10);
    let sink = KinesisSink::new(fake.client.clone(), config(&dir))
        .await
        .unwrap();
    let (sender, input) = mpsc::channel(1);
    let records: Vec<Record> = (0..10)
        .map(|i| record(i, &format!("public.t:{i}"), 10))
        .collect();
    sender.send(records).await.unwrap();
    // `sender` stays alive: the error must not wait for the input to close.
    let result = tokio::time::timeout(Duration::from_secs(10), sink.run(input, acks))
        .await
        .expect("the sink stops promptly");
    match result {
        Err(KinesisError::Permanent {
            operation, stream, ..
        }) => {
            assert_eq!(operation, "PutRecords");
            assert_eq!(stream, STREAM);
        }
        other => panic!("expected a permanent error, got {other:?}"),
    }
    assert_eq!(tracker.in_flight(), 10, "no record was reported done");
    drop(sender);
}

/// A transaction of `records` records spread over the shards by key, each
/// tagged with one transaction (as a source tags streamed changes).
fn transaction(records: u64) -> Vec<Record> {
    use tributary_envelope::transaction::{TxRef, TxTag};
    let tag = Arc::new(TxTag {
        connector: "postgres".into(),
        name: "shop".into(),
        db: "shop".into(),
        major: 0x100,
        tx_id: "7".into(),
        commit_ts: None,
        extra: Vec::new(),
    });
    (0..records)
        .map(|i| {
            let table: Arc<str> = if i % 2 == 0 { "public.a" } else { "public.b" }.into();
            let mut record = record(i, &format!("{table}:{i}"), 10);
            record.tx = Some(TxRef {
                tag: tag.clone(),
                table,
            });
            record
        })
        .collect()
}

#[tokio::test]
async fn a_commit_is_acknowledged_only_once_its_end_markers_are_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let tracker = Arc::new(AckTracker::new(0));
    let feed = tracker.commit_feed();
    // Every end marker is refused in its first two calls; each call notes
    // whether it carries an end and what was acknowledged then.
    let seen = Arc::new(Mutex::new((0usize, Vec::<(bool, u64)>::new())));
    let (log, observed) = (seen.clone(), tracker.clone());
    let fake = Fake::new(2, None, move |_, entries| {
        let mut log = log.lock().unwrap();
        let ends: Vec<usize> = (0..entries.len()).filter(|&i| entries[i].end).collect();
        let refuse = !ends.is_empty() && log.0 < 2;
        log.0 += usize::from(refuse);
        log.1.push((!ends.is_empty(), observed.acked()));
        if refuse {
            throttle(ends.into_iter())
        } else {
            Reply::Accept
        }
    });
    let records = transaction(20);
    let budget = Arc::new(Budget::new(1 << 20));
    for record in &records {
        budget.acquire(record.weight()).await;
    }
    let mut config = config(&dir);
    config.format = tributary_envelope::Format::Tributary;
    let sink = KinesisSink::new(fake.client.clone(), config)
        .await
        .unwrap()
        .with_transaction_markers(feed);
    let (sender, input) = mpsc::channel(4);
    let acks = Acks::new(tracker.clone(), budget.clone());
    let source = async {
        sender.send(records).await.unwrap();
        tracker.commit(20, END_POSITION);
        drop(sender);
    };
    let (_, result) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(source, sink.run(input, acks))
    })
    .await
    .expect("the sink finished within a minute");
    result.unwrap();
    assert_eq!(tracker.acked(), END_POSITION);
    assert!(tracker.is_drained());
    assert_eq!(
        budget.available(),
        budget.capacity(),
        "markers hold no budget"
    );

    let (refusals, log) = seen.lock().unwrap().clone();
    assert_eq!(refusals, 2, "{log:?}");
    assert!(
        log.iter().all(|&(end, acked)| !end || acked == 0),
        "acknowledged while an end marker was undelivered: {log:?}"
    );
    // Per shard, in the last-copy sense: begin, the events, end.
    let calls = fake.calls();
    for shard in 0..2 {
        let landed: Vec<&Entry> = calls
            .iter()
            .flatten()
            .filter(|e| e.shard == shard)
            .collect();
        let last = |pred: &dyn Fn(&Entry) -> bool| landed.iter().rposition(|e| pred(e)).unwrap();
        let end = last(&|e| e.end);
        let begin = last(&|e| e.seq == u64::MAX && !e.end);
        let events = landed.iter().filter(|e| e.seq != u64::MAX);
        assert!(events.count() > 0, "20 keys over 2 shards");
        for seq in 0..20 {
            if let Some(at) = landed.iter().rposition(|e| e.seq == seq) {
                assert!(
                    begin < at && at < end,
                    "shard {shard}: event {seq} at {at}, begin {begin}, end {end}"
                );
            }
        }
    }
}

//! The Kinesis sink: the dispatcher that routes records to lanes, and the
//! [`Sink`] implementation that the pipeline runs.
//!
//! The dispatcher reads batches from the pipeline in source order. The
//! first record for a stream makes it read the stream (DescribeStreamSummary,
//! ListShards) and start one lane per open shard; every record then goes to
//! the lane of its partition key's shard.
//!
//! Resharding: the shard map is read again every minute, and at once when a
//! lane sees Kinesis put a record on a shard other than its own (after a
//! split or merge PutRecords routes by hash key to the new shards). When the
//! map changed, the old lanes are closed and drained before lanes for the
//! new map start: a key's records never sit in two lanes at once, so its
//! old records land before its new ones, and a truncate's copies go to
//! every shard open now. Lane queues are unbounded: what
//! bounds memory is the pipeline's byte budget, which a record holds until
//! it is reported done.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use aws_sdk_kinesis::Client;
use tokio::sync::mpsc;
use tokio::task::{self, JoinError, JoinSet};
use tracing::{info, warn};
use tributary_envelope::record::Copies;
use tributary_envelope::{Acks, Record, Sink};

use crate::config::KinesisSinkConfig;
use crate::dead_letter::DeadLetterStore;
use crate::dead_letter_stream::DeadLetterStream;
use crate::error::KinesisError;
use crate::lane::{Lane, LaneSetup};
use crate::markers::{Queued, TxMarkers};
use crate::quota::LaneQuota;
use crate::retry::{Backoff, Failure, WARN_EVERY, WarnGate};
use crate::shards::{ShardMap, StreamInfo, describe_stream_classified};

/// Writes records to Kinesis Data Streams.
///
/// Keeps the [`Sink`] contract: a record is reported done once Kinesis
/// returned a sequence number for it or it was synced to the dead-letter
/// store; records of one partition key are written in order through one
/// lane, and a retried record is re-sent together with the later records of
/// its key, before anything newer of that shard; `run` returns `Ok` after the input closed
/// and every lane drained. Failures a retry can fix are retried without
/// limit (the byte budget stalls the source meanwhile); anything else ends
/// `run` with a [`KinesisError`] and leaves the undone records
/// unacknowledged, for the source to send again after a restart.
#[derive(Debug)]
pub struct KinesisSink {
    client: Client,
    config: KinesisSinkConfig,
    dead_letters: Arc<DeadLetterStore>,
    /// The tracker's commit feed when transaction markers are on.
    commit_feed: Option<mpsc::UnboundedReceiver<u64>>,
}

impl KinesisSink {
    /// Validates `config` and opens the dead-letter store (creating its
    /// directory). No Kinesis call is made until the first record arrives.
    pub async fn new(client: Client, config: KinesisSinkConfig) -> Result<Self, KinesisError> {
        config.validate()?;
        let mut dead_letters = DeadLetterStore::open(&config.dead_letter_dir).await?;
        if let Some(stream) = &config.dead_letter_stream {
            dead_letters = dead_letters.with_stream(DeadLetterStream::new(
                client.clone(),
                stream.clone(),
                config.retry,
            ));
        }
        let dead_letters = Arc::new(dead_letters);
        Ok(Self {
            client,
            config,
            dead_letters,
            commit_feed: None,
        })
    }

    /// Writes transaction markers (`sink.transaction_markers`) in
    /// `config.format` for the commits announced on `feed`
    /// ([`tributary_envelope::AckTracker::commit_feed`] of the tracker the
    /// sink reports to), and confirms each commit once its markers are
    /// delivered. See `markers.rs`.
    pub fn with_transaction_markers(mut self, feed: mpsc::UnboundedReceiver<u64>) -> Self {
        self.commit_feed = Some(feed);
        self
    }

    /// Where dead letters go.
    pub fn dead_letter_path(&self) -> &Path {
        self.dead_letters.path()
    }
}

impl Sink for KinesisSink {
    type Error = KinesisError;

    fn run(
        self,
        input: mpsc::Receiver<Vec<Record>>,
        acks: Acks,
    ) -> impl Future<Output = Result<(), KinesisError>> + Send {
        Dispatcher::new(self, acks).run(input)
    }
}

/// How often a stream's shard map is read again when nothing says it changed.
const SHARD_REFRESH: Duration = Duration::from_secs(60);
/// DescribeStreamSummary + ListShards rounds per second, all streams
/// together: well under Kinesis' control-plane quotas (DescribeStreamSummary
/// 20/s per account, ListShards 1,000/s per stream), which other tools of
/// the account share.
const CONTROL_CALLS_PER_SEC: u32 = 2;

/// The lanes of one stream.
struct StreamLanes {
    shards: ShardMap,
    lanes: Vec<mpsc::UnboundedSender<Record>>,
    /// The lanes' tasks, to wait for when the shard map changes.
    tasks: Vec<task::Id>,
    /// Set by a lane when Kinesis put a record on a shard other than the
    /// lane's: the map changed (a split or merge).
    stale: Arc<AtomicBool>,
    /// When the map was last read.
    read_at: Instant,
}

/// Routes records to lanes and watches the lanes.
struct Dispatcher {
    sink: KinesisSink,
    acks: Acks,
    streams: HashMap<Arc<str>, StreamLanes>,
    tasks: JoinSet<Result<(), KinesisError>>,
    warnings: WarnGate,
    /// Paces DescribeStreamSummary + ListShards.
    control: DefaultDirectRateLimiter,
    /// Transaction markers, when on.
    markers: Option<TxMarkers>,
}

impl Dispatcher {
    fn new(mut sink: KinesisSink, acks: Acks) -> Self {
        let markers = sink
            .commit_feed
            .take()
            .map(|feed| TxMarkers::new(sink.config.format, feed));
        Self {
            markers,
            sink,
            acks,
            streams: HashMap::new(),
            tasks: JoinSet::new(),
            warnings: WarnGate::new(WARN_EVERY),
            control: RateLimiter::direct(Quota::per_second(
                NonZeroU32::new(CONTROL_CALLS_PER_SEC).expect("a constant above zero"),
            )),
        }
    }

    async fn run(mut self, mut input: mpsc::Receiver<Vec<Record>>) -> Result<(), KinesisError> {
        loop {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next() => lane_result(joined)?,
                end_seq = next_commit(&mut self.markers) => {
                    if let Some(markers) = &mut self.markers {
                        markers.announce(end_seq);
                    }
                    self.queue_ends(None).await?;
                }
                batch = input.recv() => match batch {
                    Some(records) => self.dispatch(records).await?,
                    None => break,
                },
            }
        }
        // The source committed everything it sent before closing the input.
        self.queue_ends(None).await?;
        info!(
            lanes = self.tasks.len(),
            "kinesis sink input closed; draining the lanes"
        );
        // Dropping the senders lets each lane finish once its queue is empty.
        self.streams.clear();
        while let Some(joined) = self.tasks.join_next().await {
            lane_result(joined)?;
        }
        info!("kinesis sink drained");
        Ok(())
    }

    async fn dispatch(&mut self, records: Vec<Record>) -> Result<(), KinesisError> {
        self.refresh_due_maps().await?;
        for record in records {
            self.queue_ends(Some(record.seq)).await?;
            if !self.streams.contains_key(&*record.stream) {
                self.open_stream(record.stream.clone()).await?;
            }
            let stream = &self.streams[&*record.stream];
            if let Some(markers) = &mut self.markers {
                let starts: Vec<u128> = if record.fan_out {
                    stream.shards.shards().iter().map(|s| s.start).collect()
                } else {
                    vec![stream.shards.shards()[lane_of(stream, &record)].start]
                };
                let begins = markers.route(&record, &starts);
                if !self.queue(begins) {
                    return Err(self.lane_failure().await);
                }
            }
            let stream = &self.streams[&*record.stream];
            let sent = if record.fan_out {
                fan_out(stream, &record)
            } else {
                stream.lanes[lane_of(stream, &record)].send(record).is_ok()
            };
            if !sent {
                // A lane only stops early on a fatal error: report it.
                return Err(self.lane_failure().await);
            }
        }
        self.queue_ends(None).await
    }

    /// Queues the `end` markers of the announced commits whose records were
    /// all routed before `seq` (all routed records when `None`).
    async fn queue_ends(&mut self, seq: Option<u64>) -> Result<(), KinesisError> {
        let Some(markers) = &mut self.markers else {
            return Ok(());
        };
        let ends = markers.ends_before(seq, self.acks.tracker());
        if self.queue(ends) {
            Ok(())
        } else {
            Err(self.lane_failure().await)
        }
    }

    /// Queues markers on the lanes of their shards' first hash keys; false
    /// when a lane has stopped.
    fn queue(&self, markers: Vec<Queued>) -> bool {
        markers.into_iter().all(|(stream, start, marker)| {
            let Some(lanes) = self.streams.get(&stream) else {
                // Not reachable: a marker's stream had a record routed.
                return false;
            };
            lanes.lanes[lanes.shards.lane_of_hash(start)]
                .send(marker)
                .is_ok()
        })
    }

    /// Reads again the shard maps that a lane found stale or that are due,
    /// and re-routes the streams whose map changed.
    async fn refresh_due_maps(&mut self) -> Result<(), KinesisError> {
        let due: Vec<Arc<str>> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                s.stale.load(Ordering::Relaxed) || s.read_at.elapsed() >= SHARD_REFRESH
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in due {
            let info = self.read_stream(&name).await?;
            let stream = self.streams.get_mut(&name).expect("listed above");
            stream.read_at = Instant::now();
            stream.stale.store(false, Ordering::Relaxed);
            if info.shards != stream.shards {
                self.reroute(name, info).await?;
            }
        }
        Ok(())
    }

    /// The shard map changed: close the old lanes, wait until they have
    /// delivered everything queued (so no key has records in an old and a
    /// new lane at once, and a key's old records land first), then start
    /// lanes for the new map. New records wait meanwhile.
    async fn reroute(&mut self, name: Arc<str>, info: StreamInfo) -> Result<(), KinesisError> {
        let old = self.streams.remove(&name).expect("a stream being re-read");
        info!(
            stream = %name, old_shards = old.lanes.len(), new_shards = info.shards.shards().len(),
            "kinesis shard map changed; draining the old lanes before routing to the new shards"
        );
        drop(old.lanes);
        let mut waiting: HashSet<task::Id> = old.tasks.into_iter().collect();
        while !waiting.is_empty() {
            match self.tasks.join_next_with_id().await {
                Some(Ok((id, result))) => {
                    result?;
                    waiting.remove(&id);
                }
                Some(Err(err)) => return Err(KinesisError::Task(err)),
                None => break,
            }
        }
        self.start_lanes(name, info);
        Ok(())
    }

    /// Reads the stream and starts its lanes.
    async fn open_stream(&mut self, name: Arc<str>) -> Result<(), KinesisError> {
        let info = self.read_stream(&name).await?;
        self.start_lanes(name, info);
        Ok(())
    }

    /// DescribeStreamSummary and ListShards, paced by the control-plane
    /// limiter, retrying what a retry can fix.
    async fn read_stream(&mut self, name: &str) -> Result<StreamInfo, KinesisError> {
        let mut backoff = Backoff::new(self.sink.config.retry);
        loop {
            self.control.until_ready().await;
            match describe_stream_classified(&self.sink.client, name).await {
                Ok(info) => return Ok(info),
                Err((Failure::Permanent, err)) => return Err(err),
                Err((_, err)) => {
                    let delay = backoff.next_delay();
                    if let Some(suppressed) = self.warnings.allow() {
                        warn!(
                            stream = %name, attempt = backoff.failures(), suppressed,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %error_chain(&err),
                            "cannot read the kinesis stream yet; retrying"
                        );
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Starts one lane per open shard of `info`.
    fn start_lanes(&mut self, name: Arc<str>, info: StreamInfo) {
        let config = &self.sink.config;
        let stale = Arc::new(AtomicBool::new(false));
        let mut lanes = Vec::with_capacity(info.shards.shards().len());
        let mut tasks = Vec::with_capacity(info.shards.shards().len());
        for shard in info.shards.shards() {
            let (sender, receiver) = mpsc::unbounded_channel();
            let setup = LaneSetup {
                client: self.sink.client.clone(),
                stream: name.clone(),
                shard_id: shard.shard_id.as_str().into(),
                max_record_bytes: info.max_record_bytes,
                aggregation: config.aggregation,
                max_in_flight: config.max_in_flight_per_shard,
                quota: LaneQuota::new(config.lane_records_per_sec(), config.lane_bytes_per_sec()),
                retry: config.retry,
                dead_letters: self.sink.dead_letters.clone(),
                acks: self.acks.clone(),
                stale: stale.clone(),
            };
            tasks.push(self.tasks.spawn(Lane::new(setup, receiver).run()).id());
            lanes.push(sender);
        }
        info!(
            stream = %name, shards = lanes.len(), max_record_bytes = info.max_record_bytes,
            records_per_sec_per_shard = config.lane_records_per_sec(),
            bytes_per_sec_per_shard = config.lane_bytes_per_sec(),
            "kinesis stream opened"
        );
        self.streams.insert(
            name,
            StreamLanes {
                shards: info.shards,
                lanes,
                tasks,
                stale,
                read_at: Instant::now(),
            },
        );
    }

    /// The error of the lane that stopped.
    async fn lane_failure(&mut self) -> KinesisError {
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(err) = lane_result(joined) {
                return err;
            }
        }
        // Not reachable: a lane's sender only fails once its task ended, and
        // a lane ends early only with an error. Stay loud all the same.
        KinesisError::Stream {
            stream: String::new(),
            message: "a lane stopped without an error".to_owned(),
        }
    }
}

/// The lane a record that is not fanned out goes to.
fn lane_of(stream: &StreamLanes, record: &Record) -> usize {
    match record.explicit_hash_key {
        Some(hash) => stream.shards.lane_of_hash(hash),
        None => stream.shards.lane_of(&record.partition_key),
    }
}

/// The next commit announced to the markers (pending forever without them).
async fn next_commit(markers: &mut Option<TxMarkers>) -> u64 {
    match markers {
        Some(markers) => markers.next_commit().await,
        None => std::future::pending().await,
    }
}

/// Queues one copy of `record` on every lane, each placed on its lane's
/// shard by an explicit hash key (the shard's first hash key). Every lane
/// is FIFO, so each shard gets the copy before anything the source sent
/// after the record; the record is done when its last copy is. False when
/// a lane has stopped.
fn fan_out(stream: &StreamLanes, record: &Record) -> bool {
    let copies = Copies::new(stream.lanes.len());
    stream
        .shards
        .shards()
        .iter()
        .zip(&stream.lanes)
        .all(|(shard, lane)| lane.send(record.copy_for(shard.start, &copies)).is_ok())
}

fn lane_result(joined: Result<Result<(), KinesisError>, JoinError>) -> Result<(), KinesisError> {
    joined.map_err(KinesisError::Task)?
}

/// An error with its causes, for a log line.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

//! The Kinesis sink: the dispatcher that routes records to lanes, and the
//! [`Sink`] implementation that the pipeline runs.
//!
//! The dispatcher reads batches from the pipeline in source order. The
//! first record for a stream makes it read the stream (DescribeStreamSummary,
//! ListShards) and start one lane per open shard; every record then goes to
//! the lane of its partition key's shard. Lane queues are unbounded: what
//! bounds memory is the pipeline's byte budget, which a record holds until
//! it is reported done.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use aws_sdk_kinesis::Client;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tracing::{info, warn};
use tributary_envelope::record::Copies;
use tributary_envelope::{Acks, Record, Sink};

use crate::config::KinesisSinkConfig;
use crate::dead_letter::DeadLetterStore;
use crate::error::KinesisError;
use crate::lane::{Lane, LaneSetup};
use crate::quota::LaneQuota;
use crate::retry::{Backoff, Failure, WARN_EVERY, WarnGate};
use crate::shards::{ShardMap, describe_stream_classified};

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
}

impl KinesisSink {
    /// Validates `config` and opens the dead-letter store (creating its
    /// directory). No Kinesis call is made until the first record arrives.
    pub async fn new(client: Client, config: KinesisSinkConfig) -> Result<Self, KinesisError> {
        config.validate()?;
        let dead_letters = Arc::new(DeadLetterStore::open(&config.dead_letter_dir).await?);
        Ok(Self {
            client,
            config,
            dead_letters,
        })
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

/// The lanes of one stream.
struct StreamLanes {
    shards: ShardMap,
    lanes: Vec<mpsc::UnboundedSender<Record>>,
}

/// Routes records to lanes and watches the lanes.
struct Dispatcher {
    sink: KinesisSink,
    acks: Acks,
    streams: HashMap<Arc<str>, StreamLanes>,
    tasks: JoinSet<Result<(), KinesisError>>,
    warnings: WarnGate,
}

impl Dispatcher {
    fn new(sink: KinesisSink, acks: Acks) -> Self {
        Self {
            sink,
            acks,
            streams: HashMap::new(),
            tasks: JoinSet::new(),
            warnings: WarnGate::new(WARN_EVERY),
        }
    }

    async fn run(mut self, mut input: mpsc::Receiver<Vec<Record>>) -> Result<(), KinesisError> {
        loop {
            tokio::select! {
                biased;
                Some(joined) = self.tasks.join_next() => lane_result(joined)?,
                batch = input.recv() => match batch {
                    Some(records) => self.dispatch(records).await?,
                    None => break,
                },
            }
        }
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
        for record in records {
            if !self.streams.contains_key(&*record.stream) {
                self.open_stream(record.stream.clone()).await?;
            }
            let stream = &self.streams[&*record.stream];
            let sent = if record.fan_out {
                fan_out(stream, &record)
            } else {
                let lane = match record.explicit_hash_key {
                    Some(hash) => stream.shards.lane_of_hash(hash),
                    None => stream.shards.lane_of(&record.partition_key),
                };
                stream.lanes[lane].send(record).is_ok()
            };
            if !sent {
                // A lane only stops early on a fatal error: report it.
                return Err(self.lane_failure().await);
            }
        }
        Ok(())
    }

    /// Reads the stream and starts its lanes, retrying what a retry can fix.
    async fn open_stream(&mut self, name: Arc<str>) -> Result<(), KinesisError> {
        let mut backoff = Backoff::new(self.sink.config.retry);
        let info = loop {
            match describe_stream_classified(&self.sink.client, &name).await {
                Ok(info) => break info,
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
        };
        let config = &self.sink.config;
        let mut lanes = Vec::with_capacity(info.shards.shards().len());
        for shard in info.shards.shards() {
            let (sender, receiver) = mpsc::unbounded_channel();
            let setup = LaneSetup {
                client: self.sink.client.clone(),
                stream: name.clone(),
                shard_id: shard.shard_id.as_str().into(),
                max_record_bytes: info.max_record_bytes,
                quota: LaneQuota::new(config.lane_records_per_sec(), config.lane_bytes_per_sec()),
                retry: config.retry,
                dead_letters: self.sink.dead_letters.clone(),
                acks: self.acks.clone(),
            };
            self.tasks.spawn(Lane::new(setup, receiver).run());
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
            },
        );
        Ok(())
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

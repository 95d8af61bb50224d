//! A test-only Kinesis endpoint for the latency benchmark: it answers
//! PutRecords for one stream itself, at once, and writes down when each
//! entry reached it.
//!
//! kinesalite is one node process that serializes every PutRecords of a
//! stream behind one lock: at a few thousand records per second its own
//! queueing is most of a record's latency, whatever the client does (a
//! bare client that does nothing but send got a p99 of 53 ms from it at
//! 5,000 records/s on 8 shards).
//! [`InstantKinesis`] takes the emulator out of that figure, so what is
//! left is the client's own: from the database's commit to the entry
//! reaching the endpoint. Every PutRecords entry for its stream is accepted
//! on the shard its partition key (or explicit hash key) maps to, with a
//! made-up increasing sequence number, and kept in memory with the time it
//! arrived; nothing is stored in kinesalite. Every other request (the
//! stream's description, ListShards, another stream's PutRecords) is
//! forwarded to kinesalite, so the client sees one consistent stream.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tributary_kinesis::{ShardMap, hash_key};

use crate::http_relay::{forward, is_put_records, plain, serve};
use crate::{StreamRecord, unix_millis};

/// The endpoint; dropping it stops it.
pub struct InstantKinesis {
    addr: SocketAddr,
    state: Arc<State>,
    accept_loop: AbortHandle,
}

struct State {
    upstream: SocketAddr,
    stream: String,
    shards: ShardMap,
    next_sequence: AtomicU64,
    /// Every entry accepted so far, in the order the calls reached it.
    received: Mutex<Vec<StreamRecord>>,
}

impl InstantKinesis {
    /// Answers PutRecords for `stream`, whose open shards are `shards`,
    /// and forwards everything else to `upstream` (kinesalite). Must be
    /// called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr, stream: &str, shards: ShardMap) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the instant kinesis endpoint to 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            stream: stream.to_owned(),
            shards,
            next_sequence: AtomicU64::new(1),
            received: Mutex::new(Vec::new()),
        });
        let accept_loop = serve(listener, state.clone(), |state, request| async move {
            Ok::<_, Infallible>(state.handle(request).await)
        });
        Ok(Self {
            addr,
            state,
            accept_loop,
        })
    }

    /// The address it listens on (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every entry accepted so far, in arrival order, with
    /// `arrival_millis` the time it reached the endpoint.
    pub fn received(&self) -> Vec<StreamRecord> {
        self.state
            .received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl Drop for InstantKinesis {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl State {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.try_handle(request).await {
            Ok(response) => response,
            Err(err) => plain(StatusCode::BAD_GATEWAY, format!("instant kinesis: {err:#}")),
        }
    }

    async fn try_handle(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        let arrived = unix_millis();
        let call: Option<Value> = is_put_records(&parts.headers)
            .then(|| serde_json::from_slice(&body))
            .transpose()?;
        let Some(call) = call.filter(|c| c["StreamName"] == self.stream.as_str()) else {
            return forward(self.upstream, Request::from_parts(parts, Full::new(body))).await;
        };
        let entries = call["Records"]
            .as_array()
            .context("PutRecords without Records")?;
        let mut accepted = Vec::with_capacity(entries.len());
        let mut answers = Vec::with_capacity(entries.len());
        for entry in entries {
            let partition_key = entry["PartitionKey"]
                .as_str()
                .context("an entry without PartitionKey")?;
            let hash = match entry["ExplicitHashKey"].as_str() {
                Some(explicit) => explicit
                    .parse::<u128>()
                    .context("an ExplicitHashKey that is no 128-bit number")?,
                None => hash_key(partition_key),
            };
            let shard_id = self.shards.shards()[self.shards.lane_of_hash(hash)]
                .shard_id
                .clone();
            let sequence_number =
                format!("{:056}", self.next_sequence.fetch_add(1, Ordering::Relaxed));
            answers.push(json!({"SequenceNumber": sequence_number, "ShardId": shard_id}));
            accepted.push(StreamRecord {
                shard_id,
                partition_key: partition_key.to_owned(),
                sequence_number,
                data: STANDARD
                    .decode(entry["Data"].as_str().context("an entry without Data")?)
                    .context("an entry whose Data is not base64")?,
                arrival_millis: Some(arrived),
            });
        }
        self.received
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(accepted);
        let body = json!({"FailedRecordCount": 0, "Records": answers}).to_string();
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-amz-json-1.1")
            .body(Full::new(Bytes::from(body)))?)
    }
}

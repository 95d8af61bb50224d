//! A test-only HTTP proxy in front of kinesalite that makes Kinesis fail the
//! way a busy or shared stream does, which no emulator does by itself.
//!
//! [`KinesisFaults`] listens on a free 127.0.0.1 port and forwards every
//! request to kinesalite, one upstream connection per request. For
//! PutRecords it draws, per entry, whether Kinesis refuses it
//! (`ProvisionedThroughputExceededException` or `InternalFailure`): refused
//! entries are taken out of the request before it is forwarded (so
//! kinesalite never stores them), and the answer gets an error entry at
//! their place, with `FailedRecordCount` counting them, exactly as a partial
//! failure of the real service looks. A fraction of whole PutRecords calls
//! can be answered HTTP 500 without being forwarded, and a fraction
//! carried out and then left without an answer, the connection closed (a
//! reset). Draws come from a
//! seeded generator: a failing run can be replayed with its seed. Other
//! operations pass through untouched. It also counts the most PutRecords
//! calls it had in flight at once (a writer's pipelining, seen from outside).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::http_relay::{forward, is_put_records, plain, serve};

/// Which faults to inject, as fractions in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// PutRecords entries refused with `ProvisionedThroughputExceededException`.
    pub throttled_entries: f64,
    /// PutRecords entries refused with `InternalFailure`.
    pub internal_failure_entries: f64,
    /// Whole PutRecords calls answered HTTP 500.
    pub failed_calls: f64,
    /// PutRecords calls whose connection is closed without an answer
    /// after kinesalite carried them out (a connection reset: the client
    /// cannot tell whether the call went through).
    pub reset_calls: f64,
    /// The generator's seed.
    pub seed: u64,
}

/// What the proxy has done so far.
#[derive(Debug, Default)]
pub struct FaultCounts {
    /// PutRecords entries refused.
    pub refused_entries: AtomicU64,
    /// PutRecords entries forwarded.
    pub forwarded_entries: AtomicU64,
    /// Whole calls failed.
    pub failed_calls: AtomicU64,
    /// Connections closed without an answer.
    pub reset_calls: AtomicU64,
    /// PutRecords calls being handled now.
    pub put_records_in_flight: AtomicU64,
    /// The most PutRecords calls handled at once so far.
    pub max_put_records_in_flight: AtomicU64,
}

/// Counts one PutRecords call in flight while alive.
struct InFlight<'c>(&'c FaultCounts);

impl<'c> InFlight<'c> {
    fn new(counts: &'c FaultCounts) -> Self {
        let now = counts.put_records_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        counts
            .max_put_records_in_flight
            .fetch_max(now, Ordering::SeqCst);
        Self(counts)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.put_records_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The proxy; dropping it stops it.
pub struct KinesisFaults {
    addr: SocketAddr,
    counts: Arc<FaultCounts>,
    accept_loop: AbortHandle,
}

impl Faults {
    /// A rough day for Kinesis: 10% of PutRecords entries refused as
    /// throttled, 2% with InternalFailure, 3% of whole calls HTTP 500.
    pub fn rough(seed: u64) -> Self {
        Self {
            throttled_entries: 0.10,
            internal_failure_entries: 0.02,
            failed_calls: 0.03,
            reset_calls: 0.0,
            seed,
        }
    }
}

impl crate::Servers {
    /// [`crate::Servers::start_tributary`] with the connector writing
    /// through a [`KinesisFaults`] proxy injecting `faults` (keep the
    /// proxy as long as the pipeline).
    pub async fn start_tributary_with_faults(
        self,
        faults: Faults,
    ) -> Result<(KinesisFaults, crate::Pipeline)> {
        let proxy = KinesisFaults::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, self.kin.port())),
            faults,
        )
        .await?;
        let extra = format!("[sink]\nendpoint_url = \"{}\"\n", proxy.endpoint());
        let pipeline = self.start_tributary(&extra).await?;
        Ok((proxy, pipeline))
    }
}

impl KinesisFaults {
    /// Starts a proxy to `upstream` (kinesalite) injecting `faults`. Must
    /// be called inside a tokio runtime.
    pub async fn start(upstream: SocketAddr, faults: Faults) -> Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the kinesis fault proxy to 127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(FaultCounts::default());
        let state = Arc::new(State {
            upstream,
            faults,
            rng: Mutex::new(StdRng::seed_from_u64(faults.seed)),
            counts: counts.clone(),
        });
        // A service error makes hyper close the connection without an
        // answer: that is how a reset is injected.
        let accept_loop = serve(listener, state, |state, request| async move {
            state.handle(request).await
        });
        Ok(Self {
            addr,
            counts,
            accept_loop,
        })
    }

    /// The address it listens on (for a proxy in front of it).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The endpoint URL to give a client instead of kinesalite's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the proxy has done so far.
    pub fn counts(&self) -> &FaultCounts {
        &self.counts
    }
}

impl Drop for KinesisFaults {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// The error that makes hyper drop a connection without answering.
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset injected by the test proxy")
    }
}

impl std::error::Error for Reset {}

struct State {
    upstream: SocketAddr,
    faults: Faults,
    rng: Mutex<StdRng>,
    counts: Arc<FaultCounts>,
}

impl State {
    async fn handle(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Reset> {
        let reset = is_put_records(request.headers()) && self.draw(self.faults.reset_calls);
        let response = match self.try_handle(request).await {
            Ok(response) => response,
            Err(err) => plain(StatusCode::BAD_GATEWAY, format!("fault proxy: {err:#}")),
        };
        if reset {
            self.counts.reset_calls.fetch_add(1, Ordering::Relaxed);
            return Err(Reset);
        }
        Ok(response)
    }

    async fn try_handle(&self, request: Request<Incoming>) -> Result<Response<Full<Bytes>>> {
        let (parts, body) = request.into_parts();
        let body = body.collect().await?.to_bytes();
        if !is_put_records(&parts.headers) {
            return forward(self.upstream, Request::from_parts(parts, Full::new(body))).await;
        }
        let _in_flight = InFlight::new(&self.counts);
        if self.draw(self.faults.failed_calls) {
            self.counts.failed_calls.fetch_add(1, Ordering::Relaxed);
            return Ok(plain(StatusCode::INTERNAL_SERVER_ERROR, String::new()));
        }
        let mut call: Value = serde_json::from_slice(&body)?;
        let entries = call["Records"]
            .as_array()
            .context("PutRecords without Records")?
            .clone();
        // Per entry: None = forwarded, Some(code) = refused.
        let refusals: Vec<Option<&str>> = entries
            .iter()
            .map(|_| {
                if self.draw(self.faults.throttled_entries) {
                    Some("ProvisionedThroughputExceededException")
                } else if self.draw(self.faults.internal_failure_entries) {
                    Some("InternalFailure")
                } else {
                    None
                }
            })
            .collect();
        let kept: Vec<Value> = entries
            .iter()
            .zip(&refusals)
            .filter(|(_, refusal)| refusal.is_none())
            .map(|(entry, _)| entry.clone())
            .collect();
        let refused = entries.len() - kept.len();
        self.counts
            .refused_entries
            .fetch_add(refused as u64, Ordering::Relaxed);
        self.counts
            .forwarded_entries
            .fetch_add(kept.len() as u64, Ordering::Relaxed);
        let mut accepted = Vec::new().into_iter();
        let mut failed = refused;
        if !kept.is_empty() {
            call["Records"] = Value::Array(kept);
            let mut parts = parts;
            // The body changed: its length is set anew from it.
            parts.headers.remove(hyper::header::CONTENT_LENGTH);
            let forwarded = Request::from_parts(parts, Full::new(Bytes::from(call.to_string())));
            let response = forward(self.upstream, forwarded).await?;
            if response.status() != StatusCode::OK {
                return Ok(response);
            }
            let answer: Value =
                serde_json::from_slice(&response.into_body().collect().await?.to_bytes())?;
            failed += answer["FailedRecordCount"].as_u64().unwrap_or(0) as usize;
            accepted = answer["Records"]
                .as_array()
                .context("PutRecords answer without Records")?
                .clone()
                .into_iter();
        }
        let records: Vec<Value> = refusals
            .iter()
            .map(|refusal| match refusal {
                Some(code) => {
                    json!({"ErrorCode": code, "ErrorMessage": "injected by the test proxy"})
                }
                None => accepted.next().unwrap_or(Value::Null),
            })
            .collect();
        let body = json!({"FailedRecordCount": failed, "Records": records}).to_string();
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/x-amz-json-1.1")
            .body(Full::new(Bytes::from(body)))?)
    }

    fn draw(&self, fraction: f64) -> bool {
        fraction > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .random_bool(fraction.min(1.0))
    }
}

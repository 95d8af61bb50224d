//! The HTTP endpoints on `[http] listen`: `/healthz`, `/readyz` and
//! `/metrics` (Prometheus text).
//!
//! Beside the dataflow, watching it: the pipeline marks the source and the
//! sink connected as they come up (a Postgres source's slot is then sampled
//! every 5 s: inactive or unreachable marks the source disconnected until
//! it streams again), and a watcher samples the ack tracker
//! every second. The pipeline counts as stalled when records are in flight
//! and the acknowledged position has not moved for `http.stall_timeout_secs`
//! (Kinesis unreachable or refusing everything, a sink stuck): then
//! `/readyz` answers 503 until deliveries move again. `/healthz` answers 200
//! as long as the process serves HTTP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tracing::{debug, info};
use tributary_envelope::AckTracker;

use crate::settings::ConfigError;

/// How often the watcher samples the ack tracker and the exporter's
/// histograms are maintained.
const TICK: Duration = Duration::from_secs(1);

/// Histogram buckets (seconds) of every `*_seconds` metric.
/// (0.15 and 0.2 tell a 150 ms round trip from one plus 50 ms.)
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What `/readyz` reports; shared with the pipeline.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    source: AtomicBool,
    sink: AtomicBool,
    /// Milliseconds since `started` of the last delivery progress (or of
    /// a moment with nothing in flight).
    progress_ms: AtomicU64,
    stall_timeout: Duration,
}

impl Health {
    /// The source is connected and streaming.
    pub fn source_connected(&self) {
        self.set_source(true);
    }

    /// Whether the source is connected (a Postgres source's slot is
    /// sampled: active means its walsender streams to us).
    pub fn set_source(&self, connected: bool) {
        self.source.store(connected, Ordering::Relaxed);
    }

    /// The sink is connected.
    pub fn sink_connected(&self) {
        self.sink.store(true, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Seconds since deliveries last moved while records were in flight.
    fn stalled_for(&self) -> Duration {
        let since = self
            .now_ms()
            .saturating_sub(self.progress_ms.load(Ordering::Relaxed));
        Duration::from_millis(since)
    }

    /// Ready: source and sink connected and not stalled.
    fn readiness(&self) -> (bool, String) {
        let source = self.source.load(Ordering::Relaxed);
        let sink = self.sink.load(Ordering::Relaxed);
        let stalled = self.stalled_for();
        let ready = source && sink && stalled < self.stall_timeout;
        let body = serde_json::json!({
            "ready": ready,
            "source_connected": source,
            "sink_connected": sink,
            "stalled_seconds": stalled.as_secs(),
            "stall_timeout_seconds": self.stall_timeout.as_secs(),
        });
        (ready, body.to_string())
    }

    /// Samples `tracker` every second: progress is a moved acknowledged
    /// position or nothing in flight.
    pub fn watch(self: &Arc<Self>, tracker: Arc<AckTracker>) {
        let health = self.clone();
        tokio::spawn(async move {
            let mut last_acked = tracker.acked();
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                let acked = tracker.acked();
                if acked != last_acked || tracker.in_flight() == 0 {
                    health.progress_ms.store(health.now_ms(), Ordering::Relaxed);
                    last_acked = acked;
                }
            }
        });
    }
}

/// Installs the Prometheus recorder, binds `listen` and serves the
/// endpoints until the process exits.
pub async fn start(listen: &str, stall_timeout: Duration) -> Result<Arc<Health>, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        key: "http.listen".into(),
        message,
    };
    let addr: SocketAddr = listen
        .parse()
        .map_err(|e| invalid(format!("`{listen}` is not HOST:PORT: {e}")))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| invalid(format!("cannot listen on {addr}: {e}")))?;
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| invalid(format!("cannot install the metrics exporter: {e}")))?;
    let health = Arc::new(Health {
        started: Instant::now(),
        source: AtomicBool::new(false),
        sink: AtomicBool::new(false),
        progress_ms: AtomicU64::new(0),
        stall_timeout,
    });
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(serve(listener, health.clone(), prometheus));
    info!(%addr, "serving /healthz, /readyz and /metrics");
    Ok(health)
}

async fn serve(listener: TcpListener, health: Arc<Health>, prometheus: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                debug!(error = %err, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        let prometheus = prometheus.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let response = respond(&health, &prometheus, request.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        tokio::spawn(async move {
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %err, "http connection ended");
            }
        });
    }
}

fn respond(health: &Health, prometheus: &PrometheusHandle, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let (ready, body) = health.readiness();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body)
        }
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            prometheus.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: /healthz, /readyz, /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    /// docs/operations.md documents exactly the metrics the code records.
    #[test]
    fn every_metric_is_documented_and_every_documented_metric_exists() {
        let doc = include_str!("../docs/operations.md");
        let names: Vec<&str> = tributary_postgres::metrics::ALL
            .iter()
            .chain(tributary_kinesis::metrics::ALL.iter())
            .chain(tributary_envelope::snapshot_progress::ALL.iter())
            .copied()
            .collect();
        for name in &names {
            assert!(
                doc.contains(&format!("| `{name}` |")),
                "{name} is not in docs/operations.md"
            );
        }
        let documented: Vec<&str> = doc
            .lines()
            .filter_map(|line| line.strip_prefix("| `tributary_"))
            .filter_map(|rest| rest.split('`').next())
            .collect();
        assert_eq!(documented.len(), names.len(), "{documented:?}");
        for name in documented {
            assert!(
                names.contains(&format!("tributary_{name}").as_str()),
                "tributary_{name} is documented but not recorded"
            );
        }
    }
}

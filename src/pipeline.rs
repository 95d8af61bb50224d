//! `tributary run`: wires source -> sink -> ack tracker -> source
//! acknowledgement, and handles graceful shutdown.
//!
//! SIGTERM or SIGINT asks the source to stop at the next transaction
//! boundary; the sink flushes; the source acknowledges the last commit; the
//! process exits 0. A second signal exits at once (nothing is lost: what was
//! not acknowledged is sent again after a restart).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use tributary_envelope::{
    AckTracker, Acks, Budget, Format, Sink, Source, SourceContext, SourceError, Stopped,
};
use tributary_kinesis::{KinesisSink, KinesisSinkConfig};

use crate::null_sink::NullSink;
use crate::settings::{RunSource, Settings, SinkKind, SourceConfig, Validated};

/// Batches queued between the source and the sink (the byte budget is the
/// real bound on memory).
const CHANNEL_BATCHES: usize = 1024;

/// How often the slot's lag is read for `tributary_source_lag_bytes`.
const LAG_SAMPLE: Duration = Duration::from_secs(5);

/// Runs the pipeline until a signal; returns the process exit code.
pub async fn run(v: Validated) -> anyhow::Result<i32> {
    let Validated {
        settings,
        source,
        region,
    } = v;
    let lag = match &source {
        SourceConfig::Postgres(config) => Some((**config).clone()),
        SourceConfig::Mysql(_) => None,
    };
    source
        .dispatch(Wiring {
            settings,
            region,
            lag,
        })
        .await
}

/// The one wiring of every source: `settings` composes the source's config
/// and calls [`RunSource::run`] with the source's type.
struct Wiring {
    settings: Settings,
    region: String,
    /// The Postgres source whose slot lag `/metrics` reports.
    lag: Option<tributary_postgres::PostgresSourceConfig>,
}

impl RunSource for Wiring {
    type Output = anyhow::Result<i32>;

    async fn run<S: Source>(self, config: S::Config) -> anyhow::Result<i32> {
        run_source::<S>(self.settings, self.region, config, self.lag).await
    }
}

async fn run_source<S: Source>(
    settings: Settings,
    region: String,
    config: S::Config,
    lag: Option<tributary_postgres::PostgresSourceConfig>,
) -> anyhow::Result<i32> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Installed before anything starts: a pipeline that cannot be stopped
    // gracefully does not start.
    let term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tokio::spawn(watch_signals(term, int, shutdown_tx));

    info!(
        version = env!("CARGO_PKG_VERSION"),
        source = %settings.source.name,
        kind = S::KIND,
        url = %crate::settings::redacted_url(&settings),
        sink = ?settings.sink.kind,
        stream = settings.sink.stream.as_deref().unwrap_or(""),
        "tributary starting"
    );
    crate::startup::check(&settings, &region).await?;
    let health = crate::http::start(
        &settings.http.listen,
        Duration::from_secs(settings.http.stall_timeout_secs),
    )
    .await?;
    let source = match S::connect(config).await {
        Ok(source) => source,
        Err(err) => return Err(source_error(err, "cannot start the source")),
    };
    health.source_connected();
    if let Some(lag) = lag {
        let health = health.clone();
        tokio::spawn(tributary_postgres::metrics::report_lag(
            lag,
            LAG_SAMPLE,
            move |streaming| health.set_source(streaming),
        ));
    }

    let tracker = Arc::new(AckTracker::new(source.resume_watermark()));
    let budget = Arc::new(Budget::new(
        usize::try_from(settings.sink.max_in_flight_bytes).unwrap_or(usize::MAX),
    ));
    let acks = Acks::new(tracker.clone(), budget.clone());
    let (tx, rx) = mpsc::channel(CHANNEL_BATCHES);
    let rx = match settings.sink.format {
        Format::Tributary => rx,
        format => crate::format_stage::spawn(
            format,
            settings.sink.transaction_markers,
            rx,
            budget.clone(),
            CHANNEL_BATCHES,
        ),
    };

    let mut sink: JoinHandle<anyhow::Result<()>> = match settings.sink.kind {
        SinkKind::Null => tokio::spawn(async move { Ok(NullSink::default().run(rx, acks).await?) }),
        SinkKind::Kinesis => {
            let mut config =
                KinesisSinkConfig::new(region.clone(), settings.state.dir.join("dead-letters"));
            config.endpoint_url = settings.sink.endpoint_url.clone();
            config.dead_letter_stream = settings.dead_letter.stream.clone();
            config.aggregation = settings.sink.aggregation;
            config.max_in_flight_per_shard = settings.sink.max_in_flight_per_shard;
            config.records_per_shard_per_sec = settings.sink.quota.records_per_shard_per_sec;
            config.bytes_per_shard_per_sec = settings.sink.quota.bytes_per_shard_per_sec;
            config.share = settings.sink.quota.share;
            config.request_timeout = Duration::from_secs(settings.sink.request_timeout_secs);
            config.connect_timeout = Duration::from_secs(settings.sink.connect_timeout_secs);
            config.format = settings.sink.format;
            if let Err(tributary_kinesis::KinesisError::Config { key, message }) = config.validate()
            {
                return Err(crate::settings::ConfigError::Invalid {
                    key: key.to_owned(),
                    message,
                }
                .into());
            }
            let client = tributary_kinesis::build_sink_client(&config).await;
            let mut kinesis = KinesisSink::new(client, config)
                .await
                .context("cannot start the kinesis sink")?;
            if settings.sink.transaction_markers {
                // Set before the source starts: every commit waits for
                // its markers.
                kinesis = kinesis.with_transaction_markers(tracker.commit_feed());
            }
            tokio::spawn(async move { Ok(kinesis.run(rx, acks).await?) })
        }
    };
    health.sink_connected();
    health.watch(tracker.clone());

    let drain = Duration::from_secs(settings.sink.drain_timeout_secs);
    let overdue = stop_overdue(shutdown_rx.clone(), drain);
    tokio::pin!(overdue);
    let (connected, mut connected_rx) = watch::channel(true);
    {
        let health = health.clone();
        tokio::spawn(async move {
            while connected_rx.changed().await.is_ok() {
                let now = *connected_rx.borrow_and_update();
                health.set_source(now);
            }
        });
    }
    let ctx = SourceContext {
        out: tx,
        tracker: tracker.clone(),
        budget,
        shutdown: shutdown_rx,
        drain_timeout: drain,
        connected,
    };
    let mut source = tokio::spawn(source.run(ctx));

    // The sink finishes first on a graceful stop (the source closes its
    // input, then waits for the final acknowledgement); a sink that fails
    // stops everything.
    let sink_result = tokio::select! {
        result = &mut source => {
            let stopped = result
                .context("source task panicked")?
                .map_err(|e| source_error(e, "the source failed"))?;
            if matches!(stopped, Stopped::TimedOut) {
                // The drain timeout is spent: the sink is stalled; what it
                // holds is unacknowledged and sent again after a restart.
                sink.abort();
                return Ok(exit_code(stopped, &tracker));
            }
            match tokio::time::timeout(Duration::from_secs(5), &mut sink).await {
                Ok(joined) => joined.context("sink task panicked")??,
                Err(_) => warn!("sink did not finish after the source stopped"),
            }
            return Ok(exit_code(stopped, &tracker));
        }
        result = &mut sink => result.context("sink task panicked")?,
        () = &mut overdue => return Ok(abort_overdue(&source, &sink, &tracker)),
    };
    if let Err(err) = sink_result {
        source.abort();
        return Err(
            err.context("the sink failed; unacknowledged changes are sent again after a restart")
        );
    }
    let stopped = tokio::select! {
        result = &mut source => result
            .context("source task panicked")?
            .map_err(|e| source_error(e, "the source failed"))?,
        () = &mut overdue => return Ok(abort_overdue(&source, &sink, &tracker)),
    };
    Ok(exit_code(stopped, &tracker))
}

/// What a stop may take beyond `sink.drain_timeout_secs` before the
/// pipeline stops the source itself. Every wait of a source watches the
/// drain timeout on its own; this is the backstop for one that does not
/// (a blocked server query, a bug), so that a SIGTERM always ends the
/// process in bounded time.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Returns once a shutdown was requested and the drain timeout plus
/// [`STOP_GRACE`] passed since.
async fn stop_overdue(mut shutdown: watch::Receiver<bool>, drain: Duration) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(drain + STOP_GRACE).await;
}

/// The source did not stop in time: both tasks are stopped where they are.
/// Nothing unacknowledged was acknowledged, so a restart sends it again.
fn abort_overdue<T, U>(source: &JoinHandle<T>, sink: &JoinHandle<U>, tracker: &AckTracker) -> i32 {
    error!("the source did not stop within sink.drain_timeout_secs; stopping it where it is");
    source.abort();
    sink.abort();
    exit_code(Stopped::TimedOut, tracker)
}

/// A source error for `main`: a setting a person must change exits 2 like a
/// configuration error; anything else is a runtime failure.
fn source_error<E: SourceError>(err: E, context: &'static str) -> anyhow::Error {
    match err.misconfigured() {
        Some(key) => crate::settings::ConfigError::Invalid {
            key: key.to_owned(),
            message: format!("{err:#}"),
        }
        .into(),
        None => anyhow::Error::new(err).context(context),
    }
}

fn exit_code(stopped: Stopped, tracker: &AckTracker) -> i32 {
    match stopped {
        Stopped::Drained => {
            // The source logged its last acknowledged position in its own
            // notation just before.
            info!("stopped cleanly");
            0
        }
        Stopped::TimedOut => {
            error!(
                in_flight = tracker.in_flight(),
                "stopped before every record was delivered; they are sent again after a restart"
            );
            1
        }
    }
}

async fn watch_signals(mut term: Signal, mut int: Signal, shutdown: watch::Sender<bool>) {
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutdown requested: finishing the current transaction, flushing and acknowledging");
    let _ = shutdown.send(true);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    warn!("second signal: exiting now; unacknowledged changes are sent again after a restart");
    std::process::exit(1);
}

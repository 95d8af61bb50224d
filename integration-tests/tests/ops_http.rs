//! The HTTP endpoints of a running `tributary run`: `/metrics` shows the
//! source's event counters and lag moving with the changes; `/readyz` fails
//! while Kinesis is unreachable (a paused proxy in front of kinesalite) and
//! recovers after, and so while PostgreSQL is down; `/healthz` answers
//! throughout.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tributary_integration_tests::{FaultProxy, Servers, http_get as get};

const STREAM: &str = "http-cdc";

/// The value of the sample of `name` whose labels include every one of
/// `labels` (`key="value"`), if exported.
fn sample(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// Polls `GET path` until its status is `want`; fails after `timeout`,
/// asserting `/healthz` answers 200 on every round.
async fn wait_status(addr: SocketAddr, path: &str, want: u16, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (health, _) = get(addr, "/healthz").await?;
        assert_eq!(health, 200, "/healthz must answer throughout");
        let (status, body) = get(addr, path).await?;
        if status == want {
            return Ok(body);
        }
        if Instant::now() > deadline {
            bail!("{path} still answers {status} ({body}) after {timeout:?}, expected {want}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn events(addr: SocketAddr) -> Result<f64> {
    let (_, metrics) = get(addr, "/metrics").await?;
    Ok(sample(
        &metrics,
        "tributary_source_events_total",
        &["source=\"shop\"", "table=\"public.t\"", "op=\"insert\""],
    )
    .unwrap_or(0.0))
}

async fn wait_events(addr: SocketAddr, want: f64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while events(addr).await? < want {
        if Instant::now() > deadline {
            bail!(
                "events counter at {} after 30 s, expected {want}",
                events(addr).await?
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_readyz_follows_a_kinesis_outage() -> Result<()> {
    let servers = Servers::start(
        STREAM,
        1,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'old' FROM generate_series(-4, 0) g",
    )
    .await?;
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], servers.kin.port()))).await?;
    let extra = format!(
        "[source]\nsnapshot = \"initial\"\n[sink]\nendpoint_url = \"{}\"\n\
         [http]\nstall_timeout_secs = 3\n",
        proxy.endpoint()
    );
    let pipeline = servers.start_tributary(&extra).await?;
    let addr = pipeline.config.http_addr;

    assert_eq!(get(addr, "/healthz").await?, (200, "ok\n".to_owned()));
    let ready = wait_status(addr, "/readyz", 200, Duration::from_secs(10)).await?;
    let ready: serde_json::Value = serde_json::from_str(&ready)?;
    assert_eq!(ready["source_connected"], true);
    assert_eq!(ready["sink_connected"], true);
    assert_eq!(get(addr, "/nope").await?.0, 404);

    pipeline
        .pg
        .execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        .await?;
    wait_events(addr, 100.0).await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 105, Duration::from_secs(30))
        .await?;
    let (_, metrics) = get(addr, "/metrics").await?;
    assert_eq!(
        sample(
            &metrics,
            "tributary_source_events_total",
            &["table=\"public.t\"", "op=\"snapshot\""],
        ),
        Some(5.0),
        "the snapshot's 5 rows are counted:\n{metrics}"
    );
    let bytes = sample(
        &metrics,
        "tributary_source_bytes_total",
        &["table=\"public.t\"", "op=\"insert\""],
    )
    .context("no bytes counter")?;
    assert!(
        bytes > 100.0 * 100.0,
        "100 envelopes are more than {bytes} bytes"
    );
    assert!(
        sample(&metrics, "tributary_kinesis_records_sent_total", &[]).is_some_and(|n| n >= 105.0),
        "the writer's metrics are exported:\n{metrics}"
    );
    // Commit-to-ack latency: one observation per streamed change (not the
    // snapshot's rows), and the source lag of the newest one, under a
    // second on a healthy pipeline.
    let latencies = sample(&metrics, "tributary_commit_to_ack_seconds_count", &[])
        .context(format!("no commit-to-ack histogram:\n{metrics}"))?;
    assert_eq!(latencies, 100.0, "{metrics}");
    let lag = sample(
        &metrics,
        "tributary_source_lag_seconds",
        &["source=\"shop\""],
    )
    .context(format!("no source lag gauge:\n{metrics}"))?;
    assert!(
        (0.0..5.0).contains(&lag),
        "lag {lag} s on a healthy pipeline"
    );
    // The lag gauge is read every 5 s; it appears once read.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, metrics) = get(addr, "/metrics").await?;
        if sample(
            &metrics,
            "tributary_source_lag_bytes",
            &["slot=\"tributary_shop\""],
        )
        .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "no lag gauge:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Kinesis unreachable: records stay in flight, /readyz fails.
    proxy.pause();
    pipeline
        .pg
        .execute("INSERT INTO t SELECT g, 'y' FROM generate_series(101, 200) g")
        .await?;
    let stalled = wait_status(addr, "/readyz", 503, Duration::from_secs(20)).await?;
    let stalled: serde_json::Value = serde_json::from_str(&stalled)?;
    assert_eq!(stalled["ready"], false);
    assert!(
        stalled["stalled_seconds"].as_u64().is_some_and(|s| s >= 3),
        "{stalled}"
    );
    assert_eq!(events(addr).await?, 200.0, "the source decoded the rows");

    proxy.resume();
    wait_status(addr, "/readyz", 200, Duration::from_secs(60)).await?;
    pipeline
        .kin
        .wait_for_records(STREAM, 205, Duration::from_secs(30))
        .await?;
    // The rows committed during the outage were accepted seconds after
    // their commit: the lag and the latency histogram show it.
    let (_, metrics) = get(addr, "/metrics").await?;
    let lag = sample(
        &metrics,
        "tributary_source_lag_seconds",
        &["source=\"shop\""],
    )
    .context("no source lag gauge")?;
    assert!(lag >= 3.0, "lag {lag} s after an outage of more than 3 s");
    assert_eq!(
        sample(&metrics, "tributary_commit_to_ack_seconds_count", &[]),
        Some(200.0),
        "{metrics}"
    );
    Ok(())
}

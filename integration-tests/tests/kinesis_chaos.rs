//! The writer on a misbehaving Kinesis (issue 7, items 1 and 7): a
//! [`FaultProxy`] (for the outage) in front of [`KinesisFaults`] (10% of
//! PutRecords entries refused as throttled, 2% InternalFailure, 3% of whole
//! calls answered HTTP 500, 5% carried out and then reset without an
//! answer: more than the acceptance run's 1%, so that a short run sees some) in front of kinesalite. 20,000 changes over
//! 1,000 keys, with a Kinesis outage in the middle: nothing is lost, and
//! per key the last occurrence of each change is in commit order (a retried
//! record never ends up after a newer change of its key).
//!
//! The drain time is printed for the record (not asserted: speed figures
//! belong in a benchmark).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use tributary_integration_tests::{
    DEFAULT_DATABASE, FaultProxy, Faults, ITEMS_TABLE, KinesisFaults, Servers,
    check_last_occurrences, versions_per_key,
};

const STREAM: &str = "chaos-cdc";
const KEYS: i32 = 1_000;
/// Rounds of one change per key: 20,000 changes.
const ROUNDS: i32 = 20;
const OUTAGE: Duration = Duration::from_secs(8);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_failures_and_an_outage_lose_nothing_and_keep_per_key_order() -> Result<()> {
    let servers = Servers::start(STREAM, 4, ITEMS_TABLE).await?;
    let faults = KinesisFaults::start(
        SocketAddr::from(([127, 0, 0, 1], servers.kin.port())),
        Faults {
            throttled_entries: 0.10,
            internal_failure_entries: 0.02,
            failed_calls: 0.03,
            reset_calls: 0.05,
            seed: 7,
        },
    )
    .await?;
    let outage = FaultProxy::start(faults.addr()).await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\n[sink.quota]\nrecords_per_shard_per_sec = 5000\n",
        outage.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;

    let started = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0 FROM generate_series(1, {KEYS}) g"
    ))
    .await?;
    for round in 1..ROUNDS {
        if round == ROUNDS / 2 {
            outage.pause();
        }
        db.batch_execute(&format!("UPDATE items SET v = {round}"))
            .await?;
        if round == ROUNDS / 2 {
            tokio::time::sleep(OUTAGE).await;
            outage.resume();
        }
    }
    let end = pipeline.pg.current_wal_lsn().await?;
    pipeline
        .wait_confirmed_flush(end, Duration::from_secs(240))
        .await?;
    let drained = started.elapsed();

    let records = pipeline.kin.read_all(STREAM).await?;
    let per_key = versions_per_key(&records)?;
    let duplicates = check_last_occurrences(&per_key, KEYS as usize, i64::from(ROUNDS))?;
    let counts = faults.counts();
    eprintln!(
        "{} changes drained in {drained:?} (with a {OUTAGE:?} outage); {} records in the stream \
         ({duplicates} duplicates); the proxy refused {} entries, forwarded {}, failed {} calls, \
         reset {}",
        KEYS * ROUNDS,
        records.len(),
        counts.refused_entries.load(Ordering::Relaxed),
        counts.forwarded_entries.load(Ordering::Relaxed),
        counts.failed_calls.load(Ordering::Relaxed),
        counts.reset_calls.load(Ordering::Relaxed),
    );
    assert!(
        counts.refused_entries.load(Ordering::Relaxed) > 1_000
            && counts.reset_calls.load(Ordering::Relaxed) > 0,
        "the faults were injected"
    );
    pipeline.stop_gracefully().await?;
    Ok(())
}

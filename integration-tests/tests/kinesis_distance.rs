//! The writer at a distance (issue 7, item 2): with 150 ms added to every
//! Kinesis round trip and 10% of PutRecords entries refused, a shard's lane
//! keeps two calls in flight (`sink.max_in_flight_per_shard = 2`, the
//! default), and per key the last occurrence of each change is still in
//! commit order: a key never has two records racing, and retries keep
//! their place.
//!
//! Client → [`KinesisFaults`] (refusals; counts the calls it has in flight)
//! → [`FaultProxy`] with 150 ms latency → kinesalite.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use tributary_integration_tests::{
    DEFAULT_DATABASE, FaultProxy, Faults, ITEMS_TABLE, KinesisFaults, Servers,
    check_last_occurrences, versions_per_key,
};

const STREAM: &str = "distance-cdc";
const KEYS: i32 = 500;
/// Rounds of one change per key.
const ROUNDS: i32 = 4;
const LATENCY: Duration = Duration::from_millis(150);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_calls_in_flight_at_a_distance_keep_per_key_order() -> Result<()> {
    // One shard: the proxy's count of calls in flight is the lane's.
    let servers = Servers::start(STREAM, 1, ITEMS_TABLE).await?;
    let distance = FaultProxy::start_with_latency(
        SocketAddr::from(([127, 0, 0, 1], servers.kin.port())),
        LATENCY,
    )
    .await?;
    let faults = KinesisFaults::start(
        distance.addr(),
        Faults {
            throttled_entries: 0.10,
            seed: 11,
            ..Faults::default()
        },
    )
    .await?;
    let extra = format!(
        "[sink]\nendpoint_url = \"{}\"\nmax_in_flight_per_shard = 2\n",
        faults.endpoint()
    );
    let mut pipeline = servers.start_tributary(&extra).await?;
    let db = pipeline.pg.client(DEFAULT_DATABASE).await?;

    let started = Instant::now();
    db.batch_execute(&format!(
        "INSERT INTO items SELECT g, 0 FROM generate_series(1, {KEYS}) g"
    ))
    .await?;
    for round in 1..ROUNDS {
        // One transaction per key and round: a steady trickle, so that a
        // lane has records of keys not in its call in flight to send in a
        // second one (a key comes back only after 500 others).
        for key in 1..=KEYS {
            db.execute("UPDATE items SET v = $1 WHERE id = $2", &[&round, &key])
                .await?;
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
    let most = counts.max_put_records_in_flight.load(Ordering::SeqCst);
    eprintln!(
        "{} changes in {drained:?} at +{LATENCY:?}; {} records in the stream; \
         {duplicates} duplicates; {} entries refused; at most {most} putrecords calls in flight",
        KEYS * ROUNDS,
        records.len(),
        counts.refused_entries.load(Ordering::Relaxed),
    );
    assert!(
        counts.refused_entries.load(Ordering::Relaxed) > 50,
        "the refusals were injected"
    );
    // The lane had a second call in flight, and never more than two.
    assert_eq!(most, 2, "putrecords calls in flight at once");
    pipeline.stop_gracefully().await?;
    Ok(())
}

//! The Postgres source's metrics, recorded through the `metrics` facade
//! (the binary's `/metrics` endpoint exports them; without an exporter,
//! recording costs next to nothing).
//!
//! The decoder counts every envelope it produces, by table and op, with
//! counter handles registered once per table (on its Relation message), so
//! the hot path adds two atomic increments per row. Names are constants;
//! labels: `source` (`source.name`), `table` (`schema.table`), `op`.

use metrics::{Counter, counter};
use tributary_envelope::Op;

/// Counter: envelopes produced, by `source`, `table` and `op` (`snapshot`
/// counts the rows of the initial snapshot).
pub const EVENTS: &str = "tributary_source_events_total";
/// Counter: bytes of those envelopes (as encoded, before the sink's
/// format), by `source`, `table` and `op`.
pub const BYTES: &str = "tributary_source_bytes_total";
/// Gauge: WAL bytes between the server's current position and the slot's
/// confirmed position, by `source` and `slot`: what the slot keeps on the
/// primary's disk, and what is yet to be delivered.
pub const LAG_BYTES: &str = "tributary_source_lag_bytes";

/// Every metric name of the source.
pub const ALL: [&str; 3] = [EVENTS, BYTES, LAG_BYTES];

/// The ops the source produces (the stream's, and the initial snapshot's
/// rows), in [`TableCounters`] order.
const OPS: [Op; 5] = [
    Op::Insert,
    Op::Update,
    Op::Delete,
    Op::Truncate,
    Op::Snapshot,
];

/// One table's event and byte counters, per op.
#[derive(Debug, Clone)]
pub struct TableCounters {
    events: [Counter; 5],
    bytes: [Counter; 5],
}

impl TableCounters {
    /// Registers the counters of `schema.table` of source `source`.
    pub fn new(source: &str, schema: &str, table: &str) -> Self {
        let qualified = format!("{schema}.{table}");
        let make = |name: &'static str| {
            OPS.map(|op| {
                counter!(
                    name,
                    "source" => source.to_owned(),
                    "table" => qualified.clone(),
                    "op" => op.as_str()
                )
            })
        };
        TableCounters {
            events: make(EVENTS),
            bytes: make(BYTES),
        }
    }

    /// Counts one envelope of `bytes` bytes.
    pub fn record(&self, op: Op, bytes: usize) {
        self.record_many(op, 1, bytes);
    }

    /// Counts `events` envelopes of `op` of `bytes` in all.
    pub fn record_many(&self, op: Op, events: usize, bytes: usize) {
        let Some(i) = OPS.iter().position(|&o| o == op) else {
            return;
        };
        self.events[i].increment(u64::try_from(events).unwrap_or(u64::MAX));
        self.bytes[i].increment(u64::try_from(bytes).unwrap_or(u64::MAX));
    }
}

/// Sets [`LAG_BYTES`] for the configured slot every `every`, over its own
/// ordinary connection (reconnected after a failure), and tells `streaming`
/// each time whether a walsender streams from the slot (false when the
/// server cannot be asked): the server's own view of whether the source is
/// connected. Runs until the process exits.
pub async fn report_lag(
    config: crate::PostgresSourceConfig,
    every: std::time::Duration,
    streaming: impl Fn(bool) + Send + 'static,
) {
    let gauge = metrics::gauge!(
        LAG_BYTES,
        "source" => config.name.clone(),
        "slot" => config.slot.clone()
    );
    let mut client = None;
    // The first sample comes one period after start, once the source streams.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tick.tick().await;
        if client.is_none() {
            client = crate::replication::connect_sql(&config.connection)
                .await
                .ok();
        }
        let Some(connected) = &client else {
            streaming(false);
            continue;
        };
        match crate::inspect::list_slots(connected).await {
            Ok(slots) => {
                let slot = slots.iter().find(|s| s.name == config.slot);
                streaming(slot.is_some_and(|s| s.active_pid.is_some()));
                if let Some(lag) = slot.and_then(|s| s.lag_bytes) {
                    // Lag in bytes fits an f64 exactly up to 2^53 (8 PiB).
                    #[allow(clippy::cast_precision_loss)]
                    gauge.set(lag as f64);
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "cannot read the slot's lag; reconnecting");
                streaming(false);
                client = None;
            }
        }
    }
}

//! Parallel snapshot readers: `source.snapshot_parallelism` connections,
//! one consistent snapshot, a queue of key ranges.
//!
//! Part of the snapshot stage (see `snapshot`). The rule that keeps the
//! copy consistent: every reader imports the same snapshot before any row
//! is read. The first reader begins the REPEATABLE READ transaction (on the
//! slot's exported snapshot, or on its own and then exports it with
//! `pg_export_snapshot()`), the others import that name with `SET
//! TRANSACTION SNAPSHOT`; the exporting replication connection is closed
//! by the caller only after [`open`] returned, so it stays idle until
//! every reader has imported its snapshot. All readers then see the
//! database at exactly one point.
//!
//! Readers take work from one queue of [`Unit`]s (a table, or a key range
//! of a large one) and send each chunk of rows, as `COPY` text, over a
//! bounded channel to the one task that has them rendered and hands them
//! to the pipeline in the order they came (the emitter is single-owner,
//! and the ack tracker numbers records in the order they are handed
//! over). Memory therefore holds at most one chunk per reader being
//! filled, `parallelism` chunks in the channel and the chunks being
//! rendered (2 to 4, with their records): about `2 x parallelism + 4`
//! chunks of `source.snapshot_chunk_rows` rows, plus the records the byte
//! budget admits. A reader that fails sends its error and stops; the renderer
//! ends the copy with it (the readers' tasks are aborted when the
//! renderer drops them).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::config::ConnectionConfig;
use crate::error::PostgresError;
use crate::replication::connect_sql;
use crate::snapshot::{self, Chunk, TableReader};

/// A piece of work for one reader: the range at `index` of the snapshot's
/// plan, read by `reader`.
#[derive(Debug)]
pub struct Unit {
    /// The range's index in the plan (`SnapshotProgress::ranges`).
    pub index: usize,
    /// Its reader, nothing read yet.
    pub reader: TableReader,
}

/// What a reader hands the renderer.
#[derive(Debug)]
pub enum Delivery {
    /// The next chunk of the range at `index`, in key order.
    Rows {
        /// The range's index in the plan.
        index: usize,
        /// The rows, as `COPY` text.
        rows: Chunk,
        /// The key of the last row (`None` for a table without a key).
        last_key: Option<Vec<String>>,
    },
    /// The range at `index` is read to its end.
    Done {
        /// The range's index in the plan.
        index: usize,
    },
}

/// Opens `parallelism` reader connections on one snapshot: the exported
/// snapshot `exported` when given (the slot's), else a new REPEATABLE
/// READ transaction that the first reader exports to the others. Returns
/// the readers and, without an exported snapshot, the WAL position the
/// snapshot was taken at.
pub async fn open(
    connection: &ConnectionConfig,
    exported: Option<&str>,
    parallelism: usize,
) -> Result<(Vec<Client>, Option<u64>), PostgresError> {
    let first = connect_sql(connection).await?;
    let taken_at = snapshot::begin(&first, exported).await?;
    let mut readers = Vec::with_capacity(parallelism.max(1));
    if parallelism > 1 {
        let name = match exported {
            Some(name) => name.to_owned(),
            None => first
                .query_one("SELECT pg_export_snapshot()", &[])
                .await
                .map_err(PostgresError::query(
                    "exporting the snapshot to the other readers",
                ))?
                .get(0),
        };
        for _ in 1..parallelism {
            let reader = connect_sql(connection).await?;
            snapshot::begin(&reader, Some(&name)).await?;
            readers.push(reader);
        }
    }
    readers.insert(0, first);
    Ok((readers, taken_at))
}

/// Starts one task per reader, each taking units from `units` in order
/// until none is left. The receiver gets every chunk; it ends when every
/// unit is read (or at the first error). Dropping the returned set aborts
/// the readers.
pub fn spawn(
    readers: Vec<Client>,
    units: Vec<Unit>,
) -> (mpsc::Receiver<Result<Delivery, PostgresError>>, JoinSet<()>) {
    let (sender, receiver) = mpsc::channel(readers.len().max(1));
    let queue = Arc::new(Mutex::new(VecDeque::from(units)));
    let mut tasks = JoinSet::new();
    for client in readers {
        let (queue, sender) = (queue.clone(), sender.clone());
        tasks.spawn(async move {
            if let Err(err) = read_units(&client, &queue, &sender).await {
                // The renderer may be gone already: nothing else to tell.
                let _ = sender.send(Err(err)).await;
            }
        });
    }
    (receiver, tasks)
}

/// One reader's loop: the next unit from the queue, chunk by chunk.
async fn read_units(
    client: &Client,
    queue: &Mutex<VecDeque<Unit>>,
    sender: &mpsc::Sender<Result<Delivery, PostgresError>>,
) -> Result<(), PostgresError> {
    loop {
        let next = queue
            .lock()
            .expect("no reader panics holding the queue")
            .pop_front();
        let Some(Unit { index, mut reader }) = next else {
            return Ok(());
        };
        loop {
            let rows = reader.fetch(client).await?;
            if rows.is_empty() {
                break;
            }
            let last_key = reader.last_key().map(<[String]>::to_vec);
            let delivery = Delivery::Rows {
                index,
                rows,
                last_key,
            };
            if sender.send(Ok(delivery)).await.is_err() {
                return Ok(());
            }
        }
        reader.close().await?;
        if sender.send(Ok(Delivery::Done { index })).await.is_err() {
            return Ok(());
        }
    }
}

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
//! of a large one), render each chunk of rows into records themselves
//! (each unit carries its table's renderer and its range's position
//! counter: a range is read by one reader, in key order, so its rows get
//! the same positions whichever reader reads it) and send the chunk's
//! records over a bounded channel to the one task that hands them to the
//! pipeline (the emitter is single-owner, and the ack tracker numbers
//! records in the order they are handed over). The rendering, most of a
//! snapshot's CPU, thus runs on as many cores as there are readers, and
//! the single task only hands records over. A chunk's records are sent in
//! parts of [`DELIVERY_ROWS`], so memory holds per reader one chunk of
//! `source.snapshot_chunk_rows` text rows and the part being rendered,
//! `parallelism` parts in the channel and the one being handed over,
//! plus the records the byte budget admits. A reader that fails
//! sends its error and stops; the receiving task ends the copy with it
//! (the readers' tasks are aborted when it drops them).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_postgres::Client;
use tributary_envelope::Record;
use tributary_envelope::time::TIMESTAMP_LEN;

use crate::config::ConnectionConfig;
use crate::decoder::{SnapshotRenderer, Transaction};
use crate::error::PostgresError;
use crate::replication::connect_sql;
use crate::snapshot::{self, TableReader};

/// Rows rendered into one [`Delivery`]: a chunk's records go over the
/// channel in parts of this many, so the records waiting in it stay
/// small next to the chunk's text rows (a record is several times the
/// size of its row's text).
const DELIVERY_ROWS: usize = 1_000;

/// A piece of work for one reader: the range at `index` of the snapshot's
/// plan, read by `reader`, rendered by `renderer` at `tx`'s positions.
#[derive(Debug)]
pub struct Unit {
    /// The range's index in the plan (`SnapshotProgress::ranges`).
    pub index: usize,
    /// Its reader, not yet started.
    pub reader: TableReader,
    /// Renders its table's rows.
    pub renderer: SnapshotRenderer,
    /// The range's positions: `{range major}:{ordinal}`, from the ordinal
    /// its last acknowledged chunk ended at.
    pub tx: Transaction,
}

/// What a reader hands the task that feeds the pipeline.
#[derive(Debug)]
pub enum Delivery {
    /// The next rows of the range at `index`, in key order, rendered: a
    /// chunk comes in parts of up to [`DELIVERY_ROWS`] rows.
    Rows {
        /// The range's index in the plan.
        index: usize,
        /// The chunk's records, in key order.
        records: Vec<Record>,
        /// The rows read (a row of a table no longer captured gives no
        /// record).
        rows: usize,
        /// The range's ordinal after the part's last row.
        ordinal: u32,
        /// True on a chunk's last part.
        chunk_end: bool,
        /// On a chunk's last part, the key of its last row (`None` for
        /// the other parts and for a table without a key): the ledger
        /// records progress per chunk.
        last_key: Option<Vec<String>>,
    },
    /// The range at `index` is read to its end.
    Done {
        /// The range's index in the plan.
        index: usize,
    },
}

impl Delivery {
    /// The index in the plan of the range it belongs to.
    pub fn index(&self) -> usize {
        match self {
            Delivery::Rows { index, .. } | Delivery::Done { index } => *index,
        }
    }
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
/// until none is left and rendering their rows with `captured_at`. The
/// receiver gets every chunk; it ends when every unit is read (or at the
/// first error). Dropping the returned set aborts the readers.
pub fn spawn(
    readers: Vec<Client>,
    units: Vec<Unit>,
    captured_at: [u8; TIMESTAMP_LEN],
) -> (mpsc::Receiver<Result<Delivery, PostgresError>>, JoinSet<()>) {
    let (sender, receiver) = mpsc::channel(readers.len().max(1));
    let queue = Arc::new(Mutex::new(VecDeque::from(units)));
    let mut tasks = JoinSet::new();
    for client in readers {
        let (queue, sender) = (queue.clone(), sender.clone());
        tasks.spawn(async move {
            if let Err(err) = read_units(&client, &queue, &sender, &captured_at).await {
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
    captured_at: &[u8; TIMESTAMP_LEN],
) -> Result<(), PostgresError> {
    loop {
        let next = queue
            .lock()
            .expect("no reader panics holding the queue")
            .pop_front();
        let Some(Unit {
            index,
            mut reader,
            mut renderer,
            mut tx,
        }) = next
        else {
            return Ok(());
        };
        reader.start(client).await?;
        loop {
            let rows = reader.fetch(client).await?;
            if rows.is_empty() {
                break;
            }
            let mut cells = Vec::new();
            let batches = rows.len().div_ceil(DELIVERY_ROWS);
            for (i, batch) in rows.chunks(DELIVERY_ROWS).enumerate() {
                let mut records = Vec::with_capacity(batch.len());
                for row in batch {
                    snapshot::text_cells(row, &mut cells);
                    renderer.render(&cells, &mut tx, captured_at, &mut records)?;
                }
                let chunk_end = i + 1 == batches;
                let last_key = chunk_end
                    .then(|| reader.last_key().map(<[String]>::to_vec))
                    .flatten();
                let delivery = Delivery::Rows {
                    index,
                    records,
                    rows: batch.len(),
                    ordinal: tx.ordinal,
                    chunk_end,
                    last_key,
                };
                if sender.send(Ok(delivery)).await.is_err() {
                    return Ok(());
                }
            }
        }
        reader.close(client).await?;
        if sender.send(Ok(Delivery::Done { index })).await.is_err() {
            return Ok(());
        }
    }
}

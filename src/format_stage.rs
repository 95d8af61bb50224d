//! The stage between the source and the sink that rewrites each envelope
//! into `sink.format` (Debezium, CloudEvents), when that is not Tributary's
//! own v1.
//!
//! The source took byte budget for each record's v1 size; the sink gives
//! back the size of what it was handed. The stage settles the difference
//! per batch: it gives back what shrank at once, and takes what grew right
//! after handing the batch on, before reading the next one — never while
//! holding the batch, whose own budget only the sink can give back (that
//! wait could never end). In flight may so exceed the budget by one batch's
//! growth, for as long as the sink takes to deliver it.
//!
//! With `sink.transaction_markers`, Debezium events carry Debezium's
//! `transaction` block (`id`, `total_order`, `data_collection_order`),
//! counted here in source order from each record's transaction tag.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;
use tributary_envelope::format::{EventOrder, Format, convert_event};
use tributary_envelope::transaction::TxTag;
use tributary_envelope::{Budget, Record};

/// Starts the stage: records from `input` come out of the returned
/// receiver in the same order, rewritten into `format`. The output closes
/// when the input does.
pub fn spawn(
    format: Format,
    transaction_markers: bool,
    mut input: mpsc::Receiver<Vec<Record>>,
    budget: Arc<Budget>,
    capacity: usize,
) -> mpsc::Receiver<Vec<Record>> {
    let (output, receiver) = mpsc::channel(capacity);
    tokio::spawn(async move {
        let mut orders = transaction_markers.then(TxOrders::default);
        while let Some(mut batch) = input.recv().await {
            let (mut grew, mut shrank) = (0usize, 0usize);
            for record in &mut batch {
                let before = record.weight().min(budget.capacity());
                let order = orders.as_mut().and_then(|o| o.next(record));
                match convert_event(format, &record.data, order.as_ref()) {
                    Ok(data) => record.data = data,
                    // Never lose a change: one the stage cannot read goes
                    // on as it is.
                    Err(err) => {
                        warn!(error = %err, seq = record.seq, "cannot rewrite a record into sink.format; sending it as is")
                    }
                }
                let after = record.weight().min(budget.capacity());
                grew += after.saturating_sub(before);
                shrank += before.saturating_sub(after);
            }
            if shrank > grew {
                budget.release(shrank - grew);
            }
            if output.send(batch).await.is_err() {
                return; // the sink stopped; it reports why
            }
            if grew > shrank {
                // Paid after the batch went on: waiting while holding it
                // could never end, as only the sink gives its budget back.
                // Nothing more is read until it is paid.
                budget.acquire((grew - shrank).min(budget.capacity())).await;
            }
        }
    });
    receiver
}

/// Counts the events of the current transaction, overall and per table.
#[derive(Default)]
struct TxOrders {
    tag: Option<Arc<TxTag>>,
    total: u64,
    tables: Vec<(Arc<str>, u64)>,
}

impl TxOrders {
    /// The order of `record` in its transaction; `None` for a record of
    /// none (a snapshot row).
    fn next(&mut self, record: &Record) -> Option<EventOrder> {
        let tx = record.tx.as_ref()?;
        if !self.tag.as_ref().is_some_and(|t| Arc::ptr_eq(t, &tx.tag)) {
            self.tag = Some(tx.tag.clone());
            self.total = 0;
            self.tables.clear();
        }
        self.total += 1;
        let in_table = match self.tables.iter_mut().find(|(t, _)| *t == tx.table) {
            Some((_, n)) => {
                *n += 1;
                *n
            }
            None => {
                self.tables.push((tx.table.clone(), 1));
                1
            }
        };
        Some(EventOrder {
            id: tx.tag.id(),
            total_order: self.total,
            data_collection_order: in_table,
        })
    }
}

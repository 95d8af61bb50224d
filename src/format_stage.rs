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

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;
use tributary_envelope::format::{Format, convert};
use tributary_envelope::{Budget, Record};

/// Starts the stage: records from `input` come out of the returned
/// receiver in the same order, rewritten into `format`. The output closes
/// when the input does.
pub fn spawn(
    format: Format,
    mut input: mpsc::Receiver<Vec<Record>>,
    budget: Arc<Budget>,
    capacity: usize,
) -> mpsc::Receiver<Vec<Record>> {
    let (output, receiver) = mpsc::channel(capacity);
    tokio::spawn(async move {
        while let Some(mut batch) = input.recv().await {
            let (mut grew, mut shrank) = (0usize, 0usize);
            for record in &mut batch {
                let before = record.weight().min(budget.capacity());
                match convert(format, &record.data) {
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

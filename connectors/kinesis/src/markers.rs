//! Transaction markers on the dispatcher's side (`sink.transaction_markers`).
//!
//! The dispatcher routes records in source order; this module watches which
//! shards a transaction's events go to. Before a transaction's first event
//! on a shard it queues a `begin` marker on that shard's lane; when the
//! transaction's commit is announced (the tracker's commit feed, see
//! `AckTracker::commit_feed`) and every record before the commit was
//! routed, it queues an `end` marker on each shard the transaction touched.
//! A marker travels in its shard's lane with the shard's first hash key as
//! its explicit hash key, so it lands on that shard in lane order; the lane
//! treats it as a barrier (like a truncate's copy): when anything before it
//! is retried it goes again, and when it is retried so does everything
//! after it. A shard's worker so sees `begin, events..., end` for each
//! transaction in the last-occurrence sense.
//!
//! Acknowledgement: a commit is confirmed to the tracker only when every
//! `end` of its transaction was delivered (or dead-lettered); an `end` is
//! delivered only after everything before it in its lane, `begin` included.
//! A transaction with no event (everything filtered) and the snapshot (its
//! rows carry no transaction) are confirmed at once.
//!
//! Resharding: shards are remembered by their first hash key, not by lane.
//! After a split or merge mid-transaction, the `end` for a shard that was
//! closed goes, with the same explicit hash key, to the open shard whose
//! range now holds that key (a child of the closed shard), with the count
//! of the events sent to both; a child that starts at a new hash key gets a
//! `begin` of its own before its first event. A worker that reads a parent
//! before its children (as the KCL does) still sees `begin` first and `end`
//! last; one that reads only the child may see an `end` without a `begin`.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::mpsc;
use tributary_envelope::format::Format;
use tributary_envelope::transaction::{
    Marker, MarkerGroup, MarkerKind, MarkerSpec, TxCounts, TxTag, marker_partition_key,
    render_marker,
};
use tributary_envelope::{AckTracker, Record};

/// One transaction whose events are being routed.
struct OpenTx {
    tag: Arc<TxTag>,
    /// The sequence number of its first record.
    first_seq: u64,
    /// Events per table, over the whole transaction.
    counts: TxCounts,
    /// (stream, shard's first hash key, events sent there).
    shards: Vec<(Arc<str>, u128, u64)>,
}

/// A marker to queue: the stream, the shard's first hash key, the record.
pub(crate) type Queued = (Arc<str>, u128, Record);

/// The transaction-marker state of the dispatcher.
pub(crate) struct TxMarkers {
    format: Format,
    feed: mpsc::UnboundedReceiver<u64>,
    /// Commits announced and not yet ended, by `end_seq`.
    announced: VecDeque<u64>,
    /// Transactions with routed events, oldest first.
    open: VecDeque<OpenTx>,
    /// Every record below this sequence number was routed.
    routed: u64,
}

impl TxMarkers {
    /// Markers in `format`, for the commits announced on `feed`.
    pub(crate) fn new(format: Format, feed: mpsc::UnboundedReceiver<u64>) -> Self {
        Self {
            format,
            feed,
            announced: VecDeque::new(),
            open: VecDeque::new(),
            routed: 0,
        }
    }

    /// Waits for the next announced commit (pending forever once the feed
    /// closed).
    pub(crate) async fn next_commit(&mut self) -> u64 {
        match self.feed.recv().await {
            Some(end_seq) => end_seq,
            None => std::future::pending().await,
        }
    }

    /// Notes an announced commit.
    pub(crate) fn announce(&mut self, end_seq: u64) {
        self.announced.push_back(end_seq);
    }

    /// The `end` markers of every announced commit at or before `seq` (the
    /// next record to route), and of every commit whose records were all
    /// routed when `seq` is `None`. Commits with no marker are confirmed to
    /// `tracker` here.
    pub(crate) fn ends_before(&mut self, seq: Option<u64>, tracker: &AckTracker) -> Vec<Queued> {
        while let Ok(end_seq) = self.feed.try_recv() {
            self.announced.push_back(end_seq);
        }
        let limit = seq.unwrap_or(self.routed);
        let mut queued = Vec::new();
        while let Some(&end_seq) = self.announced.front() {
            if end_seq > limit {
                break;
            }
            self.announced.pop_front();
            match self.open.front() {
                Some(tx) if tx.first_seq < end_seq => {
                    let tx = self.open.pop_front().expect("just looked at it");
                    queued.extend(self.end(tx, end_seq));
                }
                _ => tracker.confirm(end_seq),
            }
        }
        queued
    }

    /// Counts `record` (about to go to the shards starting at `starts` of
    /// `stream`) and returns the `begin` markers to queue before it.
    pub(crate) fn route(&mut self, record: &Record, starts: &[u128]) -> Vec<Queued> {
        self.routed = record.seq + 1;
        let Some(tx_ref) = &record.tx else {
            return Vec::new();
        };
        let new = self
            .open
            .back()
            .is_none_or(|open| !Arc::ptr_eq(&open.tag, &tx_ref.tag));
        if new {
            self.open.push_back(OpenTx {
                tag: tx_ref.tag.clone(),
                first_seq: record.seq,
                counts: TxCounts::default(),
                shards: Vec::new(),
            });
        }
        let tx = self.open.back_mut().expect("pushed above");
        tx.counts.add(&tx_ref.table);
        let mut begins = Vec::new();
        for &start in starts {
            let shard = tx
                .shards
                .iter_mut()
                .find(|(s, h, _)| *h == start && *s == record.stream);
            match shard {
                Some((_, _, events)) => *events += 1,
                None => {
                    tx.shards.push((record.stream.clone(), start, 1));
                    let spec = MarkerSpec {
                        kind: MarkerKind::Begin,
                        tag: &tx.tag,
                        shard_start: start,
                        counts: None,
                    };
                    let marker =
                        marker_record(self.format, &record.stream, spec, record.seq, Marker::Begin);
                    begins.push((record.stream.clone(), start, marker));
                }
            }
        }
        begins
    }

    /// The `end` markers of `tx`, one per shard it touched, counted in one
    /// group that confirms `end_seq`.
    fn end(&self, tx: OpenTx, end_seq: u64) -> Vec<Queued> {
        let group = MarkerGroup::new(tx.shards.len(), end_seq);
        tx.shards
            .iter()
            .map(|(stream, start, events)| {
                let spec = MarkerSpec {
                    kind: MarkerKind::End,
                    tag: &tx.tag,
                    shard_start: *start,
                    counts: Some((&tx.counts, *events)),
                };
                let marker = marker_record(
                    self.format,
                    stream,
                    spec,
                    end_seq,
                    Marker::End(group.clone()),
                );
                (stream.clone(), *start, marker)
            })
            .collect()
    }
}

/// A marker record for the shard `spec` names, rendered in `format`.
fn marker_record(
    format: Format,
    stream: &Arc<str>,
    spec: MarkerSpec<'_>,
    seq: u64,
    marker: Marker,
) -> Record {
    Record {
        seq,
        explicit_hash_key: Some(spec.shard_start),
        marker: Some(marker),
        ..Record::new(
            stream.clone(),
            marker_partition_key(spec.tag),
            render_marker(format, spec),
        )
    }
}

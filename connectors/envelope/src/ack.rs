//! The acknowledgement watermark and the in-flight byte budget.
//!
//! A source numbers its records with dense sequence numbers and tells the
//! [`AckTracker`] where each transaction ends; the sink reports records done
//! (accepted by the destination or dead-lettered) in any order. The tracker
//! exposes the highest transaction-end position below which every record is
//! done: only that may be acknowledged to the source (guarantees 1 and 4).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Semaphore, mpsc, watch};

use crate::record::Record;
use crate::transaction::Marker;

#[derive(Debug, Default)]
struct Inner {
    /// Lowest sequence number not yet done.
    base: u64,
    /// `done[i]`: record `base + i` is done (front is always false).
    done: VecDeque<bool>,
    /// Records below this were handed to the sink.
    issued: u64,
    /// Transactions not yet acknowledgeable: (end sequence, position,
    /// confirmed by the sink).
    commits: VecDeque<(u64, u64, bool)>,
    /// Set by [`AckTracker::commit_feed`]: where commits are announced to
    /// the sink, which confirms each one.
    feed: Option<mpsc::UnboundedSender<u64>>,
    /// `end_seq` of the last commit: a commit with the same one holds no
    /// record.
    last_end: u64,
}

/// Tracks which records are done and which source position may be acknowledged.
#[derive(Debug)]
pub struct AckTracker {
    inner: Mutex<Inner>,
    acked: watch::Sender<u64>,
}

impl Default for AckTracker {
    fn default() -> Self {
        Self::new(0)
    }
}

impl AckTracker {
    /// A tracker whose acknowledged position starts at `position`; sequence
    /// numbers start at 0.
    pub fn new(position: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            acked: watch::Sender::new(position),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent state (every
        // mutation below completes before any call that could panic).
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The source handed every record below `next_seq` to the sink.
    pub fn issued(&self, next_seq: u64) {
        let mut inner = self.lock();
        inner.issued = inner.issued.max(next_seq);
    }

    /// A transaction ending at source `position` committed; its records (and
    /// all earlier ones) have sequence numbers below `end_seq`.
    pub fn commit(&self, end_seq: u64, position: u64) {
        let mut inner = self.lock();
        inner.issued = inner.issued.max(end_seq);
        // With a feed, the sink must confirm the commit (its transaction
        // markers are delivered); a sink that stopped confirms nothing. A
        // commit without records has no markers and is not announced: its
        // `end_seq` is the previous commit's, whose confirmation it must
        // not take.
        let empty = end_seq == inner.last_end;
        inner.last_end = end_seq;
        // An empty commit behind one still waiting becomes acknowledgeable
        // at the same moment: it moves that entry's position instead of
        // queueing another, so a stalled sink and a source busy with
        // uncaptured tables do not grow the queue without bound.
        if empty && let Some(back) = inner.commits.back_mut() {
            back.1 = back.1.max(position);
            self.advance(&mut inner);
            return;
        }
        let confirmed = match &inner.feed {
            Some(_) if empty => true,
            Some(feed) => feed.send(end_seq).is_err(),
            None => true,
        };
        inner.commits.push_back((end_seq, position, confirmed));
        self.advance(&mut inner);
    }

    /// From now on every [`AckTracker::commit`] is announced on the
    /// returned channel (its `end_seq`) and is acknowledgeable only once
    /// the sink calls [`AckTracker::confirm`] for it as well: a sink that
    /// writes transaction markers confirms a commit when they are delivered.
    /// Call it before the source starts.
    pub fn commit_feed(&self) -> mpsc::UnboundedReceiver<u64> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.lock().feed = Some(sender);
        receiver
    }

    /// The sink delivered what it adds to the commit announced with
    /// `end_seq` (the oldest unconfirmed one with that `end_seq`).
    pub fn confirm(&self, end_seq: u64) {
        let mut inner = self.lock();
        if let Some(commit) = inner
            .commits
            .iter_mut()
            .find(|(end, _, confirmed)| *end == end_seq && !confirmed)
        {
            commit.2 = true;
        }
        self.advance(&mut inner);
    }

    /// Records with these sequence numbers are done.
    pub fn complete(&self, seqs: impl IntoIterator<Item = u64>) {
        let mut inner = self.lock();
        for seq in seqs {
            let Some(index) = seq.checked_sub(inner.base) else {
                continue; // already done (a duplicate report)
            };
            let index = index as usize;
            if index >= inner.done.len() {
                inner.done.resize(index + 1, false);
            }
            inner.done[index] = true;
        }
        while inner.done.front() == Some(&true) {
            inner.done.pop_front();
            inner.base += 1;
        }
        self.advance(&mut inner);
    }

    /// With nothing in flight and no transaction pending, the source may
    /// acknowledge `position` (an idle stream's server WAL end). Returns
    /// whether it was taken.
    pub fn idle(&self, position: u64) -> bool {
        let inner = self.lock();
        let idle = inner.commits.is_empty() && inner.base >= inner.issued;
        if idle {
            self.raise(position);
        }
        idle
    }

    fn advance(&self, inner: &mut Inner) {
        let mut position = None;
        while let Some(&(end_seq, pos, confirmed)) = inner.commits.front() {
            if end_seq > inner.base || !confirmed {
                break;
            }
            position = Some(pos);
            inner.commits.pop_front();
        }
        if let Some(position) = position {
            self.raise(position);
        }
    }

    fn raise(&self, position: u64) {
        self.acked.send_if_modified(|acked| {
            let raised = position > *acked;
            if raised {
                *acked = position;
            }
            raised
        });
    }

    /// The highest acknowledgeable position.
    pub fn acked(&self) -> u64 {
        *self.acked.borrow()
    }

    /// A receiver that sees every raise of the acknowledgeable position.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.acked.subscribe()
    }

    /// Every record below this sequence number is done (accepted by the
    /// destination or dead-lettered): a source that remembers where a
    /// group of records ends knows when the whole group is delivered.
    pub fn done_below(&self) -> u64 {
        self.lock().base
    }

    /// Records handed to the sink and not yet done.
    pub fn in_flight(&self) -> u64 {
        let inner = self.lock();
        inner.issued.saturating_sub(inner.base)
    }

    /// True when every issued record is done and every commit acknowledgeable.
    pub fn is_drained(&self) -> bool {
        let inner = self.lock();
        inner.commits.is_empty() && inner.base >= inner.issued
    }
}

/// A byte budget for records between the source and the point where the
/// sink reports them done. The source awaits budget before it decodes more,
/// so a stalled sink stalls the source, not the heap.
#[derive(Debug)]
pub struct Budget {
    semaphore: Semaphore,
    capacity: u32,
}

impl Budget {
    /// A budget of `bytes` (at most `u32::MAX`).
    pub fn new(bytes: usize) -> Self {
        let capacity = u32::try_from(bytes).unwrap_or(u32::MAX).max(1);
        Self {
            semaphore: Semaphore::new(capacity as usize),
            capacity,
        }
    }

    fn clamp(&self, bytes: usize) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity)
    }

    /// Waits until `bytes` are available and takes them. A record larger
    /// than the whole budget takes all of it.
    pub async fn acquire(&self, bytes: usize) {
        let permits = self.clamp(bytes);
        self.semaphore
            .acquire_many(permits)
            .await
            .expect("the budget's semaphore is never closed")
            .forget();
    }

    /// Gives back what [`Budget::acquire`] took for `bytes`.
    pub fn release(&self, bytes: usize) {
        self.semaphore.add_permits(self.clamp(bytes) as usize);
    }

    /// Bytes not taken right now.
    pub fn available(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// The budget's size.
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }
}

/// What a sink uses to report records done: it updates the watermark and
/// gives their bytes back to the budget.
#[derive(Clone, Debug)]
pub struct Acks {
    tracker: Arc<AckTracker>,
    budget: Arc<Budget>,
}

impl Acks {
    /// Joins a tracker and a budget.
    pub fn new(tracker: Arc<AckTracker>, budget: Arc<Budget>) -> Self {
        Self { tracker, budget }
    }

    /// These records are durably accepted by the destination or dead-lettered.
    pub fn done<'r>(&self, records: impl IntoIterator<Item = &'r Record>) {
        let mut bytes = 0usize;
        let mut count = 0usize;
        let tracker = &self.tracker;
        // A fanned-out record is done when its last copy is. A marker
        // holds no budget and no sequence number: the last `end` of a
        // transaction confirms its commit.
        // (Confirmed after `complete`, which holds the tracker's lock.)
        let mut confirmed = Vec::new();
        let seqs = records
            .into_iter()
            .filter(|r| match &r.marker {
                None => true,
                Some(Marker::Begin) => false,
                Some(Marker::End(group)) => {
                    confirmed.extend(group.finish_one());
                    false
                }
            })
            .filter(|r| r.copies.as_ref().is_none_or(|c| c.finish_one()))
            .map(|r| {
                bytes += self.budget.clamp(r.weight()) as usize;
                count += 1;
                r.seq
            });
        tracker.complete(seqs);
        for end_seq in confirmed {
            tracker.confirm(end_seq);
        }
        if count > 0 {
            self.budget.semaphore.add_permits(bytes);
        }
    }

    /// The tracker.
    pub fn tracker(&self) -> &Arc<AckTracker> {
        &self.tracker
    }

    /// The budget.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledges_only_fully_done_transactions() {
        let tracker = AckTracker::new(0);
        // tx A: seqs 0..3 at position 100; tx B: seqs 3..5 at 200; tx C empty at 300.
        tracker.commit(3, 100);
        tracker.commit(5, 200);
        tracker.commit(5, 300);
        assert_eq!(tracker.acked(), 0);
        tracker.complete([4, 3]);
        assert_eq!(tracker.acked(), 0, "B is done but A is not");
        tracker.complete([0, 2]);
        assert_eq!(tracker.acked(), 0, "seq 1 is still in flight");
        assert_eq!(tracker.done_below(), 1, "seq 0 alone is done in order");
        tracker.complete([1]);
        assert_eq!(tracker.acked(), 300, "A, B and the empty C are all done");
        assert!(tracker.is_drained());
        tracker.complete([1]);
        assert_eq!(tracker.acked(), 300, "a duplicate report changes nothing");
    }

    #[test]
    fn an_open_transaction_blocks_idle_acknowledgement() {
        let tracker = AckTracker::new(10);
        tracker.issued(2);
        assert!(!tracker.idle(50), "records in flight");
        tracker.complete([0, 1]);
        assert!(tracker.idle(50));
        assert_eq!(tracker.acked(), 50);
        assert!(
            !tracker.idle(40) || tracker.acked() == 50,
            "never moves back"
        );
        assert_eq!(tracker.acked(), 50);
        tracker.commit(3, 60);
        assert!(!tracker.idle(70), "a commit waits for record 2");
        assert_eq!(tracker.in_flight(), 1);
    }

    #[test]
    fn budget_blocks_until_released() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let budget = Arc::new(Budget::new(100));
            let tracker = Arc::new(AckTracker::new(0));
            let acks = Acks::new(tracker.clone(), budget.clone());
            let record = Record::new("s".into(), "k".into(), vec![0; 79]);
            budget.acquire(record.weight()).await;
            assert_eq!(budget.available(), 20);
            let blocked =
                tokio::time::timeout(std::time::Duration::from_millis(20), budget.acquire(50))
                    .await;
            assert!(blocked.is_err(), "only 20 bytes left");
            acks.done([&record]);
            assert_eq!(budget.available(), 100);
            budget.acquire(1_000).await; // larger than the budget: takes all of it
            assert_eq!(budget.available(), 0);
            budget.release(1_000);
            assert_eq!(budget.available(), 100);
            tracker.commit(1, 5);
            assert_eq!(tracker.acked(), 5);
        });
    }

    #[test]
    fn a_fed_commit_waits_for_the_sinks_confirmation() {
        let tracker = Arc::new(AckTracker::new(0));
        let acks = Acks::new(tracker.clone(), Arc::new(Budget::new(1_000)));
        let mut feed = tracker.commit_feed();
        tracker.commit(1, 10);
        tracker.commit(1, 20); // an empty transaction: nothing to confirm
        assert_eq!(feed.try_recv().unwrap(), 1);
        assert!(
            feed.try_recv().is_err(),
            "the empty commit is not announced"
        );
        tracker.complete([0]);
        assert_eq!(tracker.acked(), 0, "record 0 is done, its markers are not");
        let group = crate::transaction::MarkerGroup::new(2, 1);
        let end = Record {
            marker: Some(Marker::End(group)),
            ..Record::new("s".into(), "k".into(), vec![0; 10])
        };
        let begin = Record {
            marker: Some(Marker::Begin),
            ..end.clone()
        };
        acks.done([&begin, &end]);
        assert_eq!(tracker.acked(), 0, "one end marker is still undelivered");
        acks.done([&end]);
        assert_eq!(
            tracker.acked(),
            20,
            "the empty commit follows its predecessor"
        );
        assert!(tracker.is_drained());
        assert_eq!(acks.budget().available(), 1_000, "markers hold no budget");
    }

    #[test]
    fn an_empty_commit_never_confirms_its_predecessors_markers() {
        let tracker = AckTracker::new(0);
        let mut feed = tracker.commit_feed();
        tracker.commit(3, 100); // records 0..3
        tracker.commit(3, 200); // no record (e.g. only uncaptured tables)
        tracker.commit(3, 300); // no record either
        assert_eq!(feed.try_recv().unwrap(), 3);
        assert!(feed.try_recv().is_err());
        tracker.complete([0, 1, 2]);
        assert_eq!(
            tracker.acked(),
            0,
            "the first transaction's end markers are not delivered yet"
        );
        tracker.confirm(3);
        assert_eq!(tracker.acked(), 300);
        tracker.commit(5, 400);
        assert_eq!(feed.try_recv().unwrap(), 5, "later commits are announced");
    }

    #[test]
    fn empty_commits_behind_a_waiting_one_do_not_queue_up() {
        let tracker = AckTracker::new(0);
        tracker.commit(2, 100); // records 0..2, not done
        for position in 101..10_000 {
            tracker.commit(2, position); // transactions with no record
        }
        assert_eq!(tracker.lock().commits.len(), 1, "one entry, not 9,900");
        assert_eq!(tracker.acked(), 0);
        tracker.complete([0, 1]);
        assert_eq!(tracker.acked(), 9_999, "the last empty commit's position");
    }

    #[tokio::test]
    async fn a_fanned_out_record_is_done_with_its_last_copy() {
        let budget = Arc::new(Budget::new(1_000));
        let tracker = Arc::new(AckTracker::new(0));
        let acks = Acks::new(tracker.clone(), budget.clone());
        let record = Record::new("s".into(), "public.t".into(), vec![0; 92]);
        budget.acquire(record.weight()).await;
        let copies = crate::record::Copies::new(3);
        let a = record.copy_for(1, &copies);
        let b = record.copy_for(2, &copies);
        let c = record.copy_for(3, &copies);
        tracker.commit(1, 40);
        acks.done([&a]);
        acks.done([&c]);
        assert_eq!(tracker.acked(), 0, "one copy is still undelivered");
        assert_eq!(budget.available(), 900, "its bytes are still held");
        acks.done([&b]);
        assert_eq!(tracker.acked(), 40);
        assert_eq!(budget.available(), 1_000, "released once, not per copy");
        assert_eq!(tracker.in_flight(), 0);
    }
}

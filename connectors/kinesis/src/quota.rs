//! Per-lane write quotas, enforced before each PutRecords call.
//!
//! Each lane (one shard) has two `governor` rate limiters: records per
//! second and bytes (data + partition key) per second, both at the shard's
//! quota times `sink.quota.share`. Each allows a burst of one second's worth
//! (at least one cell), and a batch is cut to fit in that burst, so a
//! 500-record call only goes out at full rate when a second's worth of
//! quota is there.
//!
//! On top sits an adaptive factor for when Kinesis still throttles (another
//! producer on the same shard, a hot key): a throttle halves it (down to
//! 1/64), every fully accepted call adds 1/20 back (up to 1). The factor is
//! applied by charging `cells / factor` per call and shrinking the batch
//! limits by the same factor, so the limiters themselves never change.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The lowest adaptive factor.
const MIN_FACTOR: f64 = 1.0 / 64.0;
/// What one fully accepted call gives back.
const RECOVERY_STEP: f64 = 0.05;

/// One rate limiter with its burst.
#[derive(Debug)]
struct Limiter {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Limiter {
    /// A limiter of `per_sec` cells per second (may be fractional, > 0),
    /// bursting one second's worth.
    fn new(per_sec: f64) -> Self {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            1.0
        };
        let burst = per_sec.floor().clamp(1.0, f64::from(u32::MAX)) as u32;
        let period = Duration::from_secs_f64(1.0 / per_sec).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("the period is at least one nanosecond")
            .allow_burst(NonZeroU32::new(burst).expect("the burst is at least one"));
        Self {
            limiter: RateLimiter::direct(quota),
            burst,
        }
    }

    /// Waits for `cells` (at most the burst: a bigger request takes a full burst).
    async fn take(&self, cells: f64) {
        let cells = cells.ceil().clamp(1.0, f64::from(self.burst)) as u32;
        let cells = NonZeroU32::new(cells).expect("clamped to at least one");
        self.limiter
            .until_n_ready(cells)
            .await
            .expect("cells never exceed the burst");
    }
}

/// The quotas of one lane.
#[derive(Debug)]
pub(crate) struct LaneQuota {
    records: Limiter,
    bytes: Limiter,
    factor: f64,
}

impl LaneQuota {
    /// Quotas of `records_per_sec` and `bytes_per_sec` (already times the share).
    pub(crate) fn new(records_per_sec: f64, bytes_per_sec: f64) -> Self {
        Self {
            records: Limiter::new(records_per_sec),
            bytes: Limiter::new(bytes_per_sec),
            factor: 1.0,
        }
    }

    /// The most records one call may carry now (at least one).
    pub(crate) fn max_records(&self) -> usize {
        (f64::from(self.records.burst) * self.factor)
            .floor()
            .max(1.0) as usize
    }

    /// The most bytes one call may carry now (at least one; a single
    /// record larger than this still goes alone).
    pub(crate) fn max_bytes(&self) -> usize {
        (f64::from(self.bytes.burst) * self.factor).floor().max(1.0) as usize
    }

    /// Waits until a call of `records` records and `bytes` bytes fits in the quota.
    pub(crate) async fn acquire(&self, records: usize, bytes: usize) {
        self.records.take(records as f64 / self.factor).await;
        self.bytes.take(bytes as f64 / self.factor).await;
    }

    /// Kinesis throttled this lane: halve the rate.
    pub(crate) fn throttled(&mut self) {
        self.factor = (self.factor / 2.0).max(MIN_FACTOR);
    }

    /// A call went through without a throttle: recover a step.
    pub(crate) fn accepted(&mut self) {
        self.factor = (self.factor + RECOVERY_STEP).min(1.0);
    }

    /// The adaptive factor, in [1/64, 1].
    pub(crate) fn factor(&self) -> f64 {
        self.factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_are_one_second_of_quota() {
        let quota = LaneQuota::new(1000.0 * 0.25, 1_048_576.0);
        assert_eq!(quota.max_records(), 250);
        assert_eq!(quota.max_bytes(), 1_048_576);
        let tiny = LaneQuota::new(0.5, 10.0);
        assert_eq!(tiny.max_records(), 1);
        assert_eq!(tiny.max_bytes(), 10);
    }

    #[test]
    fn throttles_halve_and_successes_recover_slowly() {
        let mut quota = LaneQuota::new(1000.0, 1_000_000.0);
        quota.throttled();
        assert_eq!(quota.factor(), 0.5);
        assert_eq!(quota.max_records(), 500);
        for _ in 0..20 {
            quota.throttled();
        }
        assert_eq!(quota.factor(), MIN_FACTOR);
        assert_eq!(quota.max_records(), 15);
        quota.accepted();
        assert!(quota.factor() > MIN_FACTOR && quota.factor() < 0.1);
        for _ in 0..40 {
            quota.accepted();
        }
        assert_eq!(quota.factor(), 1.0);
    }

    #[tokio::test]
    async fn after_the_burst_the_next_call_waits() {
        let quota = LaneQuota::new(20.0, 1_000_000.0);
        quota.acquire(20, 100).await;
        let start = std::time::Instant::now();
        quota.acquire(2, 100).await;
        // Two records at 20/s take about 100 ms to come back.
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
    }
}

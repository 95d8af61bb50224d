//! Per-lane write quotas, enforced before each PutRecords call.
//!
//! Each lane (one shard) has two `governor` rate limiters: records per
//! second and bytes (data + partition key) per second, both at the shard's
//! quota times `sink.quota.share`. Each allows a burst of a fifth of a
//! second's worth ([`BURST_SECS`], at least one cell), and a batch is cut
//! to fit in that burst: a lane idle for a while sends at most that much
//! on top of the rate, so any window of a few seconds stays within a few
//! percent of the quota (with a burst of a whole second, a lane that woke
//! up sent twice its quota in its first second). The limiters start
//! empty, so a new lane's first seconds keep to the rate too. A single
//! record bigger than the byte burst still goes, alone, once its full size
//! has accrued.
//!
//! On top sits an adaptive factor for when Kinesis still throttles (another
//! producer on the same shard, a hot key). It is controlled on the refused
//! fraction over a window of about a second (Kinesis counts per second),
//! not on single refusals: an "any refusal halves the rate" rule drives a
//! shard to its floor when a steady 10% of entries are refused at random,
//! since almost every call then carries one refusal. At the end of each
//! window in which a fraction `f` of the entries sent came back throttled,
//! the factor becomes what the shard accepted, `factor * (1 - f)`, plus 10%
//! headroom to find out whether more fits, but never less than half of what
//! it was; every window then adds a fixed step back (additive recovery).
//! So random refusals of a fixed fraction cost about that fraction, while
//! a shard that takes only half of what the lane sends settles near half.
//! The factor is applied by charging `cells / factor` per call and
//! shrinking the batch limits by the same factor, so the limiters
//! themselves never change.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The lowest adaptive factor.
const MIN_FACTOR: f64 = 1.0 / 64.0;
/// What every window gives back (additive recovery).
const RECOVERY_STEP: f64 = 0.02;
/// Over what the shard accepted, the share the lane tries next window.
const HEADROOM: f64 = 0.1;
/// The most one window may take off: at most half.
const MAX_CUT: f64 = 0.5;
/// The burst, in seconds of quota: what a lane may send at once after a pause.
pub(crate) const BURST_SECS: f64 = 0.2;
/// How long the refused fraction is measured before the factor moves.
pub(crate) const WINDOW: Duration = Duration::from_secs(1);

/// Entries sent and refused as throttled since the window opened.
#[derive(Debug)]
struct Window {
    opened: Instant,
    sent: u64,
    throttled: u64,
}

/// One rate limiter with its burst.
#[derive(Debug)]
struct Limiter {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Limiter {
    /// A limiter of `per_sec` cells per second (may be fractional, > 0),
    /// bursting [`BURST_SECS`] worth (at least one cell).
    fn new(per_sec: f64) -> Self {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            1.0
        };
        let burst = (per_sec * BURST_SECS)
            .floor()
            .clamp(1.0, f64::from(u32::MAX)) as u32;
        let period = Duration::from_secs_f64(1.0 / per_sec).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("the period is at least one nanosecond")
            .allow_burst(NonZeroU32::new(burst).expect("the burst is at least one"));
        let limiter = RateLimiter::direct(quota);
        // Start empty: the first burst accrues like every later one, so
        // the first seconds are not over the rate either (a process
        // restarted right after its predecessor sent at full rate
        // included).
        let _ = limiter.check_n(NonZeroU32::new(burst).expect("the burst is at least one"));
        Self { limiter, burst }
    }

    /// Waits for `cells` (at least one); a request bigger than the burst
    /// is taken one burst after the other, so it is charged in full.
    async fn take(&self, cells: f64) {
        let mut left = cells.ceil().clamp(1.0, u64::MAX as f64) as u64;
        while left > 0 {
            let now = left.min(u64::from(self.burst));
            left -= now;
            let now = u32::try_from(now).expect("at most the burst, a u32");
            let now = NonZeroU32::new(now).expect("at least one cell");
            self.limiter
                .until_n_ready(now)
                .await
                .expect("cells never exceed the burst");
        }
    }
}

/// The quotas of one lane.
#[derive(Debug)]
pub(crate) struct LaneQuota {
    records: Limiter,
    bytes: Limiter,
    factor: f64,
    window: Window,
}

impl LaneQuota {
    /// Quotas of `records_per_sec` and `bytes_per_sec` (already times the share).
    pub(crate) fn new(records_per_sec: f64, bytes_per_sec: f64) -> Self {
        Self {
            records: Limiter::new(records_per_sec),
            bytes: Limiter::new(bytes_per_sec),
            factor: 1.0,
            window: Window {
                opened: Instant::now(),
                sent: 0,
                throttled: 0,
            },
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

    /// Counts an answered call: `sent` entries of which `throttled` were
    /// refused as throttled (a whole call refused counts all its entries).
    /// Moves the factor when the window is over.
    pub(crate) fn observe(&mut self, sent: usize, throttled: usize) {
        self.observe_at(sent, throttled, Instant::now());
    }

    fn observe_at(&mut self, sent: usize, throttled: usize, now: Instant) {
        self.window.sent += sent as u64;
        self.window.throttled += throttled.min(sent) as u64;
        if now.duration_since(self.window.opened) < WINDOW || self.window.sent == 0 {
            return;
        }
        let refused = self.window.throttled as f64 / self.window.sent as f64;
        if refused > 0.0 {
            let accepted = self.factor * (1.0 - refused) * (1.0 + HEADROOM);
            self.factor = accepted.max(self.factor * (1.0 - MAX_CUT)).min(self.factor);
        }
        self.factor = (self.factor + RECOVERY_STEP).clamp(MIN_FACTOR, 1.0);
        self.window = Window {
            opened: now,
            sent: 0,
            throttled: 0,
        };
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
    fn bursts_are_a_fifth_of_a_second_of_quota() {
        let quota = LaneQuota::new(1000.0 * 0.25, 1_048_576.0);
        assert_eq!(quota.max_records(), 50);
        assert_eq!(quota.max_bytes(), 209_715);
        let tiny = LaneQuota::new(0.5, 10.0);
        assert_eq!(tiny.max_records(), 1);
        assert_eq!(tiny.max_bytes(), 2);
    }

    /// Feeds `windows` one-second windows of 10 calls of 100 entries, each
    /// call with `refused` of them throttled; returns the factor after each.
    fn windows(quota: &mut LaneQuota, windows: usize, refused: impl Fn(f64) -> usize) -> Vec<f64> {
        let mut now = quota.window.opened;
        let mut factors = Vec::new();
        for _ in 0..windows {
            for _ in 0..10 {
                now += WINDOW / 10;
                quota.observe_at(100, refused(quota.factor), now);
            }
            factors.push(quota.factor);
        }
        factors
    }

    #[test]
    fn random_refusals_of_a_fixed_fraction_keep_the_rate() {
        let mut quota = LaneQuota::new(1000.0, 1_000_000.0);
        let factors = windows(&mut quota, 120, |_| 10);
        // 10% refused whatever the rate: the lane keeps its full rate (the
        // old "halve on any refusal" rule sat at 1/64 here).
        assert!(factors.iter().all(|&f| f >= 0.95), "{factors:?}");
        assert!(quota.max_records() >= 190);
    }

    #[test]
    fn a_shard_that_takes_less_brings_the_rate_near_what_it_takes() {
        let mut quota = LaneQuota::new(1000.0, 1_000_000.0);
        // The shard takes 40% of the lane's full rate: at factor `f` the
        // lane sends `f` and `max(0, f - 0.4) / f` of it is refused.
        let factors = windows(&mut quota, 30, |f| {
            (((f - 0.4).max(0.0) / f) * 100.0).round() as usize
        });
        let settled = &factors[10..];
        assert!(
            settled.iter().all(|&f| (0.4..=0.55).contains(&f)),
            "{factors:?}"
        );
        // The first window cuts by at most half.
        assert!(factors[0] >= 0.5, "{factors:?}");
    }

    #[test]
    fn a_full_refusal_halves_and_clean_windows_recover_additively() {
        let mut quota = LaneQuota::new(1000.0, 1_000_000.0);
        let factors = windows(&mut quota, 1, |_| 100);
        assert!(
            (factors[0] - (0.5 + RECOVERY_STEP)).abs() < 1e-9,
            "{factors:?}"
        );
        let factors = windows(&mut quota, 40, |_| 100);
        // Halving plus a step settles at two steps: the lane keeps probing.
        assert!(
            (factors.last().unwrap() - 2.0 * RECOVERY_STEP).abs() < 1e-6,
            "{factors:?}"
        );
        let factors = windows(&mut quota, 10, |_| 0);
        for pair in factors.windows(2) {
            assert!(
                (pair[1] - pair[0] - RECOVERY_STEP).abs() < 1e-9,
                "{factors:?}"
            );
        }
        let factors = windows(&mut quota, 60, |_| 0);
        assert_eq!(*factors.last().unwrap(), 1.0);
    }

    #[test]
    fn the_factor_moves_only_when_a_window_is_over() {
        let mut quota = LaneQuota::new(1000.0, 1_000_000.0);
        let opened = quota.window.opened;
        quota.observe_at(100, 100, opened + WINDOW / 2);
        assert_eq!(quota.factor(), 1.0);
        quota.observe_at(100, 0, opened + WINDOW);
        // Half of 200 refused over the window: 1 * 0.5 * 1.1 + step.
        assert!((quota.factor() - (0.55 + RECOVERY_STEP)).abs() < 1e-9);
    }

    #[tokio::test]
    async fn the_first_burst_accrues_and_after_it_the_next_call_waits() {
        let quota = LaneQuota::new(100.0, 1_000_000.0);
        let start = std::time::Instant::now();
        // A new lane starts empty: its 20-record burst takes 200 ms.
        quota.acquire(20, 100).await;
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
        let start = std::time::Instant::now();
        quota.acquire(2, 100).await;
        // Two records at 100/s take about 20 ms to come back.
        assert!(
            start.elapsed() >= Duration::from_millis(12),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn a_record_bigger_than_the_byte_burst_is_charged_in_full() {
        // 1,000 bytes/s: a burst of 200 bytes.
        let quota = LaneQuota::new(1_000_000.0, 1000.0);
        assert_eq!(quota.max_bytes(), 200);
        let start = std::time::Instant::now();
        // A new lane starts empty: all 500 bytes take 500 ms.
        quota.acquire(1, 500).await;
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "{:?}",
            start.elapsed()
        );
    }
}

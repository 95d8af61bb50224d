//! Which failures a retry can fix, how long to wait before the next try, and
//! how often to say so in the log.
//!
//! Whole-call failures are sorted into three classes: throttling (retry and
//! slow the lane down), other transient failures (timeouts, 5xx, network
//! errors, expired credentials: retry), and permanent ones (missing stream,
//! access denied, validation, disabled KMS key: stop the sink). Entry
//! failures inside a PutRecords answer are sorted by their error code.

use std::time::{Duration, Instant};

use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use rand::Rng as _;

use crate::config::RetryPolicy;

/// How a failed call should be handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Kinesis (or KMS) throttled the call: retry after a backoff and slow down.
    Throttled,
    /// A retry can fix it: retry after a backoff.
    Transient,
    /// A retry cannot fix it: stop.
    Permanent,
}

/// Sorts an SDK error. `typed` looks at the operation's modeled error first
/// (modeled errors built in tests carry no error code); anything it does
/// not decide is sorted by error code and HTTP status.
pub(crate) fn classify<E: ProvideErrorMetadata>(
    err: &SdkError<E>,
    typed: impl Fn(&E) -> Option<Failure>,
) -> Failure {
    match err {
        SdkError::ConstructionFailure(_) => Failure::Permanent,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Transient
        }
        SdkError::ServiceError(ctx) => typed(ctx.err())
            .unwrap_or_else(|| classify_code(ctx.err().code(), ctx.raw().status().as_u16())),
        _ => Failure::Transient,
    }
}

/// Sorts a service error by its code, then by its HTTP status: unknown 5xx,
/// 408 and 429 are transient, other unknown 4xx are permanent.
pub(crate) fn classify_code(code: Option<&str>, status: u16) -> Failure {
    match code.unwrap_or_default() {
        "ProvisionedThroughputExceededException"
        | "KMSThrottlingException"
        | "LimitExceededException"
        | "ThrottlingException"
        | "Throttling"
        | "ThrottledException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException"
        | "RequestThrottledException"
        | "RequestThrottled"
        | "BandwidthLimitExceeded"
        | "PriorRequestNotComplete"
        | "TransactionInProgressException"
        | "EC2ThrottledException"
        | "SlowDown" => Failure::Throttled,
        "InternalFailure"
        | "InternalFailureException"
        | "InternalServerError"
        | "ServiceUnavailable"
        | "ResourceInUseException"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "RequestTimeout"
        | "RequestTimeoutException"
        | "IDPCommunicationError" => Failure::Transient,
        _ if status >= 500 || status == 408 || status == 429 => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// True for the entry error codes Kinesis documents as worth retrying:
/// `ProvisionedThroughputExceededException` and `InternalFailure` (plus
/// KMS throttling, which is a throttle too).
pub(crate) fn entry_error_is_retryable(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException"
            | "InternalFailure"
            | "InternalFailureException"
            | "KMSThrottlingException"
    )
}

/// True for an entry error code that means the shard was throttled.
pub(crate) fn entry_error_is_throttle(code: &str) -> bool {
    matches!(
        code,
        "ProvisionedThroughputExceededException" | "KMSThrottlingException"
    )
}

/// Exponential backoff with jitter: the n-th consecutive failure waits
/// `initial * 2^n`, capped at `max`, jittered to between half and all of it.
#[derive(Debug)]
pub(crate) struct Backoff {
    policy: RetryPolicy,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// The delay before the next try; counts one more failure.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let full = self
            .policy
            .initial_backoff
            .saturating_mul(1 << self.failures.min(20))
            .min(self.policy.max_backoff);
        self.failures = self.failures.saturating_add(1);
        let half = full / 2;
        let jitter_nanos =
            rand::rng().random_range(0..=half.as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    /// Consecutive failures so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// A success: the next failure starts from the initial delay again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Lets a warning through at most once per interval and counts the rest.
#[derive(Debug)]
pub(crate) struct WarnGate {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl WarnGate {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a warning may be logged now, `n` being how many were
    /// held back since the last one; `None` when this one is held back.
    pub(crate) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// How often a lane may warn about the same kind of failure.
pub(crate) const WARN_EVERY: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_sorted() {
        assert_eq!(
            classify_code(Some("ProvisionedThroughputExceededException"), 400),
            Failure::Throttled
        );
        assert_eq!(
            classify_code(Some("InternalFailure"), 500),
            Failure::Transient
        );
        assert_eq!(classify_code(None, 503), Failure::Transient);
        assert_eq!(classify_code(None, 429), Failure::Transient);
        assert_eq!(
            classify_code(Some("ResourceNotFoundException"), 400),
            Failure::Permanent
        );
        assert_eq!(
            classify_code(Some("AccessDeniedException"), 400),
            Failure::Permanent
        );
        assert_eq!(
            classify_code(Some("ValidationException"), 400),
            Failure::Permanent
        );
        assert!(entry_error_is_retryable("InternalFailure"));
        assert!(entry_error_is_retryable(
            "ProvisionedThroughputExceededException"
        ));
        assert!(!entry_error_is_retryable("KMSAccessDeniedException"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1_000),
            max_rejections: 3,
        };
        let mut backoff = Backoff::new(policy);
        let bounds = [100, 200, 400, 800, 1_000, 1_000];
        for full in bounds {
            let delay = backoff.next_delay();
            let full = Duration::from_millis(full);
            assert!(delay >= full / 2 && delay <= full, "{delay:?} vs {full:?}");
        }
        assert_eq!(backoff.failures(), 6);
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn the_gate_counts_what_it_holds_back() {
        let mut gate = WarnGate::new(Duration::from_secs(3600));
        assert_eq!(gate.allow(), Some(0));
        assert_eq!(gate.allow(), None);
        assert_eq!(gate.allow(), None);
        gate.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(gate.allow(), Some(2));
    }
}

//! The Kinesis client: the standard AWS credential chain (environment,
//! profile, web identity / IRSA, instance metadata), the standard retry
//! policy, and timeouts on every call (the SDK sets none by default).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::Client;

use crate::config::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, KinesisSinkConfig};

/// A client for `region` (and `endpoint_url`, for emulators and VPC
/// endpoints) with the default timeouts: 30 s per attempt, 5 s to connect.
pub async fn build_client(region: &str, endpoint_url: Option<&str>) -> Client {
    build_client_with_timeouts(
        region,
        endpoint_url,
        DEFAULT_REQUEST_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT,
    )
    .await
}

/// A client for the sink's region, endpoint and timeouts.
pub async fn build_sink_client(config: &KinesisSinkConfig) -> Client {
    build_client_with_timeouts(
        &config.region,
        config.endpoint_url.as_deref(),
        config.request_timeout,
        config.connect_timeout,
    )
    .await
}

/// A client with explicit timeouts. `request_timeout` bounds one attempt;
/// the whole operation, with the SDK's own retries (standard policy: three
/// attempts), may take four times as long.
pub async fn build_client_with_timeouts(
    region: &str,
    endpoint_url: Option<&str>,
    request_timeout: Duration,
    connect_timeout: Duration,
) -> Client {
    Client::new(&sdk_config(region, endpoint_url, request_timeout, connect_timeout).await)
}

/// The SDK configuration behind [`build_client_with_timeouts`]; it holds the
/// credential chain, which a [`Client`] no longer exposes.
pub(crate) async fn sdk_config(
    region: &str,
    endpoint_url: Option<&str>,
    request_timeout: Duration,
    connect_timeout: Duration,
) -> SdkConfig {
    let timeouts = TimeoutConfig::builder()
        .operation_attempt_timeout(request_timeout)
        .operation_timeout(request_timeout.saturating_mul(4))
        .connect_timeout(connect_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .timeout_config(timeouts)
        .retry_config(RetryConfig::standard());
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_client_has_timeouts_and_the_endpoint() {
        let client = build_client_with_timeouts(
            "eu-west-1",
            Some("http://127.0.0.1:4567"),
            Duration::from_secs(7),
            Duration::from_secs(2),
        )
        .await;
        let config = client.config();
        assert_eq!(config.region().map(|r| r.as_ref()), Some("eu-west-1"));
        let timeouts = config.timeout_config().expect("timeouts are set");
        assert_eq!(
            timeouts.operation_attempt_timeout(),
            Some(Duration::from_secs(7))
        );
        assert_eq!(timeouts.operation_timeout(), Some(Duration::from_secs(28)));
        assert_eq!(timeouts.connect_timeout(), Some(Duration::from_secs(2)));
        let retry = config.retry_config().expect("retry config is set");
        assert_eq!(retry.max_attempts(), 3);
    }
}

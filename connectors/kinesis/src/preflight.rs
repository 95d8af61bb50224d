//! Start-up checks of the Kinesis side: credentials and the stream, before
//! anything else is touched.
//!
//! This runs ahead of the dataflow: `tributary run` calls it before the
//! source creates or reads its replication slot, `tributary tail` before it
//! reads a shard. A missing credential chain or stream is a mistake a
//! restart cannot fix, so it is found here, in one message with the fix,
//! rather than by the first record, seconds or hours later, in a retry loop.
//! Streams named by a template are checked by the sink when first used,
//! with the same message ([`PreflightError::stream_not_found`]).
//!
//! Messages are written from the SDK's error codes and texts, never from
//! its `Debug` output.

use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials as _;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::describe_stream_summary::DescribeStreamSummaryError;
use aws_sdk_kinesis::types::StreamStatus;
use thiserror::Error;
use tributary_envelope::error_text::one_line;

use crate::client::sdk_config;
use crate::shards::DEFAULT_MAX_RECORD_BYTES;

/// How long resolving the credential chain may take (instance metadata
/// that does not answer is the slow case).
pub const CREDENTIALS_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the standard chain looks, in its order; part of every message
/// about missing credentials.
pub const CREDENTIAL_CHAIN: &str = "environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), \
     profile (AWS_PROFILE, ~/.aws/credentials), web identity / IRSA (AWS_ROLE_ARN and \
     AWS_WEB_IDENTITY_TOKEN_FILE), container or instance metadata (an ECS task or EC2 instance role)";

/// What the stream check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSummary {
    /// The stream's name.
    pub name: String,
    /// Open shards.
    pub open_shards: usize,
    /// The largest record the stream takes, in bytes.
    pub max_record_bytes: usize,
}

/// A start-up check that failed.
#[derive(Debug, Error)]
pub enum PreflightError {
    /// No provider of the chain had credentials; `detail` is what the
    /// last one tried said when it failed rather than found nothing (a
    /// broken profile, an unreadable web identity token, instance metadata
    /// that refused).
    #[error(
        "no AWS credentials found{}; the chain looked in: {CREDENTIAL_CHAIN}. Set one of them",
        detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    NoCredentials {
        /// The failing provider's error, with its causes.
        detail: Option<String>,
    },
    /// The chain did not answer in time (usually instance metadata that is
    /// not reachable off AWS).
    #[error(
        "no AWS credentials found within {}s; the chain looked in: {CREDENTIAL_CHAIN}. Set one of them",
        CREDENTIALS_TIMEOUT.as_secs()
    )]
    CredentialsTimedOut,
    /// Kinesis refused the credentials (unknown key, bad secret, expired
    /// session token).
    #[error(
        "Kinesis rejected the AWS credentials ({detail}); check the access key, secret and session token"
    )]
    CredentialsRejected {
        /// Kinesis' error code and message.
        detail: String,
    },
    /// The stream does not exist (or is being deleted).
    #[error(
        "kinesis stream `{stream}` does not exist in {region}: create it (aws kinesis create-stream --stream-name {stream} --shard-count 1) or fix {key}"
    )]
    StreamNotFound {
        /// The stream's name.
        stream: String,
        /// The region asked.
        region: String,
        /// Where the name came from: `sink.stream` or `--stream`.
        key: String,
    },
    /// The stream exists but cannot take or give records yet.
    #[error(
        "kinesis stream `{stream}` is {status}, not ACTIVE: wait until it is ACTIVE, then start again"
    )]
    StreamNotActive {
        /// The stream's name.
        stream: String,
        /// Its status.
        status: String,
    },
    /// The credentials may not describe the stream.
    #[error(
        "not allowed to read kinesis stream `{stream}` ({detail}): grant kinesis:DescribeStreamSummary, kinesis:ListShards and kinesis:PutRecords (tail: kinesis:GetShardIterator and kinesis:GetRecords) on it"
    )]
    AccessDenied {
        /// The stream's name.
        stream: String,
        /// Kinesis' error code and message.
        detail: String,
    },
    /// Kinesis could not be reached or answered with an error a later
    /// attempt may not get.
    #[error("cannot check kinesis stream `{stream}`: {detail}")]
    Unavailable {
        /// The stream's name.
        stream: String,
        /// What went wrong, with its causes.
        detail: String,
    },
}

impl PreflightError {
    /// The message for a stream that does not exist, also used when a
    /// stream named by a template is first written.
    pub fn stream_not_found(region: &str, stream: &str, key: &str) -> Self {
        PreflightError::StreamNotFound {
            stream: stream.to_owned(),
            region: region.to_owned(),
            key: key.to_owned(),
        }
    }

    /// True when a person must change something (configuration,
    /// credentials, permissions, the stream); false when starting again
    /// later may work (Kinesis unreachable, a stream still being created).
    pub fn needs_a_person(&self) -> bool {
        !matches!(
            self,
            PreflightError::Unavailable { .. } | PreflightError::StreamNotActive { .. }
        )
    }
}

/// A client for `region` (and `endpoint_url`) whose credential chain was
/// resolved once, within [`CREDENTIALS_TIMEOUT`]; the timeouts are those of
/// [`crate::build_client_with_timeouts`].
pub async fn checked_client(
    region: &str,
    endpoint_url: Option<&str>,
    request_timeout: Duration,
    connect_timeout: Duration,
) -> Result<Client, PreflightError> {
    let config = sdk_config(region, endpoint_url, request_timeout, connect_timeout).await;
    let provider = config
        .credentials_provider()
        .ok_or(PreflightError::NoCredentials { detail: None })?;
    match tokio::time::timeout(CREDENTIALS_TIMEOUT, provider.provide_credentials()).await {
        Err(_) => Err(PreflightError::CredentialsTimedOut),
        Ok(Ok(_)) => Ok(Client::new(&config)),
        Ok(Err(CredentialsError::CredentialsNotLoaded(_))) => {
            Err(PreflightError::NoCredentials { detail: None })
        }
        Ok(Err(CredentialsError::ProviderTimedOut(_))) => Err(PreflightError::CredentialsTimedOut),
        Ok(Err(err)) => Err(PreflightError::NoCredentials {
            detail: Some(one_line(&err)),
        }),
    }
}

/// Reads the stream's summary: it must exist and be ACTIVE (or UPDATING,
/// which still takes records). `key` names where the stream's name came
/// from (`sink.stream`, `--stream`) for the fix in the message.
pub async fn check_stream(
    client: &Client,
    stream: &str,
    key: &str,
) -> Result<StreamSummary, PreflightError> {
    let output = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|err| describe_failure(client, stream, key, err))?;
    let Some(summary) = output.stream_description_summary() else {
        return Err(PreflightError::Unavailable {
            stream: stream.to_owned(),
            detail: "Kinesis answered without a stream description".to_owned(),
        });
    };
    match summary.stream_status() {
        StreamStatus::Active | StreamStatus::Updating => {}
        StreamStatus::Deleting => {
            return Err(PreflightError::stream_not_found(
                &region_of(client),
                stream,
                key,
            ));
        }
        other => {
            return Err(PreflightError::StreamNotActive {
                stream: stream.to_owned(),
                status: other.as_str().to_owned(),
            });
        }
    }
    let max_record_bytes = summary
        .max_record_size_in_kib()
        .and_then(|kib| usize::try_from(kib).ok())
        .filter(|&kib| kib > 0)
        .map_or(DEFAULT_MAX_RECORD_BYTES, |kib| kib * 1024);
    Ok(StreamSummary {
        name: stream.to_owned(),
        open_shards: usize::try_from(summary.open_shard_count()).unwrap_or(0),
        max_record_bytes,
    })
}

fn describe_failure(
    client: &Client,
    stream: &str,
    key: &str,
    err: SdkError<DescribeStreamSummaryError>,
) -> PreflightError {
    if let Some(service) = err.as_service_error() {
        let detail = match (service.code(), service.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => one_line(&err),
        };
        return match service {
            DescribeStreamSummaryError::ResourceNotFoundException(_) => {
                PreflightError::stream_not_found(&region_of(client), stream, key)
            }
            DescribeStreamSummaryError::AccessDeniedException(_) => PreflightError::AccessDenied {
                stream: stream.to_owned(),
                detail,
            },
            _ if matches!(
                service.code(),
                Some(
                    "UnrecognizedClientException"
                        | "InvalidSignatureException"
                        | "ExpiredTokenException"
                        | "InvalidClientTokenId"
                )
            ) =>
            {
                PreflightError::CredentialsRejected { detail }
            }
            _ => PreflightError::Unavailable {
                stream: stream.to_owned(),
                detail,
            },
        };
    }
    PreflightError::Unavailable {
        stream: stream.to_owned(),
        detail: format!(
            "Kinesis ({}) did not answer: {}",
            region_of(client),
            one_line(&err)
        ),
    }
}

fn region_of(client: &Client) -> String {
    client
        .config()
        .region()
        .map_or_else(|| "the default region".to_owned(), |r| r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mistakes_need_a_person() {
        let none = PreflightError::NoCredentials { detail: None };
        assert!(none.needs_a_person());
        assert!(none.to_string().contains("AWS_ACCESS_KEY_ID"));
        let missing = PreflightError::StreamNotFound {
            stream: "s".into(),
            region: "us-east-1".into(),
            key: "--stream".into(),
        };
        assert!(missing.needs_a_person());
        assert!(missing.to_string().contains("fix --stream"));
        let down = PreflightError::Unavailable {
            stream: "s".into(),
            detail: "x".into(),
        };
        assert!(!down.needs_a_person());
    }
}

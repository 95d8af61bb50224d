//! `tributary check`: may these credentials write to the stream? Asked
//! without writing anything.
//!
//! Beside the dataflow, before it starts. The probe is a PutRecord whose
//! explicit hash key is 2^128, one past the largest Kinesis accepts: Kinesis
//! authorizes the call first and then refuses the argument, so an
//! `InvalidArgumentException` means the write was permitted and nothing
//! reached the stream, while `AccessDeniedException` means a write would be
//! refused.

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::ProvideErrorMetadata as _;
use aws_sdk_kinesis::primitives::Blob;
use tributary_envelope::error_text::one_line;

/// 2^128: one past the largest explicit hash key.
const OUT_OF_RANGE_HASH_KEY: &str = "340282366920938463463374607431768211456";

/// What the probe learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteProbe {
    /// Kinesis authorized the write (and refused only the probe's argument).
    Permitted,
    /// Kinesis refused the write for lack of permission: the detail is its
    /// code and message.
    Denied(String),
    /// Anything else (unreachable, a stream that vanished): the detail.
    Unknown(String),
}

/// Probes whether a PutRecord to `stream` is permitted, writing nothing.
pub async fn probe_write(client: &Client, stream: &str) -> WriteProbe {
    let result = client
        .put_record()
        .stream_name(stream)
        .partition_key("tributary-check")
        .explicit_hash_key(OUT_OF_RANGE_HASH_KEY)
        .data(Blob::new(
            b"tributary check: this record is never written".to_vec(),
        ))
        .send()
        .await;
    let err = match result {
        // Should not happen; if Kinesis took it, a write is permitted.
        Ok(_) => return WriteProbe::Permitted,
        Err(err) => err,
    };
    let Some(service) = err.as_service_error() else {
        return WriteProbe::Unknown(one_line(&err));
    };
    let detail = format!(
        "{}: {}",
        service.code().unwrap_or("error"),
        service.message().unwrap_or("")
    );
    match service.code() {
        Some("InvalidArgumentException") => WriteProbe::Permitted,
        Some("AccessDeniedException") => WriteProbe::Denied(detail),
        _ => WriteProbe::Unknown(detail),
    }
}

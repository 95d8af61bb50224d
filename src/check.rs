//! `tributary check [--json]`: everything that would stop or endanger the
//! pipeline, one line per item, each problem with its fix.
//!
//! Beside the dataflow, before it starts. The source and the sink each
//! return their own [`CheckItem`]s (the SQL lives in the source's crate);
//! this module only gathers and renders them. Exit 0 when no item failed
//! (warnings allowed), 2 otherwise.
//!
//! The `--json` document (stable, see `docs/operations.md`):
//! `{"version": 1, "ok": bool, "failures": n, "warnings": n, "items":
//! [{"component", "check", "status": "ok"|"warn"|"fail", "message", "fix"?}]}`.

use std::time::Duration;

use serde_json::json;
use tributary_envelope::{CheckItem, CheckStatus};
use tributary_kinesis::{PreflightError, WriteProbe, check_stream, checked_client, probe_write};

use crate::settings::{SinkKind, SourceConfig, Validated};

/// The `--json` document's version; bumped only on incompatible changes.
const JSON_VERSION: u32 = 1;

/// The component name of the sink's items.
const KINESIS: &str = "kinesis";

/// Runs every check; prints the report; returns the exit code.
pub async fn run(v: &Validated, as_json: bool) -> u8 {
    let mut items = match &v.source {
        SourceConfig::Postgres(config) => tributary_postgres::check::check(config).await,
        SourceConfig::Mysql(config) => tributary_mysql::check::check(config).await,
    };
    if v.settings.sink.kind == SinkKind::Kinesis {
        items.extend(kinesis_items(v).await);
    }
    let failed = items.iter().any(|i| i.status == CheckStatus::Fail);
    if as_json {
        println!("{}", render_json(&items));
    } else {
        print!("{}", render_text(&items));
    }
    if failed { 2 } else { 0 }
}

/// The sink's items: credentials, the stream, its shards and record size,
/// and whether a write is permitted.
async fn kinesis_items(v: &Validated) -> Vec<CheckItem> {
    let sink = &v.settings.sink;
    let client = match checked_client(
        &v.region,
        sink.endpoint_url.as_deref(),
        Duration::from_secs(sink.request_timeout_secs),
        Duration::from_secs(sink.connect_timeout_secs),
    )
    .await
    {
        Ok(client) => client,
        Err(err) => return vec![preflight_failure("credentials", &err)],
    };
    let mut items = vec![CheckItem::ok(
        KINESIS,
        "credentials",
        "the AWS credential chain has credentials",
    )];
    let Some(stream) = sink.stream.as_deref().filter(|s| !s.contains('{')) else {
        items.push(CheckItem::warn(
            KINESIS,
            "stream",
            "sink.stream is a template: each stream is checked when it is first written",
            "create every stream the template names before changes of its tables arrive",
        ));
        return items;
    };
    let summary = match check_stream(&client, stream, "sink.stream").await {
        Ok(summary) => summary,
        Err(err) => {
            items.push(preflight_failure("stream", &err));
            return items;
        }
    };
    items.push(CheckItem::ok(
        KINESIS,
        "stream",
        format!("stream {stream} exists and is active in {}", v.region),
    ));
    items.push(CheckItem::ok(
        KINESIS,
        "shards",
        format!("{} open shards", summary.open_shards),
    ));
    items.push(CheckItem::ok(
        KINESIS,
        "max_record_size",
        format!(
            "records up to {} KiB (larger rows go to the dead-letter store)",
            summary.max_record_bytes / 1024
        ),
    ));
    items.push(match probe_write(&client, stream).await {
        WriteProbe::Permitted => CheckItem::ok(KINESIS, "write", "PutRecords is permitted"),
        WriteProbe::Denied(detail) => CheckItem::fail(
            KINESIS,
            "write",
            format!("writing to {stream} is not permitted ({detail})"),
            format!("grant kinesis:PutRecord and kinesis:PutRecords on stream {stream}"),
        ),
        WriteProbe::Unknown(detail) => CheckItem::warn(
            KINESIS,
            "write",
            format!("could not tell whether writing to {stream} is permitted ({detail})"),
            format!("make sure kinesis:PutRecords is granted on stream {stream}"),
        ),
    });
    items
}

/// A failed start-up check as an item; the fix is the one its message names.
fn preflight_failure(check: &'static str, err: &PreflightError) -> CheckItem {
    let fix = match err {
        PreflightError::NoCredentials { .. } | PreflightError::CredentialsTimedOut => format!(
            "set AWS credentials in one of: {}",
            tributary_kinesis::CREDENTIAL_CHAIN
        ),
        PreflightError::CredentialsRejected { .. } => {
            "check the access key, secret and session token".to_owned()
        }
        PreflightError::StreamNotFound { stream, .. } => format!(
            "aws kinesis create-stream --stream-name {stream} --shard-count 1 (or fix sink.stream)"
        ),
        PreflightError::StreamNotActive { .. } => {
            "wait until the stream is ACTIVE, then check again".to_owned()
        }
        PreflightError::AccessDenied { stream, .. } => format!(
            "grant kinesis:DescribeStreamSummary, kinesis:ListShards and kinesis:PutRecords on \
             stream {stream}"
        ),
        PreflightError::Unavailable { .. } => {
            "check sink.region, sink.endpoint_url and the network path to Kinesis".to_owned()
        }
    };
    CheckItem::fail(KINESIS, check, err.to_string(), fix)
}

/// One line per item (`✓ postgres wal_level: ...`), a `fix:` line under
/// each warning and failure, and a verdict.
pub fn render_text(items: &[CheckItem]) -> String {
    let mut out = String::new();
    for item in items {
        out.push_str(&format!(
            "{} {} {}: {}\n",
            item.status.mark(),
            item.component,
            item.check,
            item.message
        ));
        if let Some(fix) = &item.fix {
            out.push_str(&format!("    fix: {fix}\n"));
        }
    }
    let (failures, warnings) = counts(items);
    if failures > 0 {
        out.push_str(&format!(
            "not ready: {failures} problem(s) stop the pipeline, {warnings} warning(s)\n"
        ));
    } else {
        out.push_str(&format!(
            "ready: the pipeline can run ({warnings} warning(s))\n"
        ));
    }
    out
}

/// The stable JSON document of `check --json`.
pub fn render_json(items: &[CheckItem]) -> serde_json::Value {
    let (failures, warnings) = counts(items);
    let items: Vec<serde_json::Value> = items
        .iter()
        .map(|item| {
            let mut value = json!({
                "component": item.component,
                "check": item.check,
                "status": item.status.as_str(),
                "message": item.message,
            });
            if let Some(fix) = &item.fix {
                value["fix"] = json!(fix);
            }
            value
        })
        .collect();
    json!({
        "version": JSON_VERSION,
        "ok": failures == 0,
        "failures": failures,
        "warnings": warnings,
        "items": items,
    })
}

fn counts(items: &[CheckItem]) -> (usize, usize) {
    let count = |status| items.iter().filter(|i| i.status == status).count();
    (count(CheckStatus::Fail), count(CheckStatus::Warn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_and_the_text_carry_every_item_and_the_verdict() {
        let items = vec![
            CheckItem::ok("postgres", "wal_level", "wal_level is logical"),
            CheckItem::warn("postgres", "slot", "missing", "created on run"),
            CheckItem::fail("kinesis", "stream", "no stream", "create it"),
        ];
        let doc = render_json(&items);
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["ok"], false);
        assert_eq!(doc["failures"], 1);
        assert_eq!(doc["warnings"], 1);
        assert_eq!(doc["items"][2]["status"], "fail");
        assert_eq!(doc["items"][2]["fix"], "create it");
        assert!(doc["items"][0].get("fix").is_none());
        let text = render_text(&items);
        assert!(text.contains("✓ postgres wal_level: wal_level is logical\n"));
        assert!(text.contains("✗ kinesis stream: no stream\n    fix: create it\n"));
        assert!(text.ends_with("not ready: 1 problem(s) stop the pipeline, 1 warning(s)\n"));
        assert!(render_text(&items[..2]).starts_with("✓"));
        assert_eq!(render_json(&items[..2])["ok"], true);
    }
}

//! `tributary tail --validate`: checks every envelope a stream holds against
//! the envelope's JSON Schema (`schema/envelope.v1.json`, built into the
//! binary) as it passes by, and reports the ones that do not conform.
//!
//! The consumers' side of the dataflow: `tail` writes one JSON line per
//! record; each line is validated and passed on unchanged (to stdout or the
//! `--pretty` printer), and each failure is reported on stderr with the
//! envelope's `id` and the first errors. The first failures are reported in
//! full; past that only counted.

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

/// The envelope's JSON Schema, as shipped in the repository.
pub const ENVELOPE_SCHEMA: &str = include_str!("../schema/envelope.v1.json");

/// Failures reported in full before the rest are only counted.
const REPORTED: usize = 20;
/// Errors shown per failing envelope.
const ERRORS_PER_ENVELOPE: usize = 3;

/// What validation found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Records read.
    pub records: u64,
    /// Records that are not valid envelopes.
    pub invalid: u64,
}

/// Validates each line of `input` and writes it, unchanged, to `out`;
/// failures go to stderr. Returns the counts once `input` ends.
pub async fn pass_lines(
    input: impl AsyncRead + Unpin,
    out: &mut (impl AsyncWrite + Unpin),
) -> anyhow::Result<Summary> {
    let schema: Value = serde_json::from_str(ENVELOPE_SCHEMA)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|err| anyhow::anyhow!("the built-in envelope schema does not compile: {err}"))?;
    let mut summary = Summary::default();
    let mut lines = BufReader::new(input).lines();
    while let Some(line) = lines.next_line().await? {
        summary.records += 1;
        if let Some(problem) = check(&validator, &line) {
            summary.invalid += 1;
            if summary.invalid as usize <= REPORTED {
                eprintln!("{problem}");
            }
        }
        out.write_all(line.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    out.flush().await?;
    Ok(summary)
}

/// Why `line` is not a valid envelope, naming its `id`; `None` when it is.
fn check(validator: &jsonschema::Validator, line: &str) -> Option<String> {
    let envelope: Value = match serde_json::from_str(line) {
        Ok(value) => value,
        Err(err) => return Some(format!("invalid record (not JSON: {err}): {line:.120}")),
    };
    let errors: Vec<String> = validator
        .iter_errors(&envelope)
        .take(ERRORS_PER_ENVELOPE)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    if errors.is_empty() {
        return None;
    }
    let id = envelope
        .get("id")
        .map_or("(no id)".to_owned(), Value::to_string);
    Some(format!("invalid envelope {id}: {}", errors.join("; ")))
}

/// The last line `tail --validate` prints on stderr.
pub fn verdict(summary: Summary) -> String {
    if summary.invalid == 0 {
        format!("validated {} envelopes: all valid", summary.records)
    } else {
        format!(
            "validated {} envelopes: {} invalid{}",
            summary.records,
            summary.invalid,
            if summary.invalid as usize > REPORTED {
                format!(" (the first {REPORTED} are listed above)")
            } else {
                String::new()
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = r#"{"v":1,"id":"shop:00000000016B3748:00000003","op":"insert","source":{"connector":"postgres","name":"shop","db":"shop","schema":"public","table":"orders","position":"00000000016B3748:00000003","tx_id":"7781","commit_ts":"2026-11-23T05:21:05.123456Z","snapshot":false},"key":{"id":42},"before":null,"after":{"id":42},"unchanged":[],"captured_at":"2026-11-23T05:21:05.130001Z"}"#;

    #[tokio::test]
    async fn valid_envelopes_pass_and_broken_ones_are_counted() {
        let broken = VALID.replace(r#""op":"insert""#, r#""op":"upsert""#);
        let input = format!("{VALID}\n{broken}\nnot json\n");
        let mut out = Vec::new();
        let summary = pass_lines(input.as_bytes(), &mut out).await.unwrap();
        assert_eq!(
            summary,
            Summary {
                records: 3,
                invalid: 2
            }
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            input,
            "lines pass unchanged"
        );
        let schema: Value = serde_json::from_str(ENVELOPE_SCHEMA).unwrap();
        let validator = jsonschema::validator_for(&schema).unwrap();
        let problem = check(&validator, &broken).unwrap();
        assert!(
            problem.contains("shop:00000000016B3748:00000003"),
            "{problem}"
        );
        assert!(problem.contains("/op"), "{problem}");
        assert_eq!(verdict(summary), "validated 3 envelopes: 2 invalid");
    }
}

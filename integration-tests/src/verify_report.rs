//! Running `tributary verify` from a test and reading its `--json` report.

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;

use crate::process::TributaryProcess;

/// How long one `verify` may take.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(90);

/// What a `verify` run gave: exit code, stdout, logs (stderr).
pub type VerifyOutcome = (Option<i32>, String, String);

/// Runs `tributary verify -c config` with `args` and `env`, in `cwd`.
pub async fn run_verify(
    config: &Path,
    cwd: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> Result<VerifyOutcome> {
    let config = config.to_string_lossy();
    let mut full = vec!["verify", "-c", &config];
    full.extend_from_slice(args);
    let mut cmd = TributaryProcess::spawn(&full, env, cwd)?;
    let status = cmd.wait_exit(VERIFY_TIMEOUT).await?;
    Ok((status.code(), cmd.stdout(), cmd.logs()))
}

/// The report of table `name` in a `verify --json` document.
pub fn report_table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .and_then(|tables| tables.iter().find(|t| t["table"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

/// Asserts the sample keys a table's report names: `missing_keys`,
/// `extra_keys` and `different_keys`.
pub fn assert_named(table: &Value, missing: &Value, extra: &Value, different: &Value) {
    assert_eq!(&table["missing_keys"], missing, "{table:#}");
    assert_eq!(&table["extra_keys"], extra, "{table:#}");
    assert_eq!(&table["different_keys"], different, "{table:#}");
}

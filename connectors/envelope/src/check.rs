//! The items of `tributary check`: one finding about one part of the
//! pipeline, with its fix.
//!
//! `check` runs beside the dataflow, before it starts: each source and sink
//! inspects its own server and returns a list of [`CheckItem`]s; the binary
//! renders them (text with ✓ / ! / ✗, or the JSON document of
//! `docs/operations.md`) and exits 2 when any item is a
//! [`CheckStatus::Fail`]. A source adds its own items by returning more of
//! them; nothing here knows which sources exist.

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CheckStatus {
    /// Nothing to do.
    Ok,
    /// The pipeline runs, but something is at risk (disk, before-images,
    /// ordering) or will be created on the first run.
    Warn,
    /// The pipeline cannot run, or would lose changes, until this is fixed.
    Fail,
}

impl CheckStatus {
    /// The mark printed before the item: ✓, ! or ✗.
    pub fn mark(self) -> &'static str {
        match self {
            CheckStatus::Ok => "✓",
            CheckStatus::Warn => "!",
            CheckStatus::Fail => "✗",
        }
    }

    /// The name in the JSON document: `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        }
    }
}

/// One finding of `tributary check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// The part checked: `postgres`, `kinesis`, ...
    pub component: &'static str,
    /// A stable identifier of the check (`wal_level`, `replication_role`,
    /// `stream`, ...): deployment pipelines match on it.
    pub check: &'static str,
    /// Ok, warn or fail.
    pub status: CheckStatus,
    /// What was found, in one sentence.
    pub message: String,
    /// The exact SQL or setting that fixes it (fail and warn items).
    pub fix: Option<String>,
}

impl CheckItem {
    /// A passed check.
    pub fn ok(component: &'static str, check: &'static str, message: impl Into<String>) -> Self {
        CheckItem {
            component,
            check,
            status: CheckStatus::Ok,
            message: message.into(),
            fix: None,
        }
    }

    /// A risk, with what removes it.
    pub fn warn(
        component: &'static str,
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckItem::with_fix(
            CheckStatus::Warn,
            component,
            check,
            message.into(),
            fix.into(),
        )
    }

    /// A problem that stops the pipeline, with its fix.
    pub fn fail(
        component: &'static str,
        check: &'static str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        CheckItem::with_fix(
            CheckStatus::Fail,
            component,
            check,
            message.into(),
            fix.into(),
        )
    }

    fn with_fix(
        status: CheckStatus,
        component: &'static str,
        check: &'static str,
        message: String,
        fix: String,
    ) -> Self {
        CheckItem {
            component,
            check,
            status,
            message,
            fix: Some(fix),
        }
    }
}

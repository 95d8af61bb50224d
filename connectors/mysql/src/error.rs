//! Errors of the MySQL source, split by what a retry can fix.

use thiserror::Error;
use tributary_envelope::{PipelineClosed, SourceError};

/// What stops the MySQL source.
#[derive(Debug, Error)]
pub enum MysqlError {
    /// The connection failed or dropped; reconnecting may fix it.
    #[error("mysql connection failed: {context}")]
    Connection {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: mysql_async::Error,
    },
    /// The server answered a statement or the binlog request with an error
    /// that a retry does not fix (privileges, unknown objects).
    #[error("{context}")]
    Server {
        /// What was being done, and how to fix it when known.
        context: String,
        /// The cause.
        #[source]
        source: mysql_async::Error,
    },
    /// A server setting does not allow row-based capture.
    #[error("{setting}: {message}")]
    Misconfigured {
        /// The server variable or config key to change.
        setting: String,
        /// What is wrong and the statement that fixes it.
        message: String,
    },
    /// The stored offset names a binlog the server no longer has.
    #[error(
        "the stored offset {file}:{pos} is no longer on the server (binlog purged); changes after it are lost to this connector. Take a new snapshot: delete {offset_file} and start again with source.snapshot = \"initial\" (with \"never\" it starts from the server's current position and rows changed meanwhile are not sent), and raise binlog_expire_logs_seconds so it does not happen again"
    )]
    Purged {
        /// The stored binlog file.
        file: String,
        /// The stored offset in it.
        pos: u32,
        /// The offset file to delete.
        offset_file: String,
    },
    /// A binlog event could not be decoded.
    #[error("cannot decode binlog event at {file}:{pos}")]
    Decode {
        /// The binlog file.
        file: String,
        /// The event's offset.
        pos: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The offset store failed.
    #[error("offset store {path}")]
    Offset {
        /// The offset file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pipeline downstream is gone.
    #[error(transparent)]
    PipelineClosed(#[from] PipelineClosed),
}

/// The server's "could not find the binlog" error of a dump request.
const ER_MASTER_FATAL_ERROR_READING_BINLOG: u16 = 1236;

impl MysqlError {
    pub(crate) fn connection(
        context: impl Into<String>,
    ) -> impl FnOnce(mysql_async::Error) -> Self {
        let context = context.into();
        move |source| match &source {
            mysql_async::Error::Server(_) => MysqlError::Server { context, source },
            _ => MysqlError::Connection { context, source },
        }
    }

    /// True for the server error that says a requested binlog is gone.
    pub(crate) fn is_missing_binlog(&self) -> bool {
        matches!(self, MysqlError::Server { source: mysql_async::Error::Server(e), .. } if e.code == ER_MASTER_FATAL_ERROR_READING_BINLOG)
    }
}

impl SourceError for MysqlError {
    fn is_transient(&self) -> bool {
        match self {
            MysqlError::Connection { .. } => true,
            // 1236 is a definite answer about the requested position.
            MysqlError::Server { .. } => false,
            _ => false,
        }
    }

    fn misconfigured(&self) -> Option<&str> {
        match self {
            MysqlError::Misconfigured { setting, .. } => Some(setting),
            _ => None,
        }
    }
}

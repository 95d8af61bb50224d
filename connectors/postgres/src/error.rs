//! Errors of the Postgres source, split by what a retry can fix.

use thiserror::Error;

use crate::decoder::DecodeError;
use crate::pgoutput::ProtocolError;

/// What stops the Postgres source.
#[derive(Debug, Error)]
pub enum PostgresError {
    /// The connection failed or dropped; reconnecting may fix it.
    #[error("postgres connection failed: {context}")]
    Connection {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A statement failed (privileges, missing objects, bad settings).
    #[error("{context}")]
    Query {
        /// What was being done, and how to fix it when known.
        context: String,
        /// The cause.
        #[source]
        source: tokio_postgres::Error,
    },
    /// The server sent something the decoder cannot read.
    #[error("malformed replication message")]
    Protocol(#[from] ProtocolError),
    /// A change could not be decoded.
    #[error("cannot decode change")]
    Decode(#[from] DecodeError),
    /// The server settings or objects do not allow replication.
    #[error("{0}")]
    Setup(String),
    /// A TLS file named in `source.url` cannot be used.
    #[error("{0}")]
    Tls(#[source] crate::tls::TlsSetupError),
    /// A setting or a server object a person must change (exit 2): names
    /// the config key and the fix.
    #[error("{message}")]
    Misconfigured {
        /// The config key concerned (`source.postgres.publication`).
        setting: &'static str,
        /// What is wrong and the exact fix (e.g. the SQL to run).
        message: String,
    },
    /// The pipeline downstream is gone.
    #[error("the pipeline stopped receiving records")]
    PipelineClosed,
}

impl From<tributary_envelope::PipelineClosed> for PostgresError {
    fn from(_: tributary_envelope::PipelineClosed) -> Self {
        PostgresError::PipelineClosed
    }
}

impl PostgresError {
    /// True when reconnecting may fix it (a dropped connection or a server
    /// restart); false for errors that need a person.
    pub fn is_transient(&self) -> bool {
        match self {
            PostgresError::Connection { .. } => true,
            PostgresError::Query { source, .. } => {
                source.is_closed() || source.as_db_error().is_none()
            }
            _ => false,
        }
    }

    pub(crate) fn query(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Self {
        let context = context.into();
        move |source| PostgresError::Query { context, source }
    }
}

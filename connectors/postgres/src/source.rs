//! The Postgres source behind the pipeline's one [`Source`] contract: the
//! slot keeps the acknowledged position (its `confirmed_flush_lsn` is the
//! watermark), so no offset store is needed.

use tributary_envelope::{Source, SourceContext, SourceError, Stopped};

use crate::config::PostgresSourceConfig;
use crate::error::PostgresError;
use crate::replication::PostgresSource;

impl SourceError for PostgresError {
    fn is_transient(&self) -> bool {
        PostgresError::is_transient(self)
    }

    fn misconfigured(&self) -> Option<&str> {
        match self {
            PostgresError::Misconfigured { setting, .. } => Some(setting),
            PostgresError::Tls(_) => Some("source.url"),
            _ => None,
        }
    }
}

impl Source for PostgresSource {
    type Config = PostgresSourceConfig;
    type Error = PostgresError;

    const KIND: &'static str = "postgres";

    async fn connect(config: PostgresSourceConfig) -> Result<Self, PostgresError> {
        PostgresSource::connect(config).await
    }

    fn resume_watermark(&self) -> u64 {
        self.report().confirmed_flush_lsn
    }

    fn starts_fresh(&self) -> bool {
        // A slot created with a snapshot sends the rows before it too.
        self.report().slot_created && !self.snapshots()
    }

    async fn run(self, ctx: SourceContext) -> Result<Stopped, PostgresError> {
        PostgresSource::run(
            self,
            ctx.out,
            ctx.tracker,
            ctx.budget,
            ctx.shutdown,
            ctx.drain_timeout,
        )
        .await
    }
}

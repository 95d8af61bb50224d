//! [`Writer`]: a task that keeps changing a database while a test does
//! something else (a copy, a refresh, a restart), until told to stop.

use anyhow::{Result, ensure};
use mysql_async::prelude::Queryable as _;

/// A connection a [`Writer`] runs its statements on.
pub trait Execute: Send + 'static {
    /// Runs `sql` (one or more `;`-separated statements).
    fn execute(&mut self, sql: String) -> impl Future<Output = Result<()>> + Send;
}

impl Execute for tokio_postgres::Client {
    async fn execute(&mut self, sql: String) -> Result<()> {
        Ok(self.batch_execute(&sql).await?)
    }
}

impl Execute for mysql_async::Conn {
    async fn execute(&mut self, sql: String) -> Result<()> {
        Ok(self.query_drop(sql).await?)
    }
}

/// Runs `statement(i)` for i = 1, 2, ... on its own connection until
/// [`Writer::stop`].
pub struct Writer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<u32>>,
}

impl Writer {
    /// Starts writing on `conn`.
    pub fn start(
        mut conn: impl Execute,
        statement: impl Fn(u32) -> String + Send + 'static,
    ) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut i = 0u32;
            while !*stopped.borrow_and_update() {
                i += 1;
                conn.execute(statement(i)).await?;
            }
            Ok(i)
        });
        Self { stop, task }
    }

    /// Stops it; the number of statements it ran (an error unless it ran
    /// more than 10, or when one failed).
    pub async fn stop(self) -> Result<u32> {
        self.stop.send(true)?;
        let writes = self.task.await??;
        ensure!(writes > 10, "the writer ran only {writes} times");
        Ok(writes)
    }
}

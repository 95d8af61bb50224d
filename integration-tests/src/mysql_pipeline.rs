//! The fixture of the MySQL end-to-end tests: MariaDB with the test's
//! tables, kinesalite with the test's stream, a config for both and a
//! `tributary run` that streams from the binlog.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::config::{TestConfig, write_mysql_config};
use crate::kinesalite::Kinesalite;
use crate::mariadb::Mariadb;
use crate::process::TributaryProcess;

/// What the MySQL source logs once its binlog stream is open.
pub const MYSQL_STREAMING_LOG: &str = "streaming changes from mysql";
/// How long a start may take to stream.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A streaming `tributary run` between a test's MariaDB and kinesalite.
/// Fields drop in order: the process dies before the servers stop.
pub struct MysqlPipeline {
    /// The running (or, after a stop, exited) `tributary run`.
    pub tributary: TributaryProcess,
    /// The config file; the offset lives in `config.state_dir`.
    pub config: TestConfig,
    /// The temporary directory holding the config and the state.
    pub dir: TempDir,
    /// The stream's emulator.
    pub kin: Kinesalite,
    /// The source database.
    pub db: Mariadb,
}

impl MysqlPipeline {
    /// Starts MariaDB and kinesalite, creates `stream` with `shards`
    /// shards, runs `setup_sql` in `shop`, writes the config (with
    /// `extra_toml` merged) and starts `tributary run`, waiting until it
    /// streams.
    pub async fn start(
        stream: &str,
        shards: u32,
        setup_sql: &str,
        extra_toml: &str,
    ) -> Result<Self> {
        let mut pipeline =
            Self::start_without_waiting(stream, shards, setup_sql, extra_toml).await?;
        pipeline
            .tributary
            .wait_for_log(MYSQL_STREAMING_LOG, STREAMING_TIMEOUT)
            .await?;
        Ok(pipeline)
    }

    /// [`MysqlPipeline::start`] without waiting for the stream to open (for
    /// a test that acts during start-up, e.g. during an initial snapshot).
    pub async fn start_without_waiting(
        stream: &str,
        shards: u32,
        setup_sql: &str,
        extra_toml: &str,
    ) -> Result<Self> {
        Self::start_on(
            Mariadb::start().await?,
            stream,
            shards,
            setup_sql,
            extra_toml,
        )
        .await
    }

    /// [`MysqlPipeline::start_without_waiting`] on a MariaDB the test
    /// started itself (e.g. with TLS flags).
    pub async fn start_on(
        db: Mariadb,
        stream: &str,
        shards: u32,
        setup_sql: &str,
        extra_toml: &str,
    ) -> Result<Self> {
        let kin = Kinesalite::start().await?;
        kin.create_stream(stream, shards).await?;
        if !setup_sql.trim().is_empty() {
            db.execute(setup_sql).await?;
        }
        let dir = tempfile::tempdir().context("creating a temporary directory for the config")?;
        let config = write_mysql_config(dir.path(), &db, &kin, stream, extra_toml)?;
        let tributary = TributaryProcess::run(&config.path, &[])?;
        Ok(Self {
            tributary,
            config,
            dir,
            kin,
            db,
        })
    }

    /// Starts `tributary run` again on the same config and state once the
    /// previous process has exited, and waits until it streams.
    pub async fn restart(&mut self) -> Result<()> {
        self.restart_with_timeout(STREAMING_TIMEOUT).await
    }

    /// [`MysqlPipeline::restart`], waiting up to `timeout` for the stream
    /// (a restart that first takes a snapshot).
    pub async fn restart_with_timeout(&mut self, timeout: Duration) -> Result<()> {
        if self.tributary.try_exit()?.is_none() {
            bail!(
                "restart while tributary (pid {}) still runs",
                self.tributary.pid()
            );
        }
        self.tributary = TributaryProcess::run(&self.config.path, &[])?;
        self.tributary
            .wait_for_log(MYSQL_STREAMING_LOG, timeout)
            .await
    }

    /// SIGKILL, then a restart on the same state.
    pub async fn kill9_and_restart(&mut self) -> Result<()> {
        self.tributary.kill9().await?;
        self.restart().await
    }

    /// SIGTERM; an error with the logs unless the process exits 0.
    pub async fn stop_gracefully(&mut self) -> Result<()> {
        self.tributary.stop_gracefully(STOP_TIMEOUT).await
    }

    /// Waits until `stream` holds at least `count` records; an error with
    /// the process' logs after `timeout`.
    pub async fn wait_for_records(
        &self,
        stream: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<crate::StreamRecord>> {
        self.kin
            .wait_for_records(stream, count, timeout)
            .await
            .map_err(|err| anyhow::anyhow!("{err:#}\n{}", self.tributary.logs()))
    }

    /// Waits until the stored offset reached the server's current binlog
    /// position (every change written so far is in Kinesis), then reads
    /// the whole stream.
    pub async fn settled(
        &self,
        stream: &str,
        timeout: Duration,
    ) -> Result<Vec<crate::StreamRecord>> {
        let (file, pos) = self.db.binlog_position().await?;
        let want = format!("file={file}\npos={pos}\n");
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.stored_offset().is_some_and(|o| o.starts_with(&want)) {
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the stored offset {:?} did not reach {file}:{pos} within {timeout:?}\n{}",
                    self.stored_offset(),
                    self.tributary.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.kin.read_all(stream).await
    }

    /// The stored offset file's text (`file=`, `pos=`, `gtid=` lines).
    pub fn stored_offset(&self) -> Option<String> {
        std::fs::read_to_string(self.config.state_dir.join("shop.mysql-offset")).ok()
    }
}

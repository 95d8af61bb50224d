//! The fixture most end-to-end tests start from: Postgres with the test's
//! tables, kinesalite with the test's stream, a config file for both and a
//! `tributary run` that is streaming.
//!
//! [`Pipeline::start`] does it all in one call. A test that has to put
//! something between the servers and the connector (a [`FaultProxy`] in
//! front of kinesalite, whose endpoint goes into the config) starts the
//! [`Servers`] first, then [`Servers::start_tributary`].
//!
//! [`FaultProxy`]: crate::FaultProxy

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::config::{SLOT, TestConfig, write_config};
use crate::kinesalite::Kinesalite;
use crate::postgres::{Lsn, Postgres};
use crate::process::TributaryProcess;

/// How long a fresh `tributary run` (a first start, or a restart after a
/// graceful stop) may take to stream from the slot.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);
/// The same after a `kill -9`: the dead process' walsender may hold the slot
/// a while, and the new process retries until it is free.
const STREAMING_AFTER_CRASH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Pipeline::stop_gracefully`] waits for the exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers of a test, before `tributary` runs: Postgres with the test's
/// tables and kinesalite with the test's stream.
pub struct Servers {
    /// The stream's emulator.
    pub kin: Kinesalite,
    /// The source database.
    pub pg: Postgres,
    stream: String,
}

impl Servers {
    /// Starts Postgres and kinesalite, creates `stream` with `shards`
    /// shards, and runs `setup_sql` (the tables, as one transaction) as
    /// [`crate::USER`] in [`crate::DEFAULT_DATABASE`].
    pub async fn start(stream: &str, shards: u32, setup_sql: &str) -> Result<Self> {
        Self::start_with(Postgres::start().await?, stream, shards, setup_sql).await
    }

    /// [`Servers::start`] on a Postgres the test started itself (e.g. with
    /// TLS).
    pub async fn start_with(
        pg: Postgres,
        stream: &str,
        shards: u32,
        setup_sql: &str,
    ) -> Result<Self> {
        let kin = Kinesalite::start().await?;
        kin.create_stream(stream, shards).await?;
        pg.execute(setup_sql).await?;
        Ok(Servers {
            kin,
            pg,
            stream: stream.to_owned(),
        })
    }

    /// Writes the config ([`write_config`] with `extra_toml`) into a new
    /// temporary directory, runs `tributary run` on it and waits until it
    /// streams from slot [`SLOT`].
    pub async fn start_tributary(self, extra_toml: &str) -> Result<Pipeline> {
        let mut pipeline = self.start_tributary_without_waiting(extra_toml).await?;
        pipeline
            .tributary
            .wait_streaming(&pipeline.pg, SLOT, STREAMING_TIMEOUT)
            .await?;
        Ok(pipeline)
    }

    /// [`Servers::start_tributary`] without waiting for streaming (for a
    /// test that acts during start-up, e.g. during an initial snapshot).
    pub async fn start_tributary_without_waiting(self, extra_toml: &str) -> Result<Pipeline> {
        let Servers { kin, pg, stream } = self;
        let dir = tempfile::tempdir().context("creating a temporary directory for the config")?;
        let config = write_config(dir.path(), &pg, &kin, &stream, extra_toml)?;
        let tributary = TributaryProcess::run(&config.path, &[])?;
        Ok(Pipeline {
            tributary,
            config,
            dir,
            kin,
            pg,
        })
    }
}

/// A streaming `tributary run` between a test's Postgres and kinesalite.
///
/// The fields are dropped in declaration order: the process is killed
/// (with its logs printed if the test panicked) before the servers stop.
pub struct Pipeline {
    /// The running (or, after a stop, exited) `tributary run`.
    pub tributary: TributaryProcess,
    /// The config file it runs with; its state lives in `config.state_dir`.
    pub config: TestConfig,
    /// The temporary directory holding the config and the state.
    pub dir: TempDir,
    /// The stream's emulator.
    pub kin: Kinesalite,
    /// The source database.
    pub pg: Postgres,
}

impl Pipeline {
    /// [`Servers::start`], then [`Servers::start_tributary`]: a test's
    /// pipeline, streaming.
    pub async fn start(
        stream: &str,
        shards: u32,
        setup_sql: &str,
        extra_toml: &str,
    ) -> Result<Self> {
        Servers::start(stream, shards, setup_sql)
            .await?
            .start_tributary(extra_toml)
            .await
    }

    /// Starts `tributary run` again on the same config and state, once the
    /// previous process has stopped, and waits until it streams.
    pub async fn restart(&mut self) -> Result<()> {
        if self.tributary.try_exit()?.is_none() {
            bail!(
                "restart while tributary (pid {}) still runs: stop it first",
                self.tributary.pid()
            );
        }
        self.run_and_wait(STREAMING_TIMEOUT).await
    }

    /// [`Pipeline::restart`] with its own wait for streaming (a restart
    /// that first takes a snapshot).
    pub async fn restart_with_timeout(&mut self, timeout: Duration) -> Result<()> {
        if self.tributary.try_exit()?.is_none() {
            bail!("restart while tributary still runs: stop it first");
        }
        self.run_and_wait(timeout).await
    }

    /// Kills the process with SIGKILL (a crash), starts `tributary run`
    /// again on the same config and state, and waits until it streams.
    pub async fn kill9_and_restart(&mut self) -> Result<()> {
        self.tributary.kill9().await?;
        self.run_and_wait(STREAMING_AFTER_CRASH_TIMEOUT).await
    }

    /// [`TributaryProcess::stop_gracefully`] with a 30 s timeout: SIGTERM,
    /// and an error with the logs unless the process exits 0.
    pub async fn stop_gracefully(&mut self) -> Result<()> {
        self.tributary.stop_gracefully(STOP_TIMEOUT).await
    }

    /// The `confirmed_flush_lsn` of the connector's slot [`SLOT`].
    pub async fn confirmed_flush_lsn(&self) -> Result<Lsn> {
        self.pg.confirmed_flush_lsn(SLOT).await
    }

    /// Waits until the connector has acknowledged the WAL up to `lsn`
    /// (slot [`SLOT`]'s `confirmed_flush_lsn` is at least `lsn`); fails
    /// after `timeout`, with the process' logs.
    pub async fn wait_confirmed_flush(&self, lsn: Lsn, timeout: Duration) -> Result<()> {
        self.pg
            .wait_confirmed_flush(SLOT, lsn, timeout)
            .await
            .map_err(|err| anyhow::anyhow!("{err:#}\n{}", self.tributary.logs()))
    }

    async fn run_and_wait(&mut self, timeout: Duration) -> Result<()> {
        self.tributary = TributaryProcess::run(&self.config.path, &[])?;
        self.tributary.wait_streaming(&self.pg, SLOT, timeout).await
    }
}

//! The Kinesis side: kinesalite, an in-memory Kinesis emulator from the npm
//! registry, bound to 127.0.0.1, plus an SDK client for it and a reader that
//! returns everything a stream holds.
//!
//! kinesalite is pinned in the repository's `package.json` and
//! `package-lock.json`; it is installed with `npm ci` on first use. It has no
//! option for the listen address, so it runs with the preload
//! `integration-tests/kinesalite-loopback.js`, which rewrites the host of
//! every TCP listen to 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::config::Credentials;
use aws_sdk_kinesis::types::{ShardIteratorType, StreamStatus};
use nix::fcntl::{Flock, FlockArg};
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::net::{free_port, port_is_free};
use crate::{file_tail, repo_root};

/// The region the emulator's clients use; kinesalite accepts any.
const REGION: &str = "us-east-1";
/// kinesalite reports `LimitExceededException` past this many shards.
const SHARD_LIMIT: u32 = 100;
/// How long kinesalite may take to print that it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a created stream may take to become ACTIVE (kinesalite runs
/// with `--createStreamMs 0`, so this is only a safety net).
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on GetRecords calls per shard in [`Kinesalite::read_all`], so
/// that a misbehaving emulator cannot make a test loop forever.
const MAX_GET_RECORDS_CALLS: usize = 10_000;

/// A running kinesalite on 127.0.0.1, with a client for it.
///
/// Dropping it kills the node process; all streams and records, which live in
/// memory only, go with it.
pub struct Kinesalite {
    child: Child,
    port: u16,
    dir: TempDir,
    client: Client,
}

/// One record read back from a stream by [`Kinesalite::read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    /// The shard the record was stored in, e.g. `shardId-000000000001`.
    pub shard_id: String,
    /// The partition key it was written with.
    pub partition_key: String,
    /// Its sequence number. Compare sequence numbers as (length, string):
    /// they can exceed every integer type.
    pub sequence_number: String,
    /// The record's data: for Tributary, one envelope as UTF-8 JSON.
    pub data: Vec<u8>,
    /// When the stream stored it (`ApproximateArrivalTimestamp`), in
    /// milliseconds since the Unix epoch.
    pub arrival_millis: Option<i64>,
}

impl StreamRecord {
    /// The data parsed as JSON (an envelope, for records Tributary wrote).
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.data).with_context(|| {
            format!(
                "record {} in {} is not JSON: {}",
                self.sequence_number,
                self.shard_id,
                String::from_utf8_lossy(&self.data)
            )
        })
    }
}

impl Kinesalite {
    /// Starts kinesalite on a free loopback port and returns once it listens.
    pub async fn start() -> Result<Self> {
        const ATTEMPTS: usize = 3;
        let mut last_error = None;
        for _ in 0..ATTEMPTS {
            match Self::start_on(free_port()?).await {
                Ok(kinesalite) => return Ok(kinesalite),
                // Another process took the port between our probe and the
                // emulator's listen: try another one.
                Err(err) if format!("{err:#}").contains("EADDRINUSE") => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// Starts kinesalite on the given loopback port; fails if it is taken.
    pub async fn start_on(port: u16) -> Result<Self> {
        if !port_is_free(port) {
            bail!(
                "cannot start kinesalite: port {port} on 127.0.0.1 is already in use (EADDRINUSE)"
            );
        }
        let cli = kinesalite_cli()?;
        let preload = repo_root().join("integration-tests/kinesalite-loopback.js");
        let dir = tempfile::Builder::new()
            .prefix("tributary-kinesalite-")
            .tempdir()
            .context("creating a temporary directory for kinesalite's logs")?;
        let stdout = std::fs::File::create(dir.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(dir.path().join("stderr.log"))?;
        let child = Command::new("node")
            .arg("--require")
            .arg(&preload)
            .arg(&cli)
            .args(["--port", &port.to_string()])
            .args([
                "--createStreamMs",
                "0",
                "--deleteStreamMs",
                "0",
                "--updateStreamMs",
                "0",
            ])
            .args(["--shardLimit", &SHARD_LIMIT.to_string()])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("spawning node to run kinesalite (is node installed?)")?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let mut kinesalite = Kinesalite {
            child,
            port,
            dir,
            client: kinesis_client(&endpoint).await,
        };
        kinesalite.wait_until_listening().await?;
        Ok(kinesalite)
    }

    /// The TCP port kinesalite listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoint URL for SDK clients and `sink.endpoint_url`, e.g.
    /// `http://127.0.0.1:4567`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An SDK client for this emulator (static test credentials,
    /// `us-east-1`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// kinesalite's own output (stdout, then stderr).
    pub fn logs(&self) -> String {
        let read = |name: &str| file_tail(&self.dir.path().join(name), usize::MAX);
        format!("{}\n{}", read("stdout.log"), read("stderr.log"))
    }

    /// Creates stream `name` with `shards` shards and waits until it is
    /// ACTIVE.
    pub async fn create_stream(&self, name: &str, shards: u32) -> Result<()> {
        let shard_count = i32::try_from(shards).context("shard count out of range")?;
        self.client
            .create_stream()
            .stream_name(name)
            .shard_count(shard_count)
            .send()
            .await
            .with_context(|| format!("creating stream {name} with {shards} shards"))?;
        self.wait_active(name).await
    }

    /// Waits until stream `name` is ACTIVE (after a create, split or merge).
    pub async fn wait_active(&self, name: &str) -> Result<()> {
        let deadline = Instant::now() + ACTIVE_TIMEOUT;
        loop {
            let summary = self
                .client
                .describe_stream_summary()
                .stream_name(name)
                .send()
                .await
                .with_context(|| format!("describing stream {name}"))?;
            let status = summary
                .stream_description_summary()
                .map(|summary| summary.stream_status().clone());
            if status == Some(StreamStatus::Active) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("stream {name} is not ACTIVE after {ACTIVE_TIMEOUT:?} (status {status:?})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every record in every shard of `stream`, read from TRIM_HORIZON to the
    /// tip: shards in shard-id order, each shard's records in sequence order
    /// (the order Kinesis consumers see per shard).
    pub async fn read_all(&self, stream: &str) -> Result<Vec<StreamRecord>> {
        let mut records = Vec::new();
        for shard_id in self.shard_ids(stream).await? {
            self.read_shard(stream, &shard_id, &mut records).await?;
        }
        Ok(records)
    }

    /// The data of every record of `stream`, parsed as JSON, in the order of
    /// [`Kinesalite::read_all`].
    pub async fn read_all_json(&self, stream: &str) -> Result<Vec<serde_json::Value>> {
        self.read_all(stream)
            .await?
            .iter()
            .map(StreamRecord::json)
            .collect()
    }

    /// Polls [`Kinesalite::read_all`] until `stream` holds at least `count`
    /// records, and returns them all; fails after `timeout` saying how many
    /// arrived.
    pub async fn wait_for_records(
        &self,
        stream: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<StreamRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.read_all(stream).await?;
            if records.len() >= count {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                bail!(
                    "stream {stream} holds {} records after {timeout:?}, expected at least {count}",
                    records.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Polls `stream` until its envelopes' `after.id` values include every
    /// one of `ids`; returns the records. A count is not enough after an
    /// outage: calls a stopped process left buffered in a proxy can land
    /// later and add copies of rows, so the count may be reached while rows
    /// are still on their way.
    pub async fn wait_for_ids(
        &self,
        stream: &str,
        ids: impl IntoIterator<Item = i64>,
        timeout: Duration,
    ) -> Result<Vec<StreamRecord>> {
        let wanted: std::collections::BTreeSet<i64> = ids.into_iter().collect();
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.read_all(stream).await?;
            let mut seen = std::collections::BTreeSet::new();
            for record in &records {
                if let Some(id) = record.json()?["after"]["id"].as_i64() {
                    seen.insert(id);
                }
            }
            let missing: Vec<&i64> = wanted.difference(&seen).take(10).collect();
            if missing.is_empty() {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                bail!("rows lost: stream {stream} lacks {missing:?} after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn shard_ids(&self, stream: &str) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            // ListShards takes either the stream name or a continuation
            // token, never both.
            let request = match &next_token {
                Some(token) => self.client.list_shards().next_token(token),
                None => self.client.list_shards().stream_name(stream),
            };
            let page = request
                .send()
                .await
                .with_context(|| format!("listing the shards of stream {stream}"))?;
            ids.extend(
                page.shards()
                    .iter()
                    .map(|shard| shard.shard_id().to_owned()),
            );
            match page.next_token() {
                Some(token) => next_token = Some(token.to_owned()),
                None => break,
            }
        }
        ids.sort();
        Ok(ids)
    }

    async fn read_shard(
        &self,
        stream: &str,
        shard_id: &str,
        out: &mut Vec<StreamRecord>,
    ) -> Result<()> {
        let mut iterator = self
            .client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .with_context(|| format!("getting a TRIM_HORIZON iterator for {stream}/{shard_id}"))?
            .shard_iterator()
            .map(str::to_owned);
        for _ in 0..MAX_GET_RECORDS_CALLS {
            // A closed shard has no iterator left once it is read to its end.
            let Some(current) = iterator else {
                return Ok(());
            };
            let page = self
                .client
                .get_records()
                .shard_iterator(current)
                .limit(10_000)
                .send()
                .await
                .with_context(|| format!("reading records of {stream}/{shard_id}"))?;
            for record in page.records() {
                out.push(StreamRecord {
                    shard_id: shard_id.to_owned(),
                    partition_key: record.partition_key().unwrap_or_default().to_owned(),
                    sequence_number: record.sequence_number().to_owned(),
                    data: record.data().as_ref().to_vec(),
                    arrival_millis: record
                        .approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok()),
                });
            }
            if page.records().is_empty() && page.millis_behind_latest() == Some(0) {
                return Ok(());
            }
            iterator = page.next_shard_iterator().map(str::to_owned);
        }
        Err(anyhow!(
            "{stream}/{shard_id} did not reach its tip in {MAX_GET_RECORDS_CALLS} GetRecords calls"
        ))
    }

    async fn wait_until_listening(&mut self) -> Result<()> {
        let stdout_log = self.dir.path().join("stdout.log");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let stdout = std::fs::read_to_string(&stdout_log).unwrap_or_default();
            if let Some(line) = stdout.lines().find(|line| line.starts_with("Listening at")) {
                let expected = format!("Listening at {}", self.endpoint());
                if line.trim() != expected {
                    bail!(
                        "kinesalite is not bound to loopback only: it printed {line:?}, \
                         expected {expected:?} (is the preload \
                         integration-tests/kinesalite-loopback.js in place?)"
                    );
                }
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "kinesalite exited ({status}) before listening on port {}:\n{}",
                    self.port,
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "kinesalite did not listen on port {} within {START_TIMEOUT:?}:\n{}",
                    self.port,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        // SIGKILL: kinesalite keeps nothing worth flushing. Then wait (a few
        // milliseconds) until it is gone, so that the port is free when the
        // handle is: a test can start a new emulator on the same port to
        // simulate an outage and a recovery.
        if self.child.start_kill().is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// An SDK client for a Kinesis endpoint such as an emulator or a test proxy
/// in front of one: static credentials `test`/`test`, region `us-east-1`, a
/// 30 s operation timeout.
pub async fn kinesis_client(endpoint: &str) -> Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(30))
                .build(),
        )
        .load()
        .await;
    Client::new(&config)
}

/// The path of kinesalite's `cli.js`, running `npm ci` at the repository
/// root first if `node_modules` lacks it. One install per process (a
/// `OnceLock`) and per machine at a time (a file lock), so tests starting
/// in parallel do not race.
fn kinesalite_cli() -> Result<PathBuf> {
    static INSTALL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    INSTALL
        .get_or_init(|| install_node_modules(&repo_root()).map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn install_node_modules(root: &Path) -> Result<PathBuf> {
    let cli = root.join("node_modules/kinesalite/cli.js");
    if cli.exists() {
        return Ok(cli);
    }
    let lock_path = std::env::temp_dir().join("tributary-npm-ci.lock");
    let lock_file = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| errno)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // Another process may have installed it while we waited for the lock.
    if cli.exists() {
        return Ok(cli);
    }
    eprintln!(
        "kinesalite is not installed: running `npm ci` in {}",
        root.display()
    );
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(root)
        .stdout(Stdio::null())
        .status()
        .context("running `npm ci` (is npm installed? see scripts/install-deps.sh)")?;
    if !status.success() || !cli.exists() {
        bail!("`npm ci` in {} failed ({status})", root.display());
    }
    Ok(cli)
}

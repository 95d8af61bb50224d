//! `config.toml` plus `TRIBUTARY__SECTION__KEY` environment overrides:
//! parsed (unknown keys are errors), then validated without I/O into the
//! settings each part is built from. Every error names the key and the fix.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tributary_envelope::filter::validate_pattern;
use tributary_envelope::source::{SettingError, SourceCommon};
use tributary_envelope::{Format, Source, StreamRouter, TableFilter};
use tributary_mysql::config::{MysqlSettings, MysqlSourceConfig};
use tributary_postgres::PostgresSourceConfig;
use tributary_postgres::config::{PostgresSettings, redact};

/// A configuration problem: exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or parsed.
    #[error("{0}")]
    Load(String),
    /// A key has a value that cannot work.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, e.g. `source.postgres.slot`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// A secret: never printed.
#[derive(Clone, Deserialize, Default, PartialEq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[source]`: the database to capture.
    pub source: SourceSettings,
    /// `[sink]`: where envelopes go.
    pub sink: SinkSettings,
    /// `[dead_letter]`: where records Kinesis can never take go.
    #[serde(default)]
    pub dead_letter: DeadLetterSettings,
    /// `[state]`: local state.
    #[serde(default)]
    pub state: StateSettings,
    /// `[http]`: health and metrics endpoint.
    #[serde(default)]
    pub http: HttpSettings,
    /// `[log]`: logging.
    #[serde(default)]
    pub log: LogSettings,
}

/// `source.kind`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// PostgreSQL logical replication (`pgoutput`).
    Postgres,
    /// MySQL / MariaDB row binlog.
    Mysql,
}

/// `source.snapshot`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Snapshot existing rows when the slot is new, then stream.
    #[default]
    Initial,
    /// Stream changes only.
    Never,
    /// Snapshot, then stop.
    Only,
}

/// `[source]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// `postgres` or `mysql`.
    pub kind: SourceKind,
    /// Stable id of this source: event ids, metrics, state.
    pub name: String,
    /// Connection URL; the password may be inside or given separately.
    pub url: Secret,
    /// Password (prefer `TRIBUTARY__SOURCE__PASSWORD`).
    pub password: Option<Secret>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// Include patterns, `schema.table` with `*` wildcards.
    #[serde(default = "default_tables")]
    pub tables: Vec<String>,
    /// Exclude patterns.
    #[serde(default)]
    pub exclude_tables: Vec<String>,
    /// `initial`, `never` or `only`.
    #[serde(default)]
    pub snapshot: SnapshotMode,
    /// Rows a snapshot reads per primary-key chunk: a crash re-sends at
    /// most the chunks not yet acknowledged, and memory holds one chunk.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: usize,
    /// Reader connections of a snapshot (Postgres): tables, and key
    /// ranges of large tables, are read by this many connections at once,
    /// all on the one consistent snapshot. Memory holds about two chunks
    /// per reader.
    #[serde(default = "default_snapshot_parallelism")]
    pub snapshot_parallelism: usize,
    /// `[source.postgres]` (parsed and validated by the Postgres crate).
    #[serde(default)]
    pub postgres: PostgresSettings,
    /// `[source.mysql]` (parsed and validated by the MySQL crate).
    #[serde(default)]
    pub mysql: MysqlSettings,
}

fn default_snapshot_chunk_rows() -> usize {
    DEFAULT_SNAPSHOT_CHUNK_ROWS
}

fn default_snapshot_parallelism() -> usize {
    DEFAULT_SNAPSHOT_PARALLELISM
}

/// `source.snapshot_parallelism` when not set.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 4;

/// The largest `source.snapshot_parallelism` (each reader is a connection).
pub const MAX_SNAPSHOT_PARALLELISM: usize = 64;

/// `source.snapshot_chunk_rows` when not set.
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: usize = 10_000;

/// The largest `source.snapshot_chunk_rows` (one chunk is held in memory).
pub const MAX_SNAPSHOT_CHUNK_ROWS: usize = 1_000_000;

fn default_tables() -> Vec<String> {
    vec!["*.*".into()]
}

/// `sink.kind`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// AWS Kinesis Data Streams.
    #[default]
    Kinesis,
    /// Discards every record (benchmarks, dry runs).
    Null,
}

/// `[sink]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSettings {
    /// `kinesis` (default) or `null`.
    #[serde(default)]
    pub kind: SinkKind,
    /// A stream name or a template such as `shop.{schema}.{table}`.
    pub stream: Option<String>,
    /// AWS region (default: `AWS_REGION`).
    pub region: Option<String>,
    /// Endpoint for emulators or VPC endpoints.
    pub endpoint_url: Option<String>,
    /// KPL-compatible aggregation: many envelopes of a shard per Kinesis
    /// record, de-aggregated by the KCL and by `tributary tail`.
    #[serde(default)]
    pub aggregation: bool,
    /// The record format: `tributary` (envelope v1), `debezium` or `cloudevents`.
    #[serde(default)]
    pub format: Format,
    /// Transaction markers: a `begin` and an `end` record per transaction
    /// on every shard that received an event of it (docs/envelope.md).
    /// Only the Kinesis sink writes them.
    #[serde(default)]
    pub transaction_markers: bool,
    /// `[sink.quota]`.
    #[serde(default)]
    pub quota: QuotaSettings,
    /// Bytes of records between the reader and acknowledgement.
    #[serde(default = "default_in_flight")]
    pub max_in_flight_bytes: u64,
    /// Seconds a graceful stop waits for in-flight records; a stop that
    /// runs out of it (Kinesis down) exits 1 and leaves them unacknowledged.
    #[serde(default = "default_drain_secs")]
    pub drain_timeout_secs: u64,
    /// PutRecords calls one shard may have in flight at once (1 to 16); a
    /// partition key is never in two of them.
    #[serde(default = "default_max_in_flight_per_shard")]
    pub max_in_flight_per_shard: usize,
    /// Seconds one attempt of a Kinesis call may take.
    #[serde(default = "default_request_timeout_secs")]
    pub request_timeout_secs: u64,
    /// Seconds opening a connection to Kinesis may take.
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
}

fn default_max_in_flight_per_shard() -> usize {
    tributary_kinesis::DEFAULT_MAX_IN_FLIGHT_PER_SHARD
}

fn default_request_timeout_secs() -> u64 {
    30
}

fn default_connect_timeout_secs() -> u64 {
    5
}

fn default_in_flight() -> u64 {
    64 * 1024 * 1024
}

/// The longest graceful stop `sink.drain_timeout_secs` may ask for: a day.
const MAX_DRAIN_SECS: u64 = 24 * 60 * 60;
/// The longest Kinesis request or connect timeout: an hour.
const MAX_TIMEOUT_SECS: u64 = 60 * 60;

fn default_drain_secs() -> u64 {
    30
}

/// `[sink.quota]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSettings {
    /// Records per second per shard.
    #[serde(default = "default_records_quota")]
    pub records_per_shard_per_sec: u32,
    /// Bytes per second per shard.
    #[serde(default = "default_bytes_quota")]
    pub bytes_per_shard_per_sec: u32,
    /// Fraction of each shard this producer may use.
    #[serde(default = "default_share")]
    pub share: f64,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            records_per_shard_per_sec: default_records_quota(),
            bytes_per_shard_per_sec: default_bytes_quota(),
            share: default_share(),
        }
    }
}

fn default_records_quota() -> u32 {
    1000
}
fn default_bytes_quota() -> u32 {
    1_048_576
}
fn default_share() -> f64 {
    1.0
}

/// `[dead_letter]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// A Kinesis stream for records that can never be written. Unset: the
    /// JSON Lines file under `[state] dir` (which also keeps what the
    /// stream cannot hold, e.g. a record too large for any stream).
    pub stream: Option<String>,
}

/// `[state]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Offsets, snapshot progress, dead letters.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("./tributary-state")
}

/// `[http]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address of `/healthz`, `/readyz`, `/metrics`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// `/readyz` fails when records are in flight and none was delivered
    /// for this many seconds (Kinesis unreachable or refusing).
    #[serde(default = "default_stall_timeout_secs")]
    pub stall_timeout_secs: u64,
}

fn default_stall_timeout_secs() -> u64 {
    60
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            stall_timeout_secs: default_stall_timeout_secs(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9187".into()
}

/// `log.format`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Pretty,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `json` or `pretty`.
    #[serde(default)]
    pub format: LogFormat,
    /// A level (`info`) or a filter (`info,tributary_kinesis=debug`).
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".into()
}

/// Reads `path` (if it exists or was asked for) and the
/// `TRIBUTARY__SECTION__KEY` environment into `T` (the whole [`Settings`],
/// or the part a command needs).
pub fn load<T: serde::de::DeserializeOwned>(path: &Path, explicit: bool) -> Result<T, ConfigError> {
    let mut builder = config::Config::builder();
    if path.exists() {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    } else if explicit {
        return Err(ConfigError::Load(format!(
            "config file {} not found (pass -c PATH, or set every key with TRIBUTARY__SECTION__KEY variables)",
            path.display()
        )));
    }
    builder = builder.add_source(
        config::Environment::with_prefix("TRIBUTARY")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("source.tables")
            .with_list_parse_key("source.exclude_tables"),
    );
    let raw = builder
        .build()
        .map_err(|e| ConfigError::Load(format!("cannot read the configuration: {e}")))?;
    let file = path.exists().then_some(path);
    serde_path_to_error::deserialize(raw).map_err(|err| crate::config_error::explain(err, file))
}

/// Settings checked and ready to build the pipeline from.
#[derive(Debug)]
pub struct Validated {
    /// The parsed file.
    pub settings: Settings,
    /// The source's validated settings.
    pub source: SourceConfig,
    /// The region (kinesis sink).
    pub region: String,
}

/// The validated config of the one source this process runs. Adding a
/// source adds a variant here and an arm in [`SourceConfig::dispatch`];
/// the pipeline's wiring stays as it is.
#[derive(Debug)]
pub enum SourceConfig {
    /// `kind = "postgres"`.
    Postgres(Box<PostgresSourceConfig>),
    /// `kind = "mysql"`.
    Mysql(Box<MysqlSourceConfig>),
}

/// Something generic over the source type: the pipeline's wiring.
pub trait RunSource {
    /// What running yields.
    type Output;
    /// Runs with the source `S` built from `config`.
    fn run<S: Source>(self, config: S::Config) -> impl std::future::Future<Output = Self::Output>;
}

impl SourceConfig {
    /// Calls `with` with this config's source type.
    pub async fn dispatch<R: RunSource>(self, with: R) -> R::Output {
        match self {
            SourceConfig::Postgres(config) => {
                with.run::<tributary_postgres::PostgresSource>(*config)
                    .await
            }
            SourceConfig::Mysql(config) => with.run::<tributary_mysql::MysqlSource>(*config).await,
        }
    }
}

impl From<SettingError> for ConfigError {
    fn from(e: SettingError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
    }
}

impl Settings {
    /// Checks every value without network access; reads `password_file`.
    pub fn validate(self) -> Result<Validated, ConfigError> {
        let source = &self.source;
        let name_ok = !source.name.is_empty()
            && source.name.len() <= 64
            && source
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return Err(invalid(
                "source.name",
                format!("`{}` must be 1-64 characters of [A-Za-z0-9_-]", source.name),
            ));
        }
        for (key, patterns) in [
            ("source.tables", &source.tables),
            ("source.exclude_tables", &source.exclude_tables),
        ] {
            for pattern in patterns {
                validate_pattern(pattern).map_err(|m| invalid(key, m))?;
            }
        }
        if source.tables.is_empty() {
            return Err(invalid(
                "source.tables",
                "list at least one pattern, e.g. [\"public.*\"]",
            ));
        }
        let password = match (&source.password, &source.password_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "source.password_file",
                    "set either source.password or source.password_file, not both",
                ));
            }
            (Some(p), None) => Some(p.0.clone()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| {
                        invalid(
                            "source.password_file",
                            format!("cannot read {}: {e}", file.display()),
                        )
                    })?
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let sink = &self.sink;
        let (router, region) = match sink.kind {
            SinkKind::Null => (
                StreamRouter::parse(sink.stream.as_deref().unwrap_or("null"))
                    .map_err(|e| invalid("sink.stream", e.to_string()))?,
                String::new(),
            ),
            SinkKind::Kinesis => {
                let stream = sink.stream.as_deref().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                    invalid(
                        "sink.stream",
                        "missing: name the Kinesis stream (stream = \"shop-cdc\") or a template (stream = \"shop.{schema}.{table}\")",
                    )
                })?;
                let router = StreamRouter::parse(stream)
                    .map_err(|e| invalid("sink.stream", e.to_string()))?;
                let literal: String = stream.replace(['{', '}'], "");
                if literal.len() > 128
                    || !literal
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
                {
                    return Err(invalid(
                        "sink.stream",
                        format!(
                            "`{stream}` is not a valid stream name: 1-128 characters of [A-Za-z0-9_.-]"
                        ),
                    ));
                }
                let region = sink
                    .region
                    .clone()
                    .or_else(|| std::env::var("AWS_REGION").ok())
                    .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
                    .filter(|r| !r.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            "sink.region",
                            "missing: set region = \"us-east-1\" (or AWS_REGION)",
                        )
                    })?;
                if let Some(url) = &sink.endpoint_url
                    && !(url.starts_with("http://") || url.starts_with("https://"))
                {
                    return Err(invalid(
                        "sink.endpoint_url",
                        format!("`{url}` must start with http:// or https://"),
                    ));
                }
                (router, region)
            }
        };
        for (key, secs, max) in [
            (
                "sink.drain_timeout_secs",
                sink.drain_timeout_secs,
                MAX_DRAIN_SECS,
            ),
            (
                "sink.request_timeout_secs",
                sink.request_timeout_secs,
                MAX_TIMEOUT_SECS,
            ),
            (
                "sink.connect_timeout_secs",
                sink.connect_timeout_secs,
                MAX_TIMEOUT_SECS,
            ),
        ] {
            if secs > max {
                return Err(invalid(
                    key,
                    format!("{secs} is too long: at most {max} seconds"),
                ));
            }
            if secs == 0 && key != "sink.drain_timeout_secs" {
                return Err(invalid(key, "must be at least 1 second"));
            }
        }
        let quota = &sink.quota;
        if !(quota.share > 0.0 && quota.share <= 1.0) {
            return Err(invalid(
                "sink.quota.share",
                format!("must be > 0 and <= 1, got {}", quota.share),
            ));
        }
        if quota.records_per_shard_per_sec == 0 {
            return Err(invalid(
                "sink.quota.records_per_shard_per_sec",
                "must be at least 1",
            ));
        }
        if quota.bytes_per_shard_per_sec == 0 {
            return Err(invalid(
                "sink.quota.bytes_per_shard_per_sec",
                "must be at least 1",
            ));
        }
        if sink.max_in_flight_bytes < 1024 * 1024 {
            return Err(invalid(
                "sink.max_in_flight_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if !(1..=MAX_SNAPSHOT_CHUNK_ROWS).contains(&source.snapshot_chunk_rows) {
            return Err(invalid(
                "source.snapshot_chunk_rows",
                format!(
                    "must be between 1 and {MAX_SNAPSHOT_CHUNK_ROWS} (rows per snapshot chunk; default {DEFAULT_SNAPSHOT_CHUNK_ROWS})"
                ),
            ));
        }
        if !(1..=MAX_SNAPSHOT_PARALLELISM).contains(&source.snapshot_parallelism) {
            return Err(invalid(
                "source.snapshot_parallelism",
                format!(
                    "must be between 1 and {MAX_SNAPSHOT_PARALLELISM} (snapshot reader connections; default {DEFAULT_SNAPSHOT_PARALLELISM})"
                ),
            ));
        }
        if self.http.stall_timeout_secs == 0 {
            return Err(invalid(
                "http.stall_timeout_secs",
                "must be at least 1 second",
            ));
        }
        self.http
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| {
                invalid(
                    "http.listen",
                    format!("`{}` is not HOST:PORT: {e}", self.http.listen),
                )
            })?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            invalid(
                "log.level",
                format!(
                    "`{}`: {e} (use error, warn, info, debug or trace)",
                    self.log.level
                ),
            )
        })?;

        let common = SourceCommon {
            name: source.name.clone(),
            url: source.url.0.clone(),
            password,
            filter: TableFilter::new(&source.tables, &source.exclude_tables),
            router,
            state_dir: self.state.dir.clone(),
            snapshot: source.snapshot == SnapshotMode::Initial,
            snapshot_only: source.snapshot == SnapshotMode::Only,
            snapshot_chunk_rows: source.snapshot_chunk_rows,
            snapshot_parallelism: source.snapshot_parallelism,
        };
        let source = match source.kind {
            SourceKind::Postgres => {
                SourceConfig::Postgres(Box::new(source.postgres.validate(&common)?))
            }
            SourceKind::Mysql => SourceConfig::Mysql(Box::new(source.mysql.validate(&common)?)),
        };
        Ok(Validated {
            settings: self,
            source,
            region,
        })
    }
}

/// The source URL for logs.
pub fn redacted_url(settings: &Settings) -> String {
    redact(&settings.source.url.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Validated, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        load::<Settings>(&path, true)?.validate()
    }

    const BASE: &str = r#"
[source]
kind = "postgres"
name = "shop"
url = "postgres://cdc:hunter2@127.0.0.1:5432/shop"
tables = ["public.*"]

[sink]
stream = "shop-cdc"
region = "us-east-1"
"#;

    #[test]
    fn a_minimal_config_validates_with_defaults() {
        let v = load_str(BASE).unwrap();
        let SourceConfig::Postgres(postgres) = &v.source else {
            panic!("a postgres source")
        };
        assert_eq!(postgres.slot, "tributary_shop");
        assert_eq!(postgres.publication, "tributary_shop");
        assert_eq!(v.settings.state.dir, PathBuf::from("./tributary-state"));
        assert!(
            !format!("{:?}", v.settings).contains("hunter2"),
            "secrets never in Debug"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (format!("{BASE}\n[log]\nbogus = 1\n"), "log"),
            (BASE.replace("tables = [", "tabels = ["), "source"),
            (BASE.replace("stream = \"shop-cdc\"", ""), "sink.stream"),
            (
                BASE.replace("postgres://cdc:hunter2@127.0.0.1:5432/shop", "http://x"),
                "source.url",
            ),
            (BASE.replace("\"public.*\"", "\"orders\""), "source.tables"),
            (
                format!("{BASE}\n[sink.quota]\nshare = 1.5\n"),
                "sink.quota.share",
            ),
            (
                format!("{BASE}\n[source.postgres]\nslot = \"Bad-Slot\"\n"),
                "source.postgres.slot",
            ),
            (BASE.replace("shop-cdc", "shop.{tabel}"), "sink.stream"),
            (
                BASE.replace("[sink]", "[sink]\ndrain_timeout_secs = 99999999999"),
                "sink.drain_timeout_secs",
            ),
            (
                BASE.replace("[sink]", "[sink]\nrequest_timeout_secs = 99999999"),
                "sink.request_timeout_secs",
            ),
            (
                BASE.replace("tables = [", "snapshot_chunk_rows = 0\ntables = ["),
                "source.snapshot_chunk_rows",
            ),
            (
                BASE.replace("tables = [", "snapshot_parallelism = 0\ntables = ["),
                "source.snapshot_parallelism",
            ),
        ];
        for (toml, key) in cases {
            let err = load_str(&toml).unwrap_err().to_string();
            assert!(err.contains(key), "`{err}` should name {key}");
            assert!(!err.contains("hunter2"), "`{err}` leaks the password");
        }
        let err = load_str(&BASE.replace("tables = [", "tabels = ["))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tabels"), "{err}");
    }
}

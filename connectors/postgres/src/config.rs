//! The Postgres source's settings, parsed and checked before any I/O.

use std::str::FromStr;

use tokio_postgres::config::{Host, SslMode};
use tributary_envelope::source::{SettingError, SourceCommon};
use tributary_envelope::tls::{Spelling, TlsMode, TlsParams};
use tributary_envelope::{StreamRouter, TableFilter};

/// Settings of one Postgres source (from `[source]` and `[source.postgres]`).
#[derive(Clone, Debug)]
pub struct PostgresSourceConfig {
    /// `source.name`: event ids, application name.
    pub name: String,
    /// Parsed `source.url` (password applied).
    pub connection: ConnectionConfig,
    /// Slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// Which tables are captured.
    pub filter: TableFilter,
    /// Where each table's records go.
    pub router: StreamRouter,
    /// Records per batch handed to the sink.
    pub batch_records: usize,
    /// Copy the captured tables' rows when the slot is created.
    pub snapshot: bool,
    /// Copy the captured tables' rows and stop: no slot, no streaming.
    pub snapshot_only: bool,
    /// `source.snapshot_chunk_rows`: rows per keyset chunk of the snapshot.
    pub snapshot_chunk_rows: usize,
    /// `source.snapshot_parallelism`: reader connections of the snapshot.
    pub snapshot_parallelism: usize,
    /// `[state] dir`: where an unfinished snapshot is marked.
    pub state_dir: std::path::PathBuf,
    /// `source.postgres.read_timeout_secs`: how long the replication
    /// stream may stay silent (not even a keepalive) before the session
    /// is failed and reconnected. `None`: twice the server's
    /// `wal_sender_timeout`.
    pub read_timeout: Option<std::time::Duration>,
    /// `source.postgres.heartbeat_interval_secs`: how often a WAL message
    /// is written on the captured database while streaming. `None`: off.
    pub heartbeat: Option<std::time::Duration>,
    /// `source.postgres.table_refresh_secs`: how often a running stream
    /// looks for new tables matching `source.tables` (`None`: never).
    pub table_refresh: Option<std::time::Duration>,
}

/// `[source.postgres]`, as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    /// Replication slot (default `tributary_{name}`); created if missing.
    pub slot: Option<String>,
    /// Publication (default `tributary_{name}`); created if missing.
    pub publication: Option<String>,
    /// Seconds the replication stream may stay silent before the
    /// connection is taken for dead (default: twice the server's
    /// `wal_sender_timeout`).
    pub read_timeout_secs: Option<u64>,
    /// Seconds between heartbeats: a non-transactional
    /// `pg_logical_emit_message` on the captured database, so the slot
    /// advances while it is idle and the rest of the cluster writes WAL.
    /// 0 or absent: off.
    pub heartbeat_interval_secs: Option<u64>,
    /// Seconds between looks for tables created while the connector runs
    /// that match `source.tables` (default 5; 0: never look, such tables
    /// are captured from the next start).
    pub table_refresh_secs: Option<u64>,
}

impl PostgresSettings {
    /// Checks the section and the shared `[source]` settings without I/O.
    pub fn validate(&self, common: &SourceCommon) -> Result<PostgresSourceConfig, SettingError> {
        let to_setting = |e: ConfigError| SettingError::new(e.key, e.message);
        let connection = parse_url(&common.url, common.password.as_deref()).map_err(to_setting)?;
        let default_name = format!(
            "tributary_{}",
            common.name.to_ascii_lowercase().replace('-', "_")
        );
        let slot = self.slot.clone().unwrap_or_else(|| default_name.clone());
        let publication = self.publication.clone().unwrap_or(default_name);
        validate_object_name("source.postgres.slot", &slot).map_err(to_setting)?;
        validate_object_name("source.postgres.publication", &publication).map_err(to_setting)?;
        if self.read_timeout_secs == Some(0) {
            return Err(SettingError::new(
                "source.postgres.read_timeout_secs",
                "must be at least 1 (seconds of silence before a reconnect)",
            ));
        }
        Ok(PostgresSourceConfig {
            name: common.name.clone(),
            connection,
            slot,
            publication,
            filter: common.filter.clone(),
            router: common.router.clone(),
            batch_records: 256,
            snapshot: common.snapshot,
            snapshot_only: common.snapshot_only,
            snapshot_chunk_rows: common.snapshot_chunk_rows,
            snapshot_parallelism: common.snapshot_parallelism,
            state_dir: common.state_dir.clone(),
            read_timeout: self.read_timeout_secs.map(std::time::Duration::from_secs),
            heartbeat: self
                .heartbeat_interval_secs
                .filter(|&secs| secs > 0)
                .map(std::time::Duration::from_secs),
            table_refresh: match self
                .table_refresh_secs
                .unwrap_or(DEFAULT_TABLE_REFRESH_SECS)
            {
                0 => None,
                secs => Some(std::time::Duration::from_secs(secs)),
            },
        })
    }
}

/// `source.postgres.table_refresh_secs` when not set.
pub const DEFAULT_TABLE_REFRESH_SECS: u64 = 5;

/// Connect timeout when the URL gives no `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Idle time before the first TCP keepalive probe (unless the URL sets
/// `keepalives_idle`).
pub const KEEPALIVE_IDLE: std::time::Duration = std::time::Duration::from_secs(30);
/// Interval between unanswered keepalive probes.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// Unanswered probes before the kernel drops the connection.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// How long sent data may stay unacknowledged before the kernel drops the
/// connection (`TCP_USER_TIMEOUT`), unless the URL sets `tcp_user_timeout`:
/// keepalive probes stop while data waits for an answer, so without it a
/// query sent into a partition waits for the kernel's retransmissions
/// (about 15 minutes). The keepalive's own budget: idle + interval × probes.
pub const DEFAULT_TCP_USER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A setting the source cannot use; names the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// The config key.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// A parsed `source.url`: the driver's settings (through `Deref`) and the
/// TLS parameters, which the driver does not know all of (`verify-ca`,
/// `verify-full`, `sslrootcert`).
#[derive(Clone, Debug)]
pub struct ConnectionConfig {
    /// tokio-postgres' settings (its `sslmode` says whether to ask for TLS).
    pub config: tokio_postgres::Config,
    /// `sslmode`, `sslrootcert`, `sslcert`, `sslkey`.
    pub tls: TlsParams,
}

impl std::ops::Deref for ConnectionConfig {
    type Target = tokio_postgres::Config;

    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

/// Parses `source.url` (libpq's URL form, TLS parameters included) and
/// applies a password given separately.
pub fn parse_url(url: &str, password: Option<&str>) -> Result<ConnectionConfig, ConfigError> {
    let err = |message: String| ConfigError {
        key: "source.url",
        message,
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(err(format!(
            "`{}` is not a PostgreSQL URL: use postgres://USER@HOST:PORT/DATABASE",
            redact(url)
        )));
    }
    let (rest, tls) =
        TlsParams::take_from_url(url, Spelling::Libpq, TlsMode::Prefer).map_err(&err)?;
    let (rest, user_timeout) = take_tcp_user_timeout(&rest).map_err(&err)?;
    let mut config = tokio_postgres::Config::from_str(&rest)
        .map_err(|e| err(format!("cannot parse `{}`: {e}", redact(url))))?;
    match user_timeout {
        // libpq: 0 leaves the system default.
        Some(timeout) if timeout.is_zero() => {}
        Some(timeout) => {
            config.tcp_user_timeout(timeout);
        }
        None => {
            config.tcp_user_timeout(DEFAULT_TCP_USER_TIMEOUT);
        }
    }
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
    }
    // Keepalive probes find a peer that vanished without closing (a host
    // gone, a NAT entry dropped) in about a minute instead of two hours.
    if config.get_keepalives_idle() == tokio_postgres::Config::new().get_keepalives_idle() {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_RETRIES);
    }
    if config.get_user().is_none() {
        return Err(err(
            "the URL names no user: postgres://USER@HOST:PORT/DATABASE".into(),
        ));
    }
    if config.get_dbname().is_none() {
        return Err(err(
            "the URL names no database: postgres://USER@HOST:PORT/DATABASE".into(),
        ));
    }
    // The driver asks for TLS as the mode says; `tls` checks the
    // certificate. Over a Unix socket there is no TLS (as libpq).
    let ssl_mode = match (config.get_hosts(), tls.mode) {
        ([Host::Tcp(_)], TlsMode::Disable) | ([Host::Unix(_)], _) => SslMode::Disable,
        ([Host::Tcp(_)], TlsMode::Prefer) => SslMode::Prefer,
        ([Host::Tcp(_)], _) => SslMode::Require,
        ([], _) => return Err(err("the URL names no host".into())),
        _ => return Err(err("give exactly one host".into())),
    };
    config.ssl_mode(ssl_mode);
    Ok(ConnectionConfig { config, tls })
}

/// Takes `tcp_user_timeout` out of the URL's query, read as libpq reads it:
/// milliseconds (the driver would read seconds).
fn take_tcp_user_timeout(url: &str) -> Result<(String, Option<std::time::Duration>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), None));
    };
    let mut timeout = None;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("tcp_user_timeout", value)) => {
                let millis: u64 = value.parse().map_err(|_| {
                    format!(
                        "tcp_user_timeout={value}: give milliseconds, e.g. tcp_user_timeout=30000"
                    )
                })?;
                timeout = Some(std::time::Duration::from_millis(millis));
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, timeout))
}

/// The URL with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    tributary_envelope::source::redact_url(url)
}

/// Checks a slot or publication name: 1-63 characters of `[a-z0-9_]`.
pub fn validate_object_name(key: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ConfigError {
            key,
            message: format!("`{name}` must be 1-63 characters of [a-z0-9_]"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = parse_url("postgres://cdc:s3cret@127.0.0.1:5433/shop", None).unwrap();
        assert_eq!(c.get_ports(), &[5433]);
        assert_eq!(c.get_password(), Some(&b"s3cret"[..]));
        let c = parse_url("postgres://cdc@127.0.0.1/shop", Some("pw")).unwrap();
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
        assert_eq!(c.get_connect_timeout(), Some(&DEFAULT_CONNECT_TIMEOUT));
        assert_eq!(c.get_keepalives_idle(), KEEPALIVE_IDLE);
        let c = parse_url(
            "postgres://u@h/db?connect_timeout=3&keepalives_idle=7",
            None,
        )
        .unwrap();
        assert_eq!(
            c.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(c.get_keepalives_idle(), std::time::Duration::from_secs(7));
        assert_eq!(c.get_tcp_user_timeout(), Some(&DEFAULT_TCP_USER_TIMEOUT));
        // libpq's unit: milliseconds; other parameters are kept.
        let c = parse_url(
            "postgres://u@h/db?tcp_user_timeout=4500&application_name=x",
            None,
        )
        .unwrap();
        assert_eq!(
            c.get_tcp_user_timeout(),
            Some(&std::time::Duration::from_millis(4500))
        );
        assert_eq!(c.get_application_name(), Some("x"));
        let c = parse_url("postgres://u@h/db?tcp_user_timeout=0", None).unwrap();
        assert_eq!(c.get_tcp_user_timeout(), None);
        let bad = parse_url("postgres://u@h/db?tcp_user_timeout=5s", None).unwrap_err();
        assert!(bad.message.contains("milliseconds"), "{bad}");
        let c = parse_url(
            "postgres://u@127.0.0.1/db?sslmode=verify-full&sslrootcert=/ca.pem",
            None,
        )
        .unwrap();
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        assert_eq!(c.tls.mode, TlsMode::VerifyFull);
        let c = parse_url("postgres://u@127.0.0.1/db", None).unwrap();
        assert_eq!(
            (c.get_ssl_mode(), c.tls.mode),
            (SslMode::Prefer, TlsMode::Prefer)
        );
        let c = parse_url("postgres://u@%2Ftmp/db?sslmode=require", None).unwrap();
        assert_eq!(
            c.get_ssl_mode(),
            SslMode::Disable,
            "no TLS over a Unix socket"
        );
        let err = parse_url("postgres://u@h/db?sslmode=verify-full", None).unwrap_err();
        assert!(err.message.contains("sslrootcert"), "{err}");
        assert_eq!(
            parse_url("mysql://x@y/z", None).unwrap_err().key,
            "source.url"
        );
        assert!(
            parse_url("postgres://127.0.0.1/shop", None).is_err(),
            "no user"
        );
        assert!(parse_url("postgres://u@127.0.0.1:notaport/shop", None).is_err());
        assert_eq!(
            redact("postgres://cdc:s3cret@127.0.0.1:5433/shop"),
            "postgres://cdc:***@127.0.0.1:5433/shop"
        );
        assert_eq!(redact("postgres://cdc@h/db"), "postgres://cdc@h/db");
        let err = parse_url("bogus://cdc:s3cret@h/db", None).unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn object_names() {
        assert!(validate_object_name("source.postgres.slot", "tributary_shop").is_ok());
        assert!(validate_object_name("source.postgres.slot", "Bad-Name").is_err());
        assert!(validate_object_name("source.postgres.slot", "").is_err());
        assert!(validate_object_name("source.postgres.slot", &"a".repeat(64)).is_err());
    }
}

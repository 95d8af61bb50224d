//! The MySQL source's settings: `[source.mysql]` parsed here and checked,
//! with the shared `[source]` settings, before any I/O.

use std::path::PathBuf;

use mysql_async::{Opts, OptsBuilder};
use tributary_envelope::source::{SettingError, SourceCommon};
use tributary_envelope::tls::{Spelling, TlsMode, TlsParams};

use crate::tls::ConnectOpts;
use tributary_envelope::{StreamRouter, TableFilter};

/// `[source.mysql]`, as written in the config file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlSettings {
    /// The replica id this connector registers with; unique among the
    /// server's replicas (1..=4294967295).
    pub server_id: Option<u32>,
    /// Seconds between the server's binlog heartbeats while the stream is
    /// idle (`@master_heartbeat_period`, default 5). Twice this with
    /// nothing at all from the server, the connection is taken for dead
    /// and reopened.
    pub heartbeat_interval_secs: Option<u64>,
    /// How a restart finds its place in the binlog: `"auto"` (default:
    /// the stored binlog file and offset while the server is the one that
    /// wrote them, the stored GTID state on another server or when the
    /// file is gone), `"gtid"` (always the GTID state) or `"position"`
    /// (always the file and offset; never follows a failover).
    pub resume: Option<String>,
}

/// `source.mysql.resume`: how a session asks for the binlog stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResumeMode {
    /// File and offset on the server that wrote them, else GTID.
    #[default]
    Auto,
    /// Always by the stored GTID state.
    Gtid,
    /// Always by file and offset.
    Position,
}

/// `source.mysql.heartbeat_interval_secs` when absent.
pub const DEFAULT_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(5);
/// The largest heartbeat period the server takes (seconds).
const MAX_HEARTBEAT_SECS: u64 = 4_294_967;

/// Settings of one MySQL source, ready to connect with.
#[derive(Clone, Debug)]
pub struct MysqlSourceConfig {
    /// `source.name`: event ids and the offset file's name.
    pub name: String,
    /// Parsed `source.url` (password and TLS applied).
    pub opts: ConnectOpts,
    /// `source.mysql.server_id`.
    pub server_id: u32,
    /// Which tables are captured.
    pub filter: TableFilter,
    /// Where each table's records go.
    pub router: StreamRouter,
    /// The offset file: `{state.dir}/{name}.mysql-offset`.
    pub offset_file: PathBuf,
    /// Records per batch handed to the sink.
    pub batch_records: usize,
    /// `[state] dir`: where the snapshot marker lives.
    pub state_dir: PathBuf,
    /// `source.snapshot = "initial"`: copy the captured tables' rows when
    /// the source starts without a stored offset.
    pub snapshot: bool,
    /// `source.snapshot = "only"`: copy the captured tables' rows, then
    /// stop (no offset, no marker, no lock).
    pub snapshot_only: bool,
    /// `source.mysql.heartbeat_interval_secs`: the server's heartbeat
    /// period on the binlog connection; twice it is the read deadline.
    pub heartbeat: std::time::Duration,
    /// `source.snapshot_chunk_rows`: rows per keyset chunk of the snapshot.
    pub snapshot_chunk_rows: usize,
    /// `source.mysql.resume`.
    pub resume: ResumeMode,
}

impl MysqlSettings {
    /// Checks the section and the shared `[source]` settings without I/O.
    pub fn validate(&self, common: &SourceCommon) -> Result<MysqlSourceConfig, SettingError> {
        let server_id = match self.server_id {
            Some(0) => {
                return Err(SettingError::new(
                    "source.mysql.server_id",
                    "must be between 1 and 4294967295, and unique among the server's replicas",
                ));
            }
            Some(id) => id,
            None => {
                return Err(SettingError::new(
                    "source.mysql.server_id",
                    "missing: add [source.mysql] server_id = 5401 (any id no other replica of the server uses)",
                ));
            }
        };
        let heartbeat = match self.heartbeat_interval_secs {
            None => DEFAULT_HEARTBEAT,
            Some(secs) if (1..=MAX_HEARTBEAT_SECS).contains(&secs) => {
                std::time::Duration::from_secs(secs)
            }
            Some(_) => {
                return Err(SettingError::new(
                    "source.mysql.heartbeat_interval_secs",
                    format!(
                        "must be between 1 and {MAX_HEARTBEAT_SECS} (seconds between the \
                         server's heartbeats; twice it without a word, the connection is \
                         taken for dead)"
                    ),
                ));
            }
        };
        let resume = match self.resume.as_deref() {
            None | Some("auto") => ResumeMode::Auto,
            Some("gtid") => ResumeMode::Gtid,
            Some("position") => ResumeMode::Position,
            Some(other) => {
                return Err(SettingError::new(
                    "source.mysql.resume",
                    format!("`{other}` is not one of \"auto\", \"gtid\", \"position\""),
                ));
            }
        };
        let opts = parse_url(&common.url, common.password.as_deref())?;
        Ok(MysqlSourceConfig {
            name: common.name.clone(),
            opts,
            server_id,
            filter: common.filter.clone(),
            router: common.router.clone(),
            offset_file: common
                .state_dir
                .join(format!("{}.mysql-offset", common.name)),
            batch_records: 256,
            state_dir: common.state_dir.clone(),
            snapshot: common.snapshot,
            snapshot_only: common.snapshot_only,
            heartbeat,
            snapshot_chunk_rows: common.snapshot_chunk_rows,
            resume,
        })
    }
}

/// Idle time before the first TCP keepalive probe, unless the URL sets
/// `tcp_keepalive` (milliseconds).
const TCP_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Parses `source.url` (`mysql://USER[:PASSWORD]@HOST[:PORT][/DB]`, TLS
/// parameters in either spelling, see `tls`) and applies a password given
/// separately. Without a TLS parameter the connection is plain TCP.
pub fn parse_url(url: &str, password: Option<&str>) -> Result<ConnectOpts, SettingError> {
    let err = |message: String| SettingError::new("source.url", message);
    let redacted = tributary_envelope::source::redact_url(url);
    if !url.starts_with("mysql://") {
        return Err(err(format!(
            "`{redacted}` is not a MySQL URL: use mysql://USER@HOST:PORT"
        )));
    }
    let (rest, tls) =
        TlsParams::take_from_url(url, Spelling::LibpqOrMysql, TlsMode::Disable).map_err(&err)?;
    let opts = Opts::from_url(&rest).map_err(|e| err(format!("cannot parse `{redacted}`: {e}")))?;
    if opts.user().is_none_or(str::is_empty) {
        return Err(err("the URL names no user: mysql://USER@HOST:PORT".into()));
    }
    let keepalive = opts.tcp_keepalive().or(Some(TCP_KEEPALIVE));
    let mut builder = OptsBuilder::from_opts(opts)
        .prefer_socket(false)
        .tcp_keepalive(keepalive);
    if let Some(password) = password {
        builder = builder.pass(Some(password));
    }
    Ok(ConnectOpts::new(builder.into(), tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common(url: &str) -> SourceCommon {
        SourceCommon {
            name: "shop".into(),
            url: url.into(),
            password: None,
            filter: TableFilter::new(&["shop.*".into()], &[]),
            router: StreamRouter::parse("cdc").unwrap(),
            state_dir: PathBuf::from("/var/lib/tributary"),
            snapshot: false,
            snapshot_only: false,
            snapshot_chunk_rows: 10_000,
            snapshot_parallelism: 4,
        }
    }

    #[test]
    fn validates_server_id_and_url() {
        let ok = MysqlSettings {
            server_id: Some(5401),
            heartbeat_interval_secs: None,
            resume: Some("gtid".into()),
        };
        let config = ok
            .validate(&common("mysql://cdc:s3cret@127.0.0.1:3307/shop"))
            .unwrap();
        assert_eq!(config.server_id, 5401);
        assert_eq!(config.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(config.resume, ResumeMode::Gtid);
        assert_eq!(config.opts.tcp_port(), 3307);
        assert_eq!(config.opts.pass(), Some("s3cret"));
        assert_eq!(
            config.offset_file,
            PathBuf::from("/var/lib/tributary/shop.mysql-offset")
        );
        for (settings, url, key) in [
            (
                MysqlSettings {
                    server_id: None,
                    heartbeat_interval_secs: None,
                    resume: None,
                },
                "mysql://cdc@h",
                "source.mysql.server_id",
            ),
            (
                MysqlSettings {
                    server_id: Some(0),
                    heartbeat_interval_secs: None,
                    resume: None,
                },
                "mysql://cdc@h",
                "source.mysql.server_id",
            ),
            (
                MysqlSettings {
                    server_id: Some(1),
                    heartbeat_interval_secs: Some(0),
                    resume: None,
                },
                "mysql://cdc@h",
                "source.mysql.heartbeat_interval_secs",
            ),
            (
                MysqlSettings {
                    server_id: Some(1),
                    heartbeat_interval_secs: None,
                    resume: Some("binlog".into()),
                },
                "mysql://cdc@h",
                "source.mysql.resume",
            ),
            (ok.clone_id(), "postgres://cdc:s3cret@h/db", "source.url"),
            (ok.clone_id(), "mysql://h:3306", "source.url"),
        ] {
            let err = settings.validate(&common(url)).unwrap_err();
            assert_eq!(err.key, key, "{err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
    }

    impl MysqlSettings {
        fn clone_id(&self) -> Self {
            Self {
                server_id: self.server_id,
                heartbeat_interval_secs: self.heartbeat_interval_secs,
                resume: self.resume.clone(),
            }
        }
    }
}

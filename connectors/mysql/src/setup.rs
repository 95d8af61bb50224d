//! Start-up checks of the MySQL/MariaDB server and where streaming starts.
//!
//! Before the first binlog event is read: the server must write a row-based
//! binlog with full row images (`log_bin = ON`, `binlog_format = ROW`,
//! `binlog_row_image = FULL`), else start-up is refused with the setting to
//! change (exit 2). `binlog_row_metadata = FULL` is recommended (column
//! names, key and ENUM/SET labels in every TABLE_MAP); without it the
//! catalog fallback is used and warned about. A stored offset whose binlog
//! file the server no longer has is refused with the way out.

use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use tracing::{info, warn};

use crate::config::ResumeMode;
use crate::error::MysqlError;
use crate::gtid::GtidState;
use crate::offsets::Offset;

/// Server variables the source depends on.
#[derive(Debug, Default, Clone)]
pub struct ServerSettings {
    /// `log_bin`.
    pub log_bin: String,
    /// `binlog_format`.
    pub binlog_format: String,
    /// `binlog_row_image`.
    pub binlog_row_image: String,
    /// `binlog_row_metadata` (empty on servers without it).
    pub binlog_row_metadata: String,
    /// `server_id` of the server itself.
    pub server_id: u32,
    /// `version`.
    pub version: String,
}

/// Reads the variables.
pub async fn server_settings(conn: &mut Conn) -> Result<ServerSettings, MysqlError> {
    let rows: Vec<(String, String)> = conn
        .query(
            "SHOW GLOBAL VARIABLES WHERE Variable_name IN ('log_bin', 'binlog_format', \
             'binlog_row_image', 'binlog_row_metadata', 'server_id', 'version')",
        )
        .await
        .map_err(MysqlError::connection(
            "reading the server's binlog settings",
        ))?;
    let mut settings = ServerSettings::default();
    for (name, value) in rows {
        match name.as_str() {
            "log_bin" => settings.log_bin = value,
            "binlog_format" => settings.binlog_format = value,
            "binlog_row_image" => settings.binlog_row_image = value,
            "binlog_row_metadata" => settings.binlog_row_metadata = value,
            "server_id" => settings.server_id = value.parse().unwrap_or(0),
            "version" => settings.version = value,
            _ => {}
        }
    }
    Ok(settings)
}

/// Refuses a server whose binlog cannot carry full row changes, naming the
/// setting and the fix.
pub fn check(settings: &ServerSettings, server_id: u32) -> Result<(), MysqlError> {
    let refuse = |setting: &str, message: String| MysqlError::Misconfigured {
        setting: setting.to_owned(),
        message,
    };
    if !settings.log_bin.eq_ignore_ascii_case("ON") && settings.log_bin != "1" {
        return Err(refuse(
            "log_bin",
            "the server writes no binlog: start it with --log-bin (and --binlog-format=ROW \
             --binlog-row-image=FULL --binlog-row-metadata=FULL)"
                .into(),
        ));
    }
    if !settings.binlog_format.eq_ignore_ascii_case("ROW") {
        return Err(refuse(
            "binlog_format",
            format!(
                "is {}, row changes need ROW: run SET GLOBAL binlog_format = 'ROW' and set \
                 binlog_format = ROW in the server's config file ([mysqld] section)",
                settings.binlog_format
            ),
        ));
    }
    if !settings.binlog_row_image.eq_ignore_ascii_case("FULL") {
        return Err(refuse(
            "binlog_row_image",
            format!(
                "is {}, before images need FULL: run SET GLOBAL binlog_row_image = 'FULL' and \
                 set binlog_row_image = FULL in the server's config file ([mysqld] section)",
                settings.binlog_row_image
            ),
        ));
    }
    if server_id == settings.server_id {
        return Err(refuse(
            "source.mysql.server_id",
            format!("{server_id} is the server's own server_id: pick another id"),
        ));
    }
    if !settings.binlog_row_metadata.eq_ignore_ascii_case("FULL") {
        warn!(
            binlog_row_metadata = %settings.binlog_row_metadata,
            "binlog_row_metadata is not FULL: column names and keys are read from \
             information_schema, which a concurrent DDL can make wrong; run SET GLOBAL \
             binlog_row_metadata = 'FULL'"
        );
    }
    Ok(())
}

/// The host name this connector reports when it registers as a replica
/// (`SHOW SLAVE HOSTS` shows it): `tributary:{source.name}`, at most 60
/// bytes.
pub fn registration_host(name: &str) -> String {
    let mut host = format!("tributary:{name}");
    while host.len() > 60 {
        host.pop();
    }
    host
}

/// Refuses a `server_id` that another replica of the server registered
/// with (two replicas with one id disconnect each other, each resuming
/// where the other left off). A registration under our own
/// [`registration_host`] is a previous run of this connector whose
/// connection the server has not noticed closing yet: it is dropped when we
/// register. Servers that do not list their replicas to this user
/// (MariaDB 10.5.2+ wants `REPLICATION MASTER ADMIN` for `SHOW SLAVE
/// HOSTS`) cannot tell: that is logged, and start-up goes on.
pub async fn check_server_id_unique(
    conn: &mut Conn,
    server_id: u32,
    own_host: &str,
) -> Result<(), MysqlError> {
    let hosts: Vec<mysql_async::Row> = match conn.query("SHOW SLAVE HOSTS").await {
        Ok(hosts) => hosts,
        Err(err) => {
            info!(error = %err, "cannot list the server's replicas (SHOW SLAVE HOSTS needs \
                  REPLICATION MASTER ADMIN on MariaDB, REPLICATION SLAVE on MySQL): \
                  source.mysql.server_id is not checked for uniqueness");
            return Ok(());
        }
    };
    for row in hosts {
        if row.get::<u32, _>(0) != Some(server_id) {
            continue;
        }
        let host: String = row.get(1).unwrap_or_default();
        let port: u32 = row.get(2).unwrap_or_default();
        if host == own_host {
            warn!(
                server_id,
                "a previous run of this connector is still registered with the \
                  server; registering again replaces it"
            );
            continue;
        }
        return Err(MysqlError::Misconfigured {
            setting: "source.mysql.server_id".into(),
            message: format!(
                "{server_id} is in use by another replica of the server (SHOW SLAVE HOSTS: \
                 host `{host}`, port {port}); two replicas with one id disconnect each other. \
                 Set source.mysql.server_id to an id no replica uses (SHOW SLAVE HOSTS lists \
                 them)"
            ),
        });
    }
    Ok(())
}

/// The server's current binlog end: where a fresh start begins.
pub async fn current_position(conn: &mut Conn) -> Result<Offset, MysqlError> {
    let row: Option<mysql_async::Row> = match conn.query_first("SHOW MASTER STATUS").await {
        Ok(row) => row,
        // MySQL 8.4 renamed it.
        Err(_) => conn
            .query_first("SHOW BINARY LOG STATUS")
            .await
            .map_err(MysqlError::connection("reading the binlog position"))?,
    };
    let row = row.ok_or_else(|| MysqlError::Misconfigured {
        setting: "log_bin".into(),
        message: "SHOW MASTER STATUS returned nothing: the server writes no binlog".into(),
    })?;
    let file: String = row.get(0).unwrap_or_default();
    let pos: u64 = row.get(1).unwrap_or(4);
    let gtid = gtid_position(conn).await;
    let server_id: Option<u32> = conn
        .query_first("SELECT @@GLOBAL.server_id")
        .await
        .ok()
        .flatten();
    Ok(Offset {
        file,
        pos: u32::try_from(pos).unwrap_or(u32::MAX),
        gtid,
        server_id,
        index_base: 0,
    })
}

/// The server's GTID state: MariaDB's `@@gtid_binlog_pos`, else MySQL's
/// `@@gtid_executed` (when `gtid_mode` is on); None without GTIDs.
async fn gtid_position(conn: &mut Conn) -> Option<String> {
    for query in [
        "SELECT @@GLOBAL.gtid_binlog_pos",
        "SELECT IF(@@GLOBAL.gtid_mode = 'ON', @@GLOBAL.gtid_executed, '')",
    ] {
        if let Ok(Some(gtid)) = conn.query_first::<String, _>(query).await {
            let gtid = gtid.replace('\n', "");
            return (!gtid.is_empty()).then_some(gtid);
        }
    }
    None
}

/// True when the server still has the binlog `file`.
pub async fn binlog_present(conn: &mut Conn, file: &str) -> Result<bool, MysqlError> {
    let logs: Vec<mysql_async::Row> =
        conn.query("SHOW BINARY LOGS")
            .await
            .map_err(MysqlError::connection(
                "listing the binlogs (SHOW BINARY LOGS)",
            ))?;
    Ok(logs
        .iter()
        .any(|row| row.get::<String, _>(0).as_deref() == Some(file)))
}

/// Refuses an offset whose binlog file the server has purged.
pub async fn check_offset(
    conn: &mut Conn,
    offset: &Offset,
    offset_file: &str,
) -> Result<(), MysqlError> {
    if binlog_present(conn, &offset.file).await? {
        Ok(())
    } else {
        Err(MysqlError::Purged {
            file: offset.file.clone(),
            pos: offset.pos,
            offset_file: offset_file.to_owned(),
        })
    }
}

/// How a binlog session asks for its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartBy {
    /// `COM_BINLOG_DUMP` at the stored file and offset.
    Position,
    /// By the stored GTID state (MariaDB `@slave_connect_state`, MySQL
    /// `COM_BINLOG_DUMP_GTID`); `new_history` when the server's binlog is
    /// not the one the offset was read from (another server, or its files
    /// are gone): positions then move past the stored file (see
    /// `offsets`).
    Gtid {
        /// The server's binlog files are not the stored offset's.
        new_history: bool,
    },
}

/// Decides how to resume at `from` on the server with `@@server_id`
/// `server_id`, where `file_present` says whether it still has `from.file`
/// (the rule of `source.mysql.resume`, see `docs/mysql.md`).
pub fn start_by(
    mode: ResumeMode,
    from: &Offset,
    server_id: u32,
    file_present: bool,
    offset_file: &str,
) -> Result<StartBy, MysqlError> {
    let same_server = from.server_id.is_none_or(|id| id == server_id);
    let same_history = same_server && file_present;
    let has_gtid = !GtidState::parse(from.gtid.as_deref()).is_empty();
    let purged = || MysqlError::Purged {
        file: from.file.clone(),
        pos: from.pos,
        offset_file: offset_file.to_owned(),
    };
    match mode {
        ResumeMode::Position if !file_present => Err(purged()),
        ResumeMode::Position if !same_server => Err(MysqlError::Misconfigured {
            setting: "source.mysql.resume".into(),
            message: format!(
                "is \"position\", but the stored offset {}:{} was read from server_id {} and \
                 this server is {server_id}: its binlog files are not the same. Set \
                 source.mysql.resume = \"auto\" to resume by GTID",
                from.file,
                from.pos,
                from.server_id.unwrap_or_default()
            ),
        }),
        ResumeMode::Position => Ok(StartBy::Position),
        ResumeMode::Gtid if has_gtid => Ok(StartBy::Gtid {
            new_history: !same_history,
        }),
        ResumeMode::Gtid => Err(MysqlError::Misconfigured {
            setting: "source.mysql.resume".into(),
            message: format!(
                "is \"gtid\", but the stored offset ({offset_file}) holds no GTID state (the \
                 server writes no GTIDs, or MySQL's gtid_mode is OFF): set it to \"auto\" or \
                 \"position\""
            ),
        }),
        ResumeMode::Auto if same_history => Ok(StartBy::Position),
        ResumeMode::Auto if has_gtid => Ok(StartBy::Gtid { new_history: true }),
        ResumeMode::Auto if !file_present => Err(purged()),
        ResumeMode::Auto => {
            warn!(stored_server_id = from.server_id.unwrap_or_default(), server_id,
                  file = %from.file,
                  "the stored offset was read from another server and holds no GTID state: \
                   resuming at its binlog file and offset on this one");
            Ok(StartBy::Position)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_envelope::SourceError as _;

    fn good() -> ServerSettings {
        ServerSettings {
            log_bin: "ON".into(),
            binlog_format: "ROW".into(),
            binlog_row_image: "FULL".into(),
            binlog_row_metadata: "FULL".into(),
            server_id: 1,
            version: "10.11.14-MariaDB".into(),
        }
    }

    #[test]
    fn refusals_name_the_setting() {
        assert!(check(&good(), 5401).is_ok());
        let cases = [
            (
                ServerSettings {
                    log_bin: "OFF".into(),
                    ..good()
                },
                5401,
                "log_bin",
            ),
            (
                ServerSettings {
                    binlog_format: "STATEMENT".into(),
                    ..good()
                },
                5401,
                "binlog_format",
            ),
            (
                ServerSettings {
                    binlog_row_image: "MINIMAL".into(),
                    ..good()
                },
                5401,
                "binlog_row_image",
            ),
            (good(), 1, "source.mysql.server_id"),
        ];
        for (settings, id, setting) in cases {
            let err = check(&settings, id).unwrap_err();
            assert_eq!(err.misconfigured(), Some(setting), "{err}");
            assert!(err.to_string().starts_with(setting), "{err}");
        }
    }

    #[test]
    fn resume_rule_follows_the_server_and_the_mode() {
        let offset = |server_id, gtid: Option<&str>| Offset {
            file: "binlog.000003".into(),
            pos: 400,
            gtid: gtid.map(str::to_owned),
            server_id,
            index_base: 0,
        };
        let with_gtid = offset(Some(1), Some("0-1-40"));
        let plan = |mode, from: &Offset, server, present| {
            start_by(mode, from, server, present, "shop.mysql-offset")
        };
        use ResumeMode::{Auto, Gtid, Position};
        let by_gtid = |new_history| Some(StartBy::Gtid { new_history });
        // The server that wrote the offset, file present.
        assert_eq!(
            plan(Auto, &with_gtid, 1, true).ok(),
            Some(StartBy::Position)
        );
        assert_eq!(plan(Gtid, &with_gtid, 1, true).ok(), by_gtid(false));
        assert_eq!(
            plan(Position, &with_gtid, 1, true).ok(),
            Some(StartBy::Position)
        );
        // A promoted replica (another server_id), or the files gone.
        assert_eq!(plan(Auto, &with_gtid, 2, true).ok(), by_gtid(true));
        assert_eq!(plan(Auto, &with_gtid, 1, false).ok(), by_gtid(true));
        assert_eq!(plan(Gtid, &with_gtid, 2, true).ok(), by_gtid(true));
        let err = plan(Position, &with_gtid, 2, true).unwrap_err();
        assert_eq!(err.misconfigured(), Some("source.mysql.resume"), "{err}");
        assert!(matches!(
            plan(Position, &with_gtid, 1, false),
            Err(MysqlError::Purged { .. })
        ));
        // No GTID state: the file is the only way back.
        let without = offset(Some(1), None);
        assert!(matches!(
            plan(Auto, &without, 1, false),
            Err(MysqlError::Purged { .. })
        ));
        let err = plan(Gtid, &without, 1, true).unwrap_err();
        assert_eq!(err.misconfigured(), Some("source.mysql.resume"), "{err}");
        // Offsets written before server_id was kept: the same server.
        assert_eq!(
            plan(Auto, &offset(None, Some("0-1-40")), 7, true).ok(),
            Some(StartBy::Position)
        );
    }
}

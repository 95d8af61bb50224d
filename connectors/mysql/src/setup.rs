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
use tracing::warn;

use crate::error::MysqlError;
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

/// Warns when another replica registered with our `server_id` (the server
/// disconnects one of two replicas with the same id).
pub async fn warn_on_shared_server_id(conn: &mut Conn, server_id: u32) {
    let hosts: Result<Vec<mysql_async::Row>, _> = conn.query("SHOW SLAVE HOSTS").await;
    if let Ok(hosts) = hosts
        && hosts
            .iter()
            .any(|row| row.get::<u32, _>(0) == Some(server_id))
    {
        warn!(
            server_id,
            "a replica with this server_id is registered (a previous run, or another \
             replica: two replicas with one id disconnect each other)"
        );
    }
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
    let gtid: Option<String> = conn
        .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
        .await
        .ok()
        .flatten()
        .filter(|g: &String| !g.is_empty());
    Ok(Offset {
        file,
        pos: u32::try_from(pos).unwrap_or(u32::MAX),
        gtid,
    })
}

/// Refuses an offset whose binlog file the server has purged.
pub async fn check_offset(
    conn: &mut Conn,
    offset: &Offset,
    offset_file: &str,
) -> Result<(), MysqlError> {
    let logs: Vec<mysql_async::Row> =
        conn.query("SHOW BINARY LOGS")
            .await
            .map_err(MysqlError::connection(
                "listing the binlogs (SHOW BINARY LOGS)",
            ))?;
    let present = logs
        .iter()
        .any(|row| row.get::<String, _>(0).as_deref() == Some(offset.file.as_str()));
    if present {
        Ok(())
    } else {
        Err(MysqlError::Purged {
            file: offset.file.clone(),
            pos: offset.pos,
            offset_file: offset_file.to_owned(),
        })
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
}

//! `tributary check` for the MySQL/MariaDB source: what would stop or
//! endanger the binlog stream, each finding with the statement or setting
//! that fixes it.
//!
//! Beside the dataflow, before it starts: an ordinary connection with the
//! configured credentials reads the server's variables, the user's grants,
//! the registered replicas and the binlogs still on the server, and the
//! stored offset is compared with them. Nothing is written.

use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use tributary_envelope::{CheckItem, OffsetStore as _};

use crate::config::MysqlSourceConfig;
use crate::offsets::{FileOffsetStore, Offset};
use crate::provision::{grant_sql, is_mariadb, missing_privileges};
use crate::setup::{ServerSettings, server_settings};

/// The component name in every item.
const COMPONENT: &str = "mysql";

/// Checks the binlog settings, `server_id`, GTIDs, privileges and the
/// stored offset.
pub async fn check(config: &MysqlSourceConfig) -> Vec<CheckItem> {
    let server = format!(
        "{}:{}",
        config.opts.ip_or_hostname(),
        config.opts.tcp_port()
    );
    let user = config.opts.user().unwrap_or_default().to_owned();
    let mut conn = match config.opts.connect().await {
        Ok(conn) => conn,
        Err(err) => {
            return vec![CheckItem::fail(
                COMPONENT,
                "connection",
                format!("cannot connect to {server}: {err}"),
                "check source.url (host, port, database, user) and the password",
            )];
        }
    };
    let settings = match server_settings(&mut conn).await {
        Ok(settings) => settings,
        Err(err) => {
            return vec![CheckItem::fail(
                COMPONENT,
                "variables",
                format!(
                    "cannot read the server's variables: {}",
                    tributary_envelope::error_text::one_line(&err)
                ),
                "the user needs to run SHOW GLOBAL VARIABLES",
            )];
        }
    };
    let mut items = vec![CheckItem::ok(
        COMPONENT,
        "connection",
        format!("connected to {server} ({}) as {user}", settings.version),
    )];
    items.extend(binlog_items(&settings));
    items.push(server_id_item(&mut conn, &settings, config.server_id, &config.name).await);
    items.push(gtid_item(&mut conn).await);
    items.push(privileges_item(&mut conn, &user, is_mariadb(&settings)).await);
    items.push(offset_item(&mut conn, config).await);
    // Best effort: the checks are done either way.
    let _ = conn.disconnect().await;
    items
}

/// A variable that must have one value, with the statement that sets it.
fn variable_item(check: &'static str, value: &str, want: &str, why: &str) -> CheckItem {
    if value.eq_ignore_ascii_case(want) {
        CheckItem::ok(COMPONENT, check, format!("{check} is {want}"))
    } else {
        CheckItem::fail(
            COMPONENT,
            check,
            format!(
                "{check} is {}: {why}",
                if value.is_empty() { "unset" } else { value }
            ),
            format!(
                "SET GLOBAL {check} = '{want}'; and {check} = {want} in the server's config \
                 file ([mysqld] section)"
            ),
        )
    }
}

fn binlog_items(settings: &ServerSettings) -> Vec<CheckItem> {
    let log_bin = settings.log_bin.eq_ignore_ascii_case("ON") || settings.log_bin == "1";
    let mut items = vec![if log_bin {
        CheckItem::ok(COMPONENT, "log_bin", "the server writes a binlog")
    } else {
        CheckItem::fail(
            COMPONENT,
            "log_bin",
            "the server writes no binlog",
            "start the server with --log-bin (log_bin in the [mysqld] section) and restart",
        )
    }];
    items.push(variable_item(
        "binlog_format",
        &settings.binlog_format,
        "ROW",
        "row changes need ROW",
    ));
    items.push(variable_item(
        "binlog_row_image",
        &settings.binlog_row_image,
        "FULL",
        "before images need FULL",
    ));
    items.push(variable_item(
        "binlog_row_metadata",
        &settings.binlog_row_metadata,
        "FULL",
        "without it column names and keys come from information_schema, which a concurrent \
         ALTER TABLE makes wrong",
    ));
    items
}

async fn server_id_item(
    conn: &mut Conn,
    settings: &ServerSettings,
    ours: u32,
    name: &str,
) -> CheckItem {
    if settings.server_id == ours {
        return CheckItem::fail(
            COMPONENT,
            "server_id",
            format!("source.mysql.server_id {ours} is the server's own server_id"),
            "set source.mysql.server_id to an id no server or replica of this topology uses",
        );
    }
    let own_host = crate::setup::registration_host(name);
    if let Err(err) = crate::setup::check_server_id_unique(conn, ours, &own_host).await {
        return CheckItem::fail(
            COMPONENT,
            "server_id",
            err.to_string(),
            "give every connector and replica its own source.mysql.server_id",
        );
    }
    CheckItem::ok(
        COMPONENT,
        "server_id",
        format!("server_id {ours} is unique"),
    )
}

async fn gtid_item(conn: &mut Conn) -> CheckItem {
    // MySQL: gtid_mode; MariaDB: GTIDs are always written.
    let mysql: Option<String> = conn
        .query_first("SELECT @@GLOBAL.gtid_mode")
        .await
        .ok()
        .flatten();
    match mysql {
        Some(mode) if mode.eq_ignore_ascii_case("ON") => {
            CheckItem::ok(COMPONENT, "gtid", "gtid_mode is ON")
        }
        Some(mode) => CheckItem::warn(
            COMPONENT,
            "gtid",
            format!("gtid_mode is {mode}: envelopes carry no GTID"),
            "SET GLOBAL enforce_gtid_consistency = ON; then step gtid_mode to ON \
             (OFF_PERMISSIVE, ON_PERMISSIVE, ON)",
        ),
        None => {
            let position: Option<String> = conn
                .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
                .await
                .ok()
                .flatten();
            CheckItem::ok(
                COMPONENT,
                "gtid",
                format!(
                    "MariaDB GTIDs are on (binlog position {})",
                    position
                        .filter(|p| !p.is_empty())
                        .as_deref()
                        .unwrap_or("empty")
                ),
            )
        }
    }
}

async fn privileges_item(conn: &mut Conn, user: &str, mariadb: bool) -> CheckItem {
    let grants: Vec<String> = match conn.query("SHOW GRANTS").await {
        Ok(grants) => grants,
        Err(err) => {
            return CheckItem::fail(
                COMPONENT,
                "privileges",
                format!("cannot read the user's grants: {err}"),
                grant_sql(user, "%", mariadb),
            );
        }
    };
    let missing = missing_privileges(&grants);
    let host: String = conn
        .query_first("SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', -1)")
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "%".to_owned());
    if missing.is_empty() {
        CheckItem::ok(
            COMPONENT,
            "privileges",
            format!("{user} may read the binlog and the captured tables"),
        )
    } else {
        CheckItem::fail(
            COMPONENT,
            "privileges",
            format!("{user} lacks {}", missing.join(", ")),
            grant_sql(user, &host, mariadb),
        )
    }
}

async fn offset_item(conn: &mut Conn, config: &MysqlSourceConfig) -> CheckItem {
    let path = config.offset_file.display().to_string();
    let offset = match FileOffsetStore::new(&config.offset_file).load() {
        Ok(Some(bytes)) => Offset::decode(&bytes),
        Ok(None) => {
            return CheckItem::ok(
                COMPONENT,
                "offset",
                "no stored offset: tributary run starts at the server's current binlog position",
            );
        }
        Err(err) => {
            return CheckItem::fail(
                COMPONENT,
                "offset",
                format!("cannot read the offset file {path}: {err}"),
                "make [state] dir readable by this user",
            );
        }
    };
    let Some(offset) = offset else {
        return CheckItem::fail(
            COMPONENT,
            "offset",
            format!("the offset file {path} is unreadable"),
            format!(
                "restore it from a backup, or delete {path} to start at the current position (changes in between are lost)"
            ),
        );
    };
    let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await.unwrap_or_default();
    if logs
        .iter()
        .any(|row| row.get::<String, _>(0).as_deref() == Some(offset.file.as_str()))
    {
        CheckItem::ok(
            COMPONENT,
            "offset",
            format!(
                "the stored offset {}:{} is still on the server",
                offset.file, offset.pos
            ),
        )
    } else {
        CheckItem::fail(
            COMPONENT,
            "offset",
            format!(
                "the stored offset {}:{} is in a binlog the server no longer has: changes after \
                 it are gone",
                offset.file, offset.pos
            ),
            format!(
                "delete {path} to start at the current position (and re-snapshot), and keep \
                 binlogs longer (binlog_expire_logs_seconds)"
            ),
        )
    }
}

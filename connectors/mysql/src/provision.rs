//! `tributary setup` for the MySQL/MariaDB source: the statements that make
//! the server ready for the connector, with the least privilege it needs.
//!
//! Beside the dataflow, before it starts. Plans only what is missing: the
//! binlog variables that can change at runtime (`SET GLOBAL`, plus the
//! config file line that keeps them after a restart), the user (created
//! locked: `setup` never handles passwords) and its grants (replication,
//! binlog monitoring and SELECT; nothing that writes).

use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use tributary_envelope::SetupPlan;

use crate::error::MysqlError;
use crate::setup::{ServerSettings, server_settings};

/// Quotes a string literal (user and host names).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The grants the connector needs, for `user`@`host` (RELOAD: the initial
/// snapshot's short global read lock); MariaDB names `REPLICATION CLIENT`
/// `BINLOG MONITOR`.
pub fn grant_sql(user: &str, host: &str, mariadb: bool) -> String {
    let monitor = if mariadb {
        "BINLOG MONITOR"
    } else {
        "REPLICATION CLIENT"
    };
    format!(
        "GRANT REPLICATION SLAVE, {monitor}, RELOAD, SELECT ON *.* TO {}@{};",
        literal(user),
        literal(host)
    )
}

/// Whether the server is MariaDB (from `version`).
pub fn is_mariadb(settings: &ServerSettings) -> bool {
    settings.version.contains("MariaDB")
}

/// Which of the connector's privileges `grants` (SHOW GRANTS lines) lack.
pub fn missing_privileges(grants: &[String]) -> Vec<&'static str> {
    let text = grants.join("\n").to_ascii_uppercase();
    let all = text.contains("ALL PRIVILEGES");
    let has = |privilege: &str| all || text.contains(privilege);
    let mut missing = Vec::new();
    if !has("REPLICATION SLAVE") && !has("REPLICATION REPLICA") {
        missing.push("REPLICATION SLAVE");
    }
    if !has("REPLICATION CLIENT") && !has("BINLOG MONITOR") {
        missing.push("REPLICATION CLIENT (BINLOG MONITOR)");
    }
    if !has("SELECT") {
        missing.push("SELECT");
    }
    if !has("RELOAD") {
        missing.push("RELOAD (the initial snapshot's read lock)");
    }
    missing
}

/// What must run so that `user` can stream from this server. `conn` must
/// be allowed to read `mysql.user` and grant (a DBA's connection).
pub async fn plan(conn: &mut Conn, user: &str) -> Result<SetupPlan, MysqlError> {
    let settings = server_settings(conn).await?;
    let mut plan = SetupPlan::default();
    if !(settings.log_bin.eq_ignore_ascii_case("ON") || settings.log_bin == "1") {
        plan.afterwards.push(
            "enable the binlog: log_bin in the [mysqld] section of the server's config file, \
             then restart the server"
                .into(),
        );
    }
    let mut persist = Vec::new();
    for (name, value) in [
        ("binlog_format", &settings.binlog_format),
        ("binlog_row_image", &settings.binlog_row_image),
        ("binlog_row_metadata", &settings.binlog_row_metadata),
    ] {
        let want = if name == "binlog_format" {
            "ROW"
        } else {
            "FULL"
        };
        if !value.eq_ignore_ascii_case(want) {
            plan.push(
                format!("SET GLOBAL {name} = '{want}';"),
                format!("{name} is {value}; the connector needs {want}"),
            );
            persist.push(format!("{name} = {want}"));
        }
    }
    if !persist.is_empty() {
        plan.afterwards.push(format!(
            "add {} to the [mysqld] section of the server's config file, so that a restart \
             keeps them",
            persist.join(", ")
        ));
    }
    let hosts: Vec<String> = conn
        .exec("SELECT Host FROM mysql.user WHERE User = ?", (user,))
        .await
        .map_err(MysqlError::connection(
            "reading mysql.user (connect as a DBA: --admin-url)",
        ))?;
    let mariadb = is_mariadb(&settings);
    if hosts.is_empty() {
        plan.push(
            format!("CREATE USER {}@'%' ACCOUNT LOCK;", literal(user)),
            format!("the connector's user {user}, locked until it has a password"),
        );
        plan.push(
            grant_sql(user, "%", mariadb),
            format!("{user} reads the binlog and the captured tables, nothing more"),
        );
        plan.afterwards.push(format!(
            "ALTER USER {}@'%' IDENTIFIED BY '...' ACCOUNT UNLOCK; and put the password in \
             TRIBUTARY__SOURCE__PASSWORD or source.password_file",
            literal(user)
        ));
    }
    for host in &hosts {
        let grants: Vec<String> = conn
            .query(format!(
                "SHOW GRANTS FOR {}@{}",
                literal(user),
                literal(host)
            ))
            .await
            .map_err(MysqlError::connection(format!(
                "reading the grants of {user}@{host}"
            )))?;
        let missing = missing_privileges(&grants);
        if !missing.is_empty() {
            plan.push(
                grant_sql(user, host, mariadb),
                format!("{user}@{host} lacks {}", missing.join(", ")),
            );
        }
    }
    Ok(plan)
}

/// Runs the plan's statements in order; stops at the first that fails.
async fn apply_plan(conn: &mut Conn, plan: &SetupPlan) -> Result<(), MysqlError> {
    for step in &plan.statements {
        conn.query_drop(&step.sql)
            .await
            .map_err(MysqlError::connection(format!("running {}", step.sql)))?;
    }
    Ok(())
}

/// `tributary setup`: connects with `opts` (a DBA's), plans for `user`,
/// shows the plan with `show`, and runs it when `apply`; returns how many
/// statements ran.
pub async fn setup(
    opts: crate::tls::ConnectOpts,
    user: &str,
    apply: bool,
    show: impl FnOnce(&SetupPlan),
) -> Result<usize, MysqlError> {
    let mut conn = opts
        .connect()
        .await
        .map_err(MysqlError::connection("connecting to the server"))?;
    let plan = plan(&mut conn, user).await?;
    show(&plan);
    let ran = if apply {
        apply_plan(&mut conn, &plan).await?;
        plan.statements.len()
    } else {
        0
    };
    // Best effort: the work is done either way.
    let _ = conn.disconnect().await;
    Ok(ran)
}

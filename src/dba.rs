//! `tributary setup [--apply]` (both sources) and `tributary slots
//! [list|drop NAME]` (Postgres): the DBA's commands.
//!
//! Beside the dataflow, before it starts (setup) or after it is removed
//! (slots drop). The SQL lives in the source crate (`provision`, `slots`);
//! this module connects, prints and maps failures to exit codes.

use anyhow::Context as _;
use tributary_postgres::inspect::inspect;
use tributary_postgres::replication::{connect_sql, describe};
use tributary_postgres::slots::DropError;
use tributary_postgres::{provision, slots};

use crate::settings::{ConfigError, SourceConfig, Validated};

/// The Postgres source's config; these commands have no MySQL side yet.
fn postgres(v: &Validated) -> Result<&tributary_postgres::PostgresSourceConfig, ConfigError> {
    match &v.source {
        SourceConfig::Postgres(config) => Ok(config),
        SourceConfig::Mysql(_) => Err(ConfigError::Invalid {
            key: "source.kind".into(),
            message: "slots are PostgreSQL replication slots: use kind = \"postgres\"".into(),
        }),
    }
}

/// Prints the statements that prepare the server, or runs them with
/// `apply`. `admin_url` connects as someone allowed to run them (the
/// connector's own user usually is not); privileges are planned for the
/// user of `source.url` either way.
pub async fn setup(v: &Validated, apply: bool, admin_url: Option<&str>) -> anyhow::Result<u8> {
    match &v.source {
        SourceConfig::Postgres(config) => setup_postgres(config, apply, admin_url).await,
        SourceConfig::Mysql(config) => setup_mysql(config, apply, admin_url).await,
    }
}

fn admin_url_error(message: String) -> ConfigError {
    ConfigError::Invalid {
        key: "--admin-url".into(),
        message,
    }
}

async fn setup_postgres(
    cfg: &tributary_postgres::PostgresSourceConfig,
    apply: bool,
    admin_url: Option<&str>,
) -> anyhow::Result<u8> {
    let connection = match admin_url {
        Some(url) => tributary_postgres::config::parse_url(url, None)
            .map_err(|e| admin_url_error(e.message))?,
        None => cfg.connection.clone(),
    };
    let client = connect_sql(&connection).await?;
    let role = cfg.connection.get_user().unwrap_or_default();
    let state = inspect(&client, role, &cfg.filter, &cfg.publication, &cfg.slot)
        .await
        .context("reading the server's state")?;
    let plan = provision::plan(&state, role, &cfg.publication, &cfg.slot);
    print!("{}", plan.render());
    if apply && !plan.statements.is_empty() {
        provision::apply(&client, &plan).await?;
        println!(
            "-- applied {} statement(s) on {}",
            plan.statements.len(),
            describe(&connection)
        );
    }
    Ok(0)
}

async fn setup_mysql(
    cfg: &tributary_mysql::MysqlSourceConfig,
    apply: bool,
    admin_url: Option<&str>,
) -> anyhow::Result<u8> {
    let opts = match admin_url {
        Some(url) => tributary_mysql::config::parse_url(url, None)
            .map_err(|e| admin_url_error(e.to_string()))?,
        None => cfg.opts.clone(),
    };
    let user = cfg.opts.user().unwrap_or_default();
    let ran =
        tributary_mysql::provision::setup(opts, user, apply, |plan| print!("{}", plan.render()))
            .await?;
    if ran > 0 {
        println!("-- applied {ran} statement(s)");
    }
    Ok(0)
}

/// `schema --table T`: the JSON Schema of the table's `after`, printed on
/// stdout. `T` is `schema.table`, or `table` in `public` (PostgreSQL) or
/// in the URL's database (MySQL).
pub async fn table_schema(v: &Validated, table: &str) -> anyhow::Result<u8> {
    let config = match &v.source {
        SourceConfig::Postgres(config) => config,
        SourceConfig::Mysql(config) => {
            let (db, name) = match table.split_once('.') {
                Some((db, name)) => (db.to_owned(), name),
                None => (
                    config.opts.opts.db_name().unwrap_or_default().to_owned(),
                    table,
                ),
            };
            let mut conn = config.opts.connect().await?;
            let Some(document) =
                tributary_mysql::table_schema::after_schema(&mut conn, &db, name).await?
            else {
                eprintln!("error: --table {db}.{name}: no such table in the source database");
                return Ok(2);
            };
            println!("{}", serde_json::to_string_pretty(&document)?);
            return Ok(0);
        }
    };
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let client = connect_sql(&config.connection).await?;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&schema, &name],
        )
        .await?
        .is_some();
    if !exists {
        eprintln!("error: --table {schema}.{name}: no such table in the source database");
        return Ok(2);
    }
    let document = tributary_postgres::table_schema::after_schema(&client, schema, name).await?;
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(0)
}

/// `slots list`: every logical slot of the cluster.
pub async fn list_slots(v: &Validated) -> anyhow::Result<u8> {
    let client = connect_sql(&postgres(v)?.connection).await?;
    let slots = slots::list(&client).await?;
    println!(
        "{:<32} {:<10} {:<16} {:>8} {:>14} {:<10}",
        "SLOT", "PLUGIN", "DATABASE", "PID", "LAG_BYTES", "WAL_STATUS"
    );
    let dash = || "-".to_owned();
    for slot in slots {
        println!(
            "{:<32} {:<10} {:<16} {:>8} {:>14} {:<10}",
            slot.name,
            slot.plugin.unwrap_or_else(dash),
            slot.database.unwrap_or_else(dash),
            slot.active_pid.map_or_else(dash, |p| p.to_string()),
            slot.lag_bytes.map_or_else(dash, |l| l.to_string()),
            slot.wal_status.unwrap_or_else(dash),
        );
    }
    Ok(0)
}

/// `slots drop NAME`: refuses an active slot or a missing one (exit 2).
pub async fn drop_slot(v: &Validated, name: &str) -> anyhow::Result<u8> {
    let client = connect_sql(&postgres(v)?.connection).await?;
    match slots::drop_slot(&client, name).await {
        Ok(()) => {
            println!("dropped replication slot {name}");
            Ok(0)
        }
        Err(err @ (DropError::Active { .. } | DropError::Missing(_))) => {
            eprintln!("error: {err}");
            Ok(2)
        }
        Err(DropError::Postgres(err)) => Err(err.into()),
    }
}

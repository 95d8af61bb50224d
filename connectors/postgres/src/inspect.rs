//! Reads what `check`, `setup` and `slots` need to know about the server:
//! settings, the connector's role, the captured tables, the publication and
//! the slots.
//!
//! Beside the dataflow, before it starts: nothing here changes the server.
//! Privileges are read for a named role (the one in `source.url`), so that
//! `setup` can inspect with a DBA's connection on the connector's behalf.

use tokio_postgres::Client;
use tributary_envelope::TableFilter;

use crate::error::PostgresError;

/// The server's state as it matters to one connector.
#[derive(Debug, Clone)]
pub struct ServerState {
    /// `current_database()`.
    pub database: String,
    /// `wal_level`.
    pub wal_level: String,
    /// `max_replication_slots`.
    pub max_replication_slots: i64,
    /// Slots that exist (any kind).
    pub slots_used: i64,
    /// `max_wal_senders`.
    pub max_wal_senders: i64,
    /// WAL senders running now.
    pub wal_senders_used: i64,
    /// `max_slot_wal_keep_size` as shown (`-1` is unlimited).
    pub max_slot_wal_keep_size: String,
    /// The connector's role; `None` when it does not exist.
    pub role: Option<RoleState>,
    /// Tables matching the patterns (partitions are captured through
    /// their root and not listed).
    pub tables: Vec<TableState>,
    /// The configured publication; `None` when missing.
    pub publication: Option<PublicationState>,
    /// The configured slot; `None` when missing.
    pub slot: Option<SlotState>,
}

/// The connector role's attributes.
#[derive(Debug, Clone)]
pub struct RoleState {
    /// The role's name.
    pub name: String,
    /// `rolreplication`.
    pub replication: bool,
    /// `rolsuper` (a superuser can do everything; `check` says it is more
    /// than needed).
    pub superuser: bool,
    /// May create objects (a publication) in the database.
    pub create_on_database: bool,
}

/// One captured table.
#[derive(Debug, Clone)]
pub struct TableState {
    /// Schema.
    pub schema: String,
    /// Table.
    pub name: String,
    /// A partitioned table (published through `publish_via_partition_root`).
    pub partitioned: bool,
    /// Has a primary key.
    pub has_primary_key: bool,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// The role may SELECT from it.
    pub select: bool,
    /// The role has USAGE on its schema.
    pub schema_usage: bool,
    /// The role owns it (or is a member of its owner).
    pub owned: bool,
}

impl TableState {
    /// `"schema"."table"`, quoted for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// `schema.table`, for messages.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

/// The configured publication.
#[derive(Debug, Clone)]
pub struct PublicationState {
    /// `FOR ALL TABLES`.
    pub all_tables: bool,
    /// `publish_via_partition_root`.
    pub via_root: bool,
    /// Publishes UPDATE and DELETE (a table without replica identity then
    /// fails those statements on the primary).
    pub updates_or_deletes: bool,
    /// The connector's role owns it.
    pub owned: bool,
    /// Tables it publishes, as (schema, table).
    pub tables: Vec<(String, String)>,
}

impl PublicationState {
    /// Whether it publishes `table`.
    pub fn covers(&self, table: &TableState) -> bool {
        self.all_tables
            || self
                .tables
                .iter()
                .any(|(s, t)| *s == table.schema && *t == table.name)
    }
}

/// One logical replication slot (`pg_replication_slots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// Slot name.
    pub name: String,
    /// Output plugin.
    pub plugin: Option<String>,
    /// Database it decodes.
    pub database: Option<String>,
    /// The pid of the walsender streaming from it, when active.
    pub active_pid: Option<i32>,
    /// `wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
    /// WAL bytes between the server's current position and what the
    /// slot's consumer confirmed (what the slot keeps on disk and what a
    /// consumer still has to read).
    pub lag_bytes: Option<i64>,
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    crate::setup::quote_ident(name)
}

/// Quotes a string literal for SQL.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Reads everything [`ServerState`] holds, for `role` (the user of
/// `source.url`).
pub async fn inspect(
    client: &Client,
    role: &str,
    filter: &TableFilter,
    publication: &str,
    slot: &str,
) -> Result<ServerState, PostgresError> {
    let setting = |name: &'static str| async move {
        client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map(|row| row.get::<_, String>(0))
            .map_err(PostgresError::query(format!("reading {name}")))
    };
    let number = |text: String| text.trim().parse::<i64>().unwrap_or(0);
    let wal_level = setting("wal_level").await?;
    let max_replication_slots = number(setting("max_replication_slots").await?);
    let max_wal_senders = number(setting("max_wal_senders").await?);
    let max_slot_wal_keep_size = setting("max_slot_wal_keep_size").await?;
    let counts = client
        .query_one(
            "SELECT current_database()::text, \
                    (SELECT count(*) FROM pg_replication_slots), \
                    (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender')",
            &[],
        )
        .await
        .map_err(PostgresError::query("counting slots and WAL senders"))?;
    let role_state = read_role(client, role).await?;
    let tables = read_tables(client, role_state.as_ref().map(|r| r.name.as_str()), filter).await?;
    let publication =
        read_publication(client, role_state.is_some().then_some(role), publication).await?;
    let slot = list_slots(client)
        .await?
        .into_iter()
        .find(|s| s.name == slot);
    Ok(ServerState {
        database: counts.get(0),
        wal_level,
        max_replication_slots,
        slots_used: counts.get(1),
        max_wal_senders,
        wal_senders_used: counts.get(2),
        max_slot_wal_keep_size,
        role: role_state,
        tables,
        publication,
        slot,
    })
}

async fn read_role(client: &Client, role: &str) -> Result<Option<RoleState>, PostgresError> {
    let row = client
        .query_opt(
            "SELECT rolname::text, rolreplication, rolsuper, \
                    has_database_privilege(rolname, current_database(), 'CREATE') \
             FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .await
        .map_err(PostgresError::query("reading pg_roles"))?;
    Ok(row.map(|row| RoleState {
        name: row.get(0),
        replication: row.get(1),
        superuser: row.get(2),
        create_on_database: row.get(3),
    }))
}

async fn read_tables(
    client: &Client,
    role: Option<&str>,
    filter: &TableFilter,
) -> Result<Vec<TableState>, PostgresError> {
    // Privileges of a role that does not exist yet are all false.
    let privileges = match role {
        Some(_) => {
            "has_table_privilege($1, c.oid, 'SELECT'), \
             has_schema_privilege($1, n.oid, 'USAGE'), \
             pg_has_role($1, c.relowner, 'USAGE')"
        }
        None => "$1::text IS NULL, false, false",
    };
    let sql = format!(
        "SELECT n.nspname::text, c.relname::text, c.relkind = 'p', \
                EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                c.relreplident::text, {privileges} \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg\\_toast%' \
         ORDER BY 1, 2"
    );
    let rows = client
        .query(&sql, &[&role.unwrap_or("")])
        .await
        .map_err(PostgresError::query("listing the captured tables"))?;
    Ok(rows
        .iter()
        .filter(|row| filter.matches(row.get(0), row.get(1)))
        .map(|row| TableState {
            schema: row.get(0),
            name: row.get(1),
            partitioned: row.get(2),
            has_primary_key: row.get(3),
            replica_identity: row.get::<_, String>(4).chars().next().unwrap_or('d'),
            select: row.get(5),
            schema_usage: row.get(6),
            owned: row.get(7),
        })
        .collect())
}

async fn read_publication(
    client: &Client,
    role: Option<&str>,
    publication: &str,
) -> Result<Option<PublicationState>, PostgresError> {
    let row = client
        .query_opt(
            "SELECT puballtables, pubviaroot, pubupdate OR pubdelete, \
                    CASE WHEN $2::text = '' THEN false ELSE pg_has_role($2, pubowner, 'USAGE') END \
             FROM pg_publication WHERE pubname = $1",
            &[&publication, &role.unwrap_or("")],
        )
        .await
        .map_err(PostgresError::query("reading pg_publication"))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let tables = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(PostgresError::query("reading pg_publication_tables"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(Some(PublicationState {
        all_tables: row.get(0),
        via_root: row.get(1),
        updates_or_deletes: row.get(2),
        owned: row.get(3),
        tables,
    }))
}

/// Every logical replication slot of the cluster, by name.
pub async fn list_slots(client: &Client) -> Result<Vec<SlotState>, PostgresError> {
    let rows = client
        .query(
            "SELECT slot_name::text, plugin::text, database::text, active_pid, wal_status, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_type = 'logical' ORDER BY slot_name",
            &[],
        )
        .await
        .map_err(PostgresError::query("reading pg_replication_slots"))?;
    Ok(rows
        .iter()
        .map(|row| SlotState {
            name: row.get(0),
            plugin: row.get(1),
            database: row.get(2),
            active_pid: row.get(3),
            wal_status: row.get(4),
            lag_bytes: row.get(5),
        })
        .collect())
}

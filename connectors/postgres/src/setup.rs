//! Makes the server ready to stream: checks `wal_level`, creates the
//! publication for the configured tables and the logical slot when missing.

use crate::lsn::Lsn;
use tokio_postgres::Client;
use tracing::{info, warn};

use crate::error::PostgresError;
use tributary_envelope::TableFilter;

/// What [`ensure`] found and did.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// Tables matching the patterns, `schema.table`.
    pub tables: Vec<String>,
    /// The same tables as (schema, table).
    pub matching: Vec<(String, String)>,
    /// Matching tables the publication did not hold and that were added to
    /// it now (their changes were not published before: they need a copy).
    pub added_to_publication: Vec<(String, String)>,
    /// The publication was created now.
    pub publication_created: bool,
    /// The slot was created now.
    pub slot_created: bool,
    /// The slot's confirmed position: where streaming resumes.
    pub confirmed_flush_lsn: u64,
}

/// Quotes an identifier for SQL.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// What [`matching_tables`] found.
#[derive(Debug, Default)]
pub struct MatchingTables {
    /// Tables (ordinary and partitioned) matching the filter, as (schema, table).
    pub tables: Vec<(String, String)>,
    /// Those that are partitioned, `schema.table`.
    pub partitioned: Vec<String>,
}

/// Tables (ordinary and partitioned) matching the filter, as (schema,
/// table). Partitions are never listed themselves: the publication
/// publishes their changes under their root table
/// (`publish_via_partition_root`), so a partition named by the patterns
/// without its root is reported with a warning.
pub async fn matching_tables(
    client: &Client,
    filter: &TableFilter,
) -> Result<MatchingTables, PostgresError> {
    let rows = client
        .query(
            "SELECT n.nspname::text, c.relname::text, c.relispartition, \
                    rn.nspname::text, r.relname::text, c.relkind = 'p' \
             FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_class r ON r.oid = CASE WHEN c.relispartition \
                  THEN pg_partition_root(c.oid) ELSE c.oid END \
             JOIN pg_namespace rn ON rn.oid = r.relnamespace \
             WHERE c.relkind IN ('r', 'p') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_toast%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(PostgresError::query("listing tables"))?;
    let mut tables = MatchingTables::default();
    for row in &rows {
        let (schema, table): (String, String) = (row.get(0), row.get(1));
        if !filter.matches(&schema, &table) {
            continue;
        }
        if !row.get::<_, bool>(2) {
            if row.get::<_, bool>(5) {
                tables.partitioned.push(format!("{schema}.{table}"));
            }
            tables.tables.push((schema, table));
            continue;
        }
        let (root_schema, root): (String, String) = (row.get(3), row.get(4));
        if !filter.matches(&root_schema, &root) {
            warn!(
                partition = %format!("{schema}.{table}"),
                root = %format!("{root_schema}.{root}"),
                "source.tables names a partition but not its partitioned table: changes of \
                 partitions are published under the partitioned table, which is not captured; \
                 add it to source.tables"
            );
        }
    }
    Ok(tables)
}

/// Ensures the publication exists and checks the slot when it does;
/// returns where streaming resumes (0 when the slot is still to be made).
pub async fn ensure(
    client: &Client,
    filter: &TableFilter,
    publication: &str,
    slot: &str,
) -> Result<SetupReport, PostgresError> {
    let wal_level: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(PostgresError::query("reading wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(PostgresError::Setup(format!(
            "the server's wal_level is {wal_level}: set `wal_level = logical` in postgresql.conf \
             (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL"
        )));
    }
    let MatchingTables {
        tables,
        partitioned,
    } = matching_tables(client, filter).await?;
    let names: Vec<String> = tables.iter().map(|(s, t)| format!("{s}.{t}")).collect();
    if tables.is_empty() {
        warn!(patterns = ?filter.include(), "no table matches source.tables yet");
    }
    let (publication_created, added_to_publication) =
        ensure_publication(client, publication, &tables, &partitioned).await?;
    if !partitioned.is_empty() {
        warn!(
            tables = %partitioned.join(", "),
            "captured partitioned tables: PostgreSQL does not replicate a TRUNCATE, DETACH or \
             DROP of a single partition; truncate the partitioned table itself, or delete the \
             rows, so that consumers see it"
        );
    }

    let existing = client
        .query_opt(
            "SELECT plugin::text, database::text, confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(PostgresError::query("reading pg_replication_slots"))?;
    let (slot_created, confirmed) = match existing {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let current_db: String = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(PostgresError::query("reading current_database()"))?
                .get(0);
            if plugin.as_deref() != Some("pgoutput")
                || database.as_deref() != Some(current_db.as_str())
            {
                return Err(PostgresError::Setup(format!(
                    "replication slot {slot} exists but is not a pgoutput slot of database {current_db} \
                     (plugin {plugin:?}, database {database:?}): choose another source.postgres.slot or \
                     drop it with SELECT pg_drop_replication_slot('{slot}')"
                )));
            }
            (false, row.get::<_, Option<String>>(2))
        }
        // The caller creates it ([`create_slot`], or with an exported
        // snapshot).
        None => (false, None),
    };
    let confirmed_flush_lsn = confirmed
        .as_deref()
        .and_then(Lsn::parse)
        .map(|lsn| lsn.0)
        .unwrap_or(0);
    Ok(SetupReport {
        tables: names,
        matching: tables,
        added_to_publication,
        publication_created,
        slot_created,
        confirmed_flush_lsn,
    })
}

/// The publication option that publishes a partition's changes under its
/// partitioned (root) table: without it pgoutput names the leaf partition,
/// which the table patterns do not match.
const VIA_ROOT: &str = "publish_via_partition_root = true";

/// Turns `publish_via_partition_root` on for an existing publication.
async fn publish_via_root(
    client: &Client,
    publication: &str,
    partitioned: &[String],
) -> Result<(), PostgresError> {
    let sql = format!(
        "ALTER PUBLICATION {} SET ({VIA_ROOT})",
        quote_ident(publication)
    );
    let altered = client.batch_execute(&sql).await;
    if let Err(err) = &altered
        && partitioned.is_empty()
    {
        // Nothing captured is partitioned yet: the option only matters for
        // partitioned tables created later, so say it and go on.
        warn!(
            publication, error = %err, sql = %sql,
            "cannot set publish_via_partition_root on the publication; a partitioned table \
             created later would be published under its partitions' names"
        );
        return Ok(());
    }
    altered.map_err(PostgresError::query(format!(
        "publication {publication} publishes partitions under their own names, so changes \
             of the partitioned tables {} would be lost; the user must own the publication, or \
             a DBA runs: {sql}",
        partitioned.join(", ")
    )))?;
    info!(
        publication,
        "publication now publishes partitions via their root table"
    );
    Ok(())
}

/// Creates the logical slot `slot` (pgoutput); returns its position.
pub async fn create_slot(client: &Client, slot: &str) -> Result<u64, PostgresError> {
    let row = client
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(PostgresError::query(format!(
            "creating replication slot {slot} (the user needs the REPLICATION attribute: \
             ALTER ROLE <user> REPLICATION)"
        )))?;
    info!(slot, "created logical replication slot");
    Ok(row
        .get::<_, Option<String>>(0)
        .as_deref()
        .and_then(Lsn::parse)
        .map_or(0, |lsn| lsn.0))
}

/// Creates the publication for `tables` when missing, or adds the matching
/// tables it lacks; returns whether it was created and the tables added.
async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[(String, String)],
    partitioned: &[String],
) -> Result<(bool, Vec<(String, String)>), PostgresError> {
    let existing = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(PostgresError::query("reading pg_publication"))?;
    match existing {
        None => {
            let sql = if tables.is_empty() {
                format!(
                    "CREATE PUBLICATION {} WITH ({VIA_ROOT})",
                    quote_ident(publication)
                )
            } else {
                format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH ({VIA_ROOT})",
                    quote_ident(publication),
                    table_list(tables.iter())
                )
            };
            client
                .batch_execute(&sql)
                .await
                .map_err(PostgresError::query(format!(
                    "creating publication {publication} (the user must own the published tables, \
                 or a DBA runs: {sql})"
                )))?;
            info!(publication, tables = tables.len(), "created publication");
            Ok((true, tables.to_vec()))
        }
        Some(row) => {
            if !row.get::<_, bool>(1) {
                publish_via_root(client, publication, partitioned).await?;
            }
            if row.get::<_, bool>(0) {
                return Ok((false, Vec::new()));
            }
            let published = published_tables(client, publication).await?;
            let missing: Vec<(String, String)> = tables
                .iter()
                .filter(|t| !published.contains(t))
                .cloned()
                .collect();
            add_to_publication(client, publication, &missing).await?;
            Ok((false, missing))
        }
    }
}

/// The tables `publication` publishes, as (schema, table): those named,
/// those of its schemas (`FOR TABLES IN SCHEMA`) or every table (`FOR ALL
/// TABLES`), as `pg_publication_tables` expands them.
pub async fn published_tables(
    client: &Client,
    publication: &str,
) -> Result<Vec<(String, String)>, PostgresError> {
    let rows = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(PostgresError::query("reading pg_publication_tables"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Adds `tables` to `publication`. When the user may not (it must own the
/// publication and the tables), the error names the statement a DBA runs:
/// without it the tables' changes would never be captured.
pub async fn add_to_publication(
    client: &Client,
    publication: &str,
    tables: &[(String, String)],
) -> Result<(), PostgresError> {
    if tables.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "ALTER PUBLICATION {} ADD TABLE {}",
        quote_ident(publication),
        table_list(tables.iter())
    );
    if let Err(err) = client.batch_execute(&sql).await {
        let cause = err
            .as_db_error()
            .map_or_else(|| err.to_string(), |db| db.message().to_owned());
        return Err(PostgresError::Misconfigured {
            setting: "source.postgres.publication",
            message: format!(
                "source.tables matches tables that publication {publication} does not publish \
                 ({cause}): the user must own the publication and the tables, or a DBA runs: \
                 {sql};"
            ),
        });
    }
    info!(
        publication,
        added = %tables.iter().map(|(s, t)| format!("{s}.{t}")).collect::<Vec<_>>().join(", "),
        "added tables to the publication"
    );
    Ok(())
}

/// `"schema"."table", ...` for SQL.
fn table_list<'a>(tables: impl Iterator<Item = &'a (String, String)>) -> String {
    tables
        .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
        .collect::<Vec<_>>()
        .join(", ")
}

//! `tributary setup` for the Postgres source: the SQL that makes a server
//! ready for the connector, with the least privilege it needs.
//!
//! Beside the dataflow, before it starts. From the [`ServerState`] it plans
//! only what is missing: `wal_level`, the role (LOGIN REPLICATION, never
//! superuser), USAGE on the schemas and SELECT on the captured tables, the
//! publication (`publish_via_partition_root = true`) and the slot. `setup`
//! prints the plan; `setup --apply` runs it statement by statement.

use tokio_postgres::Client;
use tributary_envelope::SetupPlan as Plan;

use crate::error::PostgresError;
use crate::inspect::{ServerState, TableState, quote_ident, quote_literal};

/// `CREATE PUBLICATION` for `tables`, publishing partitions via their
/// root table.
pub fn create_publication_sql(name: &str, tables: &[TableState]) -> String {
    let via_root = "WITH (publish_via_partition_root = true)";
    if tables.is_empty() {
        return format!("CREATE PUBLICATION {} {via_root};", quote_ident(name));
    }
    let list = tables
        .iter()
        .map(TableState::quoted)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE PUBLICATION {} FOR TABLE {list} {via_root};",
        quote_ident(name)
    )
}

/// What must run so that `role` can stream `tables` through `publication`
/// and `slot`.
pub fn plan(state: &ServerState, role: &str, publication: &str, slot: &str) -> Plan {
    let mut plan = Plan::default();
    let logical = state.wal_level == "logical";
    if !logical {
        plan.push(
            "ALTER SYSTEM SET wal_level = logical;".into(),
            format!(
                "wal_level is {}; logical decoding needs logical",
                state.wal_level
            ),
        );
        plan.afterwards.push(
            "restart PostgreSQL for wal_level = logical to take effect, then run tributary setup \
             again to create the slot"
                .into(),
        );
    }
    let quoted_role = quote_ident(role);
    match &state.role {
        None => {
            plan.push(
                format!("CREATE ROLE {quoted_role} WITH LOGIN REPLICATION;"),
                format!("the connector's role {role}: may log in and stream, nothing more"),
            );
            plan.afterwards.push(format!(
                "give {role} a password (\\password {role} in psql) and put it in \
                 TRIBUTARY__SOURCE__PASSWORD or source.password_file"
            ));
        }
        Some(attrs) if !attrs.replication && !attrs.superuser => {
            plan.push(
                format!("ALTER ROLE {quoted_role} WITH REPLICATION;"),
                format!("{role} must be allowed to open a replication stream"),
            );
        }
        Some(_) => {}
    }
    let mut schemas: Vec<&str> = state
        .tables
        .iter()
        .filter(|t| !t.schema_usage)
        .map(|t| t.schema.as_str())
        .collect();
    schemas.dedup();
    for schema in schemas {
        plan.push(
            format!(
                "GRANT USAGE ON SCHEMA {} TO {quoted_role};",
                quote_ident(schema)
            ),
            format!("{role} must see the tables of schema {schema}"),
        );
    }
    let unreadable: Vec<&TableState> = state.tables.iter().filter(|t| !t.select).collect();
    if !unreadable.is_empty() {
        plan.push(
            format!(
                "GRANT SELECT ON {} TO {quoted_role};",
                unreadable
                    .iter()
                    .map(|t| t.quoted())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("{role} reads the captured tables (snapshots, check)"),
        );
    }
    plan_publication(&mut plan, state, publication);
    if logical && state.slot.is_none() {
        plan.push(
            format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput');",
                quote_literal(slot)
            ),
            format!(
                "the slot keeps the changes from now on until {role} confirms them; drop it when \
                 the connector is removed (tributary slots drop {slot})"
            ),
        );
    }
    plan
}

fn plan_publication(plan: &mut Plan, state: &ServerState, name: &str) {
    let Some(publication) = &state.publication else {
        plan.push(
            create_publication_sql(name, &state.tables),
            "the publication names the captured tables; partitions publish as their root table",
        );
        return;
    };
    let missing: Vec<String> = state
        .tables
        .iter()
        .filter(|t| !publication.covers(t))
        .map(TableState::quoted)
        .collect();
    if !missing.is_empty() {
        plan.push(
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(name),
                missing.join(", ")
            ),
            format!("publication {name} must publish every captured table"),
        );
    }
    if !publication.via_root {
        plan.push(
            format!(
                "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
                quote_ident(name)
            ),
            "partitions must publish as their partitioned table",
        );
    }
}

/// Runs the plan's statements in order; stops at the first that fails.
pub async fn apply(client: &Client, plan: &Plan) -> Result<(), PostgresError> {
    for step in &plan.statements {
        client
            .batch_execute(&step.sql)
            .await
            .map_err(PostgresError::query(format!("running {}", step.sql)))?;
    }
    Ok(())
}

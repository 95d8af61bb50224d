//! `tributary check` for the Postgres source: what would stop or endanger
//! the replication stream, each finding with the SQL or setting that fixes
//! it.
//!
//! Beside the dataflow, before it starts: it connects with the configured
//! credentials (an ordinary connection, no slot is touched) and turns the
//! [`ServerState`] into [`CheckItem`]s. A missing publication or slot that
//! `tributary run` will create itself is a warning, not a failure: the
//! pipeline can run.

use tributary_envelope::CheckItem;

use crate::config::PostgresSourceConfig;
use crate::inspect::{ServerState, TableState, inspect, quote_ident, quote_literal};
use crate::replication::{connect_sql, describe};

/// The component name in every item.
const COMPONENT: &str = "postgres";

/// Slot lag above which `check` warns (1 GiB of WAL kept for the slot).
pub const LAG_WARN_BYTES: i64 = 1 << 30;

/// Checks the server, the role, the tables, the publication and the slot.
pub async fn check(config: &PostgresSourceConfig) -> Vec<CheckItem> {
    let server = describe(&config.connection);
    let client = match connect_sql(&config.connection).await {
        Ok(client) => client,
        Err(err) => {
            return vec![CheckItem::fail(
                COMPONENT,
                "connection",
                format!(
                    "cannot connect to {server}: {}",
                    tributary_envelope::error_text::one_line(&err)
                ),
                "check source.url (host, port, database, user) and the password, and that \
                 pg_hba.conf admits this user from this host",
            )];
        }
    };
    let role = config.connection.get_user().unwrap_or_default();
    let state = match inspect(
        &client,
        role,
        &config.filter,
        &config.publication,
        &config.slot,
    )
    .await
    {
        Ok(state) => state,
        Err(err) => {
            return vec![CheckItem::fail(
                COMPONENT,
                "catalog",
                format!(
                    "cannot read the catalog of {server}: {}",
                    tributary_envelope::error_text::one_line(&err)
                ),
                "the user needs to read pg_catalog (it can by default); check its privileges",
            )];
        }
    };
    let mut items = vec![CheckItem::ok(
        COMPONENT,
        "connection",
        format!("connected to {server} as {role}"),
    )];
    items.extend(server_items(&state));
    items.extend(role_items(&state, role));
    items.extend(table_items(&state, role));
    items.extend(publication_items(&state, config, role));
    items.extend(slot_items(&state, config));
    items
}

fn server_items(state: &ServerState) -> Vec<CheckItem> {
    let mut items = Vec::new();
    items.push(if state.wal_level == "logical" {
        CheckItem::ok(COMPONENT, "wal_level", "wal_level is logical")
    } else {
        CheckItem::fail(
            COMPONENT,
            "wal_level",
            format!(
                "wal_level is {}: logical decoding needs logical",
                state.wal_level
            ),
            "ALTER SYSTEM SET wal_level = logical; -- then restart PostgreSQL",
        )
    });
    let slot_needed = i64::from(state.slot.is_none());
    let free_slots = state.max_replication_slots - state.slots_used;
    items.push(if free_slots >= slot_needed {
        CheckItem::ok(
            COMPONENT,
            "max_replication_slots",
            format!(
                "{} of {} replication slots in use",
                state.slots_used, state.max_replication_slots
            ),
        )
    } else {
        CheckItem::fail(
            COMPONENT,
            "max_replication_slots",
            format!(
                "all {} replication slots are in use: the connector's slot cannot be created",
                state.max_replication_slots
            ),
            format!(
                "ALTER SYSTEM SET max_replication_slots = {}; -- then restart PostgreSQL \
                 (or drop an unused slot: tributary slots list)",
                state.max_replication_slots + 1
            ),
        )
    });
    let sender_needed = i64::from(state.slot.as_ref().is_none_or(|s| s.active_pid.is_none()));
    items.push(
        if state.max_wal_senders - state.wal_senders_used >= sender_needed {
            CheckItem::ok(
                COMPONENT,
                "max_wal_senders",
                format!(
                    "{} of {} WAL senders in use",
                    state.wal_senders_used, state.max_wal_senders
                ),
            )
        } else {
            CheckItem::fail(
                COMPONENT,
                "max_wal_senders",
                format!(
                    "all {} WAL senders are in use: the replication connection would be refused",
                    state.max_wal_senders
                ),
                format!(
                    "ALTER SYSTEM SET max_wal_senders = {}; -- then restart PostgreSQL",
                    state.max_wal_senders + 1
                ),
            )
        },
    );
    items.push(if state.max_slot_wal_keep_size.trim() == "-1" {
        CheckItem::warn(
            COMPONENT,
            "max_slot_wal_keep_size",
            "max_slot_wal_keep_size is unlimited: a stopped connector makes the server keep WAL \
             until its disk is full",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB'; SELECT pg_reload_conf(); -- size \
             it to the disk; beyond it the slot is lost and the connector must start over",
        )
    } else {
        CheckItem::ok(
            COMPONENT,
            "max_slot_wal_keep_size",
            format!(
                "max_slot_wal_keep_size is {}: a stopped connector cannot fill the disk",
                state.max_slot_wal_keep_size
            ),
        )
    });
    items
}

fn role_items(state: &ServerState, role: &str) -> Vec<CheckItem> {
    let Some(attrs) = &state.role else {
        return vec![];
    };
    vec![if attrs.superuser {
        CheckItem::warn(
            COMPONENT,
            "replication_role",
            format!("{role} is a superuser: more privilege than the connector needs"),
            "use a role WITH LOGIN REPLICATION and SELECT on the captured tables (tributary setup \
             prints it)",
        )
    } else if attrs.replication {
        CheckItem::ok(
            COMPONENT,
            "replication_role",
            format!("{role} has the REPLICATION attribute"),
        )
    } else {
        CheckItem::fail(
            COMPONENT,
            "replication_role",
            format!("{role} lacks the REPLICATION attribute: it cannot open a replication stream"),
            format!("ALTER ROLE {} WITH REPLICATION;", quote_ident(role)),
        )
    }]
}

fn names(tables: &[&TableState]) -> String {
    tables
        .iter()
        .map(|t| t.display())
        .collect::<Vec<_>>()
        .join(", ")
}

fn quoted(tables: &[&TableState]) -> String {
    tables
        .iter()
        .map(|t| t.quoted())
        .collect::<Vec<_>>()
        .join(", ")
}

fn table_items(state: &ServerState, role: &str) -> Vec<CheckItem> {
    if state.tables.is_empty() {
        return vec![CheckItem::warn(
            COMPONENT,
            "tables",
            "no table matches source.tables: nothing would be captured",
            "fix source.tables, or create the tables first",
        )];
    }
    let mut items = vec![CheckItem::ok(
        COMPONENT,
        "tables",
        format!("{} tables captured", state.tables.len()),
    )];
    let unreadable: Vec<&TableState> = state
        .tables
        .iter()
        .filter(|t| !(t.select && t.schema_usage))
        .collect();
    items.push(if unreadable.is_empty() {
        CheckItem::ok(
            COMPONENT,
            "select",
            format!("{role} may SELECT every captured table"),
        )
    } else {
        let mut schemas: Vec<&str> = unreadable
            .iter()
            .filter(|t| !t.schema_usage)
            .map(|t| t.schema.as_str())
            .collect();
        schemas.dedup();
        let mut fix = String::new();
        for schema in schemas {
            fix.push_str(&format!(
                "GRANT USAGE ON SCHEMA {} TO {}; ",
                quote_ident(schema),
                quote_ident(role)
            ));
        }
        fix.push_str(&format!(
            "GRANT SELECT ON {} TO {};",
            quoted(&unreadable),
            quote_ident(role)
        ));
        CheckItem::fail(
            COMPONENT,
            "select",
            format!("{role} may not SELECT {}", names(&unreadable)),
            fix,
        )
    });
    let no_identity: Vec<&TableState> = state
        .tables
        .iter()
        .filter(|t| t.replica_identity == 'n' || (t.replica_identity == 'd' && !t.has_primary_key))
        .collect();
    let full_without_key: Vec<&TableState> = state
        .tables
        .iter()
        .filter(|t| t.replica_identity == 'f' && !t.has_primary_key)
        .collect();
    items.push(if !no_identity.is_empty() {
        CheckItem::fail(
            COMPONENT,
            "primary_key",
            format!(
                "no primary key and no replica identity: {}; once published, UPDATE and \
                 DELETE on them fail on the primary (add a primary key, or:)",
                names(&no_identity)
            ),
            no_identity
                .iter()
                .map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.quoted()))
                .collect::<Vec<_>>()
                .join(" "),
        )
    } else if !full_without_key.is_empty() {
        CheckItem::warn(
            COMPONENT,
            "primary_key",
            format!(
                "no primary key (REPLICA IDENTITY FULL): {}; their events carry a null key \
                 and share one partition key (the table name), so one shard takes all of them",
                names(&full_without_key)
            ),
            "add a primary key: ALTER TABLE ... ADD PRIMARY KEY (...);",
        )
    } else {
        CheckItem::ok(
            COMPONENT,
            "primary_key",
            "every captured table has a primary key",
        )
    });
    let partial_before: Vec<&TableState> = state
        .tables
        .iter()
        .filter(|t| matches!(t.replica_identity, 'd' | 'i') && t.has_primary_key)
        .collect();
    items.push(if partial_before.is_empty() {
        CheckItem::ok(
            COMPONENT,
            "replica_identity",
            "every captured table sends full before-images",
        )
    } else {
        CheckItem::warn(
            COMPONENT,
            "replica_identity",
            format!(
                "`before` of updates and deletes carries only the key columns: {}",
                names(&partial_before)
            ),
            partial_before
                .iter()
                .map(|t| format!("ALTER TABLE {} REPLICA IDENTITY FULL;", t.quoted()))
                .collect::<Vec<_>>()
                .join(" "),
        )
    });
    items
}

fn publication_items(
    state: &ServerState,
    config: &PostgresSourceConfig,
    role: &str,
) -> Vec<CheckItem> {
    let name = &config.publication;
    let can_create = state.role.as_ref().is_some_and(|r| {
        r.superuser || (r.create_on_database && state.tables.iter().all(|t| t.owned))
    });
    let Some(publication) = &state.publication else {
        let sql = crate::provision::create_publication_sql(name, &state.tables);
        return vec![if can_create {
            CheckItem::warn(
                COMPONENT,
                "publication",
                format!("publication {name} does not exist; tributary run creates it"),
                sql,
            )
        } else {
            CheckItem::fail(
                COMPONENT,
                "publication",
                format!(
                    "publication {name} does not exist and {role} may not create it (it must own \
                     the tables)"
                ),
                sql,
            )
        }];
    };
    let mut items = Vec::new();
    let missing: Vec<&TableState> = state
        .tables
        .iter()
        .filter(|t| !publication.covers(t))
        .collect();
    let may_add = state.role.as_ref().is_some_and(|r| r.superuser)
        || (publication.owned && missing.iter().all(|t| t.owned));
    items.push(if missing.is_empty() {
        CheckItem::ok(
            COMPONENT,
            "publication",
            format!("publication {name} covers every captured table"),
        )
    } else {
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {};",
            quote_ident(name),
            quoted(&missing)
        );
        if may_add {
            CheckItem::warn(
                COMPONENT,
                "publication",
                format!(
                    "publication {name} does not publish {}; tributary run adds them (and \
                     copies their rows when the slot already exists)",
                    names(&missing)
                ),
                sql,
            )
        } else {
            CheckItem::fail(
                COMPONENT,
                "publication",
                format!(
                    "publication {name} does not publish {}: their changes would be lost",
                    names(&missing)
                ),
                sql,
            )
        }
    });
    let partitioned: Vec<&TableState> = state.tables.iter().filter(|t| t.partitioned).collect();
    if !partitioned.is_empty() && !publication.via_root {
        let sql = format!(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = true);",
            quote_ident(name)
        );
        items.push(if publication.owned {
            CheckItem::warn(
                COMPONENT,
                "publish_via_partition_root",
                format!(
                    "publication {name} publishes partitions under their own names; tributary run \
                     turns publish_via_partition_root on"
                ),
                sql,
            )
        } else {
            CheckItem::fail(
                COMPONENT,
                "publish_via_partition_root",
                format!(
                    "publication {name} publishes the partitions of {} under their own names: \
                     their changes would be lost",
                    names(&partitioned)
                ),
                sql,
            )
        });
    }
    items
}

fn slot_items(state: &ServerState, config: &PostgresSourceConfig) -> Vec<CheckItem> {
    let name = &config.slot;
    let Some(slot) = &state.slot else {
        return vec![CheckItem::ok(
            COMPONENT,
            "slot",
            format!("slot {name} does not exist yet; tributary run creates it"),
        )];
    };
    let drop = format!(
        "SELECT pg_drop_replication_slot({}); -- or choose another source.postgres.slot",
        quote_literal(name)
    );
    if slot.plugin.as_deref() != Some("pgoutput")
        || slot.database.as_deref() != Some(state.database.as_str())
    {
        return vec![CheckItem::fail(
            COMPONENT,
            "slot",
            format!(
                "slot {name} is not a pgoutput slot of database {} (plugin {}, database {})",
                state.database,
                slot.plugin.as_deref().unwrap_or("none"),
                slot.database.as_deref().unwrap_or("none")
            ),
            drop,
        )];
    }
    let mut items = Vec::new();
    let wal_status = slot.wal_status.as_deref().unwrap_or("unknown");
    items.push(match wal_status {
        "lost" => CheckItem::fail(
            COMPONENT,
            "slot",
            format!(
                "slot {name} is lost: the server removed WAL it still needed \
                 (max_slot_wal_keep_size); changes after its position are gone"
            ),
            format!("{drop}; then start again with source.snapshot = \"initial\""),
        ),
        "unreserved" => CheckItem::warn(
            COMPONENT,
            "slot",
            format!(
                "slot {name} is unreserved: its WAL is past max_slot_wal_keep_size and is removed \
                 at the next checkpoint unless the connector catches up"
            ),
            "start the connector now, or raise max_slot_wal_keep_size",
        ),
        status => CheckItem::ok(
            COMPONENT,
            "slot",
            format!("slot {name} exists (wal_status {status})"),
        ),
    });
    if let Some(lag) = slot.lag_bytes {
        items.push(if lag > LAG_WARN_BYTES {
            CheckItem::warn(
                COMPONENT,
                "slot_lag",
                format!("slot {name} keeps {lag} bytes of WAL not yet confirmed"),
                "start the connector (or see why it is behind: tributary slots list)",
            )
        } else {
            CheckItem::ok(
                COMPONENT,
                "slot_lag",
                format!("slot {name} lags {lag} bytes behind the server"),
            )
        });
    }
    if let Some(pid) = slot.active_pid {
        items.push(CheckItem::warn(
            COMPONENT,
            "slot_active",
            format!(
                "slot {name} is in use by process {pid}: another connector streams from it, and \
                 a second one fails until it stops"
            ),
            format!("stop the other connector, or SELECT pg_terminate_backend({pid});"),
        ));
    }
    items
}

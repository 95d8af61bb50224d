//! `tributary slots` for the Postgres source: every logical slot with its
//! lag, and dropping one that no connector streams from.
//!
//! Beside the dataflow: a DBA's view of what keeps WAL on the primary.

use tokio_postgres::Client;

use crate::error::PostgresError;
use crate::inspect::{SlotState, list_slots};

/// Why a slot was not dropped.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// No slot of that name.
    #[error("there is no replication slot {0} (tributary slots list shows them)")]
    Missing(String),
    /// A walsender streams from it.
    #[error(
        "replication slot {slot} is active (process {pid} streams from it): stop that connector \
         first, or end the session with SELECT pg_terminate_backend({pid});"
    )]
    Active {
        /// The slot.
        slot: String,
        /// The walsender's pid.
        pid: i32,
    },
    /// The server refused.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
}

/// Every logical slot (see [`list_slots`]).
pub async fn list(client: &Client) -> Result<Vec<SlotState>, PostgresError> {
    list_slots(client).await
}

/// Drops `name` unless a connector streams from it.
pub async fn drop_slot(client: &Client, name: &str) -> Result<(), DropError> {
    let slots = list_slots(client).await?;
    let slot = slots
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| DropError::Missing(name.to_owned()))?;
    if let Some(pid) = slot.active_pid {
        return Err(DropError::Active {
            slot: name.to_owned(),
            pid,
        });
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&name])
        .await
        .map_err(PostgresError::query(format!(
            "dropping replication slot {name} (the user needs the REPLICATION attribute)"
        )))?;
    Ok(())
}

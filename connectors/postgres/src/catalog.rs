//! Catalog lookups on an ordinary connection: primary keys and the kinds of
//! types a Relation message names only by OID.

use std::collections::HashMap;

use tokio_postgres::Client;
use tracing::warn;

use crate::decoder::RelationFacts;
use crate::error::PostgresError;
use crate::pgoutput::Relation;
use crate::types::{ValueKind, builtin_kind};

/// Caches type kinds across relations.
#[derive(Debug, Default)]
pub struct Catalog {
    kinds: HashMap<u32, ValueKind>,
}

/// Says when a table's events are keyed by its replica-identity index
/// instead of its primary key (see [`crate::decoder::table_key`]).
fn warn_on_index_identity(rel: &Relation, primary_key: Option<&[String]>) {
    let Some(primary_key) = primary_key else {
        return;
    };
    let identity: Vec<&str> = rel
        .columns
        .iter()
        .filter(|c| c.is_identity)
        .map(|c| c.name.as_str())
        .collect();
    if rel.replica_identity == b'i' && !primary_key.iter().all(|c| identity.contains(&c.as_str())) {
        warn!(
            table = %format!("{}.{}", rel.schema, rel.table),
            primary_key = %primary_key.join(","),
            replica_identity = %identity.join(","),
            "REPLICA IDENTITY USING INDEX does not cover the primary key, so a delete cannot tell \
             it: every event of this table is keyed (envelope key and partition key) by the \
             replica identity columns instead; ALTER TABLE ... REPLICA IDENTITY DEFAULT keys \
             them by the primary key"
        );
    }
}

impl Catalog {
    /// The facts about a relation the decoder needs.
    pub async fn describe(
        &mut self,
        client: &Client,
        rel: &Relation,
    ) -> Result<RelationFacts, PostgresError> {
        let mut kinds = Vec::with_capacity(rel.columns.len());
        for column in &rel.columns {
            let kind = self.kind(client, column.type_oid).await?;
            if kind.is_none() {
                warn!(
                    table = %format!("{}.{}", rel.schema, rel.table),
                    column = %column.name,
                    type_oid = column.type_oid,
                    "unknown column type, passing its values as text"
                );
            }
            kinds.push(kind.unwrap_or(ValueKind::Text));
        }
        let rows = client
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                 WHERE i.indrelid = $1 AND i.indisprimary ORDER BY k.ord",
                &[&rel.id],
            )
            .await
            .map_err(PostgresError::query(format!(
                "looking up the primary key of {}.{}",
                rel.schema, rel.table
            )))?;
        let primary_key: Option<Vec<String>> =
            (!rows.is_empty()).then(|| rows.iter().map(|r| r.get::<_, String>(0)).collect());
        warn_on_index_identity(rel, primary_key.as_deref());
        Ok(RelationFacts { kinds, primary_key })
    }

    /// The kind of a type: built in, enum (text), domain (its base type),
    /// array (of its element's kind). `None` for other types (passed as text).
    async fn kind(
        &mut self,
        client: &Client,
        oid: u32,
    ) -> Result<Option<ValueKind>, PostgresError> {
        let mut chain = Vec::new();
        let mut current = oid;
        // Resolve domains and arrays iteratively (bounded: catalogs have no cycles).
        let leaf = loop {
            if let Some(kind) = builtin_kind(current).or_else(|| self.kinds.get(&current).cloned())
            {
                break Some(kind);
            }
            if chain.len() > 16 {
                break None;
            }
            let row = client
                .query_opt(
                    "SELECT typtype::text, typelem, typbasetype, typcategory::text FROM pg_type WHERE oid = $1",
                    &[&current],
                )
                .await
                .map_err(PostgresError::query(format!("looking up type {current}")))?;
            let Some(row) = row else { break None };
            let typtype: String = row.get(0);
            let elem: u32 = row.get(1);
            let base: u32 = row.get(2);
            let category: String = row.get(3);
            match (typtype.as_str(), category.as_str()) {
                ("e", _) => break Some(ValueKind::Text),
                ("d", _) => {
                    chain.push((current, false));
                    current = base;
                }
                (_, "A") if elem != 0 => {
                    chain.push((current, true));
                    current = elem;
                }
                _ => break None,
            }
        };
        let mut kind = leaf.clone();
        if leaf.is_some() {
            for &(type_oid, is_array) in chain.iter().rev() {
                let inner = kind.take().expect("set above");
                let wrapped = if is_array {
                    ValueKind::Array(Box::new(inner))
                } else {
                    inner
                };
                self.kinds.insert(type_oid, wrapped.clone());
                kind = Some(wrapped);
            }
        }
        Ok(kind)
    }
}

//! `tributary schema --table T`: the JSON Schema of one table's `after`
//! object, from the catalogue, as the decoder renders each column.
//!
//! For consumers (not on the dataflow): each column's JSON type follows the
//! type mapping of `docs/envelope.md` (the same [`ValueKind`] the decoder
//! renders with), `null` is allowed unless the column is `NOT NULL`, and no
//! column is required (an update leaves unchanged TOAST columns out).

use serde_json::{Map, Value, json};
use tokio_postgres::Client;

use crate::catalog::Catalog;
use crate::error::PostgresError;
use crate::snapshot;
use crate::types::ValueKind;

/// The JSON Schema of `schema.table`'s `after` object.
pub async fn after_schema(
    client: &Client,
    schema: &str,
    table: &str,
) -> Result<Value, PostgresError> {
    let rel = snapshot::relation(client, schema, table).await?;
    let facts = Catalog::default().describe(client, &rel).await?;
    let rows = client
        .query(
            &format!(
                "SELECT format_type(a.atttypid, a.atttypmod), a.attnotnull FROM pg_attribute a \
                 WHERE a.attrelid = $1 AND {} ORDER BY a.attnum",
                snapshot::STREAMED_COLUMNS
            ),
            &[&rel.id],
        )
        .await
        .map_err(PostgresError::query(format!(
            "reading the columns of {schema}.{table}"
        )))?;
    let mut properties = Map::new();
    for ((column, kind), row) in rel.columns.iter().zip(&facts.kinds).zip(&rows) {
        let type_name: String = row.get(0);
        let not_null: bool = row.get(1);
        let mut property = value_schema(kind, &type_name);
        if !not_null {
            property = json!({"anyOf": [property, {"type": "null"}]});
        }
        if let Value::Object(object) = &mut property {
            object.insert(
                "description".into(),
                json!(format!("PostgreSQL {type_name}")),
            );
        }
        properties.insert(column.name.clone(), property);
    }
    Ok(json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": format!("{schema}.{table}: the envelope's after"),
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "x-primary-key": facts.primary_key,
    }))
}

/// One value's schema, by the kind the decoder renders it as.
fn value_schema(kind: &ValueKind, type_name: &str) -> Value {
    let special = json!({"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]});
    match kind {
        ValueKind::Integer => json!({"type": "integer"}),
        ValueKind::Float => json!({"anyOf": [{"type": "number"}, special]}),
        ValueKind::Numeric | ValueKind::Money => json!({"type": "string"}),
        ValueKind::Bool => json!({"type": "boolean"}),
        ValueKind::Bytea => json!({"type": "string", "contentEncoding": "base64"}),
        ValueKind::Json => json!({}),
        ValueKind::Timestamp | ValueKind::TimestampTz => json!({"type": "string"}),
        ValueKind::Text => json!({"type": "string"}),
        ValueKind::Array(inner) => json!({
            "type": "array",
            "items": {"anyOf": [value_schema(inner, type_name.trim_end_matches("[]")), {"type": "null"}, {"type": "array"}]},
        }),
    }
}

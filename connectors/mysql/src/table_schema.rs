//! `tributary schema --table T` for a MySQL/MariaDB source: the JSON
//! Schema of one table's `after` object, from `information_schema`, as the
//! decoder renders each column (the type table of `docs/envelope.md`).
//!
//! For consumers (not on the dataflow): `null` is allowed unless the column
//! is `NOT NULL`; no column is required (a row written before an `ADD
//! COLUMN` lacks it); columns of a type without a fixed JSON shape accept
//! any value.

use mysql_async::Conn;
use mysql_async::prelude::Queryable as _;
use serde_json::{Map, Value, json};

use crate::error::MysqlError;

/// The JSON Schema of `db.table`'s `after` object, or `None` when the table
/// does not exist.
pub async fn after_schema(
    conn: &mut Conn,
    db: &str,
    table: &str,
) -> Result<Option<Value>, MysqlError> {
    let context = format!("reading the columns of {db}.{table}");
    let columns: Vec<(String, String, String, String, String)> = conn
        .exec(
            "SELECT COLUMN_NAME, LOWER(DATA_TYPE), COLUMN_TYPE, IS_NULLABLE, COLUMN_KEY \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? \
             ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(MysqlError::connection(context.clone()))?;
    if columns.is_empty() {
        return Ok(None);
    }
    let json_columns = crate::schema::json_text_columns(conn, db, table).await;
    let mut properties = Map::new();
    let mut primary_key = Vec::new();
    for (name, data_type, column_type, nullable, key) in &columns {
        let mut property = if json_columns.contains(name) {
            json!({})
        } else {
            value_schema(data_type)
        };
        if nullable == "YES" {
            property = json!({"anyOf": [property, {"type": "null"}]});
        }
        if let Value::Object(object) = &mut property {
            object.insert("description".into(), json!(format!("MySQL {column_type}")));
        }
        properties.insert(name.clone(), property);
        if key == "PRI" {
            primary_key.push(name.clone());
        }
    }
    Ok(Some(json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": format!("{db}.{table}: the envelope's after"),
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "x-primary-key": primary_key,
    })))
}

/// One value's schema, by the column's `DATA_TYPE`.
fn value_schema(data_type: &str) -> Value {
    match data_type {
        "tinyint" | "smallint" | "mediumint" | "int" | "integer" | "bigint" | "bit" | "year" => {
            json!({"type": "integer"})
        }
        "float" | "double" | "real" => json!({"type": "number"}),
        "decimal" | "numeric" => json!({"type": "string"}),
        "date" | "datetime" | "timestamp" | "time" => json!({"type": "string"}),
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" => {
            json!({"type": "string"})
        }
        "binary" | "varbinary" | "tinyblob" | "blob" | "mediumblob" | "longblob" => {
            json!({"type": "string", "contentEncoding": "base64"})
        }
        "set" => json!({"type": "array", "items": {"type": "string"}}),
        "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
        | "multipolygon" | "geometrycollection" => json!({"type": "string"}),
        // JSON, and anything newer than this table: any value.
        _ => json!({}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_map_as_the_decoder_renders_them() {
        assert_eq!(value_schema("bigint"), json!({"type": "integer"}));
        assert_eq!(value_schema("decimal"), json!({"type": "string"}));
        assert_eq!(value_schema("set")["type"], "array");
        assert_eq!(value_schema("varbinary")["contentEncoding"], "base64");
        assert_eq!(value_schema("json"), json!({}));
    }
}

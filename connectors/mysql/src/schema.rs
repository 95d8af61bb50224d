//! What a table looks like at the moment a rows event was written.
//!
//! Part of the decoder stage. The TABLE_MAP event that precedes every rows
//! event is the truth about the row's shape: its column types, and with
//! `binlog_row_metadata = FULL` the column names, the primary key and the
//! ENUM/SET labels. A schema change mid-stream (ADD/DROP/MODIFY COLUMN,
//! RENAME) therefore never mislabels a value: each event is read with the
//! map written with it. What the map does not carry (names with
//! `binlog_row_metadata = MINIMAL`; which LONGTEXT columns are MariaDB JSON)
//! comes from `information_schema` ([`Catalog`]), read when a table is first
//! seen and again after any DDL; that fallback is warned about, because a
//! concurrent DDL can make it disagree with the event.

use std::collections::HashMap;

use mysql_async::binlog::events::{OptionalMetaExtractor, OptionalMetadataField, TableMapEvent};
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable as _;
use tracing::warn;

use crate::error::MysqlError;
use crate::types::ColumnKind;

/// One column of a table map.
#[derive(Clone, Debug)]
pub struct Column {
    /// The column's name.
    pub name: String,
    /// How its values are rendered.
    pub kind: ColumnKind,
}

/// How one column's values are laid out in a rows event: what the
/// binlog value decoder needs, read once per TABLE_MAP instead of once per
/// row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireColumn {
    /// The real type (ENUM/SET resolved from STRING's metadata).
    pub column_type: ColumnType,
    /// The type's metadata bytes from the TABLE_MAP.
    pub meta: Box<[u8]>,
    /// UNSIGNED (from the signedness metadata).
    pub unsigned: bool,
    /// Character set of a character, ENUM or SET column (0: unknown or
    /// not a character column).
    pub charset: u16,
}

/// A table's shape from one TABLE_MAP event.
#[derive(Clone, Debug)]
pub struct TableSchema {
    /// The database.
    pub db: String,
    /// The table.
    pub table: String,
    /// Columns in table order.
    pub columns: Vec<Column>,
    /// Indexes of the primary key columns, in key order (empty: no key).
    pub key: Vec<usize>,
    /// True when names and key came from the event (FULL metadata).
    pub names_from_event: bool,
    /// The rows event layout, one per column (empty for a shape read
    /// from the catalog).
    pub wire: Vec<WireColumn>,
}

/// What a TABLE_MAP event could not be read as.
#[derive(Debug, thiserror::Error)]
#[error("table map of {table}: {message}")]
pub struct SchemaError {
    table: String,
    message: String,
}

impl TableSchema {
    /// Reads the shape of the table `tme` maps.
    pub fn from_event(tme: &TableMapEvent<'_>) -> Result<Self, SchemaError> {
        let db = tme.database_name().into_owned();
        let table = tme.table_name().into_owned();
        let err = |message: String| SchemaError {
            table: format!("{db}.{table}"),
            message,
        };
        let count = usize::try_from(tme.columns_count()).map_err(|e| err(e.to_string()))?;
        let mut columns = Vec::with_capacity(count);
        for i in 0..count {
            let column_type = tme
                .get_column_type(i)
                .map_err(|e| err(e.to_string()))?
                .ok_or_else(|| err(format!("column {i} has no type")))?;
            let meta = tme.get_column_metadata(i).unwrap_or(&[]);
            let precision = match column_type {
                ColumnType::MYSQL_TYPE_TIMESTAMP2
                | ColumnType::MYSQL_TYPE_DATETIME2
                | ColumnType::MYSQL_TYPE_TIME2 => meta.first().copied().unwrap_or(0),
                _ => 0,
            };
            columns.push(Column {
                name: format!("@{i}"),
                kind: ColumnKind {
                    column_type,
                    precision,
                    labels: Vec::new(),
                    unsigned: false,
                    json_text: false,
                },
            });
        }
        let mut key = Vec::new();
        let mut names_from_event = false;
        let (mut enums, mut sets) = (Vec::new(), Vec::new());
        for field in tme.iter_optional_meta() {
            match field.map_err(|e| err(e.to_string()))? {
                OptionalMetadataField::Signedness(bits) => {
                    // One bit per numeric column, in column order.
                    let mut bits = bits.iter().map(|b| *b);
                    for column in columns
                        .iter_mut()
                        .filter(|c| c.kind.column_type.is_numeric_type())
                    {
                        column.kind.unsigned = bits.next().unwrap_or(false);
                    }
                }
                OptionalMetadataField::ColumnName(names) => {
                    for (column, name) in columns.iter_mut().zip(names.iter_names()) {
                        column.name = name.map_err(|e| err(e.to_string()))?.name().into_owned();
                    }
                    names_from_event = true;
                }
                OptionalMetadataField::SimplePrimaryKey(pk) => {
                    for index in pk.iter_indexes() {
                        key.push(index_of(index.map_err(|e| err(e.to_string()))?, count)?);
                    }
                }
                OptionalMetadataField::PrimaryKeyWithPrefix(pk) => {
                    for entry in pk.iter_keys() {
                        let entry = entry.map_err(|e| err(e.to_string()))?;
                        key.push(index_of(entry.column_index(), count)?);
                    }
                }
                OptionalMetadataField::EnumStrValue(values) => {
                    for labels in values.iter_values() {
                        let labels = labels.map_err(|e| err(e.to_string()))?;
                        enums.push(
                            labels
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect(),
                        );
                    }
                }
                OptionalMetadataField::SetStrValue(values) => {
                    for labels in values.iter_values() {
                        let labels = labels.map_err(|e| err(e.to_string()))?;
                        sets.push(
                            labels
                                .values()
                                .iter()
                                .map(|v| v.value().into_owned())
                                .collect(),
                        );
                    }
                }
                _ => {}
            }
        }
        let mut enums = enums.into_iter();
        let mut sets = sets.into_iter();
        for column in &mut columns {
            match column.kind.column_type {
                ColumnType::MYSQL_TYPE_ENUM => {
                    column.kind.labels = enums.next().unwrap_or_default()
                }
                ColumnType::MYSQL_TYPE_SET => column.kind.labels = sets.next().unwrap_or_default(),
                _ => {}
            }
        }
        let wire = wire_columns(tme, &columns).map_err(|e| err(e.to_string()))?;
        return Ok(Self {
            db,
            table,
            columns,
            key,
            names_from_event,
            wire,
        });

        fn index_of(index: u64, count: usize) -> Result<usize, SchemaError> {
            usize::try_from(index)
                .ok()
                .filter(|i| *i < count)
                .ok_or_else(|| SchemaError {
                    table: String::new(),
                    message: format!("primary key column {index} out of range"),
                })
        }
    }

    /// Applies what the catalog knows: JSON columns always; names, key and
    /// labels only where the event did not carry them.
    pub fn complete(&mut self, facts: &TableFacts) {
        for column in &mut self.columns {
            if facts.json_columns.contains(&column.name) {
                column.kind.json_text = true;
            }
        }
        if self.names_from_event || facts.columns.len() != self.columns.len() {
            return;
        }
        for (column, fact) in self.columns.iter_mut().zip(&facts.columns) {
            column.name = fact.name.clone();
            column.kind.json_text = facts.json_columns.contains(&fact.name);
            if column.kind.labels.is_empty() {
                column.kind.labels = fact.labels.clone();
            }
        }
        if self.key.is_empty() {
            self.key = facts.key.clone();
        }
    }
}

/// One column as `information_schema` describes it.
#[derive(Clone, Debug, Default)]
pub struct ColumnFact {
    /// The name.
    pub name: String,
    /// ENUM/SET labels parsed from `COLUMN_TYPE`.
    pub labels: Vec<String>,
    /// `DATA_TYPE` (`int`, `datetime`, `enum`, ...).
    pub data_type: String,
    /// `DATETIME_PRECISION` (0 where none).
    pub precision: u8,
    /// `COLUMN_TYPE` says `unsigned`.
    pub unsigned: bool,
}

/// What `information_schema` says about a table.
#[derive(Clone, Debug, Default)]
pub struct TableFacts {
    /// Columns in ordinal order.
    pub columns: Vec<ColumnFact>,
    /// Primary key column indexes in key order.
    pub key: Vec<usize>,
    /// Columns constrained by `json_valid(...)` (MariaDB's JSON type).
    pub json_columns: Vec<String>,
}

/// Table facts read from `information_schema`, cached per table until the
/// next DDL.
#[derive(Debug, Default)]
pub struct Catalog {
    tables: HashMap<(String, String), TableFacts>,
}

impl Catalog {
    /// Forgets everything (a DDL statement went by).
    pub fn invalidate(&mut self) {
        self.tables.clear();
    }

    /// The facts of `db.table`, read on first use.
    pub async fn facts(
        &mut self,
        conn: &mut mysql_async::Conn,
        schema: &TableSchema,
    ) -> Result<&TableFacts, MysqlError> {
        let id = (schema.db.clone(), schema.table.clone());
        if !self.tables.contains_key(&id) {
            let facts = read_facts(conn, &schema.db, &schema.table).await?;
            if !schema.names_from_event {
                warn!(
                    table = %format!("{}.{}", schema.db, schema.table),
                    "the binlog carries no column names (binlog_row_metadata is not FULL): \
                     names come from information_schema, and a concurrent DDL can mislabel \
                     columns; set binlog_row_metadata = FULL"
                );
            }
            self.tables.insert(id.clone(), facts);
        }
        Ok(&self.tables[&id])
    }
}

async fn read_facts(
    conn: &mut mysql_async::Conn,
    db: &str,
    table: &str,
) -> Result<TableFacts, MysqlError> {
    let rows: Vec<(String, String, String, Option<u64>)> = conn
        .exec(
            "SELECT COLUMN_NAME, COLUMN_TYPE, DATA_TYPE, DATETIME_PRECISION \
             FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(MysqlError::connection("reading information_schema.COLUMNS"))?;
    let key_rows: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? AND CONSTRAINT_NAME = 'PRIMARY' \
             ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        .await
        .map_err(MysqlError::connection("reading the primary key"))?;
    let json_columns = json_text_columns(conn, db, table).await;
    let columns: Vec<ColumnFact> = rows
        .iter()
        .map(|(name, column_type, data_type, precision)| ColumnFact {
            name: name.clone(),
            labels: labels_of(column_type),
            data_type: data_type.to_ascii_lowercase(),
            precision: precision.map_or(0, |p| u8::try_from(p.min(6)).unwrap_or(0)),
            unsigned: column_type.contains("unsigned"),
        })
        .collect();
    let key = key_rows
        .iter()
        .filter_map(|k| columns.iter().position(|c| &c.name == k))
        .collect();
    Ok(TableFacts {
        columns,
        key,
        json_columns,
    })
}

impl TableSchema {
    /// The shape a TABLE_MAP of `db.table` would carry, from the catalog
    /// alone (the snapshot reads tables no binlog event has mapped).
    pub fn from_facts(db: &str, table: &str, facts: &TableFacts) -> Self {
        let columns = facts
            .columns
            .iter()
            .map(|fact| Column {
                name: fact.name.clone(),
                kind: ColumnKind {
                    column_type: binlog_type(&fact.data_type),
                    precision: fact.precision,
                    labels: fact.labels.clone(),
                    unsigned: fact.unsigned,
                    json_text: facts.json_columns.contains(&fact.name),
                },
            })
            .collect();
        Self {
            db: db.to_owned(),
            table: table.to_owned(),
            columns,
            key: facts.key.clone(),
            names_from_event: true,
            wire: Vec::new(),
        }
    }
}

/// Each column's rows event layout, with the character sets assigned as
/// the binlog row reader of `mysql_common` assigns them (one entry of the
/// charset metadata per character column, one of the ENUM/SET charset
/// metadata per ENUM or SET column, in column order).
fn wire_columns(tme: &TableMapEvent<'_>, columns: &[Column]) -> std::io::Result<Vec<WireColumn>> {
    let extractor = OptionalMetaExtractor::new(tme.iter_optional_meta())?;
    let mut charsets = extractor.iter_charset();
    let mut enum_charsets = extractor.iter_enum_and_set_charset();
    let mut wire = Vec::with_capacity(columns.len());
    for (i, column) in columns.iter().enumerate() {
        let column_type = column.kind.column_type;
        let charset = if column_type.is_character_type() {
            charsets.next().transpose()?.unwrap_or_default()
        } else if column_type.is_enum_or_set_type() {
            enum_charsets.next().transpose()?.unwrap_or_default()
        } else {
            0
        };
        wire.push(WireColumn {
            column_type,
            meta: tme.get_column_metadata(i).unwrap_or(&[]).into(),
            unsigned: column.kind.unsigned,
            charset,
        });
    }
    Ok(wire)
}

/// Reads what the catalog says about `db.table` (uncached).
pub async fn read_table_facts(
    conn: &mut mysql_async::Conn,
    db: &str,
    table: &str,
) -> Result<TableFacts, MysqlError> {
    read_facts(conn, db, table).await
}

/// The binlog column type of an `information_schema` `DATA_TYPE`.
fn binlog_type(data_type: &str) -> ColumnType {
    use ColumnType::*;
    match data_type {
        "tinyint" | "bool" | "boolean" => MYSQL_TYPE_TINY,
        "smallint" => MYSQL_TYPE_SHORT,
        "mediumint" => MYSQL_TYPE_INT24,
        "int" | "integer" => MYSQL_TYPE_LONG,
        "bigint" => MYSQL_TYPE_LONGLONG,
        "float" => MYSQL_TYPE_FLOAT,
        "double" | "real" => MYSQL_TYPE_DOUBLE,
        "decimal" | "numeric" => MYSQL_TYPE_NEWDECIMAL,
        "bit" => MYSQL_TYPE_BIT,
        "year" => MYSQL_TYPE_YEAR,
        "date" => MYSQL_TYPE_DATE,
        "datetime" => MYSQL_TYPE_DATETIME2,
        "timestamp" => MYSQL_TYPE_TIMESTAMP2,
        "time" => MYSQL_TYPE_TIME2,
        "enum" => MYSQL_TYPE_ENUM,
        "set" => MYSQL_TYPE_SET,
        "json" => MYSQL_TYPE_JSON,
        "char" | "binary" => MYSQL_TYPE_STRING,
        "tinytext" | "text" | "mediumtext" | "longtext" | "tinyblob" | "blob" | "mediumblob"
        | "longblob" => MYSQL_TYPE_BLOB,
        "geometry" | "point" | "linestring" | "polygon" | "multipoint" | "multilinestring"
        | "multipolygon" | "geometrycollection" => MYSQL_TYPE_GEOMETRY,
        _ => MYSQL_TYPE_VARCHAR,
    }
}

/// The columns MariaDB keeps as LONGTEXT with a `json_valid` check (its
/// JSON type); MySQL 8's JSON arrives as its own binlog type and needs no
/// lookup. Empty when the server has no check constraints to list.
pub async fn json_text_columns(conn: &mut mysql_async::Conn, db: &str, table: &str) -> Vec<String> {
    let checks: Vec<String> = conn
        .exec(
            "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS \
             WHERE CONSTRAINT_SCHEMA = ? AND TABLE_NAME = ?",
            (db, table),
        )
        .await
        .unwrap_or_default();
    checks.iter().filter_map(|c| json_valid_column(c)).collect()
}

/// `json_valid(`doc`)` → `doc`.
fn json_valid_column(clause: &str) -> Option<String> {
    let inner = clause
        .trim()
        .strip_prefix("json_valid(")?
        .strip_suffix(')')?;
    let name = inner.trim().strip_prefix('`')?.strip_suffix('`')?;
    Some(name.replace("``", "`"))
}

/// `enum('a','b''c')` → `["a", "b'c"]`; anything else → empty.
fn labels_of(column_type: &str) -> Vec<String> {
    let Some(list) = column_type
        .strip_prefix("enum(")
        .or_else(|| column_type.strip_prefix("set("))
        .and_then(|rest| rest.strip_suffix(')'))
    else {
        return Vec::new();
    };
    let mut labels = Vec::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\'' {
            continue;
        }
        let mut label = String::new();
        while let Some(c) = chars.next() {
            if c == '\'' {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                    label.push('\'');
                } else {
                    break;
                }
            } else {
                label.push(c);
            }
        }
        labels.push(label);
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_text_parsers() {
        assert_eq!(labels_of("enum('a','b''c')"), ["a", "b'c"]);
        assert_eq!(labels_of("set('x','y,z')"), ["x", "y,z"]);
        assert!(labels_of("int(11)").is_empty());
        assert_eq!(
            json_valid_column("json_valid(`doc`)").as_deref(),
            Some("doc")
        );
        assert_eq!(json_valid_column("`a` > 0"), None);
    }
}

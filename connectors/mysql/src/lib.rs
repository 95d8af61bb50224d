//! Tributary's MySQL/MariaDB source.
//!
//! First stage of the dataflow: it reads the server's row binlog as a
//! replica, decodes each committed row change into an envelope record,
//! hands records to the sink in commit order, and writes the offset store
//! only at transaction ends the sink has fully delivered.
//!
//! Files (the same roles as in `connectors/postgres`): `config` (settings,
//! URL parsing), `tls` (connections, over TLS as the URL says), `setup` (binlog settings check, start position, purged
//! binlog check), `snapshot` (the initial snapshot: consistent view, its
//! binlog position, the marker), `replication` (the snapshot copy, the
//! streaming loop and offsets), `source`
//! (the envelope's `Source` contract), `offsets` (positions, watermark, the
//! offset file), `gtid` (the GTID state kept with the offset and sent to
//! resume by GTID), `schema` (TABLE_MAP metadata and the `information_schema`
//! fallback, the counterpart of Postgres' `catalog`), `decoder` (rows
//! events to envelopes), `types` (binlog values to JSON), `error`; beside the dataflow, `check`
//! (`tributary check` items), `provision` (`tributary setup` statements).
//!
//! Tested against MariaDB 10.11. MySQL 8's protocol differences (GTID events
//! with UUIDs, binary JSON, `SHOW BINARY LOG STATUS`) have code paths here
//! that no test on our machines exercises.

pub mod check;
pub mod config;
pub mod decoder;
pub mod error;
pub mod gtid;
pub mod offsets;
pub mod provision;
pub mod replication;
pub mod schema;
pub mod setup;
pub mod snapshot;
mod source;
pub mod table_schema;
pub mod tls;
pub mod types;

pub use config::MysqlSourceConfig;
pub use error::MysqlError;
pub use replication::MysqlSource;

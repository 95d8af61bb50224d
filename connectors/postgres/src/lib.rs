//! Tributary's PostgreSQL source.
//!
//! First stage of the dataflow: it tails a logical replication slot with the
//! `pgoutput` plugin, decodes each committed row change into an envelope
//! record, hands records to the sink in commit order, and moves the slot's
//! confirmed position only to transaction ends the sink has fully delivered.
//!
//! Files: `config` (settings, URL parsing), `setup` (publication, slot,
//! `wal_level` check), `replication` (the streaming loop and
//! acknowledgements), `snapshot` (the initial copy: slot with an exported
//! snapshot, key ranges, chunks), `snapshot_readers` (its parallel reader
//! connections), `source` (the envelope's `Source` contract), `wire` (the replication connection: startup,
//! authentication, CopyBoth framing, status updates), `tls` (the rustls client of both connections), `lsn`, `pgoutput` (message parser), `decoder` (relation cache,
//! rows to envelopes), `types` (text values to JSON), `catalog` (primary keys
//! and non-built-in types), `error`; beside the dataflow, for the DBA commands:
//! `inspect` (server, role, tables, publication and slots as they are),
//! `check` (`tributary check` items), `provision` (`tributary setup` SQL),
//! `slots` (`tributary slots`); `metrics` (event, byte and lag metric names).
//!
//! The decoders of server bytes (`pgoutput`, the framing in `wire`, `types`)
//! have bounded property tests in `tests/decoders/` and `cargo fuzz`
//! targets in the repository's `fuzz/`.

pub mod catalog;
pub mod check;
pub mod config;
pub mod decoder;
pub mod error;
pub mod inspect;
pub mod lsn;
pub mod metrics;
pub mod pgoutput;
pub mod provision;
pub mod replication;
pub mod setup;
pub mod slots;
pub mod snapshot;
pub mod snapshot_readers;
mod sockopt;
mod source;
pub mod table_schema;
pub mod tls;
pub mod types;
pub mod wire;

pub use config::PostgresSourceConfig;
pub use error::PostgresError;
pub use replication::{PostgresSource, Stopped};

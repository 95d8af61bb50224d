//! The canonical change envelope and the contracts between Tributary's parts.
//!
//! Sources (Postgres, MySQL) decode their replication log into rows and use
//! [`encoder::EnvelopeEncoder`] to write each row straight into the JSON bytes
//! of one envelope v1 (no intermediate `serde_json::Value`: this is the hot
//! path). The bytes travel as a [`record::Record`] to a [`sink::Sink`]; the
//! sink reports every record as done through [`ack::Acks`], and the
//! [`ack::AckTracker`] turns those reports into the highest source position
//! that may be acknowledged to the source. [`source::Source`] is the contract
//! every source keeps (and [`source::OffsetStore`] the one for sources whose
//! database does not keep their position). This crate does no network I/O;
//! the one file it writes is a source's set of captured tables
//! ([`captured`]).

pub mod ack;
pub mod captured;
pub mod check;
pub mod encoder;
pub mod error_text;
pub mod filter;
pub mod format;
pub mod json;
pub mod position;
pub mod record;
pub mod route;
pub mod setup_plan;
pub mod sink;
pub mod snapshot_progress;
pub mod source;
pub mod state_file;
pub mod time;
pub mod tls;
pub mod transaction;

pub use ack::{AckTracker, Acks, Budget};
pub use captured::CapturedTables;
pub use check::{CheckItem, CheckStatus};
pub use encoder::{EnvelopeEncoder, Op, TableMeta, TxMeta};
pub use filter::TableFilter;
pub use format::Format;
pub use position::Position;
pub use record::{PartitionKey, Record};
pub use route::{StreamRouter, TemplateError};
pub use setup_plan::{SetupPlan, SetupStatement};
pub use sink::Sink;
pub use source::{
    Emitter, OffsetStore, PipelineClosed, Source, SourceContext, SourceError, Stopped, WhileWaiting,
};

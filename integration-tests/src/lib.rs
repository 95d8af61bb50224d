//! Real-server harness for Tributary's end-to-end tests and the quickstart.
//!
//! Tributary is tested against the servers it talks to in production, never
//! against mocks: this crate starts them. [`Postgres`] is a throwaway
//! PostgreSQL 15 cluster with `wal_level = logical`, [`Kinesalite`] is the
//! Kinesis emulator from the npm registry, [`TributaryProcess`] runs the
//! `tributary` binary as a child process with its logs captured, and
//! [`write_config`] writes a config file that points the binary at both
//! servers. [`Pipeline`] puts them together for an end-to-end test: both
//! servers, a stream, the test's tables, a config and a `tributary run` that
//! streams. The `tributary-dev` binary of this crate uses the same code for
//! the README quickstart, so the tests and the quickstart cannot drift apart.
//!
//! Every server started here listens on 127.0.0.1 only, lives in its own
//! temporary directory and is stopped when its handle is dropped.
//!
//! Files:
//! - `postgres.rs`: the PostgreSQL cluster.
//! - `kinesalite.rs`: the Kinesis emulator, its npm install and a reader for
//!   everything in a stream.
//! - `process.rs`: locating, building and running the `tributary` binary.
//! - `config.rs`: the config file a test hands to the binary.
//! - `consumer.rs`: a consumer applying a stream per shard by the
//!   documented rules, and the source rows to compare it with.
//! - `pipeline.rs`: [`Servers`] and [`Pipeline`], the fixture of the
//!   end-to-end tests.
//! - `kinesis_faults.rs`: [`KinesisFaults`], an HTTP proxy in front of
//!   kinesalite that refuses PutRecords entries and fails whole calls.
//! - `proxy.rs`: [`FaultProxy`], a TCP proxy that can stall a connection
//!   (a Kinesis outage in front of kinesalite).
//! - `net.rs`: free loopback ports.

mod config;
pub mod consumer;
mod kinesalite;
mod kinesis_faults;
mod net;
mod pipeline;
mod postgres;
mod process;
mod proxy;

use std::path::{Path, PathBuf};

pub use config::{PUBLICATION, SLOT, SOURCE_NAME, TestConfig, write_config};
pub use kinesalite::{Kinesalite, StreamRecord, kinesis_client};
pub use kinesis_faults::{FaultCounts, Faults, KinesisFaults};
pub use net::{free_port, listening_addresses};
pub use pipeline::{Pipeline, Servers};
pub use postgres::{DEFAULT_DATABASE, Lsn, MD5_USER, Postgres, SCRAM_USER, SUPERUSER, USER};
pub use process::{EMULATOR_AWS_ENV, TributaryProcess, tributary_bin};
pub use proxy::FaultProxy;

/// The root of the repository: the directory holding the workspace's
/// `Cargo.toml`, `package.json` and `config.toml`.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the crate lives in a subdirectory of the repository")
        .to_path_buf()
}

/// The last `lines` lines of a text file, or a note saying why it could not
/// be read. Used to put a server's log into an error message.
pub(crate) fn file_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

//! Real-server harness for Tributary's end-to-end tests and the quickstart.
//!
//! Tributary is tested against the servers it talks to in production, never
//! against mocks: this crate starts them. [`Postgres`] is a throwaway
//! PostgreSQL 15 cluster with `wal_level = logical`, [`Mariadb`] a throwaway
//! MariaDB writing a row binlog, [`Kinesalite`] is the
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
//! - `mariadb.rs`: [`Mariadb`], a throwaway MariaDB with the row binlog.
//! - `mysql_pipeline.rs`: [`MysqlPipeline`], MariaDB + kinesalite +
//!   `tributary run` with a MySQL source.
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
//! - `instant_kinesis.rs`: [`InstantKinesis`], an endpoint that answers
//!   PutRecords at once (the latency benchmark without the emulator's own).
//! - `http_relay.rs`: the HTTP server loop and relay to kinesalite both
//!   share.
//! - `proxy.rs`: [`FaultProxy`], a TCP proxy that can stall a connection
//!   (a Kinesis outage in front of kinesalite).
//! - `net.rs`: free loopback ports.
//! - `http_probe.rs`: `GET` on the connector's HTTP endpoints.
//! - `tls.rs`: [`TestCerts`], a throwaway CA and server certificate for
//!   the servers' TLS (`Postgres::start_with_tls`, `Mariadb::start_with`
//!   and its `--ssl-*` flags).
//! - `snapshot_resume.rs`: watching a snapshot's stored progress and what
//!   a resumed run logs.
//! - `verify_report.rs`: running `tributary verify` and reading its
//!   `--json` report.
//! - `writer.rs`: [`Writer`], a task that keeps changing a database.

mod config;
pub mod consumer;
pub mod http_probe;
mod http_relay;
mod instant_kinesis;
mod key_order;
mod kinesalite;
mod kinesis_faults;
mod mariadb;
mod mysql_pipeline;
mod net;
mod pipeline;
mod postgres;
mod process;
mod proxy;
pub mod snapshot_resume;
mod tls;
pub mod verify_report;
mod writer;

use std::path::{Path, PathBuf};

pub use config::{
    MYSQL_SERVER_ID, PUBLICATION, SLOT, SOURCE_NAME, TestConfig, set_tables, write_config,
    write_mysql_config,
};
pub use http_probe::get as http_get;
pub use instant_kinesis::InstantKinesis;
pub use key_order::{ITEMS_TABLE, check_last_occurrences, versions_per_key};
pub use kinesalite::{Kinesalite, StreamRecord, kinesis_client};
pub use kinesis_faults::{FaultCounts, Faults, KinesisFaults};
pub use mariadb::{MARIADB_SERVER_ID, MYSQL_PASSWORD, MYSQL_USER, Mariadb, ROW_BINLOG_FLAGS};
pub use mysql_pipeline::{MYSQL_STREAMING_LOG, MysqlPipeline};
pub use net::{free_port, listening_addresses};
pub use pipeline::{Pipeline, Servers};
pub use postgres::{
    CERT_USER, DEFAULT_DATABASE, Lsn, MD5_USER, Postgres, SCRAM_USER, SUPERUSER, TLS_USER, USER,
};
pub use process::{EMULATOR_AWS_ENV, TributaryProcess, tributary_bin};
pub use proxy::FaultProxy;
pub use tls::TestCerts;
pub use writer::{Execute, Writer};

/// Milliseconds since the Unix epoch, as [`StreamRecord::arrival_millis`]
/// counts them.
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

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

/// The envelopes of `records`, each asserted valid against the envelope's
/// JSON Schema (`schema/envelope.v1.json`), sorted by source position
/// (commit order). Panics, naming the envelope and the errors, on an invalid
/// one.
pub fn valid_envelopes_by_position(
    records: &[StreamRecord],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(repo_root().join("schema/envelope.v1.json"))?;
    let schema: serde_json::Value = serde_json::from_str(&text)?;
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| anyhow::anyhow!("the envelope schema does not compile: {e}"))?;
    let mut envelopes = records
        .iter()
        .map(StreamRecord::json)
        .collect::<anyhow::Result<Vec<_>>>()?;
    for envelope in &envelopes {
        let errors: Vec<String> = validator
            .iter_errors(envelope)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "envelope {envelope} is invalid: {errors:?}"
        );
    }
    envelopes.sort_by(|a, b| {
        let position = |e: &serde_json::Value| e["source"]["position"].as_str().map(str::to_owned);
        position(a).cmp(&position(b))
    });
    Ok(envelopes)
}

/// Quotas far above what kinesalite needs, for tests that should not wait
/// on the 1,000 records/s default (kinesalite does not throttle).
pub const FAST_QUOTA: &str =
    "[sink.quota]\nrecords_per_shard_per_sec = 20000\nbytes_per_shard_per_sec = 20000000\n";

/// Per-key order after a crash: for each key, the values of its events in
/// stream order (values increase in commit order, duplicates allowed).
/// Panics unless the last occurrence of each value comes in commit order
/// (guarantee 3: a replayed record never ends up after a newer change).
pub fn assert_last_occurrences_in_commit_order(per_key: &std::collections::HashMap<i64, Vec<i64>>) {
    for (key, events) in per_key {
        let mut last = std::collections::HashMap::new();
        for (index, v) in events.iter().enumerate() {
            last.insert(*v, index);
        }
        let mut order: Vec<(usize, i64)> = last.iter().map(|(v, i)| (*i, *v)).collect();
        order.sort();
        let values: Vec<i64> = order.iter().map(|(_, v)| *v).collect();
        let mut sorted = values.clone();
        sorted.sort();
        assert_eq!(
            values, sorted,
            "key {key}: last occurrences out of commit order"
        );
    }
}

/// Asserts that a `tributary check` text report has a `✗` line for
/// `check` (`✗ component check: ...`) followed by a `fix:` line that
/// contains `fix`.
pub fn assert_check_fails_with(report: &str, check: &str, fix: &str) {
    let mut lines = report.lines();
    let found = lines.any(|line| line.starts_with("✗ ") && line.contains(&format!(" {check}: ")));
    assert!(found, "no ✗ {check} line in:\n{report}");
    let fix_line = lines.next().unwrap_or_default();
    assert!(
        fix_line.trim_start().starts_with("fix: ") && fix_line.contains(fix),
        "the fix of {check} is not `{fix}` in:\n{report}"
    );
}

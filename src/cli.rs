//! The command line.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Change-data-capture from PostgreSQL into AWS Kinesis Data Streams.
#[derive(Debug, Parser)]
#[command(name = "tributary", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// Path of the configuration file; every key can be overridden with
    /// TRIBUTARY__SECTION__KEY environment variables.
    #[arg(
        short,
        long,
        value_name = "FILE",
        default_value = "config.toml",
        global = true
    )]
    pub config: PathBuf,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream changes from the source into the sink until SIGTERM/SIGINT.
    ///
    /// First checks the AWS credentials and that the stream exists (exit 2
    /// with the fix if not), then creates the publication and the
    /// replication slot when missing, resumes after the last acknowledged
    /// transaction, and on SIGTERM finishes the current transaction,
    /// flushes, acknowledges and exits 0.
    Run {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
    },
    /// Print the envelopes of a Kinesis stream, one JSON object per line.
    ///
    /// Reads every shard (region and endpoint from the config's [sink]),
    /// after checking the AWS credentials and that the stream exists.
    /// Without --follow it stops once every shard is read to its end.
    Tail {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// The stream to read.
        #[arg(long, value_name = "NAME")]
        stream: String,
        /// Where to start in every shard.
        #[arg(long, value_enum, default_value_t = From::TrimHorizon)]
        from: From,
        /// Keep waiting for new records (until Ctrl-C).
        #[arg(long)]
        follow: bool,
        /// Indent each envelope over several lines (coloured when stdout is
        /// a terminal), for reading by eye.
        #[arg(long)]
        pretty: bool,
        /// Check every envelope against the envelope's JSON Schema and,
        /// when the config names a source, its `after` and
        /// `before` against the table's schema (as `schema --table`
        /// prints it): the failures go to stderr with their ids, and the
        /// exit code is 1 when any envelope is invalid.
        #[arg(long)]
        validate: bool,
    },
    /// Print the JSON Schema of one table's `after` object, from the
    /// source's catalogue (PostgreSQL or MySQL/MariaDB): each column's
    /// JSON type as the envelope renders it, null allowed unless NOT NULL.
    Schema {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// The table, `schema.table` (or `table` in `public`; MySQL:
        /// `db.table`, or `table` in the URL's database).
        #[arg(long, value_name = "T")]
        table: String,
    },
    /// Reconcile the source's tables with the stream (PostgreSQL, MySQL,
    /// MariaDB).
    ///
    /// Replays every shard of the tables' streams from the trim horizon
    /// (or --since) with the consumer rules of docs/envelope.md and
    /// compares the result with the tables read at one consistent point,
    /// per key: rows missing from the stream, extra in it, or different
    /// (first differing column). Exit 0 when they match, 1 when not, 2 for
    /// a bad configuration. See docs/verify.md.
    Verify {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Only this table, `schema.table` (or `table` in `public`; MySQL:
        /// `db.table`, or `table` in the URL's database); repeat for more.
        /// Default: every captured table.
        #[arg(long, value_name = "T")]
        table: Vec<String>,
        /// Print one JSON document instead (see docs/verify.md).
        #[arg(long)]
        json: bool,
        /// Replay the stream from this time (RFC 3339 in UTC, e.g.
        /// 2026-12-01T03:00:00Z; Kinesis AT_TIMESTAMP) instead of the trim
        /// horizon. Only the keys the replay saw are compared: source rows
        /// not changed since are counted as not compared.
        #[arg(long, value_name = "TIME", value_parser = crate::verify::parse_since)]
        since: Option<std::time::SystemTime>,
    },
    /// Check the source and the sink: one line per item (✓ ok, ! warning,
    /// ✗ problem, with the SQL or setting that fixes it).
    ///
    /// Exit 0 when the pipeline can run, 2 when not.
    Check {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Print one JSON document instead (see docs/operations.md).
        #[arg(long)]
        json: bool,
    },
    /// Print the statements that prepare the source's server for the
    /// connector, only what is missing (PostgreSQL: wal_level, role, grants,
    /// publication, slot; MySQL: binlog settings, user, grants).
    Setup {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Run the statements instead of only printing them.
        #[arg(long)]
        apply: bool,
        /// Connect as this user to run them (a DBA's URL; default:
        /// source.url). Grants are planned for the user of source.url.
        #[arg(
            long,
            value_name = "URL",
            env = "TRIBUTARY_SETUP_URL",
            hide_env_values = true
        )]
        admin_url: Option<String>,
    },
    /// List or drop logical replication slots (PostgreSQL).
    Slots {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// `list` (the default) or `drop NAME`.
        #[command(subcommand)]
        action: Option<SlotsAction>,
    },
    /// Show or resend the records Kinesis could never take (the
    /// dead-letter store under [state] dir).
    DeadLetter {
        /// What to do with them.
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
}

/// `slots` actions.
#[derive(Debug, Subcommand)]
pub enum SlotsAction {
    /// Every logical slot with plugin, database, active pid, lag in bytes
    /// and wal_status.
    List,
    /// Drop a slot (refused while a connector streams from it).
    Drop {
        /// The slot's name.
        name: String,
    },
}

/// `tributary dead-letter ...`.
#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List the dead-lettered records not replayed yet, oldest first.
    List {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// One JSON object per record, with its envelope.
        #[arg(long)]
        json: bool,
    },
    /// Send dead-lettered records again, in their original order per key;
    /// what Kinesis accepts leaves the store. Exit 1 if some stay.
    Replay {
        #[command(flatten)]
        #[allow(missing_docs)]
        config: ConfigArg,
        /// Only records dead-lettered for this reason (too_large,
        /// invalid_partition_key, rejected).
        #[arg(long, value_name = "R")]
        reason: Option<String>,
        /// Only the record with this envelope id.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
    },
}

/// `tail --from`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum From {
    /// The oldest record still in the stream.
    TrimHorizon,
    /// Only records written after the tail starts.
    Latest,
}

//! `tributary-dev`: the README quickstart's servers, started by the same
//! harness code the integration tests use.
//!
//! - `tributary-dev up`: PostgreSQL 15 on 127.0.0.1:54329 (database `shop`,
//!   user `tributary`, table `public.orders`) and kinesalite on
//!   127.0.0.1:4567 (stream `shop-cdc`, 2 shards), the addresses the
//!   repository's `config.toml` points at; runs until Ctrl-C or SIGTERM.
//! - `tributary-dev demo`: `up`, then `tributary run` on `config.toml` (its
//!   start-up log shown), a few changes to `orders`, and `tributary tail
//!   --pretty` to show the envelopes, with a word on their order.
//! - `tributary-dev sql "<statement>"`: runs SQL on the dev Postgres.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};
use tributary_integration_tests::{
    DEFAULT_DATABASE, EMULATOR_AWS_ENV, Kinesalite, Postgres, TributaryProcess, repo_root,
    tributary_bin,
};

/// The Postgres port of the repository's `config.toml`.
const DEV_POSTGRES_PORT: u16 = 54329;
/// The kinesalite port of the repository's `config.toml`.
const DEV_KINESIS_PORT: u16 = 4567;
/// The stream `up` creates.
const DEV_STREAM: &str = "shop-cdc";
/// Shards of the dev stream.
const DEV_SHARDS: u32 = 2;
/// The slot name assumed when the config does not name one.
const DEFAULT_SLOT: &str = "tributary_shop";

const ORDERS_TABLE: &str = "CREATE TABLE public.orders (
    id bigint PRIMARY KEY,
    customer text NOT NULL,
    status text NOT NULL,
    total numeric(12,2),
    items jsonb,
    created_at timestamptz DEFAULT now()
)";

/// The demo's changes, one transaction each: 3 inserts, 1 update, 1 delete.
const DEMO_CHANGES: [&str; 5] = [
    r#"INSERT INTO orders (id, customer, status, total, items)
       VALUES (1, 'ada', 'new', 19.90, '[{"sku": "tea", "qty": 2}]')"#,
    r#"INSERT INTO orders (id, customer, status, total, items)
       VALUES (2, 'grace', 'new', 5.00, '[{"sku": "mug", "qty": 1}]')"#,
    r#"INSERT INTO orders (id, customer, status, total, items)
       VALUES (3, 'linus', 'new', 42.00, '[{"sku": "kettle", "qty": 1}]')"#,
    "UPDATE orders SET status = 'paid' WHERE id = 1",
    "DELETE FROM orders WHERE id = 2",
];

#[derive(Parser)]
#[command(about = "Dev servers for Tributary's quickstart (PostgreSQL 15 + kinesalite)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start Postgres (127.0.0.1:54329) and kinesalite (127.0.0.1:4567) and
    /// keep them up until Ctrl-C or SIGTERM.
    Up,
    /// The whole quickstart: start the servers, run tributary, make some
    /// changes, tail the stream, stop everything.
    Demo {
        /// The config tributary runs with.
        #[arg(short, long, default_value_os_t = repo_root().join("config.toml"))]
        config: PathBuf,
    },
    /// Run SQL against the dev Postgres (started by `up`) and print the rows.
    Sql {
        /// One or more `;`-separated statements.
        statement: String,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up => up().await,
        Cmd::Demo { config } => {
            tokio::select! {
                result = demo(&config) => result,
                () = shutdown_signal() => {
                    println!("interrupted: stopping");
                    Ok(())
                }
            }
        }
        Cmd::Sql { statement } => sql(&statement).await,
    }
}

/// The two dev servers. Dropping it stops both.
struct DevStack {
    pg: Postgres,
    kin: Kinesalite,
}

impl DevStack {
    async fn start(stream: &str) -> Result<Self> {
        println!("starting postgres on 127.0.0.1:{DEV_POSTGRES_PORT}");
        let started = Instant::now();
        let pg = Postgres::start_on(DEV_POSTGRES_PORT)
            .await
            .with_context(|| {
                format!(
                    "the dev postgres needs port {DEV_POSTGRES_PORT} \
                 (is another `tributary-dev up` running?)"
                )
            })?;
        pg.execute(ORDERS_TABLE).await?;
        println!(
            "postgres ready in {:.1}s: {} (table public.orders)",
            started.elapsed().as_secs_f64(),
            pg.url(DEFAULT_DATABASE)
        );

        println!("starting kinesalite on 127.0.0.1:{DEV_KINESIS_PORT}");
        let started = Instant::now();
        let kin = Kinesalite::start_on(DEV_KINESIS_PORT)
            .await
            .with_context(|| {
                format!(
                    "the dev kinesalite needs port {DEV_KINESIS_PORT} \
                 (is another `tributary-dev up` running?)"
                )
            })?;
        kin.create_stream(stream, DEV_SHARDS).await?;
        println!(
            "kinesalite ready in {:.1}s: {} (stream {stream}, {DEV_SHARDS} shards)",
            started.elapsed().as_secs_f64(),
            kin.endpoint()
        );
        Ok(DevStack { pg, kin })
    }
}

async fn up() -> Result<()> {
    let stack = DevStack::start(DEV_STREAM).await?;
    println!("up: the repository's config.toml points here. kinesalite takes any credentials:");
    println!("  export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test");
    println!("  tributary run -c config.toml");
    println!("press Ctrl-C to stop");
    shutdown_signal().await;
    println!("stopping postgres and kinesalite");
    drop(stack);
    Ok(())
}

async fn demo(config: &Path) -> Result<()> {
    let config = config
        .canonicalize()
        .with_context(|| format!("no config file at {}", config.display()))?;
    let (stream, slot) = stream_and_slot(&config)?;
    let bin = tributary_bin()?;
    let stack = DevStack::start(&stream).await?;

    let state = tempfile::Builder::new()
        .prefix("tributary-demo-state-")
        .tempdir()?;
    let state_dir = state.path().to_str().context("temp dir is not UTF-8")?;
    println!("starting {} run -c {}", bin.display(), config.display());
    println!(
        "  (state in {state_dir} via TRIBUTARY__STATE__DIR: a fresh cluster needs fresh state)"
    );
    let mut tributary = TributaryProcess::run(&config, &[("TRIBUTARY__STATE__DIR", state_dir)])?;
    let result = drive_demo(&stack, &mut tributary, &config, &stream, &slot).await;
    let shown = match result {
        Ok(shown) => shown,
        Err(err) => {
            eprintln!("{}", tributary.logs());
            return Err(err);
        }
    };

    println!("stopping tributary (SIGTERM)");
    tributary.sigterm()?;
    let status = tributary.wait_exit(Duration::from_secs(30)).await?;
    show_log(
        "tributary's log from here to its exit",
        &tributary.stderr(),
        shown,
    );
    println!("tributary exited: {status}");
    println!("stopping postgres and kinesalite");
    drop(stack);
    if !status.success() {
        eprintln!("{}", tributary.logs());
        bail!("tributary did not exit cleanly on SIGTERM ({status})");
    }
    Ok(())
}

/// Waits for tributary to stream, shows its start-up log, makes the changes
/// and tails the stream; returns how much of tributary's log was shown.
async fn drive_demo(
    stack: &DevStack,
    tributary: &mut TributaryProcess,
    config: &Path,
    stream: &str,
    slot: &str,
) -> Result<usize> {
    println!("waiting for tributary to stream from slot {slot}");
    tributary
        .wait_streaming(&stack.pg, slot, Duration::from_secs(60))
        .await?;
    let log = tributary.stderr();
    show_log("tributary's start-up log", &log, 0);

    println!("changing public.orders: 3 inserts, 1 update, 1 delete");
    for change in DEMO_CHANGES {
        stack.pg.execute(change).await?;
    }

    println!(
        "waiting for the {} changes to reach {stream}",
        DEMO_CHANGES.len()
    );
    // Short of them, still tail what is there (it helps to see it), then fail.
    let arrived = stack
        .kin
        .wait_for_records(stream, DEMO_CHANGES.len(), Duration::from_secs(30))
        .await;
    if let Err(err) = &arrived {
        println!("warning: {err:#}; tailing what is there");
    }

    println!(
        "order holds per key (each key's envelopes are in commit order in its shard), not \
         across the stream: tail reads the {DEV_SHARDS} shards one after the other"
    );
    println!("--- tributary tail --stream {stream} --from trim-horizon --pretty ---");
    let status = tokio::process::Command::new(tributary_bin()?)
        .args(["tail", "-c"])
        .arg(config)
        .args(["--stream", stream, "--from", "trim-horizon", "--pretty"])
        .envs(EMULATOR_AWS_ENV)
        .current_dir(config.parent().unwrap_or(Path::new(".")))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status();
    let status = tokio::time::timeout(Duration::from_secs(60), status)
        .await
        .context("`tributary tail` did not finish within 60s")??;
    println!("---");
    if !status.success() {
        bail!("`tributary tail` failed ({status})");
    }
    arrived.map(|_| log.len())
}

/// Prints `log` from byte `from` on under a header, each line indented.
fn show_log(title: &str, log: &str, from: usize) {
    println!("--- {title} ---");
    for line in log
        .get(from..)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
    {
        println!("  {line}");
    }
    println!("---");
}

/// `sink.stream` and `source.postgres.slot` of the config, with the dev
/// defaults where it does not set them.
fn stream_and_slot(config: &Path) -> Result<(String, String)> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let stream = table
        .get("sink")
        .and_then(|sink| sink.get("stream"))
        .and_then(|stream| stream.as_str())
        .unwrap_or(DEV_STREAM);
    if stream.contains('{') {
        bail!(
            "the demo needs one fixed stream, but sink.stream in {} is the template {stream:?}",
            config.display()
        );
    }
    let slot = table
        .get("source")
        .and_then(|source| source.get("postgres"))
        .and_then(|postgres| postgres.get("slot"))
        .and_then(|slot| slot.as_str())
        .unwrap_or(DEFAULT_SLOT);
    Ok((stream.to_owned(), slot.to_owned()))
}

async fn sql(statement: &str) -> Result<()> {
    let url = format!("postgres://tributary@127.0.0.1:{DEV_POSTGRES_PORT}/{DEFAULT_DATABASE}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url} (is `tributary-dev up` running?)"))?;
    tokio::spawn(connection);
    for message in client.simple_query(statement).await? {
        match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                let values: Vec<&str> = (0..row.len())
                    .map(|i| row.get(i).unwrap_or("NULL"))
                    .collect();
                println!("{}", values.join("\t"));
            }
            tokio_postgres::SimpleQueryMessage::CommandComplete(rows) => {
                println!("({rows} rows)");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            eprintln!("warning: cannot listen for SIGTERM ({err}); only Ctrl-C stops this");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

//! `tributary-bench`: the drain benchmark of issue 2.
//!
//! A throwaway PostgreSQL 15 cluster gets a 6-column table, a publication
//! and `2 x --repeat` logical slots (`pgoutput`), all created before a
//! backlog of `--rows` inserts in `--transactions` transactions, so every
//! slot holds the same backlog. Then, `--repeat` times, one slot is drained
//! by `tributary run` with `sink.kind = "null"` (records are discarded) and
//! another by `pg_recvlogical -P pgoutput -f /dev/null`, alternating which
//! goes first.
//!
//! Measured per drain:
//! - wall time: from spawning the client until the backlog is drained.
//!   `pg_recvlogical`: until it exits at `--endpos`. Tributary: until the
//!   slot's `confirmed_flush_lsn` reaches the end LSN (polled every
//!   `--poll-ms`), i.e. until Tributary has acknowledged the last commit.
//! - `sent`: when the walsender had sent everything (`pg_stat_replication.
//!   sent_lsn` reached the end LSN); for Tributary the gap to the wall time
//!   is the client's tail latency plus the standby status interval.
//! - CPU seconds (user + system) of the client process up to the drain,
//!   its peak RSS and its context switches. `pg_recvlogical` runs under `/usr/bin/time`, which
//!   reports them from `wait4`; Tributary's are read from
//!   `/proc/<pid>/stat` and `VmHWM` in `/proc/<pid>/status` at the drain
//!   instant, before it is stopped with SIGTERM.
//! - the walsender's CPU seconds, from `/proc/<pid>/stat` of the slot's
//!   `active_pid` (sampled on every poll).
//! - `other CPU s`: busy CPU time of the whole machine during the drain
//!   (`/proc/stat`) minus the client's and the walsender's: the poller and
//!   anything else running. Before each drain the benchmark waits until the
//!   machine is `--wait-idle` percent idle, since on two cores any other
//!   work skews the figures.
//!
//! The targets (issue 2): Tributary's wall time at most 1.05 x
//! `pg_recvlogical`'s (median of the per-pair ratios) and at most 1.5
//! CPU-seconds per million rows. The verdict is printed; the exit code is 0
//! either way (non-zero only if the benchmark itself could not run).
//!
//! Run it with a release build of `tributary`: `scripts/bench.sh`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio_postgres::{Client, Statement};
use tributary_integration_tests::{
    DEFAULT_DATABASE, Postgres, TributaryProcess, USER, free_port, tributary_bin,
};

/// The table the backlog is written to.
const TABLE: &str = "public.bench";
/// The publication both clients read.
const PUBLICATION: &str = "bench_pub";
/// Wall-time target: Tributary / pg_recvlogical.
const TARGET_WALL_RATIO: f64 = 1.05;
/// CPU target: Tributary's CPU-seconds per million rows.
const TARGET_CPU_PER_MILLION: f64 = 1.5;
/// Where `pg_recvlogical` is looked for when `--pg-recvlogical` is not given.
const RECVLOGICAL_CANDIDATES: [&str; 2] = [
    "/usr/lib/postgresql/15/bin/pg_recvlogical",
    "/usr/bin/pg_recvlogical",
];
/// GNU time, which reports a child's CPU time and peak RSS from `wait4`.
const GNU_TIME: &str = "/usr/bin/time";
/// Replication slots the harness cluster allows without a restart.
const HARNESS_MAX_SLOTS: usize = 10;

#[derive(Parser, Debug)]
#[command(
    about = "Drain benchmark: tributary (null sink) vs pg_recvlogical on the same pgoutput backlog"
)]
struct Args {
    /// Rows inserted into the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Transactions the rows are inserted in (one INSERT ... SELECT
    /// generate_series each).
    #[arg(long, default_value_t = 100)]
    transactions: u64,
    /// Drain pairs (tributary + pg_recvlogical), each on fresh slots.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// How often the slot is polled, in milliseconds.
    #[arg(long, default_value_t = 10)]
    poll_ms: u64,
    /// Give up on one drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// The pg_recvlogical binary (default: PostgreSQL 15's, then
    /// /usr/bin/pg_recvlogical).
    #[arg(long)]
    pg_recvlogical: Option<PathBuf>,
    /// Run only the Tributary drains (for profiling); no ratios.
    #[arg(long)]
    tributary_only: bool,
    /// Before each drain, wait until the machine is at least this idle (in
    /// percent, over 2 s): other work on the cores skews the figures.
    /// 0 turns the wait off.
    #[arg(long, default_value_t = 85)]
    wait_idle: u32,
    /// Give up waiting for an idle machine after this many seconds (and
    /// run anyway, with a warning).
    #[arg(long, default_value_t = 600)]
    wait_idle_secs: u64,
}

/// Which client drained a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tool {
    Tributary,
    Recvlogical,
}

impl Tool {
    fn label(self) -> &'static str {
        match self {
            Tool::Tributary => "tributary",
            Tool::Recvlogical => "pg_recvlogical",
        }
    }
}

/// The figures of one drain.
#[derive(Debug, Clone)]
struct Drain {
    tool: Tool,
    /// Spawn to drained.
    wall: Duration,
    /// Spawn to the walsender having sent the end LSN, if seen.
    sent: Option<Duration>,
    /// User + system CPU seconds of the client process.
    cpu_secs: f64,
    /// Peak resident set size of the client process, KiB.
    peak_rss_kib: u64,
    /// Context switches (voluntary + involuntary) of the client process:
    /// roughly how often it went to sleep waiting for the socket.
    context_switches: u64,
    /// CPU seconds of the walsender serving the drain, if sampled.
    walsender_cpu_secs: Option<f64>,
    /// The walsender's pid, if seen (for matching a system-wide profile).
    walsender_pid: Option<u32>,
    /// Busy CPU seconds of the whole machine (all cores) during the drain.
    machine_busy_secs: f64,
    /// Tributary only: SIGTERM to exit.
    shutdown: Option<Duration>,
    /// Tributary only: whether it exited with status 0 after SIGTERM.
    clean_exit: bool,
}

/// The backlog every slot holds.
struct Backlog {
    rows: u64,
    end_lsn: String,
    wal_bytes: i64,
    insert_time: Duration,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tributary-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<()> {
    if args.rows == 0 || args.transactions == 0 || args.transactions > args.rows {
        bail!("need rows >= transactions >= 1");
    }
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let tributary = tributary_bin()?;
    if tributary.is_relative() {
        // The binary runs in its config's directory: a relative path would
        // not resolve there.
        bail!(
            "TRIBUTARY_BIN={} is relative: give an absolute path",
            tributary.display()
        );
    }
    let recvlogical = find_recvlogical(args.pg_recvlogical.as_deref())?;
    if !Path::new(GNU_TIME).is_file() {
        bail!("{GNU_TIME} (GNU time) is missing: apt-get install time");
    }
    let clk_tck = clock_ticks();

    eprintln!("tributary-bench: starting PostgreSQL");
    let mut pg = Postgres::start().await?;
    let slots_needed = 2 * args.repeat;
    if slots_needed > HARNESS_MAX_SLOTS {
        let admin = pg.superuser_client("postgres").await?;
        admin
            .batch_execute(&format!(
                "ALTER SYSTEM SET max_replication_slots = {}",
                slots_needed + 2
            ))
            .await
            .context("raising max_replication_slots")?;
        drop(admin);
        pg.restart()?;
    }
    let client = pg.client(DEFAULT_DATABASE).await?;
    let pg_version: String = client.query_one("SHOW server_version", &[]).await?.get(0);

    let pairs: Vec<(String, String)> = (1..=args.repeat)
        .map(|i| (format!("s_tributary_{i}"), format!("s_recvlogical_{i}")))
        .collect();
    prepare_schema(&client, &pairs, args.tributary_only).await?;
    eprintln!(
        "tributary-bench: inserting {} rows in {} transactions",
        args.rows, args.transactions
    );
    let backlog = insert_backlog(&client, args.rows, args.transactions).await?;
    eprintln!(
        "tributary-bench: backlog: {} rows, {:.1} MiB of WAL, end LSN {} (inserted in {:.1} s)",
        backlog.rows,
        backlog.wal_bytes as f64 / (1024.0 * 1024.0),
        backlog.end_lsn,
        backlog.insert_time.as_secs_f64()
    );

    let monitor = Monitor::new(&pg, &backlog.end_lsn, args).await?;
    let mut results: Vec<(Drain, Option<Drain>)> = Vec::new();
    for (i, (trib_slot, recv_slot)) in pairs.iter().enumerate() {
        let tributary_first = i % 2 == 0;
        let mut trib = None;
        let mut recv = None;
        for turn in 0..2 {
            let tool = if (turn == 0) == tributary_first {
                Tool::Tributary
            } else {
                Tool::Recvlogical
            };
            if tool == Tool::Recvlogical && args.tributary_only {
                continue;
            }
            // Let the previous drain's processes go away first.
            tokio::time::sleep(Duration::from_secs(1)).await;
            wait_for_idle(args).await?;
            eprintln!(
                "tributary-bench: run {}: draining with {}",
                i + 1,
                tool.label()
            );
            let drain = match tool {
                Tool::Tributary => drain_tributary(&pg, &monitor, trib_slot, clk_tck).await?,
                Tool::Recvlogical => {
                    drain_recvlogical(&monitor, recv_slot, &recvlogical, clk_tck).await?
                }
            };
            eprintln!(
                "tributary-bench: run {}: {} drained in {:.3} s (walsender pid {})",
                i + 1,
                tool.label(),
                drain.wall.as_secs_f64(),
                drain
                    .walsender_pid
                    .map_or_else(|| "unknown".into(), |pid| pid.to_string())
            );
            match tool {
                Tool::Tributary => trib = Some(drain),
                Tool::Recvlogical => recv = Some(drain),
            }
        }
        results.push((trib.expect("tributary always runs"), recv));
    }

    let report = render_report(&results, &backlog, args);
    println!(
        "Machine: {} cores, {}; PostgreSQL {pg_version}",
        nproc(),
        cpu_model()
    );
    println!("tributary binary: {}", tributary.display());
    println!("pg_recvlogical: {}", recvlogical.display());
    println!();
    print!("{report}");
    Ok(())
}

/// Table, publication and every slot, before any row exists.
async fn prepare_schema(
    client: &Client,
    pairs: &[(String, String)],
    tributary_only: bool,
) -> Result<()> {
    // No autovacuum on the table: it would compete with the drains for the
    // two cores and add WAL after the end LSN.
    client
        .batch_execute(&format!(
            "CREATE TABLE {TABLE} (
                id bigint PRIMARY KEY,
                a int,
                b text,
                c numeric(12,2),
                d timestamptz,
                e boolean
             ) WITH (autovacuum_enabled = off);
             CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE};"
        ))
        .await
        .context("creating the table and the publication")?;
    for (trib, recv) in pairs {
        let mut slots = vec![trib];
        if !tributary_only {
            slots.push(recv);
        }
        for slot in slots {
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[slot],
                )
                .await
                .with_context(|| format!("creating slot {slot}"))?;
        }
    }
    Ok(())
}

/// Inserts the rows, one `INSERT ... SELECT` per transaction, and reads the
/// end LSN right after the last commit.
async fn insert_backlog(client: &Client, rows: u64, transactions: u64) -> Result<Backlog> {
    let start_lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let insert = client
        .prepare(&format!(
            "INSERT INTO {TABLE} (id, a, b, c, d, e)
             SELECT g,
                    (g * 7919 % 1000003)::int,
                    'row-' || substr(md5(g::text), 1, 16),
                    (g * 37 % 10000000) / 100.0,
                    now(),
                    g % 2 = 0
             FROM generate_series($1::bigint, $2::bigint) AS g"
        ))
        .await?;
    let started = Instant::now();
    let mut next: i64 = 1;
    for t in 0..transactions {
        // Spread the remainder over the first transactions.
        let count = rows / transactions + u64::from(t < rows % transactions);
        let last = next + i64::try_from(count)? - 1;
        client
            .execute(&insert, &[&next, &last])
            .await
            .with_context(|| format!("inserting rows {next}..={last}"))?;
        next = last + 1;
    }
    let insert_time = started.elapsed();
    let row = client
        .query_one(
            "SELECT pg_current_wal_lsn()::text,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&start_lsn],
        )
        .await?;
    let end_lsn: String = row.get(0);
    let wal_bytes: i64 = row.get(1);
    // Write the dirty pages out now, not during a drain. The checkpoint's
    // WAL comes after the end LSN: decoding it sends nothing.
    client.batch_execute("CHECKPOINT").await.ok();
    let inserted: i64 = client
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await?
        .get(0);
    if u64::try_from(inserted)? != rows {
        bail!("inserted {inserted} rows, expected {rows}");
    }
    Ok(Backlog {
        rows,
        end_lsn,
        wal_bytes,
        insert_time,
    })
}

/// What one poll of a slot saw.
struct SlotState {
    /// `confirmed_flush_lsn >= end`.
    confirmed: bool,
    /// The walsender's `sent_lsn >= end`.
    sent: bool,
    /// The walsender streaming from the slot.
    active_pid: Option<i32>,
}

/// Polls slots through one superuser connection.
struct Monitor {
    client: Client,
    poll: Statement,
    end_lsn: String,
    interval: Duration,
    timeout: Duration,
    port: u16,
}

impl Monitor {
    async fn new(pg: &Postgres, end_lsn: &str, args: &Args) -> Result<Self> {
        let client = pg.superuser_client(DEFAULT_DATABASE).await?;
        let poll = client
            .prepare(
                "SELECT COALESCE(s.confirmed_flush_lsn >= $2::text::pg_lsn, false),
                        COALESCE(r.sent_lsn >= $2::text::pg_lsn, false),
                        s.active_pid
                 FROM pg_replication_slots s
                 LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
                 WHERE s.slot_name = $1",
            )
            .await?;
        Ok(Monitor {
            client,
            poll,
            end_lsn: end_lsn.to_owned(),
            interval: Duration::from_millis(args.poll_ms.max(1)),
            timeout: Duration::from_secs(args.timeout_secs),
            port: pg.port(),
        })
    }

    async fn slot(&self, slot: &str) -> Result<SlotState> {
        let row = self
            .client
            .query_opt(&self.poll, &[&slot, &self.end_lsn])
            .await
            .context("polling pg_replication_slots")?
            .with_context(|| format!("slot {slot} does not exist"))?;
        Ok(SlotState {
            confirmed: row.get(0),
            sent: row.get(1),
            active_pid: row.get(2),
        })
    }

    async fn confirmed_flush(&self, slot: &str) -> String {
        self.client
            .query_one(
                "SELECT COALESCE(confirmed_flush_lsn::text, '?') FROM pg_replication_slots
                 WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map(|row| row.get::<_, String>(0))
            .unwrap_or_else(|err| format!("? ({err})"))
    }
}

/// Follows the walsender of a slot: when it had sent everything, and its
/// CPU time at the last sample.
#[derive(Default)]
struct WalsenderWatch {
    sent: Option<Duration>,
    cpu_ticks: Option<u64>,
    pid: Option<u32>,
}

impl WalsenderWatch {
    fn observe(&mut self, state: &SlotState, elapsed: Duration) {
        if state.sent && self.sent.is_none() {
            self.sent = Some(elapsed);
        }
        if let Some(pid) = state.active_pid
            && let Ok(ticks) = cpu_ticks(pid.unsigned_abs())
        {
            self.cpu_ticks = Some(ticks);
            self.pid = Some(pid.unsigned_abs());
        }
    }
}

async fn drain_tributary(
    pg: &Postgres,
    monitor: &Monitor,
    slot: &str,
    clk_tck: f64,
) -> Result<Drain> {
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-")
        .tempdir()?;
    let config = dir.path().join("tributary.toml");
    let state = dir.path().join("state");
    let listen = format!("127.0.0.1:{}", free_port()?);
    let text = tributary_config(&pg.url(DEFAULT_DATABASE), slot, &state, &listen)?;
    std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;

    let machine_before = machine_busy_ticks()?;
    let started = Instant::now();
    let mut process = TributaryProcess::run(&config, &[])?;
    let pid = process.pid();
    let mut walsender = WalsenderWatch::default();
    let (cpu, hwm, switches, machine) = loop {
        let state = monitor.slot(slot).await?;
        let elapsed = started.elapsed();
        walsender.observe(&state, elapsed);
        if state.confirmed {
            // Read the figures before anything else happens to the process.
            let cpu = cpu_ticks(pid)?;
            let hwm = peak_rss_kib(pid)?;
            let switches = context_switches(pid)?;
            let machine = machine_busy_ticks()? - machine_before;
            break (cpu, hwm, switches, machine);
        }
        if let Some(status) = process.try_exit()? {
            bail!(
                "tributary exited ({status}) before draining slot {slot}\n{}",
                process.logs()
            );
        }
        if elapsed > monitor.timeout {
            let at = monitor.confirmed_flush(slot).await;
            bail!(
                "tributary did not drain slot {slot} within {:?}: confirmed_flush_lsn {at}, \
                 end LSN {}\n{}",
                monitor.timeout,
                monitor.end_lsn,
                process.logs()
            );
        }
        tokio::time::sleep(monitor.interval).await;
    };
    let wall = started.elapsed();

    let stopping = Instant::now();
    process.sigterm()?;
    let status = process.wait_exit(Duration::from_secs(60)).await?;
    let shutdown = stopping.elapsed();
    if !status.success() {
        eprintln!(
            "tributary-bench: WARNING: tributary exited with {status} after SIGTERM\n{}",
            process.logs()
        );
    } else if !process.stderr().trim().is_empty() {
        eprintln!(
            "tributary-bench: tributary wrote to stderr:\n{}",
            process.stderr()
        );
    }
    Ok(Drain {
        tool: Tool::Tributary,
        wall,
        sent: walsender.sent,
        cpu_secs: cpu as f64 / clk_tck,
        peak_rss_kib: hwm,
        context_switches: switches,
        walsender_cpu_secs: walsender.cpu_ticks.map(|t| t as f64 / clk_tck),
        walsender_pid: walsender.pid,
        machine_busy_secs: machine as f64 / clk_tck,
        shutdown: Some(shutdown),
        clean_exit: status.success(),
    })
}

/// The config of issue 2: postgres source on `slot`, null sink, warn-level
/// JSON logs.
fn tributary_config(url: &str, slot: &str, state: &Path, listen: &str) -> Result<String> {
    use toml::{Table, Value};
    let state = state.to_str().context("temporary directory is not UTF-8")?;
    let mut source = Table::new();
    source.insert("kind".into(), "postgres".into());
    source.insert("name".into(), "bench".into());
    source.insert("url".into(), url.into());
    source.insert("tables".into(), Value::Array(vec![TABLE.into()]));
    source.insert("snapshot".into(), "never".into());
    let mut postgres = Table::new();
    postgres.insert("slot".into(), slot.into());
    postgres.insert("publication".into(), PUBLICATION.into());
    source.insert("postgres".into(), Value::Table(postgres));
    let mut config = Table::new();
    config.insert("source".into(), Value::Table(source));
    config.insert("sink".into(), Value::Table(one("kind", "null")));
    config.insert("state".into(), Value::Table(one("dir", state)));
    config.insert("http".into(), Value::Table(one("listen", listen)));
    let mut log = one("format", "json");
    log.insert("level".into(), "warn".into());
    config.insert("log".into(), Value::Table(log));
    Ok(toml::to_string(&config)?)
}

fn one(key: &str, value: &str) -> toml::Table {
    let mut table = toml::Table::new();
    table.insert(key.into(), value.into());
    table
}

async fn drain_recvlogical(
    monitor: &Monitor,
    slot: &str,
    recvlogical: &Path,
    clk_tck: f64,
) -> Result<Drain> {
    let dir = tempfile::Builder::new()
        .prefix("tributary-bench-recv-")
        .tempdir()?;
    let time_out = dir.path().join("time.txt");
    let stderr = dir.path().join("stderr.txt");
    let port = monitor.port.to_string();
    let mut command = tokio::process::Command::new(GNU_TIME);
    command
        .arg("-f")
        .arg("%U %S %M %w %c")
        .arg("-o")
        .arg(&time_out)
        .arg(recvlogical)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            USER,
            "-d",
            DEFAULT_DATABASE,
        ])
        .args(["--slot", slot, "--start", "-P", "pgoutput"])
        .args(["-o", "proto_version=1", "-o"])
        .arg(format!("publication_names={PUBLICATION}"))
        .args(["--endpos", &monitor.end_lsn, "-f", "/dev/null", "--no-loop"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr)?)
        .kill_on_drop(true);

    let machine_before = machine_busy_ticks()?;
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("spawning {GNU_TIME} {}", recvlogical.display()))?;
    let mut walsender = WalsenderWatch::default();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tokio::time::sleep(monitor.interval) => {
                let state = monitor.slot(slot).await?;
                walsender.observe(&state, started.elapsed());
                if started.elapsed() > monitor.timeout {
                    child.start_kill().ok();
                    bail!("pg_recvlogical did not drain slot {slot} within {:?}", monitor.timeout);
                }
            }
        }
    };
    let wall = started.elapsed();
    let machine = machine_busy_ticks()? - machine_before;
    if !status.success() {
        bail!(
            "pg_recvlogical failed ({status}): {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
    }
    let state = monitor.slot(slot).await?;
    if !state.confirmed {
        let at = monitor.confirmed_flush(slot).await;
        bail!(
            "pg_recvlogical exited but slot {slot} is at {at}, before the end LSN {}",
            monitor.end_lsn
        );
    }
    let timing = std::fs::read_to_string(&time_out)
        .with_context(|| format!("reading {}", time_out.display()))?;
    let timing = parse_gnu_time(&timing)?;
    Ok(Drain {
        tool: Tool::Recvlogical,
        wall,
        sent: walsender.sent,
        cpu_secs: timing.cpu_secs,
        peak_rss_kib: timing.peak_rss_kib,
        context_switches: timing.context_switches,
        walsender_cpu_secs: walsender.cpu_ticks.map(|t| t as f64 / clk_tck),
        walsender_pid: walsender.pid,
        machine_busy_secs: machine as f64 / clk_tck,
        shutdown: None,
        clean_exit: true,
    })
}

/// What GNU time reported about `pg_recvlogical`.
#[derive(Debug, PartialEq)]
struct GnuTime {
    cpu_secs: f64,
    peak_rss_kib: u64,
    context_switches: u64,
}

/// `%U %S %M %w %c` as written by GNU time: user seconds, system seconds,
/// peak RSS in KiB, voluntary and involuntary context switches. A warning
/// line may come first ("Command exited with ...").
fn parse_gnu_time(text: &str) -> Result<GnuTime> {
    let line = text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("GNU time wrote nothing")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [user, system, rss, voluntary, involuntary] = fields[..] else {
        bail!("unexpected GNU time output: {text:?}");
    };
    Ok(GnuTime {
        cpu_secs: user.parse::<f64>()? + system.parse::<f64>()?,
        peak_rss_kib: rss.parse()?,
        context_switches: voluntary.parse::<u64>()? + involuntary.parse::<u64>()?,
    })
}

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name is in parentheses and may hold spaces: fields are
    // counted after the last ')'. Field 3 (state) is the first there;
    // utime and stime are fields 14 and 15.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("no field {n} in {path}"))?
            .parse::<u64>()
            .with_context(|| format!("field {n} of {path}"))
    };
    Ok(field(14)? + field(15)?)
}

/// Busy and total CPU time of the whole machine (all cores), in clock
/// ticks, from the first line of `/proc/stat`: `cpu user nice system idle
/// iowait irq softirq steal ...`.
fn machine_ticks() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .context("parsing /proc/stat")?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = values[..] else {
        bail!("short cpu line in /proc/stat: {line}");
    };
    let busy = user + nice + system + irq + softirq + steal;
    Ok((busy, busy + idle + iowait))
}

fn machine_busy_ticks() -> Result<u64> {
    Ok(machine_ticks()?.0)
}

/// Waits until the machine was at least `--wait-idle` percent idle over
/// two seconds, or `--wait-idle-secs` have passed (then warns and goes on).
async fn wait_for_idle(args: &Args) -> Result<()> {
    if args.wait_idle == 0 {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(args.wait_idle_secs);
    let mut announced = false;
    loop {
        let (busy0, total0) = machine_ticks()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (busy1, total1) = machine_ticks()?;
        let total = total1.saturating_sub(total0).max(1);
        let idle = 100.0 - 100.0 * busy1.saturating_sub(busy0) as f64 / total as f64;
        if idle >= f64::from(args.wait_idle) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!(
                "tributary-bench: WARNING: the machine is only {idle:.0}% idle; \
                 running anyway (see the `other CPU s` column)"
            );
            return Ok(());
        }
        if !announced {
            eprintln!(
                "tributary-bench: the machine is {idle:.0}% idle; waiting for >= {}%",
                args.wait_idle
            );
            announced = true;
        }
    }
}

/// Voluntary + involuntary context switches of every live thread of a
/// process (`/proc/<pid>/task/*/status`).
fn context_switches(pid: u32) -> Result<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0;
    for task in std::fs::read_dir(&dir).with_context(|| format!("reading {dir}"))? {
        // A thread that ended in between has nothing to add.
        let Ok(text) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += text
            .lines()
            .filter_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|value| value.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(total)
}

/// `VmHWM` of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmHWM in {path}"))
}

/// `getconf CLK_TCK`, the unit of `/proc/<pid>/stat` CPU times (100 on
/// Linux unless the kernel says otherwise).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

fn find_recvlogical(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("--pg-recvlogical {} does not exist", path.display());
    }
    RECVLOGICAL_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .context("pg_recvlogical not found (apt-get install postgresql-client-15)")
}

fn nproc() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn secs(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".into(), |d| format!("{:.3}", d.as_secs_f64()))
}

/// The Markdown table of every drain, the medians and the verdict.
fn render_report(results: &[(Drain, Option<Drain>)], backlog: &Backlog, args: &Args) -> String {
    let million_rows = backlog.rows as f64 / 1e6;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Backlog: {} rows (6 columns) in {} transactions, {:.1} MiB of WAL; poll every {} ms",
        backlog.rows,
        args.transactions,
        backlog.wal_bytes as f64 / (1024.0 * 1024.0),
        args.poll_ms
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| run | client | wall s | rows/s | walsender done s | CPU s | CPU s / M rows | peak RSS MiB | ctx switches | walsender CPU s | other CPU s | SIGTERM->exit s | wall ratio trib/recv |"
    );
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut ratios = Vec::new();
    let mut trib_cpu = Vec::new();
    let mut trib_wall = Vec::new();
    let mut recv_wall = Vec::new();
    let mut trib_sent_ratios = Vec::new();
    let mut unclean = 0;
    for (i, (trib, recv)) in results.iter().enumerate() {
        let ratio = recv
            .as_ref()
            .map(|recv| trib.wall.as_secs_f64() / recv.wall.as_secs_f64());
        if let (Some(sent), Some(recv)) = (trib.sent, recv) {
            trib_sent_ratios.push(sent.as_secs_f64() / recv.wall.as_secs_f64());
        }
        if let Some(ratio) = ratio {
            ratios.push(ratio);
        }
        trib_cpu.push(trib.cpu_secs / million_rows);
        trib_wall.push(trib.wall.as_secs_f64());
        if let Some(recv) = recv {
            recv_wall.push(recv.wall.as_secs_f64());
        }
        if !trib.clean_exit {
            unclean += 1;
        }
        // Print in the order they ran.
        let mut drains = vec![trib];
        if let Some(recv) = recv {
            if i % 2 == 0 {
                drains.push(recv);
            } else {
                drains.insert(0, recv);
            }
        }
        for drain in drains {
            let wall = drain.wall.as_secs_f64();
            let _ = writeln!(
                out,
                "| {} | {} | {:.3} | {:.0} | {} | {:.2} | {:.2} | {:.1} | {} | {} | {:.2} | {} | {} |",
                i + 1,
                drain.tool.label(),
                wall,
                backlog.rows as f64 / wall,
                secs(drain.sent),
                drain.cpu_secs,
                drain.cpu_secs / million_rows,
                drain.peak_rss_kib as f64 / 1024.0,
                drain.context_switches,
                drain
                    .walsender_cpu_secs
                    .map_or_else(|| "-".into(), |s| format!("{s:.2}")),
                other_cpu(drain),
                secs(drain.shutdown),
                match (drain.tool, ratio) {
                    (Tool::Tributary, Some(ratio)) => format!("{ratio:.3}"),
                    _ => String::new(),
                },
            );
        }
    }
    let _ = writeln!(out);
    let cpu = median(&mut trib_cpu);
    let _ = writeln!(
        out,
        "Median wall: tributary {:.3} s{}",
        median(&mut trib_wall),
        if recv_wall.is_empty() {
            String::new()
        } else {
            format!(", pg_recvlogical {:.3} s", median(&mut recv_wall))
        }
    );
    if !ratios.is_empty() {
        let ratio = median(&mut ratios);
        let _ = writeln!(
            out,
            "Median wall ratio tributary/pg_recvlogical: {ratio:.3} (target <= {TARGET_WALL_RATIO}): {}",
            verdict(ratio <= TARGET_WALL_RATIO)
        );
        if !trib_sent_ratios.is_empty() {
            let _ = writeln!(
                out,
                "  (walsender-done instant of tributary's drain / pg_recvlogical's wall, median: {:.3})",
                median(&mut trib_sent_ratios)
            );
        }
    }
    let _ = writeln!(
        out,
        "Median tributary CPU: {cpu:.2} CPU-s per million rows (target <= {TARGET_CPU_PER_MILLION}): {}",
        verdict(cpu <= TARGET_CPU_PER_MILLION)
    );
    if unclean > 0 {
        let _ = writeln!(
            out,
            "WARNING: tributary did not exit 0 after SIGTERM in {unclean} run(s)"
        );
    } else {
        let _ = writeln!(out, "tributary exited 0 after SIGTERM in every run");
    }
    out
}

/// Busy CPU seconds of the machine during a drain not spent by the client or
/// the walsender: the slot poller, other PostgreSQL processes, and whatever
/// else runs on the machine. Large values mean the drain was disturbed.
fn other_cpu(drain: &Drain) -> f64 {
    (drain.machine_busy_secs - drain.cpu_secs - drain.walsender_cpu_secs.unwrap_or(0.0)).max(0.0)
}

fn verdict(pass: bool) -> &'static str {
    if pass { "PASS" } else { "FAIL" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gnu_time_output() {
        assert_eq!(
            parse_gnu_time("1.25 0.50 8844 120 7\n").unwrap(),
            GnuTime {
                cpu_secs: 1.75,
                peak_rss_kib: 8844,
                context_switches: 127
            }
        );
        let warned = "Command exited with non-zero status 1\n0.01 0.00 4000 1 2\n";
        assert_eq!(parse_gnu_time(warned).unwrap().peak_rss_kib, 4000);
        assert!(parse_gnu_time("").is_err());
        assert!(parse_gnu_time("1.0 2.0 3\n").is_err());
    }

    #[test]
    fn reads_its_own_proc_figures() {
        let pid = std::process::id();
        cpu_ticks(pid).unwrap();
        assert!(peak_rss_kib(pid).unwrap() > 0);
        context_switches(pid).unwrap();
    }

    #[test]
    fn reads_machine_ticks() {
        let (busy, total) = machine_ticks().unwrap();
        assert!(total >= busy && total > 0);
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn config_has_the_issue_keys() {
        let text = tributary_config(
            "postgres://tributary@127.0.0.1:5432/shop",
            "s_tributary_1",
            Path::new("/tmp/x/state"),
            "127.0.0.1:9999",
        )
        .unwrap();
        let config: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(config["source"]["kind"].as_str(), Some("postgres"));
        assert_eq!(config["source"]["tables"][0].as_str(), Some(TABLE));
        assert_eq!(config["source"]["snapshot"].as_str(), Some("never"));
        let pg = &config["source"]["postgres"];
        assert_eq!(pg["slot"].as_str(), Some("s_tributary_1"));
        assert_eq!(pg["publication"].as_str(), Some(PUBLICATION));
        assert_eq!(config["sink"]["kind"].as_str(), Some("null"));
        assert_eq!(config["state"]["dir"].as_str(), Some("/tmp/x/state"));
        assert_eq!(config["http"]["listen"].as_str(), Some("127.0.0.1:9999"));
        assert_eq!(config["log"]["level"].as_str(), Some("warn"));
        assert_eq!(config["log"]["format"].as_str(), Some("json"));
    }
}

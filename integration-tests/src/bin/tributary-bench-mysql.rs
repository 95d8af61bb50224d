//! The MySQL drain benchmark (issue 6): Tributary's MySQL source
//! (`sink.kind = "null"`, envelopes rendered and discarded) against PyPI
//! `mysql-replication` (python-mysql-replication, rows decoded) on the same
//! binlog of a throwaway MariaDB: `--rows` inserts of 6 columns in
//! `--transactions` transactions. Prints rows/s, CPU-seconds per million
//! rows and peak RSS of both. Run it through `scripts/bench-mysql.sh`,
//! which builds the release binary and installs `mysql-replication`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tributary_integration_tests::{MYSQL_PASSWORD, MYSQL_USER, Mariadb};

#[derive(Parser, Debug)]
#[command(about = "Tributary's MySQL source vs python-mysql-replication on one MariaDB binlog")]
struct Args {
    /// Rows inserted (6 columns each).
    #[arg(long, default_value_t = 500_000)]
    rows: u64,
    /// Transactions they are inserted in.
    #[arg(long, default_value_t = 50)]
    transactions: u64,
    /// Runs of each reader over the same binlog.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// A Python with `mysql-replication` installed.
    #[arg(long, default_value = "python3")]
    python: PathBuf,
    /// The `tributary` binary (default: $TRIBUTARY_BIN, else target/release/tributary).
    #[arg(long)]
    tributary: Option<PathBuf>,
}

/// What one run of a reader cost.
#[derive(Debug, Clone, Copy)]
struct Run {
    rows: u64,
    wall: Duration,
    cpu_secs: f64,
    peak_rss_kib: u64,
}

impl Run {
    fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.wall.as_secs_f64()
    }
    fn cpu_per_million(&self) -> f64 {
        self.cpu_secs / (self.rows as f64 / 1e6)
    }
}

const PYTHON_READER: &str = r#"
import resource, sys, time
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.row_event import WriteRowsEvent
port, user, password, log_file, log_pos, target = sys.argv[1:7]
target = int(target)
stream = BinLogStreamReader(
    connection_settings={"host": "127.0.0.1", "port": int(port), "user": user, "passwd": password},
    server_id=5499, log_file=log_file, log_pos=int(log_pos), resume_stream=True,
    blocking=True, only_events=[WriteRowsEvent], is_mariadb=True)
rows = 0
started = time.monotonic()
for event in stream:
    for row in event.rows:
        values = row["values"]
        rows += 1
    if rows >= target:
        break
wall = time.monotonic() - started
stream.close()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(rows, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
"#;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tributary = args
        .tributary
        .clone()
        .or_else(|| std::env::var_os("TRIBUTARY_BIN").map(PathBuf::from))
        .unwrap_or_else(|| {
            tributary_integration_tests::repo_root().join("target/release/tributary")
        });
    if !tributary.exists() {
        bail!(
            "{} not found: build it with cargo build --release",
            tributary.display()
        );
    }
    let db = Mariadb::start().await?;
    db.execute(
        "CREATE TABLE bench (id BIGINT PRIMARY KEY, a INT NOT NULL, b VARCHAR(32) NOT NULL, \
         c DOUBLE NOT NULL, d DATETIME(6) NOT NULL, e DECIMAL(12,2) NOT NULL)",
    )
    .await?;
    let (file, start) = db.binlog_position().await?;
    let per_tx = args.rows / args.transactions.max(1);
    let loading = Instant::now();
    for t in 0..args.transactions {
        db.execute(&format!(
            "INSERT INTO bench SELECT seq + {offset}, seq % 1000, CONCAT('customer-', seq), \
             seq * 1.5, '2026-11-23 05:21:05.123456' + INTERVAL seq SECOND, seq / 100 \
             FROM seq_1_to_{per_tx}",
            offset = t * per_tx
        ))
        .await?;
    }
    let (end_file, end) = db.binlog_position().await?;
    if end_file != file {
        bail!("the backlog spans binlog files {file}..{end_file}: lower --rows");
    }
    let rows = per_tx * args.transactions;
    eprintln!(
        "backlog: {rows} rows in {} transactions, {file} {start}..{end} ({:.1} MB), loaded in {:.1?}",
        args.transactions,
        (end - start) as f64 / 1e6,
        loading.elapsed()
    );

    let work = tempfile::tempdir()?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for round in 0..args.repeat {
        let run =
            run_tributary(&tributary, &db, work.path(), round, &file, start, end, rows).await?;
        eprintln!("tributary round {round}: {run:?}");
        ours.push(run);
        let run = run_python(&args.python, &db, work.path(), &file, start, rows).await?;
        eprintln!("mysql-replication round {round}: {run:?}");
        theirs.push(run);
    }
    report(&ours, &theirs, rows, args.transactions);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn run_tributary(
    bin: &Path,
    db: &Mariadb,
    work: &Path,
    round: u32,
    file: &str,
    start: u64,
    end: u64,
    rows: u64,
) -> Result<Run> {
    let dir = work.join(format!("tributary-{round}"));
    let state = dir.join("state");
    std::fs::create_dir_all(&state)?;
    let offset = state.join("bench.mysql-offset");
    std::fs::write(&offset, format!("file={file}\npos={start}\n"))?;
    let config = dir.join("tributary.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nkind = \"mysql\"\nname = \"bench\"\nurl = \"{url}\"\ntables = [\"shop.*\"]\n\
             snapshot = \"never\"\n[source.mysql]\nserver_id = {id}\n[sink]\nkind = \"null\"\n\
             [state]\ndir = \"{state}\"\n[log]\nlevel = \"warn\"\n",
            url = db.url(),
            id = 5400 + round,
            state = state.display()
        ),
    )?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(bin)
        .args(["run", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting tributary")?;
    let pid = child.id().context("tributary has no pid")?;
    let wanted = format!("pos={end}\n");
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let text = std::fs::read_to_string(&offset).unwrap_or_default();
        if text.contains(&wanted) {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!("tributary exited ({status}) before draining the backlog");
        }
        if Instant::now() > deadline {
            bail!("tributary did not drain the backlog within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    let (cpu_secs, peak_rss_kib) = proc_usage(pid)?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    Ok(Run {
        rows,
        wall,
        cpu_secs,
        peak_rss_kib,
    })
}

async fn run_python(
    python: &Path,
    db: &Mariadb,
    work: &Path,
    file: &str,
    start: u64,
    rows: u64,
) -> Result<Run> {
    let script = work.join("read_binlog.py");
    std::fs::write(&script, PYTHON_READER)?;
    let output = tokio::process::Command::new(python)
        .arg(&script)
        .arg(db.port().to_string())
        .args([MYSQL_USER, MYSQL_PASSWORD, file])
        .arg(start.to_string())
        .arg(rows.to_string())
        .output()
        .await
        .context("running python-mysql-replication")?;
    if !output.status.success() {
        bail!(
            "python-mysql-replication failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8(output.stdout)?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [count, wall, cpu, rss] = fields[..] else {
        bail!("unexpected output from the python reader: {text}");
    };
    Ok(Run {
        rows: count.parse()?,
        wall: Duration::from_secs_f64(wall.parse()?),
        cpu_secs: cpu.parse()?,
        peak_rss_kib: rss.parse()?,
    })
}

/// CPU seconds (user + system) and peak RSS of a running process.
fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("malformed /proc stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime), counted after the name.
    let ticks: u64 = fields.get(11).context("utime")?.parse::<u64>()?
        + fields.get(12).context("stime")?.parse::<u64>()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    Ok((ticks as f64 / hz, rss))
}

fn report(ours: &[Run], theirs: &[Run], rows: u64, transactions: u64) {
    let median = |runs: &[Run], f: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let line = |name: &str, runs: &[Run]| {
        let all: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.0}", r.rows_per_sec()))
            .collect();
        println!(
            "| {name} | {:.0} ({}) | {:.2} | {:.0} |",
            median(runs, Run::rows_per_sec),
            all.join(", "),
            median(runs, Run::cpu_per_million),
            median(runs, |r| r.peak_rss_kib as f64) / 1024.0,
        );
    };
    println!(
        "{rows} rows, {transactions} transactions, 6 columns; median of {} runs",
        ours.len()
    );
    println!("| reader | rows/s median (runs) | CPU-s per million rows | peak RSS MiB |");
    println!("|---|---|---|---|");
    line("tributary (null sink, envelopes rendered)", ours);
    line("python-mysql-replication (rows decoded)", theirs);
    println!(
        "ratio (median rows/s): {:.1}x",
        median(ours, Run::rows_per_sec) / median(theirs, Run::rows_per_sec)
    );
}

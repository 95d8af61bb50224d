//! The snapshot benchmark (issue 8): `tributary run` with `snapshot =
//! "only"` and `sink.kind = "null"` (envelopes rendered, then discarded)
//! copying a `--rows`-row, 6-column table, against the native client's
//! copy of the same table in the same run: `psql -c "\copy bench to
//! /dev/null"` (PostgreSQL) and `mariadb -e "select * from bench" >
//! /dev/null` (MariaDB). Every command runs under `/usr/bin/time`, which
//! gives its wall time, CPU seconds and peak RSS; the table prints rows/s,
//! rows/s per CPU-second of the client and peak RSS. Run it through
//! `scripts/bench-snapshot.sh`, which builds the release binary; results
//! and how to read them: docs/benchmarks.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use tributary_integration_tests::{
    DEFAULT_DATABASE, MYSQL_PASSWORD, MYSQL_USER, Mariadb, Postgres, free_port,
};

#[derive(Parser, Debug)]
#[command(about = "Tributary's snapshot vs the native client's copy of one table")]
struct Args {
    /// Rows in the table (6 columns each).
    #[arg(long, default_value_t = 5_000_000)]
    rows: u64,
    /// Runs of each reader.
    #[arg(long, default_value_t = 3)]
    repeat: u32,
    /// `source.snapshot_parallelism` values to run Tributary with.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    parallelism: Vec<usize>,
    /// `source.snapshot_chunk_rows` of Tributary's runs (default: the
    /// config's default, 10,000).
    #[arg(long)]
    chunk_rows: Option<usize>,
    /// Skip MariaDB (PostgreSQL only).
    #[arg(long)]
    no_mysql: bool,
    /// The `tributary` binary (default: $TRIBUTARY_BIN, else target/debug/tributary:
    /// pass the release build for figures).
    #[arg(long)]
    tributary: Option<PathBuf>,
    /// A second `tributary` binary (e.g. the build before a change) run
    /// the same way right after each of `--tributary`'s runs, reported as
    /// `tributary (baseline) ...`: a before/after under the same load.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// What one copy cost, as `/usr/bin/time` measured it.
#[derive(Debug, Clone)]
struct Run {
    reader: String,
    rows: u64,
    wall_secs: f64,
    cpu_secs: f64,
    peak_rss_kib: u64,
    /// The machine's 1-minute load average when the run ended (other
    /// work shares these cores).
    load: f64,
}

impl Run {
    fn rows_per_sec(&self) -> f64 {
        self.rows as f64 / self.wall_secs.max(0.001)
    }

    fn rows_per_cpu_sec(&self) -> f64 {
        self.rows as f64 / self.cpu_secs.max(0.001)
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin = match &args.tributary {
        Some(bin) => bin.clone(),
        None => tributary_integration_tests::tributary_bin()?,
    };
    let chunk_rows = args
        .chunk_rows
        .map(|rows| format!("snapshot_chunk_rows = {rows}\n"))
        .unwrap_or_default();
    let work = tempfile::tempdir()?;
    let pg = Postgres::start().await?;
    load_postgres(&pg, args.rows).await?;
    let binaries = binaries(&bin, args.baseline.as_deref());
    let mut runs = Vec::new();
    for round in 0..args.repeat {
        runs.push(psql_copy(&pg, work.path(), args.rows)?);
        for &parallelism in &args.parallelism {
            for (label, bin) in &binaries {
                let config = snapshot_config(
                    work.path(),
                    &format!("pg-{round}-{parallelism}{label}"),
                    ("postgres", &pg.url(DEFAULT_DATABASE), "public.bench"),
                    &format!("snapshot_parallelism = {parallelism}\n{chunk_rows}"),
                )?;
                let name = format!("tributary{label} postgres, {parallelism} reader(s)");
                runs.push(tributary_copy(bin, &config, &name, args.rows)?);
            }
        }
    }
    report("PostgreSQL", args.rows, &runs);
    drop(pg);
    if !args.no_mysql {
        let db = Mariadb::start().await?;
        load_mariadb(&db, args.rows).await?;
        let mut runs = Vec::new();
        for round in 0..args.repeat {
            runs.push(mariadb_select(&db, work.path(), args.rows)?);
            for (at, (label, bin)) in binaries.iter().enumerate() {
                let config = snapshot_config(
                    work.path(),
                    &format!("mariadb-{round}{label}"),
                    ("mysql", &db.url(), "shop.bench"),
                    &format!(
                        "{chunk_rows}[source.mysql]\nserver_id = {}\n",
                        5500 + 10 * round + at as u32
                    ),
                )?;
                let name = format!("tributary{label} mariadb, 1 reader");
                runs.push(tributary_copy(bin, &config, &name, args.rows)?);
            }
        }
        report("MariaDB", args.rows, &runs);
    }
    Ok(())
}

/// The binaries to run, each with the label its rows carry: `tributary`
/// (no label), then the baseline, if any.
fn binaries<'a>(bin: &'a Path, baseline: Option<&'a Path>) -> Vec<(&'static str, &'a Path)> {
    let mut binaries = vec![("", bin)];
    binaries.extend(baseline.map(|b| (" (baseline)", b)));
    binaries
}

/// Fills `public.bench` in transactions of a million rows, then `VACUUM
/// ANALYZE` (statistics for the key ranges, all pages visible).
async fn load_postgres(pg: &Postgres, rows: u64) -> Result<()> {
    pg.execute(
        "CREATE TABLE bench (id bigint PRIMARY KEY, a int NOT NULL, b text NOT NULL, \
         c numeric(12,2) NOT NULL, d timestamptz NOT NULL, e boolean NOT NULL)",
    )
    .await?;
    let started = std::time::Instant::now();
    for from in (1..=rows).step_by(1_000_000) {
        let to = (from + 999_999).min(rows);
        pg.execute(&format!(
            "INSERT INTO bench SELECT g, g % 1000, 'customer-' || g, g * 1.25, \
             TIMESTAMPTZ '2026-01-01' + g * INTERVAL '1 second', g % 2 = 0 \
             FROM generate_series({from}, {to}) g"
        ))
        .await?;
    }
    pg.execute("VACUUM ANALYZE bench").await?;
    eprintln!("postgres: {rows} rows loaded in {:.1?}", started.elapsed());
    Ok(())
}

/// Fills `shop.bench` with the same values, then `ANALYZE TABLE`.
async fn load_mariadb(db: &Mariadb, rows: u64) -> Result<()> {
    db.execute(
        "CREATE TABLE bench (id BIGINT PRIMARY KEY, a INT NOT NULL, b VARCHAR(32) NOT NULL, \
         c DECIMAL(12,2) NOT NULL, d DATETIME(6) NOT NULL, e BOOLEAN NOT NULL)",
    )
    .await?;
    let started = std::time::Instant::now();
    for from in (1..=rows).step_by(1_000_000) {
        let count = (rows - from + 1).min(1_000_000);
        db.execute(&format!(
            "INSERT INTO bench SELECT seq + {offset}, seq % 1000, CONCAT('customer-', seq), \
             seq * 1.25, '2026-01-01' + INTERVAL seq SECOND, seq % 2 = 0 FROM seq_1_to_{count}",
            offset = from - 1
        ))
        .await?;
    }
    db.execute("ANALYZE TABLE bench").await?;
    eprintln!("mariadb: {rows} rows loaded in {:.1?}", started.elapsed());
    Ok(())
}

/// `psql -c "\copy bench to /dev/null"`.
fn psql_copy(pg: &Postgres, work: &Path, rows: u64) -> Result<Run> {
    let mut cmd = Command::new("psql");
    cmd.arg(pg.url(DEFAULT_DATABASE))
        .args(["-X", "-q", "-c", "\\copy bench to /dev/null"]);
    timed(&cmd, Stdio::null(), work, "psql \\copy to /dev/null", rows)
}

/// `mariadb -e "select * from bench" > /dev/null`.
fn mariadb_select(db: &Mariadb, work: &Path, rows: u64) -> Result<Run> {
    let mut cmd = Command::new("mariadb");
    cmd.args(["-h", "127.0.0.1", "-P", &db.port().to_string()])
        .args([
            "-u",
            MYSQL_USER,
            &format!("-p{MYSQL_PASSWORD}"),
            DEFAULT_DATABASE,
        ])
        .args(["-e", "select * from bench"]);
    timed(
        &cmd,
        Stdio::null(),
        work,
        "mariadb -e \"select * from bench\"",
        rows,
    )
}

/// `tributary run -c config` (a snapshot-only copy that exits 0); checks
/// that the null sink received exactly `rows` records.
fn tributary_copy(bin: &Path, config: &Path, name: &str, rows: u64) -> Result<Run> {
    let logs = config.with_extension("log");
    let mut cmd = Command::new(bin);
    cmd.args(["run", "-c"]).arg(config);
    let work = config.parent().unwrap_or(Path::new("."));
    let run = timed(&cmd, std::fs::File::create(&logs)?.into(), work, name, rows)?;
    let text = std::fs::read_to_string(&logs)?;
    let discarded = text
        .lines()
        .filter(|l| l.contains("null sink discarded records"))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["records"].as_u64());
    ensure!(
        discarded == Some(rows),
        "{name}: the null sink got {discarded:?} records for {rows} rows:\n{text}"
    );
    Ok(run)
}

/// Runs `cmd` under `/usr/bin/time` (stdout discarded, stderr going to
/// `stderr`) and reads what it measured.
fn timed(cmd: &Command, stderr: Stdio, work: &Path, reader: &str, rows: u64) -> Result<Run> {
    let measured = work.join("time.out");
    let status = Command::new("/usr/bin/time")
        .args(["-f", "%e %U %S %M", "-o"])
        .arg(&measured)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(Stdio::null())
        .stderr(stderr)
        .status()
        .with_context(|| format!("running {reader} under /usr/bin/time"))?;
    if !status.success() {
        bail!("{reader} failed: {status}");
    }
    let text = std::fs::read_to_string(&measured)?;
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [wall, user, system, rss] = fields[fields.len().saturating_sub(4)..] else {
        bail!("unexpected /usr/bin/time output: {text}");
    };
    let run = Run {
        reader: reader.to_owned(),
        rows,
        wall_secs: wall.parse()?,
        cpu_secs: user.parse::<f64>()? + system.parse::<f64>()?,
        peak_rss_kib: rss.parse()?,
        load: std::fs::read_to_string("/proc/loadavg")?
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0),
    };
    eprintln!("{run:?}");
    Ok(run)
}

/// A snapshot-only config of source `kind` at `url` copying `table`, with
/// `extra` lines of `[source]` (and after).
fn snapshot_config(
    work: &Path,
    name: &str,
    (kind, url, table): (&str, &str, &str),
    extra: &str,
) -> Result<PathBuf> {
    write_run_config(
        work,
        name,
        &format!(
            "[source]\nkind = \"{kind}\"\nname = \"bench\"\nurl = \"{url}\"\n\
             tables = [\"{table}\"]\nsnapshot = \"only\"\n{extra}"
        ),
    )
}

/// Writes `source` plus the null sink, a state dir, a free HTTP port and
/// JSON logs into `work/name.toml`.
fn write_run_config(work: &Path, name: &str, source: &str) -> Result<PathBuf> {
    let state = work.join(format!("{name}-state"));
    std::fs::create_dir_all(&state)?;
    let path = work.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{source}[sink]\nkind = \"null\"\n[state]\ndir = \"{}\"\n\
             [http]\nlisten = \"127.0.0.1:{}\"\n[log]\nformat = \"json\"\nlevel = \"info\"\n",
            state.display(),
            free_port()?
        ),
    )
    .context("writing the benchmark config")?;
    Ok(path)
}

/// Prints one markdown table of `runs`, medians per reader.
fn report(server: &str, rows: u64, runs: &[Run]) {
    let mut readers: Vec<&str> = runs.iter().map(|r| r.reader.as_str()).collect();
    readers.dedup();
    readers.sort();
    readers.dedup();
    let median = |reader: &str, f: fn(&Run) -> f64| {
        let mut values: Vec<f64> = runs.iter().filter(|r| r.reader == reader).map(f).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(0.0)
    };
    let native = readers
        .iter()
        .find(|r| !r.starts_with("tributary"))
        .map_or(0.0, |r| median(r, Run::rows_per_sec));
    println!("\n{server}: {rows} rows, 6 columns; medians");
    println!(
        "| reader | wall s | rows/s | x native | CPU s | rows/s per CPU-s | peak RSS MiB | load avg | runs rows/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for reader in readers {
        let all: Vec<String> = runs
            .iter()
            .filter(|r| r.reader == reader)
            .map(|r| format!("{:.0}", r.rows_per_sec()))
            .collect();
        let per_sec = median(reader, Run::rows_per_sec);
        println!(
            "| {reader} | {:.2} | {per_sec:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} | {} |",
            median(reader, |r| r.wall_secs),
            per_sec / native.max(1.0),
            median(reader, |r| r.cpu_secs),
            median(reader, Run::rows_per_cpu_sec),
            median(reader, |r| r.peak_rss_kib as f64) / 1024.0,
            median(reader, |r| r.load),
            all.join(", ")
        );
    }
}

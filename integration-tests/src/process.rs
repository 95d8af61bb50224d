//! The `tributary` binary under test: finding (or building) it, and running
//! it as a child process whose output is kept in files, so that a test can
//! kill it like an operator or a crash would and still show its logs.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};

use crate::postgres::{DEFAULT_DATABASE, Postgres};
use crate::{file_tail, repo_root};

/// The `tributary` binary the tests run.
///
/// `TRIBUTARY_BIN` if set (it must exist; a relative path is tried in the
/// current directory, then in the repository root); otherwise
/// `<target>/debug/tributary`, where `<target>` is `CARGO_TARGET_DIR` or the
/// repository's `target/`. When that file is missing it runs
/// `cargo build --bin tributary` once per process. An existing binary is used
/// as it is, even if older than the sources: build it before the tests
/// (`scripts/test.sh` does). Under `cargo test` (not nextest) cargo holds the
/// build lock while tests run, so the fallback build would wait for it.
pub fn tributary_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|err| format!("{err:#}")))
        .clone()
        .map_err(|err| anyhow!(err))
}

fn locate_or_build() -> Result<PathBuf> {
    let root = repo_root();
    if let Some(bin) = std::env::var_os("TRIBUTARY_BIN") {
        let bin = PathBuf::from(bin);
        // `cargo test` runs tests in the crate's directory, not where the
        // variable was typed: a relative path may mean the repository root.
        let found = [bin.clone(), root.join(&bin)]
            .into_iter()
            .find(|candidate| candidate.is_file());
        return found.with_context(|| {
            format!(
                "TRIBUTARY_BIN={} does not exist (relative to the current directory or {})",
                bin.display(),
                root.display()
            )
        });
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug/tributary");
    if bin.is_file() {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "{} is missing: running `cargo build --bin tributary`",
        bin.display()
    );
    let status = std::process::Command::new(cargo)
        .args(["build", "--bin", "tributary"])
        .current_dir(&root)
        .status()
        .context("running `cargo build --bin tributary`")?;
    if !status.success() || !bin.is_file() {
        bail!("`cargo build --bin tributary` failed ({status})");
    }
    Ok(bin)
}

/// Environment every [`TributaryProcess`] gets before its own: static
/// credentials that kinesalite accepts, and no instance-metadata lookups, so
/// a test never picks up (or waits for) real AWS credentials.
pub const EMULATOR_AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// AWS variables removed from a [`TributaryProcess`]'s inherited
/// environment (a test can set them again through its own `env`).
const CLEARED_AWS_ENV: [&str; 3] = [
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
];

/// A running `tributary` process with its stdout and stderr written to files
/// in a temporary directory.
///
/// Dropping it kills the process (SIGKILL); if the thread is panicking (a
/// failed assertion), its output is printed first, so a failed test shows
/// what the binary said.
pub struct TributaryProcess {
    child: Child,
    pid: u32,
    logs: TempDir,
    exit: Option<ExitStatus>,
}

impl TributaryProcess {
    /// Runs `tributary run -c <config>` in the config file's directory, with
    /// the extra environment variables `env` (e.g.
    /// `("TRIBUTARY__SINK__STREAM", "other")`).
    pub fn run(config: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let dir = config
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let args = [OsStr::new("run"), OsStr::new("-c"), config.as_os_str()];
        Self::spawn(&args, env, dir)
    }

    /// Runs `tributary <args>` in directory `cwd` with the extra environment
    /// variables `env`, for subcommands other than `run`.
    ///
    /// The child inherits this process's environment without the variables
    /// that select real AWS credentials (`AWS_PROFILE`, `AWS_SESSION_TOKEN`,
    /// `AWS_WEB_IDENTITY_TOKEN_FILE`), plus [`EMULATOR_AWS_ENV`]; `env` is
    /// applied last and wins.
    pub fn spawn<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)], cwd: &Path) -> Result<Self> {
        let bin = tributary_bin()?;
        let logs = tempfile::Builder::new()
            .prefix("tributary-logs-")
            .tempdir()
            .context("creating a temporary directory for tributary's logs")?;
        let stdout = std::fs::File::create(logs.path().join("stdout.log"))?;
        let stderr = std::fs::File::create(logs.path().join("stderr.log"))?;
        let mut command = Command::new(&bin);
        for name in CLEARED_AWS_ENV {
            command.env_remove(name);
        }
        let child = command
            .args(args)
            .envs(EMULATOR_AWS_ENV)
            .envs(env.iter().copied())
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let pid = child
            .id()
            .context("the child has no pid right after spawn")?;
        Ok(TributaryProcess {
            child,
            pid,
            logs,
            exit: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The directory holding `stdout.log` and `stderr.log`.
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Everything the process wrote to stdout so far.
    pub fn stdout(&self) -> String {
        file_tail(&self.logs.path().join("stdout.log"), usize::MAX)
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        file_tail(&self.logs.path().join("stderr.log"), usize::MAX)
    }

    /// Both outputs so far, stdout first, each under a header line.
    pub fn logs(&self) -> String {
        format!(
            "--- tributary (pid {}) stdout ---\n{}\n--- tributary (pid {}) stderr ---\n{}",
            self.pid,
            self.stdout(),
            self.pid,
            self.stderr()
        )
    }

    /// Sends SIGTERM (graceful shutdown: flush, checkpoint, exit 0). Use
    /// [`TributaryProcess::wait_exit`] to wait for the exit.
    pub fn sigterm(&mut self) -> Result<()> {
        if self.try_exit()?.is_some() {
            bail!("tributary (pid {}) already exited before SIGTERM", self.pid);
        }
        // The child is not reaped yet (try_exit said so), so the pid is
        // still ours and cannot have been reused.
        let pid = i32::try_from(self.pid).context("pid out of range")?;
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .with_context(|| format!("sending SIGTERM to tributary (pid {pid})"))
    }

    /// SIGTERM, then up to `timeout` for the exit, whatever its code (for
    /// stops that are expected to fail); an error with the logs if the
    /// process is still running after `timeout`.
    pub async fn sigterm_and_wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.sigterm()?;
        match self.wait_exit(timeout).await {
            Ok(status) => Ok(status),
            Err(err) => Err(anyhow!("{err:#}\n{}", self.logs())),
        }
    }

    /// Stops the process the way an operator does: SIGTERM, then up to
    /// `timeout` for it to flush, checkpoint and exit. Fails, with the logs,
    /// unless it exits 0: also if it had exited before the signal or is
    /// still running after `timeout`.
    pub async fn stop_gracefully(&mut self, timeout: Duration) -> Result<()> {
        let failure = match self.sigterm() {
            Err(err) => err,
            Ok(()) => match self.wait_exit(timeout).await {
                Ok(status) if status.success() => return Ok(()),
                Ok(status) => anyhow!(
                    "tributary (pid {}) exited with {status} after SIGTERM, expected exit 0",
                    self.pid
                ),
                Err(err) => err,
            },
        };
        Err(anyhow!("{failure:#}\n{}", self.logs()))
    }

    /// Kills the process with SIGKILL, like a crash or an OOM kill, and
    /// waits for it to be gone.
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.child
            .start_kill()
            .with_context(|| format!("sending SIGKILL to tributary (pid {})", self.pid))?;
        let status = self.child.wait().await?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .map_err(|_| {
                anyhow!(
                    "tributary (pid {}) still running after {timeout:?}",
                    self.pid
                )
            })?
            .context("waiting for tributary")?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Waits up to `timeout` for a process that must fail: its exit code
    /// must be `code` and its logs must hold `needle`. Returns its last
    /// log line (the error).
    pub async fn expect_failure(
        &mut self,
        code: i32,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let status = self.wait_exit(timeout).await?;
        let logs = self.logs();
        if status.code() != Some(code) || !logs.contains(needle) {
            bail!("expected exit code {code} and {needle:?}, got {status}\n{logs}");
        }
        Ok(logs.lines().last().unwrap_or_default().to_owned())
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().context("polling tributary")?;
        }
        Ok(self.exit)
    }

    /// Waits until stdout or stderr contains `needle`; fails if the process
    /// exits first or `timeout` passes.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().contains(needle) || self.stderr().contains(needle) {
                return Ok(());
            }
            self.check_still_running(&format!("waiting for {needle:?} in its logs"))?;
            if Instant::now() >= deadline {
                bail!(
                    "tributary logged no {needle:?} within {timeout:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the process streams from Postgres: replication slot
    /// `slot` exists and is active. Fails, with the logs, if the process
    /// exits first or `timeout` passes.
    pub async fn wait_streaming(
        &mut self,
        pg: &Postgres,
        slot: &str,
        timeout: Duration,
    ) -> Result<()> {
        let client = pg.client(DEFAULT_DATABASE).await?;
        let deadline = Instant::now() + timeout;
        loop {
            if pg.slot_is_active(&client, slot).await? {
                return Ok(());
            }
            self.check_still_running(&format!("waiting for slot {slot} to become active"))?;
            if Instant::now() >= deadline {
                bail!(
                    "replication slot {slot} was not active within {timeout:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn check_still_running(&mut self, doing: &str) -> Result<()> {
        match self.try_exit()? {
            Some(status) => bail!("tributary exited ({status}) while {doing}\n{}", self.logs()),
            None => Ok(()),
        }
    }
}

impl Drop for TributaryProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        if self.exit.is_none() {
            let _ = self.child.start_kill();
        }
    }
}

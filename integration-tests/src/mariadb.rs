//! A throwaway MariaDB server writing the row binlog Tributary reads.
//!
//! The source side of the MySQL end-to-end tests: `mariadb-install-db` into
//! a temporary directory, then `mariadbd` on a free loopback port with the
//! binlog flags of PRODUCT.md (`--log-bin --binlog-format=ROW
//! --binlog-row-image=FULL --binlog-row-metadata=FULL`), its own socket and
//! pid file, never the machine's own server. A database [`DEFAULT_DATABASE`]
//! and a user [`MYSQL_USER`] with the replication grants the docs ask a DBA
//! for are created. Dropping the handle kills the server and deletes the
//! directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mysql_async::prelude::Queryable as _;
use mysql_async::{Conn, OptsBuilder};
use tempfile::TempDir;

use crate::file_tail;
use crate::net::{free_port, port_is_free};
use crate::postgres::DEFAULT_DATABASE;

/// The user Tributary connects as (replication grants, not a superuser).
pub const MYSQL_USER: &str = "tributary";
/// Its password.
pub const MYSQL_PASSWORD: &str = "tributary-pw";
/// The server's own `server_id`.
pub const MARIADB_SERVER_ID: u32 = 1;
/// The binlog flags of PRODUCT.md.
pub const ROW_BINLOG_FLAGS: &[&str] = &[
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
];
/// The OS account `mariadbd` runs as when we are root.
const OS_USER: &str = "mysql";
/// How long the server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `mariadbd` in a temporary directory.
pub struct Mariadb {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl Mariadb {
    /// Starts a server with the row binlog flags on a free loopback port.
    pub async fn start() -> Result<Self> {
        Self::start_with(ROW_BINLOG_FLAGS).await
    }

    /// Starts a server with `--log-bin` and the given binlog flags instead
    /// of [`ROW_BINLOG_FLAGS`] (e.g. `--binlog-format=STATEMENT`).
    pub async fn start_with(flags: &[&str]) -> Result<Self> {
        Self::start_as(flags, MARIADB_SERVER_ID, true).await
    }

    /// Starts a second server (`server_id`) that replicates `primary` by
    /// GTID from its first transaction, writing what it applies to its own
    /// binlog (`--log-slave-updates`): the database and the connector's
    /// user arrive through replication. Returns once it has caught up.
    pub async fn start_replica_of(primary: &Mariadb, server_id: u32) -> Result<Self> {
        let mut flags = ROW_BINLOG_FLAGS.to_vec();
        flags.push("--log-slave-updates");
        let replica = Self::start_as(&flags, server_id, false).await?;
        let mut root = replica.root().await?;
        root.query_drop(format!(
            "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = {}, \
             MASTER_USER = '{MYSQL_USER}', MASTER_PASSWORD = '{MYSQL_PASSWORD}', \
             MASTER_USE_GTID = slave_pos; START SLAVE",
            primary.port
        ))
        .await
        .context("starting replication on the replica")?;
        root.disconnect().await?;
        replica.wait_caught_up(primary).await?;
        Ok(replica)
    }

    /// Waits until this replica applied every transaction `primary` has
    /// written to its binlog.
    pub async fn wait_caught_up(&self, primary: &Mariadb) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let want: String = primary
                .root()
                .await?
                .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
                .await?
                .unwrap_or_default();
            let mut root = self.root().await?;
            let have: String = root
                .query_first("SELECT @@GLOBAL.gtid_slave_pos")
                .await?
                .unwrap_or_default();
            if have == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let status: Option<mysql_async::Row> =
                    root.query_first("SHOW SLAVE STATUS").await?;
                let error = status
                    .map(|row| {
                        let io: Option<String> = row.get("Last_IO_Error");
                        let sql: Option<String> = row.get("Last_SQL_Error");
                        format!("io: {io:?}, sql: {sql:?}")
                    })
                    .unwrap_or_default();
                bail!(
                    "the replica is at {have:?}, the primary at {want:?} after 60 s ({error})\n{}",
                    self.log_excerpt()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes this replica a primary (failover): replication stops and is
    /// forgotten; its own writes from now on carry its `server_id`.
    pub async fn promote(&self) -> Result<()> {
        let mut root = self.root().await?;
        root.query_drop("STOP SLAVE; RESET SLAVE ALL").await?;
        root.disconnect().await?;
        Ok(())
    }

    async fn start_as(flags: &[&str], server_id: u32, bootstrap: bool) -> Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            match Self::start_on(port, flags, server_id, bootstrap).await {
                Ok(server) => return Ok(server),
                Err(err) if format!("{err:#}").contains("already in use") => last_error = Some(err),
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    async fn start_on(port: u16, flags: &[&str], server_id: u32, bootstrap: bool) -> Result<Self> {
        if !port_is_free(port) {
            bail!("cannot start mariadb: port {port} on 127.0.0.1 is already in use");
        }
        for tool in ["mariadbd", "mariadb-install-db"] {
            if which(tool).is_none() {
                bail!("{tool} not found: run scripts/install-deps.sh (installs mariadb-server)");
            }
        }
        let dir = tempfile::Builder::new()
            .prefix("tributary-mariadb-")
            .tempdir()
            .context("creating a temporary directory for mariadb")?;
        let as_root = nix::unistd::geteuid().is_root();
        if as_root {
            let user = nix::unistd::User::from_name(OS_USER)?
                .with_context(|| format!("running as root, but there is no `{OS_USER}` account"))?;
            std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .with_context(|| format!("chown {} to {OS_USER}", dir.path().display()))?;
        }
        let user_flag = format!("--user={}", if as_root { OS_USER } else { "" });
        let data = dir.path().join("data");
        install_db(dir.path(), &data, as_root.then_some(user_flag.as_str()))?;
        let p = |name: &str| dir.path().join(name).display().to_string();
        let mut server = Command::new(which("mariadbd").expect("checked above"));
        server
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", p("sock")))
            .arg(format!("--pid-file={}", p("pid")))
            .arg(format!("--log-error={}", p("err.log")))
            .arg(format!("--log-bin={}", p("binlog")))
            .arg(format!("--tmpdir={}", p("tmp")))
            .arg(format!("--server-id={server_id}"))
            .args(["--innodb-buffer-pool-size=32M", "--skip-name-resolve"])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if as_root {
            server.arg(&user_flag);
        }
        let child = server.spawn().context("starting mariadbd")?;
        let mut db = Mariadb {
            dir,
            port,
            child: Some(child),
        };
        db.wait_ready().await?;
        if bootstrap {
            db.create_user_and_database()
                .await
                .with_context(|| db.log_excerpt())?;
        }
        Ok(db)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.root().await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "mariadbd exited ({status}) during start-up\n{}",
                    self.log_excerpt()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "mariadbd did not accept connections within {START_TIMEOUT:?}\n{}",
                    self.log_excerpt()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn create_user_and_database(&self) -> Result<()> {
        let mut root = self.root().await?;
        root.query_drop(format!(
            "CREATE DATABASE {DEFAULT_DATABASE}; \
             CREATE USER '{MYSQL_USER}'@'127.0.0.1' IDENTIFIED BY '{MYSQL_PASSWORD}'; \
             GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT, RELOAD \
             ON *.* TO '{MYSQL_USER}'@'127.0.0.1'"
        ))
        .await
        .context("creating the database and the replication user")?;
        root.disconnect().await?;
        Ok(())
    }

    /// The TCP port (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The connector's URL, password included:
    /// `mysql://tributary:...@127.0.0.1:PORT/shop`.
    pub fn url(&self) -> String {
        format!(
            "mysql://{MYSQL_USER}:{MYSQL_PASSWORD}@127.0.0.1:{}/{DEFAULT_DATABASE}",
            self.port
        )
    }

    /// The server's error log.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("err.log")
    }

    fn log_excerpt(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path().display(),
            file_tail(&self.log_path(), 30)
        )
    }

    /// A root connection over the server's socket, in [`DEFAULT_DATABASE`]
    /// when it exists.
    pub async fn root(&self) -> Result<Conn> {
        let opts = OptsBuilder::default()
            .user(Some("root"))
            .socket(Some(self.dir.path().join("sock").display().to_string()))
            .prefer_socket(true);
        Ok(Conn::new(opts).await?)
    }

    /// Runs `sql` (one or more `;`-separated statements, each its own
    /// transaction unless the text has BEGIN/COMMIT) as root in
    /// [`DEFAULT_DATABASE`].
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let mut conn = self.root().await?;
        conn.query_drop(format!("USE {DEFAULT_DATABASE}")).await?;
        conn.query_drop(sql)
            .await
            .with_context(|| format!("executing SQL on mariadb: {sql}"))?;
        conn.disconnect().await?;
        Ok(())
    }

    /// Runs each statement as its own transaction over one connection.
    pub async fn execute_each(&self, statements: &[&str]) -> Result<()> {
        let mut conn = self.root().await?;
        conn.query_drop(format!("USE {DEFAULT_DATABASE}")).await?;
        for sql in statements {
            conn.query_drop(*sql)
                .await
                .with_context(|| format!("executing SQL on mariadb: {sql}"))?;
        }
        conn.disconnect().await?;
        Ok(())
    }

    /// The current binlog file and position (`SHOW MASTER STATUS`).
    pub async fn binlog_position(&self) -> Result<(String, u64)> {
        let mut conn = self.root().await?;
        let row: mysql_async::Row = conn
            .query_first("SHOW MASTER STATUS")
            .await?
            .context("SHOW MASTER STATUS returned nothing")?;
        Ok((
            row.get(0).context("no File column")?,
            row.get(1).context("no Position column")?,
        ))
    }

    /// Starts a new binlog file and purges every older one. The server
    /// keeps a file until its binlog checkpoint is written (asynchronously
    /// after the rotation), so this retries until the older files are gone.
    pub async fn rotate_and_purge(&self) -> Result<()> {
        let mut conn = self.root().await?;
        let (before, _) = self.binlog_position().await?;
        conn.query_drop("FLUSH BINARY LOGS").await?;
        let (file, _) = self.binlog_position().await?;
        if file == before {
            bail!("FLUSH BINARY LOGS did not start a new binlog (still {file})");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            conn.query_drop(format!("PURGE BINARY LOGS TO '{file}'"))
                .await?;
            let logs: Vec<mysql_async::Row> = conn.query("SHOW BINARY LOGS").await?;
            if logs.len() == 1 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("older binlogs still present after PURGE BINARY LOGS TO '{file}'");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Where the test writes its own data (the server's directory).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `mariadb-install-db` into `data`, with its own temporary directory.
/// Bootstraps running at the same moment (tests in parallel) now and then
/// fail on a system table; a fresh attempt succeeds.
fn install_db(dir: &Path, data: &Path, user_flag: Option<&str>) -> Result<()> {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    if user_flag.is_some() {
        let user = nix::unistd::User::from_name(OS_USER)?
            .with_context(|| format!("no `{OS_USER}` account"))?;
        std::os::unix::fs::chown(&tmp, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    let mut failure = String::new();
    for _ in 0..3 {
        let _ = std::fs::remove_dir_all(data);
        let mut install = Command::new(which("mariadb-install-db").context("mariadb-install-db")?);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if let Some(flag) = user_flag {
            install.arg(flag);
        }
        let output = install.output().context("running mariadb-install-db")?;
        if output.status.success() {
            return Ok(());
        }
        failure = format!(
            "mariadb-install-db failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    bail!(failure)
}

fn which(tool: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.exists())
}

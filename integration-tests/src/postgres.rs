//! A throwaway PostgreSQL 15 cluster, configured for logical replication.
//!
//! The source side of every end-to-end test and of the quickstart: a fresh
//! `initdb` in a temporary directory, `wal_level = logical`, listening on
//! 127.0.0.1 only, with a database owned by a login role that has the
//! REPLICATION attribute (what Tributary's docs ask a DBA to create).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Error, Result, bail};
use tempfile::TempDir;
use tokio_postgres::{Client, NoTls};

use crate::file_tail;
use crate::net::{free_port, port_is_free};

/// The database created in every cluster, and the one [`Postgres::execute`]
/// runs in.
pub const DEFAULT_DATABASE: &str = "shop";
/// The role Tributary connects as: LOGIN, REPLICATION, owner of
/// [`DEFAULT_DATABASE`]. Not a superuser.
pub const USER: &str = "tributary";
/// The bootstrap superuser of the cluster.
pub const SUPERUSER: &str = "postgres";
/// A role that must log in with SCRAM-SHA-256 (see `pg_hba.conf`); the auth
/// tests create it.
pub const SCRAM_USER: &str = "tributary_scram";
/// A role that must log in with an MD5 password; the auth tests create it.
pub const MD5_USER: &str = "tributary_md5";
/// A role that may log in over TLS only (`hostssl` in `pg_hba.conf`), a
/// member of [`USER`]: a cluster started with
/// [`Postgres::start_with_tls`] has it.
pub const TLS_USER: &str = "tributary_tls";
/// A role that must present a client certificate signed by the test CA
/// whose CN is its name (`cert` in `pg_hba.conf`); a cluster started with
/// [`Postgres::start_with_tls`] has it.
pub const CERT_USER: &str = "tributary_cert";

/// Where Debian's PostgreSQL 15 server binaries live. `TRIBUTARY_PG_BIN`
/// overrides it.
const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The OS account that owns the cluster when the harness runs as root
/// (`initdb` refuses to run as root).
const OS_USER: &str = "postgres";
/// How many lines of the server log go into an error message.
const LOG_TAIL_LINES: usize = 30;

/// A running PostgreSQL cluster in a temporary directory.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and deletes the
/// directory.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    bin_dir: PathBuf,
    as_os_user: bool,
    running: bool,
}

impl Postgres {
    /// Starts a cluster on a free loopback port, with the database
    /// [`DEFAULT_DATABASE`] owned by [`USER`], and returns once it accepts
    /// connections.
    pub async fn start() -> Result<Self> {
        const ATTEMPTS: usize = 3;
        let mut last_error = None;
        for _ in 0..ATTEMPTS {
            let port = free_port()?;
            match Self::start_on(port).await {
                Ok(pg) => return Ok(pg),
                // Another process took the port between our probe and the
                // server's bind: try another one.
                Err(err) if format!("{err:#}").contains("already in use") => {
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.expect("at least one attempt was made"))
    }

    /// [`Postgres::start`] with TLS on (`ssl = on`, the server certificate
    /// and key of `certs`) and the role [`TLS_USER`], which may connect
    /// over TLS only. Plain connections of the other roles still work.
    pub async fn start_with_tls(certs: &crate::tls::TestCerts) -> Result<Self> {
        let port = free_port()?;
        Self::start_on_with(port, Some(certs)).await
    }

    /// Starts a cluster on the given loopback port; fails if it is taken.
    pub async fn start_on(port: u16) -> Result<Self> {
        Self::start_on_with(port, None).await
    }

    async fn start_on_with(port: u16, tls: Option<&crate::tls::TestCerts>) -> Result<Self> {
        if !port_is_free(port) {
            bail!("cannot start postgres: port {port} on 127.0.0.1 is already in use");
        }
        let bin_dir = std::env::var_os("TRIBUTARY_PG_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_BIN_DIR));
        if !bin_dir.join("postgres").exists() {
            bail!(
                "no PostgreSQL server binaries in {} (run scripts/install-deps.sh, \
                 or set TRIBUTARY_PG_BIN)",
                bin_dir.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("tributary-pg-")
            .tempdir()
            .context("creating a temporary directory for postgres")?;
        let as_os_user = nix::unistd::geteuid().is_root();
        if as_os_user {
            give_to_os_user(dir.path())?;
        }
        let mut pg = Postgres {
            dir,
            port,
            bin_dir,
            as_os_user,
            running: false,
        };
        pg.init_cluster()?;
        if let Some(certs) = tls {
            pg.enable_tls(certs)?;
        }
        pg.pg_ctl_start()?;
        pg.create_user_and_database()
            .await
            .with_context(|| format!("setting up postgres\n{}", pg.log_excerpt()))?;
        if tls.is_some() {
            pg.superuser_client("postgres")
                .await?
                .batch_execute(&format!(
                    "CREATE ROLE {TLS_USER} WITH LOGIN REPLICATION IN ROLE {USER}; \
                     CREATE ROLE {CERT_USER} WITH LOGIN REPLICATION IN ROLE {USER}"
                ))
                .await
                .with_context(|| format!("creating roles {TLS_USER} and {CERT_USER}"))?;
        }
        Ok(pg)
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the data directory, the server log and the
    /// Unix socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path(), lines)
    }

    /// A connection URL for [`USER`] and database `db`, e.g.
    /// `postgres://tributary@127.0.0.1:54329/shop`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection URL for the superuser [`SUPERUSER`] and database `db`.
    pub fn superuser_url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// A client connected as [`USER`] to database `db`; its connection task
    /// runs on the current Tokio runtime.
    pub async fn client(&self, db: &str) -> Result<Client> {
        connect(&self.url(db)).await
    }

    /// A client connected as the superuser to database `db`, for what the
    /// connector's role may not do (terminating backends, `ALTER SYSTEM`).
    pub async fn superuser_client(&self, db: &str) -> Result<Client> {
        connect(&self.superuser_url(db)).await
    }

    /// Runs one or more `;`-separated statements as [`USER`] in
    /// [`DEFAULT_DATABASE`]. Like any simple-query string, several
    /// statements run in one implicit transaction (all or nothing, one
    /// commit) unless the text has its own `BEGIN`/`COMMIT`: call it once
    /// per statement for one transaction each.
    pub async fn execute(&self, sql: &str) -> Result<()> {
        let client = self.client(DEFAULT_DATABASE).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("executing SQL on postgres: {sql}"))
    }

    /// Runs `statements` in order as [`USER`] in [`DEFAULT_DATABASE`], over
    /// one connection, each in its own transaction (one commit each): a
    /// sequence of changes as an application would commit them.
    pub async fn execute_each(&self, statements: &[&str]) -> Result<()> {
        let client = self.client(DEFAULT_DATABASE).await?;
        for sql in statements {
            client
                .batch_execute(sql)
                .await
                .with_context(|| format!("executing SQL on postgres: {sql}"))?;
        }
        Ok(())
    }

    /// Creates another database owned by [`USER`].
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let admin = self.superuser_client("postgres").await?;
        let sql = format!("CREATE DATABASE {} OWNER {USER}", quote_ident(name));
        admin
            .batch_execute(&sql)
            .await
            .with_context(|| format!("creating database {name}"))
    }

    /// Waits until a replication slot named `slot` exists, is created and a
    /// walsender uses it (`pg_replication_slots.active`).
    pub async fn wait_for_active_slot(&self, slot: &str, timeout: Duration) -> Result<()> {
        let client = self.client(DEFAULT_DATABASE).await?;
        let deadline = Instant::now() + timeout;
        loop {
            if self.slot_is_active(&client, slot).await? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("replication slot {slot} was not active within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether slot `slot` exists, is in use and is past its creation, as
    /// seen by `client`. A slot is active from the start of
    /// `CREATE_REPLICATION_SLOT`, but its `confirmed_flush_lsn` is NULL
    /// until the creation found a consistent point.
    pub(crate) async fn slot_is_active(&self, client: &Client, slot: &str) -> Result<bool> {
        let row = client
            .query_opt(
                "SELECT active AND confirmed_flush_lsn IS NOT NULL \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .context("reading pg_replication_slots")?;
        Ok(row.is_some_and(|row| row.get::<_, bool>(0)))
    }

    /// The server's current WAL write position (`pg_current_wal_lsn()`):
    /// at or past the end of every transaction committed so far.
    pub async fn current_wal_lsn(&self) -> Result<Lsn> {
        let client = self.client(DEFAULT_DATABASE).await?;
        let row = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .context("reading pg_current_wal_lsn()")?;
        row.get::<_, &str>(0).parse()
    }

    /// The `confirmed_flush_lsn` of replication slot `slot`: how far its
    /// consumer has acknowledged the WAL. Fails if there is no such slot.
    pub async fn confirmed_flush_lsn(&self, slot: &str) -> Result<Lsn> {
        let client = self.client(DEFAULT_DATABASE).await?;
        read_confirmed_flush_lsn(&client, slot).await
    }

    /// Polls slot `slot` until its `confirmed_flush_lsn` is at least `lsn`;
    /// fails after `timeout` saying where the slot stands.
    pub async fn wait_confirmed_flush(
        &self,
        slot: &str,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<()> {
        let client = self.client(DEFAULT_DATABASE).await?;
        let deadline = Instant::now() + timeout;
        loop {
            let confirmed = read_confirmed_flush_lsn(&client, slot).await?;
            if confirmed >= lsn {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the confirmed_flush_lsn of slot {slot} is {confirmed} after {timeout:?}, \
                     short of {lsn}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`: clients are disconnected,
    /// walsenders end) and keeps the cluster, so that [`Postgres::restart`]
    /// can bring it back with its data and slots: a source outage.
    pub fn stop(&mut self) -> Result<()> {
        if self.running {
            self.pg_ctl_stop("fast")?;
            self.running = false;
        }
        Ok(())
    }

    /// Starts the server again on the same port after [`Postgres::stop`] (or
    /// stops and starts it if it is running). Data and slots are kept.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.pg_ctl_start()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn init_cluster(&self) -> Result<()> {
        let data = self.data_dir();
        self.run_tool(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                SUPERUSER.as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C.UTF-8".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        let mut conf = String::from("\n# added by tributary-integration-tests\n");
        let socket_dir = self.dir.path().display();
        writeln!(conf, "listen_addresses = '127.0.0.1'")?;
        writeln!(conf, "port = {}", self.port)?;
        writeln!(conf, "unix_socket_directories = '{socket_dir}'")?;
        writeln!(conf, "wal_level = logical")?;
        writeln!(conf, "max_replication_slots = 10")?;
        writeln!(conf, "max_wal_senders = 10")?;
        // A throwaway cluster: durability across an OS crash is not needed.
        writeln!(conf, "fsync = off")?;
        writeln!(conf, "full_page_writes = off")?;
        append(&data.join("postgresql.conf"), &conf)?;
        let hba = "\
# added by tributary-integration-tests: the password roles of the auth tests
# (SCRAM_USER, MD5_USER) must authenticate; everything else local is trusted
host all tributary_scram 127.0.0.1/32 scram-sha-256
host replication tributary_scram 127.0.0.1/32 scram-sha-256
host all tributary_md5 127.0.0.1/32 md5
host replication tributary_md5 127.0.0.1/32 md5
# TLS_USER: over TLS only (a cluster started with TLS has the role)
hostssl all tributary_tls 127.0.0.1/32 trust
hostssl replication tributary_tls 127.0.0.1/32 trust
hostnossl all tributary_tls 127.0.0.1/32 reject
hostnossl replication tributary_tls 127.0.0.1/32 reject
# CERT_USER: a client certificate (CN = the role) over TLS, nothing else
hostssl all tributary_cert 127.0.0.1/32 cert
hostssl replication tributary_cert 127.0.0.1/32 cert
host all tributary_cert 127.0.0.1/32 reject
host replication tributary_cert 127.0.0.1/32 reject
local all all trust
host all all 127.0.0.1/32 trust
local replication all trust
host replication all 127.0.0.1/32 trust
";
        std::fs::write(data.join("pg_hba.conf"), hba).context("writing pg_hba.conf")?;
        Ok(())
    }

    /// Copies the server's certificate and key into the data directory
    /// (the key owned by the server's account, mode 0600, as it requires)
    /// and turns `ssl` on.
    fn enable_tls(&self, certs: &crate::tls::TestCerts) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let data = self.data_dir();
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::copy(certs.server_cert(), &cert).context("copying the server certificate")?;
        let ca = data.join("root.crt");
        std::fs::copy(certs.ca(), &ca).context("copying the CA certificate")?;
        std::fs::copy(certs.server_key(), &key).context("copying the server key")?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
        if self.as_os_user {
            let user = nix::unistd::User::from_name(OS_USER)?
                .with_context(|| format!("no `{OS_USER}` OS account"))?;
            for file in [&cert, &key, &ca] {
                std::os::unix::fs::chown(file, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                    .with_context(|| format!("chown {}", file.display()))?;
            }
        }
        append(
            &data.join("postgresql.conf"),
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'root.crt'\n",
        )
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<()> {
        let data = self.data_dir();
        self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    fn pg_ctl_start(&mut self) -> Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let started = self.run_tool(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "60".as_ref(),
                "start".as_ref(),
            ],
        );
        if let Err(err) = started {
            return Err(err.context(format!(
                "starting postgres on 127.0.0.1:{}\n{}",
                self.port,
                self.log_excerpt()
            )));
        }
        self.running = true;
        Ok(())
    }

    async fn create_user_and_database(&self) -> Result<()> {
        let admin = self.superuser_client("postgres").await?;
        // Separate statements: CREATE DATABASE cannot run in the implicit
        // transaction of a multi-statement string.
        admin
            .batch_execute(&format!("CREATE ROLE {USER} WITH LOGIN REPLICATION"))
            .await
            .with_context(|| format!("creating role {USER}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {DEFAULT_DATABASE} OWNER {USER}"))
            .await
            .with_context(|| format!("creating database {DEFAULT_DATABASE}"))?;
        Ok(())
    }

    /// Runs a PostgreSQL tool from the bin directory, as the `postgres` OS
    /// account when we are root, and fails with its output if it fails.
    fn run_tool(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<()> {
        let program = self.bin_dir.join(tool);
        let mut command = if self.as_os_user {
            let mut command = Command::new("runuser");
            command.args(["-u", OS_USER, "--"]).arg(&program);
            command
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env("LC_ALL", "C.UTF-8");
        let output = command
            .output()
            .with_context(|| format!("running {}", program.display()))?;
        if !output.status.success() {
            bail!(
                "{tool} failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    fn log_excerpt(&self) -> String {
        format!(
            "--- last lines of {} ---\n{}",
            self.log_path().display(),
            self.log_tail(LOG_TAIL_LINES)
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        if let Err(err) = self.pg_ctl_stop("immediate") {
            eprintln!(
                "warning: could not stop postgres on port {}: {err:#}",
                self.port
            );
        }
    }
}

/// A position in the WAL (a `pg_lsn`, written `16/B374D848`), as a number:
/// positions compare in WAL order, and subtracting one from a later one
/// gives the bytes of WAL between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The bytes of WAL from `earlier` to `self`, or 0 if `earlier` is not
    /// earlier.
    pub fn saturating_sub(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// The bytes of WAL from `rhs` to `self`; overflows (a panic in debug
/// builds) if `rhs` is later.
impl std::ops::Sub for Lsn {
    type Output = u64;

    fn sub(self, rhs: Lsn) -> u64 {
        self.0 - rhs.0
    }
}

/// Parses Postgres' text form, `16/B374D848` -> 0x16_B374D848.
impl FromStr for Lsn {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let (high, low) = text
            .split_once('/')
            .with_context(|| format!("LSN {text:?}"))?;
        Ok(Lsn(
            (u64::from_str_radix(high, 16)? << 32) | u64::from_str_radix(low, 16)?
        ))
    }
}

/// Postgres' text form, `16/B374D848`.
impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

async fn read_confirmed_flush_lsn(client: &Client, slot: &str) -> Result<Lsn> {
    let row = client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .with_context(|| format!("reading the confirmed_flush_lsn of slot {slot}"))?;
    row.get::<_, &str>(0).parse()
}

async fn connect(url: &str) -> Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        // The connection ends with an error when the server stops under it,
        // which is what some tests do on purpose: nothing to report.
        let _ = connection.await;
    });
    Ok(client)
}

/// Hands `dir` to the `postgres` OS account so that initdb, run as that
/// account, can create the cluster in it.
fn give_to_os_user(dir: &Path) -> Result<()> {
    let user = nix::unistd::User::from_name(OS_USER)
        .context("looking up the postgres OS account")?
        .with_context(|| {
            format!("running as root, but there is no `{OS_USER}` OS account to run initdb as")
        })?;
    std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
        .with_context(|| format!("chown {} to {OS_USER}", dir.display()))
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("16/XYZ".parse::<Lsn>().is_err());
    }

    #[test]
    fn lsns_order_and_subtract_as_wal_positions() {
        let (early, late) = (Lsn(0x1_0000_0000), Lsn(0x1_0000_0100));
        assert!(early < late);
        assert_eq!(late - early, 0x100);
        assert_eq!(late.saturating_sub(early), 0x100);
        assert_eq!(early.saturating_sub(late), 0);
    }
}

//! TLS to PostgreSQL (issue 9, item 7), on a cluster with a throwaway CA
//! and leaf certificate whose role [`TLS_USER`] may connect over TLS only
//! (`hostssl`), so every connection tributary opens (queries and the
//! replication stream) must be TLS for the run to work at all:
//! - `sslmode=verify-full` with the right CA streams a change to Kinesis;
//!   to a host the certificate does not name it stops start-up, and
//!   `verify-ca` (chain only) connects there (`tributary check`);
//! - with another CA, start-up stops with a message that names
//!   `sslrootcert` and what failed (exit 1, like any connection failure);
//!   with a CA file that is not there, it stops as a configuration error
//!   (exit 2);
//! - `sslmode=require` against a server without TLS stops clearly too.

use std::time::Duration;

use anyhow::{Context, Result};
use tributary_integration_tests::{
    CERT_USER, DEFAULT_DATABASE, Postgres, SLOT, Servers, TLS_USER, TestCerts, TributaryProcess,
    write_config,
};

const STREAM: &str = "tls-cdc";

/// Runs `tributary run` with `url` and expects it to stop at start-up with
/// exit code 1 and `needle` in its error.
async fn fails_at_start(servers: &Servers, url: &str, needle: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let extra = format!("[source]\nurl = \"{url}\"\n");
    let config = write_config(dir.path(), &servers.pg, &servers.kin, STREAM, &extra)?;
    let error = TributaryProcess::run(&config.path, &[])?
        .expect_failure(1, needle, Duration::from_secs(30))
        .await?;
    eprintln!("start-up with {url} stopped: {error}");
    Ok(())
}

/// A TLS PostgreSQL with `certs` and kinesalite; the server's port.
async fn tls_servers(certs: &TestCerts) -> Result<(Servers, u16)> {
    let pg = Postgres::start_with_tls(certs).await?;
    let port = pg.port();
    let servers = Servers::start_with(
        pg,
        STREAM,
        1,
        "CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL)",
    )
    .await?;
    Ok((servers, port))
}

/// Runs the pipeline with `url`, inserts a row with `v` and checks that
/// it reaches the stream; the running process.
async fn streams_one_row(
    servers: &Servers,
    dir: &std::path::Path,
    url: &str,
    v: &str,
) -> Result<TributaryProcess> {
    let extra = format!("[source]\nurl = \"{url}\"\n");
    let config = write_config(dir, &servers.pg, &servers.kin, STREAM, &extra)?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_streaming(&servers.pg, SLOT, Duration::from_secs(30))
        .await
        .with_context(|| tributary.logs())?;
    let before = servers.kin.read_all(STREAM).await?.len();
    servers
        .pg
        .execute(&format!("INSERT INTO items VALUES ({}, '{v}')", before + 1))
        .await?;
    let records = servers
        .kin
        .wait_for_records(STREAM, before + 1, Duration::from_secs(30))
        .await
        .with_context(|| tributary.logs())?;
    let envelope: serde_json::Value = serde_json::from_slice(&records[before].data)?;
    anyhow::ensure!(envelope["after"]["v"] == v, "{envelope}");
    Ok(tributary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_streams_over_tls_and_a_wrong_ca_or_no_tls_stops_start_up() -> Result<()> {
    // The leaf names `localhost` only: connecting to 127.0.0.1 is a name
    // mismatch that verify-full refuses and verify-ca accepts.
    let certs = TestCerts::generate_for("tributary test CA", "DNS:localhost")?;
    let other = TestCerts::generate("some other CA")?;
    let (servers, port) = tls_servers(&certs).await?;
    let url_to = |host: &str, mode: &str, ca: &std::path::Path| {
        format!(
            "postgres://{TLS_USER}@{host}:{port}/{DEFAULT_DATABASE}\
             ?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };
    let url = |ca: &std::path::Path| url_to("localhost", "verify-full", ca);

    // A CA that did not sign the server's certificate.
    let wrong = url(&other.ca());
    fails_at_start(
        &servers,
        &wrong,
        &format!(
            "the server's certificate is not signed by the CA in sslrootcert={}",
            other.ca().display()
        ),
    )
    .await?;

    // A CA file that is not there: a setting to fix (exit 2).
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing-ca.pem");
    let extra = format!("[source]\nurl = \"{}\"\n", url(&missing));
    let config = write_config(dir.path(), &servers.pg, &servers.kin, STREAM, &extra)?;
    TributaryProcess::run(&config.path, &[])?
        .expect_failure(
            2,
            &format!("source.url: cannot read sslrootcert={}", missing.display()),
            Duration::from_secs(30),
        )
        .await?;

    // The right CA, but a host the certificate does not name.
    fails_at_start(
        &servers,
        &url_to("127.0.0.1", "verify-full", &certs.ca()),
        "the server's certificate does not name the host 127.0.0.1 (sslmode=verify-full checks",
    )
    .await?;

    // The right CA: the whole pipeline runs over TLS.
    let dir = tempfile::tempdir()?;
    let mut tributary =
        streams_one_row(&servers, dir.path(), &url(&certs.ca()), "over tls").await?;
    let admin = servers.pg.superuser_client(DEFAULT_DATABASE).await?;
    let walsender_ssl: bool = admin
        .query_one(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_replication r USING (pid)",
            &[],
        )
        .await?
        .get(0);
    assert!(walsender_ssl, "the replication stream is not over TLS");
    tributary.stop_gracefully(Duration::from_secs(30)).await?;

    // `check` connects over TLS too; verify-ca does not check the name.
    let extra = format!(
        "[source]\nurl = \"{}\"\n",
        url_to("127.0.0.1", "verify-ca", &certs.ca())
    );
    let config = write_config(dir.path(), &servers.pg, &servers.kin, STREAM, &extra)?;
    let mut check = TributaryProcess::spawn(
        &["check".as_ref(), "-c".as_ref(), config.path.as_os_str()],
        &tributary_integration_tests::EMULATOR_AWS_ENV,
        dir.path(),
    )?;
    check.wait_exit(Duration::from_secs(60)).await?;
    let report = check.logs();
    assert!(
        report.contains(&format!(
            "connected to 127.0.0.1:{port}/{DEFAULT_DATABASE} as {TLS_USER}"
        )),
        "{report}"
    );

    // `require` against a server without TLS.
    let plain = Postgres::start().await?;
    let plain_url = format!(
        "postgres://tributary@127.0.0.1:{}/{DEFAULT_DATABASE}?sslmode=require",
        plain.port()
    );
    fails_at_start(
        &servers,
        &plain_url,
        "the server does not accept TLS connections, and sslmode=require asks for TLS",
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_logs_in_where_the_server_asks_for_one() -> Result<()> {
    let certs = TestCerts::generate("tributary test CA")?;
    let (cert, key) = certs.client(CERT_USER)?;
    let (servers, port) = tls_servers(&certs).await?;
    let base = format!(
        "postgres://{CERT_USER}@127.0.0.1:{port}/{DEFAULT_DATABASE}\
         ?sslmode=verify-full&sslrootcert={}",
        certs.ca().display()
    );
    // Without a certificate the server refuses the role.
    fails_at_start(
        &servers,
        &base,
        "connection requires a valid client certificate",
    )
    .await?;
    // With it the whole pipeline runs, replication included.
    let url = format!("{base}&sslcert={}&sslkey={}", cert.display(), key.display());
    let dir = tempfile::tempdir()?;
    let mut tributary =
        streams_one_row(&servers, dir.path(), &url, "with a client certificate").await?;
    tributary.stop_gracefully(Duration::from_secs(30)).await?;
    Ok(())
}

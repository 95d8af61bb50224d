//! TLS to MariaDB (issue 9, item 7), on a server with a throwaway CA and
//! leaf certificate whose connector user is `REQUIRE SSL`, so every
//! connection tributary opens (queries and the binlog stream) must be TLS
//! for the run to work at all:
//! - `ssl-mode=VERIFY_IDENTITY&ssl-ca=` (the MySQL client's spelling) with
//!   the right CA streams a change to Kinesis, and with `ssl-cert`/`ssl-key`
//!   too once the user must show a client certificate (`REQUIRE X509`);
//! - `sslmode=verify-full&sslrootcert=` (libpq's spelling) with another CA
//!   stops start-up with a message that names the parameter and what
//!   failed;
//! - `ssl-mode=REQUIRED` against a server without TLS stops clearly too,
//!   and `ssl-mode=PREFERRED` goes on in plain TCP (`tributary check`).

use std::time::Duration;

use anyhow::{Context, Result};
use mysql_async::prelude::Queryable as _;
use tributary_integration_tests::{
    DEFAULT_DATABASE, MYSQL_PASSWORD, MYSQL_USER, Mariadb, MysqlPipeline, ROW_BINLOG_FLAGS,
    TestCerts, TributaryProcess, write_mysql_config,
};

const STREAM: &str = "mysql-tls-cdc";

fn url(port: u16, tls: &str) -> String {
    format!("mysql://{MYSQL_USER}:{MYSQL_PASSWORD}@127.0.0.1:{port}/{DEFAULT_DATABASE}?{tls}")
}

/// Runs `tributary run` with `url` and expects it to stop at start-up with
/// exit code 1 and `needle` in its error.
async fn fails_at_start(
    pipeline: &MysqlPipeline,
    db: &Mariadb,
    url: &str,
    needle: &str,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let extra = format!("[source]\nurl = \"{url}\"\n");
    let config = write_mysql_config(dir.path(), db, &pipeline.kin, STREAM, &extra)?;
    let error = TributaryProcess::run(&config.path, &[])?
        .expect_failure(1, needle, Duration::from_secs(30))
        .await?;
    eprintln!("start-up with {url} stopped: {error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_identity_streams_over_tls_and_a_wrong_ca_or_no_tls_stops_start_up() -> Result<()> {
    let certs = TestCerts::generate("tributary test CA")?;
    let other = TestCerts::generate("some other CA")?;
    let ssl_flags = [
        format!("--ssl-ca={}", certs.ca().display()),
        format!("--ssl-cert={}", certs.server_cert().display()),
        format!("--ssl-key={}", certs.server_key().display()),
    ];
    let flags: Vec<&str> = ROW_BINLOG_FLAGS
        .iter()
        .copied()
        .chain(ssl_flags.iter().map(String::as_str))
        .collect();
    let db = Mariadb::start_with(&flags).await?;
    let mut root = db.root().await?;
    root.query_drop(format!("ALTER USER '{MYSQL_USER}'@'127.0.0.1' REQUIRE SSL"))
        .await?;
    root.disconnect().await?;
    let port = db.port();

    // The right CA: the whole pipeline runs over TLS.
    let good = url(
        port,
        &format!("ssl-mode=VERIFY_IDENTITY&ssl-ca={}", certs.ca().display()),
    );
    let mut pipeline = MysqlPipeline::start_on(
        db,
        STREAM,
        1,
        "CREATE TABLE shop.items (id int PRIMARY KEY, v text NOT NULL)",
        &format!("[source]\nurl = \"{good}\"\n"),
    )
    .await?;
    pipeline
        .tributary
        .wait_for_log("streaming changes from mysql", Duration::from_secs(30))
        .await?;
    pipeline
        .db
        .execute("INSERT INTO items VALUES (1, 'over tls')")
        .await?;
    let records = pipeline
        .wait_for_records(STREAM, 1, Duration::from_secs(30))
        .await?;
    let envelope: serde_json::Value = serde_json::from_slice(&records[0].data)?;
    assert_eq!(envelope["after"]["v"], "over tls", "{envelope}");
    pipeline.stop_gracefully().await?;

    // A user that must show a client certificate (REQUIRE X509): refused
    // without one, streaming with `ssl-cert`/`ssl-key`.
    let mut root = pipeline.db.root().await?;
    root.query_drop(format!(
        "ALTER USER '{MYSQL_USER}'@'127.0.0.1' REQUIRE X509"
    ))
    .await?;
    root.disconnect().await?;
    fails_at_start(&pipeline, &pipeline.db, &good, "Access denied").await?;
    let (cert, key) = certs.client(MYSQL_USER)?;
    let with_cert = format!(
        "{good}&ssl-cert={}&ssl-key={}",
        cert.display(),
        key.display()
    );
    let dir = tempfile::tempdir()?;
    let extra = format!("[source]\nurl = \"{with_cert}\"\n");
    let config = write_mysql_config(dir.path(), &pipeline.db, &pipeline.kin, STREAM, &extra)?;
    let mut tributary = TributaryProcess::run(&config.path, &[])?;
    tributary
        .wait_for_log("streaming changes from mysql", Duration::from_secs(30))
        .await?;
    pipeline
        .db
        .execute("INSERT INTO items VALUES (2, 'with a client certificate')")
        .await?;
    let records = pipeline
        .wait_for_records(STREAM, 2, Duration::from_secs(30))
        .await
        .with_context(|| tributary.logs())?;
    assert!(
        records
            .iter()
            .any(|r| String::from_utf8_lossy(&r.data).contains("with a client certificate")),
        "{}",
        tributary.logs()
    );
    tributary.stop_gracefully(Duration::from_secs(30)).await?;
    let mut root = pipeline.db.root().await?;
    root.query_drop(format!("ALTER USER '{MYSQL_USER}'@'127.0.0.1' REQUIRE SSL"))
        .await?;
    root.disconnect().await?;

    // A CA that did not sign the server's certificate.
    let wrong = url(
        port,
        &format!("sslmode=verify-full&sslrootcert={}", other.ca().display()),
    );
    let needle = format!(
        "the server's certificate is not signed by the CA in sslrootcert={}",
        other.ca().display()
    );
    fails_at_start(&pipeline, &pipeline.db, &wrong, &needle).await?;

    // REQUIRED against a server without TLS.
    let plain = Mariadb::start().await.context("a server without TLS")?;
    let required = url(plain.port(), "ssl-mode=REQUIRED");
    fails_at_start(
        &pipeline,
        &plain,
        &required,
        "the server does not accept TLS connections, and ssl-mode=REQUIRED asks for TLS",
    )
    .await?;

    // PREFERRED goes on in plain TCP when the server has no TLS.
    let dir = tempfile::tempdir()?;
    let preferred = url(plain.port(), "ssl-mode=PREFERRED");
    let extra = format!("[source]\nurl = \"{preferred}\"\n");
    let config = write_mysql_config(dir.path(), &plain, &pipeline.kin, STREAM, &extra)?;
    let mut check = TributaryProcess::spawn(
        &["check".as_ref(), "-c".as_ref(), config.path.as_os_str()],
        &[],
        dir.path(),
    )?;
    check.wait_exit(Duration::from_secs(60)).await?;
    let report = check.logs();
    let connected = format!("connected to 127.0.0.1:{}", plain.port());
    assert!(report.contains(&connected), "{report}");
    Ok(())
}

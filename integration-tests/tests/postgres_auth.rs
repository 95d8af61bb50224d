//! The replication connection authenticates with SCRAM-SHA-256 and MD5
//! passwords (from `password_file`), never logs them, and a wrong password
//! stops start-up with an error instead of retrying forever.

use std::time::Duration;

use tributary_integration_tests::{
    DEFAULT_DATABASE, MD5_USER, SCRAM_USER, Servers, TributaryProcess, write_config,
};

const STREAM: &str = "auth-cdc";
const PASSWORD: &str = "s3cr3t-Pa55";

/// Servers with a password role `user` that may stream table `items`.
async fn servers_with_role(user: &str, encryption: &str) -> anyhow::Result<Servers> {
    let servers = Servers::start(STREAM, 1, "CREATE TABLE items (id int PRIMARY KEY)").await?;
    let admin = servers.pg.superuser_client(DEFAULT_DATABASE).await?;
    admin
        .batch_execute(&format!(
            "SET password_encryption = '{encryption}'; \
             CREATE ROLE {user} LOGIN REPLICATION PASSWORD '{PASSWORD}'; \
             CREATE PUBLICATION tributary_shop FOR TABLE items; \
             GRANT SELECT ON items TO {user}"
        ))
        .await?;
    Ok(servers)
}

fn role_config(
    servers: &Servers,
    dir: &std::path::Path,
    user: &str,
    password: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let password_file = dir.join("pg-password");
    std::fs::write(&password_file, format!("{password}\n"))?;
    let extra = format!(
        "[source]\nurl = \"postgres://{user}@127.0.0.1:{}/{DEFAULT_DATABASE}\"\npassword_file = \"{}\"\n",
        servers.pg.port(),
        password_file.display()
    );
    Ok(write_config(dir, &servers.pg, &servers.kin, STREAM, &extra)?.path)
}

async fn streams_with(user: &str, encryption: &str) -> anyhow::Result<()> {
    let servers = servers_with_role(user, encryption).await?;
    let dir = tempfile::tempdir()?;
    let config = role_config(&servers, dir.path(), user, PASSWORD)?;
    let mut tributary = TributaryProcess::run(&config, &[])?;
    tributary
        .wait_streaming(
            &servers.pg,
            tributary_integration_tests::SLOT,
            Duration::from_secs(30),
        )
        .await?;
    servers
        .pg
        .execute("INSERT INTO items SELECT generate_series(1, 10)")
        .await?;
    let records = servers
        .kin
        .wait_for_records(STREAM, 10, Duration::from_secs(30))
        .await?;
    assert_eq!(records.len(), 10);
    tributary.stop_gracefully(Duration::from_secs(30)).await?;
    assert!(
        !tributary.logs().contains(PASSWORD),
        "the password appears in the logs"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_sha_256_password_from_a_file() -> anyhow::Result<()> {
    streams_with(SCRAM_USER, "scram-sha-256").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_password_from_a_file() -> anyhow::Result<()> {
    streams_with(MD5_USER, "md5").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_stops_start_up_with_a_clear_error() -> anyhow::Result<()> {
    let servers = servers_with_role(SCRAM_USER, "scram-sha-256").await?;
    let dir = tempfile::tempdir()?;
    let config = role_config(&servers, dir.path(), SCRAM_USER, "not-the-password")?;
    let mut tributary = TributaryProcess::run(&config, &[])?;
    let status = tributary.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(
        status.code(),
        Some(1),
        "a runtime failure: {status}\n{}",
        tributary.logs()
    );
    let logs = tributary.logs();
    assert!(logs.contains("password authentication failed"), "{logs}");
    assert!(
        !logs.contains("not-the-password"),
        "the password appears in the logs"
    );
    Ok(())
}

//! `tributary check` on a MariaDB source: a statement binlog, MINIMAL row
//! metadata, a clashing server_id, a user without replication grants and a
//! stored offset in a purged binlog are each named with their fix (exit 2);
//! once fixed (`setup --apply` as a DBA for the binlog settings and the
//! grant), check exits 0.

use std::path::Path;

use mysql_async::prelude::Queryable as _;
use tributary_integration_tests::{
    EMULATOR_AWS_ENV, Kinesalite, MYSQL_USER, Mariadb, assert_check_fails_with, tributary_bin,
    write_mysql_config,
};

const STREAM: &str = "mysql-check-cdc";

fn check(config: &str, env: &[(&str, &str)], cwd: &Path) -> (i32, String) {
    let out = std::process::Command::new(tributary_bin().expect("tributary binary"))
        .args(["check", "-c", config])
        .envs(EMULATOR_AWS_ENV)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("tributary runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_mysql_problem_and_passes_once_fixed() -> anyhow::Result<()> {
    let db = Mariadb::start_with(&[
        "--binlog-format=STATEMENT",
        "--binlog-row-image=FULL",
        "--binlog-row-metadata=MINIMAL",
    ])
    .await?;
    let kin = Kinesalite::start().await?;
    let dir = tempfile::tempdir()?;
    let config = write_mysql_config(dir.path(), &db, &kin, STREAM, "")?;
    let path = config.path.to_str().expect("utf-8 path").to_owned();
    let cwd = dir.path();
    let mut root = db.root().await?;
    root.query_drop(format!(
        "REVOKE REPLICATION SLAVE ON *.* FROM '{MYSQL_USER}'@'127.0.0.1'"
    ))
    .await?;
    // An offset in a binlog the server is about to purge.
    let (file, _) = db.binlog_position().await?;
    std::fs::create_dir_all(&config.state_dir)?;
    let offset = config.state_dir.join("shop.mysql-offset");
    std::fs::write(&offset, format!("file={file}\npos=4\n"))?;
    db.rotate_and_purge().await?;

    let (code, report) = check(&path, &[("TRIBUTARY__SOURCE__MYSQL__SERVER_ID", "1")], cwd);
    assert_eq!(code, 2, "{report}");
    assert_check_fails_with(
        &report,
        "binlog_format",
        "SET GLOBAL binlog_format = 'ROW';",
    );
    assert_check_fails_with(
        &report,
        "binlog_row_metadata",
        "SET GLOBAL binlog_row_metadata = 'FULL';",
    );
    assert_check_fails_with(&report, "server_id", "source.mysql.server_id");
    assert_check_fails_with(
        &report,
        "privileges",
        "GRANT REPLICATION SLAVE, BINLOG MONITOR, RELOAD, SELECT ON *.* TO 'tributary'@'127.0.0.1';",
    );
    assert_check_fails_with(&report, "offset", &format!("delete {}", offset.display()));
    assert_check_fails_with(&report, "stream", "aws kinesis create-stream");
    assert!(report.contains("✓ mysql binlog_row_image:"), "{report}");
    assert!(
        report.contains("✓ mysql gtid: MariaDB GTIDs are on"),
        "{report}"
    );

    // setup, as a DBA, plans and applies the binlog settings and the grant.
    root.query_drop(
        "CREATE USER 'dba'@'127.0.0.1' IDENTIFIED BY 'dba-pw'; \
         GRANT ALL PRIVILEGES ON *.* TO 'dba'@'127.0.0.1' WITH GRANT OPTION",
    )
    .await?;
    let admin_url = format!("mysql://dba:dba-pw@127.0.0.1:{}", db.port());
    let setup = |apply: bool| {
        let mut args = vec!["setup", "-c", &path, "--admin-url", &admin_url];
        if apply {
            args.push("--apply");
        }
        let out = std::process::Command::new(tributary_bin().expect("tributary binary"))
            .args(&args)
            .current_dir(cwd)
            .output()
            .expect("tributary runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plan = setup(false);
    for statement in [
        "SET GLOBAL binlog_format = 'ROW';",
        "SET GLOBAL binlog_row_metadata = 'FULL';",
        "GRANT REPLICATION SLAVE, BINLOG MONITOR, RELOAD, SELECT ON *.* TO 'tributary'@'127.0.0.1';",
        "-- then: add binlog_format = ROW, binlog_row_metadata = FULL to the [mysqld] section",
    ] {
        assert!(plan.contains(statement), "no `{statement}` in:\n{plan}");
    }
    assert!(!plan.contains("binlog_row_image"), "{plan}");
    assert!(setup(true).contains("-- applied 3 statement(s)"));
    assert!(setup(false).contains("nothing to do"));
    std::fs::remove_file(&offset)?;
    kin.create_stream(STREAM, 1).await?;
    let (code, report) = check(&path, &[], cwd);
    assert_eq!(code, 0, "{report}");
    for line in [
        "✓ mysql log_bin:",
        "✓ mysql binlog_format: binlog_format is ROW",
        "✓ mysql binlog_row_metadata: binlog_row_metadata is FULL",
        "✓ mysql server_id: server_id 5401 is unique",
        "✓ mysql privileges:",
        "✓ mysql offset: no stored offset",
        "✓ kinesis stream:",
    ] {
        assert!(report.contains(line), "no `{line}` in:\n{report}");
    }
    Ok(())
}

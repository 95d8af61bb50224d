//! `tributary check`, `setup` and `slots` against real servers: a
//! deliberately broken PostgreSQL and a missing Kinesis stream are named
//! item by item with their fixes (exit 2); `setup --apply` repairs what SQL
//! can; then `check` exits 0. `slots drop` refuses the slot a running
//! connector streams from.

use std::path::Path;
use std::time::Duration;

use tributary_integration_tests::{
    DEFAULT_DATABASE, EMULATOR_AWS_ENV, Kinesalite, Postgres, SLOT, TributaryProcess,
    assert_check_fails_with, tributary_bin, write_config,
};

/// Runs `tributary <args>` with the emulator's AWS credentials; returns
/// the exit code, stdout and stderr.
fn tributary(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(tributary_bin().expect("tributary binary"))
        .args(args)
        .envs(EMULATOR_AWS_ENV)
        .env_remove("AWS_PROFILE")
        .current_dir(cwd)
        .output()
        .expect("tributary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_problem_setup_repairs_and_check_passes() -> anyhow::Result<()> {
    let mut pg = Postgres::start().await?;
    let kin = Kinesalite::start().await?;
    let admin = pg.superuser_client(DEFAULT_DATABASE).await?;
    admin
        .batch_execute("ALTER SYSTEM SET wal_level = replica")
        .await?;
    admin
        .batch_execute(
            "ALTER ROLE tributary NOREPLICATION; \
             CREATE TABLE public.orders (id int PRIMARY KEY, status text); \
             CREATE TABLE public.audit (at timestamptz, what text);",
        )
        .await?;
    drop(admin);
    pg.restart()?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &pg, &kin, "ops-cdc", "")?;
    let config = config.path.to_str().expect("utf-8 path");

    let (code, report, stderr) = tributary(&["check", "-c", config], dir.path());
    assert_eq!(code, 2, "check must fail:\n{report}\n{stderr}");
    assert_check_fails_with(&report, "wal_level", "ALTER SYSTEM SET wal_level = logical");
    assert_check_fails_with(
        &report,
        "replication_role",
        "ALTER ROLE \"tributary\" WITH REPLICATION;",
    );
    assert_check_fails_with(
        &report,
        "select",
        "GRANT SELECT ON \"public\".\"audit\", \"public\".\"orders\" TO \"tributary\";",
    );
    assert_check_fails_with(
        &report,
        "publication",
        "CREATE PUBLICATION \"tributary_shop\" FOR TABLE \"public\".\"audit\", \
         \"public\".\"orders\" WITH (publish_via_partition_root = true);",
    );
    assert_check_fails_with(
        &report,
        "primary_key",
        "ALTER TABLE \"public\".\"audit\" REPLICA IDENTITY FULL;",
    );
    assert_check_fails_with(
        &report,
        "stream",
        "aws kinesis create-stream --stream-name ops-cdc",
    );
    assert!(
        report.contains("! postgres max_slot_wal_keep_size:"),
        "{report}"
    );
    assert!(report.contains("not ready: 6 problem(s)"), "{report}");

    let (code, json, _) = tributary(&["check", "--json", "-c", config], dir.path());
    assert_eq!(code, 2);
    let doc: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(doc["version"], 1);
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["failures"], 6);
    let failed: Vec<&str> = doc["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["status"] == "fail")
        .map(|i| i["check"].as_str().expect("check"))
        .collect();
    assert_eq!(
        failed,
        [
            "wal_level",
            "replication_role",
            "select",
            "primary_key",
            "publication",
            "stream"
        ]
    );

    // setup prints without changing anything.
    let admin_url = pg.superuser_url(DEFAULT_DATABASE);
    let (code, plan, stderr) = tributary(
        &["setup", "-c", config, "--admin-url", &admin_url],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        plan.contains("ALTER SYSTEM SET wal_level = logical;"),
        "{plan}"
    );
    assert!(plan.contains("restart PostgreSQL"), "{plan}");
    let (_, again, _) = tributary(&["check", "-c", config], dir.path());
    assert!(
        again.contains("not ready: 6 problem(s)"),
        "setup changed something:\n{again}"
    );

    // --apply, restart for wal_level, apply again for the slot.
    let (code, applied, stderr) = tributary(
        &["setup", "--apply", "-c", config, "--admin-url", &admin_url],
        dir.path(),
    );
    assert_eq!(code, 0, "{applied}\n{stderr}");
    assert!(applied.contains("-- applied"), "{applied}");
    pg.restart()?;
    let (code, applied, stderr) = tributary(
        &["setup", "--apply", "-c", config, "--admin-url", &admin_url],
        dir.path(),
    );
    assert_eq!(code, 0, "{applied}\n{stderr}");
    assert!(
        applied.contains("pg_create_logical_replication_slot('tributary_shop', 'pgoutput');"),
        "{applied}"
    );
    // A key is a modelling decision setup leaves to the DBA; so is the stream.
    pg.superuser_client(DEFAULT_DATABASE)
        .await?
        .batch_execute("ALTER TABLE public.audit REPLICA IDENTITY FULL")
        .await?;
    kin.create_stream("ops-cdc", 2).await?;

    let (code, report, stderr) = tributary(&["check", "-c", config], dir.path());
    assert_eq!(code, 0, "check must pass now:\n{report}\n{stderr}");
    for line in [
        "✓ postgres wal_level:",
        "✓ postgres replication_role:",
        "✓ postgres select:",
        "✓ postgres publication:",
        "✓ postgres slot: slot tributary_shop exists",
        "✓ kinesis stream:",
        "✓ kinesis shards: 2 open shards",
        "✓ kinesis max_record_size: records up to 1024 KiB",
        "✓ kinesis write: PutRecords is permitted",
        "! postgres primary_key: no primary key (REPLICA IDENTITY FULL): public.audit;",
    ] {
        assert!(report.contains(line), "no `{line}` in:\n{report}");
    }
    let (_, plan, _) = tributary(
        &["setup", "-c", config, "--admin-url", &admin_url],
        dir.path(),
    );
    assert!(plan.contains("nothing to do"), "{plan}");
    // The write probe wrote nothing.
    assert!(kin.read_all("ops-cdc").await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_lists_with_lag_and_drop_refuses_an_active_slot() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let kin = Kinesalite::start().await?;
    kin.create_stream("slots-cdc", 1).await?;
    pg.execute("CREATE TABLE t (id int PRIMARY KEY)").await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &pg, &kin, "slots-cdc", "")?;
    let path = config.path.to_str().expect("utf-8 path");

    let mut run = TributaryProcess::run(&config.path, &[])?;
    // The snapshot's exporting connection holds the slot too, and lets it
    // go a moment before streaming takes it: wait for the stream.
    run.wait_for_log("streaming changes from postgres", Duration::from_secs(30))
        .await?;
    pg.wait_for_active_slot(SLOT, Duration::from_secs(30))
        .await?;
    let (code, list, stderr) = tributary(&["slots", "list", "-c", path], dir.path());
    assert_eq!(code, 0, "{stderr}");
    let line = list
        .lines()
        .find(|l| l.starts_with(SLOT))
        .unwrap_or_else(|| panic!("no {SLOT} in:\n{list}"));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[1..3], ["pgoutput", DEFAULT_DATABASE], "{line}");
    assert!(fields[3].parse::<u32>().is_ok(), "no active pid: {line}");
    assert!(fields[4].parse::<i64>().is_ok(), "no lag: {line}");
    assert_eq!(fields[5], "reserved", "{line}");

    let (code, _, stderr) = tributary(&["slots", "drop", SLOT, "-c", path], dir.path());
    assert_eq!(code, 2, "an active slot must not be dropped: {stderr}");
    assert!(stderr.contains("is active"), "{stderr}");
    let (_, check, _) = tributary(&["check", "-c", path], dir.path());
    assert!(check.contains("! postgres slot_active:"), "{check}");

    run.stop_gracefully(Duration::from_secs(30)).await?;
    // The server's walsender ends a moment after the connector exits.
    let client = pg.client(DEFAULT_DATABASE).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client
        .query_one(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await?
        .get::<_, bool>(0)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot stays active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, stderr) = tributary(&["slots", "drop", SLOT, "-c", path], dir.path());
    assert_eq!(code, 0, "{out}{stderr}");
    let (_, list, _) = tributary(&["slots", "-c", path], dir.path());
    assert!(!list.contains(SLOT), "{list}");
    let (code, _, stderr) = tributary(&["slots", "drop", SLOT, "-c", path], dir.path());
    assert_eq!(code, 2);
    assert!(stderr.contains("there is no replication slot"), "{stderr}");
    Ok(())
}

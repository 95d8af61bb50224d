//! The first mistakes a new user makes, against real servers: each ends in
//! one message that names the problem and the fix, with the right exit code,
//! at start-up, before the replication slot is touched.

use std::time::{Duration, Instant};

use tributary_integration_tests::{
    DEFAULT_DATABASE, Kinesalite, Pipeline, Postgres, SLOT, Servers, TributaryProcess, free_port,
    write_config,
};

/// How long a start-up check may take to fail (no retry loop).
const FAIL_FAST: Duration = Duration::from_secs(10);

/// Debug formatting that must never reach a user.
const JARGON: [&str; 4] = ["ProviderError", "Some(", "ServiceError {", "SdkBody"];

fn assert_plain(output: &str) {
    for jargon in JARGON {
        assert!(!output.contains(jargon), "`{jargon}` in:\n{output}");
    }
}

async fn slot_exists(pg: &Postgres) -> anyhow::Result<bool> {
    let client = pg.client(DEFAULT_DATABASE).await?;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&SLOT],
        )
        .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Runs `tributary run` on a config for `servers` with `stream`, and waits
/// for it to exit within [`FAIL_FAST`]; returns its exit code and stderr.
async fn run_until_exit(
    pg: &Postgres,
    kin: &Kinesalite,
    stream: &str,
    env: &[(&str, &str)],
) -> anyhow::Result<(i32, String)> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), pg, kin, stream, "")?;
    let started = Instant::now();
    let mut process = TributaryProcess::run(&config.path, env)?;
    let status = process.wait_exit(FAIL_FAST).await?;
    assert!(started.elapsed() < FAIL_FAST);
    Ok((status.code().unwrap_or(-1), process.stderr()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_without_aws_credentials_exits_2_naming_the_chain_and_leaves_the_slot_alone()
-> anyhow::Result<()> {
    let servers = Servers::start("creds-cdc", 1, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let home = tempfile::tempdir()?;
    let (code, stderr) = run_until_exit(
        &servers.pg,
        &servers.kin,
        "creds-cdc",
        &no_credentials(&home),
    )
    .await?;
    assert_eq!(code, 2, "{stderr}");
    for needle in [
        "no AWS credentials found",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "instance",
    ] {
        assert!(stderr.contains(needle), "`{needle}` missing in:\n{stderr}");
    }
    assert_eq!(
        stderr.matches("no AWS credentials found").count(),
        1,
        "said once:\n{stderr}"
    );
    assert_plain(&stderr);
    assert!(!slot_exists(&servers.pg).await?, "the slot was created");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_a_missing_stream_exits_2_before_the_slot_is_created() -> anyhow::Result<()> {
    let servers = Servers::start("other-cdc", 1, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let (code, stderr) = run_until_exit(&servers.pg, &servers.kin, "shop-cdc", &[]).await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("kinesis stream `shop-cdc` does not exist in us-east-1")
            && stderr.contains("create-stream --stream-name shop-cdc")
            && stderr.contains("fix sink.stream"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("does not exist").count(), 1, "{stderr}");
    assert_plain(&stderr);
    assert!(!slot_exists(&servers.pg).await?, "the slot was created");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_without_aws_credentials_names_the_chain() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let (code, stderr) = tail_until_exit("shop-cdc", &no_credentials(&home)).await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.starts_with("error: no AWS credentials found")
            && stderr.contains("AWS_ACCESS_KEY_ID")
            && stderr.lines().count() == 1,
        "one line naming the chain: {stderr}"
    );
    assert_plain(&stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_kinesis_is_a_runtime_failure_said_once() -> anyhow::Result<()> {
    let pg = Postgres::start().await?;
    let kin = Kinesalite::start().await?;
    let dir = tempfile::tempdir()?;
    // Nothing listens on this port.
    let closed = format!("http://127.0.0.1:{}", free_port()?);
    let config = write_config(
        dir.path(),
        &pg,
        &kin,
        "shop-cdc",
        &format!("[sink]\nendpoint_url = \"{closed}\"\n"),
    )?;
    let mut process = TributaryProcess::run(&config.path, &[])?;
    let status = process.wait_exit(Duration::from_secs(30)).await?;
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(1), "a restart may fix it: {stderr}");
    assert!(
        stderr
            .contains("cannot check kinesis stream `shop-cdc`: Kinesis (us-east-1) did not answer")
            && stderr.contains("Connection refused"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("Connection refused").count(), 1, "{stderr}");
    assert_plain(&stderr);
    assert!(!slot_exists(&pg).await?, "the slot was created");
    Ok(())
}

/// Runs `tributary tail --stream STREAM` against a fresh kinesalite with
/// the extra environment `env`, and waits for it to exit within
/// [`FAIL_FAST`]; returns its exit code and stderr.
async fn tail_until_exit(stream: &str, env: &[(&str, &str)]) -> anyhow::Result<(i32, String)> {
    let kin = Kinesalite::start().await?;
    let dir = tail_config(&kin)?;
    let mut tail = TributaryProcess::spawn(
        &["tail", "-c", "tail.toml", "--stream", stream],
        env,
        dir.path(),
    )?;
    let status = tail.wait_exit(FAIL_FAST).await?;
    Ok((status.code().unwrap_or(-1), tail.stderr()))
}

/// Environment without AWS credentials: the harness' emulator keys blanked
/// (the SDK treats blank as unset) and a `HOME` without `~/.aws`.
fn no_credentials(home: &tempfile::TempDir) -> [(&'static str, &str); 3] {
    [
        ("AWS_ACCESS_KEY_ID", ""),
        ("AWS_SECRET_ACCESS_KEY", ""),
        ("HOME", home.path().to_str().expect("utf-8 temp dir")),
    ]
}

/// A directory holding `tail.toml`: only `[sink]`, pointed at `kin`.
fn tail_config(kin: &Kinesalite) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("tail.toml"),
        format!(
            "[sink]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n",
            kin.endpoint()
        ),
    )?;
    Ok(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_of_a_missing_stream_names_the_flag() -> anyhow::Result<()> {
    let (code, stderr) = tail_until_exit("nope", &[]).await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("kinesis stream `nope` does not exist") && stderr.contains("fix --stream"),
        "{stderr}"
    );
    assert!(!stderr.contains("sink.stream"), "{stderr}");
    assert_plain(&stderr);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_stream_that_does_not_exist_fails_at_first_use_with_the_same_message()
-> anyhow::Result<()> {
    let servers = Servers::start("unused", 1, "CREATE TABLE orders (id int PRIMARY KEY)").await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &servers.pg,
        &servers.kin,
        "shop.{schema}.{table}",
        "",
    )?;
    let mut process = TributaryProcess::run(&config.path, &[])?;
    process
        .wait_streaming(&servers.pg, SLOT, Duration::from_secs(30))
        .await?;
    let before = servers.pg.confirmed_flush_lsn(SLOT).await?;
    servers.pg.execute("INSERT INTO orders VALUES (1)").await?;
    let status = process.wait_exit(Duration::from_secs(30)).await?;
    let stderr = process.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("kinesis stream `shop.public.orders` does not exist in us-east-1")
            && stderr.contains("fix sink.stream"),
        "{stderr}"
    );
    assert_plain(&stderr);
    // The change was not acknowledged: it is sent again once the stream exists.
    assert_eq!(servers.pg.confirmed_flush_lsn(SLOT).await?, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_on_an_active_slot_logs_the_servers_reason_in_its_first_retry_line()
-> anyhow::Result<()> {
    let pipeline =
        Pipeline::start("busy-cdc", 1, "CREATE TABLE t (id int PRIMARY KEY)", "").await?;
    // Its own HTTP port: the first one serves /healthz on the config's.
    let listen = format!("127.0.0.1:{}", free_port()?);
    let mut second = TributaryProcess::run(
        &pipeline.config.path,
        &[("TRIBUTARY__HTTP__LISTEN", listen.as_str())],
    )?;
    second
        .wait_for_log("reconnecting", Duration::from_secs(30))
        .await?;
    let stderr = second.stderr();
    let first_retry = stderr
        .lines()
        .find(|line| line.contains("reconnecting"))
        .expect("a retry line");
    for needle in [
        &format!("replication slot \\\"{SLOT}\\\" is active for PID"),
        "55006",
        "same source.postgres.slot",
        "wal_sender_timeout",
    ] {
        assert!(
            first_retry.contains(needle),
            "`{needle}` missing in: {first_retry}"
        );
    }
    assert_plain(&stderr);
    second.kill9().await?;

    // The first one stops cleanly and logs positions as LSNs, not counts.
    let mut pipeline = pipeline;
    pipeline.stop_gracefully().await?;
    let log = pipeline.tributary.stderr();
    let stopped = log
        .lines()
        .find(|line| line.contains("replication stopped"))
        .expect("a 'replication stopped' line");
    let lsn = stopped
        .split("\"acknowledged_lsn\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("acknowledged_lsn as a string");
    let (high, low) = lsn.split_once('/').expect("an LSN is HIGH/LOW");
    assert!(
        u32::from_str_radix(high, 16).is_ok() && u32::from_str_radix(low, 16).is_ok(),
        "{stopped}"
    );
    for line in log.lines().filter(|line| line.contains("acknowledged")) {
        assert!(!line.contains("\"acknowledged\":"), "a raw count: {line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_pretty_indents_each_envelope_in_field_order() -> anyhow::Result<()> {
    let kin = Kinesalite::start().await?;
    kin.create_stream("pretty-cdc", 1).await?;
    let envelope =
        r#"{"v":1,"id":"shop:1","op":"insert","key":{"id":1},"after":{"id":1,"total":"19.90"}}"#;
    kin.client()
        .put_record()
        .stream_name("pretty-cdc")
        .partition_key("public.orders:1")
        .data(envelope.as_bytes().to_vec().into())
        .send()
        .await?;
    let dir = tail_config(&kin)?;
    let mut tail = TributaryProcess::spawn(
        &[
            "tail",
            "-c",
            "tail.toml",
            "--stream",
            "pretty-cdc",
            "--pretty",
        ],
        &[],
        dir.path(),
    )?;
    let status = tail.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(0), "{}", tail.logs());
    let expected = "{\n  \"v\": 1,\n  \"id\": \"shop:1\",\n  \"op\": \"insert\",\n  \"key\": {\n    \"id\": 1\n  },\n  \"after\": {\n    \"id\": 1,\n    \"total\": \"19.90\"\n  }\n}\n";
    let stdout = tail.stdout();
    assert!(stdout.starts_with(expected), "{stdout}");
    assert!(
        !stdout.contains('\u{1b}'),
        "no colour when stdout is not a terminal"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_lines_while_kinesis_is_gone_carry_no_sdk_debug_dumps() -> anyhow::Result<()> {
    let pipeline =
        Pipeline::start("gone-cdc", 1, "CREATE TABLE t (id int PRIMARY KEY)", "").await?;
    let Pipeline {
        mut tributary,
        pg,
        kin,
        ..
    } = pipeline;
    // The stream is opened with the first change; then Kinesis goes away.
    pg.execute("INSERT INTO t VALUES (1)").await?;
    kin.wait_for_records("gone-cdc", 1, Duration::from_secs(30))
        .await?;
    drop(kin);
    pg.execute("INSERT INTO t VALUES (2)").await?;
    tributary
        .wait_for_log(
            "putrecords failed; retrying the batch",
            Duration::from_secs(30),
        )
        .await?;
    let stderr = tributary.stderr();
    let retry = stderr
        .lines()
        .find(|line| line.contains("putrecords failed"))
        .expect("a retry line");
    assert!(retry.contains("Connection refused"), "{retry}");
    for jargon in ["DispatchFailure", "ConnectorError {", "Some(", "{ source"] {
        assert!(!retry.contains(jargon), "`{jargon}` in: {retry}");
    }
    tributary.kill9().await?;
    Ok(())
}

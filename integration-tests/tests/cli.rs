//! The command line as a user meets it: help text, and configuration errors
//! that exit 2 naming the key.

use std::path::Path;
use std::process::Output;

use tributary_integration_tests::tributary_bin;

fn tributary(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Output {
    std::process::Command::new(tributary_bin().expect("tributary binary"))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("tributary runs")
}

const GOOD: &str = r#"
[source]
kind = "postgres"
name = "shop"
url = "postgres://cdc:hunter2@127.0.0.1:1/shop"
tables = ["public.*"]

[sink]
stream = "shop-cdc"
region = "us-east-1"
endpoint_url = "http://127.0.0.1:1"
"#;

fn run_with(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.toml"), config).unwrap();
    let out = tributary(&["run", "-c", "bad.toml"], env, dir.path());
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn bad_configs_exit_2_and_name_the_key() {
    let cases = [
        (
            GOOD.replace("tables = [", "bogus = 1\ntables = ["),
            "source.bogus",
        ),
        (
            GOOD.replace("postgres://cdc:hunter2@127.0.0.1:1/shop", "not a url"),
            "source.url",
        ),
        (GOOD.replace("stream = \"shop-cdc\"", ""), "sink.stream"),
        (
            format!("{GOOD}\n[sink.quota]\nshare = 0\n"),
            "sink.quota.share",
        ),
        (
            GOOD.replace("kind = \"postgres\"", "kind = \"oracle\""),
            "source.kind",
        ),
        (
            format!("{GOOD}\n[source.postgres]\nread_timeout_secs = 0\n"),
            "source.postgres.read_timeout_secs",
        ),
        (
            // verify-full without the CA to verify with.
            GOOD.replace("/shop\"", "/shop?sslmode=verify-full\""),
            "source.url: sslmode=verify-full checks the server's certificate against a CA: \
             add sslrootcert=PATH",
        ),
    ];
    for (config, key) in cases {
        let (code, stderr) = run_with(&config, &[]);
        assert_eq!(code, 2, "{key}: exit code 2 expected, stderr: {stderr}");
        assert!(stderr.contains(key), "{key} not named in: {stderr}");
        assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    }
}

/// No Rust or SDK debug formatting reaches a user.
fn assert_no_debug_formatting(stderr: &str) {
    for jargon in [
        "ProviderError",
        "Some(",
        "variant constructor",
        "enum ",
        "{ source",
    ] {
        assert!(
            !stderr.contains(jargon),
            "debug formatting `{jargon}` in: {stderr}"
        );
    }
}

#[test]
fn an_unknown_key_is_named_once_with_its_line_and_the_closest_key() {
    let (code, stderr) = run_with(&GOOD.replace("stream = ", "strem = "), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("sink.strem: unknown key (bad.toml line 9); did you mean `stream`?"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("strem").count(), 1, "key once: {stderr}");
    let (code, stderr) = run_with(&GOOD.replace("tables = ", "tabels = "), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("source.tabels: unknown key (bad.toml line 6); did you mean `tables`?"),
        "{stderr}"
    );
    assert_no_debug_formatting(&stderr);
}

#[test]
fn an_unknown_key_from_the_environment_names_the_variable() {
    let (code, stderr) = run_with(GOOD, &[("TRIBUTARY__SINK__STRAEM", "shop-cdc")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "sink.straem: unknown key (environment variable TRIBUTARY__SINK__STRAEM); \
             did you mean TRIBUTARY__SINK__STREAM?"
        ),
        "{stderr}"
    );
    assert_no_debug_formatting(&stderr);
}

#[test]
fn a_bad_enum_value_lists_the_valid_ones() {
    let cases = [
        (
            GOOD.replace("region = ", "kind = \"kinesys\"\nregion = "),
            vec![],
            "sink.kind: \"kinesys\" is not one of kinesis, null (bad.toml line 10); did you mean \"kinesis\"?",
        ),
        (
            GOOD.replace("\"postgres\"", "\"oracle\""),
            vec![],
            "source.kind: \"oracle\" is not one of postgres, mysql (bad.toml line 3)",
        ),
        (
            GOOD.to_owned(),
            vec![("TRIBUTARY__SOURCE__SNAPSHOT", "full")],
            "source.snapshot: \"full\" is not one of initial, never, only \
             (environment variable TRIBUTARY__SOURCE__SNAPSHOT)",
        ),
        (
            format!("{GOOD}\n[log]\nformat = \"text\"\n"),
            vec![],
            "log.format: \"text\" is not one of json, pretty (bad.toml line 14)",
        ),
    ];
    for (config, env, expected) in cases {
        let (code, stderr) = run_with(&config, &env);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected `{expected}` in: {stderr}"
        );
        assert_no_debug_formatting(&stderr);
    }
    // `tail --from` is checked by the command line parser, the same way.
    let dir = tempfile::tempdir().unwrap();
    let out = tributary(
        &["tail", "--from", "yesterday", "--stream", "s"],
        &[],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("'yesterday'") && stderr.contains("trim-horizon, latest"),
        "{stderr}"
    );
}

#[test]
fn a_bad_value_says_which_line_holds_it() {
    let (code, stderr) = run_with(&format!("{GOOD}\n[sink.quota]\nshare = 1.5\n"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("sink.quota.share: must be > 0 and <= 1, got 1.5 (bad.toml line 14)"),
        "{stderr}"
    );
}

#[test]
fn a_missing_key_says_where_to_add_it() {
    let (code, stderr) = run_with(&GOOD.replace("name = \"shop\"\n", ""), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "source.name: missing: add `name = ...` under [source] in bad.toml, \
             or set TRIBUTARY__SOURCE__NAME"
        ),
        "{stderr}"
    );
}

#[test]
fn environment_overrides_every_key() {
    // An unknown key from the environment is an error too.
    let (code, stderr) = run_with(GOOD, &[("TRIBUTARY__SOURCE__BOGUS", "1")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("source.bogus"), "{stderr}");
    // An override replaces the file's value (here with a broken one, to see it).
    let (code, stderr) = run_with(GOOD, &[("TRIBUTARY__SOURCE__URL", "mysql://x@y/z")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("source.url")
            && stderr.contains("mysql://x@y/z")
            && stderr.contains("(environment variable TRIBUTARY__SOURCE__URL)"),
        "{stderr}"
    );
    let (code, stderr) = run_with(GOOD, &[("TRIBUTARY__SOURCE__POSTGRES__SLOT", "Bad-Slot")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("source.postgres.slot"), "{stderr}");
}

#[test]
fn a_missing_config_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = tributary(&["run", "-c", "nope.toml"], &[], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.toml"));
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expect) in [
        (vec!["--help"], "tail"),
        (vec!["run", "--help"], "--config"),
        (vec!["tail", "--help"], "--follow"),
    ] {
        let out = tributary(&args, &[], dir.path());
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(expect), "{args:?}: {text}");
    }
    let out = tributary(
        &["tail", "--from", "yesterday", "--stream", "s"],
        &[],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

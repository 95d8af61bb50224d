//! No command prints the database password: each command runs with a known
//! password (in the URL, in TRIBUTARY__SOURCE__PASSWORD, in password_file,
//! right and wrong, with debug logs) and all its output is searched for it.

use std::path::Path;
use std::time::Duration;

use tributary_integration_tests::{
    DEFAULT_DATABASE, EMULATOR_AWS_ENV, SCRAM_USER, SLOT, Servers, TributaryProcess, tributary_bin,
    write_config,
};

const STREAM: &str = "secret-cdc";
const PASSWORD: &str = "Xyzzy-9f3e1c-PW";
const WRONG: &str = "Wrong-77ab20-PW";
const ADMIN_PASSWORD: &str = "Admin-5d41aa-PW";

/// Runs `tributary <args>`; returns stdout and stderr together.
fn output_of(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> String {
    let out = std::process::Command::new(tributary_bin().expect("tributary binary"))
        .args(args)
        .envs(EMULATOR_AWS_ENV)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .output()
        .expect("tributary runs");
    // The command line itself holds the password: it is not output.
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_secret(output: &str) {
    for secret in [PASSWORD, WRONG, ADMIN_PASSWORD] {
        assert!(!output.contains(secret), "a password leaked:\n{output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_prints_the_password() -> anyhow::Result<()> {
    let servers = Servers::start(STREAM, 1, "CREATE TABLE items (id int PRIMARY KEY)").await?;
    let admin = servers.pg.superuser_client(DEFAULT_DATABASE).await?;
    admin
        .batch_execute(&format!(
            "CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{PASSWORD}'; \
             GRANT SELECT ON items TO {SCRAM_USER}"
        ))
        .await?;
    let dir = tempfile::tempdir()?;
    let port = servers.pg.port();
    let url = |password: &str| {
        format!("postgres://{SCRAM_USER}:{password}@127.0.0.1:{port}/{DEFAULT_DATABASE}")
    };
    let config_with = |name: &str, source: &str| -> anyhow::Result<String> {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub)?;
        let extra = format!("[source]\n{source}\n[log]\nlevel = \"debug\"\nformat = \"json\"\n");
        let config = write_config(&sub, &servers.pg, &servers.kin, STREAM, &extra)?;
        Ok(config.path.to_str().expect("utf-8 path").to_owned())
    };
    let in_url = config_with("url", &format!("url = \"{}\"", url(PASSWORD)))?;
    let wrong_in_url = config_with("wrong", &format!("url = \"{}\"", url(WRONG)))?;
    let bare = format!("postgres://{SCRAM_USER}@127.0.0.1:{port}/{DEFAULT_DATABASE}");
    let in_env = config_with("env", &format!("url = \"{bare}\""))?;
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, format!("{PASSWORD}\n"))?;
    let in_file = config_with(
        "file",
        &format!(
            "url = \"{bare}\"\npassword_file = \"{}\"",
            password_file.display()
        ),
    )?;
    let admin_url =
        format!("postgres://postgres:{ADMIN_PASSWORD}@127.0.0.1:{port}/{DEFAULT_DATABASE}");
    let env = [("TRIBUTARY__SOURCE__PASSWORD", PASSWORD)];
    let wrong_env = [("TRIBUTARY__SOURCE__PASSWORD", WRONG)];
    let cwd = dir.path();

    let mut outputs = Vec::new();
    for (config, env) in [
        (&in_url, &[][..]),
        (&wrong_in_url, &[][..]),
        (&in_env, &env[..]),
        (&in_env, &wrong_env[..]),
        (&in_file, &[][..]),
    ] {
        for args in [
            &["check", "-c", config][..],
            &["check", "--json", "-c", config],
            &["setup", "-c", config],
            &["setup", "-c", config, "--admin-url", &admin_url],
            &["slots", "list", "-c", config],
            &["slots", "drop", "no_such_slot", "-c", config],
            &["tail", "--stream", STREAM, "-c", config],
            &["dead-letter", "list", "-c", config],
        ] {
            outputs.push(output_of(args, env, cwd));
        }
    }
    // The right password works (so the commands above did authenticate)...
    assert!(
        outputs[0].contains("✓ postgres connection"),
        "{}",
        outputs[0]
    );
    // ...and the wrong one (the next config, 8 commands on) is reported
    // without being shown.
    assert!(
        outputs[8].contains("✗ postgres connection"),
        "{}",
        outputs[8]
    );
    // `run` with a wrong password stops at start-up.
    for (config, env) in [(&wrong_in_url, &[][..]), (&in_env, &wrong_env[..])] {
        let output = output_of(&["run", "-c", config], env, cwd);
        assert!(
            output.contains("password authentication failed"),
            "{output}"
        );
        outputs.push(output);
    }
    // A config error that quotes the URL.
    let broken = config_with(
        "broken",
        &format!("url = \"postgresql://{SCRAM_USER}:{PASSWORD}@127.0.0.1:notaport/db\""),
    )?;
    outputs.push(output_of(&["check", "-c", &broken], &[], cwd));
    assert!(outputs.last().is_some_and(|o| o.contains("source.url")));

    // A DBA prepares the server for the role (REPLICATION, the
    // publication, the slot); `run` then streams with debug logs and stops.
    let applied = output_of(
        &["setup", "--apply", "-c", &in_url, "--admin-url", &admin_url],
        &[],
        cwd,
    );
    assert!(applied.contains("-- applied"), "{applied}");
    outputs.push(applied);
    for (config, env) in [(&in_url, &[][..]), (&in_env, &env[..])] {
        let mut run = TributaryProcess::run(Path::new(config.as_str()), env)?;
        run.wait_streaming(&servers.pg, SLOT, Duration::from_secs(30))
            .await?;
        servers
            .pg
            .execute("INSERT INTO items VALUES (1)")
            .await
            .ok();
        run.stop_gracefully(Duration::from_secs(30)).await?;
        outputs.push(run.logs());
    }
    for output in &outputs {
        assert_no_secret(output);
    }
    Ok(())
}

//! The files under `docker/` (issue 9, item 9) checked against the binary
//! they package, since no container engine runs here: every config file
//! loads with the parser `tributary check` uses, every `tributary`
//! invocation (image CMD, compose commands, the sidecar's args) uses only
//! subcommands and flags the binary's help lists, the ports and paths agree
//! with `[http] listen` and `[state] dir`, the probes hit `/healthz` and
//! `/readyz`, and the image runs as a non-root user.

use std::path::{Path, PathBuf};
use std::process::Output;

use toml::{Table, Value};
use tributary_integration_tests::{free_port, tributary_bin};

/// Where the image expects its config (the CMD's `-c`).
const CONFIG_IN_IMAGE: &str = "/etc/tributary/config.toml";

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker")
}

fn read(relative: &str) -> String {
    let path = docker_dir().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn tributary(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = std::process::Command::new(tributary_bin().expect("tributary binary"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TRIBUTARY__") || key.starts_with("AWS_") {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("tributary runs")
}

/// Fails unless `args` (without the program name) is a subcommand the
/// binary has, with flags its `--help` lists.
fn assert_invocation(args: &[String], origin: &str) {
    let sub = args
        .first()
        .unwrap_or_else(|| panic!("{origin}: no subcommand"));
    let out = tributary(&[sub, "--help"], &[]);
    assert!(
        out.status.success(),
        "{origin}: `tributary {sub}` is not a subcommand: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in args.iter().filter(|a| a.starts_with('-')) {
        let listed = help
            .split(|c: char| c.is_whitespace() || c == ',' || c == '=')
            .any(|word| word == flag);
        assert!(
            listed,
            "{origin}: `tributary {sub}` has no flag {flag}\n{help}"
        );
    }
}

/// The strings of a JSON-style array (`["run", "-c", "x"]`) in `line`.
fn json_array(line: &str) -> Vec<String> {
    let start = line
        .find('[')
        .unwrap_or_else(|| panic!("no array in {line:?}"));
    let end = line
        .rfind(']')
        .unwrap_or_else(|| panic!("no array in {line:?}"));
    serde_json::from_str(&line[start..=end]).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// The value of the first `key: value` line (YAML) or `KEY value` line
/// (Dockerfile) after trimming, for each occurrence.
fn values_of<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix(key))
        .map(str::trim)
        .collect()
}

fn config(relative: &str) -> Table {
    toml::from_str(&read(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

fn str_at<'a>(table: &'a Table, section: &str, key: &str) -> &'a str {
    table[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("[{section}] {key} is not a string"))
}

fn listen_port(table: &Table) -> u16 {
    let listen = str_at(table, "http", "listen");
    assert!(
        listen.starts_with("0.0.0.0:"),
        "in a container [http] listen must take outside connections: {listen}"
    );
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

/// The configs shipped under docker/: (file, source host:port the
/// deployment next to it provides).
const CONFIGS: [(&str, &str); 3] = [
    ("config.toml", "postgres:5432"),
    ("config-mysql.toml", "mariadb:3306"),
    ("kubernetes/config.toml", "127.0.0.1:5432"),
];

#[test]
fn every_config_loads_with_the_binarys_parser() {
    // The source URL goes to a closed loopback port: loading is what is
    // checked, and no server (nor this machine's own) is contacted.
    let closed = free_port().unwrap();
    for (file, source_at) in CONFIGS {
        let table = config(file);
        let url = str_at(&table, "source", "url");
        assert!(url.contains(&format!("@{source_at}/")), "{file}: {url}");
        let scheme = url.split("://").next().unwrap();
        let elsewhere = format!("{scheme}://tributary@127.0.0.1:{closed}/shop");
        let path = docker_dir().join(file);
        let out = tributary(
            &["check", "-c", path.to_str().unwrap()],
            &[
                ("TRIBUTARY__SOURCE__URL", &elsewhere),
                ("TRIBUTARY__SOURCE__PASSWORD", "x"),
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("invalid configuration") && stdout.contains("connection:"),
            "{file} does not load:\n{stdout}\n{stderr}"
        );
        assert_eq!(listen_port(&table), 9187, "{file}");
        assert_eq!(
            str_at(&table, "state", "dir"),
            "/var/lib/tributary",
            "{file}"
        );
    }

    // The same check fails on a key the binary does not have.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        read("config.toml").replace("[http]\n", "[http]\nlisten_port = 9187\n"),
    )
    .unwrap();
    let out = tributary(&["check", "-c", bad.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("http.listen_port"), "{stderr}");
}

#[test]
fn the_image_is_multi_stage_non_root_and_runs_the_binary_with_the_mounted_config() {
    let dockerfile = read("Dockerfile");
    let stages: Vec<&str> = values_of(&dockerfile, "FROM ");
    assert!(
        stages.len() >= 2,
        "a builder and a runtime stage: {stages:?}"
    );
    assert!(
        stages[0].contains("rust") && stages[0].ends_with("AS build"),
        "{stages:?}"
    );
    let runtime = dockerfile.rsplit("\nFROM ").next().unwrap();
    assert!(
        !runtime.contains("cargo") && !runtime.contains("rustup"),
        "the runtime stage holds no toolchain"
    );
    let copies = values_of(runtime, "COPY ");
    assert_eq!(
        copies,
        ["--from=build /src/target/release/tributary /usr/local/bin/tributary"],
        "the runtime stage copies the binary only"
    );
    let users = values_of(runtime, "USER ");
    let user = users.last().expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "root" && uid != "0", "runs as root: USER {user}");
    assert_eq!(
        values_of(runtime, "ENTRYPOINT ")
            .iter()
            .map(|l| json_array(l))
            .collect::<Vec<_>>(),
        [vec!["tributary".to_owned()]]
    );
    let cmd = json_array(values_of(runtime, "CMD ").last().expect("CMD"));
    assert_eq!(cmd, ["run", "-c", CONFIG_IN_IMAGE]);
    assert_invocation(&cmd, "Dockerfile CMD");
    let exposed: Vec<&str> = values_of(runtime, "EXPOSE ");
    assert_eq!(exposed, ["9187"], "EXPOSE is [http] listen's port");
    assert!(runtime.contains("VOLUME [\"/var/lib/tributary\"]"));
    assert!(
        runtime.contains("chown 10001:10001 /var/lib/tributary"),
        "the non-root user can write [state] dir"
    );
    // The sidecar's securityContext names the same user.
    let sidecar = read("kubernetes/sidecar.yaml");
    assert!(sidecar.contains(&format!("runAsUser: {uid}")), "{uid}");
    assert!(sidecar.contains("runAsNonRoot: true"));
}

#[test]
fn compose_runs_both_sources_the_emulator_and_prometheus_with_the_checked_configs() {
    let compose = read("compose.yaml");
    for needed in [
        "image: postgres:15",
        "\"wal_level=logical\"",
        "image: mariadb:",
        "\"--binlog-format=ROW\"",
        "\"--binlog-row-image=FULL\"",
        "kinesalite",
        "image: prom/prometheus",
        "dockerfile: docker/Dockerfile",
    ] {
        assert!(compose.contains(needed), "compose.yaml lacks {needed}");
    }
    // Every tributary command, and the one in the usage comment.
    let commands: Vec<Vec<String>> = values_of(&compose, "command: [")
        .iter()
        .map(|rest| json_array(&format!("[{rest}")))
        .filter(|args| args[0] == "run")
        .collect();
    assert_eq!(commands.len(), 2, "one per connector: {commands:?}");
    for args in &commands {
        assert_eq!(args, &["run", "-c", CONFIG_IN_IMAGE]);
        assert_invocation(args, "compose.yaml command");
    }
    let usage = compose
        .lines()
        .find_map(|l| l.split("exec tributary tributary ").nth(1))
        .expect("the usage comment shows tail");
    let usage: Vec<String> = usage.split_whitespace().map(str::to_owned).collect();
    assert_invocation(&usage, "compose.yaml usage comment");
    // The configs mounted where CMD reads them are the ones checked above.
    for file in ["config.toml", "config-mysql.toml"] {
        let mount = format!("./{file}:{CONFIG_IN_IMAGE}:ro");
        assert!(compose.contains(&mount), "compose.yaml mounts {mount}");
        let port = listen_port(&config(file));
        assert!(
            compose.contains(&format!(":{port}\"")),
            "compose.yaml publishes [http] listen's port {port}"
        );
    }
    let streams: Vec<String> = ["config.toml", "config-mysql.toml"]
        .iter()
        .map(|f| str_at(&config(f), "sink", "stream").to_owned())
        .collect();
    for stream in &streams {
        assert!(
            compose.contains(&format!("--stream-name {stream} ")),
            "compose.yaml creates stream {stream}"
        );
    }
    let prometheus = read("prometheus.yml");
    assert_eq!(values_of(&prometheus, "metrics_path:"), ["/metrics"]);
    assert!(prometheus.contains("\"tributary:9187\""));
    assert!(prometheus.contains("\"tributary-mysql:9187\""));
}

#[test]
fn the_sidecar_probes_healthz_and_readyz_on_the_listen_port() {
    let sidecar = read("kubernetes/sidecar.yaml");
    let k8s = config("kubernetes/config.toml");
    let port = listen_port(&k8s);
    for (probe, path) in [
        ("livenessProbe:", "/healthz"),
        ("readinessProbe:", "/readyz"),
    ] {
        let after = sidecar
            .split(probe)
            .nth(1)
            .unwrap_or_else(|| panic!("no {probe}"));
        let block: Vec<&str> = after.lines().take(5).map(str::trim).collect();
        assert!(
            block.contains(&format!("path: {path}").as_str()),
            "{probe} {block:?}"
        );
        assert!(
            block.contains(&format!("port: {port}").as_str()),
            "{probe} {block:?}"
        );
    }
    let line = sidecar
        .lines()
        .find(|l| l.trim().starts_with("args: [\"run\""))
        .expect("the tributary container's args");
    let args = json_array(line);
    assert_eq!(args, ["run", "-c", CONFIG_IN_IMAGE]);
    assert_invocation(&args, "sidecar.yaml args");
    assert!(sidecar.contains("mountPath: /etc/tributary\n"));
    assert!(sidecar.contains(&format!("mountPath: {}\n", str_at(&k8s, "state", "dir"))));
    // SIGTERM drains: the grace period outlasts sink.drain_timeout_secs.
    let grace: u64 = values_of(&sidecar, "terminationGracePeriodSeconds:")[0]
        .parse()
        .unwrap();
    let drain = k8s["sink"]["drain_timeout_secs"].as_integer().unwrap();
    assert!(grace > drain as u64, "grace {grace} s, drain {drain} s");
    assert!(matches!(
        k8s["source"]["postgres"]["read_timeout_secs"],
        Value::Integer(_)
    ));
}

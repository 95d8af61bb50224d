//! The config file a test hands to `tributary run -c`: the contract keys of
//! PRODUCT.md pointed at a test's own [`Postgres`] and [`Kinesalite`], with
//! the test's own additions merged in.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use toml::{Table, Value};

use crate::kinesalite::Kinesalite;
use crate::mariadb::Mariadb;
use crate::net::free_port;
use crate::postgres::{DEFAULT_DATABASE, Postgres};

/// `source.name` in generated configs: the prefix of every event id.
pub const SOURCE_NAME: &str = "shop";
/// `source.postgres.slot` in generated configs.
pub const SLOT: &str = "tributary_shop";
/// `source.postgres.publication` in generated configs.
pub const PUBLICATION: &str = "tributary_shop";

/// A config file written by [`write_config`].
#[derive(Debug, Clone)]
pub struct TestConfig {
    /// The file, `<dir>/tributary.toml`.
    pub path: PathBuf,
    /// `http.listen`: a free loopback port for `/healthz`, `/readyz` and
    /// `/metrics` (unless `extra_toml` overrode it).
    pub http_addr: SocketAddr,
    /// `state.dir`: `<dir>/state`.
    pub state_dir: PathBuf,
}

impl AsRef<Path> for TestConfig {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Writes `<dir>/tributary.toml` for one test run: source
/// `postgres` named [`SOURCE_NAME`] reading `public.*` of
/// [`DEFAULT_DATABASE`] with `snapshot = "never"`, slot [`SLOT`],
/// publication [`PUBLICATION`], sink `stream` on `kin`, state in
/// `<dir>/state`, JSON logs at `info`.
///
/// `extra_toml` is merged over that, table by table, so a test changes only
/// what it cares about:
///
/// ```toml
/// [source]
/// snapshot = "initial"
/// [sink]
/// kind = "null"
/// ```
pub fn write_config(
    dir: &Path,
    pg: &Postgres,
    kin: &Kinesalite,
    stream: &str,
    extra_toml: &str,
) -> Result<TestConfig> {
    write_file(dir, &pg.url(DEFAULT_DATABASE), kin, stream, &[extra_toml])
}

/// `source.mysql.server_id` in generated MySQL configs.
pub const MYSQL_SERVER_ID: u32 = 5401;

/// [`write_config`] for a MySQL source: `kind = "mysql"` on `db`'s URL,
/// tables `shop.*`, `server_id` [`MYSQL_SERVER_ID`], no `[source.postgres]`;
/// `extra_toml` merged last.
pub fn write_mysql_config(
    dir: &Path,
    db: &Mariadb,
    kin: &Kinesalite,
    stream: &str,
    extra_toml: &str,
) -> Result<TestConfig> {
    let mysql = format!(
        "[source]\nkind = \"mysql\"\ntables = [\"{DEFAULT_DATABASE}.*\"]\n\
         [source.mysql]\nserver_id = {MYSQL_SERVER_ID}\n"
    );
    write_file(dir, &db.url(), kin, stream, &[&mysql, extra_toml])
}

fn write_file(
    dir: &Path,
    url: &str,
    kin: &Kinesalite,
    stream: &str,
    extras: &[&str],
) -> Result<TestConfig> {
    let http_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let state_dir = dir.join("state");
    let mut text = String::new();
    for (i, extra) in extras.iter().enumerate() {
        if i == 0 {
            text = render_config(url, &kin.endpoint(), stream, &state_dir, http_addr, extra)?;
            if url.starts_with("mysql://") {
                let mut config: Table = toml::from_str(&text)?;
                if let Some(Value::Table(source)) = config.get_mut("source") {
                    source.remove("postgres");
                }
                text = toml::to_string(&config)?;
            }
        } else {
            let mut config: Table = toml::from_str(&text)?;
            let extra: Table = toml::from_str(extra).context("parsing the test's extra TOML")?;
            merge(&mut config, extra);
            text = toml::to_string(&config)?;
        }
    }
    let path = dir.join("tributary.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(TestConfig {
        path,
        http_addr,
        state_dir,
    })
}

fn render_config(
    url: &str,
    endpoint: &str,
    stream: &str,
    state_dir: &Path,
    http_addr: SocketAddr,
    extra_toml: &str,
) -> Result<String> {
    let Some(state_dir) = state_dir.to_str() else {
        bail!("state dir {} is not UTF-8", state_dir.display());
    };
    let mut config = table([
        (
            "source",
            Value::Table(table([
                ("kind", "postgres".into()),
                ("name", SOURCE_NAME.into()),
                ("url", url.into()),
                ("tables", Value::Array(vec!["public.*".into()])),
                ("snapshot", "never".into()),
                (
                    "postgres",
                    Value::Table(table([
                        ("slot", SLOT.into()),
                        ("publication", PUBLICATION.into()),
                    ])),
                ),
            ])),
        ),
        (
            "sink",
            Value::Table(table([
                ("stream", stream.into()),
                ("region", "us-east-1".into()),
                ("endpoint_url", endpoint.into()),
            ])),
        ),
        ("state", Value::Table(table([("dir", state_dir.into())]))),
        (
            "http",
            Value::Table(table([("listen", http_addr.to_string().into())])),
        ),
        (
            "log",
            Value::Table(table([("format", "json".into()), ("level", "info".into())])),
        ),
    ]);
    let extra: Table = toml::from_str(extra_toml).context("parsing the test's extra TOML")?;
    merge(&mut config, extra);
    Ok(toml::to_string(&config)?)
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Table {
    entries
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// Merges `extra` into `base`: tables are merged key by key, any other value
/// replaces the one in `base`.
fn merge(base: &mut Table, extra: Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(base_table)), Value::Table(extra_table)) => {
                merge(base_table, extra_table);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Rewrites `source.tables` of the config file at `path` (a test that
/// changes what is captured between two runs).
pub fn set_tables(path: &Path, tables: &[&str]) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: Table = toml::from_str(&text)?;
    let Some(Value::Table(source)) = config.get_mut("source") else {
        bail!("{} has no [source]", path.display());
    };
    source.insert(
        "tables".into(),
        Value::Array(tables.iter().map(|t| Value::from(*t)).collect()),
    );
    std::fs::write(path, toml::to_string(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(extra: &str) -> Table {
        let text = render_config(
            "postgres://tributary@127.0.0.1:5432/shop",
            "http://127.0.0.1:4567",
            "orders",
            Path::new("/tmp/x/state"),
            "127.0.0.1:9999".parse().unwrap(),
            extra,
        )
        .unwrap();
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn writes_the_contract_keys() {
        let config = render("");
        assert_eq!(config["source"]["kind"].as_str(), Some("postgres"));
        assert_eq!(config["source"]["snapshot"].as_str(), Some("never"));
        assert_eq!(config["source"]["postgres"]["slot"].as_str(), Some(SLOT));
        assert_eq!(
            config["source"]["url"].as_str(),
            Some("postgres://tributary@127.0.0.1:5432/shop")
        );
        assert_eq!(config["sink"]["stream"].as_str(), Some("orders"));
        assert_eq!(
            config["sink"]["endpoint_url"].as_str(),
            Some("http://127.0.0.1:4567")
        );
        assert_eq!(config["state"]["dir"].as_str(), Some("/tmp/x/state"));
        assert_eq!(config["http"]["listen"].as_str(), Some("127.0.0.1:9999"));
        assert_eq!(config["log"]["format"].as_str(), Some("json"));
    }

    #[test]
    fn merges_extra_toml_table_by_table() {
        let config = render(
            "[source]\nsnapshot = \"initial\"\n[sink]\nkind = \"null\"\n[sink.quota]\nshare = 0.5\n",
        );
        assert_eq!(config["source"]["snapshot"].as_str(), Some("initial"));
        // Keys the extra TOML does not name are kept.
        assert_eq!(config["source"]["kind"].as_str(), Some("postgres"));
        assert_eq!(
            config["source"]["postgres"]["publication"].as_str(),
            Some(PUBLICATION)
        );
        assert_eq!(config["sink"]["kind"].as_str(), Some("null"));
        assert_eq!(config["sink"]["stream"].as_str(), Some("orders"));
        assert_eq!(config["sink"]["quota"]["share"].as_float(), Some(0.5));
    }

    #[test]
    fn rejects_invalid_extra_toml() {
        let result = render_config(
            "u",
            "e",
            "s",
            Path::new("/tmp"),
            "127.0.0.1:1".parse().unwrap(),
            "[sink",
        );
        assert!(result.is_err());
    }
}

//! Turns a failed deserialization of the configuration into one message a
//! user can act on: the key once, where the value came from (the file and
//! its line, or the environment variable's name), and the fix (the closest
//! valid key, the values an enumerated key takes).
//!
//! This sits between `settings::load` (file + `TRIBUTARY__` environment,
//! merged by the `config` crate) and the validation of the parsed settings:
//! everything serde refuses passes through [`explain`]. The `config` crate
//! reports errors as text (`unknown field ...`, `enum X does not have variant
//! constructor Y`); only those two shapes are read from the text, every other
//! error keeps its own words, with the location added.

use std::path::Path;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use tributary_envelope::Format;

use crate::settings::{ConfigError, LogFormat, SinkKind, SnapshotMode, SourceKind};

/// The prefix of environment overrides (`TRIBUTARY__SINK__STREAM`).
const ENV_PREFIX: &str = "TRIBUTARY__";

/// Reads the names an enum accepts.
type Variants = fn() -> &'static [&'static str];

/// Enumerated keys and the type whose values they take. The values come
/// from the types themselves, so they cannot drift from what is accepted.
const ENUM_KEYS: [(&str, Variants); 5] = [
    ("source.kind", variants::<SourceKind>),
    ("source.snapshot", variants::<SnapshotMode>),
    ("sink.kind", variants::<SinkKind>),
    ("log.format", variants::<LogFormat>),
    ("sink.format", variants::<Format>),
];

/// The error for a deserialization failure of the configuration read from
/// `file` (when a file was read) and the environment.
pub fn explain(
    err: serde_path_to_error::Error<config::ConfigError>,
    file: Option<&Path>,
) -> ConfigError {
    let path = err.path().to_string();
    let inner = err.into_inner();
    let text = innermost_message(&inner);
    if let Some((field, expected)) = unknown_field(&text) {
        let key = if path.rsplit('.').next() != Some(field.as_str()) {
            join(&path, &field)
        } else {
            path
        };
        return unknown_key(&key, &field, &expected, file);
    }
    if let Some(key) = missing_key(&inner, &text, &path) {
        let env = env_name(&key);
        let message = match (file, key.rsplit_once('.')) {
            (None, None) => {
                "missing: no config file was read (none at ./config.toml): pass -c FILE".to_owned()
            }
            (None, Some(_)) => format!("missing: set {env}, or pass -c FILE"),
            (Some(file), None) => format!("missing: add a [{key}] section to {}", file.display()),
            (Some(file), Some((section, field))) => format!(
                "missing: add `{field} = ...` under [{section}] in {}, or set {env}",
                file.display()
            ),
        };
        return ConfigError::Invalid { key, message };
    }
    let key = if path == "." {
        "config".to_owned()
    } else {
        path
    };
    let origin = origin(&key, file);
    if let Some(value) = text
        .strip_prefix("enum ")
        .and_then(|rest| rest.split_once(" does not have variant constructor "))
        .map(|(_, value)| value.to_owned())
    {
        return bad_enum_value(key, &value, &origin);
    }
    ConfigError::Invalid {
        message: format!("{}{origin}", described(&inner)),
        key,
    }
}

/// Adds where the value of a validation error's key came from, when that
/// is known precisely (an environment variable, or a line of the file).
pub fn locate(err: ConfigError, file: Option<&Path>) -> ConfigError {
    match err {
        ConfigError::Invalid { key, message } => {
            let message = match origin(&key, file) {
                origin @ (Origin::Env(_) | Origin::File(_, Some(_))) => {
                    format!("{message}{origin}")
                }
                _ => message,
            };
            ConfigError::Invalid { key, message }
        }
        other => other,
    }
}

fn unknown_key(key: &str, field: &str, expected: &[String], file: Option<&Path>) -> ConfigError {
    let origin = origin(key, file);
    let mut message = format!("unknown key{origin}");
    match closest(field, expected) {
        Some(best) if matches!(origin, Origin::Env(_)) => {
            let fixed = join(parent(key).unwrap_or(""), best);
            message.push_str(&format!("; did you mean {}?", env_name(&fixed)));
        }
        Some(best) => message.push_str(&format!("; did you mean `{best}`?")),
        None if expected.is_empty() => message.push_str("; this section takes no keys"),
        None => message.push_str(&format!("; valid keys here: {}", expected.join(", "))),
    }
    ConfigError::Invalid {
        key: key.to_owned(),
        message,
    }
}

fn bad_enum_value(key: String, value: &str, origin: &Origin) -> ConfigError {
    let valid = ENUM_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, values)| values())
        .unwrap_or_default();
    let message = if valid.is_empty() {
        format!("{value:?} is not a valid value{origin}")
    } else {
        let mut message = format!("{value:?} is not one of {}{origin}", valid.join(", "));
        let owned: Vec<String> = valid.iter().map(|v| (*v).to_owned()).collect();
        if let Some(best) = closest(value, &owned) {
            message.push_str(&format!("; did you mean {best:?}?"));
        }
        message
    };
    ConfigError::Invalid { key, message }
}

/// Where a key's value came from; displayed as a parenthesis to append.
enum Origin {
    /// An environment variable (its name as spelled in the environment).
    Env(String),
    /// The config file, with the key's line where the TOML parser finds it.
    File(String, Option<usize>),
    /// Neither is known.
    Unknown,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Env(var) => write!(f, " (environment variable {var})"),
            Origin::File(file, Some(line)) => write!(f, " ({file} line {line})"),
            Origin::File(file, None) => write!(f, " ({file})"),
            Origin::Unknown => Ok(()),
        }
    }
}

/// The environment wins over the file (it overrides it).
fn origin(key: &str, file: Option<&Path>) -> Origin {
    if let Some(var) = env_var_for(key) {
        return Origin::Env(var);
    }
    match file {
        Some(file) => {
            let line = std::fs::read_to_string(file)
                .ok()
                .and_then(|text| line_of(&text, key));
            Origin::File(file.display().to_string(), line)
        }
        None => Origin::Unknown,
    }
}

/// The environment variable that sets `key`, as it is spelled in the
/// environment (the `config` crate matches names case-insensitively).
fn env_var_for(key: &str) -> Option<String> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .find(|name| {
            name.get(..ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                && name[ENV_PREFIX.len()..]
                    .to_ascii_lowercase()
                    .replace("__", ".")
                    == key
        })
}

/// The variable that would set `key`: `sink.stream` -> `TRIBUTARY__SINK__STREAM`.
fn env_name(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        key.to_ascii_uppercase().replace('.', "__")
    )
}

/// The 1-based line of `key` (dotted) in a TOML text.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut span = None;
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, value) = table.get_key_value(segment)?;
        span = Some(name.span());
        if segments.peek().is_some() {
            match value.get_ref() {
                toml::de::DeValue::Table(inner) => table = inner,
                _ => return None,
            }
        }
    }
    let start = span?.start;
    Some(text.get(..start)?.matches('\n').count() + 1)
}

/// The full key of a missing required key: the `config` crate reports it
/// as `NotFound("source.url")`, serde as `missing field `url`` at `source`.
fn missing_key(err: &config::ConfigError, text: &str, path: &str) -> Option<String> {
    match err {
        config::ConfigError::At { error, .. } => missing_key(error, text, path),
        config::ConfigError::NotFound(key) => Some(key.clone()),
        _ => text
            .strip_prefix("missing field `")
            .and_then(|rest| rest.strip_suffix('`'))
            .map(|field| join(path, field)),
    }
}

/// `unknown field `x`, expected one of `a`, `b`` -> (`x`, [`a`, `b`]).
fn unknown_field(text: &str) -> Option<(String, Vec<String>)> {
    let rest = text.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split_once("expected")
        .map(|(_, list)| {
            list.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    Some((field.to_owned(), expected))
}

/// The message of the innermost error, without the `config` crate's
/// ` for key ...` / ` in ...` suffixes.
fn innermost_message(err: &config::ConfigError) -> String {
    match err {
        config::ConfigError::At { error, .. } => innermost_message(error),
        other => other.to_string(),
    }
}

/// A readable message for the other errors (wrong types, mostly).
fn described(err: &config::ConfigError) -> String {
    match err {
        config::ConfigError::At { error, .. } => described(error),
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("expected {expected}, found {unexpected}"),
        other => other.to_string(),
    }
}

fn join(path: &str, field: &str) -> String {
    match path {
        "" | "." => field.to_owned(),
        path => format!("{path}.{field}"),
    }
}

fn parent(key: &str) -> Option<&str> {
    key.rsplit_once('.').map(|(parent, _)| parent)
}

/// The candidate closest to `word`, if it is close enough to be a typo.
fn closest<'a>(word: &str, candidates: &'a [String]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&word, c), c.as_str()))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance on characters: insertions, deletions, substitutions and
/// swaps of two neighbours each count one.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // `last` is the previous row, `before` the one before it (for swaps).
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut last: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut row = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            row[j] = (last[j] + 1).min(row[j - 1] + 1).min(last[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        before = std::mem::replace(&mut last, row);
    }
    last[b.len()]
}

/// The names a serde enum accepts, read from its `Deserialize` impl.
fn variants<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe(Option<&'static [&'static str]>);

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(variants);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }

    let mut probe = Probe(None);
    let _ = T::deserialize(&mut probe);
    probe.0.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_come_from_the_types() {
        assert_eq!(variants::<SinkKind>(), ["kinesis", "null"]);
        assert_eq!(variants::<SnapshotMode>(), ["initial", "never", "only"]);
    }

    #[test]
    fn edit_distance_counts_typos() {
        assert_eq!(edit_distance("strem", "stream"), 1);
        assert_eq!(edit_distance("straem", "stream"), 1);
        assert_eq!(edit_distance("tabels", "tables"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kinesys", "kinesis"), 1);
        let keys = ["stream".to_owned(), "region".to_owned()];
        assert_eq!(closest("strem", &keys), Some("stream"));
        assert_eq!(closest("bogus", &keys), None);
    }

    #[test]
    fn finds_the_line_of_a_key() {
        let text = "[source]\nname = \"x\"\n\n[sink]\nkind = \"k\"\n[sink.quota]\nshare = 2\n";
        assert_eq!(line_of(text, "source.name"), Some(2));
        assert_eq!(line_of(text, "sink.kind"), Some(5));
        assert_eq!(line_of(text, "sink.quota.share"), Some(7));
        assert_eq!(line_of(text, "sink.nope"), None);
        assert_eq!(line_of("not toml [", "a"), None);
    }

    #[test]
    fn reads_serde_unknown_field_messages() {
        let (field, expected) =
            unknown_field("unknown field `strem`, expected one of `kind`, `stream`").unwrap();
        assert_eq!(field, "strem");
        assert_eq!(expected, ["kind", "stream"]);
        let (_, expected) = unknown_field("unknown field `x`, there are no fields").unwrap();
        assert!(expected.is_empty());
    }
}

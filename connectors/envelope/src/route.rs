//! Stream routing: one fixed stream, or a template such as `shop.{schema}.{table}`.

use thiserror::Error;

/// A placeholder the template does not know.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    /// `{name}` is not one of `{source}`, `{db}`, `{schema}`, `{table}`.
    #[error("unknown placeholder `{{{0}}}` (use {{source}}, {{db}}, {{schema}} or {{table}})")]
    UnknownPlaceholder(String),
    /// A `{` without its `}`.
    #[error("unclosed `{{` in stream template")]
    Unclosed,
    /// The template is empty.
    #[error("stream name is empty")]
    Empty,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Source,
    Db,
    Schema,
    Table,
}

/// Resolves the stream of a table from the configured `sink.stream`.
#[derive(Clone, Debug)]
pub struct StreamRouter {
    parts: Vec<Part>,
}

impl StreamRouter {
    /// Parses a stream name or template.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        if template.is_empty() {
            return Err(TemplateError::Empty);
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or(TemplateError::Unclosed)? + open;
            parts.push(match &rest[open + 1..close] {
                "source" => Part::Source,
                "db" => Part::Db,
                "schema" => Part::Schema,
                "table" => Part::Table,
                other => return Err(TemplateError::UnknownPlaceholder(other.to_owned())),
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Self { parts })
    }

    /// True when every table goes to the same stream.
    pub fn is_fixed(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The stream for a table. `schema` falls back to `db` for MySQL.
    pub fn resolve(&self, source: &str, db: &str, schema: Option<&str>, table: &str) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Text(text) => text,
                Part::Source => source,
                Part::Db => db,
                Part::Schema => schema.unwrap_or(db),
                Part::Table => table,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_templated_streams() {
        let fixed = StreamRouter::parse("shop-cdc").unwrap();
        assert!(fixed.is_fixed());
        assert_eq!(
            fixed.resolve("s", "shop", Some("public"), "orders"),
            "shop-cdc"
        );

        let t = StreamRouter::parse("shop.{schema}.{table}").unwrap();
        assert!(!t.is_fixed());
        assert_eq!(
            t.resolve("s", "shop", Some("public"), "orders"),
            "shop.public.orders"
        );
        assert_eq!(t.resolve("s", "shop", None, "orders"), "shop.shop.orders");
        assert_eq!(
            StreamRouter::parse("{source}-{db}")
                .unwrap()
                .resolve("src", "d", None, "t"),
            "src-d"
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        assert_eq!(
            StreamRouter::parse("x.{tabel}").unwrap_err(),
            TemplateError::UnknownPlaceholder("tabel".into())
        );
        assert_eq!(
            StreamRouter::parse("x.{table").unwrap_err(),
            TemplateError::Unclosed
        );
        assert_eq!(StreamRouter::parse("").unwrap_err(), TemplateError::Empty);
    }
}

//! `tributary tail --pretty`: each envelope indented over several lines,
//! coloured when stdout is a terminal, for people reading a stream by eye.
//!
//! This is the last step of the consumers' side of the dataflow: `tail`
//! reads records and writes one JSON line each; here each line is
//! re-indented as text, token by token, so the envelope's field order and
//! number spellings stay exactly as written (a `serde_json::Value` would
//! sort the keys). A line that is not JSON is printed as it is.

use anstyle::{AnsiColor, Style};
use serde::de::IgnoredAny;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};

/// Spaces per level.
const INDENT: usize = 2;

const KEY: Style = AnsiColor::Blue.on_default().bold();
const STRING: Style = AnsiColor::Green.on_default();
const NUMBER: Style = AnsiColor::Yellow.on_default();
const LITERAL: Style = AnsiColor::Magenta.on_default();

/// Reads lines from `input` until it ends and writes each one pretty to
/// `out`, with a blank line between records.
pub async fn print_lines(
    input: impl AsyncRead + Unpin,
    out: &mut (impl AsyncWrite + Unpin),
    colour: bool,
) -> std::io::Result<()> {
    let mut lines = BufReader::new(input).lines();
    while let Some(line) = lines.next_line().await? {
        let mut text = render(&line, colour);
        text.push_str("\n\n");
        out.write_all(text.as_bytes()).await?;
    }
    out.flush().await
}

/// `line` indented (and coloured), or unchanged when it is not JSON.
pub fn render(line: &str, colour: bool) -> String {
    if serde_json::from_str::<IgnoredAny>(line).is_err() {
        return line.to_owned();
    }
    let mut out = String::with_capacity(line.len() * 2);
    let mut depth = 0usize;
    let mut rest = line.trim();
    while let Some(c) = rest.chars().next() {
        match c {
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                let after = rest[1..].trim_start();
                if after.starts_with(close) {
                    out.push(c);
                    out.push(close);
                    rest = &after[1..];
                    continue;
                }
                depth += 1;
                out.push(c);
                newline(&mut out, depth);
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            '"' => {
                let end = string_end(rest);
                let is_key = rest[end..].trim_start().starts_with(':');
                paint(
                    &mut out,
                    &rest[..end],
                    if is_key { KEY } else { STRING },
                    colour,
                );
                rest = &rest[end..];
                continue;
            }
            c if c.is_whitespace() => {}
            _ => {
                let end = rest
                    .find(|c: char| matches!(c, ',' | '}' | ']') || c.is_whitespace())
                    .unwrap_or(rest.len());
                let token = &rest[..end];
                let style = if matches!(token, "true" | "false" | "null") {
                    LITERAL
                } else {
                    NUMBER
                };
                paint(&mut out, token, style, colour);
                rest = &rest[end..];
                continue;
            }
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The byte length of the JSON string at the start of `text` (quotes
/// included); `text` starts with `"` and is valid JSON.
fn string_end(text: &str) -> usize {
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return i + 1,
            _ => {}
        }
    }
    text.len()
}

fn newline(out: &mut String, depth: usize) {
    out.push('\n');
    out.extend(std::iter::repeat_n(' ', depth * INDENT));
}

fn paint(out: &mut String, token: &str, style: Style, colour: bool) {
    if colour {
        out.push_str(&format!(
            "{}{token}{}",
            style.render(),
            style.render_reset()
        ));
    } else {
        out.push_str(token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indents_and_keeps_field_order_and_numbers() {
        let line = r#"{"v":1,"id":"a:1","key":{"id":42},"unchanged":[],"after":{"x":1.50,"s":"a\"b,}"},"n":null}"#;
        let expected = r#"{
  "v": 1,
  "id": "a:1",
  "key": {
    "id": 42
  },
  "unchanged": [],
  "after": {
    "x": 1.50,
    "s": "a\"b,}"
  },
  "n": null
}"#;
        assert_eq!(render(line, false), expected);
    }

    #[test]
    fn colours_keys_and_values_on_request() {
        let out = render(r#"{"op":"insert","n":3,"b":true}"#, true);
        assert!(out.contains(&format!("{}\"op\"{}", KEY.render(), KEY.render_reset())));
        assert!(out.contains(&format!(
            "{}\"insert\"{}",
            STRING.render(),
            STRING.render_reset()
        )));
        assert!(out.contains(&format!("{}3{}", NUMBER.render(), NUMBER.render_reset())));
        assert!(out.contains(&format!(
            "{}true{}",
            LITERAL.render(),
            LITERAL.render_reset()
        )));
    }

    #[test]
    fn leaves_other_lines_alone() {
        assert_eq!(render("not json {", true), "not json {");
    }
}

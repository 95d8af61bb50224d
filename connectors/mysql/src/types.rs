//! Binlog values to JSON, written straight into the envelope's buffer.
//!
//! Part of the decoder stage: `mysql_async` reads each column's raw binlog
//! value; this module renders it as PRODUCT.md says (integers exact, signed
//! and unsigned; DECIMAL as a string; TIMESTAMP in UTC with `Z`; ENUM and SET
//! as their labels from the TABLE_MAP metadata; binary strings as base64;
//! JSON embedded). A value this module does not know is passed as text.

use mysql_async::Value;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use tributary_envelope::json;

/// The `binary` character set (BINARY, VARBINARY, BLOB columns).
pub const BINARY_CHARSET: u16 = 63;
/// `utf8mb4_general_ci`: the snapshot session's result character set.
pub const UTF8MB4_CHARSET: u16 = 45;

/// How one column's values are rendered, from the TABLE_MAP event (and the
/// catalog where the binlog does not tell).
#[derive(Clone, Debug, PartialEq)]
pub struct ColumnKind {
    /// The binlog type (ENUM and SET resolved from STRING's metadata).
    pub column_type: ColumnType,
    /// Fractional-second digits of temporal types; the width of BIT.
    pub precision: u8,
    /// ENUM / SET labels in declaration order.
    pub labels: Vec<String>,
    /// Declared UNSIGNED (numeric columns).
    pub unsigned: bool,
    /// The column holds JSON text (MariaDB's JSON is LONGTEXT with a
    /// `json_valid` check): embed it.
    pub json_text: bool,
}

/// Renders `value` of a column of `kind` whose character set is `charset`.
pub fn render(kind: &ColumnKind, charset: u16, value: &BinlogValue<'_>, out: &mut Vec<u8>) {
    match value {
        BinlogValue::Value(value) => render_value(kind, charset, value, out),
        BinlogValue::Jsonb(jsonb) => match serde_json::Value::try_from(jsonb.clone()) {
            Ok(json) => write_json(&json, out),
            Err(_) => out.extend_from_slice(b"null"),
        },
        // Partial JSON updates (MySQL binlog_row_value_options) carry a
        // diff, not the value: FULL row image capture never asks for them.
        BinlogValue::JsonDiff(_) => out.extend_from_slice(b"null"),
    }
}

fn write_json(json: &serde_json::Value, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, json);
}

fn render_value(kind: &ColumnKind, charset: u16, value: &Value, out: &mut Vec<u8>) {
    use ColumnType::*;
    match (kind.column_type, value) {
        (_, Value::NULL) => out.extend_from_slice(b"null"),
        (MYSQL_TYPE_ENUM, Value::Int(index)) => enum_label(&kind.labels, *index, out),
        (MYSQL_TYPE_SET, Value::Bytes(mask)) => set_labels(&kind.labels, mask, out),
        (MYSQL_TYPE_BIT, Value::Bytes(bits)) => {
            let value = bits.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b));
            json::write_u64(out, value);
        }
        (MYSQL_TYPE_YEAR, Value::Bytes(text)) => {
            // The library renders the stored byte as 1900 + n; 0 is the
            // zero year `0000`.
            if text == b"1900" {
                out.push(b'0');
            } else {
                out.extend_from_slice(text);
            }
        }
        (MYSQL_TYPE_NEWDECIMAL | MYSQL_TYPE_DECIMAL, Value::Bytes(text)) => {
            out.push(b'"');
            out.extend_from_slice(text);
            out.push(b'"');
        }
        (MYSQL_TYPE_TIMESTAMP2 | MYSQL_TYPE_TIMESTAMP, v) => timestamp(kind.precision, v, out),
        (MYSQL_TYPE_GEOMETRY, Value::Bytes(bytes)) => hex(bytes, out),
        (
            MYSQL_TYPE_STRING
            | MYSQL_TYPE_VARCHAR
            | MYSQL_TYPE_VAR_STRING
            | MYSQL_TYPE_BLOB
            | MYSQL_TYPE_TINY_BLOB
            | MYSQL_TYPE_MEDIUM_BLOB
            | MYSQL_TYPE_LONG_BLOB,
            Value::Bytes(bytes),
        ) => string(kind, charset, bytes, out),
        (MYSQL_TYPE_JSON, Value::Bytes(bytes)) => embed_json(bytes, out),
        (MYSQL_TYPE_INT24, Value::Int(v)) if !kind.unsigned && *v >= 0x80_0000 => {
            // A signed MEDIUMINT read without sign extension.
            let v = v - 0x100_0000;
            out.push(b'-');
            json::write_u64(out, v.unsigned_abs());
        }
        (_, Value::Int(i)) => {
            if *i < 0 {
                out.push(b'-');
            }
            json::write_u64(out, i.unsigned_abs());
        }
        (_, Value::UInt(u)) => json::write_u64(out, *u),
        (_, Value::Float(f)) => float(f64::from(*f), &f.to_string(), out),
        (_, Value::Double(d)) => float(*d, &d.to_string(), out),
        (MYSQL_TYPE_NEWDATE | MYSQL_TYPE_DATE, Value::Date(y, m, d, ..)) => {
            out.push(b'"');
            date(out, *y, *m, *d);
            out.push(b'"');
        }
        (_, Value::Date(y, mo, d, h, mi, s, us)) => {
            out.push(b'"');
            date(out, *y, *mo, *d);
            out.push(b'T');
            padded(out, u64::from(*h), 2);
            out.push(b':');
            padded(out, u64::from(*mi), 2);
            out.push(b':');
            padded(out, u64::from(*s), 2);
            fraction(kind.precision, *us, out);
            out.push(b'"');
        }
        (_, Value::Time(negative, days, h, m, s, us)) => {
            let hours = u64::from(*days) * 24 + u64::from(*h);
            let sign = if *negative { "-" } else { "" };
            out.extend_from_slice(format!("\"{sign}{hours:02}:{m:02}:{s:02}").as_bytes());
            fraction(kind.precision, *us, out);
            out.push(b'"');
        }
        (_, Value::Bytes(bytes)) => json::write_str(out, &String::from_utf8_lossy(bytes)),
    }
}

/// A value read by a snapshot `SELECT` (binary protocol) in the shape
/// the binlog gives the same value, so [`render`] writes the same JSON
/// through both paths: ENUM labels become their 1-based index, SET label
/// lists their bitmask, YEAR numbers the library's `1900 + n` text, and
/// TIMESTAMP (read in a UTC session) seconds since the epoch. Everything
/// else already has the binlog's shape.
pub fn from_snapshot(kind: &ColumnKind, value: Value) -> Value {
    use ColumnType::*;
    match (kind.column_type, value) {
        (_, Value::NULL) => Value::NULL,
        (MYSQL_TYPE_ENUM, Value::Bytes(label)) => {
            let index = kind
                .labels
                .iter()
                .position(|l| l.as_bytes() == label.as_slice())
                .map_or(0, |i| i + 1);
            Value::Int(i64::try_from(index).unwrap_or(0))
        }
        (MYSQL_TYPE_SET, Value::Bytes(list)) => {
            let mut mask = vec![0u8; kind.labels.len().div_ceil(8).max(1)];
            for member in list.split(|b| *b == b',').filter(|m| !m.is_empty()) {
                if let Some(i) = kind.labels.iter().position(|l| l.as_bytes() == member) {
                    mask[i / 8] |= 1 << (i % 8);
                }
            }
            Value::Bytes(mask)
        }
        (MYSQL_TYPE_YEAR, Value::Int(0) | Value::UInt(0)) => Value::Bytes(b"1900".to_vec()),
        (MYSQL_TYPE_YEAR, Value::Int(year)) => Value::Bytes(year.to_string().into_bytes()),
        (MYSQL_TYPE_YEAR, Value::UInt(year)) => Value::Bytes(year.to_string().into_bytes()),
        (MYSQL_TYPE_TIMESTAMP2 | MYSQL_TYPE_TIMESTAMP, Value::Date(y, mo, d, h, mi, s, us)) => {
            let days = days_from_civil(i64::from(y), i64::from(mo), i64::from(d));
            let secs = days * 86_400 + i64::from(h) * 3_600 + i64::from(mi) * 60 + i64::from(s);
            let text = if us == 0 {
                secs.to_string()
            } else {
                format!("{secs}.{us:06}")
            };
            Value::Bytes(text.into_bytes())
        }
        (_, value) => value,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `.ffffff` cut to the column's `digits` (none for 0).
fn fraction(digits: u8, micros: u32, out: &mut Vec<u8>) {
    let digits = usize::from(digits.min(6));
    if digits > 0 {
        out.push(b'.');
        let start = out.len();
        padded(out, u64::from(micros), 6);
        out.truncate(start + digits);
    }
}

/// `YYYY-MM-DD`, as `format!("{y:04}-{m:02}-{d:02}")` writes it.
fn date(out: &mut Vec<u8>, y: u16, m: u8, d: u8) {
    padded(out, u64::from(y), 4);
    out.push(b'-');
    padded(out, u64::from(m), 2);
    out.push(b'-');
    padded(out, u64::from(d), 2);
}

/// `value` in at least `width` digits, zeros in front (`{value:0width$}`)
/// without the formatter's allocation: snapshot rows render millions.
fn padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = 1;
    let mut rest = value / 10;
    while rest > 0 {
        digits += 1;
        rest /= 10;
    }
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits)));
    json::write_u64(out, value);
}

/// TIMESTAMP arrives as `seconds[.micros]` since the epoch (UTC).
fn timestamp(digits: u8, value: &Value, out: &mut Vec<u8>) {
    let (secs, micros) = match value {
        Value::Bytes(text) => {
            let text = String::from_utf8_lossy(text);
            let (secs, frac) = text.split_once('.').unwrap_or((&text, "0"));
            match (secs.parse::<i64>(), frac.parse::<u32>()) {
                (Ok(s), Ok(f)) => (s, f),
                _ => return json::write_str(out, &text),
            }
        }
        Value::Int(secs) => (*secs, 0),
        other => return json::write_str(out, &format!("{other:?}")),
    };
    let rendered = tributary_envelope::time::format_unix_micros(
        secs.saturating_mul(1_000_000) + i64::from(micros),
    );
    out.push(b'"');
    out.extend_from_slice(&rendered[..19]);
    fraction(digits, micros, out);
    out.extend_from_slice(b"Z\"");
}

fn float(value: f64, text: &str, out: &mut Vec<u8>) {
    if value.is_finite() {
        out.extend_from_slice(text.as_bytes());
    } else {
        json::write_str(out, text);
    }
}

fn enum_label(labels: &[String], index: i64, out: &mut Vec<u8>) {
    // 0 is the empty "error" value MySQL stores for an invalid ENUM.
    let label = usize::try_from(index)
        .ok()
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| labels.get(i));
    match label {
        Some(label) => json::write_str(out, label),
        None if index == 0 => out.extend_from_slice(b"\"\""),
        None => json::write_u64(out, index.unsigned_abs()),
    }
}

fn set_labels(labels: &[String], mask: &[u8], out: &mut Vec<u8>) {
    out.push(b'[');
    let mut first = true;
    for (byte_index, byte) in mask.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            let index = byte_index * 8 + bit;
            match labels.get(index) {
                Some(label) => json::write_str(out, label),
                None => json::write_u64(out, index as u64 + 1),
            }
        }
    }
    out.push(b']');
}

fn string(kind: &ColumnKind, charset: u16, bytes: &[u8], out: &mut Vec<u8>) {
    if charset == BINARY_CHARSET {
        return json::write_base64(out, bytes);
    }
    if kind.json_text {
        return embed_json(bytes, out);
    }
    if is_latin1(charset) {
        let text: String = bytes.iter().map(|&b| char::from(b)).collect();
        return json::write_str(out, &text);
    }
    json::write_str(out, &String::from_utf8_lossy(bytes));
}

/// Valid JSON text is embedded as it is; anything else becomes a string.
fn embed_json(bytes: &[u8], out: &mut Vec<u8>) {
    match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        Ok(_) => out.extend_from_slice(bytes.trim_ascii()),
        Err(_) => json::write_str(out, &String::from_utf8_lossy(bytes)),
    }
}

/// The latin1 collations (`latin1_*`), whose bytes are code points.
fn is_latin1(charset: u16) -> bool {
    matches!(charset, 5 | 8 | 15 | 31 | 47 | 48 | 49 | 94)
}

fn hex(bytes: &[u8], out: &mut Vec<u8>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xF)]);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(column_type: ColumnType) -> ColumnKind {
        ColumnKind {
            column_type,
            precision: 0,
            labels: Vec::new(),
            unsigned: false,
            json_text: false,
        }
    }

    fn r(kind: &ColumnKind, charset: u16, value: Value) -> serde_json::Value {
        let mut out = Vec::new();
        render(kind, charset, &BinlogValue::Value(value), &mut out);
        serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn numbers_are_exact() {
        use ColumnType::*;
        let long = kind(MYSQL_TYPE_LONGLONG);
        assert_eq!(
            r(&long, 0, Value::UInt(u64::MAX)),
            serde_json::json!(u64::MAX)
        );
        assert_eq!(
            r(&long, 0, Value::Int(i64::MIN)),
            serde_json::json!(i64::MIN)
        );
        let dec = kind(MYSQL_TYPE_NEWDECIMAL);
        assert_eq!(
            r(
                &dec,
                0,
                Value::Bytes(b"-12345678901234567890.000001".to_vec())
            ),
            "-12345678901234567890.000001"
        );
        assert_eq!(r(&kind(MYSQL_TYPE_FLOAT), 0, Value::Float(1.5)), 1.5);
        let mut medium = kind(MYSQL_TYPE_INT24);
        assert_eq!(r(&medium, 0, Value::Int(0x80_0000)), -8_388_608);
        assert_eq!(r(&medium, 0, Value::Int(0x7F_FFFF)), 8_388_607);
        medium.unsigned = true;
        assert_eq!(r(&medium, 0, Value::Int(0x80_0000)), 8_388_608);
        assert_eq!(r(&kind(MYSQL_TYPE_BIT), 0, Value::Bytes(vec![1, 2])), 258);
        assert_eq!(
            r(&kind(MYSQL_TYPE_YEAR), 0, Value::Bytes(b"2155".to_vec())),
            2155
        );
        assert_eq!(
            r(&kind(MYSQL_TYPE_YEAR), 0, Value::Bytes(b"1900".to_vec())),
            0
        );
    }

    #[test]
    fn temporal_values() {
        use ColumnType::*;
        let mut ts = kind(MYSQL_TYPE_TIMESTAMP2);
        ts.precision = 6;
        assert_eq!(
            r(&ts, 0, Value::Bytes(b"1700000000.000123".to_vec())),
            "2023-11-14T22:13:20.000123Z"
        );
        ts.precision = 0;
        assert_eq!(
            r(&ts, 0, Value::Bytes(b"0".to_vec())),
            "1970-01-01T00:00:00Z"
        );
        let mut dt = kind(MYSQL_TYPE_DATETIME2);
        dt.precision = 3;
        assert_eq!(
            r(&dt, 0, Value::Date(2026, 11, 23, 5, 21, 5, 123_000)),
            "2026-11-23T05:21:05.123"
        );
        assert_eq!(
            r(
                &kind(MYSQL_TYPE_NEWDATE),
                0,
                Value::Date(2026, 2, 3, 0, 0, 0, 0)
            ),
            "2026-02-03"
        );
        let time = kind(MYSQL_TYPE_TIME2);
        assert_eq!(
            r(&time, 0, Value::Time(true, 34, 22, 59, 59, 0)),
            "-838:59:59"
        );
        assert_eq!(r(&time, 0, Value::Time(false, 0, 1, 2, 3, 0)), "01:02:03");
    }

    #[test]
    fn snapshot_values_take_the_binlog_shape() {
        use ColumnType::*;
        let snap = |kind: &ColumnKind, value: Value| r(kind, 45, from_snapshot(kind, value));
        let mut e = kind(MYSQL_TYPE_ENUM);
        e.labels = vec!["small".into(), "large".into()];
        assert_eq!(snap(&e, Value::Bytes(b"large".to_vec())), "large");
        assert_eq!(snap(&e, Value::Bytes(Vec::new())), "");
        let mut s = kind(MYSQL_TYPE_SET);
        s.labels = (0..10).map(|i| format!("m{i}")).collect();
        assert_eq!(
            snap(&s, Value::Bytes(b"m0,m9".to_vec())),
            serde_json::json!(["m0", "m9"])
        );
        assert_eq!(snap(&s, Value::Bytes(Vec::new())), serde_json::json!([]));
        let year = kind(MYSQL_TYPE_YEAR);
        assert_eq!(snap(&year, Value::Int(2155)), 2155);
        assert_eq!(snap(&year, Value::UInt(0)), 0);
        let mut ts = kind(MYSQL_TYPE_TIMESTAMP2);
        ts.precision = 6;
        assert_eq!(
            snap(&ts, Value::Date(2023, 11, 14, 22, 13, 20, 123)),
            "2023-11-14T22:13:20.000123Z"
        );
        ts.precision = 0;
        assert_eq!(
            snap(&ts, Value::Date(1970, 1, 1, 0, 0, 0, 0)),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn strings_enums_sets() {
        use ColumnType::*;
        let text = kind(MYSQL_TYPE_VARCHAR);
        assert_eq!(r(&text, 45, Value::Bytes("é😀".as_bytes().to_vec())), "é😀");
        assert_eq!(
            r(&text, 8, Value::Bytes(vec![0x63, 0x61, 0x66, 0xE9])),
            "café"
        );
        assert_eq!(r(&text, BINARY_CHARSET, Value::Bytes(vec![0, 255])), "AP8=");
        let mut e = kind(MYSQL_TYPE_ENUM);
        e.labels = vec!["small".into(), "large".into()];
        assert_eq!(r(&e, 45, Value::Int(2)), "large");
        assert_eq!(r(&e, 45, Value::Int(0)), "");
        let mut s = kind(MYSQL_TYPE_SET);
        s.labels = vec!["a".into(), "b".into(), "c".into()];
        assert_eq!(
            r(&s, 45, Value::Bytes(vec![0b101])),
            serde_json::json!(["a", "c"])
        );
        assert_eq!(r(&s, 45, Value::Bytes(vec![0])), serde_json::json!([]));
        let mut j = kind(MYSQL_TYPE_BLOB);
        j.json_text = true;
        assert_eq!(
            r(&j, 45, Value::Bytes(br#"{"a": [1, 2.5]}"#.to_vec())),
            serde_json::json!({"a": [1, 2.5]})
        );
        assert_eq!(r(&j, 45, Value::Bytes(b"{oops".to_vec())), "{oops");
        assert_eq!(
            r(&kind(MYSQL_TYPE_GEOMETRY), 63, Value::Bytes(vec![0, 0xAB])),
            "00ab"
        );
    }

    #[test]
    fn padded_numbers_match_the_formatter() {
        for (value, width) in [
            (0u64, 2),
            (7, 2),
            (42, 2),
            (2026, 4),
            (65_535, 4),
            (5, 6),
            (123_456, 6),
        ] {
            let mut out = Vec::new();
            padded(&mut out, value, width);
            assert_eq!(out, format!("{value:0width$}").into_bytes());
        }
        let mut out = Vec::new();
        fraction(3, 4_567, &mut out);
        assert_eq!(out, b".004");
    }
}

//! Postgres values (text format, as `pgoutput` sends them) rendered as JSON.
//!
//! The replication session pins `DateStyle=ISO`, `IntervalStyle=iso_8601`,
//! `TimeZone=UTC`, `bytea_output=hex` and `lc_monetary=C`, so each type has
//! one text shape to translate.

use tributary_envelope::json;

/// How a column's text value becomes JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// int2, int4, int8, oid: a JSON number as sent.
    Integer,
    /// float4, float8: a number, or a string for NaN and ±Infinity.
    Float,
    /// numeric: a string holding the exact decimal (or NaN / ±Infinity).
    Numeric,
    /// money: a string holding the exact decimal, currency formatting removed.
    Money,
    /// bool: `t` / `f`.
    Bool,
    /// text-like types: a string.
    Text,
    /// bytea: base64 string.
    Bytea,
    /// json, jsonb: the JSON value embedded.
    Json,
    /// timestamp without time zone: `YYYY-MM-DDTHH:MM:SS[.ffffff]`.
    Timestamp,
    /// timestamp with time zone: RFC 3339 in UTC with `Z`.
    TimestampTz,
    /// An array of the element kind: a JSON array (nested for more dimensions).
    Array(Box<ValueKind>),
}

/// The kind of a built-in type, `None` for types that need a catalog lookup
/// (enums, domains, arrays of those, extension types).
pub fn builtin_kind(oid: u32) -> Option<ValueKind> {
    use ValueKind::*;
    Some(match oid {
        20 | 21 | 23 | 26 | 28 => Integer,
        700 | 701 => Float,
        1700 => Numeric,
        790 => Money,
        16 => Bool,
        // text, varchar, bpchar, name, char, uuid, date, time, timetz, interval,
        // inet, cidr, macaddr, macaddr8, bit, varbit, xml, tsvector, pg_lsn...
        25 | 1043 | 1042 | 19 | 18 | 2950 | 1082 | 1083 | 1266 | 1186 | 869 | 650 | 829 | 774
        | 1560 | 1562 | 142 | 3220 => Text,
        17 => Bytea,
        114 | 3802 => Json,
        1114 => Timestamp,
        1184 => TimestampTz,
        _ => {
            let element = builtin_array_element(oid)?;
            return Some(Array(Box::new(builtin_kind(element)?)));
        }
    })
}

/// The element type of a built-in array type.
pub fn builtin_array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1028 => 26,
        1021 => 700,
        1022 => 701,
        1231 => 1700,
        791 => 790,
        1000 => 16,
        1009 => 25,
        1015 => 1043,
        1014 => 1042,
        1003 => 19,
        1002 => 18,
        2951 => 2950,
        1182 => 1082,
        1183 => 1083,
        1270 => 1266,
        1187 => 1186,
        1041 => 869,
        651 => 650,
        1040 => 829,
        1001 => 17,
        199 => 114,
        3807 => 3802,
        1115 => 1114,
        1185 => 1184,
        _ => return None,
    })
}

/// Renders one text-format value of `kind` as JSON into `out`.
pub fn render(kind: &ValueKind, text: &[u8], out: &mut Vec<u8>) {
    match kind {
        ValueKind::Integer => {
            if is_json_integer(text) {
                out.extend_from_slice(text);
            } else {
                quoted(out, text);
            }
        }
        ValueKind::Float => {
            if is_json_number(text) {
                out.extend_from_slice(text);
            } else {
                quoted(out, text); // NaN, Infinity, -Infinity
            }
        }
        ValueKind::Numeric | ValueKind::Text => quoted(out, text),
        ValueKind::Money => {
            out.push(b'"');
            out.extend(
                text.iter()
                    .copied()
                    .filter(|b| b.is_ascii_digit() || *b == b'.' || *b == b'-'),
            );
            out.push(b'"');
        }
        ValueKind::Bool => out.extend_from_slice(if text == b"t" { b"true" } else { b"false" }),
        ValueKind::Bytea => match decode_bytea_hex(text) {
            Some(bytes) => json::write_base64(out, &bytes),
            None => quoted(out, text),
        },
        ValueKind::Json => out.extend_from_slice(text),
        ValueKind::Timestamp => timestamp(out, text, false),
        ValueKind::TimestampTz => timestamp(out, text, true),
        ValueKind::Array(element) => array(element, text, out),
    }
}

fn quoted(out: &mut Vec<u8>, text: &[u8]) {
    out.push(b'"');
    match std::str::from_utf8(text) {
        Ok(s) => json::write_escaped(out, s.as_bytes()),
        Err(_) => json::write_escaped(out, String::from_utf8_lossy(text).as_bytes()),
    }
    out.push(b'"');
}

fn is_json_integer(text: &[u8]) -> bool {
    let digits = text.strip_prefix(b"-").unwrap_or(text);
    !digits.is_empty()
        && digits.iter().all(u8::is_ascii_digit)
        && (digits.len() == 1 || digits[0] != b'0')
}

fn is_json_number(text: &[u8]) -> bool {
    // Postgres float output: [-]digits[.digits][e[+-]digits], or NaN/Infinity.
    let body = text.strip_prefix(b"-").unwrap_or(text);
    match body.first() {
        Some(b) if b.is_ascii_digit() => {}
        _ => return false,
    }
    let (mantissa, exponent) = match body.iter().position(|&b| b == b'e' || b == b'E') {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let mut parts = mantissa.splitn(2, |&b| b == b'.');
    let int = parts.next().unwrap_or_default();
    let int_ok =
        !int.is_empty() && int.iter().all(u8::is_ascii_digit) && (int.len() == 1 || int[0] != b'0');
    let frac_ok = parts
        .next()
        .is_none_or(|f| !f.is_empty() && f.iter().all(u8::is_ascii_digit));
    let exp_ok = exponent.is_none_or(|e| {
        let e = e
            .strip_prefix(b"+")
            .or_else(|| e.strip_prefix(b"-"))
            .unwrap_or(e);
        !e.is_empty() && e.iter().all(u8::is_ascii_digit)
    });
    int_ok && frac_ok && exp_ok
}

fn decode_bytea_hex(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    };
    hex.chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect()
}

/// `2026-11-23 05:21:05.123456+00` -> `2026-11-23T05:21:05.123456Z`;
/// `infinity`, BC dates and other offsets are passed through as text.
fn timestamp(out: &mut Vec<u8>, text: &[u8], with_zone: bool) {
    let is_plain = text.len() >= 19 && text[10] == b' ' && text[..4].iter().all(u8::is_ascii_digit);
    if !is_plain || text.ends_with(b" BC") {
        return quoted(out, text);
    }
    out.push(b'"');
    out.extend_from_slice(&text[..10]);
    out.push(b'T');
    if with_zone {
        match text.strip_suffix(b"+00") {
            Some(local) => {
                out.extend_from_slice(&local[11..]);
                out.push(b'Z');
            }
            None => out.extend_from_slice(&text[11..]),
        }
    } else {
        out.extend_from_slice(&text[11..]);
    }
    out.push(b'"');
}

/// Parses a Postgres array literal (`{1,2,NULL}`, `{{"a b","c\"d"}}`,
/// `[0:1]={x,y}`) into nested JSON arrays of rendered elements.
fn array(element: &ValueKind, text: &[u8], out: &mut Vec<u8>) {
    let body = match text.first() {
        Some(b'[') => match text.iter().position(|&b| b == b'=') {
            Some(i) => &text[i + 1..],
            None => return quoted(out, text),
        },
        _ => text,
    };
    let start = out.len();
    let mut pos = 0;
    if parse_array_level(element, body, &mut pos, out).is_none() || pos != body.len() {
        out.truncate(start);
        quoted(out, text);
    }
}

fn parse_array_level(
    element: &ValueKind,
    s: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
) -> Option<()> {
    if s.get(*pos) != Some(&b'{') {
        return None;
    }
    *pos += 1;
    out.push(b'[');
    if s.get(*pos) == Some(&b'}') {
        *pos += 1;
        out.push(b']');
        return Some(());
    }
    let mut item = Vec::new();
    loop {
        match s.get(*pos)? {
            b'{' => parse_array_level(element, s, pos, out)?,
            b'"' => {
                *pos += 1;
                item.clear();
                loop {
                    match *s.get(*pos)? {
                        b'\\' => {
                            item.push(*s.get(*pos + 1)?);
                            *pos += 2;
                        }
                        b'"' => {
                            *pos += 1;
                            break;
                        }
                        b => {
                            item.push(b);
                            *pos += 1;
                        }
                    }
                }
                render(element, &item, out);
            }
            _ => {
                let begin = *pos;
                while !matches!(s.get(*pos)?, b',' | b'}') {
                    *pos += 1;
                }
                let raw = &s[begin..*pos];
                if raw == b"NULL" {
                    out.extend_from_slice(b"null");
                } else {
                    render(element, raw, out);
                }
            }
        }
        match s.get(*pos)? {
            b',' => {
                out.push(b',');
                *pos += 1;
            }
            b'}' => {
                *pos += 1;
                out.push(b']');
                return Some(());
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn r(kind: &ValueKind, text: &str) -> Value {
        let mut out = Vec::new();
        render(kind, text.as_bytes(), &mut out);
        serde_json::from_slice(&out)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out)))
    }

    #[test]
    fn scalars() {
        use ValueKind::*;
        assert_eq!(
            r(&Integer, "9223372036854775807"),
            json!(9223372036854775807i64)
        );
        assert_eq!(r(&Integer, "-32768"), json!(-32768));
        assert_eq!(r(&Float, "1.5e+300"), json!(1.5e300));
        assert_eq!(r(&Float, "-0.25"), json!(-0.25));
        assert_eq!(r(&Float, "NaN"), json!("NaN"));
        assert_eq!(r(&Float, "-Infinity"), json!("-Infinity"));
        assert_eq!(
            r(&Numeric, "12345678901234567890.123456789"),
            json!("12345678901234567890.123456789")
        );
        assert_eq!(r(&Money, "-$1,234.56"), json!("-1234.56"));
        assert_eq!(r(&Bool, "t"), json!(true));
        assert_eq!(r(&Bool, "f"), json!(false));
        assert_eq!(r(&Text, "a \"quoted\"\nline"), json!("a \"quoted\"\nline"));
        assert_eq!(r(&Bytea, "\\xdeadbeef00"), json!("3q2+7wA="));
        assert_eq!(r(&Json, "{\"a\": [1, 2]}"), json!({"a": [1, 2]}));
        assert_eq!(
            r(&Timestamp, "2026-11-23 05:21:05.123456"),
            json!("2026-11-23T05:21:05.123456")
        );
        assert_eq!(
            r(&TimestampTz, "2026-11-23 05:21:05+00"),
            json!("2026-11-23T05:21:05Z")
        );
        assert_eq!(r(&TimestampTz, "infinity"), json!("infinity"));
        assert_eq!(r(&TimestampTz, "-infinity"), json!("-infinity"));
    }

    #[test]
    fn arrays() {
        let ints = ValueKind::Array(Box::new(ValueKind::Integer));
        assert_eq!(r(&ints, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(r(&ints, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(r(&ints, "{}"), json!([]));
        assert_eq!(r(&ints, "[0:1]={5,6}"), json!([5, 6]));
        let texts = ValueKind::Array(Box::new(ValueKind::Text));
        assert_eq!(
            r(&texts, r#"{plain,"with space","q\"b\\s",NULL,"NULL"}"#),
            json!(["plain", "with space", "q\"b\\s", null, "NULL"])
        );
        let jsons = ValueKind::Array(Box::new(ValueKind::Json));
        assert_eq!(r(&jsons, r#"{"{\"a\": 1}","[2]"}"#), json!([{"a": 1}, [2]]));
        let floats = ValueKind::Array(Box::new(ValueKind::Float));
        assert_eq!(
            r(&floats, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        // A literal that does not parse is passed as text, still valid JSON.
        assert_eq!(r(&ints, "{1,2"), json!("{1,2"));
    }

    #[test]
    fn builtin_kinds() {
        assert_eq!(builtin_kind(20), Some(ValueKind::Integer));
        assert_eq!(
            builtin_kind(1016),
            Some(ValueKind::Array(Box::new(ValueKind::Integer)))
        );
        assert_eq!(
            builtin_kind(3807),
            Some(ValueKind::Array(Box::new(ValueKind::Json)))
        );
        assert_eq!(builtin_kind(600), None, "point needs a lookup (unknown)");
    }
}

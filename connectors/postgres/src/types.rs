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

impl ValueKind {
    /// Every kind but [`ValueKind::Array`] (the property tests and fuzz
    /// targets cover each of these and an array of each).
    pub const SCALARS: [ValueKind; 10] = [
        ValueKind::Integer,
        ValueKind::Float,
        ValueKind::Numeric,
        ValueKind::Money,
        ValueKind::Bool,
        ValueKind::Text,
        ValueKind::Bytea,
        ValueKind::Json,
        ValueKind::Timestamp,
        ValueKind::TimestampTz,
    ];

    /// json / jsonb, or an array of them: the server's validated JSON is
    /// embedded as sent, so only for these kinds is the rendering of
    /// arbitrary text not always valid JSON.
    pub fn embeds_json(&self) -> bool {
        match self {
            ValueKind::Json => true,
            ValueKind::Array(element) => element.embeds_json(),
            _ => false,
        }
    }
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
            if is_json_number(text) && is_finite_double(text) {
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
    if text.is_ascii() {
        // ASCII is UTF-8: no validation to do (most keys, numbers, codes).
        json::write_escaped(out, text);
    } else {
        match std::str::from_utf8(text) {
            Ok(s) => json::write_escaped(out, s.as_bytes()),
            Err(_) => json::write_escaped(out, String::from_utf8_lossy(text).as_bytes()),
        }
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

/// Whether a number (already checked to be JSON) is one a double holds:
/// `1e999` is valid JSON that JSON parsers refuse as out of range.
fn is_finite_double(text: &[u8]) -> bool {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .is_some_and(f64::is_finite)
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

/// `2026-11-23 05:21:05.123456+00` -> `2026-11-23T05:21:05.123456Z`, and
/// the same for years past 9999 (`12345-01-01T00:00:00Z`); `infinity`, BC
/// timestamps and anything not of that shape are passed through as text.
fn timestamp(out: &mut Vec<u8>, text: &[u8], with_zone: bool) {
    let Some((date, time)) = iso_timestamp(text, with_zone) else {
        return quoted(out, text);
    };
    out.push(b'"');
    out.extend_from_slice(date);
    out.push(b'T');
    match time.strip_suffix(b"+00").filter(|_| with_zone) {
        Some(utc) => {
            out.extend_from_slice(utc);
            out.push(b'Z');
        }
        None => out.extend_from_slice(time),
    }
    out.push(b'"');
}

/// The date and time parts of `YYYY[Y..]-MM-DD HH:MM:SS[.f..]` (with a
/// `±HH[:MM[:SS]]` offset when `with_zone`), checked byte by byte so that
/// what is copied into the JSON string needs no escaping.
fn iso_timestamp(text: &[u8], with_zone: bool) -> Option<(&[u8], &[u8])> {
    four_digit_year_timestamp(text, with_zone).or_else(|| any_timestamp(text, with_zone))
}

/// [`iso_timestamp`], any year.
fn any_timestamp(text: &[u8], with_zone: bool) -> Option<(&[u8], &[u8])> {
    let space = text.iter().position(|&b| b == b' ')?;
    let (date, time) = (&text[..space], &text[space + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    let year_len = date.len().checked_sub(6)?;
    let date_ok = year_len >= 4
        && digits(&date[..year_len])
        && date[year_len] == b'-'
        && digits(&date[year_len + 1..year_len + 3])
        && date[year_len + 3] == b'-'
        && digits(&date[year_len + 4..]);
    let (clock, offset) = match time.iter().position(|&b| b == b'+' || b == b'-') {
        Some(i) if with_zone => (&time[..i], Some(&time[i + 1..])),
        _ => (time, None),
    };
    let (hms, fraction) = match clock.iter().position(|&b| b == b'.') {
        Some(i) => (&clock[..i], Some(&clock[i + 1..])),
        None => (clock, None),
    };
    let hms_ok = hms.len() == 8 && hms.split(|&b| b == b':').all(|p| p.len() == 2 && digits(p));
    let fraction_ok = fraction.is_none_or(digits);
    let offset_ok =
        offset.is_none_or(|o| o.split(|&b| b == b':').all(|p| p.len() == 2 && digits(p)));
    (date_ok && hms_ok && fraction_ok && offset_ok && (!with_zone || offset.is_some()))
        .then_some((date, time))
}

/// [`iso_timestamp`] of the layout the server writes for years 1000 to
/// 9999, `YYYY-MM-DD HH:MM:SS[.f..]` (and `±HH[:MM[:SS]]` when
/// `with_zone`), checked at fixed places; `None` for anything else (which
/// the general check then reads).
fn four_digit_year_timestamp(text: &[u8], with_zone: bool) -> Option<(&[u8], &[u8])> {
    let head: &[u8; 19] = text.get(..19)?.try_into().ok()?;
    let layout_ok = head.iter().enumerate().all(|(i, &b)| match i {
        4 | 7 => b == b'-',
        10 => b == b' ',
        13 | 16 => b == b':',
        _ => b.is_ascii_digit(),
    });
    if !layout_ok {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix(b".") {
        let digits = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        rest = &fraction[digits..];
    }
    if with_zone {
        let offset = rest
            .strip_prefix(b"+")
            .or_else(|| rest.strip_prefix(b"-"))?;
        // `HH`, `HH:MM` or `HH:MM:SS`.
        let two_digits = |p: &[u8]| p.len() == 2 && p.iter().all(u8::is_ascii_digit);
        (offset.len() <= 8 && offset.split(|&b| b == b':').all(two_digits))
            .then_some((&text[..10], &text[11..]))
    } else {
        rest.is_empty().then_some((&text[..10], &text[11..]))
    }
}

/// Parses a Postgres array literal (`{1,2,NULL}`, `{{"a b","c\"d"}}`,
/// `[0:1]={x,y}`) into nested JSON arrays of rendered elements. A literal
/// that does not parse, or nests deeper than Postgres allows, is passed
/// through as text.
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
    if parse_array_level(element, body, &mut pos, out, MAX_ARRAY_DIMENSIONS).is_none()
        || pos != body.len()
    {
        out.truncate(start);
        quoted(out, text);
    }
}

/// Postgres' `MAXDIM`: the recursion below never goes deeper, whatever the
/// bytes say.
const MAX_ARRAY_DIMENSIONS: usize = 6;

fn parse_array_level(
    element: &ValueKind,
    s: &[u8],
    pos: &mut usize,
    out: &mut Vec<u8>,
    dimensions_left: usize,
) -> Option<()> {
    if s.get(*pos) != Some(&b'{') || dimensions_left == 0 {
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
            b'{' => parse_array_level(element, s, pos, out, dimensions_left - 1)?,
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
    fn timestamps_past_9999_and_odd_bytes() {
        use ValueKind::*;
        // Found by the property tests: years past 9999 came through with a
        // space and `+00`, and bytes that are not a timestamp were copied
        // into the JSON string unescaped.
        assert_eq!(
            r(&TimestampTz, "294276-12-31 23:59:59.999999+00"),
            json!("294276-12-31T23:59:59.999999Z")
        );
        assert_eq!(
            r(&Timestamp, "10000-01-01 00:00:00"),
            json!("10000-01-01T00:00:00")
        );
        assert_eq!(
            r(&TimestampTz, "4714-11-24 00:00:00+00 BC"),
            json!("4714-11-24 00:00:00+00 BC")
        );
        assert_eq!(
            r(&Timestamp, "0001\"01-01 00:00:00"),
            json!("0001\"01-01 00:00:00")
        );
        let mut out = Vec::new();
        render(&Timestamp, b"0001\xff01-01 00:00:00", &mut out);
        assert!(serde_json::from_slice::<Value>(&out).is_ok());
    }

    #[test]
    fn the_fixed_layout_check_agrees_with_the_general_one() {
        let samples = [
            "2026-11-23 05:21:05",
            "2026-11-23 05:21:05.5",
            "2026-11-23 05:21:05.123456+00",
            "2026-11-23 05:21:05-03:30",
            "1887-01-01 00:00:00+00:53:28",
            "2026-11-23 05:21:05.+00",
            "2026-11-23 05:21:05.12x+00",
            "2026-11-23 05:21:05+0",
            "2026-11-23 05:21:05+00:0",
            "2026-11-23 05:21:05+00:00:00:00",
            "2026-11-23 05:21:05+00 BC",
            "2026-11-23T05:21:05+00",
            "2026-11-23 5:21:05+00",
            "12026-11-23 05:21:05+00",
            "2026-11-23 05:21:05 ",
            "2026-11-23 05:21",
        ];
        for text in samples {
            for with_zone in [false, true] {
                let fixed = four_digit_year_timestamp(text.as_bytes(), with_zone);
                let general = any_timestamp(text.as_bytes(), with_zone);
                assert!(
                    fixed.is_none() || fixed == general,
                    "{text:?} (zone {with_zone}): {fixed:?} vs {general:?}"
                );
            }
        }
        assert!(four_digit_year_timestamp(b"2026-11-23 05:21:05.123456+00", true).is_some());
        assert!(four_digit_year_timestamp(b"2026-11-23 05:21:05", false).is_some());
    }

    #[test]
    fn floats_out_of_double_range_are_strings() {
        // Found by the `render` fuzz target: valid JSON numbers that no
        // double holds were passed on, and JSON parsers refuse them.
        assert_eq!(r(&ValueKind::Float, "1E6666"), json!("1E6666"));
        assert_eq!(r(&ValueKind::Float, "-1e309"), json!("-1e309"));
        assert_eq!(
            r(&ValueKind::Float, "1.7976931348623157e+308"),
            json!(f64::MAX)
        );
        assert_eq!(r(&ValueKind::Float, "5e-324"), json!(5e-324));
    }

    #[test]
    fn arrays_nest_no_deeper_than_postgres_allows() {
        let ints = ValueKind::Array(Box::new(ValueKind::Integer));
        assert_eq!(r(&ints, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
        assert_eq!(r(&ints, "{{{{{{{1}}}}}}}"), json!("{{{{{{{1}}}}}}}"));
        // Found while writing the fuzz targets: this recursed once per
        // brace, and 100,000 of them overflowed the stack (an abort).
        let deep = "{".repeat(100_000);
        assert_eq!(r(&ints, &deep), json!(deep));
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

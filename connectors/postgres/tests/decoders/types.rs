//! The renderers of text values to JSON: any bytes give valid JSON (or, for
//! json/jsonb, at least no panic), and values of each type in the exact
//! shape Postgres prints them give the JSON docs/envelope.md promises.

use base64::Engine as _;
use proptest::prelude::*;
use serde_json::{Value, json};
use tributary_postgres::types::{ValueKind, render};

fn render_bytes(kind: &ValueKind, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    render(kind, text, &mut out);
    out
}

fn render_json(kind: &ValueKind, text: &[u8]) -> Result<Value, TestCaseError> {
    let out = render_bytes(kind, text);
    serde_json::from_slice(&out).map_err(|e| {
        TestCaseError::fail(format!(
            "{kind:?} of {:?} rendered invalid JSON {:?}: {e}",
            String::from_utf8_lossy(text),
            String::from_utf8_lossy(&out)
        ))
    })
}

fn every_kind() -> Vec<ValueKind> {
    let arrays = ValueKind::SCALARS.map(|k| ValueKind::Array(Box::new(k)));
    ValueKind::SCALARS.into_iter().chain(arrays).collect()
}

/// Bytes biased toward what the renderers look at: digits, signs, braces,
/// quotes, backslashes, separators, plus anything at all.
fn shaped_bytes() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        3 => prop::sample::select(b"0123456789-+.:eE {}\",\\NULTZx[]=$".to_vec()),
        1 => any::<u8>(),
    ];
    prop::collection::vec(byte, 0..48)
}

/// Text with every character JSON escapes, and any character at all.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[\u{0}-\u{1f}\"\\\\/\u{7f}\u{80}\u{2028}\u{2029}\u{fffd}a{},NUL é✓😀]{0,32}",
        any::<String>(),
    ]
}

/// Postgres' `money` output with `lc_monetary=C`: `-$1,234.56`.
fn money_text(cents: i64) -> String {
    let abs = cents.unsigned_abs();
    let units = (abs / 100).to_string();
    let mut grouped = String::new();
    for (i, digit) in units.chars().enumerate() {
        if i > 0 && (units.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(digit);
    }
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}${grouped}.{:02}", abs % 100)
}

/// A float in the shape Postgres prints it: shortest round-trip digits,
/// fixed notation or `d.ddde+XX`.
fn float_text(x: f64, scientific: bool) -> String {
    if !scientific {
        return x.to_string();
    }
    let text = format!("{x:e}");
    let (mantissa, exponent) = text.split_once('e').expect("{:e} has an exponent");
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

/// A timestamp as Postgres prints it with `DateStyle=ISO` and UTC, and the
/// JSON string docs/envelope.md promises for it.
fn timestamp_case(
    (year, month, day): (u32, u32, u32),
    (hour, minute, second, micros): (u32, u32, u32, u32),
    bc: bool,
    with_zone: bool,
) -> (String, String) {
    let date = format!("{year:04}-{month:02}-{day:02}");
    let mut time = format!("{hour:02}:{minute:02}:{second:02}");
    if micros > 0 {
        time.push_str(format!(".{micros:06}").trim_end_matches('0'));
    }
    let zone = if with_zone { "+00" } else { "" };
    let era = if bc { " BC" } else { "" };
    let text = format!("{date} {time}{zone}{era}");
    let expected = if bc {
        text.clone()
    } else {
        format!("{date}T{time}{}", if with_zone { "Z" } else { "" })
    };
    (text, expected)
}

/// An array element as Postgres' `array_out` prints it.
fn array_element(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("NULL"),
        Value::String(s) => {
            let plain = !s.is_empty()
                && !s.eq_ignore_ascii_case("NULL")
                && !s.chars().any(|c| "{}\",\\ \t\n\r\u{b}\u{c}".contains(c));
            if plain {
                out.push_str(s);
            } else {
                out.push('"');
                for c in s.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
        Value::Array(items) => {
            out.push('{');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                array_element(item, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A rectangular-or-not nested array of up to three dimensions whose leaves
/// come from `leaf`.
fn nested(leaf: impl Strategy<Value = Value> + Clone + 'static) -> impl Strategy<Value = Value> {
    let level1 = prop::collection::vec(leaf, 1..5).prop_map(Value::Array);
    let level2 = prop::collection::vec(level1.clone(), 1..4).prop_map(Value::Array);
    let level3 = prop::collection::vec(level2.clone(), 1..3).prop_map(Value::Array);
    prop_oneof![level1, level2, level3]
}

proptest! {
    #![proptest_config(crate::seed::config())]

    #[test]
    fn any_bytes_render_valid_json(text in shaped_bytes(), raw in prop::collection::vec(any::<u8>(), 0..32)) {
        for kind in every_kind() {
            for bytes in [&text, &raw] {
                if kind.embeds_json() {
                    render_bytes(&kind, bytes);
                } else {
                    render_json(&kind, bytes)?;
                }
            }
        }
    }

    #[test]
    fn mutated_values_render_valid_json(
        date in (1u32..=294276, 1u32..=12, 1u32..=28),
        time in (0u32..24, 0u32..60, 0u32..60, 0u32..1_000_000),
        bc in any::<bool>(),
        array in nested(prop_oneof![Just(Value::Null), any_text().prop_map(Value::String)]),
        depth in 0usize..12,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let (stamp, _) = timestamp_case(date, time, bc, true);
        let mut literal = "{".repeat(depth);
        array_element(&array, &mut literal);
        literal.push_str(&"}".repeat(depth));
        for text in [stamp, literal] {
            let mut bytes = text.into_bytes();
            for (at, byte) in &edits {
                let i = at.index(bytes.len());
                bytes[i] = *byte;
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            for kind in every_kind().iter().filter(|k| !k.embeds_json()) {
                render_json(kind, &bytes)?;
            }
        }
    }

    #[test]
    fn integers_are_exact_numbers(v in any::<i64>(), oid in any::<u32>()) {
        prop_assert_eq!(render_json(&ValueKind::Integer, v.to_string().as_bytes())?, json!(v));
        prop_assert_eq!(render_json(&ValueKind::Integer, oid.to_string().as_bytes())?, json!(oid));
    }

    #[test]
    fn floats_keep_their_digits(x in any::<f64>(), scientific in any::<bool>()) {
        let text = if x.is_nan() {
            "NaN".to_owned()
        } else if x.is_infinite() {
            if x > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
        } else {
            float_text(x, scientific)
        };
        let out = render_bytes(&ValueKind::Float, text.as_bytes());
        let value = render_json(&ValueKind::Float, text.as_bytes())?;
        if x.is_finite() {
            prop_assert!(value.is_number(), "{} gave {}", text, value);
            prop_assert_eq!(out, text.as_bytes(), "the digits are passed on as printed");
        } else {
            prop_assert_eq!(value, json!(text));
        }
    }

    #[test]
    fn float_shaped_text_is_a_double_or_a_string(
        text in "-?[0-9]{1,30}(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
    ) {
        let value = render_json(&ValueKind::Float, text.as_bytes())?;
        match text.parse::<f64>() {
            Ok(x) if x.is_finite() && value.is_number() => {
                prop_assert_eq!(render_bytes(&ValueKind::Float, text.as_bytes()), text.as_bytes());
            }
            _ => prop_assert_eq!(value, json!(text)),
        }
    }

    #[test]
    fn numerics_keep_every_digit(
        text in prop_oneof![
            "-?[0-9]{1,60}(\\.[0-9]{1,60})?",
            Just("NaN".to_owned()),
            Just("Infinity".to_owned()),
            Just("-Infinity".to_owned()),
        ],
    ) {
        prop_assert_eq!(render_json(&ValueKind::Numeric, text.as_bytes())?, json!(text));
    }

    #[test]
    fn money_is_the_plain_decimal(cents in any::<i64>()) {
        let abs = cents.unsigned_abs();
        let sign = if cents < 0 { "-" } else { "" };
        let expected = format!("{sign}{}.{:02}", abs / 100, abs % 100);
        prop_assert_eq!(render_json(&ValueKind::Money, money_text(cents).as_bytes())?, json!(expected));
    }

    #[test]
    fn text_round_trips_through_a_json_parser(text in any_text()) {
        prop_assert_eq!(render_json(&ValueKind::Text, text.as_bytes())?, json!(text));
        let mut out = Vec::new();
        tributary_envelope::json::write_str(&mut out, &text);
        prop_assert_eq!(serde_json::from_slice::<String>(&out).ok(), Some(text));
    }

    #[test]
    fn bytea_is_base64_of_the_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64), upper in any::<bool>()) {
        let mut text = String::from("\\x");
        for b in &bytes {
            text.push_str(&if upper { format!("{b:02X}") } else { format!("{b:02x}") });
        }
        let value = render_json(&ValueKind::Bytea, text.as_bytes())?;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap_or_default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, bytes);
    }

    #[test]
    fn timestamps_at_the_edges(
        date in (prop_oneof![1u32..=9999, 9990u32..=10010, 294200u32..=294276, 1u32..=2], 1u32..=12, 1u32..=28),
        time in (0u32..24, 0u32..60, 0u32..60, prop_oneof![Just(0u32), 0u32..1_000_000, Just(999_999u32), Just(500_000u32)]),
        bc in prop::bool::weighted(0.2),
        with_zone in any::<bool>(),
    ) {
        let (text, expected) = timestamp_case(date, time, bc, with_zone);
        let kind = if with_zone { ValueKind::TimestampTz } else { ValueKind::Timestamp };
        prop_assert_eq!(render_json(&kind, text.as_bytes())?, json!(expected), "from {}", text);
        for special in ["infinity", "-infinity"] {
            prop_assert_eq!(render_json(&kind, special.as_bytes())?, json!(special));
        }
    }

    #[test]
    fn text_arrays_with_nulls_quotes_and_nesting(
        array in nested(prop_oneof![
            1 => Just(Value::Null),
            4 => any_text().prop_map(Value::String),
        ]),
        lower_bound in prop::option::of(-3i32..3),
    ) {
        let mut text = String::new();
        if let (Some(lower), Value::Array(items)) = (lower_bound, &array) {
            text.push_str(&format!("[{lower}:{}]=", lower + items.len() as i32 - 1));
        }
        array_element(&array, &mut text);
        let kind = ValueKind::Array(Box::new(ValueKind::Text));
        prop_assert_eq!(render_json(&kind, text.as_bytes())?, array, "from {}", text);
    }

    #[test]
    fn integer_arrays(array in nested(prop_oneof![
        1 => Just(Value::Null),
        4 => any::<i64>().prop_map(|v| json!(v)),
    ])) {
        let mut text = String::new();
        array_element(&array, &mut text);
        let kind = ValueKind::Array(Box::new(ValueKind::Integer));
        prop_assert_eq!(render_json(&kind, text.as_bytes())?, array, "from {}", text);
    }
}

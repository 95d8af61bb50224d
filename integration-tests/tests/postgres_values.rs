//! Property: random values of every supported type, written as SQL literals
//! into a real PostgreSQL 15, arrive on a real kinesalite stream as exactly
//! the JSON docs/envelope.md promises: numeric digits as written, floats to
//! the bit, timestamps at the edges of their range, arrays with NULLs,
//! quotes and nesting, text with every character JSON escapes.
//!
//! The expected JSON is computed here from the generated value, never read
//! back from Postgres. The values come from a seeded generator: the seed is
//! printed and named in every failure, and `TRIBUTARY_PROPTEST_SEED=<seed>`
//! replays it. One table, a few hundred rows in a handful of transactions,
//! one server start.

use std::collections::BTreeMap;
use std::hash::{BuildHasher as _, RandomState};
use std::time::Duration;

use base64::Engine as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng as _};
use serde_json::{Map, Value, json};
use tributary_integration_tests::Pipeline;

const STREAM: &str = "values-cdc";
const TRANSACTIONS: usize = 5;
const ROWS_PER_TRANSACTION: usize = 60;
const SEED_VAR: &str = "TRIBUTARY_PROPTEST_SEED";

/// What a column's envelope value must be.
#[derive(Debug)]
enum Expected {
    /// This JSON, numbers compared by value (Postgres may print `100` for
    /// the double `100.0`).
    Json(Value),
    /// A `real`: the JSON number read as an `f32` is this one.
    Real(f32),
}

/// One generated value: its SQL literal and what it must arrive as.
type Case = (String, Expected);

/// A column of the test table and the generator of its values.
struct Column {
    name: &'static str,
    sql_type: &'static str,
    generate: fn(&mut StdRng) -> Case,
}

const COLUMNS: &[Column] = &[
    column("i2", "smallint", |r| {
        integer(r, i16::MIN.into(), i16::MAX.into())
    }),
    column("i4", "integer", |r| {
        integer(r, i32::MIN.into(), i32::MAX.into())
    }),
    column("i8", "bigint", |r| integer(r, i64::MIN, i64::MAX)),
    column("num", "numeric", |r| scalar(numeric_text(r))),
    column("f4", "real", real),
    column("f8", "double precision", |r| scalar(double_text(r))),
    column("flag", "boolean", |r| scalar(bool_text(r))),
    column("t", "text", |r| scalar(text_value(r))),
    column("vc", "varchar(20)", |r| {
        let s = text(r, 20);
        let value = json!(s);
        scalar((s, value))
    }),
    column("ch", "char(8)", padded_char),
    column("raw", "bytea", |r| scalar(bytea_text(r))),
    column("js", "json", |r| json_value(r, false)),
    column("jsb", "jsonb", |r| json_value(r, true)),
    column("d", "date", |r| scalar(date_text(r))),
    column("tm", "time", |r| scalar(time_text(r, false))),
    column("tmtz", "timetz", |r| scalar(time_text(r, true))),
    column("ts", "timestamp", |r| timestamp(r, false)),
    column("tstz", "timestamptz", |r| timestamp(r, true)),
    column("u", "uuid", |r| scalar(uuid_text(r))),
    column("iv", "interval", |r| scalar(interval_text(r))),
    column("ip", "inet", |r| scalar(inet_text(r))),
    column("cash", "money", |r| scalar(money_text(r))),
    column("m", "mood", |r| scalar(mood_text(r))),
    column("dom", "positive", |r| {
        let v = r.random_range(1..=i32::MAX);
        scalar((v.to_string(), json!(v)))
    }),
    column("arr_t", "text[]", text_array),
    column("arr_i", "bigint[]", bigint_array),
    column("arr_num", "numeric[]", |r| flat_array(r, numeric_text)),
    column("arr_f8", "double precision[]", |r| {
        flat_array(r, double_text)
    }),
    column("arr_b", "boolean[]", |r| flat_array(r, bool_text)),
    column("arr_jsb", "jsonb[]", |r| {
        flat_array(r, |r| {
            let value = random_json(r, 2);
            (value.to_string(), value)
        })
    }),
    column("arr_d", "date[]", |r| flat_array(r, date_text)),
    column("arr_tstz", "timestamptz[]", |r| {
        flat_array(r, |r| {
            let (text, expected) = timestamp_text(r, true);
            (text, json!(expected))
        })
    }),
    column("arr_iv", "interval[]", |r| flat_array(r, interval_text)),
    column("arr_u", "uuid[]", |r| flat_array(r, uuid_text)),
    column("arr_cash", "money[]", |r| flat_array(r, money_text)),
    column("arr_raw", "bytea[]", |r| flat_array(r, bytea_text)),
    column("arr_m", "mood[]", |r| flat_array(r, mood_text)),
];

/// Types the table's columns use besides the built-in ones: an enum and a
/// domain over a built-in type.
const TYPES: &str = "CREATE TYPE mood AS ENUM ('happy', 'sad', 'with \"quotes\", commas', 'NULL');
CREATE DOMAIN positive AS integer CHECK (VALUE > 0);";

const fn column(
    name: &'static str,
    sql_type: &'static str,
    generate: fn(&mut StdRng) -> Case,
) -> Column {
    Column {
        name,
        sql_type,
        generate,
    }
}

fn sql_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One of `edges` now and then, else uniform in `min..=max`.
fn integer(r: &mut StdRng, min: i64, max: i64) -> Case {
    let edges = [min, max, 0, -1, 1];
    let v = if r.random_bool(0.2) {
        edges[r.random_range(0..edges.len())]
    } else {
        r.random_range(min..=max)
    };
    (sql_quote(&v.to_string()), Expected::Json(json!(v)))
}

fn digits(r: &mut StdRng, len: usize) -> String {
    (0..len)
        .map(|_| char::from(b'0' + r.random_range(0..10u8)))
        .collect()
}

/// A numeric in the form Postgres prints it (no leading zeros, the scale's
/// trailing zeros kept, no `-0`), or NaN / ±Infinity.
fn numeric_text(r: &mut StdRng) -> (String, Value) {
    let text = match r.random_range(0..16) {
        0 => "NaN".to_owned(),
        1 => "Infinity".to_owned(),
        2 => "-Infinity".to_owned(),
        _ => {
            let int_len = r.random_range(1..=40);
            let mut int = digits(r, int_len);
            if int_len > 1 {
                int.replace_range(0..1, &r.random_range(1..10).to_string());
            }
            let frac_len = r.random_range(0..=30);
            let frac = digits(r, frac_len);
            let zero = int == "0" && frac.bytes().all(|b| b == b'0');
            let sign = if !zero && r.random_bool(0.5) { "-" } else { "" };
            if frac.is_empty() {
                format!("{sign}{int}")
            } else {
                format!("{sign}{int}.{frac}")
            }
        }
    };
    let expected = json!(text);
    (text, expected)
}

/// A column value written as `text` that arrives as `value`.
fn scalar((text, value): (String, Value)) -> Case {
    (sql_quote(&text), Expected::Json(value))
}

/// A double as a literal Postgres reads back to the same bits, with the
/// edges and NaN / ±Infinity (which arrive as strings).
fn double_text(r: &mut StdRng) -> (String, Value) {
    let specials = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
    let edges = [f64::MAX, f64::MIN, f64::MIN_POSITIVE, 5e-324, -0.0, 0.0];
    let x = match r.random_range(0..20) {
        0 => specials[r.random_range(0..specials.len())],
        1..=3 => edges[r.random_range(0..edges.len())],
        _ => loop {
            let x = f64::from_bits(r.random());
            if x.is_finite() {
                break x;
            }
        },
    };
    match float_case(format!("{x:e}"), x, Expected::Json(json!(x))) {
        (text, Expected::Json(value)) => (text, value),
        (_, Expected::Real(_)) => unreachable!("a double is expected as JSON"),
    }
}

fn real(r: &mut StdRng) -> Case {
    let x = loop {
        let x = f32::from_bits(r.random());
        if x.is_finite() || r.random_bool(0.3) {
            break x;
        }
    };
    let (text, expected) = float_case(format!("{x:e}"), f64::from(x), Expected::Real(x));
    (sql_quote(&text), expected)
}

/// A float's text and expectation; NaN and ±Infinity are strings.
fn float_case(text: String, x: f64, finite: Expected) -> (String, Expected) {
    let special = if x.is_nan() {
        "NaN"
    } else if x == f64::INFINITY {
        "Infinity"
    } else if x == f64::NEG_INFINITY {
        "-Infinity"
    } else {
        return (text, finite);
    };
    (special.to_owned(), Expected::Json(json!(special)))
}

/// Text with every character JSON escapes (all controls but NUL, which
/// Postgres text cannot hold), quotes of both kinds, backslashes, and
/// characters of one to four UTF-8 bytes.
fn text(r: &mut StdRng, max: usize) -> String {
    const SPECIAL: &[char] = &[
        '"', '\'', '\\', '/', '{', '}', ',', ' ', '\u{7f}', '\u{80}', 'é', '✓', '😀', '\u{2028}',
        '\u{2029}', '\u{fffd}', 'N', 'U', 'L',
    ];
    let len = r.random_range(0..=max);
    (0..len)
        .map(|_| match r.random_range(0..4) {
            0 => char::from(r.random_range(1..0x20u8)),
            1 => SPECIAL[r.random_range(0..SPECIAL.len())],
            2 => char::from(r.random_range(0x20..0x7fu8)),
            _ => loop {
                if let Some(c) = char::from_u32(r.random_range(1..0x11_0000)) {
                    break c;
                }
            },
        })
        .collect()
}

/// `char(8)`: padded with spaces to 8 characters, as Postgres prints it.
fn padded_char(r: &mut StdRng) -> Case {
    let len = r.random_range(0..=8);
    let s: String = (0..len)
        .map(|_| char::from(r.random_range(0x21..0x7fu8)))
        .collect();
    let padded = format!("{s:<8}");
    (sql_quote(&s), Expected::Json(json!(padded)))
}

fn random_bytes(r: &mut StdRng, max: usize) -> Vec<u8> {
    let len = r.random_range(0..=max);
    (0..len).map(|_| r.random()).collect()
}

fn hex_bytea(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("\\x{hex}")
}

fn base64_of(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn bytea_text(r: &mut StdRng) -> (String, Value) {
    let bytes = random_bytes(r, 40);
    (hex_bytea(&bytes), json!(base64_of(&bytes)))
}

fn bool_text(r: &mut StdRng) -> (String, Value) {
    let v = r.random_bool(0.5);
    (v.to_string(), json!(v))
}

fn text_value(r: &mut StdRng) -> (String, Value) {
    let s = text(r, 40);
    let value = json!(s);
    (s, value)
}

/// A label of the `mood` enum: the labels are strings, whatever they hold.
fn mood_text(r: &mut StdRng) -> (String, Value) {
    let label = ["happy", "sad", "with \"quotes\", commas", "NULL"][r.random_range(0..4)];
    (label.to_owned(), json!(label))
}

/// A time of day (with a UTC offset for timetz, which keeps the offset it
/// was given), passed on as printed.
fn time_text(r: &mut StdRng, with_zone: bool) -> (String, Value) {
    let mut text = format!(
        "{:02}:{:02}:{:02}",
        r.random_range(0..24),
        r.random_range(0..60),
        r.random_range(0..60)
    );
    let micros: u32 = r.random_range(0..1_000_000);
    if micros > 0 && r.random_bool(0.5) {
        text.push_str(format!(".{micros:06}").trim_end_matches('0'));
    }
    if with_zone {
        let hours: i32 = r.random_range(-12..=14);
        text.push_str(&format!(
            "{}{:02}",
            if hours < 0 { '-' } else { '+' },
            hours.abs()
        ));
        if r.random_bool(0.3) {
            text.push_str(":30");
        }
    }
    let expected = json!(text);
    (text, expected)
}

/// An IPv4 address with a prefix length shorter than 32 now and then.
fn inet_text(r: &mut StdRng) -> (String, Value) {
    let octets: [u8; 4] = r.random();
    let mut text = format!("{}.{}.{}.{}", octets[0], octets[1], octets[2], octets[3]);
    if r.random_bool(0.3) {
        text.push_str(&format!("/{}", r.random_range(0..32)));
    }
    let expected = json!(text);
    (text, expected)
}

/// A JSON document without floats (Postgres keeps numeric digits, serde
/// would round them) and without NUL (jsonb refuses `\u0000`).
fn random_json(r: &mut StdRng, depth: u32) -> Value {
    match r.random_range(0..if depth == 0 { 4 } else { 6 }) {
        0 => Value::Null,
        1 => json!(r.random_bool(0.5)),
        2 => json!(r.random::<i64>() >> r.random_range(0..64)),
        3 => json!(text(r, 12)),
        4 => Value::Array(
            (0..r.random_range(0..4))
                .map(|_| random_json(r, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..r.random_range(0..4))
                .map(|_| (text(r, 6), random_json(r, depth - 1)))
                .collect::<Map<_, _>>(),
        ),
    }
}

fn json_value(r: &mut StdRng, binary: bool) -> Case {
    let value = random_json(r, 3);
    // json keeps the text as written, whitespace and all.
    let written = if !binary && r.random_bool(0.5) {
        serde_json::to_string_pretty(&value)
    } else {
        serde_json::to_string(&value)
    }
    .expect("a JSON value serializes");
    (sql_quote(&written), Expected::Json(value))
}

/// A date as Postgres prints it (`DateStyle=ISO`): years 1 to 5874897 AD
/// and 4713 to 1 BC, and ±infinity. Dates are passed on as printed.
fn date_text(r: &mut StdRng) -> (String, Value) {
    let text = match r.random_range(0..12) {
        0 => "infinity".to_owned(),
        1 => "-infinity".to_owned(),
        2 => "5874897-12-31".to_owned(),
        3 => format!(
            "{:04}-{:02}-{:02} BC",
            r.random_range(1..=4713),
            r.random_range(1..=12),
            r.random_range(1..=28)
        ),
        _ => format!(
            "{:04}-{:02}-{:02}",
            year(r),
            r.random_range(1..=12),
            r.random_range(1..=28)
        ),
    };
    let expected = json!(text);
    (text, expected)
}

/// A year AD, often at an edge: the first years, around 9999/10000, the
/// last years timestamps allow.
fn year(r: &mut StdRng) -> u32 {
    match r.random_range(0..6) {
        0 => r.random_range(1..=3),
        1 => r.random_range(9998..=10001),
        2 => r.random_range(294270..=294275),
        _ => r.random_range(1..=9999),
    }
}

/// A timestamp as Postgres prints it in UTC, and the JSON string promised
/// for it: `YYYY-MM-DDTHH:MM:SS[.ffffff]` (with `Z` for timestamptz), BC
/// timestamps and ±infinity as printed.
fn timestamp_text(r: &mut StdRng, with_zone: bool) -> (String, String) {
    match r.random_range(0..16) {
        0 => return ("infinity".into(), "infinity".into()),
        1 => return ("-infinity".into(), "-infinity".into()),
        _ => {}
    }
    let bc = r.random_bool(0.1);
    let year = if bc {
        r.random_range(1..=4713)
    } else {
        year(r)
    };
    let date = format!(
        "{year:04}-{:02}-{:02}",
        r.random_range(1..=12),
        r.random_range(1..=28)
    );
    let mut time = format!(
        "{:02}:{:02}:{:02}",
        r.random_range(0..24),
        r.random_range(0..60),
        r.random_range(0..60)
    );
    let micros = match r.random_range(0..4) {
        0 => 0,
        1 => 999_999,
        _ => r.random_range(0..1_000_000),
    };
    if micros > 0 {
        time.push_str(format!(".{micros:06}").trim_end_matches('0'));
    }
    let zone = if with_zone { "+00" } else { "" };
    if bc {
        let text = format!("{date} {time}{zone} BC");
        return (text.clone(), text);
    }
    let suffix = if with_zone { "Z" } else { "" };
    (
        format!("{date} {time}{zone}"),
        format!("{date}T{time}{suffix}"),
    )
}

fn timestamp(r: &mut StdRng, with_zone: bool) -> Case {
    let (text, expected) = timestamp_text(r, with_zone);
    (sql_quote(&text), Expected::Json(json!(expected)))
}

fn uuid_text(r: &mut StdRng) -> (String, Value) {
    let hex: String = (0..16)
        .map(|_| format!("{:02x}", r.random::<u8>()))
        .collect();
    let text = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    (text.to_uppercase(), json!(text))
}

/// An interval of days and a time of day, and its ISO 8601 form as
/// Postgres prints it with `IntervalStyle=iso_8601`.
fn interval_text(r: &mut StdRng) -> (String, Value) {
    let days = if r.random_bool(0.3) {
        0
    } else {
        r.random_range(1..10_000)
    };
    let pick = |r: &mut StdRng, n: u32| {
        if r.random_bool(0.3) {
            0
        } else {
            r.random_range(1..n)
        }
    };
    let (h, m, s) = (pick(r, 24), pick(r, 60), pick(r, 60));
    let micros = if r.random_bool(0.5) {
        0
    } else {
        r.random_range(1..1_000_000)
    };
    let mut iso = String::from("P");
    if days > 0 {
        iso.push_str(&format!("{days}D"));
    }
    let mut clock = String::new();
    if h > 0 {
        clock.push_str(&format!("{h}H"));
    }
    if m > 0 {
        clock.push_str(&format!("{m}M"));
    }
    if s > 0 || micros > 0 {
        let fraction = format!(".{micros:06}");
        let fraction = fraction.trim_end_matches('0').trim_end_matches('.');
        clock.push_str(&format!("{s}{fraction}S"));
    }
    if !clock.is_empty() {
        iso.push('T');
        iso.push_str(&clock);
    } else if days == 0 {
        iso.push_str("T0S");
    }
    (
        format!("{days} days {h:02}:{m:02}:{s:02}.{micros:06}"),
        json!(iso),
    )
}

/// `money` in cents, up to the type's limits, written as a plain decimal;
/// it arrives as the plain decimal, currency formatting removed.
fn money_text(r: &mut StdRng) -> (String, Value) {
    let cents = if r.random_bool(0.1) {
        [i64::MIN, i64::MAX, 0, -1][r.random_range(0..4)]
    } else {
        r.random::<i64>() >> r.random_range(0..63)
    };
    let abs = cents.unsigned_abs();
    let sign = if cents < 0 { "-" } else { "" };
    let text = format!("{sign}{}.{:02}", abs / 100, abs % 100);
    let expected = json!(text);
    (text, expected)
}

/// An element as Postgres' `array_out` prints it: quoted when empty, when
/// it reads `NULL` in any case, or holds a brace, quote, comma, backslash
/// or white space; `"` and `\` escaped inside quotes.
fn array_element(s: &str) -> String {
    let plain = !s.is_empty()
        && !s.eq_ignore_ascii_case("NULL")
        && !s.chars().any(|c| "{}\",\\ \t\n\r\u{b}\u{c}".contains(c));
    if plain {
        return s.to_owned();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A rectangular array of `dims` (sizes per dimension) as an array literal
/// and as the expected JSON, leaves from `leaf` (NULL now and then).
fn array_literal(
    r: &mut StdRng,
    dims: &[usize],
    leaf: &mut dyn FnMut(&mut StdRng) -> (String, Value),
) -> (String, Value) {
    let mut text = String::from("{");
    let mut items = Vec::new();
    for i in 0..dims[0] {
        if i > 0 {
            text.push(',');
        }
        let (element, value) = if dims.len() > 1 {
            array_literal(r, &dims[1..], leaf)
        } else if r.random_bool(0.15) {
            ("NULL".to_owned(), Value::Null)
        } else {
            let (raw, value) = leaf(r);
            (array_element(&raw), value)
        };
        text.push_str(&element);
        items.push(value);
    }
    text.push('}');
    (text, Value::Array(items))
}

fn text_array(r: &mut StdRng) -> Case {
    if r.random_bool(0.1) {
        return ("'{}'".to_owned(), Expected::Json(json!([])));
    }
    let dims: Vec<usize> = (0..r.random_range(1..=3))
        .map(|_| r.random_range(1..=3))
        .collect();
    let (text, value) = array_literal(r, &dims, &mut |r| {
        let s = text(r, 10);
        let value = json!(s);
        (s, value)
    });
    (sql_quote(&text), Expected::Json(value))
}

/// Bigint arrays, one or two dimensions, sometimes with a lower bound other
/// than 1 (printed as `[0:2]={...}`).
fn bigint_array(r: &mut StdRng) -> Case {
    let dims: Vec<usize> = (0..r.random_range(1..=2))
        .map(|_| r.random_range(1..=4))
        .collect();
    let (text, value) = array_literal(r, &dims, &mut |r| {
        let v = r.random::<i64>();
        (v.to_string(), json!(v))
    });
    let bounds = if r.random_bool(0.3) {
        dims.iter()
            .map(|&n| format!("[0:{}]", n - 1))
            .collect::<String>()
            + "="
    } else {
        String::new()
    };
    (sql_quote(&format!("{bounds}{text}")), Expected::Json(value))
}

fn flat_array(r: &mut StdRng, mut leaf: impl FnMut(&mut StdRng) -> (String, Value)) -> Case {
    let len = r.random_range(1..=4);
    let (text, value) = array_literal(r, &[len], &mut leaf);
    (sql_quote(&text), Expected::Json(value))
}

/// Equal JSON, numbers compared by value: exactly as integers when both
/// are, else as doubles.
fn same(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => a.as_f64() == b.as_f64(),
        },
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, x)| b.get(k).is_some_and(|y| same(x, y)))
        }
        _ => expected == actual,
    }
}

fn matches(expected: &Expected, actual: &Value) -> bool {
    match expected {
        Expected::Json(value) => same(value, actual),
        Expected::Real(x) => actual.as_f64().map(|v| v as f32) == Some(*x),
    }
}

fn seed() -> u64 {
    let seed = match std::env::var(SEED_VAR) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{SEED_VAR}={text:?} is not a u64")),
        Err(_) => RandomState::new().hash_one(std::time::SystemTime::now()),
    };
    eprintln!("value seed {seed} (replay with {SEED_VAR}={seed})");
    seed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_of_every_type_arrive_as_the_exact_json() -> anyhow::Result<()> {
    let seed = seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let columns: Vec<String> = COLUMNS
        .iter()
        .map(|c| format!("{} {}", c.name, c.sql_type))
        .collect();
    let setup = format!(
        "{TYPES}\nCREATE TABLE vals (id integer PRIMARY KEY, {});",
        columns.join(", ")
    );
    let pipeline = Pipeline::start(STREAM, 2, &setup, "").await?;

    let names: Vec<&str> = COLUMNS.iter().map(|c| c.name).collect();
    let mut expected: BTreeMap<i64, Vec<(String, Expected)>> = BTreeMap::new();
    let mut id = 0;
    for _ in 0..TRANSACTIONS {
        let mut rows = Vec::new();
        for _ in 0..ROWS_PER_TRANSACTION {
            id += 1;
            let mut literals = vec![id.to_string()];
            let mut row = Vec::new();
            for column in COLUMNS {
                let (literal, value) = if rng.random_bool(0.05) {
                    ("NULL".to_owned(), Expected::Json(Value::Null))
                } else {
                    (column.generate)(&mut rng)
                };
                literals.push(literal.clone());
                row.push((literal, value));
            }
            rows.push(format!("({})", literals.join(", ")));
            expected.insert(id, row);
        }
        pipeline
            .pg
            .execute(&format!(
                "INSERT INTO vals (id, {}) VALUES {}",
                names.join(", "),
                rows.join(",\n")
            ))
            .await
            .map_err(|e| anyhow::anyhow!("seed {seed}: {e:#}"))?;
    }

    let records = pipeline
        .kin
        .wait_for_records(STREAM, expected.len(), Duration::from_secs(120))
        .await?;
    assert_eq!(
        records.len(),
        expected.len(),
        "seed {seed}: one record per row"
    );
    let mut mismatches = Vec::new();
    for record in &records {
        let envelope = record.json()?;
        let after = &envelope["after"];
        let id = after["id"].as_i64().expect("every envelope has an id");
        let row = expected.remove(&id).expect("each row arrives once");
        for ((literal, want), name) in row.iter().zip(&names) {
            let got = &after[*name];
            if !matches(want, got) {
                mismatches.push(format!(
                    "row {id} column {name}: SQL {literal} arrived as {got}, expected {want:?}"
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "seed {seed} (replay with {SEED_VAR}={seed}): {} values differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    Ok(())
}

//! Small, allocation-free JSON writing primitives for the envelope encoder.

use base64::Engine as _;

/// Appends `s` as a JSON string literal (with quotes), escaping what JSON requires.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    write_escaped(out, s.as_bytes());
    out.push(b'"');
}

/// Bytes that JSON strings must escape: controls, `"` and `\\`.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends the escaped body of a JSON string (no quotes). `bytes` must be UTF-8.
pub fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    let mut rest = bytes;
    // Copy the runs that need no escaping in one piece each.
    while let Some(i) = rest.iter().position(|&b| NEEDS_ESCAPE[b as usize]) {
        out.extend_from_slice(&rest[..i]);
        let b = rest[i];
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0C => out.extend_from_slice(b"\\f"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[(b >> 4) as usize],
                    HEX[(b & 0xF) as usize],
                ]);
            }
        }
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Appends `bytes` as a JSON string holding their standard base64 encoding.
pub fn write_base64(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    write_base64_unquoted(out, bytes);
    out.push(b'"');
}

/// Appends `bytes` in standard base64, without quotes (pieces of a longer
/// value join when all but the last are a multiple of 3 bytes long).
pub fn write_base64_unquoted(out: &mut Vec<u8>, bytes: &[u8]) {
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(bytes, &mut out[start..])
        .expect("buffer sized for the base64 length");
    out.truncate(start + written);
}

/// Appends an unsigned integer in decimal.
pub fn write_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(s: &str) {
        let mut out = Vec::new();
        write_str(&mut out, s);
        let parsed: String = serde_json::from_slice(&out).expect("valid JSON string");
        assert_eq!(parsed, s);
    }

    #[test]
    fn strings_round_trip_through_a_json_parser() {
        roundtrip("");
        roundtrip("plain");
        roundtrip("quote \" backslash \\ slash /");
        roundtrip("controls \u{0} \u{1} \u{8} \u{c} \n \r \t \u{1f} \u{7f}");
        roundtrip("unicode é ✓ 😀 \u{2028}");
        let all: String = (0u32..0x800).filter_map(char::from_u32).collect();
        roundtrip(&all);
    }

    #[test]
    fn base64_and_integers() {
        let mut out = Vec::new();
        write_base64(&mut out, b"\x00\x01\xfe\xffhello");
        assert_eq!(out, b"\"AAH+/2hlbGxv\"");
        out.clear();
        write_base64(&mut out, b"");
        assert_eq!(out, b"\"\"");
        for v in [0, 7, 10, 99, 1234567890, u64::MAX] {
            out.clear();
            write_u64(&mut out, v);
            assert_eq!(out, v.to_string().as_bytes());
        }
    }
}

//! Source positions: totally ordered by plain string comparison.

use std::fmt;

/// A position in a source's log, rendered as `{major:016X}:{minor:08X}`.
///
/// For Postgres `major` is the commit LSN of the transaction and `minor` the
/// ordinal of the change inside it, so positions sort in commit order and the
/// event id (`{source.name}:{position}`) is the same every time a change is
/// sent again after a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    /// The transaction-level part (Postgres: commit LSN).
    pub major: u64,
    /// The ordinal of the change inside the transaction.
    pub minor: u32,
}

/// Length of a rendered position.
pub const POSITION_LEN: usize = 16 + 1 + 8;

impl Position {
    /// A position from its two parts.
    pub const fn new(major: u64, minor: u32) -> Self {
        Self { major, minor }
    }

    /// The position's text, fixed-width upper-case hex.
    pub fn render(&self) -> [u8; POSITION_LEN] {
        let mut out = [b'0'; POSITION_LEN];
        write_hex(&mut out[..16], self.major);
        out[16] = b':';
        write_hex(&mut out[17..], u64::from(self.minor));
        out
    }
}

/// Writes the low `out.len()` hex digits of `value` (an even count), two
/// per byte.
fn write_hex(out: &mut [u8], mut value: u64) {
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut pairs = [[0; 2]; 256];
        let mut i = 0;
        while i < 256 {
            pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xF]];
            i += 1;
        }
        pairs
    };
    for slot in out.rchunks_exact_mut(2) {
        slot.copy_from_slice(&PAIRS[(value & 0xFF) as usize]);
        value >>= 8;
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}:{:08X}", self.major, self.minor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fixed_width_hex_and_sorts_as_text() {
        let a = Position::new(0x16B_3748, 3);
        assert_eq!(&a.render(), b"00000000016B3748:00000003");
        assert_eq!(a.to_string().as_bytes(), &a.render());
        let every_digit = Position::new(0x0123_4567_89AB_CDEF, 0xFEDC_BA98);
        assert_eq!(&every_digit.render(), b"0123456789ABCDEF:FEDCBA98");
        let positions = [
            Position::new(1, 0),
            Position::new(1, 0xFFFF_FFFF),
            Position::new(0x10, 0),
            Position::new(u64::MAX, 7),
        ];
        for pair in positions.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(
                pair[0].render() < pair[1].render(),
                "{} < {}",
                pair[0],
                pair[1]
            );
        }
    }
}

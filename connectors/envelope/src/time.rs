//! RFC 3339 timestamps in UTC (`YYYY-MM-DDTHH:MM:SS.ffffffZ`) without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

/// Length of a rendered timestamp: `2026-11-23T05:21:05.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

/// Microseconds between 1970-01-01 and 2000-01-01 (the Postgres epoch).
pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Renders microseconds since the Unix epoch as an RFC 3339 UTC timestamp
/// with six fractional digits. Years outside 0000..=9999 are clamped.
pub fn format_unix_micros(micros: i64) -> [u8; TIMESTAMP_LEN] {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400) as u32;
    let (year, month, day) = civil_from_days(days);
    let year = year.clamp(0, 9999) as u32;
    let mut out = *b"0000-00-00T00:00:00.000000Z";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month);
    put_digits(&mut out[8..10], day);
    put_digits(&mut out[11..13], sod / 3600);
    put_digits(&mut out[14..16], sod / 60 % 60);
    put_digits(&mut out[17..19], sod % 60);
    put_digits(&mut out[20..26], frac);
    out
}

/// The current wall-clock time, rendered like [`format_unix_micros`].
pub fn now() -> [u8; TIMESTAMP_LEN] {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    format_unix_micros(micros)
}

fn put_digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Milliseconds since the Unix epoch of a timestamp [`format_unix_micros`]
/// wrote (`YYYY-MM-DDTHH:MM:SS[.f...]Z`); `None` for any other text.
pub fn parse_unix_millis(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |acc, &d| {
            d.is_ascii_digit().then(|| acc * 10 + i64::from(d - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(i, c)| b.get(i) != Some(&c)) || b.last() != Some(&b'Z') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let millis = match b.get(19) {
        Some(b'.') => {
            let fraction = &b[20..b.len() - 1];
            let mut ms = 0;
            for i in 0..3 {
                let digit = fraction.get(i).copied().unwrap_or(b'0');
                digit.is_ascii_digit().then_some(())?;
                ms = ms * 10 + i64::from(digit - b'0');
            }
            fraction.iter().all(u8::is_ascii_digit).then_some(ms)?
        }
        Some(b'Z') if b.len() == 20 => 0,
        _ => return None,
    };
    let days = days_from_civil(year, month as u32, day as u32);
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000) + millis)
}

/// Converts a proleptic Gregorian date to days since 1970-01-01 (the
/// inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = i64::from((month + 9) % 12); // 0 = March
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day),
/// counting in 400-year eras of 146,097 days.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468; // days since 0000-03-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(micros: i64) -> String {
        String::from_utf8(format_unix_micros(micros).to_vec()).unwrap()
    }

    #[test]
    fn known_instants() {
        assert_eq!(fmt(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            fmt(POSTGRES_EPOCH_UNIX_MICROS),
            "2000-01-01T00:00:00.000000Z"
        );
        assert_eq!(fmt(1_795_411_265_123_456), "2026-11-23T05:21:05.123456Z");
        assert_eq!(fmt(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(fmt(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(fmt(253_402_300_799_999_999), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn parsing_inverts_formatting() {
        for micros in [
            0,
            1_795_411_265_123_456,
            951_782_400_000_000,
            -1,
            253_402_300_799_999_999,
        ] {
            assert_eq!(
                parse_unix_millis(&fmt(micros)),
                Some(micros.div_euclid(1000))
            );
        }
        assert_eq!(
            parse_unix_millis("2026-11-23T05:21:05Z"),
            Some(1_795_411_265_000)
        );
        assert_eq!(
            parse_unix_millis("2026-11-23T05:21:05.1Z"),
            Some(1_795_411_265_100)
        );
        for bad in [
            "",
            "2026-11-23",
            "2026-11-23T05:21:05",
            "2026-13-23T05:21:05Z",
            "x026-11-23T05:21:05Z",
            "2026-11-23T05:21:05.Z1",
        ] {
            assert_eq!(parse_unix_millis(bad), None, "{bad}");
        }
        for days in -100_000..100_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn every_day_for_a_few_centuries_is_consecutive() {
        let mut previous = civil_from_days(-80_000);
        for days in -79_999..80_000 {
            let current = civil_from_days(days);
            let next_in_month = (previous.0, previous.1, previous.2 + 1);
            let next_month = if previous.1 == 12 {
                (previous.0 + 1, 1, 1)
            } else {
                (previous.0, previous.1 + 1, 1)
            };
            assert!(
                current == next_in_month || current == next_month,
                "{previous:?} -> {current:?}"
            );
            previous = current;
        }
    }
}

//! Calendar dates in China Standard Time (UTC+8), as the policy texts count days.

use std::fmt;

/// A civil date, stored as days since 1970-01-01.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date(i64);

const CST_OFFSET_SECS: i64 = 8 * 3600;

impl Date {
    /// A date of the years 1 to 9999 (`None` outside: the day arithmetic, in microseconds,
    /// stays far from overflow).
    pub fn from_ymd(y: i64, m: u32, d: u32) -> Option<Self> {
        if !(1..=9999).contains(&y) || !(1..=12).contains(&m) || d == 0 || d > days_in_month(y, m) {
            return None;
        }
        // H. Hinnant's days_from_civil.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y.rem_euclid(400);
        let mp = i64::from((m + 9) % 12);
        let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        Some(Self(era * 146_097 + doe - 719_468))
    }

    /// `YYYY-MM-DD`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.trim().splitn(3, '-');
        let y = it.next()?.parse().ok()?;
        let m = it.next()?.parse().ok()?;
        let d = it.next()?.parse().ok()?;
        Self::from_ymd(y, m, d)
    }

    pub fn ymd(self) -> (i64, u32, u32) {
        civil_from_days(self.0)
    }

    pub fn year(self) -> i64 {
        self.ymd().0
    }

    /// 1 = Monday … 7 = Sunday.
    pub fn weekday(self) -> u32 {
        // 1970-01-01 was a Thursday (4).
        ((self.0 + 3).rem_euclid(7) + 1) as u32
    }

    pub fn is_weekend(self) -> bool {
        self.weekday() >= 6
    }

    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }

    pub fn add_days(self, n: i64) -> Self {
        Self(self.0 + n)
    }

    /// The date `days` days after 1970-01-01.
    pub fn from_days(days: i64) -> Self {
        Self(days)
    }

    /// Days since 1970-01-01.
    pub fn days(self) -> i64 {
        self.0
    }

    /// The CST date of an instant (microseconds since the epoch).
    pub fn of_instant(micros: i64) -> Self {
        Self((micros.div_euclid(1_000_000) + CST_OFFSET_SECS).div_euclid(86_400))
    }

    /// The instant this date starts, 00:00 CST.
    pub fn start_micros(self) -> i64 {
        (self.0 * 86_400 - CST_OFFSET_SECS) * 1_000_000
    }

    /// The instant this date ends, 24:00 CST (the next date's start).
    pub fn end_micros(self) -> i64 {
        self.next().start_micros()
    }
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

impl fmt::Debug for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Date({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_weekdays() {
        let d = Date::parse("2025-10-01").unwrap();
        assert_eq!(d.to_string(), "2025-10-01");
        assert_eq!(d.weekday(), 3, "2025-10-01 was a Wednesday");
        assert_eq!(Date::parse("2024-02-29").unwrap().to_string(), "2024-02-29");
        assert!(Date::parse("2025-02-29").is_none());
        assert_eq!(Date::parse("1970-01-01").unwrap().weekday(), 4);
    }

    #[test]
    fn cst_day_boundaries() {
        // 2026-03-01T15:59:59Z is 23:59:59 CST on the 1st; 16:00Z is the 2nd.
        assert_eq!(
            Date::of_instant(1_772_380_799_000_000).to_string(),
            "2026-03-01"
        );
        assert_eq!(
            Date::of_instant(1_772_380_800_000_000).to_string(),
            "2026-03-02"
        );
        let d = Date::parse("2026-03-02").unwrap();
        assert_eq!(d.start_micros(), 1_772_380_800_000_000);
    }
}

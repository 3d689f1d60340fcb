//! Conversions between the contract's `Timestamp` and the store's microseconds.

use prost_types::Timestamp;

pub fn timestamp_from_micros(micros: i64) -> Timestamp {
    Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// Microseconds since the epoch; `None` when nanos are out of range.
pub fn micros_from_timestamp(ts: &Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    ts.seconds
        .checked_mul(1_000_000)?
        .checked_add(i64::from(ts.nanos / 1_000))
}

/// A moment as China Standard Time wall-clock text, "YYYY-MM-DD HH:MM:SS" (for messages).
pub fn format_cst_micros(micros: i64) -> String {
    crate::relay::http::format_cst(micros.div_euclid(1_000_000))
}

/// The month of a moment in China Standard Time, as YYYYMM (the spot-check stratum of a
/// case: the migration computes the same for cases opened before it).
pub fn cst_month(micros: i64) -> i64 {
    let (y, m, _) = crate::rules::Date::of_instant(micros).ymd();
    y * 100 + i64::from(m)
}

#[cfg(test)]
mod tests {
    #[test]
    fn months_turn_at_midnight_china_standard_time() {
        // 2025-03-31 23:59:59 CST is 15:59:59 UTC; a second later it is April in China.
        let last = 1_743_436_799 * 1_000_000;
        assert_eq!(super::cst_month(last), 202503);
        assert_eq!(super::cst_month(last + 1_000_000), 202504);
    }
}

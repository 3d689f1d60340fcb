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
    crate::relay::http_json::format_cst(micros.div_euclid(1_000_000))
}

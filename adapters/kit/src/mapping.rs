//! Declarative mapping from a source record (a table row, a CSV row, an XML record, a JSON
//! object) to the canonical rating: which source field holds each canonical field, how
//! source values translate (scales, code tables), and fixed values. Records that cannot be
//! expressed, or that the hub's own rules would refuse, are rejected here with reasons naming
//! the field — the same validation the hub applies (`rating_hub::domain::parse_rating`).

use std::collections::BTreeMap;

use serde::Deserialize;

use rating_hub::domain::{IngestRules, Violation, parse_rating};
use rating_hub::pb::v1 as pb;
use rating_hub::rules::Date;

fn d_time() -> String {
    "yyyy-MM-dd HH:mm:ss".into()
}

/// `[mapping]`. Canonical fields: case_number, item_code, item_name, region_code,
/// org_credit_code, org_name, hall_id, window_id, staff_id, staff_name, channel, level,
/// target_kind, detail_codes (separated by , ; or |), text, rated_at, service_completed_at,
/// follow_up_of, batch_id, theme_id, device_id, rater.kind, rater.real_name, rater.name,
/// rater.id_number, rater.id_type, rater.credit_code, rater.phone, attributes.<key>; and
/// source_key, the record's own id (used to derive the idempotency key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Canonical field → source field (column, CSV header, XML element, JSON path a.b.0.c).
    pub fields: BTreeMap<String, String>,
    /// Canonical field → (source value → canonical value). Enum fields (level, channel,
    /// target_kind, rater.kind, rater.id_type) take the contract's names, e.g.
    /// "5" = "LEVEL_VERY_SATISFIED", "414" = "ID_DOCUMENT_TYPE_PASSPORT".
    #[serde(default)]
    pub values: BTreeMap<String, BTreeMap<String, String>>,
    /// Canonical field → a fixed value for every record (e.g. channel = "CHANNEL_PC_WEB").
    #[serde(default)]
    pub constants: BTreeMap<String, String>,
    /// Source time format: "yyyy-MM-dd HH:mm:ss" (China Standard Time), "rfc3339",
    /// "unix-seconds" or "unix-millis".
    #[serde(default = "d_time")]
    pub time_format: String,
}

fn violation(field: &str, description: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        description: description.into(),
    }
}

/// Parses a source time into microseconds since the epoch. `None` for anything that is not
/// a time in the format, out of range included (all arithmetic is checked: a 20-digit
/// `unix-seconds` value or a 99-hour offset is refused, never wrapped).
pub fn parse_time(raw: &str, format: &str) -> Option<i64> {
    let s = raw.trim();
    match format {
        "unix-seconds" => s.parse::<i64>().ok()?.checked_mul(1_000_000),
        "unix-millis" => s.parse::<i64>().ok()?.checked_mul(1_000),
        "rfc3339" => {
            // YYYY-MM-DDTHH:MM:SS(.fff)?(Z|±HH:MM|±HHMM|±HH)
            let (date, rest) = s.split_once(['T', 't', ' '])?;
            let d = Date::parse(date)?;
            let (time, offset_secs) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
                (t, 0)
            } else {
                let pos = rest.rfind(['+', '-'])?;
                let (t, off) = rest.split_at(pos);
                let sign = if off.starts_with('-') { -1 } else { 1 };
                let digits = off[1..].replace(':', "");
                if !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let (h, m) = match digits.len() {
                    2 => (digits.parse::<i64>().ok()?, 0),
                    4 => (
                        digits[..2].parse::<i64>().ok()?,
                        digits[2..].parse::<i64>().ok()?,
                    ),
                    _ => return None,
                };
                if h > 18 || m > 59 {
                    return None;
                }
                (t, sign * (h * 3600 + m * 60))
            };
            let (h, m, sec) = clock(time.split('.').next()?, true)?;
            // Date::start_micros is 00:00 CST; move to 00:00 UTC, then apply the offset.
            let midnight_utc = d.start_micros().checked_add(8 * 3_600_000_000)?;
            midnight_utc.checked_add(((h * 60 + m) * 60 + sec - offset_secs) * 1_000_000)
        }
        _ => {
            let (date, time) = s.split_once(' ').unwrap_or((s, "00:00:00"));
            // A zone-aware column printed with its offset ("2025-06-04 01:30:00+00" from a
            // UTC session, "…+08", "…Z"): the offset is honoured, never dropped.
            if time.ends_with(['Z', 'z']) || time.contains(['+', '-']) {
                return parse_time(&format!("{}T{time}", date.replace('/', "-")), "rfc3339");
            }
            let d = Date::parse(&date.replace('/', "-"))?;
            // A fraction of a second (Java's Timestamp.toString(), DATETIME(3)): dropped.
            let time = match time.split_once('.') {
                Some((t, frac)) if frac.bytes().all(|b| b.is_ascii_digit()) => t,
                Some(_) => return None,
                None => time,
            };
            let (h, m, sec) = clock(time, false)?;
            d.start_micros()
                .checked_add(((h * 60 + m) * 60 + sec) * 1_000_000)
        }
    }
}

/// "HH:MM:SS" (minutes and seconds optional unless `strict`), each part in range.
fn clock(time: &str, strict: bool) -> Option<(i64, i64, i64)> {
    let mut it = time.split(':');
    let mut part = |required: bool| match it.next() {
        Some(x) if x.len() <= 2 && !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()) => {
            x.parse::<i64>().ok()
        }
        None if !required => Some(0),
        _ => None,
    };
    let (h, m, sec) = (part(true)?, part(strict)?, part(strict)?);
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some((h, m, sec))
}

impl Mapping {
    /// The source field a canonical field comes from, if mapped.
    pub fn source_of(&self, canonical: &str) -> Option<&str> {
        self.fields.get(canonical).map(String::as_str)
    }

    /// Builds and validates a rating from a record. `get` reads a source field.
    pub fn rating(
        &self,
        source_key: String,
        get: &dyn Fn(&str) -> Option<String>,
        now_micros: i64,
    ) -> Result<pb::Rating, Vec<Violation>> {
        let mut errors = Vec::new();
        let mut value = |canonical: &str| -> String {
            let raw = match (self.fields.get(canonical), self.constants.get(canonical)) {
                (Some(src), _) => get(src).unwrap_or_default(),
                (None, Some(c)) => c.clone(),
                (None, None) => String::new(),
            };
            let raw = raw.trim().to_owned();
            match self.values.get(canonical) {
                Some(table) if !raw.is_empty() => match table.get(&raw) {
                    Some(v) => v.clone(),
                    None => {
                        errors.push(violation(
                            canonical,
                            format!("source value {raw:?} has no mapping in values.{canonical}"),
                        ));
                        String::new()
                    }
                },
                _ => raw,
            }
        };
        let level = value("level");
        let channel = value("channel");
        let target = value("target_kind");
        let rater_kind = value("rater.kind");
        let id_type = value("rater.id_type");
        let rated_at = value("rated_at");
        let completed_at = value("service_completed_at");
        let real_name = value("rater.real_name");
        let detail = value("detail_codes");
        let mut rating = pb::Rating {
            source_key,
            case_number: value("case_number"),
            item_code: value("item_code"),
            item_name: value("item_name"),
            region_code: value("region_code"),
            org_credit_code: value("org_credit_code"),
            org_name: value("org_name"),
            hall_id: value("hall_id"),
            window_id: value("window_id"),
            staff_id: value("staff_id"),
            staff_name: value("staff_name"),
            text: value("text"),
            follow_up_of: value("follow_up_of"),
            batch_id: value("batch_id"),
            theme_id: value("theme_id"),
            device_id: value("device_id"),
            detail_codes: detail
                .split([',', ';', '|', '，'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            ..Default::default()
        };
        let name = value("rater.name");
        let id_number = value("rater.id_number");
        let phone = value("rater.phone");
        let credit = value("rater.credit_code");
        for key in self.fields.keys().chain(self.constants.keys()) {
            if let Some(attr) = key.strip_prefix("attributes.") {
                let v = value(key);
                if !v.is_empty() {
                    rating.attributes.insert(attr.to_owned(), v);
                }
            }
        }
        let mut enum_field = |field: &str, raw: &str, parse: &dyn Fn(&str) -> Option<i32>| -> i32 {
            if raw.is_empty() {
                return 0;
            }
            parse(raw).unwrap_or_else(|| {
                errors.push(violation(
                    field,
                    format!("{raw:?} is not a value of the contract (map it in values.{field})"),
                ));
                0
            })
        };
        rating.level = enum_field("level", &level, &|s| {
            pb::Level::from_str_name(s).map(|v| v as i32)
        });
        rating.channel = enum_field("channel", &channel, &|s| {
            pb::Channel::from_str_name(s).map(|v| v as i32)
        });
        rating.target_kind = enum_field("target_kind", &target, &|s| {
            pb::TargetKind::from_str_name(s).map(|v| v as i32)
        });
        let kind = enum_field("rater.kind", &rater_kind, &|s| {
            pb::RaterKind::from_str_name(s).map(|v| v as i32)
        });
        let id_type = enum_field("rater.id_type", &id_type, &|s| {
            pb::IdDocumentType::from_str_name(s).map(|v| v as i32)
        });
        if !(name.is_empty()
            && id_number.is_empty()
            && phone.is_empty()
            && credit.is_empty()
            && kind == 0)
        {
            rating.rater = Some(pb::Rater {
                kind,
                real_name: matches!(real_name.as_str(), "1" | "true" | "是" | "Y" | "y"),
                name,
                id_number,
                id_type,
                credit_code: credit,
                phone,
            });
        }
        for (field, raw, slot) in [
            ("rated_at", &rated_at, &mut rating.rated_at),
            (
                "service_completed_at",
                &completed_at,
                &mut rating.service_completed_at,
            ),
        ] {
            if raw.is_empty() {
                continue;
            }
            match parse_time(raw, &self.time_format) {
                Some(m) => *slot = Some(rating_hub::time::timestamp_from_micros(m)),
                None => errors.push(violation(
                    field,
                    format!("{raw:?} is not a time in the format {:?}", self.time_format),
                )),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // The hub's own rules, so a department hears about a bad record at once.
        parse_rating(&rating, now_micros, &IngestRules::default(), false)?;
        Ok(rating)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Times in the shapes that overflow: long digit runs (13+ for seconds, 16+ for
    /// milliseconds), huge hours and offsets, and arbitrary text.
    fn dangerous_times() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            "-?[0-9]{1,25}",
            "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{1,6}:[0-9]{1,6}:[0-9]{1,6}([+-][0-9]{1,6}(:[0-9]{1,6})?|Z)?",
            "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9]{1,20}(:[0-9]{1,20}){0,3}(\\.[0-9]{0,9})?",
            "[0-9]{5,20}-[0-9]{2}-[0-9]{2}( [0-9]{2}:[0-9]{2}:[0-9]{2}|T[0-9]{2}:[0-9]{2}:[0-9]{2}Z)",
            "2025-0[1-9]-[0-2][1-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9][+-][0-9]{2}(:?[0-9]{2})?",
            "\\PC{0,40}",
        ]
    }

    proptest::proptest! {
        #[test]
        fn time_parsing_never_panics_or_wraps(s in dangerous_times()) {
            for f in ["yyyy-MM-dd HH:mm:ss", "rfc3339", "unix-seconds", "unix-millis"] {
                if let Some(t) = parse_time(&s, f) {
                    // What parses is a time this side of the year ±292,000 (no wrap), and a
                    // unix value is exactly its digits scaled.
                    if f == "unix-seconds" {
                        proptest::prop_assert_eq!(Some(t), s.trim().parse::<i64>().ok().and_then(|v| v.checked_mul(1_000_000)));
                    }
                }
            }
        }
    }

    #[test]
    fn values_that_would_overflow_are_refused() {
        assert_eq!(parse_time("9223372036854775", "unix-seconds"), None);
        assert_eq!(parse_time("9223372036854775807", "unix-millis"), None);
        assert_eq!(parse_time("2025-06-04T11:00:00+99:00", "rfc3339"), None);
        assert_eq!(
            parse_time("2025-06-04 99:00:00", "yyyy-MM-dd HH:mm:ss"),
            None
        );
        assert_eq!(
            parse_time("2025-06-04T11:00:00+0800", "rfc3339"),
            parse_time("2025-06-04T03:00:00Z", "rfc3339")
        );
        assert_eq!(
            parse_time("2025-06-04T11:00:00+08", "rfc3339"),
            parse_time("2025-06-04T03:00:00Z", "rfc3339")
        );
        assert_eq!(
            parse_time("2025-06-04T03:00:00+00", "rfc3339"),
            parse_time("2025-06-04T03:00:00Z", "rfc3339")
        );
        // Years far out (the day arithmetic would overflow) are refused, not wrapped.
        assert_eq!(
            parse_time("300000-01-01 00:00:00", "yyyy-MM-dd HH:mm:ss"),
            None
        );
        assert_eq!(
            parse_time("9999999999999999-01-01T00:00:00Z", "rfc3339"),
            None
        );
        // A value with an offset is not this format: refused, never read with the offset
        // dropped.
        assert_eq!(
            parse_time("2025-06-04 11:30:45 +08:00", "yyyy-MM-dd HH:mm:ss"),
            None
        );
    }

    #[test]
    fn times() {
        let cst = parse_time("2025-06-04 11:00:00", "yyyy-MM-dd HH:mm:ss").unwrap();
        // Java's Timestamp.toString(), MySQL DATETIME(3): the fraction is dropped, the
        // seconds kept.
        assert_eq!(
            parse_time("2025-06-04 11:00:00.0", "yyyy-MM-dd HH:mm:ss"),
            Some(cst)
        );
        assert_eq!(
            parse_time("2025-06-04 11:00:07.123", "yyyy-MM-dd HH:mm:ss"),
            Some(cst + 7_000_000)
        );
        let utc = parse_time("2025-06-04T03:00:00Z", "rfc3339").unwrap();
        let off = parse_time("2025-06-04T11:00:00+08:00", "rfc3339").unwrap();
        assert_eq!(cst, utc);
        assert_eq!(cst, off);
        assert_eq!(
            parse_time("1749006000", "unix-seconds"),
            Some(1_749_006_000_000_000)
        );
        assert!(parse_time("yesterday", "yyyy-MM-dd HH:mm:ss").is_none());
        // A zone-aware column as PostgreSQL and MySQL print it: the offset counts (before,
        // "+00" was dropped and UTC read as Beijing time, 8 hours off).
        for printed in [
            "2025-06-04 03:00:00+00",
            "2025-06-04 03:00:00.000000+00",
            "2025-06-04 11:00:00+08",
            "2025-06-04 11:00:00+08:00",
            "2025-06-04 03:00:00Z",
            "2025/06/04 03:00:00+0000",
        ] {
            assert_eq!(
                parse_time(printed, "yyyy-MM-dd HH:mm:ss"),
                Some(cst),
                "{printed}"
            );
        }
    }
}

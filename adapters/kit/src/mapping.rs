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
/// rater.id_number, rater.credit_code, rater.phone, attributes.<key>; and source_key, the
/// record's own id (used to derive the idempotency key).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    /// Canonical field → source field (column, CSV header, XML element, JSON path a.b.0.c).
    pub fields: BTreeMap<String, String>,
    /// Canonical field → (source value → canonical value). Enum fields (level, channel,
    /// target_kind, rater.kind) take the contract's names, e.g. "5" = "LEVEL_VERY_SATISFIED".
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

/// Parses a source time into microseconds since the epoch.
pub fn parse_time(raw: &str, format: &str) -> Option<i64> {
    let s = raw.trim();
    match format {
        "unix-seconds" => s.parse::<i64>().ok().map(|v| v * 1_000_000),
        "unix-millis" => s.parse::<i64>().ok().map(|v| v * 1_000),
        "rfc3339" => {
            // YYYY-MM-DDTHH:MM:SS(.fff)?(Z|±HH:MM)
            let (date, rest) = s.split_once('T')?;
            let d = Date::parse(date)?;
            let (time, offset_secs) = if let Some(t) = rest.strip_suffix('Z') {
                (t, 0)
            } else {
                let pos = rest.rfind(['+', '-'])?;
                let (t, off) = rest.split_at(pos);
                let sign = if off.starts_with('-') { -1 } else { 1 };
                let (h, m) = off[1..].split_once(':')?;
                (
                    t,
                    sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
                )
            };
            let time = time.split('.').next()?;
            let mut it = time.split(':').map(|x| x.parse::<i64>().ok());
            let (h, m, sec) = (it.next()??, it.next()??, it.next()??);
            // Date::start_micros is 00:00 CST; move to 00:00 UTC, then apply the offset.
            let midnight_utc = d.start_micros() + 8 * 3_600_000_000;
            Some(midnight_utc + ((h * 60 + m) * 60 + sec - offset_secs) * 1_000_000)
        }
        _ => {
            let (date, time) = s.split_once(' ').unwrap_or((s, "00:00:00"));
            let d = Date::parse(&date.replace('/', "-"))?;
            let mut it = time.split(':').map(|x| x.parse::<i64>().ok());
            let (h, m, sec) = (
                it.next()??,
                it.next().flatten().unwrap_or(0),
                it.next().flatten().unwrap_or(0),
            );
            if !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..60).contains(&sec) {
                return None;
            }
            Some(d.start_micros() + ((h * 60 + m) * 60 + sec) * 1_000_000)
        }
    }
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

    proptest::proptest! {
        #[test]
        fn time_parsing_never_panics(s in "\\PC{0,40}") {
            for f in ["yyyy-MM-dd HH:mm:ss", "rfc3339", "unix-seconds", "unix-millis"] {
                let _ = parse_time(&s, f);
            }
        }
    }

    #[test]
    fn times() {
        let cst = parse_time("2025-06-04 11:00:00", "yyyy-MM-dd HH:mm:ss").unwrap();
        let utc = parse_time("2025-06-04T03:00:00Z", "rfc3339").unwrap();
        let off = parse_time("2025-06-04T11:00:00+08:00", "rfc3339").unwrap();
        assert_eq!(cst, utc);
        assert_eq!(cst, off);
        assert_eq!(
            parse_time("1749006000", "unix-seconds"),
            Some(1_749_006_000_000_000)
        );
        assert!(parse_time("yesterday", "yyyy-MM-dd HH:mm:ss").is_none());
    }
}

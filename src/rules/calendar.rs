//! Working days: the State Council calendar with 调休, as data (data/calendar.toml), plus
//! per-center overrides. A year without data is an error, never a silent guess.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::date::Date;

/// The calendar shipped with the hub.
pub const DEFAULT_CALENDAR_TOML: &str = include_str!("data/calendar.toml");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    #[error(
        "the working-day calendar has no data for {0}; add the State Council's notice for that year to the calendar"
    )]
    MissingYear(i64),
    #[error("calendar: {0}")]
    Invalid(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct YearFile {
    #[serde(default)]
    source: String,
    #[serde(default)]
    holidays: Vec<String>,
    #[serde(default)]
    workdays: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalendarFile {
    years: BTreeMap<String, YearFile>,
}

/// Per-center changes on top of the national calendar.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarOverrides {
    /// Extra days off (dates or ranges).
    #[serde(default)]
    pub holidays: Vec<String>,
    /// Extra working days (dates or ranges).
    #[serde(default)]
    pub workdays: Vec<String>,
}

#[derive(Debug, Clone, Default)]
struct Year {
    source: String,
    holidays: BTreeSet<Date>,
    workdays: BTreeSet<Date>,
}

#[derive(Debug, Clone, Default)]
pub struct Calendar {
    years: BTreeMap<i64, Year>,
}

fn expand(spec: &str) -> Result<Vec<Date>, CalendarError> {
    let bad = || CalendarError::Invalid(format!("{spec:?} is not a date or a first..last range"));
    let (a, b) = match spec.split_once("..") {
        Some((a, b)) => (
            Date::parse(a).ok_or_else(bad)?,
            Date::parse(b).ok_or_else(bad)?,
        ),
        None => {
            let d = Date::parse(spec).ok_or_else(bad)?;
            (d, d)
        }
    };
    if b < a || b.add_days(-40) > a {
        return Err(bad());
    }
    let mut out = Vec::new();
    let mut d = a;
    while d <= b {
        out.push(d);
        d = d.next();
    }
    Ok(out)
}

impl Calendar {
    pub fn parse(toml_text: &str) -> Result<Self, CalendarError> {
        let file: CalendarFile =
            toml::from_str(toml_text).map_err(|e| CalendarError::Invalid(e.to_string()))?;
        let mut years = BTreeMap::new();
        for (y, data) in file.years {
            let year: i64 = y
                .parse()
                .map_err(|_| CalendarError::Invalid(format!("year {y:?}")))?;
            let mut entry = Year {
                source: data.source,
                ..Default::default()
            };
            for (list, target) in [
                (&data.holidays, &mut entry.holidays),
                (&data.workdays, &mut entry.workdays),
            ] {
                for spec in list {
                    for d in expand(spec)? {
                        if d.year() != year {
                            return Err(CalendarError::Invalid(format!(
                                "{d} is listed under {year}"
                            )));
                        }
                        target.insert(d);
                    }
                }
            }
            if let Some(d) = entry.holidays.intersection(&entry.workdays).next() {
                return Err(CalendarError::Invalid(format!(
                    "{d} is both a holiday and a working day"
                )));
            }
            years.insert(year, entry);
        }
        Ok(Self { years })
    }

    /// The shipped calendar.
    pub fn national() -> Self {
        Self::parse(DEFAULT_CALENDAR_TOML).expect("the shipped calendar is valid")
    }

    /// Applies a center's overrides (their years must exist in the calendar).
    pub fn with_overrides(mut self, o: &CalendarOverrides) -> Result<Self, CalendarError> {
        for (list, is_holiday) in [(&o.holidays, true), (&o.workdays, false)] {
            for spec in list {
                for d in expand(spec)? {
                    let year = self
                        .years
                        .get_mut(&d.year())
                        .ok_or(CalendarError::MissingYear(d.year()))?;
                    if is_holiday {
                        year.workdays.remove(&d);
                        year.holidays.insert(d);
                    } else {
                        year.holidays.remove(&d);
                        year.workdays.insert(d);
                    }
                }
            }
        }
        Ok(self)
    }

    pub fn years(&self) -> impl Iterator<Item = (i64, &str)> {
        self.years.iter().map(|(y, v)| (*y, v.source.as_str()))
    }

    pub fn is_working_day(&self, d: Date) -> Result<bool, CalendarError> {
        let year = self
            .years
            .get(&d.year())
            .ok_or(CalendarError::MissingYear(d.year()))?;
        Ok(year.workdays.contains(&d) || (!d.is_weekend() && !year.holidays.contains(&d)))
    }

    /// The end (24:00 CST) of the `n`th working day after the day of `from_micros`: the
    /// deadline "within n working days" of an event.
    pub fn working_days_deadline(&self, from_micros: i64, n: u32) -> Result<i64, CalendarError> {
        let mut d = Date::of_instant(from_micros);
        let mut left = n;
        while left > 0 {
            d = d.next();
            if self.is_working_day(d)? {
                left -= 1;
            }
        }
        Ok(d.end_micros())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> Date {
        Date::parse(s).unwrap()
    }

    #[test]
    fn a_working_saturday_counts_and_a_golden_week_does_not() {
        let c = Calendar::national();
        // 2025-09-28 (Sunday) and 2025-10-11 (Saturday) were worked for the National Day week.
        assert!(c.is_working_day(day("2025-09-28")).unwrap());
        assert!(c.is_working_day(day("2025-10-11")).unwrap());
        for d in 1..=8 {
            assert!(
                !c.is_working_day(day(&format!("2025-10-{d:02}"))).unwrap(),
                "2025-10-{d:02}"
            );
        }
        assert!(c.is_working_day(day("2025-10-09")).unwrap());
        assert!(
            !c.is_working_day(day("2025-10-12")).unwrap(),
            "an ordinary Sunday"
        );
        // 2024: Saturday 2024-05-11 worked; Labour Day 1–5 May off.
        assert!(c.is_working_day(day("2024-05-11")).unwrap());
        assert!(!c.is_working_day(day("2024-05-03")).unwrap());
    }

    #[test]
    fn five_working_days_across_golden_week() {
        let c = Calendar::national();
        // Completed Tuesday 2025-09-30 10:00 CST: working days after it are 10-09 (Thu),
        // 10-10 (Fri), 10-11 (Sat, 调休), 10-13 (Mon), 10-14 (Tue).
        let completed = day("2025-09-30").start_micros() + 10 * 3_600_000_000;
        let deadline = c.working_days_deadline(completed, 5).unwrap();
        assert_eq!(deadline, day("2025-10-14").end_micros());
    }

    #[test]
    fn a_year_without_data_is_an_error() {
        let c = Calendar::national();
        assert_eq!(
            c.is_working_day(day("2031-03-03")),
            Err(CalendarError::MissingYear(2031))
        );
        let late = day("2026-12-28").start_micros();
        assert_eq!(
            c.working_days_deadline(late, 5),
            Err(CalendarError::MissingYear(2027)),
            "a deadline running into a year without data fails loudly"
        );
    }

    #[test]
    fn center_overrides_apply() {
        let c = Calendar::national()
            .with_overrides(&CalendarOverrides {
                holidays: vec!["2025-03-03".into()],
                workdays: vec!["2025-03-08".into()],
            })
            .unwrap();
        assert!(!c.is_working_day(day("2025-03-03")).unwrap());
        assert!(c.is_working_day(day("2025-03-08")).unwrap());
        let e = Calendar::national().with_overrides(&CalendarOverrides {
            holidays: vec!["2040-01-02".into()],
            workdays: vec![],
        });
        assert_eq!(e.unwrap_err(), CalendarError::MissingYear(2040));
    }

    #[test]
    fn malformed_data_is_refused() {
        assert!(Calendar::parse("[years.2025]\nholidays = [\"2025-13-01\"]\n").is_err());
        assert!(Calendar::parse("[years.2025]\nholidays = [\"2024-12-31\"]\n").is_err());
    }
}

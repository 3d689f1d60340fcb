//! Working days: the State Council calendar with 调休, as data (data/calendar.toml), plus
//! per-center overrides.
//!
//! A year the State Council has not published yet (every December, deadlines run into it)
//! gets a **provisional** calendar computed from the statutory holidays
//! (《全国年节及纪念日放假办法》, as amended in 2024 from 2025 on: 元旦 1 day, 春节 4 days from 除夕,
//! 清明 1, 劳动节 2, 端午 1, 中秋 1, 国庆 3; before 2025: 春节 3 days from 初一, 劳动节 1), with a
//! weekday off after a statutory day that falls on a weekend, and no 调休 make-up days. The
//! lunar dates come from the `chinese-lunisolar-calendar` crate (1901–2100); 清明 from the
//! 寿星 formula for the 21st century. Every deadline that touched a provisional day says so.
//! Years outside 2001–2099 without data are still an error.

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
    #[error(
        "the working-day calendar for {0} is provisional (the State Council's notice is not loaded)"
    )]
    Provisional(i64),
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
    /// Computed from the statutory holidays, not published by the State Council.
    provisional: bool,
}

/// A day off in a year's calendar, for `rating-hub calendar show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YearView {
    pub year: i64,
    pub provisional: bool,
    pub source: String,
    pub holidays: Vec<Date>,
    pub workdays: Vec<Date>,
}

/// The first and last years a provisional calendar can be computed for.
const PROVISIONAL_YEARS: std::ops::RangeInclusive<i64> = 2001..=2099;

/// 清明: the 寿星 formula for 2001–2099, [Y × 0.2422 + 4.81] − [Y / 4] (Y: the year's last two
/// digits), a day of April.
fn qingming(year: i64) -> Option<Date> {
    let y = year % 100;
    let day = (y as f64 * 0.2422 + 4.81).floor() as i64 - y / 4;
    Date::from_ymd(year, 4, day as u32)
}

/// The solar date of a lunar month and day in the lunar year that begins in `year`.
fn lunar(year: i64, month: u8, day: u8) -> Option<Date> {
    use chrono::Datelike;
    let d = chinese_lunisolar_calendar::LunisolarDate::from_ymd(
        u16::try_from(year).ok()?,
        month,
        false,
        day,
    )
    .ok()?
    .to_solar_date()
    .to_naive_date();
    Date::from_ymd(i64::from(d.year()), d.month(), d.day())
}

/// The statutory holidays of `year` (no substitute days): what the law fixes before the State
/// Council arranges the year.
pub fn statutory_holidays(year: i64) -> Option<Vec<Date>> {
    if !PROVISIONAL_YEARS.contains(&year) {
        return None;
    }
    let amended = year >= 2025;
    let mut days = vec![Date::from_ymd(year, 1, 1)?];
    let new_year = lunar(year, 1, 1)?;
    let spring: Vec<Date> = if amended {
        (-1..=2).map(|i| new_year.add_days(i)).collect()
    } else {
        (0..=2).map(|i| new_year.add_days(i)).collect()
    };
    days.extend(spring);
    days.push(qingming(year)?);
    days.push(Date::from_ymd(year, 5, 1)?);
    if amended {
        days.push(Date::from_ymd(year, 5, 2)?);
    }
    days.push(lunar(year, 5, 5)?);
    days.push(lunar(year, 8, 15)?);
    for d in 1..=3 {
        days.push(Date::from_ymd(year, 10, d)?);
    }
    // 除夕 of a 春节 early in January can fall in the year before: only this year's days.
    days.retain(|d| d.year() == year);
    days.sort();
    days.dedup();
    Some(days)
}

/// A provisional year: the statutory holidays, and after a statutory day that falls on a
/// weekend, the next weekday not already off.
fn provisional(year: i64) -> Option<Year> {
    let statutory = statutory_holidays(year)?;
    let mut holidays: BTreeSet<Date> = statutory.iter().copied().collect();
    for d in &statutory {
        if d.is_weekend() {
            let mut sub = d.next();
            while sub.is_weekend() || holidays.contains(&sub) {
                sub = sub.next();
            }
            if sub.year() == year {
                holidays.insert(sub);
            }
        }
    }
    Some(Year {
        source: format!(
            "the statutory holidays of {year} (《全国年节及纪念日放假办法》), a \
             weekday off after one on a weekend, no 调休; replace with the State Council's \
             notice"
        ),
        holidays,
        workdays: BTreeSet::new(),
        provisional: true,
    })
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
            if !PROVISIONAL_YEARS.contains(&year) && !(1901..=2100).contains(&year) {
                return Err(CalendarError::Invalid(format!(
                    "year {year} is out of range"
                )));
            }
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
        // Every year after the first published one that the law can be computed for and the
        // data does not hold (years before the data are not guessed: the holiday law changed
        // over time, and back-filled cases there report a gap, as before).
        let first = years.keys().next().copied().unwrap_or(i64::MAX);
        for year in PROVISIONAL_YEARS.filter(|y| *y > first) {
            if !years.contains_key(&year)
                && let Some(p) = provisional(year)
            {
                years.insert(year, p);
            }
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

    /// The years with official data (the State Council's notice), and their sources.
    pub fn years(&self) -> impl Iterator<Item = (i64, &str)> {
        self.years
            .iter()
            .filter(|(_, v)| !v.provisional)
            .map(|(y, v)| (*y, v.source.as_str()))
    }

    /// Whether `year` has the State Council's data (not only a provisional calendar).
    pub fn is_official(&self, year: i64) -> bool {
        self.years.get(&year).is_some_and(|y| !y.provisional)
    }

    /// A year's days off and make-up working days, official or provisional.
    pub fn year_view(&self, year: i64) -> Result<YearView, CalendarError> {
        let y = self
            .years
            .get(&year)
            .ok_or(CalendarError::MissingYear(year))?;
        Ok(YearView {
            year,
            provisional: y.provisional,
            source: y.source.clone(),
            holidays: y.holidays.iter().copied().collect(),
            workdays: y.workdays.iter().copied().collect(),
        })
    }

    pub fn is_working_day(&self, d: Date) -> Result<bool, CalendarError> {
        self.working_day(d).map(|(w, _)| w)
    }

    /// Whether `d` is a working day, and whether that comes from a provisional year.
    fn working_day(&self, d: Date) -> Result<(bool, bool), CalendarError> {
        let year = self
            .years
            .get(&d.year())
            .ok_or(CalendarError::MissingYear(d.year()))?;
        Ok((
            year.workdays.contains(&d) || (!d.is_weekend() && !year.holidays.contains(&d)),
            year.provisional,
        ))
    }

    /// The end (24:00 CST) of the `n`th working day after the day of `from_micros`: the
    /// deadline "within n working days" of an event.
    pub fn working_days_deadline(&self, from_micros: i64, n: u32) -> Result<i64, CalendarError> {
        self.deadline(from_micros, n).map(|d| d.at)
    }

    /// As `working_days_deadline`, saying whether a provisional year was counted in.
    pub fn deadline(&self, from_micros: i64, n: u32) -> Result<Deadline, CalendarError> {
        let mut d = Date::of_instant(from_micros);
        let mut left = n;
        let mut provisional = false;
        while left > 0 {
            d = d.next();
            let (working, p) = self.working_day(d)?;
            provisional |= p;
            if working {
                left -= 1;
            }
        }
        Ok(Deadline {
            at: d.end_micros(),
            provisional,
        })
    }
}

/// A deadline, and whether it was counted on a provisional calendar (it moves when the State
/// Council's notice for that year is loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: i64,
    pub provisional: bool,
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

    /// The year-end cliff: a deadline that runs into a year the State Council has not
    /// published is counted on the provisional calendar, says so, and skips 元旦 and the
    /// weekend (before, every such deadline failed, and was never set).
    #[test]
    fn a_deadline_into_an_unpublished_year_is_provisional_and_skips_new_year_and_weekends() {
        let c = Calendar::national();
        assert!(!c.is_official(2027) && c.is_official(2026));
        // Monday 2026-12-28: working days 29, 30, 31 Dec; 1 Jan 2027 (Friday) is 元旦; then
        // Monday 4 and Tuesday 5 January.
        let late = day("2026-12-28").start_micros() + 10 * 3_600_000_000;
        let d = c.deadline(late, 5).unwrap();
        assert_eq!(d.at, day("2027-01-05").end_micros());
        assert!(d.provisional);
        // Within a published year: not provisional.
        let d = c.deadline(day("2026-03-02").start_micros(), 5).unwrap();
        assert!(!d.provisional);
        // Outside what the law can be computed for, or before the published years: still an
        // error, never a guess.
        assert_eq!(
            c.is_working_day(day("2131-03-03")),
            Err(CalendarError::MissingYear(2131))
        );
        assert_eq!(
            c.is_working_day(day("2023-03-03")),
            Err(CalendarError::MissingYear(2023))
        );
    }

    /// The provisional calendar, computed for years the State Council did publish: every
    /// statutory day falls on an official day off (the rules in force that year).
    #[test]
    fn the_statutory_holidays_of_published_years_are_official_days_off() {
        let c = Calendar::national();
        for year in [2024, 2025, 2026] {
            let official = c.year_view(year).unwrap();
            assert!(!official.provisional);
            for d in statutory_holidays(year).unwrap() {
                assert!(
                    official.holidays.contains(&d),
                    "{d}, a statutory holiday of {year}, is not an official day off"
                );
            }
        }
        // 2027: 春节 from 除夕 (5 February), 清明 5 April, 端午 9 June, 中秋 15 September.
        let days = statutory_holidays(2027).unwrap();
        for want in [
            "2027-01-01",
            "2027-02-05",
            "2027-02-06",
            "2027-02-08",
            "2027-04-05",
            "2027-05-01",
            "2027-05-02",
            "2027-06-09",
            "2027-09-15",
            "2027-10-03",
        ] {
            assert!(days.contains(&day(want)), "{want} in {days:?}");
        }
        // 元旦 2028 is a Saturday: the Monday after is off in the provisional year.
        let y2028 = c.year_view(2028).unwrap();
        assert!(y2028.provisional && y2028.holidays.contains(&day("2028-01-03")));
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
            holidays: vec!["2140-01-02".into()],
            workdays: vec![],
        });
        assert_eq!(e.unwrap_err(), CalendarError::MissingYear(2140));
    }

    #[test]
    fn malformed_data_is_refused() {
        assert!(Calendar::parse("[years.2025]\nholidays = [\"2025-13-01\"]\n").is_err());
        assert!(Calendar::parse("[years.2025]\nholidays = [\"2024-12-31\"]\n").is_err());
    }
}

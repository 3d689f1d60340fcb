//! Statistics that do not scan (#23): the `rating_counts` table (migrations
//! `sqlite/0013_rating_counts.sql`, `postgres/0010_rating_counts.sql`) holds the ratings that
//! count per China Standard Time day, organisation, region, channel, target kind and source
//! system, kept by triggers in the same transaction as the ratings and exclusions that change
//! it. A statistics query whose filter and grouping those keys can express, over whole days,
//! is answered from it (a quarter over a province reads a few thousand rows, not millions of
//! ratings); any other falls back to the scan, whose answer the counts must equal
//! (`Store::stats_by_scan`, compared on random data in tests/it/store.rs).
//!
//! `rating_counts_month` and `case_counts_month` (migrations `sqlite/0015`, `postgres/0012`)
//! hold the same sums per CST month, kept from the daily tables' own changes: a range's
//! whole months are read from them and only its days around them from the daily tables (with thousands of organisations
//! `rating_counts` has nearly a row per rating; a month's rows are about 30 times fewer).
//! `rating_counts_quarter` and `case_counts_quarter` (`sqlite/0017`, `postgres/0015`) do the
//! same per calendar quarter, kept from the monthly tables' changes: a quarter over a
//! province reads a third of the monthly rows ([`spans`]). On PostgreSQL both are kept once per
//! statement from its transition tables (`postgres/0016`), not once per changed row.

use super::{BadCaseCounts, RatingQuery, StatsDimension, StatsRow, StoreError};

/// Case step actions whose first entry moves a 差评 case's state in `rating_counts`
/// (rectified 2 and 4, called back 6, archived 7, spot-checked 8): the migrations' triggers
/// fire for these only.
pub const MOVES_CASE_COUNTS: [i32; 5] = [2, 4, 6, 7, 8];

/// Seconds China Standard Time is ahead of UTC.
const CST_OFFSET_SECS: i64 = 8 * 3600;
const DAY_MICROS: i64 = 86_400 * 1_000_000;

/// A statistics query the counts can answer: `filter` is the query without its time range
/// (whose remaining fields are all columns of `rating_counts`), and the time range as CST days
/// (`from_day` inclusive, `until_day` exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CountsPlan {
    pub filter: RatingQuery,
    pub from_day: Option<i64>,
    pub until_day: Option<i64>,
    /// Where the range's rows are read: its whole quarters from the quarterly table, the
    /// whole months around them from the monthly one, and the days around those from the
    /// daily one (a grouping by month reads no quarter, one by day only days).
    pub spans: Vec<Span>,
}

/// The counts tables, finest first: `rating_counts` (`case_counts`) and the same sums per CST
/// month and per quarter (`<table>_month`, `<table>_quarter`, whose `day` is the first day of
/// the month or quarter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grain {
    Day,
    Month,
    Quarter,
}

impl Grain {
    fn suffix(self) -> &'static str {
        match self {
            Grain::Day => "",
            Grain::Month => "_month",
            Grain::Quarter => "_quarter",
        }
    }

    /// The first day of the month or quarter holding CST day `day`, and of the next one.
    fn unit_of(self, day: i64) -> Option<(i64, i64)> {
        use crate::rules::Date;
        let (y, m, _) = Date::from_days(day).ymd();
        let first = match self {
            Grain::Day => return Some((day, day.checked_add(1)?)),
            Grain::Month => m,
            Grain::Quarter => (m - 1) / 3 * 3 + 1,
        };
        let next = first + if self == Grain::Month { 1 } else { 3 };
        let start = Date::from_ymd(y, first, 1)?;
        let end = match next {
            13 => Date::from_ymd(y + 1, 1, 1)?,
            n => Date::from_ymd(y, n, 1)?,
        };
        Some((start.days(), end.days()))
    }
}

/// Rows of one counts table with `day` in `[from, until)` (`None`: unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub grain: Grain,
    pub from: Option<i64>,
    pub until: Option<i64>,
}

/// The whole units of `grain` inside `[from, until)`, as the first day of the first one and
/// of the one after the last (`None`: unbounded); `None` when the range holds none.
fn whole_units(
    grain: Grain,
    from: Option<i64>,
    until: Option<i64>,
) -> Option<(Option<i64>, Option<i64>)> {
    let lo = match from {
        Some(d) => Some(match grain.unit_of(d)? {
            (first, _) if first == d => d,
            (_, next) => next,
        }),
        None => None,
    };
    let hi = match until {
        Some(d) => Some(grain.unit_of(d)?.0),
        None => None,
    };
    match (lo, hi) {
        (Some(lo), Some(hi)) if lo >= hi => None,
        range => Some(range),
    }
}

/// `[from, until)` as spans of the coarsest grain up to `coarsest` that fits, and finer ones
/// around it, in day order; an empty range is no span. A date too far out for the calendar
/// (before year 1 or after 9999) has no month or quarter: it is read by a finer grain.
fn spans(coarsest: Grain, from: Option<i64>, until: Option<i64>) -> Vec<Span> {
    if let (Some(f), Some(u)) = (from, until)
        && f >= u
    {
        return Vec::new();
    }
    let finer = match coarsest {
        Grain::Day => {
            return vec![Span {
                grain: Grain::Day,
                from,
                until,
            }];
        }
        Grain::Month => Grain::Day,
        Grain::Quarter => Grain::Month,
    };
    let Some((lo, hi)) = whole_units(coarsest, from, until) else {
        return spans(finer, from, until);
    };
    let mut out = match lo {
        Some(lo) => spans(finer, from, Some(lo)),
        None => Vec::new(),
    };
    out.push(Span {
        grain: coarsest,
        from: lo,
        until: hi,
    });
    if let Some(hi) = hi {
        out.extend(spans(finer, Some(hi), until));
    }
    out
}

/// The CST day (days since 1970-01-01) that starts at `micros`, if a day starts there.
fn day_starting_at(micros: i64) -> Option<i64> {
    let local = micros.checked_add(CST_OFFSET_SECS * 1_000_000)?;
    (local.rem_euclid(DAY_MICROS) == 0).then(|| local.div_euclid(DAY_MICROS))
}

/// How the counts answer `query` grouped by `group_by`, or `None` when only a scan can: a
/// filter on item, staff member, case or level, a snapshot (`max_feed_seq`), a time range that
/// does not start and end at CST midnight, or a grouping by item or staff member.
pub fn plan(query: &RatingQuery, group_by: &[StatsDimension]) -> Option<CountsPlan> {
    let by_key = group_by.iter().all(|d| {
        matches!(
            d,
            StatsDimension::Region
                | StatsDimension::City
                | StatsDimension::Organization
                | StatsDimension::Channel
                | StatsDimension::Day
                | StatsDimension::Month
        )
    });
    if !by_key
        || query.item_code.is_some()
        || query.staff_id.is_some()
        || query.case_number.is_some()
        || !query.levels.is_empty()
        || query.max_feed_seq.is_some()
        || query.time_is_occurred_at
    {
        return None;
    }
    let from_day = match query.rated_from_micros {
        Some(t) => Some(day_starting_at(t)?),
        None => None,
    };
    let until_day = match query.rated_until_micros {
        Some(t) => Some(day_starting_at(t)?),
        None => None,
    };
    // A month's or quarter's rows have no day of their own; a quarter's no month.
    let coarsest = if group_by.contains(&StatsDimension::Day) {
        Grain::Day
    } else if group_by.contains(&StatsDimension::Month) {
        Grain::Month
    } else {
        Grain::Quarter
    };
    Some(CountsPlan {
        spans: spans(coarsest, from_day, until_day),
        filter: RatingQuery {
            rated_from_micros: None,
            rated_until_micros: None,
            // Statistics leave excluded ratings out whatever the query says; so do the counts.
            counted_only: false,
            ..query.clone()
        },
        from_day,
        until_day,
    })
}

impl CountsPlan {
    /// Whether the plan reads any rows of `grain`'s table.
    pub fn reads(&self, grain: Grain) -> bool {
        self.spans.iter().any(|s| s.grain == grain)
    }

    /// `FROM <counts> WHERE TRUE` for the plan's range, over `table` (`rating_counts` or
    /// `case_counts`): the rows of each span (the same columns in every grain's table), as
    /// one table of that name.
    pub(crate) fn push_counts<'a, DB>(
        &self,
        qb: &mut sqlx::QueryBuilder<'a, DB>,
        table: &'static str,
    ) where
        DB: sqlx::Database,
        i64: 'a + sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    {
        if let [span] = self.spans.as_slice() {
            qb.push(format!(
                " FROM {table}{} AS {table} WHERE TRUE",
                span.grain.suffix()
            ));
            push_days(qb, span);
            return;
        }
        qb.push(" FROM (");
        if self.spans.is_empty() {
            qb.push(format!("SELECT * FROM {table} WHERE FALSE"));
        }
        for (i, span) in self.spans.iter().enumerate() {
            if i > 0 {
                qb.push(" UNION ALL ");
            }
            qb.push(format!(
                "SELECT * FROM {table}{} WHERE TRUE",
                span.grain.suffix()
            ));
            push_days(qb, span);
        }
        qb.push(format!(") AS {table} WHERE TRUE"));
    }
}

/// `AND day >= from AND day < until` for a span's rows; `AND day = from` for a single day,
/// month or quarter (whose rows all have that `day`), so the rows come in the primary key's
/// order after it: grouped by organisation, a calendar quarter over a province is
/// aggregated as it is read instead of sorted first (19 ms against 32 ms for 10,000 rows).
fn push_days<'a, DB>(qb: &mut sqlx::QueryBuilder<'a, DB>, span: &Span)
where
    DB: sqlx::Database,
    i64: 'a + sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    if let (Some(from), Some(until)) = (span.from, span.until)
        && span.grain.unit_of(from) == Some((from, until))
    {
        qb.push(" AND day = ").push_bind(from);
        return;
    }
    if let Some(day) = span.from {
        qb.push(" AND day >= ").push_bind(day);
    }
    if let Some(day) = span.until {
        qb.push(" AND day < ").push_bind(day);
    }
}

/// The sums `Store::stats` reads from `rating_counts`, named as the scans name their columns
/// (`rows::stats_row`, `rows::bad_case_counts`); `cast` follows each column. PostgreSQL's
/// SUM of a BIGINT is NUMERIC, summed in 128 bits and then cast back; of an INTEGER
/// (`::integer`) it is a BIGINT summed in 64 bits: a calendar quarter over 2,000
/// organisations took 23 ms in the server against 30-34 ms (pgbench). A counts row holds
/// one quarter of one organisation, district, channel, kind and source: should it ever
/// pass 2^31 ratings the cast fails the query, it does not wrap.
pub(crate) fn stats_sums(cast: &str) -> String {
    STATS_SUMS
        .iter()
        .map(|(column, name)| format!("COALESCE(SUM({column}{cast}), 0) AS {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The counts' columns `Store::stats` sums, and the names the sums take: in this order in
/// [`packed_stats_head`]'s JSON, which [`unpack_stats`] reads.
const STATS_SUMS: [(&str, &str); 15] = [
    ("total", "total"),
    ("l1", "l1"),
    ("l2", "l2"),
    ("l3", "l3"),
    ("l4", "l4"),
    ("l5", "l5"),
    ("defaults", "defaults"),
    ("flagged", "flagged"),
    ("bad_cases", "n"),
    ("rectified", "rectified"),
    ("called_back", "called_back"),
    ("real_name", "real_name"),
    ("real_name_done", "real_name_done"),
    ("archived", "archived"),
    ("spot_checked", "spot_checked"),
];

/// The head of a SQLite query that returns a statistics answer as one JSON text: an array
/// of groups in the order of their keys, each `[[k0, …], [total, l1, …, spot_checked]]`,
/// read by [`unpack_stats`]. The groups' query (keys `k0…` and [`stats_sums`]) follows,
/// then [`PACKED_STATS_TAIL`]. One value instead of a row of 17 per group: a province's
/// thousands of groups no longer cross sqlx's SQLite worker value by value (each copied,
/// type-checked and freed, and a thread wake-up every few rows), which took about half the
/// time of a calendar quarter's GetStats. (On PostgreSQL the server's time dominates, and
/// building the JSON there cost as much as it saved: not used.)
pub(crate) fn packed_stats_head(keys: usize) -> String {
    let keys = (0..keys).map(|i| format!("k{i}")).collect::<Vec<_>>();
    let sums = STATS_SUMS.map(|(_, name)| name).join(", ");
    let order = if keys.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", keys.join(", "))
    };
    format!(
        "SELECT json_group_array(json_array(json_array({keys}), json_array({sums})){order}) \
         FROM (SELECT ",
        keys = keys.join(", "),
    )
}

/// Closes [`packed_stats_head`]'s groups query.
pub(crate) const PACKED_STATS_TAIL: &str = ") AS packed";

/// The groups of a [`packed_stats_head`] answer, in its order; a group with no rating that
/// counts is left out (as the scans leave it out).
pub(crate) fn unpack_stats(json: &str) -> Result<Vec<StatsRow>, StoreError> {
    let groups: Vec<(Vec<String>, [i64; STATS_SUMS.len()])> = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("the statistics' packed groups: {e}")))?;
    Ok(groups
        .into_iter()
        .filter_map(|(key, sums)| {
            // In STATS_SUMS' order.
            let [
                total,
                l1,
                l2,
                l3,
                l4,
                l5,
                defaults,
                flagged,
                cases,
                rectified,
                called_back,
                real_name,
                real_name_done,
                archived,
                spot_checked,
            ] = sums.map(|v| v as u64);
            (total != 0).then(|| StatsRow {
                bad_cases: if cases > 0 {
                    BadCaseCounts {
                        key: key.clone(),
                        cases,
                        rectified,
                        called_back,
                        real_name,
                        real_name_done,
                        archived,
                        spot_checked,
                    }
                } else {
                    BadCaseCounts::default()
                },
                key,
                total,
                per_level: [l1, l2, l3, l4, l5],
                default_ratings: defaults,
                flagged,
                ..Default::default()
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2025-10-01 00:00 CST, in microseconds since the epoch.
    const OCT_1: i64 = 1_759_248_000 * 1_000_000;

    #[test]
    fn whole_months_are_read_from_the_monthly_counts_and_the_days_around_them() {
        let month_of = |day| Grain::Month.unit_of(day);
        let whole_months = |from, until| whole_units(Grain::Month, from, until);
        // CST day numbers: 2025-10-01 is 20362, 2025-11-01 20393, 2025-12-01 20423,
        // 2026-01-01 20454; 2024-02-01 19754, 2024-03-01 19783 (a leap February).
        assert_eq!(month_of(20_362), Some((20_362, 20_393)));
        assert_eq!(month_of(20_400), Some((20_393, 20_423)));
        assert_eq!(month_of(20_453), Some((20_423, 20_454)));
        assert_eq!(month_of(19_782), Some((19_754, 19_783)));
        // A quarter is its three months and no day.
        assert_eq!(
            whole_months(Some(20_362), Some(20_454)),
            Some((Some(20_362), Some(20_454)))
        );
        // 2025-10-05 to 2026-01-04: November and December, with days on both sides.
        assert_eq!(
            whole_months(Some(20_366), Some(20_457)),
            Some((Some(20_393), Some(20_454)))
        );
        // Within one month, or across a month's end without a whole month: days only.
        assert_eq!(whole_months(Some(20_366), Some(20_390)), None);
        assert_eq!(whole_months(Some(20_380), Some(20_400)), None);
        // Unbounded sides stay unbounded.
        assert_eq!(whole_months(None, None), Some((None, None)));
        assert_eq!(whole_months(Some(20_366), None), Some((Some(20_393), None)));
        assert_eq!(whole_months(None, Some(20_400)), Some((None, Some(20_393))));
        // Grouped by day, the days are read whatever the range.
        let q = RatingQuery {
            rated_from_micros: Some((20_362 * 86_400 - 8 * 3600) * 1_000_000),
            ..Default::default()
        };
        assert_eq!(
            plan(&q, &[StatsDimension::Day]).unwrap().spans,
            [span(Grain::Day, Some(20_362), None)]
        );
        assert_eq!(
            plan(&q, &[StatsDimension::Month]).unwrap().spans,
            [span(Grain::Month, Some(20_362), None)]
        );
    }

    /// A single day, month or quarter is read by `day =`, its rows then in key order.
    #[test]
    fn a_single_unit_is_read_by_its_day() {
        use crate::rules::Date;
        let d = |y, m, day| Date::from_ymd(y, m, day).unwrap().days();
        let sql = |from: i64, until: i64, group_by: &[StatsDimension]| {
            let q = RatingQuery {
                rated_from_micros: Some((from * 86_400 - 8 * 3600) * 1_000_000),
                rated_until_micros: Some((until * 86_400 - 8 * 3600) * 1_000_000),
                ..Default::default()
            };
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT *");
            plan(&q, group_by)
                .expect("counts")
                .push_counts(&mut qb, "rating_counts");
            qb.sql().to_string()
        };
        assert_eq!(
            sql(
                d(2026, 10, 1),
                d(2027, 1, 1),
                &[StatsDimension::Organization]
            ),
            "SELECT * FROM rating_counts_quarter AS rating_counts WHERE TRUE AND day = ?"
        );
        assert_eq!(
            sql(d(2026, 11, 1), d(2026, 12, 1), &[]),
            "SELECT * FROM rating_counts_month AS rating_counts WHERE TRUE AND day = ?"
        );
        assert_eq!(
            sql(d(2026, 11, 3), d(2026, 11, 4), &[StatsDimension::Day]),
            "SELECT * FROM rating_counts AS rating_counts WHERE TRUE AND day = ?"
        );
        assert_eq!(
            sql(d(2026, 11, 3), d(2026, 11, 5), &[]),
            "SELECT * FROM rating_counts AS rating_counts WHERE TRUE AND day >= ? AND day < ?"
        );
        // Grouped by month, a quarter is its three months.
        assert!(
            sql(d(2026, 10, 1), d(2027, 1, 1), &[StatsDimension::Month]).starts_with(
                "SELECT * FROM rating_counts_month AS rating_counts WHERE TRUE AND day >= ?"
            )
        );
    }

    fn span(grain: Grain, from: Option<i64>, until: Option<i64>) -> Span {
        Span { grain, from, until }
    }

    #[test]
    fn whole_quarters_are_read_from_the_quarterly_counts_with_months_and_days_around_them() {
        use crate::rules::Date;
        let d = |y, m, day| Date::from_ymd(y, m, day).unwrap().days();
        assert_eq!(
            Grain::Quarter.unit_of(d(2025, 11, 15)),
            Some((d(2025, 10, 1), d(2026, 1, 1)))
        );
        assert_eq!(
            Grain::Quarter.unit_of(d(2026, 3, 31)),
            Some((d(2026, 1, 1), d(2026, 4, 1)))
        );
        assert_eq!(
            Grain::Quarter.unit_of(d(2026, 4, 1)),
            Some((d(2026, 4, 1), d(2026, 7, 1)))
        );
        let (q, m, day) = (Grain::Quarter, Grain::Month, Grain::Day);
        let s = |from, until| spans(q, from, until);
        // A calendar quarter is one quarter's rows.
        assert_eq!(
            s(Some(d(2025, 10, 1)), Some(d(2026, 1, 1))),
            [span(q, Some(d(2025, 10, 1)), Some(d(2026, 1, 1)))]
        );
        // 2025-08-20 to 2026-02-03: days, September, Q4, January, days.
        assert_eq!(
            s(Some(d(2025, 8, 20)), Some(d(2026, 2, 3))),
            [
                span(day, Some(d(2025, 8, 20)), Some(d(2025, 9, 1))),
                span(m, Some(d(2025, 9, 1)), Some(d(2025, 10, 1))),
                span(q, Some(d(2025, 10, 1)), Some(d(2026, 1, 1))),
                span(m, Some(d(2026, 1, 1)), Some(d(2026, 2, 1))),
                span(day, Some(d(2026, 2, 1)), Some(d(2026, 2, 3))),
            ]
        );
        // The last 92 days from 2026-09-01: no whole quarter, three months and a day.
        assert_eq!(
            s(Some(d(2026, 9, 1)), Some(d(2026, 12, 2))),
            [
                span(m, Some(d(2026, 9, 1)), Some(d(2026, 12, 1))),
                span(day, Some(d(2026, 12, 1)), Some(d(2026, 12, 2))),
            ]
        );
        // Unbounded: every quarter before, and the months and days after.
        assert_eq!(
            s(None, Some(d(2026, 5, 10))),
            [
                span(q, None, Some(d(2026, 4, 1))),
                span(m, Some(d(2026, 4, 1)), Some(d(2026, 5, 1))),
                span(day, Some(d(2026, 5, 1)), Some(d(2026, 5, 10))),
            ]
        );
        assert_eq!(s(None, None), [span(q, None, None)]);
        // Empty and inverted ranges read nothing; one day reads one day.
        assert_eq!(s(Some(d(2026, 5, 10)), Some(d(2026, 5, 10))), []);
        assert_eq!(s(Some(d(2026, 5, 11)), Some(d(2026, 5, 10))), []);
        assert_eq!(
            s(Some(d(2026, 5, 10)), Some(d(2026, 5, 11))),
            [span(day, Some(d(2026, 5, 10)), Some(d(2026, 5, 11)))]
        );
        // The spans tile the range: every day of a year of ranges is read exactly once.
        for from in (d(2025, 1, 1)..d(2026, 1, 1)).step_by(7) {
            for len in [1, 28, 31, 59, 90, 92, 120, 200, 400] {
                let got = s(Some(from), Some(from + len));
                let mut at = from;
                for sp in &got {
                    assert_eq!(sp.from, Some(at), "{got:?}");
                    let until = sp.until.unwrap();
                    assert!(until > at, "{got:?}");
                    if sp.grain != day {
                        assert_eq!(sp.grain.unit_of(at).unwrap().0, at, "{got:?}");
                        assert_eq!(sp.grain.unit_of(until).unwrap().0, until, "{got:?}");
                    }
                    at = until;
                }
                assert_eq!(at, from + len, "{got:?}");
            }
        }
    }

    #[test]
    fn only_whole_cst_days_are_answered_from_the_counts() {
        let q = |from: i64, until: i64| RatingQuery {
            rated_from_micros: Some(from),
            rated_until_micros: Some(until),
            ..Default::default()
        };
        let p = plan(&q(OCT_1, OCT_1 + 92 * DAY_MICROS), &[]).expect("whole days");
        assert_eq!(p.from_day, Some(OCT_1 / DAY_MICROS + 1));
        assert_eq!(p.until_day, Some(p.from_day.unwrap() + 92));
        assert_eq!(p.filter.rated_from_micros, None);
        // Midnight UTC is 08:00 in China: not a day's start.
        assert!(plan(&q(OCT_1 + 8 * 3_600_000_000, OCT_1 + DAY_MICROS), &[]).is_none());
        assert!(plan(&q(OCT_1, OCT_1 + DAY_MICROS + 1), &[]).is_none());
        assert!(plan(&RatingQuery::default(), &[StatsDimension::Month]).is_some());
    }

    #[test]
    fn item_staff_case_level_and_snapshot_queries_scan() {
        let d = RatingQuery::default();
        assert!(plan(&d, &[StatsDimension::Item]).is_none());
        assert!(plan(&d, &[StatsDimension::Organization, StatsDimension::Staff]).is_none());
        for q in [
            RatingQuery {
                item_code: Some("I".into()),
                ..d.clone()
            },
            RatingQuery {
                staff_id: Some("S".into()),
                ..d.clone()
            },
            RatingQuery {
                case_number: Some("C".into()),
                ..d.clone()
            },
            RatingQuery {
                levels: vec![4, 5],
                ..d.clone()
            },
            RatingQuery {
                max_feed_seq: Some(9),
                ..d.clone()
            },
        ] {
            assert!(plan(&q, &[]).is_none(), "{q:?}");
        }
        let answered = RatingQuery {
            org_credit_code: Some("O".into()),
            region_prefix: Some("53".into()),
            source_system: Some("S".into()),
            channels: vec![1],
            target_kinds: vec![1],
            ..d
        };
        assert!(plan(&answered, &[StatsDimension::City, StatsDimension::Channel]).is_some());
    }

    #[test]
    fn packed_groups_unpack_in_order_with_their_cases_and_empty_groups_left_out() {
        let json = r#"[
            [["9153\"0000", "1"], [30, 1, 2, 3, 4, 20, 5, 6, 14, 13, 12, 11, 10, 9, 8]],
            [["9153", "2"], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
            [["\u4e91", "3"], [2, 0, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0]]
        ]"#;
        let rows = unpack_stats(json).expect("unpacks");
        assert_eq!(rows.len(), 2, "the group with no rating is left out");
        assert_eq!(rows[0].key, ["9153\"0000", "1"]);
        let r = &rows[0];
        assert_eq!(
            (r.total, r.per_level, r.default_ratings, r.flagged),
            (30, [1, 2, 3, 4, 20], 5, 6)
        );
        assert_eq!(
            r.bad_cases,
            BadCaseCounts {
                key: r.key.clone(),
                cases: 14,
                rectified: 13,
                called_back: 12,
                real_name: 11,
                real_name_done: 10,
                archived: 9,
                spot_checked: 8,
            }
        );
        assert_eq!(
            (r.rated_cases, r.actively_rated_cases, r.completed_cases),
            (0, 0, 0),
            "办结 counts come from their own query"
        );
        assert_eq!(rows[1].key, ["云", "3"]);
        assert_eq!(rows[1].flagged, 1);
        assert_eq!(
            rows[1].bad_cases,
            BadCaseCounts::default(),
            "no cases: no key"
        );
        assert_eq!(unpack_stats("[]").expect("none"), []);
        for bad in [
            "",
            "[[[1], [1]]]",
            "[[[\"a\"], [1, 2]]]",
            "[[[\"a\"], [-1e99]]]",
        ] {
            assert!(
                matches!(unpack_stats(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }
}

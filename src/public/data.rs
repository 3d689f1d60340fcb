//! What the public site publishes, computed from the store: the results of a region and
//! period, and the 差评 cases whose publication rule allows them. Both are the open-data
//! schema (docs/public-data.md): the pages, the JSON and the CSV show the same values.

use serde::{Deserialize, Serialize};

use super::{CaseRule, Refusal, Site};
use crate::pb::v1 as pb;
use crate::rules::Date;
use crate::store::{RatingQuery, ScopeFilter, StatsDimension};

/// A month, a quarter or a year (China Standard Time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Year(i64),
    Quarter(i64, u32),
    Month(i64, u32),
}

impl Period {
    /// "2025", "2025-Q1" or "2025-03".
    pub fn parse(s: &str) -> Option<Self> {
        // Digits only: "+1" or " 1" would be other spellings of one period.
        let number = |t: &str, len: usize| {
            (t.len() == len && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u32>().ok())
                .flatten()
        };
        let year = |y: &str| {
            number(y, 4)
                .map(i64::from)
                .filter(|y| (2000..=2100).contains(y))
        };
        match s.split_once('-') {
            None => Some(Self::Year(year(s)?)),
            Some((y, q)) if q.starts_with('Q') => {
                let q = number(&q[1..], 1).filter(|q| (1..=4).contains(q))?;
                Some(Self::Quarter(year(y)?, q))
            }
            Some((y, m)) => {
                let m = number(m, 2).filter(|m| (1..=12).contains(m))?;
                Some(Self::Month(year(y)?, m))
            }
        }
    }

    /// The quarter a moment falls in.
    pub fn quarter_of(micros: i64) -> Self {
        let (y, m, _) = Date::of_instant(micros).ymd();
        Self::Quarter(y, (m - 1) / 3 + 1)
    }

    /// [start, end) in microseconds.
    pub fn bounds(&self) -> (i64, i64) {
        let (y, first, months) = match *self {
            Self::Year(y) => (y, 1, 12),
            Self::Quarter(y, q) => (y, 3 * q - 2, 3),
            Self::Month(y, m) => (y, m, 1),
        };
        let start = Date::from_ymd(y, first, 1).expect("valid month");
        let end_month = first + months;
        let end = if end_month > 12 {
            Date::from_ymd(y + 1, end_month - 12, 1)
        } else {
            Date::from_ymd(y, end_month, 1)
        }
        .expect("valid month");
        (start.start_micros(), end.start_micros())
    }

    /// As written in links and files.
    pub fn code(&self) -> String {
        match *self {
            Self::Year(y) => format!("{y}"),
            Self::Quarter(y, q) => format!("{y}-Q{q}"),
            Self::Month(y, m) => format!("{y}-{m:02}"),
        }
    }

    /// As a reader says it.
    pub fn label(&self) -> String {
        match *self {
            Self::Year(y) => format!("{y}年"),
            Self::Quarter(y, q) => format!("{y}年第{q}季度"),
            Self::Month(y, m) => format!("{y}年{m}月"),
        }
    }

    /// The periods a reader may want next to this one: the year, its quarters and months.
    pub fn neighbours(&self) -> Vec<Self> {
        let y = match *self {
            Self::Year(y) | Self::Quarter(y, _) | Self::Month(y, _) => y,
        };
        let mut out = vec![Self::Year(y - 1), Self::Year(y)];
        out.extend((1..=4).map(|q| Self::Quarter(y, q)));
        out.extend((1..=12).map(|m| Self::Month(y, m)));
        out
    }
}

/// How results are grouped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    Organization,
    Region,
    City,
    Item,
}

impl Grouping {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "organization" => Some(Self::Organization),
            "region" => Some(Self::Region),
            "city" => Some(Self::City),
            "item" => Some(Self::Item),
            _ => None,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::Organization => "organization",
            Self::Region => "region",
            Self::City => "city",
            Self::Item => "item",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Organization => "单位",
            Self::Region => "区县",
            Self::City => "地市",
            Self::Item => "事项",
        }
    }

    fn dimension(self) -> StatsDimension {
        match self {
            Self::Organization => StatsDimension::Organization,
            Self::Region => StatsDimension::Region,
            Self::City => StatsDimension::City,
            Self::Item => StatsDimension::Item,
        }
    }
}

/// One group's published results. A column the deployment does not publish is absent; a
/// group below `min_ratings` has its total only (`withheld`): its counts by level would give
/// its rates, and with one rating, that rater's level.
#[derive(Debug, Clone, Serialize)]
pub struct ResultRow {
    /// The code: credit code, region code or item code.
    pub key: String,
    pub name: String,
    /// Ratings counted (appeals that found a rating invalid or malicious leave it out).
    pub total: u64,
    /// 非常满意, 满意, 基本满意, 不满意, 非常不满意.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub levels: Option<[u64; 5]>,
    /// Default ratings (默认评价) among `total`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ratings: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub good_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bad_rate: Option<f64>,
    /// 评价率: rated ÷ 办结 cases, where 办结 cases are reported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rating_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub average_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u32>,
    /// Too few ratings to publish rates, scores or a rank.
    pub withheld: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub region: String,
    pub region_name: String,
    pub period: String,
    pub period_label: String,
    pub group_by: String,
    /// The policy profile the rates and scores follow, and where its rules come from.
    pub profile: String,
    pub profile_title: String,
    /// Groups with fewer ratings have their total only.
    pub min_ratings: u64,
    /// When these numbers were computed (China Standard Time).
    pub computed_at: String,
    /// Ranked groups first, by rank; then the withheld ones, by key.
    pub groups: Vec<ResultRow>,
}

/// The name of an organisation or item as its first counted rating in the region names it
/// (a source's free text: long numbers masked), looked up once an hour.
async fn name_from_ratings(site: &Site, region: &str, by: Grouping, key: &str) -> Option<String> {
    let memo = format!("{}|{region}|{key}", by.code());
    if let Some(known) = site.remembered_name(&memo) {
        return known;
    }
    let mut q = RatingQuery {
        region_prefix: Some(region.to_owned()),
        counted_only: true,
        ..Default::default()
    };
    match by {
        Grouping::Organization => q.org_credit_code = Some(key.to_owned()),
        Grouping::Item => q.item_code = Some(key.to_owned()),
        _ => return None,
    }
    let row = site.state.store.list_ratings(&q, 0, 1).await.ok()?.pop();
    let name = row
        .map(|row| match by {
            Grouping::Organization => row.rating.org_name,
            _ => row.rating.item_name,
        })
        .filter(|n| !n.is_empty())
        .map(|n| public_text(&n, &[], ""));
    site.remember_name(memo, name.as_deref());
    name
}

pub(super) async fn results(
    site: &Site,
    region: &str,
    period: &Period,
    by: Grouping,
) -> Result<Results, Refusal> {
    let config = &site.config;
    let (from, until) = period.bounds();
    let query = RatingQuery {
        region_prefix: Some(region.to_owned()),
        rated_from_micros: Some(from),
        rated_until_micros: Some(until),
        scope: (!config.organizations.is_empty()).then(|| ScopeFilter {
            orgs: config.organizations.clone(),
            region_prefixes: Vec::new(),
        }),
        counted_only: true,
        ..Default::default()
    };
    let (profile, groups) = crate::api::query::compute_stats(
        &site.state,
        query,
        &[by.dimension()],
        "",
        pb::RankBy::Unspecified,
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e.message(), "Public results could not be computed.");
        Refusal::unavailable("评价结果暂时无法计算，请稍后再试。")
    })?;
    let (has_scores, profile_title) = {
        let profiles = site.state.engine.profiles();
        let p = profiles.get(&profile);
        (
            p.is_some_and(|p| p.scores.is_some()),
            p.map(|p| p.title.clone()).unwrap_or_default(),
        )
    };
    let rank_by = if has_scores {
        pb::RankBy::AverageScore
    } else {
        pb::RankBy::GoodRate
    };
    // Ranked among the groups that publish rates: a group below the minimum has no place.
    let mut shown: Vec<pb::StatsGroup> = groups
        .iter()
        .filter(|g| g.total >= config.min_ratings.max(1))
        .cloned()
        .collect();
    crate::api::query::rank(&mut shown, rank_by);
    let mut rows = Vec::new();
    let shows = |c: &str| config.shows(c);
    for g in shown.iter().chain(
        groups
            .iter()
            .filter(|g| g.total < config.min_ratings.max(1)),
    ) {
        let key = g.key.first().cloned().unwrap_or_default();
        let withheld = g.total < config.min_ratings.max(1);
        let name = match site.name(&key) {
            Some(n) => n,
            None => name_from_ratings(site, region, by, &key)
                .await
                .unwrap_or_else(|| key.clone()),
        };
        let rate = |on: bool, v: f64| (on && !withheld).then_some(round4(v));
        rows.push(ResultRow {
            name,
            total: g.total,
            levels: (shows("levels") && !withheld).then_some([
                g.very_satisfied,
                g.satisfied,
                g.basically_satisfied,
                g.dissatisfied,
                g.very_dissatisfied,
            ]),
            default_ratings: (shows("levels") && !withheld).then_some(g.default_ratings),
            good_rate: rate(shows("good_rate"), g.good_rate),
            bad_rate: rate(shows("bad_rate"), g.bad_rate),
            rating_rate: rate(shows("rating_rate") && g.completed_cases > 0, g.rating_rate),
            average_score: g
                .average_score
                .filter(|_| shows("score") && !withheld)
                .map(round4),
            final_score: g
                .final_score
                .filter(|_| shows("score") && !withheld)
                .map(round4),
            rank: (shows("rank") && !withheld && g.rank > 0).then_some(g.rank),
            withheld,
            key,
        });
    }
    Ok(Results {
        region: region.to_owned(),
        region_name: site.name(region).unwrap_or_default(),
        period: period.code(),
        period_label: period.label(),
        group_by: by.code().to_owned(),
        profile,
        profile_title,
        min_ratings: config.min_ratings,
        computed_at: crate::time::format_cst_micros(site.state.clock.now_micros()),
        groups: rows,
    })
}

fn round4(v: f64) -> f64 {
    (v * 10_000.0).round() / 10_000.0
}

/// One published 差评 case. Nothing about the rater: no identity, not their words.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseRow {
    pub id: u64,
    pub organization: String,
    pub organization_name: String,
    pub item_code: String,
    pub item_name: String,
    pub region: String,
    /// 不满意 or 非常不满意.
    pub level: String,
    /// The day the 差评 reached the hub and the case opened (China Standard Time).
    pub opened_on: String,
    /// "archived", "rectified", "explained", "in_progress" or "overdue".
    pub status: String,
    pub status_label: String,
    /// The rectification deadline's day, when there is one.
    pub deadline: Option<String>,
    /// What the unit did (its rectification or explanation note), numbers masked.
    pub outcome: String,
    /// The day the case was closed, when it was.
    pub closed_on: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cases {
    pub region: String,
    pub region_name: String,
    pub period: String,
    pub period_label: String,
    /// "archived" or "deadline": when a case is published.
    pub publication_rule: String,
    /// Days after opening before a case is published.
    pub delay_days: u32,
    pub computed_at: String,
    /// Oldest first.
    pub cases: Vec<CaseRow>,
    /// More cases matched than are listed (the first `MAX_CASES`).
    pub truncated: bool,
}

/// Cases listed at most per region and period.
const MAX_CASES: usize = 5_000;

fn day(micros: i64) -> String {
    let (y, m, d) = Date::of_instant(micros).ymd();
    format!("{y}-{m:02}-{d:02}")
}

/// Text the unit wrote, fit to publish: the rater's own name (and its given name), phone,
/// ID number and credit code are masked wherever they appear, and so is any run of eight
/// characters taken from the rater's own words, and every number of seven or more digits —
/// written in ASCII, full-width or Chinese digits, with up to two spaces, dashes, dots,
/// slashes or commas between them; at most 300 characters.
pub(crate) fn public_text(text: &str, people: &[pb::Rater], rater_text: &str) -> String {
    let t = crate::privacy::mask_people(text, people);
    let mut t = t;
    let words: Vec<char> = rater_text.chars().collect();
    if words.len() >= 8 {
        for w in words.windows(8) {
            let piece: String = w.iter().collect();
            if t.contains(&piece) {
                t = t.replace(&piece, "…");
            }
        }
    }
    let out = crate::domain::codes::mask_numbers(&t, "***");
    if out.chars().count() > 300 {
        let mut cut: String = out.chars().take(300).collect();
        cut.push('…');
        cut
    } else {
        out
    }
}

pub(super) async fn cases(site: &Site, region: &str, period: &Period) -> Result<Cases, Refusal> {
    let config = &site.config;
    let state = &site.state;
    let unavailable = |e: crate::store::StoreError| {
        tracing::warn!(error = %e, "Public case list could not be read.");
        Refusal::unavailable("差评整改情况暂时无法读取，请稍后再试。")
    };
    let (from, until) = period.bounds();
    let now = state.clock.now_micros();
    let delay = i64::from(config.case_delay_days) * 86_400_000_000;
    let scope = ScopeFilter {
        orgs: Vec::new(),
        region_prefixes: vec![region.to_owned()],
    };
    let calendar = state.engine.calendar();
    let profiles = state.engine.profiles();
    let mut out = Vec::new();
    let mut truncated = false;
    let mut after = 0;
    'pages: loop {
        let page = state
            .store
            .list_bad_cases_opened(Some(&scope), Some((from, until)), after, 1000)
            .await
            .map_err(unavailable)?;
        let full = page.len() == 1000;
        for case in page {
            after = case.id;
            if !(from..until).contains(&case.opened_at_micros)
                || case.opened_at_micros + delay > now
                || !config.publishes(&case.region_code)
                || (!config.organizations.is_empty()
                    && !config.organizations.contains(&case.org_credit_code))
            {
                continue;
            }
            let (_, profile) = profiles.for_region(&case.region_code);
            let v = crate::rules::bad_case::view(&case, profile, &calendar, now);
            use pb::{AppealOutcome as A, CaseStatus as S};
            // A rating an appeal found invalid or malicious is no 差评 of the unit's.
            if matches!(v.appeal_outcome, A::Invalid | A::Malicious) {
                continue;
            }
            let archived = v.status == S::Archived;
            // Overdue for any reason (a deadline the unit declared, or one it never declared
            // in time) is a deadline passed.
            let deadline_passed =
                v.overdue || v.rectify_deadline.or(v.declare_by).is_some_and(|d| now > d);
            let publish = match site.rule {
                CaseRule::Archived => archived,
                CaseRule::Deadline => archived || deadline_passed,
                CaseRule::None => false,
            };
            if !publish {
                continue;
            }
            if out.len() == MAX_CASES {
                truncated = true;
                break 'pages;
            }
            let stored = state
                .store
                .get_rating(case.hub_id)
                .await
                .map_err(unavailable)?;
            // The rater's and the agent's own data, to mask it wherever the unit's note
            // repeats it; never published, never logged. Where it cannot be read, no note is
            // published.
            let (rating, people) = match stored {
                Some(s) => {
                    let mut rater = s.rating.rater.clone().unwrap_or_default();
                    let mut agent = s.rating.agent.clone().unwrap_or_default();
                    let readable = match &s.pii {
                        Some(sealed) => state
                            .pii
                            .reveal_persons(
                                Some(&mut rater),
                                Some(&mut agent),
                                sealed,
                                &crate::store::rating_aad(&case.hub_id),
                                true,
                            )
                            .is_ok(),
                        None => true,
                    };
                    (s.rating, readable.then_some([rater, agent]))
                }
                None => (pb::Rating::default(), None),
            };
            let note = match &people {
                Some(r) => case
                    .entries
                    .iter()
                    .rev()
                    .find(|e| {
                        e.action == pb::CaseAction::Rectify as i32
                            || e.action == pb::CaseAction::Explain as i32
                    })
                    .map(|e| public_text(&e.note, r, &rating.text))
                    .unwrap_or_default(),
                None => String::new(),
            };
            let explained = case
                .entries
                .iter()
                .any(|e| e.action == pb::CaseAction::Explain as i32);
            let (status, label) = match v.status {
                S::Archived => ("archived", "已办结"),
                S::Resolved | S::FedBack | S::CalledBack if explained => {
                    ("explained", "已解释说明")
                }
                S::Resolved | S::FedBack | S::CalledBack => ("rectified", "已整改"),
                _ if v.overdue => ("overdue", "逾期未整改"),
                _ => ("in_progress", "整改中"),
            };
            let closed_on = case
                .entries
                .iter()
                .find(|e| e.action == pb::CaseAction::Archive as i32)
                .map(|e| day(e.at_micros));
            let level = match pb::Level::try_from(rating.level).unwrap_or_default() {
                pb::Level::VeryDissatisfied => "非常不满意",
                _ => "不满意",
            };
            out.push(CaseRow {
                id: case.id,
                organization_name: site
                    .name(&case.org_credit_code)
                    .unwrap_or(rating.org_name.clone()),
                organization: case.org_credit_code.clone(),
                item_name: site
                    .name(&rating.item_code)
                    .unwrap_or(rating.item_name.clone()),
                item_code: rating.item_code.clone(),
                region: case.region_code.clone(),
                level: level.to_owned(),
                opened_on: day(case.opened_at_micros),
                status: status.to_owned(),
                status_label: label.to_owned(),
                // A deadline is 24:00 of its day: the next day's first moment.
                deadline: v.rectify_deadline.map(|d| day(d - 1)),
                outcome: note,
                closed_on,
            });
        }
        if !full {
            break;
        }
    }
    Ok(Cases {
        region: region.to_owned(),
        region_name: site.name(region).unwrap_or_default(),
        period: period.code(),
        period_label: period.label(),
        publication_rule: config.cases.clone(),
        delay_days: config.case_delay_days,
        computed_at: crate::time::format_cst_micros(now),
        cases: out,
        truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_as_written_and_nothing_else() {
        assert_eq!(Period::parse("2025"), Some(Period::Year(2025)));
        assert_eq!(Period::parse("2025-Q3"), Some(Period::Quarter(2025, 3)));
        assert_eq!(Period::parse("2025-03"), Some(Period::Month(2025, 3)));
        for bad in [
            "25", "2025-Q5", "2025-Q0", "2025-3", "2025-13", "2025-Q1x", "1999", "abcd", "",
        ] {
            assert_eq!(Period::parse(bad), None, "{bad}");
        }
        let (from, until) = Period::Quarter(2025, 4).bounds();
        assert_eq!(from, Date::parse("2025-10-01").unwrap().start_micros());
        assert_eq!(until, Date::parse("2026-01-01").unwrap().start_micros());
    }

    #[test]
    fn published_text_masks_the_rater_and_every_long_number() {
        let rater = pb::Rater {
            name: "张三丰".into(),
            phone: "13800138000".into(),
            id_number: "11010519491231002X".into(),
            ..Default::default()
        };
        let words = "我在窗口等了两个小时没人理睬，态度恶劣";
        let t = public_text(
            "已联系张三丰（138 0013 8000，身份证11010519491231002X），另一号码 139-1234-5678，\
             还有 138.0013.8000、138/0013/8000、138，0013，8000、138  0013  8000、\
             138\u{3000}0013\u{3000}8000、１３８００１３８０００、一三八〇〇一三八〇〇〇，\
             三丰先生反映：在窗口等了两个小时没人理睬。已与代办人李小龙核实。窗口3号已整改",
            &[
                rater,
                pb::Rater {
                    name: "李小龙".into(),
                    ..Default::default()
                },
            ],
            words,
        );
        for secret in [
            "张三丰",
            "三丰",
            "李小龙",
            "小龙",
            "13800138000",
            "138",
            "0013",
            "8000",
            "11010519491231002X",
            "002X",
            "5678",
            "１３８",
            "一三八",
            "等了两个小时没人理",
        ] {
            assert!(!t.contains(secret), "{secret} in {t}");
        }
        assert!(t.contains("窗口3号已整改"), "{t}");
    }
}

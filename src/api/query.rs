//! `QueryService`: read ratings back, page through them, count them.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{Caller, HubState, bad_request, page_size, violation};
use crate::auth::{Principal, Role};
use crate::domain::{CreditCode, Violation};
use crate::pb::v1 as pb;
use crate::pb::v1::query_service_server::QueryService;
use crate::rules::{Class, Profile, kunming_final_score};
use crate::store::{RatingQuery, ScopeFilter, StatsDimension, StatsRow};
use crate::time::micros_from_timestamp;

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

pub struct QueryApi {
    state: Arc<HubState>,
}

impl QueryApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }
}

fn optional(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

/// Turns the contract's filter into a store query, naming every bad field.
pub fn parse_filter(filter: Option<&pb::RatingFilter>) -> Result<RatingQuery, Vec<Violation>> {
    let Some(f) = filter else {
        return Ok(RatingQuery::default());
    };
    let mut v = Vec::new();
    let mut q = RatingQuery {
        item_code: optional(&f.item_code),
        staff_id: optional(&f.staff_id),
        case_number: optional(&f.case_number),
        source_system: optional(&f.source_system),
        ..Default::default()
    };
    if let Some(code) = optional(&f.org_credit_code) {
        match CreditCode::parse(&code) {
            Ok(c) => q.org_credit_code = Some(c.as_str().to_owned()),
            Err(e) => v.push(violation("filter.org_credit_code", e.0)),
        }
    }
    if let Some(p) = optional(&f.region_code_prefix) {
        if p.len() > 12 || !p.bytes().all(|b| b.is_ascii_digit()) {
            v.push(violation(
                "filter.region_code_prefix",
                "must be 1 to 12 digits",
            ));
        } else {
            q.region_prefix = Some(p);
        }
    }
    q.channels = enum_list("filter.channels", "a channel", &f.channels, &mut v, |c| {
        !matches!(
            pb::Channel::try_from(c),
            Ok(pb::Channel::Unspecified) | Err(_)
        )
    });
    q.target_kinds = enum_list(
        "filter.target_kinds",
        "a target kind",
        &f.target_kinds,
        &mut v,
        |k| {
            !matches!(
                pb::TargetKind::try_from(k),
                Ok(pb::TargetKind::Unspecified) | Err(_)
            )
        },
    );
    q.levels = enum_list("filter.levels", "a level", &f.levels, &mut v, |l| {
        !matches!(pb::Level::try_from(l), Ok(pb::Level::Unspecified) | Err(_))
    });
    for (name, ts, slot) in [
        ("filter.rated_from", &f.rated_from, &mut q.rated_from_micros),
        (
            "filter.rated_until",
            &f.rated_until,
            &mut q.rated_until_micros,
        ),
    ] {
        if let Some(ts) = ts {
            match micros_from_timestamp(ts) {
                Some(m) => *slot = Some(m),
                None => v.push(violation(name, "is not a valid timestamp")),
            }
        }
    }
    if let (Some(a), Some(b)) = (q.rated_from_micros, q.rated_until_micros)
        && a >= b
    {
        v.push(violation(
            "filter.rated_until",
            "must be later than filter.rated_from",
        ));
    }
    if v.is_empty() { Ok(q) } else { Err(v) }
}

/// A list filter of enum values: the first value that is none is named (one violation, not
/// one per value: a 4 MB list of them is one mistake), and the valid ones are kept once each
/// in order (a list of repeats becomes a handful of bound values, not thousands).
fn enum_list(
    field: &str,
    what: &str,
    values: &[i32],
    v: &mut Vec<Violation>,
    valid: impl Fn(i32) -> bool,
) -> Vec<i32> {
    if let Some((i, bad)) = values.iter().enumerate().find(|(_, x)| !valid(**x)) {
        v.push(violation(
            format!("{field}[{i}]"),
            format!("{bad} is not {what}"),
        ));
        return Vec::new();
    }
    let mut kept = values.to_vec();
    kept.sort_unstable();
    kept.dedup();
    kept
}

/// A page token binds the last feed sequence to the filter it was issued for.
fn filter_fingerprint(filter: Option<&pb::RatingFilter>) -> String {
    let bytes = filter.map(Message::encode_to_vec).unwrap_or_default();
    hex::encode(&Sha256::digest(bytes)[..8])
}

pub fn page_token(after_seq: u64, fingerprint: &str) -> String {
    format!("{after_seq}.{fingerprint}")
}

pub fn parse_page_token(token: &str, fingerprint: &str) -> Result<u64, Violation> {
    if token.is_empty() {
        return Ok(0);
    }
    let (seq, fp) = token
        .split_once('.')
        .ok_or_else(|| violation("page_token", "is not a token this hub issued"))?;
    let seq: u64 = seq
        .parse()
        .map_err(|_| violation("page_token", "is not a token this hub issued"))?;
    if fp != fingerprint {
        return Err(violation(
            "page_token",
            "was issued for a different filter; start again without a token",
        ));
    }
    Ok(seq)
}

fn dimension(raw: i32) -> Option<StatsDimension> {
    Some(match pb::StatsDimension::try_from(raw).ok()? {
        pb::StatsDimension::Region => StatsDimension::Region,
        pb::StatsDimension::Organization => StatsDimension::Organization,
        pb::StatsDimension::Item => StatsDimension::Item,
        pb::StatsDimension::Staff => StatsDimension::Staff,
        pb::StatsDimension::Channel => StatsDimension::Channel,
        pb::StatsDimension::Day => StatsDimension::Day,
        pb::StatsDimension::Month => StatsDimension::Month,
        pb::StatsDimension::City => StatsDimension::City,
        pb::StatsDimension::Unspecified => return None,
    })
}

fn channel_key(k: String) -> String {
    // Channels are stored as numbers; show the contract's enum name.
    k.parse::<i32>()
        .ok()
        .and_then(|n| pb::Channel::try_from(n).ok())
        .map(|c| c.as_str_name().to_owned())
        .unwrap_or(k)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// One group's counts, rates and scores under `profile`.
fn stats_group(
    row: StatsRow,
    dims: &[StatsDimension],
    name: &str,
    profile: &Profile,
) -> pb::StatsGroup {
    const LEVELS: [pb::Level; 5] = [
        pb::Level::VerySatisfied,
        pb::Level::Satisfied,
        pb::Level::BasicallySatisfied,
        pb::Level::Dissatisfied,
        pb::Level::VeryDissatisfied,
    ];
    let key = row
        .key
        .into_iter()
        .zip(dims)
        .map(|(k, d)| match d {
            StatsDimension::Channel => channel_key(k),
            _ => k,
        })
        .collect();
    let mut class_counts = [0u64; 3];
    for (i, n) in row.per_level.iter().enumerate() {
        let slot = match profile.classes[i] {
            Class::Good => 0,
            Class::Medium => 1,
            Class::Bad => 2,
        };
        class_counts[slot] += n;
    }
    let average_score = profile.scores.filter(|_| row.total > 0).map(|_| {
        let sum: f64 = LEVELS
            .iter()
            .zip(row.per_level)
            .map(|(l, n)| profile.score(*l).unwrap_or(0.0) * n as f64)
            .sum();
        sum / row.total as f64
    });
    let rating_rate = ratio(row.rated_cases, row.completed_cases).min(1.0);
    let active_rating_rate = ratio(row.actively_rated_cases, row.completed_cases).min(1.0);
    // Kunming: 接受评价率 is what the raters rated themselves (a default is not a rating
    // accepted; counted, it would give every department its 3 points); unknown, not 0 %,
    // without 办结 events (docs/decisions/0006).
    let (final_score, final_score_note) = match (profile.final_score.as_deref(), average_score) {
        (Some("kunming"), _) if row.completed_cases == 0 => (
            None,
            "no 办结 events were reported for this group: 接受评价率, and so the final score, \
             is unknown (report them with ReportServiceCases)"
                .to_owned(),
        ),
        (Some("kunming"), Some(avg)) => (
            Some(kunming_final_score(active_rating_rate, avg)),
            String::new(),
        ),
        (Some("kunming"), None) => (
            None,
            "no ratings in this group: there is no average score".to_owned(),
        ),
        _ => (None, String::new()),
    };
    let [
        very_satisfied,
        satisfied,
        basically_satisfied,
        dissatisfied,
        very_dissatisfied,
    ] = row.per_level;
    pb::StatsGroup {
        key,
        total: row.total,
        very_satisfied,
        satisfied,
        basically_satisfied,
        dissatisfied,
        very_dissatisfied,
        good: class_counts[0],
        medium: class_counts[1],
        bad: class_counts[2],
        default_ratings: row.default_ratings,
        profile: name.to_owned(),
        good_rate: ratio(class_counts[0], row.total),
        bad_rate: ratio(class_counts[2], row.total),
        average_score,
        completed_cases: row.completed_cases,
        rated_cases: row.rated_cases,
        actively_rated_cases: row.actively_rated_cases,
        rating_rate,
        active_rating_rate,
        unrated_rate: if row.completed_cases == 0 {
            0.0
        } else {
            1.0 - rating_rate
        },
        final_score,
        final_score_note,
        flagged: row.flagged,
        bad_rating_cases: row.bad_cases.cases,
        rectified_cases: row.bad_cases.rectified,
        called_back_cases: row.bad_cases.called_back,
        rectification_rate: ratio(row.bad_cases.rectified, row.bad_cases.cases),
        callback_rate: ratio(row.bad_cases.called_back, row.bad_cases.cases),
        real_name_bad_rating_cases: row.bad_cases.real_name,
        real_name_callback_rectification_rate: ratio(
            row.bad_cases.real_name_done,
            row.bad_cases.real_name,
        ),
        archived_cases: row.bad_cases.archived,
        spot_checked_cases: row.bad_cases.spot_checked,
        spot_check_rate: ratio(row.bad_cases.spot_checked, row.bad_cases.archived),
        rank: 0,
    }
}

/// Orders groups by `rank_by` and numbers them; equal values share a rank (1, 2, 2, 4).
pub(crate) fn rank(groups: &mut [pb::StatsGroup], rank_by: pb::RankBy) {
    let metric = |g: &pb::StatsGroup| -> f64 {
        match rank_by {
            pb::RankBy::AverageScore => g.average_score.unwrap_or(f64::MIN),
            pb::RankBy::GoodRate => g.good_rate,
            pb::RankBy::BadRate => -g.bad_rate,
            pb::RankBy::FinalScore => g.final_score.unwrap_or(f64::MIN),
            pb::RankBy::Unspecified => 0.0,
        }
    };
    if rank_by == pb::RankBy::Unspecified {
        return;
    }
    groups.sort_by(|a, b| {
        metric(b)
            .total_cmp(&metric(a))
            .then_with(|| a.key.cmp(&b.key))
    });
    let mut last: Option<(f64, u32)> = None;
    for (i, g) in groups.iter_mut().enumerate() {
        let m = metric(g);
        g.rank = match last {
            Some((v, r)) if v == m => r,
            _ => i as u32 + 1,
        };
        last = Some((m, g.rank));
    }
}

/// Restricts `query` to the principal's scope. A filter that names an organisation or region
/// the scope cannot contain is refused rather than silently answered with nothing.
pub fn restrict_to_scope(principal: &Principal, query: &mut RatingQuery) -> Result<(), Status> {
    let scope = &principal.scope;
    if scope.all_regions {
        return Ok(());
    }
    if let Some(org) = &query.org_credit_code
        && scope.region_prefixes.is_empty()
        && !scope.orgs.contains(org)
    {
        if let Some(suppressed) =
            crate::telemetry::throttle_for("api.denied_scope_org", &principal.name)
        {
            tracing::warn!(principal = %principal.name, org, suppressed, "Denied: organisation outside scope.");
        }
        return Err(Status::permission_denied(format!(
            "organisation {org} is outside the scope of principal {}",
            principal.name
        )));
    }
    if let Some(prefix) = &query.region_prefix
        && scope.orgs.is_empty()
        && !scope
            .region_prefixes
            .iter()
            .any(|p| p.starts_with(prefix.as_str()) || prefix.starts_with(p.as_str()))
    {
        if let Some(suppressed) =
            crate::telemetry::throttle_for("api.denied_scope_region", &principal.name)
        {
            tracing::warn!(principal = %principal.name, prefix, suppressed, "Denied: region outside scope.");
        }
        return Err(Status::permission_denied(format!(
            "region {prefix} is outside the scope of principal {}",
            principal.name
        )));
    }
    query.scope = Some(ScopeFilter {
        orgs: scope.orgs.iter().cloned().collect(),
        region_prefixes: scope.region_prefixes.clone(),
    });
    Ok(())
}

impl QueryApi {
    /// Statistics of the ratings matching `query` (restricted to the caller's scope) under a
    /// profile, with case-based rates, bad-rating case rates and an optional ranking.
    async fn compute_stats(
        &self,
        caller: &Caller,
        mut query: RatingQuery,
        dims: &[StatsDimension],
        profile: &str,
        rank_by: pb::RankBy,
    ) -> Result<(String, Vec<pb::StatsGroup>), Status> {
        restrict_to_scope(&caller.principal, &mut query)?;
        compute_stats(&self.state, query, dims, profile, rank_by).await
    }
}

/// Statistics for `query` (already restricted to whatever scope applies) under `profile`
/// (empty: the profile of the query's region prefix), grouped by `dims` and ranked.
pub(crate) async fn compute_stats(
    state: &HubState,
    query: RatingQuery,
    dims: &[StatsDimension],
    profile: &str,
    rank_by: pb::RankBy,
) -> Result<(String, Vec<pb::StatsGroup>), Status> {
    {
        let profiles = state.engine.profiles();
        let name = if profile.is_empty() {
            profiles.name_for_region(query.region_prefix.as_deref().unwrap_or(""))
        } else {
            profile
        };
        let profile = profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = profiles.names().collect();
            bad_request(&[violation(
                "profile",
                format!("is not a known profile ({})", known.join(", ")),
            )])
        })?;
        let store = &state.store;
        let mut groups: BTreeMap<Vec<String>, StatsRow> = BTreeMap::new();
        let entry = |key: Vec<String>| -> StatsRow {
            StatsRow {
                key,
                ..Default::default()
            }
        };
        for row in store.stats(&query, dims).await? {
            groups.insert(row.key.clone(), row);
        }
        for c in store.completed_case_counts(&query, dims).await? {
            if c.completed > 0 {
                let row = groups
                    .entry(c.key.clone())
                    .or_insert_with(|| entry(c.key.clone()));
                row.completed_cases = c.completed;
                row.rated_cases = c.rated;
                row.actively_rated_cases = c.actively_rated;
            }
        }
        let mut out: Vec<pb::StatsGroup> = groups
            .into_values()
            .map(|r| stats_group(r, dims, name, profile))
            .collect();
        rank(&mut out, rank_by);
        Ok((name.to_owned(), out))
    }
}

/// One CSV cell: quoted when it holds a comma, quote or line break; a cell that a spreadsheet
/// would run as a formula (starting with =, +, -, @, a tab or a carriage return) is prefixed
/// with '. Reports and the public site's open data share it.
pub(crate) fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}")).unwrap_or_default()
}

/// The report as CSV: a header, then one row per group in rank order.
fn report_csv(dims: &[pb::StatsDimension], groups: &[pb::StatsGroup]) -> String {
    let mut out = String::from("rank");
    for d in dims {
        out.push(',');
        out.push_str(
            &d.as_str_name()
                .trim_start_matches("STATS_DIMENSION_")
                .to_ascii_lowercase(),
        );
    }
    out.push_str(
        ",total,very_satisfied,satisfied,basically_satisfied,dissatisfied,very_dissatisfied,\
         good_rate,bad_rate,average_score,completed_cases,rating_rate,active_rating_rate,\
         unrated_rate,final_score,bad_rating_cases,rectification_rate,callback_rate,\
         default_ratings,flagged\n",
    );
    for g in groups {
        let mut cells = vec![g.rank.to_string()];
        cells.extend(g.key.iter().map(|k| csv_field(k)));
        cells.extend([
            g.total.to_string(),
            g.very_satisfied.to_string(),
            g.satisfied.to_string(),
            g.basically_satisfied.to_string(),
            g.dissatisfied.to_string(),
            g.very_dissatisfied.to_string(),
            format!("{:.4}", g.good_rate),
            format!("{:.4}", g.bad_rate),
            opt(g.average_score),
            g.completed_cases.to_string(),
            format!("{:.4}", g.rating_rate),
            format!("{:.4}", g.active_rating_rate),
            format!("{:.4}", g.unrated_rate),
            opt(g.final_score),
            g.bad_rating_cases.to_string(),
            format!("{:.4}", g.rectification_rate),
            format!("{:.4}", g.callback_rate),
            g.default_ratings.to_string(),
            g.flagged.to_string(),
        ]);
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

fn report_json(
    period: &str,
    profile: &str,
    dims: &[pb::StatsDimension],
    groups: &[pb::StatsGroup],
) -> String {
    let groups: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| {
            serde_json::json!({
                "rank": g.rank,
                "key": g.key,
                "total": g.total,
                "levels": {
                    "very_satisfied": g.very_satisfied,
                    "satisfied": g.satisfied,
                    "basically_satisfied": g.basically_satisfied,
                    "dissatisfied": g.dissatisfied,
                    "very_dissatisfied": g.very_dissatisfied,
                },
                "good_rate": g.good_rate,
                "bad_rate": g.bad_rate,
                "average_score": g.average_score,
                "completed_cases": g.completed_cases,
                "rating_rate": g.rating_rate,
                "active_rating_rate": g.active_rating_rate,
                "unrated_rate": g.unrated_rate,
                "final_score": g.final_score,
                "bad_rating_cases": g.bad_rating_cases,
                "rectification_rate": g.rectification_rate,
                "callback_rate": g.callback_rate,
                "default_ratings": g.default_ratings,
                "flagged": g.flagged,
            })
        })
        .collect();
    let dims: Vec<&str> = dims.iter().map(|d| d.as_str_name()).collect();
    serde_json::json!({
        "period": period,
        "profile": profile,
        "group_by": dims,
        "groups": groups,
    })
    .to_string()
}

#[tonic::async_trait]
impl QueryService for QueryApi {
    async fn export_report(
        &self,
        request: Request<pb::ExportReportRequest>,
    ) -> Result<Response<pb::ExportReportResponse>, Status> {
        let caller = self.state.admit(&request, "ExportReport", Role::Read)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        if !(2000..=2100).contains(&req.year) {
            v.push(violation("year", "must be between 2000 and 2100"));
        }
        if req.quarter > 4 {
            v.push(violation(
                "quarter",
                "must be 1 to 4, or 0 for the whole year",
            ));
        }
        if req.month > 12 {
            v.push(violation(
                "month",
                "must be 1 to 12, or 0 for a quarter or the whole year",
            ));
        } else if req.month != 0 && req.quarter != 0 {
            v.push(violation(
                "month",
                "a report covers a month or a quarter, not both: leave quarter 0",
            ));
        }
        let format = pb::ReportFormat::try_from(req.format).unwrap_or_default();
        if format == pb::ReportFormat::Unspecified {
            v.push(violation(
                "format",
                "must be REPORT_FORMAT_CSV or REPORT_FORMAT_JSON",
            ));
        }
        let filter = pb::RatingFilter {
            region_code_prefix: req.region_code_prefix.clone(),
            ..Default::default()
        };
        let mut query = match parse_filter(Some(&filter)) {
            Ok(q) => q,
            Err(fv) => {
                v.extend(fv.into_iter().map(|mut x| {
                    x.field = x.field.trim_start_matches("filter.").to_owned();
                    x
                }));
                RatingQuery::default()
            }
        };
        let mut dims = Vec::new();
        let raw_dims = if req.group_by.is_empty() {
            vec![pb::StatsDimension::Organization as i32]
        } else {
            req.group_by.clone()
        };
        for (i, raw) in raw_dims.iter().enumerate() {
            match dimension(*raw) {
                Some(d) if !dims.contains(&d) => dims.push(d),
                _ => v.push(violation(
                    format!("group_by[{i}]"),
                    "is not a statistics dimension, or repeats one",
                )),
            }
        }
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        let year = i64::from(req.year);
        let (first_month, months) = match (req.month, req.quarter) {
            (0, 0) => (1, 12),
            (0, q) => (3 * q - 2, 3),
            (m, _) => (m, 1),
        };
        let start = crate::rules::Date::from_ymd(year, first_month, 1).expect("valid month");
        let end_month = first_month + months;
        let end = if end_month > 12 {
            crate::rules::Date::from_ymd(year + 1, 1, 1)
        } else {
            crate::rules::Date::from_ymd(year, end_month, 1)
        }
        .expect("valid month");
        query.rated_from_micros = Some(start.start_micros());
        query.rated_until_micros = Some(end.start_micros());
        let profile_has_scores = {
            let profiles = self.state.engine.profiles();
            let name = if req.profile.is_empty() {
                profiles.name_for_region(&req.region_code_prefix)
            } else {
                &req.profile
            };
            profiles.get(name).is_some_and(|p| p.scores.is_some())
        };
        let rank_by = match pb::RankBy::try_from(req.rank_by).unwrap_or_default() {
            pb::RankBy::Unspecified if profile_has_scores => pb::RankBy::AverageScore,
            pb::RankBy::Unspecified => pb::RankBy::GoodRate,
            r => r,
        };
        let (profile, groups) = self
            .compute_stats(&caller, query, &dims, &req.profile, rank_by)
            .await?;
        let pb_dims: Vec<pb::StatsDimension> = raw_dims
            .iter()
            .filter_map(|d| pb::StatsDimension::try_from(*d).ok())
            .collect();
        let period = match (req.month, req.quarter) {
            (0, 0) => format!("{year}"),
            (0, q) => format!("{year}-Q{q}"),
            (m, _) => format!("{year}-{m:02}"),
        };
        let (ext, content_type, content) = match format {
            pb::ReportFormat::Json => (
                "json",
                "application/json",
                report_json(&period, &profile, &pb_dims, &groups),
            ),
            _ => (
                "csv",
                "text/csv; charset=utf-8",
                report_csv(&pb_dims, &groups),
            ),
        };
        Ok(Response::new(pb::ExportReportResponse {
            filename: format!("rating-report-{period}-{profile}.{ext}"),
            content_type: content_type.into(),
            content: content.into_bytes(),
        }))
    }

    async fn get_rating(
        &self,
        request: Request<pb::GetRatingRequest>,
    ) -> Result<Response<pb::GetRatingResponse>, Status> {
        let caller = self.state.admit(&request, "GetRating", Role::Read)?;
        let raw = request.into_inner().hub_id;
        let hub_id = Uuid::parse_str(raw.trim())
            .map_err(|_| bad_request(&[violation("hub_id", "is not a UUID")]))?;
        let stored = self
            .state
            .store
            .get_rating(hub_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no rating with hub_id {hub_id}")))?;
        let (org, region) = (&stored.rating.org_credit_code, &stored.rating.region_code);
        if !caller.principal.scope.covers(org, region) {
            if let Some(suppressed) =
                crate::telemetry::throttle_for("api.denied_scope_rating", caller.name())
            {
                tracing::warn!(principal = caller.name(), %hub_id, suppressed, "Denied: rating outside scope.");
            }
            return Err(Status::permission_denied(format!(
                "rating {hub_id} (organisation {org}, region {region}) is outside the scope of principal {}",
                caller.name()
            )));
        }
        let rating = self
            .state
            .reveal(&caller, "GetRating", vec![stored])
            .await?
            .pop();
        Ok(Response::new(pb::GetRatingResponse { rating }))
    }

    async fn list_ratings(
        &self,
        request: Request<pb::ListRatingsRequest>,
    ) -> Result<Response<pb::ListRatingsResponse>, Status> {
        let caller = self.state.admit(&request, "ListRatings", Role::Read)?;
        let req = request.into_inner();
        let mut query = parse_filter(req.filter.as_ref()).map_err(|v| bad_request(&v))?;
        let page_size = page_size(req.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        restrict_to_scope(&caller.principal, &mut query)?;
        let fingerprint = filter_fingerprint(req.filter.as_ref());
        let after =
            parse_page_token(&req.page_token, &fingerprint).map_err(|v| bad_request(&[v]))?;
        let mut rows = self
            .state
            .store
            .list_ratings(&query, after, page_size + 1)
            .await?;
        let more = rows.len() > page_size as usize;
        rows.truncate(page_size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.feed_seq, &fingerprint),
            _ => String::new(),
        };
        let ratings = self.state.reveal(&caller, "ListRatings", rows).await?;
        Ok(Response::new(pb::ListRatingsResponse {
            ratings,
            next_page_token,
        }))
    }

    async fn sample_ratings(
        &self,
        request: Request<pb::SampleRatingsRequest>,
    ) -> Result<Response<pb::SampleRatingsResponse>, Status> {
        let caller = self.state.admit(&request, "SampleRatings", Role::Read)?;
        let req = request.into_inner();
        let mut v = parse_filter(req.filter.as_ref()).err().unwrap_or_default();
        if !(req.share > 0.0 && req.share <= 1.0) {
            v.push(violation("share", "must be more than 0 and at most 1"));
        }
        if req.draw.trim().is_empty()
            || req.draw.chars().count() > 200
            || req.draw.chars().any(char::is_control)
        {
            v.push(violation(
                "draw",
                "must name the draw (1–200 characters, no control characters)",
            ));
        }
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        let mut query = parse_filter(req.filter.as_ref()).map_err(|v| bad_request(&v))?;
        let page_size = page_size(req.page_size, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
        restrict_to_scope(&caller.principal, &mut query)?;
        // A token is bound to the filter, the share and the draw.
        let fingerprint = {
            let mut h = Sha256::new();
            h.update(filter_fingerprint(req.filter.as_ref()));
            h.update(req.share.to_be_bytes());
            h.update(req.draw.as_bytes());
            hex::encode(&h.finalize()[..8])
        };
        let mut after =
            parse_page_token(&req.page_token, &fingerprint).map_err(|v| bad_request(&[v]))?;
        let share = req.share;
        let draw = req.draw.trim().to_owned();
        let drawn = |hub_id: &str| {
            let mut h = Sha256::new();
            h.update(b"rating-hub sample v1\0");
            h.update(draw.as_bytes());
            h.update(b"\0");
            h.update(hub_id.as_bytes());
            let x = u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"));
            // 53 bits compared exactly: a whole share keeps every rating.
            share >= 1.0 || (x >> 11) < (share * 2f64.powi(53)) as u64
        };
        // Read at most SAMPLE_SCAN ratings per call: a small share of a large filter answers
        // a short page with a token to go on, rather than reading everything at once.
        const SAMPLE_SCAN: usize = 20_000;
        let mut picked = Vec::new();
        let mut scanned = 0usize;
        let mut exhausted = false;
        while picked.len() < page_size as usize && scanned < SAMPLE_SCAN {
            let rows = self
                .state
                .store
                .list_ratings(&query, after, MAX_PAGE_SIZE)
                .await?;
            let Some(last) = rows.last() else {
                exhausted = true;
                break;
            };
            let last_seq = last.feed_seq;
            let full = rows.len() == MAX_PAGE_SIZE as usize;
            for row in rows {
                scanned += 1;
                after = row.feed_seq;
                // A rater to survey: not a default (nobody rated), not a follow-up (its rater
                // has a draw of their own, on the original), and someone to reach.
                let surveyable = !row.rating.is_default
                    && row.rating.follow_up_of.is_empty()
                    && (row.rating.rater.is_some() || row.pii.is_some());
                if surveyable && drawn(&row.rating.hub_id) {
                    picked.push(row);
                    if picked.len() == page_size as usize {
                        break;
                    }
                }
            }
            if !full && after == last_seq {
                exhausted = true;
                break;
            }
        }
        let next_page_token = if exhausted {
            String::new()
        } else {
            page_token(after, &fingerprint)
        };
        // Who drew what is logged: a draw name tried again and again to steer the sample
        // shows up here.
        tracing::info!(
            principal = caller.name(),
            draw = %draw,
            share,
            picked = picked.len(),
            scanned,
            "Survey sample drawn."
        );
        let ratings = self.state.reveal(&caller, "SampleRatings", picked).await?;
        Ok(Response::new(pb::SampleRatingsResponse {
            ratings,
            next_page_token,
        }))
    }

    async fn list_persistently_low_ranked(
        &self,
        request: Request<pb::ListPersistentlyLowRankedRequest>,
    ) -> Result<Response<pb::ListPersistentlyLowRankedResponse>, Status> {
        let caller = self
            .state
            .admit(&request, "ListPersistentlyLowRanked", Role::Read)?;
        let req = request.into_inner();
        let mut v = parse_filter(req.filter.as_ref()).err().unwrap_or_default();
        if !(2000..=2100).contains(&req.year) {
            v.push(violation("year", "must be between 2000 and 2100"));
        }
        if !(1..=4).contains(&req.quarter) {
            v.push(violation("quarter", "must be 1 to 4"));
        }
        let periods = if req.periods == 0 { 2 } else { req.periods };
        if !(2..=8).contains(&periods) {
            v.push(violation("periods", "must be 2 to 8 (0 means 2)"));
        }
        let bottom = if req.bottom == 0 { 3 } else { req.bottom };
        if !(1..=100).contains(&bottom) {
            v.push(violation("bottom", "must be 1 to 100 (0 means 3)"));
        }
        let dim = match req.dimension {
            0 => Some(StatsDimension::Staff),
            raw => dimension(raw),
        };
        match dim {
            None => v.push(violation("dimension", "is not a statistics dimension")),
            // A day's or a month's key never comes back in another quarter.
            Some(StatsDimension::Day | StatsDimension::Month) => v.push(violation(
                "dimension",
                "must be one whose groups recur across quarters (not DAY or MONTH)",
            )),
            Some(_) => {}
        }
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        let dim = dim.expect("checked");
        let base = parse_filter(req.filter.as_ref()).map_err(|v| bad_request(&v))?;
        let rank_by = match pb::RankBy::try_from(req.rank_by).unwrap_or_default() {
            pb::RankBy::Unspecified => {
                let profiles = self.state.engine.profiles();
                let name = if req.profile.is_empty() {
                    profiles.name_for_region(base.region_prefix.as_deref().unwrap_or(""))
                } else {
                    &req.profile
                };
                if profiles.get(name).is_some_and(|p| p.scores.is_some()) {
                    pb::RankBy::AverageScore
                } else {
                    pb::RankBy::GoodRate
                }
            }
            r => r,
        };
        // The quarters, oldest first.
        let mut quarters = Vec::new();
        let (mut y, mut q) = (i64::from(req.year), i64::from(req.quarter));
        for _ in 0..periods {
            quarters.push((y, q));
            if q == 1 {
                y -= 1;
                q = 4;
            } else {
                q -= 1;
            }
        }
        quarters.reverse();
        let mut low: Option<std::collections::BTreeMap<String, (Vec<u32>, Vec<u32>)>> = None;
        for (y, q) in &quarters {
            let start = crate::rules::Date::from_ymd(*y, (3 * q - 2) as u32, 1).expect("month");
            let end = if *q == 4 {
                crate::rules::Date::from_ymd(*y + 1, 1, 1)
            } else {
                crate::rules::Date::from_ymd(*y, (3 * q + 1) as u32, 1)
            }
            .expect("month");
            let mut query = base.clone();
            query.rated_from_micros = Some(start.start_micros());
            query.rated_until_micros = Some(end.start_micros());
            let (_, groups) = self
                .compute_stats(&caller, query, &[dim], &req.profile, rank_by)
                .await?;
            // Ranked are the groups rated in the quarter, under a key (a staff member with
            // 办结 events and no rating, or ratings about no staff member, are not "ranked
            // low"), with a value to rank by. Ranks ascend in `groups`.
            let ranked: Vec<&pb::StatsGroup> = groups
                .iter()
                .filter(|g| g.total > 0 && g.key.iter().all(|k| !k.is_empty()))
                .filter(|g| match rank_by {
                    pb::RankBy::AverageScore => g.average_score.is_some(),
                    pb::RankBy::FinalScore => g.final_score.is_some(),
                    _ => true,
                })
                .collect();
            let n = ranked.len() as u32;
            // 排名靠后: the `bottom` lowest places, and every group tied with the place that
            // cuts (so groups tied for last are all last).
            let cut = if ranked.len() > bottom as usize {
                ranked[ranked.len() - bottom as usize].rank
            } else {
                0
            };
            let this: std::collections::BTreeMap<String, u32> = ranked
                .iter()
                .filter(|g| g.rank >= cut)
                .map(|g| (g.key.join("/"), g.rank))
                .collect();
            low = Some(match low {
                None => this
                    .into_iter()
                    .map(|(k, r)| (k, (vec![r], vec![n])))
                    .collect(),
                Some(prev) => prev
                    .into_iter()
                    .filter_map(|(k, (mut ranks, mut ns))| {
                        let r = *this.get(&k)?;
                        ranks.push(r);
                        ns.push(n);
                        Some((k, (ranks, ns)))
                    })
                    .collect(),
            });
        }
        Ok(Response::new(pb::ListPersistentlyLowRankedResponse {
            periods: quarters.iter().map(|(y, q)| format!("{y}-Q{q}")).collect(),
            groups: low
                .unwrap_or_default()
                .into_iter()
                .map(|(key, (ranks, ranked))| pb::PersistentlyLowRanked { key, ranks, ranked })
                .collect(),
        }))
    }

    async fn count_bad_rating_reasons(
        &self,
        request: Request<pb::CountBadRatingReasonsRequest>,
    ) -> Result<Response<pb::CountBadRatingReasonsResponse>, Status> {
        const READ_MAX: usize = 200_000;
        let caller = self
            .state
            .admit(&request, "CountBadRatingReasons", Role::Read)?;
        let req = request.into_inner();
        let mut query = parse_filter(req.filter.as_ref()).map_err(|v| bad_request(&v))?;
        query.levels = vec![
            pb::Level::Dissatisfied as i32,
            pb::Level::VeryDissatisfied as i32,
        ];
        query.counted_only = true;
        restrict_to_scope(&caller.principal, &mut query)?;
        // A fixed head, so ratings committing meanwhile do not stretch the read.
        query.max_feed_seq = Some(*self.state.store.feed_head().borrow());
        let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
        let (mut after, mut read) = (0u64, 0usize);
        loop {
            let rows = self
                .state
                .store
                .list_ratings(&query, after, MAX_PAGE_SIZE)
                .await?;
            let Some(last) = rows.last() else { break };
            after = last.feed_seq;
            let full = rows.len() == MAX_PAGE_SIZE as usize;
            for row in &rows {
                if row.rating.detail_codes.is_empty() {
                    *counts.entry(String::new()).or_default() += 1;
                }
                let mut seen = std::collections::BTreeSet::new();
                for code in &row.rating.detail_codes {
                    if seen.insert(code) {
                        *counts.entry(code.clone()).or_default() += 1;
                    }
                }
            }
            read += rows.len();
            if read > READ_MAX {
                return Err(Status::failed_precondition(format!(
                    "more than {READ_MAX} 差评 match: narrow the filter (a quarter, a region)"
                )));
            }
            if !full {
                break;
            }
        }
        let mut reasons: Vec<pb::ReasonCount> = counts
            .into_iter()
            .map(|(code, count)| pb::ReasonCount { code, count })
            .collect();
        reasons.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.code.cmp(&b.code)));
        Ok(Response::new(pb::CountBadRatingReasonsResponse {
            reasons,
            bad_ratings: read as u64,
        }))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let caller = self.state.admit(&request, "GetStats", Role::Read)?;
        let req = request.into_inner();
        let query = parse_filter(req.filter.as_ref());
        let mut violations = query.clone().err().unwrap_or_default();
        let mut dims = Vec::with_capacity(req.group_by.len());
        for (i, raw) in req.group_by.iter().enumerate() {
            match dimension(*raw) {
                Some(d) if dims.contains(&d) => {
                    violations.push(violation(format!("group_by[{i}]"), "repeats a dimension"))
                }
                Some(d) => dims.push(d),
                None => violations.push(violation(
                    format!("group_by[{i}]"),
                    format!("{raw} is not a statistics dimension"),
                )),
            }
        }
        if !violations.is_empty() {
            return Err(bad_request(&violations));
        }
        let query = query.map_err(|v| bad_request(&v))?;
        let rank_by = pb::RankBy::try_from(req.rank_by).unwrap_or_default();
        let (_, groups) = self
            .compute_stats(&caller, query, &dims, &req.profile, rank_by)
            .await?;
        Ok(Response::new(pb::GetStatsResponse { groups }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_token_is_bound_to_its_filter() {
        let a = filter_fingerprint(None);
        let b = filter_fingerprint(Some(&pb::RatingFilter {
            item_code: "X".into(),
            ..Default::default()
        }));
        assert_ne!(a, b);
        let t = page_token(42, &a);
        assert_eq!(parse_page_token(&t, &a).unwrap(), 42);
        assert_eq!(parse_page_token(&t, &b).unwrap_err().field, "page_token");
        assert!(parse_page_token("garbage", &a).is_err());
    }
}

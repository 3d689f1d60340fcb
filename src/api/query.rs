//! `QueryService`: read ratings back, page through them, count them.

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{HubState, bad_request, page_size, violation};
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
    for (i, c) in f.channels.iter().enumerate() {
        match pb::Channel::try_from(*c) {
            Ok(pb::Channel::Unspecified) | Err(_) => v.push(violation(
                format!("filter.channels[{i}]"),
                format!("{c} is not a channel"),
            )),
            Ok(_) => q.channels.push(*c),
        }
    }
    for (i, l) in f.levels.iter().enumerate() {
        match pb::Level::try_from(*l) {
            Ok(pb::Level::Unspecified) | Err(_) => v.push(violation(
                format!("filter.levels[{i}]"),
                format!("{l} is not a level"),
            )),
            Ok(_) => q.levels.push(*l),
        }
    }
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
    let final_score = match (profile.final_score.as_deref(), average_score) {
        (Some("kunming"), Some(avg)) => Some(kunming_final_score(rating_rate, avg)),
        _ => None,
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
        active_rating_rate: ratio(row.actively_rated_cases, row.completed_cases).min(1.0),
        unrated_rate: if row.completed_cases == 0 {
            0.0
        } else {
            1.0 - rating_rate
        },
        final_score,
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
        tracing::warn!(principal = %principal.name, org, "Denied: organisation outside scope.");
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
        tracing::warn!(principal = %principal.name, prefix, "Denied: region outside scope.");
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

#[tonic::async_trait]
impl QueryService for QueryApi {
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
            tracing::warn!(principal = caller.name(), %hub_id, "Denied: rating outside scope.");
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
        let mut query = query.map_err(|v| bad_request(&v))?;
        let profiles = self.state.engine.profiles();
        let name = if req.profile.is_empty() {
            profiles.name_for_region(query.region_prefix.as_deref().unwrap_or(""))
        } else {
            req.profile.as_str()
        };
        let profile = profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = profiles.names().collect();
            bad_request(&[violation(
                "profile",
                format!("is not a known profile ({})", known.join(", ")),
            )])
        })?;
        restrict_to_scope(&caller.principal, &mut query)?;
        let mut groups: BTreeMap<Vec<String>, StatsRow> = BTreeMap::new();
        for row in self.state.store.stats(&query, &dims).await? {
            groups.insert(row.key.clone(), row);
        }
        for c in self
            .state
            .store
            .completed_case_counts(&query, &dims)
            .await?
        {
            if c.completed > 0 {
                let row = groups.entry(c.key.clone()).or_insert_with(|| StatsRow {
                    key: c.key,
                    ..Default::default()
                });
                row.completed_cases = c.completed;
                row.rated_cases = c.rated;
                row.actively_rated_cases = c.actively_rated;
            }
        }
        Ok(Response::new(pb::GetStatsResponse {
            groups: groups
                .into_values()
                .map(|r| stats_group(r, &dims, name, profile))
                .collect(),
        }))
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

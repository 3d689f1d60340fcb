//! `AdminService`: operator calls. Every call needs the admin role.

use std::sync::Arc;

use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::query::{page_token, parse_page_token};
use super::rectification::check_text;
use super::{HubState, bad_request, page_size, violation};
use crate::auth::Role;
use crate::pb::v1 as pb;
use crate::pb::v1::admin_service_server::AdminService;
use crate::relay::{RelayError, UpstreamStatus};
use crate::time::timestamp_from_micros;

impl From<RelayError> for Status {
    fn from(e: RelayError) -> Self {
        match e {
            RelayError::UnknownUpstream(name) => {
                Status::not_found(format!("no upstream named {name:?} is configured"))
            }
            RelayError::Store(e) => e.into(),
        }
    }
}

fn status_pb(s: UpstreamStatus) -> pb::UpstreamStatus {
    let (last_error, last_error_at) = match s.last_error {
        Some((e, at)) => (e, Some(timestamp_from_micros(at))),
        None => (String::new(), None),
    };
    pb::UpstreamStatus {
        name: s.name,
        kind: s.kind.as_str().to_owned(),
        endpoint: s.endpoint,
        cursor: s.cursor,
        head_sequence: s.head,
        lag_records: s.lag_records,
        lag_seconds: s.lag_seconds,
        open_dead_letters: s.open_dead_letters,
        last_error,
        last_error_at,
        attempts: s.attempts,
        failures: s.failures,
        delivered: s.delivered,
        paused: s.paused,
        delivering_instance: s.delivering_instance.unwrap_or_default(),
        delivering_here: s.delivering_here,
    }
}

fn upstream_name(raw: &str) -> Result<&str, Status> {
    if raw.trim().is_empty() {
        return Err(bad_request(&[violation("upstream", "is required")]));
    }
    Ok(raw.trim())
}

pub struct AdminApi {
    state: Arc<HubState>,
}

/// How far a time range is widened at each end: instances committing at once may stamp
/// commit times slightly out of feed order.
const TIME_MARGIN: i64 = 60_000_000;

fn replay_pb(r: crate::store::RangeReplay) -> pb::RangeReplay {
    pb::RangeReplay {
        id: r.id,
        upstream: r.upstream,
        from_feed_sequence: r.from_seq,
        to_feed_sequence: r.to_seq,
        next_feed_sequence: r.next_seq,
        requested_by: r.requested_by,
        requested_at: Some(timestamp_from_micros(r.requested_at_micros)),
        reason: r.reason,
        done_at: r.done_at_micros.map(timestamp_from_micros),
    }
}

impl AdminApi {
    /// The first feed position committed at or after `at` (`head + 1` when none is).
    async fn first_seq_at_or_after(&self, at: i64, head: u64) -> Result<u64, Status> {
        let (mut lo, mut hi) = (1u64, head + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.state.store.received_at(mid).await? {
                Some(t) if t >= at => hi = mid,
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }
}

impl AdminApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_pii_access(
        &self,
        request: Request<pb::ListPiiAccessRequest>,
    ) -> Result<Response<pb::ListPiiAccessResponse>, Status> {
        self.state.admit(&request, "ListPiiAccess", Role::Admin)?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = hex::encode(&Sha256::digest(req.principal.as_bytes())[..8]);
        let after =
            parse_page_token(&req.page_token, &fingerprint).map_err(|v| bad_request(&[v]))?;
        let principal = (!req.principal.is_empty()).then_some(req.principal.as_str());
        let mut rows = self
            .state
            .store
            .list_pii_access(principal, after, size + 1)
            .await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.id, &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListPiiAccessResponse {
            entries: rows
                .into_iter()
                .map(|a| pb::PiiAccess {
                    at: Some(timestamp_from_micros(a.at_micros)),
                    principal: a.principal,
                    rpc: a.rpc,
                    hub_id: a.hub_id.to_string(),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn list_upstreams(
        &self,
        request: Request<pb::ListUpstreamsRequest>,
    ) -> Result<Response<pb::ListUpstreamsResponse>, Status> {
        self.state.admit(&request, "ListUpstreams", Role::Admin)?;
        let relay = &self.state.relay;
        let mut upstreams = Vec::new();
        for name in relay.names() {
            match relay.status(&name).await {
                // Removed by a reload since the names were read.
                Err(crate::relay::RelayError::UnknownUpstream(_)) => continue,
                r => upstreams.push(status_pb(r?)),
            }
        }
        Ok(Response::new(pb::ListUpstreamsResponse { upstreams }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        self.state.admit(&request, "ListDeadLetters", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?;
        self.state.relay.status(name).await?;
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = hex::encode(
            &Sha256::digest(format!("{name}/{}", req.include_resolved).as_bytes())[..8],
        );
        let after =
            parse_page_token(&req.page_token, &fingerprint).map_err(|v| bad_request(&[v]))?;
        let mut rows = self
            .state
            .store
            .list_dead_letters(name, req.include_resolved, after, size + 1)
            .await?;
        let more = rows.len() > size as usize;
        rows.truncate(size as usize);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => page_token(last.id, &fingerprint),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: rows
                .into_iter()
                .map(|d| pb::DeadLetter {
                    id: d.id,
                    upstream: d.upstream,
                    feed_sequence: d.feed_seq,
                    hub_id: d.hub_id.map(|h| h.to_string()).unwrap_or_default(),
                    error: d.error,
                    attempts: d.attempts,
                    created_at: Some(timestamp_from_micros(d.created_at_micros)),
                    replay_requested: d.replay_requested,
                    resolved_at: d.resolved_at_micros.map(timestamp_from_micros),
                    case_event_id: d.case_event_id.unwrap_or_default(),
                    update_seq: d.update_seq.unwrap_or_default(),
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Result<Response<pb::ReplayDeadLettersResponse>, Status> {
        self.state
            .admit(&request, "ReplayDeadLetters", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?;
        let ids = match (req.all, req.ids.is_empty()) {
            (true, true) => None,
            (false, false) => Some(req.ids),
            _ => {
                return Err(bad_request(&[violation(
                    "ids",
                    "give either ids or all = true",
                )]));
            }
        };
        let requested = self.state.relay.replay(name, ids).await?;
        Ok(Response::new(pb::ReplayDeadLettersResponse { requested }))
    }

    async fn pause_upstream(
        &self,
        request: Request<pb::PauseUpstreamRequest>,
    ) -> Result<Response<pb::PauseUpstreamResponse>, Status> {
        self.state.admit(&request, "PauseUpstream", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?;
        self.state.relay.set_paused(name, true).await?;
        let status = Some(status_pb(self.state.relay.status(name).await?));
        Ok(Response::new(pb::PauseUpstreamResponse { status }))
    }

    async fn resume_upstream(
        &self,
        request: Request<pb::ResumeUpstreamRequest>,
    ) -> Result<Response<pb::ResumeUpstreamResponse>, Status> {
        self.state.admit(&request, "ResumeUpstream", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?;
        self.state.relay.set_paused(name, false).await?;
        let status = Some(status_pb(self.state.relay.status(name).await?));
        Ok(Response::new(pb::ResumeUpstreamResponse { status }))
    }

    async fn list_attempts(
        &self,
        request: Request<pb::ListAttemptsRequest>,
    ) -> Result<Response<pb::ListAttemptsResponse>, Status> {
        self.state.admit(&request, "ListAttempts", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?;
        let limit = page_size(req.limit, 100, 1000)?;
        let rows = self
            .state
            .relay
            .attempts(name, req.before_id, limit + 1)
            .await?;
        let more = rows.len() > limit as usize;
        let attempts: Vec<pb::DeliveryAttempt> = rows
            .into_iter()
            .take(limit as usize)
            .map(|a| pb::DeliveryAttempt {
                id: a.id,
                upstream: a.upstream,
                at: Some(timestamp_from_micros(a.at_micros)),
                first_feed_sequence: a.first_seq,
                last_feed_sequence: a.last_seq,
                records: a.records,
                outcome: a.outcome,
                detail: a.detail,
                duration_ms: a.duration_ms,
                replay_id: a.replay_id.unwrap_or(0),
            })
            .collect();
        let next_before_id = if more {
            attempts.last().map_or(0, |a| a.id)
        } else {
            0
        };
        Ok(Response::new(pb::ListAttemptsResponse {
            attempts,
            next_before_id,
        }))
    }

    async fn replay_range(
        &self,
        request: Request<pb::ReplayRangeRequest>,
    ) -> Result<Response<pb::ReplayRangeResponse>, Status> {
        let caller = self.state.admit(&request, "ReplayRange", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?.to_owned();
        self.state.relay.status(&name).await?;
        let mut v = Vec::new();
        let reason = req.reason.trim().to_owned();
        if reason.is_empty() {
            v.push(violation("reason", "is required"));
        } else if reason.chars().count() > 500 || reason.chars().any(char::is_control) {
            v.push(violation(
                "reason",
                "is one line of at most 500 characters, without control characters",
            ));
        }
        let by_time = req.from_time.is_some() || req.until_time.is_some();
        let by_seq = req.from_feed_sequence != 0 || req.to_feed_sequence != 0;
        if by_time == by_seq {
            v.push(violation(
                "from_feed_sequence",
                "give feed positions (from_feed_sequence, to_feed_sequence) or times (from_time, until_time), not both",
            ));
        }
        let head = *self.state.store.feed_head().borrow();
        let (from, to) = if by_time {
            let from_t = req
                .from_time
                .as_ref()
                .and_then(crate::time::micros_from_timestamp);
            let until_t = match &req.until_time {
                Some(t) => crate::time::micros_from_timestamp(t),
                None => Some(i64::MAX),
            };
            match (from_t, until_t) {
                (Some(f), Some(u)) if f < u => {
                    // The feed is gapless and commit times never go back: the positions of
                    // the range are found by halving.
                    let first = self
                        .first_seq_at_or_after(f.saturating_sub(TIME_MARGIN), head)
                        .await?;
                    let after = self
                        .first_seq_at_or_after(u.saturating_add(TIME_MARGIN), head)
                        .await?;
                    (first, after.saturating_sub(1))
                }
                _ => {
                    v.push(violation(
                        "from_time",
                        "is required, and earlier than until_time",
                    ));
                    (0, 0)
                }
            }
        } else {
            let to = if req.to_feed_sequence == 0 {
                head
            } else {
                req.to_feed_sequence
            };
            if req.from_feed_sequence == 0 || req.from_feed_sequence > to {
                v.push(violation(
                    "from_feed_sequence",
                    "is required (1 or more), and at most to_feed_sequence",
                ));
            } else if to > head {
                v.push(violation(
                    "to_feed_sequence",
                    format!("is past the feed's head ({head})"),
                ));
            }
            (req.from_feed_sequence, to)
        };
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        if from == 0 || from > to {
            return Err(Status::failed_precondition(
                "no rating was committed in that time range",
            ));
        }
        let r = self
            .state
            .relay
            .replay_range(&name, from, to, caller.name(), &reason)
            .await?;
        Ok(Response::new(pb::ReplayRangeResponse {
            replay: Some(replay_pb(r)),
        }))
    }

    async fn list_replays(
        &self,
        request: Request<pb::ListReplaysRequest>,
    ) -> Result<Response<pb::ListReplaysResponse>, Status> {
        self.state.admit(&request, "ListReplays", Role::Admin)?;
        let name = upstream_name(&request.get_ref().upstream)?.to_owned();
        let replays = self.state.relay.range_replays(&name).await?;
        Ok(Response::new(pb::ListReplaysResponse {
            replays: replays.into_iter().map(replay_pb).collect(),
        }))
    }

    async fn cancel_replay(
        &self,
        request: Request<pb::CancelReplayRequest>,
    ) -> Result<Response<pb::CancelReplayResponse>, Status> {
        let caller = self.state.admit(&request, "CancelReplay", Role::Admin)?;
        let req = request.into_inner();
        let name = upstream_name(&req.upstream)?.to_owned();
        if req.id == 0 {
            return Err(bad_request(&[violation("id", "is required")]));
        }
        let cancelled = self
            .state
            .relay
            .cancel_range_replay(&name, req.id, caller.name())
            .await?;
        Ok(Response::new(pb::CancelReplayResponse { cancelled }))
    }

    async fn list_peer_heads(
        &self,
        request: Request<pb::ListPeerHeadsRequest>,
    ) -> Result<Response<pb::ListPeerHeadsResponse>, Status> {
        let _caller = self.state.admit(&request, "ListPeerHeads", Role::Admin)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 100,
            n => n.min(1000),
        };
        let principal = (!req.principal.is_empty()).then_some(req.principal.as_str());
        let heads = self
            .state
            .store
            .peer_heads(principal, req.alarms_only, limit)
            .await?
            .into_iter()
            .map(peer_head_pb)
            .collect();
        Ok(Response::new(pb::ListPeerHeadsResponse { heads }))
    }

    async fn rebaseline_peer_head(
        &self,
        request: Request<pb::RebaselinePeerHeadRequest>,
    ) -> Result<Response<pb::RebaselinePeerHeadResponse>, Status> {
        let caller = self
            .state
            .admit(&request, "RebaselinePeerHead", Role::Admin)?;
        let req = request.into_inner();
        let mut bad = Vec::new();
        if req.principal.is_empty() {
            bad.push(violation(
                "principal",
                "is required: the lower hub's principal",
            ));
        }
        let reason = check_text(&mut bad, "reason", &req.reason, true);
        if !bad.is_empty() {
            return Err(bad_request(&bad));
        }
        let store = &self.state.store;
        // Only a lower hub that has reported heads: the locks below are per lower hub, and
        // any other name would add one to the process's map and open a database session.
        if store
            .peer_heads(Some(&req.principal), false, 1)
            .await?
            .is_empty()
        {
            return Err(Status::not_found(format!(
                "{} has reported no tree heads (ListPeerHeads)",
                req.principal.chars().take(100).collect::<String>()
            )));
        }
        // Under the locks reports are checked under (this process's, then the database's
        // across instances): a report checked against the old baseline cannot land after
        // the new one.
        let _one = self.state.peer_report_lock(&req.principal).await?;
        let _shared = store.peer_lock(&req.principal).await?;
        let rows = store.peer_heads(Some(&req.principal), false, 1000).await?;
        let last_baseline = rows
            .iter()
            .find(|h| h.outcome == "accepted" || h.outcome == "rebaselined")
            .map(|h| h.id)
            .unwrap_or(0);
        let chosen = if req.id == 0 {
            rows.iter()
                .find(|h| h.outcome == "inconsistent" && h.id > last_baseline)
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "{} has no inconsistent head since the last accepted one: name the \
                         head to accept by its id (ListPeerHeads)",
                        req.principal
                    ))
                })?
        } else {
            rows.iter().find(|h| h.id == req.id).ok_or_else(|| {
                Status::not_found(format!(
                    "no head {} among {}'s last 1000 reported heads",
                    req.id, req.principal
                ))
            })?
        };
        if (req.tree_size != 0 || !req.root_hash.is_empty())
            && (chosen.size != req.tree_size || chosen.root != req.root_hash)
        {
            return Err(Status::failed_precondition(format!(
                "head {} now holds {} ratings with root {}, not the head given (advanced by \
                 later heads since it was listed): list it again",
                chosen.id,
                chosen.size,
                hex::encode(&chosen.root)
            )));
        }
        if chosen.id < last_baseline {
            return Err(Status::failed_precondition(format!(
                "head {} was reported before the current baseline ({last_baseline}): moving \
                 the baseline back would let the ratings after it be rewritten unnoticed",
                chosen.id
            )));
        }
        if chosen.outcome != "inconsistent" && chosen.outcome != "accepted" {
            return Err(Status::failed_precondition(format!(
                "head {} is {}: only a head whose signature verified (accepted or \
                 inconsistent) can become the baseline",
                chosen.id, chosen.outcome
            )));
        }
        let record = crate::store::PeerHead {
            id: 0,
            outcome: "rebaselined".into(),
            first_bad: 0,
            detail: format!(
                "head {} made the baseline by {}: {reason}",
                chosen.id,
                caller.name()
            ),
            ..chosen.clone()
        };
        tracing::warn!(
            peer = %req.principal,
            head = chosen.id,
            size = chosen.size,
            by = %caller.name(),
            "A lower hub's rating log head was made the baseline by an operator."
        );
        store
            .relay_write(crate::store::RelayWrite::PeerHead(record))
            .await?;
        let baseline = store
            .peer_heads(Some(&req.principal), false, 1)
            .await?
            .into_iter()
            .next()
            .map(peer_head_pb);
        Ok(Response::new(pb::RebaselinePeerHeadResponse { baseline }))
    }

    async fn reload_config(
        &self,
        request: Request<pb::ReloadConfigRequest>,
    ) -> Result<Response<pb::ReloadConfigResponse>, Status> {
        let caller = self.state.admit(&request, "ReloadConfig", Role::Admin)?;
        // On a task of its own: a caller that goes away (a deadline, a closed connection)
        // does not cut a reload half-way through replacing workers.
        let state = self.state.clone();
        let r = tokio::spawn(async move { state.reload().await })
            .await
            .map_err(|e| Status::internal(format!("reload failed: {e}")))?
            .map_err(|why| {
                tracing::warn!(
                    principal = caller.name(),
                    "Configuration reload refused; the running one stays."
                );
                Status::failed_precondition(format!(
                    "the configuration was not reloaded (the running one stays): {why}"
                ))
            })?;
        Ok(Response::new(pb::ReloadConfigResponse {
            principals: r.principals as u32,
            added: r.added,
            removed: r.removed,
            upstreams_added: r.upstreams_added,
            upstreams_removed: r.upstreams_removed,
            upstreams_changed: r.upstreams_changed,
            limits_changed: r.limits_changed,
            restart_needed: r.restart_needed,
            warnings: r.warnings,
        }))
    }

    async fn register_invalid_rating(
        &self,
        request: Request<pb::RegisterInvalidRatingRequest>,
    ) -> Result<Response<pb::RegisterInvalidRatingResponse>, Status> {
        let caller = self
            .state
            .admit(&request, "RegisterInvalidRating", Role::Admin)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        let hub_id = uuid::Uuid::parse_str(req.hub_id.trim()).ok();
        if hub_id.is_none() {
            v.push(violation("hub_id", "is not a hub id (a UUID)"));
        }
        // Taken down from what the rater said: their numbers are not kept.
        let statement = crate::domain::codes::redact_numbers(&check_text(
            &mut v,
            "rater_statement",
            &req.rater_statement,
            true,
        ));
        let decision = check_text(&mut v, "decision_note", &req.decision_note, true);
        let Some(hub_id) = hub_id.filter(|_| v.is_empty()) else {
            return Err(bad_request(&v));
        };
        let stored = self
            .state
            .store
            .get_rating(hub_id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no rating {hub_id}")))?;
        let rating = stored.rating;
        // The rater's and agent's own data, to take out of what is stored unsealed below.
        let mut people = [
            rating.rater.clone().unwrap_or_default(),
            rating.agent.clone().unwrap_or_default(),
        ];
        if let Some(sealed) = &stored.pii {
            let [rater, agent] = &mut people;
            self.state
                .pii
                .reveal_persons(
                    Some(rater),
                    Some(agent),
                    sealed,
                    &crate::store::rating_aad(&hub_id),
                    true,
                )
                .map_err(|_| Status::internal("the rating's sealed data cannot be opened"))?;
        }
        let statement = crate::privacy::mask_people(&statement, &people);
        let decision = crate::privacy::mask_people(&decision, &people);
        if !caller
            .principal
            .scope
            .covers(&rating.org_credit_code, &rating.region_code)
        {
            return Err(Status::permission_denied(format!(
                "rating {hub_id} (organisation {}) is outside the scope of principal {}",
                rating.org_credit_code,
                caller.name()
            )));
        }
        if rating.is_default {
            return Err(Status::failed_precondition(format!(
                "rating {hub_id} is a default rating, not a rater's: the rater's own rating \
                 replaces it (SubmitRatings)"
            )));
        }
        let level = pb::Level::try_from(rating.level).unwrap_or_default();
        if crate::domain::rating::is_bad(level) {
            return Err(Status::failed_precondition(format!(
                "rating {hub_id} is a 差评 with its case: register the rater's claim there \
                 (RectificationService.FileAppeal with raised_by_rater)"
            )));
        }
        let written = self
            .state
            .store
            .relay_write(crate::store::RelayWrite::Exclusion {
                hub_id,
                reason: pb::AppealOutcome::Invalid as i32,
                decided_by: caller.name().to_owned(),
                note: format!("评价人：{statement}\n认定：{decision}"),
            })
            .await?;
        if written == 0 {
            return Err(Status::already_exists(format!(
                "rating {hub_id} is already left out of the scores"
            )));
        }
        tracing::info!(principal = caller.name(), %hub_id, "Rating registered invalid on its rater's claim.");
        Ok(Response::new(pb::RegisterInvalidRatingResponse {
            registered_at: Some(timestamp_from_micros(self.state.clock.now_micros())),
        }))
    }
}

fn peer_head_pb(h: crate::store::PeerHead) -> pb::PeerHead {
    pb::PeerHead {
        id: h.id,
        principal: h.principal,
        tree_size: h.size,
        root_hash: h.root,
        head_time: Some(crate::time::timestamp_from_micros(h.head_time_micros)),
        received_at: Some(crate::time::timestamp_from_micros(h.received_at_micros)),
        outcome: h.outcome,
        first_bad_position: h.first_bad,
        detail: h.detail,
    }
}

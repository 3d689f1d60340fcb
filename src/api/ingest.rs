//! `IngestService`: ratings and 办件 events in. Every item is validated and scope-checked on
//! the caller's task, then committed by the store's group-commit writer; results come back
//! only after commit.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{Caller, HubState, bad_request, field_violations, over_quota, violation};
use crate::auth::{Principal, Role};
use crate::domain::{Violation, parse_case, parse_rating};
use crate::pb::v1 as pb;
use crate::pb::v1::ingest_service_server::IngestService;
use crate::store::{CaseOutcome, IngestChecks, InsertOutcome, NewCaseEvent, NewRating};
use pb::Outcome;

pub struct IngestApi {
    state: Arc<HubState>,
}

impl IngestApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }
}

fn check_batch_size(field: &str, len: usize, max: usize) -> Result<(), Status> {
    if len == 0 {
        return Err(bad_request(&[violation(
            field,
            "must contain at least one item",
        )]));
    }
    if len > max {
        return Err(bad_request(&[violation(
            field,
            format!("has {len} items; at most {max} are allowed per call"),
        )]));
    }
    Ok(())
}

fn refused(
    index: usize,
    key: &str,
    outcome: Outcome,
    violations: Vec<Violation>,
) -> pb::ItemResult {
    pb::ItemResult {
        index: index as u32,
        source_key: key.to_owned(),
        outcome: outcome as i32,
        violations: field_violations(violations),
        ..Default::default()
    }
}

/// The scope check of one item; the violation names the organisation field.
fn out_of_scope(principal: &Principal, org: &str, region: &str) -> Option<Vec<Violation>> {
    if principal.scope.covers(org, region) {
        return None;
    }
    if let Some(suppressed) =
        crate::telemetry::throttle_for("api.denied_scope_item", &principal.name)
    {
        tracing::warn!(principal = %principal.name, org, region, suppressed, "Denied: item outside the principal's scope.");
    }
    Some(vec![violation(
        "org_credit_code",
        format!(
            "organisation {org} in region {region} is outside the scope of principal {}",
            principal.name
        ),
    )])
}

fn stored_result(
    index: usize,
    source_key: String,
    outcome: InsertOutcome,
    flags: &[pb::QualityFlag],
) -> pb::ItemResult {
    let (outcome, hub_id, feed_seq, flags) = match outcome {
        InsertOutcome::Accepted {
            hub_id,
            feed_seq,
            flags: added,
        } => {
            let all: Vec<pb::QualityFlag> = flags.iter().chain(&added).copied().collect();
            (Outcome::Accepted, hub_id, feed_seq, all)
        }
        InsertOutcome::Duplicate { hub_id, feed_seq } => {
            (Outcome::Duplicate, hub_id, feed_seq, flags.to_vec())
        }
        InsertOutcome::Conflict { hub_id, feed_seq } => {
            (Outcome::Conflict, hub_id, feed_seq, Vec::new())
        }
        InsertOutcome::Refused { field, reason } => {
            return refused(
                index,
                &source_key,
                Outcome::Invalid,
                vec![violation(field, reason)],
            );
        }
    };
    pb::ItemResult {
        index: index as u32,
        source_key,
        outcome: outcome as i32,
        hub_id: hub_id.to_string(),
        feed_sequence: feed_seq,
        violations: Vec::new(),
        quality_flags: flags.iter().map(|f| *f as i32).collect(),
    }
}

/// Flags an anonymous rating where the region's profile requires real-name rating.
fn flag_anonymous_where_real_name_is_required(
    state: &HubState,
    r: &mut crate::domain::ValidRating,
) {
    let (_, profile) = state.engine.profiles().for_region(r.region_code.as_str());
    if !profile.real_name_required || r.is_default {
        return;
    }
    let real = r.body.rater.as_ref().is_some_and(|x| {
        x.real_name && (!x.id_number.is_empty() || !x.phone.is_empty() || !x.credit_code.is_empty())
    });
    if !real && !r.quality_flags.contains(&pb::QualityFlag::NotRealName) {
        r.quality_flags.push(pb::QualityFlag::NotRealName);
        r.body
            .quality_flags
            .push(pb::QualityFlag::NotRealName as i32);
    }
}

/// The checks the store applies to a rating of this region from this caller.
fn checks(state: &HubState, region: &str, relay: bool) -> IngestChecks {
    let (_, profile) = state.engine.profiles().for_region(region);
    IngestChecks {
        counting: !relay,
        follow_up_limit: profile.follow_up_limit,
        follow_up_window_secs: i64::from(profile.follow_up_window_days) * 86_400,
        quality: state.limits().quality,
        per_visit: profile.staff_rating_per_visit,
    }
}

/// Validates and scope-checks a batch; returns per-item results with the refused ones filled
/// in, and the valid ones (PII sealed) ready for the store with their positions. A missing
/// rating (possible on the stream) is invalid.
fn prepare<'a>(
    state: &HubState,
    principal: &Principal,
    ratings: impl ExactSizeIterator<Item = Option<&'a pb::Rating>>,
) -> (Vec<Option<pb::ItemResult>>, Vec<(usize, NewRating)>) {
    let now = state.clock.now_micros();
    let limits = state.limits();
    let mut results = vec![None; ratings.len()];
    let mut valid = Vec::with_capacity(ratings.len());
    for (i, raw) in ratings.enumerate() {
        let Some(raw) = raw else {
            results[i] = Some(refused(
                i,
                "",
                Outcome::Invalid,
                vec![violation("rating", "is required")],
            ));
            continue;
        };
        match parse_rating(raw, now, &limits.rules, principal.has(Role::Relay)) {
            Ok(mut r) => {
                flag_anonymous_where_real_name_is_required(state, &mut r);
                if let Some(v) = out_of_scope(
                    principal,
                    r.org_credit_code.as_str(),
                    r.region_code.as_str(),
                ) {
                    results[i] = Some(refused(i, &r.source_key, Outcome::PermissionDenied, v));
                } else {
                    let name = principal.name.clone();
                    let hub_id = r.relayed_hub_id.unwrap_or_else(Uuid::now_v7);
                    let checks = checks(state, r.region_code.as_str(), r.relayed_hub_id.is_some());
                    valid.push((i, NewRating::new(hub_id, name, r, &state.pii, checks)));
                }
            }
            Err(v) => results[i] = Some(refused(i, &raw.source_key, Outcome::Invalid, v)),
        }
    }
    (results, valid)
}

async fn commit(
    state: &HubState,
    mut results: Vec<Option<pb::ItemResult>>,
    valid: Vec<(usize, NewRating)>,
) -> Result<Vec<pb::ItemResult>, Status> {
    let keys: Vec<(usize, String, Vec<pb::QualityFlag>)> = valid
        .iter()
        .map(|(i, n)| {
            (
                *i,
                n.rating.source_key.clone(),
                n.rating.quality_flags.clone(),
            )
        })
        .collect();
    let outcomes = state
        .store
        .insert_ratings(valid.into_iter().map(|(_, n)| n).collect())
        .await?;
    for ((i, key, flags), outcome) in keys.into_iter().zip(outcomes) {
        results[i] = Some(stored_result(i, key, outcome, &flags));
    }
    Ok(results.into_iter().flatten().collect())
}

fn log_results(state: &HubState, rpc: &'static str, source: &str, results: &[pb::ItemResult]) {
    state.metrics.ratings(rpc, source, results);
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o as i32).count();
    tracing::debug!(
        rpc,
        source,
        accepted = count(Outcome::Accepted),
        duplicate = count(Outcome::Duplicate),
        conflict = count(Outcome::Conflict),
        invalid = count(Outcome::Invalid),
        denied = count(Outcome::PermissionDenied),
        "Ingested."
    );
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::StreamRatingsResponse, Status>> + Send>>;

/// Accepted heads from a lower hub are kept at least this far apart in `peer_heads`.
const PEER_HEAD_HISTORY_MICROS: i64 = 3_600_000_000;
/// How far ahead of this hub's clock a lower hub's tree head may be dated.
const FUTURE_HEAD_MICROS: i64 = 10 * 60 * 1_000_000;

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn report_tree_head(
        &self,
        request: Request<pb::ReportTreeHeadRequest>,
    ) -> Result<Response<pb::ReportTreeHeadResponse>, Status> {
        use crate::tree_head::TreeHead;
        let caller = self.state.admit(&request, "ReportTreeHead", Role::Relay)?;
        let req = request.into_inner();
        let name = caller.name().to_owned();
        let Some(key) = caller.principal.log_key.clone() else {
            return Err(Status::failed_precondition(format!(
                "principal {name} has no log_key registered (principals.{name}.log_key): its \
                 tree heads cannot be checked"
            )));
        };
        let head = req
            .tree_head
            .as_ref()
            .and_then(TreeHead::from_pb)
            .ok_or_else(|| {
                bad_request(&[violation(
                    "tree_head",
                    "is required, with a 32-byte root, known hash and signature algorithms and a time",
                )])
            })?;
        // A consistency proof has at most two hashes per level of a 64-level tree: a longer
        // one is refused before anything is hashed.
        if req.consistency_proof.len() > 128 {
            return Err(bad_request(&[violation(
                "consistency_proof",
                "has more than 128 hashes",
            )]));
        }
        let proof: Option<Vec<crate::merkle::Hash>> = req
            .consistency_proof
            .iter()
            .map(|h| h.clone().try_into().ok())
            .collect();
        let proof = proof
            .ok_or_else(|| bad_request(&[violation("consistency_proof", "hashes are 32 bytes")]))?;
        // On a task of its own: a caller that goes away (a deadline, a closed connection)
        // does not release the locks before the check's writes are done.
        let state = self.state.clone();
        tokio::spawn(check_reported_head(state, name, key, head, proof, req))
            .await
            .map_err(|e| Status::internal(format!("checking the head failed: {e}")))?
            .map(Response::new)
    }

    async fn submit_ratings(
        &self,
        request: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        let caller = self.state.admit(&request, "SubmitRatings", Role::Submit)?;
        let ratings = request.into_inner().ratings;
        check_batch_size("ratings", ratings.len(), self.state.limits().max_batch)?;
        let (results, valid) = prepare(&self.state, &caller.principal, ratings.iter().map(Some));
        match caller.principal.check_ratings(valid.len() as u32) {
            Ok(()) => {}
            Err(Some(wait)) => return Err(over_quota(caller.name(), "rating", wait)),
            Err(None) => {
                return Err(bad_request(&[violation(
                    "ratings",
                    format!(
                        "{} ratings exceed principal {}'s rating burst; send smaller batches",
                        valid.len(),
                        caller.name()
                    ),
                )]));
            }
        }
        let results = commit(&self.state, results, valid).await?;
        log_results(&self.state, "SubmitRatings", caller.name(), &results);
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = AckStream;

    async fn stream_ratings(
        &self,
        request: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Self::StreamRatingsStream>, Status> {
        let caller: Caller = self.state.admit(&request, "StreamRatings", Role::Submit)?;
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let limits = state.limits();
        let (window, window_bytes) = (limits.stream_window, limits.stream_window_bytes);
        let (tx, rx) = mpsc::channel(window);
        tokio::spawn(async move {
            let principal = caller.principal.clone();
            // One commit in flight per stream; everything that arrives meanwhile (up to
            // `window`) goes into the next one. Acks therefore follow the stream's order and
            // so does the feed.
            let mut buffer: Vec<Option<pb::Rating>> = Vec::new();
            let mut buffered_bytes = 0usize;
            let mut buffered_from = 0usize;
            let mut received = 0usize;
            let mut inflight: Option<BoxFuture<'static, Result<Vec<pb::ItemResult>, Status>>> =
                None;
            let mut inbound_open = true;
            let mut inbound_error: Option<Status> = None;
            loop {
                if inflight.is_none() && !buffer.is_empty() {
                    let batch = std::mem::take(&mut buffer);
                    buffered_bytes = 0;
                    let first = buffered_from;
                    buffered_from = received;
                    let state = state.clone();
                    let principal = principal.clone();
                    inflight = Some(Box::pin(async move {
                        let (results, valid) =
                            prepare(&state, &principal, batch.iter().map(Option::as_ref));
                        let mut results = commit(&state, results, valid).await?;
                        for r in &mut results {
                            r.index += first as u32;
                        }
                        state
                            .metrics
                            .ratings("StreamRatings", &principal.name, &results);
                        Ok(results)
                    }));
                }
                tokio::select! {
                    done = async { inflight.as_mut().expect("guarded").await }, if inflight.is_some() => {
                        inflight = None;
                        match done {
                            Ok(results) => {
                                for result in results {
                                    let ack = pb::StreamRatingsResponse { result: Some(result) };
                                    if tx.send(Ok(ack)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            Err(status) => {
                                // Not committed, not acknowledged: the client resends from
                                // its first unacknowledged rating.
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                    }
                    // Backpressure: stop reading while `window` ratings (or `window_bytes`
                    // of them) wait for a commit.
                    msg = inbound.next(), if inbound_open && buffer.len() < window && buffered_bytes < window_bytes => {
                        match msg {
                            Some(Ok(m)) => {
                                // Over the rating quota a stream is slowed, not refused.
                                principal.wait_for_rating().await;
                                buffered_bytes += m.rating.as_ref().map_or(0, prost::Message::encoded_len);
                                buffer.push(m.rating);
                                received += 1;
                            }
                            Some(Err(status)) => {
                                // A message the hub cannot take (too large, undecodable) or
                                // a broken connection: nothing after it is read. The ratings
                                // before it are committed and acknowledged; then the stream
                                // ends with this error, so the client knows the rest was
                                // not taken (a clean end would say it was).
                                if let Some(suppressed) = crate::telemetry::throttle("ingest.stream_broken") {
                                    tracing::warn!(source = %principal.name, code = ?status.code(), error = status.message(), after = received, suppressed, "Rating stream ended by an inbound error.");
                                }
                                // The details (a BadRequest naming the field) stay with it.
                                inbound_error = Some(Status::with_details(
                                    status.code(),
                                    format!(
                                        "the stream's message after its first {received} ratings was not taken ({}); those {received} ratings were answered, nothing after was read",
                                        status.message(),
                                    ),
                                    status.details().to_vec().into(),
                                ));
                                inbound_open = false;
                            }
                            None => inbound_open = false,
                        }
                    }
                    else => break,
                }
            }
            if let Some(status) = inbound_error {
                let _ = tx.send(Err(status)).await;
            }
            tracing::debug!(source = %principal.name, items = received, "Rating stream finished.");
            drop(caller);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_service_cases(
        &self,
        request: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        let caller = self
            .state
            .admit(&request, "ReportServiceCases", Role::Submit)?;
        let cases = request.into_inner().cases;
        let limits = self.state.limits();
        check_batch_size("cases", cases.len(), limits.max_batch)?;
        let now = self.state.clock.now_micros();
        let mut results = vec![None; cases.len()];
        let mut valid = Vec::new();
        let mut positions = Vec::new();
        for (i, raw) in cases.iter().enumerate() {
            match parse_case(raw, now, &limits.rules) {
                Ok(case) => {
                    let (org, region) = (case.org_credit_code.as_str(), case.region_code.as_str());
                    if let Some(v) = out_of_scope(&caller.principal, org, region) {
                        results[i] =
                            Some(refused(i, &case.case_number, Outcome::PermissionDenied, v));
                        continue;
                    }
                    positions.push((i, case.case_number.clone()));
                    valid.push(NewCaseEvent::new(
                        caller.name().to_owned(),
                        case,
                        &self.state.pii,
                    ));
                }
                Err(v) => results[i] = Some(refused(i, &raw.case_number, Outcome::Invalid, v)),
            }
        }
        let outcomes = self.state.store.insert_cases(valid).await?;
        for ((i, key), outcome) in positions.into_iter().zip(outcomes) {
            let outcome = match outcome {
                CaseOutcome::Accepted => Outcome::Accepted,
                CaseOutcome::Duplicate => Outcome::Duplicate,
                CaseOutcome::Conflict => Outcome::Conflict,
            };
            results[i] = Some(pb::ItemResult {
                index: i as u32,
                source_key: key,
                outcome: outcome as i32,
                ..Default::default()
            });
        }
        let results: Vec<_> = results.into_iter().flatten().collect();
        log_results(&self.state, "ReportServiceCases", caller.name(), &results);
        Ok(Response::new(pb::ReportServiceCasesResponse { results }))
    }
}

/// Checks a lower hub's reported head against the last one accepted from it and records
/// what it found (ReportTreeHead), under the process's and the database's locks.
async fn check_reported_head(
    state: Arc<HubState>,
    name: String,
    key: crate::tree_head::PublicKey,
    head: crate::tree_head::TreeHead,
    proof: Vec<crate::merkle::Hash>,
    req: pb::ReportTreeHeadRequest,
) -> Result<pb::ReportTreeHeadResponse, Status> {
    let store = &state.store;
    // One report at a time (in this process, then across instances): each is checked
    // against the last accepted head and may become it.
    let _one = state.peer_report_lock(&name).await?;
    // And one at a time across the instances sharing the database.
    let _shared = store.peer_lock(&name).await?;
    let last = store.last_accepted_head(&name).await?;
    let (last_size, last_root, last_time, last_id) =
        last.clone().unwrap_or((0, Vec::new(), i64::MIN, 0));
    let last_root: crate::merkle::Hash = last_root.try_into().unwrap_or([0; 32]);
    let self_check = req.self_check_first_bad;
    let self_failed = req.self_check_failed || self_check > 0;
    // A head from the future (a lower hub's clock jumped, or set on purpose) would make
    // every later, smaller head look stale: refused as a finding of its own.
    let future = state.clock.now_micros() + FUTURE_HEAD_MICROS;
    let (outcome, first_bad, detail) = if !head.verify(&key) {
        (
            "bad_signature",
            0,
            "the head is not signed by the principal's registered log key".to_owned(),
        )
    } else if head.timestamp_micros > future {
        (
            "future_time",
            0,
            format!(
                "the head is dated more than {} s ahead of this hub's clock",
                FUTURE_HEAD_MICROS / 1_000_000
            ),
        )
    } else if head.size < last_size && head.timestamp_micros <= last_time {
        // An older head (another instance's, or a replay of a published one): not a
        // finding.
        return Ok(pb::ReportTreeHeadResponse {
            accepted: false,
            accepted_size: last_size,
            problem: format!(
                "stale: a head of {} ratings older than the head of {last_size} accepted",
                head.size
            ),
        });
    } else if head.size < last_size {
        // A newer, smaller head: a removal, whatever proof came with it (none can show
        // one). Before the from_size check: a lower hub restarted (or restored from a
        // backup) reports from 0, and its removal must not be refused as a bad request.
        (
            "inconsistent",
            head.size + 1,
            format!(
                "a newer head of {} ratings after the head of {last_size} accepted: \
                     positions from {} on were removed",
                head.size,
                head.size + 1
            ),
        )
    } else if req.from_size != last_size {
        return Ok(pb::ReportTreeHeadResponse {
            accepted: false,
            accepted_size: last_size,
            problem: format!(
                "from_size {} is not the size of the last head accepted from {name} \
                     ({last_size}): send the proof from it",
                req.from_size
            ),
        });
    } else if last_size > 0
        && !crate::merkle::verify_consistency(
            head.hash, last_size, head.size, &last_root, &head.root, &proof,
        )
    {
        (
            "inconsistent",
            0,
            format!(
                "the head of {} ratings does not extend the head of {last_size} accepted \
                     before: ratings among the first {last_size} were changed, removed or \
                     reordered",
                head.size
            ),
        )
    } else {
        ("accepted", 0, String::new())
    };
    // Each finding is recorded once between two accepted heads (a chain that stays
    // broken reports every interval; one that breaks again after an accepted head is a
    // new finding); the same accepted head again (a newer signature over an unchanged
    // log) is not recorded again. The counters count every report.
    let recent = store.peer_heads(Some(&name), true, 50).await?;
    // An inconsistent chain stays one finding whatever position each report names (a
    // removal's first position moves as the lower hub's log grows); a self-check finding
    // naming another position is a new one.
    // A lasting self-check failure is one finding until it names another position (the
    // lower hub reports it with every head until it checks clean), accepted heads or not.
    let seen = |outcome: &str, first_bad: u64| {
        if outcome == "self_check" {
            return recent
                .iter()
                .find(|a| a.outcome == "self_check")
                .is_some_and(|a| a.first_bad == first_bad);
        }
        recent.iter().any(|a| {
            a.id > last_id
                && a.outcome == outcome
                && (a.first_bad == first_bad || outcome == "inconsistent")
        })
    };
    let base = crate::store::PeerHead {
        id: 0,
        principal: name.clone(),
        size: head.size,
        root: head.root.to_vec(),
        head_time_micros: head.timestamp_micros,
        received_at_micros: 0,
        outcome: outcome.to_owned(),
        first_bad,
        detail: detail.clone(),
        checked_against: None,
    };
    let mut records = Vec::new();
    let mut counted = vec![outcome.to_owned()];
    let unchanged =
        outcome == "accepted" && last.is_some() && head.size == last_size && head.root == last_root;
    if outcome == "accepted" && !unchanged {
        // History is kept an hour apart: a head accepted within the hour after the last
        // one, with nothing recorded since, advances that record in place (the store
        // checks both again). A lower hub's changing head otherwise adds a row a minute.
        // (A lower hub's self-check findings in between do not count: see `seen`.)
        let latest = store.peer_heads(Some(&name), false, 50).await?;
        let advance = latest
            .iter()
            .find(|l| l.outcome != "self_check")
            .is_some_and(|l| {
                l.id == last_id
                    && l.outcome == "accepted"
                    && state.clock.now_micros() - l.received_at_micros < PEER_HEAD_HISTORY_MICROS
            });
        records.push(crate::store::PeerHead {
            id: if advance { last_id } else { 0 },
            checked_against: Some((last_id, last_size, last_root.to_vec())),
            ..base.clone()
        });
    } else if outcome != "accepted" && !seen(outcome, first_bad) {
        records.push(base.clone());
    }
    if self_failed {
        counted.push("self_check".into());
        if !seen("self_check", self_check) {
            let reason: String = req.self_check_reason.chars().take(300).collect();
            records.push(crate::store::PeerHead {
                outcome: "self_check".into(),
                first_bad: self_check,
                detail: format!(
                    "the lower hub's own check found its stored ratings differ from its log \
                         (first position {self_check}; 0: none named): {reason:?}"
                ),
                ..base.clone()
            });
        }
    }
    // Written first; counted and logged once written (a report refused or failed here is
    // sent again, and would be counted twice).
    for r in records {
        let guarded = r.checked_against.is_some();
        let alarm = (r.outcome != "accepted").then(|| (r.outcome.clone(), r.first_bad, r.size));
        let detail = r.detail.clone();
        let written = store
            .relay_write(crate::store::RelayWrite::PeerHead(r))
            .await?;
        if guarded && written == 0 {
            // The accepted head moved under this check (another instance whose lock was
            // lost): nothing of it is written; the lower hub reports again.
            return Err(Status::aborted(
                "the accepted head changed while this one was checked: report it again",
            ));
        }
        if let Some((outcome, first_bad, size)) = alarm
            && let Some(suppressed) = crate::telemetry::throttle_for("log.peer_alarm", &name)
        {
            tracing::error!(
                peer = %name,
                outcome = %outcome,
                first_bad_position = first_bad,
                size,
                detail = ?detail,
                suppressed,
                "RATING LOG ALARM: a lower hub's log does not hold together."
            );
        }
    }
    for outcome in &counted {
        state
            .metrics
            .peer_heads
            .get_or_create(&crate::metrics::PeerHeadLabels {
                peer: name.clone(),
                outcome: outcome.clone(),
            })
            .inc();
    }
    let accepted = outcome == "accepted";
    if accepted {
        // The head's own time, so a replayed head does not look like a live lower hub.
        let gauge = state
            .metrics
            .peer_last_accepted
            .get_or_create(&crate::metrics::PeerLabels { peer: name.clone() });
        gauge.set(gauge.get().max(head.timestamp_micros / 1_000_000));
    }
    Ok(pb::ReportTreeHeadResponse {
        accepted,
        accepted_size: if accepted { head.size } else { last_size },
        problem: if accepted {
            String::new()
        } else {
            format!("{outcome}: {detail}")
        },
    })
}

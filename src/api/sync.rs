//! `SyncService`: upstream platforms pulling the feed. Every call needs the pull role and
//! sees only the caller's scope.
//!
//! The feed sequence is assigned by the single writer in commit order and published (the
//! feed head) only after the commit, so every rating at or below the head is visible: a
//! reader that reads up to the head and resumes after it never skips a late-committing rating.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::query::{parse_filter, restrict_to_scope};
use super::{HubState, bad_request, page_size, violation};
use crate::auth::Role;
use crate::pb::v1 as pb;
use crate::pb::v1::sync_service_server::SyncService;
use crate::store::RatingQuery;
use crate::time::micros_from_timestamp;

/// Ratings a Subscribe reads from the store per page.
const SUBSCRIBE_PAGE: u32 = 500;
/// Longest Reconcile range.
const MAX_RECONCILE_DAYS: i64 = 400;

pub struct SyncApi {
    state: Arc<HubState>,
}

impl SyncApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }
}

/// Order-independent digest: XOR of SHA-256 over each hub id's 16 bytes.
pub fn digest(ids: &[uuid::Uuid]) -> String {
    let mut acc = [0u8; 32];
    for id in ids {
        crate::store::fold_digest(&mut acc, id);
    }
    hex::encode(acc)
}

type RatingStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

impl SyncApi {
    /// The feed position of the rating a proof is asked for, when the caller may see it.
    async fn leaf_position(
        &self,
        caller: &super::Caller,
        leaf: Option<&pb::get_inclusion_proof_request::Leaf>,
    ) -> Result<u64, Status> {
        use pb::get_inclusion_proof_request::Leaf;
        let not_found = |what: String| Status::not_found(format!("no rating {what} in your scope"));
        match leaf {
            Some(Leaf::HubId(raw)) => {
                let hub_id = uuid::Uuid::parse_str(raw.trim())
                    .map_err(|_| bad_request(&[violation("hub_id", "is not a UUID")]))?;
                let stored = self
                    .state
                    .store
                    .get_rating(hub_id)
                    .await?
                    .filter(|s| {
                        caller
                            .principal
                            .scope
                            .covers(&s.rating.org_credit_code, &s.rating.region_code)
                    })
                    .ok_or_else(|| not_found(format!("with hub_id {hub_id}")))?;
                Ok(stored.feed_seq)
            }
            Some(Leaf::FeedSequence(seq)) => {
                let seq = *seq;
                if seq == 0 {
                    return Err(bad_request(&[violation(
                        "feed_sequence",
                        "feed positions start at 1",
                    )]));
                }
                let mut query = RatingQuery {
                    max_feed_seq: Some(seq),
                    ..Default::default()
                };
                restrict_to_scope(&caller.principal, &mut query)?;
                let rows = self.state.store.list_ratings(&query, seq - 1, 1).await?;
                match rows.first() {
                    Some(r) if r.feed_seq == seq => Ok(seq),
                    _ => Err(not_found(format!("at feed position {seq}"))),
                }
            }
            None => Err(bad_request(&[violation(
                "leaf",
                "name the rating by hub_id or feed_sequence",
            )])),
        }
    }
}

fn log_status(e: crate::tree_head::LogError) -> Status {
    match e {
        crate::tree_head::LogError::Store(e) => e.into(),
        crate::tree_head::LogError::Proof(crate::merkle::ProofError::Range(m)) => {
            Status::out_of_range(m)
        }
        e => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl SyncService for SyncApi {
    async fn get_tree_head(
        &self,
        request: Request<pb::GetTreeHeadRequest>,
    ) -> Result<Response<pb::GetTreeHeadResponse>, Status> {
        let _caller = self.state.admit(&request, "GetTreeHead", Role::Pull)?;
        let log = &self.state.log;
        let head = if request.get_ref().fresh {
            log.sign_now().await
        } else {
            log.latest().await
        }
        .map_err(log_status)?;
        Ok(Response::new(pb::GetTreeHeadResponse {
            tree_head: Some(head.to_pb()),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let caller = self
            .state
            .admit(&request, "GetInclusionProof", Role::Pull)?;
        let req = request.into_inner();
        let seq = self.leaf_position(&caller, req.leaf.as_ref()).await?;
        let log = &self.state.log;
        let (size, root, head) = if req.tree_size == 0 {
            let head = log.latest().await.map_err(log_status)?;
            if head.size < seq {
                // Signed before this rating: a head that covers it.
                let head = log.sign_now().await.map_err(log_status)?;
                (head.size, head.root, Some(head))
            } else {
                (head.size, head.root, Some(head))
            }
        } else {
            if req.tree_size > log.size() {
                return Err(Status::out_of_range(format!(
                    "tree_size {} is beyond the log's {} ratings",
                    req.tree_size,
                    log.size()
                )));
            }
            let root = log.root(req.tree_size).await.map_err(log_status)?;
            (req.tree_size, root, None)
        };
        if seq > size {
            return Err(Status::out_of_range(format!(
                "the rating at feed position {seq} is not in the tree of {size}"
            )));
        }
        let (leaf, path) = log.inclusion(seq - 1, size).await.map_err(log_status)?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            feed_sequence: seq,
            leaf_hash: leaf.to_vec(),
            audit_path: path.iter().map(|h| h.to_vec()).collect(),
            tree_size: size,
            root_hash: root.to_vec(),
            tree_head: head.map(|h| h.to_pb()),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let _caller = self
            .state
            .admit(&request, "GetConsistencyProof", Role::Pull)?;
        let req = request.into_inner();
        let log = &self.state.log;
        let (second, second_root, head) = if req.second == 0 {
            let head = log.latest().await.map_err(log_status)?;
            (head.size, head.root, Some(head))
        } else {
            if req.second > log.size() {
                return Err(Status::out_of_range(format!(
                    "second ({}) is beyond the log's {} ratings",
                    req.second,
                    log.size()
                )));
            }
            let root = log.root(req.second).await.map_err(log_status)?;
            (req.second, root, None)
        };
        if req.first == 0 || req.first > second {
            return Err(bad_request(&[violation(
                "first",
                format!("must be 1 to {second} (the second tree's size)"),
            )]));
        }
        let proof = log
            .consistency(req.first, second)
            .await
            .map_err(log_status)?;
        let first_root = log.root(req.first).await.map_err(log_status)?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            proof: proof.iter().map(|h| h.to_vec()).collect(),
            first: req.first,
            first_root: first_root.to_vec(),
            second,
            second_root: second_root.to_vec(),
            tree_head: head.map(|h| h.to_pb()),
        }))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let caller = self.state.admit(&request, "Pull", Role::Pull)?;
        let req = request.into_inner();
        let limit = page_size(req.limit, 100, 1000)?;
        let head = *self.state.store.feed_head().borrow();
        let mut query = RatingQuery {
            max_feed_seq: Some(head),
            ..Default::default()
        };
        restrict_to_scope(&caller.principal, &mut query)?;
        let rows = self
            .state
            .store
            .list_ratings(&query, req.after_sequence, limit)
            .await?;
        // A short page means everything up to the head was scanned (the rest was out of scope).
        let next = match rows.last() {
            Some(last) if rows.len() == limit as usize => last.feed_seq,
            _ => head.max(req.after_sequence),
        };
        let ratings = self.state.reveal(&caller, "Pull", rows).await?;
        Ok(Response::new(pb::PullResponse {
            ratings,
            next_after_sequence: next,
            head_sequence: head,
        }))
    }

    type SubscribeStream = RatingStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.state.admit(&request, "Subscribe", Role::Pull)?;
        let mut cursor = request.into_inner().after_sequence;
        let mut query = RatingQuery::default();
        restrict_to_scope(&caller.principal, &mut query)?;
        let state = self.state.clone();
        // A small channel: the subscriber's reading pace is the stream's pace.
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut head = state.store.feed_head();
            let mut stopping = state.stopping.clone();
            loop {
                let head_seq = *head.borrow_and_update();
                if cursor < head_seq {
                    query.max_feed_seq = Some(head_seq);
                    let rows = match state
                        .store
                        .list_ratings(&query, cursor, SUBSCRIBE_PAGE)
                        .await
                    {
                        Ok(rows) => rows,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    let full_page = rows.len() == SUBSCRIBE_PAGE as usize;
                    let next = match rows.last() {
                        Some(last) if full_page => last.feed_seq,
                        _ => head_seq,
                    };
                    let ratings = match state.reveal(&caller, "Subscribe", rows).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    for rating in ratings {
                        if tx
                            .send(Ok(pb::SubscribeResponse {
                                rating: Some(rating),
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    cursor = next;
                    continue;
                }
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { break },
                    _ = stopping.changed() => break,
                    _ = tx.closed() => return,
                }
            }
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "the hub is shutting down; subscribe again after sequence {cursor}"
                ))))
                .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_invitations(
        &self,
        request: Request<pb::ListInvitationsRequest>,
    ) -> Result<Response<pb::ListInvitationsResponse>, Status> {
        let caller = self.state.admit(&request, "ListInvitations", Role::Pull)?;
        let req = request.into_inner();
        let limit = page_size(req.limit, 100, 1000)?;
        let mut query = RatingQuery::default();
        restrict_to_scope(&caller.principal, &mut query)?;
        let rows = self
            .state
            .store
            .list_invitations(query.scope.as_ref(), req.after_id, limit)
            .await?;
        let unmasked = caller.principal.has(Role::ReadPii);
        let mut audited = Vec::new();
        let mut invitations = Vec::with_capacity(rows.len());
        for row in rows {
            let mut case = row.case;
            if let Some(sealed) = &row.pii {
                let aad = crate::store::case_aad(&row.source_system, &case.case_number, case.event);
                self.state.pii.reveal_persons(
                    case.applicant.as_mut(),
                    case.agent.as_mut(),
                    sealed,
                    &aad,
                    unmasked,
                )?;
                if unmasked {
                    audited.push(invitation_audit_id(row.id));
                }
            }
            invitations.push(pb::Invitation {
                id: row.id,
                source_system: row.source_system,
                service_case: Some(case),
                due_at: Some(crate::time::timestamp_from_micros(row.due_at_micros)),
                created_at: Some(crate::time::timestamp_from_micros(row.created_at_micros)),
            });
        }
        self.state
            .store
            .record_pii_access(caller.name(), "ListInvitations", &audited)
            .await?;
        let next_after_id = invitations.last().map_or(req.after_id, |i| i.id);
        Ok(Response::new(pb::ListInvitationsResponse {
            invitations,
            next_after_id,
        }))
    }

    async fn reconcile(
        &self,
        request: Request<pb::ReconcileRequest>,
    ) -> Result<Response<pb::ReconcileResponse>, Status> {
        let caller = self.state.admit(&request, "Reconcile", Role::Pull)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        let from = req.rated_from.as_ref().and_then(micros_from_timestamp);
        let until = req.rated_until.as_ref().and_then(micros_from_timestamp);
        if from.is_none() {
            v.push(violation("rated_from", "is required"));
        }
        if until.is_none() {
            v.push(violation("rated_until", "is required"));
        }
        if let (Some(f), Some(u)) = (from, until) {
            if u <= f {
                v.push(violation("rated_until", "must be later than rated_from"));
            } else if i128::from(u) - i128::from(f)
                > i128::from(MAX_RECONCILE_DAYS) * 86_400 * 1_000_000
            {
                // i128: extreme timestamps must not wrap past the limit.
                v.push(violation(
                    "rated_until",
                    format!("the range may span at most {MAX_RECONCILE_DAYS} days"),
                ));
            }
        }
        let filter = pb::RatingFilter {
            org_credit_code: req.org_credit_code.clone(),
            region_code_prefix: req.region_code_prefix.clone(),
            ..Default::default()
        };
        let mut query = match parse_filter(Some(&filter)) {
            Ok(q) => q,
            Err(mut fv) => {
                for x in &mut fv {
                    x.field = x.field.trim_start_matches("filter.").to_owned();
                }
                v.extend(fv);
                RatingQuery::default()
            }
        };
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        query.rated_from_micros = from;
        query.rated_until_micros = until;
        restrict_to_scope(&caller.principal, &mut query)?;
        let groups = self.state.store.day_org_digests(&query).await?;
        Ok(Response::new(pb::ReconcileResponse {
            entries: groups
                .into_iter()
                .map(|g| pb::ReconcileEntry {
                    count: g.count,
                    digest: hex::encode(g.digest),
                    day: g.day,
                    org_credit_code: g.org_credit_code,
                })
                .collect(),
        }))
    }
}

/// The audit trail names records by UUID; an invitation's is its id in the last 8 bytes.
pub fn invitation_audit_id(id: u64) -> uuid::Uuid {
    uuid::Uuid::from_u64_pair(0, id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_order_and_sees_every_id() {
        let a = uuid::Uuid::now_v7();
        let b = uuid::Uuid::now_v7();
        assert_eq!(digest(&[a, b]), digest(&[b, a]));
        assert_ne!(digest(&[a, b]), digest(&[a]));
        assert_eq!(digest(&[]), "0".repeat(64));
    }
}

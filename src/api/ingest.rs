//! `IngestService`: ratings and 办件 events in. Every item is validated on the caller's task,
//! then committed by the store's group-commit writer; results come back only after commit.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::{HubState, bad_request, field_violations, violation};
use crate::domain::{parse_case, parse_rating};
use crate::pb::v1 as pb;
use crate::pb::v1::ingest_service_server::IngestService;
use crate::store::{CaseOutcome, InsertOutcome, NewCaseEvent, NewRating};
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

fn invalid(
    index: usize,
    source_key: &str,
    violations: Vec<crate::domain::Violation>,
) -> pb::ItemResult {
    pb::ItemResult {
        index: index as u32,
        source_key: source_key.to_owned(),
        outcome: Outcome::Invalid as i32,
        violations: field_violations(violations),
        ..Default::default()
    }
}

fn stored_result(
    index: usize,
    source_key: String,
    outcome: InsertOutcome,
    flags: &[pb::QualityFlag],
) -> pb::ItemResult {
    let (outcome, hub_id, feed_seq, flags) = match outcome {
        InsertOutcome::Accepted { hub_id, feed_seq } => {
            (Outcome::Accepted, hub_id, feed_seq, flags)
        }
        InsertOutcome::Duplicate { hub_id, feed_seq } => {
            (Outcome::Duplicate, hub_id, feed_seq, flags)
        }
        InsertOutcome::Conflict { hub_id, feed_seq } => {
            (Outcome::Conflict, hub_id, feed_seq, &[][..])
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

/// Validates a batch; returns per-item results with the invalid ones filled in, and the
/// valid ones ready for the store with their positions. A missing rating (possible on the
/// stream) is invalid.
fn prepare<'a>(
    state: &HubState,
    source: &str,
    ratings: impl ExactSizeIterator<Item = Option<&'a pb::Rating>>,
) -> (Vec<Option<pb::ItemResult>>, Vec<(usize, NewRating)>) {
    let now = state.clock.now_micros();
    let mut results = vec![None; ratings.len()];
    let mut valid = Vec::with_capacity(ratings.len());
    for (i, raw) in ratings.enumerate() {
        let Some(raw) = raw else {
            results[i] = Some(invalid(i, "", vec![violation("rating", "is required")]));
            continue;
        };
        match parse_rating(raw, now, &state.rules) {
            Ok(r) => valid.push((i, NewRating::new(Uuid::now_v7(), source.to_owned(), r))),
            Err(v) => results[i] = Some(invalid(i, &raw.source_key, v)),
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

fn log_results(rpc: &'static str, source: &str, results: &[pb::ItemResult]) {
    let count = |o: Outcome| results.iter().filter(|r| r.outcome == o as i32).count();
    tracing::debug!(
        rpc,
        source,
        accepted = count(Outcome::Accepted),
        duplicate = count(Outcome::Duplicate),
        conflict = count(Outcome::Conflict),
        invalid = count(Outcome::Invalid),
        "Ingested."
    );
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::StreamRatingsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IngestService for IngestApi {
    async fn submit_ratings(
        &self,
        request: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        let source = self.state.source_system(&request)?;
        let ratings = request.into_inner().ratings;
        check_batch_size("ratings", ratings.len(), self.state.max_batch)?;
        let (results, valid) = prepare(&self.state, &source, ratings.iter().map(Some));
        let results = commit(&self.state, results, valid).await?;
        log_results("SubmitRatings", &source, &results);
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = AckStream;

    async fn stream_ratings(
        &self,
        request: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Self::StreamRatingsStream>, Status> {
        let source = self.state.source_system(&request)?;
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let window = state.stream_window;
        let (tx, rx) = mpsc::channel(window);
        tokio::spawn(async move {
            // One commit in flight per stream; everything that arrives meanwhile (up to
            // `window`) goes into the next one. Acks therefore follow the stream's order and
            // so does the feed.
            let mut buffer: Vec<Option<pb::Rating>> = Vec::new();
            let mut buffered_from = 0usize;
            let mut received = 0usize;
            let mut inflight: Option<BoxFuture<'static, Result<Vec<pb::ItemResult>, Status>>> =
                None;
            let mut inbound_open = true;
            loop {
                if inflight.is_none() && !buffer.is_empty() {
                    let batch = std::mem::take(&mut buffer);
                    let first = buffered_from;
                    buffered_from = received;
                    let state = state.clone();
                    let source = source.clone();
                    inflight = Some(Box::pin(async move {
                        let (results, valid) =
                            prepare(&state, &source, batch.iter().map(Option::as_ref));
                        let mut results = commit(&state, results, valid).await?;
                        for r in &mut results {
                            r.index += first as u32;
                        }
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
                    // Backpressure: stop reading while `window` ratings wait for a commit.
                    msg = inbound.next(), if inbound_open && buffer.len() < window => {
                        match msg {
                            Some(Ok(m)) => {
                                buffer.push(m.rating);
                                received += 1;
                            }
                            Some(Err(status)) => {
                                tracing::debug!(source, code = ?status.code(), "Rating stream broken by the client.");
                                inbound_open = false;
                            }
                            None => inbound_open = false,
                        }
                    }
                    else => break,
                }
            }
            tracing::debug!(source, items = received, "Rating stream finished.");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_service_cases(
        &self,
        request: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        let source = self.state.source_system(&request)?;
        let cases = request.into_inner().cases;
        check_batch_size("cases", cases.len(), self.state.max_batch)?;
        let now = self.state.clock.now_micros();
        let mut results = vec![None; cases.len()];
        let mut valid = Vec::new();
        let mut positions = Vec::new();
        for (i, raw) in cases.iter().enumerate() {
            match parse_case(raw, now, &self.state.rules) {
                Ok(case) => {
                    positions.push((i, case.case_number.clone()));
                    valid.push(NewCaseEvent {
                        source_system: source.clone(),
                        case,
                    });
                }
                Err(v) => results[i] = Some(invalid(i, &raw.case_number, v)),
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
        log_results("ReportServiceCases", &source, &results);
        Ok(Response::new(pb::ReportServiceCasesResponse { results }))
    }
}

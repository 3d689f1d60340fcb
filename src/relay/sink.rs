//! What every sink kind implements: send a batch, say per rating whether it was delivered or
//! rejected for good, or say the whole request failed and should be retried.

use async_trait::async_trait;

use crate::pb::v1 as pb;

/// The upstream's answer for one rating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Stored upstream (including "already exists").
    Delivered,
    /// Rejected for good, with the upstream's error text: becomes a dead letter.
    Rejected(String),
}

/// The request as a whole failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying (unreachable, unavailable, timeout, overloaded…).
    #[error("{0}")]
    Retryable(String),
    /// Configured as permanent: every rating of the batch is rejected with this text.
    #[error("{0}")]
    Permanent(String),
    /// The upstream answered, but not in a form that says what became of each rating (a
    /// result list longer or shorter than the batch, results out of order). Never taken for
    /// a success: retried a few times, then every rating of the batch is dead-lettered.
    #[error("{0}")]
    Malformed(String),
    /// The answer is about the whole request and does not say which of its records it means
    /// (an http-json "已存在" said of a request of several records): the relay sends each
    /// record again on its own, through the upstream's rate limits.
    #[error("{0}")]
    Ambiguous(String),
}

/// A 办件 event on its way upstream (the applicant's and agent's data included).
#[derive(Debug, Clone)]
pub struct CaseRecord {
    /// The event's id in the hub (the case cursor's unit).
    pub id: u64,
    pub source_system: String,
    pub case: pb::ServiceCase,
}

/// A rating update on its way upstream: the rating (its rater's data included) and why it
/// left the scores (`reason`: the `AppealOutcome` number, or the superseded-default code).
#[derive(Debug, Clone)]
pub struct UpdateRecord {
    /// The update's sequence in the hub (the update cursor's unit).
    pub seq: u64,
    pub reason: i32,
    pub at_micros: i64,
    pub rating: pb::Rating,
}

#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Sends ratings (personal data included: upstreams are entitled to it) and returns one
    /// `Delivery` per rating, in order.
    async fn send(&self, ratings: &[pb::Rating]) -> Result<Vec<Delivery>, SendError>;

    /// Reports this hub's rating log head to the upstream (another rating-hub). `Ok(None)`:
    /// this upstream takes no heads.
    async fn report_head(
        &self,
        _report: pb::ReportTreeHeadRequest,
    ) -> Result<Option<pb::ReportTreeHeadResponse>, SendError> {
        Ok(None)
    }

    /// Whether this upstream takes 办件 records (each sent before any rating of its case).
    fn relays_cases(&self) -> bool {
        false
    }

    /// Whether this 办件 record is one the upstream takes (false: passed over, the cursor
    /// moves past it without a send and without rate-limit tokens).
    fn wants_case(&self, _case: &CaseRecord) -> bool {
        true
    }

    /// Whether this rating update is one the upstream takes.
    fn wants_update(&self, _update: &UpdateRecord) -> bool {
        true
    }

    /// Sends 办件 records; one `Delivery` per record, in order. Only called when
    /// `relays_cases`.
    async fn send_cases(&self, cases: &[CaseRecord]) -> Result<Vec<Delivery>, SendError> {
        Err(SendError::Permanent(format!(
            "this upstream takes no 办件 records ({} offered)",
            cases.len()
        )))
    }

    /// Whether this upstream takes rating updates (a rating found invalid or malicious on
    /// appeal, a default rating the rater's own replaced), each after its rating.
    fn relays_updates(&self) -> bool {
        false
    }

    /// Sends rating updates; one `Delivery` per update, in order. Only called when
    /// `relays_updates`.
    async fn send_updates(&self, updates: &[UpdateRecord]) -> Result<Vec<Delivery>, SendError> {
        Err(SendError::Permanent(format!(
            "this upstream takes no rating updates ({} offered)",
            updates.len()
        )))
    }
}

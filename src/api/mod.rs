//! The gRPC edge: one file per service, plus the pieces every service shares — the caller's
//! identity, and the one mapping from errors to `tonic::Status`.

pub mod ingest;
pub mod query;

use std::sync::Arc;

use tonic::{Code, Request, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::clock::Clock;
use crate::domain::{IngestRules, Violation};
use crate::pb::v1 as pb;
use crate::store::{Store, StoreError};

/// What every service needs: the store, the rules and limits, the clock.
pub struct HubState {
    pub store: Arc<dyn Store>,
    pub rules: IngestRules,
    pub clock: Arc<dyn Clock>,
    pub max_batch: usize,
    pub stream_window: usize,
    /// Source system of callers on a plaintext listener (no certificate to read).
    pub plaintext_source_system: String,
}

impl HubState {
    /// The caller's source system. It comes from the connection, never from the message.
    pub fn source_system<T>(&self, _req: &Request<T>) -> Result<String, Status> {
        Ok(self.plaintext_source_system.clone())
    }
}

/// INVALID_ARGUMENT with a google.rpc.BadRequest detail listing every violation.
pub fn bad_request(violations: &[Violation]) -> Status {
    let mut details = ErrorDetails::new();
    for v in violations {
        details.add_bad_request_violation(v.field.clone(), v.description.clone());
    }
    let summary = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    Status::with_error_details(Code::InvalidArgument, summary, details)
}

pub fn violation(field: impl Into<String>, description: impl Into<String>) -> Violation {
    Violation {
        field: field.into(),
        description: description.into(),
    }
}

pub fn field_violations(violations: Vec<Violation>) -> Vec<pb::FieldViolation> {
    violations
        .into_iter()
        .map(|v| pb::FieldViolation {
            field: v.field,
            description: v.description,
        })
        .collect()
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::ShuttingDown => Status::unavailable(
                "the hub is shutting down; retry against another instance or later",
            ),
            other => {
                tracing::error!(error = %other, "Store failure.");
                Status::internal("storage failure; nothing was acknowledged, retry later")
            }
        }
    }
}

//! `RectificationService`: the 差评工单 workflow and appeals, scoped by principal. The rules
//! of the workflow live in `rules::bad_case`; this file checks callers and inputs.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::query::restrict_to_scope;
use super::{Caller, HubState, bad_request, page_size, violation};
use crate::auth::Role;
use crate::domain::Violation;
use crate::pb::v1 as pb;
use crate::pb::v1::rectification_service_server::RectificationService;
use crate::rules::bad_case::{self, CaseView};
use crate::store::{CaseEntryRecord, RatingQuery, RelayWrite, StoredBadCase};
use crate::time::{micros_from_timestamp, timestamp_from_micros};
use pb::{AppealOutcome, CaseAction};

const NOTE_MAX: usize = 2000;
const REFS_MAX: usize = 20;
const REF_MAX: usize = 200;

pub struct RectificationApi {
    state: Arc<HubState>,
}

impl RectificationApi {
    pub fn new(state: Arc<HubState>) -> Self {
        Self { state }
    }

    fn view(&self, case: &StoredBadCase) -> (String, CaseView) {
        let engine = &self.state.engine;
        let (name, profile) = engine.profiles().for_region(&case.region_code);
        let v = bad_case::view(
            case,
            profile,
            &engine.calendar(),
            self.state.clock.now_micros(),
        );
        (name.to_owned(), v)
    }

    fn to_pb(&self, case: &StoredBadCase, with_history: bool) -> pb::BadRatingCase {
        let (profile, v) = self.view(case);
        pb::BadRatingCase {
            id: case.id,
            hub_id: case.hub_id.to_string(),
            org_credit_code: case.org_credit_code.clone(),
            region_code: case.region_code.clone(),
            profile,
            opened_at: Some(timestamp_from_micros(case.opened_at_micros)),
            status: v.status as i32,
            contact_deadline: v.contact_deadline.map(timestamp_from_micros),
            rectify_deadline: v.rectify_deadline.map(timestamp_from_micros),
            appeal_deadline: v.appeal_deadline.map(timestamp_from_micros),
            overdue: v.overdue,
            overdue_reason: v.overdue_reason,
            deadline_provisional: v.deadline_provisional,
            appeal_outcome: v.appeal_outcome as i32,
            appeal_pending: v.appeal_pending,
            spot_check_selected: v.spot_check_selected,
            rectify_deadline_undeclared: v.declared_mode
                && !v.declared
                && matches!(v.status, pb::CaseStatus::Open | pb::CaseStatus::Contacted)
                && !matches!(
                    v.appeal_outcome,
                    AppealOutcome::Invalid | AppealOutcome::Malicious
                ),
            appeal_raised_by_rater: v.appeal_by_rater,
            real_name: case.real_name,
            history: if with_history {
                case.entries
                    .iter()
                    .map(|e| pb::CaseEntry {
                        action: e.action,
                        actor: e.actor.clone(),
                        at: Some(timestamp_from_micros(e.at_micros)),
                        note: e.note.clone(),
                        evidence_refs: e.evidence_refs.clone(),
                        new_deadline: e.new_deadline_micros.map(timestamp_from_micros),
                        appeal_outcome: e.appeal_outcome,
                        contacted_by: e.contacted_by.clone(),
                        raised_by_rater: e.by_rater,
                    })
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// The case, if it exists and is inside the caller's scope.
    async fn case_for(&self, caller: &Caller, id: u64) -> Result<StoredBadCase, Status> {
        let case = self
            .state
            .store
            .get_bad_case(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no bad-rating case {id}")))?;
        if !caller
            .principal
            .scope
            .covers(&case.org_credit_code, &case.region_code)
        {
            if let Some(suppressed) =
                crate::telemetry::throttle_for("api.denied_scope_case", caller.name())
            {
                tracing::warn!(
                    principal = caller.name(),
                    case = id,
                    suppressed,
                    "Denied: case outside scope."
                );
            }
            self.state.metrics.denied("scope");
            return Err(Status::permission_denied(format!(
                "case {id} (organisation {}) is outside the scope of principal {}",
                case.org_credit_code,
                caller.name()
            )));
        }
        Ok(case)
    }

    /// An extension (延期): the rated organisation sets its own new deadline once, before the
    /// current one has passed (Ordos: "不能及时整改的应明确整改措施和完成时限" — the unit
    /// declares it); any further extension is the authority's (the `admin` role) to grant.
    /// The new deadline is later than the current one.
    fn check_extension(
        &self,
        caller: &Caller,
        case: &StoredBadCase,
        v: &CaseView,
        new: i64,
    ) -> Result<(), Status> {
        if v.extensions >= 1 && !caller.principal.has(Role::Admin) {
            return Err(Status::failed_precondition(format!(
                "case {}: cannot record EXTEND: the case was already extended once; a further \
                 extension is granted by the authority (admin role)",
                case.id
            )));
        }
        if v.rectify_deadline.is_some_and(|current| new <= current) {
            return Err(bad_request(&[violation(
                "new_deadline",
                "must be later than the current rectification deadline",
            )]));
        }
        Ok(())
    }

    /// The rules a profile adds to a step: who may contact the rater, what an appeal needs,
    /// who raises an invalid rating, when a declared deadline may fall.
    async fn check_profile_rules(
        &self,
        caller: &Caller,
        case: &StoredBadCase,
        profile_name: &str,
        v: &CaseView,
        entry: &CaseEntryRecord,
        now: i64,
    ) -> Result<(), Status> {
        let profiles = self.state.engine.profiles();
        let (_, profile) = profiles.for_region(&case.region_code);
        let next = CaseAction::try_from(entry.action).unwrap_or_default();
        match next {
            CaseAction::Contact if profile.contact_not_by_rated_staff => {
                if entry.contacted_by.is_empty() {
                    return Err(bad_request(&[violation(
                        "contacted_by",
                        format!(
                            "is required under the {profile_name} profile: name who spoke with \
                             the rater (the rated staff member may not: 不得由被评价人与评价人直接沟通)"
                        ),
                    )]));
                }
                let rated = self
                    .state
                    .store
                    .get_rating(case.hub_id)
                    .await?
                    .map(|r| r.rating.staff_id)
                    .unwrap_or_default();
                if !rated.is_empty() && same_staff_id(&rated, &entry.contacted_by) {
                    return Err(Status::failed_precondition(format!(
                        "case {}: cannot record CONTACT: staff member {rated:?} was rated in \
                         this 差评 and may not contact the rater under the {profile_name} profile \
                         (不得由被评价人与评价人直接沟通); someone else contacts them",
                        case.id
                    )));
                }
            }
            CaseAction::Appeal
                if profile.appeal_requires_evidence
                    && !entry.by_rater
                    && entry.evidence_refs.is_empty()
                    && !case
                        .entries
                        .iter()
                        .any(|e| e.action == CaseAction::Evidence as i32) =>
            {
                return Err(bad_request(&[violation(
                    "evidence_refs",
                    format!(
                        "the {profile_name} profile requires evidence with an appeal \
                         (提供举证材料): give references, or attach files to the case \
                         (UploadEvidence) before filing"
                    ),
                )]));
            }
            CaseAction::AppealDecision
                if profile.invalid_raised_by_rater
                    && entry.appeal_outcome == AppealOutcome::Invalid as i32
                    && v.appeal_pending
                    && !v.appeal_by_rater =>
            {
                return Err(Status::failed_precondition(format!(
                    "case {}: cannot decide INVALID: under the {profile_name} profile an invalid \
                     rating is raised by the rater (须由评价主体提出), and this appeal is the rated \
                     unit's; decide UPHELD or MALICIOUS, or register the rater's own claim \
                     (FileAppeal with raised_by_rater)",
                    case.id
                )));
            }
            CaseAction::AppealDecision
                if v.appeal_by_rater && entry.appeal_outcome == AppealOutcome::Malicious as i32 =>
            {
                return Err(Status::failed_precondition(format!(
                    "case {}: cannot decide MALICIOUS on the rater's own claim: it is decided \
                     INVALID (the rating was not the rater's will) or UPHELD",
                    case.id
                )));
            }
            CaseAction::DeclareDeadline if entry.new_deadline_micros.is_some_and(|d| d <= now) => {
                return Err(bad_request(&[violation(
                    "new_deadline",
                    "a declared deadline is in the future",
                )]));
            }
            // The unit's own deadline, declared or then extended once, stays within the cap
            // where the unit sets it; further is the authority's.
            CaseAction::DeclareDeadline | CaseAction::Extend
                if profile.rectify_deadline_declared && !caller.principal.has(Role::Admin) =>
            {
                let days = profile.declared_deadline_max_working_days.unwrap_or(60);
                let calendar = self.state.engine.calendar();
                if let (Ok(max), Some(d)) = (
                    calendar.deadline(case.opened_at_micros, days),
                    entry.new_deadline_micros,
                ) && d > max.at
                {
                    return Err(bad_request(&[violation(
                        "new_deadline",
                        format!(
                            "the unit declares a deadline at most {days} working days after the \
                             case opened (by {}); a later one is the authority's (admin role) to set",
                            crate::time::format_cst_micros(max.at)
                        ),
                    )]));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the step against the case's history and appends it.
    async fn append(
        &self,
        caller: &Caller,
        id: u64,
        entry: CaseEntryRecord,
        exclude: bool,
    ) -> Result<pb::BadRatingCase, Status> {
        let case = self.case_for(caller, id).await?;
        let (profile_name, mut v) = self.view(&case);
        let next = CaseAction::try_from(entry.action).unwrap_or_default();
        let now = self.state.clock.now_micros();
        if next == CaseAction::Appeal {
            // The appeal window is the rated unit's (Ordos 第十七条); the rater's own claim
            // has none. One appeal that left the rating standing does not bar the other
            // party's: a unit's UPHELD appeal, the rater's claim; a rater's UPHELD claim, the
            // unit's appeal (within its window).
            if entry.by_rater {
                v.appeal_deadline = None;
            }
            if v.appeal_outcome == AppealOutcome::Upheld && v.appeal_by_rater != entry.by_rater {
                v.appeal_outcome = AppealOutcome::Unspecified;
            }
        }
        // The authority may still set a deadline the unit failed to declare in time.
        if next == CaseAction::DeclareDeadline && caller.principal.has(Role::Admin) {
            v.declare_by = None;
        }
        if let Some(why) = bad_case::refuse(&case, &v, next, now) {
            return Err(Status::failed_precondition(format!(
                "case {id}: cannot record {}: {why}",
                next.as_str_name()
            )));
        }
        self.check_profile_rules(caller, &case, &profile_name, &v, &entry, now)
            .await?;
        if next == CaseAction::Extend {
            self.check_extension(
                caller,
                &case,
                &v,
                entry.new_deadline_micros.unwrap_or_default(),
            )?;
        }
        let exclude = exclude.then_some((case.hub_id, entry.appeal_outcome));
        let written = self
            .state
            .store
            .relay_write(RelayWrite::CaseEntry {
                case_id: id,
                expected_entries: case.entries.len() as u64,
                entry,
                exclude,
            })
            .await?;
        if written == 0 {
            return Err(Status::new(
                Code::Aborted,
                format!("case {id} changed while this step was recorded; read it again and retry"),
            ));
        }
        tracing::info!(
            principal = caller.name(),
            case = id,
            action = next.as_str_name(),
            "Case step recorded."
        );
        let case = self.case_for(caller, id).await?;
        Ok(self.to_pb(&case, true))
    }
}

/// A free-text field of a case step (or the authority's notes): trimmed, required when asked,
/// at most `NOTE_MAX` characters, no control characters but line breaks and tabs.
pub(crate) fn check_text(
    v: &mut Vec<Violation>,
    field: &str,
    text: &str,
    required: bool,
) -> String {
    let t = text.trim();
    if required && t.is_empty() {
        v.push(violation(field, "is required"));
    } else if t.chars().count() > NOTE_MAX {
        v.push(violation(
            field,
            format!("is longer than {NOTE_MAX} characters"),
        ));
    } else if t
        .chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        // A NUL cannot be stored (PostgreSQL refuses it in text); others forge lines.
        v.push(violation(
            field,
            "contains control characters (only line breaks and tabs are allowed)",
        ));
    }
    t.to_owned()
}

fn check_refs(v: &mut Vec<Violation>, refs: &[String], required: bool) -> Vec<String> {
    if required && refs.iter().all(|r| r.trim().is_empty()) {
        v.push(violation(
            "evidence_refs",
            "at least one evidence reference is required",
        ));
    }
    if refs.len() > REFS_MAX {
        v.push(violation(
            "evidence_refs",
            format!("at most {REFS_MAX} references"),
        ));
    }
    if refs
        .iter()
        .any(|r| r.chars().count() > REF_MAX || r.chars().any(char::is_control))
    {
        v.push(violation(
            "evidence_refs",
            format!(
                "each reference is one line of at most {REF_MAX} characters, without control characters"
            ),
        ));
    }
    refs.iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect()
}

type CaseStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::WatchCasesResponse, Status>> + Send>,
>;

type EvidenceStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::DownloadEvidenceResponse, Status>> + Send>,
>;

/// Whether two staff ids name the same person: case, surrounding space and full-width forms
/// ("Ｓ００７") do not make another one.
fn same_staff_id(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
                '\u{3000}' => ' ',
                c => c,
            })
            .collect::<String>()
            .trim()
            .to_ascii_lowercase()
    };
    norm(a) == norm(b)
}

/// Bytes per message of a download.
const EVIDENCE_CHUNK: usize = 256 * 1024;
/// Longest wait for the next message of an upload.
const EVIDENCE_MESSAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// Longest a whole upload may take.
const EVIDENCE_UPLOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

fn evidence_pb(e: &crate::store::EvidenceRecord) -> pb::EvidenceFile {
    pb::EvidenceFile {
        sha256: e.sha256.clone(),
        file_name: e.file_name.clone(),
        content_type: e.content_type.clone(),
        size: e.size,
        attached_by: e.attached_by.clone(),
        attached_at: Some(timestamp_from_micros(e.attached_at_micros)),
    }
}

#[tonic::async_trait]
impl RectificationService for RectificationApi {
    type WatchCasesStream = CaseStream;
    type DownloadEvidenceStream = EvidenceStream;

    async fn upload_evidence(
        &self,
        request: Request<tonic::Streaming<pb::UploadEvidenceRequest>>,
    ) -> Result<Response<pb::UploadEvidenceResponse>, Status> {
        use crate::domain::evidence;
        use pb::upload_evidence_request::Part;
        let caller = self
            .state
            .admit(&request, "UploadEvidence", Role::Rectify)?;
        let mut stream = request.into_inner();
        // The header within the same wait as any chunk: a stream that sends nothing holds no
        // call slot for long.
        let first = tokio::time::timeout(EVIDENCE_MESSAGE_WAIT, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no header within a minute"))??;
        let header = match first {
            Some(pb::UploadEvidenceRequest {
                part: Some(Part::Header(h)),
            }) => h,
            _ => {
                return Err(bad_request(&[violation(
                    "header",
                    "the first message must be the header (case_id, file_name)",
                )]));
            }
        };
        let mut v = Vec::new();
        if header.case_id == 0 {
            v.push(violation("header.case_id", "is required"));
        }
        if let Some(why) = evidence::bad_file_name(&header.file_name) {
            v.push(violation("header.file_name", why));
        }
        // Scans are often named after the person ("张三_身份证_5301….jpg"): the name is kept,
        // shown in the case's history and listed, so numbers long enough to be a phone or an
        // ID number are redacted from it.
        let file_name = crate::domain::codes::redact_numbers(&header.file_name);
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        // The scope is checked before the content is read.
        let mut case = self.case_for(&caller, header.case_id).await?;
        tracing::info!(
            principal = caller.name(),
            case = case.id,
            "Evidence upload started."
        );
        // A few transfers at once: each holds up to a file in memory.
        let _slot = self
            .state
            .evidence_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.state.metrics.denied("shed");
                Status::unavailable(
                    "too many evidence files are being transferred; retry in a moment",
                )
            })?;
        let max = self.state.limits().evidence_max_bytes;
        let mut content: Vec<u8> = Vec::new();
        // An upload that stalls gives its slot back: each message within a minute, the
        // whole file within ten.
        let deadline = tokio::time::Instant::now() + EVIDENCE_UPLOAD_LIMIT;
        loop {
            let next = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + EVIDENCE_MESSAGE_WAIT),
                stream.message(),
            )
            .await
            .map_err(|_| {
                Status::deadline_exceeded(
                    "the upload stalled (a minute without a chunk, or ten minutes in all)",
                )
            })??;
            let Some(msg) = next else { break };
            match msg.part {
                Some(Part::Chunk(c)) if c.is_empty() => {
                    return Err(bad_request(&[violation("chunk", "is empty")]));
                }
                Some(Part::Chunk(c)) => {
                    if content.len() + c.len() > max {
                        return Err(bad_request(&[violation(
                            "chunk",
                            format!(
                                "the file is larger than {} MB (limits.evidence_max_mb)",
                                max >> 20
                            ),
                        )]));
                    }
                    if content.is_empty() {
                        content.reserve_exact(max.min(c.len().max(1 << 20)));
                    }
                    content.extend_from_slice(&c);
                }
                _ => {
                    return Err(bad_request(&[violation(
                        "header",
                        "only the first message is a header; the rest are chunks",
                    )]));
                }
            }
        }
        // Reading the type, hashing and sealing take CPU in proportion to the file: off the
        // runtime's threads.
        let pii = self.state.pii.clone();
        let (content_type, sha256, sealed, size) = tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            let content_type = evidence::content_type(&content);
            let sha256 = hex::encode(sha2::Sha256::digest(&content));
            let sealed = content_type.map(|_| pii.seal(&content, sha256.as_bytes()));
            (content_type, sha256, sealed, content.len() as u64)
        })
        .await
        .map_err(|e| Status::internal(format!("evidence check failed: {e}")))?;
        let (Some(content_type), Some(sealed)) = (content_type, sealed) else {
            return Err(bad_request(&[violation(
                "chunk",
                if size == 0 {
                    "the file is empty".to_owned()
                } else {
                    format!(
                        "the file is not {} (read from its content, not its name)",
                        evidence::ALLOWED
                    )
                },
            )]));
        };
        let sealed_blob = std::sync::Arc::new(sealed.blob);
        for _attempt in 0..3 {
            let (_, view) = self.view(&case);
            let now = self.state.clock.now_micros();
            if let Some(e) = self
                .state
                .store
                .list_evidence(case.id)
                .await?
                .into_iter()
                .find(|e| e.sha256 == sha256)
            {
                // The same upload sent again (its answer lost): answered as the first was.
                if e.file_name == file_name && e.attached_by == caller.name() {
                    return Ok(Response::new(pb::UploadEvidenceResponse {
                        file: Some(evidence_pb(&e)),
                        bad_rating_case: Some(self.to_pb(&case, true)),
                    }));
                }
                return Err(Status::already_exists(format!(
                    "case {}: this file (sha256 {sha256}) is already attached",
                    case.id
                )));
            }
            if let Some(why) = bad_case::refuse(&case, &view, CaseAction::Evidence, now) {
                return Err(Status::failed_precondition(format!(
                    "case {}: cannot attach evidence: {why}",
                    case.id
                )));
            }
            let record = crate::store::EvidenceRecord {
                sha256: sha256.clone(),
                file_name: file_name.clone(),
                content_type: content_type.to_owned(),
                size,
                attached_by: caller.name().to_owned(),
                attached_at_micros: 0,
            };
            let written = self
                .state
                .store
                .relay_write(RelayWrite::Evidence {
                    case_id: case.id,
                    expected_entries: case.entries.len() as u64,
                    entry: CaseEntryRecord {
                        action: CaseAction::Evidence as i32,
                        actor: caller.name().to_owned(),
                        at_micros: 0,
                        note: file_name.clone(),
                        evidence_refs: vec![format!("sha256:{sha256}")],
                        ..Default::default()
                    },
                    file: Box::new(crate::store::NewEvidence {
                        record,
                        key_id: sealed.key_id.clone(),
                        sealed: sealed_blob.clone(),
                    }),
                })
                .await?;
            if written > 0 {
                tracing::info!(
                    principal = caller.name(),
                    case = case.id,
                    sha256 = %sha256,
                    size,
                    content_type,
                    "Evidence attached."
                );
                let after = self.case_for(&caller, case.id).await?;
                let file = self
                    .state
                    .store
                    .list_evidence(case.id)
                    .await?
                    .into_iter()
                    .find(|e| e.sha256 == sha256)
                    .map(|e| evidence_pb(&e));
                return Ok(Response::new(pb::UploadEvidenceResponse {
                    file,
                    bad_rating_case: Some(self.to_pb(&after, true)),
                }));
            }
            // Another step was recorded meanwhile: read the case again.
            case = self.case_for(&caller, case.id).await?;
        }
        Err(Status::new(
            Code::Aborted,
            format!(
                "case {} kept changing while the evidence was attached; send it again",
                case.id
            ),
        ))
    }

    async fn list_evidence(
        &self,
        request: Request<pb::ListEvidenceRequest>,
    ) -> Result<Response<pb::ListEvidenceResponse>, Status> {
        let caller = self.state.admit(&request, "ListEvidence", Role::Rectify)?;
        let case = self.case_for(&caller, request.into_inner().id).await?;
        let files = self.state.store.list_evidence(case.id).await?;
        Ok(Response::new(pb::ListEvidenceResponse {
            files: files.iter().map(evidence_pb).collect(),
        }))
    }

    async fn download_evidence(
        &self,
        request: Request<pb::DownloadEvidenceRequest>,
    ) -> Result<Response<Self::DownloadEvidenceStream>, Status> {
        let caller = self
            .state
            .admit(&request, "DownloadEvidence", Role::Rectify)?;
        let req = request.into_inner();
        let case = self.case_for(&caller, req.id).await?;
        let sha256 = req.sha256.trim().to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad_request(&[violation(
                "sha256",
                "must be 64 hexadecimal characters (from ListEvidence)",
            )]));
        }
        // The transfer slot first: the file is not loaded for a call that would be shed.
        let slot = self
            .state
            .evidence_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.state.metrics.denied("shed");
                Status::unavailable(
                    "too many evidence files are being transferred; retry in a moment",
                )
            })?;
        let Some((record, key_id, blob)) = self.state.store.get_evidence(case.id, &sha256).await?
        else {
            return Err(Status::not_found(format!(
                "case {} has no evidence file with sha256 {sha256}",
                case.id
            )));
        };
        let pii = self.state.pii.clone();
        let expected = record.sha256.clone();
        let content = tokio::task::spawn_blocking(move || {
            use sha2::Digest;
            let content = pii
                .open(
                    &crate::privacy::Sealed { key_id, blob },
                    expected.as_bytes(),
                )
                .map_err(|e| Status::data_loss(format!("evidence {expected}: {e}")))?;
            if hex::encode(sha2::Sha256::digest(&content)) != expected {
                return Err(Status::data_loss(format!(
                    "evidence {expected}: its content no longer matches its hash"
                )));
            }
            Ok(content)
        })
        .await
        .map_err(|e| Status::internal(format!("evidence read failed: {e}")))??;
        // Evidence may show the rater: its reads are audited like personal data's.
        self.state
            .store
            .record_pii_access(caller.name(), "DownloadEvidence", &[case.hub_id])
            .await?;
        // The description, then the content cut as it is sent (the transfer slot goes with
        // the stream, so a slow reader holds one of a few, not the hub's memory).
        let first = pb::DownloadEvidenceResponse {
            part: Some(pb::download_evidence_response::Part::File(evidence_pb(
                &record,
            ))),
        };
        let chunks = futures_util::stream::unfold(
            (content, 0usize, slot),
            |(content, at, slot)| async move {
                if at >= content.len() {
                    return None;
                }
                let end = (at + EVIDENCE_CHUNK).min(content.len());
                let msg = pb::DownloadEvidenceResponse {
                    part: Some(pb::download_evidence_response::Part::Chunk(
                        content[at..end].to_vec(),
                    )),
                };
                Some((Ok(msg), (content, end, slot)))
            },
        );
        Ok(Response::new(Box::pin(futures_util::StreamExt::chain(
            futures_util::stream::iter([Ok(first)]),
            chunks,
        ))))
    }

    async fn watch_cases(
        &self,
        request: Request<pb::WatchCasesRequest>,
    ) -> Result<Response<Self::WatchCasesStream>, Status> {
        let caller = self.state.admit(&request, "WatchCases", Role::Rectify)?;
        let mut after = request.into_inner().after_id;
        let mut q = RatingQuery::default();
        restrict_to_scope(&caller.principal, &mut q)?;
        let scope = q.scope;
        let api = Self {
            state: self.state.clone(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            // Cases open in the same transaction as their rating, so a new feed head is the
            // moment to look for new cases.
            let mut head = api.state.store.feed_head();
            let mut stopping = api.state.stopping.clone();
            loop {
                head.borrow_and_update();
                let page = match api
                    .state
                    .store
                    .list_bad_cases(scope.as_ref(), after, 200)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let full = page.len() == 200;
                for case in &page {
                    after = case.id;
                    let msg = pb::WatchCasesResponse {
                        bad_rating_case: Some(api.to_pb(case, false)),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { break },
                    _ = stopping.changed() => break,
                    _ = tx.closed() => return,
                }
            }
            drop(caller);
            let _ = tx
                .send(Err(Status::unavailable(format!(
                    "the hub is shutting down; watch again after case {after}"
                ))))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_cases(
        &self,
        request: Request<pb::ListCasesRequest>,
    ) -> Result<Response<pb::ListCasesResponse>, Status> {
        let caller = self.state.admit(&request, "ListCases", Role::Rectify)?;
        let req = request.into_inner();
        let limit = page_size(req.limit, 100, 1000)?;
        let mut q = RatingQuery::default();
        restrict_to_scope(&caller.principal, &mut q)?;
        let rows = self
            .state
            .store
            .list_bad_cases(q.scope.as_ref(), req.after_id, limit)
            .await?;
        let next_after_id = if rows.len() == limit as usize {
            rows.last().map_or(0, |c| c.id)
        } else {
            0
        };
        let cases = rows
            .iter()
            .map(|c| self.to_pb(c, false))
            .filter(|c| !req.open_only || c.status != pb::CaseStatus::Archived as i32)
            .filter(|c| !req.overdue_only || c.overdue)
            .collect();
        Ok(Response::new(pb::ListCasesResponse {
            cases,
            next_after_id,
        }))
    }

    async fn get_case(
        &self,
        request: Request<pb::GetCaseRequest>,
    ) -> Result<Response<pb::GetCaseResponse>, Status> {
        let caller = self.state.admit(&request, "GetCase", Role::Rectify)?;
        let id = request.into_inner().id;
        let case = self.case_for(&caller, id).await?;
        let stored = self.state.store.get_rating(case.hub_id).await?;
        let rating = match stored {
            Some(s) => self.state.reveal(&caller, "GetCase", vec![s]).await?.pop(),
            None => None,
        };
        Ok(Response::new(pb::GetCaseResponse {
            bad_rating_case: Some(self.to_pb(&case, true)),
            rating,
        }))
    }

    async fn record_action(
        &self,
        request: Request<pb::RecordActionRequest>,
    ) -> Result<Response<pb::RecordActionResponse>, Status> {
        let action = CaseAction::try_from(request.get_ref().action).unwrap_or_default();
        // Spot checks are the authority's; every other step is the rated organisation's, and
        // an extension beyond the organisation's own one is the authority's to grant.
        let (role, or) = match action {
            CaseAction::SpotCheck => (Role::Admin, None),
            // The unit's own deadline, or the authority's once the unit's time has passed.
            CaseAction::Extend | CaseAction::DeclareDeadline => (Role::Rectify, Some(Role::Admin)),
            _ => (Role::Rectify, None),
        };
        let caller = self.state.admit_any(&request, "RecordAction", role, or)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        if matches!(
            action,
            CaseAction::Unspecified
                | CaseAction::Appeal
                | CaseAction::AppealDecision
                | CaseAction::DeadlinesRecounted
                | CaseAction::Evidence
        ) {
            v.push(violation(
                "action",
                "must be CONTACT, RECTIFY, EXTEND, DECLARE_DEADLINE, EXPLAIN, FEED_BACK, CALLBACK, ARCHIVE or SPOT_CHECK (appeals and evidence files have their own calls; the hub records recounted deadlines)",
            ));
        }
        let note = check_text(
            &mut v,
            "note",
            &req.note,
            matches!(
                action,
                CaseAction::Extend | CaseAction::Explain | CaseAction::DeclareDeadline
            ),
        );
        let refs = check_refs(&mut v, &req.evidence_refs, action == CaseAction::Rectify);
        // A deadline is a day this century (a far one would overflow the day's end).
        let new_deadline = req
            .new_deadline
            .as_ref()
            .and_then(micros_from_timestamp)
            .filter(|d| (0..4_102_444_800_000_000).contains(d));
        let sets_deadline = matches!(action, CaseAction::Extend | CaseAction::DeclareDeadline);
        if sets_deadline && new_deadline.is_none() {
            v.push(violation(
                "new_deadline",
                "is required to extend or declare a deadline, a moment before 2100",
            ));
        }
        let contacted_by = req.contacted_by.trim().to_owned();
        if !contacted_by.is_empty() && action != CaseAction::Contact {
            v.push(violation("contacted_by", "is given only with CONTACT"));
        } else if contacted_by.chars().count() > 64 || contacted_by.chars().any(char::is_control) {
            v.push(violation(
                "contacted_by",
                "is a staff id of at most 64 characters, without control characters",
            ));
        }
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        let entry = CaseEntryRecord {
            action: action as i32,
            actor: caller.name().to_owned(),
            at_micros: 0,
            note,
            evidence_refs: refs,
            // A declared deadline is a day: it ends at 24:00 China Standard Time, as counted
            // deadlines do.
            new_deadline_micros: match action {
                CaseAction::DeclareDeadline => {
                    // 24:00 is the day's end, not the next day's start.
                    new_deadline.map(|d| crate::rules::Date::of_instant(d - 1).end_micros())
                }
                CaseAction::Extend => new_deadline,
                _ => None,
            },
            contacted_by,
            ..Default::default()
        };
        let case = self.append(&caller, req.id, entry, false).await?;
        Ok(Response::new(pb::RecordActionResponse {
            bad_rating_case: Some(case),
        }))
    }

    async fn file_appeal(
        &self,
        request: Request<pb::FileAppealRequest>,
    ) -> Result<Response<pb::FileAppealResponse>, Status> {
        // The rated unit files its appeal; the rater's own claim is registered by the
        // authority (Ordos 第十六条: 由评价主体提出，各级政务服务管理机构进行界定，并在系统中登记).
        let role = if request.get_ref().raised_by_rater {
            Role::Admin
        } else {
            Role::Rectify
        };
        let caller = self.state.admit(&request, "FileAppeal", role)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        let note = check_text(&mut v, "reason", &req.reason, true);
        let refs = check_refs(&mut v, &req.evidence_refs, false);
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        // Typed by the authority from what the rater said, and shown to the rated unit: the
        // rater's numbers (phone, ID) are not carried into it.
        let note = if req.raised_by_rater {
            crate::domain::codes::redact_numbers(&note)
        } else {
            note
        };
        let entry = CaseEntryRecord {
            action: CaseAction::Appeal as i32,
            actor: caller.name().to_owned(),
            note,
            evidence_refs: refs,
            by_rater: req.raised_by_rater,
            ..Default::default()
        };
        let case = self.append(&caller, req.id, entry, false).await?;
        Ok(Response::new(pb::FileAppealResponse {
            bad_rating_case: Some(case),
        }))
    }

    async fn decide_appeal(
        &self,
        request: Request<pb::DecideAppealRequest>,
    ) -> Result<Response<pb::DecideAppealResponse>, Status> {
        let caller = self.state.admit(&request, "DecideAppeal", Role::Admin)?;
        let req = request.into_inner();
        let mut v = Vec::new();
        let outcome = AppealOutcome::try_from(req.outcome).unwrap_or_default();
        if outcome == AppealOutcome::Unspecified {
            v.push(violation("outcome", "must be UPHELD, INVALID or MALICIOUS"));
        }
        let note = check_text(&mut v, "note", &req.note, true);
        if !v.is_empty() {
            return Err(bad_request(&v));
        }
        let exclude = matches!(outcome, AppealOutcome::Invalid | AppealOutcome::Malicious);
        let entry = CaseEntryRecord {
            action: CaseAction::AppealDecision as i32,
            actor: caller.name().to_owned(),
            note,
            appeal_outcome: outcome as i32,
            ..Default::default()
        };
        let case = self.append(&caller, req.id, entry, exclude).await?;
        Ok(Response::new(pb::DecideAppealResponse {
            bad_rating_case: Some(case),
        }))
    }
}

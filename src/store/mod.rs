//! Durable storage: one [`Store`] trait, one implementation per backend.
//!
//! Contract every backend keeps:
//! - an insert is acknowledged only after its transaction committed;
//! - concurrent inserts are group-committed by one writer;
//! - (source system, source key) identifies a rating: same content → `Duplicate`, different
//!   content → `Conflict`, never an overwrite;
//! - ratings are append-only, and each committed rating gets the next gapless feed sequence.

pub(crate) mod chunk;
pub mod counts;
pub mod log;
pub mod postgres;
pub(crate) mod rows;
pub mod sqlite;
pub mod verify;
pub(crate) mod writer;

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::domain::{ValidCase, ValidRating};
use crate::pb::v1 as pb;
use crate::privacy::{PiiKeys, Sealed};

pub use postgres::{PostgresOptions, PostgresStore, is_postgres_url};
pub use sqlite::{SqliteOptions, SqliteStore};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store is shutting down")]
    ShuttingDown,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the database is unreachable: {0}")]
    Unavailable(String),
    /// The storage cannot take writes: a full disk, a read-only file system, an I/O error.
    #[error("the hub's storage cannot take writes ({0})")]
    Storage(String),
    /// The database refused a write (a constraint, a value it cannot store); nothing of it
    /// was committed.
    #[error("the database refused the write: {0}")]
    Refused(String),
    /// The database and the configuration disagree (e.g. the rating log's hash).
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// What a failed commit means for its callers: the database unreachable, the storage
    /// unable to take writes, or the write refused.
    pub fn from_failed_commit(e: &sqlx::Error) -> Self {
        if Self::is_connection(e) {
            Self::Unavailable(e.to_string())
        } else if let Some(cause) = Self::storage_cause(e) {
            Self::Storage(format!("{cause}: {e}"))
        } else if Self::is_transient(e) {
            Self::Unavailable(format!("the database is busy: {e}"))
        } else {
            Self::Refused(e.to_string())
        }
    }

    /// Whether the database refused the write for what it holds: a constraint, a value it
    /// cannot store, an error a trigger raised. Only then is a failed group committed again
    /// job by job (the job at fault fails alone, the others commit); any other failure would
    /// fail again, or wait again, for every job.
    pub fn is_refusal(e: &sqlx::Error) -> bool {
        // A value sqlx could not encode or a stored row it could not decode (a job's own
        // look-up): that job's, not the group's.
        if matches!(
            e,
            sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. }
        ) {
            return true;
        }
        let sqlx::Error::Database(db) = e else {
            return false;
        };
        let Some(code) = db.code() else {
            return false;
        };
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // CONSTRAINT, TOOBIG, MISMATCH, RANGE.
            return matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(19 | 18 | 20 | 25));
        }
        // Data exceptions (22…, a NUL in text among them), integrity violations (23…), an
        // exception raised by a trigger or function (P0001).
        code.starts_with("22") || code.starts_with("23") || code == "P0001"
    }

    /// Whether the database failed the write for the moment only: busy or locked (SQLite),
    /// a serialization failure, a deadlock, a statement or lock timeout (PostgreSQL). The
    /// caller may retry.
    pub fn is_transient(e: &sqlx::Error) -> bool {
        let sqlx::Error::Database(db) = e else {
            return false;
        };
        let Some(code) = db.code() else {
            return false;
        };
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            return matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6));
        }
        matches!(
            code.as_ref(),
            "40001" | "40P01" | "57014" | "55P03" | "53300"
        )
    }

    /// The same error for another caller of a failed group (errors of sqlx are not `Clone`).
    pub(crate) fn clone_for_caller(&self) -> Self {
        match self {
            Self::ShuttingDown => Self::ShuttingDown,
            Self::Unavailable(t) => Self::Unavailable(t.clone()),
            Self::Storage(t) => Self::Storage(t.clone()),
            Self::Refused(t) => Self::Refused(t.clone()),
            Self::Corrupt(t) => Self::Corrupt(t.clone()),
            other => Self::Refused(other.to_string()),
        }
    }

    /// Whether a database error comes from the storage under the database rather than from
    /// the write: the disk is full, the file system is read-only, an I/O error. SQLite's
    /// primary result codes; PostgreSQL's SQLSTATE class 53 (insufficient resources), 58030
    /// (I/O error) and 25006 (read-only transaction: a standby, or a server set read-only).
    pub fn storage_cause(e: &sqlx::Error) -> Option<&'static str> {
        let sqlx::Error::Database(db) = e else {
            return None;
        };
        let code = db.code()?;
        if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
            // Extended result codes carry the primary code in their low byte.
            return match code.parse::<i32>().ok()? & 0xff {
                13 => Some("disk full"),
                10 => Some("I/O error"),
                8 => Some("read-only database"),
                14 => Some("cannot open the database file"),
                _ => None,
            };
        }
        match code.as_ref() {
            "53100" => Some("disk full"),
            "58030" => Some("I/O error"),
            "25006" => Some("read-only database"),
            // Too many connections is the server's load, not its storage: unavailable, and
            // tried again, without health saying the storage fails.
            "53300" => None,
            c if c.starts_with("53") => Some("insufficient resources"),
            _ => None,
        }
    }

    /// Whether a database error means the database could not be reached (a retry may
    /// succeed), rather than that it refused the work.
    pub fn is_connection(e: &sqlx::Error) -> bool {
        match e {
            sqlx::Error::Io(_)
            // The conversation broke: a connection cut while sqlx waits for a reply it
            // parses itself (the answer to its TLS request, when the server closes first).
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL: connection exceptions (08…) and the server ending the session —
            // shutdown, restart, an operator terminating it (57P…), a session that sat idle
            // inside its transaction too long (25P03: the writer stalled).
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "25P03"),
            _ => false,
        }
    }
}

/// A rating ready to be written: parsed, with its hub id and source system.
#[derive(Debug, Clone)]
pub struct NewRating {
    pub hub_id: Uuid,
    pub source_system: String,
    pub rating: ValidRating,
    /// `rating.body` without rater PII, protobuf-encoded.
    pub body_bytes: Vec<u8>,
    /// The rater's name, ID number and phone, sealed.
    pub pii: Option<Sealed>,
    /// Fingerprint of level + text + detail codes, when the rating has text or codes.
    pub template_hash: Option<[u8; 32]>,
    /// Keyed pseudonym of the rater's phone (burst detection), never the phone.
    pub phone_tag: Option<[u8; 32]>,
    pub checks: IngestChecks,
}

/// A case event ready to be written.
#[derive(Debug, Clone)]
pub struct NewCaseEvent {
    pub source_system: String,
    pub case: ValidCase,
    /// `case.body` without applicant PII, protobuf-encoded.
    pub body_bytes: Vec<u8>,
    /// The applicant's name, ID number and phone, sealed.
    pub pii: Option<Sealed>,
}

/// What the store did with one rating.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    /// Committed; `flags` are the quality flags the store added (bursts, templates).
    Accepted {
        hub_id: Uuid,
        feed_seq: u64,
        flags: Vec<pb::QualityFlag>,
    },
    Duplicate {
        hub_id: Uuid,
        feed_seq: u64,
    },
    Conflict {
        hub_id: Uuid,
        feed_seq: u64,
    },
    /// A counting rule (一事一评, 一次一评, batch, theme, follow-up) refused it; nothing stored.
    Refused {
        field: &'static str,
        reason: String,
    },
}

/// Counting rules and quality checks the writer applies, race-free, inside the transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestChecks {
    /// Apply 一事一评 / 一次一评 / batch / theme / follow-up rules (not for relayed ratings,
    /// which the lower hub already checked).
    pub counting: bool,
    /// Follow-ups allowed per rating, and within how many seconds of the original.
    pub follow_up_limit: u32,
    pub follow_up_window_secs: i64,
    pub quality: QualityThresholds,
    /// One staff rating per window visit (`visit_id`), not per case (the profile's
    /// `staff_rating_per_visit`).
    pub per_visit: bool,
}

/// When the store flags a rating as templated or part of a burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityThresholds {
    pub template_min: u32,
    pub template_window_secs: i64,
    pub device_burst: u32,
    pub device_window_secs: i64,
    pub phone_burst: u32,
    pub phone_window_secs: i64,
}

impl Default for QualityThresholds {
    fn default() -> Self {
        Self {
            template_min: 10,
            template_window_secs: 86_400,
            device_burst: 30,
            device_window_secs: 60,
            phone_burst: 5,
            phone_window_secs: 600,
        }
    }
}

impl Default for IngestChecks {
    fn default() -> Self {
        Self {
            counting: true,
            follow_up_limit: 1,
            follow_up_window_secs: 15 * 86_400,
            quality: QualityThresholds::default(),
            per_visit: false,
        }
    }
}

/// What the store did with one case event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseOutcome {
    Accepted,
    Duplicate,
    Conflict,
}

/// A rating as stored, with the hub's own fields filled in.
#[derive(Debug, Clone)]
pub struct StoredRating {
    pub feed_seq: u64,
    /// As stored: rater name, ID number and phone are empty; they are in `pii`.
    pub rating: pb::Rating,
    pub pii: Option<Sealed>,
}

/// One read of unmasked personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiiAccess {
    pub id: u64,
    pub at_micros: i64,
    pub principal: String,
    pub rpc: String,
    pub hub_id: Uuid,
}

/// Restricts a query to a principal's scope: organisations or region prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeFilter {
    pub orgs: Vec<String>,
    pub region_prefixes: Vec<String>,
}

/// Which ratings to read; empty fields do not filter. Built from the API's `RatingFilter`
/// after validation (region prefix is digits only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RatingQuery {
    pub org_credit_code: Option<String>,
    pub region_prefix: Option<String>,
    pub item_code: Option<String>,
    pub staff_id: Option<String>,
    pub case_number: Option<String>,
    pub source_system: Option<String>,
    pub channels: Vec<i32>,
    pub levels: Vec<i32>,
    /// Ratings of these target kinds (ratings only: case events have none).
    pub target_kinds: Vec<i32>,
    pub rated_from_micros: Option<i64>,
    pub rated_until_micros: Option<i64>,
    /// `None`: no scope restriction (national scope).
    pub scope: Option<ScopeFilter>,
    /// Only ratings with feed sequence at most this (a snapshot of the head).
    pub max_feed_seq: Option<u64>,
    /// Internal: the time range applies to case events' `occurred_at`.
    pub time_is_occurred_at: bool,
    /// Only ratings that count (not left out on appeal): ratings queries only.
    pub counted_only: bool,
}

impl RatingQuery {
    /// The target-kind filter where it applies: ratings have a target kind, case events none.
    pub fn target_kinds_filter(&self) -> &[i32] {
        if self.time_is_occurred_at {
            &[]
        } else {
            &self.target_kinds
        }
    }

    /// The same filter applied to case events (time range on their occurrence).
    pub fn with_time_column(&self) -> Self {
        Self {
            time_is_occurred_at: true,
            ..self.clone()
        }
    }
}

/// Completed cases of one statistics group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseCounts {
    pub key: Vec<String>,
    pub completed: u64,
    /// Rated by an item rating of the case, its batch or its theme.
    pub rated: u64,
    /// … by the rater (not a default rating).
    pub actively_rated: u64,
}

/// Bad-rating cases of one statistics group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadCaseCounts {
    pub key: Vec<String>,
    pub cases: u64,
    pub rectified: u64,
    pub called_back: u64,
    /// Cases of a real-name 差评 (the rater marked real-name, with an ID number or phone).
    pub real_name: u64,
    /// … of which rectified (or explained) and called back: 实名差评回访整改.
    pub real_name_done: u64,
    /// Cases closed (archived).
    pub archived: u64,
    /// … of which spot-checked by the authority.
    pub spot_checked: u64,
}

/// Ratings of one day (UTC+8) and organisation, for reconciliation: how many, and the
/// order-independent digest of their hub ids (XOR of SHA-256 over each id's 16 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayOrgDigest {
    pub day: String,
    pub org_credit_code: String,
    pub count: u64,
    pub digest: [u8; 32],
}

/// Adds one hub id to an order-independent digest (see [`DayOrgDigest`]).
pub fn fold_digest(acc: &mut [u8; 32], hub_id: &Uuid) {
    use sha2::Digest;
    for (a, b) in acc.iter_mut().zip(sha2::Sha256::digest(hub_id.as_bytes())) {
        *a ^= b;
    }
}

/// An upstream's durable delivery state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamState {
    pub cursor: u64,
    pub paused: bool,
    /// Every 办件 event with an id at or below it was delivered or dead-lettered.
    pub case_cursor: u64,
    /// Every rating update (exclusion) at or below it was delivered or dead-lettered.
    pub update_cursor: u64,
}

/// A rating an upstream rejected permanently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeadLetter {
    pub feed_seq: u64,
    pub error: String,
    pub attempts: u32,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub upstream: String,
    /// The rating's feed sequence; 0 for a 办件 event's dead letter.
    pub feed_seq: u64,
    pub hub_id: Option<Uuid>,
    /// The 办件 event's id, for a case record's dead letter.
    pub case_event_id: Option<u64>,
    /// The rating update's sequence, for an update's dead letter.
    pub update_seq: Option<u64>,
    pub error: String,
    pub attempts: u32,
    pub created_at_micros: i64,
    pub replay_requested: bool,
    pub resolved_at_micros: Option<i64>,
}

/// One delivery attempt to an upstream, as logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub id: u64,
    pub upstream: String,
    pub at_micros: i64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u32,
    /// delivered, rejected, partly_rejected, failed (will retry), unreadable, ambiguous.
    pub outcome: String,
    /// The upstream's status and text, numbers redacted.
    pub detail: String,
    pub duration_ms: u32,
    /// The range replay it was part of, if any.
    pub replay_id: Option<u64>,
}

/// An operator's request to send an upstream feed positions `from_seq..=to_seq` again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeReplay {
    pub id: u64,
    pub upstream: String,
    pub from_seq: u64,
    pub to_seq: u64,
    /// The next position to send; past `to_seq` once done.
    pub next_seq: u64,
    pub requested_by: String,
    pub requested_at_micros: i64,
    pub reason: String,
    pub done_at_micros: Option<i64>,
}

/// A completed case that has no rating yet.
#[derive(Debug, Clone)]
pub struct OpenCase {
    pub event_id: u64,
    pub source_system: String,
    pub completed_at_micros: i64,
    pub has_invitation: bool,
    /// As stored: applicant PII is in `pii`.
    pub case: pb::ServiceCase,
    pub pii: Option<Sealed>,
}

/// A 办件 event as stored, for relaying.
#[derive(Debug, Clone)]
pub struct StoredCaseEvent {
    pub id: u64,
    pub source_system: String,
    pub case: pb::ServiceCase,
    pub pii: Option<Sealed>,
}

/// A rating update on its way upstream: the rating left out of scores (`reason`: the
/// `AppealOutcome` number, or `SUPERSEDED_DEFAULT`), in the order the hub decided them.
#[derive(Debug, Clone)]
pub struct StoredUpdate {
    pub seq: u64,
    pub reason: i32,
    pub at_micros: i64,
    pub decided_by: String,
    pub rating: StoredRating,
    /// The rating itself is an open dead letter of the upstream asked about.
    pub rating_dead: bool,
}

/// An invitation to rate, with its case.
#[derive(Debug, Clone)]
pub struct StoredInvitation {
    pub id: u64,
    pub source_system: String,
    pub due_at_micros: i64,
    pub created_at_micros: i64,
    pub case: pb::ServiceCase,
    pub pii: Option<Sealed>,
}

/// One step of a bad-rating case, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaseEntryRecord {
    pub action: i32,
    pub actor: String,
    pub at_micros: i64,
    pub note: String,
    pub evidence_refs: Vec<String>,
    pub new_deadline_micros: Option<i64>,
    pub appeal_outcome: i32,
    /// CONTACT: who spoke with the rater (a staff id); empty when not given.
    pub contacted_by: String,
    /// APPEAL: raised by the rater (registered by the authority), not by the rated unit.
    pub by_rater: bool,
}

/// A file of evidence attached to a case, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceRecord {
    /// Lowercase hex SHA-256 of the plain content.
    pub sha256: String,
    pub file_name: String,
    pub content_type: String,
    pub size: u64,
    pub attached_by: String,
    pub attached_at_micros: i64,
}

/// A file of evidence on its way in: its content already sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvidence {
    pub record: EvidenceRecord,
    pub key_id: String,
    /// Shared: a retry after a concurrent step sends the same blob again, not a copy.
    pub sealed: std::sync::Arc<Vec<u8>>,
}

/// A bad-rating case with its history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBadCase {
    pub id: u64,
    pub hub_id: Uuid,
    pub org_credit_code: String,
    pub region_code: String,
    pub opened_at_micros: i64,
    pub real_name: bool,
    /// How many cases of the same organisation opened earlier in the same month (CST): the
    /// case's place in its spot-check stratum.
    pub org_month_rank: u64,
    pub entries: Vec<CaseEntryRecord>,
}

/// `rating_exclusions.reason` of a default rating that a rater's own rating replaced (made in
/// time, it arrived after the default was recorded). Appeal outcomes use their
/// `AppealOutcome` numbers.
pub const SUPERSEDED_DEFAULT: i32 = 100;

/// A tree head a lower hub reported, and what checking it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerHead {
    /// The record's id. Written: 0 for a new record, or the principal's latest record, an
    /// accepted head, that this accepted head advances in place.
    pub id: u64,
    pub principal: String,
    pub size: u64,
    pub root: Vec<u8>,
    pub head_time_micros: i64,
    pub received_at_micros: i64,
    /// accepted, inconsistent, self_check, bad_signature, future_time, rebaselined.
    pub outcome: String,
    /// The first feed position of the lower hub's log that differs (0: none named).
    pub first_bad: u64,
    pub detail: String,
    /// Written for an accepted head: the record it was checked against (id, size, root; id
    /// 0: none). The write happens only while that is still the principal's last accepted
    /// record and holds that head (else it writes nothing and answers 0): with `id` set, it
    /// is advanced in place; else a record is added.
    pub checked_against: Option<(u64, u64, Vec<u8>)>,
}

/// What [`Store::peer_lock`] holds: dropping it releases the lock.
#[derive(Default)]
pub struct PeerLock {
    _held: Option<Box<dyn std::any::Any + Send>>,
}

impl PeerLock {
    pub(crate) fn holding(what: impl std::any::Any + Send) -> Self {
        Self {
            _held: Some(Box::new(what)),
        }
    }
}

/// A `peer_heads` row as both backends select it: id, principal, size, root, head_time,
/// received_at, outcome, first_bad, detail.
pub(crate) type PeerHeadRow = (i64, String, i64, Vec<u8>, i64, i64, String, i64, String);

impl From<PeerHeadRow> for PeerHead {
    fn from(r: PeerHeadRow) -> Self {
        PeerHead {
            id: r.0 as u64,
            principal: r.1,
            size: r.2 as u64,
            root: r.3,
            head_time_micros: r.4,
            received_at_micros: r.5,
            outcome: r.6,
            first_bad: r.7 as u64,
            detail: r.8,
            checked_against: None,
        }
    }
}

/// Writes the relay makes, committed by the group-commit writer like everything else.
#[derive(Debug, Clone)]
pub enum RelayWrite {
    /// Every rating up to `cursor` was delivered, except `dead`, which were rejected.
    Advance {
        upstream: String,
        cursor: u64,
        dead: Vec<NewDeadLetter>,
    },
    /// Every 办件 event up to `cursor` was delivered, except `dead` (event id, error). The
    /// open dead letters of ratings of the `delivered` case numbers (refused "办件不存在"
    /// while their case had not gone up) are marked for replay.
    CaseAdvance {
        upstream: String,
        cursor: u64,
        dead: Vec<(u64, String)>,
        delivered: Vec<String>,
    },
    /// Every rating update up to `cursor` was delivered, except `dead` (seq, error).
    UpdateAdvance {
        upstream: String,
        cursor: u64,
        dead: Vec<(u64, String)>,
    },
    /// A replay delivered `delivered`; `failed` were rejected again (with the new error).
    ReplayDone {
        upstream: String,
        delivered: Vec<u64>,
        failed: Vec<(u64, String)>,
        /// Case numbers of 办件 records this replay delivered: their ratings' open letters
        /// are marked for replay in the same transaction (as `CaseAdvance` does).
        freed_cases: Vec<String>,
    },
    SetPaused {
        upstream: String,
        paused: bool,
    },
    /// Appends a step to a bad-rating case if its history still has `expected_entries`
    /// entries (optimistic concurrency: 0 rows touched means someone else got there first).
    /// `exclude` leaves the rating out of scores (an appeal found it invalid or malicious).
    CaseEntry {
        case_id: u64,
        expected_entries: u64,
        entry: CaseEntryRecord,
        exclude: Option<(Uuid, i32)>,
    },
    /// Logs delivery attempts (ids are assigned).
    Attempts(Vec<AttemptRecord>),
    /// Forgets attempts logged before this moment.
    PruneAttempts {
        before_micros: i64,
    },
    /// Records a range replay request; answers its id.
    RequestRange {
        upstream: String,
        from_seq: u64,
        to_seq: u64,
        requested_by: String,
        reason: String,
    },
    /// Ends a range replay where it is (1 row touched, 0 when it was done already).
    CancelRange {
        id: u64,
        upstream: String,
    },
    /// A range replay sent up to `next_seq - 1`; done once `next_seq` is past its end.
    RangeProgress {
        id: u64,
        next_seq: u64,
    },
    /// Leaves a rating with no 差评 case out of scores: the authority found it invalid on its
    /// rater's claim (`reason`: the `AppealOutcome` number). 0 rows touched when it already
    /// was left out.
    Exclusion {
        hub_id: Uuid,
        reason: i32,
        decided_by: String,
        note: String,
    },
    /// Attaches a file of evidence to a case and records the step (`entry`) in its history,
    /// in one transaction, if the history still has `expected_entries` entries (0 rows
    /// touched otherwise). The content is stored once per SHA-256.
    Evidence {
        case_id: u64,
        expected_entries: u64,
        entry: CaseEntryRecord,
        file: Box<NewEvidence>,
    },
    /// A lower hub's tree head and what checking it found.
    PeerHead(PeerHead),
    /// Issues an invitation for a completed case (once per case; later calls do nothing).
    Invite {
        event_id: u64,
        source_system: String,
        case_number: String,
        org_credit_code: String,
        region_code: String,
        due_at_micros: i64,
    },
    /// Marks dead letters for another delivery: these ids, or all open ones (`None`).
    RequestReplay {
        upstream: String,
        ids: Option<Vec<u64>>,
    },
    /// Writes nothing of the hub's, but makes the database write and sync (a health probe
    /// while commits fail for a storage reason).
    Probe,
}

/// Dimensions statistics can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsDimension {
    Region,
    Organization,
    Item,
    Staff,
    Channel,
    Day,
    Month,
    /// The prefecture-level city (地级市): the region code's first four digits and "00".
    City,
}

/// Counts for one group. `key` has one value per requested dimension.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRow {
    pub key: Vec<String>,
    pub total: u64,
    /// Counts per level, index 0 = 非常满意 … 4 = 非常不满意.
    pub per_level: [u64; 5],
    pub default_ratings: u64,
    /// Ratings with any quality flag.
    pub flagged: u64,
    /// The group's bad-rating cases (`Store::stats` fills them in).
    pub bad_cases: BadCaseCounts,
    /// Filled in by the caller from `completed_case_counts`.
    pub rated_cases: u64,
    pub actively_rated_cases: u64,
    pub completed_cases: u64,
}

/// `rows` with each group's bad-rating cases from `cases` (a group with cases always has
/// ratings that count: a case leaves the counts with its rating).
pub fn with_cases(mut rows: Vec<StatsRow>, cases: Vec<BadCaseCounts>) -> Vec<StatsRow> {
    let mut at: std::collections::HashMap<Vec<String>, usize> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.key.clone(), i))
        .collect();
    for c in cases.into_iter().filter(|c| c.cases > 0) {
        match at.get(&c.key) {
            Some(i) => rows[*i].bad_cases = c,
            None => {
                at.insert(c.key.clone(), rows.len());
                rows.push(StatsRow {
                    key: c.key.clone(),
                    bad_cases: c,
                    ..Default::default()
                });
            }
        }
    }
    rows
}

/// What the health probe writes besides its row while commits fail for a storage reason: as
/// much as a large group of ratings (1 MiB), and incompressible, so that a disk with room for
/// a tiny row but not for ratings still counts as failing.
pub(crate) fn probe_pad() -> Vec<u8> {
    const BYTES: usize = 1 << 20;
    // xorshift64*: filler, not secrets; seeded from the clock so no two probes match.
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x9E37_79B9_7F4A_7C15, |d| d.as_nanos() as u64)
        | 1;
    let mut out = Vec::with_capacity(BYTES);
    while out.len() < BYTES {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The rating log's hash (src/merkle.rs), as the database fixed it.
    fn log_hash(&self) -> crate::merkle::HashAlg;

    /// Rating log nodes by (level, index): stored, or combined from the stored nodes under
    /// them (the log's layout, `merkle::Layout`); those not complete are absent.
    async fn log_nodes(
        &self,
        want: &[(u32, u64)],
    ) -> Result<std::collections::HashMap<(u32, u64), crate::merkle::Hash>, StoreError>;

    /// How a commit is made durable, as read back from the writer's own connection when the
    /// store opened (not as configured): e.g. `sqlite journal_mode=wal synchronous=FULL wal_autocheckpoint=4000`.
    fn durability(&self) -> &str;

    /// The database's size on disk, in bytes (SQLite: its pages, without the WAL).
    async fn database_bytes(&self) -> Result<u64, StoreError>;

    /// Writes ratings through the group-commit writer; returns one outcome per item, in order,
    /// after the transaction that holds them committed.
    async fn insert_ratings(&self, items: Vec<NewRating>)
    -> Result<Vec<InsertOutcome>, StoreError>;

    /// Writes case events through the group-commit writer.
    async fn insert_cases(&self, items: Vec<NewCaseEvent>) -> Result<Vec<CaseOutcome>, StoreError>;

    async fn get_rating(&self, hub_id: Uuid) -> Result<Option<StoredRating>, StoreError>;

    /// Ratings matching `query` with feed sequence > `after_seq`, in feed order, at most `limit`.
    async fn list_ratings(
        &self,
        query: &RatingQuery,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRating>, StoreError>;

    /// Counts of the ratings that count (no exclusion) matching `query`, and of their
    /// bad-rating cases (`bad_cases`), per group of `group_by`, ordered by key: from the
    /// maintained counts where they can answer (`counts::plan`), else by scans.
    async fn stats(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError>;

    /// The ratings' part of `stats` (no `bad_cases`), always by a scan: what the counts must
    /// equal.
    async fn stats_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError>;

    /// Records reads of unmasked personal data; returns after the records committed.
    async fn record_pii_access(
        &self,
        principal: &str,
        rpc: &str,
        hub_ids: &[Uuid],
    ) -> Result<(), StoreError>;

    /// Audit records with id > `after_id`, oldest first, optionally for one principal.
    async fn list_pii_access(
        &self,
        principal: Option<&str>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<PiiAccess>, StoreError>;

    /// Hub ids per (day, organisation) of the matching ratings, ordered by day and organisation.
    /// Count and digest of the matching ratings per (day, organisation), ordered by day and
    /// organisation. Rows are folded as they stream from the database: memory grows with the
    /// groups, not with the ratings.
    async fn day_org_digests(&self, query: &RatingQuery) -> Result<Vec<DayOrgDigest>, StoreError>;

    /// When the rating with this feed sequence was committed.
    async fn received_at(&self, feed_seq: u64) -> Result<Option<i64>, StoreError>;

    /// An upstream's state, created (cursor 0, not paused) on first use.
    async fn upstream_state(&self, upstream: &str) -> Result<UpstreamState, StoreError>;

    /// Commits a relay write; returns how many rows it touched.
    async fn relay_write(&self, write: RelayWrite) -> Result<u64, StoreError>;

    async fn list_dead_letters(
        &self,
        upstream: &str,
        include_resolved: bool,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// Logged delivery attempts to `upstream` with id < `before_id` (0: from the newest),
    /// newest first.
    async fn list_attempts(
        &self,
        upstream: &str,
        before_id: u64,
        limit: u32,
    ) -> Result<Vec<AttemptRecord>, StoreError>;

    /// Range replays of `upstream`, newest first, at most 1,000 (only those not done when
    /// `open_only`).
    /// Tree heads lower hubs reported, newest first: one principal's or all, alarms only or
    /// all, at most `limit`.
    async fn peer_heads(
        &self,
        principal: Option<&str>,
        alarms_only: bool,
        limit: u32,
    ) -> Result<Vec<PeerHead>, StoreError>;

    /// Holds, until dropped, the lock under which reports of `principal`'s tree heads are
    /// checked and recorded, across every instance sharing the database (a session
    /// advisory lock on PostgreSQL, on a connection of its own; SQLite has one instance
    /// per file, so nothing beyond the caller's own lock).
    async fn peer_lock(&self, _principal: &str) -> Result<PeerLock, StoreError> {
        Ok(PeerLock::default())
    }

    /// A principal's last accepted head: (size, root, head time, row id).
    async fn last_accepted_head(
        &self,
        principal: &str,
    ) -> Result<Option<(u64, Vec<u8>, i64, u64)>, StoreError>;

    async fn list_range_replays(
        &self,
        upstream: &str,
        open_only: bool,
    ) -> Result<Vec<RangeReplay>, StoreError>;

    /// Open dead letters of an upstream.
    async fn count_open_dead_letters(&self, upstream: &str) -> Result<u64, StoreError>;

    /// Dead letters waiting for a replay, with their ratings, oldest first.
    async fn replay_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredRating)>, StoreError>;

    /// Completed cases without any rating for their (organisation, case number), after
    /// `after_event_id`, oldest first.
    /// Bad-rating cases with id > `after_id` inside `scope`, oldest first, with histories.
    async fn list_bad_cases(
        &self,
        scope: Option<&ScopeFilter>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredBadCase>, StoreError> {
        self.list_bad_cases_opened(scope, None, after_id, limit)
            .await
    }

    /// As `list_bad_cases`, only cases opened within `[from, until)` when given.
    async fn list_bad_cases_opened(
        &self,
        scope: Option<&ScopeFilter>,
        opened: Option<(i64, i64)>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredBadCase>, StoreError>;

    async fn get_bad_case(&self, id: u64) -> Result<Option<StoredBadCase>, StoreError>;

    /// The files attached to a case, in the order attached.
    async fn list_evidence(&self, case_id: u64) -> Result<Vec<EvidenceRecord>, StoreError>;

    /// One file attached to a case: its record, the key that sealed it and the sealed
    /// content.
    async fn get_evidence(
        &self,
        case_id: u64,
        sha256: &str,
    ) -> Result<Option<(EvidenceRecord, String, Vec<u8>)>, StoreError>;

    /// Bad-rating cases per group of their ratings (those that count), keyed like `stats`,
    /// in no particular order, always by a scan: what the counts must equal.
    async fn bad_case_counts_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<BadCaseCounts>, StoreError>;

    /// Completed (办结) cases per group, keyed like `stats` (periods by completion time), with
    /// how many are rated, in no particular order: from the maintained counts where they can
    /// answer (`counts::plan`), else by a scan.
    async fn completed_case_counts(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<CaseCounts>, StoreError>;

    /// The same as `completed_case_counts`, always by a scan: what the counts must equal.
    async fn completed_case_counts_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<CaseCounts>, StoreError>;

    /// Completed (办结) cases with id > `after_event_id` that no item rating covers (its
    /// own, its batch's or its theme's; a staff rating does not rate the case), oldest first.
    async fn open_completed_cases(
        &self,
        after_event_id: u64,
        limit: u32,
    ) -> Result<Vec<OpenCase>, StoreError>;

    /// 办件 events with id > `after_id`, oldest first (for relaying them upstream).
    async fn list_case_events(
        &self,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredCaseEvent>, StoreError>;

    /// Rating updates with seq > `after_seq`, oldest first, each with its rating and whether
    /// that rating is an open dead letter of `upstream`.
    async fn list_updates(
        &self,
        upstream: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredUpdate>, StoreError>;

    /// The sequence of the latest rating update (0 when there is none).
    async fn update_head(&self) -> Result<u64, StoreError>;

    /// Rating updates' dead letters an operator asked to replay, with their updates.
    async fn replay_update_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredUpdate)>, StoreError>;

    /// The id of the latest 办件 event (0 when there is none).
    async fn case_head(&self) -> Result<u64, StoreError>;

    /// 办件 events' dead letters an operator asked to replay, with their events.
    async fn replay_case_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredCaseEvent)>, StoreError>;

    /// Invitations with id > `after_id` inside `scope`, oldest first.
    async fn list_invitations(
        &self,
        scope: Option<&ScopeFilter>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredInvitation>, StoreError>;

    /// Whether the database answers (for health): a trivial query on a connection of its
    /// own, on PostgreSQL.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether several hub instances may share this store (and so must take relay leases).
    fn shared(&self) -> bool {
        false
    }

    /// The writer's commit histograms, for the metrics registry.
    fn writer_metrics(&self) -> Option<writer::WriterMetrics> {
        None
    }

    /// Takes or renews the lease to deliver to `upstream` for `ttl`; `None` while another
    /// holder's lease runs. Returns the stored state, so a new holder starts at the stored
    /// cursor. A store only one instance uses always grants it.
    async fn hold_lease(
        &self,
        upstream: &str,
        _holder: &str,
        _ttl: std::time::Duration,
    ) -> Result<Option<UpstreamState>, StoreError> {
        self.upstream_state(upstream).await.map(Some)
    }

    /// Gives the lease up (on shutdown), so another instance need not wait for it to expire.
    async fn release_lease(&self, _upstream: &str, _holder: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Who holds `upstream`'s unexpired lease. Only asked of a shared store.
    async fn lease_holder(&self, _upstream: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// The highest committed feed sequence, updated after every commit (relay and sync wake on it).
    fn feed_head(&self) -> watch::Receiver<u64>;

    /// Finishes every queued write, then stops the writer and closes connections.
    async fn close(&self);
}

/// The associated data binding a rating's sealed PII to the rating.
pub fn rating_aad(hub_id: &Uuid) -> Vec<u8> {
    hub_id.as_bytes().to_vec()
}

/// The associated data binding a case event's sealed PII to the event.
pub fn case_aad(source_system: &str, case_number: &str, event: i32) -> Vec<u8> {
    format!("{source_system}\u{0}{case_number}\u{0}{event}").into_bytes()
}

impl NewRating {
    /// Seals the rater's PII and encodes the body here, on the caller's task, so the single
    /// writer only writes bytes and no plaintext PII reaches the database.
    pub fn new(
        hub_id: Uuid,
        source_system: String,
        rating: ValidRating,
        keys: &PiiKeys,
        checks: IngestChecks,
    ) -> Self {
        use prost::Message;
        use sha2::{Digest, Sha256};
        let mut body = rating.body.clone();
        let phone_tag = body
            .rater
            .as_ref()
            .filter(|r| !r.phone.is_empty())
            .map(|r| keys.tag(r.phone.as_bytes()));
        let pii = keys.seal_persons(
            body.rater.as_mut(),
            body.agent.as_mut(),
            &rating_aad(&hub_id),
        );
        let template_hash = (!body.text.is_empty() || !body.detail_codes.is_empty()).then(|| {
            let mut h = Sha256::new();
            h.update(body.level.to_be_bytes());
            h.update(body.text.as_bytes());
            h.update([0]);
            h.update(body.detail_codes.join(",").as_bytes());
            h.finalize().into()
        });
        Self {
            hub_id,
            source_system,
            rating,
            body_bytes: body.encode_to_vec(),
            pii,
            template_hash,
            phone_tag,
            checks,
        }
    }
}

impl NewCaseEvent {
    pub fn new(source_system: String, case: ValidCase, keys: &PiiKeys) -> Self {
        use prost::Message;
        let mut body = case.body.clone();
        let aad = case_aad(&source_system, &case.case_number, case.event as i32);
        let pii = keys.seal_persons(body.applicant.as_mut(), body.agent.as_mut(), &aad);
        Self {
            source_system,
            case,
            body_bytes: body.encode_to_vec(),
            pii,
        }
    }
}

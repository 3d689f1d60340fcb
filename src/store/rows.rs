//! Reading the hub's rows, once for every backend. Both schemas hold the same columns (with
//! each engine's types), so a row becomes a `StoredRating`, `DeadLetter`, case or count the
//! same way whichever database it came from; only the SQL differs per backend.

use prost::Message;
use sqlx::Row;
use uuid::Uuid;

use super::{
    BadCaseCounts, CaseCounts, CaseEntryRecord, DayOrgDigest, DeadLetter, OpenCase, PiiAccess,
    StatsRow, StoreError, StoredBadCase, StoredCaseEvent, StoredInvitation, StoredRating,
    StoredUpdate,
};
use crate::pb::v1 as pb;
use crate::privacy::Sealed;

/// Typed column access shared by the backends' row types.
pub(crate) trait Columns {
    fn int(&self, col: &str) -> Result<i64, sqlx::Error>;
    fn int32(&self, col: &str) -> Result<i32, sqlx::Error>;
    fn text(&self, col: &str) -> Result<String, sqlx::Error>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error>;
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error>;
    fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>, sqlx::Error>;
    /// The `i`-th column as text (statistics group keys).
    fn text_at(&self, i: usize) -> Result<String, sqlx::Error>;
}

macro_rules! columns {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
                self.try_get(col)
            }
            fn int32(&self, col: &str) -> Result<i32, sqlx::Error> {
                self.try_get(col)
            }
            fn text(&self, col: &str) -> Result<String, sqlx::Error> {
                self.try_get(col)
            }
            fn bytes(&self, col: &str) -> Result<Vec<u8>, sqlx::Error> {
                self.try_get(col)
            }
            fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
                self.try_get(col)
            }
            fn opt_bytes(&self, col: &str) -> Result<Option<Vec<u8>>, sqlx::Error> {
                self.try_get(col)
            }
            fn text_at(&self, i: usize) -> Result<String, sqlx::Error> {
                self.try_get(i)
            }
        }
    };
}

columns!(sqlx::sqlite::SqliteRow);
columns!(sqlx::postgres::PgRow);

pub(crate) fn uuid_from_bytes(bytes: &[u8]) -> Result<Uuid, StoreError> {
    Uuid::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("hub id: {e}")))
}

fn hub_id(row: &impl Columns, col: &str) -> Result<Uuid, StoreError> {
    uuid_from_bytes(&row.bytes(col)?)
}

/// Sealed PII from its two columns `pii` and `pii_key_id` (both or neither).
pub(crate) fn sealed(row: &impl Columns) -> Result<Option<Sealed>, sqlx::Error> {
    Ok(match (row.opt_bytes("pii")?, row.opt_text("pii_key_id")?) {
        (Some(blob), Some(key_id)) => Some(Sealed { key_id, blob }),
        _ => None,
    })
}

fn case_body(row: &impl Columns) -> Result<pb::ServiceCase, StoreError> {
    pb::ServiceCase::decode(row.bytes("body")?.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("case event: {e}")))
}

/// A rating from the columns of `RATING_COLUMNS` (each backend's SELECT of them).
pub(crate) fn stored_rating(row: &impl Columns) -> Result<StoredRating, StoreError> {
    let feed_seq = row.int("feed_seq")? as u64;
    let mut rating = pb::Rating::decode(row.bytes("body")?.as_slice())
        .map_err(|e| StoreError::Corrupt(format!("rating {feed_seq}: {e}")))?;
    rating.hub_id = hub_id(row, "hub_id")?.to_string();
    rating.source_system = row.text("source_system")?;
    rating.feed_sequence = feed_seq;
    // The column is authoritative: the writer may add flags the body was encoded without.
    let bits = row.int("quality_flags")?;
    rating.quality_flags = (1..63).filter(|b| bits & (1 << b) != 0).collect();
    rating.received_at = Some(crate::time::timestamp_from_micros(row.int("received_at")?));
    Ok(StoredRating {
        feed_seq,
        rating,
        pii: sealed(row)?,
    })
}

pub(crate) fn dead_letter(row: &impl Columns) -> Result<DeadLetter, sqlx::Error> {
    Ok(DeadLetter {
        id: row.int("id")? as u64,
        upstream: row.text("upstream")?,
        feed_seq: row.int("feed_seq")? as u64,
        hub_id: row
            .opt_bytes("hub_id")?
            .and_then(|b| Uuid::from_slice(&b).ok()),
        case_event_id: row.opt_int("case_event_id")?.map(|v| v as u64),
        update_seq: row.opt_int("update_seq")?.map(|v| v as u64),
        error: row.text("error")?,
        attempts: row.int("attempts")? as u32,
        created_at_micros: row.int("created_at")?,
        replay_requested: row.flag("replay_requested")?,
        resolved_at_micros: row.opt_int("resolved_at")?,
    })
}

pub(crate) fn case_entry(row: &impl Columns) -> Result<CaseEntryRecord, sqlx::Error> {
    Ok(CaseEntryRecord {
        action: row.int32("action")?,
        actor: row.text("actor")?,
        at_micros: row.int("at")?,
        note: row.text("note")?,
        // Stored newline-separated.
        evidence_refs: row
            .text("evidence_refs")?
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        new_deadline_micros: row.opt_int("new_deadline")?,
        appeal_outcome: row.int32("appeal_outcome")?,
        contacted_by: row.text("contacted_by")?,
        by_rater: row.flag("by_rater")?,
    })
}

/// A case's columns, its place among its organisation's cases of the month included (the
/// index on (org_credit_code, opened_month, id) counts it), leaving out cases an appeal
/// voided (they are never archived, so never checked). Both backends.
pub(crate) const CASE_COLUMNS: &str = "SELECT id, hub_id, org_credit_code, region_code, \
     opened_at, real_name, (SELECT COUNT(*) FROM bad_rating_cases e \
     WHERE e.org_credit_code = c.org_credit_code AND e.opened_month = c.opened_month \
     AND e.id < c.id AND NOT EXISTS (SELECT 1 FROM rating_exclusions x \
     WHERE x.hub_id = e.hub_id)) \
     AS org_month_rank FROM bad_rating_cases c";

/// A bad-rating case from its `bad_rating_cases` row and its history.
pub(crate) fn bad_case(
    row: &impl Columns,
    entries: Vec<CaseEntryRecord>,
) -> Result<StoredBadCase, StoreError> {
    Ok(StoredBadCase {
        id: row.int("id")? as u64,
        hub_id: hub_id(row, "hub_id")?,
        org_credit_code: row.text("org_credit_code")?,
        region_code: row.text("region_code")?,
        opened_at_micros: row.int("opened_at")?,
        real_name: row.flag("real_name")?,
        org_month_rank: row.int("org_month_rank")? as u64,
        entries,
    })
}

pub(crate) fn pii_access(row: &impl Columns) -> Result<PiiAccess, StoreError> {
    Ok(PiiAccess {
        id: row.int("id")? as u64,
        at_micros: row.int("at")?,
        principal: row.text("principal")?,
        rpc: row.text("rpc")?,
        hub_id: hub_id(row, "hub_id")?,
    })
}

pub(crate) fn open_case(row: &impl Columns) -> Result<OpenCase, StoreError> {
    Ok(OpenCase {
        event_id: row.int("id")? as u64,
        source_system: row.text("source_system")?,
        completed_at_micros: row.int("occurred_at")?,
        has_invitation: row.flag("invited")?,
        case: case_body(row)?,
        pii: sealed(row)?,
    })
}

pub(crate) fn invitation(row: &impl Columns) -> Result<StoredInvitation, StoreError> {
    Ok(StoredInvitation {
        id: row.int("id")? as u64,
        source_system: row.text("source_system")?,
        due_at_micros: row.int("due_at")?,
        created_at_micros: row.int("created_at")?,
        case: case_body(row)?,
        pii: sealed(row)?,
    })
}

pub(crate) fn update(row: &impl Columns) -> Result<StoredUpdate, StoreError> {
    Ok(StoredUpdate {
        seq: row.int("seq")? as u64,
        reason: row.int32("reason")?,
        at_micros: row.int("at")?,
        decided_by: row.text("decided_by")?,
        rating: stored_rating(row)?,
        rating_dead: row.flag("rating_dead")?,
    })
}

pub(crate) fn case_event(row: &impl Columns) -> Result<StoredCaseEvent, StoreError> {
    Ok(StoredCaseEvent {
        id: row.int("id")? as u64,
        source_system: row.text("source_system")?,
        case: case_body(row)?,
        pii: sealed(row)?,
    })
}

/// The group key of a grouped row: its first `n` columns as text.
fn group_key(row: &impl Columns, n: usize) -> Result<Vec<String>, sqlx::Error> {
    (0..n).map(|i| row.text_at(i)).collect()
}

/// One group of `stats` (keys `k0…`, then total, l1…l5, defaults, flagged); `None` when
/// the group is empty.
pub(crate) fn stats_row(row: &impl Columns, n: usize) -> Result<Option<StatsRow>, sqlx::Error> {
    let total = row.int("total")? as u64;
    if total == 0 {
        return Ok(None);
    }
    let mut per_level = [0u64; 5];
    for (i, slot) in per_level.iter_mut().enumerate() {
        *slot = row.int(&format!("l{}", i + 1))? as u64;
    }
    Ok(Some(StatsRow {
        key: group_key(row, n)?,
        total,
        per_level,
        default_ratings: row.int("defaults")? as u64,
        flagged: row.int("flagged")? as u64,
        ..Default::default()
    }))
}

/// One group of `bad_case_counts` (keys, then n, rectified, called_back).
pub(crate) fn bad_case_counts(row: &impl Columns, n: usize) -> Result<BadCaseCounts, sqlx::Error> {
    Ok(BadCaseCounts {
        key: group_key(row, n)?,
        cases: row.int("n")? as u64,
        rectified: row.int("rectified")? as u64,
        called_back: row.int("called_back")? as u64,
        real_name: row.int("real_name")? as u64,
        real_name_done: row.int("real_name_done")? as u64,
        archived: row.int("archived")? as u64,
        spot_checked: row.int("spot_checked")? as u64,
    })
}

/// One group of `completed_case_counts` (keys, then n, rated, active).
pub(crate) fn case_counts(row: &impl Columns, n: usize) -> Result<CaseCounts, sqlx::Error> {
    Ok(CaseCounts {
        key: group_key(row, n)?,
        completed: row.int("n")? as u64,
        rated: row.int("rated")? as u64,
        actively_rated: row.int("active")? as u64,
    })
}

/// Folds rows of (day, org_credit_code, hub_id), ordered by day and organisation, into one
/// entry per (day, organisation).
/// Folds the rows of a reconciliation query (day, org_credit_code, hub_id; ordered by day and
/// organisation) into one count and digest per group, a row at a time.
#[derive(Default)]
pub(crate) struct DayOrgFold(Vec<DayOrgDigest>);

impl DayOrgFold {
    pub fn push<R: Columns>(&mut self, row: &R) -> Result<(), StoreError> {
        let day = row.text("day")?;
        let org = row.text("org_credit_code")?;
        let id = hub_id(row, "hub_id")?;
        let group = match self.0.last_mut() {
            Some(last) if last.day == day && last.org_credit_code == org => last,
            _ => {
                self.0.push(DayOrgDigest {
                    day,
                    org_credit_code: org,
                    count: 0,
                    digest: [0; 32],
                });
                self.0.last_mut().expect("just pushed")
            }
        };
        group.count += 1;
        super::fold_digest(&mut group.digest, &id);
        Ok(())
    }

    pub fn finish(self) -> Vec<DayOrgDigest> {
        self.0
    }
}

pub(crate) fn attempt(row: &impl Columns) -> Result<crate::store::AttemptRecord, sqlx::Error> {
    Ok(crate::store::AttemptRecord {
        id: row.int("id")? as u64,
        upstream: row.text("upstream")?,
        at_micros: row.int("at")?,
        first_seq: row.int("first_seq")? as u64,
        last_seq: row.int("last_seq")? as u64,
        records: row.int("records")? as u32,
        outcome: row.text("outcome")?,
        detail: row.text("detail")?,
        duration_ms: row.int("duration_ms")? as u32,
        replay_id: row.opt_int("replay_id")?.map(|v| v as u64),
    })
}

pub(crate) fn range_replay(row: &impl Columns) -> Result<crate::store::RangeReplay, sqlx::Error> {
    Ok(crate::store::RangeReplay {
        id: row.int("id")? as u64,
        upstream: row.text("upstream")?,
        from_seq: row.int("from_seq")? as u64,
        to_seq: row.int("to_seq")? as u64,
        next_seq: row.int("next_seq")? as u64,
        requested_by: row.text("requested_by")?,
        requested_at_micros: row.int("requested_at")?,
        reason: row.text("reason")?,
        done_at_micros: row.opt_int("done_at")?,
    })
}

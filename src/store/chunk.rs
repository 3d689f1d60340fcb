//! Ratings of one group commit, decided a chunk at a time — the same on every backend.
//!
//! The profile of the single writer showed per-statement round trips dominating
//! (docs/benchmarks.md), so the writer asks the database once per chunk: which keys exist,
//! which cases / batches / visits already have a rating, how many recent ratings share a
//! template, device or phone ([`Lookups`]). It then decides every rating in memory, in order
//! (a rating also sees the ones before it in the same chunk), assigns feed sequences to the
//! accepted ones and inserts them with one multi-row INSERT. Follow-ups (rare) flush what is
//! pending and ask the database about their original, so they see everything before them.
//!
//! A backend supplies the queries ([`ChunkBackend`]); this module owns the rules and texts.

use std::collections::{HashMap, HashSet};

use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::pb::v1 as pb;
use crate::store::log::{LeafCols, LogAppend};
use crate::store::rows::uuid_from_bytes;
use crate::store::{InsertOutcome, NewRating};

/// Ratings decided per look-up. A look-up binds at most 10 values per rating (SQLite; the
/// PostgreSQL look-ups bind arrays), far below SQLite's 32,766. Backends split the INSERT
/// further as they need.
pub(crate) const CHUNK: usize = 1000;

pub(crate) type Key = (String, String);

/// (hub id, feed sequence, content hash) of a stored or pending rating.
pub(crate) type Known = (Uuid, u64, Vec<u8>);

/// What the database already holds that bears on one chunk.
#[derive(Default)]
pub(crate) struct Lookups {
    /// Stored ratings with the chunk's (source system, source key) pairs.
    pub by_key: HashMap<Key, Known>,
    /// Stored ratings with the chunk's relayed hub ids.
    pub by_id: HashMap<Uuid, Known>,
    /// (organisation, case number) with an item rating (not a follow-up), and what kind.
    pub cases: HashMap<(String, String), CaseRated>,
    /// (organisation, batch id) with an item rating, and what kind.
    pub batches: HashMap<(String, String), CaseRated>,
    /// (organisation, case number, staff id) with staff ratings: the visits they name ("":
    /// none named).
    pub visits: HashMap<(String, String, String), HashSet<String>>,
    /// Recent ratings per (source system, template hash), device and phone tag.
    pub templates: HashMap<(String, Vec<u8>), i64>,
    pub devices: HashMap<String, i64>,
    pub phones: HashMap<Vec<u8>, i64>,
}

/// How a case is rated so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CaseRated {
    /// By a rater (any rating that is not a default rating).
    pub real: bool,
    /// By the hub's default rating, not superseded: its hub id and `rated_at` (the default's
    /// deadline).
    pub default: Option<(Uuid, i64)>,
}

/// Adds one row of a chunk's look-up to `l`. Both backends send every part of a look-up in
/// one statement whose rows are tagged by part, with the columns (tag, text a, text b,
/// text c, blob x, blob y, integer n); unused columns are NULL.
pub(crate) fn read_lookup_row<R: Row>(row: &R, l: &mut Lookups) -> Result<(), sqlx::Error>
where
    usize: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let text = |i: usize| row.try_get::<String, _>(i);
    let blob = |i: usize| row.try_get::<Vec<u8>, _>(i);
    let int = |i: usize| row.try_get::<i64, _>(i);
    match int(0)? {
        1 => {
            let known = (
                uuid_from_bytes(&blob(4)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                int(6)? as u64,
                blob(5)?,
            );
            l.by_id.insert(known.0, known.clone());
            l.by_key.insert((text(1)?, text(2)?), known);
        }
        2 => {
            // n: the default rating's rated_at, or -1 for a rater's own rating.
            let entry = l.cases.entry((text(1)?, text(2)?)).or_default();
            match int(6)? {
                -1 => entry.real = true,
                at => {
                    let id =
                        uuid_from_bytes(&blob(4)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    entry.default = Some((id, at));
                }
            }
        }
        3 => {
            // As for cases: n is the default's rated_at, or -1 for a rater's own rating.
            let entry = l.batches.entry((text(1)?, text(2)?)).or_default();
            match int(6)? {
                -1 => entry.real = true,
                at => {
                    let id =
                        uuid_from_bytes(&blob(4)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                    entry.default = Some((id, at));
                }
            }
        }
        4 => {
            // x: the visit id's bytes (the row has three text columns).
            let visit =
                String::from_utf8(blob(4)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            l.visits
                .entry((text(1)?, text(2)?, text(3)?))
                .or_default()
                .insert(visit);
        }
        5 => {
            l.templates.insert((text(1)?, blob(4)?), int(6)?);
        }
        6 => {
            l.devices.insert(text(1)?, int(6)?);
        }
        7 => {
            l.phones.insert(blob(4)?, int(6)?);
        }
        tag => {
            return Err(sqlx::Error::Protocol(format!(
                "look-up row with unknown tag {tag}"
            )));
        }
    }
    Ok(())
}

/// The time window a chunk's quality counts cover: [earliest − window, latest]. In live
/// traffic the ratings of one chunk are moments apart (docs/decisions/0004).
pub(crate) fn rated_at_range(chunk: &[&NewRating]) -> (i64, i64) {
    let at = chunk.iter().map(|i| i.rating.rated_at_micros);
    (at.clone().min().unwrap_or(0), at.max().unwrap_or(0))
}

/// Ratings subject to the counting rules of one target kind (not follow-ups).
pub(crate) fn counted<'a>(
    chunk: &'a [&'a NewRating],
    kind: pb::TargetKind,
) -> impl Iterator<Item = &'a NewRating> + Clone + 'a {
    chunk.iter().copied().filter(move |i| {
        i.checks.counting && i.rating.body.follow_up_of.is_empty() && i.rating.target_kind == kind
    })
}

/// Item ratings whose case the look-up reports (counted ones, and relayed ratings, which
/// are not counted but may supersede a default rating).
pub(crate) fn case_rated_candidates<'a>(
    chunk: &'a [&'a NewRating],
) -> impl Iterator<Item = &'a NewRating> + Clone + 'a {
    chunk.iter().copied().filter(|i| {
        i.rating.target_kind == pb::TargetKind::Item
            && i.rating.body.follow_up_of.is_empty()
            && !i.rating.case_number.is_empty()
            && (i.checks.counting || !i.rating.is_default)
    })
}

/// A decided rating waiting for the chunk's INSERT.
pub(crate) struct Pending<'a> {
    pub item: &'a NewRating,
    pub seq: u64,
    pub flags: Vec<pb::QualityFlag>,
    /// The default ratings this rating replaces: made by the rater in time, it arrived after
    /// the hub had rated the case (or its batch) by default (an offline hall device, a paper
    /// form typed in later). They leave the counts (rating_exclusions), with this rating's id.
    pub supersedes: Vec<Uuid>,
}

impl Pending<'_> {
    /// The rating's quality flags (its own and the store's) as the stored bit set.
    pub fn flag_bits(&self) -> i64 {
        self.item
            .rating
            .quality_flags
            .iter()
            .chain(&self.flags)
            .fold(0i64, |acc, f| acc | (1 << (*f as i32)))
    }

    /// Whether the rating opens a 差评 case (a rater's own 差评, not a default rating).
    pub fn opens_case(&self) -> bool {
        crate::domain::rating::is_bad(self.item.rating.level) && !self.item.rating.is_default
    }
}

/// The stored original of a follow-up, as the follow-up rules need it.
pub(crate) struct FollowUpFacts {
    pub original_rated_at: i64,
    /// The "original" is itself a follow-up.
    pub original_is_follow_up: bool,
    /// Follow-ups of the original already stored (other than this one's key).
    pub earlier: i64,
}

/// The queries a backend answers for the chunk writer, inside the group's transaction.
pub(crate) trait ChunkBackend {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error>;
    /// `None` when the original is not stored.
    async fn follow_up_facts(
        &mut self,
        item: &NewRating,
    ) -> Result<Option<FollowUpFacts>, sqlx::Error>;
    /// Inserts the ratings (one statement) and opens the 差评 cases among them. Must fail if
    /// not every rating was inserted: nothing may be acknowledged around a feed gap.
    async fn insert(
        &mut self,
        pending: &[Pending<'_>],
        received_at: i64,
    ) -> Result<(), sqlx::Error>;
}

/// Writes `items` (in order) and returns one outcome each. `next_seq` advances by the number
/// of accepted ratings.
pub(crate) async fn write_ratings<'a, B: ChunkBackend>(
    backend: &mut B,
    items: &[&'a NewRating],
    next_seq: &mut u64,
    received_at: i64,
    log: &mut LogAppend<'a>,
) -> Result<Vec<InsertOutcome>, sqlx::Error> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(CHUNK) {
        out.extend(write_chunk(backend, chunk, next_seq, received_at, log).await?);
    }
    Ok(out)
}

fn outcome_against(item: &NewRating, same_key: bool, known: &Known) -> InsertOutcome {
    let (hub_id, feed_seq, hash) = (known.0, known.1, &known.2);
    if same_key && *hash == item.rating.content_hash {
        InsertOutcome::Duplicate { hub_id, feed_seq }
    } else {
        InsertOutcome::Conflict { hub_id, feed_seq }
    }
}

/// 追加评价: the original must exist, the limit and the window hold. `None` when allowed.
fn follow_up_rule(
    item: &NewRating,
    facts: Option<FollowUpFacts>,
) -> Option<(&'static str, String)> {
    let r = &item.rating;
    let of = &r.body.follow_up_of;
    let Some(facts) = facts else {
        return Some((
            "follow_up_of",
            format!("no rating with source key {of:?} from this source to follow up"),
        ));
    };
    if facts.original_is_follow_up {
        // 追加评价 follows the rating of the service, once: a follow-up of a follow-up
        // would let one rating be "followed up" without limit (docs/decisions/0006).
        return Some((
            "follow_up_of",
            format!("{of:?} is itself a follow-up; a follow-up names the original rating"),
        ));
    }
    let limit = item.checks.follow_up_limit;
    if facts.earlier as u64 >= u64::from(limit) {
        return Some((
            "follow_up_of",
            format!(
                "the rating already has {} follow-up(s); at most {limit} allowed (追加评价)",
                facts.earlier
            ),
        ));
    }
    let window = item.checks.follow_up_window_secs;
    if r.rated_at_micros - facts.original_rated_at > window * 1_000_000 {
        return Some((
            "follow_up_of",
            format!(
                "a follow-up must come within {} days of the original rating",
                window / 86_400
            ),
        ));
    }
    None
}

/// The default ratings a rating replaces: it is an item rating by a rater (not a default,
/// not a follow-up) of a case whose case — and batch, when it has one — so far has only the
/// hub's default rating, made no later than that default's deadline (the default's
/// `rated_at`) — or a 差评 made at any time: a citizen's complaint is never lost behind a
/// default (it opens its case, to be verified and rectified), while later praise changes
/// nothing the default did not already say. A relayed rating was decided by the hub below,
/// which replaced the default there: it replaces it here too. Empty when it replaces
/// nothing.
fn supersedes(item: &NewRating, l: &Lookups) -> Vec<Uuid> {
    let r = &item.rating;
    if r.target_kind != pb::TargetKind::Item
        || r.is_default
        || !r.body.follow_up_of.is_empty()
        || r.case_number.is_empty()
    {
        return Vec::new();
    }
    let org = r.org_credit_code.as_str().to_owned();
    let case = l.cases.get(&(org.clone(), r.case_number.clone()));
    let batch = (!r.body.batch_id.is_empty())
        .then(|| l.batches.get(&(org, r.body.batch_id.clone())))
        .flatten();
    let mut replaced = Vec::new();
    for rated in [case, batch].into_iter().flatten() {
        if rated.real {
            // A rater rated it: nothing to replace (the counting rules refuse this one).
            return Vec::new();
        }
        if let Some((default, deadline)) = rated.default {
            if item.checks.counting
                && r.rated_at_micros > deadline
                && !crate::domain::rating::is_bad(r.level)
            {
                return Vec::new();
            }
            if !replaced.contains(&default) {
                replaced.push(default);
            }
        }
    }
    replaced
}

/// 一事一评, 一次一评 and one rating per batch, against what is stored and decided so far.
fn counting_rule(item: &NewRating, l: &Lookups) -> Option<(&'static str, String)> {
    let r = &item.rating;
    let org = r.org_credit_code.as_str().to_owned();
    if r.target_kind == pb::TargetKind::Item && !r.is_default {
        let case = l
            .cases
            .get(&(org.clone(), r.case_number.clone()))
            .map(|c| (c, format!("case {:?}", r.case_number)));
        let batch = (!r.body.batch_id.is_empty())
            .then(|| l.batches.get(&(org.clone(), r.body.batch_id.clone())))
            .flatten()
            .map(|c| (c, format!("batch {:?}", r.body.batch_id)));
        let rated_by_a_rater = [&case, &batch]
            .into_iter()
            .flatten()
            .any(|(rated, _)| rated.real);
        for (rated, what) in [case, batch].into_iter().flatten() {
            if rated_by_a_rater {
                // The generic 一事一评 / batch refusal below says what it is.
                break;
            }
            if let Some((_, deadline)) = rated.default
                && !crate::domain::rating::is_bad(r.level)
            {
                // Only a default, and this rating — not a 差评 — was made after its
                // deadline (one made before it, or a 差评, replaces the default: see
                // `supersedes`).
                return Some((
                    "rated_at",
                    format!(
                        "{what} was rated by default at {} because no rating was made by then; \
                         a rating made after that ({}) cannot replace it (一事一评) unless it \
                         is a 差评",
                        crate::time::format_cst_micros(deadline),
                        crate::time::format_cst_micros(r.rated_at_micros),
                    ),
                ));
            }
        }
    }
    match r.target_kind {
        pb::TargetKind::Item
            if !r.body.batch_id.is_empty()
                && l.batches
                    .contains_key(&(org.clone(), r.body.batch_id.clone())) =>
        {
            Some((
                "batch_id",
                format!(
                    "batch {:?} already has its rating: one rating applies to every case of a batch (批量业务)",
                    r.body.batch_id
                ),
            ))
        }
        pb::TargetKind::Item if l.cases.contains_key(&(org.clone(), r.case_number.clone())) => {
            Some((
                "case_number",
                format!(
                    "case {:?} already has an item rating (一事一评); a second rating must be a follow-up (follow_up_of)",
                    r.case_number
                ),
            ))
        }
        pb::TargetKind::Staff
            if !r.case_number.is_empty()
                && l.visits
                    .get(&(org, r.case_number.clone(), r.staff_id.clone()))
                    .is_some_and(|seen| {
                        visit_taken(seen, &r.body.visit_id, item.checks.per_visit)
                    }) =>
        {
            Some((
                "staff_id",
                if r.body.visit_id.is_empty() {
                    format!(
                        "staff member {:?} was already rated for this visit (case {:?}): 一次一评; \
                         a rating after another window visit names that visit (visit_id)",
                        r.staff_id, r.case_number
                    )
                } else {
                    format!(
                        "staff member {:?} was already rated for visit {:?} of case {:?}: 一次一评",
                        r.staff_id, r.body.visit_id, r.case_number
                    )
                },
            ))
        }
        _ => None,
    }
}

/// Whether a staff rating for `visit` is a second one for its visit, given the visits already
/// rated for the same case and staff member. One per case where the profile has no visits;
/// one per named visit where it has (Guangdong: "每次到窗口办理后"), and a rating that names no
/// visit cannot be told apart from any other, so it conflicts with every one.
fn visit_taken(seen: &HashSet<String>, visit: &str, per_visit: bool) -> bool {
    if !per_visit || visit.is_empty() {
        !seen.is_empty()
    } else {
        seen.contains(visit) || seen.contains("")
    }
}

async fn write_chunk<'a, B: ChunkBackend>(
    backend: &mut B,
    chunk: &[&'a NewRating],
    next_seq: &mut u64,
    received_at: i64,
    log: &mut LogAppend<'a>,
) -> Result<Vec<InsertOutcome>, sqlx::Error> {
    let mut l = backend.lookups(chunk).await?;
    let q = chunk[0].checks.quality;
    let mut out: Vec<Option<InsertOutcome>> = vec![None; chunk.len()];
    let mut pending = Batch::default();
    for (pos, item) in chunk.iter().enumerate() {
        let r = &item.rating;
        let k = (item.source_system.clone(), r.source_key.clone());
        if let Some(known) = l.by_key.get(&k) {
            out[pos] = Some(outcome_against(item, true, known));
            continue;
        }
        if r.relayed_hub_id.is_some()
            && let Some(known) = l.by_id.get(&item.hub_id)
        {
            out[pos] = Some(outcome_against(item, false, known));
            continue;
        }
        let replaces = supersedes(item, &l);
        if item.checks.counting && replaces.is_empty() {
            let refusal = if !r.body.follow_up_of.is_empty() {
                // The original may be in this chunk: insert what is pending first.
                flush(backend, &mut pending, &mut out, received_at, log).await?;
                let facts = backend.follow_up_facts(item).await?;
                follow_up_rule(item, facts)
            } else {
                counting_rule(item, &l)
            };
            if let Some((field, reason)) = refusal {
                out[pos] = Some(InsertOutcome::Refused { field, reason });
                continue;
            }
        }
        // Accepted: flags against what is stored plus this chunk's earlier ratings.
        let mut flags = Vec::new();
        if let Some(h) = item.template_hash {
            let n = l
                .templates
                .entry((item.source_system.clone(), h.to_vec()))
                .or_default();
            *n += 1;
            if *n >= i64::from(q.template_min) {
                flags.push(pb::QualityFlag::Templated);
            }
        }
        if !r.body.device_id.is_empty() {
            let n = l.devices.entry(r.body.device_id.clone()).or_default();
            *n += 1;
            if *n >= i64::from(q.device_burst) {
                flags.push(pb::QualityFlag::DeviceBurst);
            }
        }
        if let Some(tag) = item.phone_tag {
            let n = l.phones.entry(tag.to_vec()).or_default();
            *n += 1;
            if *n >= i64::from(q.phone_burst) {
                flags.push(pb::QualityFlag::PhoneBurst);
            }
        }
        let seq = *next_seq;
        *next_seq += 1;
        let known = (item.hub_id, seq, r.content_hash.to_vec());
        l.by_id.insert(item.hub_id, known.clone());
        l.by_key.insert(k, known);
        if r.target_kind == pb::TargetKind::Item && r.body.follow_up_of.is_empty() {
            // What the next ratings of this chunk see of the case and its batch.
            let org = r.org_credit_code.as_str().to_owned();
            let mut entries = vec![
                l.cases
                    .entry((org.clone(), r.case_number.clone()))
                    .or_default(),
            ];
            if !r.body.batch_id.is_empty() {
                entries.push(l.batches.entry((org, r.body.batch_id.clone())).or_default());
            }
            for entry in entries {
                if r.is_default {
                    entry.default = Some((item.hub_id, r.rated_at_micros));
                } else {
                    entry.real = true;
                }
            }
        }
        if item.checks.counting
            && r.body.follow_up_of.is_empty()
            && r.target_kind == pb::TargetKind::Staff
        {
            l.visits
                .entry((
                    r.org_credit_code.as_str().to_owned(),
                    r.case_number.clone(),
                    r.staff_id.clone(),
                ))
                .or_default()
                .insert(r.body.visit_id.clone());
        }
        pending.positions.push(pos);
        pending.rows.push(Pending {
            item,
            seq,
            flags,
            supersedes: replaces,
        });
    }
    flush(backend, &mut pending, &mut out, received_at, log).await?;
    Ok(out
        .into_iter()
        .map(|o| o.expect("every rating decided"))
        .collect())
}

/// Decided ratings and their places in the chunk.
#[derive(Default)]
struct Batch<'a> {
    positions: Vec<usize>,
    rows: Vec<Pending<'a>>,
}

async fn flush<'a, B: ChunkBackend>(
    backend: &mut B,
    pending: &mut Batch<'a>,
    out: &mut [Option<InsertOutcome>],
    received_at: i64,
    log: &mut LogAppend<'a>,
) -> Result<(), sqlx::Error> {
    if pending.rows.is_empty() {
        return Ok(());
    }
    backend.insert(&pending.rows, received_at).await?;
    // Each inserted row's leaf, as stored (in feed order: sequences are taken in order),
    // hashed before the group's log nodes are written: the SQLite writer hashes them while
    // its database thread runs the group's statements.
    log.rows.extend(
        pending
            .rows
            .iter()
            .map(|p| LeafCols::of_pending(p, received_at)),
    );
    for (pos, p) in pending.positions.drain(..).zip(pending.rows.drain(..)) {
        out[pos] = Some(InsertOutcome::Accepted {
            hub_id: p.item.hub_id,
            feed_seq: p.seq,
            flags: p.flags,
        });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use crate::clock::{Clock, SystemClock};
    use crate::pb::v1 as pb;
    use crate::privacy::PiiKeys;
    use crate::store::{IngestChecks, NewRating};

    fn raw(key: &str, kind: pb::TargetKind) -> pb::Rating {
        pb::Rating {
            source_key: key.into(),
            channel: pb::Channel::HallDevice as i32,
            level: pb::Level::Satisfied as i32,
            target_kind: kind as i32,
            case_number: format!("CASE-{key}"),
            item_code: "530100-ITEM-001".into(),
            region_code: "530102".into(),
            org_credit_code: crate::domain::codes::credit_code_with_check("11530100MA0000001")
                .unwrap(),
            staff_id: "S007".into(),
            text: "办事顺利".into(),
            batch_id: format!("B-{key}"),
            device_id: "PAD-1".into(),
            rated_at: Some(crate::time::timestamp_from_micros(SystemClock.now_micros())),
            rater: Some(pb::Rater {
                kind: pb::RaterKind::NaturalPerson as i32,
                phone: "13800138000".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A chunk that needs every part of a look-up: `copies` times an item rating, a staff
    /// rating and a relayed rating, each with text (template), a batch, a device and a
    /// phone. The PII key goes in `dir`.
    pub(crate) fn lookup_chunk(dir: &Path, copies: usize) -> Vec<NewRating> {
        let key = dir.join("pii.key");
        PiiKeys::create_key_file(&key).unwrap();
        let keys = PiiKeys::load(
            "k",
            &BTreeMap::from([("k".into(), key.display().to_string())]),
        )
        .unwrap();
        let now = SystemClock.now_micros();
        let checks = IngestChecks {
            counting: true,
            ..Default::default()
        };
        let new = |raw: pb::Rating, relay: bool| {
            let v = crate::domain::parse_rating(&raw, now, &Default::default(), relay).unwrap();
            NewRating::new(uuid::Uuid::now_v7(), "sys".into(), v, &keys, checks.clone())
        };
        let mut chunk = Vec::with_capacity(3 * copies);
        for n in 0..copies {
            let mut relayed = raw(&format!("r{n}"), pb::TargetKind::Item);
            relayed.hub_id = uuid::Uuid::now_v7().to_string();
            relayed.origin_source_system = "lower".into();
            relayed.origin_source_key = format!("r{n}");
            chunk.push(new(raw(&format!("a{n}"), pb::TargetKind::Item), false));
            chunk.push(new(raw(&format!("b{n}"), pb::TargetKind::Staff), false));
            chunk.push(new(relayed, true));
        }
        chunk
    }
}

//! Ratings of one group commit, written with a handful of statements per chunk instead of
//! several per rating. The profile of the single writer showed sqlx's per-statement hand-off
//! to its SQLite thread dominating (docs/benchmarks.md), so the writer asks once per chunk:
//! which keys exist, which cases / batches / visits already have a rating, how many recent
//! ratings share a template, device or phone — then decides every rating in memory, in order
//! (a rating also sees the ones before it in the same chunk), assigns feed sequences to the
//! accepted ones and inserts them with one multi-row INSERT. Follow-ups (rare) flush what is
//! pending and take the per-row path, which sees everything before them.

use std::collections::{HashMap, HashSet};

use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use super::{counting_rule, uuid_from_row};
use crate::pb::v1 as pb;
use crate::store::{InsertOutcome, NewRating};

/// Ratings per chunk: 26 bound columns each stays far below SQLite's variable limit.
const CHUNK: usize = 200;

type Key = (String, String);

/// A decided rating waiting for the chunk's INSERT.
struct Pending<'a> {
    item: &'a NewRating,
    seq: u64,
    flags: Vec<pb::QualityFlag>,
}

/// Writes `items` (in order) and returns one outcome each. `next_seq` advances by the number
/// of accepted ratings.
pub(super) async fn write_ratings(
    conn: &mut SqliteConnection,
    items: &[&NewRating],
    next_seq: &mut u64,
    received_at: i64,
) -> Result<Vec<InsertOutcome>, sqlx::Error> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(CHUNK) {
        out.extend(write_chunk(conn, chunk, next_seq, received_at).await?);
    }
    Ok(out)
}

fn key(item: &NewRating) -> Key {
    (item.source_system.clone(), item.rating.source_key.clone())
}

/// (hub id, feed sequence, content hash) of stored or pending ratings.
type Known = (Uuid, u64, Vec<u8>);

fn outcome_against(item: &NewRating, same_key: bool, known: &Known) -> InsertOutcome {
    let (hub_id, feed_seq, hash) = (known.0, known.1, &known.2);
    if same_key && *hash == item.rating.content_hash {
        InsertOutcome::Duplicate { hub_id, feed_seq }
    } else {
        InsertOutcome::Conflict { hub_id, feed_seq }
    }
}

async fn write_chunk(
    conn: &mut SqliteConnection,
    chunk: &[&NewRating],
    next_seq: &mut u64,
    received_at: i64,
) -> Result<Vec<InsertOutcome>, sqlx::Error> {
    // 1. Stored ratings with these keys (or, for relayed ratings, these hub ids).
    let mut by_key: HashMap<Key, Known> = HashMap::new();
    let mut by_id: HashMap<Uuid, Known> = HashMap::new();
    {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT source_system, source_key, hub_id, feed_seq, content_hash FROM ratings \
             WHERE (source_system, source_key) IN (",
        );
        qb.push_values(chunk, |mut b, item| {
            b.push_bind(item.source_system.clone())
                .push_bind(item.rating.source_key.clone());
        });
        qb.push(")");
        let relayed: Vec<Uuid> = chunk
            .iter()
            .filter(|i| i.rating.relayed_hub_id.is_some())
            .map(|i| i.hub_id)
            .collect();
        if !relayed.is_empty() {
            qb.push(" OR hub_id IN (");
            let mut sep = qb.separated(", ");
            for id in &relayed {
                sep.push_bind(id.as_bytes().to_vec());
            }
            qb.push(")");
        }
        for row in qb.build().fetch_all(&mut *conn).await? {
            let known = (
                uuid_from_row(&row, "hub_id")?,
                row.try_get::<i64, _>("feed_seq")? as u64,
                row.try_get::<Vec<u8>, _>("content_hash")?,
            );
            by_id.insert(known.0, known.clone());
            by_key.insert(
                (row.try_get("source_system")?, row.try_get("source_key")?),
                known,
            );
        }
    }

    // 2. Counting rules: cases, batches and visits that already have a rating.
    let counted: Vec<&&NewRating> = chunk
        .iter()
        .filter(|i| i.checks.counting && i.rating.body.follow_up_of.is_empty())
        .collect();
    let items_of =
        |kind: pb::TargetKind| counted.iter().filter(move |i| i.rating.target_kind == kind);
    let mut cases: HashSet<(String, String)> = HashSet::new();
    let mut batches: HashSet<(String, String)> = HashSet::new();
    let mut visits: HashSet<(String, String, String)> = HashSet::new();
    if items_of(pb::TargetKind::Item).next().is_some() {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT org_credit_code, case_number FROM ratings WHERE target_kind = 1 \
             AND follow_up_of = '' AND (org_credit_code, case_number) IN (",
        );
        qb.push_values(items_of(pb::TargetKind::Item), |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                .push_bind(i.rating.case_number.clone());
        });
        qb.push(")");
        for row in qb.build().fetch_all(&mut *conn).await? {
            cases.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    if items_of(pb::TargetKind::Item).any(|i| !i.rating.body.batch_id.is_empty()) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT org_credit_code, batch_id FROM ratings WHERE target_kind = 1 \
             AND follow_up_of = '' AND batch_id <> '' AND (org_credit_code, batch_id) IN (",
        );
        qb.push_values(
            items_of(pb::TargetKind::Item).filter(|i| !i.rating.body.batch_id.is_empty()),
            |mut b, i| {
                b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                    .push_bind(i.rating.body.batch_id.clone());
            },
        );
        qb.push(")");
        for row in qb.build().fetch_all(&mut *conn).await? {
            batches.insert((row.try_get(0)?, row.try_get(1)?));
        }
    }
    if items_of(pb::TargetKind::Staff).any(|i| !i.rating.case_number.is_empty()) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT org_credit_code, case_number, staff_id FROM ratings WHERE target_kind = 3 \
             AND follow_up_of = '' AND (org_credit_code, case_number, staff_id) IN (",
        );
        qb.push_values(
            items_of(pb::TargetKind::Staff).filter(|i| !i.rating.case_number.is_empty()),
            |mut b, i| {
                b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                    .push_bind(i.rating.case_number.clone())
                    .push_bind(i.rating.staff_id.clone());
            },
        );
        qb.push(")");
        for row in qb.build().fetch_all(&mut *conn).await? {
            visits.insert((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
        }
    }

    // 3. Recent ratings per template, device and phone, over the chunk's window. (Each rating
    //    is counted against [earliest in chunk − window, latest in chunk]: in live traffic the
    //    ratings of one chunk are moments apart.)
    let q = chunk[0].checks.quality;
    let min_at = chunk
        .iter()
        .map(|i| i.rating.rated_at_micros)
        .min()
        .unwrap_or(0);
    let max_at = chunk
        .iter()
        .map(|i| i.rating.rated_at_micros)
        .max()
        .unwrap_or(0);
    let mut templates: HashMap<(String, Vec<u8>), i64> = HashMap::new();
    let mut devices: HashMap<String, i64> = HashMap::new();
    let mut phones: HashMap<Vec<u8>, i64> = HashMap::new();
    if chunk.iter().any(|i| i.template_hash.is_some()) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT source_system, template_hash, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.template_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND (source_system, template_hash) IN (");
        qb.push_values(
            chunk.iter().filter(|i| i.template_hash.is_some()),
            |mut b, i| {
                b.push_bind(i.source_system.clone())
                    .push_bind(i.template_hash.map(|h| h.to_vec()).unwrap_or_default());
            },
        );
        qb.push(") GROUP BY 1, 2");
        for row in qb.build().fetch_all(&mut *conn).await? {
            templates.insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
        }
    }
    if chunk.iter().any(|i| !i.rating.body.device_id.is_empty()) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT device_id, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.device_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND device_id IN (");
        let mut sep = qb.separated(", ");
        for i in chunk.iter().filter(|i| !i.rating.body.device_id.is_empty()) {
            sep.push_bind(i.rating.body.device_id.clone());
        }
        qb.push(") GROUP BY 1");
        for row in qb.build().fetch_all(&mut *conn).await? {
            devices.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }
    if chunk.iter().any(|i| i.phone_tag.is_some()) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT phone_tag, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.phone_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND phone_tag IN (");
        let mut sep = qb.separated(", ");
        for i in chunk.iter().filter_map(|i| i.phone_tag) {
            sep.push_bind(i.to_vec());
        }
        qb.push(") GROUP BY 1");
        for row in qb.build().fetch_all(&mut *conn).await? {
            phones.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }

    // 4. Decide each rating in order.
    let mut out: Vec<Option<InsertOutcome>> = vec![None; chunk.len()];
    let mut pending: Vec<(usize, Pending<'_>)> = Vec::new();
    for (pos, item) in chunk.iter().enumerate() {
        let r = &item.rating;
        let k = key(item);
        if let Some(known) = by_key.get(&k) {
            out[pos] = Some(outcome_against(item, true, known));
            continue;
        }
        if r.relayed_hub_id.is_some()
            && let Some(known) = by_id.get(&item.hub_id)
        {
            out[pos] = Some(outcome_against(item, false, known));
            continue;
        }
        if item.checks.counting {
            let refusal = if !r.body.follow_up_of.is_empty() {
                // The per-row path must see this chunk's earlier ratings: insert them first.
                flush(conn, &mut pending, &mut out, received_at).await?;
                counting_rule(conn, item).await?
            } else {
                let org = r.org_credit_code.as_str().to_owned();
                match r.target_kind {
                    pb::TargetKind::Item
                        if !r.body.batch_id.is_empty()
                            && batches.contains(&(org.clone(), r.body.batch_id.clone())) =>
                    {
                        Some((
                            "batch_id",
                            format!(
                                "batch {:?} already has its rating: one rating applies to every case of a batch (批量业务)",
                                r.body.batch_id
                            ),
                        ))
                    }
                    pb::TargetKind::Item
                        if cases.contains(&(org.clone(), r.case_number.clone())) =>
                    {
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
                            && visits.contains(&(
                                org.clone(),
                                r.case_number.clone(),
                                r.staff_id.clone(),
                            )) =>
                    {
                        Some((
                            "staff_id",
                            format!(
                                "staff member {:?} was already rated for this visit (case {:?}): 一次一评",
                                r.staff_id, r.case_number
                            ),
                        ))
                    }
                    _ => None,
                }
            };
            if let Some((field, reason)) = refusal {
                out[pos] = Some(InsertOutcome::Refused { field, reason });
                continue;
            }
        }
        // Accepted: flags against what is stored plus this chunk's earlier ratings.
        let mut flags = Vec::new();
        if let Some(h) = item.template_hash {
            let n = templates
                .entry((item.source_system.clone(), h.to_vec()))
                .or_default();
            *n += 1;
            if *n >= i64::from(q.template_min) {
                flags.push(pb::QualityFlag::Templated);
            }
        }
        if !r.body.device_id.is_empty() {
            let n = devices.entry(r.body.device_id.clone()).or_default();
            *n += 1;
            if *n >= i64::from(q.device_burst) {
                flags.push(pb::QualityFlag::DeviceBurst);
            }
        }
        if let Some(tag) = item.phone_tag {
            let n = phones.entry(tag.to_vec()).or_default();
            *n += 1;
            if *n >= i64::from(q.phone_burst) {
                flags.push(pb::QualityFlag::PhoneBurst);
            }
        }
        let seq = *next_seq;
        *next_seq += 1;
        let known = (item.hub_id, seq, r.content_hash.to_vec());
        by_id.insert(item.hub_id, known.clone());
        by_key.insert(k, known);
        if item.checks.counting && r.body.follow_up_of.is_empty() {
            let org = r.org_credit_code.as_str().to_owned();
            match r.target_kind {
                pb::TargetKind::Item => {
                    cases.insert((org.clone(), r.case_number.clone()));
                    if !r.body.batch_id.is_empty() {
                        batches.insert((org, r.body.batch_id.clone()));
                    }
                }
                pb::TargetKind::Staff => {
                    visits.insert((org, r.case_number.clone(), r.staff_id.clone()));
                }
                _ => {}
            }
        }
        pending.push((pos, Pending { item, seq, flags }));
    }
    flush(conn, &mut pending, &mut out, received_at).await?;
    Ok(out
        .into_iter()
        .map(|o| o.expect("every rating decided"))
        .collect())
}

/// Inserts the pending ratings with one statement (and opens their 差评 cases).
async fn flush(
    conn: &mut SqliteConnection,
    pending: &mut Vec<(usize, Pending<'_>)>,
    out: &mut [Option<InsertOutcome>],
    received_at: i64,
) -> Result<(), sqlx::Error> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut qb = QueryBuilder::<Sqlite>::new(
        "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, level, \
         channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
         rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
         batch_id, theme_id, device_id, template_hash, phone_tag) ",
    );
    qb.push_values(pending.iter(), |mut b, (_, p)| {
        let (item, r) = (p.item, &p.item.rating);
        let flags = r
            .quality_flags
            .iter()
            .chain(&p.flags)
            .fold(0i64, |acc, f| acc | (1 << (*f as i32)));
        b.push_bind(p.seq as i64)
            .push_bind(item.hub_id.as_bytes().to_vec())
            .push_bind(item.source_system.clone())
            .push_bind(r.source_key.clone())
            .push_bind(r.content_hash.to_vec())
            .push_bind(r.level as i32)
            .push_bind(r.channel as i32)
            .push_bind(r.target_kind as i32)
            .push_bind(r.org_credit_code.as_str().to_owned())
            .push_bind(r.region_code.as_str().to_owned())
            .push_bind(r.item_code.clone())
            .push_bind(r.staff_id.clone())
            .push_bind(r.case_number.clone())
            .push_bind(r.rated_at_micros)
            .push_bind(received_at)
            .push_bind(r.is_default)
            .push_bind(flags)
            .push_bind(item.body_bytes.clone())
            .push_bind(item.pii.as_ref().map(|s| s.blob.clone()))
            .push_bind(item.pii.as_ref().map(|s| s.key_id.clone()))
            .push_bind(r.body.follow_up_of.clone())
            .push_bind(r.body.batch_id.clone())
            .push_bind(r.body.theme_id.clone())
            .push_bind(r.body.device_id.clone())
            .push_bind(item.template_hash.map(|h| h.to_vec()))
            .push_bind(item.phone_tag.map(|h| h.to_vec()));
    });
    let inserted = qb.build().execute(&mut *conn).await?.rows_affected();
    if inserted != pending.len() as u64 {
        // Every key and id was checked inside this transaction: this cannot happen with one
        // writer. Fail the group (nothing is acknowledged) rather than leave a feed gap.
        return Err(sqlx::Error::Protocol(format!(
            "inserted {inserted} of {} ratings",
            pending.len()
        )));
    }
    let bad: Vec<&Pending<'_>> = pending
        .iter()
        .map(|(_, p)| p)
        .filter(|p| crate::domain::rating::is_bad(p.item.rating.level) && !p.item.rating.is_default)
        .collect();
    if !bad.is_empty() {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, real_name) ",
        );
        qb.push_values(bad, |mut b, p| {
            let r = &p.item.rating;
            b.push_bind(p.item.hub_id.as_bytes().to_vec())
                .push_bind(r.org_credit_code.as_str().to_owned())
                .push_bind(r.region_code.as_str().to_owned())
                .push_bind(received_at)
                .push_bind(r.body.rater.as_ref().is_some_and(|x| x.real_name));
        });
        qb.build().execute(&mut *conn).await?;
    }
    for (pos, p) in pending.drain(..) {
        out[pos] = Some(InsertOutcome::Accepted {
            hub_id: p.item.hub_id,
            feed_seq: p.seq,
            flags: p.flags,
        });
    }
    Ok(())
}

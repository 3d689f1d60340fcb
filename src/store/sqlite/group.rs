//! The SQLite side of the chunk writer ([`crate::store::chunk`]): one query per lookup and
//! one multi-row INSERT per chunk, on the writer's connection inside its transaction.

use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::pb::v1 as pb;
use crate::store::NewRating;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Lookups, Pending};

pub(super) struct SqliteChunks<'c>(pub &'c mut SqliteConnection);

impl ChunkBackend for SqliteChunks<'_> {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error> {
        let mut qb = lookup_query(chunk);
        let mut l = Lookups::default();
        for row in qb.build().fetch_all(&mut *self.0).await? {
            read_lookup_row(&row, &mut l)?;
        }
        Ok(l)
    }

    async fn follow_up_facts(
        &mut self,
        item: &NewRating,
    ) -> Result<Option<FollowUpFacts>, sqlx::Error> {
        let conn = &mut *self.0;
        let of = &item.rating.body.follow_up_of;
        let original: Option<i64> = sqlx::query_scalar(
            "SELECT rated_at FROM ratings WHERE source_system = ? AND source_key = ?",
        )
        .bind(&item.source_system)
        .bind(of)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(original_rated_at) = original else {
            return Ok(None);
        };
        let earlier: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ratings WHERE source_system = ? AND follow_up_of = ? \
             AND source_key <> ?",
        )
        .bind(&item.source_system)
        .bind(of)
        .bind(&item.rating.source_key)
        .fetch_one(&mut *conn)
        .await?;
        Ok(Some(FollowUpFacts {
            original_rated_at,
            earlier,
        }))
    }

    async fn insert(
        &mut self,
        pending: &[Pending<'_>],
        received_at: i64,
    ) -> Result<(), sqlx::Error> {
        let conn = &mut *self.0;
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, level, \
         channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
         rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
         batch_id, theme_id, device_id, template_hash, phone_tag) ",
        );
        qb.push_values(pending, |mut b, p| {
            let (item, r) = (p.item, &p.item.rating);
            let flags = p.flag_bits();
            b.push_bind(p.seq as i64)
                .push_bind(item.hub_id.as_bytes().as_slice())
                .push_bind(item.source_system.as_str())
                .push_bind(r.source_key.as_str())
                .push_bind(r.content_hash.as_slice())
                .push_bind(r.level as i32)
                .push_bind(r.channel as i32)
                .push_bind(r.target_kind as i32)
                .push_bind(r.org_credit_code.as_str())
                .push_bind(r.region_code.as_str())
                .push_bind(r.item_code.as_str())
                .push_bind(r.staff_id.as_str())
                .push_bind(r.case_number.as_str())
                .push_bind(r.rated_at_micros)
                .push_bind(received_at)
                .push_bind(r.is_default)
                .push_bind(flags)
                .push_bind(item.body_bytes.as_slice())
                .push_bind(item.pii.as_ref().map(|s| s.blob.as_slice()))
                .push_bind(item.pii.as_ref().map(|s| s.key_id.as_str()))
                .push_bind(r.body.follow_up_of.as_str())
                .push_bind(r.body.batch_id.as_str())
                .push_bind(r.body.theme_id.as_str())
                .push_bind(r.body.device_id.as_str())
                .push_bind(item.template_hash.as_ref().map(|h| h.as_slice()))
                .push_bind(item.phone_tag.as_ref().map(|h| h.as_slice()));
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
        let bad: Vec<&Pending<'_>> = pending.iter().filter(|p| p.opens_case()).collect();
        if !bad.is_empty() {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, real_name) ",
            );
            qb.push_values(bad, |mut b, p| {
                let r = &p.item.rating;
                b.push_bind(p.item.hub_id.as_bytes().as_slice())
                    .push_bind(r.org_credit_code.as_str())
                    .push_bind(r.region_code.as_str())
                    .push_bind(received_at)
                    .push_bind(r.body.rater.as_ref().is_some_and(|x| x.real_name));
            });
            qb.build().execute(&mut *conn).await?;
        }
        Ok(())
    }
}

/// Every look-up of a chunk in one compound statement (one trip to sqlx's SQLite thread
/// instead of up to seven): each part tags its rows, and the columns are
/// (tag, text a, text b, text c, blob x, blob y, integer n).
fn lookup_query<'a>(chunk: &'a [&'a NewRating]) -> QueryBuilder<'a, Sqlite> {
    let mut qb = QueryBuilder::<Sqlite>::new("");
    let mut parts = 0;
    let mut part = |qb: &mut QueryBuilder<'_, Sqlite>, select: &str| {
        if parts > 0 {
            qb.push(" UNION ALL ");
        }
        parts += 1;
        qb.push(select);
    };

    // 1. Stored ratings with these keys (or, for relayed ratings, these hub ids).
    part(
        &mut qb,
        "SELECT 1, source_system, source_key, NULL, hub_id, content_hash, feed_seq \
         FROM ratings WHERE (source_system, source_key) IN (",
    );
    qb.push_values(chunk, |mut b, item| {
        b.push_bind(item.source_system.as_str())
            .push_bind(item.rating.source_key.as_str());
    });
    qb.push(")");
    let mut relayed = chunk
        .iter()
        .filter(|i| i.rating.relayed_hub_id.is_some())
        .peekable();
    if relayed.peek().is_some() {
        qb.push(" OR hub_id IN (");
        let mut sep = qb.separated(", ");
        for item in relayed {
            sep.push_bind(item.hub_id.as_bytes().as_slice());
        }
        qb.push(")");
    }

    // 2. Counting rules: cases, batches and visits that already have a rating.
    let items = chunk::counted(chunk, pb::TargetKind::Item);
    if items.clone().next().is_some() {
        part(
            &mut qb,
            "SELECT 2, org_credit_code, case_number, NULL, NULL, NULL, NULL FROM ratings \
             WHERE target_kind = 1 AND follow_up_of = '' \
             AND (org_credit_code, case_number) IN (",
        );
        qb.push_values(items.clone(), |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str())
                .push_bind(i.rating.case_number.as_str());
        });
        qb.push(")");
    }
    let batched = items.filter(|i| !i.rating.body.batch_id.is_empty());
    if batched.clone().next().is_some() {
        part(
            &mut qb,
            "SELECT 3, org_credit_code, batch_id, NULL, NULL, NULL, NULL FROM ratings \
             WHERE target_kind = 1 AND follow_up_of = '' AND batch_id <> '' \
             AND (org_credit_code, batch_id) IN (",
        );
        qb.push_values(batched, |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str())
                .push_bind(i.rating.body.batch_id.as_str());
        });
        qb.push(")");
    }
    let visits =
        chunk::counted(chunk, pb::TargetKind::Staff).filter(|i| !i.rating.case_number.is_empty());
    if visits.clone().next().is_some() {
        part(
            &mut qb,
            "SELECT 4, org_credit_code, case_number, staff_id, NULL, NULL, NULL FROM ratings \
             WHERE target_kind = 3 AND follow_up_of = '' \
             AND (org_credit_code, case_number, staff_id) IN (",
        );
        qb.push_values(visits, |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str())
                .push_bind(i.rating.case_number.as_str())
                .push_bind(i.rating.staff_id.as_str());
        });
        qb.push(")");
    }

    // 3. Recent ratings per template, device and phone, over the chunk's window. (Each rating
    //    is counted against [earliest in chunk − window, latest in chunk]: in live traffic the
    //    ratings of one chunk are moments apart.)
    let q = chunk[0].checks.quality;
    let (min_at, max_at) = chunk::rated_at_range(chunk);
    if chunk.iter().any(|i| i.template_hash.is_some()) {
        part(
            &mut qb,
            "SELECT 5, source_system, NULL, NULL, template_hash, NULL, COUNT(*) FROM ratings \
             WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.template_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND (source_system, template_hash) IN (");
        qb.push_values(
            chunk
                .iter()
                .filter_map(|i| Some((i, i.template_hash.as_ref()?))),
            |mut b, (i, hash)| {
                b.push_bind(i.source_system.as_str())
                    .push_bind(hash.as_slice());
            },
        );
        qb.push(") GROUP BY 2, 5");
    }
    if chunk.iter().any(|i| !i.rating.body.device_id.is_empty()) {
        part(
            &mut qb,
            "SELECT 6, device_id, NULL, NULL, NULL, NULL, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.device_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND device_id IN (");
        let mut sep = qb.separated(", ");
        for i in chunk.iter().filter(|i| !i.rating.body.device_id.is_empty()) {
            sep.push_bind(i.rating.body.device_id.as_str());
        }
        qb.push(") GROUP BY 2");
    }
    if chunk.iter().any(|i| i.phone_tag.is_some()) {
        part(
            &mut qb,
            "SELECT 7, NULL, NULL, NULL, phone_tag, NULL, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.phone_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND phone_tag IN (");
        let mut sep = qb.separated(", ");
        for tag in chunk.iter().filter_map(|i| i.phone_tag.as_ref()) {
            sep.push_bind(tag.as_slice());
        }
        qb.push(") GROUP BY 5");
    }

    qb
}

fn read_lookup_row(row: &sqlx::sqlite::SqliteRow, l: &mut Lookups) -> Result<(), sqlx::Error> {
    let text = |i: usize| row.try_get::<String, _>(i);
    let blob = |i: usize| row.try_get::<Vec<u8>, _>(i);
    match row.try_get::<i64, _>(0)? {
        1 => {
            let known = (
                crate::store::rows::uuid_from_bytes(&blob(4)?)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                row.try_get::<i64, _>(6)? as u64,
                blob(5)?,
            );
            l.by_id.insert(known.0, known.clone());
            l.by_key.insert((text(1)?, text(2)?), known);
        }
        2 => {
            l.cases.insert((text(1)?, text(2)?));
        }
        3 => {
            l.batches.insert((text(1)?, text(2)?));
        }
        4 => {
            l.visits.insert((text(1)?, text(2)?, text(3)?));
        }
        5 => {
            l.templates.insert((text(1)?, blob(4)?), row.try_get(6)?);
        }
        6 => {
            l.devices.insert(text(1)?, row.try_get(6)?);
        }
        7 => {
            l.phones.insert(blob(4)?, row.try_get(6)?);
        }
        tag => {
            return Err(sqlx::Error::Protocol(format!(
                "look-up row with unknown tag {tag}"
            )));
        }
    }
    Ok(())
}

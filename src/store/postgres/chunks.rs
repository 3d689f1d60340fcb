//! The PostgreSQL side of the chunk writer ([`crate::store::chunk`]): one query per lookup and
//! one multi-row INSERT per chunk, on the writer's connection inside its transaction (which
//! holds the feed lock, so the lookups see every committed rating of every instance).

use sqlx::postgres::PgConnection;
use sqlx::{Postgres, QueryBuilder, Row};

use crate::pb::v1 as pb;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Lookups, Pending};
use crate::store::{NewRating, uuid_from_bytes};

pub(super) struct PgChunks<'c>(pub &'c mut PgConnection);

fn decode_err(e: crate::store::StoreError) -> sqlx::Error {
    sqlx::Error::Decode(Box::new(e))
}

impl ChunkBackend for PgChunks<'_> {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error> {
        let conn = &mut *self.0;
        let mut l = Lookups::default();

        // Each look-up joins the chunk's values as arrays (UNNEST), so every value is one
        // index probe: a row-value IN list would use only the index's first column.
        // 1. Stored ratings with these keys (or, for relayed ratings, these hub ids).
        let (sources, keys): (Vec<String>, Vec<String>) = chunk
            .iter()
            .map(|i| (i.source_system.clone(), i.rating.source_key.clone()))
            .unzip();
        let relayed: Vec<Vec<u8>> = chunk
            .iter()
            .filter(|i| i.rating.relayed_hub_id.is_some())
            .map(|i| i.hub_id.as_bytes().to_vec())
            .collect();
        let rows = sqlx::query(
            "SELECT r.source_system, r.source_key, r.hub_id, r.feed_seq, r.content_hash \
             FROM ratings r JOIN UNNEST($1::text[], $2::text[]) AS k(s, key) \
             ON r.source_system = k.s AND r.source_key = k.key \
             UNION \
             SELECT source_system, source_key, hub_id, feed_seq, content_hash FROM ratings \
             WHERE hub_id = ANY($3)",
        )
        .bind(sources)
        .bind(keys)
        .bind(relayed)
        .fetch_all(&mut *conn)
        .await?;
        for row in rows {
            let hub_id: Vec<u8> = row.try_get("hub_id")?;
            let known = (
                uuid_from_bytes(&hub_id).map_err(decode_err)?,
                row.try_get::<i64, _>("feed_seq")? as u64,
                row.try_get::<Vec<u8>, _>("content_hash")?,
            );
            l.by_id.insert(known.0, known.clone());
            l.by_key.insert(
                (row.try_get("source_system")?, row.try_get("source_key")?),
                known,
            );
        }

        // 2. Counting rules: cases, batches and visits that already have a rating.
        let org = |i: &NewRating| i.rating.org_credit_code.as_str().to_owned();
        let items = chunk::counted(chunk, pb::TargetKind::Item);
        if items.clone().next().is_some() {
            let (orgs, cases): (Vec<String>, Vec<String>) = items
                .clone()
                .map(|i| (org(i), i.rating.case_number.clone()))
                .unzip();
            let rows = sqlx::query(
                "SELECT r.org_credit_code, r.case_number FROM ratings r \
                 JOIN UNNEST($1::text[], $2::text[]) AS k(o, c) \
                 ON r.org_credit_code = k.o AND r.case_number = k.c \
                 WHERE r.target_kind = 1 AND r.follow_up_of = ''",
            )
            .bind(orgs)
            .bind(cases)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.cases.insert((row.try_get(0)?, row.try_get(1)?));
            }
        }
        let batched = items.filter(|i| !i.rating.body.batch_id.is_empty());
        if batched.clone().next().is_some() {
            let (orgs, batches): (Vec<String>, Vec<String>) = batched
                .map(|i| (org(i), i.rating.body.batch_id.clone()))
                .unzip();
            let rows = sqlx::query(
                "SELECT r.org_credit_code, r.batch_id FROM ratings r \
                 JOIN UNNEST($1::text[], $2::text[]) AS k(o, b) \
                 ON r.org_credit_code = k.o AND r.batch_id = k.b \
                 WHERE r.target_kind = 1 AND r.follow_up_of = '' AND r.batch_id <> ''",
            )
            .bind(orgs)
            .bind(batches)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.batches.insert((row.try_get(0)?, row.try_get(1)?));
            }
        }
        let visits = chunk::counted(chunk, pb::TargetKind::Staff)
            .filter(|i| !i.rating.case_number.is_empty());
        if visits.clone().next().is_some() {
            let mut orgs = Vec::new();
            let mut cases = Vec::new();
            let mut staff = Vec::new();
            for i in visits {
                orgs.push(org(i));
                cases.push(i.rating.case_number.clone());
                staff.push(i.rating.staff_id.clone());
            }
            let rows = sqlx::query(
                "SELECT r.org_credit_code, r.case_number, r.staff_id FROM ratings r \
                 JOIN UNNEST($1::text[], $2::text[], $3::text[]) AS k(o, c, s) \
                 ON r.org_credit_code = k.o AND r.case_number = k.c AND r.staff_id = k.s \
                 WHERE r.target_kind = 3 AND r.follow_up_of = ''",
            )
            .bind(orgs)
            .bind(cases)
            .bind(staff)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.visits
                    .insert((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
            }
        }

        // 3. Recent ratings per template, device and phone, over the chunk's window.
        let q = chunk[0].checks.quality;
        let (min_at, max_at) = chunk::rated_at_range(chunk);
        let templates: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .filter_map(|i| Some((i.source_system.clone(), i.template_hash?.to_vec())))
            .collect();
        if !templates.is_empty() {
            let (sources, hashes): (Vec<String>, Vec<Vec<u8>>) = templates.into_iter().unzip();
            let rows = sqlx::query(
                "SELECT r.source_system, r.template_hash, COUNT(*) FROM ratings r \
                 JOIN (SELECT DISTINCT * FROM UNNEST($1::text[], $2::bytea[]) AS t(s, h)) t \
                 ON r.source_system = t.s AND r.template_hash = t.h \
                 WHERE r.rated_at > $3 AND r.rated_at <= $4 GROUP BY 1, 2",
            )
            .bind(sources)
            .bind(hashes)
            .bind(min_at - q.template_window_secs * 1_000_000)
            .bind(max_at)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.templates
                    .insert((row.try_get(0)?, row.try_get(1)?), row.try_get(2)?);
            }
        }
        let devices: Vec<String> = chunk
            .iter()
            .filter(|i| !i.rating.body.device_id.is_empty())
            .map(|i| i.rating.body.device_id.clone())
            .collect();
        if !devices.is_empty() {
            let rows = sqlx::query(
                "SELECT device_id, COUNT(*) FROM ratings WHERE device_id = ANY($1) \
                 AND rated_at > $2 AND rated_at <= $3 GROUP BY 1",
            )
            .bind(devices)
            .bind(min_at - q.device_window_secs * 1_000_000)
            .bind(max_at)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.devices.insert(row.try_get(0)?, row.try_get(1)?);
            }
        }
        let phones: Vec<Vec<u8>> = chunk
            .iter()
            .filter_map(|i| Some(i.phone_tag?.to_vec()))
            .collect();
        if !phones.is_empty() {
            let rows = sqlx::query(
                "SELECT phone_tag, COUNT(*) FROM ratings WHERE phone_tag = ANY($1) \
                 AND rated_at > $2 AND rated_at <= $3 GROUP BY 1",
            )
            .bind(phones)
            .bind(min_at - q.phone_window_secs * 1_000_000)
            .bind(max_at)
            .fetch_all(&mut *conn)
            .await?;
            for row in rows {
                l.phones.insert(row.try_get(0)?, row.try_get(1)?);
            }
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
            "SELECT rated_at FROM ratings WHERE source_system = $1 AND source_key = $2",
        )
        .bind(&item.source_system)
        .bind(of)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(original_rated_at) = original else {
            return Ok(None);
        };
        let earlier: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM ratings WHERE source_system = $1 AND follow_up_of = $2 \
             AND source_key <> $3",
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
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, \
             level, channel, target_kind, org_credit_code, region_code, item_code, staff_id, \
             case_number, rated_at, received_at, is_default, quality_flags, body, pii, \
             pii_key_id, follow_up_of, batch_id, theme_id, device_id, template_hash, phone_tag) ",
        );
        qb.push_values(pending, |mut b, p| {
            let (item, r) = (p.item, &p.item.rating);
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
                .push_bind(p.flag_bits())
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
            return Err(sqlx::Error::Protocol(format!(
                "inserted {inserted} of {} ratings",
                pending.len()
            )));
        }
        let bad: Vec<&Pending<'_>> = pending.iter().filter(|p| p.opens_case()).collect();
        if !bad.is_empty() {
            let mut qb = QueryBuilder::<Postgres>::new(
                "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, \
                 real_name) ",
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
        Ok(())
    }
}

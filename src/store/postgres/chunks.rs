//! The PostgreSQL side of the chunk writer ([`crate::store::chunk`]): one query per lookup and
//! one multi-row INSERT per chunk, on the writer's connection inside its transaction (which
//! holds the feed lock, so the lookups see every committed rating of every instance).

use sqlx::Row;
use sqlx::postgres::PgConnection;

use crate::pb::v1 as pb;
use crate::store::NewRating;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Lookups, Pending};
use crate::store::rows::uuid_from_bytes;

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
        let (sources, keys): (Vec<&str>, Vec<&str>) = chunk
            .iter()
            .map(|i| (i.source_system.as_str(), i.rating.source_key.as_str()))
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
        fn org(i: &NewRating) -> &str {
            i.rating.org_credit_code.as_str()
        }
        let items = chunk::counted(chunk, pb::TargetKind::Item);
        if items.clone().next().is_some() {
            let (orgs, cases): (Vec<&str>, Vec<&str>) = items
                .clone()
                .map(|i| (org(i), i.rating.case_number.as_str()))
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
            let (orgs, batches): (Vec<&str>, Vec<&str>) = batched
                .map(|i| (org(i), i.rating.body.batch_id.as_str()))
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
                cases.push(i.rating.case_number.as_str());
                staff.push(i.rating.staff_id.as_str());
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
        // One statement text whatever the chunk size (arrays, not a VALUES list): prepared
        // once per connection instead of once per distinct size.
        let n = pending.len();
        let mut seq = Vec::with_capacity(n);
        let mut hub_id = Vec::with_capacity(n);
        let mut source_system = Vec::with_capacity(n);
        let mut source_key = Vec::with_capacity(n);
        let mut content_hash = Vec::with_capacity(n);
        let mut level = Vec::with_capacity(n);
        let mut channel = Vec::with_capacity(n);
        let mut target_kind = Vec::with_capacity(n);
        let mut org = Vec::with_capacity(n);
        let mut region = Vec::with_capacity(n);
        let mut item_code = Vec::with_capacity(n);
        let mut staff_id = Vec::with_capacity(n);
        let mut case_number = Vec::with_capacity(n);
        let mut rated_at = Vec::with_capacity(n);
        let mut is_default = Vec::with_capacity(n);
        let mut flags = Vec::with_capacity(n);
        let mut body = Vec::with_capacity(n);
        let mut pii = Vec::with_capacity(n);
        let mut pii_key_id = Vec::with_capacity(n);
        let mut follow_up_of = Vec::with_capacity(n);
        let mut batch_id = Vec::with_capacity(n);
        let mut theme_id = Vec::with_capacity(n);
        let mut device_id = Vec::with_capacity(n);
        let mut template_hash = Vec::with_capacity(n);
        let mut phone_tag = Vec::with_capacity(n);
        for p in pending {
            let (item, r) = (p.item, &p.item.rating);
            seq.push(p.seq as i64);
            hub_id.push(item.hub_id.as_bytes().to_vec());
            source_system.push(item.source_system.as_str());
            source_key.push(r.source_key.as_str());
            content_hash.push(r.content_hash.as_slice());
            level.push(r.level as i32);
            channel.push(r.channel as i32);
            target_kind.push(r.target_kind as i32);
            org.push(r.org_credit_code.as_str());
            region.push(r.region_code.as_str());
            item_code.push(r.item_code.as_str());
            staff_id.push(r.staff_id.as_str());
            case_number.push(r.case_number.as_str());
            rated_at.push(r.rated_at_micros);
            is_default.push(r.is_default);
            flags.push(p.flag_bits());
            body.push(item.body_bytes.as_slice());
            pii.push(item.pii.as_ref().map(|s| s.blob.as_slice()));
            pii_key_id.push(item.pii.as_ref().map(|s| s.key_id.as_str()));
            follow_up_of.push(r.body.follow_up_of.as_str());
            batch_id.push(r.body.batch_id.as_str());
            theme_id.push(r.body.theme_id.as_str());
            device_id.push(r.body.device_id.as_str());
            template_hash.push(item.template_hash.map(|h| h.to_vec()));
            phone_tag.push(item.phone_tag.map(|h| h.to_vec()));
        }
        let inserted = sqlx::query(
            "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, \
             level, channel, target_kind, org_credit_code, region_code, item_code, staff_id, \
             case_number, rated_at, received_at, is_default, quality_flags, body, pii, \
             pii_key_id, follow_up_of, batch_id, theme_id, device_id, template_hash, phone_tag) \
             SELECT s, h, ss, sk, ch, l, c, tk, o, rg, ic, st, cn, ra, $15, d, f, b, p, pk, fu, \
             bi, ti, dv, th, pt FROM UNNEST($1::bigint[], $2::bytea[], $3::text[], $4::text[], \
             $5::bytea[], $6::int[], $7::int[], $8::int[], $9::text[], $10::text[], $11::text[], \
             $12::text[], $13::text[], $14::bigint[], $16::bool[], $17::bigint[], $18::bytea[], \
             $19::bytea[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], \
             $25::bytea[], $26::bytea[]) AS t(s, h, ss, sk, ch, l, c, tk, o, rg, ic, st, cn, ra, \
             d, f, b, p, pk, fu, bi, ti, dv, th, pt)",
        )
        .bind(seq)
        .bind(hub_id)
        .bind(source_system)
        .bind(source_key)
        .bind(content_hash)
        .bind(level)
        .bind(channel)
        .bind(target_kind)
        .bind(org)
        .bind(region)
        .bind(item_code)
        .bind(staff_id)
        .bind(case_number)
        .bind(rated_at)
        .bind(received_at)
        .bind(is_default)
        .bind(flags)
        .bind(body)
        .bind(pii)
        .bind(pii_key_id)
        .bind(follow_up_of)
        .bind(batch_id)
        .bind(theme_id)
        .bind(device_id)
        .bind(template_hash)
        .bind(phone_tag)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted != n as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "inserted {inserted} of {n} ratings"
            )));
        }
        let bad: Vec<&Pending<'_>> = pending.iter().filter(|p| p.opens_case()).collect();
        if !bad.is_empty() {
            let hub_ids: Vec<Vec<u8>> = bad
                .iter()
                .map(|p| p.item.hub_id.as_bytes().to_vec())
                .collect();
            let orgs: Vec<&str> = bad
                .iter()
                .map(|p| p.item.rating.org_credit_code.as_str())
                .collect();
            let regions: Vec<&str> = bad
                .iter()
                .map(|p| p.item.rating.region_code.as_str())
                .collect();
            let real_name: Vec<bool> = bad
                .iter()
                .map(|p| {
                    p.item
                        .rating
                        .body
                        .rater
                        .as_ref()
                        .is_some_and(|x| x.real_name)
                })
                .collect();
            sqlx::query(
                "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, \
                 real_name) SELECT h, o, r, $4, n FROM UNNEST($1::bytea[], $2::text[], \
                 $3::text[], $5::bool[]) WITH ORDINALITY AS t(h, o, r, n, i) ORDER BY i",
            )
            .bind(hub_ids)
            .bind(orgs)
            .bind(regions)
            .bind(received_at)
            .bind(real_name)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

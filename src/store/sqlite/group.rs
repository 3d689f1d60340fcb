//! The SQLite side of the chunk writer ([`crate::store::chunk`]): one query per lookup and
//! one multi-row INSERT per chunk, on the writer's connection inside its transaction.

use std::collections::{HashMap, HashSet};

use sqlx::sqlite::SqliteConnection;
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

use crate::pb::v1 as pb;
use crate::store::NewRating;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Key, Known, Lookups, Pending};

pub(super) struct SqliteChunks<'c>(pub &'c mut SqliteConnection);

impl ChunkBackend for SqliteChunks<'_> {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error> {
        let conn = &mut *self.0;
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
                    crate::store::rows::uuid_from_bytes(&row.try_get::<Vec<u8>, _>("hub_id")?)
                        .map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
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
        let items_of = |kind| chunk::counted(chunk, kind);
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
        let (min_at, max_at) = chunk::rated_at_range(chunk);
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

        Ok(Lookups {
            by_key,
            by_id,
            cases,
            batches,
            visits,
            templates,
            devices,
            phones,
        })
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

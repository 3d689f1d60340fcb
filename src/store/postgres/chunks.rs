//! The PostgreSQL side of the chunk writer ([`crate::store::chunk`]): one statement for a
//! chunk's look-ups and one multi-row INSERT per chunk, on the writer's connection inside its
//! transaction (which holds the feed lock, so the look-ups see every committed rating of every
//! instance).

use sqlx::postgres::PgConnection;
use sqlx::{Postgres, QueryBuilder};

use crate::pb::v1 as pb;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Lookups, Pending};
use crate::store::{NewRating, SUPERSEDED_DEFAULT};

pub(super) struct PgChunks<'c>(pub &'c mut PgConnection);

impl ChunkBackend for PgChunks<'_> {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error> {
        let mut qb = QueryBuilder::new("");
        push_lookups(&mut qb, chunk);
        let rows = qb.build().fetch_all(&mut *self.0).await?;
        let mut l = Lookups::default();
        for row in &rows {
            chunk::read_lookup_row(row, &mut l)?;
        }
        Ok(l)
    }

    async fn follow_up_facts(
        &mut self,
        item: &NewRating,
    ) -> Result<Option<FollowUpFacts>, sqlx::Error> {
        let conn = &mut *self.0;
        let of = &item.rating.body.follow_up_of;
        let original: Option<(i64, String)> = sqlx::query_as(
            "SELECT rated_at, follow_up_of FROM ratings WHERE source_system = $1 AND source_key = $2",
        )
        .bind(&item.source_system)
        .bind(of)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((original_rated_at, original_follows)) = original else {
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
            original_is_follow_up: !original_follows.is_empty(),
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
        let mut visit_id = Vec::with_capacity(n);
        for p in pending {
            let (item, r) = (p.item, &p.item.rating);
            seq.push(p.seq as i64);
            hub_id.push(item.hub_id.as_bytes().as_slice());
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
            template_hash.push(item.template_hash.as_ref().map(|h| h.as_slice()));
            phone_tag.push(item.phone_tag.as_ref().map(|h| h.as_slice()));
            visit_id.push(r.body.visit_id.as_str());
        }
        let inserted = sqlx::query(
            "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, \
             level, channel, target_kind, org_credit_code, region_code, item_code, staff_id, \
             case_number, rated_at, received_at, is_default, quality_flags, body, pii, \
             pii_key_id, follow_up_of, batch_id, theme_id, device_id, template_hash, phone_tag, \
             visit_id) \
             SELECT s, h, ss, sk, ch, l, c, tk, o, rg, ic, st, cn, ra, $15, d, f, b, p, pk, fu, \
             bi, ti, dv, th, pt, vi FROM UNNEST($1::bigint[], $2::bytea[], $3::text[], $4::text[], \
             $5::bytea[], $6::int[], $7::int[], $8::int[], $9::text[], $10::text[], $11::text[], \
             $12::text[], $13::text[], $14::bigint[], $16::bool[], $17::bigint[], $18::bytea[], \
             $19::bytea[], $20::text[], $21::text[], $22::text[], $23::text[], $24::text[], \
             $25::bytea[], $26::bytea[], $27::text[]) AS t(s, h, ss, sk, ch, l, c, tk, o, rg, ic, \
             st, cn, ra, d, f, b, p, pk, fu, bi, ti, dv, th, pt, vi)",
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
        .bind(visit_id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted != n as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "inserted {inserted} of {n} ratings"
            )));
        }
        let (replaced, by): (Vec<&[u8]>, Vec<&[u8]>) = pending
            .iter()
            .flat_map(|p| {
                p.supersedes
                    .iter()
                    .map(|d| (d.as_bytes().as_slice(), p.item.hub_id.as_bytes().as_slice()))
            })
            .unzip();
        if !replaced.is_empty() {
            // A default already left out (an operator found it invalid) stays out as it was:
            // the rating that replaces it is stored all the same.
            sqlx::query(
                "INSERT INTO rating_exclusions (hub_id, reason, case_id, at, superseded_by) \
                 SELECT d, $3, 0, $4, b FROM UNNEST($1::bytea[], $2::bytea[]) AS t(d, b) \
                 ON CONFLICT (hub_id) DO NOTHING",
            )
            .bind(replaced)
            .bind(by)
            .bind(SUPERSEDED_DEFAULT)
            .bind(received_at)
            .execute(&mut *conn)
            .await?;
        }
        let bad: Vec<&Pending<'_>> = pending.iter().filter(|p| p.opens_case()).collect();
        if !bad.is_empty() {
            let hub_ids: Vec<&[u8]> = bad
                .iter()
                .map(|p| p.item.hub_id.as_bytes().as_slice())
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
                 real_name, opened_month) SELECT h, o, r, $4, n, $6 FROM UNNEST($1::bytea[], \
                 $2::text[], $3::text[], $5::bool[]) WITH ORDINALITY AS t(h, o, r, n, i) \
                 ORDER BY i",
            )
            .bind(hub_ids)
            .bind(orgs)
            .bind(regions)
            .bind(received_at)
            .bind(real_name)
            .bind(crate::time::cst_month(received_at))
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Every look-up of a chunk in one statement (one round trip instead of up to seven): each
/// part tags its rows, and the columns are (tag, text a, text b, text c, bytea x, bytea y,
/// bigint n).
///
/// Each part takes the chunk's values as arrays (UNNEST) and probes the index once per
/// distinct value, in a LATERAL subquery that the planner cannot turn into a join (it has a
/// LIMIT or an aggregate). The cost is then a few hundred index probes whatever the
/// planner believes about `ratings`: while the table grows from empty its statistics lag,
/// and as joins the planner chose hash joins over whole-index scans, 200–300 ms a chunk.
/// Each part also states its partial index's condition.
fn push_lookups<'a>(qb: &mut QueryBuilder<'a, Postgres>, chunk: &'a [&'a NewRating]) {
    let mut parts = 0;
    let mut part = |qb: &mut QueryBuilder<'a, Postgres>, select: &str| {
        if parts > 0 {
            qb.push(" UNION ALL ");
        }
        parts += 1;
        qb.push(select);
    };
    fn org(i: &NewRating) -> &str {
        i.rating.org_credit_code.as_str()
    }

    // 1. Stored ratings with these keys (or, for relayed ratings, these hub ids).
    let (sources, keys): (Vec<&str>, Vec<&str>) = chunk
        .iter()
        .map(|i| (i.source_system.as_str(), i.rating.source_key.as_str()))
        .unzip();
    part(
        qb,
        "SELECT 1::bigint AS tag, r.source_system AS a, r.source_key AS b, NULL::text AS c, \
         r.hub_id AS x, r.content_hash AS y, r.feed_seq AS n \
         FROM (SELECT DISTINCT * FROM UNNEST(",
    );
    qb.push_bind(sources)
        .push("::text[], ")
        .push_bind(keys)
        .push(
            "::text[])) AS k(s, key) CROSS JOIN LATERAL (SELECT source_system, source_key, \
             hub_id, content_hash, feed_seq FROM ratings \
             WHERE source_system = k.s AND source_key = k.key LIMIT 1) r",
        );
    let relayed: Vec<&[u8]> = chunk
        .iter()
        .filter(|i| i.rating.relayed_hub_id.is_some())
        .map(|i| i.hub_id.as_bytes().as_slice())
        .collect();
    if !relayed.is_empty() {
        part(
            qb,
            "SELECT 1, r.source_system, r.source_key, NULL, r.hub_id, r.content_hash, \
             r.feed_seq FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(relayed).push(
            "::bytea[])) AS k(h) CROSS JOIN LATERAL (SELECT source_system, source_key, \
             hub_id, content_hash, feed_seq FROM ratings WHERE hub_id = k.h LIMIT 1) r",
        );
    }

    // 2. Counting rules: cases, batches and visits that already have a rating. A case's
    // item ratings say whether a rater rated it (n = -1, listed first) or only the hub's
    // default did (n = the default's rated_at), leaving out defaults already superseded.
    let case_items = chunk::case_rated_candidates(chunk);
    if case_items.clone().next().is_some() {
        let (orgs, cases): (Vec<&str>, Vec<&str>) = case_items
            .map(|i| (org(i), i.rating.case_number.as_str()))
            .unzip();
        part(
            qb,
            "SELECT 2, k.o, k.c, NULL, r.hub_id, NULL, r.n FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(orgs)
            .push("::text[], ")
            .push_bind(cases)
            .push(format!(
                "::text[])) AS k(o, c) CROSS JOIN LATERAL (SELECT hub_id, \
                 CASE WHEN is_default THEN rated_at ELSE -1 END AS n FROM ratings \
                 WHERE org_credit_code = k.o AND case_number = k.c \
                 AND target_kind = 1 AND follow_up_of = '' \
                 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x \
                     WHERE x.hub_id = ratings.hub_id AND x.reason = {SUPERSEDED_DEFAULT}) \
                 ORDER BY is_default LIMIT 2) r"
            ));
    }
    // As for cases: a rater's rating of the batch (n = -1, listed first) or only the hub's
    // default (n = its rated_at).
    let batched =
        chunk::case_rated_candidates(chunk).filter(|i| !i.rating.body.batch_id.is_empty());
    if batched.clone().next().is_some() {
        let (orgs, batches): (Vec<&str>, Vec<&str>) = batched
            .map(|i| (org(i), i.rating.body.batch_id.as_str()))
            .unzip();
        part(
            qb,
            "SELECT 3, k.o, k.b, NULL, r.hub_id, NULL, r.n FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(orgs)
            .push("::text[], ")
            .push_bind(batches)
            .push(format!(
                "::text[])) AS k(o, b) CROSS JOIN LATERAL (SELECT hub_id, \
                 CASE WHEN is_default THEN rated_at ELSE -1 END AS n FROM ratings \
                 WHERE org_credit_code = k.o AND batch_id = k.b AND batch_id <> '' \
                 AND target_kind = 1 AND follow_up_of = '' \
                 AND NOT EXISTS (SELECT 1 FROM rating_exclusions x \
                     WHERE x.hub_id = ratings.hub_id AND x.reason = {SUPERSEDED_DEFAULT}) \
                 ORDER BY is_default LIMIT 2) r"
            ));
    }
    let visits =
        chunk::counted(chunk, pb::TargetKind::Staff).filter(|i| !i.rating.case_number.is_empty());
    if visits.clone().next().is_some() {
        let mut orgs = Vec::new();
        let mut cases = Vec::new();
        let mut staff = Vec::new();
        for i in visits {
            orgs.push(org(i));
            cases.push(i.rating.case_number.as_str());
            staff.push(i.rating.staff_id.as_str());
        }
        // Every visit rated so far for each (organisation, case, staff member): a handful.
        part(
            qb,
            "SELECT 4, k.o, k.c, k.s, convert_to(r.v, 'UTF8'), NULL, NULL \
             FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(orgs)
            .push("::text[], ")
            .push_bind(cases)
            .push("::text[], ")
            .push_bind(staff)
            .push(
                "::text[])) AS k(o, c, s) CROSS JOIN LATERAL (SELECT DISTINCT visit_id AS v \
                 FROM ratings WHERE org_credit_code = k.o AND case_number = k.c \
                 AND staff_id = k.s AND target_kind = 3 AND follow_up_of = '') r",
            );
    }

    // 3. Recent ratings per template, device and phone, over the chunk's window.
    let q = chunk[0].checks.quality;
    let (min_at, max_at) = chunk::rated_at_range(chunk);
    let (sources, hashes): (Vec<&str>, Vec<&[u8]>) = chunk
        .iter()
        .filter_map(|i| {
            Some((
                i.source_system.as_str(),
                i.template_hash.as_ref()?.as_slice(),
            ))
        })
        .unzip();
    if !hashes.is_empty() {
        part(
            qb,
            "SELECT 5, k.s, NULL, NULL, k.h, NULL, r.n FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(sources)
            .push("::text[], ")
            .push_bind(hashes)
            .push(
                "::bytea[])) AS k(s, h) CROSS JOIN LATERAL (SELECT COUNT(*) AS n FROM ratings \
                 WHERE source_system = k.s AND template_hash = k.h \
                 AND template_hash IS NOT NULL AND rated_at > ",
            )
            .push_bind(min_at - q.template_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(") r WHERE r.n > 0");
    }
    let devices: Vec<&str> = chunk
        .iter()
        .filter(|i| !i.rating.body.device_id.is_empty())
        .map(|i| i.rating.body.device_id.as_str())
        .collect();
    if !devices.is_empty() {
        part(
            qb,
            "SELECT 6, k.d, NULL, NULL, NULL, NULL, r.n FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(devices)
            .push(
                "::text[])) AS k(d) CROSS JOIN LATERAL (SELECT COUNT(*) AS n FROM ratings \
                 WHERE device_id = k.d AND device_id <> '' AND rated_at > ",
            )
            .push_bind(min_at - q.device_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(") r WHERE r.n > 0");
    }
    let phones: Vec<&[u8]> = chunk
        .iter()
        .filter_map(|i| Some(i.phone_tag.as_ref()?.as_slice()))
        .collect();
    if !phones.is_empty() {
        part(
            qb,
            "SELECT 7, NULL, NULL, NULL, k.p, NULL, r.n FROM (SELECT DISTINCT * FROM UNNEST(",
        );
        qb.push_bind(phones)
            .push(
                "::bytea[])) AS k(p) CROSS JOIN LATERAL (SELECT COUNT(*) AS n FROM ratings \
                 WHERE phone_tag = k.p AND phone_tag IS NOT NULL AND rated_at > ",
            )
            .push_bind(min_at - q.phone_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(") r WHERE r.n > 0");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::postgres::PgConnection;
    use sqlx::{Connection, Executor, Postgres, QueryBuilder, Row};

    use super::push_lookups;
    use crate::clock::SystemClock;
    use crate::store::postgres::{PostgresOptions, PostgresStore, connect_options, writer_options};
    use crate::store::{NewRating, Store};

    /// Ratings in the table before the look-up: as many as in the first second of the
    /// benchmark, where the join form of the case look-up got a plan that read the whole
    /// `ratings_case` index and compared every entry with every value of the chunk.
    const STORED: i64 = 3_000;

    /// Every part of a chunk's look-up must probe an index once per value, whatever the
    /// planner believes about `ratings`. Here its statistics are stale (analysed at 200
    /// rows of another kind, then grown), as in the first minute of a new hub, where the
    /// look-ups written as joins took 200–300 ms a chunk: a hash join over the whole key
    /// index, a loop over the whole `ratings_case` index.
    #[tokio::test]
    async fn every_lookup_part_probes_an_index_per_value_on_a_table_with_stale_statistics() {
        let admin = crate::testing::pg_admin_url();
        let name = format!("hub_lookup_{}", uuid::Uuid::now_v7().simple());
        let mut conn = PgConnection::connect(admin).await.unwrap();
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let store = PostgresStore::open(
            &PostgresOptions {
                url: url.clone(),
                max_group_commit: 1,
                write_queue: 1,
                read_connections: 1,
                read_wait: std::time::Duration::from_secs(5),
                instance: "test".into(),
                log_hash: Default::default(),
            },
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        store.close().await;

        let mut conn = PgConnection::connect(&url).await.unwrap();
        // Rows `from..=to`; `early` ones are follow-up staff ratings, so statistics taken
        // then say item ratings that are not follow-ups are rare.
        let fill = |from: i64, to: i64, early: bool| {
            let (kind, follow_up) = if early { ("3", "'k1'") } else { ("1", "''") };
            format!(
                "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, \
                 level, channel, target_kind, org_credit_code, region_code, item_code, staff_id, \
                 case_number, rated_at, received_at, is_default, quality_flags, body, \
                 follow_up_of, batch_id, theme_id, device_id, template_hash, phone_tag) \
                 SELECT g, uuid_send(gen_random_uuid()), 'sys', 'k' || g, '\\x00', 1, 1, \
                 {kind}, 'ORG' || g % 50, '530102', 'I', 'S' || g % 20, 'C' || g, \
                 (extract(epoch FROM now()) * 1e6)::bigint - g, 0, false, 0, '\\x00', \
                 {follow_up}, 'B' || g, '', 'PAD-' || g % 100, sha256(('t' || g)::bytea), \
                 sha256(('p' || g)::bytea) FROM generate_series({from}, {to}) g"
            )
        };
        conn.execute(fill(1, 200, true).as_str()).await.unwrap();
        conn.execute("ANALYZE ratings").await.unwrap();
        conn.execute(fill(201, STORED, false).as_str())
            .await
            .unwrap();
        conn.close().await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let chunk = crate::store::chunk::tests::lookup_chunk(dir.path(), 300);
        let refs: Vec<&NewRating> = chunk.iter().collect();
        let mut qb = QueryBuilder::<Postgres>::new("EXPLAIN ");
        push_lookups(&mut qb, &refs);
        assert_eq!(
            qb.sql().matches(" UNION ALL ").count(),
            7,
            "every look-up part present: {}",
            qb.sql()
        );
        let mut writer =
            PgConnection::connect_with(&writer_options(&connect_options(&url, "test").unwrap()))
                .await
                .unwrap();
        let plan: Vec<String> = qb
            .build()
            .fetch_all(&mut writer)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(0))
            .collect();
        let plan = plan.join("\n");
        // "Join Filter": values compared after a scan, not searched for in the index.
        for bad in [
            "Seq Scan",
            "Hash Join",
            "Merge Join",
            "Join Filter",
            "Gather",
        ] {
            assert!(!plan.contains(bad), "a look-up part uses {bad}:\n{plan}");
        }
        // Eight parts (the key part has two), each a loop over the chunk's distinct values
        // with one index search inside; the cases and batches parts also probe
        // `rating_exclusions` by its key for each rating they find (a superseded default is
        // left out).
        assert_eq!(plan.matches("Nested Loop").count(), 10, "{plan}");
        let searches = [
            "Index Scan using",
            "Index Only Scan using",
            "Bitmap Index Scan on",
        ];
        assert_eq!(
            searches
                .iter()
                .map(|s| plan.matches(s).count())
                .sum::<usize>(),
            10,
            "{plan}"
        );
        writer.close().await.unwrap();
    }
}

//! The SQLite side of the chunk writer ([`crate::store::chunk`]) and the group's transaction.
//!
//! sqlx runs a SQLite connection on its own thread, and every statement is a trip there and
//! back (two thread wake-ups). So the writer sends the statements whose answer it does not
//! need yet (`BEGIN`, a chunk's INSERTs) together with the next one whose answer it needs
//! (the next chunk's look-ups, or `COMMIT`). A group of n chunks costs n + 1 trips instead
//! of 2n + 2; most groups are one chunk, so two trips instead of four. In paired probes this
//! gave unary ingest 8–13 % more calls/s and left batches unchanged (docs/benchmarks.md).
//! A group of many ratings takes one trip more ([`GroupTx::flush`]): its INSERTs run while
//! the writer hashes their rating-log leaves, and the log's rows go with `COMMIT`.

use futures_util::TryStreamExt;
use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{Either, QueryBuilder, Sqlite};

use crate::pb::v1 as pb;
use crate::store::chunk::{self, ChunkBackend, FollowUpFacts, Lookups, Pending};
use crate::store::{NewRating, SUPERSEDED_DEFAULT};
use uuid::Uuid;

/// The writer's open transaction. Statements pushed here wait for the next trip; a failed
/// trip leaves the transaction to be rolled back by the caller ([`rollback`]).
pub(super) struct GroupTx<'c> {
    conn: &'c mut SqliteConnection,
    /// Statements not sent yet, each ending with `;`.
    deferred: QueryBuilder<'static, Sqlite>,
    /// For each deferred statement, in order, the rows it must change (`None`: unchecked).
    expect: Vec<Option<u64>>,
}

impl<'c> GroupTx<'c> {
    /// Opens the transaction (sent with the first statement that needs an answer).
    pub fn begin(conn: &'c mut SqliteConnection) -> Self {
        let mut tx = Self {
            conn,
            deferred: QueryBuilder::new(""),
            expect: Vec::new(),
        };
        tx.defer(None).push("BEGIN;");
        tx
    }

    /// Adds a statement to the next trip; the caller pushes its text, ending with `;`.
    fn defer(&mut self, rows: Option<u64>) -> &mut QueryBuilder<'static, Sqlite> {
        self.expect.push(rows);
        &mut self.deferred
    }

    /// Sends every deferred statement in one trip, in order. Rows go to `on_row` (only the
    /// last statement of a trip returns rows). Fails if a statement changed other than the
    /// rows it must.
    async fn send(
        &mut self,
        mut on_row: impl FnMut(&SqliteRow) -> Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        if self.expect.is_empty() {
            return Ok(());
        }
        let expect = std::mem::take(&mut self.expect);
        let mut qb = std::mem::replace(&mut self.deferred, QueryBuilder::new(""));
        // sqlx's SQLite driver runs a text of several statements, binding the arguments in
        // order across them. sqlx marks this deprecated (no other driver can do it; see
        // launchbadge/sqlx#3108); every ingest test goes through here, so an upgrade that
        // drops it fails the suite rather than the field.
        #[allow(deprecated)]
        let mut results = qb.build().fetch_many(&mut *self.conn);
        let mut done = 0;
        while let Some(r) = results.try_next().await? {
            match r {
                Either::Left(result) => {
                    if let Some(Some(want)) = expect.get(done)
                        && result.rows_affected() != *want
                    {
                        // Every key and id was checked inside this transaction: this cannot
                        // happen with one writer. Fail the group (nothing is acknowledged)
                        // rather than leave a feed gap.
                        return Err(sqlx::Error::Protocol(format!(
                            "a group statement changed {} rows instead of {want}",
                            result.rows_affected()
                        )));
                    }
                    done += 1;
                }
                Either::Right(row) => on_row(&row)?,
            }
        }
        if done != expect.len() {
            return Err(sqlx::Error::Protocol(format!(
                "{done} of {} group statements ran",
                expect.len()
            )));
        }
        Ok(())
    }

    /// Runs every deferred statement (one trip).
    pub async fn flush(&mut self) -> Result<(), sqlx::Error> {
        self.send(|_| Ok(())).await
    }

    /// The connection, with every deferred statement run: for the group's other jobs.
    pub async fn conn(&mut self) -> Result<&mut SqliteConnection, sqlx::Error> {
        self.flush().await?;
        Ok(&mut *self.conn)
    }

    /// Deferred: the rating log's new nodes (src/store/log.rs).
    pub fn insert_nodes(&mut self, layout: crate::merkle::Layout, nodes: Vec<crate::merkle::Node>) {
        let (mut leaves, nodes) = crate::store::log::split_leaves(layout, nodes);
        while !leaves.is_empty() {
            let rest = leaves.split_off(leaves.len().min(1000));
            let rows = std::mem::replace(&mut leaves, rest);
            let qb = self.defer(Some(rows.len() as u64));
            qb.push("INSERT INTO log_leaves (first, hashes) ");
            qb.push_values(rows, |mut b, (first, hashes)| {
                b.push_bind(first as i64).push_bind(hashes);
            });
            qb.push(";");
        }
        for rows in nodes.chunks(1000) {
            let qb = self.defer(Some(rows.len() as u64));
            qb.push("INSERT INTO log_nodes (level, idx, hash) ");
            qb.push_values(rows, |mut b, (l, i, h)| {
                b.push_bind(i64::from(*l))
                    .push_bind(*i as i64)
                    .push_bind(h.to_vec());
            });
            qb.push(";");
        }
    }

    /// Sends what is deferred with `COMMIT`.
    pub async fn commit(mut self) -> Result<(), sqlx::Error> {
        self.defer(None).push("COMMIT;");
        self.send(|_| Ok(())).await
    }
}

/// Ends a failed group's transaction, if one is open (a failed trip may have stopped before
/// or after `BEGIN` ran).
pub(super) async fn rollback(conn: &mut SqliteConnection) {
    if let Err(e) = sqlx::query("ROLLBACK").execute(&mut *conn).await
        && !e.to_string().contains("no transaction is active")
    {
        tracing::warn!(error = %e, "Rolling back a failed group failed.");
    }
}

impl ChunkBackend for GroupTx<'_> {
    async fn lookups(&mut self, chunk: &[&NewRating]) -> Result<Lookups, sqlx::Error> {
        push_lookups(self.defer(None), chunk);
        let mut l = Lookups::default();
        self.send(|row| chunk::read_lookup_row(row, &mut l)).await?;
        Ok(l)
    }

    async fn follow_up_facts(
        &mut self,
        item: &NewRating,
    ) -> Result<Option<FollowUpFacts>, sqlx::Error> {
        let conn = self.conn().await?;
        let of = &item.rating.body.follow_up_of;
        let original: Option<(i64, String)> = sqlx::query_as(
            "SELECT rated_at, follow_up_of FROM ratings WHERE source_system = ? AND source_key = ?",
        )
        .bind(&item.source_system)
        .bind(of)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((original_rated_at, original_follows)) = original else {
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
            original_is_follow_up: !original_follows.is_empty(),
        }))
    }

    /// Deferred: the INSERTs go with the next trip, which checks their row counts.
    async fn insert(
        &mut self,
        pending: &[Pending<'_>],
        received_at: i64,
    ) -> Result<(), sqlx::Error> {
        // 27 binds a row: statements of at most 200 rows stay below SQLite's 32,766 and keep
        // a handful of statement texts (the statement cache) for any group size. The binds
        // are owned because the deferred builder outlives this call; borrowed ones would be
        // copied all the same, when sqlx hands the arguments to its SQLite thread.
        for rows in pending.chunks(200) {
            let qb = self.defer(Some(rows.len() as u64));
            qb.push(
            "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, level, \
         channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
         rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
         batch_id, theme_id, device_id, template_hash, phone_tag, visit_id) ",
        );
            qb.push_values(rows, |mut b, p| {
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
                    .push_bind(item.phone_tag.map(|h| h.to_vec()))
                    .push_bind(r.body.visit_id.clone());
            });
            qb.push(";");
        }
        let replaced: Vec<(Uuid, Uuid)> = pending
            .iter()
            .flat_map(|p| p.supersedes.iter().map(|d| (*d, p.item.hub_id)))
            .collect();
        if !replaced.is_empty() {
            // A default already left out (an operator found it invalid) stays out as it was:
            // the rating that replaces it is stored all the same.
            let qb = self.defer(None);
            qb.push("INSERT INTO rating_exclusions (hub_id, reason, case_id, at, superseded_by) ");
            qb.push_values(replaced, |mut b, (default, by)| {
                b.push_bind(default.as_bytes().to_vec())
                    .push_bind(SUPERSEDED_DEFAULT)
                    .push_bind(0i64)
                    .push_bind(received_at)
                    .push_bind(by.as_bytes().to_vec());
            });
            qb.push(" ON CONFLICT (hub_id) DO NOTHING;");
        }
        let bad: Vec<&NewRating> = pending
            .iter()
            .filter(|p| p.opens_case())
            .map(|p| p.item)
            .collect();
        if !bad.is_empty() {
            let qb = self.defer(Some(bad.len() as u64));
            qb.push(
                "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, real_name, opened_month) ",
            );
            qb.push_values(bad, |mut b, item| {
                let r = &item.rating;
                b.push_bind(item.hub_id.as_bytes().to_vec())
                    .push_bind(r.org_credit_code.as_str().to_owned())
                    .push_bind(r.region_code.as_str().to_owned())
                    .push_bind(received_at)
                    .push_bind(r.body.rater.as_ref().is_some_and(|x| x.real_name))
                    .push_bind(crate::time::cst_month(received_at));
            });
            qb.push(";");
        }
        Ok(())
    }
}

/// Every look-up of a chunk in one compound statement (one trip to sqlx's SQLite thread
/// instead of up to seven): each part tags its rows, and the columns are
/// (tag, text a, text b, text c, blob x, blob y, integer n).
/// The look-up candidates whose batch matters (see `chunk::case_rated_candidates`).
fn cases_with_batch<'a>(
    chunk: &'a [&'a NewRating],
) -> impl Iterator<Item = &'a NewRating> + Clone + 'a {
    chunk::case_rated_candidates(chunk).filter(|i| !i.rating.body.batch_id.is_empty())
}

fn push_lookups(qb: &mut QueryBuilder<'static, Sqlite>, chunk: &[&NewRating]) {
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
        qb,
        "SELECT 1, source_system, source_key, NULL, hub_id, content_hash, feed_seq \
         FROM ratings WHERE (source_system, source_key) IN (",
    );
    qb.push_values(chunk, |mut b, item| {
        b.push_bind(item.source_system.clone())
            .push_bind(item.rating.source_key.clone());
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
            sep.push_bind(item.hub_id.as_bytes().to_vec());
        }
        qb.push(")");
    }

    // 2. Counting rules: cases, batches and visits that already have a rating. A case's
    // item ratings say whether a rater rated it (n = -1) or only the hub's default did
    // (n = the default's rated_at), leaving out defaults already superseded.
    let cases = chunk::case_rated_candidates(chunk);
    if cases.clone().next().is_some() {
        part(
            qb,
            "SELECT 2, org_credit_code, case_number, NULL, hub_id, NULL, \
             CASE WHEN is_default <> 0 THEN rated_at ELSE -1 END FROM ratings r \
             WHERE target_kind = 1 AND follow_up_of = '' \
             AND NOT EXISTS (SELECT 1 FROM rating_exclusions x \
                 WHERE x.hub_id = r.hub_id AND x.reason = ",
        );
        qb.push(SUPERSEDED_DEFAULT.to_string());
        qb.push(") AND (org_credit_code, case_number) IN (");
        qb.push_values(cases, |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                .push_bind(i.rating.case_number.clone());
        });
        qb.push(")");
    }
    let batched = cases_with_batch(chunk);
    if batched.clone().next().is_some() {
        part(
            qb,
            "SELECT 3, org_credit_code, batch_id, NULL, hub_id, NULL, \
             CASE WHEN is_default <> 0 THEN rated_at ELSE -1 END FROM ratings r \
             WHERE target_kind = 1 AND follow_up_of = '' AND batch_id <> '' \
             AND NOT EXISTS (SELECT 1 FROM rating_exclusions x \
                 WHERE x.hub_id = r.hub_id AND x.reason = ",
        );
        qb.push(SUPERSEDED_DEFAULT.to_string());
        qb.push(") AND (org_credit_code, batch_id) IN (");
        qb.push_values(batched, |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                .push_bind(i.rating.body.batch_id.clone());
        });
        qb.push(")");
    }
    let visits =
        chunk::counted(chunk, pb::TargetKind::Staff).filter(|i| !i.rating.case_number.is_empty());
    if visits.clone().next().is_some() {
        part(
            qb,
            "SELECT 4, org_credit_code, case_number, staff_id, CAST(visit_id AS BLOB), NULL, \
             NULL FROM ratings WHERE target_kind = 3 AND follow_up_of = '' \
             AND (org_credit_code, case_number, staff_id) IN (",
        );
        qb.push_values(visits, |mut b, i| {
            b.push_bind(i.rating.org_credit_code.as_str().to_owned())
                .push_bind(i.rating.case_number.clone())
                .push_bind(i.rating.staff_id.clone());
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
            qb,
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
                b.push_bind(i.source_system.clone())
                    .push_bind(hash.to_vec());
            },
        );
        qb.push(") GROUP BY 2, 5");
    }
    if chunk.iter().any(|i| !i.rating.body.device_id.is_empty()) {
        part(
            qb,
            "SELECT 6, device_id, NULL, NULL, NULL, NULL, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.device_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            // Spelled out for the planner: `ratings_device` is partial (device_id <> ''),
            // and SQLite uses a partial index only when the query states its condition.
            .push(" AND device_id <> '' AND device_id IN (");
        let mut sep = qb.separated(", ");
        for i in chunk.iter().filter(|i| !i.rating.body.device_id.is_empty()) {
            sep.push_bind(i.rating.body.device_id.clone());
        }
        qb.push(") GROUP BY 2");
    }
    if chunk.iter().any(|i| i.phone_tag.is_some()) {
        part(
            qb,
            "SELECT 7, NULL, NULL, NULL, phone_tag, NULL, COUNT(*) FROM ratings WHERE rated_at > ",
        );
        qb.push_bind(min_at - q.phone_window_secs * 1_000_000)
            .push(" AND rated_at <= ")
            .push_bind(max_at)
            .push(" AND phone_tag IN (");
        let mut sep = qb.separated(", ");
        for tag in chunk.iter().filter_map(|i| i.phone_tag.as_ref()) {
            sep.push_bind(tag.to_vec());
        }
        qb.push(") GROUP BY 5");
    }

    qb.push(";");
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};

    use super::push_lookups;
    use crate::clock::SystemClock;
    use crate::store::{NewRating, SqliteOptions, SqliteStore, Store};

    /// Each part of a chunk's look-up must search an index. One that scans `ratings` costs
    /// as much as the table is large, inside the single writer's transaction.
    #[tokio::test]
    async fn every_lookup_part_searches_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let opts = SqliteOptions {
            path: path.display().to_string(),
            ..Default::default()
        };
        let store = SqliteStore::open(&opts, Arc::new(SystemClock))
            .await
            .unwrap();
        store.close().await;

        let chunk = crate::store::chunk::tests::lookup_chunk(dir.path(), 1);
        let refs: Vec<&NewRating> = chunk.iter().collect();

        let mut qb = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
        push_lookups(&mut qb, &refs);
        assert_eq!(
            qb.sql().matches(" UNION ALL ").count(),
            6,
            "every look-up part present: {}",
            qb.sql()
        );
        let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let plan: Vec<String> = qb
            .build()
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>(3))
            .collect();
        // The tables are named as such or by their aliases (r: ratings, x: exclusions).
        assert!(
            plan.iter().all(
                |step| !["SCAN ratings", "SCAN r", "SCAN x", "SCAN rating_exclusions"]
                    .iter()
                    .any(|scan| step == scan || step.starts_with(&format!("{scan} ")))
            ),
            "a look-up part scans a table: {plan:#?}"
        );
        assert!(
            plan.iter().any(|step| step.contains("ratings_device")),
            "the device part uses its index: {plan:#?}"
        );
    }
}

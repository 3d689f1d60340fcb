//! The durable spool and the forwarder that drains it to the hub.
//!
//! `Spool::put` returns only after the rating is committed to the spool's SQLite file
//! (WAL, synchronous=FULL): that is when an adapter may acknowledge its source. The
//! [`Forwarder`] sends waiting ratings in spool order, marks each by the hub's answer —
//! delivered (accepted or duplicate) or refused (kept with the hub's reasons, never silently
//! dropped) — and retries with backoff while the hub is unreachable. The `outcome` column
//! holds a refusal's reasons, or `DUPLICATE` for a delivered row the hub already had.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use tokio::sync::{Notify, watch};
use tonic::transport::Channel;

use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;

use crate::Metrics;
use crate::at_rest::AtRest;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Stores one rating (sealed, bound to its key) unless its key is taken: `AlreadyThere` when
/// the stored rating is the same, `Conflict` when it is not.
async fn put_one(
    conn: &mut sqlx::SqliteConnection,
    at_rest: &AtRest,
    rating: &pb::Rating,
    now: i64,
) -> anyhow::Result<Spooled> {
    let bytes = rating.encode_to_vec();
    let r = sqlx::query(
        "INSERT INTO spool (source_key, rating, created_at, updated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (source_key) DO NOTHING",
    )
    .bind(&rating.source_key)
    .bind(at_rest.seal(&bytes, rating.source_key.as_bytes()))
    .bind(now)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if r.rows_affected() == 1 {
        return Ok(Spooled::Stored);
    }
    let stored: Vec<u8> = sqlx::query_scalar("SELECT rating FROM spool WHERE source_key = ?")
        .bind(&rating.source_key)
        .fetch_one(&mut *conn)
        .await?;
    Ok(
        if at_rest.open(&stored, rating.source_key.as_bytes())? == bytes {
            Spooled::AlreadyThere
        } else {
            Spooled::Conflict
        },
    )
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

/// What `put` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spooled {
    /// Newly stored.
    Stored,
    /// This source key was already spooled with the same rating (a re-read of the same
    /// input).
    AlreadyThere,
    /// This source key was already spooled with a different rating: a reused key, not a
    /// re-send. Nothing was stored; the caller must not report it as received.
    Conflict,
}

/// How many ratings are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolCounts {
    pub waiting: u64,
    pub delivered: u64,
    pub refused: u64,
}

#[derive(Clone)]
pub struct Spool {
    pool: SqlitePool,
    wake: Arc<Notify>,
    at_rest: Arc<AtRest>,
}

impl Spool {
    /// Opens (creating, mode 0600) the spool; ratings spooled before sealing existed are
    /// sealed now, and delivered ones past the retention period deleted.
    pub async fn open(path: &str, at_rest: Arc<AtRest>) -> anyhow::Result<Self> {
        let pool = crate::runtime::open_sqlite(path, &MIGRATOR).await?;
        let spool = Self {
            pool,
            wake: Arc::new(Notify::new()),
            at_rest,
        };
        spool.seal_plain().await?;
        spool.check_key(path).await?;
        spool.prune(now_micros()).await?;
        Ok(spool)
    }

    /// Refuses a key that does not open what the spool holds (a spool restored without its
    /// key, a key changed in the configuration): said at start, rather than every rating
    /// failing later.
    async fn check_key(&self, path: &str) -> anyhow::Result<()> {
        // Every key the waiting and refused rows were sealed under must be loaded: after a
        // switch of algorithm the newest rows open under the new key while older ones, under
        // a key no longer named, would each be set aside as unreadable.
        let prefixes: Vec<Vec<u8>> = sqlx::query_scalar(
            "SELECT DISTINCT substr(rating, 1, 6) FROM spool WHERE state != 1 \
             AND substr(rating, 1, 3) = X'533100' AND substr(outcome, 1, 10) != 'UNREADABLE'",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut missing: Vec<String> = prefixes
            .iter()
            .filter_map(|p| self.at_rest.missing_key(p))
            .collect();
        missing.sort();
        missing.dedup();
        if !missing.is_empty() {
            anyhow::bail!(
                "the spool {path} holds ratings not yet delivered sealed under key(s) {} that \
                 [at_rest] does not load (k1: ChaCha20-Poly1305, s1: SM4-GCM): name the key \
                 they were sealed with in [at_rest] previous_key",
                missing.join(", ")
            );
        }
        // The newest few rows not already set aside: one damaged row is not a wrong key.
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
            "SELECT source_key, rating FROM spool WHERE substr(outcome, 1, 10) != 'UNREADABLE' \
             ORDER BY id DESC LIMIT 5",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut last_error = None;
        for (key, sealed) in &rows {
            match self.at_rest.open(sealed, key.as_bytes()) {
                Ok(_) => return Ok(()),
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            None => Ok(()),
            Some(e) => anyhow::bail!(
                "the spool {path} was sealed with another key than [at_rest] key names ({e}): \
                 restore the key it was sealed with (after a change of [at_rest] algorithm, \
                 name the earlier key in [at_rest] previous_key)"
            ),
        }
    }

    /// Seals the ratings an older version stored in clear.
    async fn seal_plain(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, source_key, rating FROM spool WHERE substr(rating, 1, 3) != X'533100'",
        )
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let key: String = row.try_get("source_key")?;
            let plain: Vec<u8> = row.try_get("rating")?;
            sqlx::query("UPDATE spool SET rating = ? WHERE id = ?")
                .bind(self.at_rest.seal(&plain, key.as_bytes()))
                .bind(row.try_get::<i64, _>("id")?)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if !rows.is_empty() {
            tracing::info!(rows = rows.len(), "Sealed spooled ratings stored in clear.");
            // The clear copies are gone from the pages (secure_delete), and the old frames
            // from the write-ahead log.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Deletes delivered ratings older than the retention period; returns how many. Waiting
    /// and refused ones are kept whatever their age: they are not finished.
    pub async fn prune(&self, now: i64) -> anyhow::Result<u64> {
        let Some(before) = self.at_rest.keep_after(now) else {
            return Ok(0);
        };
        Ok(
            sqlx::query("DELETE FROM spool WHERE state = 1 AND updated_at < ?")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Puts refused ratings back in the queue (all, or those whose refusal starts with
    /// `outcome`, e.g. `PERMISSION_DENIED` after the adapter's scope was mended at the hub);
    /// returns how many. The forwarder sends them within its idle period.
    pub async fn requeue(&self, outcome: Option<&str>) -> anyhow::Result<u64> {
        let n = sqlx::query(
            "UPDATE spool SET state = 0, outcome = '', updated_at = ? \
             WHERE state = 2 AND (? IS NULL OR substr(outcome, 1, length(?)) = ?)",
        )
        .bind(now_micros())
        .bind(outcome)
        .bind(outcome)
        .bind(outcome)
        .execute(&self.pool)
        .await?
        .rows_affected();
        self.wake.notify_one();
        Ok(n)
    }

    /// Stores a rating durably under its `source_key` (which must be set). Returns after the
    /// commit.
    pub async fn put(&self, rating: &pb::Rating) -> anyhow::Result<Spooled> {
        anyhow::ensure!(
            !rating.source_key.is_empty(),
            "a spooled rating needs a source key"
        );
        let mut conn = self.pool.acquire().await?;
        let out = put_one(&mut conn, &self.at_rest, rating, now_micros()).await?;
        self.wake.notify_one();
        Ok(out)
    }

    /// Stores many ratings in one transaction (one fsync); one `Spooled` per rating.
    pub async fn put_many(&self, ratings: &[pb::Rating]) -> anyhow::Result<Vec<Spooled>> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(ratings.len());
        for rating in ratings {
            anyhow::ensure!(
                !rating.source_key.is_empty(),
                "a spooled rating needs a source key"
            );
            out.push(put_one(&mut tx, &self.at_rest, rating, now).await?);
        }
        tx.commit().await?;
        self.wake.notify_one();
        Ok(out)
    }

    pub async fn counts(&self) -> anyhow::Result<SpoolCounts> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM spool GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let mut c = SpoolCounts::default();
        for row in rows {
            let n = row.try_get::<i64, _>("n")? as u64;
            match row.try_get::<i64, _>("state")? {
                0 => c.waiting = n,
                1 => c.delivered = n,
                _ => c.refused = n,
            }
        }
        Ok(c)
    }

    /// Refused ratings with the hub's reasons: (source key, reason).
    pub async fn refused(&self) -> anyhow::Result<Vec<(String, String)>> {
        let rows = sqlx::query("SELECT source_key, outcome FROM spool WHERE state = 2 ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>("source_key"),
                    r.get::<String, _>("outcome"),
                )
            })
            .collect())
    }

    async fn waiting(&self, limit: i64) -> anyhow::Result<Vec<(i64, pb::Rating)>> {
        // Rows set aside as unreadable are not returned: look again until a batch has a
        // rating to send or nothing is waiting.
        loop {
            let rows = sqlx::query(
                "SELECT id, source_key, rating FROM spool WHERE state = 0 ORDER BY id LIMIT ?",
            )
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let id: i64 = r.try_get("id")?;
                let key: String = r.try_get("source_key")?;
                let opened = self
                    .at_rest
                    .open(&r.try_get::<Vec<u8>, _>("rating")?, key.as_bytes())
                    .and_then(|b| Ok(pb::Rating::decode(b.as_slice())?));
                match opened {
                    Ok(rating) => out.push((id, rating)),
                    // One row that cannot be opened (a damaged page, a foreign key) is set
                    // aside with the reason, visible to `refused`; the others go on.
                    Err(e) => {
                        tracing::error!(id, error = %e, "A spooled rating cannot be opened; set aside.");
                        self.mark(id, 2, &format!("UNREADABLE {e}"), "").await?;
                    }
                }
            }
            if out.is_empty() && !rows.is_empty() {
                continue;
            }
            return Ok(out);
        }
    }

    async fn mark(&self, id: i64, state: i64, outcome: &str, hub_id: &str) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE spool SET state = ?, outcome = ?, hub_id = ?, attempts = attempts + 1, \
             updated_at = ? WHERE id = ?",
        )
        .bind(state)
        .bind(outcome)
        .bind(hub_id)
        .bind(now_micros())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// How often an idle forwarder looks for ratings another process put back.
const IDLE_WAKE: Duration = Duration::from_secs(10);
/// How often delivered ratings past the retention period are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Drains a spool to the hub.
pub struct Forwarder {
    pub spool: Spool,
    pub client: IngestServiceClient<Channel>,
    pub batch: i64,
    pub metrics: Arc<Metrics>,
}

impl Forwarder {
    /// Runs until `stop` turns true. Transport failures are retried with backoff (0.2 s
    /// doubling to 10 s); nothing waiting is ever dropped.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut pruned = std::time::Instant::now();
        loop {
            if *stop.borrow() {
                return;
            }
            match self.step().await {
                Ok(true) => backoff = Duration::from_millis(200),
                Ok(false) => {
                    if pruned.elapsed() >= PRUNE_EVERY {
                        pruned = std::time::Instant::now();
                        match self.spool.prune(now_micros()).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(
                                rows = n,
                                "Pruned delivered ratings past the retention period."
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "Cannot prune the spool; will try again.")
                            }
                        }
                    }
                    // Woken by a new rating; or, for a rating put back by another process
                    // (`requeue`), within IDLE_WAKE.
                    tokio::select! {
                        _ = self.spool.wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_WAKE) => {}
                        // The sender gone (its adapter dropped without a shutdown) is a
                        // stop too: never a loop on a closed channel.
                        r = stop.changed() => if r.is_err() { return; }
                    }
                }
                Err(e) => {
                    self.metrics.inc("forward_failures_total");
                    tracing::warn!(error = %e, wait_ms = backoff.as_millis() as u64, "Cannot forward to the hub; will retry.");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        // The sender gone (its adapter dropped without a shutdown) is a
                        // stop too: never a loop on a closed channel.
                        r = stop.changed() => if r.is_err() { return; }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Sends one batch; Ok(false) when nothing was waiting.
    async fn step(&mut self) -> anyhow::Result<bool> {
        let waiting = self.spool.waiting(self.batch).await?;
        if waiting.is_empty() {
            return Ok(false);
        }
        let ratings: Vec<pb::Rating> = waiting.iter().map(|(_, r)| r.clone()).collect();
        let results = self
            .client
            .submit_ratings(pb::SubmitRatingsRequest { ratings })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner()
            .results;
        anyhow::ensure!(
            results.len() == waiting.len(),
            "the hub answered {} results for {} ratings",
            results.len(),
            waiting.len()
        );
        // An answer this adapter cannot read (an outcome it does not know, or none) says
        // nothing about the rating: the batch stays waiting and is sent again, never marked
        // refused for good.
        if let Some(r) = results.iter().find(|r| {
            !matches!(
                pb::Outcome::try_from(r.outcome),
                Ok(pb::Outcome::Accepted
                    | pb::Outcome::Duplicate
                    | pb::Outcome::Conflict
                    | pb::Outcome::Invalid
                    | pb::Outcome::PermissionDenied)
            )
        }) {
            anyhow::bail!("the hub answered an unknown outcome {}", r.outcome);
        }
        for ((id, _), r) in waiting.iter().zip(results) {
            match pb::Outcome::try_from(r.outcome).unwrap_or_default() {
                outcome @ (pb::Outcome::Accepted | pb::Outcome::Duplicate) => {
                    self.metrics.inc("forwarded_total");
                    // A DUPLICATE answer is recorded: the hub already had it, so this send
                    // repeated an earlier one (a crash between its commit and this mark).
                    let note = if outcome == pb::Outcome::Duplicate {
                        "DUPLICATE"
                    } else {
                        ""
                    };
                    self.spool.mark(*id, 1, note, &r.hub_id).await?;
                }
                other => {
                    let why: Vec<String> = r
                        .violations
                        .iter()
                        .map(|v| format!("{}: {}", v.field, v.description))
                        .collect();
                    let text = format!("{} {}", other.as_str_name(), why.join("; "));
                    self.metrics.inc("refused_by_hub_total");
                    tracing::warn!(
                        outcome = other.as_str_name(),
                        "The hub refused a spooled rating; kept with its reasons."
                    );
                    self.spool.mark(*id, 2, text.trim(), &r.hub_id).await?;
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key taken by a different rating is a conflict, not a re-send: before, `put` said
    /// "already there" and the caller reported the new rating as received.
    #[tokio::test]
    async fn a_reused_key_with_different_content_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let at_rest = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, at_rest).await.unwrap();
        let first = pb::Rating {
            source_key: "k".into(),
            level: 1,
            ..Default::default()
        };
        assert_eq!(spool.put(&first).await.unwrap(), Spooled::Stored);
        assert_eq!(spool.put(&first).await.unwrap(), Spooled::AlreadyThere);
        let other = pb::Rating {
            level: 4,
            ..first.clone()
        };
        assert_eq!(spool.put(&other).await.unwrap(), Spooled::Conflict);
        assert_eq!(
            spool.put_many(&[first, other]).await.unwrap(),
            [Spooled::AlreadyThere, Spooled::Conflict]
        );
    }

    fn rated(key: &str, phone: &str) -> pb::Rating {
        pb::Rating {
            source_key: key.into(),
            level: 4,
            rater: Some(pb::Rater {
                name: "王小明".into(),
                phone: phone.into(),
                id_number: "11010519491231002X".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            all.extend(std::fs::read(e.unwrap().path()).unwrap());
        }
        all
    }

    fn contains(hay: &[u8], needle: &str) -> bool {
        hay.windows(needle.len()).any(|w| w == needle.as_bytes())
    }

    /// The rater's name, ID and phone never reach the spool's files in clear (before, every
    /// spooled rating sat there readable, forever, in a 0644 file); a row written in clear by
    /// an older version is sealed when the spool opens.
    #[tokio::test]
    async fn rater_pii_is_sealed_in_the_spool_file_which_only_its_user_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let at_rest = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, at_rest.clone()).await.unwrap();
        let r = rated("a", "13800138000");
        assert_eq!(spool.put(&r).await.unwrap(), Spooled::Stored);
        assert_eq!(spool.put(&r).await.unwrap(), Spooled::AlreadyThere);
        // An older version's row, in clear.
        sqlx::query(
            "INSERT INTO spool (source_key, rating, created_at, updated_at) VALUES ('b', ?, 0, 0)",
        )
        .bind(rated("b", "13900139000").encode_to_vec())
        .execute(&spool.pool)
        .await
        .unwrap();
        drop(spool);
        let spool = Spool::open(&path, at_rest).await.unwrap();
        let waiting = spool.waiting(10).await.unwrap();
        assert_eq!(waiting.len(), 2);
        assert_eq!(waiting[1].1.rater.as_ref().unwrap().phone, "13900139000");
        let bytes = file_bytes(dir.path());
        for pii in ["13800138000", "13900139000", "11010519491231002X", "王小明"] {
            assert!(
                !contains(&bytes, pii),
                "{pii} in clear in the spool's files"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "spool file mode {mode:o}");
        }
    }

    /// Delivered ratings leave after the retention period; waiting and refused ones stay
    /// whatever their age. A refused rating put back in the queue is sent again.
    #[tokio::test]
    async fn delivered_ratings_are_pruned_after_retention_and_refused_ones_can_be_requeued() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let at_rest = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, at_rest).await.unwrap();
        for k in ["delivered", "waiting", "denied", "invalid"] {
            spool.put(&rated(k, "13800138000")).await.unwrap();
        }
        let ids: Vec<i64> = spool
            .waiting(10)
            .await
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        spool.mark(ids[0], 1, "", "h1").await.unwrap();
        spool
            .mark(ids[2], 2, "PERMISSION_DENIED org: out of scope", "")
            .await
            .unwrap();
        spool
            .mark(ids[3], 2, "INVALID text: required", "")
            .await
            .unwrap();
        let day = 86_400_000_000i64;
        let later = now_micros() + 31 * day;
        assert_eq!(spool.prune(now_micros() + 29 * day).await.unwrap(), 0);
        assert_eq!(
            spool.prune(later).await.unwrap(),
            1,
            "only the delivered one"
        );
        let c = spool.counts().await.unwrap();
        assert_eq!((c.waiting, c.delivered, c.refused), (1, 0, 2));
        assert_eq!(spool.requeue(Some("PERMISSION_DENIED")).await.unwrap(), 1);
        let waiting: Vec<String> = spool
            .waiting(10)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.source_key)
            .collect();
        assert_eq!(waiting, ["waiting", "denied"]);
        assert_eq!(spool.requeue(None).await.unwrap(), 1);
        assert_eq!(spool.counts().await.unwrap().refused, 0);
    }

    /// A spool restored without its key (or with the configuration naming another) refuses
    /// to open and says why; one row that cannot be opened is set aside as UNREADABLE with
    /// the others sent on (before, one such row failed every batch for ever).
    #[tokio::test]
    async fn a_foreign_key_is_refused_at_start_and_an_unreadable_row_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let at_rest = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, at_rest.clone()).await.unwrap();
        for k in ["a", "b", "c"] {
            spool.put(&rated(k, "13800138000")).await.unwrap();
        }
        // Row b's blob damaged.
        sqlx::query("UPDATE spool SET rating = X'5331000000' WHERE source_key = 'b'")
            .execute(&spool.pool)
            .await
            .unwrap();
        let sent: Vec<String> = spool
            .waiting(10)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.source_key)
            .collect();
        assert_eq!(sent, ["a", "c"]);
        let refused = spool.refused().await.unwrap();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].1.starts_with("UNREADABLE"), "{refused:?}");
        drop(spool);

        let other = dir.path().join("other.key");
        std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
        let foreign = AtRest::load(
            &crate::AtRestConfig {
                key: other.display().to_string(),
                ..Default::default()
            },
            &path,
        )
        .unwrap();
        let err = match Spool::open(&path, Arc::new(foreign)).await {
            Ok(_) => panic!("opened with a foreign key"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("sealed with another key"), "{err}");
        assert!(Spool::open(&path, at_rest).await.is_ok());
    }

    /// A switch to SM4-GCM keeps the rows sealed before readable while the ChaCha key is
    /// loaded; once the newest rows are SM4-sealed, a configuration that no longer loads the
    /// earlier key is refused at start, naming it (before, the start passed on the newest
    /// rows and every older one was set aside as unreadable, one by one).
    #[tokio::test]
    async fn waiting_rows_under_a_key_no_longer_loaded_are_refused_at_start() {
        use rating_hub::privacy::Algorithm;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let chacha = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, chacha).await.unwrap();
        spool.put(&rated("old", "13800138000")).await.unwrap();
        drop(spool);
        // Switched, the default key files beside the spool: both loaded.
        let sm4 = crate::AtRestConfig {
            algorithm: Algorithm::Sm4Gcm,
            ..Default::default()
        };
        let both = Arc::new(AtRest::load(&sm4, &path).unwrap());
        let spool = Spool::open(&path, both.clone()).await.unwrap();
        for k in ["new1", "new2", "new3", "new4", "new5"] {
            spool.put(&rated(k, "13900139000")).await.unwrap();
        }
        drop(spool);
        // The SM4 key named explicitly, the ChaCha key not: refused, naming k1.
        let alone = AtRest::load(
            &crate::AtRestConfig {
                key: dir.path().join("pii-sm4.key").display().to_string(),
                algorithm: Algorithm::Sm4Gcm,
                ..Default::default()
            },
            &path,
        )
        .unwrap();
        let err = match Spool::open(&path, Arc::new(alone)).await {
            Ok(_) => panic!("opened without the key its oldest waiting row needs"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("k1") && err.contains("previous_key"), "{err}");
        // With it, every row is sent.
        let spool = Spool::open(&path, both).await.unwrap();
        let sent: Vec<String> = spool
            .waiting(10)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, r)| r.source_key)
            .collect();
        assert_eq!(sent, ["old", "new1", "new2", "new3", "new4", "new5"]);
    }

    /// An adapter dropped without its shutdown drops the stop sender: the forwarder ends
    /// (before, it spun on the closed channel at full CPU, for ever).
    #[tokio::test]
    async fn the_forwarder_ends_when_its_stop_sender_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db").display().to_string();
        let at_rest = Arc::new(AtRest::load(&Default::default(), &path).unwrap());
        let spool = Spool::open(&path, at_rest).await.unwrap();
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let forwarder = Forwarder {
            spool,
            client: IngestServiceClient::new(channel),
            batch: 10,
            metrics: Arc::default(),
        };
        let (stop, rx) = watch::channel(false);
        let run = tokio::spawn(forwarder.run(rx));
        drop(stop);
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .expect("the forwarder ended")
            .unwrap();
    }
}

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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Stores one rating unless its key is taken: `AlreadyThere` when the stored rating is the
/// same, `Conflict` when it is not.
async fn put_one(
    conn: &mut sqlx::SqliteConnection,
    rating: &pb::Rating,
    now: i64,
) -> anyhow::Result<Spooled> {
    let bytes = rating.encode_to_vec();
    let r = sqlx::query(
        "INSERT INTO spool (source_key, rating, created_at, updated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (source_key) DO NOTHING",
    )
    .bind(&rating.source_key)
    .bind(&bytes)
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
    Ok(if stored == bytes {
        Spooled::AlreadyThere
    } else {
        Spooled::Conflict
    })
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
}

impl Spool {
    pub async fn open(path: &str) -> anyhow::Result<Self> {
        let pool = crate::runtime::open_sqlite(path, &MIGRATOR).await?;
        Ok(Self {
            pool,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Stores a rating durably under its `source_key` (which must be set). Returns after the
    /// commit.
    pub async fn put(&self, rating: &pb::Rating) -> anyhow::Result<Spooled> {
        anyhow::ensure!(
            !rating.source_key.is_empty(),
            "a spooled rating needs a source key"
        );
        let mut conn = self.pool.acquire().await?;
        let out = put_one(&mut conn, rating, now_micros()).await?;
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
            out.push(put_one(&mut tx, rating, now).await?);
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
        let rows = sqlx::query("SELECT id, rating FROM spool WHERE state = 0 ORDER BY id LIMIT ?")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let bytes: Vec<u8> = r.try_get("rating")?;
                Ok((r.try_get("id")?, pb::Rating::decode(bytes.as_slice())?))
            })
            .collect()
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
        loop {
            if *stop.borrow() {
                return;
            }
            match self.step().await {
                Ok(true) => backoff = Duration::from_millis(200),
                Ok(false) => {
                    tokio::select! {
                        _ = self.spool.wake.notified() => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    self.metrics.inc("forward_failures_total");
                    tracing::warn!(error = %e, wait_ms = backoff.as_millis() as u64, "Cannot forward to the hub; will retry.");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => {}
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
        let spool = Spool::open(&dir.path().join("spool.db").display().to_string())
            .await
            .unwrap();
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
}

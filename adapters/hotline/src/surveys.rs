//! Surveys (one per invitation, each with its reply code) and the replies that matched none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use rating_hub::pb::v1 as pb;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

#[derive(Debug, Clone)]
pub struct Survey {
    pub id: i64,
    pub dest_code: String,
    pub case: pb::ServiceCase,
    pub phone: String,
    pub expires_at: i64,
    pub answered: bool,
}

#[derive(Clone)]
pub struct Surveys {
    pool: SqlitePool,
}

impl Surveys {
    pub async fn open(path: &str) -> anyhow::Result<Self> {
        let pool = rating_hub_adapter_kit::runtime::open_sqlite(path, &MIGRATOR).await?;
        Ok(Self { pool })
    }

    /// Opens a survey for an invitation (once); returns it with its reply code, and whether
    /// it still has to be sent.
    pub async fn open_survey(
        &self,
        invitation_id: u64,
        case: &pb::ServiceCase,
        phone: &str,
        prefix: &str,
        ttl: Duration,
    ) -> anyhow::Result<(Survey, bool)> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let existing = sqlx::query("SELECT id FROM surveys WHERE invitation_id = ?")
            .bind(invitation_id as i64)
            .fetch_optional(&mut *tx)
            .await?;
        let id: i64 = match existing {
            Some(row) => row.try_get("id")?,
            None => {
                let id: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) + 1 FROM surveys")
                    .fetch_one(&mut *tx)
                    .await?;
                // The reply code is random, not the survey's number: a code cannot be guessed
                // from another (before, 9000001, 9000002, … let anyone rate other people's
                // cases). Drawn again on the rare clash with an existing code.
                let mut code = random_code(prefix)?;
                while sqlx::query_scalar::<_, i64>("SELECT id FROM surveys WHERE dest_code = ?")
                    .bind(&code)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some()
                {
                    code = random_code(prefix)?;
                }
                sqlx::query(
                    "INSERT INTO surveys (id, dest_code, invitation_id, service_case, phone, \
                     created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(id)
                .bind(code)
                .bind(invitation_id as i64)
                .bind(case.encode_to_vec())
                .bind(phone)
                .bind(now)
                .bind(now + ttl.as_micros() as i64)
                .execute(&mut *tx)
                .await?;
                id
            }
        };
        tx.commit().await?;
        let survey = self
            .by_id(id)
            .await?
            .ok_or_else(|| anyhow::anyhow!("survey vanished"))?;
        let sent: Option<i64> = sqlx::query_scalar("SELECT sent_at FROM surveys WHERE id = ?")
            .bind(id)
            .fetch_one(&self.pool)
            .await?;
        Ok((survey, sent.is_none()))
    }

    async fn by_id(&self, id: i64) -> anyhow::Result<Option<Survey>> {
        let row = sqlx::query("SELECT * FROM surveys WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| survey_from_row(&r)).transpose()
    }

    pub async fn by_code(&self, dest_code: &str) -> anyhow::Result<Option<Survey>> {
        let row = sqlx::query("SELECT * FROM surveys WHERE dest_code = ?")
            .bind(dest_code.trim())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| survey_from_row(&r)).transpose()
    }

    pub async fn mark_sent(&self, id: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE surveys SET sent_at = ? WHERE id = ?")
            .bind(now_micros())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn mark_answered(&self, id: i64) -> anyhow::Result<()> {
        sqlx::query("UPDATE surveys SET answered_at = ? WHERE id = ? AND answered_at IS NULL")
            .bind(now_micros())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keeps a reply that is not a rating of a known, open survey, with the reason.
    pub async fn keep_unmatched(
        &self,
        channel: &str,
        dest_code: &str,
        reason: &str,
        content: &str,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO unmatched_replies (received_at, channel, dest_code, reason, content) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(now_micros())
        .bind(channel)
        .bind(dest_code)
        .bind(reason)
        .bind(content)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (channel, reply code, reason) of every kept reply, oldest first.
    pub async fn unmatched(&self) -> anyhow::Result<Vec<(String, String, String)>> {
        let rows =
            sqlx::query("SELECT channel, dest_code, reason FROM unmatched_replies ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("channel"), r.get("dest_code"), r.get("reason")))
            .collect())
    }

    pub async fn cursor(&self, name: &str) -> anyhow::Result<u64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT value FROM cursors WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(v.unwrap_or(0) as u64)
    }

    pub async fn set_cursor(&self, name: &str, value: u64) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO cursors (name, value) VALUES (?, ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

fn survey_from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Survey> {
    let bytes: Vec<u8> = r.try_get("service_case")?;
    Ok(Survey {
        id: r.try_get("id")?,
        dest_code: r.try_get("dest_code")?,
        case: pb::ServiceCase::decode(bytes.as_slice())?,
        phone: r.try_get("phone")?,
        expires_at: r.try_get("expires_at")?,
        answered: r.try_get::<Option<i64>, _>("answered_at")?.is_some(),
    })
}

/// A reply code: the prefix and 8 digits from the system's CSPRNG.
fn random_code(prefix: &str) -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    Ok(format!(
        "{prefix}{:08}",
        u64::from_le_bytes(bytes) % 100_000_000
    ))
}

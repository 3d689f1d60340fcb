//! Surveys (one per invitation, each with its reply code) and the replies that matched none.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use rating_hub::pb::v1 as pb;
use rating_hub_adapter_kit::AtRest;

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
    /// The hub's invitation this survey answers: never reused, unlike a reply code (one
    /// whose survey was pruned may be drawn again).
    pub invitation_id: i64,
    pub dest_code: String,
    pub case: pb::ServiceCase,
    pub phone: String,
    pub expires_at: i64,
    pub answered: bool,
}

#[derive(Clone)]
pub struct Surveys {
    pool: SqlitePool,
    at_rest: Arc<AtRest>,
}

/// What a survey's sealed values are bound to: its invitation (never reused).
fn case_aad(invitation_id: i64) -> Vec<u8> {
    format!("survey-case:{invitation_id}").into_bytes()
}
fn phone_aad(invitation_id: i64) -> Vec<u8> {
    format!("survey-phone:{invitation_id}").into_bytes()
}
fn unmatched_aad(channel: &str, dest_code: &str, at: i64) -> Vec<u8> {
    format!("unmatched:{channel}:{dest_code}:{at}").into_bytes()
}

impl Surveys {
    /// Opens (creating, mode 0600) the state file; values stored in clear by an older
    /// version are sealed, finished rows past the retention period deleted.
    pub async fn open(path: &str, at_rest: Arc<AtRest>) -> anyhow::Result<Self> {
        let pool = rating_hub_adapter_kit::runtime::open_sqlite(path, &MIGRATOR).await?;
        let s = Self { pool, at_rest };
        s.seal_plain().await?;
        // A key that does not open what is stored is said at start (a state file restored
        // without its key), not at the first reply.
        if let Some(r) = sqlx::query("SELECT * FROM surveys ORDER BY id DESC LIMIT 1")
            .fetch_optional(&s.pool)
            .await?
        {
            s.survey_from_row(&r).map_err(|e| {
                anyhow::anyhow!(
                    "{path} was sealed with another key than [at_rest] key names ({e}): \
                     restore the key it was sealed with (after a change of [at_rest] \
                     algorithm, name the earlier key in [at_rest] previous_key)"
                )
            })?;
        }
        s.prune(now_micros()).await?;
        Ok(s)
    }

    async fn seal_plain(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        let mut n = 0;
        for r in sqlx::query("SELECT id, invitation_id, service_case, phone FROM surveys")
            .fetch_all(&mut *tx)
            .await?
        {
            let inv: i64 = r.try_get("invitation_id")?;
            let case: Vec<u8> = r.try_get("service_case")?;
            let phone: Vec<u8> = r.try_get("phone")?;
            if AtRest::is_sealed(&case) && AtRest::is_sealed(&phone) {
                continue;
            }
            let case = self.at_rest.open(&case, &case_aad(inv))?;
            let phone = self.at_rest.open(&phone, &phone_aad(inv))?;
            sqlx::query("UPDATE surveys SET service_case = ?, phone = ? WHERE id = ?")
                .bind(self.at_rest.seal(&case, &case_aad(inv)))
                .bind(self.at_rest.seal(&phone, &phone_aad(inv)))
                .bind(r.try_get::<i64, _>("id")?)
                .execute(&mut *tx)
                .await?;
            n += 1;
        }
        for r in sqlx::query(
            "SELECT id, channel, dest_code, received_at, content FROM unmatched_replies \
             WHERE substr(content, 1, 3) != X'533100'",
        )
        .fetch_all(&mut *tx)
        .await?
        {
            let aad = unmatched_aad(
                &r.try_get::<String, _>("channel")?,
                &r.try_get::<String, _>("dest_code")?,
                r.try_get("received_at")?,
            );
            let content: Vec<u8> = r.try_get("content")?;
            sqlx::query("UPDATE unmatched_replies SET content = ? WHERE id = ?")
                .bind(self.at_rest.seal(&content, &aad))
                .bind(r.try_get::<i64, _>("id")?)
                .execute(&mut *tx)
                .await?;
            n += 1;
        }
        tx.commit().await?;
        if n > 0 {
            tracing::info!(rows = n, "Sealed survey data stored in clear.");
            // The clear copies are gone from the pages (secure_delete), and the old frames
            // from the write-ahead log.
            sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Deletes surveys answered or expired, and unmatched replies received, before the
    /// retention period; returns how many rows went.
    pub async fn prune(&self, now: i64) -> anyhow::Result<u64> {
        let Some(before) = self.at_rest.keep_after(now) else {
            return Ok(0);
        };
        let mut tx = self.pool.begin().await?;
        let a = sqlx::query("DELETE FROM surveys WHERE answered_at < ? OR expires_at < ?")
            .bind(before)
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let b = sqlx::query("DELETE FROM unmatched_replies WHERE received_at < ?")
            .bind(before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(a + b)
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
                .bind(
                    self.at_rest
                        .seal(&case.encode_to_vec(), &case_aad(invitation_id as i64)),
                )
                .bind(
                    self.at_rest
                        .seal(phone.as_bytes(), &phone_aad(invitation_id as i64)),
                )
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
        row.map(|r| self.survey_from_row(&r)).transpose()
    }

    pub async fn by_code(&self, dest_code: &str) -> anyhow::Result<Option<Survey>> {
        let row = sqlx::query("SELECT * FROM surveys WHERE dest_code = ?")
            .bind(dest_code.trim())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.survey_from_row(&r)).transpose()
    }

    /// Open, unanswered surveys whose invitation SMS was not sent yet (at most 500, oldest
    /// first; one answered by voice needs no SMS).
    pub async fn unsent(&self, now: i64) -> anyhow::Result<Vec<Survey>> {
        let rows = sqlx::query(
            "SELECT * FROM surveys WHERE sent_at IS NULL AND answered_at IS NULL \
             AND expires_at > ? ORDER BY id LIMIT 500",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        // A row that does not open (damaged, or sealed under a key no longer configured)
        // is passed by, said once a while, rather than stop every other survey's SMS.
        Ok(rows
            .iter()
            .filter_map(|r| match self.survey_from_row(r) {
                Ok(s) => Some(s),
                Err(e) => {
                    if let Some(held) = rating_hub::telemetry::throttle("hotline.unsent_row") {
                        tracing::warn!(error = %e, held, "An unsent survey cannot be read; passed by.");
                    }
                    None
                }
            })
            .collect())
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
        let at = now_micros();
        sqlx::query(
            "INSERT INTO unmatched_replies (received_at, channel, dest_code, reason, content) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(at)
        .bind(channel)
        .bind(dest_code)
        .bind(reason)
        .bind(
            self.at_rest
                .seal(content.as_bytes(), &unmatched_aad(channel, dest_code, at)),
        )
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

    /// Every kept reply, oldest first, with its (masked) text opened for an operator:
    /// (received at µs, channel, reply code, reason, text).
    pub async fn unmatched_texts(
        &self,
    ) -> anyhow::Result<Vec<(i64, String, String, String, String)>> {
        let rows = sqlx::query(
            "SELECT received_at, channel, dest_code, reason, content FROM unmatched_replies \
             ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let (at, ch, code): (i64, String, String) = (
                    r.try_get("received_at")?,
                    r.try_get("channel")?,
                    r.try_get("dest_code")?,
                );
                let text = self.at_rest.open(
                    &r.try_get::<Vec<u8>, _>("content")?,
                    &unmatched_aad(&ch, &code, at),
                )?;
                Ok((
                    at,
                    ch,
                    code,
                    r.try_get("reason")?,
                    String::from_utf8_lossy(&text).into_owned(),
                ))
            })
            .collect()
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

impl Surveys {
    fn survey_from_row(&self, r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Survey> {
        let inv: i64 = r.try_get("invitation_id")?;
        let case = self
            .at_rest
            .open(&r.try_get::<Vec<u8>, _>("service_case")?, &case_aad(inv))?;
        let phone = self
            .at_rest
            .open(&r.try_get::<Vec<u8>, _>("phone")?, &phone_aad(inv))?;
        Ok(Survey {
            id: r.try_get("id")?,
            invitation_id: inv,
            dest_code: r.try_get("dest_code")?,
            case: pb::ServiceCase::decode(case.as_slice())?,
            phone: String::from_utf8(phone)?,
            expires_at: r.try_get("expires_at")?,
            answered: r.try_get::<Option<i64>, _>("answered_at")?.is_some(),
        })
    }
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

//! The adapter's own state: checkpoints (watermarks, file positions) and table rejects.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Row;
use sqlx::sqlite::SqlitePool;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct State {
    pool: SqlitePool,
}

impl State {
    pub async fn open(path: &str) -> anyhow::Result<Self> {
        let pool = rating_hub_adapter_kit::runtime::open_sqlite(path, &MIGRATOR).await?;
        Ok(Self { pool })
    }

    pub async fn get(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM checkpoints WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub async fn set(&self, name: &str, value: &str) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT INTO checkpoints (name, value) VALUES (?, ?) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        )
        .bind(name)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every checkpoint whose name starts with `prefix`: (name, value).
    pub async fn with_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT name, value FROM checkpoints WHERE substr(name, 1, length(?)) = ? ORDER BY name",
        )
        .bind(prefix)
        .bind(prefix)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("name"), r.get("value")))
            .collect())
    }

    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM checkpoints WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn reject(&self, source: &str, key: &str, reason: &str) -> anyhow::Result<()> {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        sqlx::query(
            "INSERT INTO table_rejects (source, row_key, reason, at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (source, row_key) DO UPDATE SET reason = excluded.reason, at = excluded.at",
        )
        .bind(source)
        .bind(key)
        .bind(reason)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// (row key, reason) of a table's rejected rows.
    pub async fn rejects(&self, source: &str) -> anyhow::Result<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT row_key, reason FROM table_rejects WHERE source = ? ORDER BY id")
                .bind(source)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get("row_key"), r.get("reason")))
            .collect())
    }
}

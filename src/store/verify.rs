//! `rating-hub log verify`: recomputes a database's rating log from its ratings, offline and
//! read-only, and names the first feed position where the stored ratings and the stored log
//! part ways (a rating changed, removed or out of place).

use std::collections::HashMap;

use sqlx::{Connection, PgConnection, SqliteConnection};

use crate::merkle::{self, Frontier, Hash, HashAlg, Prover};
use crate::store::StoreError;
use crate::store::log::{LEAF_COLUMNS, LeafRow};

/// Rows read per trip.
const BATCH: i64 = 5000;

/// A database, opened read-only.
pub enum Db {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

/// What a verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub hash: HashAlg,
    /// Ratings stored (the highest feed position).
    pub ratings: u64,
    /// Leaves in the stored log.
    pub leaves: u64,
    /// The root recomputed from the ratings, up to the first bad position (or all of them).
    pub root: Hash,
    /// Its size.
    pub size: u64,
    /// The first feed position that does not verify, and why.
    pub first_bad: Option<(u64, String)>,
}

impl Db {
    /// Opens the database `url` names (a SQLite path or `sqlite:` URL, or a PostgreSQL URL)
    /// without writing to it.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        if crate::store::postgres::is_postgres_url(url) {
            let mut conn = PgConnection::connect(url).await?;
            sqlx::query("SET default_transaction_read_only = on")
                .execute(&mut conn)
                .await?;
            Ok(Db::Postgres(conn))
        } else {
            use sqlx::ConnectOptions;
            use std::str::FromStr;
            let url = if url.starts_with("sqlite:") {
                url.to_owned()
            } else {
                format!("sqlite://{url}")
            };
            let conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                .read_only(true)
                .connect()
                .await?;
            Ok(Db::Sqlite(conn))
        }
    }

    async fn scalar_i64(&mut self, sql: &str) -> Result<i64, StoreError> {
        Ok(match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
        })
    }

    async fn alg(&mut self) -> Result<HashAlg, StoreError> {
        let sql = "SELECT hash_alg FROM log_meta WHERE id = 1";
        let stored: Option<String> = match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_optional(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_optional(c).await?,
        };
        let stored = stored.ok_or_else(|| {
            StoreError::Config(
                "this database has no rating log yet (start the hub on it once)".into(),
            )
        })?;
        HashAlg::parse(&stored)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown rating log hash {stored:?}")))
    }

    async fn rows_after(&mut self, after: u64) -> Result<Vec<LeafRow>, StoreError> {
        let rows = match self {
            Db::Sqlite(c) => sqlx::query(&format!(
                "SELECT {LEAF_COLUMNS} FROM ratings WHERE feed_seq > ? ORDER BY feed_seq LIMIT ?"
            ))
            .bind(after as i64)
            .bind(BATCH)
            .fetch_all(c)
            .await?
            .iter()
            .map(LeafRow::read)
            .collect::<Result<Vec<_>, _>>()?,
            Db::Postgres(c) => sqlx::query(&format!(
                "SELECT {LEAF_COLUMNS} FROM ratings WHERE feed_seq > $1 ORDER BY feed_seq LIMIT $2"
            ))
            .bind(after as i64)
            .bind(BATCH)
            .fetch_all(c)
            .await?
            .iter()
            .map(LeafRow::read)
            .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// Stored leaf hashes with index in `from..to`.
    async fn leaves(&mut self, from: u64, to: u64) -> Result<HashMap<u64, Vec<u8>>, StoreError> {
        let rows: Vec<(i64, Vec<u8>)> =
            match self {
                Db::Sqlite(c) => {
                    sqlx::query_as(
                        "SELECT idx, hash FROM log_nodes WHERE level = 0 AND idx >= ? AND idx < ?",
                    )
                    .bind(from as i64)
                    .bind(to as i64)
                    .fetch_all(c)
                    .await?
                }
                Db::Postgres(c) => sqlx::query_as(
                    "SELECT idx, hash FROM log_nodes WHERE level = 0 AND idx >= $1 AND idx < $2",
                )
                .bind(from as i64)
                .bind(to as i64)
                .fetch_all(c)
                .await?,
            };
        Ok(rows.into_iter().map(|(i, h)| (i as u64, h)).collect())
    }

    /// Stored nodes by (level, index).
    pub async fn nodes(
        &mut self,
        want: &[(u32, u64)],
    ) -> Result<HashMap<(u32, u64), Hash>, StoreError> {
        let mut out = HashMap::new();
        for &(l, i) in want {
            let h: Option<Vec<u8>> = match self {
                Db::Sqlite(c) => {
                    sqlx::query_scalar("SELECT hash FROM log_nodes WHERE level = ? AND idx = ?")
                        .bind(i64::from(l))
                        .bind(i as i64)
                        .fetch_optional(c)
                        .await?
                }
                Db::Postgres(c) => {
                    sqlx::query_scalar("SELECT hash FROM log_nodes WHERE level = $1 AND idx = $2")
                        .bind(l as i16)
                        .bind(i as i64)
                        .fetch_optional(c)
                        .await?
                }
            };
            if let Some(h) = h.and_then(|h| Hash::try_from(h).ok()) {
                out.insert((l, i), h);
            }
        }
        Ok(out)
    }

    pub async fn close(self) {
        let _ = match self {
            Db::Sqlite(c) => c.close().await,
            Db::Postgres(c) => c.close().await,
        };
    }
}

/// Recomputes the log from the ratings and compares it with the stored log: every rating's
/// leaf against the stored leaf at its position, positions without gaps, and the stored
/// tree's root against the recomputed one. `progress` is told the positions checked.
pub async fn verify(db: &mut Db, mut progress: impl FnMut(u64)) -> Result<Report, StoreError> {
    let alg = db.alg().await?;
    let ratings = db
        .scalar_i64("SELECT COALESCE(MAX(feed_seq), 0) FROM ratings")
        .await? as u64;
    let leaves = db
        .scalar_i64("SELECT COALESCE(MAX(idx) + 1, 0) FROM log_nodes WHERE level = 0")
        .await? as u64;
    let mut frontier = Frontier::empty(alg);
    let mut first_bad: Option<(u64, String)> = None;
    'rows: loop {
        let rows = db.rows_after(frontier.size).await?;
        if rows.is_empty() {
            break;
        }
        let from = frontier.size;
        let stored = db.leaves(from, from + rows.len() as u64 + 1).await?;
        for row in rows {
            let position = frontier.size + 1;
            if row.feed_seq as u64 != position {
                first_bad = Some((
                    position,
                    format!(
                        "no rating at feed position {position} (the next stored one is {}): removed",
                        row.feed_seq
                    ),
                ));
                break 'rows;
            }
            let leaf = row.leaf_hash(alg);
            match stored.get(&(position - 1)) {
                Some(h) if h.as_slice() == leaf => {}
                Some(_) => {
                    first_bad = Some((
                        position,
                        "the stored rating differs from the one the log recorded: changed".into(),
                    ));
                    break 'rows;
                }
                None => {
                    first_bad = Some((
                        position,
                        "the log has no leaf for this rating: written around the hub".into(),
                    ));
                    break 'rows;
                }
            }
            frontier.append(leaf);
        }
        progress(frontier.size);
    }
    if first_bad.is_none() && leaves > frontier.size {
        let position = frontier.size + 1;
        first_bad = Some((
            position,
            format!(
                "the log records {leaves} ratings and only {} are stored: removed",
                frontier.size
            ),
        ));
    }
    if first_bad.is_none() && frontier.size > 0 {
        // The stored inner nodes (what proofs are made of) agree with the leaves.
        let size = frontier.size;
        let want = merkle::nodes_read(alg, |p| p.root(size));
        let nodes = db.nodes(&want).await?;
        let stored_root = Prover { alg, nodes: &nodes }.root(size);
        if stored_root.as_ref().ok() != Some(&frontier.root()) {
            first_bad = Some((
                size,
                "the stored log's inner nodes do not combine to the root of its leaves".into(),
            ));
        }
    }
    Ok(Report {
        hash: alg,
        ratings,
        leaves,
        root: frontier.root(),
        size: frontier.size,
        first_bad,
    })
}

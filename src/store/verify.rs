//! `rating-hub log verify`: recomputes a database's rating log from its ratings, offline and
//! read-only, and names the first feed position where the stored ratings and the stored log
//! part ways (a rating changed, removed or out of place).

use std::collections::HashMap;

use sqlx::{Connection, PgConnection, SqliteConnection};

use crate::merkle::{self, Frontier, Hash, HashAlg, LEAVES_PER_ROW, Layout};
use crate::store::StoreError;
use crate::store::log::{
    LEAF_COLUMNS, LeafRow, check_layout, check_leaf_table, size_sql, stray_leaves_sql,
    unpack_leaves,
};

/// Rows read per trip.
const BATCH: i64 = 5000;

/// The leaves `log_leaves` holds (each row's whole hashes).
const PACKED_LEAVES: &str =
    "SELECT CAST(COALESCE(SUM(length(hashes) / 32), 0) AS BIGINT) FROM log_leaves";

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
    /// Whether the tree of the expected size has the expected root (when one was given;
    /// `Some(false)` too when the log does not verify that far).
    pub expected_ok: Option<bool>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.first_bad.is_none() && self.expected_ok != Some(false)
    }
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
            // One snapshot for the whole check: a hub committing meanwhile adds nothing
            // half-seen (rows counted before, read after).
            sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
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
            let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?
                .read_only(true)
                .connect()
                .await?;
            // One snapshot for the whole check (WAL: from the first read on).
            sqlx::query("BEGIN").execute(&mut conn).await?;
            Ok(Db::Sqlite(conn))
        }
    }

    async fn scalar_i64(&mut self, sql: &str) -> Result<i64, StoreError> {
        Ok(match self {
            Db::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
            Db::Postgres(c) => sqlx::query_scalar(sql).fetch_one(c).await?,
        })
    }

    /// Whether `log_meta` has `column` (a database the new hub has not started on yet lacks
    /// the later ones).
    async fn has_meta_column(&mut self, column: &str) -> Result<bool, StoreError> {
        let n: i64 =
            match self {
                Db::Sqlite(c) => {
                    sqlx::query_scalar(
                        "SELECT COUNT(*) FROM pragma_table_info('log_meta') WHERE name = ?",
                    )
                    .bind(column)
                    .fetch_one(c)
                    .await?
                }
                Db::Postgres(c) => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pg_attribute WHERE attrelid = to_regclass('log_meta') \
                     AND attname = $1 AND NOT attisdropped",
                )
                .bind(column)
                .fetch_one(c)
                .await?,
            };
        Ok(n > 0)
    }

    /// The log's hash and the layout its nodes are stored in.
    async fn log_meta(&mut self) -> Result<(HashAlg, Layout), StoreError> {
        // Without node_stride, a log stores every level; without packed_leaves, its leaves
        // are in log_nodes.
        let stride = if self.has_meta_column("node_stride").await? {
            "CAST(node_stride AS BIGINT)"
        } else {
            "CAST(1 AS BIGINT)"
        };
        let packed = if self.has_meta_column("packed_leaves").await? {
            "CAST(packed_leaves AS INTEGER)"
        } else {
            "CAST(0 AS INTEGER)"
        };
        let sql = format!("SELECT hash_alg, {stride}, {packed} FROM log_meta WHERE id = 1");
        let stored: Option<(String, i64, i32)> = match self {
            Db::Sqlite(c) => sqlx::query_as(&sql).fetch_optional(c).await?,
            Db::Postgres(c) => sqlx::query_as(&sql).fetch_optional(c).await?,
        };
        let (stored, stride, packed) = stored.ok_or_else(|| {
            StoreError::Config(
                "this database has no rating log yet (start the hub on it once)".into(),
            )
        })?;
        let alg = HashAlg::parse(&stored)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown rating log hash {stored:?}")))?;
        Ok((
            alg,
            check_layout(stride, packed != 0).map_err(StoreError::Corrupt)?,
        ))
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

    /// Stored nodes at each `(level, first index, last index)`; the leaves from
    /// `log_leaves` where `layout` packs them.
    async fn nodes_in(
        &mut self,
        layout: Layout,
        ranges: &[(u32, u64, u64)],
    ) -> Result<HashMap<(u32, u64), Vec<u8>>, StoreError> {
        let mut out = HashMap::new();
        for &(level, lo, hi) in ranges {
            if level == 0 && layout.packs_leaves() {
                let (lo, hi) = (lo - lo % LEAVES_PER_ROW, hi);
                let sql = match self {
                    Db::Sqlite(_) => {
                        "SELECT first, hashes FROM log_leaves WHERE first BETWEEN ? AND ?"
                    }
                    Db::Postgres(_) => {
                        "SELECT first, hashes FROM log_leaves WHERE first BETWEEN $1 AND $2"
                    }
                };
                let rows: Vec<(i64, Vec<u8>)> = match self {
                    Db::Sqlite(c) => {
                        sqlx::query_as(sql)
                            .bind(lo as i64)
                            .bind(hi as i64)
                            .fetch_all(c)
                            .await?
                    }
                    Db::Postgres(c) => {
                        sqlx::query_as(sql)
                            .bind(lo as i64)
                            .bind(hi as i64)
                            .fetch_all(c)
                            .await?
                    }
                };
                for (first, hashes) in rows {
                    let leaves = unpack_leaves(first, &hashes).map_err(StoreError::Corrupt)?;
                    for (i, h) in leaves {
                        // A leaf two rows hold: an empty hash, which no leaf matches.
                        if out.insert((0, i), h.to_vec()).is_some() {
                            out.insert((0, i), Vec::new());
                        }
                    }
                }
                continue;
            }
            let rows: Vec<(i64, Vec<u8>)> = match self {
                Db::Sqlite(c) => {
                    sqlx::query_as(
                        "SELECT idx, hash FROM log_nodes WHERE level = ? AND idx BETWEEN ? AND ?",
                    )
                    .bind(i64::from(level))
                    .bind(lo as i64)
                    .bind(hi as i64)
                    .fetch_all(c)
                    .await?
                }
                Db::Postgres(c) => sqlx::query_as(
                    "SELECT idx, hash FROM log_nodes WHERE level = $1 AND idx BETWEEN $2 AND $3",
                )
                .bind(level as i16)
                .bind(lo as i64)
                .bind(hi as i64)
                .fetch_all(c)
                .await?,
            };
            out.extend(rows.into_iter().map(|(i, h)| ((level, i as u64), h)));
        }
        Ok(out)
    }

    /// Stored nodes per level (the packed leaves at level 0, with any in `log_nodes`).
    async fn nodes_by_level(&mut self, layout: Layout) -> Result<HashMap<i64, u64>, StoreError> {
        let sql = "SELECT CAST(level AS BIGINT), COUNT(*) FROM log_nodes GROUP BY level";
        let rows: Vec<(i64, i64)> = match self {
            Db::Sqlite(c) => sqlx::query_as(sql).fetch_all(c).await?,
            Db::Postgres(c) => sqlx::query_as(sql).fetch_all(c).await?,
        };
        let mut out: HashMap<i64, u64> = rows.into_iter().map(|(l, n)| (l, n as u64)).collect();
        if layout.packs_leaves() {
            *out.entry(0).or_default() += self.scalar_i64(PACKED_LEAVES).await? as u64;
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

/// A root recorded earlier (a signed head, an upstream's copy): the tree of its size must
/// be the one recomputed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub size: u64,
    pub root: Hash,
}

/// Recomputes the log from the ratings and compares it with the stored log: every rating's
/// leaf and every inner node of the levels the layout stores against the stored ones,
/// positions without gaps or strays, no stored node that no rating accounts for (counted
/// level by level), and (given one) a root recorded earlier.
/// `progress` is told the positions checked.
pub async fn verify(
    db: &mut Db,
    expected: Option<Expected>,
    mut progress: impl FnMut(u64),
) -> Result<Report, StoreError> {
    let (alg, layout) = db.log_meta().await?;
    let ratings = db
        .scalar_i64("SELECT COALESCE(MAX(feed_seq), 0) FROM ratings")
        .await? as u64;
    let rows_stored = db.scalar_i64("SELECT COUNT(*) FROM ratings").await? as u64;
    let lowest = db
        .scalar_i64("SELECT COALESCE(MIN(feed_seq), 1) FROM ratings")
        .await?;
    let leaves = db.scalar_i64(size_sql(layout)).await? as u64;
    let mut nodes_stored = db.scalar_i64("SELECT COUNT(*) FROM log_nodes").await? as u64;
    if layout.packs_leaves() {
        nodes_stored += db.scalar_i64(PACKED_LEAVES).await? as u64;
    }
    let mut frontier = Frontier::empty(alg);
    let mut first_bad: Option<(u64, String)> = None;
    let mut expected_root: Option<Hash> = expected.filter(|e| e.size == 0).map(|_| frontier.root());
    if lowest < 1 {
        first_bad = Some((
            0,
            format!("a rating is stored at feed position {lowest}, outside the feed"),
        ));
    }
    // Leaves in the table the layout does not keep them in (a database from before packed
    // leaves may have no log_leaves at all).
    let has_leaf_table = db
        .scalar_i64(match db {
            Db::Sqlite(_) => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'log_leaves'"
            }
            Db::Postgres(_) => {
                "SELECT CAST(CASE WHEN to_regclass('log_leaves') IS NULL THEN 0 ELSE 1 END \
                 AS BIGINT)"
            }
        })
        .await?
        > 0;
    if first_bad.is_none() && (layout.packs_leaves() || has_leaf_table) {
        let stray: Option<i64> = match &mut *db {
            Db::Sqlite(c) => {
                sqlx::query_scalar(stray_leaves_sql(layout))
                    .fetch_one(c)
                    .await?
            }
            Db::Postgres(c) => {
                sqlx::query_scalar(stray_leaves_sql(layout))
                    .fetch_one(c)
                    .await?
            }
        };
        if let Err(why) = check_leaf_table(layout, stray) {
            let at = stray.unwrap_or(0).max(0) as u64;
            first_bad = Some((at.saturating_add(1), why));
        }
    }
    'rows: while first_bad.is_none() {
        let rows = db.rows_after(frontier.size).await?;
        if rows.is_empty() {
            break;
        }
        // Every node these rows complete, recomputed, with the position that completed it.
        let mut computed: Vec<(u64, merkle::Node)> = Vec::new();
        let mut next = frontier.clone();
        let mut gap = None;
        for row in &rows {
            let position = next.size + 1;
            if row.feed_seq as u64 != position {
                gap = Some((position, row.feed_seq));
                break;
            }
            for node in layout.kept(next.append(row.leaf_hash(alg))) {
                computed.push((position, node));
            }
            if let Some(e) = expected
                && e.size == next.size
            {
                expected_root = Some(next.root());
            }
        }
        let mut ranges: Vec<(u32, u64, u64)> = Vec::new();
        for (_, (level, idx, _)) in &computed {
            match ranges.iter_mut().find(|r| r.0 == *level) {
                Some(r) => {
                    r.1 = r.1.min(*idx);
                    r.2 = r.2.max(*idx);
                }
                None => ranges.push((*level, *idx, *idx)),
            }
        }
        let stored = db.nodes_in(layout, &ranges).await?;
        for (position, (level, idx, hash)) in &computed {
            match stored.get(&(*level, *idx)) {
                Some(h) if h.as_slice() == hash => {}
                found => {
                    let why = match (level, found) {
                        (0, Some(h)) if h.is_empty() => "the log stores this rating's leaf in \
                                                         two log_leaves rows: the log itself \
                                                         was changed"
                            .to_owned(),
                        (0, Some(_)) => {
                            "the stored rating differs from the one the log recorded: changed"
                                .to_owned()
                        }
                        (0, None) => "the log has no leaf for this rating: written around the \
                                      hub, or its leaf removed"
                            .to_owned(),
                        (l, _) => {
                            let width = 1u64 << l;
                            format!(
                                "the stored log node over positions {}..={} does not combine \
                                 its leaves: the log itself was changed",
                                idx * width + 1,
                                (idx + 1) * width
                            )
                        }
                    };
                    let at = if *level == 0 {
                        *position
                    } else {
                        idx * (1u64 << level) + 1
                    };
                    first_bad = Some((at, why));
                    // What verified: the leaves before this one.
                    for (p, (l, _, h)) in &computed {
                        if *p >= at {
                            break;
                        }
                        if *l == 0 {
                            frontier.append(*h);
                        }
                    }
                    break 'rows;
                }
            }
        }
        frontier = next;
        if let Some((position, found)) = gap {
            first_bad = Some((
                position,
                format!(
                    "no rating at feed position {position} (the next stored one is {found}): removed"
                ),
            ));
            break;
        }
        progress(frontier.size);
    }
    if first_bad.is_none() && leaves > frontier.size {
        first_bad = Some((
            frontier.size + 1,
            format!(
                "the log records {leaves} ratings and only {} are stored: removed",
                frontier.size
            ),
        ));
    }
    if first_bad.is_none() && rows_stored != frontier.size {
        first_bad = Some((
            frontier.size + 1,
            format!(
                "{} ratings are stored outside the feed's positions 1..={}",
                rows_stored.abs_diff(frontier.size),
                frontier.size
            ),
        ));
    }
    let nodes_due = layout.nodes_due(frontier.size);
    if first_bad.is_none() && nodes_stored != nodes_due {
        let by_level = db.nodes_by_level(layout).await?;
        // Levels 0 to 63, and any other level something stored (forged) nodes at.
        let mut levels: Vec<i64> = (0..64).chain(by_level.keys().copied()).collect();
        levels.sort_unstable();
        levels.dedup();
        let odd = levels.into_iter().find_map(|l| {
            let due = match u32::try_from(l) {
                Ok(l) if l < 64 && layout.stores(l) => frontier.size >> l,
                _ => 0,
            };
            let held = by_level.get(&l).copied().unwrap_or(0);
            (held != due).then_some((l, held, due))
        });
        let detail = match odd {
            Some((l, held, due)) => format!(
                " (level {l}: {held} stored, {due} due under log_meta.node_stride {})",
                layout.stride()
            ),
            None => String::new(),
        };
        first_bad = Some((
            frontier.size + 1,
            format!(
                "the stored log holds {nodes_stored} nodes and {} ratings account for \
                 {nodes_due}{detail}: nodes were added to or removed from the log",
                frontier.size
            ),
        ));
    }
    let expected_ok = expected.map(|e| expected_root == Some(e.root));
    Ok(Report {
        hash: alg,
        ratings,
        leaves,
        root: frontier.root(),
        size: frontier.size,
        first_bad,
        expected_ok,
    })
}

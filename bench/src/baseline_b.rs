//! Baseline B: the same rows inserted straight into SQLite or PostgreSQL with the hub's schema;
//! and B-lean, the same rows into the leanest table that still enforces idempotency (the feed
//! position as primary key, the (source, key) unique index, the stored body): the storage
//! floor the hub's schema is measured against.

use super::*;

/// The segments of a [`RawPlan`], one per hub scenario compared.
pub(crate) fn same_table_sizes<const N: usize>(m: Vec<Measured>) -> anyhow::Result<[Measured; N]> {
    m.try_into()
        .map_err(|m: Vec<Measured>| anyhow::anyhow!("{} baseline segments, not {N}", m.len()))
}

/// Baseline B's schedule: `prefill` rows inserted untimed, then each segment timed on its
/// own. The hub's scenarios run one after another on one growing table, and inserts get
/// slower as a table grows (more index levels, fewer cached pages), so B inserts the same
/// numbers of rows into a table of the same size as the hub's scenario it is compared with.
pub(crate) struct RawPlan {
    pub(crate) prefill: u64,
    pub(crate) segments: Vec<u64>,
}

/// Unique valid rows for baseline B, built (validated, sealed, encoded) outside the timed
/// part: only inserts are measured.
pub(crate) struct BaselineRows {
    pub(crate) keys: rating_hub::privacy::PiiKeys,
    pub(crate) org: String,
    pub(crate) next: u64,
}

impl BaselineRows {
    pub(crate) fn new(dir: &Path) -> anyhow::Result<Self> {
        let key = dir.join("baseline-pii.key");
        rating_hub::privacy::PiiKeys::create_key_file(&key)?;
        let mut keys = std::collections::BTreeMap::new();
        keys.insert("b".to_string(), key.display().to_string());
        Ok(Self {
            keys: rating_hub::privacy::PiiKeys::load("b", &keys)?,
            org: org(),
            next: 0,
        })
    }

    pub(crate) fn take(&mut self, n: u64) -> Vec<rating_hub::store::NewRating> {
        let requests = self.requests(n);
        self.prepare(&requests)
    }

    /// The next `n` ratings as a load generator would send them.
    pub(crate) fn requests(&mut self, n: u64) -> Vec<pb::Rating> {
        let now = now_micros();
        let start = self.next;
        self.next += n;
        (start..self.next)
            .map(|n| rating("raw", n, &self.org, now))
            .collect()
    }

    /// What the hub does to every rating before storing it: validation into the canonical
    /// rating (with its content hash), then the stored form (rater data sealed, phone tag).
    pub(crate) fn prepare(&self, requests: &[pb::Rating]) -> Vec<rating_hub::store::NewRating> {
        let now = now_micros();
        requests
            .iter()
            .map(|r| {
                let v = rating_hub::domain::parse_rating(r, now, &Default::default(), false)
                    .expect("valid");
                rating_hub::store::NewRating::new(
                    uuid::Uuid::now_v7(),
                    "dev-admin".into(),
                    v,
                    &self.keys,
                    Default::default(),
                )
            })
            .collect()
    }
}

/// CPU per rating of [`BaselineRows::prepare`]: work every rating costs the hub beyond A's
/// and B's (keys in `dir`). None where /proc could not be read.
pub(crate) fn preparation_cpu_micros(dir: &Path) -> anyhow::Result<Option<f64>> {
    const N: u64 = 50_000;
    std::fs::create_dir_all(dir)?;
    let mut rows = BaselineRows::new(dir)?;
    let requests = rows.requests(N);
    let meter = CpuMeter::start(None);
    let prepared = rows.prepare(&requests);
    let cpu = meter.bench_secs();
    drop(prepared);
    Ok(cpu.map(|secs| secs * 1e6 / N as f64))
}

/// Runs a [`RawPlan`] on one connection of either database: one transaction per batch with
/// [`batch_inserts`]. A macro because the generic bounds of sqlx's executors over borrowed
/// binds cost more lines than the loop.
macro_rules! raw_plan {
    ($conn:expr, $db:ty, $rows:expr, $plan:expr, $batch:expr, $pg_admin:expr, $lean:expr) => {{
        let (mut conn, mut rows, plan, batch) = ($conn, $rows, $plan, $batch);
        let now = now_micros();
        let mut seq = 0i64;
        let mut out = Vec::new();
        let mut left = plan.prefill;
        let mut timed = plan.segments.iter();
        loop {
            // The prefill in slices of 20,000 rows (memory), then each segment whole.
            let (n, time) = if left > 0 {
                let n = left.min(20_000);
                left -= n;
                (n, false)
            } else if let Some(&n) = timed.next() {
                (n, true)
            } else {
                break;
            };
            let new = rows.take(n);
            if time {
                pg_checkpoint($pg_admin).await?;
            }
            let start = Instant::now();
            let meter = CpuMeter::start(None);
            for chunk in new.chunks(batch) {
                let mut tx = conn.begin().await?;
                let statements = if $lean {
                    vec![lean_insert::<$db>(chunk, seq)]
                } else {
                    batch_inserts::<$db>(chunk, seq, now)
                };
                for mut qb in statements {
                    qb.build().execute(&mut *tx).await?;
                }
                seq += chunk.len() as i64;
                tx.commit().await?;
            }
            if time {
                out.push(Measured {
                    rate: n as f64 / start.elapsed().as_secs_f64(),
                    count: n,
                    cpu: meter.stop(),
                    ..Default::default()
                });
            }
        }
        Ok(out)
    }};
}

/// Baseline B on as many rows as the unary scenario stored, into an empty table (as the
/// hub's was), in batches of `batch`.
pub(crate) async fn raw_unary_rows(
    dir: &Path,
    rows: u64,
    batch: usize,
) -> anyhow::Result<Measured> {
    let plan = RawPlan {
        prefill: 0,
        segments: vec![rows],
    };
    let [m] = same_table_sizes(raw_sqlite(dir, &plan, batch, false).await?)?;
    Ok(m)
}

/// Baseline B: the same rows, the same schema and pragmas, batched inserts, nothing else.
pub(crate) async fn raw_sqlite(
    dir: &Path,
    plan: &RawPlan,
    batch: usize,
    lean: bool,
) -> anyhow::Result<Vec<Measured>> {
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    std::fs::create_dir_all(dir)?;
    let path = dir.join("baseline.db");
    let opts = rating_hub::store::SqliteOptions {
        path: path.display().to_string(),
        ..Default::default()
    };
    let store =
        rating_hub::store::SqliteStore::open(&opts, Arc::new(rating_hub::clock::SystemClock))
            .await?;
    rating_hub::store::Store::close(&store).await;
    // The hub's own connection settings (pragmas) for the same file.
    let conn = SqliteConnection::connect_with(&rating_hub::store::SqliteStore::writer_options(
        SqliteConnectOptions::new().filename(&path),
        true,
    ))
    .await?;
    let mut conn = conn;
    if lean {
        sqlx::query(
            "CREATE TABLE lean_ratings (feed_seq INTEGER PRIMARY KEY, source_system TEXT NOT \
             NULL, source_key TEXT NOT NULL, body BLOB NOT NULL, pii BLOB, \
             UNIQUE (source_system, source_key))",
        )
        .execute(&mut conn)
        .await?;
    }
    let rows = BaselineRows::new(dir)?;
    raw_plan!(conn, sqlx::Sqlite, rows, plan, batch, None, lean)
}

/// B-lean's statement for one batch: the feed position, the source and key (unique), the
/// stored body and sealed personal data; nothing else.
pub(crate) fn lean_insert<'a, DB>(
    chunk: &'a [rating_hub::store::NewRating],
    seq: i64,
) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a [u8]>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut q = sqlx::QueryBuilder::<DB>::new(
        "INSERT INTO lean_ratings (feed_seq, source_system, source_key, body, pii) ",
    );
    let mut seq = seq;
    q.push_values(chunk, |mut b, item| {
        seq += 1;
        b.push_bind(seq)
            .push_bind(item.source_system.as_str())
            .push_bind(item.rating.source_key.as_str())
            .push_bind(item.body_bytes.as_slice())
            .push_bind(item.pii.as_ref().map(|p| p.blob.as_slice()));
    });
    q
}

/// Baseline B's statements for one batch, on either database: one multi-row INSERT of the
/// ratings (feed sequences after `seq`), and one of the cases its bad ratings open (the rule
/// the hub applies).
pub(crate) fn batch_inserts<'a, DB>(
    chunk: &'a [rating_hub::store::NewRating],
    seq: i64,
    now: i64,
) -> Vec<sqlx::QueryBuilder<'a, DB>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i32: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a [u8]>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut ratings = sqlx::QueryBuilder::<DB>::new(
        "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, level, \
         channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
         rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
         batch_id, theme_id, device_id, template_hash, phone_tag) ",
    );
    let mut seq = seq;
    ratings.push_values(chunk, |mut b, item| {
        seq += 1;
        let r = &item.rating;
        b.push_bind(seq)
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
            .push_bind(now)
            .push_bind(false)
            .push_bind(0i64)
            .push_bind(item.body_bytes.as_slice())
            .push_bind(item.pii.as_ref().map(|p| p.blob.as_slice()))
            .push_bind(item.pii.as_ref().map(|p| p.key_id.as_str()))
            .push_bind("")
            .push_bind("")
            .push_bind("")
            .push_bind("")
            .push_bind(item.template_hash.as_ref().map(|h| h.as_slice()))
            .push_bind(item.phone_tag.as_ref().map(|h| h.as_slice()));
    });
    let mut statements = vec![ratings];
    let bad: Vec<_> = chunk
        .iter()
        .filter(|i| rating_hub::domain::rating::is_bad(i.rating.level) && !i.rating.is_default)
        .collect();
    if !bad.is_empty() {
        let mut cases = sqlx::QueryBuilder::<DB>::new(
            "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, real_name) ",
        );
        cases.push_values(bad, |mut b, item| {
            b.push_bind(item.hub_id.as_bytes().as_slice())
                .push_bind(item.rating.org_credit_code.as_str())
                .push_bind(item.rating.region_code.as_str())
                .push_bind(now)
                .push_bind(false);
        });
        statements.push(cases);
    }
    statements
}

/// The rows both raw baselines insert: validated, sealed and encoded like the hub's, built
/// before the timed part so only inserts are measured.
/// Baseline B on PostgreSQL: the same rows into the hub's own schema, one transaction and
/// one multi-row INSERT per batch, on a durable server (fsync, synchronous_commit on).
pub(crate) async fn raw_postgres(
    admin: &str,
    dir: &Path,
    plan: &RawPlan,
    batch: usize,
    lean: bool,
) -> anyhow::Result<Vec<Measured>> {
    use sqlx::Connection;
    let url = create_database(admin, "bench_raw").await?;
    let opts = rating_hub::store::PostgresOptions {
        url: url.clone(),
        max_group_commit: 2048,
        write_queue: 1024,
        read_connections: 1,
        read_wait: std::time::Duration::from_secs(5),
        instance: "bench-raw".into(),
        log_hash: Default::default(),
    };
    let store =
        rating_hub::store::PostgresStore::open(&opts, Arc::new(rating_hub::clock::SystemClock))
            .await?;
    rating_hub::store::Store::close(&store).await;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    if lean {
        sqlx::query(
            "CREATE TABLE lean_ratings (feed_seq BIGINT PRIMARY KEY, source_system TEXT NOT \
             NULL, source_key TEXT NOT NULL, body BYTEA NOT NULL, pii BYTEA, \
             UNIQUE (source_system, source_key))",
        )
        .execute(&mut conn)
        .await?;
    }
    let rows = BaselineRows::new(dir)?;
    raw_plan!(conn, sqlx::Postgres, rows, plan, batch, Some(admin), lean)
}

/// A new database on the server at `admin`; returns its URL.
pub(crate) async fn create_database(admin: &str, prefix: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = admin
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pg-url needs a database path"))?
        .0;
    Ok(format!("{base}/{name}"))
}

/// Runs `CHECKPOINT` on the PostgreSQL server at `admin` (nothing for None), before each
/// timed PostgreSQL scenario and each timed segment of B (PostgreSQL). The server
/// checkpoints when its WAL has grown by `max_wal_size`, and writes every page's first
/// change after a checkpoint whole into the WAL: a checkpoint the previous scenario's writes
/// brought due would otherwise fall at a different point of each scenario, hub's or B's, in
/// every run.
pub(crate) async fn pg_checkpoint(admin: Option<&str>) -> anyhow::Result<()> {
    use sqlx::Connection;
    if let Some(admin) = admin {
        let mut conn = sqlx::PgConnection::connect(admin).await?;
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await?;
    }
    Ok(())
}

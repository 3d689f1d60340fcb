//! The PostgreSQL backend: several hub instances on one shared database behave as one hub.
//!
//! - **One sequencer.** Each instance has one group-commit writer (as on SQLite). Its
//!   transaction first locks the single `feed_head` row, so the writers of all instances
//!   commit one after another: feed sequences (and every other id) are assigned in commit
//!   order with no gaps, and a `Pull`/`Subscribe` cursor can never pass a rating that is still
//!   to commit. Idempotency and the counting rules are decided under the same lock, so the same
//!   source key sent to two instances at once stores one rating.
//! - **Wake-ups.** The commit also sends `NOTIFY rating_hub_feed, '<head>'`; every instance
//!   listens and moves its feed head, which wakes its relay workers and subscribers. A lost
//!   listener connection re-reads the head after reconnecting.
//! - **Relay leases.** Each upstream is delivered by the instance holding its lease in
//!   `upstream_state`, renewed well inside its time to live on the database's clock; when the
//!   holder dies, another instance takes over at the stored cursor.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{
    PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions, PgRow, PgSslMode,
};
use sqlx::{ConnectOptions, Connection, Postgres, QueryBuilder, Row};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::chunk;
use super::counts::{self, CountsPlan};
use super::log::{self, LogAppend};
use super::rows::{self, Columns};
use super::writer::{self, GroupResult, GroupWrite, Job, Queue};
use super::{
    BadCaseCounts, CaseCounts, CaseOutcome, DayOrgDigest, DeadLetter, NewCaseEvent, OpenCase,
    PiiAccess, RatingQuery, RelayWrite, ScopeFilter, StatsDimension, StatsRow, Store, StoreError,
    StoredBadCase, StoredCaseEvent, StoredInvitation, StoredRating, StoredUpdate, UpstreamState,
};
use super::{CaseEntryRecord, EvidenceRecord, PeerHead};
use crate::clock::Clock;
use crate::merkle::{self, Frontier, HashAlg};

mod chunks;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/postgres");

/// The channel commits are announced on.
const FEED_CHANNEL: &str = "rating_hub_feed";

/// How to open the PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// A `postgres://` or `postgresql://` URL.
    pub url: String,
    /// Most items one group commit may hold.
    pub max_group_commit: usize,
    /// Queued write requests before callers wait (backpressure).
    pub write_queue: usize,
    /// Connections in the read pool.
    pub read_connections: u32,
    /// How long a read waits for a pool connection (or a new one to open) before it fails
    /// UNAVAILABLE: with the database down, reads and admin calls fail fast instead of
    /// hanging on the pool.
    pub read_wait: Duration,
    /// This hub instance's name: its sessions' `application_name` is `rating-hub/<name>`
    /// (what `pg_stat_activity` shows).
    pub instance: String,
    /// The rating log's hash (fixed when the log is first written).
    pub log_hash: HashAlg,
}

/// Whether a storage URL names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Every hub connection's options.
pub(crate) fn connect_options(url: &str, instance: &str) -> Result<PgConnectOptions, StoreError> {
    let connect: PgConnectOptions = url.parse()?;
    Ok(connect
        .application_name(&format!("rating-hub/{instance}"))
        .log_statements(tracing::log::LevelFilter::Trace)
        // Plan each execution for its own parameters and the tables' current size. A
        // cached generic plan made while `ratings` was empty seq-scans it for good (the
        // case look-up grew to 190 ms per chunk at 8,000 rows in the benchmark).
        .options([("plan_cache_mode", "force_custom_plan")]))
}

/// Whether the connection goes to a database on another machine without verifying the
/// server's certificate (sslmode below verify-ca: a machine in the middle could read and
/// change what the hub stores and reads). The hub warns at start.
fn unverified_remote(connect: &PgConnectOptions) -> bool {
    let host = connect.get_host();
    let local = connect.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !local
        && !matches!(
            connect.get_ssl_mode(),
            PgSslMode::VerifyCa | PgSslMode::VerifyFull
        )
}

/// The writer connection's options: its statements are all index probes and inserts by
/// design. While `ratings` grows from empty its statistics lag (autovacuum analyses it a
/// minute or so later), and the planner then takes "target_kind = 1 AND follow_up_of = ''"
/// for one row in a thousand and scans the table instead of probing the index. Nor does a
/// look-up gain from parallel workers: starting them costs more than its few hundred
/// probes, and the planner, adding up the parts of a chunk's look-up (one statement), chose
/// a parallel plan that took 31 ms instead of a few.
///
/// And the writer's transaction holds the sequencer row, which every instance's writer waits
/// for. A writer that stalls inside its transaction (a stopped process, a network path that
/// dropped without a reset) would stop every instance's ingest until TCP gave up, hours
/// later. PostgreSQL ends a session idle in its transaction for [`WRITER_STALL`]; the group
/// fails (nothing of it committed) and the other instances go on.
pub(crate) fn writer_options(connect: &PgConnectOptions) -> PgConnectOptions {
    connect.clone().options([
        ("enable_seqscan", "off"),
        ("max_parallel_workers_per_gather", "0"),
        ("idle_in_transaction_session_timeout", WRITER_STALL),
    ])
}

/// How long a writer may sit idle inside its transaction before PostgreSQL ends its session.
/// A group's statements follow one another within milliseconds.
const WRITER_STALL: &str = "5s";

pub struct PostgresStore {
    jobs: Queue,
    reader: PgPool,
    head: watch::Receiver<u64>,
    writer: Mutex<Option<writer::Stopped>>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// The health check's own connection (opened again after a failure): a read pool busy
    /// with long queries must not make a reachable database look down.
    health: Mutex<Option<PgConnection>>,
    connect: PgConnectOptions,
    /// The writer session's `synchronous_commit`, read back at open.
    durability: String,
    log_hash: HashAlg,
    log_layout: merkle::Layout,
}

impl PostgresStore {
    /// `stats` from `rating_counts` (src/store/counts.rs), in one pass: the same groups, in
    /// the same order and with the same bad-rating cases, as the scans; a group whose
    /// ratings were all excluded is left out, as the scan leaves it out (a case's rating
    /// always counts while the case does).
    async fn stats_from_counts(
        &self,
        plan: &CountsPlan,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", counts_dimension_sql(*d)));
        }
        qb.push(counts::stats_sums("::integer"));
        plan.push_counts(&mut qb, "rating_counts");
        push_filter(&mut qb, &plan.filter);
        if !group_by.is_empty() {
            let keys = (0..group_by.len())
                .map(|i| format!("k{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            // The same sum as the SELECT's (`stats_sums`), so it is computed once.
            qb.push(format!(
                " GROUP BY {keys} HAVING SUM(total::integer) > 0 ORDER BY {keys}"
            ));
        }
        let rows = qb.build().fetch_all(&self.reader).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(mut stats) = rows::stats_row(row, group_by.len())? {
                let cases = rows::bad_case_counts(row, group_by.len())?;
                if cases.cases > 0 {
                    stats.bad_cases = cases;
                }
                out.push(stats);
            }
        }
        Ok(out)
    }
}

impl PostgresStore {
    /// Connects, runs the embedded migrations (under PostgreSQL's advisory lock, so instances
    /// starting together migrate once), starts the writer and the commit listener.
    pub async fn open(opts: &PostgresOptions, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let connect = connect_options(&opts.url, &opts.instance)?;
        if unverified_remote(&connect) {
            tracing::warn!(
                host = connect.get_host(),
                sslmode = ?connect.get_ssl_mode(),
                "The PostgreSQL connection does not verify the server's certificate; set \
                 sslmode=verify-full and sslrootcert=<CA file> in storage.url."
            );
        }
        let mut writer_connect = writer_options(&connect);
        // Migrated on the writer's settings, which also checks them; the writer thread opens
        // its own connection (on its own runtime) for the first group.
        let mut migrate_conn = PgConnection::connect_with(&writer_connect).await?;
        MIGRATOR.run(&mut migrate_conn).await?;
        // An acknowledgement promises a commit that survives a crash: a server (or role)
        // configured with synchronous_commit=off would acknowledge before the WAL reached
        // disk. The writer's sessions pin the setting at connection start (where it outranks
        // a later reload of postgresql.conf or a role's setting): `on` in place of `off`,
        // stronger ones (remote_apply, synchronous standbys) as they are.
        let configured: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut migrate_conn)
            .await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync")
            .fetch_one(&mut migrate_conn)
            .await?;
        migrate_conn.close().await?;
        let pinned = if configured == "off" {
            tracing::warn!(
                "The PostgreSQL server has synchronous_commit=off; the hub's writer sets it to \
                 on for its own sessions, so that an acknowledged rating survives a crash."
            );
            "on".to_owned()
        } else {
            configured
        };
        if fsync != "on" {
            tracing::warn!(
                "The PostgreSQL server runs with fsync=off: a crash of its machine can lose \
                 ratings the hub acknowledged (a setting for throwaway test servers only)."
            );
        }
        writer_connect = writer_connect.options([("synchronous_commit", pinned.as_str())]);
        let mut check = PgConnection::connect_with(&writer_connect).await?;
        let effective: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut check)
            .await?;
        check.close().await?;
        if effective == "off" {
            return Err(StoreError::Storage(
                "the PostgreSQL writer session runs with synchronous_commit=off".into(),
            ));
        }
        let durability = format!("postgres synchronous_commit={effective} fsync={fsync}");
        let reader = PgPoolOptions::new()
            .max_connections(opts.read_connections.max(1) + 1)
            .acquire_timeout(opts.read_wait)
            .connect_with(connect.clone())
            .await?;
        let (log_alg, log_layout) = {
            let mut conn = PgConnection::connect_with(&writer_connect).await?;
            let log = open_log(&mut conn, opts.log_hash).await;
            let _ = conn.close().await;
            log?
        };
        let head: i64 = sqlx::query_scalar("SELECT head FROM feed_head WHERE id = 1")
            .fetch_one(&reader)
            .await?;
        let (head_tx, head_rx) = watch::channel(head as u64);
        // Listen before anyone writes, so no commit after `head` is missed.
        let mut listen = PgListener::connect_with(&reader).await?;
        listen.listen(FEED_CHANNEL).await?;
        let listener = tokio::spawn(follow_feed(listen, reader.clone(), head_tx.clone()));
        let (jobs, handle) = Queue::start(
            Writer {
                conn: None,
                connect: writer_connect,
                clock,
                log_alg,
                log_layout,
                frontier: None,
            },
            head_tx,
            opts.max_group_commit,
            opts.write_queue,
        )
        .map_err(sqlx::Error::Io)?;
        Ok(Self {
            jobs,
            reader,
            head: head_rx,
            writer: Mutex::new(Some(handle)),
            listener: Mutex::new(Some(listener)),
            health: Mutex::new(None),
            connect,
            durability,
            log_hash: log_alg,
            log_layout,
        })
    }

    async fn bad_case_from_row(&self, row: &PgRow) -> Result<StoredBadCase, StoreError> {
        let entries = sqlx::query(
            "SELECT action, actor, at, note, evidence_refs, new_deadline, appeal_outcome, \
             contacted_by, by_rater FROM bad_rating_case_entries WHERE case_id = $1 ORDER BY id",
        )
        .bind(row.int("id")?)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(rows::case_entry)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        rows::bad_case(row, entries)
    }
}

/// Moves the feed head on every instance's commit notification. After a lost connection
/// (notifications in between are gone) it re-reads the head from the database.
async fn follow_feed(mut listen: PgListener, pool: PgPool, head: watch::Sender<u64>) {
    let advance = |h: u64| writer::advance_head(&head, h);
    loop {
        match listen.try_recv().await {
            Ok(Some(n)) => match n.payload().parse::<u64>() {
                Ok(h) => advance(h),
                Err(_) => tracing::warn!(
                    payload = n.payload(),
                    "Ignoring a malformed feed notification."
                ),
            },
            Ok(None) => {
                tracing::warn!("The commit listener lost its connection; reconnecting.");
                // Listening again first, then reading the head: a commit in between is in
                // the head or notified, never neither.
                if let Err(e) = listen.listen(FEED_CHANNEL).await {
                    tracing::error!(error = %e, "The commit listener cannot reconnect; retrying in a second.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                match sqlx::query_scalar::<_, i64>("SELECT head FROM feed_head WHERE id = 1")
                    .fetch_one(&pool)
                    .await
                {
                    Ok(h) => advance(h as u64),
                    Err(e) => tracing::error!(error = %e, "Cannot read the feed head."),
                }
            }
            Err(e) => {
                if pool.is_closed() {
                    return;
                }
                tracing::error!(error = %e, "The commit listener failed; retrying in a second.");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

struct Writer {
    /// `None` after a failed group: the next group connects afresh (the server may have
    /// restarted, or the connection died mid-transaction).
    conn: Option<PgConnection>,
    connect: PgConnectOptions,
    clock: Arc<dyn Clock>,
    log_alg: HashAlg,
    log_layout: merkle::Layout,
    /// The rating log's right edge after this writer's last commit: used when no other
    /// instance committed since (its size is the head the sequencer shows), else read again.
    frontier: Option<Frontier>,
}

/// Checks the log's hash against the database's, and writes the log of any ratings stored
/// without it (a database from before the log), holding the sequencer so no instance's
/// writer commits meanwhile. Returns the hash and the layout the log's nodes are stored in.
async fn open_log(
    conn: &mut PgConnection,
    alg: HashAlg,
) -> Result<(HashAlg, merkle::Layout), StoreError> {
    let mut from = None;
    let mut batches = 0u64;
    loop {
        // Batch by batch, each under the sequencer: other instances' writers wait one batch
        // at a time, and a start cut short goes on from where it stopped.
        let mut tx = conn.begin().await?;
        let head: i64 = sqlx::query_scalar("SELECT head FROM feed_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        let head = head as u64;
        sqlx::query(
            "INSERT INTO log_meta (id, hash_alg, backfill_to, node_stride, packed_leaves) \
             VALUES (1, $1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(alg.as_str())
        .bind(head as i64)
        .bind(merkle::Layout::PACKED.stride() as i32)
        .bind(merkle::Layout::PACKED.packs_leaves())
        .execute(&mut *tx)
        .await?;
        let (stored, backfill_to, stride, packed): (String, i64, i32, bool) = sqlx::query_as(
            "SELECT hash_alg, backfill_to, node_stride, packed_leaves FROM log_meta WHERE id = 1",
        )
        .fetch_one(&mut *tx)
        .await?;
        let alg = log::check_alg(&stored, alg).map_err(StoreError::Config)?;
        let layout = log::check_layout(i64::from(stride), packed).map_err(StoreError::Corrupt)?;
        let size = log_size(&mut tx, layout).await?;
        if from.is_none() {
            let stray: Option<i64> = sqlx::query_scalar(log::stray_leaves_sql(layout))
                .fetch_one(&mut *tx)
                .await?;
            log::check_leaf_table(layout, stray).map_err(StoreError::Corrupt)?;
            let probes = read_stored(&mut tx, layout, &log::layout_probes(size)).await?;
            log::check_stored_levels(layout, size, &probes).map_err(StoreError::Corrupt)?;
        }
        let from = *from.get_or_insert(size);
        let target =
            log::backfill_target(size, head, backfill_to as u64).map_err(StoreError::Corrupt)?;
        if size >= target {
            tx.commit().await?;
            if size > from {
                tracing::warn!(
                    ratings = size - from,
                    hash = alg.as_str(),
                    batches,
                    "Rating log written for ratings stored before it. If this database had a log before, it was removed: compare the new root with the heads the upper hubs accepted (AdminService.ListPeerHeads there)."
                );
            }
            return Ok((alg, layout));
        }
        let mut frontier = load_frontier(&mut tx, alg, layout, size).await?;
        let rows = sqlx::query(&format!(
            "SELECT {} FROM ratings WHERE feed_seq > $1 ORDER BY feed_seq LIMIT 2000",
            log::LEAF_COLUMNS
        ))
        .bind(size as i64)
        .fetch_all(&mut *tx)
        .await?;
        let mut nodes = Vec::new();
        for row in &rows {
            if frontier.size == target {
                break;
            }
            let row = log::LeafRow::read(row)?;
            if row.feed_seq as u64 != frontier.size + 1 {
                break;
            }
            nodes.extend(layout.kept(frontier.append(row.leaf_hash(alg))));
        }
        if nodes.is_empty() {
            return Err(StoreError::Corrupt(format!(
                "feed position {} is missing: the rating log cannot be written over a gap",
                frontier.size + 1
            )));
        }
        insert_nodes(&mut tx, layout, nodes).await?;
        tx.commit().await?;
        batches += 1;
    }
}

/// The log's right edge for a tree of `size` leaves, from its stored nodes.
async fn load_frontier(
    conn: &mut PgConnection,
    alg: HashAlg,
    layout: merkle::Layout,
    size: u64,
) -> Result<Frontier, StoreError> {
    let want = merkle::frontier_positions(size);
    let nodes = read_nodes(conn, alg, layout, &want).await?;
    let hashes = want
        .iter()
        .map(|k| {
            nodes.get(k).copied().ok_or_else(|| {
                StoreError::Corrupt(format!("rating log node {}/{} is missing", k.0, k.1))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Frontier::from_nodes(alg, size, hashes)
        .ok_or_else(|| StoreError::Corrupt("the rating log's right edge does not fit".into()))
}

/// Log nodes by (level, index), each read or combined from the stored ones under it
/// (`layout`); those not stored are absent.
async fn read_nodes(
    conn: &mut PgConnection,
    alg: HashAlg,
    layout: merkle::Layout,
    want: &[(u32, u64)],
) -> Result<std::collections::HashMap<(u32, u64), merkle::Hash>, StoreError> {
    let stored = read_stored(conn, layout, &layout.sources(want)).await?;
    Ok(layout.combine(alg, want, &stored))
}

/// How many leaves the stored log has.
async fn log_size(conn: &mut PgConnection, layout: merkle::Layout) -> Result<u64, StoreError> {
    let size: i64 = sqlx::query_scalar(log::size_sql(layout))
        .fetch_one(&mut *conn)
        .await?;
    Ok(size as u64)
}

/// The stored log nodes of `want`, by (level, index): the leaves from `log_leaves` where
/// `layout` packs them.
async fn read_stored(
    conn: &mut PgConnection,
    layout: merkle::Layout,
    want: &[(u32, u64)],
) -> Result<std::collections::HashMap<(u32, u64), merkle::Hash>, StoreError> {
    let mut out = std::collections::HashMap::new();
    let (leaves, want): (Vec<_>, Vec<_>) = want
        .iter()
        .partition(|(l, _)| *l == 0 && layout.packs_leaves());
    let ranges = log::leaf_row_ranges(leaves.iter().map(|(_, i)| *i));
    if !ranges.is_empty() {
        let los: Vec<i64> = ranges.iter().map(|r| r.0 as i64).collect();
        let his: Vec<i64> = ranges.iter().map(|r| r.1 as i64).collect();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT l.first, l.hashes FROM UNNEST($1::bigint[], $2::bigint[]) AS w(lo, hi) \
             JOIN log_leaves l ON l.first BETWEEN w.lo AND w.hi",
        )
        .bind(los)
        .bind(his)
        .fetch_all(&mut *conn)
        .await?;
        for (first, hashes) in rows {
            log::add_packed_leaves(&mut out, first, &hashes).map_err(StoreError::Corrupt)?;
        }
    }
    let levels: Vec<i16> = want.iter().map(|(l, _)| *l as i16).collect();
    let idxs: Vec<i64> = want.iter().map(|(_, i)| *i as i64).collect();
    let rows: Vec<(i16, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT n.level, n.idx, n.hash FROM log_nodes n \
         JOIN UNNEST($1::smallint[], $2::bigint[]) AS w(level, idx) \
         ON n.level = w.level AND n.idx = w.idx",
    )
    .bind(levels)
    .bind(idxs)
    .fetch_all(&mut *conn)
    .await?;
    for (l, i, h) in rows {
        let h: merkle::Hash = h
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("rating log node {l}/{i} is not 32 bytes")))?;
        out.insert((l as u32, i as u64), h);
    }
    Ok(out)
}

async fn insert_nodes(
    conn: &mut PgConnection,
    layout: merkle::Layout,
    nodes: Vec<merkle::Node>,
) -> Result<(), sqlx::Error> {
    let (leaves, nodes) = log::split_leaves(layout, nodes);
    if !leaves.is_empty() {
        let firsts: Vec<i64> = leaves.iter().map(|r| r.0 as i64).collect();
        let hashes: Vec<&[u8]> = leaves.iter().map(|r| r.1.as_slice()).collect();
        let inserted = sqlx::query(
            "INSERT INTO log_leaves (first, hashes) \
             SELECT * FROM UNNEST($1::bigint[], $2::bytea[])",
        )
        .bind(firsts)
        .bind(hashes)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if inserted != leaves.len() as u64 {
            return Err(sqlx::Error::Protocol(format!(
                "inserted {inserted} of {} rating log leaf rows",
                leaves.len()
            )));
        }
    }
    if nodes.is_empty() {
        return Ok(());
    }
    let levels: Vec<i16> = nodes.iter().map(|n| n.0 as i16).collect();
    let idxs: Vec<i64> = nodes.iter().map(|n| n.1 as i64).collect();
    let hashes: Vec<&[u8]> = nodes.iter().map(|n| n.2.as_slice()).collect();
    let inserted = sqlx::query(
        "INSERT INTO log_nodes (level, idx, hash) \
         SELECT * FROM UNNEST($1::smallint[], $2::bigint[], $3::bytea[])",
    )
    .bind(levels)
    .bind(idxs)
    .bind(hashes)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted != nodes.len() as u64 {
        return Err(sqlx::Error::Protocol(format!(
            "inserted {inserted} of {} rating log nodes",
            nodes.len()
        )));
    }
    Ok(())
}

impl GroupWrite for Writer {
    async fn write_group(
        &mut self,
        group: &[Job],
    ) -> Result<(Vec<GroupResult>, Option<u64>), sqlx::Error> {
        let received_at = self.clock.now_micros();
        let mut kept = self.conn.is_some();
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => PgConnection::connect_with(&self.connect).await?,
        };
        let result = loop {
            let e = match conn.begin().await {
                Ok(tx) => {
                    break Self::write_group_tx(
                        tx,
                        group,
                        received_at,
                        self.log_alg,
                        self.log_layout,
                        &mut self.frontier,
                    )
                    .await;
                }
                Err(e) => e,
            };
            // A kept connection that died while idle (the server restarted, an operator ended
            // the session, the network dropped it) fails at BEGIN, before anything of this
            // group reached the database: open a new one and begin again, once, rather than
            // fail every caller of the group.
            if !(kept && StoreError::is_connection(&e)) {
                break Err(e);
            }
            tracing::info!(error = %e, "The writer's idle connection was lost; reconnecting.");
            conn = PgConnection::connect_with(&self.connect).await?;
            kept = false;
        };
        match &result {
            Ok(_) => self.conn = Some(conn),
            // The database refused the work: the connection is sound (the transaction is
            // rolled back before its next use), and a group split job by job after a refusal
            // does not reconnect once per job.
            Err(e) if StoreError::is_refusal(e) => self.conn = Some(conn),
            Err(e) => {
                if let Some(suppressed) = crate::telemetry::throttle("postgres.writer_reconnect") {
                    tracing::warn!(error = %e, suppressed, "Group commit failed; the writer reconnects for the next one.");
                }
                let _ = conn.close().await;
            }
        }
        result
    }

    async fn close(self) {
        if let Some(conn) = self.conn {
            let _ = conn.close().await;
        }
    }
}

impl Writer {
    async fn write_group_tx(
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        group: &[Job],
        received_at: i64,
        log_alg: HashAlg,
        log_layout: merkle::Layout,
        cached: &mut Option<Frontier>,
    ) -> Result<(Vec<GroupResult>, Option<u64>), sqlx::Error> {
        // Taken now: a failed group leaves no right edge it may have moved.
        let cached_frontier = cached.take();
        // The sequencer: every instance's writer waits here for the others' commits. Only
        // ratings take feed sequences, and case events are decided against what is stored;
        // a group of relay bookkeeping and audit records alone (the relay's cursor writes)
        // needs no turn in it.
        //
        // Audit records and invitations take their turn too: readers page through them by
        // id (`after_id`), so their ids must commit in id order across instances, or a
        // reader that saw a later id would pass an earlier one that committed after it.
        let sequenced = group.iter().any(|j| {
            matches!(
                j,
                Job::Ratings { .. }
                    | Job::Cases { .. }
                    | Job::Audit { .. }
                    | Job::Relay {
                        write: RelayWrite::Invite { .. }
                            // They add rating exclusions: rating_exclusions.seq, which
                            // upstream update cursors page by, must follow commit order.
                            | RelayWrite::Exclusion { .. }
                            | RelayWrite::CaseEntry {
                                exclude: Some(_),
                                ..
                            }
                            // An accepted lower-hub head, written only while the record it
                            // was checked against is still the last: under the sequencer,
                            // the check and the write see every head another instance
                            // committed (two overlapping writes whose lock was lost would
                            // each pass a guard that cannot see the other's row).
                            | RelayWrite::PeerHead(crate::store::PeerHead {
                                checked_against: Some(_),
                                ..
                            }),
                        ..
                    }
            )
        });
        // A case step that moves the statistics' counts (rectified, called back, archived,
        // spot-checked: rating_counts, which ratings' groups update under the sequencer)
        // takes it first too, so two instances never lock those rows in opposite orders (a
        // deadlock that failed whole groups). Other steps and evidence uploads do not.
        let sequenced = sequenced
            || group.iter().any(|j| {
                matches!(
                    j,
                    Job::Relay {
                        write: RelayWrite::CaseEntry { entry, .. },
                        ..
                    } if super::counts::MOVES_CASE_COUNTS.contains(&entry.action)
                )
            });
        let head: i64 = if sequenced {
            sqlx::query_scalar("SELECT head FROM feed_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?
        } else {
            0
        };
        let start = head as u64 + 1;
        let mut next_seq = start;
        let all = writer::all_ratings(group);
        let mut log = LogAppend::new(log_alg, log_layout);
        let mut outcomes = chunk::write_ratings(
            &mut chunks::PgChunks(&mut tx),
            &all,
            &mut next_seq,
            received_at,
            &mut log,
        )
        .await?
        .into_iter();
        // The log's nodes go with the ratings, under the sequencer: the right edge this
        // writer left, unless another instance committed since (then read from the store).
        let frontier = if log.is_empty() {
            // Kept: still right if no other instance commits ratings before the next group
            // (checked then against the head it locks).
            cached_frontier
        } else {
            let mut f = match cached_frontier {
                Some(f) if f.size + 1 == start => f,
                _ => load_frontier(&mut tx, log_alg, log_layout, start - 1)
                    .await
                    .map_err(|e| sqlx::Error::Protocol(e.to_string()))?,
            };
            insert_nodes(&mut tx, log_layout, log.nodes(&mut f)).await?;
            Some(f)
        };
        let mut results = Vec::with_capacity(group.len());
        for job in group {
            match job {
                Job::Ratings { items, .. } => {
                    results.push(GroupResult::Ratings(
                        outcomes.by_ref().take(items.len()).collect(),
                    ));
                }
                Job::Cases { items, .. } => {
                    let mut out = Vec::with_capacity(items.len());
                    for item in items {
                        out.push(insert_case(&mut tx, item, received_at).await?);
                    }
                    results.push(GroupResult::Cases(out));
                }
                Job::Audit {
                    principal,
                    rpc,
                    hub_ids,
                    ..
                } => {
                    let ids: Vec<&[u8]> = hub_ids.iter().map(|h| h.as_bytes().as_slice()).collect();
                    sqlx::query(
                        "INSERT INTO pii_access (at, principal, rpc, hub_id) \
                         SELECT $1, $2, $3, h FROM UNNEST($4::bytea[]) WITH ORDINALITY AS t(h, n) \
                         ORDER BY n",
                    )
                    .bind(received_at)
                    .bind(principal)
                    .bind(rpc)
                    .bind(ids)
                    .execute(&mut *tx)
                    .await?;
                    results.push(GroupResult::Audit);
                }
                Job::Relay { write, .. } => {
                    let n = relay_write(&mut tx, write, received_at).await?;
                    results.push(GroupResult::Relay(n));
                }
                Job::Close { .. } => {}
            }
        }
        let moved = if next_seq != start {
            let new_head = (next_seq - 1) as i64;
            // One round trip: the new head, and its notification, delivered to every
            // listener when (and only if) this transaction commits.
            sqlx::query("UPDATE feed_head SET head = $1 WHERE id = 1 RETURNING pg_notify($2, $3)")
                .bind(new_head)
                .bind(FEED_CHANNEL)
                .bind(new_head.to_string())
                .execute(&mut *tx)
                .await?;
            Some(next_seq - 1)
        } else {
            None
        };
        tx.commit().await?;
        *cached = frontier;
        Ok((results, moved))
    }
}

/// Whether a case's history still has `expected` entries (optimistic concurrency for a new
/// step: someone else's step in between means the caller reads the case again).
async fn case_unchanged(
    conn: &mut PgConnection,
    case_id: u64,
    expected: u64,
) -> Result<bool, sqlx::Error> {
    // Instances racing on one case wait here; the loser sees the winner's entry.
    sqlx::query("SELECT id FROM bad_rating_cases WHERE id = $1 FOR UPDATE")
        .bind(case_id as i64)
        .fetch_optional(&mut *conn)
        .await?;
    let have: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM bad_rating_case_entries WHERE case_id = $1")
            .bind(case_id as i64)
            .fetch_one(&mut *conn)
            .await?;
    Ok(have as u64 == expected)
}

/// Appends a step to a case's history, at `now`.
async fn insert_case_entry(
    conn: &mut PgConnection,
    case_id: u64,
    entry: &CaseEntryRecord,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bad_rating_case_entries (case_id, action, actor, at, note, \
         evidence_refs, new_deadline, appeal_outcome, contacted_by, by_rater) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(case_id as i64)
    .bind(entry.action)
    .bind(&entry.actor)
    .bind(now)
    .bind(&entry.note)
    .bind(entry.evidence_refs.join("\n"))
    .bind(entry.new_deadline_micros)
    .bind(entry.appeal_outcome)
    .bind(&entry.contacted_by)
    .bind(entry.by_rater)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn relay_write(
    conn: &mut PgConnection,
    write: &RelayWrite,
    now: i64,
) -> Result<u64, sqlx::Error> {
    match write {
        RelayWrite::Advance {
            upstream,
            cursor,
            dead,
        } => {
            if !dead.is_empty() {
                // Dead letters at or below the stored cursor were decided by the write that
                // moved it there (this one, committed although its answer was lost, or
                // another instance's): a write sent again adds nothing. The state row is
                // locked first, so two instances' writes (an old lease holder still retrying
                // beside the new one) decide one after the other.
                let stored: Option<i64> = sqlx::query_scalar(
                    "SELECT cursor FROM upstream_state WHERE upstream = $1 FOR UPDATE",
                )
                .bind(upstream)
                .fetch_optional(&mut *conn)
                .await?;
                let seqs: Vec<i64> = dead.iter().map(|d| d.feed_seq as i64).collect();
                let errors: Vec<String> = dead.iter().map(|d| d.error.clone()).collect();
                let attempts: Vec<i64> = dead.iter().map(|d| i64::from(d.attempts)).collect();
                sqlx::query(
                    "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at) \
                     SELECT $1, s, e, a, $5 FROM UNNEST($2::bigint[], $3::text[], $4::bigint[]) \
                     WITH ORDINALITY AS t(s, e, a, n) WHERE s > $6 ORDER BY n",
                )
                .bind(upstream)
                .bind(seqs)
                .bind(errors)
                .bind(attempts)
                .bind(now)
                .bind(stored.unwrap_or(0))
                .execute(&mut *conn)
                .await?;
            }
            // The cursor only moves forward, whatever order writes (or instances) arrive in.
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at) \
                 VALUES ($1, $2, FALSE, $3) ON CONFLICT (upstream) DO UPDATE SET \
                 cursor = GREATEST(upstream_state.cursor, excluded.cursor), \
                 updated_at = excluded.updated_at",
            )
            .bind(upstream)
            .bind(*cursor as i64)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::UpdateAdvance {
            upstream,
            cursor,
            dead,
        } => {
            if !dead.is_empty() {
                let stored: Option<i64> = sqlx::query_scalar(
                    "SELECT update_cursor FROM upstream_state WHERE upstream = $1 FOR UPDATE",
                )
                .bind(upstream)
                .fetch_optional(&mut *conn)
                .await?;
                let seqs: Vec<i64> = dead.iter().map(|d| d.0 as i64).collect();
                let errors: Vec<String> = dead.iter().map(|d| d.1.clone()).collect();
                sqlx::query(
                    "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at, \
                     update_seq) \
                     SELECT $1, 0, e, 1, $4, c FROM UNNEST($2::bigint[], $3::text[]) \
                     WITH ORDINALITY AS t(c, e, n) WHERE c > $5 ORDER BY n",
                )
                .bind(upstream)
                .bind(seqs)
                .bind(errors)
                .bind(now)
                .bind(stored.unwrap_or(0))
                .execute(&mut *conn)
                .await?;
            }
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at, update_cursor) \
                 VALUES ($1, 0, FALSE, $2, $3) ON CONFLICT (upstream) DO UPDATE SET \
                 update_cursor = GREATEST(upstream_state.update_cursor, excluded.update_cursor), \
                 updated_at = excluded.updated_at",
            )
            .bind(upstream)
            .bind(now)
            .bind(*cursor as i64)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::CaseAdvance {
            upstream,
            cursor,
            dead,
            delivered,
        } => {
            requeue_case_ratings(conn, upstream, delivered).await?;
            if !dead.is_empty() {
                // As for ratings: the state row locked first; nothing at or below the
                // stored case cursor is added again.
                let stored: Option<i64> = sqlx::query_scalar(
                    "SELECT case_cursor FROM upstream_state WHERE upstream = $1 FOR UPDATE",
                )
                .bind(upstream)
                .fetch_optional(&mut *conn)
                .await?;
                let ids: Vec<i64> = dead.iter().map(|d| d.0 as i64).collect();
                let errors: Vec<String> = dead.iter().map(|d| d.1.clone()).collect();
                sqlx::query(
                    "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at, \
                     case_event_id) \
                     SELECT $1, 0, e, 1, $4, c FROM UNNEST($2::bigint[], $3::text[]) \
                     WITH ORDINALITY AS t(c, e, n) WHERE c > $5 ORDER BY n",
                )
                .bind(upstream)
                .bind(ids)
                .bind(errors)
                .bind(now)
                .bind(stored.unwrap_or(0))
                .execute(&mut *conn)
                .await?;
            }
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at, case_cursor) \
                 VALUES ($1, 0, FALSE, $2, $3) ON CONFLICT (upstream) DO UPDATE SET \
                 case_cursor = GREATEST(upstream_state.case_cursor, excluded.case_cursor), \
                 updated_at = excluded.updated_at",
            )
            .bind(upstream)
            .bind(now)
            .bind(*cursor as i64)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::ReplayDone {
            upstream,
            delivered,
            failed,
            freed_cases,
        } => {
            requeue_case_ratings(conn, upstream, freed_cases).await?;
            let mut n = 0;
            if !delivered.is_empty() {
                let ids: Vec<i64> = delivered.iter().map(|id| *id as i64).collect();
                n += sqlx::query(
                    "UPDATE dead_letters SET resolved_at = $1, replay_requested = FALSE, \
                     attempts = attempts + 1 WHERE id = ANY($2) AND upstream = $3",
                )
                .bind(now)
                .bind(&ids)
                .bind(upstream)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                // Ratings delivered at last: their updates refused meanwhile go again.
                sqlx::query(
                    "UPDATE dead_letters SET replay_requested = TRUE WHERE upstream = $1 \
                     AND resolved_at IS NULL AND update_seq IN (SELECT x.seq \
                     FROM dead_letters l JOIN ratings r ON r.feed_seq = l.feed_seq \
                     JOIN rating_exclusions x ON x.hub_id = r.hub_id \
                     WHERE l.id = ANY($2) AND l.feed_seq > 0)",
                )
                .bind(upstream)
                .bind(&ids)
                .execute(&mut *conn)
                .await?;
            }
            for (id, error) in failed {
                n += sqlx::query(
                    "UPDATE dead_letters SET error = $1, replay_requested = FALSE, \
                     attempts = attempts + 1 WHERE id = $2 AND upstream = $3",
                )
                .bind(error)
                .bind(*id as i64)
                .bind(upstream)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            }
            Ok(n)
        }
        RelayWrite::SetPaused { upstream, paused } => {
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at) \
                 VALUES ($1, 0, $2, $3) ON CONFLICT (upstream) DO UPDATE SET \
                 paused = excluded.paused, updated_at = excluded.updated_at",
            )
            .bind(upstream)
            .bind(*paused)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::CaseEntry {
            case_id,
            expected_entries,
            entry,
            exclude,
        } => {
            if !case_unchanged(conn, *case_id, *expected_entries).await? {
                return Ok(0);
            }
            insert_case_entry(conn, *case_id, entry, now).await?;
            if let Some((hub_id, reason)) = exclude {
                sqlx::query(
                    "INSERT INTO rating_exclusions (hub_id, reason, case_id, at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .bind(hub_id.as_bytes().as_slice())
                .bind(*reason)
                .bind(*case_id as i64)
                .bind(now)
                .execute(&mut *conn)
                .await?;
            }
            Ok(1)
        }
        RelayWrite::Attempts(attempts) => {
            if !attempts.is_empty() {
                let mut qb = QueryBuilder::<Postgres>::new(
                    "INSERT INTO relay_attempts (upstream, at, first_seq, last_seq, records, \
                     outcome, detail, duration_ms, replay_id) ",
                );
                qb.push_values(attempts, |mut row, a| {
                    row.push_bind(a.upstream.as_str())
                        .push_bind(a.at_micros)
                        .push_bind(a.first_seq as i64)
                        .push_bind(a.last_seq as i64)
                        .push_bind(i64::from(a.records))
                        .push_bind(a.outcome.as_str())
                        .push_bind(a.detail.as_str())
                        .push_bind(i64::from(a.duration_ms))
                        .push_bind(a.replay_id.map(|v| v as i64));
                });
                qb.build().execute(&mut *conn).await?;
            }
            Ok(attempts.len() as u64)
        }
        RelayWrite::PruneAttempts { before_micros } => {
            let r = sqlx::query(
                "DELETE FROM relay_attempts WHERE id IN \
                 (SELECT id FROM relay_attempts WHERE at < $1 LIMIT $2)",
            )
            .bind(*before_micros)
            .bind(crate::relay::PRUNE_SLICE as i64)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::RequestRange {
            upstream,
            from_seq,
            to_seq,
            requested_by,
            reason,
        } => {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO relay_replays (upstream, from_seq, to_seq, next_seq, requested_by, \
                 requested_at, reason) VALUES ($1, $2, $3, $2, $4, $5, $6) RETURNING id",
            )
            .bind(upstream)
            .bind(*from_seq as i64)
            .bind(*to_seq as i64)
            .bind(requested_by)
            .bind(now)
            .bind(reason)
            .fetch_one(&mut *conn)
            .await?;
            Ok(id as u64)
        }
        RelayWrite::CancelRange { id, upstream } => {
            let r = sqlx::query(
                "UPDATE relay_replays SET done_at = $1, reason = reason || ' (cancelled)' \
                 WHERE id = $2 AND upstream = $3 AND done_at IS NULL",
            )
            .bind(now)
            .bind(*id as i64)
            .bind(upstream)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::RangeProgress { id, next_seq } => {
            // Forward only; done once past the end.
            let r = sqlx::query(
                "UPDATE relay_replays SET next_seq = $1, \
                 done_at = CASE WHEN $1 > to_seq THEN $2 ELSE done_at END \
                 WHERE id = $3 AND done_at IS NULL AND next_seq < $1",
            )
            .bind(*next_seq as i64)
            .bind(now)
            .bind(*id as i64)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::Exclusion {
            hub_id,
            reason,
            decided_by,
            note,
        } => {
            let r = sqlx::query(
                "INSERT INTO rating_exclusions (hub_id, reason, case_id, at, decided_by, note) \
                 VALUES ($1, $2, 0, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(hub_id.as_bytes().as_slice())
            .bind(*reason)
            .bind(now)
            .bind(decided_by)
            .bind(note)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
        RelayWrite::Evidence {
            case_id,
            expected_entries,
            entry,
            file,
        } => {
            if !case_unchanged(conn, *case_id, *expected_entries).await? {
                return Ok(0);
            }
            let r = &file.record;
            sqlx::query(
                "INSERT INTO evidence_blobs (sha256, content_type, size, key_id, content, \
                 created_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sha256) DO NOTHING",
            )
            .bind(&r.sha256)
            .bind(&r.content_type)
            .bind(r.size as i64)
            .bind(&file.key_id)
            .bind(file.sealed.as_slice())
            .bind(now)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "INSERT INTO case_evidence (case_id, sha256, file_name, attached_by, \
                 attached_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(*case_id as i64)
            .bind(&r.sha256)
            .bind(&r.file_name)
            .bind(&r.attached_by)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            insert_case_entry(conn, *case_id, entry, now).await?;
            Ok(1)
        }
        RelayWrite::Invite {
            event_id,
            source_system,
            case_number,
            org_credit_code,
            region_code,
            due_at_micros,
        } => Ok(sqlx::query(
            "INSERT INTO invitations (source_system, case_number, event_id, org_credit_code, \
             region_code, due_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT DO NOTHING",
        )
        .bind(source_system)
        .bind(case_number)
        .bind(*event_id as i64)
        .bind(org_credit_code)
        .bind(region_code)
        .bind(*due_at_micros)
        .bind(now)
        .execute(&mut *conn)
        .await?
        .rows_affected()),
        RelayWrite::PeerHead(h) => {
            // A finding is always recorded. An accepted head is written only while the
            // record it was checked against is still the principal's last accepted one and
            // holds that head; with `h.id` set it advances that record in place (history
            // thinned; the record keeps the time it was made, so one record spans at most
            // the caller's window) when nothing was recorded after it.
            let (guarded, against, from_size, from_root) = match &h.checked_against {
                Some((id, size, root)) => (true, *id, *size, root.as_slice()),
                None => (false, 0, 0, &[][..]),
            };
            if guarded && h.id != 0 {
                let advanced = sqlx::query(
                    "UPDATE peer_heads SET size = $1, root = $2, head_time = $3 \
                     WHERE id = $4 AND outcome = 'accepted' AND size = $5 AND root = $6 \
                     AND id = (SELECT MAX(id) FROM peer_heads WHERE principal = $7 \
                     AND outcome <> 'self_check')",
                )
                .bind(h.size as i64)
                .bind(&h.root)
                .bind(h.head_time_micros)
                .bind(h.id as i64)
                .bind(from_size as i64)
                .bind(from_root)
                .bind(&h.principal)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if advanced == 1 {
                    return Ok(1);
                }
            }
            Ok(sqlx::query(
                "INSERT INTO peer_heads (principal, size, root, head_time, received_at, outcome, \
                 first_bad, detail) SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
                 WHERE NOT $12 OR (NOT EXISTS (SELECT 1 FROM peer_heads WHERE principal = $1 \
                 AND outcome IN ('accepted', 'rebaselined') AND id > $9) \
                 AND ($9 = 0 OR EXISTS (SELECT 1 FROM peer_heads WHERE id = $9 \
                 AND size = $10 AND root = $11)))",
            )
            .bind(&h.principal)
            .bind(h.size as i64)
            .bind(&h.root)
            .bind(h.head_time_micros)
            .bind(now)
            .bind(&h.outcome)
            .bind(h.first_bad as i64)
            .bind(&h.detail)
            .bind(against as i64)
            .bind(from_size as i64)
            .bind(from_root)
            .bind(guarded)
            .execute(&mut *conn)
            .await?
            .rows_affected())
        }
        RelayWrite::Probe => {
            // A real row write (refused on a read-only server), committed and flushed.
            sqlx::query(
                "INSERT INTO storage_probe (id, at, pad) VALUES (1, $1, $2) \
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at, pad = excluded.pad",
            )
            .bind(now)
            .bind(super::probe_pad())
            .execute(&mut *conn)
            .await?;
            Ok(0)
        }
        RelayWrite::RequestReplay { upstream, ids } => {
            let open = "UPDATE dead_letters SET replay_requested = TRUE \
                        WHERE upstream = $1 AND resolved_at IS NULL";
            let r = match ids {
                None => sqlx::query(open).bind(upstream).execute(&mut *conn).await?,
                Some(ids) => {
                    let ids: Vec<i64> = ids.iter().map(|id| *id as i64).collect();
                    sqlx::query(&format!("{open} AND id = ANY($2)"))
                        .bind(upstream)
                        .bind(ids)
                        .execute(&mut *conn)
                        .await?
                }
            };
            Ok(r.rows_affected())
        }
    }
}

/// Marks for replay the open letters of ratings of these case numbers: refused while their
/// 办件 record had not gone up, they go again now it has.
async fn requeue_case_ratings(
    conn: &mut PgConnection,
    upstream: &str,
    case_numbers: &[String],
) -> Result<(), sqlx::Error> {
    if !case_numbers.is_empty() {
        sqlx::query(
            "UPDATE dead_letters SET replay_requested = TRUE WHERE upstream = $1 \
             AND resolved_at IS NULL AND case_event_id IS NULL AND update_seq IS NULL \
             AND feed_seq IN (SELECT feed_seq FROM ratings WHERE case_number = ANY($2))",
        )
        .bind(upstream)
        .bind(case_numbers)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn insert_case(
    conn: &mut PgConnection,
    item: &NewCaseEvent,
    received_at: i64,
) -> Result<CaseOutcome, sqlx::Error> {
    let c = &item.case;
    let inserted = sqlx::query(
        "INSERT INTO service_case_events (source_system, case_number, event, occurred_at, \
         item_code, region_code, org_credit_code, staff_id, channel, batch_id, theme_id, \
         content_hash, received_at, body, pii, pii_key_id) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
         ON CONFLICT (source_system, case_number, event) DO NOTHING",
    )
    .bind(&item.source_system)
    .bind(&c.case_number)
    .bind(c.event as i32)
    .bind(c.occurred_at_micros)
    .bind(&c.item_code)
    .bind(c.region_code.as_str())
    .bind(c.org_credit_code.as_str())
    .bind(&c.body.staff_id)
    .bind(c.body.channel)
    .bind(&c.body.batch_id)
    .bind(&c.body.theme_id)
    .bind(c.content_hash.as_slice())
    .bind(received_at)
    .bind(item.body_bytes.as_slice())
    .bind(item.pii.as_ref().map(|p| p.blob.as_slice()))
    .bind(item.pii.as_ref().map(|p| p.key_id.as_str()))
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(CaseOutcome::Accepted);
    }
    let hash: Vec<u8> = sqlx::query_scalar(
        "SELECT content_hash FROM service_case_events \
         WHERE source_system = $1 AND case_number = $2 AND event = $3",
    )
    .bind(&item.source_system)
    .bind(&c.case_number)
    .bind(c.event as i32)
    .fetch_one(&mut *conn)
    .await?;
    Ok(if hash == c.content_hash {
        CaseOutcome::Duplicate
    } else {
        CaseOutcome::Conflict
    })
}

const RATING_COLUMNS: &str = "SELECT feed_seq, hub_id, source_system, received_at, body, pii, \
     pii_key_id, quality_flags FROM ratings";

const DEAD_LETTER_COLUMNS: &str = "SELECT d.id, d.upstream, d.feed_seq, \
     COALESCE(r.hub_id, (SELECT x.hub_id FROM rating_exclusions x WHERE x.seq = d.update_seq)) \
     AS hub_id, d.error, \
     d.attempts, d.created_at, d.replay_requested, d.resolved_at, d.case_event_id, \
     d.update_seq FROM dead_letters d LEFT JOIN ratings r ON r.feed_seq = d.feed_seq \
     AND d.case_event_id IS NULL AND d.update_seq IS NULL";

const UPDATE_COLUMNS: &str = "SELECT x.seq AS seq, x.reason, x.at, x.decided_by, r.feed_seq, \
     r.hub_id, r.source_system, r.received_at, r.body, r.pii, r.pii_key_id, r.quality_flags, \
     EXISTS (SELECT 1 FROM dead_letters d WHERE d.upstream = $1 AND d.feed_seq = r.feed_seq \
       AND d.resolved_at IS NULL AND d.case_event_id IS NULL AND d.update_seq IS NULL) \
     AS rating_dead \
     FROM rating_exclusions x JOIN ratings r ON r.hub_id = x.hub_id";

const CASE_EVENT_COLUMNS: &str =
    "SELECT id, source_system, body, pii, pii_key_id FROM service_case_events";

/// `AND (org in scope OR region under a scope prefix)`. Codes compare bytewise ("C"
/// collation): ':' sorts right after '9', so `[p, p + ":")` is the prefix range.
fn push_scope(qb: &mut QueryBuilder<'_, Postgres>, scope: &ScopeFilter) {
    qb.push(" AND (FALSE");
    for org in &scope.orgs {
        qb.push(" OR org_credit_code = ").push_bind(org.clone());
    }
    for p in &scope.region_prefixes {
        qb.push(" OR (region_code >= ")
            .push_bind(p.clone())
            .push(" AND region_code < ")
            .push_bind(format!("{p}:"))
            .push(")");
    }
    qb.push(")");
}

fn push_filter(qb: &mut QueryBuilder<'_, Postgres>, q: &RatingQuery) {
    if q.counted_only && !q.time_is_occurred_at {
        // NOT EXISTS, a key probe: PostgreSQL never makes NOT IN (subquery) an anti-join,
        // and past work_mem every row would scan every exclusion. Every query this filter
        // counts in reads `ratings` unaliased (the statistics scans exclude on their own).
        qb.push(
            " AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = ratings.hub_id)",
        );
    }
    let mut eq = |col: &str, v: &Option<String>| {
        if let Some(v) = v {
            qb.push(format!(" AND {col} = ")).push_bind(v.clone());
        }
    };
    eq("org_credit_code", &q.org_credit_code);
    eq("item_code", &q.item_code);
    eq("staff_id", &q.staff_id);
    eq("case_number", &q.case_number);
    eq("source_system", &q.source_system);
    if let Some(p) = &q.region_prefix {
        qb.push(" AND region_code >= ")
            .push_bind(p.clone())
            .push(" AND region_code < ")
            .push_bind(format!("{p}:"));
    }
    for (col, values) in [
        ("channel", q.channels.as_slice()),
        ("level", q.levels.as_slice()),
        ("target_kind", q.target_kinds_filter()),
    ] {
        if !values.is_empty() {
            qb.push(format!(" AND {col} = ANY("))
                .push_bind(values.to_vec())
                .push(")");
        }
    }
    if let Some(scope) = &q.scope {
        push_scope(qb, scope);
    }
    if let Some(max) = q.max_feed_seq {
        qb.push(" AND feed_seq <= ").push_bind(max as i64);
    }
    let time_col = if q.time_is_occurred_at {
        "occurred_at"
    } else {
        "rated_at"
    };
    if let Some(t) = q.rated_from_micros {
        qb.push(format!(" AND {time_col} >= ")).push_bind(t);
    }
    if let Some(t) = q.rated_until_micros {
        qb.push(format!(" AND {time_col} < ")).push_bind(t);
    }
}

fn push_group_by(qb: &mut QueryBuilder<'_, Postgres>, n: usize, ordered: bool) {
    if n == 0 {
        return;
    }
    let keys = (0..n)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    qb.push(format!(" GROUP BY {keys}"));
    if ordered {
        qb.push(format!(" ORDER BY {keys}"));
    }
}

/// `dimension_sql` over `rating_counts` (whose `day` is the CST day number).
fn counts_dimension_sql(d: StatsDimension) -> &'static str {
    match d {
        StatsDimension::Day => "to_char(DATE '1970-01-01' + day, 'YYYY-MM-DD')",
        StatsDimension::Month => "to_char(DATE '1970-01-01' + day, 'YYYY-MM')",
        other => dimension_sql(other),
    }
}

fn dimension_sql(d: StatsDimension) -> &'static str {
    // Days and months are China Standard Time (UTC+8), as the policy texts count them.
    match d {
        StatsDimension::Region => "region_code",
        StatsDimension::City => "substr(region_code, 1, 4) || '00'",
        StatsDimension::Organization => "org_credit_code",
        StatsDimension::Item => "item_code",
        StatsDimension::Staff => "staff_id",
        StatsDimension::Channel => "CAST(channel AS TEXT)",
        StatsDimension::Day => {
            "to_char(to_timestamp(rated_at / 1000000 + 28800) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        }
        StatsDimension::Month => {
            "to_char(to_timestamp(rated_at / 1000000 + 28800) AT TIME ZONE 'UTC', 'YYYY-MM')"
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn log_hash(&self) -> HashAlg {
        self.log_hash
    }

    async fn log_nodes(
        &self,
        want: &[(u32, u64)],
    ) -> Result<std::collections::HashMap<(u32, u64), merkle::Hash>, StoreError> {
        let mut conn = self.reader.acquire().await?;
        read_nodes(&mut conn, self.log_hash, self.log_layout, want).await
    }

    fn durability(&self) -> &str {
        &self.durability
    }

    async fn database_bytes(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
            .fetch_one(&self.reader)
            .await?;
        Ok(n.max(0) as u64)
    }

    async fn insert_ratings(
        &self,
        items: Vec<super::NewRating>,
    ) -> Result<Vec<super::InsertOutcome>, StoreError> {
        self.jobs.ratings(items).await
    }

    async fn insert_cases(&self, items: Vec<NewCaseEvent>) -> Result<Vec<CaseOutcome>, StoreError> {
        self.jobs.cases(items).await
    }

    async fn get_rating(&self, hub_id: Uuid) -> Result<Option<StoredRating>, StoreError> {
        let row = sqlx::query(&format!("{RATING_COLUMNS} WHERE hub_id = $1"))
            .bind(hub_id.as_bytes().as_slice())
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(rows::stored_rating).transpose()
    }

    async fn list_ratings(
        &self,
        query: &RatingQuery,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredRating>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(RATING_COLUMNS);
        qb.push(" WHERE feed_seq > ").push_bind(after_seq as i64);
        push_filter(&mut qb, query);
        qb.push(" ORDER BY feed_seq LIMIT ")
            .push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::stored_rating).collect()
    }

    async fn stats(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError> {
        match counts::plan(query, group_by) {
            Some(plan) => self.stats_from_counts(&plan, group_by).await,
            None => Ok(super::with_cases(
                self.stats_by_scan(query, group_by).await?,
                self.bad_case_counts_by_scan(query, group_by).await?,
            )),
        }
    }

    async fn stats_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", dimension_sql(*d)));
        }
        qb.push(
            "COUNT(*) AS total, \
             COUNT(*) FILTER (WHERE level = 1) AS l1, COUNT(*) FILTER (WHERE level = 2) AS l2, \
             COUNT(*) FILTER (WHERE level = 3) AS l3, COUNT(*) FILTER (WHERE level = 4) AS l4, \
             COUNT(*) FILTER (WHERE level = 5) AS l5, \
             COUNT(*) FILTER (WHERE is_default) AS defaults, \
             COUNT(*) FILTER (WHERE quality_flags <> 0) AS flagged \
             FROM ratings WHERE NOT EXISTS (SELECT 1 FROM rating_exclusions x \
             WHERE x.hub_id = ratings.hub_id)",
        );
        push_filter(
            &mut qb,
            &RatingQuery {
                counted_only: false,
                ..query.clone()
            },
        );
        push_group_by(&mut qb, group_by.len(), true);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter()
            .filter_map(|row| rows::stats_row(row, group_by.len()).transpose())
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    async fn record_pii_access(
        &self,
        principal: &str,
        rpc: &str,
        hub_ids: &[Uuid],
    ) -> Result<(), StoreError> {
        self.jobs.audit(principal, rpc, hub_ids).await
    }

    async fn list_pii_access(
        &self,
        principal: Option<&str>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<PiiAccess>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT id, at, principal, rpc, hub_id FROM pii_access WHERE id > ",
        );
        qb.push_bind(after_id as i64);
        if let Some(p) = principal {
            qb.push(" AND principal = ").push_bind(p.to_owned());
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::pii_access).collect()
    }

    async fn day_org_digests(&self, query: &RatingQuery) -> Result<Vec<DayOrgDigest>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(format!(
            "SELECT {} AS day, org_credit_code, hub_id FROM ratings WHERE TRUE",
            dimension_sql(StatsDimension::Day)
        ));
        push_filter(&mut qb, query);
        qb.push(" ORDER BY day, org_credit_code");
        let mut rows = qb.build().fetch(&self.reader);
        let mut fold = rows::DayOrgFold::default();
        while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
            fold.push(&row)?;
        }
        Ok(fold.finish())
    }

    async fn received_at(&self, feed_seq: u64) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT received_at FROM ratings WHERE feed_seq = $1")
                .bind(feed_seq as i64)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn upstream_state(&self, upstream: &str) -> Result<UpstreamState, StoreError> {
        let row = sqlx::query(
            "SELECT cursor, paused, case_cursor, update_cursor FROM upstream_state \
             WHERE upstream = $1",
        )
        .bind(upstream)
        .fetch_optional(&self.reader)
        .await?;
        match row {
            Some(row) => Ok(UpstreamState {
                cursor: row.try_get::<i64, _>("cursor")? as u64,
                paused: row.try_get("paused")?,
                case_cursor: row.try_get::<i64, _>("case_cursor")? as u64,
                update_cursor: row.try_get::<i64, _>("update_cursor")? as u64,
            }),
            None => {
                self.relay_write(RelayWrite::Advance {
                    upstream: upstream.to_owned(),
                    cursor: 0,
                    dead: Vec::new(),
                })
                .await?;
                Ok(UpstreamState::default())
            }
        }
    }

    async fn relay_write(&self, write: RelayWrite) -> Result<u64, StoreError> {
        self.jobs.relay(write).await
    }

    async fn hold_lease(
        &self,
        upstream: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<UpstreamState>, StoreError> {
        // Taken if free, expired or already ours; renewed if ours. The database's clock
        // decides expiry, so instances' clocks need not agree.
        let row = sqlx::query(
            "UPDATE upstream_state SET lease_holder = $2, \
             lease_until = clock_timestamp() + make_interval(secs => $3) \
             WHERE upstream = $1 AND (lease_holder IS NULL OR lease_holder = $2 \
                 OR lease_until < clock_timestamp()) \
             RETURNING cursor, paused, case_cursor, update_cursor",
        )
        .bind(upstream)
        .bind(holder)
        .bind(ttl.as_secs_f64())
        .fetch_optional(&self.reader)
        .await?;
        row.map(|row| {
            Ok(UpstreamState {
                cursor: row.try_get::<i64, _>("cursor")? as u64,
                paused: row.try_get("paused")?,
                case_cursor: row.try_get::<i64, _>("case_cursor")? as u64,
                update_cursor: row.try_get::<i64, _>("update_cursor")? as u64,
            })
        })
        .transpose()
    }

    async fn release_lease(&self, upstream: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE upstream_state SET lease_holder = NULL, lease_until = NULL \
             WHERE upstream = $1 AND lease_holder = $2",
        )
        .bind(upstream)
        .bind(holder)
        .execute(&self.reader)
        .await?;
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    async fn lease_holder(&self, upstream: &str) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT lease_holder FROM upstream_state WHERE upstream = $1 \
             AND lease_until > clock_timestamp()",
        )
        .bind(upstream)
        .fetch_optional(&self.reader)
        .await?
        .flatten())
    }

    async fn list_dead_letters(
        &self,
        upstream: &str,
        include_resolved: bool,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(DEAD_LETTER_COLUMNS);
        qb.push(" WHERE d.upstream = ")
            .push_bind(upstream.to_owned())
            .push(" AND d.id > ")
            .push_bind(after_id as i64);
        if !include_resolved {
            qb.push(" AND d.resolved_at IS NULL");
        }
        qb.push(" ORDER BY d.id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        Ok(rows
            .iter()
            .map(rows::dead_letter)
            .collect::<Result<_, _>>()?)
    }

    async fn list_attempts(
        &self,
        upstream: &str,
        before_id: u64,
        limit: u32,
    ) -> Result<Vec<crate::store::AttemptRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, upstream, at, first_seq, last_seq, records, outcome, detail, duration_ms, \
             replay_id FROM relay_attempts WHERE upstream = $1 AND id < $2 \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(upstream)
        .bind(if before_id == 0 {
            i64::MAX
        } else {
            before_id as i64
        })
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(rows::attempt).collect::<Result<_, _>>()?)
    }

    async fn peer_heads(
        &self,
        principal: Option<&str>,
        alarms_only: bool,
        limit: u32,
    ) -> Result<Vec<PeerHead>, StoreError> {
        // One statement per case, each on the index (principal, outcome, id).
        let filter = match (principal.is_some(), alarms_only) {
            (true, true) => "WHERE principal = $1 AND outcome NOT IN ('accepted', 'rebaselined')",
            (true, false) => "WHERE principal = $1",
            (false, true) => "WHERE outcome NOT IN ('accepted', 'rebaselined') AND $1 = $1",
            (false, false) => "WHERE $1 = $1",
        };
        let rows: Vec<super::PeerHeadRow> = sqlx::query_as(&format!(
            "SELECT id, principal, size, root, head_time, received_at, outcome, first_bad, \
                 detail FROM peer_heads {filter} ORDER BY id DESC LIMIT $2"
        ))
        .bind(principal.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(PeerHead::from).collect())
    }

    async fn peer_lock(&self, principal: &str) -> Result<super::PeerLock, StoreError> {
        // A connection of its own: closing it (when the guard drops) ends the session and
        // so releases the lock, whatever happened meanwhile.
        // Bounded: a lower hub's report waits at most this long for the connection and the
        // lock (another instance checking the same lower hub's head).
        let take = async {
            let mut conn = PgConnection::connect_with(&self.connect).await?;
            sqlx::query("SET lock_timeout = '30s'")
                .execute(&mut conn)
                .await?;
            sqlx::query("SELECT pg_advisory_lock(hashtextextended($1, 0))")
                .bind(format!("rating-hub peer heads {principal}"))
                .execute(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>(conn)
        };
        match tokio::time::timeout(std::time::Duration::from_secs(40), take).await {
            Ok(conn) => Ok(super::PeerLock::holding(conn?)),
            Err(_) => Err(StoreError::Unavailable(
                "no connection for the lower hub's head lock within 40 s".into(),
            )),
        }
    }

    async fn last_accepted_head(
        &self,
        principal: &str,
    ) -> Result<Option<(u64, Vec<u8>, i64, u64)>, StoreError> {
        let row: Option<(i64, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT size, root, head_time, id FROM peer_heads WHERE principal = $1 \
             AND outcome IN ('accepted', 'rebaselined') ORDER BY id DESC LIMIT 1",
        )
        .bind(principal)
        .fetch_optional(&self.reader)
        .await?;
        Ok(row.map(|(s, r, t, id)| (s as u64, r, t, id as u64)))
    }

    async fn list_range_replays(
        &self,
        upstream: &str,
        open_only: bool,
    ) -> Result<Vec<crate::store::RangeReplay>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, upstream, from_seq, to_seq, next_seq, requested_by, requested_at, reason, \
             done_at FROM relay_replays WHERE upstream = $1 AND ($2 = 0 OR done_at IS NULL) \
             ORDER BY id DESC LIMIT 1000",
        )
        .bind(upstream)
        .bind(i64::from(open_only))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows
            .iter()
            .map(rows::range_replay)
            .collect::<Result<_, _>>()?)
    }

    async fn count_open_dead_letters(&self, upstream: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM dead_letters WHERE upstream = $1 AND resolved_at IS NULL",
        )
        .bind(upstream)
        .fetch_one(&self.reader)
        .await?;
        Ok(n as u64)
    }

    async fn replay_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredRating)>, StoreError> {
        let rows = sqlx::query(&format!(
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = $1 AND d.replay_requested \
             AND d.resolved_at IS NULL AND d.case_event_id IS NULL AND d.update_seq IS NULL \
             ORDER BY d.id LIMIT $2"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let rating = sqlx::query(&format!("{RATING_COLUMNS} WHERE feed_seq = $1"))
                .bind(dead.feed_seq as i64)
                .fetch_one(&self.reader)
                .await?;
            out.push((dead, rows::stored_rating(&rating)?));
        }
        Ok(out)
    }

    async fn list_case_events(
        &self,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredCaseEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "{CASE_EVENT_COLUMNS} WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after_id as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::case_event).collect()
    }

    async fn list_updates(
        &self,
        upstream: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<StoredUpdate>, StoreError> {
        let rows = sqlx::query(&format!(
            "{UPDATE_COLUMNS} WHERE x.seq > $2 ORDER BY x.seq LIMIT $3"
        ))
        .bind(upstream)
        .bind(after_seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::update).collect()
    }

    async fn replay_update_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredUpdate)>, StoreError> {
        let rows = sqlx::query(&format!(
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = $1 AND d.replay_requested \
             AND d.resolved_at IS NULL AND d.update_seq IS NOT NULL ORDER BY d.id LIMIT $2"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let update = sqlx::query(&format!("{UPDATE_COLUMNS} WHERE x.seq = $2"))
                .bind(upstream)
                .bind(dead.update_seq.unwrap_or_default() as i64)
                .fetch_one(&self.reader)
                .await?;
            out.push((dead, rows::update(&update)?));
        }
        Ok(out)
    }

    async fn update_head(&self) -> Result<u64, StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM rating_exclusions")
            .fetch_one(&self.reader)
            .await?;
        Ok(head as u64)
    }

    async fn case_head(&self) -> Result<u64, StoreError> {
        let head: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM service_case_events")
            .fetch_one(&self.reader)
            .await?;
        Ok(head as u64)
    }

    async fn replay_case_batch(
        &self,
        upstream: &str,
        limit: u32,
    ) -> Result<Vec<(DeadLetter, StoredCaseEvent)>, StoreError> {
        let rows = sqlx::query(&format!(
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = $1 AND d.replay_requested \
             AND d.resolved_at IS NULL AND d.case_event_id IS NOT NULL ORDER BY d.id LIMIT $2"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let event = sqlx::query(&format!("{CASE_EVENT_COLUMNS} WHERE id = $1"))
                .bind(dead.case_event_id.unwrap_or_default() as i64)
                .fetch_one(&self.reader)
                .await?;
            out.push((dead, rows::case_event(&event)?));
        }
        Ok(out)
    }

    async fn list_bad_cases_opened(
        &self,
        scope: Option<&ScopeFilter>,
        opened: Option<(i64, i64)>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredBadCase>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(format!("{} WHERE id > ", rows::CASE_COLUMNS));
        qb.push_bind(after_id as i64);
        if let Some((from, until)) = opened {
            qb.push(" AND opened_at >= ")
                .push_bind(from)
                .push(" AND opened_at < ")
                .push_bind(until);
        }
        if let Some(scope) = scope {
            push_scope(&mut qb, scope);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.bad_case_from_row(row).await?);
        }
        Ok(out)
    }

    async fn list_evidence(&self, case_id: u64) -> Result<Vec<EvidenceRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.sha256, e.file_name, e.attached_by, e.attached_at, b.content_type, \
             b.size FROM case_evidence e JOIN evidence_blobs b ON b.sha256 = e.sha256 \
             WHERE e.case_id = $1 ORDER BY e.id",
        )
        .bind(case_id as i64)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(evidence_record).collect()
    }

    async fn get_evidence(
        &self,
        case_id: u64,
        sha256: &str,
    ) -> Result<Option<(EvidenceRecord, String, Vec<u8>)>, StoreError> {
        let row = sqlx::query(
            "SELECT e.sha256, e.file_name, e.attached_by, e.attached_at, b.content_type, \
             b.size, b.key_id, b.content FROM case_evidence e \
             JOIN evidence_blobs b ON b.sha256 = e.sha256 WHERE e.case_id = $1 AND e.sha256 = $2",
        )
        .bind(case_id as i64)
        .bind(sha256)
        .fetch_optional(&self.reader)
        .await?;
        row.map(|r| {
            Ok((
                evidence_record(&r)?,
                r.try_get::<String, _>("key_id")?,
                r.try_get::<Vec<u8>, _>("content")?,
            ))
        })
        .transpose()
    }

    async fn get_bad_case(&self, id: u64) -> Result<Option<StoredBadCase>, StoreError> {
        let row = sqlx::query(&format!("{} WHERE id = $1", rows::CASE_COLUMNS))
            .bind(id as i64)
            .fetch_optional(&self.reader)
            .await?;
        match row {
            Some(row) => Ok(Some(self.bad_case_from_row(&row).await?)),
            None => Ok(None),
        }
    }

    async fn bad_case_counts_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<BadCaseCounts>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", dimension_sql(*d)));
        }
        qb.push(
            "COUNT(*) AS n, \
             COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action IN (2, 4))) AS rectified, \
             COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 6)) AS called_back, \
             COUNT(*) FILTER (WHERE b.case_real_name) AS real_name, \
             COUNT(*) FILTER (WHERE b.case_real_name \
                 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                     WHERE x.case_id = b.case_id AND x.action IN (2, 4)) \
                 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                     WHERE x.case_id = b.case_id AND x.action = 6)) AS real_name_done, \
             COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 7)) AS archived, \
             COUNT(*) FILTER (WHERE EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 8)) AS spot_checked \
             FROM (SELECT r.*, c.id AS case_id, c.real_name AS case_real_name FROM ratings r \
                   JOIN bad_rating_cases c ON c.hub_id = r.hub_id) AS b \
             WHERE NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = b.hub_id)",
        );
        push_filter(
            &mut qb,
            &RatingQuery {
                counted_only: false,
                ..query.clone()
            },
        );
        push_group_by(&mut qb, group_by.len(), false);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter()
            .map(|row| rows::bad_case_counts(row, group_by.len()))
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    async fn completed_case_counts(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<CaseCounts>, StoreError> {
        let Some(plan) = counts::plan(query, group_by) else {
            return self.completed_case_counts_by_scan(query, group_by).await;
        };
        // The same keys over `case_counts` (src/store/counts.rs): days of completion; no
        // target kind (events have none).
        let filter = plan.filter.with_time_column();
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", counts_dimension_sql(*d)));
        }
        qb.push(
            "COALESCE(SUM(completed), 0)::bigint AS n, COALESCE(SUM(rated), 0)::bigint AS rated, \
             COALESCE(SUM(active), 0)::bigint AS active",
        );
        plan.push_counts(&mut qb, "case_counts");
        push_filter(&mut qb, &filter);
        push_group_by(&mut qb, group_by.len(), false);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter()
            .map(|row| rows::case_counts(row, group_by.len()))
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    async fn completed_case_counts_by_scan(
        &self,
        query: &RatingQuery,
        group_by: &[StatsDimension],
    ) -> Result<Vec<CaseCounts>, StoreError> {
        let cases_query = RatingQuery {
            levels: Vec::new(),
            max_feed_seq: None,
            ..query.clone()
        };
        let mut qb = QueryBuilder::<Postgres>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            let expr = dimension_sql(*d).replace("rated_at", "occurred_at");
            qb.push(format!("{expr} AS k{i}, "));
        }
        // A case counts as rated by its own item rating, or by its batch's or theme's. A rating an
        // appeal left out of the scores still rated its case: a malicious 差评 must not make
        // the department's case "unrated" (docs/decisions/0006). A default rating replaced
        // by the rater's own (reason 100) does not count; the rating that replaced it does.
        const RATED: &str = "EXISTS (SELECT 1 FROM ratings r WHERE r.org_credit_code = \
             e.org_credit_code AND r.target_kind = 1 AND (r.case_number = e.case_number \
             OR (e.batch_id <> '' AND r.batch_id = e.batch_id) \
             OR (e.theme_id <> '' AND r.theme_id = e.theme_id)) \
             AND NOT EXISTS (SELECT 1 FROM rating_exclusions x WHERE x.hub_id = r.hub_id \
             AND x.reason = 100)";
        qb.push(format!(
            "COUNT(*) AS n, COUNT(*) FILTER (WHERE {RATED})) AS rated, \
             COUNT(*) FILTER (WHERE {RATED} AND NOT r.is_default)) AS active \
             FROM service_case_events e WHERE event = 2"
        ));
        push_filter(&mut qb, &cases_query.with_time_column());
        push_group_by(&mut qb, group_by.len(), false);
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter()
            .map(|row| rows::case_counts(row, group_by.len()))
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }

    async fn open_completed_cases(
        &self,
        after_event_id: u64,
        limit: u32,
    ) -> Result<Vec<OpenCase>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.id, e.source_system, e.occurred_at, e.body, e.pii, e.pii_key_id, \
             EXISTS (SELECT 1 FROM invitations i WHERE i.source_system = e.source_system \
                     AND i.case_number = e.case_number) AS invited \
             FROM service_case_events e \
             WHERE e.event = 2 AND e.id > $1 AND NOT EXISTS (SELECT 1 FROM ratings r \
               WHERE r.org_credit_code = e.org_credit_code AND r.target_kind = 1 \
               AND (r.case_number = e.case_number \
                 OR (e.batch_id <> '' AND r.batch_id <> '' AND r.batch_id = e.batch_id) \
                 OR (e.theme_id <> '' AND r.theme_id <> '' AND r.theme_id = e.theme_id))) \
             ORDER BY e.id LIMIT $2",
        )
        .bind(after_event_id as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(rows::open_case).collect()
    }

    async fn list_invitations(
        &self,
        scope: Option<&ScopeFilter>,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<StoredInvitation>, StoreError> {
        let mut qb = QueryBuilder::<Postgres>::new(
            "SELECT * FROM (SELECT i.id, i.source_system, i.due_at, i.created_at, e.body, e.pii, \
             e.pii_key_id, i.org_credit_code, i.region_code \
             FROM invitations i JOIN service_case_events e ON e.id = i.event_id) AS x WHERE id > ",
        );
        qb.push_bind(after_id as i64);
        if let Some(scope) = scope {
            push_scope(&mut qb, scope);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::invitation).collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut slot = self.health.lock().await;
        let conn = match slot.as_mut() {
            Some(conn) => conn,
            None => slot.insert(PgConnection::connect_with(&self.connect).await?),
        };
        if let Err(e) = sqlx::query("SELECT 1").execute(&mut *conn).await {
            *slot = None;
            return Err(e.into());
        }
        drop(slot);
        // The server answers; while commits fail for a storage reason (its disk is full), a
        // probe write tells whether they work again.
        self.jobs.check_storage().await
    }

    fn feed_head(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    fn writer_metrics(&self) -> Option<writer::WriterMetrics> {
        Some(self.jobs.metrics())
    }

    async fn close(&self) {
        let Some(handle) = self.writer.lock().await.take() else {
            return;
        };
        self.jobs.close(handle).await;
        if let Some(listener) = self.listener.lock().await.take() {
            listener.abort();
        }
        if let Some(conn) = self.health.lock().await.take() {
            let _ = conn.close().await;
        }
        self.reader.close().await;
    }
}

fn evidence_record(r: &PgRow) -> Result<EvidenceRecord, StoreError> {
    Ok(EvidenceRecord {
        sha256: r.try_get("sha256")?,
        file_name: r.try_get("file_name")?,
        content_type: r.try_get("content_type")?,
        size: r.try_get::<i64, _>("size")? as u64,
        attached_by: r.try_get("attached_by")?,
        attached_at_micros: r.try_get("attached_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unverified(url: &str) -> bool {
        unverified_remote(&url.parse().unwrap())
    }

    #[test]
    fn only_an_unverified_database_on_another_machine_is_warned_of() {
        // On this machine: loopback addresses and Unix sockets, whatever the sslmode.
        assert!(!unverified("postgres://hub@127.0.0.1/ratings"));
        assert!(!unverified(
            "postgres://hub@localhost/ratings?sslmode=disable"
        ));
        assert!(!unverified("postgres://hub@[::1]:5433/ratings"));
        assert!(!unverified(
            "postgres://hub@db/ratings?host=/var/run/postgresql"
        ));
        // Elsewhere: verified only with verify-ca or verify-full.
        assert!(unverified("postgres://hub@db.example/ratings"));
        assert!(unverified(
            "postgres://hub@10.0.0.5/ratings?sslmode=require"
        ));
        assert!(unverified(
            "postgres://hub@db.example/ratings?sslmode=prefer"
        ));
        assert!(!unverified(
            "postgres://hub@db.example/ratings?sslmode=verify-ca&sslrootcert=/etc/ca.pem"
        ));
        assert!(!unverified(
            "postgres://hub@db.example/ratings?sslmode=verify-full&sslrootcert=/etc/ca.pem"
        ));
    }
}

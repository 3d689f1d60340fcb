//! The embedded default backend: one SQLite file in WAL mode.
//!
//! Writes go through one writer task that owns the only write connection. It drains every
//! queued insert into one transaction (group commit), assigns feed sequences as it inserts
//! (so they are gapless: a rolled-back transaction gives its numbers back), and answers the
//! callers only after COMMIT returned — with `synchronous=FULL`, after the WAL was fsynced.
//! Reads use a separate pool; WAL lets them run beside the writer.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Row, Sqlite};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::chunk;
use super::counts::{self, CountsPlan};
use super::log::{self, LogAppend};
use super::rows::{self, Columns};
use super::writer::{self, GroupResult, GroupWrite, Job, Queue};
use super::{
    BadCaseCounts, CaseCounts, CaseOutcome, DayOrgDigest, DeadLetter, InsertOutcome, NewCaseEvent,
    NewRating, OpenCase, PiiAccess, RatingQuery, RelayWrite, ScopeFilter, StatsDimension, StatsRow,
    Store, StoreError, StoredBadCase, StoredCaseEvent, StoredInvitation, StoredRating,
    StoredUpdate, UpstreamState,
};
use super::{CaseEntryRecord, EvidenceRecord, PeerHead};
use crate::clock::Clock;
use crate::merkle::{self, Frontier, HashAlg};

mod group;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("src/store/migrations/sqlite");

/// How to open the SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// A file path or a `sqlite:` URL.
    pub path: String,
    /// `FULL` (default) fsyncs the WAL on every commit: an acknowledged rating survives a
    /// power cut. `NORMAL` survives a process crash but not a power cut.
    pub synchronous_full: bool,
    /// Most items one group commit may hold.
    pub max_group_commit: usize,
    /// Queued write requests before callers wait (backpressure).
    pub write_queue: usize,
    /// Connections in the read pool.
    pub read_connections: u32,
    /// Health reports NOT_SERVING while the database's file system has less free space than
    /// this (0: never): a load balancer moves traffic away before the disk is full, and
    /// after commits failed on a full disk, health waits for this much room before it tries
    /// a probe write (a small write can fit where a real group does not).
    pub min_free_bytes: u64,
    /// The rating log's hash (fixed when the log is first written).
    pub log_hash: HashAlg,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            path: "rating-hub.db".into(),
            synchronous_full: true,
            max_group_commit: 2048,
            write_queue: 1024,
            min_free_bytes: 0,
            read_connections: 4,
            log_hash: HashAlg::default(),
        }
    }
}

pub struct SqliteStore {
    jobs: Queue,
    reader: SqlitePool,
    head: watch::Receiver<u64>,
    writer: Mutex<Option<writer::Stopped>>,
    /// The background WAL checkpointer: its stop signal and task.
    checkpointer: Mutex<Option<(watch::Sender<bool>, JoinHandle<()>)>>,
    /// The directory of the database file, and the free space health asks of it.
    dir: std::path::PathBuf,
    min_free_bytes: u64,
    /// The writer connection's journal mode and synchronous level, read back at open.
    durability: String,
    log_hash: HashAlg,
    log_layout: merkle::Layout,
}

impl SqliteStore {
    /// Opens (creating if missing) the database, runs the embedded migrations and starts the
    /// writer.
    /// The writer connection's settings (the benchmark's raw-insert baseline uses them too):
    /// WAL, fsync at every commit unless `synchronous_full` is off, statement journals in
    /// memory rather than in temporary files, a 16 MiB page cache, and an in-line WAL
    /// checkpoint only as a backstop (see [`checkpointer`]).
    pub fn writer_options(
        base: SqliteConnectOptions,
        synchronous_full: bool,
    ) -> SqliteConnectOptions {
        connect_options(base, synchronous_full)
            .pragma("cache_size", "-16384")
            .pragma("wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES.to_string())
    }

    pub async fn open(opts: &SqliteOptions, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let url = if opts.path.starts_with("sqlite:") {
            opts.path.clone()
        } else {
            format!("sqlite://{}", opts.path)
        };
        let connect = connect_options(SqliteConnectOptions::from_str(&url)?, opts.synchronous_full);

        let mut writer_conn = SqliteConnection::connect_with(&Self::writer_options(
            connect.clone(),
            opts.synchronous_full,
        ))
        .await?;
        MIGRATOR.run(&mut writer_conn).await?;
        let durability = writer_durability(&mut writer_conn, opts.synchronous_full).await?;
        let last_seq: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(feed_seq), 0) FROM ratings")
            .fetch_one(&mut writer_conn)
            .await?;
        let last_seq = last_seq as u64;
        let (frontier, log_layout) = open_log(&mut writer_conn, opts.log_hash, last_seq).await?;
        let log_hash = frontier.alg;

        let reader = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .connect_with(connect.clone())
            .await?;

        let (head_tx, head_rx) = watch::channel(last_seq);
        let checkpoint_conn = SqliteConnection::connect_with(&connect).await?;
        let (checkpoint_stop, stop_rx) = watch::channel(false);
        let checkpoints = tokio::spawn(checkpointer(checkpoint_conn, head_rx.clone(), stop_rx));
        let writer = Writer {
            conn: writer_conn,
            next_seq: last_seq + 1,
            clock,
            frontier,
            log_layout,
        };
        let (jobs, handle) = Queue::start(writer, head_tx, opts.max_group_commit, opts.write_queue)
            .map_err(sqlx::Error::Io)?;
        Ok(Self {
            jobs,
            reader,
            head: head_rx,
            writer: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some((checkpoint_stop, checkpoints))),
            dir: connect
                .get_filename()
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."))
                .to_owned(),
            min_free_bytes: opts.min_free_bytes,
            durability,
            log_hash,
            log_layout,
        })
    }
}

/// Reads the writer connection's journal mode and synchronous level back, and refuses a
/// connection that did not take them: an acknowledgement promises a commit that survives a
/// power cut only if the WAL is fsynced at each commit.
async fn writer_durability(
    conn: &mut SqliteConnection,
    synchronous_full: bool,
) -> Result<String, StoreError> {
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await?;
    let name = match level {
        0 => "OFF",
        1 => "NORMAL",
        2 => "FULL",
        3 => "EXTRA",
        _ => "UNKNOWN",
    };
    let wanted = if synchronous_full { 2 } else { 1 };
    if !journal.eq_ignore_ascii_case("wal") || level < wanted {
        return Err(StoreError::Storage(format!(
            "the SQLite writer runs with journal_mode={journal} synchronous={name}, not the \
             configured journal_mode=wal synchronous={}",
            if synchronous_full { "FULL" } else { "NORMAL" }
        )));
    }
    // The writer's own checkpoint, the backstop when the background one cannot finish.
    let autocheckpoint: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
        .fetch_one(&mut *conn)
        .await?;
    Ok(format!(
        "sqlite journal_mode=wal synchronous={name} wal_autocheckpoint={autocheckpoint}"
    ))
}

impl SqliteStore {
    /// `stats` from `rating_counts` (src/store/counts.rs), in one pass: the same groups, in
    /// the same order and with the same bad-rating cases, as the scans; a group whose
    /// ratings were all excluded is left out, as the scan leaves it out (a case's rating
    /// always counts while the case does).
    async fn stats_from_counts(
        &self,
        plan: &CountsPlan,
        group_by: &[StatsDimension],
    ) -> Result<Vec<StatsRow>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(counts::packed_stats_head(group_by.len()));
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", counts_dimension_sql(*d)));
        }
        qb.push(counts::stats_sums(""));
        plan.push_counts(&mut qb, "rating_counts");
        push_filter(&mut qb, &plan.filter);
        // Ordered in the packing aggregate, not here. Without a grouping the one row is
        // there even when nothing counts: `unpack_stats` leaves it out.
        push_group_by(&mut qb, group_by.len(), false);
        if !group_by.is_empty() {
            qb.push(" HAVING SUM(total) > 0");
        }
        qb.push(counts::PACKED_STATS_TAIL);
        let packed: String = qb.build_query_scalar().fetch_one(&self.reader).await?;
        counts::unpack_stats(&packed)
    }
}

impl SqliteStore {
    async fn bad_case_from_row(&self, row: &SqliteRow) -> Result<StoredBadCase, StoreError> {
        let entries = sqlx::query(
            "SELECT action, actor, at, note, evidence_refs, new_deadline, appeal_outcome, \
             contacted_by, by_rater FROM bad_rating_case_entries WHERE case_id = ? ORDER BY id",
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

/// Free space for an unprivileged writer on the file system holding `dir`; `None` when the
/// file system cannot say.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

struct Writer {
    conn: SqliteConnection,
    next_seq: u64,
    clock: Arc<dyn Clock>,
    /// The rating log's right edge as committed (`next_seq - 1` leaves).
    frontier: Frontier,
    log_layout: merkle::Layout,
}

/// Checks the log's hash against the database's, and returns the log's right edge for a
/// feed of `head` ratings and the layout its nodes are stored in, first writing the log of
/// any ratings stored without it (a database from before the log).
async fn open_log(
    conn: &mut SqliteConnection,
    alg: HashAlg,
    head: u64,
) -> Result<(Frontier, merkle::Layout), StoreError> {
    let stored: Option<(String, i64, i64, bool)> = sqlx::query_as(
        "SELECT hash_alg, backfill_to, node_stride, packed_leaves FROM log_meta WHERE id = 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let (alg, backfill_to, layout) = match stored {
        Some((s, to, stride, packed)) => (
            log::check_alg(&s, alg).map_err(StoreError::Config)?,
            to as u64,
            log::check_layout(stride, packed).map_err(StoreError::Corrupt)?,
        ),
        None => {
            let layout = merkle::Layout::PACKED;
            sqlx::query(
                "INSERT INTO log_meta (id, hash_alg, backfill_to, node_stride, packed_leaves) \
                 VALUES (1, ?, ?, ?, ?)",
            )
            .bind(alg.as_str())
            .bind(head as i64)
            .bind(i64::from(layout.stride()))
            .bind(layout.packs_leaves())
            .execute(&mut *conn)
            .await?;
            (alg, head, layout)
        }
    };
    let stray: Option<i64> = sqlx::query_scalar(log::stray_leaves_sql(layout))
        .fetch_one(&mut *conn)
        .await?;
    log::check_leaf_table(layout, stray).map_err(StoreError::Corrupt)?;
    let size = log_size(conn, layout).await?;
    let probes = read_stored(conn, layout, &log::layout_probes(size)).await?;
    log::check_stored_levels(layout, size, &probes).map_err(StoreError::Corrupt)?;
    let target = log::backfill_target(size, head, backfill_to).map_err(StoreError::Corrupt)?;
    let mut frontier = load_frontier(conn, alg, layout, size).await?;
    let from = size;
    while frontier.size < target {
        let rows = sqlx::query(&format!(
            "SELECT {} FROM ratings WHERE feed_seq > ? ORDER BY feed_seq LIMIT 2000",
            log::LEAF_COLUMNS
        ))
        .bind(frontier.size as i64)
        .fetch_all(&mut *conn)
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
        // Each batch commits: a start cut short goes on from here the next time.
        let mut tx = conn.begin().await?;
        insert_nodes(&mut tx, layout, nodes).await?;
        tx.commit().await?;
    }
    if frontier.size > from {
        tracing::warn!(
            ratings = frontier.size - from,
            hash = alg.as_str(),
            "Rating log written for ratings stored before it. If this database had a log before, it was removed: compare the new root with the heads the upper hubs accepted (AdminService.ListPeerHeads there)."
        );
    }
    Ok((frontier, layout))
}

/// The log's right edge for a tree of `size` leaves, from its stored nodes.
async fn load_frontier(
    conn: &mut SqliteConnection,
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
    conn: &mut SqliteConnection,
    alg: HashAlg,
    layout: merkle::Layout,
    want: &[(u32, u64)],
) -> Result<std::collections::HashMap<(u32, u64), merkle::Hash>, StoreError> {
    let stored = read_stored(conn, layout, &layout.sources(want)).await?;
    Ok(layout.combine(alg, want, &stored))
}

/// How many leaves the stored log has.
async fn log_size(conn: &mut SqliteConnection, layout: merkle::Layout) -> Result<u64, StoreError> {
    let size: i64 = sqlx::query_scalar(log::size_sql(layout))
        .fetch_one(&mut *conn)
        .await?;
    Ok(size as u64)
}

/// The stored log nodes of `want`, by (level, index): the leaves from `log_leaves` where
/// `layout` packs them.
async fn read_stored(
    conn: &mut SqliteConnection,
    layout: merkle::Layout,
    want: &[(u32, u64)],
) -> Result<std::collections::HashMap<(u32, u64), merkle::Hash>, StoreError> {
    let mut out = std::collections::HashMap::new();
    let (leaves, want): (Vec<_>, Vec<_>) = want
        .iter()
        .partition(|(l, _)| *l == 0 && layout.packs_leaves());
    for (lo, hi) in log::leaf_row_ranges(leaves.iter().map(|(_, i)| *i)) {
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT first, hashes FROM log_leaves WHERE first BETWEEN ? AND ?")
                .bind(lo as i64)
                .bind(hi as i64)
                .fetch_all(&mut *conn)
                .await?;
        for (first, hashes) in rows {
            log::add_packed_leaves(&mut out, first, &hashes).map_err(StoreError::Corrupt)?;
        }
    }
    for part in want.chunks(400) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT level, idx, hash FROM log_nodes WHERE (level, idx) IN (",
        );
        let mut sep = qb.separated(", ");
        for (l, i) in part {
            sep.push("(")
                .push_bind_unseparated(i64::from(*l))
                .push_unseparated(", ")
                .push_bind_unseparated(*i as i64)
                .push_unseparated(")");
        }
        qb.push(")");
        let rows: Vec<(i64, i64, Vec<u8>)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        for (l, i, h) in rows {
            let h: merkle::Hash = h.try_into().map_err(|_| {
                StoreError::Corrupt(format!("rating log node {l}/{i} is not 32 bytes"))
            })?;
            out.insert((l as u32, i as u64), h);
        }
    }
    Ok(out)
}

async fn insert_nodes(
    conn: &mut SqliteConnection,
    layout: merkle::Layout,
    nodes: Vec<merkle::Node>,
) -> Result<(), sqlx::Error> {
    let (leaves, nodes) = log::split_leaves(layout, nodes);
    for part in leaves.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new("INSERT INTO log_leaves (first, hashes) ");
        qb.push_values(part, |mut b, (first, hashes)| {
            b.push_bind(*first as i64).push_bind(hashes.as_slice());
        });
        qb.build().execute(&mut *conn).await?;
    }
    for part in nodes.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new("INSERT INTO log_nodes (level, idx, hash) ");
        qb.push_values(part, |mut b, (l, i, h)| {
            b.push_bind(i64::from(*l))
                .push_bind(*i as i64)
                .push_bind(h.as_slice());
        });
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

impl GroupWrite for Writer {
    async fn write_group(
        &mut self,
        group: &[Job],
    ) -> Result<(Vec<GroupResult>, Option<u64>), sqlx::Error> {
        let start_seq = self.next_seq;
        let result = self.write_group_tx(group).await;
        if result.is_err() {
            // Roll back (if the failed trip left the transaction open) and give the
            // sequence numbers back.
            group::rollback(&mut self.conn).await;
            self.next_seq = start_seq;
        }
        let moved = (self.next_seq != start_seq).then(|| self.next_seq - 1);
        Ok((result?, moved))
    }

    async fn close(self) {
        let _ = self.conn.close().await;
    }
}

/// The fewest leaves a group hashes while its INSERTs run (about 2 µs each, SM3 over a
/// whole row) rather than before them, for one trip more.
const OVERLAP_HASHING_FROM: usize = 32;

/// Rows per multi-row INSERT of the writer's small tables (audit records, dead letters): at
/// most five binds each, far below SQLite's 32,766.
const ROWS_PER_INSERT: usize = 1000;

/// Inserts `rows` with one multi-row INSERT per [`ROWS_PER_INSERT`] rather than one per row:
/// each statement is a round trip to sqlx's SQLite thread. `head` is
/// `INSERT INTO table (columns) `; `bind` pushes one row's values.
async fn insert_rows<'a, T>(
    conn: &mut SqliteConnection,
    head: &str,
    rows: &'a [T],
    mut bind: impl FnMut(Separated<'_, 'a, Sqlite, &'static str>, &'a T),
) -> Result<(), sqlx::Error> {
    for rows in rows.chunks(ROWS_PER_INSERT) {
        let mut qb = QueryBuilder::<Sqlite>::new(head);
        qb.push_values(rows, &mut bind);
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

impl Writer {
    async fn write_group_tx(&mut self, group: &[Job]) -> Result<Vec<GroupResult>, sqlx::Error> {
        let received_at = self.clock.now_micros();
        let mut tx = group::GroupTx::begin(&mut self.conn);
        // Every rating of the group first, in order, with a few statements per chunk.
        let all = writer::all_ratings(group);
        if self.frontier.size + 1 != self.next_seq {
            return Err(sqlx::Error::Protocol(format!(
                "the rating log has {} leaves and the next feed position is {}",
                self.frontier.size, self.next_seq
            )));
        }
        let mut log = LogAppend::new(self.frontier.alg, self.log_layout);
        let mut outcomes =
            chunk::write_ratings(&mut tx, &all, &mut self.next_seq, received_at, &mut log)
                .await?
                .into_iter();
        // The log's nodes go with the ratings, in the same transaction; the right edge in
        // memory moves only once it committed.
        let mut frontier = None;
        if !log.is_empty() {
            // A group of many ratings: its statements so far run on sqlx's database thread
            // while this one hashes the leaves (polled once to send them, awaited after),
            // the hashing then off the group's critical path. A small group's hashing costs
            // less than the trip this takes (two thread wake-ups).
            if log.rows.len() >= OVERLAP_HASHING_FROM {
                let mut sent = std::pin::pin!(tx.flush());
                let first = std::future::poll_fn(|cx| {
                    std::task::Poll::Ready(std::future::Future::poll(sent.as_mut(), cx))
                })
                .await;
                log.hash_rows();
                match first {
                    std::task::Poll::Ready(r) => r?,
                    std::task::Poll::Pending => sent.await?,
                }
            }
            let mut f = self.frontier.clone();
            tx.insert_nodes(self.log_layout, log.nodes(&mut f));
            frontier = Some(f);
        }
        let mut results = Vec::with_capacity(group.len());
        for job in group {
            match job {
                Job::Ratings { items, .. } => {
                    results.push(GroupResult::Ratings(
                        outcomes.by_ref().take(items.len()).collect(),
                    ));
                }
                Job::Cases { items, .. } => {
                    let conn = tx.conn().await?;
                    let mut out = Vec::with_capacity(items.len());
                    for item in items {
                        out.push(insert_case(conn, item, received_at).await?);
                    }
                    results.push(GroupResult::Cases(out));
                }
                Job::Audit {
                    principal,
                    rpc,
                    hub_ids,
                    ..
                } => {
                    // A Subscribe page of 500 was 500 statements before.
                    insert_rows(
                        tx.conn().await?,
                        "INSERT INTO pii_access (at, principal, rpc, hub_id) ",
                        hub_ids,
                        |mut row, hub_id| {
                            row.push_bind(received_at)
                                .push_bind(principal.as_str())
                                .push_bind(rpc.as_str())
                                .push_bind(hub_id.as_bytes().as_slice());
                        },
                    )
                    .await?;
                    results.push(GroupResult::Audit);
                }
                Job::Relay { write, .. } => {
                    let n = relay_write(tx.conn().await?, write, received_at).await?;
                    results.push(GroupResult::Relay(n));
                }
                Job::Close { .. } => {}
            }
        }
        tx.commit().await?;
        if let Some(f) = frontier {
            self.frontier = f;
        }
        Ok(results)
    }
}

/// Whether a case's history still has `expected` entries (optimistic concurrency for a new
/// step: someone else's step in between means the caller reads the case again).
async fn case_unchanged(
    conn: &mut SqliteConnection,
    case_id: u64,
    expected: u64,
) -> Result<bool, sqlx::Error> {
    let have: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM bad_rating_case_entries WHERE case_id = ?")
            .bind(case_id as i64)
            .fetch_one(&mut *conn)
            .await?;
    Ok(have as u64 == expected)
}

/// Appends a step to a case's history, at `now`.
async fn insert_case_entry(
    conn: &mut SqliteConnection,
    case_id: u64,
    entry: &CaseEntryRecord,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO bad_rating_case_entries (case_id, action, actor, at, note, \
         evidence_refs, new_deadline, appeal_outcome, contacted_by, by_rater) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    conn: &mut SqliteConnection,
    write: &RelayWrite,
    now: i64,
) -> Result<u64, sqlx::Error> {
    match write {
        RelayWrite::Advance {
            upstream,
            cursor,
            dead,
        } => {
            // A write that committed although its caller was told it failed (a lost
            // answer), then sent again, adds nothing: dead letters at or below the stored
            // cursor were already decided by the write that moved it there.
            // (Read only when there are dead letters: an advance alone is the common case.)
            let stored: i64 = if dead.is_empty() {
                0
            } else {
                sqlx::query_scalar(
                    "SELECT COALESCE((SELECT cursor FROM upstream_state WHERE upstream = ?), 0)",
                )
                .bind(upstream)
                .fetch_one(&mut *conn)
                .await?
            };
            let dead: Vec<&crate::store::NewDeadLetter> =
                dead.iter().filter(|d| d.feed_seq as i64 > stored).collect();
            insert_rows(
                conn,
                "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at) ",
                &dead,
                |mut row, d| {
                    row.push_bind(upstream.as_str())
                        .push_bind(d.feed_seq as i64)
                        .push_bind(d.error.as_str())
                        .push_bind(i64::from(d.attempts))
                        .push_bind(now);
                },
            )
            .await?;
            // The cursor only moves forward, whatever order writes arrive in.
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at) \
                 VALUES (?, ?, 0, ?) ON CONFLICT (upstream) DO UPDATE SET \
                 cursor = MAX(cursor, excluded.cursor), updated_at = excluded.updated_at",
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
            let stored: i64 = if dead.is_empty() {
                0
            } else {
                sqlx::query_scalar(
                    "SELECT COALESCE((SELECT update_cursor FROM upstream_state WHERE upstream = ?), 0)",
                )
                .bind(upstream)
                .fetch_one(&mut *conn)
                .await?
            };
            let dead: Vec<&(u64, String)> = dead.iter().filter(|d| d.0 as i64 > stored).collect();
            insert_rows(
                conn,
                "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at, \
                 update_seq) ",
                &dead,
                |mut row, d| {
                    row.push_bind(upstream.as_str())
                        .push_bind(0i64)
                        .push_bind(d.1.as_str())
                        .push_bind(1i64)
                        .push_bind(now)
                        .push_bind(d.0 as i64);
                },
            )
            .await?;
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at, update_cursor) \
                 VALUES (?, 0, 0, ?, ?) ON CONFLICT (upstream) DO UPDATE SET \
                 update_cursor = MAX(update_cursor, excluded.update_cursor), \
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
            // As for ratings: a resent write adds no dead letter at or below the stored
            // cursor.
            let stored: i64 = if dead.is_empty() {
                0
            } else {
                sqlx::query_scalar(
                    "SELECT COALESCE((SELECT case_cursor FROM upstream_state WHERE upstream = ?), 0)",
                )
                .bind(upstream)
                .fetch_one(&mut *conn)
                .await?
            };
            let dead: Vec<&(u64, String)> = dead.iter().filter(|d| d.0 as i64 > stored).collect();
            insert_rows(
                conn,
                "INSERT INTO dead_letters (upstream, feed_seq, error, attempts, created_at, \
                 case_event_id) ",
                &dead,
                |mut row, d| {
                    row.push_bind(upstream.as_str())
                        .push_bind(0i64)
                        .push_bind(d.1.as_str())
                        .push_bind(1i64)
                        .push_bind(now)
                        .push_bind(d.0 as i64);
                },
            )
            .await?;
            let r = sqlx::query(
                "INSERT INTO upstream_state (upstream, cursor, paused, updated_at, case_cursor) \
                 VALUES (?, 0, 0, ?, ?) ON CONFLICT (upstream) DO UPDATE SET \
                 case_cursor = MAX(case_cursor, excluded.case_cursor), \
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
            for id in delivered {
                n += sqlx::query(
                    "UPDATE dead_letters SET resolved_at = ?, replay_requested = 0, \
                     attempts = attempts + 1 WHERE id = ? AND upstream = ?",
                )
                .bind(now)
                .bind(*id as i64)
                .bind(upstream)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                // A rating delivered at last: its updates refused meanwhile go again.
                sqlx::query(
                    "UPDATE dead_letters SET replay_requested = 1 WHERE upstream = ? \
                     AND resolved_at IS NULL AND update_seq IN (SELECT x.seq \
                     FROM dead_letters l JOIN ratings r ON r.feed_seq = l.feed_seq \
                     JOIN rating_exclusions x ON x.hub_id = r.hub_id \
                     WHERE l.id = ? AND l.feed_seq > 0)",
                )
                .bind(upstream)
                .bind(*id as i64)
                .execute(&mut *conn)
                .await?;
            }
            for (id, error) in failed {
                n += sqlx::query(
                    "UPDATE dead_letters SET error = ?, replay_requested = 0, \
                     attempts = attempts + 1 WHERE id = ? AND upstream = ?",
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
                 VALUES (?, 0, ?, ?) ON CONFLICT (upstream) DO UPDATE SET \
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
                     VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
            insert_rows(
                conn,
                "INSERT INTO relay_attempts (upstream, at, first_seq, last_seq, records, outcome, \
                 detail, duration_ms, replay_id) ",
                &attempts.iter().collect::<Vec<_>>(),
                |mut row, a| {
                    row.push_bind(a.upstream.as_str())
                        .push_bind(a.at_micros)
                        .push_bind(a.first_seq as i64)
                        .push_bind(a.last_seq as i64)
                        .push_bind(i64::from(a.records))
                        .push_bind(a.outcome.as_str())
                        .push_bind(a.detail.as_str())
                        .push_bind(i64::from(a.duration_ms))
                        .push_bind(a.replay_id.map(|v| v as i64));
                },
            )
            .await?;
            Ok(attempts.len() as u64)
        }
        RelayWrite::PruneAttempts { before_micros } => {
            let r = sqlx::query(
                "DELETE FROM relay_attempts WHERE id IN \
                 (SELECT id FROM relay_attempts WHERE at < ?1 LIMIT ?2)",
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
                 requested_at, reason) VALUES (?1, ?2, ?3, ?2, ?4, ?5, ?6) RETURNING id",
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
                "UPDATE relay_replays SET done_at = ?1, reason = reason || ' (cancelled)' \
                 WHERE id = ?2 AND upstream = ?3 AND done_at IS NULL",
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
                "UPDATE relay_replays SET next_seq = ?1, \
                 done_at = CASE WHEN ?1 > to_seq THEN ?2 ELSE done_at END \
                 WHERE id = ?3 AND done_at IS NULL AND next_seq < ?1",
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
                 VALUES (?, ?, 0, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                 created_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
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
                 attached_at) VALUES (?, ?, ?, ?, ?)",
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
             region_code, due_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
                    "UPDATE peer_heads SET size = ?1, root = ?2, head_time = ?3 \
                     WHERE id = ?4 AND outcome = 'accepted' AND size = ?5 AND root = ?6 \
                     AND id = (SELECT MAX(id) FROM peer_heads WHERE principal = ?7 \
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
                 first_bad, detail) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8 \
                 WHERE NOT ?12 OR (NOT EXISTS (SELECT 1 FROM peer_heads WHERE principal = ?1 \
                 AND outcome IN ('accepted', 'rebaselined') AND id > ?9) \
                 AND (?9 = 0 OR EXISTS (SELECT 1 FROM peer_heads WHERE id = ?9 \
                 AND size = ?10 AND root = ?11)))",
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
            // A real row write, and a sync at commit.
            sqlx::query(
                "INSERT INTO storage_probe (id, at, pad) VALUES (1, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET at = excluded.at, pad = excluded.pad",
            )
            .bind(now)
            .bind(super::probe_pad())
            .execute(&mut *conn)
            .await?;
            Ok(0)
        }
        RelayWrite::RequestReplay { upstream, ids } => {
            let open = "UPDATE dead_letters SET replay_requested = 1 \
                        WHERE upstream = ? AND resolved_at IS NULL";
            match ids {
                None => Ok(sqlx::query(open)
                    .bind(upstream)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()),
                Some(ids) => {
                    let mut n = 0;
                    for id in ids {
                        n += sqlx::query(&format!("{open} AND id = ?"))
                            .bind(upstream)
                            .bind(*id as i64)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected();
                    }
                    Ok(n)
                }
            }
        }
    }
}

const DEAD_LETTER_COLUMNS: &str = "SELECT d.id, d.upstream, d.feed_seq, \
     COALESCE(r.hub_id, (SELECT x.hub_id FROM rating_exclusions x WHERE x.seq = d.update_seq)) \
     AS hub_id, d.error, \
     d.attempts, d.created_at, d.replay_requested, d.resolved_at, d.case_event_id, \
     d.update_seq FROM dead_letters d LEFT JOIN ratings r ON r.feed_seq = d.feed_seq \
     AND d.case_event_id IS NULL AND d.update_seq IS NULL";

const UPDATE_COLUMNS: &str = "SELECT x.seq AS seq, x.reason, x.at, x.decided_by, r.feed_seq, \
     r.hub_id, r.source_system, r.received_at, r.body, r.pii, r.pii_key_id, r.quality_flags, \
     EXISTS (SELECT 1 FROM dead_letters d WHERE d.upstream = ? AND d.feed_seq = r.feed_seq \
       AND d.resolved_at IS NULL AND d.case_event_id IS NULL AND d.update_seq IS NULL) \
     AS rating_dead \
     FROM rating_exclusions x JOIN ratings r ON r.hub_id = x.hub_id";

const CASE_EVENT_COLUMNS: &str =
    "SELECT id, source_system, body, pii, pii_key_id FROM service_case_events";

/// Marks for replay the open letters of ratings of these case numbers: refused while their
/// 办件 record had not gone up, they go again now it has.
async fn requeue_case_ratings(
    conn: &mut SqliteConnection,
    upstream: &str,
    case_numbers: &[String],
) -> Result<(), sqlx::Error> {
    for chunk in case_numbers.chunks(500) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "UPDATE dead_letters SET replay_requested = 1 WHERE upstream = ",
        );
        qb.push_bind(upstream).push(
            " AND resolved_at IS NULL AND case_event_id IS NULL AND update_seq IS NULL \
             AND feed_seq IN (SELECT feed_seq FROM ratings WHERE case_number IN (",
        );
        let mut list = qb.separated(", ");
        for c in chunk {
            list.push_bind(c.as_str());
        }
        qb.push("))");
        qb.build().execute(&mut *conn).await?;
    }
    Ok(())
}

async fn insert_case(
    conn: &mut SqliteConnection,
    item: &NewCaseEvent,
    received_at: i64,
) -> Result<CaseOutcome, sqlx::Error> {
    let c = &item.case;
    let inserted = sqlx::query(
        "INSERT INTO service_case_events (source_system, case_number, event, occurred_at, \
         item_code, region_code, org_credit_code, staff_id, channel, batch_id, theme_id, \
         content_hash, received_at, body, pii, pii_key_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
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
         WHERE source_system = ? AND case_number = ? AND event = ?",
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

/// Feed positions `list_ratings` reads in feed order, without the region index, for a broad
/// region prefix before it turns to the index (src/store/sqlite.rs `list_ratings`).
const LIST_WINDOW: u64 = 5_000;

const RATING_COLUMNS: &str = "SELECT feed_seq, hub_id, source_system, received_at, body, pii, pii_key_id, quality_flags \
     FROM ratings";

/// `AND (org in scope OR region under a scope prefix)`, on the table's `org_credit_code` and
/// `region_code` columns. Region codes are digits; ':' sorts right after '9', so
/// `[p, p + ":")` is the prefix range.
fn push_scope(qb: &mut QueryBuilder<'_, Sqlite>, scope: &ScopeFilter) {
    qb.push(" AND (0");
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

fn push_filter(qb: &mut QueryBuilder<'_, Sqlite>, q: &RatingQuery) {
    if q.counted_only && !q.time_is_occurred_at {
        qb.push(" AND hub_id NOT IN (SELECT hub_id FROM rating_exclusions)");
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
        // Region codes are digits; ':' sorts right after '9', so this is the prefix range.
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
            qb.push(format!(" AND {col} IN ("));
            let mut sep = qb.separated(", ");
            for v in values {
                sep.push_bind(*v);
            }
            qb.push(")");
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

/// `GROUP BY k0, k1, …` (and the same ORDER BY) over the first `n` selected columns.
fn push_group_by(qb: &mut QueryBuilder<'_, Sqlite>, n: usize, ordered: bool) {
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
        StatsDimension::Day => "strftime('%Y-%m-%d', day * 86400, 'unixepoch')",
        StatsDimension::Month => "strftime('%Y-%m', day * 86400, 'unixepoch')",
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
        StatsDimension::Day => "strftime('%Y-%m-%d', rated_at / 1000000 + 28800, 'unixepoch')",
        StatsDimension::Month => "strftime('%Y-%m', rated_at / 1000000 + 28800, 'unixepoch')",
    }
}

#[async_trait]
impl Store for SqliteStore {
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
        let n: i64 = sqlx::query_scalar(
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(n.max(0) as u64)
    }

    async fn insert_ratings(
        &self,
        items: Vec<NewRating>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        self.jobs.ratings(items).await
    }

    async fn insert_cases(&self, items: Vec<NewCaseEvent>) -> Result<Vec<CaseOutcome>, StoreError> {
        self.jobs.cases(items).await
    }

    async fn get_rating(&self, hub_id: Uuid) -> Result<Option<StoredRating>, StoreError> {
        let row = sqlx::query(&format!("{RATING_COLUMNS} WHERE hub_id = ?"))
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
        // A region prefix shorter than a code (a province, a city) with no org or case to
        // narrow it: its index gives the matches by region, not in feed order, so SQLite would
        // read and sort every match for a page. Such a prefix usually matches much of the
        // feed: first read the next LIST_WINDOW positions in feed order without the index,
        // and only where that does not fill the page, the rest through the index. (Not with
        // a filter that makes matches sparse, such as levels for 差评 only: there the window
        // would seldom fill a page, and only add its reads.)
        let broad = query.region_prefix.as_ref().is_some_and(|p| p.len() < 6)
            && query.org_credit_code.is_none()
            && query.case_number.is_none()
            && query.item_code.is_none()
            && query.staff_id.is_none()
            && query.levels.is_empty();
        let mut out = Vec::new();
        let mut after = after_seq;
        if broad {
            // Read before the window: every position up to it committed before the window's
            // read began, so the window holds all of them up to `until` when it is below.
            let head = (*self.head.borrow()).min(query.max_feed_seq.unwrap_or(u64::MAX));
            let until = after_seq.saturating_add(LIST_WINDOW);
            let mut qb = QueryBuilder::<Sqlite>::new(
                RATING_COLUMNS.replace("FROM ratings", "FROM ratings NOT INDEXED"),
            );
            qb.push(" WHERE feed_seq > ")
                .push_bind(after_seq as i64)
                .push(" AND feed_seq <= ")
                .push_bind(until.min(i64::MAX as u64) as i64);
            push_filter(&mut qb, query);
            qb.push(" ORDER BY feed_seq LIMIT ")
                .push_bind(i64::from(limit));
            out = qb.build().fetch_all(&self.reader).await?;
            if out.len() >= limit as usize || until >= head {
                return out.iter().map(rows::stored_rating).collect();
            }
            after = until;
        }
        let mut qb = QueryBuilder::<Sqlite>::new(RATING_COLUMNS);
        qb.push(" WHERE feed_seq > ").push_bind(after as i64);
        push_filter(&mut qb, query);
        qb.push(" ORDER BY feed_seq LIMIT ")
            .push_bind(i64::from(limit) - out.len() as i64);
        out.extend(qb.build().fetch_all(&self.reader).await?);
        out.iter().map(rows::stored_rating).collect()
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
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", dimension_sql(*d)));
        }
        qb.push(
            "COUNT(*) AS total, \
             COALESCE(SUM(level = 1), 0) AS l1, COALESCE(SUM(level = 2), 0) AS l2, \
             COALESCE(SUM(level = 3), 0) AS l3, COALESCE(SUM(level = 4), 0) AS l4, \
             COALESCE(SUM(level = 5), 0) AS l5, COALESCE(SUM(is_default), 0) AS defaults, \
             COALESCE(SUM(quality_flags <> 0), 0) AS flagged \
             FROM ratings WHERE hub_id NOT IN (SELECT hub_id FROM rating_exclusions)",
        );
        push_filter(&mut qb, query);
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
        let mut qb = QueryBuilder::<Sqlite>::new(
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
        let mut qb = QueryBuilder::<Sqlite>::new(format!(
            "SELECT {} AS day, org_credit_code, hub_id FROM ratings WHERE 1 = 1",
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
            sqlx::query_scalar("SELECT received_at FROM ratings WHERE feed_seq = ?")
                .bind(feed_seq as i64)
                .fetch_optional(&self.reader)
                .await?,
        )
    }

    async fn upstream_state(&self, upstream: &str) -> Result<UpstreamState, StoreError> {
        let row = sqlx::query(
            "SELECT cursor, paused, case_cursor, update_cursor FROM upstream_state \
             WHERE upstream = ?",
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

    async fn list_dead_letters(
        &self,
        upstream: &str,
        include_resolved: bool,
        after_id: u64,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut qb = QueryBuilder::<Sqlite>::new(DEAD_LETTER_COLUMNS);
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
             replay_id FROM relay_attempts WHERE upstream = ? AND id < ? \
             ORDER BY id DESC LIMIT ?",
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
            (true, true) => "WHERE principal = ?1 AND outcome NOT IN ('accepted', 'rebaselined')",
            (true, false) => "WHERE principal = ?1",
            (false, true) => "WHERE outcome NOT IN ('accepted', 'rebaselined') AND ?1 = ?1",
            (false, false) => "WHERE ?1 = ?1",
        };
        let rows: Vec<super::PeerHeadRow> = sqlx::query_as(&format!(
            "SELECT id, principal, size, root, head_time, received_at, outcome, first_bad, \
                 detail FROM peer_heads {filter} ORDER BY id DESC LIMIT ?2"
        ))
        .bind(principal.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(PeerHead::from).collect())
    }

    async fn last_accepted_head(
        &self,
        principal: &str,
    ) -> Result<Option<(u64, Vec<u8>, i64, u64)>, StoreError> {
        let row: Option<(i64, Vec<u8>, i64, i64)> = sqlx::query_as(
            "SELECT size, root, head_time, id FROM peer_heads WHERE principal = ?1 \
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
             done_at FROM relay_replays WHERE upstream = ? AND (? = 0 OR done_at IS NULL) \
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
            "SELECT COUNT(*) FROM dead_letters WHERE upstream = ? AND resolved_at IS NULL",
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
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = ? AND d.replay_requested = 1 \
             AND d.resolved_at IS NULL AND d.case_event_id IS NULL AND d.update_seq IS NULL \
             ORDER BY d.id LIMIT ?"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let rating = sqlx::query(&format!("{RATING_COLUMNS} WHERE feed_seq = ?"))
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
            "{CASE_EVENT_COLUMNS} WHERE id > ? ORDER BY id LIMIT ?"
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
            "{UPDATE_COLUMNS} WHERE x.seq > ? ORDER BY x.seq LIMIT ?"
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
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = ? AND d.replay_requested = 1 \
             AND d.resolved_at IS NULL AND d.update_seq IS NOT NULL ORDER BY d.id LIMIT ?"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let update = sqlx::query(&format!("{UPDATE_COLUMNS} WHERE x.seq = ?"))
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
            "{DEAD_LETTER_COLUMNS} WHERE d.upstream = ? AND d.replay_requested = 1 \
             AND d.resolved_at IS NULL AND d.case_event_id IS NOT NULL ORDER BY d.id LIMIT ?"
        ))
        .bind(upstream)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let dead = rows::dead_letter(row)?;
            let event = sqlx::query(&format!("{CASE_EVENT_COLUMNS} WHERE id = ?"))
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
        let mut qb = QueryBuilder::<Sqlite>::new(format!("{} WHERE id > ", rows::CASE_COLUMNS));
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
             WHERE e.case_id = ? ORDER BY e.id",
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
             JOIN evidence_blobs b ON b.sha256 = e.sha256 WHERE e.case_id = ? AND e.sha256 = ?",
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
        let row = sqlx::query(&format!("{} WHERE id = ?", rows::CASE_COLUMNS))
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
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", dimension_sql(*d)));
        }
        qb.push(
            "COUNT(*) AS n, \
             COALESCE(SUM(EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action IN (2, 4))), 0) AS rectified, \
             COALESCE(SUM(EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 6)), 0) AS called_back, \
             COALESCE(SUM(b.case_real_name <> 0), 0) AS real_name, \
             COALESCE(SUM(b.case_real_name <> 0 \
                 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                     WHERE x.case_id = b.case_id AND x.action IN (2, 4)) \
                 AND EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                     WHERE x.case_id = b.case_id AND x.action = 6)), 0) AS real_name_done, \
             COALESCE(SUM(EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 7)), 0) AS archived, \
             COALESCE(SUM(EXISTS (SELECT 1 FROM bad_rating_case_entries x \
                 WHERE x.case_id = b.case_id AND x.action = 8)), 0) AS spot_checked \
             FROM (SELECT r.*, c.id AS case_id, c.real_name AS case_real_name FROM ratings r \
                   JOIN bad_rating_cases c ON c.hub_id = r.hub_id) AS b \
             WHERE hub_id NOT IN (SELECT hub_id FROM rating_exclusions)",
        );
        push_filter(&mut qb, query);
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
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            qb.push(format!("{} AS k{i}, ", counts_dimension_sql(*d)));
        }
        qb.push(
            "COALESCE(SUM(completed), 0) AS n, COALESCE(SUM(rated), 0) AS rated, \
             COALESCE(SUM(active), 0) AS active",
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
        // The same dimensions over 办结 events: periods by completion time.
        let cases_query = RatingQuery {
            levels: Vec::new(),
            max_feed_seq: None,
            ..query.clone()
        };
        let mut qb = QueryBuilder::<Sqlite>::new("SELECT ");
        for (i, d) in group_by.iter().enumerate() {
            let expr = dimension_sql(*d).replace("rated_at", "occurred_at");
            qb.push(format!("{expr} AS k{i}, "));
        }
        // A case counts as rated by its own item rating, or by its batch's or theme's
        // (批量业务 and “一件事”: one rating applies to every case linked to it). A rating an
        // appeal left out of the scores still rated its case: a malicious 差评 must not make
        // the department's case "unrated" (docs/decisions/0006). A default rating replaced
        // by the rater's own (reason 100) does not count; the rating that replaced it does.
        const RATED: &str = "EXISTS (SELECT 1 FROM ratings r WHERE r.org_credit_code = \
             e.org_credit_code AND r.target_kind = 1 AND (r.case_number = e.case_number \
             OR (e.batch_id <> '' AND r.batch_id = e.batch_id) \
             OR (e.theme_id <> '' AND r.theme_id = e.theme_id)) \
             AND r.hub_id NOT IN (SELECT hub_id FROM rating_exclusions WHERE reason = 100)";
        qb.push(format!(
            "COUNT(*) AS n, COALESCE(SUM({RATED})), 0) AS rated, \
             COALESCE(SUM({RATED} AND r.is_default = 0)), 0) AS active \
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
             WHERE e.event = 2 AND e.id > ? AND NOT EXISTS (SELECT 1 FROM ratings r \
               WHERE r.org_credit_code = e.org_credit_code AND r.target_kind = 1 \
               AND (r.case_number = e.case_number \
                 OR (e.batch_id <> '' AND r.batch_id <> '' AND r.batch_id = e.batch_id) \
                 OR (e.theme_id <> '' AND r.theme_id <> '' AND r.theme_id = e.theme_id))) \
             ORDER BY e.id LIMIT ?",
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
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT * FROM (SELECT i.id, i.source_system, i.due_at, i.created_at, e.body, e.pii, \
             e.pii_key_id, i.org_credit_code, i.region_code \
             FROM invitations i JOIN service_case_events e ON e.id = i.event_id) WHERE id > ",
        );
        qb.push_bind(after_id as i64);
        if let Some(scope) = scope {
            push_scope(&mut qb, scope);
        }
        qb.push(" ORDER BY id LIMIT ").push_bind(i64::from(limit));
        let rows = qb.build().fetch_all(&self.reader).await?;
        rows.iter().map(rows::invitation).collect()
    }

    /// A file this process opened: there is no server to lose. (A query here could only wait
    /// behind busy readers and make a working hub look down.) But its disk can fill or fail:
    /// health is down while the file system has less than `min_free_bytes` free, and while
    /// commits fail for a storage reason, until a probe write commits.
    async fn ping(&self) -> Result<(), StoreError> {
        if self.min_free_bytes > 0
            && let Some(free) = free_bytes(&self.dir)
            && free < self.min_free_bytes
        {
            return Err(StoreError::Storage(format!(
                "disk nearly full: {free} bytes free where the database is, below \
                 storage.min_free_mb"
            )));
        }
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
        if let Some((stop, task)) = self.checkpointer.lock().await.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
        self.reader.close().await;
    }
}

/// WAL size (pages) at which the writer checkpoints in its own commit; below it, the
/// background checkpointer does the work.
const BACKSTOP_CHECKPOINT_PAGES: u32 = 4000;

/// Copies committed WAL pages back into the database file on a connection of its own, at
/// most every 100 ms while commits arrive, so the writer's commits do not pay for it.
/// PASSIVE: it never blocks the writer or readers. Under sustained writes it may not finish
/// (frames keep arriving), and the WAL is only restarted after a complete checkpoint; the
/// writer's own auto-checkpoint at [`BACKSTOP_CHECKPOINT_PAGES`] bounds the WAL then.
async fn checkpointer(
    mut conn: SqliteConnection,
    mut head: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = head.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            tracing::warn!(error = %e, "Background WAL checkpoint failed; the writer checkpoints itself.");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = stop.changed() => break,
        }
    }
    let _ = conn.close().await;
}

fn connect_options(base: SqliteConnectOptions, synchronous_full: bool) -> SqliteConnectOptions {
    base.create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(if synchronous_full {
            SqliteSynchronous::Full
        } else {
            SqliteSynchronous::Normal
        })
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // A multi-row INSERT keeps a statement journal (to undo a half-done statement);
        // in memory it costs no temporary file writes.
        .pragma("temp_store", "memory")
}

fn evidence_record(r: &SqliteRow) -> Result<EvidenceRecord, StoreError> {
    Ok(EvidenceRecord {
        sha256: r.try_get("sha256")?,
        file_name: r.try_get("file_name")?,
        content_type: r.try_get("content_type")?,
        size: r.try_get::<i64, _>("size")? as u64,
        attached_by: r.try_get("attached_by")?,
        attached_at_micros: r.try_get("attached_at")?,
    })
}

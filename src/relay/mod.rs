//! Upstream delivery: every committed rating reaches every configured upstream.
//!
//! One worker per upstream, each with its own durable cursor over the feed, woken by commits
//! (no poll timer). A worker keeps up to `in_flight` batches outstanding, each sent through its
//! rate limits and retried on its schedule with jitter; ratings the upstream rejects for good
//! are dead-lettered; the cursor advances batch by batch as the earliest outstanding batch
//! completes — so delivery is at-least-once, and with the hub id as the idempotency key an
//! idempotent upstream sees each rating exactly once. Workers share
//! nothing but the store: a slow or dead upstream never delays ingest or another upstream.

pub mod config;
pub mod grpc;
pub mod http;
pub mod sink;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

pub use config::{SinkKind, UpstreamConfig};
use sink::{CaseRecord, Delivery, SendError, Sink, UpdateRecord};

use crate::clock::Clock;
use crate::pb::v1 as pb;
use crate::privacy::PiiKeys;
use crate::store::{
    AttemptRecord, NewDeadLetter, RangeReplay, RatingQuery, RelayWrite, Store, StoreError,
    StoredCaseEvent, StoredRating, StoredUpdate, case_aad, rating_aad,
};

/// Counters and the last error of one upstream, since the hub started.
#[derive(Debug, Clone, Default)]
struct Counters {
    attempts: u64,
    failures: u64,
    delivered: u64,
    last_error: Option<(String, i64)>,
    /// While a cursor advance cannot be stored (delivery waits for it).
    cursor_error: Option<(String, i64)>,
}

/// What an operator sees of one upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamStatus {
    pub name: String,
    pub kind: SinkKind,
    pub endpoint: String,
    pub cursor: u64,
    pub head: u64,
    pub lag_records: u64,
    pub lag_seconds: f64,
    pub open_dead_letters: u64,
    pub last_error: Option<(String, i64)>,
    pub attempts: u64,
    pub failures: u64,
    pub delivered: u64,
    pub paused: bool,
    /// The instance delivering (this one on a store of its own); `None` while no lease is held.
    pub delivering_instance: Option<String>,
    /// Whether this instance delivers.
    pub delivering_here: bool,
    /// Whether the stored state (cursor, lag, dead letters) could be read; when not, the
    /// figures are this instance's own and `last_error` says why.
    pub stored_state_read: bool,
}

struct Worker {
    name: String,
    cfg: UpstreamConfig,
    sink: Box<dyn Sink>,
    store: Arc<dyn Store>,
    keys: Arc<PiiKeys>,
    clock: Arc<dyn Clock>,
    cursor: AtomicU64,
    /// The 办件 events' cursor (for upstreams that take them).
    case_cursor: AtomicU64,
    /// The rating updates' cursor (for upstreams that take them).
    update_cursor: AtomicU64,
    /// The rating cursor as stored (with its batches' dead letters): `cursor` runs ahead of
    /// it by the writes queued to `write_cursors`. Updates wait for it (a rating must be
    /// settled, delivered or dead-lettered, before its update), and so does the re-queue of
    /// ratings a delivered case frees.
    stored_cursor: watch::Sender<u64>,
    paused: AtomicBool,
    /// Bumped on pause, resume and replay requests: wakes the worker and interrupts retries.
    control: watch::Sender<u64>,
    counters: Mutex<Counters>,
    records: DefaultDirectRateLimiter,
    requests: DefaultDirectRateLimiter,
    jitter_state: AtomicU64,
    /// Cursor advances (with their dead letters) on their way to the store, in order.
    cursor_writes: tokio::sync::mpsc::Sender<RelayWrite>,
    /// Until when this instance may deliver to the upstream: its lease's local deadline,
    /// two thirds of the lease time after the renewal that granted it began (always, on a
    /// store of its own); `None` while another instance holds the lease. Checked before
    /// every send, so an instance whose renewals stall (a frozen process, a hung database
    /// call) stops delivering before its lease can run out and another take it.
    lease: watch::Sender<Option<Instant>>,
    /// Bumped by every pause or resume through this instance (under `pause_lock`, with the
    /// flag): a lease renewal that read the stored pause state before such a change must
    /// not undo it.
    pause_changes: AtomicU64,
    pause_lock: Mutex<()>,
    /// Each send, on its way to the attempt log (written in batches, off the send's path).
    attempt_log: tokio::sync::mpsc::Sender<AttemptRecord>,
    metrics: Arc<crate::metrics::Metrics>,
    /// A range replay is open (set on a request, at start and on each lease renewal that
    /// finds one; cleared when none is left): live delivery then gives it turns.
    /// 0 while none is known; bumped by each request, so a step that found none clears only
    /// the generation it looked at (a request committed meanwhile is not forgotten).
    range_open: AtomicU64,
}

/// Who this instance is in relay leases, and how long a lease lasts.
#[derive(Debug, Clone)]
pub struct Lease {
    pub holder: String,
    pub ttl: Duration,
}

/// Why a delivery attempt stopped without an answer.
enum Interrupted {
    Stopping,
    Paused,
    LeaseLost,
    /// The range replay being sent was cancelled.
    Cancelled,
}

/// Live batches a pipeline run completes at most while a range replay waits: live delivery
/// and the replay take turns, and neither waits for the other to finish.
const LIVE_BATCHES_PER_TURN: usize = 8;

fn quota(per_sec: u32, burst: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(per_sec.max(1)).expect("max(1)"))
        .allow_burst(NonZeroU32::new(burst.max(1)).expect("max(1)"))
}

/// How many answers in a row a batch may get that cannot be read (a per-record result list
/// that does not match the batch) before its ratings are dead-lettered.
const MALFORMED_TRIES: usize = 3;

/// A lease on a store of its own (no other instance can take it).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Whether a lease held until `lease` (if held) is still in force.
fn in_force(lease: Option<Instant>) -> bool {
    lease.is_some_and(|until| Instant::now() < until)
}

impl Worker {
    /// Whether this instance may deliver now: it holds the lease, and its local deadline has
    /// not passed.
    fn holds_lease(&self) -> bool {
        in_force(*self.lease.borrow())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The retry wait after `attempt` failures: the schedule's entry, ± jitter.
    fn backoff(&self, attempt: usize) -> Duration {
        let schedule = &self.cfg.retry_schedule_ms;
        let base = schedule[attempt.min(schedule.len() - 1)];
        jittered(base, self.cfg.retry_jitter, &self.jitter_state)
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut head = self.store.feed_head();
        let mut control = self.control.subscribe();
        let mut lease = self.lease.subscribe();
        tracing::info!(upstream = %self.name, kind = self.cfg.kind.as_str(), cursor = self.cursor.load(Ordering::Relaxed), "Relay started.");
        loop {
            if *stop.borrow() {
                break;
            }
            if !in_force(*lease.borrow_and_update()) {
                // Another instance delivers to this upstream, or this one's lease lapsed
                // before its renewal came back: wait for a renewal here.
                tokio::select! {
                    _ = lease.changed() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            control.borrow_and_update();
            let idle = if self.paused.load(Ordering::Acquire) {
                true
            } else {
                match self.step(&mut head, &stop).await {
                    Ok(did_work) => !did_work,
                    Err(StoreError::ShuttingDown) => break,
                    Err(e) => {
                        tracing::error!(upstream = %self.name, error = %e, "Relay cannot read or write the store.");
                        self.lock().last_error = Some((e.to_string(), self.clock.now_micros()));
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = stop.changed() => {}
                        }
                        false
                    }
                }
            };
            if idle {
                // 办件 events wake no one (they move no feed head): an upstream that takes
                // them looks for new ones every CASE_POLL, and before every ratings batch.
                let poll = if self.sink.relays_cases() || self.sink.relays_updates() {
                    CASE_POLL
                } else {
                    FOREVER
                };
                tokio::select! {
                    _ = head.changed() => {}
                    _ = control.changed() => {}
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        tracing::info!(upstream = %self.name, cursor = self.cursor.load(Ordering::Relaxed), "Relay stopped.");
    }

    /// Takes this upstream's lease when it is free and renews it every third of its life;
    /// follows the stored pause state meanwhile. Gives it up when the hub stops.
    async fn keep_lease(self: Arc<Self>, lease: Lease, mut stop: watch::Receiver<bool>) {
        while !*stop.borrow() {
            let pause_changes = self.pause_changes.load(Ordering::Acquire);
            // The database grants the lease for `ttl` from a moment after this one.
            let began = Instant::now();
            match self
                .store
                .hold_lease(&self.name, &lease.holder, lease.ttl)
                .await
            {
                Ok(Some(state)) => {
                    if self.lease.borrow().is_none() {
                        self.cursor.fetch_max(state.cursor, Ordering::AcqRel);
                        self.case_cursor
                            .fetch_max(state.case_cursor, Ordering::AcqRel);
                        self.update_cursor
                            .fetch_max(state.update_cursor, Ordering::AcqRel);
                        self.stored_cursor.send_if_modified(|c| {
                            std::mem::replace(c, (*c).max(state.cursor)) < state.cursor
                        });
                        tracing::info!(upstream = %self.name, instance = %lease.holder, cursor = state.cursor, "This instance now delivers to the upstream.");
                    }
                    // A pause or resume through another instance arrives here; one through
                    // this instance while the renewal ran is newer than what it read.
                    let changed = {
                        let _guard = self.pause_lock.lock().unwrap_or_else(|p| p.into_inner());
                        self.pause_changes.load(Ordering::Acquire) == pause_changes
                            && self.paused.swap(state.paused, Ordering::AcqRel) != state.paused
                    };
                    if changed {
                        self.control.send_modify(|v| *v += 1);
                    }
                    // A range replay asked for through another instance is found here.
                    if self.range_open.load(Ordering::Acquire) == 0
                        && self
                            .store
                            .list_range_replays(&self.name, true)
                            .await
                            .is_ok_and(|r| !r.is_empty())
                    {
                        self.range_open.fetch_add(1, Ordering::AcqRel);
                        self.control.send_modify(|v| *v += 1);
                    }
                    // Notifies a worker waiting for the lease, every renewal.
                    self.lease.send_replace(Some(began + lease.ttl * 2 / 3));
                }
                Ok(None) => self.lose_lease(&lease, "another instance holds it"),
                Err(e) => {
                    // The worker stopped sending at the lease's local deadline; once that
                    // has passed, the lease is taken for lost (another instance may hold it).
                    tracing::error!(upstream = %self.name, error = %e, "Cannot renew the relay lease.");
                    if !self.holds_lease() {
                        self.lose_lease(&lease, "it could not be renewed");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(lease.ttl / 3) => {}
                _ = stop.changed() => {}
            }
        }
        if self.lease.send_replace(None).is_some()
            && let Err(e) = self.store.release_lease(&self.name, &lease.holder).await
        {
            tracing::warn!(upstream = %self.name, error = %e, "Cannot release the relay lease; it will expire.");
        }
    }

    fn lose_lease(&self, lease: &Lease, why: &str) {
        if self.lease.send_if_modified(|held| held.take().is_some()) {
            tracing::warn!(upstream = %self.name, instance = %lease.holder, why, "This instance no longer delivers to the upstream.");
            // Interrupts a retry wait at once.
            self.control.send_modify(|v| *v += 1);
        }
    }

    /// One round: replays first, then new ratings. Ok(false) when there was nothing to do.
    async fn step(
        &self,
        head: &mut watch::Receiver<u64>,
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, StoreError> {
        let batch = self.cfg.batch_size;
        // An operator's range replay takes its turn: one batch, then live delivery's turn.
        let mut replayed = false;
        let generation = self.range_open.load(Ordering::Acquire);
        if generation != 0 {
            match self
                .store
                .list_range_replays(&self.name, true)
                .await?
                .into_iter()
                .last()
            {
                Some(range) => {
                    if !self.replay_range_step(&range, stop).await? {
                        return Ok(false);
                    }
                    replayed = true;
                }
                None => {
                    let _ = self.range_open.compare_exchange(
                        generation,
                        0,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
            }
        }
        // 办件 records first: every case event committed before the ratings this step
        // sends (those at or below `cap`) goes out before them.
        let cap = *head.borrow_and_update();
        if self.sink.relays_cases() {
            match self.step_cases(stop).await? {
                Some(worked) => replayed |= worked,
                None => return Ok(false),
            }
        }
        if self.sink.relays_updates() {
            match self.step_updates(stop).await? {
                Some(worked) => replayed |= worked,
                None => return Ok(false),
            }
        }
        let replays = self.store.replay_batch(&self.name, batch).await?;
        if !replays.is_empty() {
            let (ids, rows): (Vec<u64>, Vec<StoredRating>) =
                replays.into_iter().map(|(d, r)| (d.id, r)).unzip();
            let ratings = self.with_pii(rows)?;
            let Ok(outcome) = self.deliver(Batch::Ratings(&ratings), stop, None).await else {
                return Ok(false);
            };
            let (delivered, failed) = replay_outcome(&ids, outcome);
            tracing::info!(upstream = %self.name, delivered = delivered.len(), rejected = failed.len(), "Replayed dead letters.");
            self.lock().delivered += delivered.len() as u64;
            self.store
                .relay_write(RelayWrite::ReplayDone {
                    upstream: self.name.clone(),
                    delivered: delivered.into_iter().map(|(_, id)| id).collect(),
                    failed,
                    freed_cases: Vec::new(),
                })
                .await?;
            return Ok(true);
        }

        // A pipeline of up to `in_flight` batches: a new batch is read and sent as soon as a
        // slot frees (and as soon as new ratings commit), and the cursor advances batch by
        // batch as the earliest outstanding batch completes — so a rating waits for its own
        // send, not for a whole round.
        let mut read_to = self.cursor.load(Ordering::Acquire);
        let mut inflight = FuturesOrdered::new();
        let mut did_work = replayed;
        let mut sent = 0usize;
        let cases_first = self.sink.relays_cases();
        loop {
            while inflight.len() < self.cfg.in_flight as usize
                && !(self.range_open.load(Ordering::Acquire) != 0 && sent >= LIVE_BATCHES_PER_TURN)
            {
                let mut head_seq = *head.borrow_and_update();
                if cases_first && head_seq > cap {
                    // Ratings committed after the case catch-up wait for the next step (which
                    // sends their cases first); this one must not end idle.
                    head_seq = cap;
                    did_work = true;
                }
                if read_to >= head_seq {
                    break;
                }
                let query = RatingQuery {
                    max_feed_seq: Some(head_seq),
                    ..Default::default()
                };
                let rows = self.store.list_ratings(&query, read_to, batch).await?;
                let Some(last) = rows.last().map(|r| r.feed_seq) else {
                    break;
                };
                read_to = last;
                let seqs: Vec<u64> = rows.iter().map(|r| r.feed_seq).collect();
                let ratings = self.with_pii(rows)?;
                sent += 1;
                inflight.push_back(async move {
                    let result = self.deliver(Batch::Ratings(&ratings), stop, None).await;
                    (seqs, ratings, result)
                });
            }
            // With a slot free, a new commit starts another send at once.
            let next = if !inflight.is_empty() && inflight.len() < self.cfg.in_flight as usize {
                tokio::select! {
                    n = inflight.next() => n,
                    changed = head.changed() => {
                        if changed.is_err() {
                            return Ok(did_work);
                        }
                        continue;
                    }
                }
            } else {
                inflight.next().await
            };
            let Some((seqs, ratings, result)) = next else {
                return Ok(did_work);
            };
            let Ok(outcomes) = result else {
                // Stopping or paused: the cursor stays after the last completed batch; what
                // was sent beyond it is sent again later (at-least-once; deduped upstream).
                return Ok(false);
            };
            let mut dead = Vec::new();
            let mut delivered = 0u64;
            for ((d, seq), rating) in outcomes.into_iter().zip(&seqs).zip(&ratings) {
                match d {
                    Delivery::Delivered => delivered += 1,
                    Delivery::Rejected(error) => {
                        if let Some(suppressed) =
                            crate::telemetry::throttle_for("relay.rejected", &self.name)
                        {
                            tracing::warn!(upstream = %self.name, hub_id = %rating.hub_id, error, suppressed, "Upstream rejected a rating; dead-lettered.");
                        }
                        dead.push(NewDeadLetter {
                            feed_seq: *seq,
                            error,
                            attempts: 1,
                        })
                    }
                }
            }
            let last = *seqs.last().expect("batches are not empty");
            // Recorded by the cursor writer, in order, without holding up the next sends; a
            // crash before it commits only means those batches are sent again.
            let advance = RelayWrite::Advance {
                upstream: self.name.clone(),
                cursor: last,
                dead,
            };
            if self.cursor_writes.send(advance).await.is_err() {
                return Err(StoreError::ShuttingDown);
            }
            self.cursor.store(last, Ordering::Release);
            self.lock().delivered += delivered;
            tracing::debug!(upstream = %self.name, cursor = last, delivered, "Delivered.");
            did_work = true;
        }
    }

    /// Sends 办件 records: replays an operator asked for, then every event past the case
    /// cursor, batch by batch, the cursor (with the batch's dead letters) written before
    /// the next. `Some(worked)`, or `None` when interrupted (stopping, paused, lease lost).
    async fn step_cases(&self, stop: &watch::Receiver<bool>) -> Result<Option<bool>, StoreError> {
        let batch = self.cfg.batch_size;
        let mut worked = false;
        // Every replay an operator asked for, before any rating's (which may need its case).
        loop {
            let replays = self.store.replay_case_batch(&self.name, batch).await?;
            if replays.is_empty() {
                break;
            }
            let (ids, rows): (Vec<u64>, Vec<StoredCaseEvent>) =
                replays.into_iter().map(|(d, e)| (d.id, e)).unzip();
            let cases = self.case_records(rows)?;
            let Ok(outcome) = self.deliver(Batch::Cases(&cases), stop, None).await else {
                return Ok(None);
            };
            let (delivered, failed) = replay_outcome(&ids, outcome);
            tracing::info!(upstream = %self.name, delivered = delivered.len(), rejected = failed.len(), "Replayed 办件 dead letters.");
            // Their ratings refused meanwhile go again: marked in the same transaction, once
            // the letters of ratings already sent are stored.
            if !delivered.is_empty() && !self.ratings_settled(stop).await {
                return Ok(None);
            }
            self.store
                .relay_write(RelayWrite::ReplayDone {
                    upstream: self.name.clone(),
                    freed_cases: delivered
                        .iter()
                        .map(|(i, _)| cases[*i].case.case_number.clone())
                        .collect(),
                    delivered: delivered.into_iter().map(|(_, id)| id).collect(),
                    failed,
                })
                .await?;
            worked = true;
        }
        // The events committed before this step began: later ones wait for the next step,
        // so a steady stream of 办件 events cannot hold back the ratings.
        let until = self.store.case_head().await?;
        loop {
            let after = self.case_cursor.load(Ordering::Acquire);
            if after >= until {
                return Ok(Some(worked));
            }
            let rows = self.store.list_case_events(after, batch).await?;
            let rows: Vec<StoredCaseEvent> = rows.into_iter().filter(|r| r.id <= until).collect();
            let Some(last) = rows.last().map(|r| r.id) else {
                return Ok(Some(worked));
            };
            let all = self.case_records(rows)?;
            // Events the upstream does not take are passed over without a send.
            let cases: Vec<CaseRecord> = all
                .into_iter()
                .filter(|c| self.sink.wants_case(c))
                .collect();
            let outcome = if cases.is_empty() {
                Vec::new()
            } else {
                let Ok(o) = self.deliver(Batch::Cases(&cases), stop, None).await else {
                    return Ok(None);
                };
                o
            };
            let mut dead = Vec::new();
            let mut delivered = Vec::new();
            for (d, case) in outcome.into_iter().zip(&cases) {
                match d {
                    Delivery::Rejected(error) => {
                        if let Some(suppressed) =
                            crate::telemetry::throttle_for("relay.case_rejected", &self.name)
                        {
                            tracing::warn!(upstream = %self.name, case_event = case.id, error, suppressed, "Upstream rejected a 办件 record; dead-lettered.");
                        }
                        dead.push((case.id, error));
                    }
                    Delivery::Delivered => delivered.push(case.case.case_number.clone()),
                }
            }
            // The ratings these cases free may still be on their way to the store as dead
            // letters (queued cursor writes): wait for them, or the re-queue would miss them.
            if !delivered.is_empty() && !self.ratings_settled(stop).await {
                return Ok(None);
            }
            self.store
                .relay_write(RelayWrite::CaseAdvance {
                    upstream: self.name.clone(),
                    cursor: last,
                    dead,
                    delivered,
                })
                .await?;
            self.case_cursor.fetch_max(last, Ordering::AcqRel);
            worked = true;
        }
    }

    /// Waits until the stored rating cursor has caught up with the sent one (false: the hub
    /// is stopping).
    async fn ratings_settled(&self, stop: &watch::Receiver<bool>) -> bool {
        let target = self.cursor.load(Ordering::Acquire);
        let mut stored = self.stored_cursor.subscribe();
        let mut stop = stop.clone();
        loop {
            if *stored.borrow_and_update() >= target {
                return true;
            }
            if *stop.borrow() {
                return false;
            }
            tokio::select! {
                r = stored.changed() => if r.is_err() { return false },
                _ = stop.changed() => {}
            }
        }
    }

    /// Sends rating updates (appeal outcomes): replays asked for, then every update past the
    /// update cursor whose rating the cursor has passed (an update never goes before its
    /// rating; the first one still waiting for its rating stops the round).
    async fn step_updates(&self, stop: &watch::Receiver<bool>) -> Result<Option<bool>, StoreError> {
        let batch = self.cfg.batch_size;
        let mut worked = false;
        loop {
            let replays = self.store.replay_update_batch(&self.name, batch).await?;
            if replays.is_empty() {
                break;
            }
            // An update whose rating is still a dead letter here waits, as on first sending.
            let (waiting, replays): (Vec<_>, Vec<_>) =
                replays.into_iter().partition(|(_, u)| u.rating_dead);
            let (ids, rows): (Vec<u64>, Vec<StoredUpdate>) =
                replays.into_iter().map(|(d, u)| (d.id, u)).unzip();
            let updates = self.update_records(rows)?;
            let outcome = if updates.is_empty() {
                Vec::new()
            } else {
                let Ok(o) = self.deliver(Batch::Updates(&updates), stop, None).await else {
                    return Ok(None);
                };
                o
            };
            let (delivered, mut failed) = replay_outcome(&ids, outcome);
            failed.extend(
                waiting
                    .into_iter()
                    .map(|(d, _)| (d.id, UPDATE_WAITS.to_owned())),
            );
            self.store
                .relay_write(RelayWrite::ReplayDone {
                    upstream: self.name.clone(),
                    delivered: delivered.into_iter().map(|(_, id)| id).collect(),
                    failed,
                    freed_cases: Vec::new(),
                })
                .await?;
            worked = true;
        }
        // The updates that existed when this step began: a backlog does not hold back the
        // ratings for more than a step.
        let until = self.store.update_head().await?;
        loop {
            let after = self.update_cursor.load(Ordering::Acquire);
            if after >= until {
                return Ok(Some(worked));
            }
            // Settled ratings only (delivered or dead-lettered, and stored so).
            let settled = *self.stored_cursor.borrow();
            let rows: Vec<StoredUpdate> = self
                .store
                .list_updates(&self.name, after, batch)
                .await?
                .into_iter()
                .take_while(|u| u.seq <= until && u.rating.feed_seq <= settled)
                .collect();
            let Some(last) = rows.last().map(|u| u.seq) else {
                return Ok(Some(worked));
            };
            let waiting: Vec<bool> = rows.iter().map(|u| u.rating_dead).collect();
            let updates = self.update_records(rows)?;
            let mut dead = Vec::new();
            let mut send = Vec::new();
            for (u, rating_dead) in updates.into_iter().zip(waiting) {
                if rating_dead {
                    // The platform has not got the rating: the update waits as a dead letter,
                    // sent again by itself when the rating's own letter is delivered.
                    dead.push((u.seq, UPDATE_WAITS.to_owned()));
                } else if self.sink.wants_update(&u) {
                    send.push(u);
                }
            }
            if !send.is_empty() {
                let Ok(outcome) = self.deliver(Batch::Updates(&send), stop, None).await else {
                    return Ok(None);
                };
                for (d, u) in outcome.into_iter().zip(&send) {
                    if let Delivery::Rejected(error) = d {
                        if let Some(suppressed) =
                            crate::telemetry::throttle_for("relay.update_rejected", &self.name)
                        {
                            tracing::warn!(upstream = %self.name, hub_id = %u.rating.hub_id, error, suppressed, "Upstream rejected a rating update; dead-lettered.");
                        }
                        dead.push((u.seq, error));
                    }
                }
            }
            self.store
                .relay_write(RelayWrite::UpdateAdvance {
                    upstream: self.name.clone(),
                    cursor: last,
                    dead,
                })
                .await?;
            self.update_cursor.fetch_max(last, Ordering::AcqRel);
            worked = true;
        }
    }

    fn update_records(&self, rows: Vec<StoredUpdate>) -> Result<Vec<UpdateRecord>, StoreError> {
        let meta: Vec<(u64, i32, i64)> = rows
            .iter()
            .map(|u| (u.seq, u.reason, u.at_micros))
            .collect();
        let ratings = self.with_pii(rows.into_iter().map(|u| u.rating).collect())?;
        Ok(meta
            .into_iter()
            .zip(ratings)
            .map(|((seq, reason, at_micros), rating)| UpdateRecord {
                seq,
                reason,
                at_micros,
                rating,
            })
            .collect())
    }

    /// Puts the applicant's and agent's personal data back for the upstream.
    fn case_records(&self, rows: Vec<StoredCaseEvent>) -> Result<Vec<CaseRecord>, StoreError> {
        rows.into_iter()
            .map(|row| {
                let mut case = row.case;
                if let Some(sealed) = &row.pii {
                    let aad = case_aad(&row.source_system, &case.case_number, case.event);
                    self.keys
                        .reveal_persons(
                            case.applicant.as_mut(),
                            case.agent.as_mut(),
                            sealed,
                            &aad,
                            true,
                        )
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                }
                Ok(CaseRecord {
                    id: row.id,
                    source_system: row.source_system,
                    case,
                })
            })
            .collect()
    }

    /// One batch of the oldest open range replay: its next ratings sent again, whatever the
    /// upstream answered for them before; the replay's position moves past them. A rating
    /// refused now is in the attempt log; it opens no dead letter (its first delivery
    /// decided that).
    async fn replay_range_step(
        &self,
        range: &RangeReplay,
        stop: &watch::Receiver<bool>,
    ) -> Result<bool, StoreError> {
        let query = RatingQuery {
            max_feed_seq: Some(range.to_seq),
            ..Default::default()
        };
        let rows = self
            .store
            .list_ratings(
                &query,
                range.next_seq.saturating_sub(1),
                self.cfg.batch_size,
            )
            .await?;
        let next = match rows.last() {
            Some(last) => {
                let next = last.feed_seq + 1;
                let ratings = self.with_pii(rows)?;
                if self
                    .deliver(Batch::Ratings(&ratings), stop, Some(range.id))
                    .await
                    .is_err()
                {
                    return Ok(false);
                }
                next
            }
            // Nothing more in the range (it reached past the feed's head when asked).
            None => range.to_seq + 1,
        };
        self.store
            .relay_write(RelayWrite::RangeProgress {
                id: range.id,
                next_seq: next,
            })
            .await?;
        if next > range.to_seq {
            tracing::info!(upstream = %self.name, replay = range.id, from = range.from_seq, to = range.to_seq, "Range replay done.");
        }
        Ok(true)
    }

    /// Logs one send; a full queue drops the record (counted in the log line) rather than
    /// hold up delivery.
    fn log_attempt(
        &self,
        batch: Batch<'_>,
        replay_id: Option<u64>,
        started: (i64, Instant),
        outcome: &str,
        detail: &str,
    ) {
        self.metrics.attempt(&self.name, outcome);
        let (first_seq, last_seq, detail) = match batch {
            Batch::Ratings(r) => (
                r.first().map_or(0, |r| r.feed_sequence),
                r.last().map_or(0, |r| r.feed_sequence),
                detail.to_owned(),
            ),
            // Updates and 办件 records have no feed positions of their own: the attempt says
            // which it carried.
            Batch::Updates(u) => (
                0,
                0,
                format!(
                    "rating updates {}–{}{}{detail}",
                    u.first().map_or(0, |u| u.seq),
                    u.last().map_or(0, |u| u.seq),
                    if detail.is_empty() { "" } else { ": " }
                ),
            ),
            Batch::Cases(c) => (
                0,
                0,
                format!(
                    "办件 events {}–{}{}{detail}",
                    c.first().map_or(0, |c| c.id),
                    c.last().map_or(0, |c| c.id),
                    if detail.is_empty() { "" } else { ": " }
                ),
            ),
        };
        let record = AttemptRecord {
            id: 0,
            upstream: self.name.clone(),
            at_micros: started.0,
            first_seq,
            last_seq,
            records: batch.len() as u32,
            outcome: outcome.to_owned(),
            // Already cleaned (clean_upstream_text: numbers however written masked).
            detail: detail.chars().take(1000).collect(),
            duration_ms: started.1.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
            replay_id,
        };
        if self.attempt_log.try_send(record).is_err()
            && let Some(suppressed) =
                crate::telemetry::throttle_for("relay.attempt_log_full", &self.name)
        {
            tracing::warn!(upstream = %self.name, suppressed, "The attempt log cannot keep up; an attempt was not logged.");
        }
    }

    /// The upstream answered: the last error is over, and if there was one, the other
    /// batches waiting out their retry pause (each on its own timer, up to the schedule's
    /// longest) are woken to send now: this answer was the probe that the upstream is back.
    fn answered(&self) {
        if self.lock().last_error.take().is_some() {
            self.control.send_modify(|v| *v += 1);
        }
    }

    /// Puts the rater's personal data back for the upstream (it is entitled to it).
    fn with_pii(&self, rows: Vec<StoredRating>) -> Result<Vec<pb::Rating>, StoreError> {
        rows.into_iter()
            .map(|row| {
                let mut rating = row.rating;
                if let Some(sealed) = &row.pii {
                    let hub_id = Uuid::parse_str(&rating.hub_id)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    self.keys
                        .reveal_persons(
                            rating.rater.as_mut(),
                            rating.agent.as_mut(),
                            sealed,
                            &rating_aad(&hub_id),
                            true,
                        )
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                }
                Ok(rating)
            })
            .collect()
    }

    /// Sends one batch until the upstream answers (retrying on the schedule), or until the
    /// hub stops or the upstream is paused.
    async fn deliver(
        &self,
        batch: Batch<'_>,
        stop: &watch::Receiver<bool>,
        replay_id: Option<u64>,
    ) -> Result<Vec<Delivery>, Interrupted> {
        let mut stop = stop.clone();
        let mut control = self.control.subscribe();
        let mut attempt = 0usize;
        let mut malformed = 0usize;
        loop {
            if *stop.borrow() {
                return Err(Interrupted::Stopping);
            }
            if self.paused.load(Ordering::Acquire) {
                return Err(Interrupted::Paused);
            }
            let n = NonZeroU32::new(batch.len() as u32).expect("batches are not empty");
            tokio::select! {
                _ = async {
                    // Config guarantees records_burst >= batch_size, so this always fits.
                    let _ = self.records.until_n_ready(n).await;
                    self.requests.until_ready().await;
                } => {}
                _ = stop.changed() => continue,
            }
            // Right before the send: the rate limit may have waited past the lease.
            if !self.holds_lease() {
                return Err(Interrupted::LeaseLost);
            }
            self.lock().attempts += 1;
            let started = (self.clock.now_micros(), Instant::now());
            let sent = match batch {
                Batch::Ratings(r) => self.sink.send(r).await,
                Batch::Cases(c) => self.sink.send_cases(c).await,
                Batch::Updates(u) => self.sink.send_updates(u).await,
            };
            match &sent {
                Ok(outcomes) => {
                    let refused: Vec<&String> = outcomes
                        .iter()
                        .filter_map(|d| match d {
                            Delivery::Rejected(e) => Some(e),
                            _ => None,
                        })
                        .collect();
                    let outcome = match refused.len() {
                        0 => "delivered",
                        n if n == outcomes.len() => "rejected",
                        _ => "partly_rejected",
                    };
                    let detail = refused
                        .first()
                        .map(|e| format!("{} refused: {}", refused.len(), clean_upstream_text(e)))
                        .unwrap_or_default();
                    self.log_attempt(batch, replay_id, started, outcome, &detail);
                }
                Err(e) => {
                    let outcome = match e {
                        SendError::Permanent(_) => "rejected",
                        SendError::Malformed(_) => "unreadable",
                        SendError::Ambiguous(_) => "ambiguous",
                        SendError::Retryable(_) => "failed",
                    };
                    self.log_attempt(
                        batch,
                        replay_id,
                        started,
                        outcome,
                        &clean_upstream_text(&e.to_string()),
                    );
                }
            }
            match sent {
                Ok(outcomes) => {
                    self.answered();
                    return Ok(outcomes
                        .into_iter()
                        .map(|d| match d {
                            Delivery::Rejected(e) => Delivery::Rejected(clean_upstream_text(&e)),
                            d => d,
                        })
                        .collect());
                }
                Err(SendError::Permanent(e)) => {
                    self.answered();
                    return Ok(vec![
                        Delivery::Rejected(clean_upstream_text(&e));
                        batch.len()
                    ]);
                }
                Err(SendError::Malformed(e))
                    if {
                        malformed += 1;
                        malformed >= MALFORMED_TRIES
                    } =>
                {
                    // An answer the hub cannot read, several times over: never a success.
                    self.answered();
                    let e = clean_upstream_text(&format!(
                        "{e} ({MALFORMED_TRIES} answers in a row could not be read)"
                    ));
                    return Ok(vec![Delivery::Rejected(e); batch.len()]);
                }
                Err(SendError::Ambiguous(e)) if batch.len() > 1 => {
                    self.answered();
                    // Which of them? Each is sent again on its own (through the rate limits,
                    // with its own retries), so one the upstream refuses is not taken for
                    // delivered with the rest.
                    tracing::info!(upstream = %self.name, records = batch.len(), error = %clean_upstream_text(&e), "The upstream's answer does not say which records it means; sending them one by one.");
                    let mut outcomes = Vec::with_capacity(batch.len());
                    for i in 0..batch.len() {
                        outcomes
                            .extend(Box::pin(self.deliver(batch.one(i), &stop, replay_id)).await?);
                    }
                    return Ok(outcomes);
                }
                Err(
                    err @ (SendError::Retryable(_)
                    | SendError::Malformed(_)
                    | SendError::Ambiguous(_)),
                ) => {
                    if matches!(err, SendError::Retryable(_)) {
                        // "In a row": a failure of another kind in between starts the count
                        // of unreadable answers again.
                        malformed = 0;
                    }
                    let e = clean_upstream_text(&err.to_string());
                    let wait = self.backoff(attempt);
                    attempt += 1;
                    if let Some(suppressed) =
                        crate::telemetry::throttle_for("relay.retry", &self.name)
                    {
                        tracing::warn!(upstream = %self.name, attempt, wait_ms = wait.as_millis() as u64, error = %e, suppressed, "Delivery failed; will retry.");
                    }
                    {
                        let mut c = self.lock();
                        c.failures += 1;
                        c.last_error = Some((e, self.clock.now_micros()));
                    }
                    control.borrow_and_update();
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => {}
                        _ = control.changed() => {}
                    }
                    // A range replay an operator cancelled stops retrying.
                    // (A read that fails is no cancellation: the retries go on.)
                    if let Some(id) = replay_id
                        && self
                            .store
                            .list_range_replays(&self.name, true)
                            .await
                            .is_ok_and(|open| !open.iter().any(|r| r.id == id))
                    {
                        return Err(Interrupted::Cancelled);
                    }
                }
            }
        }
    }
}

/// The error of an update letter whose rating is itself a dead letter of the upstream.
const UPDATE_WAITS: &str = "waits for its rating, itself a dead letter here; sent again when \
                            that rating is delivered";

/// A replay's outcome: the letters delivered (with their positions in the batch), and those
/// refused again with the upstream's new error.
type ReplayOutcome = (Vec<(usize, u64)>, Vec<(u64, String)>);

fn replay_outcome(ids: &[u64], outcome: Vec<Delivery>) -> ReplayOutcome {
    let mut delivered = Vec::new();
    let mut failed = Vec::new();
    for (i, (id, d)) in ids.iter().zip(outcome).enumerate() {
        match d {
            Delivery::Delivered => delivered.push((i, *id)),
            Delivery::Rejected(e) => failed.push((*id, e)),
        }
    }
    (delivered, failed)
}

/// What one send carries: ratings, or 办件 records.
#[derive(Clone, Copy)]
enum Batch<'a> {
    Ratings(&'a [pb::Rating]),
    Cases(&'a [CaseRecord]),
    Updates(&'a [UpdateRecord]),
}

impl<'a> Batch<'a> {
    fn len(self) -> usize {
        match self {
            Batch::Ratings(r) => r.len(),
            Batch::Cases(c) => c.len(),
            Batch::Updates(u) => u.len(),
        }
    }

    /// The `i`th record alone.
    fn one(self, i: usize) -> Batch<'a> {
        match self {
            Batch::Ratings(r) => Batch::Ratings(&r[i..=i]),
            Batch::Cases(c) => Batch::Cases(&c[i..=i]),
            Batch::Updates(u) => Batch::Updates(&u[i..=i]),
        }
    }
}

/// How often an upstream that takes 办件 records looks for new ones while no rating arrives.
const CASE_POLL: Duration = Duration::from_secs(1);

/// Attempts queued for the log at most; more are dropped (and said) rather than delay a send.
const ATTEMPT_QUEUE: usize = 4096;
/// Attempts written in one statement at most.
const ATTEMPT_BATCH: usize = 500;
/// Old attempts deleted in one statement at most.
pub(crate) const PRUNE_SLICE: u64 = 10_000;

/// Writes the attempt log: what is queued, in batches; and once an hour forgets attempts
/// older than `days`. When the hub stops, what is queued is written once more.
async fn log_attempts(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    mut queue: tokio::sync::mpsc::Receiver<AttemptRecord>,
    days: u32,
    mut stop: watch::Receiver<bool>,
) {
    // The first pruning a minute after start, not at it: a restart loop must not be a
    // stream of large deletes.
    let mut prune = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(60),
        Duration::from_secs(3600),
    );
    let keep = i64::from(days) * 86_400_000_000;
    let mut open = true;
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            n = queue.recv_many(&mut batch, ATTEMPT_BATCH), if open => {
                if n == 0 {
                    // No upstream sends any more (or none is configured): pruning goes on.
                    open = false;
                    continue;
                }
            }
            _ = prune.tick() => {
                let before_micros = clock.now_micros() - keep;
                // In slices, so the writer is never held long by one delete.
                loop {
                    match store.relay_write(RelayWrite::PruneAttempts { before_micros }).await {
                        Ok(n) if n >= PRUNE_SLICE => tokio::task::yield_now().await,
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "The attempt log could not be pruned; will try again.");
                            break;
                        }
                    }
                }
                continue;
            }
            _ = stop.changed() => {
                // The workers finish their sends within the shutdown grace: what they log
                // meanwhile is written too, for a few seconds.
                let until = tokio::time::Instant::now() + Duration::from_secs(3);
                while let Ok(n) = tokio::time::timeout_at(until, queue.recv_many(&mut batch, ATTEMPT_BATCH)).await {
                    if n == 0 {
                        break;
                    }
                    if store.relay_write(RelayWrite::Attempts(std::mem::take(&mut batch))).await.is_err() {
                        return;
                    }
                }
                return;
            }
        }
        if let Err(e) = store.relay_write(RelayWrite::Attempts(batch)).await
            && let Some(suppressed) = crate::telemetry::throttle("relay.attempt_log_write")
        {
            tracing::warn!(error = %e, suppressed, "Delivery attempts could not be logged.");
        }
    }
}

/// Commits an upstream's cursor advances (with their dead letters) in order. A write that
/// fails is tried again, with a growing pause, until it commits: a later advance must never
/// commit while an earlier one has not, or the ratings between them would be neither
/// delivered nor dead-lettered. Meanwhile the queue fills and the worker waits (sending
/// nothing more). When the hub stops, what is queued is tried once more; after a write that
/// still fails nothing later is written, so the stored cursor stays before the batch and it
/// is sent again after the restart.
async fn write_cursors(
    worker: Arc<Worker>,
    mut pending: tokio::sync::mpsc::Receiver<RelayWrite>,
    mut stop: watch::Receiver<bool>,
) {
    let (store, upstream) = (&worker.store, &worker.name);
    let mut stopping = false;
    loop {
        let write = if stopping {
            pending.recv().await
        } else {
            tokio::select! {
                w = pending.recv() => w,
                _ = stop.changed() => {
                    // Stopping: take no more, store what is queued.
                    stopping = true;
                    pending.close();
                    continue;
                }
            }
        };
        let Some(write) = write else { break };
        let advanced = match &write {
            RelayWrite::Advance { cursor, .. } => Some(*cursor),
            _ => None,
        };
        let mut failures = 0u32;
        loop {
            match store.relay_write(write.clone()).await {
                Ok(_) => {
                    if let Some(c) = advanced {
                        worker
                            .stored_cursor
                            .send_if_modified(|s| std::mem::replace(s, (*s).max(c)) < c);
                    }
                    if failures > 0 {
                        tracing::warn!(upstream = %upstream, failures, "Stored the delivery cursor after failed tries.");
                        worker.lock().cursor_error = None;
                    }
                    break;
                }
                Err(StoreError::ShuttingDown) => return,
                Err(e) => {
                    failures += 1;
                    if stopping {
                        tracing::error!(upstream = %upstream, error = %e, "Cannot store the delivery cursor while stopping; the ratings after the stored cursor will be sent again after the restart.");
                        return;
                    }
                    // What an operator sees in ListUpstreams while delivery waits.
                    worker.lock().cursor_error = Some((
                        clean_upstream_text(&format!("{CURSOR_ERROR}: {e}")),
                        worker.clock.now_micros(),
                    ));
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::error!(upstream = %upstream, error = %e, failures, "Cannot store the delivery cursor and its dead letters; delivery waits, and the write is tried again until it commits.");
                    }
                    let pause = Duration::from_millis(50 << failures.min(6)); // up to 3.2 s
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stop.changed(), if !stopping => {
                            stopping = true;
                            pending.close();
                        }
                    }
                }
            }
        }
    }
}

/// How a failure to store the delivery state shows as an upstream's last error.
const CURSOR_ERROR: &str = "cannot store the delivery cursor and dead letters";

/// A retry pause: `base_ms` spread by ± `jitter` (0.2: 80 % to 120 %), so upstreams that
/// failed together do not all retry at the same moment; never under 1 ms. `state` is the
/// generator's state (xorshift64: spread, not cryptographic randomness; never 0).
fn jittered(base_ms: u64, jitter: f64, state: &std::sync::atomic::AtomicU64) -> Duration {
    let mut x = state.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    state.store(x, Ordering::Relaxed);
    let unit = (x >> 11) as f64 / (1u64 << 53) as f64; // 0..1
    let factor = 1.0 + jitter * (2.0 * unit - 1.0);
    Duration::from_millis((base_ms as f64 * factor).max(1.0) as u64)
}

/// An upstream's text (an error message, a record's rejection) as it may be stored and shown:
/// runs of 7 or more digits (phones, ID numbers) become `<number>`, control characters (a
/// NUL, which PostgreSQL cannot store in text; line breaks, which forge log lines) become
/// spaces, and it is cut at 2,000 characters.
pub(crate) fn clean_upstream_text(text: &str) -> String {
    const MAX: usize = 2000;
    // An upstream may echo what it was sent: its text never keeps a phone or an ID number,
    // whichever sink produced it. (Redacted before the cut, over a little more than is kept,
    // so a number the cut falls in is redacted whole; a huge text is not walked in full.)
    let head: String = text.chars().take(MAX + 20).collect();
    let longer = text.chars().nth(MAX + 20).is_some();
    let mut redacted = crate::domain::codes::redact_numbers(&head);
    if longer {
        redacted.push('…');
    }
    let text = &redacted;
    let mut out: String = text
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no upstream named {0:?}")]
    UnknownUpstream(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One upstream's running worker and the tasks that serve it.
struct Running {
    worker: Arc<Worker>,
    /// Of its configuration and of the files and secrets it names: a reload replaces the
    /// worker only when this changes.
    fingerprint: [u8; 32],
    /// Stops its delivery loop and cursor writer.
    stop: watch::Sender<bool>,
    run_task: JoinHandle<()>,
    /// Reports the hub's rating log heads to the upstream (when it takes them).
    report_task: Option<JoinHandle<()>>,
    /// Its cursor writer: finishes after the loop, storing what is queued.
    cursor_task: JoinHandle<()>,
    /// On a shared store, its lease keeper: stopped last, so the lease is given up only
    /// once nothing more is sent or stored under it.
    lease: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

impl Running {
    /// Stops the worker: a request in flight is abandoned (its cursor is not advanced, so
    /// it is sent again by whatever delivers next), the queued cursor writes are stored,
    /// then the lease is given up.
    async fn stop(self, grace: Duration) {
        let _ = self.stop.send(true);
        for mut t in [self.run_task, self.cursor_task]
            .into_iter()
            .chain(self.report_task)
        {
            if tokio::time::timeout(grace, &mut t).await.is_err() {
                t.abort();
            }
        }
        if let Some((stop, mut t)) = self.lease {
            let _ = stop.send(true);
            if tokio::time::timeout(grace, &mut t).await.is_err() {
                t.abort();
            }
        }
    }
}

/// An upstream a reload starts: its configuration, already checked, and its sink, built.
struct Start {
    name: String,
    cfg: UpstreamConfig,
    sink: Box<dyn Sink>,
    fingerprint: [u8; 32],
}

/// What a reload of the upstreams will do, every new sink already built (so nothing
/// changes unless all of them could be).
pub struct RelayPlan {
    start: Vec<Start>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl RelayPlan {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Reports the hub's latest signed rating log head to the upstream each time a new one is
/// signed, with a consistency proof from the last head the upstream accepted, while this
/// instance delivers to it. Ends when the upstream takes no heads.
async fn report_heads(
    worker: Arc<Worker>,
    log: Arc<crate::tree_head::TreeLog>,
    mut stop: watch::Receiver<bool>,
) {
    let mut accepted = 0u64;
    let mut sent: Option<(u64, i64)> = None;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut head = None;
        if worker.holds_lease()
            && let Ok(latest) = log.latest().await
        {
            // Behind what the upstream accepted (another instance reported a later one): a
            // head signed now, or none this round.
            head = if latest.size < accepted {
                log.sign_now().await.ok().filter(|h| h.size >= accepted)
            } else {
                Some(latest)
            };
        }
        if let Some(head) = head
            && sent != Some((head.size, head.timestamp_micros))
        {
            match report_head(&worker, &log, &head, accepted).await {
                Ok(None) => return,
                Ok(Some(answer)) => {
                    sent = Some((head.size, head.timestamp_micros));
                    accepted = answer.accepted_size;
                    if !answer.accepted
                        && let Some(suppressed) =
                            crate::telemetry::throttle_for("relay.head_refused", &worker.name)
                    {
                        tracing::error!(upstream = %worker.name, size = head.size, problem = ?answer.problem, suppressed, "The upstream hub did not accept this hub's rating log head.");
                    }
                }
                Err(SendError::Permanent(why)) if why.starts_with("Unimplemented") => {
                    tracing::warn!(upstream = %worker.name, reason = %why, "The upstream takes no rating log heads; not reporting them.");
                    return;
                }
                Err(SendError::Permanent(why)) => {
                    // No key registered for this hub there (yet): asked again now and then.
                    if let Some(suppressed) =
                        crate::telemetry::throttle_for("relay.head_unchecked", &worker.name)
                    {
                        tracing::warn!(upstream = %worker.name, reason = %why, suppressed, "The upstream does not check this hub's rating log heads; trying again later.");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(log.interval() * 10) => {}
                        _ = stop.changed() => {}
                    }
                }
                Err(e) => {
                    if let Some(suppressed) =
                        crate::telemetry::throttle_for("relay.report_head", &worker.name)
                    {
                        tracing::warn!(upstream = %worker.name, error = ?e, suppressed, "Cannot report the rating log head; trying again.");
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(log.interval()) => {}
            _ = stop.changed() => {}
        }
    }
}

/// One report, with the proof from `from`; once more from the size the upstream says it
/// accepted when that is another.
async fn report_head(
    worker: &Worker,
    log: &crate::tree_head::TreeLog,
    head: &crate::tree_head::TreeHead,
    mut from: u64,
) -> Result<Option<pb::ReportTreeHeadResponse>, SendError> {
    let finding = log.self_check();
    let failed = finding.is_some();
    let (first_bad, reason) = finding.unwrap_or_default();
    for _ in 0..2 {
        let proof = if from > 0 && from < head.size {
            log.consistency(from, head.size)
                .await
                .map_err(|e| SendError::Retryable(e.to_string()))?
        } else {
            Vec::new()
        };
        let request = pb::ReportTreeHeadRequest {
            tree_head: Some(head.to_pb()),
            from_size: from,
            consistency_proof: proof.iter().map(|h| h.to_vec()).collect(),
            self_check_first_bad: first_bad,
            self_check_reason: reason.clone(),
            self_check_failed: failed,
        };
        let Some(answer) = worker.sink.report_head(request).await? else {
            return Ok(None);
        };
        // The upstream holds a later head than this one (another instance reported it):
        // nothing is sent again; the caller signs afresh.
        if !answer.accepted && answer.accepted_size != from && answer.accepted_size <= head.size {
            from = answer.accepted_size;
            continue;
        }
        return Ok(Some(answer));
    }
    Err(SendError::Retryable(
        "the upstream's accepted size moved twice".into(),
    ))
}

/// Every upstream's worker.
pub struct Relay {
    /// The workers by upstream, for operators' calls (replaced whole by a reload).
    workers: std::sync::RwLock<BTreeMap<String, Arc<Worker>>>,
    /// The same workers with their tasks: held by a reload or the shutdown while it works.
    running: tokio::sync::Mutex<BTreeMap<String, Running>>,
    store: Arc<dyn Store>,
    keys: Arc<PiiKeys>,
    clock: Arc<dyn Clock>,
    lease: Lease,
    metrics: Arc<crate::metrics::Metrics>,
    attempt_log: tokio::sync::mpsc::Sender<AttemptRecord>,
    /// Stops the attempt log writer, after the workers.
    stop: watch::Sender<bool>,
    log_task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Set by the shutdown: a reload after it starts nothing.
    stopped: AtomicBool,
    /// This hub's rating log: its heads are reported to upstreams that take them.
    log: Option<Arc<crate::tree_head::TreeLog>>,
    /// Held shared by an operator's call (pause, resume, replays) from finding the worker
    /// to telling it, and exclusively by a reload replacing workers: a call never lands on
    /// a worker that is being replaced after the new one read its stored state.
    replacing: tokio::sync::RwLock<()>,
}

/// Of an upstream's configuration and the files and secrets it names (their content, not
/// only their paths: a renewed client certificate or a new profile under the same name is a
/// change). Never shown: it covers secrets.
fn fingerprint(cfg: &UpstreamConfig) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(format!("{cfg:?}").as_bytes());
    let files = [&cfg.ca, &cfg.cert, &cfg.key]
        .into_iter()
        .chain(cfg.profile.iter())
        .chain(cfg.keys.values())
        .filter(|p| !p.is_empty());
    for path in files {
        h.update([0]);
        h.update(std::fs::read(path).unwrap_or_default());
    }
    for reference in cfg.secrets.values() {
        h.update([0]);
        if let Some(path) = reference.strip_prefix("file:") {
            h.update(std::fs::read(path).unwrap_or_default());
        } else if let Some(var) = reference.strip_prefix("env:") {
            h.update(std::env::var_os(var).unwrap_or_default().as_encoded_bytes());
        }
    }
    h.finalize().into()
}

fn build_sink(name: &str, cfg: &UpstreamConfig) -> Result<Box<dyn Sink>, String> {
    cfg.check(name)?;
    let sink: Box<dyn Sink> = match cfg.kind {
        SinkKind::Grpc => {
            Box::new(grpc::GrpcSink::new(cfg).map_err(|e| format!("upstreams.{name}: {e:#}"))?)
        }
        SinkKind::HttpJson => Box::new(
            http::HttpSink::new(name, cfg).map_err(|e| format!("upstreams.{name}: {e:#}"))?,
        ),
    };
    Ok(sink)
}

impl Relay {
    /// Builds the sinks, loads each upstream's durable cursor and starts its worker.
    #[allow(clippy::too_many_arguments)] // each is one of the hub's parts, named at its one call
    pub async fn start(
        upstreams: &BTreeMap<String, UpstreamConfig>,
        store: Arc<dyn Store>,
        keys: Arc<PiiKeys>,
        clock: Arc<dyn Clock>,
        lease: Lease,
        attempt_log_days: u32,
        metrics: Arc<crate::metrics::Metrics>,
        log: Option<Arc<crate::tree_head::TreeLog>>,
    ) -> anyhow::Result<Arc<Self>> {
        let (stop, stop_rx) = watch::channel(false);
        let (attempt_log, attempts) = tokio::sync::mpsc::channel(ATTEMPT_QUEUE);
        let log_task = tokio::spawn(log_attempts(
            store.clone(),
            clock.clone(),
            attempts,
            attempt_log_days,
            stop_rx,
        ));
        let relay = Arc::new(Self {
            workers: std::sync::RwLock::new(BTreeMap::new()),
            running: tokio::sync::Mutex::new(BTreeMap::new()),
            store,
            keys,
            clock,
            lease,
            metrics,
            attempt_log,
            stop,
            log_task: tokio::sync::Mutex::new(Some(log_task)),
            stopped: AtomicBool::new(false),
            replacing: tokio::sync::RwLock::new(()),
            log,
        });
        let mut plan = relay.plan(upstreams).await.map_err(anyhow::Error::msg)?;
        relay
            .apply(&mut plan, Duration::from_secs(5))
            .await
            .map_err(anyhow::Error::msg)?;
        Ok(relay)
    }

    /// What a reload to `upstreams` would do: the upstreams added, removed, and changed (in
    /// their configuration or in a file or secret it names), each new or changed one
    /// checked and its sink built. An error names the upstream and changes nothing.
    pub async fn plan(
        &self,
        upstreams: &BTreeMap<String, UpstreamConfig>,
    ) -> Result<RelayPlan, String> {
        let current: BTreeMap<String, [u8; 32]> = {
            let running = self.running.lock().await;
            if self.stopped.load(Ordering::Acquire) {
                return Err("the hub is stopping".into());
            }
            running
                .iter()
                .map(|(n, r)| (n.clone(), r.fingerprint))
                .collect()
        };
        let upstreams = upstreams.clone();
        // Reading certificates, profiles and key files is blocking work.
        tokio::task::spawn_blocking(move || {
            let mut plan = RelayPlan {
                start: Vec::new(),
                added: Vec::new(),
                removed: current
                    .keys()
                    .filter(|n| !upstreams.contains_key(*n))
                    .cloned()
                    .collect(),
                changed: Vec::new(),
            };
            for (name, cfg) in &upstreams {
                let print = fingerprint(cfg);
                match current.get(name) {
                    Some(old) if *old == print => continue,
                    Some(_) => plan.changed.push(name.clone()),
                    None => plan.added.push(name.clone()),
                }
                let sink = build_sink(name, cfg)?;
                plan.start.push(Start {
                    name: name.clone(),
                    cfg: cfg.clone(),
                    sink,
                    fingerprint: print,
                });
            }
            Ok(plan)
        })
        .await
        .map_err(|e| format!("checking the upstreams failed: {e}"))?
    }

    /// Carries out a plan: stops the removed and changed upstreams' workers (each stores
    /// its queued cursor writes, then gives up its lease), then starts the new and changed
    /// ones from their stored state. Upstreams the plan does not name go on untouched. An
    /// upstream whose stored state cannot be read (after a few tries) is left stopped and
    /// named in the error, its name taken out of `plan`'s lists (a later reload starts it).
    pub async fn apply(&self, plan: &mut RelayPlan, grace: Duration) -> Result<(), String> {
        let _replacing = self.replacing.write().await;
        let mut running = self.running.lock().await;
        if self.stopped.load(Ordering::Acquire) {
            return Err("the hub is stopping".into());
        }
        let stopping: Vec<Running> = plan
            .removed
            .iter()
            .chain(&plan.changed)
            .filter_map(|name| running.remove(name))
            .collect();
        futures_util::future::join_all(stopping.into_iter().map(|r| r.stop(grace))).await;
        for name in &plan.removed {
            self.workers
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
            self.metrics.forget_upstream(name);
            tracing::info!(upstream = %name, "Upstream removed by a reload: delivery stopped (its cursor and dead letters stay stored).");
        }
        let mut failed = Vec::new();
        for start in std::mem::take(&mut plan.start) {
            let name = start.name.clone();
            match self.launch(start).await {
                Ok(r) => {
                    // A changed upstream's entry is replaced in place: operators' calls
                    // never find it missing.
                    self.workers
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), r.worker.clone());
                    running.insert(name, r);
                }
                Err(e) => {
                    self.workers
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&name);
                    self.metrics.forget_upstream(&name);
                    plan.added.retain(|n| *n != name);
                    plan.changed.retain(|n| *n != name);
                    tracing::error!(upstream = %name, error = %e, "Cannot start the upstream's delivery; it stays stopped until the next reload or restart.");
                    failed.push(format!(
                        "upstreams.{name} is not delivering: its stored state cannot be read ({e}); reload again or restart"
                    ));
                }
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(failed.join("; "))
        }
    }

    /// Starts one upstream's worker from its stored state.
    async fn launch(&self, start: Start) -> Result<Running, StoreError> {
        let Start {
            name,
            cfg,
            sink,
            fingerprint,
        } = start;
        let store = &self.store;
        // A database that is briefly busy does not leave the upstream stopped.
        let mut tries = 0;
        let (state, range_open) = loop {
            let read = async {
                let state = store.upstream_state(&name).await?;
                let open = !store.list_range_replays(&name, true).await?.is_empty();
                Ok::<_, StoreError>((state, open))
            };
            match read.await {
                Ok(v) => break v,
                Err(e) if tries >= 4 || matches!(e, StoreError::ShuttingDown) => return Err(e),
                Err(_) => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250 << tries)).await;
                }
            }
        };
        let (stop, stop_rx) = watch::channel(false);
        let (control, _) = watch::channel(0);
        // One writer per upstream keeps its cursor writes in order; its queue bounds how
        // far the stored cursor may trail the sends (and so the re-sends after a crash).
        let (cursor_writes, pending_writes) = tokio::sync::mpsc::channel::<RelayWrite>(2);
        let worker = Arc::new(Worker {
            name: name.clone(),
            sink,
            store: store.clone(),
            keys: self.keys.clone(),
            clock: self.clock.clone(),
            cursor: AtomicU64::new(state.cursor),
            case_cursor: AtomicU64::new(state.case_cursor),
            update_cursor: AtomicU64::new(state.update_cursor),
            stored_cursor: watch::channel(state.cursor).0,
            paused: AtomicBool::new(state.paused),
            control,
            counters: Mutex::new(Counters::default()),
            records: RateLimiter::direct(quota(cfg.records_per_sec, cfg.records_burst)),
            requests: RateLimiter::direct(quota(cfg.requests_per_sec, cfg.requests_burst)),
            jitter_state: AtomicU64::new(self.clock.now_micros() as u64 | 1),
            cursor_writes,
            // On a store of its own, the lease never runs out.
            lease: watch::channel((!store.shared()).then(|| Instant::now() + FOREVER)).0,
            pause_changes: AtomicU64::new(0),
            pause_lock: Mutex::new(()),
            attempt_log: self.attempt_log.clone(),
            metrics: self.metrics.clone(),
            range_open: AtomicU64::new(u64::from(range_open)),
            cfg,
        });
        let cursor_task = tokio::spawn(write_cursors(
            worker.clone(),
            pending_writes,
            stop_rx.clone(),
        ));
        let report_task = self
            .log
            .clone()
            .map(|log| tokio::spawn(report_heads(worker.clone(), log, stop_rx.clone())));
        let run_task = tokio::spawn(worker.clone().run(stop_rx));
        let lease = store.shared().then(|| {
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(worker.clone().keep_lease(self.lease.clone(), stop_rx));
            (stop, task)
        });
        Ok(Running {
            worker,
            fingerprint,
            stop,
            run_task,
            report_task,
            cursor_task,
            lease,
        })
    }

    fn worker(&self, name: &str) -> Result<Arc<Worker>, RelayError> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| RelayError::UnknownUpstream(name.to_owned()))
    }

    /// The upstreams delivered to now.
    pub fn names(&self) -> Vec<String> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub async fn status(&self, name: &str) -> Result<UpstreamStatus, RelayError> {
        let w = self.worker(name)?;
        let head = *w.store.feed_head().borrow();
        // The stored cursor, on every instance: it is what survives a crash and what every
        // instance agrees on (an instance that does not deliver has only a stale copy in
        // memory, and the one that does may have sent batches whose advance is not stored
        // yet). Its dead letters are stored with it, in the same commit.
        // While the database cannot be read, the copy in memory (and the error) is all there
        // is: shown rather than nothing, when an operator needs it most.
        let mut unreadable: Option<String> = None;
        let cursor = match w.store.upstream_state(name).await {
            Ok(state) => state.cursor,
            Err(e) => {
                if let Some(suppressed) =
                    crate::telemetry::throttle_for("relay.status_cursor", name)
                {
                    tracing::warn!(upstream = name, error = %e, suppressed, "Cannot read the stored cursor; showing this instance's copy.");
                }
                unreadable = Some(e.to_string());
                w.cursor.load(Ordering::Acquire)
            }
        };
        let lag_records = head.saturating_sub(cursor);
        // Each further read is optional: with the database unreadable, what this instance
        // knows is shown, and the last error says the rest could not be read.
        let lag_seconds = if lag_records > 0 && unreadable.is_none() {
            match w.store.received_at(cursor + 1).await {
                Ok(Some(at)) => ((w.clock.now_micros() - at).max(0) as f64) / 1e6,
                Ok(None) => 0.0,
                Err(e) => {
                    unreadable = Some(e.to_string());
                    0.0
                }
            }
        } else {
            0.0
        };
        let counters = w.lock().clone();
        // Holding the lease (a renewal under way may have stopped the sends for a moment).
        let delivering_here = w.lease.borrow().is_some();
        let delivering_instance = if !w.store.shared() || delivering_here {
            Some(self.lease.holder.clone())
        } else if unreadable.is_none() {
            w.store.lease_holder(name).await.unwrap_or_else(|e| {
                unreadable = Some(e.to_string());
                None
            })
        } else {
            None
        };
        let open_dead_letters = if unreadable.is_none() {
            w.store
                .count_open_dead_letters(name)
                .await
                .unwrap_or_else(|e| {
                    unreadable = Some(e.to_string());
                    0
                })
        } else {
            0
        };
        // A cursor that cannot be stored is the error that matters most; then the database
        // that cannot be read for this status; then the last delivery error.
        let state_read = unreadable.is_none();
        let last_error = counters
            .cursor_error
            .clone()
            .or_else(|| {
                unreadable.map(|e| {
                    (
                        format!(
                            "the database cannot be read ({e}): cursor and lag from this \
                             instance's memory, dead letters and lease holder unknown"
                        ),
                        w.clock.now_micros(),
                    )
                })
            })
            .or(counters.last_error);
        Ok(UpstreamStatus {
            name: w.name.clone(),
            kind: w.cfg.kind,
            endpoint: w.cfg.endpoint.clone(),
            cursor,
            head,
            lag_records,
            lag_seconds,
            open_dead_letters,
            last_error,
            attempts: counters.attempts,
            failures: counters.failures,
            delivered: counters.delivered,
            paused: w.paused.load(Ordering::Acquire),
            delivering_instance,
            delivering_here,
            stored_state_read: state_read,
        })
    }

    /// Pauses or resumes delivery; the state is stored and survives restarts.
    pub async fn set_paused(&self, name: &str, paused: bool) -> Result<(), RelayError> {
        let _replacing = self.replacing.read().await;
        let w = self.worker(name)?;
        w.store
            .relay_write(RelayWrite::SetPaused {
                upstream: name.to_owned(),
                paused,
            })
            .await?;
        {
            let _guard = w.pause_lock.lock().unwrap_or_else(|p| p.into_inner());
            w.pause_changes.fetch_add(1, Ordering::AcqRel);
            w.paused.store(paused, Ordering::Release);
        }
        w.control.send_modify(|v| *v += 1);
        tracing::info!(
            upstream = name,
            paused,
            "Upstream delivery paused/resumed by an operator."
        );
        Ok(())
    }

    /// Queues dead letters (these ids, or all open ones) for another delivery.
    pub async fn replay(&self, name: &str, ids: Option<Vec<u64>>) -> Result<u64, RelayError> {
        let _replacing = self.replacing.read().await;
        let w = self.worker(name)?;
        let n = w
            .store
            .relay_write(RelayWrite::RequestReplay {
                upstream: name.to_owned(),
                ids,
            })
            .await?;
        w.control.send_modify(|v| *v += 1);
        tracing::info!(
            upstream = name,
            requested = n,
            "Dead-letter replay requested."
        );
        Ok(n)
    }

    /// Asks for an upstream's feed positions `from_seq..=to_seq` to be sent again, recorded
    /// with who asked and why.
    pub async fn replay_range(
        &self,
        name: &str,
        from_seq: u64,
        to_seq: u64,
        requested_by: &str,
        reason: &str,
    ) -> Result<RangeReplay, RelayError> {
        let _replacing = self.replacing.read().await;
        let w = self.worker(name)?;
        let id = w
            .store
            .relay_write(RelayWrite::RequestRange {
                upstream: name.to_owned(),
                from_seq,
                to_seq,
                requested_by: requested_by.to_owned(),
                reason: reason.to_owned(),
            })
            .await?;
        w.range_open.fetch_add(1, Ordering::AcqRel);
        w.control.send_modify(|v| *v += 1);
        tracing::info!(
            upstream = name,
            principal = requested_by,
            replay = id,
            from_seq,
            to_seq,
            "Range replay requested."
        );
        let replay = w
            .store
            .list_range_replays(name, false)
            .await?
            .into_iter()
            .find(|r| r.id == id)
            .ok_or_else(|| {
                RelayError::Store(StoreError::Corrupt(format!("replay {id} not found")))
            })?;
        Ok(replay)
    }

    /// Stops a range replay where it is (it counts as done); `false` when it was done.
    pub async fn cancel_range_replay(
        &self,
        name: &str,
        id: u64,
        by: &str,
    ) -> Result<bool, RelayError> {
        let _replacing = self.replacing.read().await;
        let w = self.worker(name)?;
        let n = w
            .store
            .relay_write(RelayWrite::CancelRange {
                id,
                upstream: name.to_owned(),
            })
            .await?;
        w.control.send_modify(|v| *v += 1);
        if n > 0 {
            tracing::info!(
                upstream = name,
                principal = by,
                replay = id,
                "Range replay cancelled."
            );
        }
        Ok(n > 0)
    }

    /// The logged attempts of an upstream, newest first.
    pub async fn attempts(
        &self,
        name: &str,
        before_id: u64,
        limit: u32,
    ) -> Result<Vec<AttemptRecord>, RelayError> {
        let w = self.worker(name)?;
        Ok(w.store.list_attempts(name, before_id, limit).await?)
    }

    /// The range replays of an upstream, oldest first.
    pub async fn range_replays(&self, name: &str) -> Result<Vec<RangeReplay>, RelayError> {
        let w = self.worker(name)?;
        Ok(w.store.list_range_replays(name, false).await?)
    }

    /// Stops every worker; a batch in flight is abandoned (its cursor is not advanced, so it
    /// is sent again after the restart).
    pub async fn shutdown(&self, grace: Duration) {
        let mut running = self.running.lock().await;
        self.stopped.store(true, Ordering::Release);
        let running = std::mem::take(&mut *running);
        let _ = self.stop.send(true);
        // Each worker's loop first; then its queued cursor writes are stored; then its lease
        // is given up.
        futures_util::future::join_all(running.into_values().map(|r| r.stop(grace))).await;
        if let Some(mut t) = self.log_task.lock().await.take()
            && tokio::time::timeout(grace, &mut t).await.is_err()
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    /// "Retries with backoff and jitter": pauses spread over the whole band around the
    /// schedule's value, never outside it; without jitter, exactly the schedule.
    #[test]
    fn retry_pauses_spread_within_the_jitter_band() {
        let state = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
        let pauses: Vec<u64> = (0..1000)
            .map(|_| jittered(1000, 0.2, &state).as_millis() as u64)
            .collect();
        assert!(
            pauses.iter().all(|p| (800..=1200).contains(p)),
            "{pauses:?}"
        );
        assert!(*pauses.iter().min().unwrap() < 850, "spread to the low end");
        assert!(
            *pauses.iter().max().unwrap() > 1150,
            "spread to the high end"
        );
        let distinct: std::collections::HashSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 100, "not one value: {}", distinct.len());
        assert!((0..100).all(|_| jittered(1000, 0.0, &state) == Duration::from_millis(1000)));
        assert_eq!(
            jittered(0, 0.2, &state),
            Duration::from_millis(1),
            "never 0"
        );
    }
}

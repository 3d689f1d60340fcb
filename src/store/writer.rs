//! The group-commit writer every backend shares: callers queue jobs; one task drains whatever
//! is queued into one transaction, commits it, and only then answers each caller. A failed
//! commit acknowledges nothing. The backend writes the group ([`GroupWrite`]); this module
//! owns the queue, the batching and the replies.
//!
//! The writer runs on a thread of its own, with a single-threaded tokio runtime. As a task
//! among the gRPC handlers on the server's two workers, it could wait its turn behind them
//! after every database round trip; on its own thread unary ingest gained about 6 % in
//! paired probes (docs/benchmarks.md, 2026-11-22, 1f6fb52). Each round trip to SQLite's thread now
//! ends in a wake-up between threads, so the backends write many rows with one statement
//! (ratings, audit records, dead letters); case events still take a few statements each.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;

use super::{CaseOutcome, InsertOutcome, NewCaseEvent, NewRating, RelayWrite, StoreError};

pub(crate) enum Job {
    Ratings {
        items: Vec<NewRating>,
        reply: oneshot::Sender<Result<Vec<InsertOutcome>, StoreError>>,
    },
    Cases {
        items: Vec<NewCaseEvent>,
        reply: oneshot::Sender<Result<Vec<CaseOutcome>, StoreError>>,
    },
    Audit {
        principal: String,
        rpc: String,
        hub_ids: Vec<Uuid>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Relay {
        write: RelayWrite,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Close {
        reply: oneshot::Sender<()>,
    },
}

impl Job {
    fn len(&self) -> usize {
        match self {
            Job::Ratings { items, .. } => items.len(),
            Job::Cases { items, .. } => items.len(),
            Job::Audit { hub_ids, .. } => hub_ids.len(),
            Job::Relay { .. } => 1,
            Job::Close { .. } => 0,
        }
    }

    /// Whether the job commits in a group of its own.
    fn alone(&self) -> bool {
        matches!(
            self,
            Job::Relay {
                write: RelayWrite::Evidence { .. } | RelayWrite::Probe,
                ..
            }
        )
    }
}

/// What one job of a committed group produced, in job order.
pub(crate) enum GroupResult {
    Ratings(Vec<InsertOutcome>),
    Cases(Vec<CaseOutcome>),
    Audit,
    Relay(u64),
}

/// A backend's side of the writer.
pub(crate) trait GroupWrite: Send + 'static {
    /// Writes every job of `group` in one transaction and commits it. Returns one result per
    /// job (none for `Close`), and the feed head after the commit when it moved. On an error
    /// nothing was committed, and the backend has given back any sequence numbers it took.
    fn write_group(
        &mut self,
        group: &[Job],
    ) -> impl Future<Output = Result<(Vec<GroupResult>, Option<u64>), sqlx::Error>> + Send;

    /// Closes the write connection.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// The callers' end of the queue.
pub(crate) struct Queue {
    jobs: mpsc::Sender<Job>,
    health: Arc<WriterHealth>,
}

/// Resolves when the writer thread has finished (closed its connection), or died.
pub(crate) struct Stopped(oneshot::Receiver<()>);

impl Queue {
    /// Starts the writer thread; `head` is told the feed head after every commit that moved
    /// it.
    pub fn start<W: GroupWrite>(
        backend: W,
        head: watch::Sender<u64>,
        max_group: usize,
        queue: usize,
    ) -> std::io::Result<(Self, Stopped)> {
        let (jobs, rx) = mpsc::channel(queue.max(1));
        let (done, stopped) = oneshot::channel();
        let health = Arc::new(WriterHealth::default());
        let writer_health = health.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("rating-writer".into())
            .spawn(move || {
                runtime.block_on(run(backend, rx, head, writer_health, max_group.max(1)));
                let _ = done.send(());
            })?;
        Ok((Self { jobs, health }, Stopped(stopped)))
    }

    /// The writer's commit histograms (the metrics registry shows them).
    pub fn metrics(&self) -> WriterMetrics {
        self.health.metrics.clone()
    }

    /// Queues a job and waits for its commit.
    pub async fn submit<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Job,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(make(reply))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    /// Queues ratings for the next group commit (nothing to do for none).
    pub async fn ratings(&self, items: Vec<NewRating>) -> Result<Vec<InsertOutcome>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Job::Ratings { items, reply }).await
    }

    /// Queues case events for the next group commit (nothing to do for none).
    pub async fn cases(&self, items: Vec<NewCaseEvent>) -> Result<Vec<CaseOutcome>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|reply| Job::Cases { items, reply }).await
    }

    /// Queues a personal-data audit record (nothing to do for no ratings).
    pub async fn audit(
        &self,
        principal: &str,
        rpc: &str,
        hub_ids: &[Uuid],
    ) -> Result<(), StoreError> {
        if hub_ids.is_empty() {
            return Ok(());
        }
        let (principal, rpc, hub_ids) = (principal.to_owned(), rpc.to_owned(), hub_ids.to_vec());
        self.submit(|reply| Job::Audit {
            principal,
            rpc,
            hub_ids,
            reply,
        })
        .await
    }

    /// Queues a relay bookkeeping write.
    pub async fn relay(&self, write: RelayWrite) -> Result<u64, StoreError> {
        self.submit(|reply| Job::Relay { write, reply }).await
    }

    /// Whether commits fail for a storage reason: then a probe write tells whether they
    /// succeed again (`Err` with the cause while they do not).
    pub async fn check_storage(&self) -> Result<(), StoreError> {
        if self.health.failing().is_none() {
            return Ok(());
        }
        self.relay(RelayWrite::Probe).await.map(|_| ())
    }

    /// Lets the queued jobs commit, then stops the writer.
    pub async fn close(&self, stopped: Stopped) {
        let (reply, done) = oneshot::channel();
        if self.jobs.send(Job::Close { reply }).await.is_ok() {
            let _ = done.await;
        }
        let _ = stopped.0.await;
    }
}

async fn run<W: GroupWrite>(
    mut backend: W,
    mut rx: mpsc::Receiver<Job>,
    head: watch::Sender<u64>,
    health: Arc<WriterHealth>,
    max_group: usize,
) {
    let mut closing: Option<oneshot::Sender<()>> = None;
    // A job that must commit alone, taken from the queue while a group was filling.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut group = Vec::new();
        let mut size = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Close { reply } => {
                    // Refuse new work; what is already queued still commits.
                    rx.close();
                    closing = Some(reply);
                }
                // A large write (an evidence file, the health probe's pad) commits in a group
                // of its own: its size neither delays the ratings' acknowledgements nor, on a
                // disk too full for it, fails them with it.
                job if job.alone() && !group.is_empty() => {
                    carried = Some(job);
                    break;
                }
                job => {
                    let alone = job.alone();
                    size += job.len();
                    group.push(job);
                    if alone {
                        break;
                    }
                }
            }
            if size < max_group {
                next = rx.try_recv().ok();
            }
        }
        if !group.is_empty() {
            commit_group(&mut backend, &head, &health, group).await;
        }
    }
    backend.close().await;
    if let Some(reply) = closing {
        let _ = reply.send(());
    }
}

async fn commit_group<W: GroupWrite>(
    backend: &mut W,
    head: &watch::Sender<u64>,
    health: &WriterHealth,
    group: Vec<Job>,
) {
    let started = std::time::Instant::now();
    let written = backend.write_group(&group).await;
    // Failed commits too: a stall that ends in an error is a stall.
    health
        .metrics
        .commit_seconds
        .observe(started.elapsed().as_secs_f64());
    match written {
        Ok((results, new_head)) => {
            health
                .metrics
                .group_items
                .observe(group.iter().map(Job::len).sum::<usize>() as f64);
            tracing::debug!(
                jobs = group.len(),
                items = group.iter().map(Job::len).sum::<usize>(),
                micros = started.elapsed().as_micros() as u64,
                "Group committed."
            );
            health.committed();
            if let Some(h) = new_head {
                advance_head(head, h);
            }
            for (job, result) in group.into_iter().zip(results) {
                match (job, result) {
                    (Job::Ratings { reply, .. }, GroupResult::Ratings(r)) => {
                        let _ = reply.send(Ok(r));
                    }
                    (Job::Cases { reply, .. }, GroupResult::Cases(r)) => {
                        let _ = reply.send(Ok(r));
                    }
                    (Job::Audit { reply, .. }, GroupResult::Audit) => {
                        let _ = reply.send(Ok(()));
                    }
                    (Job::Relay { reply, .. }, GroupResult::Relay(n)) => {
                        let _ = reply.send(Ok(n));
                    }
                    _ => unreachable!("results are built in job order"),
                }
            }
        }
        Err(e) => {
            let error = StoreError::from_failed_commit(&e);
            if group.len() > 1 && StoreError::is_refusal(&e) {
                // The database refused something in the group (a constraint, a value it
                // cannot store): nothing of it committed. Each job is tried again on its
                // own, so only the job at fault fails and every other caller is answered
                // as if it had been alone.
                tracing::debug!(error = %e, jobs = group.len(), "Group refused; committing its jobs one by one.");
                for job in group {
                    Box::pin(commit_group(backend, head, health, vec![job])).await;
                }
                return;
            }
            if let StoreError::Storage(cause) = &error {
                health.failed(cause);
            }
            let items: usize = group.iter().map(Job::len).sum();
            let kind = match &error {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Storage(_) => "storage",
                StoreError::Refused(_) => "refused",
                _ => "other",
            };
            if let Some(suppressed) = crate::telemetry::throttle_for("writer.commit_failed", kind) {
                tracing::error!(error = %error, items, suppressed, "Group commit failed; nothing of it was acknowledged.");
            }
            for job in group {
                let err = error.clone_for_caller();
                match job {
                    Job::Ratings { reply, .. } => {
                        let _ = reply.send(Err(err));
                    }
                    Job::Cases { reply, .. } => {
                        let _ = reply.send(Err(err));
                    }
                    Job::Audit { reply, .. } => {
                        let _ = reply.send(Err(err));
                    }
                    Job::Relay { reply, .. } => {
                        let _ = reply.send(Err(err));
                    }
                    Job::Close { .. } => {}
                }
            }
        }
    }
}

/// Whether commits fail for a reason of the storage itself (a full disk, a read-only file
/// system, an I/O error): health reports NOT_SERVING while they do, so a load balancer
/// sends calls elsewhere; the next commit that succeeds (a health probe, if nothing else)
/// clears it.
#[derive(Debug, Default)]
pub(crate) struct WriterHealth {
    failing: std::sync::Mutex<Option<String>>,
    metrics: WriterMetrics,
}

/// How the writer commits, for the metrics: items (ratings, 办件 events, audit records, relay
/// writes) per group commit, and each commit's time. Shared with the metrics registry.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    pub group_items: prometheus_client::metrics::histogram::Histogram,
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Default for WriterMetrics {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        Self {
            // 1, 2, 4 … 8192: a lone write to the largest groups (a group may pass
            // max_group_commit by one batch).
            group_items: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            // 0.25 ms … about 33 s, so stalls show as what they are.
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 18)),
        }
    }
}

impl WriterHealth {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.failing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn committed(&self) {
        if let Some(cause) = self.lock().take() {
            tracing::warn!(was = %cause, "Commits succeed again.");
        }
    }

    fn failed(&self, cause: &str) {
        let mut failing = self.lock();
        if failing.is_none() {
            tracing::error!(
                cause,
                "Commits fail for a storage reason; health is NOT_SERVING until one succeeds."
            );
        }
        *failing = Some(cause.to_owned());
    }

    /// Why the last commit failed, while commits fail for a storage reason.
    pub fn failing(&self) -> Option<String> {
        self.lock().clone()
    }
}

/// Moves the feed head forward to `h` (never back: another instance's notification may
/// already have moved it further), waking its watchers only when it moved.
pub(crate) fn advance_head(head: &watch::Sender<u64>, h: u64) {
    head.send_if_modified(|v| {
        let moved = h > *v;
        *v = (*v).max(h);
        moved
    });
}

/// The ratings of a group, in job order.
pub(crate) fn all_ratings(group: &[Job]) -> Vec<&NewRating> {
    group
        .iter()
        .filter_map(|j| match j {
            Job::Ratings { items, .. } => Some(items.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the size of each group it commits.
    struct Groups(std::sync::Arc<std::sync::Mutex<Vec<Vec<&'static str>>>>);

    impl GroupWrite for Groups {
        async fn write_group(
            &mut self,
            group: &[Job],
        ) -> Result<(Vec<GroupResult>, Option<u64>), sqlx::Error> {
            let kinds = group
                .iter()
                .map(|j| match j {
                    Job::Relay {
                        write: RelayWrite::Probe,
                        ..
                    } => "probe",
                    Job::Relay { .. } => "relay",
                    _ => "audit",
                })
                .collect();
            self.0.lock().unwrap().push(kinds);
            Ok((
                group
                    .iter()
                    .map(|j| match j {
                        Job::Relay { .. } => GroupResult::Relay(1),
                        _ => GroupResult::Audit,
                    })
                    .collect(),
                None,
            ))
        }

        async fn close(self) {}
    }

    /// A large write (here the health probe's pad; an evidence file alike) is committed in a
    /// group of its own, never with the calls queued before or after it.
    #[tokio::test]
    async fn a_large_write_commits_in_a_group_of_its_own() {
        let (tx, rx) = mpsc::channel(16);
        let audit = || {
            let (reply, _) = oneshot::channel();
            Job::Audit {
                principal: "p".into(),
                rpc: "GetRating".into(),
                hub_ids: vec![Uuid::nil()],
                reply,
            }
        };
        let probe = || {
            let (reply, _) = oneshot::channel();
            Job::Relay {
                write: RelayWrite::Probe,
                reply,
            }
        };
        for job in [audit(), audit(), probe(), audit(), audit()] {
            tx.send(job).await.unwrap();
        }
        drop(tx);
        let groups = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (head, _) = watch::channel(0);
        run(
            Groups(groups.clone()),
            rx,
            head,
            Arc::new(WriterHealth::default()),
            100,
        )
        .await;
        assert_eq!(
            *groups.lock().unwrap(),
            [
                vec!["audit", "audit"],
                vec!["probe"],
                vec!["audit", "audit"]
            ]
        );
    }
}

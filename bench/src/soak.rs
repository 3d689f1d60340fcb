//! `rating-bench soak`: the kill -9 loop. The hub (its release binary) runs under load with a
//! relaying upstream, is killed with SIGKILL at a different moment each cycle, and is started
//! again on the same storage; once, its disk fills up for a while. At the end every rating the
//! hub acknowledged must be stored exactly once, and every stored rating must have reached the
//! upstream.
//!
//! - storage on a small file system of its own (tmpfs: the run needs root), so the disk can
//!   really fill: SQLite's file, or a throwaway PostgreSQL server's data directory
//!   (`scripts/pg`);
//! - load: `--writers` callers each submitting batches of new ratings (unique source keys,
//!   never retried: a failed call's ratings are simply not acknowledged);
//! - the upstream: the in-process sink, which records every hub id it receives;
//! - counted: acknowledged (the hub answered ACCEPTED), stored (read back through
//!   `SyncService.Pull` after the last restart), delivered (received by the sink).
//!
//! Exits non-zero when an acknowledged rating is not stored, a stored rating was not delivered,
//! or a source key is stored twice. Writes a Markdown report (`--out`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::admin_service_client::AdminServiceClient;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rating_hub::pb::v1::sync_service_client::SyncServiceClient;
use tonic::transport::Channel;

use crate::{Child, channels, now_micros, org, rating, spawn_hub, start_sink};

/// What to run.
pub struct SoakPlan {
    pub hub_bin: PathBuf,
    pub postgres: bool,
    pub cycles: u32,
    pub writers: usize,
    /// The cycle during which the disk fills (0: never).
    pub fill_at: u32,
    pub disk_mb: u32,
    pub out: Option<PathBuf>,
}

/// A tmpfs of the run's own, unmounted when dropped.
struct Disk(PathBuf);

impl Disk {
    fn mount(dir: &Path, mb: u32) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0777"),
                "tmpfs",
            ])
            .arg(dir)
            .status()?
            .success();
        anyhow::ensure!(
            ok,
            "cannot mount a tmpfs at {} (the soak runs as root)",
            dir.display()
        );
        Ok(Self(dir.to_owned()))
    }

    /// Fills the file system with one file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        if let Ok(mut f) = std::fs::File::create(&path) {
            let block = vec![0u8; 1 << 20];
            while f.write_all(&block).is_ok() {}
            while f.write_all(&[0u8; 4096]).is_ok() {}
            let _ = f.sync_all();
        }
        path
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A PostgreSQL server of the run's own, stopped when dropped.
struct PgServer(PathBuf);

impl PgServer {
    fn start(dir: &Path) -> anyhow::Result<(Self, String)> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg");
        // --watch: the server stops by itself once this process has gone (a Ctrl-C runs no
        // Drop).
        let out = std::process::Command::new(script)
            .arg("start")
            .arg(dir)
            .arg("--watch")
            .arg(std::process::id().to_string())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "scripts/pg start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout)?.trim().to_owned();
        Ok((Self(dir.to_owned()), url))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg");
        let _ = std::process::Command::new(script)
            .arg("stop")
            .arg(&self.0)
            .output();
    }
}

/// What the load generator saw.
#[derive(Default)]
struct Seen {
    /// hub id → source key, of every rating the hub acknowledged as ACCEPTED.
    /// Source key (as sent) → the hub id it was acknowledged with.
    acked: Mutex<HashMap<String, String>>,
    /// Source keys of calls the hub itself refused saying nothing was acknowledged (a full
    /// disk, a lost database): none of them may be stored.
    refused: Mutex<Vec<String>>,
    /// Answers the run does not expect (a status other than UNAVAILABLE or a broken
    /// connection, a result missing from a batch's answer): any one fails the run.
    unexpected: Mutex<Vec<String>>,
    calls: AtomicU64,
    failed_calls: AtomicU64,
}

async fn load(channel: Channel, writer: usize, cycle: u32, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut client = IngestServiceClient::new(channel);
    let org = org();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = now_micros();
        let tag = format!("soak-c{cycle}-w{writer}");
        let batch: Vec<pb::Rating> = (0..10)
            .map(|_| {
                n += 1;
                rating(&tag, n, &org, now)
            })
            .collect();
        seen.calls.fetch_add(1, Ordering::Relaxed);
        match client
            .submit_ratings(pb::SubmitRatingsRequest {
                ratings: batch.clone(),
            })
            .await
        {
            Ok(resp) => {
                let results = resp.into_inner().results;
                if results.len() != batch.len() {
                    seen.unexpected.lock().unwrap().push(format!(
                        "{} results for {} ratings",
                        results.len(),
                        batch.len()
                    ));
                }
                let mut acked = seen.acked.lock().unwrap();
                let mut indices = HashSet::new();
                for r in results {
                    let outcome = pb::Outcome::try_from(r.outcome).unwrap_or_default();
                    match batch.get(r.index as usize) {
                        // Keyed by what the soak sent, not by the hub's answer: a repeated index
                        // or a key acknowledged twice is reported, not merged.
                        Some(sent)
                            if outcome == pb::Outcome::Accepted
                                && indices.insert(r.index)
                                && !acked.contains_key(&sent.source_key) =>
                        {
                            acked.insert(sent.source_key.clone(), r.hub_id);
                        }
                        _ => seen
                            .unexpected
                            .lock()
                            .unwrap()
                            .push(format!("a new rating answered {outcome:?}: {r:?}")),
                    }
                }
            }
            Err(status) => {
                seen.failed_calls.fetch_add(1, Ordering::Relaxed);
                // Only a hub that is down, restarting or out of disk may fail a call here: any
                // other code (INTERNAL "the database refused the write" included) is a fault
                // the run reports, whatever its message says.
                if !matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) {
                    seen.unexpected.lock().unwrap().push(format!(
                        "{:?}: {}",
                        status.code(),
                        status.message()
                    ));
                }
                if status.message().contains("nothing was acknowledged") {
                    // The hub's own answer: none of these may be stored.
                    seen.refused
                        .lock()
                        .unwrap()
                        .extend(batch.iter().map(|r| r.source_key.clone()));
                }
                // The hub is down, restarting or its disk is full: not acknowledged.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Every rating stored, read page by page: hub id → source key.
async fn stored(channel: Channel) -> anyhow::Result<Vec<(String, String)>> {
    let mut sync = SyncServiceClient::new(channel);
    let mut after = 0;
    let mut out = Vec::new();
    loop {
        let page = sync
            .pull(pb::PullRequest {
                after_sequence: after,
                limit: 1000,
            })
            .await?
            .into_inner();
        for r in &page.ratings {
            out.push((r.hub_id.clone(), r.source_key.clone()));
        }
        if page.ratings.is_empty() && page.next_after_sequence >= page.head_sequence {
            return Ok(out);
        }
        anyhow::ensure!(
            page.next_after_sequence > after,
            "a pull page did not advance (after {after}, head {})",
            page.head_sequence
        );
        after = page.next_after_sequence;
    }
}

/// Waits until the upstream's stored cursor is at the head.
async fn caught_up(channel: Channel, limit: Duration) -> anyhow::Result<()> {
    let mut admin = AdminServiceClient::new(channel);
    let end = Instant::now() + limit;
    loop {
        let st = admin
            .list_upstreams(pb::ListUpstreamsRequest {})
            .await?
            .into_inner()
            .upstreams;
        if st.iter().all(|u| u.lag_records == 0) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < end, "the relay did not catch up: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A pseudo-random delay for cycle `n`, 800–2,800 ms: the kill lands somewhere else each time.
fn kill_after(n: u32) -> Duration {
    let x = (u64::from(n) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
    Duration::from_millis(800 + x % 2000)
}

pub async fn soak(mut plan: SoakPlan) -> anyhow::Result<()> {
    plan.hub_bin = std::fs::canonicalize(&plan.hub_bin)
        .map_err(|e| anyhow::anyhow!("the hub binary {}: {e}", plan.hub_bin.display()))?;
    let work = std::env::temp_dir().join(format!("rating-soak-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let pki = work.join("pki");
    rating_hub::pki::init_dev(&pki)?;
    let disk = Disk::mount(&work.join("disk"), plan.disk_mb)?;
    let (pg, storage_url) = if plan.postgres {
        let (server, admin) = PgServer::start(&disk.0.join("pg"))?;
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(b, _)| b)
            .to_owned();
        (Some(server), format!("{base}/postgres"))
    } else {
        (None, disk.0.join("hub.db").display().to_string())
    };
    let (sink_url, sink) = start_sink().await?;
    let mut env: Vec<(&str, String)> = vec![
        ("RATING_HUB__STORAGE__URL", storage_url.clone()),
        // The soak fills the disk on purpose: commits, not health, are what it counts.
        ("RATING_HUB__STORAGE__MIN_FREE_MB", "0".into()),
        ("RATING_HUB__SERVER__HEALTH_CHECK_SECS", "1".into()),
    ];
    env.extend(crate::sink_env(&sink_url, 100, 2));
    let seen = Arc::new(Seen::default());
    let started = Instant::now();
    let mut full_failures = 0u64;
    let mut cycles_without_acks = Vec::new();
    for cycle in 1..=plan.cycles {
        let acked_before = seen.acked.lock().unwrap().len();
        let hub = spawn_hub(&plan.hub_bin, &work, "hub", &pki, &env).await?;
        let chans = channels(&pki, &hub.url, plan.writers).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = chans
            .into_iter()
            .enumerate()
            .map(|(w, ch)| tokio::spawn(load(ch, w, cycle, seen.clone(), stop.clone())))
            .collect();
        if cycle == plan.fill_at {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let before = seen.failed_calls.load(Ordering::Relaxed);
            let filler = disk.fill();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            full_failures = seen.failed_calls.load(Ordering::Relaxed) - before;
            let _ = std::fs::remove_file(filler);
        }
        tokio::time::sleep(kill_after(cycle)).await;
        kill(hub).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await?;
        }
        if seen.acked.lock().unwrap().len() == acked_before {
            cycles_without_acks.push(cycle);
        }
        eprintln!(
            "cycle {cycle}/{}: {} acknowledged so far, {} calls failed",
            plan.cycles,
            seen.acked.lock().unwrap().len(),
            seen.failed_calls.load(Ordering::Relaxed)
        );
    }
    // The last start: the relay catches up, and everything is read back.
    let hub = spawn_hub(&plan.hub_bin, &work, "hub", &pki, &env).await?;
    let ch = channels(&pki, &hub.url, 1).await?.remove(0);
    caught_up(ch.clone(), Duration::from_secs(300)).await?;
    let stored = stored(ch).await?;
    hub.stop().await;

    let acked = seen.acked.lock().unwrap().clone();
    let delivered: HashSet<String> = sink.received.lock().unwrap().keys().cloned().collect();
    let stored_ids: HashSet<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    let mut keys = HashSet::new();
    let doubled = stored
        .iter()
        .filter(|(_, k)| !keys.insert(k.as_str()))
        .count();
    // Lost: acknowledged, and not stored under that key with the acknowledged id.
    let stored_by_key: HashMap<&str, &str> = stored
        .iter()
        .map(|(id, k)| (k.as_str(), id.as_str()))
        .collect();
    let lost = acked
        .iter()
        .filter(|(k, id)| stored_by_key.get(k.as_str()) != Some(&id.as_str()))
        .count();
    let undelivered = stored_ids
        .iter()
        .filter(|id| !delivered.contains(**id))
        .count();
    let stored_keys: HashSet<&str> = stored.iter().map(|(_, k)| k.as_str()).collect();
    let refused = seen.refused.lock().unwrap().clone();
    let refused_but_stored = refused
        .iter()
        .filter(|k| stored_keys.contains(k.as_str()))
        .count();
    let unexpected = seen.unexpected.lock().unwrap().clone();
    let unacked_stored = stored_keys
        .iter()
        .filter(|k| !acked.contains_key(**k))
        .count();
    let report = format!(
        "| backend | cycles (kill -9) | disk filled | calls | failed calls | calls failed while full | acknowledged | stored | stored, not acknowledged (in flight at a kill) | refused by the hub | of them stored | delivered | lost | doubled | undelivered | minutes |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n\
         | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | **{}** | {} | **{}** | **{}** | **{}** | {:.1} |\n",
        if plan.postgres {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        plan.cycles,
        if plan.fill_at > 0 {
            format!("once (cycle {})", plan.fill_at)
        } else {
            "no".into()
        },
        seen.calls.load(Ordering::Relaxed),
        seen.failed_calls.load(Ordering::Relaxed),
        full_failures,
        acked.len(),
        stored.len(),
        unacked_stored,
        refused.len(),
        refused_but_stored,
        delivered.len(),
        lost,
        doubled,
        undelivered,
        started.elapsed().as_secs_f64() / 60.0,
    );
    println!("{report}");
    if let Some(out) = &plan.out {
        std::fs::write(out, &report)?;
    }
    // The server lives on the disk: stopped before it is unmounted (else `scripts/pg stop`
    // finds no data directory and the server keeps running on the detached mount).
    drop(pg);
    drop(disk);
    let _ = std::fs::remove_dir_all(&work);
    anyhow::ensure!(
        unexpected.is_empty(),
        "unexpected answers ({}), the first: {}",
        unexpected.len(),
        unexpected.first().map_or("", String::as_str)
    );
    anyhow::ensure!(
        cycles_without_acks.is_empty(),
        "nothing was acknowledged in cycles {cycles_without_acks:?}: the run tested nothing there"
    );
    anyhow::ensure!(lost == 0, "{lost} acknowledged ratings are not stored");
    anyhow::ensure!(
        refused_but_stored == 0,
        "{refused_but_stored} ratings the hub answered \"nothing was acknowledged\" are stored"
    );
    anyhow::ensure!(doubled == 0, "{doubled} source keys are stored twice");
    anyhow::ensure!(
        undelivered == 0,
        "{undelivered} stored ratings never reached the upstream"
    );
    anyhow::ensure!(
        plan.fill_at == 0 || full_failures > 0,
        "the disk filled but no call failed: the fill did not take"
    );
    Ok(())
}

/// SIGKILL, and wait for the process to be gone.
async fn kill(mut hub: Child) {
    let _ = hub.child.start_kill();
    let _ = hub.child.wait().await;
}

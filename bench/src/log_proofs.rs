//! The rating log at scale (#22): proof latency with 1 M ratings stored against the same
//! hub's with 10 k, and what the log costs on disk per rating. `rating-bench log-probe`.

use super::*;
use rating_hub::merkle::{Hash, HashAlg, verify_consistency, verify_inclusion};
use rating_hub::pb::v1::sync_service_client::SyncServiceClient;

/// Fills the hub to `total` ratings (8 callers, batches of 500), with a progress line.
async fn fill(ch: &[Channel], from: u64, total: u64) -> anyhow::Result<()> {
    let org = org();
    let next = Arc::new(AtomicU64::new(from));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut client = IngestServiceClient::new(ch[w % ch.len()].clone());
        let (org, next) = (org.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(500, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let now = now_micros();
                let ratings: Vec<_> = (first..(first + 500).min(total))
                    .map(|n| rating("log", n, &org, now))
                    .collect();
                let r = client
                    .submit_ratings(pb::SubmitRatingsRequest { ratings })
                    .await?;
                anyhow::ensure!(
                    r.into_inner()
                        .results
                        .iter()
                        .all(|x| x.outcome == pb::Outcome::Accepted as i32),
                    "not accepted"
                );
                if w == 0 && first % 100_000 < 500 {
                    eprintln!("… {first} ratings");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Latencies (ms) of `samples` inclusion proofs at random positions and as many consistency
/// proofs from random sizes, each verified against the signed head.
async fn proofs(ch: &Channel, samples: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, u64)> {
    let mut sync = SyncServiceClient::new(ch.clone());
    let head = sync
        .get_tree_head(pb::GetTreeHeadRequest { fresh: true })
        .await?
        .into_inner()
        .tree_head
        .ok_or_else(|| anyhow::anyhow!("no head"))?;
    let size = head.tree_size;
    let alg = HashAlg::parse(&head.hash_algorithm).ok_or_else(|| anyhow::anyhow!("hash"))?;
    let root: Hash = head
        .root_hash
        .clone()
        .try_into()
        .map_err(|_| anyhow::anyhow!("root"))?;
    let hashes = |v: &[Vec<u8>]| -> anyhow::Result<Vec<Hash>> {
        v.iter()
            .map(|h| h.clone().try_into().map_err(|_| anyhow::anyhow!("hash")))
            .collect()
    };
    // A fixed sequence of positions (xorshift), the same in every run.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut pick = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let (mut inclusion, mut consistency) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let seq = pick(size) + 1;
        let t = Instant::now();
        let p = sync
            .get_inclusion_proof(pb::GetInclusionProofRequest {
                leaf: Some(pb::get_inclusion_proof_request::Leaf::FeedSequence(seq)),
                tree_size: size,
            })
            .await?
            .into_inner();
        inclusion.push(t.elapsed().as_secs_f64() * 1000.0);
        let leaf: Hash = p
            .leaf_hash
            .clone()
            .try_into()
            .map_err(|_| anyhow::anyhow!("leaf"))?;
        anyhow::ensure!(
            verify_inclusion(alg, seq - 1, size, &leaf, &hashes(&p.audit_path)?, &root),
            "the inclusion proof of {seq} does not verify"
        );
        let first = pick(size - 1) + 1;
        let t = Instant::now();
        let c = sync
            .get_consistency_proof(pb::GetConsistencyProofRequest {
                first,
                second: size,
            })
            .await?
            .into_inner();
        consistency.push(t.elapsed().as_secs_f64() * 1000.0);
        let first_root: Hash = c
            .first_root
            .clone()
            .try_into()
            .map_err(|_| anyhow::anyhow!("root"))?;
        anyhow::ensure!(
            verify_consistency(alg, first, size, &first_root, &root, &hashes(&c.proof)?),
            "the consistency proof from {first} does not verify"
        );
    }
    inclusion.sort_by(f64::total_cmp);
    consistency.sort_by(f64::total_cmp);
    Ok((inclusion, consistency, size))
}

/// Bytes on disk by table and index (SQLite's dbstat), for a stopped hub's database.
async fn disk_use(db: &Path) -> anyhow::Result<Vec<(String, i64)>> {
    use sqlx::ConnectOptions;
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY SUM(pgsize) DESC",
    )
    .fetch_all(&mut conn)
    .await?;
    Ok(rows)
}

pub(crate) async fn log_probe(hub_bin: &Path, ratings: u64, samples: usize) -> anyhow::Result<()> {
    let hub_bin = &hub_bin.canonicalize()?;
    let work = std::env::temp_dir().join(format!("rating-bench-log-{}", std::process::id()));
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let hub = spawn_hub(hub_bin, &work, "hub", &pki, &[]).await?;
    let ch = channels(&pki, &hub.url, 4).await?;
    let small = 10_000.min(ratings);
    fill(&ch, 0, small).await?;
    let (inc_small, con_small, size_small) = proofs(&ch[0], samples).await?;
    let started = Instant::now();
    fill(&ch, small, ratings).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let (inc, con, size) = proofs(&ch[0], samples).await?;
    hub.stop().await;
    let db = work.join("hub").join("rating-hub.db");
    let disk = disk_use(&db).await?;
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "filled {} → {size} ratings in {fill_secs:.0} s ({:.0} ratings/s)",
        size_small,
        (size - size_small) as f64 / fill_secs
    );
    println!("| proofs ({samples} each, sequential, verified) | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (name, at, v) in [
        ("inclusion", size_small, &inc_small),
        ("consistency", size_small, &con_small),
        ("inclusion", size, &inc),
        ("consistency", size, &con),
    ] {
        println!(
            "| {name} at {at} ratings | {:.2} | {:.2} |",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    let total: i64 = disk.iter().map(|(_, b)| b).sum();
    println!("\n| table or index | bytes | bytes per rating |");
    println!("|---|---|---|");
    for (name, bytes) in &disk {
        if *bytes * 100 >= total {
            println!("| {name} | {bytes} | {:.0} |", *bytes as f64 / size as f64);
        }
    }
    println!(
        "| (whole file) | {total} | {:.0} |",
        total as f64 / size as f64
    );
    Ok(())
}

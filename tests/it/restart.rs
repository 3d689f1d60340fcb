use std::time::Duration;

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::fake_upstream::eventually;
use crate::ingest::count;
use crate::utils::*;

#[tokio::test]
async fn stop_and_restart_on_the_same_file_finds_everything() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let first: Vec<_> = submit(
        &mut ingest,
        (0..500).map(|i| rating(&format!("r{i}"))).collect(),
    )
    .await;
    let stopped = hub.stop().await;

    let hub = stopped.restart().await;
    assert_eq!(count(&hub).await, 500);
    let mut query = hub.query().await;
    for r in first.iter().step_by(50) {
        let got = query
            .get_rating(pb::GetRatingRequest {
                hub_id: r.hub_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap();
        assert_eq!(got.feed_sequence, r.feed_sequence);
    }
    // Idempotency and the feed carry on across the restart.
    let mut ingest = hub.ingest().await;
    let again = submit_one(&mut ingest, {
        let mut r = rating("r0");
        r.rated_at = query
            .get_rating(pb::GetRatingRequest {
                hub_id: first[0].hub_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap()
            .rated_at;
        r
    })
    .await;
    assert_eq!(outcome(&again), pb::Outcome::Duplicate);
    assert_eq!(again.hub_id, first[0].hub_id);
    let next = submit_one(&mut ingest, rating("after-restart")).await;
    assert_eq!(next.feed_sequence, 501, "feed continues without a gap");
    hub.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_lets_an_open_stream_finish_and_keeps_every_ack() {
    let hub = TestHub::start().await;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut ingest = hub.ingest().await;
    let mut acks = ingest
        .stream_ratings(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::StreamRatingsRequest {
        rating: Some(rating("g0")),
    })
    .await
    .unwrap();
    let first = acks.next().await.unwrap().unwrap().result.unwrap();
    assert_eq!(outcome(&first), pb::Outcome::Accepted);

    // Shutdown begins while the stream is open; the stream keeps working until it ends.
    let endpoint = hub.endpoint(Some(&hub.client_files("tester")));
    let (running, restart) = hub.split_for_shutdown();
    let stopping = tokio::spawn(running.shutdown());
    // "Stops accepting calls": a new call on a new connection is refused from the moment
    // the shutdown reaches the listener (tried until then, bounded), and what it carried
    // is not stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut taken = 0;
    let refused_key = loop {
        let key = format!("late-{taken}");
        let attempt = async {
            let channel = endpoint.clone().connect().await?;
            IngestServiceClient::new(channel)
                .submit_ratings(pb::SubmitRatingsRequest {
                    ratings: vec![rating(&key)],
                })
                .await
                .map_err(anyhow::Error::from)
        };
        match attempt.await {
            Ok(_) => taken += 1,
            Err(_) => break key,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new calls still accepted 30 s into the shutdown"
        );
    };
    for i in 1..200 {
        tx.send(pb::StreamRatingsRequest {
            rating: Some(rating(&format!("g{i}"))),
        })
        .await
        .unwrap();
    }
    drop(tx);
    let mut acked = 1;
    while let Some(ack) = acks.next().await {
        assert_eq!(
            outcome(&ack.unwrap().result.unwrap()),
            pb::Outcome::Accepted
        );
        acked += 1;
    }
    assert_eq!(acked, 200);
    stopping.await.unwrap().unwrap();

    let hub = restart.restart().await;
    assert_eq!(count(&hub).await, 200 + taken);
    // Sent again now: new to the hub (a stored one would come back DUPLICATE).
    let again = submit_one(&mut hub.ingest().await, rating(&refused_key)).await;
    let refused = outcome(&again) != pb::Outcome::Accepted;
    assert!(!refused, "the refused call's rating is not stored");
    hub.stop().await;
}

#[tokio::test]
async fn shutdown_turns_health_to_not_serving_and_ends_health_watches() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus::{NotServing, Serving};
    use tonic_health::pb::health_client::HealthClient;

    // A grace far longer than the test may take: a watch left open would hold the shutdown.
    let hub = HubBuilder::new()
        .set("server.shutdown_grace_secs", "3600")
        .start()
        .await;
    let mut health = HealthClient::new(hub.channel_as("tester").await);
    let mut watches = Vec::new();
    for service in ["", "ratinghub.v1.IngestService"] {
        watches.push(
            health
                .watch(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner(),
        );
    }
    for w in &mut watches {
        assert_eq!(w.next().await.unwrap().unwrap().status(), Serving);
    }
    let (running, _) = hub.split_for_shutdown();
    let stopping = tokio::spawn(running.shutdown());
    for w in &mut watches {
        let seen = tokio::time::timeout(Duration::from_secs(60), async {
            let mut seen = Vec::new();
            while let Some(Ok(m)) = w.next().await {
                seen.push(m.status());
            }
            seen
        })
        .await
        .expect("the watch ends with the shutdown");
        assert_eq!(seen, [NotServing], "NOT_SERVING, then the end");
    }
    tokio::time::timeout(Duration::from_secs(60), stopping)
        .await
        .expect("the shutdown does not wait for health watches")
        .unwrap()
        .unwrap();
}

/// A small file system of the test's own (tmpfs, mounted as root, as CI runs), unmounted when
/// dropped.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mounting a tmpfs needs root (CI and scripts/test run as root)"
        );
        Self {
            dir: dir.to_owned(),
        }
    }

    /// Fills the file system up with one file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
        // Whatever is left below one block.
        while f.write_all(&[0u8; 512]).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.dir)
            .status();
    }
}

/// A full disk is said as it is: ingest answers UNAVAILABLE naming the full disk (not an
/// internal "corrupt data" error), health turns NOT_SERVING while commits fail so a load
/// balancer sends calls elsewhere, and once space is free again the hub commits and
/// reports SERVING without a restart. Nothing refused is stored. (SQLite on a tmpfs of its
/// own on either test pass; PostgreSQL reports its full disk as SQLSTATE 53100, mapped the
/// same way.)
#[tokio::test]
async fn a_full_disk_is_unavailable_not_corrupt_and_health_follows_it() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), "8m");
    let hub = HubBuilder::new()
        .set(
            "storage.url",
            &format!("{:?}", disk.dir.join("hub.db").display().to_string()),
        )
        .set("server.health_check_secs", "1")
        // No free-space floor: health must follow the failed commits themselves.
        .set("storage.min_free_mb", "0")
        .start_in_dir(dir)
        .await;
    let mut ingest = hub.ingest().await;
    submit_new(&mut ingest, "before", 10).await;
    let filler = disk.fill();

    // Enough new rows that the write-ahead log must grow past what it already holds (the
    // migrations' pages are reused after a checkpoint): about 1.2 MB of text.
    let batch: Vec<pb::Rating> = (0..200)
        .map(|i| {
            let mut r = rating(&format!("full-{i}"));
            r.text = "材料反复提交，窗口说明不清楚".repeat(140);
            r
        })
        .collect();
    let err = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: batch.clone(),
        })
        .await
        .expect_err("nothing can be committed on a full disk");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("disk full"), "{err:?}");
    eventually(Duration::from_secs(20), "health NOT_SERVING", || async {
        health(&hub, "").await == ServingStatus::NotServing
    })
    .await;

    std::fs::remove_file(filler).unwrap();
    eventually(Duration::from_secs(20), "health SERVING again", || async {
        health(&hub, "").await == ServingStatus::Serving
    })
    .await;
    let results = submit(&mut ingest, batch).await;
    assert!(
        results.iter().all(|r| outcome(r) == pb::Outcome::Accepted),
        "the refused ratings were not stored, so they are new now"
    );
    hub.stop().await;
}

use std::time::Duration;

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

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
    let (running, restart) = hub.split_for_shutdown();
    let stopping = tokio::spawn(running.shutdown());
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
    assert_eq!(count(&hub).await, 200);
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

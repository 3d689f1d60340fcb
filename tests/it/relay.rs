//! Upstream delivery and sync: chained hubs over mTLS, a fake upstream that fails in every
//! way, a hard kill mid-delivery, isolation between upstreams, Subscribe and Reconcile.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::fake_upstream::{FakeUpstream, Mode, eventually};
use crate::security::AdminServiceClient;
use crate::utils::*;

pub use pb::sync_service_client::SyncServiceClient;

const LIMIT: Duration = Duration::from_secs(30);

/// Adds a grpc upstream with quick retries, for tests.
pub fn upstream(b: HubBuilder, name: &str, endpoint: &str) -> HubBuilder {
    let q = |s: &str| format!("\"{s}\"");
    b.set(&format!("upstreams.{name}.kind"), &q("grpc"))
        .set(&format!("upstreams.{name}.endpoint"), &q(endpoint))
        .set(
            &format!("upstreams.{name}.retry_schedule_ms"),
            "[20, 40, 80]",
        )
        .set(&format!("upstreams.{name}.batch_size"), "50")
        .set(&format!("upstreams.{name}.in_flight"), "2")
        .set(&format!("upstreams.{name}.request_timeout_ms"), "3000")
}

pub async fn status(hub: &TestHub, name: &str) -> pb::UpstreamStatus {
    crate::utils::upstream_status(hub.channel_as("tester").await, name).await
}

pub async fn submit_many(hub: &TestHub, prefix: &str, n: usize) -> Vec<String> {
    submit_new(&mut hub.ingest().await, prefix, n).await
}

#[tokio::test]
async fn chained_hubs_over_mtls_deliver_every_rating_once_and_reconcile() {
    let province = HubBuilder::new()
        .principal("city-hub", &["submit", "relay"], TestScope::National)
        .start()
        .await;
    let cert = province.client_files("city-hub");
    let ca = province.pki_dir().join(rating_hub::pki::CA_CERT);
    let q = |p: &std::path::Path| format!("\"{}\"", p.display());
    let city = upstream(HubBuilder::new(), "province", &province.url())
        .set("upstreams.province.ca", &q(&ca))
        .set("upstreams.province.cert", &q(&cert.cert))
        .set("upstreams.province.key", &q(&cert.key))
        .set("upstreams.province.tls_domain", "\"localhost\"")
        .start()
        .await;

    // Batches and a stream into the city.
    let mut sent = submit_many(&city, "c", 250).await;
    let mut ingest = city.ingest().await;
    let acks: Vec<_> = ingest
        .stream_ratings(tokio_stream::iter((0..150).map(|i| {
            pb::StreamRatingsRequest {
                rating: Some(rating(&format!("s-{i}"))),
            }
        })))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap().result.unwrap().hub_id)
        .collect()
        .await;
    sent.extend(acks);

    // Everything appears at the province: subscribe there from the start.
    let mut sub = SyncServiceClient::new(province.channel_as("tester").await)
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut at_province = Vec::new();
    while at_province.len() < sent.len() {
        let r = tokio::time::timeout(LIMIT, sub.next())
            .await
            .expect("province receives within 30 s")
            .unwrap()
            .unwrap()
            .rating
            .unwrap();
        assert_eq!(r.source_system, "city-hub");
        assert_eq!(r.origin_source_system, "tester", "where it entered is kept");
        assert_eq!(r.source_key, r.hub_id);
        at_province.push(r);
    }
    let ids: HashSet<_> = at_province.iter().map(|r| r.hub_id.clone()).collect();
    assert_eq!(ids.len(), sent.len(), "once each");
    assert_eq!(
        ids,
        sent.iter().cloned().collect::<HashSet<_>>(),
        "same hub ids network-wide"
    );
    // The rater's data travelled (sealed again at the province).
    assert_eq!(
        at_province[0].rater.as_ref().unwrap().id_number,
        id_number()
    );

    eventually(LIMIT, "the city's cursor reaches its head", || async {
        status(&city, "province").await.lag_records == 0
    })
    .await;
    let st = status(&city, "province").await;
    assert_eq!((st.cursor, st.open_dead_letters), (400, 0));

    let window = pb::ReconcileRequest {
        rated_from: Some(ts(now().seconds - 86_400)),
        rated_until: Some(ts(now().seconds + 86_400)),
        ..Default::default()
    };
    async fn rec(hub: &TestHub, window: pb::ReconcileRequest) -> Vec<pb::ReconcileEntry> {
        SyncServiceClient::new(hub.channel_as("tester").await)
            .reconcile(window)
            .await
            .unwrap()
            .into_inner()
            .entries
    }
    let (a, b) = (
        rec(&city, window.clone()).await,
        rec(&province, window).await,
    );
    assert!(!a.is_empty());
    assert_eq!(a, b, "per-day, per-organisation counts and digests agree");
    assert_eq!(a.iter().map(|e| e.count).sum::<u64>(), 400);
    // Nothing extra: a second subscriber page finds no more than was sent.
    let pulled = SyncServiceClient::new(province.channel_as("tester").await)
        .pull(pb::PullRequest {
            after_sequence: 400,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pulled.ratings.is_empty());
    city.stop().await;
    province.stop().await;
}

#[tokio::test]
async fn outage_errors_slowness_and_rejections_lose_nothing_and_replay_delivers() {
    let fake = FakeUpstream::start().await;
    fake.set_mode(Mode::Unavailable);
    let hub = upstream(HubBuilder::new(), "fake", &fake.url())
        .start()
        .await;

    // 1. The upstream answers UNAVAILABLE: the hub keeps retrying.
    let mark = fake.mark();
    let mut sent = submit_many(&hub, "a", 100).await;
    fake.wait_calls(mark, 3, LIMIT).await;
    let st = status(&hub, "fake").await;
    assert!(
        st.failures >= 1 && st.last_error.contains("Unavailable"),
        "{st:?}"
    );
    assert_eq!(st.cursor, 0, "nothing counts as delivered");
    assert!(
        st.delivering_here && !st.delivering_instance.is_empty(),
        "the only instance delivers: {st:?}"
    );

    // 2. Slow, and rejecting some ratings for good.
    let rejected_keys: Vec<String> = (0..5).map(|i| format!("b-{i}")).collect();
    fake.reject_origin_keys(rejected_keys.clone());
    fake.set_mode(Mode::Slow(Duration::from_millis(30)));
    sent.extend(submit_many(&hub, "b", 100).await);

    // 3. Stopped altogether for a while (connections refused), while ingest goes on.
    let (addr, state) = fake.stop().await;
    let failures_before = status(&hub, "fake").await.failures;
    sent.extend(submit_many(&hub, "c", 100).await);
    eventually(
        LIMIT,
        "delivery attempts against the stopped upstream fail",
        || async { status(&hub, "fake").await.failures > failures_before },
    )
    .await;
    let fake = FakeUpstream::restart(addr, state).await;
    fake.set_mode(Mode::Accept);

    let rejected_ids: HashSet<String> = {
        let mut q = hub.query().await;
        let mut ids = HashSet::new();
        for key in &rejected_keys {
            let found = q
                .list_ratings(pb::ListRatingsRequest {
                    filter: Some(pb::RatingFilter {
                        case_number: format!("CASE-{key}"),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .ratings;
            ids.insert(found[0].hub_id.clone());
        }
        ids
    };
    let expected: HashSet<String> = sent
        .iter()
        .filter(|id| !rejected_ids.contains(*id))
        .cloned()
        .collect();
    fake.wait_until(LIMIT, "every accepted, non-rejected rating", |got| {
        expected.iter().all(|id| got.contains_key(id))
    })
    .await;
    eventually(LIMIT, "cursor at head", || async {
        status(&hub, "fake").await.lag_records == 0
    })
    .await;
    let st = status(&hub, "fake").await;
    assert_eq!(st.open_dead_letters, 5);
    assert!(
        st.last_error.is_empty(),
        "a success clears the last error: {st:?}"
    );

    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let dead = admin
        .list_dead_letters(pb::ListDeadLettersRequest {
            upstream: "fake".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters;
    assert_eq!(
        dead.iter()
            .map(|d| d.hub_id.clone())
            .collect::<HashSet<_>>(),
        rejected_ids
    );
    assert!(
        dead.iter()
            .all(|d| d.error.contains("fake upstream: unknown item")),
        "{dead:?}"
    );
    // The upstream's text echoed the rater's phone and ID number: neither is kept.
    assert!(
        dead.iter().all(|d| d.error.contains("<number>")
            && !d.error.contains("13800138000")
            && !d.error.contains(&crate::utils::id_number())),
        "{dead:?}"
    );
    // None of the rejected reached the upstream; every other rating did.
    let got = fake.received();
    assert!(rejected_ids.iter().all(|id| !got.contains_key(id)));
    assert_eq!(got.len(), 295);

    // The cause is fixed upstream; replaying delivers them.
    fake.reject_origin_keys([]);
    let replay = admin
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            upstream: "fake".into(),
            all: true,
            ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.requested, 5);
    fake.wait_until(LIMIT, "the replayed ratings", |got| {
        rejected_ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    eventually(LIMIT, "dead letters resolved", || async {
        status(&hub, "fake").await.open_dead_letters == 0
    })
    .await;
    assert_eq!(
        fake.received().len(),
        300,
        "every accepted rating delivered"
    );
    hub.stop().await;
}

#[tokio::test]
async fn a_dead_upstream_does_not_delay_a_healthy_one_or_ingest() {
    let healthy = FakeUpstream::start().await;
    let dead = FakeUpstream::start().await;
    dead.set_mode(Mode::Unavailable);
    let b = upstream(HubBuilder::new(), "healthy", &healthy.url());
    let hub = upstream(b, "dead", &dead.url()).start().await;
    for round in 0..5 {
        // Ingest is not held up by the dead upstream's retries: each round is answered in
        // well under the retry schedule's pauses piling up.
        let ids = tokio::time::timeout(
            Duration::from_secs(5),
            submit_many(&hub, &format!("r{round}"), 60),
        )
        .await
        .expect("ingest answered while an upstream is dead");
        // The healthy upstream keeps pace: each round arrives before the next is sent.
        healthy
            .wait_until(
                Duration::from_secs(5),
                "this round at the healthy upstream",
                |got| ids.iter().all(|id| got.contains_key(id)),
            )
            .await;
    }
    let d = status(&hub, "dead").await;
    assert_eq!((d.cursor, d.lag_records), (0, 300));
    assert!(d.failures > 0);
    eventually(LIMIT, "healthy cursor at head", || async {
        status(&hub, "healthy").await.lag_records == 0
    })
    .await;
    assert!(dead.received().is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn pause_holds_delivery_and_resume_catches_up() {
    let fake = FakeUpstream::start().await;
    // A second upstream, not paused, witnesses that the workers were woken by the commits.
    let witness = FakeUpstream::start().await;
    let b = upstream(HubBuilder::new(), "fake", &fake.url());
    let hub = upstream(b, "witness", &witness.url()).start().await;
    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let paused = admin
        .pause_upstream(pb::PauseUpstreamRequest {
            upstream: "fake".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert!(paused.paused);
    let ids = submit_many(&hub, "p", 50).await;
    // Every worker was woken by these commits: the witness received them all. The paused
    // upstream, woken by the same commits, sent nothing (a lag snapshot alone could be taken
    // before its worker even looked).
    witness
        .wait_until(LIMIT, "the ratings at the witness", |got| {
            ids.iter().all(|id| got.contains_key(id))
        })
        .await;
    assert!(fake.received().is_empty(), "a paused upstream got ratings");
    let st = status(&hub, "fake").await;
    assert_eq!((st.paused, st.lag_records), (true, 50));
    admin
        .resume_upstream(pb::ResumeUpstreamRequest {
            upstream: "fake".into(),
        })
        .await
        .unwrap();
    fake.wait_until(LIMIT, "all after resume", |got| {
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    let err = admin
        .pause_upstream(pb::PauseUpstreamRequest {
            upstream: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    hub.stop().await;
}

#[tokio::test]
async fn subscribe_from_zero_while_writers_are_busy_sees_every_rating_once_in_order() {
    let hub = TestHub::start().await;
    let mut sub = SyncServiceClient::new(hub.channel_as("tester").await)
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut writers = Vec::new();
    for w in 0..8 {
        let mut client = hub.ingest().await;
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for b in 0..10 {
                let batch = (0..25).map(|i| rating(&format!("w{w}-{b}-{i}"))).collect();
                ids.extend(
                    submit(&mut client, batch)
                        .await
                        .into_iter()
                        .map(|r| r.hub_id),
                );
            }
            ids
        }));
    }
    let got = read_subscription(&mut sub, 2000).await;
    let mut acked = HashSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_whole_feed(got, 2000, &acked, "subscriber");
    hub.stop().await;
}

#[tokio::test]
async fn pull_pages_through_the_feed_within_the_pullers_scope() {
    let orgs = [org(1)];
    let hub = HubBuilder::new()
        .principal("puller", &["pull"], TestScope::Orgs(&orgs))
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let mut ingest = hub.ingest().await;
    let batch: Vec<_> = (0..30)
        .map(|i| {
            let mut r = rating(&format!("pl{i}"));
            r.org_credit_code = org(i % 3);
            r
        })
        .collect();
    submit(&mut ingest, batch).await;
    let mut sync = SyncServiceClient::new(hub.channel_as("puller").await);
    let mut cursor = 0;
    let mut seen = Vec::new();
    loop {
        let page = sync
            .pull(pb::PullRequest {
                after_sequence: cursor,
                limit: 4,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.head_sequence, 30);
        assert!(page.ratings.iter().all(|r| r.org_credit_code == org(1)));
        seen.extend(page.ratings.iter().map(|r| r.feed_sequence));
        if page.next_after_sequence == cursor {
            break;
        }
        cursor = page.next_after_sequence;
    }
    assert_eq!(
        cursor, 30,
        "the cursor reaches the head past out-of-scope ratings"
    );
    assert_eq!(
        seen,
        (1..=30).filter(|s| (s - 1) % 3 == 1).collect::<Vec<u64>>()
    );
    // Pulling needs the pull role.
    let err = SyncServiceClient::new(hub.channel_as("reader").await)
        .pull(pb::PullRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    hub.stop().await;
}

#[tokio::test]
async fn reconcile_names_missing_fields() {
    let hub = TestHub::start().await;
    let err = SyncServiceClient::new(hub.channel_as("tester").await)
        .reconcile(pb::ReconcileRequest::default())
        .await
        .unwrap_err();
    let fields = bad_request_fields(&err);
    assert_eq!(fields, ["rated_from", "rated_until"]);
    // Extreme times: the span is computed without wrapping, so it is refused as too long
    // (in a release build it wrapped to a short span and was accepted).
    let err = SyncServiceClient::new(hub.channel_as("tester").await)
        .reconcile(pb::ReconcileRequest {
            rated_from: Some(ts(-9_223_372_036_854)),
            rated_until: Some(ts(9_223_372_036_854)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["rated_until"]);
    assert!(err.message().contains("400 days"), "{err:?}");
    hub.stop().await;
}

/// Receipts beyond the first, summed over hub ids.
fn duplicates(got: &HashMap<String, u32>) -> u32 {
    got.values().map(|n| n - 1).sum()
}

#[tokio::test]
async fn hub_killed_hard_during_delivery_loses_nothing_and_resumes_from_its_cursor() {
    use crate::binary::{SpawnedHub, dev_admin_channel, sigterm, spawn_hub_with, wait_exit};
    let fake = FakeUpstream::start().await;
    fake.set_mode(Mode::Slow(Duration::from_millis(15)));
    let dir = tempfile::tempdir().unwrap();
    let endpoint = fake.url();
    let env = [
        ("RATING_HUB__UPSTREAMS__FAKE__KIND", "grpc"),
        ("RATING_HUB__UPSTREAMS__FAKE__ENDPOINT", endpoint.as_str()),
        ("RATING_HUB__UPSTREAMS__FAKE__BATCH_SIZE", "10"),
        ("RATING_HUB__UPSTREAMS__FAKE__IN_FLIGHT", "1"),
        ("RATING_HUB__UPSTREAMS__FAKE__RETRY_SCHEDULE_MS", "[20, 50]"),
        // On PostgreSQL the restarted process is a new instance: it takes the upstream over
        // when the killed one's lease runs out.
        ("RATING_HUB__STORAGE__LEASE_SECS", "2"),
    ];
    let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &env);
    let mut ingest = IngestServiceClient::new(dev_admin_channel(dir.path(), &url).await);
    let mut acked = HashSet::new();
    let all: Vec<_> = (0..600).map(|i| rating(&format!("k-{i}"))).collect();
    for chunk in all.chunks(200) {
        for r in submit(&mut ingest, chunk.to_vec()).await {
            assert_eq!(outcome(&r), pb::Outcome::Accepted);
            acked.insert(r.hub_id);
        }
    }
    // Mid-delivery: some have arrived, most have not. The upstream stalls as soon as 50 are
    // in (before, the kill raced the rest of the delivery on a loaded machine).
    fake.wait_until(LIMIT, "delivery under way", |got| {
        let under_way = got.len() >= 50;
        if under_way {
            fake.set_mode(Mode::Slow(Duration::from_secs(3600)));
        }
        under_way
    })
    .await;
    let got_before = fake.received().len();
    assert!(
        got_before < 600,
        "the kill lands mid-delivery ({got_before} delivered)"
    );
    // What the attempt log holds before the kill (it is written off the send's path).
    let list = |url: String| {
        let dir = dir.path().to_owned();
        async move {
            AdminServiceClient::new(dev_admin_channel(&dir, &url).await)
                .list_attempts(pb::ListAttemptsRequest {
                    upstream: "fake".into(),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .attempts
        }
    };
    eventually(LIMIT, "delivered batches in the attempt log", || {
        let list = list(url.clone());
        async move {
            list.await
                .iter()
                .filter(|a| a.outcome == "delivered")
                .count()
                >= 3
        }
    })
    .await;
    let logged = list(url.clone()).await;
    crate::binary::signal(&child, "KILL");
    let killed = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(!killed.success());

    fake.set_mode(Mode::Accept);
    let SpawnedHub { mut child, url, .. } = spawn_hub_with(dir.path(), "info", &env);
    fake.wait_until(
        LIMIT,
        "every acknowledged rating after the restart",
        |got| acked.iter().all(|id| got.contains_key(id)),
    )
    .await;
    let got = fake.received();
    assert_eq!(got.len(), 600, "nothing extra, nothing lost");
    // The attempt log survived the kill: every attempt logged before it is still there.
    let after: HashSet<u64> = list(url.clone()).await.iter().map(|a| a.id).collect();
    assert!(
        logged.iter().all(|a| after.contains(&a.id)),
        "{} logged before the kill, {} after",
        logged.len(),
        after.len()
    );
    // At-least-once: at most the batch in flight at the kill is sent twice.
    assert!(duplicates(&got) <= 10, "{} duplicates", duplicates(&got));
    let stats = QueryServiceClient::new(dev_admin_channel(dir.path(), &url).await)
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stats.groups[0].total, 600,
        "every acknowledged rating survived the kill"
    );
    sigterm(&child);
    tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
}

/// A cursor advance that cannot be stored (here a trigger refuses writes to the upstream's
/// state, as a full disk or a lost connection would) holds delivery until it commits: no
/// later advance may commit past it, so the ratings the upstream rejected meanwhile are
/// dead-lettered once the store takes writes again, and the cursor reaches the head. Before,
/// the failed advance was dropped and the next one committed past it: the rejected ratings
/// were neither delivered nor dead-lettered.
#[tokio::test]
async fn a_cursor_write_that_fails_holds_delivery_and_loses_no_dead_letter() {
    let fake = FakeUpstream::start().await;
    let rejected_keys: Vec<String> = (0..100).map(|i| format!("r-{i}")).collect();
    fake.reject_origin_keys(rejected_keys);
    let hub = upstream(HubBuilder::new(), "fake", &fake.url())
        .start()
        .await;
    crate::pg::fail_cursor_writes(hub.dir.path(), true);

    let rejected: HashSet<String> = submit_many(&hub, "r", 100).await.into_iter().collect();
    eventually(LIMIT, "the cursor write's failure shown", || async {
        status(&hub, "fake")
            .await
            .last_error
            .contains("writes to upstream_state fail")
    })
    .await;
    let st = status(&hub, "fake").await;
    assert_eq!(st.cursor, 0, "nothing stored: {st:?}");
    assert_eq!(st.lag_records, 100, "{st:?}");

    crate::pg::fail_cursor_writes(hub.dir.path(), false);
    let accepted: HashSet<String> = submit_many(&hub, "a", 50).await.into_iter().collect();
    fake.wait_until(LIMIT, "the accepted ratings", |got| {
        accepted.iter().all(|id| got.contains_key(id))
    })
    .await;
    eventually(LIMIT, "cursor at head", || async {
        status(&hub, "fake").await.lag_records == 0
    })
    .await;
    let dead: Vec<String> = AdminServiceClient::new(hub.channel_as("tester").await)
        .list_dead_letters(pb::ListDeadLettersRequest {
            upstream: "fake".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .into_iter()
        .map(|d| d.hub_id)
        .collect();
    assert_eq!(dead.len(), rejected.len(), "no dead letter twice");
    assert_eq!(
        dead.into_iter().collect::<HashSet<_>>(),
        rejected,
        "every rejected rating is a dead letter, once"
    );
    let st = status(&hub, "fake").await;
    assert_eq!((st.cursor, st.open_dead_letters), (150, 100), "{st:?}");
    assert!(st.last_error.is_empty(), "the failure is over: {st:?}");
    hub.stop().await;
}

/// After an outage, the first batch that gets through wakes the others out of their retry
/// pauses: delivery resumes at once, not when each batch's own (long) pause ends. Here a
/// batch that failed into a 60 s pause is delivered within seconds of another batch's
/// success.
#[tokio::test]
async fn after_an_outage_the_first_success_wakes_every_waiting_batch() {
    let fake = FakeUpstream::start().await;
    fake.set_mode(Mode::Unavailable);
    let hub = upstream(HubBuilder::new(), "fake", &fake.url())
        .set("upstreams.fake.retry_schedule_ms", "[20, 20, 60000]")
        .set("upstreams.fake.retry_jitter", "0.0")
        .start()
        .await;
    let mark = fake.mark();
    let first = submit_many(&hub, "a", 50).await;
    // The first send and two quick retries fail; the batch then waits 60 s. (They may all
    // be made while the ratings are still being submitted: counted from before.)
    fake.wait_calls(mark, 3, LIMIT).await;
    fake.set_mode(Mode::Accept);
    // A new batch is sent at once (a free slot) and gets through: the probe.
    let second = submit_many(&hub, "b", 50).await;
    fake.wait_until(
        Duration::from_secs(15),
        "both batches, well before the first one's 60 s pause ends",
        |got| first.iter().chain(&second).all(|id| got.contains_key(id)),
    )
    .await;
    hub.stop().await;
}

/// Issue #20: every send to an upstream is in the attempt log — delivered batches, and the
/// failures of an outage with the upstream's own words — and the log is still there after a
/// restart; a range replay (by feed position, then by time) sends that range again and
/// nothing else, recorded with who asked and why; bad ranges are refused with the field named.
#[tokio::test]
async fn the_attempt_log_survives_a_restart_and_a_range_replay_sends_that_range_only() {
    let fake = FakeUpstream::start().await;
    // Small batches: a replay of the feed is many sends, so live delivery's turns show.
    let hub = upstream(HubBuilder::new(), "up", &fake.url())
        .set("upstreams.up.batch_size", "5")
        .start()
        .await;
    let first = submit_many(&hub, "a", 120).await;
    fake.wait_until(LIMIT, "120 delivered", |r| r.len() == 120)
        .await;
    fake.set_mode(Mode::Unavailable);
    let mark = fake.mark();
    let more = submit_many(&hub, "b", 10).await;
    fake.wait_calls(mark, 2, LIMIT).await;
    fake.set_mode(Mode::Accept);
    fake.wait_until(LIMIT, "130 delivered", |r| r.len() == 130)
        .await;
    let admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let attempts = |before_id: u64| pb::ListAttemptsRequest {
        upstream: "up".into(),
        before_id,
        limit: 0,
    };
    // The log is written off the send's path: wait until the last delivery is in it.
    let mut log = Vec::new();
    eventually(LIMIT, "the attempts logged", || {
        let mut admin = admin.clone();
        async move {
            let a = admin.list_attempts(attempts(0)).await.unwrap().into_inner();
            let delivered: u32 = a
                .attempts
                .iter()
                .filter(|x| x.outcome == "delivered")
                .map(|x| x.records)
                .sum();
            delivered >= 130
        }
    })
    .await;
    let stopped = hub.stop().await;
    let hub = stopped.restart().await;
    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let mut before = 0;
    loop {
        let page = admin
            .list_attempts(attempts(before))
            .await
            .unwrap()
            .into_inner();
        log.extend(page.attempts);
        if page.next_before_id == 0 {
            break;
        }
        before = page.next_before_id;
    }
    assert!(log.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    let failed: Vec<_> = log.iter().filter(|a| a.outcome == "failed").collect();
    assert!(!failed.is_empty(), "the outage's sends are logged: {log:?}");
    assert!(
        failed[0].detail.contains("down for maintenance"),
        "{:?}",
        failed[0]
    );
    let delivered: u32 = log
        .iter()
        .filter(|a| a.outcome == "delivered")
        .map(|a| a.records)
        .sum();
    assert!(delivered >= 130, "{delivered}");
    assert!(log.iter().all(|a| a.first_feed_sequence >= 1
        && a.last_feed_sequence >= a.first_feed_sequence
        && a.replay_id == 0));

    // Feed positions 21 to 40 again, and nothing else.
    let ratings = hub
        .query()
        .await
        .list_ratings(pb::ListRatingsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .ratings;
    assert_eq!(ratings.len(), 130);
    let seq_of: HashMap<String, u64> = ratings
        .iter()
        .map(|r| (r.hub_id.clone(), r.feed_sequence))
        .collect();
    let replay = |from: u64, to: u64, reason: &str| pb::ReplayRangeRequest {
        upstream: "up".into(),
        from_feed_sequence: from,
        to_feed_sequence: to,
        reason: reason.into(),
        ..Default::default()
    };
    let r = admin
        .replay_range(replay(21, 40, "省平台报告 3 月 2 日数据缺失"))
        .await
        .unwrap()
        .into_inner()
        .replay
        .unwrap();
    assert_eq!((r.from_feed_sequence, r.to_feed_sequence), (21, 40));
    assert_eq!(r.requested_by, "tester");
    fake.wait_until(LIMIT, "the range sent again", |got| {
        got.values().filter(|n| **n == 2).count() == 20
    })
    .await;
    eventually(LIMIT, "the replay marked done", || {
        let mut admin = admin.clone();
        async move {
            let r = admin
                .list_replays(pb::ListReplaysRequest {
                    upstream: "up".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .replays;
            r.len() == 1 && r[0].done_at.is_some() && r[0].next_feed_sequence == 41
        }
    })
    .await;
    // Only the range: every other rating was received once.
    for (hub_id, n) in fake.received() {
        let seq = seq_of[&hub_id];
        let expected = if (21..=40).contains(&seq) { 2 } else { 1 };
        assert_eq!(n, expected, "feed position {seq}");
    }
    assert!(first.len() + more.len() == 130);
    // By time: everything committed since an hour ago, once more.
    let r = admin
        .replay_range(pb::ReplayRangeRequest {
            upstream: "up".into(),
            from_time: Some(ts(now().seconds - 3600)),
            reason: "全量重推".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .replay
        .unwrap();
    assert_eq!((r.from_feed_sequence, r.to_feed_sequence), (1, 130));
    fake.wait_until(LIMIT, "all sent once more", |got| {
        got.values().filter(|n| **n >= 2).count() == 130
    })
    .await;
    let log = admin.list_attempts(attempts(0)).await.unwrap().into_inner();
    assert!(
        log.attempts.iter().any(|a| a.replay_id == r.id),
        "replayed sends are logged with their replay"
    );
    // Positions 21 to 40 have now been sent three times, every other one twice.
    fake.wait_until(LIMIT, "the time range done", |got| {
        got.iter().all(|(id, n)| {
            *n == if (21..=40).contains(&seq_of[id]) {
                3
            } else {
                2
            }
        })
    })
    .await;

    // A replay takes turns with live delivery: a rating committed while a long replay runs
    // is delivered before the replay is done.
    eventually(LIMIT, "no replay open", || {
        let mut admin = admin.clone();
        async move {
            admin
                .list_replays(pb::ListReplaysRequest {
                    upstream: "up".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .replays
                .iter()
                .all(|r| r.done_at.is_some())
        }
    })
    .await;
    fake.set_mode(Mode::Slow(Duration::from_millis(100)));
    let long = admin
        .replay_range(replay(1, 130, "再推一遍"))
        .await
        .unwrap()
        .into_inner()
        .replay
        .unwrap();
    let live = submit_many(&hub, "live", 1).await.remove(0);
    fake.wait_until(LIMIT, "the live rating", |got| got.contains_key(&live))
        .await;
    // The live rating arrived while the replay (26 sends of 100 ms) still ran.
    let replays = admin
        .list_replays(pb::ListReplaysRequest {
            upstream: "up".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .replays;
    let running = replays.iter().find(|r| r.id == long.id).unwrap();
    assert!(
        running.done_at.is_none(),
        "the live rating waited for the whole replay: {running:?}"
    );
    eventually(LIMIT, "the long replay done", || {
        let mut admin = admin.clone();
        async move {
            admin
                .list_replays(pb::ListReplaysRequest {
                    upstream: "up".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .replays[0]
                .done_at
                .is_some()
        }
    })
    .await;
    let lister = admin.clone();
    let list_all = || {
        let mut admin = lister.clone();
        async move {
            admin
                .list_attempts(pb::ListAttemptsRequest {
                    upstream: "up".into(),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .attempts
        }
    };
    let long_id = long.id;
    eventually(LIMIT, "the sends logged", || async move {
        list_all()
            .await
            .iter()
            .filter(|a| a.replay_id == long_id)
            .map(|a| a.records)
            .sum::<u32>()
            >= 130
    })
    .await;
    let log = list_all().await;
    let live_send = log
        .iter()
        .filter(|a| a.replay_id == 0 && a.last_feed_sequence == 131 && a.outcome == "delivered")
        .map(|a| a.id)
        .max()
        .expect("the live rating's send");
    let last_replayed = log
        .iter()
        .filter(|a| a.replay_id == long.id)
        .map(|a| a.id)
        .max()
        .unwrap();
    assert!(
        live_send < last_replayed,
        "the live rating waited for the whole replay"
    );

    // A replay can be stopped: during an outage it retries no more once cancelled.
    fake.set_mode(Mode::Unavailable);
    let mark = fake.mark();
    let stuck = admin
        .replay_range(replay(1, 10, "误操作"))
        .await
        .unwrap()
        .into_inner()
        .replay
        .unwrap();
    fake.wait_calls(mark, 1, LIMIT).await;
    let c = admin
        .cancel_replay(pb::CancelReplayRequest {
            upstream: "up".into(),
            id: stuck.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(c.cancelled);
    let again = admin
        .cancel_replay(pb::CancelReplayRequest {
            upstream: "up".into(),
            id: stuck.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.cancelled, "done already");
    let before: HashMap<String, u32> = fake.received();
    fake.set_mode(Mode::Accept);
    let next = submit_many(&hub, "after", 1).await.remove(0);
    fake.wait_until(LIMIT, "live delivery after the cancel", |got| {
        got.contains_key(&next)
    })
    .await;
    for (id, n) in &before {
        assert_eq!(
            fake.received()[id],
            *n,
            "a cancelled replay sent {id} again"
        );
    }
    // The relay is one task, replay batches and live ones in turn: the live rating could go
    // out only once the replay's send had given up. The attempt log says how it ended — every
    // try of the cancelled replay refused, none after the upstream came back — and the replay
    // is done where it stood, not carried to its end.
    let stuck_id = stuck.id;
    let tries: Vec<_> = list_all()
        .await
        .into_iter()
        .filter(|a| a.replay_id == stuck_id)
        .collect();
    assert!(!tries.is_empty(), "the replay's refused send is logged");
    assert!(
        tries.iter().all(|a| a.outcome != "delivered"),
        "a cancelled replay was delivered: {tries:?}"
    );
    let ended = admin
        .list_replays(pb::ListReplaysRequest {
            upstream: "up".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .replays
        .into_iter()
        .find(|r| r.id == stuck_id)
        .unwrap();
    assert!(ended.done_at.is_some(), "cancelled means done: {ended:?}");
    assert!(ended.reason.ends_with("(cancelled)"), "{ended:?}");
    assert_eq!(
        ended.next_feed_sequence, 1,
        "a cancelled replay stays where it stood: {ended:?}"
    );

    // Refused, naming the field.
    for (req, field) in [
        (replay(21, 40, ""), "reason"),
        (replay(40, 21, "x"), "from_feed_sequence"),
        (replay(1, 9999, "x"), "to_feed_sequence"),
        (
            pb::ReplayRangeRequest {
                from_time: Some(ts(now().seconds)),
                ..replay(1, 2, "x")
            },
            "from_feed_sequence",
        ),
    ] {
        let err = admin.replay_range(req).await.unwrap_err();
        assert_eq!(bad_request_fields(&err), [field], "{err:?}");
    }
    hub.stop().await;
}

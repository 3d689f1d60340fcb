//! Several hub instances on one PostgreSQL database behave as one hub: idempotency across
//! instances, one gapless feed in commit order, wake-ups across instances, one deliverer per
//! upstream (a lease that moves when its holder dies), rules and 差评 case steps that act once
//! whichever instances run them, and a pause through any instance that reaches the deliverer.
//!
//! These tests always use PostgreSQL (pg.rs starts a server when none is given); scripts/test
//! runs them once, in the SQLite pass, and skips them in the PostgreSQL pass.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::binary::{SpawnedHub, dev_admin_channel, signal, sigterm, spawn_hub_with, wait_exit};
use crate::fake_upstream::{FakeUpstream, Mode, eventually};
use crate::relay::SyncServiceClient;
use crate::utils::*;

const LIMIT: Duration = Duration::from_secs(60);

/// A builder for hubs on one new PostgreSQL database, and the database's URL.
fn on_new_database() -> (HubBuilder, String) {
    let url = crate::pg::new_database();
    (
        HubBuilder::new().set("storage.url", &format!("{url:?}")),
        url,
    )
}

#[tokio::test]
async fn same_source_key_sent_to_two_instances_at_once_stores_one_rating() {
    let a = on_new_database().0.start().await;
    let b = a.peer().await;
    let (mut ia, mut ib) = (a.ingest().await, b.ingest().await);
    let mut pairs = Vec::new();
    for round in 0..20 {
        let batch: Vec<_> = (0..10)
            .map(|i| rating(&format!("same-{round}-{i}")))
            .collect();
        let (ra, rb) = tokio::join!(submit(&mut ia, batch.clone()), submit(&mut ib, batch));
        pairs.extend(ra.into_iter().zip(rb));
    }
    for (ra, rb) in &pairs {
        let mut outcomes = [outcome(ra), outcome(rb)];
        outcomes.sort_by_key(|o| *o as i32);
        assert_eq!(
            outcomes,
            [pb::Outcome::Accepted, pb::Outcome::Duplicate],
            "one instance stores it, the other answers DUPLICATE"
        );
        assert_eq!(ra.hub_id, rb.hub_id, "both name the one stored rating");
    }
    for hub in [&a, &b] {
        let stats = hub
            .query()
            .await
            .get_stats(pb::GetStatsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.groups[0].total, 200, "200 keys, 200 ratings");
    }
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn feed_is_gapless_in_order_and_wakes_a_third_instance_that_never_writes() {
    let (builder, url) = on_new_database();
    let a = builder.start().await;
    let b = a.peer().await;
    let c = a.peer().await;
    // Subscribed on C, which takes no ratings: it can only learn of A's and B's commits
    // from their notifications.
    let mut sub = SyncServiceClient::new(c.channel_as("tester").await)
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut writers = Vec::new();
    for (h, hub) in [&a, &b].into_iter().enumerate() {
        for w in 0..3 {
            let mut client = hub.ingest().await;
            writers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..15 {
                    let batch = (0..20)
                        .map(|i| rating(&format!("h{h}-w{w}-{n}-{i}")))
                        .collect();
                    for r in submit(&mut client, batch).await {
                        assert_eq!(outcome(&r), pb::Outcome::Accepted);
                        ids.push(r.hub_id);
                    }
                }
                ids
            }));
        }
    }
    let got = read_subscription(&mut sub, 1800).await;
    let mut acked = HashSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_whole_feed(
        got,
        1800,
        &acked,
        "subscriber on the instance that never writes",
    );
    for hub in [c, b] {
        hub.stop().await;
    }
    // The rating log the two writers built in turns (packed leaf rows from either instance
    // within one run, each reading the right edge the other left): recomputed whole from
    // the ratings, it verifies.
    let stopped = a.stop().await;
    let (ok, report) = crate::rating_log::verify_hub(stopped.dir.path());
    assert!(ok, "{report}");
    assert_eq!(
        (report["size"].clone(), report["ratings"].clone()),
        (1800.into(), 1800.into())
    );
    // Packed, and in more rows than 1,800 leaves fill (57): groups ended inside runs that
    // the next group, of either instance, went on with.
    let packed = crate::pg::exec(
        &url,
        "SELECT CAST(packed_leaves AS TEXT) || ' ' || CAST(COUNT(*) AS TEXT) \
         FROM log_meta, log_leaves GROUP BY packed_leaves",
    );
    let (flag, rows) = packed[0].split_once(' ').unwrap();
    assert_eq!(flag, "true");
    assert!(rows.parse::<u64>().unwrap() > 57, "{rows} leaf rows");
}

/// Hub processes, each `(name, database URL)`, delivering to the gRPC upstream `endpoint`
/// ("fake") under 2-second leases, in batches of 20, two in flight. Started one after
/// another: the first creates the shared development PKI and privacy key in `dir`.
fn spawn_instances(
    dir: &std::path::Path,
    endpoint: &str,
    hubs: &[(&str, &str)],
) -> Vec<SpawnedHub> {
    hubs.iter()
        .map(|(name, db)| {
            let env = [
                ("RATING_HUB__STORAGE__URL", *db),
                ("RATING_HUB__STORAGE__INSTANCE", name),
                ("RATING_HUB__STORAGE__LEASE_SECS", "2"),
                ("RATING_HUB__UPSTREAMS__FAKE__KIND", "grpc"),
                ("RATING_HUB__UPSTREAMS__FAKE__ENDPOINT", endpoint),
                ("RATING_HUB__UPSTREAMS__FAKE__BATCH_SIZE", "20"),
                ("RATING_HUB__UPSTREAMS__FAKE__IN_FLIGHT", "2"),
                ("RATING_HUB__UPSTREAMS__FAKE__RETRY_SCHEDULE_MS", "[20, 50]"),
            ];
            spawn_hub_with(dir, "info", &env)
        })
        .collect()
}

#[tokio::test]
async fn three_instances_one_killed_hard_lose_nothing_and_deliver_everything() {
    let fake = FakeUpstream::start().await;
    // Slow enough that delivery is still under way when the lease holder is killed.
    fake.set_mode(Mode::Slow(Duration::from_millis(10)));
    let dir = tempfile::tempdir().unwrap();
    let db = crate::pg::database_for(dir.path());
    let names = ["hub-0", "hub-1", "hub-2"];
    let instances = names.map(|name| (name, db.as_str()));
    let mut hubs: Vec<_> = spawn_instances(dir.path(), &fake.url(), &instances)
        .into_iter()
        .zip(names)
        .map(|(SpawnedHub { child, url, .. }, name)| (name, Some(child), url))
        .collect();
    let mut subs = Vec::new();
    for (_, _, url) in &hubs {
        subs.push(
            SyncServiceClient::new(dev_admin_channel(dir.path(), url).await)
                .subscribe(pb::SubscribeRequest { after_sequence: 0 })
                .await
                .unwrap()
                .into_inner(),
        );
    }

    // Two writers per instance. Each batch repeats 10 keys every instance is sent at the
    // same time, and has 15 keys of its own.
    let batches_done = Arc::new(AtomicUsize::new(0));
    let (progress, mut progress_rx) = tokio::sync::watch::channel(0usize);
    let progress = Arc::new(progress);
    let mut writers = Vec::new();
    // The same key must carry the same content everywhere, or it is a CONFLICT.
    let rated_at = now();
    for (h, (_, _, url)) in hubs.iter().enumerate() {
        for w in 0..2 {
            let mut client = IngestServiceClient::new(dev_admin_channel(dir.path(), url).await);
            let (done, progress) = (batches_done.clone(), progress.clone());
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for n in 0..40 {
                    let batch: Vec<_> = (0..10)
                        .map(|i| pb::Rating {
                            rated_at: Some(rated_at),
                            ..rating(&format!("shared-{w}-{n}-{i}"))
                        })
                        .chain((0..15).map(|i| rating(&format!("own-{h}-{w}-{n}-{i}"))))
                        .collect();
                    let request = pb::SubmitRatingsRequest { ratings: batch };
                    // The instance may be killed under us: what it acknowledged counts.
                    let Ok(response) = client.submit_ratings(request).await else {
                        break;
                    };
                    for r in response.into_inner().results {
                        let o = outcome(&r);
                        assert!(
                            matches!(o, pb::Outcome::Accepted | pb::Outcome::Duplicate),
                            "{o:?}"
                        );
                        acked.push(r.hub_id);
                    }
                    progress.send_replace(done.fetch_add(1, Ordering::AcqRel) + 1);
                }
                acked
            }));
        }
    }

    // Mid-run: a quarter of the batches in, delivery under way. Kill the lease holder.
    progress_rx.wait_for(|n| *n >= 60).await.unwrap();
    fake.wait_until(LIMIT, "delivery under way", |got| !got.is_empty())
        .await;
    let holder = crate::pg::exec(
        &db,
        "SELECT lease_holder FROM upstream_state WHERE upstream = 'fake'",
    )
    .pop()
    .expect("an instance holds the lease while it delivers");
    let victim = names.iter().position(|n| *n == holder).unwrap();
    let mut victim_child = hubs[victim].1.take().unwrap();
    signal(&victim_child, "KILL");
    assert!(
        !tokio::task::spawn_blocking(move || wait_exit(&mut victim_child))
            .await
            .unwrap()
            .success()
    );
    assert!(
        *progress_rx.borrow() < 240,
        "the kill landed while writers were still writing"
    );

    let mut acked = HashSet::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    // What is stored: the feed, read from a survivor.
    let survivor = &hubs[(victim + 1) % 3].2;
    let stored = whole_feed(dev_admin_channel(dir.path(), survivor).await).await;
    let n = stored.len();
    let ids: HashSet<String> = stored.iter().map(|r| r.hub_id.clone()).collect();
    let keys: HashSet<&str> = stored.iter().map(|r| r.source_key.as_str()).collect();
    assert_eq!(ids.len(), n, "each rating stored once");
    assert_eq!(keys.len(), n, "each source key stored once");
    assert!(
        acked.is_subset(&ids),
        "{} acknowledged ratings are missing",
        acked.difference(&ids).count()
    );

    // Every stored rating reaches the upstream, delivered by whoever holds the lease now.
    fake.set_mode(Mode::Accept);
    fake.wait_until(LIMIT, "every stored rating upstream", |got| {
        ids.iter().all(|id| got.contains_key(id))
    })
    .await;
    let got: HashMap<String, u32> = fake.received();
    assert_eq!(got.len(), n, "nothing upstream that is not stored");
    // One deliverer at a time: only what the dead holder had sent past its stored cursor
    // may arrive twice — its 2 batches in flight, the 2 cursor writes it had queued and the
    // one being committed, of 20 ratings each. Three deliverers would send nearly
    // everything three times.
    let duplicates: u32 = got.values().map(|k| k - 1).sum();
    assert!(duplicates <= 100, "{duplicates} ratings delivered twice");
    let new_holder = crate::pg::exec(
        &db,
        "SELECT lease_holder FROM upstream_state WHERE upstream = 'fake'",
    )
    .pop()
    .unwrap();
    assert_ne!(new_holder, holder, "the lease moved to a live instance");
    // Each survivor's ListUpstreams names the holder; only the holder says it delivers.
    for (h, (_, _, url)) in hubs.iter().enumerate() {
        if h == victim {
            continue;
        }
        let status =
            crate::utils::upstream_status(dev_admin_channel(dir.path(), url).await, "fake").await;
        assert_eq!(status.delivering_instance, new_holder, "as {}", names[h]);
        assert_eq!(
            status.delivering_here,
            names[h] == new_holder,
            "{}",
            names[h]
        );
    }

    // A subscriber from cursor 0 on each survivor saw every rating once, in order.
    for (h, sub) in subs.iter_mut().enumerate() {
        if h == victim {
            continue;
        }
        let seen = read_subscription(sub, n).await;
        assert_whole_feed(seen, n, &ids, &format!("subscriber on {}", names[h]));
    }
    for (_, child, _) in &mut hubs {
        if let Some(mut child) = child.take() {
            sigterm(&child);
            tokio::task::spawn_blocking(move || wait_exit(&mut child))
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn lost_database_connections_reconnect_without_failing_the_next_rating() {
    let (builder, url) = on_new_database();
    let hub = builder.start().await;
    let mut ingest = hub.ingest().await;
    let first = submit_one(&mut ingest, rating("before")).await;
    assert_eq!(outcome(&first), pb::Outcome::Accepted);
    // The subscriber sits on another instance: it hears of a commit only through its own
    // commit listener (the writing instance moves its head locally, listener or not).
    let peer = hub.peer().await;
    let mut sub = SyncServiceClient::new(peer.channel_as("tester").await)
        .subscribe(pb::SubscribeRequest { after_sequence: 1 })
        .await
        .unwrap()
        .into_inner();

    // Every connection of the hub dies: writer, readers and the commit listener (waiting
    // until each backend has exited).
    let name = url.rsplit_once('/').unwrap().1;
    let killed = crate::pg::admin_exec(&format!(
        "SELECT pg_terminate_backend(pid, 10000)::text FROM pg_stat_activity \
         WHERE datname = '{name}'"
    ));
    // A backend that ended by itself between the listing and its termination (a pool
    // closing an idle connection) answers false: it is gone all the same.
    assert!(
        killed.iter().filter(|k| *k == "true").count() >= 2,
        "the hub's connections were terminated: {killed:?}"
    );

    // The writer's idle connection is dead: the next group fails at BEGIN, before anything
    // of it reached the database, and the writer reconnects and stores it. The caller sees
    // no error.
    let stored = submit_one(&mut ingest, rating("after")).await;
    assert_eq!(
        outcome(&stored),
        pb::Outcome::Accepted,
        "stored through a new connection"
    );
    // The peer's subscriber hears of it: the peer's listener reconnected and re-read the
    // head.
    let next = tokio::time::timeout(LIMIT, sub.next())
        .await
        .expect("the subscriber hears of the new rating")
        .unwrap()
        .unwrap()
        .rating
        .unwrap();
    assert_eq!(next.hub_id, stored.hub_id);
    assert_eq!(next.feed_sequence, 2);
    hub.stop().await;
    peer.stop().await;
}

#[tokio::test]
async fn rules_and_case_steps_run_on_every_instance_and_act_once() {
    use crate::rules::{completed, cst, defaults, invitations, report};
    use pb::rectification_service_client::RectificationServiceClient;
    use rating_hub::clock::{Clock, ManualClock};

    // Completed on Tuesday 2025-09-30, 10:00 CST (the schedule rules.rs walks through on
    // one instance): Guangdong invites after 24 hours, Kunming records 基本满意 after 5
    // working days, at the end of 2025-10-14.
    let t0 = cst("2025-09-30", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let a = on_new_database().0.clock(clock.clone()).start().await;
    let b = a.peer().await;
    let c = a.peer().await;
    let hubs = [&a, &b, &c];
    for (h, hub) in hubs.iter().enumerate() {
        let cases = (0..10)
            .flat_map(|i| {
                [
                    completed(&format!("KM-{h}-{i}"), "530102", t0),
                    completed(&format!("GD-{h}-{i}"), "440103", t0),
                ]
            })
            .collect();
        report(hub, cases).await;
    }

    // Every instance's engine ticks at the same moment over the same 60 cases.
    let engines = hubs.map(|hub| hub.hub.rules());
    let tick_all = || async {
        let (ra, rb, rc) = tokio::join!(engines[0].tick(), engines[1].tick(), engines[2].tick());
        [ra.unwrap(), rb.unwrap(), rc.unwrap()]
    };
    clock.set(t0 + 24 * 3_600_000_000 + 1);
    let ticks = tick_all().await;
    assert_eq!(
        ticks.iter().map(|t| t.invitations).sum::<u64>(),
        30,
        "one invitation per Guangdong case, whichever instance wrote it: {ticks:?}"
    );
    // The case numbers reported with `prefix`, sorted.
    let reported = |prefix: &str| {
        let mut cases: Vec<String> = (0..3)
            .flat_map(|h| (0..10).map(move |i| format!("{prefix}-{h}-{i}")))
            .collect();
        cases.sort();
        cases
    };
    for hub in hubs {
        let mut cases: Vec<String> = invitations(hub)
            .await
            .into_iter()
            .map(|i| i.service_case.unwrap().case_number)
            .collect();
        cases.sort();
        assert_eq!(
            cases,
            reported("GD"),
            "every instance lists the same 30 invitations"
        );
    }

    clock.set(cst("2025-10-15", 0) + 1);
    let ticks = tick_all().await;
    assert_eq!(
        ticks.iter().map(|t| t.default_ratings).sum::<u64>(),
        30,
        "one default rating per Kunming case: {ticks:?}"
    );
    let ticks = tick_all().await;
    assert_eq!(
        ticks
            .iter()
            .map(|t| t.invitations + t.default_ratings)
            .sum::<u64>(),
        0,
        "never twice: {ticks:?}"
    );
    for hub in hubs {
        let mut cases: Vec<String> = defaults(hub)
            .await
            .into_iter()
            .map(|r| r.case_number)
            .collect();
        cases.sort();
        assert_eq!(
            cases,
            reported("KM"),
            "every instance sees the same 30 defaults"
        );
    }

    // 差评 cases: the three instances record the same step on one case at the same time.
    // Exactly one records it; the others are told the case changed (ABORTED) or that the
    // rater was already contacted (FAILED_PRECONDITION).
    let bad: Vec<_> = (0..10)
        .map(|i| pb::Rating {
            level: pb::Level::VeryDissatisfied as i32,
            text: "窗口人员态度差".into(),
            rated_at: Some(rating_hub::time::timestamp_from_micros(clock.now_micros())),
            ..rating(&format!("bad-{i}"))
        })
        .collect();
    let results = submit(&mut a.ingest().await, bad).await;
    assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    let mut clients = Vec::new();
    for hub in hubs {
        clients.push(RectificationServiceClient::new(
            hub.channel_as("tester").await,
        ));
    }
    let cases = clients[1]
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases;
    assert_eq!(
        cases.len(),
        10,
        "one case per 差评, seen from another instance"
    );
    for case in &cases {
        let contact = pb::RecordActionRequest {
            id: case.id,
            action: pb::CaseAction::Contact as i32,
            note: "电话回访，核实属实".into(),
            ..Default::default()
        };
        let [x, y, z] = &mut clients[..] else {
            unreachable!()
        };
        let (rx, ry, rz) = tokio::join!(
            x.record_action(contact.clone()),
            y.record_action(contact.clone()),
            z.record_action(contact)
        );
        let mut recorded = 0;
        for r in [rx, ry, rz] {
            match r {
                Ok(_) => recorded += 1,
                Err(s) => assert!(
                    matches!(
                        s.code(),
                        tonic::Code::Aborted | tonic::Code::FailedPrecondition
                    ),
                    "case {}: {s:?}",
                    case.id
                ),
            }
        }
        assert_eq!(
            recorded, 1,
            "case {}: one instance records the step",
            case.id
        );
        let history = clients[2]
            .get_case(pb::GetCaseRequest { id: case.id })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap()
            .history;
        assert_eq!(
            history.iter().map(|e| e.action).collect::<Vec<_>>(),
            [pb::CaseAction::Contact as i32],
            "case {}: one step in its history",
            case.id
        );
    }
    for hub in [c, b, a] {
        hub.stop().await;
    }
}

#[tokio::test]
async fn pause_and_resume_through_either_instance_reach_the_one_that_delivers() {
    use pb::admin_service_client::AdminServiceClient;

    let fake = FakeUpstream::start().await;
    let (builder, db) = on_new_database();
    let builder = crate::relay::upstream(builder, "fake", &fake.url())
        .set("storage.lease_secs", "2")
        .set("storage.instance", "\"hub-a\"");
    let a = builder.start().await;
    let b = a.peer_as("hub-b").await;
    let first = crate::relay::submit_many(&a, "first", 10).await;
    fake.wait_until(LIMIT, "the first ratings upstream", |got| {
        first.iter().all(|id| got.contains_key(id))
    })
    .await;
    let holder_name = upstream_status(a.channel_as("tester").await, "fake")
        .await
        .delivering_instance;
    let (holder, other) = match holder_name.as_str() {
        "hub-a" => (&a, &b),
        "hub-b" => (&b, &a),
        other => panic!("delivered by {other:?}"),
    };
    let lease_until = || {
        crate::pg::exec(
            &db,
            "SELECT lease_until::text FROM upstream_state WHERE upstream = 'fake'",
        )
        .pop()
        .unwrap()
    };
    let status = |hub| crate::relay::status(hub, "fake");

    // Paused through the instance that does not deliver: the holder follows at its next
    // lease renewal.
    let mut admin = AdminServiceClient::new(other.channel_as("tester").await);
    let asked = std::time::Instant::now();
    admin
        .pause_upstream(pb::PauseUpstreamRequest {
            upstream: "fake".into(),
        })
        .await
        .unwrap();
    eventually(LIMIT, "the holder paused", || async {
        status(holder).await.paused
    })
    .await;
    // "At its next renewal (within a third of the lease time)": 0.7 s here, with room for
    // a loaded machine.
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the holder paused {:?} after the request",
        asked.elapsed()
    );
    let held = crate::relay::submit_many(holder, "held", 30).await;
    // The holder has seen the commit (its worker was woken), and renewed its lease since:
    // it would have sent them by now.
    eventually(LIMIT, "the holder at the new head", || async {
        status(holder).await.head_sequence == 40
    })
    .await;
    let renewed = lease_until();
    eventually(LIMIT, "a lease renewal", || async {
        lease_until() != renewed
    })
    .await;
    let got = fake.received();
    assert!(
        held.iter().all(|id| !got.contains_key(id)),
        "nothing delivered while paused"
    );
    let st = status(holder).await;
    assert_eq!((st.paused, st.lag_records), (true, 30));
    assert_eq!(
        st.delivering_instance, holder_name,
        "the lease did not move"
    );

    // Resumed through the same instance: the holder catches up.
    admin
        .resume_upstream(pb::ResumeUpstreamRequest {
            upstream: "fake".into(),
        })
        .await
        .unwrap();
    fake.wait_until(LIMIT, "the held ratings after resume", |got| {
        held.iter().all(|id| got.contains_key(id))
    })
    .await;
    assert!(!status(holder).await.paused);
    b.stop().await;
    a.stop().await;
}

#[tokio::test]
async fn health_is_not_serving_while_the_database_is_cut_off_and_serving_again_after() {
    use tonic_health::pb::health_check_response::ServingStatus::{NotServing, Serving};
    const INGEST: &str = "ratinghub.v1.IngestService";

    // The hub reaches its database only through the gate.
    let (gate, gated) = crate::gate::TcpGate::in_front_of(&crate::pg::new_database()).await;
    let hub = HubBuilder::new()
        .set("storage.url", &format!("{gated:?}"))
        .set("server.health_check_secs", "1")
        .set("storage.read_wait_ms", "1000")
        .start()
        .await;
    assert_eq!(
        (health(&hub, "").await, health(&hub, INGEST).await),
        (Serving, Serving)
    );
    let mut ingest = hub.ingest().await;
    assert_eq!(
        outcome(&submit_one(&mut ingest, rating("before")).await),
        pb::Outcome::Accepted
    );

    gate.shut();
    eventually(
        LIMIT,
        "NOT_SERVING while the database is cut off",
        || async { health(&hub, "").await == NotServing },
    )
    .await;
    assert_eq!(health(&hub, INGEST).await, NotServing);
    let refused = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("during")],
        })
        .await
        .expect_err("nothing commits without the database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    // Reads fail fast too (storage.read_wait_ms), rather than hang on the pool for half a
    // minute (sqlx's default wait).
    let mut query = hub.query().await;
    let started = std::time::Instant::now();
    let read = query
        .list_ratings(pb::ListRatingsRequest::default())
        .await
        .expect_err("nothing can be read without the database");
    assert_eq!(read.code(), tonic::Code::Unavailable, "{read:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a read waited {:?} for a database that is down",
        started.elapsed()
    );

    gate.open();
    eventually(LIMIT, "SERVING once the database answers", || async {
        health(&hub, "").await == Serving
    })
    .await;
    assert_eq!(health(&hub, INGEST).await, Serving);
    // Once the database answers, the next rating is stored (the writer connects afresh).
    let stored = submit_one(&mut ingest, rating("during")).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted);
    assert_eq!(
        stored.feed_sequence, 2,
        "nothing of the refused call was stored"
    );
    hub.stop().await;
}

#[tokio::test]
async fn over_tls_the_hub_verifies_its_database_and_refuses_one_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    // The server's certificate names localhost and 127.0.0.1, issued by the development CA.
    let pki = dir.path().join("pki");
    rating_hub::pki::init_dev(&pki).unwrap();
    let server = crate::pg::TlsServer::start(dir.path(), &pki);
    crate::pg::exec(&server.url, "CREATE DATABASE hub");
    let base = server.url.rsplit_once('/').unwrap().0;
    let verified = |ca: &std::path::Path| {
        format!(
            "{base}/hub?sslmode=verify-full&sslrootcert={}",
            ca.display()
        )
    };

    let hub = HubBuilder::new()
        .set(
            "storage.url",
            &format!("{:?}", verified(&pki.join(rating_hub::pki::CA_CERT))),
        )
        .start()
        .await;
    let stored = submit_one(&mut hub.ingest().await, rating("over-tls")).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted);
    // Every connection the hub has open to its database is encrypted.
    let ssl = crate::pg::exec(
        &server.url,
        "SELECT s.ssl::text FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = 'hub'",
    );
    assert!(ssl.len() >= 2, "the hub's connections: {ssl:?}");
    assert!(ssl.iter().all(|s| s == "true"), "{ssl:?}");
    hub.stop().await;

    // A CA that did not issue the server's certificate: the hub does not start, and says
    // why.
    let other = dir.path().join("other-ca");
    rating_hub::pki::create_ca(&other, "another CA").unwrap();
    let refused = HubBuilder::new()
        .set(
            "storage.url",
            &format!("{:?}", verified(&other.join(rating_hub::pki::CA_CERT))),
        )
        .try_start()
        .await
        .err()
        .expect("no hub on a database it cannot verify");
    let why = format!("{refused:#}");
    assert!(why.contains("opening the database"), "{why}");
    assert!(why.to_lowercase().contains("certificate"), "{why}");
}

/// Submits `n` new ratings (keys `prefix`-i) through the hub at `url`; returns their hub ids.
async fn submit_through(dir: &std::path::Path, url: &str, prefix: &str, n: usize) -> Vec<String> {
    submit_new(
        &mut IngestServiceClient::new(dev_admin_channel(dir, url).await),
        prefix,
        n,
    )
    .await
}

/// Every rating of the feed, pulled from the start; asserts the feed is gapless.
async fn whole_feed(channel: tonic::transport::Channel) -> Vec<pb::Rating> {
    let mut sync = SyncServiceClient::new(channel);
    let mut feed: Vec<pb::Rating> = Vec::new();
    let mut after = 0;
    loop {
        let page = sync
            .pull(pb::PullRequest {
                after_sequence: after,
                limit: 1000,
            })
            .await
            .unwrap()
            .into_inner();
        if page.ratings.is_empty() {
            break;
        }
        after = page.next_after_sequence;
        feed.extend(page.ratings);
    }
    assert_eq!(
        feed.iter().map(|r| r.feed_sequence).collect::<Vec<_>>(),
        (1..=feed.len() as u64).collect::<Vec<_>>(),
        "a gapless feed"
    );
    feed
}

/// Stops hub processes with SIGTERM; each must exit cleanly.
async fn stop_all(hubs: Vec<SpawnedHub>) {
    for SpawnedHub { mut child, .. } in hubs {
        sigterm(&child);
        let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
            .await
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

#[tokio::test]
async fn a_frozen_lease_holder_hands_over_and_sends_nothing_when_it_thaws() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = crate::pg::database_for(dir.path());
    // Each instance reaches the database through a gate of its own: thawed, the frozen one
    // renews its lease slowly, while its sends to the upstream go at once.
    let (gate0, db0) = crate::gate::TcpGate::in_front_of(&db).await;
    let (gate1, db1) = crate::gate::TcpGate::in_front_of(&db).await;
    let names = ["hub-0", "hub-1"];
    let hubs = spawn_instances(
        dir.path(),
        &fake.url(),
        &[(names[0], db0.as_str()), (names[1], db1.as_str())],
    );
    let stored = |column: &str| {
        crate::pg::exec(
            &db,
            &format!("SELECT {column}::text FROM upstream_state WHERE upstream = 'fake'"),
        )
        .pop()
        .unwrap()
    };
    let first = submit_through(dir.path(), &hubs[0].url, "first", 100).await;
    fake.wait_until(LIMIT, "the first ratings upstream", |got| {
        first.iter().all(|id| got.contains_key(id))
    })
    .await;
    // The stored cursor caught up: the holder owes nothing but what comes next.
    eventually(LIMIT, "the stored cursor at 100", || async {
        stored("cursor") == "100"
    })
    .await;
    let holder = stored("lease_holder");
    let frozen = names.iter().position(|n| *n == holder).unwrap();
    let other = 1 - frozen;

    // The holder is retrying a batch the upstream refuses for now when it is stopped (SIGSTOP,
    // as a long stall would).
    fake.set_mode(Mode::Unavailable);
    let mark = fake.mark();
    let second = submit_through(dir.path(), &hubs[frozen].url, "second", 20).await;
    fake.wait_calls(mark, 2, LIMIT).await;
    signal(&hubs[frozen].child, "STOP");
    let stopped = std::time::Instant::now();
    [&gate0, &gate1][frozen].slow(Duration::from_millis(500));
    fake.set_mode(Mode::Accept);
    // Its lease runs out; the other instance takes over at the stored cursor.
    fake.wait_until(LIMIT, "the refused batch, from the other instance", |got| {
        second.iter().all(|id| got.contains_key(id))
    })
    .await;
    assert_eq!(stored("lease_holder"), names[other]);
    // "Within the lease time" and the third of it the others wait between tries (2 s lease:
    // 2.7 s), with room for a loaded machine — not the minute the waits allow.
    assert!(
        stopped.elapsed() < Duration::from_secs(10),
        "taken over {:?} after the holder stopped",
        stopped.elapsed()
    );

    // Thawed, its retry is due at once and its renewal takes a second: the lease's local
    // deadline, passed while it was frozen, stops the send.
    signal(&hubs[frozen].child, "CONT");
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let line = hubs[frozen]
            .logs
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the thawed instance says it no longer delivers");
        if line.contains("no longer delivers") {
            break;
        }
    }
    [&gate0, &gate1][frozen].open();
    // It takes ratings again; the holder delivers them.
    let third = submit_through(dir.path(), &hubs[frozen].url, "third", 100).await;
    fake.wait_until(LIMIT, "the third ratings upstream", |got| {
        third.iter().all(|id| got.contains_key(id))
    })
    .await;
    let got = fake.received();
    assert_eq!(got.len(), 220, "every rating upstream, nothing else");
    let twice = got.values().filter(|n| **n > 1).count();
    assert_eq!(
        twice, 0,
        "{twice} ratings sent twice: the thawed instance delivered beside the holder"
    );
    for hub in &hubs {
        let status =
            crate::utils::upstream_status(dev_admin_channel(dir.path(), &hub.url).await, "fake")
                .await;
        assert_eq!(status.delivering_instance, names[other]);
    }
    stop_all(hubs).await;
}

#[tokio::test]
async fn a_writer_stopped_inside_its_transaction_does_not_stop_the_other_instances() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let db = crate::pg::database_for(dir.path());
    let hubs = spawn_instances(
        dir.path(),
        &fake.url(),
        &[("hub-0", db.as_str()), ("hub-1", db.as_str())],
    );
    // A steady load on hub-0. The call whose group its stopped writer held fails UNAVAILABLE
    // (nothing of it committed); every other call is stored.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let (progress, mut batches) = tokio::sync::watch::channel(0usize);
    let load = {
        let (dir, url) = (dir.path().to_owned(), hubs[0].url.clone());
        tokio::spawn(async move {
            let mut client = IngestServiceClient::new(dev_admin_channel(&dir, &url).await);
            let mut acked = Vec::new();
            for n in 0.. {
                if *stopping.borrow() {
                    break;
                }
                let ratings = (0..20).map(|i| rating(&format!("load-{n}-{i}"))).collect();
                match client
                    .submit_ratings(pb::SubmitRatingsRequest { ratings })
                    .await
                {
                    Ok(response) => {
                        for r in response.into_inner().results {
                            assert_eq!(outcome(&r), pb::Outcome::Accepted);
                            acked.push(r.hub_id);
                        }
                        progress.send_modify(|p| *p += 1);
                    }
                    Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
                }
            }
            acked
        })
    };

    // Stop hub-0 until it is caught inside a group transaction that holds the sequencer row.
    let holds_sequencer = || {
        crate::pg::exec(
            &db,
            "SELECT count(*)::text FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid \
             WHERE a.application_name = 'rating-hub/hub-0' \
             AND a.state = 'idle in transaction' AND l.relation = 'feed_head'::regclass",
        )
        .pop()
        .unwrap()
            != "0"
    };
    let mut caught = false;
    for _ in 0..200 {
        let seen = *batches.borrow_and_update();
        tokio::time::timeout(LIMIT, batches.wait_for(|n| *n > seen))
            .await
            .expect("hub-0 takes the load")
            .unwrap();
        signal(&hubs[0].child, "STOP");
        // A statement already sent finishes on the server; the session then waits inside
        // its transaction. Bounded: a few looks, 20 ms apart.
        for _ in 0..5 {
            if holds_sequencer() {
                caught = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if caught {
            break;
        }
        signal(&hubs[0].child, "CONT");
    }
    assert!(
        caught,
        "hub-0 was stopped inside a transaction holding the sequencer"
    );

    // hub-1's writer waits for the sequencer until PostgreSQL ends the stalled session: the
    // promise is 5 s (idle_in_transaction_session_timeout); 12 s leaves room for a loaded
    // machine, not for a missing timeout (without it, hub-1 waits for good).
    let started = std::time::Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(12),
        submit_through(dir.path(), &hubs[1].url, "other", 1),
    )
    .await
    .expect("the other instance stores ratings while hub-0 is stopped");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "hub-1 stored at once: hub-0 was not holding the sequencer ({:?})",
        started.elapsed()
    );
    signal(&hubs[0].child, "CONT");
    let seen = *batches.borrow_and_update();
    tokio::time::timeout(LIMIT, batches.wait_for(|n| *n >= seen + 3))
        .await
        .expect("hub-0 stores ratings again")
        .unwrap();
    stop.send_replace(true);
    let mut acked: HashSet<String> = load.await.unwrap().into_iter().collect();
    acked.extend(other);

    // Everything acknowledged is stored once, in a gapless feed; nothing else is.
    let feed = whole_feed(dev_admin_channel(dir.path(), &hubs[1].url).await).await;
    let stored: HashSet<String> = feed.into_iter().map(|r| r.hub_id).collect();
    assert_eq!(stored, acked, "exactly the acknowledged ratings");
    stop_all(hubs).await;
}

/// Every instance reports the stored cursor (and who holds the lease), not a copy of its own
/// in memory: the instance that does not deliver had only the cursor it loaded at start,
/// and reported a lag that had long been delivered.
#[tokio::test]
async fn every_instance_reports_the_stored_cursor_and_the_lease_holder() {
    let fake = FakeUpstream::start().await;
    let (builder, _db) = on_new_database();
    let builder =
        crate::relay::upstream(builder, "fake", &fake.url()).set("storage.instance", "\"hub-a\"");
    let a = builder.start().await;
    let b = a.peer_as("hub-b").await;
    let sent = crate::relay::submit_many(&a, "x", 120).await;
    fake.wait_until(LIMIT, "every rating upstream", |got| {
        sent.iter().all(|id| got.contains_key(id))
    })
    .await;
    eventually(LIMIT, "the holder's cursor stored at the head", || async {
        let (sa, sb) = (
            crate::relay::status(&a, "fake").await,
            crate::relay::status(&b, "fake").await,
        );
        sa.cursor == 120 && sb.cursor == 120
    })
    .await;
    let (sa, sb) = (
        crate::relay::status(&a, "fake").await,
        crate::relay::status(&b, "fake").await,
    );
    for st in [&sa, &sb] {
        assert_eq!((st.lag_records, st.head_sequence), (0, 120), "{st:?}");
        assert_eq!(st.lag_seconds, 0.0, "{st:?}");
    }
    assert_eq!(sa.delivering_instance, sb.delivering_instance);
    assert!(
        sa.delivering_here != sb.delivering_here,
        "one of the two delivers: {sa:?} {sb:?}"
    );
    a.stop().await;
    b.stop().await;
}

/// A province of two instances on one database checks a lower hub's reports one at a time
/// across both: two forking heads of the city, each extending the head accepted before,
/// sent to the two instances at once, cannot both be accepted. Each waits for the
/// database's lock (held here by the test until both are seen waiting for it); once it is
/// released, one is accepted and the other is not (told to prove from the new head, or
/// stale when it is the older, smaller one).
#[tokio::test]
async fn two_instances_of_a_province_accept_one_of_two_forking_heads() {
    use crate::rating_log::{an_hour_ago, head, report, tree};
    use rating_hub::merkle::{Frontier, HashAlg, Prover};
    use sqlx::Connection;
    let key = crate::rating_log::new_log_key();
    let (builder, url) = on_new_database();
    let a = crate::rating_log::with_city_hub(builder, &key)
        .start()
        .await;
    let b = a.peer().await;
    let alg = HashAlg::Sm3;
    let t = an_hour_ago();
    let (r5, _) = tree("a", 5);
    let first = IngestServiceClient::new(a.channel_as("city-hub").await)
        .report_tree_head(report(head(5, r5, t, &key), 0, vec![]))
        .await
        .unwrap()
        .into_inner();
    assert!(first.accepted, "{first:?}");
    // Two logs that share the first five leaves and then differ.
    let fork = |tag: &str, n: u64| {
        let mut f = Frontier::empty(alg);
        let mut nodes = crate::rating_log::Nodes::new();
        for i in 0..n {
            let leaf = if i < 5 {
                format!("a{i}")
            } else {
                format!("{tag}{i}")
            };
            for (l, idx, h) in f.append(alg.leaf(leaf.as_bytes())) {
                nodes.insert((l, idx), h);
            }
        }
        let proof = Prover { alg, nodes: &nodes }.consistency(5, n).unwrap();
        (f.root(), proof)
    };
    let (rx, px) = fork("x", 8);
    let (ry, py) = fork("y", 10);

    let mut holder = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended('rating-hub peer heads city-hub', 0))")
        .execute(&mut holder)
        .await
        .unwrap();
    let (mut ca, mut cb) = (
        IngestServiceClient::new(a.channel_as("city-hub").await),
        IngestServiceClient::new(b.channel_as("city-hub").await),
    );
    let (hx, hy) = (head(8, rx, t + 1, &key), head(10, ry, t + 2, &key));
    let to_a = tokio::spawn(async move {
        ca.report_tree_head(report(hx, 5, px))
            .await
            .unwrap()
            .into_inner()
    });
    let to_b = tokio::spawn(async move {
        cb.report_tree_head(report(hy, 5, py))
            .await
            .unwrap()
            .into_inner()
    });
    // Both instances wait for the database's lock (neither decided alone).
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        )
        .fetch_one(&mut sqlx::postgres::PgConnection::connect(&url).await.unwrap())
        .await
        .unwrap()
    };
    eventually(LIMIT, "both reports wait for the lock", || async {
        waiting().await == 2
    })
    .await;
    assert!(!to_a.is_finished() && !to_b.is_finished());
    holder.close().await.unwrap();
    let (ra, rb) = (to_a.await.unwrap(), to_b.await.unwrap());
    let accepted: Vec<u64> = [&ra, &rb]
        .iter()
        .filter(|r| r.accepted)
        .map(|r| r.accepted_size)
        .collect();
    assert_eq!(accepted.len(), 1, "one of two forking heads: {ra:?} {rb:?}");
    let other = if ra.accepted { &rb } else { &ra };
    assert_eq!(other.accepted_size, accepted[0], "{other:?}");
    // Told to prove from the new head (the smaller fork came second), or stale (the larger,
    // newer one came second): either way not accepted, and no finding.
    assert!(
        other.problem.contains("from_size") || other.problem.starts_with("stale"),
        "{other:?}"
    );
    let recorded: Vec<u64> = crate::rating_log::peer_heads(&a, false)
        .await
        .iter()
        .filter(|h| h.outcome == "accepted")
        .map(|h| h.tree_size)
        .collect();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0], accepted[0]);
}

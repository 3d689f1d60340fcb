//! README promises that no other test exercised (issue #26): each test quotes the promise
//! it checks, and fails when the behaviour breaks.

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::security::AdminServiceClient;
use crate::utils::*;

/// "Ratings, 办件 events, case histories and the PII audit trail are append-only: the
/// database refuses updates and deletes." Reached under the hub, straight in its database:
/// every UPDATE and DELETE of those tables is refused by the database itself.
#[tokio::test]
async fn the_database_refuses_updates_and_deletes_of_what_is_append_only() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mut bad = rating("append-1");
    bad.level = pb::Level::VeryDissatisfied as i32;
    bad.text = "排队太久".into();
    let stored = submit_one(&mut ingest, bad).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted);
    // An unmasked read (an audit row), a 办件 event, a case step.
    hub.query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: stored.hub_id.clone(),
        })
        .await
        .unwrap();
    let case = pb::ServiceCase {
        case_number: "CASE-append".into(),
        event: pb::CaseEvent::Accepted as i32,
        occurred_at: Some(now()),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        ..Default::default()
    };
    let r = ingest
        .report_service_cases(pb::ReportServiceCasesRequest { cases: vec![case] })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(outcome(&r[0]), pb::Outcome::Accepted, "{r:?}");
    let mut rect = pb::rectification_service_client::RectificationServiceClient::new(
        hub.channel_as("tester").await,
    );
    let case_id = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases[0]
        .id;
    rect.record_action(pb::RecordActionRequest {
        id: case_id,
        action: pb::CaseAction::Contact as i32,
        note: "已电话联系".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    let dir = hub.dir.path().to_path_buf();
    for (table, key) in [
        ("ratings", "feed_seq"),
        ("service_case_events", "id"),
        ("pii_access", "id"),
        ("bad_rating_case_entries", "id"),
    ] {
        for sql in [
            format!("UPDATE {table} SET {key} = {key}"),
            format!("DELETE FROM {table}"),
        ] {
            let err = crate::pg::try_exec_on_hub(&dir, &sql)
                .expect_err(&format!("{sql}: the database took it"));
            assert!(err.contains("append-only"), "{sql}: {err}");
        }
    }
    // Nothing changed.
    let got = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: stored.hub_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.rating.unwrap().text, "排队太久");
    hub.stop().await;
}

/// "The caller's certificate, never the message, says who submitted it": a caller without
/// the relay role who sets `source_system`, `hub_id` or `origin_*` has them ignored — the
/// rating is stored as the certificate's principal's, under an id the hub chose.
#[tokio::test]
async fn the_certificate_not_the_message_names_the_source() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let spoofed_id = "01890000-0000-7000-8000-000000000001";
    let mut r = rating("spoof-1");
    r.source_system = "national-platform".into();
    r.hub_id = spoofed_id.into();
    r.origin_source_system = "province".into();
    r.origin_source_key = "p-1".into();
    let stored = submit_one(&mut ingest, r.clone()).await;
    assert_eq!(outcome(&stored), pb::Outcome::Accepted, "{stored:?}");
    assert_ne!(stored.hub_id, spoofed_id, "the hub chose the id");
    let got = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: stored.hub_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(got.source_system, "tester", "the certificate's principal");
    assert_eq!(
        (
            got.origin_source_system.as_str(),
            got.origin_source_key.as_str()
        ),
        ("", "")
    );
    // Sent again with other spoofed fields: the same rating (they are not part of it).
    r.source_system = "another".into();
    let again = submit_one(&mut ingest, r).await;
    assert_eq!(outcome(&again), pb::Outcome::Duplicate, "{again:?}");
    assert_eq!(again.hub_id, stored.hub_id);
    hub.stop().await;
}

/// "A principal … may only submit, read and rectify inside its scope; out-of-scope items are
/// refused one by one": in a stream and in a batch of 办件 events as in SubmitRatings, the
/// item outside is PERMISSION_DENIED and the one inside is taken.
#[tokio::test]
async fn out_of_scope_items_are_refused_one_by_one_in_streams_and_case_reports() {
    let mine = [org(1)];
    let hub = HubBuilder::new()
        .principal("org-one", &["submit", "read"], TestScope::Orgs(&mine))
        .start()
        .await;
    let mut ingest =
        pb::ingest_service_client::IngestServiceClient::new(hub.channel_as("org-one").await);
    let inside = rating("scope-in");
    let mut outside = rating("scope-out");
    outside.org_credit_code = org(2);
    let acks: Vec<pb::ItemResult> = ingest
        .stream_ratings(tokio_stream::iter(
            [inside, outside].map(|r| pb::StreamRatingsRequest { rating: Some(r) }),
        ))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap().result.unwrap())
        .collect()
        .await;
    let got: Vec<(u32, pb::Outcome)> = acks.iter().map(|a| (a.index, outcome(a))).collect();
    assert_eq!(
        got,
        [
            (0, pb::Outcome::Accepted),
            (1, pb::Outcome::PermissionDenied)
        ]
    );
    assert_eq!(acks[1].violations[0].field, "org_credit_code", "{acks:?}");

    let case = |n: &str, org: String| pb::ServiceCase {
        case_number: n.into(),
        event: pb::CaseEvent::Accepted as i32,
        occurred_at: Some(now()),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org,
        ..Default::default()
    };
    let results = ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![case("SC-IN", org(1)), case("SC-OUT", org(2))],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let got: Vec<(&str, pb::Outcome)> = results
        .iter()
        .map(|r| (r.source_key.as_str(), outcome(r)))
        .collect();
    assert_eq!(
        got,
        [
            ("SC-IN", pb::Outcome::Accepted),
            ("SC-OUT", pb::Outcome::PermissionDenied)
        ]
    );
    hub.stop().await;
}

/// "Server reflection (v1 and v1alpha)": a v1alpha client (grpcurl before 1.9, older
/// tooling) lists the hub's services.
#[tokio::test]
async fn reflection_v1alpha_lists_the_services() {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let hub = TestHub::start().await;
    let mut client = ServerReflectionClient::new(hub.channel_as("tester").await);
    let mut answers = client
        .server_reflection_info(tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "ratinghub.v1.IngestService",
        "ratinghub.v1.QueryService",
        "ratinghub.v1.SyncService",
        "ratinghub.v1.RectificationService",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    hub.stop().await;
}

/// "Replay dead letters (ReplayDeadLetters), all or by id": replaying one id sends that
/// rating again, and only that one.
#[tokio::test]
async fn replaying_one_dead_letter_by_id_sends_only_that_rating() {
    use crate::fake_upstream::FakeUpstream;
    let fake = FakeUpstream::start().await;
    fake.reject_origin_keys(["dl-0".to_string(), "dl-1".to_string()]);
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .start()
        .await;
    let ids = submit_new(&mut hub.ingest().await, "dl", 3).await;
    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let dead = loop {
        let dead = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                upstream: "fake".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        if dead.len() == 2 {
            break dead;
        }
        assert!(std::time::Instant::now() < deadline, "{dead:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    fake.reject_origin_keys([]);
    let replay = admin
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            upstream: "fake".into(),
            all: false,
            ids: vec![dead[0].id],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay.requested, 1);
    fake.wait_until(
        std::time::Duration::from_secs(30),
        "the replayed rating",
        |got| got.contains_key(&dead[0].hub_id),
    )
    .await;
    let got = fake.received();
    assert!(!got.contains_key(&dead[1].hub_id), "only the one replayed");
    assert!(got.contains_key(&ids[2]));
    // The replayed one is resolved once its delivery is recorded (just after the upstream
    // got it); the other stays a dead letter.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let open: Vec<u64> = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                upstream: "fake".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters
            .iter()
            .map(|d| d.id)
            .collect();
        if open == [dead[1].id] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "open dead letters {open:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hub.stop().await;
}

/// "Ratings found invalid or malicious on appeal stay stored but leave the scores": an
/// appeal found INVALID (not only MALICIOUS) takes its 差评 out of the counts, and one
/// UPHELD leaves it in.
#[tokio::test]
async fn an_appeal_found_invalid_leaves_the_counts_and_one_upheld_does_not() {
    use pb::rectification_service_client::RectificationServiceClient;
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mut ids = Vec::new();
    for key in ["appeal-invalid", "appeal-upheld"] {
        let mut r = rating(key);
        r.level = pb::Level::Dissatisfied as i32;
        r.text = "办理太慢".into();
        ids.push(submit_one(&mut ingest, r).await.hub_id);
    }
    async fn stats(hub: &TestHub) -> pb::StatsGroup {
        hub.query()
            .await
            .get_stats(pb::GetStatsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .groups
            .remove(0)
    }
    let before = stats(&hub).await;
    assert_eq!((before.total, before.bad), (2, 2));
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let cases = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases;
    for (hub_id, outcome) in [
        (&ids[0], pb::AppealOutcome::Invalid),
        (&ids[1], pb::AppealOutcome::Upheld),
    ] {
        let id = cases.iter().find(|c| &c.hub_id == hub_id).unwrap().id;
        rect.file_appeal(pb::FileAppealRequest {
            id,
            reason: "评价与本办件无关".into(),
            evidence_refs: vec!["办件记录-001".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let decided = rect
            .decide_appeal(pb::DecideAppealRequest {
                id,
                outcome: outcome as i32,
                note: "经核实".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .bad_rating_case
            .unwrap();
        assert_eq!(decided.appeal_outcome, outcome as i32);
    }
    let after = stats(&hub).await;
    assert_eq!(
        (after.total, after.bad),
        (1, 1),
        "the invalid one left the counts, the upheld one stayed"
    );
    // Stored still.
    let still = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: ids[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(still.rating.is_some());
    hub.stop().await;
}

/// "GetStats … grouped by region, organisation, item, staff, channel, day or month, optionally
/// ranked": each dimension keys its groups by the ratings' own values (the month in Beijing
/// time: 16:30 UTC on 28 February is 1 March there), and `rank_by` orders and ranks them.
#[tokio::test]
async fn stats_group_by_region_item_staff_and_month_and_rank() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mk = |key: &str, region: &str, item: &str, staff: &str, at: i64, level: pb::Level| {
        let mut r = rating(key);
        r.region_code = region.into();
        r.item_code = item.into();
        r.staff_id = staff.into();
        r.rated_at = Some(rating_hub::time::timestamp_from_micros(at));
        r.level = level as i32;
        if rating_hub::domain::rating::is_bad(level) {
            r.text = "不满意".into();
        }
        r
    };
    // 2026-02-28T16:30Z = 2026-03-01 00:30 CST; 2026-02-10 is February everywhere.
    let march_cst = 1_772_296_200_000_000;
    let feb = 1_770_681_600_000_000;
    let batch = vec![
        mk(
            "g1",
            "530102",
            "530100-ITEM-001",
            "S1",
            march_cst,
            pb::Level::VerySatisfied,
        ),
        mk(
            "g2",
            "530102",
            "530100-ITEM-002",
            "S2",
            feb,
            pb::Level::Dissatisfied,
        ),
        mk(
            "g3",
            "530103",
            "530100-ITEM-001",
            "S1",
            feb,
            pb::Level::Satisfied,
        ),
    ];
    for r in submit(&mut ingest, batch).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    let mut query = hub.query().await;
    let by = |dim: pb::StatsDimension, rank: pb::RankBy| {
        let mut query = query.clone();
        async move {
            query
                .get_stats(pb::GetStatsRequest {
                    group_by: vec![dim as i32],
                    rank_by: rank as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .groups
                .into_iter()
                .map(|g| (g.key.join("/"), g.total))
                .collect::<Vec<_>>()
        }
    };
    let unranked = pb::RankBy::Unspecified;
    let mut got = by(pb::StatsDimension::Region, unranked).await;
    got.sort();
    assert_eq!(got, [("530102".to_owned(), 2), ("530103".to_owned(), 1)]);
    let mut got = by(pb::StatsDimension::Item, unranked).await;
    got.sort();
    assert_eq!(
        got,
        [
            ("530100-ITEM-001".to_owned(), 2),
            ("530100-ITEM-002".to_owned(), 1)
        ]
    );
    let mut got = by(pb::StatsDimension::Staff, unranked).await;
    got.sort();
    assert_eq!(got, [("S1".to_owned(), 2), ("S2".to_owned(), 1)]);
    // 地级以上市: both Kunming districts roll up to 530100.
    let got = by(pb::StatsDimension::City, unranked).await;
    assert_eq!(got, [("530100".to_owned(), 3)]);
    let mut got = by(pb::StatsDimension::Month, unranked).await;
    got.sort();
    assert_eq!(got, [("2026-02".to_owned(), 2), ("2026-03".to_owned(), 1)]);
    // Ranked by 差评率, lowest first: S1 (0 %) before S2 (100 %).
    let ranked = query
        .get_stats(pb::GetStatsRequest {
            group_by: vec![pb::StatsDimension::Staff as i32],
            rank_by: pb::RankBy::BadRate as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups;
    let order: Vec<(String, u32)> = ranked.iter().map(|g| (g.key.join("/"), g.rank)).collect();
    assert_eq!(order, [("S1".to_owned(), 1), ("S2".to_owned(), 2)]);
    hub.stop().await;
}

/// "ListUpstreams: … lag in records and seconds": with the upstream down, the lag in seconds
/// is how long the oldest undelivered rating has waited, on the hub's clock.
#[tokio::test]
async fn upstream_lag_is_counted_in_seconds_too() {
    use crate::fake_upstream::{FakeUpstream, Mode};
    use rating_hub::clock::Clock;
    let fake = FakeUpstream::start().await;
    fake.set_mode(Mode::Unavailable);
    let clock = std::sync::Arc::new(rating_hub::clock::ManualClock::at(
        rating_hub::clock::SystemClock.now_micros(),
    ));
    let hub = crate::relay::upstream(HubBuilder::new().clock(clock.clone()), "fake", &fake.url())
        .start()
        .await;
    submit_new(&mut hub.ingest().await, "lag", 1).await;
    clock.advance(std::time::Duration::from_secs(90));
    let st = crate::relay::status(&hub, "fake").await;
    assert_eq!(st.lag_records, 1, "{st:?}");
    assert_eq!(st.lag_seconds, 90.0, "{st:?}");
    hub.stop().await;
}

/// "Every unmasked read is audited" — not only GetRating and ListRatings: Pull, Subscribe and
/// ListInvitations as a caller with read-pii each leave who, which call and which record in
/// the audit trail; a caller without read-pii reads masked data and leaves nothing.
#[tokio::test]
async fn unmasked_pull_subscribe_and_invitations_are_audited() {
    use crate::relay::SyncServiceClient;
    use rating_hub::clock::Clock;
    let clock = std::sync::Arc::new(rating_hub::clock::ManualClock::at(crate::rules::cst(
        "2025-06-03",
        10,
    )));
    let hub = HubBuilder::new()
        .clock(clock.clone())
        .principal("puller", &["pull"], TestScope::National)
        .start()
        .await;
    let mut r = rating("audited-1");
    r.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
    let id = submit_one(&mut hub.ingest().await, r).await.hub_id;
    // A Guangdong completion, reminded 24 hours later: an invitation.
    crate::rules::report(
        &hub,
        vec![crate::rules::completed(
            "GD-AUDIT",
            "440103",
            clock.now_micros(),
        )],
    )
    .await;
    clock.advance(std::time::Duration::from_secs(25 * 3600));
    assert_eq!(hub.hub.rules().tick().await.unwrap().invitations, 1);

    for who in ["puller", "tester"] {
        let mut sync = SyncServiceClient::new(hub.channel_as(who).await);
        let pulled = sync
            .pull(pb::PullRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pulled.ratings.len(), 1);
        let mut sub = sync
            .subscribe(pb::SubscribeRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = sub.next().await.unwrap().unwrap();
        assert_eq!(first.rating.unwrap().hub_id, id);
        drop(sub);
        let inv = sync
            .list_invitations(pb::ListInvitationsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .invitations;
        assert_eq!(inv.len(), 1);
    }
    let audit = AdminServiceClient::new(hub.channel_as("tester").await)
        .list_pii_access(pb::ListPiiAccessRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut rows: Vec<(String, String)> = audit
        .iter()
        .map(|a| (a.principal.clone(), a.rpc.clone()))
        .collect();
    rows.sort();
    rows.dedup();
    assert_eq!(
        rows,
        [
            ("tester".to_owned(), "ListInvitations".to_owned()),
            ("tester".to_owned(), "Pull".to_owned()),
            ("tester".to_owned(), "Subscribe".to_owned()),
        ],
        "the unmasked reads, each audited; the masked ones not"
    );
    assert!(
        audit
            .iter()
            .filter(|a| a.rpc != "ListInvitations")
            .all(|a| a.hub_id == id),
        "{audit:?}"
    );
    hub.stop().await;
}

/// "A StreamRatings stream is slowed down to the quota instead" of refused: over the
/// principal's rating quota, every streamed rating is still taken, at the quota's pace
/// (5 a second after a burst of 1: six take at least a second), while the same six in one
/// SubmitRatings batch are refused.
#[tokio::test]
async fn a_stream_over_the_rating_quota_is_slowed_not_refused() {
    let hub = HubBuilder::new()
        .principal("slow", &["submit"], TestScope::National)
        .set("principals.slow.ratings_per_sec", "5")
        .set("principals.slow.ratings_burst", "1")
        .start()
        .await;
    let mut ingest =
        pb::ingest_service_client::IngestServiceClient::new(hub.channel_as("slow").await);
    let started = std::time::Instant::now();
    let acks: Vec<pb::ItemResult> = ingest
        .stream_ratings(tokio_stream::iter((0..6).map(|i| {
            pb::StreamRatingsRequest {
                rating: Some(rating(&format!("slow-{i}"))),
            }
        })))
        .await
        .unwrap()
        .into_inner()
        .map(|a| a.unwrap().result.unwrap())
        .collect()
        .await;
    assert_eq!(acks.len(), 6);
    assert!(
        acks.iter().all(|a| outcome(a) == pb::Outcome::Accepted),
        "{acks:?}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "paced to the quota: {:?}",
        started.elapsed()
    );
    let refused = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: (0..6).map(|i| rating(&format!("batch-{i}"))).collect(),
        })
        .await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(bad_request_fields(&refused), ["ratings"]);
    hub.stop().await;
}

/// "Spot-check sampling": a profile's spot_check_share picks archived cases for the
/// authority to check (here every one, share 1.0); the check comes only after archiving,
/// and once.
#[tokio::test]
async fn spot_checks_come_after_archiving_once() {
    use pb::rectification_service_client::RectificationServiceClient;
    let hub = HubBuilder::new()
        .set("rules.profiles.kunming.spot_check_share", "1.0")
        .start()
        .await;
    let mut r = rating("spot-1");
    r.level = pb::Level::VeryDissatisfied as i32;
    r.text = "材料被退回三次".into();
    r.rater.as_mut().unwrap().real_name = false;
    let id = submit_one(&mut hub.ingest().await, r).await.hub_id;
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let case = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == id)
        .unwrap();
    assert!(case.spot_check_selected, "{case:?}");
    let step = |action: pb::CaseAction, refs: &[&str]| pb::RecordActionRequest {
        id: case.id,
        action: action as i32,
        note: "记录".into(),
        evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let early = rect
        .record_action(step(pb::CaseAction::SpotCheck, &[]))
        .await
        .unwrap_err();
    assert!(early.message().contains("only archived"), "{early:?}");
    for (action, refs) in [
        (pb::CaseAction::Contact, &[][..]),
        (pb::CaseAction::Rectify, &["整改台账-1"][..]),
        (pb::CaseAction::FeedBack, &[][..]),
        (pb::CaseAction::Archive, &[][..]),
        (pb::CaseAction::SpotCheck, &[][..]),
    ] {
        rect.record_action(step(action, refs))
            .await
            .unwrap_or_else(|e| panic!("{action:?}: {e:?}"));
    }
    let again = rect
        .record_action(step(pb::CaseAction::SpotCheck, &[]))
        .await
        .unwrap_err();
    assert!(
        again.message().contains("already spot-checked"),
        "{again:?}"
    );

    // 抽查率 (Ordos: "不低于50%"): the achieved rate per group. A second case, archived
    // and not checked, halves it.
    let mut r = rating("spot-2");
    r.level = pb::Level::Dissatisfied as i32;
    r.text = "等候太久".into();
    r.rater.as_mut().unwrap().real_name = false;
    let id2 = submit_one(&mut hub.ingest().await, r).await.hub_id;
    let case2 = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == id2)
        .unwrap()
        .id;
    for (action, refs) in [
        (pb::CaseAction::Contact, &[][..]),
        (pb::CaseAction::Rectify, &["整改台账-2"][..]),
        (pb::CaseAction::FeedBack, &[][..]),
        (pb::CaseAction::Archive, &[][..]),
    ] {
        rect.record_action(pb::RecordActionRequest {
            id: case2,
            ..step(action, refs)
        })
        .await
        .unwrap();
    }
    let g = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .groups
        .remove(0);
    assert_eq!(
        (g.archived_cases, g.spot_checked_cases, g.spot_check_rate),
        (2, 1, 0.5)
    );
    hub.stop().await;
}

/// "Relays … rate-limited (governor)": an upstream allowed 2 requests a second (burst 1, one
/// rating a request) receives five ratings over at least two seconds, not at once.
#[tokio::test]
async fn delivery_keeps_to_the_upstreams_rate_limit() {
    use crate::fake_upstream::FakeUpstream;
    let fake = FakeUpstream::start().await;
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .set("upstreams.fake.requests_per_sec", "2")
        .set("upstreams.fake.requests_burst", "1")
        .set("upstreams.fake.batch_size", "1")
        .set("upstreams.fake.in_flight", "1")
        .start()
        .await;
    let started = std::time::Instant::now();
    submit_new(&mut hub.ingest().await, "rl", 5).await;
    fake.wait_until(std::time::Duration::from_secs(60), "all five", |got| {
        got.len() == 5
    })
    .await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(1900),
        "five requests at two a second take two seconds: {:?}",
        started.elapsed()
    );
    hub.stop().await;
}

/// "request_timeout_ms: a timed-out request is retried": an upstream that never answers in
/// time is a retried failure that says so, and nothing is counted delivered.
#[tokio::test]
async fn a_request_that_times_out_is_retried_and_shown() {
    use crate::fake_upstream::{FakeUpstream, Mode};
    let fake = FakeUpstream::start().await;
    fake.set_mode(Mode::Slow(std::time::Duration::from_secs(3600)));
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .set("upstreams.fake.request_timeout_ms", "200")
        .start()
        .await;
    let mark = fake.mark();
    submit_new(&mut hub.ingest().await, "to", 1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let st = loop {
        let st = crate::relay::status(&hub, "fake").await;
        if st.last_error.to_lowercase().contains("timeout")
            || st.last_error.to_lowercase().contains("timed out")
        {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(st.lag_records, 1, "not delivered: {st:?}");
    assert_eq!(st.open_dead_letters, 0, "retried, not given up: {st:?}");
    // Retried indeed: the upstream is asked again after the timeout (two calls in all).
    fake.wait_calls(mark, 2, std::time::Duration::from_secs(30))
        .await;
    hub.stop().await;
}

/// "A background connection checkpoints the WAL so commits do not pay for it" (SQLite, the
/// embedded default, whatever backend the suite runs on): committed pages reach the database
/// file soon after the commits, long before the writer's own checkpoint at 4,000 pages.
#[tokio::test]
async fn sqlite_wal_pages_reach_the_database_file_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("wal-hub.db");
    let hub = HubBuilder::new()
        .set("storage.url", &format!("{:?}", db.display().to_string()))
        .start_in_dir(dir)
        .await;
    // The writer's own checkpoint is the backstop, at 4,000 pages, on its live connection.
    assert!(
        hub.hub
            .store()
            .durability()
            .ends_with("wal_autocheckpoint=4000"),
        "{}",
        hub.hub.store().durability()
    );
    let before = std::fs::metadata(&db).unwrap().len();
    submit_new(&mut hub.ingest().await, "wal", 200).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&db).unwrap().len() <= before {
        assert!(
            std::time::Instant::now() < deadline,
            "the database file did not grow: no background checkpoint"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    hub.stop().await;
}

/// "Subscribe (history from a cursor, then live, at the reader's pace)": a subscriber that
/// reads one rating and stops holds the hub to a page or two of history (the pages it read
/// are the audited ones), not all 3,000; reading on, it gets every one, in order.
#[tokio::test]
async fn subscribe_goes_at_the_readers_pace() {
    use crate::relay::SyncServiceClient;
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    for chunk in 0..6 {
        submit_new(&mut ingest, &format!("pace{chunk}"), 500).await;
    }
    let channel = hub
        .endpoint(Some(&hub.client_files("tester")))
        .initial_stream_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut sub = SyncServiceClient::new(channel)
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = sub.next().await.unwrap().unwrap().rating.unwrap();
    assert_eq!(first.feed_sequence, 1);
    let admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let audited = || {
        let mut admin = admin.clone();
        async move {
            let mut n = 0;
            let mut token = String::new();
            loop {
                let page = admin
                    .list_pii_access(pb::ListPiiAccessRequest {
                        page_size: 1000,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                n += page.entries.iter().filter(|e| e.rpc == "Subscribe").count();
                if page.next_page_token.is_empty() {
                    break n;
                }
                token = page.next_page_token;
            }
        }
    };
    // Given half a second to run ahead, a hub that buffered without bound would have read
    // (and audited) all 3,000.
    let until = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while std::time::Instant::now() < until {
        let n = audited().await;
        assert!(n <= 1000, "{n} ratings read ahead of a reader that read 1");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut last = first.feed_sequence;
    for _ in 1..3000 {
        let r = sub.next().await.unwrap().unwrap().rating.unwrap();
        assert_eq!(r.feed_sequence, last + 1, "in order, none missing");
        last = r.feed_sequence;
    }
    hub.stop().await;
}

/// The follow-up survey sample (Yunnan 二(三), Kunming 第九条, Changchun 三(五)): a share of
/// the raters, the same for the same draw, another for another, page after page; the rest of
/// the filter's ratings are not in it.
#[tokio::test]
async fn a_follow_up_survey_samples_a_share_of_raters_repeatably() {
    let hub = TestHub::start().await;
    let ids: std::collections::HashSet<String> = submit_new(&mut hub.ingest().await, "smp", 200)
        .await
        .into_iter()
        .collect();
    let mut query = hub.query().await;
    let sample = |share: f64, draw: &str, page_size: u32| {
        let mut query = query.clone();
        let draw = draw.to_owned();
        async move {
            let mut got = Vec::new();
            let mut token = String::new();
            loop {
                let page = query
                    .sample_ratings(pb::SampleRatingsRequest {
                        share,
                        draw: draw.clone(),
                        page_size,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                got.extend(page.ratings.into_iter().map(|r| r.hub_id));
                if page.next_page_token.is_empty() {
                    break got;
                }
                token = page.next_page_token;
            }
        }
    };
    let q4 = sample(0.25, "2026-Q4 回访", 1000).await;
    assert!(
        (25..=80).contains(&q4.len()),
        "{} of 200 for a quarter",
        q4.len()
    );
    assert!(q4.iter().all(|id| ids.contains(id)));
    assert_eq!(
        sample(0.25, "2026-Q4 回访", 1000).await,
        q4,
        "the same draw, the same sample"
    );
    assert_eq!(
        sample(0.25, "2026-Q4 回访", 7).await,
        q4,
        "page by page, the same"
    );
    assert_ne!(
        sample(0.25, "2027-Q1 回访", 1000).await,
        q4,
        "another draw, another sample"
    );
    assert_eq!(
        sample(0.25, "  2026-Q4 回访 ", 1000).await,
        q4,
        "the name as written, around spaces"
    );
    // A follow-up (its rater is drawn on the original) and a rating with nobody to reach
    // are never in a sample, not even a whole one.
    let first = ids.iter().next().unwrap().clone();
    let original = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: first.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    let mut follow_up = rating("smp-follow-up");
    follow_up.case_number = original.case_number.clone();
    follow_up.follow_up_of = original.source_key.clone();
    let mut nobody = rating("smp-nobody");
    nobody.rater = None;
    for r in submit(&mut hub.ingest().await, vec![follow_up, nobody]).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    let whole: std::collections::HashSet<String> =
        sample(1.0, "all", 1000).await.into_iter().collect();
    assert_eq!(whole, ids, "every original, and nothing else");
    let err = query
        .sample_ratings(pb::SampleRatingsRequest {
            share: 0.0,
            draw: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["share", "draw"]);
    // A name that would forge a log line is refused.
    let err = query
        .sample_ratings(pb::SampleRatingsRequest {
            share: 0.5,
            draw: "2026\nINFO forged".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["draw"]);
    hub.stop().await;
}

/// Guangdong 第十八条 「责令服务评价连续排名靠后的工作人员限期整改」: staff among the lowest in two
/// consecutive quarters are listed with their ranks; one low in a single quarter is not.
#[tokio::test]
async fn staff_ranked_low_in_consecutive_quarters_are_listed() {
    let hub = TestHub::start().await;
    let at = |date: &str| {
        Some(rating_hub::time::timestamp_from_micros(
            rating_hub::rules::Date::parse(date).unwrap().start_micros() + 10 * 3_600_000_000,
        ))
    };
    let mk = |key: &str, staff: &str, level: pb::Level, date: &str| {
        let mut r = rating(key);
        r.staff_id = staff.into();
        r.level = level as i32;
        r.rated_at = at(date);
        r
    };
    use pb::Level::{Dissatisfied, Satisfied, VerySatisfied};
    let batch = vec![
        mk("q3-s1", "S1", VerySatisfied, "2025-08-15"),
        mk("q3-s2", "S2", Satisfied, "2025-08-15"),
        mk("q3-s3", "S3", Dissatisfied, "2025-08-15"),
        mk("q4-s1", "S1", VerySatisfied, "2025-11-15"),
        mk("q4-s2", "S2", Dissatisfied, "2025-11-15"),
        mk("q4-s3", "S3", Dissatisfied, "2025-11-15"),
        // Ratings about no staff member: not a staff member ranked low.
        mk("q3-none", "", Dissatisfied, "2025-08-16"),
        mk("q4-none", "", Dissatisfied, "2025-11-16"),
    ];
    for r in submit(&mut hub.ingest().await, batch).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    let answer = hub
        .query()
        .await
        .list_persistently_low_ranked(pb::ListPersistentlyLowRankedRequest {
            filter: Some(pb::RatingFilter {
                region_code_prefix: "5301".into(),
                ..Default::default()
            }),
            year: 2025,
            quarter: 4,
            bottom: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.periods, ["2025-Q3", "2025-Q4"]);
    let got: Vec<(String, Vec<u32>, Vec<u32>)> = answer
        .groups
        .into_iter()
        .map(|g| (g.key, g.ranks, g.ranked))
        .collect();
    // Q3: S1 10, S2 8, S3 2 → S3 last. Q4: S1 10, S2 2, S3 2 → S2 and S3 tied last.
    assert_eq!(got, [("S3".to_owned(), vec![3, 2], vec![3, 3])]);
    let err = hub
        .query()
        .await
        .list_persistently_low_ranked(pb::ListPersistentlyLowRankedRequest {
            year: 1999,
            quarter: 5,
            periods: 9,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["year", "quarter", "periods"]);
    let err = hub
        .query()
        .await
        .list_persistently_low_ranked(pb::ListPersistentlyLowRankedRequest {
            year: 2025,
            quarter: 4,
            dimension: pb::StatsDimension::Month as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["dimension"]);
    hub.stop().await;
}

/// Guangdong 第十九条 「对企业和群众反映集中的问题，限期依法依规整改解决」: 差评 counted by reason,
/// most frequent first; praise and a 差评 an appeal found invalid are not counted.
#[tokio::test]
async fn bad_ratings_are_counted_by_reason() {
    use pb::rectification_service_client::RectificationServiceClient;
    let hub = TestHub::start().await;
    let mk = |key: &str, level: pb::Level, codes: &[&str]| {
        let mut r = rating(key);
        r.level = level as i32;
        r.detail_codes = codes.iter().map(|c| c.to_string()).collect();
        r
    };
    use pb::Level::{Dissatisfied, Satisfied, VeryDissatisfied};
    let batch = vec![
        mk("why-a", VeryDissatisfied, &["501", "503"]),
        mk("why-b", Dissatisfied, &["501"]),
        mk("why-c", Dissatisfied, &[]),
        mk("why-d", Satisfied, &["501"]),
        mk("why-e", Dissatisfied, &["503"]),
    ];
    let ids: Vec<String> = submit(&mut hub.ingest().await, batch)
        .await
        .into_iter()
        .map(|r| {
            assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
            r.hub_id
        })
        .collect();
    // E is found invalid on appeal.
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let case = rect
        .list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == ids[4])
        .unwrap()
        .id;
    rect.file_appeal(pb::FileAppealRequest {
        id: case,
        reason: "与本办件无关".into(),
        evidence_refs: vec!["办件记录".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    rect.decide_appeal(pb::DecideAppealRequest {
        id: case,
        outcome: pb::AppealOutcome::Invalid as i32,
        note: "经核实".into(),
    })
    .await
    .unwrap();
    let answer = hub
        .query()
        .await
        .count_bad_rating_reasons(pb::CountBadRatingReasonsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, u64)> = answer
        .reasons
        .into_iter()
        .map(|r| (r.code, r.count))
        .collect();
    assert_eq!(
        got,
        [
            ("501".to_owned(), 2),
            (String::new(), 1),
            ("503".to_owned(), 1)
        ]
    );
    assert_eq!(answer.bad_ratings, 3);
    hub.stop().await;
}

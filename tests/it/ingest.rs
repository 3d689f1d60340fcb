use std::collections::HashSet;

use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::utils::*;

#[tokio::test]
async fn submit_one_rating_is_accepted_and_read_back_unchanged() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let sent = rating("one");
    let result = submit_one(&mut ingest, sent.clone()).await;
    assert_eq!(outcome(&result), pb::Outcome::Accepted);
    assert_eq!(result.source_key, "one");
    assert_eq!(result.feed_sequence, 1);
    let hub_id = uuid::Uuid::parse_str(&result.hub_id).expect("hub id is a UUID");
    assert_eq!(
        hub_id.get_version_num(),
        7,
        "hub ids are time-ordered UUIDv7"
    );

    let got = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: result.hub_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(got.hub_id, result.hub_id);
    assert_eq!(
        got.source_system, "tester",
        "the source is the caller's principal"
    );
    assert_eq!(got.feed_sequence, 1);
    assert!(got.received_at.is_some());
    // Everything the source sent comes back as sent.
    let mut sent_cmp = got.clone();
    sent_cmp.hub_id = String::new();
    sent_cmp.source_system = String::new();
    sent_cmp.feed_sequence = 0;
    sent_cmp.received_at = None;
    assert_eq!(sent_cmp, sent);
    hub.stop().await;
}

#[tokio::test]
async fn batch_with_good_and_bad_items_accepts_the_good_and_stores_none_of_the_bad() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mut bad_org = rating("b1");
    bad_org.org_credit_code = "91350100M000100Y44".into();
    let mut bad_level = rating("b2");
    bad_level.level = 0;
    let results = submit(
        &mut ingest,
        vec![rating("g0"), bad_org, rating("g2"), bad_level, rating("g4")],
    )
    .await;
    let outcomes: Vec<_> = results.iter().map(outcome).collect();
    use pb::Outcome::*;
    assert_eq!(outcomes, [Accepted, Invalid, Accepted, Invalid, Accepted]);
    assert_eq!(
        results.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(results[1].violations[0].field, "org_credit_code");
    assert_eq!(results[3].violations[0].field, "level");
    assert!(results[1].hub_id.is_empty() && results[1].feed_sequence == 0);
    // Gapless: the three good ones hold feed 1..=3.
    let seqs: Vec<u64> = results
        .iter()
        .filter(|r| r.outcome == Accepted as i32)
        .map(|r| r.feed_sequence)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let listed = hub
        .query()
        .await
        .list_ratings(pb::ListRatingsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .ratings;
    let keys: Vec<_> = listed.iter().map(|r| r.source_key.as_str()).collect();
    assert_eq!(keys, ["g0", "g2", "g4"]);
    hub.stop().await;
}

#[tokio::test]
async fn empty_and_oversized_batches_are_refused_with_the_field_named() {
    let hub = TestHub::start_with(&[("server", "max_batch", "3")]).await;
    let mut ingest = hub.ingest().await;
    let err = ingest
        .submit_ratings(pb::SubmitRatingsRequest { ratings: vec![] })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["ratings"]);
    let err = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: (0..4).map(|i| rating(&format!("k{i}"))).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["ratings"]);
    assert!(err.message().contains("at most 3"), "{}", err.message());
    hub.stop().await;
}

#[tokio::test]
async fn stream_of_10000_ratings_is_acknowledged_in_order_after_commit() {
    const N: usize = 10_000;
    let hub = TestHub::start().await;
    // Committed means durable: the writer's own connection, read back, waits for its WAL
    // at each commit. (A kill -9 cannot tell a missing fsync: the page cache survives it.)
    // The PostgreSQL test server runs with synchronous_commit=off, which the writer's
    // sessions must undo (and with fsync=off, which the hub reports and cannot change).
    let durability = hub.hub.store().durability().to_owned();
    if crate::pg::enabled() {
        assert!(
            durability.starts_with("postgres synchronous_commit=on fsync="),
            "{durability}"
        );
    } else {
        assert_eq!(
            durability,
            "sqlite journal_mode=wal synchronous=FULL wal_autocheckpoint=4000"
        );
    }
    let mut ingest = hub.ingest().await;
    let outbound = tokio_stream::iter((0..N).map(|i| pb::StreamRatingsRequest {
        rating: Some(if i % 1000 == 999 {
            // Every thousandth is invalid and must be answered, not dropped.
            let mut r = rating(&format!("s{i}"));
            r.region_code = "12".into();
            r
        } else {
            rating(&format!("s{i}"))
        }),
    }));
    let mut acks = ingest.stream_ratings(outbound).await.unwrap().into_inner();
    // Reads on a connection of their own: an acknowledged rating is readable before the next
    // acknowledgement is even taken (a hub that acknowledged on enqueue would fail here).
    let mut reader = QueryServiceClient::new(hub.channel_as("tester").await);
    let mut seen = 0usize;
    let mut last_seq = 0u64;
    while let Some(ack) = acks.next().await {
        let result = ack.expect("ack").result.unwrap();
        if outcome(&result) == pb::Outcome::Accepted && (seen < 300 || seen.is_multiple_of(97)) {
            let read = reader
                .get_rating(pb::GetRatingRequest {
                    hub_id: result.hub_id.clone(),
                })
                .await;
            assert!(
                read.is_ok(),
                "acknowledged rating {seen} is not readable: {read:?}"
            );
        }
        assert_eq!(result.index as usize, seen, "acks arrive in the order sent");
        assert_eq!(result.source_key, format!("s{seen}"));
        if seen % 1000 == 999 {
            assert_eq!(outcome(&result), pb::Outcome::Invalid);
            assert_eq!(result.violations[0].field, "region_code");
        } else {
            assert_eq!(outcome(&result), pb::Outcome::Accepted);
            assert_eq!(result.feed_sequence, last_seq + 1, "feed is gapless");
            last_seq = result.feed_sequence;
        }
        seen += 1;
    }
    assert_eq!(seen, N);
    assert_eq!(last_seq, (N - N / 1000) as u64);
    // Acknowledged means committed: every one is readable.
    let stats = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.groups[0].total, last_seq);
    hub.stop().await;
}

#[tokio::test]
async fn same_key_same_content_is_a_duplicate_returning_the_original_id() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    // An ID number ending in X, so that case really differs between the two sends (the
    // usual test ID ends in a digit: lower-casing it changed nothing).
    let with_x = (100..1000)
        .map(|n| {
            rating_hub::domain::codes::id_number_with_check(&format!("53010219800101{n}")).unwrap()
        })
        .find(|id| id.ends_with('X'))
        .expect("an ID number with check character X");
    let mut original = rating("dup");
    original.rater.as_mut().unwrap().id_number = with_x.clone();
    original.rater.as_mut().unwrap().phone = "13800138000".into();
    let first = submit_one(&mut ingest, original).await;
    assert_eq!(outcome(&first), pb::Outcome::Accepted);
    // Normalisation makes cosmetic differences the same content: a lower-case x, a phone
    // written with spaces and a dash.
    let mut again = rating("dup");
    again.rater.as_mut().unwrap().id_number = with_x.to_lowercase();
    again.rater.as_mut().unwrap().phone = " 138 0013-8000 ".into();
    assert_ne!(
        again.rater.as_ref().unwrap().id_number,
        with_x,
        "the second send differs on the wire"
    );
    again.rated_at = first_rated_at(&hub, &first.hub_id).await;
    let second = submit_one(&mut ingest, again).await;
    assert_eq!(outcome(&second), pb::Outcome::Duplicate);
    assert_eq!(second.hub_id, first.hub_id);
    assert_eq!(second.feed_sequence, first.feed_sequence);
    // Duplicates inside one batch too.
    let r = rating("dup2");
    let results = submit(&mut ingest, vec![r.clone(), r]).await;
    assert_eq!(outcome(&results[0]), pb::Outcome::Accepted);
    assert_eq!(outcome(&results[1]), pb::Outcome::Duplicate);
    assert_eq!(results[0].hub_id, results[1].hub_id);
    assert_eq!(count(&hub).await, 2);
    hub.stop().await;
}

async fn first_rated_at(hub: &TestHub, hub_id: &str) -> Option<prost_types::Timestamp> {
    hub.query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: hub_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap()
        .rated_at
}

pub async fn count(hub: &TestHub) -> u64 {
    hub.query()
        .await
        .get_stats(pb::GetStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .groups
        .first()
        .map_or(0, |g| g.total)
}

#[tokio::test]
async fn same_key_different_content_is_a_conflict_and_never_overwrites() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let first = submit_one(&mut ingest, rating("c")).await;
    let mut changed = rating("c");
    changed.level = pb::Level::Satisfied as i32;
    let second = submit_one(&mut ingest, changed).await;
    assert_eq!(outcome(&second), pb::Outcome::Conflict);
    assert_eq!(second.hub_id, first.hub_id);
    let stored = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: first.hub_id,
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(
        stored.level,
        pb::Level::VerySatisfied as i32,
        "original kept"
    );
    assert_eq!(count(&hub).await, 1);
    hub.stop().await;
}

#[tokio::test]
async fn concurrent_submitters_share_one_gapless_feed() {
    let hub = TestHub::start().await;
    let mut tasks = Vec::new();
    for t in 0..32 {
        let mut client = hub.ingest().await;
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for b in 0..5 {
                let batch = (0..20).map(|i| rating(&format!("t{t}-b{b}-{i}"))).collect();
                for r in submit(&mut client, batch).await {
                    assert_eq!(outcome(&r), pb::Outcome::Accepted);
                    seqs.push(r.feed_sequence);
                }
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let expected: Vec<u64> = (1..=32 * 5 * 20).collect();
    assert_eq!(all, expected, "every sequence used exactly once, no gaps");
    hub.stop().await;
}

#[tokio::test]
async fn service_case_events_are_accepted_once_and_conflicts_named() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let case = |event: pb::CaseEvent, item: &str| pb::ServiceCase {
        case_number: "BJ-2026-0001".into(),
        event: event as i32,
        occurred_at: Some(now()),
        item_code: item.into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        ..Default::default()
    };
    let accepted = case(pb::CaseEvent::Accepted, "I1");
    let mut invalid = case(pb::CaseEvent::Completed, "I1");
    invalid.case_number.clear();
    let res = ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![
                accepted.clone(),
                case(pb::CaseEvent::Completed, "I1"),
                invalid,
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = res.iter().map(outcome).collect();
    use pb::Outcome::*;
    assert_eq!(outcomes, [Accepted, Accepted, Invalid]);
    assert_eq!(res[2].violations[0].field, "case_number");
    let res = ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![accepted, case(pb::CaseEvent::Completed, "I2")],
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let outcomes: Vec<_> = res.iter().map(outcome).collect();
    assert_eq!(outcomes, [Duplicate, Conflict]);
    hub.stop().await;
}

#[tokio::test]
async fn hub_ids_are_unique_within_a_batch() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let results = submit(
        &mut ingest,
        (0..200).map(|i| rating(&format!("u{i}"))).collect(),
    )
    .await;
    let ids: HashSet<_> = results.iter().map(|r| r.hub_id.clone()).collect();
    assert_eq!(ids.len(), 200);
    hub.stop().await;
}

/// A stream message the hub cannot take (here over the message size limit) ends the stream
/// with that error, after the acknowledgements of what came before it; a clean end would
/// tell the client that the ratings after it were taken. Nothing after it is stored.
#[tokio::test]
async fn a_stream_with_an_oversized_message_ends_with_its_error_after_the_earlier_acks() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let mut huge = rating("s3");
    huge.text = "字".repeat(2_000_000); // 6 MB, over the 4 MiB limit
    let messages: Vec<pb::StreamRatingsRequest> = [
        rating("s0"),
        rating("s1"),
        rating("s2"),
        huge,
        rating("s4"),
        rating("s5"),
    ]
    .into_iter()
    .map(|r| pb::StreamRatingsRequest { rating: Some(r) })
    .collect();
    let mut acks = ingest
        .stream_ratings(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let mut acked = Vec::new();
    let error = loop {
        match acks.next().await {
            Some(Ok(ack)) => {
                let r = ack.result.unwrap();
                assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
                acked.push(r.source_key);
            }
            Some(Err(status)) => break status,
            None => panic!("the stream ended cleanly after {acked:?}: the client is never told"),
        }
    };
    assert_eq!(acked, ["s0", "s1", "s2"]);
    assert_eq!(error.code(), tonic::Code::OutOfRange, "{error:?}");
    assert!(
        error.message().contains("not taken") && error.message().contains("3 ratings"),
        "{error:?}"
    );
    assert!(acks.next().await.is_none());
    assert_eq!(
        count(&hub).await,
        3,
        "nothing after the refused message is stored"
    );
    hub.stop().await;
}

/// A message of hundreds of thousands of empty repeated entries weighs little on the wire and
/// would decode to tens of MB: the hub refuses it before decoding it, naming the field.
#[tokio::test]
async fn a_batch_with_half_a_million_empty_entries_is_refused_before_it_is_decoded() {
    let hub = TestHub::start().await;
    let mut heavy = rating("heavy");
    heavy.indicator_answers = vec![pb::IndicatorAnswer::default(); 500_000];
    let err = hub
        .ingest()
        .await
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("light"), heavy],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(bad_request_fields(&err), ["ratings[1].indicator_answers"]);
    assert_eq!(count(&hub).await, 0, "nothing of the request is stored");

    // In a stream, the error that ends it after the ratings before still names the field
    // (before, it was rebuilt without its details: the client lost the field's name).
    use tokio_stream::StreamExt;
    let mut heavy = rating("s-heavy");
    heavy.indicator_answers = vec![pb::IndicatorAnswer::default(); 500_000];
    let messages = [rating("s-light"), heavy]
        .into_iter()
        .map(|r| pb::StreamRatingsRequest { rating: Some(r) })
        .collect::<Vec<_>>();
    let mut acks = hub
        .ingest()
        .await
        .stream_ratings(tokio_stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    let first = acks.next().await.unwrap().unwrap().result.unwrap();
    assert_eq!(outcome(&first), pb::Outcome::Accepted);
    let err = acks.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert_eq!(bad_request_fields(&err), ["rating.indicator_answers"]);
    assert!(
        err.message().contains("after its first 1 ratings"),
        "{err:?}"
    );
    hub.stop().await;
}

use std::collections::BTreeMap;

use rating_hub::pb::v1 as pb;

use crate::utils::*;

#[tokio::test]
async fn get_rating_unknown_is_not_found_and_malformed_is_invalid() {
    let hub = TestHub::start().await;
    let mut query = hub.query().await;
    let err = query
        .get_rating(pb::GetRatingRequest {
            hub_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = query
        .get_rating(pb::GetRatingRequest {
            hub_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["hub_id"]);
    hub.stop().await;
}

/// 300 ratings over three organisations, two regions, all five levels and two channels.
async fn seed(hub: &TestHub) -> Vec<pb::Rating> {
    let mut ingest = hub.ingest().await;
    let base = now().seconds - 20 * 86_400;
    let mut all = Vec::new();
    for i in 0..300u32 {
        let mut r = rating(&format!("q{i:03}"));
        r.org_credit_code = org(i % 3);
        r.region_code = if i % 2 == 0 {
            "530102".into()
        } else {
            "440103".into()
        };
        r.level = (i % 5 + 1) as i32;
        if r.level >= pb::Level::Dissatisfied as i32 {
            r.detail_codes = vec!["501".into()];
        }
        r.channel = if i % 4 == 0 {
            pb::Channel::Sms
        } else {
            pb::Channel::QrCode
        } as i32;
        r.rated_at = Some(ts(base + i64::from(i) * 3600));
        all.push(r);
    }
    for chunk in all.chunks(100) {
        for res in submit(&mut ingest, chunk.to_vec()).await {
            assert_eq!(outcome(&res), pb::Outcome::Accepted);
        }
    }
    all
}

async fn list_all(
    hub: &TestHub,
    filter: pb::RatingFilter,
    page_size: u32,
) -> (Vec<pb::Rating>, usize) {
    let mut query = hub.query().await;
    let mut token = String::new();
    let mut out = Vec::new();
    let mut pages = 0;
    loop {
        let page = query
            .list_ratings(pb::ListRatingsRequest {
                filter: Some(filter.clone()),
                page_size,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.ratings.len() <= page_size as usize);
        out.extend(page.ratings);
        if page.next_page_token.is_empty() {
            return (out, pages);
        }
        token = page.next_page_token;
        assert!(pages < 1000, "pagination terminates");
    }
}

#[tokio::test]
async fn list_with_filters_across_pages_returns_exactly_the_matches_in_feed_order() {
    let hub = TestHub::start().await;
    let all = seed(&hub).await;
    let expect = |pred: &dyn Fn(&pb::Rating) -> bool| -> Vec<String> {
        all.iter()
            .filter(|r| pred(r))
            .map(|r| r.source_key.clone())
            .collect()
    };
    let keys = |v: &[pb::Rating]| v.iter().map(|r| r.source_key.clone()).collect::<Vec<_>>();

    let (got, pages) = list_all(&hub, pb::RatingFilter::default(), 40).await;
    assert_eq!(keys(&got), expect(&|_| true));
    assert_eq!(pages, 8);
    let seqs: Vec<u64> = got.iter().map(|r| r.feed_sequence).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "feed order");

    let f = pb::RatingFilter {
        org_credit_code: org(1),
        ..Default::default()
    };
    let (got, _) = list_all(&hub, f, 7).await;
    assert_eq!(keys(&got), expect(&|r| r.org_credit_code == org(1)));

    let f = pb::RatingFilter {
        region_code_prefix: "44".into(),
        ..Default::default()
    };
    let (got, _) = list_all(&hub, f, 33).await;
    assert_eq!(keys(&got), expect(&|r| r.region_code.starts_with("44")));

    let bad = [
        pb::Level::Dissatisfied as i32,
        pb::Level::VeryDissatisfied as i32,
    ];
    let f = pb::RatingFilter {
        levels: bad.to_vec(),
        channels: vec![pb::Channel::Sms as i32],
        ..Default::default()
    };
    let (got, _) = list_all(&hub, f, 10).await;
    let want = expect(&|r| bad.contains(&r.level) && r.channel == pb::Channel::Sms as i32);
    assert!(!want.is_empty());
    assert_eq!(keys(&got), want);

    let from = all[50].rated_at.unwrap();
    let until = all[120].rated_at.unwrap();
    let f = pb::RatingFilter {
        rated_from: Some(from),
        rated_until: Some(until),
        org_credit_code: org(2),
        ..Default::default()
    };
    let (got, _) = list_all(&hub, f, 9).await;
    let want = expect(&|r| {
        let s = r.rated_at.unwrap().seconds;
        s >= from.seconds && s < until.seconds && r.org_credit_code == org(2)
    });
    assert_eq!(keys(&got), want);
    hub.stop().await;
}

#[tokio::test]
async fn page_token_from_another_filter_and_bad_filters_are_refused() {
    let hub = TestHub::start().await;
    seed(&hub).await;
    let mut query = hub.query().await;
    let page = query
        .list_ratings(pb::ListRatingsRequest {
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = query
        .list_ratings(pb::ListRatingsRequest {
            filter: Some(pb::RatingFilter {
                item_code: "other".into(),
                ..Default::default()
            }),
            page_size: 10,
            page_token: page.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["page_token"]);
    let err = query
        .list_ratings(pb::ListRatingsRequest {
            filter: Some(pb::RatingFilter {
                region_code_prefix: "53a".into(),
                org_credit_code: "123".into(),
                levels: vec![0],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    let fields = bad_request_fields(&err);
    for f in [
        "filter.region_code_prefix",
        "filter.org_credit_code",
        "filter.levels[0]",
    ] {
        assert!(fields.iter().any(|x| x == f), "{fields:?}");
    }
    let err = query
        .list_ratings(pb::ListRatingsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["page_size"]);
    hub.stop().await;
}

#[tokio::test]
async fn stats_count_levels_and_classes_per_group() {
    let hub = TestHub::start().await;
    let all = seed(&hub).await;
    let groups = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: None,
            group_by: vec![
                pb::StatsDimension::Organization as i32,
                pb::StatsDimension::Channel as i32,
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups;
    let mut want: BTreeMap<(String, String), [u64; 5]> = BTreeMap::new();
    for r in &all {
        let ch = pb::Channel::try_from(r.channel)
            .unwrap()
            .as_str_name()
            .to_owned();
        want.entry((r.org_credit_code.clone(), ch)).or_default()[(r.level - 1) as usize] += 1;
    }
    assert_eq!(groups.len(), want.len());
    for (g, ((org, ch), levels)) in groups.iter().zip(&want) {
        assert_eq!(&g.key, &[org.clone(), ch.clone()]);
        let got = [
            g.very_satisfied,
            g.satisfied,
            g.basically_satisfied,
            g.dissatisfied,
            g.very_dissatisfied,
        ];
        assert_eq!(&got, levels);
        assert_eq!(g.total, levels.iter().sum::<u64>());
        assert_eq!(g.good, levels[0] + levels[1]);
        assert_eq!(g.medium, levels[2]);
        assert_eq!(g.bad, levels[3] + levels[4]);
    }
    let err = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: None,
            group_by: vec![0],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["group_by[0]"]);
    hub.stop().await;
}

#[tokio::test]
async fn stats_by_day_use_china_standard_time() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    // 2026-03-01T23:30:00+08:00 is 2026-03-01T15:30:00Z; 2026-03-02T00:30+08:00 is 16:30Z.
    let mut a = rating("day-a");
    a.rated_at = Some(ts(1_772_379_000));
    let mut b = rating("day-b");
    b.rated_at = Some(ts(1_772_382_600));
    submit(&mut ingest, vec![a, b]).await;
    let groups = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: None,
            group_by: vec![pb::StatsDimension::Day as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .groups;
    let keys: Vec<_> = groups.iter().map(|g| g.key[0].as_str()).collect();
    assert_eq!(keys, ["2026-03-01", "2026-03-02"]);
    hub.stop().await;
}

/// Statistics that keep the item's indicators apart from the staff's (Guangdong: online cases
/// rate only the item; window visits rate the staff member too): a target-kind filter.
#[tokio::test]
async fn stats_filter_by_target_kind_keeps_item_and_staff_ratings_apart() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let item = rating("item");
    let mut staff = rating("staff");
    staff.target_kind = pb::TargetKind::Staff as i32;
    staff.staff_id = "S-001".into();
    staff.level = pb::Level::Dissatisfied as i32;
    for r in submit(&mut ingest, vec![item, staff]).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    let stats = |kinds: Vec<i32>| {
        let hub = &hub;
        async move {
            hub.query()
                .await
                .get_stats(pb::GetStatsRequest {
                    filter: Some(pb::RatingFilter {
                        target_kinds: kinds,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .groups
                .remove(0)
        }
    };
    let all = stats(vec![]).await;
    assert_eq!(all.total, 2);
    let items = stats(vec![pb::TargetKind::Item as i32]).await;
    assert_eq!((items.total, items.bad), (1, 0));
    let staff = stats(vec![pb::TargetKind::Staff as i32]).await;
    assert_eq!((staff.total, staff.bad), (1, 1));
    let err = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: Some(pb::RatingFilter {
                target_kinds: vec![99],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["filter.target_kinds[0]"]);

    // Hostile lists: a million invalid values are one mistake, named once in a short
    // answer (before: a million violations, joined into the status message); a million
    // repeats of a valid value filter as that one value (before: a million bound values,
    // past SQLite's limit).
    let err = hub
        .query()
        .await
        .get_stats(pb::GetStatsRequest {
            filter: Some(pb::RatingFilter {
                levels: vec![99; 1_000_000],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_request_fields(&err), ["filter.levels[0]"]);
    assert!(err.message().len() < 1000, "{} bytes", err.message().len());
    let repeated = stats(vec![pb::TargetKind::Staff as i32; 1_000_000]).await;
    assert_eq!((repeated.total, repeated.bad), (staff.total, staff.bad));
    hub.stop().await;
}

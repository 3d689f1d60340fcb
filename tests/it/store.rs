//! The group-commit writer, driven through the store directly: a job the database refuses
//! fails alone (the rest of its group commits, with gapless sequences), and the writer
//! carries on.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rating_hub::clock::{Clock, SystemClock};
use rating_hub::config::Config;
use rating_hub::store::{CaseEntryRecord, InsertOutcome, NewRating, RelayWrite, Store, StoreError};
use uuid::Uuid;

use crate::pg;
use crate::utils::rating;

async fn open_store(dir: &Path) -> Arc<dyn Store> {
    let mut config = Config::from_layers(None, std::iter::empty()).expect("defaults");
    config.storage.url = pg::storage_url(dir);
    rating_hub::server::open_store(&config, Arc::new(SystemClock))
        .await
        .expect("open")
}

/// A new PII key file `{prefix}-pii.key` in `dir`, loaded as key id `k`.
fn pii_keys(dir: &Path, prefix: &str) -> rating_hub::privacy::PiiKeys {
    let key = dir.join(format!("{prefix}-pii.key"));
    rating_hub::privacy::PiiKeys::create_key_file(&key).expect("key");
    let files = BTreeMap::from([("k".to_string(), key.display().to_string())]);
    rating_hub::privacy::PiiKeys::load("k", &files).expect("keys")
}

/// `r` validated now and prepared for the store as the ingest path does, counted (the
/// statistics' `IngestChecks::counting`), sealed under `keys`.
fn counted_rating(
    r: &rating_hub::pb::v1::Rating,
    keys: &rating_hub::privacy::PiiKeys,
) -> NewRating {
    let now = SystemClock.now_micros();
    let v = rating_hub::domain::parse_rating(r, now, &Default::default(), false).expect("valid");
    let checks = rating_hub::store::IngestChecks {
        counting: true,
        ..Default::default()
    };
    NewRating::new(Uuid::now_v7(), "sys".into(), v, keys, checks)
}

fn new_ratings(dir: &Path, prefix: &str, n: usize) -> Vec<NewRating> {
    let keys = pii_keys(dir, prefix);
    let now = SystemClock.now_micros();
    (0..n)
        .map(|i| {
            let v = rating_hub::domain::parse_rating(
                &rating(&format!("{prefix}-{i}")),
                now,
                &Default::default(),
                false,
            )
            .expect("valid");
            NewRating::new(
                Uuid::now_v7(),
                "dev-admin".into(),
                v,
                &keys,
                Default::default(),
            )
        })
        .collect()
}

/// A case entry for a case that does not exist: its foreign key fails the whole group.
fn failing_write() -> RelayWrite {
    RelayWrite::CaseEntry {
        case_id: 999_999,
        expected_entries: 0,
        entry: CaseEntryRecord {
            action: 1,
            actor: "test".into(),
            at_micros: 0,
            note: String::new(),
            evidence_refs: Vec::new(),
            new_deadline_micros: None,
            appeal_outcome: 0,
            ..Default::default()
        },
        exclude: None,
    }
}

fn accepted_seqs(outcomes: &[InsertOutcome]) -> Vec<u64> {
    outcomes
        .iter()
        .map(|o| match o {
            InsertOutcome::Accepted { feed_seq, .. } => *feed_seq,
            other => panic!("expected Accepted, got {other:?}"),
        })
        .collect()
}

/// One caller's write that the database refuses fails alone: the writer takes whatever is
/// queued as one group, and when the database refuses the group it commits each job again
/// on its own, so the ratings queued beside the failing write are stored (with gapless
/// sequences) and only the failing write's caller gets the error. Before, every caller of
/// the group got INTERNAL ("stored data is corrupt"). The two jobs are queued in one poll,
/// so they share a group unless the writer wakes between the two; 20 tries make a shared
/// group all but certain (the old behaviour failed this within them).
#[tokio::test]
async fn a_write_the_database_refuses_fails_alone_and_its_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let mut head = 0;
    for attempt in 0..20 {
        let batch = new_ratings(dir.path(), &format!("try{attempt}"), 3);
        let ids: Vec<Uuid> = batch.iter().map(|r| r.hub_id).collect();
        let (ratings, write) = tokio::join!(
            store.insert_ratings(batch),
            store.relay_write(failing_write())
        );
        let err = write.expect_err("the case entry must fail");
        assert!(
            matches!(err, StoreError::Refused(_)),
            "a refused write is not corruption: {err:?}"
        );
        let outcomes = ratings.unwrap_or_else(|e| {
            panic!("try {attempt}: the ratings failed with the write beside them: {e:?}")
        });
        assert_eq!(
            accepted_seqs(&outcomes),
            vec![head + 1, head + 2, head + 3],
            "gapless"
        );
        head += 3;
        for id in &ids {
            assert!(store.get_rating(*id).await.unwrap().is_some());
        }
    }
    assert_eq!(*store.feed_head().borrow(), head);
    store.close().await;
}

/// A Subscribe page's unmasked reads are audited in a few statements, not one per rating:
/// an audit longer than one statement takes (SQLite: 1,000 records) keeps every id, in
/// order, under its principal and call.
#[tokio::test]
async fn an_audit_of_many_ratings_records_every_id_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let ids: Vec<Uuid> = (0..2_345).map(|_| Uuid::now_v7()).collect();
    store
        .record_pii_access("investigator", "Subscribe", &ids)
        .await
        .expect("audit recorded");
    store
        .record_pii_access("someone-else", "GetRating", &ids[..1])
        .await
        .expect("audit recorded");

    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .list_pii_access(Some("investigator"), after, 1000)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        seen.extend(page);
    }
    assert_eq!(
        seen.iter().map(|a| a.hub_id).collect::<Vec<_>>(),
        ids,
        "every audited id, in the order read"
    );
    assert!(
        seen.iter()
            .all(|a| a.principal == "investigator" && a.rpc == "Subscribe" && a.at_micros > 0)
    );
    store.close().await;
}

/// Two instances (two stores on one database) writing audit records at once, and a reader
/// tailing them by id as a consumer does: it must see every record. The ids must commit in id
/// order: on PostgreSQL, audit records (and invitations) take the sequencer's turn, as
/// ratings do; before, an id taken early could commit after a later one the reader had
/// already passed, and was never read. (On SQLite one file has one writer at a time.)
#[tokio::test]
async fn a_reader_tailing_audit_records_of_two_instances_misses_none() {
    let dir = tempfile::tempdir().unwrap();
    let a = open_store(dir.path()).await;
    let b = open_store(dir.path()).await;
    const EACH: usize = 300;
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writer = |store: Arc<dyn Store>, name: &'static str| {
        let done = done.clone();
        tokio::spawn(async move {
            for _ in 0..EACH {
                store
                    .record_pii_access(name, "GetRating", &[Uuid::now_v7()])
                    .await
                    .expect("audit recorded");
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let (wa, wb) = (writer(a.clone(), "hub-a"), writer(b.clone(), "hub-b"));
    let mut seen = std::collections::HashSet::new();
    let mut after = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        // A writer that panicked is finished too: its panic shows at its join below.
        let finished = done.load(std::sync::atomic::Ordering::SeqCst) == 2
            || (wa.is_finished() && wb.is_finished());
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writers did not finish"
        );
        tokio::task::yield_now().await;
        let page = a.list_pii_access(None, after, 1000).await.unwrap();
        if let Some(last) = page.last() {
            after = last.id;
        }
        seen.extend(page.into_iter().map(|r| r.id));
        if finished && seen.len() >= 2 * EACH {
            break;
        }
        if finished {
            // Everything is committed: one more page and the reader has all it will get.
            let page = a.list_pii_access(None, after, 1000).await.unwrap();
            seen.extend(page.into_iter().map(|r| r.id));
            break;
        }
    }
    wa.await.unwrap();
    wb.await.unwrap();
    assert_eq!(
        seen.len(),
        2 * EACH,
        "the tailing reader passed records that committed after a later id"
    );
    a.close().await;
    b.close().await;
}

/// An accepted lower-hub head is written only while the record it was checked against is
/// still the last accepted one and holds that head: a write checked against a head another
/// instance has since replaced (or advanced) writes nothing and says so (0), whichever of
/// adding a record or advancing one it was.
#[tokio::test]
async fn an_accepted_peer_head_checked_against_a_replaced_one_is_not_written() {
    use rating_hub::store::PeerHead;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let head = |size: u64, root: u8, against: (u64, u64, u8), id: u64| PeerHead {
        id,
        principal: "city-hub".into(),
        size,
        root: vec![root; 32],
        head_time_micros: size as i64,
        received_at_micros: 0,
        outcome: "accepted".into(),
        first_bad: 0,
        detail: String::new(),
        checked_against: Some((against.0, against.1, vec![against.2; 32])),
    };
    let write = |h: PeerHead| {
        let store = store.clone();
        async move { store.relay_write(RelayWrite::PeerHead(h)).await.unwrap() }
    };
    let last = || {
        let store = store.clone();
        async move { store.last_accepted_head("city-hub").await.unwrap().unwrap() }
    };
    // The first head, checked against none.
    assert_eq!(write(head(5, 1, (0, 0, 0), 0)).await, 1);
    let (_, _, _, first_id) = last().await;
    // Another check against none, after that one landed: nothing written.
    assert_eq!(write(head(6, 2, (0, 0, 0), 0)).await, 0);
    // Advanced in place by a head checked against it.
    assert_eq!(write(head(8, 3, (first_id, 5, 1), first_id)).await, 1);
    assert_eq!(last().await.0, 8);
    // A fork checked against the head of 5 the record no longer holds: neither advanced
    // nor added.
    assert_eq!(write(head(10, 4, (first_id, 5, 1), first_id)).await, 0);
    assert_eq!(write(head(10, 4, (first_id, 5, 1), 0)).await, 0);
    let (size, root, _, id) = last().await;
    assert_eq!((size, root, id), (8, vec![3; 32], first_id));
    store.close().await;
}

/// Statistics from the maintained counts (#23) equal a scan's on random data, on both
/// backends: ratings over two months of days, four organisations, three regions, three
/// channels, three target kinds and two sources; defaults, ratings flagged (rated before
/// completion), batch and theme ratings; ratings left out on appeal (exclusions, some twice)
/// and defaults superseded by a rater's own 差评; 差评 cases through every state, some
/// left out by an upheld appeal — written in several groups, case steps and exclusions
/// between them. Every grouping and filter below is answered from the counts
/// (`counts::plan`), and must give the groups, keys and numbers the scan gives — as the
/// triggers keep them, and as the migration's backfill builds them from the same data.
#[tokio::test]
async fn statistics_from_the_counts_equal_a_scan_on_random_data() {
    use prost_types::Timestamp;
    use rating_hub::pb::v1 as pb;
    use rating_hub::store::{IngestChecks, RatingQuery, ScopeFilter, StatsDimension as D, counts};

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let keys = pii_keys(dir.path(), "test");
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut pick = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let now = SystemClock.now_micros();
    let day = 86_400_000_000i64;
    let checks = IngestChecks {
        counting: true,
        ..Default::default()
    };
    let mut accepted: Vec<Uuid> = Vec::new();
    let mut defaults: Vec<(String, u32)> = Vec::new();
    let mut cases = 0;
    for group in 0..6 {
        let mut items = Vec::new();
        for i in 0..150 {
            let key = format!("g{group}-{i}");
            let mut r = rating(&key);
            let org_n = 1 + pick(4) as u32;
            r.org_credit_code = crate::utils::org(org_n);
            r.region_code = ["530102", "530103", "530402"][pick(3) as usize].into();
            r.channel = [
                pb::Channel::HallDevice,
                pb::Channel::MobileApp,
                pb::Channel::QrCode,
            ][pick(3) as usize] as i32;
            r.target_kind = [
                pb::TargetKind::Item,
                pb::TargetKind::Item,
                pb::TargetKind::Staff,
                pb::TargetKind::Institution,
            ][pick(4) as usize] as i32;
            r.level = 1 + pick(5) as i32;
            let at = now - pick(60 * 86_400) as i64 * 1_000_000 - 1_000_000;
            r.rated_at = Some(Timestamp {
                seconds: at / 1_000_000,
                nanos: 0,
            });
            if pick(5) == 0 {
                // Rated before the service was completed: flagged.
                r.service_completed_at = Some(Timestamp {
                    seconds: at / 1_000_000 + 60,
                    nanos: 0,
                });
            }
            match pick(6) {
                0 => r.batch_id = format!("B{}", pick(5)),
                1 => r.theme_id = format!("T{}", pick(5)),
                _ => {}
            }
            if let Some(rater) = r.rater.as_mut() {
                rater.real_name = pick(2) == 0;
            }
            if r.target_kind == pb::TargetKind::Item as i32 && r.level <= 2 && pick(4) == 0 {
                r.is_default = true;
                r.rater = None;
                // Defaults of a batch rate its other cases' 办结 events too, until a rater's
                // own rating (of no batch, below) replaces them.
                if pick(2) == 0 {
                    r.batch_id = format!("B{}", pick(5));
                    r.theme_id.clear();
                }
                defaults.push((r.case_number.clone(), org_n));
            }
            let source = ["sys-a", "sys-b"][pick(2) as usize];
            let v = rating_hub::domain::parse_rating(&r, now, &Default::default(), false)
                .unwrap_or_else(|e| panic!("valid {key}: {e:?}"));
            items.push(NewRating::new(
                Uuid::now_v7(),
                source.into(),
                v,
                &keys,
                checks.clone(),
            ));
        }
        // A rater's own 差评 for some earlier defaults' cases: they supersede the default.
        for (case, org_n) in defaults.drain(..).filter(|_| pick(2) == 0) {
            let mut r = rating(&format!("{case}-rater"));
            r.case_number = case;
            r.org_credit_code = crate::utils::org(org_n);
            r.level = pb::Level::VeryDissatisfied as i32;
            let v = rating_hub::domain::parse_rating(&r, now, &Default::default(), false)
                .expect("valid");
            items.push(NewRating::new(
                Uuid::now_v7(),
                "sys-a".into(),
                v,
                &keys,
                checks.clone(),
            ));
        }
        // 办结 events: of this group's cases (rated now), of the next group's (rated later),
        // of no rated case, and of batches and themes (rated by any rating of theirs).
        let mut events = Vec::new();
        for i in 0..120 {
            let g = group + pick(2);
            let mut c = service_case(&format!("CASE-g{g}-{}", pick(150)));
            if i % 6 == 5 {
                c.case_number = format!("UNRATED-{group}-{i}");
            }
            c.org_credit_code = crate::utils::org(1 + pick(4) as u32);
            c.region_code = ["530102", "530103", "530402"][pick(3) as usize].into();
            c.channel = [
                pb::Channel::HallDevice,
                pb::Channel::MobileApp,
                pb::Channel::QrCode,
            ][pick(3) as usize] as i32;
            match pick(5) {
                0 | 2 => c.batch_id = format!("B{}", pick(5)),
                1 => c.theme_id = format!("T{}", pick(5)),
                _ => {}
            }
            let at = now - pick(60 * 86_400) as i64 * 1_000_000 - 1_000_000;
            c.occurred_at = Some(Timestamp {
                seconds: at / 1_000_000,
                nanos: 0,
            });
            let v = rating_hub::domain::parse_case(&c, now, &Default::default())
                .unwrap_or_else(|e| panic!("valid case: {e:?}"));
            let source = ["sys-a", "sys-b"][pick(2) as usize];
            events.push(rating_hub::store::NewCaseEvent::new(
                source.into(),
                v,
                &keys,
            ));
        }
        // Half before this group's ratings, half after (in the same group of writes or not).
        let later = events.split_off(60);
        store.insert_cases(events).await.expect("cases");
        for o in store.insert_ratings(items).await.expect("insert") {
            if let InsertOutcome::Accepted { hub_id, .. } = o {
                accepted.push(hub_id);
            }
        }
        store.insert_cases(later).await.expect("cases");
        // Steps on some 差评 cases: rectified (2, 4), called back (6), archived (7),
        // spot-checked (8) and others (1, 3), some twice; some steps exclude the rating (an
        // appeal upheld), and later steps on such a case change nothing.
        let open = store.list_bad_cases(None, 0, 100_000).await.expect("cases");
        for case in &open {
            if pick(3) == 0 {
                continue;
            }
            let had = case.entries.len() as u64;
            for entries in had..had + 1 + pick(4) {
                let action = [1, 2, 3, 4, 6, 6, 7, 8][pick(8) as usize];
                let exclude = (pick(25) == 0).then_some((case.hub_id, 2));
                let n = store
                    .relay_write(RelayWrite::CaseEntry {
                        case_id: case.id,
                        expected_entries: entries,
                        entry: CaseEntryRecord {
                            action,
                            actor: "test".into(),
                            at_micros: now,
                            ..Default::default()
                        },
                        exclude,
                    })
                    .await
                    .expect("case entry");
                assert_eq!(n, 1, "case {} entry {entries}", case.id);
            }
        }
        cases = open.len();
        // Some ratings left out on appeal; an exclusion decided twice counts once.
        for _ in 0..15 {
            let hub_id = accepted[pick(accepted.len() as u64) as usize];
            for _ in 0..=pick(2) {
                store
                    .relay_write(RelayWrite::Exclusion {
                        hub_id,
                        reason: 2,
                        decided_by: "test".into(),
                        note: String::new(),
                    })
                    .await
                    .expect("exclusion");
            }
        }
    }
    assert!(accepted.len() > 800, "{} accepted", accepted.len());

    // CST midnight some days ago.
    let midnight = |days_ago: i64| {
        let local = now + 8 * 3_600_000_000;
        local - local.rem_euclid(day) - days_ago * day - 8 * 3_600_000_000
    };
    let base = RatingQuery {
        counted_only: true,
        ..Default::default()
    };
    let filters = [
        base.clone(),
        RatingQuery {
            org_credit_code: Some(crate::utils::org(2)),
            ..base.clone()
        },
        RatingQuery {
            region_prefix: Some("5301".into()),
            ..base.clone()
        },
        RatingQuery {
            channels: vec![pb::Channel::QrCode as i32, pb::Channel::MobileApp as i32],
            target_kinds: vec![pb::TargetKind::Item as i32],
            ..base.clone()
        },
        RatingQuery {
            source_system: Some("sys-b".into()),
            ..base.clone()
        },
        RatingQuery {
            scope: Some(ScopeFilter {
                orgs: vec![crate::utils::org(1)],
                region_prefixes: vec!["5304".into()],
            }),
            ..base.clone()
        },
        RatingQuery {
            rated_from_micros: Some(midnight(40)),
            rated_until_micros: Some(midnight(10)),
            ..base.clone()
        },
        RatingQuery {
            rated_from_micros: Some(midnight(20)),
            region_prefix: Some("530102".into()),
            ..base.clone()
        },
        RatingQuery {
            rated_until_micros: Some(midnight(1000)),
            ..base.clone()
        },
        // 62 days always hold a whole month: its rows come from the monthly counts, the
        // days around it from the daily ones.
        RatingQuery {
            rated_from_micros: Some(midnight(62)),
            rated_until_micros: Some(midnight(0)),
            org_credit_code: Some(crate::utils::org(3)),
            ..base.clone()
        },
        RatingQuery {
            rated_from_micros: Some(midnight(45)),
            channels: vec![pb::Channel::PcWeb as i32],
            ..base.clone()
        },
        RatingQuery {
            rated_until_micros: Some(midnight(5)),
            ..base.clone()
        },
    ];
    assert!(
        counts::plan(&filters[9], &[D::Organization])
            .is_some_and(|p| p.reads(counts::Grain::Month)),
        "a filter over a whole month"
    );
    let groupings: [&[D]; 9] = [
        &[],
        &[D::Organization],
        &[D::Region],
        &[D::City],
        &[D::Channel],
        &[D::Day],
        &[D::Month],
        &[D::Organization, D::Channel],
        &[D::City, D::Month, D::Region],
    ];
    let compared = compare_counts_with_scans(&*store, &filters, &groupings).await;
    assert!(compared > 500, "{compared} groups compared");
    let all = store.stats(&base, &[]).await.expect("stats");
    let excluded = store.stats_by_scan(&base, &[]).await.expect("scan")[0].total;
    assert_eq!(all[0].total, excluded);
    assert!(
        (all[0].total as usize) < accepted.len() - 15,
        "exclusions and superseded defaults are left out"
    );
    assert!(
        all[0].default_ratings > 0 && all[0].flagged > 0,
        "{:?}",
        all[0]
    );
    let done = &store.completed_case_counts(&base, &[]).await.expect("办结")[0];
    assert!(
        done.completed > 500 && done.rated > 100 && done.rated < done.completed,
        "{done:?}"
    );
    assert!(
        done.actively_rated > 50 && done.actively_rated < done.rated,
        "{done:?}"
    );
    let c = &all[0].bad_cases;
    assert!(
        cases > 100 && (c.cases as usize) < cases,
        "{cases} cases: {c:?}"
    );
    assert!(
        [
            c.rectified,
            c.called_back,
            c.real_name,
            c.real_name_done,
            c.archived,
            c.spot_checked
        ]
        .iter()
        .all(|n| *n > 0),
        "{c:?}"
    );

    // The migration's backfill gives the same counts as the triggers: drop the counts and
    // their triggers, forget the migration, and let the store's next start build them again
    // from the data.
    store.close().await;
    drop(store);
    let url = pg::storage_url(dir.path());
    if pg::enabled() {
        for f in [
            "rating_counts_rating",
            "rating_counts_exclusion",
            "rating_counts_case",
            "rating_counts_case_entry",
            "case_counts_event",
            "case_counts_rating",
            "case_counts_superseded",
            "rating_counts_month_insert",
            "rating_counts_month_update",
            "case_counts_month_insert",
            "case_counts_month_update",
            "rating_counts_quarter_insert",
            "rating_counts_quarter_update",
            "case_counts_quarter_insert",
            "case_counts_quarter_update",
        ] {
            pg::exec(&url, &format!("DROP FUNCTION {f}() CASCADE"));
        }
        for sql in [
            "DROP TABLE rating_counts_quarter",
            "DROP TABLE case_counts_quarter",
            "DELETE FROM _sqlx_migrations WHERE version = 16",
            "DELETE FROM _sqlx_migrations WHERE version = 15",
            "DROP TABLE rating_counts_month",
            "DROP TABLE case_counts_month",
            "DELETE FROM _sqlx_migrations WHERE version = 12",
            "DROP TABLE rating_counts",
            "DROP TABLE case_counts",
            "DROP INDEX service_case_events_case, service_case_events_batch, \
             service_case_events_theme",
            "DELETE FROM _sqlx_migrations WHERE version = 10",
        ] {
            pg::exec(&url, sql);
        }
    } else {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{url}"))
            .await
            .expect("open");
        sqlx::raw_sql(
            "DROP TRIGGER rating_counts_rating; DROP TRIGGER rating_counts_exclusion; \
             DROP TRIGGER rating_counts_case; DROP TRIGGER rating_counts_case_entry; \
             DROP TRIGGER case_counts_event; DROP TRIGGER case_counts_rating; \
             DROP TRIGGER case_counts_superseded; DROP TABLE rating_counts; \
             DROP TABLE case_counts; DROP INDEX service_case_events_case; \
             DROP INDEX service_case_events_batch; DROP INDEX service_case_events_theme; \
             DELETE FROM _sqlx_migrations WHERE version = 13; \
             DROP TABLE rating_counts_month; DROP TABLE case_counts_month; \
             DELETE FROM _sqlx_migrations WHERE version = 15; \
             DROP TABLE rating_counts_quarter; DROP TABLE case_counts_quarter; \
             DELETE FROM _sqlx_migrations WHERE version = 17;",
        )
        .execute(&mut conn)
        .await
        .expect("drop the counts");
        conn.close().await.expect("close");
    }
    let store = open_store(dir.path()).await;
    let again = compare_counts_with_scans(&*store, &filters, &groupings).await;
    assert_eq!(again, compared, "the backfill's groups are the triggers'");
}

/// Compares every grouping of every filter from the counts with the scans; returns how
/// many groups it compared.
async fn compare_counts_with_scans(
    store: &dyn Store,
    filters: &[rating_hub::store::RatingQuery],
    groupings: &[&[rating_hub::store::StatsDimension]],
) -> usize {
    use rating_hub::store::counts;
    let mut compared = 0;
    for q in filters {
        for dims in groupings {
            assert!(counts::plan(q, dims).is_some(), "{q:?} {dims:?}");
            let from_counts = store.stats(q, dims).await.expect("stats");
            let scanned = rating_hub::store::with_cases(
                store.stats_by_scan(q, dims).await.expect("scan"),
                store.bad_case_counts_by_scan(q, dims).await.expect("scan"),
            );
            assert_eq!(from_counts, scanned, "{q:?} grouped by {dims:?}");
            compared += scanned.len();
            let sorted = |mut v: Vec<rating_hub::store::CaseCounts>| {
                v.retain(|c| c.completed > 0);
                v.sort_by(|a, b| a.key.cmp(&b.key));
                v
            };
            let from_counts = sorted(store.completed_case_counts(q, dims).await.expect("办结"));
            let scanned = sorted(
                store
                    .completed_case_counts_by_scan(q, dims)
                    .await
                    .expect("scan"),
            );
            assert_eq!(from_counts, scanned, "办结: {q:?} grouped by {dims:?}");
            compared += scanned.len();
        }
    }
    compared
}

/// Ranges that start and end inside months and quarters, at fixed dates around their ends (a
/// rating a minute either side of CST midnight on the 1st, a leap-free February, a year's
/// end, a quarter's last minute): the quarterly and monthly counts and the days around them
/// give the scan's numbers, by month, day, organisation and in total.
#[tokio::test]
async fn quarterly_and_monthly_counts_and_the_days_around_them_equal_a_scan_at_their_ends() {
    use rating_hub::pb::v1 as pb;
    use rating_hub::store::{RatingQuery, StatsDimension as D, counts};

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let keys = pii_keys(dir.path(), "test");
    // CST (UTC+8) wall time to microseconds since the epoch.
    let cst = |y: i32, m: u32, d: u32, h: u32, min: u32| {
        let t = chrono::NaiveDate::from_ymd_opt(y, m, d)
            .unwrap()
            .and_hms_opt(h, min, 0)
            .unwrap();
        (t.and_utc().timestamp() - 8 * 3600) * 1_000_000
    };
    let times = [
        cst(2024, 12, 31, 23, 59),
        cst(2025, 1, 1, 0, 0),
        cst(2025, 1, 15, 12, 0),
        cst(2025, 1, 31, 23, 59),
        cst(2025, 2, 1, 0, 1),
        cst(2025, 2, 14, 8, 30),
        cst(2025, 2, 28, 23, 59),
        cst(2025, 3, 1, 0, 0),
        cst(2025, 3, 17, 16, 0),
        cst(2025, 3, 31, 23, 59),
        cst(2025, 4, 1, 0, 0),
        cst(2025, 5, 20, 9, 0),
        cst(2025, 6, 30, 23, 59),
        cst(2025, 7, 1, 0, 0),
    ];
    // A 办结 event at each time and organisation (its case rated by the ratings below), and
    // one more that nothing rates.
    let now = SystemClock.now_micros();
    let events: Vec<_> = times
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..4).map(move |j| (i, j, *t)))
        .map(|(i, j, t)| {
            let mut c = match j {
                3 => service_case(&format!("UNRATED-edge-{i}")),
                _ => service_case(&format!("CASE-edge-{i}-{j}")),
            };
            c.org_credit_code = crate::utils::org(1 + (j % 3) as u32);
            c.occurred_at = Some(rating_hub::time::timestamp_from_micros(t));
            let v = rating_hub::domain::parse_case(&c, now, &Default::default())
                .unwrap_or_else(|e| panic!("valid case: {e:?}"));
            rating_hub::store::NewCaseEvent::new("sys".into(), v, &keys)
        })
        .collect();
    store.insert_cases(events).await.expect("cases");
    // Two ratings per time and organisation, in two groups of writes: the second group's
    // ratings update the daily rows the first inserted.
    let mut items: Vec<NewRating> = times
        .iter()
        .enumerate()
        .flat_map(|(i, t)| (0..6).map(move |j| (i, j, *t)))
        .map(|(i, j, t)| {
            let mut r = rating(&format!("edge-{i}-{j}"));
            r.org_credit_code = crate::utils::org(1 + (j % 3) as u32);
            r.level = [
                pb::Level::VerySatisfied,
                pb::Level::Satisfied,
                pb::Level::BasicallySatisfied,
            ][(i + j) % 3] as i32;
            r.rated_at = Some(rating_hub::time::timestamp_from_micros(t));
            counted_rating(&r, &keys)
        })
        .collect();
    let second = items.split_off(items.len() / 2);
    for group in [items, second] {
        let stored = store.insert_ratings(group).await.expect("insert");
        assert!(
            stored
                .iter()
                .all(|o| matches!(o, InsertOutcome::Accepted { .. })),
            "{stored:?}"
        );
    }
    let range = |from: Option<i64>, until: Option<i64>| RatingQuery {
        rated_from_micros: from,
        rated_until_micros: until,
        ..Default::default()
    };
    let filters = [
        range(Some(cst(2025, 1, 15, 0, 0)), Some(cst(2025, 3, 15, 0, 0))),
        range(Some(cst(2025, 2, 1, 0, 0)), Some(cst(2025, 3, 1, 0, 0))),
        range(Some(cst(2024, 12, 31, 0, 0)), Some(cst(2025, 4, 1, 0, 0))),
        range(Some(cst(2025, 1, 31, 0, 0)), Some(cst(2025, 3, 2, 0, 0))),
        range(None, Some(cst(2025, 3, 1, 0, 0))),
        range(Some(cst(2025, 2, 1, 0, 0)), None),
        range(Some(cst(2025, 2, 2, 0, 0)), Some(cst(2025, 2, 27, 0, 0))),
        range(Some(cst(2025, 1, 15, 0, 0)), Some(cst(2025, 7, 2, 0, 0))),
        range(Some(cst(2024, 12, 31, 0, 0)), Some(cst(2025, 7, 1, 0, 0))),
        range(None, Some(cst(2025, 6, 15, 0, 0))),
    ];
    // Which coarser tables each filter reads, by organisation: (months, quarters).
    for (q, reads) in filters.iter().zip([
        (true, false),
        (true, false),
        (false, true),
        (true, false),
        (true, true),
        (true, true),
        (false, false),
        (true, true),
        (false, true),
        (true, true),
    ]) {
        let plan = counts::plan(q, &[D::Organization]).expect("counts");
        assert_eq!(
            (
                plan.reads(counts::Grain::Month),
                plan.reads(counts::Grain::Quarter)
            ),
            reads,
            "{q:?}"
        );
    }
    let groupings: [&[D]; 5] = [
        &[],
        &[D::Month],
        &[D::Day],
        &[D::Organization],
        &[D::Month, D::Organization],
    ];
    let compared = compare_counts_with_scans(&*store, &filters, &groupings).await;
    assert!(compared > 100, "{compared} groups compared");
    // The whole first quarter of 2025, as ExportReport asks it: one quarter's rows, no day.
    let quarter = range(Some(cst(2025, 1, 1, 0, 0)), Some(cst(2025, 4, 1, 0, 0)));
    let all = store.stats(&quarter, &[]).await.expect("stats");
    assert_eq!(all[0].total, 6 * 9);
    let done = store
        .completed_case_counts(&quarter, &[])
        .await
        .expect("办结");
    assert_eq!(
        (done[0].completed, done[0].rated),
        (4 * 9, 3 * 9),
        "events of the quarter, and those the ratings rated"
    );
}

/// A rater's own 差评 for a case whose default rating an operator had already left out is
/// stored (the default stays out as it was). Before, writing the default's second exclusion
/// broke the key of `rating_exclusions`, and the rater's rating was refused on both backends.
#[tokio::test]
async fn a_raters_bad_rating_replacing_a_default_already_left_out_is_stored() {
    use rating_hub::pb::v1 as pb;

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let keys = pii_keys(dir.path(), "test");
    let new = |r: pb::Rating| counted_rating(&r, &keys);
    let mut default = rating("default");
    default.is_default = true;
    default.rater = None;
    default.level = pb::Level::Satisfied as i32;
    let case = default.case_number.clone();
    let stored = store
        .insert_ratings(vec![new(default)])
        .await
        .expect("insert");
    let default_id = match &stored[0] {
        InsertOutcome::Accepted { hub_id, .. } => *hub_id,
        other => panic!("{other:?}"),
    };
    store
        .relay_write(RelayWrite::Exclusion {
            hub_id: default_id,
            reason: 2,
            decided_by: "operator".into(),
            note: "invalid".into(),
        })
        .await
        .expect("exclusion");
    let mut own = rating("own");
    own.case_number = case;
    own.level = pb::Level::VeryDissatisfied as i32;
    let outcome = store.insert_ratings(vec![new(own)]).await.expect("insert");
    assert!(
        matches!(outcome[0], InsertOutcome::Accepted { .. }),
        "{outcome:?}"
    );
    let all = store.stats(&Default::default(), &[]).await.expect("stats");
    assert_eq!(
        all[0].total, 1,
        "the rater's rating counts, the default not"
    );
    assert_eq!(all[0].per_level[4], 1);
}

/// Pages of a broad region prefix (a city) are complete and in feed order whether the
/// matches are dense (the first page comes from the feed-order window) or sparse (the window
/// finds few, and the rest comes through the region index): 5,100 ratings of one city with
/// every 100th of another, then 100 more of the other.
#[tokio::test]
async fn pages_of_a_broad_region_prefix_are_complete_and_in_feed_order() {
    use rating_hub::store::RatingQuery;

    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    let keys = pii_keys(dir.path(), "test");
    let now = SystemClock.now_micros();
    let items: Vec<NewRating> = (0..5_200)
        .map(|i| {
            let mut r = rating(&format!("page-{i}"));
            if i % 100 == 99 || i >= 5_100 {
                r.region_code = "530402".into();
            }
            let v = rating_hub::domain::parse_rating(&r, now, &Default::default(), false)
                .expect("valid");
            NewRating::new(Uuid::now_v7(), "sys".into(), v, &keys, Default::default())
        })
        .collect();
    let mut other = Vec::new();
    let mut city = Vec::new();
    for chunk in items.chunks(500) {
        let stored = store.insert_ratings(chunk.to_vec()).await.expect("insert");
        for (item, seq) in chunk.iter().zip(accepted_seqs(&stored)) {
            if item.rating.region_code.as_str() == "530402" {
                other.push(seq);
            } else {
                city.push(seq);
            }
        }
    }
    assert_eq!(other.len(), 151);
    let pages = |prefix: &'static str| {
        let store = store.clone();
        async move {
            let query = RatingQuery {
                region_prefix: Some(prefix.into()),
                ..Default::default()
            };
            let (mut after, mut seen) = (0, Vec::new());
            loop {
                let page = store.list_ratings(&query, after, 50).await.expect("list");
                if page.is_empty() {
                    return seen;
                }
                assert!(page.len() == 50 || seen.len() + page.len() == 151 || prefix == "5301");
                after = page.last().unwrap().feed_seq;
                seen.extend(page.iter().map(|r| r.feed_seq));
            }
        }
    };
    assert_eq!(pages("5304").await, other);
    assert_eq!(pages("5301").await, city);
}

/// A valid 办结 event of case `number` (org 1, region 530102, now).
fn service_case(number: &str) -> rating_hub::pb::v1::ServiceCase {
    use rating_hub::pb::v1 as pb;
    pb::ServiceCase {
        case_number: number.to_owned(),
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(crate::utils::now()),
        item_code: "11530100MB1234567X4000112000001AB".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: crate::utils::org(1),
        org_name: "昆明市五华区政务服务中心".into(),
        channel: pb::Channel::HallDevice as i32,
        staff_id: "S01".into(),
        applicant: Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            name: "陈大文".into(),
            id_number: crate::utils::id_number(),
            phone: "13700001111".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

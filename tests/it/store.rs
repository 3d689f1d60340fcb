//! The group-commit writer, driven through the store directly: a group that fails stores
//! nothing of itself, gives its feed sequences back, and the writer carries on.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rating_hub::clock::{Clock, SystemClock};
use rating_hub::config::Config;
use rating_hub::store::{CaseEntryRecord, InsertOutcome, NewRating, RelayWrite, Store};
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

fn new_ratings(dir: &Path, prefix: &str, n: usize) -> Vec<NewRating> {
    let key = dir.join(format!("{prefix}-pii.key"));
    rating_hub::privacy::PiiKeys::create_key_file(&key).expect("key");
    let files = BTreeMap::from([("k".to_string(), key.display().to_string())]);
    let keys = rating_hub::privacy::PiiKeys::load("k", &files).expect("keys");
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

/// Tries to have the writer take `ratings` and a failing write as one group. The writer
/// runs on a thread of its own and takes whatever is queued when it starts a group; the two
/// jobs are queued in one poll, so they share a group unless the writer wakes between the
/// two. Returns the ratings' ids when they shared a group (and so failed with it), or
/// `None` when the ratings committed in a group of their own.
async fn in_a_failing_group(store: &dyn Store, ratings: Vec<NewRating>) -> Option<Vec<Uuid>> {
    let ids: Vec<Uuid> = ratings.iter().map(|r| r.hub_id).collect();
    let (ratings, write) = tokio::join!(
        store.insert_ratings(ratings),
        store.relay_write(failing_write())
    );
    assert!(write.is_err(), "the case entry must fail: {write:?}");
    ratings.is_err().then_some(ids)
}

#[tokio::test]
async fn a_failed_group_stores_none_of_its_ratings_and_the_next_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path()).await;
    // Ratings that committed on their own (the writer woke between the two jobs) are
    // stored and take sequences; the failed group must take none.
    let mut head = 0;
    let mut first_ids = None;
    for attempt in 0..20 {
        let batch = new_ratings(dir.path(), &format!("first{attempt}"), 3);
        if let Some(ids) = in_a_failing_group(&*store, batch).await {
            first_ids = Some(ids);
            break;
        }
        head += 3;
    }
    let first_ids =
        first_ids.expect("in 20 tries the ratings never shared a group with the failing write");
    for id in &first_ids {
        assert!(
            store.get_rating(*id).await.unwrap().is_none(),
            "a rating of the failed group was stored"
        );
    }
    assert_eq!(
        *store.feed_head().borrow(),
        head,
        "the failed group moved the feed head"
    );

    // The writer goes on, with the sequences the failed group gave back.
    let second = new_ratings(dir.path(), "second", 3);
    let second_ids: Vec<Uuid> = second.iter().map(|r| r.hub_id).collect();
    let outcomes = store
        .insert_ratings(second)
        .await
        .expect("the next group commits");
    assert_eq!(accepted_seqs(&outcomes), vec![head + 1, head + 2, head + 3]);
    for id in &second_ids {
        assert!(store.get_rating(*id).await.unwrap().is_some());
    }
    // A lone failing write fails alone.
    assert!(store.relay_write(failing_write()).await.is_err());
    let third = new_ratings(dir.path(), "third", 2);
    let outcomes = store
        .insert_ratings(third)
        .await
        .expect("commits after a lone failure");
    assert_eq!(accepted_seqs(&outcomes), vec![head + 4, head + 5]);
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

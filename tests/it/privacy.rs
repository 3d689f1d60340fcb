//! Rater privacy: encrypted at rest, masked without read-pii, unmasked reads audited, and
//! never in a log line.

use std::path::Path;

use rating_hub::domain::codes::id_number_with_check;
use rating_hub::pb::v1 as pb;
use tokio_stream::StreamExt;

use crate::binary::{SpawnedHub, dev_admin_channel, sigterm, spawn_hub_with, wait_exit};
use crate::security::AdminServiceClient;
use crate::utils::*;

const NAME: &str = "欧阳秘密";
const PHONE: &str = "13987654321";
const LANDLINE: &str = "0871-66012345";

fn planted_id() -> String {
    id_number_with_check("53011119770405667").unwrap()
}

fn planted(key: &str) -> pb::Rating {
    let mut r = rating(key);
    let rater = r.rater.as_mut().unwrap();
    rater.name = NAME.into();
    rater.id_number = planted_id();
    rater.phone = PHONE.into();
    r
}

/// Every occurrence of the planted values, as bytes, in every file under `dir`.
fn files_containing_pii(dir: &Path) -> Vec<String> {
    let needles = [
        planted_id().into_bytes(),
        PHONE.as_bytes().to_vec(),
        NAME.as_bytes().to_vec(),
        "087166012345".as_bytes().to_vec(),
    ];
    let mut hits = Vec::new();
    for entry in walk(dir) {
        // A server's temporary files may come and go during the scan.
        let Ok(bytes) = std::fs::read(&entry) else {
            continue;
        };
        for n in &needles {
            if bytes.windows(n.len()).any(|w| w == n.as_slice()) {
                hits.push(format!(
                    "{} holds {:?}",
                    entry.display(),
                    String::from_utf8_lossy(n)
                ));
            }
        }
    }
    hits
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn database_files_hold_no_plaintext_id_phone_or_name() {
    let hub = TestHub::start().await;
    let mut ingest = hub.ingest().await;
    let results = submit(
        &mut ingest,
        (0..50).map(|i| planted(&format!("p{i}"))).collect(),
    )
    .await;
    assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    let case = pb::ServiceCase {
        case_number: "PII-CASE".into(),
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(now()),
        item_code: "I".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        applicant: Some(pb::Rater {
            name: NAME.into(),
            id_number: planted_id(),
            phone: LANDLINE.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    ingest
        .report_service_cases(pb::ReportServiceCasesRequest { cases: vec![case] })
        .await
        .unwrap();
    // The data is stored (sealed): a read-pii principal gets it back in full.
    let got = hub
        .query()
        .await
        .get_rating(pb::GetRatingRequest {
            hub_id: results[0].hub_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .rating
        .unwrap();
    assert_eq!(got.rater.unwrap().id_number, planted_id());

    if crate::pg::enabled() {
        // The database's files (tables, indexes, TOAST) and the server's write-ahead log,
        // checkpointed, while the hub runs and after it stopped.
        let scan = |dir: &Path| -> Vec<String> {
            let files = crate::pg::files_of(dir).expect("the test server's files are readable");
            assert!(
                walk(&files[0]).len() > 10,
                "the database's files were found"
            );
            files.iter().flat_map(|f| files_containing_pii(f)).collect()
        };
        assert_eq!(scan(hub.dir.path()), Vec::<String>::new());
        let stopped = hub.stop().await;
        assert_eq!(scan(stopped.dir.path()), Vec::<String>::new());
        return;
    }
    // Scan the database while running (WAL) and after shutdown (checkpointed).
    let db_dir = hub.dir.path().to_owned();
    let only_db = |hits: Vec<String>| -> Vec<String> {
        hits.into_iter().filter(|h| h.contains("hub.db")).collect()
    };
    assert_eq!(only_db(files_containing_pii(&db_dir)), Vec::<String>::new());
    let stopped = hub.stop().await;
    assert_eq!(
        only_db(files_containing_pii(stopped.dir.path())),
        Vec::<String>::new()
    );
    assert!(stopped.dir.path().join("hub.db").metadata().unwrap().len() > 0);
}

#[tokio::test]
async fn readers_without_read_pii_see_masks_and_unmasked_reads_are_audited() {
    let hub = HubBuilder::new()
        .principal("reader", &["read"], TestScope::National)
        .principal("investigator", &["read", "read-pii"], TestScope::National)
        .principal("operator", &["admin"], TestScope::National)
        .start()
        .await;
    let mut ingest = hub.ingest().await;
    let id = submit_one(&mut ingest, planted("m1")).await.hub_id;

    let get_as = |who: &'static str| {
        let id = id.clone();
        let hub = &hub;
        async move {
            QueryServiceClient::new(hub.channel_as(who).await)
                .get_rating(pb::GetRatingRequest { hub_id: id })
                .await
                .unwrap()
                .into_inner()
                .rating
                .unwrap()
                .rater
                .unwrap()
        }
    };
    let masked = get_as("reader").await;
    let pid = planted_id();
    assert_eq!(
        masked.id_number,
        format!("{}********{}", &pid[..6], &pid[14..])
    );
    assert_eq!(masked.phone, "139****4321");
    assert_eq!(masked.name, "欧***");
    let full = get_as("investigator").await;
    assert_eq!(
        (
            full.id_number.as_str(),
            full.phone.as_str(),
            full.name.as_str()
        ),
        (pid.as_str(), PHONE, NAME)
    );
    // A list counts too.
    QueryServiceClient::new(hub.channel_as("investigator").await)
        .list_ratings(pb::ListRatingsRequest::default())
        .await
        .unwrap();

    let audit = AdminServiceClient::new(hub.channel_as("operator").await)
        .list_pii_access(pb::ListPiiAccessRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    let rows: Vec<_> = audit
        .iter()
        .map(|a| (a.principal.as_str(), a.rpc.as_str(), a.hub_id.as_str()))
        .collect();
    assert_eq!(
        rows,
        [
            ("investigator", "GetRating", id.as_str()),
            ("investigator", "ListRatings", id.as_str()),
        ],
        "only unmasked reads are audited, each with who, which call and which rating"
    );
    assert!(audit.iter().all(|a| a.at.is_some()));
    let filtered = AdminServiceClient::new(hub.channel_as("operator").await)
        .list_pii_access(pb::ListPiiAccessRequest {
            principal: "reader".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(filtered.is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn a_run_with_planted_pii_logs_none_of_it() {
    let dir = tempfile::tempdir().unwrap();
    // Everything the hub and its libraries log, at the most verbose level.
    // An upstream that refuses one rating for good, echoing the rater's phone and ID in its
    // error text (as real platforms do): the relay's retries, its dead letter, its status.
    let fake = crate::fake_upstream::FakeUpstream::start().await;
    fake.reject_origin_keys(["ok-1".to_string()]);
    let upstream_url = fake.url();
    let SpawnedHub {
        mut child,
        url,
        early,
        logs,
    } = spawn_hub_with(
        dir.path(),
        "trace",
        &[
            ("RATING_HUB__UPSTREAMS__FAKE__KIND", "grpc"),
            ("RATING_HUB__UPSTREAMS__FAKE__ENDPOINT", &upstream_url),
            ("RATING_HUB__UPSTREAMS__FAKE__RETRY_SCHEDULE_MS", "[20, 20]"),
        ],
    );
    let channel = dev_admin_channel(dir.path(), &url).await;
    let mut ingest = IngestServiceClient::new(channel.clone());
    let mut bad_phone = planted("bad-phone");
    bad_phone.rater.as_mut().unwrap().phone = "12987654321".into();
    let mut bad_id = planted("bad-id");
    let mut wrong = planted_id().into_bytes();
    wrong[17] = if wrong[17] == b'0' { b'1' } else { b'0' };
    bad_id.rater.as_mut().unwrap().id_number = String::from_utf8(wrong.clone()).unwrap();
    let results = submit(&mut ingest, vec![planted("ok-1"), bad_phone, bad_id]).await;
    assert_eq!(outcome(&results[0]), pb::Outcome::Accepted);
    assert_eq!(outcome(&results[1]), pb::Outcome::Invalid);
    assert_eq!(outcome(&results[2]), pb::Outcome::Invalid);
    let stream: Vec<_> = ingest
        .stream_ratings(tokio_stream::iter(vec![pb::StreamRatingsRequest {
            rating: Some(planted("ok-2")),
        }]))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(stream.len(), 1);
    let mut query = QueryServiceClient::new(channel);
    query
        .get_rating(pb::GetRatingRequest {
            hub_id: results[0].hub_id.clone(),
        })
        .await
        .unwrap();
    query
        .list_ratings(pb::ListRatingsRequest::default())
        .await
        .unwrap();
    // A reused key with other content: a conflict, the planted rater in both.
    let mut reused = planted("ok-1");
    reused.level = pb::Level::Dissatisfied as i32;
    reused.text = "办理太慢".into();
    let results = submit(&mut ingest, vec![reused]).await;
    assert_eq!(outcome(&results[0]), pb::Outcome::Conflict);
    // A service case with the planted applicant (the rules engine ticks over it at start
    // and on each tick).
    let case = pb::ServiceCase {
        case_number: "PII-CASE-1".into(),
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(rating_hub::time::timestamp_from_micros(
            rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock),
        )),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        applicant: Some(pb::Rater {
            name: NAME.into(),
            id_number: planted_id(),
            phone: PHONE.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = ingest
        .report_service_cases(pb::ReportServiceCasesRequest { cases: vec![case] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.results.len(), 1);
    // The relay has tried ok-1 and given it up (a dead letter with the upstream's text).
    let mut admin = AdminServiceClient::new(dev_admin_channel(dir.path(), &url).await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let dead = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                upstream: "fake".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .dead_letters;
        if !dead.is_empty() {
            assert!(dead[0].error.contains("unknown item"), "{dead:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = admin
        .list_upstreams(pb::ListUpstreamsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let shown = format!("{status:?}");
    assert!(
        !shown.contains(PHONE) && !shown.contains(&planted_id()),
        "{shown}"
    );

    sigterm(&child);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child))
        .await
        .unwrap();
    assert!(status.success());
    let mut all = early;
    all.extend(crate::binary::logs_to_eof(&logs));
    assert!(
        all.len() > 20,
        "trace logging produced output: {}",
        all.len()
    );
    let text = all.join("\n");
    let wrong = String::from_utf8(wrong).unwrap();
    for needle in [
        planted_id().as_str(),
        wrong.as_str(),
        PHONE,
        "12987654321",
        NAME,
    ] {
        assert!(
            !text.contains(needle),
            "a log line holds planted PII {needle:?}"
        );
    }
}

/// Issue #22, 国密 at rest: a hub whose operator makes an SM4-GCM key (with the binary's
/// `key new`) the active one seals new records under it and still reads those sealed before
/// under ChaCha20-Poly1305; neither is in the database in the clear.
#[tokio::test]
async fn a_hub_moved_to_sm4_gcm_seals_new_records_with_it_and_reads_the_old_ones() {
    let hub = TestHub::start().await;
    let before = submit(&mut hub.ingest().await, vec![planted("gm-before")]).await;
    assert_eq!(outcome(&before[0]), pb::Outcome::Accepted);
    let stopped = hub.stop().await;
    let gm = stopped.dir.path().join("gm2027.key");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .args(["key", "new", "--algorithm", "sm4-gcm"])
        .arg(&gm)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    assert_eq!(std::fs::read_to_string(&gm).unwrap().trim().len(), 32);
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_rating-hub"))
        .args(["key", "new", "--algorithm", "sm4-gcm"])
        .arg(&gm)
        .output()
        .unwrap();
    assert!(!again.status.success(), "a key is never replaced");
    let q = |s: &str| format!("\"{s}\"");
    let hub = stopped
        .restart_with(|b| {
            b.set("privacy.keys.gm2027", &q(&gm.display().to_string()))
                .set("privacy.algorithms.gm2027", &q("sm4-gcm"))
                .set("privacy.active_key", &q("gm2027"))
        })
        .await;
    let after = submit(&mut hub.ingest().await, vec![planted("gm-after")]).await;
    assert_eq!(outcome(&after[0]), pb::Outcome::Accepted);
    let mut query = hub.query().await;
    for r in [&before[0], &after[0]] {
        let got = query
            .get_rating(pb::GetRatingRequest {
                hub_id: r.hub_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .rating
            .unwrap()
            .rater
            .unwrap();
        assert_eq!(
            (got.name.as_str(), got.id_number, got.phone.as_str()),
            (NAME, planted_id(), PHONE)
        );
    }
    assert_eq!(
        crate::pg::query_on_hub(
            hub.dir.path(),
            "SELECT pii_key_id FROM ratings ORDER BY feed_seq"
        ),
        ["test", "gm2027"]
    );
    if !crate::pg::enabled() {
        let stopped = hub.stop().await;
        let hits: Vec<String> = files_containing_pii(stopped.dir.path())
            .into_iter()
            .filter(|h| h.contains("hub.db"))
            .collect();
        assert_eq!(hits, Vec::<String>::new());
    }
}

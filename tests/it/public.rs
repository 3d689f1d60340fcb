//! 评价结果公开 (issue #21): the public site served by the real hub, loaded in a real browser
//! (Debian's Chromium, installed by scripts/test-deps) and over plain HTTP; the numbers on
//! the rendered pages checked against numbers computed here from the ratings submitted; no
//! rater data anywhere; what is published is configuration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pb::rectification_service_client::RectificationServiceClient;
use rating_hub::clock::{Clock, ManualClock};
use rating_hub::pb::v1 as pb;

use crate::rules::cst;
use crate::utils::*;

/// Debian's Chromium (`RATING_HUB_CHROMIUM` overrides).
fn chromium() -> PathBuf {
    let path = std::env::var_os("RATING_HUB_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: the public-site tests load pages in Chromium; run scripts/test-deps",
        path.display()
    );
    path
}

/// Runs headless Chromium on `url` with `args` (a minute at most), off the runtime's threads.
async fn browse(url: String, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let profile = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("timeout")
            .arg("60")
            .arg(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                // Containers give /dev/shm 64 MB, too little for Chromium's shared memory.
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args)
            .arg(url)
            .output()
            .expect("Chromium runs");
        assert!(
            out.status.success(),
            "Chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8 DOM")
    })
    .await
    .unwrap()
}

/// The page's DOM as Chromium rendered it.
pub(crate) async fn dom(url: String) -> String {
    browse(url, vec!["--dump-dom".into()]).await
}

/// A screenshot of the page into `file` (a phone's width when `phone`).
pub(crate) async fn screenshot(url: String, file: &Path, phone: bool) {
    let size = if phone { "414,1100" } else { "1200,1000" };
    browse(
        url,
        vec![
            format!("--screenshot={}", file.display()),
            format!("--window-size={size}"),
        ],
    )
    .await;
    let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    assert!(len > 10_000, "a screenshot of {} bytes shows nothing", len);
}

/// The text of cell `col` in the table row keyed `key` (`data-key` or `data-id`).
fn cell(dom: &str, key_attr: &str, key: &str, col: &str) -> String {
    let at = dom
        .find(&format!("{key_attr}=\"{key}\""))
        .unwrap_or_else(|| panic!("no row {key}"));
    let row = &dom[at..at + dom[at..].find("</tr>").expect("row end")];
    let c = row
        .find(&format!("data-col=\"{col}\""))
        .unwrap_or_else(|| panic!("no cell {col} in row {key}: {row}"));
    let text = &row[c + row[c..].find('>').unwrap() + 1..];
    text[..text.find('<').unwrap()].to_owned()
}

fn http() -> reqwest::Client {
    // reqwest's rustls needs a process-wide provider; the hub uses ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn public_hub(clock: Arc<ManualClock>) -> HubBuilder {
    HubBuilder::new()
        .clock(clock)
        .set("public.listen", "\"127.0.0.1:0\"")
        .set("public.regions", "[\"5301\"]")
        .set("public.min_ratings", "3")
        .set("public.case_delay_days", "2")
        .set(
            "public.names",
            &format!(
                "{{ \"5301\" = \"昆明市\", \"{}\" = \"五华区政务服务中心\" }}",
                org(1)
            ),
        )
}

fn rated(key: &str, org_n: u32, level: pb::Level, clock: &ManualClock) -> pb::Rating {
    let mut r = rating(key);
    r.org_credit_code = org(org_n);
    r.org_name = format!("单位{org_n}");
    r.level = level as i32;
    r.rated_at = Some(rating_hub::time::timestamp_from_micros(clock.now_micros()));
    r
}

async fn case_id(
    rect: &mut RectificationServiceClient<tonic::transport::Channel>,
    hub_id: String,
) -> u64 {
    rect.list_cases(pb::ListCasesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cases
        .into_iter()
        .find(|c| c.hub_id == hub_id)
        .unwrap()
        .id
}

/// Results by organisation for 2025 Q2 in Kunming, rendered by Chromium: names, counts,
/// rates, Kunming's average score and the ranking, as computed here from what was submitted;
/// an organisation below the minimum shows its count and nothing else; another city's
/// ratings are not there. The same numbers in the JSON and CSV files.
#[tokio::test]
async fn published_results_match_the_ratings_in_the_browser() {
    use pb::Level::*;
    let clock = Arc::new(ManualClock::at(cst("2025-05-20", 10)));
    let hub = public_hub(clock.clone()).start().await;
    let mut ingest = hub.ingest().await;
    let mut all = Vec::new();
    let levels: [(u32, &[pb::Level]); 3] = [
        (1, &[VerySatisfied, VerySatisfied, Satisfied, Dissatisfied]),
        (2, &[VerySatisfied, BasicallySatisfied, BasicallySatisfied]),
        (3, &[Satisfied, Satisfied]),
    ];
    for (org_n, ls) in levels {
        for (i, l) in ls.iter().enumerate() {
            all.push(rated(&format!("o{org_n}-{i}"), org_n, *l, &clock));
        }
    }
    // Another city (Qujing, 5303): not published.
    let mut elsewhere = rated("qujing", 4, VeryDissatisfied, &clock);
    elsewhere.region_code = "530302".into();
    all.push(elsewhere);
    for r in submit(&mut ingest, all).await {
        assert_eq!(outcome(&r), pb::Outcome::Accepted, "{r:?}");
    }
    // Kunming scores 10, 8, 6, 2, 0: org 1 (10+10+8+2)/4 = 7.5, org 2 (10+6+6)/3 ≈ 7.33.
    let expect = [
        (
            org(1),
            "五华区政务服务中心",
            "4",
            "75.0%",
            "25.0%",
            "7.50",
            "1",
        ),
        (org(2), "单位2", "3", "33.3%", "0.0%", "7.33", "2"),
    ];
    let base = format!("http://{}", hub.hub.public_addr.expect("the public site"));
    let page = dom(format!("{base}/results?region=5301&period=2025-Q2")).await;
    assert!(page.contains("昆明市"), "{page}");
    for (key, name, total, good, bad, avg, rank) in &expect {
        assert_eq!(cell(&page, "data-key", key, "name"), *name);
        assert_eq!(cell(&page, "data-key", key, "total"), *total);
        assert_eq!(cell(&page, "data-key", key, "good_rate"), *good);
        assert_eq!(cell(&page, "data-key", key, "bad_rate"), *bad);
        assert_eq!(cell(&page, "data-key", key, "average_score"), *avg);
        assert_eq!(cell(&page, "data-key", key, "rank"), *rank);
    }
    // Two ratings are too few to publish a rate.
    let withheld = org(3);
    assert_eq!(cell(&page, "data-key", &withheld, "total"), "2");
    for col in ["level1", "level4", "good_rate", "average_score", "rank"] {
        assert_eq!(cell(&page, "data-key", &withheld, col), "—", "{col}");
    }
    assert!(
        !page.contains(&org(4)),
        "another city's ratings are not published"
    );
    // The chart is in the page itself: no script ran.
    assert!(page.contains("<svg") && !page.contains("<script"), "{page}");

    let client = http();
    let json: serde_json::Value = serde_json::from_str(
        &client
            .get(format!(
                "{base}/data/results.json?region=5301&period=2025-Q2"
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    let groups = json["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{json}");
    assert_eq!(groups[0]["key"], org(1).as_str());
    assert_eq!(groups[0]["good_rate"], 0.75);
    assert_eq!(groups[0]["levels"], serde_json::json!([2, 1, 0, 1, 0]));
    assert_eq!(groups[1]["average_score"], 7.3333);
    assert_eq!(groups[2]["withheld"], true);
    assert_eq!(groups[2]["total"], 2);
    // Its counts by level would give its rates (and one rating, its rater's level).
    for hidden in ["good_rate", "levels", "default_ratings", "rank"] {
        assert!(groups[2].get(hidden).is_none(), "{hidden}: {json}");
    }
    let csv = client
        .get(format!(
            "{base}/data/results.csv?region=5301&period=2025-Q2"
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = csv.lines().find(|l| l.contains(&org(2))).unwrap();
    assert!(line.starts_with("2025-Q2,5301,organization,"), "{line}");
    assert!(line.contains(",3,1,0,2,0,0,"), "{line}");

    // The page as a citizen sees it, for the docs (RATING_HUB_UPDATE_SCREENSHOTS=1 writes
    // docs/public-results*.png; otherwise into the test's directory).
    let docs = std::env::var_os("RATING_HUB_UPDATE_SCREENSHOTS").is_some();
    let dir = if docs {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs")
    } else {
        hub.dir.path().to_owned()
    };
    let url = format!("{base}/results?region=5301&period=2025-Q2");
    screenshot(url.clone(), &dir.join("public-results.png"), false).await;
    screenshot(url, &dir.join("public-results-phone.png"), true).await;
    hub.stop().await;
}

/// The 差评 list under its rules, with nothing of the rater: rater name, phone and ID
/// number planted in every PII field, in the rater's own words and in the unit's notes
/// (also written with spaces and dashes) appear in no page, JSON or CSV; a case still open
/// (rule "archived") and a case inside its two-day delay are absent; an unpublished region
/// is 404; and responses carry ETag, Last-Modified and Cache-Control, answering 304 to a
/// client that has them.
#[tokio::test]
async fn published_cases_follow_their_rules_and_show_nothing_of_the_rater() {
    let clock = Arc::new(ManualClock::at(cst("2025-05-06", 9)));
    let hub = public_hub(clock.clone()).start().await;
    let mut ingest = hub.ingest().await;
    const NAME: &str = "欧阳娜娜";
    const PHONE: &str = "13912345678";
    let id = id_number();
    let bad = |key: &str| {
        let mut r = rated(key, 1, pb::Level::VeryDissatisfied, &clock);
        r.text = format!("我是{NAME}，电话{PHONE}，身份证{id}，窗口态度差");
        r.rater = Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            name: NAME.into(),
            phone: PHONE.into(),
            id_number: id.clone(),
            ..Default::default()
        });
        r
    };
    let results = submit(&mut ingest, vec![bad("done"), bad("open")]).await;
    let mut rect = RectificationServiceClient::new(hub.channel_as("tester").await);
    let done = case_id(&mut rect, results[0].hub_id.clone()).await;
    let step = |action: pb::CaseAction, note: &str, refs: &[&str]| pb::RecordActionRequest {
        id: done,
        action: action as i32,
        note: note.into(),
        evidence_refs: refs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for (action, note, refs) in [
        (pb::CaseAction::Contact, "已电话联系", &[][..]),
        (
            pb::CaseAction::Rectify,
            "已联系欧阳娜娜（139 1234 5678），窗口3号已加强培训并调整排班",
            &["整改台账-7"][..],
        ),
        (pb::CaseAction::FeedBack, "已反馈", &[][..]),
        (pb::CaseAction::Callback, "回访满意", &[][..]),
        (pb::CaseAction::Archive, "存档", &[][..]),
    ] {
        rect.record_action(step(action, note, refs)).await.unwrap();
    }
    // A day later another 差评 arrives and is closed at once: inside its delay.
    clock.set(cst("2025-05-07", 9));
    let late = submit_one(&mut ingest, bad("late")).await.hub_id;
    let late_id = case_id(&mut rect, late).await;
    for action in [
        pb::CaseAction::Contact,
        pb::CaseAction::Rectify,
        pb::CaseAction::FeedBack,
        pb::CaseAction::Callback,
        pb::CaseAction::Archive,
    ] {
        rect.record_action(pb::RecordActionRequest {
            id: late_id,
            ..step(action, "已处理", &["台账-8"])
        })
        .await
        .unwrap();
    }
    clock.set(cst("2025-05-08", 12));

    let base = format!("http://{}", hub.hub.public_addr.expect("the public site"));
    let q = "?region=5301&period=2025-Q2";
    let page = dom(format!("{base}/cases{q}")).await;
    assert!(page.contains(&format!("data-id=\"{done}\"")), "{page}");
    assert_eq!(
        cell(&page, "data-id", &done.to_string(), "status"),
        "已办结"
    );
    // Opened Tuesday 2025-05-06: 15 working days end with Tuesday 2025-05-27.
    let json: serde_json::Value = serde_json::from_str(
        &http()
            .get(format!("{base}/data/cases.json{q}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(json["cases"][0]["deadline"], "2025-05-27", "{json}");
    let outcome = cell(&page, "data-id", &done.to_string(), "outcome");
    assert!(outcome.contains("窗口3号已加强培训"), "{outcome}");
    assert!(
        !page.contains(&format!("data-id=\"{late_id}\"")),
        "inside its delay"
    );
    assert_eq!(
        page.matches("<tr data-id=").count(),
        1,
        "the open case is absent"
    );

    let client = http();
    let mut published = vec![page, dom(format!("{base}/results{q}")).await];
    for path in [
        "/data/cases.json",
        "/data/cases.csv",
        "/data/results.json",
        "/data/results.csv",
        "/",
    ] {
        published.push(
            client
                .get(format!("{base}{path}{q}"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    let digits_of = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    for text in &published {
        for secret in [NAME, "娜娜", PHONE, &id, "窗口态度差"] {
            assert!(!text.contains(secret), "{secret} published:\n{text}");
        }
        // Written with spaces or dashes, the phone is still not there.
        assert!(
            !digits_of(text).contains(PHONE),
            "the phone, spaced, in:\n{text}"
        );
    }

    // Not published: another region, a page that is not there, a bad period.
    for (path, status) in [
        ("/results?region=4401&period=2025-Q2", 404),
        ("/cases?region=4401", 404),
        ("/data/results.json?region=53", 404),
        ("/nope", 404),
        ("/results?region=5301&period=2025-Q9", 400),
        ("/results?region=5301&period=2025-+5", 400),
        ("/cases?region=5301&page=x", 400),
    ] {
        let r = client.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{path}");
    }

    if std::env::var_os("RATING_HUB_UPDATE_SCREENSHOTS").is_some() {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/public-cases.png");
        screenshot(format!("{base}/cases{q}"), &file, false).await;
    }

    // HTTP caching: the same copy is 304 to a client that has it.
    let url = format!("{base}/data/cases.json{q}");
    let first = client.get(&url).send().await.unwrap();
    let etag = first.headers()["etag"].to_str().unwrap().to_owned();
    assert!(first.headers().contains_key("last-modified"));
    assert!(
        first.headers()["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("public, max-age=")
    );
    let again = client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status().as_u16(), 304);
    hub.stop().await;
}

/// Each client address has its own request rate: past its burst, 429 with Retry-After, and
/// nothing computed for it.
#[tokio::test]
async fn a_client_past_its_request_rate_is_answered_429() {
    let clock = Arc::new(ManualClock::at(cst("2025-05-06", 9)));
    let hub = public_hub(clock)
        .set("public.requests_per_sec", "1")
        .set("public.requests_burst", "5")
        .start()
        .await;
    let base = format!("http://{}", hub.hub.public_addr.expect("the public site"));
    let client = http();
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = client
            .get(format!("{base}/results?region=5301"))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        codes.push(r.status().as_u16());
    }
    assert_eq!(codes[..5], [200; 5], "{codes:?}");
    assert!(codes[5..].contains(&429), "{codes:?}");
    hub.stop().await;
}

/// A public listener holds nobody's resources for long: one client address gets at most 32
/// connections at once (the 33rd is closed before a byte is read), and the site still
/// answers once they are gone; a malformed query string is the site's own 400.
#[tokio::test]
async fn one_client_cannot_hold_more_than_its_share_of_connections() {
    use tokio::io::AsyncReadExt;
    let clock = Arc::new(ManualClock::at(cst("2025-05-06", 9)));
    let hub = public_hub(clock).start().await;
    let addr = hub.hub.public_addr.expect("the public site");
    let mut idle = Vec::new();
    for _ in 0..32 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    // Well within the 10 s header timeout, which would close it too.
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), over.read(&mut buf))
        .await
        .expect("the 33rd connection is closed at once, not left open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop(idle);
    let base = format!("http://{addr}");
    // The closed connections are counted out as the server notices them.
    let mut status = 0;
    for _ in 0..100 {
        match http().get(format!("{base}/")).send().await {
            Ok(r) => {
                status = r.status().as_u16();
                break;
            }
            Err(_) => tokio::task::yield_now().await,
        }
    }
    assert_eq!(status, 200);
    let r = http()
        .get(format!("{base}/results?period=2025&period=2024"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("请求参数有误"));
    hub.stop().await;
}

/// Under the rule "deadline", a case is published once it is overdue for any reason: a
/// Guangdong unit that never declared its rectification deadline is published as 逾期未整改
/// once its time to declare has passed, and not before.
#[tokio::test]
async fn under_the_deadline_rule_an_undeclared_overdue_case_is_published() {
    let clock = Arc::new(ManualClock::at(cst("2025-03-03", 9)));
    let hub = HubBuilder::new()
        .clock(clock.clone())
        .set("public.listen", "\"127.0.0.1:0\"")
        .set("public.regions", "[\"44\"]")
        .set("public.cases", "\"deadline\"")
        .set("public.case_delay_days", "0")
        .set("public.refresh_secs", "1")
        .start()
        .await;
    let mut r = rated("gd", 1, pb::Level::Dissatisfied, &clock);
    r.region_code = "440104".into();
    submit_one(&mut hub.ingest().await, r).await;
    let base = format!("http://{}", hub.hub.public_addr.expect("the public site"));
    let listed = |period: &'static str| {
        let url = format!("{base}/data/cases.json?region=44&period={period}");
        async move {
            let text = http().get(url).send().await.unwrap().text().await.unwrap();
            serde_json::from_str::<serde_json::Value>(&text).unwrap()["cases"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    // Fifteen working days from Monday 2025-03-03 end with 2025-03-24.
    clock.set(cst("2025-03-24", 20));
    assert!(listed("2025-03").await.is_empty());
    clock.set(cst("2025-03-25", 9));
    // Another spelling of the period: computed afresh, not the copy from before.
    let cases = listed("2025-Q1").await;
    assert_eq!(cases.len(), 1, "{cases:?}");
    assert_eq!(cases[0]["status"], "overdue");
    assert_eq!(cases[0]["status_label"], "逾期未整改");
    assert!(cases[0]["deadline"].is_null(), "{cases:?}");
    hub.stop().await;
}

/// With a certificate the site is HTTPS: a browser that trusts its CA gets the pages, and
/// plain HTTP on that port gets nothing.
#[tokio::test]
async fn with_a_certificate_the_site_is_https() {
    use rating_hub::pki;
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    pki::create_ca(&pki_dir, "rating-hub test CA").unwrap();
    pki::issue_server(
        &pki_dir,
        &["localhost", "127.0.0.1"],
        pki::Validity::days(30),
    )
    .unwrap();
    let file = |name: &str| format!("{:?}", pki_dir.join(name).display().to_string());
    let clock = Arc::new(ManualClock::at(cst("2025-05-06", 9)));
    let hub = public_hub(clock)
        .set("public.tls_cert", &file(pki::SERVER_CERT))
        .set("public.tls_key", &file(pki::SERVER_KEY))
        .start_in_dir(dir)
        .await;
    let addr = hub.hub.public_addr.expect("the public site");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(pki_dir_of(&hub).join(pki::CA_CERT)).unwrap(),
    )
    .unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let r = client
        .get(format!(
            "https://localhost:{}/results?region=5301",
            addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("评价结果"));
    assert!(http().get(format!("http://{addr}/")).send().await.is_err());
    hub.stop().await;
}

fn pki_dir_of(hub: &TestHub) -> PathBuf {
    hub.dir.path().join("pki")
}

/// Case pages and files asked for at once, none computed yet: each is answered (a page's
/// computation used to wait for the case list's while holding one of the two computation
/// slots, so two such requests at once waited for each other for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_pages_asked_for_at_once_are_all_answered() {
    let clock = Arc::new(ManualClock::at(cst("2025-05-06", 9)));
    let hub = public_hub(clock).start().await;
    let base = format!("http://{}", hub.hub.public_addr.expect("the public site"));
    let client = http();
    let mut asks = Vec::new();
    for region in ["5301", "530102"] {
        for period in ["2025-Q2", "2025-05"] {
            for path in ["/cases", "/data/cases.csv", "/data/cases.json"] {
                let url = format!("{base}{path}?region={region}&period={period}");
                let client = client.clone();
                asks.push(tokio::spawn(async move {
                    tokio::time::timeout(std::time::Duration::from_secs(30), client.get(url).send())
                        .await
                        .expect("answered")
                        .unwrap()
                        .status()
                        .as_u16()
                }));
            }
        }
    }
    for a in asks {
        assert_eq!(a.await.unwrap(), 200);
    }
    hub.stop().await;
}

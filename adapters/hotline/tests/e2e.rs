//! The hotline adapter end to end against a real hub (mTLS, real SQLite) and a fake SMS
//! gateway: invitation → SMS → reply → rating at the hub; replies that are not ratings are
//! kept with a reason; the hub being down does not stop the adapter from taking replies.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use rating_hub::clock::{Clock, ManualClock};
use rating_hub::pb::v1 as pb;
use rating_hub::rules::Date;
use rating_hub_adapter_kit::HubConnection;
use rating_hub_adapter_kit::testing::{hub_connection, start_hub, tester_channel};
use rating_hub_hotline::HotlineConfig;
use rating_hub_hotline::config::GatewayConfig;
use serde_json::{Value, json};

fn cst(date: &str, hour: i64) -> i64 {
    Date::parse(date).unwrap().start_micros() + hour * 3_600_000_000
}

fn org() -> String {
    rating_hub::domain::codes::credit_code_with_check("11440100MA0000001").unwrap()
}

/// A phone number the fake gateway refuses to send to.
const REFUSED_PHONE: &str = "13700000000";

/// A fake SMS gateway that records what it is asked to send.
async fn start_gateway() -> (String, Arc<Mutex<Vec<Value>>>) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let s = sent.clone();
    let app = Router::new().route(
        "/send",
        post(move |Json(v): Json<Value>| {
            let s = s.clone();
            async move {
                // A number the gateway will not reach (blocklisted): refused, not recorded.
                if v["phone_number"] == REFUSED_PHONE {
                    return (
                        axum::http::StatusCode::BAD_REQUEST,
                        Json(json!({"code": 1, "msg": "号码不可达"})),
                    );
                }
                s.lock().unwrap().push(v);
                (axum::http::StatusCode::OK, Json(json!({"code": 0})))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/send", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, sent)
}

fn adapter_config(dir: &Path, hub: HubConnection, gateway: Option<String>) -> HotlineConfig {
    HotlineConfig {
        listen: "127.0.0.1:0".into(),
        spool: dir.join("spool.db").display().to_string(),
        state: dir.join("state.db").display().to_string(),
        sms_scale: 5,
        ivr_scale: 5,
        survey_ttl_hours: 72,
        poll_invitations_secs: 0,
        hub,
        gateway: gateway.map(|url| GatewayConfig {
            url,
            extension_prefix: "9".into(),
            template: "请回复1-5评价“{item}”".into(),
            ca: String::new(),
        }),
        callback_auth: rating_hub_adapter_kit::testing::callback_auth(dir),
        at_rest: Default::default(),
    }
}

fn case(number: &str, completed: i64) -> pb::ServiceCase {
    pb::ServiceCase {
        case_number: number.into(),
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(rating_hub::time::timestamp_from_micros(completed)),
        item_code: "440100-ITEM-3".into(),
        item_name: "社保卡补办".into(),
        region_code: "440103".into(),
        org_credit_code: org(),
        applicant: Some(pb::Rater {
            phone: "13912345678".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Posts a callback signed as the gateway signs it.
async fn post_json(url: String, body: Value) -> Value {
    let body = body.to_string();
    let path = reqwest::Url::parse(&url).unwrap().path().to_owned();
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json");
    for (k, v) in rating_hub_adapter_kit::testing::signed_headers(&path, body.as_bytes()) {
        request = request.header(k, v);
    }
    request
        .body(body)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()
}

/// Waits (bounded) for the hub to hold a rating of `case_number`.
async fn rating_at_hub(dir: &Path, port: u16, case_number: &str) -> pb::Rating {
    let mut query =
        pb::query_service_client::QueryServiceClient::new(tester_channel(dir, port).await);
    for _ in 0..1500 {
        let found = query
            .list_ratings(pb::ListRatingsRequest {
                filter: Some(pb::RatingFilter {
                    case_number: case_number.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .ratings;
        if let Some(r) = found.into_iter().next() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no rating for {case_number} at the hub within 30 s");
}

#[tokio::test]
async fn invitation_sms_reply_becomes_a_rating_at_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = cst("2025-06-03", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = start_hub(dir.path(), 0, clock.clone()).await;
    let port = hub.local_addr.port();
    let mut ingest =
        pb::ingest_service_client::IngestServiceClient::new(tester_channel(dir.path(), port).await);
    ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![case("GD-7", t0)],
        })
        .await
        .unwrap();
    // Guangdong: the reminder is due 24 hours after completion.
    clock.set(t0 + 25 * 3_600_000_000);
    assert_eq!(hub.rules().tick().await.unwrap().invitations, 1);

    let (gateway, sent) = start_gateway().await;
    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), port),
        Some(gateway),
    ))
    .await
    .unwrap();
    assert_eq!(hotline.poll_invitations_once().await.unwrap(), 1);
    assert_eq!(
        hotline.poll_invitations_once().await.unwrap(),
        0,
        "the cursor moved on"
    );
    let sms = sent.lock().unwrap().clone();
    assert_eq!(sms.len(), 1);
    assert_eq!(sms[0]["phone_number"], "13912345678");
    assert_eq!(sms[0]["content"], "请回复1-5评价“社保卡补办”");
    let code = sms[0]["extension"].as_str().unwrap().to_owned();

    let mo = format!("http://{}/sms/mo", hotline.addr);
    let answer = post_json(
        mo.clone(),
        json!([{
            "phone_number": "13912345678",
            "send_time": "2025-06-04 11:00:00",
            "content": "１满意",
            "dest_code": code,
            "sequence_id": "MO-1"
        }]),
    )
    .await;
    assert_eq!(answer, json!({"code": 0, "msg": "接收成功"}));

    let r = rating_at_hub(dir.path(), port, "GD-7").await;
    assert_eq!(r.level, pb::Level::VerySatisfied as i32);
    assert_eq!(r.channel, pb::Channel::Sms as i32);
    assert_eq!(r.source_system, "adapter");
    assert_eq!(r.org_credit_code, org());
    assert_eq!(r.rater.unwrap().phone, "13912345678");
    assert_eq!(r.attributes["survey"], code);

    // Not ratings, kept with a reason: an unknown code, a replay key, a second answer.
    for (dest, content, seq) in [
        ("000000", "1", "MO-2"),
        (code.as_str(), "0", "MO-3"),
        (code.as_str(), "2", "MO-4"),
    ] {
        let a = post_json(
            mo.clone(),
            json!([{"phone_number": "13912345678", "content": content, "dest_code": dest, "sequence_id": seq}]),
        )
        .await;
        assert_eq!(a["code"], 0, "acknowledged to the gateway all the same");
    }
    let kept: Vec<String> = hotline
        .surveys
        .unmatched()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, r)| r)
        .collect();
    assert_eq!(
        kept,
        [
            "unknown reply code: no such survey",
            "replay key: not a rating",
            "the survey was already answered"
        ]
    );
    // An operator reads a kept reply's (masked) text through the adapter, not the file.
    let texts = hotline.surveys.unmatched_texts().await.unwrap();
    assert_eq!(texts[0].4, "1");
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();

    // Nothing personal in clear in the adapter's own files (before: the applicant's phone
    // per survey, every spooled rating's rater, in 0644 files), and the files are 0600.
    let mut bytes = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("spool.db") || name.starts_with("state.db") {
            bytes.extend(std::fs::read(&p).unwrap());
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{name} is {mode:o}");
            }
        }
    }
    assert!(bytes.len() > 10_000, "the files were read");
    assert!(
        !bytes.windows(11).any(|w| w == b"13912345678"),
        "the applicant's phone in clear in the adapter's files"
    );
}

#[tokio::test]
async fn replies_are_taken_while_the_hub_is_down_and_drained_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    // IVR ratings are rated when the key is pressed, so this hub runs on the real clock. It
    // sits behind a closed gate: to the adapter it is down (before, a port was picked, let
    // go and bound again later — another process could take it in between).
    let clock: Arc<dyn Clock> = Arc::new(rating_hub::clock::SystemClock);
    let t0 = clock.now_micros() - 3_600_000_000;
    let hub = start_hub(dir.path(), 0, clock.clone()).await;
    let port = hub.local_addr.port();
    let gate = rating_hub_adapter_kit::testing::Gate::start(hub.local_addr).await;

    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), gate.port),
        None,
    ))
    .await
    .unwrap();
    let (survey, _) = hotline
        .surveys
        .open_survey(
            1,
            &case("GD-9", t0),
            "13912345678",
            "7",
            Duration::from_secs(3600 * 72),
        )
        .await
        .unwrap();
    // An IVR call: no key and replay are not ratings; key 2 is.
    let ivr = format!("http://{}/ivr", hotline.addr);
    for (call, key, want) in [
        ("c1", "", "kept"),
        ("c2", "0", "kept"),
        ("c3", "2", "rated"),
    ] {
        let a = post_json(
            ivr.clone(),
            json!({"call_id": call, "phone": "139-1234-5678", "key": key, "survey": survey.dest_code}),
        )
        .await;
        assert_eq!(a["result"], want, "key {key:?}");
    }
    let counts = hotline.spool.counts().await.unwrap();
    assert_eq!(
        (counts.waiting, counts.delivered),
        (1, 0),
        "spooled while the hub is down"
    );

    // The hub comes back (the gate opens): the spool drains by itself.
    gate.open();
    let r = rating_at_hub(dir.path(), port, "GD-9").await;
    assert_eq!(r.level, pb::Level::Satisfied as i32);
    assert_eq!(r.channel, pb::Channel::HotlineVoice as i32);
    for _ in 0..1500 {
        if hotline.spool.counts().await.unwrap().delivered == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(hotline.spool.counts().await.unwrap().delivered, 1);
    let metrics = reqwest::get(format!("http://{}/metrics", hotline.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rating_hotline_ivr_ratings_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rating_hotline_spool{state=\"delivered\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("13912345678"),
        "metrics carry no phone numbers"
    );
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// The whole path under the hub's default configuration: reminder → invitation SMS → a 差评
/// reply → a 差评 at the hub with its case opened. A reply in words ("服务不好，排队太久") is
/// read as the complaint it is (before: 好 matched, and it became 满意) and its words are the
/// rating's text; a bare key ("5") carries no reason and is taken all the same (before, the
/// hub's default refused it while the gateway was told 接收成功, and the 差评 was lost).
#[tokio::test]
async fn sms_complaints_become_bad_ratings_with_their_cases_opened() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = cst("2025-06-03", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = start_hub(dir.path(), 0, clock.clone()).await;
    let port = hub.local_addr.port();
    let mut ingest =
        pb::ingest_service_client::IngestServiceClient::new(tester_channel(dir.path(), port).await);
    ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![case("GD-WORDS", t0), case("GD-KEY", t0)],
        })
        .await
        .unwrap();
    clock.set(t0 + 25 * 3_600_000_000);
    assert_eq!(hub.rules().tick().await.unwrap().invitations, 2);

    let (gateway, sent) = start_gateway().await;
    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), port),
        Some(gateway),
    ))
    .await
    .unwrap();
    assert_eq!(hotline.poll_invitations_once().await.unwrap(), 2);
    let codes: Vec<String> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| m["extension"].as_str().unwrap().to_owned())
        .collect();
    let mo = format!("http://{}/sms/mo", hotline.addr);
    for (code, content, seq) in [
        (&codes[0], "服务不好，排队太久", "MO-W"),
        (&codes[1], "5", "MO-K"),
    ] {
        let answer = post_json(
            mo.clone(),
            json!([{"phone_number": "13912345678", "send_time": "2025-06-04 11:00:00",
                    "content": content, "dest_code": code, "sequence_id": seq}]),
        )
        .await;
        assert_eq!(answer, json!({"code": 0, "msg": "接收成功"}));
    }
    // Which case got which code follows the invitations' order.
    let worded = rating_at_hub(dir.path(), port, "GD-WORDS").await;
    let keyed = rating_at_hub(dir.path(), port, "GD-KEY").await;
    let (worded, keyed) = if worded.text.is_empty() {
        (keyed, worded)
    } else {
        (worded, keyed)
    };
    assert_eq!(worded.level, pb::Level::Dissatisfied as i32, "{worded:?}");
    assert_eq!(worded.text, "服务不好，排队太久");
    assert_eq!(keyed.level, pb::Level::VeryDissatisfied as i32, "{keyed:?}");
    assert!(keyed.text.is_empty(), "a bare key carries no words");

    let cases = pb::rectification_service_client::RectificationServiceClient::new(
        tester_channel(dir.path(), port).await,
    )
    .list_cases(pb::ListCasesRequest::default())
    .await
    .unwrap()
    .into_inner()
    .cases;
    let mut opened: Vec<&str> = cases.iter().map(|c| c.hub_id.as_str()).collect();
    opened.sort();
    let mut want = [worded.hub_id.as_str(), keyed.hub_id.as_str()];
    want.sort();
    assert_eq!(opened, want, "both 差评 opened their cases");
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// `rating-hotline reply` prints how a reply is read, so an operator can check a gateway's
/// traffic.
#[test]
fn the_reply_command_says_how_a_reply_is_read() {
    let read = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rating-hotline"))
            .arg("reply")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        read(&["--scale", "5", "服务不好"]),
        "rating: LEVEL_DISSATISFIED\n"
    );
    assert_eq!(read(&["--scale", "3", "1"]), "rating: LEVEL_SATISFIED\n");
    assert_eq!(
        read(&["好的"]),
        "not a rating: an acknowledgement, not a rating\n"
    );
    assert!(read(&["--ivr", "0"]).starts_with("not a rating: replay"));
}

/// Replies keyed by what identifies them (their survey), not by the gateway's numbering: a
/// gateway that restarted its sequence sends "1" again for another survey, and an IVR sends
/// no call id at all. Before, the second reply had the first one's key, the spool answered
/// "already there", the gateway was told 接收成功, and the rating vanished.
#[tokio::test]
async fn reused_gateway_ids_and_missing_call_ids_lose_no_reply() {
    let dir = tempfile::tempdir().unwrap();
    // IVR results carry no time: the adapter rates them at its own (real) clock, so the
    // hub's clock is set near real time here.
    let real_now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
    let t0 = real_now - 26 * 3_600_000_000;
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = start_hub(dir.path(), 0, clock.clone()).await;
    let port = hub.local_addr.port();
    let mut ingest =
        pb::ingest_service_client::IngestServiceClient::new(tester_channel(dir.path(), port).await);
    let cases = ["GD-S1", "GD-S2", "GD-I1", "GD-I2"];
    ingest
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: cases.iter().map(|c| case(c, t0)).collect(),
        })
        .await
        .unwrap();
    clock.set(real_now);
    assert_eq!(hub.rules().tick().await.unwrap().invitations, 4);
    let (gateway, sent) = start_gateway().await;
    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), port),
        Some(gateway),
    ))
    .await
    .unwrap();
    assert_eq!(hotline.poll_invitations_once().await.unwrap(), 4);
    let codes: Vec<String> = sent
        .lock()
        .unwrap()
        .iter()
        .map(|m| m["extension"].as_str().unwrap().to_owned())
        .collect();
    // Reply codes are the prefix and 8 random digits, not a sequence one could walk.
    let numbers: Vec<u64> = codes
        .iter()
        .map(|c| {
            assert!(c.len() == 9 && c.starts_with('9'), "{c}");
            c[1..].parse().unwrap()
        })
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0].abs_diff(w[1]) != 1),
        "consecutive reply codes: {codes:?}"
    );
    let base = format!("http://{}", hotline.addr);
    for code in &codes[..2] {
        let a = post_json(
            format!("{base}/sms/mo"),
            json!([{"phone_number": "13912345678", "send_time": "2025-06-04 11:00:00",
                    "content": "2", "dest_code": code, "sequence_id": "1"}]),
        )
        .await;
        assert_eq!(a["code"], 0);
    }
    for code in &codes[2..] {
        let a = post_json(
            format!("{base}/ivr"),
            json!({"call_id": "", "phone": "13912345678", "key": "1", "survey": code}),
        )
        .await;
        assert_eq!(a["result"], "rated", "{a}");
    }
    for c in cases {
        let r = rating_at_hub(dir.path(), port, c).await;
        assert_eq!(r.case_number, c);
    }
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// Anyone who reaches the port could post replies and rate other people's cases (reply codes
/// were sequential, too). Callbacks must be signed with the gateway's secret (HMAC-SHA256 over
/// timestamp and body), each signature taken once: unsigned, forged and replayed posts are
/// refused with 401, and nothing of them is taken.
#[tokio::test]
async fn forged_unsigned_and_replayed_callbacks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(
        dir.path(),
        0,
        Arc::new(ManualClock::at(cst("2025-06-03", 10))),
    )
    .await;
    let port = hub.local_addr.port();
    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), port),
        None,
    ))
    .await
    .unwrap();
    let url = format!("http://{}/sms/mo", hotline.addr);
    let body = json!([{"phone_number": "13912345678", "content": "5",
                       "dest_code": "9000001", "sequence_id": "X"}])
    .to_string();
    let send = |headers: Vec<(&'static str, String)>| {
        let (url, body) = (url.clone(), body.clone());
        async move {
            let mut r = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json");
            for (k, v) in headers {
                r = r.header(k, v);
            }
            r.body(body).send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(send(vec![]).await, 401, "unsigned");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (ts, sig) = rating_hub_adapter_kit::auth::sign(
        b"a guessed secret, not theirs",
        now,
        "POST",
        "/sms/mo",
        body.as_bytes(),
    );
    assert_eq!(
        send(vec![("x-timestamp", ts), ("x-signature", sig)]).await,
        401,
        "forged"
    );
    let signed: Vec<(&'static str, String)> =
        rating_hub_adapter_kit::testing::signed_headers("/sms/mo", body.as_bytes()).into();
    assert_eq!(send(signed.clone()).await, 200, "signed");
    assert_eq!(send(signed).await, 401, "replayed");
    // Signed for /sms/mo, sent to /ivr: refused (the route is signed too).
    let mut other = reqwest::Client::new()
        .post(format!("http://{}/ivr", hotline.addr))
        .header("content-type", "application/json");
    for (k, v) in rating_hub_adapter_kit::testing::signed_headers("/sms/mo", body.as_bytes()) {
        other = other.header(k, v);
    }
    assert_eq!(
        other
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401,
        "signed for another route"
    );
    // Only the signed post was taken (kept as unmatched: no such survey).
    assert_eq!(hotline.surveys.unmatched().await.unwrap().len(), 1);
    // Metrics and health stay open.
    let health = reqwest::get(format!("http://{}/healthz", hotline.addr))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// The callback port over TLS with client certificates (mTLS authenticates the gateway, so
/// its posts need no signature), and an allowlist of source addresses: a caller without a
/// certificate, a plain-HTTP caller, and a caller from an address not allowed are all turned
/// away before anything is read (before: plain HTTP from anywhere).
#[tokio::test]
async fn callbacks_over_mtls_only_from_allowed_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(
        dir.path(),
        0,
        Arc::new(ManualClock::at(cst("2025-06-03", 10))),
    )
    .await;
    let port = hub.local_addr.port();
    let pki = dir.path().join("pki");
    let p = |f: &str| pki.join(f).display().to_string();
    let mut cfg = adapter_config(dir.path(), hub_connection(dir.path(), port), None);
    cfg.callback_auth = rating_hub_adapter_kit::CallbackAuthConfig {
        tls_cert: p(rating_hub::pki::SERVER_CERT),
        tls_key: p(rating_hub::pki::SERVER_KEY),
        tls_client_ca: p(rating_hub::pki::CA_CERT),
        allow_from: vec!["127.0.0.1".into()],
        ..Default::default()
    };
    let hotline = rating_hub_hotline::start(cfg.clone()).await.unwrap();
    let body = json!([{"phone_number": "13912345678", "content": "1",
                       "dest_code": "9000001", "sequence_id": "T"}])
    .to_string();
    let client = |identity: bool| {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(
                    &std::fs::read(p(rating_hub::pki::CA_CERT)).unwrap(),
                )
                .unwrap(),
            )
            .resolve("localhost", hotline.addr);
        if identity {
            let mut pem = std::fs::read(p("tester.pem")).unwrap();
            pem.extend(std::fs::read(p("tester.key")).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let url = format!("https://localhost:{}/sms/mo", hotline.addr.port());
    let ok = client(true)
        .post(&url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "a gateway with its certificate");
    assert!(
        client(false)
            .post(&url)
            .body(body.clone())
            .send()
            .await
            .is_err(),
        "no client certificate: the handshake fails"
    );
    // Counted by the handshake's own task, which may finish just after the client gave up.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while hotline.metrics.get("callbacks_tls_failed_total") < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the failed handshake is counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        reqwest::Client::new()
            .post(format!("http://{}/sms/mo", hotline.addr))
            .body(body.clone())
            .send()
            .await
            .is_err(),
        "plain HTTP on the TLS port"
    );
    assert_eq!(
        hotline.surveys.unmatched().await.unwrap().len(),
        1,
        "one post taken"
    );
    hotline.shutdown().await;

    // From an address not in allow_from: closed before the handshake.
    cfg.callback_auth.allow_from = vec!["10.9.9.0/24".into()];
    let hotline = rating_hub_hotline::start(cfg).await.unwrap();
    let url = format!("https://localhost:{}/sms/mo", hotline.addr.port());
    let client = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(p(rating_hub::pki::CA_CERT)).unwrap())
                .unwrap(),
        )
        .identity({
            let mut pem = std::fs::read(p("tester.pem")).unwrap();
            pem.extend(std::fs::read(p("tester.key")).unwrap());
            reqwest::Identity::from_pem(&pem).unwrap()
        })
        .resolve("localhost", hotline.addr)
        .build()
        .unwrap();
    assert!(
        client.post(&url).body(body).send().await.is_err(),
        "not an allowed address"
    );
    assert_eq!(hotline.metrics.get("callbacks_refused_address_total"), 1);
    assert!(
        hotline.surveys.unmatched().await.unwrap().len() == 1,
        "nothing more taken"
    );
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// A number the gateway refuses holds up no other survey (before, its error ended the poll
/// before the cursor moved, so every later invitation waited behind it for ever); it stays
/// unsent and is tried again at each poll. A reply from the applicant's phone written with
/// China's country code (+86) is the applicant's (before, it was kept as "another phone").
#[tokio::test]
async fn a_refused_number_holds_up_no_other_survey_and_plus_86_replies_count() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = cst("2025-06-03", 10);
    let clock = Arc::new(ManualClock::at(t0 + 60_000_000));
    let hub = start_hub(dir.path(), 0, clock.clone()).await;
    let port = hub.local_addr.port();
    let mut refused = case("GD-REFUSED", t0);
    refused.applicant.as_mut().unwrap().phone = REFUSED_PHONE.into();
    pb::ingest_service_client::IngestServiceClient::new(tester_channel(dir.path(), port).await)
        .report_service_cases(pb::ReportServiceCasesRequest {
            cases: vec![refused, case("GD-OK", t0)],
        })
        .await
        .unwrap();
    clock.set(t0 + 25 * 3_600_000_000);
    assert_eq!(hub.rules().tick().await.unwrap().invitations, 2);
    let (gateway, sent) = start_gateway().await;
    let hotline = rating_hub_hotline::start(adapter_config(
        dir.path(),
        hub_connection(dir.path(), port),
        Some(gateway),
    ))
    .await
    .unwrap();
    assert_eq!(hotline.poll_invitations_once().await.unwrap(), 2);
    let sms = sent.lock().unwrap().clone();
    assert_eq!(sms.len(), 1, "the other survey was sent: {sms:?}");
    assert_eq!(sms[0]["phone_number"], "13912345678");
    assert_eq!(hotline.metrics.get("invitations_send_failed_total"), 1);
    // The next poll tries the refused one again, and does not send the other twice.
    hotline.poll_invitations_once().await.unwrap();
    assert_eq!(hotline.metrics.get("invitations_send_failed_total"), 2);
    assert_eq!(sent.lock().unwrap().len(), 1);

    let code = sms[0]["extension"].as_str().unwrap().to_owned();
    let answer = post_json(
        format!("http://{}/sms/mo", hotline.addr),
        json!([{
            "phone_number": "+86 139 1234 5678",
            "send_time": "2025-06-04 11:00:00",
            "content": "1",
            "dest_code": code,
            "sequence_id": "MO-86"
        }]),
    )
    .await;
    assert_eq!(answer["code"], 0);
    let kept = hotline.surveys.unmatched().await.unwrap();
    assert!(kept.is_empty(), "{kept:?}");
    let r = rating_at_hub(dir.path(), port, "GD-OK").await;
    assert_eq!(r.rater.unwrap().phone, "13912345678");
    hotline.shutdown().await;
    hub.shutdown().await.unwrap();
}

//! The http-json sink against a local HTTPS server: field names and code tables as
//! configured, checked on the wire; "already exists" is success; unmapped codes and
//! business rejections become dead letters; a 503 is retried.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rating_hub::pb::v1 as pb;
use rating_hub::pki;
use rating_hub::relay::http::format_cst;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

use crate::fake_upstream::eventually;
use crate::security::AdminServiceClient;
use crate::utils::*;

#[derive(Default)]
struct Platform {
    bodies: Vec<Value>,
    requests: usize,
}

/// How a platform answers a request: its parsed body and how many requests it has had
/// (this one included) → HTTP status and JSON answer.
type Answer = Arc<dyn Fn(&Value, usize) -> (u16, Value) + Send + Sync>;

/// A provincial-style push interface on HTTPS: answers 503 to the first request, then one
/// result per record by case number.
async fn start_platform(pki_dir: &std::path::Path) -> (String, Arc<Mutex<Platform>>) {
    start_platform_answering(
        pki_dir,
        Arc::new(|value: &Value, requests: usize| {
            if requests == 1 {
                return (503, json!("busy"));
            }
            let results: Vec<Value> = value["data"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|r| match r["projectNo"].as_str() {
                            Some("CASE-exists") => {
                                json!({"code": "500", "msg": "已存在该条服务信息"})
                            }
                            Some("CASE-reject") => {
                                json!({"code": "400", "msg": "缺少必填项 taskName"})
                            }
                            _ => json!({"code": "0", "msg": "成功"}),
                        })
                        .collect()
                })
                .unwrap_or_default();
            (
                200,
                json!({"code": "0", "msg": "接收成功", "results": results}),
            )
        }),
    )
    .await
}

/// A push interface on HTTPS that answers as `answer` says; records every request body it
/// answered with 200.
async fn start_platform_answering(
    pki_dir: &std::path::Path,
    answer: Answer,
) -> (String, Arc<Mutex<Platform>>) {
    let certs = CertificateDer::pem_file_iter(pki_dir.join(pki::SERVER_CERT))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki_dir.join(pki::SERVER_KEY)).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/api/evaluation/push",
        listener.local_addr().unwrap().port()
    );
    let platform = Arc::new(Mutex::new(Platform::default()));
    let state = platform.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let state = state.clone();
            let answer = answer.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let state = state.clone();
                    let answer = answer.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let mut p = state.lock().unwrap();
                        p.requests += 1;
                        let (status, json) = answer(&value, p.requests);
                        if status == 200 {
                            p.bodies.push(value);
                        }
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(json.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (url, platform)
}

#[tokio::test]
async fn http_json_sink_speaks_the_configured_fields_and_codes_on_the_wire() {
    // The hub's own test PKI also signs the platform's certificate.
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = hub_dir.path().join("pki");
    pki::create_ca(&pki_dir, "platform CA").unwrap();
    pki::issue_server(
        &pki_dir,
        &["localhost", "127.0.0.1"],
        pki::Validity::days(5),
    )
    .unwrap();
    let (url, platform) = start_platform(&pki_dir).await;
    let q = |s: &str| format!("\"{s}\"");
    let b = HubBuilder::new()
        .set("upstreams.zj.kind", &q("http-json"))
        .set("upstreams.zj.endpoint", &q(&url))
        .set(
            "upstreams.zj.ca",
            &q(&pki_dir.join(pki::CA_CERT).display().to_string()),
        )
        .set("upstreams.zj.retry_schedule_ms", "[20]")
        .set("upstreams.zj.batch_size", "10")
        .set("upstreams.zj.http.body", &q("wrapped"))
        .set("upstreams.zj.http.wrapper_key", &q("data"))
        .set("upstreams.zj.http.results_field", &q("results"))
        .set("upstreams.zj.http.constants", r#"{ dataSource = "101" }"#)
        // Zhejiang's pf: 6 短信, 7 系统默认评价.
        .set(
            "upstreams.zj.http.channel_codes",
            r#"{ CHANNEL_SMS = "6", CHANNEL_SYSTEM_DEFAULT = "7" }"#,
        );
    let hub = b.start_in_dir(hub_dir).await;

    let mut sms = rating("sms");
    sms.channel = pb::Channel::Sms as i32;
    let mut bad = rating("bad");
    bad.level = pb::Level::Dissatisfied as i32;
    bad.detail_codes = vec!["501".into(), "502".into()];
    bad.text = "材料反复提交".into();
    bad.channel = pb::Channel::QrCode as i32;
    bad.follow_up_of = "sms".into();
    let mut paper = rating("paper");
    paper.channel = pb::Channel::PaperForm as i32;
    let exists = rating("exists");
    let reject = rating("reject");
    let mut ingest = hub.ingest().await;
    let ids: Vec<String> = submit(&mut ingest, vec![sms.clone(), bad, paper, exists, reject])
        .await
        .into_iter()
        .map(|r| r.hub_id)
        .collect();

    eventually(Duration::from_secs(30), "delivery finished", || async {
        let st = crate::utils::upstream_status(hub.channel_as("tester").await, "zj").await;
        st.lag_records == 0
    })
    .await;

    let (requests, bodies) = {
        let p = platform.lock().unwrap();
        (p.requests, p.bodies.clone())
    };
    assert_eq!(requests, 2, "the 503 was retried once");
    assert_eq!(bodies.len(), 1);
    let records = bodies[0]["data"].as_array().unwrap().clone();
    // PAPER_FORM has no code in this upstream's table: never sent as a bare number.
    assert_eq!(records.len(), 4);
    let by_case = |c: &str| {
        records
            .iter()
            .find(|r| r["projectNo"] == c)
            .unwrap()
            .clone()
    };
    let r = by_case("CASE-sms");
    assert_eq!(r["hubId"], ids[0].as_str());
    assert_eq!(r["satisfaction"], "5", "national orientation: 5 = 非常满意");
    assert_eq!(r["pf"], "6", "Zhejiang's SMS code from the mapping");
    assert_eq!(
        r["assessTime"],
        format_cst(sms.rated_at.unwrap().seconds).as_str()
    );
    assert_eq!(r["assessNumber"], "1");
    assert_eq!(r["deptCode"], org(1).as_str());
    assert_eq!(r["areaCode"], "530102");
    assert_eq!(r["taskCode"], "530100-ITEM-001");
    assert_eq!(
        r["certKey"],
        id_number().as_str(),
        "the platform receives the rater's data"
    );
    assert_eq!(r["mobile"], "13800138000");
    assert_eq!(r["userProp"], "1");
    assert_eq!(r["dataSource"], "101");
    let r = by_case("CASE-bad");
    assert_eq!(r["satisfaction"], "2");
    assert_eq!(r["pf"], "3");
    assert_eq!(r["evalDetail"], "501,502");
    assert_eq!(r["writingEvaluation"], "材料反复提交");
    assert_eq!(r["assessNumber"], "2", "a follow-up rating");
    assert!(r["assessTime"].as_str().unwrap().len() == 19);

    // Dead letters are committed with the cursor advance, by the upstream's cursor writer,
    // just after the upstream answered: wait for them.
    let admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let list = || {
        let mut admin = admin.clone();
        async move {
            admin
                .list_dead_letters(pb::ListDeadLettersRequest {
                    upstream: "zj".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters
        }
    };
    eventually(Duration::from_secs(10), "two dead letters", || async {
        list().await.len() >= 2
    })
    .await;
    let dead = list().await;
    let mut reasons: Vec<(String, String)> =
        dead.into_iter().map(|d| (d.hub_id, d.error)).collect();
    reasons.sort();
    let mut want = vec![
        (ids[2].clone(), "CHANNEL_PAPER_FORM"),
        (ids[4].clone(), "缺少必填项 taskName"),
    ];
    want.sort();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    for ((id, err), (want_id, fragment)) in reasons.iter().zip(want) {
        assert_eq!(id, &want_id);
        assert!(err.contains(fragment), "{err}");
    }
    hub.stop().await;
}

/// A hub with an http-json upstream "zj" at `url`, whose CA is in `pki_dir`, sending
/// batches of 10 and retrying at once.
fn zj_hub(pki_dir: &std::path::Path, url: &str, results_field: &str) -> HubBuilder {
    let q = |s: &str| format!("\"{s}\"");
    let mut b = HubBuilder::new()
        .set("upstreams.zj.kind", &q("http-json"))
        .set("upstreams.zj.endpoint", &q(url))
        .set(
            "upstreams.zj.ca",
            &q(&pki_dir.join(pki::CA_CERT).display().to_string()),
        )
        .set("upstreams.zj.retry_schedule_ms", "[20]")
        .set("upstreams.zj.batch_size", "10")
        .set("upstreams.zj.http.body", &q("wrapped"))
        .set("upstreams.zj.http.wrapper_key", &q("data"));
    if !results_field.is_empty() {
        b = b.set("upstreams.zj.http.results_field", &q(results_field));
    }
    b
}

fn platform_pki(dir: &std::path::Path) -> std::path::PathBuf {
    let pki_dir = dir.join("pki");
    pki::create_ca(&pki_dir, "platform CA").unwrap();
    pki::issue_server(
        &pki_dir,
        &["localhost", "127.0.0.1"],
        pki::Validity::days(5),
    )
    .unwrap();
    pki_dir
}

async fn dead_letters(hub: &TestHub) -> Vec<pb::DeadLetter> {
    AdminServiceClient::new(hub.channel_as("tester").await)
        .list_dead_letters(pb::ListDeadLettersRequest {
            upstream: "zj".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .dead_letters
}

/// A platform that answers a whole request "已存在" does not say which of its records exist:
/// the hub sends them one by one, so the one the platform refuses is dead-lettered instead
/// of passing as delivered with the rest.
#[tokio::test]
async fn already_exists_for_a_whole_batch_is_not_taken_for_every_record() {
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = platform_pki(hub_dir.path());
    let (url, platform) = start_platform_answering(
        &pki_dir,
        Arc::new(|value: &Value, _| {
            let records = value["data"].as_array().cloned().unwrap_or_default();
            if records.len() > 1 {
                return (200, json!({"code": "500", "msg": "部分数据已存在"}));
            }
            match records[0]["projectNo"].as_str() {
                Some("CASE-exists") => (200, json!({"code": "500", "msg": "已存在该条服务信息"})),
                Some("CASE-reject") => (200, json!({"code": "400", "msg": "缺少必填项 taskName"})),
                _ => (200, json!({"code": "0", "msg": "成功"})),
            }
        }),
    )
    .await;
    let hub = zj_hub(&pki_dir, &url, "").start_in_dir(hub_dir).await;
    let ids: Vec<String> = submit(
        &mut hub.ingest().await,
        vec![rating("new"), rating("exists"), rating("reject")],
    )
    .await
    .into_iter()
    .map(|r| r.hub_id)
    .collect();
    eventually(Duration::from_secs(30), "delivery finished", || async {
        let st = crate::utils::upstream_status(hub.channel_as("tester").await, "zj").await;
        st.lag_records == 0
    })
    .await;
    let dead = dead_letters(&hub).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].hub_id, ids[2]);
    assert!(dead[0].error.contains("缺少必填项"), "{dead:?}");
    let sizes: Vec<usize> = platform
        .lock()
        .unwrap()
        .bodies
        .iter()
        .map(|b| b["data"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![3, 1, 1, 1], "the batch, then each record alone");
    hub.stop().await;
}

/// A per-record result list that does not match the batch says nothing reliable about any
/// record: it is never a success. The batch is tried again, and after repeated unreadable
/// answers its ratings are dead-lettered (replayable), not counted as delivered.
#[tokio::test]
async fn a_result_list_that_does_not_match_the_batch_is_never_a_success() {
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = platform_pki(hub_dir.path());
    let (url, platform) = start_platform_answering(
        &pki_dir,
        Arc::new(|value: &Value, _| {
            let n = value["data"].as_array().map_or(0, Vec::len);
            // One result short.
            let results: Vec<Value> = (1..n)
                .map(|_| json!({"code": "0", "msg": "成功"}))
                .collect();
            (
                200,
                json!({"code": "0", "msg": "接收成功", "results": results}),
            )
        }),
    )
    .await;
    let hub = zj_hub(&pki_dir, &url, "results")
        .start_in_dir(hub_dir)
        .await;
    let ids: std::collections::HashSet<String> = submit(
        &mut hub.ingest().await,
        vec![rating("a"), rating("b"), rating("c")],
    )
    .await
    .into_iter()
    .map(|r| r.hub_id)
    .collect();
    eventually(Duration::from_secs(30), "delivery finished", || async {
        let st = crate::utils::upstream_status(hub.channel_as("tester").await, "zj").await;
        st.lag_records == 0
    })
    .await;
    let dead = dead_letters(&hub).await;
    assert_eq!(
        dead.iter()
            .map(|d| d.hub_id.clone())
            .collect::<std::collections::HashSet<_>>(),
        ids,
        "every rating of the batch is dead-lettered: {dead:?}"
    );
    assert!(
        dead.iter()
            .all(|d| d.error.contains("2 results for 3 records")),
        "{dead:?}"
    );
    assert_eq!(platform.lock().unwrap().requests, 3, "tried three times");
    let st = crate::utils::upstream_status(hub.channel_as("tester").await, "zj").await;
    assert_eq!(st.delivered, 0, "nothing counted as delivered: {st:?}");
    hub.stop().await;
}

/// `permanent_errors`: an HTTP status the platform uses for "never" (here 400) dead-letters
/// the batch at once, the platform asked once; without it, the same status is retried.
#[tokio::test]
async fn a_status_listed_as_permanent_dead_letters_at_once_and_others_are_retried() {
    for permanent in [true, false] {
        let hub_dir = tempfile::tempdir().unwrap();
        let pki_dir = platform_pki(hub_dir.path());
        let (url, platform) = start_platform_answering(
            &pki_dir,
            Arc::new(|_: &Value, _| (400, json!({"code": "400", "msg": "参数错误"}))),
        )
        .await;
        let mut b = zj_hub(&pki_dir, &url, "");
        if permanent {
            b = b.set("upstreams.zj.permanent_errors", "[\"400\"]");
        } else {
            b = b.set("upstreams.zj.retry_schedule_ms", "[20, 20, 20]");
        }
        let hub = b.start_in_dir(hub_dir).await;
        submit(&mut hub.ingest().await, vec![rating("p1"), rating("p2")]).await;
        if permanent {
            eventually(Duration::from_secs(30), "dead-lettered", || async {
                dead_letters(&hub).await.len() == 2
            })
            .await;
            let dead = dead_letters(&hub).await;
            assert!(dead.iter().all(|d| d.error.contains("400")), "{dead:?}");
            assert_eq!(platform.lock().unwrap().requests, 1, "asked once");
        } else {
            eventually(Duration::from_secs(30), "retried", || async {
                platform.lock().unwrap().requests >= 3
            })
            .await;
            assert!(
                dead_letters(&hub).await.is_empty(),
                "a 400 not listed is retried"
            );
        }
        hub.stop().await;
    }
}

/// A profile that sends one record per request (`single`) to a platform that answers
/// `{"C-Response-Desc":"success"}`: each rating is its own request, its body the record
/// itself (no list), a value from `[upstreams.<name>.tables]` overriding the profile's, and a
/// refusal of one record leaves the others delivered.
#[tokio::test]
async fn a_profile_can_send_one_record_per_request_and_read_another_reply_style() {
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = platform_pki(hub_dir.path());
    let (url, platform) = start_platform_answering(
        &pki_dir,
        Arc::new(|value: &Value, _| {
            if value.is_array() {
                return (200, json!({"C-Response-Desc": "expected one record"}));
            }
            match value["caseNo"].as_str() {
                Some("CASE-reject") => (200, json!({"C-Response-Desc": "caseNo 不合法"})),
                _ => (200, json!({"C-Response-Desc": "success"})),
            }
        }),
    )
    .await;
    let dir = hub_dir.path().to_path_buf();
    let profile = dir.join("single.toml");
    std::fs::write(
        &profile,
        r#"
name = "one record per request"
[tables.level]
LEVEL_VERY_SATISFIED = "5"
[records.rating]
single = true
body = '"{records}"'
[records.rating.headers]
X-Token = "{token}"
[records.rating.fields]
caseNo = { path = "case_number", required = true }
score = { path = "level", transforms = [{ table = "level" }], as = "number" }
[records.rating.reply]
success = [{ pointer = "/C-Response-Desc", equals = ["success"] }]
message = "/C-Response-Desc"
"#,
    )
    .unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "t0ken").unwrap();
    let q = |s: &str| format!("{s:?}");
    let hub = HubBuilder::new()
        .set("upstreams.zj.kind", &q("http-json"))
        .set("upstreams.zj.endpoint", &q(&url))
        .set(
            "upstreams.zj.ca",
            &q(&pki_dir.join(pki::CA_CERT).display().to_string()),
        )
        .set("upstreams.zj.retry_schedule_ms", "[20]")
        .set("upstreams.zj.profile", &q(&profile.display().to_string()))
        .set(
            "upstreams.zj.secrets.token",
            &q(&format!("file:{}", token.display())),
        )
        // This upstream's own code for 非常满意 replaces the profile's.
        .set(
            "upstreams.zj.tables.level",
            r#"{ LEVEL_VERY_SATISFIED = "10" }"#,
        )
        .start_in_dir(hub_dir)
        .await;
    let ids: Vec<String> = submit(
        &mut hub.ingest().await,
        vec![rating("a"), rating("reject"), rating("c")],
    )
    .await
    .into_iter()
    .map(|r| r.hub_id)
    .collect();
    eventually(Duration::from_secs(30), "delivery finished", || async {
        let st = crate::utils::upstream_status(hub.channel_as("tester").await, "zj").await;
        st.lag_records == 0
    })
    .await;
    let bodies = platform.lock().unwrap().bodies.clone();
    assert_eq!(bodies.len(), 3, "one request per record: {bodies:?}");
    assert!(bodies.iter().all(Value::is_object));
    assert_eq!(bodies[0]["caseNo"], "CASE-a");
    assert_eq!(bodies[0]["score"], 10, "the upstream's table, as a number");
    let dead = dead_letters(&hub).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].hub_id, ids[1]);
    assert!(dead[0].error.contains("caseNo 不合法"), "{dead:?}");
    hub.stop().await;
}

/// A platform that takes every record ("0" for each, by the legacy mapping's results list).
async fn start_accepting_platform(pki_dir: &std::path::Path) -> (String, Arc<Mutex<Platform>>) {
    start_platform_answering(
        pki_dir,
        Arc::new(|value: &Value, _| {
            let n = value["data"].as_array().map_or(0, Vec::len);
            let results = vec![json!({"code": "0", "msg": "成功"}); n];
            (
                200,
                json!({"code": "0", "msg": "接收成功", "results": results}),
            )
        }),
    )
    .await
}

/// The case numbers a platform has taken, in order.
fn taken(platform: &Mutex<Platform>) -> Vec<String> {
    platform
        .lock()
        .unwrap()
        .bodies
        .iter()
        .flat_map(|b| b["data"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["projectNo"].as_str().map(str::to_owned))
        .collect()
}

/// An upstream's settings as the test hubs here write them.
fn upstream_table(pki_dir: &std::path::Path, url: &str) -> toml::Value {
    toml::Value::Table(
        toml::from_str(&format!(
            r#"
kind = "http-json"
endpoint = "{url}"
ca = "{}"
retry_schedule_ms = [20]
batch_size = 10
[http]
body = "wrapped"
wrapper_key = "data"
results_field = "results"
"#,
            pki_dir.join(pki::CA_CERT).display()
        ))
        .unwrap(),
    )
}

/// Issue #20: a reload adds an upstream (it delivers the feed from its start), removes one
/// (it sends nothing more), restarts a changed one from its stored cursor (nothing sent
/// again, nothing skipped), leaves an unchanged one running, puts a new batch limit in force
/// for the next call, names what only a restart changes; an upstream that does not
/// validate refuses the whole reload and delivery goes on as before.
#[tokio::test]
async fn a_reload_adds_removes_and_changes_upstreams_and_limits() {
    let hub_dir = tempfile::tempdir().unwrap();
    let pki_dir = platform_pki(hub_dir.path());
    let (url1, p1) = start_accepting_platform(&pki_dir).await;
    let (url2, p2) = start_accepting_platform(&pki_dir).await;
    let (url3, p3) = start_accepting_platform(&pki_dir).await;
    let (url_keep, p_keep) = start_accepting_platform(&pki_dir).await;
    let hub = zj_hub(&pki_dir, &url1, "results")
        .set("upstreams.keep.kind", "\"http-json\"")
        .set("upstreams.keep.endpoint", &format!("\"{url_keep}\""))
        .set(
            "upstreams.keep.ca",
            &format!("\"{}\"", pki_dir.join(pki::CA_CERT).display()),
        )
        .set("upstreams.keep.http.body", "\"wrapped\"")
        .set("upstreams.keep.http.wrapper_key", "\"data\"")
        .set("upstreams.keep.http.results_field", "\"results\"")
        .start_in_dir(hub_dir)
        .await;
    let case = |k: &str| format!("CASE-{k}");
    let mut ingest = hub.ingest().await;
    submit(&mut ingest, vec![rating("r1"), rating("r2"), rating("r3")]).await;
    let wait_for = |p: Arc<Mutex<Platform>>, keys: Vec<String>, what: &'static str| async move {
        eventually(Duration::from_secs(20), what, || {
            let got = taken(&p);
            let ok = keys.iter().all(|k| got.contains(k));
            async move { ok }
        })
        .await;
    };
    wait_for(p1.clone(), vec![case("r3")], "zj to take r1..r3").await;
    wait_for(p_keep.clone(), vec![case("r3")], "keep to take r1..r3").await;
    eventually(Duration::from_secs(20), "zj's cursor stored at 3", || {
        let ch = hub.channel_as("tester");
        async move { upstream_status(ch.await, "zj").await.cursor == 3 }
    })
    .await;
    let mut admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let mut reloader = admin.clone();
    let mut reload = async || {
        reloader
            .reload_config(pb::ReloadConfigRequest {})
            .await
            .map(|r| r.into_inner())
    };

    // zj goes, zj2 comes, batches of at most 2.
    let path = hub.dir.path().join("hub.toml");
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let ups = t["upstreams"].as_table_mut().unwrap();
    ups.remove("zj");
    ups.insert("zj2".into(), upstream_table(&pki_dir, &url2));
    t["server"]
        .as_table_mut()
        .unwrap()
        .insert("max_batch".into(), toml::Value::Integer(2));
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    let r = reload().await.unwrap();
    assert_eq!(r.upstreams_added, ["zj2"]);
    assert_eq!(r.upstreams_removed, ["zj"]);
    assert!(r.upstreams_changed.is_empty(), "{r:?}");
    assert_eq!(r.limits_changed, ["server.max_batch"]);
    assert!(
        r.restart_needed.is_empty() && r.warnings.is_empty(),
        "{r:?}"
    );
    let err = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("x1"), rating("x2"), rating("x3")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    submit(&mut ingest, vec![rating("r4"), rating("r5")]).await;
    let first_five: Vec<String> = ["r1", "r2", "r3", "r4", "r5"].map(case).to_vec();
    wait_for(
        p2.clone(),
        first_five.clone(),
        "zj2 to take the feed from its start",
    )
    .await;
    let from_zj = taken(&p1);
    assert!(
        !from_zj.contains(&case("r4")) && !from_zj.contains(&case("r5")),
        "a removed upstream sends nothing more: {from_zj:?}"
    );
    let listed: Vec<String> = admin
        .list_upstreams(pb::ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner()
        .upstreams
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(listed, ["keep", "zj2"]);
    // zj2 moves to another address: restarted from its stored cursor.
    eventually(Duration::from_secs(20), "zj2's cursor stored at 5", || {
        let ch = hub.channel_as("tester");
        async move { upstream_status(ch.await, "zj2").await.cursor == 5 }
    })
    .await;
    let mut t2 = t.clone();
    t2["upstreams"]
        .as_table_mut()
        .unwrap()
        .insert("zj2".into(), upstream_table(&pki_dir, &url3));
    t2["server"]
        .as_table_mut()
        .unwrap()
        .insert("health_check_secs".into(), toml::Value::Integer(7));
    std::fs::write(&path, toml::to_string(&t2).unwrap()).unwrap();
    let r = reload().await.unwrap();
    assert_eq!(r.upstreams_changed, ["zj2"]);
    assert!(r.upstreams_added.is_empty() && r.upstreams_removed.is_empty());
    assert_eq!(r.restart_needed, ["server.health_check_secs"]);
    submit(&mut ingest, vec![rating("r6")]).await;
    wait_for(p3.clone(), vec![case("r6")], "zj2 at its new address").await;
    assert_eq!(taken(&p3), [case("r6")], "resumed at its cursor");

    // A new upstream that does not validate: the whole reload is refused, delivery goes on.
    let mut bad = t2.clone();
    let mut broken = upstream_table(&pki_dir, &url1);
    broken
        .as_table_mut()
        .unwrap()
        .insert("batch_size".into(), toml::Value::Integer(0));
    bad["upstreams"]
        .as_table_mut()
        .unwrap()
        .insert("broken".into(), broken);
    bad["server"]
        .as_table_mut()
        .unwrap()
        .insert("max_batch".into(), toml::Value::Integer(50));
    std::fs::write(&path, toml::to_string(&bad).unwrap()).unwrap();
    let err = reload().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("upstreams.broken"), "{err:?}");
    let err = ingest
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("y1"), rating("y2"), rating("y3")],
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "the running limits stay: {err:?}"
    );
    submit(&mut ingest, vec![rating("r7")]).await;
    wait_for(
        p3.clone(),
        vec![case("r7")],
        "zj2 delivering after a refused reload",
    )
    .await;
    let all: Vec<String> = ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
        .map(case)
        .to_vec();
    wait_for(p_keep.clone(), all.clone(), "keep to take everything").await;
    // The unchanged upstream was never restarted: its count since the hub started covers
    // all seven (a restarted worker counts from its restart).
    eventually(Duration::from_secs(20), "keep's count to reach 7", || {
        let ch = hub.channel_as("tester");
        async move { upstream_status(ch.await, "keep").await.delivered == 7 }
    })
    .await;
    let from_p2 = taken(&p2);
    assert!(
        !from_p2.contains(&case("r6")) && !from_p2.contains(&case("r7")),
        "zj2's old address gets nothing after the change: {from_p2:?}"
    );

    // zj comes back: it goes on from its stored cursor (r4 onwards), r1..r3 not sent again.
    let mut back = t2.clone();
    back["upstreams"]
        .as_table_mut()
        .unwrap()
        .insert("zj".into(), upstream_table(&pki_dir, &url1));
    std::fs::write(&path, toml::to_string(&back).unwrap()).unwrap();
    let r = reload().await.unwrap();
    assert_eq!(r.upstreams_added, ["zj"]);
    assert!(
        r.upstreams_changed.is_empty() && r.upstreams_removed.is_empty(),
        "{r:?}"
    );
    wait_for(p1.clone(), all.clone(), "zj to catch up after coming back").await;
    let from_zj = taken(&p1);
    for k in &all {
        assert_eq!(
            from_zj.iter().filter(|c| *c == k).count(),
            1,
            "{k} once: {from_zj:?}"
        );
    }
    hub.stop().await;
}

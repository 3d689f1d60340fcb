//! A fake provincial gateway, written from the national-style interface's description (the
//! 办件 record before its rating, a signed SM2/SM4 envelope, nested answers), not from the
//! sink's code: it checks the hub's SM2 signatures with the hub's public key, opens the SM4
//! payload with the data key SM2-encrypted to its own key, refuses a rating whose case it
//! has not received, answers repeats "already exists", fails requests with 503 during an
//! outage and every seventh otherwise, and refuses some records for good. The hub relays
//! cases and ratings to it, with the shipped profile, through a restart and an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use ecb::cipher::{BlockModeDecrypt, KeyInit, block_padding::Pkcs7};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rating_hub::pb::v1 as pb;
use rating_hub::pki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use sm2::dsa::signature::Verifier;
use sm2::pkcs8::DecodePublicKey;

use crate::fake_upstream::eventually;
use crate::security::AdminServiceClient;
use crate::utils::*;

const APP_ID: &str = "hub-530100";
const APP_SECRET: &str = "s3cret-of-the-app";
const TENANCY: &str = "tenancy-53";
const SIGNER_ID: &str = "1234567812345678";
/// The platform's own key (GB/T 32918.5's example key pair).
const PLATFORM_KEY: &str = "3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8";
const PLATFORM_PUB: &str = "0409F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020\
                            CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13";

#[derive(Default)]
struct Gateway {
    requests: usize,
    /// 办件 records by project number, as first received.
    cases: HashMap<String, Value>,
    /// Every project number a 办件 record was offered for (refused ones too).
    offered: std::collections::HashSet<String>,
    /// Ratings by hub id, as first received.
    ratings: HashMap<String, Value>,
    /// Repeats answered "already exists".
    repeats: usize,
    /// Ratings flagged by an update (hub id → invalidType), and how many update pushes
    /// each had.
    flagged: HashMap<String, String>,
    update_pushes: HashMap<String, usize>,
    /// Ratings that arrived before their case, and envelopes that did not verify.
    out_of_order: Vec<String>,
    bad_envelopes: Vec<String>,
}

struct Control {
    outage: AtomicBool,
    /// Ratings of a project number containing "REJECT", and 办件 records of one containing
    /// "CASEBAD", are refused while this is false.
    accept_rejected: AtomicBool,
    served: AtomicUsize,
}

fn answer(code: u16, custom: i64, text: &str, results: Vec<Value>) -> (u16, Value) {
    (
        code,
        json!({"status": {"code": code}, "custom": {"code": custom, "text": text, "results": results}}),
    )
}

/// Opens and checks an envelope; the records, or why not.
fn open(
    body: &Value,
    tenancy: Option<&str>,
    hub_pub: &sm2::PublicKey,
) -> Result<Vec<Value>, String> {
    if tenancy != Some(TENANCY) {
        return Err(format!("C-Tenancy-Id {tenancy:?}"));
    }
    let t = &body["txnBodyCom"];
    let text = |k: &str| {
        t[k].as_str()
            .map(str::to_owned)
            .ok_or(format!("{k} missing"))
    };
    let verify = |msg: &str, sig: &[u8]| {
        let vk = sm2::dsa::VerifyingKey::new(SIGNER_ID, *hub_pub).unwrap();
        sm2::dsa::Signature::from_slice(sig)
            .ok()
            .is_some_and(|s| vk.verify(msg.as_bytes(), &s).is_ok())
    };
    let (time, app) = (text("time")?, text("appMark")?);
    if app != APP_ID || time.len() != 14 {
        return Err(format!("appMark {app} time {time}"));
    }
    let sign = hex::decode(text("sign")?).map_err(|_| "sign is not hex")?;
    if !verify(&format!("{time}{app}{APP_SECRET}"), &sign) {
        return Err("sign does not verify with the hub's key".into());
    }
    let request_data = text("requestData")?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(text("signatureData")?)
        .map_err(|_| "signatureData is not base64")?;
    if !verify(&request_data, &signature) {
        return Err("signatureData does not verify".into());
    }
    let wrapped = hex::decode(text("encryptKey")?).map_err(|_| "encryptKey is not hex")?;
    let platform = sm2::pke::DecryptingKey::new_with_mode(
        sm2::NonZeroScalar::try_from(hex::decode(PLATFORM_KEY).unwrap().as_slice()).unwrap(),
        sm2::pke::Mode::C1C3C2,
    );
    let data_key = platform
        .decrypt(&wrapped)
        .map_err(|_| "encryptKey does not open with the platform's key")?;
    let ciphertext = base64::engine::general_purpose::STANDARD
        .decode(&request_data)
        .map_err(|_| "requestData is not base64")?;
    let plain = ecb::Decryptor::<sm4::Sm4>::new_from_slice(&data_key)
        .map_err(|_| "the data key is not 16 bytes")?
        .decrypt_padded_vec::<Pkcs7>(&ciphertext)
        .map_err(|_| "requestData does not decrypt")?;
    let records: Value = serde_json::from_slice(&plain).map_err(|_| "records are not JSON")?;
    records
        .as_array()
        .cloned()
        .ok_or_else(|| "records are not a list".into())
}

// A record is stored only when it passes every check: not the entry API's shape.
#[allow(clippy::map_entry)]
fn serve(
    gateway: &Mutex<Gateway>,
    control: &Control,
    path: &str,
    tenancy: Option<&str>,
    body: &Value,
    hub_pub: &sm2::PublicKey,
) -> (u16, Value) {
    let n = control.served.fetch_add(1, Ordering::SeqCst) + 1;
    if control.outage.load(Ordering::SeqCst) || n.is_multiple_of(7) {
        return (503, json!({"status": {"code": 503}}));
    }
    let mut g = gateway.lock().unwrap();
    g.requests += 1;
    let records = match open(body, tenancy, hub_pub) {
        Ok(r) => r,
        Err(e) => {
            g.bad_envelopes.push(e.clone());
            return answer(401, 0, &e, Vec::new());
        }
    };
    let rejecting = !control.accept_rejected.load(Ordering::SeqCst);
    let mut results = Vec::new();
    for r in records {
        let project = r["projectNo"].as_str().unwrap_or_default().to_owned();
        let result = match path {
            "/hcp/service/push" => {
                g.offered.insert(project.clone());
                if g.cases.contains_key(&project) {
                    g.repeats += 1;
                    json!({"code": 0, "text": "已存在该条服务信息"})
                } else if rejecting && project.contains("CASEBAD") {
                    json!({"code": 0, "text": "缺少必填项 proManager"})
                } else {
                    g.cases.insert(project, r);
                    json!({"code": 1, "text": "成功"})
                }
            }
            "/hcp/evaluate/push" => {
                let hub_id = r["hubId"].as_str().unwrap_or_default().to_owned();
                if !g.cases.contains_key(&project) {
                    // Refused for good when its case's record was never even offered first.
                    if !g.offered.contains(&project) {
                        g.out_of_order.push(project);
                    }
                    json!({"code": 0, "text": "办件不存在"})
                } else if g.ratings.contains_key(&hub_id) {
                    g.repeats += 1;
                    json!({"code": 0, "text": "本次服务已存在评价"})
                } else if rejecting && project.contains("REJECT") {
                    json!({"code": 0, "text": "evalDetail 不合法"})
                } else {
                    g.ratings.insert(hub_id, r);
                    json!({"code": 1, "text": "成功"})
                }
            }
            "/hcp/evaluate/update" => {
                let hub_id = r["hubId"].as_str().unwrap_or_default().to_owned();
                *g.update_pushes.entry(hub_id.clone()).or_default() += 1;
                if !g.ratings.contains_key(&hub_id) {
                    g.out_of_order.push(format!("update of {hub_id}"));
                    json!({"code": 0, "text": "评价不存在"})
                } else if g.flagged.contains_key(&hub_id) {
                    json!({"code": 0, "text": "该评价已处理"})
                } else {
                    let t = r["invalidType"].as_str().unwrap_or_default().to_owned();
                    g.flagged.insert(hub_id, t);
                    json!({"code": 1, "text": "成功"})
                }
            }
            other => return answer(404, 0, &format!("no interface at {other}"), Vec::new()),
        };
        results.push(result);
    }
    answer(200, 1, "接收成功", results)
}

async fn start_gateway(
    pki_dir: &std::path::Path,
    hub_pub: sm2::PublicKey,
) -> (String, Arc<Mutex<Gateway>>, Arc<Control>) {
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
        "https://127.0.0.1:{}/hcp",
        listener.local_addr().unwrap().port()
    );
    let gateway = Arc::new(Mutex::new(Gateway::default()));
    let control = Arc::new(Control {
        outage: AtomicBool::new(false),
        accept_rejected: AtomicBool::new(false),
        served: AtomicUsize::new(0),
    });
    let (g, c) = (gateway.clone(), control.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, g, c) = (acceptor.clone(), g.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (g, c) = (g.clone(), c.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let tenancy = req
                            .headers()
                            .get("C-Tenancy-Id")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let (status, json) =
                            serve(&g, &c, &path, tenancy.as_deref(), &value, &hub_pub);
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
    (url, gateway, control)
}

fn service_case(n: usize) -> pb::ServiceCase {
    let number = match n % 10 {
        3 => format!("SC-REJECT-{n:03}"),
        7 => format!("SC-CASEBAD-{n:03}"),
        _ => format!("SC-{n:03}"),
    };
    // Applicants of every document type, one a Hong Kong resident with a travel permit.
    let (id_type, id_number) = match n % 3 {
        0 => (
            pb::IdDocumentType::ResidentIdCard,
            rating_hub::domain::codes::id_number_with_check("53010219800101001").unwrap(),
        ),
        1 => (
            pb::IdDocumentType::HkMacaoTravelPermit,
            "H12345678".to_owned(),
        ),
        _ => (pb::IdDocumentType::Passport, "E12345678".to_owned()),
    };
    pb::ServiceCase {
        case_number: number,
        event: pb::CaseEvent::Completed as i32,
        occurred_at: Some(now()),
        // A 33-character 实施编码: task code and handle item.
        item_code: format!("11530100MB1234567X400011200{n:04}AB"),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org(1),
        org_name: "昆明市五华区政务服务中心".into(),
        channel: pb::Channel::HallDevice as i32,
        staff_id: "S01".into(),
        staff_name: "李四".into(),
        applicant: Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            real_name: true,
            name: "陈大文".into(),
            id_number,
            id_type: id_type as i32,
            phone: "13700001111".into(),
            ..Default::default()
        }),
        agent: n.is_multiple_of(2).then(|| pb::Rater {
            name: "代办员".into(),
            id_type: pb::IdDocumentType::ResidentIdCard as i32,
            id_number: rating_hub::domain::codes::id_number_with_check("53010219900101002")
                .unwrap(),
            ..Default::default()
        }),
        project_name: format!("陈大文申请企业设立登记 {n}"),
        service_number: format!("FW-{n:05}"),
        promised_limit: Some(pb::TimeLimit {
            value: 5,
            unit: pb::TimeUnit::WorkingDay as i32,
        }),
        legal_limit: Some(pb::TimeLimit {
            value: 20,
            unit: pb::TimeUnit::WorkingDay as i32,
        }),
        commitment: pb::Commitment::Promised as i32,
        handling_channel: pb::HandlingChannel::Offline as i32,
        item_type: pb::ItemType::AdministrativeLicense as i32,
        ..Default::default()
    }
}

fn rating_of(case: &pb::ServiceCase) -> pb::Rating {
    let mut r = rating_hub::domain::case::rating_for_case(case);
    r.source_key = format!("R-{}", case.case_number);
    r.channel = pb::Channel::HallDevice as i32;
    r.level = pb::Level::VerySatisfied as i32;
    r.rated_at = Some(now());
    r.service_number = case.service_number.clone();
    r.rater = case.applicant.clone();
    r
}

/// The gateway's view: every case record once, before its rating; every rating once; the
/// refused ratings dead-lettered with the gateway's reason and delivered after a replay —
/// through a gateway outage and a hub restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cases_and_ratings_reach_a_national_style_gateway_signed_encrypted_and_in_order() {
    let hub_dir = tempfile::tempdir().unwrap();
    let dir = hub_dir.path().to_path_buf();
    let pki_dir = dir.join("gateway-pki");
    pki::create_ca(&pki_dir, "gateway CA").unwrap();
    pki::issue_server(
        &pki_dir,
        &["localhost", "127.0.0.1"],
        pki::Validity::days(5),
    )
    .unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gm");
    let hub_pub = sm2::PublicKey::from_public_key_pem(
        &std::fs::read_to_string(fixtures.join("openssl-sm2-public.pem")).unwrap(),
    )
    .unwrap();
    let (url, gateway, control) = start_gateway(&pki_dir, hub_pub).await;

    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let q = |s: &str| format!("{s:?}");
    let secret = |p: String| q(&format!("file:{p}"));
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/upstreams/national-evaluate.toml");
    let builder = HubBuilder::new()
        .set("upstreams.prov.kind", &q("http-json"))
        .set("upstreams.prov.endpoint", &q(&url))
        .set(
            "upstreams.prov.ca",
            &q(&pki_dir.join(pki::CA_CERT).display().to_string()),
        )
        .set("upstreams.prov.profile", &q(&profile.display().to_string()))
        .set(
            "upstreams.prov.secrets.app_id",
            &secret(write("app-id", APP_ID)),
        )
        .set(
            "upstreams.prov.secrets.app_secret",
            &secret(write("app-secret", APP_SECRET)),
        )
        .set(
            "upstreams.prov.secrets.tenancy_id",
            &secret(write("tenancy", TENANCY)),
        )
        .set(
            "upstreams.prov.keys.hub",
            &q(&fixtures
                .join("openssl-sm2-private.pem")
                .display()
                .to_string()),
        )
        .set(
            "upstreams.prov.keys.platform",
            &q(&write("platform.pub", PLATFORM_PUB)),
        )
        .set(
            "upstreams.prov.tables.regions",
            r#"{ "530102" = "530100" }"#,
        )
        .set("upstreams.prov.retry_schedule_ms", "[20, 50]")
        .set("upstreams.prov.batch_size", "7");
    let hub = builder.start_in_dir(hub_dir).await;

    const N: usize = 40;
    let cases: Vec<pb::ServiceCase> = (0..N).map(service_case).collect();
    let rejected: Vec<&str> = cases
        .iter()
        .map(|c| c.case_number.as_str())
        .filter(|c| c.contains("REJECT"))
        .collect();
    // 办件 records the gateway refuses; their ratings are then refused as "办件不存在".
    let case_bad: Vec<&str> = cases
        .iter()
        .map(|c| c.case_number.as_str())
        .filter(|c| c.contains("CASEBAD"))
        .collect();
    // Each case is accepted (受理) first: the platform keeps one record per case, so only
    // the 办结 record goes up (a second push would be answered "already exists", and the
    // completion lost).
    let accepted: Vec<pb::ServiceCase> = cases
        .iter()
        .map(|c| pb::ServiceCase {
            event: pb::CaseEvent::Accepted as i32,
            status: pb::ServiceStatus::Accepted as i32,
            ..c.clone()
        })
        .collect();
    crate::rules::report(&hub, accepted).await;
    // The first half: each case completed, then its rating.
    let mut ingest = hub.ingest().await;
    for chunk in cases[..N / 2].chunks(5) {
        crate::rules::report(&hub, chunk.to_vec()).await;
        let results = submit(&mut ingest, chunk.iter().map(rating_of).collect()).await;
        assert!(results.iter().all(|r| outcome(r) == pb::Outcome::Accepted));
    }
    // The gateway goes down; the rest arrive at the hub meanwhile, and the hub restarts.
    control.outage.store(true, Ordering::SeqCst);
    for chunk in cases[N / 2..].chunks(5) {
        crate::rules::report(&hub, chunk.to_vec()).await;
        submit(&mut ingest, chunk.iter().map(rating_of).collect()).await;
    }
    drop(ingest);
    let hub = hub.stop().await.restart().await;
    control.outage.store(false, Ordering::SeqCst);

    let delivered = N - rejected.len() - case_bad.len();
    eventually(
        Duration::from_secs(60),
        "every record delivered or refused",
        || async {
            let g = gateway.lock().unwrap();
            g.cases.len() == N - case_bad.len() && g.ratings.len() == delivered
        },
    )
    .await;
    let admin = AdminServiceClient::new(hub.channel_as("tester").await);
    let list = |include_resolved: bool| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_dead_letters(pb::ListDeadLettersRequest {
                    upstream: "prov".into(),
                    include_resolved,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .dead_letters
        }
    };
    let refused = rejected.len() + 2 * case_bad.len();
    eventually(
        Duration::from_secs(20),
        "the refused records dead-lettered",
        || async { list(false).await.len() >= refused },
    )
    .await;
    let dead = list(false).await;
    assert_eq!(dead.len(), refused, "{dead:?}");
    let of_cases: Vec<&pb::DeadLetter> = dead.iter().filter(|d| d.case_event_id != 0).collect();
    assert_eq!(of_cases.len(), case_bad.len(), "{dead:?}");
    assert!(
        of_cases
            .iter()
            .all(|d| d.error.contains("缺少必填项 proManager")
                && d.hub_id.is_empty()
                && d.feed_sequence == 0)
    );
    let of_ratings: Vec<&String> = dead
        .iter()
        .filter(|d| d.case_event_id == 0)
        .map(|d| &d.error)
        .collect();
    assert_eq!(
        of_ratings
            .iter()
            .filter(|e| e.contains("evalDetail 不合法"))
            .count(),
        rejected.len()
    );
    assert_eq!(
        of_ratings
            .iter()
            .filter(|e| e.contains("办件不存在"))
            .count(),
        case_bad.len(),
        "a rating whose case the platform refused is refused too"
    );
    {
        let g = gateway.lock().unwrap();
        assert!(g.bad_envelopes.is_empty(), "{:?}", g.bad_envelopes);
        assert!(
            g.out_of_order.is_empty(),
            "ratings before their case: {:?}",
            g.out_of_order
        );
        // What the gateway stored, field by field.
        let c = &g.cases["SC-001"];
        assert_eq!(
            c["areaCode"], "530100000000",
            "remapped and padded to 12 digits"
        );
        assert_eq!(
            c["creditType"], "516",
            "a Hong Kong resident's travel permit"
        );
        assert_eq!(c["creditNum"], "H12345678");
        assert_eq!(c["userProp"], "1");
        assert_eq!(c["taskType"], "01");
        assert_eq!(c["promiseTime"], "2");
        assert_eq!(c["proChannel"], "2");
        assert_eq!(c["promiseDay"], 5);
        assert_eq!(c["proStatus"], "3", "the 办结 record, not the 受理 one");
        assert_eq!(
            g.repeats, 0,
            "no case record was pushed twice: {}",
            g.repeats
        );
        assert_eq!(c["resultDate"].as_str().unwrap().len(), 19);
        assert_eq!(c["serviceNumber"], "FW-00001");
        let with_agent = &g.cases["SC-000"];
        assert_eq!(
            with_agent["handleUserName"], "代办员",
            "the agent's data reaches the platform"
        );
        assert_eq!(with_agent["handleUserPageType"], "111");
        let r = g
            .ratings
            .values()
            .find(|r| r["projectNo"] == "SC-001")
            .unwrap();
        assert_eq!(r["satisfaction"], "5");
        assert_eq!(r["pf"], "4");
        assert_eq!(r["taskCode"].as_str().unwrap().len(), 31);
        assert_eq!(r["taskHandleItem"], "AB");
        assert_eq!(r["userPageType"], "516");
        assert_eq!(r["serviceNumber"], "FW-00001");
        assert_eq!(r["dataSource"], "1");
    }

    // The province fixes its check; the operator replays the dead letters.
    control.accept_rejected.store(true, Ordering::SeqCst);
    admin
        .clone()
        .replay_dead_letters(pb::ReplayDeadLettersRequest {
            upstream: "prov".into(),
            all: true,
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the replay delivered them",
        || async { gateway.lock().unwrap().ratings.len() == N },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the dead letters resolved",
        || async { list(false).await.is_empty() },
    )
    .await;
    {
        let g = gateway.lock().unwrap();
        assert_eq!(
            g.cases.len(),
            N,
            "each case record stored once, the refused ones after the replay"
        );
        assert!(g.out_of_order.is_empty());
        assert!(g.bad_envelopes.is_empty());
    }

    // A rating of a case still in progress: the platform has no record of it yet and
    // refuses the rating; once the case is done and its record delivered, the hub sends the
    // rating again by itself (no operator).
    let late = service_case(100);
    crate::rules::report(
        &hub,
        vec![pb::ServiceCase {
            event: pb::CaseEvent::Accepted as i32,
            ..late.clone()
        }],
    )
    .await;
    let mut ingest = hub.ingest().await;
    let hub_id = submit(&mut ingest, vec![rating_of(&late)]).await[0]
        .hub_id
        .clone();
    eventually(
        Duration::from_secs(20),
        "the early rating refused",
        || async {
            list(false)
                .await
                .iter()
                .any(|d| d.hub_id == hub_id && d.error.contains("办件不存在"))
        },
    )
    .await;
    // Meanwhile the authority finds the rating invalid (the rater's claim that a 好评 was not
    // their will): the platform must not be told of a rating it does not have; the update
    // waits as a dead letter of its own.
    admin
        .clone()
        .register_invalid_rating(pb::RegisterInvalidRatingRequest {
            hub_id: hub_id.clone(),
            rater_statement: "评价器是工作人员代按的".into(),
            decision_note: "核实属实，认定无效".into(),
        })
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the update waits for its rating",
        || async {
            list(false).await.iter().any(|d| {
                d.update_seq != 0 && d.hub_id == hub_id && d.error.contains("waits for its rating")
            })
        },
    )
    .await;
    assert!(
        gateway.lock().unwrap().update_pushes.is_empty(),
        "no update before its rating"
    );
    crate::rules::report(&hub, vec![late.clone()]).await;
    eventually(
        Duration::from_secs(20),
        "the rating delivered after its case",
        || async { gateway.lock().unwrap().ratings.contains_key(&hub_id) },
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "its dead letter resolved",
        || async { list(false).await.is_empty() },
    )
    .await;

    // The rating delivered, its update follows by itself: once, and not again after a
    // restart.
    eventually(Duration::from_secs(20), "the update delivered", || async {
        gateway
            .lock()
            .unwrap()
            .flagged
            .get(&hub_id)
            .map(String::as_str)
            == Some("1")
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "every dead letter resolved",
        || async { list(false).await.is_empty() },
    )
    .await;
    let hub = hub.stop().await.restart().await;
    // One more rating through a full relay round after the restart: any update the hub had
    // not recorded as sent would have gone again by the time this one arrives.
    let extra = service_case(101);
    crate::rules::report(&hub, vec![extra.clone()]).await;
    let extra_id = submit(&mut hub.ingest().await, vec![rating_of(&extra)]).await[0]
        .hub_id
        .clone();
    eventually(
        Duration::from_secs(20),
        "a rating after the restart",
        || async { gateway.lock().unwrap().ratings.contains_key(&extra_id) },
    )
    .await;
    {
        let g = gateway.lock().unwrap();
        assert_eq!(
            g.update_pushes.get(&hub_id),
            Some(&1),
            "the update went up once"
        );
        assert_eq!(g.flagged.len(), 1);
        assert!(
            g.out_of_order.iter().all(|o| !o.starts_with("update")),
            "{:?}",
            g.out_of_order
        );
    }
    hub.stop().await;
}

/// A profile that cannot work stops the hub at start, naming the upstream, where in the
/// profile and why; a secret's value never appears in the message.
#[test]
fn a_bad_profile_stops_the_hub_at_start_saying_where_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/upstreams/national-evaluate.toml"),
    )
    .unwrap();
    let key = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gm/openssl-sm2-private.pem");
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "TOP-SECRET-VALUE").unwrap();
    let cases: [(&str, String, &str, &[&str]); 5] = [
        (
            "an unknown path",
            shipped.replace("path = \"service_status\"", "path = \"service_stat\""),
            "",
            &["upstreams.prov", "records.rating.fields.proStatus", "service_stat"],
        ),
        (
            "an unknown transform",
            shipped.replace(
                "{ pad_right = [12, \"0\"] }], required = true }",
                "{ pad_rigth = [12, \"0\"] }], required = true }",
            ),
            "",
            &["records.case.fields.areaCode", "pad_rigth"],
        ),
        (
            "a code table that is not there",
            shipped.replace("table = \"satisfaction\"", "table = \"satisfactions\""),
            "",
            &["records.rating.fields.satisfaction", "satisfactions"],
        ),
        (
            "a required field that can never be filled",
            shipped.replace("dataSource = { path = \"attributes.dataSource\", transforms = [{ default = \"1\" }] }", "dataSource = { const = \"\", required = true }"),
            "",
            &["records.rating.fields.dataSource", "required"],
        ),
        (
            "a key file that does not load",
            shipped.clone(),
            "broken-key",
            &["upstreams.prov", "key hub", "neither an SM2 private nor public key"],
        ),
    ];
    for (what, profile, key_override, says) in cases {
        let profile_path = dir.path().join("profile.toml");
        std::fs::write(&profile_path, profile).unwrap();
        let key_path = if key_override.is_empty() {
            key.display().to_string()
        } else {
            let p = dir.path().join("bad.pem");
            std::fs::write(
                &p,
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            )
            .unwrap();
            p.display().to_string()
        };
        let config = format!(
            "[upstreams.prov]\nkind = \"http-json\"\nendpoint = \"https://127.0.0.1:9/hcp\"\n\
             ca = \"{ca}\"\nprofile = \"{profile}\"\n\
             [upstreams.prov.secrets]\napp_id = \"file:{s}\"\napp_secret = \"file:{s}\"\ntenancy_id = \"file:{s}\"\n\
             [upstreams.prov.keys]\nhub = \"{key}\"\nplatform = \"{key}\"\n",
            ca = key.display(),
            profile = profile_path.display(),
            s = secret_file.display(),
            key = key_path,
        );
        let config_path = dir.path().join("hub.toml");
        std::fs::write(&config_path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0")
            .env("RATING_HUB__OPS__LISTEN", "127.0.0.1:0")
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the hub started");
        for s in says {
            assert!(err.contains(s), "{what}: {s:?} not in {err}");
        }
        assert!(
            !err.contains("TOP-SECRET-VALUE"),
            "{what}: a secret in {err}"
        );
    }
}

//! The self-built platform webhook against a real hub: mapped fields and scales arrive at the
//! hub; each item gets its own result; re-posting is a duplicate, never a second rating.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rating_hub::pb::v1 as pb;
use rating_hub_adapter_kit::Mapping;
use rating_hub_adapter_kit::testing::{hub_connection, start_hub, wait_for_ratings};
use rating_hub_selfbuilt::SelfbuiltConfig;
use serde_json::{Value, json};

fn mapping() -> Mapping {
    let t = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let mut values = BTreeMap::new();
    // Stars and Changchun's words map to the same five levels.
    values.insert(
        "level".to_string(),
        t(&[
            ("5", "LEVEL_VERY_SATISFIED"),
            ("4", "LEVEL_SATISFIED"),
            ("3", "LEVEL_BASICALLY_SATISFIED"),
            ("2", "LEVEL_DISSATISFIED"),
            ("1", "LEVEL_VERY_DISSATISFIED"),
            ("很好", "LEVEL_VERY_SATISFIED"),
            ("好", "LEVEL_SATISFIED"),
            ("一般", "LEVEL_BASICALLY_SATISFIED"),
            ("差", "LEVEL_DISSATISFIED"),
            ("很差", "LEVEL_VERY_DISSATISFIED"),
        ]),
    );
    Mapping {
        fields: t(&[
            ("source_key", "id"),
            ("case_number", "order.no"),
            ("item_code", "order.service.code"),
            ("item_name", "order.service.name"),
            ("region_code", "dept.area"),
            ("org_credit_code", "dept.uscc"),
            ("level", "evaluation.score"),
            ("text", "evaluation.comment"),
            ("detail_codes", "evaluation.reasons"),
            ("rated_at", "evaluation.time"),
            ("rater.phone", "user.mobile"),
            ("attributes.platformId", "platform"),
        ]),
        values,
        constants: t(&[
            ("channel", "CHANNEL_MOBILE_APP"),
            ("target_kind", "TARGET_KIND_ITEM"),
        ]),
        time_format: "yyyy-MM-dd HH:mm:ss".into(),
    }
}

fn item(id: &str, score: Value, uscc: &str) -> Value {
    json!({
        "id": id,
        "platform": "km-app",
        "order": {"no": format!("KM-{id}"), "service": {"code": "530100-ITEM-7", "name": "户籍迁移"}},
        "dept": {"area": "530102", "uscc": uscc},
        "evaluation": {"score": score, "comment": "办事很快", "reasons": ["501", "503"], "time": "2025-06-04 09:30:00"},
        "user": {"mobile": "13800138000"}
    })
}

#[tokio::test]
async fn webhook_items_are_mapped_validated_and_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let cfg = SelfbuiltConfig {
        listen: "127.0.0.1:0".into(),
        spool: dir.path().join("spool.db").display().to_string(),
        key_prefix: "km-app".into(),
        hub: hub_connection(dir.path(), port),
        mapping: mapping(),
        callback_auth: rating_hub_adapter_kit::testing::callback_auth(dir.path()),
        // 国密 at rest: the spool sealed with SM4-GCM under a key of its own.
        at_rest: rating_hub_adapter_kit::at_rest::AtRestConfig {
            algorithm: rating_hub::privacy::Algorithm::Sm4Gcm,
            ..Default::default()
        },
    };
    let adapter = rating_hub_selfbuilt::start(cfg).await.unwrap();
    assert!(dir.path().join("pii-sm4.key").exists());
    let org = rating_hub::domain::codes::credit_code_with_check("11530100MA0000009").unwrap();
    let body = json!([
        item("a1", json!(5), &org),
        item("a2", json!("很差"), &org),
        item("a3", json!(4), "not-a-code"),
        item("a4", json!(7), &org),
    ]);
    let url = format!("http://{}/ratings", adapter.addr);
    let post = |body: Value| {
        let url = url.clone();
        async move {
            let body = body.to_string();
            let mut request = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json");
            for (k, v) in
                rating_hub_adapter_kit::testing::signed_headers("/ratings", body.as_bytes())
            {
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
    };
    let answer = post(body.clone()).await;
    let outcomes: Vec<&str> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["accepted", "accepted", "invalid", "invalid"]);
    assert_eq!(
        answer["results"][2]["violations"][0]["field"],
        "org_credit_code"
    );
    assert_eq!(answer["results"][3]["violations"][0]["field"], "level");

    let ratings = wait_for_ratings(dir.path(), port, 2, Duration::from_secs(30)).await;
    let by_case: BTreeMap<String, pb::Rating> = ratings
        .into_iter()
        .map(|r| (r.case_number.clone(), r))
        .collect();
    let a1 = &by_case["KM-a1"];
    assert_eq!(a1.level, pb::Level::VerySatisfied as i32);
    assert_eq!(a1.channel, pb::Channel::MobileApp as i32);
    assert_eq!(a1.source_system, "adapter");
    assert_eq!(a1.detail_codes, ["501", "503"]);
    assert_eq!(a1.attributes["platformId"], "km-app");
    assert_eq!(a1.item_name, "户籍迁移");
    assert_eq!(by_case["KM-a2"].level, pb::Level::VeryDissatisfied as i32);

    // The platform re-sends the same batch: duplicates, nothing new at the hub.
    let again = post(body).await;
    assert_eq!(again["results"][0]["outcome"], "duplicate");
    assert_eq!(again["results"][1]["outcome"], "duplicate");
    // The same id with a different rating: a reused key, not a re-send. Refused as a
    // conflict, nothing stored, never answered as received.
    let reused = post(json!([item("a1", json!(1), &org)])).await;
    assert_eq!(reused["results"][0]["outcome"], "conflict", "{reused}");
    let text = json!("text").to_string();
    let mut bad = reqwest::Client::new()
        .post(format!("http://{}/ratings", adapter.addr))
        .header("content-type", "application/json");
    for (k, v) in rating_hub_adapter_kit::testing::signed_headers("/ratings", text.as_bytes()) {
        bad = bad.header(k, v);
    }
    let bad = bad.body(text).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    adapter.shutdown().await;
    // The delivered rows stay in the spool (retention), sealed: the rater's phone is in none
    // of its files, and the sealed values name the SM4 key, never the ChaCha one.
    let mut files = Vec::new();
    for f in ["spool.db", "spool.db-wal"] {
        files.extend(std::fs::read(dir.path().join(f)).unwrap_or_default());
    }
    let holds = |needle: &[u8]| files.windows(needle.len()).any(|w| w == needle);
    assert!(!holds(b"13800138000"), "the phone in clear");
    assert!(holds(b"S1\0\x02s1"), "values sealed under the SM4 key");
    assert!(!holds(b"S1\0\x02k1"), "nothing sealed under a ChaCha key");
    assert_eq!(
        rating_hub_adapter_kit::testing::all_ratings(dir.path(), port)
            .await
            .len(),
        2
    );
    hub.shutdown().await.unwrap();
}

//! Prometheus metrics on the operations listener (issue #20, part 1), scraped and parsed with
//! a Prometheus text parser: the values move with real traffic, a stopped upstream, a dead
//! letter, a quota denial and the rules engine; no rater data in any of it.

use std::collections::HashMap;
use std::time::Duration;

use rating_hub::pb::v1 as pb;

use crate::fake_upstream::{FakeUpstream, Mode};
use crate::utils::*;

/// The samples of one scrape: (metric name, sorted labels) → value.
pub(crate) type Samples = HashMap<(String, Vec<(String, String)>), f64>;

pub(crate) async fn scrape(hub: &TestHub) -> (String, Samples) {
    let addr = hub.hub.ops_addr.expect("the operations listener");
    // reqwest's rustls needs a process-wide provider; the hub uses ring everywhere.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        labels.sort();
        let value = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        out.insert((s.metric, labels), value);
    }
    (text, out)
}

fn get(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    m.get(&(name.to_owned(), l)).copied().unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_move_with_traffic_outages_dead_letters_and_denials() {
    let fake = FakeUpstream::start().await;
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .principal("limited", &["submit"], TestScope::National)
        .set("principals.limited.requests_per_sec", "1")
        .set("principals.limited.requests_burst", "1")
        .start()
        .await;
    let mut ingest = hub.ingest().await;
    let mut bad = rating("m-bad");
    bad.level = 42;
    let results = submit(&mut ingest, vec![rating("m-1"), rating("m-2"), bad]).await;
    assert_eq!(outcome(&results[2]), pb::Outcome::Invalid);
    fake.wait_until(Duration::from_secs(30), "both delivered", |got| {
        got.len() == 2
    })
    .await;
    let who = [("rpc", "SubmitRatings"), ("principal", "tester")];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let m = loop {
        let (_, m) = scrape(&hub).await;
        if get(&m, "rating_hub_upstream_cursor", &[("upstream", "fake")]) == 2.0 {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let with = |o: &'static str| {
        let mut l = who.to_vec();
        l.push(("outcome", o));
        l
    };
    assert_eq!(get(&m, "rating_hub_ratings_total", &with("accepted")), 2.0);
    assert_eq!(get(&m, "rating_hub_ratings_total", &with("invalid")), 1.0);
    assert_eq!(get(&m, "rating_hub_feed_head", &[]), 2.0);
    assert_eq!(
        get(
            &m,
            "rating_hub_upstream_lag_records",
            &[("upstream", "fake")]
        ),
        0.0
    );
    assert_eq!(
        get(
            &m,
            "rating_hub_upstream_delivering_here",
            &[("upstream", "fake")]
        ),
        1.0
    );

    // Sends by result; the certificates' expiry; the database.
    let sends = |m: &Samples, result: &'static str| {
        get(
            m,
            "rating_hub_delivery_attempts_total",
            &[("result", result), ("upstream", "fake")],
        )
    };
    assert!(sends(&m, "delivered") >= 1.0, "{m:?}");
    assert_eq!(sends(&m, "failed"), 0.0);
    let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock) as f64 / 1e6;
    for which in ["server", "ca"] {
        let expiry = get(
            &m,
            "rating_hub_certificate_expiry_timestamp_seconds",
            &[("certificate", which)],
        );
        // The test PKI's certificates are issued for 30 days (the CA for longer).
        assert!(expiry > now + 29.0 * 86_400.0, "{which}: {expiry}");
    }
    assert_eq!(get(&m, "rating_hub_database_up", &[]), 1.0);
    assert!(get(&m, "rating_hub_database_bytes", &[]) > 0.0);

    // The upstream stops: the lag shows, and the failed sends.
    fake.set_mode(Mode::Unavailable);
    let mark = fake.mark();
    submit(&mut ingest, vec![rating("m-3")]).await;
    fake.wait_calls(mark, 1, Duration::from_secs(30)).await;
    let (_, m) = scrape(&hub).await;
    assert_eq!(
        get(
            &m,
            "rating_hub_upstream_lag_records",
            &[("upstream", "fake")]
        ),
        1.0
    );
    assert_eq!(get(&m, "rating_hub_feed_head", &[]), 3.0);
    // (The send is counted once its answer is back: wait for that.)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sends(&scrape(&hub).await.1, "failed") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no failed send counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // It comes back refusing one rating for good: a dead letter.
    fake.reject_origin_keys(["m-4".to_string()]);
    fake.set_mode(Mode::Accept);
    submit(&mut ingest, vec![rating("m-4")]).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let m = loop {
        let (_, m) = scrape(&hub).await;
        // (Status reads the cursor and the dead letters one after the other: wait for both.)
        if get(
            &m,
            "rating_hub_upstream_dead_letters",
            &[("upstream", "fake")],
        ) == 1.0
            && get(
                &m,
                "rating_hub_upstream_lag_records",
                &[("upstream", "fake")],
            ) == 0.0
        {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        get(
            &m,
            "rating_hub_upstream_lag_records",
            &[("upstream", "fake")]
        ),
        0.0
    );

    // A quota denial, counted by reason.
    let mut limited =
        pb::ingest_service_client::IngestServiceClient::new(hub.channel_as("limited").await);
    // The first call spends the burst without a commit (an empty batch is refused at once),
    // so nothing slow stands between it and the second.
    let first = limited
        .submit_ratings(pb::SubmitRatingsRequest { ratings: vec![] })
        .await
        .unwrap_err();
    assert_eq!(first.code(), tonic::Code::InvalidArgument);
    let second = limited
        .submit_ratings(pb::SubmitRatingsRequest {
            ratings: vec![rating("q-2")],
        })
        .await
        .unwrap_err();
    assert_eq!(second.code(), tonic::Code::ResourceExhausted);
    // The rules engine.
    hub.hub.rules().tick().await.unwrap();
    let (text, m) = scrape(&hub).await;
    assert_eq!(
        get(&m, "rating_hub_denials_total", &[("reason", "quota")]),
        1.0
    );
    assert!(get(&m, "rating_hub_rules_ticks_total", &[]) >= 1.0);
    // The store writer's commits: how many groups, how many items, how long.
    let groups = get(&m, "rating_hub_writer_group_items_count", &[]);
    assert!(groups >= 1.0, "writer groups: {groups}");
    assert!(
        get(&m, "rating_hub_writer_group_items_sum", &[]) >= groups,
        "at least one item a group"
    );
    // (A commit's time is observed just before its size: a scrape between sees one more.)
    assert!(get(&m, "rating_hub_writer_commit_seconds_count", &[]) >= groups);
    assert!(get(&m, "rating_hub_writer_commit_seconds_sum", &[]) > 0.0);
    assert!(
        text.contains("# TYPE rating_hub_writer_commit_seconds histogram"),
        "{text}"
    );
    // No rater data anywhere in the exposition.
    for pii in ["13800138000", "张三", id_number().as_str()] {
        assert!(!text.contains(pii), "{pii} in /metrics");
    }
    // The stored state cannot be read: the upstream's series go, rather than show this
    // instance's own figures (no dead letters, no lag) as if they were known.
    let dir = hub.dir.path().to_path_buf();
    crate::pg::exec_on_hub(
        &dir,
        "ALTER TABLE upstream_state RENAME TO upstream_state_away",
    );
    let (_, m) = scrape(&hub).await;
    assert!(
        !m.keys()
            .any(|(name, _)| name.starts_with("rating_hub_upstream_")),
        "{m:?}"
    );
    crate::pg::exec_on_hub(
        &dir,
        "ALTER TABLE upstream_state_away RENAME TO upstream_state",
    );
    let (_, m) = scrape(&hub).await;
    assert_eq!(
        get(
            &m,
            "rating_hub_upstream_dead_letters",
            &[("upstream", "fake")]
        ),
        1.0
    );
    hub.stop().await;
}

/// The shipped alert rules pass `promtool check rules` (Debian's prometheus package, installed
/// by scripts/test-deps), and every metric they and the Grafana dashboard name is one the hub
/// exports (a rule on a misspelt metric never fires).
#[tokio::test]
async fn alert_rules_and_dashboard_pass_promtool_and_name_only_exported_metrics() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = root.join("deploy/prometheus/rating-hub-alerts.yml");
    let dashboard = root.join("deploy/grafana/rating-hub.json");
    let promtool = std::env::var_os("RATING_HUB_PROMTOOL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/promtool".into());
    assert!(
        promtool.exists(),
        "{} is missing: run scripts/test-deps (Debian's prometheus package)",
        promtool.display()
    );
    let out = std::process::Command::new(&promtool)
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard).unwrap()).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 10));

    let fake = FakeUpstream::start().await;
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .start()
        .await;
    submit(&mut hub.ingest().await, vec![rating("d-1")]).await;
    fake.wait_until(Duration::from_secs(30), "delivered", |got| got.len() == 1)
        .await;
    let (text, _) = scrape(&hub).await;
    // Family names from the exposition, with the sample names Prometheus stores.
    let mut exported = std::collections::HashSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            // The sample names Prometheus stores: a counter's with _total, a histogram's
            // buckets, sum and count; a gauge's as it is.
            match kind {
                "counter" => {
                    exported.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for part in ["bucket", "sum", "count"] {
                        exported.insert(format!("{name}_{part}"));
                    }
                }
                _ => {
                    exported.insert(name.to_owned());
                }
            }
        }
    }
    let named = |text: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("rating_hub_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.push(tail[..end].to_owned());
            rest = &tail[end..];
        }
        out
    };
    let mut referenced = named(&std::fs::read_to_string(&rules).unwrap());
    referenced.extend(named(&dash.to_string()));
    assert!(referenced.len() >= 15, "{referenced:?}");
    for name in &referenced {
        assert!(exported.contains(name), "{name} is not exported:\n{text}");
    }
    hub.stop().await;
}

/// The operators' status page, loaded in Chromium during an upstream outage: the upstream
/// shown failing with its lag and the upstream's own answer, the failed sends listed, an
/// overdue 差评 case counted, the certificates' expiry, and no rater data.
#[tokio::test]
async fn the_status_page_shows_an_outage_in_the_browser() {
    use rating_hub::clock::ManualClock;
    let clock = std::sync::Arc::new(ManualClock::at(crate::rules::cst("2025-03-03", 9)));
    let fake = FakeUpstream::start().await;
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .clock(clock.clone())
        .start()
        .await;
    let mut ingest = hub.ingest().await;
    let at = |r: &mut pb::Rating| {
        r.rated_at = Some(rating_hub::time::timestamp_from_micros(crate::rules::cst(
            "2025-03-03",
            9,
        )))
    };
    let mut ok = vec![rating("s-1"), rating("s-2")];
    ok.iter_mut().for_each(at);
    let mut complaint = rating("s-bad");
    complaint.level = pb::Level::VeryDissatisfied as i32;
    at(&mut complaint);
    ok.push(complaint);
    submit(&mut ingest, ok).await;
    fake.wait_until(Duration::from_secs(30), "delivered", |got| got.len() == 3)
        .await;
    fake.set_mode(Mode::Unavailable);
    let mut late = vec![rating("s-3"), rating("s-4")];
    late.iter_mut().for_each(at);
    let mark = fake.mark();
    submit(&mut ingest, late).await;
    fake.wait_calls(mark, 2, Duration::from_secs(30)).await;
    // A month later the 差评 case is long overdue (Kunming: 15 working days).
    clock.set(crate::rules::cst("2025-04-03", 9));
    let addr = hub.hub.ops_addr.expect("the operations listener");
    let url = format!("http://{addr}/status");
    let page = crate::public::dom(url.clone()).await;
    assert!(page.contains("data-upstream=\"fake\""), "{page}");
    assert!(page.contains("data-state=\"failing\""), "{page}");
    let cell = |col: &str| {
        let at = page
            .find(&format!("data-col=\"{col}\""))
            .unwrap_or_else(|| panic!("no {col}"));
        let text = &page[at + page[at..].find('>').unwrap() + 1..];
        text[..text.find('<').unwrap()].to_owned()
    };
    assert_eq!(cell("lag_records"), "2");
    assert_eq!(cell("overdue_cases"), "1");
    assert!(
        cell("last_error").contains("down for maintenance"),
        "{page}"
    );
    assert!(page.contains("data-col=\"outcome\">failed<"), "{page}");
    assert!(page.contains("data-certificate=\"server\""), "{page}");
    assert!(page.contains("http-equiv=\"refresh\""));
    for pii in ["13800138000", "张三", id_number().as_str()] {
        assert!(!page.contains(pii), "{pii} on the status page");
    }
    if std::env::var_os("RATING_HUB_UPDATE_SCREENSHOTS").is_some() {
        let docs = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs");
        crate::public::screenshot(url.clone(), &docs.join("status-page.png"), false).await;
        crate::public::screenshot(url, &docs.join("status-page-phone.png"), true).await;
    }
    hub.stop().await;
}

/// Alerts for a site without Prometheus: each condition reaches the webhook once when it
/// starts and once when it ends, signed with the shared secret — an upstream failing and
/// lagging during an outage (resolved when it is back), dead letters once it refuses a
/// rating for good, and the test PKI's 30-day server certificate as expiring.
#[tokio::test]
async fn alerts_reach_the_webhook_once_per_change_of_state() {
    use std::sync::{Arc, Mutex};
    // (The event, its signature header, the raw body.)
    type Received = Vec<(serde_json::Value, String, Vec<u8>)>;
    let received: Arc<Mutex<Received>> = Default::default();
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let app = {
        let received = received.clone();
        axum::Router::new().route(
            "/hook",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let received = received.clone();
                    let tx = tx.clone();
                    async move {
                        let sig = headers
                            .get("x-ratinghub-signature")
                            .map(|v| v.to_str().unwrap().to_owned())
                            .unwrap_or_default();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        received.lock().unwrap().push((v, sig, body.to_vec()));
                        tx.send_modify(|n| *n += 1);
                        "ok"
                    }
                },
            ),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("hook.secret");
    std::fs::write(&secret, b"s3cret-for-the-hook").unwrap();
    let fake = FakeUpstream::start().await;
    let hub = crate::relay::upstream(HubBuilder::new(), "fake", &fake.url())
        .set("alerts.webhook_url", &format!("\"http://{hook}/hook\""))
        .set(
            "alerts.webhook_secret_file",
            &format!("{:?}", secret.display().to_string()),
        )
        .set("alerts.check_secs", "1")
        .set("alerts.lag_limit_secs", "1")
        .set("alerts.hold_secs", "0")
        .start()
        .await;
    let has = |alert: &str, subject: &str, status: &str| {
        received.lock().unwrap().iter().any(|(v, _, _)| {
            v["alert"] == alert && v["subject"] == subject && v["status"] == status
        })
    };
    let wait_for = |alert: &'static str, subject: &'static str, status: &'static str| {
        let mut rx = rx.clone();
        let has = &has;
        async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                while !has(alert, subject, status) {
                    rx.changed().await.unwrap();
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no {status} {alert} {subject}"));
        }
    };
    wait_for("certificate_expiring", "server", "firing").await;
    // An outage: failing, then lagging; back: both resolved.
    fake.set_mode(Mode::Unavailable);
    submit(&mut hub.ingest().await, vec![rating("w-1")]).await;
    wait_for("upstream_failing", "fake", "firing").await;
    wait_for("upstream_lagging", "fake", "firing").await;
    fake.set_mode(Mode::Accept);
    wait_for("upstream_failing", "fake", "resolved").await;
    wait_for("upstream_lagging", "fake", "resolved").await;
    // A rating refused for good.
    fake.reject_origin_keys(["w-2".to_string()]);
    submit(&mut hub.ingest().await, vec![rating("w-2")]).await;
    wait_for("dead_letters_open", "fake", "firing").await;
    // A few more checks: nothing is sent twice.
    let n = *rx.borrow_and_update();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            rx.changed().await.unwrap();
        }
    })
    .await;
    let got = received.lock().unwrap().clone();
    // Once per change of state: for each alert and subject, firing and resolved alternate,
    // starting with firing (a condition that comes back fires again, once).
    let mut state: std::collections::HashMap<(String, String), String> = Default::default();
    for (v, sig, body) in &got {
        let key = (v["alert"].to_string(), v["subject"].to_string());
        let status = v["status"].as_str().unwrap().to_owned();
        let was = state.insert(key.clone(), status.clone());
        let expected = match was.as_deref() {
            None | Some("resolved") => "firing",
            _ => "resolved",
        };
        assert_eq!(
            status, expected,
            "{key:?} sent {status} twice in a row (of {n})"
        );
        use hmac::Mac;
        let mut mac =
            hmac::SimpleHmac::<sha2::Sha256>::new_from_slice(b"s3cret-for-the-hook").unwrap();
        mac.update(body);
        assert_eq!(*sig, hex::encode(mac.finalize().into_bytes()), "signature");
        // No rater data.
        let text = String::from_utf8_lossy(body);
        for pii in ["13800138000", "张三", id_number().as_str()] {
            assert!(!text.contains(pii), "{pii} in {text}");
        }
    }
    hub.stop().await;
}

/// Off loopback the operations listener speaks only mutual TLS: a certificate the hub's CA
/// issued, naming a principal with the `ops` role (a Prometheus server's), gets /metrics; a
/// principal without the role, no certificate and plain HTTP get nothing. Without
/// `ops.mtls` an address off loopback stops the hub at start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operations_listener_off_loopback_needs_mutual_tls_and_the_ops_role() {
    let refused = tokio::task::spawn_blocking(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rating-hub"))
            .arg("serve")
            .env("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0")
            .env("RATING_HUB__OPS__LISTEN", "0.0.0.0:0")
            .current_dir(tempfile::tempdir().unwrap().path())
            .env_remove("RUST_LOG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("ops.mtls"), "{err}");

    let hub = HubBuilder::new()
        .set("ops.listen", "\"0.0.0.0:0\"")
        .set("ops.mtls", "true")
        .principal("prometheus", &["ops"], TestScope::National)
        .principal("reader", &["read"], TestScope::National)
        .start()
        .await;
    let port = hub.hub.ops_addr.expect("the operations listener").port();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(hub.pki_dir().join(rating_hub::pki::CA_CERT)).unwrap(),
    )
    .unwrap();
    let client = |who: Option<&str>| {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(ca.clone())
            .timeout(Duration::from_secs(10));
        if let Some(who) = who {
            let pair = hub.client_files(who);
            let mut pem = std::fs::read(&pair.cert).unwrap();
            pem.extend(std::fs::read(&pair.key).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    };
    let url = format!("https://127.0.0.1:{port}/metrics");
    // Someone without a certificate opens 64 connections from one address and sends nothing:
    // they hold at most a few handshake slots, never the scraper's way in.
    let mut idle = Vec::new();
    for _ in 0..64 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(c) = socket
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
        {
            idle.push(c);
        }
    }
    assert_eq!(idle.len(), 64, "the idle connections were all made");
    let started = std::time::Instant::now();
    let ok = client(Some("prometheus")).get(&url).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the scrape waited {:?} behind idle handshakes",
        started.elapsed()
    );
    assert!(ok.text().await.unwrap().contains("rating_hub_feed_head"));
    drop(idle);
    assert!(
        client(Some("reader")).get(&url).send().await.is_err(),
        "a principal without the ops role gets nothing"
    );
    assert!(
        client(None).get(&url).send().await.is_err(),
        "no certificate, nothing"
    );
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .is_err(),
        "no plain HTTP"
    );
    hub.stop().await;
}

//! `rating-bench relay-profiles`: how fast an http-json upstream drains with the national
//! profile (an SM2-signed token, a fresh SM4 data key wrapped with SM2, the records
//! SM4-encrypted and SM2-signed) against the plain inline mapping (a JSON list), in the same
//! run. Each profile gets a hub of its own: `ratings` are stored while the platform answers
//! 503, then the platform opens and the time until it has received them all is measured.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};

/// The platform's SM2 key (GB/T 32918.5's example key pair): it opens the data keys.
const PLATFORM_KEY: &str = "3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8";
const PLATFORM_PUB: &str = "0409F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020\
                            CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13";
/// The hub's signing key (any valid scalar).
const HUB_KEY: &str = "128B2FA8BD433C6C068C8D803DFF79792A519A55171B1B650C23661D15897263";

/// A platform on HTTPS: 503 until opened, then takes every request and counts its records
/// (opening the national envelope to count them, as a platform must).
struct Platform {
    open: AtomicBool,
    received: AtomicUsize,
    national: bool,
}

impl Platform {
    fn answer(&self, body: &[u8]) -> (u16, Value) {
        if !self.open.load(Ordering::Acquire) {
            return (503, json!({"status": {"code": 503}}));
        }
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if !self.national {
            let n = v.as_array().map_or(0, Vec::len);
            self.received.fetch_add(n, Ordering::AcqRel);
            return (200, json!({"code": "0", "msg": "ok"}));
        }
        let t = &v["txnBodyCom"];
        let key = rating_hub::gm::Sm2PrivateKey::parse(PLATFORM_KEY).expect("key");
        let data_key = hex::decode(t["encryptKey"].as_str().unwrap_or_default())
            .ok()
            .and_then(|w| key.decrypt(rating_hub::gm::Sm2Order::C1C3C2, &w).ok())
            .and_then(|k| <[u8; 16]>::try_from(k).ok());
        let records = data_key.and_then(|k| {
            use base64::Engine as _;
            let ct = base64::engine::general_purpose::STANDARD
                .decode(t["requestData"].as_str().unwrap_or_default())
                .ok()?;
            let plain = rating_hub::gm::sm4_decrypt(&k, rating_hub::gm::Sm4Mode::Ecb, &ct).ok()?;
            serde_json::from_slice::<Vec<Value>>(&plain).ok()
        });
        let Some(records) = records else {
            return (400, json!({"status": {"code": 400}}));
        };
        self.received.fetch_add(records.len(), Ordering::AcqRel);
        let results: Vec<Value> = records.iter().map(|_| json!({"code": 1})).collect();
        (
            200,
            json!({"status": {"code": 200}, "custom": {"code": 1, "text": "ok", "results": results}}),
        )
    }
}

async fn start_platform(pki: &Path, national: bool) -> anyhow::Result<(String, Arc<Platform>)> {
    let certs = CertificateDer::pem_file_iter(pki.join(rating_hub::pki::SERVER_CERT))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.join(rating_hub::pki::SERVER_KEY))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("https://127.0.0.1:{}/hcp", listener.local_addr()?.port());
    let platform = Arc::new(Platform {
        open: AtomicBool::new(false),
        received: AtomicUsize::new(0),
        national,
    });
    let p = platform.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, p) = (acceptor.clone(), p.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let p = p.clone();
                    async move {
                        let body: Bytes = BodyExt::collect(req.into_body())
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let (status, v) = p.answer(&body);
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from(v.to_string())))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((url, platform))
}

/// Ratings per second the platform received once it opened, for one profile.
async fn drain(
    hub_bin: &Path,
    work: &Path,
    pki: &Path,
    national: bool,
    ratings: u64,
) -> anyhow::Result<f64> {
    let name = if national { "national" } else { "plain" };
    let (url, platform) = start_platform(pki, national).await?;
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let write = |file: &str, text: &str| -> anyhow::Result<String> {
        let p = dir.join(file);
        std::fs::write(&p, text)?;
        Ok(p.display().to_string())
    };
    let common = format!(
        "[upstreams.p]\nkind = \"http-json\"\nendpoint = \"{url}\"\nca = \"{ca}\"\n\
         batch_size = 500\nin_flight = 4\nretry_schedule_ms = [10]\n\
         records_per_sec = 1000000\nrecords_burst = 1000000\n\
         requests_per_sec = 100000\nrequests_burst = 100000\n",
        ca = pki.join(rating_hub::pki::CA_CERT).display()
    );
    let config = if national {
        let profile = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/upstreams/national-evaluate.toml")
            .canonicalize()?;
        format!(
            "{common}profile = \"{profile}\"\n[upstreams.p.secrets]\n\
             app_id = \"file:{id}\"\napp_secret = \"file:{secret}\"\ntenancy_id = \"file:{id}\"\n\
             [upstreams.p.keys]\nhub = \"{hub}\"\nplatform = \"{platform}\"\n",
            profile = profile.display(),
            id = write("app-id", "bench")?,
            secret = write("app-secret", "bench-secret")?,
            hub = write("hub.key", HUB_KEY)?,
            platform = write("platform.pub", PLATFORM_PUB)?,
        )
    } else {
        format!("{common}[upstreams.p.http]\nbody = \"array\"\n")
    };
    let config = write("hub.toml", &config)?;
    let hub = super::spawn_hub(
        hub_bin,
        work,
        &format!("{name}-hub"),
        pki,
        &[("RATING_HUB_CONFIG", config)],
    )
    .await?;
    let ch = super::channels(pki, &hub.url, 1).await?;
    let mut client = IngestServiceClient::new(ch[0].clone());
    let org = super::org();
    let now = super::now_micros();
    let mut n = 0;
    while n < ratings {
        let batch: Vec<pb::Rating> = (n..(n + 500).min(ratings))
            .map(|i| super::rating(name, i, &org, now))
            .collect();
        n += batch.len() as u64;
        client
            .submit_ratings(pb::SubmitRatingsRequest { ratings: batch })
            .await?;
    }
    let started = Instant::now();
    platform.open.store(true, Ordering::Release);
    let deadline = started + Duration::from_secs(300);
    while (platform.received.load(Ordering::Acquire) as u64) < ratings {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: the platform received {} of {ratings} in 300 s",
            platform.received.load(Ordering::Acquire)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = ratings as f64 / started.elapsed().as_secs_f64();
    hub.stop().await;
    Ok(rate)
}

/// (plain records/s, national records/s), each drained from `ratings` stored ratings.
pub async fn run(hub_bin: &Path, ratings: u64) -> anyhow::Result<(f64, f64)> {
    let hub_bin = &hub_bin.canonicalize()?;
    let work = std::env::temp_dir().join(format!("rating-bench-profiles-{}", std::process::id()));
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let plain = drain(hub_bin, &work, &pki, false, ratings).await?;
    let national = drain(hub_bin, &work, &pki, true, ratings).await?;
    let _ = std::fs::remove_dir_all(&work);
    Ok((plain, national))
}

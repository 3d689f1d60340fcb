//! The public site (评价结果公开) under a citizen's load, against ingest alone.

use super::*;

// ---------------------------------------------------------------- the public site under load

/// Ingest alone and while a client loads the public pages (评价结果公开) at `page_rate`
/// requests/s: (alone, loaded, page latencies sorted in ms, failed pages). Each on a hub of
/// its own, from an empty database, so both write into tables of the same sizes.
pub(crate) async fn public_pages(
    hub_bin: &Path,
    work: &Path,
    pki: &Path,
    secs: u64,
    page_rate: f64,
) -> anyhow::Result<(f64, Measured, Vec<f64>, u64)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [
        ("RATING_HUB__PUBLIC__LISTEN", listen.clone()),
        ("RATING_HUB__PUBLIC__REGIONS", "[\"5301\"]".into()),
        // One client here, as behind a proxy: its rate and connections are not what limit it.
        ("RATING_HUB__PUBLIC__TRUST_FORWARDED_FOR", "true".into()),
        ("RATING_HUB__PUBLIC__REQUESTS_PER_SEC", "1000000".into()),
        ("RATING_HUB__PUBLIC__REQUESTS_BURST", "1000000".into()),
    ];
    let hub = spawn_hub(hub_bin, work, "hub-public-alone", pki, &env).await?;
    let ch = channels(pki, &hub.url, 4).await?;
    let alone = closed_loop(&ch, "pub-alone", 8, 100, secs).await?;
    eprintln!("public site unused: {:.0} ratings/s", alone.rate);
    hub.stop().await;
    let hub = spawn_hub(hub_bin, work, "hub-public-loaded", pki, &env).await?;
    let ch = channels(pki, &hub.url, 4).await?;
    // The pages a citizen would open: results by organisation, district and item for the
    // quarter and the year, and the 差评 list, at the default refresh (60 s): each is
    // computed once while ingest runs, then served from its copy.
    let q = rating_hub::public::Period::quarter_of(now_micros()).code();
    let y = &q[..4];
    let urls: Vec<String> = [
        format!("/results?region=5301&period={q}"),
        format!("/results?region=5301&period={q}&by=region"),
        format!("/results?region=5301&period={q}&by=item"),
        format!("/results?region=5301&period={y}"),
        format!("/cases?region=5301&period={q}"),
        format!("/data/results.json?region=5301&period={q}"),
        format!("/data/results.csv?region=5301&period={y}"),
    ]
    .into_iter()
    .map(|p| format!("http://{listen}{p}"))
    .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // reqwest's rustls needs a process-wide provider (plain HTTP here all the same).
            let _ = rustls::crypto::ring::default_provider().install_default();
            let client = reqwest::Client::new();
            let lat = Arc::new(Mutex::new(Vec::new()));
            let failed = Arc::new(AtomicU64::new(0));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / page_rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let (client, url, lat, failed) = (
                    client.clone(),
                    urls[n % urls.len()].clone(),
                    lat.clone(),
                    failed.clone(),
                );
                n += 1;
                tasks.push(tokio::spawn(async move {
                    let t = Instant::now();
                    match client.get(url).send().await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.bytes().await;
                            lat.lock().unwrap().push(t.elapsed().as_secs_f64() * 1000.0);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            let mut lat = std::mem::take(&mut *lat.lock().unwrap());
            lat.sort_by(f64::total_cmp);
            (lat, failed.load(Ordering::Relaxed))
        })
    };
    let loaded = closed_loop(&ch, "pub-loaded", 8, 100, secs).await;
    stop.store(true, Ordering::Relaxed);
    let (pages, failed) = loader.await?;
    let loaded = loaded?;
    eprintln!(
        "public site loaded at {page_rate} requests/s: {:.0} ratings/s; pages p99 {:.1} ms, {failed} failed",
        loaded.rate,
        percentile(&pages, 0.99)
    );
    hub.stop().await;
    Ok((alone.rate, loaded, pages, failed))
}

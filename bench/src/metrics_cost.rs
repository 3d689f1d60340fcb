//! `rating-bench metrics-cost`: what serving metrics costs ingest. Batches of 100, 8 in
//! flight, on a hub with its operations listener on and scraped every second (as a
//! Prometheus server would, more often than the usual 15 s), against a hub with it off
//! (`[ops] listen = ""`), alternating off, on, off, on, each hub fresh, in the same run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// (off, on): the mean ratings/s of the two runs of each.
pub async fn run(hub_bin: &Path, work: &Path, pki: &Path, secs: u64) -> anyhow::Result<(f64, f64)> {
    let mut off = Vec::new();
    let mut on = Vec::new();
    for round in 0..2 {
        let hub = super::spawn_hub(
            hub_bin,
            work,
            &format!("hub-metrics-off-{round}"),
            pki,
            &[("RATING_HUB__OPS__LISTEN", String::new())],
        )
        .await?;
        let ch = super::channels(pki, &hub.url, 4).await?;
        let m = super::closed_loop(&ch, &format!("m-off-{round}"), 8, 100, secs).await?;
        eprintln!("metrics off: {:.0} ratings/s", m.rate);
        off.push(m.rate);
        hub.stop().await;

        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let listen = format!("127.0.0.1:{port}");
        let hub = super::spawn_hub(
            hub_bin,
            work,
            &format!("hub-metrics-on-{round}"),
            pki,
            &[("RATING_HUB__OPS__LISTEN", listen.clone())],
        )
        .await?;
        let ch = super::channels(pki, &hub.url, 4).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let scraper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let client = reqwest::Client::new();
                let mut scrapes = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = client.get(format!("http://{listen}/metrics")).send().await
                        && r.status().is_success()
                    {
                        let _ = r.bytes().await;
                        scrapes += 1;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                scrapes
            })
        };
        let m = super::closed_loop(&ch, &format!("m-on-{round}"), 8, 100, secs).await;
        stop.store(true, Ordering::Relaxed);
        let scrapes = scraper.await?;
        let m = m?;
        anyhow::ensure!(scrapes > 0, "the metrics were never scraped");
        eprintln!(
            "metrics on, scraped {scrapes} times: {:.0} ratings/s",
            m.rate
        );
        on.push(m.rate);
        hub.stop().await;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    Ok((mean(&off), mean(&on)))
}

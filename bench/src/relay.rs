//! The relay scenarios: upstream configuration, delays from commit to receipt, the probe.

use super::*;

/// The hub's config for relaying to the bench's sink: no rate limit in the way, batches of
/// up to `batch_size`, `in_flight` at once.
pub(crate) fn sink_env(
    sink_url: &str,
    batch_size: u32,
    in_flight: u32,
) -> Vec<(&'static str, String)> {
    vec![
        ("RATING_HUB__UPSTREAMS__SINK__KIND", "grpc".into()),
        ("RATING_HUB__UPSTREAMS__SINK__ENDPOINT", sink_url.into()),
        (
            "RATING_HUB__UPSTREAMS__SINK__RETRY_SCHEDULE_MS",
            "[50, 100, 200, 500]".into(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__RECORDS_PER_SEC",
            "1000000".into(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__RECORDS_BURST",
            "1000000".into(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__REQUESTS_PER_SEC",
            "100000".into(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__REQUESTS_BURST",
            "100000".into(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__BATCH_SIZE",
            batch_size.to_string(),
        ),
        (
            "RATING_HUB__UPSTREAMS__SINK__IN_FLIGHT",
            in_flight.to_string(),
        ),
    ]
}

/// Ack → sink receipt per rating (ms), sorted.
pub(crate) fn relay_delays(sink: &Sink, acks: &HashMap<String, Instant>) -> Vec<f64> {
    let got = sink.received.lock().unwrap();
    let mut delays: Vec<f64> = acks
        .iter()
        .filter_map(|(id, at)| {
            got.get(id)
                .map(|r| r.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    delays.sort_by(f64::total_cmp);
    delays
}

pub(crate) async fn relay_probe(
    hub_bin: &Path,
    rate: f64,
    secs: u64,
    env: &[String],
) -> anyhow::Result<()> {
    let hub_bin = &hub_bin.canonicalize()?;
    let work = std::env::temp_dir().join(format!("rating-bench-relay-{}", std::process::id()));
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let (sink_url, sink) = start_sink().await?;
    let mut all = sink_env(&sink_url, 500, 4);
    all.extend(parse_env(env)?);
    let hub = spawn_hub(hub_bin, &work, "hub", &pki, &all).await?;
    eprintln!("hub pid {}", hub.child.id().unwrap_or(0));
    let ch = channels(&pki, &hub.url, 4).await?;
    let (steady, acks) = open_loop(&ch, "relay", rate, secs, None).await?;
    wait_delivered(&sink, acks.len(), Duration::from_secs(60)).await?;
    let d = relay_delays(&sink, &acks);
    hub.stop().await;
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{:.0} ratings/s (ack p50/p99 {:.1}/{:.1} ms); relay delay p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} ms",
        steady.rate,
        steady.p50_ms,
        steady.p99_ms,
        percentile(&d, 0.5),
        percentile(&d, 0.9),
        percentile(&d, 0.99),
        d.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

//! The load generator: closed loops of unary calls or batches, streams, and an open loop.

use super::*;

/// Closed loop: `concurrency` callers, each sending `batch` ratings per call, for `secs`.
pub(crate) async fn closed_loop(
    chans: &[Channel],
    tag: &str,
    concurrency: usize,
    batch: usize,
    secs: u64,
) -> anyhow::Result<Measured> {
    let org = org();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for w in 0..concurrency {
        let mut client = IngestServiceClient::new(chans[w % chans.len()].clone())
            .max_decoding_message_size(64 << 20);
        let (org, tag, counter) = (org.clone(), tag.to_owned(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let now = now_micros();
                let ratings: Vec<_> = (0..batch)
                    .map(|_| rating(&tag, counter.fetch_add(1, Ordering::Relaxed), &org, now))
                    .collect();
                let t = Instant::now();
                let r = client
                    .submit_ratings(pb::SubmitRatingsRequest { ratings })
                    .await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
                anyhow::ensure!(
                    r.into_inner()
                        .results
                        .iter()
                        .all(|x| x.outcome == pb::Outcome::Accepted as i32),
                    "not accepted"
                );
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let count = lat.len() as u64 * batch as u64;
    Ok(Measured {
        rate: count as f64 / elapsed,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        count,
        cpu: None,
    })
}

/// `streams` StreamRatings calls sending `per_stream` ratings each as fast as acks allow.
pub(crate) async fn streamed(
    chans: &[Channel],
    tag: &str,
    streams: usize,
    per_stream: u64,
) -> anyhow::Result<Measured> {
    let org = org();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..streams {
        let mut client = IngestServiceClient::new(chans[s % chans.len()].clone());
        let (org, tag) = (org.clone(), format!("{tag}{s}"));
        tasks.push(tokio::spawn(async move {
            let now = now_micros();
            let out = tokio_stream::iter((0..per_stream).map(move |n| pb::StreamRatingsRequest {
                rating: Some(rating(&tag, n, &org, now)),
            }));
            let mut acks = client.stream_ratings(out).await?.into_inner();
            let mut n = 0u64;
            while let Some(a) = acks.next().await {
                anyhow::ensure!(
                    a?.result.map(|r| r.outcome) == Some(pb::Outcome::Accepted as i32),
                    "not accepted"
                );
                n += 1;
            }
            anyhow::ensure!(n == per_stream, "{n} acks for {per_stream}");
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let count = streams as u64 * per_stream;
    Ok(Measured {
        rate: count as f64 / start.elapsed().as_secs_f64(),
        count,
        ..Default::default()
    })
}

/// Open loop at `rate` calls/s (one rating each) for `secs`; returns ack instants by hub id.
pub(crate) async fn open_loop(
    chans: &[Channel],
    tag: &str,
    rate: f64,
    secs: u64,
    stop: Option<Arc<AtomicBool>>,
) -> anyhow::Result<(Measured, HashMap<String, Instant>)> {
    let org = org();
    let acks = Arc::new(Mutex::new(HashMap::new()));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut n = 0u64;
    let mut tasks = Vec::new();
    while Instant::now() < end && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
        let scheduled = tick.tick().await;
        let mut client = IngestServiceClient::new(chans[n as usize % chans.len()].clone());
        let r = rating(tag, n, &org, now_micros());
        n += 1;
        let (acks, lat) = (acks.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let res = client
                .submit_ratings(pb::SubmitRatingsRequest { ratings: vec![r] })
                .await?;
            let now = Instant::now();
            let id = res.into_inner().results[0].hub_id.clone();
            acks.lock().unwrap().insert(id, now);
            lat.lock()
                .unwrap()
                .push((now - scheduled.into_std()).as_secs_f64() * 1000.0);
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut l = lat.lock().unwrap().clone();
    l.sort_by(f64::total_cmp);
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    Ok((
        Measured {
            rate: n as f64 / start.elapsed().as_secs_f64(),
            p50_ms: percentile(&l, 0.5),
            p99_ms: percentile(&l, 0.99),
            count: n,
            cpu: None,
        },
        acks,
    ))
}

//! The scenarios `rating-bench run` measures, each a function named for it, in the order
//! the run takes them: baseline A; SQLite ingest against A, B and B-lean (with the CPU rows);
//! relay delay, peak RSS, drain and Subscribe; PostgreSQL ingest against B on PostgreSQL;
//! the public site under load; the cost of serving metrics; a platform profile's drain.
//! Each returns its report rows ([`Row`]); [`run`] puts them in the report's order and
//! [`write_report`] writes it. `probe` is the quick single-scenario command.

use super::*;

/// What every scenario of a run shares.
struct Bench<'a> {
    hub_bin: &'a Path,
    work: PathBuf,
    pki: PathBuf,
    secs: u64,
    concurrency: usize,
}

/// Runs every scenario and writes the report (`<out>.md`, `<out>.json`).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    hub_bin: &Path,
    out: &Path,
    secs: u64,
    concurrency: usize,
    outage_secs: u64,
    command: &str,
    pg_url: Option<&str>,
) -> anyhow::Result<()> {
    // The hub runs in its own working directory: resolve its path first.
    let hub_bin = &hub_bin.canonicalize().map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (build it: cargo build --release)",
            hub_bin.display()
        )
    })?;
    let work = std::env::temp_dir().join(format!("rating-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let b = Bench {
        hub_bin,
        work,
        pki,
        secs,
        concurrency,
    };
    let echo = baseline_a(&b).await?;
    let (mut rows, unary) = sqlite_ingest(&b, &echo).await?;
    let relay_rows = relay_drain_and_subscribe(&b, unary.rate, outage_secs).await?;
    // PostgreSQL after the relay scenarios: its server's background work after these
    // (checkpoints, autovacuum of the tables just filled) would otherwise share the 2 cores
    // and the disk with the SQLite relay and drain rows. Its rows still go beside the SQLite
    // ingest rows in the report.
    if let Some(admin) = pg_url {
        rows.extend(postgres_ingest(&b, admin, &echo).await?);
    }
    rows.extend(relay_rows);
    rows.push(public_site_under_load(&b).await?);
    rows.push(metrics_served(&b).await?);
    rows.push(national_profile_drain(&b).await?);
    let _ = std::fs::remove_dir_all(&b.work);
    write_report(out, command, &rows)
}

/// Baseline A, a bare tonic server that stores nothing: unary at the run's concurrency,
/// and the same batches and streams the hub gets.
struct Echo {
    unary: Measured,
    batched: Measured,
    stream: Measured,
}

async fn baseline_a(b: &Bench<'_>) -> anyhow::Result<Echo> {
    let (pki, concurrency, secs) = (&b.pki, b.concurrency, b.secs);
    let echo_child = spawn_echo(pki).await?;
    let echo_ch = channels(pki, &echo_child.url, 4).await?;
    let echo_pid = echo_child.child.id();
    let echo_unary = metered(
        echo_pid,
        closed_loop(&echo_ch, "echo", concurrency, 1, secs),
    )
    .await?;
    // The same batches against A: what the load generator itself can send on this machine.
    let echo_batched = closed_loop(&echo_ch, "echo-b", 8, 100, secs).await?;
    let echo_stream = streamed(&echo_ch, "echo-s", 4, 25_000).await?;
    echo_child.stop().await;
    eprintln!("baseline A: {:.0} calls/s", echo_unary.rate);
    Ok(Echo {
        unary: echo_unary,
        batched: echo_batched,
        stream: echo_stream,
    })
}

/// The hub on SQLite: unary calls, batches of 100 and streams, against A, B (the hub's
/// schema, raw batched inserts), B-lean (the storage floor) and B at the unary group size;
/// with the CPU rows. Returns the rows and the unary rate (the relay scenario runs at half
/// of it).
async fn sqlite_ingest(b: &Bench<'_>, echo: &Echo) -> anyhow::Result<(Vec<Row>, Measured)> {
    let (hub_bin, work, pki, secs, concurrency) =
        (b.hub_bin, &b.work, &b.pki, b.secs, b.concurrency);
    let Echo {
        unary: echo_unary,
        batched: echo_batched,
        stream: echo_stream,
    } = echo;
    let mut rows = Vec::new();
    let f = |x: f64| format!("{x:.0}");
    let hub = spawn_hub(hub_bin, work, "hub-a", pki, &[]).await?;
    let ch = channels(pki, &hub.url, 4).await?;
    let run = IngestRun::measure(&ch, hub.child.id(), None, "", "hub", concurrency, secs).await?;
    hub.stop().await;
    let plan = run.raw_plan();
    let IngestRun {
        unary,
        batched,
        stream,
    } = run;
    let [raw, raw_s] = same_table_sizes(raw_sqlite(work, &plan, 100, false).await?)?;
    eprintln!(
        "baseline B: {:.0} rows/s (batches' rows), {:.0} rows/s (streams' rows)",
        raw.rate, raw_s.rate
    );
    // B-lean (#23): the same rows into the leanest table that still enforces idempotency,
    // the storage floor the hub's schema is measured against.
    let [lean, lean_s] = same_table_sizes(raw_sqlite(&work.join("lean"), &plan, 100, true).await?)?;
    eprintln!(
        "baseline B-lean: {:.0} rows/s (batches' rows), {:.0} rows/s (streams' rows)",
        lean.rate, lean_s.rate
    );
    // The storage ceiling at the group size unary load produces: 64 callers in flight give
    // groups of about 32 (half are in the group being written, half wait for the next).
    let raw_unary = raw_unary_rows(&work.join("b32"), unary.count, UNARY_GROUP).await?;
    eprintln!(
        "baseline B at batch {UNARY_GROUP}: {:.0} rows/s",
        raw_unary.rate
    );
    // And at the largest group the unary callers can make (all of them in one), for the
    // unary ceiling: B's CPU per row falls as batches grow.
    let raw_all = raw_unary_rows(&work.join("b-all"), unary.count, concurrency).await?;

    rows.push(Row {
        scenario: format!(
            "Unary SubmitRatings, 1 rating/call, {concurrency} in flight (calls/s; p50/p99 ms)"
        ),
        value: format!(
            "{} ({:.1}/{:.1})",
            f(unary.rate),
            unary.p50_ms,
            unary.p99_ms
        ),
        baseline: format!(
            "A: {} ({:.1}/{:.1})",
            f(echo_unary.rate),
            echo_unary.p50_ms,
            echo_unary.p99_ms
        ),
        ratio: format!("{:.2}", unary.rate / echo_unary.rate),
        target: "≥ 0.6".into(),
    });
    rows.push(Row {
        scenario: format!(
            "Unary, against the storage ceiling at its group size (calls/s vs B rows/s at batch {UNARY_GROUP})"
        ),
        value: f(unary.rate),
        baseline: format!("B: {} rows/s at batch {UNARY_GROUP}", f(raw_unary.rate)),
        ratio: format!("{:.2}", unary.rate / raw_unary.rate),
        target: "—".into(),
    });
    rows.extend(cpu_rows(
        echo_unary,
        &unary,
        (&raw_unary, &raw_all, concurrency),
        &batched,
        &raw,
        preparation_cpu_micros(&work.join("prep"))?,
    ));
    rows.push(Row {
        scenario: "SubmitRatings, batches of 100, 8 in flight (ratings/s)".into(),
        value: f(batched.rate),
        baseline: format!(
            "B: {} rows/s at batch 100; A (echo), same batches: {}",
            f(raw.rate),
            f(echo_batched.rate)
        ),
        ratio: format!("{:.2}", batched.rate / raw.rate),
        target: "≥ 0.8".into(),
    });
    rows.push(Row {
        scenario: "StreamRatings, 4 streams × 25,000 (ratings/s)".into(),
        value: f(stream.rate),
        baseline: format!(
            "B: {} rows/s; A (echo): {}",
            f(raw_s.rate),
            f(echo_stream.rate)
        ),
        ratio: format!("{:.2}", stream.rate / raw_s.rate),
        target: "≥ 0.8".into(),
    });

    rows.push(Row {
        scenario: "SubmitRatings, batches of 100, 8 in flight, against B-lean (ratings/s)".into(),
        value: f(batched.rate),
        baseline: format!("B-lean: {} rows/s at batch 100", f(lean.rate)),
        ratio: format!("{:.2}", batched.rate / lean.rate),
        target: "≥ 0.5".into(),
    });
    rows.push(Row {
        scenario: "StreamRatings, 4 streams × 25,000, against B-lean (ratings/s)".into(),
        value: f(stream.rate),
        baseline: format!("B-lean: {} rows/s", f(lean_s.rate)),
        ratio: format!("{:.2}", stream.rate / lean_s.rate),
        target: "≥ 0.5".into(),
    });

    Ok((rows, unary))
}

/// Relay delay at half the unary capacity and the hub's peak RSS after it; the drain after
/// an upstream outage of `outage_secs`; Subscribe from 0 over everything stored.
async fn relay_drain_and_subscribe(
    b: &Bench<'_>,
    unary_rate: f64,
    outage_secs: u64,
) -> anyhow::Result<Vec<Row>> {
    let (hub_bin, work, pki, secs) = (b.hub_bin, &b.work, &b.pki, b.secs);
    let mut rows = Vec::new();
    let f = |x: f64| format!("{x:.0}");
    let (sink_url, sink) = start_sink().await?;
    let hub = spawn_hub(hub_bin, work, "hub-b", pki, &sink_env(&sink_url, 500, 4)).await?;
    let ch = channels(pki, &hub.url, 4).await?;
    let half = unary_rate / 2.0;
    let (steady, acks) = open_loop(&ch, "relay", half, secs, None).await?;
    wait_delivered(&sink, acks.len(), Duration::from_secs(60)).await?;
    let delays = relay_delays(&sink, &acks);
    let rss = hub.peak_rss_mib();
    eprintln!(
        "relay delay p50 {:.1} ms p99 {:.1} ms; peak RSS {rss:.1} MiB",
        percentile(&delays, 0.5),
        percentile(&delays, 0.99)
    );
    rows.push(Row {
        scenario: format!("Relay delay, commit → upstream receipt, open loop at half capacity ({} ratings/s) (p50/p99 ms)", f(steady.rate)),
        value: format!("{:.1}/{:.1}", percentile(&delays, 0.5), percentile(&delays, 0.99)),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "p99 ≤ 25 ms".into(),
    });
    rows.push(Row {
        scenario: "Peak RSS of the hub after the half-capacity run (MiB)".into(),
        value: format!("{rss:.1}"),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "≤ 64 MiB".into(),
    });

    sink.down.store(true, Ordering::Relaxed);
    let before = sink.received.lock().unwrap().len();
    let (during, _) = open_loop(&ch, "outage", half, outage_secs, None).await?;
    let backlog =
        (before + during.count as usize).saturating_sub(sink.received.lock().unwrap().len());
    sink.down.store(false, Ordering::Relaxed);
    let t = Instant::now();
    wait_delivered(
        &sink,
        before + during.count as usize,
        Duration::from_secs(120),
    )
    .await?;
    let drain_rate = backlog as f64 / t.elapsed().as_secs_f64();
    eprintln!(
        "drain: {backlog} in {:.2}s = {drain_rate:.0}/s",
        t.elapsed().as_secs_f64()
    );
    rows.push(Row {
        scenario: format!("Drain after a {outage_secs}-second upstream outage ({backlog} ratings backlog) (ratings/s)"),
        value: f(drain_rate),
        baseline: format!("steady ingest {} ratings/s", f(during.rate)),
        ratio: format!("{:.1}", drain_rate / during.rate),
        target: "≥ 3".into(),
    });
    let total = (acks.len() + during.count as usize) as u64;
    let sub = subscribe_all(&ch, total).await?;
    rows.push(Row {
        scenario: format!("Subscribe from 0 over {total} ratings (ratings/s)"),
        value: f(sub.rate),
        baseline: "—".into(),
        ratio: "—".into(),
        target: "—".into(),
    });
    hub.stop().await;

    Ok(rows)
}

/// The same ingest scenarios with PostgreSQL as the hub's database (a durable server
/// `admin` names; the bench creates its databases there), against a raw batched insert
/// into the hub's PostgreSQL schema (B on PostgreSQL).
async fn postgres_ingest(b: &Bench<'_>, admin: &str, echo: &Echo) -> anyhow::Result<Vec<Row>> {
    let (hub_bin, work, pki, secs, concurrency) =
        (b.hub_bin, &b.work, &b.pki, b.secs, b.concurrency);
    let echo_unary = &echo.unary;
    let mut pg_rows = Vec::new();
    let f = |x: f64| format!("{x:.0}");
    let db = create_database(admin, "bench_hub").await?;
    let env = [("RATING_HUB__STORAGE__URL", db)];
    let hub = spawn_hub(hub_bin, work, "hub-pg", pki, &env).await?;
    let ch = channels(pki, &hub.url, 4).await?;
    let run = IngestRun::measure(
        &ch,
        hub.child.id(),
        Some(admin),
        "pg-",
        "hub on PostgreSQL",
        concurrency,
        secs,
    )
    .await?;
    hub.stop().await;
    let plan = run.raw_plan();
    let IngestRun {
        unary: pg_unary,
        batched: pg_batched,
        stream: pg_stream,
    } = run;
    let [raw_pg, raw_pg_s] = same_table_sizes(raw_postgres(admin, work, &plan, 100, false).await?)?;
    eprintln!(
        "baseline B on PostgreSQL: {:.0} rows/s (batches' rows), {:.0} rows/s (streams' rows)",
        raw_pg.rate, raw_pg_s.rate
    );
    pg_rows.push(Row {
        scenario: format!(
            "PostgreSQL: unary SubmitRatings, 1 rating/call, {concurrency} in flight (calls/s; p50/p99 ms)"
        ),
        value: format!(
            "{} ({:.1}/{:.1})",
            f(pg_unary.rate),
            pg_unary.p50_ms,
            pg_unary.p99_ms
        ),
        baseline: format!("A: {}", f(echo_unary.rate)),
        ratio: format!("{:.2}", pg_unary.rate / echo_unary.rate),
        target: "—".into(),
    });
    pg_rows.push(Row {
        scenario: "PostgreSQL: SubmitRatings, batches of 100, 8 in flight (ratings/s)".into(),
        value: f(pg_batched.rate),
        baseline: format!("B (PostgreSQL): {} rows/s at batch 100", f(raw_pg.rate)),
        ratio: format!("{:.2}", pg_batched.rate / raw_pg.rate),
        target: "≥ 0.8".into(),
    });
    pg_rows.push(Row {
        scenario: "PostgreSQL: StreamRatings, 4 streams × 25,000 (ratings/s)".into(),
        value: f(pg_stream.rate),
        baseline: format!("B (PostgreSQL): {} rows/s", f(raw_pg_s.rate)),
        ratio: format!("{:.2}", pg_stream.rate / raw_pg_s.rate),
        target: "≥ 0.8".into(),
    });
    Ok(pg_rows)
}

/// The public site (评价结果公开) under a citizen's load at 200 requests/s, against ingest
/// alone.
async fn public_site_under_load(b: &Bench<'_>) -> anyhow::Result<Row> {
    let (hub_bin, work, pki, secs) = (b.hub_bin, &b.work, &b.pki, b.secs);
    let f = |x: f64| format!("{x:.0}");
    let (alone, loaded, pages, failed) = public_pages(hub_bin, work, pki, secs, 200.0).await?;
    Ok(Row {
        scenario: "SubmitRatings, batches of 100, 8 in flight, while a client loads the public pages at 200 requests/s (ratings/s; pages p50/p99 ms)".into(),
        value: format!(
            "{} (pages {:.1}/{:.1}; {} loaded, {failed} failed)",
            f(loaded.rate),
            percentile(&pages, 0.5),
            percentile(&pages, 0.99),
            pages.len()
        ),
        baseline: format!("the same ingest alone: {}", f(alone)),
        ratio: format!("{:.2}", loaded.rate / alone),
        target: "≥ 0.9".into(),
    })
}

/// Metrics served and scraped every second, against the operations listener off.
async fn metrics_served(b: &Bench<'_>) -> anyhow::Result<Row> {
    let (hub_bin, work, pki, secs) = (b.hub_bin, &b.work, &b.pki, b.secs);
    let f = |x: f64| format!("{x:.0}");
    let (off, on) = metrics_cost::run(hub_bin, work, pki, secs).await?;
    Ok(Row {
        scenario: "SubmitRatings, batches of 100, 8 in flight, with /metrics served and scraped every second (ratings/s; mean of two runs)".into(),
        value: f(on),
        baseline: format!("the operations listener off: {}", f(off)),
        ratio: format!("{:.2}", on / off),
        target: "≥ 0.97".into(),
    })
}

/// An http-json upstream's drain with the national profile (SM2/SM4 envelope), against the
/// plain inline mapping.
async fn national_profile_drain(b: &Bench<'_>) -> anyhow::Result<Row> {
    let f = |x: f64| format!("{x:.0}");
    let (plain, national) = relay_profiles::run(b.hub_bin, 20_000).await?;
    Ok(Row {
        scenario: "Relay drain to an http-json platform, 20,000 stored ratings, national profile: SM2-signed token, SM4 payload under an SM2-wrapped key, SM2 signature (ratings/s)".into(),
        value: f(national),
        baseline: format!("the plain inline mapping (a JSON list): {}", f(plain)),
        ratio: format!("{:.2}", national / plain),
        target: "report".into(),
    })
}

/// Writes the report: the Markdown table (keeping the hand-written notes below it in an
/// existing `<out>.md`) and the JSON, and prints the Markdown.
fn write_report(out: &Path, command: &str, rows: &[Row]) -> anyhow::Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut json = serde_json::Map::new();
    let date = String::from_utf8(
        std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()?
            .stdout,
    )?;
    // The commit measured (with "+changes" when the tree differs from it).
    let commit = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty=+changes"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let mut md = format!(
        "# Benchmarks\n\nMachine: {}. Date: {}. Commit: {commit}. Command: `{command}`.\n\nEach row is measured in the same run as its baseline: \
         A is a bare tonic server with the same protos and mTLS that stores nothing; B is the same rows (each rating, and \
         the case each bad rating opens) written with one multi-row INSERT per table per batch and one transaction per batch, \
         into SQLite with the hub's schema and its writer's pragmas (WAL, synchronous=FULL); B (PostgreSQL) is the same into \
         the hub's PostgreSQL schema on the same durable server (fsync and synchronous_commit on), which the PostgreSQL \
         rows of the hub use too. B-lean is the same rows into the leanest table that still enforces idempotency (the feed position as primary \
         key, the (source, key) unique index, the body and sealed blob), same pragmas and batches: the floor the hub's schema is measured \
         against. B does no look-ups, no validation and no gRPC: it is the storage ceiling. B inserts as many rows as the hub \
         scenario it is compared with stored, into a table of the same size: the rows of the scenarios before it go in first, untimed \
         (inserts slow down as a table grows). The hub runs as its own release \
         process; the load generator and the fake upstream share the machine's 2 cores with it. \
         CPU is user plus system time from /proc over each scenario, per process (all its threads): A and the hub in \
         their own processes; the load generator, B and the timing of the hub's validation and sealing (its own code, \
         called in-process on the same ratings) in the bench's.\n\n\
         | scenario | rating-hub | baseline | ratio | target |\n|---|---|---|---|---|\n",
        machine(),
        date.trim()
    );
    for r in rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.scenario, r.value, r.baseline, r.ratio, r.target
        ));
        json.insert(r.scenario.clone(), serde_json::json!({"value": r.value, "baseline": r.baseline, "ratio": r.ratio, "target": r.target}));
    }
    let md_path = out.with_extension("md");
    let existing = std::fs::read_to_string(&md_path).unwrap_or_default();
    // Keep the hand-written notes below the table.
    if let Some(notes) = existing
        .split_once("\n## ")
        .map(|(_, rest)| format!("\n## {rest}"))
    {
        md.push_str(&notes);
    }
    std::fs::write(&md_path, md)?;
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_string_pretty(
            &serde_json::json!({"machine": machine(), "date": date.trim(), "commit": commit, "command": command, "rows": json}),
        )?,
    )?;
    println!("{}", std::fs::read_to_string(&md_path)?);
    Ok(())
}

/// The ingest scenarios, one after another on one hub (and so on one growing table).
pub(crate) struct IngestRun {
    unary: Measured,
    batched: Measured,
    stream: Measured,
}

impl IngestRun {
    /// `prefix` keeps the ratings' source keys apart from other runs' on the same database;
    /// `label` names the hub in the progress lines.
    /// `hub` is the hub's pid, for its CPU; `pg_admin`, for a hub on PostgreSQL, the server
    /// to checkpoint before each scenario ([`pg_checkpoint`]).
    async fn measure(
        ch: &[Channel],
        hub: Option<u32>,
        pg_admin: Option<&str>,
        prefix: &str,
        label: &str,
        concurrency: usize,
        secs: u64,
    ) -> anyhow::Result<Self> {
        pg_checkpoint(pg_admin).await?;
        let unary = metered(
            hub,
            closed_loop(ch, &format!("{prefix}unary"), concurrency, 1, secs),
        )
        .await?;
        eprintln!("{label}, unary: {:.0} calls/s", unary.rate);
        pg_checkpoint(pg_admin).await?;
        let batched = metered(
            hub,
            closed_loop(ch, &format!("{prefix}batch"), 8, 100, secs),
        )
        .await?;
        eprintln!("{label}, batches: {:.0} ratings/s", batched.rate);
        pg_checkpoint(pg_admin).await?;
        let stream = metered(hub, streamed(ch, &format!("{prefix}stream"), 4, 25_000)).await?;
        eprintln!("{label}, streams: {:.0} ratings/s", stream.rate);
        Ok(Self {
            unary,
            batched,
            stream,
        })
    }

    /// Baseline B against these scenarios: the unary scenario's rows untimed, then the
    /// batch scenario's and the stream scenario's rows, each timed.
    fn raw_plan(&self) -> RawPlan {
        RawPlan {
            prefill: self.unary.count,
            segments: vec![self.batched.count, self.stream.count],
        }
    }
}

pub(crate) async fn subscribe_all(chans: &[Channel], total: u64) -> anyhow::Result<Measured> {
    let mut sync =
        rating_hub::pb::v1::sync_service_client::SyncServiceClient::new(chans[0].clone())
            .max_decoding_message_size(64 << 20);
    let start = Instant::now();
    let mut s = sync
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await?
        .into_inner();
    let mut n = 0;
    while n < total {
        s.message()
            .await?
            .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
        n += 1;
    }
    Ok(Measured {
        rate: n as f64 / start.elapsed().as_secs_f64(),
        count: n,
        ..Default::default()
    })
}

/// `rating-bench probe`: closed-loop SubmitRatings against baseline A only, printed.
pub(crate) async fn probe(
    hub_bin: &Path,
    secs: u64,
    concurrency: usize,
    batch: usize,
    env: &[String],
) -> anyhow::Result<()> {
    let hub_bin = &hub_bin.canonicalize()?;
    let env = parse_env(env)?;
    let work = std::env::temp_dir().join(format!("rating-bench-probe-{}", std::process::id()));
    let pki = work.join("certs/dev");
    rating_hub::pki::init_dev(&pki)?;
    let echo_child = spawn_echo(&pki).await?;
    let echo_ch = channels(&pki, &echo_child.url, 4).await?;
    let a = metered(
        echo_child.child.id(),
        closed_loop(&echo_ch, "echo", concurrency, batch, secs),
    )
    .await?;
    echo_child.stop().await;
    let hub = spawn_hub(hub_bin, &work, "hub", &pki, &env).await?;
    eprintln!("hub pid {}", hub.child.id().unwrap_or(0));
    let ch = channels(&pki, &hub.url, 4).await?;
    let u = metered(
        hub.child.id(),
        closed_loop(&ch, "probe", concurrency, batch, secs),
    )
    .await?;
    hub.stop().await;
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "A: {:.0} ratings/s ({:.1}/{:.1} ms per call); hub: {:.0} ratings/s ({:.1}/{:.1} ms); ratio {:.2}",
        a.rate,
        a.p50_ms,
        a.p99_ms,
        u.rate,
        u.p50_ms,
        u.p99_ms,
        u.rate / a.rate
    );
    for (name, m) in [("A", &a), ("hub", &u)] {
        if let (Some(load), Some(server), Some(cpu)) =
            (m.cpu_micros(|c| c.bench), m.cpu_micros(|c| c.server), m.cpu)
        {
            println!(
                "{name}: CPU per call {load:.0} µs load generator + {server:.0} µs server; {:.2} cores idle",
                cpu.idle
            );
        }
    }
    Ok(())
}

pub(crate) async fn wait_delivered(sink: &Sink, n: usize, limit: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + limit;
    while sink.received.lock().unwrap().len() < n {
        anyhow::ensure!(
            Instant::now() < end,
            "the sink got {} of {n} within {limit:?}",
            sink.received.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

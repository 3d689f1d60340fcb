//! `rating-bench`: measures rating-hub against baselines in the same run, on the same machine.
//!
//! - the hub under test runs as its own process (the release binary), as in production;
//! - baseline A: a bare tonic server with the same protos and mTLS settings that stores nothing
//!   (`rating-bench echo`, also its own process);
//! - baseline B: a raw batched insert of the same rows into SQLite with the same schema and
//!   pragmas — the storage ceiling;
//! - a fake upstream sink in this process that timestamps receipt;
//! - CPU per call and per row of each process (A, the hub, this one), read from /proc, and
//!   from them the unary rate this machine allows at all: the load generator's and A's work,
//!   the hub's validation and sealing, and B's storage of one row, with nothing else.
//!
//! Writes a Markdown table and JSON (see docs/benchmarks.md). Run with `scripts/bench`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Response, Status};

mod baseline_a;
mod baseline_b;
mod cpu;
mod load;
mod log_proofs;
mod metrics_cost;
mod public_site;
mod relay;
mod relay_profiles;
mod report;
mod sink;
mod soak;
mod stats;

use baseline_a::*;
use baseline_b::*;
use cpu::*;
use load::*;
use public_site::*;
use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rating_hub::pb::v1::ingest_service_server::{IngestService, IngestServiceServer};
use relay::*;
use report::*;
use sink::*;

#[derive(Parser)]
#[command(about = "rating-hub benchmarks against same-run baselines")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every scenario and write <out>.md and <out>.json.
    Run {
        /// The rating-hub release binary.
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value = "docs/benchmarks")]
        out: PathBuf,
        /// Seconds per timed scenario.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Closed-loop concurrency for unary calls.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds the upstream is down in the drain scenario.
        #[arg(long, default_value_t = 30)]
        outage_secs: u64,
        /// The command line to record in the report.
        #[arg(long, default_value = "scripts/bench")]
        command: String,
        /// A PostgreSQL superuser URL: adds the PostgreSQL rows (the bench creates its
        /// databases there). scripts/bench starts a throwaway durable server for it.
        #[arg(long)]
        pg_url: Option<String>,
    },
    /// Only closed-loop SubmitRatings against baseline A, printed, nothing written: a quick
    /// probe while profiling (`perf record -p <hub pid>` meanwhile). `--env KEY=VALUE` sets
    /// hub config, e.g. `--env RATING_HUB__STORAGE__SYNCHRONOUS=normal`.
    Probe {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Ratings per call.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long)]
        env: Vec<String>,
    },
    /// Only the relay-delay scenario (open loop at `rate` ratings/s into a hub relaying to the
    /// sink), printed: a quick probe. `--env KEY=VALUE` sets hub config.
    RelayProbe {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 3000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long)]
        env: Vec<String>,
    },
    /// Only baseline B at one batch size, printed: a quick probe. SQLite, or PostgreSQL with
    /// `--pg-url` (a superuser URL; the bench creates its database there).
    Raw {
        #[arg(long, default_value_t = 50_000)]
        rows: u64,
        /// Rows inserted first, untimed: the table size the timed rows start from.
        #[arg(long, default_value_t = 0)]
        prefill: u64,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        #[arg(long)]
        pg_url: Option<String>,
        /// B-lean instead: the leanest table that still enforces idempotency (feed position
        /// as primary key, the (source, key) unique index, the body), same pragmas.
        #[arg(long)]
        lean: bool,
    },
    /// Only the public-site scenario: batched ingest alone, then while a client loads the
    /// public pages at `page_rate` requests/s, then alone again; printed.
    PublicProbe {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 10)]
        secs: u64,
        #[arg(long, default_value_t = 200.0)]
        page_rate: f64,
    },
    /// Only ingest with metrics served and scraped against the operations listener off,
    /// printed.
    MetricsCost {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 10)]
        secs: u64,
    },
    /// Only the http-json drain with the national profile (SM2/SM4) against the plain
    /// inline mapping, printed.
    RelayProfiles {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 20_000)]
        ratings: u64,
    },
    /// The rating log at scale: proof latency (inclusion and consistency, each verified)
    /// with 10 k ratings stored and then with `ratings`, and the log's bytes on disk per
    /// rating against the ratings' (SQLite), printed.
    LogProbe {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        ratings: u64,
        #[arg(long, default_value_t = 2000)]
        samples: usize,
    },
    /// Statistics and reads at scale (#23): prepares `ratings` ratings of a province (40
    /// organisations, 10 districts, 90 days) in `data` once — a later run with the same
    /// directory reuses them, and adds only what is missing — then measures GetStats and
    /// ExportReport for the quarter (from the counts, and by a scan in the same run),
    /// ListRatings' first page and Pull of 500, printed. 10 M ratings take about 12 minutes
    /// to prepare on 2 cores and 8 GB of disk.
    StatsProbe {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        /// Where the prepared hub lives (its database, certificates).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        ratings: u64,
        #[arg(long, default_value_t = 200)]
        samples: usize,
        /// Then times this many more ratings into the prepared hub and as many into an
        /// empty one (flat growth); 0: not measured.
        #[arg(long, default_value_t = 0)]
        growth: u64,
    },
    /// Baseline A: the same IngestService contract and mTLS, storing nothing.
    Echo {
        #[arg(long)]
        pki: PathBuf,
    },
    /// The kill -9 loop (needs root: its storage is on a tmpfs of its own, filled once):
    /// counts acknowledged, stored and delivered ratings; fails on any loss. See
    /// docs/reliability.md and `scripts/soak`.
    Soak {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        /// "sqlite" or "postgres" (a throwaway server of its own, started with scripts/pg).
        #[arg(long, default_value = "sqlite")]
        backend: String,
        #[arg(long, default_value_t = 20)]
        cycles: u32,
        /// Concurrent callers.
        #[arg(long, default_value_t = 4)]
        writers: usize,
        /// The cycle during which the disk fills for 1.5 s (0: never).
        #[arg(long, default_value_t = 5)]
        fill_at: u32,
        /// Size of the storage's file system, in MiB (RAM: a tmpfs). Large enough for the
        /// whole run's ratings, so only the deliberate fill fills it.
        #[arg(long, default_value_t = 3072)]
        disk_mb: u32,
        /// Where to write the report's Markdown table.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

// ---------------------------------------------------------------- processes and clients

struct Child {
    child: tokio::process::Child,
    url: String,
}

impl Child {
    async fn spawn(mut cmd: tokio::process::Command) -> anyhow::Result<Self> {
        cmd.stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                {
                    return Ok::<_, anyhow::Error>(a.to_owned());
                }
            }
            anyhow::bail!("the process exited before announcing its address")
        })
        .await??;
        // RATING_BENCH_LOG=FILE keeps the process's later log lines (for profiling runs).
        let mut keep = match std::env::var_os("RATING_BENCH_LOG") {
            Some(path) => Some(tokio::fs::File::create(path).await?),
            None => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(f) = keep.as_mut() {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        Ok(Self {
            child,
            url: format!("https://{addr}"),
        })
    }

    /// Peak resident set size (VmHWM) in MiB.
    fn peak_rss_mib(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
    }
}

/// Starts the hub in `work/name`, with the development certificates from `pki`.
async fn spawn_hub(
    bin: &Path,
    work: &Path,
    name: &str,
    pki: &Path,
    env: &[(&str, String)],
) -> anyhow::Result<Child> {
    let dir = work.join(name);
    copy_dir(pki, &dir.join("certs/dev"))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("serve").current_dir(&dir);
    for (k, v) in [
        ("RATING_HUB__SERVER__LISTEN", "127.0.0.1:0"),
        ("RATING_HUB__OPS__LISTEN", "127.0.0.1:0"),
        ("RATING_HUB__LOG__FILTER", "warn,rating_hub::server=info"),
        ("RATING_HUB__LIMITS__MAX_IN_FLIGHT", "100000"),
        ("RATING_HUB__LIMITS__REQUESTS_PER_SEC", "10000000"),
        ("RATING_HUB__LIMITS__REQUESTS_BURST", "10000000"),
        ("RATING_HUB__LIMITS__RATINGS_PER_SEC", "100000000"),
        ("RATING_HUB__LIMITS__RATINGS_BURST", "100000000"),
    ] {
        cmd.env(k, v);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.env_remove("RUST_LOG");
    Child::spawn(cmd).await
}

/// Starts baseline A (this program's `echo` sub-command) with the certificates in `pki`.
async fn spawn_echo(pki: &Path) -> anyhow::Result<Child> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.arg("echo").arg("--pki").arg(pki);
    Child::spawn(cmd).await
}

/// `--env KEY=VALUE` arguments.
fn parse_env(env: &[String]) -> anyhow::Result<Vec<(&str, String)>> {
    env.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k, v.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected KEY=VALUE"))
        })
        .collect()
}

async fn channels(pki: &Path, url: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let read = |f: &str| std::fs::read(pki.join(f));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")?))
        .identity(Identity::from_pem(
            read("dev-admin.pem")?,
            read("dev-admin.key")?,
        ))
        .domain_name("localhost");
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(url.to_owned())?
                .tls_config(tls.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

fn org() -> String {
    rating_hub::domain::codes::credit_code_with_check("11530100MA0000001").expect("valid")
}

/// A unique, valid rating (levels 1–3, so no 差评 reason is needed).
fn rating(tag: &str, n: u64, org: &str, now: i64) -> pb::Rating {
    pb::Rating {
        source_key: format!("{tag}-{n}"),
        channel: pb::Channel::HallDevice as i32,
        level: (n % 3 + 1) as i32,
        target_kind: pb::TargetKind::Item as i32,
        case_number: format!("{tag}-CASE-{n}"),
        item_code: "530100-ITEM-001".into(),
        item_name: "企业设立登记".into(),
        region_code: "530102".into(),
        org_credit_code: org.to_owned(),
        staff_id: "S007".into(),
        rated_at: Some(rating_hub::time::timestamp_from_micros(now)),
        rater: Some(pb::Rater {
            kind: pb::RaterKind::NaturalPerson as i32,
            phone: format!("139{:08}", n % 100_000_000),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn now_micros() -> i64 {
    rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Debug, Clone, Default)]
struct Measured {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    count: u64,
    /// CPU used while it ran, where measured.
    cpu: Option<Cpu>,
}

impl Measured {
    /// Microseconds of CPU per item (call, rating or row) for `cores` of this measurement.
    fn cpu_micros(&self, cores: impl Fn(&Cpu) -> f64) -> Option<f64> {
        let cpu = self.cpu.as_ref()?;
        (self.rate > 0.0).then(|| cores(cpu) * 1e6 / self.rate)
    }
}

/// The mean group the hub's writer commits under the unary scenario (64 callers), measured
/// from its `Group committed.` debug lines: about 31–32 ratings.
const UNARY_GROUP: usize = 32;

/// The ingest scenarios, one after another on one hub (and so on one growing table).
struct IngestRun {
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

async fn subscribe_all(chans: &[Channel], total: u64) -> anyhow::Result<Measured> {
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

#[allow(clippy::too_many_arguments)]
async fn run(
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
    let mut rows: Vec<Row> = Vec::new();
    let mut json = serde_json::Map::new();
    let f = |x: f64| format!("{x:.0}");

    // Baseline A and the hub at the same concurrency.
    let echo_child = spawn_echo(&pki).await?;
    let echo_ch = channels(&pki, &echo_child.url, 4).await?;
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

    let hub = spawn_hub(hub_bin, &work, "hub-a", &pki, &[]).await?;
    let ch = channels(&pki, &hub.url, 4).await?;
    let run = IngestRun::measure(&ch, hub.child.id(), None, "", "hub", concurrency, secs).await?;
    hub.stop().await;
    let plan = run.raw_plan();
    let IngestRun {
        unary,
        batched,
        stream,
    } = run;
    let [raw, raw_s] = same_table_sizes(raw_sqlite(&work, &plan, 100, false).await?)?;
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
        &echo_unary,
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

    let pg_rows_at = rows.len();

    // Relay delay at half capacity, peak RSS, drain after an outage, Subscribe.
    let (sink_url, sink) = start_sink().await?;
    let hub = spawn_hub(hub_bin, &work, "hub-b", &pki, &sink_env(&sink_url, 500, 4)).await?;
    let ch = channels(&pki, &hub.url, 4).await?;
    let half = unary.rate / 2.0;
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

    // PostgreSQL last: its server's background work after these scenarios (checkpoints,
    // autovacuum of the tables just filled) would otherwise share the 2 cores and the disk
    // with the SQLite relay and drain rows. Its rows still go beside the SQLite ingest rows.
    let mut pg_rows = Vec::new();
    // The same ingest scenarios with PostgreSQL as the hub's database, against a raw batched
    // insert into PostgreSQL (baseline B on PostgreSQL), on a durable server.
    if let Some(admin) = pg_url {
        let db = create_database(admin, "bench_hub").await?;
        let env = [("RATING_HUB__STORAGE__URL", db)];
        let hub = spawn_hub(hub_bin, &work, "hub-pg", &pki, &env).await?;
        let ch = channels(&pki, &hub.url, 4).await?;
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
        let [raw_pg, raw_pg_s] =
            same_table_sizes(raw_postgres(admin, &work, &plan, 100, false).await?)?;
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
    }

    // The public site (评价结果公开) under a citizen's load, against ingest alone.
    let (alone, loaded, pages, failed) = public_pages(hub_bin, &work, &pki, secs, 200.0).await?;
    rows.push(Row {
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
    });

    // Metrics served and scraped every second against the operations listener off.
    let (off, on) = metrics_cost::run(hub_bin, &work, &pki, secs).await?;
    rows.push(Row {
        scenario: "SubmitRatings, batches of 100, 8 in flight, with /metrics served and scraped every second (ratings/s; mean of two runs)".into(),
        value: f(on),
        baseline: format!("the operations listener off: {}", f(off)),
        ratio: format!("{:.2}", on / off),
        target: "≥ 0.97".into(),
    });

    // An http-json upstream's drain with the national profile (SM2/SM4 envelope) against
    // the plain inline mapping.
    let (plain, national) = relay_profiles::run(hub_bin, 20_000).await?;
    rows.push(Row {
        scenario: "Relay drain to an http-json platform, 20,000 stored ratings, national profile: SM2-signed token, SM4 payload under an SM2-wrapped key, SM2 signature (ratings/s)".into(),
        value: f(national),
        baseline: format!("the plain inline mapping (a JSON list): {}", f(plain)),
        ratio: format!("{:.2}", national / plain),
        target: "report".into(),
    });

    rows.splice(pg_rows_at..pg_rows_at, pg_rows);
    let _ = std::fs::remove_dir_all(&work);

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
    for r in &rows {
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

async fn probe(
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

async fn wait_delivered(sink: &Sink, n: usize, limit: Duration) -> anyhow::Result<()> {
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

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        std::fs::copy(e.path(), to.join(e.file_name()))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Echo { pki } => echo(&pki).await,
        Cmd::Soak {
            hub_bin,
            backend,
            cycles,
            writers,
            fill_at,
            disk_mb,
            out,
        } => {
            anyhow::ensure!(
                matches!(backend.as_str(), "sqlite" | "postgres"),
                "--backend must be sqlite or postgres"
            );
            soak::soak(soak::SoakPlan {
                hub_bin,
                postgres: backend == "postgres",
                cycles,
                writers,
                fill_at,
                disk_mb,
                out,
            })
            .await
        }
        Cmd::RelayProbe {
            hub_bin,
            rate,
            secs,
            env,
        } => relay_probe(&hub_bin, rate, secs, &env).await,
        Cmd::MetricsCost { hub_bin, secs } => {
            let hub_bin = hub_bin.canonicalize()?;
            let work =
                std::env::temp_dir().join(format!("rating-bench-metrics-{}", std::process::id()));
            let pki = work.join("certs/dev");
            rating_hub::pki::init_dev(&pki)?;
            let (off, on) = metrics_cost::run(&hub_bin, &work, &pki, secs).await?;
            let _ = std::fs::remove_dir_all(&work);
            println!(
                "batches of 100: metrics off {off:.0}/s, served and scraped every second {on:.0}/s, ratio {:.3}",
                on / off
            );
            Ok(())
        }
        Cmd::RelayProfiles { hub_bin, ratings } => {
            let (plain, national) = relay_profiles::run(&hub_bin, ratings).await?;
            println!(
                "http-json drain of {ratings} ratings: plain mapping {plain:.0}/s, national profile (SM2/SM4) {national:.0}/s, ratio {:.2}",
                national / plain
            );
            Ok(())
        }
        Cmd::Raw {
            rows,
            prefill,
            batch,
            pg_url,
            lean,
        } => {
            let work =
                std::env::temp_dir().join(format!("rating-bench-raw-{}", std::process::id()));
            std::fs::create_dir_all(&work)?;
            let plan = RawPlan {
                prefill,
                segments: vec![rows],
            };
            let m = match pg_url {
                Some(admin) => raw_postgres(&admin, &work, &plan, batch, lean).await,
                None => raw_sqlite(&work, &plan, batch, lean).await,
            };
            let _ = std::fs::remove_dir_all(&work);
            let [m] = same_table_sizes(m?)?;
            println!(
                "{}: {:.0} rows/s at batch {batch}, {rows} rows after {prefill}{}",
                if lean { "B-lean" } else { "B" },
                m.rate,
                m.cpu_micros(|c| c.bench)
                    .map_or(String::new(), |us| format!(
                        "; {us:.0} µs of this process's CPU per row"
                    ))
            );
            Ok(())
        }
        Cmd::LogProbe {
            hub_bin,
            ratings,
            samples,
        } => log_proofs::log_probe(&hub_bin, ratings, samples).await,
        Cmd::StatsProbe {
            hub_bin,
            data,
            ratings,
            samples,
            growth,
        } => stats::stats_probe(&hub_bin, &data, ratings, samples, growth).await,
        Cmd::Probe {
            hub_bin,
            secs,
            concurrency,
            batch,
            env,
        } => probe(&hub_bin, secs, concurrency, batch, &env).await,
        Cmd::PublicProbe {
            hub_bin,
            secs,
            page_rate,
        } => {
            let hub_bin = hub_bin.canonicalize()?;
            let work = std::env::temp_dir().join(format!("rating-bench-{}", std::process::id()));
            let pki = work.join("certs/dev");
            rating_hub::pki::init_dev(&pki)?;
            let (alone, loaded, pages, failed) =
                public_pages(&hub_bin, &work, &pki, secs, page_rate).await?;
            println!(
                "ingest alone {alone:.0} ratings/s; with pages at {page_rate}/s {:.0} ({:.2}); pages p50 {:.1} ms, p99 {:.1} ms, {} loaded, {failed} failed",
                loaded.rate,
                loaded.rate / alone,
                percentile(&pages, 0.5),
                percentile(&pages, 0.99),
                pages.len()
            );
            let _ = std::fs::remove_dir_all(&work);
            Ok(())
        }
        Cmd::Run {
            hub_bin,
            out,
            secs,
            concurrency,
            outage_secs,
            command,
            pg_url,
        } => {
            run(
                &hub_bin,
                &out,
                secs,
                concurrency,
                outage_secs,
                &command,
                pg_url.as_deref(),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_when_the_command_name_has_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 731 269 0 0 20 0 7 0";
        assert_eq!(cpu_ticks(stat), Some(731 + 269));
        assert_eq!(cpu_ticks("4242 (cut) S 1 2"), None);
    }

    /// This thread's time on a CPU in seconds, from the scheduler's own count
    /// (`/proc/thread-self/schedstat`, nanoseconds): a clock the meter does not read.
    fn thread_cpu_secs() -> f64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
        s.split_whitespace().next().unwrap().parse::<u64>().unwrap() as f64 / 1e9
    }

    #[test]
    fn the_meter_counts_cpu_this_process_burns() {
        let thread_before = thread_cpu_secs();
        let meter = CpuMeter::start(None);
        // Spin until the scheduler has counted 0.3 s on a CPU for this thread (bounded by
        // wall time).
        let end = Instant::now() + Duration::from_secs(20);
        let mut x = 0u64;
        while thread_cpu_secs() < thread_before + 0.3 {
            assert!(
                Instant::now() < end,
                "0.3 s of CPU not reached in 20 s of spinning"
            );
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_add(i));
            }
        }
        let burnt = thread_cpu_secs() - thread_before;
        let counted = meter.bench_secs().expect("/proc/self/stat");
        let cpu = meter.stop().expect("/proc is readable");
        // The process's count (ticks of 10 ms) covers at least this thread's, less a tick
        // or two of rounding.
        assert!(
            counted >= burnt - 0.03,
            "the meter counted {counted} s of a process that burnt {burnt} s in one thread"
        );
        let wall = meter.at.elapsed().as_secs_f64();
        assert!(
            cpu.bench >= (burnt - 0.03) / wall,
            "{cpu:?}: at least {burnt} s over {wall} s"
        );
        assert_eq!(cpu.server, 0.0, "no server was measured");
    }
}

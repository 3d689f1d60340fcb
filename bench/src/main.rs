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

mod metrics_cost;
mod relay_profiles;
mod soak;

use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rating_hub::pb::v1::ingest_service_server::{IngestService, IngestServiceServer};

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

// ---------------------------------------------------------------- the public site under load

/// Ingest alone and while a client loads the public pages (评价结果公开) at `page_rate`
/// requests/s: (alone, loaded, page latencies sorted in ms, failed pages). Each on a hub of
/// its own, from an empty database, so both write into tables of the same sizes.
async fn public_pages(
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

// ---------------------------------------------------------------- baseline A (echo server)

struct Echo {
    seq: AtomicU64,
}

type Acks = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<pb::StreamRatingsResponse, Status>> + Send>,
>;

fn accepted(index: usize, r: &pb::Rating, seq: u64) -> pb::ItemResult {
    pb::ItemResult {
        index: index as u32,
        source_key: r.source_key.clone(),
        outcome: pb::Outcome::Accepted as i32,
        hub_id: uuid::Uuid::now_v7().to_string(),
        feed_sequence: seq,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl IngestService for Echo {
    async fn submit_ratings(
        &self,
        req: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        let ratings = req.into_inner().ratings;
        let results = ratings
            .iter()
            .enumerate()
            .map(|(i, r)| accepted(i, r, self.seq.fetch_add(1, Ordering::Relaxed) + 1))
            .collect();
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = Acks;

    async fn stream_ratings(
        &self,
        req: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Acks>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            let mut i = 0usize;
            while let Some(Ok(m)) = inbound.next().await {
                let r = m.rating.unwrap_or_default();
                i += 1;
                if tx
                    .send(Ok(pb::StreamRatingsResponse {
                        result: Some(accepted(i - 1, &r, i as u64)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_service_cases(
        &self,
        _: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        Err(Status::unimplemented("echo baseline"))
    }
}

async fn echo(pki: &Path) -> anyhow::Result<()> {
    let read = |f: &str| std::fs::read(pki.join(f));
    let tls = ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            read("server.pem")?,
            read("server.key")?,
        ))
        .client_ca_root(Certificate::from_pem(read("ca.pem")?));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    eprintln!("addr={}", listener.local_addr()?);
    Server::builder()
        .tls_config(tls)?
        .add_service(IngestServiceServer::new(Echo {
            seq: AtomicU64::new(0),
        }))
        // TCP_NODELAY like the hub's listener (`tcp_nodelay` on the builder does not apply
        // to a listener passed in).
        .serve_with_incoming(nodelay(listener))
        .await?;
    Ok(())
}

/// Accepted connections with TCP_NODELAY. With Nagle's algorithm on, a server's small HTTP/2
/// answer can wait for the peer's delayed ACK (40 ms on Linux): that was the relay delay's
/// p99 until the sink set it.
fn nodelay(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

// ---------------------------------------------------------------- fake upstream sink

struct Sink {
    down: AtomicBool,
    received: Mutex<HashMap<String, Instant>>,
}

struct SinkService(Arc<Sink>);

#[tonic::async_trait]
impl IngestService for SinkService {
    async fn submit_ratings(
        &self,
        req: Request<pb::SubmitRatingsRequest>,
    ) -> Result<Response<pb::SubmitRatingsResponse>, Status> {
        if self.0.down.load(Ordering::Relaxed) {
            return Err(Status::unavailable("sink down"));
        }
        let now = Instant::now();
        let ratings = req.into_inner().ratings;
        let mut got = self.0.received.lock().unwrap();
        let results = ratings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                got.entry(r.hub_id.clone()).or_insert(now);
                accepted(i, r, 0)
            })
            .collect();
        Ok(Response::new(pb::SubmitRatingsResponse { results }))
    }

    type StreamRatingsStream = Acks;

    async fn stream_ratings(
        &self,
        _: Request<tonic::Streaming<pb::StreamRatingsRequest>>,
    ) -> Result<Response<Acks>, Status> {
        Err(Status::unimplemented("sink"))
    }

    async fn report_service_cases(
        &self,
        _: Request<pb::ReportServiceCasesRequest>,
    ) -> Result<Response<pb::ReportServiceCasesResponse>, Status> {
        Err(Status::unimplemented("sink"))
    }
}

async fn start_sink() -> anyhow::Result<(String, Arc<Sink>)> {
    let sink = Arc::new(Sink {
        down: AtomicBool::new(false),
        received: Mutex::new(HashMap::new()),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("http://{}", listener.local_addr()?);
    let svc =
        IngestServiceServer::new(SinkService(sink.clone())).max_decoding_message_size(64 << 20);
    // Its own thread and runtime: receipt is timestamped when the upstream gets the batch,
    // not when the load generator's busy runtime gets round to it.
    std::thread::Builder::new()
        .name("sink".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("sink runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("sink listener");
                let _ = Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(nodelay(listener))
                    .await;
            });
        })?;
    Ok((url, sink))
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

// ---------------------------------------------------------------- CPU accounting

/// CPU used over an interval, in cores (CPU seconds per second): by this process (the load
/// generator, or baseline B, which runs in it), by the server process measured (A or the
/// hub), and left idle on the whole machine.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    bench: f64,
    server: f64,
    idle: f64,
}

/// CPU seconds (user + system, all threads) a process has used, from `/proc/<pid>/stat`
/// (`pid` "self" for this one). The kernel counts them in USER_HZ ticks, 100 a second.
fn process_cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(cpu_ticks(&stat)? as f64 / 100.0)
}

/// utime + stime from a `/proc/<pid>/stat` line.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name, which may hold spaces and parentheses: state (field
    // 3) first, so utime and stime (fields 14 and 15) are the 12th and 13th.
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Seconds all cores together have spent idle (idle and iowait), from `/proc/stat`.
fn machine_idle_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    Some((f.get(3)? + f.get(4)?) as f64 / 100.0)
}

/// Starts counting CPU for this process, `server` (a pid) and the machine.
struct CpuMeter {
    at: Instant,
    server: Option<u32>,
    start: Option<(f64, f64, f64)>,
}

impl CpuMeter {
    fn start(server: Option<u32>) -> Self {
        Self {
            at: Instant::now(),
            server,
            start: Self::read(server),
        }
    }

    fn read(server: Option<u32>) -> Option<(f64, f64, f64)> {
        let server = match server {
            Some(pid) => process_cpu_secs(&pid.to_string())?,
            None => 0.0,
        };
        Some((process_cpu_secs("self")?, server, machine_idle_secs()?))
    }

    /// CPU seconds this process used since `start`.
    fn bench_secs(&self) -> Option<f64> {
        Some(process_cpu_secs("self")? - self.start?.0)
    }

    /// The CPU used since `start`, or None where /proc could not be read.
    fn stop(&self) -> Option<Cpu> {
        let (b0, s0, i0) = self.start?;
        let (b1, s1, i1) = Self::read(self.server)?;
        let secs = self.at.elapsed().as_secs_f64();
        Some(Cpu {
            bench: (b1 - b0) / secs,
            server: (s1 - s0) / secs,
            idle: (i1 - i0) / secs,
        })
    }
}

/// Runs `f` with its CPU counted (`server`: the pid of the process it loads).
async fn metered(
    server: Option<u32>,
    f: impl std::future::Future<Output = anyhow::Result<Measured>>,
) -> anyhow::Result<Measured> {
    let meter = CpuMeter::start(server);
    let mut m = f.await?;
    m.cpu = meter.stop();
    Ok(m)
}

/// Closed loop: `concurrency` callers, each sending `batch` ratings per call, for `secs`.
async fn closed_loop(
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
async fn streamed(
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
async fn open_loop(
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
fn relay_delays(sink: &Sink, acks: &HashMap<String, Instant>) -> Vec<f64> {
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

async fn relay_probe(hub_bin: &Path, rate: f64, secs: u64, env: &[String]) -> anyhow::Result<()> {
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

/// The segments of a [`RawPlan`], one per hub scenario compared.
fn same_table_sizes<const N: usize>(m: Vec<Measured>) -> anyhow::Result<[Measured; N]> {
    m.try_into()
        .map_err(|m: Vec<Measured>| anyhow::anyhow!("{} baseline segments, not {N}", m.len()))
}

/// Baseline B's schedule: `prefill` rows inserted untimed, then each segment timed on its
/// own. The hub's scenarios run one after another on one growing table, and inserts get
/// slower as a table grows (more index levels, fewer cached pages), so B inserts the same
/// numbers of rows into a table of the same size as the hub's scenario it is compared with.
struct RawPlan {
    prefill: u64,
    segments: Vec<u64>,
}

/// Unique valid rows for baseline B, built (validated, sealed, encoded) outside the timed
/// part: only inserts are measured.
struct BaselineRows {
    keys: rating_hub::privacy::PiiKeys,
    org: String,
    next: u64,
}

impl BaselineRows {
    fn new(dir: &Path) -> anyhow::Result<Self> {
        let key = dir.join("baseline-pii.key");
        rating_hub::privacy::PiiKeys::create_key_file(&key)?;
        let mut keys = std::collections::BTreeMap::new();
        keys.insert("b".to_string(), key.display().to_string());
        Ok(Self {
            keys: rating_hub::privacy::PiiKeys::load("b", &keys)?,
            org: org(),
            next: 0,
        })
    }

    fn take(&mut self, n: u64) -> Vec<rating_hub::store::NewRating> {
        let requests = self.requests(n);
        self.prepare(&requests)
    }

    /// The next `n` ratings as a load generator would send them.
    fn requests(&mut self, n: u64) -> Vec<pb::Rating> {
        let now = now_micros();
        let start = self.next;
        self.next += n;
        (start..self.next)
            .map(|n| rating("raw", n, &self.org, now))
            .collect()
    }

    /// What the hub does to every rating before storing it: validation into the canonical
    /// rating (with its content hash), then the stored form (rater data sealed, phone tag).
    fn prepare(&self, requests: &[pb::Rating]) -> Vec<rating_hub::store::NewRating> {
        let now = now_micros();
        requests
            .iter()
            .map(|r| {
                let v = rating_hub::domain::parse_rating(r, now, &Default::default(), false)
                    .expect("valid");
                rating_hub::store::NewRating::new(
                    uuid::Uuid::now_v7(),
                    "dev-admin".into(),
                    v,
                    &self.keys,
                    Default::default(),
                )
            })
            .collect()
    }
}

/// CPU per rating of [`BaselineRows::prepare`]: work every rating costs the hub beyond A's
/// and B's (keys in `dir`). None where /proc could not be read.
fn preparation_cpu_micros(dir: &Path) -> anyhow::Result<Option<f64>> {
    const N: u64 = 50_000;
    std::fs::create_dir_all(dir)?;
    let mut rows = BaselineRows::new(dir)?;
    let requests = rows.requests(N);
    let meter = CpuMeter::start(None);
    let prepared = rows.prepare(&requests);
    let cpu = meter.bench_secs();
    drop(prepared);
    Ok(cpu.map(|secs| secs * 1e6 / N as f64))
}

/// Runs a [`RawPlan`] on one connection of either database: one transaction per batch with
/// [`batch_inserts`]. A macro because the generic bounds of sqlx's executors over borrowed
/// binds cost more lines than the loop.
macro_rules! raw_plan {
    ($conn:expr, $db:ty, $rows:expr, $plan:expr, $batch:expr, $pg_admin:expr) => {{
        let (mut conn, mut rows, plan, batch) = ($conn, $rows, $plan, $batch);
        let now = now_micros();
        let mut seq = 0i64;
        let mut out = Vec::new();
        let mut left = plan.prefill;
        let mut timed = plan.segments.iter();
        loop {
            // The prefill in slices of 20,000 rows (memory), then each segment whole.
            let (n, time) = if left > 0 {
                let n = left.min(20_000);
                left -= n;
                (n, false)
            } else if let Some(&n) = timed.next() {
                (n, true)
            } else {
                break;
            };
            let new = rows.take(n);
            if time {
                pg_checkpoint($pg_admin).await?;
            }
            let start = Instant::now();
            let meter = CpuMeter::start(None);
            for chunk in new.chunks(batch) {
                let mut tx = conn.begin().await?;
                for mut qb in batch_inserts::<$db>(chunk, seq, now) {
                    qb.build().execute(&mut *tx).await?;
                }
                seq += chunk.len() as i64;
                tx.commit().await?;
            }
            if time {
                out.push(Measured {
                    rate: n as f64 / start.elapsed().as_secs_f64(),
                    count: n,
                    cpu: meter.stop(),
                    ..Default::default()
                });
            }
        }
        Ok(out)
    }};
}

/// Baseline B on as many rows as the unary scenario stored, into an empty table (as the
/// hub's was), in batches of `batch`.
async fn raw_unary_rows(dir: &Path, rows: u64, batch: usize) -> anyhow::Result<Measured> {
    let plan = RawPlan {
        prefill: 0,
        segments: vec![rows],
    };
    let [m] = same_table_sizes(raw_sqlite(dir, &plan, batch).await?)?;
    Ok(m)
}

/// Baseline B: the same rows, the same schema and pragmas, batched inserts, nothing else.
async fn raw_sqlite(dir: &Path, plan: &RawPlan, batch: usize) -> anyhow::Result<Vec<Measured>> {
    use sqlx::Connection;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
    std::fs::create_dir_all(dir)?;
    let path = dir.join("baseline.db");
    let opts = rating_hub::store::SqliteOptions {
        path: path.display().to_string(),
        ..Default::default()
    };
    let store =
        rating_hub::store::SqliteStore::open(&opts, Arc::new(rating_hub::clock::SystemClock))
            .await?;
    rating_hub::store::Store::close(&store).await;
    // The hub's own connection settings (pragmas) for the same file.
    let conn = SqliteConnection::connect_with(&rating_hub::store::SqliteStore::writer_options(
        SqliteConnectOptions::new().filename(&path),
        true,
    ))
    .await?;
    let rows = BaselineRows::new(dir)?;
    raw_plan!(conn, sqlx::Sqlite, rows, plan, batch, None)
}

/// Baseline B's statements for one batch, on either database: one multi-row INSERT of the
/// ratings (feed sequences after `seq`), and one of the cases its bad ratings open (the rule
/// the hub applies).
fn batch_inserts<'a, DB>(
    chunk: &'a [rating_hub::store::NewRating],
    seq: i64,
    now: i64,
) -> Vec<sqlx::QueryBuilder<'a, DB>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    i32: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    bool: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a str: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    &'a [u8]: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a str>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    Option<&'a [u8]>: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut ratings = sqlx::QueryBuilder::<DB>::new(
        "INSERT INTO ratings (feed_seq, hub_id, source_system, source_key, content_hash, level, \
         channel, target_kind, org_credit_code, region_code, item_code, staff_id, case_number, \
         rated_at, received_at, is_default, quality_flags, body, pii, pii_key_id, follow_up_of, \
         batch_id, theme_id, device_id, template_hash, phone_tag) ",
    );
    let mut seq = seq;
    ratings.push_values(chunk, |mut b, item| {
        seq += 1;
        let r = &item.rating;
        b.push_bind(seq)
            .push_bind(item.hub_id.as_bytes().as_slice())
            .push_bind(item.source_system.as_str())
            .push_bind(r.source_key.as_str())
            .push_bind(r.content_hash.as_slice())
            .push_bind(r.level as i32)
            .push_bind(r.channel as i32)
            .push_bind(r.target_kind as i32)
            .push_bind(r.org_credit_code.as_str())
            .push_bind(r.region_code.as_str())
            .push_bind(r.item_code.as_str())
            .push_bind(r.staff_id.as_str())
            .push_bind(r.case_number.as_str())
            .push_bind(r.rated_at_micros)
            .push_bind(now)
            .push_bind(false)
            .push_bind(0i64)
            .push_bind(item.body_bytes.as_slice())
            .push_bind(item.pii.as_ref().map(|p| p.blob.as_slice()))
            .push_bind(item.pii.as_ref().map(|p| p.key_id.as_str()))
            .push_bind("")
            .push_bind("")
            .push_bind("")
            .push_bind("")
            .push_bind(item.template_hash.as_ref().map(|h| h.as_slice()))
            .push_bind(item.phone_tag.as_ref().map(|h| h.as_slice()));
    });
    let mut statements = vec![ratings];
    let bad: Vec<_> = chunk
        .iter()
        .filter(|i| rating_hub::domain::rating::is_bad(i.rating.level) && !i.rating.is_default)
        .collect();
    if !bad.is_empty() {
        let mut cases = sqlx::QueryBuilder::<DB>::new(
            "INSERT INTO bad_rating_cases (hub_id, org_credit_code, region_code, opened_at, real_name) ",
        );
        cases.push_values(bad, |mut b, item| {
            b.push_bind(item.hub_id.as_bytes().as_slice())
                .push_bind(item.rating.org_credit_code.as_str())
                .push_bind(item.rating.region_code.as_str())
                .push_bind(now)
                .push_bind(false);
        });
        statements.push(cases);
    }
    statements
}

/// The rows both raw baselines insert: validated, sealed and encoded like the hub's, built
/// before the timed part so only inserts are measured.
/// Baseline B on PostgreSQL: the same rows into the hub's own schema, one transaction and
/// one multi-row INSERT per batch, on a durable server (fsync, synchronous_commit on).
async fn raw_postgres(
    admin: &str,
    dir: &Path,
    plan: &RawPlan,
    batch: usize,
) -> anyhow::Result<Vec<Measured>> {
    use sqlx::Connection;
    let url = create_database(admin, "bench_raw").await?;
    let opts = rating_hub::store::PostgresOptions {
        url: url.clone(),
        max_group_commit: 2048,
        write_queue: 1024,
        read_connections: 1,
        read_wait: std::time::Duration::from_secs(5),
        instance: "bench-raw".into(),
    };
    let store =
        rating_hub::store::PostgresStore::open(&opts, Arc::new(rating_hub::clock::SystemClock))
            .await?;
    rating_hub::store::Store::close(&store).await;
    let conn = sqlx::PgConnection::connect(&url).await?;
    let rows = BaselineRows::new(dir)?;
    raw_plan!(conn, sqlx::Postgres, rows, plan, batch, Some(admin))
}

/// A new database on the server at `admin`; returns its URL.
async fn create_database(admin: &str, prefix: &str) -> anyhow::Result<String> {
    use sqlx::Connection;
    let name = format!("{prefix}_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = admin
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pg-url needs a database path"))?
        .0;
    Ok(format!("{base}/{name}"))
}

/// Runs `CHECKPOINT` on the PostgreSQL server at `admin` (nothing for None), before each
/// timed PostgreSQL scenario and each timed segment of B (PostgreSQL). The server
/// checkpoints when its WAL has grown by `max_wal_size`, and writes every page's first
/// change after a checkpoint whole into the WAL: a checkpoint the previous scenario's writes
/// brought due would otherwise fall at a different point of each scenario, hub's or B's, in
/// every run.
async fn pg_checkpoint(admin: Option<&str>) -> anyhow::Result<()> {
    use sqlx::Connection;
    if let Some(admin) = admin {
        let mut conn = sqlx::PgConnection::connect(admin).await?;
        sqlx::query("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await?;
    }
    Ok(())
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

struct Row {
    scenario: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} memory")
}

/// The CPU rows: what a unary call costs the load generator and the server, against A and
/// B; the unary rate the baselines' own CPU costs leave room for on this machine; and the
/// CPU per rating of batches against B's. Empty where /proc could not be read.
/// `raw_unary`: B at the unary group size, B with every caller's rating in one batch, and
/// the number of callers; `prep`: the hub's CPU per rating to validate and seal it
/// ([`preparation_cpu_micros`]).
fn cpu_rows(
    echo: &Measured,
    unary: &Measured,
    (raw_unary, raw_all, callers): (&Measured, &Measured, usize),
    batched: &Measured,
    raw: &Measured,
    prep: Option<f64>,
) -> Vec<Row> {
    let bench = |c: &Cpu| c.bench;
    let server = |c: &Cpu| c.server;
    let (
        Some(a_load),
        Some(a_server),
        Some(hub_load),
        Some(hub),
        Some(b32),
        Some(b_all),
        Some(hub_batch),
        Some(b100),
        Some(prep),
    ) = (
        echo.cpu_micros(bench),
        echo.cpu_micros(server),
        unary.cpu_micros(bench),
        unary.cpu_micros(server),
        raw_unary.cpu_micros(bench),
        raw_all.cpu_micros(bench),
        batched.cpu_micros(server),
        raw.cpu_micros(bench),
        prep,
    )
    else {
        return Vec::new();
    };
    let idle = |m: &Measured| m.cpu.map_or(0.0, |c| c.idle);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // Every unary call needs at least A's load-generator and server work, the hub's
    // validation and sealing of its rating, and B's storage work for one row, all on this
    // machine's cores; B's work per row is least in the largest group the callers can make,
    // all of them at once. Nothing else a hub does is counted: no look-ups, no decisions, no
    // hand-offs between threads, no idle core.
    let ceiling = cores * 1e6 / (a_load + a_server + prep + b_all);
    vec![
        Row {
            scenario: format!(
                "Unary CPU per call (µs: load generator + server; cores left idle of {cores})"
            ),
            value: format!("{hub_load:.0} + {hub:.0} (idle {:.2})", idle(unary)),
            baseline: format!(
                "A: {a_load:.0} + {a_server:.0} (idle {:.2}); the hub's validation and sealing: {prep:.1} per rating; B: {b32:.0} per row at batch {UNARY_GROUP}, {b_all:.0} at batch {callers}",
                idle(echo)
            ),
            ratio: "—".into(),
            target: "—".into(),
        },
        Row {
            scenario: format!(
                "Unary ceiling on this machine: {cores} cores ÷ (A's load generator + A's server + validation and sealing + B's CPU per row at batch {callers}) (calls/s)"
            ),
            value: format!("{ceiling:.0}"),
            baseline: format!("A: {:.0}", echo.rate),
            ratio: format!("{:.2}", ceiling / echo.rate),
            target: "— (unary asks ≥ 0.6)".into(),
        },
        Row {
            scenario: "CPU per rating, batches of 100 (µs: hub process; B's process)".into(),
            value: format!("{hub_batch:.0}"),
            baseline: format!("B: {b100:.0}"),
            ratio: format!("{:.2}", hub_batch / b100),
            target: "—".into(),
        },
    ]
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
    let [raw, raw_s] = same_table_sizes(raw_sqlite(&work, &plan, 100).await?)?;
    eprintln!(
        "baseline B: {:.0} rows/s (batches' rows), {:.0} rows/s (streams' rows)",
        raw.rate, raw_s.rate
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
        let [raw_pg, raw_pg_s] = same_table_sizes(raw_postgres(admin, &work, &plan, 100).await?)?;
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
         rows of the hub use too. B does no look-ups, no validation and no gRPC: it is the storage ceiling. B inserts as many rows as the hub \
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
        } => {
            let work =
                std::env::temp_dir().join(format!("rating-bench-raw-{}", std::process::id()));
            std::fs::create_dir_all(&work)?;
            let plan = RawPlan {
                prefill,
                segments: vec![rows],
            };
            let m = match pg_url {
                Some(admin) => raw_postgres(&admin, &work, &plan, batch).await,
                None => raw_sqlite(&work, &plan, batch).await,
            };
            let _ = std::fs::remove_dir_all(&work);
            let [m] = same_table_sizes(m?)?;
            println!(
                "B: {:.0} rows/s at batch {batch}, {rows} rows after {prefill}{}",
                m.rate,
                m.cpu_micros(|c| c.bench)
                    .map_or(String::new(), |us| format!(
                        "; {us:.0} µs of this process's CPU per row"
                    ))
            );
            Ok(())
        }
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

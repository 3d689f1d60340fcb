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
mod disk;
mod load;
mod log_proofs;
mod metrics_cost;
mod process;
mod public_site;
mod relay;
mod relay_profiles;
mod report;
mod scenarios;
mod sink;
mod soak;
mod stats;

use baseline_a::*;
use baseline_b::*;
use cpu::*;
use load::*;
use process::*;
use public_site::*;
use rating_hub::pb::v1 as pb;
use rating_hub::pb::v1::ingest_service_client::IngestServiceClient;
use rating_hub::pb::v1::ingest_service_server::{IngestService, IngestServiceServer};
use relay::*;
use report::*;
use scenarios::*;
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
    /// organisations unless --orgs, 10 districts, 90 days) in `data` once — a later run with the same
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
        /// A PostgreSQL superuser URL: the hub on PostgreSQL, its prepared database kept on
        /// that server (named for --data) and reused.
        #[arg(long)]
        pg_url: Option<String>,
        /// Organisations in the province (the statistics' counts have a row per day,
        /// organisation, district, channel, kind and source: their number sets how many a
        /// quarter reads). Fixed for a --data directory.
        #[arg(long, default_value_t = 40)]
        orgs: u64,
        /// Times only the calls whose row names contain this (e.g. "Q4" or "Pull"), to
        /// profile one of them; the other rows are skipped (--growth is not a row: it
        /// still runs when asked for).
        #[arg(long)]
        only: Option<String>,
    },
    /// Bytes on disk per stored rating, by table and index, with and without the indexes:
    /// a hub filled with N of the province's ratings on SQLite and (with `--pg-url`, a
    /// superuser URL) on PostgreSQL, measured after it stopped. Printed.
    Disk {
        #[arg(long, default_value = "target/release/rating-hub")]
        hub_bin: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        ratings: u64,
        #[arg(long)]
        pg_url: Option<String>,
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
            pg_url,
            orgs,
            only,
        } => {
            stats::stats_probe(stats::StatsProbe {
                hub_bin: &hub_bin,
                data: &data,
                ratings,
                samples,
                growth,
                pg_admin: pg_url.as_deref(),
                orgs,
                only: only.as_deref(),
            })
            .await
        }
        Cmd::Disk {
            hub_bin,
            ratings,
            pg_url,
        } => disk::disk_probe(&hub_bin, ratings, pg_url.as_deref()).await,
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

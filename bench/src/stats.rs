//! Statistics and reads at scale (#23): a province's data prepared once in a directory of its
//! own and reused (`rating-bench stats-probe --data DIR --ratings N`), then the latency of
//! what dashboards, reports and pulling platforms ask of it. The quarter's statistics are
//! measured twice in the same run: as the hub answers them (from the maintained counts) and
//! over a range one second shorter, which the counts cannot answer, so the hub scans — the
//! baseline the counts are measured against.

use super::*;
use rating_hub::pb::v1::query_service_client::QueryServiceClient;
use rating_hub::pb::v1::sync_service_client::SyncServiceClient;

/// Organisations in the province unless `--orgs` says otherwise.
pub(crate) const ORGS: u64 = 40;
const DISTRICTS: [&str; 10] = [
    "530102", "530103", "530111", "530112", "530113", "530114", "530115", "530124", "530125",
    "530126",
];
const DAY_SECS: i64 = 86_400;
const SPREAD_DAYS: i64 = 90;

fn province_org(n: u64, orgs: u64) -> String {
    rating_hub::domain::codes::credit_code_with_check(&format!("11530100MA{:07}", n % orgs + 1))
        .expect("valid")
}

/// Rating `n` of the province: 40 organisations over 10 districts, five channels, the last
/// 90 days (a fixed spread, the same in every fill).
fn province_rating(n: u64, now: i64, orgs: u64) -> pb::Rating {
    let org = province_org(n, orgs);
    let mut r = rating("province", n, &org, now);
    r.region_code = DISTRICTS[(n % orgs % 10) as usize].into();
    r.channel = [
        pb::Channel::HallDevice,
        pb::Channel::MobileApp,
        pb::Channel::PcWeb,
        pb::Channel::QrCode,
        pb::Channel::MiniProgram,
    ][(n / orgs % 5) as usize] as i32;
    let ago = (n.wrapping_mul(7_919) % (SPREAD_DAYS as u64 * DAY_SECS as u64)) as i64 + 1;
    r.rated_at = Some(rating_hub::time::timestamp_from_micros(
        now - ago * 1_000_000,
    ));
    r
}

/// Fills the hub from `from` to `total` ratings of a province of `orgs` organisations (8
/// callers, batches of 500).
pub(crate) async fn fill(ch: &[Channel], from: u64, total: u64, orgs: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(from));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut client = IngestServiceClient::new(ch[w % ch.len()].clone());
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(500, Ordering::Relaxed);
                if first >= total {
                    return Ok::<_, anyhow::Error>(());
                }
                let now = now_micros();
                let ratings: Vec<_> = (first..(first + 500).min(total))
                    .map(|n| province_rating(n, now, orgs))
                    .collect();
                let r = client
                    .submit_ratings(pb::SubmitRatingsRequest { ratings })
                    .await?;
                anyhow::ensure!(
                    r.into_inner().results.iter().all(|x| {
                        x.outcome == pb::Outcome::Accepted as i32
                            || x.outcome == pb::Outcome::Duplicate as i32
                    }),
                    "not accepted"
                );
                if w == 0 && first % 200_000 < 500 {
                    eprintln!("… {first} ratings");
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Sorted latencies (ms) of `n` sequential calls of `call`.
async fn timed<F, Fut>(n: usize, mut call: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        call(i).await?;
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    v.sort_by(f64::total_cmp);
    Ok(v)
}

/// `n` sequential GetStats calls of `request`, timed.
async fn timed_stats(
    query: &QueryServiceClient<Channel>,
    n: usize,
    request: pb::GetStatsRequest,
) -> anyhow::Result<Vec<f64>> {
    timed(n, |_| {
        let (mut q, r) = (query.clone(), request.clone());
        async move {
            q.get_stats(r).await?;
            Ok(())
        }
    })
    .await
}

/// The PostgreSQL database of the prepared hub in `data` on the server at `admin`: named
/// for the directory, created the first time, reused after.
async fn prepared_database(admin: &str, data: &Path) -> anyhow::Result<String> {
    use sqlx::Connection;
    let dir: String = data
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let name = format!("stats_{dir}");
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await?;
    }
    conn.close().await?;
    let base = admin
        .rsplit_once('/')
        .ok_or_else(|| anyhow::anyhow!("--pg-url needs a database path"))?
        .0;
    Ok(format!("{base}/{name}"))
}

/// The hub's settings: the start-up self-check reads every stored rating in the background
/// (a minute at 1 M), so it is off, not to share the cores with what is measured; and the
/// database, when on PostgreSQL.
fn hub_env(db: Option<&str>) -> Vec<(&'static str, String)> {
    let mut env = vec![("RATING_HUB__RATING_LOG__SELF_CHECK", "false".into())];
    if let Some(url) = db {
        env.push(("RATING_HUB__STORAGE__URL", url.to_owned()));
    }
    env
}

/// What `stats-probe` measures and where (its command-line options).
pub(crate) struct StatsProbe<'a> {
    pub hub_bin: &'a Path,
    pub data: &'a Path,
    pub ratings: u64,
    pub samples: usize,
    pub growth: u64,
    /// A PostgreSQL superuser URL, to measure the hub on PostgreSQL (its prepared database is
    /// kept on that server, named for `data`).
    pub pg_admin: Option<&'a str>,
    pub orgs: u64,
    /// Times only the rows whose names contain this (to profile one call).
    pub only: Option<&'a str>,
}

pub(crate) async fn stats_probe(probe: StatsProbe<'_>) -> anyhow::Result<()> {
    let StatsProbe {
        hub_bin,
        data,
        ratings,
        samples,
        growth,
        pg_admin,
        orgs,
        only,
    } = probe;
    let want = |name: &str| only.is_none_or(|o| name.contains(o));
    let hub_bin = &hub_bin.canonicalize()?;
    anyhow::ensure!(orgs > 0, "--orgs must be at least 1");
    std::fs::create_dir_all(data)?;
    // The province a directory was prepared with: its ratings are reused, so another
    // number of organisations would mix two provinces.
    let shape = data.join("province.txt");
    let wanted = format!("orgs={orgs}\n");
    match std::fs::read_to_string(&shape) {
        Ok(had) => anyhow::ensure!(
            had == wanted,
            "{} was prepared with {}, not --orgs {orgs}: use another --data",
            data.display(),
            had.trim()
        ),
        Err(_) => std::fs::write(&shape, &wanted)?,
    }
    let pki = data.join("pki");
    if !pki.join("ca.pem").exists() {
        rating_hub::pki::init_dev(&pki)?;
    }
    let db = match pg_admin {
        Some(admin) => Some(prepared_database(admin, data).await?),
        None => None,
    };
    let hub = spawn_hub(hub_bin, data, "hub", &pki, &hub_env(db.as_deref())).await?;
    let ch = channels(&pki, &hub.url, 4).await?;
    let mut sync = SyncServiceClient::new(ch[0].clone());
    let head = |r: pb::PullResponse| r.head_sequence;
    let stored = head(
        sync.pull(pb::PullRequest {
            after_sequence: 0,
            limit: 1,
        })
        .await?
        .into_inner(),
    );
    if stored < ratings {
        eprintln!(
            "preparing {} → {ratings} ratings in {}",
            stored,
            data.display()
        );
        let started = Instant::now();
        fill(&ch, stored, ratings, orgs).await?;
        eprintln!("filled in {:.0} s", started.elapsed().as_secs_f64());
    }
    let size = head(
        sync.pull(pb::PullRequest {
            after_sequence: 0,
            limit: 1,
        })
        .await?
        .into_inner(),
    );

    // The quarter: from CST midnight 91 days ago to the next CST midnight.
    let now_secs = now_micros() / 1_000_000;
    let local = now_secs + 8 * 3600;
    let tomorrow = local - local.rem_euclid(DAY_SECS) + DAY_SECS - 8 * 3600;
    let from = tomorrow - 92 * DAY_SECS;
    let ts = |s: i64| Some(rating_hub::time::timestamp_from_micros(s * 1_000_000));
    let quarter = pb::RatingFilter {
        region_code_prefix: "53".into(),
        rated_from: ts(from),
        rated_until: ts(tomorrow),
        ..Default::default()
    };
    let by_org = |filter: pb::RatingFilter| pb::GetStatsRequest {
        filter: Some(filter),
        group_by: vec![pb::StatsDimension::Organization as i32],
        rank_by: pb::RankBy::GoodRate as i32,
        ..Default::default()
    };
    let query = QueryServiceClient::new(ch[1].clone());
    let total_of = |groups: &[pb::StatsGroup]| groups.iter().map(|g| g.total).sum::<u64>();

    let mut q = query.clone();
    let counted = q
        .get_stats(by_org(quarter.clone()))
        .await?
        .into_inner()
        .groups;
    let mut rows: Vec<(String, Vec<f64>)> = Vec::new();
    let name = "GetStats, the last 92 days, province by organisation (counts)";
    if want(name) {
        let times = timed_stats(&query, samples, by_org(quarter.clone())).await?;
        rows.push((name.into(), times));
    }
    // The calendar quarter holding today, as a dashboard or the quarterly report asks it.
    let (year, month, _) = rating_hub::rules::Date::of_instant(now_micros()).ymd();
    let (year, quarter_no) = (year as u32, (month - 1) / 3 + 1);
    let cst_midnight = |y: u32, m: u32| {
        let (y, m) = if m > 12 { (y + 1, m - 12) } else { (y, m) };
        rating_hub::rules::Date::from_ymd(i64::from(y), m, 1)
            .map(|d| d.days() * DAY_SECS - 8 * 3600)
            .expect("a quarter's first day")
    };
    let calendar = pb::RatingFilter {
        rated_from: ts(cst_midnight(year, quarter_no * 3 - 2)),
        rated_until: ts(cst_midnight(year, quarter_no * 3 + 1)),
        ..quarter.clone()
    };
    let name = format!("GetStats, {year} Q{quarter_no}, province by organisation (counts)");
    if want(&name) {
        let times = timed_stats(&query, samples, by_org(calendar)).await?;
        rows.push((name, times));
    }
    let single = pb::RatingFilter {
        org_credit_code: province_org(7, orgs),
        ..quarter.clone()
    };
    let name = "GetStats, the last 92 days, one organisation (counts)";
    if want(name) {
        let request = pb::GetStatsRequest {
            filter: Some(single),
            ..Default::default()
        };
        let times = timed_stats(&query, samples, request).await?;
        rows.push((name.into(), times));
    }
    let name = format!("ExportReport CSV, {year} Q{quarter_no}, province (counts)");
    if want(&name) {
        let times = timed(samples, |_| {
            let mut q = query.clone();
            async move {
                q.export_report(pb::ExportReportRequest {
                    year,
                    quarter: quarter_no,
                    region_code_prefix: "53".into(),
                    format: pb::ReportFormat::Csv as i32,
                    ..Default::default()
                })
                .await?;
                Ok(())
            }
        })
        .await?;
        rows.push((name, times));
    }
    // The baseline: one second short of the quarter's end, which only a scan answers.
    let name = "GetStats, the last 92 days less 1 s, province by organisation (scan)";
    let (mut scanned, mut scans) = (Vec::new(), 0);
    if want(name) {
        let shifted = pb::RatingFilter {
            rated_until: ts(tomorrow - 1),
            ..quarter.clone()
        };
        let mut q = query.clone();
        let first = Instant::now();
        scanned = q
            .get_stats(by_org(shifted.clone()))
            .await?
            .into_inner()
            .groups;
        // At most 10 scans; 3 when one takes more than 10 s (at 10 M ratings, a minute).
        scans = if first.elapsed() > Duration::from_secs(10) {
            3
        } else {
            samples.min(10)
        };
        let times = timed_stats(&query, scans, by_org(shifted)).await?;
        rows.push((name.into(), times));
    }
    let name = "ListRatings, first page of 50, province";
    if want(name) {
        let times = timed(samples, |_| {
            let mut q = query.clone();
            async move {
                q.list_ratings(pb::ListRatingsRequest {
                    filter: Some(pb::RatingFilter {
                        region_code_prefix: "53".into(),
                        ..Default::default()
                    }),
                    page_size: 50,
                    page_token: String::new(),
                })
                .await?;
                Ok(())
            }
        })
        .await?;
        rows.push((name.into(), times));
    }
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let name = "Pull 500 from a random position";
    if want(name) {
        let times = timed(samples, |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let after = x % size.saturating_sub(500).max(1);
            let mut s = sync.clone();
            async move {
                let r = s
                    .pull(pb::PullRequest {
                        after_sequence: after,
                        limit: 500,
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(r.ratings.len() == 500 || size < 501, "short pull");
                Ok(())
            }
        })
        .await?;
        rows.push((name.into(), times));
    }
    // Flat growth: `growth` more ratings into the prepared hub (timed like the fill), then the
    // same number into an empty hub, in the same run.
    let mut growth_rates = None;
    if growth > 0 {
        let t = Instant::now();
        fill(&ch, size, size + growth, orgs).await?;
        let full = growth as f64 / t.elapsed().as_secs_f64();
        hub.stop().await;
        let empty_dir = data.join("empty");
        let _ = std::fs::remove_dir_all(&empty_dir);
        let empty_db = match pg_admin {
            Some(admin) => Some(create_database(admin, "stats_empty").await?),
            None => None,
        };
        let empty = spawn_hub(
            hub_bin,
            &empty_dir,
            "hub",
            &pki,
            &hub_env(empty_db.as_deref()),
        )
        .await?;
        let ech = channels(&pki, &empty.url, 4).await?;
        let t = Instant::now();
        fill(&ech, 0, growth, orgs).await?;
        let fresh = growth as f64 / t.elapsed().as_secs_f64();
        empty.stop().await;
        let _ = std::fs::remove_dir_all(&empty_dir);
        if let (Some(admin), Some(url)) = (pg_admin, &empty_db) {
            drop_database(admin, url).await?;
        }
        growth_rates = Some((full, fresh));
    } else {
        hub.stop().await;
    }
    if let (Some(only), true) = (only, rows.is_empty()) {
        // Not an error: `--only` naming no row prepares (or grows) the data and times nothing.
        eprintln!("--only {only:?} matches no row's name: nothing timed");
    }
    let (scan_total, scan_runs) = if scans > 0 {
        (
            format!("{} by the scan of a range 1 s shorter", total_of(&scanned)),
            format!("; the scan {scans}"),
        )
    } else {
        ("the scan not run".into(), String::new())
    };
    println!(
        "{size} ratings stored in {}{} ({} in the quarter by the counts, {scan_total})",
        data.display(),
        match &db {
            Some(url) => format!(" and PostgreSQL {url}"),
            None => " (SQLite)".into(),
        },
        total_of(&counted),
    );
    println!("| call ({samples} sequential, one client{scan_runs}) | p50 ms | p99 ms |");
    println!("|---|---|---|");
    for (name, v) in &rows {
        println!(
            "| {name} | {:.2} | {:.2} |",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
    if let Some((full, fresh)) = growth_rates {
        println!(
            "\ningest of {growth} more ratings (8 callers, batches of 500): {full:.0} ratings/s \
             with {size} stored, {fresh:.0} ratings/s into an empty hub, ratio {:.2}",
            full / fresh
        );
    }
    Ok(())
}

/// Drops the database `url` names on the server at `admin`.
async fn drop_database(admin: &str, url: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    let name = url.rsplit_once('/').map(|(_, n)| n).unwrap_or(url);
    let mut conn = sqlx::PgConnection::connect(admin).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

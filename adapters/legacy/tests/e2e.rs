//! The legacy adapter against a real hub: drop-folder files (CSV UTF-8 and GBK, XML) and an
//! intermediate database table arrive with the right fields; bad rows are reported; a hard
//! kill mid-file loses and duplicates nothing, and one with rows waiting in the spool loses
//! and re-sends nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rating_hub::pb::v1 as pb;
use rating_hub_adapter_kit::Mapping;
use rating_hub_adapter_kit::testing::{
    Gate, all_ratings, hub_connection, spool_counts, start_hub, wait_for_ratings,
};
use rating_hub_legacy::LegacyConfig;
use rating_hub_legacy::config::{FolderConfig, TableConfig};

fn org() -> String {
    rating_hub::domain::codes::credit_code_with_check("11530100MA0000042").unwrap()
}

/// The department's columns, and its satisfaction codes in GB/T 39046 orientation
/// (1 = 非常满意 … 5 = 非常不满意).
fn mapping() -> Mapping {
    let t = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    let mut values = BTreeMap::new();
    values.insert(
        "level".to_string(),
        t(&[
            ("1", "LEVEL_VERY_SATISFIED"),
            ("2", "LEVEL_SATISFIED"),
            ("3", "LEVEL_BASICALLY_SATISFIED"),
            ("4", "LEVEL_DISSATISFIED"),
            ("5", "LEVEL_VERY_DISSATISFIED"),
        ]),
    );
    Mapping {
        fields: t(&[
            ("case_number", "bjbh"),
            ("item_code", "sxbm"),
            ("item_name", "sxmc"),
            ("region_code", "xzqh"),
            ("org_credit_code", "tyshxydm"),
            ("level", "myd"),
            ("rated_at", "pjsj"),
            ("text", "pjnr"),
            ("rater.phone", "sjhm"),
        ]),
        values,
        constants: t(&[
            ("channel", "CHANNEL_PAPER_FORM"),
            ("target_kind", "TARGET_KIND_ITEM"),
        ]),
        time_format: "yyyy-MM-dd HH:mm:ss".into(),
    }
}

const HEADER: &str = "bjbh,sxbm,sxmc,xzqh,tyshxydm,myd,pjsj,pjnr,sjhm";

fn row(case: &str, level: &str, text: &str) -> String {
    format!(
        "{case},530100-ITEM-2,不动产登记,530102,{},{level},2025-06-04 09:30:00,{text},13700001234",
        org()
    )
}

fn config(dir: &Path, port: u16, drop: &Path, rows_per_pass: usize) -> LegacyConfig {
    LegacyConfig {
        spool: dir.join("spool.db").display().to_string(),
        state: dir.join("state.db").display().to_string(),
        poll_secs: 0,
        hub: hub_connection(dir, port),
        folders: vec![FolderConfig {
            name: "km-paper".into(),
            path: drop.display().to_string(),
            encoding: "auto".into(),
            xml_record: "record".into(),
            rows_per_pass,
            settle_secs: 0,
            marker: String::new(),
            mapping: mapping(),
        }],
        tables: vec![],
        at_rest: Default::default(),
    }
}

#[tokio::test]
async fn drop_folder_files_arrive_with_their_fields_and_bad_rows_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let utf8 = format!(
        "{HEADER}\n{}\n{}\n{}\nshort,row\n",
        row("U-1", "1", "很好"),
        row("U-2", "4", "排队太久"),
        row("U-3", "9", "请回电13812345678"),
    );
    std::fs::write(drop.join("a.csv"), utf8).unwrap();
    let gbk_text = format!(
        "{HEADER}\n{}\n{}\n",
        row("G-1", "2", "满意"),
        row("G-2", "3", "一般")
    );
    let (gbk, _, _) = encoding_rs::GBK.encode(&gbk_text);
    std::fs::write(drop.join("b.csv"), gbk).unwrap();
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><records>\
         <record><bjbh>X-1</bjbh><sxbm>530100-ITEM-2</sxbm><sxmc>不动产登记</sxmc><xzqh>530102</xzqh>\
         <tyshxydm>{o}</tyshxydm><myd>5</myd><pjsj>2025-06-04 10:00:00</pjsj><pjnr>态度差</pjnr><sjhm>13700001234</sjhm></record>\
         <record><bjbh>X-2</bjbh><sxbm>530100-ITEM-2</sxbm><sxmc>不动产登记</sxmc><xzqh>530102</xzqh>\
         <tyshxydm>{o}</tyshxydm><myd>1</myd><pjsj>2025-06-04 10:05:00</pjsj><pjnr>好</pjnr><sjhm>13700001234</sjhm></record>\
         </records>",
        o = org()
    );
    std::fs::write(drop.join("c.xml"), xml).unwrap();
    std::fs::write(drop.join("notes.txt"), "not a data file").unwrap();

    let adapter = rating_hub_legacy::start(config(dir.path(), port, &drop, 100_000))
        .await
        .unwrap();
    adapter.pass().await.unwrap();
    let ratings = wait_for_ratings(dir.path(), port, 6, Duration::from_secs(30)).await;
    let by_case: BTreeMap<String, pb::Rating> = ratings
        .into_iter()
        .map(|r| (r.case_number.clone(), r))
        .collect();
    assert_eq!(
        by_case.keys().cloned().collect::<Vec<_>>(),
        ["G-1", "G-2", "U-1", "U-2", "X-1", "X-2"]
    );
    assert_eq!(
        by_case["U-1"].level,
        pb::Level::VerySatisfied as i32,
        "GB/T 39046: 1 = 非常满意"
    );
    assert_eq!(by_case["U-2"].level, pb::Level::Dissatisfied as i32);
    assert_eq!(by_case["U-2"].text, "排队太久");
    assert_eq!(by_case["G-2"].text, "一般", "GBK decoded");
    assert_eq!(by_case["X-1"].level, pb::Level::VeryDissatisfied as i32);
    assert_eq!(by_case["X-1"].channel, pb::Channel::PaperForm as i32);
    assert_eq!(by_case["X-1"].item_name, "不动产登记");

    // Files moved to done/ with per-row reports; bad rows in a reject report; other files untouched.
    for f in ["a.csv", "b.csv", "c.xml"] {
        assert!(drop.join("done").join(f).exists(), "{f} moved to done/");
        assert!(!drop.join(f).exists());
    }
    assert!(drop.join("notes.txt").exists());
    let report = std::fs::read_to_string(drop.join("done/a.csv.report.csv")).unwrap();
    let outcomes: Vec<&str> = report
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap())
        .collect();
    assert_eq!(outcomes, ["spooled", "spooled", "rejected", "rejected"]);
    let rejects = std::fs::read_to_string(drop.join("rejects/a.csv.rejects.csv")).unwrap();
    assert!(rejects.contains("values.level"), "{rejects}");
    assert!(
        rejects.contains("the row has 2 fields, the header has 9"),
        "{rejects}"
    );
    // The rejected row's phone (a mapped column) and a phone in its text (an unmapped one)
    // are not in the report in clear, and the report is the adapter's user's alone.
    for phone in ["13700001234", "13812345678"] {
        assert!(!rejects.contains(phone), "{phone} in {rejects}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &str| {
            std::fs::metadata(drop.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("rejects/a.csv.rejects.csv"), 0o600);
        // The department's own files, kept for the retention period, and their folders too.
        assert_eq!(mode("done/b.csv"), 0o600);
        assert_eq!(mode("done"), 0o700);
        assert_eq!(mode("rejects"), 0o700);
    }

    // The same file dropped again: duplicates, nothing new at the hub.
    std::fs::copy(drop.join("done/b.csv"), drop.join("b.csv")).unwrap();
    adapter.pass().await.unwrap();
    assert!(drop.join("done/b.csv.1").exists());
    adapter.shutdown().await;
    assert_eq!(all_ratings(dir.path(), port).await.len(), 6);
    hub.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_table_is_read_by_its_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let dept_db = dir.path().join("dept.db");
    let url = format!("sqlite://{}?mode=rwc", dept_db.display());
    sqlx::any::install_default_drivers();
    let dept = sqlx::AnyPool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TABLE pj_evaluation (id INTEGER PRIMARY KEY, bjbh TEXT, sxbm TEXT, sxmc TEXT, \
         xzqh TEXT, tyshxydm TEXT, myd INTEGER, pjsj TEXT, pjnr TEXT, sjhm TEXT)",
    )
    .execute(&dept)
    .await
    .unwrap();
    let insert = |id: i64, case: &str, level: i64| {
        let dept = dept.clone();
        let case = case.to_owned();
        async move {
            sqlx::query(
                "INSERT INTO pj_evaluation VALUES (?, ?, '530100-ITEM-2', '不动产登记', '530102', ?, ?, \
                 '2025-06-04 09:30:00', '', '13700001234')",
            )
            .bind(id)
            .bind(case)
            .bind(org())
            .bind(level)
            .execute(&dept)
            .await
            .unwrap();
        }
    };
    for (id, case, level) in [(1, "T-1", 1), (2, "T-2", 2), (3, "T-3", 3)] {
        insert(id, case, level).await;
    }
    let mut cfg = config(dir.path(), port, &dir.path().join("unused"), 100_000);
    cfg.folders.clear();
    cfg.tables.push(TableConfig {
        name: "km-db".into(),
        url: url.clone(),
        table: "pj_evaluation".into(),
        watermark: "id".into(),
        watermark_type: "integer".into(),
        key_columns: vec!["id".into()],
        batch: 2,
        settle_secs: 0,
        mapping: mapping(),
    });
    cfg.check().unwrap();
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    adapter.pass().await.unwrap();
    wait_for_ratings(dir.path(), port, 3, Duration::from_secs(30)).await;
    assert_eq!(adapter.metrics.get("table_rows_read_total"), 3);
    insert(4, "T-4", 2).await;
    insert(5, "T-5", 7).await;
    adapter.pass().await.unwrap();
    adapter.pass().await.unwrap();
    // What the adapter read, not what the hub kept (the hub's idempotency would hide a
    // reader that read everything again): only the two new rows, once.
    assert_eq!(adapter.metrics.get("table_rows_read_total"), 5);
    assert_eq!(adapter.metrics.get("table_rows_spooled_total"), 4);
    // Past 9: ids compare as numbers, not as text (a reader sorting "10" before "2" read
    // 10, 11, 12 and skipped 6 to 9).
    for id in 6..=12 {
        insert(id, &format!("T-{id}"), 1).await;
    }
    adapter.pass().await.unwrap();
    assert_eq!(adapter.metrics.get("table_rows_read_total"), 12);
    wait_for_ratings(dir.path(), port, 11, Duration::from_secs(30)).await;
    let all = wait_for_ratings(dir.path(), port, 4, Duration::from_secs(30)).await;
    let cases: BTreeSet<String> = all
        .iter()
        .map(|r| r.case_number.clone())
        .filter(|c| ["T-1", "T-2", "T-3", "T-4", "T-5"].contains(&c.as_str()))
        .collect();
    assert_eq!(
        cases,
        ["T-1", "T-2", "T-3", "T-4"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let rejects = adapter.state.rejects("km-db").await.unwrap();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].0, "5");
    assert!(rejects[0].1.contains("level"), "{:?}", rejects[0]);
    adapter.shutdown().await;
    hub.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_hard_kill_mid_file_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let mut csv = format!("{HEADER}\n");
    for i in 0..3000 {
        csv.push_str(&row(&format!("K-{i:04}"), &((i % 5) + 1).to_string(), "x"));
        csv.push('\n');
    }
    std::fs::write(drop.join("big.csv"), csv).unwrap();
    // The first pass takes 1,000 rows; the next would come an hour later.
    let child = spawn_legacy(&write_config(dir.path(), port, &drop, 1000));
    wait_for_ratings(dir.path(), port, 1000, Duration::from_secs(60)).await;
    child.kill();
    assert!(
        drop.join("big.csv").exists(),
        "killed mid-file: the file is not done"
    );

    let child = spawn_legacy(&write_config(dir.path(), port, &drop, 100_000));
    let all = wait_for_ratings(dir.path(), port, 3000, Duration::from_secs(60)).await;
    let cases: BTreeSet<String> = all.iter().map(|r| r.case_number.clone()).collect();
    assert_eq!((all.len(), cases.len()), (3000, 3000), "every row once");
    for _ in 0..500 {
        if drop.join("done/big.csv").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(drop.join("done/big.csv.report.csv").exists());
    child.kill();
    assert_eq!(all_ratings(dir.path(), port).await.len(), 3000);
    hub.shutdown().await.unwrap();
}

/// Writes the adapter's config file (one drop folder, polled hourly) and returns its path.
fn write_config(dir: &Path, port: u16, drop: &Path, rows_per_pass: usize) -> PathBuf {
    let cfg = config(dir, port, drop, rows_per_pass);
    let h = &cfg.hub;
    let text = format!(
        "spool = {:?}\nstate = {:?}\npoll_secs = 3600\n\n[hub]\nendpoint = {:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\ndomain = \"localhost\"\n\n\
         [[folders]]\nname = \"km-paper\"\npath = {:?}\nrows_per_pass = {rows_per_pass}\nsettle_secs = 0\n[folders.mapping]\n{}",
        cfg.spool,
        cfg.state,
        h.endpoint,
        h.ca,
        h.cert,
        h.key,
        drop.display().to_string(),
        toml_mapping(),
    );
    let path = dir.join("legacy.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The adapter binary on `config`, its log discarded; killed (SIGKILL) when dropped, so a
/// failing test leaves no adapter behind.
fn spawn_legacy(config: &Path) -> Adapter {
    Adapter(
        Command::new(env!("CARGO_BIN_EXE_rating-legacy"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

struct Adapter(std::process::Child);

impl Adapter {
    /// SIGKILL, and reaped.
    fn kill(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
/// The spool's own crash test: the adapter is killed while its spool holds rows the hub has
/// not yet taken (the hub is behind a closed gate), and after a restart every one of them
/// arrives once, sent once: the hub answered DUPLICATE to none (its idempotency would hide a
/// re-send from a count of what it kept). A kill between the hub's commit and the spool's
/// mark (where a DUPLICATE is the right answer) is not what this test makes.
#[tokio::test]
async fn a_hard_kill_with_undelivered_rows_in_the_spool_loses_and_resends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let gate = Gate::start(hub.local_addr).await;
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let mut csv = format!("{HEADER}\n");
    for i in 0..500 {
        csv.push_str(&row(&format!("S-{i:04}"), &((i % 5) + 1).to_string(), "x"));
        csv.push('\n');
    }
    std::fs::write(drop.join("spooled.csv"), csv).unwrap();
    let config = write_config(dir.path(), gate.port, &drop, 100_000);
    let spool = dir.path().join("spool.db");
    let child = spawn_legacy(&config);
    // Every row spooled, none delivered, and the forwarder has tried (and failed) to send.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let counts = spool_counts(&spool).await.unwrap_or_default();
        if counts.get(&(0, String::new())) == Some(&500) && gate.refused() > 0 {
            assert_eq!(counts.len(), 1, "{counts:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "spool {counts:?}, gate refused {}",
            gate.refused()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill(); // with 500 rows waiting
    assert!(all_ratings(dir.path(), port).await.is_empty());

    gate.open();
    let child = spawn_legacy(&config);
    let all = wait_for_ratings(dir.path(), port, 500, Duration::from_secs(60)).await;
    let cases: BTreeSet<String> = all.iter().map(|r| r.case_number.clone()).collect();
    assert_eq!((all.len(), cases.len()), (500, 500), "every row once");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let counts = loop {
        let counts = spool_counts(&spool).await;
        if let Some(counts) = counts
            .as_ref()
            .filter(|c| !c.contains_key(&(0, String::new())))
        {
            break counts.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "spool {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        counts,
        BTreeMap::from([((1, String::new()), 500)]),
        "every spooled row delivered as ACCEPTED: none re-sent (DUPLICATE), none refused"
    );
    child.kill();
    hub.shutdown().await.unwrap();
}

fn toml_mapping() -> String {
    let m = mapping();
    let mut s = String::from("time_format = \"yyyy-MM-dd HH:mm:ss\"\n[folders.mapping.fields]\n");
    for (k, v) in &m.fields {
        s.push_str(&format!("{k:?} = {v:?}\n"));
    }
    s.push_str("[folders.mapping.constants]\n");
    for (k, v) in &m.constants {
        s.push_str(&format!("{k:?} = {v:?}\n"));
    }
    s.push_str("[folders.mapping.values.level]\n");
    for (k, v) in &m.values["level"] {
        s.push_str(&format!("{k:?} = {v:?}\n"));
    }
    s
}

/// Sets a file's modification time `secs` seconds back: a file that has been still that
/// long (the settle rule reads the clock the file system keeps; no test waits for it).
fn age(path: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

fn rows_csv(range: std::ops::Range<usize>) -> String {
    let mut csv = format!("{HEADER}\n");
    for i in range {
        csv.push_str(&row(&format!("W-{i:03}"), &((i % 3) + 1).to_string(), "x"));
        csv.push('\n');
    }
    csv
}

/// A file still being copied in is left alone until it has been still for `settle_secs`
/// (before: read half-way, its truncated last row reported, the file moved to done/ while
/// the writer appended); and a row's key is its content, so a re-exported file, or a file
/// that grew, stores no row twice (before: the whole file's hash was in every key).
#[tokio::test]
async fn a_file_still_being_written_waits_and_a_re_export_stores_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let mut cfg = config(dir.path(), port, &drop, 100_000);
    cfg.folders[0].settle_secs = 3600;
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();

    // Half-written: three rows and the start of a fourth, written just now.
    let full = rows_csv(0..6);
    let cut = full.find("W-003").unwrap() + 12;
    std::fs::write(drop.join("a.csv"), &full[..cut]).unwrap();
    adapter.pass().await.unwrap();
    assert_eq!(adapter.spool.counts().await.unwrap(), Default::default());
    assert!(drop.join("a.csv").exists(), "not taken while being written");

    // Complete, and still for an hour: taken whole.
    std::fs::write(drop.join("a.csv"), &full).unwrap();
    age(&drop.join("a.csv"), 3700);
    adapter.pass().await.unwrap();
    assert!(drop.join("done/a.csv").exists());
    let report = std::fs::read_to_string(drop.join("done/a.csv.report.csv")).unwrap();
    assert_eq!(report.matches(",spooled,").count(), 6, "{report}");
    assert!(
        !drop.join("rejects/a.csv.rejects.csv").exists(),
        "no truncated row"
    );

    // A re-export: the same six rows and two new ones, in another file, one of the new ones
    // twice. Identical rows in one file are two ratings to the adapter (two raters giving
    // the same answer in the same minute); here, of one case, the hub refuses the second
    // (一事一评), kept in the spool with the reason — not dropped as a duplicate.
    let mut again = rows_csv(0..8);
    again.push_str(rows_csv(7..8).lines().nth(1).unwrap());
    again.push('\n');
    std::fs::write(drop.join("b.csv"), &again).unwrap();
    age(&drop.join("b.csv"), 3700);
    adapter.pass().await.unwrap();
    assert!(drop.join("done/b.csv").exists());
    // Every row of both files spooled once — 6 + 2 new + the twin = 9, not 15 — and all
    // answered: 8 delivered, the twin refused with the hub's reason.
    let spool = dir.path().join("spool.db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let c = spool_counts(&spool).await.unwrap_or_default();
        if !c.contains_key(&(0, String::new())) && c.values().sum::<u64>() == 9 {
            break c;
        }
        assert!(tokio::time::Instant::now() < deadline, "spool {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(counts.get(&(1, String::new())), Some(&8), "{counts:?}");
    let refused: Vec<&String> = counts
        .keys()
        .filter(|(state, _)| *state == 2)
        .map(|(_, why)| why)
        .collect();
    assert_eq!(refused.len(), 1, "{counts:?}");
    assert!(refused[0].contains("一事一评"), "{counts:?}");
    let all = all_ratings(dir.path(), port).await;
    let cases: BTreeSet<String> = all.iter().map(|r| r.case_number.clone()).collect();
    assert_eq!(
        (all.len(), cases.len()),
        (8, 8),
        "every row once at the hub"
    );
    // A file cut mid-character (UTF-8 read as "auto"), though still for an hour: not read
    // as GBK, not taken until complete.
    let text = rows_csv(20..22).replace(",x,", ",很好,");
    let bytes = text.as_bytes();
    let cut = text.rfind("很好").unwrap() + 1;
    std::fs::write(drop.join("c.csv"), &bytes[..cut]).unwrap();
    age(&drop.join("c.csv"), 3700);
    adapter.pass().await.unwrap();
    assert!(
        drop.join("c.csv").exists(),
        "a file cut short is left in place"
    );
    std::fs::write(drop.join("c.csv"), bytes).unwrap();
    age(&drop.join("c.csv"), 3700);
    adapter.pass().await.unwrap();
    let all = wait_for_ratings(dir.path(), port, 10, Duration::from_secs(30)).await;
    assert!(all.iter().filter(|r| r.text == "很好").count() == 2);
    adapter.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// With a marker configured, a file is taken only once its marker is there, and the marker
/// leaves with it.
#[tokio::test]
async fn a_marker_file_says_when_a_file_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let mut cfg = config(dir.path(), port, &drop, 100_000);
    cfg.folders[0].marker = ".ok".into();
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    std::fs::write(drop.join("m.csv"), rows_csv(0..2)).unwrap();
    age(&drop.join("m.csv"), 3700);
    adapter.pass().await.unwrap();
    assert!(drop.join("m.csv").exists(), "no marker, not taken");
    std::fs::write(drop.join("m.csv.ok"), "").unwrap();
    adapter.pass().await.unwrap();
    assert!(drop.join("done/m.csv").exists());
    assert!(
        !drop.join("m.csv.ok").exists(),
        "the marker left with its file"
    );
    wait_for_ratings(dir.path(), port, 2, Duration::from_secs(30)).await;
    // Processed files (raters' data in clear) leave after the retention period (30 days by
    // default), counted from when they were processed, not from the sender's time.
    adapter.pass().await.unwrap();
    assert!(drop.join("done/m.csv").exists(), "kept: processed just now");
    // The file's record set 31 days back (its own time is the sender's, not when it was
    // processed); a file the adapter did not put there is never touched.
    std::fs::write(drop.join("done/theirs.csv"), "x").unwrap();
    age(&drop.join("done/theirs.csv"), 400 * 86_400);
    let key = format!("kept:km-paper:{}", drop.join("done/m.csv").display());
    assert!(adapter.state.get(&key).await.unwrap().is_some(), "recorded");
    adapter.state.set(&key, "0").await.unwrap();
    adapter.pass().await.unwrap();
    assert!(
        !drop.join("done/m.csv").exists(),
        "deleted after the retention period"
    );
    assert!(
        drop.join("done/m.csv.report.csv").exists(),
        "its report: recorded now"
    );
    assert!(
        drop.join("done/theirs.csv").exists(),
        "not the adapter's: kept"
    );
    adapter.shutdown().await;
    hub.shutdown().await.unwrap();
}

async fn dept_table(url: &str, watermark_sql_type: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    let dept = sqlx::AnyPool::connect(url).await.unwrap();
    sqlx::query(&format!(
        "CREATE TABLE pj_evaluation (id INTEGER PRIMARY KEY, bjbh TEXT, sxbm TEXT, sxmc TEXT, \
         xzqh TEXT, tyshxydm TEXT, myd INTEGER, pjsj {watermark_sql_type}, pjnr TEXT, sjhm TEXT)"
    ))
    .execute(&dept)
    .await
    .unwrap();
    dept
}

async fn insert_row(dept: &sqlx::AnyPool, postgres: bool, id: i64, at: &str, text: &str) {
    let sql = if postgres {
        "INSERT INTO pj_evaluation VALUES ($1, $2, '530100-ITEM-2', '不动产登记', '530102', $3, 2, \
         CAST($4 AS TIMESTAMPTZ), $5, '13700001234')"
    } else {
        "INSERT INTO pj_evaluation VALUES (?, ?, '530100-ITEM-2', '不动产登记', '530102', ?, 2, ?, ?, \
         '13700001234')"
    };
    sqlx::query(sql)
        .bind(id)
        .bind(format!("WM-{id}"))
        .bind(org())
        .bind(at.to_owned())
        .bind(text.to_owned())
        .execute(dept)
        .await
        .unwrap();
}

fn table(name: &str, url: &str, watermark_type: &str, settle_secs: u64) -> TableConfig {
    TableConfig {
        name: name.into(),
        url: url.into(),
        table: "pj_evaluation".into(),
        watermark: "pjsj".into(),
        watermark_type: watermark_type.into(),
        key_columns: vec!["id".into()],
        batch: 2,
        settle_secs,
        mapping: mapping(),
    }
}

/// A batch that ends inside a run of equal watermarks reads the rest of the run (before,
/// `> last` skipped it: 3 of 5 rows lost), and a row that commits late with a smaller value
/// than one already read is still read, the watermark held behind the settle time (before,
/// lost).
#[tokio::test]
async fn a_tie_in_the_watermark_and_a_late_commit_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("dept.db").display());
    let dept = dept_table(&url, "TEXT").await;
    // A row with no watermark sorts first: it is not read, and stops nothing.
    insert_row(&dept, false, 100, "x", "x").await;
    sqlx::query("UPDATE pj_evaluation SET pjsj = NULL WHERE id = 100")
        .execute(&dept)
        .await
        .unwrap();
    for id in 1..=5 {
        insert_row(&dept, false, id, "2025-06-04 09:30:00", "x").await;
    }
    for id in 6..=7 {
        insert_row(&dept, false, id, "2025-06-04 09:31:00", "x").await;
    }
    let mut cfg = config(dir.path(), port, &dir.path().join("unused"), 100_000);
    cfg.folders.clear();
    cfg.tables.push(table("km-db", &url, "text", 3600));
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    adapter.pass().await.unwrap();
    let c = adapter.spool.counts().await.unwrap();
    assert_eq!(c.waiting + c.delivered, 7, "{c:?}");
    // Committed late, with a value below the highest already read.
    insert_row(&dept, false, 8, "2025-06-04 09:30:30", "x").await;
    adapter.pass().await.unwrap();
    let all = wait_for_ratings(dir.path(), port, 8, Duration::from_secs(30)).await;
    let cases: BTreeSet<String> = all.iter().map(|r| r.case_number.clone()).collect();
    assert_eq!((all.len(), cases.len()), (8, 8));
    assert_eq!(
        adapter.state.get("table:km-db").await.unwrap(),
        None,
        "held back"
    );
    assert_eq!(
        adapter
            .state
            .get("table:km-db:pending")
            .await
            .unwrap()
            .map(|v| v.split_once(' ').unwrap().1.to_owned()),
        Some("2025-06-04 09:31:00".to_owned())
    );
    // The settle time passes (the pending value's time set back, rather than waited for)
    // while a row commits late below it: the pass reads again above the committed value
    // before it commits the pending one (before, it committed first and lost the row).
    insert_row(&dept, false, 9, "2025-06-04 09:30:45", "x").await;
    adapter
        .state
        .set("table:km-db:pending", "0 2025-06-04 09:31:00")
        .await
        .unwrap();
    adapter.pass().await.unwrap();
    assert_eq!(
        adapter.state.get("table:km-db").await.unwrap().as_deref(),
        Some("2025-06-04 09:31:00"),
        "committed after the settle time"
    );
    assert_eq!(
        adapter.state.get("table:km-db:pending").await.unwrap(),
        None
    );
    let all = wait_for_ratings(dir.path(), port, 9, Duration::from_secs(30)).await;
    assert_eq!(all.len(), 9);
    adapter.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// A row with a column that cannot be read is rejected alone, and a source that fails
/// (a database that is not there) holds back neither the other tables nor the folders
/// (before, either stopped the whole pass, on every poll).
#[tokio::test]
async fn a_bad_row_or_a_failing_source_holds_back_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("dept.db").display());
    let dept = dept_table(&url, "TEXT").await;
    for id in 1..=3 {
        insert_row(&dept, false, id, &format!("2025-06-04 09:3{id}:00"), "x").await;
    }
    // Row 2's text is not UTF-8.
    sqlx::query("UPDATE pj_evaluation SET pjnr = CAST(X'FFFE41' AS TEXT) WHERE id = 2")
        .execute(&dept)
        .await
        .unwrap();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    std::fs::write(drop.join("f.csv"), rows_csv(0..2)).unwrap();
    let mut cfg = config(dir.path(), port, &drop, 100_000);
    let missing = format!("sqlite://{}", dir.path().join("no/such.db").display());
    cfg.tables.push(table("gone", &missing, "text", 0));
    cfg.tables.push(table("km-db", &url, "text", 0));
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    let err = adapter.pass().await.unwrap_err();
    assert!(format!("{err:#}").contains("table gone"), "{err:#}");
    let all = wait_for_ratings(dir.path(), port, 4, Duration::from_secs(30)).await;
    let cases: BTreeSet<String> = all.iter().map(|r| r.case_number.clone()).collect();
    assert_eq!(
        cases,
        ["W-000", "W-001", "WM-1", "WM-3"]
            .map(String::from)
            .into_iter()
            .collect()
    );
    let rejects = adapter.state.rejects("km-db").await.unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(rejects[0].0, "2");
    assert!(rejects[0].1.contains("pjnr"), "{rejects:?}");
    adapter.shutdown().await;
    hub.shutdown().await.unwrap();
}

/// The table poller against a real PostgreSQL with a `timestamptz` watermark: values come
/// back as the wall time the department wrote (before, sqlx's UTC session shifted them 8
/// hours), the watermark compares as a timestamp (before, a text watermark over
/// `timestamptz` failed outright), and a tie across a batch loses nothing.
#[tokio::test]
async fn a_postgresql_table_with_a_timestamptz_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    let admin = rating_hub::testing::pg_admin_url();
    sqlx::any::install_default_drivers();
    let db = format!("legacy_{}", uuid::Uuid::now_v7().simple());
    let admin_pool = sqlx::AnyPool::connect(admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin_pool)
        .await
        .unwrap();
    let url = with_database(admin, &db);
    let dept = dept_table(&url, "TIMESTAMPTZ").await;
    // Three rows at one instant (written by a UTC client), one later (a Beijing client).
    for id in 1..=3 {
        insert_row(&dept, true, id, "2025-06-04 01:30:00+00", "x").await;
    }
    insert_row(&dept, true, 4, "2025-06-04 09:45:00+08", "x").await;
    let mut cfg = config(dir.path(), port, &dir.path().join("unused"), 100_000);
    cfg.folders.clear();
    cfg.tables.push(table("pg", &url, "timestamp", 0));
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    adapter.pass().await.unwrap();
    let all = wait_for_ratings(dir.path(), port, 4, Duration::from_secs(30)).await;
    let at = |case: &str| {
        let r = all.iter().find(|r| r.case_number == case).unwrap();
        rating_hub::time::micros_from_timestamp(r.rated_at.as_ref().unwrap()).unwrap()
    };
    let cst_0930 =
        rating_hub_adapter_kit::mapping::parse_time("2025-06-04 09:30:00", "yyyy-MM-dd HH:mm:ss")
            .unwrap();
    for case in ["WM-1", "WM-2", "WM-3"] {
        assert_eq!(at(case), cst_0930, "{case}");
    }
    assert_eq!(at("WM-4"), cst_0930 + 15 * 60_000_000);
    // Another row, later: the watermark (a timestamp, compared as one) finds only it.
    insert_row(&dept, true, 5, "2025-06-04 10:00:00+08", "x").await;
    adapter.pass().await.unwrap();
    assert_eq!(
        wait_for_ratings(dir.path(), port, 5, Duration::from_secs(30))
            .await
            .len(),
        5
    );
    let c = adapter.spool.counts().await.unwrap();
    assert_eq!(c.waiting + c.delivered, 5);
    adapter.shutdown().await;
    dept.close().await;
    hub.shutdown().await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&admin_pool)
        .await;
}

/// `admin` (a postgres:// URL ending in its database) with the database replaced by `db`.
fn with_database(admin: &str, db: &str) -> String {
    let base = admin.rsplit_once('/').expect("URL with a database").0;
    format!("{base}/{db}")
}

/// Two adapters on one spool would read the same folders and tables twice and move the same
/// files: the second refuses to start, and says why; once the first stops, another starts.
#[tokio::test]
async fn a_second_adapter_on_the_same_spool_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let drop = dir.path().join("drop");
    std::fs::create_dir_all(&drop).unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let cfg = config(dir.path(), hub.local_addr.port(), &drop, 100_000);
    let first = rating_hub_legacy::start(cfg.clone()).await.unwrap();
    let err = match rating_hub_legacy::start(cfg.clone()).await {
        Ok(_) => panic!("a second adapter started on the same spool"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("another adapter is running"), "{err}");
    first.shutdown().await;
    rating_hub_legacy::start(cfg)
        .await
        .unwrap()
        .shutdown()
        .await;
}

/// The URL of the MariaDB test server: `RATING_HUB_TEST_MYSQL_URL`, or one started with
/// `scripts/mariadb` in a temp directory, stopped when this process exits.
fn mysql_admin_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("RATING_HUB_TEST_MYSQL_URL") {
            return url;
        }
        let dir = std::env::temp_dir().join(format!("rating-hub-mariadb-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mariadb");
        let out = Command::new(script)
            .arg("start")
            .arg(dir.join("server"))
            .args(["--watch", &std::process::id().to_string()])
            .output()
            .expect("run scripts/mariadb");
        assert!(
            out.status.success(),
            "scripts/mariadb could not start a server:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    })
}

/// The table poller against a real MariaDB (MySQL): a `TIMESTAMP` watermark written by a
/// UTC session reads as Beijing wall time (sqlx's +00:00 session shifted it 8 hours), a
/// tie across a batch loses nothing, and a GBK column arrives as its text.
#[tokio::test]
async fn a_mysql_table_with_a_timestamp_watermark_and_a_gbk_column() {
    let dir = tempfile::tempdir().unwrap();
    let hub = start_hub(dir.path(), 0, Arc::new(rating_hub::clock::SystemClock)).await;
    let port = hub.local_addr.port();
    sqlx::any::install_default_drivers();
    let admin = mysql_admin_url();
    let db = format!("legacy_{}", uuid::Uuid::now_v7().simple());
    let admin_pool = sqlx::AnyPool::connect(admin).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db} CHARACTER SET utf8mb4"))
        .execute(&admin_pool)
        .await
        .unwrap();
    let url = with_database(admin, &db);
    let dept = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    // The department's writer runs in UTC.
    sqlx::query("SET time_zone = '+00:00'")
        .execute(&dept)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE pj_evaluation (id INT PRIMARY KEY, bjbh VARCHAR(32), sxbm VARCHAR(32), \
         sxmc VARCHAR(64), xzqh VARCHAR(8), tyshxydm VARCHAR(18), myd INT, pjsj TIMESTAMP(0) NULL, \
         pjnr VARCHAR(100) CHARACTER SET gbk, sjhm VARCHAR(16))",
    )
    .execute(&dept)
    .await
    .unwrap();
    let insert = |id: i64, at: &'static str, text: &'static str| {
        let dept = dept.clone();
        async move {
            sqlx::query(
                "INSERT INTO pj_evaluation VALUES (?, ?, '530100-ITEM-2', '不动产登记', '530102', ?, 2, \
                 ?, ?, '13700001234')",
            )
            .bind(id)
            .bind(format!("MY-{id}"))
            .bind(org())
            .bind(at)
            .bind(text)
            .execute(&dept)
            .await
            .unwrap();
        }
    };
    for id in 1..=3 {
        insert(id, "2025-06-04 01:30:00", "很好").await;
    }
    insert(4, "2025-06-04 01:45:00", "x").await;
    let mut cfg = config(dir.path(), port, &dir.path().join("unused"), 100_000);
    cfg.folders.clear();
    cfg.tables.push(table("my", &url, "timestamp", 0));
    let adapter = rating_hub_legacy::start(cfg).await.unwrap();
    adapter.pass().await.unwrap();
    let all = wait_for_ratings(dir.path(), port, 4, Duration::from_secs(30)).await;
    let at = |case: &str| {
        let r = all.iter().find(|r| r.case_number == case).unwrap();
        rating_hub::time::micros_from_timestamp(r.rated_at.as_ref().unwrap()).unwrap()
    };
    let cst_0930 =
        rating_hub_adapter_kit::mapping::parse_time("2025-06-04 09:30:00", "yyyy-MM-dd HH:mm:ss")
            .unwrap();
    for case in ["MY-1", "MY-2", "MY-3"] {
        assert_eq!(at(case), cst_0930, "{case}");
        let r = all.iter().find(|r| r.case_number == case).unwrap();
        assert_eq!(r.text, "很好", "the GBK column as text");
    }
    assert_eq!(at("MY-4"), cst_0930 + 15 * 60_000_000);
    // Later rows: only they are read (the watermark compares as a timestamp).
    insert(5, "2025-06-04 02:00:00", "x").await;
    adapter.pass().await.unwrap();
    assert_eq!(
        wait_for_ratings(dir.path(), port, 5, Duration::from_secs(30))
            .await
            .len(),
        5
    );
    let c = adapter.spool.counts().await.unwrap();
    assert_eq!(c.waiting + c.delivered, 5, "{c:?}");
    adapter.shutdown().await;
    dept.close().await;
    hub.shutdown().await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE {db}"))
        .execute(&admin_pool)
        .await;
}

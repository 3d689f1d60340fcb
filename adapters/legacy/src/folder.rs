//! The drop folder: CSV (UTF-8 or GBK) and XML files. A file is taken only once it is
//! complete (unchanged for `settle_secs`, or its marker file is there), worked through
//! (spooling valid rows) and then moved to `done/` with a per-row report; rows that cannot be
//! ratings go to a reject report in `rejects/` (the rater's name, ID and phone masked). A
//! file that cannot be read at all goes to `rejects/` with the reason, and the pass carries
//! on. A crash part-way through leaves the file where it is: the next pass reads it again.
//!
//! A row's key is its content (or the mapped `source_key` column), not its file: the same
//! row read again — after a crash, in a file that grew, in a re-exported file — is the same
//! rating, spooled once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use quick_xml::events::Event;
use sha2::{Digest, Sha256};

use rating_hub::pb::v1 as pb;
use rating_hub_adapter_kit::{Metrics, Spool, source_key};

use crate::config::FolderConfig;
use crate::state::State;

type Record = BTreeMap<String, String>;

/// Masks one kind of personal data for a report.
type Mask = fn(&str) -> String;

/// Numbered records of a file (from 1), each parsed or with the reason it could not be.
pub type Rows = Vec<(usize, Result<Record, String>)>;

/// Decodes a file's bytes as configured.
pub fn decode(bytes: &[u8], encoding: &str) -> Result<String, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let utf8 = || std::str::from_utf8(bytes).map(str::to_owned);
    let gbk = || {
        encoding_rs::GBK
            .decode_without_bom_handling_and_without_replacement(bytes)
            .map(|c| c.into_owned())
    };
    match encoding {
        "utf-8" => {
            utf8().map_err(|_| "the file is not valid UTF-8 (set encoding = \"gbk\"?)".into())
        }
        "gbk" => gbk().ok_or_else(|| "the file is not valid GBK".into()),
        _ => utf8()
            .ok()
            .or_else(gbk)
            .ok_or_else(|| "the file is neither UTF-8 nor GBK".into()),
    }
}

/// CSV with a header row: one record per data row (numbered from 1), or why the row is bad.
pub fn parse_csv(text: &str) -> Result<Rows, String> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| format!("cannot read the header row: {e}"))?
        .clone();
    let mut out = Vec::new();
    for (i, row) in reader.records().enumerate() {
        let n = i + 1;
        out.push((
            n,
            match row {
                Err(e) => Err(format!("unreadable row: {e}")),
                Ok(r) if r.len() != headers.len() => Err(format!(
                    "the row has {} fields, the header has {}",
                    r.len(),
                    headers.len()
                )),
                Ok(r) => Ok(headers
                    .iter()
                    .zip(r.iter())
                    .map(|(h, v)| (h.to_owned(), v.to_owned()))
                    .collect()),
            },
        ));
    }
    Ok(out)
}

/// XML: every `<record_tag>` element is a record; its child elements are the fields.
pub fn parse_xml(text: &str, record_tag: &str) -> Result<Rows, String> {
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(true);
    let mut out = Vec::new();
    let mut current: Option<Record> = None;
    let mut field: Option<String> = None;
    let mut depth_in_record = 0usize;
    loop {
        match reader.read_event() {
            Err(e) => {
                return Err(format!(
                    "malformed XML at byte {}: {e}",
                    reader.buffer_position()
                ));
            }
            Ok(Event::Eof) => break,
            Ok(Event::Start(e)) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if current.is_none() && name == record_tag {
                    current = Some(Record::new());
                    depth_in_record = 0;
                } else if current.is_some() {
                    depth_in_record += 1;
                    if depth_in_record == 1 {
                        field = Some(name);
                    }
                }
            }
            Ok(Event::Empty(e)) => {
                if let Some(rec) = current.as_mut()
                    && depth_in_record == 0
                {
                    rec.insert(
                        String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                        String::new(),
                    );
                }
            }
            Ok(Event::Text(t)) => {
                if let (Some(rec), Some(f)) = (current.as_mut(), field.as_ref()) {
                    let v = t.decode().map_err(|e| format!("bad text in <{f}>: {e}"))?;
                    let v = quick_xml::escape::unescape(&v)
                        .map_err(|e| format!("bad entity in <{f}>: {e}"))?;
                    rec.entry(f.clone()).or_default().push_str(&v);
                }
            }
            Ok(Event::CData(t)) => {
                if let (Some(rec), Some(f)) = (current.as_mut(), field.as_ref()) {
                    rec.entry(f.clone())
                        .or_default()
                        .push_str(&String::from_utf8_lossy(&t));
                }
            }
            Ok(Event::End(e)) => {
                let name = String::from_utf8_lossy(e.name().as_ref()).into_owned();
                if current.is_some() {
                    if depth_in_record == 0 && name == record_tag {
                        let rec = current.take().unwrap_or_default();
                        out.push((out.len() + 1, Ok(rec)));
                    } else {
                        depth_in_record = depth_in_record.saturating_sub(1);
                        if depth_in_record == 0 {
                            field = None;
                        }
                    }
                }
            }
            Ok(_) => {}
        }
    }
    Ok(out)
}

/// What a file looked like when it was read: if it looks different when it is to be moved
/// to `done/`, someone was still writing it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Look {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn look(path: &Path) -> std::io::Result<Look> {
    let m = std::fs::metadata(path)?;
    Ok(Look {
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The marker file of `path` (`x.csv` + ".ok").
fn marker_of(path: &Path, marker: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(marker);
    PathBuf::from(p)
}

/// The folder's CSV and XML files that are complete: their marker is there, or they have
/// not changed for `settle_secs`.
fn files(cfg: &FolderConfig, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let now = std::time::SystemTime::now();
    let settle = std::time::Duration::from_secs(cfg.settle_secs);
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("csv") || e.eq_ignore_ascii_case("xml"))
        })
        .filter(|p| {
            if !cfg.marker.is_empty() {
                return marker_of(p, &cfg.marker).is_file();
            }
            // A modification time in the future (a clock skewed between hosts) counts as
            // just written.
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age >= settle))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// A row's key when no `source_key` column is mapped: a hash of its fields, names and
/// values, in name order (a re-export with its columns in another order is the same rows),
/// and which of the file's identical rows it is (two raters giving the same answer in the
/// same minute are two ratings; the same file read again gives each the same key).
fn content_key(prefix: &str, rec: &Record, nth: usize) -> String {
    let mut h = Sha256::new();
    for (k, v) in rec {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    let hash = hex::encode(&h.finalize()[..16]);
    // The first of its kind keeps the key it had before identical rows were told apart.
    match nth {
        1 => source_key(prefix, &[&hash]),
        _ => source_key(prefix, &[&hash, &nth.to_string()]),
    }
}

fn csv_line(cells: &[String]) -> String {
    cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Passes in a row a file may fail to be read before it is set aside.
const READ_ATTEMPTS: u32 = 3;

/// Counts one more strike against a file; returns how many it has.
async fn strike(state: &State, key: &str) -> anyhow::Result<u32> {
    let n = state
        .get(key)
        .await?
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0)
        + 1;
    state.set(key, &n.to_string()).await?;
    Ok(n)
}

/// Writes a report (it may quote raters' data) readable by the adapter's user only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    // A report an older version left 0644 becomes 0600 before it is written.
    #[cfg(unix)]
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Moves `from` into `dir`, not overwriting an earlier file of the same name.
fn move_into(from: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let name = from
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut to = dir.join(&name);
    let mut n = 1;
    while to.exists() {
        to = dir.join(format!("{name}.{n}"));
        n += 1;
    }
    std::fs::rename(from, &to)?;
    // The department's file holds raters' data in clear: once it is the adapter's to keep,
    // nobody else on the host reads it (it arrived with whatever mode the sender gave it).
    // Best effort: a file another account dropped may not be the adapter's to change; the
    // folder it is kept in is closed all the same, and the move must not be undone by this.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!(file = %to.display(), error = %e, "Cannot make a kept file private.");
        }
    }
    Ok(to)
}

/// The state's record of a file this adapter put in done/ or rejects/ (a moved file, a
/// report), with when: only these are ever deleted, and only after the retention period.
fn kept_key(folder: &str, path: &Path) -> String {
    format!("kept:{folder}:{}", path.display())
}

async fn keep_record(state: &State, folder: &str, path: &Path) -> anyhow::Result<()> {
    let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
    state.set(&kept_key(folder, path), &now.to_string()).await
}

/// Deletes the files this adapter put in done/ and rejects/ longer than `keep` ago: the
/// department's files (and the reports, which quote rejected rows) hold raters' personal
/// data in clear, and are kept only for the retention period. Files it did not put there,
/// or put there before it kept records, are never touched. Returns how many went.
async fn prune_kept(
    state: &State,
    folder: &str,
    keep: std::time::Duration,
) -> anyhow::Result<usize> {
    let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
    let before = now.saturating_sub(keep.as_micros().min(i64::MAX as u128) as i64);
    let prefix = format!("kept:{folder}:");
    let mut n = 0;
    for (name, at) in state.with_prefix(&prefix).await? {
        if at.parse::<i64>().is_ok_and(|at| at < before) {
            let path = &name[prefix.len()..];
            match std::fs::remove_file(path) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot delete a processed file; will try again.");
                    continue;
                }
            }
            state.delete(&name).await?;
        }
    }
    Ok(n)
}

/// One pass over the folder. A file that cannot be read is set aside in `rejects/` with the
/// reason; any other failure (the spool, the state) leaves the file for the next pass. The
/// other files are worked through either way; the first failure is returned.
pub async fn pass(
    cfg: &FolderConfig,
    spool: &Spool,
    state: &State,
    metrics: &Metrics,
    keep: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let dir = Path::new(&cfg.path);
    let (done, rejects) = (dir.join("done"), dir.join("rejects"));
    for dir in [&done, &rejects] {
        std::fs::create_dir_all(dir)?;
        // Only the adapter's user lists or reads what it keeps there.
        // Best effort: a folder made by another account (or on a file system without modes)
        // stays as it is, said once a while; the import goes on.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                && let Some(held) = rating_hub::telemetry::throttle("legacy.folder_mode")
            {
                tracing::warn!(folder = %dir.display(), error = %e, held, "Cannot close a kept folder to other users.");
            }
        }
    }
    if let Some(keep) = keep {
        let n = prune_kept(state, &cfg.name, keep).await?;
        if n > 0 {
            tracing::info!(folder = %cfg.name, files = n, "Deleted processed files past the retention period.");
        }
    }
    let mut first = None;
    for path in files(cfg, dir)? {
        if let Err(e) = file(cfg, &path, &done, &rejects, spool, state, metrics).await {
            metrics.inc("file_failures_total");
            tracing::warn!(
                folder = %cfg.name,
                file = %path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
                error = %e,
                "File not finished; will try again next pass."
            );
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Sets a file that cannot be read aside in `rejects/` (with its marker) and writes why.
async fn quarantine(
    cfg: &FolderConfig,
    state: &State,
    path: &Path,
    rejects: &Path,
    name: &str,
    why: &str,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let moved = move_into(path, rejects)?;
    keep_record(state, &cfg.name, &moved).await?;
    if !cfg.marker.is_empty() {
        let _ = std::fs::remove_file(marker_of(path, &cfg.marker));
    }
    // Named after the file as moved (a.csv.1 → a.csv.1.rejects.csv): two files of one name
    // never share a report.
    let report = {
        let mut name = moved.as_os_str().to_owned();
        name.push(".rejects.csv");
        PathBuf::from(name)
    };
    write_private(
        &report,
        format!("row,reason\n0,{}\n", csv_line(&[why.to_owned()])).as_bytes(),
    )?;
    keep_record(state, &cfg.name, &report).await?;
    metrics.inc("files_rejected_total");
    tracing::warn!(file = %name, reason = %why, "File rejected whole.");
    Ok(())
}

async fn file(
    cfg: &FolderConfig,
    path: &Path,
    done: &Path,
    rejects: &Path,
    spool: &Spool,
    state: &State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let before = look(path)?;
    // Strikes against this file as it is now (its size and time in the key: a new file of
    // the same name starts afresh). Stale entries are cleared below once it is read.
    let strikes = format!(
        "strikes:{}:{name}:{}:{:?}",
        cfg.name,
        before.len,
        before
            .modified
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
    );
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        // Unreadable (permissions, a lock the sender still holds, a network share's hiccup):
        // tried again on the next passes, and set aside after READ_ATTEMPTS in a row, so a
        // file that cannot be read does not fail every pass for ever.
        Err(e) => {
            let n = strike(state, &strikes).await?;
            if n < READ_ATTEMPTS {
                anyhow::bail!("cannot read the file (attempt {n} of {READ_ATTEMPTS}): {e}");
            }
            state.delete(&strikes).await?;
            return quarantine(
                cfg,
                state,
                path,
                rejects,
                &name,
                &format!("cannot read the file ({n} attempts): {e}"),
                metrics,
            )
            .await;
        }
    };
    // Changed while it was read (a writer that stalled longer than settle_secs, then went
    // on): nothing of it is taken now; the next pass sees it again.
    if look(path)? != before {
        tracing::info!(file = %name, "File changed while read; will read it again.");
        return Ok(());
    }
    // UTF-8 that stops mid-character at the very end is a file cut short, not GBK: wait
    // for the rest (before, "auto" read such a file as GBK, every row garbled). With its
    // marker there, or still so after READ_ATTEMPTS passes, it will not be completed: set
    // aside with the reason.
    if cfg.encoding != "gbk"
        && let Err(e) = std::str::from_utf8(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes))
        && e.error_len().is_none()
    {
        let n = strike(state, &strikes).await?;
        if cfg.marker.is_empty() && n < READ_ATTEMPTS {
            if let Some(held) = rating_hub::telemetry::throttle_for("legacy.file_cut", &name) {
                tracing::warn!(file = %name, held, "File ends mid-character: taken when complete.");
            }
            return Ok(());
        }
        state.delete(&strikes).await?;
        let why = "the file ends in the middle of a character: it was cut short";
        return quarantine(cfg, state, path, rejects, &name, why, metrics).await;
    }
    for (k, _) in state
        .with_prefix(&format!("strikes:{}:{name}:", cfg.name))
        .await?
    {
        state.delete(&k).await?;
    }
    let file_id = hex::encode(&Sha256::digest(&bytes)[..12]);
    let is_xml = name.to_ascii_lowercase().ends_with(".xml");
    let parsed = decode(&bytes, &cfg.encoding).and_then(|text| {
        if is_xml {
            parse_xml(&text, &cfg.xml_record)
        } else {
            parse_csv(&text)
        }
    });
    let records = match parsed {
        Ok(r) => r,
        Err(why) => {
            // The whole file is unreadable: it goes to rejects with the reason. Unless it
            // changed while it was read: then it is still being written.
            if look(path).ok().as_ref() != Some(&before) {
                tracing::info!(file = %name, "File changed while read; will read it again.");
                return Ok(());
            }
            return quarantine(cfg, state, path, rejects, &name, &why, metrics).await;
        }
    };
    let key_prefix = format!("file:{}", cfg.name);
    let checkpoint = format!("file:{}:{file_id}", cfg.name);
    let start: usize = state
        .get(&checkpoint)
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let end = (start + cfg.rows_per_pass).min(records.len());
    let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
    // Every row's fate, worked out again on each pass (mapping is deterministic).
    let mut outcomes: Vec<(usize, String, Result<pb::Rating, String>)> =
        Vec::with_capacity(records.len());
    let mut seen: std::collections::HashMap<&Record, usize> = std::collections::HashMap::new();
    for (row, rec) in &records {
        let key = match (cfg.mapping.source_of("source_key"), rec) {
            (Some(col), Ok(r)) if r.get(col).is_some_and(|v| !v.trim().is_empty()) => {
                source_key(&key_prefix, &[r[col].trim()])
            }
            (_, Ok(r)) => {
                let nth = seen.entry(r).or_default();
                *nth += 1;
                content_key(&key_prefix, r, *nth)
            }
            // An unreadable row is not spooled; its key only names it in the report.
            (_, Err(_)) => source_key(&key_prefix, &[&file_id, &row.to_string()]),
        };
        let result = rec.clone().and_then(|r| {
            cfg.mapping
                .rating(key.clone(), &|col| r.get(col).cloned(), now)
                .map_err(|v| {
                    v.iter()
                        .map(|x| format!("{}: {}", x.field, x.description))
                        .collect::<Vec<_>>()
                        .join("; ")
                })
        });
        outcomes.push((*row, key, result));
    }
    let batch: Vec<pb::Rating> = outcomes[start..end]
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok().cloned())
        .collect();
    for chunk in batch.chunks(500) {
        let conflicts = spool
            .put_many(chunk)
            .await?
            .into_iter()
            .filter(|o| *o == rating_hub_adapter_kit::Spooled::Conflict)
            .count();
        if conflicts > 0 {
            // A key reused by a different row: that row was not taken (the spool keeps the
            // first). Counted and said, never passed off as a re-read.
            metrics.add("rows_key_conflict_total", conflicts as u64);
            tracing::warn!(file = %name, conflicts, "Rows whose key was already spooled with different content were not taken.");
        }
    }
    metrics.add("file_rows_spooled_total", batch.len() as u64);
    state.set(&checkpoint, &end.to_string()).await?;
    if end < records.len() {
        tracing::info!(file = %name, rows = end, of = records.len(), "File partly processed; continuing next pass.");
        return Ok(());
    }
    // Finished: the per-row report, the rejects report, and the file moves to done/.
    // Still being written after all (it changed since it was read): not done; the next
    // pass reads it again, and the rows already spooled are the same keys.
    if look(path)? != before {
        tracing::info!(file = %name, "File changed while read; will read it again.");
        return Ok(());
    }
    let mut report = String::from("row,outcome,source_key,reason\n");
    let mut rejected = String::from("row,reason,record\n");
    let mut n_rejected = 0;
    let mut first_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    // Fields the rater's name, ID number and phone come from: masked in the reject report.
    let masks: Vec<(&str, Mask)> = [
        (
            "rater.name",
            rating_hub::domain::codes::mask_name as fn(&str) -> String,
        ),
        ("rater.id_number", rating_hub::domain::codes::mask_id_number),
        ("rater.phone", rating_hub::domain::codes::mask_phone),
    ]
    .into_iter()
    .filter_map(|(field, mask)| cfg.mapping.source_of(field).map(|col| (col, mask)))
    .collect();
    for ((row, key, result), (_, rec)) in outcomes.iter().zip(&records) {
        match result {
            Ok(_) => {
                let outcome = match first_of.get(key.as_str()) {
                    Some(first) => format!("duplicate of row {first}"),
                    None => {
                        first_of.insert(key, *row);
                        "spooled".into()
                    }
                };
                report.push_str(&format!(
                    "{}\n",
                    csv_line(&[row.to_string(), outcome, key.clone(), String::new()])
                ))
            }
            Err(why) => {
                n_rejected += 1;
                report.push_str(&format!(
                    "{}\n",
                    csv_line(&[row.to_string(), "rejected".into(), key.clone(), why.clone()])
                ));
                let raw = match rec {
                    Ok(r) => r
                        .iter()
                        .map(|(k, v)| match masks.iter().find(|(col, _)| col == k) {
                            Some((_, mask)) => format!("{k}={}", mask(v)),
                            // Any other column may carry a phone or an ID too (a text,
                            // an unmapped column): numbers that long are redacted.
                            None => format!("{k}={}", rating_hub::domain::codes::redact_numbers(v)),
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                    Err(_) => String::new(),
                };
                rejected.push_str(&format!(
                    "{}\n",
                    csv_line(&[row.to_string(), why.clone(), raw])
                ));
            }
        }
    }
    let moved = move_into(path, done)?;
    keep_record(state, &cfg.name, &moved).await?;
    if !cfg.marker.is_empty() {
        let _ = std::fs::remove_file(marker_of(path, &cfg.marker));
    }
    let moved_name = moved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report_path = done.join(format!("{moved_name}.report.csv"));
    write_private(&report_path, report.as_bytes())?;
    keep_record(state, &cfg.name, &report_path).await?;
    if n_rejected > 0 {
        let rejects_path = rejects.join(format!("{moved_name}.rejects.csv"));
        write_private(&rejects_path, rejected.as_bytes())?;
        keep_record(state, &cfg.name, &rejects_path).await?;
    }
    metrics.inc("files_done_total");
    metrics.add("file_rows_rejected_total", n_rejected as u64);
    tracing::info!(file = %name, rows = records.len(), rejected = n_rejected, "File done.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_and_bad_rows() {
        let rows = parse_csv("a,b\n1,2\n3\n\"x,y\",4\n").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1.as_ref().unwrap()["b"], "2");
        assert_eq!(
            rows[1].1.as_ref().unwrap_err(),
            "the row has 1 fields, the header has 2"
        );
        assert_eq!(rows[2].1.as_ref().unwrap()["a"], "x,y");
    }

    #[test]
    fn xml_records() {
        let xml = "<?xml version=\"1.0\"?><records><record><bjbh>A1</bjbh><myd>5</myd><note/></record>\
                   <record><bjbh>A2</bjbh><pj><![CDATA[很好 & 快]]></pj></record></records>";
        let rows = parse_xml(xml, "record").unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.as_ref().unwrap()["myd"], "5");
        assert_eq!(rows[1].1.as_ref().unwrap()["pj"], "很好 & 快");
        assert!(parse_xml("<records><record><a>1</b></record>", "record").is_err());
    }

    proptest::proptest! {
        #[test]
        fn file_parsers_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            for enc in ["utf-8", "gbk", "auto"] {
                if let Ok(text) = decode(&bytes, enc) {
                    let _ = parse_csv(&text);
                    let _ = parse_xml(&text, "record");
                }
            }
        }

        #[test]
        fn xml_like_text_never_panics(s in "(<record>|</record>|<a>|</a>|<b/>|<!\\[CDATA\\[|\\]\\]>|&amp;|&bad;|x|,|\"){0,40}") {
            let _ = parse_xml(&s, "record");
            let _ = parse_csv(&s);
        }
    }

    #[test]
    fn encodings() {
        let (gbk, _, _) = encoding_rs::GBK.encode("办件编号,满意度\n");
        assert_eq!(decode(&gbk, "gbk").unwrap(), "办件编号,满意度\n");
        assert_eq!(decode(&gbk, "auto").unwrap(), "办件编号,满意度\n");
        assert!(decode(&gbk, "utf-8").is_err());
        assert_eq!(decode("\u{feff}a".as_bytes(), "utf-8").unwrap(), "a");
    }
}

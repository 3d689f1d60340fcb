//! The intermediate database (中间库/前置库): a department's table read by a watermark column
//! through sqlx (SQLite, PostgreSQL, MySQL). Rows are spooled before the watermark moves, so a
//! crash re-reads at most one batch — and those rows' keys (the key columns) make them
//! duplicates, never second ratings. Rows that cannot be ratings are kept with their reason.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;
use sqlx::any::AnyPoolOptions;

use rating_hub::pb::v1 as pb;
use rating_hub_adapter_kit::{Metrics, Spool, source_key};

use crate::config::TableConfig;
use crate::state::State;

/// Column `i` of a row, read as the hexadecimal of its text's bytes, as text: `None` for
/// NULL, an error naming why when it is not UTF-8.
fn text_at(row: &sqlx::any::AnyRow, i: usize) -> anyhow::Result<Option<String>> {
    let Some(hex_text) = row.try_get::<Option<String>, _>(i)? else {
        return Ok(None);
    };
    let bytes = hex::decode(hex_text.trim())
        .map_err(|e| anyhow::anyhow!("the database's hexadecimal is not: {e}"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

/// The watermark's kinds: how a stored value is bound back into the query.
fn bind_cursor<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    kind: &str,
    value: &str,
) -> anyhow::Result<sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>> {
    Ok(if kind == "integer" {
        q.bind(
            value
                .parse::<i64>()
                .map_err(|_| anyhow::anyhow!("watermark {value:?} is not an integer"))?,
        )
    } else {
        q.bind(value.to_owned())
    })
}

/// Where a table stands: the committed watermark (every row at or below it is spooled and
/// no more can come), and the pending one (the highest value read, and when: it is
/// committed once `settle_secs` have passed, so a row whose transaction commits late — a
/// smaller id than one already read, a timestamp taken before a long transaction — is still
/// read).
struct Cursor {
    committed: Option<String>,
    pending: Option<(i64, String)>,
}

impl Cursor {
    async fn load(state: &State, name: &str) -> anyhow::Result<Self> {
        let committed = state.get(&format!("table:{name}")).await?;
        let pending = state
            .get(&format!("table:{name}:pending"))
            .await?
            .and_then(|v| {
                let (at, wm) = v.split_once(' ')?;
                Some((at.parse().ok()?, wm.to_owned()))
            });
        Ok(Self { committed, pending })
    }

    async fn commit(state: &State, name: &str, wm: &str) -> anyhow::Result<()> {
        state.set(&format!("table:{name}"), wm).await?;
        state.delete(&format!("table:{name}:pending")).await
    }

    async fn hold(state: &State, name: &str, at: i64, wm: &str) -> anyhow::Result<()> {
        state
            .set(&format!("table:{name}:pending"), &format!("{at} {wm}"))
            .await
    }
}

/// Opens a connection to the department's database, its session in China Standard Time: a
/// time-zone-aware column (PostgreSQL `timestamptz`, MySQL `TIMESTAMP`) reads as the wall
/// time the department wrote, not as UTC (sqlx opens sessions in UTC; read as Beijing time
/// that shifted every rating by 8 hours).
async fn connect(url: &str) -> anyhow::Result<sqlx::AnyPool> {
    let set_zone = if url.starts_with("postgres") {
        Some("SET TIME ZONE INTERVAL '+08:00' HOUR TO MINUTE")
    } else if url.starts_with("mysql") {
        Some("SET time_zone = '+08:00'")
    } else {
        None
    };
    Ok(AnyPoolOptions::new()
        .max_connections(1)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if let Some(sql) = set_zone {
                    sqlx::Executor::execute(conn, sql).await?;
                }
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// One pass: every row after the committed watermark, in batches. Rows are spooled before
/// any watermark moves; rows read again (the pending window, the rest of a tie) are the
/// same keys with the same content, so the spool takes them once.
pub async fn pass(
    cfg: &TableConfig,
    spool: &Spool,
    state: &State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let pool = connect(&cfg.url).await?;
    let result = read(cfg, &pool, spool, state, metrics).await;
    pool.close().await;
    result
}

async fn read(
    cfg: &TableConfig,
    pool: &sqlx::AnyPool,
    spool: &Spool,
    state: &State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let postgres = cfg.url.starts_with("postgres");
    let mysql = cfg.url.starts_with("mysql");
    // Every column is read as the hexadecimal of its text's bytes (plain ASCII, which every
    // driver passes as text), and decoded here: a value that is not UTF-8 rejects its row
    // with the reason (the driver, asked for the text itself, failed the whole batch — and
    // every pass after it). MySQL converts a column in another character set (GBK) to
    // UTF-8 first; a number or a date becomes its printed text everywhere.
    // Each is named by its position (rh__0, rh__1, …), never by its column's name: an alias named
    // like the column would be what `ORDER BY` sorts by — the hexadecimal text, so ids
    // 1, 10, 11, 2 — while `WHERE` compares the column itself (rows 2 to 9 were skipped).
    let as_bytes = |i: usize, c: &str| {
        if postgres {
            format!("encode(convert_to(CAST({c} AS TEXT), 'UTF8'), 'hex') AS rh__{i}")
        } else if mysql {
            format!("HEX(CONVERT({c} USING utf8mb4)) AS rh__{i}")
        } else {
            // SQLite's hex() of NULL is '', not NULL.
            format!("CASE WHEN {c} IS NULL THEN NULL ELSE hex({c}) END AS rh__{i}")
        }
    };
    let mut columns: BTreeSet<&str> = cfg.mapping.fields.values().map(String::as_str).collect();
    columns.extend(cfg.key_columns.iter().map(String::as_str));
    columns.remove(cfg.watermark.as_str());
    // The watermark first: a row whose watermark cannot be read stops the table (the cursor
    // cannot move past what it cannot name); any other column only rejects its row.
    let columns: Vec<&str> = std::iter::once(cfg.watermark.as_str())
        .chain(columns)
        .collect();
    let select = columns
        .iter()
        .enumerate()
        .map(|(i, c)| as_bytes(i, c))
        .collect::<Vec<_>>()
        .join(", ");
    let param = |n: usize| {
        let p = if postgres {
            format!("${n}")
        } else {
            "?".to_owned()
        };
        // A timestamp watermark is kept as the text the database printed; it goes back as
        // the column's own type, so the comparison (and an index) works on timestamps.
        match (cfg.watermark_type.as_str(), postgres, mysql) {
            ("timestamp", true, _) => format!("CAST({p} AS TIMESTAMPTZ)"),
            ("timestamp", _, true) => format!("CAST({p} AS DATETIME(6))"),
            _ => p,
        }
    };
    let (t, w, n) = (&cfg.table, &cfg.watermark, cfg.batch);
    let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
    let cursor = Cursor::load(state, &cfg.name).await?;
    // Rows whose watermark is NULL cannot be placed: never read, and said so (before, one such
    // row, sorted first, stopped the table for good).
    let nulls: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM {t} WHERE {w} IS NULL"))
        .fetch_one(pool)
        .await?;
    if nulls > 0
        && let Some(held) = rating_hub::telemetry::throttle_for("legacy.null_watermark", &cfg.name)
    {
        tracing::warn!(table = %cfg.name, rows = nulls, held, "Rows with a NULL watermark are not read: give them a value.");
    }
    let key_prefix = format!("table:{}", cfg.name);
    // Where this pass stands: never past a value that may still have unread rows.
    let mut at = cursor.committed.clone();
    let mut highest: Option<String> = None;
    loop {
        let sql = match &at {
            Some(_) => format!(
                "SELECT {select} FROM {t} WHERE {w} > {p} ORDER BY {w} LIMIT {n}",
                p = param(1)
            ),
            None => {
                format!("SELECT {select} FROM {t} WHERE {w} IS NOT NULL ORDER BY {w} LIMIT {n}")
            }
        };
        let mut q = sqlx::query(&sql);
        if let Some(v) = &at {
            q = bind_cursor(q, &cfg.watermark_type, v)?;
        }
        let mut rows = q.fetch_all(pool).await?;
        if rows.is_empty() {
            break;
        }
        let full = rows.len() == n as usize;
        let wm_of = |row: &sqlx::any::AnyRow| -> anyhow::Result<String> {
            text_at(row, 0)
                .map_err(|e| anyhow::anyhow!("the watermark column {w} cannot be read: {e}"))?
                .ok_or_else(|| anyhow::anyhow!("a row's watermark {w} is NULL"))
        };
        let last = wm_of(&rows[rows.len() - 1])?;
        let mut next = Some(last.clone());
        if full {
            // The batch may end inside a run of equal values (LIMIT cut it): the run is
            // read whole (before, `> last` skipped the rest of it). When the table holds no
            // more rows at `last` than the batch did, the run is complete; else, all of it
            // when the whole batch is one value, or again from the value before it.
            let mut before = None;
            let mut in_run = 0i64;
            for row in rows.iter().rev() {
                let v = wm_of(row)?;
                if v != last {
                    before = Some(v);
                    break;
                }
                in_run += 1;
            }
            let sql = format!("SELECT COUNT(*) FROM {t} WHERE {w} = {p}", p = param(1));
            let at_last: i64 = bind_cursor(sqlx::query(&sql), &cfg.watermark_type, &last)?
                .fetch_one(pool)
                .await?
                .try_get(0)?;
            if at_last > in_run {
                match before {
                    Some(b) => next = Some(b),
                    None => {
                        let sql = format!("SELECT {select} FROM {t} WHERE {w} = {p}", p = param(1));
                        rows = bind_cursor(sqlx::query(&sql), &cfg.watermark_type, &last)?
                            .fetch_all(pool)
                            .await?;
                    }
                }
            }
        }
        metrics.add("table_rows_read_total", rows.len() as u64);
        let mut good: Vec<pb::Rating> = Vec::new();
        for row in &rows {
            let mut rec = BTreeMap::new();
            let mut unreadable = Vec::new();
            for (i, c) in columns.iter().enumerate() {
                match text_at(row, i) {
                    Ok(v) => {
                        rec.insert(c.to_string(), v.unwrap_or_default());
                    }
                    Err(e) => unreadable.push(format!("{c}: {e}")),
                }
            }
            let ids: Vec<&str> = cfg
                .key_columns
                .iter()
                .map(|k| rec.get(k.as_str()).map_or("", String::as_str))
                .collect();
            let row_id = ids.join("/");
            let key = source_key(&key_prefix, &ids);
            let mapped = if unreadable.is_empty() {
                cfg.mapping
                    .rating(key.clone(), &|col| rec.get(col).cloned(), now)
                    .map_err(|v| {
                        v.iter()
                            .map(|x| format!("{}: {}", x.field, x.description))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
            } else {
                Err(unreadable.join("; "))
            };
            match mapped {
                Ok(r) => good.push(r),
                Err(why) => {
                    metrics.inc("table_rows_rejected_total");
                    tracing::warn!(table = %cfg.name, row = %row_id, reason = %why, "Row rejected.");
                    state.reject(&cfg.name, &row_id, &why).await?;
                }
            }
        }
        let outcomes = spool.put_many(&good).await?;
        let stored = outcomes
            .iter()
            .filter(|o| **o == rating_hub_adapter_kit::Spooled::Stored)
            .count();
        let conflicts = outcomes
            .iter()
            .filter(|o| **o == rating_hub_adapter_kit::Spooled::Conflict)
            .count();
        if conflicts > 0 {
            // A key reused by a different row: that row was not taken (the spool keeps the
            // first). Counted and said, never passed off as a re-read.
            metrics.add("rows_key_conflict_total", conflicts as u64);
            tracing::warn!(
                table = %cfg.name,
                conflicts,
                "Rows whose key was already spooled with different content were not taken."
            );
        }
        metrics.add("table_rows_spooled_total", stored as u64);
        // Everything up to `next` is read (the rest of a run at `last`, when the batch cut it,
        // is read on the next round).
        highest = next.clone();
        if at == next {
            break;
        }
        at = next;
        if !full {
            break;
        }
    }
    // Only now, with the rows durable in the spool, may a watermark move: at once when no
    // settling is asked for. Else a pending value is committed once it has waited
    // settle_secs — after this pass read again everything above the committed one, so a row
    // that committed late below it was just read — and the highest value read waits next.
    if cfg.settle_secs == 0 {
        if let Some(h) = highest {
            Cursor::commit(state, &cfg.name, &h).await?;
        }
    } else {
        let mut committed = cursor.committed;
        let mut pending = cursor.pending;
        if let Some((at, wm)) = &pending
            && now.saturating_sub(*at) >= cfg.settle_secs as i64 * 1_000_000
        {
            Cursor::commit(state, &cfg.name, wm).await?;
            committed = Some(wm.clone());
            pending = None;
        }
        if let Some(h) = highest
            && pending.is_none()
            && committed.as_deref() != Some(h.as_str())
        {
            Cursor::hold(state, &cfg.name, now, &h).await?;
        }
    }
    Ok(())
}

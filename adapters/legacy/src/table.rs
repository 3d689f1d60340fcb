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

/// One pass: every row after the watermark, in batches.
pub async fn pass(
    cfg: &TableConfig,
    spool: &Spool,
    state: &State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&cfg.url)
        .await?;
    let postgres = cfg.url.starts_with("postgres");
    let cast = if cfg.url.starts_with("mysql") {
        "CHAR"
    } else {
        "TEXT"
    };
    let mut columns: BTreeSet<&str> = cfg.mapping.fields.values().map(String::as_str).collect();
    columns.extend(cfg.key_columns.iter().map(String::as_str));
    columns.insert(&cfg.watermark);
    let columns: Vec<&str> = columns.into_iter().collect();
    let select = columns
        .iter()
        .map(|c| format!("CAST({c} AS {cast}) AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let checkpoint = format!("table:{}", cfg.name);
    let key_prefix = format!("table:{}", cfg.name);
    let placeholder = if postgres { "$1" } else { "?" };
    loop {
        let wm = state.get(&checkpoint).await?;
        let sql = match &wm {
            Some(_) => format!(
                "SELECT {select} FROM {t} WHERE {w} > {placeholder} ORDER BY {w} LIMIT {n}",
                t = cfg.table,
                w = cfg.watermark,
                n = cfg.batch
            ),
            None => format!(
                "SELECT {select} FROM {t} ORDER BY {w} LIMIT {n}",
                t = cfg.table,
                w = cfg.watermark,
                n = cfg.batch
            ),
        };
        let mut q = sqlx::query(&sql);
        if let Some(v) = &wm {
            q = if cfg.watermark_type == "integer" {
                q.bind(
                    v.parse::<i64>()
                        .map_err(|_| anyhow::anyhow!("watermark {v:?} is not an integer"))?,
                )
            } else {
                q.bind(v.clone())
            };
        }
        let rows = q.fetch_all(&pool).await?;
        if rows.is_empty() {
            break;
        }
        let now = rating_hub::clock::Clock::now_micros(&rating_hub::clock::SystemClock);
        let mut good: Vec<pb::Rating> = Vec::new();
        let mut last_wm = String::new();
        for row in &rows {
            let mut rec = BTreeMap::new();
            for (i, c) in columns.iter().enumerate() {
                let v: Option<String> = row.try_get(i)?;
                rec.insert(c.to_string(), v.unwrap_or_default());
            }
            last_wm = rec[cfg.watermark.as_str()].clone();
            let ids: Vec<&str> = cfg
                .key_columns
                .iter()
                .map(|k| rec[k.as_str()].as_str())
                .collect();
            let key = source_key(&key_prefix, &ids);
            match cfg
                .mapping
                .rating(key.clone(), &|col| rec.get(col).cloned(), now)
            {
                Ok(r) => good.push(r),
                Err(v) => {
                    let why = v
                        .iter()
                        .map(|x| format!("{}: {}", x.field, x.description))
                        .collect::<Vec<_>>()
                        .join("; ");
                    metrics.inc("table_rows_rejected_total");
                    tracing::warn!(table = %cfg.name, row = %ids.join("/"), reason = %why, "Row rejected.");
                    state.reject(&cfg.name, &ids.join("/"), &why).await?;
                }
            }
        }
        let conflicts = spool
            .put_many(&good)
            .await?
            .into_iter()
            .filter(|o| *o == rating_hub_adapter_kit::Spooled::Conflict)
            .count();
        if conflicts > 0 {
            // A key reused by a different row: that row was not taken (the spool keeps the
            // first). Counted and said, never passed off as a re-read.
            metrics.add("rows_key_conflict_total", conflicts as u64);
            tracing::warn!(
                conflicts,
                "Rows whose key was already spooled with different content were not taken."
            );
        }
        metrics.add("table_rows_spooled_total", good.len() as u64);
        // Only now, with the rows durable in the spool, does the watermark move.
        state.set(&checkpoint, &last_wm).await?;
        if rows.len() < cfg.batch as usize {
            break;
        }
    }
    pool.close().await;
    Ok(())
}

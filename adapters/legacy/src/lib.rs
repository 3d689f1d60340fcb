//! Legacy department systems: (a) an intermediate database table (中间库/前置库) read by a
//! watermark column through sqlx (SQLite, PostgreSQL, MySQL), and (b) a drop folder of CSV
//! (UTF-8 or GBK) and XML files. Columns and elements map to the canonical rating through the
//! kit's declarative mapping. Every row is either spooled (then forwarded to the hub) or
//! rejected with its reason in a report — never silently skipped. Source keys come from the
//! input (a table's key columns; a file's content hash and row number), so re-reading after a
//! crash never duplicates.

#![forbid(unsafe_code)]

pub mod config;
pub mod folder;
pub mod state;
pub mod table;

pub use config::LegacyConfig;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use rating_hub_adapter_kit::{Forwarder, Metrics, Spool};

/// A running adapter.
pub struct Legacy {
    pub spool: Spool,
    pub state: state::State,
    pub metrics: Arc<Metrics>,
    cfg: LegacyConfig,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    /// This adapter is the only one on its spool while this is open.
    _lock: std::fs::File,
}

impl Legacy {
    /// One pass over every folder and table.
    pub async fn pass(&self) -> anyhow::Result<()> {
        pass(&self.cfg, &self.spool, &self.state, &self.metrics).await
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        rating_hub_adapter_kit::runtime::stop_tasks(self.tasks).await;
    }
}

async fn pass(
    cfg: &LegacyConfig,
    spool: &Spool,
    state: &state::State,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    // Each source on its own: one that fails (a database down, a file that cannot be
    // spooled) does not hold the others back. Every failure is returned, one per line.
    let mut failed: Vec<String> = Vec::new();
    for f in &cfg.folders {
        let keep = (cfg.at_rest.retention_days > 0)
            .then(|| Duration::from_secs(cfg.at_rest.retention_days * 86_400));
        if let Err(e) = folder::pass(f, spool, state, metrics, keep).await {
            tracing::warn!(folder = %f.name, error = %e, "Folder pass failed; will retry.");
            failed.push(format!("folder {}: {e:#}", f.name));
        }
    }
    for t in &cfg.tables {
        if let Err(e) = table::pass(t, spool, state, metrics).await {
            metrics.inc("table_failures_total");
            tracing::warn!(table = %t.name, error = %e, "Table pass failed; will retry.");
            failed.push(format!("table {}: {e:#}", t.name));
        }
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(anyhow::anyhow!(failed.join("\n"))),
    }
}

/// Opens the spool and state and starts the forwarder and (unless `poll_secs` is 0) the
/// polling loop.
pub async fn start(cfg: LegacyConfig) -> anyhow::Result<Legacy> {
    sqlx::any::install_default_drivers();
    let at_rest = Arc::new(rating_hub_adapter_kit::AtRest::load(
        &cfg.at_rest,
        &cfg.spool,
    )?);
    let lock = rating_hub_adapter_kit::runtime::exclusive(&cfg.spool)?;
    let spool = Spool::open(&cfg.spool, at_rest).await?;
    let state = state::State::open(&cfg.state).await?;
    let metrics = Arc::new(Metrics::default());
    let (stop, stop_rx) = watch::channel(false);
    let forwarder = Forwarder {
        spool: spool.clone(),
        client: cfg.hub.ingest()?,
        batch: 500,
        metrics: metrics.clone(),
    };
    let mut tasks = vec![tokio::spawn(forwarder.run(stop_rx.clone()))];
    if cfg.poll_secs > 0 {
        let (cfg, spool, state, metrics) =
            (cfg.clone(), spool.clone(), state.clone(), metrics.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if let Err(e) = pass(&cfg, &spool, &state, &metrics).await {
                    tracing::warn!(error = %e, "Pass failed; will retry.");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(cfg.poll_secs)) => {}
                    _ = stop.changed() => return,
                }
            }
        }));
    }
    Ok(Legacy {
        _lock: lock,
        spool,
        state,
        metrics,
        cfg,
        stop,
        tasks,
    })
}

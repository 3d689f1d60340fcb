//! What every adapter binary and state file needs: logging, waiting for a stop signal, and a
//! durable local SQLite database.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

/// Logs to stderr; `RUST_LOG` chooses the level (info by default). Colour only on a terminal:
/// a log written to a file or a pipe carries no escape codes. Never log personal data.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Returns on Ctrl-C or SIGTERM.
pub async fn until_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Opens (creating, mode 0600) a local SQLite file in WAL mode with synchronous=FULL — a
/// commit is on disk when it returns — and runs `migrator`.
pub async fn open_sqlite(
    path: &str,
    migrator: &sqlx::migrate::Migrator,
) -> anyhow::Result<SqlitePool> {
    crate::at_rest::private_file(path)?;
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        // Deleted rows (a delivered rating pruned, a row sealed in place) are overwritten,
        // not left readable in free pages.
        .pragma("secure_delete", "ON")
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await?;
    migrator.run(&pool).await?;
    Ok(pool)
}

/// How long an adapter's tasks get to finish at shutdown (a request in flight, a batch
/// being sent) before they are cancelled: a connection that never completes its request
/// does not hold the adapter (and its spool lock) for ever.
pub const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);

/// Waits for `tasks` to finish, each at most [`SHUTDOWN_LIMIT`] in all, then cancels what
/// is left (and waits for the cancellation). What was acknowledged is in the spool already.
pub async fn stop_tasks(tasks: Vec<tokio::task::JoinHandle<()>>) {
    let deadline = tokio::time::Instant::now() + SHUTDOWN_LIMIT;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!("A task did not stop in time; cancelled.");
            t.abort();
            let _ = t.await;
        }
    }
}

/// Makes this process the only adapter running on the spool at `path`: an exclusive lock on
/// `<path>.lock`, held while the returned file is open (the system releases it when the
/// process ends, however it ends). A second adapter on the same spool — the same sources read
/// twice, the same files moved by two — refuses to start and says why. The spool commands
/// below take no lock: they work beside a running adapter.
pub fn exclusive(path: &str) -> anyhow::Result<std::fs::File> {
    let lock = format!("{path}.lock");
    if let Some(dir) = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).write(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let file = opts
        .open(&lock)
        .map_err(|e| anyhow::anyhow!("cannot open {lock}: {e}"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another adapter is running on the spool {path} (it holds {lock}); \
             two on one spool would read the same sources twice"
        ),
        Err(std::fs::TryLockError::Error(e)) => anyhow::bail!("cannot lock {lock}: {e}"),
    }
}

/// What an operator can do with an adapter's spool from the command line (the adapter may
/// be running: the spool is a WAL database, and the forwarder looks again within seconds).
#[derive(Debug, clap::Subcommand)]
pub enum SpoolCommand {
    /// How many ratings wait, were delivered, were refused by the hub.
    Counts,
    /// The ratings the hub refused, with its reasons (source key and reason per line).
    Refused,
    /// Puts refused ratings back in the queue: after the hub's rules or the adapter's scope
    /// were mended (e.g. `--outcome PERMISSION_DENIED`).
    Requeue {
        /// Only ratings whose refusal starts with this (INVALID, PERMISSION_DENIED, CONFLICT).
        #[arg(long)]
        outcome: Option<String>,
    },
}

impl SpoolCommand {
    /// Runs the command on the spool at `path`; prints its answer.
    pub async fn run(&self, path: &str, at_rest: &crate::AtRestConfig) -> anyhow::Result<()> {
        anyhow::ensure!(
            std::path::Path::new(path).exists(),
            "no spool at {path} (is the configuration the adapter's?)"
        );
        let spool = crate::Spool::open(
            path,
            std::sync::Arc::new(crate::AtRest::load(at_rest, path)?),
        )
        .await?;
        match self {
            SpoolCommand::Counts => {
                let c = spool.counts().await?;
                println!(
                    "waiting {}\ndelivered {}\nrefused {}",
                    c.waiting, c.delivered, c.refused
                );
            }
            SpoolCommand::Refused => {
                for (key, why) in spool.refused().await? {
                    println!("{key}\t{why}");
                }
            }
            SpoolCommand::Requeue { outcome } => {
                let n = spool.requeue(outcome.as_deref()).await?;
                println!("{n} refused ratings put back in the queue");
            }
        }
        Ok(())
    }
}

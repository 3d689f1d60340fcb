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

/// Opens (creating) a local SQLite file in WAL mode with synchronous=FULL — a commit is on
/// disk when it returns — and runs `migrator`.
pub async fn open_sqlite(
    path: &str,
    migrator: &sqlx::migrate::Migrator,
) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await?;
    migrator.run(&pool).await?;
    Ok(pool)
}

//! `rating-legacy --config legacy.toml`: the legacy systems adapter (tables and drop folders).

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Legacy department systems adapter for rating-hub (中间库 tables, CSV/XML drop folders)"
)]
struct Cli {
    /// The adapter's TOML configuration (see adapters/README.md).
    #[arg(long, short)]
    config: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = rating_hub_legacy::LegacyConfig::load(&Cli::parse().config)?;
    let adapter = rating_hub_legacy::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    adapter.shutdown().await;
    Ok(())
}

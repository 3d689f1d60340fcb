//! `rating-selfbuilt --config selfbuilt.toml`: the self-built platform webhook adapter.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "Webhook adapter for self-built rating platforms (rating-hub)"
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
    let cfg = rating_hub_selfbuilt::SelfbuiltConfig::load(&Cli::parse().config)?;
    let adapter = rating_hub_selfbuilt::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    adapter.shutdown().await;
    Ok(())
}

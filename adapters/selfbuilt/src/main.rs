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
    rating_hub_adapter_kit::runtime::init_logging();
    let cfg = rating_hub_selfbuilt::SelfbuiltConfig::load(&Cli::parse().config)?;
    let adapter = rating_hub_selfbuilt::start(cfg).await?;
    rating_hub_adapter_kit::runtime::until_signal().await?;
    adapter.shutdown().await;
    Ok(())
}

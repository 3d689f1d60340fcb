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
    rating_hub_adapter_kit::runtime::init_logging();
    let cfg = rating_hub_legacy::LegacyConfig::load(&Cli::parse().config)?;
    let adapter = rating_hub_legacy::start(cfg).await?;
    rating_hub_adapter_kit::runtime::until_signal().await?;
    adapter.shutdown().await;
    Ok(())
}

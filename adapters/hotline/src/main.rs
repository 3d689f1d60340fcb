//! `rating-hotline --config hotline.toml`: runs the 12345 hotline adapter until Ctrl-C/SIGTERM.

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "12345 hotline adapter for rating-hub (SMS replies and IVR keys)"
)]
struct Cli {
    /// The adapter's TOML configuration (see adapters/README.md).
    #[arg(long, short)]
    config: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rating_hub_adapter_kit::runtime::init_logging();
    let cli = Cli::parse();
    let cfg = rating_hub_hotline::HotlineConfig::load(&cli.config)?;
    let hotline = rating_hub_hotline::start(cfg).await?;
    rating_hub_adapter_kit::runtime::until_signal().await?;
    hotline.shutdown().await;
    Ok(())
}

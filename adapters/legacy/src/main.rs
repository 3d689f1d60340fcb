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
    /// Work on the spool instead of running (see `--help` of each).
    #[command(subcommand)]
    spool: Option<rating_hub_adapter_kit::runtime::SpoolCommand>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rating_hub_adapter_kit::runtime::init_logging();
    let cli = Cli::parse();
    let cfg = rating_hub_legacy::LegacyConfig::load(&cli.config)?;
    if let Some(cmd) = cli.spool {
        return cmd.run(&cfg.spool, &cfg.at_rest).await;
    }
    let adapter = rating_hub_legacy::start(cfg).await?;
    rating_hub_adapter_kit::runtime::until_signal().await?;
    adapter.shutdown().await;
    Ok(())
}

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let cfg = rating_hub_hotline::HotlineConfig::load(&cli.config)?;
    let hotline = rating_hub_hotline::start(cfg).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    hotline.shutdown().await;
    Ok(())
}

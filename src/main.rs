//! The `rating-hub` command: `serve` runs the hub; `config` prints the documented defaults.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use rating_hub::config::{Config, DEFAULT_CONFIG_TOML};

#[derive(Parser)]
#[command(
    version,
    about = "gRPC interoperability hub for 政务服务“好差评” ratings"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub until SIGTERM or Ctrl-C.
    Serve {
        /// TOML config file; without one the documented defaults apply.
        /// RATING_HUB__SECTION__KEY environment variables override both.
        #[arg(long, short, env = "RATING_HUB_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print the default configuration, every setting commented.
    Config,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            rating_hub::telemetry::init(&config.log);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(serve(config))
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let hub = rating_hub::server::start(&config).await?;
    shutdown_signal().await;
    tracing::info!("Shutdown requested; finishing in-flight calls and commits.");
    hub.shutdown().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGTERM; only Ctrl-C stops the hub.");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

//! `rating-hotline --config hotline.toml`: runs the 12345 hotline adapter until Ctrl-C/SIGTERM.
//! `rating-hotline reply --scale 5 TEXT`: prints how an SMS reply is read (the level, or why it
//! is not a rating), to check a gateway's traffic.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "12345 hotline adapter for rating-hub (SMS replies and IVR keys)"
)]
struct Cli {
    /// The adapter's TOML configuration (see adapters/README.md).
    #[arg(long, short)]
    config: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print how a reply is read under a scale: its level, or why it is not a rating.
    Reply {
        /// The survey's scale: 3, 4 or 5 levels.
        #[arg(long, default_value_t = 5)]
        scale: u32,
        /// Read as an IVR key result instead of an SMS text.
        #[arg(long)]
        ivr: bool,
        /// The reply, as the gateway delivered it.
        text: String,
    },
    /// The replies kept as not ratings (reason and masked text), oldest first.
    Unmatched,
    #[command(flatten)]
    Spool(rating_hub_adapter_kit::runtime::SpoolCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Reply { scale, ivr, text }) = cli.command {
        use rating_hub_hotline::reply::{Reply, Scale, parse_ivr, parse_sms};
        let scale = Scale::from_levels(scale)
            .ok_or_else(|| anyhow::anyhow!("--scale must be 3, 4 or 5"))?;
        let reply = if ivr {
            parse_ivr(&text, scale)
        } else {
            parse_sms(&text, scale)
        };
        match reply {
            Reply::Rating(level) => println!("rating: {}", level.as_str_name()),
            Reply::Replay => println!("not a rating: replay (0)"),
            Reply::NoKey => println!("not a rating: no key, empty"),
            Reply::Unrecognized(why) => println!("not a rating: {why}"),
        }
        return Ok(());
    }
    let config = cli.config.ok_or_else(|| {
        anyhow::anyhow!("--config FILE is required to run the adapter (or: rating-hotline reply …)")
    })?;
    rating_hub_adapter_kit::runtime::init_logging();
    let cfg = rating_hub_hotline::HotlineConfig::load(&config)?;
    match cli.command {
        Some(Command::Spool(cmd)) => return cmd.run(&cfg.spool, &cfg.at_rest).await,
        Some(Command::Unmatched) => {
            let at_rest = std::sync::Arc::new(rating_hub_adapter_kit::AtRest::load(
                &cfg.at_rest,
                &cfg.spool,
            )?);
            let surveys = rating_hub_hotline::surveys::Surveys::open(&cfg.state, at_rest).await?;
            for (at, ch, code, why, text) in surveys.unmatched_texts().await? {
                let at = rating_hub::time::format_cst_micros(at);
                println!("{at}\t{ch}\t{code}\t{why}\t{text}");
            }
            return Ok(());
        }
        _ => {}
    }
    let hotline = rating_hub_hotline::start(cfg).await?;
    rating_hub_adapter_kit::runtime::until_signal().await?;
    hotline.shutdown().await;
    Ok(())
}

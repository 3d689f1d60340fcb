//! The `rating-hub` command: `serve` runs the hub; `config` prints the documented defaults.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use rating_hub::config::{Config, DEFAULT_CONFIG_TOML};

mod admin_cli;
mod log_cli;

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
    /// Development PKI: CA, server and client certificates, revocation.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Privacy keys: the keys rater data is sealed with at rest ([privacy]).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// The verifiable rating log (a Merkle tree over the feed; [rating_log]).
    Log {
        #[command(subcommand)]
        command: log_cli::LogCommand,
    },
    /// The working-day calendar deadlines are counted on.
    Calendar {
        #[command(subcommand)]
        command: CalendarCommand,
    },
    /// Operate a running hub over mTLS with the operator's certificate (AdminService):
    /// upstreams, attempts, dead letters, replays, pause, resume, the PII access log, reload.
    Admin {
        #[command(flatten)]
        connection: admin_cli::Connection,
        #[command(subcommand)]
        command: admin_cli::AdminCommand,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Write a fresh random key (mode 0600) to PATH; refuses to replace an existing file.
    New {
        path: PathBuf,
        /// chacha20-poly1305 (32 bytes) or sm4-gcm (16 bytes).
        #[arg(long, default_value = "chacha20-poly1305")]
        algorithm: String,
    },
}

fn key(command: KeyCommand) -> anyhow::Result<()> {
    let KeyCommand::New { path, algorithm } = command;
    let algorithm: rating_hub::privacy::Algorithm =
        serde_json::from_value(serde_json::Value::String(algorithm.clone())).map_err(|_| {
            anyhow::anyhow!("--algorithm {algorithm:?}: must be chacha20-poly1305 or sm4-gcm")
        })?;
    if !rating_hub::privacy::PiiKeys::create_key_file_for(&path, algorithm)
        .with_context(|| format!("writing {}", path.display()))?
    {
        anyhow::bail!("{} exists; a key is never replaced", path.display());
    }
    println!(
        "Wrote a {} key to {} (mode 0600). Name it in [privacy.keys]{}.",
        algorithm.as_str(),
        path.display(),
        if algorithm == rating_hub::privacy::Algorithm::Sm4Gcm {
            " and give it \"sm4-gcm\" in [privacy.algorithms]"
        } else {
            ""
        }
    );
    Ok(())
}

#[derive(Subcommand)]
enum CalendarCommand {
    /// Print a year's days off and make-up working days, and whether they are the State
    /// Council's (official) or computed from the statutory holidays (provisional). With
    /// --file, the calendar in that file (check a new notice before loading it).
    Show {
        year: i64,
        /// TOML config file whose [rules] calendar to show (calendar_file, overrides).
        #[arg(long, short, env = "RATING_HUB_CONFIG")]
        config: Option<PathBuf>,
        /// A calendar data file (the format of src/rules/data/calendar.toml) to show instead.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn calendar(command: CalendarCommand) -> anyhow::Result<()> {
    let CalendarCommand::Show { year, config, file } = command;
    let cal = match file {
        Some(f) => rating_hub::rules::Calendar::parse(&std::fs::read_to_string(&f)?)?,
        None => Config::load(config.as_deref())?.rules.calendar()?,
    };
    let view = cal.year_view(year)?;
    const WEEKDAYS: [&str; 7] = ["一", "二", "三", "四", "五", "六", "日"];
    println!(
        "{year}: {} — {}",
        if view.provisional {
            "PROVISIONAL"
        } else {
            "official"
        },
        view.source
    );
    println!("days off ({}):", view.holidays.len());
    for d in &view.holidays {
        println!("  {d} 星期{}", WEEKDAYS[(d.weekday() - 1) as usize]);
    }
    println!("make-up working days, 调休 ({}):", view.workdays.len());
    for d in &view.workdays {
        println!("  {d} 星期{}", WEEKDAYS[(d.weekday() - 1) as usize]);
    }
    if view.provisional {
        println!(
            "No State Council notice for {year} is loaded: deadlines in it are provisional \
             and move when it is (rules.calendar_file)."
        );
    }
    Ok(())
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the CA, the localhost server certificate and the dev-admin client where missing.
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
    },
    /// Issue a client certificate whose CN is the principal name: <dir>/<name>.pem and .key.
    Client {
        /// The principal name, as registered in [principals.<name>].
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Re-issue the server certificate for these DNS names / IP addresses.
    Server {
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
    /// Revoke every certificate issued to a principal (--name), or one by serial (--serial):
    /// rewrites <dir>/crl.pem, which a running hub reads within a second.
    Revoke {
        #[arg(long, required_unless_present = "serial", conflicts_with = "serial")]
        name: Option<String>,
        /// A serial number in hex, as `certs list` prints it.
        #[arg(long)]
        serial: Option<String>,
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
    },
    /// List the client certificates issued: serial, principal, expiry, revoked or not.
    List {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
    },
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    use rating_hub::pki;
    match command {
        CertsCommand::Init { dir } => {
            let created = pki::init_dev(&dir)?;
            println!(
                "{} development PKI in {}",
                if created {
                    "created"
                } else {
                    "kept the existing"
                },
                dir.display()
            );
        }
        CertsCommand::Client { name, dir, days } => {
            let pair = pki::issue_client(&dir, &name, pki::Validity::days(days))?;
            println!(
                "certificate {}\nkey         {}",
                pair.cert.display(),
                pair.key.display()
            );
            println!("register it: [principals.{name}] in the hub's config (roles and scope)");
        }
        CertsCommand::Server { names, dir, days } => {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let pair = pki::issue_server(&dir, &names, pki::Validity::days(days))?;
            println!(
                "certificate {}\nkey         {}",
                pair.cert.display(),
                pair.key.display()
            );
        }
        CertsCommand::Revoke { name, serial, dir } => {
            let (what, crl) = match (name, serial) {
                (Some(name), _) => {
                    let crl = pki::revoke_client(&dir, &name)?;
                    (format!("every certificate of {name}"), crl)
                }
                (None, Some(serial)) => {
                    let crl = pki::revoke_serial(&dir, &serial)?;
                    (format!("serial {serial}"), crl)
                }
                (None, None) => unreachable!("clap requires --name or --serial"),
            };
            println!("revoked {what}; CRL written to {}", crl.display());
        }
        CertsCommand::List { dir } => {
            println!(
                "{:<34} {:<24} {:<22} status",
                "serial", "principal", "not after"
            );
            for c in pki::list_issued(&dir)? {
                println!(
                    "{:<34} {:<24} {:<22} {}",
                    c.serial_hex,
                    c.name,
                    c.not_after,
                    if c.revoked { "revoked" } else { "valid" }
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Config => {
            print!("{DEFAULT_CONFIG_TOML}");
            Ok(())
        }
        Command::Certs { command } => certs(command),
        Command::Calendar { command } => calendar(command),
        Command::Key { command } => key(command),
        Command::Log { command } => {
            let code = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(log_cli::run(command))?;
            if code != std::process::ExitCode::SUCCESS {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Admin {
            connection,
            command,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(admin_cli::run(connection, command)),
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
    // The handlers are in place before the hub says it listens: a SIGTERM sent as soon as
    // the address is known stops it cleanly, never by the signal's default action.
    let mut stop = StopSignals::install();
    // SIGHUP's handler too: a reload asked for during a slow start does not kill the hub.
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "Cannot listen for SIGHUP; reload with AdminService.ReloadConfig.");
            None
        }
    };
    // A stop during a slow start (migrations, a database that is late to answer) ends it.
    let hub = tokio::select! {
        hub = rating_hub::server::start(&config) => hub?,
        _ = stop.wait() => {
            tracing::info!("Stopped while starting.");
            return Ok(());
        }
    };
    // SIGHUP reads the configuration file again (principals take effect; see ReloadConfig).
    loop {
        #[cfg(unix)]
        let reload = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let reload = std::future::pending::<()>();
        tokio::select! {
            _ = stop.wait() => break,
            _ = reload => match hub.reload().await {
                Ok(r) => tracing::info!(principals = r.principals, "SIGHUP: configuration reloaded."),
                Err(why) => tracing::error!(error = %why, "SIGHUP: the configuration was not reloaded; the running one stays."),
            },
        }
    }
    tracing::info!("Shutdown requested; finishing in-flight calls and commits.");
    hub.shutdown().await
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment of `install`.
struct StopSignals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, signal = name, "Cannot listen for a stop signal.");
                    None
                }
            };
            Self {
                term: listen(SignalKind::terminate(), "SIGTERM"),
                int: listen(SignalKind::interrupt(), "SIGINT"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn wait(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = next(&mut self.term) => {}
                _ = next(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! `mc-mediator --config FILE`: the mediator daemon on the third site (DESIGN §10, §12).
//!
//! Parses the flags into a validated `Config` and calls `mediator::daemon::run`, which returns
//! after SIGTERM or SIGINT once the servers have stopped. A missing or damaged state file does
//! not stop it: it starts with its state lost (rule 5) and says so.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use mediator::config::Config;

/// The metro-cluster mediator: leases, epochs and automatic-switchover decisions.
#[derive(Debug, Parser)]
#[command(name = "mc-mediator", version, about)]
struct Args {
    /// The TOML configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Only check the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config).context("load the configuration")?;
    if args.check_config {
        println!("{config:#?}");
        return Ok(());
    }
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the runtime")?;
    runtime.block_on(async move {
        // The handlers are installed before the daemon prints its addresses, so a SIGTERM sent
        // as soon as it is listening stops it cleanly instead of killing it.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = interrupt.recv() => tracing::info!("SIGINT"),
            }
        };
        mediator::daemon::run(config, shutdown).await.context("run the mediator")
    })
}

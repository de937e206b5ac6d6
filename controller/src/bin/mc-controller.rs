//! `mc-controller --config FILE`: the controller daemon (DESIGN §4, §8, §12).
//!
//! Parses the flags into a validated `Config` and calls `controller::daemon::run`, which
//! returns after SIGTERM or SIGINT once the servers have stopped.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use controller::config::{Config, Overrides};

/// The metro-cluster storage controller.
#[derive(Debug, Parser)]
#[command(name = "mc-controller", version, about)]
struct Args {
    /// The TOML configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Overrides `listen.grpc`.
    #[arg(long)]
    grpc_listen: Option<String>,
    /// Overrides `listen.metrics`.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Overrides `listen.nbd`.
    #[arg(long)]
    nbd_listen: Option<String>,
    /// Overrides `nvlog.path`.
    #[arg(long)]
    nvlog_path: Option<PathBuf>,
    /// Overrides `dr_partner.address`.
    #[arg(long)]
    dr_partner_address: Option<String>,
    /// Overrides `timers.mirror_timeout_ms`.
    #[arg(long)]
    mirror_timeout_ms: Option<u64>,
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
    let overrides = Overrides {
        grpc_listen: args.grpc_listen,
        metrics_listen: args.metrics_listen,
        nbd_listen: args.nbd_listen,
        nvlog_path: args.nvlog_path,
        dr_partner_address: args.dr_partner_address,
        mirror_timeout_ms: args.mirror_timeout_ms,
    };
    let config = Config::load(&args.config, &overrides).context("load the configuration")?;
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
        controller::daemon::run(config, shutdown).await.context("run the controller")
    })
}

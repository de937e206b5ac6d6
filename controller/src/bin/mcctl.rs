//! `mcctl`: the administrator's command line (DESIGN §11, §12).
//!
//! So far the lab (`mcctl lab up|status|down|kill|start`, logic in `controller::lab`). Every
//! command prints a human table by default and one JSON object with `-o json`. Exit codes: 0
//! done, 1 failed, 2 bad usage (clap's).
//!
//! Invariants: with `-o json`, stdout carries exactly one JSON document per command and
//! everything else goes to stderr; a failure is one `error:` line (with its causes) on stderr and
//! exit code 1, never a panic.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use controller::config::Durability;
use controller::lab::{self, LabSite};
use serde::Serialize;

/// The metro-cluster administration tool.
#[derive(Debug, Parser)]
#[command(name = "mcctl", version, about)]
struct Cli {
    /// How to print results.
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

/// The command groups.
#[derive(Debug, Subcommand)]
enum Command {
    /// A two-site lab of real controllers on this machine (127.0.0.1).
    #[command(subcommand)]
    Lab(LabCommand),
}

/// `mcctl lab …`.
#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Creates and starts a lab in DIR (or restarts the lab DIR holds) and prints its NBD URIs.
    Up(UpArgs),
    /// Shows each controller's process and state, and the volumes.
    Status(DirArgs),
    /// Stops every controller of the lab (SIGTERM, SIGKILL after 30 s); the data stays.
    Down(DirArgs),
    /// Kills a site's controller with SIGKILL (kill -9).
    Kill(SiteArgs),
    /// Starts a site's controller again and waits until it serves.
    Start(StartArgs),
}

#[derive(Debug, Args)]
struct DirArgs {
    /// The lab directory.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct SiteArgs {
    /// The lab directory.
    #[arg(long)]
    dir: PathBuf,
    /// The site: A or B.
    #[arg(long, value_parser = parse_site)]
    site: LabSite,
}

#[derive(Debug, Args)]
struct StartArgs {
    #[command(flatten)]
    target: SiteArgs,
    /// The mc-controller binary [default: $MC_CONTROLLER_BIN, else next to mcctl].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// The lab directory: new or empty for a new lab, or one holding a lab to restart.
    #[arg(long)]
    dir: PathBuf,
    /// Return once the lab is ready, leaving it running (else stay until SIGINT/SIGTERM, then
    /// bring it down).
    #[arg(long)]
    detach: bool,
    /// Each volume's size in MiB [default: 1024].
    #[arg(long)]
    volume_size_mib: Option<u64>,
    /// Each controller's NVLog size in MiB [default: 256].
    #[arg(long)]
    nvlog_size_mib: Option<u64>,
    /// NVLog durability [default: process].
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// `timers.mirror_timeout_ms` [default: the product's].
    #[arg(long)]
    mirror_timeout_ms: Option<u64>,
    /// `timers.cp_interval_ms` [default: the product's].
    #[arg(long)]
    cp_interval_ms: Option<u64>,
    /// `timers.keepalive_interval_ms` [default: the product's].
    #[arg(long)]
    keepalive_interval_ms: Option<u64>,
    /// `timers.keepalive_timeout_ms` [default: the product's].
    #[arg(long)]
    keepalive_timeout_ms: Option<u64>,
    /// `timers.margin_ms` [default: the product's].
    #[arg(long)]
    margin_ms: Option<u64>,
    /// The mc-controller binary [default: $MC_CONTROLLER_BIN, else next to mcctl].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DurabilityArg {
    /// Durable once in the mapping: survives a process crash.
    Process,
    /// Durable once msynced: survives a power loss.
    Power,
}

fn parse_site(text: &str) -> Result<LabSite, String> {
    text.parse()
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    /// Tables for people.
    Table,
    /// One JSON object.
    Json,
}

/// A table of left-aligned columns.
#[derive(Debug, Default)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table { header: header.iter().map(|h| (*h).to_string()).collect(), rows: Vec::new() }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i >= widths.len() {
                    widths.push(0);
                }
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// Prints `value` as `format` asks: one JSON object, or the text `table` renders.
fn emit<T: Serialize>(
    format: OutputFormat,
    value: &T,
    table: impl FnOnce(&T) -> String,
) -> anyhow::Result<()> {
    let text = match format {
        OutputFormat::Json => {
            let mut text = serde_json::to_string_pretty(value).context("encode the result as JSON")?;
            text.push('\n');
            text
        }
        OutputFormat::Table => table(value),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).context("write to stdout")?;
    stdout.flush().context("flush stdout")
}

fn pid_text(pid: Option<u32>) -> String {
    pid.map_or_else(|| "-".to_string(), |pid| pid.to_string())
}

/// `path` as a shell word.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@%".contains(&b)) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

fn controllers_table(controllers: &[lab::ControllerReport]) -> String {
    let mut table = Table::new(&["NODE", "SITE", "PID", "ADMIN", "METRICS", "NBD", "LOG"]);
    for c in controllers {
        table.row(vec![
            c.node.to_string(),
            c.site.to_string(),
            pid_text(c.pid),
            c.admin.clone(),
            c.metrics.clone(),
            c.nbd.clone(),
            c.log.display().to_string(),
        ]);
    }
    table.render()
}

fn volumes_table(volumes: &[lab::VolumeReport], with_state: bool) -> String {
    let mut header = vec!["VOLUME", "SITE", "SIZE", "URI"];
    if with_state {
        header.push("STATE");
    }
    let mut table = Table::new(&header);
    for v in volumes {
        let mut row =
            vec![v.name.clone(), v.site.to_string(), format!("{} MiB", v.size_bytes >> 20), v.uri.clone()];
        if with_state {
            row.push(v.state.clone().unwrap_or_else(|| "-".into()));
        }
        table.row(row);
    }
    table.render()
}

fn up_text(report: &lab::UpReport) -> String {
    let dir = shell_word(&report.dir);
    let verb = if report.created { "created" } else { "restarted" };
    let mut out = format!("Lab {verb} in {} (cluster {})\n\n", report.dir.display(), report.cluster_id);
    out.push_str(&controllers_table(&report.controllers));
    out.push('\n');
    out.push_str(&volumes_table(&report.volumes, false));
    if let Some(volume) = report.volumes.first() {
        let size_mib = (volume.size_bytes >> 20).clamp(1, 256);
        let uri = &volume.uri;
        out.push_str(&format!(
            "\nTry:\n  qemu-io -f raw {uri}\n  nbdinfo {uri}\n  fio --ioengine=nbd --uri={uri} --rw=randwrite \
             --bs=4k --size={size_mib}m --name=x\n  mcctl lab status --dir {dir}\n  mcctl lab down --dir {dir}\n"
        ));
    }
    out
}

fn status_text(report: &lab::StatusReport) -> String {
    let mut out = format!("Lab in {} (cluster {})", report.dir.display(), report.cluster_id);
    if !report.complete {
        out.push_str(" — incomplete: its creation failed or was interrupted");
    }
    out.push_str("\n\n");
    let mut table = Table::new(&["NODE", "SITE", "PID", "RUNNING", "STATE", "ADMIN", "NBD", "REASON"]);
    for c in &report.controllers {
        table.row(vec![
            c.node.to_string(),
            c.site.to_string(),
            pid_text(c.pid),
            if c.running { "yes" } else { "no" }.to_string(),
            c.node_state.clone(),
            c.admin.clone(),
            c.nbd.clone(),
            c.reason.clone(),
        ]);
    }
    out.push_str(&table.render());
    out.push('\n');
    out.push_str(&volumes_table(&report.volumes, true));
    out
}

fn down_text(report: &lab::DownReport) -> String {
    let mut table = Table::new(&["NODE", "SITE", "PID", "STOPPED"]);
    for c in &report.controllers {
        let how = match c.how.as_str() {
            "sigterm" => "by SIGTERM",
            "sigkill" => "by SIGKILL",
            _ => "was not running",
        };
        table.row(vec![c.node.to_string(), c.site.to_string(), pid_text(c.pid), how.to_string()]);
    }
    table.render()
}

fn start_text(report: &lab::StartReport) -> String {
    let mut out = controllers_table(std::slice::from_ref(&report.controller));
    out.push_str(&format!("state: {} ({})\n", report.node_state, report.reason));
    if report.node_state != "serving" {
        out.push_str(
            "It serves once its DR partner runs and confirms its epoch: start the other site too.\n",
        );
    }
    out
}

fn up_options(args: &UpArgs) -> lab::UpOptions {
    lab::UpOptions {
        dir: args.dir.clone(),
        volume_size_mib: args.volume_size_mib,
        nvlog_size_mib: args.nvlog_size_mib,
        durability: args.durability.map(|d| match d {
            DurabilityArg::Process => Durability::Process,
            DurabilityArg::Power => Durability::Power,
        }),
        mirror_timeout_ms: args.mirror_timeout_ms,
        cp_interval_ms: args.cp_interval_ms,
        keepalive_interval_ms: args.keepalive_interval_ms,
        keepalive_timeout_ms: args.keepalive_timeout_ms,
        margin_ms: args.margin_ms,
        controller_bin: args.controller_bin.clone(),
    }
}

/// A SIGINT or SIGTERM.
struct Signals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("listen for SIGINT")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

async fn lab_up(args: &UpArgs, format: OutputFormat) -> anyhow::Result<()> {
    // Installed first: a Ctrl-C while the controllers start stops them instead of leaving them
    // running in their own sessions.
    let mut signals = Signals::new()?;
    let options = up_options(args);
    let report = tokio::select! {
        report = lab::up(&options) => report.context("bring the lab up")?,
        name = signals.recv() => {
            eprintln!("{name} while the lab starts: bringing it down");
            let _ = lab::down(&args.dir).await;
            anyhow::bail!("interrupted by {name} before the lab was ready; what had started was stopped");
        }
    };
    for note in &report.notes {
        eprintln!("note: {note}");
    }
    emit(format, &report, up_text)?;
    if args.detach {
        return Ok(());
    }
    let dir = shell_word(&report.dir);
    let hint = format!(
        "The lab runs while this command does: Ctrl-C (or SIGTERM) brings it down. `mcctl lab up --dir {dir} \
         --detach` leaves it running instead."
    );
    match format {
        OutputFormat::Table => println!("\n{hint}"),
        OutputFormat::Json => eprintln!("{hint}"),
    }
    let name = signals.recv().await;
    eprintln!("{name}: bringing the lab down");
    let down = lab::down(&report.dir).await.context("bring the lab down")?;
    if format == OutputFormat::Table {
        print!("{}", down_text(&down));
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    match cli.command {
        Command::Lab(LabCommand::Up(args)) => lab_up(&args, format).await,
        Command::Lab(LabCommand::Status(args)) => {
            let report = lab::status(&args.dir).await.context("read the lab's status")?;
            emit(format, &report, status_text)
        }
        Command::Lab(LabCommand::Down(args)) => {
            let report = lab::down(&args.dir).await.context("bring the lab down")?;
            emit(format, &report, down_text)
        }
        Command::Lab(LabCommand::Kill(args)) => {
            let report = lab::kill(&args.dir, args.site).await.context(format!("kill site {}", args.site))?;
            emit(format, &report, down_text)
        }
        Command::Lab(LabCommand::Start(args)) => {
            let site = args.target.site;
            let report = lab::start(&args.target.dir, site, args.controller_bin.as_deref())
                .await
                .context(format!("start site {site}"))?;
            emit(format, &report, start_text)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MCCTL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

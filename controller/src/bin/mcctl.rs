//! `mcctl`: the administrator's command line (DESIGN §11, §12).
//!
//! So far the lab (`mcctl lab up|status|down|kill|start`, logic in `controller::lab`) and the
//! first admin commands (`node show`, `aggregate show`, `plex show`, `volume show|create`, whose
//! output `controller::cli` renders). Every command prints a human table by default and one JSON
//! object with `-o json`. Exit codes (`controller::cli::EXIT_*`): 0 done, 1 failed, 2 bad usage
//! (clap's), 3 vetoed (kept for switchover).
//!
//! Invariants: with `-o json`, stdout carries exactly one JSON document per command and
//! everything else goes to stderr; a failure is one `error:` line (with its causes) on stderr and
//! exit code 1, never a panic;
//! - the show commands ask every node (`Admin.Status`, each within `RPC_TIMEOUT`) and print what
//!   the nodes that answered report, listing the others as unreachable; any unreachable node
//!   makes the exit code 1, after the output.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use controller::cli::{self, NodeAnswer, Table, Target};
use controller::config::Durability;
use controller::lab::{self, LabSite};
use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::{CreateVolumeRequest, StatusReply, StatusRequest};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// The deadline of each node's `Admin.Status` call, connecting included.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline of `Admin.CreateVolume` (its volume table is written to both plexes).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);

/// What `mcctl --help` says after the commands.
const AFTER_HELP: &str = "\
Exit codes:
  0  done
  1  failed: an RPC error, a node that did not answer (after printing what the others report),
     nothing matching a given name
  2  bad usage
  3  vetoed: the operation was refused by its checks (switchover; not used yet)

The admin commands find the cluster with --lab DIR (a lab made by `mcctl lab up`) or with
--endpoint HOST:PORT (once per node) and --cluster-id HEX.";

/// The metro-cluster administration tool.
#[derive(Debug, Parser)]
#[command(name = "mcctl", version, about, after_help = AFTER_HELP)]
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
    /// The controllers: state, DR mirror, consistency points.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The mirrored aggregates.
    #[command(subcommand)]
    Aggregate(AggregateCommand),
    /// The plexes of the aggregates.
    #[command(subcommand)]
    Plex(PlexCommand),
    /// The volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
}

/// `mcctl node …`.
#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Shows every node's state, DR mirror and consistency points.
    Show(ClusterArgs),
}

/// `mcctl aggregate …`.
#[derive(Debug, Subcommand)]
enum AggregateCommand {
    /// Shows the aggregates (or only NAME).
    Show(AggregateShowArgs),
}

/// `mcctl plex …`.
#[derive(Debug, Subcommand)]
enum PlexCommand {
    /// Shows the plexes of every aggregate (or only AGGREGATE's).
    Show(PlexShowArgs),
}

/// `mcctl volume …`.
#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Shows the volumes (or only NAME).
    Show(VolumeShowArgs),
    /// Creates a volume in an aggregate (on the node that owns it).
    Create(VolumeCreateArgs),
}

/// How the admin commands find the cluster: a lab directory, or addresses and the cluster id.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// The lab directory: its lab.json names both controllers and the cluster id.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["endpoint", "cluster_id"],
        required_unless_present = "endpoint"
    )]
    lab: Option<PathBuf>,
    /// A controller's admin address; give one per node (with --cluster-id).
    #[arg(long, value_name = "HOST:PORT", requires = "cluster_id")]
    endpoint: Vec<String>,
    /// The cluster id every request carries: 32 hex digits (with --endpoint).
    #[arg(long, value_name = "HEX", value_parser = cli::parse_cluster_id, requires = "endpoint")]
    cluster_id: Option<[u8; 16]>,
}

#[derive(Debug, Args)]
struct AggregateShowArgs {
    /// Only this aggregate.
    name: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct PlexShowArgs {
    /// Only this aggregate's plexes.
    aggregate: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct VolumeShowArgs {
    /// Only this volume.
    name: Option<String>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct VolumeCreateArgs {
    /// The aggregate that holds the volume.
    #[arg(long)]
    aggregate: String,
    /// The volume's name.
    #[arg(long)]
    name: String,
    /// Its size in MiB.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    size_mib: u64,
    #[command(flatten)]
    cluster: ClusterArgs,
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

/// The cluster an admin command talks to.
#[derive(Debug)]
struct Cluster {
    id: [u8; 16],
    targets: Vec<Target>,
}

impl Cluster {
    /// From `--lab DIR` or `--endpoint … --cluster-id` (clap has made sure exactly one is given).
    fn resolve(args: &ClusterArgs) -> anyhow::Result<Cluster> {
        if let Some(dir) = &args.lab {
            let state = lab::LabState::load(dir).context(format!("read the lab in {}", dir.display()))?;
            let id = state.cluster_bytes().context("read the lab's cluster id")?;
            let targets = state
                .controllers
                .iter()
                .map(|c| Target {
                    address: c.admin.clone(),
                    node: Some(c.node),
                    site: Some(c.site.to_string()),
                })
                .collect();
            return Ok(Cluster { id, targets });
        }
        let id = args.cluster_id.context("--endpoint needs --cluster-id")?;
        anyhow::ensure!(!args.endpoint.is_empty(), "give --lab DIR or --endpoint HOST:PORT");
        let targets = args
            .endpoint
            .iter()
            .map(|address| Target { address: address.clone(), node: None, site: None })
            .collect();
        Ok(Cluster { id, targets })
    }
}

/// A gRPC error in words: its message, else its code.
fn rpc_text(status: &tonic::Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// An error with its causes, as `anyhow`'s `{:#}` shows them (tonic's transport error alone says
/// only "transport error").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

async fn admin_client(address: &str) -> Result<AdminClient<Channel>, String> {
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address:?}: {e}"))?
        .connect_timeout(RPC_TIMEOUT)
        .connect()
        .await
        .map_err(|e| format!("connect: {}", error_chain(&e)))?;
    Ok(AdminClient::new(channel).max_decoding_message_size(64 << 20))
}

/// `Admin.Status` of the node at `address`, connecting included, within `RPC_TIMEOUT`.
async fn status_of(address: String, cluster: [u8; 16]) -> Result<StatusReply, String> {
    let call = async {
        let mut admin = admin_client(&address).await?;
        let mut request = tonic::Request::new(StatusRequest { cluster_id: cluster.to_vec() });
        request.set_timeout(RPC_TIMEOUT);
        admin.status(request).await.map(tonic::Response::into_inner).map_err(|s| rpc_text(&s))
    };
    tokio::time::timeout(RPC_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", RPC_TIMEOUT.as_secs())))
}

/// Every node's status, asked concurrently, in the order of the targets.
async fn ask_all(cluster: &Cluster) -> Vec<NodeAnswer> {
    let calls: Vec<_> =
        cluster.targets.iter().map(|t| tokio::spawn(status_of(t.address.clone(), cluster.id))).collect();
    let mut answers = Vec::with_capacity(calls.len());
    for (target, call) in cluster.targets.iter().zip(calls) {
        let result = call.await.unwrap_or_else(|e| Err(format!("status task: {e}")));
        answers.push(NodeAnswer { target: target.clone(), result });
    }
    answers
}

/// Writes `text` to stdout.
fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes()).context("write to stdout")?;
    stdout.flush().context("flush stdout")
}

/// Prints one JSON value, pretty.
fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("encode the result as JSON")?;
    text.push('\n');
    print(&text)
}

/// What a show command renders (both ways: rendering is cheap) and what a name filter missed.
struct Shown {
    table: String,
    json: serde_json::Value,
    /// With a name filter that matched nothing: what was looked for (`aggregate "aggr_x"`).
    not_found: Option<String>,
}

/// Asks every node, prints what `render` makes of their answers, and gives the exit code: 1
/// when a node did not answer or a name matched nothing, else 0.
async fn show(
    args: &ClusterArgs,
    format: OutputFormat,
    render: impl FnOnce(&[NodeAnswer]) -> Shown,
) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(args)?;
    let answers = ask_all(&cluster).await;
    let shown = render(&answers);
    match format {
        OutputFormat::Table => print(&shown.table)?,
        OutputFormat::Json => print_json(&shown.json)?,
    }
    let mut code = cli::EXIT_OK;
    let missing = cli::unreachable(&answers);
    if !missing.is_empty() {
        eprintln!("error: {} of {} nodes did not answer", missing.len(), answers.len());
        code = cli::EXIT_FAILED;
    }
    if let Some(what) = shown.not_found {
        eprintln!("error: no {what}");
        code = cli::EXIT_FAILED;
    }
    Ok(code)
}

/// `what` when a filter `name` was given and matched no row.
fn not_found(name: Option<&str>, rows: usize, what: &str) -> Option<String> {
    name.filter(|_| rows == 0).map(|n| format!("{what} {n:?}"))
}

async fn volume_create(args: &VolumeCreateArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let size_bytes = args.size_mib.checked_mul(1 << 20).context("--size-mib is too large")?;
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let owner = answers.iter().find_map(|a| {
        let reply = a.result.as_ref().ok()?;
        reply.aggregates.iter().any(|aggr| aggr.name == args.aggregate).then_some((a, reply))
    });
    let Some((owner, reply)) = owner else {
        let missing = cli::unreachable(&answers);
        if missing.is_empty() {
            anyhow::bail!("no node has aggregate {:?}", args.aggregate);
        }
        let list: Vec<String> = missing.iter().map(|u| format!("{} ({})", u.endpoint, u.error)).collect();
        anyhow::bail!(
            "no node that answered has aggregate {:?}; did not answer: {}",
            args.aggregate,
            list.join(", ")
        );
    };
    let address = &owner.target.address;
    let node = reply.identity.as_ref().map(|i| i.sender_node).or(owner.target.node);
    let mut admin = admin_client(address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the owner at {address}"))?;
    let mut request = tonic::Request::new(CreateVolumeRequest {
        cluster_id: cluster.id.to_vec(),
        aggregate: args.aggregate.clone(),
        name: args.name.clone(),
        size_bytes,
    });
    request.set_timeout(CREATE_TIMEOUT);
    let volume = admin
        .create_volume(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("create volume {:?} in aggregate {:?} at {address}", args.name, args.aggregate))?
        .into_inner();
    let row = cli::volume_row(&volume, &args.aggregate, node);
    match format {
        OutputFormat::Table => print(&cli::volume_rows_table(std::slice::from_ref(&row)))?,
        OutputFormat::Json => print_json(&serde_json::json!({ "volumes": [row] }))?,
    }
    Ok(cli::EXIT_OK)
}

async fn run(args: Cli) -> anyhow::Result<u8> {
    let format = args.output;
    match args.command {
        Command::Lab(command) => run_lab(command, format).await.map(|()| cli::EXIT_OK),
        Command::Node(NodeCommand::Show(args)) => {
            show(&args, format, |answers| Shown {
                table: cli::nodes_table(answers),
                json: cli::nodes_json(answers),
                not_found: None,
            })
            .await
        }
        Command::Aggregate(AggregateCommand::Show(args)) => {
            let name = args.name.as_deref();
            show(&args.cluster, format, |answers| Shown {
                table: cli::aggregates_table(answers, name),
                json: cli::aggregates_json(answers, name),
                not_found: not_found(name, cli::aggregate_rows(answers, name).len(), "aggregate"),
            })
            .await
        }
        Command::Plex(PlexCommand::Show(args)) => {
            let aggregate = args.aggregate.as_deref();
            show(&args.cluster, format, |answers| Shown {
                table: cli::plexes_table(answers, aggregate),
                json: cli::plexes_json(answers, aggregate),
                not_found: not_found(aggregate, cli::aggregate_rows(answers, aggregate).len(), "aggregate"),
            })
            .await
        }
        Command::Volume(VolumeCommand::Show(args)) => {
            let name = args.name.as_deref();
            show(&args.cluster, format, |answers| Shown {
                table: cli::volumes_table(answers, name),
                json: cli::volumes_json(answers, name),
                not_found: not_found(name, cli::volume_rows(answers, name).len(), "volume"),
            })
            .await
        }
        Command::Volume(VolumeCommand::Create(args)) => volume_create(&args, format).await,
    }
}

async fn run_lab(command: LabCommand, format: OutputFormat) -> anyhow::Result<()> {
    match command {
        LabCommand::Up(args) => lab_up(&args, format).await,
        LabCommand::Status(args) => {
            let report = lab::status(&args.dir).await.context("read the lab's status")?;
            emit(format, &report, status_text)
        }
        LabCommand::Down(args) => {
            let report = lab::down(&args.dir).await.context("bring the lab down")?;
            emit(format, &report, down_text)
        }
        LabCommand::Kill(args) => {
            let report = lab::kill(&args.dir, args.site).await.context(format!("kill site {}", args.site))?;
            emit(format, &report, down_text)
        }
        LabCommand::Start(args) => {
            let site = args.target.site;
            let report = lab::start(&args.target.dir, site, args.controller_bin.as_deref())
                .await
                .context(format!("start site {site}"))?;
            emit(format, &report, start_text)
        }
    }
}

fn main() -> ExitCode {
    let args = Cli::parse();
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
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::EXIT_FAILED)
        }
    }
}

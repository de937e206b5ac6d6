//! `mcctl`: the administrator's command line (DESIGN §11, §12).
//!
//! So far the lab (`mcctl lab up|status|down|kill|start`, two controllers and, unless
//! `--no-mediator`, the mediator; logic in `controller::lab`), `mediator show` (`--lab DIR` or
//! `--mediator HOST:PORT --cluster-id HEX`), the
//! admin commands (`cluster show`, `node show|unfence`, `aggregate show`, `plex show`,
//! `volume show|create|modify|delete`, `switchover --forced-on-disaster`, `operation show`,
//! `mirror status`, `check run|show`, whose output `controller::cli` renders; `--watch` on the
//! show commands), and `completions` and `man`, generated from the clap definition. Every command prints a human table by default and one JSON
//! object with `-o json`. Exit codes (`controller::cli::EXIT_*`): 0 done, 1 failed, 2 bad usage
//! (clap's, and `Usage` errors found after parsing), 3 vetoed (switchover).
//!
//! Invariants: with `-o json`, stdout carries exactly one JSON document per command (with
//! `--watch`: one per round, separated by a blank line) and
//! everything else goes to stderr; a failure is one `error:` line (with its causes) on stderr and
//! exit code 1, never a panic;
//! - the show commands ask every node (`Admin.Status`, each within `RPC_TIMEOUT`) and print what
//!   the nodes that answered report, listing the others as unreachable; any unreachable node
//!   makes the exit code 1, after the output;
//! - nothing destructive happens without the operator's confirmation: `volume delete`,
//!   `node unfence` and clearing an NVFAILed state need `--confirm`; a forced switchover needs
//!   `--confirm` or "yes" typed at the prompt of a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, CommandFactory, Parser, Subcommand, ValueEnum};
use controller::cli::{
    self, NodeAnswer, OperationsAnswer, SwitchbackOutcome, SwitchoverOutcome, Table, Target,
};
use controller::config::Durability;
use controller::lab::{self, LabSite};
use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::{
    CreateVolumeRequest, DeleteVolumeRequest, HealRequest, MirrorControlRequest, ModifyVolumeRequest,
    Operation, OperationsRequest, StatusReply, StatusRequest, SwitchbackReply, SwitchbackRequest,
    SwitchoverReply, SwitchoverRequest, UnfenceRequest, VolumeInfo,
};
use prost::Message;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

/// The deadline of each node's `Admin.Status` call, connecting included.
const RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// The deadline of `Admin.CreateVolume`, `ModifyVolume` and `DeleteVolume` (the volume table is
/// written to both plexes).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The deadline of `Admin.Switchover` and `Admin.Unfence`: replay, CP and exports take a while.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);
/// What a forced switchover asks the operator at a terminal without `--confirm`.
const SWITCHOVER_PROMPT: &str = "The partner site must be down or isolated; a forced switchover while it \
                                 still writes loses data. Type 'yes' to continue: ";

/// What `mcctl --help` says after the commands.
const AFTER_HELP: &str = "\
Exit codes:
  0  done
  1  failed: an RPC error, a node that did not answer (after printing what the others report),
     nothing matching a given name, a switchover or unfence whose operation ended failed or
     partially_successful
  2  bad usage (also: a destructive command without --confirm, a forced switchover that cannot
     tell which node survives)
  3  vetoed: the operation was refused by its checks (switchover; with --simulate: it would be)

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
    /// The MetroCluster configuration: its mode and each node's.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Switches the DR partner's aggregates over to the surviving node (only
    /// --forced-on-disaster so far).
    Switchover(SwitchoverArgs),
    /// After a switchover, with the other site's controller back (waiting for switchback): takes
    /// what its unreleased records touch into the resync set, has it discard them, reattaches the
    /// home plexes at its site and waits for their resync (progress on a terminal).
    Heal(HealArgs),
    /// Hands the switched-over aggregates back to their home node: needs heal done and both plexes
    /// normal; drains, CP, raises the epochs, and the home node serves again.
    Switchback(SwitchbackArgs),
    /// The operations (switchover, heal, switchback, unfence) the nodes ran.
    #[command(subcommand)]
    Operation(OperationCommand),
    /// The plex mirrors of the aggregates, DataKeeper style.
    #[command(subcommand)]
    Mirror(MirrorCommand),
    /// Health checks of nodes, DR mirrors, aggregates and volumes (exit code 1 on a warning).
    #[command(subcommand)]
    Check(CheckCommand),
    /// The mediator on the third site (DESIGN §10).
    #[command(subcommand)]
    Mediator(MediatorCommand),
    /// Prints a shell completion script (e.g. `mcctl completions bash > /etc/bash_completion.d/mcctl`).
    Completions(CompletionsArgs),
    /// Prints mcctl's man page (roff: `mcctl man | man -l -`).
    Man,
}

/// `mcctl mirror …`.
#[derive(Debug, Subcommand)]
enum MirrorCommand {
    /// Shows each aggregate's mirror: state, type, source and target plex, bitmap, dirty regions,
    /// resync progress (only the mirror of NAME, an aggregate or a volume, when given).
    Status(MirrorStatusArgs),
    /// Pauses the mirror of NAME's aggregate: its plex at the other site is detached (a drop,
    /// recorded at the DR partner, S3) and stays detached, even across restarts, until `resume`.
    /// Writes go on, tracked in the dirty bitmap; meanwhile the other site's copy is out of date.
    Pause(MirrorControlArgs),
    /// Resumes a paused mirror: the plex is reattached and the regions written meanwhile are
    /// resynced (waits for the resync, with progress, unless --no-wait).
    Resume(MirrorControlArgs),
    /// Copies every region of NAME's aggregate to its plex at the other site again (waits, with
    /// progress, unless --no-wait).
    Fullresync(MirrorControlArgs),
}

#[derive(Debug, Args)]
struct MirrorControlArgs {
    /// The aggregate, or a volume of it.
    name: String,
    /// Return without waiting for the resync (resume, fullresync).
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting for the resync after SECONDS (it goes on in the background).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    timeout: u64,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct MirrorStatusArgs {
    /// Only the mirror of this volume (or aggregate).
    name: Option<String>,
    #[command(flatten)]
    watch: WatchArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `mcctl check …`.
#[derive(Debug, Subcommand)]
enum CheckCommand {
    /// Checks every node, DR mirror, aggregate and volume, prints ok or warning with a reason for
    /// each, and stores the result (--lab DIR: DIR/check.json; else under $XDG_STATE_HOME/mcctl
    /// or ~/.local/state/mcctl).
    Run(ClusterArgs),
    /// Prints the result `check run` stored last, and when it ran.
    Show(ClusterArgs),
}

#[derive(Debug, Args)]
struct CompletionsArgs {
    /// The shell.
    shell: clap_complete::Shell,
}

/// `--watch [SECONDS]` of the show commands.
#[derive(Debug, Args)]
struct WatchArgs {
    /// Redraw every SECONDS (default 2) until Ctrl-C; not on a terminal, print successive snapshots
    /// separated by a blank line. Give it after a positional name, or as --watch=N.
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        default_missing_value = "2",
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    watch: Option<u64>,
}

#[derive(Debug, Args)]
struct NodeShowArgs {
    #[command(flatten)]
    watch: WatchArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `mcctl cluster …`.
#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Shows the cluster's mode (normal, switchover, …) and each node's mode and state.
    Show(ClusterArgs),
}

/// `mcctl operation …`.
#[derive(Debug, Subcommand)]
enum OperationCommand {
    /// Shows the last operation of every node (all of them with --all).
    Show(OperationShowArgs),
    /// Shows every operation the nodes' journals hold, oldest first (`show --all`).
    History(ClusterArgs),
}

/// `mcctl mediator …`.
#[derive(Debug, Subcommand)]
enum MediatorCommand {
    /// What the mediator sees: which failure (site lost, inter-site link lost, mediator link
    /// lost), each controller's last report, each aggregate's epoch and in-sync record, whether
    /// an automatic switchover towards each site is enabled and why not, the last decision.
    Show(MediatorShowArgs),
    /// Tells a mediator that lost its state (DESIGN §10 rule 5) that these controllers are down,
    /// so it may grant again without waiting for their reports. Only for controllers that are
    /// really down: a controller confirmed down that still runs could be switched over while
    /// it writes. Needs --confirm.
    ConfirmDown(MediatorConfirmDownArgs),
}

#[derive(Debug, Args)]
struct MediatorConfirmDownArgs {
    /// The controllers (node ids) that are down.
    #[arg(long = "node", value_name = "NODE", required = true)]
    nodes: Vec<u32>,
    /// Confirms that they are down (powered off or isolated from hosts and from the other site).
    #[arg(long)]
    confirm: bool,
    #[command(flatten)]
    target: MediatorShowArgs,
}

#[derive(Debug, Args)]
struct MediatorShowArgs {
    /// The lab directory: its lab.json names the lab's mediator and the cluster id.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with_all = ["mediator", "cluster_id"],
        required_unless_present = "mediator"
    )]
    lab: Option<PathBuf>,
    /// The mediator's gRPC address (with --cluster-id).
    #[arg(long, value_name = "HOST:PORT", requires = "cluster_id")]
    mediator: Option<String>,
    /// The cluster id: 32 hex digits (with --mediator).
    #[arg(long, value_name = "HEX", value_parser = cli::parse_cluster_id, requires = "mediator")]
    cluster_id: Option<[u8; 16]>,
}

#[derive(Debug, Args)]
struct HealArgs {
    /// Return once the home plexes are reattached, without waiting for their resync.
    #[arg(long)]
    no_wait: bool,
    /// Give up waiting for the resync after SECONDS (it goes on in the background).
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    timeout: u64,
    /// The site of the node serving the switched-over aggregates [default: the node in switchover].
    #[arg(long, value_parser = parse_site)]
    site: Option<LabSite>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct SwitchbackArgs {
    /// Only evaluate the vetoes; change nothing.
    #[arg(long)]
    simulate: bool,
    /// The site of the node serving the switched-over aggregates [default: the node in switchover].
    #[arg(long, value_parser = parse_site)]
    site: Option<LabSite>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct OperationShowArgs {
    /// Every operation the nodes' journals hold, not only the last one.
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct SwitchoverArgs {
    /// The partner site is lost: take its aggregates over without its cooperation (replaying its
    /// NVLog records from this node's copy). Without it, a negotiated switchover: both sites are
    /// up, the partner drains, makes a CP and releases its aggregates to the node of --site.
    #[arg(long)]
    forced_on_disaster: bool,
    /// Only evaluate the vetoes; change nothing.
    #[arg(long)]
    simulate: bool,
    /// Go on despite soft vetoes (aggregates out of sync or of unknown state): their volumes are
    /// NVFAILed.
    #[arg(long)]
    override_vetoes: bool,
    /// NVFAIL every volume taken over.
    #[arg(long)]
    force_nvfail_all: bool,
    /// The partner site is down or isolated: skip the prompt.
    #[arg(long)]
    confirm: bool,
    /// The surviving site, whose node takes over [default: the only node that answers].
    #[arg(long, value_parser = parse_site)]
    site: Option<LabSite>,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct UnfenceArgs {
    /// The fenced node's id.
    node: u32,
    /// Required: raise the epochs although nobody confirmed them (S2); every volume is NVFAILed.
    #[arg(long, required = true)]
    force: bool,
    /// Required: the operator has checked that no other node serves these aggregates.
    #[arg(long, required = true)]
    confirm: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// An NVFAIL option's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    /// Set.
    On,
    /// Cleared.
    Off,
}

impl OnOff {
    fn value(self) -> bool {
        self == OnOff::On
    }
}

/// `--in-nvfailed-state` takes only `false`: an operator clears the state, never sets it.
fn parse_false(text: &str) -> Result<bool, String> {
    match text {
        "false" => Ok(false),
        _ => Err("only `false` is accepted: the NVFAILed state is cleared, never set by hand".into()),
    }
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("change").required(true).multiple(true).args(["nvfail", "dr_force_nvfail", "in_nvfailed_state"])
))]
struct VolumeModifyArgs {
    /// The volume.
    name: String,
    /// Fence the volume when NVLog records may have been lost.
    #[arg(long, value_enum)]
    nvfail: Option<OnOff>,
    /// Fence the volume on every forced switchover.
    #[arg(long, value_enum)]
    dr_force_nvfail: Option<OnOff>,
    /// `false` clears the NVFAILed state (needs --confirm): hosts then see data that may lack
    /// acknowledged writes.
    #[arg(long, value_name = "false", value_parser = parse_false, requires = "confirm")]
    in_nvfailed_state: Option<bool>,
    /// Confirms clearing the NVFAILed state.
    #[arg(long)]
    confirm: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct VolumeDeleteArgs {
    /// The volume.
    name: String,
    /// Required: the volume and its data are gone for good.
    #[arg(long)]
    confirm: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `mcctl node …`.
#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Shows every node's state, DR mirror and consistency points.
    Show(NodeShowArgs),
    /// Forces a fenced node to serve (its epochs raised, every volume NVFAILed).
    Unfence(UnfenceArgs),
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
    /// Changes a volume's NVFAIL options, or clears its NVFAILed state.
    Modify(VolumeModifyArgs),
    /// Deletes a volume and its data.
    Delete(VolumeDeleteArgs),
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
    watch: WatchArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct PlexShowArgs {
    /// Only this aggregate's plexes.
    aggregate: Option<String>,
    #[command(flatten)]
    watch: WatchArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Debug, Args)]
struct VolumeShowArgs {
    /// Only this volume.
    name: Option<String>,
    #[command(flatten)]
    watch: WatchArgs,
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
    /// Creates and starts a lab in DIR (or restarts the lab DIR holds): its mediator (unless
    /// --no-mediator), then both controllers; prints its NBD URIs.
    Up(UpArgs),
    /// Shows each controller's process and state, the mediator's, and the volumes.
    Status(DirArgs),
    /// Stops every controller of the lab, then its mediator (SIGTERM, SIGKILL after 30 s); the
    /// data stays.
    Down(DirArgs),
    /// Kills a site's controller (--site) or the mediator (--mediator) with SIGKILL (kill -9).
    Kill(TargetArgs),
    /// Starts a site's controller (--site) again and waits until it serves, or the mediator
    /// (--mediator) until it answers.
    Start(StartArgs),
}

#[derive(Debug, Args)]
struct DirArgs {
    /// The lab directory.
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("member").required(true).args(["site", "mediator"])))]
struct TargetArgs {
    /// The lab directory.
    #[arg(long)]
    dir: PathBuf,
    /// The site whose controller it is: A or B.
    #[arg(long, value_parser = parse_site)]
    site: Option<LabSite>,
    /// The lab's mediator (the third site) instead of a controller.
    #[arg(long)]
    mediator: bool,
}

impl TargetArgs {
    fn member(&self) -> lab::LabMember {
        match self.site {
            Some(site) => lab::LabMember::Controller(site),
            None => lab::LabMember::Mediator,
        }
    }
}

#[derive(Debug, Args)]
struct StartArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The mc-controller binary [default: $MC_CONTROLLER_BIN, else next to mcctl].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// The mc-mediator binary [default: $MC_MEDIATOR_BIN, else next to mcctl].
    #[arg(long)]
    mediator_bin: Option<PathBuf>,
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
    /// `mediator.heartbeat_ms`, the mediator's too [default: the product's].
    #[arg(long, conflicts_with = "no_mediator")]
    heartbeat_ms: Option<u64>,
    /// `mediator.lease_ms`, the self-fence lease (S6), the mediator's too [default: the
    /// product's].
    #[arg(long, conflicts_with = "no_mediator")]
    lease_ms: Option<u64>,
    /// `mediator.auso_window_ms`, the mediator's too [default: the product's].
    #[arg(long, conflicts_with = "no_mediator")]
    auso_window_ms: Option<u64>,
    /// No mediator: the two controllers alone (no automatic switchover; a forced switchover is
    /// the operator's, confirmed with --confirm).
    #[arg(long)]
    no_mediator: bool,
    /// The mc-controller binary [default: $MC_CONTROLLER_BIN, else next to mcctl].
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// The mc-mediator binary [default: $MC_MEDIATOR_BIN, else next to mcctl].
    #[arg(long, conflicts_with = "no_mediator")]
    mediator_bin: Option<PathBuf>,
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

fn mediator_table(mediator: &lab::MediatorReport) -> String {
    let mut table = Table::new(&["MEDIATOR", "PID", "GRPC", "METRICS", "LOG"]);
    table.row(vec![
        "mc-mediator".into(),
        pid_text(mediator.pid),
        mediator.grpc.clone(),
        mediator.metrics.clone(),
        mediator.log.display().to_string(),
    ]);
    table.render()
}

fn up_text(report: &lab::UpReport) -> String {
    let dir = shell_word(&report.dir);
    let verb = if report.created { "created" } else { "restarted" };
    let mut out = format!("Lab {verb} in {} (cluster {})\n\n", report.dir.display(), report.cluster_id);
    out.push_str(&controllers_table(&report.controllers));
    out.push('\n');
    match &report.mediator {
        Some(mediator) => out.push_str(&mediator_table(mediator)),
        None => out.push_str("No mediator (--no-mediator): no automatic switchover.\n"),
    }
    out.push('\n');
    out.push_str(&volumes_table(&report.volumes, false));
    if let Some(volume) = report.volumes.first() {
        let size_mib = (volume.size_bytes >> 20).clamp(1, 256);
        let uri = &volume.uri;
        out.push_str(&format!(
            "\nTry:\n  qemu-io -f raw {uri}\n  nbdinfo {uri}\n  fio --ioengine=nbd --uri={uri} --rw=randwrite \
             --bs=4k --size={size_mib}m --name=x\n  mcctl lab status --dir {dir}\n  mcctl lab down --dir {dir}\n"
        ));
        if report.mediator.is_some() {
            out.push_str(&format!("  mcctl mediator show --lab {dir}\n"));
        }
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
    if let Some(m) = &report.mediator {
        let mut table = Table::new(&["MEDIATOR", "PID", "RUNNING", "STATE", "GRPC", "REASON"]);
        table.row(vec![
            "mc-mediator".into(),
            pid_text(m.pid),
            if m.running { "yes" } else { "no" }.to_string(),
            m.state.clone(),
            m.grpc.clone(),
            m.reason.clone(),
        ]);
        out.push_str(&table.render());
        out.push('\n');
    }
    out.push_str(&volumes_table(&report.volumes, true));
    out
}

fn down_text(report: &lab::DownReport) -> String {
    let how = |how: &str| match how {
        "sigterm" => "by SIGTERM",
        "sigkill" => "by SIGKILL",
        _ => "was not running",
    };
    let mut table = Table::new(&["NODE", "SITE", "PID", "STOPPED"]);
    for c in &report.controllers {
        table.row(vec![c.node.to_string(), c.site.to_string(), pid_text(c.pid), how(&c.how).to_string()]);
    }
    if let Some(m) = &report.mediator {
        table.row(vec!["mediator".into(), "-".into(), pid_text(m.pid), how(&m.how).to_string()]);
    }
    table.render()
}

fn mediator_start_text(report: &lab::MediatorStartReport) -> String {
    let mut out = mediator_table(&report.mediator);
    out.push_str(&format!("answering: {}\n", report.diagnosis));
    out
}

fn start_text(report: &lab::StartReport) -> String {
    let mut out = controllers_table(std::slice::from_ref(&report.controller));
    out.push_str(&format!("state: {} ({})\n", report.node_state, report.reason));
    if report.mode == "waiting-for-switchback" {
        out.push_str(
            "Its aggregates were switched over to its DR partner while it was down: `mcctl heal`, then `mcctl \
             switchback`, bring them home.\n",
        );
    } else if report.node_state != "serving" {
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
        heartbeat_ms: args.heartbeat_ms,
        lease_ms: args.lease_ms,
        auso_window_ms: args.auso_window_ms,
        no_mediator: args.no_mediator,
        controller_bin: args.controller_bin.clone(),
        mediator_bin: args.mediator_bin.clone(),
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
/// when a node did not answer or a name matched nothing, else 0. With `watch`, does so every
/// `watch` seconds until SIGINT or SIGTERM, and gives the last round's code.
async fn show(
    args: &ClusterArgs,
    watch: &WatchArgs,
    format: OutputFormat,
    render: impl Fn(&[NodeAnswer]) -> Shown,
) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(args)?;
    let Some(seconds) = watch.watch else {
        let answers = ask_all(&cluster).await;
        let shown = render(&answers);
        print(&shown_text(format, &shown)?)?;
        return Ok(show_code(&answers, &shown, true));
    };
    // Installed before the first round: Ctrl-C ends the watch with the last round's exit code.
    let mut signals = Signals::new()?;
    let terminal = std::io::stdout().is_terminal();
    let mut code = cli::EXIT_OK;
    for round in 0u64.. {
        let answers = tokio::select! {
            answers = ask_all(&cluster) => answers,
            _ = signals.recv() => break,
        };
        let shown = render(&answers);
        let text = shown_text(format, &shown)?;
        let framed = if terminal {
            // Home the cursor and clear the screen, then a header like watch(1)'s.
            format!("\x1b[H\x1b[2JEvery {seconds} s: {}\n\n{text}", cli::utc_text(now_unix_ms()))
        } else if round == 0 {
            text
        } else {
            format!("\n{text}")
        };
        print(&framed)?;
        code = show_code(&answers, &shown, false);
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            _ = signals.recv() => break,
        }
    }
    Ok(code)
}

/// What a show command prints of `shown` in `format`.
fn shown_text(format: OutputFormat, shown: &Shown) -> anyhow::Result<String> {
    Ok(match format {
        OutputFormat::Table => shown.table.clone(),
        OutputFormat::Json => {
            let mut text = serde_json::to_string_pretty(&shown.json).context("encode the result as JSON")?;
            text.push('\n');
            text
        }
    })
}

/// A show command's exit code, saying why on stderr when `explain`.
fn show_code(answers: &[NodeAnswer], shown: &Shown, explain: bool) -> u8 {
    let mut code = cli::EXIT_OK;
    let missing = cli::unreachable(answers);
    if !missing.is_empty() {
        if explain {
            eprintln!("error: {} of {} nodes did not answer", missing.len(), answers.len());
        }
        code = cli::EXIT_FAILED;
    }
    if let Some(what) = &shown.not_found {
        if explain {
            eprintln!("error: no {what}");
        }
        code = cli::EXIT_FAILED;
    }
    code
}

/// The wall clock in unix milliseconds (0 before 1970).
fn now_unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Where `check run` stores its result: `DIR/check.json` for `--lab DIR`; else
/// `$XDG_STATE_HOME/mcctl/check-<cluster id>.json` (`~/.local/state` without it), one file per
/// cluster so that two clusters' results never overwrite each other.
fn check_path(args: &ClusterArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.lab {
        return Ok(dir.join("check.json"));
    }
    let id = args.cluster_id.context("--endpoint needs --cluster-id")?;
    let state = match std::env::var_os("XDG_STATE_HOME").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        _ => {
            let home = std::env::var_os("HOME").context("neither XDG_STATE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".local").join("state")
        }
    };
    Ok(state.join("mcctl").join(format!("check-{}.json", cli::hex(&id))))
}

/// Replaces `path` with `bytes` atomically: a `.tmp` file, fsync, rename, fsync of the directory.
fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("the path has no directory")?;
    std::fs::create_dir_all(dir).context(format!("create {}", dir.display()))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp).context(format!("create {}", tmp.display()))?;
    file.write_all(bytes).context(format!("write {}", tmp.display()))?;
    file.sync_all().context(format!("fsync {}", tmp.display()))?;
    std::fs::rename(&tmp, path).context(format!("rename {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).context(format!("fsync directory {}", dir.display()))
}

async fn check_run(args: &ClusterArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(args)?;
    let path = check_path(args)?;
    let answers = ask_all(&cluster).await;
    let report = cli::check_report(&answers, now_unix_ms());
    emit(format, &report, cli::check_table)?;
    let mut text = serde_json::to_vec_pretty(&report).context("encode the check result")?;
    text.push(b'\n');
    replace_file(&path, &text).context(format!("store the check result in {}", path.display()))?;
    Ok(report.exit_code())
}

async fn check_show(args: &ClusterArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let path = check_path(args)?;
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            anyhow::bail!("no check result in {}: run `mcctl check run` first", path.display())
        }
        Err(e) => return Err(e).context(format!("read {}", path.display())),
    };
    let report: cli::CheckReport =
        serde_json::from_slice(&text).context(format!("decode the check result in {}", path.display()))?;
    emit(format, &report, cli::check_show_table)?;
    Ok(report.exit_code())
}

/// The completion script for `shell`.
fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "mcctl", &mut out);
    out
}

/// The man page, roff.
fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out).context("render the man page")?;
    Ok(out)
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

/// Bad usage found after parsing (a missing confirmation, a survivor that cannot be told): exit
/// code 2, like clap's own errors.
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn usage(text: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Usage(text.into()))
}

/// The node id an answer reports, else the one known beforehand.
fn answer_node(answer: &NodeAnswer) -> Option<u32> {
    let reported = answer.result.as_ref().ok().and_then(|r| r.identity.as_ref()).map(|i| i.sender_node);
    reported.or(answer.target.node)
}

/// The unreachable nodes as one line, for errors.
fn unreachable_list(answers: &[NodeAnswer]) -> String {
    let list: Vec<String> =
        cli::unreachable(answers).iter().map(|u| format!("{} ({})", u.endpoint, u.error)).collect();
    list.join(", ")
}

/// Where volume `name` is served: the answer, its aggregate's name and the volume.
struct FoundVolume<'a> {
    answer: &'a NodeAnswer,
    aggregate: String,
    volume: VolumeInfo,
}

/// The node serving volume `name`: among the nodes that report it, the serving ones are preferred
/// (a node waiting for switchback may still list its old volumes); two serving it is an error.
fn find_volume<'a>(answers: &'a [NodeAnswer], name: &str) -> anyhow::Result<FoundVolume<'a>> {
    let mut found: Vec<(FoundVolume<'a>, bool)> = Vec::new();
    for answer in answers {
        let Ok(reply) = &answer.result else { continue };
        for aggr in &reply.aggregates {
            if let Some(volume) = aggr.volumes.iter().find(|v| v.name == name) {
                let serving = reply.node_state == "serving";
                found.push((
                    FoundVolume { answer, aggregate: aggr.name.clone(), volume: volume.clone() },
                    serving,
                ));
            }
        }
    }
    if found.iter().any(|(_, serving)| *serving) {
        found.retain(|(_, serving)| *serving);
    }
    let mut nodes: Vec<&str> = found.iter().map(|(f, _)| f.answer.target.address.as_str()).collect();
    nodes.dedup();
    if nodes.len() > 1 {
        anyhow::bail!(
            "volume {name:?} is reported by more than one node ({}): resolve that first",
            nodes.join(", ")
        );
    }
    match found.into_iter().next() {
        Some((found, _)) => Ok(found),
        None if cli::any_unreachable(answers) => {
            anyhow::bail!(
                "no node that answered has volume {name:?}; did not answer: {}",
                unreachable_list(answers)
            )
        }
        None => anyhow::bail!("no node has volume {name:?}"),
    }
}

/// Prints one volume row (table, or `{"volumes": [row]}`).
fn print_volume(format: OutputFormat, row: &cli::VolumeRow) -> anyhow::Result<()> {
    match format {
        OutputFormat::Table => print(&cli::volume_rows_table(std::slice::from_ref(row))),
        OutputFormat::Json => print_json(&serde_json::json!({ "volumes": [row] })),
    }
}

async fn volume_modify(args: &VolumeModifyArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let found = find_volume(&answers, &args.name)?;
    let address = &found.answer.target.address;
    let mut admin = admin_client(address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the node at {address}"))?;
    let mut request = tonic::Request::new(ModifyVolumeRequest {
        cluster_id: cluster.id.to_vec(),
        name: args.name.clone(),
        nvfail: args.nvfail.map(OnOff::value),
        dr_force_nvfail: args.dr_force_nvfail.map(OnOff::value),
        in_nvfailed_state: args.in_nvfailed_state,
        confirmed: args.confirm,
    });
    request.set_timeout(CREATE_TIMEOUT);
    let volume = admin
        .modify_volume(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("modify volume {:?} at {address}", args.name))?
        .into_inner();
    print_volume(format, &cli::volume_row(&volume, &found.aggregate, answer_node(found.answer)))?;
    Ok(cli::EXIT_OK)
}

async fn volume_delete(args: &VolumeDeleteArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let found = find_volume(&answers, &args.name)?;
    let row = cli::volume_row(&found.volume, &found.aggregate, answer_node(found.answer));
    let what = format!(
        "volume {:?} ({}, id {}, aggregate {:?}, node {})",
        row.name,
        cli::human_size(row.size_bytes),
        row.id,
        row.aggregate,
        row.node.map_or_else(|| "?".to_string(), |n| n.to_string())
    );
    if !args.confirm {
        return Err(usage(format!("this would delete {what} and all its data: add --confirm to delete it")));
    }
    let address = &found.answer.target.address;
    let mut admin = admin_client(address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the node at {address}"))?;
    let mut request = tonic::Request::new(DeleteVolumeRequest {
        cluster_id: cluster.id.to_vec(),
        name: args.name.clone(),
        confirmed: true,
    });
    request.set_timeout(CREATE_TIMEOUT);
    admin
        .delete_volume(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("delete volume {:?} at {address}", args.name))?;
    match format {
        OutputFormat::Table => print(&format!("deleted {what}\n"))?,
        OutputFormat::Json => print_json(&serde_json::json!({ "deleted": row }))?,
    }
    Ok(cli::EXIT_OK)
}

/// The surviving node a forced switchover goes to: the node of `site` when given, else the only
/// node that answers. Both answering without `--site` is bad usage (a forced switchover is for a
/// lost partner: the operator must say which site survived).
fn pick_survivor(answers: &[NodeAnswer], site: Option<LabSite>) -> anyhow::Result<&NodeAnswer> {
    if let Some(site) = site {
        let name = site.name();
        let at_site = |a: &&NodeAnswer| {
            a.result.as_ref().map(|r| r.site == name).unwrap_or(false)
                || a.target.site.as_deref() == Some(name)
        };
        let answer = answers.iter().find(at_site).context(format!(
            "no node of site {name} is known: with --endpoint, the node must answer to tell its site"
        ))?;
        if let Err(error) = &answer.result {
            anyhow::bail!("the node of site {name} at {} did not answer: {error}", answer.target.address);
        }
        return Ok(answer);
    }
    let alive: Vec<&NodeAnswer> = answers.iter().filter(|a| a.result.is_ok()).collect();
    match alive.as_slice() {
        [only] => Ok(only),
        [] => anyhow::bail!("no node answered: {}", unreachable_list(answers)),
        _ => Err(usage(
            "every node answers: a forced switchover is for a site that is down or isolated. Name the surviving \
             site with --site A|B if the other one is isolated but still reachable from here",
        )),
    }
}

/// Asks the operator at a terminal; elsewhere `--confirm` is required.
fn confirm_switchover() -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Err(usage(
            "a forced switchover needs --confirm when stdin is not a terminal: the partner site must be down or \
             isolated, or the writes it still takes are lost",
        ));
    }
    let mut stderr = std::io::stderr().lock();
    stderr.write_all(SWITCHOVER_PROMPT.as_bytes()).context("write the prompt")?;
    stderr.flush().context("flush the prompt")?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("read the answer")?;
    Ok(line.trim() == "yes")
}

async fn switchover(args: &SwitchoverArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let negotiated = !args.forced_on_disaster;
    if negotiated && args.site.is_none() {
        return Err(usage(
            "a negotiated switchover needs --site A|B: the site that takes the other's aggregates over (with the \
             partner site down, use --forced-on-disaster)",
        ));
    }
    if negotiated && (args.override_vetoes || args.force_nvfail_all) {
        return Err(usage(
            "--override-vetoes and --force-nvfail-all are for a forced switchover (--forced-on-disaster): a \
             negotiated one loses nothing or does not run",
        ));
    }
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let survivor = pick_survivor(&answers, args.site)?;
    let node = answer_node(survivor);
    // Only a forced switchover needs the operator's word that the partner site is down.
    let confirmed = negotiated || args.confirm || (!args.simulate && confirm_switchover()?);
    if !args.simulate && !confirmed {
        anyhow::bail!("not confirmed: nothing was done");
    }
    let address = &survivor.target.address;
    let mut admin = admin_client(address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the surviving node at {address}"))?;
    let mut request = tonic::Request::new(SwitchoverRequest {
        cluster_id: cluster.id.to_vec(),
        forced_on_disaster: args.forced_on_disaster,
        simulate: args.simulate,
        override_vetoes: args.override_vetoes,
        force_nvfail_all: args.force_nvfail_all,
        confirmed,
    });
    request.set_timeout(OPERATION_TIMEOUT);
    let outcome = match admin.switchover(request).await {
        Ok(reply) if args.simulate => SwitchoverOutcome::Simulated(reply.into_inner()),
        Ok(reply) => SwitchoverOutcome::Ran(reply.into_inner()),
        Err(status) => match vetoes_of(&status) {
            Some(reply) if args.simulate => SwitchoverOutcome::Simulated(reply),
            Some(reply) => SwitchoverOutcome::Vetoed(reply),
            None => {
                return Err(anyhow::anyhow!(rpc_text(&status))
                    .context(format!("switch over to the node at {address}")));
            }
        },
    };
    match format {
        OutputFormat::Table => {
            print(&cli::switchover_text_of(node, &outcome, args.override_vetoes, args.forced_on_disaster))?
        }
        OutputFormat::Json => print_json(&cli::switchover_json(node, &outcome, args.override_vetoes))?,
    }
    Ok(cli::switchover_exit(&outcome, args.override_vetoes))
}

/// The node serving the partner's aggregates: the one of `site`, else the one node whose mode says
/// switchover.
fn pick_holder(answers: &[NodeAnswer], site: Option<LabSite>) -> anyhow::Result<&NodeAnswer> {
    if site.is_some() {
        return pick_survivor(answers, site);
    }
    let holding: Vec<&NodeAnswer> = answers
        .iter()
        .filter(|a| {
            a.result.as_ref().is_ok_and(|r| {
                matches!(r.mode.as_str(), "switchover" | "partial-switchover" | "partial-switchback")
            })
        })
        .collect();
    match holding.as_slice() {
        [only] => Ok(only),
        [] if cli::any_unreachable(answers) => {
            anyhow::bail!(
                "no node that answered is in switchover mode; did not answer: {}",
                unreachable_list(answers)
            )
        }
        [] => anyhow::bail!("no node is in switchover mode: there is nothing to heal or switch back"),
        _ => Err(usage("more than one node is in switchover mode: name the site with --site A|B")),
    }
}

async fn heal(args: &HealArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let holder = pick_holder(&answers, args.site)?;
    let node = answer_node(holder);
    let address = holder.target.address.clone();
    let mut admin = admin_client(&address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the node at {address}"))?;
    let mut request = tonic::Request::new(HealRequest { cluster_id: cluster.id.to_vec() });
    request.set_timeout(OPERATION_TIMEOUT);
    let reply = admin
        .heal(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("heal at the node at {address}"))?
        .into_inner();
    match format {
        OutputFormat::Table => print(&cli::heal_text(node, &reply))?,
        OutputFormat::Json => print_json(&cli::heal_json(node, &reply))?,
    }
    let succeeded = reply.operation.as_ref().is_some_and(|op| op.state == "successful");
    let names: Vec<String> =
        reply.aggregates.iter().filter(|a| a.reattached).map(|a| a.name.clone()).collect();
    if args.no_wait || names.is_empty() {
        return Ok(if succeeded { cli::EXIT_OK } else { cli::EXIT_FAILED });
    }
    let done = wait_resync(&address, cluster.id, &names, Duration::from_secs(args.timeout), format).await?;
    Ok(if succeeded && done { cli::EXIT_OK } else { cli::EXIT_FAILED })
}

/// Waits until aggregates `names` at the node at `address` are mirrored and normal, showing the
/// resync's progress on stderr: a bar redrawn in place on a terminal, a plain line every 2 s
/// otherwise. False if `limit` passed first.
async fn wait_resync(
    address: &str,
    cluster: [u8; 16],
    names: &[String],
    limit: Duration,
    format: OutputFormat,
) -> anyhow::Result<bool> {
    let terminal = std::io::stderr().is_terminal() && format == OutputFormat::Table;
    let started = std::time::Instant::now();
    let mut last_line = std::time::Instant::now() - Duration::from_secs(10);
    loop {
        let status = status_of(address.to_string(), cluster).await;
        if let Ok(status) = &status {
            let (copied, total, rate, done) = cli::resync_sum(status, names);
            if terminal {
                eprint!("\r{}", cli::progress_line("resync", copied, total, rate, Some(30)));
            } else if done || last_line.elapsed() >= Duration::from_secs(2) {
                eprintln!("{}", cli::progress_line("resync", copied, total, rate, None));
                last_line = std::time::Instant::now();
            }
            if done {
                if terminal {
                    eprintln!();
                }
                eprintln!("resync complete: {} mirrored and normal", names.join(", "));
                return Ok(true);
            }
        }
        if started.elapsed() >= limit {
            if terminal {
                eprintln!();
            }
            eprintln!(
                "error: the resync did not complete within {} s; it goes on in the background (mcctl mirror status)",
                limit.as_secs()
            );
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node serving the aggregate named `name` or holding a volume named `name` (a node that
/// lists it with its volumes offline, e.g. deposed, is not).
fn pick_server<'a>(answers: &'a [NodeAnswer], name: &str) -> anyhow::Result<&'a NodeAnswer> {
    let serves = |a: &&NodeAnswer| {
        a.result.as_ref().is_ok_and(|r| {
            r.aggregates.iter().any(|g| {
                (g.name == name || g.volumes.iter().any(|v| v.name == name))
                    && g.volumes
                        .iter()
                        .all(|v| !v.reason.contains("deposed") && !v.reason.contains("released"))
            })
        })
    };
    match answers.iter().find(serves) {
        Some(answer) => Ok(answer),
        None if cli::any_unreachable(answers) => {
            anyhow::bail!(
                "no node that answered serves {name:?}; did not answer: {}",
                unreachable_list(answers)
            )
        }
        None => anyhow::bail!("no node serves an aggregate or volume named {name:?}"),
    }
}

async fn mirror_control(args: &MirrorControlArgs, action: &str, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let server = pick_server(&answers, &args.name)?;
    let node = answer_node(server);
    let address = server.target.address.clone();
    let mut admin = admin_client(&address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the node at {address}"))?;
    let mut request = tonic::Request::new(MirrorControlRequest {
        cluster_id: cluster.id.to_vec(),
        name: args.name.clone(),
        action: action.to_string(),
    });
    request.set_timeout(OPERATION_TIMEOUT);
    let reply = admin
        .mirror_control(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("mirror {action} {} at the node at {address}", args.name))?
        .into_inner();
    match format {
        OutputFormat::Table => print(&format!(
            "mirror {action} of aggregate {} on node {}: {}\n",
            reply.aggregate,
            node.map_or_else(|| "?".to_string(), |n| n.to_string()),
            reply.result
        ))?,
        OutputFormat::Json => print_json(&serde_json::json!({
            "node": node, "action": action, "aggregate": reply.aggregate, "plex": reply.plex, "result": reply.result,
        }))?,
    }
    if action == "pause" || args.no_wait {
        return Ok(cli::EXIT_OK);
    }
    // Done once mirrored and normal again: the plex stays degraded until reattached and resynced.
    let names = [reply.aggregate.clone()];
    let done = wait_resync(&address, cluster.id, &names, Duration::from_secs(args.timeout), format).await?;
    Ok(if done { cli::EXIT_OK } else { cli::EXIT_FAILED })
}

/// The mediator's address and the cluster id: from `--lab DIR`'s lab.json, or from `--mediator`
/// and `--cluster-id` (clap has made sure exactly one way is given).
fn mediator_target(args: &MediatorShowArgs) -> anyhow::Result<(String, [u8; 16])> {
    if let Some(dir) = &args.lab {
        let state = lab::LabState::load(dir).context(format!("read the lab in {}", dir.display()))?;
        let id = state.cluster_bytes().context("read the lab's cluster id")?;
        let mediator = state.mediator.as_ref().with_context(|| {
            format!(
                "the lab in {} has no mediator (it was made with `mcctl lab up --no-mediator`)",
                dir.display()
            )
        })?;
        return Ok((mediator.grpc.clone(), id));
    }
    match (&args.mediator, args.cluster_id) {
        (Some(address), Some(id)) => Ok((address.clone(), id)),
        _ => Err(usage("give --lab DIR, or --mediator HOST:PORT with --cluster-id HEX")),
    }
}

async fn mediator_confirm_down(args: &MediatorConfirmDownArgs, format: OutputFormat) -> anyhow::Result<u8> {
    if !args.confirm {
        return Err(usage(
            "confirming controllers down needs --confirm: a controller confirmed down that still runs could be \
             switched over while it writes",
        ));
    }
    let (address, cluster_id) = mediator_target(&args.target)?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| usage(format!("--mediator {address}: {e}")))?
        .connect_timeout(RPC_TIMEOUT);
    let channel = endpoint.connect().await.context(format!("reach the mediator at {address}"))?;
    let mut client = mc_proto::v1::mediator_client::MediatorClient::new(channel);
    let mut request = tonic::Request::new(mc_proto::v1::ConfirmDownRequest {
        cluster_id: cluster_id.to_vec(),
        nodes: args.nodes.clone(),
    });
    request.set_timeout(RPC_TIMEOUT);
    let reply = client
        .confirm_down(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("ask the mediator at {address}"))?
        .into_inner();
    let nodes: Vec<String> = args.nodes.iter().map(u32::to_string).collect();
    match format {
        OutputFormat::Table => print(&format!(
            "nodes {} confirmed down; the mediator's state is {}\n",
            nodes.join(", "),
            if reply.state_lost {
                "still being rebuilt (other controllers have neither reported nor been confirmed down)"
            } else {
                "rebuilt"
            }
        ))?,
        OutputFormat::Json => print_json(&serde_json::json!({
            "confirmed_down": args.nodes,
            "state_lost": reply.state_lost,
        }))?,
    }
    Ok(cli::EXIT_OK)
}

async fn mediator_show(args: &MediatorShowArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let (address, cluster_id) = mediator_target(args)?;
    let endpoint = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| usage(format!("--mediator {address}: {e}")))?
        .connect_timeout(RPC_TIMEOUT);
    let channel = endpoint.connect().await.context(format!("reach the mediator at {address}"))?;
    let mut client = mc_proto::v1::mediator_client::MediatorClient::new(channel);
    let mut request =
        tonic::Request::new(mc_proto::v1::MediatorShowRequest { cluster_id: cluster_id.to_vec() });
    request.set_timeout(RPC_TIMEOUT);
    let reply = client
        .show(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("ask the mediator at {address}"))?
        .into_inner();
    match format {
        OutputFormat::Table => print(&cli::mediator_text(&reply))?,
        OutputFormat::Json => print_json(&cli::mediator_json(&reply))?,
    }
    Ok(cli::EXIT_OK)
}

async fn switchback(args: &SwitchbackArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let answers = ask_all(&cluster).await;
    let holder = pick_holder(&answers, args.site)?;
    let node = answer_node(holder);
    let address = &holder.target.address;
    let mut admin = admin_client(address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach the node at {address}"))?;
    let mut request =
        tonic::Request::new(SwitchbackRequest { cluster_id: cluster.id.to_vec(), simulate: args.simulate });
    request.set_timeout(OPERATION_TIMEOUT);
    let outcome = match admin.switchback(request).await {
        Ok(reply) if args.simulate => SwitchbackOutcome::Simulated(reply.into_inner()),
        Ok(reply) => SwitchbackOutcome::Ran(reply.into_inner()),
        Err(status) => {
            let vetoes = (status.code() == tonic::Code::FailedPrecondition)
                .then(|| SwitchbackReply::decode(status.details()).ok())
                .flatten()
                .filter(|reply| !reply.vetoes.is_empty());
            match vetoes {
                Some(reply) => SwitchbackOutcome::Vetoed(reply),
                None => {
                    return Err(anyhow::anyhow!(rpc_text(&status))
                        .context(format!("switch back at the node at {address}")));
                }
            }
        }
    };
    match format {
        OutputFormat::Table => print(&cli::switchback_text(node, &outcome))?,
        OutputFormat::Json => print_json(&cli::switchback_json(node, &outcome))?,
    }
    Ok(cli::switchback_exit(&outcome))
}

/// The vetoes a refusal carries: `FAILED_PRECONDITION` whose details decode as a
/// `SwitchoverReply` with at least one veto.
fn vetoes_of(status: &tonic::Status) -> Option<SwitchoverReply> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    SwitchoverReply::decode(status.details()).ok().filter(|reply| !reply.vetoes.is_empty())
}

async fn node_unfence(args: &UnfenceArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    // The lab knows every node's address; with --endpoint, the nodes tell their ids.
    let address = match cluster.targets.iter().find(|t| t.node == Some(args.node)) {
        Some(target) => target.address.clone(),
        None => {
            let answers = ask_all(&cluster).await;
            let answer = answers.iter().find(|a| a.result.is_ok() && answer_node(a) == Some(args.node));
            match answer {
                Some(answer) => answer.target.address.clone(),
                None if cli::any_unreachable(&answers) => anyhow::bail!(
                    "no node that answered is node {}; did not answer: {}",
                    args.node,
                    unreachable_list(&answers)
                ),
                None => anyhow::bail!("no node {} in this cluster", args.node),
            }
        }
    };
    let mut admin = admin_client(&address)
        .await
        .map_err(anyhow::Error::msg)
        .context(format!("reach node {} at {address}", args.node))?;
    let mut request = tonic::Request::new(UnfenceRequest {
        cluster_id: cluster.id.to_vec(),
        force: args.force,
        confirmed: args.confirm,
    });
    request.set_timeout(OPERATION_TIMEOUT);
    let reply = admin
        .unfence(request)
        .await
        .map_err(|s| anyhow::anyhow!(rpc_text(&s)))
        .context(format!("unfence node {} at {address}", args.node))?
        .into_inner();
    let operation = reply.operation.as_ref();
    match format {
        OutputFormat::Table => print(&cli::unfence_text(args.node, operation, &reply.nvfailed_volumes))?,
        OutputFormat::Json => print_json(&cli::unfence_json(args.node, operation, &reply.nvfailed_volumes))?,
    }
    Ok(match operation {
        Some(operation) if operation.state != "successful" => cli::EXIT_FAILED,
        _ => cli::EXIT_OK,
    })
}

/// `Admin.Operations` of the node at `address`, connecting included, within `RPC_TIMEOUT`.
async fn operations_of(address: String, cluster: [u8; 16]) -> Result<Vec<Operation>, String> {
    let call = async {
        let mut admin = admin_client(&address).await?;
        let mut request = tonic::Request::new(OperationsRequest { cluster_id: cluster.to_vec() });
        request.set_timeout(RPC_TIMEOUT);
        admin.operations(request).await.map(|r| r.into_inner().operations).map_err(|s| rpc_text(&s))
    };
    tokio::time::timeout(RPC_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", RPC_TIMEOUT.as_secs())))
}

async fn operation_show(args: &OperationShowArgs, format: OutputFormat) -> anyhow::Result<u8> {
    let cluster = Cluster::resolve(&args.cluster)?;
    let calls: Vec<_> =
        cluster.targets.iter().map(|t| tokio::spawn(operations_of(t.address.clone(), cluster.id))).collect();
    let mut answers = Vec::with_capacity(calls.len());
    for (target, call) in cluster.targets.iter().zip(calls) {
        let result = call.await.unwrap_or_else(|e| Err(format!("operations task: {e}")));
        answers.push(OperationsAnswer { target: target.clone(), result });
    }
    match format {
        OutputFormat::Table => print(&cli::operations_table(&answers, args.all))?,
        OutputFormat::Json => print_json(&cli::operations_json(&answers, args.all))?,
    }
    if cli::any_operations_unreachable(&answers) {
        let missing = answers.iter().filter(|a| a.result.is_err()).count();
        eprintln!("error: {missing} of {} nodes did not answer", answers.len());
        return Ok(cli::EXIT_FAILED);
    }
    Ok(cli::EXIT_OK)
}

async fn run(args: Cli) -> anyhow::Result<u8> {
    let format = args.output;
    match args.command {
        Command::Lab(command) => run_lab(command, format).await.map(|()| cli::EXIT_OK),
        Command::Node(NodeCommand::Show(args)) => {
            show(&args.cluster, &args.watch, format, |answers| Shown {
                table: cli::nodes_table(answers),
                json: cli::nodes_json(answers),
                not_found: None,
            })
            .await
        }
        Command::Aggregate(AggregateCommand::Show(args)) => {
            let name = args.name.as_deref();
            show(&args.cluster, &args.watch, format, |answers| Shown {
                table: cli::aggregates_table(answers, name),
                json: cli::aggregates_json(answers, name),
                not_found: not_found(name, cli::aggregate_rows(answers, name).len(), "aggregate"),
            })
            .await
        }
        Command::Plex(PlexCommand::Show(args)) => {
            let aggregate = args.aggregate.as_deref();
            show(&args.cluster, &args.watch, format, |answers| Shown {
                table: cli::plexes_table(answers, aggregate),
                json: cli::plexes_json(answers, aggregate),
                not_found: not_found(aggregate, cli::aggregate_rows(answers, aggregate).len(), "aggregate"),
            })
            .await
        }
        Command::Volume(VolumeCommand::Show(args)) => {
            let name = args.name.as_deref();
            show(&args.cluster, &args.watch, format, |answers| Shown {
                table: cli::volumes_table(answers, name),
                json: cli::volumes_json(answers, name),
                not_found: not_found(name, cli::volume_rows(answers, name).len(), "volume"),
            })
            .await
        }
        Command::Volume(VolumeCommand::Create(args)) => volume_create(&args, format).await,
        Command::Volume(VolumeCommand::Modify(args)) => volume_modify(&args, format).await,
        Command::Volume(VolumeCommand::Delete(args)) => volume_delete(&args, format).await,
        Command::Cluster(ClusterCommand::Show(args)) => {
            show(&args, &WatchArgs { watch: None }, format, |answers| Shown {
                table: cli::cluster_table(answers),
                json: cli::cluster_json(answers),
                not_found: None,
            })
            .await
        }
        Command::Node(NodeCommand::Unfence(args)) => node_unfence(&args, format).await,
        Command::Switchover(args) => switchover(&args, format).await,
        Command::Operation(OperationCommand::Show(args)) => operation_show(&args, format).await,
        Command::Operation(OperationCommand::History(cluster)) => {
            operation_show(&OperationShowArgs { all: true, cluster }, format).await
        }
        Command::Heal(args) => heal(&args, format).await,
        Command::Mediator(MediatorCommand::Show(args)) => mediator_show(&args, format).await,
        Command::Mediator(MediatorCommand::ConfirmDown(args)) => mediator_confirm_down(&args, format).await,
        Command::Mirror(MirrorCommand::Pause(args)) => mirror_control(&args, "pause", format).await,
        Command::Mirror(MirrorCommand::Resume(args)) => mirror_control(&args, "resume", format).await,
        Command::Mirror(MirrorCommand::Fullresync(args)) => mirror_control(&args, "fullresync", format).await,
        Command::Switchback(args) => switchback(&args, format).await,
        Command::Mirror(MirrorCommand::Status(args)) => {
            let name = args.name.as_deref();
            show(&args.cluster, &args.watch, format, |answers| Shown {
                table: cli::mirror_table(answers, name),
                json: cli::mirror_json(answers, name),
                not_found: not_found(name, cli::mirror_rows(answers, name).len(), "aggregate or volume"),
            })
            .await
        }
        Command::Check(CheckCommand::Run(args)) => check_run(&args, format).await,
        Command::Check(CheckCommand::Show(args)) => check_show(&args, format).await,
        Command::Completions(args) => print_bytes(&completions(args.shell)).map(|()| cli::EXIT_OK),
        Command::Man => print_bytes(&man_page()?).map(|()| cli::EXIT_OK),
    }
}

/// Writes `bytes` to stdout.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes).context("write to stdout")?;
    stdout.flush().context("flush stdout")
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
            let member = args.member();
            let report = lab::kill(&args.dir, member).await.context(format!("kill {member}"))?;
            emit(format, &report, down_text)
        }
        LabCommand::Start(args) => match args.target.member() {
            lab::LabMember::Controller(site) => {
                let report = lab::start(&args.target.dir, site, args.controller_bin.as_deref())
                    .await
                    .context(format!("start site {site}"))?;
                emit(format, &report, start_text)
            }
            lab::LabMember::Mediator => {
                let report = lab::start_mediator(&args.target.dir, args.mediator_bin.as_deref())
                    .await
                    .context("start the mediator")?;
                emit(format, &report, mediator_start_text)
            }
        },
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
        Err(error) if error.downcast_ref::<Usage>().is_some() => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::EXIT_USAGE)
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(cli::EXIT_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::error::ErrorKind;
    use mc_proto::v1::{Identity, Veto};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("mcctl").chain(args.iter().copied()))
    }

    /// Prevents a destructive or meaningless command line from being accepted: each is bad usage
    /// (exit code 2) before any node is asked.
    #[test]
    fn usage_errors_exit_2() {
        let lab = ["--lab", "/tmp/lab"];
        let bad: &[&[&str]] = &[
            // Nothing to change.
            &["volume", "modify", "vol_a"],
            // Only `false` clears the NVFAILed state, and only with --confirm.
            &["volume", "modify", "vol_a", "--in-nvfailed-state", "true", "--confirm"],
            &["volume", "modify", "vol_a", "--in-nvfailed-state", "false"],
            &["volume", "modify", "vol_a", "--nvfail", "maybe"],
            // Unfence needs both --force and --confirm.
            &["node", "unfence", "2"],
            &["node", "unfence", "2", "--force"],
            &["node", "unfence", "2", "--confirm"],
            &["node", "unfence", "--force", "--confirm"],
            &["switchover", "--forced-on-disaster", "--site", "C"],
            &["operation", "show", "--bogus"],
            &["cluster", "show", "extra"],
        ];
        for args in bad {
            let mut full = args.to_vec();
            full.extend_from_slice(&lab);
            let error = parse(&full).map(|_| ()).unwrap_err();
            assert_eq!(error.exit_code(), i32::from(cli::EXIT_USAGE), "{full:?}: {error}");
            assert_ne!(error.kind(), ErrorKind::DisplayHelp, "{full:?}");
        }
        for good in [
            &["volume", "modify", "vol_a", "--nvfail", "on"][..],
            &["volume", "modify", "vol_a", "--dr-force-nvfail", "off", "--nvfail", "off"],
            &["volume", "modify", "vol_a", "--in-nvfailed-state", "false", "--confirm"],
            &["volume", "delete", "vol_a"],
            &["node", "unfence", "2", "--force", "--confirm"],
            &["switchover", "--forced-on-disaster", "--simulate", "--site", "B"],
            &["switchover"],
            &["operation", "show", "--all"],
            &["cluster", "show"],
        ] {
            let mut full = good.to_vec();
            full.extend_from_slice(&lab);
            if let Err(error) = parse(&full) {
                panic!("{full:?}: {error}");
            }
        }
    }

    fn answer(node: u32, site: &str, up: bool) -> NodeAnswer {
        NodeAnswer {
            target: Target {
                address: format!("127.0.0.1:700{node}"),
                node: Some(node),
                site: Some(site.into()),
            },
            result: if up {
                Ok(StatusReply {
                    identity: Some(Identity { cluster_id: vec![7; 16], sender_node: node, receiver_node: 0 }),
                    site: site.into(),
                    node_state: "serving".into(),
                    ..StatusReply::default()
                })
            } else {
                Err("connect: connection refused".into())
            },
        }
    }

    fn is_usage(error: &anyhow::Error) -> bool {
        error.downcast_ref::<Usage>().is_some()
    }

    /// Prevents `--watch` taking a name as its interval, or an interval of 0 (a busy loop): it
    /// defaults to 2 s, takes a number of seconds, and is absent unless given.
    #[test]
    fn watch_parsing() {
        let watch_of = |args: &[&str]| -> Option<u64> {
            let mut full = args.to_vec();
            full.extend_from_slice(&["--lab", "/tmp/lab"]);
            match parse(&full).unwrap().command {
                Command::Node(NodeCommand::Show(a)) => a.watch.watch,
                Command::Aggregate(AggregateCommand::Show(a)) => a.watch.watch,
                Command::Plex(PlexCommand::Show(a)) => a.watch.watch,
                Command::Volume(VolumeCommand::Show(a)) => a.watch.watch,
                Command::Mirror(MirrorCommand::Status(a)) => a.watch.watch,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(watch_of(&["node", "show"]), None);
        assert_eq!(watch_of(&["node", "show", "--watch"]), Some(2));
        assert_eq!(watch_of(&["node", "show", "--watch", "5"]), Some(5));
        assert_eq!(watch_of(&["aggregate", "show", "aggr_a", "--watch"]), Some(2));
        assert_eq!(watch_of(&["plex", "show", "--watch=3", "aggr_a"]), Some(3));
        assert_eq!(watch_of(&["volume", "show", "--watch", "1"]), Some(1));
        assert_eq!(watch_of(&["mirror", "status", "vol_a", "--watch"]), Some(2));
        for bad in [&["node", "show", "--watch", "0"][..], &["mirror", "status", "--watch", "x", "y"]] {
            let mut full = bad.to_vec();
            full.extend_from_slice(&["--lab", "/tmp/lab"]);
            let error = parse(&full).map(|_| ()).unwrap_err();
            assert_eq!(error.exit_code(), i32::from(cli::EXIT_USAGE), "{full:?}");
        }
    }

    /// Prevents completions or a man page that miss commands (or are empty): generated from the
    /// same clap definition, they name every command group.
    #[test]
    fn completions_and_man_name_the_commands() {
        let groups =
            ["lab", "node", "aggregate", "plex", "volume", "mirror", "check", "switchover", "completions"];
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let text = String::from_utf8(completions(shell)).unwrap();
            assert!(text.contains("mcctl"), "{shell}: {text}");
            for group in groups {
                assert!(text.contains(group), "{shell} completions lack {group}");
            }
        }
        let fish = String::from_utf8(completions(clap_complete::Shell::Fish)).unwrap();
        assert!(fish.contains("status") && fish.contains("run"), "subcommands of mirror and check");
        let man = String::from_utf8(man_page().unwrap()).unwrap();
        assert!(man.contains(".TH mcctl 1"), "{man}");
        for group in groups {
            assert!(man.contains(group), "the man page lacks {group}");
        }
        assert!(parse(&["completions", "bash"]).is_ok());
        assert!(parse(&["completions", "tcsh"]).is_err());
        assert!(parse(&["man"]).is_ok());
        assert!(parse(&["check", "run", "--lab", "/tmp/lab"]).is_ok());
        assert!(parse(&["lab", "kill", "--dir", "/tmp/lab", "--mediator"]).is_ok(), "lab kill --mediator");
        assert!(
            parse(&["check", "show", "--endpoint", "127.0.0.1:1", "--cluster-id", &"0a".repeat(16)]).is_ok()
        );
    }

    /// Prevents `check run` storing its result where `check show` does not look, or two clusters
    /// sharing one file: the lab's directory, else one file per cluster under the state directory.
    #[test]
    fn check_paths() {
        let lab = ClusterArgs { lab: Some("/tmp/lab".into()), endpoint: Vec::new(), cluster_id: None };
        assert_eq!(check_path(&lab).unwrap(), PathBuf::from("/tmp/lab/check.json"));
        let endpoint =
            ClusterArgs { lab: None, endpoint: vec!["127.0.0.1:1".into()], cluster_id: Some([10; 16]) };
        let path = check_path(&endpoint).unwrap();
        assert!(path.ends_with(format!("mcctl/check-{}.json", "0a".repeat(16))), "{}", path.display());
    }

    /// Prevents a forced switchover sent to the wrong node: with both nodes answering and no
    /// --site it is bad usage; with --site it goes to that site's node, which must answer.
    #[test]
    fn survivor_choice() {
        let both = [answer(1, "A", true), answer(2, "B", true)];
        let error = pick_survivor(&both, None).map(|_| ()).unwrap_err();
        assert!(is_usage(&error), "{error}");
        assert_eq!(answer_node(pick_survivor(&both, Some(LabSite::B)).unwrap()), Some(2));
        let b_down = [answer(1, "A", true), answer(2, "B", false)];
        assert_eq!(answer_node(pick_survivor(&b_down, None).unwrap()), Some(1));
        let error = pick_survivor(&b_down, Some(LabSite::B)).map(|_| ()).unwrap_err();
        assert!(!is_usage(&error) && error.to_string().contains("did not answer"), "{error}");
        let none = [answer(1, "A", false), answer(2, "B", false)];
        let error = pick_survivor(&none, None).map(|_| ()).unwrap_err();
        assert!(!is_usage(&error), "{error}");
    }

    /// Prevents a veto refusal shown as a bare RPC error (exit 1) instead of its vetoes (exit 3).
    #[test]
    fn vetoes_from_status_details() {
        let reply = SwitchoverReply {
            vetoes: vec![Veto {
                kind: "hard".into(),
                code: "partner_reachable".into(),
                aggregate: String::new(),
                reason: "the partner answers".into(),
            }],
            ..SwitchoverReply::default()
        };
        let status = tonic::Status::with_details(
            tonic::Code::FailedPrecondition,
            "vetoed",
            reply.encode_to_vec().into(),
        );
        assert_eq!(vetoes_of(&status), Some(reply.clone()));
        let other = tonic::Status::with_details(tonic::Code::Internal, "x", reply.encode_to_vec().into());
        assert_eq!(vetoes_of(&other), None);
        let garbage =
            tonic::Status::with_details(tonic::Code::FailedPrecondition, "x", vec![0xff, 0xff].into());
        assert_eq!(vetoes_of(&garbage), None);
        assert_eq!(vetoes_of(&tonic::Status::failed_precondition("no details")), None);
    }

    /// Prevents lab commands that name two processes or none, mediator timers for a lab without
    /// a mediator, and a `mediator show` that finds no mediator: each is bad usage (exit 2).
    #[test]
    fn lab_members_and_mediator_options() {
        for good in [
            &["lab", "kill", "--dir", "/tmp/lab", "--site", "A"][..],
            &["lab", "kill", "--dir", "/tmp/lab", "--mediator"],
            &["lab", "start", "--dir", "/tmp/lab", "--mediator", "--mediator-bin", "/bin/true"],
            &["lab", "up", "--dir", "/tmp/lab", "--no-mediator"],
            &["lab", "up", "--dir", "/tmp/lab", "--heartbeat-ms", "200", "--lease-ms", "2000"],
            &["mediator", "show", "--lab", "/tmp/lab"],
            &[
                "mediator",
                "show",
                "--mediator",
                "127.0.0.1:1",
                "--cluster-id",
                "00112233445566778899aabbccddeeff",
            ],
        ] {
            if let Err(error) = parse(good) {
                panic!("{good:?}: {error}");
            }
        }
        match parse(&["lab", "kill", "--dir", "/tmp/lab", "--mediator"]).unwrap().command {
            Command::Lab(LabCommand::Kill(args)) => assert_eq!(args.member(), lab::LabMember::Mediator),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["lab", "kill", "--dir", "/tmp/lab"][..],
            &["lab", "kill", "--dir", "/tmp/lab", "--site", "A", "--mediator"],
            &["lab", "start", "--dir", "/tmp/lab"],
            &["lab", "up", "--dir", "/tmp/lab", "--no-mediator", "--lease-ms", "2000"],
            &["lab", "up", "--dir", "/tmp/lab", "--no-mediator", "--mediator-bin", "/bin/true"],
            &["mediator", "show"],
            &["mediator", "show", "--mediator", "127.0.0.1:1"],
            &["mediator", "show", "--lab", "/tmp/lab", "--mediator", "127.0.0.1:1"],
        ] {
            let error = parse(bad).map(|_| ()).unwrap_err();
            assert_eq!(error.exit_code(), i32::from(cli::EXIT_USAGE), "{bad:?}: {error}");
        }
    }
}

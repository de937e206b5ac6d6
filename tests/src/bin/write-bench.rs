//! `write-bench`: write latency and IOPS through the controller's data API on a 2-node cluster on
//! 127.0.0.1, beside the cost of its stages measured alone in the same run (DESIGN §4, §15).
//!
//! For every durability mode (`process`, `power`), in this order:
//! 1. **NVLog append alone**: a fresh `MmapMedia` file of the daemon's NVLog size, formatted with
//!    a `local` and a `dr_partner` partition as `nvlog-bench` does; one thread appends 4 KiB
//!    records (`append` returns once durable) while a CP thread releases what is durable;
//! 2. a cluster of two real `mc-controller` processes starts (node 1 at site A, node 2 at site
//!    B, DR partners of each other) with that durability; A gets an aggregate and a volume;
//! 3. **gRPC round trip**: `Data.Flush` at A, one outstanding call (it does no I/O);
//! 4. **write**: `Data.Write` of 4 KiB at random block-aligned offsets of the volume at A, which
//!    appends to A's NVLog and mirrors the record to B before it answers; one outstanding call
//!    (QD1) on one HTTP/2 channel, then `--depth` tasks (QD32) over `--channels` channels;
//! 5. the daemons stop (SIGTERM, then SIGKILL after a grace period).
//!
//! With `--baseline-controller PATH` (another `mc-controller`, e.g. one built from an earlier
//! commit), steps 2–5 run `--baseline-rounds` times for each binary, alternating (current then
//! baseline in odd rounds, baseline then current in even ones, so drift and noise of the
//! machine hit both alike), each run with fresh files; the report adds every run and the ratios
//! current / baseline per round and their median. The usual report shows the current binary's
//! first run. The aggregate is created with the same request for both; where its plex 1 disk
//! file appeared (A's shelf or B's) is reported per run.
//!
//! Invariants of the measurement:
//! - every case runs a warm-up, then a measured window of `--seconds`; an operation counts only
//!   if it started and finished inside the window; IOPS is those operations over the window;
//! - a latency is the wall time of one call as its caller sees it, in nanoseconds;
//! - the file system is synced and left quiet before every case, so a case does not pay for the
//!   writeback of the one before;
//! - every write the daemon acknowledged must be acknowledged by B too: after the runs, A's
//!   mirror must report an acked lsn at least as high as the highest lsn a write returned;
//! - the daemons never outlive the benchmark: they are stopped at the end and on error, and on
//!   Linux they get SIGKILL if the benchmark process dies (`PR_SET_PDEATHSIG`);
//! - every file lives in a fresh temporary directory under `--dir`, deleted at the end.
//!
//! CPU per operation (daemon A, daemon B, this client) is read from `/proc` over the whole case,
//! warm-up included: on a small machine the three processes share the cores, and the numbers say
//! who spends them. Speed is reported, never asserted (DESIGN §14).

use mc_tests::bench::{Mode, connect, median, micros, nanos, percentile, status};
use mc_tests::daemon::{DAEMON_DEADLINE, Daemon, clock_ticks_per_second, cpu_ticks, free_port};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::data_client::DataClient;
use mc_proto::v1::{
    CreateAggregateRequest, CreateVolumeRequest, FlushRequest, MirrorState, StatusReply, WriteRequest,
};
use nvlog::{
    AggregateId, ClusterId, Epoch, FormatSpec, Identity, Lsn, MmapMedia, NodeId, Nvlog, OpKind, Options,
    PartitionKind, RecordInput, VolumeId,
};
use rand::{Rng as _, SeedableRng as _};
use tonic::transport::Channel;

/// The cluster id of the daemons' configs, as the wire carries it and as the config spells it.
const CLUSTER_ID: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const CLUSTER_ID_HEX: &str = "00112233445566778899aabbccddeeff";
/// Bytes per write and per NVLog record payload.
const PAYLOAD_BYTES: usize = 4096;
const BLOCK_BYTES: u64 = PAYLOAD_BYTES as u64;
const AGGREGATE: &str = "aggr_bench";
const VOLUME: &str = "vol_bench";
/// The daemons' NVLog size, and the size of the NVLog appended to alone.
const NVLOG_MIB: u64 = 256;
/// Long enough that CPs start only when half of the local partition is full.
const CP_INTERVAL_MS: u64 = 10_000;
/// SyncMirror's default: a slow partner shows as latency, never as a dropped mirror.
const MIRROR_TIMEOUT_MS: u64 = 30_000;
/// Each disk holds the volume and room for the aggregate's own metadata.
const DISK_SLACK_BYTES: u64 = 64 << 20;
/// How often the NVLog-alone CP thread looks at the partition.
const CP_POLL: Duration = Duration::from_millis(1);
/// The NVLog-alone CP thread releases at least this often (as `nvlog-bench` does by default).
const CP_RELEASE_INTERVAL: Duration = Duration::from_millis(5);
/// Quiet time after each case's syncfs.
const SETTLE: Duration = Duration::from_millis(200);

#[derive(Parser, Debug)]
#[command(
    name = "write-bench",
    about = "Write latency and IOPS through the data API of a 2-node cluster on loopback, beside \
             the NVLog append and the gRPC round trip alone"
)]
struct Args {
    /// The `mc-controller` binary (default: next to this executable).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Directory under which a temporary directory holds the NVLogs and shelves (default: the
    /// system's temporary directory). Use a disk file system: on tmpfs `power` costs nothing.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Measured seconds per case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Warm-up seconds before each case's measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Durability modes, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Mode::Process, Mode::Power])]
    modes: Vec<Mode>,
    /// Outstanding writes of the concurrent case.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// HTTP/2 channels (TCP connections) the concurrent case spreads its tasks over.
    #[arg(long, default_value_t = 4)]
    channels: usize,
    /// Size of the volume written to, in MiB.
    #[arg(long, default_value_t = 64)]
    volume_mib: u64,
    /// Seed of the random offsets (default: random, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
    /// Another `mc-controller` binary (e.g. built from an earlier commit) to run the cluster
    /// cases against too, alternating with `--controller`; the report gives the ratios.
    #[arg(long)]
    baseline_controller: Option<PathBuf>,
    /// With `--baseline-controller`: cluster runs per binary and mode.
    #[arg(long, default_value_t = 3)]
    baseline_rounds: usize,
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    controller: PathBuf,
    dir: PathBuf,
    measured: Duration,
    warmup: Duration,
    modes: Vec<Mode>,
    depth: usize,
    channels: usize,
    volume_bytes: u64,
    seed: u64,
    json: bool,
    baseline: Option<PathBuf>,
    baseline_rounds: usize,
}

impl Config {
    fn from_args(args: Args) -> Result<Config> {
        ensure!(
            args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0,
            "--seconds must be in (0, 3600], got {}",
            args.seconds
        );
        ensure!(
            args.warmup_seconds.is_finite() && (0.0..=600.0).contains(&args.warmup_seconds),
            "--warmup-seconds must be in [0, 600], got {}",
            args.warmup_seconds
        );
        ensure!(!args.modes.is_empty(), "--modes needs at least one mode");
        ensure!((1..=1024).contains(&args.depth), "--depth must be in 1..=1024, got {}", args.depth);
        ensure!(
            (1..=args.depth).contains(&args.channels),
            "--channels must be in 1..=--depth ({}), got {}",
            args.depth,
            args.channels
        );
        ensure!(
            (1..=4096).contains(&args.volume_mib),
            "--volume-mib must be in 1..=4096, got {}",
            args.volume_mib
        );
        let controller = match args.controller {
            Some(path) => path,
            None => std::env::current_exe().context("find this executable")?.with_file_name("mc-controller"),
        };
        ensure!(
            controller.is_file(),
            "{} is not a file: build it with `cargo build --release -p controller` or pass --controller",
            controller.display()
        );
        if let Some(baseline) = &args.baseline_controller {
            ensure!(baseline.is_file(), "--baseline-controller {} is not a file", baseline.display());
        }
        ensure!(
            (1..=100).contains(&args.baseline_rounds),
            "--baseline-rounds must be in 1..=100, got {}",
            args.baseline_rounds
        );
        let mut modes = args.modes;
        modes.dedup();
        Ok(Config {
            controller,
            dir: args.dir.unwrap_or_else(std::env::temp_dir),
            measured: Duration::from_secs_f64(args.seconds),
            warmup: Duration::from_secs_f64(args.warmup_seconds),
            modes,
            depth: args.depth,
            channels: args.channels,
            volume_bytes: args.volume_mib << 20,
            seed: args.seed.unwrap_or_else(rand::random),
            json: args.json,
            baseline: args.baseline_controller,
            baseline_rounds: args.baseline_rounds,
        })
    }
}

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse())?;
    run(&config)
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("write-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("create a temporary directory in {}", config.dir.display()))?;
    let fs_name = file_system_name(work.path())?;
    println!(
        "write-bench: 2 nodes on 127.0.0.1, {} ({fs_name}), {} MiB NVLogs, 4 KiB writes at random \
         offsets of a {} MiB volume, {:.1} s warm-up + {:.1} s per case, QD{} over {} channels, seed {}",
        work.path().display(),
        NVLOG_MIB,
        config.volume_bytes >> 20,
        config.warmup.as_secs_f64(),
        config.measured.as_secs_f64(),
        config.depth,
        config.channels,
        config.seed,
    );
    if fs_name == "tmpfs" || fs_name == "ramfs" {
        println!("WARNING: {fs_name} is memory: msync costs nothing there and `power` means nothing");
    }
    println!("controller: {}", config.controller.display());
    if let Some(baseline) = &config.baseline {
        println!(
            "baseline controller: {} ({} rounds per mode, alternating with the controller)",
            baseline.display(),
            config.baseline_rounds
        );
    }
    println!(
        "machine: {} CPUs, load average {} (the client and both daemons share them)",
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut results = Vec::new();
    for &mode in &config.modes {
        let mode_dir = work.path().join(mode.name());
        fs::create_dir_all(&mode_dir).with_context(|| format!("create {}", mode_dir.display()))?;
        let result = bench_mode(config, &runtime, &mode_dir, mode)
            .with_context(|| format!("run the {} mode", mode.name()))?;
        fs::remove_dir_all(&mode_dir).with_context(|| format!("remove {}", mode_dir.display()))?;
        results.push(result);
    }
    println!();
    for result in &results {
        print!("{}", mode_report(config, result));
        println!();
        if !result.compared.is_empty() {
            print!("{}", comparison_report(config, result));
            println!();
        }
    }
    if config.json {
        println!("{}", to_json(config, &fs_name, &results));
    }
    Ok(())
}

/// Everything one durability mode measured.
#[derive(Debug)]
struct ModeResult {
    mode: Mode,
    nvlog: Stage,
    round_trip: Stage,
    write_qd1: Stage,
    write_deep: Stage,
    /// A's account after the runs.
    cp_completed: u64,
    backpressure_waits: u64,
    cp_last_duration_us: u64,
    cp_last_blocks: u64,
    mirror_state: String,
    /// With `--baseline-controller`: every cluster run, in the order they ran.
    compared: Vec<ComparedRun>,
}

impl ModeResult {
    fn new(mode: Mode, nvlog: Stage, stages: ClusterStages, compared: Vec<ComparedRun>) -> ModeResult {
        ModeResult {
            mode,
            nvlog,
            round_trip: stages.round_trip,
            write_qd1: stages.write_qd1,
            write_deep: stages.write_deep,
            cp_completed: stages.cp_completed,
            backpressure_waits: stages.backpressure_waits,
            cp_last_duration_us: stages.cp_last_duration_us,
            cp_last_blocks: stages.cp_last_blocks,
            mirror_state: stages.mirror_state,
            compared,
        }
    }
}

/// What one cluster run measured.
#[derive(Debug, Clone)]
struct ClusterStages {
    round_trip: Stage,
    write_qd1: Stage,
    write_deep: Stage,
    /// A's account after the run.
    cp_completed: u64,
    backpressure_waits: u64,
    cp_last_duration_us: u64,
    cp_last_blocks: u64,
    mirror_state: String,
    /// Which shelf directory the plex 1 disk file appeared in after `CreateAggregate`.
    plex1_shelf: &'static str,
}

/// The binary a cluster run used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// `--controller`.
    Current,
    /// `--baseline-controller`.
    Baseline,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Current => "current",
            Which::Baseline => "baseline",
        }
    }
}

/// One cluster run of a comparison.
#[derive(Debug)]
struct ComparedRun {
    /// From 0.
    round: usize,
    which: Which,
    stages: ClusterStages,
}

/// One case: the calls counted in the measured window, their latencies, and CPU per call.
#[derive(Debug, Clone)]
struct Stage {
    depth: usize,
    ops: u64,
    window: Duration,
    mean_ns: f64,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
    /// CPU microseconds per call over the whole case (warm-up included): daemon A, daemon B,
    /// this process. `None` where no daemon was involved.
    cpu_us_per_op: Option<[f64; 3]>,
}

impl Stage {
    fn new(depth: usize, mut latencies: Vec<u64>, window: Duration) -> Result<Stage> {
        ensure!(!latencies.is_empty(), "no call completed inside the measured window");
        latencies.sort_unstable();
        let sum: u128 = latencies.iter().map(|&ns| u128::from(ns)).sum();
        Ok(Stage {
            depth,
            ops: latencies.len() as u64,
            window,
            mean_ns: sum as f64 / latencies.len() as f64,
            p50_ns: percentile(&latencies, 500),
            p99_ns: percentile(&latencies, 990),
            max_ns: latencies.last().copied().unwrap_or(0),
            cpu_us_per_op: None,
        })
    }

    fn iops(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }
}

fn bench_mode(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    mode: Mode,
) -> Result<ModeResult> {
    println!("{} mode:", mode.name());
    settle(dir)?;
    let nvlog = bench_nvlog(config, dir, mode).context("append to the NVLog alone")?;
    print_stage("NVLog append alone", &nvlog);

    let Some(baseline) = &config.baseline else {
        let stages = run_cluster(config, runtime, &config.controller, dir, mode)?;
        return Ok(ModeResult::new(mode, nvlog, stages, Vec::new()));
    };
    let mut compared = Vec::with_capacity(2 * config.baseline_rounds);
    for round in 0..config.baseline_rounds {
        // Each binary goes first in every other round, so a drift of the machine (page cache,
        // writeback, other tenants) is shared out evenly.
        let order = if round % 2 == 0 {
            [Which::Current, Which::Baseline]
        } else {
            [Which::Baseline, Which::Current]
        };
        for which in order {
            let binary = match which {
                Which::Current => &config.controller,
                Which::Baseline => baseline,
            };
            println!("  round {}/{}, {} controller:", round + 1, config.baseline_rounds, which.name());
            let run_dir = dir.join(format!("round{round}-{}", which.name()));
            fs::create_dir_all(&run_dir).with_context(|| format!("create {}", run_dir.display()))?;
            settle(dir)?;
            let stages = run_cluster(config, runtime, binary, &run_dir, mode).with_context(|| {
                format!("round {} with the {} controller {}", round + 1, which.name(), binary.display())
            })?;
            fs::remove_dir_all(&run_dir).with_context(|| format!("remove {}", run_dir.display()))?;
            compared.push(ComparedRun { round, which, stages });
        }
    }
    let first = compared
        .iter()
        .find(|run| run.which == Which::Current)
        .map(|run| run.stages.clone())
        .context("no run of the current controller")?;
    Ok(ModeResult::new(mode, nvlog, first, compared))
}

/// Starts a cluster of `binary` in `dir`, measures its stages and stops it.
fn run_cluster(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    binary: &Path,
    dir: &Path,
    mode: Mode,
) -> Result<ClusterStages> {
    // Spawned from this (the main) thread, which lives as long as the benchmark: the daemons'
    // parent-death signal fires when the spawning thread exits.
    let mut cluster = Cluster::start(binary, dir, mode)?;
    let measured = runtime.block_on(bench_cluster(config, &cluster, dir));
    let stopped = cluster.stop();
    let result = measured.map_err(|e| e.context(cluster.logs()))?;
    stopped?;
    Ok(result)
}

fn print_stage(what: &str, stage: &Stage) {
    println!(
        "  {what:<34} QD{:<3} {:>9.0} IOPS  mean {:>8.1} us  p50 {:>8.1} us  p99 {:>8.1} us",
        stage.depth,
        stage.iops(),
        stage.mean_ns / 1000.0,
        micros(stage.p50_ns),
        micros(stage.p99_ns),
    );
}

// ---------------------------------------------------------------------------------------------
// Stage 1: the NVLog alone.

fn bench_nvlog(config: &Config, dir: &Path, mode: Mode) -> Result<Stage> {
    let path = dir.join("nvlog-alone.bin");
    let media =
        MmapMedia::create(&path, NVLOG_MIB << 20).with_context(|| format!("create {}", path.display()))?;
    let node = NodeId(1);
    let spec = FormatSpec {
        identity: Identity { cluster: ClusterId(CLUSTER_ID), node },
        partitions: vec![(PartitionKind::Local, node), (PartitionKind::DrPartner, NodeId(2))],
        generation_floor: nvlog::Generation(0),
    };
    // `..Options::default()` keeps this building when a workspace feature adds nvlog's `faults`.
    #[allow(clippy::needless_update)]
    let options = Options { durability: mode.durability(), ..Options::default() };
    let (log, _report) = Nvlog::format(media, &spec, options).context("format the NVLog")?;
    let log = Arc::new(log);

    let stop = Arc::new(AtomicBool::new(false));
    let cp = {
        let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
        thread::Builder::new()
            .name("cp".into())
            .spawn(move || cp_loop(&log, &stop))
            .context("spawn the CP thread")?
    };
    let appended = append_loop(&log, Window::after_warmup(config));
    // Stop the CP only after the appender: an append waiting for space needs a release.
    stop.store(true, Ordering::Relaxed);
    let cp_result = cp.join().map_err(|_| anyhow!("the CP thread panicked"))?;
    let (latencies, total) = appended?;
    cp_result?;
    let stats = log.stats();
    ensure!(stats.io_errors == 0, "the NVLog saw {} I/O errors", stats.io_errors);
    // lsns are issued from 1 without gaps: the last one is the number of appends that returned.
    let status = log.status(PartitionKind::Local).context("read the local partition's status")?;
    ensure!(
        status.last_lsn == Lsn(total) && status.durable_lsn == status.last_lsn,
        "{total} appends returned, but the last lsn is {} and the durable lsn {}",
        status.last_lsn,
        status.durable_lsn
    );
    drop(log);
    fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    Stage::new(1, latencies, config.measured)
}

/// One appender until the window closes; returns the latencies inside the window and how many
/// appends returned in all.
fn append_loop(log: &Nvlog<MmapMedia>, window: Window) -> Result<(Vec<u64>, u64)> {
    let payload = payload_for(0);
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut total = 0u64;
    loop {
        let start = Instant::now();
        if start >= window.end {
            return Ok((latencies, total));
        }
        let input = RecordInput {
            op: OpKind::Write,
            aggregate: AggregateId([1; 16]),
            epoch: Epoch { number: 1, owner: NodeId(1) },
            volume: VolumeId(1),
            offset: total * BLOCK_BYTES,
            range_len: BLOCK_BYTES,
            payload: &payload,
        };
        log.append(&input).context("append a record")?;
        let end = Instant::now();
        total += 1;
        if window.holds(start, end) {
            latencies.push(nanos(end - start));
        }
    }
}

/// The stand-in for consistency points, as in `nvlog-bench`: frees what is durable every few
/// milliseconds, or at once when half the partition is in use.
fn cp_loop(log: &Nvlog<MmapMedia>, stop: &AtomicBool) -> Result<()> {
    let mut last_release = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(CP_POLL);
        let status = log.status(PartitionKind::Local).context("read the local partition's status")?;
        let due = last_release.elapsed() >= CP_RELEASE_INTERVAL || status.used_bytes > status.size_bytes / 2;
        if due && status.durable_lsn > status.released_lsn {
            log.release(PartitionKind::Local, status.durable_lsn)
                .with_context(|| format!("release through lsn {}", status.durable_lsn))?;
            last_release = Instant::now();
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Stages 2 and 3: the cluster.

/// One node's files and port.
#[derive(Debug)]
struct NodeSpec {
    id: u32,
    site: &'static str,
    dir: PathBuf,
    grpc_port: u16,
}

impl NodeSpec {
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("controller.toml")
    }

    /// `nbd_key`: whether the binary knows `listen.nbd` (a baseline built before the NBD export
    /// refuses the key, and has no export to put on a port).
    fn write_config(&self, partner: &NodeSpec, mode: Mode, nbd_key: bool) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("create {}", self.dir.display()))?;
        let text = format!(
            r#"cluster_id = "{CLUSTER_ID_HEX}"
node_id = {id}
site = "{site}"
shelf_dir = "{dir}/shelf"

[dr_partner]
node_id = {partner_id}
address = "{partner_address}"

[nvlog]
path = "{dir}/nvlog"
size_mib = {NVLOG_MIB}
durability = "{durability}"

[listen]
grpc = "127.0.0.1:{port}"
metrics = "127.0.0.1:0"
{nbd}
[timers]
mirror_timeout_ms = {MIRROR_TIMEOUT_MS}
cp_interval_ms = {CP_INTERVAL_MS}
"#,
            id = self.id,
            site = self.site,
            dir = self.dir.display(),
            partner_id = partner.id,
            partner_address = partner.address(),
            durability = mode.name(),
            port = self.grpc_port,
            nbd = if nbd_key { "nbd = \"127.0.0.1:0\"\n" } else { "" },
        );
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }
}

/// Whether `binary` has the NBD export (`--nbd-listen` in its `--help`).
fn knows_nbd_listen(binary: &Path) -> bool {
    std::process::Command::new(binary)
        .arg("--help")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("--nbd-listen"))
}

/// Nodes 1 (site A, the writer) and 2 (site B, its DR partner).
#[derive(Debug)]
struct Cluster {
    nodes: [NodeSpec; 2],
    daemons: [Daemon; 2],
}

impl Cluster {
    fn start(binary: &Path, dir: &Path, mode: Mode) -> Result<Cluster> {
        let spec = |id: u32, site: &'static str| -> Result<NodeSpec> {
            Ok(NodeSpec { id, site, dir: dir.join(site), grpc_port: free_port()? })
        };
        let nodes = [spec(1, "A")?, spec(2, "B")?];
        // Each build is asked whether it knows the key, so an old baseline keeps working.
        let nbd_key = knows_nbd_listen(binary);
        nodes[0].write_config(&nodes[1], mode, nbd_key)?;
        nodes[1].write_config(&nodes[0], mode, nbd_key)?;
        // Per-write logging would be part of what is measured; warnings still show up.
        let a = Daemon::spawn("node 1 (A)".into(), binary, &nodes[0].config_path(), "warn", &[])?;
        let b = Daemon::spawn("node 2 (B)".into(), binary, &nodes[1].config_path(), "warn", &[])?;
        Ok(Cluster { nodes, daemons: [a, b] })
    }

    /// Stops A (the writer) first, then B; reports the first failure.
    fn stop(&mut self) -> Result<()> {
        let [a, b] = &mut self.daemons;
        let a = a.terminate();
        let b = b.terminate();
        a.and(b)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for daemon in &self.daemons {
            let _ = write!(out, "--- {} log ---\n{}\n", daemon.name(), daemon.log_text());
        }
        out
    }

    fn pids(&self) -> Result<[u32; 2]> {
        let pid = |i: usize| {
            self.daemons[i].pid().with_context(|| format!("{} is not running", self.daemons[i].name()))
        };
        Ok([pid(0)?, pid(1)?])
    }
}

/// Polls node `spec`'s status until `check` holds or the deadline passes.
async fn wait_status(
    spec: &NodeSpec,
    what: &str,
    check: impl Fn(&StatusReply) -> bool,
) -> Result<StatusReply> {
    let deadline = Instant::now() + DAEMON_DEADLINE;
    loop {
        let reply = match connect(&spec.address()).await {
            Ok(channel) => status(&mut AdminClient::new(channel), &CLUSTER_ID).await,
            Err(error) => Err(error),
        };
        let last = match reply {
            Ok(reply) if check(&reply) => return Ok(reply),
            Ok(reply) => format!("{} ({})", reply.node_state, reply.state_reason),
            Err(error) => format!("{error:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "node {}: {what} did not hold within {DAEMON_DEADLINE:?}; last: {last}",
            spec.id
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn mirror_state_name(reply: &StatusReply) -> String {
    reply.dr_mirror.as_ref().map_or_else(
        || "none".to_string(),
        |mirror| {
            MirrorState::try_from(mirror.state)
                .map_or_else(|_| format!("{}", mirror.state), |s| s.as_str_name().to_string())
        },
    )
}

/// Measures the cluster's stages; `nvlog` (measured before the cluster started) completes the
/// result.
async fn bench_cluster(config: &Config, cluster: &Cluster, dir: &Path) -> Result<ClusterStages> {
    let [a, b] = &cluster.nodes;
    wait_status(a, "serving", |s| s.node_state == "serving").await?;
    wait_status(b, "serving", |s| s.node_state == "serving").await?;
    wait_status(a, "the DR mirror is connected", |s| s.dr_mirror.as_ref().is_some_and(|m| m.connected))
        .await?;

    let mut admin = AdminClient::new(connect(&a.address()).await?);
    let created = admin
        .create_aggregate(CreateAggregateRequest {
            cluster_id: CLUSTER_ID.to_vec(),
            name: AGGREGATE.into(),
            plex0_disks: vec!["d0".into()],
            plex1_disks: vec!["d1".into()],
            disk_size_bytes: config.volume_bytes + DISK_SLACK_BYTES,
        })
        .await
        .context("Admin.CreateAggregate")?
        .into_inner();
    ensure!(
        created.state == "mirrored,normal",
        "the new aggregate is {:?}, not mirrored,normal: {created:?}",
        created.state
    );
    // Since 1ff6fe2 plex 1's disks are created on the DR partner's shelf; before, both plexes
    // were files on the owner's shelf. The same request works for both; say which it was.
    let shelf_file = |node: &NodeSpec, name: &str| node.dir.join("shelf").join(name).is_file();
    ensure!(shelf_file(a, "d0"), "plex 0's disk d0 is not on A's shelf");
    let plex1_shelf = match (shelf_file(a, "d1"), shelf_file(b, "d1")) {
        (false, true) => "B's shelf (remote, DiskService)",
        (true, false) => "A's shelf (local)",
        (on_a, on_b) => bail!("plex 1's disk d1: on A's shelf {on_a}, on B's shelf {on_b}"),
    };
    if config.baseline.is_some() {
        println!("  plex 0 on A's shelf, plex 1 on {plex1_shelf}");
    }
    admin
        .create_volume(CreateVolumeRequest {
            cluster_id: CLUSTER_ID.to_vec(),
            aggregate: AGGREGATE.into(),
            name: VOLUME.into(),
            size_bytes: config.volume_bytes,
        })
        .await
        .context("Admin.CreateVolume")?;
    let pids = cluster.pids()?;

    settle(dir)?;
    let (round_trip, _) =
        drive(config, &a.address(), Op::Flush, 1, 1, pids).await.context("measure Data.Flush")?;
    print_stage("gRPC round trip (Data.Flush at A)", &round_trip);
    settle(dir)?;
    let (write_qd1, lsn_qd1) =
        drive(config, &a.address(), Op::Write, 1, 1, pids).await.context("measure writes at QD1")?;
    print_stage("write at A, mirrored to B", &write_qd1);
    settle(dir)?;
    let (write_deep, lsn_deep) = drive(config, &a.address(), Op::Write, config.depth, config.channels, pids)
        .await
        .with_context(|| format!("measure writes at QD{}", config.depth))?;
    print_stage("write at A, mirrored to B", &write_deep);

    let after = status(&mut admin, &CLUSTER_ID).await?;
    let acked = after.dr_mirror.as_ref().map_or(0, |m| m.acked_lsn);
    let last = lsn_qd1.max(lsn_deep);
    ensure!(acked >= last, "writes returned lsns up to {last}, but A's mirror says B acked only {acked}");
    let cp = after.cp.unwrap_or_default();
    Ok(ClusterStages {
        round_trip,
        write_qd1,
        write_deep,
        cp_completed: cp.completed,
        backpressure_waits: cp.backpressure_waits,
        cp_last_duration_us: cp.last_duration_us,
        cp_last_blocks: cp.last_blocks,
        mirror_state: mirror_state_name(&after),
        plex1_shelf,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// `Data.Flush`: no I/O, the bare round trip.
    Flush,
    /// `Data.Write` of 4 KiB at a random block of the volume.
    Write,
}

/// Where a case's warm-up ends and its measured window.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    end: Instant,
}

impl Window {
    fn after_warmup(config: &Config) -> Window {
        let start = Instant::now() + config.warmup;
        Window { start, end: start + config.measured }
    }

    fn holds(&self, start: Instant, end: Instant) -> bool {
        start >= self.start && end <= self.end
    }
}

/// What one client task saw.
#[derive(Debug, Default)]
struct TaskResult {
    latencies: Vec<u64>,
    /// Calls that returned, warm-up included.
    total: u64,
    /// The highest lsn a write returned.
    max_lsn: u64,
}

/// Runs `depth` closed-loop tasks spread over `channels` connections to `address`; returns the
/// stage and the highest lsn a write returned.
async fn drive(
    config: &Config,
    address: &str,
    op: Op,
    depth: usize,
    channels: usize,
    pids: [u32; 2],
) -> Result<(Stage, u64)> {
    let mut clients = Vec::with_capacity(channels);
    for _ in 0..channels {
        clients.push(DataClient::new(connect(address).await?));
    }
    let blocks = config.volume_bytes / BLOCK_BYTES;
    let cpu_before = [cpu_ticks(&pids[0].to_string())?, cpu_ticks(&pids[1].to_string())?, cpu_ticks("self")?];
    let window = Window::after_warmup(config);
    let mut tasks = Vec::with_capacity(depth);
    for task in 0..depth {
        let client = clients[task % channels].clone();
        let seed = config.seed ^ (task as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.push(tokio::spawn(client_task(client, op, task, seed, blocks, window)));
    }
    let mut latencies = Vec::new();
    let mut total = 0u64;
    let mut max_lsn = 0u64;
    let mut first_error = None;
    for task in tasks {
        match task.await.context("join a client task")? {
            Ok(mut result) => {
                latencies.append(&mut result.latencies);
                total += result.total;
                max_lsn = max_lsn.max(result.max_lsn);
            }
            Err(error) => first_error = first_error.or(Some(error)),
        }
    }
    if let Some(error) = first_error {
        return Err(error);
    }
    let cpu_after = [cpu_ticks(&pids[0].to_string())?, cpu_ticks(&pids[1].to_string())?, cpu_ticks("self")?];
    let mut stage = Stage::new(depth, latencies, config.measured)?;
    let per_tick_us = 1e6 / clock_ticks_per_second()?;
    let per_op = |i: usize| (cpu_after[i] - cpu_before[i]) as f64 * per_tick_us / total as f64;
    stage.cpu_us_per_op = Some([per_op(0), per_op(1), per_op(2)]);
    Ok((stage, max_lsn))
}

async fn client_task(
    mut client: DataClient<Channel>,
    op: Op,
    task: usize,
    seed: u64,
    blocks: u64,
    window: Window,
) -> Result<TaskResult> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut payload = payload_for(task);
    let mut result = TaskResult { latencies: Vec::with_capacity(1 << 16), ..TaskResult::default() };
    loop {
        let start = Instant::now();
        if start >= window.end {
            return Ok(result);
        }
        match op {
            Op::Flush => {
                client
                    .flush(FlushRequest { cluster_id: CLUSTER_ID.to_vec(), volume: VOLUME.into() })
                    .await
                    .context("Data.Flush")?;
            }
            Op::Write => {
                let block = rng.random_range(0..blocks);
                // Different bytes every time, so no layer can take a shortcut on repeated data.
                payload[..8].copy_from_slice(&result.total.to_le_bytes());
                let reply = client
                    .write(WriteRequest {
                        cluster_id: CLUSTER_ID.to_vec(),
                        volume: VOLUME.into(),
                        offset: block * BLOCK_BYTES,
                        data: payload.clone(),
                    })
                    .await
                    .with_context(|| format!("Data.Write at block {block}"))?
                    .into_inner();
                result.max_lsn = result.max_lsn.max(reply.last_lsn);
            }
        }
        let end = Instant::now();
        result.total += 1;
        if window.holds(start, end) {
            result.latencies.push(nanos(end - start));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with `nvlog-bench`'s approach.

/// Syncs the file system of `dir` and waits a moment, so the next case does not pay for the
/// writeback of the last.
fn settle(dir: &Path) -> Result<()> {
    mc_tests::daemon::settle(dir, SETTLE)
}

/// The file system's name for the report.
fn file_system_name(dir: &Path) -> Result<String> {
    use std::os::unix::ffi::OsStrExt as _;

    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("pass {} to statfs", dir.display()))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stat` a valid, writable `statfs`, both alive for the call.
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", dir.display()));
    }
    // `f_type` is signed or unsigned, 32 or 64 bits, depending on the target.
    let f_type = i128::from(stat.f_type);
    Ok(match f_type {
        t if t == i128::from(libc::EXT4_SUPER_MAGIC) => "ext4".into(),
        t if t == i128::from(libc::XFS_SUPER_MAGIC) => "xfs".into(),
        t if t == i128::from(libc::BTRFS_SUPER_MAGIC) => "btrfs".into(),
        t if t == i128::from(libc::TMPFS_MAGIC) => "tmpfs".into(),
        0x8584_58f6 => "ramfs".into(),
        t => format!("file system type {t:#x}"),
    })
}

/// A 4 KiB payload that differs per task, so the CRC and the copies see real data.
fn payload_for(task: usize) -> Vec<u8> {
    (0..PAYLOAD_BYTES).map(|i| (i.wrapping_mul(31) ^ task).to_le_bytes()[0]).collect()
}

// ---------------------------------------------------------------------------------------------
// Reports.

/// Write QD1 over the sum of the stages it contains at least once: the client's round trip to A
/// and one NVLog append. The mirror hop to B (a stream message, B's append, the ack) runs
/// concurrently with A's append and is what the rest is mostly made of.
fn write_over_stages(result: &ModeResult, mean: bool) -> f64 {
    if mean {
        result.write_qd1.mean_ns / (result.nvlog.mean_ns + result.round_trip.mean_ns)
    } else {
        result.write_qd1.p50_ns as f64 / (result.nvlog.p50_ns + result.round_trip.p50_ns).max(1) as f64
    }
}

/// Write QD1 over a model with the mirror hop priced as a second round trip and a second append.
fn write_over_model(result: &ModeResult) -> f64 {
    result.write_qd1.mean_ns / (2.0 * (result.nvlog.mean_ns + result.round_trip.mean_ns))
}

/// The mean write QD1 split into the client round trip, one append, and the rest, in ns.
fn shares(result: &ModeResult) -> [f64; 3] {
    let write = result.write_qd1.mean_ns;
    let rest = write - result.round_trip.mean_ns - result.nvlog.mean_ns;
    [result.round_trip.mean_ns, result.nvlog.mean_ns, rest]
}

fn mode_report(config: &Config, r: &ModeResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "### durability = {}", r.mode.name());
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| stage | QD | ops | IOPS | mean us | p50 us | p99 us | max us | CPU us/op A | CPU us/op B | CPU us/op client |"
    );
    let _ = writeln!(out, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let rows = [
        ("NVLog append alone (4 KiB)", &r.nvlog),
        ("gRPC round trip (Data.Flush at A)", &r.round_trip),
        ("write 4 KiB at A, mirrored to B", &r.write_qd1),
        ("write 4 KiB at A, mirrored to B", &r.write_deep),
    ];
    for (name, s) in rows {
        let cpu = s.cpu_us_per_op.map_or_else(
            || "- | - | -".to_string(),
            |[a, b, client]| format!("{a:.1} | {b:.1} | {client:.1}"),
        );
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {cpu} |",
            s.depth,
            s.ops,
            s.iops(),
            s.mean_ns / 1000.0,
            micros(s.p50_ns),
            micros(s.p99_ns),
            micros(s.max_ns),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "| ratio | value |");
    let _ = writeln!(out, "|---|--:|");
    let _ = writeln!(
        out,
        "| write QD1 / (NVLog append + gRPC round trip), mean | {:.2}x |",
        write_over_stages(r, true)
    );
    let _ = writeln!(
        out,
        "| write QD1 / (NVLog append + gRPC round trip), p50 | {:.2}x |",
        write_over_stages(r, false)
    );
    let _ = writeln!(
        out,
        "| write QD1 / 2 x (NVLog append + gRPC round trip) (mirror hop priced as a second of each), mean | {:.2}x |",
        write_over_model(r)
    );
    let _ = writeln!(
        out,
        "| write IOPS QD{} / QD1 | {:.2}x |",
        config.depth,
        r.write_deep.iops() / r.write_qd1.iops()
    );
    let _ = writeln!(out);
    let [round_trip, append, rest] = shares(r);
    let write = r.write_qd1.mean_ns;
    let _ = writeln!(out, "| share of a QD1 write (mean {:.1} us) | us | share |", write / 1000.0);
    let _ = writeln!(out, "|---|--:|--:|");
    for (name, ns) in [
        ("gRPC round trip client -> A", round_trip),
        ("NVLog append (A's; B's runs in the rest)", append),
        ("the rest: mirror hop A -> B -> A, B's append, controller work", rest),
    ] {
        let _ = writeln!(out, "| {name} | {:.1} | {:.0}% |", ns / 1000.0, 100.0 * ns / write);
    }
    if rest < 0.0 {
        let _ = writeln!(
            out,
            "(the rest is negative: the stages alone cost more than the whole write in this run; \
             compare the p50s, the means carry the outliers)"
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "A after the runs: {} CPs completed (the last: {} blocks in {:.1} ms), {} back-pressure waits, \
         DR mirror {}",
        r.cp_completed,
        r.cp_last_blocks,
        r.cp_last_duration_us as f64 / 1000.0,
        r.backpressure_waits,
        r.mirror_state
    );
    out
}

/// What a comparison sets side by side, per run: a name and a value where lower is better for
/// latencies and higher for IOPS (the ratio is current / baseline either way).
fn compared_values(config: &Config, s: &ClusterStages) -> Vec<(String, f64)> {
    let deep = config.depth;
    vec![
        ("gRPC round trip, mean (the same work for both: the noise)".into(), s.round_trip.mean_ns),
        ("write QD1, mean latency".into(), s.write_qd1.mean_ns),
        ("write QD1, p50 latency".into(), s.write_qd1.p50_ns as f64),
        ("write QD1, p99 latency".into(), s.write_qd1.p99_ns as f64),
        ("write QD1, IOPS".into(), s.write_qd1.iops()),
        (format!("write QD{deep}, IOPS"), s.write_deep.iops()),
        (format!("write QD{deep}, mean latency"), s.write_deep.mean_ns),
        (format!("write QD{deep}, p99 latency"), s.write_deep.p99_ns as f64),
    ]
}

/// Per compared value: its name, the ratio current / baseline of every round, and their median.
fn comparison_ratios(config: &Config, r: &ModeResult) -> Vec<(String, Vec<f64>, Option<f64>)> {
    let rounds = r.compared.iter().map(|run| run.round + 1).max().unwrap_or(0);
    let find = |round: usize, which: Which| {
        r.compared.iter().find(|run| run.round == round && run.which == which).map(|run| &run.stages)
    };
    let mut per_value: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 0..rounds {
        let (Some(current), Some(baseline)) = (find(round, Which::Current), find(round, Which::Baseline))
        else {
            continue;
        };
        let pairs = compared_values(config, current).into_iter().zip(compared_values(config, baseline));
        for (i, ((name, c), (_, b))) in pairs.enumerate() {
            if per_value.len() <= i {
                per_value.push((name, Vec::new()));
            }
            per_value[i].1.push(c / b);
        }
    }
    per_value
        .into_iter()
        .map(|(name, ratios)| {
            let middle = median(&ratios);
            (name, ratios, middle)
        })
        .collect()
}

fn comparison_report(config: &Config, r: &ModeResult) -> String {
    let mut out = String::new();
    let deep = config.depth;
    let _ = writeln!(out, "### durability = {}: current vs baseline controller", r.mode.name());
    let _ = writeln!(out);
    let _ = writeln!(out, "current: {}", config.controller.display());
    if let Some(baseline) = &config.baseline {
        let _ = writeln!(out, "baseline: {}", baseline.display());
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| round | controller | plex 1 | round trip mean us | QD1 IOPS | QD1 mean us | QD1 p50 us | QD1 p99 us | \
         QD{deep} IOPS | QD{deep} mean us | QD{deep} p99 us | CPU us/write QD1 A / B / client | \
         CPU us/write QD{deep} A / B / client | back-pressure waits | CPs | the last CP |"
    );
    let _ = writeln!(out, "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    let cpu = |s: &Stage| {
        s.cpu_us_per_op.map_or_else(|| "-".to_string(), |[a, b, c]| format!("{a:.0} / {b:.0} / {c:.0}"))
    };
    for run in &r.compared {
        let s = &run.stages;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | \
             {} blocks in {:.0} ms |",
            run.round + 1,
            run.which.name(),
            s.plex1_shelf,
            s.round_trip.mean_ns / 1000.0,
            s.write_qd1.iops(),
            s.write_qd1.mean_ns / 1000.0,
            micros(s.write_qd1.p50_ns),
            micros(s.write_qd1.p99_ns),
            s.write_deep.iops(),
            s.write_deep.mean_ns / 1000.0,
            micros(s.write_deep.p99_ns),
            cpu(&s.write_qd1),
            cpu(&s.write_deep),
            s.backpressure_waits,
            s.cp_completed,
            s.cp_last_blocks,
            s.cp_last_duration_us as f64 / 1000.0,
        );
    }
    let _ = writeln!(out);
    let ratios = comparison_ratios(config, r);
    let rounds = ratios.first().map_or(0, |(_, per_round, _)| per_round.len());
    let mut header = "| current / baseline |".to_string();
    let mut rule = "|---|".to_string();
    for round in 1..=rounds {
        let _ = write!(header, " round {round} |");
        rule.push_str("--:|");
    }
    let _ = writeln!(out, "{header} median |");
    let _ = writeln!(out, "{rule}--:|");
    for (name, per_round, middle) in &ratios {
        let mut row = format!("| {name} |");
        for ratio in per_round {
            let _ = write!(row, " {ratio:.2}x |");
        }
        let _ = writeln!(out, "{row} {} |", middle.map_or_else(|| "-".into(), |m| format!("{m:.2}x")));
    }
    out
}

fn stage_json(s: &Stage) -> serde_json::Value {
    serde_json::json!({
        "depth": s.depth,
        "ops": s.ops,
        "window_s": s.window.as_secs_f64(),
        "iops": s.iops(),
        "mean_ns": s.mean_ns,
        "p50_ns": s.p50_ns,
        "p99_ns": s.p99_ns,
        "max_ns": s.max_ns,
        "cpu_us_per_op": s.cpu_us_per_op.map(|[a, b, client]| serde_json::json!({"a": a, "b": b, "client": client})),
    })
}

/// The runs of a comparison and the ratios current / baseline; null without one.
fn compared_json(config: &Config, r: &ModeResult) -> serde_json::Value {
    if r.compared.is_empty() {
        return serde_json::Value::Null;
    }
    let runs: Vec<serde_json::Value> = r
        .compared
        .iter()
        .map(|run| {
            let s = &run.stages;
            serde_json::json!({
                "round": run.round + 1,
                "controller": run.which.name(),
                "plex1_shelf": s.plex1_shelf,
                "grpc_round_trip": stage_json(&s.round_trip),
                "write_qd1": stage_json(&s.write_qd1),
                "write_deep": stage_json(&s.write_deep),
                "cp_completed": s.cp_completed,
                "backpressure_waits": s.backpressure_waits,
                "cp_last_duration_us": s.cp_last_duration_us,
                "cp_last_blocks": s.cp_last_blocks,
            })
        })
        .collect();
    let ratios: Vec<serde_json::Value> = comparison_ratios(config, r)
        .into_iter()
        .map(|(name, per_round, middle)| serde_json::json!({"value": name, "per_round": per_round, "median": middle}))
        .collect();
    serde_json::json!({"runs": runs, "current_over_baseline": ratios})
}

fn to_json(config: &Config, fs_name: &str, results: &[ModeResult]) -> String {
    let modes: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            let [round_trip, append, rest] = shares(r);
            serde_json::json!({
                "mode": r.mode.name(),
                "nvlog_append": stage_json(&r.nvlog),
                "grpc_round_trip": stage_json(&r.round_trip),
                "write_qd1": stage_json(&r.write_qd1),
                "write_deep": stage_json(&r.write_deep),
                "write_qd1_over_append_plus_round_trip_mean": write_over_stages(r, true),
                "write_qd1_over_append_plus_round_trip_p50": write_over_stages(r, false),
                "write_qd1_over_twice_append_plus_round_trip_mean": write_over_model(r),
                "write_qd1_shares_ns": {"grpc_round_trip": round_trip, "nvlog_append": append, "rest": rest},
                "cp_completed": r.cp_completed,
                "backpressure_waits": r.backpressure_waits,
                "cp_last_duration_us": r.cp_last_duration_us,
                "cp_last_blocks": r.cp_last_blocks,
                "mirror_state": r.mirror_state,
                "compared": compared_json(config, r),
            })
        })
        .collect();
    serde_json::json!({
        "file_system": fs_name,
        "nvlog_mib": NVLOG_MIB,
        "volume_bytes": config.volume_bytes,
        "block_bytes": BLOCK_BYTES,
        "warmup_s": config.warmup.as_secs_f64(),
        "seconds": config.measured.as_secs_f64(),
        "depth": config.depth,
        "channels": config.channels,
        "seed": config.seed,
        "controller": config.controller.display().to_string(),
        "baseline_controller": config.baseline.as_ref().map(|p| p.display().to_string()),
        "modes": modes,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nonsense flags are refused before any daemon starts.
    #[test]
    fn invalid_flags_are_refused() {
        let exe = std::env::current_exe().expect("the test binary has a path");
        let exe = exe.to_str().expect("the path is UTF-8");
        for args in [
            &["write-bench", "--controller", exe, "--seconds", "0"][..],
            &["write-bench", "--controller", exe, "--depth", "0"],
            &["write-bench", "--controller", exe, "--channels", "64"],
            &["write-bench", "--controller", exe, "--volume-mib", "0"],
            &["write-bench", "--controller", "/nonexistent/mc-controller"],
            &["write-bench", "--controller", exe, "--baseline-controller", "/nonexistent/mc-controller"],
            &["write-bench", "--controller", exe, "--baseline-controller", exe, "--baseline-rounds", "0"],
        ] {
            assert!(Config::from_args(Args::parse_from(args)).is_err(), "{args:?} was accepted");
        }
        assert!(Config::from_args(Args::parse_from(["write-bench", "--controller", exe])).is_ok());
    }
}

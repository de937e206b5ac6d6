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

use mc_tests::bench::{Mode, micros, nanos, percentile};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::data_client::DataClient;
use mc_proto::v1::{
    CreateAggregateRequest, CreateVolumeRequest, FlushRequest, MirrorState, StatusReply, StatusRequest,
    WriteRequest,
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
/// How long a daemon may take to listen, to serve, or to stop on SIGTERM.
const DAEMON_DEADLINE: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(20);
/// How often the NVLog-alone CP thread looks at the partition.
const CP_POLL: Duration = Duration::from_millis(1);
/// The NVLog-alone CP thread releases at least this often (as `nvlog-bench` does by default).
const CP_RELEASE_INTERVAL: Duration = Duration::from_millis(5);
/// Quiet time after each case's syncfs.
const SETTLE: Duration = Duration::from_millis(200);
/// Daemon log lines kept for error messages.
const LOG_LINES_KEPT: usize = 200;

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

    // Spawned from this (the main) thread, which lives as long as the benchmark: the daemons'
    // parent-death signal fires when the spawning thread exits.
    let mut cluster = Cluster::start(config, dir, mode)?;
    let measured = runtime.block_on(bench_cluster(config, &cluster, dir, mode, nvlog));
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

    fn write_config(&self, partner: &NodeSpec, mode: Mode) -> Result<()> {
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
        );
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }
}

/// A free TCP port on 127.0.0.1 (the daemons must know each other's ports before they start).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind a probe port")?;
    Ok(listener.local_addr().context("read the probe port")?.port())
}

/// A running daemon: SIGTERM, then SIGKILL, when stopped or dropped.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Starts `binary --config config` and waits for the line it prints once it listens.
    fn spawn(name: String, binary: &Path, config: &Path) -> Result<Daemon> {
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            // Per-write logging would be part of what is measured; warnings still show up.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command.spawn().with_context(|| format!("start {}", binary.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("take the daemon's stdout")?;
        thread::spawn(move || {
            // Keeps draining stdout after the first line, so the daemon never blocks on it.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().context("take the daemon's stderr")?;
        let sink = Arc::clone(&log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut lines) = sink.lock() {
                    if lines.len() >= LOG_LINES_KEPT {
                        lines.remove(0);
                    }
                    lines.push(line);
                }
            }
        });
        let mut daemon = Daemon { name, child: Some(child), log };
        let deadline = Instant::now() + DAEMON_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("mc-controller node ") && line.contains(" listening ") => {
                    return Ok(daemon);
                }
                Ok(_) => {}
                Err(_) => {
                    // Ends the daemon first, so its last words are in the log.
                    let _ = daemon.terminate();
                    bail!("{} did not start listening:\n{}", daemon.name, daemon.log_text());
                }
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        self.log.lock().map(|lines| lines.join("\n")).unwrap_or_default()
    }

    /// SIGTERM and a wait for the exit; SIGKILL after `STOP_GRACE`. Errors if the daemon did not
    /// exit cleanly on SIGTERM.
    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if child.try_wait().context("poll the daemon")?.is_none() {
            let pid = i32::try_from(child.id()).context("the daemon's pid")?;
            // SAFETY: signalling our own child, which has not been reaped (try_wait saw it alive),
            // so the pid cannot name another process.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                let error = std::io::Error::last_os_error();
                let _ = child.kill();
                let _ = child.wait();
                return Err(error).with_context(|| format!("send SIGTERM to {}", self.name));
            }
        }
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().context("poll the daemon")? {
                ensure!(status.success(), "{} exited with {status} on SIGTERM", self.name);
                return Ok(());
            }
            if started.elapsed() > STOP_GRACE {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop within {STOP_GRACE:?} of SIGTERM; killed", self.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Best effort on the error path; a clean stop goes through `terminate` and reports.
        let _ = self.terminate();
    }
}

/// Makes the child get SIGKILL when this process dies, so a killed benchmark leaves no daemon.
#[cfg(target_os = "linux")]
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;

    // SAFETY: the closure runs in the child between fork and exec; it only calls prctl, which
    // is async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut Command) {}

/// Nodes 1 (site A, the writer) and 2 (site B, its DR partner).
#[derive(Debug)]
struct Cluster {
    nodes: [NodeSpec; 2],
    daemons: [Daemon; 2],
}

impl Cluster {
    fn start(config: &Config, dir: &Path, mode: Mode) -> Result<Cluster> {
        let spec = |id: u32, site: &'static str| -> Result<NodeSpec> {
            Ok(NodeSpec { id, site, dir: dir.join(site), grpc_port: free_port()? })
        };
        let nodes = [spec(1, "A")?, spec(2, "B")?];
        nodes[0].write_config(&nodes[1], mode)?;
        nodes[1].write_config(&nodes[0], mode)?;
        let a = Daemon::spawn("node 1 (A)".into(), &config.controller, &nodes[0].config_path())?;
        let b = Daemon::spawn("node 2 (B)".into(), &config.controller, &nodes[1].config_path())?;
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
            let _ = write!(out, "--- {} log ---\n{}\n", daemon.name, daemon.log_text());
        }
        out
    }

    fn pids(&self) -> Result<[u32; 2]> {
        let pid = |i: usize| {
            self.daemons[i].pid().with_context(|| format!("{} is not running", self.daemons[i].name))
        };
        Ok([pid(0)?, pid(1)?])
    }
}

async fn connect(address: &str) -> Result<Channel> {
    Channel::from_shared(format!("http://{address}"))
        .context("build the channel's URI")?
        .connect()
        .await
        .with_context(|| format!("connect to {address}"))
}

async fn status(admin: &mut AdminClient<Channel>) -> Result<StatusReply> {
    Ok(admin
        .status(StatusRequest { cluster_id: CLUSTER_ID.to_vec() })
        .await
        .context("Admin.Status")?
        .into_inner())
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
            Ok(channel) => status(&mut AdminClient::new(channel)).await,
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
async fn bench_cluster(
    config: &Config,
    cluster: &Cluster,
    dir: &Path,
    mode: Mode,
    nvlog: Stage,
) -> Result<ModeResult> {
    let [a, b] = &cluster.nodes;
    wait_status(a, "serving", |s| s.node_state == "serving").await?;
    wait_status(b, "serving", |s| s.node_state == "serving").await?;
    wait_status(a, "the DR mirror is connected", |s| s.dr_mirror.as_ref().is_some_and(|m| m.connected))
        .await?;

    let mut admin = AdminClient::new(connect(&a.address()).await?);
    admin
        .create_aggregate(CreateAggregateRequest {
            cluster_id: CLUSTER_ID.to_vec(),
            name: AGGREGATE.into(),
            plex0_disks: vec!["d0".into()],
            plex1_disks: vec!["d1".into()],
            disk_size_bytes: config.volume_bytes + DISK_SLACK_BYTES,
        })
        .await
        .context("Admin.CreateAggregate")?;
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

    let after = status(&mut admin).await?;
    let acked = after.dr_mirror.as_ref().map_or(0, |m| m.acked_lsn);
    let last = lsn_qd1.max(lsn_deep);
    ensure!(acked >= last, "writes returned lsns up to {last}, but A's mirror says B acked only {acked}");
    let cp = after.cp.unwrap_or_default();
    Ok(ModeResult {
        mode,
        nvlog,
        round_trip,
        write_qd1,
        write_deep,
        cp_completed: cp.completed,
        backpressure_waits: cp.backpressure_waits,
        cp_last_duration_us: cp.last_duration_us,
        cp_last_blocks: cp.last_blocks,
        mirror_state: mirror_state_name(&after),
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

/// User + system CPU of a process (`self` or a pid) in clock ticks, from `/proc/PID/stat`.
fn cpu_ticks(pid: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start at field 3, so utime (14) and stime (15) are the 12th and 13th of them.
    let rest = text.rfind(')').map(|i| &text[i + 1..]).with_context(|| format!("parse {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has no field {}", i + 3))?
            .parse()
            .with_context(|| format!("parse field {} of {path}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

fn clock_ticks_per_second() -> Result<f64> {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(ticks > 0, "sysconf(_SC_CLK_TCK) returned {ticks}");
    Ok(ticks as f64)
}

// ---------------------------------------------------------------------------------------------
// Helpers shared with `nvlog-bench`'s approach.

/// Syncs the file system of `dir` and waits a moment, so the next case does not pay for the
/// writeback of the last.
fn settle(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd as _;

    let handle = File::open(dir).with_context(|| format!("open {}", dir.display()))?;
    // SAFETY: the descriptor belongs to `handle`, which is open for the whole call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("syncfs {}", dir.display()));
    }
    thread::sleep(SETTLE);
    Ok(())
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
        ] {
            assert!(Config::from_args(Args::parse_from(args)).is_err(), "{args:?} was accepted");
        }
        assert!(Config::from_args(Args::parse_from(["write-bench", "--controller", exe])).is_ok());
    }

    /// `/proc` parsing must survive a command name with spaces and parentheses.
    #[test]
    fn own_cpu_ticks_parse() {
        assert!(cpu_ticks("self").is_ok());
    }
}

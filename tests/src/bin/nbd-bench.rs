//! `nbd-bench`: the product against `qemu-nbd` and a do-it-yourself mirror, end to end over NBD
//! with fio's `nbd` engine (DESIGN §15, issue 7; run through `tests/bench`, results in
//! `docs/performance.md`).
//!
//! The targets, all on 127.0.0.1 in one run on one machine:
//! - **floor**: `qemu-nbd` serving a raw local file (no mirror);
//! - **peer**: the mirror from stock parts (the "NetRAID"): `qemu-nbd --image-opts` with
//!   `driver=quorum,vote-threshold=2` over a raw local file and an `nbd` child that points to a
//!   second `qemu-nbd`;
//! - **ours**: the site-A volume of `mcctl lab up --durability process --no-mediator`, mirrored to
//!   site B (no mediator: the write path measured since issue 7, without the lease checks).
//!
//! The qemu-nbd command lines are those of `reference/baselines.sh` beside the design (writeback
//! cache, `-t`, 127.0.0.1, free ports), so the comparison is the documented one.
//!
//! Workloads (fio, one job, the first `--size-mib` of each target): 4 KiB random write QD1
//! (completion latency p50 and p99), 4 KiB random write QD32 (IOPS), 1 MiB sequential write QD8
//! (MiB/s), 4 KiB random read QD32 (IOPS).
//!
//! Invariants of the measurement:
//! - every target is preconditioned once before any measured run: fio writes its whole working
//!   set sequentially, so reads never read holes and the write tests overwrite allocated data;
//! - for each repetition and workload the targets run in a rotating order (the first target of
//!   repetition r and workload w is `(r + w) mod n`), so drift of the machine hits all alike;
//! - before every fio run the file system is synced and left quiet, so a run does not pay for
//!   the writeback of the one before;
//! - the reported value per target and metric is the median over the repetitions; a ratio is
//!   the ratio of two such medians. Goals are reported, never asserted (DESIGN §14);
//! - no server outlives the benchmark: qemu-nbd processes are killed when dropped and get
//!   SIGKILL if the benchmark dies (`PR_SET_PDEATHSIG`); the lab is stopped with
//!   `mcctl lab down` at the end and on every error path (a guard does it on drop);
//! - every file lives in a fresh temporary directory under `--dir` (a disk file system, not
//!   tmpfs), deleted at the end.

use mc_tests::bench::{check_disk_file_system, median};
use mc_tests::daemon::{die_with_parent, free_port, settle};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};

/// Marks the section of `docs/performance.md` this benchmark owns.
const BEGIN_MARKER: &str = "<!-- nbd-bench:begin -->";
const END_MARKER: &str = "<!-- nbd-bench:end -->";
/// fio's warm-up before each measured window, in seconds.
const RAMP_SECS: u64 = 1;
/// Quiet time after each run's syncfs.
const SETTLE: Duration = Duration::from_millis(200);
/// How long a server may take to accept connections.
const LISTEN_DEADLINE: Duration = Duration::from_secs(30);
/// How often a qemu-nbd start is tried, each on a new free port (another process may take the
/// port between the probe and qemu-nbd's bind).
const PORT_ATTEMPTS: usize = 3;
/// fio may run this long beyond its runtime and ramp before it counts as hung.
const FIO_GRACE: Duration = Duration::from_secs(120);
/// The longest a precondition (one sequential pass over the working set) may take.
const PRECONDITION_DEADLINE: Duration = Duration::from_secs(600);
/// The lab's volume size: larger than any working set this benchmark accepts.
const LAB_VOLUME_MIB: u64 = 1024;

#[derive(Parser, Debug)]
#[command(
    name = "nbd-bench",
    about = "fio over NBD against the product, qemu-nbd on a raw file (floor) and a qemu-nbd quorum \
             mirror (peer); writes the table into docs/performance.md"
)]
struct Args {
    /// Targets, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Target::Floor, Target::Peer, Target::Ours])]
    targets: Vec<Target>,
    /// Repetitions of every workload on every target (default 5; 1 with --quick).
    #[arg(long)]
    repetitions: Option<usize>,
    /// Measured seconds per fio run, after a 1 s ramp (default 10; 3 with --quick).
    #[arg(long)]
    runtime_secs: Option<u64>,
    /// A smoke run: 1 repetition of 3 s unless --repetitions or --runtime-secs say otherwise.
    #[arg(long)]
    quick: bool,
    /// The working set fio uses on every target, in MiB (the issue's benchmark: 256).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Directory under which a temporary directory holds the images and the lab (a disk file
    /// system; tmpfs is refused).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// The `mcctl` binary that starts the lab (default: next to this executable, where
    /// `mc-controller` is too).
    #[arg(long)]
    mcctl: Option<PathBuf>,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// The qemu-nbd binary.
    #[arg(long, default_value = "qemu-nbd")]
    qemu_nbd: PathBuf,
    /// The qemu-img binary.
    #[arg(long, default_value = "qemu-img")]
    qemu_img: PathBuf,
    /// The file whose marked section gets the results (default: the workspace's
    /// docs/performance.md).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Print the results only; leave docs/performance.md alone.
    #[arg(long)]
    no_write_docs: bool,
}

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// qemu-nbd serving a raw local file.
    Floor,
    /// qemu-nbd quorum (vote-threshold=2) of a raw local file and a remote qemu-nbd.
    Peer,
    /// The lab's site-A volume, mirrored to site B, `process` durability.
    Ours,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Floor => "floor",
            Target::Peer => "peer",
            Target::Ours => "ours",
        }
    }
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    targets: Vec<Target>,
    repetitions: usize,
    runtime_secs: u64,
    size_mib: u64,
    dir: PathBuf,
    /// Set when `ours` is a target.
    mcctl: Option<PathBuf>,
    fio: PathBuf,
    qemu_nbd: PathBuf,
    qemu_img: PathBuf,
    /// `None` with `--no-write-docs`.
    docs: Option<PathBuf>,
    /// How the benchmark was invoked, for the report.
    command: String,
}

impl Config {
    fn from_args(args: Args, command: String) -> Result<Config> {
        let mut targets = Vec::new();
        for target in args.targets {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        ensure!(!targets.is_empty(), "--targets needs at least one target");
        let (default_repetitions, default_runtime_secs) = if args.quick { (1, 3) } else { (5, 10) };
        let repetitions = args.repetitions.unwrap_or(default_repetitions);
        ensure!((1..=100).contains(&repetitions), "--repetitions must be in 1..=100, got {repetitions}");
        let runtime_secs = args.runtime_secs.unwrap_or(default_runtime_secs);
        ensure!((1..=3600).contains(&runtime_secs), "--runtime-secs must be in 1..=3600, got {runtime_secs}");
        ensure!(
            (1..=LAB_VOLUME_MIB).contains(&args.size_mib),
            "--size-mib must be in 1..={LAB_VOLUME_MIB} (the lab's volume size), got {}",
            args.size_mib
        );
        let mcctl = if targets.contains(&Target::Ours) {
            let mcctl = match args.mcctl {
                Some(path) => path,
                None => std::env::current_exe().context("find this executable")?.with_file_name("mcctl"),
            };
            ensure!(
                mcctl.is_file(),
                "{} is not a file: build it with `cargo build --release -p controller`, pass --mcctl, or \
                 leave `ours` out of --targets",
                mcctl.display()
            );
            Some(mcctl)
        } else {
            None
        };
        let docs = if args.no_write_docs { None } else { Some(args.docs.unwrap_or_else(default_docs_path)) };
        Ok(Config {
            targets,
            repetitions,
            runtime_secs,
            size_mib: args.size_mib,
            dir: args.dir,
            mcctl,
            fio: args.fio,
            qemu_nbd: args.qemu_nbd,
            qemu_img: args.qemu_img,
            docs,
            command,
        })
    }
}

/// `docs/performance.md` of the workspace this binary was built from.
fn default_docs_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).join("docs").join("performance.md")
}

/// The command line as the user typed it: `tests/bench` sets `NBD_BENCH_COMMAND` to its own name.
fn invoked_command() -> String {
    let program = std::env::var("NBD_BENCH_COMMAND").unwrap_or_else(|_| "nbd-bench".to_string());
    let mut words = vec![program];
    words.extend(std::env::args().skip(1).map(|arg| shell_quote(&arg)));
    words.join(" ")
}

/// Quotes a word for a POSIX shell where it needs it.
fn shell_quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_=,./:@%+".contains(c));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse(), invoked_command())?;
    run(&config)
}

/// A fio workload of the issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Workload {
    RandWriteQd1,
    RandWriteQd32,
    SeqWriteQd8,
    RandReadQd32,
}

impl Workload {
    /// In the order they run within a repetition: writes first, so the reads find written data.
    const ALL: [Workload; 4] =
        [Workload::RandWriteQd1, Workload::RandWriteQd32, Workload::SeqWriteQd8, Workload::RandReadQd32];

    fn name(self) -> &'static str {
        match self {
            Workload::RandWriteQd1 => "randwrite-4k-qd1",
            Workload::RandWriteQd32 => "randwrite-4k-qd32",
            Workload::SeqWriteQd8 => "write-1m-qd8",
            Workload::RandReadQd32 => "randread-4k-qd32",
        }
    }

    /// fio's `--rw`, `--bs`, `--iodepth`.
    fn fio_params(self) -> (&'static str, &'static str, u32) {
        match self {
            Workload::RandWriteQd1 => ("randwrite", "4k", 1),
            Workload::RandWriteQd32 => ("randwrite", "4k", 32),
            Workload::SeqWriteQd8 => ("write", "1m", 8),
            Workload::RandReadQd32 => ("randread", "4k", 32),
        }
    }

    fn reads(self) -> bool {
        self == Workload::RandReadQd32
    }

    /// The measured values of one run of this workload, for the raw listing.
    fn raw(self, result: &FioResult) -> String {
        match self {
            Workload::RandWriteQd1 => {
                format!("{:.1}/{:.1}µs {:.0}IOPS", result.p50_us, result.p99_us, result.iops)
            }
            Workload::RandWriteQd32 | Workload::RandReadQd32 => format!("{:.0}IOPS", result.iops),
            Workload::SeqWriteQd8 => format!("{:.1}MiB/s", result.mib_per_s),
        }
    }
}

/// What the report takes from one fio run.
#[derive(Clone, Copy, Debug, PartialEq)]
struct FioResult {
    iops: f64,
    mib_per_s: f64,
    /// Completion latency percentiles.
    p50_us: f64,
    p99_us: f64,
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// From 0.
    repetition: usize,
    workload: Workload,
    target: Target,
    /// Its place in the run order of its repetition and workload, from 0.
    position: usize,
    result: FioResult,
}

/// A reported row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Metric {
    Qd1P50,
    Qd1P99,
    Qd32WriteIops,
    SeqWriteMibs,
    Qd32ReadIops,
}

/// A goal on a ratio ours/other.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, ratio: f64) -> bool {
        match self {
            Goal::AtMost(bound) => ratio <= bound,
            Goal::AtLeast(bound) => ratio >= bound,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(bound) => format!("≤ {bound:.1}×"),
            Goal::AtLeast(bound) => format!("≥ {bound:.1}×"),
        }
    }
}

impl Metric {
    const ALL: [Metric; 5] =
        [Metric::Qd1P50, Metric::Qd1P99, Metric::Qd32WriteIops, Metric::SeqWriteMibs, Metric::Qd32ReadIops];

    fn label(self) -> &'static str {
        match self {
            Metric::Qd1P50 => "4 KiB randwrite QD1 p50 latency, µs (lower is better)",
            Metric::Qd1P99 => "4 KiB randwrite QD1 p99 latency, µs (lower is better)",
            Metric::Qd32WriteIops => "4 KiB randwrite QD32, IOPS",
            Metric::SeqWriteMibs => "1 MiB seq write QD8, MiB/s",
            Metric::Qd32ReadIops => "4 KiB randread QD32, IOPS",
        }
    }

    fn workload(self) -> Workload {
        match self {
            Metric::Qd1P50 | Metric::Qd1P99 => Workload::RandWriteQd1,
            Metric::Qd32WriteIops => Workload::RandWriteQd32,
            Metric::SeqWriteMibs => Workload::SeqWriteQd8,
            Metric::Qd32ReadIops => Workload::RandReadQd32,
        }
    }

    fn value(self, result: &FioResult) -> f64 {
        match self {
            Metric::Qd1P50 => result.p50_us,
            Metric::Qd1P99 => result.p99_us,
            Metric::Qd32WriteIops | Metric::Qd32ReadIops => result.iops,
            Metric::SeqWriteMibs => result.mib_per_s,
        }
    }

    fn format(self, value: f64) -> String {
        match self {
            Metric::Qd1P50 | Metric::Qd1P99 | Metric::SeqWriteMibs => format!("{value:.1}"),
            Metric::Qd32WriteIops | Metric::Qd32ReadIops => format!("{value:.0}"),
        }
    }

    /// The issue's goal for ours/floor. The latency goal is applied to p50 and p99 alike.
    fn goal_over_floor(self) -> Option<Goal> {
        match self {
            Metric::Qd1P50 | Metric::Qd1P99 => Some(Goal::AtMost(2.0)),
            Metric::Qd32ReadIops => Some(Goal::AtLeast(0.8)),
            Metric::Qd32WriteIops | Metric::SeqWriteMibs => None,
        }
    }

    /// The issue's goal for ours/peer.
    fn goal_over_peer(self) -> Option<Goal> {
        match self {
            Metric::Qd1P50 | Metric::Qd1P99 => Some(Goal::AtMost(1.0)),
            Metric::Qd32WriteIops => Some(Goal::AtLeast(1.5)),
            Metric::SeqWriteMibs => Some(Goal::AtLeast(1.0)),
            Metric::Qd32ReadIops => None,
        }
    }
}

/// A target while it serves: its URI and what stops it.
#[derive(Debug)]
struct Running {
    target: Target,
    uri: String,
    /// Stopped on drop, in reverse order of start (the peer's quorum before its remote).
    servers: Vec<Server>,
    lab: Option<Lab>,
}

impl Running {
    /// Stops the target; an error if the lab did not come down cleanly.
    fn stop(mut self) -> Result<()> {
        while let Some(server) = self.servers.pop() {
            drop(server);
        }
        match self.lab.take() {
            Some(mut lab) => lab.down(),
            None => Ok(()),
        }
    }
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let dir = fs::canonicalize(&config.dir).with_context(|| format!("resolve {}", config.dir.display()))?;
    let fs_name = check_disk_file_system(&dir, "the page cache and writeback would not be measured")?;
    let work = tempfile::Builder::new()
        .prefix("nbd-bench-")
        .tempdir_in(&dir)
        .with_context(|| format!("create a temporary directory in {}", dir.display()))?;
    let machine = Machine::probe(config, &fs_name);
    let started = Instant::now();
    println!(
        "nbd-bench: {} in {} ({fs_name}); {} MiB working set, {} repetition(s) of {} s + {RAMP_SECS} s ramp \
         per run",
        config.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        work.path().display(),
        config.size_mib,
        config.repetitions,
        config.runtime_secs,
    );
    println!("machine: {}", machine.line());
    if let Some(warning) = machine.busy_warning() {
        println!("WARNING: {warning}");
    }

    let mut running = Vec::new();
    let mut preconditions = Vec::new();
    for &target in &config.targets {
        let target_dir = work.path().join(target.name());
        fs::create_dir_all(&target_dir).with_context(|| format!("create {}", target_dir.display()))?;
        let serving =
            start_target(config, target, &target_dir).with_context(|| format!("start {}", target.name()))?;
        println!("{}: {}", target.name(), serving.uri);
        let precondition = precondition(config, &serving.uri, work.path())
            .with_context(|| format!("precondition {}", target.name()))?;
        println!(
            "{}: preconditioned, {} MiB written sequentially in {:.1} s ({:.1} MiB/s)",
            target.name(),
            config.size_mib,
            precondition.as_secs_f64(),
            mib_per_s(config.size_mib, precondition),
        );
        preconditions.push((target, precondition));
        running.push(serving);
    }

    let mut samples = Vec::new();
    for repetition in 0..config.repetitions {
        for (index, &workload) in Workload::ALL.iter().enumerate() {
            for (position, target) in rotated(&config.targets, repetition + index).into_iter().enumerate() {
                let uri = &running
                    .iter()
                    .find(|r| r.target == target)
                    .ok_or_else(|| anyhow!("{} is not running", target.name()))?
                    .uri;
                settle(work.path(), SETTLE)?;
                let result = run_fio(config, uri, workload, work.path()).with_context(|| {
                    format!("run {} on {} (repetition {})", workload.name(), target.name(), repetition + 1)
                })?;
                println!(
                    "rep {}/{} {:<18} {:<5} {}",
                    repetition + 1,
                    config.repetitions,
                    workload.name(),
                    target.name(),
                    workload.raw(&result)
                );
                samples.push(Sample { repetition, workload, target, position, result });
            }
        }
    }

    // Stops every target, the lab included, before reporting; all are stopped even if one fails.
    let mut stop_errors = Vec::new();
    for serving in running {
        let name = serving.target.name();
        if let Err(error) = serving.stop() {
            stop_errors.push(format!("{name}: {error:#}"));
        }
    }

    let table = results_table(&config.targets, &samples);
    println!();
    print!("{table}");
    println!();
    println!("took {:.0} s", started.elapsed().as_secs_f64());
    if let Some(docs) = &config.docs {
        let section = docs_section(config, &machine, &preconditions, &table, &samples);
        write_section(docs, &section)?;
        println!("wrote the section between {BEGIN_MARKER} and {END_MARKER} of {}", docs.display());
    }
    ensure!(stop_errors.is_empty(), "stopping the targets failed: {}", stop_errors.join("; "));
    Ok(())
}

/// `targets` rotated left by `by`: the run order of one repetition and workload.
fn rotated(targets: &[Target], by: usize) -> Vec<Target> {
    let mut order = targets.to_vec();
    if !order.is_empty() {
        let shift = by % order.len();
        order.rotate_left(shift);
    }
    order
}

#[allow(clippy::cast_precision_loss)]
fn mib_per_s(mib: u64, took: Duration) -> f64 {
    mib as f64 / took.as_secs_f64().max(f64::MIN_POSITIVE)
}

/// Facts of the machine for the report.
#[derive(Debug)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    kernel: String,
    qemu_nbd: String,
    fio: String,
    file_system: String,
    load_average: String,
}

impl Machine {
    fn probe(config: &Config, fs_name: &str) -> Machine {
        let first_line = |program: &Path| {
            Command::new(program)
                .arg("--version")
                .output()
                .ok()
                .and_then(|out| String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_string))
                .unwrap_or_else(|| "unknown".to_string())
        };
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("model name"))
                    .and_then(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".to_string());
        Machine {
            cpus: thread::available_parallelism().map_or(0, std::num::NonZero::get),
            cpu_model,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".to_string()),
            qemu_nbd: first_line(&config.qemu_nbd),
            fio: first_line(&config.fio),
            file_system: fs_name.to_string(),
            load_average: fs::read_to_string("/proc/loadavg")
                .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|_| "unknown".to_string()),
        }
    }

    /// Said when other work already keeps the CPUs busy: the servers, fio and that work share them.
    fn busy_warning(&self) -> Option<String> {
        let one_minute: f64 = self.load_average.split_whitespace().next()?.parse().ok()?;
        #[allow(clippy::cast_precision_loss)]
        let cpus = self.cpus as f64;
        (one_minute > cpus).then(|| {
            format!(
                "the 1-minute load average ({one_minute}) is above the CPU count ({}) at the start: other \
                 work shares the CPUs and the numbers are noisy",
                self.cpus
            )
        })
    }

    fn line(&self) -> String {
        format!(
            "nproc {} ({}), Linux {}, {}, {}, {} under --dir, load average {} at the start",
            self.cpus,
            self.cpu_model,
            self.kernel,
            self.qemu_nbd,
            self.fio,
            self.file_system,
            self.load_average
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Targets

/// A qemu-nbd process, killed on drop (the images it serves are thrown away, so it needs no clean
/// shutdown).
#[derive(Debug)]
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Best effort: it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_target(config: &Config, target: Target, dir: &Path) -> Result<Running> {
    match target {
        Target::Floor => start_floor(config, dir),
        Target::Peer => start_peer(config, dir),
        Target::Ours => start_ours(config, dir),
    }
}

/// qemu-nbd serving a raw file, as `start_floor` of `reference/baselines.sh`.
fn start_floor(config: &Config, dir: &Path) -> Result<Running> {
    let image = create_image(config, &dir.join("floor.img"))?;
    let (server, port) = start_qemu_nbd(config, "floor", dir, |port| {
        let mut args = qemu_nbd_common_args("floor", port);
        args.splice(0..0, ["-f".to_string(), "raw".to_string()]);
        args.extend(["--aio=threads".to_string(), image.display().to_string()]);
        args
    })?;
    Ok(Running {
        target: Target::Floor,
        uri: format!("nbd://127.0.0.1:{port}/floor"),
        servers: vec![server],
        lab: None,
    })
}

/// The NetRAID of stock parts, as `start_peer` of `reference/baselines.sh`: a remote qemu-nbd, and
/// a quorum (vote-threshold=2) of a local raw file and that remote.
fn start_peer(config: &Config, dir: &Path) -> Result<Running> {
    let local = create_image(config, &dir.join("peer-local.img"))?;
    let remote = create_image(config, &dir.join("peer-remote.img"))?;
    let (remote_server, remote_port) = start_qemu_nbd(config, "remote", dir, |port| {
        let mut args = qemu_nbd_common_args("remote", port);
        args.splice(0..0, ["-f".to_string(), "raw".to_string()]);
        args.push(remote.display().to_string());
        args
    })?;
    let options = peer_image_opts(&local, remote_port);
    let (quorum_server, port) = start_qemu_nbd(config, "peer", dir, |port| {
        let mut args = qemu_nbd_common_args("peer", port);
        args.extend(["--image-opts".to_string(), options.clone()]);
        args
    })?;
    Ok(Running {
        target: Target::Peer,
        uri: format!("nbd://127.0.0.1:{port}/peer"),
        servers: vec![remote_server, quorum_server],
        lab: None,
    })
}

/// `-x EXPORT -p PORT -b 127.0.0.1 -t --cache=writeback`, shared by the three qemu-nbd servers.
fn qemu_nbd_common_args(export: &str, port: u16) -> Vec<String> {
    ["-x", export, "-p", &port.to_string(), "-b", "127.0.0.1", "-t", "--cache=writeback"]
        .map(str::to_string)
        .to_vec()
}

/// The quorum's `--image-opts`: child 0 the local raw file, child 1 the remote export.
fn peer_image_opts(local: &Path, remote_port: u16) -> String {
    // A comma inside an option value is written twice in qemu's option syntax.
    let local = local.display().to_string().replace(',', ",,");
    format!(
        "driver=quorum,vote-threshold=2,children.0.driver=raw,children.0.file.driver=file,\
         children.0.file.filename={local},children.1.driver=raw,children.1.file.driver=nbd,\
         children.1.file.host=127.0.0.1,children.1.file.port={remote_port},children.1.file.export=remote"
    )
}

/// `qemu-img create -q -f raw PATH SIZE` (a sparse file; the precondition fills it).
fn create_image(config: &Config, path: &Path) -> Result<PathBuf> {
    let output = Command::new(&config.qemu_img)
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(format!("{}M", config.size_mib))
        .output()
        .with_context(|| format!("run {}", config.qemu_img.display()))?;
    ensure!(
        output.status.success(),
        "qemu-img create {} failed ({}): {}",
        path.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(path.to_path_buf())
}

/// Starts qemu-nbd with `args(port)` on a free port and waits until it accepts connections; tries
/// again on a new port if it exits first (the port may have been taken after the probe). Its
/// output goes to `DIR/NAME.log`.
fn start_qemu_nbd(
    config: &Config,
    name: &str,
    dir: &Path,
    args: impl Fn(u16) -> Vec<String>,
) -> Result<(Server, u16)> {
    let log_path = dir.join(format!("{name}.log"));
    let mut failures = Vec::new();
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port()?;
        let args = args(port);
        let log = File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new(&config.qemu_nbd);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("share the log file")?)
            .stderr(log);
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("start {}", config.qemu_nbd.display()))?;
        let mut server = Server { child };
        match wait_listening(port, Some(&mut server.child), LISTEN_DEADLINE) {
            Ok(()) => return Ok((server, port)),
            Err(error) => {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                failures.push(format!("qemu-nbd {}: {error:#}: {}", args.join(" "), log.trim()));
            }
        }
        drop(server);
    }
    bail!("{name} did not start: {}", failures.join("\n"))
}

/// Waits until 127.0.0.1:`port` accepts a connection; fails early if `child` exits.
fn wait_listening(port: u16, mut child: Option<&mut Child>, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(child) = child.as_deref_mut()
            && let Some(status) = child.try_wait().context("poll the server")?
        {
            bail!("exited with {status} before it listened on port {port}");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {within:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The two-site lab of `mcctl lab up`; `mcctl lab down` when stopped or dropped.
#[derive(Debug)]
struct Lab {
    mcctl: PathBuf,
    dir: PathBuf,
    /// The controllers' pids, from `lab up`'s answer; killed only if `lab down` fails.
    pids: Vec<u32>,
    up: bool,
}

impl Lab {
    /// `mcctl lab down --dir DIR`; if that fails, SIGKILL to the controllers it started.
    fn down(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        let output = Command::new(&self.mcctl)
            .args(["lab", "down", "--dir"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {} lab down", self.mcctl.display()));
        let failure = match output {
            Ok(output) if output.status.success() => return Ok(()),
            Ok(output) => anyhow!(
                "mcctl lab down --dir {} failed ({}): {}{}",
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => error,
        };
        let killed = kill_controllers(&self.pids);
        Err(failure.context(format!("killed the lab's controllers {killed:?} instead")))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Best effort on the error path; the normal path calls `down` and reports.
        let _ = self.down();
    }
}

/// SIGKILL to each pid that is still an `mc-controller` (a pid alone could have been reused).
fn kill_controllers(pids: &[u32]) -> Vec<u32> {
    let mut killed = Vec::new();
    for &pid in pids {
        let is_controller = fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("mc-controller"));
        let Ok(raw) = i32::try_from(pid) else { continue };
        if is_controller {
            // SAFETY: kill(2) takes plain integers; the pid was checked above to be an
            // mc-controller, which the lab started for this benchmark.
            if unsafe { libc::kill(raw, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
    }
    killed
}

/// `mcctl lab up --dir DIR --detach -o json --durability process --no-mediator --volume-size-mib
/// 1024`, and the site-A volume's URI.
fn start_ours(config: &Config, dir: &Path) -> Result<Running> {
    let mcctl = config.mcctl.clone().ok_or_else(|| anyhow!("no mcctl for the lab"))?;
    let lab_dir = dir.join("lab");
    // The guard exists before `lab up` runs, so a lab that fails half-way is brought down too.
    let mut lab = Lab { mcctl: mcctl.clone(), dir: lab_dir.clone(), pids: Vec::new(), up: true };
    let output = Command::new(&mcctl)
        .args(["lab", "up", "--dir"])
        .arg(&lab_dir)
        .args(["--detach", "-o", "json", "--durability", "process", "--no-mediator", "--volume-size-mib"])
        .arg(LAB_VOLUME_MIB.to_string())
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} lab up", mcctl.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "mcctl lab up --dir {} failed ({}): {}{}",
        lab_dir.display(),
        output.status,
        stdout,
        String::from_utf8_lossy(&output.stderr)
    );
    let answer = parse_lab_up(&stdout).context("read the answer of mcctl lab up")?;
    lab.pids = answer.pids;
    let port = uri_port(&answer.uri).ok_or_else(|| anyhow!("no port in the volume URI {}", answer.uri))?;
    wait_listening(port, None, LISTEN_DEADLINE).with_context(|| format!("reach {}", answer.uri))?;
    Ok(Running { target: Target::Ours, uri: answer.uri, servers: Vec::new(), lab: Some(lab) })
}

/// What the benchmark takes from `mcctl lab up -o json`.
#[derive(Debug, PartialEq, Eq)]
struct LabUp {
    /// The NBD URI of the volume at site A.
    uri: String,
    pids: Vec<u32>,
}

fn parse_lab_up(stdout: &str) -> Result<LabUp> {
    let value = json_after_noise(stdout)?;
    let volumes = value.get("volumes").and_then(|v| v.as_array()).ok_or_else(|| anyhow!("no volumes"))?;
    let uri = volumes
        .iter()
        .find(|volume| volume.get("site").and_then(|s| s.as_str()) == Some("A"))
        .and_then(|volume| volume.get("uri"))
        .and_then(|uri| uri.as_str())
        .ok_or_else(|| anyhow!("no volume with a uri at site A in {value}"))?
        .to_string();
    let pids = value
        .get("controllers")
        .and_then(|c| c.as_array())
        .map(|controllers| {
            controllers
                .iter()
                .filter_map(|c| c.get("pid").and_then(serde_json::Value::as_u64))
                .filter_map(|pid| u32::try_from(pid).ok())
                .collect()
        })
        .unwrap_or_default();
    Ok(LabUp { uri, pids })
}

/// The port of `nbd://HOST:PORT/EXPORT`.
fn uri_port(uri: &str) -> Option<u16> {
    let rest = uri.strip_prefix("nbd://")?;
    let authority = rest.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// fio

/// The first JSON value in `stdout`, which may start with lines that are not JSON (fio's nbd
/// engine prints "fio: connected to NBD server" first) and may end with more text.
fn json_after_noise(stdout: &str) -> Result<serde_json::Value> {
    let start = if stdout.starts_with('{') {
        0
    } else {
        stdout.find("\n{").map(|i| i + 1).ok_or_else(|| anyhow!("no JSON object in: {stdout}"))?
    };
    let mut values = serde_json::Deserializer::from_str(&stdout[start..]).into_iter::<serde_json::Value>();
    values.next().ok_or_else(|| anyhow!("no JSON object in: {stdout}"))?.context("parse the JSON")
}

/// IOPS, bandwidth and completion latency of the one job of fio's JSON output.
fn parse_fio(stdout: &str, reads: bool) -> Result<FioResult> {
    let value = json_after_noise(stdout)?;
    let job =
        value.get("jobs").and_then(|jobs| jobs.get(0)).ok_or_else(|| anyhow!("no job in fio's JSON"))?;
    let error = job.get("error").and_then(serde_json::Value::as_i64).unwrap_or(0);
    ensure!(error == 0, "fio's job failed with error {error}");
    let direction_name = if reads { "read" } else { "write" };
    let direction =
        job.get(direction_name).ok_or_else(|| anyhow!("no {direction_name} section in fio's job"))?;
    let number = |key: &str| {
        direction
            .get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| anyhow!("no {direction_name}.{key} in fio's job"))
    };
    let total_ios = number("total_ios")?;
    ensure!(total_ios > 0.0, "fio completed no {direction_name} I/O");
    let percentile_us = |key: &str| {
        direction
            .get("clat_ns")
            .and_then(|clat| clat.get("percentile"))
            .and_then(|p| p.get(key))
            .and_then(serde_json::Value::as_f64)
            .map(|ns| ns / 1000.0)
            .ok_or_else(|| anyhow!("no clat_ns percentile {key} in fio's job"))
    };
    Ok(FioResult {
        iops: number("iops")?,
        mib_per_s: number("bw_bytes")? / f64::from(1u32 << 20),
        p50_us: percentile_us("50.000000")?,
        p99_us: percentile_us("99.000000")?,
    })
}

/// fio's arguments for a measured run of `workload` on `uri`.
fn fio_args(config: &Config, uri: &str, workload: Workload) -> Vec<String> {
    let (rw, bs, iodepth) = workload.fio_params();
    vec![
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={iodepth}"),
        format!("--size={}m", config.size_mib),
        "--time_based".to_string(),
        format!("--runtime={}", config.runtime_secs),
        format!("--ramp_time={RAMP_SECS}"),
        "--output-format=json".to_string(),
        format!("--name={}", workload.name()),
    ]
}

/// fio's arguments for the precondition: one sequential pass of 1 MiB writes over the working set.
fn precondition_args(config: &Config, uri: &str) -> Vec<String> {
    vec![
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=write".to_string(),
        "--bs=1m".to_string(),
        "--iodepth=8".to_string(),
        format!("--size={}m", config.size_mib),
        "--output-format=json".to_string(),
        "--name=precondition".to_string(),
    ]
}

fn run_fio(config: &Config, uri: &str, workload: Workload, scratch: &Path) -> Result<FioResult> {
    let args = fio_args(config, uri, workload);
    let within = Duration::from_secs(config.runtime_secs + RAMP_SECS) + FIO_GRACE;
    let stdout = fio(config, &args, scratch, within)?;
    parse_fio(&stdout, workload.reads())
        .with_context(|| format!("parse the output of fio {}", args.join(" ")))
}

/// Writes the whole working set once; returns how long it took.
fn precondition(config: &Config, uri: &str, scratch: &Path) -> Result<Duration> {
    settle(scratch, SETTLE)?;
    let args = precondition_args(config, uri);
    let started = Instant::now();
    let stdout = fio(config, &args, scratch, PRECONDITION_DEADLINE)?;
    let took = started.elapsed();
    parse_fio(&stdout, false).with_context(|| format!("parse the output of fio {}", args.join(" ")))?;
    Ok(took)
}

/// Runs fio to the end, killed if it takes longer than `within` (a hung server); its output goes
/// through files in `scratch`, so no pipe can fill up. Returns its stdout.
fn fio(config: &Config, args: &[String], scratch: &Path, within: Duration) -> Result<String> {
    let stdout_path = scratch.join("fio.stdout");
    let stderr_path = scratch.join("fio.stderr");
    let stdout = File::create(&stdout_path).with_context(|| format!("create {}", stdout_path.display()))?;
    let stderr = File::create(&stderr_path).with_context(|| format!("create {}", stderr_path.display()))?;
    let mut command = Command::new(&config.fio);
    command.args(args).stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    die_with_parent(&mut command);
    let mut child = command.spawn().with_context(|| format!("start {}", config.fio.display()))?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().context("poll fio")? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("fio {} did not finish within {within:?}; killed", args.join(" "));
        }
        thread::sleep(Duration::from_millis(50));
    };
    let stdout =
        fs::read_to_string(&stdout_path).with_context(|| format!("read {}", stdout_path.display()))?;
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    ensure!(status.success(), "fio {} failed ({status}): {stderr}{stdout}", args.join(" "));
    Ok(stdout)
}

// ---------------------------------------------------------------------------------------------
// Report

/// The median of `metric` over the repetitions of `target`.
fn median_of(samples: &[Sample], metric: Metric, target: Target) -> Option<f64> {
    let values: Vec<f64> = samples
        .iter()
        .filter(|s| s.target == target && s.workload == metric.workload())
        .map(|s| metric.value(&s.result))
        .collect();
    median(&values)
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    }
}

/// A ratio cell: the ratio, and beside it the goal with its verdict.
fn ratio_cell(ratio: Option<f64>, goal: Option<Goal>) -> String {
    match (ratio, goal) {
        (None, _) => "—".to_string(),
        (Some(r), None) => format!("{r:.2}"),
        (Some(r), Some(goal)) => {
            format!("{r:.2} (goal {}: {})", goal.text(), if goal.met(r) { "met" } else { "missed" })
        }
    }
}

/// The markdown table of medians and ratios; a target that did not run shows "—".
fn results_table(targets: &[Target], samples: &[Sample]) -> String {
    let mut out = String::new();
    out.push_str("| metric (median) | floor | peer | ours | peer/floor | ours/floor | ours/peer |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for metric in Metric::ALL {
        let value = |target: Target| {
            if targets.contains(&target) { median_of(samples, metric, target) } else { None }
        };
        let (floor, peer, ours) = (value(Target::Floor), value(Target::Peer), value(Target::Ours));
        let cell = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| metric.format(v));
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            metric.label(),
            cell(floor),
            cell(peer),
            cell(ours),
            ratio_cell(ratio(peer, floor), None),
            ratio_cell(ratio(ours, floor), metric.goal_over_floor()),
            ratio_cell(ratio(ours, peer), metric.goal_over_peer()),
        );
    }
    out
}

/// Every run, one line per repetition and workload, targets in the order they ran.
fn raw_listing(samples: &[Sample]) -> String {
    let mut out = String::new();
    let mut keys: Vec<(usize, usize)> = Vec::new();
    for sample in samples {
        let index = Workload::ALL.iter().position(|&w| w == sample.workload).unwrap_or(0);
        if !keys.contains(&(sample.repetition, index)) {
            keys.push((sample.repetition, index));
        }
    }
    for (repetition, index) in keys {
        let workload = Workload::ALL[index];
        let mut runs: Vec<&Sample> =
            samples.iter().filter(|s| s.repetition == repetition && s.workload == workload).collect();
        runs.sort_by_key(|s| s.position);
        let runs: Vec<String> =
            runs.iter().map(|s| format!("{} {}", s.target.name(), workload.raw(&s.result))).collect();
        let _ = writeln!(out, "rep {} {:<18} {}", repetition + 1, workload.name(), runs.join(" | "));
    }
    out
}

/// Today's date, from `date` (the report's only clock reading that is not a duration).
fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|date| !date.is_empty())
        .unwrap_or_else(|| "unknown date".to_string())
}

/// The fixed part of the section in `docs/performance.md`, wrapped as the rest of that file is.
const DOCS_INTRO: &str = "\
## End to end over NBD: against qemu-nbd and a mirror from stock parts (`nbd-bench`)

Written by `tests/bench` (`tests/src/bin/nbd-bench.rs`); the next run replaces everything
between the markers.

### What is measured

- **floor**: `qemu-nbd -f raw -t --cache=writeback --aio=threads` serving a raw local file (no
  mirror).
- **peer**: the do-it-yourself mirror from stock parts (the NetRAID): `qemu-nbd -t
  --cache=writeback --image-opts driver=quorum,vote-threshold=2,…` over a raw local file and an
  `nbd` child pointing to a second `qemu-nbd -f raw -t --cache=writeback`. The server settings
  are those of `reference/baselines.sh`.
- **ours**: the site-A volume of `mcctl lab up --durability process --no-mediator
  --volume-size-mib 1024`, mirrored to site B.
- All on 127.0.0.1, with fio's `nbd` engine, one job on the first 256 MiB of each target
  (`--size`). Before any measured run each target is preconditioned once: fio writes the whole
  working set sequentially (1 MiB, QD8), so that reads do not read holes and the write tests
  overwrite allocated data.
- Each run is `--time_based --runtime=S --ramp_time=1`; before each run the file system is
  synced (`syncfs`) and left quiet for 200 ms. In each repetition and workload the targets run
  in a rotating order, so drift of the machine hits all alike.
- Values are medians over the repetitions; a ratio is a ratio of medians. Latency is fio's
  completion latency (`clat`).
- Goals (issue 7, ratios): 4 KiB QD1 latency at most 1.0× the peer's and at most 2× the
  floor's (applied to p50 and p99 alike); 4 KiB QD32 write IOPS at least 1.5× the peer's; 1 MiB
  sequential write at least the peer's; 4 KiB QD32 random read at least 0.8× the floor's. They
  are reported beside the ratios, never asserted (DESIGN §14).

";

/// The section of `docs/performance.md`, markers included.
fn docs_section(
    config: &Config,
    machine: &Machine,
    preconditions: &[(Target, Duration)],
    table: &str,
    samples: &[Sample],
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN_MARKER}");
    out.push_str(DOCS_INTRO);
    if config.size_mib != 256 {
        let _ = writeln!(out, "This run used a working set of {} MiB, not 256 MiB.\n", config.size_mib);
    }
    out.push_str("### Last run\n\n");
    let _ = writeln!(out, "- Date: {}", today());
    let _ = writeln!(out, "- Command: `{}`", config.command);
    let _ = writeln!(
        out,
        "- Targets: {}; {} repetition(s), {} s measured + {RAMP_SECS} s ramp per run",
        config.targets.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        config.repetitions,
        config.runtime_secs,
    );
    let _ = writeln!(out, "- Machine: {}", machine.line());
    if let Some(warning) = machine.busy_warning() {
        let _ = writeln!(out, "- **Warning**: {warning}");
    }
    let preconditioned: Vec<String> = preconditions
        .iter()
        .map(|(target, took)| {
            format!(
                "{} {:.1} s ({:.1} MiB/s)",
                target.name(),
                took.as_secs_f64(),
                mib_per_s(config.size_mib, *took)
            )
        })
        .collect();
    let _ =
        writeln!(out, "- Precondition ({} MiB written once): {}", config.size_mib, preconditioned.join(", "));
    out.push('\n');
    out.push_str(table);
    out.push_str(
        "\n### Every run\n\nIn the order they ran; QD1 as p50/p99 completion latency and IOPS.\n\n```text\n",
    );
    out.push_str(&raw_listing(samples));
    out.push_str("```\n");
    let _ = writeln!(out, "{END_MARKER}");
    out
}

/// `existing` with its marked section replaced by `section`, or `section` appended at the end if
/// there is none. Everything outside the markers stays as it was.
fn splice_section(existing: &str, section: &str) -> Result<String> {
    match (existing.find(BEGIN_MARKER), existing.find(END_MARKER)) {
        (Some(begin), Some(end)) if begin < end => {
            let mut end = end + END_MARKER.len();
            // The section ends with its own newline.
            if existing[end..].starts_with('\n') {
                end += 1;
            }
            Ok(format!("{}{section}{}", &existing[..begin], &existing[end..]))
        }
        (None, None) => {
            let mut out = existing.to_string();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            if !out.is_empty() {
                out.push('\n');
            }
            out.push_str(section);
            Ok(out)
        }
        _ => bail!("the markers {BEGIN_MARKER} and {END_MARKER} are not one pair in this order"),
    }
}

/// Replaces the marked section of `path` (write a temporary file, fsync, rename).
fn write_section(path: &Path, section: &str) -> Result<()> {
    let existing = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let text = splice_section(&existing, section).with_context(|| format!("update {}", path.display()))?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("write {}", tmp.display()))?;
    file.sync_all().with_context(|| format!("sync {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// fio 3.33's JSON of a 4 KiB QD1 randwrite over NBD, cut to the fields read, after the line
    /// the nbd engine prints first.
    const FIO_SAMPLE: &str = r#"fio: connected to NBD server
{
  "fio version" : "fio-3.33",
  "timestamp" : 1795696164,
  "jobs" : [
    {
      "jobname" : "b",
      "groupid" : 0,
      "error" : 0,
      "read" : {
        "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.000000, "runtime" : 0, "total_ios" : 0,
        "clat_ns" : { "min" : 0, "max" : 0, "mean" : 0.000000, "stddev" : 0.000000, "N" : 0 }
      },
      "write" : {
        "io_bytes" : 60239872,
        "bw_bytes" : 60179692,
        "bw" : 58769,
        "iops" : 14692.307692,
        "runtime" : 1001,
        "total_ios" : 14707,
        "clat_ns" : {
          "min" : 11264, "max" : 1449984, "mean" : 65812.3, "stddev" : 51004.1, "N" : 14707,
          "percentile" : {
            "1.000000" : 13632, "50.000000" : 48384, "90.000000" : 67072,
            "99.000000" : 305152, "99.900000" : 423936
          }
        }
      }
    }
  ]
}
"#;

    #[test]
    fn fio_json_after_a_banner_is_parsed() {
        let result = parse_fio(FIO_SAMPLE, false).expect("the sample parses");
        assert_eq!(result.p50_us, 48.384);
        assert_eq!(result.p99_us, 305.152);
        assert!((result.iops - 14692.307692).abs() < 1e-9);
        assert!((result.mib_per_s - 60179692.0 / 1048576.0).abs() < 1e-9);
        // The read side of a write job did no I/O: reading it must fail, not report zeroes.
        assert!(parse_fio(FIO_SAMPLE, true).is_err());
    }

    /// A failed job or output without JSON is an error, never a row of zeroes.
    #[test]
    fn fio_failures_are_errors() {
        assert!(parse_fio("fio: connection refused\n", false).is_err());
        let failed = FIO_SAMPLE.replace("\"error\" : 0", "\"error\" : 5");
        assert!(parse_fio(&failed, false).is_err());
    }

    #[test]
    fn lab_up_answer_gives_the_site_a_volume() {
        let stdout = r#"{"volumes":[{"name":"vol_b","site":"B","uri":"nbd://127.0.0.1:4001/vol_b"},
            {"name":"vol_a","site":"A","uri":"nbd://127.0.0.1:4000/vol_a"}],
            "controllers":[{"node":1,"site":"A","admin":"127.0.0.1:5000","pid":123},
            {"node":2,"site":"B","admin":"127.0.0.1:5001","pid":456}]}"#;
        let answer = parse_lab_up(stdout).expect("parses");
        assert_eq!(answer, LabUp { uri: "nbd://127.0.0.1:4000/vol_a".into(), pids: vec![123, 456] });
        assert_eq!(uri_port(&answer.uri), Some(4000));
        assert!(parse_lab_up(r#"{"volumes":[],"controllers":[]}"#).is_err());
    }

    #[test]
    fn medians_and_goals() {
        assert!(Goal::AtMost(1.0).met(1.0) && !Goal::AtMost(1.0).met(1.01));
        assert!(Goal::AtLeast(1.5).met(1.5) && !Goal::AtLeast(1.5).met(1.49));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio_cell(Some(1.234), Some(Goal::AtLeast(1.5))), "1.23 (goal ≥ 1.5×: missed)");
        assert_eq!(ratio_cell(Some(0.5), Some(Goal::AtMost(1.0))), "0.50 (goal ≤ 1.0×: met)");
        assert_eq!(ratio_cell(None, Some(Goal::AtMost(1.0))), "—");
    }

    /// Every target runs first, second and third equally often over the rotations.
    #[test]
    fn rotation_puts_every_target_in_every_place() {
        let targets = [Target::Floor, Target::Peer, Target::Ours];
        for place in 0..3 {
            let firsts: Vec<Target> = (0..3).map(|by| rotated(&targets, by)[place]).collect();
            for target in targets {
                assert!(firsts.contains(&target), "{target:?} never in place {place}");
            }
        }
        assert_eq!(rotated(&[Target::Peer], 7), vec![Target::Peer]);
    }

    fn sample(repetition: usize, workload: Workload, target: Target, position: usize, x: f64) -> Sample {
        Sample {
            repetition,
            workload,
            target,
            position,
            result: FioResult { iops: 1000.0 * x, mib_per_s: 100.0 * x, p50_us: 50.0 * x, p99_us: 300.0 * x },
        }
    }

    #[test]
    fn table_has_medians_ratios_and_dashes_for_missing_targets() {
        let mut samples = Vec::new();
        for (repetition, (floor, peer)) in [(1.0, 2.0), (1.2, 2.2), (5.0, 9.0)].into_iter().enumerate() {
            for workload in Workload::ALL {
                samples.push(sample(repetition, workload, Target::Floor, 0, floor));
                samples.push(sample(repetition, workload, Target::Peer, 1, peer));
            }
        }
        let table = results_table(&[Target::Floor, Target::Peer], &samples);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + Metric::ALL.len(), "{table}");
        // Medians: floor 1.2, peer 2.2 (the outlier repetition does not move them).
        assert_eq!(
            lines[2],
            "| 4 KiB randwrite QD1 p50 latency, µs (lower is better) | 60.0 | 110.0 | — | 1.83 | — | — |"
        );
        assert_eq!(lines[4], "| 4 KiB randwrite QD32, IOPS | 1200 | 2200 | — | 1.83 | — | — |");
        let raw = raw_listing(&samples);
        assert_eq!(raw.lines().count(), 3 * Workload::ALL.len(), "{raw}");
        assert!(raw.starts_with("rep 1 randwrite-4k-qd1   floor 50.0/300.0µs 1000IOPS | peer"), "{raw}");
    }

    #[test]
    fn ours_gets_verdicts() {
        let samples = [
            sample(0, Workload::RandWriteQd1, Target::Floor, 0, 1.0),
            sample(0, Workload::RandWriteQd1, Target::Peer, 1, 2.0),
            sample(0, Workload::RandWriteQd1, Target::Ours, 2, 1.5),
        ];
        let table = results_table(&[Target::Floor, Target::Peer, Target::Ours], &samples);
        assert!(
            table.contains("| 75.0 | 2.00 | 1.50 (goal ≤ 2.0×: met) | 0.75 (goal ≤ 1.0×: met) |"),
            "{table}"
        );
    }

    /// The section replaces only what lies between the markers, or goes at the end.
    #[test]
    fn docs_section_is_spliced() {
        let section = format!("{BEGIN_MARKER}\nnew\n{END_MARKER}\n");
        let appended = splice_section("# Performance\n\ntext", &section).expect("appends");
        assert_eq!(appended, format!("# Performance\n\ntext\n\n{section}"));
        let old = format!("head\n{BEGIN_MARKER}\nold\n{END_MARKER}\ntail\n");
        let replaced = splice_section(&old, &section).expect("replaces");
        assert_eq!(replaced, format!("head\n{section}tail\n"));
        assert_eq!(splice_section(&replaced, &section).expect("idempotent"), replaced);
        assert!(splice_section(&format!("x {END_MARKER} {BEGIN_MARKER}"), &section).is_err());
        assert!(splice_section(&format!("x {BEGIN_MARKER}"), &section).is_err());
    }

    /// Nonsense flags are refused before any server starts; `--quick` only changes defaults.
    #[test]
    fn flags() {
        let config = |args: &[&str]| Config::from_args(Args::parse_from(args), String::new());
        for args in [
            &["nbd-bench", "--targets", "floor", "--repetitions", "0"][..],
            &["nbd-bench", "--targets", "floor", "--runtime-secs", "0"],
            &["nbd-bench", "--targets", "floor", "--size-mib", "0"],
            &["nbd-bench", "--targets", "ours", "--mcctl", "/nonexistent/mcctl"],
        ] {
            assert!(config(args).is_err(), "{args:?} was accepted");
        }
        let quick = config(&["nbd-bench", "--targets", "floor,peer,floor", "--quick"]).expect("valid");
        assert_eq!((quick.repetitions, quick.runtime_secs), (1, 3));
        assert_eq!(quick.targets, vec![Target::Floor, Target::Peer]);
        let full =
            config(&["nbd-bench", "--targets", "peer", "--quick", "--repetitions", "2"]).expect("valid");
        assert_eq!((full.repetitions, full.runtime_secs), (2, 3));
        assert!(full.docs.is_some());
        let none = config(&["nbd-bench", "--targets", "peer", "--no-write-docs"]).expect("valid");
        assert_eq!((none.repetitions, none.runtime_secs, none.docs), (5, 10, None));
        assert_eq!(shell_quote("--targets=floor,peer"), "--targets=floor,peer");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}

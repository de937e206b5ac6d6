//! `plex-bench`: the io_uring block device (`plex::uring::UringDevice`) and a mirrored aggregate
//! over two such devices, each against fio's own io_uring engine on one file with the same
//! parameters; and the time of an incremental resync against a full one (DESIGN §6.2–§6.4, §15;
//! results in `docs/performance.md`).
//!
//! For every workload case (4 KiB random write QD1, 4 KiB random write QD32, 1 MiB sequential
//! write QD8, 4 KiB random read QD32), in one run on one machine:
//! - **uring** (the product's device): a current-thread tokio runtime keeps exactly `iodepth`
//!   requests in flight against a `UringDevice` opened on the file with `entries = iodepth`, each
//!   request issued as soon as the one before it in its lane completes, for `--seconds`;
//! - **aggregate** (the product's mirrored aggregate): `plex::Aggregate` (regions of 64 KiB,
//!   default options) over two files of its own, each a `UringDevice` opened as the uring side's
//!   file is (`entries = 2 × iodepth`: every aggregate write is a data write and a checksum-block
//!   write on each plex), driven through `Aggregate::write` / `Aggregate::read` by the same lanes,
//!   with offsets drawn from the first `--size-mib` of its data, the span fio and the uring side
//!   use;
//! - **fio**: `fio --ioengine=io_uring` on the uring side's file with the same block size,
//!   iodepth, file size and duration, `numjobs=1`, `time_based`, `direct=1` exactly when the
//!   device got O_DIRECT, and `norandommap` (uniform random offsets with repeats, as the product
//!   sides draw them). The aggregate is compared with this same fio run on ONE file: it writes
//!   both of its files, so a disk-bound aggregate write can reach at most half of fio's.
//!
//! The `resync` case (last in the default list; it adds about 15 s to a run of about 2.5 minutes)
//! measures no IOPS: on an aggregate of `--size-mib` over two io_uring files it fails plex 1 (EIO
//! from a bench-local switch in front of its device), writes 5% of the regions (distinct, seeded)
//! while it is out, reattaches it and times `Aggregate::resync` (incremental); then it opens plex 0
//! with a blank file as plex 1 (rule `no-valid-label`) and times the full resync. Both must end
//! `mirrored,normal`, having copied exactly the dirty regions and the whole data area.
//!
//! Invariants of the measurement:
//! - every file is created once, written in full and synced before the first case, so that no
//!   case pays for block allocation, and deleted at the end, also on error; the aggregate's files
//!   are each large enough for a data area of `--size-mib` after the label, bitmap and checksum
//!   areas, and its whole data area is then written once through `Aggregate::write`, so that every
//!   block a read or a resync touches carries its CRC;
//! - random offsets come from a seeded generator (`--seed`, printed), one stream per lane; a
//!   sequential case walks the span from offset 0 and wraps at its end, as fio does;
//! - a product latency is the wall time of one `read`/`write` call from the call to its answer,
//!   which includes everything fio counts as submission latency (slat) and completion latency
//!   (clat); fio's clat and total latency (lat) percentiles are both reported;
//! - IOPS are completed requests over the wall time from the first submission to the last
//!   completion; fio's are its own `iops`;
//! - CPU per request is the user + system time of the whole benchmark process (the tokio thread
//!   and the ring threads) over its requests, and fio's `usr_cpu + sys_cpu` over its `total_ios`:
//!   steadier than IOPS on a shared virtual disk, and what tells a slower disk from a slower engine;
//! - every case runs `--rounds` times (default 2); odd rounds run the sides in reverse order, so
//!   that a drift of the disk does not always favour the same side; the goal is judged on the
//!   means over the rounds, and the per-round ratios are printed beside it;
//! - after every side of every case (and before each timed resync) the file system is synced and
//!   left quiet for a moment, so a side does not pay for the writeback of the one before; with
//!   buffered I/O the files' pages are also dropped from the page cache, as fio's `invalidate=1`
//!   does;
//! - the files live on a disk file system: tmpfs and ramfs are refused.
//!
//! The goals (uring IOPS at least 0.8x fio's in every case, aggregate IOPS at least 0.45x) are
//! reported, never asserted: DESIGN §14 keeps speed out of pass/fail. A new product side (a remote
//! plex) is one more `Side` whose function builds a `Target` and hands it to `drive`.

use mc_tests::bench::{check_disk_file_system, micros, nanos, percentile};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::{Parser, ValueEnum};
use plex::testing::RecordingHook;
use plex::uring::{DirectIo, UringDevice, UringOptions};
use plex::{
    Aggregate, AggregateOptions, AggregateSpec, AggregateState, AlignedBuf, BLOCK_BYTES, BlockDevice,
    DeviceError, DropReason, Epoch, GenerationRule, IoFuture, NodeId, ResyncLevel, Site, Uuid,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Quiet time after each side's syncfs, for the device to finish writeback and discards.
const SETTLE: Duration = Duration::from_millis(200);
/// ramfs has no constant in `libc`.
#[cfg(target_os = "linux")]
/// The goal of the uring side: its IOPS over fio's.
const URING_GOAL_RATIO: f64 = 0.8;
/// The goal of the aggregate side: its IOPS over fio's on one file.
const AGGREGATE_GOAL_RATIO: f64 = 0.45;
/// The aggregate's dirty-bitmap region (DESIGN §6.4's default).
const REGION_BYTES: u64 = 64 << 10;
/// Percent of the regions the incremental resync case dirties.
const RESYNC_DIRTY_PERCENT: u64 = 5;
/// Writes that fill an aggregate (and dirty its regions): this size, this many in flight.
const FILL_CHUNK_BYTES: u64 = 1 << 20;
const FILL_DEPTH: u32 = 8;
/// Ring entries of the resync case's devices (a resync batch copies its runs concurrently).
const RESYNC_ENTRIES: u32 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "plex-bench",
    about = "The io_uring BlockDevice and a mirrored aggregate against fio --ioengine=io_uring on one file; \
             incremental against full resync"
)]
struct Args {
    /// Directory for the benchmark files (must be on a disk file system, not tmpfs).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// Measured seconds per side and case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Size of the benchmark file in MiB, and of the aggregate's data (at least).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds per case; odd rounds run the sides in reverse order, so that neither side always
    /// runs first (the disk is shared and virtual: its speed drifts).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seed of the random offsets and of the resync case's dirty regions (a random one, printed,
    /// if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Cases to run, comma-separated (`resync` runs after the workload cases, whatever the order).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = CaseName::ALL)]
    cases: Vec<CaseName>,
    /// Sides of the workload cases, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Side::Uring, Side::Aggregate, Side::Fio])]
    sides: Vec<Side>,
    /// O_DIRECT: `auto` uses it where the file system allows; fio follows the device.
    #[arg(long, value_enum, default_value_t = Direct::Auto)]
    direct: Direct,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    fio: PathBuf,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Direct {
    /// O_DIRECT if the file system accepts it.
    Auto,
    /// O_DIRECT or fail.
    Always,
    /// Buffered, through the page cache.
    Never,
}

impl Direct {
    fn for_device(self) -> DirectIo {
        match self {
            Direct::Auto => DirectIo::Auto,
            Direct::Always => DirectIo::Always,
            Direct::Never => DirectIo::Never,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum CaseName {
    /// 4 KiB random writes, one in flight (latency).
    RandwriteQd1,
    /// 4 KiB random writes, 32 in flight (IOPS).
    RandwriteQd32,
    /// 1 MiB sequential writes, 8 in flight (bandwidth).
    SeqwriteQd8,
    /// 4 KiB random reads, 32 in flight (IOPS).
    RandreadQd32,
    /// Incremental (5% of the regions) against full resync of an aggregate (time).
    Resync,
}

impl CaseName {
    /// The default list: the workloads, then the resync case.
    const ALL: [CaseName; 5] = [
        CaseName::RandwriteQd1,
        CaseName::RandwriteQd32,
        CaseName::SeqwriteQd8,
        CaseName::RandreadQd32,
        CaseName::Resync,
    ];

    /// The workload, or `None` for the resync case.
    fn case(self) -> Option<Case> {
        let (name, op, pattern, block_bytes, iodepth) = match self {
            CaseName::RandwriteQd1 => ("4k randwrite qd1", Op::Write, Pattern::Random, 4 << 10, 1),
            CaseName::RandwriteQd32 => ("4k randwrite qd32", Op::Write, Pattern::Random, 4 << 10, 32),
            CaseName::SeqwriteQd8 => ("1m seqwrite qd8", Op::Write, Pattern::Sequential, 1 << 20, 8),
            CaseName::RandreadQd32 => ("4k randread qd32", Op::Read, Pattern::Random, 4 << 10, 32),
            CaseName::Resync => return None,
        };
        Some(Case { name, op, pattern, block_bytes, iodepth })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pattern {
    Random,
    Sequential,
}

/// One workload, the same for every side.
#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    op: Op,
    pattern: Pattern,
    block_bytes: u64,
    iodepth: u32,
}

impl Case {
    /// fio's `--rw`.
    fn fio_rw(&self) -> &'static str {
        match (self.op, self.pattern) {
            (Op::Write, Pattern::Random) => "randwrite",
            (Op::Write, Pattern::Sequential) => "write",
            (Op::Read, Pattern::Random) => "randread",
            (Op::Read, Pattern::Sequential) => "read",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Side {
    /// The product's device: `plex::uring::UringDevice`.
    Uring,
    /// The product's mirrored aggregate over two `UringDevice`s.
    Aggregate,
    /// `fio --ioengine=io_uring` on one file.
    Fio,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Uring => "uring",
            Side::Aggregate => "aggregate",
            Side::Fio => "fio",
        }
    }

    fn is_product(self) -> bool {
        self != Side::Fio
    }

    /// The side's IOPS over fio's that the goal asks for.
    fn goal_ratio(self) -> f64 {
        match self {
            Side::Aggregate => AGGREGATE_GOAL_RATIO,
            Side::Uring | Side::Fio => URING_GOAL_RATIO,
        }
    }
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    dir: PathBuf,
    duration: Duration,
    size_bytes: u64,
    rounds: usize,
    seed: u64,
    cases: Vec<CaseName>,
    sides: Vec<Side>,
    direct: Direct,
    fio: PathBuf,
    json: bool,
}

impl Config {
    fn from_args(args: Args) -> Result<Config> {
        ensure!(
            args.seconds.is_finite() && args.seconds >= 0.1 && args.seconds <= 3600.0,
            "--seconds must be in [0.1, 3600], got {}",
            args.seconds
        );
        ensure!(
            (16..=1 << 20).contains(&args.size_mib),
            "--size-mib must be in 16..=1048576, got {}",
            args.size_mib
        );
        ensure!((1..=100).contains(&args.rounds), "--rounds must be in 1..=100, got {}", args.rounds);
        ensure!(!args.cases.is_empty(), "--cases needs at least one case");
        ensure!(!args.sides.is_empty(), "--sides needs at least one side");
        let mut sides = args.sides;
        sides.dedup();
        let mut cases = args.cases;
        cases.dedup();
        Ok(Config {
            dir: args.dir,
            duration: Duration::from_secs_f64(args.seconds),
            size_bytes: args.size_mib << 20,
            rounds: args.rounds,
            seed: args.seed.unwrap_or_else(rand::random),
            cases,
            sides,
            direct: args.direct,
            fio: args.fio,
            json: args.json,
        })
    }

    /// The workload cases asked for, in order.
    fn workloads(&self) -> Vec<Case> {
        self.cases.iter().filter_map(|name| name.case()).collect()
    }

    /// A file name in `--dir` that no other run uses.
    fn path(&self, what: &str) -> PathBuf {
        self.dir.join(format!("plex-bench-{}-{what}.bin", std::process::id()))
    }
}

/// A benchmark file.
#[derive(Debug)]
struct BenchFile {
    path: PathBuf,
    size_bytes: u64,
    /// Whether the product device got O_DIRECT on it; fio runs with the same `direct`.
    direct: bool,
}

/// What one side of one case measured.
#[derive(Debug, Clone)]
struct Measurement {
    case: Case,
    side: Side,
    round: usize,
    /// Completed requests per second.
    iops: f64,
    /// CPU time (user + system) per request, in microseconds: of the whole benchmark process
    /// (tokio thread and ring threads) for the product, of fio's job for fio.
    cpu_us_per_io: f64,
    /// The product's end-to-end latency, or fio's completion latency (clat).
    p50_ns: u64,
    p99_ns: u64,
    /// fio only: total latency (slat + clat), comparable with the product's.
    lat_p50_ns: Option<u64>,
    lat_p99_ns: Option<u64>,
}

impl Measurement {
    fn iops(&self) -> f64 {
        self.iops
    }

    fn mib_per_sec(&self) -> f64 {
        self.iops() * self.case.block_bytes as f64 / f64::from(1u32 << 20)
    }
}

/// Deletes a benchmark file when the run ends, whichever way it ends.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // Best effort: the file may not have been created if the run failed early.
        let _ = fs::remove_file(&self.0);
    }
}

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse())?;
    run(&config)
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let fs_name = check_disk_file_system(&config.dir, "the disk would not be measured")?;
    let workloads = config.workloads();
    if config.sides.contains(&Side::Fio) && !workloads.is_empty() {
        let version = Command::new(&config.fio)
            .arg("--version")
            .output()
            .with_context(|| format!("run {} --version (apt-get install fio)", config.fio.display()))?;
        println!("fio: {}", String::from_utf8_lossy(&version.stdout).trim());
    }
    match fs::read_to_string("/proc/loadavg") {
        Ok(loadavg) => println!(
            "load average at start: {} (1, 5, 15 min); the numbers are comparable only on an idle machine",
            loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
        Err(_) => println!("load average unknown; the numbers are comparable only on an idle machine"),
    }
    let (results, direct) =
        if workloads.is_empty() { (Vec::new(), None) } else { run_workloads(config, &fs_name, &workloads)? };
    let resync = if config.cases.contains(&CaseName::Resync) {
        let report = run_resync(config, &fs_name, &results)?;
        println!();
        print!("{}", resync_table(&report));
        Some(report)
    } else {
        None
    };
    if config.json {
        println!();
        println!("{}", to_json(config, &fs_name, direct, &results, resync.as_ref()));
    }
    Ok(())
}

/// Runs every workload case on every side; returns the measurements and whether the files got
/// O_DIRECT.
fn run_workloads(
    config: &Config,
    fs_name: &str,
    workloads: &[Case],
) -> Result<(Vec<Measurement>, Option<bool>)> {
    let path = config.path("file");
    let _ = fs::remove_file(&path);
    let _cleanup = RemoveOnDrop(path.clone());
    let started = Instant::now();
    prepare_file(&path, config.size_bytes)?;
    let direct = UringDevice::open_with(&path, device_options(config, 2))
        .with_context(|| format!("open {} with io_uring", path.display()))?
        .direct();
    let file = BenchFile { path, size_bytes: config.size_bytes, direct };
    println!(
        "plex-bench: dir {} ({fs_name}), {} MiB file written in full in {:.1} s, {}, {:.1} s per side and \
         case, seed {}",
        config.dir.display(),
        config.size_bytes >> 20,
        started.elapsed().as_secs_f64(),
        if direct { "O_DIRECT" } else { "buffered (the file system refuses O_DIRECT)" },
        config.duration.as_secs_f64(),
        config.seed,
    );
    let mirror = if config.sides.contains(&Side::Aggregate) {
        Some(MirrorFiles::create(config, direct).context("prepare the aggregate side")?)
    } else {
        None
    };
    let mut files = vec![&file];
    if let Some(mirror) = &mirror {
        files.extend(mirror.plexes.iter());
    }
    let mut results = Vec::new();
    settle(config, &files)?;
    for case in workloads {
        for round in 0..config.rounds {
            let mut sides = config.sides.clone();
            if round % 2 == 1 {
                sides.reverse();
            }
            for side in sides {
                let mut measurement = match side {
                    Side::Uring => bench_uring(config, case, &file),
                    Side::Aggregate => match &mirror {
                        Some(mirror) => bench_aggregate(config, case, mirror),
                        None => Err(anyhow!("the aggregate side has no files")),
                    },
                    Side::Fio => bench_fio(config, case, &file),
                }
                .with_context(|| format!("run {} on {} (round {round})", case.name, side.name()))?;
                measurement.round = round;
                settle(config, &files)?;
                println!(
                    "  {:<18} round {round} {:<9} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>8.1} us  p99 {:>8.1} us  \
                     CPU {:>5.1} us/IO",
                    case.name,
                    side.name(),
                    measurement.iops(),
                    measurement.mib_per_sec(),
                    micros(measurement.p50_ns),
                    micros(measurement.p99_ns),
                    measurement.cpu_us_per_io,
                );
                results.push(measurement);
            }
        }
    }
    println!();
    print!("{}", results_table(&results));
    println!();
    print!("{}", goals(config, workloads, &results));
    Ok((results, Some(direct)))
}

fn device_options(config: &Config, entries: u32) -> UringOptions {
    UringOptions { entries: entries.max(2), direct: config.direct.for_device() }
}

fn current_thread_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("build tokio")
}

/// Creates the file and writes all of it once (pseudo-random bytes, 1 MiB at a time), then syncs
/// it and its directory, so that no case pays for block allocation.
fn prepare_file(path: &Path, size_bytes: u64) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(0x706c_6578).fill_bytes(&mut chunk);
    let mut written = 0u64;
    while written < size_bytes {
        let len = usize::try_from((size_bytes - written).min(chunk.len() as u64)).context("chunk length")?;
        file.write_all(&chunk[..len]).with_context(|| format!("write {}", path.display()))?;
        written += len as u64;
    }
    file.sync_all().with_context(|| format!("sync {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        File::open(dir).and_then(|dir| dir.sync_all()).with_context(|| format!("sync {}", dir.display()))?;
    }
    Ok(())
}

/// The product side: a `UringDevice` on the file, driven by `drive`.
fn bench_uring(config: &Config, case: &Case, file: &BenchFile) -> Result<Measurement> {
    let device = UringDevice::open_with(&file.path, device_options(config, case.iodepth))
        .with_context(|| format!("open {}", file.path.display()))?;
    ensure!(device.direct() == file.direct, "the device's O_DIRECT changed between opens");
    let runtime = current_thread_runtime()?;
    let cpu_before = process_cpu()?;
    let target = DeviceTarget(&device);
    let (latencies, elapsed) = runtime.block_on(drive(&target, case, config.duration, config.seed))?;
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    Ok(product_measurement(case, Side::Uring, &latencies, elapsed, cpu))
}

/// Bytes of a plex file whose data area holds at least `data_bytes`: the layout takes two label
/// blocks, a bitmap and one checksum block per 1,024 data blocks; 1/512 plus 1 MiB covers that
/// with room to spare.
fn plex_file_bytes(data_bytes: u64) -> u64 {
    (data_bytes + data_bytes / 512 + (1 << 20)).next_multiple_of(BLOCK_BYTES)
}

/// The identity of every aggregate the benchmark creates.
fn aggregate_spec() -> AggregateSpec {
    AggregateSpec {
        cluster: Uuid(*b"plex-bench-clust"),
        aggregate: Uuid(*b"plex-bench-aggr0"),
        owner: NodeId(1),
        sites: [Site::A, Site::B],
        region_bytes: u32::try_from(REGION_BYTES).expect("64 KiB fits u32"),
        epoch: Epoch { number: 1, owner: NodeId(1) },
    }
}

/// Opens each of `paths` as a `UringDevice` with `entries` ring entries; every one must get
/// O_DIRECT exactly when `direct`.
fn open_devices(
    config: &Config,
    paths: &[&Path],
    entries: u32,
    direct: bool,
) -> Result<Vec<Arc<dyn BlockDevice>>> {
    let mut devices: Vec<Arc<dyn BlockDevice>> = Vec::with_capacity(paths.len());
    for path in paths {
        let device = UringDevice::open_with(path, device_options(config, entries))
            .with_context(|| format!("open {} with io_uring", path.display()))?;
        ensure!(device.direct() == direct, "{}: O_DIRECT differs from the other files", path.display());
        devices.push(Arc::new(device));
    }
    Ok(devices)
}

/// One plex per device.
fn plexes_of(devices: Vec<Arc<dyn BlockDevice>>) -> Result<[Vec<Arc<dyn BlockDevice>>; 2]> {
    let [a, b]: [Arc<dyn BlockDevice>; 2] =
        devices.try_into().map_err(|_| anyhow!("an aggregate has exactly two plexes"))?;
    Ok([vec![a], vec![b]])
}

/// The aggregate side's two files, labelled as one aggregate whose data area is written in full.
#[derive(Debug)]
struct MirrorFiles {
    plexes: [BenchFile; 2],
    _cleanup: [RemoveOnDrop; 2],
}

impl MirrorFiles {
    /// Prepares both files as the uring side's file is prepared, creates the aggregate on them
    /// and writes its whole data area through `Aggregate::write`.
    fn create(config: &Config, direct: bool) -> Result<MirrorFiles> {
        let file_bytes = plex_file_bytes(config.size_bytes);
        let paths = [config.path("plex0"), config.path("plex1")];
        for path in &paths {
            let _ = fs::remove_file(path);
        }
        let cleanup = paths.clone().map(RemoveOnDrop);
        let started = Instant::now();
        for path in &paths {
            prepare_file(path, file_bytes)?;
        }
        let prepared = started.elapsed();
        let runtime = current_thread_runtime()?;
        let (data_bytes, fill) = runtime.block_on(async {
            let devices = open_devices(config, &[&paths[0], &paths[1]], 2 * FILL_DEPTH, direct)?;
            let aggregate = Aggregate::create(
                &aggregate_spec(),
                plexes_of(devices)?,
                AggregateOptions::default(),
                Arc::new(RecordingHook::default()),
            )
            .await
            .context("create the aggregate")?;
            ensure!(
                aggregate.size_bytes() >= config.size_bytes,
                "the aggregate holds {} bytes, less than the {} the cases use",
                aggregate.size_bytes(),
                config.size_bytes
            );
            let fill = fill_aggregate(&aggregate, aggregate.size_bytes()).await?;
            aggregate.flush().await.context("flush the aggregate")?;
            Ok::<_, anyhow::Error>((aggregate.size_bytes(), fill))
        })?;
        println!(
            "aggregate: two files of {} bytes written in full in {:.1} s; data area of {} bytes (regions of \
             {} KiB) written through Aggregate::write ({} KiB, {} in flight) in {:.1} s: {:.0} MiB/s of data, \
             each byte to both files",
            file_bytes,
            prepared.as_secs_f64(),
            data_bytes,
            REGION_BYTES >> 10,
            FILL_CHUNK_BYTES >> 10,
            FILL_DEPTH,
            fill.as_secs_f64(),
            data_bytes as f64 / f64::from(1u32 << 20) / fill.as_secs_f64(),
        );
        let [path0, path1] = paths;
        Ok(MirrorFiles {
            plexes: [
                BenchFile { path: path0, size_bytes: file_bytes, direct },
                BenchFile { path: path1, size_bytes: file_bytes, direct },
            ],
            _cleanup: cleanup,
        })
    }
}

/// The aggregate side: the aggregate opened on its two files (new devices, so a cold checksum
/// cache, as after a restart), driven by `drive` over the first `--size-mib` of its data.
fn bench_aggregate(config: &Config, case: &Case, mirror: &MirrorFiles) -> Result<Measurement> {
    let runtime = current_thread_runtime()?;
    runtime.block_on(async {
        let paths = [mirror.plexes[0].path.as_path(), mirror.plexes[1].path.as_path()];
        let devices = open_devices(config, &paths, 2 * case.iodepth, mirror.plexes[0].direct)?;
        let aggregate = Aggregate::open(
            plexes_of(devices)?,
            AggregateOptions::default(),
            Arc::new(RecordingHook::default()),
        )
        .await
        .context("open the aggregate")?;
        let status = aggregate.status().await;
        ensure!(status.state == AggregateState::MirroredNormal, "the aggregate opened {}", status.state);
        let target = AggregateTarget { aggregate: &aggregate, span_bytes: config.size_bytes };
        let cpu_before = process_cpu()?;
        let (latencies, elapsed) = drive(&target, case, config.duration, config.seed).await?;
        let cpu = process_cpu()?.saturating_sub(cpu_before);
        Ok(product_measurement(case, Side::Aggregate, &latencies, elapsed, cpu))
    })
}

/// User + system CPU time of this process so far (all threads, the ring threads included).
fn process_cpu() -> Result<Duration> {
    // SAFETY: an all-zero `rusage` is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` for the duration of the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    ensure!(rc == 0, "getrusage: {}", std::io::Error::last_os_error());
    let time = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(time(usage.ru_utime) + time(usage.ru_stime))
}

/// A product side's measurement from its sorted latencies, wall time and CPU time.
fn product_measurement(
    case: &Case,
    side: Side,
    latencies: &[u64],
    elapsed: Duration,
    cpu: Duration,
) -> Measurement {
    Measurement {
        case: *case,
        side,
        round: 0,
        iops: latencies.len() as f64 / elapsed.as_secs_f64(),
        cpu_us_per_io: cpu.as_secs_f64() * 1e6 / latencies.len().max(1) as f64,
        p50_ns: percentile(latencies, 500),
        p99_ns: percentile(latencies, 990),
        lat_p50_ns: None,
        lat_p99_ns: None,
    }
}

/// What a product side drives: a `BlockDevice`, or an aggregate through its own `write` and
/// `read`. A read may answer with a new buffer of the same length instead of the one it got.
trait Target: Sync {
    /// Bytes from the start that offsets are drawn from.
    fn span_bytes(&self) -> u64;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)>;

    /// Writes `buf` at `offset` and gives it back.
    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)>;
}

/// A block device, all of it.
struct DeviceTarget<'a, D: ?Sized>(&'a D);

impl<D: BlockDevice + ?Sized> Target for DeviceTarget<'_, D> {
    fn span_bytes(&self) -> u64 {
        self.0.size_bytes()
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)> {
        Box::pin(async move {
            let (result, buf) = self.0.read(offset, buf).await;
            (result.map_err(anyhow::Error::from), buf)
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)> {
        Box::pin(async move {
            let (result, buf) = self.0.write(offset, buf).await;
            (result.map_err(anyhow::Error::from), buf)
        })
    }
}

/// The first `span_bytes` of a mirrored aggregate's data.
struct AggregateTarget<'a> {
    aggregate: &'a Aggregate,
    span_bytes: u64,
}

impl Target for AggregateTarget<'_> {
    fn span_bytes(&self) -> u64 {
        self.span_bytes.min(self.aggregate.size_bytes())
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)> {
        Box::pin(async move {
            match self.aggregate.read(offset, buf.len() as u64).await {
                Ok(data) => (Ok(()), data),
                Err(e) => (Err(e.into()), buf),
            }
        })
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<()>, AlignedBuf)> {
        Box::pin(async move {
            let result = self.aggregate.write(offset, &buf).await;
            (result.map_err(anyhow::Error::from), buf)
        })
    }
}

/// Keeps exactly `case.iodepth` requests in flight against `target` for `duration`: one lane per
/// request slot, each issuing its next request when the last one completes. Returns the sorted
/// latencies of all requests and the wall time from the first submission to the last completion.
async fn drive<T: Target + ?Sized>(
    target: &T,
    case: &Case,
    duration: Duration,
    seed: u64,
) -> Result<(Vec<u64>, Duration)> {
    let span = target.span_bytes();
    ensure!(
        case.block_bytes.is_multiple_of(BLOCK_BYTES) && case.block_bytes <= span,
        "a block of {} bytes does not fit a span of {span} bytes",
        case.block_bytes
    );
    let blocks = span / case.block_bytes;
    let block_len = usize::try_from(case.block_bytes).context("block size")?;
    let next_sequential = AtomicU64::new(0);
    let start = Instant::now();
    let deadline = start + duration;
    let lanes: Vec<IoFuture<'_, Result<Vec<u64>>>> = (0..u64::from(case.iodepth))
        .map(|lane| {
            let next_sequential = &next_sequential;
            let lane_future: IoFuture<'_, Result<Vec<u64>>> = Box::pin(async move {
                let mut rng = StdRng::seed_from_u64(seed ^ lane.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let mut buf = AlignedBuf::zeroed(block_len);
                rng.fill_bytes(buf.as_mut_slice());
                let mut latencies = Vec::with_capacity(1 << 16);
                // Every lane issues at least one request, however late it starts (a lane's set-up
                // is slow in debug builds; the unit test counts one request per lane).
                loop {
                    let block = match case.pattern {
                        Pattern::Random => rng.random_range(0..blocks),
                        Pattern::Sequential => next_sequential.fetch_add(1, Ordering::Relaxed) % blocks,
                    };
                    let offset = block * case.block_bytes;
                    let issued = Instant::now();
                    let (result, back) = match case.op {
                        Op::Read => target.read(offset, buf).await,
                        Op::Write => target.write(offset, buf).await,
                    };
                    latencies.push(nanos(issued.elapsed()));
                    result.with_context(|| format!("{:?} at {offset}", case.op))?;
                    buf = back;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                Ok(latencies)
            });
            lane_future
        })
        .collect();
    let outputs = plex::testing::join_all(lanes).await;
    let elapsed = start.elapsed();
    let mut latencies = Vec::new();
    for output in outputs {
        latencies.append(&mut output?);
    }
    latencies.sort_unstable();
    Ok((latencies, elapsed))
}

/// Writes the first `bytes` of `aggregate` once, sequentially (`FILL_CHUNK_BYTES` per write,
/// `FILL_DEPTH` in flight), so that every block carries its CRC; returns the wall time.
async fn fill_aggregate(aggregate: &Aggregate, bytes: u64) -> Result<Duration> {
    let chunk_len = usize::try_from(FILL_CHUNK_BYTES).context("chunk size")?;
    let next = AtomicU64::new(0);
    let start = Instant::now();
    let lanes: Vec<IoFuture<'_, Result<()>>> = (0..u64::from(FILL_DEPTH))
        .map(|lane| {
            let next = &next;
            let lane_future: IoFuture<'_, Result<()>> = Box::pin(async move {
                let mut chunk = AlignedBuf::zeroed(chunk_len);
                StdRng::seed_from_u64(0x6669_6c6c ^ lane).fill_bytes(chunk.as_mut_slice());
                loop {
                    let offset = next.fetch_add(FILL_CHUNK_BYTES, Ordering::Relaxed);
                    if offset >= bytes {
                        return Ok(());
                    }
                    let len =
                        usize::try_from((bytes - offset).min(FILL_CHUNK_BYTES)).context("chunk length")?;
                    let written = if len == chunk_len {
                        aggregate.write(offset, &chunk).await
                    } else {
                        aggregate.write(offset, &AlignedBuf::from_slice(&chunk.as_slice()[..len])).await
                    };
                    written.with_context(|| format!("fill the aggregate at {offset}"))?;
                }
            });
            lane_future
        })
        .collect();
    for lane in plex::testing::join_all(lanes).await {
        lane?;
    }
    Ok(start.elapsed())
}

/// fio's side: `fio --ioengine=io_uring` with the case's parameters on the same file.
fn bench_fio(config: &Config, case: &Case, file: &BenchFile) -> Result<Measurement> {
    let args = fio_args(config, case, file);
    let output = Command::new(&config.fio)
        .args(&args)
        .output()
        .with_context(|| format!("run {}", config.fio.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "fio {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        stdout
    );
    parse_fio(case, &stdout).with_context(|| format!("parse the output of fio {}", args.join(" ")))
}

fn fio_args(config: &Config, case: &Case, file: &BenchFile) -> Vec<String> {
    vec![
        "--name=plex-bench".into(),
        format!("--filename={}", file.path.display()),
        "--ioengine=io_uring".into(),
        format!("--direct={}", u8::from(file.direct)),
        format!("--rw={}", case.fio_rw()),
        format!("--bs={}", case.block_bytes),
        format!("--iodepth={}", case.iodepth),
        "--numjobs=1".into(),
        format!("--size={}", file.size_bytes),
        "--time_based".into(),
        format!("--runtime={}ms", config.duration.as_millis().max(1)),
        // Uniform offsets with repeats, as the product side draws them, from a seeded generator.
        "--norandommap".into(),
        format!("--randseed={}", config.seed),
        // The file exists and is written in full: fio must not lay it out again.
        "--allow_file_create=0".into(),
        "--lat_percentiles=1".into(),
        "--output-format=json".into(),
    ]
}

/// Reads IOPS and latency percentiles from fio's JSON (which may follow warnings on stdout).
fn parse_fio(case: &Case, stdout: &str) -> Result<Measurement> {
    let json_start = stdout.find("\n{").map(|i| i + 1).or_else(|| stdout.starts_with('{').then_some(0));
    let json = &stdout[json_start.ok_or_else(|| anyhow!("no JSON object in fio's output: {stdout}"))?..];
    let value: serde_json::Value = serde_json::from_str(json).context("fio's JSON")?;
    let job =
        value.get("jobs").and_then(|jobs| jobs.get(0)).ok_or_else(|| anyhow!("no job in fio's JSON"))?;
    let error = job.get("error").and_then(serde_json::Value::as_i64).unwrap_or(0);
    ensure!(error == 0, "fio's job failed with error {error}");
    let direction = job
        .get(match case.op {
            Op::Read => "read",
            Op::Write => "write",
        })
        .ok_or_else(|| anyhow!("no {:?} section in fio's job", case.op))?;
    let number = |key: &str| {
        direction.get(key).and_then(serde_json::Value::as_f64).ok_or_else(|| anyhow!("no {key} in fio's job"))
    };
    let iops = number("iops")?;
    let runtime_ms = number("runtime")?;
    ensure!(runtime_ms > 0.0, "fio ran for {runtime_ms} ms");
    let total_ios = number("total_ios")?;
    let job_number = |key: &str| {
        job.get(key).and_then(serde_json::Value::as_f64).ok_or_else(|| anyhow!("no {key} in fio's job"))
    };
    // usr_cpu and sys_cpu are percentages of the job's run time.
    let cpu_us = (job_number("usr_cpu")? + job_number("sys_cpu")?) / 100.0 * runtime_ms * 1000.0;
    let percentile = |section: &str, key: &str| {
        direction
            .get(section)
            .and_then(|s| s.get("percentile"))
            .and_then(|p| p.get(key))
            .and_then(serde_json::Value::as_u64)
    };
    Ok(Measurement {
        case: *case,
        side: Side::Fio,
        round: 0,
        iops,
        cpu_us_per_io: cpu_us / total_ios.max(1.0),
        p50_ns: percentile("clat_ns", "50.000000").ok_or_else(|| anyhow!("no clat p50 in fio's JSON"))?,
        p99_ns: percentile("clat_ns", "99.000000").ok_or_else(|| anyhow!("no clat p99 in fio's JSON"))?,
        lat_p50_ns: percentile("lat_ns", "50.000000"),
        lat_p99_ns: percentile("lat_ns", "99.000000"),
    })
}

/// A device in front of another whose writes and flushes can be made to fail with EIO (plex 1 of
/// the resync case). A failing write or flush never reaches the inner device, so the inner device
/// does not latch (S10) and needs no reopening when the switch is turned off: off again, it stands
/// for the disk reopened after its failure. Reads always pass through.
#[derive(Debug)]
struct FailSwitch {
    inner: Arc<dyn BlockDevice>,
    failing: AtomicBool,
}

impl FailSwitch {
    fn new(inner: Arc<dyn BlockDevice>) -> FailSwitch {
        FailSwitch { inner, failing: AtomicBool::new(false) }
    }

    fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Release);
    }

    fn eio(&self, op: &'static str, offset: u64) -> Option<DeviceError> {
        self.failing.load(Ordering::Acquire).then(|| DeviceError::Io {
            op,
            offset,
            source: std::io::Error::from_raw_os_error(libc::EIO),
        })
    }
}

impl BlockDevice for FailSwitch {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (Result<(), DeviceError>, AlignedBuf)> {
        match self.eio("write", offset) {
            Some(error) => Box::pin(std::future::ready((Err(error), buf))),
            None => self.inner.write(offset, buf),
        }
    }

    fn flush(&self) -> IoFuture<'_, Result<(), DeviceError>> {
        match self.eio("flush", 0) {
            Some(error) => Box::pin(std::future::ready(Err(error))),
            None => self.inner.flush(),
        }
    }
}

/// One timed resync.
#[derive(Debug, Clone, Copy)]
struct ResyncRun {
    level: ResyncLevel,
    /// Bytes copied to the target, by the aggregate's own count.
    copied_bytes: u64,
    /// `Aggregate::resync` from the call to its return: the start (resync set in the source's
    /// bitmap, target label `resyncing`; for a full resync also the format of the new plex), the
    /// copy and the completion (flush, both labels).
    elapsed: Duration,
    /// The copy alone, as `ResyncProgress::elapsed` counts it.
    copy_elapsed: Duration,
    /// CPU time (user + system) of the whole process during the call: tells a CPU-bound copy from
    /// one that waits on the disk.
    cpu: Duration,
}

impl ResyncRun {
    fn mib_per_sec(&self) -> f64 {
        self.copied_bytes as f64 / f64::from(1u32 << 20) / self.elapsed.as_secs_f64()
    }

    fn level_name(&self) -> &'static str {
        match self.level {
            ResyncLevel::Incremental => "incremental",
            ResyncLevel::Full => "full",
        }
    }
}

/// What the resync case measured.
#[derive(Debug, Clone)]
struct ResyncReport {
    file_bytes: u64,
    direct: bool,
    /// The aggregate's data area.
    data_bytes: u64,
    /// Writing the whole data area once, both plexes normal.
    fill: Duration,
    /// Regions in the first `--size-mib`, and how many were written while plex 1 was out.
    regions: u64,
    dirty_regions: u64,
    /// Writing the dirty regions with plex 1 failed (each write marks plex 0's bitmap durably).
    degraded: Duration,
    incremental: ResyncRun,
    full: ResyncRun,
    /// fio's 1 MiB sequential write QD8 on one file in this run (mean over the rounds), if run.
    fio_seq_mib_per_sec: Option<f64>,
}

/// The resync case on three files in `--dir`: plex 0, plex 1 and the blank replacement of
/// plex 1, each prepared like the workload file.
fn run_resync(config: &Config, fs_name: &str, results: &[Measurement]) -> Result<ResyncReport> {
    let file_bytes = plex_file_bytes(config.size_bytes);
    let paths = [config.path("resync-plex0"), config.path("resync-plex1"), config.path("resync-blank")];
    for path in &paths {
        let _ = fs::remove_file(path);
    }
    let _cleanup = paths.clone().map(RemoveOnDrop);
    let started = Instant::now();
    for path in &paths {
        prepare_file(path, file_bytes)?;
    }
    let direct = UringDevice::open_with(&paths[0], device_options(config, 2))
        .with_context(|| format!("open {} with io_uring", paths[0].display()))?
        .direct();
    println!(
        "resync: dir {} ({fs_name}), three files of {file_bytes} bytes written in full in {:.1} s, {}, \
         regions of {} KiB, default options, seed {}",
        config.dir.display(),
        started.elapsed().as_secs_f64(),
        if direct { "O_DIRECT" } else { "buffered (the file system refuses O_DIRECT)" },
        REGION_BYTES >> 10,
        config.seed,
    );
    let files: Vec<BenchFile> =
        paths.iter().map(|path| BenchFile { path: path.clone(), size_bytes: file_bytes, direct }).collect();
    let file_refs: Vec<&BenchFile> = files.iter().collect();
    let settle_files = || settle(config, &file_refs);
    settle_files()?;
    let runtime = current_thread_runtime()?;
    let outcome = runtime.block_on(async {
        let path_refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let [plex0, plex1, blank]: [Arc<dyn BlockDevice>; 3] =
            open_devices(config, &path_refs, RESYNC_ENTRIES, direct)?
                .try_into()
                .map_err(|_| anyhow!("three devices"))?;
        measure_resync(plex0, plex1, blank, config.size_bytes, config.seed, &settle_files).await
    })?;
    let seqwrite = CaseName::SeqwriteQd8.case().expect("a workload");
    Ok(ResyncReport {
        file_bytes,
        direct,
        data_bytes: outcome.data_bytes,
        fill: outcome.fill,
        regions: outcome.regions,
        dirty_regions: outcome.dirty_regions,
        degraded: outcome.degraded,
        incremental: outcome.incremental,
        full: outcome.full,
        fio_seq_mib_per_sec: summary(results, &seqwrite, Side::Fio)
            .map(|fio| fio.iops * seqwrite.block_bytes as f64 / f64::from(1u32 << 20)),
    })
}

/// What `measure_resync` found, before the report adds the files and fio.
#[derive(Debug)]
struct ResyncOutcome {
    data_bytes: u64,
    fill: Duration,
    regions: u64,
    dirty_regions: u64,
    degraded: Duration,
    incremental: ResyncRun,
    full: ResyncRun,
}

/// Creates an aggregate of `plex0` and `plex1` (behind a `FailSwitch`) and writes its data area
/// once; fails plex 1 and writes `RESYNC_DIRTY_PERCENT` of the regions of the first `span_bytes`
/// (distinct, drawn from `seed`), one `REGION_BYTES` write each; reattaches plex 1 and times the
/// incremental resync. Then opens `plex0` with `blank` as plex 1 and times the full resync.
/// `settle` runs before each timed resync. Bails unless each resync ends `mirrored,normal` having
/// copied exactly what it had to.
async fn measure_resync(
    plex0: Arc<dyn BlockDevice>,
    plex1: Arc<dyn BlockDevice>,
    blank: Arc<dyn BlockDevice>,
    span_bytes: u64,
    seed: u64,
    settle: &dyn Fn() -> Result<()>,
) -> Result<ResyncOutcome> {
    let switch = Arc::new(FailSwitch::new(plex1));
    let hook = Arc::new(RecordingHook::default());
    let aggregate = Aggregate::create(
        &aggregate_spec(),
        [vec![plex0.clone()], vec![switch.clone() as Arc<dyn BlockDevice>]],
        AggregateOptions::default(),
        hook.clone(),
    )
    .await
    .context("create the aggregate")?;
    let data_bytes = aggregate.size_bytes();
    ensure!(data_bytes >= span_bytes, "the aggregate holds {data_bytes} bytes, less than {span_bytes}");
    let fill = fill_aggregate(&aggregate, data_bytes).await?;
    aggregate.flush().await.context("flush the filled aggregate")?;

    // Plex 1 fails: its first write gets EIO and the aggregate drops it (reason Failed).
    switch.set_failing(true);
    let regions = span_bytes / REGION_BYTES;
    let dirty_regions = (regions * RESYNC_DIRTY_PERCENT).div_ceil(100);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_7379_6e63);
    let dirty: Vec<u64> = rand::seq::index::sample(
        &mut rng,
        usize::try_from(regions).context("region count")?,
        usize::try_from(dirty_regions).context("region count")?,
    )
    .into_iter()
    .map(|region| region as u64)
    .collect();
    let degraded = write_regions(&aggregate, &dirty, seed).await?;
    aggregate.flush().await.context("flush the degraded aggregate")?;
    let drops = hook.drops();
    ensure!(
        drops.len() == 1 && drops[0].plex == 1 && drops[0].reason == DropReason::Failed,
        "expected one drop of plex 1 for a failure, got {drops:?}"
    );
    let status = aggregate.status().await;
    ensure!(status.state == AggregateState::MirrorDegraded, "with plex 1 failed the aggregate is {status}");

    // Plex 1 comes back (see `FailSwitch`: no write reached its device, so it needs no reopening).
    switch.set_failing(false);
    let decision = aggregate.reattach(1).await.context("reattach plex 1")?;
    ensure!(
        decision.rule == GenerationRule::PeerMovedOn
            && decision.resync == Some((0, 1, ResyncLevel::Incremental)),
        "reattach decided {decision:?}"
    );
    settle()?;
    let incremental = timed_resync(&aggregate).await?;
    ensure!(
        incremental.level == ResyncLevel::Incremental
            && incremental.copied_bytes == dirty_regions * REGION_BYTES,
        "the incremental resync copied {} bytes ({:?}); {dirty_regions} regions of {REGION_BYTES} were dirty",
        incremental.copied_bytes,
        incremental.level
    );
    aggregate.flush().await.context("flush after the incremental resync")?;
    drop(aggregate);

    // Plex 1 is replaced by a blank disk: rule `no-valid-label`, a full resync.
    settle()?;
    let aggregate = Aggregate::open([vec![plex0], vec![blank]], AggregateOptions::default(), hook.clone())
        .await
        .context("open plex 0 with a blank plex 1")?;
    let status = aggregate.status().await;
    ensure!(status.state == AggregateState::MirrorDegraded, "plex 0 with a blank plex 1 opened as {status}");
    let full = timed_resync(&aggregate).await?;
    ensure!(
        full.level == ResyncLevel::Full && full.copied_bytes == aggregate.size_bytes(),
        "the full resync copied {} of {} bytes ({:?})",
        full.copied_bytes,
        aggregate.size_bytes(),
        full.level
    );
    aggregate.flush().await.context("flush after the full resync")?;
    Ok(ResyncOutcome { data_bytes, fill, regions, dirty_regions, degraded, incremental, full })
}

/// Writes each of `regions` once (`REGION_BYTES` of pseudo-random bytes, `FILL_DEPTH` in flight);
/// returns the wall time.
async fn write_regions(aggregate: &Aggregate, regions: &[u64], seed: u64) -> Result<Duration> {
    let region_len = usize::try_from(REGION_BYTES).context("region size")?;
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let lanes: Vec<IoFuture<'_, Result<()>>> = (0..u64::from(FILL_DEPTH))
        .map(|lane| {
            let next = &next;
            let lane_future: IoFuture<'_, Result<()>> = Box::pin(async move {
                let mut buf = AlignedBuf::zeroed(region_len);
                StdRng::seed_from_u64(seed ^ 0x6469_7274 ^ lane).fill_bytes(buf.as_mut_slice());
                while let Some(region) = regions.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let offset = region * REGION_BYTES;
                    aggregate.write(offset, &buf).await.with_context(|| format!("write region {region}"))?;
                }
                Ok(())
            });
            lane_future
        })
        .collect();
    for lane in plex::testing::join_all(lanes).await {
        lane?;
    }
    Ok(start.elapsed())
}

/// Times `Aggregate::resync` to completion; bails unless the aggregate is `mirrored,normal` after.
async fn timed_resync(aggregate: &Aggregate) -> Result<ResyncRun> {
    let cpu_before = process_cpu()?;
    let started = Instant::now();
    let progress = aggregate.resync().await.context("resync")?.ok_or_else(|| anyhow!("nothing to resync"))?;
    let elapsed = started.elapsed();
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    ensure!(progress.complete, "the resync returned incomplete: {progress}");
    let status = aggregate.status().await;
    ensure!(status.state == AggregateState::MirroredNormal, "after the resync the aggregate is {status}");
    Ok(ResyncRun {
        level: progress.level,
        copied_bytes: progress.copied_bytes,
        elapsed,
        copy_elapsed: progress.elapsed,
        cpu,
    })
}

fn resync_table(report: &ResyncReport) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1u32 << 20);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Resync of an aggregate of {} bytes ({:.0} MiB) over two files of {} bytes ({}):",
        report.data_bytes,
        mib(report.data_bytes),
        report.file_bytes,
        if report.direct { "O_DIRECT" } else { "buffered" },
    );
    let _ = writeln!(
        out,
        "  fill: the whole data area written once, both plexes normal, in {:.2} s ({:.0} MiB/s of data)",
        report.fill.as_secs_f64(),
        mib(report.data_bytes) / report.fill.as_secs_f64(),
    );
    let _ = writeln!(
        out,
        "  plex 1 failed (EIO, dropped as failed); {} of {} regions ({:.1}%) written once each in {:.2} s \
         ({:.0} writes/s, each marking plex 0's bitmap durably first)",
        report.dirty_regions,
        report.regions,
        report.dirty_regions as f64 * 100.0 / report.regions as f64,
        report.degraded.as_secs_f64(),
        report.dirty_regions as f64 / report.degraded.as_secs_f64(),
    );
    let _ = writeln!(out, "| resync      | copied MiB | resync() s | copy s |  MiB/s | CPU s |");
    let _ = writeln!(out, "|-------------|-----------:|-----------:|-------:|-------:|------:|");
    for run in [&report.incremental, &report.full] {
        let _ = writeln!(
            out,
            "| {:<11} | {:>10.1} | {:>10.3} | {:>6.3} | {:>6.0} | {:>5.2} |",
            run.level_name(),
            mib(run.copied_bytes),
            run.elapsed.as_secs_f64(),
            run.copy_elapsed.as_secs_f64(),
            run.mib_per_sec(),
            run.cpu.as_secs_f64(),
        );
    }
    let _ = writeln!(
        out,
        "(MiB/s: bytes copied over the whole resync() call; CPU s: user + system time of the process meanwhile.)"
    );
    let time_ratio = report.incremental.elapsed.as_secs_f64() / report.full.elapsed.as_secs_f64();
    let byte_ratio = report.incremental.copied_bytes as f64 / report.full.copied_bytes as f64;
    let _ = writeln!(
        out,
        "incremental / full: time {time_ratio:.3}x for {byte_ratio:.3}x of the bytes (expected: about the \
         byte ratio plus fixed costs)"
    );
    match report.fio_seq_mib_per_sec {
        Some(fio) => {
            let _ = writeln!(
                out,
                "full resync copy {:.0} MiB/s (each byte read from plex 0 and written to plex 1) beside fio's 1 MiB \
                 sequential write QD8 on one file in this run, {fio:.0} MiB/s: {:.2}x (informative)",
                report.full.mib_per_sec(),
                report.full.mib_per_sec() / fio,
            );
        }
        None => {
            let _ = writeln!(
                out,
                "fio's 1 MiB sequential write was not run in this run (add seqwrite-qd8 to --cases and fio to \
                 --sides to see the copy bandwidth beside it)"
            );
        }
    }
    out
}

/// Writes back what the last side left and lets the device go quiet; with buffered I/O, also
/// drops the files' pages from the page cache so every side starts cold, as fio's `invalidate=1`
/// does for its own.
fn settle(config: &Config, files: &[&BenchFile]) -> Result<()> {
    let handle = File::open(&config.dir).with_context(|| format!("open {}", config.dir.display()))?;
    // SAFETY: the descriptor belongs to `handle`, which is open for the whole call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", config.dir.display()));
    }
    for file in files.iter().filter(|file| !file.direct) {
        let data = File::open(&file.path).with_context(|| format!("open {}", file.path.display()))?;
        // SAFETY: the descriptor belongs to `data`, open for the whole call; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(data.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise DONTNEED on {}: error {rc}", file.path.display());
    }
    thread::sleep(SETTLE);
    Ok(())
}

fn optional_micros(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".to_string(), |ns| format!("{:.1}", micros(ns)))
}

fn results_table(results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| case              | round | side      |     IOPS |   MiB/s |   p50 us |   p99 us | fio lat p50 us | \
         fio lat p99 us | CPU us/IO |"
    );
    let _ = writeln!(
        out,
        "|-------------------|------:|-----------|---------:|--------:|---------:|---------:|---------------:|\
         ---------------:|----------:|"
    );
    for m in results {
        let _ = writeln!(
            out,
            "| {:<17} | {:>5} | {:<9} | {:>8.0} | {:>7.1} | {:>8.1} | {:>8.1} | {:>14} | {:>14} | {:>9.1} |",
            m.case.name,
            m.round,
            m.side.name(),
            m.iops(),
            m.mib_per_sec(),
            micros(m.p50_ns),
            micros(m.p99_ns),
            optional_micros(m.lat_p50_ns),
            optional_micros(m.lat_p99_ns),
            m.cpu_us_per_io,
        );
    }
    let _ = writeln!(out, "(p50/p99: the product's end-to-end latency per request; fio's clat.)");
    out
}

/// One side of one case over all rounds: means of IOPS, p50, p99 and CPU per request.
#[derive(Debug, Clone, Copy)]
struct Summary {
    iops: f64,
    p50_ns: f64,
    p99_ns: f64,
    cpu_us_per_io: f64,
}

fn summary(results: &[Measurement], case: &Case, side: Side) -> Option<Summary> {
    let rounds: Vec<&Measurement> =
        results.iter().filter(|m| m.case.name == case.name && m.side == side).collect();
    if rounds.is_empty() {
        return None;
    }
    let mean =
        |value: fn(&Measurement) -> f64| rounds.iter().map(|m| value(m)).sum::<f64>() / rounds.len() as f64;
    Some(Summary {
        iops: mean(|m| m.iops),
        p50_ns: mean(|m| m.p50_ns as f64),
        p99_ns: mean(|m| m.p99_ns as f64),
        cpu_us_per_io: mean(|m| m.cpu_us_per_io),
    })
}

/// Product IOPS over fio's, round by round (a round pairs the sides run back to back).
fn round_ratios(results: &[Measurement], case: &Case, side: Side) -> Vec<f64> {
    let find = |side: Side, round: usize| {
        results.iter().find(|m| m.case.name == case.name && m.side == side && m.round == round)
    };
    let rounds = results.iter().map(|m| m.round + 1).max().unwrap_or(0);
    (0..rounds).filter_map(|round| Some(find(side, round)?.iops() / find(Side::Fio, round)?.iops())).collect()
}

fn goals(config: &Config, workloads: &[Case], results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Goals (reported, not asserted): uring IOPS >= {URING_GOAL_RATIO:.2}x fio's on the same file, aggregate \
         IOPS >= {AGGREGATE_GOAL_RATIO:.2}x fio's on one file (means over {} rounds; p50/p99 over fio's clat, CPU \
         per request over fio's)",
        config.rounds
    );
    let _ = writeln!(
        out,
        "| case              | side      | IOPS / fio | per round   | p50 / fio | p99 / fio | CPU / fio | goal         |"
    );
    let _ = writeln!(
        out,
        "|-------------------|-----------|-----------:|-------------|----------:|----------:|----------:|--------------|"
    );
    for case in workloads {
        let Some(fio) = summary(results, case, Side::Fio) else { continue };
        for &side in config.sides.iter().filter(|side| side.is_product()) {
            let Some(product) = summary(results, case, side) else { continue };
            let ratio = product.iops / fio.iops;
            let per_round = round_ratios(results, case, side);
            let range = match (
                per_round.iter().copied().reduce(f64::min),
                per_round.iter().copied().reduce(f64::max),
            ) {
                (Some(low), Some(high)) => format!("{low:.2}-{high:.2}"),
                _ => "-".to_string(),
            };
            let goal = side.goal_ratio();
            let _ = writeln!(
                out,
                "| {:<17} | {:<9} | {:>9.2}x | {:<11} | {:>8.2}x | {:>8.2}x | {:>8.2}x | {:<12} |",
                case.name,
                side.name(),
                ratio,
                range,
                product.p50_ns / fio.p50_ns.max(1.0),
                product.p99_ns / fio.p99_ns.max(1.0),
                product.cpu_us_per_io / fio.cpu_us_per_io.max(f64::MIN_POSITIVE),
                format!("{} {goal:.2}x", if ratio >= goal { "met" } else { "MISSED" }),
            );
        }
    }
    out
}

fn to_json(
    config: &Config,
    fs_name: &str,
    direct: Option<bool>,
    results: &[Measurement],
    resync: Option<&ResyncReport>,
) -> serde_json::Value {
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|m| {
            serde_json::json!({
                "case": m.case.name,
                "round": m.round,
                "side": m.side.name(),
                "block_bytes": m.case.block_bytes,
                "iodepth": m.case.iodepth,
                "iops": m.iops(),
                "mib_per_sec": m.mib_per_sec(),
                "p50_ns": m.p50_ns,
                "p99_ns": m.p99_ns,
                "fio_lat_p50_ns": m.lat_p50_ns,
                "fio_lat_p99_ns": m.lat_p99_ns,
                "cpu_us_per_io": m.cpu_us_per_io,
            })
        })
        .collect();
    let run = |run: &ResyncRun| {
        serde_json::json!({
            "level": run.level_name(),
            "copied_bytes": run.copied_bytes,
            "seconds": run.elapsed.as_secs_f64(),
            "copy_seconds": run.copy_elapsed.as_secs_f64(),
            "cpu_seconds": run.cpu.as_secs_f64(),
            "mib_per_sec": run.mib_per_sec(),
        })
    };
    let resync = resync.map(|report| {
        serde_json::json!({
            "file_bytes": report.file_bytes,
            "direct": report.direct,
            "data_bytes": report.data_bytes,
            "region_bytes": REGION_BYTES,
            "fill_seconds": report.fill.as_secs_f64(),
            "regions": report.regions,
            "dirty_regions": report.dirty_regions,
            "degraded_write_seconds": report.degraded.as_secs_f64(),
            "incremental": run(&report.incremental),
            "full": run(&report.full),
            "incremental_over_full_time": report.incremental.elapsed.as_secs_f64() / report.full.elapsed.as_secs_f64(),
            "fio_seqwrite_mib_per_sec": report.fio_seq_mib_per_sec,
        })
    });
    serde_json::json!({
        "dir": config.dir.display().to_string(),
        "file_system": fs_name,
        "size_bytes": config.size_bytes,
        "direct": direct,
        "seconds": config.duration.as_secs_f64(),
        "rounds": config.rounds,
        "seed": config.seed,
        "results": cases,
        "resync": resync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults are what docs/performance.md says the plain command runs.
    #[test]
    fn defaults_match_the_documented_run() {
        let config = Config::from_args(Args::parse_from(["plex-bench", "--seed", "7"])).expect("valid");
        assert_eq!(config.cases, CaseName::ALL);
        assert_eq!(config.workloads().len(), 4);
        assert_eq!(config.sides, [Side::Uring, Side::Aggregate, Side::Fio]);
        assert_eq!(config.size_bytes, 1 << 30);
        assert_eq!(config.duration, Duration::from_secs(5));
        assert_eq!(config.dir, PathBuf::from("./bench-data"));
        assert_eq!(config.seed, 7);
        assert_eq!(config.rounds, 2);
        assert_eq!(config.direct, Direct::Auto);
        let resync = Config::from_args(Args::parse_from(["plex-bench", "--cases", "seqwrite-qd8,resync"]))
            .expect("valid");
        assert_eq!(resync.workloads().len(), 1);
        assert!(resync.cases.contains(&CaseName::Resync));
    }

    /// Nonsense flags are refused before any file is created.
    #[test]
    fn invalid_flags_are_refused() {
        for args in [
            &["plex-bench", "--seconds", "0"][..],
            &["plex-bench", "--size-mib", "1"],
            &["plex-bench", "--rounds", "0"],
        ] {
            assert!(Config::from_args(Args::parse_from(args)).is_err(), "{args:?} was accepted");
        }
    }

    /// fio and the product side must run the same workload: a drifted flag would compare two
    /// different things.
    #[test]
    fn fio_gets_the_case_parameters() {
        let config = Config::from_args(Args::parse_from(["plex-bench", "--seed", "9", "--seconds", "2"]))
            .expect("valid");
        let file = BenchFile { path: PathBuf::from("/x/f"), size_bytes: 1 << 30, direct: true };
        let case = CaseName::SeqwriteQd8.case().expect("a workload");
        let args = fio_args(&config, &case, &file);
        for expected in [
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=write",
            "--bs=1048576",
            "--iodepth=8",
            "--numjobs=1",
            "--size=1073741824",
            "--runtime=2000ms",
            "--time_based",
            "--randseed=9",
            "--filename=/x/f",
        ] {
            assert!(args.iter().any(|arg| arg == expected), "{expected} missing from {args:?}");
        }
    }

    /// The numbers come from the right place in fio's JSON, even after a warning line.
    #[test]
    fn fio_json_is_parsed() {
        let stdout = "fio: some warning\n{\"jobs\":[{\"error\":0,\"usr_cpu\":2.5,\"sys_cpu\":7.5,\
            \"write\":{\"iops\":2000.5,\"runtime\":5000,\"total_ios\":10000,\
            \"clat_ns\":{\"percentile\":{\"50.000000\":40960,\"99.000000\":99328}},\
            \"lat_ns\":{\"percentile\":{\"50.000000\":41984,\"99.000000\":101376}}}}]}\n";
        let m = parse_fio(&CaseName::RandwriteQd1.case().expect("a workload"), stdout).expect("parsed");
        assert!((m.iops() - 2000.5).abs() < 0.5, "{}", m.iops());
        assert_eq!((m.p50_ns, m.p99_ns), (40960, 99328));
        assert_eq!((m.lat_p50_ns, m.lat_p99_ns), (Some(41984), Some(101376)));
        // 10% of 5 s over 10,000 requests.
        assert!((m.cpu_us_per_io - 50.0).abs() < 1e-6, "{}", m.cpu_us_per_io);
    }

    /// The product side keeps its lanes busy and reads back what it was asked to, on the
    /// in-memory device (no disk, no fio).
    #[test]
    fn drive_runs_every_lane_on_a_device() {
        let device = plex::MemDevice::new(1 << 20);
        let runtime = current_thread_runtime().expect("runtime");
        for case in CaseName::ALL.iter().filter_map(|name| name.case()) {
            let (latencies, elapsed) = runtime
                .block_on(drive(&DeviceTarget(&device), &case, Duration::from_millis(20), 1))
                .expect("the in-memory device never fails");
            assert!(latencies.len() >= case.iodepth as usize, "{}: {} requests", case.name, latencies.len());
            assert!(latencies.is_sorted());
            assert!(elapsed >= Duration::from_millis(20));
        }
    }

    /// A plex file of `plex_file_bytes(n)` holds an aggregate of at least `n` bytes: were it too
    /// small, the aggregate side would measure a smaller span than fio's.
    #[test]
    fn plex_files_hold_the_span() {
        for data_bytes in [16u64 << 20, 1 << 30, 5 << 30] {
            let areas = plex::layout::plan_plex(&[plex_file_bytes(data_bytes)], 65536).expect("a layout");
            assert!(areas[0].data.len >= data_bytes, "{data_bytes}: {:?}", areas[0]);
        }
    }

    /// The aggregate side runs every case through `Aggregate::write`/`read` after the fill, on
    /// in-memory devices: a read of a block the fill missed would fail its checksum.
    #[test]
    fn drive_runs_every_case_on_an_aggregate() {
        let span = 16 << 20;
        let runtime = current_thread_runtime().expect("runtime");
        runtime.block_on(async {
            let devices: Vec<Arc<dyn BlockDevice>> = (0..2)
                .map(|_| Arc::new(plex::MemDevice::new(plex_file_bytes(span))) as Arc<dyn BlockDevice>)
                .collect();
            let aggregate = Aggregate::create(
                &aggregate_spec(),
                plexes_of(devices).expect("two"),
                AggregateOptions::default(),
                Arc::new(RecordingHook::default()),
            )
            .await
            .expect("create");
            fill_aggregate(&aggregate, aggregate.size_bytes()).await.expect("fill");
            let target = AggregateTarget { aggregate: &aggregate, span_bytes: span };
            assert_eq!(target.span_bytes(), span);
            for case in CaseName::ALL.iter().filter_map(|name| name.case()) {
                let (latencies, _) = drive(&target, &case, Duration::from_millis(20), 3)
                    .await
                    .expect("the aggregate never fails");
                assert!(
                    latencies.len() >= case.iodepth as usize,
                    "{}: {} requests",
                    case.name,
                    latencies.len()
                );
            }
            assert_eq!(aggregate.status().await.state, AggregateState::MirroredNormal);
        });
    }

    /// The resync case drops plex 1 for a failure, copies exactly the dirty regions, then the
    /// whole data area to a blank plex, on in-memory devices; a switch that let a failed write
    /// through, or a wrong count, fails it.
    #[test]
    fn resync_measures_incremental_and_full() {
        let span = 16 << 20;
        let runtime = current_thread_runtime().expect("runtime");
        let [plex0, plex1, blank] =
            [0; 3].map(|_| Arc::new(plex::MemDevice::new(plex_file_bytes(span))) as Arc<dyn BlockDevice>);
        let outcome = runtime
            .block_on(measure_resync(plex0, plex1, blank, span, 11, &|| Ok(())))
            .expect("the resync case runs");
        assert_eq!(outcome.regions, 256);
        assert_eq!(outcome.dirty_regions, 13);
        assert_eq!(outcome.incremental.copied_bytes, 13 * REGION_BYTES);
        assert_eq!(outcome.full.copied_bytes, outcome.data_bytes);
    }

    /// A failing switch answers EIO without touching the device; off, it passes everything on.
    #[test]
    fn fail_switch_fails_writes_and_flushes_only() {
        let device = Arc::new(plex::MemDevice::new(1 << 20));
        let switch = FailSwitch::new(device.clone());
        let runtime = current_thread_runtime().expect("runtime");
        runtime.block_on(async {
            switch.set_failing(true);
            let (result, _) = switch.write(0, plex::testing::pattern(1, 1)).await;
            assert!(matches!(result, Err(DeviceError::Io { op: "write", .. })), "{result:?}");
            assert!(matches!(switch.flush().await, Err(DeviceError::Io { op: "flush", .. })));
            let (result, buf) = switch.read(0, AlignedBuf::zeroed(4096)).await;
            result.expect("reads pass");
            assert!(buf.as_slice().iter().all(|&b| b == 0), "a failed write reached the device");
            switch.set_failing(false);
            switch.write(0, plex::testing::pattern(1, 1)).await.0.expect("the device did not latch");
            switch.flush().await.expect("flush");
        });
    }
}

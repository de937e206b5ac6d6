//! `plex-bench`: the io_uring block device (`plex::uring::UringDevice`) against fio's own io_uring
//! engine on the same file with the same parameters (DESIGN §6.2, §15; results in
//! `docs/performance.md`).
//!
//! For every case (4 KiB random write QD1, 4 KiB random write QD32, 1 MiB sequential write QD8,
//! 4 KiB random read QD32), in one run on one machine:
//! - **uring** (the product): a current-thread tokio runtime keeps exactly `iodepth` requests in
//!   flight against a `UringDevice` opened on the file with `entries = iodepth`, each request
//!   issued as soon as the one before it in its lane completes, for `--seconds`;
//! - **fio**: `fio --ioengine=io_uring` on the same file with the same block size, iodepth, file
//!   size and duration, `numjobs=1`, `time_based`, `direct=1` exactly when the device got O_DIRECT,
//!   and `norandommap` (uniform random offsets with repeats, as the product side draws them).
//!
//! Invariants of the measurement:
//! - both sides use one file, created once, written in full and synced before the first case, so
//!   that no case pays for block allocation; it is deleted at the end, also on error;
//! - random offsets come from a seeded generator (`--seed`, printed), one stream per lane; a
//!   sequential case walks the file from offset 0 and wraps at its end, as fio does;
//! - a product latency is the wall time of one `read`/`write` call from the call to its answer,
//!   which includes everything fio counts as submission latency (slat) and completion latency
//!   (clat); fio's clat and total latency (lat) percentiles are both reported;
//! - IOPS are completed requests over the wall time from the first submission to the last
//!   completion; fio's are its own `iops`;
//! - CPU per request is the user + system time of the whole benchmark process (the tokio thread
//!   and the ring thread) over its requests, and fio's `usr_cpu + sys_cpu` over its `total_ios`:
//!   steadier than IOPS on a shared virtual disk, and what tells a slower disk from a slower engine;
//! - every case runs `--rounds` times (default 2); odd rounds run the sides in reverse order, so
//!   that a drift of the disk does not always favour the same side; the goal is judged on the
//!   means over the rounds, and the per-round ratios are printed beside it;
//! - after every side of every case the file system is synced and left quiet for a moment, so a
//!   side does not pay for the writeback of the one before; with buffered I/O the file's pages
//!   are also dropped from the page cache, as fio's `invalidate=1` does;
//! - the file lives on a disk file system: tmpfs and ramfs are refused.
//!
//! The goal (product IOPS at least 0.8x fio's in every case) is reported, never asserted:
//! DESIGN §14 keeps speed out of pass/fail. New product sides (a mirrored aggregate over two
//! files, a remote plex) are one more `Side` whose function builds a `BlockDevice` and hands it
//! to `drive_device`.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use plex::uring::{DirectIo, UringDevice, UringOptions};
use plex::{AlignedBuf, BLOCK_BYTES, BlockDevice, IoFuture};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Quiet time after each side's syncfs, for the device to finish writeback and discards.
const SETTLE: Duration = Duration::from_millis(200);
/// ramfs has no constant in `libc`.
#[cfg(target_os = "linux")]
const RAMFS_MAGIC: i128 = 0x8584_58f6;
/// The goal: product IOPS over fio IOPS.
const GOAL_RATIO: f64 = 0.8;

#[derive(Parser, Debug)]
#[command(
    name = "plex-bench",
    about = "The io_uring BlockDevice against fio --ioengine=io_uring on the same file"
)]
struct Args {
    /// Directory for the benchmark file (must be on a disk file system, not tmpfs).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// Measured seconds per side and case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Size of the benchmark file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds per case; odd rounds run the sides in reverse order, so that neither side always
    /// runs first (the disk is shared and virtual: its speed drifts).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seed of the random offsets (a random one, printed, if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Cases to run, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = CaseName::ALL)]
    cases: Vec<CaseName>,
    /// Sides to run, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Side::Uring, Side::Fio])]
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
}

impl CaseName {
    const ALL: [CaseName; 4] =
        [CaseName::RandwriteQd1, CaseName::RandwriteQd32, CaseName::SeqwriteQd8, CaseName::RandreadQd32];

    fn case(self) -> Case {
        let (name, op, pattern, block_bytes, iodepth) = match self {
            CaseName::RandwriteQd1 => ("4k randwrite qd1", Op::Write, Pattern::Random, 4 << 10, 1),
            CaseName::RandwriteQd32 => ("4k randwrite qd32", Op::Write, Pattern::Random, 4 << 10, 32),
            CaseName::SeqwriteQd8 => ("1m seqwrite qd8", Op::Write, Pattern::Sequential, 1 << 20, 8),
            CaseName::RandreadQd32 => ("4k randread qd32", Op::Read, Pattern::Random, 4 << 10, 32),
        };
        Case { name, op, pattern, block_bytes, iodepth }
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
    /// The product: `plex::uring::UringDevice`.
    Uring,
    /// `fio --ioengine=io_uring`.
    Fio,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Uring => "uring",
            Side::Fio => "fio",
        }
    }

    fn is_product(self) -> bool {
        self != Side::Fio
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
        Ok(Config {
            dir: args.dir,
            duration: Duration::from_secs_f64(args.seconds),
            size_bytes: args.size_mib << 20,
            rounds: args.rounds,
            seed: args.seed.unwrap_or_else(rand::random),
            cases: args.cases,
            sides,
            direct: args.direct,
            fio: args.fio,
            json: args.json,
        })
    }
}

/// The benchmark file, shared by every side.
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
    /// (tokio thread and ring thread) for the product, of fio's job for fio.
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

/// Deletes the benchmark file when the run ends, whichever way it ends.
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
    let fs_name = check_disk_file_system(&config.dir)?;
    if config.sides.contains(&Side::Fio) {
        let version = Command::new(&config.fio)
            .arg("--version")
            .output()
            .with_context(|| format!("run {} --version (apt-get install fio)", config.fio.display()))?;
        println!("fio: {}", String::from_utf8_lossy(&version.stdout).trim());
    }
    let path = config.dir.join(format!("plex-bench-{}.bin", std::process::id()));
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
    match fs::read_to_string("/proc/loadavg") {
        Ok(loadavg) => println!(
            "load average at start: {} (1, 5, 15 min); the numbers are comparable only on an idle machine",
            loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
        Err(_) => println!("load average unknown; the numbers are comparable only on an idle machine"),
    }
    let mut results = Vec::new();
    settle(config, &file)?;
    for &case_name in &config.cases {
        let case = case_name.case();
        for round in 0..config.rounds {
            let mut sides = config.sides.clone();
            if round % 2 == 1 {
                sides.reverse();
            }
            for side in sides {
                let mut measurement = match side {
                    Side::Uring => bench_uring(config, &case, &file),
                    Side::Fio => bench_fio(config, &case, &file),
                }
                .with_context(|| format!("run {} on {} (round {round})", case.name, side.name()))?;
                measurement.round = round;
                settle(config, &file)?;
                println!(
                    "  {:<18} round {round} {:<5} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>8.1} us  p99 {:>8.1} us  \
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
    print!("{}", goals(config, &results));
    if config.json {
        println!();
        println!("{}", to_json(config, &fs_name, &file, &results));
    }
    Ok(())
}

fn device_options(config: &Config, iodepth: u32) -> UringOptions {
    UringOptions { entries: iodepth.max(2), direct: config.direct.for_device() }
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

/// The product side: a `UringDevice` on the file, driven by `drive_device`.
fn bench_uring(config: &Config, case: &Case, file: &BenchFile) -> Result<Measurement> {
    let device = UringDevice::open_with(&file.path, device_options(config, case.iodepth))
        .with_context(|| format!("open {}", file.path.display()))?;
    ensure!(device.direct() == file.direct, "the device's O_DIRECT changed between opens");
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("build tokio")?;
    let cpu_before = process_cpu()?;
    let (latencies, elapsed) = runtime.block_on(drive_device(&device, case, config.duration, config.seed))?;
    let cpu = process_cpu()?.saturating_sub(cpu_before);
    Ok(product_measurement(case, Side::Uring, &latencies, elapsed, cpu))
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

/// Keeps exactly `case.iodepth` requests in flight against `device` for `duration`: one lane per
/// request slot, each issuing its next request when the last one completes. Returns the sorted
/// latencies of all requests and the wall time from the first submission to the last completion.
/// Any `BlockDevice` can be measured this way.
async fn drive_device<D: BlockDevice + ?Sized>(
    device: &D,
    case: &Case,
    duration: Duration,
    seed: u64,
) -> Result<(Vec<u64>, Duration)> {
    let size = device.size_bytes();
    ensure!(
        case.block_bytes.is_multiple_of(BLOCK_BYTES) && case.block_bytes <= size,
        "a block of {} bytes does not fit a device of {size} bytes",
        case.block_bytes
    );
    let blocks = size / case.block_bytes;
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
                while Instant::now() < deadline {
                    let block = match case.pattern {
                        Pattern::Random => rng.random_range(0..blocks),
                        Pattern::Sequential => next_sequential.fetch_add(1, Ordering::Relaxed) % blocks,
                    };
                    let offset = block * case.block_bytes;
                    let issued = Instant::now();
                    let (result, back) = match case.op {
                        Op::Read => device.read(offset, buf).await,
                        Op::Write => device.write(offset, buf).await,
                    };
                    latencies.push(nanos(issued.elapsed()));
                    result.with_context(|| format!("{:?} at {offset}", case.op))?;
                    buf = back;
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

/// Refuses memory file systems; returns the file system's name for the report.
#[cfg(target_os = "linux")]
fn check_disk_file_system(dir: &Path) -> Result<String> {
    use std::os::unix::ffi::OsStrExt as _;

    let canonical = fs::canonicalize(dir).with_context(|| format!("resolve {}", dir.display()))?;
    if canonical.starts_with("/dev/shm") {
        bail!("{} is under /dev/shm (memory): use a directory on a disk", canonical.display());
    }
    let path = std::ffi::CString::new(canonical.as_os_str().as_bytes())
        .with_context(|| format!("pass {} to statfs", canonical.display()))?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `stat` a valid, writable `statfs`, both alive
    // for the call.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", canonical.display()));
    }
    // `f_type` is signed or unsigned, 32 or 64 bits, depending on the target.
    let f_type = i128::from(stat.f_type);
    if f_type == i128::from(libc::TMPFS_MAGIC) || f_type == RAMFS_MAGIC {
        bail!(
            "{} is on a memory file system (f_type {f_type:#x}): the disk would not be measured; pass --dir \
             on a disk (ext4)",
            canonical.display()
        );
    }
    Ok(if f_type == i128::from(libc::EXT4_SUPER_MAGIC) {
        "ext4".to_string()
    } else {
        format!("file system type {f_type:#x}")
    })
}

#[cfg(not(target_os = "linux"))]
fn check_disk_file_system(_dir: &Path) -> Result<String> {
    Ok("file system not checked".to_string())
}

/// Writes back what the last side left and lets the device go quiet; with buffered I/O, also
/// drops the file's pages from the page cache so every side starts cold, as fio's `invalidate=1`
/// does for its own.
fn settle(config: &Config, file: &BenchFile) -> Result<()> {
    let handle = File::open(&config.dir).with_context(|| format!("open {}", config.dir.display()))?;
    // SAFETY: the descriptor belongs to `handle`, which is open for the whole call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("syncfs {}", config.dir.display()));
    }
    if !file.direct {
        let data = File::open(&file.path).with_context(|| format!("open {}", file.path.display()))?;
        // SAFETY: the descriptor belongs to `data`, open for the whole call; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(data.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        ensure!(rc == 0, "posix_fadvise DONTNEED on {}: error {rc}", file.path.display());
    }
    thread::sleep(SETTLE);
    Ok(())
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

fn micros(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Nearest-rank percentile of sorted latencies, `per_mille` of 1000.
fn percentile(sorted: &[u64], per_mille: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn optional_micros(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".to_string(), |ns| format!("{:.1}", micros(ns)))
}

fn results_table(results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| case              | round | side  |     IOPS |   MiB/s |   p50 us |   p99 us | fio lat p50 us | \
         fio lat p99 us | CPU us/IO |"
    );
    let _ = writeln!(
        out,
        "|-------------------|------:|-------|---------:|--------:|---------:|---------:|---------------:|\
         ---------------:|----------:|"
    );
    for m in results {
        let _ = writeln!(
            out,
            "| {:<17} | {:>5} | {:<5} | {:>8.0} | {:>7.1} | {:>8.1} | {:>8.1} | {:>14} | {:>14} | {:>9.1} |",
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

/// Product IOPS over fio's, round by round (a round pairs the two sides run back to back).
fn round_ratios(results: &[Measurement], case: &Case, side: Side) -> Vec<f64> {
    let find = |side: Side, round: usize| {
        results.iter().find(|m| m.case.name == case.name && m.side == side && m.round == round)
    };
    let rounds = results.iter().map(|m| m.round + 1).max().unwrap_or(0);
    (0..rounds).filter_map(|round| Some(find(side, round)?.iops() / find(Side::Fio, round)?.iops())).collect()
}

fn goals(config: &Config, results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Goal (reported, not asserted): product IOPS >= {GOAL_RATIO:.1}x fio's on the same file \
         (means over {} rounds; p50/p99 over fio's clat, CPU per request over fio's)",
        config.rounds
    );
    let _ = writeln!(
        out,
        "| case              | side  | IOPS / fio | per round   | p50 / fio | p99 / fio | CPU / fio | goal   |"
    );
    let _ = writeln!(
        out,
        "|-------------------|-------|-----------:|-------------|----------:|----------:|----------:|--------|"
    );
    for &case_name in &config.cases {
        let case = case_name.case();
        let Some(fio) = summary(results, &case, Side::Fio) else { continue };
        for &side in config.sides.iter().filter(|side| side.is_product()) {
            let Some(product) = summary(results, &case, side) else { continue };
            let ratio = product.iops / fio.iops;
            let per_round = round_ratios(results, &case, side);
            let range = match (
                per_round.iter().copied().reduce(f64::min),
                per_round.iter().copied().reduce(f64::max),
            ) {
                (Some(low), Some(high)) => format!("{low:.2}-{high:.2}"),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "| {:<17} | {:<5} | {:>9.2}x | {:<11} | {:>8.2}x | {:>8.2}x | {:>8.2}x | {:<6} |",
                case.name,
                side.name(),
                ratio,
                range,
                product.p50_ns / fio.p50_ns.max(1.0),
                product.p99_ns / fio.p99_ns.max(1.0),
                product.cpu_us_per_io / fio.cpu_us_per_io.max(f64::MIN_POSITIVE),
                if ratio >= GOAL_RATIO { "met" } else { "MISSED" },
            );
        }
    }
    out
}

fn to_json(config: &Config, fs_name: &str, file: &BenchFile, results: &[Measurement]) -> serde_json::Value {
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
    serde_json::json!({
        "dir": config.dir.display().to_string(),
        "file_system": fs_name,
        "size_bytes": file.size_bytes,
        "direct": file.direct,
        "seconds": config.duration.as_secs_f64(),
        "rounds": config.rounds,
        "seed": config.seed,
        "results": cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A percentile off by one rank would report p99 of 100 samples as the maximum.
    #[test]
    fn percentile_is_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&sorted, 500), 50);
        assert_eq!(percentile(&sorted, 990), 99);
        assert_eq!(percentile(&[], 500), 0);
    }

    /// The defaults are what docs/performance.md says the plain command runs.
    #[test]
    fn defaults_match_the_documented_run() {
        let config = Config::from_args(Args::parse_from(["plex-bench", "--seed", "7"])).expect("valid");
        assert_eq!(config.cases, CaseName::ALL);
        assert_eq!(config.sides, [Side::Uring, Side::Fio]);
        assert_eq!(config.size_bytes, 1 << 30);
        assert_eq!(config.duration, Duration::from_secs(5));
        assert_eq!(config.dir, PathBuf::from("./bench-data"));
        assert_eq!(config.seed, 7);
        assert_eq!(config.rounds, 2);
        assert_eq!(config.direct, Direct::Auto);
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
        let args = fio_args(&config, &CaseName::SeqwriteQd8.case(), &file);
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
        let m = parse_fio(&CaseName::RandwriteQd1.case(), stdout).expect("parsed");
        assert!((m.iops() - 2000.5).abs() < 0.5, "{}", m.iops());
        assert_eq!((m.p50_ns, m.p99_ns), (40960, 99328));
        assert_eq!((m.lat_p50_ns, m.lat_p99_ns), (Some(41984), Some(101376)));
        // 10% of 5 s over 10,000 requests.
        assert!((m.cpu_us_per_io - 50.0).abs() < 1e-6, "{}", m.cpu_us_per_io);
    }

    /// The benchmark must not silently measure a memory file system.
    #[test]
    fn dev_shm_is_refused() {
        if Path::new("/dev/shm").is_dir() {
            assert!(check_disk_file_system(Path::new("/dev/shm")).is_err());
        }
    }

    /// The product side keeps its lanes busy and reads back what it was asked to, on the
    /// in-memory device (no disk, no fio).
    #[test]
    fn drive_device_runs_every_lane() {
        let device = plex::MemDevice::new(1 << 20);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        for case_name in CaseName::ALL {
            let case = case_name.case();
            let (latencies, elapsed) = runtime
                .block_on(drive_device(&device, &case, Duration::from_millis(20), 1))
                .expect("the in-memory device never fails");
            assert!(latencies.len() >= case.iodepth as usize, "{}: {} requests", case.name, latencies.len());
            assert!(latencies.is_sorted());
            assert!(elapsed >= Duration::from_millis(20));
        }
    }
}

//! `nvlog-bench`: append+persist latency and throughput of the NVLog against a hand-made floor
//! (DESIGN §5, §15; results in `docs/performance.md`).
//!
//! For every durability mode and every appender count, in one run on one machine:
//! - **nvlog**: a fresh `MmapMedia` file is formatted with a `local` and a `dr_partner` partition;
//!   N OS threads share one `Arc<Nvlog<MmapMedia>>` and call `append` (4 KiB payload), which
//!   returns once the record is durable; a CP thread releases what is durable every few ms, so the
//!   two halves of the partition never stay full;
//! - **floor**: a fresh plain file of the same size, mapped with memmap2; each of N threads copies
//!   4 KiB into its own ring of page-sized slots and, in `power` mode, msyncs that page
//!   (`MmapRaw::flush_range`). In `process` mode the copy is all there is.
//!
//! Invariants of the measurement:
//! - both sides run the same number of threads for the same wall time, on files of the same size
//!   in the same directory, created the same way (sparse, `set_len` then `sync_all`, as
//!   `MmapMedia::create` does; or both written with zeroes with `--preallocate`) and with their
//!   pages read once before the clock starts (as `Nvlog::format` does when it zeroes);
//! - after every case the file system is synced and left quiet for a moment, so a case does not
//!   pay for the writeback or the discards (ext4 `-o discard`) of the one before;
//! - the clock starts when every thread is started and stops when the last one has finished;
//! - a latency is the wall time of one call that returns durable, in nanoseconds; throughput is
//!   completed calls over the wall time from the start barrier to the last thread's exit;
//! - every file is deleted after its case, also on error;
//! - the files live on a disk file system: tmpfs and ramfs are refused, because an msync there is
//!   free and the `power` numbers would mean nothing.
//!
//! The goals (within 1.5x of the floor at one appender; in `power` mode, 32 appenders give at
//! least 4x the throughput of one) are reported, never asserted: DESIGN §14 keeps speed out of
//! pass/fail.

use mc_tests::bench::{Mode, check_disk_file_system, micros, nanos, percentile};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::{Parser, ValueEnum};
use memmap2::MmapRaw;
use nvlog::{
    AggregateId, ClusterId, Epoch, FormatSpec, Identity, Lsn, MmapMedia, NodeId, Nvlog, OpKind, Options,
    PartitionKind, RecordInput, VolumeId,
};

/// Bytes of payload per record, and bytes per floor slot.
const RECORD_PAYLOAD_BYTES: usize = 4096;
/// The floor's slot and msync unit.
const PAGE_BYTES: usize = 4096;
/// How often the CP thread looks at the partition.
const CP_POLL: Duration = Duration::from_millis(1);
/// Quiet time after each case's syncfs, for the device to finish discards and writeback.
const SETTLE: Duration = Duration::from_millis(200);
/// ramfs has no constant in `libc`.
#[cfg(target_os = "linux")]
#[derive(Parser, Debug)]
#[command(
    name = "nvlog-bench",
    about = "NVLog append+persist latency and throughput against a memcpy(+msync) floor"
)]
struct Args {
    /// Directory for the benchmark files (must be on a disk file system, not tmpfs).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// Measured seconds per case (each case runs twice: nvlog and floor).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Concurrent appenders, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 32])]
    threads: Vec<usize>,
    /// Durability modes, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Mode::Process, Mode::Power])]
    modes: Vec<Mode>,
    /// Size of each benchmark file in MiB (the NVLog file and the floor file alike).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// The CP thread releases at least this often (and whenever half the partition is used).
    #[arg(long, default_value_t = 5)]
    cp_interval_ms: u64,
    /// Which sides to run, comma-separated (a profile may want only one).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Side::Nvlog, Side::Floor])]
    sides: Vec<Side>,
    /// Write zeroes over each file before the case instead of creating it sparse as
    /// `MmapMedia::create` does (an experiment: no block allocation under msync).
    #[arg(long)]
    preallocate: bool,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Side {
    /// The product: `Nvlog::append`.
    Nvlog,
    /// memcpy (+ msync of that page in power mode) by hand.
    Floor,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Nvlog => "nvlog",
            Side::Floor => "floor",
        }
    }
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    dir: PathBuf,
    duration: Duration,
    threads: Vec<usize>,
    modes: Vec<Mode>,
    size_bytes: u64,
    cp_interval: Duration,
    sides: Vec<Side>,
    preallocate: bool,
    json: bool,
}

impl Config {
    fn from_args(args: Args) -> Result<Config> {
        ensure!(
            args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 3600.0,
            "--seconds must be in (0, 3600], got {}",
            args.seconds
        );
        ensure!(!args.threads.is_empty(), "--threads needs at least one count");
        ensure!(
            args.threads.iter().all(|&n| (1..=1024).contains(&n)),
            "--threads counts must be in 1..=1024, got {:?}",
            args.threads
        );
        ensure!(!args.modes.is_empty(), "--modes needs at least one mode");
        ensure!(!args.sides.is_empty(), "--sides needs at least one side");
        ensure!(
            (4..=65536).contains(&args.size_mib),
            "--size-mib must be in 4..=65536, got {}",
            args.size_mib
        );
        ensure!(args.cp_interval_ms >= 1, "--cp-interval-ms must be at least 1");
        let mut sides = args.sides;
        sides.dedup();
        Ok(Config {
            dir: args.dir,
            duration: Duration::from_secs_f64(args.seconds),
            threads: args.threads,
            modes: args.modes,
            size_bytes: args.size_mib << 20,
            cp_interval: Duration::from_millis(args.cp_interval_ms),
            sides,
            preallocate: args.preallocate,
            json: args.json,
        })
    }
}

/// What one side of one case measured.
#[derive(Debug, Clone)]
struct Measurement {
    mode: Mode,
    threads: usize,
    side: Side,
    ops: u64,
    elapsed: Duration,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
    /// msync calls: for nvlog `Stats::persists`, which also counts header and zeroing persists;
    /// for the floor one per op in power mode.
    persists: u64,
    /// nvlog only: appends that found both halves in use and waited for the CP.
    full_waits: u64,
    /// nvlog only: releases the CP thread made.
    releases: u64,
}

impl Measurement {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn mib_per_sec(&self) -> f64 {
        self.ops_per_sec() * RECORD_PAYLOAD_BYTES as f64 / f64::from(1u32 << 20)
    }
}

/// Deletes a benchmark file when the case ends, whichever way it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        // Best effort: the file may not have been created if the case failed early.
        let _ = fs::remove_file(&self.0);
    }
}

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse())?;
    run(&config)
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let fs_name = check_disk_file_system(&config.dir, "msync would cost nothing there")?;
    println!(
        "nvlog-bench: dir {} ({fs_name}), {} MiB {} files, {:.1} s per side and case, 4 KiB records, \
         CP release every {} ms or at half full",
        config.dir.display(),
        config.size_bytes >> 20,
        if config.preallocate { "preallocated" } else { "sparse" },
        config.duration.as_secs_f64(),
        config.cp_interval.as_millis(),
    );
    // Another build or test on the same machine skews the msync numbers badly; say how busy it was.
    match fs::read_to_string("/proc/loadavg") {
        Ok(loadavg) => println!(
            "load average at start: {} (1, 5, 15 min); the numbers are comparable only on an idle machine",
            loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
        Err(_) => println!("load average unknown; the numbers are comparable only on an idle machine"),
    }
    let mut results = Vec::new();
    settle(&config.dir)?;
    for &mode in &config.modes {
        for &threads in &config.threads {
            for &side in &config.sides {
                let measurement = match side {
                    Side::Nvlog => bench_nvlog(config, mode, threads),
                    Side::Floor => bench_floor(config, mode, threads),
                }
                .with_context(|| {
                    format!("run {} in {} mode with {threads} threads", side.name(), mode.name())
                })?;
                settle(&config.dir)?;
                println!(
                    "  {:<7} {:>3} threads {:<5} {:>9.0} ops/s  p50 {:>9.2} us  p99 {:>9.2} us",
                    mode.name(),
                    threads,
                    side.name(),
                    measurement.ops_per_sec(),
                    micros(measurement.p50_ns),
                    micros(measurement.p99_ns),
                );
                results.push(measurement);
            }
        }
    }
    println!();
    print!("{}", results_table(&results));
    println!();
    print!("{}", ratio_table(config, &results));
    println!();
    print!("{}", goals(config, &results));
    if config.json {
        println!();
        println!("{}", to_json(config, &fs_name, &results));
    }
    Ok(())
}

/// Writes back what the last case left (its deleted file's blocks are discarded at the next
/// journal commit when ext4 is mounted with `discard`), so that the next case's msyncs do not pay
/// for it.
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

fn case_path(config: &Config, side: Side, mode: Mode, threads: usize) -> PathBuf {
    config.dir.join(format!(
        "nvlog-bench-{}-{}-{}-{threads}.bin",
        std::process::id(),
        side.name(),
        mode.name()
    ))
}

/// A 4 KiB payload that differs per thread, so the CRC and the copy see real data.
fn payload_for(thread: usize) -> Vec<u8> {
    (0..RECORD_PAYLOAD_BYTES).map(|i| (i.wrapping_mul(31) ^ thread).to_le_bytes()[0]).collect()
}

/// Starts `threads` workers behind a start gate, lets them run for the configured time, stops them
/// and returns their latencies and the elapsed wall time.
fn drive<F>(config: &Config, threads: usize, work: F) -> Result<(Vec<u64>, Duration)>
where
    F: Fn(usize, &AtomicBool) -> Result<Vec<u64>> + Send + Sync + 'static,
{
    let work = Arc::new(work);
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(StartGate::default());
    let mut handles = Vec::with_capacity(threads);
    for thread in 0..threads {
        let (work, stop, thread_gate) = (Arc::clone(&work), Arc::clone(&stop), Arc::clone(&gate));
        let spawned = thread::Builder::new()
            .name(format!("appender-{thread}"))
            .spawn(move || if thread_gate.wait()? { work(thread, &stop) } else { Ok(Vec::new()) });
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                // Release the threads already started, or they would wait for ever.
                gate.open(false)?;
                for handle in handles {
                    let _ = handle.join();
                }
                return Err(error).context("spawn an appender thread");
            }
        }
    }
    gate.open(true)?;
    let start = Instant::now();
    thread::sleep(config.duration);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut first_error = None;
    for handle in handles {
        match handle.join().map_err(|_| anyhow!("an appender thread panicked"))? {
            Ok(mut thread_latencies) => latencies.append(&mut thread_latencies),
            Err(error) => first_error = first_error.or(Some(error)),
        }
    }
    let elapsed = start.elapsed();
    if let Some(error) = first_error {
        return Err(error);
    }
    latencies.sort_unstable();
    Ok((latencies, elapsed))
}

/// Holds the workers until every one is started, then lets them all go (or sends them home).
#[derive(Debug, Default)]
struct StartGate {
    state: Mutex<Option<bool>>,
    opened: Condvar,
}

impl StartGate {
    /// Waits until the gate opens; true means run.
    fn wait(&self) -> Result<bool> {
        let mut state = self.state.lock().map_err(|_| anyhow!("the start gate is poisoned"))?;
        loop {
            if let Some(go) = *state {
                return Ok(go);
            }
            state = self.opened.wait(state).map_err(|_| anyhow!("the start gate is poisoned"))?;
        }
    }

    fn open(&self, go: bool) -> Result<()> {
        *self.state.lock().map_err(|_| anyhow!("the start gate is poisoned"))? = Some(go);
        self.opened.notify_all();
        Ok(())
    }
}

fn bench_nvlog(config: &Config, mode: Mode, threads: usize) -> Result<Measurement> {
    let path = case_path(config, Side::Nvlog, mode, threads);
    let _ = fs::remove_file(&path);
    let _cleanup = RemoveOnDrop(path.clone());
    let media = if config.preallocate {
        drop(create_file(&path, config.size_bytes, true)?);
        MmapMedia::open(&path).with_context(|| format!("map {}", path.display()))?
    } else {
        MmapMedia::create(&path, config.size_bytes).with_context(|| format!("create {}", path.display()))?
    };
    let node = NodeId(1);
    let identity = Identity { cluster: ClusterId([7; 16]), node };
    let spec = FormatSpec {
        identity,
        partitions: vec![(PartitionKind::Local, node), (PartitionKind::DrPartner, NodeId(2))],
        generation_floor: nvlog::Generation(0),
    };
    // The lsn floor stays 0 (a fresh log). `..Options::default()` also keeps this building when a
    // test enables nvlog's `fault-injection`, which adds a field (features are workspace-unified).
    let options = Options { durability: mode.durability(), ..Options::default() };
    let (log, _report) = Nvlog::format(media, &spec, options).context("format the NVLog")?;
    let log = Arc::new(log);

    let cp_stop = Arc::new(AtomicBool::new(false));
    let releases = Arc::new(AtomicU64::new(0));
    let cp = {
        let (log, cp_stop, releases) = (Arc::clone(&log), Arc::clone(&cp_stop), Arc::clone(&releases));
        let interval = config.cp_interval;
        thread::Builder::new()
            .name("cp".into())
            .spawn(move || cp_loop(&log, &cp_stop, &releases, interval))
            .context("spawn the CP thread")?
    };

    let before = log.stats();
    let appenders = {
        let log = Arc::clone(&log);
        drive(config, threads, move |thread, stop| append_loop(&log, thread, stop))
    };
    // Stop the CP only after the appenders: one waiting for space needs a release to finish.
    cp_stop.store(true, Ordering::Relaxed);
    let cp_result = cp.join().map_err(|_| anyhow!("the CP thread panicked"))?;
    let (latencies, elapsed) = appenders?;
    cp_result?;
    let after = log.stats();
    ensure!(after.io_errors == 0, "the NVLog saw {} I/O errors", after.io_errors);
    // lsns are issued from 1 without gaps: the last one must be the number of appends that
    // returned, and all of them must be durable.
    let status = log.status(PartitionKind::Local).context("read the local partition's status")?;
    let ops = latencies.len() as u64;
    ensure!(
        status.last_lsn == Lsn(ops) && status.durable_lsn == status.last_lsn,
        "{ops} appends returned, but the last lsn is {} and the durable lsn {}",
        status.last_lsn,
        status.durable_lsn
    );
    Ok(Measurement {
        mode,
        threads,
        side: Side::Nvlog,
        ops,
        elapsed,
        p50_ns: percentile(&latencies, 500),
        p99_ns: percentile(&latencies, 990),
        max_ns: latencies.last().copied().unwrap_or(0),
        persists: after.persists - before.persists,
        full_waits: after.full_waits - before.full_waits,
        releases: releases.load(Ordering::Relaxed),
    })
}

/// One appender: `append` (which returns once durable) until told to stop.
fn append_loop(log: &Nvlog<MmapMedia>, thread: usize, stop: &AtomicBool) -> Result<Vec<u64>> {
    let payload = payload_for(thread);
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut block = 0u64;
    let base = (thread as u64) << 32;
    while !stop.load(Ordering::Relaxed) {
        let input = RecordInput {
            op: OpKind::Write,
            aggregate: AggregateId([1; 16]),
            epoch: Epoch { number: 1, owner: NodeId(1) },
            volume: VolumeId(1),
            offset: (base + block) * RECORD_PAYLOAD_BYTES as u64,
            range_len: RECORD_PAYLOAD_BYTES as u64,
            payload: &payload,
        };
        let start = Instant::now();
        log.append(&input).with_context(|| format!("append on thread {thread}"))?;
        latencies.push(nanos(start.elapsed()));
        block += 1;
    }
    Ok(latencies)
}

/// The stand-in for consistency points: frees what is durable every `interval`, or at once when
/// half the partition is in use, so appends never wait on a full partition for long.
fn cp_loop(
    log: &Nvlog<MmapMedia>,
    stop: &AtomicBool,
    releases: &AtomicU64,
    interval: Duration,
) -> Result<()> {
    let mut last_release = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(CP_POLL);
        let status = log.status(PartitionKind::Local).context("read the local partition's status")?;
        let due = last_release.elapsed() >= interval || status.used_bytes > status.size_bytes / 2;
        if due && status.durable_lsn > status.released_lsn {
            log.release(PartitionKind::Local, status.durable_lsn)
                .with_context(|| format!("release through lsn {}", status.durable_lsn))?;
            releases.fetch_add(1, Ordering::Relaxed);
            last_release = Instant::now();
        }
    }
    Ok(())
}

/// Creates a benchmark file of `size_bytes` as `MmapMedia::create` does (sparse: `set_len`), or,
/// with `preallocate`, by writing zeroes over all of it, so that no later msync has to allocate
/// blocks. Both ways end with the file and its directory synced.
fn create_file(path: &Path, size_bytes: u64, preallocate: bool) -> Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    if preallocate {
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        while written < size_bytes {
            let len =
                usize::try_from((size_bytes - written).min(chunk.len() as u64)).context("chunk length")?;
            file.write_all(&chunk[..len]).with_context(|| format!("write zeroes to {}", path.display()))?;
            written += len as u64;
        }
    } else {
        file.set_len(size_bytes).with_context(|| format!("size {}", path.display()))?;
    }
    file.sync_all().with_context(|| format!("sync {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        File::open(dir).and_then(|dir| dir.sync_all()).with_context(|| format!("sync {}", dir.display()))?;
    }
    Ok(file)
}

/// The floor's mapped file: page-sized slots, a ring of them per thread.
struct FloorFile {
    map: MmapRaw,
    slots_per_thread: usize,
    // Keeps the file open as long as the mapping.
    _file: File,
}

impl FloorFile {
    /// Creates the file as `MmapMedia::create` does and reads every page once, as
    /// `Nvlog::format` does, so both sides start from the same page-cache state.
    fn create(path: &Path, size_bytes: u64, threads: usize, preallocate: bool) -> Result<FloorFile> {
        let file = create_file(path, size_bytes, preallocate)?;
        let map = MmapRaw::map_raw(&file).context("map the floor file")?;
        let len = map.len();
        for offset in (0..len).step_by(PAGE_BYTES) {
            // SAFETY: `offset` is inside the mapping, which lives as long as `map`; nothing else
            // touches the mapping yet.
            unsafe { std::ptr::read_volatile(map.as_ptr().add(offset)) };
        }
        let slots_per_thread = len / PAGE_BYTES / threads;
        ensure!(slots_per_thread >= 1, "{len} bytes are too few for {threads} threads of 4 KiB slots");
        Ok(FloorFile { map, slots_per_thread, _file: file })
    }

    /// Copies one page into the next slot of `thread`'s ring and, with `persist`, msyncs it.
    fn write(&self, thread: usize, sequence: usize, data: &[u8], persist: bool) -> Result<()> {
        assert_eq!(data.len(), PAGE_BYTES, "the floor writes whole pages");
        let slot = thread * self.slots_per_thread + sequence % self.slots_per_thread;
        let offset = slot * PAGE_BYTES;
        assert!(offset + PAGE_BYTES <= self.map.len(), "slot {slot} is outside the mapping");
        // SAFETY: the page is inside the mapping (asserted above), which lives as long as `self`,
        // and only `thread` ever writes its ring, so no other copy overlaps this one.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_mut_ptr().add(offset), PAGE_BYTES);
        }
        if persist {
            self.map.flush_range(offset, PAGE_BYTES).context("msync a floor page")?;
        }
        Ok(())
    }
}

fn bench_floor(config: &Config, mode: Mode, threads: usize) -> Result<Measurement> {
    let path = case_path(config, Side::Floor, mode, threads);
    let _ = fs::remove_file(&path);
    let _cleanup = RemoveOnDrop(path.clone());
    let floor = Arc::new(FloorFile::create(&path, config.size_bytes, threads, config.preallocate)?);
    let persist = mode == Mode::Power;
    let (latencies, elapsed) = {
        let floor = Arc::clone(&floor);
        drive(config, threads, move |thread, stop| {
            let payload = payload_for(thread);
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut sequence = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                floor.write(thread, sequence, &payload, persist)?;
                latencies.push(nanos(start.elapsed()));
                sequence += 1;
            }
            Ok(latencies)
        })?
    };
    let ops = latencies.len() as u64;
    Ok(Measurement {
        mode,
        threads,
        side: Side::Floor,
        ops,
        elapsed,
        p50_ns: percentile(&latencies, 500),
        p99_ns: percentile(&latencies, 990),
        max_ns: latencies.last().copied().unwrap_or(0),
        persists: if persist { ops } else { 0 },
        full_waits: 0,
        releases: 0,
    })
}

fn find(results: &[Measurement], mode: Mode, threads: usize, side: Side) -> Option<&Measurement> {
    results.iter().find(|m| m.mode == mode && m.threads == threads && m.side == side)
}

fn results_table(results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode    | threads | side  |    ops/s |   MiB/s |   p50 us |   p99 us |    max us | msyncs | ops/msync | full waits | releases |"
    );
    let _ = writeln!(
        out,
        "|---------|--------:|-------|---------:|--------:|---------:|---------:|----------:|-------:|----------:|-----------:|---------:|"
    );
    for m in results {
        let per_msync =
            if m.persists > 0 { format!("{:.1}", m.ops as f64 / m.persists as f64) } else { "-".into() };
        let (full_waits, releases) = match m.side {
            Side::Nvlog => (m.full_waits.to_string(), m.releases.to_string()),
            Side::Floor => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            out,
            "| {:<7} | {:>7} | {:<5} | {:>8.0} | {:>7.1} | {:>8.2} | {:>8.2} | {:>9.1} | {:>6} | {:>9} | {:>10} | {:>8} |",
            m.mode.name(),
            m.threads,
            m.side.name(),
            m.ops_per_sec(),
            m.mib_per_sec(),
            micros(m.p50_ns),
            micros(m.p99_ns),
            micros(m.max_ns),
            m.persists,
            per_msync,
            full_waits,
            releases,
        );
    }
    out
}

/// nvlog / floor for p50 latency (lower is better, 1.0 is the floor) and throughput (higher is
/// better, 1.0 is the floor).
fn ratios(results: &[Measurement], mode: Mode, threads: usize) -> Option<(f64, f64)> {
    let product = find(results, mode, threads, Side::Nvlog)?;
    let floor = find(results, mode, threads, Side::Floor)?;
    let latency = product.p50_ns as f64 / floor.p50_ns.max(1) as f64;
    let throughput = product.ops_per_sec() / floor.ops_per_sec();
    Some((latency, throughput))
}

fn ratio_table(config: &Config, results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| mode    | threads | p50 latency nvlog/floor | throughput nvlog/floor |");
    let _ = writeln!(out, "|---------|--------:|------------------------:|-----------------------:|");
    for &mode in &config.modes {
        for &threads in &config.threads {
            if let Some((latency, throughput)) = ratios(results, mode, threads) {
                let _ = writeln!(
                    out,
                    "| {:<7} | {:>7} | {:>22.2}x | {:>21.2}x |",
                    mode.name(),
                    threads,
                    latency,
                    throughput
                );
            }
        }
    }
    out
}

/// Goal 2: nvlog throughput at 32 appenders over 1 appender in power mode.
fn group_commit_gain(results: &[Measurement], side: Side) -> Option<f64> {
    let one = find(results, Mode::Power, 1, side)?;
    let many = find(results, Mode::Power, 32, side)?;
    Some(many.ops_per_sec() / one.ops_per_sec())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn goals(config: &Config, results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Goals (reported, not asserted):");
    for &mode in &config.modes {
        if let Some((latency, throughput)) = ratios(results, mode, 1) {
            // Within 1.5x: p50 latency at most 1.5x the floor's, throughput at least 1/1.5 of it.
            let met = latency <= 1.5 && throughput >= 1.0 / 1.5;
            let _ = writeln!(
                out,
                "  {:<7} 1 appender within 1.5x of the floor: p50 {latency:.2}x the floor's, throughput \
                 {throughput:.2}x the floor's (needs <= 1.50x and >= 0.67x) -> {}",
                mode.name(),
                verdict(met),
            );
        }
    }
    match group_commit_gain(results, Side::Nvlog) {
        Some(gain) => {
            let floor = group_commit_gain(results, Side::Floor)
                .map_or_else(String::new, |floor| format!(" (floor: {floor:.2}x)"));
            let _ = writeln!(
                out,
                "  power   throughput 32 vs 1 appenders: {gain:.2}x{floor}, goal >= 4x -> {}",
                verdict(gain >= 4.0)
            );
        }
        None => {
            let _ =
                writeln!(out, "  power   throughput 32 vs 1 appenders: not measured (needs power, 1 and 32)");
        }
    }
    out
}

fn json_f64(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.4}"),
        _ => "null".to_string(),
    }
}

fn to_json(config: &Config, fs_name: &str, results: &[Measurement]) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\"dir\":{:?},\"file_system\":{:?},\"size_bytes\":{},\"seconds\":{},\"record_payload_bytes\":{},\
         \"cp_interval_ms\":{},\"preallocate\":{},\"cases\":[",
        config.dir.display().to_string(),
        fs_name,
        config.size_bytes,
        config.duration.as_secs_f64(),
        RECORD_PAYLOAD_BYTES,
        config.cp_interval.as_millis(),
        config.preallocate,
    );
    for (i, m) in results.iter().enumerate() {
        let _ = write!(
            out,
            "{}{{\"mode\":\"{}\",\"threads\":{},\"side\":\"{}\",\"ops\":{},\"elapsed_s\":{:.6},\
             \"ops_per_sec\":{:.1},\"p50_ns\":{},\"p99_ns\":{},\"max_ns\":{},\"msyncs\":{},\
             \"full_waits\":{},\"releases\":{}}}",
            if i == 0 { "" } else { "," },
            m.mode.name(),
            m.threads,
            m.side.name(),
            m.ops,
            m.elapsed.as_secs_f64(),
            m.ops_per_sec(),
            m.p50_ns,
            m.p99_ns,
            m.max_ns,
            m.persists,
            m.full_waits,
            m.releases,
        );
    }
    out.push_str("],\"ratios\":[");
    let mut first = true;
    for &mode in &config.modes {
        for &threads in &config.threads {
            if let Some((latency, throughput)) = ratios(results, mode, threads) {
                let _ = write!(
                    out,
                    "{}{{\"mode\":\"{}\",\"threads\":{threads},\"p50_nvlog_over_floor\":{},\
                     \"throughput_nvlog_over_floor\":{}}}",
                    if first { "" } else { "," },
                    mode.name(),
                    json_f64(Some(latency)),
                    json_f64(Some(throughput)),
                );
                first = false;
            }
        }
    }
    let _ = write!(
        out,
        "],\"power_throughput_32_over_1\":{{\"nvlog\":{},\"floor\":{}}}}}",
        json_f64(group_commit_gain(results, Side::Nvlog)),
        json_f64(group_commit_gain(results, Side::Floor)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults are what docs/performance.md says the plain command runs.
    #[test]
    fn defaults_match_the_documented_run() {
        let config = Config::from_args(Args::parse_from(["nvlog-bench"])).expect("the defaults are valid");
        assert_eq!(config.threads, [1, 4, 32]);
        assert_eq!(config.modes, [Mode::Process, Mode::Power]);
        assert_eq!(config.sides, [Side::Nvlog, Side::Floor]);
        assert_eq!(config.size_bytes, 256 << 20);
        assert_eq!(config.duration, Duration::from_secs(2));
        assert_eq!(config.dir, PathBuf::from("./bench-data"));
        assert!(!config.json && !config.preallocate);
    }

    /// Nonsense flags are refused before any file is created.
    #[test]
    fn invalid_flags_are_refused() {
        for args in [
            &["nvlog-bench", "--seconds", "0"][..],
            &["nvlog-bench", "--threads", "0"],
            &["nvlog-bench", "--size-mib", "1"],
            &["nvlog-bench", "--cp-interval-ms", "0"],
        ] {
            assert!(Config::from_args(Args::parse_from(args)).is_err(), "{args:?} was accepted");
        }
    }
}

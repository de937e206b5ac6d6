//! `resync-bench`: how fast a dropped remote plex is resynced over the inter-site link on
//! 127.0.0.1, beside a plain copy of the same bytes between two files in the same run
//! (DESIGN §6.4, §15).
//!
//! Each of `--runs` runs:
//! 1. two real `mc-controller` processes start (node 1 at site A, node 2 at site B, DR partners
//!    of each other), every inter-site connection through a `FaultProxy` in this process (as
//!    the cluster tests do); A creates an aggregate of one sparse `--disk-mib` disk per plex
//!    (plex 0 on A's shelf, plex 1 on B's, reached over `DiskService`) and a `--volume-mib`
//!    volume;
//! 2. the link is cut both ways (`Blackhole`) and `--write-mib` MiB are written at A in 1 MiB
//!    `Data.Write` calls, spread evenly over the volume, 4 outstanding: the first writes wait
//!    for `--mirror-timeout-ms`, then A drops the NVLog mirror and plex 1 (the aggregate shows
//!    `mirror degraded`) and the writes go on with A's copies, which mark the dirty bitmap;
//! 3. once a CP covers the last write (plex 0 holds every byte) and the file system is synced,
//!    the link is restored (the held connections reset, as after TCP gave up, then `Pass`), and
//!    A's status is polled every 20 ms until the aggregate is `mirrored,normal` again: A's plex
//!    monitor reattaches plex 1 (a round every 500 ms) and resyncs it from the bitmap;
//! 4. the daemons stop; the bytes copied and the daemon's own rate come from its log line
//!    `resync complete: ... N of N bytes, R bytes/s`;
//! 5. **plain copy**: the same byte ranges (1 MiB pieces at the offsets the writes used) are
//!    copied between two files in the same directory, one piece at a time, with `O_DIRECT`
//!    reads and writes (as the resync's devices do: io_uring on `O_DIRECT` files): once with
//!    one `fdatasync` at the end, once with an `fdatasync` after every 8 MiB (the resync flushes
//!    the target after every batch of 8 MiB). The destination is a new sparse file like plex 1's.
//!
//! Invariants of the measurement:
//! - the resync time runs from the restore of the link to the first status that shows the
//!   aggregate `mirrored,normal`; it includes the plex monitor's wait for its next round and the
//!   reattach, which are reported apart (restore → first status showing plex 1 resyncing);
//! - every number of one run comes from that run; the report gives each run and the medians;
//! - CPU of A, B and this process (which runs the proxies, so it carries every byte the link
//!   carries) is read from `/proc` over the resync;
//! - the daemons never outlive the benchmark (stopped at the end of every run and on error;
//!   SIGKILL if the benchmark dies), and every file lives in a fresh temporary directory under
//!   `--dir`, deleted at the end.
//!
//! Speed is reported, never asserted (DESIGN §14).

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use mc_proto::v1::admin_client::AdminClient;
use mc_proto::v1::data_client::DataClient;
use mc_proto::v1::{CreateAggregateRequest, CreateVolumeRequest, StatusReply, WriteRequest};
use mc_tests::bench::{connect, status};
use mc_tests::daemon::{
    DAEMON_DEADLINE, Daemon, clock_ticks_per_second, cpu_ticks, die_with_parent, free_port,
};
use mc_tests::proxy::{FaultProxy, Mode};
use rand::{Rng as _, SeedableRng as _};
use tonic::transport::Channel;

/// The cluster id of the daemons' configs, as the wire carries it and as the config spells it.
const CLUSTER_ID: [u8; 16] =
    [0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff];
const CLUSTER_ID_HEX: &str = "00112233445566778899aabbccddeeff";
const AGGREGATE: &str = "aggr_resync";
const VOLUME: &str = "vol_resync";
/// Bytes per `Data.Write`, and per piece of the plain copy.
const PIECE_BYTES: u64 = 1 << 20;
/// Outstanding writes while degraded.
const WRITERS: usize = 4;
/// The plain copy's second variant flushes after this many bytes, as the resync flushes its
/// target after every batch (`resync_batch_bytes`, 8 MiB without a rate limit).
const BATCH_BYTES: u64 = 8 << 20;
/// `O_DIRECT` alignment.
const ALIGN: usize = 4096;
/// How often A's status is polled while the resync runs.
const POLL: Duration = Duration::from_millis(20);
/// How long the resync may take before the benchmark gives up.
const RESYNC_DEADLINE: Duration = Duration::from_secs(600);
/// Quiet time after each syncfs.
const SETTLE: Duration = Duration::from_millis(200);
/// Lines of the daemons' logs the report needs.
const MARKS: &[&str] = &["resync complete", "resync stopped", "plex reattached", "dropped"];

#[derive(Parser, Debug)]
#[command(
    name = "resync-bench",
    about = "Resync of a dropped remote plex over loopback after a link cut, beside a plain copy \
             of the same bytes between two files"
)]
struct Args {
    /// The `mc-controller` binary (default: next to this executable).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Directory under which a temporary directory holds the NVLogs and shelves (default: the
    /// system's temporary directory). Use a disk file system.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs; the report gives each and the medians.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Size of each plex's disk (a sparse file), in MiB.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Size of the volume, in MiB.
    #[arg(long, default_value_t = 512)]
    volume_mib: u64,
    /// MiB written while plex 1 is out (1 MiB writes spread evenly over the volume).
    #[arg(long, default_value_t = 256)]
    write_mib: u64,
    /// The daemons' `mirror_timeout_ms`: how long the first writes after the cut wait.
    #[arg(long, default_value_t = 4000)]
    mirror_timeout_ms: u64,
    /// The daemons' `cp_interval_ms`.
    #[arg(long, default_value_t = 500)]
    cp_interval_ms: u64,
    /// The daemons' NVLog size in MiB.
    #[arg(long, default_value_t = 256)]
    nvlog_mib: u64,
    /// The daemons' `[resync] max_bytes_per_second` (0: unlimited).
    #[arg(long, default_value_t = 0)]
    resync_max_bytes_per_second: u64,
    /// Record a `perf` profile (`perf record -g`) of A, B and this process during each resync
    /// into this directory (it slows what it watches: not for the numbers).
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Also print the results as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    controller: PathBuf,
    dir: PathBuf,
    runs: usize,
    disk_bytes: u64,
    volume_bytes: u64,
    /// Where each 1 MiB write goes in the volume.
    pieces: Vec<u64>,
    mirror_timeout_ms: u64,
    cp_interval_ms: u64,
    nvlog_mib: u64,
    resync_max_bytes_per_second: u64,
    perf_dir: Option<PathBuf>,
    json: bool,
}

impl Config {
    fn from_args(args: Args) -> Result<Config> {
        ensure!((1..=100).contains(&args.runs), "--runs must be in 1..=100, got {}", args.runs);
        ensure!(
            (1..=args.disk_mib).contains(&args.volume_mib),
            "--volume-mib must be in 1..=--disk-mib ({}), got {}",
            args.disk_mib,
            args.volume_mib
        );
        ensure!(
            args.disk_mib - args.volume_mib >= 16,
            "--disk-mib must leave at least 16 MiB beside the volume for the aggregate's metadata"
        );
        ensure!(
            (1..=args.volume_mib).contains(&args.write_mib),
            "--write-mib must be in 1..=--volume-mib ({}), got {}",
            args.volume_mib,
            args.write_mib
        );
        ensure!(
            (1000..=60_000).contains(&args.mirror_timeout_ms),
            "--mirror-timeout-ms must be in 1000..=60000, got {}",
            args.mirror_timeout_ms
        );
        ensure!(
            (100..=60_000).contains(&args.cp_interval_ms),
            "--cp-interval-ms must be in 100..=60000, got {}",
            args.cp_interval_ms
        );
        ensure!(
            (16..=4096).contains(&args.nvlog_mib),
            "--nvlog-mib must be in 16..=4096, got {}",
            args.nvlog_mib
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
        // Evenly spread: piece i at i × stride, the stride a whole number of pieces.
        let stride = (args.volume_mib / args.write_mib) * PIECE_BYTES;
        let pieces = (0..args.write_mib).map(|i| i * stride).collect();
        Ok(Config {
            controller,
            dir: args.dir.unwrap_or_else(std::env::temp_dir),
            runs: args.runs,
            disk_bytes: args.disk_mib << 20,
            volume_bytes: args.volume_mib << 20,
            pieces,
            mirror_timeout_ms: args.mirror_timeout_ms,
            cp_interval_ms: args.cp_interval_ms,
            nvlog_mib: args.nvlog_mib,
            resync_max_bytes_per_second: args.resync_max_bytes_per_second,
            perf_dir: args.perf_dir,
            json: args.json,
        })
    }

    fn written_bytes(&self) -> u64 {
        self.pieces.len() as u64 * PIECE_BYTES
    }
}

fn main() -> Result<()> {
    let config = Config::from_args(Args::parse())?;
    run(&config)
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix("resync-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("create a temporary directory in {}", config.dir.display()))?;
    let fs_name =
        mc_tests::bench::check_disk_file_system(work.path(), "O_DIRECT and fdatasync would cost nothing")?;
    if let Some(perf_dir) = &config.perf_dir {
        fs::create_dir_all(perf_dir).with_context(|| format!("create {}", perf_dir.display()))?;
    }
    println!(
        "resync-bench: 2 nodes on 127.0.0.1 with the inter-site link through a proxy in this process, {} ({fs_name}); \
         {} MiB sparse disks, a {} MiB volume, {} MiB written in 1 MiB writes while plex 1 is out \
         (every {} MiB), mirror_timeout {} ms, cp_interval {} ms, {} MiB NVLogs, resync limit {}, {} runs",
        work.path().display(),
        config.disk_bytes >> 20,
        config.volume_bytes >> 20,
        config.written_bytes() >> 20,
        config.pieces.get(1).map_or(1, |second| second >> 20),
        config.mirror_timeout_ms,
        config.cp_interval_ms,
        config.nvlog_mib,
        match config.resync_max_bytes_per_second {
            0 => "none".to_string(),
            n => format!("{n} bytes/s"),
        },
        config.runs,
    );
    println!("controller: {}", config.controller.display());
    println!(
        "machine: {} CPUs, load average {} (this process, with the proxies, and both daemons share them)",
        thread::available_parallelism().map_or(0, std::num::NonZero::get),
        fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|_| "unknown".into()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?;
    let mut results = Vec::with_capacity(config.runs);
    for index in 0..config.runs {
        let run_dir = work.path().join(format!("run{}", index + 1));
        fs::create_dir_all(&run_dir).with_context(|| format!("create {}", run_dir.display()))?;
        println!("run {}/{}:", index + 1, config.runs);
        let result =
            run_once(config, &runtime, &run_dir, index).with_context(|| format!("run {}", index + 1))?;
        fs::remove_dir_all(&run_dir).with_context(|| format!("remove {}", run_dir.display()))?;
        results.push(result);
    }
    println!();
    print!("{}", report(config, &results));
    if config.json {
        println!("{}", to_json(config, &fs_name, &results));
    }
    Ok(())
}

/// Everything one run measured.
#[derive(Debug)]
struct RunResult {
    /// From the cut to the first status showing the aggregate `mirror degraded`.
    cut_to_degraded: Duration,
    /// From the cut to the last write's answer (the first writes waited for the drop).
    writes: Duration,
    /// From the restore of the link to the first status showing plex 1 resyncing (`None` if no
    /// poll saw it).
    restore_to_resyncing: Option<Duration>,
    /// From the restore of the link to the first status showing `mirrored,normal`.
    restore_to_normal: Duration,
    /// The daemon's `resync complete` account.
    resync: ResyncLine,
    /// How many times plex 1 was reattached after the restore (1 unless the resync was cut short).
    reattaches: usize,
    /// CPU seconds over the resync: A, B, this process (the proxies).
    cpu_s: [f64; 3],
    /// The plain copies: one `fdatasync` at the end, and one every 8 MiB.
    copy_sync_at_end: Duration,
    copy_sync_per_batch: Duration,
}

impl RunResult {
    fn resync_mib_s(&self) -> f64 {
        mib(self.resync.copied_bytes) / self.restore_to_normal.as_secs_f64()
    }

    fn daemon_mib_s(&self) -> f64 {
        mib(self.resync.rate_bytes_per_second)
    }

    fn copy_mib_s(&self, config: &Config, per_batch: bool) -> f64 {
        let time = if per_batch { self.copy_sync_per_batch } else { self.copy_sync_at_end };
        mib(config.written_bytes()) / time.as_secs_f64()
    }
}

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

fn run_once(
    config: &Config,
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    index: usize,
) -> Result<RunResult> {
    // The proxies run on the runtime's workers; the daemons are spawned from this (the main)
    // thread, which lives as long as the benchmark: their parent-death signal fires when the
    // spawning thread exits.
    let mut cluster = Cluster::start(config, runtime, dir)?;
    let measured = runtime.block_on(degrade_and_resync(config, &cluster, dir, index));
    let stopped = cluster.stop();
    let mut result = measured.map_err(|e| e.context(cluster.logs()))?;
    stopped?;
    drop(cluster);

    // The plain copy, with the cluster gone: nothing else runs.
    let (at_end, per_batch) = plain_copies(config, dir).context("copy between two files")?;
    result.copy_sync_at_end = at_end;
    result.copy_sync_per_batch = per_batch;
    println!(
        "  plain copy of the same {:.0} MiB (O_DIRECT): {:.2} s with one fdatasync at the end \
         ({:.0} MiB/s), {:.2} s with one every 8 MiB ({:.0} MiB/s)",
        mib(config.written_bytes()),
        at_end.as_secs_f64(),
        result.copy_mib_s(config, false),
        per_batch.as_secs_f64(),
        result.copy_mib_s(config, true),
    );
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// The cluster.

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

    /// The timers are those of the cluster tests' link cuts: keepalives well inside the
    /// mirror timeout (DESIGN §10.1).
    fn write_config(&self, config: &Config, partner: &NodeSpec, partner_address: &str) -> Result<()> {
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
size_mib = {nvlog_mib}
durability = "process"

[listen]
grpc = "127.0.0.1:{port}"
metrics = "127.0.0.1:0"
nbd = "127.0.0.1:0"

[timers]
mirror_timeout_ms = {timeout}
cp_interval_ms = {cp}
keepalive_interval_ms = 200
keepalive_timeout_ms = 1500
margin_ms = 1000

[resync]
max_bytes_per_second = {resync}
"#,
            id = self.id,
            site = self.site,
            dir = self.dir.display(),
            partner_id = partner.id,
            nvlog_mib = config.nvlog_mib,
            port = self.grpc_port,
            timeout = config.mirror_timeout_ms,
            cp = config.cp_interval_ms,
            resync = config.resync_max_bytes_per_second,
        );
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }
}

/// Nodes 1 (site A, the owner of the aggregate) and 2 (site B, holding its plex 1), each
/// dialling the other through a proxy: `links[0]` carries what A dials, `links[1]` what B dials.
#[derive(Debug)]
struct Cluster {
    nodes: [NodeSpec; 2],
    daemons: [Daemon; 2],
    links: [FaultProxy; 2],
}

impl Cluster {
    fn start(config: &Config, runtime: &tokio::runtime::Runtime, dir: &Path) -> Result<Cluster> {
        let spec = |id: u32, site: &'static str| -> Result<NodeSpec> {
            Ok(NodeSpec { id, site, dir: dir.join(site), grpc_port: free_port()? })
        };
        let nodes = [spec(1, "A")?, spec(2, "B")?];
        let target = |i: usize| -> Result<std::net::SocketAddr> {
            nodes[i].address().parse().context("parse a node's address")
        };
        let to_b = runtime.block_on(FaultProxy::start(target(1)?)).context("start the proxy to B")?;
        let to_a = runtime.block_on(FaultProxy::start(target(0)?)).context("start the proxy to A")?;
        nodes[0].write_config(config, &nodes[1], &to_b.address().to_string())?;
        nodes[1].write_config(config, &nodes[0], &to_a.address().to_string())?;
        // `info` for the plex monitor's lines; nothing is logged per write at that level.
        let a =
            Daemon::spawn("node 1 (A)".into(), &config.controller, &nodes[0].config_path(), "info", MARKS)?;
        let b =
            Daemon::spawn("node 2 (B)".into(), &config.controller, &nodes[1].config_path(), "info", MARKS)?;
        Ok(Cluster { nodes, daemons: [a, b], links: [to_b, to_a] })
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

    fn pid(&self, i: usize) -> Result<u32> {
        self.daemons[i].pid().with_context(|| format!("{} is not running", self.daemons[i].name()))
    }

    /// Both directions of both links.
    fn set_links(&self, mode: Mode) {
        for link in &self.links {
            link.set_both(mode);
        }
    }
}

/// Polls `admin` every `POLL` until `check` holds or `deadline` passes; returns the status and
/// when it was seen.
async fn wait_status(
    admin: &mut AdminClient<Channel>,
    what: &str,
    deadline: Duration,
    mut check: impl FnMut(&StatusReply) -> bool,
) -> Result<(StatusReply, Instant)> {
    let started = Instant::now();
    loop {
        let reply = status(admin, &CLUSTER_ID).await?;
        let seen = Instant::now();
        if check(&reply) {
            return Ok((reply, seen));
        }
        if started.elapsed() > deadline {
            bail!("{what} did not hold within {deadline:?}; last status: {}", summary(&reply));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The node and its first aggregate in a few words, for error messages.
fn summary(reply: &StatusReply) -> String {
    let aggregate = reply.aggregates.first().map_or_else(
        || "no aggregate".to_string(),
        |a| {
            let plexes: Vec<String> =
                a.plexes.iter().map(|p| format!("plex {}: {}", p.index, p.state)).collect();
            format!("aggregate {}: {} ({})", a.name, a.state, plexes.join(", "))
        },
    );
    format!("{} ({}), {aggregate}", reply.node_state, reply.state_reason)
}

fn aggregate_state(reply: &StatusReply) -> &str {
    reply.aggregates.first().map_or("", |a| a.state.as_str())
}

fn plex1_state(reply: &StatusReply) -> &str {
    reply.aggregates.first().and_then(|a| a.plexes.get(1)).map_or("", |p| p.state.as_str())
}

/// Steps 1–4 of a run, on a started cluster.
async fn degrade_and_resync(
    config: &Config,
    cluster: &Cluster,
    dir: &Path,
    index: usize,
) -> Result<RunResult> {
    let [a, b] = &cluster.nodes;
    let mut admin_a = AdminClient::new(connect(&a.address()).await?);
    let mut admin_b = AdminClient::new(connect(&b.address()).await?);
    let long = DAEMON_DEADLINE;
    wait_status(&mut admin_a, "A serving", long, |s| s.node_state == "serving").await?;
    wait_status(&mut admin_b, "B serving", long, |s| s.node_state == "serving").await?;
    wait_status(&mut admin_a, "A's DR mirror connected", long, |s| {
        s.dr_mirror.as_ref().is_some_and(|m| m.connected)
    })
    .await?;
    let created = admin_a
        .create_aggregate(CreateAggregateRequest {
            cluster_id: CLUSTER_ID.to_vec(),
            name: AGGREGATE.into(),
            plex0_disks: vec!["d0".into()],
            plex1_disks: vec!["d1".into()],
            disk_size_bytes: config.disk_bytes,
        })
        .await
        .context("Admin.CreateAggregate")?
        .into_inner();
    ensure!(created.state == "mirrored,normal", "the new aggregate is {:?}", created.state);
    ensure!(
        b.dir.join("shelf").join("d1").is_file(),
        "plex 1's disk is not on B's shelf: this bench needs a controller with remote plexes (1ff6fe2 or later)"
    );
    admin_a
        .create_volume(CreateVolumeRequest {
            cluster_id: CLUSTER_ID.to_vec(),
            aggregate: AGGREGATE.into(),
            name: VOLUME.into(),
            size_bytes: config.volume_bytes,
        })
        .await
        .context("Admin.CreateVolume")?;

    // Cut, and write while the drop happens and after it.
    cluster.set_links(Mode::Blackhole);
    let cut = Instant::now();
    let data = DataClient::new(connect(&a.address()).await?);
    let writes = tokio::spawn(write_pieces(data, config.pieces.clone(), index));
    let (_, degraded_at) = wait_status(&mut admin_a, "A's aggregate mirror degraded", long, |s| {
        aggregate_state(s) == "mirror degraded"
    })
    .await?;
    let cut_to_degraded = degraded_at - cut;
    let max_lsn = writes.await.context("join the writers")??;
    let writes = cut.elapsed();
    println!(
        "  cut both ways: A degraded after {:.2} s; {:.0} MiB written in {:.2} s from the cut",
        cut_to_degraded.as_secs_f64(),
        mib(config.written_bytes()),
        writes.as_secs_f64()
    );
    // Plex 0 holds every byte once a CP covers the last write; then nothing is left to write.
    let (covered, _) = wait_status(&mut admin_a, "a CP covering the last write", long, |s| {
        s.aggregates.first().is_some_and(|a| a.last_cp_lsn >= max_lsn)
    })
    .await?;
    ensure!(
        aggregate_state(&covered) == "mirror degraded",
        "A is no longer degraded before the link came back: {}",
        summary(&covered)
    );
    mc_tests::daemon::settle(dir, SETTLE)?;

    // Restore: the held connections die (TCP gave up), new ones pass.
    let pids = [cluster.pid(0)?, cluster.pid(1)?];
    let cpu_before = [cpu_ticks(&pids[0].to_string())?, cpu_ticks(&pids[1].to_string())?, cpu_ticks("self")?];
    let reattached_before = count_marked(&cluster.daemons[0], "plex reattached");
    let perf = match &config.perf_dir {
        Some(perf_dir) => Some(Perf::start(&perf_dir.join(format!("resync-run{}.data", index + 1)), &pids)?),
        None => None,
    };
    for link in &cluster.links {
        link.reset();
    }
    cluster.set_links(Mode::Pass);
    let restored = Instant::now();
    let mut resyncing_at = None;
    let (_, normal_at) = wait_status(&mut admin_a, "A's aggregate mirrored,normal", RESYNC_DEADLINE, |s| {
        if resyncing_at.is_none() && plex1_state(s).starts_with("resyncing") {
            resyncing_at = Some(Instant::now());
        }
        aggregate_state(s) == "mirrored,normal"
    })
    .await?;
    let cpu_after = [cpu_ticks(&pids[0].to_string())?, cpu_ticks(&pids[1].to_string())?, cpu_ticks("self")?];
    if let Some(perf) = perf {
        perf.stop()?;
    }
    let restore_to_normal = normal_at - restored;
    let restore_to_resyncing = resyncing_at.map(|at| at - restored);

    // The daemon logs its account just after the state changes.
    let line = {
        let started = Instant::now();
        loop {
            if let Some(line) =
                cluster.daemons[0].marked_lines().iter().rev().find(|l| l.contains("resync complete"))
            {
                break line.clone();
            }
            ensure!(started.elapsed() < Duration::from_secs(10), "A never logged `resync complete`");
            tokio::time::sleep(POLL).await;
        }
    };
    let resync = ResyncLine::parse(&line).with_context(|| format!("parse A's log line {line:?}"))?;
    let reattaches = count_marked(&cluster.daemons[0], "plex reattached") - reattached_before;
    let per_tick_s = 1.0 / clock_ticks_per_second()?;
    let cpu_s = [0, 1, 2].map(|i| (cpu_after[i] - cpu_before[i]) as f64 * per_tick_s);
    let result = RunResult {
        cut_to_degraded,
        writes,
        restore_to_resyncing,
        restore_to_normal,
        resync,
        reattaches,
        cpu_s,
        copy_sync_at_end: Duration::ZERO,
        copy_sync_per_batch: Duration::ZERO,
    };
    println!(
        "  link restored: plex 1 resyncing after {}, mirrored,normal after {:.2} s: {} copied {:.1} MiB \
         ({:.0} MiB/s from the restore; the daemon's own rate {:.0} MiB/s); CPU s A {:.2}, B {:.2}, \
         this process (proxies) {:.2}; {} reattach",
        restore_to_resyncing
            .map_or_else(|| "(never seen)".to_string(), |d| format!("{:.2} s", d.as_secs_f64())),
        restore_to_normal.as_secs_f64(),
        result.resync.level,
        mib(result.resync.copied_bytes),
        result.resync_mib_s(),
        result.daemon_mib_s(),
        cpu_s[0],
        cpu_s[1],
        cpu_s[2],
        reattaches,
    );
    Ok(result)
}

fn count_marked(daemon: &Daemon, what: &str) -> usize {
    daemon.marked_lines().iter().filter(|line| line.contains(what)).count()
}

/// Writes a 1 MiB piece at every offset of `pieces`, `WRITERS` at a time; returns the highest
/// lsn a write returned.
async fn write_pieces(data: DataClient<Channel>, pieces: Vec<u64>, run: usize) -> Result<u64> {
    let pieces = Arc::new(pieces);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(WRITERS);
    for writer in 0..WRITERS {
        let (mut data, pieces, next) = (data.clone(), Arc::clone(&pieces), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64((run * WRITERS + writer) as u64);
            let mut payload = vec![0u8; usize::try_from(PIECE_BYTES).context("a piece's size")?];
            rng.fill(&mut payload[..]);
            let mut max_lsn = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&offset) = pieces.get(usize::try_from(i).unwrap_or(usize::MAX)) else {
                    return Ok::<u64, anyhow::Error>(max_lsn);
                };
                // Different bytes in every block of every write.
                for block in payload.chunks_mut(4096) {
                    block[..8].copy_from_slice(&(offset ^ i).to_le_bytes());
                }
                let reply = data
                    .write(WriteRequest {
                        cluster_id: CLUSTER_ID.to_vec(),
                        volume: VOLUME.into(),
                        offset,
                        data: payload.clone(),
                    })
                    .await
                    .with_context(|| format!("Data.Write of 1 MiB at {offset}"))?
                    .into_inner();
                max_lsn = max_lsn.max(reply.last_lsn);
            }
        }));
    }
    let mut max_lsn = 0;
    for task in tasks {
        max_lsn = max_lsn.max(task.await.context("join a writer")??);
    }
    Ok(max_lsn)
}

/// The fields of A's `resync complete` line (`plex::ResyncProgress` displayed).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResyncLine {
    level: String,
    copied_bytes: u64,
    total_bytes: u64,
    rate_bytes_per_second: u64,
}

impl ResyncLine {
    /// Parses `... progress=<level> resync plexS -> plexT: P%, C of T bytes, R bytes/s ...`.
    fn parse(line: &str) -> Option<ResyncLine> {
        let line = strip_ansi(line);
        let rest = &line[line.find("progress=")? + "progress=".len()..];
        let level = rest.split_whitespace().next()?.to_string();
        let rest = &rest[rest.find("%, ")? + 3..];
        let mut words = rest.split_whitespace();
        let copied_bytes = words.next()?.parse().ok()?;
        (words.next()? == "of").then_some(())?;
        let total_bytes = words.next()?.parse().ok()?;
        (words.next()? == "bytes,").then_some(())?;
        let rate_bytes_per_second = words.next()?.parse().ok()?;
        words.next()?.starts_with("bytes/s").then_some(())?;
        Some(ResyncLine { level, copied_bytes, total_bytes, rate_bytes_per_second })
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `perf record` attached to some processes until stopped.
#[derive(Debug)]
struct Perf {
    child: Child,
}

impl Perf {
    fn start(output: &Path, pids: &[u32; 2]) -> Result<Perf> {
        let list = format!("{},{},{}", pids[0], pids[1], std::process::id());
        let mut command = Command::new("perf");
        command
            .args(["record", "-g", "-F", "999", "-o"])
            .arg(output)
            .args(["-p", &list])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut command);
        let child = command.spawn().context("start perf record")?;
        // perf needs a moment to attach; the resync must not start before.
        thread::sleep(Duration::from_millis(500));
        Ok(Perf { child })
    }

    fn stop(mut self) -> Result<()> {
        let pid = i32::try_from(self.child.id()).context("perf's pid")?;
        // SAFETY: signalling our own child, not yet reaped.
        if unsafe { libc::kill(pid, libc::SIGINT) } != 0 {
            return Err(std::io::Error::last_os_error()).context("send SIGINT to perf");
        }
        // Its exit status after SIGINT says nothing useful; the recorded file is what counts.
        self.child.wait().context("wait for perf")?;
        Ok(())
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// The plain copy.

/// A buffer of `len` bytes aligned for `O_DIRECT`, inside a larger vector.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Aligned { raw, start, len }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}

/// Copies the written pieces from a source file holding them to a new sparse file, twice (two
/// new destinations): one `fdatasync` at the end, then one every `BATCH_BYTES`. Returns both
/// times.
fn plain_copies(config: &Config, dir: &Path) -> Result<(Duration, Duration)> {
    let source = dir.join("copy-source");
    {
        // The source as plex 0 holds the data: written and durable before the copy starts.
        let file = File::create(&source).with_context(|| format!("create {}", source.display()))?;
        file.set_len(config.volume_bytes).context("size the copy's source")?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut payload = vec![0u8; usize::try_from(PIECE_BYTES).context("a piece's size")?];
        for &offset in &config.pieces {
            rng.fill(&mut payload[..]);
            file.write_all_at(&payload, offset).context("fill the copy's source")?;
        }
        file.sync_all().context("sync the copy's source")?;
    }
    let mut times = [Duration::ZERO; 2];
    for (variant, time) in times.iter_mut().enumerate() {
        let target = dir.join(format!("copy-target-{variant}"));
        {
            let file = File::create(&target).with_context(|| format!("create {}", target.display()))?;
            file.set_len(config.disk_bytes).context("size the copy's target")?;
        }
        mc_tests::daemon::settle(dir, SETTLE)?;
        let flush_every = if variant == 0 { None } else { Some(BATCH_BYTES) };
        *time = copy_pieces(&source, &target, &config.pieces, flush_every)?;
        fs::remove_file(&target).with_context(|| format!("remove {}", target.display()))?;
    }
    fs::remove_file(&source).with_context(|| format!("remove {}", source.display()))?;
    Ok((times[0], times[1]))
}

/// One piece at a time: an `O_DIRECT` read of the source, an `O_DIRECT` write of the target at
/// the same offset; `fdatasync` of the target every `flush_every` bytes and at the end.
fn copy_pieces(source: &Path, target: &Path, pieces: &[u64], flush_every: Option<u64>) -> Result<Duration> {
    let open = |path: &Path, write: bool| {
        OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .with_context(|| format!("open {} with O_DIRECT", path.display()))
    };
    let (from, to) = (open(source, false)?, open(target, true)?);
    let mut buf = Aligned::new(usize::try_from(PIECE_BYTES).context("a piece's size")?);
    let started = Instant::now();
    let mut unflushed = 0u64;
    for &offset in pieces {
        from.read_exact_at(buf.as_mut_slice(), offset)
            .with_context(|| format!("read the source at {offset}"))?;
        to.write_all_at(buf.as_slice(), offset).with_context(|| format!("write the target at {offset}"))?;
        unflushed += PIECE_BYTES;
        if flush_every.is_some_and(|every| unflushed >= every) {
            to.sync_data().context("fdatasync the target")?;
            unflushed = 0;
        }
    }
    to.sync_data().context("fdatasync the target")?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Reports.

/// The median of `values` (the mean of the middle two for an even count); 0 for none.
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    mc_tests::bench::median(&values.into_iter().collect::<Vec<_>>()).unwrap_or(0.0)
}

fn report(config: &Config, results: &[RunResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| run | cut → degraded s | writes s | restore → resyncing s | restore → normal s | level | copied MiB | \
         resync MiB/s (from the restore) | daemon's copy MiB/s | CPU s A / B / proxies | plain copy MiB/s \
         (1 fdatasync) | plain copy MiB/s (fdatasync per 8 MiB) | resync / plain | daemon's / plain |"
    );
    let _ = writeln!(out, "|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (i, r) in results.iter().enumerate() {
        let plain = r.copy_mib_s(config, false);
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.2} | {} | {:.2} | {} | {:.1} | {:.0} | {:.0} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} | {:.2}x | {:.2}x |",
            i + 1,
            r.cut_to_degraded.as_secs_f64(),
            r.writes.as_secs_f64(),
            r.restore_to_resyncing.map_or_else(|| "-".to_string(), |d| format!("{:.2}", d.as_secs_f64())),
            r.restore_to_normal.as_secs_f64(),
            r.resync.level,
            mib(r.resync.copied_bytes),
            r.resync_mib_s(),
            r.daemon_mib_s(),
            r.cpu_s[0],
            r.cpu_s[1],
            r.cpu_s[2],
            plain,
            r.copy_mib_s(config, true),
            r.resync_mib_s() / plain,
            r.daemon_mib_s() / plain,
        );
    }
    let med = |f: &dyn Fn(&RunResult) -> f64| median(results.iter().map(f));
    let _ = writeln!(
        out,
        "| median | {:.2} | {:.2} | {:.2} | {:.2} | | {:.1} | {:.0} | {:.0} | {:.2} / {:.2} / {:.2} | {:.0} | {:.0} | {:.2}x | {:.2}x |",
        med(&|r| r.cut_to_degraded.as_secs_f64()),
        med(&|r| r.writes.as_secs_f64()),
        median(results.iter().filter_map(|r| r.restore_to_resyncing).map(|d| d.as_secs_f64())),
        med(&|r| r.restore_to_normal.as_secs_f64()),
        med(&|r| mib(r.resync.copied_bytes)),
        med(&|r| r.resync_mib_s()),
        med(&|r| r.daemon_mib_s()),
        med(&|r| r.cpu_s[0]),
        med(&|r| r.cpu_s[1]),
        med(&|r| r.cpu_s[2]),
        med(&|r| r.copy_mib_s(config, false)),
        med(&|r| r.copy_mib_s(config, true)),
        med(&|r| r.resync_mib_s() / r.copy_mib_s(config, false)),
        med(&|r| r.daemon_mib_s() / r.copy_mib_s(config, false)),
    );
    let unexpected: Vec<String> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.reattaches != 1 || r.resync.copied_bytes != config.written_bytes())
        .map(|(i, r)| {
            format!(
                "run {}: {} reattaches, {} bytes copied of {} written",
                i + 1,
                r.reattaches,
                r.resync.copied_bytes,
                config.written_bytes()
            )
        })
        .collect();
    if !unexpected.is_empty() {
        let _ = writeln!(
            out,
            "\nnote (expected: one reattach, the written bytes copied): {}",
            unexpected.join("; ")
        );
    }
    out
}

fn to_json(config: &Config, fs_name: &str, results: &[RunResult]) -> String {
    let runs: Vec<serde_json::Value> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "cut_to_degraded_s": r.cut_to_degraded.as_secs_f64(),
                "writes_s": r.writes.as_secs_f64(),
                "restore_to_resyncing_s": r.restore_to_resyncing.map(|d| d.as_secs_f64()),
                "restore_to_normal_s": r.restore_to_normal.as_secs_f64(),
                "level": r.resync.level,
                "copied_bytes": r.resync.copied_bytes,
                "total_bytes": r.resync.total_bytes,
                "daemon_rate_bytes_per_second": r.resync.rate_bytes_per_second,
                "reattaches": r.reattaches,
                "cpu_s": {"a": r.cpu_s[0], "b": r.cpu_s[1], "bench_and_proxies": r.cpu_s[2]},
                "resync_mib_s": r.resync_mib_s(),
                "plain_copy_sync_at_end_s": r.copy_sync_at_end.as_secs_f64(),
                "plain_copy_sync_per_batch_s": r.copy_sync_per_batch.as_secs_f64(),
                "resync_over_plain_copy": r.resync_mib_s() / r.copy_mib_s(config, false),
            })
        })
        .collect();
    serde_json::json!({
        "file_system": fs_name,
        "disk_bytes": config.disk_bytes,
        "volume_bytes": config.volume_bytes,
        "written_bytes": config.written_bytes(),
        "mirror_timeout_ms": config.mirror_timeout_ms,
        "cp_interval_ms": config.cp_interval_ms,
        "resync_max_bytes_per_second": config.resync_max_bytes_per_second,
        "runs": runs,
        "median_resync_over_plain_copy": median(results.iter().map(|r| r.resync_mib_s() / r.copy_mib_s(config, false))),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's line as `tracing_subscriber::fmt` writes it, with and without colours.
    #[test]
    fn the_resync_line_parses() {
        let line = "2025-01-01T00:00:00.000000Z  INFO controller::plex_monitor: resync complete: plex normal \
                    aggregate=00ff plex=1 progress=incremental resync plex0 -> plex1: 100%, 268435456 of 268435456 \
                    bytes, 52428800 bytes/s";
        let expected = ResyncLine {
            level: "incremental".into(),
            copied_bytes: 268_435_456,
            total_bytes: 268_435_456,
            rate_bytes_per_second: 52_428_800,
        };
        assert_eq!(ResyncLine::parse(line), Some(expected.clone()));
        let coloured = line.replace("progress=", "\u{1b}[3mprogress\u{1b}[0m\u{1b}[2m=\u{1b}[0m");
        assert_eq!(ResyncLine::parse(&coloured), Some(expected));
        assert_eq!(ResyncLine::parse("resync complete: plex normal"), None);
    }

    /// Nonsense flags are refused before any daemon starts.
    #[test]
    fn invalid_flags_are_refused() {
        let exe = std::env::current_exe().expect("the test binary has a path");
        let exe = exe.to_str().expect("the path is UTF-8");
        for args in [
            &["resync-bench", "--controller", exe, "--runs", "0"][..],
            &["resync-bench", "--controller", exe, "--volume-mib", "2048"],
            &["resync-bench", "--controller", exe, "--write-mib", "1024"],
            &["resync-bench", "--controller", exe, "--mirror-timeout-ms", "10"],
            &["resync-bench", "--controller", "/nonexistent/mc-controller"],
        ] {
            assert!(Config::from_args(Args::parse_from(args)).is_err(), "{args:?} was accepted");
        }
        let config =
            Config::from_args(Args::parse_from(["resync-bench", "--controller", exe])).expect("defaults");
        assert_eq!(config.pieces.len(), 256);
        assert_eq!(config.pieces[1], 2 << 20);
        assert!(config.pieces.last().is_some_and(|&last| last + PIECE_BYTES <= config.volume_bytes));
    }
}

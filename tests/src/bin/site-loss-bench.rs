//! `site-loss-bench`: how long a lost site's volumes stay unserved when the mediator switches them
//! over by itself (DESIGN §10 rule 2, §15; run through `tests/bench-site-loss`, results in
//! `docs/performance.md`): from the `kill -9` of site A to the first block of `vol_a` read at site
//! B over NBD, with no operator.
//!
//! One run is one fresh lab with its mediator (`mcctl lab up --detach`, small volumes and NVLog,
//! the timers of the profile), in this order, with one monotonic clock:
//! - `--writes` 4 KiB writes at QD1 to `vol_a` at A over NBD (so B holds NVLog records to replay);
//! - wait until the mediator has heard both controllers and records every aggregate in sync
//!   (`mcctl mediator show --lab DIR -o json`, polled every 100 ms): from then on an automatic
//!   switchover is possible;
//! - **baseline**: spawn `mcctl node show --endpoint B --cluster-id ID -o json` (read-only) and
//!   wait for it, then connect to B's NBD address, `NBD_OPT_GO` on `vol_b` and read its first
//!   block: the tool's process start, one RPC and one NBD connection, both sites up;
//! - a random pause, uniform in [0, heartbeat interval) (untimed): a disaster strikes at any
//!   point of the heartbeat cycle, and the grant waits for the survivor's next heartbeat, so a
//!   fixed sequence of steps would always hit the same phase and measure one point of the range;
//! - **site loss**: spawn `mcctl lab kill --site A --dir DIR` (SIGKILL of A's controller; it returns
//!   once the process is gone) and wait for it, then connect to B's NBD address, `NBD_OPT_GO` on
//!   `vol_a`, retried every `RETRY_PAUSE` while B refuses it, and read its first block. Nobody
//!   asks for the switchover: the mediator grants it once A's lease has surely lapsed (lease +
//!   margin after A was last heard, on a heartbeat of B), and B runs it.
//!
//! Profiles (`--profiles`): `scaled` is the scaled profile of DESIGN §10.1 (keepalive 0.2 s /
//! 0.6 s, heartbeat 0.2 s, lease 2 s, margin 0.5 s, mirror_timeout and AUSO window 5 s);
//! `default` is the product's defaults (keepalive 1 s / 3 s, heartbeat 1 s, lease 10 s, margin
//! 1 s, mirror_timeout and AUSO window 30 s), the lab's when no timer is given.
//!
//! Invariants of the measurement:
//! - a run counts only if the block read at B is the one last written at A, B's switchover
//!   operation is `successful`, and the mediator's last decision is the automatic switchover of
//!   site A (all checked after the clock stopped); anything else is an error, never a sample;
//! - the clock starts when `mcctl lab kill` is spawned, before the SIGKILL (so the figure
//!   includes the kill command's own few milliseconds: it errs long, never short);
//! - the theoretical minimum is lease + margin: the grant needs a report of B sent that long after
//!   A was last heard, and A was heard at most a heartbeat or keepalive interval before the kill;
//!   every ratio divides a median or p99 by it;
//! - no process outlives a run: each lab is brought down with `mcctl lab down` at the end of the
//!   run and on every error path (a guard does it on drop), and the pids `lab.json` lists get
//!   SIGKILL if they are still `mc-controller` or `mc-mediator` processes after that;
//! - every file lives in a fresh temporary directory under `--dir` (a disk file system, not
//!   tmpfs), deleted at the end of its run.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::{Parser, ValueEnum};
use mc_tests::bench::{check_disk_file_system, median};
use mc_tests::lab_bench::{Lab, NbdClient};

/// The MetroCluster Tiebreaker's documented detection time of a site disaster, in seconds
/// (NetApp, "How different disaster types affect Tiebreaker software detection time": within 30
/// s of the disaster, including a default silent time of 5 s).
const TIEBREAKER_DETECTION_SECS: f64 = 30.0;
/// The ONTAP Mediator's default mailbox timeout, in seconds (NetApp, "Increase the default ONTAP
/// Mediator mailbox timeout in MetroCluster IP configurations": 10 s including a retry after 5 s,
/// up to 60 s).
const MEDIATOR_MAILBOX_TIMEOUT_SECS: f64 = 10.0;
/// The NBD block this benchmark writes and reads.
const BLOCK_BYTES: u64 = 4096;
/// How long the mediator may take to record the aggregates in sync after `lab up`.
const IN_SYNC_DEADLINE: Duration = Duration::from_secs(120);
/// How often the mediator's view is polled while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long `vol_a` may stay unserved at B after the kill before the run fails (the default
/// profile's lease + margin is 11 s; its AUSO window 30 s).
const SERVE_DEADLINE: Duration = Duration::from_secs(120);
/// Pause between refused NBD connections while waiting for the export: the figure's resolution,
/// and few enough connections not to load B while it decides.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// How long B's switchover operation may stay `in_progress` after `vol_a` was served (it is
/// closed after the export).
const OPERATION_DEADLINE: Duration = Duration::from_secs(30);

/// A timer profile of DESIGN §10.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Profile {
    /// The scaled test profile: keepalive 0.2 s / 0.6 s, heartbeat 0.2 s, lease 2 s, margin
    /// 0.5 s, mirror_timeout and AUSO window 5 s.
    Scaled,
    /// The product's defaults: keepalive 1 s / 3 s, heartbeat 1 s, lease 10 s, margin 1 s,
    /// mirror_timeout and AUSO window 30 s.
    Default,
}

/// The timers of a profile that the figures are compared with, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Timers {
    heartbeat_ms: u64,
    lease_ms: u64,
    margin_ms: u64,
    keepalive_interval_ms: u64,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Scaled => "scaled",
            Profile::Default => "default",
        }
    }

    /// The options of `mcctl lab up` that select the profile (none for the defaults).
    fn lab_args(self) -> &'static [&'static str] {
        match self {
            Profile::Scaled => &[
                "--mirror-timeout-ms",
                "5000",
                "--keepalive-interval-ms",
                "200",
                "--keepalive-timeout-ms",
                "600",
                "--margin-ms",
                "500",
                "--heartbeat-ms",
                "200",
                "--lease-ms",
                "2000",
                "--auso-window-ms",
                "5000",
            ],
            Profile::Default => &[],
        }
    }

    fn timers(self) -> Timers {
        match self {
            Profile::Scaled => {
                Timers { heartbeat_ms: 200, lease_ms: 2000, margin_ms: 500, keepalive_interval_ms: 200 }
            }
            Profile::Default => {
                Timers { heartbeat_ms: 1000, lease_ms: 10_000, margin_ms: 1000, keepalive_interval_ms: 1000 }
            }
        }
    }

    fn begin_marker(self) -> String {
        format!("<!-- site-loss-bench:{}:begin -->", self.name())
    }

    fn end_marker(self) -> String {
        format!("<!-- site-loss-bench:{}:end -->", self.name())
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "site-loss-bench",
    about = "Times, on fresh labs with their mediator, the kill -9 of site A to the first block of \
             vol_a read at site B over NBD (the mediator's automatic switchover, no operator), against \
             a read-only command plus an NBD read, per timer profile; writes the tables into \
             docs/performance.md"
)]
struct Args {
    /// Runs per profile, each on a fresh lab.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The timer profiles to run, in this order (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Profile::Scaled, Profile::Default])]
    profiles: Vec<Profile>,
    /// 4 KiB writes at QD1 to vol_a at site A before the kill (blocks 0, 1, 2, ...).
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// Each lab volume's size in MiB.
    #[arg(long, default_value_t = 64)]
    volume_size_mib: u64,
    /// Each controller's NVLog size in MiB.
    #[arg(long, default_value_t = 32)]
    nvlog_size_mib: u64,
    /// Directory under which each run's lab lives in a temporary directory (a disk file system;
    /// tmpfs is refused).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// The `mcctl` binary (default: next to this executable, where `mc-controller` and
    /// `mc-mediator` are too).
    #[arg(long)]
    mcctl: Option<PathBuf>,
    /// The file whose marked sections get the results (default: the workspace's
    /// docs/performance.md).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Print the results only; leave docs/performance.md alone.
    #[arg(long)]
    no_write_docs: bool,
}

/// The validated configuration.
#[derive(Debug)]
struct Config {
    runs: usize,
    profiles: Vec<Profile>,
    writes: u64,
    /// The arguments of `mcctl lab up` after `--dir DIR`, before the profile's.
    lab_args: Vec<String>,
    dir: PathBuf,
    mcctl: PathBuf,
    /// `None` with `--no-write-docs`.
    docs: Option<PathBuf>,
    /// How the benchmark was invoked, for the report.
    command: String,
}

impl Config {
    fn from_args(args: Args, command: String) -> Result<Config> {
        ensure!((1..=1000).contains(&args.runs), "--runs must be in 1..=1000, got {}", args.runs);
        ensure!(!args.profiles.is_empty(), "--profiles names no profile");
        let profiles = args.profiles;
        let mut distinct: Vec<&str> = profiles.iter().map(|p| p.name()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        ensure!(distinct.len() == profiles.len(), "--profiles names a profile twice");
        ensure!((1..=65536).contains(&args.volume_size_mib), "--volume-size-mib must be in 1..=65536");
        ensure!((16..=4096).contains(&args.nvlog_size_mib), "--nvlog-size-mib must be in 16..=4096");
        let volume_blocks = args.volume_size_mib * (1 << 20) / BLOCK_BYTES;
        ensure!(
            (1..=volume_blocks).contains(&args.writes),
            "--writes must be in 1..={volume_blocks} (one write per block of the volume), got {}",
            args.writes
        );
        let mcctl = match args.mcctl {
            Some(path) => path,
            None => std::env::current_exe().context("find this executable")?.with_file_name("mcctl"),
        };
        ensure!(
            mcctl.is_file(),
            "{} is not a file: build it with `cargo build --release -p controller -p mediator` or pass \
             --mcctl",
            mcctl.display()
        );
        let mediator = mcctl.with_file_name("mc-mediator");
        ensure!(
            mediator.is_file() || std::env::var_os("MC_MEDIATOR_BIN").is_some(),
            "no mc-mediator next to {} (the lab starts it): build it with `cargo build --release -p \
             mediator`",
            mcctl.display()
        );
        let lab_args = vec![
            "--detach".to_string(),
            "-o".to_string(),
            "json".to_string(),
            "--volume-size-mib".to_string(),
            args.volume_size_mib.to_string(),
            "--nvlog-size-mib".to_string(),
            args.nvlog_size_mib.to_string(),
        ];
        let docs = if args.no_write_docs { None } else { Some(args.docs.unwrap_or_else(default_docs_path)) };
        Ok(Config {
            runs: args.runs,
            profiles,
            writes: args.writes,
            lab_args,
            dir: args.dir,
            mcctl,
            docs,
            command,
        })
    }

    /// `mcctl lab up` after `--dir DIR` for `profile`.
    fn lab_args(&self, profile: Profile) -> Vec<String> {
        let mut args = self.lab_args.clone();
        args.extend(profile.lab_args().iter().map(|arg| (*arg).to_string()));
        args
    }
}

/// `docs/performance.md` of the workspace this binary was built from.
fn default_docs_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).join("docs").join("performance.md")
}

/// The command line as the user typed it: `tests/bench-site-loss` sets `SITE_LOSS_BENCH_COMMAND`
/// to its own name.
fn invoked_command() -> String {
    let program = std::env::var("SITE_LOSS_BENCH_COMMAND").unwrap_or_else(|_| "site-loss-bench".to_string());
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

/// What one run measured.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    /// Spawning `mcctl lab kill` to the first block of `vol_a` read at B.
    served: Duration,
    /// Spawning `mcctl lab kill` to its exit (A's process gone).
    kill_command: Duration,
    /// B's switchover operation: its start after the kill was spawned, and its end − start (the
    /// nodes' wall clock, ms resolution); `None` if the clock went backwards.
    operation_start_ms: Option<u64>,
    operation_ms: u64,
    /// NBD connections to `vol_a` at B that were refused before it was served.
    refused: u32,
    /// The random pause before the kill (the phase in the heartbeat cycle).
    pause: Duration,
    /// Spawning `mcctl node show` to the first block of `vol_b` read at B, both sites up.
    baseline: Duration,
    /// `lab up` returned → the mediator recorded both aggregates in sync.
    in_sync_wait: Duration,
    /// The writes before the kill.
    writes_took: Duration,
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let fs_name = check_disk_file_system(&config.dir, "the lab's NVLog and plexes would not touch a disk")?;
    let machine = machine_line(&fs_name);
    let profiles: Vec<&str> = config.profiles.iter().map(|p| p.name()).collect();
    println!("site-loss-bench: {} run(s) per profile ({}); {machine}", config.runs, profiles.join(", "));
    for &profile in &config.profiles {
        let started = Instant::now();
        let mut samples = Vec::new();
        for index in 0..config.runs {
            let sample = run_once(config, profile, index)
                .with_context(|| format!("profile {}, run {}", profile.name(), index + 1))?;
            println!("{}: {}", profile.name(), sample_line(index, &sample));
            samples.push(sample);
        }
        let table = results_table(profile, &samples);
        println!("\nprofile {} ({:.0} s):\n", profile.name(), started.elapsed().as_secs_f64());
        print!("{table}");
        if let Some(docs) = &config.docs {
            let section = docs_section(config, profile, &machine, &table, &samples);
            write_section(docs, profile, &section)?;
            println!("\nwrote the {} results into {}", profile.name(), docs.display());
        }
    }
    Ok(())
}

/// One run: a fresh lab, the writes, the mediator's in-sync record, the baseline, the kill and
/// the wait for `vol_a` at B.
fn run_once(config: &Config, profile: Profile, index: usize) -> Result<Sample> {
    let temp = tempfile::Builder::new()
        .prefix("site-loss-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("create a temporary directory under {}", config.dir.display()))?;
    let lab_dir = temp.path().join("lab");
    let dir = path_str(&lab_dir)?.to_string();
    // The guard exists before `lab up` runs, so a lab that fails half-way is brought down too.
    let mut lab = Lab {
        bench: "site-loss-bench",
        mcctl: config.mcctl.clone(),
        dir: lab_dir.clone(),
        pids: Vec::new(),
        up: true,
    };
    let lab_args = config.lab_args(profile);
    let mut up_args = vec!["lab", "up", "--dir", &dir];
    up_args.extend(lab_args.iter().map(String::as_str));
    let stdout = mcctl_ok(&config.mcctl, &up_args)?;
    let answer = parse_lab_up(&stdout).context("read the answer of mcctl lab up")?;
    lab.pids.clone_from(&answer.pids);

    // Blocks 0..writes of vol_a, each with a content of its own run and block.
    let started = Instant::now();
    let mut host = NbdClient::connect(&answer.nbd_a, "vol_a").context("connect to vol_a at A")?;
    for block in 0..config.writes {
        host.write(block * BLOCK_BYTES, &pattern(index, block))
            .with_context(|| format!("write block {block} of vol_a at A"))?;
    }
    let writes_took = started.elapsed();
    drop(host);

    let started = Instant::now();
    wait_mediator_in_sync(&config.mcctl, &dir).context("wait for the mediator's in-sync record")?;
    let in_sync_wait = started.elapsed();

    // Baseline: a read-only command to B, then an NBD connection and read, both sites up.
    let started = Instant::now();
    mcctl_ok(
        &config.mcctl,
        &["node", "show", "--endpoint", &answer.admin_b, "--cluster-id", &answer.cluster_id, "-o", "json"],
    )
    .context("baseline: node show at B")?;
    let block = NbdClient::connect(&answer.nbd_b, "vol_b")
        .context("baseline: connect to vol_b at B")?
        .read_first_block()
        .context("baseline: read vol_b at B")?;
    let baseline = started.elapsed();
    ensure!(block.len() == 4096, "baseline: read {} bytes of vol_b", block.len());

    // A disaster at a random point of the heartbeat cycle.
    let pause = Duration::from_millis(rand::random_range(0..profile.timers().heartbeat_ms));
    thread::sleep(pause);

    // The site loss, then vol_a at B.
    let killed_at_ms = unix_ms();
    let started = Instant::now();
    mcctl_ok(&config.mcctl, &["lab", "kill", "--site", "A", "--dir", &dir, "-o", "json"])
        .context("kill site A")?;
    let kill_command = started.elapsed();
    let (mut client, refused) = connect_within(&answer.nbd_b, "vol_a", started + SERVE_DEADLINE)
        .with_context(|| mediator_view(&config.mcctl, &dir))?;
    let block = client.read_first_block().context("read vol_a at B")?;
    let served = started.elapsed();
    drop(client);

    // Checks, outside the timed window.
    ensure!(block == pattern(index, 0), "block 0 of vol_a at B is not the one last written at A");
    let view = mediator_show(&config.mcctl, &dir)?;
    let decision = view["last_decision"].as_str().unwrap_or_default();
    ensure!(
        decision.starts_with("automatic switchover of site A"),
        "the mediator's last decision is not the automatic switchover of site A: {decision:?}"
    );
    let operation = switchover_operation(&config.mcctl, &dir)?;
    lab.down()?;
    Ok(Sample {
        served,
        kill_command,
        operation_start_ms: operation.start_unix_ms.checked_sub(killed_at_ms),
        operation_ms: operation.duration_ms,
        refused,
        pause,
        baseline,
        in_sync_wait,
        writes_took,
    })
}

/// Milliseconds since the Unix epoch (the clock of the operation records).
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0))
}

/// `mcctl mediator show --lab DIR -o json`.
fn mediator_show(mcctl: &Path, dir: &str) -> Result<serde_json::Value> {
    let stdout = mcctl_ok(mcctl, &["mediator", "show", "--lab", dir, "-o", "json"])?;
    serde_json::from_str(&stdout).context("parse the answer of mcctl mediator show")
}

/// The mediator's view in words, for an error.
fn mediator_view(mcctl: &Path, dir: &str) -> String {
    match mediator_show(mcctl, dir) {
        Ok(view) => format!("the mediator's view: {view}"),
        Err(error) => format!("the mediator does not answer: {error:#}"),
    }
}

/// Whether the mediator's view (`mediator show -o json`) has heard both controllers and records
/// at least two aggregates, all in sync.
fn in_sync(view: &serde_json::Value) -> bool {
    let heard = view["nodes"].as_array().is_some_and(|nodes| {
        [1, 2].iter().all(|id| nodes.iter().any(|n| n["node"] == *id && n["heard"] == true))
    });
    let aggregates = view["aggregates"].as_array();
    let synced =
        aggregates.is_some_and(|a| a.len() >= 2 && a.iter().all(|aggregate| aggregate["in_sync"] == true));
    heard && synced
}

/// Polls the mediator until `in_sync`, or `IN_SYNC_DEADLINE`.
fn wait_mediator_in_sync(mcctl: &Path, dir: &str) -> Result<()> {
    let deadline = Instant::now() + IN_SYNC_DEADLINE;
    loop {
        let last = match mediator_show(mcctl, dir) {
            Ok(view) if in_sync(&view) => return Ok(()),
            Ok(view) => view.to_string(),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() > deadline {
            bail!("not in sync after {} s: {last}", IN_SYNC_DEADLINE.as_secs());
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// B's switchover operation as `operation show` reports it.
#[derive(Debug, PartialEq, Eq)]
struct Operation {
    start_unix_ms: u64,
    duration_ms: u64,
}

/// B's switchover from `mcctl operation show --lab DIR -o json` (A does not answer: exit 1, the
/// JSON still printed), once it is no longer `in_progress` (B closes it after the export), within
/// `OPERATION_DEADLINE`.
fn switchover_operation(mcctl: &Path, dir: &str) -> Result<Operation> {
    let deadline = Instant::now() + OPERATION_DEADLINE;
    loop {
        let output = Command::new(mcctl)
            .args(["operation", "show", "--lab", dir, "-o", "json"])
            .stdin(Stdio::null())
            .output()
            .context("run mcctl operation show")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        match parse_operation(&stdout) {
            Ok(Some(operation)) => return Ok(operation),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL_INTERVAL),
            Ok(None) => bail!(
                "B's switchover is still in progress after {} s: {stdout}",
                OPERATION_DEADLINE.as_secs()
            ),
            Err(error) => {
                return Err(error.context(format!(
                    "read B's switchover from mcctl operation show: {}",
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
        }
    }
}

/// Node 2's last `switchover` operation in `operation show -o json`: `None` while it is in
/// progress; an error if it ended otherwise than successful.
fn parse_operation(stdout: &str) -> Result<Option<Operation>> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    let operations = json["operations"].as_array().ok_or_else(|| anyhow!("no operations"))?;
    let operation = operations
        .iter()
        .rev()
        .find(|o| o["node"] == 2 && o["kind"] == "switchover")
        .ok_or_else(|| anyhow!("node 2 ran no switchover: {stdout}"))?;
    let state = operation["state"].as_str().unwrap_or_default();
    if state == "in_progress" {
        return Ok(None);
    }
    ensure!(state == "successful", "B's switchover ended {state:?}: {stdout}");
    let start = operation["start_unix_ms"].as_u64().ok_or_else(|| anyhow!("no start_unix_ms"))?;
    let end = operation["end_unix_ms"].as_u64().ok_or_else(|| anyhow!("no end_unix_ms"))?;
    ensure!(end >= start, "the operation ended ({end}) before it started ({start})");
    Ok(Some(Operation { start_unix_ms: start, duration_ms: end - start }))
}

/// The path as UTF-8, for a command line.
fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

/// Runs `mcctl ARGS`, which must exit 0; its stdout.
fn mcctl_ok(mcctl: &Path, args: &[&str]) -> Result<String> {
    let output = Command::new(mcctl)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {} {}", mcctl.display(), args.join(" ")))?;
    ensure!(
        output.status.success(),
        "mcctl {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).with_context(|| format!("read the output of mcctl {}", args.join(" ")))
}

/// The content of `block` in run `run`: both numbers, repeated.
fn pattern(run: usize, block: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    while out.len() < 4096 {
        out.extend_from_slice(&(run as u64).to_le_bytes());
        out.extend_from_slice(&block.to_le_bytes());
    }
    out
}

/// Connects to `export` at `address`, retrying while the connection or the export is refused
/// (B does not serve the volume yet) until `deadline`; the client and the number of refusals.
fn connect_within(address: &str, export: &str, deadline: Instant) -> Result<(NbdClient, u32)> {
    let mut refused = 0u32;
    loop {
        match NbdClient::connect(address, export) {
            Ok(client) => return Ok((client, refused)),
            Err(_) if Instant::now() < deadline => {
                refused += 1;
                thread::sleep(RETRY_PAUSE);
            }
            Err(error) => {
                return Err(
                    error.context(format!("{export} at {address} still not served after {refused} tries"))
                );
            }
        }
    }
}

/// What the benchmark takes from `mcctl lab up -o json`.
#[derive(Debug, PartialEq, Eq)]
struct LabUp {
    cluster_id: String,
    nbd_a: String,
    nbd_b: String,
    admin_b: String,
    /// The controllers' pids, then the mediator's.
    pids: Vec<u32>,
}

fn parse_lab_up(stdout: &str) -> Result<LabUp> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    let cluster_id = json["cluster_id"].as_str().ok_or_else(|| anyhow!("no cluster_id"))?.to_string();
    let controllers = json["controllers"].as_array().ok_or_else(|| anyhow!("no controllers"))?;
    let site = |name: &str| {
        controllers
            .iter()
            .find(|c| c["site"].as_str() == Some(name))
            .ok_or_else(|| anyhow!("no controller at site {name}"))
    };
    let field = |controller: &serde_json::Value, key: &str| {
        controller[key].as_str().map(str::to_string).ok_or_else(|| anyhow!("a controller without {key}"))
    };
    let (a, b) = (site("A")?, site("B")?);
    let pid = |value: &serde_json::Value| {
        value["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok()).ok_or_else(|| anyhow!("bad pid"))
    };
    let mut pids = controllers.iter().map(pid).collect::<Result<Vec<u32>>>()?;
    ensure!(json["mediator"].is_object(), "the lab has no mediator (made with --no-mediator?)");
    pids.push(pid(&json["mediator"]).context("the mediator")?);
    Ok(LabUp {
        cluster_id,
        nbd_a: field(a, "nbd")?,
        nbd_b: field(b, "nbd")?,
        admin_b: field(b, "admin")?,
        pids,
    })
}

// ---------------------------------------------------------------------------------------------
// The report

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One line per run, as it ends.
fn sample_line(index: usize, sample: &Sample) -> String {
    let start = sample.operation_start_ms.map_or_else(|| "?".to_string(), |ms| ms.to_string());
    format!(
        "run {}: vol_a served at B {:.1} ms after the kill (kill command {:.1} ms; B's switchover started \
         {start} ms after it and took {} ms; {} refused connection(s)), baseline {:.1} ms; in sync at the \
         mediator {:.1} ms after lab up; writes before the kill {:.1} ms; pause before the kill {} ms",
        index + 1,
        ms(sample.served),
        ms(sample.kill_command),
        sample.operation_ms,
        sample.refused,
        ms(sample.baseline),
        ms(sample.in_sync_wait),
        ms(sample.writes_took),
        sample.pause.as_millis(),
    )
}

/// Nearest-rank percentile (`per_cent` of 100) of `values`; `None` for none.
fn percentile(values: &[f64], per_cent: usize) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (sorted.len() * per_cent).div_ceil(100).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

/// Median, p99, min and max.
fn stats(values: &[f64]) -> Option<(f64, f64, f64, f64)> {
    let median = median(values)?;
    let p99 = percentile(values, 99)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median, p99, min, max))
}

fn cell(value: Option<f64>, format: impl Fn(f64) -> String) -> String {
    value.map_or_else(|| "—".to_string(), format)
}

/// The results of one profile: a table of median, p99, min, max, and the ratios.
fn results_table(profile: Profile, samples: &[Sample]) -> String {
    let timers = profile.timers();
    #[allow(clippy::cast_precision_loss)]
    let minimum_ms = (timers.lease_ms + timers.margin_ms) as f64;
    #[allow(clippy::cast_precision_loss)]
    let rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "**site loss → vol_a served at B**: `lab kill --site A` spawned → first block of vol_a read at B",
            samples.iter().map(|s| ms(s.served)).collect(),
        ),
        (
            "… of which `lab kill` (spawn → exit, A's process gone)",
            samples.iter().map(|s| ms(s.kill_command)).collect(),
        ),
        (
            "… B's switchover operation started, after the kill was spawned (wall clock, ms)",
            samples.iter().filter_map(|s| s.operation_start_ms).map(|v| v as f64).collect(),
        ),
        (
            "… B's switchover operation (record's end − start, ms)",
            samples.iter().map(|s| s.operation_ms as f64).collect(),
        ),
        (
            "**baseline**: `node show` spawned → first block of vol_b read at B (both sites up)",
            samples.iter().map(|s| ms(s.baseline)).collect(),
        ),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} run(s), profile `{}`, ms | median | p99 | min | max |\n|---|---:|---:|---:|---:|",
        samples.len(),
        profile.name()
    );
    for (label, values) in &rows {
        let stats = stats(values);
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} |",
            cell(stats.map(|s| s.0), |v| format!("{v:.1}")),
            cell(stats.map(|s| s.1), |v| format!("{v:.1}")),
            cell(stats.map(|s| s.2), |v| format!("{v:.1}")),
            cell(stats.map(|s| s.3), |v| format!("{v:.1}")),
        );
    }
    let served = stats(&rows[0].1);
    let baseline = stats(&rows[4].1);
    out.push('\n');
    let _ = writeln!(
        out,
        "- Timers: heartbeat {} ms, lease {} ms, margin {} ms, keepalive interval {} ms; theoretical minimum \
         lease + margin = **{minimum_ms:.0} ms** (the grant waits that long after A was last heard, which is at \
         most a heartbeat or keepalive interval before the kill, then for B's next heartbeat)",
        timers.heartbeat_ms, timers.lease_ms, timers.margin_ms, timers.keepalive_interval_ms
    );
    let _ = writeln!(
        out,
        "- Ratio to lease + margin: median **{}**, p99 **{}**",
        cell(served.map(|s| s.0 / minimum_ms), |v| format!("{v:.2}×")),
        cell(served.map(|s| s.1 / minimum_ms), |v| format!("{v:.2}×")),
    );
    let _ = writeln!(
        out,
        "- Above lease + margin (median): {} ms; ratio to the baseline (medians): {}",
        cell(served.map(|s| s.0 - minimum_ms), |v| format!("{v:.0}")),
        cell(served.and_then(|s| baseline.filter(|b| b.0 > 0.0).map(|b| s.0 / b.0)), |v| format!("{v:.1}×")),
    );
    let _ = writeln!(
        out,
        "- ONTAP's documented figures, beside ours (median {}, p99 {}): the MetroCluster Tiebreaker detects a \
         site disaster within {TIEBREAKER_DETECTION_SECS:.0} s (detection only; the switchover follows); the \
         ONTAP Mediator's mailbox timeout is {MEDIATOR_MAILBOX_TIMEOUT_SECS:.0} s by default (up to 60 s)",
        cell(served.map(|s| s.0), |v| format!("{:.2} s", v / 1000.0)),
        cell(served.map(|s| s.1), |v| format!("{:.2} s", v / 1000.0)),
    );
    out
}

/// One line per run for the record.
fn raw_listing(samples: &[Sample]) -> String {
    samples.iter().enumerate().map(|(index, sample)| sample_line(index, sample) + "\n").collect()
}

/// CPUs, kernel, file system and load: what the numbers depend on.
fn machine_line(fs_name: &str) -> String {
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string());
    let load = fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string());
    format!(
        "nproc {} ({cpu_model}), Linux {kernel}, {fs_name} under --dir, load average {load} at the start",
        thread::available_parallelism().map_or(0, std::num::NonZero::get)
    )
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

/// The section of `docs/performance.md` for `profile`, markers included.
fn docs_section(config: &Config, profile: Profile, machine: &str, table: &str, samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", profile.begin_marker());
    let _ = writeln!(
        out,
        "Written by `tests/bench-site-loss` (`tests/src/bin/site-loss-bench.rs`, profile `{}`); the next run of\n\
         this profile replaces everything between its markers.\n\n#### Profile `{}`: last run\n",
        profile.name(),
        profile.name()
    );
    let _ = writeln!(out, "- Date: {}", today());
    let _ = writeln!(out, "- Command: `{}`", config.command);
    let _ = writeln!(
        out,
        "- Lab: `mcctl lab up --dir DIR {}`; {} write(s) of 4 KiB at QD1 to vol_a at A before the kill",
        config.lab_args(profile).join(" "),
        config.writes
    );
    let _ = writeln!(out, "- Machine: {machine}");
    out.push('\n');
    out.push_str(table);
    let _ = writeln!(out, "\n#### Profile `{}`: every run\n\n```text", profile.name());
    out.push_str(&raw_listing(samples));
    out.push_str("```\n");
    let _ = writeln!(out, "{}", profile.end_marker());
    out
}

/// `existing` with the marked section of `profile` replaced by `section`, or `section` appended at
/// the end if there is none. Everything outside the markers stays as it was.
fn splice_section(existing: &str, profile: Profile, section: &str) -> Result<String> {
    let (begin_marker, end_marker) = (profile.begin_marker(), profile.end_marker());
    match (existing.find(&begin_marker), existing.find(&end_marker)) {
        (Some(begin), Some(end)) if begin < end => {
            let mut end = end + end_marker.len();
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
        _ => bail!("the markers {begin_marker} and {end_marker} are not one pair in this order"),
    }
}

/// Replaces the marked section of `profile` in `path` (write a temporary file, fsync, rename).
fn write_section(path: &Path, profile: Profile, section: &str) -> Result<()> {
    let existing = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let text =
        splice_section(&existing, profile, section).with_context(|| format!("update {}", path.display()))?;
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

    /// The lab's answer gives the addresses and every pid the guard may have to kill, the
    /// mediator's included; a lab without a mediator is refused (nothing would switch it over).
    #[test]
    fn lab_up_answer_gives_addresses_and_pids() {
        let stdout = r#"{"cluster_id":"2105f3","controllers":[
            {"node":1,"site":"A","admin":"127.0.0.1:5000","nbd":"127.0.0.1:4000","pid":123},
            {"node":2,"site":"B","admin":"127.0.0.1:5001","nbd":"127.0.0.1:4001","pid":456}],
            "mediator":{"grpc":"127.0.0.1:7000","pid":789}}"#;
        let answer = parse_lab_up(stdout).expect("parses");
        assert_eq!(
            answer,
            LabUp {
                cluster_id: "2105f3".into(),
                nbd_a: "127.0.0.1:4000".into(),
                nbd_b: "127.0.0.1:4001".into(),
                admin_b: "127.0.0.1:5001".into(),
                pids: vec![123, 456, 789],
            }
        );
        let mut without: serde_json::Value = serde_json::from_str(stdout).expect("JSON");
        without.as_object_mut().expect("an object").remove("mediator");
        assert!(parse_lab_up(&without.to_string()).is_err());
        assert!(parse_lab_up(r#"{"cluster_id":"x","controllers":[]}"#).is_err());
    }

    /// Only B's successful switchover counts (one in progress is waited for); a failed one, or none,
    /// is an error.
    #[test]
    fn operation_answer_is_checked() {
        let ok = r#"{"operations":[{"node":1,"kind":"switchover","state":"failed","start_unix_ms":1,"end_unix_ms":2},
            {"node":2,"kind":"switchover","state":"successful","start_unix_ms":1000,"end_unix_ms":1046}],
            "unreachable":["node 1"]}"#;
        assert_eq!(
            parse_operation(ok).expect("parses"),
            Some(Operation { start_unix_ms: 1000, duration_ms: 46 })
        );
        assert_eq!(parse_operation(&ok.replace("\"successful\"", "\"in_progress\"")).expect("parses"), None);
        assert!(parse_operation(&ok.replace("\"successful\"", "\"failed\"")).is_err());
        assert!(parse_operation(&ok.replace("\"node\":2", "\"node\":3")).is_err());
        assert!(parse_operation(&ok.replace("1046", "999")).is_err());
        assert!(parse_operation("{}").is_err());
    }

    /// The mediator is in sync only when it heard both controllers and holds at least two
    /// aggregates, all in sync.
    #[test]
    fn in_sync_needs_both_nodes_and_every_aggregate() {
        let view: serde_json::Value = serde_json::from_str(
            r#"{"nodes":[{"node":1,"heard":true},{"node":2,"heard":true}],
                "aggregates":[{"in_sync":true},{"in_sync":true}]}"#,
        )
        .expect("JSON");
        assert!(in_sync(&view));
        let mut one = view.clone();
        one["aggregates"][1]["in_sync"] = false.into();
        assert!(!in_sync(&one));
        let mut unheard = view.clone();
        unheard["nodes"][0]["heard"] = false.into();
        assert!(!in_sync(&unheard));
        let mut few = view;
        few["aggregates"] = serde_json::json!([{"in_sync": true}]);
        assert!(!in_sync(&few));
    }

    fn sample(served_ms: u64, baseline_ms: u64) -> Sample {
        Sample {
            served: Duration::from_millis(served_ms),
            kill_command: Duration::from_millis(5),
            operation_start_ms: Some(served_ms - 60),
            operation_ms: 40,
            refused: 250,
            pause: Duration::from_millis(120),
            baseline: Duration::from_millis(baseline_ms),
            in_sync_wait: Duration::from_millis(900),
            writes_took: Duration::from_millis(300),
        }
    }

    /// The table has median, p99 (nearest rank: the largest of fewer than 100 runs), min and max,
    /// the ratio to lease + margin, and ONTAP's figures.
    #[test]
    fn table_has_median_p99_and_ratios() {
        let samples: Vec<Sample> = (0..10).map(|i| sample(2600 + 10 * i, 4)).collect();
        let table = results_table(Profile::Scaled, &samples);
        let has = |line: &str| assert!(table.contains(line), "no {line:?} in\n{table}");
        has("read at B | 2645.0 | 2690.0 | 2600.0 | 2690.0 |");
        has("lease + margin = **2500 ms**");
        has("- Ratio to lease + margin: median **1.06×**, p99 **1.08×**");
        has("within 30 s");
        has("mailbox timeout is 10 s");
        has("(median 2.65 s, p99 2.69 s)");
        let default = results_table(Profile::Default, &[sample(11_500, 5)]);
        assert!(default.contains("lease + margin = **11000 ms**"), "{default}");
        assert!(results_table(Profile::Scaled, &[]).contains("| — | — | — | — |"));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50), Some(2.0));
        assert_eq!(percentile(&[], 99), None);
    }

    /// Each profile's section replaces only what lies between its markers, or goes at the end;
    /// the other profile's section stays.
    #[test]
    fn docs_sections_are_spliced_per_profile() {
        let scaled = format!("{}\nnew\n{}\n", Profile::Scaled.begin_marker(), Profile::Scaled.end_marker());
        let default =
            format!("{}\nold\n{}\n", Profile::Default.begin_marker(), Profile::Default.end_marker());
        let appended = splice_section(&format!("# Performance\n\n{default}"), Profile::Scaled, &scaled)
            .expect("appends");
        assert_eq!(appended, format!("# Performance\n\n{default}\n{scaled}"));
        let old = format!(
            "head\n{}\nold\n{}\ntail\n",
            Profile::Scaled.begin_marker(),
            Profile::Scaled.end_marker()
        );
        assert_eq!(
            splice_section(&old, Profile::Scaled, &scaled).expect("replaces"),
            format!("head\n{scaled}tail\n")
        );
        let swapped = format!("{} {}", Profile::Scaled.end_marker(), Profile::Scaled.begin_marker());
        assert!(splice_section(&swapped, Profile::Scaled, &scaled).is_err());
    }

    /// Nonsense flags are refused before any lab starts.
    #[test]
    fn flags() {
        let config = |args: &[&str]| Config::from_args(Args::parse_from(args), String::new());
        for args in [
            &["site-loss-bench", "--runs", "0"][..],
            &["site-loss-bench", "--writes", "0"],
            &["site-loss-bench", "--volume-size-mib", "1", "--writes", "257"],
            &["site-loss-bench", "--mcctl", "/nonexistent/mcctl"],
            &["site-loss-bench", "--nvlog-size-mib", "8"],
            &["site-loss-bench", "--profiles", "scaled,default,scaled"],
        ] {
            assert!(config(args).is_err(), "{args:?} was accepted");
        }
        assert!(Args::try_parse_from(["site-loss-bench", "--profiles", "fast"]).is_err());
        let args = Args::parse_from(["site-loss-bench"]);
        assert_eq!(args.profiles, [Profile::Scaled, Profile::Default]);
        assert_eq!(args.runs, 10);
        assert_eq!(pattern(1, 2).len(), 4096);
        assert_ne!(pattern(1, 2), pattern(2, 1));
    }
}

//! `switchover-bench`: how long a forced switchover takes, from the command to the first block
//! of the lost site's volume served at the survivor (DESIGN §15, issue 8; run through
//! `tests/bench-switchover`, results in `docs/performance.md`).
//!
//! One run: a fresh two-site lab (`mcctl lab up`, small volumes and NVLog, the lab's default
//! timers unless flags say otherwise); `--writes` 4 KiB writes at QD1 to `vol_a` at site A over
//! NBD, so B holds NVLog records to replay; `mcctl lab kill --site A`; then, both timed with the
//! same monotonic clock and in this order:
//! - **baseline**: spawn `mcctl node show --endpoint B --cluster-id ID -o json` (read-only, no
//!   switchover work) and wait for it, then connect to B's NBD address, `NBD_OPT_GO` on `vol_b`
//!   and read its first block: the tool's process start, one RPC and one NBD connection;
//! - **switchover**: spawn `mcctl switchover --forced-on-disaster --confirm --site B --lab DIR -o
//!   json` and wait for it, then connect to B's NBD address, `NBD_OPT_GO` on `vol_a` (retried
//!   while B refuses it, within a deadline) and read its first block.
//!
//! Invariants of the measurement:
//! - the switchover counts only if the command exits 0, its operation record says `successful`
//!   and lists `vol_a`, and the first block read back is the one written before the kill (the
//!   replay is checked, outside the timed window);
//! - the reported values are medians over the runs, with min and max; the ratio is the ratio of
//!   the two medians. The goal (< 2 s) and NetApp's documented example (≈ 9 s) are reported,
//!   never asserted (DESIGN §14);
//! - no controller outlives a run: the lab is brought down with `mcctl lab down` at the end of
//!   every run and on every error path (a guard does it on drop), and the pids `lab.json` lists
//!   get SIGKILL if they are still `mc-controller` processes after that;
//! - every file lives in a fresh temporary directory under `--dir` (a disk file system, not
//!   tmpfs), deleted at the end of its run.

use mc_tests::bench::{check_disk_file_system, median};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use clap::Parser;

/// Marks the section of `docs/performance.md` this benchmark owns.
const BEGIN_MARKER: &str = "<!-- switchover-bench:begin -->";
const END_MARKER: &str = "<!-- switchover-bench:end -->";
/// NetApp's documented example of a forced switchover (per issue 8), in seconds.
const NETAPP_EXAMPLE_SECS: f64 = 9.0;
/// Issue 8's goal for the lab, in seconds.
const GOAL_SECS: f64 = 2.0;
/// The NBD block this benchmark writes and reads.
const BLOCK_BYTES: u64 = 4096;
/// How long the NBD connection to a switched-over volume may be refused before the run fails.
const SERVE_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between refused NBD connections while waiting for the export.
const RETRY_PAUSE: Duration = Duration::from_millis(1);
/// The socket timeout of the NBD client.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "switchover-bench",
    about = "Times a forced switchover of the lab, from the command to the first block of vol_a read at \
             site B, against a read-only command plus the same NBD read; writes the table into \
             docs/performance.md"
)]
struct Args {
    /// Runs, each on a fresh lab.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// 4 KiB writes at QD1 to vol_a at site A before the kill (blocks 0, 1, 2, ...).
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// Each lab volume's size in MiB.
    #[arg(long, default_value_t = 64)]
    volume_size_mib: u64,
    /// Each controller's NVLog size in MiB.
    #[arg(long, default_value_t = 32)]
    nvlog_size_mib: u64,
    /// Passed to `mcctl lab up` (default: the lab's).
    #[arg(long)]
    mirror_timeout_ms: Option<u64>,
    /// Passed to `mcctl lab up` (default: the lab's).
    #[arg(long)]
    cp_interval_ms: Option<u64>,
    /// Passed to `mcctl lab up` (default: the lab's).
    #[arg(long)]
    keepalive_interval_ms: Option<u64>,
    /// Passed to `mcctl lab up` (default: the lab's).
    #[arg(long)]
    keepalive_timeout_ms: Option<u64>,
    /// Directory under which each run's lab lives in a temporary directory (a disk file system;
    /// tmpfs is refused).
    #[arg(long, default_value = "./bench-data")]
    dir: PathBuf,
    /// The `mcctl` binary (default: next to this executable, where `mc-controller` is too).
    #[arg(long)]
    mcctl: Option<PathBuf>,
    /// The file whose marked section gets the results (default: the workspace's
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
    writes: u64,
    /// The arguments of `mcctl lab up` after `--dir DIR`.
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
        ensure!((1..=100).contains(&args.runs), "--runs must be in 1..=100, got {}", args.runs);
        ensure!((1..=65536).contains(&args.volume_size_mib), "--volume-size-mib must be in 1..=65536");
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
            "{} is not a file: build it with `cargo build --release -p controller` or pass --mcctl",
            mcctl.display()
        );
        let mut lab_args = vec![
            "--detach".to_string(),
            "-o".to_string(),
            "json".to_string(),
            "--volume-size-mib".to_string(),
            args.volume_size_mib.to_string(),
            "--nvlog-size-mib".to_string(),
            args.nvlog_size_mib.to_string(),
        ];
        for (flag, value) in [
            ("--mirror-timeout-ms", args.mirror_timeout_ms),
            ("--cp-interval-ms", args.cp_interval_ms),
            ("--keepalive-interval-ms", args.keepalive_interval_ms),
            ("--keepalive-timeout-ms", args.keepalive_timeout_ms),
        ] {
            if let Some(value) = value {
                lab_args.extend([flag.to_string(), value.to_string()]);
            }
        }
        let docs = if args.no_write_docs { None } else { Some(args.docs.unwrap_or_else(default_docs_path)) };
        Ok(Config { runs: args.runs, writes: args.writes, lab_args, dir: args.dir, mcctl, docs, command })
    }
}

/// `docs/performance.md` of the workspace this binary was built from.
fn default_docs_path() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).join("docs").join("performance.md")
}

/// The command line as the user typed it: `tests/bench-switchover` sets
/// `SWITCHOVER_BENCH_COMMAND` to its own name.
fn invoked_command() -> String {
    let program =
        std::env::var("SWITCHOVER_BENCH_COMMAND").unwrap_or_else(|_| "switchover-bench".to_string());
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
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// Spawning `mcctl switchover` to the first block of `vol_a` read at B.
    switchover: Duration,
    /// Spawning `mcctl switchover` to its exit.
    command: Duration,
    /// The operation record's `end_unix_ms - start_unix_ms` (B's wall clock).
    operation_ms: u64,
    /// NBD connections to B that were refused before `vol_a` was served.
    refused: u32,
    /// Spawning `mcctl node show` to the first block of `vol_b` read at B.
    baseline: Duration,
    /// The writes before the kill.
    writes_took: Duration,
}

fn run(config: &Config) -> Result<()> {
    fs::create_dir_all(&config.dir).with_context(|| format!("create {}", config.dir.display()))?;
    let fs_name = check_disk_file_system(&config.dir, "the lab's NVLog and plexes would not touch a disk")?;
    let machine = machine_line(&fs_name);
    println!("switchover-bench: {} run(s); {machine}", config.runs);
    let mut samples = Vec::new();
    for index in 0..config.runs {
        let sample = run_once(config, index).with_context(|| format!("run {}", index + 1))?;
        println!("{}", sample_line(index, &sample));
        samples.push(sample);
    }
    let table = results_table(&samples);
    println!();
    print!("{table}");
    if let Some(docs) = &config.docs {
        let section = docs_section(config, &machine, &table, &samples);
        write_section(docs, &section)?;
        println!("\nwrote the results into {}", docs.display());
    }
    Ok(())
}

/// One lab, one kill, one baseline, one switchover.
fn run_once(config: &Config, index: usize) -> Result<Sample> {
    let temp = tempfile::Builder::new()
        .prefix("switchover-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("create a temporary directory under {}", config.dir.display()))?;
    let lab_dir = temp.path().join("lab");
    // The guard exists before `lab up` runs, so a lab that fails half-way is brought down too.
    let mut lab = Lab { mcctl: config.mcctl.clone(), dir: lab_dir.clone(), pids: Vec::new(), up: true };
    let mut up_args = vec!["lab", "up", "--dir", path_str(&lab_dir)?];
    up_args.extend(config.lab_args.iter().map(String::as_str));
    let stdout = mcctl_json(&config.mcctl, &up_args)?;
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

    mcctl_json(&config.mcctl, &["lab", "kill", "--site", "A", "--dir", path_str(&lab_dir)?, "-o", "json"])
        .context("kill site A")?;

    // Baseline: a read-only command to B alone, then the same NBD connection and read.
    let started = Instant::now();
    mcctl_json(
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

    // The switchover.
    let started = Instant::now();
    let stdout = mcctl_json(
        &config.mcctl,
        &[
            "switchover",
            "--forced-on-disaster",
            "--confirm",
            "--site",
            "B",
            "--lab",
            path_str(&lab_dir)?,
            "-o",
            "json",
        ],
    )
    .context("forced switchover to B")?;
    let command = started.elapsed();
    let (mut client, refused) = connect_within(&answer.nbd_b, "vol_a", started + SERVE_DEADLINE)?;
    let block = client.read_first_block().context("read vol_a at B")?;
    let switchover = started.elapsed();

    let operation = parse_switchover(&stdout).context("read the answer of mcctl switchover")?;
    ensure!(
        block == pattern(index, 0),
        "block 0 of vol_a at B after the switchover is not the block written at A before the kill"
    );
    lab.down()?;
    Ok(Sample { switchover, command, operation_ms: operation.duration_ms, refused, baseline, writes_took })
}

/// The path as UTF-8, for a command line.
fn path_str(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

/// Runs `mcctl ARGS`, which must exit 0; its stdout.
fn mcctl_json(mcctl: &Path, args: &[&str]) -> Result<String> {
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
/// (B may not serve the volume yet) until `deadline`; the client and the number of refusals.
fn connect_within(address: &str, export: &str, deadline: Instant) -> Result<(NbdClient, u32)> {
    let mut refused = 0u32;
    loop {
        match NbdClient::connect(address, export) {
            Ok(client) => return Ok((client, refused)),
            Err(error) if Instant::now() < deadline => {
                refused += 1;
                if refused == 1 {
                    eprintln!("switchover-bench: {export} at {address} not served yet ({error:#}); retrying");
                }
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

// ---------------------------------------------------------------------------------------------
// A blocking NBD client: fixed newstyle, NBD_OPT_GO, simple replies (as controller/tests/host).

const NBD_MAGIC: &[u8; 8] = b"NBDMAGIC";
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
/// Fixed newstyle, no zeroes.
const CLIENT_FLAGS: u32 = 3;

/// One NBD connection to one export.
#[derive(Debug)]
struct NbdClient {
    stream: TcpStream,
    cookie: u64,
}

impl NbdClient {
    /// Connects to `address` and negotiates `export` with `NBD_OPT_GO`.
    fn connect(address: &str, export: &str) -> Result<NbdClient> {
        let mut stream = TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).context("set the read timeout")?;
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).context("read the NBD greeting")?;
        ensure!(&greeting[..8] == NBD_MAGIC, "{address} is not an NBD server");
        let name_len = u32::try_from(export.len()).context("export name length")?;
        let mut option = Vec::new();
        option.extend_from_slice(&CLIENT_FLAGS.to_be_bytes());
        option.extend_from_slice(&IHAVEOPT.to_be_bytes());
        option.extend_from_slice(&OPT_GO.to_be_bytes());
        // The name's length, the name, and zero information requests.
        option.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
        option.extend_from_slice(&name_len.to_be_bytes());
        option.extend_from_slice(export.as_bytes());
        option.extend_from_slice(&0u16.to_be_bytes());
        stream.write_all(&option).context("send NBD_OPT_GO")?;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header).context("read an option reply")?;
            ensure!(be64(&header[..8]) == OPTION_REPLY_MAGIC, "bad option reply magic from {address}");
            let kind = be32(&header[12..16]);
            let mut data = vec![0u8; be32(&header[16..20]) as usize];
            stream.read_exact(&mut data).context("read an option reply's data")?;
            match kind {
                REP_INFO => {}
                REP_ACK => return Ok(NbdClient { stream, cookie: 0 }),
                other => bail!(
                    "{address} refused export {export}: reply type {other:#x}: {}",
                    String::from_utf8_lossy(&data)
                ),
            }
        }
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let mut out = Vec::with_capacity(28 + payload.len());
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(payload);
        self.stream.write_all(&out).context("send an NBD request")?;
        Ok(self.cookie)
    }

    fn reply(&mut self, cookie: u64, data_len: usize) -> Result<Vec<u8>> {
        let mut header = [0u8; 16];
        self.stream.read_exact(&mut header).context("read an NBD reply")?;
        ensure!(be32(&header[..4]) == SIMPLE_REPLY_MAGIC, "bad NBD reply magic");
        ensure!(be64(&header[8..16]) == cookie, "an NBD reply to another request");
        let error = be32(&header[4..8]);
        ensure!(error == 0, "NBD error {error}");
        let mut data = vec![0u8; data_len];
        self.stream.read_exact(&mut data).context("read an NBD reply's data")?;
        Ok(data)
    }

    /// Writes `data` at `offset`; `Ok` once the server acknowledged it.
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let length = u32::try_from(data.len()).context("write length")?;
        let cookie = self.request(CMD_WRITE, offset, length, data)?;
        self.reply(cookie, 0).map(|_| ())
    }

    /// Reads the export's first 4 KiB.
    fn read_first_block(&mut self) -> Result<Vec<u8>> {
        let cookie = self.request(CMD_READ, 0, 4096, &[])?;
        self.reply(cookie, 4096)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        // Best effort: the server may be gone.
        let _ = self.request(CMD_DISC, 0, 0, &[]);
    }
}

fn be32(bytes: &[u8]) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(word)
}

fn be64(bytes: &[u8]) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(word)
}

// ---------------------------------------------------------------------------------------------
// The lab

/// The two-site lab of `mcctl lab up`; `mcctl lab down` when stopped or dropped, then SIGKILL to
/// every controller it listed that is still running.
#[derive(Debug)]
struct Lab {
    mcctl: PathBuf,
    dir: PathBuf,
    /// The controllers' pids, from `lab up`'s answer.
    pids: Vec<u32>,
    up: bool,
}

impl Lab {
    /// `mcctl lab down --dir DIR`, then SIGKILL to leftover controllers; an error if either was
    /// needed and failed, or if a controller was left over.
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
        // lab.json lists the controllers even when `lab up` failed before answering.
        let mut pids = self.pids.clone();
        pids.extend(pids_in_lab_json(&self.dir));
        pids.sort_unstable();
        pids.dedup();
        let killed = kill_controllers(&pids);
        match output {
            Ok(output) if output.status.success() => {
                ensure!(killed.is_empty(), "mcctl lab down left the controllers {killed:?}: killed them");
                Ok(())
            }
            Ok(output) => Err(anyhow!(
                "mcctl lab down --dir {} failed ({}): {}{}; killed the controllers {killed:?}",
                self.dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )),
            Err(error) => Err(error.context(format!("killed the controllers {killed:?}"))),
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Best effort on the error path; the normal path calls `down` and reports.
        if let Err(error) = self.down() {
            eprintln!("switchover-bench: {error:#}");
        }
    }
}

/// The controllers' pids in `DIR/lab.json`; none if it cannot be read.
fn pids_in_lab_json(dir: &Path) -> Vec<u32> {
    let Ok(text) = fs::read_to_string(dir.join("lab.json")) else { return Vec::new() };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
    json["controllers"]
        .as_array()
        .map(|controllers| {
            controllers
                .iter()
                .filter_map(|c| c["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok()))
                .collect()
        })
        .unwrap_or_default()
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

/// What the benchmark takes from `mcctl lab up -o json`.
#[derive(Debug, PartialEq, Eq)]
struct LabUp {
    cluster_id: String,
    nbd_a: String,
    nbd_b: String,
    admin_b: String,
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
    let pids = controllers
        .iter()
        .map(|c| c["pid"].as_u64().and_then(|pid| u32::try_from(pid).ok()).ok_or_else(|| anyhow!("bad pid")))
        .collect::<Result<Vec<u32>>>()?;
    Ok(LabUp {
        cluster_id,
        nbd_a: field(a, "nbd")?,
        nbd_b: field(b, "nbd")?,
        admin_b: field(b, "admin")?,
        pids,
    })
}

/// What the benchmark takes from `mcctl switchover -o json`.
#[derive(Debug, PartialEq, Eq)]
struct Switchover {
    duration_ms: u64,
}

/// The switchover's duration on B; an error unless it succeeded and took over `vol_a`.
fn parse_switchover(stdout: &str) -> Result<Switchover> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    let operation = &json["operation"];
    let state = operation["state"].as_str().ok_or_else(|| anyhow!("no operation.state"))?;
    ensure!(state == "successful", "the switchover ended {state}: {stdout}");
    let volumes = json["volumes"].as_array().ok_or_else(|| anyhow!("no volumes"))?;
    ensure!(volumes.iter().any(|v| v.as_str() == Some("vol_a")), "vol_a not taken over: {stdout}");
    let start = operation["start_unix_ms"].as_u64().ok_or_else(|| anyhow!("no operation.start_unix_ms"))?;
    let end = operation["end_unix_ms"].as_u64().ok_or_else(|| anyhow!("no operation.end_unix_ms"))?;
    ensure!(end >= start, "the operation ended ({end}) before it started ({start})");
    Ok(Switchover { duration_ms: end - start })
}

// ---------------------------------------------------------------------------------------------
// The report

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// One line per run, as it ends.
fn sample_line(index: usize, sample: &Sample) -> String {
    format!(
        "run {}: switchover {:.1} ms (command {:.1} ms, operation on B {} ms, {} refused connection(s)), \
         baseline {:.1} ms; writes before the kill {:.1} ms",
        index + 1,
        ms(sample.switchover),
        ms(sample.command),
        sample.operation_ms,
        sample.refused,
        ms(sample.baseline),
        ms(sample.writes_took),
    )
}

/// Median, min and max.
fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let median = median(values)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median, min, max))
}

fn row(out: &mut String, label: &str, values: &[f64]) {
    match stats(values) {
        Some((median, min, max)) => {
            let _ = writeln!(out, "| {label} | {median:.1} | {min:.1} | {max:.1} |");
        }
        None => {
            let _ = writeln!(out, "| {label} | — | — | — |");
        }
    }
}

/// The results as a Markdown table and the verdicts under it.
fn results_table(samples: &[Sample]) -> String {
    let switchover: Vec<f64> = samples.iter().map(|s| ms(s.switchover)).collect();
    let command: Vec<f64> = samples.iter().map(|s| ms(s.command)).collect();
    #[allow(clippy::cast_precision_loss)]
    let operation: Vec<f64> = samples.iter().map(|s| s.operation_ms as f64).collect();
    let baseline: Vec<f64> = samples.iter().map(|s| ms(s.baseline)).collect();
    let above: Vec<f64> = samples.iter().map(|s| ms(s.switchover) - ms(s.baseline)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "| {} run(s), ms | median | min | max |", samples.len());
    let _ = writeln!(out, "|---|---:|---:|---:|");
    row(&mut out, "**forced switchover**: command spawned → first block of vol_a read at B", &switchover);
    row(&mut out, "… of which the command (spawn → exit)", &command);
    row(&mut out, "… of which the operation on B (record's end − start, ms resolution)", &operation);
    row(&mut out, "**baseline**: `node show` spawned → first block of vol_b read at B", &baseline);
    row(&mut out, "switchover − baseline (per run)", &above);
    out.push('\n');
    let (Some(switchover_median), Some(baseline_median)) = (median(&switchover), median(&baseline)) else {
        return out;
    };
    let seconds = switchover_median / 1000.0;
    if baseline_median > 0.0 {
        let _ = writeln!(
            out,
            "- Ratio switchover / baseline (medians): **{:.2}×**",
            switchover_median / baseline_median
        );
    }
    let _ = writeln!(
        out,
        "- NetApp's documented example of a forced switchover, ≈ {NETAPP_EXAMPLE_SECS:.0} s (per issue 8): \
         ours {seconds:.3} s, {:.4}× of it",
        seconds / NETAPP_EXAMPLE_SECS
    );
    let verdict = if seconds < GOAL_SECS { "met" } else { "missed" };
    let _ = writeln!(
        out,
        "- Goal (issue 8): under {GOAL_SECS:.0} s in the lab: **{verdict}** ({seconds:.3} s, median)"
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

/// The section of `docs/performance.md`, markers included.
fn docs_section(config: &Config, machine: &str, table: &str, samples: &[Sample]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{BEGIN_MARKER}");
    out.push_str(
        "Written by `tests/bench-switchover` (`tests/src/bin/switchover-bench.rs`); the next run replaces\n\
         everything between the markers.\n\n### Last run\n\n",
    );
    let _ = writeln!(out, "- Date: {}", today());
    let _ = writeln!(out, "- Command: `{}`", config.command);
    let _ = writeln!(
        out,
        "- Lab: `mcctl lab up --dir DIR {}`; {} write(s) of 4 KiB at QD1 to vol_a at A before the kill",
        config.lab_args.join(" "),
        config.writes
    );
    let _ = writeln!(out, "- Machine: {machine}");
    out.push('\n');
    out.push_str(table);
    out.push_str("\n### Every run\n\n```text\n");
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

    #[test]
    fn lab_up_answer_gives_addresses_and_pids() {
        let stdout = r#"{"cluster_id":"2105f3","controllers":[
            {"node":1,"site":"A","admin":"127.0.0.1:5000","nbd":"127.0.0.1:4000","pid":123},
            {"node":2,"site":"B","admin":"127.0.0.1:5001","nbd":"127.0.0.1:4001","pid":456}]}"#;
        let answer = parse_lab_up(stdout).expect("parses");
        assert_eq!(
            answer,
            LabUp {
                cluster_id: "2105f3".into(),
                nbd_a: "127.0.0.1:4000".into(),
                nbd_b: "127.0.0.1:4001".into(),
                admin_b: "127.0.0.1:5001".into(),
                pids: vec![123, 456],
            }
        );
        assert!(parse_lab_up(r#"{"cluster_id":"x","controllers":[]}"#).is_err());
    }

    /// A switchover that failed, or did not take vol_a over, is an error, never a sample.
    #[test]
    fn switchover_answer_is_checked() {
        let ok = r#"{"node":2,"operation":{"start_unix_ms":1000,"end_unix_ms":1096,
            "state":"successful"},"volumes":["vol_a"]}"#;
        assert_eq!(parse_switchover(ok).expect("parses"), Switchover { duration_ms: 96 });
        assert!(parse_switchover(&ok.replace("\"successful\"", "\"failed\"")).is_err());
        assert!(parse_switchover(&ok.replace("vol_a", "vol_c")).is_err());
        assert!(parse_switchover(&ok.replace("1096", "999")).is_err());
    }

    fn sample(switchover_ms: u64, baseline_ms: u64) -> Sample {
        Sample {
            switchover: Duration::from_millis(switchover_ms),
            command: Duration::from_millis(switchover_ms - 2),
            operation_ms: switchover_ms - 20,
            refused: 0,
            baseline: Duration::from_millis(baseline_ms),
            writes_took: Duration::from_millis(500),
        }
    }

    #[test]
    fn table_has_medians_ratio_and_verdicts() {
        let table = results_table(&[sample(120, 20), sample(100, 10), sample(3000, 30)]);
        assert!(table.contains("read at B | 120.0 | 100.0 | 3000.0 |"), "{table}");
        assert!(table.contains("(per run) | 100.0 | 90.0 | 2970.0 |"), "{table}");
        assert!(table.contains("Ratio switchover / baseline (medians): **6.00×**"), "{table}");
        assert!(table.contains("**met** (0.120 s, median)"), "{table}");
        let slow = results_table(&[sample(2500, 20)]);
        assert!(slow.contains("**missed** (2.500 s, median)"), "{slow}");
        assert!(results_table(&[]).contains("| — | — | — |"));
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
        assert!(splice_section(&format!("x {END_MARKER} {BEGIN_MARKER}"), &section).is_err());
    }

    /// Nonsense flags are refused before any lab starts.
    #[test]
    fn flags() {
        let config = |args: &[&str]| Config::from_args(Args::parse_from(args), String::new());
        for args in [
            &["switchover-bench", "--runs", "0"][..],
            &["switchover-bench", "--writes", "0"],
            &["switchover-bench", "--volume-size-mib", "1", "--writes", "257"],
            &["switchover-bench", "--mcctl", "/nonexistent/mcctl"],
        ] {
            assert!(config(args).is_err(), "{args:?} was accepted");
        }
        assert_eq!(pattern(1, 2).len(), 4096);
        assert_ne!(pattern(1, 2), pattern(2, 1));
    }
}

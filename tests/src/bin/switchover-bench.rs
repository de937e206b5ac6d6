//! `switchover-bench`: how long the MetroCluster operations take, from the command to the first
//! block of the moved volume served where it now lives (DESIGN §11 and §15, issue 8; run through
//! `tests/bench-switchover`, results in `docs/performance.md`).
//!
//! One run is two fresh two-site labs (`mcctl lab up --no-mediator`, small volumes and NVLog, the
//! lab's default timers unless flags say otherwise), each first given `--writes` 4 KiB writes at
//! QD1 to `vol_a` at site A over NBD. Everything is timed with one monotonic clock. The labs have
//! no mediator: these are the operator's switchovers (`site-loss-bench` times the mediator's).
//!
//! The forced lab: the writes (so B holds NVLog records to replay); `mcctl lab kill --site A`;
//! then, in this order:
//! - **baseline**: spawn `mcctl node show --endpoint B --cluster-id ID -o json` (read-only, no
//!   switchover work) and wait for it, then connect to B's NBD address, `NBD_OPT_GO` on `vol_b`
//!   and read its first block: the tool's process start, one RPC and one NBD connection;
//! - **forced switchover**: spawn `mcctl switchover --forced-on-disaster --confirm --site B --lab
//!   DIR -o json` and wait for it, then connect to B's NBD address, `NBD_OPT_GO` on `vol_a`
//!   (retried while B refuses it, within a deadline) and read its first block.
//!
//! The planned lab, both sites up throughout: the writes; then, in this order:
//! - **negotiated switchover**: spawn `mcctl switchover --site B --lab DIR -o json` (A drains,
//!   makes a CP and releases its aggregates to B) and wait for it, then `vol_a`'s first block read
//!   at B as above;
//! - `--writes-at-b` 4 KiB writes to `vol_a` at B (none by default), untimed: what the resync will
//!   copy back to A;
//! - **heal + resync**: spawn `mcctl heal --lab DIR -o json`, which reattaches A's plexes and
//!   waits until their resync is complete, and wait for it; the bytes the resync copied are the
//!   difference of the `plex_resync_copied_bytes` counters of both nodes' `/metrics` read before
//!   and after (outside the timed window);
//! - **switchback**: spawn `mcctl switchback --lab DIR -o json` and wait for it, then `vol_a`'s
//!   first block read at A (retried while A refuses it).
//!
//! Invariants of the measurement:
//! - a switchover or switchback counts only if the command exits 0, its operation record says
//!   `successful` and lists `vol_a` (and, for a switchback, no veto stopped it), and the first
//!   block read back is the one last written, at A or at B (checked outside the timed window); a
//!   heal counts only if `mcctl heal` exits 0 (resync complete) and its operation is `successful`;
//! - every ratio divides a median by the median of the same run's baseline; the values are
//!   medians over the runs, with min and max. The goals (forced < 2 s, negotiated and switchback
//!   < 5 s each) and NetApp's documented examples (≈ 9 s, ≈ 51 s, ≈ 110 s) are reported, never
//!   asserted (DESIGN §14);
//! - no controller outlives a run: each lab is brought down with `mcctl lab down` at the end of
//!   its part of the run and on every error path (a guard does it on drop), and the pids
//!   `lab.json` lists get SIGKILL if they are still `mc-controller` processes after that;
//! - every file lives in a fresh temporary directory under `--dir` (a disk file system, not
//!   tmpfs), deleted at the end of its part of the run.

use mc_tests::bench::{check_disk_file_system, median};
use mc_tests::lab_bench::{Lab, NbdClient};
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
/// The socket timeout of the NBD client.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const BEGIN_MARKER: &str = "<!-- switchover-bench:begin -->";
const END_MARKER: &str = "<!-- switchover-bench:end -->";
/// NetApp's documented example of a forced switchover (per issue 8), in seconds.
const NETAPP_FORCED_SECS: f64 = 9.0;
/// NetApp's documented example of a negotiated switchover, in seconds.
const NETAPP_NEGOTIATED_SECS: f64 = 51.0;
/// NetApp's documented example of a switchback, in seconds.
const NETAPP_SWITCHBACK_SECS: f64 = 110.0;
/// Issue 8's goal for a forced switchover in the lab, in seconds.
const FORCED_GOAL_SECS: f64 = 2.0;
/// The goal for a negotiated switchover, and for a switchback, in the lab, in seconds each.
const PLANNED_GOAL_SECS: f64 = 5.0;
/// `mcctl heal --timeout`: how long heal may wait for the resync before the run fails.
const HEAL_TIMEOUT_SECS: u64 = 600;
/// The `/metrics` counter of the bytes a resync copied (summed over its labels).
const RESYNC_COPIED_METRIC: &str = "plex_resync_copied_bytes_total";
/// The NBD block this benchmark writes and reads.
const BLOCK_BYTES: u64 = 4096;
/// How long the NBD connection to a switched-over volume may be refused before the run fails.
const SERVE_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between refused NBD connections while waiting for the export.
const RETRY_PAUSE: Duration = Duration::from_millis(1);

#[derive(Parser, Debug)]
#[command(
    name = "switchover-bench",
    about = "Times a forced switchover, a negotiated switchover, heal + resync and a switchback of the \
             lab, each from the command to the first block of vol_a read where it is now served, \
             against a read-only command plus the same NBD read; writes the table into \
             docs/performance.md"
)]
struct Args {
    /// Runs, each on two fresh labs (forced; negotiated, heal and switchback).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// 4 KiB writes at QD1 to vol_a at site A before the kill, and before the negotiated
    /// switchover (blocks 0, 1, 2, ...).
    #[arg(long, default_value_t = 2000)]
    writes: u64,
    /// 4 KiB writes at QD1 to vol_a at site B after the negotiated switchover, outside the timed
    /// windows (blocks 0, 1, 2, ..., a content of their own; block 0 is checked at A after the
    /// switchback). What a CP destaged before heal is the resync's work; the rest reaches A's
    /// plex at the switchback's CP.
    #[arg(long, default_value_t = 0)]
    writes_at_b: u64,
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
    writes_at_b: u64,
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
        ensure!(
            args.writes_at_b <= volume_blocks,
            "--writes-at-b must be in 0..={volume_blocks} (one write per block of the volume), got {}",
            args.writes_at_b
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
        // No mediator: the operator's switchovers, as measured since issue 8 (with one, the
        // mediator would switch a killed site over by itself once its lease lapsed).
        let mut lab_args = vec![
            "--detach".to_string(),
            "-o".to_string(),
            "json".to_string(),
            "--no-mediator".to_string(),
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
        Ok(Config {
            runs: args.runs,
            writes: args.writes,
            writes_at_b: args.writes_at_b,
            lab_args,
            dir: args.dir,
            mcctl,
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

/// One switchover or switchback, as the benchmark times it.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Handover {
    /// Spawning the command to the first block of `vol_a` read where it is now served.
    served: Duration,
    /// Spawning the command to its exit.
    command: Duration,
    /// The operation record's `end_unix_ms - start_unix_ms` (the running node's wall clock).
    operation_ms: u64,
    /// NBD connections that were refused before `vol_a` was served.
    refused: u32,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Sample {
    /// `mcctl switchover --forced-on-disaster`, vol_a served at B.
    forced: Handover,
    /// Spawning `mcctl node show` to the first block of `vol_b` read at B.
    baseline: Duration,
    /// The writes before the kill.
    writes_took: Duration,
    /// The negotiated switchover, heal and switchback of the same run.
    planned: Planned,
}

/// What the planned lab of one run measured.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Planned {
    /// `mcctl switchover --site B` (negotiated), vol_a served at B.
    negotiated: Handover,
    /// Spawning `mcctl heal` to its exit, the resync complete.
    heal: Duration,
    /// The heal operation record's `end_unix_ms - start_unix_ms` (the reattachment only).
    heal_operation_ms: u64,
    /// Aggregates whose home plex heal reattached.
    reattached: usize,
    /// Regions the home node's unreleased records added to the resync set.
    regions_marked: u64,
    /// Bytes the resync copied, from both nodes' `/metrics`; `None` if they could not be read.
    resync_bytes: Option<u64>,
    /// `mcctl switchback`, vol_a served at A.
    switchback: Handover,
    /// The writes before the negotiated switchover.
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

/// A lab of one part of a run.
#[derive(Debug)]
struct FreshLab {
    /// Its guard. Fields drop in order: the lab goes down before its directory is deleted.
    lab: Lab,
    /// Its answer to `lab up`.
    answer: LabUp,
    /// How long the writes at A took.
    writes_took: Duration,
    /// The temporary directory it lives in, deleted on drop.
    _temp: tempfile::TempDir,
}

/// A fresh lab in a temporary directory under `--dir`, written to at A.
fn fresh_lab(config: &Config, index: usize) -> Result<FreshLab> {
    let temp = tempfile::Builder::new()
        .prefix("switchover-bench-")
        .tempdir_in(&config.dir)
        .with_context(|| format!("create a temporary directory under {}", config.dir.display()))?;
    let lab_dir = temp.path().join("lab");
    // The guard exists before `lab up` runs, so a lab that fails half-way is brought down too.
    let mut lab = Lab {
        bench: "switchover-bench",
        mcctl: config.mcctl.clone(),
        dir: lab_dir.clone(),
        pids: Vec::new(),
        up: true,
    };
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
    Ok(FreshLab { lab, answer, writes_took, _temp: temp })
}

/// One run: the forced lab (kill, baseline, forced switchover), then the planned lab.
fn run_once(config: &Config, index: usize) -> Result<Sample> {
    let (forced, baseline, writes_took) = forced_part(config, index).context("the forced switchover")?;
    let planned = planned_part(config, index).context("the negotiated switchover, heal and switchback")?;
    Ok(Sample { forced, baseline, writes_took, planned })
}

/// One lab, one kill, one baseline, one forced switchover.
fn forced_part(config: &Config, index: usize) -> Result<(Handover, Duration, Duration)> {
    let mut fresh = fresh_lab(config, index)?;
    let answer = &fresh.answer;
    let lab_dir = path_str(&fresh.lab.dir)?.to_string();

    mcctl_json(&config.mcctl, &["lab", "kill", "--site", "A", "--dir", &lab_dir, "-o", "json"])
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

    let forced = handover(
        config,
        &["switchover", "--forced-on-disaster", "--confirm", "--site", "B", "--lab", &lab_dir, "-o", "json"],
        (&answer.nbd_b, "B"),
        &pattern(index, 0),
        parse_switchover,
    )
    .context("forced switchover to B")?;
    fresh.lab.down()?;
    Ok((forced, baseline, fresh.writes_took))
}

/// One lab, both sites up: negotiated switchover to B, heal (with its resync), switchback to A.
fn planned_part(config: &Config, index: usize) -> Result<Planned> {
    let mut fresh = fresh_lab(config, index)?;
    let answer = &fresh.answer;
    let lab_dir = path_str(&fresh.lab.dir)?.to_string();

    let negotiated = handover(
        config,
        &["switchover", "--site", "B", "--lab", &lab_dir, "-o", "json"],
        (&answer.nbd_b, "B"),
        &pattern(index, 0),
        parse_switchover,
    )
    .context("negotiated switchover to B")?;

    // Writes at B while it serves vol_a: what a CP destages before heal is the resync's work, the
    // rest reaches A's plex at the switchback's CP.
    let mut last_block_0 = pattern(index, 0);
    if config.writes_at_b > 0 {
        let mut host = NbdClient::connect(&answer.nbd_b, "vol_a").context("connect to vol_a at B")?;
        for block in 0..config.writes_at_b {
            host.write(block * BLOCK_BYTES, &pattern_at_b(index, block))
                .with_context(|| format!("write block {block} of vol_a at B"))?;
        }
        last_block_0 = pattern_at_b(index, 0);
    }

    let copied_before = resync_copied(&answer.metrics);
    let timeout = HEAL_TIMEOUT_SECS.to_string();
    let started = Instant::now();
    let stdout = mcctl_json(&config.mcctl, &["heal", "--timeout", &timeout, "--lab", &lab_dir, "-o", "json"])
        .context("heal (and wait for the resync)")?;
    let heal_took = started.elapsed();
    let heal = parse_heal(&stdout).context("read the answer of mcctl heal")?;
    let resync_bytes = match (copied_before, resync_copied(&answer.metrics)) {
        (Ok(before), Ok(after)) => Some(after.saturating_sub(before)),
        (Err(error), _) | (_, Err(error)) => {
            eprintln!("switchover-bench: the resync's bytes are unknown: {error:#}");
            None
        }
    };

    let switchback = handover(
        config,
        &["switchback", "--lab", &lab_dir, "-o", "json"],
        (&answer.nbd_a, "A"),
        &last_block_0,
        parse_switchback,
    )
    .context("switchback to A")?;
    fresh.lab.down()?;
    Ok(Planned {
        negotiated,
        heal: heal_took,
        heal_operation_ms: heal.duration_ms,
        reattached: heal.reattached,
        regions_marked: heal.regions_marked,
        resync_bytes,
        switchback,
        writes_took: fresh.writes_took,
    })
}

/// Spawns `mcctl ARGS` (a switchover or a switchback) and waits for it, then reads the first
/// block of `vol_a` at the NBD address `served_at` (retried while refused); `parse` checks the
/// command's answer. The block must be `expected`, the one last written.
fn handover(
    config: &Config,
    args: &[&str],
    served_at: (&str, &str),
    expected: &[u8],
    parse: fn(&str) -> Result<Switchover>,
) -> Result<Handover> {
    let (address, site) = served_at;
    let started = Instant::now();
    let stdout = mcctl_json(&config.mcctl, args)?;
    let command = started.elapsed();
    let (mut client, refused) = connect_within(address, "vol_a", started + SERVE_DEADLINE)?;
    let block = client.read_first_block().with_context(|| format!("read vol_a at {site}"))?;
    let served = started.elapsed();

    let operation = parse(&stdout).with_context(|| format!("read the answer of mcctl {}", args[0]))?;
    ensure!(
        block == expected,
        "block 0 of vol_a at {site} after mcctl {} is not the one last written",
        args[0]
    );
    Ok(Handover { served, command, operation_ms: operation.duration_ms, refused })
}

/// The bytes resync copied so far at the nodes whose `/metrics` addresses are `addresses`.
fn resync_copied(addresses: &[String]) -> Result<u64> {
    let mut total = 0u64;
    for address in addresses {
        let text = http_get(address, "/metrics").with_context(|| format!("read /metrics at {address}"))?;
        total += parse_resync_copied(&text).with_context(|| format!("parse /metrics of {address}"))?;
    }
    Ok(total)
}

/// The body of `GET path` at `address` (HTTP/1.1, `Connection: close`); an error unless 200.
fn http_get(address: &str, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(address).with_context(|| format!("connect to {address}"))?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).context("set the read timeout")?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n")
        .context("send the request")?;
    let mut response = String::new();
    stream.read_to_string(&mut response).context("read the response")?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no end of the headers"))?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(status.split_whitespace().nth(1) == Some("200"), "answered {status:?}");
    ensure!(
        !head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "a chunked answer (not read by this client)"
    );
    Ok(body.to_string())
}

/// The sum of the `plex_resync_copied_bytes_total` samples of a Prometheus text exposition (0 if
/// there are none: no resync ran since the node started).
fn parse_resync_copied(text: &str) -> Result<u64> {
    let mut total = 0u64;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(RESYNC_COPIED_METRIC) else { continue };
        let value = if let Some(labels) = rest.strip_prefix('{') {
            labels.split_once('}').map(|(_, value)| value)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            // Another metric whose name starts with this one.
            continue;
        };
        let value =
            value.and_then(|v| v.split_whitespace().next()).ok_or_else(|| anyhow!("no value: {line}"))?;
        let bytes: u64 = value.parse().with_context(|| format!("not a byte count: {line}"))?;
        total += bytes;
    }
    Ok(total)
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

/// The content of `block` written at B in run `run`: unlike any block written at A.
fn pattern_at_b(run: usize, block: u64) -> Vec<u8> {
    pattern(run, block).iter().map(|byte| !byte).collect()
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

/// What the benchmark takes from `mcctl lab up -o json`.
#[derive(Debug, PartialEq, Eq)]
struct LabUp {
    cluster_id: String,
    nbd_a: String,
    nbd_b: String,
    admin_b: String,
    pids: Vec<u32>,
    /// Every controller's `/metrics` address.
    metrics: Vec<String>,
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
    let metrics = controllers.iter().map(|c| field(c, "metrics")).collect::<Result<Vec<String>>>()?;
    Ok(LabUp {
        cluster_id,
        nbd_a: field(a, "nbd")?,
        nbd_b: field(b, "nbd")?,
        admin_b: field(b, "admin")?,
        pids,
        metrics,
    })
}

/// What the benchmark takes from `mcctl switchover -o json` or `mcctl switchback -o json`.
#[derive(Debug, PartialEq, Eq)]
struct Switchover {
    duration_ms: u64,
}

/// The switchover's duration on B; an error unless it succeeded and took over `vol_a`.
fn parse_switchover(stdout: &str) -> Result<Switchover> {
    parse_handover(stdout, "switchover")
}

/// The switchback's duration on the node that ran it; an error unless it was not vetoed,
/// succeeded and handed `vol_a` back.
fn parse_switchback(stdout: &str) -> Result<Switchover> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    ensure!(
        json["vetoed"].as_bool() == Some(false),
        "the switchback was vetoed (or says nothing of it): {stdout}"
    );
    parse_handover(stdout, "switchback")
}

/// `{"operation": {"state", "start_unix_ms", "end_unix_ms"}, "volumes": [...]}`: the operation's
/// duration; an error unless it succeeded and lists `vol_a`.
fn parse_handover(stdout: &str, what: &str) -> Result<Switchover> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    let operation = &json["operation"];
    let state = operation["state"].as_str().ok_or_else(|| anyhow!("no operation.state"))?;
    ensure!(state == "successful", "the {what} ended {state}: {stdout}");
    let volumes = json["volumes"].as_array().ok_or_else(|| anyhow!("no volumes"))?;
    ensure!(volumes.iter().any(|v| v.as_str() == Some("vol_a")), "vol_a not moved by the {what}: {stdout}");
    Ok(Switchover { duration_ms: operation_ms(operation)? })
}

/// An operation record's `end_unix_ms - start_unix_ms`.
fn operation_ms(operation: &serde_json::Value) -> Result<u64> {
    let start = operation["start_unix_ms"].as_u64().ok_or_else(|| anyhow!("no operation.start_unix_ms"))?;
    let end = operation["end_unix_ms"].as_u64().ok_or_else(|| anyhow!("no operation.end_unix_ms"))?;
    ensure!(end >= start, "the operation ended ({end}) before it started ({start})");
    Ok(end - start)
}

/// What the benchmark takes from `mcctl heal -o json`.
#[derive(Debug, PartialEq, Eq)]
struct Heal {
    duration_ms: u64,
    /// Aggregates whose home plex was reattached.
    reattached: usize,
    /// Regions marked for the resync, summed over the aggregates.
    regions_marked: u64,
}

/// `{"node", "operation", "aggregates": [{"aggregate", "reattached", "regions_marked",
/// "result"}]}`; an error unless the operation succeeded.
fn parse_heal(stdout: &str) -> Result<Heal> {
    let json: serde_json::Value = serde_json::from_str(stdout).context("parse JSON")?;
    let operation = &json["operation"];
    let state = operation["state"].as_str().ok_or_else(|| anyhow!("no operation.state"))?;
    ensure!(state == "successful", "the heal ended {state}: {stdout}");
    let aggregates = json["aggregates"].as_array().ok_or_else(|| anyhow!("no aggregates"))?;
    let mut heal = Heal { duration_ms: operation_ms(operation)?, reattached: 0, regions_marked: 0 };
    for aggregate in aggregates {
        let reattached =
            aggregate["reattached"].as_bool().ok_or_else(|| anyhow!("an aggregate without reattached"))?;
        heal.reattached += usize::from(reattached);
        heal.regions_marked += aggregate["regions_marked"]
            .as_u64()
            .ok_or_else(|| anyhow!("an aggregate without regions_marked"))?;
    }
    Ok(heal)
}

// ---------------------------------------------------------------------------------------------
// The report

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A byte count for people: bytes below 1 KiB, else KiB or MiB with one decimal.
fn human_bytes(bytes: f64) -> String {
    const KIB: f64 = 1024.0;
    if bytes < KIB {
        format!("{bytes:.0} B")
    } else if bytes < KIB * KIB {
        format!("{:.1} KiB", bytes / KIB)
    } else {
        format!("{:.1} MiB", bytes / (KIB * KIB))
    }
}

/// A switchover or switchback of a run line.
fn handover_text(what: &str, handover: &Handover, site: &str) -> String {
    format!(
        "{what} {:.1} ms (command {:.1} ms, operation {} ms, {} refused connection(s) at {site})",
        ms(handover.served),
        ms(handover.command),
        handover.operation_ms,
        handover.refused,
    )
}

/// One line per run, as it ends.
fn sample_line(index: usize, sample: &Sample) -> String {
    let planned = &sample.planned;
    #[allow(clippy::cast_precision_loss)]
    let resync =
        planned.resync_bytes.map_or_else(|| "unknown".to_string(), |bytes| human_bytes(bytes as f64));
    format!(
        "run {}: {}, baseline {:.1} ms; {}, heal + resync {:.1} ms (operation {} ms, {} reattached, {} region(s) \
         marked, {resync} resynced), {}; writes before the kill {:.1} ms, before the negotiated switchover {:.1} ms",
        index + 1,
        handover_text("forced switchover", &sample.forced, "B"),
        ms(sample.baseline),
        handover_text("negotiated switchover", &planned.negotiated, "B"),
        ms(planned.heal),
        planned.heal_operation_ms,
        planned.reattached,
        planned.regions_marked,
        handover_text("switchback", &planned.switchback, "A"),
        ms(sample.writes_took),
        ms(planned.writes_took),
    )
}

/// Median, min and max.
fn stats(values: &[f64]) -> Option<(f64, f64, f64)> {
    let median = median(values)?;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some((median, min, max))
}

/// `part / whole`, when both exist and `whole` is positive.
fn ratio(part: Option<f64>, whole: Option<f64>) -> Option<f64> {
    match (part, whole) {
        (Some(part), Some(whole)) if whole > 0.0 => Some(part / whole),
        _ => None,
    }
}

/// "met" or "missed" for a median of `median_ms` against a goal of `goal_secs`.
fn verdict(median_ms: f64, goal_secs: f64) -> &'static str {
    if median_ms / 1000.0 < goal_secs { "met" } else { "missed" }
}

/// One row of the table: what it measures, the values in ms, and for the operations their
/// ratio to the baseline, NetApp's documented example and the goal.
#[derive(Debug)]
struct Row<'a> {
    label: &'a str,
    values: Vec<f64>,
    /// Whether the row gets a ratio to the baseline.
    versus_baseline: bool,
    /// NetApp's documented example, in words.
    netapp: &'a str,
    /// The goal in the lab, in seconds.
    goal_secs: Option<f64>,
}

impl Row<'_> {
    /// A detail row: numbers only.
    fn detail(label: &str, values: Vec<f64>) -> Row<'_> {
        Row { label, values, versus_baseline: false, netapp: "", goal_secs: None }
    }

    fn write(&self, out: &mut String, baseline_median: Option<f64>) {
        let median_ms = median(&self.values);
        let numbers = match stats(&self.values) {
            Some((median, min, max)) => format!("{median:.1} | {min:.1} | {max:.1}"),
            None => "— | — | —".to_string(),
        };
        let versus = match ratio(median_ms, baseline_median) {
            Some(ratio) if self.versus_baseline => format!("{ratio:.2}×"),
            None if self.versus_baseline => "—".to_string(),
            _ => String::new(),
        };
        let goal = match (self.goal_secs, median_ms) {
            (Some(goal), Some(median)) => format!("under {goal:.0} s: **{}**", verdict(median, goal)),
            (Some(goal), None) => format!("under {goal:.0} s"),
            (None, _) => String::new(),
        };
        let _ = writeln!(out, "| {} | {numbers} | {versus} | {} | {goal} |", self.label, self.netapp);
    }
}

/// The results as a Markdown table and the verdicts under it.
#[allow(clippy::cast_precision_loss)]
fn results_table(samples: &[Sample]) -> String {
    let values = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let forced = values(&|s| ms(s.forced.served));
    let negotiated = values(&|s| ms(s.planned.negotiated.served));
    let heal = values(&|s| ms(s.planned.heal));
    let switchback = values(&|s| ms(s.planned.switchback.served));
    let baseline = values(&|s| ms(s.baseline));
    let baseline_median = median(&baseline);
    let rows = [
        Row {
            label: "**forced switchover**: command spawned → first block of vol_a read at B",
            values: forced.clone(),
            versus_baseline: true,
            netapp: "≈ 9 s (per issue 8)",
            goal_secs: Some(FORCED_GOAL_SECS),
        },
        Row::detail("… of which the command (spawn → exit)", values(&|s| ms(s.forced.command))),
        Row::detail(
            "… of which the operation on B (record's end − start, ms resolution)",
            values(&|s| s.forced.operation_ms as f64),
        ),
        Row {
            label: "**negotiated switchover**: `switchover --site B` spawned → first block of vol_a read at B",
            values: negotiated.clone(),
            versus_baseline: true,
            netapp: "≈ 51 s",
            goal_secs: Some(PLANNED_GOAL_SECS),
        },
        Row::detail("… of which the command (spawn → exit)", values(&|s| ms(s.planned.negotiated.command))),
        Row::detail("… of which the operation on B", values(&|s| s.planned.negotiated.operation_ms as f64)),
        Row {
            label: "**heal + resync**: `heal` spawned → exit, resync complete",
            values: heal.clone(),
            versus_baseline: true,
            netapp: "—",
            goal_secs: None,
        },
        Row::detail(
            "… of which the heal operation on B (reattach; the resync follows)",
            values(&|s| s.planned.heal_operation_ms as f64),
        ),
        Row {
            label: "**switchback**: `switchback` spawned → first block of vol_a read at A",
            values: switchback.clone(),
            versus_baseline: true,
            netapp: "≈ 110 s",
            goal_secs: Some(PLANNED_GOAL_SECS),
        },
        Row::detail("… of which the command (spawn → exit)", values(&|s| ms(s.planned.switchback.command))),
        Row::detail("… of which the operation on B", values(&|s| s.planned.switchback.operation_ms as f64)),
        Row {
            label: "**baseline**: `node show` spawned → first block of vol_b read at B",
            values: baseline.clone(),
            versus_baseline: true,
            netapp: "",
            goal_secs: None,
        },
        Row::detail("switchover − baseline (per run)", values(&|s| ms(s.forced.served) - ms(s.baseline))),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| {} run(s), ms | median | min | max | ÷ baseline (medians) | NetApp's documented example | goal in the lab |",
        samples.len()
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---|");
    for row in &rows {
        row.write(&mut out, baseline_median);
    }
    out.push('\n');
    let (Some(forced_median), Some(baseline_median)) = (median(&forced), baseline_median) else {
        return out;
    };
    if let Some(ratio) = ratio(Some(forced_median), Some(baseline_median)) {
        let _ = writeln!(out, "- Ratio switchover / baseline (medians): **{ratio:.2}×**");
    }
    for (what, values) in
        [("negotiated switchover", &negotiated), ("heal + resync", &heal), ("switchback", &switchback)]
    {
        if let Some(ratio) = ratio(median(values), Some(baseline_median)) {
            let _ = writeln!(out, "- Ratio {what} / baseline (medians): **{ratio:.2}×**");
        }
    }
    for (what, example, values, source) in [
        ("a forced switchover", NETAPP_FORCED_SECS, &forced, " (per issue 8)"),
        ("a negotiated switchover", NETAPP_NEGOTIATED_SECS, &negotiated, ""),
        ("a switchback", NETAPP_SWITCHBACK_SECS, &switchback, ""),
    ] {
        if let Some(median) = median(values) {
            let seconds = median / 1000.0;
            let _ = writeln!(
                out,
                "- NetApp's documented example of {what}, ≈ {example:.0} s{source}: ours {seconds:.3} s, {:.4}× of it",
                seconds / example
            );
        }
    }
    let seconds = forced_median / 1000.0;
    let _ = writeln!(
        out,
        "- Goal (issue 8): under {FORCED_GOAL_SECS:.0} s in the lab: **{}** ({seconds:.3} s, median)",
        verdict(forced_median, FORCED_GOAL_SECS)
    );
    for (what, values) in [("negotiated switchover", &negotiated), ("switchback", &switchback)] {
        if let Some(median) = median(values) {
            let _ = writeln!(
                out,
                "- Goal: a {what} under {PLANNED_GOAL_SECS:.0} s in the lab: **{}** ({:.3} s, median)",
                verdict(median, PLANNED_GOAL_SECS),
                median / 1000.0
            );
        }
    }
    let resynced: Vec<f64> =
        samples.iter().filter_map(|s| s.planned.resync_bytes).map(|b| b as f64).collect();
    let marked = values(&|s| s.planned.regions_marked as f64);
    if let (Some((median, min, max)), Some(marked)) = (stats(&resynced), median(&marked)) {
        let _ = writeln!(
            out,
            "- The heal's resync copied {} (median; min {}, max {}; `plex_resync_copied_bytes` of both nodes' \
             `/metrics`, {} of {} run(s)); heal marked {marked:.0} region(s) (median)",
            human_bytes(median),
            human_bytes(min),
            human_bytes(max),
            resynced.len(),
            samples.len()
        );
    }
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
        "- Labs: `mcctl lab up --dir DIR {}`; {} write(s) of 4 KiB at QD1 to vol_a at A before the kill \
         (forced) and before the negotiated switchover (planned); {} write(s) at B after it",
        config.lab_args.join(" "),
        config.writes,
        config.writes_at_b
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
            {"node":1,"site":"A","admin":"127.0.0.1:5000","nbd":"127.0.0.1:4000","pid":123,
             "metrics":"127.0.0.1:6000"},
            {"node":2,"site":"B","admin":"127.0.0.1:5001","nbd":"127.0.0.1:4001","pid":456,
             "metrics":"127.0.0.1:6001"}]}"#;
        let answer = parse_lab_up(stdout).expect("parses");
        assert_eq!(
            answer,
            LabUp {
                cluster_id: "2105f3".into(),
                nbd_a: "127.0.0.1:4000".into(),
                nbd_b: "127.0.0.1:4001".into(),
                admin_b: "127.0.0.1:5001".into(),
                pids: vec![123, 456],
                metrics: vec!["127.0.0.1:6000".into(), "127.0.0.1:6001".into()],
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

    /// A switchover or switchback of `served_ms`.
    fn handover(served_ms: u64) -> Handover {
        Handover {
            served: Duration::from_millis(served_ms),
            command: Duration::from_millis(served_ms - 2),
            operation_ms: served_ms - 20,
            refused: 0,
        }
    }

    /// A run whose negotiated switchover takes twice the forced one, its heal ten times and its
    /// switchback three times.
    fn sample(switchover_ms: u64, baseline_ms: u64) -> Sample {
        Sample {
            forced: handover(switchover_ms),
            baseline: Duration::from_millis(baseline_ms),
            writes_took: Duration::from_millis(500),
            planned: Planned {
                negotiated: handover(2 * switchover_ms),
                heal: Duration::from_millis(10 * switchover_ms),
                heal_operation_ms: switchover_ms,
                reattached: 1,
                regions_marked: 3,
                resync_bytes: Some(3 << 20),
                switchback: handover(3 * switchover_ms),
                writes_took: Duration::from_millis(400),
            },
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

    /// Each operation gets its median, min, max, ratio to the same baseline, NetApp's example
    /// and its goal's verdict; the resync's bytes are summarised.
    #[test]
    fn table_has_every_operation() {
        let table = results_table(&[sample(120, 20), sample(100, 10), sample(3000, 30)]);
        let has = |line: &str| assert!(table.contains(line), "no {line:?} in\n{table}");
        has("read at B | 120.0 | 100.0 | 3000.0 | 6.00× | ≈ 9 s (per issue 8) | under 2 s: **met** |");
        has("read at B | 240.0 | 200.0 | 6000.0 | 12.00× | ≈ 51 s | under 5 s: **met** |");
        has("resync complete | 1200.0 | 1000.0 | 30000.0 | 60.00× | — |  |");
        has("read at A | 360.0 | 300.0 | 9000.0 | 18.00× | ≈ 110 s | under 5 s: **met** |");
        has("read at B | 20.0 | 10.0 | 30.0 | 1.00× |  |  |");
        has("- Ratio negotiated switchover / baseline (medians): **12.00×**");
        has("- Ratio heal + resync / baseline (medians): **60.00×**");
        has("- Ratio switchback / baseline (medians): **18.00×**");
        has("example of a negotiated switchover, ≈ 51 s: ours 0.240 s, 0.0047× of it");
        has("example of a switchback, ≈ 110 s: ours 0.360 s, 0.0033× of it");
        has("- Goal: a switchback under 5 s in the lab: **met** (0.360 s, median)");
        has("- The heal's resync copied 3.0 MiB (median; min 3.0 MiB, max 3.0 MiB;");
        let slow = results_table(&[sample(2000, 20)]);
        assert!(slow.contains("- Goal: a switchback under 5 s in the lab: **missed** (6.000 s"), "{slow}");
        assert!(
            slow.contains("- Goal: a negotiated switchover under 5 s in the lab: **met** (4.000 s"),
            "{slow}"
        );
        let line = sample_line(0, &sample(100, 10));
        assert!(
            line.starts_with("run 1: forced switchover 100.0 ms (command 98.0 ms, operation 80 ms"),
            "{line}"
        );
        assert!(line.contains(
            "heal + resync 1000.0 ms (operation 100 ms, 1 reattached, 3 region(s) marked, 3.0 MiB"
        ));
        assert!(line.contains(
            "switchback 300.0 ms (command 298.0 ms, operation 280 ms, 0 refused connection(s) at A)"
        ));
    }

    /// A switchback that was vetoed or failed, or did not hand vol_a back, is an error.
    #[test]
    fn switchback_answer_is_checked() {
        let ok = r#"{"node":2,"simulate":false,"vetoed":false,"vetoes":[],"operation":{"start_unix_ms":1000,
            "end_unix_ms":1250,"state":"successful"},"volumes":["vol_a"]}"#;
        assert_eq!(parse_switchback(ok).expect("parses"), Switchover { duration_ms: 250 });
        assert!(parse_switchback(&ok.replace("\"vetoed\":false", "\"vetoed\":true")).is_err());
        assert!(parse_switchback(&ok.replace("\"vetoed\":false,", "")).is_err());
        assert!(parse_switchback(&ok.replace("successful", "partially_successful")).is_err());
        assert!(parse_switchback(&ok.replace("vol_a", "vol_b")).is_err());
    }

    /// Heal's answer gives its operation's duration, the reattached aggregates and the regions
    /// marked; a failed heal is an error.
    #[test]
    fn heal_answer_is_read() {
        let ok = r#"{"node":2,"operation":{"start_unix_ms":500,"end_unix_ms":530,"state":"successful"},
            "aggregates":[{"aggregate":"aggr_a","reattached":true,"regions_marked":4,"result":"ok"},
                          {"aggregate":"aggr_b","reattached":false,"regions_marked":1,"result":"home"}]}"#;
        assert_eq!(
            parse_heal(ok).expect("parses"),
            Heal { duration_ms: 30, reattached: 1, regions_marked: 5 }
        );
        assert!(parse_heal(&ok.replace("\"successful\"", "\"failed\"")).is_err());
        assert!(parse_heal(&ok.replace("\"regions_marked\":4", "\"marked\":4")).is_err());
        assert!(parse_heal(r#"{"node":2,"operation":null,"aggregates":[]}"#).is_err());
    }

    /// Only the resync counter's samples count, whatever their labels; other metrics whose names
    /// start the same way do not.
    #[test]
    fn resync_bytes_from_metrics() {
        let text = "# HELP plex_resync_copied_bytes Bytes resync copied.\n\
                    # TYPE plex_resync_copied_bytes counter\n\
                    # UNIT plex_resync_copied_bytes bytes\n\
                    plex_resync_copied_bytes_total{aggregate=\"ab\",plex=\"0\"} 4096\n\
                    plex_resync_copied_bytes_total{aggregate=\"cd\",plex=\"1\"} 1048576\n\
                    plex_resync_copied_bytes_total_other 7\n\
                    plex_drops_total{aggregate=\"ab\",plex=\"0\"} 1\n\
                    # EOF\n";
        assert_eq!(parse_resync_copied(text).expect("parses"), 4096 + 1_048_576);
        assert_eq!(parse_resync_copied("# EOF\n").expect("parses"), 0);
        assert!(parse_resync_copied("plex_resync_copied_bytes_total{plex=\"0\"} lots\n").is_err());
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(3.0 * 1_048_576.0), "3.0 MiB");
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
            &["switchover-bench", "--volume-size-mib", "1", "--writes-at-b", "257"],
        ] {
            assert!(config(args).is_err(), "{args:?} was accepted");
        }
        assert_eq!(pattern(1, 2).len(), 4096);
        assert_ne!(pattern(1, 2), pattern(2, 1));
        assert_ne!(pattern_at_b(1, 2), pattern(1, 2));
        assert_eq!(pattern_at_b(1, 2).len(), 4096);
    }
}

//! `nvlog-append-child`: a controller's NVLog write path reduced to its essentials, to be killed
//! with SIGKILL by `tests/tests/nvlog_sigkill.rs`.
//!
//! It opens an existing NVLog file, replays the local partition and releases everything it
//! replayed (as a restarting controller does with the CP that precedes serving), then appends
//! records from one or more threads until it is killed. Every record's fields follow from its
//! lsn (`mc_tests::nvlog_crash`), and every step is reported on stdout, one flushed line at a
//! time, before (intents) or after (acknowledgements) the call it describes.
//!
//! Invariants:
//! - an `A` line is printed only after the record's append returned (unless the test-only
//!   `--bug-ack-before-write` asks for the opposite), and lines never interleave;
//! - an `R <lsn>` line is printed before the release up to `<lsn>` is issued, `D <lsn>` after it
//!   returned;
//! - lsns are predicted under `Appender::next`, so the child knows a record's lsn (and hence its
//!   content) before appending it; an append that returns another lsn stops the child.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use mc_tests::nvlog_crash::{Line, fill_payload, identity, payload_len, record_input};
use nvlog::{Durability, Lsn, MmapMedia, NodeId, Nvlog, Options, PartitionKind, ReplayFilter};

/// Appends deterministic records to an NVLog until killed, acknowledging each on stdout.
#[derive(Debug, Parser)]
struct Args {
    /// The NVLog file; it must have been formatted already.
    #[arg(long)]
    file: PathBuf,
    /// The durability mode (`nvlog.durability`).
    #[arg(long, value_enum)]
    mode: Mode,
    /// Chooses the payload lengths and, unless `--threads` is given, the thread count (1 for an
    /// even seed, 4 for an odd one).
    #[arg(long)]
    seed: u64,
    /// The node that owns the log.
    #[arg(long, default_value_t = 1)]
    node: u32,
    /// Appender threads; overrides the choice by seed.
    #[arg(long)]
    threads: Option<usize>,
    /// Releases after every this many appends.
    #[arg(long, default_value_t = 50)]
    release_every: u64,
    /// Test-only bug: print each `A` line before appending the record, i.e. acknowledge before
    /// the record is in the log. Used to show that the kill test's checker bites.
    #[arg(long)]
    bug_ack_before_write: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// `Durability::Process`.
    Process,
    /// `Durability::Power`.
    Power,
}

/// The validated arguments.
#[derive(Debug)]
struct Config {
    file: PathBuf,
    durability: Durability,
    seed: u64,
    node: NodeId,
    threads: usize,
    release_every: u64,
    bug_ack_before_write: bool,
}

impl Config {
    fn from_args(args: Args) -> anyhow::Result<Config> {
        ensure!(args.node != 0, "node id 0 is not a node");
        ensure!(args.release_every > 0, "--release-every must be at least 1");
        let threads = args.threads.unwrap_or(if args.seed.is_multiple_of(2) { 1 } else { 4 });
        ensure!((1..=64).contains(&threads), "--threads must be 1 to 64, not {threads}");
        Ok(Config {
            file: args.file,
            durability: match args.mode {
                Mode::Process => Durability::Process,
                Mode::Power => Durability::Power,
            },
            seed: args.seed,
            node: NodeId(args.node),
            threads,
            release_every: args.release_every,
            bug_ack_before_write: args.bug_ack_before_write,
        })
    }
}

/// What the appender threads share.
#[derive(Debug)]
struct Appender {
    log: Nvlog<MmapMedia>,
    config: Config,
    /// The next lsn; held while a record is generated and written, so that lsn order and
    /// prediction agree. Durability (`persist_through`) is waited for outside it, which lets
    /// concurrent appends share one msync in `power` mode (group commit).
    next: Mutex<Lsn>,
    /// Appends that returned, for the release cadence.
    appended: AtomicU64,
}

/// Prints one line and flushes it: the acknowledgement pipe. The lock keeps lines whole.
fn emit(line: Line) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").context("write to the acknowledgement pipe")?;
    out.flush().context("flush the acknowledgement pipe")
}

fn release(log: &Nvlog<MmapMedia>, lsn: Lsn) -> anyhow::Result<()> {
    emit(Line::ReleaseIntent(lsn))?;
    log.release(PartitionKind::Local, lsn).with_context(|| format!("release up to lsn {lsn}"))?;
    emit(Line::Released(lsn))
}

impl Appender {
    /// Appends records until an error; returns only that error.
    fn run(&self) -> anyhow::Error {
        match self.append_forever() {
            Ok(never) => match never {},
            Err(error) => error,
        }
    }

    fn append_forever(&self) -> anyhow::Result<std::convert::Infallible> {
        let node = self.config.node;
        let mut payload = Vec::new();
        loop {
            let (lsn, len) = {
                let mut next = self.next.lock().map_err(|_| anyhow::anyhow!("an appender panicked"))?;
                let lsn = *next;
                let len = payload_len(self.config.seed, lsn);
                fill_payload(lsn, len, &mut payload);
                let len = u32::try_from(len).context("payload length")?;
                if self.config.bug_ack_before_write {
                    // The bug: the acknowledgement leaves before the record is in the mapping.
                    emit(Line::Ack { lsn, len })?;
                }
                // `append` is `append_buffered` followed by `persist_through`; they are split so
                // that only the first runs under `next`. The partition is never full (see
                // `LOG_FILE_BYTES`); if it were, waiting here would block the releasing thread.
                let got = self
                    .log
                    .try_append_buffered(&record_input(node, lsn, &payload))
                    .with_context(|| format!("append lsn {lsn}"))?;
                ensure!(got == lsn, "the log appended lsn {got} where lsn {lsn} was next");
                *next = lsn.next();
                (lsn, len)
            };
            self.log
                .persist_through(PartitionKind::Local, lsn)
                .with_context(|| format!("persist lsn {lsn}"))?;
            if !self.config.bug_ack_before_write {
                emit(Line::Ack { lsn, len })?;
            }
            let appended = self.appended.fetch_add(1, Ordering::Relaxed) + 1;
            if appended.is_multiple_of(self.config.release_every) {
                // A CP covering everything up to this record completed.
                release(&self.log, lsn)?;
            }
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let media = MmapMedia::open(&config.file).with_context(|| format!("map {}", config.file.display()))?;
    let options = Options { durability: config.durability, ..Options::default() };
    let (log, _report) = Nvlog::open(media, identity(config.node), options).context("open the NVLog")?;
    let replay = log.replay(PartitionKind::Local, &ReplayFilter::default()).context("replay the NVLog")?;
    if let Some(last) = replay.records.last() {
        // The CP that applies the replayed records before serving.
        release(&log, last.header.lsn)?;
    }
    let status = log.status(PartitionKind::Local).context("read the partition status")?;
    let next = status.last_lsn.max(status.released_lsn).next();
    emit(Line::Serving { next })?;

    let threads = config.threads;
    let appender = Arc::new(Appender { log, config, next: Mutex::new(next), appended: AtomicU64::new(0) });
    let (failures, failed) = mpsc::channel();
    for index in 0..threads {
        let appender = Arc::clone(&appender);
        let failures = failures.clone();
        std::thread::Builder::new()
            .name(format!("appender-{index}"))
            .spawn(move || {
                // The receiver lives until the process exits; a failed send needs no handling.
                let _ = failures.send(appender.run());
            })
            .context("spawn an appender thread")?;
    }
    // The appenders run until the test kills the process; the first error ends it.
    match failed.recv() {
        Ok(error) => Err(error),
        Err(_) => bail!("every appender thread ended without an error"),
    }
}

fn main() -> anyhow::Result<()> {
    let config = Config::from_args(Args::parse())?;
    run(config)
}

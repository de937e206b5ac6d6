//! Crash-image enumeration of the journal's persist protocol (DESIGN §14.2, STYLE 15).
//!
//! Random workloads of 1–50 operations (local appends, group-committed batches, partner copies,
//! releases, restarts) run on the tracing in-memory media. Then, at every point of the trace —
//! before and after every write and every persist — the images a crash there could leave are
//! built and recovered:
//! - `process` durability: the process crashes (page cache survives), also in the middle of a
//!   write;
//! - `power` durability: power is lost, with any subset of the unpersisted writes landing, whole
//!   or torn at sector boundaries;
//! - some images also get a flipped bit.
//!
//! Each recovered image must replay every record acknowledged before the crash point intact
//! (unless a release covered it), must never replay a record whose bytes differ from what was
//! appended under that lsn, and must replay the same records when recovered twice. The test
//! prints how many images it checked and its seed; `NVLOG_CRASH_SEED=<seed>` repeats a run and
//! `NVLOG_CRASH_WORKLOADS=<n>` changes how many workloads run.
//!
//! The checker is shown to bite: with the journal broken on purpose (acknowledging before the
//! msync, or skipping the CRC check on recovery) the same enumeration reports violations.

// Test data generators truncate random numbers on purpose.
#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use common::*;
use nvlog::header::DATA_START;
use nvlog::mem::{CrashSim, Event, MemMedia, SplitMix64, flip_random_bit};
use nvlog::{
    Durability, Epoch, Faults, Generation, Lsn, Nvlog, NvlogError, OpKind, Options, PartitionKind,
    RecordInput, ReplayFilter, encode_record,
};

const LOCAL: PartitionKind = PartitionKind::Local;
const DR: PartitionKind = PartitionKind::DrPartner;
/// Small partitions, so workloads switch halves, fill up and release often.
const MEDIA_BYTES: u64 = DATA_START + 2 * 16384;

/// What the workload did, in trace positions, for the checker.
#[derive(Default)]
struct Model {
    /// Every record ever handed to the journal, acknowledged or not, by (partition, lsn).
    appended: HashMap<(PartitionKind, Lsn), Vec<u8>>,
    /// (partition, lsn, trace length when the append returned): acknowledged from then on.
    acked: Vec<(PartitionKind, Lsn, usize)>,
    /// (partition, lsn, trace length when the release was called).
    releases: Vec<(PartitionKind, Lsn, usize)>,
}

impl Model {
    fn max_release_started(&self, kind: PartitionKind, at: usize) -> Lsn {
        self.releases
            .iter()
            .filter(|(k, _, started)| *k == kind && *started <= at)
            .map(|(_, lsn, _)| *lsn)
            .max()
            .unwrap_or(Lsn::ZERO)
    }
}

struct Workload {
    media: Arc<MemMedia>,
    log: Option<Nvlog<Arc<MemMedia>>>,
    options: Options,
    model: Model,
    rng: SplitMix64,
    partner_lsn: u64,
    partner_generation: u64,
}

impl Workload {
    fn log(&self) -> &Nvlog<Arc<MemMedia>> {
        self.log.as_ref().expect("the workload holds an open log")
    }

    fn trace_len(&self) -> usize {
        self.media.trace_len()
    }

    fn random_input(&mut self) -> (OpKind, Vec<u8>, u64) {
        match self.rng.below(6) {
            0 => (OpKind::Trim, Vec::new(), 4096),
            1 => (OpKind::WriteZeroes, Vec::new(), 8192),
            _ => {
                let len = 1 + self.rng.below(2500) as usize;
                let data = payload(self.rng.next_u64(), len);
                (OpKind::Write, data.clone(), data.len() as u64)
            }
        }
    }

    fn input<'a>(op: OpKind, data: &'a [u8], range: u64, offset: u64) -> RecordInput<'a> {
        RecordInput { op, range_len: range, payload: data, ..write_input(data, offset) }
    }

    /// A CP: everything durable in `kind` is released.
    fn checkpoint(&mut self, kind: PartitionKind) {
        let tail = self.log().durable_tail(kind).expect("partition exists");
        self.model.releases.push((kind, tail, self.trace_len()));
        self.log().release(kind, tail).expect("release");
    }

    fn append_local(&mut self, batch: usize) {
        let mut written = Vec::new();
        for _ in 0..batch {
            let (op, data, range) = self.random_input();
            let offset = self.rng.below(1024) * 4096;
            let lsn = loop {
                let input = Workload::input(op, &data, range, offset);
                match self.log().try_append_buffered(&input) {
                    Ok(lsn) => break lsn,
                    Err(NvlogError::Full(_)) => {
                        if let Some(&last) = written.last() {
                            self.log().persist_through(LOCAL, last).expect("persist");
                        }
                        self.checkpoint(LOCAL);
                    }
                    Err(other) => panic!("append: {other}"),
                }
            };
            let encoded =
                encode_record(&Workload::input(op, &data, range, offset), lsn, self.log().generation(), NODE)
                    .expect("encodes");
            self.model.appended.insert((LOCAL, lsn), encoded);
            written.push(lsn);
        }
        let last = *written.last().expect("a batch has records");
        self.log().persist_through(LOCAL, last).expect("persist");
        let at = self.trace_len();
        self.model.acked.extend(written.into_iter().map(|lsn| (LOCAL, lsn, at)));
    }

    fn append_partner(&mut self) {
        if self.rng.below(8) == 0 {
            // The partner restarted: a new generation, lsns going on.
            self.partner_generation += 1;
        }
        self.partner_lsn += 1;
        let (op, data, range) = self.random_input();
        let input = RecordInput {
            epoch: Epoch { number: 1, owner: PARTNER },
            ..Workload::input(op, &data, range, 0)
        };
        let encoded =
            encode_record(&input, Lsn(self.partner_lsn), Generation(self.partner_generation), PARTNER)
                .expect("encodes");
        self.model.appended.insert((DR, Lsn(self.partner_lsn)), encoded.clone());
        loop {
            match self.log().append_copy(DR, &encoded) {
                Ok(lsn) => {
                    let at = self.trace_len();
                    self.model.acked.push((DR, lsn, at));
                    return;
                }
                Err(NvlogError::Full(_)) | Err(NvlogError::TooManyGenerations(_)) => self.checkpoint(DR),
                Err(other) => panic!("append_copy: {other}"),
            }
        }
    }

    fn restart(&mut self) {
        drop(self.log.take());
        let (log, _) = Nvlog::open(self.media.clone(), IDENTITY, self.options).expect("reopen");
        self.log = Some(log);
    }

    fn run(seed: u64, durability: Durability, faults: Faults) -> Workload {
        let mut rng = SplitMix64(seed);
        let media = Arc::new(MemMedia::new(MEDIA_BYTES));
        let options = Options { durability, faults, ..Options::default() };
        let (log, _) = Nvlog::format(media.clone(), &spec(), options).expect("format");
        // Everything before this point was persisted by format.
        media.restart_trace();
        let ops = 1 + rng.below(50) as usize;
        let mut workload = Workload {
            media,
            log: Some(log),
            options,
            model: Model::default(),
            rng,
            partner_lsn: 0,
            partner_generation: 1,
        };
        for _ in 0..ops {
            match workload.rng.below(20) {
                0..=8 => workload.append_local(1),
                9..=11 => {
                    let batch = 2 + workload.rng.below(6) as usize;
                    workload.append_local(batch);
                }
                12..=15 => workload.append_partner(),
                16 | 17 => {
                    let kind = if workload.rng.below(2) == 0 { LOCAL } else { DR };
                    workload.checkpoint(kind);
                }
                _ => workload.restart(),
            }
        }
        workload
    }
}

/// What recovering one image showed.
#[derive(Default)]
struct Tally {
    images: usize,
    violations: Vec<String>,
}

fn recover_records(image: Vec<u8>, options: Options) -> Result<RecoveredImage, String> {
    let media = Arc::new(MemMedia::from_image(image));
    let (log, report) = Nvlog::open(media.clone(), IDENTITY, options).map_err(|e| format!("open: {e}"))?;
    let mut image = RecoveredImage::default();
    for (kind, recovery) in [LOCAL, DR].into_iter().zip(&report.partitions) {
        let status = log.status(kind).map_err(|e| e.to_string())?;
        image.released.insert(kind, status.released_lsn);
        match log.replay(kind, &ReplayFilter::default()) {
            Ok(replay) => {
                image.gaps += replay.gaps.len();
                for record in replay.records {
                    image.records.insert((kind, record.header.lsn), record.encode());
                }
            }
            Err(e) => image.failed.push(format!("{kind}: {e} ({:?}: {:?})", recovery.case, recovery.defect)),
        }
    }
    image.after_open = media.snapshot();
    Ok(image)
}

#[derive(Default)]
struct RecoveredImage {
    records: BTreeMap<(PartitionKind, Lsn), Vec<u8>>,
    released: HashMap<PartitionKind, Lsn>,
    failed: Vec<String>,
    gaps: usize,
    after_open: Vec<u8>,
}

/// Checks one crash image taken after `at` trace events. `flipped` images only need to be
/// free of corrupted records.
fn check_image(
    model: &Model,
    image: Vec<u8>,
    at: usize,
    options: Options,
    flipped: bool,
    label: &str,
    tally: &mut Tally,
) {
    tally.images += 1;
    let mut fail = |what: String| tally.violations.push(format!("{label} at trace point {at}: {what}"));
    let recovered = match recover_records(image, options) {
        Ok(recovered) => recovered,
        // A flipped bit may leave no valid header copy: refusing to open is a clean outcome.
        Err(_) if flipped => return,
        Err(e) => return fail(e),
    };
    for ((kind, lsn), bytes) in &recovered.records {
        match model.appended.get(&(*kind, *lsn)) {
            Some(original) if original == bytes => {}
            Some(_) => fail(format!("{kind} lsn {lsn} replayed with bytes that were never appended")),
            None => fail(format!("{kind} lsn {lsn} replayed but never appended")),
        }
    }
    if flipped {
        return;
    }
    if !recovered.failed.is_empty() {
        return fail(format!("partition failed after a crash: {:?}", recovered.failed));
    }
    if recovered.gaps > 0 {
        fail(format!("{} gaps in replay", recovered.gaps));
    }
    for kind in [LOCAL, DR] {
        let released = recovered.released[&kind];
        if released > model.max_release_started(kind, at) {
            fail(format!("{kind} released up to {released}, beyond any release requested"));
        }
    }
    for &(kind, lsn, acked_at) in &model.acked {
        if acked_at <= at && lsn > recovered.released[&kind] && !recovered.records.contains_key(&(kind, lsn))
        {
            fail(format!("acknowledged {kind} lsn {lsn} lost"));
        }
    }
    // Replay is idempotent: recovering the recovered image again gives the same records.
    match recover_records(recovered.after_open.clone(), options) {
        Ok(again) if again.records == recovered.records => {}
        Ok(_) => fail("a second recovery replayed different records".into()),
        Err(e) => fail(format!("a second recovery failed: {e}")),
    }
    // Life goes on after a crash: appends and header writes on the recovered log, then a clean
    // restart, keep every record.
    if let Err(e) = continue_after_recovery(&recovered, options) {
        fail(format!("after recovery: {e}"));
    }
}

fn continue_after_recovery(recovered: &RecoveredImage, options: Options) -> Result<(), String> {
    let media = Arc::new(MemMedia::from_image(recovered.after_open.clone()));
    let (log, _) = Nvlog::open(media.clone(), IDENTITY, options).map_err(|e| format!("open: {e}"))?;
    let mut expected = recovered.records.clone();
    // A CP first, so the small partition has room (and release is exercised after a crash).
    let tail = log.durable_tail(LOCAL).map_err(|e| e.to_string())?;
    log.release(LOCAL, tail).map_err(|e| format!("release: {e}"))?;
    for (i, data) in [&b"after one"[..], &b"after two"[..]].into_iter().enumerate() {
        let input = write_input(data, 0);
        let lsn = log.append(&input).map_err(|e| format!("append: {e}"))?;
        let encoded = encode_record(&input, lsn, log.generation(), NODE).map_err(|e| e.to_string())?;
        expected.insert((LOCAL, lsn), encoded);
        if i == 0 {
            log.set_mirror_state(DR, nvlog::MirrorState::InSync).map_err(|e| format!("header: {e}"))?;
        }
    }
    drop(log);
    let again = recover_records(media.snapshot(), options)?;
    if !again.failed.is_empty() {
        return Err(format!("partition failed: {:?}", again.failed));
    }
    // Records released at open (the lsn floor) are legitimately gone; everything else stays.
    expected.retain(|(kind, lsn), _| *lsn > again.released[kind]);
    if again.records != expected {
        return Err("records differ after appending to the recovered log".into());
    }
    Ok(())
}

/// Enumerates crash images over `workloads` random workloads; returns the tally.
fn enumerate(seed: u64, workloads: u64, faults: Faults) -> Tally {
    let mut tally = Tally::default();
    let mut rng = SplitMix64(seed);
    for index in 0..workloads {
        let durability = if index % 2 == 0 { Durability::Power } else { Durability::Process };
        let workload_seed = rng.next_u64();
        let workload = Workload::run(workload_seed, durability, faults);
        // Recovery of the images runs the real journal, without the write-side fault.
        let options = Options {
            durability,
            faults: Faults { ack_before_persist: false, ..faults },
            ..Options::default()
        };
        let trace = workload.media.trace();
        let mut sim: CrashSim = workload.media.crash_sim();
        let label = format!("workload seed {workload_seed:#x} ({durability:?})");
        for at in 0..=trace.len() {
            let next: Option<&Event> = trace.get(at);
            let mut images: Vec<(Vec<u8>, bool)> = Vec::new();
            match durability {
                Durability::Process => {
                    images.push((sim.process_crash(), false));
                    if let Some(image) = next.and_then(|event| sim.process_crash_during(event, &mut rng)) {
                        images.push((image, false));
                    }
                }
                Durability::Power => {
                    images.push((sim.power_loss_clean(), false));
                    if sim.pending_writes() > 0 {
                        images.push((sim.process_crash(), false));
                        for _ in 0..3 {
                            images.push((sim.power_loss(&mut rng), false));
                        }
                    }
                }
            }
            if at % 3 == 0 {
                let mut image = images[rng.below(images.len() as u64) as usize].0.clone();
                flip_random_bit(&mut image, 0, &mut rng);
                images.push((image, true));
            }
            for (image, flipped) in images {
                check_image(&workload.model, image, at, options, flipped, &label, &mut tally);
            }
            if let Some(event) = next {
                sim.apply(event);
            }
        }
    }
    tally
}

fn seed() -> u64 {
    std::env::var("NVLOG_CRASH_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

fn workloads(default: u64) -> u64 {
    std::env::var("NVLOG_CRASH_WORKLOADS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

#[test]
fn every_acknowledged_record_survives_every_crash_image() {
    let seed = seed();
    println!("crash-image seed: {seed:#x} (repeat with NVLOG_CRASH_SEED={seed:x})");
    let tally = enumerate(seed, workloads(60), Faults::default());
    println!("crash images checked: {}", tally.images);
    assert!(
        tally.violations.is_empty(),
        "{} violations (seed {seed:#x}), first: {:#?}",
        tally.violations.len(),
        &tally.violations[..tally.violations.len().min(10)]
    );
    assert!(tally.images >= 10_000, "only {} images checked", tally.images);
}

/// The checker bites: acknowledging before the msync loses acknowledged records on power loss.
#[test]
fn checker_catches_acknowledging_before_persisting() {
    let seed = seed();
    println!("seed: {seed:#x}");
    let faults = Faults { ack_before_persist: true, ..Faults::default() };
    let tally = enumerate(seed, workloads(20), faults);
    println!("images: {}, violations: {}", tally.images, tally.violations.len());
    assert!(tally.violations.iter().any(|v| v.contains("lost")), "the checker missed ack-before-persist");
}

/// The checker bites: recovery without the CRC check replays torn or flipped records.
#[test]
fn checker_catches_recovery_without_crc_check() {
    let seed = seed();
    println!("seed: {seed:#x}");
    let faults = Faults { skip_crc_check: true, ..Faults::default() };
    let tally = enumerate(seed, workloads(20), faults);
    println!("images: {}, violations: {}", tally.images, tally.violations.len());
    assert!(
        tally.violations.iter().any(|v| v.contains("never appended")),
        "the checker missed a recovery that skips the CRC"
    );
}

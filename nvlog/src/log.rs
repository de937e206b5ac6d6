//! The journal: format, open (recovery), group-commit append, partner partitions, release and
//! replay (DESIGN §5; S1, S8, S10, S13).
//!
//! Invariants:
//! - an append returns only once its record is durable in the configured mode, and a record
//!   counts as durable only when every record of lower lsn in its partition is durable too (the
//!   durable lsn is a watermark, never a set), so an acknowledged record never sits behind a
//!   torn one;
//! - lsns strictly increase in file order within a partition; a partner's record keeps its
//!   writer's lsn, generation and checksum, and a gap is refused unless the caller declared it
//!   (re-establish, S13);
//! - a record's generation is listed in the header (persisted) before the record is written;
//! - a half is sealed in the header only after its records are durable, and reused only after
//!   the release covering all of it is persisted and the half is zeroed and persisted;
//! - no unreleased record is ever overwritten: `assert!`ed in release builds;
//! - after a failed write or persist the log refuses every further write until reopened (S10).
//!
//! Lock order: a partition's lock, then the header lock; never the reverse.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{NvlogError, Result};
use crate::header::{
    DATA_START, FLAG_FAILED, FileHeader, GenerationSpan, HEADER_BYTES, HEADER_SLOT_BYTES, MAX_GENERATIONS,
    MAX_PARTITIONS, PARTITION_ALIGN, PartitionEntry,
};
use crate::media::Media;
use crate::record::{
    MAX_RECORD_BYTES, RECORD_HEADER_BYTES, Record, RecordHeader, RecordInput, align_up, check_input,
    decode_header, encode_header, encoded_len, seal_header, verify_crc,
};
use crate::recovery::{
    Action, Case, Found, PartitionRecovery, RecoveryReport, Stop, action_for, header_case, scan_half,
    sweep_half,
};
use crate::types::{
    AggregateId, Durability, Epoch, Generation, Identity, Lsn, MirrorState, NodeId, PartitionKind,
};

/// Switches that break the journal on purpose, so tests can show their checkers bite.
#[cfg(feature = "fault-injection")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// `persist_through` returns without persisting: acknowledges before durable.
    pub ack_before_persist: bool,
    /// Recovery accepts records without checking their CRC.
    pub skip_crc_check: bool,
}

/// How a log is opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// When an append counts as durable.
    pub durability: Durability,
    /// This node's lsns start above this value: the highest lsn of this node recorded in any
    /// label it can read. Records at or below it are covered by a CP and are released at open.
    pub lsn_floor: Lsn,
    /// Test-only switches.
    #[cfg(feature = "fault-injection")]
    pub faults: Faults,
}

/// What `format` lays out.
#[derive(Clone, Debug)]
pub struct FormatSpec {
    /// The owner of the log.
    pub identity: Identity,
    /// The partitions and the node whose records each holds (the owner for `Local`). The file
    /// is split evenly between them.
    pub partitions: Vec<(PartitionKind, NodeId)>,
    /// The new log's generation starts above this, and above the generation of any valid
    /// header already on the media: a reformatted node must never reuse a generation its
    /// partners may still hold records of (they refuse older generations). A node whose log
    /// file was lost passes the newest generation its partners announce.
    pub generation_floor: Generation,
}

/// How replay selects records (S8).
#[derive(Clone, Debug, Default)]
pub struct ReplayFilter {
    /// Records at or below this lsn are covered by the writer's last CP and are skipped.
    pub after_lsn: Lsn,
    /// For another writer's partition: the epoch that writer held, per aggregate, when its
    /// partition was frozen for a switchover. A record stamped otherwise is skipped.
    pub frozen_epochs: Option<HashMap<AggregateId, Epoch>>,
}

/// A run of missing lsns found by replay: every lsn strictly between `after` and `next`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LsnGap {
    /// The last lsn present (or the replay's starting point).
    pub after: Lsn,
    /// The next lsn present.
    pub next: Lsn,
}

/// The gaps among `lsns` (ascending, each above `start`) counted from `start`: what a replay
/// from `start` would miss (S8). Sans-IO: `Nvlog::replay` and `mc-model` find gaps with it.
///
/// ```
/// use nvlog::{Lsn, LsnGap, lsn_gaps};
/// assert!(lsn_gaps(Lsn(4), [5, 6, 7].map(Lsn)).is_empty());
/// assert_eq!(
///     lsn_gaps(Lsn(4), [6, 7, 9].map(Lsn)),
///     [LsnGap { after: Lsn(4), next: Lsn(6) }, LsnGap { after: Lsn(7), next: Lsn(9) }]
/// );
/// ```
pub fn lsn_gaps(start: Lsn, lsns: impl IntoIterator<Item = Lsn>) -> Vec<LsnGap> {
    let mut previous = start;
    let mut gaps = Vec::new();
    for lsn in lsns {
        if lsn != previous.next() {
            gaps.push(LsnGap { after: previous, next: lsn });
        }
        previous = lsn;
    }
    gaps
}

/// The records replay selected, in lsn order.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Records to apply, in lsn order.
    pub records: Vec<Record>,
    /// Missing lsns among them: the affected volumes must be NVFAILed (S8).
    pub gaps: Vec<LsnGap>,
    /// Records skipped because of `frozen_epochs`.
    pub skipped_for_epoch: usize,
}

/// A snapshot of one partition for status and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Which partition.
    pub kind: PartitionKind,
    /// Whose records it holds.
    pub writer: NodeId,
    /// The receiver's account of the mirror (S13).
    pub mirror_state: MirrorState,
    /// Raised whenever the partition is reset.
    pub partition_generation: u64,
    /// Every record at or below it may be overwritten.
    pub released_lsn: Lsn,
    /// The highest lsn written.
    pub last_lsn: Lsn,
    /// The highest lsn such that it and every lower one are durable.
    pub durable_lsn: Lsn,
    /// Unreleased records held.
    pub unreleased_records: usize,
    /// Bytes of both halves.
    pub size_bytes: u64,
    /// Bytes holding records that are not yet released (whole halves are freed at once).
    pub used_bytes: u64,
    /// Whether recovery marked it failed.
    pub failed: bool,
}

/// Counters of the journal (the controller exports them as metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records appended (local and copies).
    pub appends: u64,
    /// Bytes of records appended.
    pub append_bytes: u64,
    /// Persist calls (msync) issued, for records and for the header.
    pub persists: u64,
    /// Appends that found the partition full and waited.
    pub full_waits: u64,
    /// I/O errors (each latches the log as failed).
    pub io_errors: u64,
}

#[derive(Default)]
struct Counters {
    appends: AtomicU64,
    append_bytes: AtomicU64,
    persists: AtomicU64,
    full_waits: AtomicU64,
    io_errors: AtomicU64,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    lsn: Lsn,
    offset: u64,
    len: u32,
}

/// The volatile state of one partition; its persistent fields mirror the header's entry and
/// change only together with it, under this partition's lock.
#[derive(Debug)]
struct PartState {
    writer: NodeId,
    active_half: u32,
    /// Next free byte in the active half.
    write_pos: u64,
    /// Bytes of the active half known to be persisted (power mode).
    persisted_pos: u64,
    /// Raised at every half switch, so a flush that started before it does not move
    /// `persisted_pos` of the new half.
    round: u64,
    flushing: bool,
    /// The sealed half is being zeroed, without the partition lock.
    zeroing: bool,
    /// The last lsn of each half's current contents, or 0.
    half_last: [Lsn; 2],
    /// Bytes written in the sealed half (what must be zeroed before reuse).
    sealed_extent: u64,
    /// The sealed half holds nothing unreleased and is zeroed.
    sealed_free: bool,
    last_lsn: Lsn,
    durable_lsn: Lsn,
    released: Lsn,
    /// This node's new lsns start above it (persisted as the entry's `lsn_floor`).
    floor: Lsn,
    generations: Vec<GenerationSpan>,
    /// A gap the caller declared (re-establish at the writer's next lsn, S13).
    gap_allowed_at: Option<Lsn>,
    index: VecDeque<Entry>,
    failed: bool,
    mirror_state: MirrorState,
    partition_generation: u64,
}

impl PartState {
    /// The highest lsn covered: records held or released.
    fn tail(&self) -> Lsn {
        self.last_lsn.max(self.released)
    }
}

struct Partition {
    kind: PartitionKind,
    index: usize,
    offset: u64,
    half_size: u64,
    state: Mutex<PartState>,
    /// Signalled when durability advances, a flush ends, or space is released.
    changed: Condvar,
}

impl Partition {
    fn half_offset(&self, half: u32) -> u64 {
        self.offset + u64::from(half) * self.half_size
    }

    fn lock(&self) -> MutexGuard<'_, PartState> {
        self.state.lock().expect("an NVLog partition lock holder panicked")
    }
}

/// The NVLog of one node.
pub struct Nvlog<M: Media> {
    media: M,
    options: Options,
    identity: Identity,
    generation: Generation,
    header: Mutex<FileHeader>,
    parts: Vec<Partition>,
    failed: AtomicBool,
    counters: Counters,
}

impl<M: Media> std::fmt::Debug for Nvlog<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvlog")
            .field("identity", &self.identity)
            .field("generation", &self.generation)
            .field("durability", &self.options.durability)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

const ZERO_CHUNK: usize = 64 * 1024;
static ZEROES: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> NvlogError {
    move |source| NvlogError::Io { op, source }
}

/// Reads `[offset, offset + len)` in chunks and calls `nonzero(at, len)` for each chunk that
/// is not all zero; stops when it returns `true`. Whether every chunk read was zero.
fn scan_nonzero<M: Media + ?Sized>(
    media: &M,
    offset: u64,
    len: u64,
    mut nonzero: impl FnMut(u64, usize) -> io::Result<bool>,
) -> io::Result<bool> {
    let mut buf = vec![0u8; ZERO_CHUNK];
    let mut done = 0u64;
    let mut all_zero = true;
    while done < len {
        let chunk = usize::try_from((len - done).min(ZERO_CHUNK as u64)).expect("chunk fits usize");
        media.read(offset + done, &mut buf[..chunk])?;
        if buf[..chunk].iter().any(|&b| b != 0) {
            all_zero = false;
            if nonzero(offset + done, chunk)? {
                break;
            }
        }
        done += chunk as u64;
    }
    Ok(all_zero)
}

/// Whether every byte of `[offset, offset + len)` reads as zero.
fn is_zero<M: Media + ?Sized>(media: &M, offset: u64, len: u64) -> io::Result<bool> {
    scan_nonzero(media, offset, len, |_, _| Ok(true))
}

/// Writes zeroes over `[offset, offset + len)` where the media is not already zero.
fn zero_range<M: Media + ?Sized>(media: &M, offset: u64, len: u64) -> io::Result<()> {
    scan_nonzero(media, offset, len, |at, chunk| media.write(at, &ZEROES[..chunk]).map(|()| false))
        .map(|_| ())
}

impl<M: Media> Nvlog<M> {
    /// Lays out a new log on `media` (zeroing it), then opens it.
    pub fn format(media: M, spec: &FormatSpec, options: Options) -> Result<(Nvlog<M>, RecoveryReport)> {
        let len = media.len();
        let count = spec.partitions.len();
        if count == 0 || count > MAX_PARTITIONS {
            return Err(NvlogError::InvalidSpec(format!("{count} partitions; 1 to 4 are allowed")));
        }
        if spec.identity.node.0 == 0 {
            return Err(NvlogError::InvalidSpec("node id 0".into()));
        }
        let per_partition =
            (len.saturating_sub(DATA_START) / count as u64) / PARTITION_ALIGN * PARTITION_ALIGN;
        if per_partition < PARTITION_ALIGN {
            return Err(NvlogError::InvalidSpec(format!(
                "{len} bytes are too small for {count} partitions of at least {PARTITION_ALIGN} bytes"
            )));
        }
        let mut partitions = Vec::with_capacity(count);
        for (index, &(kind, writer)) in spec.partitions.iter().enumerate() {
            if writer.0 == 0 {
                return Err(NvlogError::InvalidSpec(format!("partition {kind} has writer node 0")));
            }
            if (kind == PartitionKind::Local) != (writer == spec.identity.node) {
                return Err(NvlogError::InvalidSpec(format!(
                    "partition {kind} cannot hold the records of node {writer}"
                )));
            }
            partitions.push(PartitionEntry {
                kind,
                mirror_state: MirrorState::None,
                offset: DATA_START + index as u64 * per_partition,
                size: per_partition,
                writer,
                flags: 0,
                released_lsn: Lsn::ZERO,
                partition_generation: 1,
                active_half: 0,
                sealed_last_lsn: Lsn::ZERO,
                generations: Vec::new(),
                lsn_floor: Lsn::ZERO,
            });
        }
        let mut header = FileHeader {
            sequence: 0,
            cluster: spec.identity.cluster,
            node: spec.identity.node,
            log_generation: Generation(1),
            file_bytes: len,
            partitions,
        };
        let mut old_generation = spec.generation_floor;
        for slot in 0..2u64 {
            let mut bytes = vec![0u8; HEADER_BYTES];
            media.read(slot * HEADER_SLOT_BYTES, &mut bytes).map_err(io_err("read an old header"))?;
            if let Ok(old) = FileHeader::decode(&bytes, slot, len) {
                old_generation = old_generation.max(old.log_generation);
            }
        }
        header.log_generation = Generation(
            old_generation
                .0
                .checked_add(1)
                .ok_or_else(|| NvlogError::InvalidSpec("the log generation is exhausted".into()))?,
        );
        header.check_layout().map_err(|defect| NvlogError::InvalidSpec(defect.to_string()))?;
        zero_range(&media, 0, len).map_err(io_err("zero the new log"))?;
        for sequence in [0, 1] {
            header.sequence = sequence;
            media
                .write(header.slot() * HEADER_SLOT_BYTES, &header.encode())
                .map_err(io_err("write header"))?;
        }
        media.persist(0, len).map_err(io_err("persist the new log"))?;
        Nvlog::open(media, spec.identity, options)
    }

    /// Opens a log: recovery by the decision table, a new log generation, and the lsn floor.
    pub fn open(media: M, identity: Identity, options: Options) -> Result<(Nvlog<M>, RecoveryReport)> {
        let len = media.len();
        let mut copies = Vec::with_capacity(2);
        for slot in 0..2u64 {
            let mut bytes = vec![0u8; HEADER_BYTES];
            media.read(slot * HEADER_SLOT_BYTES, &mut bytes).map_err(io_err("read header"))?;
            copies.push(FileHeader::decode(&bytes, slot, len));
        }
        let checks: Vec<_> = copies.iter().map(|copy| copy.as_ref().map(|_| ()).map_err(|e| *e)).collect();
        let header_case = header_case(&checks[0], &checks[1]);
        let mut header = match (copies.swap_remove(1), copies.swap_remove(0)) {
            (Ok(one), Ok(zero)) => {
                if one.sequence > zero.sequence {
                    one
                } else {
                    zero
                }
            }
            (Ok(valid), Err(_)) | (Err(_), Ok(valid)) => valid,
            (Err(slot1), Err(slot0)) => {
                debug_assert_eq!(action_for(Case::BothHeadersBad), Action::RefuseToOpen);
                return Err(NvlogError::NoValidHeader { slot0, slot1 });
            }
        };
        if header.cluster != identity.cluster || header.node != identity.node {
            debug_assert_eq!(action_for(Case::ForeignIdentity), Action::RefuseToOpen);
            return Err(NvlogError::ForeignIdentity {
                found_cluster: header.cluster,
                found_node: header.node,
                expected_node: identity.node,
            });
        }
        #[cfg(feature = "fault-injection")]
        let check_crc = !options.faults.skip_crc_check;
        #[cfg(not(feature = "fault-injection"))]
        let check_crc = true;

        let mut parts = Vec::with_capacity(header.partitions.len());
        let mut reports = Vec::with_capacity(header.partitions.len());
        for (index, entry) in header.partitions.iter_mut().enumerate() {
            let (state, report) = recover_partition(&media, entry, options.durability, check_crc)?;
            parts.push(Partition {
                kind: entry.kind,
                index,
                offset: entry.offset,
                half_size: entry.half_size(),
                state: Mutex::new(state),
                changed: Condvar::new(),
            });
            reports.push(report);
        }
        // The zeroing done by recovery must be durable before the header that relies on it, and
        // records a crash left in the page cache must be durable before anything is built on them.
        if options.durability == Durability::Power {
            media.persist(DATA_START, len - DATA_START).map_err(io_err("persist recovered log"))?;
        }
        let generation = Generation(header.log_generation.0.checked_add(1).ok_or_else(|| {
            NvlogError::InvalidSpec("the log generation is exhausted; reformat the log".into())
        })?);
        header.log_generation = generation;
        let log = Nvlog {
            media,
            options,
            identity,
            generation,
            header: Mutex::new(header),
            parts,
            failed: AtomicBool::new(false),
            counters: Counters::default(),
        };
        log.write_header(|_| {})?;
        if let Ok(local) = log.partition(PartitionKind::Local)
            && options.lsn_floor > local.lock().released
        {
            log.release(PartitionKind::Local, options.lsn_floor)?;
        }
        Ok((log, RecoveryReport { header_case, generation, partitions: reports }))
    }

    /// The owner of the log.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The log generation of this open; it salts this node's new records.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The durability mode.
    pub fn durability(&self) -> Durability {
        self.options.durability
    }

    /// The partitions this log has, in table order.
    pub fn partition_kinds(&self) -> Vec<PartitionKind> {
        self.parts.iter().map(|part| part.kind).collect()
    }

    /// The underlying media.
    pub fn media(&self) -> &M {
        &self.media
    }

    /// Counters since open.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            appends: c.appends.load(Ordering::Relaxed),
            append_bytes: c.append_bytes.load(Ordering::Relaxed),
            persists: c.persists.load(Ordering::Relaxed),
            full_waits: c.full_waits.load(Ordering::Relaxed),
            io_errors: c.io_errors.load(Ordering::Relaxed),
        }
    }

    fn partition(&self, kind: PartitionKind) -> Result<&Partition> {
        self.parts.iter().find(|part| part.kind == kind).ok_or(NvlogError::NoPartition(kind))
    }

    fn check_writable(&self, part: &Partition, state: &PartState) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        if state.failed {
            return Err(NvlogError::PartitionFailed(part.kind));
        }
        Ok(())
    }

    /// Latches the log as failed (S10) and wakes every waiter so it sees the failure.
    fn fail(&self, op: &'static str, source: io::Error) -> NvlogError {
        self.failed.store(true, Ordering::Release);
        self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
        for part in &self.parts {
            part.changed.notify_all();
        }
        NvlogError::Io { op, source }
    }

    /// Every write and persist goes through these two, which refuse to touch the media once
    /// the log has failed (S10), whoever failed it and whenever.
    fn media_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        self.media.write(offset, data).map_err(|e| self.fail("write", e))
    }

    fn media_persist(&self, offset: u64, len: u64) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        self.counters.persists.fetch_add(1, Ordering::Relaxed);
        self.media.persist(offset, len).map_err(|e| self.fail("persist", e))
    }

    /// Writes the header with `change` applied, into the older slot; in `power` mode persists it
    /// before returning, so the other slot always holds a durable copy.
    fn write_header(&self, change: impl FnOnce(&mut FileHeader)) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        let mut header = self.header.lock().expect("the NVLog header lock holder panicked");
        // Checked again under the lock: a header write that failed while this one waited must
        // not be followed by a write over the last good copy.
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        change(&mut header);
        header.sequence += 1;
        let offset = header.slot() * HEADER_SLOT_BYTES;
        self.media_write(offset, &header.encode())?;
        if self.options.durability == Durability::Power {
            self.media_persist(offset, HEADER_BYTES as u64)?;
        }
        Ok(())
    }

    fn update_entry(&self, part: &Partition, change: impl FnOnce(&mut PartitionEntry)) -> Result<()> {
        self.write_header(|header| change(&mut header.partitions[part.index]))
    }

    /// Appends a record of this node to the `local` partition and returns once it is durable in
    /// the configured mode; waits while the partition is full.
    pub fn append(&self, input: &RecordInput<'_>) -> Result<Lsn> {
        let lsn = self.append_buffered(input)?;
        self.persist_through(PartitionKind::Local, lsn)?;
        Ok(lsn)
    }

    /// Writes a record of this node to the `local` partition without waiting for durability;
    /// waits while the partition is full. Pair with `persist_through` before acknowledging.
    pub fn append_buffered(&self, input: &RecordInput<'_>) -> Result<Lsn> {
        self.append_local(input, true, false).map(|(lsn, _)| lsn)
    }

    /// As `append_buffered`, but returns `Full` instead of waiting for space.
    pub fn try_append_buffered(&self, input: &RecordInput<'_>) -> Result<Lsn> {
        self.append_local(input, false, false).map(|(lsn, _)| lsn)
    }

    /// As `try_append_buffered`, and returns the record as it was encoded, for the mirror: the
    /// record is encoded and checksummed once, and the same bytes go to the log and the partner.
    pub fn try_append_encoded(&self, input: &RecordInput<'_>) -> Result<(Lsn, Vec<u8>)> {
        let (lsn, encoded) = self.append_local(input, false, true)?;
        Ok((lsn, encoded.unwrap_or_default()))
    }

    fn append_local(
        &self,
        input: &RecordInput<'_>,
        wait: bool,
        keep: bool,
    ) -> Result<(Lsn, Option<Vec<u8>>)> {
        let part = self.partition(PartitionKind::Local)?;
        check_input(input)?;
        let total = encoded_len(input.payload.len()) as u64;
        let mut state = part.lock();
        state = self.make_room(part, state, total, wait)?;
        let lsn = state
            .tail()
            .max(state.floor)
            .checked_next()
            .filter(|lsn| lsn.0 < u64::MAX)
            .ok_or(NvlogError::LsnExhausted)?;
        let mut header = encode_header(input, lsn, self.generation, self.identity.node)?;
        self.list_generation(part, &mut state, self.generation, lsn)?;
        seal_header(&mut header, self.generation, input.payload);
        let offset = part.half_offset(state.active_half) + state.write_pos;
        let padding = align_up(input.payload.len()) - input.payload.len();
        let kept = if keep {
            let mut encoded = Vec::with_capacity(encoded_len(input.payload.len()));
            encoded.extend_from_slice(&header);
            encoded.extend_from_slice(input.payload);
            encoded.resize(encoded.len() + padding, 0);
            self.media_write(offset, &encoded)?;
            Some(encoded)
        } else {
            self.media_write(offset, &header)?;
            self.media_write(offset + RECORD_HEADER_BYTES as u64, input.payload)?;
            if padding > 0 {
                let at = offset + (RECORD_HEADER_BYTES + input.payload.len()) as u64;
                self.media_write(at, &ZEROES[..padding])?;
            }
            None
        };
        self.commit_written(&mut state, lsn, offset, total);
        Ok((lsn, kept))
    }

    /// Appends a record exactly as its writer encoded it (a partner's record, or this node's own
    /// record returned by a partner after a restart) and returns once it is durable. Keeps the
    /// writer's lsn, generation and checksum. Refuses a record of another writer, one at or below
    /// the tail, a gap not declared with `allow_gap_at` (S13), and an older generation. Returns
    /// `Full` at once instead of waiting for space.
    pub fn append_copy(&self, kind: PartitionKind, encoded: &[u8]) -> Result<Lsn> {
        let lsn = self.append_copy_buffered(kind, encoded)?;
        self.persist_through(kind, lsn)?;
        Ok(lsn)
    }

    /// As `append_copy`, without waiting for durability: pair with `persist_through` before
    /// acknowledging (a receiver persists a batch of records with one msync).
    pub fn append_copy_buffered(&self, kind: PartitionKind, encoded: &[u8]) -> Result<Lsn> {
        let header = decode_header(encoded)?;
        verify_crc(&header, encoded)?;
        if encoded.len() != header.total_len as usize {
            return Err(NvlogError::InvalidRecord(crate::record::RecordDefect::BadLength(
                "bytes after the record",
            )));
        }
        self.append_copy_checked(kind, &header, encoded)
    }

    fn append_copy_checked(&self, kind: PartitionKind, header: &RecordHeader, encoded: &[u8]) -> Result<Lsn> {
        let part = self.partition(kind)?;
        let mut state = part.lock();
        self.check_writable(part, &state)?;
        if header.writer != state.writer {
            return Err(NvlogError::WrongWriter { expected: state.writer, got: header.writer });
        }
        if kind == PartitionKind::Local && header.generation > self.generation {
            return Err(NvlogError::InvalidRecord(crate::record::RecordDefect::BadField(
                "a generation of this node that has not started yet",
            )));
        }
        let total = u64::from(header.total_len);
        // A receiver must never block its stream (the release that frees space arrives on it):
        // a full partition is an error it answers by not acknowledging yet. Making room may
        // drop the lock (to zero a released half), so the order checks come after it.
        state = self.make_room(part, state, total, false)?;
        let tail = state.tail();
        if header.lsn <= tail {
            return Err(NvlogError::NotAfterTail { got: header.lsn, tail });
        }
        if header.lsn != tail.next() && state.gap_allowed_at != Some(header.lsn) {
            return Err(NvlogError::Gap { expected: tail.next(), got: header.lsn });
        }
        if let Some(newest) = state.generations.last()
            && header.generation < newest.generation
        {
            return Err(NvlogError::StaleGeneration { got: header.generation, newest: newest.generation });
        }
        self.list_generation(part, &mut state, header.generation, header.lsn)?;
        let offset = part.half_offset(state.active_half) + state.write_pos;
        self.media_write(offset, encoded)?;
        state.gap_allowed_at = None;
        self.commit_written(&mut state, header.lsn, offset, total);
        Ok(header.lsn)
    }

    /// Declares that the next record of `kind` may be `lsn` although lsns below it are missing:
    /// the writer re-established the mirror at its next lsn (§4.2, S13). Replay still reports
    /// the gap until a release covers it.
    pub fn allow_gap_at(&self, kind: PartitionKind, lsn: Lsn) -> Result<()> {
        let part = self.partition(kind)?;
        let mut state = part.lock();
        let tail = state.tail();
        if lsn <= tail {
            return Err(NvlogError::NotAfterTail { got: lsn, tail });
        }
        state.gap_allowed_at = Some(lsn);
        Ok(())
    }

    fn commit_written(&self, state: &mut PartState, lsn: Lsn, offset: u64, total: u64) {
        let active = state.active_half as usize;
        state.index.push_back(Entry { lsn, offset, len: u32::try_from(total).expect("record ≤ 1 MiB") });
        state.write_pos += total;
        state.half_last[active] = lsn;
        state.last_lsn = lsn;
        if self.options.durability == Durability::Process {
            // The copy into the mapping is the persist in process mode, and every lower lsn of
            // this partition was copied earlier under the same lock.
            state.durable_lsn = lsn;
        }
        self.counters.appends.fetch_add(1, Ordering::Relaxed);
        self.counters.append_bytes.fetch_add(total, Ordering::Relaxed);
    }

    /// Lists `generation` in the header (persisted) before its first record is written.
    fn list_generation(
        &self,
        part: &Partition,
        state: &mut PartState,
        generation: Generation,
        lsn: Lsn,
    ) -> Result<()> {
        if state.generations.last().is_some_and(|span| span.generation == generation) {
            return Ok(());
        }
        let span = GenerationSpan { generation, first_lsn: lsn };
        // A listed generation whose first record never became durable (a crash between the
        // header write and the record) holds nothing: give its place to the new one, so first
        // lsns keep strictly increasing.
        if state.generations.last().is_some_and(|last| last.first_lsn >= lsn) {
            self.update_entry(part, |entry| {
                entry.generations.pop();
                entry.generations.push(span);
            })?;
            state.generations.pop();
            state.generations.push(span);
            return Ok(());
        }
        if state.generations.len() == MAX_GENERATIONS {
            return Err(NvlogError::TooManyGenerations(part.kind));
        }
        self.update_entry(part, |entry| entry.generations.push(span))?;
        state.generations.push(span);
        Ok(())
    }

    /// Makes room for a record of `total` bytes in the active half, switching halves when the
    /// other one is free; with `may_wait`, waits for a release while both are in use. May drop
    /// and retake the lock (waiting, or zeroing a released half): callers decide lsns after it.
    fn make_room<'a>(
        &self,
        part: &'a Partition,
        mut state: MutexGuard<'a, PartState>,
        total: u64,
        may_wait: bool,
    ) -> Result<MutexGuard<'a, PartState>> {
        if total > part.half_size || total > MAX_RECORD_BYTES as u64 {
            return Err(NvlogError::RecordTooLarge { len: total, half: part.half_size });
        }
        let mut counted = false;
        loop {
            self.check_writable(part, &state)?;
            if state.write_pos + total <= part.half_size {
                return Ok(state);
            }
            if state.sealed_free {
                state = self.switch_half(part, state)?;
                continue;
            }
            if !may_wait {
                return Err(NvlogError::Full(part.kind));
            }
            if !counted {
                self.counters.full_waits.fetch_add(1, Ordering::Relaxed);
                counted = true;
            }
            state = wait(part, state);
        }
    }

    /// Seals the active half and activates the other (which is free: released and zeroed).
    fn switch_half<'a>(
        &self,
        part: &'a Partition,
        mut state: MutexGuard<'a, PartState>,
    ) -> Result<MutexGuard<'a, PartState>> {
        assert!(state.sealed_free, "switching into a half that holds unreleased records");
        let old = state.active_half;
        let new = 1 - old;
        let sealed_last = state.half_last[old as usize];
        if self.options.durability == Durability::Power && state.persisted_pos < state.write_pos {
            // The seal must never name a record that is not durable.
            let start = part.half_offset(old) + state.persisted_pos;
            self.media_persist(start, state.write_pos - state.persisted_pos)?;
            state.durable_lsn = state.durable_lsn.max(sealed_last);
            part.changed.notify_all();
        }
        self.update_entry(part, |entry| {
            entry.active_half = new;
            entry.sealed_last_lsn = sealed_last;
        })?;
        state.active_half = new;
        state.round += 1;
        state.sealed_extent = state.write_pos;
        state.sealed_free = false;
        state.half_last[new as usize] = Lsn::ZERO;
        state.write_pos = 0;
        state.persisted_pos = 0;
        self.free_sealed_if_released(part, state)
    }

    /// Zeroes (and, in `power` mode, persists) the sealed half once all of it is released,
    /// making it reusable. The zeroing runs without the partition lock, so appends go on in the
    /// active half meanwhile; the half stays unusable until it is done, and a reset waits for it.
    fn free_sealed_if_released<'a>(
        &self,
        part: &'a Partition,
        mut state: MutexGuard<'a, PartState>,
    ) -> Result<MutexGuard<'a, PartState>> {
        let sealed = 1 - state.active_half;
        if state.sealed_free || state.zeroing || state.half_last[sealed as usize] > state.released {
            return Ok(state);
        }
        state.zeroing = true;
        let offset = part.half_offset(sealed);
        let extent = state.sealed_extent;
        drop(state);
        let result = self.zero_and_persist(offset, extent);
        let mut state = part.lock();
        state.zeroing = false;
        part.changed.notify_all();
        result?;
        // Nothing else touched the sealed half meanwhile: a switch needs it free and a reset
        // waits for the zeroing.
        assert_eq!(1 - state.active_half, sealed, "the sealed half changed while it was being zeroed");
        state.sealed_extent = 0;
        state.half_last[sealed as usize] = Lsn::ZERO;
        state.sealed_free = true;
        Ok(state)
    }

    /// Writes zeroes over a range whose contents are known to be records (no read first), then
    /// persists it in `power` mode.
    fn zero_and_persist(&self, offset: u64, len: u64) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let chunk = usize::try_from((len - done).min(ZERO_CHUNK as u64)).expect("chunk fits usize");
            self.media_write(offset + done, &ZEROES[..chunk])?;
            done += chunk as u64;
        }
        if self.options.durability == Durability::Power && len > 0 {
            self.media_persist(offset, len)?;
        }
        Ok(())
    }

    /// Returns once every record of `kind` up to `lsn` is durable. In `power` mode concurrent
    /// callers share one msync (group commit): one of them persists everything written so far
    /// while the others wait for it.
    pub fn persist_through(&self, kind: PartitionKind, lsn: Lsn) -> Result<()> {
        let part = self.partition(kind)?;
        #[cfg(feature = "fault-injection")]
        if self.options.faults.ack_before_persist {
            return Ok(());
        }
        let mut state = part.lock();
        loop {
            if self.failed.load(Ordering::Acquire) {
                return Err(NvlogError::Failed);
            }
            if state.durable_lsn >= lsn {
                return Ok(());
            }
            if lsn > state.last_lsn {
                // Never written, or dropped by a reset since: it is not durable and never will be.
                return Err(NvlogError::NotWritten { kind, lsn });
            }
            if state.flushing {
                state = wait(part, state);
                continue;
            }
            state.flushing = true;
            let round = state.round;
            let start = state.persisted_pos;
            let end = state.write_pos;
            let target = state.last_lsn;
            let offset = part.half_offset(state.active_half);
            drop(state);
            let result = if end > start { self.media_persist(offset + start, end - start) } else { Ok(()) };
            state = part.lock();
            state.flushing = false;
            part.changed.notify_all();
            result?;
            if state.round == round {
                state.persisted_pos = state.persisted_pos.max(end);
            }
            state.durable_lsn = state.durable_lsn.max(target);
        }
    }

    /// Frees every record of `kind` at or below `lsn` (after a CP covered them). The release
    /// point is persisted before any of that space is reused. Idempotent; never goes back.
    pub fn release(&self, kind: PartitionKind, lsn: Lsn) -> Result<()> {
        let part = self.partition(kind)?;
        let mut state = part.lock();
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        if lsn <= state.released {
            return Ok(());
        }
        let mut generations = state.generations.clone();
        // A generation is gone once its last lsn (just below the next one's first) is released;
        // the newest stays listed so its writer can go on.
        while generations.len() > 1 && generations[1].first_lsn.0 - 1 <= lsn.0 {
            generations.remove(0);
        }
        self.update_entry(part, |entry| {
            entry.released_lsn = lsn;
            entry.generations = generations.clone();
        })?;
        state.released = lsn;
        state.generations = generations;
        while state.index.front().is_some_and(|entry| entry.lsn <= lsn) {
            state.index.pop_front();
        }
        let state = self.free_sealed_if_released(part, state)?;
        drop(state);
        part.changed.notify_all();
        Ok(())
    }

    /// Persists the receiver's account of a writer's mirror (S13).
    pub fn set_mirror_state(&self, kind: PartitionKind, mirror_state: MirrorState) -> Result<()> {
        let part = self.partition(kind)?;
        let mut state = part.lock();
        self.update_entry(part, |entry| entry.mirror_state = mirror_state)?;
        state.mirror_state = mirror_state;
        Ok(())
    }

    /// Drops every record of `kind` (its records are lost or were recovered elsewhere), clears a
    /// `failed` mark and raises the partition generation, which the receiver announces in its
    /// hello (S13). The release point stays: lsns never go back.
    pub fn reset_partition(&self, kind: PartitionKind) -> Result<u64> {
        let part = self.partition(kind)?;
        let mut state = part.lock();
        // A group-commit leader still in its msync must not land its result in the new state,
        // and a zeroing in progress must not land in the records that come after the reset.
        while state.flushing || state.zeroing {
            state = wait(part, state);
        }
        if self.failed.load(Ordering::Acquire) {
            return Err(NvlogError::Failed);
        }
        let released = state.released;
        // The release point stays where the last CP put it, so the records above it can be
        // recovered from a partner's copy (S8); this node's own new lsns go on above every lsn
        // the partition held.
        let floor = state.floor.max(state.tail());
        let partition_generation = state.partition_generation + 1;
        let round = state.round + 1;
        // Forget the records in the header first: a crash after this point finds an empty partition.
        self.update_entry(part, |entry| {
            entry.generations.clear();
            entry.sealed_last_lsn = Lsn::ZERO;
            entry.active_half = 0;
            entry.flags &= !FLAG_FAILED;
            entry.partition_generation = partition_generation;
            entry.lsn_floor = floor;
        })?;
        zero_range(&self.media, part.offset, 2 * part.half_size)
            .map_err(|e| self.fail("zero a partition", e))?;
        if self.options.durability == Durability::Power {
            self.media_persist(part.offset, 2 * part.half_size)?;
        }
        *state = PartState {
            writer: state.writer,
            mirror_state: state.mirror_state,
            partition_generation,
            floor,
            round,
            ..empty_state(released)
        };
        part.changed.notify_all();
        Ok(partition_generation)
    }

    /// How many times `kind` switched halves (or was reset) since open: a caller starts a CP
    /// when it changes, so the sealed half is released while the other one fills (DESIGN §4).
    pub fn half_switches(&self, kind: PartitionKind) -> Result<u64> {
        Ok(self.partition(kind)?.lock().round)
    }

    /// The highest lsn `kind` covers durably: its durable records, or its release point.
    pub fn durable_tail(&self, kind: PartitionKind) -> Result<Lsn> {
        let part = self.partition(kind)?;
        let state = part.lock();
        Ok(state.durable_lsn.max(state.released))
    }

    /// A snapshot of one partition.
    pub fn status(&self, kind: PartitionKind) -> Result<PartitionStatus> {
        let part = self.partition(kind)?;
        let state = part.lock();
        let sealed_used = if state.sealed_free { 0 } else { state.sealed_extent };
        Ok(PartitionStatus {
            kind,
            writer: state.writer,
            mirror_state: state.mirror_state,
            partition_generation: state.partition_generation,
            released_lsn: state.released,
            last_lsn: state.last_lsn,
            durable_lsn: state.durable_lsn,
            unreleased_records: state.index.iter().filter(|entry| entry.lsn > state.released).count(),
            size_bytes: 2 * part.half_size,
            used_bytes: sealed_used + state.write_pos,
            failed: state.failed,
        })
    }

    /// The encoded records of `kind` above `lsn`, in lsn order: what a receiver returns to a
    /// writer that recovered only up to `lsn` (DESIGN §5, S8).
    pub fn records_above(&self, kind: PartitionKind, lsn: Lsn) -> Result<Vec<Vec<u8>>> {
        let part = self.partition(kind)?;
        let state = part.lock();
        if state.failed {
            return Err(NvlogError::PartitionFailed(kind));
        }
        let mut out = Vec::new();
        for entry in state.index.iter().filter(|entry| entry.lsn > lsn && entry.lsn > state.released) {
            let mut bytes = vec![0u8; entry.len as usize];
            self.media.read(entry.offset, &mut bytes).map_err(io_err("read a record"))?;
            out.push(bytes);
        }
        Ok(out)
    }

    /// The unreleased records of `kind` in lsn order, filtered as S8 says, with any gap in the
    /// writer's lsns. Read-only: replaying twice gives the same answer.
    pub fn replay(&self, kind: PartitionKind, filter: &ReplayFilter) -> Result<Replay> {
        let part = self.partition(kind)?;
        let state = part.lock();
        if state.failed {
            return Err(NvlogError::PartitionFailed(kind));
        }
        let start = state.released.max(filter.after_lsn);
        let mut replay = Replay {
            gaps: lsn_gaps(start, state.index.iter().map(|entry| entry.lsn).filter(|lsn| *lsn > start)),
            ..Replay::default()
        };
        let mut bytes = Vec::new();
        for entry in state.index.iter().filter(|entry| entry.lsn > start) {
            bytes.resize(entry.len as usize, 0);
            self.media.read(entry.offset, &mut bytes).map_err(io_err("read a record"))?;
            // Recovery verified these bytes; verify again so memory corruption since then is an
            // error, not a replayed write.
            let record = if self.checks_crc() {
                Record::decode(&bytes)?
            } else {
                let header = decode_header(&bytes)?;
                let end = RECORD_HEADER_BYTES + header.payload_len as usize;
                Record { header, payload: bytes::Bytes::copy_from_slice(&bytes[RECORD_HEADER_BYTES..end]) }
            };
            if record.header.lsn != entry.lsn {
                return Err(NvlogError::IndexMismatch { kind, indexed: entry.lsn, found: record.header.lsn });
            }
            if let Some(epochs) = &filter.frozen_epochs
                && epochs.get(&record.header.aggregate) != Some(&record.header.epoch)
            {
                replay.skipped_for_epoch += 1;
                continue;
            }
            replay.records.push(record);
        }
        Ok(replay)
    }

    fn checks_crc(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        return !self.options.faults.skip_crc_check;
        #[cfg(not(feature = "fault-injection"))]
        true
    }
}

/// Waits for a change of the partition, with a bound: a failure latched without this
/// partition's lock (S10) must be noticed even if its wakeup came before the wait began.
fn wait<'a>(part: &'a Partition, state: MutexGuard<'a, PartState>) -> MutexGuard<'a, PartState> {
    const RECHECK: std::time::Duration = std::time::Duration::from_millis(50);
    part.changed.wait_timeout(state, RECHECK).expect("an NVLog partition lock holder panicked").0
}

fn empty_state(released: Lsn) -> PartState {
    PartState {
        writer: NodeId(0),
        active_half: 0,
        write_pos: 0,
        persisted_pos: 0,
        round: 0,
        flushing: false,
        zeroing: false,
        half_last: [Lsn::ZERO; 2],
        sealed_extent: 0,
        sealed_free: true,
        last_lsn: Lsn::ZERO,
        durable_lsn: Lsn::ZERO,
        released,
        floor: Lsn::ZERO,
        generations: Vec::new(),
        gap_allowed_at: None,
        index: VecDeque::new(),
        failed: false,
        mirror_state: MirrorState::None,
        partition_generation: 0,
    }
}

/// Recovers one partition by the decision table; fixes `entry` (failed flag) in place and
/// prepares the media (zeroing) so that the next header write is consistent with it.
///
/// Nothing that verifies is ever zeroed where it could matter: where the header and the
/// records disagree (possible only when the newest header copy was lost to corruption and an
/// older one is in use) or a damaged or zeroed record is followed by verified ones in `process`
/// mode, the partition fails instead, and S8 recovers its records from a partner.
fn recover_partition<M: Media>(
    media: &M,
    entry: &mut PartitionEntry,
    durability: Durability,
    check_crc: bool,
) -> Result<(PartState, PartitionRecovery)> {
    let mut state = PartState {
        writer: entry.writer,
        mirror_state: entry.mirror_state,
        partition_generation: entry.partition_generation,
        active_half: entry.active_half,
        generations: entry.generations.clone(),
        floor: entry.lsn_floor,
        ..empty_state(entry.released_lsn)
    };
    let active = entry.active_half;
    let sealed = 1 - active;
    let half = entry.half_size();
    let mut report = PartitionRecovery {
        kind: entry.kind,
        case: Case::Valid,
        action: Action::Keep,
        records: 0,
        tail: entry.released_lsn,
        defect: None,
        dropped_verified_records: 0,
    };
    // The highest lsn of any record that verifies anywhere in the partition, so that lsns go
    // on above it even when the partition fails.
    let highest = |extra: Lsn| -> Result<Lsn> {
        let mut highest = extra.max(entry.sealed_last_lsn);
        for half in [0, 1] {
            let found = sweep_half(media, entry, half, 0, check_crc).map_err(io_err("sweep a half"))?;
            highest = found.into_iter().map(|header| header.lsn).fold(highest, Lsn::max);
        }
        Ok(highest)
    };
    if entry.failed() {
        let why = "marked failed by an earlier recovery".to_string();
        let highest = highest(Lsn::ZERO)?;
        return Ok(fail_partition(entry, state, report, highest, Case::CorruptBeforeTail, why));
    }
    let active_scan = scan_half(media, entry, active, entry.sealed_last_lsn, None, check_crc)
        .map_err(io_err("scan the active half"))?;
    let mut found: Vec<Found> = Vec::new();
    let sealed_holds_records = entry.sealed_last_lsn > entry.released_lsn;
    if sealed_holds_records {
        let sealed_scan = scan_half(media, entry, sealed, Lsn::ZERO, Some(entry.sealed_last_lsn), check_crc)
            .map_err(io_err("scan the sealed half"))?;
        let reached = sealed_scan.records.last().is_some_and(|last| last.lsn == entry.sealed_last_lsn);
        if !reached {
            let (case, defect) = match sealed_scan.stop {
                Stop::Stale(why) => (Case::StaleGeneration, why),
                Stop::Damaged(why) => (Case::CorruptBeforeTail, why),
                Stop::Clean | Stop::Reached => (Case::CorruptBeforeTail, "records end early".to_string()),
            };
            let why = format!("sealed half ends before lsn {}: {defect}", entry.sealed_last_lsn);
            let highest = highest(Lsn::ZERO)?;
            return Ok(fail_partition(entry, state, report, highest, case, why));
        }
        state.half_last[sealed as usize] = entry.sealed_last_lsn;
        state.sealed_extent = sealed_scan.end;
        state.sealed_free = false;
        found.extend(sealed_scan.records);
    } else {
        // The header says everything in the sealed half is released: it holds nothing, or
        // released records whose zeroing a crash interrupted. A live record there means the
        // header is older than the records.
        let live = sweep_half(media, entry, sealed, 0, check_crc)
            .map_err(io_err("sweep the released half"))?
            .into_iter()
            .map(|header| header.lsn)
            .filter(|lsn| *lsn > entry.released_lsn)
            .max();
        if let Some(live) = live {
            let why = format!("the released half holds a live record (lsn {live})");
            let highest = highest(live)?;
            return Ok(fail_partition(entry, state, report, highest, Case::CorruptBeforeTail, why));
        }
        zero_range(media, entry.half_offset(sealed), half).map_err(io_err("zero a released half"))?;
        state.sealed_free = true;
    }
    let last_good = active_scan.records.last().map_or(entry.sealed_last_lsn, |f| f.lsn);
    let rest_offset = entry.half_offset(active) + active_scan.end;
    let rest_bytes = half - active_scan.end;
    let (mut case, mut defect) = match &active_scan.stop {
        Stop::Clean | Stop::Reached => (Case::Valid, None),
        Stop::Damaged(why) => (Case::TornTail, Some(why.clone())),
        Stop::Stale(why) => (Case::StaleGeneration, Some(why.clone())),
    };
    // What verifies beyond the end of the scan? Appends are written in lsn order, one at a time
    // per partition, into a half zeroed before its reuse, and the rest of the active half is
    // zeroed at every open: so after a process crash nothing can, and a verified record there
    // means the damaged or zeroed one (a page or sector read back as zeroes) was lost after it
    // was written. After a power loss it can be an unacknowledged record that landed while an
    // earlier one did not.
    //
    // Beyond zeroes the rest is usually all zero, and one read of it (which replaces the read
    // `zero_range` would make) settles it; only otherwise is it swept, and then zeroed. There
    // only records whose generation is listed count: an interrupted `reset_partition` (header
    // first, then the zeroing) leaves its old records, no longer listed, behind zeroes.
    let rest_is_zero = matches!(active_scan.stop, Stop::Clean)
        && is_zero(media, rest_offset, rest_bytes).map_err(io_err("read the rest of the active half"))?;
    let look_beyond = match active_scan.stop {
        Stop::Damaged(_) => Some((active_scan.end + 8, false)),
        Stop::Clean if !rest_is_zero => Some((active_scan.end, true)),
        Stop::Clean | Stop::Reached | Stop::Stale(_) => None,
    };
    if let Some((from, listed_only)) = look_beyond {
        let beyond = sweep_half(media, entry, active, from, check_crc)
            .map_err(io_err("look beyond the tail"))?
            .into_iter()
            .filter(|header| header.lsn > last_good)
            .filter(|header| !listed_only || entry.lists(header.generation, header.lsn))
            .count();
        if beyond > 0 {
            if case == Case::Valid {
                case = Case::TornTail;
                defect = Some(format!(
                    "zeroes at byte {} of half {active}, then {beyond} records that verify",
                    active_scan.end
                ));
            }
            if durability == Durability::Process {
                case = Case::CorruptBeforeTail;
            }
        }
        report.dropped_verified_records = beyond;
    }
    let action = action_for(case);
    if action == Action::FailPartition {
        let why = defect.unwrap_or_default();
        let highest = highest(last_good)?;
        return Ok(fail_partition(entry, state, report, highest, case, why));
    }
    debug_assert!(matches!(action, Action::Keep | Action::TruncateTail));
    // No byte of a write that never completed (TruncateTail), nor anything else that is not
    // zero, may lie beyond the tail: the next append and the next recovery rely on it.
    if !rest_is_zero {
        zero_range(media, rest_offset, rest_bytes).map_err(io_err("truncate the tail"))?;
    }
    if let Some(last) = active_scan.records.last() {
        state.half_last[active as usize] = last.lsn;
    }
    state.write_pos = active_scan.end;
    state.persisted_pos = active_scan.end;
    found.extend(active_scan.records);
    state.last_lsn = found.last().map_or(Lsn::ZERO, |last| last.lsn);
    state.durable_lsn = state.last_lsn;
    report.records = found.len();
    report.tail = state.tail();
    report.case = case;
    report.action = action;
    report.defect = defect;
    state.index = found.into_iter().map(|f| Entry { lsn: f.lsn, offset: f.offset, len: f.len }).collect();
    Ok((state, report))
}

/// Marks the partition failed (persisted with the next header write). Its records stay on the
/// media untouched; lsns go on above the highest one seen.
fn fail_partition(
    entry: &mut PartitionEntry,
    mut state: PartState,
    mut report: PartitionRecovery,
    highest: Lsn,
    case: Case,
    defect: String,
) -> (PartState, PartitionRecovery) {
    debug_assert_eq!(action_for(case), Action::FailPartition);
    entry.flags |= FLAG_FAILED;
    state.failed = true;
    state.last_lsn = highest;
    state.durable_lsn = highest;
    report.case = case;
    report.action = Action::FailPartition;
    report.tail = state.tail();
    report.defect = Some(defect);
    (state, report)
}

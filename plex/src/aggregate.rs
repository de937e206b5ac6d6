//! A mirrored aggregate: plex 0 and plex 1 written concurrently (DESIGN §6.3), the mirror
//! timeout and the drop of a plex (§4.1, S3, S4), read repair (§6.3), and resync (§6.4, S5).
//!
//! Invariants:
//! - a write completes when both plexes hold it, or when one plex holds it and the other has
//!   been dropped; every plex I/O (data, flush, label) is bounded by `mirror_timeout`, after
//!   which the plex is dropped;
//! - a drop marks in the survivor's bitmap, durably, every region with a write to the dropped
//!   plex in flight or completed since its last successful flush (it may never have become
//!   durable there), then records the drop in the survivor's label (peer `out_of_date` or
//!   `failed`; a new generation unless the peer was already recorded out of date or failed),
//!   then calls the caller's `DropHook` (S3) until it succeeds; only then do the writes that
//!   waited on it complete. Opening an aggregate records (again, the hook is idempotent) every
//!   drop its labels show, before anything is written to one plex alone;
//! - while a plex is not `normal`, every write marks its regions in the normal plex's bitmap,
//!   durably, before it is issued (S4). A mark made by a write that reaches both plexes during a
//!   resync is cleared only after a flush of the target that began after the write completed,
//!   and only if no drop came in between;
//! - a plex that is `resyncing` (or `out_of_date`, `failed`) is never a read source, nor a
//!   resync source (S5); reads are repaired only from a `normal` plex and a region that is not
//!   dirty, and the repair holds the region exclusively so it never overwrites a newer write;
//! - resync direction comes from the labels only (`decide`, rules logged by name); a split
//!   brain is refused until the operator names the plex to discard; a plex without a valid
//!   label is only ever the target of a full resync, and only if the other plex holds
//!   everything its remaining disks held;
//! - generations only increase, and a plex only starts generations of its own parity;
//! - the target is `resyncing` on disk before its first byte is copied; a bit is cleared only
//!   after the region's copy is flushed on the target; copies hold their regions exclusively,
//!   so a concurrent write to the region lands after the copy on both plexes;
//! - the resync target becomes `normal` (its label takes the source's generation) only after
//!   every bit left needs no copy, under the gate that keeps writes from marking meanwhile;
//! - a caller that drops its future in the middle of a drop leaves the plex `normal` in
//!   memory, to be dropped again by the next I/O that fails; nothing waits on it forever.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex as AsyncMutex, RwLock as AsyncRwLock, watch};

use crate::bitmap::{BitmapError, DirtyBitmap};
use crate::buf::AlignedBuf;
use crate::device::{BLOCK_BYTES, BlockDevice, IoFuture, join_all};
use crate::label::{CpRecord, DiskLabel, LabelError, read_label, write_label};
use crate::layout::{LayoutError, plan_plex};
use crate::metrics::PlexMetrics;
use crate::plex::{Plex, PlexDisk, PlexError};
use crate::regions::RegionLocks;
use crate::types::{Epoch, NodeId, PeerState, PlexGeneration, PlexState, ResyncLevel, Site, Uuid};

/// How an aggregate behaves.
#[derive(Clone, Debug)]
pub struct AggregateOptions {
    /// How long a write waits for a plex before the plex is dropped (DESIGN §4.1).
    pub mirror_timeout: Duration,
    /// Resync bandwidth limit in bytes per second; `None` copies as fast as the disks go.
    pub resync_bytes_per_second: Option<u64>,
    /// Bytes one resync batch copies before it flushes the target and clears the batch's bits.
    pub resync_batch_bytes: u64,
    /// Where the aggregate counts repairs, errors, drops and resync bytes.
    pub metrics: PlexMetrics,
}

impl Default for AggregateOptions {
    fn default() -> AggregateOptions {
        AggregateOptions {
            mirror_timeout: Duration::from_secs(30),
            resync_bytes_per_second: None,
            resync_batch_bytes: 8 << 20,
            metrics: PlexMetrics::default(),
        }
    }
}

/// What a new aggregate is.
#[derive(Clone, Debug)]
pub struct AggregateSpec {
    /// The cluster.
    pub cluster: Uuid,
    /// The aggregate.
    pub aggregate: Uuid,
    /// The controller that owns it.
    pub owner: NodeId,
    /// The site of each plex's disks.
    pub sites: [Site; 2],
    /// Bytes per dirty-bitmap region (DESIGN §6.4: 64 KiB by default).
    pub region_bytes: u32,
    /// The first epoch.
    pub epoch: Epoch,
}

/// Why a plex was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// It did not answer within the mirror timeout.
    Timeout,
    /// It failed an I/O.
    Failed,
    /// Found out of date when the aggregate was opened: its peer's bitmap holds regions it
    /// may not have (writes in flight at a drop that a crash kept from being recorded).
    OutOfDate,
}

/// What the `DropHook` is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlexDrop {
    /// The aggregate.
    pub aggregate: Uuid,
    /// The dropped plex.
    pub plex: u8,
    /// Why.
    pub reason: DropReason,
    /// The survivor's generation after the drop.
    pub survivor_generation: PlexGeneration,
}

/// Records a plex drop wherever S3 requires (the DR partner, the mediator) before the writes
/// that wait on it complete. An error is retried (with back-off) until it succeeds: until
/// then those writes stall, as S3 requires.
pub trait DropHook: Send + Sync + fmt::Debug {
    /// Records `drop`; returns once it is durable there.
    fn plex_dropped<'a>(&'a self, drop: &'a PlexDrop) -> IoFuture<'a, Result<(), String>>;
}

/// The generation rules of DESIGN §6.4, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationRule {
    /// A plex's label says `resyncing`: it is the target, whatever else holds (S5).
    ResyncInProgress,
    /// Equal generations: in sync; only bitmap bits left over are copied.
    EqualGenerations,
    /// One plex's peer-sync generation is the other's current: the one that moved on is the
    /// source.
    PeerMovedOn,
    /// Both moved on (or the generations are unrelated): refused until a plex is discarded.
    SplitBrain,
    /// A plex without a valid label (new or replaced disk): target of a full resync.
    NoValidLabel,
}

impl GenerationRule {
    /// The name the rule is logged and shown by.
    pub fn name(self) -> &'static str {
        match self {
            GenerationRule::ResyncInProgress => "resync-in-progress",
            GenerationRule::EqualGenerations => "equal-generations",
            GenerationRule::PeerMovedOn => "peer-moved-on",
            GenerationRule::SplitBrain => "split-brain",
            GenerationRule::NoValidLabel => "no-valid-label",
        }
    }
}

impl fmt::Display for GenerationRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the generation rules decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The rule that applied.
    pub rule: GenerationRule,
    /// `Some((source, target, level))` when a resync is needed (or may be, for
    /// `EqualGenerations`, if a bitmap has bits left).
    pub resync: Option<(usize, usize, ResyncLevel)>,
}

/// Why an aggregate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// A plex I/O failed.
    #[error("plex {plex}: {source}")]
    Plex {
        /// Which plex.
        plex: usize,
        /// What failed.
        #[source]
        source: PlexError,
    },
    /// A label could not be read or written.
    #[error("plex {plex} disk {disk} label: {source}")]
    Label {
        /// Which plex.
        plex: usize,
        /// Which disk of it.
        disk: usize,
        /// What failed.
        #[source]
        source: LabelError,
    },
    /// The bitmap could not be read or written.
    #[error("plex {plex} bitmap: {source}")]
    Bitmap {
        /// Which plex.
        plex: usize,
        /// What failed.
        #[source]
        source: BitmapError,
    },
    /// No plex is `normal`: nothing can be read or written.
    #[error("no plex of the aggregate is normal ({0})")]
    NoUsablePlex(String),
    /// A read failed and could not be repaired from the other plex.
    #[error("read at {offset} failed on plex {plex} and cannot be repaired ({why}): {source}")]
    Unrepairable {
        /// Where.
        offset: u64,
        /// The plex read.
        plex: usize,
        /// Why the other plex could not serve it.
        why: &'static str,
        /// The read error.
        #[source]
        source: PlexError,
    },
    /// Both plexes were written independently (DESIGN §6.4): refused until one is discarded.
    #[error(
        "split brain: plex 0 is at generation {g0} (peer-sync {s0}), plex 1 at {g1} (peer-sync {s1}); \
         both were written without the other; name the plex whose changes are discarded"
    )]
    SplitBrain {
        /// Plex 0's generation.
        g0: u64,
        /// Plex 0's peer-sync generation.
        s0: u64,
        /// Plex 1's generation.
        g1: u64,
        /// Plex 1's peer-sync generation.
        s1: u64,
    },
    /// The disks do not form this aggregate.
    #[error("invalid aggregate: {0}")]
    Invalid(String),
    /// Disks cannot be laid out.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A range outside the aggregate or not block-aligned.
    #[error("range {offset}+{len} is not block-aligned inside the aggregate of {size} bytes")]
    Range {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// The aggregate's size.
        size: u64,
    },
    /// A plex did not answer within the mirror timeout.
    #[error("plex {plex}: {what} timed out")]
    Timeout {
        /// Which plex.
        plex: usize,
        /// What timed out.
        what: &'static str,
    },
    /// The resync target was dropped during the resync; it resumes when the plex returns.
    #[error("resync stopped: the target plex {0} was dropped")]
    TargetDropped(usize),
}

/// The aggregate's state, as ONTAP shows it (DESIGN §6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggregateState {
    /// Both plexes `normal`.
    MirroredNormal,
    /// One plex is not `normal` and none is resyncing.
    MirrorDegraded,
    /// One plex is being resynced.
    Resyncing,
}

impl fmt::Display for AggregateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AggregateState::MirroredNormal => "mirrored,normal",
            AggregateState::MirrorDegraded => "mirror degraded",
            AggregateState::Resyncing => "resyncing",
        })
    }
}

/// A running or last resync's progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResyncProgress {
    /// Full or incremental.
    pub level: ResyncLevel,
    /// The source plex.
    pub source: usize,
    /// The target plex.
    pub target: usize,
    /// Bytes to copy (grows when writes dirty more regions meanwhile).
    pub total_bytes: u64,
    /// Bytes copied and durable on the target.
    pub copied_bytes: u64,
    /// Since the resync (or its resumption) started.
    pub elapsed: Duration,
    /// Whether it completed.
    pub complete: bool,
}

impl ResyncProgress {
    /// Percent done (100 only once complete).
    pub fn percent(&self) -> u64 {
        if self.complete {
            return 100;
        }
        (self.copied_bytes.saturating_mul(100).checked_div(self.total_bytes).unwrap_or(0)).min(99)
    }

    /// Bytes per second so far.
    pub fn rate(&self) -> u64 {
        let millis = u64::try_from(self.elapsed.as_millis()).unwrap_or(u64::MAX).max(1);
        self.copied_bytes.saturating_mul(1000) / millis
    }

    /// Time left at the rate so far.
    pub fn eta(&self) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0).then(|| Duration::from_secs(self.total_bytes.saturating_sub(self.copied_bytes) / rate))
    }
}

impl fmt::Display for ResyncProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            ResyncLevel::Full => "full",
            ResyncLevel::Incremental => "incremental",
        };
        write!(
            f,
            "{level} resync plex{} -> plex{}: {}%, {} of {} bytes, {} bytes/s",
            self.source,
            self.target,
            self.percent(),
            self.copied_bytes,
            self.total_bytes,
            self.rate()
        )?;
        match self.eta() {
            Some(eta) if !self.complete => write!(f, ", ETA {}s", eta.as_secs()),
            _ => Ok(()),
        }
    }
}

/// One plex's state for display.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlexStatus {
    /// The state.
    pub state: PlexState,
    /// Its generation (from its label; 0 without one).
    pub generation: PlexGeneration,
    /// Percent copied when resyncing.
    pub percent: Option<u64>,
}

impl fmt::Display for PlexStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            PlexState::Normal => f.write_str("normal"),
            PlexState::Failed => f.write_str("failed"),
            PlexState::OutOfDate => f.write_str("out_of_date"),
            PlexState::Resyncing { level, .. } => {
                let level = match level {
                    ResyncLevel::Full => "full",
                    ResyncLevel::Incremental => "incremental",
                };
                write!(f, "resyncing ({level}, {}%)", self.percent.unwrap_or(0))
            }
        }
    }
}

/// The aggregate's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregateStatus {
    /// `mirrored,normal`, `mirror degraded` or `resyncing`.
    pub state: AggregateState,
    /// Each plex.
    pub plexes: [PlexStatus; 2],
    /// The bitmap of the plex that tracks dirty regions, DataKeeper style.
    pub bitmap: String,
    /// The running or last resync.
    pub resync: Option<ResyncProgress>,
}

impl fmt::Display for AggregateStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "state: {}", self.state)?;
        for (index, plex) in self.plexes.iter().enumerate() {
            writeln!(f, "plex{index}: {plex}, generation {}", plex.generation.0)?;
        }
        writeln!(f, "{}", self.bitmap)?;
        if let Some(resync) = &self.resync {
            writeln!(f, "{resync}")?;
        }
        Ok(())
    }
}

/// The dirty bitmap's counts, DataKeeper style (`Bitmap: 819189 bits (chunks), 40302 dirty`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapSummary {
    /// The plex whose bitmap it is: the `normal` one, which marks what the other misses.
    pub plex: usize,
    /// Regions (bits) the bitmap covers.
    pub regions: u64,
    /// Regions marked dirty: to be copied to the other plex by a resync.
    pub dirty_regions: u64,
    /// Bytes per region.
    pub region_bytes: u64,
}

/// Counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AggregateCounters {
    /// Reads served from the other plex, with the bad copy rewritten.
    pub read_repairs: u64,
    /// Reads that failed and could not be repaired.
    pub read_errors: u64,
    /// Plexes dropped.
    pub drops: u64,
    /// Regions copied by resync.
    pub regions_resynced: u64,
}

/// One plex of the aggregate.
#[derive(Debug)]
struct Side {
    /// The plex's disks, in order; `reattach_with` replaces them (a reopened or new device).
    devices: RwLock<Vec<Arc<dyn BlockDevice>>>,
    /// `None` while the plex has no valid labels (a new or replaced disk before its resync).
    plex: RwLock<Option<Arc<Plex>>>,
    /// The disks' labels (disk 0's is the plex's: it is written last, as the commit point).
    labels: AsyncMutex<Option<Vec<DiskLabel>>>,
    /// The plex's dirty bitmap (on its first disk).
    bitmap: AsyncMutex<Option<DirtyBitmap>>,
}

#[derive(Debug)]
struct Inner {
    states: [PlexState; 2],
    /// A drop of this plex is being recorded: it gets no new I/O, and writes wait.
    dropping: [bool; 2],
    /// Writes issued to each plex and not yet finished: id -> regions.
    inflight: [std::collections::BTreeMap<u64, Range<u64>>; 2],
    /// Regions written to each plex since its last successful flush began: a drop marks them
    /// too, since the dropped plex may never have made them durable (S4).
    unflushed: [BTreeSet<u64>; 2],
    /// Raised by every drop: a resync-time mark is cleared only if no drop came between the
    /// write that made it and the flush that makes it redundant.
    drop_epoch: u64,
    /// Regions whose bit a write in flight to both plexes set during a resync (region -> writes).
    /// They need no copy: the write puts the same data on both plexes.
    marked_by_writes: HashMap<u64, u32>,
    /// Regions whose bit such a write set and which completed on both plexes in this drop
    /// epoch: cleared after the next successful flush of the target that begins after them.
    clear_after_flush: BTreeSet<u64>,
    /// Each plex's generation as its labels say (for status without the labels lock).
    generations: [PlexGeneration; 2],
    next_id: u64,
    resync: Option<ResyncProgress>,
    counters: AggregateCounters,
}

/// A mirrored aggregate.
#[derive(Debug)]
pub struct Aggregate {
    uuid: Uuid,
    size: u64,
    region_bytes: u64,
    options: AggregateOptions,
    hook: Arc<dyn DropHook>,
    sides: [Side; 2],
    inner: Mutex<Inner>,
    /// Bumped whenever a drop completes.
    changed: watch::Sender<u64>,
    regions: Arc<RegionLocks>,
    /// Writes hold it shared from their state decision to their bitmap mark; resync completion
    /// holds it exclusively.
    gate: AsyncRwLock<()>,
    resync_running: AsyncMutex<()>,
}

/// Undoes `dropping` when a drop's future is dropped before it completed (a cancelled write):
/// the plex is then still `normal` in memory and the next I/O that fails begins the drop again,
/// so nothing waits forever on a drop nobody is recording.
struct CancelledDrop<'a> {
    aggregate: &'a Aggregate,
    index: usize,
    armed: bool,
}

impl Drop for CancelledDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.aggregate.inner().dropping[self.index] = false;
            self.aggregate.changed.send_modify(|n| *n += 1);
        }
    }
}

/// What a plex's disks hold.
enum Found {
    /// Every disk has a valid label.
    Labelled(Vec<DiskLabel>),
    /// Some disk has no valid label: a new or replaced disk. `partial` is a valid label of
    /// another disk of the plex, if any: it tells what the plex held before.
    NoLabel { partial: Option<DiskLabel> },
    /// Some disk cannot be read.
    Unreadable(String),
}

async fn find_labels(devices: &[Arc<dyn BlockDevice>]) -> Found {
    let mut labels = Vec::with_capacity(devices.len());
    let mut blank = false;
    for (disk, device) in devices.iter().enumerate() {
        match read_label(device.as_ref()).await {
            Ok((label, _)) => labels.push(label),
            Err(LabelError::NoValidLabel { .. }) => blank = true,
            Err(e) => return Found::Unreadable(format!("disk {disk}: {e}")),
        }
    }
    if blank {
        // The label of the first disk is the plex's commit point; any valid one says as much
        // about the plex's generation as a partly replaced plex can.
        Found::NoLabel { partial: labels.into_iter().max_by_key(|label| label.plex_generation) }
    } else {
        Found::Labelled(labels)
    }
}

/// A plex with a replaced disk may only be the target of a full resync if the other plex holds
/// everything it held: their generations are equal, or the other moved on from it, or it was
/// a resync target anyway. Otherwise the plex with the replaced disk held writes the other
/// lacks, and making the other the source would roll them back silently (S9).
fn check_partly_blank(
    index: usize,
    partial: Option<&DiskLabel>,
    other: Option<&DiskLabel>,
) -> Result<(), AggregateError> {
    let (Some(mine), Some(other)) = (partial, other) else { return Ok(()) };
    let covered = mine.plex_generation == other.plex_generation
        || (other.peer_sync_generation == mine.plex_generation
            && other.plex_generation > mine.plex_generation)
        || matches!(mine.plex_state, PlexState::Resyncing { .. });
    if other.plex_state != PlexState::Normal {
        return Err(AggregateError::NoUsablePlex(format!(
            "plex {index} has a replaced disk and plex {} is not normal",
            1 - index
        )));
    }
    if covered {
        return Ok(());
    }
    Err(AggregateError::Invalid(format!(
        "plex {index} has a replaced disk, and its other disks are at generation {} while plex {} is at \
         {} (peer-sync {}): plex {index} held writes the other plex lacks; refusing to resync from it",
        mine.plex_generation.0,
        1 - index,
        other.plex_generation.0,
        other.peer_sync_generation.0
    )))
}

/// Applies the generation rules of DESIGN §6.4, in order, to the two plexes' labels (`None`:
/// no valid label). Pure: the aggregate logs and acts on the result.
pub fn decide(labels: [Option<&DiskLabel>; 2]) -> Result<Decision, AggregateError> {
    let decision = |rule, resync| Ok(Decision { rule, resync });
    // Rule 0 (S5): a plex whose label says `resyncing` is the target, never a source.
    for target in 0..2 {
        if let Some(PlexState::Resyncing { level, .. }) = labels[target].map(|label| label.plex_state) {
            let source = 1 - target;
            return match labels[source].map(|label| label.plex_state) {
                Some(PlexState::Normal) => {
                    decision(GenerationRule::ResyncInProgress, Some((source, target, level)))
                }
                _ => Err(AggregateError::NoUsablePlex(format!(
                    "plex {target} is an unfinished resync target and plex {source} is not normal"
                ))),
            };
        }
    }
    match labels {
        [Some(a), Some(b)] => {
            let (ga, gb) = (a.plex_generation, b.plex_generation);
            if ga == gb {
                return decision(GenerationRule::EqualGenerations, None);
            }
            if a.peer_sync_generation == gb && ga > gb {
                return decision(GenerationRule::PeerMovedOn, Some((0, 1, ResyncLevel::Incremental)));
            }
            if b.peer_sync_generation == ga && gb > ga {
                return decision(GenerationRule::PeerMovedOn, Some((1, 0, ResyncLevel::Incremental)));
            }
            Err(AggregateError::SplitBrain {
                g0: ga.0,
                s0: a.peer_sync_generation.0,
                g1: gb.0,
                s1: b.peer_sync_generation.0,
            })
        }
        [Some(_), None] => decision(GenerationRule::NoValidLabel, Some((0, 1, ResyncLevel::Full))),
        [None, Some(_)] => decision(GenerationRule::NoValidLabel, Some((1, 0, ResyncLevel::Full))),
        [None, None] => Err(AggregateError::Invalid("neither plex has a valid label".into())),
    }
}

fn side_error(plex: usize) -> impl Fn(PlexError) -> AggregateError {
    move |source| AggregateError::Plex { plex, source }
}

fn bitmap_error(plex: usize) -> impl Fn(BitmapError) -> AggregateError {
    move |source| AggregateError::Bitmap { plex, source }
}

fn usize_of(n: u64) -> usize {
    usize::try_from(n).expect("an I/O size fits usize")
}

impl Aggregate {
    /// Labels the disks of both plexes as a new aggregate (both `normal`, generation 1, clean
    /// bitmaps, zeroed checksum areas) and opens it. Disks that hold a valid label are refused.
    pub async fn create(
        spec: &AggregateSpec,
        plexes: [Vec<Arc<dyn BlockDevice>>; 2],
        options: AggregateOptions,
        hook: Arc<dyn DropHook>,
    ) -> Result<Aggregate, AggregateError> {
        for (index, devices) in plexes.iter().enumerate() {
            if devices.is_empty() {
                return Err(AggregateError::Invalid(format!("plex {index} has no disks")));
            }
            if let Found::Labelled(_) | Found::NoLabel { partial: Some(_) } = find_labels(devices).await {
                return Err(AggregateError::Invalid(format!(
                    "plex {index} has a labelled disk; refusing to overwrite it"
                )));
            }
            let labels = label_plex(spec, index, devices, PlexGeneration(1), PlexState::Normal)?;
            let _ = format_plex(index, devices, labels, spec.aggregate).await?;
        }
        Aggregate::open(plexes, options, hook).await
    }

    /// Opens an aggregate from its disks, applying the generation rules (DESIGN §6.4). A plex
    /// whose disks cannot be read is dropped (through the hook) and the aggregate runs
    /// degraded. A split brain is refused: see `open_discarding`.
    pub async fn open(
        plexes: [Vec<Arc<dyn BlockDevice>>; 2],
        options: AggregateOptions,
        hook: Arc<dyn DropHook>,
    ) -> Result<Aggregate, AggregateError> {
        Aggregate::open_inner(plexes, options, hook, None).await
    }

    /// Opens an aggregate whose plexes were written independently (split brain), discarding
    /// the changes of plex `discard`: it becomes the target of a resync of every region either
    /// plex wrote since they were last in sync. Refused unless the rules find a split brain.
    pub async fn open_discarding(
        plexes: [Vec<Arc<dyn BlockDevice>>; 2],
        options: AggregateOptions,
        hook: Arc<dyn DropHook>,
        discard: usize,
    ) -> Result<Aggregate, AggregateError> {
        if discard > 1 {
            return Err(AggregateError::Invalid(format!("there is no plex {discard}")));
        }
        Aggregate::open_inner(plexes, options, hook, Some(discard)).await
    }

    async fn open_inner(
        plexes: [Vec<Arc<dyn BlockDevice>>; 2],
        options: AggregateOptions,
        hook: Arc<dyn DropHook>,
        discard: Option<usize>,
    ) -> Result<Aggregate, AggregateError> {
        let [devices0, devices1] = plexes;
        if devices0.is_empty() || devices1.is_empty() {
            return Err(AggregateError::Invalid("each plex needs at least one disk".into()));
        }
        let found = [find_labels(&devices0).await, find_labels(&devices1).await];
        let labels: [Option<&Vec<DiskLabel>>; 2] = [0, 1].map(|i| match &found[i] {
            Found::Labelled(labels) => Some(labels),
            _ => None,
        });
        for (index, labels) in labels.iter().enumerate() {
            if let Some(labels) = labels {
                check_plex_labels(index, labels)?;
            }
        }
        for index in 0..2 {
            if let Found::NoLabel { partial } = &found[index] {
                if let (Some(mine), Some(other)) = (partial, labels[1 - index])
                    && mine.aggregate != other[0].aggregate
                {
                    return Err(AggregateError::Invalid(format!(
                        "plex {index}'s disks belong to another aggregate"
                    )));
                }
                check_partly_blank(index, partial.as_ref(), labels[1 - index].map(|l| &l[0]))?;
            }
        }
        let (uuid, region_bytes) = match (labels[0], labels[1]) {
            (Some(a), Some(b)) => {
                if a[0].aggregate != b[0].aggregate {
                    return Err(AggregateError::Invalid("the plexes belong to different aggregates".into()));
                }
                if a[0].region_bytes != b[0].region_bytes {
                    return Err(AggregateError::Invalid("the plexes have different region sizes".into()));
                }
                (a[0].aggregate, a[0].region_bytes)
            }
            (Some(a), None) | (None, Some(a)) => (a[0].aggregate, a[0].region_bytes),
            (None, None) => {
                return Err(AggregateError::Invalid("neither plex has a valid label".into()));
            }
        };
        let unreadable: [Option<&String>; 2] = [0, 1].map(|i| match &found[i] {
            Found::Unreadable(why) => Some(why),
            _ => None,
        });
        let decision = if let Some(index) = unreadable.iter().position(Option::is_some) {
            let other = 1 - index;
            if unreadable[other].is_some() || labels[other].is_none() {
                return Err(AggregateError::NoUsablePlex("both plexes unreadable or unlabelled".into()));
            }
            tracing::warn!(aggregate = ?uuid, plex = index, why = unreadable[index].map(String::as_str), "plex unreadable at open");
            None
        } else {
            let decided = decide([labels[0].map(|l| &l[0]), labels[1].map(|l| &l[0])]);
            match (decided, discard) {
                (Err(AggregateError::SplitBrain { .. }), Some(discard)) => {
                    tracing::warn!(aggregate = ?uuid, rule = "split-brain", discard, "discarding plex {discard}'s changes as the operator asked");
                    Some(Decision {
                        rule: GenerationRule::SplitBrain,
                        resync: Some((1 - discard, discard, ResyncLevel::Incremental)),
                    })
                }
                (Err(e), _) => {
                    tracing::error!(aggregate = ?uuid, "generation rules refuse the aggregate: {e}");
                    return Err(e);
                }
                (Ok(_), Some(_)) => {
                    return Err(AggregateError::Invalid(
                        "no split brain: the generation rules decide the direction, not a discard".into(),
                    ));
                }
                (Ok(decision), None) => {
                    tracing::info!(aggregate = ?uuid, rule = decision.rule.name(), resync = ?decision.resync, "generation rule");
                    Some(decision)
                }
            }
        };

        let mut sides = Vec::with_capacity(2);
        let mut sizes = [0u64; 2];
        for (index, devices) in [devices0, devices1].into_iter().enumerate() {
            let (plex, disk_labels, bitmap) = match &found[index] {
                Found::Labelled(disk_labels) => {
                    let plex = assemble(index, &devices, disk_labels)?;
                    sizes[index] = plex.size_bytes();
                    let first = &disk_labels[0];
                    let bitmap = DirtyBitmap::load(
                        devices[0].as_ref(),
                        first.bitmap,
                        uuid,
                        first.region_bytes,
                        plex.size_bytes(),
                    )
                    .await;
                    let bitmap = match bitmap {
                        Ok(bitmap) => Some(bitmap),
                        Err(e) if unreadable[index].is_none() => return Err(bitmap_error(index)(e)),
                        Err(_) => None,
                    };
                    (Some(Arc::new(plex)), Some(disk_labels.clone()), bitmap)
                }
                _ => (None, None, None),
            };
            sides.push(Side {
                devices: RwLock::new(devices),
                plex: RwLock::new(plex),
                labels: AsyncMutex::new(disk_labels),
                bitmap: AsyncMutex::new(bitmap),
            });
        }
        let size = match (sizes[0], sizes[1]) {
            (0, s) | (s, 0) => s,
            (a, b) => a.min(b),
        };
        let mut states = [PlexState::Normal; 2];
        let mut pending_drop = None;
        match decision {
            None => {
                let index = unreadable.iter().position(Option::is_some).unwrap_or(0);
                let other_label = labels[1 - index].map(|l| &l[0]);
                if let Some(PlexState::Resyncing { .. }) = other_label.map(|l| l.plex_state) {
                    return Err(AggregateError::NoUsablePlex(format!(
                        "plex {index} is unreadable and plex {} is an unfinished resync target",
                        1 - index
                    )));
                }
                states[index] = PlexState::Failed;
                pending_drop = Some((index, DropReason::Failed));
            }
            Some(Decision { resync: Some((source, target, level)), rule }) => {
                states[target] = match rule {
                    GenerationRule::ResyncInProgress => {
                        let label = labels[target].map(|l| &l[0]);
                        label.map(|l| l.plex_state).unwrap_or(PlexState::Resyncing { level, next_region: 0 })
                    }
                    _ => PlexState::OutOfDate,
                };
                if rule != GenerationRule::ResyncInProgress {
                    // Recorded (again) before anything is written to the source alone: a crash
                    // may have come between the label and the hook (S3); the hook is idempotent.
                    let reason = match labels[source].map(|l| l[0].peer_state) {
                        Some(PeerState::Failed) => DropReason::Failed,
                        _ => DropReason::OutOfDate,
                    };
                    pending_drop = Some((target, reason));
                }
            }
            Some(Decision { resync: None, .. }) => {}
        }
        let side_array: [Side; 2] = match sides.try_into() {
            Ok(array) => array,
            Err(_) => return Err(AggregateError::Invalid("two plexes expected".into())),
        };
        let aggregate = Aggregate {
            uuid,
            size,
            region_bytes: u64::from(region_bytes),
            options,
            hook,
            sides: side_array,
            inner: Mutex::new(Inner {
                states,
                dropping: [false; 2],
                inflight: Default::default(),
                unflushed: Default::default(),
                drop_epoch: 0,
                marked_by_writes: HashMap::new(),
                clear_after_flush: BTreeSet::new(),
                generations: [0, 1]
                    .map(|i| labels[i].map_or(PlexGeneration::default(), |labels| labels[0].plex_generation)),
                next_id: 0,
                resync: None,
                counters: AggregateCounters::default(),
            }),
            changed: watch::channel(0).0,
            regions: Arc::default(),
            gate: AsyncRwLock::new(()),
            resync_running: AsyncMutex::new(()),
        };
        if let Some(Decision { rule: GenerationRule::EqualGenerations, .. }) = decision {
            aggregate.settle_equal_generations().await?;
        }
        if let Some((index, reason)) = pending_drop {
            tracing::warn!(aggregate = ?uuid, plex = index, ?reason, "recording plex {index} as dropped at open");
            aggregate.record_drop(index, reason, Vec::new()).await?;
            aggregate.options.metrics.dropped(uuid, index);
        }
        Ok(aggregate)
    }

    /// Equal generations: the plexes were in sync when last recorded. Labels left behind by a
    /// crash (a peer still recorded `resyncing` or `out_of_date` by a completed resync) are set
    /// back to `normal`, so that the next drop starts a new generation. Bits left in a bitmap
    /// (writes in flight at a drop that a crash kept from being recorded) make the other plex a
    /// target: that is recorded as a drop, with a new generation, before anything is written
    /// to one plex alone.
    async fn settle_equal_generations(&self) -> Result<(), AggregateError> {
        for index in 0..2 {
            let stale = self.sides[index].labels.lock().await.as_ref().is_some_and(|labels| {
                labels.iter().any(|label| {
                    label.peer_state != PeerState::Normal
                        || label.peer_sync_generation != label.plex_generation
                })
            });
            if stale {
                self.update_labels(index, |label| {
                    label.peer_state = PeerState::Normal;
                    label.peer_sync_generation = label.plex_generation;
                })
                .await?;
            }
        }
        let mut dirty = [false; 2];
        for (index, side) in self.sides.iter().enumerate() {
            // Bits past the aggregate's end (a larger plex, a damaged bitmap block) cover no data.
            let regions = self.size.div_ceil(self.region_bytes);
            dirty[index] = side
                .bitmap
                .lock()
                .await
                .as_ref()
                .is_some_and(|bitmap| bitmap.next_dirty(0).is_some_and(|region| region < regions));
        }
        // Both dirty: plex 1's bits merge into plex 0's, which is the source.
        let target = match dirty {
            [true, _] => 1,
            [false, true] => 0,
            [false, false] => return Ok(()),
        };
        tracing::info!(aggregate = ?self.uuid, rule = "equal-generations", target, "bits left in a bitmap: plex {target} is resynced from them");
        self.drop_plex(target, DropReason::OutOfDate, Vec::new()).await
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("aggregate state holder panicked")
    }

    fn devices(&self, index: usize) -> Vec<Arc<dyn BlockDevice>> {
        self.sides[index].devices.read().expect("device list holder panicked").clone()
    }

    /// The first disk of a plex: its bitmap lives there.
    fn device0(&self, index: usize) -> Arc<dyn BlockDevice> {
        self.sides[index].devices.read().expect("device list holder panicked")[0].clone()
    }

    fn plex(&self, index: usize) -> Option<Arc<Plex>> {
        self.sides[index].plex.read().expect("plex holder panicked").clone()
    }

    /// The aggregate's uuid.
    pub fn uuid(&self) -> Uuid {
        self.uuid
    }

    /// Bytes of data.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    /// Counters for metrics.
    pub fn counters(&self) -> AggregateCounters {
        self.inner().counters
    }

    /// The plexes' states.
    pub fn plex_states(&self) -> [PlexState; 2] {
        self.inner().states
    }

    /// The state and plexes, as ONTAP and DataKeeper show them.
    pub async fn status(&self) -> AggregateStatus {
        let (states, resync, generations) = {
            let inner = self.inner();
            (inner.states, inner.resync, inner.generations)
        };
        let state = if states.iter().any(|s| matches!(s, PlexState::Resyncing { .. })) {
            AggregateState::Resyncing
        } else if states == [PlexState::Normal; 2] {
            AggregateState::MirroredNormal
        } else {
            AggregateState::MirrorDegraded
        };
        let tracker = states.iter().position(|s| *s == PlexState::Normal).unwrap_or(0);
        let bitmap = match self.sides[tracker].bitmap.lock().await.as_ref() {
            Some(bitmap) => bitmap.status_line(),
            None => "Bitmap: unavailable".to_string(),
        };
        let plexes = [0, 1].map(|index| PlexStatus {
            state: states[index],
            generation: generations[index],
            percent: match states[index] {
                PlexState::Resyncing { .. } => Some(resync.map_or(0, |progress| progress.percent())),
                _ => None,
            },
        });
        AggregateStatus { state, plexes, bitmap, resync }
    }

    /// The dirty bitmap of the plex that tracks the other's missing writes (the same plex, and so
    /// the same counts, as `status().bitmap` shows), as numbers for tools: `None` while that plex
    /// has no bitmap (no valid labels). Only reads.
    pub async fn bitmap_summary(&self) -> Option<BitmapSummary> {
        let states = self.inner().states;
        let tracker = states.iter().position(|s| *s == PlexState::Normal).unwrap_or(0);
        let bitmap = self.sides[tracker].bitmap.lock().await;
        bitmap.as_ref().map(|bitmap| BitmapSummary {
            plex: tracker,
            regions: bitmap.region_count(),
            dirty_regions: bitmap.dirty_count(),
            region_bytes: bitmap.region_bytes(),
        })
    }

    /// Marks the regions of byte ranges `ranges` (every region with `all`) dirty in the bitmap
    /// of each `normal` plex, durably: what a resync must copy besides what this aggregate's
    /// own writes marked (DESIGN §6.4: the returning owner's unreleased records at heal, S8).
    /// Returns how many regions the request covers (marked now or already).
    pub async fn mark_dirty(&self, ranges: &[(u64, u64)], all: bool) -> Result<u64, AggregateError> {
        let mut wanted = Vec::new();
        if all {
            wanted.push(0..self.size.div_ceil(self.region_bytes));
        } else {
            for &(offset, len) in ranges {
                let end = offset.checked_add(len).filter(|end| *end <= self.size && len > 0);
                let Some(end) = end else {
                    return Err(AggregateError::Range { offset, len, size: self.size });
                };
                wanted.push(offset / self.region_bytes..end.div_ceil(self.region_bytes));
            }
        }
        let covered = {
            let mut regions: Vec<Range<u64>> = wanted.clone();
            regions.sort_by_key(|r| r.start);
            let mut count = 0u64;
            let mut end = 0u64;
            for r in regions {
                let start = r.start.max(end);
                if r.end > start {
                    count += r.end - start;
                    end = r.end;
                }
            }
            count
        };
        let states = self.inner().states;
        let mut marked_any = false;
        for (index, state) in states.iter().enumerate() {
            if *state != PlexState::Normal {
                continue;
            }
            let mut bitmap = self.sides[index].bitmap.lock().await;
            let bitmap = bitmap
                .as_mut()
                .ok_or_else(|| AggregateError::NoUsablePlex(format!("plex {index} has no bitmap")))?;
            for regions in &wanted {
                bitmap.set_regions(regions.clone());
            }
            bitmap.persist(self.device0(index).as_ref()).await.map_err(bitmap_error(index))?;
            marked_any = true;
        }
        if !marked_any {
            return Err(AggregateError::NoUsablePlex(format!("no normal plex to mark: {states:?}")));
        }
        Ok(covered)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<Range<u64>, AggregateError> {
        let aligned = offset.is_multiple_of(BLOCK_BYTES) && len.is_multiple_of(BLOCK_BYTES) && len > 0;
        if !aligned || offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(AggregateError::Range { offset, len, size: self.size });
        }
        Ok(offset / self.region_bytes..(offset + len).div_ceil(self.region_bytes))
    }

    /// Writes `data` at `offset` to both plexes (DESIGN §6.3); see the module invariants.
    pub async fn write(&self, offset: u64, data: &AlignedBuf) -> Result<(), AggregateError> {
        let regions = self.check_range(offset, data.len() as u64)?;
        let _guard = self.regions.lock(regions.clone(), false).await;
        let (issue, id, waited_drops, newly, epoch) = {
            let _gate = self.gate.read().await;
            let (issue, mark_on, id, waited_drops, epoch) = {
                let mut inner = self.inner();
                let usable = |i: usize| {
                    matches!(inner.states[i], PlexState::Normal | PlexState::Resyncing { .. })
                        && !inner.dropping[i]
                };
                let normal = |i: usize| inner.states[i] == PlexState::Normal && !inner.dropping[i];
                let issue = [usable(0), usable(1)];
                if !normal(0) && !normal(1) {
                    return Err(AggregateError::NoUsablePlex(format!("{:?}", inner.states)));
                }
                let mark_on = match (normal(0), normal(1)) {
                    (true, true) => None,
                    (true, false) => Some(0),
                    _ => Some(1),
                };
                let id = inner.next_id;
                inner.next_id += 1;
                for (plex, issued) in issue.iter().enumerate() {
                    if *issued {
                        inner.inflight[plex].insert(id, regions.clone());
                    }
                }
                (issue, mark_on, id, inner.dropping, inner.drop_epoch)
            };
            let mut newly = Vec::new();
            if let Some(tracker) = mark_on {
                // S4: marked durably before the write is issued.
                match self.mark(tracker, regions.clone()).await {
                    // Issued to both plexes (a resync target): the mark only covers a crash or a
                    // drop while the write is in flight.
                    Ok(set) if issue == [true, true] => {
                        let mut inner = self.inner();
                        for region in &set {
                            *inner.marked_by_writes.entry(*region).or_default() += 1;
                        }
                        newly = set;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.forget_inflight(id);
                        return Err(e);
                    }
                }
            }
            (issue, id, waited_drops, newly, epoch)
        };

        let plexes = [self.plex(0), self.plex(1)];
        let attempt = |index: usize| {
            let plex = plexes[index].clone();
            async move {
                let plex = plex.ok_or(DropReason::Failed)?;
                self.bounded(index, "write", plex.write(offset, data)).await
            }
        };
        let skipped = async { Err::<(), DropReason>(DropReason::Failed) };
        let (r0, r1) = match issue {
            [true, true] => tokio::join!(attempt(0), attempt(1)),
            [true, false] => (attempt(0).await, skipped.await),
            [false, true] => (skipped.await, attempt(1).await),
            [false, false] => (skipped.await, Err(DropReason::Failed)),
        };
        let results = [r0, r1];
        // Completed writes join their plex's unflushed set in the same critical section that
        // ends their in-flight entry, so a drop always sees them in one or the other.
        {
            let mut inner = self.inner();
            for plex in 0..2 {
                if issue[plex] && results[plex].is_ok() {
                    inner.unflushed[plex].extend(regions.clone());
                }
            }
        }
        let mut failed = false;
        for (index, result) in results.iter().enumerate() {
            if let (true, Err(reason)) = (issue[index], result) {
                failed = true;
                if let Err(e) = self.drop_plex(index, *reason, vec![regions.clone()]).await {
                    self.finish_write(id, &newly, false, epoch);
                    return Err(e);
                }
            }
        }
        self.finish_write(id, &newly, !failed, epoch);
        // Writes that skipped a plex being dropped complete only once the drop is recorded.
        for (index, dropping) in waited_drops.iter().enumerate() {
            if *dropping {
                self.wait_drop(index).await?;
            }
        }
        let states = self.inner().states;
        let held = (0..2).any(|i| issue[i] && results[i].is_ok() && states[i] == PlexState::Normal);
        if held {
            Ok(())
        } else {
            Err(AggregateError::NoUsablePlex(format!("the write reached no normal plex ({states:?})")))
        }
    }

    /// Ends a write's in-flight entry; its resync-time marks wait for the next target flush if
    /// it reached both plexes and no drop came meanwhile.
    fn finish_write(&self, id: u64, newly: &[u64], reached_both: bool, epoch: u64) {
        let mut inner = self.inner();
        inner.inflight[0].remove(&id);
        inner.inflight[1].remove(&id);
        let same_epoch = inner.drop_epoch == epoch;
        for region in newly {
            if let Some(count) = inner.marked_by_writes.get_mut(region) {
                *count -= 1;
                if *count == 0 {
                    inner.marked_by_writes.remove(region);
                }
            }
            if reached_both && same_epoch {
                inner.clear_after_flush.insert(*region);
            }
        }
    }

    /// Whether resync may skip `region`: its bit was set only by resync-time writes that reach
    /// both plexes.
    fn needs_no_copy(&self, region: u64) -> bool {
        let inner = self.inner();
        inner.marked_by_writes.contains_key(&region) || inner.clear_after_flush.contains(&region)
    }

    /// Flushes plex `index`; on success its unflushed set (as it was when the flush began) is
    /// durable, and if it is the resync target, the resync-time marks that were waiting for it
    /// (in an unchanged drop epoch) are cleared in memory (the next persist writes them; a crash
    /// before that costs an extra copy only).
    async fn flush_plex(&self, index: usize) -> Result<(), DropReason> {
        let Some(plex) = self.plex(index) else { return Err(DropReason::Failed) };
        let (taken, clearable, epoch) = {
            let mut inner = self.inner();
            let taken = std::mem::take(&mut inner.unflushed[index]);
            let is_target = matches!(inner.states[index], PlexState::Resyncing { .. });
            let clearable = if is_target { inner.clear_after_flush.clone() } else { BTreeSet::new() };
            (taken, clearable, inner.drop_epoch)
        };
        let outcome = self.bounded(index, "flush", plex.flush()).await;
        let clear: Vec<u64> = {
            let mut inner = self.inner();
            if outcome.is_err() {
                // Not durable after all: a drop must mark them.
                inner.unflushed[index].extend(taken);
                return outcome;
            }
            if inner.drop_epoch != epoch {
                return Ok(());
            }
            clearable.into_iter().filter(|region| inner.clear_after_flush.remove(region)).collect()
        };
        if !clear.is_empty() {
            let source = 1 - index;
            if let Some(bitmap) = self.sides[source].bitmap.lock().await.as_mut() {
                // Re-checked under the bitmap lock: a drop that began meanwhile keeps them.
                if self.inner().drop_epoch == epoch {
                    for region in clear {
                        bitmap.unset(region);
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs one I/O of plex `index` bounded by the mirror timeout (DESIGN §4.1); a failure or a
    /// timeout is logged, counted, and becomes the reason to drop the plex.
    async fn bounded<T>(
        &self,
        index: usize,
        what: &str,
        io: impl std::future::Future<Output = Result<T, PlexError>>,
    ) -> Result<T, DropReason> {
        match tokio::time::timeout(self.options.mirror_timeout, io).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                tracing::warn!(aggregate = ?self.uuid, plex = index, "{what} failed: {e}");
                self.count_error(index, &e);
                Err(DropReason::Failed)
            }
            Err(_) => {
                tracing::warn!(aggregate = ?self.uuid, plex = index, "{what} timed out");
                self.options.metrics.io_error(self.uuid, index, "timeout");
                Err(DropReason::Timeout)
            }
        }
    }

    /// Counts a plex error in the metrics by its kind.
    fn count_error(&self, plex: usize, error: &PlexError) {
        let kind = match error {
            PlexError::Checksum { .. } => "checksum",
            PlexError::Device { source: crate::device::DeviceError::Io { op, .. }, .. } => op,
            PlexError::Device { .. } => "refused",
            PlexError::Range { .. } | PlexError::Invalid(_) => "invalid",
        };
        self.options.metrics.io_error(self.uuid, plex, kind);
    }

    fn forget_inflight(&self, id: u64) {
        let mut inner = self.inner();
        inner.inflight[0].remove(&id);
        inner.inflight[1].remove(&id);
    }

    /// Marks `regions` in plex `tracker`'s bitmap durably; returns the regions that were clean.
    async fn mark(&self, tracker: usize, regions: Range<u64>) -> Result<Vec<u64>, AggregateError> {
        let mut bitmap = self.sides[tracker].bitmap.lock().await;
        let bitmap = bitmap
            .as_mut()
            .ok_or_else(|| AggregateError::NoUsablePlex(format!("plex {tracker} has no bitmap")))?;
        let newly = bitmap.set_regions(regions);
        bitmap.persist(self.device0(tracker).as_ref()).await.map_err(bitmap_error(tracker))?;
        Ok(newly)
    }

    async fn wait_drop(&self, index: usize) -> Result<(), AggregateError> {
        let mut changed = self.changed.subscribe();
        loop {
            {
                let inner = self.inner();
                if !inner.dropping[index] {
                    return if inner.states.contains(&PlexState::Normal) {
                        Ok(())
                    } else {
                        Err(AggregateError::NoUsablePlex(format!("{:?}", inner.states)))
                    };
                }
            }
            if changed.changed().await.is_err() {
                return Err(AggregateError::NoUsablePlex("the aggregate is closing".into()));
            }
        }
    }

    /// Drops plex `index` (S3, S4): marks in the survivor's bitmap every region with a write to
    /// it in flight or written to it since its last successful flush (and `extra`), records the
    /// drop in the survivor's label (new generation), calls the hook until it succeeds, and only
    /// then lets waiting writes complete. If the caller's future is dropped midway, the drop is
    /// undone in memory (`dropping` cleared) and the next write or flush begins it again.
    async fn drop_plex(
        &self,
        index: usize,
        reason: DropReason,
        extra: Vec<Range<u64>>,
    ) -> Result<(), AggregateError> {
        let survivor = 1 - index;
        let to_mark = loop {
            if self.inner().dropping[index] {
                self.wait_drop(index).await?;
            }
            let mut inner = self.inner();
            if inner.dropping[index] {
                // Another drop began between the two locks: wait for it too.
                continue;
            }
            if !matches!(inner.states[index], PlexState::Normal | PlexState::Resyncing { .. }) {
                return Ok(());
            }
            if inner.states[survivor] != PlexState::Normal || inner.dropping[survivor] {
                inner.states[index] = PlexState::Failed;
                return Err(AggregateError::NoUsablePlex(format!(
                    "plex {index} failed and plex {survivor} is not normal"
                )));
            }
            inner.dropping[index] = true;
            let mut regions: Vec<Range<u64>> = inner.inflight[index].values().cloned().collect();
            let unflushed = std::mem::take(&mut inner.unflushed[index]);
            regions.extend(unflushed.into_iter().map(|region| region..region + 1));
            regions.extend(extra);
            // Resync-time marks are no longer redundant: the dropped plex may lack those writes.
            inner.drop_epoch += 1;
            inner.marked_by_writes.clear();
            inner.clear_after_flush.clear();
            break regions;
        };
        let mut cancelled = CancelledDrop { aggregate: self, index, armed: true };
        tracing::warn!(aggregate = ?self.uuid, plex = index, ?reason, "dropping plex");
        let result = self.record_drop(index, reason, to_mark).await;
        cancelled.armed = false;
        {
            let mut inner = self.inner();
            inner.dropping[index] = false;
            match &result {
                Ok(()) => {
                    inner.states[index] = match reason {
                        DropReason::Timeout | DropReason::OutOfDate => PlexState::OutOfDate,
                        DropReason::Failed => PlexState::Failed,
                    };
                    inner.counters.drops += 1;
                    self.options.metrics.dropped(self.uuid, index);
                }
                Err(_) => {
                    inner.states = [PlexState::Failed; 2];
                }
            }
        }
        self.changed.send_modify(|n| *n += 1);
        result
    }

    async fn record_drop(
        &self,
        index: usize,
        reason: DropReason,
        to_mark: Vec<Range<u64>>,
    ) -> Result<(), AggregateError> {
        let survivor = 1 - index;
        {
            let mut bitmap = self.sides[survivor].bitmap.lock().await;
            let bitmap = bitmap
                .as_mut()
                .ok_or_else(|| AggregateError::NoUsablePlex(format!("plex {survivor} has no bitmap")))?;
            for regions in to_mark {
                bitmap.set_regions(regions);
            }
            bitmap.persist(self.device0(survivor).as_ref()).await.map_err(bitmap_error(survivor))?;
        }
        let peer_state = match reason {
            DropReason::Timeout | DropReason::OutOfDate => PeerState::OutOfDate,
            DropReason::Failed => PeerState::Failed,
        };
        let (current, peer) = {
            let labels = self.sides[survivor].labels.lock().await;
            let label = labels
                .as_ref()
                .map(|labels| &labels[0])
                .ok_or_else(|| AggregateError::NoUsablePlex(format!("plex {survivor} has no labels")))?;
            (label.plex_generation, label.peer_state)
        };
        // Only a peer already recorded out of date or failed means this plex moved on before;
        // `resyncing` (a crash or cancellation during a resync or its completion) counts as in
        // sync.
        // The generation moved on from is the one both shared: with a peer `resyncing`, it is
        // the current one if the resync completed (a resync target that did not complete is
        // `resyncing` in its own label, which the rules check first).
        let (next, peer_sync) = if matches!(peer, PeerState::Normal | PeerState::Resyncing) {
            let next = next_generation(current, index_of(survivor)).ok_or_else(|| {
                AggregateError::Invalid(format!("plex {survivor}'s generations are exhausted"))
            })?;
            (next, Some(current))
        } else {
            (current, None)
        };
        let generation = self
            .update_labels(survivor, |label| {
                label.plex_generation = next;
                if let Some(peer_sync) = peer_sync {
                    label.peer_sync_generation = peer_sync;
                }
                label.peer_state = peer_state;
            })
            .await?;
        let record =
            PlexDrop { aggregate: self.uuid, plex: index_of(index), reason, survivor_generation: generation };
        let mut delay = Duration::from_millis(50);
        loop {
            match self.hook.plex_dropped(&record).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(aggregate = ?self.uuid, plex = index, "the drop is not recorded yet, writes stall: {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Rewrites the labels of plex `index` with `update` applied (other disks first, disk 0
    /// last as the commit point); returns the plex's generation after.
    async fn update_labels(
        &self,
        index: usize,
        update: impl Fn(&mut DiskLabel),
    ) -> Result<PlexGeneration, AggregateError> {
        let mut labels = self.sides[index].labels.lock().await;
        let labels =
            labels.as_mut().ok_or_else(|| AggregateError::Invalid(format!("plex {index} has no labels")))?;
        let devices = self.devices(index);
        for disk in (0..labels.len()).rev() {
            let mut next = labels[disk].clone();
            update(&mut next);
            match tokio::time::timeout(
                self.options.mirror_timeout,
                write_label(devices[disk].as_ref(), &mut next),
            )
            .await
            {
                Ok(Ok(())) => labels[disk] = next,
                Ok(Err(source)) => return Err(AggregateError::Label { plex: index, disk, source }),
                Err(_) => {
                    self.options.metrics.io_error(self.uuid, index, "timeout");
                    return Err(AggregateError::Timeout { plex: index, what: "label write" });
                }
            }
        }
        self.inner().generations[index] = labels[0].plex_generation;
        Ok(labels[0].plex_generation)
    }

    /// Records a new owner and epoch (a switchover or forced unfence, DESIGN §7, S2) in the labels
    /// of every `normal` plex, durably. Fails unless at least one plex took it; a plex that
    /// fails here is dropped like on any failed label write.
    pub async fn record_owner(&self, owner: NodeId, epoch: Epoch) -> Result<(), AggregateError> {
        let states = self.inner().states;
        let mut recorded = 0;
        let mut last_error = None;
        for (index, state) in states.iter().enumerate() {
            if *state != PlexState::Normal {
                continue;
            }
            match self
                .update_labels(index, |label| {
                    label.owner = owner;
                    label.epoch_high_water = label.epoch_high_water.max(epoch);
                })
                .await
            {
                Ok(_) => recorded += 1,
                Err(e) => {
                    tracing::warn!(aggregate = ?self.uuid, plex = index, "owner label write failed: {e}");
                    last_error = Some(e);
                }
            }
        }
        match (recorded, last_error) {
            (0, Some(e)) => Err(e),
            (0, None) => Err(AggregateError::NoUsablePlex("no normal plex to record the owner in".into())),
            _ => Ok(()),
        }
    }

    /// Records a consistency point in the labels of every `normal` plex (S12: call after the
    /// CP's data is flushed; the label is durable on return).
    pub async fn record_cp(&self, cp: CpRecord) -> Result<(), AggregateError> {
        let states = self.inner().states;
        for (index, state) in states.iter().enumerate() {
            if *state == PlexState::Normal
                && let Err(e) = self.update_labels(index, |label| label.last_cp = cp).await
            {
                tracing::warn!(aggregate = ?self.uuid, plex = index, "CP label write failed: {e}");
                let reason = if matches!(e, AggregateError::Timeout { .. }) {
                    DropReason::Timeout
                } else {
                    DropReason::Failed
                };
                self.drop_plex(index, reason, Vec::new()).await?;
            }
        }
        if self.inner().states.contains(&PlexState::Normal) {
            Ok(())
        } else {
            Err(AggregateError::NoUsablePlex("no plex recorded the CP".into()))
        }
    }

    /// Makes every completed write durable on every plex that is `normal` or `resyncing`.
    pub async fn flush(&self) -> Result<(), AggregateError> {
        let states = self.inner().states;
        for (index, state) in states.iter().enumerate() {
            if matches!(state, PlexState::Normal | PlexState::Resyncing { .. })
                && let Err(reason) = self.flush_plex(index).await
            {
                self.drop_plex(index, reason, Vec::new()).await?;
            }
        }
        if self.inner().states.contains(&PlexState::Normal) {
            Ok(())
        } else {
            Err(AggregateError::NoUsablePlex("no plex left after flush".into()))
        }
    }

    /// Reads `len` bytes at `offset` from a `normal` plex (plex 0 first), repairing a bad copy
    /// from the other plex when DESIGN §6.3 allows it.
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf, AggregateError> {
        let regions = self.check_range(offset, len)?;
        let states = self.inner().states;
        let dropping = self.inner().dropping;
        let normal = |i: usize| states[i] == PlexState::Normal && !dropping[i];
        let Some(first) = (0..2).find(|i| normal(*i)) else {
            return Err(AggregateError::NoUsablePlex(format!("{states:?}")));
        };
        let plex = self.plex(first).ok_or_else(|| AggregateError::NoUsablePlex("no plex".into()))?;
        let error = match tokio::time::timeout(self.options.mirror_timeout, plex.read(offset, len)).await {
            Ok(Ok(data)) => return Ok(data),
            Ok(Err(PlexError::Range { offset, len, size })) => {
                return Err(AggregateError::Range { offset, len, size });
            }
            Ok(Err(e)) => {
                self.count_error(first, &e);
                e
            }
            Err(_) => {
                // A plex that does not answer a read is dropped like one that does not answer a
                // write; the read then goes to the other plex (or fails if there is none).
                tracing::warn!(aggregate = ?self.uuid, plex = first, offset, "read timed out");
                self.options.metrics.io_error(self.uuid, first, "timeout");
                self.drop_plex(first, DropReason::Timeout, Vec::new()).await?;
                return Box::pin(self.read(offset, len)).await;
            }
        };
        tracing::warn!(aggregate = ?self.uuid, plex = first, offset, "read failed: {error}");
        let other = 1 - first;
        let refuse = |why: &'static str, source: PlexError| {
            self.inner().counters.read_errors += 1;
            self.options.metrics.read_unrepaired(self.uuid, first);
            tracing::error!(aggregate = ?self.uuid, plex = first, offset, len, why, "read failed and cannot be repaired: {source}");
            Err(AggregateError::Unrepairable { offset, plex: first, why, source })
        };
        if !normal(other) {
            return refuse("the other plex is not normal", error);
        }
        let guard = self.regions.lock(regions.clone(), true).await;
        // The states may have changed while the lock was awaited.
        let both_normal = {
            let inner = self.inner();
            let normal = |i: usize| inner.states[i] == PlexState::Normal && !inner.dropping[i];
            normal(first) && normal(other)
        };
        if !both_normal {
            drop(guard);
            return Box::pin(self.read(offset, len)).await;
        }
        for side in &self.sides {
            if let Some(bitmap) = side.bitmap.lock().await.as_ref()
                && regions.clone().any(|region| bitmap.is_dirty(region))
            {
                return refuse("the region is dirty", error);
            }
        }
        let timeout = self.options.mirror_timeout;
        // Under the exclusive lock: a write that completed meanwhile may have fixed it.
        if let Ok(Ok(data)) = tokio::time::timeout(timeout, plex.read(offset, len)).await {
            return Ok(data);
        }
        let Some(good) = self.plex(other) else { return refuse("the other plex is gone", error) };
        let data = match tokio::time::timeout(timeout, good.read(offset, len)).await {
            Ok(Ok(data)) => data,
            Ok(Err(e)) => {
                self.count_error(other, &e);
                return refuse("the other plex failed too", error);
            }
            Err(_) => {
                // The only good copy does not answer: it is dropped like any plex that hangs,
                // and the read fails (the bad copy is all that is left).
                self.options.metrics.io_error(self.uuid, other, "timeout");
                drop(guard);
                self.drop_plex(other, DropReason::Timeout, Vec::new()).await?;
                return refuse("the other plex does not answer", error);
            }
        };
        let repaired = match tokio::time::timeout(timeout, plex.write(offset, &data)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => {
                self.count_error(first, &e);
                tracing::warn!(aggregate = ?self.uuid, plex = first, "read repair write failed: {e}");
                Some(DropReason::Failed)
            }
            Err(_) => {
                self.options.metrics.io_error(self.uuid, first, "timeout");
                Some(DropReason::Timeout)
            }
        };
        match repaired {
            None => {
                tracing::info!(aggregate = ?self.uuid, plex = first, offset, len, "read repaired from plex {other}")
            }
            Some(reason) => {
                drop(guard);
                self.drop_plex(first, reason, vec![regions]).await?;
            }
        }
        self.inner().counters.read_repairs += 1;
        self.options.metrics.read_repaired(self.uuid, first);
        Ok(data)
    }

    /// Drops plex `index` on purpose (an operator's `mirror pause`, or the first step of a full
    /// resync): exactly as a drop for a timeout (S3, S4: in-flight regions marked, the drop
    /// recorded in the other plex's label with a new generation and through the hook), leaving
    /// it `out_of_date` until it is reattached. Refused unless the other plex is `normal`.
    pub async fn detach(&self, index: usize) -> Result<(), AggregateError> {
        if index > 1 {
            return Err(AggregateError::Invalid(format!("there is no plex {index}")));
        }
        let states = self.inner().states;
        if !matches!(states[index], PlexState::Normal | PlexState::Resyncing { .. }) {
            return Err(AggregateError::Invalid(format!(
                "plex {index} is not attached ({:?})",
                states[index]
            )));
        }
        if states[1 - index] != PlexState::Normal {
            return Err(AggregateError::NoUsablePlex(format!(
                "plex {} is not normal ({:?}): detaching plex {index} would leave no copy",
                1 - index,
                states[1 - index]
            )));
        }
        self.drop_plex(index, DropReason::OutOfDate, Vec::new()).await
    }

    /// Lets a dropped plex come back on the same devices (they answer again): re-reads its
    /// labels and applies the generation rules. It becomes `out_of_date`, ready for `resync`; a
    /// split brain is refused and the plex stays out.
    pub async fn reattach(&self, index: usize) -> Result<Decision, AggregateError> {
        self.reattach_inner(index, None).await
    }

    /// `reattach` with new devices for the plex: reopened ones (a device that failed refuses
    /// writes until reopened, S10) or replaced disks (blank: the target of a full resync).
    pub async fn reattach_with(
        &self,
        index: usize,
        devices: Vec<Arc<dyn BlockDevice>>,
    ) -> Result<Decision, AggregateError> {
        self.reattach_inner(index, Some(devices)).await
    }

    async fn reattach_inner(
        &self,
        index: usize,
        devices: Option<Vec<Arc<dyn BlockDevice>>>,
    ) -> Result<Decision, AggregateError> {
        if index > 1 {
            return Err(AggregateError::Invalid(format!("there is no plex {index}")));
        }
        let state = self.inner().states[index];
        if matches!(state, PlexState::Normal | PlexState::Resyncing { .. }) {
            return Err(AggregateError::Invalid(format!("plex {index} is attached ({state:?})")));
        }
        if let Some(devices) = devices {
            if devices.is_empty() {
                return Err(AggregateError::Invalid(format!("plex {index} needs at least one disk")));
            }
            *self.sides[index].devices.write().expect("device list holder panicked") = devices;
        }
        let devices = self.devices(index);
        let found = find_labels(&devices).await;
        let other = self.sides[1 - index].labels.lock().await.as_ref().map(|labels| labels[0].clone());
        let decision = match &found {
            Found::Unreadable(why) => {
                return Err(AggregateError::Invalid(format!("plex {index} is still unreadable: {why}")));
            }
            Found::Labelled(labels) => {
                check_plex_labels(index, labels)?;
                if labels[0].region_bytes != u32::try_from(self.region_bytes).unwrap_or(0) {
                    return Err(AggregateError::Invalid(format!(
                        "plex {index}'s bitmap regions are {} bytes, the aggregate's {}",
                        labels[0].region_bytes, self.region_bytes
                    )));
                }
                if labels[0].aggregate != self.uuid {
                    return Err(AggregateError::Invalid(format!(
                        "plex {index}'s disks belong to another aggregate"
                    )));
                }
                let mut pair = [None, None];
                pair[index] = Some(&labels[0]);
                pair[1 - index] = other.as_ref();
                decide(pair)?
            }
            Found::NoLabel { partial } => {
                check_partly_blank(index, partial.as_ref(), other.as_ref())?;
                let mut pair = [None, None];
                pair[1 - index] = other.as_ref();
                decide(pair)?
            }
        };
        tracing::info!(aggregate = ?self.uuid, plex = index, rule = decision.rule.name(), resync = ?decision.resync, "generation rule at reattach");
        match decision.resync {
            Some((source, target, _)) if target == index && source == 1 - index => {}
            None if decision.rule == GenerationRule::EqualGenerations => {}
            _ => {
                return Err(AggregateError::Invalid(format!(
                    "rule {} would make plex {index} a source; refused (S5)",
                    decision.rule
                )));
            }
        }
        if let Found::Labelled(labels) = found {
            let plex = assemble(index, &devices, &labels)?;
            if plex.size_bytes() < self.size {
                return Err(AggregateError::Invalid(format!("plex {index} is smaller than the aggregate")));
            }
            let bitmap = DirtyBitmap::load(
                devices[0].as_ref(),
                labels[0].bitmap,
                self.uuid,
                labels[0].region_bytes,
                plex.size_bytes(),
            )
            .await
            .map_err(bitmap_error(index))?;
            *self.sides[index].plex.write().expect("plex holder panicked") = Some(Arc::new(plex));
            self.inner().generations[index] = labels[0].plex_generation;
            *self.sides[index].labels.lock().await = Some(labels);
            *self.sides[index].bitmap.lock().await = Some(bitmap);
        } else {
            *self.sides[index].plex.write().expect("plex holder panicked") = None;
            *self.sides[index].labels.lock().await = None;
            *self.sides[index].bitmap.lock().await = None;
        }
        let mut inner = self.inner();
        inner.states[index] = match decision.rule {
            GenerationRule::ResyncInProgress => match decision.resync {
                Some((_, _, level)) => PlexState::Resyncing { level, next_region: 0 },
                None => PlexState::OutOfDate,
            },
            _ => PlexState::OutOfDate,
        };
        Ok(decision)
    }

    /// Runs `resync` in a background task (DESIGN §6.4); the handle says how it ended.
    pub fn spawn_resync(
        self: &Arc<Self>,
    ) -> tokio::task::JoinHandle<Result<Option<ResyncProgress>, AggregateError>> {
        let aggregate = self.clone();
        tokio::spawn(async move { aggregate.resync().await })
    }

    /// The running (or last) resync's progress.
    pub fn resync_progress(&self) -> Option<ResyncProgress> {
        self.inner().resync
    }

    /// Resyncs the plex that is `out_of_date` or `resyncing` from the `normal` one (DESIGN §6.4)
    /// and returns when it is `normal` again. Writes go on meanwhile; run it in a task.
    /// Returns `None` when nothing needed a resync.
    pub async fn resync(&self) -> Result<Option<ResyncProgress>, AggregateError> {
        let _running = self.resync_running.lock().await;
        let (source, target, resuming, level) = {
            let inner = self.inner();
            let target = match inner.states.iter().position(|s| {
                matches!(s, PlexState::OutOfDate | PlexState::Resyncing { .. }) || *s == PlexState::Failed
            }) {
                Some(target) => target,
                None => return Ok(None),
            };
            let source = 1 - target;
            if inner.states[source] != PlexState::Normal || inner.dropping.contains(&true) {
                return Err(AggregateError::NoUsablePlex(format!(
                    "no normal source for plex {target}: {:?}",
                    inner.states
                )));
            }
            match inner.states[target] {
                PlexState::Resyncing { level, .. } => (source, target, true, level),
                PlexState::Failed => {
                    return Err(AggregateError::Invalid(format!(
                        "plex {target} is failed: reattach it (or replace its disks) first"
                    )));
                }
                _ => {
                    let level = if self.plex(target).is_none() {
                        ResyncLevel::Full
                    } else {
                        ResyncLevel::Incremental
                    };
                    (source, target, false, level)
                }
            }
        };
        if !resuming {
            self.start_resync(source, target, level).await?;
        }
        let result = self.copy_dirty(source, target, level).await;
        if let Err(e) = &result {
            tracing::warn!(aggregate = ?self.uuid, source, target, "resync stopped: {e}");
        }
        result.map(Some)
    }

    /// Everything that must be durable before the first byte is copied (S5).
    async fn start_resync(
        &self,
        source: usize,
        target: usize,
        level: ResyncLevel,
    ) -> Result<(), AggregateError> {
        let source_labels = self.sides[source]
            .labels
            .lock()
            .await
            .clone()
            .ok_or_else(|| AggregateError::Invalid("source has no labels".into()))?;
        // 1. The resync set, durable in the source's bitmap: everything for a full resync, the
        //    merge of both bitmaps for an incremental one.
        {
            let target_bitmap = self.sides[target].bitmap.lock().await.clone();
            let mut bitmap = self.sides[source].bitmap.lock().await;
            let bitmap =
                bitmap.as_mut().ok_or_else(|| AggregateError::Invalid("source has no bitmap".into()))?;
            let device = self.device0(source);
            let device = device.as_ref();
            match (level, target_bitmap) {
                (ResyncLevel::Full, _) => {
                    bitmap.set_regions(0..self.size.div_ceil(self.region_bytes));
                    bitmap.persist(device).await.map_err(bitmap_error(source))?;
                }
                (ResyncLevel::Incremental, Some(theirs)) => {
                    bitmap.merge(&theirs);
                    bitmap.persist(device).await.map_err(bitmap_error(source))?;
                }
                (ResyncLevel::Incremental, None) => {}
            }
        }
        // 2. The target is `resyncing` on disk before its first byte (S5).
        let resyncing = PlexState::Resyncing { level, next_region: 0 };
        if self.plex(target).is_none() {
            let spec = AggregateSpec {
                cluster: source_labels[0].cluster,
                aggregate: self.uuid,
                owner: source_labels[0].owner,
                sites: [source_labels[0].site; 2],
                region_bytes: source_labels[0].region_bytes,
                epoch: source_labels[0].epoch_high_water,
            };
            let devices = self.devices(target);
            let devices = &devices;
            let mut labels = label_plex(&spec, target, devices, PlexGeneration(0), resyncing)?;
            for label in &mut labels {
                label.home_owner = source_labels[0].home_owner;
                label.dr_home_owner = source_labels[0].dr_home_owner;
                label.last_cp = source_labels[0].last_cp;
            }
            let (plex, bitmap, labels) = format_plex(target, devices, labels, self.uuid).await?;
            if plex.size_bytes() < self.size {
                return Err(AggregateError::Invalid(format!(
                    "the new plex {target} is smaller than the aggregate"
                )));
            }
            self.inner().generations[target] = labels[0].plex_generation;
            *self.sides[target].labels.lock().await = Some(labels);
            *self.sides[target].bitmap.lock().await = Some(bitmap);
            *self.sides[target].plex.write().expect("plex holder panicked") = Some(Arc::new(plex));
        } else {
            self.update_labels(target, |label| label.plex_state = resyncing).await?;
            // Its own marks were merged into the source's: start it clean.
            let mut bitmap = self.sides[target].bitmap.lock().await;
            if let Some(bitmap) = bitmap.as_mut() {
                for region in bitmap.dirty_regions().collect::<Vec<_>>() {
                    bitmap.unset(region);
                }
                bitmap.persist(self.device0(target).as_ref()).await.map_err(bitmap_error(target))?;
            }
        }
        self.update_labels(source, |label| label.peer_state = PeerState::Resyncing).await?;
        tracing::info!(aggregate = ?self.uuid, source, target, ?level, "resync started");
        // 3. From now on writes go to the target too (and mark the source's bitmap).
        self.inner().states[target] = resyncing;
        Ok(())
    }

    async fn copy_dirty(
        &self,
        source: usize,
        target: usize,
        level: ResyncLevel,
    ) -> Result<ResyncProgress, AggregateError> {
        let started = Instant::now();
        let region_bytes = self.region_bytes;
        let regions_total = self.size.div_ceil(region_bytes);
        let initial = self.dirty_count(source).await?;
        let mut progress = ResyncProgress {
            level,
            source,
            target,
            total_bytes: initial * region_bytes,
            copied_bytes: 0,
            elapsed: Duration::ZERO,
            complete: false,
        };
        self.inner().resync = Some(progress);
        let batch_regions = (self.options.resync_batch_bytes / region_bytes).max(1);
        let (src, dst) = match (self.plex(source), self.plex(target)) {
            (Some(src), Some(dst)) => (src, dst),
            _ => return Err(AggregateError::Invalid("a resync plex has no disks".into())),
        };
        let mut cursor = 0u64;
        let mut last_label = Instant::now();
        loop {
            let state = self.inner().states[target];
            if !matches!(state, PlexState::Resyncing { .. }) {
                return Err(AggregateError::TargetDropped(target));
            }
            // The next batch: up to `batch_regions` dirty regions from the cursor, so a sparse
            // bitmap is copied in few batches (each pays a flush of the target). Regions marked
            // only by resync-time writes that reach both plexes need no copy.
            let wanted: Vec<Range<u64>> = {
                let bitmap = self.sides[source].bitmap.lock().await;
                let bitmap =
                    bitmap.as_ref().ok_or_else(|| AggregateError::Invalid("source has no bitmap".into()))?;
                let (mut runs, mut count, mut at) = (Vec::<Range<u64>>::new(), 0u64, cursor);
                while count < batch_regions {
                    let Some(region) = bitmap.next_dirty(at).filter(|region| *region < regions_total) else {
                        break;
                    };
                    at = region + 1;
                    if self.needs_no_copy(region) {
                        continue;
                    }
                    match runs.last_mut() {
                        Some(run) if run.end == region => run.end += 1,
                        _ => runs.push(region..region + 1),
                    }
                    count += 1;
                }
                runs
            };
            let Some(last) = wanted.last().map(|run| run.end) else {
                if cursor == 0 {
                    if self.try_complete(source, target).await? {
                        break;
                    }
                    continue;
                }
                cursor = 0;
                continue;
            };
            // Locked run by run, in ascending order; writers take all their regions at once and
            // hold nothing while they wait, so this cannot deadlock.
            let mut guards = Vec::with_capacity(wanted.len());
            for run in &wanted {
                guards.push(self.regions.lock(run.clone(), true).await);
            }
            let batch = wanted[0].start..last;
            let dirty: Vec<u64> = {
                let bitmap = self.sides[source].bitmap.lock().await;
                let bitmap =
                    bitmap.as_ref().ok_or_else(|| AggregateError::Invalid("source has no bitmap".into()))?;
                wanted.iter().flat_map(|run| run.clone()).filter(|r| bitmap.is_dirty(*r)).collect()
            };
            // Contiguous runs of dirty regions, copied concurrently.
            let mut runs: Vec<Range<u64>> = Vec::new();
            for region in &dirty {
                match runs.last_mut() {
                    Some(run) if run.end == *region => run.end += 1,
                    _ => runs.push(*region..*region + 1),
                }
            }
            let timeout = self.options.mirror_timeout;
            let copies: Vec<IoFuture<'_, Result<(), Result<AggregateError, DropReason>>>> = runs
                .iter()
                .map(|run| {
                    let offset = run.start * region_bytes;
                    let len = (run.end * region_bytes).min(self.size) - offset;
                    let (src, dst) = (src.clone(), dst.clone());
                    let copy: IoFuture<'_, _> = Box::pin(async move {
                        let data = match tokio::time::timeout(timeout, src.read(offset, len)).await {
                            Ok(Ok(data)) => data,
                            Ok(Err(e)) => {
                                self.count_error(source, &e);
                                return Err(Ok(side_error(source)(e)));
                            }
                            Err(_) => {
                                self.options.metrics.io_error(self.uuid, source, "timeout");
                                return Err(Ok(AggregateError::NoUsablePlex(format!(
                                    "the resync source plex {source} does not answer"
                                ))));
                            }
                        };
                        self.bounded(target, "resync write", dst.write(offset, &data)).await.map_err(Err)
                    });
                    copy
                })
                .collect();
            let mut outcome = Ok(());
            for result in join_all(copies).await {
                if let Err(e) = result {
                    outcome = Err(e);
                }
            }
            if outcome.is_ok() {
                outcome = self.flush_plex(target).await.map_err(Err);
            }
            match outcome {
                Ok(()) => {}
                Err(Ok(source_error)) => return Err(source_error),
                Err(Err(reason)) => {
                    drop(guards);
                    self.drop_plex(target, reason, Vec::new()).await?;
                    return Err(AggregateError::TargetDropped(target));
                }
            }
            // The copies are durable on the target: now their bits may go.
            {
                let mut bitmap = self.sides[source].bitmap.lock().await;
                let bitmap =
                    bitmap.as_mut().ok_or_else(|| AggregateError::Invalid("source has no bitmap".into()))?;
                for region in &dirty {
                    bitmap.unset(*region);
                }
                bitmap.persist(self.device0(source).as_ref()).await.map_err(bitmap_error(source))?;
            }
            drop(guards);
            cursor = batch.end;
            let copied: u64 = runs
                .iter()
                .map(|run| ((run.end * region_bytes).min(self.size)) - run.start * region_bytes)
                .sum();
            progress.copied_bytes += copied;
            progress.total_bytes = progress.total_bytes.max(progress.copied_bytes);
            progress.elapsed = started.elapsed();
            {
                let mut inner = self.inner();
                inner.counters.regions_resynced += dirty.len() as u64;
                self.options.metrics.resync_copied(self.uuid, target, copied);
                if let PlexState::Resyncing { level, .. } = inner.states[target] {
                    inner.states[target] = PlexState::Resyncing { level, next_region: cursor };
                }
                inner.resync = Some(progress);
            }
            // The resume point, for display after a restart (the bitmap is what resumes).
            if last_label.elapsed() > Duration::from_secs(1) {
                let next_region = cursor;
                self.update_labels(target, |label| {
                    label.plex_state = PlexState::Resyncing { level, next_region }
                })
                .await?;
                last_label = Instant::now();
            }
            if let Some(rate) = self.options.resync_bytes_per_second.filter(|rate| *rate > 0) {
                let due = Duration::from_secs_f64(progress.copied_bytes as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::time::sleep(due - elapsed).await;
                }
            }
        }
        progress.complete = true;
        progress.elapsed = started.elapsed();
        self.inner().resync = Some(progress);
        tracing::info!(aggregate = ?self.uuid, source, target, "resync complete: {progress}");
        Ok(progress)
    }

    async fn dirty_count(&self, index: usize) -> Result<u64, AggregateError> {
        let bitmap = self.sides[index].bitmap.lock().await;
        Ok(bitmap.as_ref().map_or(0, DirtyBitmap::dirty_count))
    }

    /// Makes the target `normal` if the bitmap is clean, with writes kept from marking.
    async fn try_complete(&self, source: usize, target: usize) -> Result<bool, AggregateError> {
        let gate = self.gate.write().await;
        let regions = self.size.div_ceil(self.region_bytes);
        // Bits set only by resync-time writes that reach both plexes need no copy; any other
        // bit does.
        let left = {
            let bitmap = self.sides[source].bitmap.lock().await;
            let bitmap =
                bitmap.as_ref().ok_or_else(|| AggregateError::Invalid("source has no bitmap".into()))?;
            bitmap
                .dirty_regions()
                .take_while(|region| *region < regions)
                .any(|region| !self.needs_no_copy(region))
        };
        if left {
            return Ok(false);
        }
        if let Err(reason) = self.flush_plex(target).await {
            drop(gate);
            self.drop_plex(target, reason, Vec::new()).await?;
            return Err(AggregateError::TargetDropped(target));
        }
        let generation = self.inner().generations[source];
        // The target now holds everything the source held, so the source's last CP is the
        // target's too (S8: a switchover to it replays only above that CP; a stale one there made
        // the writer's released records look missing).
        let source_cp =
            self.sides[source].labels.lock().await.as_ref().and_then(|l| l.first().map(|l| l.last_cp));
        // Target first: with equal generations the pair is in sync whatever the source's label
        // says about its peer (opening settles that label).
        let relabelled = self
            .update_labels(target, |label| {
                label.plex_state = PlexState::Normal;
                label.peer_state = PeerState::Normal;
                label.plex_generation = generation;
                label.peer_sync_generation = generation;
                if let Some(cp) = source_cp
                    && (cp.last_lsn, cp.id) > (label.last_cp.last_lsn, label.last_cp.id)
                {
                    label.last_cp = cp;
                }
            })
            .await;
        if let Err(e) = relabelled {
            tracing::warn!(aggregate = ?self.uuid, plex = target, "label write at resync completion failed: {e}");
            drop(gate);
            self.drop_plex(target, DropReason::Failed, Vec::new()).await?;
            return Err(AggregateError::TargetDropped(target));
        }
        self.inner().states[target] = PlexState::Normal;
        drop(gate);
        self.update_labels(source, |label| {
            label.peer_state = PeerState::Normal;
            label.peer_sync_generation = generation;
        })
        .await?;
        Ok(true)
    }
}

/// The generation a plex starts when its peer is dropped: the next one above `current` whose
/// parity is the plex's index. Two plexes that move on from the same generation, each without
/// the other (each site alone), therefore never reach equal generations, which would read as
/// "in sync" (DRBD makes its generation ids random for the same reason).
/// `None` when the generations are exhausted (only a corrupt label gets near 2^64): the drop
/// then fails rather than reuse a generation.
pub fn next_generation(current: PlexGeneration, plex: u8) -> Option<PlexGeneration> {
    let mut next = current.0.checked_add(1)?;
    if next % 2 != u64::from(plex % 2) {
        next = next.checked_add(1)?;
    }
    Some(PlexGeneration(next))
}

fn index_of(plex: usize) -> u8 {
    u8::from(plex == 1)
}

/// A plex from its devices and their labels, in order.
fn assemble(
    index: usize,
    devices: &[Arc<dyn BlockDevice>],
    labels: &[DiskLabel],
) -> Result<Plex, AggregateError> {
    let disks = devices
        .iter()
        .zip(labels)
        .map(|(device, label)| PlexDisk { device: device.clone(), label: label.clone() })
        .collect();
    Plex::new(disks).map_err(side_error(index))
}

fn check_plex_labels(index: usize, labels: &[DiskLabel]) -> Result<(), AggregateError> {
    let first = &labels[0];
    for (disk, label) in labels.iter().enumerate() {
        if label.aggregate != first.aggregate || usize::from(label.plex_index) != index {
            return Err(AggregateError::Invalid(format!(
                "plex {index} disk {disk} is labelled for plex {} of another aggregate or slot",
                label.plex_index
            )));
        }
    }
    Ok(())
}

/// Labels for the disks of plex `index` of a new aggregate (or a replaced plex).
fn label_plex(
    spec: &AggregateSpec,
    index: usize,
    devices: &[Arc<dyn BlockDevice>],
    generation: PlexGeneration,
    state: PlexState,
) -> Result<Vec<DiskLabel>, AggregateError> {
    let sizes: Vec<u64> = devices.iter().map(|device| device.size_bytes()).collect();
    let areas = plan_plex(&sizes, spec.region_bytes)?;
    let plex_index = u8::try_from(index).map_err(|_| AggregateError::Invalid(format!("plex {index}")))?;
    Ok(areas
        .iter()
        .zip(&sizes)
        .map(|(areas, size)| DiskLabel {
            sequence: 0,
            cluster: spec.cluster,
            disk: Uuid(rand::random()),
            site: spec.sites[index],
            pool: plex_index,
            size_bytes: *size,
            owner: spec.owner,
            home_owner: spec.owner,
            dr_home_owner: spec.owner,
            aggregate: spec.aggregate,
            plex_index,
            plex_state: state,
            peer_state: PeerState::Normal,
            plex_generation: generation,
            peer_sync_generation: generation,
            epoch_high_water: spec.epoch,
            last_cp: CpRecord::default(),
            region_bytes: spec.region_bytes,
            bitmap: areas.bitmap,
            checksums: areas.checksums,
            data: areas.data,
        })
        .collect())
}

/// Zeroes the checksum areas, formats the bitmap, then writes the labels (last, so a crash
/// leaves no label over an unformatted disk).
async fn format_plex(
    index: usize,
    devices: &[Arc<dyn BlockDevice>],
    mut labels: Vec<DiskLabel>,
    aggregate: Uuid,
) -> Result<(Plex, DirtyBitmap, Vec<DiskLabel>), AggregateError> {
    const ZERO_CHUNK: u64 = 1 << 20;
    for (disk, (device, label)) in devices.iter().zip(&labels).enumerate() {
        let mut at = label.checksums.offset;
        let end = label.checksums.offset + label.checksums.len;
        while at < end {
            let len = (end - at).min(ZERO_CHUNK);
            let (result, _) = device.write(at, AlignedBuf::zeroed(usize_of(len))).await;
            result.map_err(|source| AggregateError::Plex {
                plex: index,
                source: PlexError::Device { disk, source },
            })?;
            at += len;
        }
    }
    let plex = assemble(index, devices, &labels)?;
    let first = &labels[0];
    let mut bitmap = DirtyBitmap::new(first.bitmap, aggregate, first.region_bytes, plex.size_bytes())
        .map_err(bitmap_error(index))?;
    bitmap.format(devices[0].as_ref()).await.map_err(bitmap_error(index))?;
    for (disk, (device, label)) in devices.iter().zip(labels.iter_mut()).enumerate().rev() {
        write_label(device.as_ref(), label).await.map_err(|source| AggregateError::Label {
            plex: index,
            disk,
            source,
        })?;
    }
    Ok((plex, bitmap, labels))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::testing::{MirrorRig, RecordingHook, pattern, test_options, test_spec};

    const REGION: u64 = 65536;

    /// Prevents `mirror status` showing other counts than the aggregate's status line, or the
    /// bitmap of the dropped plex instead of the survivor's: the summary follows the drop.
    #[tokio::test]
    async fn bitmap_summary_counts_the_survivors_dirty_regions() {
        let rig = MirrorRig::new();
        let options = test_options(Duration::from_millis(200), 4 * REGION);
        let aggregate = Aggregate::create(
            &test_spec(u32::try_from(REGION).unwrap()),
            rig.plexes(),
            options,
            Arc::new(RecordingHook::default()),
        )
        .await
        .unwrap();
        let clean = aggregate.bitmap_summary().await.unwrap();
        assert_eq!((clean.plex, clean.dirty_regions, clean.region_bytes), (0, 0, REGION));
        assert_eq!(clean.regions, aggregate.size_bytes().div_ceil(REGION), "{clean:?}");

        rig.hang(0);
        aggregate.write(3 * REGION, &pattern(1, 2)).await.unwrap();
        aggregate.write(7 * REGION, &pattern(2, 2)).await.unwrap();
        let dirty = aggregate.bitmap_summary().await.unwrap();
        assert_eq!(dirty.plex, 1, "plex 0 was dropped: plex 1 tracks what it misses");
        assert_eq!(dirty.dirty_regions, 2, "{dirty:?}");
        assert_eq!(dirty.regions, clean.regions);
        let line = aggregate.status().await.bitmap;
        assert!(line.contains(&format!("{} bits", dirty.regions)) && line.contains(" 2 dirty "), "{line}");
    }
}

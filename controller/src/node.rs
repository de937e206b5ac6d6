//! One controller's storage engine (DESIGN §4, §7; S1, S2, S8, S12): its aggregates and their
//! volume tables, the write cache, the fencing state, start-up recovery and shutdown. The
//! write path is in `write_path`, consistency points in `cp`.
//!
//! The life of a node:
//! 1. `starting`: the NVLog is open (formatted, if the file was lost, with lsns above every
//!    CP its labels recorded and a generation above any it used before); the NVLog receiver
//!    already runs, so two restarting sites never wait on each other;
//! 2. `fenced`: until the DR partner completes a mirror handshake, which confirms the epoch
//!    (S2; the partner's hello carries its epochs) and returns our records above the recovered
//!    tail (S8). No plex or label is written, no volume served. Without a partner the node
//!    stays here and says so in its log and status. With a mediator, its reply confirms the
//!    epochs too (or deposes the node, which then waits for switchback); the partner is still
//!    awaited for `mirror_timeout`, after which a node with `power` durability and an intact
//!    NVLog goes on without it;
//! 3. `recovering`: aggregates opened — plex 0 from this shelf, plex 1 from the DR partner's
//!    through `DiskService` (a partner that cannot be reached makes plex 1 dropped, S3, and
//!    reattached later by the plex monitor) — volume tables read, the `local` partition replayed
//!    from each aggregate's last CP into the write cache (a gap leaves every volume offline with
//!    the reason), then a CP;
//! 4. `serving` until shutdown; `stopping`: new I/O refused, I/O in flight drained, a final CP.
//!
//! Invariants:
//! - no I/O is served and no plex or label written before `serving` (S2); every plex write of
//!   this node carries the epoch it holds, checked against the shelf's high-water mark (local
//!   disks through `GuardedDisk`, remote ones by the partner's `DiskService`);
//! - the write cache holds every acknowledged write not yet destaged by a CP; a CP covers an
//!   lsn only when every record at or below it was applied to the cache or failed (so it was
//!   never acknowledged);
//! - writes to overlapping ranges of a volume are serialized, so the cache and replay agree on
//!   the order of any two writes to one block.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use nvlog::{Lsn, MmapMedia, Nvlog, PartitionKind};
use plex::{Aggregate, AggregateOptions, BLOCK_BYTES, CpRecord, DropHook, IoFuture, PlexDrop, Uuid};
use tokio::sync::{Notify, watch};

use crate::config::Config;
use crate::nvlog_mirror::MirrorWriter;
use crate::peer::PeerClock;
use crate::remote_disk::{RemoteShelf, UnreachableDisk};
use crate::shelf::{FoundAggregate, GuardedDisk};
use crate::shelf_state::{RecordedDrop, ShelfState};
use crate::volume::{VolumeEntry, VolumeTable};

/// Bytes of one cached block.
pub const BLOCK: u64 = BLOCK_BYTES;
/// `BLOCK` as a length.
pub const BLOCK_LEN: usize = 4096;
const _: () = assert!(BLOCK_LEN as u64 == BLOCK);

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The NVLog is open; nothing else yet.
    Starting,
    /// Waiting for the DR partner to confirm the epoch (S2).
    Fenced,
    /// Replaying the NVLog.
    Recovering,
    /// Serving volumes.
    Serving,
    /// Shutting down.
    Stopping,
}

impl Phase {
    /// The name status shows.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Fenced => "fenced",
            Phase::Recovering => "recovering",
            Phase::Serving => "serving",
            Phase::Stopping => "stopping",
        }
    }
}

/// The phase and why.
#[derive(Clone, Debug)]
pub struct NodeState {
    /// The phase.
    pub phase: Phase,
    /// Why the node is fenced, or what it is doing.
    pub reason: String,
}

/// Why an I/O or admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The node does not serve volumes now (S2).
    #[error("node {node} is {phase}: {reason}")]
    NotServing {
        /// This node.
        node: u32,
        /// Its phase.
        phase: &'static str,
        /// Why.
        reason: String,
    },
    /// No such volume or aggregate.
    #[error("{0}")]
    NotFound(String),
    /// The range is outside the volume or malformed.
    #[error("{0}")]
    Range(String),
    /// The volume's records cannot be recovered (S8); it stays offline until NVFAIL exists.
    #[error("volume {volume} is offline: {reason}")]
    Offline {
        /// The volume.
        volume: String,
        /// Why.
        reason: String,
    },
    /// The volume is in the NVFAILed state (DESIGN §9, S9): it may have lost acknowledged
    /// writes, so it serves no I/O until an administrator clears the state.
    #[error(
        "volume {volume} is NVFAILed: {reason}; it may have lost acknowledged writes. After checking its \
         data, clear the state with `mcctl volume modify {volume} --in-nvfailed-state false --confirm`"
    )]
    NvFailed {
        /// The volume.
        volume: String,
        /// Why, as far as it is known.
        reason: String,
    },
    /// The DR partner did not acknowledge in time: the write was not acknowledged (S1).
    #[error("{0}")]
    Mirror(#[from] crate::nvlog_mirror::MirrorError),
    /// The NVLog failed.
    #[error("NVLog: {0}")]
    Nvlog(String),
    /// The plexes failed.
    #[error("aggregate: {0}")]
    Plex(String),
    /// Bad input to an admin call.
    #[error("{0}")]
    Invalid(String),
}

/// Records a plex drop as S3 requires, after `plex` has recorded it in the survivor's labels
/// and bitmap: in this shelf's state, then at the DR partner (`DiskService.RecordPlexDrop`) —
/// or, when that call does not get through, once the partner itself reported on the NVLog
/// mirror that its receiver persisted `out_of_sync` for us (its durable record that our copies
/// there are out of date, which a one-way cut lets through when our calls cannot), or once
/// nothing has been heard from it for `mirror_timeout`. Until then the hook fails and `plex`
/// retries it; the writes that wait on the drop stall.
#[derive(Debug)]
pub struct PartnerDrops {
    node: u32,
    epoch: plex::Epoch,
    remote: RemoteShelf,
    state: Arc<ShelfState>,
    clock: Arc<PeerClock>,
    mirror: Arc<MirrorWriter<MmapMedia>>,
    mirror_timeout: Duration,
    /// The operator confirmed the partner's site down (forced switchover or unfence).
    partner_down: Arc<std::sync::atomic::AtomicBool>,
    /// The mediator, when one is configured: it records the drop too (S3).
    mediator: Option<Arc<crate::mediator_link::MediatorLink>>,
}

fn drop_reason(reason: plex::DropReason) -> (&'static str, u8) {
    match reason {
        plex::DropReason::Timeout => ("timeout", 0),
        plex::DropReason::Failed => ("failed", 1),
        plex::DropReason::OutOfDate => ("out_of_date", 2),
    }
}

impl DropHook for PartnerDrops {
    fn plex_dropped<'a>(&'a self, drop: &'a PlexDrop) -> IoFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let (reason, code) = drop_reason(drop.reason);
            let recorded = RecordedDrop {
                plex: drop.plex,
                reason: code,
                survivor_generation: drop.survivor_generation.0,
            };
            self.state
                .record_drop(drop.aggregate, self.epoch, recorded)
                .await
                .map_err(|e| format!("record the drop locally: {e}"))?;
            // The call and the other two ways run side by side: a call into a cut link takes
            // its whole deadline to fail.
            let call = self.remote.record_drop(
                drop.aggregate,
                self.epoch,
                drop.plex,
                reason,
                drop.survivor_generation.0,
            );
            tokio::pin!(call);
            let started = std::time::Instant::now();
            // The partner's own out-of-sync report, the operator's confirmation that its site is
            // down (its aggregates switched over here, or a forced unfence), or S3's silence.
            let otherwise = || {
                if self.partner_down.load(std::sync::atomic::Ordering::Acquire) {
                    return Some("the operator confirmed the DR partner's site down or isolated".to_string());
                }
                if self.mirror.partner_reported_out_of_sync() {
                    return Some(
                        "the DR partner's receiver persisted out_of_sync for this node (S13)".to_string(),
                    );
                }
                let silent = self.clock.silent_for();
                (silent >= self.mirror_timeout)
                    .then(|| format!("the DR partner unreachable and silent for {silent:?}"))
            };
            let how = loop {
                tokio::select! {
                    result = &mut call => match result {
                        Ok(()) => break "recorded at the DR partner".to_string(),
                        Err(status) => match otherwise() {
                            Some(how) => break how,
                            None => {
                                return Err(format!(
                                    "the DR partner did not record the drop ({}: {}) and was heard from {:?} ago \
                                     (S3 waits for its record or {:?} of silence)",
                                    status.code(),
                                    status.message(),
                                    self.clock.silent_for(),
                                    self.mirror_timeout
                                ));
                            }
                        },
                    },
                    // Only once the call is under way: its answer is the preferred record.
                    () = tokio::time::sleep(Duration::from_millis(50)) => {
                        if started.elapsed() >= Duration::from_millis(200)
                            && let Some(how) = otherwise()
                        {
                            break how;
                        }
                    }
                }
            };
            // S3: with a mediator, it records the drop as well (before the writes that wait on
            // it complete; an error is retried by the aggregate, stalling them meanwhile).
            if let Some(link) = &self.mediator {
                link.record_drop(drop.aggregate, true).await?;
            }
            tracing::error!(
                node = self.node,
                aggregate = %hex(&drop.aggregate.0),
                plex = drop.plex,
                reason,
                survivor_generation = drop.survivor_generation.0,
                how = %how,
                "plex dropped: the aggregate runs degraded (S3)"
            );
            Ok(())
        })
    }
}

/// Clears `Node::awaiting_partner` when `recover` stops waiting, however it stops.
struct AwaitingPartner<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for AwaitingPartner<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One aggregate this node owns.
#[derive(Debug)]
pub struct AggrSlot {
    /// Its position in the node's list (the write cache's key).
    pub index: u32,
    /// Its uuid.
    pub uuid: Uuid,
    /// The mirrored aggregate.
    pub aggregate: Arc<Aggregate>,
    /// The epoch this node holds for it (S2), stamped on every record.
    pub epoch: nvlog::Epoch,
    /// Its volume table.
    pub table: Mutex<VolumeTable>,
    /// Disk names per plex (plex 1's at the DR partner; empty while it cannot be reached).
    pub disks: Mutex<[Vec<String>; 2]>,
    /// The last CP recorded in its labels.
    pub last_cp: Mutex<CpRecord>,
    /// Served here after a switchover: its home is the DR partner, plex 0 is at the partner's
    /// site and stays out until heal (issue 9), plex 1 is on this shelf.
    pub switched_over: bool,
    /// For a switched-over aggregate: its home plex at the partner's site was reattached by a
    /// heal, so the plex monitor keeps it attached and resynced like any other plex.
    pub healed: std::sync::atomic::AtomicBool,
    /// Whether its volumes are served, and why not.
    pub serving: watch::Sender<SlotState>,
    /// When this node first and last acknowledged a write of it.
    pub acks: AckStamps,
}

/// When a node first and last acknowledged a write of one aggregate, logged with the
/// monotonic clock (`CLOCK_MONOTONIC`, one clock for every process of the machine) and the
/// wall clock: the first when it happens, the last when the node stops serving the aggregate
/// (deposed, fenced, stopping). Tests compare two nodes' intervals: they never overlap (S2, S6).
#[derive(Debug, Default)]
pub struct AckStamps {
    first_mono_ns: std::sync::atomic::AtomicU64,
    last_mono_ns: std::sync::atomic::AtomicU64,
    last_wall_ms: std::sync::atomic::AtomicU64,
    logged_last: std::sync::atomic::AtomicU64,
}

/// `CLOCK_MONOTONIC` in nanoseconds, and the wall clock in milliseconds since the epoch.
fn clock_stamps() -> (u64, u64) {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let mono = if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } == 0 {
        u64::try_from(ts.tv_sec).unwrap_or(0).saturating_mul(1_000_000_000)
            + u64::try_from(ts.tv_nsec).unwrap_or(0)
    } else {
        0
    };
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    (mono.max(1), wall)
}

impl AckStamps {
    /// A write of the aggregate is being acknowledged.
    pub fn note(&self, node: u32, uuid: Uuid, epoch: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        let (mono, wall) = clock_stamps();
        self.last_wall_ms.store(wall, Release);
        self.last_mono_ns.fetch_max(mono, AcqRel);
        if self.first_mono_ns.compare_exchange(0, mono, AcqRel, Acquire).is_ok() {
            tracing::info!(node, aggregate = %hex(&uuid.0), epoch, mono_ns = mono, wall_ms = wall, "first acknowledgement");
        }
    }

    /// The node stops serving the aggregate: its last acknowledgement so far, once.
    pub fn log_last(&self, node: u32, uuid: Uuid, why: &str) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        let last = self.last_mono_ns.load(Acquire);
        if last == 0 || self.logged_last.swap(last, AcqRel) == last {
            return;
        }
        let wall = self.last_wall_ms.load(Acquire);
        tracing::info!(node, aggregate = %hex(&uuid.0), mono_ns = last, wall_ms = wall, why, "last acknowledgement");
    }
}

/// Whether an aggregate's volumes are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Served.
    Serving,
    /// Taken over by a switchover that has not exported it yet (DESIGN §11 steps 3–6): CPs
    /// write it, hosts do not see it.
    Adopting(String),
    /// A higher epoch was seen (S2): no I/O is served, nothing is written, its cached blocks
    /// are dropped.
    Deposed(String),
}

impl AggrSlot {
    /// Stops serving it: deposed (S2) or handed over, with why; logs its last acknowledgement.
    pub fn set_deposed(&self, node: u32, why: String) {
        self.acks.log_last(node, self.uuid, &why);
        self.serving.send_replace(SlotState::Deposed(why));
    }

    /// Why its volumes are not served (deposed, S2, or a switchover in progress), if they are not.
    pub fn deposed(&self) -> Option<String> {
        match &*self.serving.borrow() {
            SlotState::Serving => None,
            SlotState::Adopting(why) | SlotState::Deposed(why) => Some(why.clone()),
        }
    }

    /// Whether a higher epoch was seen (S2).
    pub fn is_deposed(&self) -> bool {
        matches!(*self.serving.borrow(), SlotState::Deposed(_))
    }

    /// The epoch as `plex` spells it.
    pub fn plex_epoch(&self) -> plex::Epoch {
        plex::Epoch { number: self.epoch.number, owner: plex::NodeId(self.epoch.owner.0) }
    }

    /// The volume table.
    pub fn table(&self) -> MutexGuard<'_, VolumeTable> {
        self.table.lock().expect("a volume table lock holder panicked")
    }
}

/// A volume and the aggregate it lives in.
#[derive(Clone, Debug)]
pub struct VolumeRef {
    /// The aggregate.
    pub aggr: Arc<AggrSlot>,
    /// The volume.
    pub entry: VolumeEntry,
}

/// A cached block: 4 KiB.
pub type Block = Arc<[u8]>;
/// (aggregate index, block number in the aggregate).
pub type Key = (u32, u64);

#[derive(Debug, Default)]
pub(crate) struct Cache {
    /// Acknowledged writes since the last CP began.
    pub(crate) active: BTreeMap<Key, Block>,
    /// What the running CP destages; read until it is durable on the plexes.
    pub(crate) frozen: Arc<BTreeMap<Key, Block>>,
}

#[derive(Debug, Default)]
pub(crate) struct AppendState {
    /// Lsns appended and not yet applied to the cache nor failed.
    pub(crate) inflight: BTreeSet<Lsn>,
    /// The last lsn appended.
    pub(crate) last: Lsn,
    /// Bytes appended since the last CP began (a CP starts at half a partition, DESIGN §4).
    pub(crate) since_cp: u64,
    /// The local partition's half switches seen so far: a CP starts at each (DESIGN §4).
    pub(crate) half_switches: u64,
    /// The last lsn of the half sealed at the last switch: a CP that could not cover it (writes
    /// in flight) is followed by another, so the half is freed before the new one fills.
    pub(crate) sealed_through: Lsn,
}

/// CP and write-path counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpStats {
    /// CPs completed.
    pub completed: u64,
    /// The last CP's id.
    pub last_id: u64,
    /// The last lsn it covers.
    pub last_lsn: Lsn,
    /// How long it took.
    pub last_duration: Duration,
    /// Blocks it destaged.
    pub last_blocks: u64,
    /// Writes that found both NVLog halves full and waited for a CP.
    pub backpressure_waits: u64,
    /// Records replayed at start.
    pub replayed_records: u64,
}

/// Serializes overlapping ranges (same aggregate, overlapping blocks).
#[derive(Debug, Default)]
pub(crate) struct RangeLocks {
    held: Mutex<Vec<(u64, Key, u64)>>,
    released: Notify,
    next: std::sync::atomic::AtomicU64,
}

/// Holds a range until dropped.
#[derive(Debug)]
pub(crate) struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|(id, _, _)| *id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

impl RangeLocks {
    /// Waits until no held range overlaps blocks `[start.1, end)` of aggregate `start.0`.
    pub(crate) async fn lock(&self, start: Key, end: u64) -> RangeGuard<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let busy = held.iter().any(|(_, s, e)| s.0 == start.0 && s.1 < end && start.1 < *e);
                if !busy {
                    held.push((id, start, end));
                    return RangeGuard { locks: self, id };
                }
            }
            released.await;
        }
    }
}

/// The engine.
#[derive(Debug)]
pub struct Node {
    pub(crate) config: Config,
    pub(crate) nvlog: Arc<Nvlog<MmapMedia>>,
    pub(crate) mirror: Arc<MirrorWriter<MmapMedia>>,
    state: watch::Sender<NodeState>,
    pub(crate) aggregates: RwLock<Vec<Arc<AggrSlot>>>,
    /// Aggregates found on the shelf that could not be opened, with why.
    pub(crate) unavailable: Mutex<Vec<(Uuid, String)>>,
    /// Volumes offline, by volume name, with why (S8).
    pub(crate) offline: Mutex<HashMap<String, String>>,
    pub(crate) cache: Mutex<Cache>,
    pub(crate) locks: RangeLocks,
    pub(crate) append: Mutex<AppendState>,
    /// One CP at a time.
    pub(crate) cp_running: tokio::sync::Mutex<()>,
    /// Raised by every CP request (`request_cp`).
    pub(crate) cp_requests: watch::Sender<u64>,
    pub(crate) cp_done: watch::Sender<u64>,
    pub(crate) stats: Mutex<CpStats>,
    pub(crate) next_cp_id: std::sync::atomic::AtomicU64,
    /// Serializes aggregate and volume creation.
    pub(crate) admin: tokio::sync::Mutex<()>,
    /// Bytes of one half of the local partition.
    pub(crate) half_bytes: u64,
    /// Requests in flight (drained at shutdown).
    pub(crate) busy: std::sync::atomic::AtomicU64,
    /// The counters every aggregate of this node reports into.
    plex_metrics: plex::PlexMetrics,
    /// Records above it are kept: replay could not apply them (module doc).
    release_cap: std::sync::atomic::AtomicU64,
    /// The local partition's records were lost at start (a new file, or a corrupt partition
    /// emptied): they come only from the partner's copy (S8).
    local_partition_lost: bool,
    /// An earlier start already found that copy incomplete (S8, `daemon::LostMark`).
    copy_refused: bool,
    /// This shelf's epoch marks and recorded drops (S2, S3).
    pub(crate) shelf_state: Arc<ShelfState>,
    /// The DR partner's shelf: plex 1 of every aggregate (DESIGN §6.2).
    pub(crate) remote: RemoteShelf,
    /// When the DR partner was last heard from (S3).
    pub(crate) clock: Arc<PeerClock>,
    /// The operation journal (DESIGN §11).
    pub(crate) operations: Arc<crate::operations::OperationLog>,
    /// NVFAIL counters.
    pub(crate) nvfail_metrics: crate::nvfail::NvfailMetrics,
    /// The receiver of the DR partner's records (set by the daemon): a switchover freezes it.
    pub(crate) receiver: std::sync::OnceLock<Arc<crate::mirror_receiver::MirrorReceiver<MmapMedia>>>,
    /// Set when the operator confirmed the DR partner's site down or isolated (a forced
    /// switchover or unfence without a mediator): S3's record for dropping it.
    pub(crate) partner_down_confirmed: Arc<std::sync::atomic::AtomicBool>,
    /// Raised by a forced unfence: `recover` stops waiting for the partner (S2).
    pub(crate) unfence: watch::Sender<bool>,
    /// True while `recover` waits for the partner to confirm the epoch (a forced unfence can
    /// only end that wait).
    pub(crate) awaiting_partner: std::sync::atomic::AtomicBool,
    /// This node's aggregates the DR partner holds after a switchover (waiting for switchback):
    /// their records here are kept (`heal_cap`) until a heal has taken what they touch (S8).
    pub(crate) switched_away: Mutex<BTreeMap<Uuid, Away>>,
    /// No CP releases records above it while a switched-away aggregate's records wait for heal.
    pub(crate) heal_cap: std::sync::atomic::AtomicU64,
    /// The self-fence lease, when a mediator is configured (S6).
    pub(crate) lease: std::sync::OnceLock<crate::lease::SharedLease>,
    /// The link to the mediator, when one is configured.
    pub(crate) mediator: std::sync::OnceLock<Arc<crate::mediator_link::MediatorLink>>,
}

/// One of this node's aggregates held by the DR partner after a switchover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Away {
    /// The epoch the partner holds for it.
    pub holder: plex::Epoch,
    /// This node's records of it at or below this lsn are on the plexes (its last CP).
    pub floor: Lsn,
    /// Its records here were discarded by a heal.
    pub discarded: bool,
}

/// What a node is built from besides its configuration and NVLog.
#[derive(Debug)]
pub struct NodeParts {
    /// The started mirror writer.
    pub mirror: Arc<MirrorWriter<MmapMedia>>,
    /// Whether the local partition's records were lost at start.
    pub local_partition_lost: bool,
    /// An earlier start found the partner's copy of the lost partition incomplete (S8): the
    /// volumes are NVFAILed whatever this start finds.
    pub copy_refused: bool,
    /// This shelf's state.
    pub shelf_state: Arc<ShelfState>,
    /// The partner's shelf.
    pub remote: RemoteShelf,
    /// The partner's last sign of life.
    pub clock: Arc<PeerClock>,
    /// The operation journal.
    pub operations: Arc<crate::operations::OperationLog>,
}

impl Node {
    /// A node over an open NVLog and a started mirror writer; `starting` until `recover`.
    pub fn new(config: Config, nvlog: Arc<Nvlog<MmapMedia>>, parts: NodeParts) -> Arc<Node> {
        let NodeParts { mirror, local_partition_lost, copy_refused, shelf_state, remote, clock, operations } =
            parts;
        let half_bytes = nvlog.status(PartitionKind::Local).map(|s| s.size_bytes / 2).unwrap_or(u64::MAX);
        Arc::new(Node {
            config,
            nvlog,
            mirror,
            state: watch::Sender::new(NodeState { phase: Phase::Starting, reason: "opening".into() }),
            aggregates: RwLock::new(Vec::new()),
            unavailable: Mutex::new(Vec::new()),
            offline: Mutex::new(HashMap::new()),
            cache: Mutex::new(Cache::default()),
            locks: RangeLocks::default(),
            append: Mutex::new(AppendState::default()),
            cp_running: tokio::sync::Mutex::new(()),
            cp_requests: watch::Sender::new(0),
            cp_done: watch::Sender::new(0),
            stats: Mutex::new(CpStats::default()),
            next_cp_id: std::sync::atomic::AtomicU64::new(1),
            admin: tokio::sync::Mutex::new(()),
            half_bytes,
            busy: std::sync::atomic::AtomicU64::new(0),
            plex_metrics: plex::PlexMetrics::default(),
            local_partition_lost,
            copy_refused,
            release_cap: std::sync::atomic::AtomicU64::new(u64::MAX),
            shelf_state,
            remote,
            clock,
            operations,
            nvfail_metrics: crate::nvfail::NvfailMetrics::default(),
            receiver: std::sync::OnceLock::new(),
            partner_down_confirmed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            unfence: watch::Sender::new(false),
            awaiting_partner: std::sync::atomic::AtomicBool::new(false),
            switched_away: Mutex::new(BTreeMap::new()),
            heal_cap: std::sync::atomic::AtomicU64::new(u64::MAX),
            lease: std::sync::OnceLock::new(),
            mediator: std::sync::OnceLock::new(),
        })
    }

    /// Whether the local partition's records were lost at start.
    pub fn local_partition_lost(&self) -> bool {
        self.local_partition_lost
    }

    /// The operation journal.
    pub fn operations(&self) -> &crate::operations::OperationLog {
        &self.operations
    }

    /// Gives the node the receiver of the DR partner's records (the daemon, once).
    pub fn set_receiver(&self, receiver: Arc<crate::mirror_receiver::MirrorReceiver<MmapMedia>>) {
        let _ = self.receiver.set(receiver);
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.config.node_id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The NVLog.
    pub fn nvlog(&self) -> &Arc<Nvlog<MmapMedia>> {
        &self.nvlog
    }

    /// The mirror writer.
    pub fn mirror(&self) -> &Arc<MirrorWriter<MmapMedia>> {
        &self.mirror
    }

    /// The phase and why.
    pub fn state(&self) -> NodeState {
        self.state.borrow().clone()
    }

    /// Watches the phase.
    pub fn subscribe(&self) -> watch::Receiver<NodeState> {
        self.state.subscribe()
    }

    pub(crate) fn set_state(&self, phase: Phase, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::info!(node = self.config.node_id, phase = phase.name(), reason = %reason, "node state");
        let before = self.state.send_replace(NodeState { phase, reason: reason.clone() });
        if before.phase == Phase::Serving && phase != Phase::Serving {
            for slot in self.aggregates() {
                slot.acks.log_last(self.config.node_id, slot.uuid, &reason);
            }
        }
    }

    pub(crate) fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.cache.lock().expect("the write cache lock holder panicked")
    }

    pub(crate) fn lock_append(&self) -> MutexGuard<'_, AppendState> {
        self.append.lock().expect("the append lock holder panicked")
    }

    pub(crate) fn lock_stats(&self) -> MutexGuard<'_, CpStats> {
        self.stats.lock().expect("the CP stats lock holder panicked")
    }

    /// The aggregates this node serves.
    pub fn aggregates(&self) -> Vec<Arc<AggrSlot>> {
        self.aggregates.read().expect("the aggregate list lock holder panicked").clone()
    }

    /// CP counters.
    pub fn cp_stats(&self) -> CpStats {
        *self.lock_stats()
    }

    /// Errors unless the node serves volumes.
    pub(crate) fn check_serving(&self) -> Result<(), DataError> {
        let state = self.state.borrow();
        if state.phase == Phase::Serving {
            return Ok(());
        }
        Err(DataError::NotServing {
            node: self.config.node_id,
            phase: state.phase.name(),
            reason: state.reason.clone(),
        })
    }

    /// S6: with a mediator configured, nothing is acknowledged and no read completes once the
    /// lease lapsed; checked right before each acknowledgement and read completion.
    pub(crate) fn check_lease(&self) -> Result<(), DataError> {
        match self.lease.get().map(crate::lease::SharedLease::check) {
            Some(Err(e)) => Err(DataError::NotServing {
                node: self.config.node_id,
                phase: Phase::Fenced.name(),
                reason: e.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Sets the self-fence lease (the daemon, once, when a mediator is configured).
    pub fn set_lease(&self, lease: crate::lease::SharedLease) {
        let _ = self.lease.set(lease);
    }

    /// Finds a volume by name.
    pub fn volume(&self, name: &str) -> Result<VolumeRef, DataError> {
        let found = {
            let aggregates = self.aggregates.read().expect("the aggregate list lock holder panicked");
            aggregates.iter().find_map(|aggr| {
                let entry = aggr.table().volumes.iter().find(|v| v.name == name).cloned();
                entry.map(|entry| VolumeRef { aggr: aggr.clone(), entry })
            })
        };
        if let Some(volume) = found {
            if let Some(reason) = volume.aggr.deposed() {
                return Err(DataError::Offline { volume: name.to_string(), reason });
            }
            if let Some(reason) = self.offline.lock().expect("offline lock").get(name) {
                return Err(DataError::Offline { volume: name.to_string(), reason: reason.clone() });
            }
            // S9: checked on every request, so I/O already under way on a connection fails as
            // soon as the state is in the table.
            if volume.entry.in_nvfailed_state {
                return Err(DataError::NvFailed {
                    volume: name.to_string(),
                    reason: "it is in the NVFAILed state (DESIGN §9)".to_string(),
                });
            }
            return Ok(volume);
        }
        Err(DataError::NotFound(format!("no volume named {name:?} on node {}", self.config.node_id)))
    }

    pub(crate) fn aggregate_options(&self) -> AggregateOptions {
        AggregateOptions {
            mirror_timeout: self.config.timers.mirror_timeout,
            resync_bytes_per_second: self.config.resync_bytes_per_second,
            // A limited resync copies in batches of a quarter second's worth, so the limit is
            // smooth rather than bursts of 8 MiB at full speed.
            resync_batch_bytes: self
                .config
                .resync_bytes_per_second
                .map_or(8 << 20, |rate| (rate / 4).clamp(64 << 10, 8 << 20)),
            metrics: self.plex_metrics.clone(),
        }
    }

    /// The plex counters of every aggregate of this node.
    pub fn plex_metrics(&self) -> &plex::PlexMetrics {
        &self.plex_metrics
    }

    pub(crate) fn drop_hook(&self, epoch: plex::Epoch) -> Arc<dyn DropHook> {
        Arc::new(PartnerDrops {
            node: self.config.node_id,
            epoch,
            remote: self.remote.clone(),
            state: self.shelf_state.clone(),
            clock: self.clock.clone(),
            mirror: self.mirror.clone(),
            mirror_timeout: self.config.timers.mirror_timeout,
            partner_down: self.partner_down_confirmed.clone(),
            mediator: self.mediator.get().cloned(),
        })
    }

    /// Tells the mirror writer the epochs this node holds, for its hellos and keepalives (S2).
    pub(crate) fn publish_epochs(&self) {
        let epochs = self
            .aggregates()
            .iter()
            .map(|a| {
                crate::wire::aggregate_epoch(
                    a.uuid,
                    plex::Epoch { number: a.epoch.number, owner: plex::NodeId(a.epoch.owner.0) },
                )
            })
            .collect();
        self.mirror.set_epochs(epochs);
    }

    /// The partner's shelf.
    pub fn remote(&self) -> &RemoteShelf {
        &self.remote
    }

    /// This node's own disks of plex 0, opened and guarded by the shelf's epoch mark (S2).
    pub(crate) fn local_devices(
        &self,
        paths: &[std::path::PathBuf],
        aggregate: Uuid,
        epoch: plex::Epoch,
    ) -> Result<Vec<Arc<dyn plex::BlockDevice>>, String> {
        paths
            .iter()
            .map(|path| {
                let device =
                    crate::shelf::open_device(path).map_err(|e| format!("open {}: {e}", path.display()))?;
                Ok(Arc::new(GuardedDisk::new(device, self.shelf_state.clone(), aggregate, epoch))
                    as Arc<dyn plex::BlockDevice>)
            })
            .collect()
    }

    /// Opens plex 1's disks at the DR partner (`names` in order; all of the aggregate's disks
    /// there when `None`); a partner that cannot be reached gives a disk that fails every I/O,
    /// so the plex is dropped (S3) and reattached later.
    pub(crate) async fn remote_devices(
        &self,
        aggregate: Uuid,
        epoch: plex::Epoch,
        names: Option<&[String]>,
        create_size: u64,
    ) -> Result<(Vec<Arc<dyn plex::BlockDevice>>, Vec<String>), String> {
        self.remote_plex_devices(aggregate, epoch, 1, names, create_size).await
    }

    /// `remote_devices` for plex `plex` (plex 0 of a switched-over aggregate is at the partner).
    pub(crate) async fn remote_plex_devices(
        &self,
        aggregate: Uuid,
        epoch: plex::Epoch,
        plex: u8,
        names: Option<&[String]>,
        create_size: u64,
    ) -> Result<(Vec<Arc<dyn plex::BlockDevice>>, Vec<String>), String> {
        let names = match names {
            Some(names) => names.to_vec(),
            None => self
                .remote
                .plex_disks(aggregate, plex)
                .await
                .map_err(|s| format!("list the partner's disks: {}", s.message()))?,
        };
        if names.is_empty() {
            return Err(format!("the DR partner holds no disk of plex {plex}"));
        }
        let mut devices: Vec<Arc<dyn plex::BlockDevice>> = Vec::new();
        for name in &names {
            let disk = self
                .remote
                .open(aggregate, epoch, plex, name, create_size)
                .await
                .map_err(|s| format!("open disk {name} at the DR partner: {}", s.message()))?;
            devices.push(Arc::new(disk));
        }
        Ok((devices, names))
    }

    /// Reads the volume table of an opened aggregate.
    pub(crate) async fn read_table(aggregate: &Aggregate) -> Result<VolumeTable, String> {
        let slots = aggregate
            .read(0, crate::volume::TABLE_BYTES)
            .await
            .map_err(|e| format!("read the volume table: {e}"))?;
        let bytes = slots.as_slice();
        let half = bytes.len() / 2;
        let table = VolumeTable::pick([&bytes[..half], &bytes[half..]], aggregate.size_bytes())
            .map_err(|e| e.to_string())?;
        if table.aggregate != aggregate.uuid().0 {
            return Err("the volume table names another aggregate".into());
        }
        Ok(table)
    }

    /// Writes `table` into its slot and flushes both plexes.
    pub(crate) async fn write_table(aggregate: &Aggregate, table: &VolumeTable) -> Result<(), String> {
        let data = plex::AlignedBuf::from_slice(&table.encode());
        aggregate
            .write(table.slot_offset(), &data)
            .await
            .map_err(|e| format!("write the volume table: {e}"))?;
        aggregate.flush().await.map_err(|e| format!("flush the volume table: {e}"))
    }

    /// S8's verdict on a lost local partition (`nvlog_mirror::lost_partition_verdict`): whether
    /// the partner's copy the handshake adopted counts as complete; `None` before that handshake,
    /// or while the mediator (configured) has not answered since the start. The mediator must
    /// hold every aggregate found here at the epoch of its labels and name its mirror intact: an
    /// aggregate it holds at another epoch (a takeover, or one it has not learnt yet) is not
    /// vouched for.
    fn lost_partition_verdict(
        &self,
        found: &[FoundAggregate],
        confirmations: Option<&watch::Receiver<crate::mediator_link::Confirmation>>,
    ) -> Option<bool> {
        if !self.local_partition_lost {
            return Some(true);
        }
        let copy_complete = self.mirror.status().first_copy_complete?;
        let me = self.config.node_id;
        let mediator = confirmations.map(|rx| {
            let confirmation = rx.borrow();
            (confirmation.count > 0).then(|| {
                found.iter().all(|f| {
                    let ours = f.epoch().unwrap_or_default();
                    confirmation.epochs.iter().any(|(u, e)| *u == f.uuid && *e == ours && e.owner.0 == me)
                        && confirmation.mirror_intact.contains(&f.uuid)
                })
            })
        });
        crate::nvlog_mirror::lost_partition_verdict(copy_complete, mediator)
    }

    /// Start-up after the NVLog is open (module doc, steps 2 and 3). Returns when the node
    /// serves, or stays fenced until `stop` fires.
    pub async fn recover(self: &Arc<Self>, found: Vec<FoundAggregate>, mut stop: watch::Receiver<bool>) {
        let partner = &self.config.dr_partner;
        self.set_state(
            Phase::Fenced,
            format!(
                "waiting for the DR partner (node {} at {}) to confirm the epoch (S2) and return this node's \
                 records (S8)",
                partner.node_id, partner.address
            ),
        );
        let started = Instant::now();
        let mut unfence = self.unfence.subscribe();
        self.awaiting_partner.store(true, std::sync::atomic::Ordering::Release);
        let _waiting = AwaitingPartner(&self.awaiting_partner);
        let mut deposed = self.mirror.subscribe_deposed();
        // Every aggregate of this node is held by the partner (a switchover): its refused hello
        // is the confirmation (S2), and this node waits for switchback, serving its disks only.
        let mut all_switched_away = false;
        // S2 with a mediator: its reply (its state not lost) confirms the epochs, or says who
        // holds them now. The partner's handshake is still awaited for `mirror_timeout` (its
        // copy of our records and plex 1 are there); after that the node goes on without it.
        // A lost local partition needs the partner's copy (S8): the mediator alone does not do.
        let mut confirmations = self.mediator.get().map(|link| link.confirmations());
        let mut mediator_confirmed: Option<tokio::time::Instant> = None;
        let mut by_mediator = false;
        // S8 with a mediator: the handshake adopted the partner's copy of a lost partition, and
        // the mediator's word that the mirror is intact is still awaited.
        let mut awaiting_vouch = false;
        let forced = loop {
            let grace_over = async {
                match mediator_confirmed {
                    Some(at) => tokio::time::sleep_until(at + self.config.timers.mirror_timeout).await,
                    None => std::future::pending().await,
                }
            };
            let confirmed = async {
                match confirmations.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let handshake = async {
                if awaiting_vouch {
                    std::future::pending().await
                } else {
                    self.mirror.wait_handshakes(1).await
                }
            };
            tokio::select! {
                result = handshake => {
                    if result.is_err() {
                        return;
                    }
                    if confirmations.is_some() && self.lost_partition_verdict(&found, confirmations.as_ref()).is_none() {
                        let why = "the DR partner returned its copy of the lost NVLog partition; waiting for the \
                                   mediator's word that no drop of the mirror is recorded (S8)";
                        tracing::info!(node = self.config.node_id, "{why}");
                        self.set_state(Phase::Fenced, why);
                        awaiting_vouch = true;
                        continue;
                    }
                    break false;
                }
                () = confirmed => {
                    let epochs =
                        confirmations.as_mut().map(|rx| rx.borrow_and_update().epochs.clone()).unwrap_or_default();
                    // A higher epoch naming this node (a raise it asked for and never used)
                    // deposes nothing: only this node writes with it.
                    let me = self.config.node_id;
                    let above: Vec<mc_proto::v1::AggregateEpoch> = found
                        .iter()
                        .filter_map(|f| {
                            let ours = f.epoch().unwrap_or_default();
                            epochs.iter().find(|(u, e)| *u == f.uuid && *e > ours && e.owner.0 != me)
                        })
                        .map(|(u, e)| crate::wire::aggregate_epoch(*u, *e))
                        .collect();
                    if !above.is_empty() {
                        tracing::warn!(
                            node = self.config.node_id,
                            "the mediator holds higher epochs for this node's aggregates: deposed (S2)"
                        );
                        // Handled below with the partner's, as if its hello had said so.
                        self.mirror.note_partner_epochs(&above);
                    }
                    // S8: without the partner's handshake, records lost with the local
                    // partition (or, in `process` durability, a tail lost silently with the
                    // host's power) would be missed: only `power` durability with an intact
                    // partition goes on without the partner.
                    let durable = self.config.durability == crate::config::Durability::Power;
                    if mediator_confirmed.is_none() && !self.local_partition_lost && durable {
                        tracing::info!(
                            node = self.config.node_id,
                            wait = ?self.config.timers.mirror_timeout,
                            "the mediator confirmed this node's epochs (S2); waiting for the DR partner's handshake"
                        );
                        mediator_confirmed = Some(tokio::time::Instant::now());
                    }
                }
                () = grace_over => {
                    tracing::warn!(
                        node = self.config.node_id,
                        "the DR partner did not answer within mirror_timeout: recovering on the mediator's \
                         confirmation (S2); plex 1 and the NVLog mirror are dropped through the mediator (S3)"
                    );
                    by_mediator = true;
                    break false;
                }
                true = async { unfence.wait_for(|unfence| *unfence).await.is_ok() } => {
                    tracing::error!(
                        node = self.config.node_id,
                        "forced unfence by the operator: the epochs are raised and every volume NVFAILed (S2, S9)"
                    );
                    break true;
                }
                Ok(()) = deposed.changed() => {}
                () = tokio::time::sleep(Duration::from_secs(10)), if awaiting_vouch => {
                    tracing::warn!(
                        node = self.config.node_id,
                        waited_s = started.elapsed().as_secs(),
                        "fenced: the mediator has not answered since the start, and only it can tell whether a drop \
                         of the NVLog mirror was recorded while the lost partition held it (S8); an operator's \
                         forced unfence is the only other way out (it NVFAILs)"
                    );
                }
                () = tokio::time::sleep(Duration::from_secs(10)), if !awaiting_vouch => {
                    let status = self.mirror.status();
                    tracing::warn!(
                        node = self.config.node_id,
                        waited_s = started.elapsed().as_secs(),
                        last_error = status.last_error.as_deref().unwrap_or("none"),
                        "fenced: the DR partner has not confirmed the epoch yet (S2); an operator's forced \
                         unfence is the only other way out"
                    );
                }
                _ = stop.wait_for(|stop| *stop) => return,
            }
            // S2: the partner answered with higher epochs (it took our aggregates over):
            // persisted here, so our own disks refuse the old epoch even without it.
            let list = deposed.borrow_and_update().clone();
            for (uuid, epoch) in &list {
                if let Err(e) = self.shelf_state.admit(*uuid, *epoch).await {
                    tracing::error!(aggregate = %hex(&uuid.0), "persisting the higher epoch failed: {e}");
                }
            }
            if !found.is_empty()
                && found
                    .iter()
                    .all(|f| list.iter().any(|(u, e)| *u == f.uuid && e.owner.0 == partner.node_id))
            {
                all_switched_away = true;
                break false;
            }
            // The mediator's word on a lost partition came (its higher epochs, if any, are
            // persisted above first).
            if awaiting_vouch && self.lost_partition_verdict(&found, confirmations.as_ref()).is_some() {
                break false;
            }
        };
        drop(_waiting);
        // With a mediator, it alone raises epochs while it answers (DESIGN §10): a forced
        // unfence takes its epochs from it; one that does not answer leaves S2's fallback (raised
        // here, adopted by the mediator from the next report). A refusal (a grant of these
        // aggregates pending, its state lost) keeps the node fenced.
        let mut issued: HashMap<[u8; 16], plex::Epoch> = HashMap::new();
        if forced
            && !found.is_empty()
            && let Some(link) = self.mediator.get()
        {
            // Only aggregates this node still holds: one whose higher epoch it has seen (the
            // partner took it over) stays deposed, whatever the unfence (S2, S14).
            let me = self.config.node_id;
            let deposed = self.mirror.subscribe_deposed().borrow().clone();
            let wanted: Vec<(Uuid, u32)> = found
                .iter()
                .filter(|f| {
                    let ours = f.epoch().unwrap_or_default();
                    let mark = self.shelf_state.marks(f.uuid).epoch;
                    (mark <= ours || mark.owner.0 == me)
                        && !deposed.iter().any(|(u, e)| *u == f.uuid && *e > ours)
                })
                .map(|f| (f.uuid, me))
                .collect();
            let raised = if wanted.is_empty() {
                Ok(Vec::new())
            } else {
                link.raise_epochs(&wanted, "forced unfence").await
            };
            match raised {
                Ok(list) => issued = list.into_iter().map(|(uuid, epoch)| (uuid.0, epoch)).collect(),
                Err(crate::mediator_link::RaiseError::Unreachable(e)) if !link.answering() => tracing::warn!(
                    node = self.config.node_id,
                    "forced unfence: the mediator does not answer ({e}); the epochs are raised here and the \
                     mediator adopts them from the next report (S2)"
                ),
                Err(e) => {
                    tracing::error!(node = self.config.node_id, "forced unfence: {e}");
                    self.set_state(
                        Phase::Fenced,
                        format!("the forced unfence could not raise the epochs: {e}; restart the controller to retry"),
                    );
                    return;
                }
            }
        }
        if forced {
            // The operator's confirmation that the partner's site is down is S3's record for
            // dropping it (its NVLog mirror and the plexes at its site).
            self.partner_down_confirmed.store(true, std::sync::atomic::Ordering::Release);
        }
        if forced
            && let Err(e) = self
                .mirror
                .drop_confirmed("forced unfence: the operator confirmed the partner's site down or isolated")
                .await
        {
            self.set_state(Phase::Fenced, format!("the forced unfence could not drop the NVLog mirror: {e}"));
            return;
        }
        // S2: the partner's epochs for our aggregates must not be above ours (none known after a
        // forced unfence: the partner did not answer).
        let mirror = self.mirror.status();
        // After a forced unfence the partner did not answer; what it told us before it went
        // away (a refused hello) still counts.
        let partner_epochs = if forced || all_switched_away || by_mediator {
            self.mirror
                .subscribe_deposed()
                .borrow()
                .iter()
                .map(|(uuid, epoch)| crate::wire::aggregate_epoch(*uuid, *epoch))
                .collect()
        } else {
            mirror.partner_epochs
        };
        // S8: a lost or corrupt local partition was refilled from the partner's copy, which
        // counts only if the partner's receiver held the mirror in sync and lost nothing, and
        // (with a mediator) the mediator recorded no drop of the mirror since it was in sync.
        let copy_complete = !forced
            && !self.copy_refused
            && self.lost_partition_verdict(&found, confirmations.as_ref()) == Some(true);
        let unrecoverable = (self.local_partition_lost && !copy_complete).then(|| {
            let why = match mirror.first_copy_complete {
                _ if self.copy_refused => "an earlier start found it incomplete",
                Some(true) if !forced => "the mediator recorded a drop of the NVLog mirror since it was last in sync",
                _ => "its receiver was not in sync, or it did not answer",
            };
            format!(
                "the local NVLog partition was lost or corrupt and the DR partner's copy was incomplete ({why}): \
                 acknowledged writes may be missing (S8)"
            )
        });
        // The verdict "incomplete" is persisted before the aggregates are registered: from then
        // on this node's reports may make the mediator's record intact again, and a restart
        // before every NVFAIL is recorded must not decide otherwise.
        let marker = crate::daemon::nvlog_lost_marker(&self.config);
        if unrecoverable.is_some()
            && !self.copy_refused
            && let Err(e) = crate::daemon::write_nvlog_lost(&self.config, true)
        {
            self.set_state(
                Phase::Fenced,
                format!(
                    "the DR partner's copy of the lost NVLog partition is incomplete and that could not be \
                     recorded in {}: {e}; restart the controller to retry (S8)",
                    marker.display()
                ),
            );
            return;
        }
        self.set_state(Phase::Recovering, "opening aggregates and replaying the NVLog");
        let mut floors: HashMap<[u8; 16], Lsn> = HashMap::new();
        let mut slots = Vec::new();
        let mut open_failed = false;
        for found in found {
            let uuid = found.uuid;
            let last_cp = found.last_cp();
            let ours = found.epoch().unwrap_or_default();
            // S2: this shelf's own mark above our labels' epoch (persisted when we learned of a
            // takeover) deposes us too, whoever answers now.
            self.shelf_state.observe(uuid, ours);
            let mark = self.shelf_state.marks(uuid).epoch;
            let higher = (mark > ours && mark.owner.0 != self.config.node_id)
                .then_some((uuid, mark))
                .into_iter()
                .chain(partner_epochs.iter().filter_map(crate::wire::from_aggregate_epoch))
                .find(|(u, e)| *u == uuid && *e > ours);
            if let Some((_, epoch)) = higher {
                // Deposed: persisted; its records in our partition are kept until a heal has
                // put what they touch into the resync set, then discarded (S8).
                if let Err(e) = self.shelf_state.admit(uuid, epoch).await {
                    tracing::error!(aggregate = %hex(&uuid.0), "persisting the higher epoch failed: {e}");
                }
                if epoch.owner.0 == partner.node_id && !found.switched_over {
                    let floor = if last_cp.writer.0 == self.config.node_id { last_cp.last_lsn.0 } else { 0 };
                    self.register_away(uuid, epoch, Lsn(floor));
                }
                self.unavailable_push(
                    uuid,
                    &format!(
                        "deposed: node {} holds epoch {} (switchover, S2); served again after heal and switchback",
                        epoch.owner.0, epoch.number
                    ),
                );
                floors.insert(uuid.0, Lsn(u64::MAX));
                continue;
            }
            let forced = forced.then(|| issued.get(&uuid.0).copied());
            match self.open_found(&found, slots.len(), forced).await {
                Ok(slot) => {
                    // S8: the label's CP covers only its writer's records.
                    let floor = if last_cp.writer.0 == self.config.node_id { last_cp.last_lsn.0 } else { 0 };
                    floors.insert(uuid.0, Lsn(floor));
                    self.next_cp_id.fetch_max(last_cp.id.0 + 1, std::sync::atomic::Ordering::Relaxed);
                    slots.push(Arc::new(slot));
                }
                Err(e) => {
                    tracing::error!(aggregate = %hex(&uuid.0), "aggregate not served: {e}");
                    self.unavailable_push(uuid, &e);
                    // Not NVFAILed now: a lost partition's decision stays undone for it.
                    open_failed = true;
                }
            }
        }
        *self.aggregates.write().expect("the aggregate list lock holder panicked") = slots;
        self.publish_epochs();
        // What can be replayed is, even when the copy was incomplete: the volumes stay offline.
        let replayed = self.replay(&floors).await;
        let replayed = match (unrecoverable, replayed) {
            (Some(reason), _) => Err(reason),
            (None, result) => result,
        };
        // NVFAIL (DESIGN §9): (d) records that cannot be recovered, (e) a forced unfence. A
        // volume whose NVFAIL cannot be recorded stays offline instead (never served silently).
        let mut causes = Vec::new();
        if let Err(e) = replayed {
            tracing::error!(node = self.config.node_id, "replay: {e}");
            causes.push(crate::nvfail::NvfailCause {
                rule: crate::nvfail::NvfailRule::Unrecoverable,
                why: format!("its NVLog records cannot be recovered: {e} (S8)"),
            });
        }
        if forced {
            causes.push(crate::nvfail::NvfailCause {
                rule: crate::nvfail::NvfailRule::ForcedUnfence,
                why: "an operator forced the unfence: the DR partner may have taken over meanwhile (S2)"
                    .into(),
            });
        }
        let mut all_recorded = true;
        for cause in &causes {
            for aggr in self.aggregates() {
                if let Err(e) = self.enter_nvfail(&aggr, None, cause).await {
                    all_recorded = false;
                    tracing::error!(node = self.config.node_id, "NVFAIL could not be recorded: {e}");
                    let names: Vec<String> = aggr.table().volumes.iter().map(|v| v.name.clone()).collect();
                    let mut offline = self.offline.lock().expect("offline lock");
                    for name in names {
                        offline.insert(
                            name,
                            format!("{}; its NVFAIL state could not be recorded: {e}", cause.why),
                        );
                    }
                }
            }
        }
        // S8 decided durably: the partner's copy is in the local partition, or the volumes are
        // NVFAILed (a restart must not find a lost partition valid and serve from it).
        if self.local_partition_lost && all_recorded && !open_failed {
            crate::daemon::clear_nvlog_lost(&marker);
        }
        if let Err(e) = self.cp("recovery").await {
            tracing::error!(node = self.config.node_id, "the CP after replay failed: {e}");
            self.set_state(Phase::Fenced, format!("the CP after replay failed: {e}"));
            return;
        }
        if all_switched_away {
            self.set_state(Phase::Fenced, self.waiting_reason());
            return;
        }
        self.set_state(Phase::Serving, "serving");
    }

    /// The fence reason of a node waiting for switchback.
    pub(crate) fn waiting_reason(&self) -> String {
        format!(
            "waiting for switchback: node {} took over every aggregate of this node (switchover); this node \
             serves its disks to it, none of its volumes, until heal and switchback",
            self.config.dr_partner.node_id
        )
    }

    fn unavailable_push(&self, uuid: Uuid, reason: &str) {
        self.unavailable.lock().expect("unavailable lock").push((uuid, reason.to_string()));
    }

    async fn open_found(
        &self,
        found: &FoundAggregate,
        index: usize,
        forced: Option<Option<plex::Epoch>>,
    ) -> Result<AggrSlot, String> {
        let label_epoch = found.epoch().ok_or("no labelled disk of this node's plex at this site")?;
        // S2: a higher mark on this shelf (a partner that took the aggregate over wrote here)
        // means this node was deposed; a forced unfence does not override that.
        self.shelf_state.observe(found.uuid, label_epoch);
        let mark = self.shelf_state.marks(found.uuid).epoch;
        if mark > label_epoch || label_epoch.owner.0 != self.config.node_id {
            return Err(format!(
                "this shelf saw epoch {}@node{} for it, above this node's {}@node{}: deposed (S2)",
                mark.number, mark.owner.0, label_epoch.number, label_epoch.owner.0
            ));
        }
        // A forced unfence raises the epoch (S2): whatever the partner did meanwhile, our
        // writes from now on are above it.
        // With a mediator that answered, at least the epoch it issued (above every epoch it knows).
        let epoch = if let Some(issued) = forced {
            let number =
                mark.max(label_epoch).number.checked_add(1).ok_or("the epoch number cannot be raised")?;
            let here = plex::Epoch { number, owner: plex::NodeId(self.config.node_id) };
            issued.map_or(here, |issued| here.max(issued))
        } else {
            label_epoch
        };
        let index = u32::try_from(index).map_err(|_| "too many aggregates")?;
        if found.switched_over {
            let records = self.operations.list();
            let healed = crate::heal::healed_aggregates(&records).contains(&found.uuid);
            // A switchback kept in progress at start may have had the mediator raise the epochs:
            // never served again at this one (finding 10); its re-run goes on.
            let state = if crate::heal::held_by_switchback(&records).contains(&found.uuid) {
                SlotState::Adopting(crate::heal::HELD_BY_SWITCHBACK.to_string())
            } else {
                SlotState::Serving
            };
            return self.open_switched_over(found, index, epoch, state, healed).await;
        }
        let paths: Vec<std::path::PathBuf> = found.plexes[0].iter().map(|d| d.path.clone()).collect();
        let local = self.local_devices(&paths, found.uuid, epoch)?;
        let (remote, remote_names) = match self.remote_devices(found.uuid, epoch, None, 0).await {
            Ok(opened) => opened,
            Err(why) => {
                tracing::warn!(aggregate = %hex(&found.uuid.0), "plex 1 at the DR partner unreachable at open: {why}");
                (vec![Arc::new(UnreachableDisk { why }) as Arc<dyn plex::BlockDevice>], Vec::new())
            }
        };
        let aggregate = Aggregate::open([local, remote], self.aggregate_options(), self.drop_hook(epoch))
            .await
            .map_err(|e| format!("open: {e}"))?;
        if forced.is_some() {
            aggregate
                .record_owner(plex::NodeId(self.config.node_id), epoch)
                .await
                .map_err(|e| format!("record the raised epoch in the labels: {e}"))?;
        }
        let table = Node::read_table(&aggregate).await?;
        Ok(AggrSlot {
            acks: crate::node::AckStamps::default(),
            index,
            uuid: found.uuid,
            aggregate: Arc::new(aggregate),
            epoch: nvlog::Epoch { number: epoch.number, owner: nvlog::NodeId(epoch.owner.0) },
            table: Mutex::new(table),
            disks: Mutex::new([found.plexes[0].iter().map(|d| d.name.clone()).collect(), remote_names]),
            last_cp: Mutex::new(found.last_cp()),
            switched_over: false,
            healed: std::sync::atomic::AtomicBool::new(false),
            serving: watch::Sender::new(SlotState::Serving),
        })
    }

    /// Replays the `local` partition above each aggregate's last CP into the write cache (S8).
    async fn replay(&self, floors: &HashMap<[u8; 16], Lsn>) -> Result<(), String> {
        let start = floors.values().min().copied().unwrap_or(Lsn::ZERO);
        let nvlog = self.nvlog.clone();
        let local_last = nvlog.status(PartitionKind::Local).map(|s| s.last_lsn).unwrap_or_default();
        let released = nvlog.status(PartitionKind::Local).map(|s| s.released_lsn).unwrap_or_default();
        {
            let mut append = self.lock_append();
            append.last = append.last.max(local_last);
        }
        let replay = tokio::task::spawn_blocking(move || {
            nvlog.replay(PartitionKind::Local, &nvlog::ReplayFilter { after_lsn: start, frozen_epochs: None })
        })
        .await
        .map_err(|e| format!("replay task: {e}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
        let replay = match replay {
            Ok(replay) => replay,
            Err(e) => {
                self.cap_release(released);
                return Err(e);
            }
        };
        let aggregates = self.aggregates();
        let mut applied = 0u64;
        let mut last = Lsn::ZERO;
        let mut problems: Vec<String> = Vec::new();
        for record in &replay.records {
            let header = &record.header;
            last = last.max(header.lsn);
            let outcome: Result<(), String> = match floors.get(&header.aggregate.0) {
                None => Err(format!("aggregate {} is not served", hex(&header.aggregate.0))),
                Some(floor) if header.lsn <= *floor => continue,
                Some(_) => match self.replay_one(&aggregates, record).await {
                    Ok(()) => {
                        applied += 1;
                        continue;
                    }
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = outcome {
                // Kept in the NVLog: no CP releases it or anything after it (a later start
                // with the aggregate back replays it).
                self.cap_release(Lsn(header.lsn.0 - 1));
                if problems.len() < 8 {
                    problems.push(format!("lsn {}: {e}", header.lsn.0));
                }
            }
        }
        self.lock_stats().replayed_records = applied;
        tracing::info!(node = self.config.node_id, applied, from = start.0, to = last.0, "NVLog replayed");
        if let Some(gap) = replay.gaps.first() {
            problems.push(format!(
                "lsns {}..{} are missing from the local partition",
                gap.after.0 + 1,
                gap.next.0
            ));
        }
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// Applies one replayed record to the cache.
    async fn replay_one(&self, aggregates: &[Arc<AggrSlot>], record: &nvlog::Record) -> Result<(), String> {
        let header = &record.header;
        let aggr = aggregates
            .iter()
            .find(|a| a.uuid.0 == header.aggregate.0)
            .ok_or("its aggregate is not served")?;
        let (entry, removed) = {
            let table = aggr.table();
            let entry = table.volumes.iter().find(|v| v.id == header.volume.0).cloned();
            (entry, table.was_removed(header.volume.0))
        };
        let Some(entry) = entry else {
            if removed {
                // A deleted volume (ids are never reused): its records have nowhere to go and
                // no reader left. Any other unknown id is an error (S8).
                tracing::debug!(
                    node = self.config.node_id,
                    lsn = header.lsn.0,
                    volume_id = header.volume.0,
                    "a record of a deleted volume is skipped"
                );
                return Ok(());
            }
            return Err(format!("volume id {} does not exist", header.volume.0));
        };
        let volume = VolumeRef { aggr: aggr.clone(), entry };
        let end = header.offset.checked_add(header.range_len);
        if end.is_none_or(|end| end > volume.entry.size) {
            return Err(format!("outside volume {}", volume.entry.name));
        }
        self.apply(&volume, header.op, header.offset, header.range_len, &record.payload)
            .await
            .map_err(|e| format!("apply: {e}"))
    }

    /// No CP releases records above `lsn` in this life of the node.
    fn cap_release(&self, lsn: Lsn) {
        self.release_cap.fetch_min(lsn.0, std::sync::atomic::Ordering::AcqRel);
    }

    /// The highest lsn a CP may release.
    pub(crate) fn release_cap(&self) -> Lsn {
        Lsn(self
            .release_cap
            .load(std::sync::atomic::Ordering::Acquire)
            .min(self.heal_cap.load(std::sync::atomic::Ordering::Acquire)))
    }

    /// Registers `uuid` as held by the partner at `holder` (waiting for switchback) and keeps
    /// this node's unreleased records from being released until a heal took what they touch
    /// (S8: the regions go into the resync set before the records are discarded).
    pub(crate) fn register_away(&self, uuid: Uuid, holder: plex::Epoch, floor: Lsn) {
        let released = self.nvlog.status(PartitionKind::Local).map(|s| s.released_lsn).unwrap_or_default();
        self.heal_cap.fetch_min(released.0, std::sync::atomic::Ordering::AcqRel);
        let mut away = self.switched_away.lock().expect("switched-away lock");
        let entry = away.entry(uuid).or_insert(Away { holder, floor, discarded: false });
        entry.holder = entry.holder.max(holder);
    }

    /// This node's aggregates held by the partner (waiting for switchback).
    pub fn switched_away(&self) -> BTreeMap<Uuid, Away> {
        self.switched_away.lock().expect("switched-away lock").clone()
    }

    /// Stops serving, drains I/O in flight (at most `drain`), runs a final CP and stops the
    /// mirror.
    pub async fn shutdown(&self, drain: Duration) {
        let was_serving = self.state.borrow().phase == Phase::Serving;
        self.set_state(Phase::Stopping, "shutting down");
        let deadline = Instant::now() + drain;
        while self.busy.load(std::sync::atomic::Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if was_serving && let Err(e) = self.cp("shutdown").await {
            tracing::warn!(node = self.config.node_id, "final CP: {e}");
        }
        self.mirror.stop();
    }
}

impl Node {
    /// Labels disks of the shelf as a new mirrored aggregate owned by this node, writes its empty
    /// volume table and starts serving it. Disk files that do not exist are created (sparse)
    /// with `disk_size` bytes.
    pub async fn create_aggregate(
        &self,
        name: &str,
        disks: [Vec<String>; 2],
        disk_size: u64,
    ) -> Result<Arc<AggrSlot>, DataError> {
        let _admin = self.admin.lock().await;
        self.check_serving()?;
        crate::volume::check_name(name).map_err(|e| DataError::Invalid(e.to_string()))?;
        if self.aggregates().iter().any(|a| a.table().name == name) {
            return Err(DataError::Invalid(format!("an aggregate named {name:?} exists")));
        }
        let mut sorted = disks.clone();
        for (plex, names) in sorted.iter_mut().enumerate() {
            if names.is_empty() {
                return Err(DataError::Invalid(format!("plex {plex} has no disks")));
            }
            names.sort();
            let mut seen = std::collections::HashSet::new();
            for disk in names.iter() {
                crate::shelf::check_disk_name(disk).map_err(DataError::Invalid)?;
                if !seen.insert(disk) {
                    return Err(DataError::Invalid(format!("disk {disk} is named twice in plex {plex}")));
                }
            }
        }
        let uuid = Uuid(rand::random());
        let owner = plex::NodeId(self.config.node_id);
        let epoch = plex::Epoch { number: 1, owner };
        let mut paths = Vec::new();
        for disk in &sorted[0] {
            paths.push(
                crate::shelf::ensure_disk_file(&self.config.shelf_dir, disk, disk_size)
                    .map_err(DataError::Invalid)?,
            );
        }
        let local = self.local_devices(&paths, uuid, epoch).map_err(DataError::Invalid)?;
        // Plex 1 lives at the other site (DESIGN §6.3): the DR partner's shelf.
        let (remote, _) = self
            .remote_devices(uuid, epoch, Some(&sorted[1]), disk_size)
            .await
            .map_err(|e| DataError::Invalid(format!("plex 1: {e}")))?;
        let (here, there) = match self.config.site {
            crate::config::Site::A => (plex::Site::A, plex::Site::B),
            crate::config::Site::B => (plex::Site::B, plex::Site::A),
        };
        let spec = plex::AggregateSpec {
            cluster: Uuid(self.config.cluster_id),
            aggregate: uuid,
            owner,
            sites: [here, there],
            region_bytes: 64 * 1024,
            epoch,
        };
        let aggregate =
            Aggregate::create(&spec, [local, remote], self.aggregate_options(), self.drop_hook(epoch))
                .await
                .map_err(|e| DataError::Invalid(format!("create aggregate {name}: {e}")))?;
        let table = VolumeTable::new(uuid.0, name).map_err(|e| DataError::Invalid(e.to_string()))?;
        Node::write_table(&aggregate, &table).await.map_err(DataError::Plex)?;
        let mut list = self.aggregates.write().expect("the aggregate list lock holder panicked");
        let slot = Arc::new(AggrSlot {
            acks: crate::node::AckStamps::default(),
            index: u32::try_from(list.len()).map_err(|_| DataError::Invalid("too many aggregates".into()))?,
            uuid,
            aggregate: Arc::new(aggregate),
            epoch: nvlog::Epoch { number: 1, owner: nvlog::NodeId(self.config.node_id) },
            table: Mutex::new(table),
            disks: Mutex::new(sorted),
            last_cp: Mutex::new(CpRecord::default()),
            switched_over: false,
            healed: std::sync::atomic::AtomicBool::new(false),
            serving: watch::Sender::new(SlotState::Serving),
        });
        list.push(slot.clone());
        drop(list);
        self.publish_epochs();
        tracing::info!(node = self.config.node_id, aggregate = name, uuid = %hex(&uuid.0), "aggregate created");
        Ok(slot)
    }

    /// Carves a volume of `size` bytes out of aggregate `aggregate`; the table is durable on
    /// both plexes when this returns.
    pub async fn create_volume(
        &self,
        aggregate: &str,
        name: &str,
        size: u64,
    ) -> Result<VolumeRef, DataError> {
        let _admin = self.admin.lock().await;
        self.check_serving()?;
        // In the tables, not through `volume()`: an NVFAILed, offline or deposed volume keeps its
        // name.
        if self.aggregates().iter().any(|a| a.table().volumes.iter().any(|v| v.name == name)) {
            return Err(DataError::Invalid(format!("a volume named {name:?} exists")));
        }
        let aggr = self
            .aggregates()
            .into_iter()
            .find(|a| a.table().name == aggregate)
            .ok_or_else(|| DataError::NotFound(format!("no aggregate named {aggregate:?}")))?;
        let table = aggr
            .table()
            .with_volume(name, size, aggr.aggregate.size_bytes())
            .map_err(|e| DataError::Invalid(e.to_string()))?;
        Node::write_table(&aggr.aggregate, &table).await.map_err(DataError::Plex)?;
        let entry = table.volumes.last().cloned().ok_or_else(|| DataError::Invalid("no volume".into()))?;
        *aggr.table() = table;
        tracing::info!(node = self.config.node_id, aggregate, volume = name, size, "volume created");
        Ok(VolumeRef { aggr, entry })
    }
}

impl Node {
    /// Volumes offline, with why.
    pub fn offline_reasons(&self) -> HashMap<String, String> {
        self.offline.lock().expect("offline lock").clone()
    }

    /// This node's MetroCluster mode as ONTAP names it (DESIGN §11).
    pub fn mode(&self) -> &'static str {
        use crate::operations::{OperationKind, OperationState};
        // Served, not merely being adopted: a host told "switchover" finds the volumes exported.
        let serving_partner = self.aggregates().iter().any(|a| a.switched_over && a.deposed().is_none());
        let away = !self.switched_away.lock().expect("switched-away lock").is_empty();
        let ops = self.operations.list();
        let last = ops
            .iter()
            .rev()
            .find(|op| matches!(op.kind, OperationKind::Switchover | OperationKind::Switchback));
        // A switchback that failed before it changed anything leaves plain switchover.
        let switchback_unfinished = last.is_some_and(|op| {
            op.kind == OperationKind::Switchback
                && matches!(op.state, OperationState::InProgress | OperationState::PartiallySuccessful)
        });
        if switchback_unfinished {
            return "partial-switchback";
        }
        if serving_partner {
            let partial = last.is_some_and(|op| {
                op.kind == OperationKind::Switchover && op.state == OperationState::PartiallySuccessful
            });
            return if partial { "partial-switchover" } else { "switchover" };
        }
        if away { "waiting-for-switchback" } else { "normal" }
    }
    /// Aggregates found on the shelf and not served, with why.
    pub fn unavailable_aggregates(&self) -> Vec<(Uuid, String)> {
        self.unavailable.lock().expect("unavailable lock").clone()
    }
}

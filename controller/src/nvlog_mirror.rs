//! The writing side of the NVLog mirror (DESIGN §4, §4.2, §5, §8; S1, S8, S13): one stream to
//! the DR partner that carries this node's records, in lsn order, and brings back the partner's
//! acknowledgements.
//!
//! A session, as the writer runs it:
//! 1. hello with this log's generation and recovered tail; the partner answers with its hello
//!    (its partition generation, durable tail and mirror state) and returns every record of
//!    ours it holds above that tail, which we adopt into the `local` partition before anything
//!    else (S8: a writer whose tail was torn or whose file was lost gets its records back);
//! 2. everything we hold above the partner's durable tail is sent again (after a `Release` of
//!    what our CPs already covered, so the partner never sees a gap): a partner that restarted
//!    with its partition intact just resumes; one that lost records or marked itself
//!    `out_of_sync` is told the mirror is `resyncing` from here (§4.2), and `in_sync` once a CP
//!    covers every lsn below the point where mirroring restarted;
//! 3. records, releases and announcements go out in the order they were queued; acks come
//!    back; keepalives run both ways, and a partner silent for `keepalive_timeout`, a receiver
//!    that reports `out_of_sync` or any protocol error ends the session, and a new one starts.
//!
//! Invariants:
//! - records reach the stream in lsn order without a hole: the write path queues them under its
//!   append lock, and a session resends from the NVLog what it did not queue;
//! - `acked` only increases and only to an lsn the partner said is persisted (an ack, or its
//!   durable tail in a hello);
//! - the partner leaves the ack set only through `drop_partner` (S3, DESIGN §4.1): the drop is
//!   persisted in the local partition's header first, then acknowledged by the partner (its
//!   receiver persisted `out_of_sync` and said so on the stream) or preceded by
//!   `mirror_timeout` in which nothing at all was heard from it (`PeerClock`); until then every
//!   write waits;
//! - it comes back only through a handshake, as `resyncing` from our next lsn N (§4.2): from
//!   then on every record at or above N needs its ack again; `in_sync` after the covering CP,
//!   persisted locally too.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mc_proto::v1::nvlog_mirror_client::NvlogMirrorClient;
use mc_proto::v1::receiver_message::Body as In;
use mc_proto::v1::writer_message::Body as Out;
use mc_proto::v1::{
    AggregateEpoch, Identity, Keepalive, KeepaliveReply, MirrorAnnouncement, MirrorState as WireMirrorState,
    MirroredRecord, ReceiverMessage, Release, WriterHello, WriterMessage,
};
use nvlog::{Lsn, Media, MirrorState, Nvlog, NvlogError, PartitionKind};
use tokio::sync::{Notify, mpsc, watch};
use tonic::codegen::tokio_stream::Stream;

use crate::model_breaks::{Break, active};

const LOCAL: PartitionKind = PartitionKind::Local;

/// Who we are and whom we mirror to.
#[derive(Clone, Debug)]
pub struct WriterIdentity {
    /// The cluster.
    pub cluster: [u8; 16],
    /// This node.
    pub node: u32,
    /// The DR partner.
    pub partner: u32,
    /// The partner's gRPC address (`host:port`).
    pub address: String,
}

/// Timers of the writer (DESIGN §10.1).
#[derive(Clone, Copy, Debug)]
pub struct WriterTimers {
    /// How often we send a keepalive.
    pub keepalive_interval: Duration,
    /// Silence after which the session is considered dead and a new one starts.
    pub keepalive_timeout: Duration,
    /// How long a write waits for the partner before it is dropped (DESIGN §4.1, S3).
    pub mirror_timeout: Duration,
}

/// Our account, as the writer, of the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriterState {
    /// No session has completed its handshake yet.
    Unknown,
    /// The partner holds every unreleased record.
    InSync,
    /// Mirroring restarted; in sync once a CP covers every lsn below `from` (§4.2).
    Resyncing {
        /// The first lsn mirrored after the restart.
        from: Lsn,
    },
    /// Dropped (S3): out of the ack set until a handshake re-establishes it.
    OutOfSync,
}

/// Which records need the partner's acknowledgement (S1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AckSet {
    /// The partner was dropped (S3): no record needs its ack until it is re-established.
    pub dropped: bool,
    /// Records below it were written while the partner was out of the ack set.
    pub floor: Lsn,
}

impl AckSet {
    /// Whether record `lsn` needs the partner's acknowledgement.
    pub fn needs_ack(&self, lsn: Lsn) -> bool {
        !self.dropped && lsn >= self.floor
    }

    /// S1, as far as the partner goes: record `lsn` may be acknowledged once the partner has
    /// acknowledged every record through `acked` with `acked >= lsn`, or when it does not need
    /// the partner's acknowledgement.
    pub fn mirrored(&self, acked: Lsn, lsn: Lsn) -> bool {
        acked >= lsn || !self.needs_ack(lsn) || active(Break::AckBeforePartner)
    }
}

/// S8: whether the partner's copy of our records may replace a lost local partition. `lost`: the
/// handshake found the mirror not in sync (the receiver's account, S13, says otherwise, it lost
/// records, or our own account says we dropped it). `round_trip_since_start`: the receiver has
/// completed a round trip with us since it started; one that restarted cannot vouch for what we
/// did while it was down (we may have dropped it by silence, S3, and our record of that was in
/// the partition we lost). Found by the model check (docs/safety.md). Sans-IO: the handshake
/// and `mc-model` decide with it.
pub fn partner_copy_complete(lost: bool, round_trip_since_start: bool) -> bool {
    !lost && round_trip_since_start
}

/// S8's verdict on a lost local partition refilled from the partner's copy: whether the copy
/// counts as complete, or `None` while the mediator's word is still needed. `copy_complete`:
/// the handshake's `partner_copy_complete`. `mediator`: `None` when none is configured;
/// otherwise `None` inside until a reply that can confirm epochs (its state not lost) arrived
/// since this start, then whether it named every aggregate to serve as `mirror_intact` (no drop
/// recorded since the mirror was last in sync). With a mediator, a drop completes on its record
/// alone (S3), which the lost partition held; the receiver cannot know of it. Sans-IO: start-up
/// and `mc-model` decide with it.
pub fn lost_partition_verdict(copy_complete: bool, mediator: Option<Option<bool>>) -> Option<bool> {
    match mediator {
        _ if !copy_complete => Some(false),
        None => Some(true),
        Some(_) if active(Break::AdoptWithoutMediatorIntact) => Some(true),
        Some(vouched) => vouched,
    }
}

/// Where a writer's session resumes, as its handshake decides (DESIGN §4.2, §5; S8, S13).
/// Sans-IO: the handshake and `mc-model` decide with `resume`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resume {
    /// The partner holds every record of ours through it (its durable tail).
    pub acked: Lsn,
    /// Our release point, sent first (a `Release`) when above zero: a release sent in an
    /// earlier session may never have been applied (the partner restarted).
    pub release: Lsn,
    /// Records from here on are sent (again); a re-established mirror is announced `resyncing`
    /// at it, which lets the receiver accept the gap below it.
    pub start: Lsn,
    /// The mirror lost records: it is re-established (§4.2) and `resyncing`; every record of
    /// ours from this lsn on needs the partner's ack again, and `in_sync` waits for a CP that
    /// covers every lsn below it (`covers`).
    pub resync_from: Option<Lsn>,
}

/// The handshake's decision, once the partner's returned records were adopted. `our_last`,
/// `released`: our local partition's last lsn and release point; `dropped_here`: our own
/// account says the partner lacks records (a drop or a resync persisted, or it is out of the ack
/// set); `receiver_tail`, `receiver_in_sync`, `lost_records`: the partner's hello. An error when
/// the partner holds more of ours than we do, which no correct history gives.
pub fn resume(
    our_last: Lsn,
    released: Lsn,
    dropped_here: bool,
    receiver_tail: Lsn,
    receiver_in_sync: bool,
    lost_records: bool,
) -> Result<Resume, String> {
    let our_tail = our_last.max(released);
    if receiver_tail > our_tail {
        return Err(format!(
            "the partner's durable tail {} is above ours {} after adopting its records",
            receiver_tail.0, our_tail.0
        ));
    }
    let lost = lost_records || !receiver_in_sync || dropped_here;
    Ok(Resume {
        acked: receiver_tail,
        release: released,
        start: receiver_tail.max(released).next(),
        resync_from: lost.then(|| our_tail.next()),
    })
}

/// §4.2: a CP that released through `released` covers a mirror re-established at `from` (every
/// lsn below it is in the plexes): the writer may announce `in_sync`.
pub fn covers(released: Lsn, from: Lsn) -> bool {
    released.next() >= from
}

/// What a drop in progress has achieved (S3, DESIGN §4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DropEvidence {
    /// The drop is persisted in the local partition's header.
    pub persisted_locally: bool,
    /// The mediator recorded it for every aggregate the mirror carries.
    pub recorded_by_mediator: bool,
    /// The partner acknowledged it: its receiver persisted `out_of_sync` and said so.
    pub partner_acknowledged: bool,
    /// Nothing at all was heard from the partner for this long.
    pub silent_for: Duration,
}

impl DropEvidence {
    /// S3: whether the partner may leave the ack set. Always the local record first; then,
    /// with a mediator configured, its record; without one, the partner's acknowledgement or
    /// `mirror_timeout` of silence.
    pub fn complete(&self, mediator_configured: bool, mirror_timeout: Duration) -> bool {
        if !self.persisted_locally {
            return false;
        }
        if mediator_configured {
            return self.recorded_by_mediator || active(Break::DropWithoutMediatorRecord);
        }
        self.partner_acknowledged || self.silent_for >= mirror_timeout
    }
}

/// A snapshot for status and metrics.
#[derive(Clone, Debug)]
pub struct WriterStatus {
    /// The partner.
    pub partner: u32,
    /// Our account of the mirror.
    pub state: WriterState,
    /// Whether a session is up.
    pub connected: bool,
    /// Every record up to it is persisted at the partner.
    pub acked: Lsn,
    /// Completed handshakes since start.
    pub handshakes: u64,
    /// The partner's hello of the last handshake: its epochs (S2).
    pub partner_epochs: Vec<AggregateEpoch>,
    /// Which records need the partner's ack.
    pub ack_set: AckSet,
    /// Drops since start.
    pub drops: u64,
    /// Whether the partner's copy was complete at the first handshake: its receiver held the
    /// mirror `in_sync` and had lost no records (S8: only then may it replace a lost local
    /// partition). `None` before the first handshake.
    pub first_copy_complete: Option<bool>,
    /// The receiver's partition generation at the last handshake (the mediator matches it with
    /// the receiver's own report, DESIGN §10).
    pub partner_generation: u64,
    /// Why the last session ended, if one did.
    pub last_error: Option<String>,
}

/// Why a write could not be mirrored.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The partner did not acknowledge within the bound.
    #[error("the DR partner (node {partner}) did not acknowledge lsn {lsn} within {waited:?}")]
    Timeout {
        /// The partner.
        partner: u32,
        /// The record waited for.
        lsn: Lsn,
        /// How long.
        waited: Duration,
    },
    /// The mirror is shutting down.
    #[error("the NVLog mirror is stopped")]
    Stopped,
}

enum Outgoing {
    Record { lsn: Lsn, encoded: Vec<u8> },
    Release(Lsn),
    Announcement(MirrorAnnouncement),
}

struct Queue {
    /// A session is up and takes new items; otherwise the next session resends from the NVLog.
    accepting: bool,
    items: VecDeque<Outgoing>,
}

struct State {
    state: WriterState,
    connected: bool,
    handshakes: u64,
    partner_epochs: Vec<AggregateEpoch>,
    first_copy_complete: Option<bool>,
    partner_generation: u64,
    last_error: Option<String>,
    /// The highest lsn our CPs released (what the partner may free).
    released: Lsn,
    /// The partner told us (since the last handshake) that its receiver persisted
    /// `out_of_sync`: its acknowledgement of a drop (S3).
    partner_out_of_sync: bool,
    drops: u64,
}

/// The writer.
pub struct MirrorWriter<M: Media> {
    nvlog: Arc<Nvlog<M>>,
    identity: WriterIdentity,
    timers: WriterTimers,
    /// The partner's last sign of life, shared with every service of this node (S3).
    clock: Arc<crate::peer::PeerClock>,
    queue: Mutex<Queue>,
    queued: Notify,
    /// Notified when the partner's partition was full: a CP (and its release) makes room.
    space: Notify,
    acked: watch::Sender<Lsn>,
    ack_set: watch::Sender<AckSet>,
    /// Raised when the partner reports `out_of_sync` (wakes a drop in progress).
    partner_reports: watch::Sender<u64>,
    /// One drop at a time.
    dropping: tokio::sync::Mutex<()>,
    /// The epochs this node holds for its aggregates: in the hello, keepalives and replies (S2).
    epochs: Mutex<Vec<AggregateEpoch>>,
    handshakes: watch::Sender<u64>,
    state: Mutex<State>,
    stop: watch::Sender<bool>,
    /// Our aggregates for which the partner holds a higher epoch (S2), with that epoch.
    deposed: watch::Sender<Vec<(plex::Uuid, plex::Epoch)>>,
    /// The self-fence lease, when a mediator is configured: keepalive round trips renew it.
    lease: std::sync::OnceLock<crate::lease::SharedLease>,
    /// Cuts the reconnect back-off short (a deposition ended: the partner takes us again).
    retry: tokio::sync::Notify,
    /// The mediator, when one is configured: it records a drop (S3).
    mediator: std::sync::OnceLock<Arc<crate::mediator_link::MediatorLink>>,
}

impl<M: Media> std::fmt::Debug for MirrorWriter<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorWriter").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// Runs a blocking NVLog call off the runtime's threads.
async fn blocking<T: Send + 'static>(
    op: impl FnOnce() -> Result<T, NvlogError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(op).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(e) => Err(format!("NVLog task lost: {e}")),
    }
}

fn message(body: Out) -> WriterMessage {
    WriterMessage { body: Some(body) }
}

impl<M: Media + 'static> MirrorWriter<M> {
    /// A writer over `nvlog`'s `local` partition; its sessions run on the current runtime until
    /// `stop`.
    pub fn start(
        nvlog: Arc<Nvlog<M>>,
        identity: WriterIdentity,
        timers: WriterTimers,
        clock: Arc<crate::peer::PeerClock>,
    ) -> Arc<MirrorWriter<M>> {
        let writer = Arc::new(MirrorWriter {
            nvlog,
            identity,
            timers,
            clock,
            queue: Mutex::new(Queue { accepting: false, items: VecDeque::new() }),
            queued: Notify::new(),
            space: Notify::new(),
            acked: watch::Sender::new(Lsn::ZERO),
            ack_set: watch::Sender::new(AckSet::default()),
            partner_reports: watch::Sender::new(0),
            dropping: tokio::sync::Mutex::new(()),
            epochs: Mutex::new(Vec::new()),
            handshakes: watch::Sender::new(0),
            state: Mutex::new(State {
                state: WriterState::Unknown,
                connected: false,
                handshakes: 0,
                partner_epochs: Vec::new(),
                first_copy_complete: None,
                partner_generation: 0,
                last_error: None,
                released: Lsn::ZERO,
                partner_out_of_sync: false,
                drops: 0,
            }),
            stop: watch::Sender::new(false),
            deposed: watch::Sender::new(Vec::new()),
            lease: std::sync::OnceLock::new(),
            retry: tokio::sync::Notify::new(),
            mediator: std::sync::OnceLock::new(),
        });
        let task = writer.clone();
        tokio::spawn(async move { task.run().await });
        writer
    }

    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().expect("the mirror queue lock holder panicked")
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("the mirror state lock holder panicked")
    }

    /// Sets the epochs this node holds (its aggregates'), sent from the next message on.
    pub fn set_epochs(&self, epochs: Vec<AggregateEpoch>) {
        // A deposition is over for an aggregate this node holds again at an epoch at least as
        // high (a switchback handed it back): it no longer blocks the handshake.
        let ours: Vec<(plex::Uuid, plex::Epoch)> =
            epochs.iter().filter_map(crate::wire::from_aggregate_epoch).collect();
        let ended = self.deposed.send_if_modified(|known| {
            let before = known.len();
            known.retain(|(uuid, epoch)| !ours.iter().any(|(u, e)| u == uuid && e >= epoch));
            known.len() != before
        });
        if ended {
            self.retry.notify_one();
        }
        *self.epochs.lock().expect("the epochs lock holder panicked") = epochs;
    }

    /// With a mediator configured, a drop counts once the mediator recorded it (S3).
    pub fn set_mediator(&self, link: Arc<crate::mediator_link::MediatorLink>) {
        let _ = self.mediator.set(link);
    }

    /// Lets keepalive round trips renew `lease` (a mediator is configured, S6).
    pub fn set_lease(&self, lease: crate::lease::SharedLease) {
        let _ = self.lease.set(lease);
    }

    /// Forgets the deposition of `uuid` at or below `epoch` (a switchback is handing the
    /// aggregate back at a higher epoch; until then this node holds it nowhere).
    pub fn forget_deposed(&self, uuid: plex::Uuid, epoch: plex::Epoch) {
        if self.deposed.send_if_modified(|known| {
            let before = known.len();
            known.retain(|(u, e)| !(*u == uuid && *e <= epoch));
            known.len() != before
        }) {
            self.retry.notify_one();
        }
    }

    fn epochs(&self) -> Vec<AggregateEpoch> {
        self.epochs.lock().expect("the epochs lock holder panicked").clone()
    }

    /// Ends every session; waiting writes fail with `Stopped`.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Queues one of our records for the partner. Call in lsn order, under the same lock as the
    /// append that gave the lsn (the write path's append lock).
    pub fn enqueue_record(&self, lsn: Lsn, encoded: Vec<u8>) {
        let mut queue = self.lock_queue();
        if queue.accepting {
            queue.items.push_back(Outgoing::Record { lsn, encoded });
            drop(queue);
            self.queued.notify_one();
        }
    }

    /// After a CP whose labels are durable and whose records were released locally (S12): the
    /// partner may free every record up to `lsn`; a resyncing mirror becomes in sync when `lsn`
    /// covers every record below its restart point (§4.2).
    pub fn release(&self, lsn: Lsn) {
        {
            let mut state = self.lock_state();
            state.released = state.released.max(lsn);
        }
        let mut queue = self.lock_queue();
        if queue.accepting {
            queue.items.push_back(Outgoing::Release(lsn));
            drop(queue);
            self.queued.notify_one();
        }
    }

    /// Completes when the partner found its partition full (its layout of halves can differ
    /// from ours after it lost its copy): the caller runs a CP, whose release makes room.
    pub async fn space_wanted(&self) {
        self.space.notified().await;
    }

    /// Waits until record `lsn` needs nothing more from the partner: acknowledged, or written
    /// while the partner was out of the ack set. At most `bound`.
    pub async fn wait_mirrored(&self, lsn: Lsn, bound: Duration) -> Result<(), MirrorError> {
        let mut acked = self.acked.subscribe();
        let mut set = self.ack_set.subscribe();
        let mut stop = self.stop.subscribe();
        let wait = async {
            loop {
                if set.borrow_and_update().mirrored(*acked.borrow_and_update(), lsn) {
                    return Ok(());
                }
                tokio::select! {
                    result = acked.changed() => result.map_err(|_| MirrorError::Stopped)?,
                    result = set.changed() => result.map_err(|_| MirrorError::Stopped)?,
                    _ = stop.wait_for(|stop| *stop) => return Err(MirrorError::Stopped),
                }
            }
        };
        match tokio::time::timeout(bound, wait).await {
            Ok(result) => result,
            Err(_) => Err(MirrorError::Timeout { partner: self.identity.partner, lsn, waited: bound }),
        }
    }

    /// Our aggregates for which the partner holds a higher epoch (S2): the node stops serving
    /// them at once.
    pub fn subscribe_deposed(&self) -> watch::Receiver<Vec<(plex::Uuid, plex::Epoch)>> {
        self.deposed.subscribe()
    }

    /// A round trip with the DR partner, sent at `sent`, completed and its epochs are not above
    /// ours (the caller noted them): it renews the lease (S6). A lapsed lease is not renewed; it
    /// is confirmed by the partner only while neither this node nor the partner
    /// (`partner_mediator_silent`) hears the mediator (S2's fallback): the partner's epochs say
    /// whether it took this node's aggregates over, and a grant of them could not have reached
    /// it without being applied (it would have heard the mediator within the lease).
    fn partner_round_trip(&self, sent: Instant, partner_mediator_silent: bool) {
        let Some(lease) = self.lease.get() else { return };
        if !self.deposed.borrow().is_empty() || lease.renew(sent, None) {
            return;
        }
        if partner_mediator_silent && self.mediator.get().is_some_and(|m| !m.answering()) {
            lease.confirm(sent, None);
            tracing::warn!(
                partner = self.identity.partner,
                "the mediator does not answer: the DR partner confirmed this node's epochs (S2); the self-fence \
                 ends"
            );
        }
    }

    /// Compares epochs the partner (or the mediator, at start-up) holds with ours (S2): those
    /// above ours depose this node of their aggregates.
    pub fn note_partner_epochs(&self, theirs: &[AggregateEpoch]) {
        let ours: Vec<(plex::Uuid, plex::Epoch)> =
            self.epochs().iter().filter_map(crate::wire::from_aggregate_epoch).collect();
        let mut above: Vec<(plex::Uuid, plex::Epoch)> = theirs
            .iter()
            .filter_map(crate::wire::from_aggregate_epoch)
            .filter(|(uuid, epoch)| ours.iter().any(|(u, e)| u == uuid && epoch > e))
            .collect();
        if above.is_empty() {
            return;
        }
        above.sort();
        self.deposed.send_if_modified(|known| {
            let mut changed = false;
            for (uuid, epoch) in &above {
                match known.iter_mut().find(|(u, _)| u == uuid) {
                    Some((_, e)) if *e >= *epoch => {}
                    Some((_, e)) => {
                        *e = *epoch;
                        changed = true;
                    }
                    None => {
                        known.push((*uuid, *epoch));
                        changed = true;
                    }
                }
            }
            changed
        });
    }

    /// Drops the partner from the ack set at once, on the operator's confirmation that its site
    /// is down or isolated (a forced switchover or unfence without a mediator: that confirmation
    /// is the S3 record). Persisted locally first.
    pub async fn drop_confirmed(&self, why: &str) -> Result<(), String> {
        let _one = self.dropping.lock().await;
        let nvlog = self.nvlog.clone();
        blocking(move || nvlog.set_mirror_state(LOCAL, MirrorState::OutOfSync)).await?;
        if !self.ack_set.borrow().dropped {
            {
                let mut state = self.lock_state();
                state.state = WriterState::OutOfSync;
                state.drops += 1;
            }
            self.ack_set.send_modify(|set| set.dropped = true);
            tracing::error!(
                partner = self.identity.partner,
                why,
                "NVLog mirror dropped on the operator's confirmation: out_of_sync (S3)"
            );
        }
        Ok(())
    }

    /// Whether the partner said, since the last handshake, that its receiver persisted this
    /// mirror `out_of_sync` (S13): its record that our copies there are out of date, which
    /// acknowledges a drop (S3).
    pub fn partner_reported_out_of_sync(&self) -> bool {
        self.lock_state().partner_out_of_sync
    }

    /// Whether record `lsn` may be acknowledged as far as the partner goes (S1): it acked it,
    /// or the record does not need its ack.
    pub fn mirrored(&self, lsn: Lsn) -> bool {
        self.ack_set.borrow().mirrored(*self.acked.borrow(), lsn)
    }

    /// Drops the partner from the ack set after the mirror timeout (DESIGN §4.1, S3) and
    /// returns once it is out, however long that takes (S3: a controller that cannot record
    /// the drop keeps stalling). The drop runs in its own task, so a caller that gives up does
    /// not cancel it.
    pub async fn drop_partner(self: &Arc<Self>, why: String) -> Result<(), MirrorError> {
        let mut set = self.ack_set.subscribe();
        if set.borrow_and_update().dropped {
            return Ok(());
        }
        let mut handshakes = self.handshakes.subscribe();
        let before = *handshakes.borrow_and_update();
        let writer = self.clone();
        tokio::spawn(async move { writer.run_drop(why, before).await });
        let mut stop = self.stop.subscribe();
        // Out of the ack set, or re-established meanwhile (the caller waits for the ack again).
        tokio::select! {
            result = set.wait_for(|set| set.dropped) => result.map(|_| ()).map_err(|_| MirrorError::Stopped),
            result = handshakes.wait_for(|n| *n > before) => result.map(|_| ()).map_err(|_| MirrorError::Stopped),
            _ = stop.wait_for(|stop| *stop) => Err(MirrorError::Stopped),
        }
    }

    /// The drop of `drop_partner`; `handshakes` is the count when the timeout was seen: a
    /// handshake after it re-established the mirror, and the drop is moot.
    async fn run_drop(self: Arc<Self>, why: String, handshakes: u64) {
        let _one = self.dropping.lock().await;
        if self.ack_set.borrow().dropped || *self.handshakes.borrow() > handshakes {
            return;
        }
        tracing::warn!(partner = self.identity.partner, "dropping the NVLog mirror: {why}");
        // 1. Persisted locally first.
        let mut delay = Duration::from_millis(50);
        loop {
            let nvlog = self.nvlog.clone();
            match blocking(move || nvlog.set_mirror_state(LOCAL, MirrorState::OutOfSync)).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!("the drop cannot be persisted locally, writes stall (S3): {e}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
            if *self.stop.borrow() {
                return;
            }
        }
        // 2. With a mediator, its record (for every aggregate this mirror carries); without
        //    one, the partner's acknowledgement or mirror_timeout of silence (S3).
        self.queue_announcement(MirrorAnnouncement { state: WireMirrorState::OutOfSync as i32, lsn: 0 });
        let mut reports = self.partner_reports.subscribe();
        let mut stop = self.stop.subscribe();
        let mut evidence = DropEvidence {
            persisted_locally: true,
            recorded_by_mediator: false,
            partner_acknowledged: false,
            silent_for: Duration::ZERO,
        };
        if let Some(link) = self.mediator.get() {
            let aggregates: Vec<plex::Uuid> =
                self.epochs().iter().filter_map(crate::wire::from_aggregate_epoch).map(|(u, _)| u).collect();
            let mut delay = Duration::from_millis(50);
            'record: loop {
                if evidence.complete(true, self.timers.mirror_timeout) {
                    break 'record;
                }
                if *self.handshakes.borrow() > handshakes {
                    return;
                }
                let mut failed = None;
                for aggregate in &aggregates {
                    if let Err(e) = link.record_drop(*aggregate, false).await {
                        failed = Some(e);
                        break;
                    }
                }
                match failed {
                    None => evidence.recorded_by_mediator = true,
                    Some(e) => {
                        tracing::error!(
                            partner = self.identity.partner,
                            "the drop is not recorded yet, writes stall (S3): {e}"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            _ = stop.wait_for(|stop| *stop) => return,
                        }
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                }
            }
            {
                let mut state = self.lock_state();
                state.state = WriterState::OutOfSync;
                state.drops += 1;
            }
            self.ack_set.send_modify(|set| set.dropped = true);
            tracing::error!(
                partner = self.identity.partner,
                "NVLog mirror dropped, recorded by the mediator: out_of_sync; writes go on without the partner's copy (S3)"
            );
            return;
        }
        let how = loop {
            if *self.handshakes.borrow() > handshakes {
                tracing::info!(
                    partner = self.identity.partner,
                    "the mirror was re-established (resyncing) before the drop completed; not dropped"
                );
                return;
            }
            evidence.partner_acknowledged = self.lock_state().partner_out_of_sync;
            evidence.silent_for = self.clock.silent_for();
            if evidence.complete(false, self.timers.mirror_timeout) {
                break if evidence.partner_acknowledged {
                    "the partner acknowledged it (its receiver persisted out_of_sync)".to_string()
                } else {
                    format!("nothing heard from the partner for {:?}", evidence.silent_for)
                };
            }
            tokio::select! {
                _ = reports.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
        };
        // 3. Out of the ack set: the writes waiting on it go on with the local copy.
        {
            let mut state = self.lock_state();
            state.state = WriterState::OutOfSync;
            state.drops += 1;
        }
        // The session in progress sees this and ends: the next handshake re-establishes.
        self.ack_set.send_modify(|set| set.dropped = true);
        tracing::error!(
            partner = self.identity.partner,
            how = %how,
            "NVLog mirror dropped: out_of_sync; writes go on without the partner's copy (S3)"
        );
    }

    fn queue_announcement(&self, announcement: MirrorAnnouncement) {
        let mut queue = self.lock_queue();
        if queue.accepting {
            queue.items.push_back(Outgoing::Announcement(announcement));
            drop(queue);
            self.queued.notify_one();
        }
    }

    /// Waits until `count` handshakes have completed (1: the first, which confirms the partner
    /// is reachable and has returned our records, S2 and S8).
    pub async fn wait_handshakes(&self, count: u64) -> Result<(), MirrorError> {
        let mut handshakes = self.handshakes.subscribe();
        let mut stop = self.stop.subscribe();
        tokio::select! {
            result = handshakes.wait_for(|n| *n >= count) => result.map(|_| ()).map_err(|_| MirrorError::Stopped),
            _ = stop.wait_for(|stop| *stop) => Err(MirrorError::Stopped),
        }
    }

    /// Every record up to this lsn is persisted at the partner.
    pub fn acked(&self) -> Lsn {
        *self.acked.borrow()
    }

    /// A snapshot.
    pub fn status(&self) -> WriterStatus {
        let state = self.lock_state();
        WriterStatus {
            partner: self.identity.partner,
            state: state.state,
            connected: state.connected,
            acked: *self.acked.borrow(),
            ack_set: *self.ack_set.borrow(),
            drops: state.drops,
            handshakes: state.handshakes,
            partner_epochs: state.partner_epochs.clone(),
            first_copy_complete: state.first_copy_complete,
            partner_generation: state.partner_generation,
            last_error: state.last_error.clone(),
        }
    }

    async fn run(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return;
            }
            let started = Instant::now();
            let result = tokio::select! {
                result = self.session() => result,
                _ = stop.wait_for(|stop| *stop) => Ok(()),
            };
            {
                let mut queue = self.lock_queue();
                queue.accepting = false;
                queue.items.clear();
            }
            {
                let mut state = self.lock_state();
                state.connected = false;
                if let Err(e) = result {
                    if state.last_error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(partner = self.identity.partner, "NVLog mirror session: {e}");
                    }
                    state.last_error = Some(e);
                }
            }
            if started.elapsed() > Duration::from_secs(5) {
                backoff = Duration::from_millis(50);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.retry.notified() => backoff = Duration::from_millis(50),
                _ = stop.wait_for(|stop| *stop) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    fn our_identity(&self) -> Identity {
        Identity {
            cluster_id: self.identity.cluster.to_vec(),
            sender_node: self.identity.node,
            receiver_node: self.identity.partner,
        }
    }

    fn check_identity(&self, identity: Option<&Identity>) -> Result<(), String> {
        let identity = identity.ok_or("the partner's hello has no identity")?;
        if identity.cluster_id.as_slice() != self.identity.cluster {
            return Err("the partner belongs to another cluster".into());
        }
        if identity.sender_node != self.identity.partner || identity.receiver_node != self.identity.node {
            return Err(format!(
                "the hello is from node {} for node {}; expected node {} for node {}",
                identity.sender_node, identity.receiver_node, self.identity.partner, self.identity.node
            ));
        }
        Ok(())
    }

    /// Adopts a record of ours the partner returned (S8); a gap is declared so the record is
    /// kept, and replay then reports the missing lsns (their volumes stay offline).
    async fn adopt(&self, encoded: Vec<u8>) -> Result<(), String> {
        let nvlog = self.nvlog.clone();
        blocking(move || {
            let header = nvlog::record::decode_header(&encoded).map_err(NvlogError::InvalidRecord)?;
            let tail = nvlog.durable_tail(LOCAL)?;
            if header.lsn <= tail {
                return Ok(());
            }
            if header.lsn != tail.next() {
                tracing::error!(
                    tail = tail.0,
                    next = header.lsn.0,
                    "the partner returned records with a gap: the missing lsns cannot be recovered (S8)"
                );
                nvlog.allow_gap_at(LOCAL, header.lsn)?;
            }
            nvlog.append_copy(LOCAL, &encoded)?;
            Ok(())
        })
        .await
        .map_err(|e| format!("adopting a returned record: {e}"))
    }

    async fn session(&self) -> Result<(), String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.identity.address))
            .map_err(|e| format!("partner address {}: {e}", self.identity.address))?
            .connect_timeout(self.timers.keepalive_timeout)
            .tcp_nodelay(true);
        let channel =
            endpoint.connect().await.map_err(|e| format!("connect to {}: {e}", self.identity.address))?;
        let mut client =
            NvlogMirrorClient::new(channel).max_decoding_message_size(mc_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<WriterMessage>(64);
        let nvlog = self.nvlog.clone();
        let ours = blocking(move || nvlog.status(LOCAL)).await?;
        let recovered_tail = ours.last_lsn.max(ours.released_lsn);
        let hello = WriterHello {
            identity: Some(self.our_identity()),
            log_generation: self.nvlog.generation().0,
            recovered_tail_lsn: recovered_tail.0,
            epochs: self.epochs(),
        };
        let hello_sent = Instant::now();
        self.send(&tx, Out::Hello(hello)).await?;
        let timeout = self.timers.keepalive_timeout;
        let mut inbound = tokio::time::timeout(timeout, client.mirror(RxStream(rx)))
            .await
            .map_err(|_| "the partner did not answer the stream")?
            .map_err(|e| format!("open the stream: {e}"))?
            .into_inner();
        let hello = match next(&mut inbound, timeout).await? {
            In::Hello(hello) => hello,
            _ => return Err("the partner's first message is not its hello".into()),
        };
        self.check_identity(hello.identity.as_ref())?;
        self.clock.heard();
        self.note_partner_epochs(&hello.epochs);
        if !hello.refusal.is_empty() {
            return Err(format!("the partner refuses this node: {}", hello.refusal));
        }
        if !self.deposed.borrow().is_empty() {
            // S2: the partner took our aggregates over; it refuses us, and this is no handshake.
            return Err("the partner holds higher epochs for this node's aggregates: deposed (S2)".into());
        }
        // The hello exchange is a round trip with the DR partner: it renews the lease (S6), from
        // the hello's send time (a lapsed lease is not renewed by it).
        self.partner_round_trip(hello_sent, hello.mediator_silent);
        // 1. Our records the partner holds above our recovered tail (S8).
        let mut adopted = 0u64;
        for _ in 0..hello.returned_records {
            match next(&mut inbound, timeout).await? {
                In::ReturnedRecord(record) => {
                    self.adopt(record.encoded).await?;
                    adopted += 1;
                }
                _ => return Err("a message other than a returned record inside the returned records".into()),
            }
        }
        let nvlog = self.nvlog.clone();
        let ours = blocking(move || nvlog.status(LOCAL)).await?;
        let receiver_state =
            WireMirrorState::try_from(hello.mirror_state).unwrap_or(WireMirrorState::Unspecified);
        // Our own account counts too: a drop we persisted (before a restart, too) means the
        // partner lacks what we wrote alone.
        let dropped_here = matches!(ours.mirror_state, MirrorState::OutOfSync | MirrorState::Resyncing)
            || self.ack_set.borrow().dropped;
        let released = ours.released_lsn.max(self.lock_state().released);
        let Resume { acked: receiver_tail, release, start, resync_from } = resume(
            ours.last_lsn,
            released,
            dropped_here,
            Lsn(hello.durable_tail_lsn),
            receiver_state == WireMirrorState::InSync,
            hello.lost_records,
        )?;
        self.acked.send_if_modified(|acked| {
            let moved = receiver_tail > *acked;
            *acked = (*acked).max(receiver_tail);
            moved
        });
        // 2. Resume above what the partner holds; what our CPs covered is released first.
        // Always: a release sent in an earlier session may never have been applied (the
        // partner restarted), and its partition could stay full of what our CPs covered.
        if release > Lsn::ZERO {
            self.send(&tx, Out::Release(Release { lsn: release.0 })).await?;
        }
        let lost = resync_from.is_some();
        if let Some(from) = resync_from {
            let nvlog = self.nvlog.clone();
            blocking(move || nvlog.set_mirror_state(LOCAL, MirrorState::Resyncing)).await?;
            {
                let mut state = self.lock_state();
                state.state = WriterState::Resyncing { from };
                state.partner_out_of_sync = false;
            }
            // Back in the ack set (§4.2): every record from `from` on needs the partner's ack.
            if self.ack_set.borrow().dropped {
                self.ack_set.send_replace(AckSet { dropped: false, floor: from });
            }
            let announcement = MirrorAnnouncement { state: WireMirrorState::Resyncing as i32, lsn: start.0 };
            self.send(&tx, Out::Announcement(announcement)).await?;
        } else {
            let mut state = self.lock_state();
            state.partner_out_of_sync = false;
            if state.state == WriterState::Unknown {
                state.state = WriterState::InSync;
            }
        }
        tracing::info!(
            partner = self.identity.partner,
            receiver_tail = receiver_tail.0,
            receiver_state = ?receiver_state,
            lost_records = hello.lost_records,
            adopted,
            resend_from = start.0,
            our_last = ours.last_lsn.0,
            "NVLog mirror session established"
        );
        {
            self.lock_queue().accepting = true;
        }
        let mut sent = start.0.saturating_sub(1);
        let nvlog = self.nvlog.clone();
        let resend = blocking(move || nvlog.records_above(LOCAL, Lsn(sent))).await?;
        for encoded in resend {
            let lsn = nvlog::record::decode_header(&encoded).map_err(|e| format!("a local record: {e}"))?.lsn;
            self.send(&tx, Out::Record(MirroredRecord { lsn: lsn.0, encoded })).await?;
            sent = lsn.0;
        }
        self.announce_if_covered(&tx, released).await?;
        let handshakes = {
            let mut state = self.lock_state();
            state.connected = true;
            state.handshakes += 1;
            state.partner_epochs = hello.epochs.clone();
            state.partner_generation = hello.partition_generation;
            if state.first_copy_complete.is_none() {
                state.first_copy_complete = Some(partner_copy_complete(lost, hello.round_trip_since_start));
            }
            state.last_error = None;
            state.handshakes
        };
        self.handshakes.send_replace(handshakes);
        // 3. Steady state.
        let mut dropped = self.ack_set.subscribe();
        let mut keepalive = tokio::time::interval(self.timers.keepalive_interval);
        let mut sequence = 0u64;
        let mut sent_keepalives = crate::lease::SentKeepalives::default();
        let mut last_heard = Instant::now();
        loop {
            let items: Vec<Outgoing> = self.lock_queue().items.drain(..).collect();
            for item in items {
                match item {
                    Outgoing::Record { lsn, encoded } => {
                        if lsn.0 <= sent {
                            continue;
                        }
                        if lsn.0 != sent + 1 {
                            return Err(format!("queued lsn {} after {sent}: a hole in the queue", lsn.0));
                        }
                        let record = MirroredRecord { lsn: lsn.0, encoded };
                        self.send(&tx, Out::Record(record)).await?;
                        sent = lsn.0;
                    }
                    Outgoing::Release(lsn) => {
                        self.send(&tx, Out::Release(Release { lsn: lsn.0 })).await?;
                        self.announce_if_covered(&tx, lsn).await?;
                    }
                    Outgoing::Announcement(announcement) => {
                        self.send(&tx, Out::Announcement(announcement)).await?;
                    }
                }
            }
            tokio::select! {
                () = self.queued.notified() => {}
                () = async { let _ = dropped.wait_for(|set| set.dropped).await; } => {
                    return Err("the mirror was dropped; re-establishing".into());
                }
                received = inbound.message() => {
                    let body = match received {
                        Err(status) => {
                            if status.code() == tonic::Code::ResourceExhausted {
                                self.space.notify_one();
                            }
                            return Err(format!("the partner ended the stream: {status}"));
                        }
                        Ok(None) => return Err("the partner closed the stream".into()),
                        Ok(Some(ReceiverMessage { body: None })) => return Err("an empty message".into()),
                        Ok(Some(ReceiverMessage { body: Some(body) })) => body,
                    };
                    last_heard = Instant::now();
                    self.clock.heard();
                    match body {
                        In::Ack(ack) => {
                            let lsn = Lsn(ack.lsn);
                            if lsn.0 > sent {
                                return Err(format!("an ack for lsn {} that was never sent", lsn.0));
                            }
                            self.acked.send_if_modified(|acked| {
                                let moved = lsn > *acked;
                                *acked = (*acked).max(lsn);
                                moved
                            });
                        }
                        In::StateChange(change) => {
                            if change.state == WireMirrorState::OutOfSync as i32 {
                                // Its receiver persisted out_of_sync: that acknowledges a drop (S3).
                                self.lock_state().partner_out_of_sync = true;
                                self.partner_reports.send_modify(|n| *n += 1);
                            }
                            return Err(format!("the partner marked the mirror out of sync: {}", change.reason));
                        }
                        In::Keepalive(keepalive) => {
                            self.note_partner_epochs(&keepalive.epochs);
                            self.lock_state().partner_epochs = keepalive.epochs;
                            let reply = KeepaliveReply {
                                sequence: keepalive.sequence,
                                epochs: self.epochs(),
                                mediator_silent: self.mediator.get().is_some_and(|m| !m.answering()),
                            };
                            self.send(&tx, Out::KeepaliveReply(reply)).await?;
                        }
                        In::KeepaliveReply(reply) => {
                            self.note_partner_epochs(&reply.epochs);
                            // A completed round trip with the DR partner renews the lease (S6),
                            // from the keepalive's send time; not once this node was deposed.
                            if let Some(sent) = sent_keepalives.answered(reply.sequence) {
                                self.partner_round_trip(sent, reply.mediator_silent);
                            }
                            self.lock_state().partner_epochs = reply.epochs;
                        }
                        In::Hello(_) | In::ReturnedRecord(_) => {
                            return Err("a hello or returned record after the handshake".into());
                        }
                    }
                }
                _ = keepalive.tick() => {
                    if last_heard.elapsed() > self.timers.keepalive_timeout {
                        return Err(format!("nothing heard from the partner for {:?}", last_heard.elapsed()));
                    }
                    sequence += 1;
                    sent_keepalives.sent(sequence);
                    self.send(&tx, Out::Keepalive(Keepalive { sequence, epochs: self.epochs() })).await?;
                }
            }
        }
    }

    /// Sends one message; a stream that does not take it within `keepalive_timeout` (HTTP/2
    /// flow control stalled by a silent peer) ends the session like silence does.
    async fn send(&self, tx: &mpsc::Sender<WriterMessage>, body: Out) -> Result<(), String> {
        match tokio::time::timeout(self.timers.keepalive_timeout, tx.send(message(body))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("the stream closed".into()),
            Err(_) => Err(format!("the stream took no message for {:?}", self.timers.keepalive_timeout)),
        }
    }

    /// Announces `in_sync` when the release at `released` covers every lsn below the point
    /// where a resyncing mirror restarted (§4.2).
    async fn announce_if_covered(
        &self,
        tx: &mpsc::Sender<WriterMessage>,
        released: Lsn,
    ) -> Result<(), String> {
        let covered = match self.lock_state().state {
            WriterState::Resyncing { from } => covers(released, from),
            _ => false,
        };
        if !covered {
            return Ok(());
        }
        let announcement = MirrorAnnouncement { state: WireMirrorState::InSync as i32, lsn: released.0 };
        self.send(tx, Out::Announcement(announcement)).await?;
        let nvlog = self.nvlog.clone();
        blocking(move || nvlog.set_mirror_state(LOCAL, MirrorState::InSync)).await?;
        self.lock_state().state = WriterState::InSync;
        tracing::info!(
            partner = self.identity.partner,
            cp_lsn = released.0,
            "NVLog mirror in sync (covering CP)"
        );
        Ok(())
    }
}

/// The next message of the partner, at most `timeout` away.
async fn next(inbound: &mut tonic::Streaming<ReceiverMessage>, timeout: Duration) -> Result<In, String> {
    match tokio::time::timeout(timeout, inbound.message()).await {
        Err(_) => Err(format!("the partner was silent for {timeout:?}")),
        Ok(Err(status)) => Err(format!("the partner ended the stream: {status}")),
        Ok(Ok(None)) => Err("the partner closed the stream".to_string()),
        Ok(Ok(Some(ReceiverMessage { body: None }))) => Err("an empty message".to_string()),
        Ok(Ok(Some(ReceiverMessage { body: Some(body) }))) => Ok(body),
    }
}

/// An mpsc receiver as a request stream.
struct RxStream(mpsc::Receiver<WriterMessage>);

impl Stream for RxStream {
    type Item = WriterMessage;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<WriterMessage>> {
        self.0.poll_recv(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_session_resumes_above_the_partners_tail_and_our_release() {
        // In sync: resend above the partner's tail, nothing to re-establish.
        let plain = resume(Lsn(9), Lsn(4), false, Lsn(7), true, false).unwrap();
        assert_eq!(plain, Resume { acked: Lsn(7), release: Lsn(4), start: Lsn(8), resync_from: None });
        // Our CPs released above the partner's tail: resend above the release (the partner
        // releases first, so it sees no gap).
        let behind = resume(Lsn(9), Lsn(8), false, Lsn(5), true, false).unwrap();
        assert_eq!(behind.start, Lsn(9));
        // Any sign of a lost record re-establishes from our next lsn.
        for (dropped_here, in_sync, lost_records) in
            [(true, true, false), (false, false, false), (false, true, true)]
        {
            let lost = resume(Lsn(9), Lsn(4), dropped_here, Lsn(7), in_sync, lost_records).unwrap();
            assert_eq!(lost.resync_from, Some(Lsn(10)));
            assert_eq!(lost.start, Lsn(8));
        }
        // A lost log refilled up to its lsn floor: the release point is our tail.
        let refilled = resume(Lsn(0), Lsn(12), true, Lsn(12), true, false).unwrap();
        assert_eq!(refilled.start, Lsn(13));
        assert_eq!(refilled.resync_from, Some(Lsn(13)));
        // The partner ahead of us is refused.
        assert!(resume(Lsn(3), Lsn(2), false, Lsn(4), true, false).is_err());
    }

    #[test]
    fn in_sync_waits_for_a_cp_below_the_restart_point() {
        assert!(!covers(Lsn(8), Lsn(10)));
        assert!(covers(Lsn(9), Lsn(10)));
        assert!(covers(Lsn(12), Lsn(10)));
    }
}

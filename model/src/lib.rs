//! Model check of the safety core (issue 11; DESIGN §0).
//!
//! A small cluster — controller A (site A, owner of aggregate X), controller B (site B, its DR
//! partner and X's NVLog receiver) and the mediator — explored over every interleaving by the
//! `stateright` checker, with a network that loses, delays, duplicates and reorders the
//! mediator's messages, crashes (with and without the loss of the NVLog file), pauses, a stalled
//! receiver, inter-site and mediator link cuts, plex drops and resyncs, and an operator's
//! forced switchover, heal and switchback (and the re-run of a switchback that stopped).
//!
//! **What runs here is the product's own decision code**, called with the model's clock:
//! - the mediator is `mediator::decide::Mediator`, whole: leases, epochs, the in-sync record,
//!   drop records, AUSO and manual grants (DESIGN §10);
//! - each controller's self-fence is `controller::lease::Lease` (S6);
//! - the ack rule is `controller::nvlog_mirror::AckSet::mirrored` (S1);
//! - a drop leaves the ack set when `controller::nvlog_mirror::DropEvidence::complete` says so
//!   (S3);
//! - every epoch a receiver or a switchover admits passes `controller::shelf_state::admits`
//!   (S2);
//! - the writer's handshake resumes where `controller::nvlog_mirror::resume` says, and announces
//!   `in_sync` when `covers` says a CP covered the re-establish (§4.2);
//! - the receiver's account follows `controller::mirror_receiver::announced_state` and
//!   `silence_marks_out_of_sync` (S13);
//! - a switchover's replay finds gaps with `nvlog::lsn_gaps` and NVFAILs on
//!   `controller::switchover::replay_doubt`; without a mediator it is vetoed or NVFAILs on
//!   `sync_doubts` (§9 (a));
//! - a switchback drops the home node's records held at the survivor's receiver when
//!   `controller::heal::drops_held_records` says so (finding 9), and one interrupted by a
//!   restart is rolled back or kept for a re-run as `controller::heal::rolled_back_at_start`
//!   says (finding 10).
//!
//! The controller's glue between those decisions — when it sends a heartbeat, what its report
//! says, the NVLog stream's messages, a CP's steps, the steps of switchover, heal and
//! switchback — is written here after the daemon's async code (`mediator_link.rs`,
//! `nvlog_mirror.rs`, `mirror_receiver.rs`, `cp.rs`, `switchover.rs`, `heal.rs`), which does not
//! call a sans-IO core for it (see `docs/safety.md`).
//! A CP runs every `CP_INTERVAL` seconds; while B's site cannot take the plex writes it waits,
//! and after `mirror_timeout` of silence B's plex is dropped (recorded by the mediator first,
//! S3) and the CP goes on with A's plex alone; A's plex monitor resyncs B's plex once it can.
//!
//! Time is global and discrete (`Tick`, one second), so the clocks run at one rate: the margin
//! of DESIGN §10.1 covers drift, which the model does not add. A message is delivered within the
//! second it was sent, in any order, unless a fault loses, duplicates or delays it (into the
//! next second); a paused process takes its messages when it resumes.
//!
//! The invariants, checked in every state (`ClusterModel::properties`):
//! - every acknowledged write is held by each controller that can serve X, unless X is NVFAILed
//!   there (S1, S3, S8, S9);
//! - never two controllers that can acknowledge for X at once (S2, S6);
//! - no automatic switchover while X was not in sync (S7);
//! - no record admitted, and no write acknowledged, at an epoch below one already issued (to
//!   another node, for a write: S2);
//! - a switchover replays each record once, in lsn order (S8);
//! - no switchover back to a site before heal and switchback (S14);
//! - bounded liveness: once faults stop, X is served again (unless a switchback that stopped
//!   waits for the operator's re-run), and (without a switchover, or after a switchback) its
//!   mirror is in sync again.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::hash::{Hash as _, Hasher as _};
use std::time::Duration;

use controller::lease::Lease;
use controller::mirror_receiver::{announced_state, silence_marks_out_of_sync};
use controller::nvlog_mirror::{
    AckSet, DropEvidence, covers, lost_partition_verdict, partner_copy_complete, resume,
};
use controller::shelf_state::admits;
use controller::switchover::{ReplayFound, SyncDoubts, replay_doubt, sync_doubts};
use mediator::decide::{self, AggregateId, Mediator, MirrorState, NodeId};
use nvlog::{Lsn, lsn_gaps};
use plex::Epoch;
use stateright::{Model, Property};

/// A CP runs every `CP_INTERVAL` seconds (DESIGN §4's `cp_interval`), on the global clock: the
/// faults come at every point between, so every phase is explored. Between two CPs a
/// re-established mirror stays `resyncing`.
pub const CP_INTERVAL: u8 = 3;

/// A's plex monitor resyncs B's dropped plex at most this many seconds after it could first
/// reattach it (it retries every half second; a reattach that keeps failing is a fault the
/// model does not have).
pub const PLEX_REATTACH: u8 = 2;

/// How many times the operator runs `mcctl switchback` (a run and a re-run of one that stopped).
pub const SWITCHBACK_RUNS: u8 = 2;

/// The one aggregate.
pub const X: AggregateId = AggregateId([0x58; 16]);
/// Controller ids (A = index 0, B = index 1).
pub const NODES: [u32; 2] = [1, 2];
const A: usize = 0;
const B: usize = 1;

/// The timers, in ticks of one second. They pass DESIGN §10.1's order, and leave AUSO a
/// window: lease + margin (4) < mirror_timeout − margin (5), when B's receiver marks itself
/// out of sync by silence.
pub fn timers() -> decide::Timers {
    decide::Timers {
        keepalive_timeout: secs(1),
        heartbeat: secs(1),
        lease: secs(3),
        margin: secs(1),
        mirror_timeout: secs(6),
        auso_window: secs(6),
    }
}

fn secs(n: u8) -> Duration {
    Duration::from_secs(u64::from(n))
}

fn ticks(d: Duration) -> u8 {
    u8::try_from(d.as_secs()).unwrap_or(u8::MAX)
}

fn to_decide(e: Epoch) -> decide::Epoch {
    decide::Epoch { number: e.number, owner: NodeId(e.owner.0) }
}

fn from_decide(e: decide::Epoch) -> Epoch {
    Epoch { number: e.number, owner: plex::NodeId(e.owner.0) }
}

fn epoch_one() -> Epoch {
    Epoch { number: 1, owner: plex::NodeId(NODES[A]) }
}

/// Which faults and operator commands the checker may choose, and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// The last tick explored.
    pub horizon: u8,
    /// Host writes.
    pub writes: u8,
    /// Faults, of the kinds enabled below.
    pub faults: u8,
    /// Crash a controller (it may restart).
    pub crash: bool,
    /// Crash A and lose its NVLog file.
    pub lose_nvlog: bool,
    /// Pause a controller (SIGSTOP; it may resume).
    pub pause: bool,
    /// B's receiver stops taking records (a gray disk), keepalives still answered.
    pub stall: bool,
    /// Cut (and heal) the inter-site link.
    pub cut_link: bool,
    /// Cut a controller's link to the mediator.
    pub cut_mediator: bool,
    /// Restart the mediator: with its state file, without one, or from an old snapshot (§10
    /// rule 5).
    pub restart_mediator: bool,
    /// Lose a mediator message.
    pub lose: bool,
    /// Deliver a mediator message twice.
    pub duplicate: bool,
    /// Hold a mediator message back into the next second.
    pub delay: bool,
    /// One interleaving per second: messages are delivered in the order they were sent (the
    /// mediator's first, then the A → B stream, then B → A), while faults, writes and the
    /// operator still come at any point between them. Every trace found this way is a trace
    /// of the full model, so the deliberate breaks whose counterexamples need a longer
    /// horizon are checked this way; the exhaustive runs keep every order (`false`).
    pub fifo: bool,
    /// How many forced switchovers the operator runs, at either site, with and without the
    /// override: through the mediator (S7), or without one on the operator's confirmation that
    /// the partner's site is down (the controller's own vetoes and NVFAIL rules, DESIGN §9 (a)).
    pub switchovers: u8,
    /// A mediator is configured. Without one there is no lease (S6), S2's confirmation comes
    /// from the DR partner, a drop completes after `mirror_timeout` of silence (S3), and a
    /// forced switchover runs on the operator's confirmation alone.
    pub mediator: bool,
    /// The operator may heal and switch back a switched-over aggregate (`mcctl heal`, `mcctl
    /// switchback`, DESIGN §11), and re-run a switchback that stopped.
    pub switchback: bool,
}

impl Bounds {
    /// The configuration CI checks exhaustively.
    pub const CI: Bounds = Bounds {
        horizon: 8,
        writes: 1,
        faults: 1,
        crash: true,
        lose_nvlog: true,
        pause: true,
        stall: true,
        cut_link: true,
        cut_mediator: true,
        restart_mediator: false,
        lose: false,
        duplicate: false,
        delay: false,
        fifo: false,
        switchovers: 1,
        mediator: true,
        switchback: false,
    };
}

/// One NVLog record of X.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rec {
    /// Its lsn in its writer's log.
    pub lsn: u64,
    /// The epoch it is stamped with.
    pub epoch: Epoch,
    /// The host write it carries.
    pub write: u8,
}

/// A write waiting for its acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pending {
    lsn: u64,
    write: u8,
    since: u8,
}

/// B's plex in A's aggregate X (DESIGN §4.1): the remote plex of A's CPs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RemotePlex {
    /// Written by every CP.
    Normal,
    /// Its CP writes went unanswered for `mirror_timeout`: dropped in A's labels, and the CP
    /// waits for the mediator to record the drop (S3, `node.rs` `PartnerDrops`).
    Dropping,
    /// Out of date: CPs go to A's plex alone until the plex monitor reattaches and resyncs it
    /// (`plex_monitor.rs`).
    Dropped,
}

/// A switchback in progress at the survivor (its operation journal, `heal.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwitchbackStep {
    /// Drained, a CP on both plexes done; the mediator is asked to raise X's epoch for the home
    /// node (`mediator_epochs`). Kept so across a restart of the node (`heal::
    /// rolled_back_at_start`, `held_by_switchback`, finding 10): X stays quiesced there, since
    /// the mediator may hold the epoch; a re-run hands X over once the node holds it, or asks
    /// again.
    Raising(Epoch),
    /// The new epoch, the home node's, is persisted here: this node never writes X again at its
    /// own; the home node is to take X back (`Admin.TakeBack`).
    Raised(Epoch),
}

/// A controller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ctl {
    /// Its id.
    pub node: u32,
    /// The process runs.
    pub up: bool,
    /// SIGSTOPped.
    pub paused: bool,
    /// Its receiver takes no record (gray disk).
    pub stalled: bool,
    /// Messages of the writer its receiver got and queued for the stalled store.
    pub unstored: u8,
    /// Raised by each restart (the NVLog generation in the reports).
    pub life: u64,
    /// When the process started.
    pub started: u8,
    // Durable: NVLog, labels, shelf state, volume table.
    /// Its own records of X (local partition).
    pub log: Vec<Rec>,
    /// The local partition was lost: the partner's copy is needed (S8).
    pub lost_log: bool,
    /// The partner's records (dr_partner partition).
    pub rx: Vec<Rec>,
    /// The receiver's account of the partner's mirror (S13).
    pub rx_state: nvlog::MirrorState,
    /// The writer's drop (or re-establish) is persisted locally: not in sync.
    pub writer_dropped: bool,
    /// Its local partition's release point (its last CP's lsn).
    pub released: u64,
    /// The receiver's partition: the last lsn it appended (its durable tail in hellos).
    pub rx_last: u64,
    /// The receiver's partition: its release point (the partner's CPs, as the partner said).
    pub rx_released: u64,
    /// The receiver accepts a gap below this lsn (the writer's `resyncing` announcement).
    pub rx_gap_at: Option<u64>,
    /// This site's plex of X: the writes its CPs hold.
    pub plex: BTreeSet<u8>,
    /// The last CP of A's records this site's plex labels record (A's lsn).
    pub plex_cp: u64,
    /// As owner of X: the plex at the other site (its drop is in this site's labels).
    pub remote_plex: RemotePlex,
    /// The shelf's epoch mark for X.
    pub mark: Epoch,
    /// The epoch it holds X at (its labels).
    pub owns: Option<Epoch>,
    /// The writes X holds here (records replayed or written, plexes).
    pub data: BTreeSet<u8>,
    /// X is NVFAILed here.
    pub nvfailed: bool,
    /// The mediator state version it saw.
    pub mver: u64,
    /// As survivor: a heal reattached and resynced the home plex of the switched-over X.
    pub healed: bool,
    /// As home node waiting for switchback: a heal discarded its records of X (S8).
    pub discarded: bool,
    /// As survivor: a switchback in progress (journalled).
    pub switchback: Option<SwitchbackStep>,
    // Volatile.
    /// The self-fence (S6), checked only with a mediator configured.
    pub lease: Lease<Duration>,
    /// A mediator is configured: S6's lease applies.
    pub leased: bool,
    /// S2's confirmation since the start.
    pub confirmed: bool,
    /// Saw a higher epoch of X (S2).
    pub deposed: bool,
    /// The writer's session handshake is done.
    pub handshake: bool,
    /// The writer re-established the mirror at this lsn of its own (§4.2): `resyncing` until a
    /// CP covers every lsn below it.
    pub resync_from: Option<u64>,
    /// The partner acknowledged every record through it.
    pub acked: Lsn,
    /// Which records need the partner (S1).
    pub ack_set: AckSet,
    /// Writes waiting.
    pub pending: Vec<Pending>,
    /// A drop in progress (S3): what it has achieved so far.
    pub dropping: Option<DropEvidence>,
    /// The heartbeat and drop-record counter.
    pub seq: u64,
    /// Last heard from the partner.
    pub heard: Option<u8>,
    /// Last round trip with the partner (its send time).
    pub round_trip: Option<u8>,
    /// With `lost_log`: the handshake's verdict on the partner's copy (S8), adopted and waiting
    /// for the mediator's word.
    pub copy_complete: Option<bool>,
    /// The latest mediator reply since the start that can confirm epochs: whether it named X's
    /// mirror intact (S8).
    pub mirror_intact: Option<bool>,
}

impl Ctl {
    fn new(index: usize, leased: bool) -> Ctl {
        let mut lease = Lease::new(timers().lease);
        lease.renew(Duration::ZERO, None);
        Ctl {
            node: NODES[index],
            up: true,
            paused: false,
            stalled: false,
            unstored: 0,
            life: 1,
            started: 0,
            log: Vec::new(),
            lost_log: false,
            rx: Vec::new(),
            rx_state: nvlog::MirrorState::InSync,
            writer_dropped: false,
            released: 0,
            rx_last: 0,
            rx_released: 0,
            rx_gap_at: None,
            plex: BTreeSet::new(),
            plex_cp: 0,
            remote_plex: RemotePlex::Normal,
            mark: epoch_one(),
            owns: (index == A).then(epoch_one),
            data: BTreeSet::new(),
            nvfailed: false,
            mver: 1,
            healed: false,
            discarded: false,
            switchback: None,
            lease,
            leased,
            confirmed: true,
            deposed: false,
            handshake: true,
            resync_from: None,
            acked: Lsn(0),
            ack_set: AckSet::default(),
            pending: Vec::new(),
            dropping: None,
            seq: 0,
            heard: Some(0),
            round_trip: Some(0),
            copy_complete: None,
            mirror_intact: None,
        }
    }

    /// Whether it may acknowledge a write of X or complete a read at `now` (S2, S6).
    pub fn can_serve(&self, now: u8) -> bool {
        self.up
            && !self.paused
            && self.confirmed
            && !self.away()
            && !self.lost_log
            && self.owns.is_some()
            && !self.quiesced()
            && (!self.leased || self.lease.clone().check(secs(now)).is_ok())
    }

    /// A switchback stopped I/O to X here (drained, the epoch asked for or raised).
    fn quiesced(&self) -> bool {
        self.switchback.is_some()
    }

    /// Its aggregate was switched over to the partner: its shelf holds the partner's higher
    /// epoch (persisted on deposition, S2), so it waits for heal and switchback (DESIGN §11).
    pub fn away(&self) -> bool {
        self.deposed || self.owns.is_some_and(|e| self.mark > e && self.mark.owner.0 != self.node)
    }

    /// Deposed by `theirs` (S2): stops serving at once and persists the epoch on its shelf.
    fn depose(&mut self, theirs: Epoch) {
        self.deposed = true;
        self.mark = self.mark.max(theirs);
    }

    fn writer_state(&self) -> MirrorState {
        if self.ack_set.dropped || self.dropping.is_some() || !self.handshake {
            MirrorState::OutOfSync
        } else if self.resync_from.is_some() {
            MirrorState::Resyncing
        } else if self.writer_dropped {
            MirrorState::OutOfSync
        } else {
            MirrorState::InSync
        }
    }

    /// S8's verdict on a lost partition, once the handshake adopted the partner's copy and
    /// (with a mediator) a reply said whether the mirror is intact: NVFAIL unless complete.
    fn settle_lost_log(&mut self) {
        let Some(copy_complete) = self.copy_complete.filter(|_| self.lost_log) else { return };
        if let Some(complete) =
            lost_partition_verdict(copy_complete, self.leased.then_some(self.mirror_intact))
        {
            self.nvfailed |= !complete;
            self.lost_log = false;
            self.copy_complete = None;
        }
    }

    /// The receiver partition's tail: nothing at or below it is taken again.
    fn rx_tail(&self) -> u64 {
        self.rx_last.max(self.rx_released)
    }

    /// The last lsn its own log used (records released by a CP included).
    fn last_lsn(&self) -> u64 {
        self.log.last().map_or(0, |r| r.lsn).max(self.released)
    }

    /// The epoch it shows the partner in hellos and keepalives (its shelf's mark).
    fn shown_epoch(&self) -> Epoch {
        self.owns.map_or(self.mark, |e| e.max(self.mark))
    }
}

/// What a controller sends the mediator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ToMediator {
    /// A heartbeat.
    Report(Box<decide::Report>),
    /// S3: a drop to record.
    RecordDrop {
        /// The heartbeat counter's stamp.
        stamp: (u64, u64),
        /// Of the partner's plex, not of the NVLog mirror.
        plex_only: bool,
    },
    /// The grant was applied.
    ConfirmGrant,
    /// An operator's forced switchover (S7).
    ManualSwitchover {
        /// Override the in-sync condition (NVFAIL).
        override_in_sync: bool,
    },
    /// A switchback raises X's epoch for the home node A (`Event::RaiseEpochs`).
    RaiseEpochs,
}

/// What the mediator answers.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ToCtl {
    /// The reply to a heartbeat or a manual switchover (lease, epochs, grant).
    Reply(decide::Reply),
    /// The drop is recorded.
    DropRecorded {
        /// Of the partner's plex.
        plex_only: bool,
    },
    /// Refused, with why.
    Refused(String),
    /// The reply to `RaiseEpochs`.
    Raised(decide::Reply),
    /// `RaiseEpochs` refused, with why.
    RaiseRefused(String),
}

/// A message between a controller and the mediator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Envelope {
    /// To the mediator.
    Up {
        /// From this controller (index).
        from: usize,
        /// Its life when it sent it.
        life: u64,
        /// When.
        sent: u8,
        /// Held back by a fault: delivered in the next second.
        delayed: bool,
        /// What.
        body: ToMediator,
    },
    /// To a controller.
    Down {
        /// To this controller (index).
        to: usize,
        /// The life of the request's sender (a reply reaches only that process).
        life: u64,
        /// When the request it answers was sent (a round trip counts from there, S6).
        request_sent: u8,
        /// When the reply was sent.
        sent: u8,
        /// Held back by a fault: delivered in the next second.
        delayed: bool,
        /// What.
        body: ToCtl,
    },
}

impl Envelope {
    fn sent(&self) -> u8 {
        match self {
            Envelope::Up { sent, .. } | Envelope::Down { sent, .. } => *sent,
        }
    }

    fn delayed(&self) -> bool {
        match self {
            Envelope::Up { delayed, .. } | Envelope::Down { delayed, .. } => *delayed,
        }
    }
}

/// A message on the NVLog mirror stream (A → B carries records, B → A acks and refusals).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamMsg {
    /// A record.
    Record(Rec),
    /// The writer's CP covered its records through this lsn: the receiver releases them.
    Release(u64),
    /// The writer re-established the mirror (§4.2): `resyncing`, records from this lsn on.
    Resyncing(u64),
    /// A CP covered the re-established mirror: `in_sync`.
    InSync(u64),
    /// The writer drops the mirror (S3): `out_of_sync`.
    Dropped,
    /// The receiver persisted `out_of_sync` (it acknowledges a drop, S3); the session ends.
    OutOfSync,
    /// Persisted through this lsn.
    Ack(u64),
    /// The receiver refused a stale epoch and shows its own (S2).
    Refused(Epoch),
}

/// What the checker has seen happen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct History {
    /// Writes acknowledged to the host.
    pub acked: BTreeSet<u8>,
    /// An automatic switchover was applied.
    pub auso: bool,
    /// An automatic switchover was applied without every acknowledged write at the survivor.
    pub auso_out_of_sync: bool,
    /// A receiver admitted a record below its mark.
    pub stale_accepted: bool,
    /// A write was acknowledged at an epoch below one already issued naming another node.
    pub stale_ack: bool,
    /// A replay applied a record twice or out of order.
    pub bad_replay: bool,
    /// The mediator changed its state without persisting it before it answered.
    pub unpersisted: bool,
    /// The mediator restarted.
    pub mediator_restarted: bool,
    /// The mediator granted a switchover after a restart.
    pub granted_after_restart: bool,
    /// A mirror handshake or announcement was refused as impossible (the partner holds more
    /// of the writer's records than the writer, or a restart point below its tail).
    pub refused_handshake: bool,
    /// X was switched over away from this site (index 0: A's site), with no switchback since.
    pub switched_away: [bool; 2],
    /// A switchover granted X back to a site it had been switched away from (S14).
    pub way_back: bool,
    /// A fault happened.
    pub faulted: bool,
    /// A re-established mirror was announced `in_sync` again (a covering CP).
    pub resynced: bool,
    /// A dropped plex was resynced.
    pub plex_resynced: bool,
    /// A switchback handed X back to A.
    pub switched_back: bool,
    /// A switchback in progress met a restart of its node.
    pub switchback_restarted: bool,
    /// A switchover's replay found a gap in the partner's records.
    pub replay_gap: bool,
    /// A switchover's replay doubted the partner's copy where the grant did not NVFAIL.
    pub replay_doubted: bool,
    /// When the last fault, repair (restart, resume, link heal) or operator command happened.
    pub disturbed: u8,
}

/// The whole cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    /// Seconds since the start.
    pub now: u8,
    /// A and B.
    pub ctl: [Ctl; 2],
    /// The mediator's own decision core.
    pub mediator: Mediator,
    /// When the mediator's process started: its clock counts from there (`service.rs`).
    pub mediator_started: u8,
    /// Messages to and from the mediator, in flight: a multiset (sorted), or in the order sent
    /// with `Bounds::fifo`.
    pub net: Vec<Envelope>,
    /// `Bounds::fifo`.
    pub fifo: bool,
    /// The NVLog mirror stream, A → B and B → A, in order, with send times.
    pub stream: [Vec<(u8, StreamMsg)>; 2],
    /// The inter-site link is up.
    pub link: bool,
    /// Each controller's link to the mediator is up.
    pub mediator_link: [bool; 2],
    /// Faults left.
    pub faults_left: u8,
    /// Host writes left.
    pub writes_left: u8,
    /// Forced switchovers the operator may still run.
    pub switchovers_left: u8,
    /// Switchback runs (or re-runs) the operator may still make.
    pub switchbacks_left: u8,
    /// A's CP is due (every `CP_INTERVAL`); it waits while B's plex neither answers nor is
    /// dropped.
    pub cp_due: bool,
    /// Since when A's plex monitor could reattach B's dropped plex (it does within
    /// `PLEX_REATTACH` seconds).
    pub reattach_since: Option<u8>,
    /// What happened.
    pub history: History,
}

/// A fault.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The controller's process dies (its NVLog survives).
    Crash(usize),
    /// A dies and its NVLog file is lost.
    CrashLosingNvlog,
    /// SIGSTOP.
    Pause(usize),
    /// B's receiver stops taking records.
    Stall,
    /// The inter-site link goes down (both streams lost).
    CutLink,
    /// It comes back.
    HealLink,
    /// A controller's link to the mediator goes down.
    CutMediator(usize),
    /// The mediator's process restarts.
    RestartMediator(MediatorRestart),
    /// A message to or from the mediator is lost.
    Lose(usize),
    /// It is delivered twice.
    Duplicate(usize),
    /// It is held back into the next second.
    Delay(usize),
}

/// What a restarted mediator finds on its disk (§10 rule 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MediatorRestart {
    /// Its state file, as persisted before its last answer.
    Intact,
    /// No state file (lost, or corrupt and refused).
    Lost,
    /// The first state, restored from an old backup: older than the version the controllers
    /// saw.
    Snapshot,
}

/// A step.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// One second passes: timers fire, heartbeats and keepalives go out.
    Tick,
    /// A host write of X at a controller.
    Write(usize),
    /// The head of a stream arrives (0: A → B, 1: B → A).
    Stream(usize),
    /// A write of this controller has waited `mirror_timeout`: the drop starts (S3).
    MirrorTimeout(usize),
    /// A message to or from the mediator arrives.
    Deliver(usize),
    /// A fault.
    Fault(Fault),
    /// A crashed controller starts again.
    Restart(usize),
    /// A paused controller resumes (SIGCONT).
    Resume(usize),
    /// A's plex monitor reattaches B's dropped plex and resyncs it from A's.
    ResyncPlex,
    /// The operator runs `mcctl heal` at B, which serves X switched over.
    Heal,
    /// The operator runs (or re-runs) `mcctl switchback` at B.
    Switchback,
    /// The operator runs `mcctl switchover --forced-on-disaster` at a controller (through the
    /// mediator), for the other site's aggregates.
    ManualSwitchover {
        /// At this controller (the survivor).
        at: usize,
        /// `--override-vetoes`.
        override_in_sync: bool,
    },
}

/// The model: the bounds of the exploration.
#[derive(Clone, Debug)]
pub struct ClusterModel {
    /// What the checker may do.
    pub bounds: Bounds,
}

fn mediator_config() -> decide::Config {
    decide::Config {
        controllers: vec![
            decide::Controller { node: NodeId(NODES[A]), site: decide::Site(0) },
            decide::Controller { node: NodeId(NODES[B]), site: decide::Site(1) },
        ],
        timers: timers(),
        observer: false,
    }
}

impl ClusterModel {
    /// The initial state: both sites up and in sync, leases started, A owns X at epoch 1.
    pub fn initial(&self) -> State {
        let mediator = match Mediator::new(mediator_config(), Some(first_mediator_state())) {
            Ok(m) => m,
            Err(e) => panic!("the model's mediator configuration is refused: {e}"),
        };
        State {
            now: 0,
            ctl: [Ctl::new(A, self.bounds.mediator), Ctl::new(B, self.bounds.mediator)],
            mediator,
            mediator_started: 0,
            net: Vec::new(),
            fifo: self.bounds.fifo,
            stream: [Vec::new(), Vec::new()],
            link: true,
            mediator_link: [true, true],
            faults_left: self.bounds.faults,
            writes_left: self.bounds.writes,
            switchovers_left: self.bounds.switchovers,
            switchbacks_left: if self.bounds.switchback { SWITCHBACK_RUNS } else { 0 },
            cp_due: false,
            reattach_since: None,
            history: History::default(),
        }
    }
}

/// The mediator's state at the start: X owned by A at epoch 1, in sync.
fn first_mediator_state() -> decide::State {
    let mut state = decide::State { version: 1, ..decide::State::default() };
    state.aggregates.insert(
        X,
        decide::AggregateRecord {
            epoch: to_decide(epoch_one()),
            owner_says: Some((MirrorState::InSync, 1, true)),
            receiver_says: Some((MirrorState::InSync, 1)),
            mirror_intact: true,
        },
    );
    state
}

/// A fixed-key hash of the mediator's state (to tell whether a step changed it).
fn state_hash(state: &decide::State) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    state.hash(&mut h);
    h.finish()
}

impl State {
    /// The mediator's clock: time since its process started (`service.rs`), so that after a
    /// restart "never heard" counts from its start (§10).
    fn mediator_clock(&self) -> Duration {
        secs(self.now - self.mediator_started)
    }

    /// The mediator's process restarts (§10 rule 5): its volatile knowledge (who was heard
    /// when, the latest reports) is gone; its state is what it finds on disk.
    fn restart_mediator(&mut self, found: MediatorRestart) {
        let restarted = match found {
            // `daemon.rs` `open_core`: a state file read back is rebuilt (`Mediator::restart`).
            MediatorRestart::Intact => Mediator::restart(mediator_config(), self.mediator.state().clone()),
            MediatorRestart::Lost => Mediator::new(mediator_config(), None),
            MediatorRestart::Snapshot => Mediator::restart(mediator_config(), first_mediator_state()),
        };
        match restarted {
            Ok(m) => self.mediator = m,
            Err(e) => panic!("the model's mediator configuration is refused: {e}"),
        }
        self.mediator_started = self.now;
        self.history.mediator_restarted = true;
    }

    /// Whether a controller at `index` takes messages now.
    fn takes(&self, index: usize) -> bool {
        self.ctl[index].up && !self.ctl[index].paused
    }

    /// Whether the stream towards `to` can be delivered now.
    fn stream_open(&self, direction: usize) -> bool {
        self.takes(1 - direction)
    }

    fn envelope_deliverable(&self, e: &Envelope) -> bool {
        match e {
            Envelope::Up { .. } => true,
            Envelope::Down { to, .. } => self.takes(*to),
        }
    }

    fn send(&mut self, e: Envelope) {
        let (index, to_down) = match &e {
            Envelope::Up { from, .. } => (*from, false),
            Envelope::Down { to, .. } => (*to, true),
        };
        if !self.mediator_link[index] || (to_down && !self.ctl[index].up) {
            return; // lost on the way
        }
        self.net.push(e);
        if !self.fifo {
            // A multiset: one state whatever the order of sending. Sorted by a fixed-key hash
            // (formatting each envelope to sort by its text cost an eighth of the check's time);
            // two envelopes whose hashes collide only cost a duplicate state, never a lost one.
            self.net.sort_by_cached_key(|e| {
                let mut h = std::hash::DefaultHasher::new();
                e.hash(&mut h);
                h.finish()
            });
        }
    }

    /// Sends `body` from controller `from` to the mediator now, stamped with its life.
    fn send_up(&mut self, from: usize, body: ToMediator) {
        let (life, sent) = (self.ctl[from].life, self.now);
        self.send(Envelope::Up { from, life, sent, delayed: false, body });
    }

    fn clear_streams(&mut self) {
        self.stream = [Vec::new(), Vec::new()];
        self.ctl[A].handshake = false;
        self.ctl[B].handshake = false;
    }

    /// The highest epoch of X issued anywhere (the mediator's record, the labels, the marks) that
    /// names another node than `node`. A higher epoch naming `node` itself (a raise that came
    /// twice, its second answer lost) deposes nothing: only `node` writes with it
    /// (`mediator_link.rs`).
    fn highest_issued_to_others(&self, node: u32) -> Epoch {
        let mediator = self.mediator.state().aggregates.get(&X).map(|r| from_decide(r.epoch));
        let marks = self.ctl.iter().flat_map(|c| [c.mark].into_iter().chain(c.owns));
        mediator.into_iter().chain(marks).filter(|e| e.owner.0 != node).fold(Epoch::default(), Epoch::max)
    }

    /// Acknowledges or fails the writes of `index` that can be decided (S1, S6).
    fn try_ack(&mut self, index: usize) {
        let now = self.now;
        let highest = self.highest_issued_to_others(self.ctl[index].node);
        let c = &mut self.ctl[index];
        if !c.up || c.paused {
            return;
        }
        let serving = c.confirmed && !c.away() && !c.lost_log && c.owns.is_some() && !c.quiesced();
        let mut kept = Vec::new();
        for p in std::mem::take(&mut c.pending) {
            let mirrored = c.ack_set.mirrored(c.acked, Lsn(p.lsn));
            if !serving {
                continue; // the write fails
            }
            let leased = !c.leased || c.lease.check(secs(now)).is_ok();
            if !mirrored {
                if leased {
                    kept.push(p);
                }
                continue;
            }
            // The lease check right before the acknowledgement (S6).
            if leased && !c.nvfailed {
                if c.owns.is_some_and(|e| e < highest) {
                    self.history.stale_ack = true;
                }
                self.history.acked.insert(p.write);
            }
        }
        c.pending = kept;
    }

    fn finish_drop(&mut self, index: usize) {
        let c = &mut self.ctl[index];
        c.dropping = None;
        c.ack_set.dropped = true;
        c.resync_from = None;
        if index == A {
            // The session in progress sees the drop and ends: the next handshake re-establishes.
            self.clear_streams();
        }
        self.try_ack(index);
    }

    fn report(&self, index: usize) -> decide::Report {
        let c = &self.ctl[index];
        let other = &self.ctl[1 - index];
        let now = self.now;
        let mode = match (index, c.owns) {
            _ if c.switchback.is_some() => decide::Mode::PartialSwitchback,
            _ if c.away() => decide::Mode::WaitingForSwitchback,
            (B, Some(_)) => decide::Mode::Switchover,
            _ => decide::Mode::Normal,
        };
        decide::Report {
            node: NodeId(c.node),
            log_generation: c.life,
            sequence: c.seq,
            state_version: c.mver,
            uptime: secs(now - c.started),
            mode,
            // A controller waiting for switchback stays fenced until heal (node.rs: `Phase::Fenced`).
            fenced: c.away() || !(c.confirmed && !c.lost_log && c.lease.clone().check(secs(now)).is_ok()),
            partners: vec![decide::PartnerView {
                node: NodeId(other.node),
                heard_age: Some(secs(now - c.heard.unwrap_or(c.started).max(c.started))),
                round_trip_age: c.round_trip.map(|t| secs(now - t)),
            }],
            // The daemon registers its aggregates (and so reports them) only once S8 decided on
            // a lost partition (`Node::recover`).
            owned: match c.owns {
                Some(e) if !c.away() && !c.lost_log => vec![decide::OwnedReport {
                    aggregate: X,
                    epoch: to_decide(e),
                    mirror: c.writer_state(),
                    receiver_generation: 1,
                    plexes_normal: c.remote_plex == RemotePlex::Normal,
                }],
                _ => Vec::new(),
            },
            received: vec![decide::ReceivedReport {
                writer: NodeId(other.node),
                partition_generation: 1,
                state: match c.rx_state {
                    nvlog::MirrorState::InSync => MirrorState::InSync,
                    nvlog::MirrorState::Resyncing => MirrorState::Resyncing,
                    _ => MirrorState::OutOfSync,
                },
            }],
            epochs_seen: vec![(X, to_decide(c.shown_epoch()))],
        }
    }

    /// The keepalive round trips both ways, and the writer's handshake (S6, S2, S8).
    fn keepalives(&mut self) {
        let now = self.now;
        if !(self.link && self.takes(A) && self.takes(B)) {
            // A keepalive missed: keepalive_timeout (one second) ends the writer's session; the
            // next contact starts with a hello, records in flight are lost.
            if self.ctl[A].handshake || !self.stream.iter().all(Vec::is_empty) {
                self.clear_streams();
            }
            return;
        }
        // The hello exchange is a round trip for the writer (S6), not for the receiver: its first
        // round trip of a session is a reply to its own keepalive, which comes on the stream
        // after what the writer's handshake sends (`mirror_receiver.rs`), so in the next second.
        let a = &self.ctl[A];
        let hello_now = !a.handshake && a.owns.is_some_and(|e| e.owner.0 == a.node) && !a.away();
        // A new session starts with the writer's hello, which the receiver answers only after
        // its S13 silence check (`mirror_receiver.rs`): silence long enough to matter always
        // ended the session first (keepalive_timeout < mirror_timeout − margin). Within a
        // session the receiver's keepalives come many times a second: no silence.
        if hello_now {
            self.receiver_silence(B);
        }
        // What the receiver's hello says of its account (before this round trip).
        let round_trip_since_start = self.ctl[B].round_trip.is_some();
        for me in [A, B] {
            let theirs = self.ctl[1 - me].shown_epoch();
            let c = &mut self.ctl[me];
            c.heard = Some(now);
            let round_trip = !(me == B && hello_now);
            if round_trip {
                c.round_trip = Some(now);
            }
            match c.owns {
                Some(held) if theirs > held && theirs.owner.0 != c.node => c.depose(theirs),
                _ => {
                    if round_trip {
                        c.lease.renew(secs(now), None);
                    }
                    // S2 without a mediator: the DR partner confirms the epoch.
                    if !c.leased {
                        c.confirmed = true;
                    }
                }
            }
        }
        // The writer's session: a hello the receiver admits starts it (S2); the receiver
        // returns our records it holds (S8: a lost local partition gets them back).
        let receiver = self.ctl[B].clone();
        let a = &mut self.ctl[A];
        if let Some(held) = a.owns
            && !a.handshake
            && !a.away()
            && held.owner.0 == a.node
        {
            if !admits(receiver.mark, held) {
                a.depose(receiver.mark);
                return;
            }
            a.handshake = true;
            // A drop still in progress is moot: this handshake re-establishes the mirror.
            a.dropping = None;
            // S8: the receiver returns our records it holds above our recovered tail, adopted
            // (a gap declared) before anything else (`NvlogWriter::adopt`).
            let returned: Vec<Rec> = receiver.rx.iter().filter(|r| r.lsn > a.last_lsn()).copied().collect();
            a.log.extend(returned.iter().copied());
            a.data.extend(returned.iter().map(|r| r.write));
            if a.lost_log {
                // S8: the partner's copy counts as complete only if its receiver holds the mirror
                // in sync and vouches for it, and (with a mediator) the mediator names the mirror
                // intact; otherwise the volumes are NVFAILed.
                let lost = receiver.rx_state != nvlog::MirrorState::InSync;
                a.copy_complete = Some(partner_copy_complete(lost, round_trip_since_start));
                a.settle_lost_log();
            }
            // §4.2, S13 (`nvlog_mirror::resume`): a receiver not in sync, or a drop persisted
            // here, re-establishes the mirror at our next lsn: the partner is back in the ack
            // set from there, and both sides hold it `resyncing` until a CP covers it.
            let dropped_here = a.writer_dropped || a.ack_set.dropped;
            let resume = match resume(
                Lsn(a.last_lsn()),
                Lsn(a.released),
                dropped_here,
                Lsn(receiver.rx_last),
                receiver.rx_state == nvlog::MirrorState::InSync,
                receiver.rx_state == nvlog::MirrorState::Resyncing,
            ) {
                Ok(resume) => resume,
                Err(_) => {
                    // No correct history gets here; the session fails and is retried.
                    self.history.refused_handshake = true;
                    self.clear_streams();
                    return;
                }
            };
            a.acked = a.acked.max(resume.acked);
            let mut out = Vec::new();
            if resume.release > Lsn(0) {
                out.push(StreamMsg::Release(resume.release.0));
            }
            if let Some(from) = resume.resync_from {
                a.writer_dropped = true;
                a.resync_from = Some(from.0);
                if a.ack_set.dropped {
                    a.ack_set = AckSet { dropped: false, floor: from };
                }
                out.push(StreamMsg::Resyncing(resume.start.0));
            }
            // Mirroring resumes above what the receiver holds.
            out.extend(a.log.iter().filter(|r| r.lsn >= resume.start.0).map(|r| StreamMsg::Record(*r)));
            self.stream[0].extend(out.into_iter().map(|m| (now, m)));
            self.announce_if_covered();
        }
    }

    /// The writer announces `in_sync` once a CP covers the point where it re-established the
    /// mirror (`nvlog_mirror::covers`), and persists it locally.
    fn announce_if_covered(&mut self) {
        let a = &mut self.ctl[A];
        let Some(from) = a.resync_from else { return };
        if covers(Lsn(a.released), Lsn(from)) {
            self.history.resynced = true;
            a.resync_from = None;
            a.writer_dropped = false;
            let released = a.released;
            if self.session_up() {
                self.stream[0].push((self.now, StreamMsg::InSync(released)));
            }
        }
    }

    /// A CP of A's records (DESIGN §4 step 5, `cp.rs`), when one is due: through the record
    /// below the first write still waiting, destaged to both plexes, recorded in the labels,
    /// then released locally and at the partner. While B's site cannot take the plex writes the
    /// CP waits; after `mirror_timeout` of silence B's plex is dropped (recorded by the mediator
    /// first, if there is one: S3) and the CP goes on with A's plex alone.
    fn cp(&mut self) {
        let now = self.now;
        let a = &self.ctl[A];
        if !self.cp_due || !a.can_serve(now) || a.owns.is_none_or(|e| e.owner.0 != a.node) {
            return;
        }
        let lsn = a.pending.iter().map(|p| p.lsn).min().map_or(a.last_lsn(), |first| first - 1);
        if lsn <= a.released {
            self.cp_due = false;
            return;
        }
        let remote = self.link && self.takes(B);
        if !remote && a.remote_plex == RemotePlex::Normal {
            let silent_for = now - a.heard.unwrap_or(a.started).max(a.started);
            if silent_for < ticks(timers().mirror_timeout) {
                return;
            }
            // `plex::Aggregate`: the drop is in A's labels and bitmap; `PartnerDrops`: B did
            // not record it (unreachable), S3's silence stands in; the mediator must record it.
            if a.leased {
                self.ctl[A].remote_plex = RemotePlex::Dropping;
                self.record_drop(A, true);
                return;
            }
            self.ctl[A].remote_plex = RemotePlex::Dropped;
        }
        let to_b = match self.ctl[A].remote_plex {
            RemotePlex::Normal => true,
            RemotePlex::Dropping => return,
            RemotePlex::Dropped => false,
        };
        let a = &self.ctl[A];
        let waiting: BTreeSet<u8> = a.pending.iter().map(|p| p.write).collect();
        let destaged: BTreeSet<u8> = a.data.difference(&waiting).copied().collect();
        for (i, c) in self.ctl.iter_mut().enumerate() {
            if i == B && !to_b {
                continue;
            }
            c.plex.extend(destaged.iter().copied());
            c.data.extend(destaged.iter().copied());
            c.plex_cp = lsn;
        }
        self.cp_due = false;
        let a = &mut self.ctl[A];
        a.released = lsn;
        a.log.retain(|r| r.lsn > lsn);
        if self.session_up() {
            self.stream[0].push((now, StreamMsg::Release(lsn)));
        }
        self.announce_if_covered();
    }

    /// Whether A's plex monitor can reattach B's dropped plex: A serves and B's disks answer.
    fn can_reattach(&self) -> bool {
        let a = &self.ctl[A];
        a.remote_plex == RemotePlex::Dropped
            && a.can_serve(self.now)
            && a.owns.is_some_and(|e| e.owner.0 == a.node)
            && self.link
            && self.takes(B)
    }

    /// The reattach and resync from the dirty bitmap (`plex_monitor.rs`), taken as one step:
    /// B's plex becomes a copy of A's, its labels too.
    fn resync_plex(&mut self) {
        let (plex, plex_cp) = (self.ctl[A].plex.clone(), self.ctl[A].plex_cp);
        let b = &mut self.ctl[B];
        b.data.extend(plex.iter().copied());
        b.plex = plex;
        b.plex_cp = plex_cp;
        self.ctl[A].remote_plex = RemotePlex::Normal;
        self.reattach_since = None;
        self.history.plex_resynced = true;
    }

    /// Whether B serves X switched over, and A answers waiting for switchback over the link:
    /// what `mcctl heal` and `mcctl switchback` need (`heal.rs`: `check_serving`, the partner's
    /// mode `waiting-for-switchback`).
    fn switched_over_and_home_waits(&self) -> bool {
        let (a, b) = (&self.ctl[A], &self.ctl[B]);
        b.can_serve(self.now)
            && b.owns.is_some_and(|e| e.owner.0 == b.node)
            && a.up
            && !a.paused
            && a.away()
            && self.link
    }

    /// Whether the operator's `mcctl heal` at B gets past its checks.
    fn can_heal(&self) -> bool {
        self.switched_over_and_home_waits() && !self.ctl[B].healed
    }

    /// `mcctl heal` at B (`heal.rs` `admin_heal`): A lists the extents its unreleased records
    /// touch, B marks them in its bitmap, A discards the records (S8; its CP releases them);
    /// then B reattaches A's plex by the generation rules (S5): if A's plex moved on alone (A
    /// dropped B's plex before it went away), both moved on, a split brain, refused; otherwise
    /// A's plex is resynced from B's (the marked regions included), taken as one step.
    fn heal(&mut self) {
        // `admin_heal_partner`: the caller's epoch must not be below A's mark (S2).
        if self.ctl[B].owns.is_none_or(|e| e < self.ctl[A].mark) {
            return;
        }
        let a = &mut self.ctl[A];
        if !a.discarded {
            a.released = a.last_lsn();
            a.log.clear();
            a.discarded = true;
        }
        if self.ctl[A].remote_plex != RemotePlex::Normal {
            return; // split brain (S5): nothing is merged
        }
        let (plex, plex_cp) = (self.ctl[B].plex.clone(), self.ctl[B].plex_cp);
        let a = &mut self.ctl[A];
        a.plex = plex;
        a.plex_cp = plex_cp;
        let b = &mut self.ctl[B];
        b.healed = true;
        b.remote_plex = RemotePlex::Normal;
    }

    /// Whether `mcctl switchback` at B gets past its vetoes (`evaluate_switchback`), or resumes
    /// one in progress.
    fn can_switch_back(&self) -> bool {
        let b = &self.ctl[B];
        match b.switchback {
            None => self.switched_over_and_home_waits() && b.healed && b.remote_plex == RemotePlex::Normal,
            // A re-run resumes: raising again, or handing X over (a reachable A takes it back).
            Some(_) => b.up && !b.paused && self.link && self.takes(A),
        }
    }

    /// `mcctl switchback` at B (`heal.rs` `run_switchback`): no new I/O, drain, a CP of
    /// everything B acknowledged to both plexes; then X's new epoch, A's (the mediator's, if
    /// there is one), persisted here before anything else (S2); then A takes X back.
    fn switch_back(&mut self) {
        let step = self.ctl[B].switchback;
        let new = match step {
            Some(SwitchbackStep::Raised(new)) => {
                self.take_back(new);
                return;
            }
            // Raised by a heartbeat reply meanwhile (the mediator's epoch deposed B): resumes at
            // the hand over, at the epoch B holds (`run_switchback`).
            Some(SwitchbackStep::Raising(new)) if self.ctl[B].mark >= new => {
                let new = raised_epoch(new, self.ctl[B].mark);
                self.ctl[B].switchback = Some(SwitchbackStep::Raised(new));
                self.take_back(new);
                return;
            }
            Some(SwitchbackStep::Raising(new)) => new,
            None => {
                let Some(held) = self.ctl[B].owns else { return };
                Epoch { number: held.number + 1, owner: plex::NodeId(NODES[A]) }
            }
        };
        // Step 1: the CP covers every write B acknowledged, on both plexes.
        let b = &mut self.ctl[B];
        let destaged = b.data.clone();
        b.plex.extend(destaged.iter().copied());
        b.released = b.last_lsn();
        b.log.clear();
        self.ctl[A].plex.extend(destaged.iter().copied());
        // Step 2: the new epoch.
        let b = &mut self.ctl[B];
        b.switchback = Some(SwitchbackStep::Raising(new));
        if b.leased {
            b.seq += 1;
            self.send_up(B, ToMediator::RaiseEpochs);
        } else {
            b.mark = b.mark.max(new);
            b.switchback = Some(SwitchbackStep::Raised(new));
            self.take_back(new);
        }
    }

    /// The mediator raised X's epoch for A (`mediator_epochs`): B persists it and hands X over.
    fn epoch_raised(&mut self, index: usize, r: &decide::Reply) {
        let Some(SwitchbackStep::Raising(planned)) = self.ctl[index].switchback else { return };
        let issued = r.epochs.iter().find(|(id, _)| *id == X).map(|(_, e)| from_decide(*e));
        let new = issued.filter(|e| e.owner.0 == NODES[A]).map_or(planned, |e| e.max(planned));
        let b = &mut self.ctl[index];
        b.mark = b.mark.max(new);
        b.switchback = Some(SwitchbackStep::Raised(new));
        if self.link && self.takes(A) {
            self.take_back(new);
        }
    }

    /// `Admin.TakeBack` at A, then B lets X go (`admin_take_back`, `run_switchback` step 4): A
    /// persists the epoch, opens X from both plexes (B's NVFAIL state with it: the volume table
    /// is on the plexes), completes a CP at the new epoch and serves; B's receiver takes A's
    /// records again.
    fn take_back(&mut self, new: Epoch) {
        let a = &self.ctl[A];
        if !(self.link && self.takes(A) && a.away() && a.discarded && new > a.mark) {
            return; // refused: not healed here, or not waiting; the switchback stays resumable
        }
        let nvfailed = self.ctl[B].nvfailed;
        let a = &mut self.ctl[A];
        a.mark = a.mark.max(new);
        a.owns = Some(new);
        a.deposed = false;
        a.discarded = false;
        a.lost_log = false;
        a.copy_complete = None;
        a.data = a.plex.clone();
        a.nvfailed = nvfailed;
        a.confirmed = true;
        a.remote_plex = RemotePlex::Normal;
        let released = a.released;
        for c in &mut self.ctl {
            c.plex_cp = released;
        }
        let b = &mut self.ctl[B];
        b.owns = None;
        b.deposed = false;
        b.healed = false;
        b.switchback = None;
        b.writer_dropped = false;
        b.ack_set = AckSet::default();
        b.pending.clear();
        b.dropping = None;
        b.resync_from = None;
        b.rx_gap_at = None;
        b.remote_plex = RemotePlex::Normal;
        // `MirrorReceiver::drop_held_records` (finding 9): A's records from before the
        // switchover go (`Nvlog::reset_partition`: the durable tail is 0, the release point
        // stays); then the receiver thaws.
        if controller::heal::drops_held_records() {
            b.rx.clear();
            b.rx_last = 0;
        }
        self.history.switched_away[A] = false;
        self.history.switched_back = true;
        self.history.disturbed = self.now;
    }

    fn tick(&mut self) {
        self.now += 1;
        let now = self.now;
        let mediator = self.ctl[A].leased;
        if mediator {
            let clock = self.mediator_clock();
            let before = state_hash(self.mediator.state());
            let actions = self.mediator.tick(clock);
            self.history.unpersisted |=
                state_hash(self.mediator.state()) != before && !actions.contains(&decide::Action::Persist);
        }
        self.keepalives();
        if self.now.is_multiple_of(CP_INTERVAL) {
            self.cp_due = true;
        }
        self.cp();
        // The plex monitor retries every half second: a plex it can reattach is resynced within
        // `PLEX_REATTACH` (earlier at the checker's choice, `Action::ResyncPlex`).
        if !self.can_reattach() {
            self.reattach_since = None;
        } else if let Some(since) = self.reattach_since {
            if now - since >= PLEX_REATTACH {
                self.resync_plex();
            }
        } else {
            self.reattach_since = Some(now);
        }
        for i in [A, B] {
            if !self.takes(i) {
                continue;
            }
            // The fence ticker latches a lapsed lease.
            let _ = self.ctl[i].lease.check(secs(now));
            self.receiver_silence(i);
            let c = &self.ctl[i];
            // S3: a drop in progress asks the mediator again (retried while writes stall), or,
            // without one, completes after mirror_timeout of silence.
            if c.dropping.is_some() {
                if mediator {
                    self.record_drop(i, false);
                } else {
                    self.drop_by_silence(i);
                }
            }
            if self.ctl[i].remote_plex == RemotePlex::Dropping {
                self.record_drop(i, true);
            }
            if !mediator {
                continue;
            }
            self.ctl[i].seq += 1;
            let report = self.report(i);
            self.send_up(i, ToMediator::Report(Box::new(report)));
        }
        for i in [A, B] {
            self.try_ack(i);
        }
    }

    /// S13: the receiver's own account of silence (`mirror_receiver::silence_marks_out_of_sync`).
    fn receiver_silence(&mut self, i: usize) {
        let t = timers();
        let now = self.now;
        let c = &mut self.ctl[i];
        let silence = secs(now - c.round_trip.unwrap_or(c.started).max(c.started));
        if c.owns.is_none()
            && c.up
            && !c.paused
            && silence_marks_out_of_sync(c.rx_state, silence, t.mirror_timeout - t.margin)
        {
            c.rx_state = nvlog::MirrorState::OutOfSync;
            // The writer is told on the stream (a state change), which ends its session.
            if i == B && self.session_up() {
                self.stream[1].push((now, StreamMsg::OutOfSync));
            }
        }
    }

    /// Whether a write of `index` has waited `mirror_timeout` and no drop runs yet (S3).
    fn mirror_timed_out(&self, index: usize) -> bool {
        let c = &self.ctl[index];
        let waited = c.pending.first().is_some_and(|p| self.now - p.since >= ticks(timers().mirror_timeout));
        self.takes(index) && c.owns.is_some() && !c.ack_set.dropped && c.dropping.is_none() && waited
    }

    /// The drop of `drop_partner` (S3): persisted locally first, then recorded by the mediator;
    /// `DropEvidence::complete` says when the partner leaves the ack set.
    fn start_drop(&mut self, index: usize) {
        if index == A && self.session_up() {
            self.stream[0].push((self.now, StreamMsg::Dropped));
        }
        let c = &mut self.ctl[index];
        c.writer_dropped = true;
        let evidence = DropEvidence {
            persisted_locally: true,
            recorded_by_mediator: false,
            partner_acknowledged: false,
            silent_for: Duration::ZERO,
        };
        c.dropping = Some(evidence);
        if evidence.complete(c.leased, timers().mirror_timeout) {
            self.finish_drop(index);
        } else if c.leased {
            self.record_drop(index, false);
        } else {
            self.drop_by_silence(index);
        }
    }

    /// S3 without a mediator: the drop completes once nothing was heard from the partner for
    /// `mirror_timeout` (silence counts only while this process runs).
    fn drop_by_silence(&mut self, index: usize) {
        let now = self.now;
        let c = &mut self.ctl[index];
        let silent_for = secs(now - c.heard.unwrap_or(c.started).max(c.started));
        if let Some(d) = &mut c.dropping {
            d.silent_for = silent_for;
            if d.complete(false, timers().mirror_timeout) {
                self.finish_drop(index);
            }
        }
    }

    fn record_drop(&mut self, index: usize, plex_only: bool) {
        let c = &mut self.ctl[index];
        c.seq += 1;
        let stamp = (c.life, c.seq);
        self.send_up(index, ToMediator::RecordDrop { stamp, plex_only });
    }

    /// Whether A's session with B's receiver is up: what A queues reaches the stream (a paused
    /// B takes it when it resumes; a keepalive missed meanwhile ends the session).
    fn session_up(&self) -> bool {
        self.ctl[A].handshake && self.link && self.ctl[B].up
    }

    fn write(&mut self, index: usize, id: u8) {
        let now = self.now;
        let link = self.session_up();
        let c = &mut self.ctl[index];
        let Some(epoch) = c.owns else { return };
        let rec = Rec { lsn: c.last_lsn() + 1, epoch, write: id };
        c.log.push(rec);
        c.data.insert(id);
        c.pending.push(Pending { lsn: rec.lsn, write: id, since: now });
        if index == A && link && !c.ack_set.dropped {
            self.stream[0].push((now, StreamMsg::Record(rec)));
        }
        self.try_ack(index);
    }

    fn stream_deliver(&mut self, direction: usize) {
        let now = self.now;
        let (_, msg) = self.stream[direction].remove(0);
        if direction == 0 && self.ctl[B].stalled {
            // Received, and queued for a store that does not get to it (`mirror_receiver.rs`).
            let b = &mut self.ctl[B];
            b.heard = Some(now);
            b.unstored = b.unstored.saturating_add(1);
            return;
        }
        match msg {
            StreamMsg::Record(r) => {
                let b = &mut self.ctl[B];
                b.heard = Some(now);
                if !admits(b.mark, r.epoch) {
                    let mark = b.mark;
                    self.stream[1].push((now, StreamMsg::Refused(mark)));
                    return;
                }
                if r.epoch < b.mark {
                    self.history.stale_accepted = true;
                }
                b.mark = b.mark.max(r.epoch);
                let tail = b.rx_tail();
                if r.lsn <= tail {
                    self.stream[1].push((now, StreamMsg::Ack(tail)));
                } else if r.lsn == tail + 1 || b.rx_gap_at == Some(r.lsn) {
                    b.rx.push(r);
                    b.rx_last = r.lsn;
                    b.rx_gap_at = None;
                    self.stream[1].push((now, StreamMsg::Ack(r.lsn)));
                } else {
                    // A gap: never acknowledged, out of sync (S13), and the writer is told.
                    b.rx_state = nvlog::MirrorState::OutOfSync;
                    self.stream[1].push((now, StreamMsg::OutOfSync));
                }
            }
            StreamMsg::Release(lsn) => {
                let b = &mut self.ctl[B];
                b.heard = Some(now);
                b.rx_released = b.rx_released.max(lsn);
                b.rx.retain(|r| r.lsn > lsn);
            }
            StreamMsg::Resyncing(start) => {
                // `mirror_receiver.rs`: the gap below the writer's restart point is allowed, and
                // `resyncing` persisted (S13).
                let b = &mut self.ctl[B];
                b.heard = Some(now);
                if start > b.rx_last + 1 {
                    if start <= b.rx_tail() {
                        // `allow_gap_at` refuses a point at or below the tail: the session fails.
                        self.history.refused_handshake = true;
                        self.clear_streams();
                        return;
                    }
                    b.rx_gap_at = Some(start);
                }
                self.announced(nvlog::MirrorState::Resyncing);
            }
            StreamMsg::InSync(_) => {
                self.ctl[B].heard = Some(now);
                self.announced(nvlog::MirrorState::InSync);
            }
            StreamMsg::Dropped => {
                self.ctl[B].heard = Some(now);
                if self.announced(nvlog::MirrorState::OutOfSync) {
                    self.stream[1].push((now, StreamMsg::OutOfSync));
                }
            }
            StreamMsg::OutOfSync => {
                let a = &mut self.ctl[A];
                a.heard = Some(now);
                let leased = a.leased;
                if let Some(d) = &mut a.dropping {
                    d.partner_acknowledged = true;
                    if d.complete(leased, timers().mirror_timeout) {
                        self.finish_drop(A);
                    }
                }
                self.clear_streams();
            }
            StreamMsg::Ack(lsn) => {
                let a = &mut self.ctl[A];
                a.heard = Some(now);
                a.acked = a.acked.max(Lsn(lsn));
                self.try_ack(A);
            }
            StreamMsg::Refused(theirs) => {
                let a = &mut self.ctl[A];
                a.heard = Some(now);
                if a.owns.is_some_and(|held| theirs > held && theirs.owner.0 != a.node) {
                    a.depose(theirs);
                }
                self.try_ack(A);
            }
        }
    }

    /// The receiver takes the writer's announcement (`mirror_receiver::announced_state`); one
    /// it refuses ends the session. Whether it was taken.
    fn announced(&mut self, announced: nvlog::MirrorState) -> bool {
        match announced_state(self.ctl[B].rx_state, announced) {
            Ok(state) => {
                self.ctl[B].rx_state = state;
                true
            }
            Err(_) => {
                self.clear_streams();
                false
            }
        }
    }

    fn deliver(&mut self, index: usize) {
        let now = self.now;
        let e = self.net.remove(index);
        match e {
            Envelope::Up { from, life, sent, body, .. } => {
                if !self.mediator_link[from] {
                    return;
                }
                let node = NodeId(self.ctl[from].node);
                let raise = body == ToMediator::RaiseEpochs;
                let (event, drop_request) = match body {
                    ToMediator::Report(r) => (decide::Event::Report(*r), None),
                    ToMediator::RecordDrop { stamp, plex_only } => {
                        (decide::Event::RecordDrop { node, aggregate: X, stamp, plex_only }, Some(plex_only))
                    }
                    ToMediator::ConfirmGrant => (decide::Event::ConfirmGrant { node }, None),
                    ToMediator::ManualSwitchover { override_in_sync } => {
                        (decide::Event::ManualSwitchover { node, override_in_sync }, None)
                    }
                    ToMediator::RaiseEpochs => (
                        decide::Event::RaiseEpochs {
                            node,
                            aggregates: vec![(X, NodeId(NODES[A]))],
                            reason: "switchback".into(),
                        },
                        None,
                    ),
                };
                let grants = self.mediator.state().grants.len();
                let before = state_hash(self.mediator.state());
                let actions = self.mediator.handle(self.mediator_clock(), event);
                // What a restart finds is what was persisted before the answer: every change must
                // come with `Persist` (the daemon writes the file before it answers).
                self.history.unpersisted |= state_hash(self.mediator.state()) != before
                    && !actions.contains(&decide::Action::Persist);
                if let Some(g) = self.mediator.state().grants.get(grants) {
                    self.history.granted_after_restart |= self.history.mediator_restarted;
                    // S14's truth: the grant moves X to `to`'s site from the other one.
                    let to = usize::from(g.to.0 == NODES[B]);
                    if self.history.switched_away[to] {
                        self.history.way_back = true;
                    }
                    self.history.switched_away[1 - to] = true;
                }
                if let Some(g) = self.mediator.state().grants.get(grants)
                    && g.automatic
                {
                    // S7's truth: every acknowledged write is in B's plex or its received records.
                    self.history.auso = true;
                    let b = &self.ctl[B];
                    let held: BTreeSet<u8> =
                        b.rx.iter().map(|r| r.write).chain(b.plex.iter().copied()).collect();
                    if !self.history.acked.is_subset(&held) {
                        self.history.auso_out_of_sync = true;
                    }
                }
                for action in actions {
                    let body = match action {
                        decide::Action::Reply(r) => match drop_request {
                            Some(plex_only) => ToCtl::DropRecorded { plex_only },
                            None if raise => ToCtl::Raised(r),
                            None => ToCtl::Reply(r),
                        },
                        decide::Action::Refuse { reason, .. } if raise => ToCtl::RaiseRefused(reason),
                        decide::Action::Refuse { reason, .. } => ToCtl::Refused(reason),
                        decide::Action::Persist | decide::Action::Alert(_) => continue,
                    };
                    self.send(Envelope::Down {
                        to: from,
                        life,
                        request_sent: sent,
                        sent: now,
                        delayed: false,
                        body,
                    });
                }
            }
            Envelope::Down { to, life, request_sent, body, .. } => {
                if !self.mediator_link[to] || self.ctl[to].life != life {
                    return;
                }
                match body {
                    ToCtl::Reply(r) => self.on_reply(to, request_sent, &r),
                    ToCtl::DropRecorded { plex_only: true } => {
                        if self.ctl[to].remote_plex == RemotePlex::Dropping {
                            self.ctl[to].remote_plex = RemotePlex::Dropped;
                            if to == A {
                                self.cp();
                            }
                        }
                    }
                    ToCtl::DropRecorded { plex_only: false } => {
                        let c = &mut self.ctl[to];
                        if let Some(d) = &mut c.dropping {
                            d.recorded_by_mediator = true;
                            if d.complete(true, timers().mirror_timeout) {
                                self.finish_drop(to);
                            }
                        }
                    }
                    ToCtl::Refused(_) => {}
                    ToCtl::Raised(r) => {
                        self.on_reply(to, request_sent, &r);
                        self.epoch_raised(to, &r);
                    }
                    ToCtl::RaiseRefused(_) => {
                        // `mediator_epochs` fails before anything moved: rolled back, served again.
                        if matches!(self.ctl[to].switchback, Some(SwitchbackStep::Raising(_))) {
                            self.ctl[to].switchback = None;
                        }
                    }
                }
            }
        }
    }

    /// A mediator reply: epochs (S2), lease (S6), confirmation (S2), grant (S7).
    fn on_reply(&mut self, index: usize, request_sent: u8, r: &decide::Reply) {
        let c = &mut self.ctl[index];
        c.mver = c.mver.max(r.state_version);
        let theirs = r.epochs.iter().find(|(id, _)| *id == X).map(|(_, e)| from_decide(*e));
        let above = matches!((c.owns, theirs), (Some(held), Some(e)) if e > held && e.owner.0 != c.node);
        if let (true, Some(theirs)) = (above, theirs) {
            c.depose(theirs);
        } else if !c.confirmed || c.lease.is_lapsed() {
            if !r.state_lost {
                c.lease.confirm(secs(request_sent), Some(r.lease));
                c.confirmed = true;
            }
        } else {
            c.lease.renew(secs(request_sent), Some(r.lease));
        }
        if !r.state_lost {
            c.mirror_intact = Some(r.mirror_intact.contains(&X));
            c.settle_lost_log();
        }
        if let Some(grant) = r.grant.clone()
            && grant.to.0 == c.node
        {
            self.apply_grant(index, &grant);
            self.send_up(index, ToMediator::ConfirmGrant);
        }
        self.try_ack(index);
    }

    /// `mcctl switchover --forced-on-disaster --confirmed` at `index` without a mediator: the
    /// controller's own vetoes (`switchover::plan`: the node serving, the partner unreachable,
    /// something to take over) and §9 (a)'s doubts (`switchover::sync_doubts`), each a soft veto
    /// that the override turns into NVFAIL; then the same steps as for a grant.
    fn confirmed_switchover(&mut self, index: usize, override_vetoes: bool) {
        let now = self.now;
        let t = timers();
        let c = &self.ctl[index];
        let other = &self.ctl[1 - index];
        // Without a mediator nothing fences the partner but its being down: the operator
        // confirms only what is true (a crashed partner; a paused or isolated one still serves
        // its hosts, which no controller can prevent without a lease, S6).
        if other.up {
            return;
        }
        let reachable = c.heard.is_some_and(|h| now - h < ticks(t.keepalive_timeout));
        let partners = other.owns.is_some_and(|e| e.owner.0 == other.node) || other.away();
        let serving = c.confirmed && !c.away() && c.owns.is_none();
        if reachable || !partners || !serving {
            return; // hard vetoes: partner reachable, nothing to switch over, node fenced
        }
        let round_trip = c.round_trip.filter(|r| *r >= c.started).map(|r| secs(now - r));
        let SyncDoubts { not_in_sync, unknown } = sync_doubts(
            Some(c.rx_state),
            round_trip,
            u64::from(c.unstored),
            t.mirror_timeout - t.margin,
            other.node,
        );
        let doubts = !not_in_sync.is_empty() || !unknown.is_empty();
        if doubts && !override_vetoes {
            return; // soft vetoes
        }
        let new = Epoch { number: self.ctl[index].shown_epoch().number + 1, owner: plex::NodeId(c.node) };
        let grant = decide::Grant {
            to: NodeId(c.node),
            from: decide::Site(u8::from(index == A)),
            epochs: vec![(X, to_decide(new))],
            automatic: false,
            nvfail: doubts,
        };
        if self.history.switched_away[index] {
            self.history.way_back = true;
        }
        self.history.switched_away[1 - index] = true;
        self.apply_grant(index, &grant);
    }

    /// The switchover at the granted epoch (DESIGN §11 steps 2–7, as `switchover.rs` runs them
    /// for a grant).
    fn apply_grant(&mut self, index: usize, grant: &decide::Grant) {
        let Some(new) = grant.epochs.iter().find(|(id, _)| *id == X).map(|(_, e)| from_decide(*e)) else {
            return;
        };
        let c = &mut self.ctl[index];
        if c.owns == Some(new) || !admits(c.mark, new) {
            return; // applied already (the grant is re-sent until confirmed)
        }
        // Steps 2–3: the epoch persisted, the receiver frozen (its mark is above the writer's).
        let frozen = c.mark;
        c.mark = c.mark.max(new);
        // Step 4: replay the partner's records above what the plex here holds, in lsn order
        // (`Nvlog::replay`, `nvlog::lsn_gaps`); step 5: NVFAIL per the grant (S7, S9) or the
        // replay's doubts (`switchover::replay_doubt`, S8).
        let floor = c.plex_cp;
        let start = c.rx_released.max(floor);
        let replayed: Vec<Rec> = c.rx.iter().filter(|r| r.lsn > start).copied().collect();
        let found = ReplayFound {
            receiver: c.rx_state,
            released: Lsn(c.rx_released),
            skipped_for_epoch: replayed.iter().filter(|r| r.epoch != frozen).count(),
            first_gap: lsn_gaps(Lsn(start), replayed.iter().map(|r| Lsn(r.lsn))).first().copied(),
        };
        let doubt = replay_doubt(&found, Lsn(floor), NODES[1 - index]);
        self.history.replay_gap |= found.first_gap.is_some();
        self.history.replay_doubted |= doubt.is_some() && !grant.nvfail;
        let mut last = start;
        for r in replayed.iter().filter(|r| r.epoch == frozen) {
            if r.lsn <= last {
                self.history.bad_replay = true;
            }
            c.data.insert(r.write);
            last = r.lsn;
        }
        c.nvfailed |= grant.nvfail || doubt.is_some();
        c.owns = Some(new);
        c.deposed = false;
        c.writer_dropped = true;
        c.ack_set.dropped = true;
        c.log.clear();
    }

    /// Every acknowledged write is at each controller that can serve X, unless NVFAILed there.
    pub fn acknowledged_writes_held(&self) -> bool {
        self.ctl
            .iter()
            .filter(|c| c.can_serve(self.now) && !c.nvfailed)
            .all(|c| self.history.acked.is_subset(&c.data))
    }

    /// Nothing is broken now: both controllers run, every link is up, no receiver is stalled.
    pub fn healthy(&self) -> bool {
        self.ctl.iter().all(|c| c.up && !c.paused && !c.stalled)
            && self.link
            && self.mediator_link == [true, true]
    }

    /// Every message of this second was delivered: the cluster is between two seconds.
    fn settled(&self) -> bool {
        let net =
            self.net.iter().any(|e| self.envelope_deliverable(e) && (!e.delayed() || e.sent() < self.now));
        let stream = (0..2).any(|d| self.stream_open(d) && !self.stream[d].is_empty());
        !net && !stream && ![A, B].into_iter().any(|i| self.mirror_timed_out(i))
    }

    /// Bounded liveness: once nothing is broken, `RECOVERY` seconds after the last fault, repair
    /// or operator command some controller serves X (NVFAILed or not: clearing NVFAIL is the
    /// operator's).
    pub fn recovered(&self) -> bool {
        // A switchback that stopped half-way waits for the operator's re-run (`heal.rs`).
        let due = self.healthy()
            && self.settled()
            && self.now >= self.history.disturbed.saturating_add(RECOVERY)
            && self.ctl.iter().all(|c| c.switchback.is_none());
        !due || self.ctl.iter().any(|c| c.can_serve(self.now))
    }

    /// Bounded liveness: once nothing is broken, `RESYNC` seconds after the last fault, repair
    /// or operator command, unless X is switched over (until heal and switchback), the NVLog mirror is in sync again: at the writer, at the receiver and (with a mediator)
    /// in its record.
    pub fn in_sync_again(&self) -> bool {
        let due = self.healthy()
            && self.settled()
            && self.now >= self.history.disturbed.saturating_add(RESYNC)
            && self.history.switched_away == [false, false];
        let a = &self.ctl[A];
        let mediator = !a.leased || self.mediator.state().aggregates.get(&X).is_some_and(|r| r.in_sync());
        !due || (a.writer_state() == MirrorState::InSync
            && a.remote_plex == RemotePlex::Normal
            && self.ctl[B].rx_state == nvlog::MirrorState::InSync
            && mediator)
    }

    /// At most one controller can acknowledge for X.
    pub fn one_writer(&self) -> bool {
        !(self.ctl[A].can_serve(self.now) && self.ctl[B].can_serve(self.now))
    }

    /// One line per controller and the mediator's record, for traces.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for c in &self.ctl {
            let process = if !c.up {
                "down"
            } else if c.paused {
                "paused"
            } else {
                "up"
            };
            let lease = if c.lease.is_lapsed() {
                "lapsed"
            } else if c.lease.clone().check(secs(self.now)).is_ok() {
                "valid"
            } else {
                "expired"
            };
            let _ = writeln!(
                out,
                "    node {} {process}: owns {} mark {}{}{}, lease {lease}, confirmed {}, serving {}, log {:?} \
                 (released {}, mirror {:?}), received {:?} ({:?}, released {}), plex {:?} (CP {}), data {:?}, \
                 acked-by-partner {}, waiting {:?}{}{}{}{}",
                c.node,
                c.owns.map_or("-".to_string(), |e| format!("{}@{}", e.number, e.owner.0)),
                c.mark.number,
                if c.deposed { ", deposed" } else { "" },
                if c.nvfailed { ", NVFAILED" } else { "" },
                c.confirmed,
                c.can_serve(self.now),
                c.log.iter().map(|r| (r.lsn, r.write)).collect::<Vec<_>>(),
                c.released,
                c.writer_state(),
                c.rx.iter().map(|r| r.lsn).collect::<Vec<_>>(),
                c.rx_state,
                c.rx_released,
                c.plex,
                c.plex_cp,
                c.data,
                c.acked.0,
                c.pending.iter().map(|p| p.write).collect::<Vec<_>>(),
                if c.ack_set.dropped { ", partner dropped" } else { "" },
                match c.remote_plex {
                    RemotePlex::Normal => String::new(),
                    other => format!(", partner's plex {other:?}"),
                },
                if c.stalled {
                    format!(", receiver stalled ({} unstored)", c.unstored)
                } else {
                    String::new()
                },
                match (c.healed, c.discarded, c.switchback) {
                    (_, _, Some(step)) => format!(", switchback {step:?}"),
                    (true, _, None) => ", healed".to_string(),
                    (_, true, None) => ", records discarded by heal".to_string(),
                    _ => String::new(),
                },
            );
        }
        if let Some(r) = self.mediator.state().aggregates.get(&X) {
            let _ = writeln!(
                out,
                "    mediator{}: X at {}@{}, in sync {}, mirror intact {}, grants {}; link A-B {}, mediator links {:?}; \
                 acknowledged {:?}",
                if self.mediator.is_lost() { " (state lost, rebuilding)" } else { "" },
                r.epoch.number,
                r.epoch.owner.0,
                r.in_sync(),
                r.mirror_intact,
                self.mediator.state().grants.len(),
                if self.link { "up" } else { "cut" },
                self.mediator_link,
                self.history.acked
            );
        } else {
            let lost = if self.mediator.is_lost() { " (state lost, rebuilding)" } else { "" };
            let _ =
                writeln!(out, "    mediator{lost}: no record of X; acknowledged {:?}", self.history.acked);
        }
        out
    }
}

impl ClusterModel {
    fn faults(&self, s: &State, actions: &mut Vec<Action>) {
        let b = &self.bounds;
        if s.faults_left == 0 {
            return;
        }
        for i in [A, B] {
            if b.crash && s.ctl[i].up {
                actions.push(Action::Fault(Fault::Crash(i)));
            }
            if b.pause && s.takes(i) {
                actions.push(Action::Fault(Fault::Pause(i)));
            }
            if b.cut_mediator && s.mediator_link[i] {
                actions.push(Action::Fault(Fault::CutMediator(i)));
            }
        }
        if b.lose_nvlog && s.ctl[A].up {
            actions.push(Action::Fault(Fault::CrashLosingNvlog));
        }
        if b.restart_mediator && b.mediator {
            for found in [MediatorRestart::Intact, MediatorRestart::Lost, MediatorRestart::Snapshot] {
                actions.push(Action::Fault(Fault::RestartMediator(found)));
            }
        }
        if b.stall && !s.ctl[B].stalled && s.ctl[B].up {
            actions.push(Action::Fault(Fault::Stall));
        }
        if b.cut_link {
            actions.push(Action::Fault(if s.link { Fault::CutLink } else { Fault::HealLink }));
        }
        for (i, e) in s.net.iter().enumerate() {
            if b.lose {
                actions.push(Action::Fault(Fault::Lose(i)));
            }
            if b.duplicate {
                actions.push(Action::Fault(Fault::Duplicate(i)));
            }
            if b.delay && !e.delayed() {
                actions.push(Action::Fault(Fault::Delay(i)));
            }
        }
    }

    fn fault(s: &mut State, fault: Fault) {
        s.faults_left -= 1;
        s.history.faulted = true;
        s.history.disturbed = s.now;
        match fault {
            Fault::Crash(i) => crash(s, i),
            Fault::CrashLosingNvlog => {
                crash(s, A);
                let a = &mut s.ctl[A];
                a.log.clear();
                // What the plex here holds stays; the new log's lsns start above the last CP
                // its labels record (`lsn_floor`), which counts as released.
                a.data = a.plex.clone();
                a.released = a.plex_cp;
                a.lost_log = true;
                // The drop or resync recorded in the lost partition's header is gone with it.
                a.writer_dropped = false;
            }
            Fault::Pause(i) => s.ctl[i].paused = true,
            Fault::Stall => s.ctl[B].stalled = true,
            Fault::CutLink => {
                s.link = false;
                s.clear_streams();
            }
            Fault::HealLink => s.link = true,
            Fault::CutMediator(i) => s.mediator_link[i] = false,
            Fault::RestartMediator(found) => s.restart_mediator(found),
            Fault::Lose(i) => {
                s.net.remove(i);
            }
            Fault::Delay(i) => match &mut s.net[i] {
                Envelope::Up { delayed, .. } | Envelope::Down { delayed, .. } => *delayed = true,
            },
            Fault::Duplicate(i) => {
                let e = s.net[i].clone();
                s.send(e);
            }
        }
    }
}

fn crash(s: &mut State, i: usize) {
    s.ctl[i].up = false;
    s.ctl[i].paused = false;
    if i == A {
        // The CP running dies with the process; the next comes at the next interval.
        s.cp_due = false;
    }
    s.clear_streams();
    s.net.retain(|e| !matches!(e, Envelope::Down { to, .. } if *to == i));
}

/// The epoch a resumed switchback hands X over at: the planned one, or the higher one naming A
/// that this node holds (`run_switchback`).
fn raised_epoch(planned: Epoch, mark: Epoch) -> Epoch {
    if mark.owner == planned.owner { planned.max(mark) } else { planned }
}

fn restart(s: &mut State, i: usize) {
    let now = s.now;
    s.history.switchback_restarted |= s.ctl[i].switchback.is_some();
    let c = &mut s.ctl[i];
    c.up = true;
    c.life += 1;
    c.started = now;
    c.lease = Lease::new(timers().lease);
    c.confirmed = false;
    c.deposed = false;
    c.handshake = false;
    c.resync_from = None;
    c.rx_gap_at = None;
    c.acked = Lsn(0);
    c.ack_set = AckSet { dropped: c.writer_dropped, floor: Lsn(0) };
    c.pending.clear();
    c.dropping = None;
    c.seq = 0;
    c.heard = None;
    c.round_trip = None;
    c.stalled = false;
    c.unstored = 0;
    c.copy_complete = None;
    c.mirror_intact = None;
    // `heal::settle_at_start`: a switchback interrupted before it raised the epoch here is
    // rolled back (served again) unless the mediator may hold the epoch (then it stays, X
    // quiesced: `held_by_switchback`); one that raised it stays for a re-run.
    if let Some(SwitchbackStep::Raising(new)) = c.switchback {
        let raised = c.mark >= new;
        c.switchback = if raised {
            Some(SwitchbackStep::Raised(raised_epoch(new, c.mark)))
        } else if controller::heal::rolled_back_at_start(false, c.leased, true) {
            None
        } else {
            Some(SwitchbackStep::Raising(new))
        };
    }
    // The drop is in the labels; the hook that waited for its records died with the process.
    // The restarted node's reports say its plexes are not normal before it may serve (S2).
    if c.remote_plex == RemotePlex::Dropping {
        c.remote_plex = RemotePlex::Dropped;
    }
}

impl Model for ClusterModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.initial()]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        // Time passes once every message sent before this second was delivered or lost
        // (a paused process takes its messages when it resumes).
        for i in [A, B] {
            if s.mirror_timed_out(i) {
                actions.push(Action::MirrorTimeout(i));
            }
        }
        if s.now < self.bounds.horizon && s.settled() {
            actions.push(Action::Tick);
        }
        if s.writes_left > 0 {
            for i in [A, B] {
                if s.ctl[i].can_serve(s.now) && !s.ctl[i].nvfailed {
                    actions.push(Action::Write(i));
                }
            }
        }
        let mut deliveries = Vec::new();
        for (i, e) in s.net.iter().enumerate() {
            let held = s.fifo && e.delayed() && e.sent() == s.now;
            if s.envelope_deliverable(e) && !held && (i == 0 || s.net[i - 1] != *e) {
                deliveries.push(Action::Deliver(i));
            }
        }
        for d in 0..2 {
            if s.stream_open(d) && !s.stream[d].is_empty() {
                deliveries.push(Action::Stream(d));
            }
        }
        if s.fifo {
            deliveries.truncate(1);
        }
        actions.extend(deliveries);
        self.faults(s, actions);
        for i in [A, B] {
            if !s.ctl[i].up {
                actions.push(Action::Restart(i));
            }
            if s.ctl[i].paused {
                actions.push(Action::Resume(i));
            }
        }
        if s.can_reattach() {
            actions.push(Action::ResyncPlex);
        }
        if self.bounds.switchback {
            if s.can_heal() {
                actions.push(Action::Heal);
            }
            if s.switchbacks_left > 0 && s.can_switch_back() {
                actions.push(Action::Switchback);
            }
        }
        if s.switchovers_left > 0 {
            for at in [A, B] {
                if s.takes(at) {
                    actions.push(Action::ManualSwitchover { at, override_in_sync: false });
                    actions.push(Action::ManualSwitchover { at, override_in_sync: true });
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::Tick => s.tick(),
            Action::Write(i) => {
                let id = self.bounds.writes - s.writes_left + 1;
                s.writes_left -= 1;
                s.write(i, id);
            }
            Action::Stream(d) => s.stream_deliver(d),
            Action::MirrorTimeout(i) => s.start_drop(i),
            Action::Deliver(i) => s.deliver(i),
            Action::Fault(f) => ClusterModel::fault(&mut s, f),
            Action::Restart(i) => {
                s.history.disturbed = s.now;
                restart(&mut s, i);
            }
            Action::Resume(i) => {
                s.history.disturbed = s.now;
                s.ctl[i].paused = false;
                s.try_ack(i);
            }
            Action::ResyncPlex => s.resync_plex(),
            Action::Heal => {
                s.history.disturbed = s.now;
                s.heal();
            }
            Action::Switchback => {
                s.switchbacks_left -= 1;
                s.history.disturbed = s.now;
                s.switch_back();
            }
            Action::ManualSwitchover { at, override_in_sync } if !s.ctl[at].leased => {
                s.switchovers_left -= 1;
                s.history.disturbed = s.now;
                s.confirmed_switchover(at, override_in_sync);
            }
            Action::ManualSwitchover { at, override_in_sync } => {
                s.switchovers_left -= 1;
                s.history.disturbed = s.now;
                s.send_up(at, ToMediator::ManualSwitchover { override_in_sync });
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(ACKED_WRITES_HELD, |_, s: &State| s.acknowledged_writes_held()),
            Property::always(ONE_WRITER, |_, s: &State| s.one_writer()),
            Property::always(NO_AUSO_OUT_OF_SYNC, |_, s: &State| !s.history.auso_out_of_sync),
            Property::always(NO_STALE_EPOCH, |_, s: &State| {
                !s.history.stale_accepted && !s.history.stale_ack
            }),
            Property::always(REPLAY_IN_ORDER, |_, s: &State| !s.history.bad_replay),
            Property::always(NO_WAY_BACK, |_, s: &State| !s.history.way_back),
            Property::always(RECOVERS, |_, s: &State| s.recovered()),
            Property::always(IN_SYNC_AGAIN, |_, s: &State| s.in_sync_again()),
            Property::always(HANDSHAKES_RESUME, |_, s: &State| !s.history.refused_handshake),
            Property::always(MEDIATOR_PERSISTS, |_, s: &State| !s.history.unpersisted),
            Property::sometimes(SOME_WRITE_ACKNOWLEDGED, |_, s: &State| !s.history.acked.is_empty()),
            Property::sometimes(SOME_AUSO, |_, s: &State| s.history.auso && !s.history.acked.is_empty()),
            Property::sometimes(REPLAY_GAP, |_, s: &State| s.history.replay_gap),
            Property::sometimes(REPLAY_DOUBT, |_, s: &State| s.history.replay_doubted),
            Property::sometimes(SOME_RESYNC, |_, s: &State| {
                s.history.resynced && s.ctl[B].rx_state == nvlog::MirrorState::InSync
            }),
            Property::sometimes(SOME_PLEX_RESYNC, |_, s: &State| s.history.plex_resynced),
            Property::sometimes(SOME_SWITCHBACK, |_, s: &State| {
                s.history.switched_back && s.ctl[A].can_serve(s.now) && !s.history.acked.is_empty()
            }),
            Property::sometimes(SOME_SWITCHBACK_RESUMED, |_, s: &State| {
                s.history.switched_back && s.history.switchback_restarted && s.ctl[A].can_serve(s.now)
            }),
            Property::sometimes(SOME_SWITCHBACK_IN_SYNC, |_, s: &State| {
                s.history.switched_back
                    && s.ctl[A].writer_state() == MirrorState::InSync
                    && s.ctl[B].rx_state == nvlog::MirrorState::InSync
                    && s.ctl[A].can_serve(s.now)
            }),
            Property::sometimes(SOME_GRANT_AFTER_RESTART, |_, s: &State| s.history.granted_after_restart),
            Property::sometimes(SOME_RECOVERY, |_, s: &State| {
                s.history.faulted && s.healthy() && s.now >= s.history.disturbed.saturating_add(RECOVERY)
            }),
        ]
    }

    fn within_boundary(&self, s: &State) -> bool {
        s.now <= self.bounds.horizon
    }
}

/// Every acknowledged write is held where X can be served, unless NVFAILed (S1, S3, S8, S9).
pub const ACKED_WRITES_HELD: &str = "acknowledged writes are never lost without NVFAIL";
/// Two controllers never acknowledge for X at once (S2, S6).
pub const ONE_WRITER: &str = "one writer per aggregate";
/// No AUSO while not in sync (S7).
pub const NO_AUSO_OUT_OF_SYNC: &str = "no automatic switchover out of sync";
/// No stale epoch admitted or acknowledged at (S2).
pub const NO_STALE_EPOCH: &str = "no stale epoch accepted";
/// Replay once, in order (S8).
pub const REPLAY_IN_ORDER: &str = "replay in lsn order, once";
/// No switchover back to a site whose aggregates were switched over, before heal and
/// switchback (S14).
pub const NO_WAY_BACK: &str = "no way back without heal";
/// Bounded liveness: `RECOVERY` seconds after the last fault, repair or operator command, with
/// everything up, X is served.
pub const RECOVERS: &str = "X is served again once faults stop";
/// The seconds `RECOVERS` allows: a restarted controller confirms its epoch at its first
/// heartbeat (1 s) and a lost partition is adopted at the first keepalive (1 s); one more for
/// a reply in flight.
pub const RECOVERY: u8 = 3;
/// Bounded liveness: `RESYNC` seconds after the last fault, repair or operator command, with
/// everything up and no switchover, the mirror is in sync again (a CP covered the resync).
pub const IN_SYNC_AGAIN: &str = "X's mirror returns to in sync once faults stop";
/// The seconds `IN_SYNC_AGAIN` allows: the handshake at the first keepalive, a write that
/// waited for the partner acknowledged in the same second, the next CP (at most `CP_INTERVAL`
/// later) covers the restart point, the receiver's report of it one second later, and one for
/// a reply in flight.
pub const RESYNC: u8 = CP_INTERVAL + 4;
/// The mirror's handshake never finds the partner ahead of the writer.
pub const HANDSHAKES_RESUME: &str = "every mirror handshake resumes";
/// The mediator persists every change of its state before it answers (what a restart relies
/// on).
pub const MEDIATOR_PERSISTS: &str = "the mediator persists every change of its state";
/// Every property checked in every state.
pub const SAFETY: [&str; 10] = [
    ACKED_WRITES_HELD,
    ONE_WRITER,
    NO_AUSO_OUT_OF_SYNC,
    NO_STALE_EPOCH,
    REPLAY_IN_ORDER,
    NO_WAY_BACK,
    RECOVERS,
    IN_SYNC_AGAIN,
    HANDSHAKES_RESUME,
    MEDIATOR_PERSISTS,
];
/// Vacuity: some write is acknowledged.
pub const SOME_WRITE_ACKNOWLEDGED: &str = "a write is acknowledged";
/// Vacuity: an automatic switchover happens after an acknowledged write.
pub const SOME_AUSO: &str = "an automatic switchover happens";
/// Unreachable, asserted by the checks: a switchover's replay meets a gap in the partner's
/// records. The writer's release comes before its records on every stream, so the receiver's
/// copy is contiguous above its release point, and that point is never above the last CP the
/// plex here records (CP labels are written before the release). The replay's gap rule is a
/// third line, behind the grant's in-sync rules, for faults below the log (docs/safety.md).
pub const REPLAY_GAP: &str = "a switchover's replay meets a gap";
/// Unreachable, asserted by the checks: a switchover whose grant did not NVFAIL finds the
/// partner's copy doubtful at replay (`switchover::replay_doubt`): the grant's in-sync rules
/// (S7, §9 (a)) already refuse or NVFAIL every such copy.
pub const REPLAY_DOUBT: &str = "a switchover's replay doubts a copy its grant vouched for";
/// Vacuity: a mirror re-established after a fault is in sync again at both ends.
pub const SOME_RESYNC: &str = "a re-established mirror is in sync again";
/// Vacuity: a plex dropped while B's site could not take A's CP is resynced.
pub const SOME_PLEX_RESYNC: &str = "a dropped plex is resynced";
/// Vacuity: a switchback handed X back to A, which serves it, after an acknowledged write.
pub const SOME_SWITCHBACK: &str = "a switchback hands X back";
/// Vacuity: a switchback that met a restart of its node is re-run and hands X back.
pub const SOME_SWITCHBACK_RESUMED: &str = "a switchback interrupted by a restart hands X back";
/// Vacuity: after a switchback A's mirror to B is in sync again at both ends.
pub const SOME_SWITCHBACK_IN_SYNC: &str = "the mirror is in sync again after a switchback";
/// Vacuity: a restarted mediator grants a switchover.
pub const SOME_GRANT_AFTER_RESTART: &str = "a restarted mediator grants a switchover";
/// Vacuity: `RECOVERS` is due in some state after a fault.
pub const SOME_RECOVERY: &str = "the cluster is whole again after a fault";

/// A counterexample as a readable trace: each step, then the lines of the state it changed.
pub fn trace(path: stateright::Path<State, Action>) -> String {
    let mut out = String::new();
    let steps = path.into_vec();
    let Some((first, _)) = steps.first() else { return out };
    let _ = writeln!(out, "t=0 initial state\n{}", first.summary());
    for pair in steps.windows(2) {
        let [(before, Some(action)), (after, _)] = pair else { continue };
        let _ = writeln!(out, "t={} {}", before.now, describe(before, action));
        let old = before.summary();
        for line in after.summary().lines().filter(|line| !old.lines().any(|o| o == *line)) {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

fn describe(s: &State, action: &Action) -> String {
    let name = |i: usize| ["A", "B"][i];
    match action {
        Action::Tick => "one second passes: heartbeats, keepalives, timers".into(),
        Action::Write(i) => format!("host write at {}", name(*i)),
        Action::MirrorTimeout(i) => format!("{}: a write waited mirror_timeout, the drop starts", name(*i)),
        Action::Stream(d) => match s.stream[*d].first() {
            Some((_, m)) => format!("stream {} delivers {m:?}", ["A→B", "B→A"][*d]),
            None => "stream delivers nothing".into(),
        },
        Action::Deliver(i) => match s.net.get(*i) {
            Some(Envelope::Up { from, body, .. }) => {
                let what = match body {
                    ToMediator::Report(r) => format!(
                        "report (fenced {}, owns {:?}, receiver {:?}, heard partner {:?} ago)",
                        r.fenced,
                        r.owned.iter().map(|o| (o.epoch.number, o.mirror)).collect::<Vec<_>>(),
                        r.received.first().map(|x| x.state),
                        r.partners.first().and_then(|p| p.heard_age)
                    ),
                    other => format!("{other:?}"),
                };
                format!("mediator receives from {}: {what}", name(*from))
            }
            Some(Envelope::Down { to, body, request_sent, .. }) => {
                let what = match body {
                    ToCtl::Reply(r) => format!(
                        "reply to the request sent at t={request_sent} (epochs {:?}, grant {:?}, state lost {})",
                        r.epochs.iter().map(|(_, e)| (e.number, e.owner.0)).collect::<Vec<_>>(),
                        r.grant.as_ref().map(|g| (g.automatic, g.nvfail)),
                        r.state_lost
                    ),
                    other => format!("{other:?}"),
                };
                format!("{} receives from the mediator: {what}", name(*to))
            }
            None => "nothing".into(),
        },
        Action::Fault(f) => format!("FAULT {f:?}"),
        Action::Restart(i) => format!("{} restarts", name(*i)),
        Action::Resume(i) => format!("{} resumes", name(*i)),
        Action::ResyncPlex => "A's plex monitor reattaches B's plex and resyncs it".into(),
        Action::Heal => {
            "operator at B: heal (A discards its records, A's plex reattached and resynced)".into()
        }
        Action::Switchback => match s.ctl[B].switchback {
            None => "operator at B: switchback".into(),
            Some(step) => format!("operator at B: switchback re-run ({step:?})"),
        },
        Action::ManualSwitchover { at, override_in_sync } => {
            format!(
                "operator at {}: forced switchover to it (override in-sync: {override_in_sync})",
                name(*at)
            )
        }
    }
}

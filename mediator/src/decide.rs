//! The mediator's decisions (DESIGN §10; S2, S3, S6, S7, S11, S13): a sans-IO state machine.
//! Events and the mediator's own monotonic time go in (`Mediator::handle`); actions come out
//! (persist the state, reply with lease and epochs, grant, refuse, alert). The daemon does the
//! I/O; a model checker (issue 11) can drive the same code.
//!
//! What the rules are, as implemented here (numbers as in DESIGN §10):
//! 1. every applied report is answered with the lease, the current epochs and the state
//!    version; reports older than one applied (per node, by `(log generation, sequence)`) are
//!    ignored and not answered, so a delayed old report never renews a lease;
//! 2. an automatic switchover (AUSO) of site X to site Y is granted on a report of Y only when
//!    all hold: with `T` the later of the last time the mediator heard from any controller of X
//!    and the last time Y heard from X (its report's age, subtracted from the receipt time),
//!    `now − T ≥ lease + margin` and `now − T ≤ auso_window`; every aggregate owned by X is in
//!    sync in the record (owner and receiver both said `in_sync` for the same partition
//!    generation at the current epoch, both plexes normal, no drop since); no controller of Y is
//!    in takeover or fenced; not observer mode; the state is not lost. The grant raises the
//!    epochs (above every one recorded or reported) and is persisted before it is sent; it is
//!    re-sent on every reply to Y until Y confirms it. A manual forced switchover is granted
//!    under the same lease conditions without the window; only its in-sync condition may be
//!    overridden, and then the grant says NVFAIL;
//! 3. any report may lower an aggregate's state: an owner or receiver not `in_sync`, a plex
//!    not normal, a recorded drop all clear the in-sync record (AUSO stays off until both
//!    report `in_sync` again, after the resync); a recorded drop, a new epoch or a lost state
//!    also ends the mirror's being intact (in sync since, no drop since), which only in sync
//!    again restores; replies name the intact mirrors, for an owner that lost its NVLog (S8);
//! 5. a mediator without its state (lost, corrupt, or older than a state version a controller
//!    reports) grants nothing until every configured controller has reported since (or an
//!    operator confirmed the missing ones down), learns the highest epochs from the reports, and
//!    holds nothing in sync until the owner and the receiver report again. A restarted mediator
//!    is in that rebuild whatever file it read (`Mediator::restart`): it cannot tell its own
//!    last state from an older copy restored over it while the only controllers that saw newer
//!    versions are silent (found by the model check, docs/safety.md finding 8). A report of a
//!    newer version than the state's clears every record, in the rebuild too;
//! 6. observer mode never grants an automatic switchover (manual grants, records and epochs
//!    work as usual);
//! 7. `diagnose` tells "site lost", "inter-site link lost" and "mediator link lost" apart.
//!
//! Invariants: an epoch issued is above every epoch recorded or reported (S2); a state change
//! is followed by `Action::Persist` before any reply that depends on it; a grant is final.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::model_breaks::{Break, active};

/// The mediator's monotonic time, since it started (the daemon passes it in).
pub type Now = Duration;

/// A controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u32);

/// A site: 0 is A, 1 is B.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Site(pub u8);

/// An aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AggregateId(pub [u8; 16]);

/// An aggregate's epoch (S2): ordered by number, then owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch {
    /// Raised by every change of owner.
    pub number: u64,
    /// The controller that holds it.
    pub owner: NodeId,
}

/// The timers of DESIGN §10.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Timers {
    /// Stream keepalive timeout between the sites.
    pub keepalive_timeout: Duration,
    /// Heartbeat interval of the controllers.
    pub heartbeat: Duration,
    /// The lease a completed heartbeat round trip gives (S6).
    pub lease: Duration,
    /// Clock and delivery slack.
    pub margin: Duration,
    /// SyncMirror's timeout (§4.1).
    pub mirror_timeout: Duration,
    /// AUSO happens within this of the instant the partner site went silent, or not at all.
    pub auso_window: Duration,
}

impl Timers {
    /// The defaults of DESIGN §10.1.
    pub const DEFAULT: Timers = Timers {
        keepalive_timeout: Duration::from_secs(3),
        heartbeat: Duration::from_secs(1),
        lease: Duration::from_secs(10),
        margin: Duration::from_secs(1),
        mirror_timeout: Duration::from_secs(30),
        auso_window: Duration::from_secs(30),
    };

    /// The scaled test profile of DESIGN §10.1.
    pub const SCALED: Timers = Timers {
        keepalive_timeout: Duration::from_millis(600),
        heartbeat: Duration::from_millis(200),
        lease: Duration::from_secs(2),
        margin: Duration::from_millis(500),
        mirror_timeout: Duration::from_secs(5),
        auso_window: Duration::from_secs(5),
    };

    /// The order of S11 (DESIGN §10.1), each violation named.
    pub fn validate(&self) -> Result<(), String> {
        let t = self;
        let mut wrong = Vec::new();
        if t.margin.is_zero() {
            wrong.push("margin must be above 0".to_string());
        }
        if t.mirror_timeout < Duration::from_secs(1) {
            wrong.push(format!("mirror_timeout {:?} must be at least 1 s", t.mirror_timeout));
        }
        if t.keepalive_timeout >= t.lease {
            wrong.push(format!(
                "keepalive timeout {:?} must be below lease {:?}",
                t.keepalive_timeout, t.lease
            ));
        }
        if t.keepalive_timeout + t.margin >= t.mirror_timeout.saturating_sub(t.margin) {
            wrong.push(format!(
                "keepalive timeout + margin ({:?}) must be below mirror_timeout − margin ({:?})",
                t.keepalive_timeout + t.margin,
                t.mirror_timeout.saturating_sub(t.margin)
            ));
        }
        if t.heartbeat.is_zero() || t.heartbeat * 3 > t.lease {
            wrong.push(format!(
                "heartbeat {:?} must be above 0 and at most lease / 3 ({:?})",
                t.heartbeat,
                t.lease / 3
            ));
        }
        if t.lease + t.margin >= t.auso_window {
            wrong.push(format!(
                "lease + margin ({:?}) must be below auso_window ({:?})",
                t.lease + t.margin,
                t.auso_window
            ));
        }
        if t.auso_window > t.mirror_timeout {
            wrong.push(format!(
                "auso_window {:?} must be at most mirror_timeout {:?}",
                t.auso_window, t.mirror_timeout
            ));
        }
        if wrong.is_empty() { Ok(()) } else { Err(wrong.join("; ")) }
    }
}

/// A configured controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Controller {
    /// Its id.
    pub node: NodeId,
    /// Its site.
    pub site: Site,
}

/// The mediator's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    /// Every controller of the cluster.
    pub controllers: Vec<Controller>,
    /// The timers (validated by `Mediator::new`).
    pub timers: Timers,
    /// Observer mode (rule 6): detect and alert, never grant an automatic switchover.
    pub observer: bool,
}

/// A controller's MetroCluster mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Serving its own aggregates.
    Normal,
    /// Serving its partner's aggregates too.
    Switchover,
    /// Its aggregates are served by its partner.
    WaitingForSwitchback,
    /// A switchover took only some aggregates.
    PartialSwitchover,
    /// A switchback stopped half-way.
    PartialSwitchback,
}

/// An NVLog mirror's state, as the writer or the receiver keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MirrorState {
    /// Every record is at the partner.
    InSync,
    /// Re-established, not yet covered by a CP (§4.2).
    Resyncing,
    /// Dropped (S3) or silent (S13).
    OutOfSync,
}

/// What a controller knows of one partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartnerView {
    /// The partner.
    pub node: NodeId,
    /// How long before the report was sent it last heard anything from the partner; `None`:
    /// not in this life of the controller (then `uptime` bounds it).
    pub heard_age: Option<Duration>,
    /// How long before the report was sent it last completed a round trip with the partner.
    pub round_trip_age: Option<Duration>,
}

/// An aggregate the reporting controller owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OwnedReport {
    /// The aggregate.
    pub aggregate: AggregateId,
    /// The epoch the controller holds.
    pub epoch: Epoch,
    /// Its NVLog mirror to the DR partner, as the writer.
    pub mirror: MirrorState,
    /// The receiver's partition generation of the writer's last handshake.
    pub receiver_generation: u64,
    /// Both plexes normal.
    pub plexes_normal: bool,
}

/// A writer's mirror the reporting controller receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ReceivedReport {
    /// The writer.
    pub writer: NodeId,
    /// This receiver's partition generation.
    pub partition_generation: u64,
    /// Its account of the writer's mirror (S13).
    pub state: MirrorState,
}

/// A heartbeat report (DESIGN §10).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Report {
    /// Who sends it.
    pub node: NodeId,
    /// Its NVLog generation and a sequence, increasing within a generation.
    pub log_generation: u64,
    /// See `log_generation`.
    pub sequence: u64,
    /// The mediator state version the controller last saw (rule 5: a higher one than the
    /// mediator's own means the mediator's state is older than what it once had).
    pub state_version: u64,
    /// How long the controller has run.
    pub uptime: Duration,
    /// Its mode.
    pub mode: Mode,
    /// Fenced (S6 or S2).
    pub fenced: bool,
    /// Its partners.
    pub partners: Vec<PartnerView>,
    /// The aggregates it owns.
    pub owned: Vec<OwnedReport>,
    /// The mirrors it receives.
    pub received: Vec<ReceivedReport>,
    /// Every epoch it has seen, its own or not (rule 5 learns the highest).
    pub epochs_seen: Vec<(AggregateId, Epoch)>,
}

/// What an event asks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    /// A heartbeat.
    Report(Report),
    /// A controller records a drop (S3): its NVLog mirror of `aggregate`'s owner, or a plex.
    RecordDrop {
        /// Who records it.
        node: NodeId,
        /// The aggregate whose mirror or plex was dropped.
        aggregate: AggregateId,
        /// `(log generation, sequence)` from the sender's heartbeat counter: its reports with an
        /// older stamp, delivered late, are ignored from now on.
        stamp: (u64, u64),
        /// Only a plex was dropped: the NVLog mirror stays intact (S8).
        plex_only: bool,
    },
    /// An operator's forced switchover to `node`'s site, through the mediator (S7).
    ManualSwitchover {
        /// The survivor.
        node: NodeId,
        /// Go on though an aggregate is not in sync (its volumes are then NVFAILed).
        override_in_sync: bool,
    },
    /// The survivor has applied its grant: it is not sent again.
    ConfirmGrant {
        /// The survivor.
        node: NodeId,
    },
    /// A controller raises epochs (negotiated switchover, switchback, forced unfence): while
    /// the mediator answers it alone raises them (DESIGN §10).
    RaiseEpochs {
        /// Who asks.
        node: NodeId,
        /// Each aggregate and the owner its new epoch names.
        aggregates: Vec<(AggregateId, NodeId)>,
        /// Why, in the controller's words ("negotiated switchover", "switchback", ...).
        reason: String,
    },
    /// An operator confirms these controllers down (rule 5).
    ConfirmDown {
        /// The controllers.
        nodes: Vec<NodeId>,
    },
}

/// An epoch grant (AUSO or manual forced switchover).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The survivor.
    pub to: NodeId,
    /// The lost site.
    pub from: Site,
    /// The new epochs, one per aggregate of the lost site.
    pub epochs: Vec<(AggregateId, Epoch)>,
    /// Automatic (AUSO) or manual.
    pub automatic: bool,
    /// Manual with the in-sync condition overridden: the survivor NVFAILs these volumes.
    pub nvfail: bool,
}

/// What the mediator sees of the sites (rule 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Diagnosis {
    /// Both sites report and reach each other.
    Healthy,
    /// Both sites report, and they do not reach each other.
    InterSiteLinkLost,
    /// A site does not report, and the other still hears it.
    MediatorLinkLost(Site),
    /// A site does not report, and the other does not hear it either.
    SiteLost(Site),
    /// Neither site reports.
    NoReports,
}

/// What the daemon must do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// The durable state changed: write it (atomically, fsynced) before sending what follows.
    Persist,
    /// Answer the event's sender.
    Reply(Reply),
    /// Refuse the event, with why (nothing changed).
    Refuse {
        /// To whom.
        to: NodeId,
        /// Why, in words.
        reason: String,
    },
    /// Something an operator must see (logged, counted, shown by `mcctl mediator show`).
    Alert(String),
}

/// The answer to a controller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reply {
    /// To whom.
    pub to: NodeId,
    /// The lease (S6): the controller uses the smaller of this and its own.
    pub lease: Duration,
    /// The current epochs.
    pub epochs: Vec<(AggregateId, Epoch)>,
    /// The state version, which the controller persists and reports back.
    pub state_version: u64,
    /// A grant for this controller not yet confirmed.
    pub grant: Option<Grant>,
    /// Rule 5: the state is lost and not yet rebuilt, or rebuilt with a controller confirmed
    /// down that has not reported since, so these epochs may be behind: the reply confirms no
    /// epoch (S2).
    pub state_lost: bool,
    /// The aggregates whose mirror is intact (`AggregateRecord::mirror_intact`): an owner that
    /// lost its NVLog partition may count its DR partner's copy complete for these only (S8).
    pub mirror_intact: Vec<AggregateId>,
}

/// What the mediator records of one aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct AggregateRecord {
    /// The authoritative epoch.
    pub epoch: Epoch,
    /// The owner's latest report at this epoch: its mirror state, the receiver generation it
    /// names, both plexes normal.
    pub owner_says: Option<(MirrorState, u64, bool)>,
    /// The receiver's latest report: its state and partition generation.
    pub receiver_says: Option<(MirrorState, u64)>,
    /// The record was in sync at this epoch, and since then no drop was recorded and the state
    /// was not lost: the receiver's copy of the owner's NVLog holds every record the owner
    /// acknowledged (with a mediator, a drop completes only once recorded here, S3). An owner
    /// that lost its own partition adopts that copy as complete only while this holds (S8).
    pub mirror_intact: bool,
}

impl AggregateRecord {
    /// In sync at its current epoch (DESIGN §10).
    pub fn in_sync(&self) -> bool {
        if active(Break::ReceiverReportRestoresInSync) {
            return matches!(self.receiver_says, Some((MirrorState::InSync, _)));
        }
        matches!(
            (self.owner_says, self.receiver_says),
            (Some((MirrorState::InSync, g1, true)), Some((MirrorState::InSync, g2))) if g1 == g2
        )
    }

    fn clear(&mut self) {
        self.owner_says = None;
        self.receiver_says = None;
        self.mirror_intact = false;
    }
}

/// The durable state.
#[derive(Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct State {
    /// Raised with every change.
    pub version: u64,
    /// Per aggregate.
    pub aggregates: BTreeMap<AggregateId, AggregateRecord>,
    /// Grants not yet confirmed.
    pub grants: Vec<Grant>,
    /// The newest report applied per node: `(log generation, sequence)`.
    pub applied: BTreeMap<NodeId, (u64, u64)>,
}

/// The mediator.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mediator {
    config: Config,
    state: State,
    /// Rule 5: the state was lost, corrupt or older than a controller's.
    lost: bool,
    /// Controllers that reported since the state was found lost, or confirmed down.
    accounted: BTreeSet<NodeId>,
    /// Controllers an operator confirmed down that have not reported since: until they do, the
    /// epochs may be behind one they used, so replies confirm nothing (S2, S9).
    down_unheard: BTreeSet<NodeId>,
    /// When each controller was last heard (any event).
    heard: BTreeMap<NodeId, Now>,
    /// Each controller's latest applied report and when it came.
    latest: BTreeMap<NodeId, (Now, Report)>,
    /// The last diagnosis alerted.
    last_diagnosis: Option<Diagnosis>,
    /// The last grant or refusal of a switchover, in words.
    last_decision: Option<String>,
    /// After a restart: state versions above the one read back and below the one this process
    /// issues from (`RESTART_VERSION_GAP` higher). No process of this mediator issued them since
    /// the file was written, unless the file is an older copy: a report of one comes from a
    /// history the file lacks, however far the running counter has gone meanwhile.
    unissued: Option<(u64, u64)>,
}

/// How far a restarted mediator moves its state version on (`Mediator::restart`): more than
/// the changes any one process makes.
pub const RESTART_VERSION_GAP: u64 = 1 << 32;

/// What the mediator knows of one controller (for `mcctl mediator show`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeView {
    /// The controller.
    pub node: NodeId,
    /// Its site.
    pub site: Site,
    /// How long ago it was last heard; `None`: not since the mediator started.
    pub heard_ago: Option<Duration>,
    /// Its latest report's mode and fencing.
    pub mode: Option<(Mode, bool)>,
}

impl Mediator {
    /// A mediator over `state` (`None`: lost or unreadable, rule 5).
    pub fn new(config: Config, state: Option<State>) -> Result<Mediator, String> {
        config.timers.validate()?;
        let sites: BTreeSet<Site> = config.controllers.iter().map(|c| c.site).collect();
        if config.controllers.is_empty() || sites.len() != 2 || sites.iter().any(|s| s.0 > 1) {
            return Err("the mediator needs controllers at sites A and B".into());
        }
        let lost = state.is_none();
        Ok(Mediator {
            config,
            state: state.unwrap_or_default(),
            lost,
            accounted: BTreeSet::new(),
            down_unheard: BTreeSet::new(),
            heard: BTreeMap::new(),
            latest: BTreeMap::new(),
            last_diagnosis: None,
            last_decision: None,
            unissued: None,
        })
    }

    /// A restarted mediator over the state read back from its file (rule 5): rebuilding, since
    /// nothing tells that file from an older copy restored over it. Until every configured
    /// controller has reported (or been confirmed down) it grants nothing and its replies
    /// confirm no epoch; the in-sync records wait for the owners' and receivers' new reports.
    /// Kept: the epochs, the grants (final), the report stamps, and whether each mirror is
    /// intact (its owner, which records every drop of it, reports a state version the file
    /// lacks if the file is older, and that clears it). The state version jumps by
    /// `RESTART_VERSION_GAP`, so that such a version is told from one this process issued.
    pub fn restart(config: Config, mut state: State) -> Result<Mediator, String> {
        if active(Break::RestartTrustsItsFile) {
            return Mediator::restore(config, state, false);
        }
        for record in state.aggregates.values_mut() {
            record.owner_says = None;
            record.receiver_says = None;
        }
        let read = state.version;
        state.version = read.saturating_add(RESTART_VERSION_GAP);
        let mut mediator = Mediator::restore(config, state, true)?;
        mediator.unissued = Some((read, mediator.state.version));
        Ok(mediator)
    }

    /// A mediator over `state`, rebuilding it (rule 5) or not: `restart`'s step (and, trusting
    /// the file, its deliberate break). `lost = true` keeps the state's epochs, grants and
    /// stamps, but grants nothing until every controller has reported again.
    fn restore(config: Config, state: State, lost: bool) -> Result<Mediator, String> {
        let mut mediator = Mediator::new(config, Some(state))?;
        mediator.lost = lost;
        Ok(mediator)
    }

    /// The durable state, to persist.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Every configured controller as the mediator sees it at `now`.
    pub fn node_views(&self, now: Now) -> Vec<NodeView> {
        self.config
            .controllers
            .iter()
            .map(|c| NodeView {
                node: c.node,
                site: c.site,
                heard_ago: self.heard.get(&c.node).map(|at| now.saturating_sub(*at)),
                mode: self.latest.get(&c.node).map(|(_, r)| (r.mode, r.fenced)),
            })
            .collect()
    }

    /// Per site: whether AUSO towards it is armed (every condition of rule 2 but its timing
    /// holds: it would be granted once the other site has been silent for lease + margin), or
    /// why not.
    pub fn auso_status(&self, now: Now) -> Vec<(Site, Result<(), String>)> {
        [Site(0), Site(1)]
            .into_iter()
            .map(|site| {
                let status = match self.nodes_at(site).first() {
                    Some(node) => self.check(now, *node, true, false, false).map(|_| ()),
                    None => Err("no controller configured there".into()),
                };
                (site, status)
            })
            .collect()
    }

    /// The last grant or refusal of a switchover, in words.
    pub fn last_decision(&self) -> Option<&str> {
        self.last_decision.as_deref()
    }

    /// Whether the state is lost and not yet rebuilt (rule 5).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    fn site_of(&self, node: NodeId) -> Option<Site> {
        self.config.controllers.iter().find(|c| c.node == node).map(|c| c.site)
    }

    fn nodes_at(&self, site: Site) -> Vec<NodeId> {
        self.config.controllers.iter().filter(|c| c.site == site).map(|c| c.node).collect()
    }

    fn changed(&mut self, actions: &mut Vec<Action>) {
        // Saturating: a version reported near the top (bad input) must not wrap to 0 or panic.
        self.state.version = self.state.version.saturating_add(1);
        if !actions.contains(&Action::Persist) {
            actions.insert(0, Action::Persist);
        }
    }

    fn reply(&self, to: NodeId) -> Action {
        Action::Reply(Reply {
            to,
            lease: self.config.timers.lease,
            epochs: self.state.aggregates.iter().map(|(id, r)| (*id, r.epoch)).collect(),
            state_version: self.state.version,
            grant: self.state.grants.iter().find(|g| g.to == to).cloned(),
            state_lost: self.lost || !self.down_unheard.is_empty(),
            mirror_intact: self
                .state
                .aggregates
                .iter()
                .filter(|(_, r)| r.mirror_intact)
                .map(|(id, _)| *id)
                .collect(),
        })
    }

    /// Handles one event at `now`.
    pub fn handle(&mut self, now: Now, event: Event) -> Vec<Action> {
        let node = match &event {
            Event::Report(r) => r.node,
            Event::RecordDrop { node, .. }
            | Event::ManualSwitchover { node, .. }
            | Event::ConfirmGrant { node }
            | Event::RaiseEpochs { node, .. } => *node,
            Event::ConfirmDown { .. } => NodeId(0),
        };
        let mut actions = Vec::new();
        if !matches!(event, Event::ConfirmDown { .. }) && self.site_of(node).is_none() {
            return vec![Action::Refuse {
                to: node,
                reason: format!("node {} is not configured here", node.0),
            }];
        }
        match event {
            Event::Report(report) => self.on_report(now, report, &mut actions),
            Event::RecordDrop { node, aggregate, stamp, plex_only } => {
                self.heard.insert(node, now);
                // A report sent before the drop and delivered after it must not make the
                // aggregate look in sync again.
                if self.state.applied.get(&node).is_none_or(|applied| stamp > *applied) {
                    self.state.applied.insert(node, stamp);
                    self.changed(&mut actions);
                }
                // An aggregate the mediator has no record of is not in sync here: nothing to
                // clear, and no owner-less record is made up for it.
                if let Some(record) = self.state.aggregates.get_mut(&aggregate)
                    && (record.owner_says.is_some()
                        || record.receiver_says.is_some()
                        || (record.mirror_intact && !plex_only))
                {
                    let intact = record.mirror_intact && plex_only;
                    record.clear();
                    record.mirror_intact = intact;
                    self.changed(&mut actions);
                }
                actions.push(self.reply(node));
            }
            Event::RaiseEpochs { node, aggregates, reason } => {
                self.heard.insert(node, now);
                match self.raise_epochs(now, node, &aggregates) {
                    Ok(()) => {
                        let owners: BTreeSet<u32> = aggregates.iter().map(|(_, owner)| owner.0).collect();
                        let owners: Vec<String> = owners.iter().map(u32::to_string).collect();
                        self.last_decision = Some(format!(
                            "epochs of {} aggregate(s) raised for node {} ({reason}, asked by node {})",
                            aggregates.len(),
                            owners.join(", "),
                            node.0
                        ));
                        self.changed(&mut actions);
                        actions.push(self.reply(node));
                    }
                    Err(reason) => actions.push(Action::Refuse { to: node, reason }),
                }
            }
            Event::ManualSwitchover { node, override_in_sync } => {
                self.heard.insert(node, now);
                match self.check_switchover(now, node, false, override_in_sync) {
                    Ok(not_in_sync) => {
                        self.grant(node, false, not_in_sync, &mut actions);
                        actions.push(self.reply(node));
                    }
                    Err(reason) => {
                        self.last_decision =
                            Some(format!("manual switchover to node {} refused: {reason}", node.0));
                        actions.push(Action::Refuse { to: node, reason });
                    }
                }
            }
            Event::ConfirmGrant { node } => {
                self.heard.insert(node, now);
                let before = self.state.grants.len();
                self.state.grants.retain(|g| g.to != node);
                if self.state.grants.len() != before {
                    self.changed(&mut actions);
                }
                actions.push(self.reply(node));
            }
            Event::ConfirmDown { nodes } => {
                if self.lost {
                    self.down_unheard.extend(nodes.iter().copied().filter(|n| !self.accounted.contains(n)));
                }
                self.accounted.extend(nodes);
                self.check_rebuilt();
            }
        }
        self.alert_on_change(now, &mut actions);
        actions
    }

    /// New epochs above every epoch recorded or reported, one per aggregate, each naming its
    /// requested owner (a configured controller). Nothing changes on a refusal.
    /// An aggregate changes owner only at the request of its current owner (a negotiated
    /// switchover's release, a switchback), or once that owner has been silent for lease +
    /// margin (its lease lapsed, S6): a live owner is never deposed behind its back.
    fn raise_epochs(
        &mut self,
        now: Now,
        requester: NodeId,
        aggregates: &[(AggregateId, NodeId)],
    ) -> Result<(), String> {
        if self.lost {
            return Err("the mediator's state is lost and not yet rebuilt from every controller's report \
                        (rule 5): it cannot tell which epochs were used; retry once every controller has \
                        reported, or confirm the missing ones down"
                .into());
        }
        if aggregates.is_empty() {
            return Err("no aggregate named".into());
        }
        for (i, (id, owner)) in aggregates.iter().enumerate() {
            if aggregates[..i].iter().any(|(a, _)| a == id) {
                return Err("an aggregate is named twice".into());
            }
            if self.site_of(*owner).is_none() {
                return Err(format!("node {} is not configured here", owner.0));
            }
            if self.state.grants.iter().any(|g| g.epochs.iter().any(|(a, _)| a == id)) {
                return Err("a switchover grant of this aggregate awaits its survivor's confirmation".into());
            }
            if self.highest_epoch(*id).number == u64::MAX {
                return Err("the aggregate's epoch number cannot be raised".into());
            }
            let holder = self.state.aggregates.get(id).map(|r| r.epoch.owner).unwrap_or_default();
            // Never heard since the mediator started: silent since its start.
            let last = self.heard.get(&holder).copied().unwrap_or_default();
            let quiet_for = self.config.timers.lease + self.config.timers.margin;
            // And the requester has not heard it either (its lease is renewed by their round
            // trips too, S6), as its latest report says.
            let requester_quiet = self.latest.get(&requester).is_some_and(|(received, report)| {
                let age = report.partners.iter().find(|p| p.node == holder).and_then(|p| p.heard_age);
                let age = age.unwrap_or(report.uptime);
                now.saturating_sub(received.saturating_sub(age)) >= quiet_for
            });
            let silent = now.saturating_sub(last) >= quiet_for && requester_quiet;
            if holder != NodeId(0) && holder != *owner && holder != requester && !silent {
                return Err(format!(
                    "node {} holds the aggregate and reports: only it can give it away (its lease has not lapsed)",
                    holder.0
                ));
            }
        }
        for (id, owner) in aggregates {
            let number = self.highest_epoch(*id).number.saturating_add(1);
            let record = self.state.aggregates.entry(*id).or_default();
            record.epoch = Epoch { number, owner: *owner };
            record.clear();
        }
        Ok(())
    }

    fn check_rebuilt(&mut self) {
        if self.lost && self.config.controllers.iter().all(|c| self.accounted.contains(&c.node)) {
            self.lost = false;
        }
    }

    fn on_report(&mut self, now: Now, report: Report, actions: &mut Vec<Action>) {
        let node = report.node;
        let stamp = (report.log_generation, report.sequence);
        if self.state.applied.get(&node).is_some_and(|applied| stamp <= *applied) {
            // Older than one applied: ignored, and not answered (its lease would start late).
            return;
        }
        self.heard.insert(node, now);
        self.down_unheard.remove(&node);
        let unissued = self
            .unissued
            .is_some_and(|(read, from)| report.state_version > read && report.state_version < from);
        if report.state_version > self.state.version || unissued {
            // Rule 5: a controller saw a newer state than ours (a restored snapshot): what the
            // records say may predate a drop, an epoch or a grant it knows of. In a rebuild too.
            for record in self.state.aggregates.values_mut() {
                record.clear();
            }
            if !self.lost {
                self.lost = true;
                self.accounted.clear();
                actions.push(Action::Alert(format!(
                    "node {} saw mediator state version {}, above ours ({}): the state is treated as lost; \
                     nothing is granted until every controller has reported",
                    node.0, report.state_version, self.state.version
                )));
            }
        }
        self.state.applied.insert(node, stamp);
        if self.lost {
            self.accounted.insert(node);
        }
        // Epochs: learn every higher one (rule 5; it adopts any higher epoch reported).
        let seen =
            report.epochs_seen.iter().copied().chain(report.owned.iter().map(|o| (o.aggregate, o.epoch)));
        for (aggregate, epoch) in seen {
            let record = self.state.aggregates.entry(aggregate).or_default();
            if epoch > record.epoch {
                record.epoch = epoch;
                record.clear();
            }
        }
        // Rule 3: any report may lower; in sync needs the owner's and the receiver's word.
        for owned in &report.owned {
            let record = self.state.aggregates.entry(owned.aggregate).or_default();
            if owned.epoch == record.epoch {
                record.owner_says = Some((owned.mirror, owned.receiver_generation, owned.plexes_normal));
            }
        }
        for received in &report.received {
            for record in self.state.aggregates.values_mut().filter(|r| r.epoch.owner == received.writer) {
                record.receiver_says = Some((received.state, received.partition_generation));
            }
        }
        // S8: in sync again (after a resync, or for the first time) makes the mirror intact;
        // only a drop, a new epoch or a lost state ends that.
        for record in self.state.aggregates.values_mut() {
            if record.in_sync() {
                record.mirror_intact = true;
            }
        }
        if report.state_version > self.state.version {
            self.state.version = report.state_version;
        }
        self.latest.insert(node, (now, report));
        self.check_rebuilt();
        self.changed(actions);
        // Rule 2: AUSO, on a report of the survivor.
        if self.check_switchover(now, node, true, false).is_ok() {
            self.grant(node, true, false, actions);
        }
        actions.push(self.reply(node));
    }

    /// The aggregates owned by controllers of `site`.
    fn owned_by(&self, site: Site) -> Vec<AggregateId> {
        let nodes = self.nodes_at(site);
        self.state
            .aggregates
            .iter()
            .filter(|(_, r)| nodes.contains(&r.epoch.owner))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether a switchover of the other site to `node` may be granted now (rule 2); `Ok(true)`:
    /// only with the in-sync condition overridden.
    pub fn check_switchover(
        &self,
        now: Now,
        node: NodeId,
        automatic: bool,
        override_in_sync: bool,
    ) -> Result<bool, String> {
        self.check(now, node, automatic, override_in_sync, true)
    }

    /// `check_switchover`; without `timing`, the lease and window conditions are left out:
    /// whether AUSO is armed (it would be granted once the other site went silent for lease +
    /// margin), as `mcctl mediator show` tells it.
    fn check(
        &self,
        now: Now,
        node: NodeId,
        automatic: bool,
        override_in_sync: bool,
        timing: bool,
    ) -> Result<bool, String> {
        let Some(site) = self.site_of(node) else { return Err(format!("node {} is not configured", node.0)) };
        let other = Site(1 - site.0);
        if automatic && self.config.observer {
            return Err("observer mode: no automatic switchover".into());
        }
        if self.lost {
            let missing: Vec<String> = self
                .config
                .controllers
                .iter()
                .filter(|c| !self.accounted.contains(&c.node))
                .map(|c| c.node.0.to_string())
                .collect();
            return Err(format!(
                "the mediator's state was lost: nodes {} have not reported since (or been confirmed down)",
                missing.join(", ")
            ));
        }
        if self.state.grants.iter().any(|g| g.to == node) {
            return Err("a grant to this node is not confirmed yet".into());
        }
        let affected = self.owned_by(other);
        // No controller of the survivor's site in takeover or fenced.
        for n in self.nodes_at(site) {
            let Some((_, r)) = self.latest.get(&n) else {
                return Err(format!("node {} has not reported", n.0));
            };
            // S14: a site whose aggregates were switched over is no target for them before heal
            // and switchback. Its controllers say so (waiting for switchback, fenced) once they
            // know; one whose latest report still claims such an aggregate below the recorded
            // epoch has not learned it yet (that report predates the switchover: found by the
            // model check, docs/safety.md).
            let stale_claim = r.owned.iter().find(|o| {
                affected.contains(&o.aggregate)
                    && self.state.aggregates.get(&o.aggregate).is_some_and(|rec| o.epoch < rec.epoch)
            });
            if !active(Break::SwitchedOverTarget) {
                if r.mode == Mode::WaitingForSwitchback {
                    return Err(format!(
                        "node {} waits for heal and switchback: its site is no switchover target before them (S14)",
                        n.0
                    ));
                }
                if let Some(o) = stale_claim {
                    return Err(format!(
                        "node {} last reported aggregate {} at epoch {}@node{}, which was switched over since: its \
                         site is no switchover target before heal and switchback (S14)",
                        n.0,
                        o.aggregate.0.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                        o.epoch.number,
                        o.epoch.owner.0
                    ));
                }
            }
            if r.fenced && r.mode != Mode::WaitingForSwitchback {
                return Err(format!("node {} is fenced", n.0));
            }
            if !matches!(r.mode, Mode::Normal | Mode::WaitingForSwitchback) {
                return Err(format!("node {} is in {:?}", n.0, r.mode));
            }
        }
        let Some((received, report)) = self.latest.get(&node) else {
            return Err("no report from the survivor".into());
        };
        if affected.is_empty() {
            return Err(format!("site {} owns no aggregate", site_name(other)));
        }
        // S7: a grant is final until its survivor confirms it (it is re-delivered until then);
        // a second one of the same aggregates would leave the first survivor applying an epoch
        // below the one issued since.
        if self.state.grants.iter().any(|g| g.epochs.iter().any(|(id, _)| affected.contains(id))) {
            return Err("a grant of these aggregates is not confirmed yet".into());
        }
        if timing {
            self.check_quiet(now, *received, report, other, automatic)?;
        }
        let out_of_sync: Vec<&AggregateId> = affected
            .iter()
            .filter(|id| !self.state.aggregates.get(id).is_some_and(AggregateRecord::in_sync))
            .collect();
        let broken = automatic && active(Break::GrantWithoutInSync);
        if !out_of_sync.is_empty() && !broken {
            if automatic || !override_in_sync {
                return Err(format!(
                    "{} aggregate(s) of site {} not recorded in sync",
                    out_of_sync.len(),
                    site_name(other)
                ));
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Rule 2's timing: `lease + margin` since the later of the mediator's and the survivor's
    /// last sign of `other`, and (automatic) within the window.
    fn check_quiet(
        &self,
        now: Now,
        received: Now,
        report: &Report,
        other: Site,
        automatic: bool,
    ) -> Result<(), String> {
        let t = &self.config.timers;
        // T: the later of the mediator's and the survivor's last sign of the other site.
        let mut quiet = Duration::MAX;
        for x in self.nodes_at(other) {
            let mediator_quiet = now.saturating_sub(self.heard.get(&x).copied().unwrap_or_default());
            let view = report.partners.iter().find(|p| p.node == x);
            let survivor_quiet = view.and_then(|p| p.heard_age).unwrap_or(report.uptime);
            // The survivor's age was measured at its send time, at most `received`: its last
            // sign of x is at most `received − age`.
            let survivor_quiet = now.saturating_sub(received.saturating_sub(survivor_quiet));
            quiet = quiet.min(mediator_quiet).min(survivor_quiet);
        }
        if quiet < t.lease + t.margin {
            return Err(format!(
                "site {} was heard {:.1} s ago (mediator or survivor): its lease may still run ({:.1} s + margin)",
                site_name(other),
                quiet.as_secs_f64(),
                t.lease.as_secs_f64()
            ));
        }
        if automatic && quiet > t.auso_window {
            return Err(format!(
                "site {} went silent {:.1} s ago, outside the AUSO window ({:.1} s)",
                site_name(other),
                quiet.as_secs_f64(),
                t.auso_window.as_secs_f64()
            ));
        }
        Ok(())
    }

    fn grant(&mut self, to: NodeId, automatic: bool, nvfail: bool, actions: &mut Vec<Action>) {
        let Some(site) = self.site_of(to) else { return };
        let from = Site(1 - site.0);
        let mut epochs = Vec::new();
        for id in self.owned_by(from) {
            let highest = self.highest_epoch(id);
            let epoch = Epoch { number: highest.number.saturating_add(1), owner: to };
            let record = self.state.aggregates.entry(id).or_default();
            record.epoch = epoch;
            record.clear();
            epochs.push((id, epoch));
        }
        // The same record is the survivor's S3 record for dropping the lost site: every
        // aggregate of the survivor's site mirrored to it is out of sync from now on.
        for id in self.owned_by(site) {
            if let Some(record) = self.state.aggregates.get_mut(&id) {
                record.clear();
            }
        }
        self.state.grants.push(Grant { to, from, epochs, automatic, nvfail });
        self.changed(actions);
        let text = format!(
            "{} switchover of site {} to node {} granted{}",
            if automatic { "automatic" } else { "manual" },
            site_name(from),
            to.0,
            if nvfail { " (in-sync overridden: NVFAIL)" } else { "" }
        );
        self.last_decision = Some(text.clone());
        actions.push(Action::Alert(text));
    }

    /// The highest epoch recorded or reported for `id` (S2: new epochs go above it).
    fn highest_epoch(&self, id: AggregateId) -> Epoch {
        let mut highest = self.state.aggregates.get(&id).map(|r| r.epoch).unwrap_or_default();
        for (_, report) in self.latest.values() {
            let seen = report.epochs_seen.iter().copied();
            for (aggregate, epoch) in seen.chain(report.owned.iter().map(|o| (o.aggregate, o.epoch))) {
                if aggregate == id {
                    highest = highest.max(epoch);
                }
            }
        }
        highest
    }

    /// What the mediator sees (rule 7).
    pub fn diagnose(&self, now: Now) -> Diagnosis {
        let t = &self.config.timers;
        let silent = |site: Site| {
            self.nodes_at(site)
                .iter()
                .all(|n| self.heard.get(n).is_none_or(|at| now.saturating_sub(*at) > t.lease))
        };
        let hears = |site: Site, other: Site| {
            self.nodes_at(site).iter().any(|n| {
                self.latest.get(n).is_some_and(|(_, r)| {
                    r.partners.iter().any(|p| {
                        self.site_of(p.node) == Some(other)
                            && p.heard_age.is_some_and(|a| a <= t.keepalive_timeout)
                    })
                })
            })
        };
        let (a, b) = (Site(0), Site(1));
        match (silent(a), silent(b)) {
            (true, true) => Diagnosis::NoReports,
            (false, false) if hears(a, b) && hears(b, a) => Diagnosis::Healthy,
            (false, false) => Diagnosis::InterSiteLinkLost,
            (true, false) if hears(b, a) => Diagnosis::MediatorLinkLost(a),
            (true, false) => Diagnosis::SiteLost(a),
            (false, true) if hears(a, b) => Diagnosis::MediatorLinkLost(b),
            (false, true) => Diagnosis::SiteLost(b),
        }
    }

    fn alert_on_change(&mut self, now: Now, actions: &mut Vec<Action>) {
        let diagnosis = self.diagnose(now);
        if self.last_diagnosis != Some(diagnosis) {
            if self.last_diagnosis.is_some() || diagnosis != Diagnosis::Healthy {
                actions.push(Action::Alert(describe(diagnosis)));
            }
            self.last_diagnosis = Some(diagnosis);
        }
    }

    /// Time passes: alerts when the diagnosis changes.
    pub fn tick(&mut self, now: Now) -> Vec<Action> {
        let mut actions = Vec::new();
        self.alert_on_change(now, &mut actions);
        actions
    }
}

fn site_name(site: Site) -> &'static str {
    if site.0 == 0 { "A" } else { "B" }
}

/// A diagnosis in words.
pub fn describe(diagnosis: Diagnosis) -> String {
    match diagnosis {
        Diagnosis::Healthy => "both sites report and reach each other".into(),
        Diagnosis::InterSiteLinkLost => {
            "inter-site link lost: both sites report to the mediator but do not reach each other; no switchover"
                .into()
        }
        Diagnosis::MediatorLinkLost(site) => format!(
            "mediator link lost: site {} does not report, but the other site still hears it; no switchover",
            site_name(site)
        ),
        Diagnosis::SiteLost(site) => format!(
            "site {} lost: it does not report and the other site does not hear it",
            site_name(site)
        ),
        Diagnosis::NoReports => "no site reports".into(),
    }
}
